"""What mp.py prints, checked as a user sees it in a real PTY: text from a hostile server
shown and never obeyed, bad host names refused before any connection, UDP blocked, a port
that is not a moshpit server, nothing listening, closing messages on a fresh line, and the
escape key's exit status. Loopback only; fake servers are built from the real handshake and
transport, or are the real thing (sshd) when installed.
"""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from proc_util import ManagedProcess, PtyProcess, wait_for
from server_util import make_key, relay_in_front, shared_server
from test_client_session import (MP, QUICK_RESUME, QUIT, USER, client_env, start_client,
                                 wait_shell)

import moshpit
import moshpit_handshake as hs
import moshpit_session
import moshpit_transport
import mp

EM_DASH = "\u2014"  # the client's locale in these tests is C.UTF-8


server = shared_server()


def mp_to(port: int, tmp_path, dest: str = f"{USER}@127.0.0.1") -> list:
    """mp.py's command line for a server at 127.0.0.1:``port`` that is not an MpsServer."""
    key_path = str(tmp_path / "id_ed25519")
    if not os.path.exists(key_path):
        make_key(key_path, "client")
    return [sys.executable, MP, "-s", str(port), "-p", key_path, "-t", str(tmp_path / "mp.log"),
            "--strict-host-key-checking", "accept-new", dest]


def run_in_pty(argv, tmp_path, timeout: float = 30.0, cols: int = 80) -> tuple:
    """(exit status, everything the terminal showed)."""
    with PtyProcess(argv, env=client_env(tmp_path), cols=cols) as term:
        out = term.read_to_eof(timeout)
        return term.wait(10), out


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    return sock


class OneShotServer:
    """Accepts one TCP connection on loopback and runs ``talk(sock)`` on it in a thread:
    the stand-in for a server that is not moshpit."""

    def __init__(self, talk):
        self.sock = listener()
        self.port = self.sock.getsockname()[1]
        self.talk = talk
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()
        self.thread.join(10)

    def _serve(self):
        self.sock.settimeout(30)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                self.talk(conn)
            except OSError:
                pass


class HostileServer(OneShotServer):
    """A moshpit server built from the real handshake and transport, that grants any key a
    session, sends ``output`` and, once that has arrived, ends the session with ``reason``:
    all a malicious or compromised server controls in what the client prints."""

    def __init__(self, output: bytes, reason: str, host_key):
        super().__init__(self._session)
        self.output, self.reason, self.host_key = output, reason, host_key
        self.udp = moshpit_transport.udp_socket("127.0.0.1")
        self.shutdown_acked = threading.Event()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.udp.close()

    def _grant(self, _auth):
        return hs.SessionGrant(os.urandom(16), os.urandom(32), self.udp.getsockname()[1])

    def _session(self, sock):
        auth = hs.server_handshake(sock, self.host_key, self._grant)
        if auth is None:
            return
        core = moshpit_session.ServerSession(auth.keys, time.monotonic())
        link = moshpit_transport.UdpLink(core, self.udp)
        core.pty_output(self.output, time.monotonic())
        shutdown_sent = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.shutdown_acked.is_set():
            if core.all_acked():  # the output (then the shutdown) reached the client
                if shutdown_sent:
                    self.shutdown_acked.set()
                else:
                    core.shutdown(self.reason, time.monotonic())
                    shutdown_sent = True
            wait = link.timeout(time.monotonic())
            if select.select([link], [], [], 0.05 if wait is None else min(wait, 0.05))[0]:
                link.handle_readable(time.monotonic())
            link.flush(time.monotonic())


# --- text from the server is shown, never obeyed ------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("output, reason, tail", [
    # Set the title, clear the screen, fake a local prompt: every control byte made visible.
    (b"evil$ ", "\x1b]0;pwned\x07\x1b[2J\r\nalice@laptop:~$ ",
     b"evil$ \r\nmoshpit: server 127.0.0.1 ended the session "
     b"(^[]0;pwned^G^[[2J^M^Jalice@laptop:~$ ).\r\n"),
    # C1 CSI (U+009B) works like ESC [ on many terminals.
    (b"done\r\n", "\u009b2J\u202egnp.exe", b"done\r\nmoshpit: server 127.0.0.1 ended the "
     b"session (\\u009b2J\\u202egnp.exe).\r\n"),
    # An unterminated title would swallow the message and what the local shell prints next:
    # the client ends it (ESC \) and starts a fresh line first.
    (b"evil$ \x1b]0;half a title", "bye",
     b"evil$ \x1b]0;half a title\x1b\\\r\nmoshpit: server 127.0.0.1 ended the session (bye).\r\n"),
    # The longest reason the transport carries (255 bytes) is cut to 200 characters.
    (b"$ ", "A" * 255, b"$ \r\nmoshpit: server 127.0.0.1 ended the session (" + b"A" * 197
     + b"...).\r\n"),
])
def test_hostile_server_text_is_shown_not_obeyed(tmp_path, output, reason, tail):
    host_key = make_key(str(tmp_path / "host_key"), "hostile")
    with HostileServer(output, reason, host_key) as server:
        status, out = run_in_pty(mp_to(server.port, tmp_path), tmp_path)
        assert server.shutdown_acked.is_set()
    assert status == 255
    assert out.endswith(tail)
    assert b"\x1b[2J" not in out and b"\x07" not in out and "\u009b".encode() not in out


