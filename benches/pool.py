#!/usr/bin/env python3
"""What pooling the evidence of a fleet costs: the release binary, replicas
of one fleet on a real etcd (Debian's etcd-server) on loopback, the judge
of config.example.toml on every route.

1. Writes: three replicas pooling, an identical canary at 20 %, 1000 req/s
   spread evenly over them from 10 000 sticky users (keys drawn at random),
   S seconds. The fleet's writes are the store's revision (every put is
   one; nothing else is written in steady state), per replica and second;
   beside them the batches the pooled tests applied and the largest batch
   value in the store. Then the same with 100 000 users and with a fresh
   key per request (every slow request a new user's: the most events).
2. Data plane: wrk -c50 with a fresh key per request against one replica
   (one worker pinned to CPU 0; wrk and the demo upstreams on CPU 1),
   pooling on (the default) and `pool = false`, alternating, R rounds of
   D seconds.

usage: [VEER=binary] benches/pool.py [--seconds 30] [--rounds 3] [--duration 5] [--only writes|data-plane]
Only 127.0.0.1 is targeted; every loop is bounded in count and time.
"""

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleet  # noqa: E402  (the fleet bench's replicas, etcd and wrk)

ROOT = fleet.ROOT
DEMO = ("127.0.0.1:18001", "127.0.0.1:18002")


def reference_judge():
    """The [route.judge] section of config.example.toml."""
    out, on = [], False
    for line in open(os.path.join(ROOT, "config.example.toml")):
        if line.startswith("[route.judge]"):
            on = True
        elif on and (line.startswith("[") or line.startswith("# [")):
            break
        if on:
            out.append(line)
    return "".join(out)


def paced_load(port, rate, seconds, users, stop):
    """`rate` requests a second to one replica for `seconds`, keys of
    `users` users (None: a fresh key per request)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    start = time.monotonic()
    n = 0
    while not stop.is_set() and time.monotonic() - start < seconds:
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        key = f"u{random.randrange(users)}" if users else f"fresh-{port}-{n}"
        try:
            conn.request("GET", "/", headers={"x-user-id": key})
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        n += 1
    conn.close()


def writes(veer, work, etcd, seconds, users):
    judge = reference_judge()
    tag = f"w{users or 'fresh'}"
    rs = [fleet.Replica(veer, work, f"{tag}-r{i}", etcd, upstreams=DEMO, route_extra=judge, fleet_name=tag)
          for i in (1, 2, 3)]
    try:
        for r in rs:
            fleet.wait(lambda r=r: (r.route().get("evidence", {}).get("pool") or {}).get("seat") is not None,
                       30, f"{r.name} seated")
        # The judge's warm-up and stable's first window, then measure.
        stop = threading.Event()
        threads = [threading.Thread(target=paced_load, args=(r.port, 1000 / 3, seconds + 40, users, stop))
                   for r in rs]
        for t in threads:
            t.start()
        time.sleep(35)
        rev0 = rs[0].status()["fleet"]["revision"]
        b0 = rs[0].route()["evidence"]["pool"]["batches"][0]
        time.sleep(seconds)
        rev1 = rs[0].status()["fleet"]["revision"]
        pool = rs[0].route()["evidence"]["pool"]
        b1 = pool["batches"][0]
        stop.set()
        for t in threads:
            t.join(60)
        per = (rev1 - rev0) / seconds / 3
        events = [t["events"] for t in pool["tests"]]
        who = f"{users:,} sticky users" if users else "a fresh key per request"
        route = rs[0].route()
        print(f"  {who}: {per:.2f} writes/s per replica ({rev1 - rev0} in {seconds} s for 3), "
              f"{(b1 - b0) / seconds:.2f} batches/s applied; pooled events (canary, stable) so far: {events}; "
              f"verdict {route['verdict']}" + (f" ({route['reverted']['reason']})" if route.get("reverted") else ""))
    finally:
        for r in rs:
            r.stop()


def data_plane(veer, work, etcd, rounds, duration):
    judge = reference_judge()
    lua = os.path.join(work, "keys.lua")
    with open(lua, "w") as f:
        f.write('local n = 0\nrequest = function()\n  n = n + 1\n'
                '  return wrk.format("GET", "/", { ["x-user-id"] = "u" .. math.random(1, 1000000000) .. "-" .. n })\nend\n')
    results = {True: [], False: []}
    for i in range(rounds * 2):
        pool = i % 2 == 0
        r = fleet.Replica(veer, work, f"dp{i}", etcd, pin=0, upstreams=DEMO,
                          fleet_extra="" if pool else "pool = false\n", route_extra=judge)
        try:
            fleet.wait(lambda: r.status().get("fleet", {}).get("synced"), 30, "synced")
            subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c50", "-d2s", "-s", lua,
                            f"http://127.0.0.1:{r.port}/"], capture_output=True, timeout=60)
            out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{duration}s", "-s", lua,
                                  f"http://127.0.0.1:{r.port}/"], capture_output=True, text=True,
                                 timeout=duration + 60).stdout
            m = [l for l in out.splitlines() if l.startswith("Requests/sec:")]
            results[pool].append(float(m[0].split()[1]) if m else 0.0)
        finally:
            r.stop()
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"data plane, 1 worker pinned, wrk -c50 {duration} s x {rounds} rounds, a fresh key per request (median):")
    print(f"  pool = false: {off:,.0f} req/s  {results[False]}")
    print(f"  pooling:      {on:,.0f} req/s  {results[True]}")
    print(f"  on / off: {on / off * 100:.1f} %")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--only", choices=["writes", "data-plane"])
    a = ap.parse_args()
    veer = os.environ.get("VEER")
    if not veer:
        subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "veer-proxy", "--bin", "veer"],
                       cwd=ROOT, check=True)
        veer = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "veer")
    ups = subprocess.Popen(["taskset", "-c", "1", veer, "demo", "--upstreams-only"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as work:
        etcd, addr = fleet.start_etcd(work)
        try:
            fleet.wait(lambda: fleet.http_ok(f"http://{DEMO[0]}/"), 30, "demo upstreams")
            if a.only != "data-plane":
                print(f"writes to etcd, 3 replicas pooling, 1000 req/s over them, identical canary at 20 %, {a.seconds} s:")
                for users in (10_000, 100_000, None):
                    writes(veer, work, addr, a.seconds, users)
            if a.only != "writes":
                data_plane(veer, work, addr, a.rounds, a.duration)
        finally:
            etcd.terminate()
            etcd.wait(10)
            ups.terminate()
            ups.wait(10)


if __name__ == "__main__":
    main()
