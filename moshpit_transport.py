"""moshpit transport: encrypted UDP packets carrying reliable byte streams.

Three layers, each using only those above it:

1. Packet crypto (``PacketCipher``): every datagram is ``flags | conn_id | packet number``
   followed by an AEAD ciphertext of the frames, with the header as associated data and a
   nonce made of the direction and the packet number.  Packet numbers never repeat under a
   key (a retransmission is a new packet) and a sliding window drops replays.

2. Reliable streams (``Connection``, sans-IO): the frames inside a packet carry stream data
   addressed by byte offset, acknowledgements (cumulative offset + gap list), and pings.
   Streams are numbered byte streams and nothing more: what they carry is the caller's
   business (moshpit_session puts the terminal on stream 0 and its typed records on an
   urgent stream 1).  Stream 0 always exists; ``open_stream`` adds others, each with its
   own send window and reorder bound.  Urgent streams are served first and acked at once,
   then the others by number, so a stream opened later for bulk never delays stream 0.
   The caller feeds datagrams and the time in, and takes datagrams, timer deadlines and
   events out; nothing here sleeps or touches a socket.

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

Timers, acks and losses, in short: the receiver acks every 4th ack-eliciting packet or within
10 ms, and at once when data arrives out of order, twice, or on an urgent stream, or for a
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

Carriers (moshpit_carrier): an "address" may also be a TCP carrier's path, which the peer
was authenticated on by other means (the handshake's own connection).  ``trust_path``
marks such paths: the server moves its replies to a trusted path as soon as the newest
packet arrives there, without a challenge; the client moves only when told (``use_path``,
which resends what was in flight on the new path).  A trusted path may carry a floor for
the retransmission timer (TCP retransmits on its own).  Packet numbers, acks, the replay
window and offsets are shared by all paths, so a switch loses and doubles nothing.
"""

from __future__ import annotations

import bisect
import errno
import logging
import secrets
import socket
import struct
from collections import deque
from typing import NamedTuple, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from moshpit import MAX_DATAGRAM

__all__ = [  # the API; the tuning constants and building blocks stay importable for tests
    "CIPHERS", "CLIENT_TO_SERVER", "SERVER_TO_CLIENT", "MAX_PAYLOAD", "ReplayWindow",
    "PacketCipher", "encode_frame", "data_frame_header", "decode_frames", "FIRST_STREAM",
    "MAX_STREAM_ID", "SEND_WINDOW", "DataReceived", "PeerAddressChanged", "Connection",
    "TRANSIENT_ERRNOS", "udp_socket", "UdpLink",
]

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

    def open(self, datagram: bytes) -> Optional[Tuple[int, bytes]]:
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


def encode_frame(ftype: int, body: bytes) -> bytes:
    """One frame: ``type | length | body``."""
    return FRAME.pack(ftype, len(body)) + body


def data_frame_header(stream_id: int, offset: int, length: int) -> bytes:
    """The bytes before ``length`` bytes of stream data in a DATA frame (the data follows
    as it is, so a full packet's worth is not copied once more)."""
    return FRAME.pack(FRAME_DATA, DATA_HEADER.size + length) + DATA_HEADER.pack(stream_id, offset)


def decode_frames(plaintext: bytes):
    """``(type, body start, body end)`` of each whole frame in ``plaintext``, in order; a
    truncated last frame ends the packet. Types are not checked: the caller skips the ones
    it does not know by their length (a newer peer may send more)."""
    pos, size = 0, len(plaintext)
    while pos + FRAME.size <= size:
        ftype, length = FRAME.unpack_from(plaintext, pos)
        pos += FRAME.size
        end = pos + length
        if end > size:
            return
        yield ftype, pos, end
        pos = end


FIRST_STREAM = 0  # exists on every Connection; others come from open_stream()
MAX_STREAM_ID = 255  # a DATA frame names its stream in one byte

