"""Keys in ssh-agent: the agent protocol codec (sans-IO), the client against a real
``ssh-agent`` started by the test (by PID), and real mp.py logins through a real mps.py on
loopback with keys that only the agent holds, confirm-each-use keys (``ssh-add -c`` with an
askpass script that approves or denies), a locked agent (``ssh-add -x``) and a dead socket.
A small proxy in front of the agent counts the sign requests that reach it."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

import pytest
from proc_util import ManagedProcess, unix_socket_open, wait_for
from server_util import make_key, shared_server, write_authorized_keys
from test_client_session import MP, USER, client_env

import moshpit_agent as agent
from moshpit_keys import PrivateKey, PublicKey, ssh_string, sshsig_sign, sshsig_verify

pytestmark = pytest.mark.timeout(120)

needs_agent = pytest.mark.skipif(not (shutil.which("ssh-agent") and shutil.which("ssh-add")),
                                 reason="needs OpenSSH's ssh-agent and ssh-add")


# ---------------------------------------------------------------------------
# Codec (sans-IO)
# ---------------------------------------------------------------------------


def test_messages_are_cut_from_a_stream_in_any_chunking():
    stream = (agent.encode_message(agent.SSH_AGENTC_REQUEST_IDENTITIES)
              + agent.encode_sign_request(b"blob", b"data") + agent.encode_message(5))
    decoder = agent.FrameDecoder()
    found = []
    for byte in stream:
        found += decoder.feed(bytes([byte]))
    assert found == [(11, b""), (13, ssh_string(b"blob") + ssh_string(b"data") + bytes(4)),
                     (5, b"")]
    assert decoder.pending == 0
    assert agent.decode_sign_request(found[1][1]) == (b"blob", b"data", 0)


@pytest.mark.parametrize("length", [0, agent.MAX_AGENT_MESSAGE + 1, 0xFFFFFFFF])
def test_a_length_out_of_bounds_is_refused_before_its_body(length):
    decoder = agent.FrameDecoder()
    with pytest.raises(agent.AgentProtocolError, match="outside"):
        decoder.feed(struct.pack(">I", length) + b"\x0c")


def identities_body(*pairs) -> bytes:
    return agent.encode_identities(list(pairs))[5:]


def test_identities_keep_the_agent_order_and_only_ed25519_is_usable():
    first, second = PrivateKey.generate(), PrivateKey.generate()
    rsa_blob = ssh_string(b"ssh-rsa") + ssh_string(b"\x01\x00\x01") + ssh_string(b"\x00" * 64)
    listed = agent.decode_identities(identities_body(
        (second.public.blob, "b"), (rsa_blob, "rsa"), (first.public.blob, "a\x1b[2J")))
    assert [found.public for found in listed] == [second.public, None, first.public]
    assert listed[1].key_type == "ssh-rsa"
    assert listed[2].public.comment == "a?[2J"  # no escape sequence reaches a terminal


@pytest.mark.parametrize("body, match", [
    (struct.pack(">I", agent.MAX_AGENT_KEYS + 1), "2049 keys"),
    (struct.pack(">I", 2) + ssh_string(b"x") + ssh_string(b"c"), "truncated"),
    (struct.pack(">I", 0) + b"junk", "trailing"),
    (b"\x00\x00", "truncated"),
])
def test_garbled_identities_are_rejected_cleanly(body, match):
    with pytest.raises(agent.AgentProtocolError, match=match):
        agent.decode_identities(body)


def test_a_signature_must_be_ed25519_and_verify():
    key, other = PrivateKey.generate(), PrivateKey.generate()
    good = ssh_string(ssh_string(b"ssh-ed25519") + ssh_string(key.sign(b"data")))
    assert agent.decode_signature(good, key.public, b"data") == key.sign(b"data")
    with pytest.raises(agent.AgentProtocolError, match="does not verify"):
        agent.decode_signature(good, other.public, b"data")
    with pytest.raises(agent.AgentProtocolError, match="does not verify"):
        agent.decode_signature(ssh_string(ssh_string(b"ssh-rsa") + ssh_string(key.sign(b"data"))),
                               key.public, b"data")
    with pytest.raises(agent.AgentProtocolError, match="trailing"):
        agent.decode_signature(good + b"x", key.public, b"data")


def test_sign_requests_are_bounded():
    with pytest.raises(ValueError):
        agent.encode_sign_request(b"blob", bytes(agent.MAX_SIGN_DATA + 1))
    body = ssh_string(b"blob") + ssh_string(bytes(agent.MAX_SIGN_DATA + 1)) + bytes(4)
    with pytest.raises(agent.AgentProtocolError, match="longer"):
        agent.decode_sign_request(body)


# ---------------------------------------------------------------------------
# A real ssh-agent, and a proxy that counts what reaches it
# ---------------------------------------------------------------------------


def short_dir() -> str:
    """A directory with a short path: a Unix socket path holds at most 107 bytes."""
    return tempfile.mkdtemp(prefix="mpagent-", dir="/tmp")


class Agent:
    """``ssh-agent -D`` on its own socket, stopped by PID. ``askpass`` (a script) answers
    confirmations: it is forced even without a display, as a desktop's askpass would."""

    def __init__(self, directory: str, askpass=None) -> None:
        self.sock = os.path.join(directory, "agent.sock")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": directory}
        if askpass:
            env.update(SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        self.proc = ManagedProcess(["ssh-agent", "-D", "-a", self.sock], env=env,
                                   log=os.path.join(directory, "agent.log"))
        wait_for(lambda: unix_socket_open(self.sock), 10, "ssh-agent to listen")

    def ssh_add(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh-add", *args], env={"SSH_AUTH_SOCK": self.sock,
                                                       "PATH": os.environ.get("PATH", "")},
                              input=b"", capture_output=True, timeout=20, check=True)

    def add_key(self, path: str, *flags: str) -> None:
        self.ssh_add(*flags, path)

    def lock(self, password: str = "pw") -> None:
        """ssh-add -x reads the password from the terminal: feed it through a pty."""
        import pty
        pid, fd = pty.fork()
        if pid == 0:
            os.environ["SSH_AUTH_SOCK"] = self.sock
            os.execvp("ssh-add", ["ssh-add", "-x"])
        try:
            output = b""
            for _ in range(2):  # "Enter lock password:", "Again:"
                while b":" not in output:
                    output += os.read(fd, 1024)
                os.write(fd, password.encode() + b"\n")
                output = b""
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(fd)

    def close(self) -> None:
        self.proc.close()


