"""Throwaway user accounts for tests that log in as someone else (useradd/userdel; root only).

The account tools (useradd, userdel, usermod, groupadd, groupdel) lock /etc/passwd and
/etc/group while they change them; ``account_tool`` runs them one at a time across every
test worker (a lock file), so the tests using accounts can run side by side. They used to be
kept in one xdist group instead, which ran all of them -- about 150 s of mostly waiting on
sshd, shells and outages -- one after the other on one worker, the longest path of the run.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import subprocess
import sys

import pytest
from proc_util import kill_pid
from server_util import write_authorized_keys


ACCOUNTS_LOCK_PATH = "/tmp/moshpit-tests-accounts.lock"


def account_tool(argv: list, check: bool = True) -> subprocess.CompletedProcess:
    """Run an account tool (useradd, usermod, ...) while no other test worker runs one."""
    with open(ACCOUNTS_LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run(argv, check=check, capture_output=True)


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
        account_tool(["groupadd", name])
        self.groups.append(name)
        return name

    def user(self, groups=(), shell="/bin/bash") -> pwd.struct_passwd:
        name = "mpu" + secrets.token_hex(3)
        # "*": no password, but not locked ("!", useradd's default), which mps refuses
        # without PAM as sshd does: a key-only account.
        argv = ["useradd", "-m", "-s", shell, "-p", "*"]
        if groups:
            argv += ["-G", ",".join(groups)]
        account_tool(argv + [name])
        self.users.append(name)
        return pwd.getpwnam(name)

    def cleanup(self):
        for name in self.users:
            for pid in _pids_of(pwd.getpwnam(name).pw_uid):
                kill_pid(pid, 2.0)
            account_tool(["userdel", "-r", name], check=False)
        for name in self.groups:
            account_tool(["groupdel", name], check=False)


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
