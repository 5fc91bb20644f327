"""Transport over real UDP sockets on loopback: direct, and through the impairment relay.

Both UdpLinks run in this thread's select loop, driven by real time.
"""

from __future__ import annotations

import random
import select
import socket
import sys
import time

import pytest

import moshpit_transport as mt
from relay import Relay, free_port, random_front_alias
from test_transport import MB, Peer, make_keys, random_bytes


class Pair:
    """A client and a server Peer, each on its own UdpLink, in one select loop."""

    def __init__(self, server_host: str, client_target: tuple, size: int, seed: int,
                 server_port: int = 0) -> None:
        rng = random.Random(seed)
        keys = make_keys(seed)
        now = time.monotonic()
        server_conn = mt.Connection("server", keys, now)
        self.server_link = mt.UdpLink.bind(server_conn, server_host, server_port)
        if client_target[1] == 0:  # direct: talk to wherever the server got bound
            client_target = self.server_link.local_addr[:2]
        client_conn = mt.Connection("client", keys, now, client_target)
        self.client_link = mt.UdpLink.bind(client_conn, server_host, 0)
        self.client = Peer(client_conn, None, random_bytes(rng, size))
        self.server = Peer(server_conn, None, random_bytes(rng, size))

    def close(self) -> None:
        self.client_link.close()
        self.server_link.close()

    def pump(self, done, timeout: float) -> None:
        links = (self.client_link, self.server_link)
        deadline = time.monotonic() + timeout
        while not done():
            now = time.monotonic()
            assert now < deadline, f"not done within {timeout} s"
            waits = [w for w in (link.timeout(now) for link in links) if w is not None]
            readable, _, _ = select.select(links, [], [], min(waits + [0.05]))
            now = time.monotonic()
            for link in readable:
                link.handle_readable(now)
            for peer in (self.client, self.server):
                peer.pump_app()
            for link in links:
                link.flush(now)

    def transferred(self) -> bool:
        return (self.server.received == self.client.source
                and self.client.received == self.server.source)

    def finish(self, timeout: float) -> None:
        self.pump(lambda: self.transferred() and self.client.conn.all_acked()
                  and self.server.conn.all_acked(), timeout)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_direct_loopback_transfer(host):
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    pair = Pair(host, (host, 0), MB, seed=1)
    try:
        pair.finish(timeout=40)
    finally:
        pair.close()


