"""The process model (README "Process model"): each session in a process of its own that is
the target user and never held the host key; a crash ends one session only; sessions outlive
the listener, and a new listener hands resumes, listings and takeovers to them.

Root only (throwaway users, utmp); the sessions are ended by PID at the end of each test (they
outlive the server on purpose, so MpsServer.stop's process-group kill may miss them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import moshpit_ipc
import moshpit_login
import pytest
from proc_util import kill_pid, open_fds, parent_pid, pid_alive, wait_for
from server_util import MpsServer, TestClient, run_mps
from test_server_login import (NO_PAM, private_etc, utmp,  # noqa: F401
                               who)  # (utmp, private_etc: fixtures)
from users_util import authorize, users_fixture  # noqa: F401  (the `users` fixture)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd to create throwaway users"),
]


def status_fields(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def memory_contains(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of ``pid`` (/proc/PID/mem)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or line.rstrip().endswith("[vvar]"):
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            try:
                mem.seek(start)
                found = found or needle in mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue  # a region the kernel will not hand out (guard pages, vsyscall)
    return found


def session_pid_of(client: TestClient) -> int:
    return parent_pid(int(client.run("echo $$")))


def test_session_process_is_the_user_and_holds_no_host_key(tmp_path, users):
    extra = users.group()
    alice = users.user(groups=[extra])
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM) as server:
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            pid = session_pid_of(client)
            assert pid != server.serving_pid
            status = status_fields(pid)
            assert status["Uid"].split() == [str(alice.pw_uid)] * 4  # real, eff, saved, fs
            assert status["Gid"].split() == [str(alice.pw_gid)] * 4
            assert set(status["Groups"].split()) == {
                str(g) for g in os.getgrouplist(alice.pw_name, alice.pw_gid)}
            for capabilities in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(status[capabilities], 16) == 0, capabilities
            host_key_file = os.path.realpath(server.host_key_path)
            fds = list(open_fds(pid).values())
            assert host_key_file not in fds
            with open(f"/proc/{pid}/maps") as maps:
                assert host_key_file not in maps.read()
            seed = server.host_key.seed
            assert not memory_contains(pid, seed)
            assert memory_contains(server.serving_pid, seed)  # the scan does find it there
            assert client.run("id -un") == alice.pw_name


def test_a_crashed_session_ends_alone(tmp_path, users, utmp):  # noqa: F811
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM,
                   udp_ports=3) as server:
        authorize(alice, server.client_key)
        doomed = TestClient.for_server(server, user=alice.pw_name).connect()
        other = TestClient.for_server(server, user=alice.pw_name).connect()
        doomed_shell = int(doomed.run("echo $$"))
        crashed = parent_pid(doomed_shell)
        assert len(who(alice.pw_name)) == 2
        os.kill(crashed, signal.SIGSEGV)
        name = doomed.grant.session_id[:4].hex()
        server.wait_log(f"session {name} of {alice.pw_name}: its process {crashed} was "
                        "killed by SIGSEGV")
        wait_for(lambda: not pid_alive(doomed_shell), 10, "the crashed session's shell to end")
        wait_for(lambda: len(who(alice.pw_name)) == 1, 10, "its utmp record to be closed")
        assert other.run("echo still fine") == "still fine"
        with TestClient.for_server(server, user=alice.pw_name).connect() as new:
            assert new.run("id -un") == alice.pw_name
        doomed.close()
        other.close()


def test_sessions_outlive_a_listener_restart_with_nothing_lost(tmp_path, users):
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, udp_ports=3)
    sessions = []
    try:
        authorize(alice, server.client_key)
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        idle = TestClient.for_server(server, user=alice.pw_name).connect()
        sessions = [session_pid_of(client), session_pid_of(idle)]
        client.send("stty -echo; cat > ~/typed\n")
        typed = []
        for i in range(60):
            if i == 20:
                server.signal(signal.SIGTERM)  # restart while typing
                assert server.proc.wait(15) == 0
            if i == 30:
                server.start()
                server.wait_log("claimed running session")
            if i == 40:
                client.resume()  # through the new listener, to the same session process
            line = f"line {i}\n"
            typed.append(line)
            client.send(line)
            client.pump(0.05)
        client.send("\x04")
        assert client.run("cat ~/typed") .replace("\n", "") == "".join(typed).replace("\n", "")
        assert session_pid_of(client) == sessions[0]  # the same process, never restarted
        listed = {info.session_id for info in client.sessions()}
        assert listed == {client.grant.session_id, idle.grant.session_id}
        with TestClient.for_server(server, user=alice.pw_name).attach(
                idle.grant.session_id) as taken:
            assert taken.run("echo taken") == "taken"
            wait_for(lambda: idle.pump(0.1) or idle.shutdown_reason, 10, "the takeover notice")
        client.kill(client.grant.session_id)
        wait_for(lambda: not pid_alive(sessions[0]), 10, "the killed session to end")
        # logged by the listener's reader thread once it sees the channel close: a moment later
        wait_for(lambda: re.search(r"its process \d+ has ended", server.log()), 10,
                 "the listener to log the end")
    finally:
        server.stop()
        for pid in sessions:
            kill_pid(pid, 2.0)


def test_stop_sessions_with_no_listener_running(tmp_path, users):
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, udp_ports=2)
    try:
        authorize(alice, server.client_key)
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        pid = session_pid_of(client)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        result = run_mps(["--stop-sessions", "-c", server.config_path], server.env)
        assert (result.returncode, result.stdout) == (0, "mps: ended 1 session(s)\n")
        wait_for(lambda: client.pump(0.1) or client.shutdown_reason, 10, "the shutdown notice")
        wait_for(lambda: not pid_alive(pid), 10, "the session process to exit")
    finally:
        server.stop()


def test_pam_session_runs_in_the_session_process(tmp_path, users, private_etc):  # noqa: F811
    """pam_open_session runs for each login (as root, in its session process, before the
    uid change): the variables pam_env sets reach the shell, which stays the user."""
    if moshpit_login.libpam() is None:
        pytest.skip("no libpam on this machine (apt-get install libpam0g)")
    alice = users.user()
    env_conf = tmp_path / "pam_env.conf"
    env_conf.write_text("MOSHPIT_PAM_SESSION DEFAULT=opened\n")
    python = private_etc({"pam.d/moshpit": "account required pam_permit.so\n"
                                           f"session required pam_env.so readenv=0"
                                           f" conffile={env_conf}\n"})
    with MpsServer(tmp_path, authorized_keys_file=False, python=python) as server:
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            assert client.run("echo $MOSHPIT_PAM_SESSION $(id -un)") == f"opened {alice.pw_name}"
            assert client.run("echo $TERM") == "xterm"  # PAM adds, never replaces


def test_sessions_get_the_limits_mps_started_with(tmp_path):
    """mps raises its own descriptor limit; its spawner starts before that, so a session
    (and its shell) has the soft limit mps was started with."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nulimit -S -n 512\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    with MpsServer(tmp_path, python=str(wrapper)) as server, \
            TestClient.for_server(server).connect() as client:
        assert client.run("ulimit -S -n") == "512"
        with open(f"/proc/{server.serving_pid}/limits") as f:
            listener = next(line for line in f if line.startswith("Max open files"))
        assert int(listener.split()[3]) > 512  # the listener raised its own


