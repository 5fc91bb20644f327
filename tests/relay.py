"""Userspace network impairment relay for tests and benchmarks (loopback only).

Why: moshpit has no test hooks in its product code, so the tests put a relay *between* real
client and server processes.  The relay listens on a loopback ALIAS (the "front", e.g.
127.0.0.7) with the very same port numbers the server uses on the "back" address
(127.0.0.1).  The client dials ``front:P``; the server binds its session UDP socket on the
address of the accepted TCP connection (the back address) and names port ``U``; the client
then sends UDP to ``front:U`` -- through the relay, which impairs it.

- TCP on ``front:P`` is passed through to ``back:P`` untouched (the handshake), unless
  ``impair_tcp=True`` (the benchmark, so OpenSSH sees the same delay and outages): then
  every chunk gets the direction's fixed ``delay`` (order kept) and a blackout freezes the
  pipe (data waits, like TCP retransmission across an outage).
- UDP ``front:U`` <-> ``back:U`` gets per-direction delay, jitter, random loss, burst loss
  (Gilbert-Elliott), reordering and duplication; ``blackout(seconds)`` / ``set_blackout()``
  drop everything; ``rebind()`` gives every flow a new source port toward the server, so
  the server sees the client roam (a NAT rebinding).  Each client source address gets its
  own back socket, like a NAT mapping.
- ``mtu`` (a constructor argument, or set any time): UDP datagrams whose IP packet (the
  datagram plus IPv4 and UDP headers) would exceed it are dropped, as a router with a
  1500-byte link drops a "don't fragment" packet (without the ICMP answer a real one might
  send: many paths lose it).  None: loopback's own limit only.
- ``set_bottleneck(rate_bps, queue_bytes)`` puts a slow link in a direction: a token-bucket
  rate limit behind a drop-tail queue (``Bottleneck``), shared by every flow through the
  relay in that direction -- all relayed UDP ports, and TCP pipes too with ``impair_tcp``
  -- so several sessions and a bulk TCP transfer compete for one link.  A datagram meets
  loss first, then the queue, then the delay (a lossy path behind a slow hop).  TCP bytes
  are never dropped (the relay splices two lossless loopback connections): behind a delay
  or a bottleneck the relay sends them on as a Reno sender would (``TcpWindow``), which
  backs off where a real one would have lost a segment at the full queue; with
  ``tcp_loss`` the loss settings cost TCP retransmission round trips too.

One thread runs a ``selectors`` loop and a heap of scheduled deliveries.  Randomness is
seeded per direction, and every datagram draws the same number of random values whatever
the settings, so a run is reproducible for a given seed and arrival order.  Queues are
bounded.  Settings may be changed from any thread while the relay runs::

    with Relay(front="127.0.0.9", back="127.0.0.1", tcp_ports=[p], udp_ports=[u]) as relay:
        relay.up.loss = 0.3             # client -> server
        relay.down.delay = 0.05         # server -> client, seconds
        relay.blackout(5.0)
        relay.rebind()
        relay.set_bottleneck(10e6, queue_bytes=1_000_000, directions=("down",))
        print(relay.stats)
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import os
import random
import selectors
import socket
import struct
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Union

__all__ = [
    "ETHERNET_MTU",
    "Bottleneck",
    "Impairment",
    "Relay",
    "RelayError",
    "free_port",
    "random_front_alias",
    "require_loopback",
]

MAX_DATAGRAM = 65535
MAX_QUEUED_DATAGRAMS = 20000  # per relay: beyond this, datagrams are dropped ("overflow")
MAX_QUEUED_BYTES = 32 * 1024 * 1024
MAX_TCP_BUFFER = 1024 * 1024  # per TCP direction: beyond this we stop reading (back-pressure)
MAX_FLOWS_PER_PORT = 64  # NAT table bound: the least recently used mapping is evicted
TCP_CHUNK = 65536
COMMAND_TIMEOUT = 5.0
# What a packet occupies on a link besides its payload: a bottleneck counts these too.
UDP_HEADER_BYTES = 28  # IPv4 + UDP
ETHERNET_MTU = 1500  # bytes: what the benchmarks' impaired paths carry (Relay's ``mtu``)
TCP_HEADER_BYTES = 52  # IPv4 + TCP with timestamps
TCP_SEGMENT_BYTES = 1448  # MSS on a 1500-byte MTU: TCP crosses a bottleneck in segments
# A relay socket reading into a bottleneck gets a small receive buffer: bytes parked there
# would be a queue in front of the bottleneck's own that no real path has.
TCP_BOTTLENECK_RCVBUF = 32 * 1024
DEFAULT_BURST_BYTES = 3000  # two full-size packets may leave an idle link back to back
TCP_MAX_TRANSMISSIONS = 10  # tcp_loss: a segment lost this often still arrives, late
TCP_MIN_RETRANSMIT_SECS = 0.001  # a retransmission takes at least this on a zero-delay path


class RelayError(RuntimeError):
    """The relay was misused (non-loopback address, bad setting) or could not start."""


def require_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address (127.0.0.0/8 or ::1), else raise.

    Why: tests and benchmarks must never touch a real network interface.
    """
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise RelayError(f"not an IP address: {host!r} (use 127.0.0.N or ::1)") from None
    if not addr.is_loopback:
        raise RelayError(f"refusing non-loopback address {host} (only 127.0.0.0/8 and ::1)")
    return host


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_is_free(host: str, port: int, kind: str) -> bool:
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(host), sock_type) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: Union[str, Iterable[str]] = "127.0.0.1", kind: str = "tcp",
              rng: random.Random | None = None, count: int = 1) -> int:
    """Pick a random port that is currently free for ``kind`` on every one of ``host``
    (with ``count`` > 1: the first of that many consecutive free ports, for a server that
    takes a port range).

    ``host`` is one loopback address or several (e.g. ``("127.0.0.1", front)`` for a relay:
    the same number must be free on both).  ``kind`` is ``"tcp"``, ``"udp"`` or ``"both"``.
    Ports come from 20000-32767, below Linux's ephemeral range, so the kernel will not hand
    the same number to someone's outgoing connection meanwhile; the random choice keeps
    engineers running tests in parallel out of each other's way.
    """
    hosts = [host] if isinstance(host, str) else list(host)
    for h in hosts:
        require_loopback(h)
    kinds = {"tcp": ("tcp",), "udp": ("udp",), "both": ("tcp", "udp")}.get(kind)
    if kinds is None:
        raise RelayError(f"free_port kind must be tcp, udp or both, not {kind!r}")
    rng = rng or random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(20000, 32769 - count)
        if all(_port_is_free(h, p, k) for p in range(port, port + count)
               for h in hosts for k in kinds) and _reserve_ports(port, count):
            return port
    raise RelayError(f"no free {kind} port found on {hosts}")


