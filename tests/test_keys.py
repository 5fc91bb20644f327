"""Unit tests of moshpit_keys: Ed25519 keys, public key lines, fingerprints, authorized_keys."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess

import pytest

import moshpit_keys as mk
from moshpit_keys import PrivateKey, PublicKey

# RFC 8032 section 7.1, test 1: a fixed key so expected strings are stable.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG_EMPTY = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_private_key_derives_rfc8032_public_key_and_signature():
    key = PrivateKey(RFC_SEED, "alice@example")
    assert key.public.raw == RFC_PUB
    assert key.public.comment == "alice@example"
    assert key.sign(b"") == RFC_SIG_EMPTY
    assert key.seed == RFC_SEED


def test_sign_and_verify():
    key = PrivateKey.generate()
    sig = key.sign(b"hello")
    assert len(sig) == 64
    assert key.public.verify(sig, b"hello")
    assert not key.public.verify(sig, b"hellO")
    assert not PrivateKey.generate().public.verify(sig, b"hello")


@pytest.mark.parametrize("sig", [b"", b"x" * 63, b"x" * 65, b"\0" * 64, "not bytes", None])
def test_verify_never_raises_on_bad_signatures(sig):
    assert PrivateKey.generate().public.verify(sig, b"data") is False


def test_blob_is_ssh_wire_encoding():
    pub = PublicKey.from_raw(RFC_PUB)
    assert pub.blob == b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + RFC_PUB
    assert PublicKey.from_blob(pub.blob) == pub


def test_fingerprint_is_unpadded_base64_sha256_of_blob():
    pub = PublicKey.from_raw(RFC_PUB)
    digest = base64.b64encode(hashlib.sha256(pub.blob).digest()).decode().rstrip("=")
    assert pub.fingerprint() == "SHA256:" + digest
    assert "=" not in pub.fingerprint()


@pytest.mark.parametrize("kind", ["moshpit", "ssh-ed25519"])
@pytest.mark.parametrize("comment", ["", "bob@laptop", "with spaces in it"])
def test_line_round_trip(kind, comment):
    pub = PrivateKey.generate(comment).public
    line = pub.to_line(kind)
    assert line.startswith(kind + " ")
    parsed = PublicKey.from_line(line)
    assert parsed == pub
    assert parsed.comment == comment
    assert mk.parse_public_key_line("  " + line + "\r\n") == pub


def test_to_line_rejects_unknown_kind():
    with pytest.raises(ValueError):
        PrivateKey.generate().public.to_line("ssh-rsa")


def test_equality_and_hash_ignore_comment():
    a = PublicKey.from_raw(RFC_PUB, "one")
    b = PublicKey.from_raw(RFC_PUB, "two")
    assert a == b and hash(a) == hash(b)
    assert a != PrivateKey.generate().public
    assert a != RFC_PUB


def test_reprs_show_no_secret():
    key = PrivateKey(RFC_SEED, "c")
    assert RFC_SEED.hex() not in repr(key)
    assert "SHA256:" in repr(key)


@pytest.mark.parametrize("line", ["", "   ", "# a comment", "  # indented comment"])
def test_blank_and_comment_lines_give_none(line):
    assert mk.parse_public_key_line(line) is None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RSA_BLOB = mk.ssh_string(b"ssh-rsa") + mk.ssh_string(b"\1\0\1") + mk.ssh_string(b"\0" * 64)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("moshpit", "not followed by a base64 key"),
        ("moshpit !!!notbase64!!!", "not valid base64"),
        ("moshpit QUJ", "not valid base64"),
        ("moshpit " + _b64(b"\0\0\0\x0bssh-ed25519\0\0"), "truncated"),
        ("ssh-rsa " + _b64(RSA_BLOB) + " x", "ssh-rsa keys are not supported"),
        ("moshpit " + _b64(RSA_BLOB), "ssh-rsa keys are not supported"),
        ("ecdsa-sha2-nistp256 AAAA", "not supported"),
        ("frobnicate AAAA", "unknown key type 'frobnicate'"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
        ("moshpit " + _b64(mk.ssh_string(b"ssh-ed25519") + mk.ssh_string(b"\1" * 31)),
         "wrong length"),
        ("moshpit " + _b64(mk.ssh_string(b"ssh-ed25519") + mk.ssh_string(b"\1" * 32) + b"x"),
         "trailing"),
        ("moshpit " + "A" * 9000, "too long"),
    ],
)
def test_bad_lines_raise_value_error_naming_the_problem(line, problem):
    with pytest.raises(ValueError, match=problem):
        mk.parse_public_key_line(line)
    with pytest.raises(ValueError):
        PublicKey.from_line(line)


def test_from_line_rejects_blank():
    with pytest.raises(ValueError):
        PublicKey.from_line("# nothing")


@pytest.mark.parametrize("raw", [b"", b"\0" * 31, b"\0" * 33])
def test_from_raw_rejects_wrong_length(raw):
    with pytest.raises(ValueError):
        PublicKey.from_raw(raw)


def test_read_authorized_keys_skips_bad_lines_with_warning(tmp_path, caplog):
    a = PrivateKey.generate("a@x").public
    b = PrivateKey.generate("b@y").public
    path = tmp_path / "authorized_keys"
    path.write_bytes(
        (
            "# my keys\n\n"
            + a.to_line() + "\n"
            + "moshpit garbage!!\n"
            + "ssh-rsa " + _b64(RSA_BLOB) + "\n"
            + b.to_line("ssh-ed25519") + "\n"
        ).encode()
        + b"\xff\xfe not utf8\n"
    )
    with caplog.at_level(logging.WARNING, logger="moshpit.keys"):
        keys = mk.read_authorized_keys(str(path))
    assert keys == [a, b]
    assert [k.comment for k in keys] == ["a@x", "b@y"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}:4: skipped: the key is not valid base64" in m for m in messages)
    assert any(":5: skipped: ssh-rsa" in m for m in messages)
    assert any(":7: skipped: binary data" in m for m in messages)


def test_read_authorized_keys_missing_file(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(mk.KeyFileError, match=str(path)):
        mk.read_authorized_keys(str(path))


def test_read_authorized_keys_oversized(tmp_path, monkeypatch):
    monkeypatch.setattr(mk, "MAX_AUTHORIZED_KEYS", 100)
    path = tmp_path / "authorized_keys"
    path.write_text("#" * 200)
    with pytest.raises(mk.KeyFileError, match="too large"):
        mk.read_authorized_keys(str(path))


def test_default_paths(tmp_path):
    home = str(tmp_path)
    assert mk.default_identity_paths(home) == (
        f"{home}/.mp/id_ed25519", f"{home}/.mp/id_ed25519.pub")
    assert mk.default_host_key_paths(home) == (
        f"{home}/.mp/mps_host_ed25519_key", f"{home}/.mp/mps_host_ed25519_key.pub")


def test_default_paths_follow_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mk.default_identity_paths()[0] == f"{tmp_path}/.mp/id_ed25519"


def test_error_hierarchy():
    from moshpit import MoshpitError

    assert issubclass(mk.PassphraseRequired, mk.KeyFileError)
    assert issubclass(mk.WrongPassphrase, mk.KeyFileError)
    assert issubclass(mk.KeyFileError, MoshpitError)


# `ssh-keygen -lv` of the RFC 8032 key (OpenSSH 9.2), fixed so the test needs no ssh-keygen.
RFC_FINGERPRINT = "SHA256:bbXpuKG6zhzdmnxq256TlqzFBzRl2f6OOg722cYNbU8"
RFC_RANDOMART = """\
+--[ED25519 256]--+
|            oo   |
|           o. .  |
|          o ..   |
|         o o o.  |
|        S + o  o |
|       . + +  . E|
|      . ..Ooo. B.|
|     o o.BBB.o+ +|
|     .*+OB=o=+.  |
+----[SHA256]-----+"""


def test_fingerprint_and_randomart_match_recorded_ssh_keygen_output():
    pub = PublicKey.from_raw(RFC_PUB)
    assert pub.fingerprint() == RFC_FINGERPRINT
    assert pub.randomart() == RFC_RANDOMART


def test_matches_fingerprint():
    pub = PublicKey.from_raw(RFC_PUB)
    assert pub.matches_fingerprint(RFC_FINGERPRINT)
    assert pub.matches_fingerprint("  " + RFC_FINGERPRINT + "\n")
    assert pub.matches_fingerprint(RFC_FINGERPRINT[len("SHA256:"):])
    assert not pub.matches_fingerprint(RFC_FINGERPRINT[:-1])
    assert not pub.matches_fingerprint(PrivateKey.generate().public.fingerprint())
    assert not pub.matches_fingerprint("")


def test_matches_randomart_is_whitespace_tolerant_between_rows_only():
    pub = PublicKey.from_raw(RFC_PUB)
    assert pub.matches_randomart(RFC_RANDOMART)
    assert pub.matches_randomart(" ".join(RFC_RANDOMART.splitlines()))  # pasted on one line
    assert pub.matches_randomart("\n\t" + RFC_RANDOMART.replace("\n", "\n    ") + "\n\n")
    # Inside a row, spaces are board cells: moving a symbol is a different picture.
    assert not pub.matches_randomart(RFC_RANDOMART.replace("|            oo   |",
                                                           "|           oo    |"))
    assert not pub.matches_randomart(RFC_RANDOMART + " x")
    assert not pub.matches_randomart(RFC_RANDOMART[:-1])
    assert not pub.matches_randomart(PrivateKey.generate().public.randomart())


def test_randomart_shape():
    art = PrivateKey.generate().public.randomart().split("\n")
    assert len(art) == 11
    assert art[0] == "+--[ED25519 256]--+" and art[-1] == "+----[SHA256]-----+"
    assert all(len(row) == 19 and row[0] == row[-1] == "|" for row in art[1:-1])
    body = "".join(art[1:-1])
    assert body.count("E") == 1 and body.count("S") <= 1  # the end may cover the start


def test_comment_control_characters_are_neutralized():
    pub = PrivateKey.generate("evil\x1b[2J\nmoshpit AAAA injected").public
    assert pub.comment == "evil?[2J?moshpit AAAA injected"
    assert "\n" not in pub.to_line()
    line = PublicKey.from_raw(RFC_PUB).to_line() + " a\x07b\tc"
    assert PublicKey.from_line(line).comment == "a?b?c"


def test_hostile_key_type_is_shown_escaped():
    with pytest.raises(ValueError) as info:
        mk.parse_public_key_line("ssh-rsa\x1b[31m AAAA")
    assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


# ---------------------------------------------------------------------------
# SSHSIG
# ---------------------------------------------------------------------------


def test_sshsig_round_trip_and_binding():
    key, other = PrivateKey.generate(), PrivateKey.generate()
    sig = mk.sshsig_sign(key, "moshpit-client", b"message")
    assert sig.startswith(b"SSHSIG\x00\x00\x00\x01")
    assert mk.sshsig_verify(key.public, "moshpit-client", b"message", sig)
    assert not mk.sshsig_verify(key.public, "moshpit-client", b"messagE", sig)
    assert not mk.sshsig_verify(key.public, "file", b"message", sig)
    assert not mk.sshsig_verify(other.public, "moshpit-client", b"message", sig)
    for cut in range(len(sig)):
        assert not mk.sshsig_verify(key.public, "moshpit-client", b"message", sig[:cut])
    assert not mk.sshsig_verify(key.public, "moshpit-client", b"message", sig + b"\x00")
    assert mk.sshsig_unarmor(mk.sshsig_armor(sig)) == sig
    with pytest.raises(ValueError):
        mk.sshsig_unarmor("-----BEGIN SSH SIGNATURE-----\n!!\n-----END SSH SIGNATURE-----\n")
    with pytest.raises(ValueError):
        mk.sshsig_sign(key, "", b"x")


needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                      reason="ssh-keygen is not installed")


@needs_ssh_keygen
def test_sshsig_interoperates_with_ssh_keygen(tmp_path):
    key_path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "t@x",
                    "-f", str(key_path)], check=True, timeout=30)
    key = mk.load_private_key(str(key_path))
    public = PublicKey.from_line((tmp_path / "id_ed25519.pub").read_text())
    assert public == key.public
    message = tmp_path / "message"
    message.write_bytes(os.urandom(32))  # a transcript hash

    # ssh-keygen signs, we verify.
    subprocess.run(["ssh-keygen", "-Y", "sign", "-q", "-n", "moshpit-client", "-f", str(key_path),
                    str(message)], check=True, timeout=30, capture_output=True)
    theirs = mk.sshsig_unarmor((tmp_path / "message.sig").read_text())
    assert mk.sshsig_verify(public, "moshpit-client", message.read_bytes(), theirs)
    assert not mk.sshsig_verify(public, "file", message.read_bytes(), theirs)

    # We sign, ssh-keygen verifies (and checks the namespace).
    ours = tmp_path / "ours.sig"
    ours.write_text(mk.sshsig_armor(mk.sshsig_sign(key, "moshpit-client", message.read_bytes())))
    for namespace, accepted in (("moshpit-client", True), ("file", False)):
        with open(message, "rb") as stdin:
            check = subprocess.run(["ssh-keygen", "-Y", "check-novalidate", "-n", namespace,
                                    "-s", str(ours)], stdin=stdin, capture_output=True,
                                   timeout=30)
        assert (check.returncode == 0) == accepted, check.stderr
