"""Key files: round trips of every format, modes, atomic writes, and every bad input."""

from __future__ import annotations

import base64
import os
import stat
import struct
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519

import moshpit_keys as mk
from moshpit_keys import KeyFileError, PassphraseRequired, PrivateKey, WrongPassphrase


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    """The weakest scrypt the reader accepts (2^15): same code, half the test time."""
    monkeypatch.setattr(mk, "SCRYPT_LOG2_N", 15)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_private(path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def openssh_body(key: PrivateKey) -> bytes:
    """The binary inside an unencrypted OpenSSH key file we write."""
    return mk._encode_openssh(key)


def armored(label: str, body: bytes) -> bytes:
    return mk._armor(label, body)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("comment", ["", "alice@laptop", "ünïcødé comment ✓"])
def test_unencrypted_round_trip(tmp_path, comment):
    key = PrivateKey.generate(comment)
    path = str(tmp_path / "id")
    mk.save_private_key(path, key)
    loaded = mk.load_private_key(path)
    assert loaded.seed == key.seed
    assert loaded.public.comment == comment
    assert not mk.private_key_is_encrypted(path)
    assert Path(path).read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert max(len(line) for line in Path(path).read_text().splitlines()) <= 70


def test_empty_passphrase_means_unencrypted(tmp_path):
    path = str(tmp_path / "id")
    mk.save_private_key(path, PrivateKey.generate(), b"")
    assert not mk.private_key_is_encrypted(path)


def test_unencrypted_file_is_readable_by_cryptography(tmp_path):
    key = PrivateKey.generate("c")
    path = tmp_path / "id"
    mk.save_private_key(str(path), key)
    other = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    raw = other.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())
    assert raw == key.seed


def test_cryptography_written_openssh_key_loads(tmp_path):
    theirs = ed25519.Ed25519PrivateKey.generate()
    data = theirs.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    key = mk.load_private_key(write_private(tmp_path / "id", data))
    assert key.seed == theirs.private_bytes(serialization.Encoding.Raw,
                                            serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption())


def test_encrypted_round_trip(tmp_path):
    key = PrivateKey.generate("enc")
    path = str(tmp_path / "id")
    mk.save_private_key(path, key, b"correct horse")
    text = Path(path).read_text()
    assert text.startswith("-----BEGIN MOSHPIT ENCRYPTED PRIVATE KEY-----\n")
    assert mk.private_key_is_encrypted(path)
    loaded = mk.load_private_key(path, b"correct horse")
    assert loaded.seed == key.seed and loaded.public.comment == "enc"


def test_encrypted_file_hides_key_and_comment(tmp_path):
    key = PrivateKey.generate("secret-comment")
    path = tmp_path / "id"
    mk.save_private_key(str(path), key, b"pw")
    body = base64.b64decode("".join(path.read_text().splitlines()[1:-1]))
    assert key.seed not in body and key.public.raw not in body and b"secret-comment" not in body


def test_encryption_is_randomized(tmp_path):
    key = PrivateKey.generate()
    a, b = tmp_path / "a", tmp_path / "b"
    mk.save_private_key(str(a), key, b"pw")
    mk.save_private_key(str(b), key, b"pw")
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize("passphrase", [None, b""])
def test_encrypted_without_passphrase(tmp_path, passphrase):
    path = str(tmp_path / "id")
    mk.save_private_key(path, PrivateKey.generate(), b"pw")
    with pytest.raises(PassphraseRequired, match=f"^{path}: .*passphrase is needed"):
        mk.load_private_key(path, passphrase)


def test_wrong_passphrase(tmp_path):
    path = str(tmp_path / "id")
    mk.save_private_key(path, PrivateKey.generate(), b"pw")
    with pytest.raises(WrongPassphrase, match=f"^{path}: wrong passphrase"):
        mk.load_private_key(path, b"pW")


def test_public_key_round_trip(tmp_path):
    pub = PrivateKey.generate("bob@host").public
    path = str(tmp_path / "id.pub")
    mk.save_public_key(path, pub)
    assert Path(path).read_text() == pub.to_line() + "\n"
    assert Path(path).read_text().startswith("moshpit ")
    loaded = mk.load_public_key(path)
    assert loaded == pub and loaded.comment == "bob@host"