PORT_RESERVATIONS_DIR = os.path.join(tempfile.gettempdir(), "moshpit-test-ports")
PORT_RESERVATION_SECS = 120.0


def _reserve_ports(first: int, count: int) -> bool:
    """Claim ``first``..``first+count-1`` for this caller for PORT_RESERVATION_SECS.

    A port found free is only free until its user binds it, a program start later; without a
    claim two parallel tests (xdist workers, or two engineers' runs) that drew the same
    number both start a server on it and one dies with "Address already in use". Claims are
    files created with O_EXCL, so they hold across processes; an old one has long been bound
    or abandoned and is taken over.
    """
    os.makedirs(PORT_RESERVATIONS_DIR, mode=0o1777, exist_ok=True)
    now = time.time()
    claimed = []
    for port in range(first, first + count):
        path = os.path.join(PORT_RESERVATIONS_DIR, str(port))
        try:
            if now - os.stat(path).st_mtime > PORT_RESERVATION_SECS:
                os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            for done in claimed:
                os.unlink(done)
            return False
        claimed.append(path)
    return True


def random_front_alias(exclude: Iterable[str] = ("127.0.0.1",)) -> str:
    """A random loopback alias ``127.0.0.N`` (N in 2..250) for a relay front.

    Linux routes all of 127.0.0.0/8 to ``lo``, so any alias is bindable without setup; a
    random one per test keeps parallel test runs from colliding on (address, port).
    """
    excluded = set(exclude)
    rng = random.SystemRandom()
    while True:
        alias = f"127.0.0.{rng.randint(2, 250)}"
        if alias not in excluded:
            return alias


@dataclass
class Impairment:
    """Impairment settings for one direction; times in seconds, probabilities in [0, 1].

    ``delay``: fixed one-way delay.  ``jitter``: extra delay, uniform in [0, jitter]
    (datagrams may overtake each other, as on a real path).  ``loss``: independent loss.
    ``burst_loss``: chance per datagram of entering a loss burst; inside a burst every
    datagram is lost and the burst ends with chance 1/``burst_length`` after each one
    (Gilbert-Elliott with a lossless good state and a fully lossy bad state).
    ``reorder``: chance a datagram is held back an extra ``reorder_delay`` so later ones
    pass it.  ``duplicate``: chance a datagram is delivered twice.
    """

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    burst_loss: float = 0.0
    burst_length: float = 4.0
    reorder: float = 0.0
    reorder_delay: float = 0.01
    duplicate: float = 0.0

    _PROBABILITIES = ("loss", "burst_loss", "reorder", "duplicate")

    def update(self, **settings: float) -> Impairment:
        """Set several fields at once, validated; unknown names raise ``RelayError``."""
        names = {f.name for f in fields(self)}
        for name, value in settings.items():
            if name not in names:
                raise RelayError(f"unknown impairment setting {name!r}")
            value = float(value)
            if name in self._PROBABILITIES and not 0.0 <= value <= 1.0:
                raise RelayError(f"{name} must be within [0, 1], not {value}")
            if name == "burst_length" and value < 1.0:
                raise RelayError(f"burst_length must be >= 1, not {value}")
            if name not in self._PROBABILITIES and not 0.0 <= value <= 3600.0:
                raise RelayError(f"{name} must be within [0, 3600] seconds, not {value}")
            setattr(self, name, value)
        return self


