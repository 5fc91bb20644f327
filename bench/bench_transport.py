#!/usr/bin/env python3
"""Transport benchmark: real UdpLinks on loopback, the server in a child process.

Usage: bench/bench_transport.py [--bulk-mb N] [--samples N] [--lossy-samples N] [--json PATH]

Measures
- bulk: one stream, server -> client, as fast as the send window allows: MB/s, and CPU
  seconds per MB (both processes together);
- keystroke: 1 byte up, echoed 1 byte down, one at a time: median and p99 round trip,
  next to a raw UDP ping-pong between the same two processes (the "added" latency);
- lossy keystroke: the same through tests/relay.py at 30% loss each way and 50 ms RTT.

Prints a table and writes JSON to bench/results/transport-<time>.json.  Not a test: the
numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import select
import socket
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import moshpit_transport as mt  # noqa: E402
from relay import ETHERNET_MTU, Relay, free_port, random_front_alias  # noqa: E402

KEYS = types.SimpleNamespace(client_to_server=b"c" * 32, server_to_client=b"s" * 32,
                             conn_id=b"benchmrk", cipher="chacha20-poly1305")
CHUNK = 65536


def pump(link: mt.UdpLink, on_event, done, timeout: float) -> None:
    """One select loop over ``link`` until ``done()``; events go to ``on_event``."""
    conn = link.conn
    deadline = time.monotonic() + timeout
    while not done():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError("benchmark step timed out")
        wait = link.timeout(now)
        readable, _, _ = select.select([link], [], [], 0.05 if wait is None else min(wait, 0.05))
        now = time.monotonic()
        if readable:
            link.handle_readable(now)
        event = conn.next_event()
        while event is not None:
            on_event(event)
            event = conn.next_event()
        link.flush(now)


# ---------------------------------------------------------------------------
# Server process
# ---------------------------------------------------------------------------

def serve(port: int, mode: str, size: int, result) -> None:
    """Child process: ``bulk`` sends ``size`` bytes; ``echo`` sends back what arrives;
    ``raw`` is a plain UDP echo (the baseline).  Runs until the parent kills it."""
    if mode == "raw":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", port))
        while True:
            data, addr = sock.recvfrom(2048)
            sock.sendto(data, addr)
    conn = mt.Connection("server", KEYS, time.monotonic())
    link = mt.UdpLink.bind(conn, "127.0.0.1", port)
    if mode == "echo":
        pump(link, lambda e: conn.send(e.data) if isinstance(e, mt.DataReceived) else None,
             lambda: False, timeout=1e9)
    pump(link, lambda e: None, lambda: conn.peer_addr is not None, timeout=30)
    payload = os.urandom(CHUNK)
    written = 0
    cpu = time.process_time()

    def fill() -> bool:
        nonlocal written
        while written < size and conn.writable():
            conn.send(payload)
            written += CHUNK
        return written >= size and conn.all_acked()

    pump(link, lambda e: None, fill, timeout=300)
    result.put(time.process_time() - cpu)
    pump(link, lambda e: None, lambda: False, timeout=1e9)


class Server:
    """The child process serving one measurement, stopped by its PID afterwards."""

    def __init__(self, mode: str, size: int = 0, port: int = 0) -> None:
        ctx = multiprocessing.get_context("fork")
        self.port = port or free_port("127.0.0.1", "udp")
        self.result = ctx.Queue()
        self.proc = ctx.Process(target=serve, args=(self.port, mode, size, self.result),
                                daemon=True)
        self.proc.start()
        time.sleep(0.2)  # let it bind

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(5)


def client(target: tuple) -> tuple:
    conn = mt.Connection("client", KEYS, time.monotonic(), target)
    return conn, mt.UdpLink.bind(conn, "127.0.0.1")


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

def bench_bulk(megabytes: int) -> dict:
    size = megabytes * 1024 * 1024
    size -= size % CHUNK
    server = Server("bulk", size)
    conn, link = client(("127.0.0.1", server.port))
    got = [0, 0.0]

    def on_event(event) -> None:
        if isinstance(event, mt.DataReceived):
            if not got[0]:
                got[1] = time.perf_counter()
            got[0] += len(event.data)

    try:
        cpu = time.process_time()
        pump(link, on_event, lambda: got[0] >= size, timeout=300)
        elapsed = time.perf_counter() - got[1]
        cpu = time.process_time() - cpu
        pump(link, on_event, lambda: not server.result.empty(), timeout=30)
        cpu += server.result.get()
    finally:
        server.stop()
        link.close()
    return {"megabytes": size / 2 ** 20, "seconds": elapsed,
            "mb_per_s": size / 2 ** 20 / elapsed, "cpu_s_per_mb": cpu / (size / 2 ** 20)}


def idle(link: mt.UdpLink, seconds: float) -> None:
    """Keep the link serviced (acks, timers) for ``seconds``."""
    end = time.perf_counter() + seconds
    pump(link, lambda e: None, lambda: time.perf_counter() >= end, timeout=seconds + 1)


def keystrokes(link: mt.UdpLink, samples: int, gap: float, timeout: float) -> list:
    """Round trips of single bytes through an echoing server, one at a time."""
    conn = link.conn
    echoed = []

    def on_event(event) -> None:
        if isinstance(event, mt.DataReceived):
            echoed.append(event.data)

    times = []
    for i in range(samples):
        start = time.perf_counter()
        conn.send(bytes([97 + i % 26]))
        link.flush(time.monotonic())
        pump(link, on_event, lambda want=i + 1: len(echoed) >= want, timeout=timeout)
        times.append(time.perf_counter() - start)
        if gap:
            idle(link, gap)
    return times


def percentiles(times: list) -> dict:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
            "samples": len(ordered)}


def bench_raw_udp(samples: int) -> dict:
    server = Server("raw")
    times = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _ in range(samples):
                start = time.perf_counter()
                sock.sendto(b"k", ("127.0.0.1", server.port))
                sock.recvfrom(16)
                times.append(time.perf_counter() - start)
    finally:
        server.stop()
    return percentiles(times)


def bench_keystroke(samples: int) -> dict:
    server = Server("echo")
    conn, link = client(("127.0.0.1", server.port))
    try:
        keystrokes(link, 20, 0.0, timeout=10)  # warm up: RTT estimate, first contact
        return percentiles(keystrokes(link, samples, 0.002, timeout=10))
    finally:
        server.stop()
        link.close()


def bench_lossy_keystroke(samples: int, loss: float, rtt: float) -> dict:
    front = random_front_alias()
    port = free_port(("127.0.0.1", front), "udp")
    server = Server("echo", port=port)
    relay = Relay(front=front, back="127.0.0.1", udp_ports=[port], seed=1,
                  mtu=ETHERNET_MTU)  # an impaired path stands for Ethernet, as in run.py
    relay.set(loss=loss, delay=rtt / 2)
    relay.start()
    conn, link = client((front, port))
    try:
        keystrokes(link, 20, 0.02, timeout=30)  # learn RTT and loss
        result = percentiles(keystrokes(link, samples, 0.02, timeout=30))
        result.update(loss=loss, rtt_ms=rtt * 1e3,
                      median_over_rtt=result["median_ms"] / (rtt * 1e3))
        return result
    finally:
        relay.close()
        server.stop()
        link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk-mb", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--lossy-samples", type=int, default=200)
    parser.add_argument("--json", help="where to write the results (default bench/results/)")
    args = parser.parse_args()

    bulk = bench_bulk(args.bulk_mb)
    raw = bench_raw_udp(args.samples)
    keystroke = bench_keystroke(args.samples)
    keystroke["added_median_ms"] = keystroke["median_ms"] - raw["median_ms"]
    lossy = bench_lossy_keystroke(args.lossy_samples, loss=0.3, rtt=0.05)

    rows = [
        ("bulk throughput, one stream", f"{bulk['mb_per_s']:.1f} MB/s", ">= 40 MB/s"),
        ("CPU per MB (both ends)", f"{bulk['cpu_s_per_mb'] * 1e3:.1f} ms", ""),
        ("raw UDP ping-pong median", f"{raw['median_ms']:.3f} ms", "(baseline)"),
        ("keystroke round trip median", f"{keystroke['median_ms']:.3f} ms",
         "<= baseline + 1 ms"),
        ("keystroke round trip p99", f"{keystroke['p99_ms']:.3f} ms", ""),
        ("30% loss, 50 ms RTT: median", f"{lossy['median_ms']:.1f} ms", "<= 100 ms"),
        ("30% loss, 50 ms RTT: p99", f"{lossy['p99_ms']:.1f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>12}  {target}")

    path = args.json or os.path.join(
        HERE, "results", time.strftime("transport-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as out:
        json.dump({"bulk": bulk, "raw_udp": raw, "keystroke": keystroke, "lossy": lossy,
                   "python": platform.python_version(), "cpus": os.cpu_count()}, out, indent=2)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
