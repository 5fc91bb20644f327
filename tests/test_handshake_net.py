"""The blocking drivers over real sockets on loopback: authentication outcomes, resume,
connection errors, the server deadline, the concurrency cap, and what reaches the logs."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import http.server
import socket
import threading
import time

import pytest
from handshake_util import (
    LOOPBACK,
    UNLIMITED,
    LoopbackServer,
    ReferenceDecider,
    fake_user,
    write_authorized_keys,
)

import moshpit
import moshpit_handshake as hs
import moshpit_trust as trust
from moshpit_keys import PrivateKey

pytestmark = pytest.mark.timeout(60)


class Setup:
    """alice with two authorized keys, a stranger's key, a server host key."""

    def __init__(self, tmp_path):
        self.alice = PrivateKey.generate("alice@laptop")
        self.alice2 = PrivateKey.generate("alice@phone")
        self.stranger = PrivateKey.generate("mallory@evil")
        self.host_key = PrivateKey.generate("root@server")
        self.home = str(tmp_path / "home" / "alice")
        self.authorized = write_authorized_keys(self.home, [self.alice.public,
                                                            self.alice2.public])
        self.decide = ReferenceDecider(fake_user(self.home))
        self.seen_host_keys = []

    def server(self, **kwargs) -> LoopbackServer:
        return LoopbackServer(self.host_key, self.decide, **kwargs)

    def verify(self, key):
        self.seen_host_keys.append(key)

    def connect(self, server, identity=None, request=None, host=LOOPBACK, **kwargs):
        return hs.client_handshake(host, server.port, identity or self.alice,
                                   request or hs.ClientRequest("alice"), self.verify, **kwargs)


@pytest.fixture
def setup(tmp_path):
    return Setup(tmp_path)


def test_happy_path(setup):
    request = hs.ClientRequest("alice", term="screen", rows=40, cols=100,
                               env={"LANG": "C.UTF-8"})
    with setup.server() as server:
        result = setup.connect(server, request=request)
        auth = server.result()
    assert setup.seen_host_keys == [setup.host_key.public] == [result.host_key]
    assert result.server_addr[:2] == (LOOPBACK, server.port)
    assert auth.keys == result.keys and auth.request == request
    assert auth.client_key == setup.alice.public
    assert auth.peer[0] == LOOPBACK and auth.local == (LOOPBACK, server.port)
    assert setup.decide.sessions[result.grant.session_id].key == setup.alice.public


def test_resume_with_the_same_key(setup):
    with setup.server() as server:
        first = setup.connect(server)
        server.result()  # the first handshake's thread is done before the resume starts
        resume = hs.ClientRequest("alice", resume_session_id=first.grant.session_id,
                                  resume_secret=first.grant.resume_secret,
                                  resume_recv_offset=1000)
        again = setup.connect(server, request=resume)
        auth = server.result()
    assert again.grant.session_id == first.grant.session_id
    assert again.grant.recv_offset == 4242
    assert again.keys.client_to_server != first.keys.client_to_server
    assert again.keys.conn_id != first.keys.conn_id
    assert auth.request.resume_recv_offset == 1000
    assert auth.resume_proof_valid(first.grant.resume_secret)


def refused(setup, server, caplog, **kwargs) -> hs.AuthRefused:
    with caplog.at_level(logging.INFO, logger="moshpit"), \
            pytest.raises(hs.AuthRefused) as raised:
        setup.connect(server, **kwargs)
    assert server.result() is None
    return raised.value


def test_resume_with_another_authorized_key_is_refused(setup, caplog):
    with setup.server() as server:
        first = setup.connect(server)
        server.result()
        resume = hs.ClientRequest("alice", resume_session_id=first.grant.session_id,
                                  resume_secret=first.grant.resume_secret)
        err = refused(setup, server, caplog, identity=setup.alice2, request=resume)
    assert str(err) == "permission denied (publickey) for alice@127.0.0.1"
    assert err.code == hs.PERMISSION_DENIED
    assert "resume of a session opened by another key" in caplog.text
    assert setup.alice2.public.fingerprint() in caplog.text


