"""moshpit agent: a client of ssh-agent (draft-miller-ssh-agent, RFC 9987), and the keys a
client logs in with (its key file first, then the agent's Ed25519 keys).

Wire: a Unix socket named by ``SSH_AUTH_SOCK``; every message is ``uint32 length || byte type
|| body`` (1 <= length <= MAX_AGENT_MESSAGE); one request at a time, one answer each::

    SSH_AGENTC_REQUEST_IDENTITIES 11  (no body)
        -> SSH_AGENT_IDENTITIES_ANSWER 12  uint32 n, n x (string key blob, string comment)
    SSH_AGENTC_SIGN_REQUEST 13  string key blob, string data, uint32 flags (0)
        -> SSH_AGENT_SIGN_RESPONSE 14  string signature blob ("ssh-ed25519", 64 bytes)
    any request -> SSH_AGENT_FAILURE 5 (28, 30 and 102 too, as OpenSSH's agent_failed)

The codec (``encode_message``, ``FrameDecoder``, ``decode_*``) is pure: bytes in, values out,
every length bounded and every malformation an AgentProtocolError; agent forwarding reuses it
to cut a byte stream into whole messages. ``AgentClient`` is the thin blocking shell (one
connection per request, each bounded in time). ``AgentKey`` signs like a PrivateKey (so
``moshpit_keys.sshsig_sign`` works with it: the agent signs the SSHSIG signed-data blob),
and ``KeyRing`` is what the handshake asks which keys to offer and which to sign with.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from moshpit import MoshpitError, printable
from moshpit_keys import KEY_TYPE, KeyFileError, PrivateKey, PublicKey, WireReader, ssh_string
import moshpit_keys

__all__ = [
    "SSH_AGENT_FAILURE", "SSH_AGENTC_REQUEST_IDENTITIES", "SSH_AGENT_IDENTITIES_ANSWER",
    "SSH_AGENTC_SIGN_REQUEST", "SSH_AGENT_SIGN_RESPONSE", "FAILURE_TYPES", "MAX_AGENT_MESSAGE",
    "MAX_SIGN_DATA", "MAX_AGENT_KEYS", "AgentError", "AgentProtocolError", "AgentUnavailable",
    "AgentRefused", "encode_message", "FrameDecoder", "encode_sign_request",
    "decode_sign_request", "decode_identities", "encode_identities", "decode_signature",
    "AgentIdentity", "AgentClient", "AgentKey", "KeyRing",
]

log = logging.getLogger("moshpit.agent")

SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
# OpenSSH's agent_failed(): plain failure and the three legacy/extension failure codes.
FAILURE_TYPES = frozenset((SSH_AGENT_FAILURE, 28, 30, 102))
MAX_AGENT_MESSAGE = 256 * 1024  # OpenSSH's limit on a reply (authfd.c MAX_AGENT_REPLY_LEN)
MAX_SIGN_DATA = 1 << 20  # and on the data of a sign request
MAX_AGENT_KEYS = 2048  # and on the keys of an identities answer
MAX_COMMENT = 1024  # bytes of a key comment we keep (for messages)

LIST_TIMEOUT_SECS = 10.0  # an agent answers a listing at once; a hung one must not hang us
SIGN_TIMEOUT_SECS = 120.0  # a person confirming (ssh-add -c) or touching a hardware key
SLOW_SIGN_SECS = 1.0  # after this, tell the user the agent is waiting for them


class AgentError(MoshpitError):
    """Something about ssh-agent the user can act on (one line)."""


class AgentProtocolError(AgentError):
    """The peer sent something that is not a well-formed agent message."""


class AgentUnavailable(AgentError):
    """``SSH_AUTH_SOCK`` names no agent that answers (missing, stale or dead socket)."""


class AgentRefused(AgentError):
    """The agent answered a sign request with a failure."""


# ---------------------------------------------------------------------------
# Codec (pure)
# ---------------------------------------------------------------------------


def encode_message(kind: int, body: bytes = b"") -> bytes:
    """One framed agent message: ``uint32 length || byte kind || body``."""
    if not 0 <= kind <= 255 or 1 + len(body) > MAX_AGENT_MESSAGE:
        raise ValueError("agent message type or length out of range")
    return struct.pack(">IB", 1 + len(body), kind) + body


class FrameDecoder:
    """Cuts a byte stream into whole agent messages ``(kind, body)``, in any chunking.

    A length of 0 or above ``max_length`` is an AgentProtocolError at once (before the body
    arrives), so a peer can never make us buffer more than one bounded message."""

    def __init__(self, max_length: int = MAX_AGENT_MESSAGE) -> None:
        self.max_length = max_length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        """Add ``data``; return the messages it completed (possibly none)."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from(">I", self._buffer)
            if not 1 <= length <= self.max_length:
                raise AgentProtocolError(f"agent message length {length} is outside"
                                         f" 1..{self.max_length}")
            if len(self._buffer) < 4 + length:
                break
            messages.append((self._buffer[4], bytes(self._buffer[5:4 + length])))
            del self._buffer[:4 + length]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buffer)


