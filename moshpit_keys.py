"""moshpit keys: Ed25519 identity/host keys, public key lines, fingerprints, key files.

Public key blob: the SSH wire encoding ``string "ssh-ed25519" || string key32``.
Public key line: ``moshpit <base64(blob)> comment`` (or OpenSSH's ``ssh-ed25519 ...``, accepted
wherever a public key is read). Fingerprint: ``SHA256:`` + unpadded base64 of SHA-256(blob),
exactly what ``ssh-keygen -l`` prints.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from moshpit import MoshpitError

log = logging.getLogger("moshpit.keys")

KEY_TYPE = "ssh-ed25519"
LINE_KIND = "moshpit"
MAX_LINE = 8192  # longest public key line we parse (an ed25519 line is ~100 bytes)
MAX_AUTHORIZED_KEYS = 1 << 20  # bytes; bounds memory on a hostile authorized_keys


class KeyFileError(MoshpitError):
    """A key file is missing, unreadable, unsafe or malformed; the message names the file."""


class PassphraseRequired(KeyFileError):
    """The private key is encrypted and no passphrase was given: ask the user and retry."""


class WrongPassphrase(KeyFileError):
    """The passphrase does not decrypt the private key (or the file is corrupted)."""


# ---------------------------------------------------------------------------
# SSH wire encoding
# ---------------------------------------------------------------------------


def ssh_string(data: bytes) -> bytes:
    """SSH wire ``string``: uint32 big-endian length, then the bytes."""
    return struct.pack(">I", len(data)) + data


class WireReader:
    """Bounds-checked reader of SSH wire data; every malformation is a ValueError."""

    def __init__(self, data: bytes, what: str = "data") -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        """The next ``n`` raw bytes."""
        if n > len(self._data) - self._pos:
            raise ValueError(f"{self._what} is truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def uint32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def string(self) -> bytes:
        return self.take(self.uint32())

    def text(self) -> str:
        """A string field that must be ASCII (key types, cipher and KDF names)."""
        raw = self.string()
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{self._what} has a non-ASCII name field") from None

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def expect_end(self) -> None:
        if self.remaining():
            raise ValueError(f"{self._what} has {self.remaining()} unexpected trailing bytes")


# ---------------------------------------------------------------------------
# Public and private keys
# ---------------------------------------------------------------------------


class PublicKey:
    """An Ed25519 public key plus its free-text comment (``user@host``).

    Equality and hashing use the key bytes only: the comment is a label, not identity.
    """

    def __init__(self, raw: bytes, comment: str = "") -> None:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise ValueError("an Ed25519 public key is exactly 32 bytes")
        self.raw = raw
        self.comment = comment

    @classmethod
    def from_raw(cls, raw: bytes, comment: str = "") -> PublicKey:
        return cls(bytes(raw), comment)

    @classmethod
    def from_blob(cls, blob: bytes, comment: str = "") -> PublicKey:
        """Parse the SSH wire blob; anything but a well-formed ssh-ed25519 blob is ValueError."""
        reader = WireReader(blob, "public key blob")
        key_type = reader.text()
        if key_type != KEY_TYPE:
            raise ValueError(_unsupported_type(key_type))
        raw = reader.string()
        reader.expect_end()
        if len(raw) != 32:
            raise ValueError("public key blob holds a key of the wrong length")
        return cls(raw, comment)

    @classmethod
    def from_line(cls, line: str) -> PublicKey:
        """Parse ``moshpit|ssh-ed25519 <base64> [comment]``; garbage raises ValueError."""
        key = parse_public_key_line(line)
        if key is None:
            raise ValueError("no public key on this line (blank or a comment)")
        return key

    @property
    def blob(self) -> bytes:
        return ssh_string(KEY_TYPE.encode()) + ssh_string(self.raw)

    def fingerprint(self) -> str:
        """``SHA256:<unpadded base64>``, identical to ``ssh-keygen -l``."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def to_line(self, kind: str = LINE_KIND) -> str:
        """The public key line; ``kind="ssh-ed25519"`` gives OpenSSH's form."""
        if kind not in (LINE_KIND, KEY_TYPE):
            raise ValueError(f"unknown public key line kind {kind!r}")
        line = f"{kind} {base64.b64encode(self.blob).decode('ascii')}"
        return f"{line} {self.comment}" if self.comment else line

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is a valid Ed25519 signature of ``data``; never raises."""
        if not isinstance(signature, bytes) or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, bytes(data))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.fingerprint()} {self.comment!r})"


class PrivateKey:
    """An Ed25519 private key; ``.public`` carries the comment saved with it."""

    def __init__(self, seed: bytes, comment: str = "") -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise ValueError("an Ed25519 private key seed is exactly 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        raw_public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = PublicKey(raw_public, comment)

    @classmethod
    def generate(cls, comment: str = "") -> PrivateKey:
        return cls(os.urandom(32), comment)

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed (what key files store); never log it."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of ``data``."""
        return self._key.sign(bytes(data))

    def __repr__(self) -> str:
        # Deliberately shows only public information.
        return f"PrivateKey(public={self.public!r})"


