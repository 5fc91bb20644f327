"""Datagram size discovery (moshpit_transport.DatagramSizer) on a simulated network with a
path MTU, on a fake clock: the size settles at what the path carries, a path that shrinks
mid-transfer falls back to the base size with every byte delivered, probes are never part
of the congestion window or of retransmission, and a path change starts over small."""

from __future__ import annotations

import random
import socket

import pytest
from test_session import CoreSim, take_over
from test_transport import (
    CLIENT_ADDR, CLIENT_ADDR2, MB, Sim, SimNet, authentic, bulk_sim, finish,
    frame, make_keys, random_bytes, resume, snapshot)

import moshpit_transport as mt
from moshpit import MAX_DATAGRAM

IPV4_UDP_HEADERS = 28  # what the path's MTU counts on top of the datagram


class MtuNet(SimNet):
    """A SimNet whose path drops any datagram that makes an IP packet above ``mtu`` (a
    router with "don't fragment" set, and no ICMP making it back)."""

    def __init__(self, mtu: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mtu = mtu
        self.too_big = 0
        self.lengths: list = []  # of every datagram sent, in order
        self.sent_to: list = []  # (destination, length) of each

    def send(self, now: float, datagram: bytes, src: tuple, dst: tuple) -> None:
        self.lengths.append(len(datagram))
        self.sent_to.append((dst, len(datagram)))
        if len(datagram) + IPV4_UDP_HEADERS > self.mtu:
            self.too_big += 1
            return
        super().send(now, datagram, src, dst)


def sizing_sim(mtu: int, seed: int = 1, size: int = 2 * MB, **net) -> Sim:
    """Both ends allowed to grow their datagrams (as a UdpLink on Linux allows them)."""
    rng = random.Random(seed)
    sim = Sim(MtuNet(mtu, seed=seed, **net), random_bytes(rng, size),
              random_bytes(rng, size), keys=make_keys(seed))
    for peer in sim.peers():
        peer.conn.allow_larger_datagrams()
    return sim


def sizes(sim: Sim) -> tuple:
    return sim.client.conn.datagram_size, sim.server.conn.datagram_size


@pytest.mark.parametrize("mtu, expected", [
    (1500, 1452),  # Ethernet
    (9000, 8952),  # jumbo frames
    (65536, mt.LARGEST_DATAGRAM),  # loopback
    (1280, MAX_DATAGRAM),  # IPv6's minimum: nothing above the base size gets through
])
def test_the_size_settles_at_what_the_path_carries(mtu, expected):
    sim = sizing_sim(mtu)
    finish(sim, limit=60)
    assert sizes(sim) == (expected, expected)
    # Bulk data went in datagrams of that size (not just the probes).
    assert sim.net.lengths.count(expected) > 2 * MB // expected


def test_without_permission_datagrams_stay_at_the_base_size():
    sim = bulk_sim(seed=2)  # a Connection nobody called allow_larger_datagrams on
    finish(sim, limit=60)
    assert sizes(sim) == (MAX_DATAGRAM, MAX_DATAGRAM)  # (SimNet asserts each datagram's size)


def test_a_path_that_shrinks_mid_transfer_falls_back_with_every_byte_delivered():
    sim = sizing_sim(65536, seed=3, size=4 * MB)
    sim.run_until(lambda: sizes(sim) == (mt.LARGEST_DATAGRAM,) * 2
                  and len(sim.client.received) > MB, limit=30)
    sim.net.mtu = 1280  # a tunnel came up: large datagrams now vanish without a word
    finish(sim, limit=sim.now + 60)
    assert sizes(sim) == (MAX_DATAGRAM, MAX_DATAGRAM)


def test_a_path_that_shrinks_to_ethernet_settles_there_again():
    sim = sizing_sim(65536, seed=4, size=4 * MB)
    sim.run_until(lambda: sizes(sim) == (mt.LARGEST_DATAGRAM,) * 2
                  and len(sim.client.received) > MB, limit=30)
    sim.net.mtu = 1500
    finish(sim, limit=sim.now + 60)
    assert sizes(sim) == (1452, 1452)


@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_lost_probes_are_neither_congestion_nor_retransmitted(monkeypatch, loss):
    """On a 1500-byte path the probes of the larger sizes are all lost (and with 10% random
    loss some others): none is ever a flight record, so no probe's loss reaches the
    congestion control or queues a retransmission."""
    probe_pns, flight_pns, losses = [], [], []
    size_probe, on_send, on_loss = (mt.Connection._size_probe, mt.CongestionControl.on_send,
                                    mt.CongestionControl.on_loss)

    def spy_probe(conn, now, addr):
        out = size_probe(conn, now, addr)
        probe_pns.extend((id(conn), conn._next_pn - 1) for _ in out)
        return out

    def spy_send(cc, pn, *args):
        flight_pns.append((cc, pn))
        return on_send(cc, pn, *args)

    def spy_loss(cc, *args):
        losses.append(cc)
        return on_loss(cc, *args)

    retransmitted: list = []
    queue_missing = mt.SendStream._queue_missing

    def spy_queue(stream, start, stop):
        queued = queue_missing(stream, start, stop)
        if queued:
            retransmitted.append((start, stop))
        return queued

    monkeypatch.setattr(mt.SendStream, "_queue_missing", spy_queue)
    monkeypatch.setattr(mt.Connection, "_size_probe", spy_probe)
    monkeypatch.setattr(mt.CongestionControl, "on_send", spy_send)
    monkeypatch.setattr(mt.CongestionControl, "on_loss", spy_loss)
    sim = sizing_sim(1500, seed=5, loss=loss)
    finish(sim, limit=120)
    assert sizes(sim) == (1452, 1452)
    assert sim.net.too_big >= 2 * mt.MAX_PROBES, "the larger probes went and were lost"
    owners = {id(peer.conn): peer.conn._cc for peer in sim.peers()}
    assert not {(owners[conn], pn) for conn, pn in probe_pns} & set(flight_pns)
    if not loss:
        assert losses == [], "no data was lost, and lost probes do not count"
        assert retransmitted == [], "nothing was queued for retransmission"


def test_a_new_peer_address_starts_over_at_the_base_size():
    sim = sizing_sim(65536, seed=6, size=4 * MB)
    sim.run_until(lambda: sizes(sim) == (mt.LARGEST_DATAGRAM,) * 2
                  and len(sim.server.received) > MB, limit=30)
    sim.client.addr = CLIENT_ADDR2  # roaming
    server = sim.server.conn
    sim.run_until(lambda: server.peer_addr == CLIENT_ADDR2, limit=sim.now + 10)
    assert server.datagram_size == MAX_DATAGRAM, "an unproven path: the base size"
    finish(sim, limit=sim.now + 60)
    assert server.datagram_size == mt.LARGEST_DATAGRAM, "probed again, and grown"


def test_a_resume_starts_over_at_the_base_size():
    sim = sizing_sim(65536, seed=7, size=4 * MB)
    sim.run_until(lambda: sizes(sim) == (mt.LARGEST_DATAGRAM,) * 2
                  and len(sim.client.received) > MB, limit=30)
    resume(sim, CLIENT_ADDR2, make_keys(70))
    assert sizes(sim) == (MAX_DATAGRAM, MAX_DATAGRAM)
    finish(sim, limit=sim.now + 60)
    assert sizes(sim) == (mt.LARGEST_DATAGRAM,) * 2


def test_a_tcp_carrier_path_is_never_probed():
    """A carrier's frames are bounded to MAX_DATAGRAM: a path trusted as one (here the
    server's path to its client) stays at the base size, while the other direction grows."""
    sim = sizing_sim(65536, seed=8, size=MB)
    server = sim.server.conn
    server.trust_path(CLIENT_ADDR, 0.2, fixed_size=True)
    finish(sim, limit=60)
    assert server.peer_addr == CLIENT_ADDR
    assert sizes(sim) == (mt.LARGEST_DATAGRAM, MAX_DATAGRAM)
    assert max(length for dst, length in sim.net.sent_to if dst == CLIENT_ADDR) <= MAX_DATAGRAM
    server.forget_path(CLIENT_ADDR)  # the carrier closed: the path may be probed again
    server.use_path(CLIENT_ADDR2, sim.now)
    assert server._sizing(sim.now)


def test_the_kernel_refusing_a_size_falls_back_and_stays_below_it():
    """EMSGSIZE (the interface's MTU is smaller than the path's size): back to the base size
    at once, and the search then stops below the refused size."""
    sim = sizing_sim(65536, seed=9, size=4 * MB)
    sim.run_until(lambda: sizes(sim) == (mt.LARGEST_DATAGRAM,) * 2
                  and len(sim.client.received) > MB, limit=30)
    server = sim.server.conn
    server.datagram_too_big(mt.LARGEST_DATAGRAM, CLIENT_ADDR)
    assert server.datagram_size == MAX_DATAGRAM
    server.datagram_too_big(mt.LARGEST_DATAGRAM, CLIENT_ADDR2)  # not the path in use
    finish(sim, limit=sim.now + 60)
    assert server.datagram_size == 8952


def test_the_receiver_refuses_datagrams_above_the_bound():
    keys = make_keys(10)
    sim = Sim(SimNet(10), up=b"a" * 10, down=b"b" * 10, keys=keys)
    sim.run_until(lambda: sim.transferred(), limit=5)
    server = sim.server.conn
    before = snapshot(server)
    padding = frame(mt.FRAME_PADDING, bytes(mt.LARGEST_DATAGRAM))  # authentic, but too long
    oversized = authentic(keys, 10_000, frame(mt.FRAME_PING, b"") + padding)
    assert len(oversized) > mt.LARGEST_DATAGRAM
    server.receive_datagram(oversized, CLIENT_ADDR, sim.now)
    assert snapshot(server) == before and not server._acks.owed()
    largest = authentic(keys, 10_001, frame(mt.FRAME_PING, b"") + frame(
        mt.FRAME_PADDING, bytes(mt.LARGEST_DATAGRAM - mt.OVERHEAD - 2 * mt.FRAME.size)))
    assert len(largest) == mt.LARGEST_DATAGRAM
    server.receive_datagram(largest, CLIENT_ADDR, sim.now)
    assert server._rx.replay.largest == 10_001, "the bound itself is accepted"


def test_window_floors_and_pacing_burst_follow_the_size():
    sim = sizing_sim(9000, seed=11, size=MB)
    finish(sim, limit=60)
    server = sim.server.conn
    assert server._cc.mss == 8952 - mt.OVERHEAD - mt.DATA_OVERHEAD
    assert server._pacer.burst == mt.PACING_BURST_PACKETS * 8952
    server._cc.on_timeout(sim.now)
    assert server._cc.cwnd == mt.TIMEOUT_CWND_PACKETS * server._cc.mss


def test_a_takeover_keeps_what_the_socket_allows():
    """``mp --attach`` puts the session on a fresh Connection: the link's socket still
    forbids fragmentation, so the new one may grow its datagrams too (from the base size)."""
    sim = CoreSim(SimNet(12), detached=3600)
    sim.server.conn.allow_larger_datagrams()
    sim.client.conn.allow_larger_datagrams()
    sim.run_for(0.5)
    assert sim.server.conn.datagram_size == mt.LARGEST_DATAGRAM
    take_over(sim, make_keys(13))
    assert sim.server.conn.size_ceiling == mt.LARGEST_DATAGRAM
    assert sim.server.conn.datagram_size == MAX_DATAGRAM


def test_sockets_that_cannot_forbid_fragmentation_stay_at_the_base_size(monkeypatch):
    """Where the kernel cannot be told never to fragment (another OS; a socket that is not
    IP), datagrams never grow: a fragmented one is lost whole if any fragment is."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        assert not mt.never_fragment(unix)
    monkeypatch.setattr(mt.sys, "platform", "darwin")
    conn = mt.Connection("client", make_keys(14), 0.0, ("127.0.0.1", 9))
    link = mt.UdpLink.bind(conn, "127.0.0.1")
    try:
        assert conn.size_ceiling == MAX_DATAGRAM and not conn._sizer.next_probe
    finally:
        link.close()


def test_probes_never_use_the_packet_numbers_kept_for_path_datagrams():
    """Packet numbers stop below PACKET_NUMBER_LIMIT, and the last ones under a key are kept
    for one flush's path datagrams: the answers to challenges, and our own challenge or (never
    both: no probing while an address is on trial) a size probe."""
    sim = sizing_sim(1500, seed=15, size=10_000)
    finish(sim, limit=10)
    server = sim.server.conn
    server._sizer.next_probe = sim.now  # a probe is due (the raise timer, say) ...
    server._sizer._target = 8952
    server._next_pn = mt.SEND_PN_LIMIT - 1  # ... as the last number before the reserve goes
    server._responses.extend((bytes(8), CLIENT_ADDR) for _ in range(mt.PENDING_RESPONSES))
    numbers = [mt.HEADER.unpack_from(datagram)[2]
               for datagram, _addr in server.datagrams_to_send(sim.now)]
    assert len(numbers) == mt.PENDING_RESPONSES + 1, "the answers, then the probe"
    assert max(numbers) < mt.PACKET_NUMBER_LIMIT