FAKE_SESSION = """
import json, socket, struct, sys, time
listener = socket.socket(fileno=int(sys.argv[2]))
listener.listen(1)  # SO_PEERCRED of a connection to it: this process, this uid
print("listening", flush=True)
conn, _ = listener.accept()
conn.recv(65536)  # the claim
for batch in [[json.loads(sys.argv[1])]] + json.loads(sys.argv[3]):  # the answer, then more
    for message in batch:
        body = json.dumps(message).encode()
        conn.sendall(struct.pack(">I", len(body)) + body)
    time.sleep(0.5)
conn.recv(1)
"""


def fake_session(server: MpsServer, user, state: dict, after=(),
                 socket_id: str = "") -> subprocess.Popen:
    """A process of ``user``'s answering on a session socket of ``server`` (before it
    starts) as a session process would: ``state`` to the claim, then each batch of
    messages in ``after``, half a second apart. It prints "listening" when ready. The
    socket is named for ``state``'s session, or for ``socket_id`` (hex)."""
    directory = f"/run/moshpit/port-{server.port}"
    os.makedirs(directory, mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(directory, (socket_id or state["session_id"]["hex"])[:16] + ".sock"))
    try:
        return subprocess.Popen(["/usr/bin/python3", "-c", FAKE_SESSION, json.dumps(state),
                                 str(sock.fileno()), json.dumps(list(after))],
                                pass_fds=(sock.fileno(),), user=user.pw_uid,
                                group=user.pw_gid, extra_groups=[], cwd="/",
                                stdout=subprocess.PIPE)
    finally:
        sock.close()


