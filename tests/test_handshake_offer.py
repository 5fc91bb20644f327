"""The key offer (ClientOffer / KeyAccepted, ssh's publickey query) of the handshake: the
server says which key it accepts before anything is signed, the signature must then be that
key's, and offers that never sign are bounded in count and in time (sans-IO on fake clocks,
and the blocking server driver on a real loopback connection)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from handshake_util import UNLIMITED, Flow, LoopbackServer, grant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moshpit_handshake as hs
from moshpit_keys import PrivateKey, ssh_string

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys():
    """alice's two keys, a stranger's, the host key."""
    return (PrivateKey.generate("alice@laptop"), PrivateKey.generate("alice@token"),
            PrivateKey.generate("mallory@evil"), PrivateKey.generate("root@server"))


def offered(flow: Flow, keys) -> hs.KeysOffered:
    """Run ``flow`` up to the server's KeysOffered for ``keys``."""
    assert flow.to_server() is None
    assert isinstance(flow.to_client(), hs.HostKeyReceived)
    flow.client.offer([key.public for key in keys])
    event = flow.to_server()
    assert isinstance(event, hs.KeysOffered)
    return event


class Signer:
    """A key that signs like an agent key does (public + sign), counting its signatures."""

    def __init__(self, key: PrivateKey, public=None) -> None:
        self.key, self.public, self.signed = key, public or key.public, 0

    def sign(self, data: bytes) -> bytes:
        self.signed += 1
        return self.key.sign(data)


def test_offer_then_sign_with_the_accepted_key(keys):
    first, second, stranger, host = keys
    flow = Flow(None, host)
    event = offered(flow, [stranger, second])
    assert event.user == "alice" and event.keys == [stranger.public, second.public]
    flow.server.answer_offer(1)
    accepted = flow.to_client()
    assert accepted == hs.KeyAccepted(second.public)
    signer = Signer(second)
    flow.client.authenticate(signer)
    requested = flow.to_server()
    assert isinstance(requested, hs.AuthRequested)
    assert requested.auth.client_key == second.public and signer.signed == 1
    flow.server.accept(grant())
    done = flow.to_client()
    assert isinstance(done, hs.HandshakeComplete) and done.keys == requested.auth.keys


def test_the_client_signs_only_the_accepted_key(keys):
    first, second, _, host = keys
    flow = Flow(None, host)
    offered(flow, [first, second])
    flow.server.answer_offer(0)
    flow.to_client()
    unaccepted = Signer(second)
    with pytest.raises(RuntimeError, match="the key the server accepted"):
        flow.client.authenticate(unaccepted)
    assert unaccepted.signed == 0


def test_no_acceptable_key_is_refused_before_any_signature(keys, caplog):
    first, second, _, host = keys
    flow = Flow(None, host)
    offered(flow, [first, second])
    flow.server.answer_offer(None)
    with pytest.raises(hs.AuthRefused) as server_side:
        flow.server.next_event()
    assert first.public.fingerprint() in server_side.value.log_reason
    assert second.public.fingerprint() in server_side.value.log_reason
    with pytest.raises(hs.AuthRefused) as client_side:
        flow.to_client()
    assert client_side.value.code == hs.PERMISSION_DENIED


def test_the_offer_is_covered_by_the_signature(keys):
    """The offer and its answer are in the transcript the client signs: a relay that
    changed the server's answer (which key) breaks the AEAD, and both transcripts agree."""
    first, second, _, host = keys
    flow = Flow(None, host)
    offered(flow, [first, second])
    flow.server.answer_offer(1)
    answer = bytearray(flow.server.data_to_send())
    answer[-1] ^= 1
    flow.client.receive_data(bytes(answer))
    with pytest.raises(hs.HandshakeError, match="failed authentication"):
        flow.client.next_event()


def test_a_client_cannot_offer_one_key_and_sign_with_another(keys, caplog):
    """The attack: offer alice's authorized key (public, anyone may know it), and once it is
    accepted send a ClientAuth for another key the attacker holds: refused, never decided."""
    first, _, stranger, host = keys
    flow = Flow(None, host)
    offered(flow, [first])
    flow.server.answer_offer(0)
    flow.to_client()
    flow.client._accepted = stranger.public  # a hostile client skips its own check
    flow.client.authenticate(stranger)
    with pytest.raises(hs.AuthRefused, match="not the accepted offer"):
        flow.to_server()
    with pytest.raises(hs.AuthRefused):
        flow.to_client()


