"""mp.py end to end: a real mp.py in a real PTY against a real mps.py, on loopback only.

Typing and output, full-screen bytes, resize, every way out (shell exit, Ctrl-^ ., SIGTERM,
a killed or stopping server) with the terminal attributes compared before and after, host
key checks, keys and passphrases, and error exits (255 like ssh).
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from proc_util import WRAPPER, WRAPPER_RE, PtyProcess, pid_alive, proc_children, wait_for
from server_util import READY_LINE, MpsServer, make_key, run_mps, shared_server

import moshpit
import moshpit_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(REPO, "mp.py")
USER = getpass.getuser()
QUIT = b"\x1e."  # Ctrl-^ .
QUIT_STATUS = 255  # what mp.py exits with after Ctrl-^ . (like ssh after ~.)
ERASE_BANNER = b"\x1b7\x1b[1;1H\x1b[2K\x1b8"
# The shortest UDP silence before a resume the client accepts (its resume_after_secs setting,
# README "Resume timing"): outage scenarios reach their resume handshake after 4 s, not 10.
QUICK_RESUME = {"MOSHPIT_RESUME_AFTER_SECS": str(moshpit.MIN_RESUME_AFTER_SECS)}



def client_env(tmp_path, **extra) -> dict:
    home = tmp_path / "client-home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "TERM": "xterm", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def mp_args(server: MpsServer, tmp_path, *extra, host: str = "127.0.0.1",
            policy: str = "accept-new") -> list:
    return [sys.executable, MP, "-s", str(server.port), "-p", server.client_key_path,
            "-t", str(tmp_path / "mp.log"), "--strict-host-key-checking", policy, *extra,
            f"{USER}@{host}"]


def start_client(server, tmp_path, *extra, wrapped=False, rows=24, cols=80, host="127.0.0.1",
                 env=None) -> PtyProcess:
    argv = mp_args(server, tmp_path, *extra, host=host)
    if wrapped:
        argv = [sys.executable, "-c", WRAPPER, *argv]
    return PtyProcess(argv, env=env or client_env(tmp_path), rows=rows, cols=cols)


def wait_shell(term: PtyProcess, timeout: float = 30.0) -> None:
    """The remote shell answers: type an arithmetic echo and wait for its result on a line
    of its own (the echo of the typed line does not contain it)."""
    term.send("echo $((4200+42))\r")
    term.read_until(re.compile(rb"[\r\n]4242\r\n"), timeout)


def remote_shell_pid(term: PtyProcess, tmp_path) -> int:
    """The remote shell's PID, as the shell itself writes it to a file (seen from the server
    side: the tests run on the server's machine)."""
    path = tmp_path / f"shell-{time.monotonic_ns()}.pid"
    term.send(f"echo $$ > {path}.tmp && mv {path}.tmp {path}\r")
    return wait_for(lambda: path.exists() and int(path.read_text()), 30, "the shell's PID file")


def mp_pid(term: PtyProcess) -> int:
    """mp.py's PID when it runs under WRAPPER."""
    return wait_for(lambda: (proc_children(term.pid, recursive=False) or [None])[0], 10,
                    "mp.py to start under the wrapper")


def wrapper_result(term: PtyProcess, timeout: float = 30.0) -> tuple:
    out = term.read_until(WRAPPER_RE, timeout)
    match = WRAPPER_RE.search(out)
    return int(match.group(1)), match.group(2).decode(), out


