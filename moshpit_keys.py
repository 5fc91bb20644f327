"""moshpit keys: Ed25519 identity/host keys, public key lines, fingerprints, key files, SSHSIG.

Public key blob: the SSH wire encoding ``string "ssh-ed25519" || string key32``.
Public key line: ``moshpit <base64(blob)> comment`` (or OpenSSH's ``ssh-ed25519 ...``, accepted
wherever a public key is read). Fingerprint: ``SHA256:`` + unpadded base64 of SHA-256(blob),
and randomart: OpenSSH's "drunken bishop" over that digest; both exactly as ``ssh-keygen -lv``.

Private key files (all PEM-style armored base64, wrapped at 70 columns):

* Unencrypted: OpenSSH's own format (``-----BEGIN OPENSSH PRIVATE KEY-----``, PROTOCOL.key:
  ``"openssh-key-v1\0"``, cipher and KDF "none", one ssh-ed25519 key, check ints, comment,
  padding 1, 2, 3, ...), so ``ssh-keygen -y`` and ``ssh-add`` read what we write and we read
  what ``ssh-keygen -t ed25519 -N ""`` writes.
* Passphrase-protected, written by moshpit (``-----BEGIN MOSHPIT ENCRYPTED PRIVATE KEY-----``)::

      byte[15] "moshpit-key-v1\0"
      string   kdfname      "scrypt"
      string   kdfoptions   string salt (16 bytes) || uint32 log2(N) || uint32 r || uint32 p
      string   ciphername   "chacha20-poly1305"   (RFC 8439 AEAD)
      string   nonce        12 random bytes
      string   ciphertext   AEAD(key, nonce, plaintext, aad = every byte before this field)

  where key = scrypt(passphrase, salt, N=2^16, r=8, p=1) (64 MiB, memory-hard; reading
  accepts 2^15 <= N and at most 1 GiB) and plaintext = the binary unencrypted OpenSSH key
  above. The header is authenticated, so tampering with it fails like a wrong passphrase.
  We write this rather than OpenSSH's bcrypt format because the bcrypt KDF is not in the
  standard library or ``cryptography``: an envelope readable on every host moshpit runs on
  beats one that needs an optional module.
* Passphrase-protected OpenSSH keys (kdf "bcrypt"; ciphers aes256-ctr, aes256-gcm@openssh.com,
  chacha20-poly1305@openssh.com) are read when the optional ``bcrypt`` module is installed,
  so an existing encrypted ``~/.ssh/id_ed25519`` works; without it the error says so.

Every malformed input ends as a ValueError inside the parsers and as a KeyFileError naming
the file at the file-level API: never any other exception.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import hashlib
import logging
import os
import re
import socket
import stat
import struct
import tempfile
from typing import List, Optional, Tuple

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.poly1305 import Poly1305

from moshpit import (
    CLIENT_KEY_FILE,
    HOST_KEY_FILE,
    MoshpitError,
    make_private_dirs,
    mp_dir,
    program_command,
)

__all__ = [
    "KEY_TYPE", "LINE_KIND", "PUBLIC_FORMATS", "MAX_LINE", "MAX_AUTHORIZED_KEYS", "MAX_KEY_FILE",
    "KeyFileError", "KeyFileExists", "PassphraseRequired", "WrongPassphrase", "ssh_string",
    "WireReader", "PublicKey", "PrivateKey", "parse_public_key_line", "read_authorized_keys",
    "parse_authorized_keys", "OPENSSH_LABEL", "MOSHPIT_LABEL", "SCRYPT_LOG2_N", "SCRYPT_R",
    "SCRYPT_P", "load_private_key", "private_key_is_encrypted", "save_private_key",
    "public_key_bytes", "save_public_key", "default_comment", "create_key_pair", "load_public_key",
    "default_identity_paths", "default_host_key_paths", "sshsig_sign", "sshsig_verify",
    "sshsig_armor", "sshsig_unarmor",
]

log = logging.getLogger("moshpit.keys")

KEY_TYPE = "ssh-ed25519"
LINE_KIND = "moshpit"
# --format choices for public key lines: moshpit's own, or OpenSSH's (ssh-keygen -l reads it).
PUBLIC_FORMATS = {"moshpit": LINE_KIND, "openssh": KEY_TYPE}
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_LINE = 8192  # longest public key line we parse (an ed25519 line is ~100 bytes)
MAX_AUTHORIZED_KEYS = 1 << 20  # bytes; bounds memory on a hostile authorized_keys
MAX_KEY_FILE = 1 << 16  # bytes; an ed25519 key file is well under 1 KiB


class KeyFileError(MoshpitError):
    """A key file is missing, unreadable, unsafe or malformed; the message names the file."""


class KeyFileExists(KeyFileError):
    """Refusing to write a key file because something already exists at its path."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} already exists")
        self.path = path


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


