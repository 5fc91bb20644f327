#!/usr/bin/env python3
"""The sending end of the benchmark's bulk TCP transfer (a ``dd if=/dev/zero | nc -l``):
listens on HOST PORT and sends zeros to the first connection as fast as it takes them,
until the peer goes away.  Usage: bench/tcp_source.py HOST PORT (loopback only)."""

from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from relay import require_loopback  # noqa: E402

BLOCK = bytes(65536)


def main(host: str, port: int) -> int:
    with socket.create_server((require_loopback(host), port)) as listener:
        conn, _ = listener.accept()
    with conn:
        try:
            while True:
                conn.sendall(BLOCK)
        except OSError:  # the receiving end closed: the transfer is over
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
