"""Pre-authentication limits: who may start a handshake, and for how long.

The admission policy is pure code, tested with a fake clock and fake randomness; then its
thread shell and the ClientHello deadline over real loopback sockets; then a real mps under
an idle-connection attack from six loopback addresses (slow).
"""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
from attack_util import ATTACK_SOURCES, IdleConnectionAttack, legitimate_logins
from handshake_util import LOOPBACK, UNLIMITED, LoopbackServer
from server_util import MpsServer

import moshpit
import moshpit_handshake as hs
import mps
from moshpit_keys import PrivateKey

LIMITS = hs.AdmissionLimits(max_handshakes=10, startups=(4, 30, 8), max_per_source=3,
                            netblock=(32, 64), trusted_secs=100.0)
HOST_KEY = PrivateKey.generate()


class FakeRandom:
    """Returns the queued fractions in turn; a draw nobody expected raises IndexError."""

    def __init__(self, *fractions: float) -> None:
        self.fractions = list(fractions)

    def __call__(self) -> float:
        return self.fractions.pop(0)


def admit_all(policy: hs.AdmissionPolicy, addresses, now: float = 0.0):
    return [policy.admit(address, now) for address in addresses]


def finish(policy: hs.AdmissionPolicy, address: str, outcome: str, now: float) -> str:
    """One whole handshake from ``address`` ending in ``outcome``; the policy's log note."""
    admission = policy.admit(address, now)
    assert admission.admitted, admission.reason
    policy.hello(admission)
    return policy.finished(admission, outcome, now)


# -- sources -------------------------------------------------------------------------------

def test_sources_are_ipv4_addresses_and_ipv6_slash_64s():
    assert hs.source_of("192.0.2.7") == "192.0.2.7/32"
    assert hs.source_of("::ffff:192.0.2.7") == "192.0.2.7/32"  # a dual-stack listener
    assert hs.source_of("2001:db8::1") == hs.source_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert hs.source_of("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert hs.source_of("fe80::1%eth0") == "fe80::/64"
    assert hs.source_of("192.0.2.7", v4_prefix=24) == "192.0.2.0/24"
    assert hs.source_of("2001:db8:0:1::1", v6_prefix=48) == "2001:db8::/48"
    assert hs.source_of("not an address") == "not an address"


def test_one_ipv6_host_rotating_addresses_within_its_64_is_one_source():
    policy = hs.AdmissionPolicy(LIMITS)
    admitted = admit_all(policy, [f"2001:db8::{n:x}" for n in range(1, 5)])
    assert [a.admitted for a in admitted] == [True, True, True, False]
    assert "max_handshakes_per_source" in admitted[3].reason
    assert policy.admit("2001:db8:0:1::1", 0.0).admitted  # the next /64 is another source


# -- caps and early drop -------------------------------------------------------------------

def test_caps_per_source_and_in_total_and_slots_come_back():
    policy = hs.AdmissionPolicy(dataclasses.replace(LIMITS, startups=(10, 0, 10)))
    first = admit_all(policy, ["10.0.0.1"] * 3)
    assert all(a.admitted for a in first) and not policy.admit("10.0.0.1", 0).admitted
    admit_all(policy, ["10.0.0.2"] * 3 + ["10.0.0.3"] * 3 + ["10.0.0.4"])
    assert policy.active == 10
    refused = policy.admit("10.0.0.5", 0)
    assert not refused.admitted and "(max_handshakes)" in refused.reason
    policy.finished(first[0], hs.NEUTRAL, 0)
    assert policy.active == 9 and policy.admit("10.0.0.5", 0).admitted


def test_random_early_drop_rises_from_rate_at_start_to_all_at_full():
    # start 4, rate 30 %, full 8: with 4 in progress a newcomer is dropped with p = 30 %,
    # with 5 p = 47.5 %, with 6 p = 65 %; from 8 always, without a draw.
    policy = hs.AdmissionPolicy(LIMITS, random_fraction=FakeRandom(0.31, 0.29, 0.48, 0.64))
    admit_all(policy, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])  # below start: no draw
    assert policy.admit("10.0.0.5", 0).admitted  # 0.31 >= 30 %
    dropped = policy.admit("10.0.0.6", 0)  # 0.29 < 47.5 %
    assert not dropped.admitted and "random early drop at 48 %" in dropped.reason
    assert policy.admit("10.0.0.6", 0).admitted and policy.active == 6  # 0.48 >= 47.5 %
    assert not policy.admit("10.0.0.7", 0).admitted  # 0.64 < 65 %
    full = hs.AdmissionPolicy(dataclasses.replace(LIMITS, startups=(8, 30, 8)),
                              random_fraction=FakeRandom())
    admit_all(full, [f"10.0.1.{n}" for n in range(8)])
    assert "max_startups full" in full.admit("10.0.2.1", 0).reason