class Bottleneck:
    """The narrowest hop of a path: a token bucket that lets ``rate_bps`` bits a second
    through (``burst_bytes`` may leave an idle link at once), behind a drop-tail FIFO queue
    holding at most ``queue_bytes`` (sizes include headers, as a router counts them).

    Sans-IO: every call takes the time ``now`` (seconds on any monotonic clock) and the
    caller hands in opaque items (whatever it needs to deliver a packet); ``release(now)``
    returns ``(departure time, item)`` for every packet that has left by ``now``, in FIFO
    order.  The bucket's state changes only at departures (and ``configure``), so departure
    times depend only on what was offered when, never on how often the caller looks: runs
    are reproducible and testable on a fake clock.  A packet larger than the bucket still
    leaves when the bucket is full and puts it in debt, so the average rate holds for any
    size.  Several flows share one queue and one rate, as they share a slow link;
    ``flow_bytes`` counts the bytes that left per flow label.
    """

    COUNTERS = ("enqueued", "dropped", "departed", "bytes_departed", "bytes_dropped")

    def __init__(self, rate_bps: float, queue_bytes: int,
                 burst_bytes: int = DEFAULT_BURST_BYTES, now: float = 0.0) -> None:
        self._validate(rate_bps, queue_bytes, burst_bytes)
        self.rate_bps, self.queue_bytes, self.burst_bytes = (
            float(rate_bps), int(queue_bytes), int(burst_bytes))
        # (arrival time, size, flow, item), oldest first
        self._queue: deque[tuple[float, int, str, object]] = deque()
        self._departed: list[tuple[float, object]] = []  # left, not yet released
        self._clock = now  # when the bucket last changed other than by refilling
        self._tokens = float(burst_bytes)  # bytes at ``_clock``; negative while in debt
        self.queued_bytes = 0
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.flow_bytes: dict[str, int] = {}

    @staticmethod
    def _validate(rate_bps: float, queue_bytes: int, burst_bytes: int) -> None:
        if not 1000.0 <= rate_bps <= 1e11:
            raise RelayError(f"bottleneck rate must be within [1000, 1e11] bits/s, "
                             f"not {rate_bps}")
        for name, value in (("queue", queue_bytes), ("burst", burst_bytes)):
            if not 1 <= value <= MAX_QUEUED_BYTES:
                raise RelayError(f"bottleneck {name} must be within [1, {MAX_QUEUED_BYTES}] "
                                 f"bytes, not {value}")

    def configure(self, now: float, rate_bps: float, queue_bytes: int,
                  burst_bytes: int = DEFAULT_BURST_BYTES) -> None:
        """Change the settings from ``now`` on (validated).  Packets already queued stay,
        even beyond a smaller limit: drop-tail only refuses arrivals."""
        self._validate(rate_bps, queue_bytes, burst_bytes)
        self._advance(now)
        self._tokens, self._clock = self._tokens_at(max(now, self._clock)), max(now, self._clock)
        self.rate_bps, self.queue_bytes, self.burst_bytes = (
            float(rate_bps), int(queue_bytes), int(burst_bytes))
        self._tokens = min(self._tokens, float(burst_bytes))

    def room(self, now: float) -> int:
        """Bytes the queue accepts at ``now`` before it starts dropping."""
        self._advance(now)
        return max(0, self.queue_bytes - self.queued_bytes)

    def offer(self, now: float, size: int, item: object, flow: str = "") -> bool:
        """A packet of ``size`` bytes arrives at ``now``: queue it (True) or drop it (False,
        the queue is full)."""
        self._advance(now)
        if self.queued_bytes + size > self.queue_bytes:
            self.counters["dropped"] += 1
            self.counters["bytes_dropped"] += size
            return False
        self._queue.append((now, size, flow, item))
        self.queued_bytes += size
        self.counters["enqueued"] += 1
        self._advance(now)  # an idle link with tokens lets it go at once
        return True

    def next_departure(self) -> float | None:
        """When the packet at the head of the queue leaves (None: the queue is empty)."""
        if not self._queue:
            return None
        arrival, size = self._queue[0][:2]
        start = max(arrival, self._clock)
        need = min(size, self.burst_bytes)
        tokens = self._tokens_at(start)
        if tokens >= need:
            return start
        return start + (need - tokens) * 8.0 / self.rate_bps

    def release(self, now: float) -> list[tuple[float, object]]:
        """The packets that have left by ``now``: ``(departure time, item)``, oldest first."""
        self._advance(now)
        released, self._departed = self._departed, []
        return released

    def flush(self, now: float) -> list[tuple[float, object]]:
        """Everything still queued leaves at ``now`` (the bottleneck is being removed)."""
        self._advance(now)
        while self._queue:
            self._depart(now, 0.0)
        return self.release(now)

    def _tokens_at(self, when: float) -> float:
        """The bucket at ``when`` (not before ``_clock``) if nothing leaves meanwhile."""
        return min(float(self.burst_bytes),
                   self._tokens + (when - self._clock) * self.rate_bps / 8.0)

    def _advance(self, now: float) -> None:
        """Let every packet due by ``now`` leave."""
        while True:
            due = self.next_departure()
            if due is None or due > now:
                return
            self._depart(due, self._tokens_at(due))

    def _depart(self, when: float, tokens: float) -> None:
        """The head leaves at ``when``, taking its size from the ``tokens`` there were."""
        _arrival, size, flow, item = self._queue.popleft()
        self._tokens, self._clock = tokens - size, when
        self.queued_bytes -= size
        self.counters["departed"] += 1
        self.counters["bytes_departed"] += size
        self.flow_bytes[flow] = self.flow_bytes.get(flow, 0) + size
        self._departed.append((when, item))

    def snapshot(self) -> dict:
        """Counters, the queue's fill and the bytes that left per flow (plain data)."""
        return dict(self.counters, queued_bytes=self.queued_bytes, rate_bps=self.rate_bps,
                    queue_bytes=self.queue_bytes, flows=dict(self.flow_bytes))


class _Direction:
    """Per-direction state: settings, seeded RNG, burst state, counters and the bottleneck
    (None: no rate limit) every flow in this direction shares."""

    COUNTERS = ("received", "delivered", "lost", "burst_lost", "blackout_dropped",
                "too_big_dropped", "overflow_dropped", "queue_dropped", "duplicated",
                "reordered", "bytes_delivered")

    def __init__(self, name: str, settings: Impairment, seed: int) -> None:
        self.name = name
        self.settings = settings
        self.rng = random.Random(seed)
        self.in_burst = False
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.bottleneck: Bottleneck | None = None

    def snapshot(self) -> dict:
        """The counters, and the bottleneck's if there is one (under "bottleneck")."""
        if self.bottleneck is None:
            return dict(self.counters)
        return dict(self.counters, bottleneck=self.bottleneck.snapshot())

    def plan(self, now: float) -> list[float]:
        """Decide one datagram's fate: the delivery times (empty list = dropped).

        Always draws five random numbers so the sequence stays aligned whatever the
        settings are, which keeps seeded runs reproducible.
        """
        s = self.settings
        r_burst, r_loss, r_jitter, r_reorder, r_dup = (self.rng.random() for _ in range(5))
        self.counters["received"] += 1
        if self.in_burst:
            self.in_burst = r_burst >= 1.0 / max(1.0, s.burst_length)
            self.counters["burst_lost"] += 1
            return []
        if r_burst < s.burst_loss:
            self.in_burst = True
            self.counters["burst_lost"] += 1
            return []
        if r_loss < s.loss:
            self.counters["lost"] += 1
            return []
        due = now + s.delay + r_jitter * s.jitter
        if r_reorder < s.reorder:
            due += s.reorder_delay
            self.counters["reordered"] += 1
        times = [due]
        if r_dup < s.duplicate:
            times.append(due + 0.0005)
            self.counters["duplicated"] += 1
        return times