def kill_server(server: MpsServer) -> None:
    """SIGKILL to the server's process group: the listener and its session processes (which
    outlive a listener stopped alone) vanish without a word to anyone, as in a host crash."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


def restart_server(server: MpsServer) -> None:
    """Start the (stopped) server again with the same port and keys, wait until it listens
    (its log already holds the first run's ready line, so count them)."""
    started = server.log().count(READY_LINE)
    server.start(wait=False)
    wait_for(lambda: server.log().count(READY_LINE) > started, 30, "mps.py to listen again")


def client_log(tmp_path) -> str:
    path = tmp_path / "mp.log"
    return path.read_text(errors="replace") if path.exists() else ""


server = shared_server()  # own_server-marked tests kill, restart or stop theirs


# --- the basics ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_echo_then_shell_exit_status(server, tmp_path):
    with start_client(server, tmp_path) as term:
        term.send("echo hi\r")
        term.read_until(re.compile(rb"\rhi\r\n"), 30)
        term.send("exit 7\r")
        out = term.read_to_eof(30)
        assert b"Connection to 127.0.0.1 closed." in out
        assert term.wait(10) == 7
    assert "Traceback" not in client_log(tmp_path)


@pytest.mark.timeout(90)
def test_fullscreen_output_bytes_arrive_unchanged(server, tmp_path):
    script = ("tput smcup; tput clear; tput cup 5 10; tput bold; tput setaf 1; "
              "printf 'h\\303\\251llo \\342\\200\\246'; tput sgr0; tput civis; tput cnorm; "
              "tput cup 0 0; tput el; tput rmcup")
    expected = subprocess.run(["sh", "-c", script], env={"TERM": "xterm", "PATH": "/usr/bin:/bin"},
                              capture_output=True, check=True).stdout
    assert b"\x1b[" in expected
    with start_client(server, tmp_path) as term:
        wait_shell(term)
        # The markers come out of printf, so the echo of the typed line cannot match them.
        term.send(f"printf '<%s>' BEGIN; {script}; printf '<%s>' END\r")
        term.read_until(b"<BEGIN>", 30)
        body = term.read_until(b"<END>", 30)[:-len(b"<END>")]
        assert body == expected
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


@pytest.mark.timeout(90)
def test_resize_reaches_remote_pty(server, tmp_path):
    with start_client(server, tmp_path, rows=24, cols=80) as term:
        wait_shell(term)
        term.send("stty size\r")
        term.read_until(b"24 80", 30)
        term.set_winsize(33, 101)
        deadline = time.monotonic() + 30
        while True:  # the resize travels as its own message; poll until the PTY has it
            term.send("stty size\r")
            try:
                term.read_until(b"33 101", 2)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "resize never reached the remote PTY"
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


@pytest.mark.timeout(90)
def test_typeahead_before_connect_is_kept(server, tmp_path):
    with start_client(server, tmp_path) as term:
        term.send("echo $((5000+8))\r")  # typed while the handshake may still be running
        term.read_until(re.compile(rb"[\r\n]5008\r\n"), 30)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


def bytes_written_by_threads(pid: int) -> dict:
    """{thread id: bytes it has written} for each thread of ``pid`` (/proc's wchar)."""
    written = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        written[int(tid)] = int(fields["wchar"])
    return written


@pytest.mark.timeout(150)
def test_bulk_output_arrives_exactly(server, tmp_path):
    """3 MB through a PTY that accepts a few KB at a time: partial writes and EAGAIN on
    stdout lose or repeat nothing. The terminal writer's thread wrote most of them: the loop
    writes only what the terminal takes at once while the writer is idle."""
    with start_client(server, tmp_path) as term:
        wait_shell(term)
        term.send("head -c 3000000 /dev/zero | tr '\\0' x; echo $((6000+6))\r")
        out = term.read_until(b"6006\r\n", 120)  # plain bytes: a regex would rescan 3 MB
        assert max(len(run) for run in re.findall(rb"x+", out)) == 3000000
        written = bytes_written_by_threads(term.pid)
        assert sum(n for tid, n in written.items() if tid != term.pid) >= 1500000, written
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_flood(server, tmp_path):
    """Keys still get through while output pours in (stdin is read all the time)."""
    with start_client(server, tmp_path) as term:
        wait_shell(term)
        term.send("yes flood\r")
        term.read_until(b"flood\r\nflood\r\n", 30)
        term.send(b"\x03")
        term.send("echo $((7000+7))\r")
        term.read_until(re.compile(rb"[\r\n]7007\r\n"), 60)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


@pytest.mark.timeout(90)
def test_escape_key_from_config(server, tmp_path):
    env = client_env(tmp_path, MOSHPIT_ESCAPE_KEY="^]")
    with start_client(server, tmp_path, env=env) as term:
        wait_shell(term)
        term.send(b"\x1e.\x15")  # Ctrl-^ . is just input now (Ctrl-U clears the line)
        wait_shell(term)
        term.send(b"\x1d.")  # Ctrl-] .
        assert b"Connection to 127.0.0.1 closed." in term.read_to_eof(20)
        assert term.wait(10) == QUIT_STATUS


# --- ways out: terminal attributes restored ------------------------------------------------


@pytest.mark.timeout(90)
def test_attrs_restored_after_shell_exit(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True) as term:
        wait_shell(term)
        term.send("exit 3\r")
        rc, attrs, out = wrapper_result(term)
        assert (rc, attrs) == (3, "same")
        assert b"Connection to 127.0.0.1 closed." in out


@pytest.mark.timeout(90)
def test_attrs_restored_after_escape_quit(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True) as term:
        wait_shell(term)
        term.send("od -c\r")
        time.sleep(0.5)
        term.send(b"\x1e\x1e\r\x04")  # Ctrl-^ Ctrl-^ sends one Ctrl-^
        term.read_until(b"036  \\n", 30)
        term.send(QUIT)
        rc, attrs, out = wrapper_result(term)
        assert (rc, attrs) == (QUIT_STATUS, "same")
        assert b"Connection to 127.0.0.1 closed." in out
    server.wait_log("client quit", 20)  # the server was told and ended the session


@pytest.mark.timeout(90)
def test_escape_quit_ends_the_session_on_the_server(server, tmp_path):
    """Ctrl-^ . with the network fine: the goodbye goes over UDP, is acked, and the server
    hangs up the shell (ended, not detached); no quit request over TCP was needed."""
    with start_client(server, tmp_path) as term:
        wait_shell(term)
        pid = remote_shell_pid(term, tmp_path)
        term.send(QUIT)
        assert b"Connection to 127.0.0.1 closed." in term.read_to_eof(20)
        assert term.wait(10) == QUIT_STATUS
    wait_for(lambda: not pid_alive(pid), 10, "the remote shell to be hung up")
    assert "ended (client: client quit)" in server.wait_log("ended (client: client quit)")
    assert "ending a session" not in server.log()
    assert "quit request" not in client_log(tmp_path)


@pytest.mark.timeout(90)
def test_attrs_restored_after_sigterm(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True) as term:
        wait_shell(term)
        os.kill(mp_pid(term), signal.SIGTERM)
        rc, attrs, out = wrapper_result(term)
        assert (rc, attrs) == (255, "same")
        assert b"killed by signal 15" in out


@pytest.mark.timeout(90)
def test_attrs_restored_after_sighup(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True) as term:
        wait_shell(term)
        os.kill(mp_pid(term), signal.SIGHUP)
        rc, attrs, _ = wrapper_result(term)
        assert (rc, attrs) == (255, "same")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.own_server
def test_killed_server_then_quit_restores_terminal(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True) as term:
        wait_shell(term)
        kill_server(server)
        term.read_until(b"last contact", 30)  # the banner comes up after ~6 s
        term.send(QUIT)  # quitting works while disconnected, without waiting for the server
        rc, attrs, _ = wrapper_result(term)
        assert (rc, attrs) == (QUIT_STATUS, "same")


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.own_server
def test_restarted_server_means_session_gone(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True,
                      env=client_env(tmp_path, **QUICK_RESUME)) as term:
        wait_shell(term)
        kill_server(server)
        restart_server(server)  # same port and keys, but the session is gone
        rc, attrs, out = wrapper_result(term, 90)
        assert (rc, attrs) == (255, "same")
        assert (b"moshpit: the session on 127.0.0.1 no longer exists "
                b"(server restarted or session expired).") in out


@pytest.mark.timeout(90)
def test_server_shutdown_ends_session_with_message(tmp_path):
    settings = {"mps.shutdown_flush_secs": moshpit.DEFAULT_SHUTDOWN_FLUSH_SECS}
    with MpsServer(tmp_path, settings=settings) as server, \
            start_client(server, tmp_path, wrapped=True) as term:
        wait_shell(term)
        assert run_mps(["--stop-sessions", "-c", server.config_path], server.env).returncode == 0
        rc, attrs, out = wrapper_result(term)
        assert (rc, attrs) == (255, "same")
        assert b"moshpit: server 127.0.0.1 is shutting down; session ended." in out


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.own_server
def test_changed_host_key_on_resume_is_final(server, tmp_path):
    with start_client(server, tmp_path, wrapped=True,
                      env=client_env(tmp_path, **QUICK_RESUME)) as term:
        wait_shell(term)
        kill_server(server)
        os.unlink(server.host_key_path)
        make_key(server.host_key_path, "impostor", replace=True)
        restart_server(server)  # the resume after 4 s of silence meets another host key
        rc, attrs, out = wrapper_result(term, 60)
        assert (rc, attrs) == (255, "same")
        assert b"mp: the host key of 127.0.0.1 changed during the session" in out
    assert client_log(tmp_path).count("resume handshake #") == 1  # never retried


# --- the remote environment ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_ssh_variables_tell_the_shell_it_is_a_remote_login(server, tmp_path):
    """Prompts and rc files look for SSH_CONNECTION / SSH_CLIENT / SSH_TTY: set as sshd
    sets them, agreeing with MOSHPIT_CONNECTION and with what `tty` says."""
    with start_client(server, tmp_path, cols=200) as term:  # the command line never wraps
        wait_shell(term)
        term.send('printf "<%s>\\n" "$SSH_CONNECTION|$SSH_CLIENT|$SSH_TTY|$(tty)|'
                  '$MOSHPIT_CONNECTION"\r')
        term.read_until(re.compile(rb"<([^<>\r\n]*)>\r\n"), 30)
        connection, client, ssh_tty, tty, moshpit_connection = \
            term.last_match.group(1).decode().split("|")
        term.send(QUIT)
        term.wait(20)
    client_ip, client_port, server_ip, server_port = connection.split()
    assert connection == moshpit_connection
    assert (client_ip, server_ip, server_port) == ("127.0.0.1", "127.0.0.1", str(server.port))
    assert client == f"{client_ip} {client_port} {server_port}" and int(client_port) > 0
    assert ssh_tty == tty and re.fullmatch(r"/dev/pts/\d+", tty)


# --- host keys -----------------------------------------------------------------------------


def run_mp(args, env, input_text=None, timeout=60):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input_text, stdin=None if input_text is not None
                          else subprocess.DEVNULL)


