"""An active attacker on the path: every tampering fails closed on both sides.

A relay on loopback sits between a real client and a real server and flips a bit in each
field of each message, swaps keys, replays messages from an earlier handshake or truncates
them. Full men-in-the-middle terminate the connection themselves: with their own host key,
with a host signature transplanted from another handshake, or relaying the client's
signature to the real server.
"""

from __future__ import annotations

import socket

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from handshake_util import (
    LOOPBACK,
    Flow,
    LoopbackServer,
    ReferenceDecider,
    Relay,
    fake_user,
    write_authorized_keys,
)

import moshpit_handshake as hs
import moshpit_trust as trust
from moshpit_keys import PrivateKey

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 2.0  # both sides: a tampered length prefix leaves each waiting until its deadline

# Per message (direction, index): the offsets of its fields in the frame (length prefix
# first). Hellos: type, version, random, X25519 key, cipher string; sealed messages: type,
# ciphertext, tag.
HELLO_OFFSETS = {"len-hi": 0, "len-lo": 3, "type": 4, "version": 6, "random": 7,
                 "random-end": 38, "x25519": 39, "x25519-end": 70, "cipher-len": 74,
                 "cipher": 75, "last": -1}
SEALED_OFFSETS = {"len-hi": 0, "len-lo": 3, "type": 4, "ciphertext": 5, "middle": None,
                  "tag": -16, "last": -1}
MESSAGES = {("c2s", 0): ("ClientHello", HELLO_OFFSETS), ("c2s", 1): ("ClientAuth", SEALED_OFFSETS),
            ("s2c", 0): ("ServerHello", HELLO_OFFSETS), ("s2c", 1): ("ServerAuth", SEALED_OFFSETS),
            ("s2c", 2): ("ServerFinish", SEALED_OFFSETS)}
SERVER_FINISH = ("s2c", 2)


class World:
    def __init__(self, tmp_path):
        self.alice = PrivateKey.generate("alice@laptop")
        self.host_key = PrivateKey.generate("root@server")
        write_authorized_keys(str(tmp_path / "alice"), [self.alice.public])
        self.decide = ReferenceDecider(fake_user(str(tmp_path / "alice")))

    def server(self, host_key=None) -> LoopbackServer:
        return LoopbackServer(host_key or self.host_key, self.decide, timeout=TIMEOUT)

    def connect(self, port, verify=None):
        """The client's outcome: a ClientResult, or the HandshakeError or HostKeyError it raised."""
        try:
            return hs.client_handshake(LOOPBACK, port, self.alice, hs.ClientRequest("alice"),
                                       verify or (lambda key: None), timeout=TIMEOUT)
        except (hs.HandshakeError, trust.HostKeyError) as err:
            return err

    def through_relay(self, tamper):
        """(client outcome, server outcome) of one handshake through a tampering relay."""
        with self.server() as server, Relay(server.port, tamper) as relay:
            client = self.connect(relay.port)
            return client, server.result(timeout=3 * TIMEOUT + 5)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def flip(frame: bytes, offset) -> bytes:
    position = len(frame) // 2 if offset is None else offset % len(frame)
    mask = 0x80 if position == 0 else 0x01  # the high length byte: claim a huge message
    return frame[:position] + bytes([frame[position] ^ mask]) + frame[position + 1:]


def tamper_once(target, change):
    """A relay rule applying ``change(frame)`` to the message at ``target`` only."""
    def tamper(direction, index, frame):
        if (direction, index) == target:
            return change(frame)
        return frame, False
    return tamper


def assert_fails_closed(client, server, target=None):
    assert isinstance(client, hs.HandshakeError), client
    if target == SERVER_FINISH:
        # The server sent its grant before the tampering: what it granted is useless without
        # the session keys, which only the real client holds, and the client has given up.
        assert server is None or isinstance(server, hs.AuthInfo)
    else:
        assert server is None


def test_untampered_relay_works(world):
    client, server = world.through_relay(lambda direction, index, frame: (frame, False))
    assert isinstance(client, hs.ClientResult) and server.keys == client.keys


@pytest.mark.parametrize("target, field", [
    (target, name) for target, (_, offsets) in MESSAGES.items() for name in offsets
], ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value)))
def test_bit_flip_in_any_field_fails_closed(world, target, field):
    offset = MESSAGES[target][1][field]
    client, server = world.through_relay(tamper_once(target, lambda f: (flip(f, offset), False)))
    assert_fails_closed(client, server, target)