def test_trusted_sources_skip_early_drop_and_penalties_and_have_the_slots_above_full():
    policy = hs.AdmissionPolicy(LIMITS, random_fraction=FakeRandom(*[0.99] * 4))
    finish(policy, "192.0.2.1", hs.AUTHENTICATED, 0)
    strangers = admit_all(policy, [f"10.0.0.{n}" for n in range(8)])  # 4 draws, all admit
    assert all(a.admitted and not a.trusted for a in strangers) and policy.active == 8
    assert "max_startups full" in policy.admit("10.0.0.9", 0).reason  # no idle one to evict
    resumes = admit_all(policy, ["192.0.2.1"] * 2)  # no draw (FakeRandom is empty now)
    assert all(a.admitted and a.trusted for a in resumes) and policy.active == 10
    assert "(max_handshakes)" in policy.admit("192.0.2.1", 0).reason  # the hard cap holds
    for resume in resumes:
        policy.hello(resume)
        assert policy.finished(resume, hs.GRACE_EXCEEDED, 1.0) == ""
    assert policy.penalty_left("192.0.2.1/32", 1.0) == 0


def test_trust_expires_and_is_bounded():
    policy = hs.AdmissionPolicy(LIMITS, max_tracked=2)
    finish(policy, "192.0.2.1", hs.AUTHENTICATED, 0)
    assert policy.trusted("192.0.2.1/32", 99.9) and not policy.trusted("192.0.2.1/32", 100.0)
    for n in range(3):
        finish(policy, f"192.0.2.{n + 1}", hs.AUTHENTICATED, 200)
    assert [policy.trusted(f"192.0.2.{n + 1}/32", 200) for n in range(3)] == [False, True, True]


# -- penalties -----------------------------------------------------------------------------

def test_penalties_add_up_refuse_past_min_and_count_down_in_real_time():
    policy = hs.AdmissionPolicy(LIMITS)
    for _ in range(15):  # noauth: 1 s each; 15 s is not past min (15 s)
        assert finish(policy, "10.0.0.1", hs.NOAUTH, 0.0) == ""
    assert policy.admit("10.0.0.1", 0.0).admitted
    policy = hs.AdmissionPolicy(LIMITS)
    finish(policy, "10.0.0.1", hs.AUTHFAIL, 0.0)
    finish(policy, "10.0.0.1", hs.AUTHFAIL, 0.0)
    finish(policy, "10.0.0.1", hs.AUTHFAIL, 1.0)  # 5 + 5 - 1 + 5 = 14 s left
    assert finish(policy, "10.0.0.1", hs.NOAUTH, 1.0) == ""  # 15 s: not past min yet
    assert policy.penalty_left("10.0.0.1/32", 1.0) == 0
    note = finish(policy, "10.0.0.1", hs.GRACE_EXCEEDED, 2.0)  # 14 + 10 = 24 s
    assert note == "10.0.0.1/32 penalised for 24 s after a handshake ending in grace-exceeded"
    refused = policy.admit("10.0.0.1", 10.0)
    assert not refused.admitted and "penalised for another 16 s" in refused.reason
    assert policy.admit("10.0.0.2", 10.0).admitted  # only that source
    assert not policy.admit("10.0.0.1", 25.9).admitted
    assert policy.admit("10.0.0.1", 26.0).admitted  # served its time
    assert finish(policy, "10.0.0.1", hs.NOAUTH, 26.0) == ""  # and starts afresh


