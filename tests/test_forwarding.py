"""Forwarding end to end: a real mp.py with -L/-R/-D/-A through a real mps.py on loopback,
to real TCP servers started here (an echo server, an HTTP server), a real curl through
-D, a real ssh-agent through -A, and the impairment relay for loss and outages.

What a person would check: a few MB through -L under 10 % loss arrive intact both ways
(sha256); -R reaches a server on the client's side; curl --socks5-hostname and SOCKS4a
get a page through -D; ``ssh-add -l`` run remotely lists the key of the laptop's agent;
a transfer through an outage completes intact; a stalled reader does not stall the
terminal; the server's refusals (permit_open, allow_tcp_forwarding = "no") are one clear
line on the client; a hostile client's channel to a forbidden target is refused without
a connect.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import pytest
from proc_util import ManagedProcess, PtyProcess, kill_pid, proc_children, wait_for
from relay import free_port
from server_util import MpsServer, TestClient, relay_in_front, shared_server
from sshd_util import sshd_binary_fixture, sshd_host_fixture  # noqa: F401  (`sshd_host`)
from test_agent import Agent, keygen
from test_client_session import QUICK_RESUME, client_env, client_log, mp_args, wait_shell
from users_util import authorize, users_fixture  # noqa: F401  (the `users` fixture)

import moshpit_channels

pytestmark = pytest.mark.timeout(120)


class EchoServer:
    """A TCP server on 127.0.0.1 that sends every connection's bytes back, shuts its side
    after the client's EOF, and counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(name="echo")
def echo_fixture():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def web(tmp_path):
    """An HTTP server on 127.0.0.1 serving a directory holding index.html."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello through the tunnel\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def through(port: int, data: bytes, timeout: float = 60.0) -> bytes:
    """Connect to 127.0.0.1:port, send ``data`` then EOF, and return all that comes back
    (reading while sending: the echo must not deadlock on full buffers)."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def send():
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # a refused forward closes (or resets) before we are done: recv sees it
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join(timeout)
    return bytes(got)


def closed_unanswered(port: int) -> bool:
    """A connection to ``port`` is closed without an answer (EOF, or a reset: the bytes we
    sent were never read)."""
    try:
        return through(port, b"hello", timeout=20) == b""
    except ConnectionResetError:
        return True


def echo_works(port: int) -> bool:
    try:
        return through(port, b"ping", timeout=5) == b"ping"
    except OSError:
        return False


class Forwarding:
    """mp.py running ``cat > /dev/null`` remotely (no PTY) with forwarding flags: it ends
    when ``close()`` closes its stdin; stderr (the client's messages) goes to a file."""

    def __init__(self, server: MpsServer, tmp_path, *flags, host: str = "127.0.0.1",
                 env=None) -> None:
        self.err_path = tmp_path / f"mp-{time.monotonic_ns()}.err"
        argv = mp_args(server, tmp_path, *flags, host=host) + ["--", "cat > /dev/null"]
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env or client_env(tmp_path),
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def close(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(20)
        finally:
            kill_pid(self.proc.pid)

    def __enter__(self) -> Forwarding:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            kill_pid(self.proc.pid)
        self.proc.stdin.close()


server = shared_server()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# -L, -R, -D
# ---------------------------------------------------------------------------

def test_local_forward_carries_bytes_both_ways_and_half_close(server, tmp_path, echo):
    port = free_port()
    with Forwarding(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}") as mp:
        wait_for(lambda: echo_works(port), 30, "the -L forward")
        data = os.urandom(1 << 20)
        assert sha(through(port, data)) == sha(data)
        assert mp.close() == 0
    assert "Traceback" not in client_log(tmp_path) + server.log()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_forward_under_ten_percent_loss_is_exact(server, tmp_path, echo):
    with relay_in_front(server, seed=18) as relay:
        relay.up.loss = relay.down.loss = 0.10
        relay.up.delay = relay.down.delay = 0.005
        port = free_port()
        with Forwarding(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}",
                        host=relay.front) as mp:
            wait_for(lambda: echo_works(port), 60, "the -L forward")
            data = os.urandom(4 << 20)
            started = time.monotonic()
            back = through(port, data, timeout=150)
            elapsed = time.monotonic() - started
            assert sha(back) == sha(data), f"{len(back)} of {len(data)} bytes came back"
            print(f"4 MiB each way through -L at 10% loss: {elapsed:.1f} s")
            assert mp.close() == 0


