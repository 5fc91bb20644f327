"""moshpit handshake: who gets a shell, decided over one TCP connection (default port 40404).

A SIGMA-I style signed ephemeral Diffie-Hellman, modelled on TLS 1.3 and SSH. Every message
is ``uint32 length || uint8 type || body`` with 1 <= length <= 64 KiB. ``{...}`` is sealed with
ChaCha20-Poly1305 under the sender's handshake key (nonce = that direction's message counter,
associated data = type byte || transcript hash before the message)::

    ClientHello   version, client random(32), client X25519 key, offered ciphers     ->
              <-  ServerHello   version, server random(32), server X25519 key, cipher
              <-  ServerAuth    {host key blob, Ed25519 sig("moshpit-server" || TH_s)}
          the client checks the signature, then the host key (known_hosts; may ask the user)
  [ ClientOffer   {user, key blobs (1..MAX_OFFERED_KEYS)}                            ->
              <-  KeyAccepted   {index of the first offered key authorized for user}
                  (or ServerFinish with a refusal: none is) ]
    ClientAuth    {user, client key blob, TERM, rows, cols, LANG/LC_*, resume id + offset
                   [+ intent [+ command, has-command/pty flags [+ session flags]]];
                   SSHSIG("moshpit-client", sha512, TH_c); resume proof}              ->
              <-  ServerFinish  {grant: session id, resume secret, UDP port, offset,
                                 detached sessions | listing | refusal}
    Refuse        plaintext reason code: "server busy" before anything is read, or a protocol
                  error. Unauthenticated, so the client never takes it as a final answer.

The optional trailing ``intent`` byte says what the request is about: absent (a new
session, or resuming the named one: every request of protocol version 1), END_SESSION (the
owner quits: end the resumed session now), TAKE_OVER (``mp --attach``: continue the named
session from a fresh stream, any key authorized for its user, no resume proof), LIST
(``mp --list``: the user's sessions) or KILL (``mp --kill``: end the named session, any key
authorized for its user). It is written only when present, so plain requests stay
byte-identical to what older peers send and accept; an older server, whose ClientAuth ends at
the offset, answers any intent with a protocol error instead of doing something else.
Only a resume or END_SESSION carries a resume proof.

The optional ClientOffer is ssh's publickey query: a client whose keys need a person to sign
(ssh-agent with ``ssh-add -c``, hardware keys) or that has several asks first which one the
server would accept, and signs only with that one; ClientAuth must then name exactly the
accepted key and user (else "permission denied"). At most one offer per handshake. A client
with one key file sends ClientAuth at once (no extra round trip). Once a key is accepted the
server may allow ``confirm_timeout`` for the signature (a person confirming), within the
pre-authentication limits (AdmissionPolicy.confirming). A LIST is answered with a listing
instead of a grant (ServerFinish outcome LISTING: count:u16, then per session id, attached:u8,
started:u64, last activity:u64 (Unix seconds), rows:u16, cols:u16, title; at most
MAX_LISTED sessions, titles at most MAX_TITLE_BYTES).

After a grant that continues a session (a new one, a resume, a takeover) the connection
stays open: it becomes the session's TCP carrier (protocol version 4, moshpit_carrier), or
the client closes it. Only this connection, authenticated by the handshake it carried, can
ever carry the session's datagrams over TCP.

Transcript hash TH: SHA-256 over a label and every message's fields in order (each as an SSH
string, so boundaries are unambiguous). TH_1 after ServerHello, TH_s after the host key blob,
TH_c after the client's fields (the client signs its user, its own key and every request field),
TH_f after ClientAuth. An offer and its answer come before TH_c, so the signature covers them.
Every one covers both randoms, both ephemeral keys, version and cipher.

Key schedule, HKDF-SHA256 with ikm = X25519 shared secret (an all-zero secret, i.e. a low-order
peer key, is refused)::

    handshake keys  c2s || s2c            = HKDF(salt=TH_1, info="moshpit handshake keys")
    session keys    c2s || s2c || conn_id = HKDF(salt=TH_f, info="moshpit session keys")
    resume proof                          = HMAC-SHA256(resume_secret, "moshpit-resume" || TH_c)

ServerFinish is sealed with TH_f as associated data, so opening it is the client's key
confirmation: the server saw exactly this ClientAuth, requested user included.

Layout: wire helpers -> data types -> sans-IO state machines (h11 style:
``receive_data`` / ``data_to_send`` / ``next_event``) -> blocking drivers -> admission before
the handshake (a sans-IO policy and its thread shell). The trust policies (authorized_keys,
known_hosts) live in moshpit_trust, SSHSIG in moshpit_keys.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import random
import re
import select
import socket
import struct
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from moshpit import (
    MAX_DATAGRAM,
    PENALTY_DEFAULTS,
    PRINTABLE_LIMIT,
    PROTOCOL_VERSION,
    TERM_NAME_RE,
    MoshpitError,
    format_addr,
    is_locale_setting,
    printable,
    printable_lines,
)
from moshpit_keys import (
    PrivateKey,
    PublicKey,
    WireReader,
    ssh_string,
    sshsig_sign,
    sshsig_verify,
)

__all__ = [
    "MAX_MESSAGE", "CIPHERS", "SSHSIG_NAMESPACE", "SERVER_CONTEXT", "PERMISSION_DENIED",
    "SERVER_BUSY", "NO_SUCH_SESSION", "PROTOCOL_ERROR", "SHUTTING_DOWN", "USER_NOT_SERVED",
    "SESSION_LIMIT", "USER_SESSION_LIMIT", "REFUSAL_CODES", "FINAL_CODES", "NOT_MOSHPIT",
    "HandshakeError", "AuthRefused", "MAX_LOCALE_VARS", "END_SESSION", "ClientRequest",
    "MAX_COMMAND", "FLAG_AGENT", "FLAG_NO_COMMAND",
    "SessionKeys", "SessionGrant", "AuthInfo", "ClientResult", "HostKeyReceived", "AuthRequested",
    "HandshakeComplete", "locale_env", "ClientHandshake", "ServerHandshake", "AUTHENTICATED",
    "AUTHFAIL", "NOAUTH", "GRACE_EXCEEDED", "NEUTRAL", "HELLO_RECEIVED", "server_handshake",
    "send_refusal", "MAX_TRACKED_SOURCES", "IDLE_EVICT_SECS", "source_of", "AdmissionLimits",
    "Admission", "AdmissionPolicy", "HandshakeLimiter", "LazyIdentity", "client_handshake",
    "MAX_OFFERED_KEYS", "KeysOffered", "KeyAccepted", "OFFER_ACCEPTED", "CONFIRM_TIMEOUT_SECS",
    "MAX_CONFIRMING_PER_SOURCE",
]

log = logging.getLogger("moshpit.handshake")

MAX_MESSAGE = 64 * 1024  # largest message body either side accepts
CIPHERS = ("chacha20-poly1305", "aes-256-gcm")  # session ciphers (server's order:
# server_cipher_order())
_CIPHER_CLASSES = {"chacha20-poly1305": ChaCha20Poly1305, "aes-256-gcm": AESGCM}
_CIPHER_TRIAL_ROUNDS, _CIPHER_TRIAL_SEALS = 3, 32  # of full datagrams, to time each
SSHSIG_NAMESPACE = "moshpit-client"
SERVER_CONTEXT = b"moshpit-server"
_TRANSCRIPT_LABEL = b"moshpit handshake transcript"
_RESUME_LABEL = b"moshpit-resume"
_HANDSHAKE_INFO = b"moshpit handshake keys"
_SESSION_INFO = b"moshpit session keys"
_RECV_SIZE = 65536

_CLIENT_HELLO, _SERVER_HELLO, _SERVER_AUTH, _CLIENT_AUTH, _SERVER_FINISH, _REFUSE = range(1, 7)
_CLIENT_OFFER, _KEY_ACCEPTED = 7, 8
_MESSAGE_NAMES = {
    _CLIENT_HELLO: "ClientHello",
    _SERVER_HELLO: "ServerHello",
    _SERVER_AUTH: "ServerAuth",
    _CLIENT_AUTH: "ClientAuth",
    _SERVER_FINISH: "ServerFinish",
    _REFUSE: "Refuse",
    _CLIENT_OFFER: "ClientOffer",
    _KEY_ACCEPTED: "KeyAccepted",
}
MAX_OFFERED_KEYS = 16  # public keys in one ClientOffer
_ACCEPTED, _REFUSED, _LISTING = 0, 1, 2  # ServerFinish outcome byte

# Reason codes: all a client ever learns about a refusal (no oracle beyond "not authorized").
PERMISSION_DENIED = "permission denied"
SERVER_BUSY = "server busy"
NO_SUCH_SESSION = "no such session"
PROTOCOL_ERROR = "protocol error"
SHUTTING_DOWN = "server shutting down"
USER_NOT_SERVED = "user not served"  # a server without root serves only its own user
SESSION_LIMIT = "session limit reached"  # mps.max_sessions
USER_SESSION_LIMIT = "too many sessions for user"  # mps.max_sessions_per_user
REFUSAL_CODES = (PERMISSION_DENIED, SERVER_BUSY, NO_SUCH_SESSION, PROTOCOL_ERROR, SHUTTING_DOWN,
                 USER_NOT_SERVED, SESSION_LIMIT, USER_SESSION_LIMIT)
# Retrying cannot help: the client stops. Final codes are believed only inside the
# authenticated ServerFinish. The session limits answer only a new-session request (a resume
# is never refused by them, so the reconnect loop never meets them), and a slot frees only
# when someone ends a session: a retry loop would not help.
FINAL_CODES = (PERMISSION_DENIED, NO_SUCH_SESSION, USER_NOT_SERVED, SESSION_LIMIT,
               USER_SESSION_LIMIT)
# Text a refusal may carry for the user after the code (the server's /etc/nologin, PAM's
# messages): only in the authenticated ServerFinish, after a valid key; bytes, capped.
MAX_REFUSAL_MESSAGE = 1024
# The client's own finding, never sent: the peer's first bytes are another protocol.
NOT_MOSHPIT = "not a moshpit server"


class HandshakeError(MoshpitError):
    """The handshake failed. ``code`` is the short reason code (one of REFUSAL_CODES)."""

    def __init__(self, message: str, code: str = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class AuthRefused(HandshakeError):
    """The server refused to authorize the client (a final answer: the client stops).

    ``code`` is what the peer is told, with ``client_message`` if there is one (text for the
    user, e.g. why logins are disabled); ``log_reason`` (also ``str()``) is the full one-line
    reason: logged on the server, shown to the user on the client.
    """

    def __init__(self, code: str = PERMISSION_DENIED, log_reason: Optional[str] = None,
                 client_message: str = "") -> None:
        super().__init__(log_reason or code, code)
        self.log_reason = log_reason or code
        self.client_message = client_message


# ---------------------------------------------------------------------------
# Wire helpers
# ---------------------------------------------------------------------------


class _Reader(WireReader):
    """WireReader plus the fixed-width integers of the handshake; malformations are ValueError."""

    def uint8(self) -> int:
        return self.take(1)[0]

    def uint16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def uint64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]



@functools.cache
def server_cipher_order() -> Tuple[str, ...]:
    """CIPHERS, the fastest on this machine first (measured once: sealing full datagrams).
    Both are 256-bit AEADs; which one costs less decides a bulk transfer's CPU on both
    ends: AES-GCM where the CPU has AES instructions (0.8 us against 2.3 us per datagram
    measured on x86-64 with AES-NI), ChaCha20-Poly1305 where it has not."""
    payload, nonce = bytes(MAX_DATAGRAM), bytes(12)

    def cost(name: str) -> float:
        aead = _CIPHER_CLASSES[name](bytes(32))
        best = float("inf")
        for _ in range(_CIPHER_TRIAL_ROUNDS):
            start = time.perf_counter()
            for _ in range(_CIPHER_TRIAL_SEALS):
                aead.encrypt(nonce, payload, None)
            best = min(best, time.perf_counter() - start)
        return best

    costs = {name: cost(name) for name in CIPHERS}
    return tuple(sorted(CIPHERS, key=costs.__getitem__))


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _refusal_frame(code: str) -> bytes:
    return _frame(bytes([_REFUSE]) + ssh_string(code.encode("ascii")))


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------

_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}\$?")
MAX_LOCALE_VARS = 32
# ClientAuth intent byte: none, end the resumed session, mp --attach / --list / --kill
NO_INTENT, END_SESSION, TAKE_OVER, LIST, KILL = 0, 1, 2, 3, 4
_INTENTS = (TAKE_OVER, LIST, KILL)  # ClientRequest.intent (END_SESSION: end_session)
_NAMED_INTENTS = (TAKE_OVER, KILL)  # need a session id
MAX_LISTED = 100  # sessions in a LIST answer
MAX_TITLE_BYTES = 200  # a listed session's title or command, UTF-8
MAX_COMMAND = 32 * 1024  # bytes of a remote command (ssh's is bounded by its packet size too)
FLAG_AGENT, FLAG_NO_COMMAND = 1, 2  # the request's session flags byte (protocol 4)


@dataclass
class ClientRequest:
    """What the client asks for. ``env`` holds LANG/LC_* only (see ``locale_env``).

    ``resume_secret`` stays on the client: it keys the resume proof and is never sent.
    ``end_session`` (with a resume id) asks the server to end that session instead of
    re-attaching it: the escape-key quit when UDP cannot carry the goodbye. ``intent``
    (TAKE_OVER, LIST, KILL; NO_INTENT) is what mp --attach / --list / --kill ask for.
    ``command`` (one string, as ssh sends it) and ``pty`` (False: no terminal, the bytes
    go through exactly) travel after the intent byte, which is then always present; a
    server that predates them refuses the request instead of starting a login shell.
    The session flags byte (protocol 4) follows them when any flag is set: FLAG_AGENT
    (``forward_agent``, -A) and FLAG_NO_COMMAND (``no_command``, -N: the server starts no
    process at all, the session carries channels until the client quits; sent with an
    empty command and no PTY, and never with a command).
    """

    user: str
    term: str = "xterm"
    rows: int = 24
    cols: int = 80
    env: Dict[str, str] = field(default_factory=dict)
    resume_session_id: Optional[bytes] = None
    resume_recv_offset: int = 0
    resume_secret: Optional[bytes] = field(default=None, repr=False)
    end_session: bool = False
    command: Optional[str] = None  # run by the user's shell with -c instead of a login shell
    pty: bool = True  # False: the command (or shell) runs on a socket, bytes untouched
    intent: int = NO_INTENT
    forward_agent: bool = False  # -A: the session gets an SSH_AUTH_SOCK relayed to ours
    no_command: bool = False  # -N: no shell, no command, no PTY; the session only forwards

    @property
    def needs_proof(self) -> bool:
        """A resume or a quit proves the resume secret; other intents need only the key."""
        return self.resume_session_id is not None and self.intent == NO_INTENT


@dataclass
class SessionKeys:
    """Keys for the UDP session: one per direction, a fresh connection id, the cipher."""

    client_to_server: bytes = field(repr=False)
    server_to_client: bytes = field(repr=False)
    conn_id: bytes
    cipher: str


@dataclass
class SessionGrant:
    """What the server's ``decide`` hands the client (sealed): where and how to continue."""

    session_id: bytes
    resume_secret: bytes = field(repr=False)
    udp_port: int
    recv_offset: int = 0
    detached: int = 0  # the user's other sessions nobody holds (a new session's notice)


