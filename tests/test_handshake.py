"""Sans-IO handshake machines: the protocol and its crypto without sockets."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest
from handshake_util import Flow, frame, grant, split_frames

import moshpit_handshake as hs
from moshpit import PROTOCOL_VERSION
from moshpit_keys import PrivateKey, ssh_string

pytestmark = pytest.mark.timeout(60)

# Points of small order on Curve25519 (and non-canonical encodings of them), as listed by
# libsodium and the X25519 test vectors: each must yield an all-zero secret and be refused.
LOW_ORDER_POINTS = [bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]


@pytest.fixture(scope="module")
def keys():
    return PrivateKey.generate("alice@laptop"), PrivateKey.generate("root@server")


def client_hello(version=PROTOCOL_VERSION, public=None, ciphers=b"chacha20-poly1305") -> bytes:
    public = public if public is not None else PrivateKey.generate().public.raw
    return frame(bytes([1]) + struct.pack(">H", version) + os.urandom(32) + public
                 + ssh_string(ciphers))


# ---------------------------------------------------------------------------
# Happy paths and key schedule
# ---------------------------------------------------------------------------


def test_identity_can_be_given_when_the_host_key_is_accepted(keys):
    """Nothing before ClientAuth needs the client's key, so a driver may load (decrypt) it
    only after the host key is trusted; without one, accept_host_key() refuses."""
    identity, host = keys
    flow = Flow(None, host)
    assert flow.to_server() is None
    assert isinstance(flow.to_client(), hs.HostKeyReceived)
    with pytest.raises(RuntimeError, match="needs the client's identity"):
        flow.client.accept_host_key()
    flow.client.accept_host_key(identity)
    requested = flow.to_server()
    assert requested.auth.client_key == identity.public
    flow.server.accept(grant())
    assert isinstance(flow.to_client(), hs.HandshakeComplete)


def test_both_sides_agree_on_keys_and_grant(keys):
    identity, host = keys
    request = hs.ClientRequest("alice", term="xterm-256color", rows=50, cols=132,
                               env={"LANG": "C.UTF-8", "LC_TIME": "de_DE.UTF-8"})
    flow = Flow(identity, host, request)
    offered = grant(recv_offset=7)
    requested, done = flow.run(offered)
    auth = requested.auth
    assert auth.user == "alice" and auth.client_key == identity.public
    assert auth.request == request
    assert auth.peer == ("192.0.2.1", 1234) and auth.local == ("192.0.2.2", 40404)
    assert done.grant == offered and done.host_key == host.public
    assert done.keys == auth.keys
    assert done.keys.cipher == hs.server_cipher_order()[0]  # the client offers both
    assert len(done.keys.client_to_server) == len(done.keys.server_to_client) == 32
    assert done.keys.client_to_server != done.keys.server_to_client
    assert len(done.keys.conn_id) == 8
    assert not auth.resume_proof_valid(os.urandom(32))  # no resume was asked for


def test_every_handshake_has_fresh_keys(keys):
    first = Flow(*keys).run()[1].keys
    second = Flow(*keys).run()[1].keys
    assert first.client_to_server != second.client_to_server
    assert first.conn_id != second.conn_id


def test_secrets_are_not_in_reprs(keys):
    requested, done = Flow(*keys).run()
    text = repr(requested) + repr(done)
    for secret in (done.keys.client_to_server, done.keys.server_to_client,
                   done.grant.resume_secret):
        assert repr(secret)[2:-1] not in text


def test_resume_proof_binds_secret_and_handshake(keys):
    secret = os.urandom(32)
    request = hs.ClientRequest("alice", resume_session_id=os.urandom(16),
                               resume_recv_offset=99, resume_secret=secret)
    auth = Flow(*keys, request).run()[0].auth
    assert auth.request.resume_session_id == request.resume_session_id
    assert auth.request.resume_recv_offset == 99
    assert auth.request.resume_secret is None  # never sent
    assert auth.resume_proof_valid(secret)
    assert not auth.resume_proof_valid(os.urandom(32))
    # The proof is bound to this transcript: it is worthless in another handshake.
    other = Flow(*keys, request).run()[0].auth
    assert other.resume_proof != auth.resume_proof


def test_end_session_request_is_a_signed_resume_with_an_intent(keys):
    secret = os.urandom(32)
    request = hs.ClientRequest("alice", resume_session_id=os.urandom(16),
                               resume_secret=secret, end_session=True)
    auth = Flow(*keys, request).run()[0].auth
    assert auth.request.end_session and auth.resume_proof_valid(secret)
    # Without the intent the fields are exactly what protocol version 1 always sent, so
    # servers and clients without the quit request keep working for everything else.
    key_blob = keys[0].public.blob
    plain = hs._encode_fields(dataclasses.replace(request, end_session=False), key_blob)
    assert hs._encode_fields(request, key_blob) == plain + bytes([hs.END_SESSION])
    assert not hs._decode_fields(plain)[0].end_session


def test_bad_end_session_requests_are_refused(keys):
    identity, host = keys
    with pytest.raises(hs.HandshakeError, match="needs its session id"):
        hs.ClientHandshake(identity, hs.ClientRequest("alice", end_session=True))
    resume = hs.ClientRequest("alice", resume_session_id=os.urandom(16),
                              resume_secret=bytes(32), end_session=True)
    fields = hs._encode_fields(resume, identity.public.blob)
    for bad in (fields[:-1] + b"\x09", fields + b"\x01"):  # an unknown intent, trailing bytes
        with pytest.raises(ValueError):
            hs._decode_fields(bad)
    flow = Flow(identity, host)  # a modified client: the server refuses it too
    flow.client._request = hs.ClientRequest("alice", end_session=True)
    flow.to_server()
    flow.to_client()
    flow.client.accept_host_key()
    with pytest.raises(hs.HandshakeError, match="needs its session id"):
        flow.to_server()


def test_resume_needs_the_secret(keys):
    with pytest.raises(hs.HandshakeError, match="resume secret"):
        hs.ClientHandshake(keys[0], hs.ClientRequest("alice", resume_session_id=os.urandom(16)))


def test_refusal_codes_reach_the_client(keys):
    for code, final in ((hs.PERMISSION_DENIED, True), (hs.NO_SUCH_SESSION, True),
                        (hs.SERVER_BUSY, False), (hs.SHUTTING_DOWN, False),
                        (hs.SESSION_LIMIT, True), (hs.USER_SESSION_LIMIT, True),
                        ("anything else", True)):
        flow = Flow(*keys)
        flow.to_server()
        flow.to_client()
        flow.client.accept_host_key()
        flow.to_server()
        flow.server.refuse(code)
        with pytest.raises(hs.HandshakeError) as raised:
            flow.to_client()
        assert isinstance(raised.value, hs.AuthRefused) == final
        assert raised.value.code == (code if code in hs.REFUSAL_CODES else hs.PERMISSION_DENIED)


def refused_with(keys, message: str) -> hs.AuthRefused:
    flow = Flow(*keys)
    flow.to_server()
    flow.to_client()
    flow.client.accept_host_key()
    flow.to_server()
    flow.server.refuse(hs.PERMISSION_DENIED, message)
    with pytest.raises(hs.AuthRefused) as raised:
        flow.to_client()
    return raised.value


def test_a_refusal_may_carry_a_message_for_the_user(keys):
    """The server's /etc/nologin text (or PAM's) reaches the client inside the authenticated
    ServerFinish, capped at MAX_REFUSAL_MESSAGE bytes; it is shown made printable."""
    refusal = refused_with(keys, "Down until 18:00.\n\x1b]0;owned\x07")
    assert refusal.code == hs.PERMISSION_DENIED
    assert refusal.client_message == "Down until 18:00.\n\x1b]0;owned\x07"
    shown = hs._explain(refusal, "host", 40404, "alice")
    assert str(shown) == ("permission denied for alice@host; the server says:\n"
                          "Down until 18:00.\n^[]0;owned^G")
    long = refused_with(keys, "é" * 2000)
    assert long.client_message == "é" * (hs.MAX_REFUSAL_MESSAGE // 2)
    assert refused_with(keys, "").client_message == ""  # the refusal older clients know
    assert str(hs._explain(refused_with(keys, ""), "host", 40404, "alice")) == \
        "permission denied (publickey) for alice@host"


def test_wrong_proof_of_possession_is_refused(keys):
    """The client claims an identity whose private key it does not hold."""
    identity, host = keys

    class Impostor:
        public = identity.public  # claims alice's key ...
        sign = PrivateKey.generate().sign  # ... but signs with another one

    flow = Flow(Impostor(), host)
    flow.to_server()
    flow.to_client()
    flow.client.accept_host_key()
    with pytest.raises(hs.AuthRefused, match="does not verify") as raised:
        flow.to_server()
    assert identity.public.fingerprint() in raised.value.log_reason
    with pytest.raises(hs.AuthRefused) as told:
        flow.to_client()  # the server's sealed refusal
    assert told.value.code == hs.PERMISSION_DENIED


def test_host_key_signature_is_checked(keys):
    identity, host = keys

    class ForgingHost:  # presents the real host key without holding it
        public = host.public
        sign = PrivateKey.generate().sign

    flow = Flow(identity, ForgingHost())
    flow.to_server()
    with pytest.raises(hs.HandshakeError, match="signature does not verify"):
        flow.to_client()


# ---------------------------------------------------------------------------
# Clean rejection of bad input
# ---------------------------------------------------------------------------


def server_after(data: bytes, host) -> hs.ServerHandshake:
    server = hs.ServerHandshake(host)
    server.receive_data(data)
    return server


def assert_refused_protocol_error(server: hs.ServerHandshake, match: str) -> None:
    with pytest.raises(hs.HandshakeError, match=match) as raised:
        server.next_event()
    assert raised.value.code == hs.PROTOCOL_ERROR
    assert split_frames(server.data_to_send())[-1] == frame(
        bytes([6]) + ssh_string(b"protocol error"))


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=range(len(LOW_ORDER_POINTS)))
def test_low_order_x25519_keys_are_refused(keys, point):
    assert_refused_protocol_error(server_after(client_hello(public=point), keys[1]),
                                  "small order")
    client = hs.ClientHandshake(*keys[:1], hs.ClientRequest("alice"))
    client.receive_data(frame(bytes([2]) + struct.pack(">H", PROTOCOL_VERSION) + os.urandom(32)
                              + point + ssh_string(b"chacha20-poly1305")))
    with pytest.raises(hs.HandshakeError, match="small order"):
        client.next_event()


MALFORMED = [
    (struct.pack(">I", hs.MAX_MESSAGE + 1), "outside 1..65536"),
    (b"\xff\xff\xff\xff", "outside"),
    (b"\x00\x00\x00\x00", "outside"),
    (frame(b"\x09abc"), "expected ClientHello, got message type 9"),
    (frame(b"\x04" + bytes(40)), "expected ClientHello, got ClientAuth"),
    (frame(b"\x06" + ssh_string(b"server busy")), "server refused"),
    (frame(b"\x01\x00"), "truncated"),
    (client_hello(version=0), "protocol version 0"),
    (client_hello(version=PROTOCOL_VERSION - 1),  # before session records: refused, explained
     f"version {PROTOCOL_VERSION - 1}, this server needs {PROTOCOL_VERSION}: install the same"),
    (client_hello(ciphers=b"rot13"), "no session cipher in common"),
    (client_hello(ciphers=b"\xff"), "non-ASCII"),
    (client_hello() + frame(b"\x04" + bytes(64)), "failed authentication"),
    (client_hello() + frame(b"\x04"), "failed authentication"),
]


# Named by the expected error: the data holds random keys, and parallel workers must all
# collect the same test names.
@pytest.mark.parametrize("data, match", MALFORMED, ids=[match for _, match in MALFORMED])
def test_malformed_input_is_rejected(keys, data, match):
    server = server_after(data, keys[1])
    with pytest.raises(hs.HandshakeError, match=match):
        server.next_event()
    assert split_frames(server.data_to_send())[-1] == frame(
        bytes([6]) + ssh_string(b"protocol error"))
    with pytest.raises(hs.HandshakeError, match=match):  # failed for good
        server.next_event()


def test_server_picks_its_fastest_cipher_among_those_offered(keys):
    """The server's order is CIPHERS ranked by their measured cost here; a client offering
    one cipher gets that one, a client offering both gets the server's first."""
    order = hs.server_cipher_order()
    assert sorted(order) == sorted(hs.CIPHERS)
    for offered, expected in ((b"chacha20-poly1305", "chacha20-poly1305"),
                              (b"aes-256-gcm", "aes-256-gcm"),
                              (b"aes-256-gcm,chacha20-poly1305", order[0]),
                              (b"chacha20-poly1305,aes-256-gcm", order[0])):
        server = server_after(client_hello(ciphers=offered), keys[1])
        assert server.next_event() is None
        server_hello = split_frames(server.data_to_send())[0]
        assert server_hello.endswith(ssh_string(expected.encode())), offered


