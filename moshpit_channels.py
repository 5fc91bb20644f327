"""moshpit channels: forwarded TCP connections (-L, -R, -D) and ssh-agent connections (-A)
carried by a session, so they survive outages and roaming as the terminal does.

Two layers, as in moshpit_transport:

1. ``ChannelMux`` (sans-IO), attached to a ServerSession or ClientSession
   (``session.attach``): channel open with a target or a listener, open confirm or
   refusal with a reason, data, EOF (half-close), close, a flow window per channel, and
   -R listener requests.  ``SocksParser`` (sans-IO) reads a SOCKS4/4a/5 CONNECT request.
   ``ForwardPolicy`` is the server's rules (allow_tcp_forwarding, permit_open,
   allow_agent_forwarding).
2. I/O glue (``ChannelSockets``): the local sockets of one side's channels (listeners,
   connects, the agent socket) for the programs' select loops.

Wire (records as moshpit_session encodes them; protocol version 4).  OPEN, RESULT, WINDOW
and LISTEN ride the session's urgent record stream 1; DATA, and EOF and CLOSE behind a
channel's last DATA, ride stream 2 (``STREAM_ID``), which the transport serves after the
terminal's stream 0, so forwarded bulk never delays a keystroke.  Channels take turns on
stream 2 (round-robin, CHANNEL_QUANTUM bytes each)::

    OPEN    (9)  chan:u32 kind:u8 window:u32 ref:u32 port:u16 host:u8-length string
                 kind TCP (client->server: connect to host:port, for -L and -D),
                 FORWARDED (server->client: a connection came to -R listener ``ref``; host
                 and port name its origin), AGENT (server->client: a connection to the
                 forwarded agent socket)
    RESULT  (10) chan:u32 code:u8 window:u32 reason: UTF-8   code 0 = opened
    DATA    (11) chan:u32 offset:u64 bytes    (stream 2) the channel's bytes from offset on
    WINDOW  (12) chan:u32 limit:u64           the sender may send bytes below limit
    EOF     (13) chan:u32 end:u64             the sender's bytes end at end (half-close)
    CLOSE   (14) chan:u32 end:u64             the sender is done with the channel: it sends
                 nothing more (its bytes ended at end) and takes nothing more
    LISTEN  (15) op:u8 id:u32 port:u16 ...    op 1 client->server: listen (host string
                 follows) for -R; op 2 server->client: code:u8, reason follows (the port
                 actually bound is in ``port``: -R 0:... asks for any)

The opener picks the channel number: odd from the client, even from the server,
increasing, never reused; a record for a number that is no longer open is a late copy
and ignored.  Every record is idempotent (records come again after a re-key: see
moshpit_session): DATA names its offset and the receiver keeps only bytes it lacks,
WINDOW is absolute, EOF and CLOSE are flags, a repeated OPEN or RESULT changes nothing.

Flow control: each receiver grants CHANNEL_WINDOW bytes beyond what it has *written to
the local socket*, and moves the limit on once half of it is written: a slow reader
pushes back on its own sender only.  Data past the limit is a protocol violation that
closes that channel (not the session).  Buffering is bounded per session: at most
MAX_CHANNELS open channels, each holding at most CHANNEL_WINDOW bytes for its socket and
MAX_PENDING read from it, plus the stream's own window.

Across an outage or roaming nothing moves and nothing is lost: stream 2's unacknowledged
records are written again after the re-key and duplicates are dropped by offset.  An
open request that gets no answer within OPEN_TIMEOUT_SECS fails.  -R listeners belong to
the server's session and stay bound across resumes; a takeover (another client) closes
the old client's channels and listeners.

When the session's shell exits (``on_session_exit``, called by the session core), both
sides stop listening (-R and the agent socket on the server, -L and -D on the client) and
the open channels carry on until they close: the server keeps the exited session while
``busy()``, the client has the exit status and has given the terminal back meanwhile, and
either side quitting (Ctrl-C) or the detached timeout ends them, as ssh waits for forwarded
connections after the shell's exit.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import selectors
import socket
import stat
import struct
import tempfile
import threading
from collections import deque
from typing import Dict, NamedTuple, Optional

from moshpit import parse_permit_open
from moshpit_session import MAX_RECORD_BODY

__all__ = [
    "STREAM_ID", "KIND_TCP", "KIND_FORWARDED", "KIND_AGENT", "OPENED", "PROHIBITED",
    "CONNECT_FAILED", "RESOURCE_SHORTAGE", "TIMED_OUT", "CHANNEL_WINDOW", "MAX_CHANNELS",
    "ChannelMux", "ChannelRequested", "ChannelOpened", "ChannelRefused", "ChannelFinished",
    "ListenRequested", "ListenAnswered", "ForwardPolicy", "SocksParser", "socks_reply",
    "ForwardSpec", "parse_forward", "ChannelSockets", "AgentSocketDir",
]

log = logging.getLogger("moshpit.channels")

STREAM_ID = 2  # the transport stream that carries channel data
RECORD_OPEN, RECORD_RESULT, RECORD_DATA = 9, 10, 11
RECORD_WINDOW, RECORD_EOF, RECORD_CLOSE, RECORD_LISTEN = 12, 13, 14, 15

KIND_TCP, KIND_FORWARDED, KIND_AGENT = 1, 2, 3
KIND_NAMES = {KIND_TCP: "direct-tcpip", KIND_FORWARDED: "forwarded-tcpip",
              KIND_AGENT: "agent"}
# Result codes (ssh's reason codes where they exist).
OPENED, PROHIBITED, CONNECT_FAILED, UNKNOWN_KIND, RESOURCE_SHORTAGE, TIMED_OUT = 0, 1, 2, 3, 4, 5
CODE_NAMES = {PROHIBITED: "administratively prohibited", CONNECT_FAILED: "connect failed",
              UNKNOWN_KIND: "unknown channel type", RESOURCE_SHORTAGE: "resource shortage",
              TIMED_OUT: "timed out"}
LISTEN_REQUEST, LISTEN_ANSWER = 1, 2

OPEN_BODY = struct.Struct("!IBIIH")
RESULT_BODY = struct.Struct("!IBI")
DATA_HEADER = struct.Struct("!IQ")
OFFSET_BODY = struct.Struct("!IQ")  # WINDOW, EOF, CLOSE
LISTEN_BODY = struct.Struct("!BIH")

CHANNEL_WINDOW = 256 * 1024  # bytes a receiver accepts beyond what its socket has taken
MAX_CHANNELS = 32  # open at a time per session (x CHANNEL_WINDOW: the buffering bound)
MAX_LISTENERS = 16  # -R listeners per session
MAX_CHUNK = 16 * 1024  # channel bytes per DATA record
MAX_PENDING = 64 * 1024  # bytes read from a local socket, not yet on the stream
CHANNEL_QUANTUM = MAX_CHUNK  # bytes a channel puts on the stream per turn
STREAM_WINDOW = 512 * 1024  # stream 2's unacknowledged bytes before channels wait
MAX_HOST_BYTES = 255
MAX_REASON_BYTES = 255
LOGGED_VIOLATIONS = 10  # rejected records logged one by one; after that one per 1000
OPEN_TIMEOUT_SECS = 60.0  # an open with no answer (peer away the whole time) fails

assert MAX_CHUNK + DATA_HEADER.size <= MAX_RECORD_BODY


def _reason(text: str) -> bytes:
    return text.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _host_field(host: str) -> bytes:
    raw = host.encode("utf-8")
    if len(raw) > MAX_HOST_BYTES:
        raise ValueError(f"host name longer than {MAX_HOST_BYTES} bytes")
    return bytes([len(raw)]) + raw


def _read_host(body: bytes, pos: int) -> Optional[str]:
    """The u8-length host string at ``pos``; None if it does not fit or is not text."""
    if pos >= len(body) or pos + 1 + body[pos] > len(body):
        return None
    try:
        host = body[pos + 1:pos + 1 + body[pos]].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return host if host.isprintable() else None


# ---------------------------------------------------------------------------
# Events for the programs
# ---------------------------------------------------------------------------


class ChannelRequested(NamedTuple):
    """The peer opens channel ``chan``: connect to ``host:port`` (TCP), to the agent, or
    (FORWARDED) to -R listener ``ref``'s target; then ``accept`` or ``refuse`` it."""

    chan: int
    kind: int
    host: str
    port: int
    ref: int