def _reader(body: bytes, what: str) -> WireReader:
    return WireReader(body, what)


def encode_sign_request(key_blob: bytes, data: bytes, flags: int = 0) -> bytes:
    """The framed SIGN_REQUEST for ``data`` with the key ``key_blob``."""
    if len(data) > MAX_SIGN_DATA:
        raise ValueError(f"sign data longer than {MAX_SIGN_DATA} bytes")
    return encode_message(SSH_AGENTC_SIGN_REQUEST,
                          ssh_string(key_blob) + ssh_string(data) + struct.pack(">I", flags))


def decode_sign_request(body: bytes) -> Tuple[bytes, bytes, int]:
    """(key blob, data, flags) of a SIGN_REQUEST body; AgentProtocolError if malformed."""
    try:
        reader = _reader(body, "agent sign request")
        blob, data, flags = reader.string(), reader.string(), reader.uint32()
        reader.expect_end()
    except ValueError as err:
        raise AgentProtocolError(f"malformed agent message: {err}") from None
    if len(data) > MAX_SIGN_DATA:
        raise AgentProtocolError(f"agent sign request data longer than {MAX_SIGN_DATA} bytes")
    return blob, data, flags


@dataclass(frozen=True)
class AgentIdentity:
    """One key the agent holds: its blob, comment, and ``public`` if it is Ed25519 (else None:
    moshpit cannot use it)."""

    blob: bytes
    comment: str
    public: Optional[PublicKey]

    @property
    def key_type(self) -> str:
        try:
            return _reader(self.blob, "agent key").text()
        except ValueError:
            return "unknown"


def encode_identities(identities: List[Tuple[bytes, str]]) -> bytes:
    """The framed IDENTITIES_ANSWER body for (blob, comment) pairs (tests, forwarding)."""
    body = struct.pack(">I", len(identities)) + b"".join(
        ssh_string(blob) + ssh_string(comment.encode()) for blob, comment in identities)
    return encode_message(SSH_AGENT_IDENTITIES_ANSWER, body)


def decode_identities(body: bytes) -> List[AgentIdentity]:
    """The keys of an IDENTITIES_ANSWER body, in the agent's order."""
    try:
        reader = _reader(body, "agent identities answer")
        count = reader.uint32()
        if count > MAX_AGENT_KEYS:
            raise ValueError(f"{count} keys (at most {MAX_AGENT_KEYS})")
        identities = []
        for _ in range(count):
            blob, comment = reader.string(), reader.string()
            text = comment[:MAX_COMMENT].decode("utf-8", "replace")
            try:
                public: Optional[PublicKey] = PublicKey.from_blob(blob, text)
            except ValueError:  # another key type (or a garbled blob): listed, never used
                public = None
            identities.append(AgentIdentity(blob, text, public))
        reader.expect_end()
    except ValueError as err:
        raise AgentProtocolError(f"malformed agent message: {err}") from None
    return identities


def decode_signature(body: bytes, key: PublicKey, data: bytes) -> bytes:
    """The raw 64-byte Ed25519 signature of a SIGN_RESPONSE body, checked against ``key`` and
    ``data`` (the signature type is checked too, as OpenSSH's sshkey_check_sigtype): an
    agent that answers with anything else is an AgentProtocolError."""
    try:
        reader = _reader(body, "agent sign response")
        inner = _reader(reader.string(), "agent signature")
        reader.expect_end()
        sig_type, raw = inner.text(), inner.string()
        inner.expect_end()
    except ValueError as err:
        raise AgentProtocolError(f"malformed agent message: {err}") from None
    if sig_type != KEY_TYPE or not key.verify(raw, data):
        raise AgentProtocolError(f"ssh-agent returned a signature ({printable(sig_type, 40)})"
                                 f" that does not verify with key {key.fingerprint()}")
    return raw