def test_incomplete_message_waits(keys):
    hello = client_hello()
    server = server_after(hello[:-1], keys[1])
    assert server.next_event() is None and server.data_to_send() == b""
    server.receive_data(hello[-1:])
    assert server.next_event() is None and server.data_to_send()  # ServerHello + ServerAuth


def test_trailing_bytes_in_a_message_are_rejected(keys):
    hello = client_hello()
    padded = struct.pack(">I", len(hello) - 4 + 1) + hello[4:] + b"\x00"
    assert_refused_protocol_error(server_after(padded, keys[1]), "trailing")


def test_flooding_peer_is_cut_off(keys):
    server = hs.ServerHandshake(keys[1])
    for _ in range(40):
        server.receive_data(bytes(4096))  # one 64 KiB frame would fit; this does not
    assert_refused_protocol_error(server, "without waiting")


def test_unauthenticated_refusals_are_never_final(keys):
    for code, expected in ((b"permission denied", hs.PROTOCOL_ERROR),
                           (b"no such session", hs.PROTOCOL_ERROR),
                           (b"too many sessions for user", hs.PROTOCOL_ERROR),
                           (b"server busy", hs.SERVER_BUSY),
                           (b"\xff\xfe", hs.PROTOCOL_ERROR)):
        client = hs.ClientHandshake(keys[0], hs.ClientRequest("alice"))
        client.receive_data(frame(b"\x06" + ssh_string(code)))
        with pytest.raises(hs.HandshakeError) as raised:
            client.next_event()
        assert not isinstance(raised.value, hs.AuthRefused)
        assert raised.value.code == expected