class ChannelOpened(NamedTuple):
    """Our open of ``chan`` was accepted: its bytes flow."""

    chan: int


class ChannelRefused(NamedTuple):
    """Our open of ``chan`` failed (code, the peer's reason): close its socket."""

    chan: int
    code: int
    reason: str


class ChannelFinished(NamedTuple):
    """``chan`` is over (both sides closed it, everything deliverable was given to the
    socket, or the socket failed): close its socket."""

    chan: int


class ListenRequested(NamedTuple):
    """Server: the client asks for -R listener ``listener`` on ``host:port``."""

    listener: int
    host: str
    port: int


class ListenAnswered(NamedTuple):
    """Client: the server's answer to -R listener ``listener`` (code 0: bound on port)."""

    listener: int
    code: int
    port: int
    reason: str


# ---------------------------------------------------------------------------
# The channel layer (sans-IO)
# ---------------------------------------------------------------------------


class _Channel:
    """One channel's state on one side: outgoing bytes (read from the local socket) and
    incoming bytes (for it), with the offsets that make both exact across re-keys."""

    def __init__(self, chan: int, kind: int, opener: bool, now: float) -> None:
        self.chan, self.kind = chan, kind
        self.opened = False  # the open was accepted (both sides)
        self.started_at = now
        self.opener = opener
        # Outgoing: read from the socket -> pending -> DATA records.
        self.pending = bytearray()
        self.sent = 0  # offset of the next byte to put on the stream
        self.send_limit = 0  # the peer's grant
        self.local_eof = False  # the socket read EOF
        self.eof_sent = False
        # Incoming: DATA records -> output -> the socket.
        self.received = 0  # offset after the last byte received
        self.output = bytearray()
        self.written = 0  # bytes the socket has taken
        self.granted = CHANNEL_WINDOW  # the limit we gave the peer
        self.peer_end: Optional[int] = None  # the peer's EOF or CLOSE offset
        self.write_shut = False  # the socket was told EOF
        self.local_dead = False  # the socket failed or was closed: nothing more for it
        self.close_sent = False
        self.close_received = False