def test_signing_the_accepted_key_with_another_does_not_verify(keys):
    """The same attack with the accepted key's blob and another key's signature."""
    first, _, stranger, host = keys
    flow = Flow(None, host)
    offered(flow, [first])
    flow.server.answer_offer(0)
    flow.to_client()
    flow.client.authenticate(Signer(stranger, public=first.public))
    with pytest.raises(hs.AuthRefused, match="does not verify"):
        flow.to_server()


def test_another_user_than_offered_is_refused(keys):
    first, _, _, host = keys
    flow = Flow(None, host, hs.ClientRequest("alice"))
    offered(flow, [first])
    flow.server.answer_offer(0)
    flow.to_client()
    flow.client._request = hs.ClientRequest("root")  # offered for alice, signs in as root
    flow.client.authenticate(first)
    with pytest.raises(hs.AuthRefused, match="not the accepted offer"):
        flow.to_server()


def test_one_offer_per_handshake(keys):
    first, second, _, host = keys
    flow = Flow(None, host)
    offered(flow, [first])
    flow.server.answer_offer(0)
    flow.to_client()
    with pytest.raises(RuntimeError):
        flow.client.offer([second.public])
    # Forced onto the wire, a second offer is a protocol error.
    flow.client._send_sealed(7, flow.client._associated(7),
                             [b"alice", b"\x00\x01" + ssh_string(second.public.blob)])
    with pytest.raises(hs.HandshakeError, match="expected ClientAuth, got ClientOffer"):
        flow.to_server()


def offer_bytes(count: int) -> bytes:
    return count.to_bytes(2, "big") + b"".join(
        ssh_string(PrivateKey.generate().public.blob) for _ in range(count))


@pytest.mark.parametrize("blobs, match", [
    (offer_bytes(hs.MAX_OFFERED_KEYS + 1), "1 to 16 keys"),
    (offer_bytes(0), "1 to 16 keys"),
    (offer_bytes(2)[:-3], "truncated"),
    (offer_bytes(1) + b"x", "trailing"),
    (b"\x00\x01" + ssh_string(ssh_string(b"ssh-rsa") + ssh_string(b"x" * 32)), "ssh-rsa"),
], ids=["too many", "none", "truncated", "trailing bytes", "not ed25519"])
def test_malformed_offers_are_protocol_errors(keys, blobs, match):
    host = keys[3]
    flow = Flow(None, host)
    assert flow.to_server() is None
    flow.to_client()
    flow.client._send_sealed(7, flow.client._associated(7), [b"alice", blobs])
    with pytest.raises(hs.HandshakeError, match=match):
        flow.to_server()


def test_duplicate_keys_in_an_offer_are_refused(keys):
    first, _, _, host = keys
    flow = Flow(None, host)
    flow.to_server()
    flow.to_client()
    blob = ssh_string(first.public.blob)
    flow.client._send_sealed(7, flow.client._associated(7), [b"alice", b"\x00\x02" + blob + blob])
    with pytest.raises(hs.HandshakeError, match="offered twice"):
        flow.to_server()


def test_a_grant_without_a_signature_is_refused_by_the_client(keys):
    """After an offer only KeyAccepted or a refusal may come: a session granted before the
    client proved anything means a broken or hostile server."""
    first, _, _, host = keys
    flow = Flow(None, host)
    offered(flow, [first])
    flow.server._auth = object()  # let a hostile server send a grant
    flow.server._finish(hs._encode_grant(grant()))
    with pytest.raises(hs.HandshakeError, match="nobody authenticated"):
        flow.to_client()