def test_penalties_are_capped_at_max_and_cleared_by_authenticating():
    policy = hs.AdmissionPolicy(dataclasses.replace(
        LIMITS, max_per_source=10, max_handshakes=20, startups=(20, 0, 20),
        penalties=dict(LIMITS.penalties, max=30)))
    idle = admit_all(policy, ["10.0.0.1"] * 10)  # all in before the first one times out
    notes = [policy.finished(a, hs.GRACE_EXCEEDED, 5.0) for a in idle]
    assert notes[1] == "10.0.0.1/32 penalised for 20 s after a handshake ending in grace-exceeded"
    assert notes[2:] == [""] * 8  # said once
    assert policy.penalty_left("10.0.0.1/32", 5.0) == 30
    assert policy.finished(policy.admit("10.0.0.2", 5.0), hs.NEUTRAL, 5.0) == ""
    assert policy.penalty_left("10.0.0.2/32", 5.0) == 0  # a busy server blames nobody
    mistyped = admit_all(policy, ["10.0.0.3"] * 4)
    for admission in mistyped[:3]:
        policy.finished(admission, hs.AUTHFAIL, 6.0)  # 15 s, one more would be refused
    policy.finished(mistyped[3], hs.AUTHENTICATED, 6.0)  # the right key at last
    assert finish(policy, "10.0.0.3", hs.AUTHFAIL, 6.0) == ""


def test_penalty_book_is_bounded():
    policy = hs.AdmissionPolicy(LIMITS, max_tracked=2)
    for n in range(3):
        for _ in range(2):
            finish(policy, f"10.0.0.{n}", hs.GRACE_EXCEEDED, 0.0)
    assert [policy.penalty_left(f"10.0.0.{n}/32", 0.0) for n in range(3)] == [0, 20, 20]


# -- handshake rate --------------------------------------------------------------------------

def test_untrusted_handshakes_start_at_most_startups_per_sec_trusted_ones_always():
    policy = hs.AdmissionPolicy(dataclasses.replace(LIMITS, startups_per_sec=2,
                                                    max_per_source=100, max_handshakes=100,
                                                    startups=(100, 0, 100)))
    finish(policy, "192.0.2.1", hs.AUTHENTICATED, 0.0)  # the first token
    assert policy.admit("10.0.0.1", 0.0).admitted  # the second: a second's worth in all
    refused = policy.admit("10.0.0.2", 0.1)
    assert not refused.admitted and not refused.penalised
    assert refused.reason == "more than 2 handshakes a second (max_startups_per_sec)"
    assert policy.admit("192.0.2.1", 0.1).admitted  # trusted: no token needed
    assert policy.admit("10.0.0.2", 0.5).admitted  # refilled at 2 a second
    assert not policy.admit("10.0.0.3", 0.5).admitted
    unlimited = hs.AdmissionPolicy(dataclasses.replace(LIMITS, startups_per_sec=0,
                                                       max_per_source=100, max_handshakes=500,
                                                       startups=(500, 0, 500)))
    assert all(a.admitted for a in admit_all(unlimited, [f"10.0.{n // 250}.{n % 250}"
                                                         for n in range(300)]))


# -- settings ------------------------------------------------------------------------------

