"""mps.py sessions end to end on loopback: a real server process, a real shell on a real PTY,
driven by server_util.TestClient (the real handshake and transport, no terminal)."""

from __future__ import annotations

import os
import pathlib
import pwd
import random
import re
import signal
import socket
import time

import pytest
import moshpit
import moshpit_session as ms
import moshpit_transport
from moshpit_handshake import (NO_SUCH_SESSION, PERMISSION_DENIED, SERVER_BUSY, SESSION_LIMIT,
                               USER_SESSION_LIMIT, AuthRefused, HandshakeError)
from proc_util import parent_pid, pid_alive, proc_usage, wait_for
from server_util import (SHELL_STARTUP_FILES, MpsServer, TestClient, make_key,
                         private_mount_tools, run_mps, shared_server, write_authorized_keys)

pytestmark = pytest.mark.timeout(90)


server = shared_server(env={"LEAKY_SERVER_VAR": "leak"})


@pytest.fixture
def client(server):
    with TestClient.for_server(server).connect() as client:
        yield client


def shell_pid(client: TestClient) -> int:
    return int(client.run("echo $$"))


# -- the shell ---------------------------------------------------------------------------


def test_login_shell_and_environment(server):
    with TestClient.for_server(server, term="xterm-256color",
                               env={"LANG": "C.UTF-8", "LC_TIME": "C"}).connect() as client:
        env = dict(line.split("=", 1) for line in client.run("env").splitlines() if "=" in line)
        pw = pwd.getpwuid(os.geteuid())
        assert env["HOME"] == pw.pw_dir
        assert env["USER"] == env["LOGNAME"] == pw.pw_name
        assert env["SHELL"] == (pw.pw_shell or "/bin/sh")
        assert env["TERM"] == "xterm-256color"
        assert env["LANG"] == "C.UTF-8" and env["LC_TIME"] == "C"
        assert "/usr/bin" in env["PATH"].split(":")
        assert "LEAKY_SERVER_VAR" not in env  # built from scratch
        client_ip, client_port, server_ip, server_port = env["MOSHPIT_CONNECTION"].split()
        assert (client_ip, server_ip, int(server_port)) == \
            ("127.0.0.1", "127.0.0.1", server.port)
        assert int(client_port) > 0
        assert client.run("echo $0").startswith("-")  # a login shell
        assert client.run("pwd") == pw.pw_dir
        assert re.fullmatch(r"/dev/pts/\d+", client.run("tty"))
        # Controlling terminal + own session: the shell leads its session and its terminal's
        # foreground group is a job (job control works).
        pid = shell_pid(client)
        assert client.run("ps -o sid= -p $$").strip() == str(pid)
        assert client.run("ps -o tty= -p $$").strip().startswith("pts/")



def test_sessions_read_a_quiet_rc_and_nothing_else_changes(server):
    """The test servers keep the developer's own dotfiles out of their sessions
    (server_util.quiet_shell_startup): the session sees the quiet file at the real paths,
    its history goes to the server's directory, and outside the server the files are what
    they were."""
    home = pwd.getpwuid(os.geteuid()).pw_dir
    startup = [os.path.join(home, name) for name in SHELL_STARTUP_FILES
               if os.path.isfile(os.path.join(home, name))]
    if not startup or private_mount_tools() is None:
        pytest.skip("no start-up files to hide, or no private mounts here (not root, no "
                    "unshare): the sessions read the real files")
    before = {path: pathlib.Path(path).read_bytes() for path in startup}
    with open(os.path.join(server.dir, "quiet_shell_startup")) as f:
        quiet = f.read()
    with TestClient.for_server(server).connect() as client:
        shell = os.path.basename(pwd.getpwuid(os.geteuid()).pw_shell)
        assert client.run("echo $0 $HOME") == f"-{shell} {home}"  # the real login shell
        for path in startup:
            assert client.run(f"cat {path}") == quiet.strip()
        assert client.run("echo $HISTFILE") == os.path.join(server.dir, "shell_history")
    assert {path: pathlib.Path(path).read_bytes() for path in startup} == before


def test_commands_and_exit_status(client):
    assert client.run("echo $((6*7))") == "42"
    assert client.run("printf 'a\\tb\\n' | od -c | head -1").split()[1:4] == ["a", "\\t", "b"]
    client.send("exit 7\n")
    assert client.wait_closed() == 7