def test_an_index_beyond_the_offer_is_refused(keys):
    first, _, _, host = keys
    flow = Flow(None, host)
    offered(flow, [first])
    flow.server._offer.keys.append(keys[1].public)  # the server answers index 1 of 1 offered
    flow.server.answer_offer(1)
    with pytest.raises(hs.HandshakeError, match="not offered"):
        flow.to_client()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_OFFER = hs._encode_offer([PrivateKey.generate().public for _ in range(3)])


@FUZZ
@given(position=st.integers(0, 10 ** 6), xor=st.integers(0, 255),
       cut=st.integers(0, len(VALID_OFFER)), junk=st.binary(max_size=200))
def test_the_offer_parser_only_raises_value_error(position, xor, cut, junk):
    data = bytearray(VALID_OFFER)
    data[position % len(data)] ^= xor
    for candidate in (bytes(data[:cut]), junk):
        try:
            hs._decode_offer(candidate)
        except ValueError:
            pass


@FUZZ
@given(step=st.integers(0, 5), position=st.integers(0, 10 ** 6), xor=st.integers(1, 255))
def test_no_single_byte_change_in_an_offer_flow_completes(step, position, xor):
    """With the offer step too, every byte is covered by the transcript or an AEAD tag."""
    first, second = PrivateKey.generate(), PrivateKey.generate()
    flow = Flow(None, PrivateKey.generate())
    parties = [(flow.client, flow.server), (flow.server, flow.client)]
    for index in range(6):
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
            receiver.offer([first.public, second.public])
        elif isinstance(event, hs.KeysOffered):
            receiver.answer_offer(1)
        elif isinstance(event, hs.KeyAccepted):
            receiver.authenticate(second)
        elif isinstance(event, hs.AuthRequested):
            receiver.accept(grant())
        elif event is None and index:
            return
        assert not isinstance(event, hs.HandshakeComplete), "tampered handshake completed"
    pytest.fail("the handshake took more steps than expected")


# ---------------------------------------------------------------------------
# Admission: the confirmation time is a bounded pre-authentication resource (fake clock)
# ---------------------------------------------------------------------------


def admitted(policy: hs.AdmissionPolicy, address: str, now: float = 0.0) -> hs.Admission:
    admission = policy.admit(address, now)
    assert admission.admitted
    policy.hello(admission)
    return admission


def test_confirmation_time_is_capped_per_source():
    policy = hs.AdmissionPolicy(UNLIMITED)
    first, second, third = (admitted(policy, "192.0.2.7") for _ in range(3))
    assert policy.confirming(first) and policy.confirming(second)
    assert not policy.confirming(third)  # a third at once from one source waits as usual
    assert policy.confirming(first)  # asking again changes nothing
    policy.finished(first, hs.GRACE_EXCEEDED, 61.0)
    assert policy.confirming(third)


def test_confirmation_time_for_untrusted_sources_is_capped_in_all():
    limits = hs.AdmissionLimits(max_handshakes=8, startups=(8, 100, 8), max_per_source=8,
                                penalties=UNLIMITED.penalties, startups_per_sec=0)
    policy = hs.AdmissionPolicy(limits)
    waiting = [admitted(policy, f"192.0.2.{n}") for n in range(3)]
    assert [policy.confirming(admission) for admission in waiting] == [True, True, False]
    policy.authenticated("198.51.100.9/32", 0.0)  # a source trusted from an earlier login
    policy.finished(waiting[0], hs.AUTHENTICATED, 1.0)
    trusted = admitted(policy, "198.51.100.9", 1.0)
    assert trusted.trusted and policy.confirming(trusted)  # not counted against the others
    assert policy.confirming(waiting[2])


def test_a_handshake_without_its_hello_gets_no_confirmation_time():
    policy = hs.AdmissionPolicy(UNLIMITED)
    admission = policy.admit("192.0.2.7", 0.0)
    assert not policy.confirming(admission)


def test_a_confirming_handshake_that_times_out_is_penalised():
    limits = hs.AdmissionLimits(max_handshakes=64, startups=(64, 100, 64), max_per_source=64,
                                startups_per_sec=0)
    policy = hs.AdmissionPolicy(limits)
    for _ in range(2):
        admission = admitted(policy, "192.0.2.7")
        assert policy.confirming(admission)
        policy.finished(admission, hs.GRACE_EXCEEDED, 0.0)
    assert policy.penalty_left("192.0.2.7/32", 0.0) > 0  # 2 x 10 s: refused now


