"""moshpit carriers: the session's sealed datagrams over UDP, or over TCP where UDP is blocked.

A carrier moves the transport's datagrams and nothing else: packet numbers, acks, the
replay window and stream offsets are the same whichever carries them, so a switch loses
and doubles nothing (moshpit_transport resends what was in flight on the new path).

The TCP carrier is the handshake's own connection, kept open after the server's grant
(DESIGN 4 and 11). Being the connection the handshake authenticated, it needs no further
proof: the server attaches it to the session the grant named, and nothing else can
attach to a session (a new connection, even one replaying a carrier's bytes, is just a
new handshake that fails). On it each datagram is framed as ``length:u16 | datagram``,
1 <= length <= MAX_DATAGRAM; anything else closes the carrier.

Three parts, as elsewhere: the framing codec and the client's path choice (sans-IO,
``PathSelector``: when to use TCP, when to probe UDP, when to go back), then the socket
glue (``TcpCarrier``, ``CarrierLink``) for the programs' select loops.

How the client chooses (``transport = "auto"``):

- After a handshake (the first, or a resume) both paths exist. The client starts on UDP;
  if no authentic UDP packet arrives within 2 handshake round trips + UDP_TRIAL_MARGIN_SECS,
  it moves to TCP and says "UDP blocked, using TCP" once.
- On TCP it sends a UDP probe (a sealed PING) after UDP_PROBE_FIRST_SECS, then at doubling
  intervals up to UDP_PROBE_MAX_SECS. Any authentic UDP packet moves it back to UDP (the
  server then validates the UDP address before its replies follow); the TCP connection is
  closed CARRIER_LINGER_SECS later, once what the server sent there has arrived.
- UDP dying mid-session is silence, which starts a resume handshake (moshpit_session's
  ResumeSchedule, sooner in auto mode): that handshake's connection is the new carrier,
  and the same trial decides again. A broken TCP carrier is the same silence.

``"udp"`` never keeps the connection; ``"tcp"`` uses it at once and never sends over UDP
(between a broken connection and the resume that replaces it, nothing goes out).

The server follows the client: the newest authentic packet arriving on an attached carrier
moves its replies there at once (the carrier is trusted, see Connection.trust_path); a UDP
address is validated first, as any roam. Over TCP the send side keeps no big queue of its
own (Ctrl-C during a flood must not wait behind one): the kernel holds at most
NOTSENT_LOWAT unsent bytes (TCP_NOTSENT_LOWAT; elsewhere a small SO_SNDBUF), this module
at most MAX_QUEUED, and a datagram beyond that is dropped as a full UDP socket would
drop it: the transport's loss recovery and congestion window deal with it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import List, NamedTuple, Optional

from moshpit import MAX_DATAGRAM, TRANSPORTS, MoshpitError
from moshpit_transport import UdpLink

__all__ = [
    "TRANSPORTS", "CarrierClosed", "frame_datagram", "FrameDecoder", "TcpPath", "PathSelector",
    "TcpCarrier", "CarrierLink",
]

log = logging.getLogger("moshpit.carrier")

LENGTH = struct.Struct("!H")
UDP_TRIAL_MARGIN_SECS = 0.3  # beyond 2 handshake RTTs: how long UDP gets to answer first
UDP_TRIAL_PROBE_SECS = 0.1  # during that time: UDP probes 0.1 s, then 0.3 s after it starts
UDP_PROBE_FIRST_SECS = 1.0  # on TCP: the first UDP probe, then doubling ...
UDP_PROBE_MAX_SECS = 15.0  # ... up to this interval
CARRIER_LINGER_SECS = 3.0  # back on UDP: the TCP connection stays open this long
CARRIER_MIN_RTO_SECS = 0.25  # TCP retransmits itself: only a datagram we dropped is lost
CARRIER_RESUME_AFTER_SECS = 5.0  # auto: silence (keepalives come every 3 s) before a resume

NOTE_TCP = "UDP blocked, using TCP"
NOTE_UDP = "UDP works again, back on UDP"


class CarrierClosed(MoshpitError):
    """The TCP carrier ended: closed by the peer, a socket error, or a framing error."""


def frame_datagram(datagram: bytes) -> bytes:
    """``datagram`` as the TCP carrier sends it."""
    if not 1 <= len(datagram) <= MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(datagram)} bytes: outside 1..{MAX_DATAGRAM}")
    return LENGTH.pack(len(datagram)) + datagram


class FrameDecoder:
    """Splits the carrier's byte stream back into datagrams. Holds at most one incomplete
    frame (< 2 + MAX_DATAGRAM bytes) between calls; a length of 0 or above MAX_DATAGRAM is
    a protocol error (CarrierClosed), never a large allocation."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        buffer = self._buffer
        buffer += data
        datagrams, pos = [], 0
        while len(buffer) - pos >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buffer, pos)
            if not 1 <= length <= MAX_DATAGRAM:
                buffer.clear()
                raise CarrierClosed(f"carrier frame of {length} bytes: outside"
                                    f" 1..{MAX_DATAGRAM}")
            end = pos + LENGTH.size + length
            if end > len(buffer):
                break
            datagrams.append(bytes(buffer[pos + LENGTH.size:end]))
            pos = end
        del buffer[:pos]
        return datagrams