def test_remote_forward_reaches_a_server_on_the_client_side(server, tmp_path, echo):
    port = free_port()
    with Forwarding(server, tmp_path, "-R", f"{port}:127.0.0.1:{echo.port}") as mp:
        wait_for(lambda: echo_works(port), 30, "the -R forward")
        data = os.urandom(300_000)
        assert through(port, data) == data
        assert mp.close() == 0
    # The listener went with the session.
    wait_for(lambda: not echo_works(port), 10, "the -R listener to close")


def test_remote_forward_to_port_zero_reports_the_port(server, tmp_path, echo):
    with Forwarding(server, tmp_path, "-R", f"0:127.0.0.1:{echo.port}") as mp:
        found = wait_for(lambda: re.search(r"Allocated port (\d+)", mp.stderr()), 30,
                         "the allocated port")
        assert echo_works(int(found.group(1)))
        mp.close()


def test_dynamic_forward_serves_socks5_and_socks4a_to_curl(server, tmp_path, web):
    port = free_port()
    with Forwarding(server, tmp_path, "-D", str(port)) as mp:
        wait_for(lambda: _listening(port), 30, "the -D listener")
        for proxy in (f"--socks5-hostname 127.0.0.1:{port}", f"--socks4a 127.0.0.1:{port}",
                      f"--socks5 127.0.0.1:{port}"):
            result = subprocess.run(["curl", "-sS", "--max-time", "20", *proxy.split(),
                                     f"http://localhost:{web}/index.html"],
                                    capture_output=True, timeout=30)
            assert result.stdout == b"hello through the tunnel\n", (proxy, result.stderr)
        # A refused target: curl is told by the SOCKS answer, not by a hang.
        dead = free_port()
        result = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                                 f"127.0.0.1:{port}", f"http://localhost:{dead}/"],
                                capture_output=True, timeout=30)
        assert result.returncode != 0 and b"timed out" not in result.stderr
        assert mp.close() == 0


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_several_forwards_at_once(server, tmp_path, echo, web):
    ports = [free_port() for _ in range(3)]
    with Forwarding(server, tmp_path, "-L", f"{ports[0]}:127.0.0.1:{echo.port}",
                    "-L", f"127.0.0.1:{ports[1]}:localhost:{web}",
                    "-R", f"{ports[2]}:127.0.0.1:{echo.port}") as mp:
        wait_for(lambda: echo_works(ports[0]) and echo_works(ports[2]), 30, "the forwards")
        result = subprocess.run(["curl", "-sS", "--max-time", "20",
                                 f"http://127.0.0.1:{ports[1]}/index.html"],
                                capture_output=True, timeout=30)
        assert result.stdout == b"hello through the tunnel\n"
        # Parallel transfers on the same session stay apart.
        datas = [os.urandom(500_000) for _ in range(4)]
        results = [None] * 4

        def run(i):
            results[i] = through(ports[0] if i % 2 else ports[2], datas[i])
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == datas
        assert mp.close() == 0


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------

def test_permit_open_refusal_is_one_clear_line_on_the_client(tmp_path, echo):
    allowed = free_port()
    with MpsServer(tmp_path, settings={"mps.permit_open": f"127.0.0.1:{allowed}"}) as server:
        port = free_port()
        with Forwarding(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}") as mp:
            wait_for(lambda: _listening(port), 30, "the -L listener")
            assert closed_unanswered(port)
            line = wait_for(lambda: re.search(r"mp: channel \d+: open failed: .*", mp.stderr()),
                            20, "the refusal on stderr").group(0)
            assert line.endswith(f"administratively prohibited: 127.0.0.1:{echo.port} is not"
                                 " in the server's permit_open")
            mp.close()
        assert echo.connections == 0  # the server never connected
        assert "refused" in server.log()