def test_resume_with_a_wrong_secret_or_unknown_session_is_refused(setup, caplog):
    with setup.server() as server:
        first = setup.connect(server)
        server.result()
        wrong = hs.ClientRequest("alice", resume_session_id=first.grant.session_id,
                                 resume_secret=os.urandom(32))
        assert refused(setup, server, caplog, request=wrong).code == hs.PERMISSION_DENIED
        assert "bad resume proof" in caplog.text
        gone = hs.ClientRequest("alice", resume_session_id=os.urandom(16),
                                resume_secret=os.urandom(32))
        err = refused(setup, server, caplog, request=gone)
    assert err.code == hs.NO_SUCH_SESSION
    assert str(err) == ("the session on 127.0.0.1 no longer exists"
                        " (server restarted or session expired)")


def test_unknown_key_is_refused(setup, caplog):
    with setup.server() as server:
        err = refused(setup, server, caplog, identity=setup.stranger)
    assert str(err) == "permission denied (publickey) for alice@127.0.0.1"
    assert f"key {setup.stranger.public.fingerprint()} is not authorized" in caplog.text


def test_authorized_key_without_its_private_key_is_refused(setup, caplog):
    class Impostor:  # claims alice's key, signs with the stranger's
        public = setup.alice.public
        sign = setup.stranger.sign

    with setup.server() as server:
        err = refused(setup, server, caplog, identity=Impostor())
    assert err.code == hs.PERMISSION_DENIED
    assert "does not verify (no proof of possession" in caplog.text
    assert setup.alice.public.fingerprint() in caplog.text
    assert setup.decide.calls == 0  # refused before anyone looked at authorized_keys


def test_unsafe_authorized_keys_is_refused_with_the_reason(setup, caplog):
    os.chmod(setup.authorized, 0o660)
    with setup.server() as server:
        err = refused(setup, server, caplog)
    assert str(err) == "permission denied (publickey) for alice@127.0.0.1"
    assert (f"{setup.authorized} is mode 0660, must not be group/world writable"
            in caplog.text)
    assert "0660" not in str(err)  # the client learns nothing about the server's files


def test_other_user_is_refused(setup, caplog):
    with setup.server() as server:
        err = refused(setup, server, caplog, request=hs.ClientRequest("root"))
    assert str(err) == "permission denied (publickey) for root@127.0.0.1"


def test_host_key_refusal_stops_before_authenticating(setup):
    def reject(key):
        raise trust.HostKeyError("host key verification failed: test")

    with setup.server() as server:
        with pytest.raises(trust.HostKeyError, match="test"):
            hs.client_handshake(LOOPBACK, server.port, setup.alice, hs.ClientRequest("alice"),
                                reject)
        assert server.result() is None
    assert setup.decide.calls == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def test_connection_refused_is_one_clear_line(setup):
    port = free_port()
    with pytest.raises(hs.HandshakeError) as raised:
        hs.client_handshake(LOOPBACK, port, setup.alice, hs.ClientRequest("alice"), setup.verify)
    assert str(raised.value) == (f"nothing listens on 127.0.0.1:{port} (is mps running? is the"
                                 " port right: -s PORT)")


def test_unresolvable_name_is_one_clear_line(setup):
    with pytest.raises(hs.HandshakeError) as raised:
        hs.client_handshake("no-such-host.invalid", 40404, setup.alice, hs.ClientRequest("alice"),
                            setup.verify)
    assert str(raised.value).startswith("could not resolve host name no-such-host.invalid: ")


def test_every_resolved_address_is_tried(setup):
    """"localhost" may resolve to ::1 first; the server only listens on 127.0.0.1."""
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 1, 0,
                                                           socket.SOCK_STREAM)}
    if LOOPBACK not in addresses:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    with setup.server() as server:
        result = setup.connect(server, host="localhost")
    assert result.server_addr[0] == LOOPBACK