# --- host names ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host, shown, why", [
    ("127.0.0.1,evil.example", "127.0.0.1,evil.example", "',' cannot appear in a host name"),
    ("127.0.0.1 evil", "127.0.0.1 evil", "whitespace cannot appear in a host name"),
    ("*", "*", "'*' cannot appear in a host name"),
    ("a\x1b]0;owned\x07b", "a^[]0;owned^Gb", "a control character cannot appear in a host name"),
])
def test_bad_host_names_are_refused_before_any_connection(tmp_path, host, shown, why):
    """known_hosts must never get a pattern nobody meant to write: nothing is connected to,
    nothing is written, one line says why."""
    with listener() as sock:
        status, out = run_in_pty(mp_to(sock.getsockname()[1], tmp_path, f"{USER}@{host}"),
                                 tmp_path)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.accept()  # nobody knocked
    assert status == 255
    assert out == (f"mp: invalid host name '{shown}': {why}; use letters, digits, '-', '_' and "
                   "'.', or an IP address (192.0.2.1, ::1, [fe80::1%eth0])\r\n").encode()
    assert not (tmp_path / "client-home" / ".mp" / "known_hosts").exists()


# --- not a moshpit server, nothing listening -----------------------------------------------


def ssh_banner(conn):
    """What sshd does: speak first, then wait for the client's banner."""
    conn.sendall(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n")
    conn.recv(4096)


def nginx_400(conn):
    """What nginx does with a request line that is not HTTP: answer 400 at once."""
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Type: text/html\r\n"
                 b"Connection: close\r\n\r\n<html><head><title>400 Bad Request</title></head>"
                 b"</html>\r\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("talk, what", [(ssh_banner, "SSH"), (nginx_400, "HTTP")])
def test_not_a_moshpit_server(tmp_path, talk, what):
    with OneShotServer(talk) as server:
        status, out = run_in_pty(mp_to(server.port, tmp_path), tmp_path)
    assert status == 255
    assert out == (f"mp: 127.0.0.1:{server.port} is not a moshpit server (it speaks {what})"
                   "\r\n").encode()


SSHD = "/usr/sbin/sshd"


@pytest.mark.timeout(60)
@pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh-keygen")),
                    reason="OpenSSH server not installed")
def test_real_sshd_is_not_a_moshpit_server(tmp_path):
    host_key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    with listener() as probe:
        port = probe.getsockname()[1]
    log = tmp_path / "sshd.log"
    with ManagedProcess([SSHD, "-D", "-e", "-f", "/dev/null", "-h", str(host_key),
                         "-p", str(port), "-o", "ListenAddress=127.0.0.1",
                         "-o", "PidFile=none"], log=log) as sshd:
        wait_for(lambda: "Server listening on 127.0.0.1" in sshd.read_log(), 20,
                 "sshd to listen")
        status, out = run_in_pty(mp_to(port, tmp_path), tmp_path)
    assert status == 255
    assert out == f"mp: 127.0.0.1:{port} is not a moshpit server (it speaks SSH)\r\n".encode()


@pytest.mark.timeout(60)
def test_nothing_listening_says_so(tmp_path):
    with listener() as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there now
    status, out = run_in_pty(mp_to(port, tmp_path), tmp_path)
    assert status == 255
    assert out == (f"mp: nothing listens on 127.0.0.1:{port} (is mps running? is the port "
                   "right: -s PORT)\r\n").encode()