def test_settings_come_from_the_config_with_sshd_like_syntax(tmp_path):
    config = moshpit.load_config("server", environ={}, home=str(tmp_path))
    assert mps.admission_limits(config) == hs.AdmissionLimits()  # the defaults agree
    environ = {"MOSHPITS_MPS_MAX_STARTUPS": "10:30:100", "MOSHPITS_MPS_SOURCE_NETBLOCK": "24:48",
               "MOSHPITS_MPS_SOURCE_PENALTIES": "authfail:30 min:60",
               "MOSHPITS_MPS_MAX_HANDSHAKES_PER_SOURCE": "2",
               "MOSHPITS_MPS_TRUSTED_SOURCE_SECS": "0", "MOSHPITS_MPS_MAX_STARTUPS_PER_SEC": "0"}
    limits = mps.admission_limits(moshpit.load_config("server", environ=environ,
                                                      home=str(tmp_path)))
    assert (limits.startups, limits.netblock, limits.max_per_source) == ((10, 30, 100),
                                                                        (24, 48), 2)
    assert limits.penalties == dict(moshpit.PENALTY_DEFAULTS, authfail=30, min=60)
    assert (limits.trusted_secs, limits.startups_per_sec) == (0, 0)
    assert moshpit.parse_max_startups("10") == (10, 100, 10)  # sshd: a bare number is full
    assert moshpit.parse_netblock("32") == (32, 128)
    assert set(moshpit.parse_penalties("no").values()) == {0}
    for bad in ("30:10:20", "5:101:10", "5:30", "x"):
        with pytest.raises(ValueError, match="START:RATE:FULL"):
            moshpit.parse_max_startups(bad)
    for bad in ("33:64", "32:129", "0:64", "a:b"):
        with pytest.raises(ValueError, match="prefix lengths"):
            moshpit.parse_netblock(bad)
    with pytest.raises(ValueError, match="has 'crash:90'"):
        moshpit.parse_penalties("crash:90")
    with pytest.raises(moshpit.ConfigError, match="mps.max_startups"):
        moshpit.load_config("server", environ={"MOSHPITS_MPS_MAX_STARTUPS": "50:30:10"},
                            home=str(tmp_path))


