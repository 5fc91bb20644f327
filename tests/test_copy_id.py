"""``mp.py --copy-id [user@]host``: authorizing the client's key on a server through the system
``ssh``, against a real sshd on loopback logging in a throwaway user. Checks what the user
sees and the server user's files before and after."""

from __future__ import annotations

import os
import socket
import stat
import sys

import pytest
from server_util import REPO, free_port_range, make_key
from sshd_util import SshdHost, sshd_binary_fixture, sshd_host_fixture  # noqa: F401
from users_util import users_fixture  # noqa: F401  (the `users` fixture)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for sshd and throwaway users"),
]

MP = os.path.join(REPO, "mp.py")


def laptop_key(host: SshdHost):
    """The laptop user's moshpit identity, where mp.py looks for it by default."""
    return make_key(os.path.join(host.home, ".mp", "id_ed25519"), "alice@laptop")


def copy_id(host: SshdHost, *args: str):
    return host.run(" ".join([sys.executable, MP, "--copy-id", *args]))


def remote_files(host: SshdHost):
    """(mode, uid) of ~/.mp and of authorized_keys, the latter's bytes and mtime."""
    mp_dir = os.path.join(host.user.pw_dir, ".mp")
    path = os.path.join(mp_dir, "authorized_keys")
    d, f = os.stat(mp_dir), os.stat(path)
    with open(path, "rb") as fh:
        data = fh.read()
    return ((stat.S_IMODE(d.st_mode), d.st_uid), (stat.S_IMODE(f.st_mode), f.st_uid),
            data, f.st_mtime_ns)


def test_copy_id_creates_the_files_then_adds_nothing_twice(sshd_host):
    key = laptop_key(sshd_host)
    uid = sshd_host.user.pw_uid
    assert not os.path.exists(os.path.join(sshd_host.user.pw_dir, ".mp"))
    first = copy_id(sshd_host, "host")
    assert (first.returncode, first.stdout, first.stderr) == (
        0, f"mp: key {key.public.fingerprint()} added to host:~/.mp/authorized_keys\n", "")
    dir_state, file_state, data, mtime = remote_files(sshd_host)
    assert dir_state == (0o700, uid) and file_state == (0o600, uid)
    assert data == (key.public.to_line() + "\n").encode()
    second = copy_id(sshd_host, f"{sshd_host.user.pw_name}@host")
    assert (second.returncode, second.stdout, second.stderr) == (
        0, f"mp: key {key.public.fingerprint()} is already in "
           f"{sshd_host.user.pw_name}@host:~/.mp/authorized_keys; nothing changed\n", "")
    assert remote_files(sshd_host) == (dir_state, file_state, data, mtime)


def test_copy_id_keeps_what_is_there_and_knows_the_openssh_form(sshd_host):
    key = laptop_key(sshd_host)
    other = make_key(os.path.join(sshd_host.dir, "other"), "bob@elsewhere")
    user = sshd_host.user
    mp_dir = os.path.join(user.pw_dir, ".mp")
    path = os.path.join(mp_dir, "authorized_keys")
    os.mkdir(mp_dir, 0o755)
    existing = other.public.to_line("ssh-ed25519").encode()  # no final newline
    with open(path, "wb") as f:
        f.write(existing)
    os.chmod(path, 0o644)
    for p in (mp_dir, path):
        os.chown(p, user.pw_uid, user.pw_gid)
    result = copy_id(sshd_host, "host")
    assert result.returncode == 0 and " added to host:" in result.stdout
    dir_state, file_state, data, _ = remote_files(sshd_host)
    assert (dir_state[0], file_state[0]) == (0o700, 0o600)  # tightened, as mps requires
    assert data == existing + b"\n" + (key.public.to_line() + "\n").encode()
    # The same key in OpenSSH's form, another comment, counts as present.
    with open(path, "wb") as f:
        f.write(key.public.to_line("ssh-ed25519").replace("alice@laptop", "old").encode())
    again = copy_id(sshd_host, "host")
    assert again.returncode == 0 and "is already in host:" in again.stdout
    # ...but not when commented out.
    with open(path, "wb") as f:
        f.write(b"# " + key.public.to_line().encode() + b"\n")
    commented = copy_id(sshd_host, "host")
    assert commented.returncode == 0 and " added to host:" in commented.stdout


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_copy_id_works_whatever_the_login_shell(tmp_path, sshd_binary, users, shell):
    host = SshdHost(os.fspath(tmp_path), users.user(shell=shell), sshd_binary)
    try:
        key = laptop_key(host)
        result = copy_id(host, "host")
        assert result.returncode == 0, result.stderr
        assert remote_files(host)[2] == (key.public.to_line() + "\n").encode()
    finally:
        host.close()


def test_copy_id_reports_ssh_failing_with_its_status(sshd_host):
    key = laptop_key(sshd_host)
    closed_port = free_port_range(1, socket.SOCK_STREAM)[0]
    result = copy_id(sshd_host, "--ssh-command", f"'ssh -p {closed_port}'", "host")
    assert result.returncode == 255 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"mp: could not add key {key.public.fingerprint()} to host:~/.mp/authorized_keys "
        "(ssh exited with status 255)")
    assert "Connection refused" in result.stderr  # ssh's own reason, passed through
    assert not os.path.exists(os.path.join(sshd_host.user.pw_dir, ".mp"))


def test_copy_id_without_a_key_says_how_to_make_one(sshd_host):
    result = copy_id(sshd_host, "host")
    pub = os.path.join(sshd_host.home, ".mp", "id_ed25519.pub")
    assert (result.returncode, result.stdout, result.stderr) == (
        255, "", f"mp: no public key at {pub}; create a key pair with: "
                 "python3 mp_keygen.py generate\n")


def test_copy_id_with_login_flag_authorizes_that_user(sshd_host):
    """``-l USER`` names the server user for --copy-id as for a login (ssh's rule: the
    first of -l and USER@ wins), so the key lands in that user's authorized_keys."""
    key = laptop_key(sshd_host)
    name = sshd_host.user.pw_name
    result = copy_id(sshd_host, "-l", name, "nobody@host")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"mp: key {key.public.fingerprint()} added to {name}@host:~/.mp/authorized_keys\n",
        "")
    assert remote_files(sshd_host)[2] == (key.public.to_line() + "\n").encode()