# --- UDP blocked ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_udp_blocked_from_the_start_says_so(server, tmp_path):
    """TCP gets through, UDP never does (a firewall): after about 3 s the client says which
    UDP port it hears nothing from and how to quit; it never claims a "last contact" there
    never was, and the session starts normally once UDP flows."""
    with relay_in_front(server) as relay:
        front = relay.front
        relay.set_blackout(True)
        start = time.monotonic()
        # --transport udp: the default (auto) would carry the session over TCP
        with start_client(server, tmp_path, "--transport", "udp", host=front, cols=120,
                          env=client_env(tmp_path, **QUICK_RESUME)) as term:
            text = (f"nothing received from {front} on UDP port {server.udp_port} "
                    f"(firewall?) {EM_DASH} Ctrl-^ . quits")
            seen = term.read_until(mp.StatusBanner.render(text, 120), 15)
            assert 3.0 <= term.match_time - start < 8.0
            # The resume handshake (after 4 s here) gets through on TCP, UDP still does
            # not.
            seen += term.read_until(b"(server answered, waiting for UDP)", 30)
            assert b"last contact" not in seen
            relay.set_blackout(False)
            wait_shell(term, timeout=60)
            term.send(QUIT)
            out = term.read_to_eof(30)
            assert term.wait(10) == 255
    assert out.endswith(f"Connection to {front} closed.\r\n".encode())


# --- the end of a session ------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_escape_quit_message_on_a_fresh_line_and_exit_255(server, tmp_path):
    """Quitting at the prompt: the message starts on the next line, not after the remote
    prompt, and the status is 255 like ssh's ~. (a script can tell it from "exit 0")."""
    with start_client(server, tmp_path) as term:
        wait_shell(term)
        term.send("PS1='remote-''prompt> '\r")  # the echo of this line does not match
        out = term.read_until(b"remote-prompt> ", 30)
        term.send(QUIT)
        out += term.read_to_eof(30)
        assert term.wait(10) == 255
    # bash turned bracketed paste on at its prompt: mp turns it off before its message.
    assert out.endswith(b"remote-prompt> \x1b[?2004l\r\nConnection to 127.0.0.1 closed.\r\n")


@pytest.mark.timeout(90)
def test_shell_exit_message_adds_no_blank_line(server, tmp_path):
    with start_client(server, tmp_path) as term:
        wait_shell(term)
        term.send("exit 0\r")
        out = term.read_to_eof(30)
        assert term.wait(10) == 0
    assert re.search(rb"[^\n]\r\nConnection to 127\.0\.0\.1 closed\.\r\n\Z", out), out[-200:]


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    ("plain text, é and 😀", "plain text, é and 😀"),
    ("\x1b]0;title\x07\x1b[2J", "^[]0;title^G^[[2J"),
    ("tab\there\r\nnext", "tab^Ihere^M^Jnext"),
    ("\x00\x7f", "^@^?"),
    ("\u009b31m \u0085", "\\u009b31m \\u0085"),  # C1 controls, CSI and NEL
    ("\u202eevil\u2066", "\\u202eevil\\u2066"),  # bidi overrides reorder the line
    ("\ud800", "\\ud800"),  # a lone surrogate cannot even be encoded
    (b"ok \xff\xc3 \xc2\x9b", "ok \\xff\\xc3 \\u009b"),  # bytes: invalid UTF-8 shown as bytes
])
def test_printable_shows_controls(text, shown):
    assert moshpit.printable(text) == shown


def test_printable_caps_length_without_cutting_an_escape():
    assert moshpit.printable("x" * 300) == "x" * 197 + "..."
    assert moshpit.printable("x" * 200) == "x" * 200
    assert moshpit.printable("\x1b" * 10, 8) == "^[^[..."  # never half of "^["
    assert moshpit.printable("\x1b" * 1000, None) == "^[" * 1000


def test_printable_lines_keeps_line_breaks_only():
    assert moshpit.printable_lines("a\x1b[2J\nb\r", 80) == "a^[[2J\nb^M"


def test_prompter_never_prints_raw_controls():
    err = io.StringIO()
    mp.Prompter(stdin=io.StringIO(), stderr=err).say("one\x1b[2J\ntwo\x9b\n")
    assert err.getvalue() == "one^[[2J\ntwo\\u009b\n"


def test_shutdown_message_quotes_the_reason_safely():
    assert mp.shutdown_message("h", "\x1b[2Jidle") == "moshpit: server h ended the session " \
        "(^[[2Jidle)."
    assert mp.shutdown_message("h", hs.SHUTTING_DOWN) == \
        "moshpit: server h is shutting down; session ended."


def test_connect_failures_say_what_to_check():
    refused = hs._connect_failure("[::1]:40500", ConnectionRefusedError(111, "Connection refused"))
    assert refused == "nothing listens on [::1]:40500 (is mps running? is the port right: -s PORT)"
    timeout = hs._connect_failure("h:1", socket.timeout())
    assert timeout.startswith("cannot connect to h:1: connection timed out (")
    unreachable = hs._connect_failure("h:1", OSError(113, "No route to host"))
    assert unreachable == ("cannot connect to h:1: no route to host (is the address right? is "
                           "the network up?)")