@pytest.mark.parametrize("first_bytes, what", [
    (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n", "it speaks SSH"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n", "it speaks HTTP"),
    (b"HTTP", "it speaks HTTP"),  # as little as a length prefix is enough
    (b"\r\n<!DOCTYPE HTML>\n<html>", "it speaks HTTP"),
    (b"\x15\x03\x01\x00\x02\x02\x46", "it speaks TLS"),  # a TLS alert to our hello
    (b"220 mail.example.com ESMTP Postfix\r\n", "it sent '220 mail.example.com ESMTP Postfix'"),
    (b"220 " + b"x" * 100 + b"\r\n", "it sent '220 " + "x" * 53 + "...'"),  # capped
    (b"220 \x1b]0;owned\x07\r\n", "unexpected reply"),  # control bytes are not text
    (b"\xff\xff\xff\xff", "unexpected reply"),
])
def test_first_bytes_of_another_protocol_name_it(keys, first_bytes, what):
    """A moshpit message length is at most 64 KiB, so the first four bytes of anything else
    read as a length in the millions or billions: the client says what it met instead."""
    client = hs.ClientHandshake(keys[0], hs.ClientRequest("alice"))
    client.receive_data(first_bytes)
    with pytest.raises(hs.HandshakeError) as raised:
        client.next_event()
    assert str(raised.value) == f"not a moshpit server ({what})"
    assert raised.value.code == hs.NOT_MOSHPIT


