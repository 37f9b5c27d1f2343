"""Turns every Prometheus query of the Grafana dashboard (and of the alert
rules) into a recording rule, printed as YAML for `promtool check rules` to
parse, after checking that each veer_* metric it names is one the contract
defines (../shared/spec/contract.md section 6, or the list below when the
contract is not beside the repository) or the README adds to it (its "veer
adds to it" list's metrics item).

usage: check_dashboard.py DASHBOARD.json [RULES.yaml ...] > rules.yaml"""
import json
import os
import re
import sys

import yaml

CONTRACT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "spec", "contract.md")
# Section 6 of the contract, for checkouts without ../shared.
FALLBACK = {
    "veer_requests_total", "veer_upstream_errors_total", "veer_request_duration_seconds",
    "veer_window_latency_seconds", "veer_window_requests", "veer_window_error_ratio",
    "veer_canary_weight_percent", "veer_verdict", "veer_reverts_total",
    "veer_config_reloads_total", "veer_config_generation", "veer_build_info",
}
GRAFANA_VARS = {
    "$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
    "${route:regex}": ".*", "$route": ".*", "${instance:regex}": ".*", "$instance": ".*",
}


README = os.path.join(os.path.dirname(__file__), "..", "README.md")
# A name alone (`veer_x`) or with its labels (`veer_x{route,result}`).
NAME = r"`(veer_[a-z0-9_]+)(?:\{[^`]*\})?`"


def readme_names():
    """The metrics the README adds to the contract: the "- metrics:" item
    of its "veer adds to it" list."""
    if not os.path.exists(README):
        return set()
    text = open(README).read()
    adds = text.split("veer adds to it:", 1)[-1].split("\n## ", 1)[0]
    item = adds.split("\n- metrics:", 1)
    if len(item) < 2:
        return set()
    return set(re.findall(NAME, item[1].split("\n- ", 1)[0]))


def contract_names():
    if not os.path.exists(CONTRACT):
        return FALLBACK | readme_names()
    text = open(CONTRACT).read()
    section = text.split("## 6.", 1)[-1]
    return (set(re.findall(NAME, section)) or FALLBACK) | readme_names()


def queries(dashboard):
    for panel in dashboard.get("panels", []):
        for inner in [panel] + panel.get("panels", []):
            for t in inner.get("targets", []):
                if t.get("expr"):
                    yield f"panel {inner.get('title')!r}", t["expr"]
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("expr"):
            yield f"annotation {a.get('name')!r}", a["expr"]
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if isinstance(q, str) and q.startswith("label_values("):
            inner = q[len("label_values("):-1].split(",")[0].strip()
            yield f"variable {v.get('name')!r}", inner


def main():
    allowed = contract_names()
    dashboard = json.load(open(sys.argv[1]))
    found = list(queries(dashboard))
    for rules in sys.argv[2:]:
        for group in yaml.safe_load(open(rules))["groups"]:
            for rule in group["rules"]:
                found.append((f"rule {rule.get('alert') or rule.get('record')!r}", rule["expr"]))
    if not found:
        sys.exit("no queries found")
    bad = []
    out = []
    for i, (where, expr) in enumerate(found):
        for k, v in GRAFANA_VARS.items():
            expr = expr.replace(k, v)
        for name in re.findall(r"\bveer_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in allowed and base not in allowed:
                bad.append(f"{where}: {name} is not a metric the contract defines or the README adds")
        out.append({"record": f"veer_dashboard_query_{i}", "expr": expr})
    if bad:
        sys.exit("\n".join(bad))
    print(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": out}]}, sort_keys=False))
    print(f"{len(found)} queries, all on contract metrics", file=sys.stderr)


main()
