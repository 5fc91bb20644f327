"""moshpit_ipc: the messages between mps's listener and its session processes.

Why a module of its own: the listener (which holds the host key) and each session process
(which has become the target user and holds only its session keys) talk over a Unix stream
socket. Both ends parse what the other sends, and a session process may be a compromised
user's, so every message is length-prefixed, bounded in size, and a malformed one is a clean
error that ends that one connection.

A message is a JSON object; bytes values travel as ``{"hex": "..."}`` (``encode_message``
and ``MessageReader`` convert both ways). ``Channel`` is the blocking socket shell; the rest
is sans-IO.

A session process writes no log of its own: ``LogSender`` relays its records to the
listener holding the session, whose ``LogReceiver`` writes them, marked as that session's
(see "Log relay" below).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from typing import Callable, List, Optional

import moshpit
from moshpit import MoshpitError

# Bumped when a message changes meaning: a listener claims only sessions that speak its
# version (a session keeps the code it started with across an upgrade of the files).
IPC_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # a start message carries the client's env and command: bounded
_LENGTH = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
RECV_SIZE = 65536


class IpcError(MoshpitError):
    """A malformed or oversized message, or the peer went away mid-message."""


def _to_json(value):
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return value


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"hex"} and isinstance(value["hex"], str):
            try:
                return bytes.fromhex(value["hex"])
            except ValueError:
                raise IpcError("bad hex in a message") from None
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def encode_message(message: dict) -> bytes:
    """One framed message: 4-byte big-endian length, then the JSON text."""
    body = json.dumps(_to_json(message), separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise IpcError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _LENGTH.pack(len(body)) + body


class MessageReader:
    """Reassembles framed messages from a byte stream (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[dict]:
        """The complete messages ``data`` finishes; IpcError on an oversized length, bad
        JSON, or a message that is not an object."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_MESSAGE_BYTES:
                raise IpcError(f"message length {length} exceeds {MAX_MESSAGE_BYTES}")
            if len(self._buffer) < _LENGTH.size + length:
                break
            body = bytes(self._buffer[_LENGTH.size:_LENGTH.size + length])
            del self._buffer[:_LENGTH.size + length]
            try:
                message = json.loads(body)
            except ValueError:
                raise IpcError("a message that is not JSON") from None
            if not isinstance(message, dict):
                raise IpcError("a message that is not an object")
            messages.append(_from_json(message))
        return messages

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete message are waiting (EOF now would cut it)."""
        return bool(self._buffer)


def peer_credentials(sock: socket.socket) -> tuple:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED): who
    connected, as the kernel saw it, not as it claims."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            _PEERCRED.size))


MAX_FDS_PER_READ = 4


class Channel:
    """A blocking message channel over a connected Unix stream socket. ``send`` is safe from
    several threads; ``receive`` is for one reader.

    A message may carry descriptors (SCM_RIGHTS: the listener hands a session its TCP
    carrier). With ``accept_fds`` they queue for ``take_fd`` (in message order: a
    descriptor arrives with the first byte of the message it was sent with); without it
    (the listener's side: a session process is not trusted) they are closed on arrival, so
    a peer cannot fill our descriptor table."""

    def __init__(self, sock: socket.socket, accept_fds: bool = False):
        self.sock = sock
        self.accept_fds = accept_fds
        # "log" messages go here instead of to ``receive``'s caller (the listener's side: a
        # session's relayed log lines may come between any two of its other messages).
        self.on_log: Optional[Callable[[dict], None]] = None
        self._reader = MessageReader()
        self._ready: List[dict] = []
        self._fds: List[int] = []
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict, fds=()) -> None:
        """OSError if the peer is gone."""
        data = encode_message(message)
        with self._send_lock:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                data = data[sent:]
            self.sock.sendall(data)

    @property
    def pending(self) -> bool:
        """Messages already read from the socket wait here: a select loop must take them
        with ``receive`` too, for the socket will not signal them again."""
        return bool(self._ready)

    def take_fd(self) -> Optional[int]:
        """The oldest descriptor received and not taken yet (ours to close), or None."""
        return self._fds.pop(0) if self._fds else None

    def receive(self) -> Optional[dict]:
        """The next message (blocking; the socket's timeout applies), None at a clean end of
        stream; IpcError for garbage or a stream cut mid-message."""
        while True:
            while not self._ready:
                data, fds, _, _ = socket.recv_fds(self.sock, RECV_SIZE, MAX_FDS_PER_READ)
                for fd in fds:
                    if self.accept_fds:
                        self._fds.append(fd)
                    else:
                        os.close(fd)
                if not data:
                    if self._reader.partial:
                        raise IpcError("the peer closed the channel mid-message")
                    return None
                self._ready.extend(self._reader.feed(data))
            message = self._ready.pop(0)
            if self.on_log is None or message.get("op") != "log":
                return message
            self.on_log(message)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        while self._fds:
            os.close(self._fds.pop())


# ---------------------------------------------------------------------------
# Log relay
# ---------------------------------------------------------------------------
#
# A session process has become its user: were it to hold the log file (root's) or the
# listener's stderr, a compromised one could write anything there, lines that look like the
# listener's or another session's included. So it holds neither: its records travel as
# ``{"op": "log", "name": logger, "level": N, "text": ...}`` on its control channel to the
# listener holding it, which writes each as one line of its own, prefixed with the session
# and its user, bounded in length and rate (the limits are the listener's: a compromised
# session need not keep its own).