def test_bad_length_after_the_server_hello_is_a_protocol_error(keys):
    """Once a moshpit server has answered, a bad length is its protocol error, not another
    protocol."""
    flow = Flow(keys[0], keys[1])
    assert flow.to_server() is None
    assert isinstance(flow.to_client(), hs.HostKeyReceived)
    flow.client.accept_host_key()
    flow.client.receive_data(b"SSH-2.0-x\r\n")
    with pytest.raises(hs.HandshakeError, match=r"^protocol error: message length 1397966893 "):
        flow.client.next_event()


def test_server_version_and_cipher_are_checked(keys):
    for version, cipher, match in (
            (PROTOCOL_VERSION + 1, b"chacha20-poly1305",
             f"protocol version {PROTOCOL_VERSION + 1}, this client {PROTOCOL_VERSION}"),
            (PROTOCOL_VERSION - 1, b"chacha20-poly1305", "the same moshpit release on both"),
            (PROTOCOL_VERSION, b"des", "not offered")):
        client = hs.ClientHandshake(keys[0], hs.ClientRequest("alice"))
        client.receive_data(frame(bytes([2]) + struct.pack(">H", version) + os.urandom(32)
                                  + PrivateKey.generate().public.raw + ssh_string(cipher)))
        with pytest.raises(hs.HandshakeError, match=match):
            client.next_event()


