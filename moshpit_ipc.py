"""moshpit_ipc: the messages between mps's listener and its session processes.

Why a module of its own: the listener (which holds the host key) and each session process
(which has become the target user and holds only its session keys) talk over a Unix stream
socket. Both ends parse what the other sends, and a session process may be a compromised
user's, so every message is length-prefixed, bounded in size, and a malformed one is a clean
error that ends that one connection.

A message is a JSON object; bytes values travel as ``{"hex": "..."}`` (``encode_message``
and ``MessageReader`` convert both ways). ``Channel`` is the blocking socket shell; the rest
is sans-IO.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import List, Optional

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
        return self._ready.pop(0)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        while self._fds:
            os.close(self._fds.pop())


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