@pytest.mark.timeout(120)
@pytest.mark.own_server
def test_host_key_accept_new_then_changed_key_refused(server, tmp_path):
    env = client_env(tmp_path)
    known_hosts = tmp_path / "client-home" / ".mp" / "known_hosts"
    with start_client(server, tmp_path, env=env) as term:
        out = term.read_until(b"Permanently added", 30)
        wait_shell(term)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
    assert f"[127.0.0.1]:{server.port} ssh-ed25519 " in known_hosts.read_text()
    assert b"authenticity" not in out  # accept-new never asks

    # The server now has another host key: refused loudly, nothing recorded, exit 255.
    server.stop()
    os.unlink(server.host_key_path)
    make_key(server.host_key_path, "impostor", replace=True)
    restart_server(server)
    res = run_mp(mp_args(server, tmp_path), env)
    assert res.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in res.stderr
    assert f"{known_hosts}:1" in res.stderr
    assert res.stderr.startswith("mp: ")
    assert len(known_hosts.read_text().splitlines()) == 1


@pytest.mark.timeout(60)
def test_unknown_host_without_tty_is_refused(server, tmp_path):
    res = run_mp(mp_args(server, tmp_path, policy="ask"), client_env(tmp_path))
    assert res.returncode == 255
    assert "not a known host" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.timeout(90)