@dataclass
class SessionInfo:
    """One session in a LIST answer (times in Unix seconds)."""

    session_id: bytes
    attached: bool
    started: int
    last_activity: int
    rows: int
    cols: int
    title: str


@dataclass
class SessionListing:
    """The answer to a LIST request, in place of a SessionGrant."""

    sessions: List[SessionInfo]


@dataclass
class AuthInfo:
    """An authenticated client request (its signature has been verified), given to ``decide``.

    The client has proven possession of ``client_key``; whether that key may log in as
    ``user`` (authorized_keys) or resume a session is the caller's decision.
    """

    user: str
    client_key: PublicKey
    request: ClientRequest
    keys: SessionKeys
    peer: tuple
    local: tuple
    resume_proof: bytes = field(default=b"", repr=False)
    transcript_hash: bytes = field(default=b"", repr=False)

    def resume_proof_valid(self, resume_secret: bytes) -> bool:
        """True if the client proved, in this handshake, that it knows ``resume_secret``."""
        if not self.request.resume_session_id or not self.resume_proof:
            return False
        return hmac.compare_digest(_resume_proof(resume_secret, self.transcript_hash),
                                   self.resume_proof)


@dataclass
class ClientResult:
    """A finished client handshake. UDP goes to ``(server_addr[0], grant.udp_port)``; a
    LIST request's ``grant`` is the SessionListing."""

    grant: Union[SessionGrant, SessionListing]
    keys: SessionKeys
    server_addr: tuple
    host_key: PublicKey
    rtt: float = 0.0  # seconds from ClientHello to ServerAuth: a round trip (plus a signature)
    # With keep_connection: the handshake's connection, open (the TCP carrier,
    # moshpit_carrier), and any bytes already read past ServerFinish.
    connection: Optional[socket.socket] = None
    unread: bytes = b""


@dataclass
class HostKeyReceived:
    """Client event: the server proved it holds ``host_key``; check it, then accept_host_key()."""

    host_key: PublicKey


@dataclass
class KeysOffered:
    """Server event: the client asks which of ``keys`` may log in as ``user`` (nothing is
    proven yet); answer with answer_offer(index of the first authorized one, or None)."""

    user: str
    keys: List[PublicKey]


@dataclass
class KeyAccepted:
    """Client event: the server would accept ``key`` (of those offered); sign with it:
    authenticate(signer)."""

    key: PublicKey


@dataclass
class AuthRequested:
    """Server event: a verified client request; answer with accept(grant) or refuse(code)."""

    auth: AuthInfo


@dataclass
class HandshakeComplete:
    """Client event: the server granted the session (or, for a LIST, listed them)."""

    grant: Union[SessionGrant, SessionListing]
    keys: SessionKeys
    host_key: PublicKey


def locale_env(environ: Dict[str, str]) -> Dict[str, str]:
    """The LANG and LC_* variables of ``environ`` a ClientRequest may carry (others dropped)."""
    chosen = (
        (name, value) for name, value in sorted(environ.items())
        if is_locale_setting(name, value)
    )
    return dict(itertools.islice(chosen, MAX_LOCALE_VARS))


def _check_request(request: ClientRequest) -> None:
    """ValueError unless every field is within the protocol's bounds."""
    if not _USER_RE.fullmatch(request.user):
        raise ValueError(f"user name {request.user[:80]!r} is not valid")
    if not TERM_NAME_RE.fullmatch(request.term):
        raise ValueError(f"TERM {request.term[:80]!r} is not a valid terminal name")
    if not (0 <= request.rows <= 0xFFFF and 0 <= request.cols <= 0xFFFF):
        raise ValueError(f"window size {request.rows}x{request.cols} is out of range")
    if len(request.env) > MAX_LOCALE_VARS:
        raise ValueError(f"more than {MAX_LOCALE_VARS} locale variables")
    for name, value in request.env.items():
        if not is_locale_setting(name, value):
            raise ValueError(f"environment variable {name[:40]!r} is not an allowed locale setting")
    if request.resume_session_id is not None and len(request.resume_session_id) != 16:
        raise ValueError("a resume session id is 16 bytes")
    if not 0 <= request.resume_recv_offset < 1 << 64:
        raise ValueError("resume offset out of range")
    if request.end_session and request.resume_session_id is None:
        raise ValueError("ending a session needs its session id")
    if request.intent and (request.intent not in _INTENTS or request.end_session):
        raise ValueError("unknown request intent")
    if (request.intent in _NAMED_INTENTS) != (request.resume_session_id is not None
                                              and request.intent != NO_INTENT):
        raise ValueError("this request intent needs a session id (and only it)")
    if request.command is not None and len(request.command.encode()) > MAX_COMMAND:
        raise ValueError(f"the command is longer than {MAX_COMMAND} bytes")
    if request.no_command and (request.command is not None or request.pty):
        raise ValueError("a session without a command (-N) has no command and no PTY")


def _encode_fields(request: ClientRequest, key_blob: bytes) -> bytes:
    env = sorted(request.env.items())
    return b"".join([
        ssh_string(request.user.encode()),
        ssh_string(key_blob),
        ssh_string(request.term.encode()),
        struct.pack(">HHI", request.rows, request.cols, len(env)),
        *(ssh_string(name.encode()) + ssh_string(value.encode()) for name, value in env),
        ssh_string(request.resume_session_id or b""),
        struct.pack(">Q", request.resume_recv_offset),
        *_encode_tail(request),
    ])


