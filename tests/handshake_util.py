"""Shared helpers for the handshake tests: in-memory runs of the sans-IO machines, a real
loopback server running the blocking driver with a reference ``decide``, and a TCP relay
that can tamper with messages (the active attacker)."""

from __future__ import annotations

import os
import pwd
import queue
import select
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import moshpit
import moshpit_handshake as hs
import moshpit_trust as trust
from moshpit_keys import PrivateKey, PublicKey

LOOPBACK = "127.0.0.1"
# No early drop, penalties or rate limit: tests that fail handshakes on purpose must not lock
# themselves out.
UNLIMITED = hs.AdmissionLimits(max_handshakes=64, startups=(64, 100, 64), max_per_source=64,
                               penalties=moshpit.parse_penalties("no"), startups_per_sec=0)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def split_frames(data: bytes) -> List[bytes]:
    """Whole frames (length prefix included) of a byte string of complete messages."""
    frames = []
    while data:
        (length,) = struct.unpack_from(">I", data)
        frames.append(data[:4 + length])
        data = data[4 + length:]
    return frames


def grant(recv_offset: int = 0) -> hs.SessionGrant:
    return hs.SessionGrant(os.urandom(16), os.urandom(32), 50000 + os.urandom(1)[0],
                           recv_offset)


class Flow:
    """One in-memory handshake between the sans-IO machines, step by step, recording every
    byte each side sent (for replays and mutations)."""

    def __init__(self, identity: Optional[PrivateKey], host_key: PrivateKey,
                 request: Optional[hs.ClientRequest] = None) -> None:
        self.client = hs.ClientHandshake(identity, request or hs.ClientRequest("alice"))
        self.server = hs.ServerHandshake(host_key, ("192.0.2.1", 1234), ("192.0.2.2", 40404))
        self.c2s: List[bytes] = []
        self.s2c: List[bytes] = []

    def to_server(self) -> object:
        data = self.client.data_to_send()
        self.c2s.append(data)
        self.server.receive_data(data)
        return self.server.next_event()

    def to_client(self) -> object:
        data = self.server.data_to_send()
        self.s2c.append(data)
        self.client.receive_data(data)
        return self.client.next_event()

    def run(self, decision: Optional[hs.SessionGrant] = None):
        """Complete the handshake; returns (AuthRequested, HandshakeComplete)."""
        assert self.to_server() is None
        assert isinstance(self.to_client(), hs.HostKeyReceived)
        self.client.accept_host_key()
        requested = self.to_server()
        assert isinstance(requested, hs.AuthRequested)
        self.server.accept(decision or grant())
        return requested, self.to_client()


def fake_user(home: str, uid: Optional[int] = None, name: str = "alice") -> pwd.struct_passwd:
    """A password entry for tests (the uid defaults to ours, so files we create are 'theirs')."""
    uid = os.getuid() if uid is None else uid
    return pwd.struct_passwd((name, "x", uid, os.getgid(), "", home, "/bin/sh"))


def write_authorized_keys(home: str, keys: List[PublicKey]) -> str:
    """~/.mp/authorized_keys under ``home``: dir 0700, file 0600 (0755/0644 would do too)."""
    os.makedirs(home, mode=0o755, exist_ok=True)
    os.chmod(home, 0o755)
    mp = os.path.join(home, ".mp")
    os.makedirs(mp, mode=0o700, exist_ok=True)
    os.chmod(mp, 0o700)
    path = os.path.join(mp, "authorized_keys")
    with open(path, "w") as f:
        f.write("# test keys\n" + "".join(key.to_line() + "\n" for key in keys))
    os.chmod(path, 0o600)
    return path


class Session:
    def __init__(self, user: str, key: PublicKey, granted: hs.SessionGrant) -> None:
        self.user, self.key, self.grant = user, key, granted


class ReferenceDecider:
    """What mps decides, reduced to the security rules: the key must be in the user's
    authorized_keys (moshpit_trust); a resume needs the same user and key plus a valid proof."""

    def __init__(self, pw: pwd.struct_passwd) -> None:
        self.pw = pw
        self.sessions: Dict[bytes, Session] = {}
        self.calls = 0

    def __call__(self, auth: hs.AuthInfo) -> hs.SessionGrant:
        self.calls += 1
        if auth.user != self.pw.pw_name:
            raise hs.AuthRefused(hs.PERMISSION_DENIED, f"no such user {auth.user!r}")
        try:
            authorized = trust.authorized_keys_for(self.pw, None)
        except trust.TrustError as err:
            raise hs.AuthRefused(hs.PERMISSION_DENIED, str(err)) from None
        if auth.client_key not in authorized:
            raise hs.AuthRefused(hs.PERMISSION_DENIED,
                                 f"key {auth.client_key.fingerprint()} is not authorized")
        resume_id = auth.request.resume_session_id
        if resume_id is None:
            new = grant()
            self.sessions[new.session_id] = Session(auth.user, auth.client_key, new)
            return new
        session = self.sessions.get(resume_id)
        if session is None:
            raise hs.AuthRefused(hs.NO_SUCH_SESSION, "resume of an unknown session")
        if session.user != auth.user or session.key != auth.client_key:
            raise hs.AuthRefused(hs.PERMISSION_DENIED, "resume of a session opened by another key")
        if not auth.resume_proof_valid(session.grant.resume_secret):
            raise hs.AuthRefused(hs.PERMISSION_DENIED, "bad resume proof")
        g = session.grant
        return hs.SessionGrant(g.session_id, g.resume_secret, g.udp_port, recv_offset=4242)