def test_gso_runs_hold_what_one_segmented_send_can_carry():
    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)
    full, short = b"f" * 1200, b"s" * 300
    datagrams = [(full, a), (full, a), (short, a), (full, a), (full, b), (short, b),
                 (short, b)] + [(full, a)] * 60
    runs = mt.gso_runs(datagrams)
    assert [(addr, size, len(group)) for addr, size, group in runs] == [
        (a, 1200, 3), (a, 1200, 1), (b, 1200, 2), (b, 300, 1),
        (a, 1200, mt.GSO_MAX_BYTES // 1200), (a, 1200, 60 - mt.GSO_MAX_BYTES // 1200)]
    assert [d for _addr, _size, group in runs for d in group] == [d for d, _ in datagrams]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("offload", [True, False])
def test_transfer_with_and_without_segmentation_offload(offload):
    """Runs of datagrams leave in one call (GSO) and arrive in one (GRO) where Linux offers
    them; without (another OS, an old kernel: simulated here) one per call. Either way every
    byte arrives once, in order."""
    pair = Pair("127.0.0.1", ("127.0.0.1", 0), 2 * MB, seed=5)
    coalesced = []
    try:
        for link in (pair.client_link, pair.server_link):
            link.gso = link.gso and offload
            link.gro = link.gro and offload
        if pair.client_link.gro:
            read = pair.client_link._read_coalesced

            def counting_read():
                data, segment, addr = read()
                coalesced.append(segment < len(data))
                return data, segment, addr

            pair.client_link._read_coalesced = counting_read
        pair.finish(timeout=40)
    finally:
        pair.close()
    if offload and pair.server_link.gso and pair.client_link.gro:
        assert any(coalesced), "several datagrams per read"


LINUX = sys.platform.startswith("linux")


@pytest.mark.timeout(60)
@pytest.mark.skipif(not LINUX, reason="datagrams grow only where fragmentation can be forbidden")
def test_datagrams_grow_on_loopback_and_the_stream_arrives_exact():
    pair = Pair("127.0.0.1", ("127.0.0.1", 0), 4 * MB, seed=11)
    try:
        for link in (pair.client_link, pair.server_link):
            assert (link.sock.getsockopt(socket.IPPROTO_IP, mt.IP_MTU_DISCOVER)
                    == mt.IP_PMTUDISC_PROBE), "the kernel never fragments"
        pair.finish(timeout=40)  # every byte, in order, both ways
    finally:
        pair.close()
    assert pair.client.conn.datagram_size == pair.server.conn.datagram_size \
        == mt.LARGEST_DATAGRAM


@pytest.fixture
def relayed():
    """Factory: a Pair whose UDP runs through a relay on a random loopback alias."""
    made = []

    def make(size: int, seed: int, mtu: int | None = None, **impairment) -> tuple:
        front = random_front_alias()
        port = free_port(("127.0.0.1", front), "udp")
        relay = Relay(front=front, back="127.0.0.1", udp_ports=[port], seed=seed, mtu=mtu)
        relay.set(**impairment)
        relay.start()
        made.append(relay)
        pair = Pair("127.0.0.1", (front, port), size, seed, server_port=port)
        made.append(pair)
        return relay, pair

    yield make
    for thing in reversed(made):
        thing.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("loss", [0.1, 0.3])
def test_transfer_through_lossy_relay(relayed, loss):
    relay, pair = relayed(MB, seed=int(loss * 10), loss=loss, delay=0.02)
    pair.finish(timeout=70)
    stats = relay.stats
    assert stats["up"]["lost"] > 0 and stats["down"]["lost"] > 0
    assert relay.errors == []


@pytest.mark.timeout(60)
@pytest.mark.skipif(not LINUX, reason="datagrams grow only where fragmentation can be forbidden")
def test_datagrams_settle_at_what_a_1500_byte_relay_carries(relayed):
    relay, pair = relayed(2 * MB, seed=12, mtu=1500, delay=0.005)
    pair.finish(timeout=40)
    assert pair.client.conn.datagram_size == pair.server.conn.datagram_size == 1452
    stats = relay.stats
    assert stats["up"]["too_big_dropped"] > 0 and stats["down"]["too_big_dropped"] > 0
    assert relay.errors == []


@pytest.mark.timeout(60)
def test_roaming_through_relay_rebind_and_client_port_hop(relayed):
    relay, pair = relayed(4 * MB, seed=7, loss=0.05, delay=0.01)
    pair.pump(lambda: len(pair.client.received) > MB // 8, timeout=20)
    relay.rebind()  # a NAT gives the client a new public port

    def moves() -> list:
        return [e for e in pair.server.events if isinstance(e, mt.PeerAddressChanged)]

    # Until the server has followed the rebind (a byte count could already be reached by
    # what was in flight before it, and the hop would then hide the rebind).
    pair.pump(lambda: len(moves()) >= 2, timeout=20)
    old_port = pair.client_link.local_addr[1]
    assert pair.client_link.hop_port()[1] != old_port  # the client moves by itself
    pair.finish(timeout=40)
    assert len(moves()) >= 3, "first contact, the rebind and the hop"


@pytest.mark.timeout(30)
def test_network_errors_never_escape():
    keys = make_keys(3)
    now = time.monotonic()
    closed_port = free_port("127.0.0.1", "udp")
    conn = mt.Connection("client", keys, now, ("127.0.0.1", closed_port))
    link = mt.UdpLink.bind(conn, "127.0.0.1")
    try:
        conn.send(b"x" * 50_000)
        for _ in range(20):  # ICMP port unreachable comes back; nothing raises
            link.flush(time.monotonic())
            link.handle_readable(time.monotonic())
        conn.peer_addr = ("::1", closed_port)  # wrong address family for this socket
        link.flush(time.monotonic() + 5)
        conn.peer_addr = ("127.0.0.1", 0)  # port 0: the kernel refuses to send there
        link.flush(time.monotonic() + 10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            junk.sendto(b"\x01" * (mt.LARGEST_DATAGRAM + 100), link.local_addr)  # too long
            junk.sendto(b"", link.local_addr)
        time.sleep(0.05)
        link.handle_readable(time.monotonic())
        assert conn.next_event() is None
        assert link.timeout(time.monotonic()) is not None
    finally:
        link.close()


def test_hop_port_keeps_the_old_socket_when_none_can_be_opened(monkeypatch):
    conn = mt.Connection("client", make_keys(4), time.monotonic(), ("127.0.0.1", 9))
    link = mt.UdpLink.bind(conn, "127.0.0.1")
    try:
        old = link.local_addr

        def no_socket(host, port=0):
            raise OSError(101, "Network is unreachable")

        monkeypatch.setattr(mt, "udp_socket", no_socket)
        assert link.hop_port() == old
        link.flush(time.monotonic())
    finally:
        link.close()