def test_echo_acks_and_the_ptys_echo_mode_reach_the_client(client):
    """For local echo prediction: the PTY's termios as it changes (readline's raw mode, a
    password prompt's echo off) and echo acks naming input whose echo came before them."""
    def mode_seen(icanon: bool, echo: bool) -> bool:
        client.pump(0.05)
        return any(isinstance(e, ms.TtyModeChanged) and e.mode[:2] == (icanon, echo)
                   for e in client.events)

    client.run("true")
    wait_for(lambda: mode_seen(False, False), 10, "readline's mode (it echoes itself)")
    client.send("read -s pw; echo read-done\n")
    wait_for(lambda: mode_seen(True, False), 10, "read -s: echo off, canonical")
    client.send("hunter2\n")
    client.read_until("read-done")
    sent = client.core.input_offset
    wait_for(lambda: (client.pump(0.05) or ms.EchoAcked(sent) in client.events), 10,
             "the echo ack of every key")
    assert b"hunter2" not in client.output
    readline = ms.TtyMode(icanon=False, echo=False, erase=0x7F)
    wait_for(lambda: (client.pump(0.05) or [e for e in client.events if isinstance(
        e, ms.TtyModeChanged)][-1].mode == readline), 10, "readline's mode again")


def test_exit_by_signal_is_128_plus_n(client):
    client.send("kill -9 $$\n")
    assert client.wait_closed() == 128 + 9


# A foreground program that reports SIGWINCH: its trap is set before it says READY, and the
# kernel signals the terminal's foreground process group when the server resizes the PTY.
# (A trap in the interactive shell itself would run inside readline, at readline's pace.)
WAIT_FOR_WINCH = ("sh -c 'w=WIN r=READ; trap \"echo ${w}CH; exit\" WINCH; echo ${r}Y; "
                  "while :; do sleep 0.05; done'\n")


def test_resize_reaches_stty_size_and_sigwinch(server):
    with TestClient.for_server(server, rows=30, cols=100).connect() as client:
        assert client.run("stty size") == "30 100"
        for rows, cols in ((40, 132), (25, 81)):
            client.send(WAIT_FOR_WINCH)
            client.read_until("READY\r\n")
            client.resize(rows, cols)
            client.read_until("WINCH\r\n")
            assert client.run("stty size") == f"{rows} {cols}"


def test_big_paste_reaches_the_shell(client):
    """Input larger than the PTY's buffer is written as the shell reads it (no loss)."""
    client.send("stty raw -echo; head -c 300000 | wc -c; stty sane\n")
    time.sleep(0.3)
    client.send(bytes(random.choice(b"abcdefgh") for _ in range(300000)))
    assert client.read_until(re.compile(rb"\b300000\b"), timeout=30)


def test_output_is_complete_and_in_order(client):
    assert client.run("seq 1 100000", timeout=60).split() == \
        [str(i) for i in range(1, 100001)]


def test_ctrl_c_stops_a_flood(server):
    """Back-pressure: a flood the client does not read stays in the shell (the server reads
    the PTY only while the send window has room): its memory does not grow, and Ctrl-C gets
    the prompt back."""
    with TestClient.for_server(server).connect() as client:
        client.run("true")
        rss_before = proc_usage(server.serving_pid)[1]
        client.send("yes flood-flood-flood-flood\n")
        client.read_until("flood")
        time.sleep(3)  # not reading: the window fills and stays full
        rss_during = proc_usage(server.serving_pid)[1]
        assert rss_during - rss_before < 30 * 1024 * 1024
        client.send(b"\x03")
        assert client.run("echo back", timeout=60) == "back"


# -- ending sessions -----------------------------------------------------------------------


def test_client_quit_hangs_up_the_shell(server, client):
    pid = shell_pid(client)
    client.quit()
    wait_for(lambda: not pid_alive(pid), 10, "the shell to get SIGHUP")
    server.wait_log("ended (client: client quit)")


def test_quit_request_over_tcp_hangs_up_the_shell(server, client):
    """UDP is down (the client stops pumping: nothing more goes over UDP); the quit goes
    over TCP, is granted, and the shell is gone: the session is ended, not detached."""
    pid = shell_pid(client)
    result = client.request_end()
    assert result.grant.session_id == client.grant.session_id
    wait_for(lambda: not pid_alive(pid), 10, "the shell to get SIGHUP")
    log = server.wait_log("ended (by the client's quit request)")
    assert "ending a session" in log
    with pytest.raises(AuthRefused) as refused:  # a second request: nothing left to end
        client.request_end()
    assert refused.value.code == NO_SUCH_SESSION


