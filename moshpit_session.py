"""moshpit session: what a session is, as sans-IO cores between the transport and the programs.

The transport (moshpit_transport) carries numbered reliable byte streams and knows nothing
of terminals; the programs (mps.py, mp.py) own the PTY, the terminal, sockets, threads and
OS policy.  In between, this module says what a session *is*, as pure code driven by the
bytes, events and time the programs pass in (h11 style: feed inputs, then take
``datagrams_to_send(now)``, ``next_timeout()`` and ``next_event()``):

* ``ServerSession``: the shell's side.  Terminal input for the PTY, the PTY's output for
  the client (read only while ``may_read_pty()``: back-pressure), the exit status after the
  last output, shutdown, resume and the ending rules (see below).
* ``ClientSession``: the terminal's side.  Keystrokes (read only while
  ``may_read_input()``), output, resize, quit, the resume request and its result, and how
  long the server has been silent.

Both sit on one transport ``Connection`` with two streams:

* stream 0 (``STREAM_TERMINAL``): the terminal's bytes, input one way and output the
  other, addressed by offset so a resume continues exactly where the peer left off;
* stream 1 (``STREAM_RECORDS``): typed records, an urgent stream (served before any
  output, acked at once);
* stream 2 and up: a layer above attached with ``attach`` (moshpit_channels: forwarded
  ports and the agent) gets a stream of its own, carrying records too, served after the
  terminal and resent across re-keys as stream 1 is, and the record types it names.

Records (the one encoding for everything a session says that is not terminal bytes)::

    record = type:u8 | length:u32 | body          (body at most MAX_RECORD_BODY bytes)

    RESIZE   (1) client->server  rows:u16 cols:u16
    EXIT     (2) server->client  status:i32 output_offset:u64   reported once all output
                                 up to output_offset has been delivered
    SHUTDOWN (3) either way      reason: UTF-8, at most MAX_REASON_BYTES
    ECHO_ACK (4) server->client  input_offset:u64 output_offset:u64   every input byte up to
                 input_offset was written to the PTY at least ECHO_ACK_SECS before the
                 output up to output_offset was read, so that output holds their echo;
                 the client applies it once it has received output_offset bytes (records
                 overtake terminal bytes).  Local echo prediction judges its guesses then.
    TTY_MODE (5) server->client  flags:u8 (1 icanon, 2 echo) erase:u8   the PTY's termios,
                 sent when it changes (polled at input, while input is recent, and with
                 output at most every TTY_POLL_SECS): with echo off and
                 icanon on (passwords: read -s, sudo, ssh) nothing typed is predicted
    REPAINT  (6) server->client  screen: bytes that rebuild the session's screen on a fresh
                 terminal (moshpit_term's serialize), sent first after a takeover; it comes
                 before terminal byte 0 of the new connection
    INPUT_EOF (7) client->server  input_offset:u64   the client's input ends after
                                 input_offset bytes (a command's stdin at EOF: the server
                                 closes the command's input once it has written them all)
    STDERR   (8) server->client  offset:u64 data   a command's stderr (no PTY) from byte
                                 offset on: after a re-key a record may come again, and
                                 the client keeps only the bytes past what it has
    9-15         channels (moshpit_channels, protocol 4): open, result, data, window, EOF,
                 close, listen; handled by the attached channel layer

Version rule: a type number is never reused or redefined.  A receiver skips a record of a
type it does not know by its length, and reads a known record's fields from the start of
its body, ignoring any bytes after them: a later protocol version may append fields to a
body, never change the ones there.  A sender sends a type only if the peer's protocol
version (exchanged in the handshake, moshpit.PROTOCOL_VERSION) defines it.  A record longer
than MAX_RECORD_BODY is skipped too, without being buffered.

Records travel again after a resume: stream 1 (and an attached layer's stream) starts over
on both sides with each re-key, and records not yet acknowledged are written again whole,
so a record may arrive twice.
Each is idempotent or reported once (EXIT, SHUTDOWN); a repeated RESIZE is harmless.

Takeover (``mp --attach``): another client of the session's user takes the session over.
``ServerSession.take_over`` tells the old client (SHUTDOWN with the reason, under the old
keys), then starts a fresh Connection under the new client's keys: both terminal streams
start over at offset 0 and REPAINT goes first.  The model in mps has already consumed every
byte read from the PTY, so output the old client never got is in the repaint, and what the
shell writes after it is the new stream: nothing is lost or doubled.  The new
``ClientSession`` (``attaching=True``) holds terminal bytes that overtake the REPAINT (the
streams are ordered separately) until it arrives.

Ending rules (ServerSession): the session ends

* when the shell has exited and its output is read (PTY at EOF, or no output for
  PTY_DRAIN_SECS while the send window has room): EXIT is sent and the session ends once
  the client has acknowledged everything and the attached layer is no longer busy (its
  open forwarded connections drain and close first, as with ssh; it takes no new ones);
  a client that is away gets the last output and the status when it resumes, as long as a
  detached session would be kept;
* when the client quits (a SHUTDOWN record over UDP, or ``end_requested`` after a quit
  request over TCP): at once;
* when the server stops (``shutdown``): SHUTDOWN is sent, and the session ends once acked
  or after ``shutdown_flush_secs`` (SHUTDOWN_FLUSH_SECS by default);
* when the client has been silent for ``detached_timeout_secs`` (0: never) -- or, if it
  never sent a single UDP packet since the handshake, for the shorter
  ``unattached_timeout_secs`` (UDP blocked: the session would hold its slot for nothing).

The resume sequence, end to end (who does what, in order):

1. mp's session loop (ClientSession.silence(now) past RESUME_AFTER_SECS, then as
   ResumeSchedule says) hops to a new UDP port and asks ``ClientSession.resume_request()``
   for (session id, resume secret, terminal bytes received); a background thread runs the
   TCP handshake with them.
2. mps's listener thread runs the server handshake; the resume proof names the session,
   and mps's handshake thread posts the new keys and the client's offset to the session's
   thread, which calls ``ServerSession.resume(keys, peer_recv_offset, now)``: the
   Connection re-keys, stream 0 resends from that offset, stream 1 starts over with the
   unacknowledged records; it returns what the server has received, for the handshake's
   reply.
3. Back in mp's loop, the handshake thread's result is applied by
   ``ClientSession.resumed(...)``: the same re-key on the client's side, the terminal size
   sent again, the new resume secret kept for the next time.
4. The client's first packets under the new keys reach the server; if they come from a
   new address, the transport validates it before moving output there.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from typing import NamedTuple, Optional

import moshpit
from moshpit_transport import FIRST_STREAM, Connection, DataReceived, PeerAddressChanged

__all__ = [
    "STREAM_TERMINAL", "STREAM_RECORDS", "RECORD_RESIZE", "RECORD_EXIT", "RECORD_SHUTDOWN",
    "RECORD_REPAINT", "RECORD_ECHO_ACK", "RECORD_TTY_MODE", "ECHO_ACK_SECS", "TtyMode",
    "EchoAcked", "TtyModeChanged",
    "RECORD_INPUT_EOF", "InputEnded", "RECORD_STDERR", "ErrorOutputReceived",
    "MAX_STDERR_CHUNK",
    "MAX_RECORD_BODY", "MAX_REASON_BYTES", "PTY_DRAIN_SECS", "SHUTDOWN_FLUSH_SECS",
    "RESUME_AFTER_SECS", "FIRST_BACKOFF_SECS", "ResumeSchedule",
    "encode_record", "RecordDecoder", "RecordLane",
    "InputReceived", "ResizeRequested", "ClientAddressChanged", "OutputReceived",
    "SessionExited", "ShutdownReceived", "RepaintReceived",
    "ServerSession", "ClientSession",
]

log = logging.getLogger("moshpit.session")

STREAM_TERMINAL = FIRST_STREAM
STREAM_RECORDS = 1
RECORD_WINDOW = 64 * 1024  # records unacked before the lane counts as full (never refused)

RECORD_HEADER = struct.Struct("!BI")
RECORD_RESIZE, RECORD_EXIT, RECORD_SHUTDOWN = 1, 2, 3
RECORD_ECHO_ACK, RECORD_TTY_MODE = 4, 5
RECORD_REPAINT = 6
RECORD_INPUT_EOF = 7
RECORD_STDERR = 8
INPUT_EOF_BODY = STDERR_OFFSET = struct.Struct("!Q")
MAX_STDERR_CHUNK = 16 * 1024  # stderr bytes per record (the record lane's window is 64 KiB)
RESIZE_BODY = struct.Struct("!HH")
ECHO_ACK_BODY = struct.Struct("!QQ")
TTY_MODE_BODY = struct.Struct("!BB")
TTY_ICANON, TTY_ECHO = 1, 2
MAX_PENDING_ACKS = 64  # echo acks waiting for their output (older ones are dropped)
MAX_UNACKED_WRITES = 256  # server: input writes awaiting their echo ack (later ones merge)
EXIT_BODY = struct.Struct("!iQ")
MAX_RECORD_BODY = 256 * 1024  # larger records are skipped unread (a repaint fits easily)
MAX_REASON_BYTES = 255

# client: UDP silence before a port hop + resume handshake (the resume_after_secs setting)
RESUME_AFTER_SECS = float(moshpit.DEFAULT_RESUME_AFTER_SECS)
FIRST_BACKOFF_SECS = 2.0  # then between attempts, doubling up to the configured maximum
PTY_DRAIN_SECS = 1.0  # after the shell exits: how long to wait for the rest of its output
# server stopping: time to tell the client before hanging up (the shutdown_flush_secs setting)
SHUTDOWN_FLUSH_SECS = float(moshpit.DEFAULT_SHUTDOWN_FLUSH_SECS)
# Echo ack (mosh's ECHO_TIMEOUT): input written this long ago has had its echo read.
ECHO_ACK_SECS = 0.05
# The PTY's termios is polled at each input write, every TTY_POLL_SECS while input is this
# recent (a mode changes in answer to a key: Enter starts sudo), and with output at most
# every TTY_POLL_SECS (a password prompt printed long after the last key).
TTY_POLL_WINDOW_SECS = 3.0
TTY_POLL_SECS = 0.1


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


def encode_record(record_type: int, body: bytes) -> bytes:
    """One record: ``type | length | body``."""
    if len(body) > MAX_RECORD_BODY:
        raise ValueError(f"record body of {len(body)} bytes exceeds {MAX_RECORD_BODY}")
    return RECORD_HEADER.pack(record_type, len(body)) + body


def _reason_body(reason: str) -> bytes:
    """A SHUTDOWN body: ``reason`` in UTF-8, cut to MAX_REASON_BYTES on a character boundary."""
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


class RecordDecoder:
    """Whole records out of a byte stream that arrives in pieces, in bounded memory: at most
    one record's header and body are held; an oversized body is skipped as it streams by."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized body still to pass over

    def feed(self, data: bytes) -> list:
        """``(type, body)`` of every record completed by ``data``, in order."""
        if self._skip:
            passed = min(self._skip, len(data))
            self._skip -= passed
            data = data[passed:]
        buf = self._buf
        buf += data
        found, pos = [], 0
        while len(buf) - pos >= RECORD_HEADER.size:
            record_type, length = RECORD_HEADER.unpack_from(buf, pos)
            start = pos + RECORD_HEADER.size
            if length > MAX_RECORD_BODY:
                log.warning("record of type %d with %d bytes skipped (limit %d)",
                            record_type, length, MAX_RECORD_BODY)
                available = len(buf) - start
                if available >= length:
                    pos = start + length
                    continue
                self._skip, pos = length - available, len(buf)
                break
            if start + length > len(buf):
                break
            found.append((record_type, bytes(buf[start:start + length])))
            pos = start + length
        del buf[:pos]
        return found

    def reset(self) -> None:
        """The stream starts over (after a re-key)."""
        self._buf.clear()
        self._skip = 0