def _encode_tail(request: ClientRequest) -> list:
    """The optional fields after the offset: the intent byte, then the command and pty
    flag (sent only when they differ from a plain login shell on a PTY)."""
    intent = bytes([END_SESSION if request.end_session else request.intent])
    flags = (FLAG_AGENT if request.forward_agent else 0) | (
        FLAG_NO_COMMAND if request.no_command else 0)
    session_flags = [bytes([flags])] if flags else []  # (protocol 4) after the pty flag
    if request.command is None and request.pty and not session_flags:
        return [intent] if intent != bytes([NO_INTENT]) else []
    return [intent, ssh_string((request.command or "").encode()),
            bytes([request.command is not None, request.pty]), *session_flags]


def _decode_fields(data: bytes) -> Tuple[ClientRequest, PublicKey]:
    reader = _Reader(data, "ClientAuth")
    user = reader.string().decode("utf-8")
    client_key = PublicKey.from_blob(reader.string())
    term = reader.string().decode("ascii")
    rows, cols, count = reader.uint16(), reader.uint16(), reader.uint32()
    if count > MAX_LOCALE_VARS:
        raise ValueError(f"more than {MAX_LOCALE_VARS} locale variables")
    env = {}
    for _ in range(count):
        name, value = reader.text(), reader.text()
        if name in env:
            raise ValueError(f"environment variable {name[:40]!r} sent twice")
        env[name] = value
    resume_id = reader.string() or None
    request = ClientRequest(user, term, rows, cols, env, resume_id, reader.uint64())
    if reader.remaining():
        intent = reader.uint8()
        if intent == END_SESSION:
            request.end_session = True
        else:
            request.intent = intent  # checked by _check_request
    if reader.remaining():
        command = reader.string()
        if len(command) > MAX_COMMAND:
            raise ValueError(f"the command is longer than {MAX_COMMAND} bytes")
        has_command, pty = reader.uint8(), reader.uint8()
        if has_command > 1 or pty > 1:
            raise ValueError("bad command flags")
        request.command = command.decode("utf-8") if has_command else None
        request.pty = bool(pty)
    if reader.remaining():
        flags = reader.uint8()
        if flags & ~(FLAG_AGENT | FLAG_NO_COMMAND):
            raise ValueError("bad session flags")
        request.forward_agent = bool(flags & FLAG_AGENT)
        request.no_command = bool(flags & FLAG_NO_COMMAND)
    reader.expect_end()
    _check_request(request)
    return request, client_key


def _encode_grant(grant: SessionGrant) -> bytes:
    if len(grant.session_id) != 16 or len(grant.resume_secret) != 32:
        raise ValueError("a grant needs a 16-byte session id and a 32-byte resume secret")
    if not (1 <= grant.udp_port <= 0xFFFF and 0 <= grant.recv_offset < 1 << 64):
        raise ValueError("grant UDP port or offset out of range")
    return (bytes([_ACCEPTED]) + ssh_string(grant.session_id) + ssh_string(grant.resume_secret)
            + struct.pack(">HQH", grant.udp_port, grant.recv_offset,
                          min(grant.detached, 0xFFFF)))


def _decode_grant(reader: _Reader) -> SessionGrant:
    session_id, resume_secret = reader.string(), reader.string()
    udp_port, recv_offset, detached = reader.uint16(), reader.uint64(), reader.uint16()
    reader.expect_end()
    if len(session_id) != 16 or len(resume_secret) != 32 or udp_port == 0:
        raise ValueError("malformed session grant")
    return SessionGrant(session_id, resume_secret, udp_port, recv_offset, detached)


def _encode_listing(listing: SessionListing) -> bytes:
    if len(listing.sessions) > MAX_LISTED:
        raise ValueError(f"a listing holds at most {MAX_LISTED} sessions")
    out = [bytes([_LISTING]), struct.pack(">H", len(listing.sessions))]
    for info in listing.sessions:
        title = info.title.encode("utf-8")[:MAX_TITLE_BYTES].decode("utf-8", "ignore")
        out += [ssh_string(info.session_id),
                struct.pack(">BQQHH", bool(info.attached), info.started, info.last_activity,
                            info.rows, info.cols),
                ssh_string(title.encode("utf-8"))]
    return b"".join(out)


def _decode_listing(reader: _Reader) -> SessionListing:
    count = reader.uint16()
    if count > MAX_LISTED:
        raise ValueError("too many sessions in the listing")
    sessions = []
    for _ in range(count):
        session_id = reader.string()
        attached, started, last_activity = reader.uint8(), reader.uint64(), reader.uint64()
        rows, cols = reader.uint16(), reader.uint16()
        title = reader.string()
        if len(session_id) != 16 or attached > 1 or len(title) > MAX_TITLE_BYTES:
            raise ValueError("malformed session listing")
        sessions.append(SessionInfo(session_id, bool(attached), started, last_activity, rows,
                                    cols, title.decode("utf-8", "replace")))
    reader.expect_end()
    return SessionListing(sessions)


def _resume_proof(resume_secret: bytes, transcript_hash: bytes) -> bytes:
    return hmac.new(resume_secret, _RESUME_LABEL + transcript_hash, hashlib.sha256).digest()


def _encode_offer(keys: List[PublicKey]) -> bytes:
    if not 1 <= len(keys) <= MAX_OFFERED_KEYS or len(set(keys)) != len(keys):
        raise ValueError(f"an offer holds 1 to {MAX_OFFERED_KEYS} different keys")
    return struct.pack(">H", len(keys)) + b"".join(ssh_string(key.blob) for key in keys)


def _decode_offer(data: bytes) -> List[PublicKey]:
    reader = _Reader(data, "ClientOffer")
    count = reader.uint16()
    if not 1 <= count <= MAX_OFFERED_KEYS:
        raise ValueError(f"an offer holds 1 to {MAX_OFFERED_KEYS} keys, not {count}")
    keys = [PublicKey.from_blob(reader.string()) for _ in range(count)]
    reader.expect_end()
    if len(set(keys)) != count:
        raise ValueError("a key is offered twice")
    return keys


# ---------------------------------------------------------------------------
# Handshake cryptography
# ---------------------------------------------------------------------------


class _Transcript:
    """Running SHA-256 over every handshake field in order; ``digest()`` snapshots it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(ssh_string(_TRANSCRIPT_LABEL))

    def add(self, *fields: bytes) -> None:
        for data in fields:
            self._hash.update(ssh_string(data))

    def digest(self) -> bytes:
        return self._hash.copy().digest()

    def digest_with(self, *fields: bytes) -> bytes:
        """The digest once ``fields`` are added, without adding them."""
        probe = self._hash.copy()
        for data in fields:
            probe.update(ssh_string(data))
        return probe.digest()


class _Ephemeral:
    """A fresh X25519 key pair for one handshake (forward secrecy)."""

    def __init__(self) -> None:
        self._key = X25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def exchange(self, peer_public: bytes) -> bytes:
        """The shared secret; a low-order peer key (all-zero secret) is a HandshakeError."""
        try:
            secret = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:  # OpenSSL refuses low-order points itself
            secret = bytes(32)
        # Checked here too so the guarantee does not depend on the OpenSSL build.
        if hmac.compare_digest(secret, bytes(32)):
            raise HandshakeError("protocol error: the peer's X25519 key has small order")
        return secret


class _Sealer:
    """One direction of handshake encryption. Each direction has its own key and the nonce is
    its message counter, so a (key, nonce) pair never repeats."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        self._counter += 1
        return struct.pack(">IQ", 0, self._counter - 1)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(), plaintext, associated)

    def open(self, ciphertext: bytes, associated: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), ciphertext, associated)
        except InvalidTag:
            raise HandshakeError(
                "protocol error: a sealed message failed authentication"
                " (tampered with, or not from the peer this handshake started with)"
            ) from None


