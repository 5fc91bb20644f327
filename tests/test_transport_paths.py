"""Path validation on the simulated network (fake clock): roaming moves a session's output
only to an address that answered a PATH_CHALLENGE, and an unvalidated address never gets
more than 3x the bytes that came from it (a replayed datagram cannot aim output elsewhere).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

import moshpit_transport as mt
from moshpit import MAX_DATAGRAM
from test_transport import (CLIENT_ADDR, CLIENT_ADDR2, MB, SERVER_ADDR, Sim, SimNet, authentic,
                            finish, frame, make_keys, random_bytes, resume)

ATTACKER_ADDR = ("192.0.2.66", 6666)
REBOUND_ADDR = (CLIENT_ADDR[0], CLIENT_ADDR[1] + 1)  # same host, new port: a NAT rebinding


class TapNet(SimNet):
    """A SimNet that counts bytes per (source, destination) and lets a test rewrite each
    datagram as it is sent: ``tap(datagram, src, dst)`` returns the deliveries to make
    instead, as (datagram, src, dst) tuples (default: the datagram as it is)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bytes = Counter()
        self.tap = None

    def send(self, now: float, datagram: bytes, src: tuple, dst: tuple) -> None:
        self.bytes[src, dst] += len(datagram)
        deliveries = [(datagram, src, dst)] if self.tap is None else self.tap(datagram, src, dst)
        for delivery in deliveries:
            super().send(now, *delivery)


def is_challenge(datagram: bytes) -> bool:
    return len(datagram) == mt.CHALLENGE_DATAGRAM


def moves(peer) -> list:
    return [e.addr for e in peer.events if isinstance(e, mt.PeerAddressChanged)]