class CountingProxy:
    """A Unix socket in front of the agent that passes everything through and counts the
    sign requests (with the agent codec), so a test sees how often the agent was asked."""

    def __init__(self, directory: str, target: str) -> None:
        self.sock = os.path.join(directory, "proxy.sock")
        self.target = target
        self.sign_requests = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.sock)
        self._listener.listen(8)
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.target)
        decoder = agent.FrameDecoder()
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                for kind, _ in decoder.feed(data):
                    if kind == agent.SSH_AGENTC_SIGN_REQUEST:
                        with self._lock:
                            self.sign_requests += 1
                upstream.sendall(data)
                client.sendall(upstream.recv(65536))  # one answer per request, small here
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def workdir():
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ssh_agent(workdir):
    running = Agent(workdir)
    yield running
    running.close()


def keygen(directory: str, name: str) -> str:
    """A key made by ssh-keygen (OpenSSH's own files): its private key path."""
    path = os.path.join(directory, name)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path],
                   check=True, timeout=20)
    return path


def public_of(path: str) -> PublicKey:
    with open(path + ".pub") as f:
        return PublicKey.from_line(f.read())


@needs_agent
def test_the_client_lists_and_signs_with_a_real_agent(ssh_agent, workdir):
    path = keygen(workdir, "only-in-agent")
    ssh_agent.add_key(path)
    client = agent.AgentClient(ssh_agent.sock)
    (listed,) = client.identities()
    assert listed.public == public_of(path) and listed.comment == "only-in-agent"
    signature = sshsig_sign(agent.AgentKey(client, listed.public), "moshpit-client", b"hello")
    assert sshsig_verify(listed.public, "moshpit-client", b"hello", signature)


@needs_agent
def test_a_key_the_agent_does_not_hold_is_refused(ssh_agent):
    client = agent.AgentClient(ssh_agent.sock)
    with pytest.raises(agent.AgentRefused, match="locked"):  # it lists no keys at all
        client.sign(PrivateKey.generate().public, b"data")


@needs_agent
def test_the_key_ring_offers_the_file_first_then_the_agent(ssh_agent, workdir):
    agent_path, file_path = keygen(workdir, "agent-key"), os.path.join(workdir, "file-key")
    file_key = make_key(file_path, "file-key")
    ssh_agent.add_key(agent_path)
    ssh_agent.add_key(file_path)  # in both: offered once

    def ring():
        return agent.KeyRing(file_path, file_path + ".pub", lambda: file_key,
                             agent.AgentClient(ssh_agent.sock))

    first = ring()
    assert first.offers() == [file_key.public, public_of(agent_path)]
    assert "agent key 'agent-key'" in first.tried() and file_path in first.tried()
    assert first.signer(file_key.public) is file_key  # the file needs no agent round trip
    # Once a key has logged in, the ring keeps to it (a resume must use the same key): a
    # file key signs at once, with no offer.
    assert first.offers() == []
    with pytest.raises(agent.AgentError, match="not offered"):
        first.signer(public_of(agent_path))
    second = ring()
    second.offers()
    assert isinstance(second.signer(public_of(agent_path)), agent.AgentKey)
    assert second.offers() == [public_of(agent_path)]  # an agent key is offered again


