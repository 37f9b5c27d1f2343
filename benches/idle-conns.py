#!/usr/bin/env python3
"""What idle keep-alive client connections cost: memory per connection.

An ingress holds many client connections that sent a request and wait,
kept alive, for the next (browsers, mobile apps). This opens N of them to
the proxy over loopback, each after one GET answered, and prints the
proxy's resident memory before, with them open (2 s after the last one
answered, and again 13 s after: veer parks an HTTP/1.1 connection idle
for a while, within its `header_timeout`, 10 s here, of its last request,
and drops its buffers), and after they close (ten seconds later, then
after 3000 more requests on one connection: the allocator returns freed
pages to the kernel when its threads next work).

usage: benches/idle-conns.py [--veer BIN] [--nginx] [--waves W] [--tls] [--h2] N [N ...]

`--h2` speaks HTTP/2 (prior knowledge in clear, `h2` by ALPN with
`--tls`; a minimal client of raw frames, one stream a request).

`--tls` connects over TLS 1.3 (HTTP/1.1 by ALPN; a self-signed P-256
certificate made with `openssl`), to veer's `[proxy.tls]` listener and
nginx's `ssl` one.

`--waves W` opens the N connections in W waves, 12 s apart (the way an
ingress's clients come and go idle over time): what veer freed by parking
one wave is used again by the next. Both proxies keep idle connections
300 s here (veer's `idle_timeout`, nginx's `keepalive_timeout`).

`--nginx` measures nginx (Debian's, 2 workers,
its memory summed over master and workers) beside veer (2 workers). Both
proxy to one small upstream on 127.0.0.1 answering `ok`; veer's route has
a canary at 10 % and the judge on. Only 127.0.0.1 is targeted, every
wait is bounded.
"""

import argparse
import asyncio
import os
import ssl
import shutil
import subprocess
import sys
import tempfile
from benchutil import free_port, veer_binary


