"""The attack of issue 10 class 1 against a real root mps.py: a local user who is authorized
nowhere flips their ~/.mp/authorized_keys among a regular file, a symlink to a root-only file
(holding a line that would let them in), a FIFO and a symlink to a terminal they own (typing
^C on it) while a burst of handshakes runs as them. They gain nothing: no login, no read of
the root-only file, no controlling terminal for the server, no hang, and the server keeps
serving. Also: mps started as a session leader serves from a child that cannot acquire a
terminal, and that child lives and dies with the PID that was started.

Uses throwaway accounts (root and useradd needed; skipped otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from server_util import MpsServer, TestClient, make_key
from users_util import authorize, python_for, users_fixture  # noqa: F401  (the `users` fixture)

import moshpit_handshake as hs
from proc_util import kill_pid, pid_alive, proc_children, wait_for

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd to create throwaway users"),
]

BURST_SECS = 6.0
HANDSHAKE_THREADS = 3
SERVER_DEADLINE_SECS = 5  # mps.handshake_timeout_secs: a handshake stuck on a FIFO ends here
SECRET_MARK = "not-a-key-SECRET-LINE"  # a read of the root-only file would log this line

# Runs as the attacker: flips the file until stdin closes, ^C on its own terminal each round.
FLIPPER = r"""
import json, os, sys, threading, time
target, secret = sys.argv[1], sys.argv[2]
master, slave = os.openpty()  # the slave is ours: a terminal only we could type on
os.set_blocking(master, False)
pty = os.ttyname(slave)
tmp = target + ".new"
kinds = ["file", "symlink-to-root-only", "fifo", "symlink-to-pty"]
flips = dict.fromkeys(kinds, 0)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
i = 0
while not stop.is_set():
    kind = kinds[i % len(kinds)]
    i += 1
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if kind == "file":
        with open(tmp, "w") as f:
            f.write("# nothing that lets anyone in\n")
    elif kind == "symlink-to-root-only":
        os.symlink(secret, tmp)
    elif kind == "fifo":
        os.mkfifo(tmp, 0o600)
    else:
        os.symlink(pty, tmp)
    os.rename(tmp, target)  # atomic: the path is always one of the four
    flips[kind] += 1
    try:
        os.write(master, b"\x03")  # ^C: SIGINT to a server that took this terminal
        os.read(master, 4096)  # drain the echo so writes never block
    except BlockingIOError:
        pass
    time.sleep(0.001)
print(json.dumps({"flips": flips, "pty": pty}), flush=True)
"""


def tty_nr(pid: int) -> int:
    """The controlling terminal of ``pid`` (0: none), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[4])