SEND_WINDOW = 256 * 1024  # per stream (default): unacked + queued bytes before writable() is False
MAX_REORDER_SEGMENTS = 1024  # out-of-order pieces a receiver buffers per stream
MAX_ACK_RANGES = 32  # gaps reported per ACK frame (the first ones above the cum. offset)
MAX_FLIGHT_RECORDS = 1024  # packets in flight per stream, however small their data

ACK_EVERY = 4  # ack-eliciting packets received before an ACK goes out at once
ACK_DELAY_SECS = 0.010  # otherwise an ACK leaves at most this late
KEEPALIVE_SECS = 3.0  # the client pings after this long without sending anything ack-eliciting
# Outage probing: once a packet the client sent has gone unanswered for longer than an RTO,
# it pings every OUTAGE_PROBE_SECS for the first OUTAGE_FAST_SECS of the silence, then every
# OUTAGE_PROBE_SLOW_SECS. The session recovers within one probe interval (plus a round trip) of
# the path coming back, instead of waiting out backed-off retransmission timers; mosh probes
# about as often. Each probe is one ~50-byte datagram.
OUTAGE_PROBE_SECS, OUTAGE_FAST_SECS, OUTAGE_PROBE_SLOW_SECS = 0.02, 10.0, 0.25
PACKET_THRESHOLD = 3  # a packet is lost once one sent this many later was acked ...
TIME_THRESHOLD = 9 / 8  # ... or one sent this many RTTs later
INITIAL_RTT_SECS = 0.1
MIN_RTO_SECS, MAX_RTO_SECS, MAX_BACKOFF_RTO_SECS = 0.05, 1.0, 2.0
MSS = MAX_STREAM_CHUNK
INITIAL_CWND, MIN_CWND, MAX_CWND = 32 * MSS, 16 * MSS, 1024 * 1024
TIMEOUT_CWND = 2 * MSS  # after repeated timeouts (an outage): probe gently, then slow start
LOSS_BETA = 0.7
PACING_BURST = 10 * MAX_DATAGRAM  # what may leave back to back ...
PACING_QUANTUM_SECS = 0.001  # ... or this much time's worth at the pacing rate, if more
MAX_BATCH = 64  # datagrams per datagrams_to_send() call, so the caller gets to read too
SENT_RING = 4096  # send times remembered, by packet number, for RTT samples
SMALL_PACKET = 256  # stream data this small is sent twice when the path is lossy ...
LOSSY = 0.05  # ... i.e. when this fraction of our packets were found lost recently
AMPLIFICATION_FACTOR = 3  # bytes sent to an unvalidated address per byte received from it
CHALLENGES_KEPT = 4  # recent challenges to an address that a response may answer
PENDING_RESPONSES = 4  # challenges answered per flush; more in between are dropped
CHALLENGE_DATAGRAM = OVERHEAD + FRAME.size + PATH_DATA_SIZE  # and a response's size


class DataReceived(NamedTuple):
    """In-order bytes of one of the peer's streams."""

    data: bytes
    stream_id: int = FIRST_STREAM


class PeerAddressChanged(NamedTuple):
    """Replies go to ``addr`` from now on: the peer's first address, or a new one that
    answered a path challenge (see PathProbe)."""

    addr: tuple