class RecordLane:
    """Typed records on one stream of a Connection (the urgent stream 1 by default),
    resent whole after a re-key.

    Sending: ``send(type, body)``.  Receiving: ``feed(data)`` with the stream's bytes.
    Around ``Connection.rekey`` (the stream starts over on both sides), ``unacked()`` taken
    before it and ``restart(...)`` after it write again the records the peer had not
    acknowledged.
    """

    def __init__(self, conn: Connection, stream_id: int = STREAM_RECORDS,
                 window: int = RECORD_WINDOW, urgent: bool = True) -> None:
        self.conn = conn
        self.stream_id = stream_id
        conn.open_stream(stream_id, window, urgent=urgent)
        self._unacked: deque = deque()  # (end offset, record) not known to have arrived
        self._decoder = RecordDecoder()

    def send(self, record_type: int, body: bytes) -> None:
        record = encode_record(record_type, body)
        self.conn.send(record, self.stream_id)
        self._unacked.append((self.conn.send_offset(self.stream_id), record))
        acked = self.conn.acked_offset(self.stream_id)
        while self._unacked and self._unacked[0][0] <= acked:  # bounded by the window
            self._unacked.popleft()

    def feed(self, data: bytes) -> list:
        return self._decoder.feed(data)

    def idle(self) -> bool:
        """Every record sent has been acknowledged."""
        return self.conn.unacked_bytes(self.stream_id) == 0

    def writable(self) -> bool:
        """Room in the stream's window (records sent beyond it are queued, never refused)."""
        return self.conn.writable(self.stream_id)

    def unacked(self) -> list:
        """The records the peer has not acknowledged (take them before a re-key)."""
        acked = self.conn.acked_offset(self.stream_id)
        return [record for end, record in self._unacked if end > acked]

    def restart(self, pending: list) -> None:
        """The stream started over (a re-key): write ``pending`` (from ``unacked``) again."""
        self._unacked.clear()
        self._decoder.reset()
        for record in pending:
            self.conn.send(record, self.stream_id)
            self._unacked.append((self.conn.send_offset(self.stream_id), record))


