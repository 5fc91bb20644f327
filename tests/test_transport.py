"""Transport tests on a simulated network: fake clock, seeded loss/reorder/duplication/delay.

Nothing here sleeps or opens a socket: two sans-IO Connections exchange datagrams through
``SimNet``, a priority queue of deliveries, and time jumps straight to the next event.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import random
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moshpit_transport as mt
from moshpit import MAX_DATAGRAM

CLIENT_ADDR = ("192.0.2.1", 40001)
CLIENT_ADDR2 = ("198.51.100.7", 50123)
SERVER_ADDR = ("203.0.113.5", 55555)
MB = 1024 * 1024


def make_keys(seed: int = 0, cipher: str = "chacha20-poly1305") -> types.SimpleNamespace:
    """A stand-in for the handshake's SessionKeys (the transport only reads these fields)."""
    rng = random.Random(seed)
    return types.SimpleNamespace(
        client_to_server=bytes(rng.getrandbits(8) for _ in range(32)),
        server_to_client=bytes(rng.getrandbits(8) for _ in range(32)),
        conn_id=bytes(rng.getrandbits(8) for _ in range(8)), cipher=cipher)


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.getrandbits(8 * size).to_bytes(size, "big")


class SimNet:
    """Both directions of a path: seeded loss, delay + jitter (reordering), duplication,
    blackouts.  Datagrams to an address nobody holds any more vanish, like after a move."""

    def __init__(self, seed: int = 1, loss: float = 0.0, delay: float = 0.02,
                 jitter: float = 0.0, duplicate: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.loss, self.delay, self.jitter, self.duplicate = loss, delay, jitter, duplicate
        self.blackout_until = float("-inf")
        self.queue: list = []
        self.sent = 0
        self._seq = 0

    def send(self, now: float, datagram: bytes, src: tuple, dst: tuple) -> None:
        assert len(datagram) <= mt.LARGEST_DATAGRAM
        self.sent += 1
        if now < self.blackout_until or self.rng.random() < self.loss:
            return
        for _ in range(2 if self.rng.random() < self.duplicate else 1):
            self._seq += 1
            due = now + self.delay + self.rng.random() * self.jitter
            heapq.heappush(self.queue, (due, self._seq, datagram, src, dst))

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def pop_due(self, now: float) -> list:
        due = []
        while self.queue and self.queue[0][0] <= now:
            due.append(heapq.heappop(self.queue)[2:])
        return due


class Peer:
    """A Connection plus its application: writes ``source`` on stream 0 (and each of
    ``bulk``'s sources on its stream) while writable, collects data and events, and may sit
    at a changing address."""

    def __init__(self, conn: mt.Connection, addr: tuple, source: bytes = b"") -> None:
        self.conn, self.addr, self.source = conn, addr, source
        self.written = 0
        self.received = bytearray()  # stream 0
        self.streams: dict = {}  # other stream id -> bytearray received
        self.bulk: dict = {}  # other stream id -> [source, bytes written]
        self.events: list = []

    def pump_app(self) -> None:
        conn = self.conn
        while self.written < len(self.source) and conn.writable():
            chunk = self.source[self.written:self.written + 16384]
            conn.send(chunk)
            self.written += len(chunk)
        for stream_id, progress in self.bulk.items():
            source, done = progress
            while done < len(source) and conn.writable(stream_id):
                conn.send(source[done:done + 16384], stream_id)
                done = progress[1] = min(done + 16384, len(source))
        event = conn.next_event()
        while event is not None:
            if isinstance(event, mt.DataReceived):
                assert event.data, "empty DataReceived"
                if event.stream_id == mt.FIRST_STREAM:
                    self.received += event.data
                else:
                    self.streams.setdefault(event.stream_id, bytearray()).extend(event.data)
            else:
                self.events.append(event)
            event = conn.next_event()


class Sim:
    """Runs a client and a server Peer over a SimNet with a fake clock."""

    def __init__(self, net: SimNet, up: bytes = b"", down: bytes = b"", keys=None,
                 now: float = 0.0) -> None:
        keys = keys or make_keys()
        self.net, self.now = net, now
        self.client = Peer(mt.Connection("client", keys, now, SERVER_ADDR), CLIENT_ADDR, up)
        self.server = Peer(mt.Connection("server", keys, now), SERVER_ADDR, down)
        self.steps = 0
        self.log: list = []  # (time, src, dst) of every datagram, for pacing checks

    def peers(self) -> tuple:
        return self.client, self.server

    def step(self, until: float = float("inf")) -> None:
        """Let both sides send, then jump to the next event (but not past ``until``)."""
        self.steps += 1
        assert self.steps < 500_000, "simulation does not converge"
        for peer in self.peers():
            peer.pump_app()
            for datagram, dst in peer.conn.datagrams_to_send(self.now):
                self.log.append((self.now, peer.addr, dst))
                self.net.send(self.now, datagram, peer.addr, dst)
            peer.pump_app()
        times = [t for t in (self.client.conn.next_timeout(), self.server.conn.next_timeout(),
                             self.net.next_time()) if t is not None]
        assert times, "nothing will ever happen again"
        next_time = min(min(times), until)
        assert next_time >= self.now - 1e-9, "a timer in the past"
        self.now = max(self.now, next_time)
        for datagram, src, dst in self.net.pop_due(self.now):
            for peer in self.peers():
                if peer.addr == dst:
                    peer.conn.receive_datagram(datagram, src, self.now)
        for peer in self.peers():
            peer.pump_app()  # the application sees events at the time they happen

    def run_until(self, done, limit: float) -> None:
        while not done():
            assert self.now < limit, f"not done by t={limit}"
            self.step()

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(until=end)

    def transferred(self) -> bool:
        """Every source (stream 0's and the bulk streams') arrived whole."""
        return all(len(receiver.received) >= len(sender.source)
                   and all(len(receiver.streams.get(stream_id, b"")) >= len(source)
                           for stream_id, (source, _done) in sender.bulk.items())
                   for sender, receiver in ((self.client, self.server),
                                            (self.server, self.client)))

    def assert_intact(self) -> None:
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            assert len(receiver.received) == len(sender.source)
            assert (hashlib.sha256(receiver.received).hexdigest()
                    == hashlib.sha256(sender.source).hexdigest())


def bulk_sim(seed: int = 1, size: int = MB, **net) -> Sim:
    rng = random.Random(seed)
    return Sim(SimNet(seed, **net), random_bytes(rng, size), random_bytes(rng, size),
               keys=make_keys(seed))


def resume(sim: Sim, addr: tuple, keys, server_delay: float = 0.0) -> None:
    """A resume handshake: the client moves to ``addr``, both sides re-key under ``keys``
    and resend from what the other said it has (the server ``server_delay`` later)."""
    client, server = sim.client.conn, sim.server.conn
    client_has, server_has = client.recv_offset(), server.recv_offset()
    sim.client.addr = addr
    client.rekey(keys, server_has, sim.now, SERVER_ADDR)
    sim.run_for(server_delay)
    server.rekey(keys, client_has, sim.now)


def finish(sim: Sim, limit: float) -> None:
    """Run until both streams arrived and everything is acked, then check integrity."""
    sim.run_until(lambda: sim.transferred() and sim.client.conn.all_acked()
                  and sim.server.conn.all_acked(), limit)
    sim.assert_intact()


# ---------------------------------------------------------------------------
# Packet crypto
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cipher", sorted(mt.CIPHERS))
def test_cipher_round_trip_and_size(cipher):
    keys = make_keys(cipher=cipher)
    tx = mt.PacketCipher(keys.client_to_server, cipher, mt.CLIENT_TO_SERVER, keys.conn_id)
    rx = mt.PacketCipher(keys.client_to_server, cipher, mt.CLIENT_TO_SERVER, keys.conn_id)
    payload = b"x" * mt.MAX_PAYLOAD
    datagram = tx.seal(7, payload)
    assert len(datagram) == MAX_DATAGRAM
    assert rx.open(datagram) == (7, payload)
    assert rx.open(datagram) is None, "a replay must be dropped"


def test_cipher_rejects_reflection_other_conn_and_unknown_cipher():
    keys = make_keys()
    client_tx = mt.PacketCipher(keys.client_to_server, keys.cipher, mt.CLIENT_TO_SERVER,
                                keys.conn_id)
    client_rx = mt.PacketCipher(keys.server_to_client, keys.cipher, mt.SERVER_TO_CLIENT,
                                keys.conn_id)
    datagram = client_tx.seal(1, b"hello")
    assert client_rx.open(datagram) is None, "our own packet reflected back must fail"
    # Same key, wrong direction in the nonce: still fails.
    wrong_dir = mt.PacketCipher(keys.client_to_server, keys.cipher, mt.SERVER_TO_CLIENT,
                                keys.conn_id)
    assert wrong_dir.open(datagram) is None
    other_conn = mt.PacketCipher(keys.client_to_server, keys.cipher, mt.CLIENT_TO_SERVER,
                                 bytes(8))
    assert other_conn.open(datagram) is None
    with pytest.raises(ValueError, match="unknown cipher"):
        mt.PacketCipher(keys.client_to_server, "rot13", 0, keys.conn_id)


def test_replay_window_slides_and_stays_small():
    window = mt.ReplayWindow()
    for pn in (5, 3, 4, 1000):
        assert window.fresh(pn)
        window.mark(pn)
    assert not window.fresh(3) and not window.fresh(1000)
    assert window.fresh(999)
    window.mark(1000 + mt.ReplayWindow.WIDTH - 1)
    assert window.fresh(1000 + 1) and not window.fresh(1000), "1000 is still remembered"
    window.mark(2 ** 64 - 1)  # a jump as far as it goes: no huge bitmap
    assert window._bits.bit_length() <= mt.ReplayWindow.WIDTH
    assert not window.fresh(5), "too old to tell: dropped"


# ---------------------------------------------------------------------------
# Whole transfers on the simulated path
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3, 0.5])
def test_one_megabyte_each_way_under_loss(loss):
    sim = bulk_sim(seed=int(loss * 100) + 3, loss=loss)
    finish(sim, limit=120)