@pytest.mark.parametrize("target", list(MESSAGES), ids=lambda t: MESSAGES[t][0])
def test_truncated_message_fails_closed(world, target):
    client, server = world.through_relay(
        tamper_once(target, lambda frame: (frame[:len(frame) // 2], True)))
    assert_fails_closed(client, server, target)


def attacker_x25519() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize("target", [("c2s", 0), ("s2c", 0)], ids=["client-key", "server-key"])
def test_swapped_ephemeral_key_fails_closed(world, target):
    start = HELLO_OFFSETS["x25519"]
    client, server = world.through_relay(tamper_once(
        target, lambda frame: (frame[:start] + attacker_x25519() + frame[start + 32:], False)))
    assert_fails_closed(client, server)


def record(world):
    """The messages of one successful handshake, per direction."""
    seen = {"c2s": [], "s2c": []}

    def recorder(direction, index, frame):
        seen[direction].append(frame)
        return frame, False

    client, server = world.through_relay(recorder)
    assert isinstance(client, hs.ClientResult) and server is not None
    return seen


@pytest.mark.parametrize("target", [("c2s", 1), ("s2c", 1), ("s2c", 2)],
                         ids=["ClientAuth", "ServerAuth", "ServerFinish"])
def test_replayed_message_from_an_old_handshake_fails_closed(world, target):
    old = record(world)
    direction, index = target
    client, server = world.through_relay(
        tamper_once(target, lambda frame: (old[direction][index], False)))
    assert_fails_closed(client, server, target)


def test_replayed_client_transcript_is_refused(world):
    """An eavesdropper replays a whole recorded client side to the server."""
    old = record(world)
    calls = world.decide.calls
    with world.server() as server:
        with socket.create_connection((LOOPBACK, server.port), timeout=TIMEOUT * 3) as sock:
            sock.sendall(old["c2s"][0])
            answer = b""
            while len(answer) < sum(len(f) for f in old["s2c"][:2]):
                answer += sock.recv(65536)
            sock.sendall(old["c2s"][1])
            refusal = sock.recv(65536)
        assert server.result() is None
    assert refusal.endswith(b"protocol error")
    assert world.decide.calls == calls


def test_replayed_server_transcript_is_refused(world):
    """A fake server answers with everything the real one said in an earlier handshake."""
    old = record(world)

    def replay(direction, index, frame):
        if direction == "s2c":
            return b"".join(old["s2c"]), True
        return frame, False

    client, _ = world.through_relay(replay)
    assert isinstance(client, hs.HandshakeError)


def test_reflected_messages_are_refused(world):
    """Each side's own messages sent back to it: the message types and the per-direction
    keys make reflection useless."""
    client = hs.ClientHandshake(world.alice, hs.ClientRequest("alice"))
    client.receive_data(client.data_to_send())
    with pytest.raises(hs.HandshakeError, match="expected ServerHello"):
        client.next_event()
    flow = Flow(world.alice, world.host_key)
    flow.to_server()
    flow.to_client()
    flow.client.accept_host_key()
    client_auth = flow.client.data_to_send()
    flow.client.receive_data(client_auth)
    with pytest.raises(hs.HandshakeError, match="expected ServerFinish"):
        flow.client.next_event()


# ---------------------------------------------------------------------------
# Men in the middle that terminate the connection
# ---------------------------------------------------------------------------


def test_mitm_with_its_own_host_key_is_detected(world, tmp_path):
    known_hosts = str(tmp_path / "known_hosts")
    attacker = PrivateKey.generate("mallory")
    with world.server(host_key=attacker) as mitm:
        trust.KnownHosts(known_hosts).add(LOOPBACK, mitm.port, world.host_key.public)

        def verify(key):
            trust.verify_host_key_policy(known_hosts, LOOPBACK, mitm.port, key, "ask", tty=False)

        client = world.connect(mitm.port, verify)
        assert mitm.result() is None
    assert isinstance(client, trust.HostKeyError)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in str(client)
    assert world.decide.calls == 0  # the client revealed nothing: no ClientAuth was sent


class CapturingClient(hs.ClientHandshake):
    """A client that keeps the decrypted fields of what it receives (attacker's view)."""

    def _open_sealed(self, body, kind, count):
        self.opened = super()._open_sealed(body, kind, count)
        return self.opened


class CapturingServer(hs.ServerHandshake):
    def _open_sealed(self, body, kind, count):
        self.opened = super()._open_sealed(body, kind, count)
        return self.opened


def test_mitm_with_a_transplanted_host_signature_is_detected(world):
    """The attacker shows the real host key with a genuine host signature taken from its own
    handshake with the server: it does not cover this client's transcript."""
    flow = Flow(world.alice, world.host_key)
    flow.client = CapturingClient(world.alice, hs.ClientRequest("mallory"))
    flow.to_server()
    flow.to_client()
    genuine_signature = flow.client.opened[1]  # ServerAuth fields: host key blob, signature

    class TransplantingHost:
        public = world.host_key.public

        @staticmethod
        def sign(data):
            return genuine_signature

    with world.server(host_key=TransplantingHost()) as mitm:
        client = world.connect(mitm.port)
        assert mitm.result() is None
    assert isinstance(client, hs.HandshakeError)
    assert "signature does not verify" in str(client)


def test_mitm_cannot_log_in_with_the_clients_signature(world, caplog):
    """Even if the user accepted the attacker's host key, the attacker cannot use what the
    client signed to log in to the real server: the signature covers the client's transcript
    with the attacker, not the attacker's with the server."""
    attacker = PrivateKey.generate("mallory")
    victim = Flow(world.alice, attacker)
    victim.server = CapturingServer(attacker)
    victim.run()  # the victim accepted the attacker's host key
    client_signature = victim.server.opened[1]

    class TransplantingIdentity:
        public = world.alice.public

        @staticmethod
        def sign(data):
            return client_signature[-64:]  # the raw Ed25519 signature inside the SSHSIG

    with world.server() as server:
        outcome = None
        try:
            hs.client_handshake(LOOPBACK, server.port, TransplantingIdentity(),
                                hs.ClientRequest("alice"), lambda key: None, timeout=TIMEOUT)
        except hs.AuthRefused as err:
            outcome = err
        assert server.result() is None
    assert outcome is not None and outcome.code == hs.PERMISSION_DENIED
    assert "does not verify" in caplog.text
    assert world.decide.calls == 0


def test_server_granted_resume_secret_never_crosses_unsealed(world):
    """Nothing a passive observer sees contains the grant's secrets or the user name."""
    seen = record(world)
    wire = b"".join(seen["c2s"] + seen["s2c"])
    session = next(iter(world.decide.sessions.values()))
    assert session.grant.resume_secret not in wire
    assert session.grant.session_id not in wire
    assert b"alice" not in wire
    assert world.alice.public.raw not in wire and world.host_key.public.raw not in wire
