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
                | more:1 bit | n:15 bits | n x (gap_start-cum:u32, gap_length:u32)
                the first n gaps above cum, as many as fit in the packet; [cum, high) is the
                region they describe.  ``more`` set: the receiver holds data above high too
                (gaps left out), so the sender infers nothing about bytes above high
    PING  (3) = (empty)   the client pings when idle; the server answers with an ACK at once
    PATH_CHALLENGE (4) = data:8   "prove you receive at this address": answered at once ...
    PATH_RESPONSE  (5) = data:8   ... to the address the challenge came from, echoing data
    PADDING (6) = zeros   fills the client's first pings under new keys to a full datagram,
                          and a size probe (a PATH_CHALLENGE) to the size it tries

Timers, acks and losses, in short: the receiver acks every 10th ack-eliciting packet or within
10 ms, and at once when data arrives out of order, twice, or on an urgent stream, or for a
ping.  Every ACK names the largest packet number received and how long the ack was held, so
each ack yields a clean RTT sample (Jacobson/Karels; no retransmission ambiguity).  A sender
declares a packet's data lost when a packet sent 3 later, or 9/8 RTT later, was acked while
that data is still in a reported gap, and resends it at once.  Data unacked past the RTO
(clamped to 50 ms..1 s, doubled per repeated timeout up to 2 s) is resent too: on a first
timeout only what expired, on a repeat (an outage) everything, two packets at a time.
Congestion control (CongestionControl, one per Connection, shared by every stream) models
the path as BBR does: the bottleneck rate from delivery-rate samples and the round trip from
the smallest RTT; it paces at that rate and keeps about two round trips' worth in flight, so
the bottleneck queue stays a fraction of an RTT (a Ctrl-C's prompt does not wait behind it).
Random loss is not congestion; a queue that stays while we drain is another flow's (TCP),
and then losses count and the window follows the RTT, to take a fair share.  Urgent streams
go first and skip the window and the pacer, then stream 0, then the others.  On a lossy
path, small packets (keystrokes, echoes) are sent twice so that a round trip usually needs
no retransmission.  Packet numbers stop at PACKET_NUMBER_LIMIT (silence until a re-key).
While the server is silent, the client probes with pings every 20 ms (every 250 ms after
10 s), so a session recovers within one probe interval of an outage ending, whatever the
backed-off timers say.

Roaming and path validation (as QUIC does): replies go to the peer's validated address.  An
authentic, fresh packet from another address does not move them at once (anyone on the path
can replay a captured datagram from anywhere): the new address gets a PATH_CHALLENGE, and
becomes the peer's address once a PATH_RESPONSE echoing it comes back from there.  Until
then that address receives at most 3x the bytes that came from it (challenges, and copies
of what goes to the old address, so a genuine roam gets its output within a round trip,
validation or not).  The server's first address (no earlier one to keep using) is adopted
at once under the same 3x limit; the client pads its first packets to a full datagram so
that the limit covers a screenful.

Datagram size (DPLPMTUD, RFC 8899, as QUIC does it): every path carries MAX_DATAGRAM (1200)
bytes, the base size, and a datagram grows past it only where a probe proved the path
carries it.  Once the peer answers on a path, the sender tries PROBE_SIZES in turn with a
PATH_CHALLENGE padded to the size; the answer raises the path's size, MAX_PROBES unanswered
ones (while the peer is heard otherwise) end the search until PROBE_RAISE_SECS later.  A probe
carries no stream data: its loss is neither congestion nor a retransmission.  The sockets
ask the kernel never to fragment (IP_PMTUDISC_PROBE); where that cannot be asked, or on a
TCP carrier, the size stays at the base.  A new path (another peer address, a resume's
re-key, a carrier) starts over at the base size; BLACK_HOLE_LOSSES lost datagrams above it
in a row (the path's MTU shrank) fall back to it and search again.  Receivers refuse
anything above LARGEST_DATAGRAM.

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
import sys
from collections import deque
from typing import NamedTuple, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from moshpit import MAX_DATAGRAM

__all__ = [  # the API; the tuning constants and building blocks stay importable for tests
    "CIPHERS", "CLIENT_TO_SERVER", "SERVER_TO_CLIENT", "MAX_PAYLOAD", "ReplayWindow",
    "PacketCipher", "encode_frame", "data_frame_header", "decode_frames", "FIRST_STREAM",
    "MAX_STREAM_ID", "SEND_WINDOW", "DataReceived", "PeerAddressChanged", "Connection",
    "TRANSIENT_ERRNOS", "udp_socket", "UdpLink", "LARGEST_DATAGRAM",
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
MAX_PAYLOAD = MAX_DATAGRAM - OVERHEAD  # plaintext frames per datagram of the base size
# The largest datagram sent (once a probe proved the path carries it) or received: larger
# ones are refused. 16 KiB: per MB of bulk data it takes 64 datagrams (the base size: 870),
# and each costs a decryption, a frame walk and an ACK's bookkeeping in Python; beyond it the
# per-datagram saving is small against what one loss costs (see README, Datagram size).
LARGEST_DATAGRAM = 16384
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
        if not OVERHEAD <= len(datagram) <= LARGEST_DATAGRAM or datagram[0] != PACKET_FLAGS:
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
ACK_HEADER = struct.Struct("!BQIQIH")
GAP = struct.Struct("!II")
MORE_GAPS = 0x8000  # in an ACK's gap count: gaps above the reported region were left out
FRAME_DATA, FRAME_ACK, FRAME_PING = 1, 2, 3
FRAME_PATH_CHALLENGE, FRAME_PATH_RESPONSE, FRAME_PADDING = 4, 5, 6
PATH_DATA_SIZE = 8  # random bytes a challenge carries and its response echoes
DATA_OVERHEAD = FRAME.size + DATA_HEADER.size
DATA_FRAME_TYPE = bytes((FRAME_DATA,))  # a packet starting with it may be one DATA frame
MAX_STREAM_CHUNK = MAX_PAYLOAD - DATA_OVERHEAD


def encode_frame(ftype: int, body: bytes) -> bytes:
    """One frame: ``type | length | body``."""
    return FRAME.pack(ftype, len(body)) + body


DATA_FRAME_HEADER = struct.Struct("!BHBQ")  # FRAME then DATA_HEADER, packed in one go


def data_frame_header(stream_id: int, offset: int, length: int) -> bytes:
    """The bytes before ``length`` bytes of stream data in a DATA frame (the data follows
    as it is, so a full packet's worth is not copied once more)."""
    return DATA_FRAME_HEADER.pack(FRAME_DATA, DATA_HEADER.size + length, stream_id, offset)


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

SEND_WINDOW = 1024 * 1024  # per stream (default): unacked + queued bytes before writable() is False
MAX_REORDER_SEGMENTS = 1024  # out-of-order pieces a receiver buffers per stream
# Gaps an ACK frame may report: every gap a receiver can have (each lies below a buffered
# piece).  An ACK reports as many of the lowest as fit in its packet: 170 or so in a
# 1500-byte-MTU datagram, all of them in a 16 KiB one.
MAX_ACK_RANGES = MAX_REORDER_SEGMENTS
MAX_FLIGHT_RECORDS = 1024  # packets in flight per stream, however small their data
# Acked bytes a send buffer drops at once, at least (and at least as many as it still holds):
# dropping the front of a bytearray at every ACK made the next write copy the whole buffer.
SEND_BUFFER_TRIM = 64 * 1024

ACK_EVERY = 10  # ack-eliciting packets received before an ACK goes out at once (fewer acks:
# less CPU at both ends in bulk; loss is still reported at once, as a gap)
ACK_DELAY_SECS = 0.010  # otherwise an ACK leaves at most this late
KEEPALIVE_SECS = 3.0  # the client pings after this long without sending anything ack-eliciting
# Outage probing: once a packet the client sent has gone unanswered for longer than an RTO,
# it pings every OUTAGE_PROBE_SECS for the first OUTAGE_FAST_SECS of the silence, then every
# OUTAGE_PROBE_SLOW_SECS. The session recovers within one probe interval (plus a round trip) of
# the path coming back, instead of waiting out backed-off retransmission timers; mosh probes
# about as often. Each probe is one ~50-byte datagram.
OUTAGE_PROBE_SECS, OUTAGE_FAST_SECS, OUTAGE_PROBE_SLOW_SECS = 0.02, 10.0, 0.25
# A client reachable at all is heard at least every KEEPALIVE_SECS (and every outage probe
# while it misses us), so one unheard for two keepalives is away (gone, asleep, cut off):
# the server then stops its retransmission timer instead of resending to nobody every
# MAX_BACKOFF_RTO_SECS for as long as a detached session lives. The client's next packet
# (a probe when the path returns, a resume's re-key) restarts it, due at once.
PEER_AWAY_SECS = 2 * KEEPALIVE_SECS
PACKET_THRESHOLD = 3  # a packet is lost once one sent this many later was acked ...
TIME_THRESHOLD = 9 / 8  # ... or one sent this many RTTs later
INITIAL_RTT_SECS = 0.1
MIN_RTO_SECS, MAX_RTO_SECS, MAX_BACKOFF_RTO_SECS = 0.05, 1.0, 2.0
MSS = MAX_STREAM_CHUNK  # stream bytes in a datagram of the base size (a path's own may be more)
INITIAL_CWND, MAX_CWND = 32 * MSS, 4 * 1024 * 1024  # bytes, whatever the datagram size
MIN_CWND_PACKETS = 4  # the window's floor, in datagrams of the path's size
TIMEOUT_CWND_PACKETS = 2  # after repeated timeouts (an outage): probe gently
# Congestion control (CongestionControl, BBR-style: see its docstring for the why)
STARTUP_GAIN = 2.885  # 2/ln 2: doubles the delivery rate each round trip in STARTUP
FULL_BW_GROWTH, FULL_BW_ROUNDS = 1.25, 3  # STARTUP ends after 3 rounds without 25% more
HYSTART_SAMPLES = 8  # ... or once this many RTT samples of a round show a queue growing
HYSTART_MIN_RISE_SECS, HYSTART_MAX_RISE_SECS = 0.004, 0.016  # over the last round's RTT
PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # pacing gain per phase of PROBE_BW
CRUISE_PHASE = 2  # where PROBE_BW starts: after DRAIN there is nothing to drain
DRAIN_GAIN = 0.75  # a cruise phase's gain while the RTT still shows a queue
CWND_GAIN = 2.0  # in flight: this many path round trips' worth (acks come in lumps)
BW_WINDOW_ROUNDS = 10  # the rate estimate is the largest sample of this many round trips
MIN_RTT_WINDOW_SECS = 3.0  # the path's RTT is the smallest sample of this long (a path
# that got slower, or a queue that never empties, becomes the new normal after that)
RTT_FLOOR_SECS = 1e-4  # no path is faster (a zero-delay fake clock would divide by zero)
PATH_CHANGE_FACTOR = 2.0  # a new min_rtt this many times the old: the path changed
QUEUE_TOLERANCE, QUEUE_SLACK_SECS = 0.25, 0.002  # RTT above min x 1.25 + 2 ms = a queue
COMPETE_ROUNDS = 6  # a queue that outlives this many rounds of draining is not ours
COMPETE_DRAIN_GAIN = 0.5  # while competing, the drain phase: empties a queue of our own
LOSS_BETA = 0.7  # rate kept after a loss round, while competing
MAX_LOSS_CREDIT = 0.5  # random loss the rate estimate makes up for (50%: twice the rate)
# Bytes a stream may hold queued (unsent) before writable() is False: this long at the rate
# data leaves (Connection._send_rate), at least SEND_QUEUE_MIN. Output waiting here would
# delay the prompt after a Ctrl-C as much as a network queue would.
SEND_QUEUE_SECS, SEND_QUEUE_MIN = 0.01, 8 * 1024
PACING_BURST_PACKETS = 10  # datagrams of the path's size that may leave back to back ...
PACING_QUANTUM_SECS = 0.005  # ... or this much time's worth at the pacing rate, if more (a
# busy host wakes the sender late: a smaller bucket would cap the rate below the pacing rate)
URGENT_UNPACED = PACING_BURST_PACKETS * MAX_DATAGRAM  # an urgent stream's bytes in flight
# that skip the pacer (its records are small: the path's datagram size does not matter)
MAX_BATCH = 64  # datagrams per datagrams_to_send() call, so the caller gets to read too
CORK_SECS = 0.001  # a stream that filled a datagram: its tail waits this long for more
SENT_RING = 4096  # send times remembered, by packet number, for RTT samples
# Packet numbers are nonces: one must never repeat under a key. A Connection never seals one
# at or past PACKET_NUMBER_LIMIT (2^62, a quarter of the u64 space: years at any rate): it
# falls silent and stops counting what it hears as contact, so the session's silence rule
# starts a resume handshake, whose fresh keys restart the numbers at 0.
PACKET_NUMBER_LIMIT = 1 << 62
SMALL_PACKET = 256  # stream data this small is sent twice when the path is lossy ...
LOSSY = 0.05  # ... i.e. when this fraction of our packets were found lost recently
AMPLIFICATION_FACTOR = 3  # bytes sent to an unvalidated address per byte received from it
CHALLENGES_KEPT = 4  # recent challenges to an address that a response may answer
PENDING_RESPONSES = 4  # challenges answered per flush; more in between are dropped
# The first packet number not sealed under a key: room is kept for one more flush's path
# datagrams (PENDING_RESPONSES and a challenge) below PACKET_NUMBER_LIMIT.
SEND_PN_LIMIT = PACKET_NUMBER_LIMIT - PENDING_RESPONSES - 1
CHALLENGE_DATAGRAM = OVERHEAD + FRAME.size + PATH_DATA_SIZE  # and a response's size
# Datagram size discovery (DatagramSizer): the sizes tried above MAX_DATAGRAM, in order:
# 1500-byte Ethernet less IPv6 and UDP headers (IPv4's are smaller), a 9000-byte jumbo frame
# less the same, and the largest (loopback and other 64 KiB-MTU paths).
PROBE_SIZES = (1452, 8952, LARGEST_DATAGRAM)
MAX_PROBES = 3  # unanswered probes of a size (the peer heard meanwhile) before it fails
PROBE_RAISE_SECS = 600.0  # a size that failed is tried again after this long (RFC 8899)
PROBES_KEPT = 4  # outstanding probes an answer may match (a late answer still counts)
BLACK_HOLE_LOSSES = 6  # datagrams above the base size lost in a row: the path shrank


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


class WindowedMax:
    """The largest value seen over the last ``span`` units of a clock (rounds, seconds), in
    O(1) per update (a deque of candidates, each larger than every later one).  Old entries
    leave only when a new value arrives: a filter nobody feeds keeps its answer."""

    def __init__(self, span: float, sign: float = 1.0) -> None:
        self._span = span
        self._sign = sign  # -1: the smallest value instead
        self._items: deque = deque()  # (clock, signed value), signed values decreasing

    def update(self, clock: float, value: float) -> None:
        signed, items = self._sign * value, self._items
        while items and items[-1][1] <= signed:
            items.pop()
        items.append((clock, signed))
        while items[0][0] < clock - self._span:
            items.popleft()

    def get(self, default: float) -> float:
        return self._sign * self._items[0][1] if self._items else default

    def reset(self, clock: float, value: float) -> None:
        self._items.clear()
        self.update(clock, value)


class CongestionControl:
    """How much may be in flight and how fast to send it: a model of the path, BBR-style.

    Two numbers describe a path: its bottleneck rate (``bw``, the largest delivery rate seen
    over the last BW_WINDOW_ROUNDS round trips) and its round trip with empty queues
    (``min_rtt``, the smallest over MIN_RTT_WINDOW_SECS).  Their product is what the path
    holds without queueing.  We pace at ``bw`` times a gain that cycles through 1.25 (probe
    for more), 0.75 (drain what the probe queued) and 1 (cruise; 0.75 while the RTT still
    shows a queue), and cap what is in flight at CWND_GAIN times the product plus what the
    peer's delayed acks hold back, so the bottleneck queue stays a fraction of a round trip
    and a Ctrl-C's prompt does not wait behind it.  STARTUP grows the rate 2.89x per round
    until it stops growing, DRAIN empties what that queued, then PROBE_BW cycles.

    Loss alone is not congestion (Wi-Fi, LTE): a loss while the RTT shows no queue changes
    nothing, and the delivery rate is scaled up by the path's loss rate (up to
    MAX_LOSS_CREDIT), so 50% random loss still fills the link.  But a loss-based flow (TCP)
    on the same bottleneck keeps any queue full, and a delay-based sender alone would yield
    to it until it starved.  So when the queue has stayed for COMPETE_ROUNDS round trips
    while we drained (a queue of ours would have emptied), it is someone else's:
    ``competing`` then sizes the window and the gain cycle by the current RTT (queue
    included) and treats a loss round as congestion (rate x LOSS_BETA), as TCP does, until
    an RTT near ``min_rtt`` shows the queue empty again.  Sans-IO: the Connection reports
    sends, acks and losses with the time.
    """

    STARTUP, DRAIN, PROBE_BW = "startup", "drain", "probe_bw"
    RING = 4096  # sent packets remembered, by packet number (like Connection._sent_at)

    def __init__(self, now: float) -> None:
        self.mode = self.STARTUP
        self.competing = False
        self.mss = MSS  # stream bytes per datagram on the path (the Connection sets the path's)
        self.delivered = 0  # bytes the peer has, by its acks: drives rate samples and rounds
        self.round = 0
        self.cwnd = float(INITIAL_CWND)
        self.pacing_rate = STARTUP_GAIN * INITIAL_CWND / INITIAL_RTT_SECS
        self._next_round_delivered = 0
        self._bw = WindowedMax(BW_WINDOW_ROUNDS)
        self._rtt = WindowedMax(MIN_RTT_WINDOW_SECS, sign=-1.0)
        self._srtt = INITIAL_RTT_SECS
        self._queue_seen = False  # the latest RTT sample showed a queue
        # HyStart++ (RFC 9406): the smallest RTT sample of the last round and of this one
        # so far, and how many samples this one had (of packets sent with more to send).
        self._last_round_min_rtt = self._round_min_rtt = float("inf")
        self._round_samples = 0
        self._full_bw, self._full_bw_rounds = 0.0, 0
        self._cycle, self._cycle_start = 0, now
        self._low_queue_round = 0  # the last round with an RTT sample near min_rtt
        self._recovery_start = float("-inf")  # losses of packets sent before it are old news
        self._timed_out = False
        self._delivered_at = now  # when ``delivered`` last grew (or the flight restarted)
        self._acked_sent_at = now  # when the newest acknowledged packet was sent
        self._sent_delivered = [0] * self.RING
        self._sent_delivered_at = [now] * self.RING
        self._sent_at = [now] * self.RING
        self._sent_after = [now] * self.RING  # _acked_sent_at as it was at the send
        self._sent_app_limited = [False] * self.RING

    @property
    def bw(self) -> float:
        """Bottleneck rate estimate, bytes per second (0: no sample yet)."""
        return self._bw.get(0.0)

    @property
    def min_rtt(self) -> float:
        return self._rtt.get(INITIAL_RTT_SECS)

    def on_send(self, pn: int, now: float, inflight: int, app_limited: bool) -> None:
        """Packet ``pn`` leaves with ``inflight`` bytes already out; ``app_limited``: the
        sender has nothing more to send (a rate measured over it says what the application
        offered, not what the path can do)."""
        if not inflight:  # a new flight: its rate is measured from here
            self._delivered_at = self._acked_sent_at = now
        slot = pn % self.RING
        self._sent_at[slot], self._sent_after[slot] = now, self._acked_sent_at
        self._sent_delivered[slot] = self.delivered
        self._sent_delivered_at[slot] = self._delivered_at
        self._sent_app_limited[slot] = app_limited

    def on_ack(self, now: float, delivered: int, pn: Optional[int], rtt: float, srtt: float,
               inflight: int, loss_rate: float) -> None:
        """An ACK: ``delivered`` more bytes reached the peer; ``pn`` is the newest packet
        acknowledged if that is news (``rtt``: its round trip without the peer's ack
        delay), else None.  ``inflight``: bytes still unacknowledged."""
        if delivered:
            self.delivered += delivered
            self._delivered_at = now
        self._srtt = srtt
        if pn is not None:
            self._timed_out = False
            old_min = self.min_rtt
            self._rtt.update(now, rtt)
            if self.min_rtt > PATH_CHANGE_FACTOR * old_min and self.mode != self.STARTUP:
                # The path itself got slower (a new route; the old minimum expired): what
                # we know of its rate is a guess now, so probe for it quickly again.
                self.mode, self._full_bw, self._full_bw_rounds = self.STARTUP, 0.0, 0
                self.competing, self._low_queue_round = False, self.round
            self._queue_seen = rtt > self._queue_threshold()
            self._on_rate_sample(pn, now, loss_rate, rtt)
        self._update_mode(now, inflight)

    def _queue_filled(self) -> bool:
        """STARTUP has filled the pipe: this round's RTT samples so far (HYSTART_SAMPLES at
        least) all exceed the last round's smallest by HyStart++'s threshold (RFC 9406),
        a queue that grew in one round trip. Waiting for FULL_BW_ROUNDS rounds of flat rate as
        well would keep STARTUP's gain for rounds that each add to the queue, up to twice
        the path's own RTT, and a Ctrl-C's prompt would wait behind it. Round against
        round, not against min_rtt: a path that just got slower (an old min_rtt) shows
        the same high RTT in every round, and is no reason to stop probing."""
        last = self._last_round_min_rtt
        if self._round_samples < HYSTART_SAMPLES or last == float("inf"):
            return False
        threshold = min(max(last / 8, HYSTART_MIN_RISE_SECS), HYSTART_MAX_RISE_SECS)
        return self._round_min_rtt >= last + threshold

    def _queue_threshold(self) -> float:
        """An RTT above this shows a queue at the bottleneck."""
        return self.min_rtt * (1 + QUEUE_TOLERANCE) + QUEUE_SLACK_SECS

    def _on_rate_sample(self, pn: int, now: float, loss_rate: float, rtt: float) -> None:
        """Bytes delivered between the delivery that preceded ``pn``'s send and its ack,
        over that time or over the time they took to send, whichever is longer, and never
        over less than a round trip (acks arriving in a clump, or sends in a burst, must
        not inflate the rate)."""
        slot = pn % self.RING
        sent_delivered, app_limited = self._sent_delivered[slot], self._sent_app_limited[slot]
        interval = max(now - self._sent_delivered_at[slot],
                       self._sent_at[slot] - self._sent_after[slot])
        self._acked_sent_at = self._sent_at[slot]
        new_round = sent_delivered >= self._next_round_delivered
        if new_round:  # everything delivered when pn left has been acked: a round trip
            self._next_round_delivered = self.delivered
            self.round += 1
            self._last_round_min_rtt = self._round_min_rtt
            self._round_min_rtt, self._round_samples = float("inf"), 0
        if not app_limited:
            self._round_min_rtt = min(self._round_min_rtt, rtt)
            self._round_samples += 1
        if not self._queue_seen:
            self._low_queue_round = self.round
        if interval > 0 and interval >= self.min_rtt:  # shorter: acks compressed, no rate
            rate = (self.delivered - sent_delivered) / interval
            if not self._queue_seen:  # random loss, not a queue overflowing: the path
                rate /= 1.0 - min(loss_rate, MAX_LOSS_CREDIT)  # carried the lost bytes too
            if not app_limited or rate > self.bw:
                self._bw.update(self.round, rate)
        if self.mode == self.STARTUP and not app_limited:
            if self._queue_filled():
                self.mode = self.DRAIN
            elif new_round:
                self._check_full_bw()

    def on_loss(self, sent_at: float, now: float) -> None:
        """Data sent at ``sent_at`` was lost: congestion only while competing (see class)."""
        if self.competing and sent_at > self._recovery_start:
            self._recovery_start = now
            self._bw.reset(self.round, self.bw * LOSS_BETA)
            self._set_rates()

    def on_timeout(self, now: float) -> None:
        """Repeated retransmission timeouts (an outage): probe with TIMEOUT_CWND_PACKETS
        until an ack shows the path is back; the model of the path is kept for then."""
        self._recovery_start = now
        self._timed_out = True
        self.cwnd = float(TIMEOUT_CWND_PACKETS * self.mss)

    def _check_full_bw(self) -> None:
        """STARTUP ends after FULL_BW_ROUNDS rounds without FULL_BW_GROWTH more rate."""
        if self.bw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw, self._full_bw_rounds = self.bw, 0
            return
        self._full_bw_rounds += 1
        if self._full_bw_rounds >= FULL_BW_ROUNDS:
            self.mode = self.DRAIN

    def _update_mode(self, now: float, inflight: int) -> None:
        if self.mode != self.STARTUP:
            # A queue that outlives our draining is someone else's.
            self.competing = self._queue_outlived_draining()
        drained = inflight <= self.bw * self.min_rtt or self._queue_outlived_draining()
        if self.mode == self.DRAIN and (self.competing or drained):
            self.mode, self._cycle, self._cycle_start = self.PROBE_BW, CRUISE_PHASE, now
        if self.mode == self.PROBE_BW and now - self._cycle_start >= self._base_rtt():
            self._cycle = (self._cycle + 1) % len(PROBE_GAINS)
            self._cycle_start = now
        self._set_rates()

    def _queue_outlived_draining(self) -> bool:
        """No RTT near min_rtt for COMPETE_ROUNDS rounds (we drain while a queue shows)."""
        return self.round - self._low_queue_round >= COMPETE_ROUNDS

    def _base_rtt(self) -> float:
        """The round trip the window and the gain cycle are sized by."""
        return max(self._srtt, self.min_rtt) if self.competing else self.min_rtt

    def _set_rates(self) -> None:
        if self.mode == self.STARTUP:
            gain = cwnd_gain = STARTUP_GAIN
        elif self.mode == self.DRAIN:
            gain, cwnd_gain = 1 / STARTUP_GAIN, STARTUP_GAIN
        else:
            gain, cwnd_gain = PROBE_GAINS[self._cycle], CWND_GAIN
            if gain < 1.0 and self.competing:
                gain = COMPETE_DRAIN_GAIN  # a queue of our own would empty: then we stop
            if gain == 1.0 and self._queue_seen and not self._queue_outlived_draining():
                gain = DRAIN_GAIN  # a queue of ours outlived its probe: drain it (a queue
                # that outlives this too is not ours: draining on would only starve us)
        rtt, bw = max(self._base_rtt(), RTT_FLOOR_SECS), self.bw
        # Floors: STARTUP never goes below its first guess (its early samples are a prompt's
        # few bytes), and no rate is so low that a keystroke's echo waits for the pacer.
        floor = MIN_CWND_PACKETS * self.mss
        if self.mode == self.STARTUP:
            floor = max(floor, INITIAL_CWND)
        self.pacing_rate = max(gain * bw, gain * floor / rtt)
        cwnd = max(cwnd_gain * bw * rtt + bw * ACK_DELAY_SECS, floor)
        self.cwnd = (float(TIMEOUT_CWND_PACKETS * self.mss) if self._timed_out
                     else min(cwnd, MAX_CWND))


class Pacer:
    """Token bucket that lets a burst of PACING_BURST_PACKETS datagrams out (``burst``
    bytes: the path's datagram size sets it), then paces at the rate."""

    def __init__(self, now: float) -> None:
        self.burst = PACING_BURST_PACKETS * MAX_DATAGRAM  # the Connection sets the path's
        self._tokens = float(self.burst)
        self._stamp = now

    def refill(self, now: float, rate: float) -> None:
        if now > self._stamp:
            cap = max(self.burst, rate * PACING_QUANTUM_SECS)
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
        # Written bytes from stream offset ``_origin`` (<= base) on: the acked ones at its
        # front are dropped in large steps (see SEND_BUFFER_TRIM), not on every ACK.
        self._buf = bytearray()
        self._origin = 0
        self._retx: list = []
        self._flight: deque = deque()
        self._received: list = []  # flat [s0, e0, s1, e1, ...] received above base (last ACK)
        self.peer_has = 0  # bytes the peer reported received, gaps excluded (rate samples)
        # The Connection's black-hole detection (see DatagramSizer): records above the base
        # size lost in a row, of those sent at or after ``big_since``, and when the newest
        # such record that did arrive was sent.
        self.big_losses = 0
        self.big_since = self.big_delivered_sent = float("-inf")
        self.corked_until = float("-inf")  # see tail_waits

    @property
    def end(self) -> int:
        return self._origin + len(self._buf)

    def write(self, data: bytes) -> None:
        self._buf += data

    def unacked(self) -> int:
        return self._origin + len(self._buf) - self.base

    def has_room(self) -> bool:
        """Whether another flight record may be made (the Connection checks the bytes)."""
        return len(self._flight) < MAX_FLIGHT_RECORDS

    def unsent(self) -> int:
        """Bytes written but never sent (retransmissions not counted: they are few)."""
        return self.end - self.next_new

    def has_pending(self) -> bool:
        """Anything to retransmit, or new data within the window."""
        if self._retx:
            return True
        next_new, base = self.next_new, self.base
        return next_new < self._origin + len(self._buf) and next_new < base + self.window

    def oldest_sent(self) -> Optional[float]:
        return self._flight[0][3] if self._flight else None

    def tail_waits(self, now: float, datagram_bytes: int) -> bool:
        """What is left to send would only partly fill a datagram, and until
        ``corked_until`` it waits for more: the stream filled a datagram lately, so more
        is likely on its way (a flood arrives a 4 KiB PTY read at a time), and sending each
        tail alone made a third more datagrams, each costing both ends a pass of Python."""
        return not self._retx and now < self.corked_until and self.unsent() < datagram_bytes

    def take(self, pn: int, now: float, max_len: int) -> Optional[Tuple[int, bytearray]]:
        """Up to ``max_len`` bytes to send in packet ``pn``: retransmissions first (a copy,
        as a bytearray: the packet's payload is joined from it, and converting it to bytes
        first would copy every byte sent once more)."""
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

    def _record(self, pn: int, now: float, start: int, stop: int) -> Tuple[int, bytearray]:
        self._flight.append((pn, start, stop, now))
        self.in_flight += stop - start
        origin = self._origin
        return start, self._buf[start - origin:stop - origin]

    def on_ack(self, cum: int, high: int, gaps: list, largest_acked: int, lost_before: float,
               more: bool = False) -> Optional[Tuple[int, int, int, float, int]]:
        """Apply an ACK: (bytes newly acked, records resolved, of which lost, newest lost's
        time, bytes newly reported received).

        ``gaps`` are the [start, end) ranges below ``high`` the peer still misses.  Records
        sent PACKET_THRESHOLD packets before ``largest_acked``, or before ``lost_before``,
        whose data is still missing, are lost.  With ``more``, the peer holds data above
        ``high`` too (it reports only as many gaps as fit in a packet) and the ACK says
        nothing about bytes there: a record reaching there stays in flight, and the ones
        sent after it with it, until an ACK covers it (inferring its loss would resend data
        the peer has).  Without, bytes above ``high`` are missing like a gap's.  None if
        the ACK is impossible (acks bytes never written): it is ignored.
        """
        if not cum <= high <= self.end:
            return None
        acked = 0
        if cum > self.base:
            acked = cum - self.base
            self.base = cum
            dead = cum - self._origin
            if dead >= SEND_BUFFER_TRIM and 2 * dead >= len(self._buf):
                del self._buf[:dead]
                self._origin = cum
            self.next_new = max(self.next_new, cum)
        received = self._received = []
        cur, missing = cum, 0
        for start, stop in gaps:
            if start > cur:
                received += (cur, start)
            cur = stop
            missing += stop - start
        if high > cur:
            received += (cur, high)
        has = high - missing
        delivered = max(0, has - self.peer_has)
        self.peer_has = max(has, self.peer_has)
        resolved, lost, lost_sent = 0, 0, 0.0
        pn_cutoff = largest_acked - PACKET_THRESHOLD
        flight = self._flight
        while flight:
            pn, start, stop, sent_at = flight[0]
            missing = False
            if stop > cum:
                if more and stop > high:
                    break
                if pn <= pn_cutoff or (pn < largest_acked and sent_at <= lost_before):
                    missing = self._queue_missing(start, stop)
                    if missing:
                        lost, lost_sent = lost + 1, sent_at
                elif not self._is_received(start, stop):
                    break
            if stop - start > MAX_STREAM_CHUNK:
                self._big_resolved(missing, sent_at)
            flight.popleft()
            self.in_flight -= stop - start
            resolved += 1
        return acked, resolved, lost, lost_sent, delivered

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
            if stop - start > MAX_STREAM_CHUNK:
                self._big_resolved(True, lost_sent)
            lost += 1
        return lost, lost_sent

    def _big_resolved(self, lost: bool, sent_at: float) -> None:
        """A record larger than a base-size datagram holds was acked or lost."""
        if not lost:
            self.big_losses = 0
            self.big_delivered_sent = max(self.big_delivered_sent, sent_at)
        elif sent_at >= self.big_since:
            self.big_losses += 1

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
        del self._buf[:offset - self._origin]
        self._origin = self.base = self.next_new = self.peer_has = offset
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
        if start == offset and not self._starts and 0 < len(data) <= self.window:
            self.offset = offset + len(data)  # in order, nothing buffered: the common case
            return data, self.IN_ORDER
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

    def ack_ranges(self, max_gaps: int = MAX_ACK_RANGES) -> Tuple[int, int, list, bool]:
        """(cumulative offset, end of the reported region, its gaps, whether more data is
        held above it): the first ``max_gaps`` gaps, the region ending where the next would
        start (or where the held data ends)."""
        gaps = []
        cur = self.offset
        for start in self._starts:
            if start > cur:
                if len(gaps) == max_gaps:
                    return self.offset, cur, gaps, True
                gaps.append((cur, start))
            cur = max(cur, start + len(self._pieces[start]))
        return self.offset, cur, gaps, False

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

    def frames(self, now: float, streams: dict, space: int) -> list:
        """ACK frames for every stream owed one (``streams``: id -> RecvStream), their gaps
        within ``space`` bytes (a packet's payload) in all; resets."""
        delay_us = min(int((now - self._largest_time) * 1e6), 0xFFFFFFFF)
        frames = []
        for stream_id in sorted(self._streams) or (FIRST_STREAM,):
            space -= FRAME.size + ACK_HEADER.size
            cum, high, gaps, more = streams[stream_id].ack_ranges(max(0, space // GAP.size))
            space -= len(gaps) * GAP.size
            body = [ACK_HEADER.pack(stream_id, max(self.largest_pn, 0), delay_us, cum,
                                    high - cum, len(gaps) | (MORE_GAPS if more else 0))]
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


class DatagramSizer:
    """The largest datagram one path is known to carry, and the search for a larger one
    (DPLPMTUD, RFC 8899, simplified; sans-IO, the Connection drives it with its clock).

    ``size`` starts at MAX_DATAGRAM, which every path carries.  While searching, the next of
    PROBE_SIZES (up to ``ceiling``) is probed: the Connection sends a PATH_CHALLENGE padded to
    it, and its answer (``answered``) makes it the path's size and moves on to the next.  An
    unanswered probe counts as a failure only if the peer was heard after it left (a silent
    peer is an outage, not a verdict on the size: the probe is retried, backing off);
    MAX_PROBES failures, or the kernel refusing the size (``too_big``), end the search until
    PROBE_RAISE_SECS later.  ``black_hole`` (datagrams of the current size vanishing while
    smaller ones arrive) falls back to MAX_DATAGRAM and searches again at once.
    """

    def __init__(self, now: float, ceiling: int) -> None:
        self.size = MAX_DATAGRAM
        self._ceiling = ceiling
        self._limit = ceiling  # sizes above it are not tried (until the raise timer)
        self._target = 0  # the size being probed (0: not searching)
        self.next_probe: Optional[float] = None  # when a probe (or its verdict) is due
        self._failures = 0
        self._backoff = 0  # doublings of the retry wait while the peer is silent
        self._sent_at: Optional[float] = None  # the last probe's, while unanswered
        self._outstanding: deque = deque(maxlen=PROBES_KEPT)  # (challenge data, size)
        self._search(now)

    def _search(self, now: float) -> None:
        """Probe the next size above ``size`` allowed, at once; or stop if there is none."""
        larger = [size for size in PROBE_SIZES if self.size < size <= self._limit]
        self._target = larger[0] if larger else 0
        self._failures, self._backoff, self._sent_at = 0, 0, None
        if self._target:
            self.next_probe = now
        elif self._limit < self._ceiling:  # a size failed: try it again much later
            self.next_probe = now + PROBE_RAISE_SECS
        else:
            self.next_probe = None

    def due(self, now: float, last_heard: float) -> int:
        """The size to probe now (0: none). Settles the previous probe's fate first."""
        if self.next_probe is None or now < self.next_probe:
            return 0
        if not self._target:  # the raise timer: the failed size may work now
            self._limit = self._ceiling
            self._search(now)
            return self.due(now, last_heard)
        if self._sent_at is not None:  # the last probe went unanswered
            if last_heard > self._sent_at:
                self._failures += 1
                self._backoff = 0
            else:
                self._backoff = min(self._backoff + 1, 6)
            if self._failures >= MAX_PROBES:
                log.debug("datagram size %d not carried: staying at %d", self._target, self.size)
                self._limit = self._target - 1
                self._search(now)
                return 0
        return self._target

    def sent(self, data: bytes, size: int, now: float, timeout: float) -> None:
        """A probe of ``size`` with challenge ``data`` left; its verdict is due after
        ``timeout`` (doubled per retry the silent peer left unanswered)."""
        self._outstanding.append((data, size))
        self._sent_at = now
        self.next_probe = now + min(timeout * (1 << self._backoff), MAX_BACKOFF_RTO_SECS)

    def answered(self, data: bytes, now: float) -> Optional[bool]:
        """A PATH_RESPONSE: None if it answers none of our probes, else whether ``size`` grew."""
        size = next((size for challenge, size in self._outstanding
                     if secrets.compare_digest(challenge, data)), 0)
        if not size:
            return None
        if size <= self.size:
            return False  # a late answer to a smaller probe
        self.size = size
        self._search(now)
        return True

    def too_big(self, size: int, now: float) -> bool:
        """The kernel refused to send ``size`` bytes (EMSGSIZE: the interface's MTU is
        smaller). Returns whether ``size`` (the path's own) falls back to MAX_DATAGRAM."""
        if size <= MAX_DATAGRAM or size > self._limit:
            return False  # the base size (it is sent regardless), or known too big already
        self._limit = size - 1
        fallback = size <= self.size
        if fallback:
            self.size = MAX_DATAGRAM
        self._search(now)
        return fallback

    def black_hole(self, now: float) -> None:
        """Datagrams of ``size`` stopped arriving: back to MAX_DATAGRAM, search again."""
        self.size = MAX_DATAGRAM
        self._search(now)


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
    The server has no timer of its own while nothing is unacknowledged, and none while the
    client is away (PEER_AWAY_SECS): an idle or detached session's server sleeps until a
    packet or its own program's event.

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
        self._fixed_size: set = set()  # paths that carry MAX_DATAGRAM at most (TCP carriers)
        self._size_ceiling = MAX_DATAGRAM  # see allow_larger_datagrams
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
        """Room in the stream's send window, and little waiting to be sent (what leaves in
        SEND_QUEUE_SECS, see _send_rate): its writer reads its source only while True (the
        server's PTY for stream 0: back-pressure). What waits here would delay the answer
        to a Ctrl-C as a network queue does."""
        return self.send_room(stream_id) > 0

    def send_room(self, stream_id: int = FIRST_STREAM) -> float:
        """Bytes the stream takes before ``writable`` turns False (<= 0: none), so that a
        writer with several reads to hand over asks once, not after each."""
        stream = self._out[stream_id]
        queue_limit = max(SEND_QUEUE_MIN, self._send_rate() * SEND_QUEUE_SECS)
        return min(stream.window - stream.unacked(), queue_limit - stream.unsent())

    def _send_rate(self) -> float:
        """Bytes per second that leave at most: the pacing rate, or a window per round trip
        if that is less (STARTUP's rate comes from min_rtt, which a path that just got
        slower leaves far too small for a while: hundreds of Mbit/s on a 10 Mbit/s link)."""
        rtt = max(self._rtt.srtt, self._rtt.latest, RTT_FLOOR_SECS)
        return min(self._cc.pacing_rate, self._cc.cwnd / rtt)

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

    def allow_larger_datagrams(self, ceiling: int = LARGEST_DATAGRAM) -> None:
        """The caller's socket never lets the kernel fragment (IP_PMTUDISC_PROBE): datagrams
        may grow to ``ceiling`` bytes on a path that a probe showed carries them (see
        DatagramSizer). Without this call every datagram stays at MAX_DATAGRAM."""
        ceiling = max(MAX_DATAGRAM, min(ceiling, LARGEST_DATAGRAM))
        if ceiling != self._size_ceiling:
            self._size_ceiling = ceiling
            self._restart_sizing(self._now)

    @property
    def size_ceiling(self) -> int:
        """What ``allow_larger_datagrams`` allowed (MAX_DATAGRAM: nothing more)."""
        return self._size_ceiling

    @property
    def datagram_size(self) -> int:
        """The largest datagram sent on the path in use now."""
        return self._sizer.size

    def datagram_too_big(self, size: int, addr: object) -> None:
        """The kernel refused to send ``size`` bytes to ``addr`` (EMSGSIZE): the path's size
        falls back if it was that large (what was in it is lost, and resent as such)."""
        if addr == self.peer_addr and self._sizer.too_big(size, self._now):
            log.info("%s: the kernel refuses %d-byte datagrams: back to %d", self.role, size,
                     MAX_DATAGRAM)
            self._apply_size(self._now)

    def trust_path(self, addr: object, min_rto: float = 0.0, fixed_size: bool = False) -> None:
        """``addr`` is a path the peer was authenticated on by other means (a TCP carrier that
        was the handshake's own connection; for the client, its server's UDP address too).
        The server moves its replies to a trusted path as soon as the newest packet arrives
        on it, without a challenge; the client never moves by itself (``use_path``).
        ``min_rto``: the retransmission timer's floor there (TCP retransmits on its own,
        so a datagram is only "lost" there when the carrier dropped it).  ``fixed_size``:
        the path carries MAX_DATAGRAM at most (a TCP carrier's frames): no size probes."""
        self._trusted[addr] = min_rto
        if fixed_size:
            self._fixed_size.add(addr)

    def forget_path(self, addr: object) -> None:
        """A trusted path is gone (its carrier closed)."""
        self._trusted.pop(addr, None)
        self._fixed_size.discard(addr)

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
            self._cc = CongestionControl(now)
        # What went to the old address meanwhile is lost if the peer left it (the usual
        # reason to move): resend it all now instead of waiting out the RTO. It is not
        # congestion; a copy that did arrive is only a duplicate to the receiver.
        self._backoff = 0
        self._restart_sizing(now)  # the new path's datagram size is unknown: the base size
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
        self._exhaustion_logged = False
        self._sent_at = [0.0] * SENT_RING
        self._largest_acked = -1
        self._acks = AckClock(now)
        self._rtt = RttEstimator()
        self._cc = CongestionControl(now)
        self._pacer = Pacer(now)
        self._restart_sizing(now)  # a resume may come over another path: start small
        self._backoff = 0
        self._last_eliciting_sent = float("-inf")
        self._unanswered_since: Optional[float] = None  # first ack-eliciting send since heard
        self._heard = False  # any authentic packet under these keys yet
        self._more = False

    # -- datagram size (DatagramSizer) ---------------------------------------------------

    def _restart_sizing(self, now: float) -> None:
        self._sizer = DatagramSizer(now, self._size_ceiling)
        self._apply_size(now)

    def _apply_size(self, now: float) -> None:
        """The path's datagram size changed: chunks, window floors and pacing burst follow;
        losses of larger datagrams sent before now say nothing about this size."""
        size = self._sizer.size
        self._max_payload = size - OVERHEAD
        self._cc.mss = size - OVERHEAD - DATA_OVERHEAD
        self._pacer.burst = PACING_BURST_PACKETS * size
        for stream in self._out.values():
            stream.big_losses, stream.big_since = 0, now
            stream.big_delivered_sent = now

    def _sizing(self, now: float) -> bool:
        """Whether size probes may go out now: the peer answers under these keys, is not
        away, on a validated path that is not a TCP carrier."""
        return (self._sizer.next_probe is not None and self._heard and self._probe is None
                and self.peer_addr not in self._fixed_size
                and now - self.last_heard <= PEER_AWAY_SECS)

    def _size_probe(self, now: float, addr: object) -> list:
        """A PATH_CHALLENGE padded to the size being probed, if one is due."""
        size = self._sizer.due(now, self.last_heard)
        if not size:
            return []
        data = secrets.token_bytes(PATH_DATA_SIZE)
        challenge = encode_frame(FRAME_PATH_CHALLENGE, data)
        padding = bytes(size - OVERHEAD - len(challenge) - FRAME.size)
        datagram = self._seal(challenge + encode_frame(FRAME_PADDING, padding), now)
        self._sizer.sent(data, size, now, self._rto())
        return [(datagram, addr)]

    def _check_black_hole(self, now: float) -> None:
        """BLACK_HOLE_LOSSES datagrams above the base size lost in a row on a stream, and
        none sent later than a round trip and an RTO ago arrived: the path no longer carries
        them (its MTU shrank, a tunnel came up): back to the base size, which every path
        carries, and search again.  (The time rule keeps a burst of losses that one ACK
        reports, among arrivals it also reports, from looking like a black hole.)"""
        if self._sizer.size == MAX_DATAGRAM:
            return
        silent_since = now - self._rtt.rto() - self._rtt.srtt
        for stream in self._send_order:
            if (stream.big_losses >= BLACK_HOLE_LOSSES
                    and stream.big_delivered_sent < silent_since):
                log.info("%s: %d datagrams of %d bytes lost in a row: back to %d", self.role,
                         stream.big_losses, self._sizer.size, MAX_DATAGRAM)
                self._sizer.black_hole(now)
                self._apply_size(now)
                return

    # -- receiving ---------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        """Take one datagram from ``addr``; anything not authentic and fresh is ignored."""
        opened = self._rx.open(data)
        if opened is None:
            return
        pn, plaintext = opened
        silence = now - self.last_heard
        # (no RTO is below MIN_RTO_SECS: a flood's packets skip computing it)
        if silence > MIN_RTO_SECS and silence > self._rto():
            self._backoff = 0  # the peer is back after a silence: no more backed-off waiting
        self._now = now
        if not self.keys_exhausted():
            self.last_heard = now
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
        if addr == self.peer_addr:
            grew = self._sizer.answered(data, now)
            if grew is not None:  # one of our size probes
                if grew:
                    log.debug("%s: path carries %d-byte datagrams", self.role, self._sizer.size)
                    self._apply_size(now)
                return
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
        # Fast path: a packet that is one DATA frame (every packet of a bulk transfer but
        # the few carrying an ACK too) skips the generic frame walk.
        if plaintext[:1] == DATA_FRAME_TYPE:
            length = len(plaintext) - FRAME.size
            if length >= DATA_HEADER.size and plaintext[1] << 8 | plaintext[2] == length:
                stream_id, offset = DATA_HEADER.unpack_from(plaintext, FRAME.size)
                self._on_data(stream_id, offset, plaintext[DATA_OVERHEAD:])
                return True
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
        more, count = bool(count & MORE_GAPS), count & ~MORE_GAPS
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
        newest = None
        if self._largest_acked < largest_pn < self._next_pn:
            self._largest_acked = largest_pn
            self._backoff = 0
            if largest_pn >= self._next_pn - SENT_RING:
                newest = largest_pn
                self._rtt.sample(now - self._sent_at[largest_pn % SENT_RING], delay_us / 1e6)
        rtt = self._rtt
        lost_before = now - TIME_THRESHOLD * max(rtt.srtt, rtt.latest)
        result = stream.on_ack(cum, cum + span, gaps, self._largest_acked, lost_before, more)
        if result is None:
            return
        _acked, resolved, lost, lost_sent, delivered = result
        self._loss.on_tx(resolved, lost)
        if lost:
            self._cc.on_loss(lost_sent, now)
            self._check_black_hole(now)
        self._cc.on_ack(now, delivered, newest, rtt.latest, rtt.srtt, self._inflight(),
                        self._loss.rate)

    # -- timers and output -------------------------------------------------------------

    def _rto(self) -> float:
        rto = max(self._rtt.rto(), self._trusted.get(self.peer_addr, 0.0))
        return min(rto * (1 << self._backoff), max(rto, MAX_BACKOFF_RTO_SECS))

    def _rto_deadline(self) -> Optional[float]:
        """When the oldest packet in flight counts as lost (None: nothing in flight, or,
        for the server, a client away since before then: see PEER_AWAY_SECS)."""
        oldest = None
        for stream in self._send_order:  # a plain loop: this runs at every loop pass
            sent = stream.oldest_sent()
            if sent is not None and (oldest is None or sent < oldest):
                oldest = sent
        if oldest is None:
            return None
        deadline = oldest + self._rto()
        if not self._is_client and deadline > self.last_heard + PEER_AWAY_SECS:
            return None
        return deadline

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
        self._check_black_hole(now)
        if self._rto() < MAX_BACKOFF_RTO_SECS:
            self._backoff += 1

    # These run for every packet: plain loops over the few streams, no generators.

    def _inflight(self) -> int:
        """Bytes in flight on all streams: one congestion window serves them all."""
        total = 0
        for stream in self._send_order:
            total += stream.in_flight
        return total

    def _data_pending(self, inflight: int, now: float) -> bool:
        """A stream has data that may go now (``inflight``: ``_inflight()``)."""
        room = inflight < self._cc.cwnd
        urgent = self._urgent
        for stream in self._send_order:
            if not stream.has_pending():
                continue
            if stream.stream_id in urgent:
                return True
            if room and stream.has_room() and not self._tail_waits(stream, now):
                return True
        return False

    def _tail_waits(self, stream: SendStream, now: float) -> bool:
        """SendStream.tail_waits, for a datagram of the path's size carrying only data."""
        return stream.tail_waits(now, self._max_payload - DATA_OVERHEAD)

    def _cork_deadline(self) -> Optional[float]:
        """When a tail that waits for more (SendStream.tail_waits) goes anyway."""
        times = [stream.corked_until for stream in self._send_order
                 if stream.has_pending() and stream.corked_until > self._now]
        return min(times) if times else None

    def _urgent_pending(self) -> bool:
        """An urgent stream has data: it goes now, ahead of the pacer (small and rare; one
        that carries more, e.g. a command's stderr, is paced beyond a burst in flight)."""
        for stream_id in self._urgent:
            stream = self._out[stream_id]
            if stream.in_flight < URGENT_UNPACED and stream.has_pending():
                return True
        return False

    def _app_limited(self, now: float) -> bool:
        """Nothing more to send on any stream (the window is not what holds us back), or
        only a tail that waits for more."""
        return not any(stream.has_pending() and not self._tail_waits(stream, now)
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

    def keys_exhausted(self) -> bool:
        """The send key's packet numbers are used up (see PACKET_NUMBER_LIMIT): nothing more
        is sent until ``rekey``. The limit keeps room for one more flush's path datagrams."""
        return self._next_pn >= SEND_PN_LIMIT

    def next_timeout(self) -> Optional[float]:
        """Absolute time at which ``datagrams_to_send`` has something to do (None: never)."""
        if self.keys_exhausted():
            return None
        if self._responses:
            return self._now
        probe = self._probe
        times = [probe.next_challenge] if probe is not None and self._may_challenge() else []
        if self.peer_addr is None or self._budget_exhausted():
            return max(min(times), self._now) if times else None
        if self._more or self._acks.urgent or self._urgent_pending():
            return self._now
        times += [self._acks.deadline, self._rto_deadline()]
        if self._sizing(self._now):
            times.append(self._sizer.next_probe)
        if self._is_client:
            times.append(self._next_ping())
        if self._data_pending(self._inflight(), self._now):
            times.append(self._pacer.next_send_time(self._cc.pacing_rate))
        times.append(self._cork_deadline())
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
        if self.keys_exhausted():
            if not self._exhaustion_logged:
                self._exhaustion_logged = True
                log.warning("%s: packet numbers used up under these keys: silent until a "
                            "resume handshake re-keys", self.role)
            return []
        out = self._path_datagrams(now)
        addr = self.peer_addr
        if addr is None:
            return out
        if self._sizing(now):
            out += self._size_probe(now, addr)
        self._check_rto(now)
        rate = self._cc.pacing_rate
        pacer = self._pacer
        pacer.refill(now, rate)
        # This loop runs for every datagram of a bulk transfer: the checks that are false in
        # one (an exhausted key, an address on trial, an urgent stream) are inlined or
        # skipped on their cheap pre-condition.
        urgent_streams = self._urgent
        inflight = self._inflight()  # kept up to date here: only this loop sends
        while True:
            if len(out) >= MAX_BATCH:
                self._more = True
                break
            if self._next_pn >= SEND_PN_LIMIT:  # keys_exhausted, inlined
                break
            if self._probe is not None and self._budget_exhausted():
                break
            with_data = ((urgent_streams and self._urgent_pending())
                         or (pacer.ready() and self._data_pending(inflight, now)))
            ping = self._is_client and now >= self._next_ping()
            # A window of fewer than ACK_EVERY datagrams (a rate estimate that fell during a
            # stall) would have each flight's ACK held ACK_DELAY_SECS by the receiver, and
            # the rate measured from those ACKs would keep the window that small: a PING in
            # the datagram that fills the window has it acknowledged at once.
            ping = ping or (with_data and self._cc.cwnd < ACK_EVERY * self._max_payload
                            and inflight + self._max_payload >= self._cc.cwnd)
            if not (with_data or ping or self._acks.due(now)):
                break
            payload, data_bytes = self._build_payload(now, with_data, ping, inflight)
            if not payload:
                break
            copies = 2 if data_bytes > 0 and len(payload) <= SMALL_PACKET \
                and self._loss.rate > LOSSY else 1
            for _ in range(copies):
                datagram = self._seal(payload, now)
                pacer.spend(len(datagram))
                if self._probe is None:
                    out.append((datagram, addr))
                else:
                    out += [(datagram, dest)
                            for dest in self._destinations(len(datagram), data_bytes > 0)]
            if data_bytes:
                first_pn, app_limited = self._next_pn - copies, self._app_limited(now)
                for pn in range(first_pn, self._next_pn):
                    self._cc.on_send(pn, now, inflight, app_limited)
                inflight += data_bytes
            if data_bytes or ping:
                self._last_eliciting_sent = now
                if self._unanswered_since is None:
                    self._unanswered_since = now
        return out

    def _build_payload(self, now: float, with_data: bool, ping: bool,
                       inflight: int) -> Tuple[bytes, int]:
        """Frames for the next packet: ACKs, a PING, then stream data, urgent streams first
        (``inflight``: the bytes in flight before it)."""
        parts = []
        if self._acks.owed() or self._acks.due(now):  # due, or riding along for free
            # Gaps fill what the packet holds, less a PING's room (the datagram's size is
            # the path's: a larger one might not arrive).
            room = self._max_payload - (FRAME.size if ping else 0)
            parts += self._acks.frames(now, self._in, room)
        if ping:
            parts.append(encode_frame(FRAME_PING, b""))
        space = self._max_payload - sum(map(len, parts)) if parts else self._max_payload
        data_bytes = 0
        if with_data:
            pn, cwnd = self._next_pn, self._cc.cwnd
            for stream in self._send_order:
                if space <= DATA_OVERHEAD:
                    break  # full (a bulk packet, after its first stream)
                urgent = stream.stream_id in self._urgent  # small: exempt from the window
                while space > DATA_OVERHEAD and stream.has_room() and (urgent or inflight < cwnd):
                    chunk = stream.take(pn, now, space - DATA_OVERHEAD)
                    if chunk is None:
                        break
                    offset, data = chunk
                    parts.append(data_frame_header(stream.stream_id, offset, len(data)))
                    parts.append(data)
                    if len(data) == space - DATA_OVERHEAD and not urgent:
                        stream.corked_until = now + CORK_SECS  # a full datagram: a flood
                    space -= DATA_OVERHEAD + len(data)
                    data_bytes += len(data)
                    inflight += len(data)
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


# Linux UDP segmentation offloads (values from linux/udp.h; Python names them from 3.12 on
# at best): UDP_SEGMENT sends a run of equal-sized datagrams (the last may be shorter) in one
# sendmsg, UDP_GRO receives several back in one buffer with their size in a cmsg.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
GSO_MAX_BYTES = 65000  # a UDP payload, however many segments it is cut into
GRO_BUFFER = 65536
SEGMENT_SIZE = struct.Struct("=H")  # the UDP_SEGMENT cmsg (a C u16)
GRO_SIZE = struct.Struct("=i")  # the UDP_GRO cmsg (a C int)
GRO_CMSG_SPACE = socket.CMSG_SPACE(GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0
# What a kernel without the offload says; the link then sends one datagram per call.
GSO_UNSUPPORTED = frozenset(getattr(errno, name) for name in (
    "EIO", "EINVAL", "ENOPROTOOPT", "EOPNOTSUPP", "ENOTSUP") if hasattr(errno, name))


# Linux path MTU discovery modes (linux/in.h, linux/in6.h; Python names them on some builds
# only): PROBE sets "don't fragment" and ignores what ICMP says of the path, so a datagram
# larger than the path carries is dropped on the way, never fragmented, and the transport's
# own probes (DatagramSizer) find the size. Too large for the interface: EMSGSIZE at send.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_PROBE = getattr(socket, "IPV6_PMTUDISC_PROBE", 3)


def never_fragment(sock: socket.socket) -> bool:
    """Ask the kernel never to fragment ``sock``'s datagrams (PROBE mode); False where that
    cannot be asked (not Linux, an option refused), and datagrams must stay at MAX_DATAGRAM.
    An IPv6 socket needs the IPv4 option too: it may talk to IPv4-mapped peers."""
    if not sys.platform.startswith("linux"):
        return False  # the numbers above are Linux's
    options = [(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)]
    if sock.family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE))
    try:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
    except OSError as err:
        log.debug("cannot forbid fragmentation (%s): datagrams stay at %d bytes", err,
                  MAX_DATAGRAM)
        return False
    return True


def gso_runs(datagrams: list) -> list:
    """``(addr, segment size, [datagrams])`` runs that one UDP_SEGMENT send can carry: in
    order, same address, all of the first one's size but the last (which may be shorter),
    at most GSO_MAX_BYTES."""
    runs: list = []
    last = None
    for datagram, addr in datagrams:
        size = len(datagram)
        if (last is not None and addr == last[0] and size <= last[1]
                and last[3] + size <= GSO_MAX_BYTES and len(last[2][-1]) == last[1]):
            last[2].append(datagram)
            last[3] += size
        else:
            last = [addr, size, [datagram], size]
            runs.append(last)
    return [(addr, size, group) for addr, size, group, _total in runs]


class UdpLink:
    """A non-blocking UDP socket driving one Connection, for the caller's select loop.

    ``select([link, ...], [], [], link.timeout(now))``, then ``handle_readable(now)`` if it
    was readable, then ``flush(now)``.  Socket errors never escape: a vanished network
    looks like packet loss, which the Connection handles.  Where Linux offers them, runs of
    datagrams leave in one system call (UDP GSO) and arrive in one (UDP GRO): a bulk
    transfer makes a few dozen calls where it made a thousand; elsewhere, or if the kernel
    refuses, one datagram per call.
    """

    SOCKET_BUFFER = 4 * 1024 * 1024
    RECV_BATCH = 256  # datagrams per handle_readable(), so a flood cannot starve the loop

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        self.conn = conn
        self._use(sock)

    @property
    def _transport(self) -> Connection:
        return getattr(self.conn, "conn", self.conn)  # a session core wraps its Connection

    def _use(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.gso = sys.platform.startswith("linux")
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False
        if never_fragment(sock):
            self._transport.allow_larger_datagrams()

    @classmethod
    def bind(cls, conn: Connection, host: str = "0.0.0.0", port: int = 0) -> UdpLink:
        return cls(conn, udp_socket(host, port))

    @property
    def local_addr(self) -> tuple:
        return self.sock.getsockname()

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle_readable(self, now: float) -> None:
        """Feed every waiting datagram (up to RECV_BATCH reads) to the Connection."""
        receive = self.conn.receive_datagram
        read = self._read_coalesced if self.gro else self._read_one
        for _ in range(self.RECV_BATCH):
            try:
                data, segment, addr = read()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno not in TRANSIENT_ERRNOS:
                    log.debug("udp receive failed: %s", err)
                    return
                continue  # e.g. ICMP "port unreachable" reported on this socket
            if segment >= len(data):
                receive(data, addr, now)
                continue
            view = memoryview(data)
            for start in range(0, len(data), segment):
                receive(bytes(view[start:start + segment]), addr, now)

    def _read_one(self) -> tuple:
        # One byte more than any valid datagram: a larger one arrives too long and is refused.
        data, addr = self.sock.recvfrom(LARGEST_DATAGRAM + 1)
        return data, len(data), addr

    def _read_coalesced(self) -> tuple:
        """(bytes, size of each datagram in them, sender): GRO joins a sender's datagrams."""
        data, ancillary, _flags, addr = self.sock.recvmsg(GRO_BUFFER, GRO_CMSG_SPACE)
        segment = len(data)
        for level, kind, value in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= GRO_SIZE.size:
                segment = max(1, GRO_SIZE.unpack_from(value)[0])
        return data, segment, addr

    def flush(self, now: float) -> None:
        """Send whatever the Connection has due."""
        self.send_datagrams(self.conn.datagrams_to_send(now))

    def send_datagrams(self, datagrams: list) -> None:
        """Send ``(datagram, addr)`` pairs over UDP: runs in one call each where GSO works."""
        if not self.gso or len(datagrams) < 2:
            self._send_each(datagrams)
            return
        for addr, size, group in gso_runs(datagrams):
            if len(group) == 1:
                self._send_each([(group[0], addr)])
                continue
            try:  # one buffer per datagram: the kernel gathers them (no joined copy here)
                self.sock.sendmsg(group, [(SOL_UDP, UDP_SEGMENT, SEGMENT_SIZE.pack(size))], 0,
                                  addr)
            except OSError as err:
                if err.errno == errno.EMSGSIZE:
                    self._transport.datagram_too_big(size, addr)
                elif err.errno in GSO_UNSUPPORTED:
                    log.debug("udp segmentation offload refused (%s): one datagram per call", err)
                    self.gso = False
                    self._send_each([(datagram, addr) for datagram in group])
                elif err.errno not in TRANSIENT_ERRNOS:
                    log.debug("udp send to %s failed: %s", addr, err)

    def _send_each(self, datagrams: list) -> None:
        sendto = self.sock.sendto
        for datagram, addr in datagrams:
            try:
                sendto(datagram, addr)
            except OSError as err:
                if err.errno == errno.EMSGSIZE:
                    self._transport.datagram_too_big(len(datagram), addr)
                elif err.errno not in TRANSIENT_ERRNOS:
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
        self._use(new)
        return self.local_addr

    def close(self) -> None:
        self.sock.close()