def _as_text(data: bytes, encoding: str) -> str:
    """Decode a key file or line; binary data (undecodable or with NULs) is a ValueError."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise ValueError("binary data, not a key file")
    return text


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
        # Comments come from files and peers and end up on terminals and in one-line files:
        # control characters (escape codes, newlines) become "?".
        self.comment = _CONTROL_CHARS.sub("?", comment)

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

    def randomart(self) -> str:
        """The 11-line randomart box of ``ssh-keygen -lv`` (no trailing newline)."""
        return _randomart(hashlib.sha256(self.blob).digest(), "[ED25519 256]", "[SHA256]")

    def matches_fingerprint(self, text: str) -> bool:
        """Does a user-supplied fingerprint (``SHA256:...``, prefix optional) name this key?"""
        text = text.strip()
        return self.fingerprint() in (text, "SHA256:" + text)

    def matches_randomart(self, text: str) -> bool:
        """Does pasted randomart show this key? Whitespace between and around rows is free
        (pastes lose line breaks and gain indentation); inside a row every cell counts."""
        rest = text
        for row in self.randomart().split("\n"):
            rest = rest.lstrip()
            if not rest.startswith(row):
                return False
            rest = rest[len(row):]
        return not rest.strip()

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


# OpenSSH sshkey_fingerprint_randomart(): a bishop starts in the middle of a 17x9 board and
# makes four diagonal moves per digest byte (two bits each, low bits first), sliding along
# the walls; each visit bumps the square's symbol. S marks the start, E the end.
_ART_WIDTH, _ART_HEIGHT = 17, 9
_ART_SYMBOLS = " .o+=*BOX@%&#/^SE"


def _randomart(digest: bytes, title: str, footer: str) -> str:
    end = len(_ART_SYMBOLS) - 1  # "E"
    start = end - 1  # "S"; ordinary visits saturate just below it, at "^"
    field = [[0] * _ART_WIDTH for _ in range(_ART_HEIGHT)]
    x, y = _ART_WIDTH // 2, _ART_HEIGHT // 2
    for byte in digest:
        for _ in range(4):
            x = min(max(x + (1 if byte & 1 else -1), 0), _ART_WIDTH - 1)
            y = min(max(y + (1 if byte & 2 else -1), 0), _ART_HEIGHT - 1)
            if field[y][x] < start - 1:
                field[y][x] += 1
            byte >>= 2
    field[_ART_HEIGHT // 2][_ART_WIDTH // 2] = start
    field[y][x] = end

    def border(label: str) -> str:
        left = (_ART_WIDTH - len(label)) // 2
        return "+" + "-" * left + label + "-" * (_ART_WIDTH - left - len(label)) + "+"

    rows = ["|" + "".join(_ART_SYMBOLS[v] for v in row) + "|" for row in field]
    return "\n".join([border(title), *rows, border(footer)])


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

_KNOWN_OTHER_TYPES = ("ssh-rsa", "ssh-dss", "ecdsa-sha2-", "sk-", "ssh-ed448")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9@._-]{1,64}")


def _unsupported_type(key_type: str) -> str:
    """Error text for a key of a type moshpit does not use. Untrusted names are shown with
    repr() unless plainly safe, so a hostile file cannot put escape codes on a terminal."""
    if key_type.startswith(_KNOWN_OTHER_TYPES) and _PLAIN_NAME.fullmatch(key_type):
        return f"{key_type} keys are not supported: moshpit uses Ed25519 keys only"
    return f"unknown key type {key_type[:40]!r}: expected 'moshpit' or 'ssh-ed25519'"


def parse_public_key_line(line: str) -> Optional[PublicKey]:
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
            raise ValueError("this is a private key, not a public key (use the .pub file)")
        raise ValueError(_unsupported_type(kind))
    if len(fields) < 2:
        raise ValueError(f"'{kind}' is not followed by a base64 key")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None
    comment = fields[2].strip() if len(fields) == 3 else ""
    return PublicKey.from_blob(blob, comment)


def read_authorized_keys(path: str) -> List[PublicKey]:
    """All keys in an authorized_keys-style file; bad lines are skipped with a warning.

    The file itself being unreadable or oversized is a KeyFileError (the caller decides
    whether that means "nobody is authorized").
    """
    return parse_authorized_keys(_read_bounded(path, MAX_AUTHORIZED_KEYS), path)


def parse_authorized_keys(data: bytes, source: str) -> List[PublicKey]:
    """All keys in the bytes of an authorized_keys-style file (already read, e.g. from an fd
    checked by moshpit_trust); bad lines are skipped with a warning naming ``source``."""
    keys = []
    for lineno, raw_line in enumerate(data.split(b"\n"), 1):
        try:
            key = parse_public_key_line(_as_text(raw_line, "utf-8"))
        except ValueError as err:
            log.warning("%s:%d: skipped: %s", source, lineno, err)
            continue
        if key is not None:
            keys.append(key)
    return keys


# ---------------------------------------------------------------------------
# Private key formats (see the module docstring)
# ---------------------------------------------------------------------------

OPENSSH_LABEL = "OPENSSH PRIVATE KEY"
MOSHPIT_LABEL = "MOSHPIT ENCRYPTED PRIVATE KEY"
_OPENSSH_MAGIC = b"openssh-key-v1\0"
_ENVELOPE_MAGIC = b"moshpit-key-v1\0"
_ARMOR_WIDTH = 70  # what ssh-keygen writes
_NEED_PASSPHRASE = "the key is encrypted: a passphrase is needed"
_WRONG_PASSPHRASE = "wrong passphrase (or the key file is corrupted)"

SCRYPT_LOG2_N = 16  # what we write: 2^16 * r * 128 bytes = 64 MiB, ~0.2 s
SCRYPT_R, SCRYPT_P = 8, 1
_SCRYPT_MIN_LOG2_N = 15  # DESIGN 3: never weaker than N = 2^15
_SCRYPT_MAX_MEMORY = 1 << 30  # refuse files that would make us allocate more


def _armor(label: str, data: bytes) -> bytes:
    b64 = base64.b64encode(data).decode("ascii")
    body = [b64[i:i + _ARMOR_WIDTH] for i in range(0, len(b64), _ARMOR_WIDTH)]
    return "\n".join([f"-----BEGIN {label}-----", *body, f"-----END {label}-----", ""]).encode()


_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,64})-----")


_PUBLIC_NOT_PRIVATE = ("this is a public key, not a private key (give the private key file, "
                       "usually the same name without .pub)")


def _looks_public(head: bytes) -> bool:
    """Does a file start like a public key line (a .pub given where a private key goes)?"""
    return head.lstrip().startswith((LINE_KIND.encode() + b" ", KEY_TYPE.encode() + b" "))


def _unarmor(data: bytes) -> Tuple[str, List[str]]:
    """Split a PEM-style file into its label and body lines (not yet decoded)."""
    lines = [line.strip() for line in _as_text(data, "ascii").splitlines() if line.strip()]
    if not lines:
        raise ValueError("file is empty")
    begin = _BEGIN.fullmatch(lines[0])
    if not begin:
        if _looks_public(data):
            raise ValueError(_PUBLIC_NOT_PRIVATE)
        raise ValueError("not a private key file (no '-----BEGIN ...-----' line)")
    label = begin.group(1)
    if lines[-1] != f"-----END {label}-----":
        raise ValueError(f"truncated: no '-----END {label}-----' line")
    return label, lines[1:-1]


def _decode_b64_body(lines: List[str]) -> bytes:
    try:
        return base64.b64decode("".join(lines), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("corrupted: the key is not valid base64") from None


def _encode_openssh(key: PrivateKey) -> bytes:
    """Binary unencrypted openssh-key-v1 (PROTOCOL.key), the plaintext of every format."""
    check = os.urandom(4)
    section = (
        check
        + check
        + ssh_string(KEY_TYPE.encode())
        + ssh_string(key.public.raw)
        + ssh_string(key.seed + key.public.raw)
        + ssh_string(key.public.comment.encode("utf-8"))
    )
    section += bytes(range(1, 1 + (-len(section)) % 8))  # "none" cipher block size is 8
    return (
        _OPENSSH_MAGIC
        + ssh_string(b"none")
        + ssh_string(b"none")
        + ssh_string(b"")
        + struct.pack(">I", 1)
        + ssh_string(key.public.blob)
        + ssh_string(section)
    )


def _decode_openssh(data: bytes, passphrase: Optional[bytes]) -> PrivateKey:
    reader = WireReader(data, "OpenSSH private key")
    if reader.take(len(_OPENSSH_MAGIC)) != _OPENSSH_MAGIC:
        raise ValueError("corrupted: not an openssh-key-v1 key")
    cipher, kdf, kdf_options = reader.text(), reader.text(), reader.string()
    count = reader.uint32()
    if count != 1:
        raise ValueError(f"holds {count} keys; moshpit expects exactly one")
    public_blob = reader.string()
    key_type = WireReader(public_blob, "public key").text()
    if key_type != KEY_TYPE:
        raise ValueError(_unsupported_type(key_type))
    section = reader.string()
    tag = reader.rest()  # the AEAD tag of encrypted keys follows the section
    if cipher == "none":
        if kdf != "none" or kdf_options or tag:
            raise ValueError("corrupted: an unencrypted key with encryption parameters")
    else:
        section = _decrypt_openssh(cipher, kdf, kdf_options, section, tag, passphrase)
    key = _parse_openssh_section(section, encrypted=cipher != "none")
    if key.public.blob != public_blob:
        raise ValueError("corrupted: the public and private halves do not match")
    return key


def _parse_openssh_section(section: bytes, encrypted: bool) -> PrivateKey:
    reader = WireReader(section, "private key section")
    if reader.uint32() != reader.uint32():
        if encrypted:
            raise WrongPassphrase(_WRONG_PASSPHRASE)
        raise ValueError("corrupted: the check bytes differ")
    key_type = reader.text()
    if key_type != KEY_TYPE:
        raise ValueError(_unsupported_type(key_type))
    public, secret = reader.string(), reader.string()
    comment = reader.string().decode("utf-8", "replace")
    padding = reader.rest()
    if len(public) != 32 or len(secret) != 64 or secret[32:] != public:
        raise ValueError("corrupted: malformed ssh-ed25519 key")
    if padding != bytes(range(1, len(padding) + 1)):
        raise ValueError("corrupted: bad padding")
    key = PrivateKey(secret[:32], comment)
    if key.public.raw != public:
        raise ValueError("corrupted: the secret key does not match its public key")
    return key


# OpenSSH ciphers we decrypt: (key bytes, iv bytes, tag bytes).
_OPENSSH_CIPHERS = {
    "aes256-ctr": (32, 16, 0),
    "aes256-gcm@openssh.com": (32, 12, 16),
    "chacha20-poly1305@openssh.com": (64, 0, 16),
}


def _unsupported_encryption(cipher: str, kdf: str) -> str:
    return f"encrypted with an unsupported cipher/KDF ({cipher[:40]!r}, {kdf[:40]!r})"


def _decrypt_openssh(cipher: str, kdf: str, kdf_options: bytes, section: bytes, tag: bytes,
                     passphrase: Optional[bytes]) -> bytes:
    """Decrypt the private section of a passphrase-protected OpenSSH key (bcrypt KDF)."""
    if cipher not in _OPENSSH_CIPHERS or kdf != "bcrypt":
        raise ValueError(_unsupported_encryption(cipher, kdf))
    key_len, iv_len, tag_len = _OPENSSH_CIPHERS[cipher]
    options = WireReader(kdf_options, "bcrypt KDF options")
    salt, rounds = options.string(), options.uint32()
    options.expect_end()
    if len(tag) != tag_len or not salt or not rounds:
        raise ValueError("corrupted: bad encryption parameters")
    bcrypt = _import_bcrypt()
    if not passphrase:
        raise PassphraseRequired(_NEED_PASSPHRASE)
    derived = bcrypt.kdf(passphrase, salt, key_len + iv_len, rounds, ignore_few_rounds=True)
    key, iv = derived[:key_len], derived[key_len:]
    if cipher == "aes256-ctr":
        decryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
        return decryptor.update(section) + decryptor.finalize()
    try:
        if cipher == "aes256-gcm@openssh.com":
            return AESGCM(key).decrypt(iv, section + tag, None)
        return _openssh_chacha20_poly1305_open(key[:32], section, tag)
    except (InvalidTag, InvalidSignature):
        raise WrongPassphrase(_WRONG_PASSPHRASE) from None


def _openssh_chacha20_poly1305_open(key: bytes, data: bytes, tag: bytes) -> bytes:
    """OpenSSH's chacha20-poly1305 (PROTOCOL.chacha20poly1305) at sequence number 0.

    ChaCha20 with a 64-bit nonce; cryptography's 16-byte nonce is counter || nonce, little
    endian, so block counter n is ``pack("<Q", n) + 8 zero bytes``. The Poly1305 key is the
    first 32 bytes of block 0; the data is block 1 onwards.
    """

    def keystream_at(block: int):
        nonce = struct.pack("<Q", block) + bytes(8)
        return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    Poly1305.verify_tag(keystream_at(0).update(bytes(32)), data, tag)
    return keystream_at(1).update(data)


def _import_bcrypt():
    """The optional ``bcrypt`` module (OpenSSH's bcrypt-pbkdf), or a clear error."""
    try:
        import bcrypt
    except ImportError:
        raise ValueError(
            "encrypted in OpenSSH's bcrypt format, which needs the Python 'bcrypt' module: "
            "install it, or remove the passphrase with 'ssh-keygen -p -f FILE'"
        ) from None
    return bcrypt


def _scrypt(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        passphrase, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=128 * r * (n + p + 2) + 4096
    )


def _seal_envelope(plaintext: bytes, passphrase: bytes) -> bytes:
    salt, nonce = os.urandom(16), os.urandom(12)
    kdf_options = ssh_string(salt) + struct.pack(">III", SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    header = (
        _ENVELOPE_MAGIC
        + ssh_string(b"scrypt")
        + ssh_string(kdf_options)
        + ssh_string(b"chacha20-poly1305")
        + ssh_string(nonce)
    )
    key = _scrypt(passphrase, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    return header + ssh_string(ChaCha20Poly1305(key).encrypt(nonce, plaintext, header))


def _open_envelope(data: bytes, passphrase: Optional[bytes]) -> bytes:
    reader = WireReader(data, "moshpit encrypted key")
    if reader.take(len(_ENVELOPE_MAGIC)) != _ENVELOPE_MAGIC:
        raise ValueError("corrupted: not a moshpit-key-v1 key")
    kdf, kdf_options, cipher = reader.text(), reader.string(), reader.text()
    nonce = reader.string()
    header_len = len(data) - reader.remaining()
    ciphertext = reader.string()
    reader.expect_end()
    if kdf != "scrypt" or cipher != "chacha20-poly1305":
        raise ValueError(_unsupported_encryption(cipher, kdf))
    options = WireReader(kdf_options, "scrypt options")
    salt = options.string()
    log2_n, r, p = options.uint32(), options.uint32(), options.uint32()
    options.expect_end()
    sane = _SCRYPT_MIN_LOG2_N <= log2_n <= 30 and 1 <= r <= 64 and 1 <= p <= 16
    if not sane or 128 * r * (p + (1 << log2_n)) > _SCRYPT_MAX_MEMORY:
        raise ValueError("corrupted or unsafe: scrypt parameters out of range")
    if len(salt) < 16 or len(nonce) != 12:
        raise ValueError("corrupted: bad salt or nonce")
    if not passphrase:
        raise PassphraseRequired(_NEED_PASSPHRASE)
    key = _scrypt(passphrase, salt, log2_n, r, p)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, data[:header_len])
    except InvalidTag:
        raise WrongPassphrase(_WRONG_PASSPHRASE) from None


# What a foreign PEM file holds, for the error message.
_FOREIGN_PEM = {
    "RSA PRIVATE KEY": "an RSA key",
    "EC PRIVATE KEY": "an ECDSA key",
    "DSA PRIVATE KEY": "a DSA key",
    "ENCRYPTED PRIVATE KEY": "an encrypted PKCS#8 key",
    "PUBLIC KEY": "a public key, not a private key",
}
_PKCS8_KINDS = (
    (x25519.X25519PrivateKey, "an X25519 key (for key agreement, not signing)"),
    (x448.X448PrivateKey, "an X448 key (for key agreement, not signing)"),
    (Ed25519PrivateKey, "an Ed25519 key in PKCS#8 form"),
    (ed448.Ed448PrivateKey, "an Ed448 key"),
    (rsa.RSAPrivateKey, "an RSA key"),
    (ec.EllipticCurvePrivateKey, "an ECDSA key"),
    (dsa.DSAPrivateKey, "a DSA key"),
)


def _describe_foreign_pem(label: str, body: List[str]) -> str:
    kind = _FOREIGN_PEM.get(label, f"a '{label}' block")
    if label == "PRIVATE KEY":
        kind = "an unreadable PKCS#8 key"
        try:
            key = serialization.load_der_private_key(_decode_b64_body(body), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            pass
        else:
            kind = next((k for cls, k in _PKCS8_KINDS if isinstance(key, cls)), kind)
    return (f"holds {kind}; moshpit needs an Ed25519 key in OpenSSH format "
            f"(make one with: {program_command('keygen')} generate)")


def _decode_private_key(data: bytes, passphrase: Optional[bytes]) -> PrivateKey:
    """Any private key file we understand -> PrivateKey; problems raise ValueError or
    PassphraseRequired/WrongPassphrase (messages without the file name)."""
    label, body = _unarmor(data)
    if label == OPENSSH_LABEL:
        return _decode_openssh(_decode_b64_body(body), passphrase)
    if label == MOSHPIT_LABEL:
        return _decode_openssh(_open_envelope(_decode_b64_body(body), passphrase), None)
    raise ValueError(_describe_foreign_pem(label, body))


def _encode_private_key(key: PrivateKey, passphrase: Optional[bytes]) -> bytes:
    plain = _encode_openssh(key)
    if not passphrase:
        return _armor(OPENSSH_LABEL, plain)
    return _armor(MOSHPIT_LABEL, _seal_envelope(plain, passphrase))


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _read_bounded(path: str, limit: int, private: bool = False) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes, or raise KeyFileError.

    ``private``: refuse a file that group or others may access, as ssh does, because a
    key others could read is no longer a secret.
    """
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang us; O_NOCTTY: a
        # terminal there must never become the controlling terminal of the server.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        with os.fdopen(os.open(path, flags), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{path}: not a regular file")
            if private and st.st_mode & 0o077:
                # A readable file's first bytes are no secret: a .pub given by mistake gets
                # the real problem, not "chmod 600" on a public key.
                if _looks_public(f.read(64)):
                    raise KeyFileError(f"{path}: {_PUBLIC_NOT_PRIVATE}")
                raise KeyFileError(
                    f"{path}: private key is accessible by others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); fix it with: chmod 600 {path}"
                )
            data = f.read(limit + 1)
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > limit:
        raise KeyFileError(f"{path}: file is too large to be a key file (over {limit} bytes)")
    return data


def load_private_key(path: str, passphrase: Optional[bytes] = None) -> PrivateKey:
    """Load an Ed25519 private key file (any format in the module docstring).

    Raises PassphraseRequired (encrypted, no passphrase: ask and call again),
    WrongPassphrase, or KeyFileError naming the file and the problem.
    """
    data = _read_bounded(path, MAX_KEY_FILE, private=True)
    try:
        key = _decode_private_key(data, passphrase)
    except KeyFileError as err:
        raise type(err)(f"{path}: {err}") from None
    except ValueError as err:
        raise KeyFileError(f"{path}: {err}") from None
    log.debug("loaded private key %s from %s", key.public.fingerprint(), path)
    return key


def private_key_is_encrypted(path: str) -> bool:
    """True if loading ``path`` needs a passphrase (so a CLI knows to prompt first)."""
    try:
        load_private_key(path)
    except PassphraseRequired:
        return True
    return False


def save_private_key(path: str, key: PrivateKey, passphrase: Optional[bytes] = None,
                     overwrite: bool = False) -> None:
    """Write ``key`` atomically with mode 0600: OpenSSH format, or the moshpit scrypt +
    ChaCha20-Poly1305 envelope when a (non-empty) passphrase is given. An existing file is
    KeyFileExists unless ``overwrite`` (a key is never replaced by accident)."""
    _write_atomic(path, _encode_private_key(key, passphrase), 0o600, overwrite)


def public_key_bytes(pub: PublicKey, kind: str = LINE_KIND) -> bytes:
    """The public key file's content: one line, ``moshpit ...`` or (``kind="ssh-ed25519"``)
    OpenSSH's ``ssh-ed25519 ...``, which ``ssh-keygen -l`` also reads."""
    return (pub.to_line(kind) + "\n").encode("utf-8")


def save_public_key(path: str, pub: PublicKey, overwrite: bool = False,
                    kind: str = LINE_KIND) -> None:
    """Write the public key line atomically with mode 0644 (see public_key_bytes); an
    existing file is KeyFileExists unless ``overwrite``."""
    _write_atomic(path, public_key_bytes(pub, kind), 0o644, overwrite)


def default_comment() -> str:
    """``user@host``, what the seed's public key lines carry."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER/$LOGNAME
        user = "moshpit"
    return f"{user}@{socket.gethostname()}"


def create_key_pair(path: str, public_path: str, comment: str,
                    passphrase: Optional[bytes] = None, overwrite: bool = False,
                    kind: str = LINE_KIND) -> PrivateKey:
    """Generate a new key and write it: ``path`` (0600, encrypted if ``passphrase``), then
    ``public_path`` (0644, a ``kind`` line). Each file is written atomically.

    Without ``overwrite`` neither file may exist: both are checked before anything is
    written (KeyFileExists names the first one in the way), each is then created
    exclusively, and if the public file cannot be created (it appeared meanwhile, or the
    disk is full) the new private file is removed again, so a pair is never half written
    and an existing key file is never touched.
    """
    path, public_path = os.path.abspath(path), os.path.abspath(public_path)
    if path == public_path:
        raise KeyFileError(f"{path}: the private and public key files must differ")
    if not overwrite:
        for existing in (path, public_path):
            if os.path.lexists(existing):
                raise KeyFileExists(existing)
    key = PrivateKey.generate(comment)
    save_private_key(path, key, passphrase, overwrite)
    log.info("wrote %s (mode 0600, %s)", path, "encrypted" if passphrase else "unencrypted")
    try:
        save_public_key(public_path, key.public, overwrite, kind)
    except KeyFileError:
        if not overwrite:  # ours alone: created exclusively a moment ago
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    log.info("wrote %s (mode 0644)", public_path)
    return key


def load_public_key(path: str) -> PublicKey:
    """Load a file holding exactly one public key line (``moshpit`` or ``ssh-ed25519``)."""
    data = _read_bounded(path, MAX_KEY_FILE)
    try:
        lines = _as_text(data, "utf-8").splitlines()
        keys = [key for key in map(parse_public_key_line, lines) if key is not None]
    except ValueError as err:
        raise KeyFileError(f"{path}: {err}") from None
    if len(keys) != 1:
        problem = "file is empty" if not keys else f"holds {len(keys)} keys, expected one"
        raise KeyFileError(f"{path}: {problem}")
    return keys[0]


def _write_atomic(path: str, data: bytes, mode: int, overwrite: bool) -> None:
    """Write via a temp file in the same directory, then move it into place: a crash leaves
    either the old file or the new one, never half a key. The temp file has ``mode`` before
    any byte. Without ``overwrite`` the move is a hard link, which fails if ``path`` exists
    (even as a dangling symlink) at that very moment: no check-then-write race can clobber
    a key file; that is KeyFileExists. With ``overwrite`` a rename replaces the file (a
    symlink there is replaced, not followed)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    tmp = None
    try:
        make_private_dirs(directory)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            tmp = None
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise KeyFileExists(path) from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def default_identity_paths(home: Optional[str] = None) -> Tuple[str, str]:
    """The client identity ``(~/.mp/id_ed25519, ~/.mp/id_ed25519.pub)``."""
    priv = os.path.join(mp_dir(home), CLIENT_KEY_FILE)
    return priv, priv + ".pub"


def default_host_key_paths(home: Optional[str] = None) -> Tuple[str, str]:
    """The server host key ``(~/.mp/mps_host_ed25519_key, ....pub)``."""
    priv = os.path.join(mp_dir(home), HOST_KEY_FILE)
    return priv, priv + ".pub"


# ---------------------------------------------------------------------------
# SSHSIG (OpenSSH PROTOCOL.sshsig): the handshake's client signature, in the form an
# ssh-agent can make too
# ---------------------------------------------------------------------------

_SSHSIG_MAGIC = b"SSHSIG"
_SSHSIG_VERSION = 1
_SSHSIG_HASH = b"sha512"
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"
_ARMOR_WIDTH = 70  # what ssh-keygen writes


def _sshsig_signed_data(namespace: str, message: bytes) -> bytes:
    """What the key really signs: the magic and namespace keep it from passing as SSH login
    data or as a signature for any other purpose. The reserved field is signed empty."""
    return (
        _SSHSIG_MAGIC
        + ssh_string(namespace.encode())
        + ssh_string(b"")
        + ssh_string(_SSHSIG_HASH)
        + ssh_string(hashlib.sha512(message).digest())
    )


def sshsig_sign(private_key: PrivateKey, namespace: str, message: bytes) -> bytes:
    """The binary SSHSIG blob of ``ssh-keygen -Y sign -n NAMESPACE`` (sha512) for ``message``."""
    if not namespace:
        raise ValueError("an SSHSIG signature needs a namespace")
    signature = private_key.sign(_sshsig_signed_data(namespace, message))
    return (
        _SSHSIG_MAGIC
        + struct.pack(">I", _SSHSIG_VERSION)
        + ssh_string(private_key.public.blob)
        + ssh_string(namespace.encode())
        + ssh_string(b"")
        + ssh_string(_SSHSIG_HASH)
        + ssh_string(ssh_string(KEY_TYPE.encode()) + ssh_string(signature))
    )


def sshsig_verify(public_key: PublicKey, namespace: str, message: bytes, signature: bytes) -> bool:
    """True if the binary SSHSIG blob ``signature`` is ``public_key``'s signature of
    ``message`` in ``namespace`` (sha512). Never raises."""
    try:
        reader = WireReader(signature, "SSHSIG signature")
        if reader.take(6) != _SSHSIG_MAGIC or reader.uint32() != _SSHSIG_VERSION:
            return False
        signer, signed_namespace = reader.string(), reader.string()
        reader.string()  # reserved: ignored by verifiers, as OpenSSH does
        hash_name, inner = reader.string(), reader.string()
        reader.expect_end()
        inner_reader = WireReader(inner, "SSHSIG inner signature")
        sig_type, raw = inner_reader.string(), inner_reader.string()
        inner_reader.expect_end()
    except ValueError:
        return False
    if (
        signer != public_key.blob
        or signed_namespace != namespace.encode()
        or hash_name != _SSHSIG_HASH
        or sig_type != KEY_TYPE.encode()
    ):
        return False
    return public_key.verify(raw, _sshsig_signed_data(namespace, message))


def sshsig_armor(blob: bytes) -> str:
    """The armored text form ``ssh-keygen -Y`` reads and writes."""
    text = base64.b64encode(blob).decode("ascii")
    lines = [text[i:i + _ARMOR_WIDTH] for i in range(0, len(text), _ARMOR_WIDTH)]
    return "\n".join([_ARMOR_BEGIN, *lines, _ARMOR_END]) + "\n"


def sshsig_unarmor(text: str) -> bytes:
    """The blob inside an armored SSH signature; ValueError if ``text`` is not one."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
        raise ValueError("not an armored SSH signature")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the SSH signature is not valid base64") from None
