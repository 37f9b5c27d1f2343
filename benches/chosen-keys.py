#!/usr/bin/env python3
"""Can one client revert a healthy canary by choosing its sticky keys?

A known gap of the judge (see README, "Security"), measured with the real
binary: two identical upstreams (both answer 500 to `/poison`, 200 to
anything else, and say which version they are, as many apps do), veer in
front with `config.example.toml`'s judge settings and a canary at 10 %,
keyed background traffic from many users, and one attacker. The attacker
probes fresh sticky keys with harmless requests, keeps the keys the canary
answered, and sends `/poison` with each of them only. Its failures are
then all on the canary, and the judge's distinct-key tests cannot tell
them from a canary that fails: under no regression they assume a failing
key is on the canary with probability equal to its share, which a client
that picks its keys breaks. (veer's split hash, XXH3 with seed 0, is
documented, so a client that knows the route's weight need not even probe.)

With `--sticky client-ip` the key is the client's address, which the
attacker cannot choose: it has `--addresses N` source addresses
(127.0.0.10, .11, ...) and can poison only from those the canary got.

usage: benches/chosen-keys.py [--veer BIN] [--sticky header|client-ip]
                              [--addresses N] [--budget N] [--weight PERCENT]
                              [--shared-errors PERCENT] [--user-addresses N] [--end-rounds N]
(`--end-rounds N`: see end_rounds below; its repeats are bounded by time,
its votes by ten times `--budget`;
`--budget`: poison requests in all, shared evenly by the addresses;
`--shared-errors`: that share of the users' own requests fail on both
versions, as a stable's errors do, so that rounds of address votes end and
the attacker's addresses vote again: see README, "one vote".)
Prints one line: whether the canary was reverted, after how many poison
and probe requests and seconds, and the judge's reason. Only 127.0.0.0/8
is targeted; every loop is bounded in count and time.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from benchutil import ROOT, free_port, veer_binary


def upstream(version):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = version.encode()
            self.send_response(500 if self.path.startswith("/poison") else 200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def config(port, admin, state, ups, sticky, weight):
    with open(os.path.join(ROOT, "config.example.toml"), "rb") as f:
        judge = tomllib.load(f)["route"][0]["judge"]

    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = "\n".join(f"{k} = {value(v)}" for k, v in judge.items())
    key = '"header:x-user-id"' if sticky == "header" else '"client-ip"'
    return f"""