# ---------------------------------------------------------------------------
# The blocking server driver: deadlines on a real connection
# ---------------------------------------------------------------------------


class Offerer:
    """A client that offers a key and then never signs (or signs after ``sign_after``)."""

    def __init__(self, port: int, key: PrivateKey, sign_after=None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.machine = hs.ClientHandshake(None, hs.ClientRequest("alice"))
        self.key, self.sign_after = key, sign_after
        self.outcome = None

    def run(self) -> None:
        deadline = time.monotonic() + 10
        try:
            hs._exchange(self.sock, self.machine, deadline)
            self.machine.offer([self.key.public])
            hs._exchange(self.sock, self.machine, deadline)
            if self.sign_after is None:
                self.outcome = self.sock.recv(1)  # b"": the server gave up
                return
            time.sleep(self.sign_after)
            self.machine.authenticate(self.key)
            self.outcome = hs._exchange(self.sock, self.machine, time.monotonic() + 10)
        except (hs.HandshakeError, OSError, EOFError) as err:
            self.outcome = err
        finally:
            self.sock.close()


@pytest.fixture
def decide():
    return lambda auth: grant()


def run_offerer(server: LoopbackServer, key: PrivateKey, sign_after=None) -> tuple:
    client = Offerer(server.port, key, sign_after)
    thread = threading.Thread(target=client.run)
    started = time.monotonic()
    thread.start()
    result = server.result(timeout=20)
    thread.join(20)
    return result, time.monotonic() - started, client.outcome


def events(server: LoopbackServer) -> list:
    found = []
    while not server.events.empty():
        found.append(server.events.get()[1])
    return found


def test_an_accepted_offer_that_never_signs_ends_at_the_confirmation_deadline(keys, decide,
                                                                              caplog):
    first, _, _, host = keys
    with caplog.at_level(logging.INFO, logger="moshpit"), \
            LoopbackServer(host, decide, timeout=0.5, acceptable=lambda user, offered: 0,
                           confirm_timeout=1.5) as server:
        result, elapsed, outcome = run_offerer(server, first)
    assert result is None and outcome == b""
    assert 1.4 <= elapsed < 8  # the confirmation time, not the 0.5 s handshake deadline
    assert events(server) == [hs.HELLO_RECEIVED, hs.OFFER_ACCEPTED, hs.GRACE_EXCEEDED]
    assert "timed out" in caplog.text


def test_a_person_confirming_within_the_confirmation_time_logs_in(keys, decide):
    first, _, _, host = keys
    with LoopbackServer(host, decide, timeout=0.5, acceptable=lambda user, offered: 0,
                        confirm_timeout=5) as server:
        result, _, outcome = run_offerer(server, first, sign_after=1.0)
    assert isinstance(outcome, hs.HandshakeComplete)
    assert result is not None and result.client_key == first.public


def test_no_confirmation_time_beyond_the_admission_limits(keys, decide):
    """When the policy says no (here: the source already has its share waiting), an accepted
    offer keeps the ordinary handshake deadline."""
    first, _, _, host = keys
    limiter = hs.HandshakeLimiter(hs.AdmissionPolicy(UNLIMITED))
    source = limiter.policy.source("127.0.0.1")
    limiter.policy._confirming[source] = hs.MAX_CONFIRMING_PER_SOURCE
    with LoopbackServer(host, decide, timeout=0.5, acceptable=lambda user, offered: 0,
                        confirm_timeout=30, limiter=limiter) as server:
        result, elapsed, outcome = run_offerer(server, first)
    assert result is None and outcome == b"" and elapsed < 5


def test_a_refused_offer_ends_at_once_as_an_authentication_failure(keys, decide):
    first, _, _, host = keys
    with LoopbackServer(host, decide, timeout=5, confirm_timeout=30) as server:
        result, elapsed, outcome = run_offerer(server, first)
    assert result is None and isinstance(outcome, hs.AuthRefused)
    assert events(server) == [hs.HELLO_RECEIVED, hs.AUTHFAIL]