def test_tcp_forwarding_off_refuses_local_and_remote(tmp_path, echo):
    with MpsServer(tmp_path, settings={"mps.allow_tcp_forwarding": "no"}) as server:
        local, remote = free_port(), free_port()
        with Forwarding(server, tmp_path, "-L", f"{local}:127.0.0.1:{echo.port}",
                        "-R", f"{remote}:127.0.0.1:{echo.port}") as mp:
            wait_for(lambda: "remote port forwarding failed" in mp.stderr(), 30,
                     "the -R refusal")
            assert (f"mp: remote port forwarding failed for listen port localhost:{remote}: "
                    "remote port forwarding is disabled on this server") in mp.stderr()
            assert closed_unanswered(local)
            wait_for(lambda: "local port forwarding is disabled on this server" in mp.stderr(),
                     20, "the -L refusal")
            assert not _listening(remote)
            mp.close()
        assert echo.connections == 0


def test_bad_forward_specs_are_an_error_before_connecting(server, tmp_path):
    result = subprocess.run(mp_args(server, tmp_path, "-L", "8080:nowhere") + ["--", "true"],
                            env=client_env(tmp_path), capture_output=True, timeout=30)
    assert result.returncode == 255
    assert result.stderr.decode().strip() == (
        "mp: bad forwarding: -L 8080:nowhere: use [bind_address:]port:host:hostport")


# ---------------------------------------------------------------------------
# -A
# ---------------------------------------------------------------------------

@pytest.fixture
def agent(tmp_path):
    """A real ssh-agent on a socket of ours holding a fresh key: (socket path, key line)."""
    key = keygen(str(tmp_path), "laptop-key")
    running = Agent(str(tmp_path))
    try:
        running.add_key(key)
        fingerprint = subprocess.run(["ssh-keygen", "-lf", key + ".pub"], check=True,
                                     capture_output=True, text=True, timeout=30).stdout.split()[1]
        yield running.sock, fingerprint
    finally:
        running.close()


def test_agent_forwarding_lists_the_laptops_keys_remotely(server, tmp_path, agent):
    sock, fingerprint = agent
    env = client_env(tmp_path, SSH_AUTH_SOCK=sock)
    result = subprocess.run(
        mp_args(server, tmp_path, "-A") + ["--", 'ssh-add -l; echo "SOCK=$SSH_AUTH_SOCK";'
                                           ' stat -c "%a %U" "$(dirname "$SSH_AUTH_SOCK")"'],
        env=env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert fingerprint in out and "laptop-key" in out
    remote_sock = re.search(r"SOCK=(\S+)", out).group(1)
    assert remote_sock != sock and remote_sock.endswith("/agent.sock")
    assert re.search(r"^700 \S+$", out, re.M)
    # The directory is gone with the session.
    wait_for(lambda: not os.path.exists(os.path.dirname(remote_sock)), 10,
             "the agent directory to be removed")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                    reason="needs root and useradd to create a throwaway user")