def test_ipv6_loopback(setup):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with setup.server(host="::1") as server:
        result = setup.connect(server, host="::1")
        auth = server.result()
    assert result.server_addr[0] == "::1" and auth.peer[0] == "::1"


def test_silent_server_times_out(setup):
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(hs.HandshakeError) as raised:
            hs.client_handshake(LOOPBACK, port, setup.alice, hs.ClientRequest("alice"),
                                setup.verify, timeout=1.0)
        assert time.monotonic() - start < 10
    assert str(raised.value) == (f"127.0.0.1:{port} did not answer in 1 s (an overloaded moshpit"
                                 " server, or not one at all: is the port right: -s PORT)")


def test_server_that_stops_mid_handshake_times_out(setup):
    """Some bytes came (a ServerHello's first half), then nothing: a plain timeout."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client_gave_up = threading.Event()

        def half_hello():
            peer, _ = listener.accept()
            peer.sendall(b"\x00\x00\x00\x50\x02")  # an 80-byte message that never ends
            client_gave_up.wait(10)  # the connection stays open, silent, until then
            peer.close()

        thread = threading.Thread(target=half_hello, daemon=True)
        thread.start()
        with pytest.raises(hs.HandshakeError) as raised:
            hs.client_handshake(LOOPBACK, port, setup.alice, hs.ClientRequest("alice"),
                                setup.verify, timeout=1.0)
        client_gave_up.set()
        thread.join(10)
    assert str(raised.value) == f"handshake with 127.0.0.1 port {port} timed out after 1 s"


def test_stock_python_http_server_is_not_a_moshpit_server(setup):
    """``python3 -m http.server`` on the port: it waits for a request line, so it answers
    only if our random ClientHello happens to hold a newline (about one time in five). Either
    way the user learns that this port is not a moshpit server's."""
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5  # a worker thread still waiting for a newline ends soon after the test

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        messages = set()
        for _ in range(3):
            with pytest.raises(hs.HandshakeError) as raised:
                hs.client_handshake(LOOPBACK, port, setup.alice, hs.ClientRequest("alice"),
                                    setup.verify, timeout=1.0)
            messages.add(str(raised.value))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert messages <= {
        f"127.0.0.1:{port} is not a moshpit server (it speaks HTTP)",
        f"127.0.0.1:{port} did not answer in 1 s (an overloaded moshpit server, or not one at"
        " all: is the port right: -s PORT)"}


def test_reconnects_once_when_the_prompt_outlasts_the_server(setup, caplog):
    """A human answering the first-contact prompt takes longer than the server's deadline."""
    def slow_human(key):
        setup.seen_host_keys.append(key)
        time.sleep(2.0)

    with setup.server(timeout=1.0) as server, caplog.at_level(logging.INFO, logger="moshpit"):
        result = hs.client_handshake(LOOPBACK, server.port, setup.alice,
                                     hs.ClientRequest("alice"), slow_human, timeout=5.0)
        assert server.result() is None  # the first attempt timed out on the server
        assert server.result().keys == result.keys
    assert setup.seen_host_keys == [setup.host_key.public]  # asked once, not twice
    assert "reconnecting" in caplog.text


def test_identity_is_loaded_only_once_the_host_key_is_trusted(setup):
    """A LazyIdentity (mp's passphrase prompt) runs after the host key check, once."""
    events = []

    def verify(key):
        events.append("verify")

    def load():
        events.append("load")
        return setup.alice

    with setup.server() as server:
        hs.client_handshake(LOOPBACK, server.port, hs.LazyIdentity(load),
                            hs.ClientRequest("alice"), verify)
        assert server.result() is not None
    assert events == ["verify", "load"]


def never_load():
    raise AssertionError("the identity was loaded (a passphrase would have been asked)")