def test_unknown_host_prompt_on_tty(server, tmp_path):
    argv = mp_args(server, tmp_path, policy="ask")
    with PtyProcess(argv, env=client_env(tmp_path)) as term:
        term.read_until(b"(yes/no/[fingerprint])? ", 30)
        term.send("yes\r")
        wait_shell(term)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


# --- keys and errors ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unreachable_server_exits_255(tmp_path):
    server = MpsServer(tmp_path, start=False)  # its port claimed, nothing listening
    res = run_mp(mp_args(server, tmp_path), client_env(tmp_path))
    assert res.returncode == 255
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (f"mp: nothing listens on 127.0.0.1:{server.port} (is mps running? is "
                        "the port right: -s PORT)")


@pytest.mark.timeout(60)
def test_unauthorized_key_exits_255(server, tmp_path):
    other = str(tmp_path / "other_key")
    make_key(other, "stranger")
    args = mp_args(server, tmp_path)
    args[args.index("-p") + 1] = other
    res = run_mp(args, client_env(tmp_path))
    assert res.returncode == 255
    last = res.stderr.strip().splitlines()[-1]
    key = moshpit_keys.load_public_key(other + ".pub")
    assert last == (f"mp: permission denied (publickey) for {USER}@127.0.0.1; tried {other}"
                    f" ({key.fingerprint()})")


