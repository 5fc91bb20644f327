"""Tests of the impairment relay (tests/relay.py) with plain UDP/TCP echo sockets.

Each impairment is shown to do what it says, with seeded randomness and generous bounds
(the machine is shared: no tight timing assertions, only lower bounds on delays).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest

import relay as relay_mod
from proc_util import (ManagedProcess, PtyEOF, PtyProcess, PtyTimeout, pid_alive,
                       proc_children, proc_usage, wait_for)
from relay import (Bottleneck, Impairment, Relay, RelayError, TcpWindow, free_port,
                   random_front_alias)

pytestmark = pytest.mark.timeout(60)


class UdpServer:
    """A UDP server on 127.0.0.1:port that records what it gets and optionally echoes it."""

    def __init__(self, port: int, echo: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.echo = echo
        self.received: list[tuple[bytes, tuple]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UdpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.received.append((data, addr))
            if self.echo:
                self.sock.sendto(data, addr)


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    return sock


def recv_all(sock: socket.socket, quiet: float = 0.5) -> list[bytes]:
    """Everything that arrives until ``quiet`` seconds pass without a datagram."""
    sock.settimeout(quiet)
    got = []
    try:
        while True:
            got.append(sock.recv(65535))
    except socket.timeout:
        return got


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def setup():
    """(front, udp port) with a fresh alias and a port free on both addresses."""
    front = random_front_alias()
    return front, free_port(("127.0.0.1", front), "udp")


def send_numbered(sock, front, port, count, gap=0.0005):
    for i in range(count):
        sock.sendto(b"%06d" % i, (front, port))
        time.sleep(gap)


def test_refuses_non_loopback_addresses():
    for bad in ("10.0.0.1", "192.168.1.1", "0.0.0.0", "8.8.8.8", "::", "localhost"):
        with pytest.raises(RelayError):
            Relay(front=bad, back="127.0.0.1")
        with pytest.raises(RelayError):
            Relay(front="127.0.0.5", back=bad)
    with pytest.raises(RelayError):
        free_port("10.1.2.3", "udp")
    with pytest.raises(RelayError):
        Relay(front="127.0.0.1", back="127.0.0.1")


def test_free_port_and_alias():
    alias = random_front_alias()
    assert alias.startswith("127.0.0.") and 2 <= int(alias.rsplit(".", 1)[1]) <= 250
    port = free_port(("127.0.0.1", alias), "both")
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((alias, port))
    with pytest.raises(RelayError):
        free_port("127.0.0.1", "sctp")
    first = free_port(("127.0.0.1", alias), "udp", count=3)
    for port in range(first, first + 3):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((alias, port))


def test_settings_are_validated():
    imp = Impairment()
    with pytest.raises(RelayError):
        imp.update(loss=1.5)
    with pytest.raises(RelayError):
        imp.update(delay=-1)
    with pytest.raises(RelayError):
        imp.update(bogus=1)
    assert imp.update(loss=0.25, delay=0.01).loss == 0.25


def test_clean_passthrough_and_stats(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port]) as relay:
        client = udp_client()
        for i in range(100):
            client.sendto(b"ping %d" % i, (front, port))
            assert client.recvfrom(100) == (b"ping %d" % i, (front, port))
        client.close()
        assert wait_until(lambda: relay.stats["down"]["delivered"] == 100)
        assert relay.stats["up"]["delivered"] == 100
        assert relay.errors == []
    # the server saw the relay's back socket, not the client
    assert server.received[0][1][0] == "127.0.0.1"


def test_tap_sees_every_datagram_before_impairment(setup):
    front, port = setup
    seen = []
    with UdpServer(port), Relay(front=front, udp_ports=[port],
                                tap=lambda d, data: seen.append((d, data))) as relay:
        relay.down.loss = 1.0
        client = udp_client()
        client.sendto(b"tapped", (front, port))
        assert wait_until(lambda: len(seen) == 2)
        client.close()
    assert seen == [("up", b"tapped"), ("down", b"tapped")]


def test_delay_each_direction(setup):
    front, port = setup
    up, down = Impairment(delay=0.1), Impairment(delay=0.05)
    with UdpServer(port), Relay(front=front, udp_ports=[port], up=up, down=down):
        client = udp_client()
        rtts = []
        for _ in range(5):
            start = time.monotonic()
            client.sendto(b"x", (front, port))
            client.recv(10)
            rtts.append(time.monotonic() - start)
        client.close()
    assert min(rtts) >= 0.15
    assert max(rtts) < 5.0


def test_jitter_spreads_and_reorders(setup):
    front, port = setup
    with UdpServer(port, echo=False) as server, \
            Relay(front=front, udp_ports=[port], seed=7) as relay:
        relay.up.update(delay=0.01, jitter=0.1)
        client = udp_client()
        send_numbered(client, front, port, 200, gap=0.002)
        assert wait_until(lambda: len(server.received) == 200)
        client.close()
    order = [int(data) for data, _ in server.received]
    assert sorted(order) == list(range(200))
    assert order != list(range(200))


def test_random_loss_is_seeded_and_reproducible(setup):
    front, port = setup

    def run() -> set[int]:
        with UdpServer(port, echo=False) as server, \
                Relay(front=front, udp_ports=[port], seed=1234) as relay:
            relay.up.loss = 0.3
            client = udp_client()
            send_numbered(client, front, port, 1000)
            wait_until(lambda: relay.stats["up"]["received"] == 1000)
            time.sleep(0.3)
            client.close()
            stats = relay.stats["up"]
        assert stats["lost"] + stats["delivered"] == stats["received"] == 1000
        return {int(data) for data, _ in server.received}

    first = run()
    assert 550 <= len(first) <= 850
    assert run() == first


def test_burst_loss_loses_runs(setup):
    front, port = setup
    with UdpServer(port, echo=False) as server, \
            Relay(front=front, udp_ports=[port], seed=99) as relay:
        relay.up.update(burst_loss=0.03, burst_length=6)
        client = udp_client()
        send_numbered(client, front, port, 2000)
        assert wait_until(lambda: relay.stats["up"]["received"] == 2000)
        time.sleep(0.3)
        client.close()
        stats = relay.stats["up"]
    got = {int(data) for data, _ in server.received}
    runs, current = [], 0
    for i in range(2000):
        if i in got:
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    assert stats["burst_lost"] == 2000 - len(got) > 0
    assert sum(runs) / len(runs) > 2.5  # independent loss at this rate averages ~1.1


def test_reorder_holds_some_back(setup):
    front, port = setup
    with UdpServer(port, echo=False) as server, \
            Relay(front=front, udp_ports=[port], seed=3) as relay:
        relay.up.update(reorder=0.2, reorder_delay=0.05)
        client = udp_client()
        send_numbered(client, front, port, 300, gap=0.002)
        assert wait_until(lambda: len(server.received) == 300)
        client.close()
        reordered = relay.stats["up"]["reordered"]
    order = [int(data) for data, _ in server.received]
    overtaken = sum(1 for a, b in zip(order, order[1:]) if b < a)
    assert reordered > 20 and overtaken > 10
    assert sorted(order) == list(range(300))


def test_duplicate(setup):
    front, port = setup
    with UdpServer(port, echo=False) as server, \
            Relay(front=front, udp_ports=[port], seed=5) as relay:
        relay.up.duplicate = 0.25
        client = udp_client()
        send_numbered(client, front, port, 400)
        assert wait_until(lambda: relay.stats["up"]["received"] == 400)
        time.sleep(0.3)
        client.close()
        dups = relay.stats["up"]["duplicated"]
    assert 50 <= dups <= 150
    assert len(server.received) == 400 + dups


def test_down_direction_impaired_independently(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port], seed=11) as relay:
        relay.down.loss = 1.0
        client = udp_client()
        send_numbered(client, front, port, 50)
        assert wait_until(lambda: len(server.received) == 50)
        assert recv_all(client, quiet=0.3) == []
        relay.down.loss = 0.0
        client.sendto(b"back", (front, port))
        assert client.recv(10) == b"back"
        client.close()


def test_blackout_for_seconds_and_open_ended(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port]) as relay:
        client = udp_client()
        relay.blackout(0.6)
        assert relay.blacked_out
        client.sendto(b"lost", (front, port))
        assert recv_all(client, quiet=0.2) == []
        assert wait_until(lambda: not relay.blacked_out, 5)
        client.sendto(b"after", (front, port))
        assert client.recv(10) == b"after"
        relay.set_blackout(True)
        client.sendto(b"lost2", (front, port))
        assert recv_all(client, quiet=0.3) == []
        relay.set_blackout(False)
        client.sendto(b"again", (front, port))
        assert client.recv(10) == b"again"
        client.close()
        assert relay.stats["up"]["blackout_dropped"] == 2
    assert [d for d, _ in server.received] == [b"after", b"again"]


def test_rebind_moves_the_client_as_seen_by_the_server(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port]) as relay:
        client = udp_client()
        client.sendto(b"one", (front, port))
        assert client.recv(10) == b"one"
        first = server.received[-1][1]
        new_addrs = relay.rebind()
        client.sendto(b"two", (front, port))
        assert client.recv(10) == b"two"
        second = server.received[-1][1]
        assert first != second and new_addrs == [second]
        assert relay.client_addresses() == [client.getsockname()]
        # the old mapping is gone: the server's packets to it are lost
        server.sock.sendto(b"stale", first)
        assert recv_all(client, quiet=0.3) == []
        client.close()


def test_each_client_address_gets_its_own_mapping(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port]):
        a, b = udp_client(), udp_client()
        a.sendto(b"a", (front, port))
        b.sendto(b"b", (front, port))
        assert a.recv(10) == b"a" and b.recv(10) == b"b"
        assert len({addr for _, addr in server.received}) == 2
        a.close()
        b.close()


def test_queue_is_bounded(setup, monkeypatch):
    front, port = setup
    monkeypatch.setattr(relay_mod, "MAX_QUEUED_DATAGRAMS", 50)
    with UdpServer(port, echo=False), Relay(front=front, udp_ports=[port]) as relay:
        relay.up.delay = 30.0
        client = udp_client()
        send_numbered(client, front, port, 200)
        assert wait_until(lambda: relay.stats["up"]["received"] == 200)
        stats = relay.stats
        client.close()
    assert stats["queued"] == 50
    assert stats["up"]["overflow_dropped"] == 150


# ---------------------------------------------------------------------------------------
# Bottleneck: the sans-IO slow link, on a fake clock (rate 8 Mbit/s = one byte a microsecond
# keeps the arithmetic readable).
# ---------------------------------------------------------------------------------------

MBIT8 = 8e6  # bits/s: 1000 bytes take exactly 1 ms


def departures(bottleneck: Bottleneck, now: float) -> list[tuple[float, object]]:
    return [(pytest.approx(t, abs=1e-9), item) for t, item in bottleneck.release(now)]


def test_bottleneck_paces_packets_at_its_rate():
    link = Bottleneck(MBIT8, queue_bytes=100_000, burst_bytes=1000, now=0.0)
    for i in range(50):
        assert link.offer(0.0, 1000, i)
    assert link.next_departure() == pytest.approx(0.001)  # the first left at once
    assert departures(link, 1.0) == [(i * 0.001, i) for i in range(50)]
    assert link.queued_bytes == 0 and link.next_departure() is None
    assert link.counters["departed"] == 50 and link.counters["bytes_departed"] == 50_000


def test_bottleneck_lets_a_burst_through_after_idling():
    link = Bottleneck(MBIT8, queue_bytes=100_000, burst_bytes=3000, now=0.0)
    for i in range(5):
        link.offer(5.0, 1000, i)  # the bucket filled up (to 3000 bytes) while idle
    assert departures(link, 6.0) == [(5.0, 0), (5.0, 1), (5.0, 2), (5.001, 3), (5.002, 4)]


def test_bottleneck_drops_arrivals_beyond_its_queue():
    link = Bottleneck(MBIT8, queue_bytes=5000, burst_bytes=1000, now=0.0)
    accepted = [link.offer(0.0, 1000, i) for i in range(10)]
    # one leaves at once on the bucket's tokens, five wait, the rest find the queue full
    assert accepted == [True] * 6 + [False] * 4
    assert link.counters["dropped"] == 4 and link.counters["bytes_dropped"] == 4000
    assert link.room(0.0) == 0
    assert link.room(0.002) == 2000  # two more have left by then
    assert link.offer(0.002, 2000, "fits") and not link.offer(0.002, 1, "full")
    assert [item for _, item in link.release(1.0)] == [0, 1, 2, 3, 4, 5, "fits"]


def test_bottleneck_is_fifo_across_flows_and_counts_each():
    link = Bottleneck(MBIT8, queue_bytes=100_000, burst_bytes=1000, now=0.0)
    offered = []
    for i in range(30):
        flow, size = ("bulk", 1400) if i % 3 else ("echo", 100)
        assert link.offer(i * 0.0001, size, (flow, i), flow=flow)
        offered.append((flow, i))
    released = link.release(1.0)
    assert [item for _, item in released] == offered
    times = [t for t, _ in released]
    assert times == sorted(times)
    assert link.flow_bytes == {"bulk": 20 * 1400, "echo": 10 * 100}


def test_bottleneck_queue_delays_every_flow_behind_it():
    """What Ctrl-C meets on a slow link: a small packet queued behind a flood waits for
    the whole queue to drain, whatever flow it belongs to."""
    link = Bottleneck(MBIT8, queue_bytes=200_000, burst_bytes=1500, now=0.0)
    while link.offer(0.0, 1500, "flood", flow="flood"):
        pass
    assert link.queued_bytes > 198_000
    link.offer(0.1, 100, "prompt", flow="prompt")  # arrives after some of the flood left
    released = link.release(1.0)
    assert released[-1][1] == "prompt"
    assert released[-1][0] == pytest.approx((201_000 - 1500) / 1e6, abs=0.002)


def test_bottleneck_timing_does_not_depend_on_polling():
    def run(poll_every: float) -> list:
        link = Bottleneck(2e6, queue_bytes=30_000, burst_bytes=2000, now=0.0)
        out, now, i = [], 0.0, 0
        while now < 1.0:
            if round(now * 1e4) % 7 == 0:  # arrivals on a fixed schedule, with idle gaps
                link.offer(now, 300 + (i * 37) % 1200, i, flow=str(i % 2))
                i += 1
            if round(now * 1e4) % round(poll_every * 1e4) == 0:
                out += link.release(now)
            now = round(now + 0.0001, 4)
        return out + link.release(2.0)

    assert run(0.0001) == run(0.05)


def test_bottleneck_big_packets_keep_the_average_rate():
    link = Bottleneck(MBIT8, queue_bytes=1_000_000, burst_bytes=3000, now=0.0)
    for i in range(10):
        link.offer(0.0, 65536, i)
    times = [t for t, _ in link.release(10.0)]
    assert times[0] == 0.0  # a full bucket sends it, into debt
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([0.065536] * 9)


def test_bottleneck_configure_and_validation():
    link = Bottleneck(MBIT8, queue_bytes=10_000, burst_bytes=1000, now=0.0)
    for i in range(6):
        link.offer(0.0, 1000, i)
    link.configure(0.002, MBIT8 / 2, queue_bytes=2000, burst_bytes=1000)
    # queued packets stay beyond the smaller limit; from 0.002 on they leave at half rate
    assert link.queued_bytes == 3000 and not link.offer(0.002, 1, "late")
    assert [t for t, _ in link.release(1.0)] == pytest.approx(
        [0.0, 0.001, 0.002, 0.004, 0.006, 0.008])
    for bad in ({"rate_bps": 0}, {"queue_bytes": 0}, {"burst_bytes": 0},
                {"queue_bytes": 10**12}):
        settings = dict({"rate_bps": MBIT8, "queue_bytes": 1000, "burst_bytes": 1000}, **bad)
        with pytest.raises(RelayError):
            Bottleneck(**settings)
        with pytest.raises(RelayError):
            link.configure(2.0, **settings)
    assert link.flush(3.0) == [] and link.snapshot()["rate_bps"] == MBIT8 / 2


def test_bottleneck_flush_releases_everything_now():
    link = Bottleneck(MBIT8, queue_bytes=10_000, burst_bytes=1000, now=0.0)
    for i in range(4):
        link.offer(0.0, 1000, i)
    assert link.flush(0.0015) == [(0.0, 0), (0.001, 1), (0.0015, 2), (0.0015, 3)]
    assert link.queued_bytes == 0


def test_tcp_window_slow_start_halving_and_growth():
    seg = relay_mod.TCP_SEGMENT_BYTES
    window = TcpWindow()
    assert window.allowance() == 10 * seg
    window.sent(10 * seg)
    assert window.allowance() == 0
    window.acked(10 * seg)  # slow start: the window doubles in a round trip
    assert window.allowance() == 20 * seg
    window.sent(20 * seg)
    window.lost(1.0, rtt=0.1)  # the queue was full: half of what is unacknowledged
    assert window.cwnd == window.ssthresh == 10 * seg and window.losses == 1
    window.lost(1.05, rtt=0.1)  # the same round trip: the same loss episode
    assert window.losses == 1 and not window.may_probe(1.05) and window.may_probe(1.1)
    window.acked(20 * seg)  # congestion avoidance: about one segment a round trip
    assert window.cwnd == pytest.approx(12 * seg, rel=0.05)
    window.lost(2.0, rtt=0.1)
    assert window.cwnd == 2 * seg  # never below two segments


def test_relay_bottleneck_limits_udp_rate_and_drops_at_the_queue(setup):
    front, port = setup
    size = 1000 - relay_mod.UDP_HEADER_BYTES  # 1000 bytes on the wire
    with UdpServer(port, echo=False) as server, Relay(front=front, udp_ports=[port]) as relay:
        relay.set_bottleneck(1e6, queue_bytes=20_000, directions=("up",))  # 8 ms a packet
        client = udp_client()
        for i in range(200):  # ~0.2 ms apart: 5 Mbit/s into a 1 Mbit/s link
            client.sendto(b"%06d" % i + b"." * (size - 6), (front, port))
            time.sleep(0.0002)
        # (the kernel may drop a few before the relay reads them, on a busy machine)
        assert wait_until(lambda: relay.stats["up"]["received"] >= 150
                          and relay.stats["up"]["delivered"] + relay.stats["up"]["queue_dropped"]
                          == relay.stats["up"]["received"])
        client.close()
        stats = relay.stats["up"]
        assert relay.errors == []
    got = [int(data[:6]) for data, _ in server.received]
    assert 20 <= len(got) <= 80 and got == sorted(got)  # the queue, the burst, what left
    assert stats["bottleneck"]["dropped"] == stats["queue_dropped"] == stats["received"] - len(got)
    assert stats["bottleneck"]["flows"] == {f"udp:{port}": 1000 * len(got)}
    assert stats["bottleneck"]["queued_bytes"] == 0
    assert relay.stats["down"].get("bottleneck") is None


def test_relay_bottleneck_paces_udp(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port]) as relay:
        relay.set_bottleneck(1e6, queue_bytes=100_000, directions=("down",))
        client = udp_client()
        start = time.monotonic()
        send_numbered(client, front, port, 60, gap=0.0)  # 34 wire bytes: 272 us apart
        got = [client.recv(100) for _ in range(60)]
        elapsed = time.monotonic() - start
        client.close()
    assert got == [b"%06d" % i for i in range(60)] and len(server.received) == 60
    assert elapsed >= (60 * 34 - relay_mod.DEFAULT_BURST_BYTES) * 8 / 1e6


def test_relay_bottleneck_is_shared_by_tcp_and_udp():
    """A TCP transfer fills the shared down link; datagrams of another flow queue behind
    it; no TCP byte is lost (the relay stops reading instead)."""
    front = random_front_alias()
    tcp_port = free_port(("127.0.0.1", front), "tcp")
    udp_port = free_port(("127.0.0.1", front), "udp")
    payload = os.urandom(400_000)
    lsock, thread = tcp_echo_server(tcp_port)
    with lsock, UdpServer(udp_port) as udp_server, \
            Relay(front=front, tcp_ports=[tcp_port], udp_ports=[udp_port],
                  impair_tcp=True) as relay:
        relay.set_bottleneck(4e6, queue_bytes=60_000, directions=("down",))
        result = {}
        transfer = threading.Thread(
            target=lambda: result.update(echo=tcp_exchange(front, tcp_port, payload)))
        start = time.monotonic()
        transfer.start()
        client = udp_client()
        rtts = []
        while transfer.is_alive() and len(rtts) < 40:
            sent = time.monotonic()
            client.sendto(b"ping", (front, udp_port))
            try:
                client.recv(10)
            except socket.timeout:
                continue  # dropped by the full queue
            rtts.append(time.monotonic() - sent)
            time.sleep(0.01)
        transfer.join(30)
        elapsed = time.monotonic() - start
        client.close()
        flows = relay.stats["down"]["bottleneck"]["flows"]
        assert relay.errors == []
    thread.join(5)
    assert result["echo"] == payload
    assert elapsed >= len(payload) * 8 / 4e6 * 0.9  # 0.8 s at the link's rate
    assert flows[f"tcp:{tcp_port}"] >= len(payload) and flows[f"udp:{udp_port}"] > 0
    assert max(rtts) >= 0.05 and udp_server.received  # behind up to 120 ms of TCP queue


def test_relay_bottleneck_change_remove_and_validate(setup):
    front, port = setup
    with UdpServer(port) as server, Relay(front=front, udp_ports=[port]) as relay:
        relay.set_bottleneck(20_000, queue_bytes=10_000, directions=("up",))  # 16 ms each
        client = udp_client()
        send_numbered(client, front, port, 20, gap=0.0)
        assert wait_until(lambda: relay.stats["up"]["received"] == 20)
        relay.set_bottleneck(None, directions=("up",))  # the queued ones leave at once
        assert wait_until(lambda: len(server.received) == 20, 2.0)
        assert "bottleneck" not in relay.stats["up"]
        relay.set_bottleneck(1e6, queue_bytes=10_000)
        relay.set_bottleneck(2e6, queue_bytes=20_000)  # the same links, reconfigured
        assert relay.stats["down"]["bottleneck"]["rate_bps"] == 2e6
        for bad in ({"rate_bps": 10.0, "queue_bytes": 1000},
                    {"rate_bps": 1e6, "queue_bytes": 0},
                    {"rate_bps": 1e6, "queue_bytes": 1000, "directions": ("sideways",)},
                    {"rate_bps": 1e6, "queue_bytes": 1000, "directions": ()}):
            with pytest.raises(RelayError):
                relay.set_bottleneck(**bad)
        client.close()


def tcp_echo_server(port: int) -> tuple[socket.socket, threading.Thread]:
    """A one-connection TCP echo server on 127.0.0.1:port that closes after EOF."""
    lsock = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return lsock, thread


def tcp_exchange(front: str, port: int, payload: bytes) -> bytes:
    """Send payload, half-close, and read the echo until EOF."""
    conn = socket.create_connection((front, port), timeout=10)
    received = bytearray()
    sender = threading.Thread(target=lambda: (conn.sendall(payload),
                                              conn.shutdown(socket.SHUT_WR)))
    sender.start()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        received += data
    sender.join(10)
    conn.close()
    return bytes(received)


def test_tcp_passthrough_untouched_by_udp_impairments():
    front = random_front_alias()
    port = free_port(("127.0.0.1", front), "tcp")
    payload = bytes(range(256)) * 8192  # 2 MiB
    lsock, thread = tcp_echo_server(port)
    with lsock, Relay(front=front, tcp_ports=[port]) as relay:
        relay.set(delay=1.0, loss=1.0)
        relay.set_blackout(True)  # TCP is not affected unless impair_tcp
        assert tcp_exchange(front, port, payload) == payload
        thread.join(5)
        assert relay.stats["tcp"]["accepted"] == 1


def test_tcp_refused_when_nothing_listens_behind():
    front = random_front_alias()
    port = free_port(("127.0.0.1", front), "tcp")
    with Relay(front=front, tcp_ports=[port]) as relay:
        conn = socket.create_connection((front, port), timeout=5)
        conn.settimeout(5)
        assert conn.recv(10) == b""
        conn.close()
        assert wait_until(lambda: relay.stats["tcp"]["refused"] == 1, 5)


def test_impaired_tcp_gets_delay_and_freezes_during_blackout():
    front = random_front_alias()
    port = free_port(("127.0.0.1", front), "tcp")
    payload = b"z" * 300000
    lsock, thread = tcp_echo_server(port)
    with lsock, Relay(front=front, tcp_ports=[port], impair_tcp=True) as relay:
        relay.set(delay=0.1, loss=1.0)  # loss is for datagrams only
        start = time.monotonic()
        assert tcp_exchange(front, port, b"hello") == b"hello"
        assert time.monotonic() - start >= 0.2
    thread.join(5)
    lsock, thread = tcp_echo_server(port)
    with lsock, Relay(front=front, tcp_ports=[port], impair_tcp=True) as relay:
        relay.blackout(1.0)
        start = time.monotonic()
        assert tcp_exchange(front, port, payload) == payload
        assert time.monotonic() - start >= 0.9
    thread.join(5)


def test_tcp_loss_model_delays_but_never_corrupts():
    """With tcp_loss, lost segments cost round trips and window halvings; every byte still
    arrives, in order (what a kernel's retransmissions would give)."""
    front = random_front_alias()
    port = free_port(("127.0.0.1", front), "tcp")
    payload = os.urandom(200_000)
    lsock, thread = tcp_echo_server(port)
    with lsock, Relay(front=front, tcp_ports=[port], impair_tcp=True, tcp_loss=True,
                      seed=5) as relay:
        relay.set(delay=0.01, loss=0.1)
        start = time.monotonic()
        assert tcp_exchange(front, port, payload) == payload
        elapsed = time.monotonic() - start
        assert relay.stats["tcp"]["segments_lost"] > 10 and relay.errors == []
    thread.join(5)
    assert elapsed >= 0.1  # a lossless window opening would need about 0.1 s; loss adds


def test_close_is_clean_and_idempotent(setup):
    front, port = setup
    relay = Relay(front=front, udp_ports=[port], tcp_ports=[port]).start()
    thread = relay._thread
    relay.close()
    relay.close()
    assert not thread.is_alive()
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((front, port))
    with pytest.raises(RelayError):
        relay.rebind()


def test_bind_conflict_is_reported(setup):
    front, port = setup
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        blocker.bind((front, port))
        with pytest.raises(RelayError, match="cannot bind"):
            Relay(front=front, udp_ports=[port]).start()


# ---------------------------------------------------------------------------------------
# proc_util: the process/PTY helpers the integration tests drive programs with (through
# the relay); tested here because they ship together with it.
# ---------------------------------------------------------------------------------------


def test_pty_process_read_until_send_winsize_and_exit(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PS1": "PROMPT> ",
           "TERM": "xterm", "HOME": str(tmp_path)}
    with PtyProcess(["sh", "-i"], env=env, rows=33, cols=101, cwd=str(tmp_path)) as term:
        term.read_until(b"PROMPT> ", timeout=10)
        term.send("stty size; pwd\r")
        term.read_until(re.compile(rb"(\d+) (\d+)\r\n"), timeout=10)
        assert term.last_match.groups() == (b"33", b"101") and term.match_time > 0
        term.read_until(str(tmp_path), timeout=10)
        term.send(b"echo ab$((6*7))cd\r")
        seen = b""
        deadline = time.monotonic() + 10
        while b"ab42cd" not in seen and time.monotonic() < deadline:
            seen += term.read_chunk(0.5)
        assert b"ab42cd" in seen
        term.set_winsize(40, 120)
        term.send(b"stty size\r")
        term.read_until(b"40 120", timeout=10)
        term.send(b"exit 7\r")
        term.read_to_eof(timeout=10)
        assert term.wait(10) == 7


def test_pty_process_timeout_eof_and_flood(tmp_path):
    with PtyProcess(["sh", "-c", "head -c 9000000 /dev/zero | tr '\\0' y; echo END$((1+1))"],
                    max_buffer=1 << 20) as term:
        term.read_until(b"END2", timeout=60)
        assert term.bytes_read > 9000000
        with pytest.raises(PtyEOF):
            term.read_until(b"never", timeout=10)
    with PtyProcess(["sleep", "30"]) as term:
        with pytest.raises(PtyTimeout):
            term.read_until(b"x", timeout=0.3)
        pid = term.pid
    assert not pid_alive(pid)


def test_managed_process_is_killed_with_its_group(tmp_path):
    log = tmp_path / "out.log"
    with ManagedProcess(["sh", "-c", "echo started; sleep 60 & wait"], log=log) as proc:
        wait_for(lambda: "started" in proc.read_log(), 10, "output")
        child = wait_for(lambda: proc_children(proc.pid), 10, "child")[0]
        cpu, rss = proc_usage(proc.pid)
        assert cpu >= 0 and rss > 0
    assert not pid_alive(proc.pid) and not pid_alive(child)
    with pytest.raises(TimeoutError, match="nothing"):
        wait_for(lambda: False, 0.1, "nothing")