# ---------------------------------------------------------------------------
# Public key lines and authorized_keys
# ---------------------------------------------------------------------------

_KNOWN_OTHER_TYPES = ("ssh-rsa", "ssh-dss", "ecdsa-sha2-", "sk-", "ssh-ed448", "rsa-sha2-")


def _unsupported_type(key_type: str) -> str:
    """Error text for a key of a type moshpit does not use."""
    if key_type.startswith(_KNOWN_OTHER_TYPES):
        return f"{key_type} keys are not supported: moshpit uses Ed25519 keys only"
    return f"unknown key type {key_type[:40]!r}: expected 'moshpit' or 'ssh-ed25519'"


def parse_public_key_line(line: str) -> PublicKey | None:
    """Parse one public key line; None for a blank or ``#`` comment line.

    Accepts ``moshpit <b64> [comment]`` and ``ssh-ed25519 <b64> [comment]``; anything
    else (other key types, bad base64, a blob that is not ssh-ed25519) raises ValueError.
    """
    if len(line) > MAX_LINE:
        raise ValueError(f"line is too long ({len(line)} characters)")
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    fields = line.split(None, 2)
    kind = fields[0]
    if kind not in (LINE_KIND, KEY_TYPE):
        if kind.startswith("-----BEGIN"):
            raise ValueError("this is a private key (PEM) file, not a public key line")
        raise ValueError(_unsupported_type(kind))
    if len(fields) < 2:
        raise ValueError(f"'{kind}' is not followed by a base64 key")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None
    comment = fields[2].strip() if len(fields) == 3 else ""
    return PublicKey.from_blob(blob, comment)


def read_authorized_keys(path: str) -> list[PublicKey]:
    """All keys in an authorized_keys-style file; bad lines are skipped with a warning.

    The file itself being unreadable or oversized is a KeyFileError (the caller decides
    whether that means "nobody is authorized").
    """
    data = _read_bounded(path, MAX_AUTHORIZED_KEYS)
    keys = []
    for lineno, raw_line in enumerate(data.split(b"\n"), 1):
        try:
            key = parse_public_key_line(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            log.warning("%s:%d: skipped: not UTF-8 text", path, lineno)
            continue
        except ValueError as err:
            log.warning("%s:%d: skipped: %s", path, lineno, err)
            continue
        if key is not None:
            keys.append(key)
    return keys


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _read_bounded(path: str, limit: int) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes, or raise KeyFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > limit:
        raise KeyFileError(f"{path}: file is too large to be a key file (over {limit} bytes)")
    return data


def _mp_dir(home: str | None) -> str:
    return os.path.join(home if home is not None else os.path.expanduser("~"), ".mp")


def default_identity_paths(home: str | None = None) -> tuple[str, str]:
    """The client identity ``(~/.mp/id_ed25519, ~/.mp/id_ed25519.pub)``."""
    priv = os.path.join(_mp_dir(home), "id_ed25519")
    return priv, priv + ".pub"


def default_host_key_paths(home: str | None = None) -> tuple[str, str]:
    """The server host key ``(~/.mp/mps_host_ed25519_key, ....pub)``."""
    priv = os.path.join(_mp_dir(home), "mps_host_ed25519_key")
    return priv, priv + ".pub"