def test_quit_request_from_someone_else_is_refused(server, client, tmp_path):
    """Only the owner can end a session: the same key AND proof of the resume secret. A
    wrong secret, or the right secret with another authorized key, is refused and the
    session carries on."""
    other = make_key(os.fspath(tmp_path / "other_id"), "other")
    write_authorized_keys(server.authorized_keys_path, server.client_key.public, other.public)
    pid = shell_pid(client)
    with pytest.raises(AuthRefused) as refused:
        client.request_end(resume_secret=os.urandom(32))
    assert refused.value.code == PERMISSION_DENIED
    server.wait_log("quit request of session")
    assert "bad resume proof" in server.log()
    with pytest.raises(AuthRefused) as refused:
        client.request_end(identity=other)
    assert refused.value.code == NO_SUCH_SESSION
    assert pid_alive(pid) and shell_pid(client) == pid  # still there, still answering
    assert "by the client's quit request" not in server.log()


def test_server_sigterm_leaves_sessions_and_stop_sessions_ends_them(tmp_path):
    """Stopping the listener leaves every session running (a restart or an upgrade ends no
    login); mps --stop-sessions ends them all on purpose, each client told."""
    settings = {"mps.shutdown_flush_secs": moshpit.DEFAULT_SHUTDOWN_FLUSH_SECS}
    with MpsServer(tmp_path, udp_ports=2, settings=settings) as server:
        clients = [TestClient.for_server(server).connect() for _ in range(2)]
        pids = [shell_pid(c) for c in clients]
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        assert "2 session(s) keep running" in server.log()
        for client in clients:
            assert client.run("echo still here") == "still here"
        result = run_mps(["--stop-sessions", "-c", server.config_path], server.env)
        assert (result.returncode, result.stdout) == (0, "mps: ended 2 session(s)\n")
        for client in clients:
            wait_for(lambda c=client: c.pump(0.1) or c.shutdown_reason, 10, "shutdown notice")
            assert client.shutdown_reason == "server shutting down"
            client.close()
        for pid in pids:
            wait_for(lambda p=pid: not pid_alive(p), 10, "the shells to get SIGHUP")


def test_detached_session_expires(tmp_path):
    with MpsServer(tmp_path, settings={"mps.detached_session_timeout_secs": 2}) as server:
        client = TestClient.for_server(server).connect()
        pid = shell_pid(client)
        # Silent from now on (not pumped: no pings, no acks).
        wait_for(lambda: not pid_alive(pid), 15, "the detached shell to get SIGHUP")
        server.wait_log("ended (detached for more than 2 s)")
        with pytest.raises(AuthRefused) as refused:
            client.resume()
        assert refused.value.code == NO_SUCH_SESSION


def test_zero_timeout_keeps_detached_sessions(tmp_path):
    """... and the unattached timeout no longer applies once the client's packets came."""
    settings = {"mps.detached_session_timeout_secs": 0, "mps.unattached_session_timeout_secs": 1}
    with MpsServer(tmp_path, settings=settings) as server:
        client = TestClient.for_server(server).connect()
        pid = shell_pid(client)
        time.sleep(2.5)  # silent past the unattached timeout: no pings, no acks
        assert pid_alive(pid)
        client.resume()
        assert shell_pid(client) == pid


# -- resume --------------------------------------------------------------------------------


def test_resume_continues_the_stream_exactly(client, tmp_path):
    """mps's wiring of the resume (the offsets rule itself: test_session.py): output the
    shell printed while the client was away arrives after the resume, once, in order."""
    pid = shell_pid(client)
    done = tmp_path / "printed"
    client.send(f"for i in $(seq 1 200); do echo line$i; sleep 0.001; done; echo EN''D; "
                f"touch {done}\n")
    client.read_until("line20\r\n")
    # "Outage": nothing read or acked while the shell prints the rest.
    wait_for(done.exists, 30, "the shell to print every line")
    client.resume()
    out = client.read_until("END", timeout=30).decode()
    assert re.findall(r"^line(\d+)\r$", out, re.M) == [str(i) for i in range(21, 201)]
    assert shell_pid(client) == pid
    client.send("exit 3\n")
    assert client.wait_closed() == 3