def test_no_limit_is_lost_when_max_startups_exceeds_max_handshakes():
    policy = hs.AdmissionPolicy(dataclasses.replace(LIMITS, max_handshakes=3,
                                                    startups=(16, 30, 48)))
    admitted = admit_all(policy, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
    assert [a.admitted for a in admitted] == [True, True, True, False]


# -- idle eviction -------------------------------------------------------------------------

def test_a_newcomer_evicts_the_oldest_idle_stranger_when_full():
    policy = hs.AdmissionPolicy(dataclasses.replace(LIMITS, startups=(8, 30, 8)),
                                random_fraction=FakeRandom())
    busy = admit_all(policy, ["10.0.0.1", "10.0.0.2"], now=0.0)
    for admission in busy:
        policy.hello(admission)  # these sent their ClientHello: never evicted
    idle = admit_all(policy, [f"10.0.1.{n}" for n in range(6)], now=1.0)
    assert not policy.admit("192.0.2.9", 1.4).admitted  # the idle ones are too young (0.4 s)
    newcomer = policy.admit("192.0.2.9", 1.5)
    assert newcomer.admitted and newcomer.evicts is idle[0] and policy.active == 8
    assert policy.admit("192.0.2.8", 1.5).evicts is idle[1]
    # The evicted one's thread ends later: its slot is not released twice, it is penalised.
    policy.finished(idle[0], hs.NOAUTH, 1.6)
    assert policy.active == 8 and policy.penalty_left("10.0.1.0/32", 1.6) == 0
    policy.finished(newcomer, hs.AUTHENTICATED, 2.0)
    assert policy.active == 7


def test_trusted_handshakes_are_never_evicted():
    policy = hs.AdmissionPolicy(dataclasses.replace(LIMITS, startups=(8, 30, 8),
                                                    max_per_source=10))
    finish(policy, "192.0.2.1", hs.AUTHENTICATED, 0)
    admit_all(policy, ["192.0.2.1"] * 10, now=1.0)  # idle, but trusted
    assert not policy.admit("10.0.0.1", 5.0).admitted


# -- the thread shell and the ClientHello deadline on real sockets ---------------------------

def refuse_all(auth: hs.AuthInfo) -> hs.SessionGrant:
    raise hs.AuthRefused(hs.PERMISSION_DENIED, "no test here gets this far")


def client_hello() -> bytes:
    return hs.ClientHandshake(PrivateKey.generate(), hs.ClientRequest("alice")).data_to_send()


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((LOOPBACK, port))
    return sock


def events(server: LoopbackServer, count: int) -> list:
    return [server.events.get(timeout=10) for _ in range(count)]


@pytest.mark.timeout(30)
def test_silent_and_trickling_peers_lose_their_slot_at_the_hello_deadline():
    started = time.monotonic()
    with LoopbackServer(HOST_KEY, refuse_all, timeout=20.0, hello_timeout=1.0) as server:
        silent = connect_from(LOOPBACK, server.port)
        trickler = connect_from(LOOPBACK, server.port)
        for byte in client_hello()[:-1]:  # a byte every 50 ms: the hello would take seconds
            if server.results.qsize() == 2:
                break
            trickler.send(bytes([byte]))
            time.sleep(0.05)
        assert server.result() is None and server.result() is None
        assert time.monotonic() - started < 5.0  # the 1 s ClientHello deadline, not 20 s
        assert events(server, 2) == [(LOOPBACK, hs.GRACE_EXCEEDED)] * 2
        silent.close()
        trickler.close()


@pytest.mark.timeout(30)
def test_a_penalised_source_is_refused_at_accept_before_any_key_exchange():
    """Refused connections never reach the handshake (no X25519, no signature): the server
    resets them without a word, while other sources are still served."""
    policy = hs.AdmissionPolicy(hs.AdmissionLimits())
    for _ in range(2):
        finish(policy, "127.0.0.2", hs.GRACE_EXCEEDED, time.monotonic())
    with LoopbackServer(HOST_KEY, refuse_all, limiter=hs.HandshakeLimiter(policy)) as server:
        with pytest.raises((ConnectionResetError, BrokenPipeError)), \
                connect_from("127.0.0.2", server.port) as sock:  # the reset lands anywhere
            sock.sendall(client_hello())
            sock.recv(4096)
        with connect_from("127.0.0.3", server.port) as sock:
            sock.sendall(client_hello())
            assert sock.recv(4096)[4] == 2  # ServerHello
        assert server.result() is None
        assert events(server, 2) == [("127.0.0.3", hs.HELLO_RECEIVED), ("127.0.0.3", hs.NOAUTH)]
        assert server.events.empty()  # nothing ever ran for 127.0.0.2


@pytest.mark.timeout(30)
def test_a_full_server_evicts_an_idle_connection_for_a_real_client():
    """One slot, held by a silent connection: a client that sends its ClientHello takes it
    over after IDLE_EVICT_SECS, and the idle connection is closed."""
    limiter = hs.HandshakeLimiter(hs.AdmissionPolicy(
        dataclasses.replace(UNLIMITED, max_handshakes=1)))
    with LoopbackServer(HOST_KEY, refuse_all, timeout=20.0, limiter=limiter) as server:
        idle = connect_from("127.0.0.2", server.port)
        deadline = time.monotonic() + 10
        while limiter.active < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(hs.IDLE_EVICT_SECS)
        with connect_from("127.0.0.3", server.port) as sock:
            sock.sendall(client_hello())
            assert sock.recv(4096)[4] == 2  # ServerHello: admitted
            assert idle.recv(4096) == b""  # the idle one was closed
            # Two handshake threads report: in whichever order they finish.
            assert sorted(events(server, 2)) == [("127.0.0.2", hs.NOAUTH),
                                                 ("127.0.0.3", hs.HELLO_RECEIVED)]
        idle.close()


# -- a real mps under attack ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(180)
def test_logins_and_resumes_succeed_while_six_addresses_refill_idle_connections(tmp_path):
    with MpsServer(tmp_path, udp_ports=4, settings={"verbose": 1}) as server:
        with IdleConnectionAttack(server.port, ATTACK_SOURCES, per_source=16) as attack:
            deadline = time.monotonic() + 10
            while attack.opened < 6 * 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the attackers hold their slots, full and idle, before any login
            ok, tried, errors = legitimate_logins(server.port, server.client_key,
                                                  server.host_key.public, rounds=10)
        log = server.log()
    assert ok >= 0.9 * tried, f"{ok}/{tried} succeeded: {errors}\n{log[-3000:]}"
    assert attack.opened > 6 * 16  # the attack kept refilling
    assert "penalised for" in log  # the attackers were turned away at accept