def test_agent_forwarding_lets_the_remote_shell_ssh_to_a_third_host(server, tmp_path,
                                                                   sshd_host):
    """What -A is for: from the remote shell, ``ssh`` to another host logs in with a key
    that only the laptop's agent holds (the third host, a real sshd, authorizes nothing
    else), and without -A the same command is refused."""
    laptop_agent = Agent(str(tmp_path))
    try:
        laptop_agent.add_key(sshd_host.client_key)
        sock = laptop_agent.sock
        third_host = ("ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no"
                      " -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
                      f" -p {sshd_host.port} {sshd_host.user.pw_name}@127.0.0.1"
                      " 'echo third host: $((6 * 7)) as $(id -un)'")

        def run(*options: str) -> subprocess.CompletedProcess:
            return subprocess.run(mp_args(server, tmp_path, *options) + ["--", third_host],
                                  env=client_env(tmp_path, SSH_AUTH_SOCK=sock),
                                  capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

        forwarded = run("-A")
        assert forwarded.returncode == 0, forwarded.stderr
        assert forwarded.stdout.decode() == f"third host: 42 as {sshd_host.user.pw_name}\n"
        refused = run()
        assert refused.returncode != 0 and b"third host" not in refused.stdout
        assert b"Permission denied" in refused.stderr
    finally:
        laptop_agent.close()


def test_without_a_the_session_has_no_agent(server, tmp_path, agent):
    sock, _ = agent
    result = subprocess.run(mp_args(server, tmp_path) + ["--", 'echo "[$SSH_AUTH_SOCK]"'],
                            env=client_env(tmp_path, SSH_AUTH_SOCK=sock), capture_output=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.stdout == b"[]\n"


def test_agent_forwarding_off_on_the_server(tmp_path, agent):
    sock, _ = agent
    with MpsServer(tmp_path, settings={"mps.allow_agent_forwarding": False}) as server:
        result = subprocess.run(mp_args(server, tmp_path, "-A") + ["--", 'echo "[$SSH_AUTH_SOCK]"'],
                                env=client_env(tmp_path, SSH_AUTH_SOCK=sock),
                                capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.stdout == b"[]\n"
        assert "allow_agent_forwarding is off" in server.log()


# ---------------------------------------------------------------------------
# Outages, slow readers
# ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_forwarded_transfer_survives_an_outage_and_a_resume(server, tmp_path, echo):
    """6 s without a packet in the middle of a transfer (the client's resume_after_secs set
    to its 4 s minimum): the client resumes (a new handshake, new keys, stream 2 resent
    from what was acknowledged) and every byte arrives once."""
    with relay_in_front(server) as relay:
        port = free_port()
        with Forwarding(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}",
                        host=relay.front, env=client_env(tmp_path, **QUICK_RESUME)) as mp:
            wait_for(lambda: echo_works(port), 30, "the -L forward")
            relay.set_bottleneck(4e6, queue_bytes=64_000)  # ~2 s of transfer each way
            data = os.urandom(2 << 20)
            result = {}
            transfer = threading.Thread(
                target=lambda: result.setdefault("back", through(port, data, 150)))
            transfer.start()
            time.sleep(0.7)
            assert transfer.is_alive()
            relay.blackout(6.0)  # in the middle of it, past resume_after_secs
            transfer.join(150)
            assert sha(result["back"]) == sha(data)
            assert relay.stats["down"]["blackout_dropped"] > 0
            assert mp.close() == 0
    assert re.search(r"session \S+ resumed", server.log())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_remote_listeners_stay_across_a_resume(server, tmp_path, echo):
    """-R belongs to the session: through a 6 s outage and the resume handshake after it
    (the client's resume_after_secs at its 4 s minimum) the listener stays bound on the
    server, and connections through it work again."""
    with relay_in_front(server) as relay:
        port = free_port()
        with Forwarding(server, tmp_path, "-R", f"{port}:127.0.0.1:{echo.port}",
                        host=relay.front, env=client_env(tmp_path, **QUICK_RESUME)) as mp:
            wait_for(lambda: echo_works(port), 30, "the -R forward")
            relay.blackout(6.0)
            time.sleep(3.0)
            assert _listening(port)  # still bound while the client is away
            wait_for(lambda: re.search(r"session \S+ resumed", server.log()), 40,
                     "the resume")
            wait_for(lambda: echo_works(port), 30, "the -R forward after the resume")
            assert mp.close() == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_forwarded_transfer_follows_the_client_roaming(server, tmp_path, echo):
    """The client's address changes twice mid-transfer (a NAT rebinding): the server
    validates the new address and the channel carries on, every byte once."""
    with relay_in_front(server) as relay:
        port = free_port()
        with Forwarding(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}",
                        host=relay.front) as mp:
            wait_for(lambda: echo_works(port), 30, "the -L forward")
            relay.set_bottleneck(4e6, queue_bytes=64_000)
            data = os.urandom(2 << 20)
            result = {}
            transfer = threading.Thread(
                target=lambda: result.setdefault("back", through(port, data, 120)))
            transfer.start()
            for _ in range(2):
                time.sleep(1.0)
                relay.rebind()
            transfer.join(120)
            assert sha(result["back"]) == sha(data)
            assert mp.close() == 0
    assert "client now at" in server.log()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stalled_reader_does_not_stall_the_terminal(server, tmp_path, echo):
    """A -L connection whose local reader never reads, with the echo server sending bulk
    back: its window fills and stops its sender; keystrokes still echo at once."""
    port = free_port()
    with PtyProcess(mp_args(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}"),
                    env=client_env(tmp_path)) as term:
        wait_shell(term)
        wait_for(lambda: echo_works(port), 30, "the -L forward")
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        sent = 0
        chunk = b"z" * 65536
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # fill every buffer on the way
            try:
                sent += stalled.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
        assert sent > 300_000  # the channel took its window's worth, then pushed back
        timings = []
        for i in range(5):
            start = time.monotonic()
            term.send(f"echo mark{i}$((1+{i}))\r")
            term.read_until(f"mark{i}{i + 1}".encode(), 10)
            timings.append(time.monotonic() - start)
        assert max(timings) < 2.0, timings
        # Another channel still works meanwhile.
        assert through(port, b"second", timeout=20) == b"second"
        stalled.close()
        term.send("exit\r")
        term.read_to_eof(20)
    assert "Traceback" not in client_log(tmp_path)



@pytest.mark.slow
def test_a_transfer_outlives_the_shell_then_mp_exits_with_its_status(server, tmp_path, echo):
    """As ssh: `exit 5` typed while a transfer through -L is under way gives the terminal
    back with one line saying what mp waits for; neither the -L port here nor the -R port
    there takes a new connection; the transfer completes intact; then mp exits 5 and the
    session ends."""
    port = free_port()
    data = os.urandom(3 << 20)
    with PtyProcess(mp_args(server, tmp_path, "-L", f"{port}:127.0.0.1:{echo.port}",
                            "-R", f"0:127.0.0.1:{echo.port}"),
                    env=client_env(tmp_path)) as term:
        term.read_until(re.compile(rb"Allocated port (\d+) for remote forward"), 30)
        remote_port = int(term.last_match.group(1))
        wait_shell(term)
        wait_for(lambda: echo_works(port) and echo_works(remote_port), 30, "the forwards")
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)

        def send():
            sock.sendall(data)  # may block while we do not read the echo: windows full
            sock.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = bytearray(sock.recv(65536))
        assert 0 < len(got) < len(data)  # under way, held up by us (the rest is in flight)
        term.send("exit 5\r")
        term.read_until(b"waiting for 1 forwarded connection(s) to close", 20)
        assert term.poll() is None
        # The listeners are closed: no new connections (the -R one as soon as the server
        # has sent the exit status; its client may get the status first).
        assert closed_or_refused(port)
        wait_for(lambda: closed_or_refused(remote_port), 10, "the -R listener to close")
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join(20)
        sock.close()
        assert sha(bytes(got)) == sha(data)
        assert term.wait(20) == 5
        out = term.read_to_eof(10)
        assert b"Connection to 127.0.0.1 closed." in out
    wait_for(lambda: "ended (shell exited with status 5)" in server.log(), 20, "session end")
    assert "Traceback" not in client_log(tmp_path)