def _answer(kind: int, body: bytes, expected: int, what: str) -> bytes:
    """``body`` if the answer is of type ``expected``; AgentRefused for a failure."""
    if kind in FAILURE_TYPES:
        raise AgentRefused(f"ssh-agent refused to {what}")
    if kind != expected:
        raise AgentProtocolError(f"ssh-agent answered {what} with message type {kind}")
    return body


# ---------------------------------------------------------------------------
# Blocking shell
# ---------------------------------------------------------------------------


class AgentClient:
    """Talks to the ssh-agent at ``path``: one connection per request, each bounded in time
    (a hung agent costs at most the timeout, never a hang)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def from_environ(cls, environ: Optional[Dict[str, str]] = None) -> Optional[AgentClient]:
        """The agent ``SSH_AUTH_SOCK`` names, or None if it is unset or empty."""
        path = (os.environ if environ is None else environ).get("SSH_AUTH_SOCK", "")
        return cls(path) if path else None

    def where(self) -> str:
        return f"SSH_AUTH_SOCK={printable(self.path, 120)}"

    def identities(self) -> List[AgentIdentity]:
        """Every key the agent lists (a locked agent lists none)."""
        kind, body = self._request(encode_message(SSH_AGENTC_REQUEST_IDENTITIES),
                                   LIST_TIMEOUT_SECS)
        return decode_identities(_answer(kind, body, SSH_AGENT_IDENTITIES_ANSWER,
                                         "list its keys"))

    def sign(self, key: PublicKey, data: bytes,
             on_wait: Optional[Callable[[], None]] = None) -> bytes:
        """The raw Ed25519 signature of ``data`` by ``key``. ``on_wait`` is called once if the
        agent has not answered after SLOW_SIGN_SECS (it is waiting for a person). A refusal
        is an AgentRefused saying why as far as can be told: the agent is locked, the key is
        gone, or the signature was refused (confirmation denied)."""
        try:
            kind, body = self._request(encode_sign_request(key.blob, data), SIGN_TIMEOUT_SECS,
                                       on_wait)
            return decode_signature(_answer(kind, body, SSH_AGENT_SIGN_RESPONSE, "sign"),
                                    key, data)
        except AgentRefused:
            raise AgentRefused(self._why_refused(key)) from None

    def _why_refused(self, key: PublicKey) -> str:
        name = _describe(key)
        try:
            listed = self.identities()
        except AgentError:
            listed = None
        if listed == []:
            return (f"ssh-agent ({self.where()}) is locked (or lost its keys): it refused to"
                    f" sign with {name}; unlock it with ssh-add -X")
        if listed is not None and all(found.public != key for found in listed):
            return f"ssh-agent no longer holds {name} (ssh-add it again)"
        return (f"ssh-agent refused to sign with {name}: the confirmation was denied (or it"
                " could not ask: SSH_ASKPASS; or the key is limited to some hosts: ssh-add -h)")

    def _request(self, message: bytes, timeout: float,
                 on_wait: Optional[Callable[[], None]] = None) -> Tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        sock = self._connect()
        try:
            sock.settimeout(timeout)
            sock.sendall(message)
            decoder = FrameDecoder()
            slow_at = time.monotonic() + SLOW_SIGN_SECS if on_wait else None
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise AgentError(f"ssh-agent ({self.where()}) did not answer within"
                                     f" {timeout:g} s")
                wake = deadline if slow_at is None else min(deadline, slow_at)
                readable, _, _ = select.select([sock], [], [], max(0.0, wake - now))
                if not readable:
                    if slow_at is not None and time.monotonic() >= slow_at:
                        slow_at = None
                        on_wait()
                    continue
                data = sock.recv(65536)
                if not data:
                    raise AgentUnavailable(f"ssh-agent ({self.where()}) closed the connection"
                                           " without answering")
                messages = decoder.feed(data)
                if messages:
                    if len(messages) > 1 or decoder.pending:
                        raise AgentProtocolError("ssh-agent sent more than one answer")
                    return messages[0]
        except OSError as err:
            raise AgentUnavailable(f"ssh-agent ({self.where()}) failed: {_reason(err)}") from None
        finally:
            sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(LIST_TIMEOUT_SECS)
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            hint = ("is ssh-agent running? a stale SSH_AUTH_SOCK is left from an old login"
                    if err.errno in (errno.ENOENT, errno.ECONNREFUSED) else "check SSH_AUTH_SOCK")
            raise AgentUnavailable(f"cannot reach ssh-agent at {self.where()}:"
                                   f" {_reason(err)} ({hint})") from None
        return sock


def _reason(err: OSError) -> str:
    if isinstance(err, socket.timeout):
        return "timed out"
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def _describe(key: PublicKey) -> str:
    comment = f" '{printable(key.comment, 60)}'" if key.comment else ""
    return f"key{comment} ({key.fingerprint()})"


class AgentKey:
    """An Ed25519 key held by the agent, used like a PrivateKey: ``public`` and ``sign``."""

    def __init__(self, agent: AgentClient, public: PublicKey,
                 on_wait: Optional[Callable[[], None]] = None) -> None:
        self.agent, self.public, self._on_wait = agent, public, on_wait

    def sign(self, data: bytes) -> bytes:
        return self.agent.sign(self.public, data, self._on_wait)

    def __repr__(self) -> str:
        return f"AgentKey({self.public!r})"


# ---------------------------------------------------------------------------
# The client's keys: file first, then the agent
# ---------------------------------------------------------------------------

@dataclass
class _Candidate:
    """A key the client may log in with: its public half, where it comes from, and how to get
    something that signs with it (None: the agent holds the private half)."""

    public: PublicKey
    label: str
    load: Optional[Callable[[], PrivateKey]] = None
    key: Optional[PrivateKey] = None


class KeyRing:
    """The keys a client offers, in order: the configured key file (``path``), then the
    agent's Ed25519 keys (a key in both is offered once, and signed by whichever needs no
    prompt). ``load()`` loads the key file the way the front end wants (passphrase prompt,
    the offer to generate a missing key). ``path`` may name a public key file (``-i
    key.pub``, as ssh): its private half must then be in the agent. ``on_wait(key)`` is called
    when the agent takes more than a second to sign (it waits for a person). At most
    ``max_offers`` keys are offered (the handshake's MAX_OFFERED_KEYS).

    The handshake calls ``offers()`` once the host key is trusted, then ``signer(key)`` for
    the key the server accepted; once a login succeeds the ring keeps to that key (a resume
    must use the same key). With no agent key to offer and only the key file, ``offers()`` is
    empty: the handshake then signs at once with the file key (no extra round trip)."""

    def __init__(self, path: str, public_path: str, load: Callable[[], PrivateKey],
                 agent: Optional[AgentClient],
                 on_wait: Callable[[PublicKey], None] = lambda key: None,
                 max_offers: int = 16) -> None:
        self.path, self.public_path, self.max_offers = path, public_path, max_offers
        self._load, self.agent, self._on_wait = load, agent, on_wait
        self._candidates: Optional[List[_Candidate]] = None
        self._agent_problem = ""  # why the agent offered nothing, for the final error
        self.chosen: Optional[_Candidate] = None

    def offers(self) -> List[PublicKey]:
        """The public keys to offer, in order; [] means: sign at once with ``signer(None)``."""
        if self.chosen is not None:
            return [] if self.chosen.load or self.chosen.key else [self.chosen.public]
        candidates = self._gather()
        if len(candidates) == 1 and (candidates[0].key or candidates[0].load):
            return []
        return [candidate.public for candidate in candidates]

    def signer(self, key: Optional[PublicKey]):
        """Something with ``public`` and ``sign(data)`` for ``key`` (None: the only candidate)."""
        candidates = [self.chosen] if self.chosen is not None else self._gather()
        candidate = candidates[0] if key is None else next(
            (found for found in candidates if found.public == key), None)
        if candidate is None:
            raise AgentError(f"the server accepted {_describe(key)}, which was not offered")
        self.chosen = candidate
        if candidate.key is None and candidate.load is not None:
            candidate.key = candidate.load()
            if candidate.key.public != candidate.public:
                raise KeyFileError(f"{self.public_path} is not the public key of {self.path};"
                                   " rebuild it with mp_keygen.py pubkey")
        if candidate.key is not None:
            return candidate.key
        if self.agent is None:
            raise AgentError(f"the private key of {candidate.label} is not here: add it to"
                             " ssh-agent (ssh-add), SSH_AUTH_SOCK is not set")
        return AgentKey(self.agent, candidate.public, lambda: self._on_wait(candidate.public))

    def tried(self) -> str:
        """What was offered, for "permission denied": labels and fingerprints, and why the
        agent added nothing if it did not."""
        candidates = self._candidates or []
        notes = [", ".join(f"{found.label} ({found.public.fingerprint()})"
                           for found in candidates)]
        if candidates and all(found.label != self.path for found in candidates) \
                and not self.path.endswith(".pub"):
            notes.append(f"no key file {self.path}")
        return "; ".join(note for note in notes + [self._agent_problem] if note)

    def _gather(self) -> List[_Candidate]:
        if self._candidates is not None:
            return self._candidates
        file_candidate, need_agent = self._file_candidate()
        agent_keys = self._agent_keys(need_agent)
        if file_candidate is not None:
            in_agent = any(found.public == file_candidate.public for found in agent_keys)
            public_only = file_candidate.key is None and file_candidate.load is None
            if public_only and not in_agent and need_agent:
                raise AgentError(f"the private key of {file_candidate.label} is not in"
                                 f" ssh-agent ({self.agent.where()}): ssh-add it")
            if public_only and not in_agent:  # a .pub left without its private key:
                file_candidate = None  # the agent's keys may do (as ssh)
            elif in_agent and file_candidate.key is None:
                file_candidate.load = None  # the agent signs it: no passphrase to ask
        candidates = [file_candidate] if file_candidate is not None else []
        for identity in agent_keys:
            if file_candidate is not None and identity.public == file_candidate.public:
                continue
            if len(candidates) == self.max_offers:
                log.info("offering only the first %d keys", self.max_offers)
                break
            candidates.append(_Candidate(identity.public,
                                         f"agent key '{printable(identity.comment, 60)}'"))
        if not candidates:
            # Nothing at all: the front end says what to do (a key to generate, or a stray
            # .pub that it never pairs with a new key).
            key = self._load()
            candidates = [_Candidate(key.public, self.path, key=key)]
        self._candidates = candidates
        return candidates

    def _file_candidate(self) -> Tuple[Optional[_Candidate], bool]:
        """The key file's candidate (None: no file), and whether the agent must hold it (``-i``
        naming a .pub); a private key file that is gone while its .pub stays gives a
        candidate only the agent can sign, if it holds it."""
        path = self.path
        public_only = path if path.endswith(".pub") else (
            path + ".pub" if not os.path.lexists(path) and os.path.lexists(path + ".pub")
            else None)
        if public_only is not None:  # only the agent can sign it; a named .pub must be there
            return (_Candidate(moshpit_keys.load_public_key(public_only), public_only),
                    public_only == path)
        if not os.path.lexists(path):
            return None, False
        if not moshpit_keys.private_key_is_encrypted(path):
            key = self._load()
            return _Candidate(key.public, path, key=key), False
        try:  # its public half without the passphrase: ask for it only if the server wants it
            public = moshpit_keys.load_public_key(self.public_path)
        except KeyFileError:
            key = self._load()
            return _Candidate(key.public, path, key=key), False
        return _Candidate(public, path, load=self._load), False

    def _agent_keys(self, needed: bool) -> List[AgentIdentity]:
        if self.agent is None:
            if needed:
                raise AgentError(f"the private key of {self.path} must be in ssh-agent, but"
                                 " SSH_AUTH_SOCK is not set (start ssh-agent and ssh-add it)")
            return []
        try:
            listed = self.agent.identities()
        except AgentError as err:
            if needed:
                raise
            log.info("%s", err)
            self._agent_problem = str(err)
            return []
        usable = [identity for identity in listed if identity.public is not None]
        log.debug("ssh-agent lists %d keys, %d of them Ed25519", len(listed), len(usable))
        if not listed:
            self._agent_problem = (f"ssh-agent ({self.agent.where()}) lists no keys: it is"
                                   " locked (ssh-add -X unlocks it) or empty (ssh-add adds"
                                   " keys)")
            if needed:
                raise AgentError(f"cannot use {self.path}: {self._agent_problem}")
        elif not usable:
            self._agent_problem = (f"ssh-agent holds no Ed25519 key (only"
                                   f" {', '.join(sorted({i.key_type for i in listed}))})")
        return usable