class _UdpFlow:
    """One client source address on one relayed port and its back socket toward the server.

    The back socket is the "NAT mapping": its port is what the server sees as the client's
    address, and ``rebind`` replaces it.
    """

    def __init__(self, client_addr: tuple, back_sock: socket.socket) -> None:
        self.client_addr = client_addr
        self.back_sock = back_sock
        self.last_used = time.monotonic()


class _UdpPort:
    """A relayed UDP port: the front socket and the flows (client addresses) seen on it."""

    def __init__(self, port: int, front_sock: socket.socket) -> None:
        self.port = port
        self.front_sock = front_sock
        self.flows: dict[tuple, _UdpFlow] = {}


class TcpWindow:
    """A loss-based TCP sender's congestion window (Reno), for TCP crossing a bottleneck.

    Why: the relay cannot drop TCP bytes, so without this a TCP pipe would refill every
    byte of room the moment it appears and a bottleneck would in effect serve TCP first.
    Real Reno/CUBIC sending into a full drop-tail queue loses a segment and halves its
    window, which lets other flows in.  So the relay sends each TCP direction into its
    bottleneck as such a sender would: at most ``cwnd`` bytes unacknowledged (an ack comes
    a round trip after the segment left the queue); slow start, then one segment more per
    round trip; and when it has data but the queue is full (where the real one would have
    lost a segment), the window halves, at most once per round trip.  Sans-IO.
    """

    INITIAL_SEGMENTS = 10  # Linux's initial window

    def __init__(self) -> None:
        self.cwnd = float(self.INITIAL_SEGMENTS * TCP_SEGMENT_BYTES)
        self.ssthresh = float("inf")
        self.unacked = 0
        self.losses = 0
        self._recovering_until = float("-inf")

    def allowance(self) -> int:
        """Payload bytes it may send now, in whole segments."""
        return max(0, int(self.cwnd) - self.unacked) // TCP_SEGMENT_BYTES * TCP_SEGMENT_BYTES

    def may_probe(self, now: float) -> bool:
        """True if sending into a full queue now would count as a new loss."""
        return now >= self._recovering_until

    def sent(self, size: int) -> None:
        self.unacked += size

    def acked(self, size: int) -> None:
        self.unacked -= size
        if self.cwnd < self.ssthresh:
            self.cwnd += size
        else:
            self.cwnd += TCP_SEGMENT_BYTES * size / self.cwnd

    def lost(self, now: float, rtt: float) -> None:
        """A segment met a full queue at ``now``; ``rtt`` until the sender would know."""
        if not self.may_probe(now):
            return
        self.losses += 1
        self.ssthresh = max(self.unacked / 2.0, 2.0 * TCP_SEGMENT_BYTES)
        self.cwnd = self.ssthresh
        self._recovering_until = now + rtt


class _TcpHalf:
    """One direction of a TCP pipe: bytes read from ``src`` waiting to be written to ``dst``
    (``reverse`` is the other direction, which the acks take)."""

    def __init__(self, src: socket.socket, dst: socket.socket, direction: _Direction,
                 reverse: _Direction) -> None:
        self.src = src
        self.dst = dst
        self.direction = direction
        self.reverse = reverse
        self.window = TcpWindow()  # used while the direction has a bottleneck
        self.buf = bytearray()
        self.in_flight = 0  # bytes read, not yet in buf: in a bottleneck or on the heap
        self.rcvbuf_limited = False  # src's receive buffer shrunk for a bottleneck
        self.last_due = 0.0  # keeps delayed chunks in order
        self.eof = False
        self.shut = False

    def backlog(self) -> int:
        return len(self.buf) + self.in_flight


class _TcpPipe:
    """An accepted front connection spliced to a connection to the back address."""

    def __init__(self, client: socket.socket, server: socket.socket,
                 up: _Direction, down: _Direction, port: int) -> None:
        self.up = _TcpHalf(client, server, up, down)
        self.down = _TcpHalf(server, client, down, up)
        self.flow = f"tcp:{port}"  # its label in bottleneck accounting
        self.events = {client: 0, server: 0}  # what the selector watches per socket
        self.closed = False

    def halves_for(self, sock: socket.socket) -> tuple[_TcpHalf, _TcpHalf]:
        """(half reading from ``sock``, half writing to ``sock``)."""
        return (self.up, self.down) if sock is self.up.src else (self.down, self.up)