# ---------------------------------------------------------------------------
# Events for the programs
# ---------------------------------------------------------------------------


class InputReceived(NamedTuple):
    """Server: the client's keystrokes, for the PTY."""

    data: bytes


class InputEnded(NamedTuple):
    """Server: the client's input is over (every byte of it came in InputReceived before)."""


class ResizeRequested(NamedTuple):
    """Server: the client's terminal size changed."""

    rows: int
    cols: int


class ClientAddressChanged(NamedTuple):
    """Server: the client's packets come from ``addr`` (``first``: its first contact)."""

    addr: tuple
    first: bool


class OutputReceived(NamedTuple):
    """Client: the remote terminal's output, for stdout."""

    data: bytes


class ErrorOutputReceived(NamedTuple):
    """Client: the command's stderr (no PTY), for our stderr."""

    data: bytes


class SessionExited(NamedTuple):
    """Client: the shell exited with ``exit_status``; all its output came before this."""

    exit_status: int


class ShutdownReceived(NamedTuple):
    """Either side: the peer ends the session for ``reason`` (client quit, server stopping)."""

    reason: str


class RepaintReceived(NamedTuple):
    """Client: the session's screen after a takeover, for a fresh terminal (before any
    OutputReceived of this connection)."""

    screen: bytes


class TtyMode(NamedTuple):
    """The PTY's input modes that decide local echo: canonical mode, echo, erase character
    (VERASE, 0: none)."""

    icanon: bool
    echo: bool
    erase: int

    def encode(self) -> bytes:
        return TTY_MODE_BODY.pack(TTY_ICANON * self.icanon | TTY_ECHO * self.echo, self.erase)

    @classmethod
    def decode(cls, body: bytes) -> TtyMode:
        flags, erase = TTY_MODE_BODY.unpack_from(body)
        return cls(bool(flags & TTY_ICANON), bool(flags & TTY_ECHO), erase)


class EchoAcked(NamedTuple):
    """Client: the output received so far holds the echo of every input byte up to
    ``input_offset`` (the server wrote them to the PTY ECHO_ACK_SECS before reading it)."""

    input_offset: int


class TtyModeChanged(NamedTuple):
    """Client: the PTY's input modes changed (applied at once: hiding input early is the
    safe side)."""

    mode: TtyMode


