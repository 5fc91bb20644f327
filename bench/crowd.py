"""Many sessions on one moshpit server: a few flood output, the rest type; echo and memory.

What it shows: whether sessions stay independent under load (one process per session,
README "Process model"): keystroke echo median/p95 of the typing sessions while others
flood, errors (echoes that never came, logins that failed), and the server's total memory
(RSS and PSS of the listener, the spawner and every session process).

The clients are moshpit's own client core (tests/server_util.TestClient) in this one
process, on one select loop, straight to the server (no relay): each typing session sends
one letter about every ``TYPE_INTERVAL_SECS`` and times until the shell echoes it.

Run alone to compare two copies of mps.py (e.g. before and after a change)::

    python3 bench/crowd.py [--mps PATH/mps.py] [--sessions 100] [--flooders 5] [--seconds 20]

``make bench`` runs it as the ``crowd`` scenario (bench/scenarios.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from proc_util import proc_children  # noqa: E402
from server_util import MpsServer, TestClient  # noqa: E402
from tools import pss_bytes  # noqa: E402

TYPE_INTERVAL_SECS = 1.0  # each typing session: about one keystroke a second
ECHO_TIMEOUT_SECS = 5.0  # a keystroke not echoed by then is an error
FLOOD_COMMAND = "yes moshpit-crowd-flood-line-0123456789abcdefghijklmnopqrstuvwxyz\n"
LETTERS = b"zxwvjk"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def server_processes(root_pid: int) -> list:
    """``root_pid`` and its descendants that run mps (listener, spawner, sessions)."""
    pids = [root_pid]
    for pid in proc_children(root_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"mps" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def memory(pids: list) -> tuple:
    """(total RSS, total PSS) in bytes over ``pids`` (those still there)."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += rss_bytes(pid)
            pss += pss_bytes(pid)
        except OSError:
            continue
    return rss, pss


class Typist:
    """One typing session: a letter at a time, timed until it comes back."""

    def __init__(self, client: TestClient, rng: random.Random):
        self.client = client
        self.rng = rng
        self.next_at = time.monotonic() + rng.uniform(0, TYPE_INTERVAL_SECS)
        self.sent_at = None
        self.letter = b""

    def maybe_type(self, now: float) -> None:
        if self.sent_at is None and now >= self.next_at:
            self.letter = bytes([self.rng.choice(LETTERS)])
            self.client.pos = len(self.client.output)
            self.sent_at = now
            self.client.send(self.letter)

    def check(self, now: float, echoes: list, errors: list) -> None:
        if self.sent_at is None:
            return
        if self.letter in self.client.output[self.client.pos:]:
            echoes.append(now - self.sent_at)
        elif now - self.sent_at > ECHO_TIMEOUT_SECS:
            errors.append("echo timeout")
        else:
            return
        self.sent_at = None
        self.next_at = now + self.rng.uniform(0.5, 1.5) * TYPE_INTERVAL_SECS
        if len(self.client.output) > 4096:  # the prompt line only grows: keep it short
            self.client.send(b"\x15")  # ^U: clear the line
            del self.client.output[:]
            self.client.pos = 0


def run_crowd(connect, server_pids, sessions: int = 100, flooders: int = 5,
              seconds: float = 20.0) -> dict:
    """Open ``sessions`` with ``connect()`` (a TestClient factory), flood on ``flooders``,
    type on the rest for ``seconds``; samples for bench/scenarios.py's metrics."""
    rng = random.Random(1)
    clients, errors = [], []
    started = time.monotonic()
    for _ in range(sessions):
        try:
            clients.append(connect())
        except Exception as err:  # counted, reported by the caller
            errors.append(f"connect: {err}")
    connect_secs = (time.monotonic() - started) / max(1, len(clients))
    for client in clients:
        client.run("true", timeout=30.0)  # the shell is up
    flooding, typing = clients[:flooders], clients[flooders:]
    for client in flooding:
        client.send(FLOOD_COMMAND)
    typists = [Typist(client, rng) for client in typing]
    echoes: list = []
    flooded = 0
    with selectors.DefaultSelector() as sel:
        for client in clients:
            sel.register(client.link, selectors.EVENT_READ, client)
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            for typist in typists:
                typist.maybe_type(now)
            waits = [client.link.timeout(now) for client in clients]
            waits = [w for w in waits if w is not None] + [0.05, end - now]
            for key, _ in sel.select(max(0.0, min(waits))):
                key.data.pump(0)
            now = time.monotonic()
            for client in clients:
                due = client.link.timeout(now)
                if due is not None and due <= 0:
                    client.pump(0)
            for typist in typists:
                typist.check(now, echoes, errors)
            for client in flooding:
                flooded += len(client.output)
                del client.output[:]
                client.pos = 0
        rss, pss = memory(server_pids())
    for client in flooding:
        client.send(b"\x03")
    for client in clients:
        client.close()
    return {"echo": echoes or [float("nan")], "errors": [len(errors)],
            "rss": [rss], "pss": [pss], "flood": [flooded / seconds],
            "connect": [connect_secs], "first_errors": errors[:3]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mps", default=os.path.join(os.path.dirname(HERE), "mps.py"))
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--flooders", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crowd-") as tmp:
        settings = {"mps.max_sessions": args.sessions + 10,
                    "mps.max_sessions_per_user": args.sessions + 10, "verbose": 0}
        with MpsServer(tmp, udp_ports=args.sessions + 10, settings=settings,
                       program=(os.path.abspath(args.mps),), ready_timeout=60) as server:
            samples = run_crowd(lambda: TestClient.for_server(server).connect(timeout=60),
                                lambda: server_processes(server.serving_pid),
                                args.sessions, args.flooders, args.seconds)
    echo = sorted(samples["echo"])
    print(json.dumps({
        "mps": args.mps, "sessions": args.sessions, "flooders": args.flooders,
        "echo_median_ms": round(statistics.median(echo) * 1000, 1),
        "echo_p95_ms": round(echo[max(0, round(0.95 * len(echo)) - 1)] * 1000, 1),
        "echoes": len(echo), "errors": samples["errors"][0],
        "first_errors": samples["first_errors"],
        "rss_mb": round(samples["rss"][0] / 1e6, 1), "pss_mb": round(samples["pss"][0] / 1e6, 1),
        "flood_mb_per_s": round(samples["flood"][0] / 1e6, 2),
        "connect_ms_per_session": round(samples["connect"][0] * 1000, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