def closed_or_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# ---------------------------------------------------------------------------
# A hostile client (the real session core, no mp.py in the way)
# ---------------------------------------------------------------------------

def test_hostile_channel_records_are_refused_and_the_session_goes_on(tmp_path, echo):
    """Against a real mps: an open for a target permit_open forbids, an open of a kind a
    client may not open, malformed records, data for a channel never opened, and an
    oversized record on the channel stream.  None reaches a socket; the session works."""
    allowed = free_port()
    with MpsServer(tmp_path, settings={"mps.permit_open": f"127.0.0.1:{allowed}"}) as server:
        with TestClient.for_server(server).connect() as client:
            mux = moshpit_channels.ChannelMux(client.core, "client")
            events = []

            def pump_until(done, timeout=15.0):
                deadline = time.monotonic() + timeout
                while not done():
                    assert time.monotonic() < deadline, events
                    client.pump(0.1)
                    event = mux.next_event()
                    while event is not None:
                        events.append(event)
                        event = mux.next_event()

            forbidden = mux.open(moshpit_channels.KIND_TCP, "127.0.0.1", echo.port,
                                 time.monotonic())
            client.link.flush(time.monotonic())
            pump_until(lambda: events)
            assert events == [moshpit_channels.ChannelRefused(
                forbidden, moshpit_channels.PROHIBITED,
                f"127.0.0.1:{echo.port} is not in the server's permit_open")]
            records = client.core.records
            records.send(moshpit_channels.RECORD_OPEN, moshpit_channels.OPEN_BODY.pack(
                5, moshpit_channels.KIND_AGENT, 1000, 0, 0) + b"\x00")
            records.send(moshpit_channels.RECORD_OPEN, b"\xff" * 3)
            records.send(moshpit_channels.RECORD_OPEN, moshpit_channels.OPEN_BODY.pack(
                7, moshpit_channels.KIND_TCP, 1000, 0, echo.port) + b"\xc8" + b"a" * 10)
            records.send(moshpit_channels.RECORD_WINDOW, b"\x00")
            mux.lane.send(moshpit_channels.RECORD_DATA,
                          moshpit_channels.DATA_HEADER.pack(99, 0) + b"never opened")
            client.core.conn.send(struct.pack("!BI", moshpit_channels.RECORD_DATA,
                                              1 << 30) + b"z" * 5000, moshpit_channels.STREAM_ID)
            client.link.flush(time.monotonic())
            client.pump_for(1.0)
            assert client.run("echo $((6*7))") == "42"
        log = server.log()
        assert "channel 5 (agent to :0) refused: a client cannot open agent channels" in log
        assert log.count("channel record of type") >= 3, log
        assert "skipped" in log  # the oversized record, unread
        assert "Traceback" not in log
    assert echo.connections == 0