class TcpPath(NamedTuple):
    """The transport "address" of a TCP carrier (one per connection, never reused within a
    process): ``host`` is always "tcp", so a move to or from it counts as a new path."""

    host: str
    serial: int


_serials = iter(range(1, 1 << 62))


def new_tcp_path() -> TcpPath:
    return TcpPath("tcp", next(_serials))


class PathSelector:
    """The client's choice of carrier (sans-IO, clock passed in). The loop calls
    ``started`` after each handshake, ``udp_heard`` when an authentic packet came over
    UDP, ``carrier_lost`` when the TCP connection ended; it sends where ``active`` says,
    sends a UDP probe when ``probe_due`` says so, closes the TCP connection when
    ``close_carrier_due`` says so, and shows what ``take_note`` returns (once each)."""

    def __init__(self, mode: str) -> None:
        if mode not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {mode!r}")
        self.mode = mode
        self.active = "udp"
        self.carrier = False  # a TCP connection is open
        self._trial_until: Optional[float] = None
        self._next_probe: Optional[float] = None
        self._probe_interval = UDP_PROBE_FIRST_SECS
        self._close_at: Optional[float] = None
        self._note: Optional[str] = None
        self._told_tcp = False  # the user was told we are on TCP

    @property
    def keeps_carrier(self) -> bool:
        """Whether a handshake's connection is kept as a carrier at all."""
        return self.mode != "udp"

    def started(self, now: float, rtt: float, carrier: bool) -> None:
        """A handshake finished (``rtt``: its round trip); ``carrier``: its connection is
        open for us. The paths start over: on a resume, the old connection is gone."""
        self.carrier = carrier
        self._close_at = self._next_probe = self._trial_until = None
        if self.mode == "tcp":
            self._use("tcp", now)  # with no carrier, nothing goes out until the next one
        elif not carrier:
            self.active = "udp"
        else:  # auto: UDP first, TCP if UDP says nothing in time
            self.active = "udp"
            self._trial_until = now + 2 * rtt + UDP_TRIAL_MARGIN_SECS
            # Extra pings during the trial, so that one lost datagram is not a fallback.
            self._probe_interval = UDP_TRIAL_PROBE_SECS
            self._next_probe = now + UDP_TRIAL_PROBE_SECS

    def udp_heard(self, now: float) -> None:
        """An authentic packet arrived over UDP: it works both ways."""
        if self.mode != "auto":
            return
        self._trial_until = self._next_probe = None
        self._use("udp", now)
        if self.carrier and self._close_at is None:
            self._close_at = now + CARRIER_LINGER_SECS

    def carrier_lost(self, now: float) -> None:
        """The TCP connection ended: UDP is all there is until the next handshake."""
        if self.carrier:
            log.info("the TCP carrier closed")
        self.carrier = False
        self._close_at = self._next_probe = self._trial_until = None
        if self.mode == "auto" and self.active == "tcp":
            self.active = "udp"  # silently: silence now starts a resume, which says more

    def tick(self, now: float) -> None:
        """Timers: the UDP trial's end."""
        if self._trial_until is not None and now >= self._trial_until:
            self._trial_until = None
            self._use("tcp", now)

    def probe_due(self, now: float) -> bool:
        """Send a UDP probe now? (Schedules the next one.)"""
        if self._next_probe is None or now < self._next_probe:
            return False
        self._probe_interval = min(self._probe_interval * 2, UDP_PROBE_MAX_SECS)
        self._next_probe = now + self._probe_interval
        return True

    def close_carrier_due(self, now: float) -> bool:
        """Close the TCP connection now (back on UDP for a while)?"""
        if self._close_at is None or now < self._close_at:
            return False
        self._close_at = None
        self.carrier = False
        return True

    def next_deadline(self) -> Optional[float]:
        times = [t for t in (self._trial_until, self._next_probe, self._close_at)
                 if t is not None]
        return min(times) if times else None

    def take_note(self) -> Optional[str]:
        """The status line to show now, once (None: nothing new)."""
        note, self._note = self._note, None
        return note

    def _use(self, path: str, now: float) -> None:
        self.active = path
        if path == "tcp":
            if self.mode == "auto":
                self._probe_interval = UDP_PROBE_FIRST_SECS
                self._next_probe = now + UDP_PROBE_FIRST_SECS
                if not self._told_tcp:
                    self._told_tcp = True
                    self._note = NOTE_TCP
        elif self._told_tcp:
            self._told_tcp = False
            self._note = NOTE_UDP