def test_load_public_key_accepts_openssh_form_and_comments(tmp_path):
    pub = PrivateKey.generate("x").public
    path = tmp_path / "id.pub"
    path.write_text("# my key\n\n" + pub.to_line("ssh-ed25519") + "\n")
    assert mk.load_public_key(str(path)) == pub


# --- modes and atomic writes -------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077])
def test_modes_regardless_of_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        key = PrivateKey.generate()
        priv = tmp_path / "new" / "deeper" / "id"
        mk.save_private_key(str(priv), key)
        mk.save_public_key(str(priv) + ".pub", key.public)
    finally:
        os.umask(old)
    assert mode(priv) == 0o600
    assert mode(str(priv) + ".pub") == 0o644
    assert mode(tmp_path / "new") == 0o700
    assert mode(tmp_path / "new" / "deeper") == 0o700


def test_existing_directory_mode_untouched(tmp_path):
    tmp_path.chmod(0o755)
    mk.save_private_key(str(tmp_path / "id"), PrivateKey.generate())
    assert mode(tmp_path) == 0o755


def test_overwrite_replaces_and_fixes_mode(tmp_path):
    path = tmp_path / "id"
    path.write_text("old")
    path.chmod(0o666)
    key = PrivateKey.generate()
    mk.save_private_key(str(path), key, overwrite=True)
    assert mode(path) == 0o600
    assert mk.load_private_key(str(path)).seed == key.seed
    assert os.listdir(tmp_path) == ["id"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "id"
    path.write_text("old key")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyFileError, match=f"{path}: cannot write: No space left"):
        mk.save_private_key(str(path), PrivateKey.generate(), overwrite=True)
    assert path.read_text() == "old key"
    assert os.listdir(tmp_path) == ["id"]


def test_write_below_a_file_fails_cleanly(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KeyFileError, match="cannot write"):
        mk.save_public_key(str(tmp_path / "file" / "id.pub"), PrivateKey.generate().public)


def test_symlink_at_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "id"
    link.symlink_to(victim)
    mk.save_private_key(str(link), PrivateKey.generate(), overwrite=True)
    assert victim.read_text() == "precious"
    assert not link.is_symlink()


@pytest.mark.parametrize("save", [
    lambda path: mk.save_private_key(path, PrivateKey.generate()),
    lambda path: mk.save_public_key(path, PrivateKey.generate().public),
])
@pytest.mark.parametrize("occupant", ["file", "symlink", "dangling symlink"])
def test_existing_key_file_is_never_replaced_without_overwrite(tmp_path, save, occupant):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "id"
    if occupant == "file":
        path.write_text("precious")
    else:
        path.symlink_to(victim if occupant == "symlink" else tmp_path / "nowhere")
    with pytest.raises(mk.KeyFileExists, match=f"^{path} already exists$"):
        save(str(path))
    assert victim.read_text() == "precious"
    assert path.is_symlink() == (occupant != "file")
    if occupant == "file":
        assert path.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["id", "victim"]  # no temp file left behind


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o010])
def test_private_key_accessible_by_others_is_refused(tmp_path, bad_mode):
    path = tmp_path / "id"
    mk.save_private_key(str(path), PrivateKey.generate())
    path.chmod(bad_mode)
    with pytest.raises(KeyFileError, match=f"accessible by others .*chmod 600 {path}$"):
        mk.load_private_key(str(path))


def test_private_key_mode_0400_is_fine(tmp_path):
    path = tmp_path / "id"
    mk.save_private_key(str(path), PrivateKey.generate())
    path.chmod(0o400)
    mk.load_private_key(str(path))


# --- bad inputs ----------------------------------------------------------------------------


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def pem(key, fmt) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def valid_openssh_text() -> bytes:
    return mk._encode_private_key(PrivateKey.generate("c"), None)


def corrupt(body: bytes, offset: int, value: int) -> bytes:
    return body[:offset] + bytes([value]) + body[offset + 1:]


