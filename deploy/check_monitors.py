"""Checks the Prometheus Operator resources (PodMonitor, ServiceMonitor),
which have no schema in kubernetes-validate: the fields veer relies on are
present and well-typed, and no unknown top-level spec keys slip in."""
import sys
import yaml

ALLOWED = {
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"},
    "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"},
}
ENDPOINTS = {"PodMonitor": "podMetricsEndpoints", "ServiceMonitor": "endpoints"}

for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        kind = doc.get("kind")
        where = f"{path}: {kind} {doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") != "monitoring.coreos.com/v1" or kind not in ALLOWED:
            sys.exit(f"{where}: not a monitoring.coreos.com/v1 PodMonitor or ServiceMonitor")
        spec = doc.get("spec") or {}
        unknown = set(spec) - ALLOWED[kind]
        if unknown:
            sys.exit(f"{where}: unknown spec keys {sorted(unknown)}")
        labels = (spec.get("selector") or {}).get("matchLabels")
        if not isinstance(labels, dict) or not labels:
            sys.exit(f"{where}: spec.selector.matchLabels must select the veer pods")
        eps = spec.get(ENDPOINTS[kind])
        if not isinstance(eps, list) or not eps:
            sys.exit(f"{where}: spec.{ENDPOINTS[kind]} must list endpoints")
        for ep in eps:
            if ep.get("port") != "admin" or ep.get("path") != "/metrics":
                sys.exit(f"{where}: endpoints must scrape port 'admin' at /metrics")
print(f"monitors: {len(sys.argv) - 1} file(s) checked")
