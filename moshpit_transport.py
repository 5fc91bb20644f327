"""moshpit transport: encrypted UDP packets carrying reliable byte streams.

Three layers, each using only those above it:

1. Packet crypto (``PacketCipher``): every datagram is ``flags | conn_id | packet number``
   followed by an AEAD ciphertext of the frames, with the header as associated data and a
   nonce made of the direction and the packet number.  Packet numbers never repeat under a
   key (a retransmission is a new packet) and a sliding window drops replays.

2. Reliable streams (``Connection``, sans-IO): the frames inside a packet carry stream data
   addressed by byte offset, acknowledgements (cumulative offset + gap list), and pings.
   Stream 0 is the terminal; stream 1 carries control messages (resize, close, shutdown)
   and is always served first.  The caller feeds datagrams and the time in, and takes
   datagrams, timer deadlines and events out; nothing here sleeps or touches a socket.

3. I/O glue (``UdpLink``): a non-blocking UDP socket plus a Connection, for select loops.

Wire format (all integers big-endian)::

    datagram  = flags:u8 (=1) | conn_id:8 | pn:u64 | AEAD(frames, aad = the 17 header bytes)
    nonce     = direction:u32 (0 client->server, 1 server->client) | pn:u64
    frame     = type:u8 | length:u16 | body         (unknown types are skipped by length)
    DATA  (1) = stream:u8 | offset:u64 | bytes
    ACK   (2) = stream:u8 | largest_pn:u64 | ack_delay_us:u32 | cum:u64 | high-cum:u32
                | n:u8 | n x (gap_start-cum:u32, gap_length:u32)
    PING  (3) = (empty)   the client pings when idle; the server answers with an ACK at once
    PATH_CHALLENGE (4) = data:8   "prove you receive at this address": answered at once ...
    PATH_RESPONSE  (5) = data:8   ... to the address the challenge came from, echoing data
    PADDING (6) = zeros   fills the client's first pings under new keys to a full datagram
    control message on stream 1 = type:u8 | length:u8 | body
      RESIZE (1) rows:u16 cols:u16 | CLOSE (2) status:i32 final_offset:u64 | SHUTDOWN (3) utf-8

Timers, acks and losses, in short: the receiver acks every 4th ack-eliciting packet or within
10 ms, and at once when data arrives out of order, twice, or on the control stream, or for a
ping.  Every ACK names the largest packet number received and how long the ack was held, so
each ack yields a clean RTT sample (Jacobson/Karels; no retransmission ambiguity).  A sender
declares a packet's data lost when a packet sent 3 later, or 9/8 RTT later, was acked while
that data is still in a reported gap, and resends it at once.  Data unacked past the RTO
(clamped to 50 ms..1 s, doubled per repeated timeout up to 2 s) is resent too: on a first
timeout only what expired, on a repeat (an outage) everything, two packets at a time.
A congestion window (slow start, x0.7 per loss round, >= 16 packets) sets a pacing rate,
so bursts leave spread out; on a lossy path, small packets (keystrokes, echoes) are sent
twice so that a round trip usually needs no retransmission.  While the server is silent,
the client probes with pings every 20 ms (every 250 ms after 10 s), so a session recovers
within one probe interval of an outage ending, whatever the backed-off timers say.

Roaming and path validation (as QUIC does): replies go to the peer's validated address.  An
authentic, fresh packet from another address does not move them at once (anyone on the path
can replay a captured datagram from anywhere): the new address gets a PATH_CHALLENGE, and
becomes the peer's address once a PATH_RESPONSE echoing it comes back from there.  Until
then that address receives at most 3x the bytes that came from it (challenges, and copies
of what goes to the old address, so a genuine roam gets its output within a round trip,
validation or not).  The server's first address (no earlier one to keep using) is adopted
at once under the same 3x limit; the client pads its first packets to a full datagram so
that the limit covers a screenful.
"""

from __future__ import annotations

import bisect
import errno
import logging
import secrets
import socket
import struct
from collections import deque
from typing import NamedTuple, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from moshpit import MAX_DATAGRAM

log = logging.getLogger("moshpit.transport")

# ---------------------------------------------------------------------------
# Packet crypto
# ---------------------------------------------------------------------------

PACKET_FLAGS = 0x01  # packet format 1; another value is a different (future) format
HEADER = struct.Struct("!B8sQ")
NONCE = struct.Struct("!IQ")
TAG_SIZE = 16
OVERHEAD = HEADER.size + TAG_SIZE
MAX_PAYLOAD = MAX_DATAGRAM - OVERHEAD  # plaintext frames per datagram
CLIENT_TO_SERVER, SERVER_TO_CLIENT = 0, 1
CIPHERS = {"chacha20-poly1305": ChaCha20Poly1305, "aes-256-gcm": AESGCM}


class ReplayWindow:
    """Which of the last ``WIDTH`` packet numbers were already accepted (a bitmap in an int).

    Anything older than the window, or seen before, is a replay or a duplicate: dropped.
    """

    WIDTH = 1024
    _MASK = (1 << WIDTH) - 1

    def __init__(self) -> None:
        self.largest = -1
        self._bits = 0  # bit i set = packet number (largest - i) seen

    def fresh(self, pn: int) -> bool:
        """True if ``pn`` was never accepted and is not too old to tell."""
        if pn > self.largest:
            return True
        age = self.largest - pn
        return age < self.WIDTH and not (self._bits >> age) & 1

    def mark(self, pn: int) -> None:
        """Remember ``pn`` (call only after it authenticated)."""
        if pn > self.largest:
            shift = pn - self.largest
            # A huge jump must not build a huge int: past the width nothing old survives.
            self._bits = ((self._bits << shift) | 1) & self._MASK if shift < self.WIDTH else 1
            self.largest = pn
        else:
            self._bits |= 1 << (self.largest - pn)


class PacketCipher:
    """Seals or opens the datagrams of one direction under one key.

    ``direction`` (CLIENT_TO_SERVER or SERVER_TO_CLIENT) goes into every nonce; with one
    key per direction a packet reflected back at its sender cannot authenticate.  ``open``
    rejects anything malformed, foreign (other conn_id), forged or replayed by returning
    None, cheaply: the length, flags, conn_id and replay checks come before the AEAD.
    """

    def __init__(self, key: bytes, cipher: str = "chacha20-poly1305", direction: int = 0,
                 conn_id: bytes = bytes(8)) -> None:
        try:
            aead_class = CIPHERS[cipher]
        except KeyError:
            raise ValueError(f"unknown cipher {cipher!r} (use one of {sorted(CIPHERS)})") from None
        if len(conn_id) != 8:
            raise ValueError("conn_id must be 8 bytes")
        self._aead = aead_class(key)
        self._direction = direction
        self.conn_id = bytes(conn_id)
        self.replay = ReplayWindow()

    def seal(self, pn: int, payload: bytes) -> bytes:
        """The datagram carrying ``payload`` as packet number ``pn`` (caller never reuses it)."""
        header = HEADER.pack(PACKET_FLAGS, self.conn_id, pn)
        return header + self._aead.encrypt(NONCE.pack(self._direction, pn), payload, header)

    def open(self, datagram: bytes) -> Optional[tuple[int, bytes]]:
        """``(pn, plaintext)`` for an authentic, fresh datagram; None for anything else."""
        if not OVERHEAD <= len(datagram) <= MAX_DATAGRAM or datagram[0] != PACKET_FLAGS:
            return None
        flags, conn_id, pn = HEADER.unpack_from(datagram)
        if conn_id != self.conn_id or not self.replay.fresh(pn):
            return None
        try:
            plaintext = self._aead.decrypt(NONCE.pack(self._direction, pn),
                                           datagram[HEADER.size:], datagram[:HEADER.size])
        except InvalidTag:
            return None
        self.replay.mark(pn)
        return pn, plaintext