def test_shell_exit_while_client_away_is_reported_on_resume(server, client):
    """A shell that ends during an outage (laptop asleep) keeps its last output and exit
    status for the client, as long as a detached session would be kept (the rule itself:
    test_session.py; here mps's wiring of a real shell's exit to it)."""
    shell_pid(client)
    client.send("sleep 1; echo BY''E; exit 5\n")
    # Away (not reading, not acknowledging) until well past the shell's exit.
    server.wait_log("shell exited with status 5")
    client.resume()
    client.read_until("BYE")
    assert client.wait_closed() == 5


def test_resume_refused_for_another_key_and_unknown_session(server, client, tmp_path):
    other_path = os.fspath(tmp_path / "other_id")
    other = make_key(other_path, "other")
    write_authorized_keys(server.authorized_keys_path, server.client_key.public, other.public)
    shell_pid(client)
    thief = TestClient.for_server(server, identity=other)
    thief.grant, thief.core = client.grant, client.core
    with pytest.raises(AuthRefused) as refused:
        thief.resume()
    assert refused.value.code == NO_SUCH_SESSION
    client.core.session_id = bytes(16)
    with pytest.raises(AuthRefused) as refused:
        client.resume()
    assert refused.value.code == NO_SUCH_SESSION


@pytest.mark.slow
def test_a_session_too_slow_to_answer_a_resume_is_busy_not_gone(client, server):
    """A session process that is alive but does not answer in time (stopped here; a flood
    on a loaded machine in CI) makes the resume 'server busy', which mp.py retries; 'no such
    session' would end the client while its session lives on."""
    session_pid = parent_pid(shell_pid(client))
    os.kill(session_pid, signal.SIGSTOP)
    try:
        with pytest.raises(HandshakeError) as busy:
            client.resume(timeout=30)
        assert busy.value.code == SERVER_BUSY and not isinstance(busy.value, AuthRefused)
    finally:
        os.kill(session_pid, signal.SIGCONT)
    server.wait_log(f"session {client.grant.session_id[:4].hex()} was too busy to answer a "
                    "resume request in time")
    client.resume()
    assert client.run("echo back") == "back"


# -- limits ----------------------------------------------------------------------------------


def test_max_sessions(tmp_path):
    with MpsServer(tmp_path, udp_ports=3, settings={"mps.max_sessions": 1}) as server:
        first = TestClient.for_server(server).connect()
        first.run("true")
        with pytest.raises(AuthRefused) as full:
            TestClient.for_server(server).connect()
        assert full.value.code == SESSION_LIMIT
        assert str(full.value) == ("the moshpit server on 127.0.0.1 has all the sessions it"
                                   " allows (max_sessions); try again when one has ended, or"
                                   " ask its admin to raise the limit")
        server.wait_log("max_sessions (1) reached")
        first.send("exit\n")
        first.wait_closed()
        server.wait_log("ended (shell exited")
        second = TestClient.for_server(server).connect()
        assert second.run("echo ok") == "ok"


def test_max_sessions_per_user(tmp_path):
    """One user cannot take every slot: past max_sessions_per_user their new sessions are
    refused with a message naming them, while their resumes still work."""
    settings = {"mps.max_sessions_per_user": 2}
    with MpsServer(tmp_path, udp_ports=4, settings=settings) as server:
        first = TestClient.for_server(server).connect()
        second = TestClient.for_server(server).connect()
        pid = shell_pid(first)
        second.run("true")
        user = first.user
        with pytest.raises(AuthRefused) as refused:
            TestClient.for_server(server).connect()
        assert refused.value.code == USER_SESSION_LIMIT
        assert str(refused.value) == (f"too many sessions for {user} on 127.0.0.1 (the server's"
                                      " max_sessions_per_user); end one of them, or wait until"
                                      " a detached one expires")
        server.wait_log(f"{user} has 2 sessions: max_sessions_per_user (2) reached")
        first.resume()  # a resume is not a new session
        assert shell_pid(first) == pid
        second.send("exit\n")
        second.wait_closed()
        server.wait_log("ended (shell exited")
        with TestClient.for_server(server).connect() as third:
            assert third.run("echo room") == "room"


