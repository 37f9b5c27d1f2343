"""Gives an nginx config from ../shared/bench/peers/ an access log: a JSON
line a request carrying the fields of veer's access log (`log_format ...
escape=json`), written to LOG, unbuffered (nginx's default) unless BUFFER
(say "buffer=32k flush=50ms", what veer's batching does) is given.

usage: python3 benches/nginx-log.py CONF LOG ROUTE [BUFFER]
"""

import sys

path, log, route = sys.argv[1], sys.argv[2], sys.argv[3]
buffer = f" {sys.argv[4]}" if len(sys.argv) > 4 else ""
text = open(path).read()
fmt = (
    "log_format veer escape=json '{\"timestamp\":\"$time_iso8601\",\"level\":\"INFO\","
    f"\"message\":\"request\",\"route\":\"{route}\",\"version\":\"$pool\",\"method\":\"$request_method\","
    "\"path\":\"$uri\",\"status\":$status,\"ms\":\"$upstream_response_time\","
    "\"client\":\"$remote_addr\",\"upstream\":\"$upstream_addr\",\"error\":\"\","
    "\"bytes\":$body_bytes_sent,\"total_ms\":$request_time,"
    "\"protocol\":\"$server_protocol\",\"host\":\"$http_host\","
    "\"user_agent\":\"$http_user_agent\"}';\n"
    f"    access_log {log} veer{buffer};"
)
assert text.count("access_log off;") == 1, "no 'access_log off;' to replace"
open(path, "w").write(text.replace("access_log off;", fmt))