# ---------------------------------------------------------------------------
# Reliable streams (sans-IO)
# ---------------------------------------------------------------------------

FRAME = struct.Struct("!BH")
DATA_HEADER = struct.Struct("!BQ")
ACK_HEADER = struct.Struct("!BQIQIB")
GAP = struct.Struct("!II")
FRAME_DATA, FRAME_ACK, FRAME_PING = 1, 2, 3
FRAME_PATH_CHALLENGE, FRAME_PATH_RESPONSE, FRAME_PADDING = 4, 5, 6
PATH_DATA_SIZE = 8  # random bytes a challenge carries and its response echoes
DATA_OVERHEAD = FRAME.size + DATA_HEADER.size
MAX_STREAM_CHUNK = MAX_PAYLOAD - DATA_OVERHEAD

STREAM_TERMINAL, STREAM_CONTROL = 0, 1
CTRL_HEADER = struct.Struct("!BB")
CTRL_RESIZE, CTRL_CLOSE, CTRL_SHUTDOWN = 1, 2, 3
RESIZE_BODY = struct.Struct("!HH")
CLOSE_BODY = struct.Struct("!iQ")
MAX_REASON = 255

SEND_WINDOW = 256 * 1024  # per stream: unacked + queued bytes before writable() is False
CONTROL_WINDOW = 4096
MAX_REORDER_SEGMENTS = 1024  # out-of-order pieces a receiver buffers per stream
MAX_ACK_RANGES = 32  # gaps reported per ACK frame (the first ones above the cum. offset)
MAX_FLIGHT_RECORDS = 1024  # packets in flight per stream, however small their data

ACK_EVERY = 4  # ack-eliciting packets received before an ACK goes out at once
ACK_DELAY = 0.010  # otherwise an ACK leaves at most this late
KEEPALIVE = 3.0  # the client pings after this long without sending anything ack-eliciting
# Outage probing: once a packet the client sent has gone unanswered for longer than an RTO,
# it pings every OUTAGE_PROBE for the first OUTAGE_FAST_SECS of the silence, then every
# OUTAGE_PROBE_SLOW. The session recovers within one probe interval (plus a round trip) of
# the path coming back, instead of waiting out backed-off retransmission timers; mosh probes
# about as often. Each probe is one ~50-byte datagram.
OUTAGE_PROBE, OUTAGE_FAST_SECS, OUTAGE_PROBE_SLOW = 0.02, 10.0, 0.25
PACKET_THRESHOLD = 3  # a packet is lost once one sent this many later was acked ...
TIME_THRESHOLD = 9 / 8  # ... or one sent this many RTTs later
INITIAL_RTT = 0.1
MIN_RTO, MAX_RTO, MAX_BACKOFF_RTO = 0.05, 1.0, 2.0
MSS = MAX_STREAM_CHUNK
INITIAL_CWND, MIN_CWND, MAX_CWND = 32 * MSS, 16 * MSS, 1024 * 1024
TIMEOUT_CWND = 2 * MSS  # after repeated timeouts (an outage): probe gently, then slow start
LOSS_BETA = 0.7
PACING_BURST = 10 * MAX_DATAGRAM  # what may leave back to back ...
PACING_QUANTUM = 0.001  # ... or this much time's worth at the pacing rate, if more
MAX_BATCH = 64  # datagrams per datagrams_to_send() call, so the caller gets to read too
SENT_RING = 4096  # send times remembered, by packet number, for RTT samples
SMALL_PACKET = 256  # stream data this small is sent twice when the path is lossy ...
LOSSY = 0.05  # ... i.e. when this fraction of our packets were found lost recently
AMPLIFICATION_FACTOR = 3  # bytes sent to an unvalidated address per byte received from it
CHALLENGES_KEPT = 4  # recent challenges to an address that a response may answer
PENDING_RESPONSES = 4  # challenges answered per flush; more in between are dropped
CHALLENGE_DATAGRAM = OVERHEAD + FRAME.size + PATH_DATA_SIZE  # and a response's size


class DataReceived(NamedTuple):
    """In-order bytes of the peer's terminal stream."""

    data: bytes


class ResizeRequested(NamedTuple):
    """The client's terminal size changed."""

    rows: int
    cols: int


class SessionClosed(NamedTuple):
    """The shell exited with this status; all its output has been delivered before this."""

    exit_status: int


class ShutdownReceived(NamedTuple):
    """The peer is ending the session for ``reason`` (client quit, server stopping)."""

    reason: str


class PeerAddressChanged(NamedTuple):
    """Replies go to ``addr`` from now on: the peer's first address, or a new one that
    answered a path challenge (see PathProbe)."""

    addr: tuple


class RttEstimator:
    """Smoothed RTT and variance (Jacobson/Karels) and the retransmission timeout from them."""

    def __init__(self) -> None:
        self.srtt = INITIAL_RTT
        self.rttvar = INITIAL_RTT / 2
        self.latest = INITIAL_RTT
        self.min_rtt = float("inf")
        self._sampled = False

    def sample(self, rtt: float, ack_delay: float) -> None:
        """Fold in one measurement; the peer's ack delay is removed when that is plausible."""
        self.min_rtt = min(self.min_rtt, rtt)
        if rtt - ack_delay >= self.min_rtt:
            rtt -= ack_delay
        self.latest = rtt
        if not self._sampled:
            self._sampled = True
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def rto(self) -> float:
        """Retransmission timeout, allowing for the peer's ack delay, clamped like mosh."""
        rto = self.srtt + max(4 * self.rttvar, 0.001) + ACK_DELAY
        return min(max(rto, MIN_RTO), MAX_RTO)


class CongestionWindow:
    """How many bytes may be in flight, and the pacing rate that spreads them over an RTT.

    Slow start doubles the window per RTT; a loss round multiplies it by LOSS_BETA (once
    per round: only losses of packets sent after the last cut count), but not below 16
    packets: random loss on Wi-Fi or LTE is not congestion.  Repeated retransmission
    timeouts (an outage) drop it to two packets, to probe gently, then slow start again.
    """

    def __init__(self) -> None:
        self.cwnd = float(INITIAL_CWND)
        self.ssthresh = float("inf")
        self._recovery_start = float("-inf")

    def on_acked(self, nbytes: int) -> None:
        if self.cwnd < self.ssthresh:
            self.cwnd += nbytes
        else:
            self.cwnd += MSS * nbytes / self.cwnd
        self.cwnd = min(self.cwnd, MAX_CWND)

    def on_loss(self, sent_at: float, now: float) -> None:
        if sent_at > self._recovery_start:
            self._recovery_start = now
            self.cwnd = self.ssthresh = max(MIN_CWND, self.cwnd * LOSS_BETA)

    def on_timeout(self, now: float) -> None:
        self._recovery_start = now
        self.ssthresh = max(MIN_CWND, self.cwnd * LOSS_BETA)
        self.cwnd = TIMEOUT_CWND

    def pacing_rate(self, srtt: float) -> float:
        """Bytes per second: twice the window per RTT in slow start, 1.25 times after."""
        gain = 2.0 if self.cwnd < self.ssthresh else 1.25
        return gain * self.cwnd / max(srtt, 1e-4)