class Burst:
    """Handshakes as the attacker from several threads until ``stop``: outcomes and times."""

    def __init__(self, server: MpsServer, user: str, identity) -> None:
        self.server, self.user, self.identity = server, user, identity
        self.outcomes: list = []
        self.durations: list = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def _verify(self, key) -> None:
        assert key == self.server.host_key.public

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                hs.client_handshake("127.0.0.1", self.server.port, self.identity,
                                    hs.ClientRequest(self.user), self._verify, timeout=30)
                outcome = "LOGGED IN"
            except hs.HandshakeError as err:
                outcome = err.code
            with self._lock:
                self.outcomes.append(outcome)
                self.durations.append(time.monotonic() - start)

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._run, daemon=True)
                   for _ in range(HANDSHAKE_THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        self.stop.set()
        for thread in threads:
            thread.join(60)


def test_flipping_authorized_keys_gains_nothing(tmp_path, users):
    mallory, alice = users.user(), users.user()
    # Penalties and the start-up rate limit would refuse most of the burst at accept(); turned
    # off, every handshake reaches the authorized_keys read that the attack races against.
    # The per-source and MaxStartups caps go up to the hard cap too: a client sees its refusal
    # before the server's thread has released the slot, so on a loaded machine a few threads
    # of ended handshakes could fill 8 slots and turn a reconnect away as "server busy".
    settings = {"mps.handshake_timeout_secs": SERVER_DEADLINE_SECS, "verbose": 0,
                "mps.source_penalties": "no", "mps.max_startups_per_sec": 0,
                "mps.max_handshakes_per_source": 64, "mps.max_startups": "64:0:64"}
    with MpsServer(tmp_path, authorized_keys_file=False, settings=settings) as server:
        attacker_key = make_key(os.path.join(server.dir, "mallory_id"), "mallory")
        # A root-only file that would let mallory in, were root to read it for her.
        secret_dir = tmp_path / "root-only"
        secret_dir.mkdir(mode=0o700)
        secret = secret_dir / "keys"
        secret.write_text(f"{SECRET_MARK}\n{attacker_key.public.to_line()}\n")
        os.chmod(secret, 0o600)
        target = authorize(mallory, make_key(os.path.join(server.dir, "other"), "x"))
        # Every mps process: the started one and (forked before it listened) the serving one.
        pids = [server.proc.pid, *proc_children(server.proc.pid, recursive=False)]

        flipper = subprocess.Popen(
            [python_for(mallory), "-c", FLIPPER, target, str(secret)], cwd="/",
            user=mallory.pw_uid, group=mallory.pw_gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, start_new_session=True)
        ttys = set()
        watching = threading.Event()

        def watch_ttys():
            while not watching.is_set():
                ttys.update(tty_nr(pid) for pid in pids)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch_ttys, daemon=True)
        try:
            assert flipper.stdout.readline().strip() == "ready"
            watcher.start()
            burst = Burst(server, mallory.pw_name, attacker_key)
            burst.run(BURST_SECS)
            flipper.stdin.close()
            report = json.loads(flipper.stdout.readline())
            flipper.wait(10)
        finally:
            watching.set()
            kill_pid(flipper.pid, 2.0)
        watcher.join(5)

        outcomes = {code: burst.outcomes.count(code) for code in set(burst.outcomes)}
        print(f"\nflip burst: {len(burst.outcomes)} handshakes in {BURST_SECS:g} s "
              f"({outcomes}), {sum(report['flips'].values())} flips {report['flips']}, "
              f"max handshake {max(burst.durations):.3f} s, tty_nr seen {sorted(ttys)} "
              f"for pids {pids}")
        assert "LOGGED IN" not in outcomes
        assert set(outcomes) == {hs.PERMISSION_DENIED}
        assert len(burst.outcomes) >= 20  # the attack really ran
        assert ttys == {0}  # no mps process ever had a controlling terminal
        assert max(burst.durations) < SERVER_DEADLINE_SECS  # nobody waited on the FIFO
        log = server.log()
        assert SECRET_MARK not in log  # the root-only file was never parsed
        assert f"{target} is a symlink: refused" in log  # both symlinks, refused by name
        assert f"{target} is a FIFO, not a regular file: refused" in log
        assert f"is not authorized for {mallory.pw_name}" in log  # the regular file, read

        # The server still serves everyone, and still has no terminal.
        assert server.proc.poll() is None
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            assert client.run("id -un") == alice.pw_name
        assert {tty_nr(pid) for pid in pids} == {0}


def test_session_leader_start_serves_from_a_child(tmp_path):
    """Started as a session leader (as systemd starts it), mps forks once: the child serves
    and, not being a session leader, can never acquire a controlling terminal; signals to
    the started PID reach it, and the started PID exits with its status."""
    with MpsServer(tmp_path) as server:
        started, serving = server.proc.pid, server.serving_pid
        assert os.getsid(started) == started  # the test started it as a session leader
        assert serving != started
        assert os.getsid(serving) == started and os.getpgid(serving) == started
        server.wait_log(f"started (pid {serving},")  # logged just after "listening on"
        with TestClient.for_server(server).connect() as client:
            assert client.run("echo hello") == "hello"
        server.signal(signal.SIGHUP)
        server.wait_log("SIGHUP received: ignored")
        assert pid_alive(serving)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert "SIGTERM received" in server.log()
        assert not pid_alive(serving)


def test_killing_the_started_pid_ends_the_server(tmp_path):
    """SIGKILL of the PID a service manager knows ends the server too (the child notices
    its supervisor is gone), so nothing keeps the port after a hard stop."""
    with MpsServer(tmp_path) as server:
        serving = server.serving_pid
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        wait_for(lambda: not pid_alive(serving), 10, "the serving child to end")