[proxy]
listen = ["127.0.0.1:{port}"]
workers = 2
[admin]
listen = "127.0.0.1:{admin}"
[state]
dir = "{state}"
[[route]]
name = "web"
sticky = [{key}]
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:{ups[0]}"]
[route.canary]
version = "v2"
endpoints = ["127.0.0.1:{ups[1]}"]
weight = {weight}
[route.judge]
{lines}
"""


def status(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=10) as r:
        return json.load(r)["routes"][0]


def get(conn, path, key):
    headers = {"x-user-id": key} if key else {}
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def background(port, stop, shared_errors, addresses):
    """Users: 200 requests a second, each from a user among 100 000, who
    comes from one of `addresses` addresses (at most 1000: 127.0.1.1 -
    127.0.4.250); a share `shared_errors` of them fail on both versions."""
    conns = {}
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        user = random.randrange(100_000)
        slot = user % addresses
        addr = f"127.0.{1 + slot % 4}.{1 + slot // 4 % 250}"
        if addr not in conns:
            conns[addr] = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                                     source_address=(addr, 0))
        try:
            path = "/poison-user" if random.random() < shared_errors else "/"
            get(conns[addr], path, f"user-{user}")
        except (OSError, http.client.HTTPException):
            conns.pop(addr).close()
        time.sleep(0.005)
    for c in conns.values():
        c.close()


def canary_key(c):
    """A fresh header key the canary answers (None after 2000 probes)."""
    for _ in range(2000):
        key = f"k-{random.random()}"
        if get(c, "/", key)[1] == b"v2":
            return key
    return None


def round_number(admin):
    r = status(admin)["evidence"]["tests"][0].get("key_round") or {}
    return r.get("number", 0)


def end_rounds(a, port, admin, poisons):
    """The attacker that ends key rounds (see README, key rounds): it
    repeats its failures on four of its keys until the error round ends
    (32 repeats over the round's votes, from 4 keys, 10 s in), then each of
    its addresses votes once with a fresh canary key; up to `a.end_rounds`
    rounds (30 s each at most), its votes within ten times the poison
    budget.
    Returns (the route if reverted, poison requests sent)."""
    def conn(i):
        return http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                          source_address=(f"127.0.0.{10 + i}", 0))
    c0 = conn(0)
    mine = [k for k in (canary_key(c0) for _ in range(4)) if k]
    sent = votes = 0
    try:
        for _ in range(a.end_rounds):
            before = round_number(admin)
            deadline = time.monotonic() + 30
            while round_number(admin) == before and time.monotonic() < deadline:
                for key in mine:
                    get(c0, "/poison", key)
                    sent += 1
                time.sleep(0.1)
            print(f"key round {round_number(admin)} began", file=sys.stderr)
            for i in range(a.addresses):
                # A fresh connection each round: an idle one is closed.
                c = conn(i)
                key = canary_key(c)
                if key and poisons + votes < a.budget * 10:
                    get(c, "/poison", key)
                    sent += 1
                    votes += 1
                c.close()
            time.sleep(1.5)
            s = status(admin)
            if s.get("reverted"):
                return s, sent
        return None, sent
    finally:
        c0.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--veer")
    ap.add_argument("--sticky", choices=["header", "client-ip"], default="header")
    ap.add_argument("--addresses", type=int, default=1)
    ap.add_argument("--budget", type=int, default=200, help="poison requests at most")
    ap.add_argument("--weight", type=float, default=10.0, help="the canary's weight, percent")
    ap.add_argument("--shared-errors", type=float, default=0.0,
                    help="percent of the users' requests that fail on both versions")
    ap.add_argument("--user-addresses", type=int, default=1000,
                    help="the users' addresses (64 to 1000)")
    ap.add_argument("--end-rounds", type=int, default=0,
                    help="header keys only: after its first votes the attacker ends up to N "
                         "key rounds (repeating its own failures) and votes again in each")
    a = ap.parse_args()
    binary = veer_binary(a.veer)
    ups = [upstream("v1"), upstream("v2")]
    work = tempfile.mkdtemp()
    port, admin = free_port(), free_port()
    path = os.path.join(work, "veer.toml")
    with open(path, "w") as f:
        f.write(config(port, admin, os.path.join(work, "state"), [u.server_address[1] for u in ups],
                       a.sticky, a.weight))
    proc = subprocess.Popen([binary, "run", "--config", path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stop = threading.Event()
    try:
        for _ in range(200):
            try:
                status(admin)
                break
            except OSError:
                time.sleep(0.05)
        bg = threading.Thread(target=background, args=(port, stop, a.shared_errors / 100,
                                                       max(64, min(1000, a.user_addresses))),
                              daemon=True)
        bg.start()
        # Both versions past min_requests before the attack starts.
        deadline = time.monotonic() + 60
        while status(admin)["verdict"] == "insufficient_data" and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"before the attack: verdict {status(admin)['verdict']}", file=sys.stderr)
        start = time.monotonic()
        probes = poisons = 0
        reverted = None
        for i in range(a.addresses):
            source = (f"127.0.0.{10 + i}", 0)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                           source_address=source)
            # With client-ip stickiness one probe tells this address's version;
            # with a header, up to 1000 / weight fresh keys per poison request.
            # An address's share of the budget (with a header key, every
            # address can find canary keys of its own).
            for _ in range(max(1, a.budget // a.addresses)):
                if poisons >= a.budget or reverted:
                    break
                key = None if a.sticky == "client-ip" else f"k-{random.random()}"
                for _ in range(1 if a.sticky == "client-ip" else max(100, int(1000 / a.weight))):
                    probes += 1
                    _, body = get(c, "/", key)
                    if body == b"v2":
                        break
                    key = None if a.sticky == "client-ip" else f"k-{random.random()}"
                if body != b"v2":
                    break
                get(c, "/poison", key)
                poisons += 1
                s = status(admin)
                if s.get("reverted"):
                    reverted = s
                if a.sticky == "client-ip":
                    break
            c.close()
            if reverted or poisons >= a.budget:
                break
        if a.end_rounds and a.sticky == "header" and not reverted:
            reverted, n = end_rounds(a, port, admin, poisons)
            poisons += n
        # The judge looks every 100 ms and ticks every second.
        deadline = time.monotonic() + 5
        while not reverted and time.monotonic() < deadline:
            s = status(admin)
            reverted = s if s.get("reverted") else None
            time.sleep(0.2)
        took = time.monotonic() - start
        if reverted:
            print(f"sticky {a.sticky}, {a.addresses} attacker address(es): REVERTED after "
                  f"{poisons} poison and {probes} probe requests, {took:.1f} s: "
                  f"{reverted['reverted']['guard']}: {reverted['reverted']['reason']}")
        else:
            ev = s["evidence"]["error_events"]
            print(f"sticky {a.sticky}, {a.addresses} attacker address(es): not reverted after "
                  f"{poisons} poison and {probes} probe requests, {took:.1f} s "
                  f"(verdict {s['verdict']}; error events counted: canary {ev['canary']}, "
                  f"stable {ev['stable']}; E {s['evidence']['e_errors']:.3g})")
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for u in ups:
            u.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