def _hkdf(secret: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


# ---------------------------------------------------------------------------
# Sans-IO state machines
# ---------------------------------------------------------------------------


class _Handshake:
    """What both roles share: framing of the input, the output queue, the transcript,
    handshake encryption and a failure latch (once failed, always failed)."""

    _MAX_BUFFERED = 2 * (4 + MAX_MESSAGE)
    _is_client = False

    def __init__(self) -> None:
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._overflow = False
        self._error: Optional[HandshakeError] = None
        self._transcript = _Transcript()
        self._handler: Optional[Callable[[bytes], object]] = None  # None: waiting for the caller
        self._shared = b""  # X25519 secret, kept only until the session keys exist
        self._cipher = ""
        self._sealer: Optional[_Sealer] = None
        self._opener: Optional[_Sealer] = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer, in any chunking. Never raises: a problem (such as
        a peer flooding us) surfaces from the next ``next_event``. End of input is the
        driver's business: it simply stops feeding."""
        if len(self._inbox) + len(data) > self._MAX_BUFFERED:
            self._overflow = True
        elif self._error is None:
            self._inbox += data

    def unread(self) -> bytes:
        """Bytes received after the last message: once the handshake is over, the start
        of what follows on the connection (the TCP carrier's datagrams)."""
        return bytes(self._inbox)

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (possibly empty)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def next_event(self) -> object:
        """The next event, or None if more input (or a decision by the caller) is needed.

        Raises HandshakeError (AuthRefused for a refusal) when the handshake failed; it then
        stays failed. A failing server queues its refusal in ``data_to_send`` first.
        """
        if self._error is not None:
            raise self._error
        try:
            if self._overflow:
                raise HandshakeError("protocol error: the peer sent more than"
                                     f" {self._MAX_BUFFERED} bytes without waiting for an answer")
            return self._advance()
        except ValueError as err:  # every malformed field, from the readers and validators
            error = HandshakeError(f"protocol error: {err}")
        except HandshakeError as err:
            error = err
        self._error = error
        self._failed()
        raise error

    def _failed(self) -> None:
        """Hook: what to send when the handshake fails."""

    def _advance(self) -> object:
        while self._handler is not None:
            body = self._read_message()
            if body is None:
                return None
            event = self._handler(body)
            if event is not None:
                return event
        return None

    def _read_message(self) -> Optional[bytes]:
        """Pop the next complete message body (type byte first), or None if incomplete."""
        if len(self._inbox) < 4:
            return None
        (length,) = struct.unpack_from(">I", self._inbox)
        if not 1 <= length <= MAX_MESSAGE:
            raise self._bad_length(length)
        if len(self._inbox) < 4 + length:
            return None
        body = bytes(self._inbox[4:4 + length])
        del self._inbox[:4 + length]
        return body

    def _bad_length(self, length: int) -> HandshakeError:
        """The error for a message length outside 1..MAX_MESSAGE."""
        return HandshakeError(f"protocol error: message length {length} is outside"
                              f" 1..{MAX_MESSAGE}")

    @staticmethod
    def _expect(body: bytes, kind: int) -> _Reader:
        """A reader over the payload of ``body``, which must be a ``kind`` message."""
        if body[0] == _REFUSE:
            raise _plaintext_refusal(body)
        if body[0] != kind:
            got = _MESSAGE_NAMES.get(body[0], f"message type {body[0]}")
            raise HandshakeError(f"protocol error: expected {_MESSAGE_NAMES[kind]}, got {got}")
        return _Reader(body[1:], _MESSAGE_NAMES[kind])

    def _send(self, body: bytes) -> None:
        self._outbox += _frame(body)

    def _start_encryption(self, shared: bytes, cipher: str) -> None:
        """Derive the handshake keys once both hellos are in the transcript."""
        self._shared, self._cipher = shared, cipher
        keys = _hkdf(shared, self._transcript.digest(), _HANDSHAKE_INFO, 64)
        client_to_server, server_to_client = _Sealer(keys[:32]), _Sealer(keys[32:])
        if self._is_client:
            self._sealer, self._opener = client_to_server, server_to_client
        else:
            self._sealer, self._opener = server_to_client, client_to_server

    def _session_keys(self) -> SessionKeys:
        """Derive the session keys from the final transcript; forget the shared secret."""
        okm = _hkdf(self._shared, self._transcript.digest(), _SESSION_INFO, 72)
        self._shared = b""
        return SessionKeys(okm[:32], okm[32:64], okm[64:72], self._cipher)

    def _associated(self, kind: int) -> bytes:
        """AEAD associated data of the next ``kind`` message: type byte + transcript so far."""
        return bytes([kind]) + self._transcript.digest()

    def _send_sealed(self, kind: int, associated: bytes, fields: List[bytes]) -> None:
        plaintext = b"".join(ssh_string(data) for data in fields)
        self._send(bytes([kind]) + self._sealer.seal(plaintext, associated))

    def _open_sealed(self, body: bytes, kind: int, count: int) -> List[bytes]:
        """The ``count`` string fields of a sealed ``kind`` message."""
        self._expect(body, kind)
        plaintext = self._opener.open(body[1:], self._associated(kind))
        reader = _Reader(plaintext, _MESSAGE_NAMES[kind])
        fields = [reader.string() for _ in range(count)]
        reader.expect_end()
        return fields


_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\r\n")


def _foreign_protocol(data: bytes) -> str:
    """What a peer that is not a moshpit server seems to speak, from its first bytes. Every
    moshpit message starts with a length of at most 64 KiB (bytes 00 00 or 00 01), so text,
    an SSH banner or a TLS record can never be mistaken for one."""
    head = data[:64]
    if head.startswith(b"SSH-"):
        return "it speaks SSH"
    if head.startswith(b"HTTP") or head.lstrip().lower().startswith((b"<!doctype html",
                                                                       b"<html")):
        return "it speaks HTTP"
    if len(head) >= 2 and head[0] in (0x15, 0x16) and head[1] == 0x03:  # TLS alert/handshake
        return "it speaks TLS"
    if all(byte in _TEXT_BYTES for byte in head):  # SMTP, FTP, POP, IMAP, Redis...
        first_line = head.split(b"\n")[0].rstrip(b"\r")
        return f"it sent '{printable(first_line, 60)}'"
    return "unexpected reply"


def _plaintext_refusal(body: bytes) -> HandshakeError:
    """An unauthenticated Refuse: anyone on the path could have sent it, so it is never final."""
    reader = _Reader(body[1:], "Refuse")
    code = reader.text()
    reader.expect_end()
    if code in REFUSAL_CODES and code not in FINAL_CODES:
        return HandshakeError(f"server refused: {code}", code)
    return HandshakeError("protocol error: unexpected unauthenticated refusal")


class ClientHandshake(_Handshake):
    """The client side. ClientHello is queued at once. Events: HostKeyReceived (the caller
    checks the key, then calls accept_host_key(), or offer(keys) and, at KeyAccepted,
    authenticate(signer)), then HandshakeComplete. A refusal raises AuthRefused (final) or
    HandshakeError with ``code`` from next_event."""

    _is_client = True

    def __init__(self, identity: Optional[PrivateKey], request: ClientRequest) -> None:
        """``identity`` may be None and given to accept_host_key() instead: nothing before
        ClientAuth needs it, so a driver can decrypt the key only once the server is
        reached and its host key trusted."""
        super().__init__()
        env = locale_env(request.env)
        if env != request.env:  # a locale setting the server would refuse is not worth failing
            log.debug("not sending %s", ", ".join(sorted(set(request.env) - set(env))))
            request = dataclasses.replace(request, env=env)
        try:
            _check_request(request)
        except ValueError as err:
            raise HandshakeError(f"cannot send the request: {err}") from None
        if request.needs_proof and len(request.resume_secret or b"") != 32:
            raise HandshakeError("cannot resume a session without its 32-byte resume secret")
        self._identity, self._request = identity, request
        self._offered: List[PublicKey] = []  # the ClientOffer's keys, if one was sent
        self._accepted: Optional[PublicKey] = None  # the key the server said it accepts
        self._ephemeral = _Ephemeral()
        self._host_key: Optional[PublicKey] = None
        self._keys: Optional[SessionKeys] = None
        hello = (bytes([_CLIENT_HELLO]) + struct.pack(">H", PROTOCOL_VERSION) + os.urandom(32)
                 + self._ephemeral.public + ssh_string(",".join(CIPHERS).encode()))
        self._transcript.add(hello)
        self._send(hello)
        self._handler = self._on_server_hello

    def accept_host_key(self, identity: Optional[PrivateKey] = None) -> None:
        """Send ClientAuth signed by ``identity`` (default: the constructor's): call once,
        after HostKeyReceived, when the host key is trusted."""
        if self._host_key is None or self._offered or self._keys is not None:
            raise RuntimeError("accept_host_key() is only valid right after HostKeyReceived")
        self.authenticate(identity)

    def offer(self, keys: List[PublicKey]) -> None:
        """Ask which of ``keys`` the server accepts (ClientOffer), instead of signing at once:
        call once, after HostKeyReceived. Next event: KeyAccepted, or a refusal raised."""
        if self._host_key is None or self._offered or self._keys is not None \
                or self._error is not None:
            raise RuntimeError("offer() is only valid right after HostKeyReceived")
        self._offered = list(keys)
        associated = self._associated(_CLIENT_OFFER)
        fields = [self._request.user.encode(), _encode_offer(self._offered)]
        self._transcript.add(*fields)
        self._send_sealed(_CLIENT_OFFER, associated, fields)
        self._handler = self._on_offer_answer

    def authenticate(self, signer=None) -> None:
        """Send ClientAuth signed by ``signer`` (a PrivateKey, or anything with ``public`` and
        ``sign(data)``, such as an ssh-agent key; default: the constructor's identity): after
        HostKeyReceived, or after KeyAccepted with the accepted key. Signing may take long (a
        person confirming); if it raises, the machine is unchanged."""
        accepted = self._accepted
        if self._host_key is None or self._keys is not None or self._error is not None \
                or (self._offered and accepted is None):
            raise RuntimeError("authenticate() is only valid after HostKeyReceived or"
                               " KeyAccepted")
        signer = signer or self._identity
        if signer is None:
            raise RuntimeError("accept_host_key() needs the client's identity")
        if accepted is not None and signer.public != accepted:
            raise RuntimeError("authenticate() must sign with the key the server accepted")
        associated = self._associated(_CLIENT_AUTH)
        fields = _encode_fields(self._request, signer.public.blob)
        signed = self._transcript.digest_with(fields)
        signature = sshsig_sign(signer, SSHSIG_NAMESPACE, signed)
        self._identity = signer
        self._transcript.add(fields)
        proof = b""
        if self._request.needs_proof:
            proof = _resume_proof(self._request.resume_secret, signed)
        self._transcript.add(signature, proof)
        self._send_sealed(_CLIENT_AUTH, associated, [fields, signature, proof])
        self._keys = self._session_keys()
        self._handler = self._on_server_finish

    def heard_nothing(self) -> bool:
        """True while not one byte has come from the server."""
        return self._handler == self._on_server_hello and not self._inbox

    def _bad_length(self, length: int) -> HandshakeError:
        if self._handler == self._on_server_hello:  # the server's very first bytes
            return HandshakeError(f"{NOT_MOSHPIT} ({_foreign_protocol(bytes(self._inbox))})",
                                  NOT_MOSHPIT)
        return super()._bad_length(length)

    def _on_server_hello(self, body: bytes) -> None:
        reader = self._expect(body, _SERVER_HELLO)
        version = reader.uint16()
        reader.take(32)  # server random: used through the transcript
        server_public, cipher = reader.take(32), reader.text()
        reader.expect_end()
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"protocol error: the server speaks protocol version {version},"
                                 f" this client {PROTOCOL_VERSION}: install the same moshpit"
                                 " release on both sides")
        if cipher not in CIPHERS:
            raise HandshakeError("protocol error: the server chose a cipher that was not offered")
        self._transcript.add(body)
        self._start_encryption(self._ephemeral.exchange(server_public), cipher)
        log.debug("ServerHello: protocol version %d, cipher %s", version, cipher)
        self._handler = self._on_server_auth

    def _on_server_auth(self, body: bytes) -> HostKeyReceived:
        host_blob, signature = self._open_sealed(body, _SERVER_AUTH, 2)
        self._transcript.add(host_blob)
        signed = SERVER_CONTEXT + self._transcript.digest()
        self._transcript.add(signature)
        host_key = PublicKey.from_blob(host_blob)
        if not host_key.verify(signature, signed):
            raise HandshakeError("protocol error: the server's signature does not verify"
                                 " (tampering or a man-in-the-middle)")
        log.debug("ServerAuth: host key %s, signature verified", host_key.fingerprint())
        self._host_key = host_key
        self._handler = None
        return HostKeyReceived(host_key)

    def _on_offer_answer(self, body: bytes) -> KeyAccepted:
        if body[:1] == bytes([_SERVER_FINISH]):  # none of the keys: only a refusal is valid
            return self._on_server_finish(body, refusal_only=True)
        (answer,) = self._open_sealed(body, _KEY_ACCEPTED, 1)
        reader = _Reader(answer, "KeyAccepted")
        index = reader.uint16()
        reader.expect_end()
        if index >= len(self._offered):
            raise ValueError("the server accepted a key that was not offered")
        self._transcript.add(answer)
        self._accepted = self._offered[index]
        log.debug("KeyAccepted: key %s", self._accepted.fingerprint())
        self._handler = None
        return KeyAccepted(self._accepted)

    def _on_server_finish(self, body: bytes, refusal_only: bool = False) -> HandshakeComplete:
        (outcome,) = self._open_sealed(body, _SERVER_FINISH, 1)
        reader = _Reader(outcome, "ServerFinish")
        status = reader.uint8()
        if refusal_only and status != _REFUSED:
            raise ValueError("ServerFinish grants a session nobody authenticated for")
        if status == _ACCEPTED:
            grant = _decode_grant(reader)
            log.debug("ServerFinish: session granted, UDP port %d", grant.udp_port)
            self._handler = None
            return HandshakeComplete(grant, self._keys, self._host_key)
        if status == _LISTING and self._request.intent == LIST:
            self._handler = None
            return HandshakeComplete(_decode_listing(reader), self._keys, self._host_key)
        if status != _REFUSED:
            raise ValueError("ServerFinish has an unknown outcome")
        code = reader.text()
        message = reader.string() if reader.remaining() else b""
        reader.expect_end()
        if code in FINAL_CODES:
            raise AuthRefused(code, client_message=message[:MAX_REFUSAL_MESSAGE].decode(
                "utf-8", "replace"))
        if code in REFUSAL_CODES:
            raise HandshakeError(f"server refused: {code}", code)
        raise ValueError("ServerFinish has an unknown refusal code")