class _Core:
    """What both cores share: the Connection, the record lane, the event queue."""

    def __init__(self, role: str, keys: object, now: float, peer_addr: object = None) -> None:
        self.conn = Connection(role, keys, now, peer_addr)
        self.records = RecordLane(self.conn)
        self._events: deque = deque()
        self._shutdown_reported = False
        self._extensions: list = []  # layers above with records and a stream of their own
        self._lanes: dict = {STREAM_RECORDS: self.records}  # stream id -> RecordLane
        self._routes: dict = {}  # record type -> the extension that handles it

    def attach(self, extension: object) -> RecordLane:
        """Let a layer above (moshpit_channels) speak through this session: records of the
        types in ``extension.RECORD_TYPES`` on stream 1 go to ``extension.on_record(type,
        body, now)``, as do the records of its own stream ``extension.STREAM_ID`` (window
        ``extension.STREAM_WINDOW``, served after the terminal), which is resent across
        re-keys like the record lane.  Returns that stream's lane; after a takeover (a
        fresh Connection) ``extension.on_new_connection(lane, now)`` gets the new one.
        ``extension.on_session_exit(now)`` is called once the shell's exit is sent (server)
        or reported (client): no new work from then on; while ``extension.busy()`` the
        server keeps the exited session (ssh waits for forwarded connections to close)."""
        self._extensions.append(extension)
        for record_type in extension.RECORD_TYPES:
            self._routes[record_type] = extension
        return self._open_lane(extension)

    def _open_lane(self, extension: object) -> RecordLane:
        lane = RecordLane(self.conn, extension.STREAM_ID, extension.STREAM_WINDOW, urgent=False)
        self._lanes[extension.STREAM_ID] = lane
        return lane

    def _rekey(self, keys: object, peer_recv_offset: int, now: float,
               peer_addr: object = None) -> None:
        """Continue under new keys: stream 0 from ``peer_recv_offset``, every lane with the
        records its peer had not acknowledged."""
        pending = [(lane, lane.unacked()) for lane in self._lanes.values()]
        self.conn.rekey(keys, peer_recv_offset, now, peer_addr)
        for lane, records in pending:
            lane.restart(records)

    def _new_connection(self, keys: object, now: float) -> None:
        """Start over on a fresh Connection (a takeover): new lanes, extensions told."""
        ceiling = self.conn.size_ceiling  # what the link's socket allows stays true
        self.conn = Connection(self.conn.role, keys, now)
        self.conn.allow_larger_datagrams(ceiling)
        self.records = RecordLane(self.conn)
        self._lanes = {STREAM_RECORDS: self.records}
        for extension in self._extensions:
            extension.on_new_connection(self._open_lane(extension), now)

    # The three calls a carrier (UdpLink) makes, as on a bare Connection.

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        self.conn.receive_datagram(data, addr, now)
        self._take_transport_events(now)

    def datagrams_to_send(self, now: float) -> list:
        return self.conn.datagrams_to_send(now)

    def next_timeout(self) -> Optional[float]:
        return self.conn.next_timeout()

    def next_event(self) -> object:
        """The oldest event for the program, or None."""
        return self._events.popleft() if self._events else None

    def all_acked(self) -> bool:
        """Everything sent, terminal bytes and records, has been acknowledged."""
        return self.conn.all_acked()

    @property
    def recv_offset(self) -> int:
        """Terminal bytes received from the peer (what a resume handshake reports)."""
        return self.conn.recv_offset(STREAM_TERMINAL)

    def _take_transport_events(self, now: float) -> None:
        while True:
            event = self.conn.next_event()
            if event is None:
                return
            if isinstance(event, DataReceived):
                if event.stream_id == STREAM_TERMINAL:
                    self._on_terminal(event.data, now)
                else:
                    for record_type, body in self._lanes[event.stream_id].feed(event.data):
                        extension = self._routes.get(record_type)
                        if extension is not None:
                            extension.on_record(record_type, body, now)
                        else:
                            self._on_record(record_type, body, now)
            elif isinstance(event, PeerAddressChanged):
                self._on_address(event.addr)

    def _on_shutdown_record(self, body: bytes) -> None:
        if not self._shutdown_reported:  # may arrive twice across a resume
            self._shutdown_reported = True
            self._events.append(ShutdownReceived(body.decode("utf-8", "replace")))

    def _on_terminal(self, data: bytes, now: float) -> None:
        raise NotImplementedError

    def _on_record(self, record_type: int, body: bytes, now: float) -> None:
        raise NotImplementedError

    def _on_address(self, addr: tuple) -> None:
        """The transport moved replies to ``addr`` (nothing to do by default)."""


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