@pytest.mark.timeout(90)
def test_encrypted_key_asks_passphrase_once(server, tmp_path):
    key = moshpit_keys.load_private_key(server.client_key_path)
    locked = str(tmp_path / "locked_key")
    moshpit_keys.save_private_key(locked, key, b"open sesame")
    args = mp_args(server, tmp_path)
    args[args.index("-p") + 1] = locked
    with PtyProcess(args, env=client_env(tmp_path)) as term:
        # Asked only once the server is reached and its host key trusted.
        term.read_until(b"Permanently added", 30)
        term.read_until(b"Enter passphrase for key", 30)
        term.send("wrong\r")
        out = term.read_to_eof(30)
        assert b"wrong passphrase" in out
        assert term.wait(10) == 255
    with PtyProcess(args, env=client_env(tmp_path)) as term:
        term.read_until(b"Enter passphrase for key", 30)
        term.send("open sesame\r")
        term.read_until(b"\r\n", 30)  # getpass flushes typeahead until it prints the newline
        wait_shell(term)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
    res = run_mp(args, client_env(tmp_path))  # no terminal to ask on
    assert res.returncode == 255 and "passphrase" in res.stderr


@pytest.mark.timeout(90)
def test_first_run_offers_to_generate_a_key(server, tmp_path):
    env = client_env(tmp_path)
    args = mp_args(server, tmp_path)
    del args[args.index("-p"):args.index("-p") + 2]  # the default ~/.mp/id_ed25519
    key_path = tmp_path / "client-home" / ".mp" / "id_ed25519"
    with PtyProcess(args, env=env) as term:
        term.read_until(b"Permanently added", 30)  # offered only once the server is reached
        term.read_until(f"No moshpit key at {key_path}. Generate a new key pair ({key_path} "
                        f"and {key_path}.pub) now? [Y/n] ", 30)
        term.send("\r")
        term.read_until(b"passphrase", 30)
        term.send("\r")
        term.read_until(b"again", 30)
        term.send("\r")
        out = term.read_to_eof(60)
        assert b"authorized_keys" in out  # told where the new public key must go
        # This server cannot know the new key yet: say what to do instead of trying it.
        assert out.rstrip().endswith(
            f"mp: 127.0.0.1 does not know the new key yet: add the line above to the "
            f"authorized_keys of {USER} there, then run mp again".encode())
        assert term.wait(10) == 255
    assert key_path.exists() and (key_path.stat().st_mode & 0o777) == 0o600
    assert moshpit_keys.load_public_key(str(key_path) + ".pub") == \
        moshpit_keys.load_private_key(str(key_path)).public


@pytest.mark.timeout(60)
def test_piped_stdin_runs_commands(server, tmp_path):
    """Without a terminal (a script feeding mp): no raw mode, no banner, same exit status."""
    res = run_mp(mp_args(server, tmp_path, "-vv"), client_env(tmp_path),
                 input_text="echo piped $((2+3))\nexit 6\n")
    assert res.returncode == 6
    assert "piped 5" in res.stdout
    # -vv makes the log file verbose, never the terminal: only the user-facing lines here.
    assert res.stderr.splitlines() == [
        f"Warning: Permanently added '[127.0.0.1]:{server.port}' (ED25519) to the list of "
        "known hosts.", "Connection to 127.0.0.1 closed."]
    assert "DEBUG" in client_log(tmp_path)


@pytest.mark.timeout(90)
def test_ipv6_destination(tmp_path):
    try:
        srv = MpsServer(tmp_path, ip="::1")
    except Exception as err:  # no IPv6 loopback here
        pytest.skip(f"no IPv6 server on ::1: {err}")
    with srv, start_client(srv, tmp_path, host="[::1]") as term:
        wait_shell(term)
        term.send("exit\r")
        assert b"Connection to ::1 closed." in term.read_to_eof(30)
        assert term.wait(10) == 0