class ChannelMux:
    """One side's channels over one session (moshpit_session.ServerSession or
    ClientSession), as pure code: the program reports what its sockets did and asks what
    to do next; the mux writes the records and tells the program through events.

    Opening: ``open(kind, host, port, ref)`` -> channel number; later ChannelOpened or
    ChannelRefused.  A peer's open comes as ChannelRequested (after ``policy`` allowed
    it), answered with ``accept`` or ``refuse``.  Bytes: read a socket only up to
    ``read_allowance(chan)`` and pass them to ``local_data``; EOF to ``local_eof``, an
    error to ``local_closed``; write ``output(chan)`` to the socket and report
    ``output_written``; shut the socket's write side when ``should_shut_write``.  Call
    ``pump(now)`` each loop turn (it moves queued bytes onto the stream as the stream's
    window opens), and close the socket at ChannelFinished.
    """

    RECORD_TYPES = (RECORD_OPEN, RECORD_RESULT, RECORD_DATA, RECORD_WINDOW, RECORD_EOF,
                    RECORD_CLOSE, RECORD_LISTEN)
    STREAM_ID = STREAM_ID
    STREAM_WINDOW = STREAM_WINDOW

    def __init__(self, session: object, role: str, policy: Optional[ForwardPolicy] = None,
                 agent: bool = False) -> None:
        self.session = session
        self.role = role
        self.policy = policy
        self.agent = agent  # client: agent channels are welcome (-A)
        self._channels: Dict[int, _Channel] = {}
        self._next_chan = 1 if role == "client" else 2
        self._peer_highest = 0  # the peer's highest channel number seen
        self._turns: deque = deque()  # channel numbers, in round-robin order
        self._events: deque = deque()
        self.listeners: Dict[int, tuple] = {}  # server: id -> (host, port); client: requested
        self.violations = 0  # records rejected as malformed or out of bounds (for tests, logs)
        # False once the session's shell has exited: the listeners close (no new
        # connections), the open channels drain (ssh's "waiting for forwarded connections").
        self.accepting = True
        self._closed_for = ""  # what the latest rejected record broke, for the log
        self.lane = session.attach(self)

    # -- the program's calls -------------------------------------------------------------

    def next_event(self) -> object:
        return self._events.popleft() if self._events else None

    def open(self, kind: int, host: str, port: int, now: float, ref: int = 0) -> int:
        """Open a channel to ``host:port`` (kind TCP) or for listener ``ref``; returns its
        number.  With MAX_CHANNELS open it is refused at once (ChannelRefused)."""
        chan = self._next_chan
        self._next_chan += 2
        if len(self._channels) >= MAX_CHANNELS:
            self._events.append(ChannelRefused(chan, RESOURCE_SHORTAGE,
                                               f"more than {MAX_CHANNELS} channels open"))
            return chan
        self._channels[chan] = _Channel(chan, kind, True, now)
        body = (OPEN_BODY.pack(chan, kind, CHANNEL_WINDOW, ref, port) + _host_field(host))
        self.session.records.send(RECORD_OPEN, body)
        return chan

    def accept(self, chan: int) -> None:
        """The peer's open of ``chan`` succeeded here (connected)."""
        channel = self._channels.get(chan)
        if channel is not None and not channel.opened:
            channel.opened = True
            self._turns.append(chan)
            self.session.records.send(RECORD_RESULT,
                                      RESULT_BODY.pack(chan, OPENED, CHANNEL_WINDOW))

    def refuse(self, chan: int, code: int, reason: str) -> None:
        """The peer's open of ``chan`` failed here, with ``code`` and a reason for people."""
        if self._channels.pop(chan, None) is not None:
            self.session.records.send(RECORD_RESULT,
                                      RESULT_BODY.pack(chan, code, 0) + _reason(reason))

    def listen(self, listener: int, host: str, port: int) -> None:
        """Client: ask the server for -R listener ``listener`` on ``host:port``."""
        self.listeners[listener] = (host, port)
        self.session.records.send(RECORD_LISTEN, LISTEN_BODY.pack(LISTEN_REQUEST, listener, port)
                                  + _host_field(host))

    def answer_listen(self, listener: int, code: int, port: int, reason: str = "") -> None:
        """Server: the outcome of a ListenRequested (code 0: bound on ``port``)."""
        if code == OPENED:
            self.listeners[listener] = ("", port)
        else:
            self.listeners.pop(listener, None)
        self.session.records.send(RECORD_LISTEN, LISTEN_BODY.pack(LISTEN_ANSWER, listener, port)
                                  + bytes([code]) + _reason(reason))

    def channels(self) -> list:
        return list(self._channels)

    def busy(self) -> bool:
        """Channels are open (an exited session waits for them: moshpit_session)."""
        return bool(self._channels)

    def active(self) -> bool:
        """Channels are open or events wait for the program."""
        return bool(self._channels or self._events)

    def read_allowance(self, chan: int) -> int:
        """How many bytes to read from ``chan``'s socket now (0: leave it unread)."""
        channel = self._channels.get(chan)
        if (channel is None or not channel.opened or channel.local_eof or channel.close_sent
                or channel.close_received):
            return 0
        credit = channel.send_limit - channel.sent - len(channel.pending)
        return max(0, min(credit, MAX_PENDING - len(channel.pending)))

    def local_data(self, chan: int, data: bytes, now: float) -> None:
        """Bytes read from ``chan``'s socket (at most ``read_allowance``)."""
        channel = self._channels.get(chan)
        if channel is not None and data:
            channel.pending += data
            self.pump(now)

    def local_eof(self, chan: int, now: float) -> None:
        """``chan``'s socket read EOF: the peer gets EOF after the bytes before it."""
        channel = self._channels.get(chan)
        if channel is not None:
            channel.local_eof = True
            self.pump(now)

    def local_closed(self, chan: int, now: float) -> None:
        """``chan``'s socket failed (or is gone): close the channel, dropping what the
        socket can no longer take."""
        channel = self._channels.get(chan)
        if channel is None:
            return
        channel.local_dead = True
        channel.output.clear()
        channel.pending.clear()
        if not channel.opened and channel.opener:
            # Not answered yet: the peer gets CLOSE once its RESULT arrives.
            channel.local_eof = True
        self._send_close(channel)
        self._check_finished(channel)

    def output(self, chan: int) -> bytes:
        """Bytes for ``chan``'s socket (write what it takes, then ``output_written``)."""
        channel = self._channels.get(chan)
        if channel is None or not channel.opened:  # -D: the SOCKS answer goes first
            return b""
        return bytes(channel.output[:MAX_PENDING])

    def output_written(self, chan: int, count: int) -> None:
        channel = self._channels.get(chan)
        if channel is None or count <= 0:
            return
        del channel.output[:count]
        channel.written += count
        if (not channel.close_received and channel.peer_end is None
                and channel.granted - channel.written <= CHANNEL_WINDOW // 2):
            channel.granted = channel.written + CHANNEL_WINDOW
            self.session.records.send(RECORD_WINDOW, OFFSET_BODY.pack(chan, channel.granted))
        self._check_finished(channel)

    def should_shut_write(self, chan: int) -> bool:
        """The peer's bytes have ended and the socket has them all: shut its write side
        (once: ``write_shut`` after the program did)."""
        channel = self._channels.get(chan)
        if (channel is None or not channel.opened or channel.write_shut
                or channel.peer_end is None):
            return False
        return channel.written >= channel.peer_end

    def write_shut(self, chan: int) -> None:
        channel = self._channels.get(chan)
        if channel is not None:
            channel.write_shut = True
            self._check_finished(channel)

    def pump(self, now: float) -> None:
        """Move bytes read from sockets onto stream 2 while its window has room, a quantum
        per channel per turn; then EOFs and CLOSEs that wait for those bytes."""
        turns = self._turns
        for chan in [chan for chan in turns if chan not in self._channels]:
            turns.remove(chan)
        progressed = True
        while progressed and self.lane.writable():
            progressed = False
            for _ in range(len(turns)):
                channel = self._channels[turns[0]]
                turns.rotate(-1)
                size = min(len(channel.pending), CHANNEL_QUANTUM,
                           channel.send_limit - channel.sent)
                if size > 0:
                    self._send_data(channel, size)
                    progressed = True
                    if not self.lane.writable():
                        break
        for channel in list(self._channels.values()):
            self._send_eof(channel)

    def next_timeout(self) -> Optional[float]:
        starts = [c.started_at for c in self._channels.values() if c.opener and not c.opened]
        return min(starts) + OPEN_TIMEOUT_SECS if starts else None

    def check_timeouts(self, now: float) -> None:
        """Opens unanswered for OPEN_TIMEOUT_SECS fail (ChannelRefused)."""
        for channel in list(self._channels.values()):
            if (channel.opener and not channel.opened
                    and now >= channel.started_at + OPEN_TIMEOUT_SECS):
                del self._channels[channel.chan]
                self._events.append(ChannelRefused(channel.chan, TIMED_OUT,
                                                   "no answer from the peer"))

    def buffered(self) -> int:
        """Bytes held for sockets and read from them (the session's channel buffering)."""
        return sum(len(c.output) + len(c.pending) for c in self._channels.values())

    # -- records -------------------------------------------------------------------------

    def on_session_exit(self, now: float) -> None:
        """The shell exited: stop listening (-R on the server, -L/-D on the client, the
        agent socket), let the open channels finish."""
        self.accepting = False
        if self.role == "server":
            self.listeners.clear()

    def on_new_connection(self, lane: object, now: float) -> None:
        """A takeover: the old client's channels and listeners end with its connection."""
        self.lane = lane
        for chan in list(self._channels):
            self._events.append(ChannelFinished(chan))
        self._channels.clear()
        self._turns.clear()
        self.listeners.clear()
        self._peer_highest = 0  # the new client numbers its channels from 1 again

    def on_record(self, record_type: int, body: bytes, now: float) -> None:
        handler = {RECORD_OPEN: self._on_open, RECORD_RESULT: self._on_result,
                   RECORD_DATA: self._on_data, RECORD_WINDOW: self._on_window,
                   RECORD_EOF: self._on_eof, RECORD_CLOSE: self._on_close,
                   RECORD_LISTEN: self._on_listen}[record_type]
        if not handler(body, now):
            self.violations += 1
            if self.violations <= LOGGED_VIOLATIONS or not self.violations % 1000:
                # (a hostile peer cannot flood the log: the first few, then one per 1000)
                log.warning("channel record of type %d (%d bytes) rejected%s (%d so far)",
                            record_type, len(body), self._closed_for, self.violations)
        self._closed_for = ""

    def _on_open(self, body: bytes, now: float) -> bool:
        if len(body) < OPEN_BODY.size:
            return False
        chan, kind, window, ref, port = OPEN_BODY.unpack_from(body)
        host = _read_host(body, OPEN_BODY.size)
        if host is None or chan % 2 != (0 if self.role == "client" else 1) or chan == 0:
            return False
        if chan <= self._peer_highest:
            return True  # a copy resent after a re-key
        self._peer_highest = chan
        if not self.session.records.writable():
            # A peer that opens channels without acknowledging our answers: no answer
            # (the records would pile up here); its open times out.
            return False
        refusal = self._open_refusal(kind, host, port, ref)
        if refusal is not None:
            code, reason = refusal
            log.info("channel %d (%s to %s:%d) refused: %s", chan,
                     KIND_NAMES.get(kind, kind), host, port, reason)
            self.session.records.send(RECORD_RESULT,
                                      RESULT_BODY.pack(chan, code, 0) + _reason(reason))
            return True
        channel = self._channels[chan] = _Channel(chan, kind, False, now)
        channel.send_limit = min(window, CHANNEL_WINDOW * 4)
        self._events.append(ChannelRequested(chan, kind, host, port, ref))
        return True

    def _open_refusal(self, kind: int, host: str, port: int, ref: int) -> Optional[tuple]:
        """(code, reason) if this side does not take such a channel, else None."""
        if len(self._channels) >= MAX_CHANNELS:
            return RESOURCE_SHORTAGE, f"more than {MAX_CHANNELS} channels open"
        if self.role == "server":
            if kind != KIND_TCP:
                return UNKNOWN_KIND, f"a client cannot open {KIND_NAMES.get(kind, kind)} channels"
            if self.policy is None:
                return PROHIBITED, "port forwarding is disabled on this server"
            return self.policy.refusal(host, port)
        if kind == KIND_AGENT:
            return None if self.agent else (PROHIBITED, "agent forwarding was not requested")
        if kind == KIND_FORWARDED:
            return None if ref in self.listeners else (PROHIBITED, f"no remote forward {ref}")
        return UNKNOWN_KIND, f"a server cannot open {KIND_NAMES.get(kind, kind)} channels"

    def _on_result(self, body: bytes, now: float) -> bool:
        if len(body) < RESULT_BODY.size:
            return False
        chan, code, window = RESULT_BODY.unpack_from(body)
        channel = self._channels.get(chan)
        if channel is None or not channel.opener or channel.opened:
            return True  # a late copy
        if code != OPENED:
            del self._channels[chan]
            reason = body[RESULT_BODY.size:].decode("utf-8", "replace")
            self._events.append(ChannelRefused(chan, code, reason))
            return True
        channel.opened = True
        channel.send_limit = min(window, CHANNEL_WINDOW * 4)
        self._turns.append(chan)
        self._events.append(ChannelOpened(chan))
        if channel.local_dead:
            self._send_close(channel)
            self._check_finished(channel)
        return True

    def _on_data(self, body: bytes, now: float) -> bool:
        if len(body) < DATA_HEADER.size:
            return False
        chan, offset = DATA_HEADER.unpack_from(body)
        channel = self._channels.get(chan)
        if channel is None:
            return True  # a channel that has ended
        data = body[DATA_HEADER.size:]
        if offset > channel.received:
            return self._violation(channel, "data beyond a gap")
        new = data[channel.received - offset:]
        if channel.received + len(new) > channel.granted:
            return self._violation(channel, "data beyond the window")
        if channel.peer_end is not None and channel.received + len(new) > channel.peer_end:
            return self._violation(channel, "data after EOF")
        channel.received += len(new)
        if not channel.local_dead:
            channel.output += new
        return True

    def _on_window(self, body: bytes, now: float) -> bool:
        if len(body) < OFFSET_BODY.size:
            return False
        chan, limit = OFFSET_BODY.unpack_from(body)
        channel = self._channels.get(chan)
        if channel is not None and limit > channel.send_limit:
            if limit - channel.sent > CHANNEL_WINDOW * 4:
                return self._violation(channel, "window larger than allowed")
            channel.send_limit = limit
            self.pump(now)
        return True

    def _on_eof(self, body: bytes, now: float) -> bool:
        if len(body) < OFFSET_BODY.size:
            return False
        chan, end = OFFSET_BODY.unpack_from(body)
        channel = self._channels.get(chan)
        if channel is not None and channel.peer_end is None:
            if end < channel.received or end > channel.granted:
                return self._violation(channel, "EOF at an impossible offset")
            channel.peer_end = end
            self._check_finished(channel)
        return True

    def _on_close(self, body: bytes, now: float) -> bool:
        if len(body) < OFFSET_BODY.size:
            return False
        chan, end = OFFSET_BODY.unpack_from(body)
        channel = self._channels.get(chan)
        if channel is None or channel.close_received:
            return True
        channel.close_received = True
        if channel.peer_end is None:
            channel.peer_end = max(min(end, channel.granted), channel.received)
        channel.pending.clear()  # the peer takes nothing more
        self._send_close(channel)
        self._check_finished(channel)
        return True

    def _on_listen(self, body: bytes, now: float) -> bool:
        if len(body) < LISTEN_BODY.size:
            return False
        op, listener, port = LISTEN_BODY.unpack_from(body)
        if op == LISTEN_REQUEST and self.role == "server":
            host = _read_host(body, LISTEN_BODY.size)
            if host is None:
                return False
            if listener in self.listeners:
                return True  # a copy resent after a re-key
            if not self.accepting:
                self.answer_listen(listener, PROHIBITED, port, "the session's shell has exited")
            elif self.policy is None or not self.policy.allow_remote:
                self.answer_listen(listener, PROHIBITED, port,
                                   "remote port forwarding is disabled on this server")
            elif len(self.listeners) >= MAX_LISTENERS:
                self.answer_listen(listener, RESOURCE_SHORTAGE,
                                   port, f"more than {MAX_LISTENERS} remote forwards")
            else:
                self.listeners[listener] = (host, port)
                self._events.append(ListenRequested(listener, host, port))
            return True
        if op == LISTEN_ANSWER and self.role == "client" and len(body) > LISTEN_BODY.size:
            if listener in self.listeners:
                code = body[LISTEN_BODY.size]
                reason = body[LISTEN_BODY.size + 1:].decode("utf-8", "replace")
                self._events.append(ListenAnswered(listener, code, port, reason))
            return True
        return False

    # -- rules ---------------------------------------------------------------------------

    def _violation(self, channel: _Channel, what: str) -> bool:
        """The peer broke this channel's rules: close it (not the session)."""
        self._closed_for = f": {what}: channel {channel.chan} closed"
        self.local_closed(channel.chan, 0.0)
        return False

    def _send_data(self, channel: _Channel, size: int) -> None:
        chunk = bytes(channel.pending[:size])
        del channel.pending[:size]
        self.lane.send(RECORD_DATA, DATA_HEADER.pack(channel.chan, channel.sent) + chunk)
        channel.sent += size

    def _send_eof(self, channel: _Channel) -> None:
        if (channel.local_eof and channel.opened and not channel.eof_sent
                and not channel.pending and not channel.close_sent):
            channel.eof_sent = True
            self.lane.send(RECORD_EOF, OFFSET_BODY.pack(channel.chan, channel.sent))
            self._check_finished(channel)

    def _send_close(self, channel: _Channel) -> None:
        if not channel.close_sent and (channel.opened or not channel.opener):
            channel.close_sent = True
            # On stream 2, after the channel's last DATA: nothing overtakes it.
            self.lane.send(RECORD_CLOSE, OFFSET_BODY.pack(channel.chan, channel.sent))

    def _check_finished(self, channel: _Channel) -> None:
        """Close once both directions are over; finish once both sides closed."""
        delivered = channel.local_dead or (
            channel.peer_end is not None and channel.written >= channel.peer_end
            and channel.write_shut)
        if not channel.close_sent and channel.eof_sent and delivered:
            self._send_close(channel)
        if (channel.close_sent and channel.close_received and delivered
                and self._channels.pop(channel.chan, None) is not None):
            self._events.append(ChannelFinished(channel.chan))


# ---------------------------------------------------------------------------
# The server's rules (sans-IO)
# ---------------------------------------------------------------------------

TCP_FORWARDING_CHOICES = ("yes", "all", "no", "local", "remote")


class ForwardPolicy:
    """What a server lets a client forward, as sshd's AllowTcpForwarding (yes/all, no,
    local: -L and -D only, remote: -R only), PermitOpen (``any``, ``none``, or
    ``host:port`` entries, ``*`` for any host or port, ``[v6]:port``) and
    AllowAgentForwarding."""

    def __init__(self, allow_tcp: str = "yes", permit_open: str = "any",
                 allow_agent: bool = True) -> None:
        if allow_tcp not in TCP_FORWARDING_CHOICES:
            raise ValueError("must be one of " + ", ".join(TCP_FORWARDING_CHOICES))
        self.allow_local = allow_tcp in ("yes", "all", "local")
        self.allow_remote = allow_tcp in ("yes", "all", "remote")
        self.allow_agent = allow_agent
        self.permits = parse_permit_open(permit_open)

    def refusal(self, host: str, port: int) -> Optional[tuple]:
        """(code, reason) if a -L/-D connection to ``host:port`` is not allowed, else None."""
        if not self.allow_local:
            return PROHIBITED, "local port forwarding is disabled on this server"
        if self.permits is not None and not any(
                fnmatch.fnmatchcase(host.lower(), allowed_host) and allowed_port in ("*", str(port))
                for allowed_host, allowed_port in self.permits):
            return PROHIBITED, f"{host}:{port} is not in the server's permit_open"
        return None


# ---------------------------------------------------------------------------
# Forwarding specifications (-L, -R, -D) and SOCKS (sans-IO)
# ---------------------------------------------------------------------------


class ForwardSpec(NamedTuple):
    """One -L/-R/-D: listen on ``bind_host:bind_port``, connect to ``host:port`` (-D:
    host None, the SOCKS client names it)."""

    bind_host: str
    bind_port: int
    host: Optional[str]
    port: int


def _split_fields(text: str) -> list:
    """``a:b:[v6]:c`` -> ["a", "b", "v6", "c"] (brackets keep an IPv6 address whole)."""
    fields, cur, depth = [], "", 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == ":" and depth == 0:
            fields.append(cur)
            cur = ""
            continue
        cur += ch
    fields.append(cur)
    return [f[1:-1] if f.startswith("[") and f.endswith("]") else f for f in fields]


def _port(text: str, what: str, zero_ok: bool = False) -> int:
    if not text.isdigit() or not (0 if zero_ok else 1) <= int(text) <= 65535:
        raise ValueError(f"bad {what} port {text!r}")
    return int(text)


def parse_forward(option: str, text: str) -> ForwardSpec:
    """ssh's ``-L/-R [bind:]port:host:hostport`` and ``-D [bind:]port``; loopback unless a
    bind address is given (``*`` or an empty one: every address).  Raises ValueError."""
    fields = _split_fields(text)
    if option == "-D":
        if len(fields) not in (1, 2):
            raise ValueError(f"-D {text}: use [bind_address:]port")
        bind = fields[0] if len(fields) == 2 else "localhost"
        return ForwardSpec(bind, _port(fields[-1], "listen"), None, 0)
    if len(fields) not in (3, 4):
        raise ValueError(f"{option} {text}: use [bind_address:]port:host:hostport")
    bind = fields[0] if len(fields) == 4 else "localhost"
    host = fields[-2]
    if not host or len(host.encode()) > MAX_HOST_BYTES:
        raise ValueError(f"{option} {text}: bad host")
    return ForwardSpec(bind, _port(fields[-3], "listen", zero_ok=option == "-R"), host,
                       _port(fields[-1], "target"))


def bind_address(host: str) -> str:
    """A spec's bind host as an address to bind: loopback by default, every address for
    ``*`` or an empty one."""
    if host in ("", "*"):
        return "::"
    if host == "localhost":
        return "127.0.0.1"
    return host


SOCKS4_GRANTED, SOCKS4_REJECTED = 90, 91
SOCKS5_OK, SOCKS5_FAILURE, SOCKS5_NOT_ALLOWED, SOCKS5_HOST_UNREACHABLE = 0, 1, 2, 4
SOCKS5_REFUSED, SOCKS5_COMMAND, SOCKS5_ADDRESS_TYPE = 5, 7, 8
MAX_SOCKS_REQUEST = 600  # a SOCKS request is far smaller: more is garbage


class SocksError(ValueError):
    """A SOCKS request that cannot be served; ``reply`` is the answer to send (maybe b"")."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class SocksParser:
    """A SOCKS4, SOCKS4a or SOCKS5 CONNECT request, fed as it arrives (sans-IO).

    ``feed(data)`` returns the bytes to answer now (SOCKS5's method choice) and sets
    ``target`` = (host, port) once the request is complete; ``leftover`` is what came
    after it (the first bytes of the connection).  Anything else raises SocksError.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.version: Optional[int] = None
        self._method_chosen = False
        self.target: Optional[tuple] = None
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        if self.target is not None:
            self.leftover += data
            return b""
        self._buf += data
        if len(self._buf) > MAX_SOCKS_REQUEST:
            raise SocksError("SOCKS request too long")
        if not self._buf:
            return b""
        self.version = self._buf[0]
        if self.version == 4:
            self._socks4()
            return b""
        if self.version == 5:
            return self._socks5()
        raise SocksError(f"not a SOCKS request (version byte {self.version})")

    def _take(self, size: int) -> None:
        self.leftover = bytes(self._buf[size:])
        self._buf.clear()

    def _socks4(self) -> None:
        buf = self._buf
        if len(buf) < 9:
            return
        command, port = buf[1], struct.unpack_from("!H", buf, 2)[0]
        user_end = buf.find(b"\0", 8)
        if user_end < 0:
            return
        if command != 1:
            raise SocksError("SOCKS4: only CONNECT is supported", socks_reply(4, False))
        ip = bytes(buf[4:8])
        if ip[:3] == b"\0\0\0" and ip[3]:  # 4a: the name follows the user
            name_end = buf.find(b"\0", user_end + 1)
            if name_end < 0:
                return
            host = self._name(bytes(buf[user_end + 1:name_end]), socks_reply(4, False))
            self._take(name_end + 1)
        else:
            host = socket.inet_ntoa(ip)
            self._take(user_end + 1)
        self.target = (host, port)

    def _socks5(self) -> bytes:
        buf = self._buf
        if not self._method_chosen:
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                return b""
            methods = bytes(buf[2:2 + buf[1]])
            del buf[:2 + len(methods)]
            if 0 not in methods:
                raise SocksError("SOCKS5: the client offers no method without authentication",
                                 b"\x05\xff")
            self._method_chosen = True
            return b"\x05\x00" + self._socks5()
        if len(buf) < 4:
            return b""
        _version, command, _reserved, atyp = buf[:4]
        if atyp == 1:
            size = 4 + 4 + 2
        elif atyp == 4:
            size = 4 + 16 + 2
        elif atyp == 3:
            if len(buf) < 5:
                return b""
            size = 4 + 1 + buf[4] + 2
        else:
            raise SocksError("SOCKS5: unknown address type", socks_reply(5, SOCKS5_ADDRESS_TYPE))
        if len(buf) < size:
            return b""
        if command != 1:
            raise SocksError("SOCKS5: only CONNECT is supported", socks_reply(5, SOCKS5_COMMAND))
        port = struct.unpack_from("!H", buf, size - 2)[0]
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, bytes(buf[4:8]))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, bytes(buf[4:20]))
        else:
            host = self._name(bytes(buf[5:5 + buf[4]]), socks_reply(5, SOCKS5_FAILURE))
        self._take(size)
        self.target = (host, port)
        return b""

    @staticmethod
    def _name(raw: bytes, reply: bytes) -> str:
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            host = ""
        if not host or not host.isprintable() or len(raw) > MAX_HOST_BYTES:
            raise SocksError("SOCKS: bad host name", reply)
        return host