class LoopbackServer:
    """A listener on 127.0.0.1 that runs ``server_handshake`` in HandshakeLimiter threads.
    ``results`` receives each handshake's return value (AuthInfo or None), ``events`` what
    each reported (progress and outcome) with its peer's address."""

    def __init__(self, host_key: PrivateKey, decide: Callable[[hs.AuthInfo], hs.SessionGrant],
                 timeout: float = 5.0, limiter: Optional[hs.HandshakeLimiter] = None,
                 host: str = LOOPBACK, hello_timeout: Optional[float] = None,
                 acceptable: Callable[[str, List[PublicKey]], Optional[int]]
                 = lambda user, keys: None,
                 confirm_timeout: float = hs.CONFIRM_TIMEOUT_SECS) -> None:
        self.host_key, self.decide, self.timeout = host_key, decide, timeout
        self.hello_timeout = hello_timeout
        self.acceptable, self.confirm_timeout = acceptable, confirm_timeout
        self.limiter = limiter or hs.HandshakeLimiter(hs.AdmissionPolicy(UNLIMITED))
        self.results: queue.Queue[Optional[hs.AuthInfo]] = queue.Queue()
        # (peer address, event) for everything each handshake reports to the limiter
        self.events: queue.Queue[Tuple[str, str]] = queue.Queue()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-listener", daemon=True)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if ready:
                sock, _ = self.listener.accept()
                self.limiter.spawn(sock, self._handshake)

    def _handshake(self, sock: socket.socket, report: Callable[[str], object]) -> None:
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = "?"

        def record(event: str) -> object:
            self.events.put((peer, event))
            return report(event)

        self.results.put(hs.server_handshake(sock, self.host_key, self.decide, self.timeout,
                                             self.hello_timeout, record, self.acceptable,
                                             self.confirm_timeout))

    def result(self, timeout: float = 10.0) -> Optional[hs.AuthInfo]:
        return self.results.get(timeout=timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.limiter.active and time.monotonic() < end:
            time.sleep(0.02)
        assert self.limiter.active == 0


Tamper = Callable[[str, int, bytes], Tuple[bytes, bool]]


class Relay:
    """A man in the middle on loopback for one connection: forwards whole messages between
    a client and ``target_port``, passing each through ``tamper(direction, index, frame)``
    ("c2s"/"s2c", per-direction message index, the frame with its length prefix), which
    returns (bytes to forward, close everything afterwards)."""

    def __init__(self, target_port: int, tamper: Tamper) -> None:
        self.target_port, self.tamper = target_port, tamper
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="test-relay", daemon=True)
        self._closed = threading.Event()

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._thread.join(10)
        self.listener.close()

    def _run(self) -> None:
        self.listener.settimeout(10)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection((LOOPBACK, self.target_port), timeout=10)
        pumps = [threading.Thread(target=self._pump, args=(client, server, "c2s"), daemon=True),
                 threading.Thread(target=self._pump, args=(server, client, "s2c"), daemon=True)]
        for pump in pumps:
            pump.start()
        self._closed.wait(30)
        for sock in (client, server):
            close_quietly(sock)
        for pump in pumps:
            pump.join(5)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buffer, index = b"", 0
        try:
            while not self._closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                buffer += data
                while len(buffer) >= 4:
                    end = 4 + struct.unpack_from(">I", buffer)[0]
                    if len(buffer) < end:
                        break
                    out, close = self.tamper(direction, index, buffer[:end])
                    buffer, index = buffer[end:], index + 1
                    dst.sendall(out)
                    if close:
                        return
        except OSError:
            pass
        finally:
            self._closed.set()


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def recv_until_closed(sock: socket.socket, limit: float) -> Tuple[bytes, float]:
    """Everything the peer sends until it closes, and how long that took (at most ``limit``)."""
    start = time.monotonic()
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start