def fake_state(server: MpsServer, user) -> dict:
    """A claim's answer for a session of ``user`` (a made-up one)."""
    return {"ipc_version": moshpit_ipc.IPC_VERSION,
            "session_id": {"hex": os.urandom(16).hex()}, "user": user.pw_name,
            "client_key": server.client_key.public.to_line(),
            "resume_secret": {"hex": "00" * 32}, "replaced_secrets": [], "udp_port": 1,
            "pid": 1, "shell_pid": 1, "tty": "", "client_address": "192.0.2.1",
            "logged_out": False}


def test_a_session_process_cannot_claim_another_users_session(tmp_path, users):
    """The attack: a process running as alice answers on a session socket (as a hijacked
    session process of hers would) claiming to serve bob's session; the listener checks
    SO_PEERCRED (alice's uid) against bob's and does not take it."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs /usr/bin/python3 for the fake session process")
    alice, bob = users.user(), users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, start=False)
    fake = fake_session(server, alice, fake_state(server, bob))  # alice's, claiming bob's
    assert_not_claimed(server, fake, bob,
                       f"is served by uid {alice.pw_uid}, not by {bob.pw_name}'s: not claimed")


def assert_not_claimed(server: MpsServer, fake: subprocess.Popen, user, refusal: str) -> None:
    """Start ``server`` beside ``fake`` (fake_session): its log says ``refusal`` and
    ``user`` is shown no session; the fake is ended."""
    try:
        assert fake.stdout.readline() == b"listening\n"
        authorize(user, server.client_key)
        with server.start():
            server.wait_log(refusal)
            assert TestClient.for_server(server, user=user.pw_name).sessions() == []
    finally:
        kill_pid(fake.pid, 2.0)


def test_a_session_process_cannot_claim_another_session_of_its_user(tmp_path, users):
    """The attack: a hijacked session process of alice's answers the claim with the id of
    another of her sessions, to take its resumes; the listener holds it to the id its
    socket was named for by root, and does not take it."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs /usr/bin/python3 for the fake session process")
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, start=False)
    state = fake_state(server, alice)
    fake = fake_session(server, alice, state, socket_id=os.urandom(16).hex())
    assert_not_claimed(server, fake, alice, "answers for another session "
                                            f"({state['session_id']['hex'][:8]}): not claimed")


def relayed(text: str) -> dict:
    return {"op": "log", "name": "moshpit.server", "level": 20, "text": text}


