"""A real OpenSSH server on 127.0.0.1 for tests that run what a user types (``ssh host ...``,
``scp ... host:``, ``mp.py --copy-id host``), logging in as a throwaway user.

Why: the README's install and key steps go through the system ``ssh``/``scp``; only a real
``sshd`` shows whether they work as written (a background job that keeps the channel open,
an ``scp`` to a folder that does not exist, a login shell's ``~``).

    def test_x(sshd_host):                  # a fresh user and sshd for one test
        sshd_host.run("ssh host id -un")    # bash with PATH's ssh/scp bound to the host alias

``sshd_binary`` (session scope) installs openssh-server with apt-get when /usr/sbin/sshd is
missing, once per run; the test is skipped with apt's reason if that fails. The server gets
its own host key, config and free port, listens on 127.0.0.1 only, accepts only the throwaway
user's key, and is stopped by PID afterwards. The laptop side is the test process's user
(root) with its own ``HOME``: ``ssh`` and ``scp`` in ``bin/`` are wrappers adding ``-F`` with
a config for the alias ``host`` (ssh reads ~/.ssh/config from the passwd entry, not $HOME).
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
from typing import Dict, Optional

import pytest
from proc_util import ManagedProcess, wait_for
from server_util import free_port_range
from users_util import account_tool

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
POLICY_RC_D = "/usr/sbin/policy-rc.d"  # Debian: exit 101 = "do not start services"
APT_LOCK_WAIT_SECS = 300  # another apt run (a parallel helper, unattended-upgrades) may hold it
APT_TIMEOUT_SECS = 900
SSHD_READY_SECS = 15.0


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "-q", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_SECS}",
                           *args], env=env, capture_output=True, text=True,
                          timeout=APT_TIMEOUT_SECS, stdin=subprocess.DEVNULL)


def _install_openssh_server() -> Optional[str]:
    """Install openssh-server without letting its package start a daemon on 0.0.0.0:22 (a
    temporary policy-rc.d refuses service starts where none is in place). Returns why it
    could not, or None."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "sshd is not installed and apt-get cannot install it here (needs root, Debian)"
    own_policy = not os.path.exists(POLICY_RC_D)
    if own_policy:
        with open(POLICY_RC_D, "w") as f:
            f.write("#!/bin/sh\n# moshpit tests: no service starts during apt-get install\n"
                    "exit 101\n")
        os.chmod(POLICY_RC_D, 0o755)
    try:
        install = ("install", "-y", "--no-install-recommends", "openssh-server")
        result = _apt(*install)
        if result.returncode != 0:  # stale or missing package lists: update once, retry
            _apt("update")
            result = _apt(*install)
    finally:
        if own_policy:
            os.remove(POLICY_RC_D)
    if result.returncode != 0 or not os.path.exists(SSHD):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install openssh-server failed: {tail[0]}"
    return None


@pytest.fixture(scope="session", name="sshd_binary")
def sshd_binary_fixture() -> str:
    """/usr/sbin/sshd, installed first if missing (once per test run). Import
    ``sshd_binary_fixture`` and take an ``sshd_binary`` argument."""
    if not os.path.exists(SSHD):
        why = _install_openssh_server()
        if why:
            pytest.skip(why)
    if not shutil.which("ssh") or not shutil.which("scp"):
        pytest.skip("the OpenSSH client (ssh, scp) is not installed")
    return SSHD