def test_client_request_fields_are_validated_on_both_sides(keys):
    identity, host = keys
    bad = [hs.ClientRequest("-rf"), hs.ClientRequest("al ice"), hs.ClientRequest("a" * 70),
           hs.ClientRequest("alice", term="xterm\x1b"), hs.ClientRequest("alice", rows=70000),
           hs.ClientRequest("alice", resume_session_id=b"short", resume_secret=bytes(32))]
    for request in bad:
        with pytest.raises(hs.HandshakeError, match="cannot send the request"):
            hs.ClientHandshake(identity, request)
    unsafe_env = [hs.ClientRequest("alice", env={"LD_PRELOAD": "/tmp/x.so"}),
                  hs.ClientRequest("alice", env={"LANG": "C UTF-8"})]
    encodable = [r for r in bad if r.rows <= 0xFFFF and r.resume_session_id is None]
    for request in encodable + unsafe_env:  # a modified client: the server refuses too
        flow = Flow(identity, host)
        flow.client._request = request
        flow.to_server()
        flow.to_client()
        flow.client.accept_host_key()
        with pytest.raises(hs.HandshakeError):
            flow.to_server()


def test_client_drops_what_is_not_a_locale_setting(keys):
    env = {"LANG": "C.UTF-8", "LC_CTYPE": "a b", "LD_PRELOAD": "/tmp/x.so"}
    requested, _ = Flow(*keys, hs.ClientRequest("alice", env=env)).run()
    assert requested.auth.request.env == {"LANG": "C.UTF-8"}


def test_locale_env_keeps_only_locale_settings():
    env = {"LANG": "en_US.UTF-8", "LC_ALL": "C", "LC_bad": "x", "LC_CTYPE": "a b",
           "PATH": "/bin", "LANGUAGE": "en", "LD_PRELOAD": "x"}
    assert hs.locale_env(env) == {"LANG": "en_US.UTF-8", "LC_ALL": "C"}
    many = {f"LC_{'X' * n}": "C" for n in range(1, 40)}
    assert len(hs.locale_env(many)) == hs.MAX_LOCALE_VARS


def test_api_misuse_is_a_programming_error(keys):
    flow = Flow(*keys)
    with pytest.raises(RuntimeError):
        flow.client.accept_host_key()
    with pytest.raises(RuntimeError):
        flow.server.accept(grant())
    flow.run()
    with pytest.raises(RuntimeError):
        flow.server.refuse(hs.PERMISSION_DENIED)


def test_malformed_grant_is_refused_locally(keys):
    flow = Flow(*keys)
    flow.to_server()
    flow.to_client()
    flow.client.accept_host_key()
    flow.to_server()
    for bad in (hs.SessionGrant(b"short", bytes(32), 1), hs.SessionGrant(bytes(16), bytes(32), 0)):
        with pytest.raises(ValueError):
            flow.server.accept(bad)