class _EchoClock:
    """The server's bookkeeping for local echo prediction: when each input write reached
    the PTY (for ECHO_ACK, mosh's echo_ack) and when to poll the PTY's termios next (for
    TTY_MODE; only while input is recent, so an idle session costs nothing)."""

    def __init__(self) -> None:
        self._written = 0  # input bytes taken by the PTY on this connection
        self._writes: deque = deque()  # (input offset, time) of writes not acked yet
        self._sent_mode: Optional[TtyMode] = None  # None: not polling (no PTY) / resend
        self._watching = False
        self._last_input: Optional[float] = None
        self._last_poll = float("-inf")
        self.poll_time: Optional[float] = None

    def written(self, count: int, now: float) -> None:
        if count > 0:
            self._written += count
            if len(self._writes) >= MAX_UNACKED_WRITES:  # the PTY is not being read:
                self._writes.pop()  # merged into this write (a later time only delays)
            self._writes.append((self._written, now))
            self._last_input = now
            if self._watching:
                self.poll_time = now  # the key may have changed the mode: look at once

    def output(self, now: float) -> None:
        """The PTY wrote something (a prompt?): look at its mode, at most every
        TTY_POLL_SECS."""
        if self._watching and self.poll_time is None:
            self.poll_time = max(now, self._last_poll + TTY_POLL_SECS)

    def ack_time(self) -> Optional[float]:
        return self._writes[0][1] + ECHO_ACK_SECS if self._writes else None

    def ack_due(self, now: float) -> Optional[int]:
        """The newest input offset written at least ECHO_ACK_SECS ago, if not acked yet."""
        acked = None
        while self._writes and self._writes[0][1] + ECHO_ACK_SECS <= now:
            acked = self._writes.popleft()[0]
        return acked

    def poll_due(self, now: float) -> bool:
        return self.poll_time is not None and now >= self.poll_time

    def polled(self, mode: Optional[TtyMode], now: float) -> bool:
        """Note a poll's result; True if it changed (to be sent)."""
        self._watching = mode is not None
        self._last_poll = now
        if mode is None:
            self.poll_time = None
            return False
        recent = self._last_input is not None and now - self._last_input < TTY_POLL_WINDOW_SECS
        self.poll_time = now + TTY_POLL_SECS if recent else None
        changed, self._sent_mode = mode != self._sent_mode, mode
        return changed

    def restart(self, now: float) -> None:
        """A new connection (takeover): offsets from 0, the mode sent again."""
        self._written = 0
        self._writes.clear()
        self._sent_mode = None
        if self._watching:
            self.poll_time = now