class Pacer:
    """Token bucket that lets a burst of PACING_BURST bytes out, then paces at the rate."""

    def __init__(self, now: float) -> None:
        self._tokens = float(PACING_BURST)
        self._stamp = now

    def refill(self, now: float, rate: float) -> None:
        if now > self._stamp:
            cap = max(PACING_BURST, rate * PACING_QUANTUM)
            self._tokens = min(cap, self._tokens + (now - self._stamp) * rate)
            self._stamp = now

    def ready(self) -> bool:
        return self._tokens > 0

    def spend(self, nbytes: int) -> None:
        self._tokens -= nbytes

    def next_send_time(self, rate: float) -> float:
        """When the bucket is positive again (now, if it is)."""
        if self._tokens > 0:
            return self._stamp
        return self._stamp + (1 - self._tokens) / rate


def _merge_range(ranges: list, start: int, end: int) -> None:
    """Insert [start, end) into a sorted list of disjoint [s, e] pairs, merging overlaps."""
    i = bisect.bisect_left(ranges, [start, start])
    if i and ranges[i - 1][1] >= start:
        i -= 1
        start = ranges[i][0]
    j = i
    while j < len(ranges) and ranges[j][0] <= end:
        end = max(end, ranges[j][1])
        j += 1
    ranges[i:j] = [[start, end]]


class SendStream:
    """Outgoing bytes of one stream: buffer, flight records, retransmission ranges.

    ``base`` is the cumulative ack (everything below is freed), ``next_new`` the first byte
    never sent, ``end`` the bytes written so far.  Each transmission leaves a record
    ``(pn, start, end, sent_at)`` in send order; the byte ranges of live records never
    overlap, so a record leaves the flight exactly once: acked, or declared lost and its
    unreceived part queued in ``_retx`` (sent before new data, as a new packet).
    """

    def __init__(self, stream_id: int, window: int) -> None:
        self.stream_id = stream_id
        self.window = window
        self.base = 0
        self.next_new = 0
        self.in_flight = 0
        self._buf = bytearray()
        self._retx: list = []
        self._flight: deque = deque()
        self._received: list = []  # flat [s0, e0, s1, e1, ...] received above base (last ACK)

    @property
    def end(self) -> int:
        return self.base + len(self._buf)

    def write(self, data: bytes) -> None:
        self._buf += data

    def unacked(self) -> int:
        return len(self._buf)

    def has_room(self, cwnd: float) -> bool:
        """Whether the congestion window (bytes, and records) allows another packet."""
        return self.in_flight < cwnd and len(self._flight) < MAX_FLIGHT_RECORDS

    def has_pending(self) -> bool:
        """Anything to retransmit, or new data within the window."""
        return bool(self._retx) or self.next_new < min(self.end, self.base + self.window)

    def oldest_sent(self) -> Optional[float]:
        return self._flight[0][3] if self._flight else None

    def take(self, pn: int, now: float, max_len: int) -> Optional[tuple[int, bytes]]:
        """Up to ``max_len`` bytes to send in packet ``pn``: retransmissions first."""
        retx = self._retx
        while retx:
            start, stop = retx[0]
            start = max(start, self.base)
            if start >= stop:
                del retx[0]
                continue
            stop = min(stop, start + max_len)
            if stop == retx[0][1]:
                del retx[0]
            else:
                retx[0][0] = stop
            return self._record(pn, now, start, stop)
        start = self.next_new
        stop = min(self.end, self.base + self.window, start + max_len)
        if stop <= start:
            return None
        self.next_new = stop
        return self._record(pn, now, start, stop)

    def _record(self, pn: int, now: float, start: int, stop: int) -> tuple[int, bytes]:
        self._flight.append((pn, start, stop, now))
        self.in_flight += stop - start
        return start, bytes(self._buf[start - self.base:stop - self.base])

    def on_ack(self, cum: int, high: int, gaps: list, largest_acked: int, lost_before: float
               ) -> Optional[tuple[int, int, int, float]]:
        """Apply an ACK: (bytes newly acked, records resolved, of which lost, newest lost's time).

        ``gaps`` are the [start, end) ranges below ``high`` the peer still misses.  Records
        sent PACKET_THRESHOLD packets before ``largest_acked``, or before ``lost_before``,
        whose data is still missing, are lost.  None if the ACK is impossible (acks bytes
        never written): it is ignored.
        """
        if not cum <= high <= self.end:
            return None
        acked = 0
        if cum > self.base:
            acked = cum - self.base
            del self._buf[:acked]
            self.base = cum
            self.next_new = max(self.next_new, cum)
        received = self._received = []
        cur = cum
        for start, stop in gaps:
            if start > cur:
                received += (cur, start)
            cur = stop
        if high > cur:
            received += (cur, high)
        resolved, lost, lost_sent = 0, 0, 0.0
        pn_cutoff = largest_acked - PACKET_THRESHOLD
        flight = self._flight
        while flight:
            pn, start, stop, sent_at = flight[0]
            if stop > cum:
                if pn <= pn_cutoff or (pn < largest_acked and sent_at <= lost_before):
                    if self._queue_missing(start, stop):
                        lost, lost_sent = lost + 1, sent_at
                elif not self._is_received(start, stop):
                    break
            flight.popleft()
            self.in_flight -= stop - start
            resolved += 1
        return acked, resolved, lost, lost_sent

    def on_timeout(self, now: float, rto: float) -> tuple[int, float]:
        """The retransmission timer fired: records sent ``rto`` or more before ``now`` are lost
        (all of them for ``rto`` = -inf).

        Returns (how many, send time of the newest of them).
        """
        lost, lost_sent = 0, 0.0
        flight = self._flight
        while flight and flight[0][3] + rto <= now:  # the deadline's own arithmetic
            _pn, start, stop, lost_sent = flight.popleft()
            self.in_flight -= stop - start
            self._queue_missing(start, stop)
            lost += 1
        return lost, lost_sent

    def _is_received(self, start: int, stop: int) -> bool:
        """Whether the last ACK showed [start, stop) (above ``base``) as received."""
        received = self._received
        i = bisect.bisect_right(received, start)
        return i % 2 == 1 and stop <= received[i]

    def _queue_missing(self, start: int, stop: int) -> bool:
        """Queue the parts of [start, stop) the peer lacks for retransmission; any queued?"""
        cur = max(start, self.base)
        received = self._received
        queued = False
        i = bisect.bisect_right(received, cur)
        if i % 2:  # cur lies inside a received interval: skip to its end
            cur = received[i]
            i += 1
        while cur < stop:
            hole_end = min(stop, received[i]) if i < len(received) else stop
            if hole_end > cur:
                _merge_range(self._retx, cur, hole_end)
                queued = True
            if i + 1 >= len(received):
                break
            cur = received[i + 1]
            i += 2
        return queued

    def restart(self, offset: int) -> None:
        """After a re-key: forget the flight and resend everything from ``offset``."""
        offset = min(max(offset, self.base), self.end)
        del self._buf[:offset - self.base]
        self.base = self.next_new = offset
        self._retx, self._received, self.in_flight = [], [], 0
        self._flight.clear()


