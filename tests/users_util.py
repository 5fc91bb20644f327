"""Throwaway user accounts for tests that log in as someone else (useradd/userdel; root only).

Tests using them carry ``pytest.mark.xdist_group("users")``: useradd/userdel lock
/etc/passwd, so only one such test runs at a time.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys

import pytest
from proc_util import kill_pid
from server_util import write_authorized_keys


def _pids_of(uid: int) -> list:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except FileNotFoundError:
                pass
    return pids


class Users:
    """Creates throwaway users and groups; removes them (and stops their processes, by PID)
    at teardown."""

    def __init__(self):
        self.users, self.groups = [], []

    def group(self) -> str:
        name = "mpg" + secrets.token_hex(3)
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self.groups.append(name)
        return name

    def user(self, groups=(), shell="/bin/bash") -> pwd.struct_passwd:
        name = "mpu" + secrets.token_hex(3)
        # "*": no password, but not locked ("!", useradd's default), which mps refuses
        # without PAM as sshd does: a key-only account.
        argv = ["useradd", "-m", "-s", shell, "-p", "*"]
        if groups:
            argv += ["-G", ",".join(groups)]
        subprocess.run(argv + [name], check=True, capture_output=True)
        self.users.append(name)
        return pwd.getpwnam(name)

    def cleanup(self):
        for name in self.users:
            for pid in _pids_of(pwd.getpwnam(name).pw_uid):
                kill_pid(pid, 2.0)
            subprocess.run(["userdel", "-r", name], capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture(name="users")
def users_fixture():
    """Throwaway accounts for one test: import ``users_fixture`` into the test module and
    take a ``users`` argument."""
    made = Users()
    try:
        yield made
    finally:
        made.cleanup()


def authorize(pw: pwd.struct_passwd, *keys) -> str:
    """Put ``keys`` in the user's own ~/.mp/authorized_keys (owned by them, 0600 in 0700)."""
    path = os.path.join(pw.pw_dir, ".mp", "authorized_keys")
    write_authorized_keys(path, *(key.public for key in keys), owner=pw)
    return path


def python_for(pw: pwd.struct_passwd) -> str:
    """An interpreter with `cryptography` that ``pw`` can run (ours may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import cryptography"], user=pw.pw_uid,
                                   group=pw.pw_gid, extra_groups=[], capture_output=True,
                                   cwd="/", timeout=30)
        except OSError:  # e.g. under /root, which others cannot enter
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python with cryptography that {pw.pw_name} may run")