class ServerSession(_Core):
    """The server's session core: one shell's terminal, its client, and when it all ends.

    Called by the session's thread in mps only.  The program reads the PTY while
    ``may_read_pty()`` and hands what it read to ``pty_output``, writes ``InputReceived``
    data to the PTY, reports ``pty_closed`` / ``shell_exited``, and stops once
    ``finished(now)``; ``ending`` then says why.
    """

    def __init__(self, keys: object, now: float, detached_timeout_secs: float = 0,
                 unattached_timeout_secs: float = 0,
                 shutdown_flush_secs: float = SHUTDOWN_FLUSH_SECS) -> None:
        super().__init__("server", keys, now)
        self.detached_timeout_secs = detached_timeout_secs or None
        self.unattached_timeout_secs = unattached_timeout_secs or None
        self.shutdown_flush_secs = shutdown_flush_secs
        self.client_addr: Optional[tuple] = None  # None: no UDP packet from the client yet
        self.ending: Optional[str] = None  # why the session is ending, once it is
        self._end_by: Optional[float] = None  # None: live on as a detached session would
        self._pty_eof = False
        self._exit_status: Optional[int] = None
        self._input_end: Optional[int] = None  # input offset of the client's EOF, once sent
        self._stderr_eof = True  # until expect_stderr(): a PTY has no separate stderr
        self._stderr_sent = 0
        self._input_end_reported = False
        self._drain_until = now
        self._awaiting_extensions = False  # exited: wait for the attached layers to finish
        self._echo = _EchoClock()

    # -- the program's inputs ------------------------------------------------------------

    def pty_output(self, data: bytes, now: float) -> None:
        """Bytes the shell wrote (read from the PTY master): to the client."""
        if data:
            self.conn.send(data, STREAM_TERMINAL)
            self._drain_until = now + PTY_DRAIN_SECS
            self._echo.output(now)

    def input_written(self, count: int, now: float) -> None:
        """The PTY took ``count`` more bytes of the client's input (for the echo ack and
        the tty mode poll)."""
        self._echo.written(count, now)

    def tty_poll_due(self, now: float) -> bool:
        """Poll the PTY's termios now (and pass it to ``tty_mode``)?"""
        return self._echo.poll_due(now)

    def tty_mode(self, mode: Optional[TtyMode], now: float) -> None:
        """The PTY's termios as just polled (the first call starts the polling; None: no
        PTY or it is gone, which stops it): sent to the client when it changed."""
        if self._echo.polled(mode, now):
            self.records.send(RECORD_TTY_MODE, mode.encode())

    def pty_closed(self, now: float) -> None:
        """The PTY master reads EOF: no more output will come."""
        self._pty_eof = True
        self._check_exit(now)

    def expect_stderr(self) -> None:
        """The command has a stderr of its own (no PTY): EXIT waits for its end too."""
        self._stderr_eof = False

    def may_read_stderr(self) -> bool:
        """Read the command's stderr now? Only while the record lane has room."""
        return (not self._stderr_eof and not self.ending
                and self.conn.writable(STREAM_RECORDS))

    def stderr_output(self, data: bytes, now: float) -> None:
        """Bytes the command wrote to stderr (at most MAX_STDERR_CHUNK): to the client."""
        for start in range(0, len(data), MAX_STDERR_CHUNK):
            chunk = data[start:start + MAX_STDERR_CHUNK]
            self.records.send(RECORD_STDERR, STDERR_OFFSET.pack(self._stderr_sent) + chunk)
            self._stderr_sent += len(chunk)
        if data:
            self._drain_until = now + PTY_DRAIN_SECS

    def stderr_closed(self, now: float) -> None:
        """The command's stderr reads EOF."""
        self._stderr_eof = True
        self._check_exit(now)

    def shell_exited(self, status: int, now: float) -> None:
        """The shell was reaped with ``status``; EXIT follows the rest of its output."""
        if self._exit_status is None:
            self._exit_status = status
            self._drain_until = now + PTY_DRAIN_SECS
        self._check_exit(now)

    def resume(self, keys: object, peer_recv_offset: int, now: float) -> int:
        """A resume handshake re-attached the client: continue under ``keys`` from
        ``peer_recv_offset``. Returns the terminal bytes we have received (for the reply)."""
        self._rekey(keys, peer_recv_offset, now)
        return self.recv_offset

    def take_over(self, keys: object, screen: bytes, reason: str, now: float) -> list:
        """Another client takes the session over (``mp --attach``): tell the current one
        why, then continue on a fresh Connection under ``keys`` whose first record is
        REPAINT(``screen``). Returns the old client's last datagrams (the program sends
        them: they go under the old keys, which end here)."""
        goodbye = []
        if self.client_addr is not None:
            self.records.send(RECORD_SHUTDOWN, _reason_body(reason))
            goodbye = self.conn.datagrams_to_send(now)
        self._new_connection(keys, now)
        self.client_addr = None
        self._shutdown_reported = False
        self.records.send(RECORD_REPAINT, screen)
        self._echo.restart(now)  # input offsets start over; the mode goes again
        return goodbye

    def end_requested(self, now: float) -> int:
        """The client's owner quit and said so over TCP: end now. Returns recv_offset."""
        self._end("by the client's quit request", now, 0.0)
        return self.recv_offset

    def shutdown(self, reason: str, now: float) -> None:
        """The server stops: tell the client, end once it acknowledged or soon after."""
        self.records.send(RECORD_SHUTDOWN, _reason_body(reason))
        self._end(reason, now, self.shutdown_flush_secs)

    # -- the program's questions ---------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list:
        self._check_exit(now)  # the drain deadline is one of the timers next_timeout names
        # The program calls this after reading the PTY: what it read holds the echo of
        # input written ECHO_ACK_SECS ago -- unless back-pressure stopped the reading.
        # (Input waiting to be acked is asked about first: a flood has none, and this runs
        # at every loop pass.)
        if self._echo.ack_time() is not None and self.may_read_pty():
            acked = self._echo.ack_due(now)
            if acked is not None:
                self.records.send(RECORD_ECHO_ACK, ECHO_ACK_BODY.pack(
                    acked, self.conn.send_offset(STREAM_TERMINAL)))
        return self.conn.datagrams_to_send(now)

    def may_read_pty(self) -> bool:
        """Read the PTY now? Only while the output window has room (a flood cannot build a
        backlog, DESIGN 6) and the session is not ending."""
        return self.pty_room() > 0

    def pty_room(self) -> float:
        """Bytes of PTY output to read before ``may_read_pty`` turns False (<= 0: none yet):
        the program may read until it has that much, then hand it over in one call."""
        if self._pty_eof or self.ending:
            return 0
        return self.conn.send_room(STREAM_TERMINAL)

    def next_timeout(self) -> Optional[float]:
        times = [self.conn.next_timeout(), self._deadline(), self._echo.poll_time]
        # The drain deadline counts only while the window has room (as in _check_exit):
        # with it full (a client away) it would be a deadline in the past, a busy loop;
        # the ack that opens the window is the event that brings the EXIT.
        if (self._exit_status is not None and not self.ending
                and self.conn.writable(STREAM_TERMINAL)):
            times.append(self._drain_until)
        ack_time = self._echo.ack_time()
        if ack_time is not None and self.may_read_pty():
            times.append(ack_time)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def finished(self, now: float) -> bool:
        """Is the session over? (``ending`` says why.)"""
        self._check_exit(now)
        deadline = self._deadline()
        if self.ending is None:
            if deadline is not None and now >= deadline:
                self.ending = self._silence_reason()
                return True
            return False
        if deadline is not None and now >= deadline:
            return True
        return self.conn.all_acked() and not (
            self._awaiting_extensions and any(ext.busy() for ext in self._extensions))

    # -- rules ----------------------------------------------------------------------------

    def _check_exit(self, now: float) -> None:
        """Once the shell has exited and its output is read, send EXIT after that output."""
        if self._exit_status is None or self.ending:
            return
        # Output still in the PTY goes first; a background job holding the terminal open
        # only delays the end by PTY_DRAIN_SECS of silence.
        if ((self._pty_eof and self._stderr_eof)
                or (self.conn.writable(STREAM_TERMINAL) and now >= self._drain_until)):
            self.records.send(RECORD_EXIT, EXIT_BODY.pack(
                self._exit_status, self.conn.send_offset(STREAM_TERMINAL)))
            # Resent until acknowledged: a client that is away (outage, laptop asleep) gets
            # the last output and the exit status when it resumes, as long as a detached
            # session would have been kept for it.
            self._end(f"shell exited with status {self._exit_status}", now, None)
            self._awaiting_extensions = True
            for extension in self._extensions:
                extension.on_session_exit(now)

    def _end(self, why: str, now: float, linger: Optional[float]) -> None:
        """Start ending: done once everything sent is acknowledged, or after ``linger``
        seconds (None: when a detached session would expire)."""
        self.ending = why
        self._end_by = None if linger is None else now + linger
        self._awaiting_extensions = False  # a quit or a shutdown ends the channels too

    def _unattached_limit(self) -> bool:
        """Whether the shorter unattached timeout applies (no UDP packet from the client
        yet) rather than the detached one."""
        detached, unattached = self.detached_timeout_secs, self.unattached_timeout_secs
        return bool(self.client_addr is None and unattached
                    and (detached is None or unattached < detached))

    def _silence_limit(self) -> Optional[float]:
        """Seconds the client may stay unheard (None: forever)."""
        if self._unattached_limit():
            return self.unattached_timeout_secs
        return self.detached_timeout_secs

    def _silence_reason(self) -> str:
        """Why the session ends once the client was unheard for ``_silence_limit`` (only
        then formatted: the limit is asked for at every loop pass)."""
        if self._unattached_limit():
            return (f"never attached: no UDP packet from the client within"
                    f" {self.unattached_timeout_secs} s of the handshake (UDP blocked?)")
        return f"detached for more than {self.detached_timeout_secs} s"

    def _deadline(self) -> Optional[float]:
        """When the session ends if nothing else happens (None: never)."""
        if self._end_by is not None:
            return self._end_by
        limit = self._silence_limit()
        # last_heard: the latest authentic packet, or the latest handshake (start, resume).
        return self.conn.last_heard + limit if limit else None

    # -- from the transport --------------------------------------------------------------

    def _on_terminal(self, data: bytes, now: float) -> None:
        if not self.ending:
            self._events.append(InputReceived(data))

    def _take_transport_events(self, now: float) -> None:
        super()._take_transport_events(now)
        # Only now: the transport's offset counts every byte it has queued for us, and
        # input queued behind the EOF record has just become InputReceived events.
        self._report_input_end()

    def _on_record(self, record_type: int, body: bytes, now: float) -> None:
        if record_type == RECORD_RESIZE and len(body) >= RESIZE_BODY.size:
            self._events.append(ResizeRequested(*RESIZE_BODY.unpack_from(body)))
        elif record_type == RECORD_INPUT_EOF and len(body) >= INPUT_EOF_BODY.size:
            self._input_end = INPUT_EOF_BODY.unpack_from(body)[0]
        elif record_type == RECORD_SHUTDOWN:
            if not self._shutdown_reported:
                self._end(f"client: {body.decode('utf-8', 'replace')}", now, 0.0)
            self._on_shutdown_record(body)
        # Other types: skipped (see the version rule).

    def _report_input_end(self) -> None:
        """InputEnded once, after the last input byte (records overtake terminal bytes)."""
        if (self._input_end is not None and not self._input_end_reported
                and self.recv_offset >= self._input_end and not self.ending):
            self._input_end_reported = True
            self._events.append(InputEnded())

    def _on_address(self, addr: tuple) -> None:
        first = self.client_addr is None
        self.client_addr = addr
        self._events.append(ClientAddressChanged(addr, first))


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