# ---------------------------------------------------------------------------
# A root server serving another user
# ---------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                    reason="needs root and useradd to create a throwaway user")
def test_a_root_server_forwards_only_within_the_users_rights(tmp_path, users):
    """-R cannot bind a privileged port for a user who could not; the agent directory and
    socket belong to the user, private (0700 and 0600)."""
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False) as server:
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name,
                                   forward_agent=True).connect() as client:
            mux = moshpit_channels.ChannelMux(client.core, "client", agent=True)
            mux.listen(1, "localhost", 80)
            mux.listen(2, "localhost", 0)
            answers = {}
            deadline = time.monotonic() + 15
            while len(answers) < 2 and time.monotonic() < deadline:
                client.pump(0.1)
                event = mux.next_event()
                while event is not None:
                    answers[event.listener] = event
                    event = mux.next_event()
            assert answers[1] == moshpit_channels.ListenAnswered(
                1, moshpit_channels.PROHIBITED, 80, "port 80 is privileged")
            assert answers[2].code == moshpit_channels.OPENED and answers[2].port >= 1024
            sock = client.run('echo "$SSH_AUTH_SOCK"')
            assert client.run(f'stat -c "%U %a" "{sock}" "$(dirname "{sock}")"').split("\n") \
                == [f"{alice.pw_name} 600", f"{alice.pw_name} 700"]
            info = os.lstat(os.path.dirname(sock))
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (alice.pw_uid, 0o700)


def test_dash_n_forwards_without_a_command_until_interrupted(server, tmp_path, echo):
    """-N: the session process starts no process at all (no shell, no PTY), stdin is not read (here
    at EOF already: nothing ends because of it), the forward works, Ctrl-C (SIGINT) ends
    mp and the session."""
    port = free_port()
    argv = mp_args(server, tmp_path, "-N", "-L", f"{port}:127.0.0.1:{echo.port}")
    with ManagedProcess(argv, env=client_env(tmp_path), log=tmp_path / "mp-n.out") as mp:
        wait_for(lambda: echo_works(port), 30, "the -L forward")
        time.sleep(0.5)
        assert mp.poll() is None and echo_works(port)
        # the listener's child is the spawner, whose child is the session process: it
        # runs nothing for the session (no shell)
        sessions = [pid for spawner in proc_children(server.serving_pid, recursive=False)
                    for pid in proc_children(spawner, recursive=False)]
        assert sessions and all(proc_children(pid) == [] for pid in sessions)
        titles = [info.title for info in TestClient.for_server(server).sessions()]
        assert titles == ["(no command: forwarding only)"]
        mp.signal(signal.SIGINT)
        assert mp.wait(20) == 255
        assert "Traceback" not in mp.read_log()
    wait_for(lambda: "ended (client" in server.log(), 20, "the session to end")
    server.wait_log("has ended; it ran no command (mp -N)")  # no shell, so no exit status
