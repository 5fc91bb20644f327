"""``mp.py --ssh host``: a session with nothing installed on the server, through a real sshd on
loopback logging in a throwaway user who has no moshpit files, no moshpit keys and no
known_hosts entry. The server's Python comes from sshd's ``SetEnv PATH=...``: a directory
whose ``python3`` has cryptography (a copy of ours, readable by the user), lacks it, or is
missing. Checks what the user sees, the exit status, that ssh is gone once the session runs,
and that nothing was written on the server's disk."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile

import cryptography
import pytest
from proc_util import ManagedProcess, PtyProcess, wait_for
from relay import free_port
from server_util import REPO
from sshd_util import SshdHost, sshd_binary_fixture  # noqa: F401  (the `sshd_binary` fixture)
from test_client_session import QUICK_RESUME
from test_forwarding import echo_fixture, echo_works  # noqa: F401  (the `echo` fixture)
from users_util import _pids_of, users_fixture  # noqa: F401  (the `users` fixture)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for sshd and throwaway users"),
]

MP = os.path.join(REPO, "mp.py")
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module", name="pythons")
def pythons_fixture():
    """Directories for the server's PATH, readable by any user: ``good`` (python3 = the
    system Python with a copy of our cryptography), ``bare`` (python3 without
    site-packages: no cryptography) and ``empty`` (no Python at all)."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"no {SYSTEM_PYTHON} for the throwaway user to run")
    base = tempfile.mkdtemp(prefix="mp-ssh-pythons-")
    try:
        os.chmod(base, 0o755)
        shutil.copytree(os.path.dirname(cryptography.__file__),
                        os.path.join(base, "site", "cryptography"))
        for name, line in (
                ("good", f"PYTHONPATH={base}/site exec {SYSTEM_PYTHON} \"$@\""),
                ("bare", f"exec {SYSTEM_PYTHON} -S \"$@\""),
                ("empty", None)):
            os.mkdir(os.path.join(base, name))
            if line:
                path = os.path.join(base, name, "python3")
                with open(path, "w") as f:
                    f.write(f"#!/bin/sh\n{line}\n")
                os.chmod(path, 0o755)
        for root, dirs, files in os.walk(base):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755)
        probe = subprocess.run(
            [os.path.join(base, "good", "python3"), "-c",
             "import sys; from cryptography.hazmat.primitives.asymmetric import ed25519;"
             " sys.exit(sys.version_info < (3, 9))"],
            user="nobody", capture_output=True, cwd="/", timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"{SYSTEM_PYTHON} cannot use a copy of our cryptography: "
                        f"{probe.stderr.decode(errors='replace').strip()[-200:]}")
        yield {name: os.path.join(base, name) for name in ("good", "bare", "empty")}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="make_host")
def make_host_fixture(sshd_binary, users, tmp_path):
    """``make_host(path, shell)``: a throwaway user (login shell ``shell``) on a fresh sshd
    whose sessions get PATH=path."""
    made = []

    def make(path: str, shell: str = "/bin/bash") -> SshdHost:
        host = SshdHost(os.fspath(tmp_path), users.user(shell=shell), sshd_binary,
                        extra_config=f"SetEnv PATH={path}\n")
        made.append(host)
        return host
    try:
        yield make
    finally:
        for host in made:
            host.close()


def written_by(uid: int, home: str) -> set:
    """Every file under ``home`` (with its mtime), and whatever ``uid`` owns in the
    temporary directories: what a bootstrap could have left on the server's disk."""
    found = set()
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            path = os.path.join(root, name)
            found.add((path, os.lstat(path).st_mtime_ns))
    for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        for root, dirs, files in os.walk(tmp):
            for name in dirs + files:
                path = os.path.join(root, name)
                try:
                    if os.lstat(path).st_uid == uid:
                        found.add((path, 0))
                except FileNotFoundError:
                    pass
    return found


def children(pid: int, name: str) -> list:
    """PIDs of ``pid``'s children running ``name``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if comm == name and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def process_names(uid: int) -> list:
    names = []
    for pid in _pids_of(uid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                names.append(f.read().split(b"\0")[0].decode(errors="replace"))
        except FileNotFoundError:
            pass
    return names


def client_log(host: SshdHost) -> str:
    """mp's log file on the laptop side."""
    return os.path.join(host.home, ".config", "moshpit", "logs", "moshpit.log")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def bootstrapped_server(uid: int) -> int:
    """The pid of the one-session server ssh started for ``uid`` (the stub's python)."""
    return next((pid for pid in _pids_of(uid) if _is_stub_python(pid)), 0)