def bad_private_files():
    """(id, file content, expected problem) for every kind of broken private key file."""
    key = PrivateKey.generate("c")
    body = openssh_body(key)
    section_at = body.rindex(key.public.blob) - 8  # the check ints open the private section
    seed_at = body.index(key.seed)
    text = valid_openssh_text()
    lines = text.decode().splitlines()
    return [
        ("empty", b"", "file is empty"),
        ("blank", b" \n\n\t\n", "file is empty"),
        ("binary", bytes(range(256)), "binary data"),
        ("nul", b"-----BEGIN OPENSSH PRIVATE KEY-----\0", "binary data"),
        ("utf8-text", "héllo wörld\n".encode(), "binary data"),
        ("no-armor", b"just some text\n", "no '-----BEGIN"),
        ("cut-in-half", text[: len(text) // 2], "truncated: no '-----END OPENSSH"),
        ("body-cut", "\n".join(lines[:3] + lines[-1:]).encode(), "truncated"),
        ("bad-base64", "\n".join(lines[:1] + ["!!!!" + lines[1][4:]] + lines[2:]).encode(),
         "not valid base64"),
        ("bad-magic", armored(mk.OPENSSH_LABEL, b"openssh-key-v2\0" + body[15:]),
         "not an openssh-key-v1"),
        ("check-ints", armored(mk.OPENSSH_LABEL, corrupt(body, section_at, body[section_at] ^ 1)),
         "check bytes differ"),
        ("seed-flipped", armored(mk.OPENSSH_LABEL, corrupt(body, seed_at, body[seed_at] ^ 1)),
         "does not match its public key"),
        ("padding", armored(mk.OPENSSH_LABEL, body[:-1] + b"\x09"), "bad padding"),
        ("two-keys", armored(mk.OPENSSH_LABEL, body[:15 + 8 + 8 + 4] + struct.pack(">I", 2)
                             + body[15 + 8 + 8 + 4 + 4:]), "holds 2 keys"),
        ("trailing", armored(mk.OPENSSH_LABEL, body + b"x"), "encryption parameters"),
        ("rsa-openssh", pem(rsa_key(), serialization.PrivateFormat.OpenSSH),
         "ssh-rsa keys are not supported"),
        ("rsa-pem", pem(rsa_key(), serialization.PrivateFormat.TraditionalOpenSSL),
         "holds an RSA key"),
        ("rsa-pkcs8", pem(rsa_key(), serialization.PrivateFormat.PKCS8), "holds an RSA key"),
        ("x25519", pem(x25519.X25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8),
         "holds an X25519 key"),
        ("ed25519-pkcs8",
         pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.PKCS8),
         "Ed25519 key in PKCS#8 form"),
        ("pkcs8-garbage", armored("PRIVATE KEY", b"\x30\x03\x02\x01\x00"),
         "unreadable PKCS#8"),
        ("public-line", (key.public.to_line() + "\n").encode(),
         "this is a public key, not a private key"),
        ("odd-label", armored("CERTIFICATE", b"x"), "holds a 'CERTIFICATE' block"),
        ("envelope-garbage", armored(mk.MOSHPIT_LABEL, b"moshpit-key-v1\0\0\0"), "truncated"),
    ]


@pytest.mark.parametrize("name, data, problem", bad_private_files(),
                         ids=[case[0] for case in bad_private_files()])
def test_bad_private_key_files(tmp_path, name, data, problem):
    path = write_private(tmp_path / "id", data)
    with pytest.raises(KeyFileError) as info:
        mk.load_private_key(path, b"pw")
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def envelope_fields(key: PrivateKey, passphrase: bytes = b"pw") -> bytes:
    return mk._seal_envelope(openssh_body(key), passphrase)


def test_envelope_tampering(tmp_path):
    key = PrivateKey.generate()
    sealed = envelope_fields(key)
    log2n_at = 15 + 4 + 6 + 4 + 4 + 16  # magic, kdfname, kdfoptions length, salt
    assert struct.unpack(">I", sealed[log2n_at:log2n_at + 4]) == (15,)

    def load(data):
        return mk.load_private_key(write_private(tmp_path / "id", armored(mk.MOSHPIT_LABEL, data)),
                                   b"pw")

    assert load(sealed).seed == key.seed
    with pytest.raises(WrongPassphrase):  # the header is authenticated
        load(sealed[:log2n_at] + struct.pack(">I", 16) + sealed[log2n_at + 4:])
    with pytest.raises(KeyFileError, match="scrypt parameters out of range"):
        load(sealed[:log2n_at] + struct.pack(">I", 14) + sealed[log2n_at + 4:])
    with pytest.raises(KeyFileError, match="scrypt parameters out of range"):
        load(sealed[:log2n_at] + struct.pack(">I", 40) + sealed[log2n_at + 4:])
    with pytest.raises(WrongPassphrase):
        load(corrupt(sealed, len(sealed) - 3, sealed[-3] ^ 0x80))
    with pytest.raises(KeyFileError, match="truncated"):
        load(sealed[:-1])
    with pytest.raises(KeyFileError, match="unsupported cipher/KDF"):
        load(sealed.replace(b"chacha20-poly1305", b"chacha20-poly1306"))


def test_envelope_inner_key_is_checked(tmp_path):
    key = PrivateKey.generate()
    inner = openssh_body(key)
    sealed = mk._seal_envelope(inner[:-1] + b"\x09", b"pw")
    path = write_private(tmp_path / "id", armored(mk.MOSHPIT_LABEL, sealed))
    with pytest.raises(KeyFileError, match="bad padding"):
        mk.load_private_key(path, b"pw")


def test_openssh_encrypted_key_without_bcrypt_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # makes `import bcrypt` fail
    path = write_private(tmp_path / "id", armored(mk.OPENSSH_LABEL, openssh_encrypted_body()))
    with pytest.raises(KeyFileError, match="needs the Python 'bcrypt' module.*ssh-keygen -p"):
        mk.load_private_key(path, b"pw")
    with pytest.raises(KeyFileError, match="bcrypt"):
        mk.private_key_is_encrypted(path)


def openssh_encrypted_body(cipher: bytes = b"aes256-ctr", kdf: bytes = b"bcrypt") -> bytes:
    """The shape of an ssh-keygen encrypted key (contents are never decrypted here)."""
    pub = PrivateKey.generate().public
    options = mk.ssh_string(b"s" * 16) + struct.pack(">I", 16)
    return (b"openssh-key-v1\0" + mk.ssh_string(cipher) + mk.ssh_string(kdf)
            + mk.ssh_string(options) + struct.pack(">I", 1) + mk.ssh_string(pub.blob)
            + mk.ssh_string(b"\0" * 160))


@pytest.mark.parametrize("cipher, kdf", [(b"aes128-cbc", b"bcrypt"), (b"aes256-ctr", b"scrypt"),
                                         (b"3des-cbc", b"none")])
def test_openssh_unsupported_cipher_or_kdf(tmp_path, cipher, kdf):
    data = armored(mk.OPENSSH_LABEL, openssh_encrypted_body(cipher, kdf))
    with pytest.raises(KeyFileError, match="unsupported cipher/KDF"):
        mk.load_private_key(write_private(tmp_path / "id", data), b"pw")


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(KeyFileError, match=f"^{missing}: cannot read: No such file"):
        mk.load_private_key(str(missing))
    with pytest.raises(KeyFileError, match=f"^{tmp_path}: cannot read: Is a directory"):
        mk.load_public_key(str(tmp_path))


@pytest.mark.timeout(10)
def test_fifo_and_device_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match=f"^{fifo}: not a regular file"):
        mk.load_private_key(str(fifo))
    with pytest.raises(KeyFileError, match="^/dev/zero: not a regular file"):
        mk.load_public_key("/dev/zero")