MAX_LOG_TEXT = 2000  # characters of one relayed record (a traceback fits, as one line)
LOG_BURST, LOG_LINES_PER_SEC = 200, 20.0  # per session: lines at once, then per second
MAX_HELD_LOG_LINES = 200  # records a session process keeps while no listener holds it
_LEVELS = frozenset((logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                     logging.CRITICAL))


class LogSender(logging.Handler):
    """(Session process.) Its only log handler (``moshpit.relay_logging`` installs it):
    each record goes to the listener holding the session, as a "log" message on the
    channel given to ``attach``; while there is none (the listener stopped, the next one
    has not claimed the session yet), the newest MAX_HELD_LOG_LINES wait for it and the
    older ones are counted, and said, on delivery."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))  # the listener adds the rest
        self._channel: Optional[Channel] = None
        self._held: deque = deque(maxlen=MAX_HELD_LOG_LINES)
        self._lost = 0

    @classmethod
    def installed(cls) -> Optional[LogSender]:
        """The one ``relay_logging`` installed in this process, if any."""
        for handler in logging.getLogger(moshpit.ROOT_LOGGER).handlers:
            if isinstance(handler, cls):
                return handler
        return None

    def emit(self, record: logging.LogRecord) -> None:
        message = {"op": "log", "name": record.name, "level": record.levelno,
                   "text": self.format(record)[:MAX_LOG_TEXT]}
        if not self._deliver(message):
            if len(self._held) == self._held.maxlen:
                self._lost += 1
            # Written when delivered, maybe much later: the line says when it happened.
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            message["text"] = f"(held, logged at {when}) {message['text']}"
            self._held.append(message)

    def attach(self, channel: Channel) -> None:
        """Relay to ``channel`` from now on (a listener has just claimed the session, or
        started it): what was held goes first."""
        with self.lock:
            self._channel = channel
            if self._lost and self._deliver({
                    "op": "log", "name": "moshpit.server", "level": logging.WARNING,
                    "text": f"{self._lost} earlier log line(s) dropped: no listener held the "
                            "session"}):
                self._lost = 0
            while self._held and self._deliver(self._held[0]):
                self._held.popleft()

    def detach(self, channel: Channel) -> None:
        """``channel`` is closed: hold records until the next ``attach``."""
        with self.lock:
            if self._channel is channel:
                self._channel = None

    def _deliver(self, message: dict) -> bool:
        channel = self._channel
        if channel is None:
            return False
        try:
            channel.send(message)
        except OSError:
            self._channel = None  # that listener is gone
            return False
        return True


class LogReceiver:
    """(Listener.) Writes the records one session process relays ("log" messages) to the
    listener's log, each as a line of its own: prefixed with ``prefix`` (the session and its
    user), so that no session passes its lines off as another's or the listener's; controls
    and newlines shown as visible escapes (``moshpit.printable``: one record, one line); at
    most MAX_LOG_TEXT characters; at most LOG_BURST lines at once, then LOG_LINES_PER_SEC,
    the rest counted and said. ``receive`` takes the time (fake clocks in tests)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.dropped = 0
        self._tokens = float(LOG_BURST)
        self._refilled: Optional[float] = None

    def __call__(self, message: dict) -> None:
        self.receive(message, time.monotonic())

    def receive(self, message: dict, now: float) -> None:
        if self._refilled is not None:
            self._tokens = min(float(LOG_BURST),
                               self._tokens + (now - self._refilled) * LOG_LINES_PER_SEC)
        self._refilled = now
        if self._tokens < 1:
            self.dropped += 1
            return
        self._tokens -= 1
        self.close()
        level = message.get("level")
        if isinstance(level, bool) or not isinstance(level, int) or level not in _LEVELS:
            level = logging.INFO
        text = moshpit.printable(str(message.get("text", "")), MAX_LOG_TEXT)
        _relayed_logger(message.get("name")).log(level, "[%s] %s", self.prefix, text)

    def close(self) -> None:
        """Say how many lines were dropped, if any (also at the session's end)."""
        if self.dropped:
            logging.getLogger("moshpit.server").warning(
                "[%s] %d log line(s) dropped: more than %d at once or %g per second",
                self.prefix, self.dropped, LOG_BURST, LOG_LINES_PER_SEC)
            self.dropped = 0


def _relayed_logger(name: object) -> logging.Logger:
    """The logger a relayed record names, if it is one of ours that exists (so the
    listener's per-target directives apply); else moshpit.server. Never a new one: a
    session cannot make the listener create loggers."""
    known = logging.Logger.manager.loggerDict
    if isinstance(name, str) and name.startswith(moshpit.ROOT_LOGGER + ".") and name in known:
        return logging.getLogger(name)
    return logging.getLogger("moshpit.server")


def send_packet(sock: socket.socket, message: dict, fds=()) -> None:
    """One message (and open descriptors, SCM_RIGHTS) as one SOCK_SEQPACKET datagram."""
    socket.send_fds(sock, [encode_message(message)], list(fds))


def receive_packet(sock: socket.socket, max_fds: int = 4) -> tuple:
    """(message, fds) from one SOCK_SEQPACKET datagram; (None, []) at the end of the stream.
    Descriptors that came with a malformed message are closed before IpcError is raised."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES + _LENGTH.size, max_fds)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise IpcError("a truncated message")
        messages = MessageReader().feed(data)
        if len(messages) != 1:
            raise IpcError("a packet that is not exactly one message")
    except IpcError:
        for fd in fds:
            os.close(fd)
        raise
    return messages[0], fds