def test_replayed_datagram_from_a_third_address_does_not_redirect_output():
    """An on-path attacker copies one fresh client datagram and delivers it from its own
    address ahead of the original: the server challenges that address, sends it at most 3x
    what it sent, and keeps streaming to the real client, which keeps talking."""
    rng = random.Random(7)
    net = TapNet(7, delay=0.02)
    sim = Sim(net, up=random_bytes(rng, 100_000), down=random_bytes(rng, MB), keys=make_keys(7))
    sim.run_until(lambda: len(sim.client.received) > MB // 8, limit=10)
    replayed = []

    def hijack(datagram, src, dst):
        if src == CLIENT_ADDR and not replayed:
            replayed.append(datagram)  # the attacker's copy wins the race to the server
            return [(datagram, ATTACKER_ADDR, dst), (datagram, src, dst)]
        return [(datagram, src, dst)]

    net.tap = hijack
    finish(sim, limit=60)
    assert replayed
    to_attacker = net.bytes[SERVER_ADDR, ATTACKER_ADDR]
    assert 0 < to_attacker <= mt.AMPLIFICATION_FACTOR * len(replayed[0])
    assert sim.server.conn.peer_addr == CLIENT_ADDR
    assert moves(sim.server) == [CLIENT_ADDR], "first contact only: never moved"


def test_sprayed_replays_keep_one_pending_address_and_the_limit_per_address():
    """Fresh authentic packets from a thousand addresses (an attacker with many captured
    datagrams): one address is on trial at a time, and none gets more than 3x its bytes."""
    keys = make_keys(9)
    net = TapNet(9)
    sim = Sim(net, keys=keys, down=b"o" * 300_000)
    sim.run_until(lambda: len(sim.client.received) > 10_000, limit=5)
    server = sim.server.conn
    received = Counter()
    first_pn = sim.client.conn._next_pn
    sim.client.conn._next_pn += 1000  # these reach the server ahead of the client's own
    for i in range(1000):
        addr = ("198.18.0.1", 1000 + i)
        datagram = authentic(keys, first_pn + i, frame(mt.FRAME_PING, b""))
        received[addr] += len(datagram)
        server.receive_datagram(datagram, addr, sim.now)
        for datagram, dst in server.datagrams_to_send(sim.now):
            net.send(sim.now, datagram, SERVER_ADDR, dst)
    assert server._probe.addr == ("198.18.0.1", 1999)
    for addr, size in received.items():
        assert net.bytes[SERVER_ADDR, addr] <= mt.AMPLIFICATION_FACTOR * size
    assert server.peer_addr == CLIENT_ADDR
    finish(sim, limit=30)


def test_genuine_roam_moves_after_one_challenge_round_trip():
    """The client changes address (the old one is gone) and types: the echo comes back
    within one round trip of its first packet from there (copies within the 3x limit), and
    the server moves once the challenge's round trip completes."""
    net = TapNet(11, delay=0.05)
    sim = Sim(net, keys=make_keys(11))
    sim.run_for(4)
    sim.client.addr = CLIENT_ADDR2
    sim.client.conn.send(b"x")
    typed = sim.now
    sim.run_until(lambda: sim.server.received == b"x", limit=typed + 1)
    arrived = sim.now
    assert arrived - typed == pytest.approx(0.05)
    sim.server.conn.send(b"X")  # the shell's echo, at once
    sim.run_until(lambda: sim.client.received == b"X", limit=arrived + 1)
    assert sim.now - arrived <= 0.05 + 1e-9, "echo within one round trip of the move"
    sim.run_until(lambda: sim.server.conn.peer_addr == CLIENT_ADDR2, limit=arrived + 1)
    assert sim.now - arrived <= 0.1 + 1e-9, "validated within one round trip"
    assert moves(sim.server) == [CLIENT_ADDR, CLIENT_ADDR2]
    before_move = [(t, dst) for t, src, dst in sim.log if src == SERVER_ADDR and t < sim.now]
    assert any(dst == CLIENT_ADDR for _t, dst in before_move), "normal traffic stayed put"


def test_roam_mid_transfer_loses_and_doubles_nothing():
    sim = Sim(TapNet(13, delay=0.02, loss=0.02), down=random_bytes(random.Random(13), MB),
              keys=make_keys(13))
    sim.run_until(lambda: len(sim.client.received) > MB // 3, limit=20)
    sim.client.addr = CLIENT_ADDR2
    finish(sim, limit=60)
    assert moves(sim.server) == [CLIENT_ADDR, CLIENT_ADDR2]


def test_lost_challenges_are_retried():
    """The first two challenges to the new address are lost: validation still completes,
    sooner than waiting out backed-off timers, because the client keeps talking."""
    net = TapNet(15, delay=0.02)
    sim = Sim(net, keys=make_keys(15))
    sim.run_for(4)
    dropped = []

    def drop_two_challenges(datagram, src, dst):
        if dst == CLIENT_ADDR2 and is_challenge(datagram) and len(dropped) < 2:
            dropped.append(datagram)
            return []
        return [(datagram, src, dst)]

    net.tap = drop_two_challenges
    sim.client.addr = CLIENT_ADDR2
    moved = sim.now
    sim.client.conn.send(b"ls\r")
    sim.run_until(lambda: sim.server.conn.peer_addr == CLIENT_ADDR2, limit=moved + 5)
    assert len(dropped) == 2
    assert sim.now - moved < 1.0


def test_nat_rebinding_keeps_the_path_estimates():
    """A new port on the same host (NAT rebinding) is validated like any address, but keeps
    the congestion window and RTT: it is the same path."""
    sim = Sim(TapNet(17, delay=0.02), down=random_bytes(random.Random(17), MB),
              keys=make_keys(17))
    sim.run_until(lambda: len(sim.client.received) > MB // 4, limit=20)
    server = sim.server.conn
    cc, rtt = server._cc, server._rtt
    sim.client.addr = REBOUND_ADDR
    sim.run_until(lambda: server.peer_addr == REBOUND_ADDR, limit=sim.now + 5)
    assert server._cc is cc and server._rtt is rtt
    finish(sim, limit=60)


def test_response_from_another_address_validates_nothing():
    """An attacker who forwards the challenge to the real client gets the response sent
    from the client's own address: it proves nothing about the attacker's address."""
    net = TapNet(19, delay=0.02)
    sim = Sim(net, keys=make_keys(19), down=b"z" * 50_000)
    sim.run_for(1)
    captured = []

    def attack(datagram, src, dst):
        if src == CLIENT_ADDR and not captured:
            captured.append(datagram)
            return [(datagram, ATTACKER_ADDR, dst), (datagram, src, dst)]
        if dst == ATTACKER_ADDR:
            return [(datagram, SERVER_ADDR, CLIENT_ADDR)]  # forwarded to the real client
        return [(datagram, src, dst)]

    net.tap = attack
    sim.client.conn.send(b"y")
    sim.run_for(3)
    assert captured and sim.server.conn._probe.addr == ATTACKER_ADDR
    assert sim.server.conn.peer_addr == CLIENT_ADDR
    assert moves(sim.server) == [CLIENT_ADDR]


def test_first_address_gets_three_times_its_bytes_until_it_answers():
    """The server's first contact has no validated address to fall back on: output starts
    at once, limited by what the client sent (its first packet is padded to a full
    datagram), and flows freely once the client answered the challenge."""
    net = TapNet(21, delay=0.05)
    sim = Sim(net, keys=make_keys(21), down=b"m" * 20_000)
    first = []

    def only_the_first_packet(datagram, src, dst):
        if src == CLIENT_ADDR:
            if first:
                return []
            first.append(datagram)
        return [(datagram, src, dst)]

    net.tap = only_the_first_packet
    sim.run_for(2)
    assert len(first[0]) == MAX_DATAGRAM, "the first ping is padded"
    assert 0 < net.bytes[SERVER_ADDR, CLIENT_ADDR] <= mt.AMPLIFICATION_FACTOR * MAX_DATAGRAM
    assert len(sim.client.received) > 1000, "the start of the output is not held back"
    net.tap = None  # the client's next packet (a keepalive) brings a new challenge
    sim.run_until(lambda: len(sim.client.received) == 20_000, limit=sim.now + mt.KEEPALIVE_SECS + 1)
    assert sim.server.conn._probe is None, "validated"


def server_frames(keys, datagram: bytes) -> list:
    """The frame types inside a datagram the server sent (opened as the client would)."""
    rx = mt.PacketCipher(keys.server_to_client, keys.cipher, mt.SERVER_TO_CLIENT, keys.conn_id)
    _pn, plaintext = rx.open(datagram)
    types, pos = [], 0
    while pos < len(plaintext):
        ftype, length = mt.FRAME.unpack_from(plaintext, pos)
        types.append(ftype)
        pos += mt.FRAME.size + length
    return types


def test_malformed_path_frames_are_ignored():
    keys = make_keys(23)
    sim = Sim(TapNet(23), keys=keys)
    sim.run_for(1)
    server = sim.server.conn
    pn = 10 ** 6
    for body in (b"", b"1234567", b"123456789", bytes(8)):
        server.receive_datagram(authentic(keys, pn, frame(mt.FRAME_PATH_RESPONSE, body)),
                                CLIENT_ADDR2, sim.now)
        server.receive_datagram(authentic(keys, pn + 1, frame(mt.FRAME_PATH_CHALLENGE, body)),
                                CLIENT_ADDR2, sim.now)
        pn += 2
    assert server.peer_addr == CLIENT_ADDR and server._probe.addr == CLIENT_ADDR2
    sent = [server_frames(keys, d) for d, addr in server.datagrams_to_send(sim.now)
            if addr == CLIENT_ADDR2]
    assert sent.count([mt.FRAME_PATH_RESPONSE]) == 1, "only the 8-byte challenge is answered"
    assert sent.count([mt.FRAME_PATH_CHALLENGE]) == 1


def test_resume_from_a_new_address_is_validated_like_a_roam():
    """After a resume handshake the server keeps the address it had validated; the client's
    first packets under the new keys come from a new address, which is challenged before
    the output moves there (the handshake's TCP connection proves nothing about it)."""
    net = TapNet(25, delay=0.02)
    sim = Sim(net, keys=make_keys(25), down=random_bytes(random.Random(25), 300_000))
    sim.run_until(lambda: len(sim.client.received) > 50_000, limit=10)
    net.blackout_until = sim.now + 15
    sim.run_for(12)
    resume(sim, CLIENT_ADDR2, make_keys(26))
    assert sim.server.conn.peer_addr == CLIENT_ADDR
    challenges = []

    def count_challenges(datagram, src, dst):
        if dst == CLIENT_ADDR2 and is_challenge(datagram):
            challenges.append(datagram)
        return [(datagram, src, dst)]

    net.tap = count_challenges
    finish(sim, limit=sim.now + 30)
    assert challenges and moves(sim.server) == [CLIENT_ADDR, CLIENT_ADDR2]