# ---------------------------------------------------------------------------
# Real logins: mp.py -> mps.py on loopback
# ---------------------------------------------------------------------------


server = shared_server()


def mp_run(server, tmp_path, auth_sock, *flags: str, timeout: float = 60.0):
    """mp.py running ``echo agent-login-ok`` (no PTY), ``auth_sock`` as SSH_AUTH_SOCK."""
    argv = [sys.executable, MP, "-s", str(server.port), "-t", str(tmp_path / "mp.log"),
            "--strict-host-key-checking", "accept-new", *flags, f"{USER}@127.0.0.1", "--",
            "echo", "agent-login-ok"]
    env = client_env(tmp_path)
    if auth_sock is not None:
        env["SSH_AUTH_SOCK"] = auth_sock
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout)


def error_lines(result) -> list:
    """What mp printed on stderr, without the known_hosts notice of a first connection."""
    return [line for line in result.stderr.decode().strip().splitlines()
            if not line.startswith("Warning: Permanently added")]


def logged_in(result) -> bool:
    return result.returncode == 0 and result.stdout == b"agent-login-ok\n"


def only_in_agent(agent_: Agent, directory: str, name: str) -> PublicKey:
    """A key whose private half is in the agent and nowhere else (its .pub stays)."""
    path = keygen(directory, name)
    agent_.add_key(path)
    os.unlink(path)
    return public_of(path)


@needs_agent
@pytest.mark.slow
def test_a_key_only_in_the_agent_logs_in(server, tmp_path, ssh_agent, workdir):
    public = only_in_agent(ssh_agent, workdir, "laptop")
    write_authorized_keys(server.authorized_keys_path, public)
    # no key file at all (the default ~/.mp/id_ed25519 is missing): the agent's key is used,
    # nobody is asked to generate one
    result = mp_run(server, tmp_path, ssh_agent.sock)
    assert logged_in(result), result.stderr
    assert public.fingerprint() in server.wait_log("accepted")
    # -i naming the .pub of a key only the agent holds, as ssh
    result = mp_run(server, tmp_path, ssh_agent.sock, "-i", os.path.join(workdir, "laptop.pub"))
    assert logged_in(result), result.stderr
    # -i naming the private key file, gone while its .pub stays: the agent's copy signs
    result = mp_run(server, tmp_path, ssh_agent.sock, "-i", os.path.join(workdir, "laptop"))
    assert logged_in(result), result.stderr


@needs_agent
@pytest.mark.slow
def test_only_the_authorized_key_is_signed_once(server, tmp_path, ssh_agent, workdir):
    """Four agent keys and a key file, only the last agent key authorized: the server says
    which before anything is signed, so exactly one sign request reaches the agent."""
    keys = [only_in_agent(ssh_agent, workdir, f"key{n}") for n in range(4)]
    write_authorized_keys(server.authorized_keys_path, keys[-1])
    proxy = CountingProxy(workdir, ssh_agent.sock)
    try:
        result = mp_run(server, tmp_path, proxy.sock, "-i", server.client_key_path)
    finally:
        proxy.close()
    assert logged_in(result), result.stderr
    assert proxy.sign_requests == 1
    assert keys[-1].fingerprint() in server.wait_log("accepted")


@needs_agent
@pytest.mark.slow
def test_no_acceptable_key_lists_what_was_tried(server, tmp_path, ssh_agent, workdir):
    public = only_in_agent(ssh_agent, workdir, "unknown-to-server")
    proxy = CountingProxy(workdir, ssh_agent.sock)
    try:
        result = mp_run(server, tmp_path, proxy.sock, "-i", os.path.join(workdir, "none"))
    finally:
        proxy.close()
    assert result.returncode == 255
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mp: permission denied (publickey) for {USER}@127.0.0.1;"
                               " tried agent key 'unknown-to-server'")
    assert public.fingerprint() in lines[0]
    assert proxy.sign_requests == 0  # refused before anything was signed


def askpass_script(directory: str, answer: str) -> str:
    """An askpass that records each question (ssh-agent's "Allow use of key ...?") and
    approves or denies."""
    path = os.path.join(directory, f"askpass-{answer}")
    asked = os.path.join(directory, "asked")
    reply = {"yes": "echo yes\n", "slowly": "sleep 2\necho yes\n", "no": "exit 1\n"}[answer]
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho \"$1\" >> {asked}\n{reply}")
    os.chmod(path, 0o755)
    return path


def times_asked(directory: str) -> int:
    try:
        with open(os.path.join(directory, "asked")) as f:
            return f.read().count("Allow use of key")
    except FileNotFoundError:
        return 0