def test_take_over_and_kill_name_a_session_without_a_resume_proof(keys):
    """mp --attach / --kill: any key of the user's, so no proof; the intent byte follows the
    plain fields, and the grant carries the detached count."""
    session_id = os.urandom(16)
    for intent in (hs.TAKE_OVER, hs.KILL):
        request = hs.ClientRequest("alice", rows=40, cols=120, resume_session_id=session_id,
                                   intent=intent)
        offered = grant(recv_offset=0)
        offered.detached = 3
        requested, done = Flow(*keys, request).run(offered)
        auth = requested.auth
        assert auth.request.intent == intent and auth.request.resume_session_id == session_id
        assert (auth.request.rows, auth.request.cols) == (40, 120)
        assert auth.resume_proof == b"" and not auth.resume_proof_valid(bytes(32))
        assert done.grant == offered and done.grant.detached == 3
        key_blob = keys[0].public.blob
        plain = hs._encode_fields(dataclasses.replace(request, intent=0), key_blob)
        assert hs._encode_fields(request, key_blob) == plain + bytes([intent])
    for bad in (hs.ClientRequest("alice", intent=hs.TAKE_OVER),  # no session named
                hs.ClientRequest("alice", intent=hs.LIST, resume_session_id=session_id),
                hs.ClientRequest("alice", intent=9)):
        with pytest.raises(hs.HandshakeError, match="intent"):
            hs.ClientHandshake(keys[0], bad)


def test_a_list_request_is_answered_with_a_bounded_listing(keys):
    listed = [hs.SessionInfo(os.urandom(16), i % 2 == 0, 1_700_000_000 + i, 1_700_000_100 + i,
                             24 + i, 80, "vim \u00e9t\u00e9.txt" if i else "x" * 500)
              for i in range(3)]
    requested, done = Flow(*keys, hs.ClientRequest("alice", intent=hs.LIST)).run(
        hs.SessionListing(listed))
    assert requested.auth.request.intent == hs.LIST
    got = done.grant.sessions
    assert got[1:] == listed[1:]
    assert got[0].title == "x" * hs.MAX_TITLE_BYTES  # cut to the bound
    # A listing answers only a LIST request; too many sessions are refused by the encoder.
    flow = Flow(*keys)
    flow.to_server()
    flow.to_client()
    flow.client.accept_host_key()
    flow.to_server()
    with pytest.raises(RuntimeError):
        flow.server.accept(hs.SessionListing([]))
    with pytest.raises(ValueError):
        hs._encode_listing(hs.SessionListing(listed * 100))


@pytest.mark.parametrize("mutate", [
    lambda b: b[:1] + struct.pack(">H", hs.MAX_LISTED + 1) + b[3:],  # too many
    lambda b: b[:-1],  # cut short
    lambda b: b + b"\0",  # trailing bytes
    lambda b: b[:3] + ssh_string(bytes(15)) + b[3 + 4 + 16:],  # a short session id
])
def test_malformed_listings_are_rejected(mutate):
    listing = hs._encode_listing(hs.SessionListing([hs.SessionInfo(bytes(16), True, 1, 2, 3,
                                                                    4, "t")]))
    with pytest.raises(ValueError):
        hs._decode_listing(hs._Reader(mutate(listing)[1:], "ServerFinish"))


def test_a_command_request_carries_the_command_and_pty_flag_after_the_intent(keys):
    identity = keys[0]
    for request in (hs.ClientRequest("alice", command="cat 'a file' | wc -c", pty=False),
                    hs.ClientRequest("alice", command="", pty=True),
                    hs.ClientRequest("alice", pty=False),  # a login shell without a PTY
                    hs.ClientRequest("alice", resume_session_id=os.urandom(16),
                                     end_session=True, command="tty", pty=False)):
        decoded = hs._decode_fields(hs._encode_fields(request, identity.public.blob))[0]
        assert (decoded.command, decoded.pty, decoded.end_session) == (
            request.command, request.pty, request.end_session)
    auth = Flow(*keys, hs.ClientRequest("alice", command="exit 7", pty=False)).run()[0].auth
    assert (auth.request.command, auth.request.pty) == ("exit 7", False)


