"""Long server scenarios: an outage through the impairment relay with a resume, and many
concurrent sessions (with the idle cost per session printed for the record: run with -s)."""

from __future__ import annotations

import re
import time

import pytest
from proc_util import proc_usage, wait_for
from relay import Relay, random_front_alias
from server_util import MpsServer, TestClient

pytestmark = pytest.mark.slow

COUNT = 80  # counter lines, one every 0.1 s: ~8 s, the 4 s outage in the middle


def counter_lines(output: bytes) -> list:
    return [int(n) for n in re.findall(rb"count(\d+)\r\n", output)]


@pytest.mark.timeout(180)
def test_blackout_then_output_complete_once_in_order(tmp_path):
    """A 4 s blackout while a real shell prints a counter; the client does what mp does
    after a silence (new UDP port + resume handshake, over TCP that still works). The same
    session without a resume, and the exact offsets under loss, are shown on the cores
    (test_session.py), in milliseconds."""
    with MpsServer(tmp_path) as server, \
            Relay(front=random_front_alias(), back="127.0.0.1", tcp_ports=[server.port],
                  udp_ports=[server.udp_port]) as relay, \
            TestClient(relay.front, server.port, server.client_key,
                       server.host_key.public).connect() as client:
        client.run("true")
        client.send(f"for i in $(seq 1 {COUNT}); do echo count$i; sleep 0.1; done; "
                    "echo DO''NE\n")
        client.read_until("count30\r\n")
        relay.blackout(4)
        client.pump_for(2)
        client.resume()
        server.wait_log("resumed")
        client.pump_for(2.5)  # the rest of the outage
        client.read_until("DONE", timeout=90)
        assert counter_lines(client.output) == list(range(1, COUNT + 1))
        assert relay.stats["down"]["blackout_dropped"] > 0
        client.send("exit 5\n")
        assert client.wait_closed() == 5


def _pump_all(clients, until, timeout: float, what: str) -> None:
    def step():
        for client in clients:
            client.pump(0)
        return until()
    wait_for(step, timeout, what, interval=0.01)


@pytest.mark.timeout(300)
def test_fifty_concurrent_sessions_and_idle_cost(tmp_path):
    n = 50
    settings = {"verbose": 0, "mps.max_sessions_per_user": n}
    with MpsServer(tmp_path, udp_ports=n + 5, settings=settings) as server:
        pid = server.serving_pid
        first = TestClient.for_server(server).connect()
        first.run("true")
        time.sleep(1)
        rss_one = proc_usage(pid)[1]
        clients = [first] + [TestClient.for_server(server).connect() for _ in range(n - 1)]
        for i, client in enumerate(clients):
            client.send(f"echo ready$((1+{i}))\n")
        _pump_all(clients, lambda: all(f"ready{i + 1}".encode() in c.output
                                       for i, c in enumerate(clients)), 120, "every shell")
        # Idle: every shell at its prompt, every client alive (pinging); measure the server.
        cpu0, _ = proc_usage(pid)
        start = time.monotonic()
        while time.monotonic() - start < 10:
            for client in clients:
                client.pump(0)
            time.sleep(0.05)
        cpu1, rss_all = proc_usage(pid)
        idle_cpu = (cpu1 - cpu0) / (time.monotonic() - start) / n * 100
        per_session = (rss_all - rss_one) / (n - 1)
        print(f"\nmps idle with {n} sessions: {idle_cpu:.3f}% CPU per session, RSS "
              f"{rss_all / 2**20:.1f} MiB in all, {per_session / 2**10:.0f} KiB per session "
              f"beyond the first ({rss_one / 2**20:.1f} MiB with one)")
        # Each runs a short command and exits with its own status.
        for i, client in enumerate(clients):
            client.send(f"echo done$((1+{i})); exit {i + 1}\n")
        _pump_all(clients, lambda: all(c.exit_status is not None for c in clients), 120,
                  "every session to close")
        assert [c.exit_status for c in clients] == list(range(1, n + 1))
        for i, client in enumerate(clients):
            assert f"done{i + 1}".encode() in client.output
            client.close()