class ServerHandshake(_Handshake):
    """The server side. Answers ClientHello with ServerHello + ServerAuth; a ClientOffer
    emits KeysOffered (answer_offer(index or None)); after a valid ClientAuth emits
    AuthRequested, and the caller answers with accept(grant) or refuse(code). A client whose
    signature does not verify, or that signs with another key or user than it offered and
    the server accepted, is refused here (AuthRefused)."""

    def __init__(self, host_key: PrivateKey, peer: tuple = (), local: tuple = ()) -> None:
        super().__init__()
        self._host_key, self._peer, self._local = host_key, peer, local
        self._auth: Optional[AuthInfo] = None
        self._offer: Optional[KeysOffered] = None  # the ClientOffer, if one came
        self._accepted: Optional[PublicKey] = None  # the key answer_offer() accepted
        self._finished = False
        self.hello_received = False  # the driver's cue to switch from the ClientHello deadline
        self._handler = self._on_client_hello

    def accept(self, grant: Union[SessionGrant, SessionListing]) -> None:
        """Grant the session requested in the last AuthRequested (or, for a LIST, answer
        with the listing)."""
        self._require_decision()
        if isinstance(grant, SessionListing):
            if self._auth.request.intent != LIST:
                raise RuntimeError("a listing answers only a LIST request")
            self._finish(_encode_listing(grant))
        else:
            self._finish(_encode_grant(grant))

    def refuse(self, code: str, message: str = "") -> None:
        """Refuse with one of REFUSAL_CODES (anything else is sent as "permission denied"),
        and ``message`` for the user if not empty (cut to MAX_REFUSAL_MESSAGE bytes)."""
        self._require_decision()
        self._finish(_refusal_outcome(code, message))

    def answer_offer(self, index: Optional[int]) -> None:
        """Answer the last KeysOffered: ``index`` of the offered key that may log in (it
        must then sign with exactly that key), or None: no key is authorized, the client is
        refused (the next next_event raises AuthRefused)."""
        offer = self._offer
        if offer is None or self._accepted is not None or self._handler is not None \
                or self._error is not None:
            raise RuntimeError("answer_offer() is only valid right after KeysOffered")
        if index is None:
            self._finish(_refusal_outcome(PERMISSION_DENIED))
            self._error = AuthRefused(
                PERMISSION_DENIED, f"user {offer.user}: none of the {len(offer.keys)} offered"
                " keys is authorized (" + ", ".join(key.fingerprint() for key in offer.keys)
                + ")")
            return
        self._accepted = offer.keys[index]
        answer = struct.pack(">H", index)
        associated = self._associated(_KEY_ACCEPTED)
        self._transcript.add(answer)
        self._send_sealed(_KEY_ACCEPTED, associated, [answer])
        self._handler = self._on_client_auth

    def _require_decision(self) -> None:
        if self._auth is None or self._finished:
            raise RuntimeError("accept()/refuse() are only valid right after AuthRequested")

    def _finish(self, outcome: bytes) -> None:
        self._send_sealed(_SERVER_FINISH, self._associated(_SERVER_FINISH), [outcome])
        self._finished = True

    def _failed(self) -> None:
        if not self._finished:
            self._send(bytes([_REFUSE]) + ssh_string(PROTOCOL_ERROR.encode()))
            self._finished = True

    def _on_client_hello(self, body: bytes) -> None:
        reader = self._expect(body, _CLIENT_HELLO)
        version = reader.uint16()
        reader.take(32)  # client random: used through the transcript
        client_public, offered = reader.take(32), reader.text().split(",")
        reader.expect_end()
        if version < PROTOCOL_VERSION:
            raise HandshakeError(f"protocol error: the client speaks protocol version {version},"
                                 f" this server needs {PROTOCOL_VERSION}: install the same"
                                 " moshpit release on both sides")
        cipher = next((name for name in server_cipher_order() if name in offered), None)
        if cipher is None:
            raise HandshakeError("protocol error: no session cipher in common")
        ephemeral = _Ephemeral()
        shared = ephemeral.exchange(client_public)
        hello = (bytes([_SERVER_HELLO]) + struct.pack(">H", PROTOCOL_VERSION) + os.urandom(32)
                 + ephemeral.public + ssh_string(cipher.encode()))
        self._transcript.add(body, hello)
        self._send(hello)
        self._start_encryption(shared, cipher)
        associated = self._associated(_SERVER_AUTH)
        host_blob = self._host_key.public.blob
        self._transcript.add(host_blob)
        signature = self._host_key.sign(SERVER_CONTEXT + self._transcript.digest())
        self._transcript.add(signature)
        self._send_sealed(_SERVER_AUTH, associated, [host_blob, signature])
        log.debug("ClientHello: protocol version %d, cipher %s", version, cipher)
        self.hello_received = True
        self._handler = self._on_offer_or_auth

    def _on_offer_or_auth(self, body: bytes) -> Union[KeysOffered, AuthRequested]:
        if body[:1] != bytes([_CLIENT_OFFER]):
            return self._on_client_auth(body)
        user, blobs = self._open_sealed(body, _CLIENT_OFFER, 2)
        self._transcript.add(user, blobs)
        name = user.decode("utf-8", "replace")
        if not _USER_RE.fullmatch(name):
            raise ValueError(f"user name {name[:80]!r} is not valid")
        self._offer = KeysOffered(name, _decode_offer(blobs))
        log.debug("ClientOffer: user %s, %d keys", name, len(self._offer.keys))
        self._handler = None
        return self._offer

    def _on_client_auth(self, body: bytes) -> AuthRequested:
        fields, signature, proof = self._open_sealed(body, _CLIENT_AUTH, 3)
        request, client_key = _decode_fields(fields)
        self._transcript.add(fields)
        signed = self._transcript.digest()
        self._transcript.add(signature, proof)
        if len(proof) != (32 if request.needs_proof else 0):
            raise ValueError("the resume proof has the wrong length")
        keys = self._session_keys()
        log.debug("ClientAuth: user %s, key %s, %s, TERM %s, %dx%d", request.user,
                  client_key.fingerprint(), _purpose(request), request.term, request.cols,
                  request.rows)
        self._handler = None
        if self._offer is not None and (client_key != self._accepted
                                        or request.user != self._offer.user):
            self._finish(_refusal_outcome(PERMISSION_DENIED))
            raise AuthRefused(PERMISSION_DENIED,
                              f"user {request.user}: ClientAuth names key"
                              f" {client_key.fingerprint()}, not the accepted offer of"
                              f" {self._accepted.fingerprint()} for {self._offer.user}")
        if not sshsig_verify(client_key, SSHSIG_NAMESPACE, signed, signature):
            self._finish(_refusal_outcome(PERMISSION_DENIED))
            raise AuthRefused(PERMISSION_DENIED,
                              f"user {request.user}: key {client_key.fingerprint()}: the signature"
                              " does not verify (no proof of possession of the key)")
        self._auth = AuthInfo(request.user, client_key, request, keys, self._peer, self._local,
                              proof, signed)
        return AuthRequested(self._auth)


def _purpose(request: ClientRequest) -> str:
    """What a request asks for, for the log."""
    if request.end_session:
        return "ending a session"
    if request.intent:
        return {TAKE_OVER: "taking a session over", LIST: "listing sessions",
                KILL: "killing a session"}[request.intent]
    return "resuming a session" if request.resume_session_id else "new session"


def _refusal_outcome(code: str, message: str = "") -> bytes:
    """A refusal: its code, then the optional message (absent when empty, so a refusal
    without one is what older clients expect)."""
    if code not in REFUSAL_CODES:
        code = PERMISSION_DENIED
    text = message.encode("utf-8", "replace")[:MAX_REFUSAL_MESSAGE]
    return bytes([_REFUSED]) + ssh_string(code.encode()) + (ssh_string(text) if text else b"")


# ---------------------------------------------------------------------------
# Blocking drivers
# ---------------------------------------------------------------------------


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("handshake deadline passed")
    return left


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    if data:
        sock.settimeout(_remaining(deadline))
        sock.sendall(data)