class Relay:
    """Impairing loopback relay; see the module docstring.  Use as a context manager.

    ``up`` is client -> server, ``down`` is server -> client.  ``stats`` returns a snapshot
    of the counters.  ``tap(direction, datagram)``, if given, sees every UDP datagram as it
    arrives, before any impairment (e.g. to capture packets for replay attacks).  All
    addresses must be loopback and ``front`` must differ from ``back``.

    With ``impair_tcp``, TCP behind a delay or a bottleneck is sent on as a modelled
    sender (``TcpWindow``): the relay acks the real connection at once, so without a
    window of its own the delay would cost TCP nothing but latency.  ``tcp_loss`` (with
    ``impair_tcp``) applies the loss settings to TCP segments too: a lost segment arrives a
    round trip late (retransmitted, repeatedly if the retransmission is lost), holds up
    what follows (in-order delivery) and halves the window.
    """

    def __init__(self, front: str = "127.0.0.2", back: str = "127.0.0.1",
                 tcp_ports: Iterable[int] = (), udp_ports: Iterable[int] = (),
                 up: Impairment | None = None, down: Impairment | None = None,
                 seed: int | None = None, impair_tcp: bool = False,
                 tap: Callable[[str, bytes], None] | None = None,
                 tcp_loss: bool = False, mtu: int | None = None) -> None:
        self.front = require_loopback(front)
        self.back = require_loopback(back)
        if ipaddress.ip_address(front) == ipaddress.ip_address(back):
            raise RelayError("front and back must be different loopback addresses")
        self.tcp_ports = list(tcp_ports)
        self.udp_ports = list(udp_ports)
        self.impair_tcp = impair_tcp
        self.tcp_loss = tcp_loss
        self.tap = tap  # called (in the relay thread) with ("up"|"down", datagram) on arrival
        self.mtu = mtu  # largest IP packet a UDP datagram may make (None: no limit but 64 KiB)
        self.seed = random.SystemRandom().randrange(2**32) if seed is None else seed
        self.up = up or Impairment()
        self.down = down or Impairment()
        self._dirs = {"up": _Direction("up", self.up, self.seed * 2),
                      "down": _Direction("down", self.down, self.seed * 2 + 1)}
        self._tcp_counters = {"accepted": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0,
                              "segments_lost": 0}
        self._tcp_rng = random.Random(self.seed * 2 + 2)  # TCP segment loss (tcp_loss)
        self._blackout_until = 0.0  # monotonic; float("inf") while set_blackout(True)
        self._lock = threading.Lock()  # guards counters/blackout against the caller thread
        self._sel = selectors.DefaultSelector()
        # (due, seq, size, action): size counts toward the queue bound (0 for TCP chunks,
        # which are bounded by MAX_TCP_BUFFER instead)
        self._heap: list[tuple[float, int, int, Callable[[], None]]] = []
        self._heap_bytes = 0
        self._seq = itertools.count()
        # (departure time, callback) from a bottleneck that was removed, to run in the thread
        self._orphans: list[tuple[float, Callable[[float], None]]] = []
        self._udp: list[_UdpPort] = []
        self._listeners: list[socket.socket] = []
        self._pipes: set[_TcpPipe] = set()
        self._commands: list[tuple[Callable[[], object], dict]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []  # unexpected exceptions in the relay thread (should be [])
        self._stopping = False
        self._closed = False

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Relay:
        """Bind every front socket (errors surface here, in the caller) and run the thread."""
        if self._thread is not None:
            raise RelayError("relay already started")
        try:
            for port in self.tcp_ports:
                lsock = socket.socket(_family(self.front), socket.SOCK_STREAM)
                self._listeners.append(lsock)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind((self.front, port))
                lsock.listen(64)
                lsock.setblocking(False)
                self._sel.register(lsock, selectors.EVENT_READ,
                                   lambda _mask, ls=lsock: self._on_accept(ls))
            for port in self.udp_ports:
                usock = socket.socket(_family(self.front), socket.SOCK_DGRAM)
                entry = _UdpPort(port, usock)
                self._udp.append(entry)
                usock.bind((self.front, port))
                usock.setblocking(False)
                self._sel.register(usock, selectors.EVENT_READ,
                                   lambda _mask, e=entry: self._on_front_datagram(e))
        except OSError as err:
            self.close()
            raise RelayError(f"relay cannot bind on {self.front}: {err}") from err
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._thread = threading.Thread(target=self._run, name="test-relay", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and close every socket. Idempotent; safe if start() failed."""
        if self._closed:
            return
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(COMMAND_TIMEOUT)
        self._closed = True
        for pipe in list(self._pipes):
            self._close_pipe(pipe)
        socks = list(self._listeners) + [self._wake_r, self._wake_w]
        for entry in self._udp:
            socks.append(entry.front_sock)
            socks.extend(flow.back_sock for flow in entry.flows.values())
        for sock in socks:
            sock.close()
        self._sel.close()

    def set(self, **settings: float) -> None:
        """Apply the same impairment settings to both directions (e.g. ``loss=0.1``)."""
        self.up.update(**settings)
        self.down.update(**settings)

    def set_rtt(self, rtt: float) -> None:
        """Convenience: a symmetric fixed delay giving round-trip time ``rtt`` seconds."""
        self.set(delay=rtt / 2.0)

    def set_bottleneck(self, rate_bps: float | None, queue_bytes: int = 0,
                       burst_bytes: int = DEFAULT_BURST_BYTES,
                       directions: Iterable[str] = ("up", "down")) -> None:
        """A slow link in each of ``directions`` ("up", "down"): ``rate_bps`` bits a second
        behind a drop-tail queue of ``queue_bytes`` (see ``Bottleneck``), shared by every
        flow through this relay that way: all UDP ports, and TCP pipes if ``impair_tcp``.

        Called again, it changes the same link's settings (what is queued stays);
        ``rate_bps=None`` removes it (what is queued leaves at once).
        """
        names = list(directions)
        if not names or any(name not in self._dirs for name in names):
            raise RelayError(f"bottleneck directions must be up and/or down, not {names}")
        now = time.monotonic()
        with self._lock:
            for name in names:
                direction = self._dirs[name]
                if rate_bps is None:
                    if direction.bottleneck is not None:
                        self._orphans.extend(direction.bottleneck.flush(now))
                    direction.bottleneck = None
                elif direction.bottleneck is None:
                    direction.bottleneck = Bottleneck(rate_bps, queue_bytes, burst_bytes, now)
                else:
                    direction.bottleneck.configure(now, rate_bps, queue_bytes, burst_bytes)
        self._wake()

    def blackout(self, seconds: float) -> None:
        """Drop all UDP (and freeze TCP if ``impair_tcp``) for ``seconds`` from now."""
        with self._lock:
            self._blackout_until = time.monotonic() + float(seconds)
        self._wake()

    def set_blackout(self, on: bool) -> None:
        """Start (True) or end (False) an open-ended blackout."""
        with self._lock:
            self._blackout_until = float("inf") if on else 0.0
        self._wake()

    @property
    def blacked_out(self) -> bool:
        """True while a blackout is in force."""
        return time.monotonic() < self._blackout_until

    def rebind(self) -> list[tuple]:
        """Give every UDP flow a new source port toward the server (the client "roams").

        Blocks until the relay thread has swapped the sockets; returns the new source
        addresses.  Datagrams the server sends to the old address are lost from now on.
        """
        return self._call(self._do_rebind)

    def reset_tcp(self) -> int:
        """Reset every relayed TCP connection, both ends (as a NAT that lost its state, or
        a client that moved, leaves them): returns how many there were."""
        return self._call(self._do_reset_tcp)

    def client_addresses(self) -> list[tuple]:
        """Client source addresses seen so far on the relayed UDP ports (most recent last)."""
        return self._call(self._do_client_addresses)

    @property
    def stats(self) -> dict:
        """Snapshot: {"up": {...}, "down": {...}, "tcp": {...}, "queued": n, "seed": s};
        a direction with a bottleneck has its counters under "bottleneck", with the bytes
        that crossed it per flow ("udp:PORT", "tcp:PORT": relayed port, any client)."""
        with self._lock:
            return {
                "up": self._dirs["up"].snapshot(),
                "down": self._dirs["down"].snapshot(),
                "tcp": dict(self._tcp_counters),
                "queued": len(self._heap),
                "seed": self.seed,
            }

    # ------------------------------------------------------------------ thread plumbing

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closed, or the buffer is full: the loop is awake anyway

    def _call(self, func: Callable[[], object]) -> object:
        """Run ``func`` in the relay thread (it owns the sockets) and return its result."""
        if self._thread is None or not self._thread.is_alive():
            raise RelayError("relay is not running")
        box: dict = {"done": threading.Event()}
        with self._lock:
            self._commands.append((func, box))
        self._wake()
        if not box["done"].wait(COMMAND_TIMEOUT):
            raise RelayError("relay thread did not answer")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _on_wake(self, _mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            commands, self._commands = self._commands, []
        for func, box in commands:
            try:
                box["result"] = func()
            except Exception as err:  # handed back to the caller thread
                box["error"] = err
            box["done"].set()

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            timeout = 1.0
            if self._heap:
                timeout = min(timeout, max(0.0, self._heap[0][0] - now))
            departure = self._next_departure()
            if departure is not None:
                timeout = min(timeout, max(0.0, departure - now))
            if self.impair_tcp and now < self._blackout_until:
                timeout = min(timeout, max(0.0, self._blackout_until - now))
            try:
                for key, mask in self._sel.select(timeout):
                    key.data(mask)
                self._run_due(time.monotonic())
                if self.impair_tcp:
                    for pipe in list(self._pipes):
                        self._update_interest(pipe)
            except Exception as err:  # a relay bug must not silently stop all traffic
                self.errors.append(f"{type(err).__name__}: {err}")
                if len(self.errors) > 100:
                    raise

    def _schedule(self, due: float, action: Callable[[], None], size: int) -> bool:
        if (len(self._heap) >= MAX_QUEUED_DATAGRAMS
                or self._heap_bytes + size > MAX_QUEUED_BYTES):
            return False
        self._heap_bytes += size
        heapq.heappush(self._heap, (due, next(self._seq), size, action))
        return True

    def _next_departure(self) -> float | None:
        """The earliest time a packet leaves a bottleneck (now, if some are orphaned)."""
        with self._lock:
            if self._orphans:
                return 0.0
            due = [d.bottleneck.next_departure() for d in self._dirs.values()
                   if d.bottleneck is not None]
        return min((t for t in due if t is not None), default=None)

    def _run_due(self, now: float) -> None:
        with self._lock:  # departure callbacks only schedule onto the heap
            released, self._orphans = self._orphans, []
            for direction in self._dirs.values():
                if direction.bottleneck is not None:
                    released.extend(direction.bottleneck.release(now))
            for departed, on_departure in released:
                on_departure(departed)
        while self._heap and self._heap[0][0] <= now:
            _due, _seq, size, action = heapq.heappop(self._heap)
            self._heap_bytes -= size
            action()

    # ------------------------------------------------------------------ UDP

    def _on_front_datagram(self, entry: _UdpPort) -> None:
        for _ in range(64):  # bounded batch so other sockets get their turn
            try:
                data, addr = entry.front_sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ICMP-induced ECONNREFUSED from an earlier send: keep going
            flow = entry.flows.get(addr) or self._new_flow(entry, addr)
            if flow is None:
                continue
            flow.last_used = time.monotonic()
            self._impair(self._dirs["up"], data,
                         lambda d=data, f=flow, p=entry.port: self._send(
                             f.back_sock, d, (self.back, p), "up"), f"udp:{entry.port}")

    def _new_flow(self, entry: _UdpPort, addr: tuple) -> _UdpFlow | None:
        if len(entry.flows) >= MAX_FLOWS_PER_PORT:
            oldest = min(entry.flows.values(), key=lambda f: f.last_used)
            self._drop_flow(entry, oldest)
        try:
            back_sock = self._open_back_socket()
        except OSError:
            return None
        flow = _UdpFlow(addr, back_sock)
        entry.flows[addr] = flow
        self._register_back(entry, flow)
        return flow

    def _open_back_socket(self) -> socket.socket:
        sock = socket.socket(_family(self.back), socket.SOCK_DGRAM)
        try:
            sock.bind((self.back, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _register_back(self, entry: _UdpPort, flow: _UdpFlow) -> None:
        self._sel.register(flow.back_sock, selectors.EVENT_READ,
                           lambda _mask, e=entry, f=flow, s=flow.back_sock:
                           self._on_back_datagram(e, f, s))

    def _drop_flow(self, entry: _UdpPort, flow: _UdpFlow) -> None:
        entry.flows.pop(flow.client_addr, None)
        self._sel.unregister(flow.back_sock)
        flow.back_sock.close()

    def _on_back_datagram(self, entry: _UdpPort, flow: _UdpFlow, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if addr[1] != entry.port:
                continue  # only the server's session port is relayed back
            self._impair(self._dirs["down"], data,
                         lambda d=data, f=flow: self._send(
                             entry.front_sock, d, f.client_addr, "down"), f"udp:{entry.port}")

    def _impair(self, direction: _Direction, data: bytes, deliver: Callable[[], None],
                flow: str = "") -> None:
        """Loss, then the bottleneck's queue (if any), then the delay; ``flow`` labels the
        datagram in the bottleneck's accounting."""
        if self.tap is not None:
            self.tap(direction.name, data)
        now = time.monotonic()
        mtu = self.mtu
        with self._lock:
            if now < self._blackout_until:
                direction.counters["received"] += 1
                direction.counters["blackout_dropped"] += 1
                return
            if mtu is not None and len(data) + UDP_HEADER_BYTES > mtu:
                direction.counters["received"] += 1
                direction.counters["too_big_dropped"] += 1
                return
            times = direction.plan(now)
            if times and direction.bottleneck is not None:
                delays = [due - now for due in times]
                if not direction.bottleneck.offer(
                        now, len(data) + UDP_HEADER_BYTES,
                        lambda departed: self._deliver_at(
                            direction, [departed + d for d in delays], deliver, len(data)),
                        flow):
                    direction.counters["queue_dropped"] += 1
                return
            self._deliver_at(direction, times, deliver, len(data))

    def _deliver_at(self, direction: _Direction, times: list[float],
                    deliver: Callable[[], None], size: int) -> None:
        """Schedule ``deliver`` at each of ``times`` (the caller holds the lock)."""
        for due in times:
            if not self._schedule(due, deliver, size):
                direction.counters["overflow_dropped"] += 1

    def _send(self, sock: socket.socket, data: bytes, addr: tuple, direction: str) -> None:
        if sock.fileno() < 0:
            return  # the flow was rebound or evicted meanwhile: the mapping is gone
        try:
            sock.sendto(data, addr)
        except OSError:
            return  # nobody listening (ICMP) or buffer full: a lost datagram, like the net
        with self._lock:
            counters = self._dirs[direction].counters
            counters["delivered"] += 1
            counters["bytes_delivered"] += len(data)

    def _do_rebind(self) -> list[tuple]:
        new_addrs = []
        for entry in self._udp:
            for flow in list(entry.flows.values()):
                try:
                    new_sock = self._open_back_socket()
                except OSError:
                    continue
                self._sel.unregister(flow.back_sock)
                flow.back_sock.close()
                flow.back_sock = new_sock
                self._register_back(entry, flow)
                new_addrs.append(new_sock.getsockname())
        return new_addrs

    def _do_reset_tcp(self) -> int:
        pipes = list(self._pipes)
        for pipe in pipes:
            for sock in (pipe.up.src, pipe.down.src):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self._close_pipe(pipe)
        return len(pipes)

    def _do_client_addresses(self) -> list[tuple]:
        flows = [f for entry in self._udp for f in entry.flows.values()]
        return [f.client_addr for f in sorted(flows, key=lambda f: f.last_used)]

    # ------------------------------------------------------------------ TCP

    def _on_accept(self, lsock: socket.socket) -> None:
        for _ in range(64):
            try:
                client, _addr = lsock.accept()
            except OSError:  # nothing more pending (EAGAIN) or the peer already gave up
                return
            self._splice(client, lsock.getsockname()[1])

    def _splice(self, client: socket.socket, port: int) -> None:
        try:
            server = socket.create_connection((self.back, port), timeout=2.0)
        except OSError:
            client.close()
            with self._lock:
                self._tcp_counters["refused"] += 1
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = _TcpPipe(client, server, self._dirs["up"], self._dirs["down"], port)
        self._pipes.add(pipe)
        with self._lock:
            self._tcp_counters["accepted"] += 1
        self._update_interest(pipe)

    def _frozen(self) -> bool:
        return self.impair_tcp and time.monotonic() < self._blackout_until

    def _on_tcp(self, pipe: _TcpPipe, sock: socket.socket, mask: int) -> None:
        if pipe.closed:
            return
        reading, writing = pipe.halves_for(sock)
        try:
            if mask & selectors.EVENT_READ:
                self._tcp_read(pipe, reading)
            if mask & selectors.EVENT_WRITE:
                self._tcp_flush(writing)
        except OSError:
            self._close_pipe(pipe)
            return
        self._update_interest(pipe)

    def _bottleneck_for(self, half: _TcpHalf) -> Bottleneck | None:
        return half.direction.bottleneck if self.impair_tcp else None

    def _tcp_room(self, half: _TcpHalf, now: float) -> int | None:
        """Payload bytes that fit ``half``'s bottleneck now, in whole segments (None: no
        bottleneck applies)."""
        with self._lock:
            bottleneck = self._bottleneck_for(half)
            if bottleneck is None:
                return None
            room = bottleneck.room(now)
        return room // (TCP_SEGMENT_BYTES + TCP_HEADER_BYTES) * TCP_SEGMENT_BYTES

    def _tcp_modelled(self, half: _TcpHalf) -> bool:
        """Whether ``half`` crosses as a modelled sender: behind a bottleneck, a delay or
        (``tcp_loss``) loss."""
        settings = half.direction.settings
        return self.impair_tcp and (half.direction.bottleneck is not None or settings.delay > 0
                                    or (self.tcp_loss and settings.loss > 0))

    def _tcp_wants_read(self, half: _TcpHalf) -> bool:
        """Whether to read ``half``'s source now (when modelled: its window allows a segment,
        and a bottleneck has room or a full queue would be news to the sender)."""
        if not self._tcp_modelled(half):
            return True
        if half.window.allowance() <= 0:
            return False
        now = time.monotonic()
        room = self._tcp_room(half, now)
        return room is None or room > 0 or half.window.may_probe(now)

    def _tcp_read(self, pipe: _TcpPipe, half: _TcpHalf) -> None:
        now = time.monotonic()
        modelled = self._tcp_modelled(half)
        limit = TCP_CHUNK
        if modelled:
            room = self._tcp_room(half, now)
            limit = min(limit, half.window.allowance(), TCP_CHUNK if room is None else room)
            if limit <= 0:
                if room is not None and room <= 0:  # a real sender would lose a segment
                    half.window.lost(now, self._round_trip(half))
                return
            if room is not None and not half.rcvbuf_limited:
                half.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TCP_BOTTLENECK_RCVBUF)
                half.rcvbuf_limited = True
        try:
            data = half.src.recv(limit)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            half.eof = True
            self._tcp_flush(half)
            return
        key = "bytes_up" if half is pipe.up else "bytes_down"
        with self._lock:
            self._tcp_counters[key] += len(data)
        if modelled:
            self._tcp_send(pipe, half, data, now)
            return
        if half.in_flight == 0:
            half.buf += data
            self._tcp_flush(half)
            return
        half.in_flight += len(data)  # behind what a delay still holds: keep the order
        self._tcp_schedule(pipe, half, data, now)

    def _tcp_send(self, pipe: _TcpPipe, half: _TcpHalf, data: bytes, now: float) -> None:
        """Send ``data`` on in segments, into the bottleneck if there is one (its room was
        checked: TCP is never dropped there)."""
        half.in_flight += len(data)
        half.window.sent(len(data))
        with self._lock:
            bottleneck = self._bottleneck_for(half)
            for start in range(0, len(data), TCP_SEGMENT_BYTES):
                segment = data[start:start + TCP_SEGMENT_BYTES]
                if bottleneck is None:
                    self._tcp_departed(pipe, half, segment, now)
                elif not bottleneck.offer(
                        now, len(segment) + TCP_HEADER_BYTES,
                        lambda departed, p=pipe, h=half, d=segment: self._tcp_departed(
                            p, h, d, departed), pipe.flow):
                    raise RelayError("a TCP segment did not fit the bottleneck")

    def _round_trip(self, half: _TcpHalf) -> float:
        """Both ways' delay plus the time to drain ``half``'s bottleneck queue now."""
        delay = half.direction.settings.delay + half.reverse.settings.delay
        with self._lock:
            bottleneck = self._bottleneck_for(half)
            if bottleneck is not None:
                delay += bottleneck.queued_bytes * 8.0 / bottleneck.rate_bps
        return delay

    def _tcp_departed(self, pipe: _TcpPipe, half: _TcpHalf, data: bytes,
                      departed: float) -> None:
        """A segment left (the bottleneck, or the sender): it arrives after the delay, its
        ack a round trip after it left; with ``tcp_loss`` each lost transmission costs a
        round trip more and halves the window.  (The caller holds the lock.)"""
        round_trip = half.direction.settings.delay + half.reverse.settings.delay
        late = 0.0
        if self.tcp_loss:
            for _ in range(TCP_MAX_TRANSMISSIONS):
                if self._tcp_rng.random() >= half.direction.settings.loss:
                    break
                self._tcp_counters["segments_lost"] += 1
                half.window.lost(departed + late, round_trip)
                late += max(round_trip, TCP_MIN_RETRANSMIT_SECS)
        self._tcp_schedule(pipe, half, data, departed + late)
        size = len(data)
        heapq.heappush(self._heap, (departed + late + round_trip, next(self._seq), 0,
                                    lambda w=half.window: w.acked(size)))

    def _tcp_schedule(self, pipe: _TcpPipe, half: _TcpHalf, data: bytes, sent: float) -> None:
        """``data`` (counted in ``in_flight``) arrives at ``sent`` plus the direction's delay,
        never before what was sent ahead of it."""
        due = max(sent + half.direction.settings.delay, half.last_due)
        half.last_due = due
        heapq.heappush(self._heap, (due, next(self._seq), 0,
                                    lambda h=half, d=data, p=pipe: self._tcp_arrive(p, h, d)))

    def _tcp_arrive(self, pipe: _TcpPipe, half: _TcpHalf, data: bytes) -> None:
        half.in_flight -= len(data)
        if pipe.closed:
            return
        half.buf += data
        try:
            self._tcp_flush(half)
        except OSError:
            self._close_pipe(pipe)
            return
        self._update_interest(pipe)

    def _tcp_flush(self, half: _TcpHalf) -> None:
        """Write what we can of ``half.buf``; propagate EOF once everything is through."""
        if self._frozen():
            return
        while half.buf:
            try:
                sent = half.dst.send(half.buf)
            except (BlockingIOError, InterruptedError):
                return
            del half.buf[:sent]
        if half.eof and not half.in_flight and not half.shut:
            half.shut = True
            try:
                half.dst.shutdown(socket.SHUT_WR)
            except OSError as err:
                if err.errno != errno.ENOTCONN:
                    raise

    def _update_interest(self, pipe: _TcpPipe) -> None:
        """Watch each socket for exactly what it can do now (nothing while frozen).

        A socket that wants nothing is unregistered: watching a socket at EOF, or one we
        refuse to read, would make ``select`` spin.
        """
        if pipe.closed:
            return
        if pipe.up.shut and pipe.down.shut:
            self._close_pipe(pipe)
            return
        frozen = self._frozen()
        for sock in (pipe.up.src, pipe.down.src):
            reading, writing = pipe.halves_for(sock)
            events = 0
            if (not frozen and not reading.eof and reading.backlog() < MAX_TCP_BUFFER
                    and self._tcp_wants_read(reading)):
                events |= selectors.EVENT_READ
            if not frozen and writing.buf:
                events |= selectors.EVENT_WRITE
            current = pipe.events[sock]
            if events == current:
                continue
            if current == 0:
                self._sel.register(sock, events,
                                   lambda mask, p=pipe, s=sock: self._on_tcp(p, s, mask))
            elif events == 0:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, events,
                                 lambda mask, p=pipe, s=sock: self._on_tcp(p, s, mask))
            pipe.events[sock] = events

    def _close_pipe(self, pipe: _TcpPipe) -> None:
        if pipe.closed:
            return
        pipe.closed = True
        self._pipes.discard(pipe)
        for sock in (pipe.up.src, pipe.down.src):
            if pipe.events[sock]:
                self._sel.unregister(sock)
            sock.close()
