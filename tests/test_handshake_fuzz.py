"""Fuzzing: hypothesis against both state machines and the parsers behind the AEAD, and a
raw-socket fuzzer against the threaded server while legitimate clients log in."""

from __future__ import annotations

import logging
import random
import select
import socket
import struct
import threading
import time

import pytest
from handshake_util import (
    LOOPBACK,
    Flow,
    LoopbackServer,
    ReferenceDecider,
    fake_user,
    grant,
    recv_until_closed,
    write_authorized_keys,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moshpit_handshake as hs
from moshpit_keys import PrivateKey

IDENTITY = PrivateKey.generate("alice@laptop")
HOST_KEY = PrivateKey.generate("root@server")
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def valid_exchange():
    """The bytes of one real handshake, per step: CH, SH+SA, CA, SF."""
    flow = Flow(IDENTITY, HOST_KEY)
    flow.run()
    return [flow.c2s[0], flow.s2c[0], flow.c2s[1], flow.s2c[1]]


# Raw bytes, and well-framed messages of every type with random payloads (past the framing).
MESSAGES = st.builds(lambda kind, payload: struct.pack(">I", len(payload) + 1) + bytes([kind])
                     + payload, st.integers(0, 8), st.binary(max_size=300))
CHUNKS = st.lists(st.one_of(st.binary(max_size=300), MESSAGES), max_size=12)


def feed(machine, chunks):
    """Feed chunks, stepping after each; only None, an event or HandshakeError may come out."""
    for chunk in chunks:
        machine.receive_data(chunk)
        try:
            machine.next_event()
        except hs.HandshakeError:
            with pytest.raises(hs.HandshakeError):
                machine.next_event()
            assert isinstance(machine.data_to_send(), bytes)
            return
        assert isinstance(machine.data_to_send(), bytes)


@pytest.mark.timeout(120)
@FUZZ
@given(prefix=st.sampled_from([b"", "hello"]), chunks=CHUNKS)
def test_server_machine_survives_any_input(prefix, chunks):
    if prefix == "hello":  # get past the first message, into the sealed part
        prefix = hs.ClientHandshake(IDENTITY, hs.ClientRequest("alice")).data_to_send()
    feed(hs.ServerHandshake(HOST_KEY), [prefix, *chunks])


@pytest.mark.timeout(120)
@FUZZ
@given(stage=st.integers(0, 2), chunks=CHUNKS)
def test_client_machine_survives_any_input(stage, chunks):
    flow = Flow(IDENTITY, HOST_KEY)
    if stage >= 1:
        flow.to_server()
    if stage == 2:  # past the host key, waiting for ServerFinish
        flow.to_client()
        flow.client.accept_host_key()
        flow.to_server()
    feed(flow.client, chunks)


@pytest.mark.timeout(120)
@FUZZ
@given(step=st.integers(0, 3), position=st.integers(0, 10 ** 6), xor=st.integers(1, 255))
def test_no_single_byte_change_lets_a_handshake_complete(step, position, xor):
    """Every byte on the wire is covered by the transcript or an AEAD tag."""
    flow = Flow(IDENTITY, HOST_KEY)
    parties = [(flow.client, flow.server), (flow.server, flow.client)]
    for index in range(4):
        sender, receiver = parties[index % 2]
        data = bytearray(sender.data_to_send())
        if index == step:
            data[position % len(data)] ^= xor
        receiver.receive_data(bytes(data))
        try:
            event = receiver.next_event()
        except hs.HandshakeError:
            return
        if isinstance(event, hs.HostKeyReceived):
            receiver.accept_host_key()
        elif isinstance(event, hs.AuthRequested):
            receiver.accept(grant())
        elif event is None and index:  # waiting for bytes that will never come
            return
        assert not isinstance(event, hs.HandshakeComplete), "tampered handshake completed"


VALID_FIELDS = hs._encode_fields(
    hs.ClientRequest("alice", "xterm", 24, 80, {"LANG": "C", "LC_ALL": "C"}, bytes(16), 5),
    IDENTITY.public.blob)
VALID_GRANT = hs._encode_grant(grant(9))[1:]
VALID_SSHSIG = hs.sshsig_sign(IDENTITY, "moshpit-client", b"m")


def mutated(valid: bytes):
    """Random bytes, or a valid encoding with one byte changed and/or cut short."""
    def mutate(position, xor, cut):
        data = bytearray(valid)
        data[position % len(data)] ^= xor
        return bytes(data[:cut])
    return st.one_of(st.binary(max_size=600),
                     st.builds(mutate, st.integers(0, 10 ** 6), st.integers(0, 255),
                               st.integers(0, len(valid))))


@pytest.mark.timeout(60)
@FUZZ
@given(fields=mutated(VALID_FIELDS), grant_data=mutated(VALID_GRANT),
       signature=mutated(VALID_SSHSIG))
def test_sealed_payload_parsers_only_raise_value_error(fields, grant_data, signature):
    """What lies behind the AEAD is parsed as carefully as what lies in front of it."""
    for parse, data in ((hs._decode_fields, fields),
                        (lambda d: hs._decode_grant(hs._Reader(d, "grant")), grant_data)):
        try:
            parse(data)
        except ValueError:
            pass
    valid = hs.sshsig_verify(IDENTITY.public, "moshpit-client", b"m", signature)
    assert valid is (signature == VALID_SSHSIG)


# ---------------------------------------------------------------------------
# Raw socket fuzzer against the threaded server
# ---------------------------------------------------------------------------

DEADLINE = 2.0
SLACK = 3.0  # scheduling on a busy 2-core machine


def client_hello() -> bytes:
    return hs.ClientHandshake(IDENTITY, hs.ClientRequest("alice")).data_to_send()


def trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> float:
    """Slowloris: one byte every ``interval`` until the server hangs up; seconds it took."""
    start = time.monotonic()
    for byte in data * 100:
        if time.monotonic() - start > limit:
            break
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                if not sock.recv(65536):
                    break
            except OSError:
                break
    return time.monotonic() - start


class Fuzzer:
    """One hostile connection of a given kind; records how long the server took to close."""

    def __init__(self, port: int, kind: str, seed: int) -> None:
        self.port, self.kind, self.rng = port, kind, random.Random(seed)
        self.elapsed = None
        self.received = b""

    def run(self) -> None:
        sock = socket.create_connection((LOOPBACK, self.port), timeout=10)
        try:
            getattr(self, "_" + self.kind.replace("-", "_"))(sock)
        finally:
            sock.close()

    def _wait(self, sock):
        self.received, self.elapsed = recv_until_closed(sock, DEADLINE + SLACK + 5)

    def _random(self, sock):
        sock.sendall(self.rng.randbytes(self.rng.randint(1, 5000))
                     if hasattr(self.rng, "randbytes")
                     else bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 5000))))
        self._wait(sock)

    def _oversized(self, sock):
        sock.sendall(struct.pack(">I", self.rng.choice([hs.MAX_MESSAGE + 1, 2 ** 32 - 1])))
        self._wait(sock)

    def _max_size_stalled(self, sock):
        sock.sendall(struct.pack(">I", hs.MAX_MESSAGE) + b"\x01" * 1000)
        self._wait(sock)

    def _truncated(self, sock):
        hello = client_hello()
        sock.sendall(hello[:self.rng.randint(1, len(hello) - 1)])
        self._wait(sock)

    def _hello_then_garbage(self, sock):
        sock.sendall(client_hello())
        time.sleep(0.1)
        sock.sendall(struct.pack(">I", 200) + b"\x04" + bytes(199))
        self._wait(sock)

    def _slowloris(self, sock):
        self.elapsed = trickle(sock, client_hello(), 0.05, DEADLINE + SLACK + 5)

    def _silent(self, sock):
        self._wait(sock)

    def _reset(self, sock):
        sock.sendall(client_hello()[:10])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.elapsed = 0.0