async def upstream(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    writer.close()


def rss_mib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


TLS = None  # (cert, key) paths with --tls
H2 = False  # --h2


def start_veer(binary, work, port, uport):
    tls = ""
    listen = f'"127.0.0.1:{port}"'
    if TLS:
        tls = f"""[proxy.tls]
listen = ["127.0.0.1:{port}"]
cert = "{TLS[0]}"
key = "{TLS[1]}"
"""
        listen = ""
    cfg = f"""[proxy]
listen = [{listen}]
workers = 2
max_connections = 60000
max_connections_per_ip = 60000
idle_timeout = "300s"
{tls}[admin]
listen = "127.0.0.1:{free_port()}"
[state]
dir = "{work}/state"
[[route]]
name = "web"
sticky = ["header:x-user-id"]
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:{uport}"]
[route.canary]
version = "v2"
endpoints = ["127.0.0.1:{uport}"]
weight = 10
"""
    path = os.path.join(work, "veer.toml")
    with open(path, "w") as f:
        f.write(cfg)
    p = subprocess.Popen([binary, "run", "--config", path],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, lambda: [p.pid]


def start_nginx(work, port, uport):
    cfg = f"""worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 60000; }}
worker_rlimit_nofile 70000;
http {{
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 100000;
  upstream up {{ server 127.0.0.1:{uport}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port}{" ssl" if TLS else ""}{" http2" if H2 else ""};
    {f"ssl_certificate {TLS[0]}; ssl_certificate_key {TLS[1]};" if TLS else ""}
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""
    path = os.path.join(work, "nginx.conf")
    with open(path, "w") as f:
        f.write(cfg)
    p = subprocess.Popen(["nginx", "-c", path, "-p", work, "-g", "daemon off;"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, lambda: [p.pid] + children(p.pid)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind, flags, stream, payload):
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream.to_bytes(4, "big") + payload)


def h2_field(name, value):
    # HPACK: a literal field without indexing, its name and value literal
    # (both shorter than 127 bytes).
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


async def h2_get(reader, writer, key):
    if not hasattr(writer, "next_stream"):
        writer.next_stream = 1
        writer.write(H2_PREFACE + h2_frame(4, 0, 0, b""))
    sid = writer.next_stream
    writer.next_stream += 2
    block = (h2_field(":method", "GET") + h2_field(":scheme", "https" if TLS else "http")
             + h2_field(":path", "/") + h2_field(":authority", "bench")
             + h2_field("x-user-id", key))
    writer.write(h2_frame(1, 0x5, sid, block))  # END_STREAM | END_HEADERS
    await writer.drain()
    while True:
        head = await asyncio.wait_for(reader.readexactly(9), 10)
        size, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        payload = await asyncio.wait_for(reader.readexactly(size), 10)
        if kind == 4 and not flags & 1:  # SETTINGS: acknowledged
            writer.write(h2_frame(4, 1, 0, b""))
        elif kind == 6 and not flags & 1:  # PING: answered
            writer.write(h2_frame(6, 1, 0, payload))
        elif kind == 7:
            raise ConnectionError("GOAWAY")
        elif stream == sid and kind in (0, 1) and flags & 1:  # END_STREAM
            return


async def get(reader, writer, key):
    if H2:
        return await h2_get(reader, writer, key)
    writer.write(f"GET / HTTP/1.1\r\nhost: bench\r\nx-user-id: {key}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"ok\n"), 10)


async def connect(port):
    if not TLS:
        return await asyncio.open_connection("127.0.0.1", port)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2" if H2 else "http/1.1"])
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")


async def measure(name, start, n, waves):
    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    uport = up.sockets[0].getsockname()[1]
    work = tempfile.mkdtemp()
    port = free_port()
    proc, pids = start(work, port, uport)
    try:
        for _ in range(200):
            try:
                r, w = await connect(port)
                await get(r, w, "ready")
                w.close()
                break
            except (OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.05)
        else:
            sys.exit(f"{name} never answered")
        await asyncio.sleep(1)
        before = rss_mib(pids())
        conns = []
        for wave in range(waves):
            if wave > 0:
                await asyncio.sleep(12)
            for i in range(wave * n // waves, (wave + 1) * n // waves):
                r, w = await connect(port)
                await get(r, w, f"u{i}")
                conns.append(w)
        await asyncio.sleep(2)
        full = rss_mib(pids())
        await asyncio.sleep(11)
        idle = rss_mib(pids())
        for w in conns:
            w.close()
        await asyncio.sleep(10)
        closed = rss_mib(pids())
        r, w = await connect(port)
        for i in range(3000):
            await get(r, w, f"v{i}")
        w.close()
        await asyncio.sleep(1)
        later = rss_mib(pids())
        per = (full - before) * 1024 / n
        per_idle = (idle - before) * 1024 / n
        print(f"| {name} | {n} | {before:.0f} MiB | {full:.0f} MiB | {per:.1f} KiB "
              f"| {idle:.0f} MiB | {per_idle:.1f} KiB "
              f"| {closed:.0f} MiB | {later:.0f} MiB |", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        up.close()
        shutil.rmtree(work, ignore_errors=True)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--veer")
    ap.add_argument("--nginx", action="store_true")
    ap.add_argument("--waves", type=int, default=1)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--h2", action="store_true")
    ap.add_argument("n", type=int, nargs="+")
    a = ap.parse_args()
    binary = veer_binary(a.veer)
    global H2
    H2 = a.h2
    if a.tls:
        global TLS
        d = tempfile.mkdtemp()
        TLS = (os.path.join(d, "tls.crt"), os.path.join(d, "tls.key"))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", TLS[1],
                        "-out", TLS[0], "-subj", "/CN=localhost", "-days", "1"],
                       check=True, capture_output=True)
    print("| proxy | idle connections | RSS before | RSS with them open | per connection "
          "| 13 s later | per connection "
          "| RSS 10 s after they closed | after 3000 more requests |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in a.n:
        await measure("veer", lambda w, p, u: start_veer(binary, w, p, u), n, a.waves)
        if a.nginx:
            await measure("nginx", start_nginx, n, a.waves)


asyncio.run(main())
