"""Interoperability with the real OpenSSH tools: fingerprints, randomart and key files must be
what ``ssh-keygen`` prints and reads. Skipped where ssh-keygen is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import moshpit_keys as mk
from moshpit_keys import PrivateKey

SSH_KEYGEN = shutil.which("ssh-keygen")
pytestmark = [pytest.mark.skipif(not SSH_KEYGEN, reason="ssh-keygen is not installed"),
              pytest.mark.timeout(120)]


def ssh_keygen(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([SSH_KEYGEN, *args], capture_output=True, text=True, timeout=60,
                          check=check, stdin=subprocess.DEVNULL)


def ssh_made_key(tmp_path, name: str, passphrase: str = "", cipher: str = "") -> str:
    path = str(tmp_path / name)
    extra = ["-Z", cipher] if cipher else []
    ssh_keygen("-q", "-t", "ed25519", "-N", passphrase, "-C", f"{name}@test", "-f", path, *extra)
    return path


def listing(pub: mk.PublicKey) -> str:
    """What `ssh-keygen -lv -f` prints for an ed25519 key."""
    return f"256 {pub.fingerprint()} {pub.comment} (ED25519)\n{pub.randomart()}\n"


@pytest.mark.parametrize("n", range(8))
def test_fingerprint_and_randomart_equal_ssh_keygen_for_ssh_made_keys(tmp_path, n):
    path = ssh_made_key(tmp_path, f"key{n}")
    pub = mk.load_public_key(path + ".pub")
    assert ssh_keygen("-lv", "-f", path + ".pub").stdout == listing(pub)


@pytest.mark.parametrize("n", range(4))
def test_fingerprint_and_randomart_equal_ssh_keygen_for_our_keys(tmp_path, n):
    key = PrivateKey.generate(f"ours{n}@test")
    path = str(tmp_path / "id")
    mk.save_private_key(path, key)
    # ssh-keygen lists our private key file directly, and our line in OpenSSH form.
    assert ssh_keygen("-lv", "-f", path).stdout == listing(key.public)
    (tmp_path / "ssh.pub").write_text(key.public.to_line("ssh-ed25519") + "\n")
    assert ssh_keygen("-lv", "-f", str(tmp_path / "ssh.pub")).stdout == listing(key.public)


@pytest.mark.parametrize("comment", ["", "alice@laptop"])
def test_ssh_keygen_y_reads_our_private_key(tmp_path, comment):
    key = PrivateKey.generate(comment)
    path = str(tmp_path / "id")
    mk.save_private_key(path, key)
    derived = ssh_keygen("-y", "-f", path).stdout.strip()
    assert derived == key.public.to_line("ssh-ed25519")


def test_we_load_an_existing_ssh_keygen_key(tmp_path):
    path = ssh_made_key(tmp_path, "id_ed25519")
    key = mk.load_private_key(path)
    assert key.public == mk.load_public_key(path + ".pub")
    assert key.public.comment == "id_ed25519@test"
    assert key.public.verify(key.sign(b"data"), b"data")
    assert not mk.private_key_is_encrypted(path)


def test_ssh_keygen_signs_off_on_our_rewrite_of_its_key(tmp_path):
    """Load ssh-keygen's key, save it ourselves: ssh-keygen still derives the same key."""
    path = ssh_made_key(tmp_path, "theirs")
    ours = str(tmp_path / "ours")
    mk.save_private_key(ours, mk.load_private_key(path))
    theirs_line = Path(path + ".pub").read_text()
    assert ssh_keygen("-y", "-f", ours).stdout.split()[:2] == theirs_line.split()[:2]


@pytest.mark.parametrize(
    "cipher", ["aes256-ctr", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_ssh_keygen_encrypted_keys(tmp_path, cipher):
    pytest.importorskip("bcrypt")
    path = ssh_made_key(tmp_path, "enc", passphrase="s3cret", cipher=cipher)
    assert mk.private_key_is_encrypted(path)
    key = mk.load_private_key(path, b"s3cret")
    assert key.public == mk.load_public_key(path + ".pub")
    with pytest.raises(mk.PassphraseRequired):
        mk.load_private_key(path)
    with pytest.raises(mk.WrongPassphrase, match=f"^{path}: wrong passphrase"):
        mk.load_private_key(path, b"s3creT")


def test_ssh_keygen_rsa_key_is_refused(tmp_path):
    path = str(tmp_path / "rsa")
    ssh_keygen("-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", path)
    with pytest.raises(mk.KeyFileError, match=f"^{path}: ssh-rsa keys are not supported"):
        mk.load_private_key(path)
    with pytest.raises(mk.KeyFileError, match="ssh-rsa keys are not supported"):
        mk.load_public_key(path + ".pub")