class SshdHost:
    """sshd on 127.0.0.1:``port`` letting ``user`` log in with ``client_key`` (nothing else),
    and a laptop side in ``dir`` whose ``ssh``/``scp`` know that server as ``host``.
    ``extra_config``: more sshd_config lines (e.g. ``SetEnv PATH=...``)."""

    def __init__(self, base_dir: str, user: pwd.struct_passwd, sshd: str = SSHD,
                 extra_config: str = ""):
        self.dir = os.path.join(base_dir, "ssh")
        self.user = user
        self.home = os.path.join(self.dir, "laptop-home")  # the laptop user's HOME
        self.bin = os.path.join(self.dir, "bin")
        for path in (self.dir, self.home, self.bin):
            os.makedirs(path, mode=0o700)
        self.port = free_port_range(1, socket.SOCK_STREAM)[0]
        self.host_key = os.path.join(self.dir, "ssh_host_ed25519_key")
        self.client_key = os.path.join(self.dir, "id_ed25519")
        for path, comment in ((self.host_key, "sshd-test-host"), (self.client_key, "laptop")):
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment,
                            "-f", path], check=True, capture_output=True, timeout=30)
        self._authorize_ssh_key()
        # sshd refuses accounts whose password field starts with "!" (useradd's default,
        # "locked") unless PAM decides: "*" is "no password", and logins by key still work.
        account_tool(["usermod", "-p", "*", user.pw_name])
        self.sshd_config = os.path.join(self.dir, "sshd_config")
        with open(self.sshd_config, "w") as f:
            f.write(f"""\
ListenAddress 127.0.0.1:{self.port}
HostKey {self.host_key}
PidFile none
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AllowUsers {user.pw_name}
AuthorizedKeysFile .ssh/authorized_keys
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
{extra_config}""")
        self.ssh_config = os.path.join(self.dir, "ssh_config")
        with open(self.ssh_config, "w") as f:
            f.write(f"""\
Host host
    HostName 127.0.0.1
    Port {self.port}
    User {user.pw_name}
    IdentityFile {self.client_key}
    IdentitiesOnly yes
    UserKnownHostsFile {os.path.join(self.dir, "known_hosts")}
    StrictHostKeyChecking accept-new
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
""")
        for tool in ("ssh", "scp"):
            self.wrap(tool)
        self.log_path = os.path.join(self.dir, "sshd.log")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.proc = ManagedProcess([sshd, "-D", "-e", "-f", self.sshd_config],
                                   log=self.log_path)
        try:
            wait_for(self._listening, SSHD_READY_SECS, "sshd to listen")
        except BaseException:
            self.close()
            raise

    def wrap(self, tool: str, *options: str) -> None:
        """Make ``tool`` on the laptop's PATH the system one with our config and ``options``
        (``wrap("scp", "-O")``: the legacy SCP protocol, OpenSSH 8.9's default as on Ubuntu
        22.04, where 9.0 and newer use SFTP)."""
        wrapper = os.path.join(self.bin, tool)
        argv = [shutil.which(tool), "-F", self.ssh_config, *options]
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.join(argv)} \"$@\"\n")
        os.chmod(wrapper, 0o755)

    def _authorize_ssh_key(self) -> None:
        ssh_dir = os.path.join(self.user.pw_dir, ".ssh")
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        with open(self.client_key + ".pub") as pub, \
                open(os.path.join(ssh_dir, "authorized_keys"), "w") as out:
            out.write(pub.read())
        for path in (ssh_dir, os.path.join(ssh_dir, "authorized_keys")):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {self.proc.poll()}: {self.proc.read_log()}")
        lines = re.findall(r"Server listening on (\S+) port (\d+)", self.proc.read_log())
        if lines and lines != [("127.0.0.1", str(self.port))]:
            raise AssertionError(f"sshd listens beyond 127.0.0.1:{self.port}: {lines}")
        return bool(lines)

    def env(self, **extra: str) -> Dict[str, str]:
        """The laptop user's environment: our ssh/scp wrappers first on PATH, HOME in tmp."""
        return {"HOME": self.home, "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin')}",
                "LANG": "C.UTF-8", **extra}

    def run(self, script: str, cwd: Optional[str] = None, timeout: float = 60.0,
            **env: str) -> subprocess.CompletedProcess:
        """``script`` through ``bash -e`` on the laptop side, stdin closed; text output."""
        return subprocess.run(["bash", "-e", "-c", script], env=self.env(**env), cwd=cwd,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def remote(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``command`` run by the user's login shell on the server, through ssh."""
        return subprocess.run([os.path.join(self.bin, "ssh"), "host", command],
                              env=self.env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def close(self) -> None:
        self.proc.close()


@pytest.fixture(name="sshd_host")
def sshd_host_fixture(sshd_binary, users, tmp_path):
    """A throwaway user on a fresh sshd at 127.0.0.1 (the alias ``host``), stopped after.
    Import ``sshd_host_fixture``, ``sshd_binary_fixture`` and users_util.users_fixture."""
    host = SshdHost(os.fspath(tmp_path), users.user(), sshd_binary)
    try:
        yield host
    finally:
        host.close()
