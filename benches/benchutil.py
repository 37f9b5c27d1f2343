"""Helpers shared by the Python benchmarks in this directory (each run as
`python3 benches/NAME.py`, so this module is on their path)."""

import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def veer_binary(given=None):
    """`given`, or the release binary, built first."""
    if given:
        return given
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "veer-proxy",
                    "--bin", "veer"], cwd=ROOT, check=True)
    return os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                        "release", "veer")
