"""The session spawner forks each session process ahead of need (README "Process model"):
one waits before any login, holding nothing but the settings (no host key, no socket but the
one it waits on), a login takes it, the spawner forks the next one, and the waiting one
exits with the listener. Root only (throwaway users)."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest
from proc_util import kill_pid, open_fds, pid_alive, proc_children, wait_for
from server_util import MpsServer, TestClient
from test_procmodel import memory_contains, session_pid_of
from test_server_login import NO_PAM
from users_util import authorize, users_fixture  # noqa: F401  (the `users` fixture)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd to create throwaway users"),
]


def spawner_of(server: MpsServer) -> int:
    def find():
        for pid in proc_children(server.serving_pid, recursive=False):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"--session-spawner" in f.read():
                    return pid
        return 0
    return wait_for(find, 10, "the session spawner")


def waiting_process(spawner: int, sessions=()) -> int:
    """The spawner's child that is not one of ``sessions`` (the one waiting for a login)."""
    def find():
        waiting = [pid for pid in proc_children(spawner, recursive=False)
                   if pid not in sessions]
        return waiting[0] if len(waiting) == 1 else 0
    return wait_for(find, 10, "the session process forked ahead")


def test_a_session_process_waits_ready_and_holds_nothing(tmp_path, users):
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, udp_ports=2)
    session = 0
    try:
        authorize(alice, server.client_key)
        spawner = spawner_of(server)
        waiting = waiting_process(spawner)

        def sockets_held() -> list:
            fds = list(open_fds(waiting).values())
            return fds if sum(target.startswith("socket:") for target in fds) == 1 else []
        # Just forked, it still holds the spawner's sockets; it closes them at once and
        # then holds only the one it waits on.
        fds = wait_for(sockets_held, 10, "the waiting process to close the spawner's sockets")
        assert os.path.realpath(server.host_key_path) not in fds
        assert not memory_contains(waiting, server.host_key.seed)
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        session = session_pid_of(client)
        assert session == waiting  # the login took the waiting process
        assert client.run("id -un") == alice.pw_name
        following = waiting_process(spawner, sessions=(session,))
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        wait_for(lambda: not pid_alive(following), 10, "the waiting process to exit")
        assert pid_alive(session)  # the session goes on without the listener
        assert client.run("echo on") == "on"
    finally:
        server.stop()
        if session:
            kill_pid(session, 2.0)


# glibc's posix_spawn leaves its two internal signals (32, 33) ignored in the child: no
# glibc program can use or even change them, and a program that uses them installs its own.
GLIBC_INTERNAL_SIGNALS = (1 << 31) | (1 << 32)


def test_the_shell_starts_as_sshd_starts_it(tmp_path, users):
    """posix_spawn: the shell leads a session of its own with the PTY as its controlling
    terminal, holds no descriptor but the terminal (bash keeps a copy as 255), and what it
    runs has no signal ignored or blocked: not those mps ignores (SIGPIPE, SIGXFSZ, SIGINT,
    SIGHUP), nor those mps was started with ignored (SIGINT, SIGQUIT and SIGHUP, as
    `nohup mps.py &` from a script starts it)."""
    alice = users.user()
    inherited = {sig: signal.signal(sig, signal.SIG_IGN)
                 for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)}
    try:
        server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM)
    finally:
        for sig, handler in inherited.items():
            signal.signal(sig, handler)
    with server:
        with open(f"/proc/{server.serving_pid}/status") as f:
            ignored = int(re.search(r"^SigIgn:\s*(\w+)", f.read(), re.M).group(1), 16)
        assert ignored & (1 << (signal.SIGQUIT - 1)), "mps did not start as under nohup"
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            shell = int(client.run("echo $$"))
            assert os.getsid(shell) == shell
            assert client.run("ps -o tty= -p $$") == client.run("tty").replace("/dev/", "")
            status = dict(line.split(":\t", 1) for line in client.run(
                "grep -E '^Sig(Ign|Blk)' /proc/self/status").splitlines())
            assert int(status["SigIgn"], 16) & ~GLIBC_INTERNAL_SIGNALS == 0
            assert int(status["SigBlk"], 16) == 0
            # no descriptor of the session process (its sockets came over SCM_RIGHTS)
            assert sorted(client.run("command ls /proc/$$/fd").split()) == ["0", "1", "2", "255"]
            client.send("sleep 30; echo un''interrupted\n")  # its echo differs

            def sleep_in_foreground() -> bool:
                # The child exists before bash made its group the terminal's foreground (a
                # ^C in between reaches bash), and before it exec'd sleep (a ^C in between
                # meets bash's handler in the child, and sleep then runs on). /proc stat:
                # (comm), pgrp, tpgid.
                for child in proc_children(shell, recursive=False):
                    try:
                        with open(f"/proc/{child}/stat", "rb") as f:
                            comm, rest = f.read().rsplit(b")", 1)
                    except FileNotFoundError:
                        continue
                    fields = rest.split()
                    if comm.endswith(b"(sleep") and fields[2] == fields[5]:
                        return True
                return False
            wait_for(sleep_in_foreground, 10, "the sleep to run in the foreground")
            client.send("\x03")  # the terminal's ^C reaches its foreground group
            assert client.run("echo after") == "after"
            assert b"uninterrupted" not in client.output