class RecvStream:
    """Incoming bytes of one stream: in-order delivery plus a bounded reorder buffer.

    Only bytes in [offset, offset + window) are kept, in at most MAX_REORDER_SEGMENTS
    non-overlapping pieces, so memory stays under the window whatever a peer sends.
    """

    IN_ORDER, OUT_OF_ORDER, DUPLICATE = 0, 1, 2

    def __init__(self, window: int) -> None:
        self.window = window
        self.offset = 0
        self._starts: list = []
        self._pieces: dict = {}

    def buffered(self) -> int:
        return sum(len(p) for p in self._pieces.values())

    def receive(self, start: int, data: bytes) -> tuple[bytes, int]:
        """Take a segment; returns (bytes now deliverable in order, how it arrived)."""
        offset = self.offset
        stop = min(start + len(data), offset + self.window)
        if stop <= offset:
            return b"", self.DUPLICATE
        if start > offset:
            if stop > start:  # else wholly beyond the window: dropped
                self._store(start, data[:stop - start])
            return b"", self.OUT_OF_ORDER
        chunks = [data[offset - start:stop - start]]
        self.offset = self._drain(chunks, stop)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), self.IN_ORDER

    def _drain(self, chunks: list, offset: int) -> int:
        """Append buffered pieces that continue at ``offset``; returns the new offset."""
        starts, pieces = self._starts, self._pieces
        while starts and starts[0] <= offset:
            start = starts.pop(0)
            piece = pieces.pop(start)
            stop = start + len(piece)
            if stop > offset:
                chunks.append(piece[offset - start:])
                offset = stop
        return offset

    def _store(self, start: int, data: bytes) -> None:
        """Buffer the parts of an out-of-order segment not held yet, within the bounds."""
        starts, pieces = self._starts, self._pieces
        origin, stop = start, start + len(data)
        i = bisect.bisect_right(starts, start)
        if i:
            start = max(start, starts[i - 1] + len(pieces[starts[i - 1]]))
        while start < stop:
            next_start = starts[i] if i < len(starts) else stop
            if next_start <= start:  # already held: skip past that piece
                start = max(start, next_start + len(pieces[next_start]))
                i += 1
                continue
            if len(starts) >= MAX_REORDER_SEGMENTS:
                return
            piece_end = min(next_start, stop)
            starts.insert(i, start)
            pieces[start] = data[start - origin:piece_end - origin]
            start = piece_end
            i += 1

    def ack_ranges(self) -> tuple[int, int, list]:
        """(cumulative offset, end of the reported region, first MAX_ACK_RANGES gaps)."""
        gaps = []
        cur = self.offset
        for start in self._starts:
            if start > cur:
                if len(gaps) == MAX_ACK_RANGES:
                    break
                gaps.append((cur, start))
            cur = max(cur, start + len(self._pieces[start]))
        return self.offset, cur, gaps

    def restart(self) -> None:
        """Forget everything (the control stream starts over after a re-key)."""
        self.offset = 0
        self._starts, self._pieces = [], {}


class ControlChannel:
    """Control messages (resize, close, shutdown) on a reliable stream of their own.

    Riding on stream 1, they are resent until acked and never wait behind terminal bytes.
    A re-key starts the stream over on both sides; messages not yet acked are written
    again whole, so a message may arrive twice (the Connection reports CLOSE and SHUTDOWN
    once; a repeated resize is harmless).
    """

    def __init__(self) -> None:
        self.out = SendStream(STREAM_CONTROL, CONTROL_WINDOW)
        self.inp = RecvStream(CONTROL_WINDOW)
        self._partial = bytearray()  # received bytes of a message not complete yet
        self._unacked: deque = deque()  # (end offset, message) not yet acked whole

    def send(self, kind: int, body: bytes) -> None:
        message = CTRL_HEADER.pack(kind, len(body)) + body
        self.out.write(message)
        self._unacked.append((self.out.end, message))

    def idle(self) -> bool:
        """Nothing written but unsent (a coalesced resize may be appended now)."""
        return self.out.next_new == self.out.end

    def forget_acked(self) -> None:
        while self._unacked and self._unacked[0][0] <= self.out.base:
            self._unacked.popleft()

    def messages(self, data: bytes) -> list:
        """Complete ``(kind, body)`` messages now that ``data`` arrived in order."""
        buf = self._partial
        buf += data
        found, pos = [], 0
        while len(buf) - pos >= CTRL_HEADER.size:
            kind, length = CTRL_HEADER.unpack_from(buf, pos)
            end = pos + CTRL_HEADER.size + length
            if end > len(buf):
                break
            found.append((kind, bytes(buf[pos + CTRL_HEADER.size:end])))
            pos = end
        del buf[:pos]
        return found

    def restart(self) -> None:
        pending = [message for _end, message in self._unacked]
        self.out = SendStream(STREAM_CONTROL, CONTROL_WINDOW)
        self.inp.restart()
        self._partial.clear()
        self._unacked.clear()
        for message in pending:
            self.out.write(message)
            self._unacked.append((self.out.end, message))


class LossEstimate:
    """A rough loss rate for this path, to decide when small packets go out twice.

    Two views, the larger wins: the gaps in the peer's packet numbers (loss toward us,
    which on most paths resembles loss away from us) and an average over our own packets
    found lost (asymmetric loss).
    """

    WINDOW = 64

    def __init__(self) -> None:
        self.rate = 0.0
        self._rx_rate = 0.0
        self._tx_rate = 0.0
        self._rx_seen = 0
        self._rx_missing = 0

    def on_rx(self, skipped: int) -> None:
        """A new largest packet number arrived, ``skipped`` numbers after the previous one."""
        self._rx_seen += 1
        self._rx_missing += skipped
        total = self._rx_seen + self._rx_missing
        if total >= self.WINDOW:
            self._rx_rate = 0.5 * self._rx_rate + 0.5 * self._rx_missing / total
            self._rx_seen = self._rx_missing = 0
            self.rate = max(self._rx_rate, self._tx_rate)

    def on_tx(self, resolved: int, lost: int) -> None:
        """``resolved`` of our records left the flight, ``lost`` of them lost."""
        if resolved:
            weight = min(1.0, resolved / 16)
            self._tx_rate += weight * (lost / resolved - self._tx_rate)
            self.rate = max(self._rx_rate, self._tx_rate)