def socks_reply(version: int, code) -> bytes:
    """The answer to a CONNECT: SOCKS4 granted/rejected (``code`` True/False), SOCKS5 a
    reply code (0 = succeeded).  The bound address is left zero, as ssh does."""
    if version == 4:
        return bytes([0, SOCKS4_GRANTED if code else SOCKS4_REJECTED]) + bytes(6)
    return bytes([5, code, 0, 1]) + bytes(6)


def socks5_code(code: int) -> int:
    """A channel refusal as a SOCKS5 reply code."""
    return {PROHIBITED: SOCKS5_NOT_ALLOWED, CONNECT_FAILED: SOCKS5_REFUSED,
            TIMED_OUT: SOCKS5_HOST_UNREACHABLE}.get(code, SOCKS5_FAILURE)


# ---------------------------------------------------------------------------
# I/O glue
# ---------------------------------------------------------------------------

CONNECT_TIMEOUT_SECS = 20.0  # an outbound connect (name lookup included) that takes longer fails
READ_SIZE = 64 * 1024
SELECTOR_TAG = "channels"  # the data of every selector key ChannelSockets registers


class ChannelSockets:
    """The local sockets of one side's channels, for a select loop: listeners (-L, -D and
    -R listeners, the forwarded agent socket), outbound connects (each in a short thread:
    name lookups block), SOCKS negotiation and the byte relay.  The rules are the mux's;
    this only moves bytes and reports what the sockets did.

    Per loop turn: wait on ``readers()`` / ``writers()`` (or ``sync_selector``), then call
    ``handle(readable, writable, now)`` after the session took its datagrams; sleep at most
    ``timeout(now)``.  ``notify(text)`` tells the person (client) or the log (server)
    about refusals.
    """

    def __init__(self, mux: ChannelMux, notify=None, agent_path: Optional[str] = None,
                 privileged_ports: bool = True, agent_dir: Optional[AgentSocketDir] = None
                 ) -> None:
        self.mux = mux
        self.notify = notify or (lambda text: log.info("%s", text))
        self.agent_path = agent_path  # client: the local agent (-A)
        self.privileged_ports = privileged_ports  # server: may -R bind ports below 1024?
        self.remote_targets: Dict[int, ForwardSpec] = {}  # client: -R listener id -> spec
        self._chan_socks: Dict[int, socket.socket] = {}
        self._listeners: Dict[socket.socket, tuple] = {}  # sock -> (what, spec or id)
        self._negotiating: Dict[socket.socket, SocksParser] = {}
        self._socks_chans: Dict[int, int] = {}  # chan -> SOCKS version awaiting the answer
        self._results: deque = deque()  # (chan, socket or error) from connect threads
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._blocked: set = set()  # channels whose socket said EAGAIN: wait for writable
        self._registered: Dict[int, tuple] = {}  # fd -> (socket, events) in a selector
        self._lock = threading.Lock()
        self.agent_dir = agent_dir  # server: -A's socket, removed at close
        if agent_dir is not None:
            agent_dir.sock.setblocking(False)
            self._listeners[agent_dir.sock] = ("agent", None)

    # -- listeners -----------------------------------------------------------------------

    def listen_local(self, option: str, spec: ForwardSpec) -> None:
        """Client: listen for -L (option "-L") or -D ("-D").  Raises OSError."""
        sock = _listen_tcp(bind_address(spec.bind_host), spec.bind_port)
        self._listeners[sock] = (option, spec)

    def request_remote(self, listener: int, spec: ForwardSpec) -> None:
        """Client: ask for -R ``spec`` as listener number ``listener``."""
        self.remote_targets[listener] = spec
        self.mux.listen(listener, spec.bind_host, spec.bind_port)

    def close(self) -> None:
        for sock in list(self._listeners) + list(self._chan_socks.values()) + list(
                self._negotiating) + [self._wake_r, self._wake_w]:
            sock.close()
        self._listeners.clear()
        self._chan_socks.clear()
        self._negotiating.clear()
        if self.agent_dir is not None:
            self.agent_dir.close()

    # -- the loop ------------------------------------------------------------------------

    def readers(self) -> list:
        mux = self.mux
        return ([self._wake_r] + list(self._listeners) + list(self._negotiating)
                + [sock for chan, sock in self._chan_socks.items() if mux.read_allowance(chan)])

    def writers(self) -> list:
        return [sock for chan, sock in self._chan_socks.items() if chan in self._blocked]

    def sync_selector(self, sel) -> None:
        """Register our sockets' descriptors with a ``selectors`` selector (data
        SELECTOR_TAG; ``handle`` takes the ready descriptors)."""
        if self._idle() and list(self._registered) == [self._wake_r.fileno()]:
            return  # every loop pass of a session without forwarding: nothing changes
        wanted: Dict[int, list] = {}
        for sock in self.readers():
            wanted[sock.fileno()] = [sock, selectors.EVENT_READ]
        for sock in self.writers():
            wanted.setdefault(sock.fileno(), [sock, 0])[1] |= selectors.EVENT_WRITE
        for fd, (sock, _events) in list(self._registered.items()):
            if fd not in wanted or wanted[fd][0] is not sock:
                sel.unregister(fd)  # a closed descriptor too (its number may be reused)
                del self._registered[fd]
        for fd, (sock, events) in wanted.items():
            old = self._registered.get(fd)
            if old is None:
                sel.register(fd, events, SELECTOR_TAG)
            elif old[1] != events:
                sel.modify(fd, events, SELECTOR_TAG)
            self._registered[fd] = (sock, events)

    def timeout(self, now: float) -> Optional[float]:
        deadline = self.mux.next_timeout()
        return None if deadline is None else max(0.0, deadline - now)

    def handle_selected(self, ready: list, now: float) -> None:
        """``handle`` with a ``selectors`` result (only our keys count)."""
        ours = [(key.fd, events) for key, events in ready if key.data == SELECTOR_TAG]
        self.handle([fd for fd, events in ours if events & selectors.EVENT_READ],
                    [fd for fd, events in ours if events & selectors.EVENT_WRITE], now)

    def handle(self, readable, writable, now: float) -> None:
        """React to ready sockets and to the mux's events; move what can move."""
        if self._idle() and self._wake_r not in readable:
            return  # every loop turn of a session without forwarding: skip the walk below
        readable = {s if isinstance(s, int) else s.fileno() for s in readable}
        for sock in [self._wake_r, *self._listeners, *self._negotiating]:
            if sock.fileno() not in readable:
                continue
            if sock is self._wake_r:
                self._connect_results(now)
            elif sock in self._listeners:
                self._accept(sock, now)
            elif sock in self._negotiating:
                self._negotiate(sock, now)
        for chan, sock in list(self._chan_socks.items()):
            if sock.fileno() in readable:
                self._read(chan, sock, now)
        self.mux.check_timeouts(now)
        self.events(now)
        self._drop_old_listeners()
        writable = {s if isinstance(s, int) else s.fileno() for s in writable}
        for chan, sock in list(self._chan_socks.items()):
            if chan not in self._blocked or sock.fileno() in writable:
                self._write(chan, sock, now)
        self.events(now)
        self.mux.pump(now)

    def _idle(self) -> bool:
        """No socket, no channel, no event: ``handle`` would find nothing to do."""
        return not (self._listeners or self._negotiating or self._chan_socks
                    or self.mux.active())

    def events(self, now: float) -> None:
        mux = self.mux
        while True:
            event = mux.next_event()
            if event is None:
                return
            if isinstance(event, ChannelRequested):
                self._start_connect(event)
            elif isinstance(event, ChannelOpened):
                version = self._socks_chans.pop(event.chan, None)
                if version is not None:
                    self._send_all(event.chan, socks_reply(version, True if version == 4
                                                           else SOCKS5_OK))
            elif isinstance(event, ChannelRefused):
                version = self._socks_chans.pop(event.chan, None)
                sock = self._chan_socks.pop(event.chan, None)
                if sock is not None:
                    if version is not None:
                        self._send_all_to(sock, socks_reply(version, False if version == 4
                                                            else socks5_code(event.code)))
                    sock.close()
                self.notify(f"channel {event.chan}: open failed: "
                            f"{CODE_NAMES.get(event.code, event.code)}: {event.reason}")
            elif isinstance(event, ChannelFinished):
                self._blocked.discard(event.chan)
                sock = self._chan_socks.pop(event.chan, None)
                if sock is not None:
                    sock.close()
            elif isinstance(event, ListenRequested):
                self._listen_remote(event)
            elif isinstance(event, ListenAnswered):
                spec = self.remote_targets.get(event.listener)
                where = f"{spec.bind_host}:{spec.bind_port}" if spec else str(event.listener)
                if event.code != OPENED:
                    self.notify(f"remote port forwarding failed for listen port {where}: "
                                f"{event.reason}")
                elif spec is not None and spec.bind_port == 0:
                    self.notify(f"Allocated port {event.port} for remote forward to "
                                f"{spec.host}:{spec.port}")

    # -- accepting -----------------------------------------------------------------------

    def _accept(self, listener: socket.socket, now: float) -> None:
        try:
            sock, addr = listener.accept()
        except OSError:
            return  # gone before we took it (or out of descriptors: try again later)
        sock.setblocking(False)
        what, ref = self._listeners[listener]
        if what == "-D":
            self._negotiating[sock] = SocksParser()
            return
        if what == "-L":
            chan = self.mux.open(KIND_TCP, ref.host, ref.port, now)
        elif what == "agent":
            chan = self.mux.open(KIND_AGENT, "", 0, now)
        else:  # a -R listener (server)
            host, port = (addr[0], addr[1]) if isinstance(addr, tuple) else ("", 0)
            chan = self.mux.open(KIND_FORWARDED, host, port, now, ref=ref)
        self._chan_socks[chan] = sock

    def _negotiate(self, sock: socket.socket, now: float) -> None:
        parser = self._negotiating[sock]
        try:
            data = sock.recv(MAX_SOCKS_REQUEST)
            if not data:
                raise SocksError("closed during the SOCKS request")
            answer = parser.feed(data)
            if answer:
                sock.send(answer)  # tiny, on a fresh socket: it fits
        except (OSError, SocksError) as e:
            del self._negotiating[sock]
            if isinstance(e, SocksError) and e.reply:
                self._send_all_to(sock, e.reply)
            log.info("SOCKS connection refused: %s", e)
            sock.close()
            return
        if parser.target is not None:
            del self._negotiating[sock]
            host, port = parser.target
            chan = self.mux.open(KIND_TCP, host, port, now)
            self._chan_socks[chan] = sock
            self._socks_chans[chan] = parser.version
            if parser.leftover:
                self.mux.local_data(chan, parser.leftover, now)

    # -- connecting ----------------------------------------------------------------------

    def _start_connect(self, event: ChannelRequested) -> None:
        if event.kind == KIND_AGENT:
            target = self.agent_path
        elif event.kind == KIND_FORWARDED:
            spec = self.remote_targets[event.ref]
            target = (spec.host, spec.port)
        else:
            target = (event.host, event.port)
        threading.Thread(target=self._connect, args=(event.chan, target),
                         name=f"connect-{event.chan}", daemon=True).start()

    def _connect(self, chan: int, target) -> None:
        """(connect thread) Connect, then hand the socket to the loop."""
        try:
            if target is None:
                raise OSError("no agent (SSH_AUTH_SOCK is not set)")
            if isinstance(target, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(CONNECT_TIMEOUT_SECS)
                    sock.connect(target)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(target, timeout=CONNECT_TIMEOUT_SECS)
            result = sock
        except OSError as e:
            result = e.strerror or str(e)
        with self._lock:
            self._results.append((chan, result))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (a wake is pending) or closed (the session ended)

    def _connect_results(self, now: float) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while True:
            with self._lock:
                if not self._results:
                    return
                chan, result = self._results.popleft()
            if isinstance(result, str):
                self.mux.refuse(chan, CONNECT_FAILED, result)
                continue
            if chan not in self.mux.channels():  # closed meanwhile (a takeover)
                result.close()
                continue
            result.setblocking(False)
            self._chan_socks[chan] = result
            self.mux.accept(chan)

    def _listen_remote(self, event: ListenRequested) -> None:
        """Server: bind -R listener ``event.listener`` (loopback only, as sshd's
        GatewayPorts=no; never a privileged port for a user who could not bind it)."""
        if event.port and event.port < 1024 and not self.privileged_ports:
            self.mux.answer_listen(event.listener, PROHIBITED, event.port,
                                   f"port {event.port} is privileged")
            return
        try:
            sock = _listen_tcp("127.0.0.1", event.port)
        except OSError as e:
            self.mux.answer_listen(event.listener, CONNECT_FAILED, event.port,
                                   f"cannot listen on port {event.port}: {e.strerror or e}")
            return
        self._listeners[sock] = ("-R", event.listener)
        self.mux.answer_listen(event.listener, OPENED, sock.getsockname()[1])

    def remote_listeners(self) -> list:
        return [sock.getsockname()[1] for sock, (what, _) in self._listeners.items()
                if what == "-R"]

    def _drop_old_listeners(self) -> None:
        """-R listeners the mux no longer has (a takeover ended the old client's), and
        every listener once the session's shell has exited (its channels only drain)."""
        for sock, (what, listener) in list(self._listeners.items()):
            if not self.mux.accepting or (what == "-R" and listener not in self.mux.listeners):
                del self._listeners[sock]
                sock.close()

    # -- relaying ------------------------------------------------------------------------

    def _read(self, chan: int, sock: socket.socket, now: float) -> None:
        allowance = self.mux.read_allowance(chan)
        if not allowance:
            return
        try:
            data = sock.recv(min(allowance, READ_SIZE))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.mux.local_closed(chan, now)
            return
        if data:
            self.mux.local_data(chan, data, now)
        else:
            self.mux.local_eof(chan, now)

    def _write(self, chan: int, sock: socket.socket, now: float) -> None:
        mux = self.mux
        data = mux.output(chan)
        self._blocked.discard(chan)
        while data:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                self._blocked.add(chan)
                return
            except OSError:
                mux.local_closed(chan, now)
                return
            mux.output_written(chan, sent)
            data = mux.output(chan)
        if mux.should_shut_write(chan):
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the other end is gone: reading tells
            mux.write_shut(chan)

    def _send_all(self, chan: int, data: bytes) -> None:
        sock = self._chan_socks.get(chan)
        if sock is not None:
            self._send_all_to(sock, data)

    @staticmethod
    def _send_all_to(sock: socket.socket, data: bytes) -> None:
        """A short answer (SOCKS) on a fresh socket: its buffer takes it."""
        try:
            sock.send(data)
        except OSError:
            pass  # the reader is gone: reading tells


def _listen_tcp(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port`` (IPv4 or IPv6 by the address;
    a name is looked up)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(16)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class AgentSocketDir:
    """The forwarded agent's socket for one session (-A): a fresh 0700 directory holding a
    0600 socket, both owned by the session's user, whose path goes into the session's
    SSH_AUTH_SOCK.

    A root server creates both as root in a root-owned place (``mkdtemp`` in the system
    temp directory: mkdir fails on anything already there, the name is unguessable, and
    the sticky /tmp keeps others from replacing it), then hands them over: the socket
    first (the directory is still root's, so nobody can swap it), then the directory,
    through a descriptor opened with O_NOFOLLOW and checked with fstat.  Once the user
    owns the directory they may rename it and leave a symlink in its place, so ``close``
    removes both through descriptors taken at creation, never by path.
    """

    SOCKET_NAME = "agent.sock"

    def __init__(self, uid: int, gid: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="moshpit-agent-")
        self.path = os.path.join(self.dir, self.SOCKET_NAME)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._parent_fd = self._dir_fd = -1
        try:
            self._parent_fd = os.open(os.path.dirname(self.dir), os.O_RDONLY | os.O_DIRECTORY)
            self._dir_fd = os.open(os.path.basename(self.dir),
                                   os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                   dir_fd=self._parent_fd)
            info = os.fstat(self._dir_fd)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise OSError(errno.EPERM, f"{self.dir} is not the directory we made")
            old_umask = os.umask(0o177)
            try:
                self.sock.bind(self.path)
            finally:
                os.umask(old_umask)
            self.sock.listen(8)
            if os.geteuid() != uid:
                os.chown(self.SOCKET_NAME, uid, gid, dir_fd=self._dir_fd,
                         follow_symlinks=False)
                os.fchown(self._dir_fd, uid, gid)
            os.fchmod(self._dir_fd, 0o700)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Stop listening and remove the socket and its directory (through the
        descriptors: whatever the user put at those paths meanwhile is left alone)."""
        self.sock.close()
        if self._dir_fd >= 0:
            try:
                os.unlink(self.SOCKET_NAME, dir_fd=self._dir_fd)
            except OSError:
                pass  # already gone, or replaced by the user: theirs to clean
            os.close(self._dir_fd)
            self._dir_fd = -1
        if self._parent_fd >= 0:
            try:
                os.rmdir(os.path.basename(self.dir), dir_fd=self._parent_fd)
            except OSError:
                pass  # renamed (a symlink is not removed by rmdir), or not empty: left
            os.close(self._parent_fd)
            self._parent_fd = -1