def _send_quietly(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Best effort (a refusal to a peer that may be gone or hostile)."""
    try:
        _send_all(sock, data, deadline)
    except OSError:
        pass


def _exchange(sock: socket.socket, machine: _Handshake, deadline: float,
              until: Callable[[], bool] = lambda: False) -> object:
    """Run ``machine`` over ``sock`` until it has an event (or ``until()`` holds): write what
    it queued, read what it needs. EOFError when the peer closes, socket.timeout at the
    deadline (which bounds the whole exchange, not each read: trickled bytes do not extend it)."""
    while True:
        event = machine.next_event()
        _send_all(sock, machine.data_to_send(), deadline)
        if event is not None or until():
            return event
        sock.settimeout(_remaining(deadline))
        data = sock.recv(_RECV_SIZE)
        if not data:
            raise EOFError("connection closed by the peer")
        machine.receive_data(data)


def _os_reason(err: OSError) -> str:
    """An OSError as a short lower-case reason ("connection refused")."""
    if isinstance(err, socket.timeout):
        return "connection timed out"
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


# How a server handshake ended, as the admission policy weighs it (see AdmissionPolicy).
AUTHENTICATED = "authenticated"  # the client proved possession of an authorized key
AUTHFAIL = "authfail"  # its key or signature was refused
NOAUTH = "noauth"  # it left, or broke the protocol, before authenticating
GRACE_EXCEEDED = "grace-exceeded"  # it missed the ClientHello or the handshake deadline
NEUTRAL = "neutral"  # refused for the server's reasons (busy, stopping): says nothing of it
HELLO_RECEIVED = "hello received"  # progress, not an outcome: the peer is no longer idle
# Progress: the client offered a key authorized for its user and is about to sign; report()
# answers whether it may take confirm_timeout for that (AdmissionPolicy.confirming).
OFFER_ACCEPTED = "offer accepted"
CONFIRM_TIMEOUT_SECS = 60.0  # a person confirming a signature (OpenSSH's LoginGraceTime: 120)
# decide() checks the key first: every refusal but PERMISSION_DENIED comes after a valid key
# (USER_NOT_SERVED: a key of the server's own account).
_OUTCOME_OF_REFUSAL = {PERMISSION_DENIED: AUTHFAIL, USER_NOT_SERVED: AUTHENTICATED,
                       NO_SUCH_SESSION: AUTHENTICATED, SESSION_LIMIT: AUTHENTICATED,
                       USER_SESSION_LIMIT: AUTHENTICATED}


def server_handshake(sock: socket.socket, host_key: PrivateKey,
                     decide: Callable[[AuthInfo], SessionGrant],
                     timeout: float = 10.0, hello_timeout: Optional[float] = None,
                     report: Callable[[str], object] = lambda outcome: None,
                     acceptable: Callable[[str, List[PublicKey]], Optional[int]]
                     = lambda user, keys: None,
                     confirm_timeout: float = CONFIRM_TIMEOUT_SECS) -> Optional[AuthInfo]:
    """Run one handshake on an accepted socket, within ``timeout`` seconds in all and
    ``hello_timeout`` (default: the same) for the whole ClientHello, so a silent peer or one
    trickling a byte a second frees its slot early.

    A ClientOffer is answered by ``acceptable(user, keys)``: the index of the first key
    authorized for ``user``, or None (refused: "permission denied"). Once a key is accepted,
    if ``report(OFFER_ACCEPTED)`` returns true, the client has ``confirm_timeout`` seconds
    from then (if that is later than the deadline) to send its signature: a person may have
    to confirm it. Nobody gets that time before showing a key authorized for the user.

    ``decide(auth)`` returns a SessionGrant or raises AuthRefused(code, log_reason). Returns
    the AuthInfo once the grant has been sent, else None: bad or slow peers, tampering and
    refusals are logged (with the key fingerprint, never key material), never raised.
    ``report`` gets HELLO_RECEIVED once the ClientHello is in, then how it ended
    (AUTHENTICATED, AUTHFAIL, NOAUTH, GRACE_EXCEEDED or NEUTRAL), once.
    The caller closes ``sock``.
    """
    started = time.monotonic()
    deadline = started + timeout
    hello_deadline = min(deadline, started + (hello_timeout or timeout))
    try:
        peer, local = sock.getpeername(), sock.getsockname()
    except OSError:
        report(NOAUTH)
        return None
    who = format_addr(peer)
    machine = ServerHandshake(host_key, peer, local)
    outcome = NOAUTH
    try:
        _exchange(sock, machine, hello_deadline, until=lambda: machine.hello_received)
        report(HELLO_RECEIVED)
        event = _exchange(sock, machine, deadline)
        if isinstance(event, KeysOffered):
            index = acceptable(event.user, event.keys)
            machine.answer_offer(index)
            if index is not None and report(OFFER_ACCEPTED):
                deadline = max(deadline, time.monotonic() + confirm_timeout)
                timeout = deadline - started
            event = _exchange(sock, machine, deadline)
        auth = event.auth
        try:
            grant = decide(auth)
        except AuthRefused as refusal:
            outcome = _OUTCOME_OF_REFUSAL.get(refusal.code, NEUTRAL)
            machine.refuse(refusal.code, refusal.client_message)
            _send_quietly(sock, machine.data_to_send(), deadline)
            log.warning("refused %s@%s (key %s): %s", auth.user, who,
                        auth.client_key.fingerprint(), refusal.log_reason)
            return None
        # Reported before the grant goes out, so the client's next connection (a resume)
        # already finds its source trusted.
        report(AUTHENTICATED)
        outcome = ""
        machine.accept(grant)
        _send_all(sock, machine.data_to_send(), deadline)
    except AuthRefused as refusal:
        outcome = AUTHFAIL
        _send_quietly(sock, machine.data_to_send(), deadline)
        log.warning("refused %s: %s", who, refusal.log_reason)
        return None
    except HandshakeError as err:
        _send_quietly(sock, machine.data_to_send(), deadline)
        log.info("handshake from %s failed: %s", who, err)
        return None
    except socket.timeout:
        outcome = GRACE_EXCEEDED
        if machine.hello_received:
            log.info("handshake from %s timed out after %g s", who, timeout)
        else:
            log.info("handshake from %s timed out: no complete ClientHello within %g s", who,
                     hello_deadline - started)
        return None
    except EOFError:
        log.info("handshake from %s: the client closed the connection", who)
        return None
    except OSError as err:
        log.info("handshake from %s failed: %s", who, _os_reason(err))
        return None
    finally:
        if outcome:
            report(outcome)
    log.info("accepted %s@%s (key %s), %s", auth.user, who, auth.client_key.fingerprint(),
             _purpose(auth.request))
    return auth


def send_refusal(sock: socket.socket, code: str) -> None:
    """Answer a connection with a plaintext refusal (e.g. SERVER_BUSY) and close it; never
    blocks. What the client already sent is read first, so the close is a FIN and not a
    reset that could destroy the refusal before the client reads it."""
    try:
        sock.setblocking(False)
        sock.recv(MAX_MESSAGE + 4)  # a ClientHello, if it has arrived
    except OSError:  # BlockingIOError: nothing to read
        pass
    try:
        sock.send(_refusal_frame(code))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# Admission: who may start a handshake (sans-IO policy, then its thread shell)
# ---------------------------------------------------------------------------

MAX_TRACKED_SOURCES = 65536  # per book (penalties, trust); as sshd's max-sources4/6
# Handshakes of one source allowed the confirmation time at once (AdmissionPolicy.confirming)
MAX_CONFIRMING_PER_SOURCE = 2
# A handshake open this long without a complete ClientHello may lose its slot to a newcomer
# when the server is full: a client sends its ClientHello as soon as it is connected.
IDLE_EVICT_SECS = 0.5
_PENALISED = " (source_penalties)"


@functools.lru_cache(maxsize=4096)  # a flood repeats a few addresses; parsing them is not free
def source_of(address: str, v4_prefix: int = 32, v6_prefix: int = 64) -> str:
    """The source a connection from ``address`` counts against: its IPv4 /``v4_prefix`` or
    IPv6 /``v6_prefix`` network ("2001:db8::/64"). One IPv6 host usually owns a whole /64, so
    counting addresses there would count nothing. An IPv4-mapped address (a dual-stack
    listener) counts as IPv4; text that is no IP address is a source of its own."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network((ip, prefix), strict=False))


@dataclass(frozen=True)
class AdmissionLimits:
    """The settings of an AdmissionPolicy, each named after its ``mps.*`` config key.

    ``startups`` is sshd's MaxStartups (start, rate %, full) for sources not trusted;
    ``penalties`` sshd's PerSourcePenalties in seconds (authfail, noauth, grace-exceeded,
    max, min); ``netblock`` the (IPv4, IPv6) prefix lengths that make one source;
    ``startups_per_sec`` the rate at which untrusted sources may start handshakes."""

    max_handshakes: int = 64
    startups: Tuple[int, int, int] = (16, 30, 48)
    max_per_source: int = 8
    netblock: Tuple[int, int] = (32, 64)
    penalties: Dict[str, int] = field(default_factory=lambda: dict(PENALTY_DEFAULTS))
    trusted_secs: float = 604800.0
    startups_per_sec: float = 100.0  # 0: no limit


@dataclass(eq=False)
class Admission:
    """A decision on one connection: its ``source``, whether it is ``admitted`` (a slot is
    taken until ``AdmissionPolicy.finished``), whether the source is ``trusted``, for a
    refusal the ``reason`` (for the log only: the peer just hears "server busy") and
    whether it is ``penalised``, and the idle handshake it ``evicts`` to make room (the
    caller aborts that one's connection).
    ``opened``, ``hello`` (its ClientHello is in) and ``confirming`` are the policy's own
    bookkeeping."""

    source: str
    admitted: bool
    trusted: bool = False
    reason: str = ""
    penalised: bool = False  # refused as a penalised source: not worth an answer
    evicts: Optional[Admission] = None
    opened: float = 0.0
    hello: bool = False
    confirming: bool = False  # allowed the confirmation time (AdmissionPolicy.confirming)


class _Book:
    """Sources with an expiry (a penalty's end, a trust's end) and a mark (a penalty past
    ``min``): at most ``capacity`` of them, the least recently updated forgotten first, so a
    spray of sources costs O(1) each and bounded memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: Dict[str, Tuple[float, bool]] = {}

    def get(self, source: str, now: float) -> Tuple[float, bool]:
        """(seconds until ``source``'s entry expires, its mark); (0, False) if it has none."""
        until, marked = self._entries.get(source, (0.0, False))
        if until <= now:
            self._entries.pop(source, None)
            return 0.0, False
        return until - now, marked

    def set(self, source: str, seconds: float, now: float, marked: bool = False) -> None:
        self._entries.pop(source, None)
        if seconds > 0:
            self._entries[source] = (now + seconds, marked)
            if len(self._entries) > self.capacity:
                del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)


class AdmissionPolicy:
    """Decides, before any cryptographic work, whether a connection may run a handshake.
    Sans-IO: the caller passes the clock reading, injects the randomness and does the
    locking (one decision at a time).

    In order, a connection is refused when
    1. its source already has ``max_per_source`` handshakes in progress, so a few addresses
       cannot take every slot; a source is an IPv4 address or an IPv6 /64 (``netblock``);
    2. its source is penalised (unless trusted): each handshake of its that failed
       authentication, broke off before it, or ran past a deadline adds seconds to its
       penalty (sshd's PerSourcePenalties); the penalty counts down in real time, is capped
       at ``max``, and refuses the source while it exceeds ``min``, so one mistyped key or
       dropped connection costs nothing while a source that keeps idling or guessing is
       turned away at accept();
    3. ``max_handshakes`` are in progress (the hard cap: threads, memory);
    4. (unless trusted) ``full`` are in progress, or at random as that nears: from
       ``start`` in progress with ``rate`` % probability, rising linearly to 100 % at
       ``full`` (sshd's MaxStartups). The slots from ``full`` to ``max_handshakes`` stay
       for trusted sources.
    5. (unless trusted) more than ``startups_per_sec`` handshakes a second were started
       (a token bucket holding one second's worth): a ClientHello costs the server an X25519
       exchange and a signature, and a flood from more sources than penalties can catch
       (a botnet, a big IPv6 allocation) must not take the CPU live sessions need.
    But when the load (3. or 4.) is all that stands in the way, the newcomer takes the slot
    of the oldest handshake from an untrusted source that has been open ``idle_evict_secs``
    without a complete ClientHello (a client sends it the moment it is connected), and that
    one is evicted: idle connections hold slots only while nobody else wants them.

    Trusted sources are those from which a client proved an authorized key in the last
    ``trusted_secs``: a resume comes from a client that authenticated before, usually from
    the address it used then, so this is how resumes (and returning users) are favoured over
    new anonymous load without reading anything from the peer first. Why source addresses
    can be believed: a TCP connection completes its three-way handshake, so an attacker off
    the path cannot use an address it does not receive packets for. The price is NAT: users
    behind one address (or one /64) share its per-source cap and its penalties, and an
    attacker behind the same NAT as a trusted user is trusted too. So trust only lifts the
    penalties and the random early drop; the per-source cap holds for everyone, and an
    attacker can never take more than its source's share. A resume from a new network is
    anonymous load until it succeeds (the handshake stays unauthenticated until ClientAuth).
    Both books are bounded (MAX_TRACKED_SOURCES), forgetting the least recently updated.
    """

    def __init__(self, limits: AdmissionLimits = AdmissionLimits(),
                 random_fraction: Callable[[], float] = random.random,
                 max_tracked: int = MAX_TRACKED_SOURCES,
                 idle_evict_secs: float = IDLE_EVICT_SECS) -> None:
        self.limits = limits
        self.idle_evict_secs = idle_evict_secs
        self._waiting: Dict[int, Admission] = {}  # admitted, no ClientHello yet: oldest first
        start, self._rate, full = limits.startups
        self._full = min(full, limits.max_handshakes)  # FULL above the hard cap acts as it
        self._start = min(start, self._full)
        self._random = random_fraction
        self._in_progress: Dict[str, int] = {}
        self.active = 0  # handshakes in progress
        self._penalties = _Book(max_tracked)  # marked: past ``min``, so refused
        self._trusted = _Book(max_tracked)
        self._tokens = self._burst = max(1.0, limits.startups_per_sec)
        self._refilled: Optional[float] = None
        self._confirming: Dict[str, int] = {}  # per source: handshakes given the longer time
        self._confirming_untrusted = 0

    def source(self, address: str) -> str:
        return source_of(address, *self.limits.netblock)

    def trusted(self, source: str, now: float) -> bool:
        return self._trusted.get(source, now)[0] > 0

    def penalty_left(self, source: str, now: float) -> float:
        """Seconds for which ``source`` is refused (0: not penalised past ``min``)."""
        left, refused = self._penalties.get(source, now)
        return left if refused else 0.0

    def admit(self, address: str, now: float) -> Admission:
        """Decide on a connection from ``address``; an admitted one holds a slot."""
        source = self.source(address)
        trusted = self.trusted(source, now)
        reason, for_room = self._refusal(source, trusted, now)
        victim = self._idle_victim(now) if for_room else None
        if reason and victim is None:
            return Admission(source, False, trusted, reason,
                             penalised=reason.endswith(_PENALISED))
        if not trusted and not self._take_token(now):
            return Admission(source, False, trusted, "more than"
                             f" {self.limits.startups_per_sec:g} handshakes a second"
                             " (max_startups_per_sec)")
        if victim is not None:  # its slot becomes the newcomer's
            self._waiting.pop(id(victim))
            self._release(victim.source)
        admission = Admission(source, True, trusted, evicts=victim, opened=now)
        self._in_progress[source] = self._in_progress.get(source, 0) + 1
        self.active += 1
        self._waiting[id(admission)] = admission
        return admission

    def authenticated(self, source: str, now: float) -> None:
        """A client from ``source`` proved an authorized key: trust the source from now."""
        self._trusted.set(source, self.limits.trusted_secs, now)
        self._penalties.set(source, 0, now)  # a mistyped key before does not count

    def confirming(self, admission: Admission) -> bool:
        """``admission``'s client offered a key authorized for its user and is about to sign:
        may it take the confirmation time (a person confirming in ssh-agent, a hardware key)
        instead of the handshake deadline? A public key is no secret, so this is bounded
        like any pre-authentication resource: at most MAX_CONFIRMING_PER_SOURCE per source
        and, from untrusted sources, a quarter of ``max_handshakes`` in all (the rest stay
        for everyone else); a handshake that then times out is penalised as grace-exceeded.
        True: it may (and holds that allowance until ``finished``)."""
        source = admission.source
        if admission.confirming or not admission.hello:
            return admission.confirming
        if self._confirming.get(source, 0) >= MAX_CONFIRMING_PER_SOURCE:
            return False
        if not admission.trusted:
            if self._confirming_untrusted >= max(1, self.limits.max_handshakes // 4):
                return False
            self._confirming_untrusted += 1
        self._confirming[source] = self._confirming.get(source, 0) + 1
        admission.confirming = True
        return True

    def hello(self, admission: Admission) -> None:
        """``admission``'s ClientHello is complete: it is no longer idle."""
        admission.hello = True
        self._waiting.pop(id(admission), None)

    def _take_token(self, now: float) -> bool:
        rate = self.limits.startups_per_sec
        if rate <= 0:
            return True
        if self._refilled is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _idle_victim(self, now: float) -> Optional[Admission]:
        for waiting in self._waiting.values():
            if waiting.opened > now - self.idle_evict_secs:
                return None  # the rest are younger still
            if not waiting.trusted:
                return waiting
        return None

    def _release(self, source: str) -> None:
        left = self._in_progress.pop(source) - 1
        if left:
            self._in_progress[source] = left
        self.active -= 1

    def _refusal(self, source: str, trusted: bool, now: float) -> Tuple[str, bool]:
        """Why not (or ""), and whether evicting an idle handshake would make room."""
        if self._in_progress.get(source, 0) >= self.limits.max_per_source:
            return (f"{self._in_progress[source]} handshakes from {source} in progress"
                    " (max_handshakes_per_source)"), False
        if not trusted:
            penalty = self.penalty_left(source, now)
            if penalty:
                return f"{source} is penalised for another {penalty:.0f} s{_PENALISED}", False
        if self.active >= self.limits.max_handshakes:
            return f"{self.active} handshakes in progress (max_handshakes)", True
        if trusted:
            return "", False
        if self.active >= self._full:
            return f"{self.active} handshakes in progress (max_startups full)", True
        if self.active >= self._start:
            drop = self._rate + (100 - self._rate) * (self.active - self._start) / (
                self._full - self._start)
            if self._random() * 100 < drop:
                return (f"{self.active} handshakes in progress: random early drop at"
                        f" {drop:.0f} % (max_startups)"), True
        return "", False

    def finished(self, admission: Admission, outcome: str, now: float) -> str:
        """Release ``admission``'s slot and weigh how its handshake ended (an outcome such
        as AUTHENTICATED or NOAUTH). Returns a line for the log when this made its source
        refused, else ""."""
        source = admission.source
        if self._waiting.pop(id(admission), None) is not None or admission.hello:
            self._release(source)  # (an evicted one's slot went to its successor)
        if admission.confirming:
            admission.confirming = False
            left = self._confirming.pop(source) - 1
            if left:
                self._confirming[source] = left
            if not admission.trusted:
                self._confirming_untrusted -= 1
        if outcome == AUTHENTICATED:
            self.authenticated(source, now)
            return ""
        seconds = self.limits.penalties.get(outcome, 0)
        if admission.trusted or seconds <= 0:
            return ""
        left, refused = self._penalties.get(source, now)
        penalty = min(self.limits.penalties["max"], left + seconds)
        newly_refused = not refused and penalty > self.limits.penalties["min"]
        self._penalties.set(source, penalty, now, refused or newly_refused)
        if newly_refused:
            return f"{source} penalised for {penalty:.0f} s after a handshake ending in {outcome}"
        return ""


def _reset(sock: socket.socket) -> None:
    """Close with a reset: no answer, no FIN exchange, no TIME_WAIT left on this side."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class HandshakeLimiter:
    """The thread shell around an AdmissionPolicy: decides at accept() (before any read, key
    exchange or signature), runs each admitted handshake in its own thread, aborts the
    connection of one the policy evicts, and feeds each handshake's progress and outcome
    back. A refused connection hears "server busy" (send_refusal) and costs only the accept;
    refusals are logged at most ``_LOG_LINES_PER_WINDOW`` lines per ``_LOG_WINDOW_SECS``,
    then counted, so a flood cannot flood the log too. spawn() is for one thread (the
    accept loop); the policy is shared with the handshake threads under a lock."""

    _LOG_WINDOW_SECS = 10.0
    _LOG_LINES_PER_WINDOW = 5

    def __init__(self, policy: Optional[AdmissionPolicy] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or AdmissionPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._sockets: Dict[int, socket.socket] = {}  # id(Admission) -> its connection
        self._window_end = 0.0
        self._logged = self._unlogged = 0

    @property
    def active(self) -> int:
        """Handshakes running now."""
        with self._lock:
            return self.policy.active

    def spawn(self, sock: socket.socket,
              handler: Callable[[socket.socket, Callable[[str], object]], object]) -> bool:
        """Run ``handler(sock, report)`` in a new thread, or answer "server busy" when the
        policy refuses. The handler calls ``report(HELLO_RECEIVED)`` once the ClientHello is
        in, maybe ``report(OFFER_ACCEPTED)`` (answered: may it take the confirmation time),
        then ``report(outcome)`` (as server_handshake does). The socket is closed and
        the slot released when the handler returns. True if started."""
        try:
            address = sock.getpeername()[0]
        except OSError:
            sock.close()
            return False
        with self._lock:
            admission = self.policy.admit(address, self._clock())
            if admission.admitted:
                self._sockets[id(admission)] = sock
            if admission.evicts is not None:
                # Under the lock: the victim's thread closes its socket only after taking
                # it, so this cannot hit a reused descriptor. Its thread sees the end.
                self._abort(self._sockets[id(admission.evicts)])
        if admission.evicts is not None:
            log.info("evicted an idle handshake from %s to make room", admission.evicts.source)
        if not admission.admitted:
            self._log_refusal(address, admission.reason)
            if admission.penalised:
                _reset(sock)  # the cheapest way out for a source that keeps misbehaving
            else:
                send_refusal(sock, SERVER_BUSY)  # maybe a real client: tell it why
            return False
        threading.Thread(target=self._run, args=(sock, admission, handler), name="handshake",
                         daemon=True).start()
        return True

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _log_refusal(self, address: str, reason: str) -> None:
        now = self._clock()
        if now >= self._window_end:
            if self._unlogged:
                log.warning("refused %d more connections in the last %g s (pre-auth limits)",
                            self._unlogged, self._LOG_WINDOW_SECS)
            self._window_end, self._logged, self._unlogged = now + self._LOG_WINDOW_SECS, 0, 0
        if self._logged < self._LOG_LINES_PER_WINDOW:
            self._logged += 1
            log.warning("refused a connection from %s: %s", address, reason)
        else:
            self._unlogged += 1

    def _run(self, sock: socket.socket, admission: Admission,
             handler: Callable[[socket.socket, Callable[[str], object]], object]) -> None:
        outcomes: List[str] = []

        def report(event: str) -> Optional[bool]:
            with self._lock:
                if event == HELLO_RECEIVED:
                    self.policy.hello(admission)
                    return None
                if event == OFFER_ACCEPTED:
                    return self.policy.confirming(admission)
                if event == AUTHENTICATED:  # at once: the grant has not been sent yet
                    self.policy.authenticated(admission.source, self._clock())
                outcomes.append(event)

        try:
            handler(sock, report)
        except Exception:  # a bug in the handler must not leak the slot or kill the server
            log.exception("handshake handler failed")
        finally:
            with self._lock:
                del self._sockets[id(admission)]
                change = self.policy.finished(admission, outcomes[0] if outcomes else NEUTRAL,
                                              self._clock())
            sock.close()
            if change:
                log.warning("%s", change)


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to ``host`` (IPv4 or IPv6), trying each address it resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise HandshakeError(f"could not resolve host name {host}: {_os_reason(err)}") from None
    except UnicodeError:  # IDNA encoding of an impossible name
        raise HandshakeError(f"could not resolve host name {host}: invalid host name") from None
    last_error: OSError = socket.timeout()
    for index, (family, kind, proto, _, addr) in enumerate(infos):
        sock = socket.socket(family, kind, proto)
        try:
            # Share what is left fairly, so one black-holed address cannot use up the deadline.
            sock.settimeout(_remaining(deadline) / (len(infos) - index))
            sock.connect(addr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    raise HandshakeError(_connect_failure(format_addr((host, port)), last_error))


def _connect_failure(where: str, err: OSError) -> str:
    """What a failed TCP connect means for the user, and what to check."""
    if isinstance(err, ConnectionRefusedError):
        return f"nothing listens on {where} (is mps running? is the port right: -s PORT)"
    if isinstance(err, socket.timeout):
        return (f"cannot connect to {where}: connection timed out (is the host up? a firewall"
                " may drop TCP to that port)")
    if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return (f"cannot connect to {where}: {_os_reason(err)} (is the address right? is the"
                " network up?)")
    return f"cannot connect to {where}: {_os_reason(err)}"


def _peer_closed(sock: socket.socket) -> bool:
    """True if the peer has closed or reset the connection (without consuming input)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _NoAnswer(Exception):
    """The peer accepted the connection and never sent a byte: a moshpit server answers the
    ClientHello at once, so this is an overloaded server or a service that waits for
    something else (an HTTP server waits for a request line)."""


class _ClosedDuringPrompt(Exception):
    """The server gave up while the user was answering (the host key question, or the
    passphrase of the client's key); the host key was accepted."""

    def __init__(self, host_key: PublicKey) -> None:
        super().__init__("the server closed the connection during a prompt")
        self.host_key = host_key


def _explain(err: HandshakeError, host: str, port: int, user: str,
             tried: str = "") -> HandshakeError:
    """The one-line error a user sees for a failed client handshake (``tried``: the keys
    offered, for a plain "permission denied")."""
    message = getattr(err, "client_message", "")
    if err.code == PERMISSION_DENIED and message:  # the key was good; the server says why not
        return AuthRefused(err.code, f"permission denied for {user}@{host}; the server says:\n"
                           + printable_lines(message.strip("\n"), PRINTABLE_LIMIT),
                           message)
    if err.code == PERMISSION_DENIED:
        return AuthRefused(err.code, f"permission denied (publickey) for {user}@{host}"
                           + (f"; tried {tried}" if tried else ""))
    if err.code == NO_SUCH_SESSION:
        return AuthRefused(err.code, f"the session on {host} no longer exists"
                                     " (server restarted or session expired)")
    if err.code == USER_NOT_SERVED:
        return AuthRefused(err.code, f"the moshpit server on {host} runs without root and serves"
                                     f" only the user it runs as, not {user}; connect as that"
                                     " user, or run mps.py as root to serve every user")
    if err.code == USER_SESSION_LIMIT:
        return AuthRefused(err.code, f"too many sessions for {user} on {host} (the server's"
                                     " max_sessions_per_user); end one of them, or wait until"
                                     " a detached one expires")
    if err.code == SESSION_LIMIT:
        return AuthRefused(err.code, f"the moshpit server on {host} has all the sessions it"
                                     " allows (max_sessions); try again when one has ended, or"
                                     " ask its admin to raise the limit")
    if err.code == SERVER_BUSY:
        return HandshakeError(f"server busy: {host} port {port} has too many connections"
                              " in progress; try again later", err.code)
    if err.code == SHUTTING_DOWN:
        return HandshakeError(f"server {host} is shutting down", err.code)
    if err.code == NOT_MOSHPIT:
        return HandshakeError(f"{format_addr((host, port))} is {err}", err.code)
    return HandshakeError(f"{err} (server {host} port {port})", err.code)


class LazyIdentity:
    """The client's key, obtained on first use and at most once: ``load()`` may ask for a
    passphrase, so client_handshake calls get() only once the server is reached and its
    host key trusted, and a repeated or resumed handshake reuses the key.

    What client_handshake asks of an identity (moshpit_agent.KeyRing answers the same, for
    a key file plus the keys of ssh-agent): ``offers()``, the public keys to offer first
    ([]: none, sign at once); ``signer(key)``, what signs for the accepted key (None: the
    only one), a PrivateKey or anything with ``public`` and ``sign(data)``; ``tried()``,
    what was offered, for the "permission denied" line."""

    def __init__(self, load: Callable[[], PrivateKey]) -> None:
        self._load = load
        self._key: Optional[PrivateKey] = None

    def get(self) -> PrivateKey:
        if self._key is None:
            self._key = self._load()
        return self._key

    def offers(self) -> List[PublicKey]:
        return []

    def signer(self, key: Optional[PublicKey]) -> PrivateKey:
        return self.get()

    def tried(self) -> str:
        return ""


def client_handshake(host: str, port: int, identity: Union[PrivateKey, LazyIdentity, object],
                     request: ClientRequest, verify_host_key: Callable[[PublicKey], None],
                     timeout: float = 10.0, keep_connection: bool = False) -> ClientResult:
    """Connect to ``host`` ``port`` and run the client handshake.

    ``verify_host_key(key)`` returns to trust the key or raises moshpit_trust.HostKeyError
    (passed on as it is); it may ask the user. ``identity`` is the client's key, or a
    LazyIdentity loaded only after the host key is trusted: a mistyped or unreachable host,
    or an impostor, never costs the user a passphrase. Time spent in either does not count
    against ``timeout``; if the server gave up meanwhile, the handshake is repeated once on
    a new connection (the same host key is then trusted and the key reused, without asking
    again). ``identity`` may also be a moshpit_agent.KeyRing (see LazyIdentity): its keys
    are offered first and only the accepted one signs; the time the signer takes (a person
    confirming in ssh-agent) does not count against ``timeout`` either.
    Raises AuthRefused (final), HostKeyError (final) or HandshakeError (with
    ``code``), each with a one-line message; whatever loading the identity or signing
    raises passes through. ``keep_connection``: the result's ``connection`` is the
    connection, left open (the caller closes it); the server keeps its end for the session
    it granted.
    """
    if not hasattr(identity, "offers"):  # a key (or a signer) itself
        identity = LazyIdentity(lambda key=identity: key)
    trusted: Optional[PublicKey] = None
    for _attempt in range(2):
        deadline = time.monotonic() + timeout
        sock = _connect(host, port, deadline)
        kept = None
        try:
            result = _client_attempt(sock, identity, request, verify_host_key, trusted, timeout)
            if keep_connection:
                kept = result.connection = sock
            return result
        except _ClosedDuringPrompt as closed:
            log.info("%s port %d closed the connection while the user was answering a"
                     " prompt; reconnecting", host, port)
            trusted = closed.host_key
        except HandshakeError as err:
            raise _explain(err, host, port, request.user, identity.tried()) from None
        except _NoAnswer:
            raise HandshakeError(f"{format_addr((host, port))} did not answer in {timeout:g} s"
                                 " (an overloaded moshpit server, or not one at all: is the"
                                 " port right: -s PORT)") from None
        except socket.timeout:
            raise HandshakeError(f"handshake with {host} port {port} timed out after"
                                 f" {timeout:g} s") from None
        except EOFError:
            raise HandshakeError(f"{host} port {port} closed the connection during the"
                                 " handshake") from None
        except OSError as err:
            raise HandshakeError(f"connection to {host} port {port} failed during the"
                                 f" handshake: {_os_reason(err)}") from None
        finally:
            if kept is None:
                sock.close()
    raise HandshakeError(f"{host} port {port} closed the connection twice before the"
                         " handshake finished")


def _client_attempt(sock: socket.socket, identity, request: ClientRequest,
                    verify_host_key: Callable[[PublicKey], None],
                    trusted: Optional[PublicKey], timeout: float) -> ClientResult:
    machine = ClientHandshake(None, request)
    started = time.monotonic()
    deadline = started + timeout
    try:
        host_key = _exchange(sock, machine, deadline).host_key
        rtt = time.monotonic() - started
    except socket.timeout:
        if machine.heard_nothing():
            raise _NoAnswer() from None
        raise
    if host_key != trusted:
        verify_host_key(host_key)
    offers = identity.offers()  # only now: the server is real and its host key trusted
    accepted = None
    if offers:
        if _peer_closed(sock):
            raise _ClosedDuringPrompt(host_key)
        machine.offer(offers[:MAX_OFFERED_KEYS])
        accepted = _exchange(sock, machine, time.monotonic() + timeout).key
    machine.authenticate(identity.signer(accepted))  # may prompt, or wait for the agent
    if _peer_closed(sock):
        raise _ClosedDuringPrompt(host_key)
    deadline = time.monotonic() + timeout  # the user's think time is not the server's fault
    done = _exchange(sock, machine, deadline)
    return ClientResult(done.grant, done.keys, sock.getpeername(), done.host_key, rtt,
                        unread=machine.unread())