class AckClock:
    """The receiver's side of acknowledgements: what is owed to the sender, and by when.

    Ack-eliciting packets (data, pings) are acked after ACK_EVERY of them or ACK_DELAY,
    whichever comes first; urgent news (a gap, a duplicate, a ping, control data) at once.
    The newest packet number received and when it came go into every ACK, so the sender
    gets a clean RTT sample from each.
    """

    def __init__(self, now: float) -> None:
        self.largest_pn = -1
        self._largest_time = now
        self._streams: set = set()
        self.urgent = False
        self.deadline: Optional[float] = None
        self._count = 0

    def received(self, pn: int, now: float) -> Optional[int]:
        """Note an authentic packet; if it is the newest yet, how many numbers it skipped."""
        if pn <= self.largest_pn:
            return None
        skipped = pn - self.largest_pn - 1 if self.largest_pn >= 0 else 0
        self.largest_pn, self._largest_time = pn, now
        return skipped

    def owe(self, stream_id: int, urgent: bool = False) -> None:
        self._streams.add(stream_id)
        self.urgent = self.urgent or urgent

    def eliciting(self, now: float) -> None:
        """An ack-eliciting packet arrived."""
        self._count += 1
        if self._count >= ACK_EVERY:
            self.urgent = True
        elif self.deadline is None:
            self.deadline = now + ACK_DELAY

    def owed(self) -> bool:
        return bool(self._streams)

    def due(self, now: float) -> bool:
        return self.urgent or (self.deadline is not None and now >= self.deadline)

    def frames(self, now: float, streams: dict) -> list:
        """ACK frames for every stream owed one (``streams``: id -> RecvStream); resets."""
        delay_us = min(int((now - self._largest_time) * 1e6), 0xFFFFFFFF)
        frames = []
        for stream_id in sorted(self._streams) or (STREAM_TERMINAL,):
            cum, high, gaps = streams[stream_id].ack_ranges()
            body = [ACK_HEADER.pack(stream_id, max(self.largest_pn, 0), delay_us, cum,
                                    high - cum, len(gaps))]
            body += [GAP.pack(start - cum, stop - start) for start, stop in gaps]
            body = b"".join(body)
            frames.append(FRAME.pack(FRAME_ACK, len(body)) + body)
        self._streams.clear()
        self.urgent, self.deadline, self._count = False, None, 0
        return frames


class PathProbe:
    """An address that sent authentic, fresh packets but has not yet shown that it receives
    ours: what it sent, what we may still send it, and the challenges it may answer.

    Sending to it is limited to AMPLIFICATION_FACTOR times the bytes received from it, so a
    replayed datagram cannot make us stream output at a third party.  Challenges are
    retried with the RTO doubling up to MAX_BACKOFF_RTO, and sooner when the address sends
    again (the peer is there and talking: the last challenge was probably lost).
    """

    def __init__(self, addr: object, now: float) -> None:
        self.addr = addr
        self.received = 0
        self.sent = 0
        self.next_challenge = now
        self._tries = 0
        self._challenges: deque = deque(maxlen=CHALLENGES_KEPT)  # (data, sent_at)

    def allowance(self) -> int:
        """Bytes we may still send to this address."""
        return AMPLIFICATION_FACTOR * self.received - self.sent

    def on_received(self, nbytes: int, now: float, rto: float) -> None:
        self.received += nbytes
        if self._challenges and now - self._challenges[-1][1] >= rto:
            self.next_challenge = min(self.next_challenge, now)

    def challenge(self, now: float, rto: float) -> bytes:
        """Fresh challenge data to send now; schedules the retry."""
        data = secrets.token_bytes(PATH_DATA_SIZE)
        self._challenges.append((data, now))
        self._tries += 1
        backoff = rto * (1 << min(self._tries, 6))
        self.next_challenge = now + min(backoff, max(rto, MAX_BACKOFF_RTO))
        return data

    def answered_at(self, data: bytes) -> Optional[float]:
        """When the challenge ``data`` answers was sent (None: not one of ours)."""
        for challenge, sent_at in self._challenges:
            if secrets.compare_digest(challenge, data):
                return sent_at
        return None