def test_identity_is_not_loaded_for_a_refused_host_key_or_connection(setup):
    def reject(key):
        raise trust.HostKeyError("host key verification failed: test")

    with setup.server() as server, pytest.raises(trust.HostKeyError):
        hs.client_handshake(LOOPBACK, server.port, hs.LazyIdentity(never_load),
                            hs.ClientRequest("alice"), reject)
    with pytest.raises(hs.HandshakeError, match="nothing listens on"):
        hs.client_handshake(LOOPBACK, free_port(), hs.LazyIdentity(never_load),
                            hs.ClientRequest("alice"), setup.verify)


def test_slow_passphrase_reconnects_once_and_asks_once(setup, caplog):
    """The user takes longer over the passphrase than the server's deadline: one new
    connection, the host key not asked about again, the key loaded once."""
    loads = []

    def slow_passphrase():
        loads.append(time.monotonic())
        time.sleep(2.0)
        return setup.alice

    with setup.server(timeout=1.0) as server, caplog.at_level(logging.INFO, logger="moshpit"):
        result = hs.client_handshake(LOOPBACK, server.port, hs.LazyIdentity(slow_passphrase),
                                     hs.ClientRequest("alice"), setup.verify, timeout=5.0)
        assert server.result() is None  # the first attempt timed out on the server
        assert server.result().keys == result.keys
    assert len(loads) == 1 and setup.seen_host_keys == [setup.host_key.public]
    assert "reconnecting" in caplog.text


def test_busy_server_says_so_and_recovers(setup):
    limiter = hs.HandshakeLimiter(
        hs.AdmissionPolicy(dataclasses.replace(UNLIMITED, max_handshakes=2)))
    with setup.server(limiter=limiter, timeout=20.0) as server:
        hogs = [socket.create_connection((LOOPBACK, server.port)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while limiter.active < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(hs.HandshakeError) as raised:
            setup.connect(server)
        assert raised.value.code == hs.SERVER_BUSY
        assert str(raised.value) == (f"server busy: 127.0.0.1 port {server.port} has too many"
                                     " connections in progress; try again later")
        for hog in hogs:
            hog.close()
        server.result()
        server.result()
        server.wait_idle()
        assert setup.connect(server).grant


def secret_forms(secret: bytes):
    """The ways a secret could show up in a text log."""
    yield secret.hex()
    yield base64.b64encode(secret).decode().rstrip("=")
    yield repr(secret)[2:-1]


@pytest.mark.timeout(120)
def test_no_key_material_or_secret_in_logs_at_the_most_verbose_level(setup, tmp_path):
    log_path = tmp_path / "moshpit.log"
    config = moshpit.load_config("server", cli={"verbose": 5}, environ={}, home=str(tmp_path))
    moshpit.setup_logging("server", config, log_path=str(log_path), stderr=False)
    try:
        assert logging.getLogger("moshpit.handshake").isEnabledFor(logging.DEBUG)
        with setup.server() as server:
            first = setup.connect(server)
            resume = hs.ClientRequest("alice", resume_session_id=first.grant.session_id,
                                      resume_secret=first.grant.resume_secret)
            second = setup.connect(server, request=resume)
            with pytest.raises(hs.AuthRefused):
                setup.connect(server, identity=setup.stranger)
            with pytest.raises(hs.AuthRefused):
                setup.connect(server, identity=setup.alice2, request=resume)
            for _ in range(4):
                server.result()
    finally:
        moshpit.reset_logging()
    text = log_path.read_text()
    assert "accepted alice@127.0.0.1" in text and "refused alice@127.0.0.1" in text
    secrets = [key.seed for key in (setup.alice, setup.alice2, setup.stranger, setup.host_key)]
    secrets += [key.public.blob for key in (setup.alice, setup.stranger, setup.host_key)]
    secrets += [key.public.raw for key in (setup.alice, setup.stranger, setup.host_key)]
    for result in (first, second):
        secrets += [result.keys.client_to_server, result.keys.server_to_client,
                    result.grant.resume_secret]
    for secret in secrets:
        for form in secret_forms(secret):
            assert form not in text