def test_reordering_and_duplication():
    sim = bulk_sim(seed=11, jitter=0.03, duplicate=0.2, loss=0.05)
    finish(sim, limit=60)


def test_aes_gcm_transfer():
    rng = random.Random(5)
    sim = Sim(SimNet(5, loss=0.1), random_bytes(rng, 200_000), random_bytes(rng, 200_000),
              keys=make_keys(5, cipher="aes-256-gcm"))
    finish(sim, limit=60)


def test_sixty_second_blackout_mid_transfer():
    sim = bulk_sim(seed=21)
    sim.run_until(lambda: len(sim.client.received) > MB // 4, limit=10)
    start = sim.now
    sim.net.blackout_until = start + 60
    sim.run_for(5)
    sent_before = sim.net.sent
    sim.run_for(55)
    # Backed-off retransmissions (2 s) and outage probes (50/s for 10 s, then 4/s): a trickle
    # of small datagrams (~30 KB in all), not a storm.
    assert sim.net.sent - sent_before < 600
    finish(sim, limit=start + 90)
    assert not sim.client.events
    assert sim.server.events == [mt.PeerAddressChanged(CLIENT_ADDR)], "first contact only"


def test_client_address_change_mid_transfer():
    sim = bulk_sim(seed=31, loss=0.05)
    sim.run_until(lambda: len(sim.server.received) > MB // 3, limit=10)
    sim.client.addr = CLIENT_ADDR2  # e.g. Wi-Fi to LTE: the old address is gone
    finish(sim, limit=60)
    assert sim.server.conn.peer_addr == CLIENT_ADDR2
    assert sim.server.events == [mt.PeerAddressChanged(CLIENT_ADDR),
                                 mt.PeerAddressChanged(CLIENT_ADDR2)]
    assert sim.client.events == [], "the server did not move"


def test_rekey_mid_transfer_loses_and_doubles_nothing():
    sim = bulk_sim(seed=41, loss=0.1)
    sim.run_until(lambda: len(sim.client.received) > MB // 3, limit=30)
    # The network goes away; the client hops to a new address and resumes over a new
    # handshake: each side tells the other what it has received.
    sim.net.blackout_until = sim.now + 15
    sim.run_for(12)
    # The server's session thread applies the re-key a little later.
    resume(sim, CLIENT_ADDR2, make_keys(99), server_delay=0.5)
    finish(sim, limit=sim.now + 60)


def test_stale_old_key_packets_after_rekey_change_nothing():
    sim = bulk_sim(seed=43, size=50_000)
    sim.run_until(lambda: len(sim.server.received) > 10_000, limit=10)
    old = [d for d, _ in sim.client.conn.datagrams_to_send(sim.now)]
    old += [d for d, _ in sim.client.conn.datagrams_to_send(sim.now + 0.2)]
    assert old
    keys = make_keys(77)
    server = sim.server.conn
    server.rekey(keys, sim.client.conn.recv_offset(), sim.now)
    sim.client.conn.rekey(keys, server.recv_offset(), sim.now)
    heard = server.last_heard
    for datagram in old:
        server.receive_datagram(datagram, CLIENT_ADDR2, sim.now + 1)
    assert server.peer_addr == CLIENT_ADDR and server.last_heard == heard
    finish(sim, limit=sim.now + 30)


# ---------------------------------------------------------------------------
# Streams, keepalive, pacing, back-pressure
# ---------------------------------------------------------------------------

def test_an_urgent_stream_overtakes_bulk():
    rng = random.Random(51)
    paste, output = random_bytes(rng, 300_000), random_bytes(rng, 300_000)
    sim = Sim(SimNet(51, loss=0.1), up=paste, down=output)
    for peer in sim.peers():
        peer.conn.open_stream(1, window=4096, urgent=True)
    sim.run_until(lambda: sim.server.events, limit=5)
    assert sim.server.events == [mt.PeerAddressChanged(CLIENT_ADDR)]
    sim.client.conn.send(b"a small message", 1)
    sim.run_until(lambda: sim.server.streams.get(1), limit=5)
    assert sim.server.streams[1] == b"a small message"
    assert len(sim.server.received) < len(paste) // 2, "the message waited behind the paste"
    finish(sim, limit=60)


def test_streams_are_independent_and_resume_exactly():
    """Three streams at once over a lossy path and a resume: stream 0 continues from the
    offsets the handshake carried, the others start over on both sides (their owners write
    again what was not acked), and nothing arrives twice or out of place."""
    rng = random.Random(53)
    sim = bulk_sim(seed=53, size=200_000, loss=0.2)
    for peer in sim.peers():
        peer.conn.open_stream(2, window=64 * 1024)
    sim.client.bulk[2] = [random_bytes(rng, 100_000), 0]
    sim.run_until(lambda: len(sim.server.streams.get(2, b"")) > 20_000, limit=30)
    unacked = sim.client.conn.acked_offset(2)
    resume(sim, CLIENT_ADDR2, make_keys(54))
    # The owner of stream 2 writes again what was not acked before the re-key.
    source = sim.client.bulk[2][0]
    got_before = bytes(sim.server.streams.pop(2))
    sim.client.bulk[2] = [source[unacked:], 0]
    assert got_before.startswith(source[:unacked])
    finish(sim, limit=sim.now + 60)
    assert bytes(sim.server.streams[2]) == source[unacked:]


def test_keystrokes_do_not_wait_behind_another_streams_bulk():
    sim = Sim(SimNet(141, delay=0.025))
    sim.server = EchoPeer(sim.server.conn, SERVER_ADDR)
    for peer in sim.peers():
        peer.conn.open_stream(2, window=32 * 1024)  # ~640 KB/s at this RTT: flows throughout
    keystroke_round_trips(sim, 10)
    # A forwarded port floods stream 2 in both directions meanwhile.
    sim.client.bulk[2] = [b"u" * (4 * MB), 0]
    sim.server.bulk[2] = [b"d" * (4 * MB), 0]
    sim.run_for(0.5)
    times = keystroke_round_trips(sim, 30)
    assert times[len(times) // 2] < 0.1, "within 2 RTT at the median"
    for peer in sim.peers():  # the bulk was flowing all along, and still is
        assert MB // 2 < len(peer.streams[2]) < 4 * MB


def test_data_for_a_stream_not_opened_is_dropped():
    rng = random.Random(57)
    sim = Sim(SimNet(57), up=random_bytes(rng, 10_000))
    sim.client.conn.open_stream(3)  # only the client knows stream 3
    sim.client.conn.send(b"nobody listens", 3)
    sim.run_until(lambda: len(sim.server.received) == 10_000, limit=10)
    sim.run_for(1.0)
    assert not sim.server.streams and sim.client.conn.unacked_bytes(3) == len(b"nobody listens")
    with pytest.raises(ValueError):
        sim.client.conn.open_stream(3)
    with pytest.raises(ValueError):
        sim.client.conn.open_stream(mt.MAX_STREAM_ID + 1)



@pytest.mark.parametrize("outage", [5, 20, 60])
def test_recovery_after_an_outage_takes_one_probe_interval(outage):
    """A key typed during an outage arrives within one outage probe interval plus a couple
    of round trips of the path coming back, however long it was down."""
    sim = Sim(SimNet(77, delay=0.01))
    sim.run_for(2)
    back = sim.now + outage
    sim.net.blackout_until = back
    sim.client.conn.send(b"x")
    sim.run_until(lambda: sim.server.received == b"x" and sim.client.conn.all_acked(),
                  limit=back + 1)
    interval = mt.OUTAGE_PROBE_SECS if outage < mt.OUTAGE_FAST_SECS else mt.OUTAGE_PROBE_SLOW_SECS
    assert sim.now - back <= interval + 4 * 0.01 + 1e-6
    client_sent = sum(1 for t, src, _d in sim.log if src == CLIENT_ADDR and t < back)
    assert client_sent <= (mt.OUTAGE_FAST_SECS / mt.OUTAGE_PROBE_SECS
                           + outage / mt.OUTAGE_PROBE_SLOW_SECS + 40)


def test_keepalive_only_client_pings_and_rtt_converges():
    sim = Sim(SimNet(71, delay=0.05))
    sim.run_for(30)
    client_sent = sum(1 for _t, src, _d in sim.log if src == CLIENT_ADDR)
    server_sent = sum(1 for _t, src, _d in sim.log if src == SERVER_ADDR)
    assert 9 <= client_sent <= 12, "one ping per 3 s when idle"
    assert server_sent == client_sent, "the server only answers"
    for conn in (sim.client.conn, sim.server.conn):
        assert sim.now - conn.last_heard < 3.2
    assert sim.client.conn._rtt.srtt == pytest.approx(0.1, abs=0.005)


def test_an_idle_server_has_no_timer_and_none_for_a_client_that_is_away():
    """The server only answers: idle, it has no deadline at all; with output in flight to a
    client that went away it resends for PEER_AWAY_SECS, then sleeps until the client
    speaks again, and the client's first probe brings the output at once."""
    sim = Sim(SimNet(72, delay=0.02))
    server = sim.server.conn
    sim.run_for(5)
    for _ in range(200):  # every instant of idle pings and their answers
        sim.step(until=sim.now + 10)
        for datagram, dst in server.datagrams_to_send(sim.now):  # the answer, if one is due
            sim.net.send(sim.now, datagram, SERVER_ADDR, dst)
        assert server.next_timeout() is None
    gone = sim.now
    sim.net.blackout_until = gone + 120  # the client's host is asleep or cut off
    sim.server.source = b"output nobody reads"
    sim.run_for(60)
    last_send = max(t for t, src, _d in sim.log if src == SERVER_ADDR)
    assert last_send <= gone + mt.PEER_AWAY_SECS + mt.MAX_BACKOFF_RTO_SECS
    assert server.next_timeout() is None and not server.all_acked()
    sim.run_until(lambda: sim.client.received == b"output nobody reads", limit=gone + 122)
    assert sim.now - (gone + 120) <= mt.OUTAGE_PROBE_SLOW_SECS + 4 * 0.02 + 1e-6


def test_client_pings_until_the_server_hears_it():
    sim = Sim(SimNet(73, delay=0.05), down=b"$ ")
    sim.net.loss = 1.0
    sim.run_for(1.0)
    client_pings = sum(1 for _t, src, _d in sim.log if src == CLIENT_ADDR)
    assert client_pings >= 3, "first-contact pings are retried every RTO, not every 3 s"
    sim.net.loss = 0.0
    sim.run_until(lambda: sim.client.received == b"$ ", limit=2.5)


def test_tiny_writes_cannot_pile_up_flight_records():
    sim = Sim(SimNet(75, delay=0.05))
    sim.run_for(0.5)
    server, now = sim.server.conn, sim.now
    most = 0
    for _ in range(5000):  # one byte at a time into a black hole, 0.1 ms apart
        now += 0.0001
        server.send(b"x")
        server.datagrams_to_send(now)
        most = max(most, len(server._out[mt.FIRST_STREAM]._flight))
    assert most == mt.MAX_FLIGHT_RECORDS


def test_bursts_are_paced():
    rng = random.Random(81)
    sim = Sim(SimNet(81, delay=0.025))
    sim.run_for(1)  # learn the RTT from pings
    sim.server.source = random_bytes(rng, 60_000)  # a full-screen redraw or so
    sim.run_until(lambda: len(sim.client.received) == 60_000, limit=5)
    times = [t for t, src, _d in sim.log if src == SERVER_ADDR and t >= 1]
    same_instant = max(times.count(t) for t in set(times))
    assert len(times) >= 50 and same_instant <= mt.PACING_BURST_PACKETS + 1
    assert max(times) - min(times) > 0.01, "spread out over time"


def test_writable_reflects_the_send_queue_and_window():
    """Little may wait unsent (a Ctrl-C's prompt would queue behind it), and what is unsent
    plus in flight stays within the stream's window."""
    conn = mt.Connection("server", make_keys(), 0.0)
    limit = max(mt.SEND_QUEUE_MIN, conn._send_rate() * mt.SEND_QUEUE_SECS)
    queue = math.ceil(limit)
    assert conn.writable() and conn.send_room() == limit, "the room writable() checks"
    conn.send(b"y" * (queue - 1))
    assert conn.writable() and 0 < conn.send_room() <= 1
    conn.send(b"y")
    assert not conn.writable() and conn.unacked_bytes() == queue and conn.send_room() <= 0
    assert conn.datagrams_to_send(0.0) == [] and conn.next_timeout() is None, "no peer yet"
    sim = bulk_sim(seed=5, size=4 * MB, delay=0.05)
    peak = 0
    while not sim.transferred():
        sim.step()
        assert sim.server.conn.unacked_bytes() <= mt.SEND_WINDOW + 16384
        peak = max(peak, sim.server.conn.unacked_bytes())
    assert peak > mt.SEND_WINDOW // 2


class DatagramSizes:
    """Records the size of every datagram the server sends through ``sim``'s network."""

    def __init__(self, sim: Sim) -> None:
        self.sizes: list = []
        send = sim.net.send

        def recording(now, datagram, src, dst):
            if src == SERVER_ADDR:
                self.sizes.append((now, len(datagram)))
            send(now, datagram, src, dst)

        sim.net.send = recording


def flood_in_reads(sim: Sim, reads: int, size: int = 4096, every: float = 0.0002) -> bytes:
    """The server's application writes ``reads`` pieces of ``size`` bytes, ``every`` seconds
    apart, as a flood arrives from a PTY."""
    sent = bytearray()
    for _ in range(reads):
        piece = os.urandom(size)
        sim.server.conn.send(piece)
        sent += piece
        sim.run_for(every)
    return bytes(sent)


def test_a_flood_in_small_reads_fills_its_datagrams_and_its_tail_follows_soon():
    """Output arriving 4 KiB at a time (a PTY read) fills whole datagrams: a stream that
    filled one lately holds a shorter tail up to CORK_SECS for more, where sending every
    tail alone cost a third more datagrams. The flood's last bytes leave CORK_SECS after
    the last full datagram at most."""
    sim = Sim(SimNet(3, delay=0.001))
    sim.run_for(0.2)
    sizes = DatagramSizes(sim)
    sent = flood_in_reads(sim, 300)
    ended = sim.now
    sim.run_until(lambda: len(sim.client.received) >= len(sent), limit=ended + 1.0)
    assert bytes(sim.client.received) == sent
    full = mt.MAX_DATAGRAM
    data = [(t, n) for t, n in sizes.sizes if n > 200]  # not the bare ACKs
    assert sum(n == full for _, n in data) >= 0.95 * len(data)
    assert max(t for t, _ in data) <= ended + mt.CORK_SECS + 1e-9


def test_a_lone_write_leaves_at_once():
    """A keystroke's echo after a quiet spell, or a prompt after a flood has ended for
    longer than CORK_SECS, is sent the moment it is written."""
    sim = Sim(SimNet(3, delay=0.001))
    sim.run_for(0.2)
    sizes = DatagramSizes(sim)
    for _ in range(2):
        sizes.sizes.clear()
        written = sim.now
        sim.server.conn.send(b"x")
        sim.step()
        assert [t for t, n in sizes.sizes] == [written]
        flood_in_reads(sim, 20)
        sim.run_for(0.1)


def test_tail_loss_is_recovered_by_the_retransmission_timer():
    sim = Sim(SimNet(91, loss=0.0))
    sim.run_for(1)
    sim.net.loss = 1.0
    sim.client.conn.send(b"ls\r")
    sent_at = sim.now
    sim.run_for(0.01)
    sim.net.loss = 0.0
    sim.run_until(lambda: sim.server.received == b"ls\r", limit=3)
    assert sim.now - sent_at < 0.3, "resent after one RTO (~3 RTT here)"


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------

def snapshot(conn: mt.Connection) -> tuple:
    return (conn.peer_addr, conn.last_heard, conn.recv_offset(), conn.acked_offset(),
            conn._rx.replay.largest, len(conn._events))


@pytest.fixture(scope="module")
def live_pair():
    """A server that has heard a client, plus datagrams the client legitimately sent and
    datagrams the server itself sent (to reflect back at it)."""
    sim = Sim(SimNet(101), up=b"hello" * 100, down=b"world" * 100)
    sim.run_until(lambda: len(sim.server.received) == 500, limit=5)
    sim.server.conn.send(b"more output")
    reflected = [d for d, _ in sim.server.conn.datagrams_to_send(sim.now + 0.1)]
    captured = [d for d, _ in sim.client.conn.datagrams_to_send(sim.now + 5)]
    assert reflected and captured
    return sim, captured, reflected


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_garbage_is_dropped_without_effect(live_pair, data):
    sim, captured, reflected = live_pair
    server = sim.server.conn
    before = snapshot(server)
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped", "replayed",
                                      "reflected"]))
    if kind == "random":
        datagram = data.draw(st.binary(max_size=1500))
    elif kind == "reflected":
        datagram = data.draw(st.sampled_from(reflected))
    else:
        real = data.draw(st.sampled_from(captured))
        if kind == "truncated":
            datagram = real[:data.draw(st.integers(0, len(real) - 1))]
        elif kind == "flipped":
            pos = data.draw(st.integers(0, len(real) - 1))
            bit = 1 << data.draw(st.integers(0, 7))
            datagram = real[:pos] + bytes([real[pos] ^ bit]) + real[pos + 1:]
        else:
            datagram = real
            server.receive_datagram(real, CLIENT_ADDR, sim.now)  # the first copy may be new
            before = snapshot(server)
    server.receive_datagram(datagram, CLIENT_ADDR2, sim.now + 7)
    assert snapshot(server) == before
    assert server.next_event() is None


def authentic(conn_keys, pn: int, frames: bytes) -> bytes:
    """A datagram as the client would seal it: right key, so it authenticates."""
    tx = mt.PacketCipher(conn_keys.client_to_server, conn_keys.cipher, mt.CLIENT_TO_SERVER,
                         conn_keys.conn_id)
    return tx.seal(pn, frames)


def frame(ftype: int, body: bytes) -> bytes:
    return mt.FRAME.pack(ftype, len(body)) + body


def data_frame(stream: int, offset: int, payload: bytes) -> bytes:
    return frame(mt.FRAME_DATA, mt.DATA_HEADER.pack(stream, offset) + payload)


def test_frame_encoder_and_decoder_agree_with_the_wire_format():
    ping, data = mt.encode_frame(mt.FRAME_PING, b""), data_frame(7, 2 ** 40, b"payload")
    assert ping == b"\x03\x00\x00"
    assert mt.data_frame_header(7, 2 ** 40, 7) + b"payload" == data
    packet = ping + data + frame(200, b"future") + data[:-1]  # the last one cut short
    found = [(ftype, packet[start:end]) for ftype, start, end in mt.decode_frames(packet)]
    assert found == [(mt.FRAME_PING, b""), (mt.FRAME_DATA, data[mt.FRAME.size:]),
                     (200, b"future")]


def test_authenticated_spray_cannot_grow_memory():
    keys = make_keys(111)
    server = mt.Connection("server", keys, 0.0)
    server.open_stream(1, window=4096, urgent=True)
    server.send(b"z" * 100_000)
    rng = random.Random(111)
    for i in range(5000):
        pn = i + 1
        offset = rng.choice([rng.randrange(2 ** 64 - 2000), rng.randrange(1, 10 ** 6),
                             2 * i + 1])
        frames = data_frame(0, offset, b"a" * rng.randrange(1, 500))
        frames += data_frame(1, offset, b"b" * rng.randrange(1, 100))
        frames += data_frame(rng.randrange(2, 256), 0, b"c" * 50)  # streams unknown to us
        gaps = b"".join(mt.GAP.pack(g * 3, 1) for g in range(255))
        frames += frame(mt.FRAME_ACK, mt.ACK_HEADER.pack(0, pn, 0, rng.randrange(2 ** 64),
                                                         2 ** 32 - 1, 255) + gaps)
        frames += frame(200, b"future frame type")
        server.receive_datagram(authentic(keys, pn, frames[:mt.MAX_PAYLOAD]), CLIENT_ADDR,
                                0.001 * i)
        server.datagrams_to_send(0.001 * i)
    first_in = server._in[mt.FIRST_STREAM]
    assert first_in.buffered() <= mt.SEND_WINDOW
    assert len(first_in._starts) <= mt.MAX_REORDER_SEGMENTS
    assert server._in[1].buffered() <= 4096
    assert server.acked_offset() == 0, "impossible acks are ignored"
    # Gap lists at the cap are accepted, and a huge packet number does not blow up.
    server.receive_datagram(authentic(keys, 2 ** 64 - 1, frame(mt.FRAME_PING, b"")),
                            CLIENT_ADDR, 10.0)
    assert server._rx.replay._bits.bit_length() <= mt.ReplayWindow.WIDTH
    assert len(server._events) <= 1 + 5000


def test_reorder_buffer_keeps_only_the_window():
    stream = mt.RecvStream(window=1000)
    stream.receive(2000, b"x" * 5000)  # wholly beyond the window
    stream.receive(500, b"y" * 5000)  # partly beyond
    stream.receive(100, b"z" * 50)
    stream.receive(120, b"w" * 100)  # overlaps what is held: only the new part is kept
    assert stream.buffered() == 500 + 50 + 70
    assert stream.ack_ranges() == (0, 1000, [(0, 100), (220, 500)], False)
    data, how = stream.receive(0, b"a" * 600)
    assert how == stream.IN_ORDER and data == b"a" * 600 + b"y" * 400
    assert stream.offset == 1000 and stream.buffered() == 0
    assert stream.receive(0, b"a")[1] == stream.DUPLICATE


def test_acks_with_many_gaps_keep_retransmit_state_bounded():
    keys = make_keys(121)
    sim = Sim(SimNet(121), keys=keys, down=b"q" * 200_000)
    sim.run_for(0.3)
    server = sim.server.conn
    sent = server._out[mt.FIRST_STREAM].next_new
    assert sent > 100_000
    gaps = b"".join(mt.GAP.pack(g * 90 + 1, 50) for g in range(mt.MAX_ACK_RANGES))
    for pn in range(10 ** 6, 10 ** 6 + 300):
        ack = mt.ACK_HEADER.pack(0, server._next_pn - 1, 0, 0, 90 * mt.MAX_ACK_RANGES,
                                 mt.MAX_ACK_RANGES)
        server.receive_datagram(authentic(keys, pn, frame(mt.FRAME_ACK, ack + gaps)),
                                CLIENT_ADDR, sim.now)
        server.datagrams_to_send(sim.now)
    assert len(server._out[mt.FIRST_STREAM]._retx) <= 2 * mt.MAX_ACK_RANGES + 2
    assert len(server._out[mt.FIRST_STREAM]._flight) <= mt.SEND_WINDOW // 500


def test_an_ack_reports_the_lowest_gaps_that_fit_in_its_packet():
    stream = mt.RecvStream(window=mt.SEND_WINDOW)
    for piece in range(600):  # 600 gaps: more than a 1200-byte packet can report
        stream.receive(piece * 200 + 100, b"x" * 100)
    clock = mt.AckClock(0.0)
    clock.owe(mt.FIRST_STREAM)
    (small,) = clock.frames(0.0, {mt.FIRST_STREAM: stream}, mt.MAX_PAYLOAD)
    assert len(small) <= mt.MAX_PAYLOAD
    cum, span, count = mt.ACK_HEADER.unpack_from(small, mt.FRAME.size)[3:]
    assert count & mt.MORE_GAPS, "it says that it left gaps out"
    count &= ~mt.MORE_GAPS
    assert count == (mt.MAX_PAYLOAD - mt.FRAME.size - mt.ACK_HEADER.size) // mt.GAP.size
    assert (cum, span) == (0, count * 200), "the region ends where the first unreported gap starts"
    clock.owe(mt.FIRST_STREAM)
    (large,) = clock.frames(0.0, {mt.FIRST_STREAM: stream}, mt.LARGEST_DATAGRAM)
    cum, span, count = mt.ACK_HEADER.unpack_from(large, mt.FRAME.size)[3:]
    assert (cum, span, count) == (0, 600 * 200, 600), "all of them fit, nothing left out"


def sent_stream(records: int) -> mt.SendStream:
    """A stream with ``records`` records of 1000 bytes in flight, packets 0 on."""
    stream = mt.SendStream(mt.FIRST_STREAM, mt.SEND_WINDOW)
    stream.write(b"d" * 1000 * records)
    for pn in range(records):
        stream.take(pn, 0.0, 1000)
    return stream


def test_no_loss_is_inferred_above_the_region_an_ack_reports_when_it_left_gaps_out():
    """Records old enough to be declared lost, but above the ACK's region, stay in flight
    when the peer says it holds more than it reported (it reported only the gaps that fit)."""
    stream = sent_stream(10)
    # The peer lacks [1000, 2000) and reports the region [0, 3000) only; it has packet 9.
    result = stream.on_ack(0, 3000, [(1000, 2000)], 9, lost_before=1.0, more=True)
    _acked, resolved, lost, _lost_sent, _delivered = result
    assert (resolved, lost) == (3, 1)
    assert stream._retx == [[1000, 2000]], "only the reported gap is resent"
    assert stream.in_flight == 7000, "the rest waits for an ACK that covers it"
    result = stream.on_ack(0, 10_000, [(1000, 2000)], 9, lost_before=1.0)
    assert result[1:3] == (7, 0) and stream.in_flight == 0


def test_data_above_a_complete_acks_region_is_lost_like_a_gap():
    """Without gaps left out, the region ends where the peer's data ends: newer packets
    acked (retransmissions of older data, say) make the records above it lost."""
    stream = sent_stream(10)
    result = stream.on_ack(0, 3000, [(1000, 2000)], 9, lost_before=1.0)
    assert result[1:3] == (9, 7), "packets 1 and 3-8 lost; 9, the newest, not yet"
    assert stream._retx == [[1000, 2000], [3000, 9000]]


def test_rekey_with_an_impossible_offset_is_clamped(caplog):
    conn = mt.Connection("server", make_keys(), 0.0)
    conn.send(b"abc")
    conn.rekey(make_keys(2), 10, 1.0)
    assert conn.acked_offset() == conn.send_offset() == 3 and conn.all_acked()
    assert "clamped" in caplog.text


class EchoPeer(Peer):
    """A server application that sends back whatever it receives (like a shell echoing)."""

    def pump_app(self) -> None:
        before = len(self.received)
        super().pump_app()
        if len(self.received) > before:
            self.conn.send(bytes(self.received[before:]))


def keystroke_round_trips(sim: Sim, count: int) -> list:
    times = []
    for _ in range(count):
        start, want = sim.now, len(sim.client.received) + 1
        sim.client.conn.send(b"k")
        sim.run_until(lambda want=want: len(sim.client.received) >= want, limit=start + 10)
        times.append(sim.now - start)
        sim.run_for(0.05)
    return sorted(times)


@pytest.mark.parametrize("loss", [0.0, 0.3])
def test_keystroke_round_trip_stays_near_one_rtt(loss):
    sim = Sim(SimNet(131, delay=0.025, loss=loss))
    sim.server = EchoPeer(sim.server.conn, SERVER_ADDR)
    keystroke_round_trips(sim, 30)  # learn the RTT and the loss rate
    sent_before = sim.net.sent
    times = keystroke_round_trips(sim, 200)
    median = times[len(times) // 2]
    assert median < 0.1, "within 2 RTT at the median"
    per_keystroke = (sim.net.sent - sent_before) / 200
    if loss:
        assert median < 0.06
    else:
        assert median == pytest.approx(0.05) and per_keystroke <= 3.5, "no redundancy needed"


@pytest.mark.parametrize("side", ["client", "server"])
def test_used_up_packet_numbers_mean_silence_until_a_rekey(side):
    """A side whose packet numbers reach the limit never seals one at or past it: it falls
    silent and stops counting what it hears as contact (so the session's silence rule starts
    a resume handshake); the re-key restarts the numbers and every byte still arrives."""
    sim = bulk_sim(seed=61, size=300_000, delay=0.02)
    sim.run_until(lambda: len(sim.client.received) > 50_000, limit=10)
    peer = getattr(sim, side)
    peer.conn._next_pn = mt.PACKET_NUMBER_LIMIT - 40
    numbers = []
    send = sim.net.send

    def tap(now, datagram, src, dst):
        if src == peer.addr:
            numbers.append(mt.HEADER.unpack_from(datagram)[2])
        send(now, datagram, src, dst)

    sim.net.send = tap
    sim.run_for(1.0)
    assert peer.conn.keys_exhausted() and peer.conn.next_timeout() is None
    assert mt.PACKET_NUMBER_LIMIT - 40 <= max(numbers) < mt.PACKET_NUMBER_LIMIT
    heard, sent = peer.conn.last_heard, len(numbers)
    sim.run_for(2.0)
    assert len(numbers) == sent, "silent"
    assert peer.conn.last_heard == heard < sim.now - 2, "what it hears is not contact"
    assert not sim.transferred()
    resume(sim, CLIENT_ADDR, make_keys(62))
    assert not peer.conn.keys_exhausted()
    finish(sim, limit=sim.now + 30)
    assert max(numbers[sent:]) < 10_000, "numbering restarted under the new keys"