class Connection:
    """Sans-IO reliable session between one client and one server over datagrams.

    Feed it ``receive_datagram(data, addr, now)``; send what ``datagrams_to_send(now)``
    returns; call again at ``next_timeout()``; read ``next_event()`` until None.  ``keys``
    is any object with ``client_to_server``, ``server_to_client``, ``conn_id`` and
    ``cipher`` (the handshake's SessionKeys).  Only the client pings: every KEEPALIVE when
    it has sent nothing else, every RTO until it first hears the server under the current
    keys (the server learns the client's address from that ping), and every OUTAGE_PROBE
    while what it sent goes unanswered (so it notices the path is back at once).  The server
    answers every ping with an immediate ACK, so both sides hear each other that often.

    ``peer_addr`` given to the constructor or ``rekey`` is trusted (the client names the
    server it dialled); any other address the peer appears from is validated first (see
    PathProbe), one at a time: a newer address replaces the one being validated.
    """

    def __init__(self, role: str, keys: object, now: float, peer_addr: object = None) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self._is_client = role == "client"
        self.peer_addr = peer_addr
        self.last_heard = now
        self._now = now
        self._terminal = SendStream(STREAM_TERMINAL, SEND_WINDOW)
        self._terminal_in = RecvStream(SEND_WINDOW)
        self._control = ControlChannel()
        self._events: deque = deque()
        self._resize: Optional[tuple[int, int]] = None  # coalesced until the channel is idle
        self._close: Optional[tuple[int, int]] = None  # (status, final offset) awaiting output
        self._reported: set = set()  # CLOSE/SHUTDOWN reported already (resent after re-key)
        self._loss = LossEstimate()
        self._probe: Optional[PathProbe] = None  # the address being validated, if any
        self._responses: deque = deque(maxlen=PENDING_RESPONSES)  # (data, addr) to answer
        self._install_keys(keys, now)

    # -- public state ------------------------------------------------------------------

    @property
    def recv_offset(self) -> int:
        """Terminal bytes received in order (what to tell the peer when resuming)."""
        return self._terminal_in.offset

    @property
    def send_offset(self) -> int:
        """Terminal bytes queued by ``send`` so far."""
        return self._terminal.end

    @property
    def acked_offset(self) -> int:
        """Terminal bytes the peer has acknowledged."""
        return self._terminal.base

    def unacked_bytes(self) -> int:
        """Terminal bytes queued or in flight, not yet acknowledged."""
        return self._terminal.unacked()

    def all_acked(self) -> bool:
        """Everything sent, terminal and control, is acknowledged (safe to close)."""
        return not self._terminal.unacked() and not self._control.out.unacked() \
            and self._resize is None

    def writable(self) -> bool:
        """Room in the send window: the server reads its PTY only while this is True."""
        return self._terminal.unacked() < SEND_WINDOW

    def next_event(self) -> object:
        """The oldest pending event (DataReceived, ResizeRequested, ...), or None."""
        return self._events.popleft() if self._events else None

    # -- sending -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Append to the terminal stream (never refused: ``writable`` is the back-pressure)."""
        if data:
            self._terminal.write(data)

    def send_resize(self, rows: int, cols: int) -> None:
        """Tell the server the terminal size; sizes not sent yet coalesce into the latest."""
        self._resize = (rows, cols)

    def send_close(self, exit_status: int) -> None:
        """The shell exited: the peer reports it after all output sent so far arrived."""
        self._control.send(CTRL_CLOSE, CLOSE_BODY.pack(exit_status, self._terminal.end))

    def send_shutdown(self, reason: str) -> None:
        """The session ends for ``reason`` (cut to MAX_REASON bytes of UTF-8)."""
        body = reason.encode("utf-8")[:MAX_REASON]
        self._control.send(CTRL_SHUTDOWN, body.decode("utf-8", "ignore").encode("utf-8"))

    def rekey(self, keys: object, peer_recv_offset: int, now: float,
              peer_addr: object = None) -> None:
        """Continue under new keys after a resume handshake.

        Packet numbers, replay window, RTT and congestion state start over; the terminal
        stream resends from ``peer_recv_offset`` (what the peer said it has); received data
        is kept (anything resent below ``recv_offset`` is ignored); control messages not
        yet acked are sent again.  ``last_heard`` becomes ``now``: the handshake was contact.
        """
        if not self.acked_offset <= peer_recv_offset <= self.send_offset:
            # The peer acked more, or claims bytes never sent: a bug or a lie; carry on.
            log.warning("resume offset %d outside [%d, %d]: clamped", peer_recv_offset,
                        self.acked_offset, self.send_offset)
        self._install_keys(keys, now)
        self._terminal.restart(peer_recv_offset)
        self._control.restart()
        if peer_addr is not None:
            self.peer_addr = peer_addr
            if self._peer_unvalidated():
                self._probe = None
        # Otherwise the address in use stays, validated or not: the client's first packet
        # under the new keys moves it only through a challenge, like any roam.
        self.last_heard = now

    def _install_keys(self, keys: object, now: float) -> None:
        if self._is_client:
            send_key, recv_key, direction = (keys.client_to_server, keys.server_to_client,
                                             CLIENT_TO_SERVER)
        else:
            send_key, recv_key, direction = (keys.server_to_client, keys.client_to_server,
                                             SERVER_TO_CLIENT)
        self._tx = PacketCipher(send_key, keys.cipher, direction, keys.conn_id)
        self._rx = PacketCipher(recv_key, keys.cipher, 1 - direction, keys.conn_id)
        self._next_pn = 0
        self._sent_at = [0.0] * SENT_RING
        self._largest_acked = -1
        self._acks = AckClock(now)
        self._rtt = RttEstimator()
        self._cc = CongestionWindow()
        self._pacer = Pacer(now)
        self._backoff = 0
        self._last_eliciting_sent = float("-inf")
        self._unanswered_since: Optional[float] = None  # first ack-eliciting send since heard
        self._heard = False  # any authentic packet under these keys yet
        self._more = False

    # -- receiving ---------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        """Take one datagram from ``addr``; anything not authentic and fresh is ignored."""
        opened = self._rx.open(data)
        if opened is None:
            return
        pn, plaintext = opened
        if now - self.last_heard > self._rto():
            self._backoff = 0  # the peer is back after a silence: no more backed-off waiting
        self._now = self.last_heard = now
        self._heard = True
        self._unanswered_since = None
        skipped = self._acks.received(pn, now)
        if skipped is not None:
            self._loss.on_rx(skipped)
        self._note_address(addr, len(data), skipped is not None, now)
        if self._parse_frames(plaintext, addr, now):
            self._acks.eliciting(now)

    # -- addresses (path validation) ---------------------------------------------------

    def _peer_unvalidated(self) -> bool:
        """The address in use is still being validated (the server's first contact)."""
        return self._probe is not None and self._probe.addr == self.peer_addr

    def _note_address(self, addr: object, nbytes: int, newest: bool, now: float) -> None:
        """An authentic packet of ``nbytes`` came from ``addr``: start validating it if it is
        new (only for the newest packet: an older one from a left address is no news)."""
        probe = self._probe
        if probe is not None and addr == probe.addr:
            probe.on_received(nbytes, now, self._rto())
            return
        if addr == self.peer_addr or not newest:
            return
        first_contact = self.peer_addr is None or self._peer_unvalidated()
        self._probe = PathProbe(addr, now)
        self._probe.on_received(nbytes, now, self._rto())
        log.debug("%s: authentic packet from new address %s: validating it", self.role, addr)
        if first_contact:
            # No validated address to keep using: this one is used at once, under the limit.
            self.peer_addr = addr
            self._events.append(PeerAddressChanged(addr))

    def _on_path_response(self, data: bytes, addr: object, now: float) -> None:
        probe = self._probe
        if probe is None or addr != probe.addr:
            return  # answered from elsewhere: proves nothing about the address on trial
        sent_at = probe.answered_at(data)
        if sent_at is None:
            return
        self._probe = None
        if addr == self.peer_addr:
            return  # the first address, now validated: nothing moves
        log.debug("%s: address %s validated: moving to it", self.role, addr)
        old, self.peer_addr = self.peer_addr, addr
        self._events.append(PeerAddressChanged(addr))
        if addr[0] != old[0]:
            # Another host, another path: its round trip (the challenge's) and unknown
            # capacity replace the old path's. A new port only (NAT rebinding) keeps them.
            self._rtt = RttEstimator()
            self._rtt.sample(now - sent_at, 0.0)
            self._cc = CongestionWindow()
        # What went to the old address during the validation is lost if the peer left it
        # (the usual reason to move): resend it all now instead of waiting out the RTO. It
        # is not congestion; a copy that did arrive is only a duplicate to the receiver.
        self._backoff = 0
        self._terminal.on_timeout(now, float("-inf"))
        self._control.out.on_timeout(now, float("-inf"))

    def _parse_frames(self, plaintext: bytes, addr: object, now: float) -> bool:
        """Handle every frame; returns whether the packet asks for an ACK."""
        eliciting = False
        pos, size = 0, len(plaintext)
        while pos + FRAME.size <= size:
            ftype, length = FRAME.unpack_from(plaintext, pos)
            pos += FRAME.size
            end = pos + length
            if end > size:
                break
            if ftype == FRAME_DATA and length >= DATA_HEADER.size:
                eliciting = True
                stream_id, offset = DATA_HEADER.unpack_from(plaintext, pos)
                self._on_data(stream_id, offset, plaintext[pos + DATA_HEADER.size:end])
            elif ftype == FRAME_ACK:
                self._on_ack(plaintext, pos, end, now)
            elif ftype == FRAME_PING:
                eliciting = True
                self._acks.owe(STREAM_TERMINAL, urgent=True)
            elif ftype == FRAME_PATH_CHALLENGE and length == PATH_DATA_SIZE:
                self._responses.append((plaintext[pos:end], addr))
            elif ftype == FRAME_PATH_RESPONSE and length == PATH_DATA_SIZE:
                self._on_path_response(plaintext[pos:end], addr, now)
            pos = end  # unknown frame types (and PADDING) are skipped: newer peers may send more
        return eliciting

    def _on_data(self, stream_id: int, offset: int, payload: bytes) -> None:
        if stream_id == STREAM_TERMINAL:
            data, how = self._terminal_in.receive(offset, payload)
            if data:
                self._events.append(DataReceived(data))
                if self._close is not None:
                    self._report_close()
        elif stream_id == STREAM_CONTROL:
            data, how = self._control.inp.receive(offset, payload)
            for kind, body in self._control.messages(data) if data else ():
                self._on_control(kind, body)
            self._acks.owe(stream_id, urgent=True)  # rare and urgent: ack at once
        else:
            return  # a stream this version does not know (no protocol version opens one)
        # Out of order (a gap) or a duplicate (our ack was lost): tell the sender now.
        self._acks.owe(stream_id, urgent=how != RecvStream.IN_ORDER)

    def _on_control(self, kind: int, body: bytes) -> None:
        if kind == CTRL_RESIZE and len(body) == RESIZE_BODY.size:
            self._events.append(ResizeRequested(*RESIZE_BODY.unpack(body)))
        elif kind == CTRL_CLOSE and len(body) == CLOSE_BODY.size:
            self._close = CLOSE_BODY.unpack(body)
            self._report_close()
        elif kind == CTRL_SHUTDOWN and CTRL_SHUTDOWN not in self._reported:
            self._reported.add(CTRL_SHUTDOWN)
            self._events.append(ShutdownReceived(body.decode("utf-8", "replace")))

    def _report_close(self) -> None:
        status, final_offset = self._close
        if self._terminal_in.offset >= final_offset and CTRL_CLOSE not in self._reported:
            self._reported.add(CTRL_CLOSE)
            self._events.append(SessionClosed(status))

    def _on_ack(self, plaintext: bytes, pos: int, end: int, now: float) -> None:
        if end - pos < ACK_HEADER.size:
            return
        stream_id, largest_pn, delay_us, cum, span, count = ACK_HEADER.unpack_from(plaintext, pos)
        if count > MAX_ACK_RANGES or end - pos != ACK_HEADER.size + count * GAP.size:
            return
        if stream_id == STREAM_TERMINAL:
            stream = self._terminal
        elif stream_id == STREAM_CONTROL:
            stream = self._control.out
        else:
            return
        gaps, floor = [], 0
        for gap_start, gap_len in GAP.iter_unpack(plaintext[pos + ACK_HEADER.size:end]):
            if gap_start < floor or gap_len == 0 or gap_start + gap_len > span:
                return  # not sorted, empty or outside the reported region: malformed
            floor = gap_start + gap_len
            gaps.append((cum + gap_start, cum + floor))
        if self._largest_acked < largest_pn < self._next_pn:
            self._largest_acked = largest_pn
            self._backoff = 0
            if largest_pn >= self._next_pn - SENT_RING:
                self._rtt.sample(now - self._sent_at[largest_pn % SENT_RING], delay_us / 1e6)
        rtt = self._rtt
        lost_before = now - TIME_THRESHOLD * max(rtt.srtt, rtt.latest)
        result = stream.on_ack(cum, cum + span, gaps, self._largest_acked, lost_before)
        if result is None:
            return
        acked, resolved, lost, lost_sent = result
        if acked:
            self._cc.on_acked(acked)
            if stream_id == STREAM_CONTROL:
                self._control.forget_acked()
        if lost:
            self._cc.on_loss(lost_sent, now)
        self._loss.on_tx(resolved, lost)

    # -- timers and output -------------------------------------------------------------

    def _rto(self) -> float:
        rto = self._rtt.rto()
        return min(rto * (1 << self._backoff), max(rto, MAX_BACKOFF_RTO))

    def _rto_deadline(self) -> Optional[float]:
        sent = [t for t in (self._terminal.oldest_sent(), self._control.out.oldest_sent())
                if t is not None]
        return min(sent) + self._rto() if sent else None

    def _check_rto(self, now: float) -> None:
        """Resend what the timer says is lost; back off, and after repeats shrink the window."""
        deadline = self._rto_deadline()
        if deadline is None or now < deadline:
            return
        # A first timeout only resends what expired (the rest may still be acked); a repeat
        # means the path is down: everything in flight is lost, resent as the window allows.
        rto = self._rto() if not self._backoff else float("-inf")
        lost, lost_sent = self._terminal.on_timeout(now, rto)
        control_lost, control_sent = self._control.out.on_timeout(now, rto)
        self._loss.on_tx(lost + control_lost, lost + control_lost)
        if self._backoff:
            self._cc.on_timeout(now)
        else:
            self._cc.on_loss(max(lost_sent, control_sent), now)
        if self._rto() < MAX_BACKOFF_RTO:
            self._backoff += 1

    def _data_pending(self) -> bool:
        control = self._control
        terminal = self._terminal
        return (control.out.has_pending() or (self._resize is not None and control.idle())
                or (terminal.has_room(self._cc.cwnd) and terminal.has_pending()))

    def _next_ping(self) -> float:
        """When the client pings next: every RTO until it first hears the server under these
        keys, every OUTAGE_PROBE(_SLOW) while the path seems down, else every KEEPALIVE."""
        last, rto = self._last_eliciting_sent, self._rtt.rto()
        if not self._heard:
            return last + rto
        silent_since = self._unanswered_since
        if silent_since is None:
            return last + KEEPALIVE
        fast = last - silent_since < OUTAGE_FAST_SECS
        return max(silent_since + rto, last + (OUTAGE_PROBE if fast else OUTAGE_PROBE_SLOW))

    def next_timeout(self) -> Optional[float]:
        """Absolute time at which ``datagrams_to_send`` has something to do (None: never)."""
        if self._responses:
            return self._now
        probe = self._probe
        times = [probe.next_challenge] if probe is not None and self._may_challenge() else []
        if self.peer_addr is None or self._budget_exhausted():
            return max(min(times), self._now) if times else None
        if self._more or self._acks.urgent:
            return self._now
        times += [self._acks.deadline, self._rto_deadline()]
        if self._is_client:
            times.append(self._next_ping())
        if self._data_pending():
            times.append(self._pacer.next_send_time(self._cc.pacing_rate(self._rtt.srtt)))
        times = [t for t in times if t is not None]
        return max(min(times), self._now) if times else None

    def _budget_exhausted(self) -> bool:
        """The address in use is unvalidated and a full datagram would exceed its limit."""
        return self._peer_unvalidated() and self._probe.allowance() < MAX_DATAGRAM

    def _may_challenge(self) -> bool:
        return self._probe.allowance() >= CHALLENGE_DATAGRAM

    def _path_datagrams(self, now: float) -> list:
        """Responses to the peer's challenges, then our challenge if one is due."""
        out = []
        probe = self._probe
        while self._responses:
            data, addr = self._responses.popleft()
            if probe is not None and addr == probe.addr:  # answers count against its limit
                if probe.allowance() < CHALLENGE_DATAGRAM:
                    continue
                probe.sent += CHALLENGE_DATAGRAM
            out.append((self._seal(FRAME.pack(FRAME_PATH_RESPONSE, PATH_DATA_SIZE) + data, now),
                        addr))
        if probe is not None and now >= probe.next_challenge and self._may_challenge():
            data = probe.challenge(now, self._rto())
            datagram = self._seal(FRAME.pack(FRAME_PATH_CHALLENGE, PATH_DATA_SIZE) + data, now)
            probe.sent += len(datagram)
            out.append((datagram, probe.addr))
        return out

    def _destinations(self, size: int, has_data: bool) -> list:
        """Where a datagram of ``size`` bytes goes: the address in use, and within its limit
        the one on trial, if any. Copying output there lets a genuine roam get it at once,
        validation or not. Bare ACKs are not copied: they would use up the limit that a
        retried challenge needs, and without them the peer resends or probes from there
        soon, which raises the limit."""
        probe = self._probe
        if probe is None:
            return [self.peer_addr]
        if probe.addr != self.peer_addr:
            if not has_data or probe.allowance() < size:
                return [self.peer_addr]
            probe.sent += size
            return [self.peer_addr, probe.addr]
        if probe.allowance() < size:  # the address in use is itself on trial
            return []
        probe.sent += size
        return [self.peer_addr]

    def _seal(self, payload: bytes, now: float) -> bytes:
        """The next packet number's datagram carrying ``payload``."""
        pn = self._next_pn
        self._next_pn = pn + 1
        self._sent_at[pn % SENT_RING] = now
        return self._tx.seal(pn, payload)

    def datagrams_to_send(self, now: float) -> list:
        """Datagrams due now, as ``(bytes, addr)``: path challenges and responses, acks,
        pings, paced stream data."""
        self._now = now
        self._more = False
        out = self._path_datagrams(now)
        addr = self.peer_addr
        if addr is None:
            return out
        self._check_rto(now)
        rate = self._cc.pacing_rate(self._rtt.srtt)
        pacer = self._pacer
        pacer.refill(now, rate)
        while True:
            if len(out) >= MAX_BATCH:
                self._more = True
                break
            if self._budget_exhausted():
                break
            with_data = pacer.ready() and self._data_pending()
            ping = self._is_client and now >= self._next_ping()
            if not (with_data or ping or self._acks.due(now)):
                break
            payload, data_bytes = self._build_payload(now, with_data, ping)
            if not payload:
                break
            copies = 2 if data_bytes > 0 and len(payload) <= SMALL_PACKET \
                and self._loss.rate > LOSSY else 1
            for _ in range(copies):
                datagram = self._seal(payload, now)
                pacer.spend(len(datagram))
                out += [(datagram, dest)
                        for dest in self._destinations(len(datagram), data_bytes > 0)]
            if data_bytes or ping:
                self._last_eliciting_sent = now
                if self._unanswered_since is None:
                    self._unanswered_since = now
        return out

    def _build_payload(self, now: float, with_data: bool, ping: bool) -> tuple[bytes, int]:
        """Frames for the next packet: ACKs, a PING, then control and terminal data."""
        parts = []
        if self._acks.owed() or self._acks.due(now):  # due, or riding along for free
            parts += self._acks.frames(now, {STREAM_TERMINAL: self._terminal_in,
                                             STREAM_CONTROL: self._control.inp})
        if ping:
            parts.append(FRAME.pack(FRAME_PING, 0))
        space = MAX_PAYLOAD - sum(len(p) for p in parts)
        data_bytes = 0
        if with_data:
            control = self._control
            if self._resize is not None and control.idle():
                control.send(CTRL_RESIZE, RESIZE_BODY.pack(*self._resize))
                self._resize = None
            pn = self._next_pn
            terminal = self._terminal
            for stream in (control.out, terminal):  # control is tiny: exempt from the window
                while space > DATA_OVERHEAD and (stream is control.out
                                                 or terminal.has_room(self._cc.cwnd)):
                    chunk = stream.take(pn, now, space - DATA_OVERHEAD)
                    if chunk is None:
                        break
                    offset, data = chunk
                    parts.append(FRAME.pack(FRAME_DATA, DATA_HEADER.size + len(data))
                                 + DATA_HEADER.pack(stream.stream_id, offset))
                    parts.append(data)
                    space -= DATA_OVERHEAD + len(data)
                    data_bytes += len(data)
        if ping and not self._heard and space >= FRAME.size:
            # A full datagram lets the server send 3 back to an address it has not validated.
            parts.append(FRAME.pack(FRAME_PADDING, space - FRAME.size) + bytes(space - FRAME.size))
        return b"".join(parts), data_bytes