def test_a_session_process_cannot_forge_log_lines(tmp_path, users):
    """The attack: a session process of alice's (a stand-in answering the listener's claim
    as a hijacked one would) relays a record holding a newline and then a line made to
    look like the listener's, then a flood. The log shows the record on one line, marked
    as alice's session, and the flood cut at the rate limit, the drops said."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs /usr/bin/python3 for the fake session process")
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, start=False)
    state = fake_state(server, alice)
    prefix = f"[{state['session_id']['hex'][:8]} {alice.pw_name}]"
    forged = "hello\n2026-11-30T22:00:00.000 INFO  mps stopped"
    flood = [relayed(f"flood {i}") for i in range(1000)]
    fake = fake_session(server, alice, state, [[relayed(forged)] + flood,
                                               [relayed("after the flood")]])
    try:
        assert fake.stdout.readline() == b"listening\n"
        with server.start():
            lines = server.wait_log(f"{prefix} after the flood").splitlines()
            assert any(line.endswith(f"INFO  {prefix} hello^J2026-11-30T22:00:00.000 INFO  mps"
                                     " stopped") for line in lines)
            assert not any(line.startswith("2026-11-30T22:00:00.000") for line in lines)
            flooded = sum(f"{prefix} flood " in line for line in lines)
            assert moshpit_ipc.LOG_BURST - 1 <= flooded < moshpit_ipc.LOG_BURST + 20
            assert any(re.search(rf"WARNING {re.escape(prefix)} \d+ log line\(s\) dropped: ",
                                 line) for line in lines)
    finally:
        kill_pid(fake.pid, 2.0)


def test_a_restarted_listener_gets_held_log_lines_and_the_shell_exit_status(tmp_path, users):
    """A session process holds no descriptor of the log (nor the listener's stderr); what
    it logs while no listener runs reaches the next one; and that listener, which claimed
    the session and is not its parent, logs the status of its shell's ``exit 7``."""
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, udp_ports=2)
    pid = None
    try:
        authorize(alice, server.client_key)
        started = time.time()
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        shell = int(client.run("echo $$"))
        pid = parent_pid(shell)
        name = client.grant.session_id[:4].hex()
        prefix = f"[{name} {alice.pw_name}]"
        server.wait_log(f"{prefix} session {name} started for {alice.pw_name}")
        fds = open_fds(pid)
        for private in (server.log_path, server.stderr_path):
            assert os.path.realpath(private) not in fds.values()
        assert fds["1"] == fds["2"] == "/dev/null"
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        path = f"/run/moshpit/port-{server.port}/{client.grant.session_id[:8].hex()}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)  # root may: a request the session does not know, so it logs
            sock.sendall(moshpit_ipc.encode_message({"op": "bogus", "id": 1}))
            assert sock.recv(1) == b""
        server.start()
        held = re.compile(rf"{re.escape(prefix)} \(held, logged at [-\d:T]+\) session {name}:"
                          r" control connection dropped: unknown request 'bogus'")
        wait_for(lambda: held.search(server.log()), 10, "the line held while no listener ran")
        client.send("exit 7\n")
        assert client.wait_closed() == 7
        client.close()
        server.wait_log(f"session {name} of {alice.pw_name}: its process {pid} has ended; its"
                        " shell exited with status 7")
        if os.path.exists(moshpit_login.WTMP_PATH):  # the logout record says so too (ut_exit)
            ends = [(e.exit_signal, e.exit_status)
                    for e in moshpit_login.read_utmp(moshpit_login.WTMP_PATH)
                    if e.type == moshpit_login.DEAD_PROCESS and e.pid == shell
                    and e.time >= started - 1]
            assert ends == [(0, 7)]
    finally:
        server.stop()
        if pid is not None:
            kill_pid(pid, 2.0)


PROBE = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
body = b'{"op":"claim","id":0}'
try:
    sock.sendall(struct.pack(">I", len(body)) + body)
    print(repr(sock.recv(65536)))
except (BrokenPipeError, ConnectionResetError):  # closed before the claim: "nothing said"
    print(repr(b""))
"""


def test_a_session_answers_no_other_uid(tmp_path, users):
    """Even with its socket made reachable (the directory and the socket opened up), a
    session process answers only root and the listener's uid: another user's claim gets
    the connection closed, and the session goes on."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs /usr/bin/python3 for the probe")
    alice, bob = users.user(), users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM) as server:
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            directory = f"/run/moshpit/port-{server.port}"
            path = os.path.join(directory, client.grant.session_id[:8].hex() + ".sock")
            for opened in ("/run/moshpit", directory):
                os.chmod(opened, 0o711)
            os.chmod(path, 0o777)
            try:
                probe = subprocess.run(["/usr/bin/python3", "-c", PROBE, path],
                                       user=bob.pw_uid, group=bob.pw_gid, extra_groups=[],
                                       cwd="/", capture_output=True, text=True, timeout=30)
            finally:
                os.chmod("/run/moshpit", 0o700)
            assert probe.stdout.strip() == "b''", probe.stderr  # closed, nothing said
            server.wait_log(f"refused a control connection from uid {bob.pw_uid}")
            assert client.run("echo fine") == "fine"