class RttEstimator:
    """Smoothed RTT and variance (Jacobson/Karels) and the retransmission timeout from them."""

    def __init__(self) -> None:
        self.srtt = INITIAL_RTT_SECS
        self.rttvar = INITIAL_RTT_SECS / 2
        self.latest = INITIAL_RTT_SECS
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
        rto = self.srtt + max(4 * self.rttvar, 0.001) + ACK_DELAY_SECS
        return min(max(rto, MIN_RTO_SECS), MAX_RTO_SECS)


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
            cap = max(PACING_BURST, rate * PACING_QUANTUM_SECS)
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

    def take(self, pn: int, now: float, max_len: int) -> Optional[Tuple[int, bytes]]:
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

    def _record(self, pn: int, now: float, start: int, stop: int) -> Tuple[int, bytes]:
        self._flight.append((pn, start, stop, now))
        self.in_flight += stop - start
        return start, bytes(self._buf[start - self.base:stop - self.base])

    def on_ack(self, cum: int, high: int, gaps: list, largest_acked: int, lost_before: float
               ) -> Optional[Tuple[int, int, int, float]]:
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

    def on_timeout(self, now: float, rto: float) -> Tuple[int, float]:
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

    def receive(self, start: int, data: bytes) -> Tuple[bytes, int]:
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

    def ack_ranges(self) -> Tuple[int, int, list]:
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
        """Forget everything (a stream that starts over after a re-key)."""
        self.offset = 0
        self._starts, self._pieces = [], {}


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

    Ack-eliciting packets (data, pings) are acked after ACK_EVERY of them or ACK_DELAY_SECS,
    whichever comes first; urgent news (a gap, a duplicate, a ping, urgent-stream data) at
    once.
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
            self.deadline = now + ACK_DELAY_SECS

    def owed(self) -> bool:
        return bool(self._streams)

    def due(self, now: float) -> bool:
        return self.urgent or (self.deadline is not None and now >= self.deadline)

    def frames(self, now: float, streams: dict) -> list:
        """ACK frames for every stream owed one (``streams``: id -> RecvStream); resets."""
        delay_us = min(int((now - self._largest_time) * 1e6), 0xFFFFFFFF)
        frames = []
        for stream_id in sorted(self._streams) or (FIRST_STREAM,):
            cum, high, gaps = streams[stream_id].ack_ranges()
            body = [ACK_HEADER.pack(stream_id, max(self.largest_pn, 0), delay_us, cum,
                                    high - cum, len(gaps))]
            body += [GAP.pack(start - cum, stop - start) for start, stop in gaps]
            body = b"".join(body)
            frames.append(encode_frame(FRAME_ACK, body))
        self._streams.clear()
        self.urgent, self.deadline, self._count = False, None, 0
        return frames