class TcpCarrier:
    """A connected TCP socket carrying framed datagrams, non-blocking, for a select loop:
    ``read`` when readable, ``write`` when ``wants_write`` and writable. Errors and
    framing violations raise CarrierClosed; the caller then closes it."""

    NOTSENT_LOWAT = 16 * 1024  # unsent bytes the kernel may hold (TCP_NOTSENT_LOWAT)
    SMALL_SNDBUF = 64 * 1024  # where that option is missing: the whole send buffer
    MAX_QUEUED = 32 * 1024  # framed bytes waiting here for the socket; more are dropped
    RECV_SIZE = 64 * 1024
    KEEPALIVE_IDLE_SECS, KEEPALIVE_INTERVAL_SECS, KEEPALIVE_COUNT = 10, 5, 3
    USER_TIMEOUT_MS = 15000  # unacknowledged data this long: the path is dead (Linux)

    def __init__(self, sock: socket.socket, unread: bytes = b"") -> None:
        self.sock = sock
        self.path = new_tcp_path()
        self._decoder = FrameDecoder()
        self._leftover = unread  # bytes the handshake read past its last message
        self._out = bytearray()
        self.dropped = 0  # datagrams dropped for lack of room (they count as lost)
        sock.setblocking(False)
        self._tune(sock)

    def _tune(self, sock: socket.socket) -> None:
        """Best effort: each option missing on some systems only costs what it buys."""
        options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                   (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):
            options.append((socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, self.NOTSENT_LOWAT))
        else:
            options.append((socket.SOL_SOCKET, socket.SO_SNDBUF, self.SMALL_SNDBUF))
        for name, value in (("TCP_KEEPIDLE", self.KEEPALIVE_IDLE_SECS),
                            ("TCP_KEEPINTVL", self.KEEPALIVE_INTERVAL_SECS),
                            ("TCP_KEEPCNT", self.KEEPALIVE_COUNT),
                            ("TCP_USER_TIMEOUT", self.USER_TIMEOUT_MS)):
            if hasattr(socket, name):
                options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
        for level, option, value in options:
            try:
                sock.setsockopt(level, option, value)
            except OSError:
                pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def wants_write(self) -> bool:
        return bool(self._out)

    def read(self) -> List[bytes]:
        """The datagrams that arrived (possibly none)."""
        data, self._leftover = self._leftover, b""
        if not data:
            try:
                data = self.sock.recv(self.RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return []
            except OSError as err:
                raise CarrierClosed(f"TCP carrier: {os.strerror(err.errno) if err.errno else err}")
            if not data:
                raise CarrierClosed("TCP carrier closed by the peer")
        return self._decoder.feed(data)

    def send(self, datagram: bytes) -> bool:
        """Queue ``datagram`` and write what the socket takes; False if it was dropped."""
        framed = frame_datagram(datagram)
        if len(self._out) + len(framed) > self.MAX_QUEUED:
            self.dropped += 1
            return False
        self._out += framed
        return True

    def write(self) -> None:
        """Hand the socket what it takes of the queue."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.ENOBUFS):
                    return
                raise CarrierClosed(f"TCP carrier: {os.strerror(err.errno) if err.errno else err}")
            del self._out[:sent]

    def close(self) -> None:
        self.sock.close()


class CarrierLink(UdpLink):
    """The session's UDP socket plus at most one TCP carrier, driving one Connection (or a
    session core with the same methods): datagrams go where the Connection addresses them,
    a TcpPath meaning the carrier. Replaces UdpLink in the programs' loops, which also
    watch ``carrier`` (readable always, writable while ``carrier.wants_write()``)."""

    def __init__(self, conn, sock: socket.socket) -> None:
        super().__init__(conn, sock)
        self.carrier: Optional[TcpCarrier] = None

    def attach(self, carrier: TcpCarrier) -> None:
        """Use ``carrier`` (replacing any other): the peer is trusted on it."""
        self.detach()
        self.carrier = carrier
        self._transport.trust_path(carrier.path, CARRIER_MIN_RTO_SECS, fixed_size=True)

    def detach(self) -> None:
        carrier, self.carrier = self.carrier, None
        if carrier is not None:
            self._transport.forget_path(carrier.path)
            carrier.close()

    def carrier_readable(self, now: float) -> bool:
        """Feed what the carrier brought; False if it ended (then it is detached)."""
        carrier = self.carrier
        try:
            datagrams = carrier.read()
        except CarrierClosed as err:
            log.info("%s", err)
            self.detach()
            return False
        for datagram in datagrams:
            self.conn.receive_datagram(datagram, carrier.path, now)
        return True

    def carrier_writable(self) -> bool:
        """Write what is queued; False if the carrier ended (then it is detached)."""
        try:
            self.carrier.write()
        except CarrierClosed as err:
            log.info("%s", err)
            self.detach()
            return False
        return True

    def flush(self, now: float) -> None:
        udp = []
        for datagram, addr in self.conn.datagrams_to_send(now):
            if isinstance(addr, TcpPath):
                self.send_to(datagram, addr)
            else:
                udp.append((datagram, addr))
        self.send_datagrams(udp)  # in runs (UDP GSO) where Linux offers it
        if self.carrier is not None and self.carrier.wants_write():
            self.carrier_writable()

    def send_to(self, datagram: bytes, addr: object) -> None:
        """One datagram to ``addr``: the carrier's TcpPath, or a UDP address."""
        if isinstance(addr, TcpPath):
            carrier = self.carrier
            if carrier is not None and addr == carrier.path:
                carrier.send(datagram)
            return  # else a carrier that has closed: as good as lost
        self._send_each([(datagram, addr)])

    def close(self) -> None:
        self.detach()
        super().close()