def _is_stub_python(pid: int) -> bool:
    """Whether ``pid`` is the stub's python (the one-session server or a fork of it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sys.stdin.buffer" in f.read()
    except FileNotFoundError:
        return False


def test_a_session_through_ssh_runs_leaves_ssh_and_writes_nothing(make_host, pythons):
    host = make_host(pythons["good"])
    uid = host.user.pw_uid
    before = written_by(uid, host.user.pw_dir)
    with PtyProcess([sys.executable, MP, "--ssh", "host"], env=host.env()) as term:
        term.read_until("$ ", 30)  # the throwaway user's bash prompt
        term.send("unset HISTFILE; echo $((6*7)) $USER\r")
        term.read_until(f"42 {host.user.pw_name}", 15)
        # The session goes on without ssh: mp's ssh has exited by itself (the server
        # detached), and so has sshd's session process for the user.
        assert children(term.pid, "ssh") == []
        assert "(modules sent, ssh exit status 0)" in read(client_log(host))
        wait_for(lambda: not any(name.startswith("sshd") for name in process_names(uid)),
                 10, "sshd's session for the user to end")
        term.send("exit 3\r")
        assert term.wait(15) == 3
    # The one-session server ends with its session.
    wait_for(lambda: not _pids_of(uid), 15, "the user's processes to end")
    assert written_by(uid, host.user.pw_dir) == before


def test_a_bootstrapped_session_resumes_after_an_outage(make_host, pythons):
    """The server (its listener and session process: one process group) stops answering
    (SIGSTOP) past the client's resume time: the client hops and resumes with a handshake
    to the same one-session server (pinned host key, this session's key), and nothing typed
    meanwhile is lost."""
    host = make_host(pythons["good"])
    log_path = client_log(host)
    with PtyProcess([sys.executable, MP, "--ssh", "host"],
                    env={**host.env(), **QUICK_RESUME}) as term:
        term.read_until("$ ", 30)
        server = wait_for(lambda: bootstrapped_server(host.user.pw_uid), 10, "the server")
        group = os.getpgid(server)
        os.killpg(group, signal.SIGSTOP)
        try:
            term.send("unset HISTFILE; echo $((7*8))\r")
            wait_for(lambda: "resume handshake #1" in read(log_path), 20,
                     "the client to try a resume")
        finally:
            os.killpg(group, signal.SIGCONT)
        term.read_until("56", 20)
        wait_for(lambda: "session resumed" in read(log_path), 20, "the resume")
        term.send("exit 4\r")
        assert term.wait(15) == 4


def test_forwarding_only_through_ssh(make_host, pythons, echo, tmp_path):
    """mp --ssh -N -L: the one-session server forwards as mps does (the user can forward
    with ssh already) and, -N, runs nothing for the session: no shell, no PTY. Ctrl-C
    ends mp, the session and the server."""
    host = make_host(pythons["good"])
    uid = host.user.pw_uid
    port = free_port()
    argv = [sys.executable, MP, "--ssh", "-N", "-L", f"{port}:127.0.0.1:{echo.port}", "host"]
    with ManagedProcess(argv, env=host.env(), log=tmp_path / "mp.out") as mp:
        wait_for(lambda: echo_works(port), 30, "the -L forward")
        server = bootstrapped_server(uid)
        assert server
        # Once sshd's session for the bootstrap is gone, only the server and the processes it
        # forked (its spawner, the session process) run as the user: no shell at all.
        def server_alone():
            pids = _pids_of(uid)
            return server in pids and all(_is_stub_python(pid) for pid in pids)
        wait_for(server_alone, 10, "the server alone to run as the user")
        assert echo_works(port)
        mp.signal(signal.SIGINT)
        assert mp.wait(20) == 255, mp.read_log()
        assert "Traceback" not in mp.read_log()
    wait_for(lambda: not _pids_of(uid), 15, "the one-session server to end")


@pytest.mark.parametrize("python, expected", [
    ("bare", r"mp: host: Python 3\.\d+\.\d+ \(/usr/bin/python3\) cannot use cryptography "
             r"\(ModuleNotFoundError: No module named 'cryptography'\): install it on"
             r" the server: `apt install python3-cryptography`, `dnf install "
             r"python3-cryptography`, `apk add py3-cryptography` or `pip install --user "
             r"cryptography`"),
    ("empty", r"mp: host has no Python 3\.9 or newer: install Python 3\.9 or newer on the "
              r"server \(`apt install python3`, `dnf install python3`, `apk add python3`\)"),
])
def test_a_server_without_what_moshpit_needs_is_one_clear_line(make_host, pythons, python,
                                                               expected):
    host = make_host(pythons[python])
    result = host.run(f"{sys.executable} {MP} --ssh host")
    assert result.returncode == 255
    assert re.fullmatch(expected + "\n", result.stderr), result.stderr
    assert result.stdout == ""


def ssh_cmd(host: SshdHost, key: str) -> str:
    """An ssh with every option on its command line (no config file, no alias)."""
    return (f"ssh -F /dev/null -p {host.port} -i {key} -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={host.dir}/known_hosts -o StrictHostKeyChecking=accept-new"
            f" -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=10")


@pytest.mark.parametrize("shell", ["/bin/bash", "/usr/bin/zsh", "/usr/bin/fish"])
def test_ssh_cmd_with_options_and_a_command(make_host, pythons, shell):
    """Any login shell runs the bootstrap command (it only execs /bin/sh); the remote
    command then runs in that shell, as with ssh."""
    if not os.path.exists(shell):
        pytest.skip(f"{shell} is not installed")
    host = make_host(pythons["good"], shell)
    destination = f"{host.user.pw_name}@127.0.0.1"
    result = host.run(f"{sys.executable} {MP} --ssh --ssh-cmd '{ssh_cmd(host, host.client_key)}'"
                      f" {destination} -- 'expr 6 + 36; exit 5'")
    assert (result.returncode, result.stdout, result.stderr) == (5, "42\n", "")


def test_an_ssh_failure_is_summarized(make_host, pythons):
    host = make_host(pythons["good"])
    stranger = os.path.join(host.dir, "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger], check=True,
                   capture_output=True, timeout=30)
    destination = f"{host.user.pw_name}@127.0.0.1"
    result = host.run(f"{sys.executable} {MP} --ssh --ssh-cmd '{ssh_cmd(host, stranger)}'"
                      f" {destination}")
    assert result.returncode == 255
    assert result.stderr == (f"mp: ssh to {destination} failed: {destination}: Permission "
                             "denied (publickey).\n")


def test_ssh_cache_keeps_the_modules_checked_by_their_hash(make_host, pythons):
    host = make_host(pythons["good"])
    cache = os.path.join(host.user.pw_dir, ".cache", "moshpit")

    def run_and_say() -> str:
        result = host.run(f"{sys.executable} {MP} --ssh --ssh-cache host -- echo ok")
        assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
        said = re.findall(r"bootstrapped over ssh \(modules ([a-z ]+),", read(client_log(host)))
        return said[-1]

    def cached_file() -> tuple:
        [name] = os.listdir(cache)
        path = os.path.join(cache, name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        info, top = os.stat(path), os.stat(cache)
        assert name == f"moshpit-{digest}.pyz"
        assert (stat.S_IMODE(top.st_mode), stat.S_IMODE(info.st_mode)) == (0o700, 0o600)
        assert top.st_uid == info.st_uid == host.user.pw_uid
        return path, info.st_mtime_ns

    assert run_and_say() == "sent"
    path, mtime = cached_file()
    assert run_and_say() == "cached on the server"
    assert cached_file() == (path, mtime)  # read, not rewritten
    with open(path, "r+b") as f:  # a damaged (or planted) copy is never run
        f.write(b"PK\x03\x04 not the bundle")
    assert run_and_say() == "sent"
    assert cached_file()[0] == path


def test_from_moshpit_pyz_the_server_gets_that_files_sources(make_host, pythons, tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    build = tmp_path / "dist"
    made = subprocess.run(["make", "-s", "dist", f"DIST={build}", f"PYTHON={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    pyz = os.path.join(build, "moshpit.pyz")
    host = make_host(pythons["good"])
    result = host.run(f"{sys.executable} {pyz} mp --ssh --ssh-cache host -- echo ok")
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
    cache = os.path.join(host.user.pw_dir, ".cache", "moshpit")
    [name] = os.listdir(cache)
    # That file's sources, byte for byte (its .pyc stay home: the server compiles them)
    with zipfile.ZipFile(os.path.join(cache, name)) as sent, zipfile.ZipFile(pyz) as built:
        sources = [info for info in built.infolist() if info.filename.endswith(".py")]
        assert len(sources) * 2 == len(built.infolist())
        assert [(info.filename, info.date_time) for info in sent.infolist()] == [
            (info.filename, info.date_time) for info in sources]
        assert all(sent.read(info.filename) == built.read(info) for info in sources)