# ---------------------------------------------------------------------------
# I/O glue
# ---------------------------------------------------------------------------

# Errors that mean "the network is not there right now": the datagram is as good as lost,
# and the transport's timers deal with loss.  Never a reason to crash a session.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EAGAIN", "EWOULDBLOCK", "ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "ENETDOWN",
        "EHOSTDOWN", "EADDRNOTAVAIL", "ENOBUFS", "EPERM", "EACCES", "ECONNRESET", "EINVAL",
        "EAFNOSUPPORT", "EMSGSIZE", "ENONET", "EDESTADDRREQ")
    if hasattr(errno, name))


def udp_socket(host: str, port: int = 0) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (IPv4 or IPv6, by the address)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:  # best effort: bigger buffers absorb bursts at high rates
                sock.setsockopt(socket.SOL_SOCKET, option, UdpLink.SOCKET_BUFFER)
            except OSError:
                pass
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpLink:
    """A non-blocking UDP socket driving one Connection, for the caller's select loop.

    ``select([link, ...], [], [], link.timeout(now))``, then ``handle_readable(now)`` if it
    was readable, then ``flush(now)``.  Socket errors never escape: a vanished network
    looks like packet loss, which the Connection handles.
    """

    SOCKET_BUFFER = 4 * 1024 * 1024
    RECV_BATCH = 256  # datagrams per handle_readable(), so a flood cannot starve the loop

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.conn = conn
        self.sock = sock

    @classmethod
    def bind(cls, conn: Connection, host: str = "0.0.0.0", port: int = 0) -> UdpLink:
        return cls(conn, udp_socket(host, port))

    @property
    def local_addr(self) -> tuple:
        return self.sock.getsockname()

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle_readable(self, now: float) -> None:
        """Feed every waiting datagram (up to RECV_BATCH) to the Connection."""
        recvfrom, receive = self.sock.recvfrom, self.conn.receive_datagram
        for _ in range(self.RECV_BATCH):
            try:
                data, addr = recvfrom(2048)  # larger than any valid datagram: those fail open
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno not in TRANSIENT_ERRNOS:
                    log.debug("udp receive failed: %s", err)
                    return
                continue  # e.g. ICMP "port unreachable" reported on this socket
            receive(data, addr, now)

    def flush(self, now: float) -> None:
        """Send whatever the Connection has due."""
        sendto = self.sock.sendto
        for datagram, addr in self.conn.datagrams_to_send(now):
            try:
                sendto(datagram, addr)
            except OSError as err:
                if err.errno not in TRANSIENT_ERRNOS:
                    log.debug("udp send to %s failed: %s", addr, err)

    def timeout(self, now: float) -> Optional[float]:
        """Seconds until the Connection needs ``flush`` again (None: only on input)."""
        deadline = self.conn.next_timeout()
        return None if deadline is None else max(0.0, deadline - now)

    def hop_port(self) -> tuple:
        """Move to a fresh local port (a new NAT mapping); the Connection carries on.

        Returns the local address now in use: the old one if no new socket can be had.
        """
        host = self.local_addr[0]
        try:
            new = udp_socket(host, 0)
        except OSError as err:
            log.debug("cannot open a new UDP socket on %s: %s", host, err)
            return self.local_addr
        self.sock.close()
        self.sock = new
        return self.local_addr

    def close(self) -> None:
        self.sock.close()