def test_oversized_key_file(tmp_path):
    path = write_private(tmp_path / "id", b"x" * (mk.MAX_KEY_FILE + 1))
    with pytest.raises(KeyFileError, match="too large"):
        mk.load_private_key(path)


def bad_public_files():
    pub = PrivateKey.generate().public
    return [
        ("empty", b"", "file is empty"),
        ("comments-only", b"# nothing\n\n", "file is empty"),
        ("binary", bytes(range(256)), "binary data"),
        ("garbage-base64", b"moshpit AAAA!!!! me\n", "not valid base64"),
        ("truncated", pub.to_line()[:40].encode(), "truncated"),
        ("private-key", valid_openssh_text(), "private key"),
        ("rsa", b"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC me\n", "ssh-rsa keys are not"),
        ("two-keys", (pub.to_line() + "\n" + pub.to_line() + "\n").encode(), "holds 2 keys"),
        ("x25519-pem", x25519.X25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
         "private key"),
    ]


@pytest.mark.parametrize("name, data, problem", bad_public_files(),
                         ids=[case[0] for case in bad_public_files()])
def test_bad_public_key_files(tmp_path, name, data, problem):
    path = tmp_path / "id.pub"
    path.write_bytes(data)
    with pytest.raises(KeyFileError) as info:
        mk.load_public_key(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)
