#!/usr/bin/env python3
"""What a fleet costs and how fast it agrees: the release binary, three
replicas sharing decisions through a real etcd (Debian's etcd-server) on
loopback.

1. Propagation: N cycles of `revert` on replica 1 then `reset` on replica
   2; each decision is applied by the two other replicas. The lag of each
   application (from the deciding replica's decision to this replica's
   application, both stamped by the replicas themselves: the
   "fleet decision applied" log line's lag_ms) gives p50 / p99 / max; the
   time until the other replicas' /status shows it, polled every 2 ms, is
   printed beside it (an upper bound: it adds the admin round trips).
2. Data plane: wrk against one replica with [fleet] on, then the same
   config without it, alternating, R rounds of D seconds each; veer runs
   one worker pinned to CPU 0, wrk and the upstreams on CPU 1.

usage: [VEER=binary] benches/fleet.py [--cycles 100] [--rounds 3] [--duration 5]
Only 127.0.0.1 is targeted; every loop is bounded in count and time.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from benchutil import ROOT, free_port


def http(method, url, token=None, timeout=5):
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait(pred, limit, what):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.002)
    sys.exit(f"timed out waiting for {what}")


class Replica:
    def __init__(self, veer, work, name, etcd, fleet=True, pin=None, upstreams=None,
                 fleet_extra="", route_extra="", fleet_name="bench"):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.admin = free_port()
        self.port = free_port()
        stable, canary = upstreams or ("127.0.0.1:1", "127.0.0.1:2")
        fleet_text = (
            f'[fleet]\nstore = "etcd"\nendpoints = ["http://{etcd}"]\nname = "{fleet_name}"\nreplica = "{name}"\n{fleet_extra}'
            if fleet
            else ""
        )
        cfg = f"""[proxy]
listen = ["127.0.0.1:{self.port}"]
workers = 1
[admin]
listen = "127.0.0.1:{self.admin}"
[state]
dir = "{self.dir}/state"
{fleet_text}
[[route]]
name = "web"
sticky = ["header:x-user-id"]
[route.stable]
version = "v1"
endpoints = ["{stable}"]
[route.canary]
version = "v2"
endpoints = ["{canary}"]
weight = 20
{route_extra}"""
        path = os.path.join(self.dir, "veer.toml")
        with open(path, "w") as f:
            f.write(cfg)
        self.log_path = os.path.join(self.dir, "log")
        cmd = [veer, "--log-format", "json", "run", "--config", path]
        if pin is not None:
            cmd = ["taskset", "-c", str(pin)] + cmd
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "w"),
            env=dict(os.environ, RUST_LOG="info"),
        )
        wait(self.ready, 30, f"{name} ready")
        self.token = open(os.path.join(self.dir, "state", "admin.token")).read().strip()

    def ready(self):
        try:
            return http("GET", f"http://127.0.0.1:{self.admin}/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    def status(self):
        return json.loads(http("GET", f"http://127.0.0.1:{self.admin}/status")[1])

    def route(self):
        return self.status()["routes"][0]

    def act(self, action):
        code, body = http("POST", f"http://127.0.0.1:{self.admin}/routes/web/{action}", self.token)
        if code != 200:
            sys.exit(f"{self.name} {action}: HTTP {code} {body!r}")

    def lags(self):
        out = []
        for line in open(self.log_path):
            if '"fleet decision applied"' in line:
                out.append(json.loads(line)["lag_ms"])
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_etcd(work):
    client, peer = free_port(), free_port()
    p = subprocess.Popen(
        [
            "etcd", "--name=b", f"--data-dir={work}/etcd",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=b=http://127.0.0.1:{peer}",
            "--logger=zap", "--log-outputs=stderr",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    addr = f"127.0.0.1:{client}"
    wait(lambda: http_ok(f"http://{addr}/health"), 30, "etcd")
    return p, addr


def http_ok(url):
    try:
        return http("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def propagation(veer, work, etcd, cycles):
    rs = [Replica(veer, work, f"r{i}", etcd) for i in (1, 2, 3)]
    try:
        for r in rs:
            wait(lambda r=r: r.status().get("fleet", {}).get("synced"), 30, f"{r.name} synced")
        seen = []
        deadline = time.monotonic() + 600
        for _ in range(cycles):
            if time.monotonic() > deadline:
                break
            t = time.monotonic()
            rs[0].act("revert")
            for r in (rs[1], rs[2]):
                wait(lambda r=r: r.route()["reverted"] is not None, 10, "revert applied")
            seen.append(time.monotonic() - t)
            t = time.monotonic()
            rs[1].act("reset")
            for r in (rs[0], rs[2]):
                wait(lambda r=r: r.route()["reverted"] is None, 10, "reset applied")
            seen.append(time.monotonic() - t)
        lags = [l for r in rs for l in r.lags()]
    finally:
        for r in rs:
            r.stop()
    print(f"propagation over {len(seen)} decisions ({len(lags)} applications on the other replicas):")
    print(f"  lag decision -> applied (replica logs): p50 {pct(lags, 0.5)} ms, p99 {pct(lags, 0.99)} ms, max {max(lags)} ms")
    print(
        f"  admin call -> both others' /status (2 ms polling): p50 {pct(seen, 0.5) * 1e3:.1f} ms, "
        f"p99 {pct(seen, 0.99) * 1e3:.1f} ms"
    )


def wrk(port, duration):
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{duration}s", "-H", "x-user-id: u1",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else 0.0


def data_plane(veer, work, etcd, rounds, duration):
    ups = subprocess.Popen(
        ["taskset", "-c", "1", veer, "demo", "--upstreams-only"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait(lambda: http_ok("http://127.0.0.1:18001/"), 30, "demo upstreams")
        results = {True: [], False: []}
        for i in range(rounds * 2):
            fleet = i % 2 == 0
            r = Replica(veer, work, f"dp{i}", etcd, fleet=fleet, pin=0,
                        upstreams=("127.0.0.1:18001", "127.0.0.1:18002"))
            try:
                if fleet:
                    wait(lambda: r.status().get("fleet", {}).get("synced"), 30, "synced")
                wrk(r.port, 1)  # warm up
                results[fleet].append(wrk(r.port, duration))
            finally:
                r.stop()
    finally:
        ups.terminate()
        ups.wait(10)
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"data plane, 1 worker pinned, wrk -c50 {duration} s x {rounds} rounds (median):")
    print(f"  [fleet] off: {off:,.0f} req/s  {results[False]}")
    print(f"  [fleet] on:  {on:,.0f} req/s  {results[True]}")
    print(f"  on / off: {on / off * 100:.1f} %")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    a = ap.parse_args()
    for tool in ("etcd", "wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install etcd-server wrk util-linux)")
    veer = os.environ.get("VEER")
    if not veer:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "veer-proxy", "--bin", "veer"],
                       cwd=ROOT, check=True)
        veer = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "veer")
    with tempfile.TemporaryDirectory() as work:
        etcd, addr = start_etcd(work)
        try:
            propagation(veer, work, addr, a.cycles)
            data_plane(veer, work, addr, a.rounds, a.duration)
        finally:
            etcd.terminate()
            etcd.wait(10)


if __name__ == "__main__":
    main()