KINDS = ["random", "oversized", "max-size-stalled", "truncated", "hello-then-garbage",
         "slowloris", "silent", "reset"]
QUICK = {"oversized", "hello-then-garbage"}  # answered at once, not at the deadline


@pytest.mark.timeout(90)
def test_raw_socket_fuzz_while_legitimate_clients_log_in(tmp_path, caplog):
    home = str(tmp_path / "alice")
    write_authorized_keys(home, [IDENTITY.public])
    decide = ReferenceDecider(fake_user(home))
    fuzzers = []
    with caplog.at_level(logging.INFO, logger="moshpit"), \
            LoopbackServer(HOST_KEY, decide, timeout=DEADLINE) as server:
        for seed in range(3):
            fuzzers += [Fuzzer(server.port, kind, seed) for kind in KINDS]
        threads = [threading.Thread(target=f.run, daemon=True) for f in fuzzers]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # the fuzzers hold their connections now
        logins = [hs.client_handshake(LOOPBACK, server.port, IDENTITY, hs.ClientRequest("alice"),
                                      lambda key: None, timeout=10) for _ in range(3)]
        for thread in threads:
            thread.join(DEADLINE + SLACK + 10)
        assert not any(thread.is_alive() for thread in threads)
        server.wait_idle()
        # One outcome per connection, except resets the listener saw only after they died.
        outcomes = [server.results.get_nowait() for _ in range(server.results.qsize())]
    assert len(fuzzers) - 3 <= len(outcomes) - len(logins) <= len(fuzzers)
    assert len(decide.sessions) == len(logins)
    assert sum(outcome is not None for outcome in outcomes) == len(logins)
    for fuzzer in fuzzers:
        limit = 1.5 if fuzzer.kind in QUICK else DEADLINE + SLACK
        assert fuzzer.elapsed is not None and fuzzer.elapsed <= limit, (fuzzer.kind,
                                                                         fuzzer.elapsed)
        if fuzzer.kind in QUICK:
            assert fuzzer.received.endswith(b"protocol error"), fuzzer.kind
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