@needs_agent
@pytest.mark.slow
@pytest.mark.parametrize("answer", ["yes", "slowly", "no"])
def test_a_confirm_each_use_key_asks_once(server, tmp_path, workdir, answer):
    confirming = Agent(workdir, askpass=askpass_script(workdir, answer))
    try:
        for n in range(2):  # an unauthorized confirm key first: it must never be asked for
            path = keygen(workdir, f"confirm{n}")
            confirming.add_key(path, "-c")
            os.unlink(path)
        write_authorized_keys(server.authorized_keys_path, public_of(os.path.join(workdir,
                                                                                  "confirm1")))
        result = mp_run(server, tmp_path, confirming.sock)
    finally:
        confirming.close()
    assert times_asked(workdir) == 1
    waiting = (f"mp: waiting for ssh-agent to sign with"
               f" {public_of(os.path.join(workdir, 'confirm1')).fingerprint()} (confirm it, or"
               " touch the key)")
    assert (waiting in error_lines(result)) == (answer == "slowly")  # after 1 s
    if answer != "no":
        assert logged_in(result), result.stderr
    else:
        assert result.returncode == 255
        lines = error_lines(result)
        assert lines == [f"mp: ssh-agent refused to sign with key 'confirm1'"
                         f" ({public_of(os.path.join(workdir, 'confirm1')).fingerprint()}):"
                         " the confirmation was denied (or it could not ask: SSH_ASKPASS; or"
                         " the key is limited to some hosts: ssh-add -h)"]


@needs_agent
@pytest.mark.slow
def test_a_locked_agent_says_so(server, tmp_path, ssh_agent, workdir):
    public = only_in_agent(ssh_agent, workdir, "locked")
    write_authorized_keys(server.authorized_keys_path, public)
    ssh_agent.lock()
    result = mp_run(server, tmp_path, ssh_agent.sock, "-i", os.path.join(workdir, "locked.pub"))
    assert result.returncode == 255
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "lists no keys: it is locked (ssh-add -X unlocks it)" in lines[0]
    assert lines[0].startswith(f"mp: cannot use {workdir}/locked.pub: ssh-agent")


@needs_agent
@pytest.mark.slow
def test_a_missing_agent_socket_says_so(server, tmp_path, workdir):
    pub = os.path.join(workdir, "k.pub")
    make_key(os.path.join(workdir, "k"), "k")
    os.unlink(os.path.join(workdir, "k"))
    missing = os.path.join(workdir, "gone.sock")
    result = mp_run(server, tmp_path, missing, "-i", pub)
    assert result.returncode == 255
    assert error_lines(result) == [
        f"mp: cannot reach ssh-agent at SSH_AUTH_SOCK={missing}: no such file or directory"
        " (is ssh-agent running? a stale SSH_AUTH_SOCK is left from an old login)"]


@needs_agent
@pytest.mark.slow
def test_a_dead_agent_does_not_stop_the_key_file(server, tmp_path, workdir):
    """A stale SSH_AUTH_SOCK (agent gone) while the key file can log in: it just does."""
    stale = os.path.join(workdir, "stale.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(stale)
    listener.close()  # the socket file stays, nobody listens: ECONNREFUSED
    result = mp_run(server, tmp_path, stale, "-i", server.client_key_path)
    assert logged_in(result), result.stderr


def test_a_public_key_file_needs_the_agent(workdir):
    """-i KEY.pub without an agent: one line saying where the private half must be."""
    make_key(os.path.join(workdir, "k"), "k")
    ring = agent.KeyRing(os.path.join(workdir, "k.pub"), os.path.join(workdir, "k.pub.pub"),
                         lambda: pytest.fail("no key file to load"), None)
    with pytest.raises(agent.AgentError, match=r"k.pub must be in ssh-agent, but SSH_AUTH_SOCK"
                                               " is not set"):
        ring.offers()


def test_a_hung_agent_costs_a_bounded_wait(workdir, monkeypatch):
    """An agent that accepts the connection and never answers: an error, not a hang."""
    path = os.path.join(workdir, "hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    monkeypatch.setattr(agent, "LIST_TIMEOUT_SECS", 0.3)
    try:
        with pytest.raises(agent.AgentError, match="did not answer within 0.3 s"):
            agent.AgentClient(path).identities()
    finally:
        listener.close()


def test_an_agent_sending_garbage_is_rejected_cleanly(workdir):
    path = os.path.join(workdir, "garbage.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def answer():
        peer, _ = listener.accept()
        peer.recv(100)
        peer.sendall(b"\xff\xff\xff\xffHTTP/1.1 400")
        peer.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(agent.AgentProtocolError, match="outside"):
            agent.AgentClient(path).identities()
    finally:
        thread.join(5)
        listener.close()