class PathProbe:
    """An address that sent authentic, fresh packets but has not yet shown that it receives
    ours: what it sent, what we may still send it, and the challenges it may answer.

    Sending to it is limited to AMPLIFICATION_FACTOR times the bytes received from it, so a
    replayed datagram cannot make us stream output at a third party.  Challenges are
    retried with the RTO doubling up to MAX_BACKOFF_RTO_SECS, and sooner when the address sends
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
        self.next_challenge = now + min(backoff, max(rto, MAX_BACKOFF_RTO_SECS))
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
    ``cipher`` (the handshake's SessionKeys).  Only the client pings: every KEEPALIVE_SECS when
    it has sent nothing else, every RTO until it first hears the server under the current
    keys (the server learns the client's address from that ping), and every OUTAGE_PROBE_SECS
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
        self._out: dict = {}  # stream id -> SendStream
        self._in: dict = {}  # stream id -> RecvStream
        self._urgent: set = set()  # stream ids served first, outside the congestion window
        self._send_order: list = []  # SendStreams, urgent first, then by number
        self._events: deque = deque()
        self.open_stream(FIRST_STREAM)
        self._loss = LossEstimate()
        self._probe: Optional[PathProbe] = None  # the address being validated, if any
        # Paths authenticated by other means (a TCP carrier born of a handshake, the server
        # address the client dialled): never validated; path -> its RTO floor (seconds).
        self._trusted: dict = {}
        self._responses: deque = deque(maxlen=PENDING_RESPONSES)  # (data, addr) to answer
        self._install_keys(keys, now)

    # -- streams -----------------------------------------------------------------------

    def open_stream(self, stream_id: int, window: int = SEND_WINDOW,
                    urgent: bool = False) -> None:
        """Carry stream ``stream_id`` (both directions; the peer opens the same one).

        ``window``: bytes unacked + queued before ``writable`` turns False, and the reorder
        bound on receiving.  ``urgent``: for small, rare messages that must not wait: sent
        before every other stream and outside the congestion window, acked at once.  Data
        for a stream not opened here is acked never and dropped (the peer resends it until
        it gives up, so both sides must agree on their streams, as the protocol version
        does)."""
        if not 0 <= stream_id <= MAX_STREAM_ID or stream_id in self._out:
            raise ValueError(f"stream {stream_id} is out of range or open already")
        self._out[stream_id] = SendStream(stream_id, window)
        self._in[stream_id] = RecvStream(window)
        if urgent:
            self._urgent.add(stream_id)
        self._send_order = sorted(self._out.values(),
                                  key=lambda st: (st.stream_id not in self._urgent, st.stream_id))

    def recv_offset(self, stream_id: int = FIRST_STREAM) -> int:
        """Bytes of the stream received in order (what to tell the peer when resuming)."""
        return self._in[stream_id].offset

    def send_offset(self, stream_id: int = FIRST_STREAM) -> int:
        """Bytes queued on the stream by ``send`` so far."""
        return self._out[stream_id].end

    def acked_offset(self, stream_id: int = FIRST_STREAM) -> int:
        """Bytes of the stream the peer has acknowledged."""
        return self._out[stream_id].base

    def unacked_bytes(self, stream_id: int = FIRST_STREAM) -> int:
        """Bytes of the stream queued or in flight, not yet acknowledged."""
        return self._out[stream_id].unacked()

    @property
    def srtt(self) -> float:
        """The smoothed round-trip time in seconds (local echo prediction's trigger)."""
        return self._rtt.srtt

    def all_acked(self) -> bool:
        """Everything sent on every stream is acknowledged (safe to close)."""
        return not any(stream.unacked() for stream in self._send_order)

    def writable(self, stream_id: int = FIRST_STREAM) -> bool:
        """Room in the stream's send window: its writer reads its source only while True
        (the server's PTY for stream 0: back-pressure)."""
        stream = self._out[stream_id]
        return stream.unacked() < stream.window

    def next_event(self) -> object:
        """The oldest pending event (DataReceived, PeerAddressChanged), or None."""
        return self._events.popleft() if self._events else None

    # -- sending -----------------------------------------------------------------------

    def send(self, data: bytes, stream_id: int = FIRST_STREAM) -> None:
        """Append to a stream (never refused: ``writable`` is the back-pressure)."""
        if data:
            self._out[stream_id].write(data)

    def rekey(self, keys: object, peer_recv_offset: int, now: float,
              peer_addr: object = None) -> None:
        """Continue under new keys after a resume handshake.

        Packet numbers, replay window, RTT and congestion state start over.  Stream 0
        resends from ``peer_recv_offset`` (what the peer said it has, the one offset a
        resume handshake carries) and keeps what it received (anything resent below
        ``recv_offset`` is ignored).  Every other stream starts over at offset 0 on both
        sides: its owner writes again whatever the peer still needs (``acked_offset`` read
        before the re-key says what arrived).  ``last_heard`` becomes ``now``: the
        handshake was contact.
        """
        first = self._out[FIRST_STREAM]
        if not first.base <= peer_recv_offset <= first.end:
            # The peer acked more, or claims bytes never sent: a bug or a lie; carry on.
            log.warning("resume offset %d outside [%d, %d]: clamped", peer_recv_offset,
                        first.base, first.end)
        self._install_keys(keys, now)
        first.restart(peer_recv_offset)
        for stream in self._send_order:
            if stream.stream_id != FIRST_STREAM:
                self._out[stream.stream_id] = SendStream(stream.stream_id, stream.window)
                self._in[stream.stream_id].restart()
        self._send_order = [self._out[stream.stream_id] for stream in self._send_order]
        if peer_addr is not None:
            self.peer_addr = peer_addr
            if self._peer_unvalidated():
                self._probe = None
        # Otherwise the address in use stays, validated or not: the client's first packet
        # under the new keys moves it only through a challenge, like any roam.
        self.last_heard = now

    # -- carrier paths (moshpit_carrier) -------------------------------------------------

    def trust_path(self, addr: object, min_rto: float = 0.0) -> None:
        """``addr`` is a path the peer was authenticated on by other means (a TCP carrier that
        was the handshake's own connection; for the client, its server's UDP address too).
        The server moves its replies to a trusted path as soon as the newest packet arrives
        on it, without a challenge; the client never moves by itself (``use_path``).
        ``min_rto``: the retransmission timer's floor there (TCP retransmits on its own,
        so a datagram is only "lost" there when the carrier dropped it)."""
        self._trusted[addr] = min_rto

    def forget_path(self, addr: object) -> None:
        """A trusted path is gone (its carrier closed)."""
        self._trusted.pop(addr, None)

    def use_path(self, addr: object, now: float) -> None:
        """Send to ``addr`` from now on (the client switching carriers): what is in flight
        is resent there at once, since it may have died with the old path."""
        if addr != self.peer_addr:
            self._move_to(addr, now, None)

    def probe_datagram(self, now: float) -> bytes:
        """A sealed PING for the caller to send on a path not in use (is UDP back?): any
        answer on that path shows it works both ways."""
        self._now = now
        return self._seal(encode_frame(FRAME_PING, b""), now)

    def _move_to(self, addr: object, now: float, rtt_sample: Optional[float]) -> None:
        """Replies go to ``addr`` now (validated or trusted): new path, new estimates."""
        old, self.peer_addr = self.peer_addr, addr
        self._events.append(PeerAddressChanged(addr))
        if old is None or addr[0] != old[0]:
            # Another host, another path: its round trip (a challenge's, if any) and unknown
            # capacity replace the old path's. A new port only (NAT rebinding) keeps them.
            self._rtt = RttEstimator()
            if rtt_sample is not None:
                self._rtt.sample(rtt_sample, 0.0)
            self._cc = CongestionWindow()
        # What went to the old address meanwhile is lost if the peer left it (the usual
        # reason to move): resend it all now instead of waiting out the RTO. It is not
        # congestion; a copy that did arrive is only a duplicate to the receiver.
        self._backoff = 0
        for stream in self._send_order:
            stream.on_timeout(now, float("-inf"))

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
        if addr in self._trusted:
            if newest and not self._is_client and addr != self.peer_addr:
                log.debug("server: newest packet on trusted path %s: moving to it", addr)
                self._probe = None
                self._move_to(addr, now, None)
            return
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
        self._move_to(addr, now, now - sent_at)

    def _parse_frames(self, plaintext: bytes, addr: object, now: float) -> bool:
        """Handle every frame; returns whether the packet asks for an ACK."""
        eliciting = False
        for ftype, pos, end in decode_frames(plaintext):
            length = end - pos
            if ftype == FRAME_DATA and length >= DATA_HEADER.size:
                eliciting = True
                stream_id, offset = DATA_HEADER.unpack_from(plaintext, pos)
                self._on_data(stream_id, offset, plaintext[pos + DATA_HEADER.size:end])
            elif ftype == FRAME_ACK:
                self._on_ack(plaintext, pos, end, now)
            elif ftype == FRAME_PING:
                eliciting = True
                self._acks.owe(FIRST_STREAM, urgent=True)
            elif ftype == FRAME_PATH_CHALLENGE and length == PATH_DATA_SIZE:
                self._responses.append((plaintext[pos:end], addr))
            elif ftype == FRAME_PATH_RESPONSE and length == PATH_DATA_SIZE:
                self._on_path_response(plaintext[pos:end], addr, now)
            # Unknown frame types (and PADDING) are skipped: newer peers may send more.
        return eliciting

    def _on_data(self, stream_id: int, offset: int, payload: bytes) -> None:
        stream = self._in.get(stream_id)
        if stream is None:
            return  # a stream this side has not opened (see open_stream)
        data, how = stream.receive(offset, payload)
        if data:
            self._events.append(DataReceived(data, stream_id))
        # Out of order (a gap) or a duplicate (our ack was lost): tell the sender now.
        self._acks.owe(stream_id, urgent=how != RecvStream.IN_ORDER or stream_id in self._urgent)

    def _on_ack(self, plaintext: bytes, pos: int, end: int, now: float) -> None:
        if end - pos < ACK_HEADER.size:
            return
        stream_id, largest_pn, delay_us, cum, span, count = ACK_HEADER.unpack_from(plaintext, pos)
        if count > MAX_ACK_RANGES or end - pos != ACK_HEADER.size + count * GAP.size:
            return
        stream = self._out.get(stream_id)
        if stream is None:
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
        if lost:
            self._cc.on_loss(lost_sent, now)
        self._loss.on_tx(resolved, lost)

    # -- timers and output -------------------------------------------------------------

    def _rto(self) -> float:
        rto = max(self._rtt.rto(), self._trusted.get(self.peer_addr, 0.0))
        return min(rto * (1 << self._backoff), max(rto, MAX_BACKOFF_RTO_SECS))

    def _rto_deadline(self) -> Optional[float]:
        sent = [t for t in (stream.oldest_sent() for stream in self._send_order)
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
        lost, lost_sent = 0, float("-inf")
        for stream in self._send_order:
            stream_lost, stream_sent = stream.on_timeout(now, rto)
            lost, lost_sent = lost + stream_lost, max(lost_sent, stream_sent)
        self._loss.on_tx(lost, lost)
        if self._backoff:
            self._cc.on_timeout(now)
        else:
            self._cc.on_loss(lost_sent, now)
        if self._rto() < MAX_BACKOFF_RTO_SECS:
            self._backoff += 1

    def _data_pending(self) -> bool:
        cwnd = self._cc.cwnd
        return any(stream.has_pending() and (stream.stream_id in self._urgent
                                             or stream.has_room(cwnd))
                   for stream in self._send_order)

    def _next_ping(self) -> float:
        """When the client pings next: every RTO until it first hears the server under these
        keys, every OUTAGE_PROBE(_SLOW)_SECS while the path seems down, else every
        KEEPALIVE_SECS."""
        last, rto = self._last_eliciting_sent, self._rtt.rto()
        if not self._heard:
            return last + rto
        silent_since = self._unanswered_since
        if silent_since is None:
            return last + KEEPALIVE_SECS
        fast = last - silent_since < OUTAGE_FAST_SECS
        probe = OUTAGE_PROBE_SECS if fast else OUTAGE_PROBE_SLOW_SECS
        return max(silent_since + rto, last + probe)

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
            out.append((self._seal(encode_frame(FRAME_PATH_RESPONSE, data), now), addr))
        if probe is not None and now >= probe.next_challenge and self._may_challenge():
            data = probe.challenge(now, self._rto())
            datagram = self._seal(encode_frame(FRAME_PATH_CHALLENGE, data), now)
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

    def _build_payload(self, now: float, with_data: bool, ping: bool) -> Tuple[bytes, int]:
        """Frames for the next packet: ACKs, a PING, then stream data, urgent streams first."""
        parts = []
        if self._acks.owed() or self._acks.due(now):  # due, or riding along for free
            parts += self._acks.frames(now, self._in)
        if ping:
            parts.append(encode_frame(FRAME_PING, b""))
        space = MAX_PAYLOAD - sum(len(p) for p in parts)
        data_bytes = 0
        if with_data:
            pn = self._next_pn
            for stream in self._send_order:
                urgent = stream.stream_id in self._urgent  # small: exempt from the window
                while space > DATA_OVERHEAD and (urgent or stream.has_room(self._cc.cwnd)):
                    chunk = stream.take(pn, now, space - DATA_OVERHEAD)
                    if chunk is None:
                        break
                    offset, data = chunk
                    parts.append(data_frame_header(stream.stream_id, offset, len(data)))
                    parts.append(data)
                    space -= DATA_OVERHEAD + len(data)
                    data_bytes += len(data)
        if ping and not self._heard and space >= FRAME.size:
            # A full datagram lets the server send 3 back to an address it has not validated.
            parts.append(encode_frame(FRAME_PADDING, bytes(space - FRAME.size)))
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