class ClientSession(_Core):
    """The client's session core: keystrokes up, output down, and the resume bookkeeping.

    Called by mp's session loop only (a resume handshake runs in another thread, with the
    values ``resume_request()`` returned; its result comes back through ``resumed``).
    ``last_contact`` is when the latest authentic UDP packet arrived: unlike the
    transport's ``last_heard`` a resume handshake does not count, because the banner and
    the resume schedule are about UDP getting through.
    """

    def __init__(self, keys: object, now: float, server_addr: tuple, session_id: bytes,
                 resume_secret: bytes, winsize: tuple, attaching: bool = False) -> None:
        super().__init__("client", keys, now, server_addr)
        # A takeover: terminal bytes wait for the REPAINT they follow (bounded by the
        # stream's receive window).
        self._held: Optional[list] = [] if attaching else None
        self.session_id = session_id
        self.resume_secret = resume_secret
        self.last_contact = now
        self.udp_heard = False  # any UDP packet from the server yet (else: UDP blocked?)
        self._winsize = tuple(winsize)
        self._resize_due = False  # a size to send once the records in flight are acked
        self._exit: Optional[tuple] = None  # (status, output offset) awaiting the output
        self._stderr_received = 0  # bytes of the command's stderr reported
        self._exit_reported = False
        self._acks: deque = deque()  # (input offset, output offset): echo acks to apply
        self._echo_acked = 0

    # -- the program's inputs ------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        before = self.conn.last_heard
        super().receive_datagram(data, addr, now)
        if self.conn.last_heard != before:
            self.last_contact = self.conn.last_heard
            self.udp_heard = True
            self._send_resize()  # an ack may have emptied the record lane

    def send_input(self, data: bytes) -> None:
        """Keystrokes (after the escape filter): to the shell, exactly once."""
        self.conn.send(data, STREAM_TERMINAL)

    @property
    def input_offset(self) -> int:
        """Terminal bytes sent so far: the offset an echo ack names once the last key's
        echo is in the output."""
        return self.conn.send_offset(STREAM_TERMINAL)

    def resize(self, rows: int, cols: int) -> None:
        """The terminal's size: sent unless unchanged; sizes set while a record is in flight
        coalesce into the latest."""
        if (rows, cols) != self._winsize:
            self._winsize = (rows, cols)
            self._resize_due = True
            self._send_resize()

    def end_input(self) -> None:
        """Our stdin reached EOF: the command's input ends after what was sent so far."""
        self.records.send(RECORD_INPUT_EOF,
                          INPUT_EOF_BODY.pack(self.conn.send_offset(STREAM_TERMINAL)))

    def quit(self, reason: str) -> None:
        """Tell the server the session is over (it hangs up the shell)."""
        self.records.send(RECORD_SHUTDOWN, _reason_body(reason))

    def resume_request(self) -> tuple:
        """``(session id, resume secret, terminal bytes received)`` for a resume handshake."""
        return self.session_id, self.resume_secret, self.recv_offset

    def resumed(self, keys: object, peer_recv_offset: int, resume_secret: bytes,
                server_addr: tuple, now: float) -> None:
        """A resume handshake succeeded: continue under ``keys``, resending our input from
        ``peer_recv_offset``; the size goes again (it may have changed meanwhile)."""
        self.resume_secret = resume_secret
        self._rekey(keys, peer_recv_offset, now, server_addr)
        self._resize_due = True
        self._send_resize()

    # -- the program's questions ---------------------------------------------------------

    def may_read_input(self) -> bool:
        """Read stdin now? Only while the input window has room."""
        return self.conn.writable(STREAM_TERMINAL)

    @property
    def winsize(self) -> tuple:
        return self._winsize

    def silence(self, now: float) -> float:
        """Seconds since the latest authentic UDP packet."""
        return now - self.last_contact

    def all_acked(self) -> bool:
        return not self._resize_due and self.conn.all_acked()

    def _send_resize(self) -> None:
        """The size, once no record is in flight (so sizes set during an outage or a slow
        acknowledgement coalesce into one)."""
        if self._resize_due and self.records.idle():
            self.records.send(RECORD_RESIZE, RESIZE_BODY.pack(*self._winsize))
            self._resize_due = False

    # -- from the transport --------------------------------------------------------------

    def _on_terminal(self, data: bytes, now: float) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        self._events.append(OutputReceived(data))
        self._report_exit(now)
        self._release_acks()

    def _on_record(self, record_type: int, body: bytes, now: float) -> None:
        if record_type == RECORD_REPAINT:
            if self._held is not None:  # else: a copy resent after a resume
                self._events.append(RepaintReceived(body))
                self._events.extend(OutputReceived(data) for data in self._held)
                self._held = None
                self._report_exit(now)
                self._release_acks()
        elif record_type == RECORD_ECHO_ACK and len(body) >= ECHO_ACK_BODY.size:
            input_offset, output_offset = ECHO_ACK_BODY.unpack_from(body)
            newest = self._acks[-1][0] if self._acks else self._echo_acked
            if input_offset > newest:  # else: a copy resent after a resume
                if len(self._acks) >= MAX_PENDING_ACKS:
                    self._acks.popleft()
                self._acks.append((input_offset, output_offset))
                self._release_acks()
        elif record_type == RECORD_TTY_MODE and len(body) >= TTY_MODE_BODY.size:
            self._events.append(TtyModeChanged(TtyMode.decode(body)))
        elif record_type == RECORD_EXIT and len(body) >= EXIT_BODY.size:
            self._exit = EXIT_BODY.unpack_from(body)
            self._report_exit(now)
        elif record_type == RECORD_STDERR and len(body) >= STDERR_OFFSET.size:
            offset = STDERR_OFFSET.unpack_from(body)[0]
            new = body[STDERR_OFFSET.size + max(0, self._stderr_received - offset):]
            if new and offset <= self._stderr_received:  # records come in order, maybe again
                self._stderr_received += len(new)
                self._events.append(ErrorOutputReceived(new))
        elif record_type == RECORD_SHUTDOWN:
            self._on_shutdown_record(body)

    def _release_acks(self) -> None:
        """EchoAcked for the newest ack whose output has all been received (and reported:
        bytes held for a repaint do not count yet)."""
        if self._held is not None:
            return
        newest = None
        while self._acks and self._acks[0][1] <= self.recv_offset:
            newest = self._acks.popleft()[0]
        if newest is not None:
            self._echo_acked = newest
            self._events.append(EchoAcked(newest))

    def _report_exit(self, now: float) -> None:
        if self._exit is None or self._exit_reported or self._held is not None:
            return
        status, output_offset = self._exit
        if self.recv_offset >= output_offset:
            self._exit_reported = True
            self._events.append(SessionExited(status))
            for extension in self._extensions:
                extension.on_session_exit(now)