def test_a_server_without_commands_refuses_a_command_instead_of_starting_a_shell(keys):
    """Older servers accept only END_SESSION as the byte after the offset, then the end:
    a command request always sends NO_INTENT there, so they reject it (a clean refusal)
    rather than silently running a login shell where the user asked for a command."""
    key_blob = keys[0].public.blob
    plain = hs._encode_fields(hs.ClientRequest("alice"), key_blob)
    fields = hs._encode_fields(hs.ClientRequest("alice", command="ls"), key_blob)
    assert fields.startswith(plain) and fields[len(plain)] == hs.NO_INTENT != hs.END_SESSION
    # A plain login shell on a PTY still sends exactly what older clients sent.
    assert hs._encode_fields(hs.ClientRequest("alice", command=None, pty=True),
                             key_blob) == plain


def test_agent_forwarding_travels_in_the_request(keys):
    key_blob = keys[0].public.blob
    for request in (hs.ClientRequest("alice", forward_agent=True),
                    hs.ClientRequest("alice", command="ssh-add -l", pty=False,
                                     forward_agent=True)):
        decoded = hs._decode_fields(hs._encode_fields(request, key_blob))[0]
        assert decoded.forward_agent and decoded.command == request.command
    assert not hs._decode_fields(hs._encode_fields(hs.ClientRequest("alice"), key_blob)
                                 )[0].forward_agent


def test_no_command_session_travels_in_the_request(keys):
    """mp -N is a flag of its own (not a remote command someone could also type): it
    comes back as no_command, with or without -A, and never with a command or a PTY."""
    key_blob = keys[0].public.blob
    for agent in (False, True):
        request = hs.ClientRequest("alice", pty=False, no_command=True, forward_agent=agent)
        decoded = hs._decode_fields(hs._encode_fields(request, key_blob))[0]
        assert decoded.no_command and decoded.forward_agent == agent
        assert decoded.command is None and not decoded.pty
    typed = hs.ClientRequest("alice", command="exec cat > /dev/null", pty=False)
    assert not hs._decode_fields(hs._encode_fields(typed, key_blob))[0].no_command
    plain = hs._encode_fields(hs.ClientRequest("alice"), key_blob)
    empty = plain + bytes([hs.NO_INTENT]) + ssh_string(b"")
    for bad in (empty + b"\x01\x00" + bytes([hs.FLAG_NO_COMMAND]),  # with a command
                empty + b"\x00\x01" + bytes([hs.FLAG_NO_COMMAND]),  # with a PTY
                empty + b"\x00\x00\x04"):  # an unknown flag
        with pytest.raises(ValueError):
            hs._decode_fields(bad)
    with pytest.raises(hs.HandshakeError):
        hs.ClientHandshake(keys[0], hs.ClientRequest("alice", command="ls", pty=False,
                                                     no_command=True))


def test_commands_and_flags_out_of_bounds_are_refused(keys):
    identity = keys[0]
    too_long = "x" * (hs.MAX_COMMAND + 1)
    with pytest.raises(hs.HandshakeError, match="longer than"):
        hs.ClientHandshake(identity, hs.ClientRequest("alice", command=too_long))
    plain = hs._encode_fields(hs.ClientRequest("alice"), identity.public.blob)
    forged = plain + bytes([hs.NO_INTENT]) + ssh_string(too_long.encode()) + b"\x01\x00"
    with pytest.raises(ValueError, match="longer than"):
        hs._decode_fields(forged)
    good = plain + bytes([hs.NO_INTENT]) + ssh_string(b"ls") + b"\x01\x00"
    assert hs._decode_fields(good)[0].command == "ls"
    assert hs._decode_fields(good + b"\x01")[0].forward_agent  # -A (protocol 4)
    for bad in (good[:-1] + b"\x02", good[:-2] + b"\x02\x00", good + b"\x02",
                good + b"\x01\x00", good[:-1],
                plain + bytes([hs.NO_INTENT]) + ssh_string(b"\xff") + b"\x01\x00"):
        with pytest.raises(ValueError):
            hs._decode_fields(bad)