def test_unattached_session_ends_and_frees_its_slot(tmp_path):
    """A granted session whose client never sends a UDP packet (UDP blocked, client
    killed) ends after unattached_session_timeout_secs, not the week-long detached one."""
    settings = {"mps.max_sessions_per_user": 1, "mps.unattached_session_timeout_secs": 1}
    with MpsServer(tmp_path, udp_ports=2, settings=settings) as server:
        granted = TestClient.for_server(server)._handshake(False, 15.0)  # and no UDP at all
        name = granted.grant.session_id[:4].hex()
        with pytest.raises(AuthRefused) as refused:
            TestClient.for_server(server).connect()
        assert refused.value.code == USER_SESSION_LIMIT
        user = pwd.getpwuid(os.geteuid()).pw_name
        server.wait_log(f"session {name} of {user} ended (never attached: no UDP packet from"
                        " the client within 1 s of the handshake")
        # The session process logs its end before it exits; the slot is free once the
        # listener has seen it go.
        server.wait_log(f"session {name} of {user}: its process")
        with TestClient.for_server(server).connect() as client:
            assert client.run("echo freed") == "freed"


def test_one_port_range_serves_one_session_at_a_time(tmp_path):
    with MpsServer(tmp_path, udp_ports=1) as server:
        first = TestClient.for_server(server).connect()
        assert first.grant.udp_port == server.udp_port
        first.run("true")
        start = time.monotonic()
        with pytest.raises(HandshakeError) as busy:
            TestClient.for_server(server).connect()
        assert busy.value.code == SERVER_BUSY and time.monotonic() - start < 10
        server.wait_log(f"every UDP port in {server.udp_port}-{server.udp_port} is in use")
        first.quit()
        server.wait_log("ended (client: client quit)")
        second = TestClient.for_server(server).connect()
        assert second.run("echo again") == "again"


def test_garbage_udp_costs_nothing(server, client):
    pid = shell_pid(client)
    cpu_before = proc_usage(server.serving_pid)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        for i in range(3000):
            # Half look like our packets (flags, this session's conn id, a packet number).
            header = b"\x01" + client.keys.conn_id + os.urandom(8) if i % 2 else b""
            size = random.choice([0, 1, 17, 40, 1200, 1500])
            junk.sendto(header + os.urandom(size), ("127.0.0.1", client.grant.udp_port))
    assert shell_pid(client) == pid
    cpu_used = proc_usage(server.serving_pid)[0] - cpu_before
    assert cpu_used < 5.0  # generous: a shared 2-core machine
    assert server.proc.poll() is None


def test_replayed_datagram_cannot_redirect_output(server, client):
    """An attacker on the path takes one fresh client datagram and delivers it from another
    address (127.0.0.2) instead: the server challenges that address and sends it at most 3x
    what it sent, while the real client keeps getting all its output."""
    shell_pid(client)
    client.core.send_input(b"seq 1 30000 | sed s/^/N/; echo DO''NE\n")
    stolen = [d for d, _addr in client.core.datagrams_to_send(time.monotonic())]
    assert stolen
    server_addr = (client.host, client.grant.udp_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind(("127.0.0.2", 0))
        attacker.setblocking(False)
        for datagram in stolen + stolen:  # the second copies are replays: dropped
            attacker.sendto(datagram, server_addr)
        out = client.read_until("DONE", timeout=30).decode()
        received = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # whatever is still on its way
            client.pump(0.05)
            try:
                while True:
                    received += len(attacker.recv(2048))
            except BlockingIOError:
                pass
    sent = sum(len(d) for d in stolen)
    assert "N30000" in out and "N1\r\n" in out, "the real client got the whole output"
    assert len(client.output) > 200_000
    assert 0 < received <= moshpit_transport.AMPLIFICATION_FACTOR * sent, (received, sent)
    assert "client now at" not in server.log()


# -- addresses ---------------------------------------------------------------------------------


def test_ipv6_loopback_session(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with MpsServer(tmp_path, ip="::1") as server, \
            TestClient.for_server(server, host="::1").connect() as client:
        assert client.run("echo $MOSHPIT_CONNECTION").startswith("::1 ")


def test_dual_stack_listener_binds_udp_on_the_ipv4_address(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with MpsServer(tmp_path, ip="::") as server:
        with TestClient.for_server(server, host="127.0.0.1").connect() as client:
            assert client.run("echo v4") == "v4"
        with TestClient.for_server(server, host="::1").connect() as client:
            assert client.run("echo v6") == "v6"