class ResumeSchedule:
    """When the client tries a resume handshake: the first attempt once the server has been
    silent (no UDP) for ``resume_after_secs`` (the setting of that name, RESUME_AFTER_SECS by
    default; mp passes less where the resume may move the session to the TCP carrier), then
    FIRST_BACKOFF_SECS after each failed or fruitless attempt, doubling up to
    ``max_backoff_secs``; one attempt at a time; contact coming back starts the schedule
    over. mp runs the attempts (a thread each)."""

    def __init__(self, max_backoff_secs: float,
                 resume_after_secs: float = RESUME_AFTER_SECS) -> None:
        self.max_backoff = max_backoff_secs
        self.resume_after = resume_after_secs
        self.backoff = FIRST_BACKOFF_SECS
        self.not_before = 0.0
        self.running = False
        self.attempts = 0

    def next_attempt(self, last_contact: float) -> float:
        return max(last_contact + self.resume_after, self.not_before)

    def due(self, now: float, last_contact: float) -> bool:
        return not self.running and now >= self.next_attempt(last_contact)

    def started(self) -> None:
        self.running = True
        self.attempts += 1

    def finished(self, now: float) -> None:
        """The attempt ended (whatever its outcome): the next waits the back-off."""
        self.running = False
        self.not_before = now + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)

    def contact(self) -> None:
        """Packets flow again: the next outage starts the schedule from the beginning."""
        self.backoff = FIRST_BACKOFF_SECS
        self.not_before = 0.0
