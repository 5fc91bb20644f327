"""The TCP carrier end to end: real mp.py and mps.py, UDP dropped by the test relay
(tests/relay.py) from the start or mid-session, and back; forced --transport tcp / udp.

The relay's front is a random loopback alias with the server's port numbers; the client
dials the front, so both its TCP (passed through untouched) and its UDP go through it.
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest

from proc_util import wait_for
from relay import Relay
from server_util import relay_in_front, shared_server
from test_client_session import QUIT, QUIT_STATUS, client_env, client_log, start_client, \
    wait_shell

TCP_NOTE = b"UDP blocked, using TCP"
UDP_NOTE = b"UDP works again, back on UDP"


server = shared_server()


@pytest.fixture
def relayed(server, request):
    """(server, relay, front address) with the relay started; indirect parameters are
    Relay options (``{"impair_tcp": True}``: a blackout freezes TCP too)."""
    with relay_in_front(server, **getattr(request, "param", {})) as relay:
        yield server, relay, relay.front


def block_udp(relay: Relay, blocked: bool) -> None:
    relay.set(loss=1.0 if blocked else 0.0)


def check_bulk(term, size: int = 2_000_000) -> None:
    """``size`` random bytes, hex encoded by the remote shell, arrive exactly (sha256)."""
    term.send(f"head -c {size} /dev/urandom > big.bin; sha256sum big.bin;"
              " od -An -v -tx1 big.bin | tr -d ' \\n'; echo; echo $((8000+8))\r")
    out = term.read_until(b"8008\r\n", 120)
    digest = re.search(rb"([0-9a-f]{64})  big\.bin", out).group(1).decode()
    hexdump = max(re.findall(rb"[0-9a-f]{1000,}", out), key=len)
    assert len(hexdump) == 2 * size
    assert hashlib.sha256(bytes.fromhex(hexdump.decode())).hexdigest() == digest


@pytest.mark.timeout(120)
def test_udp_blocked_from_the_start_falls_back_to_tcp_and_back(relayed, tmp_path):
    """UDP dropped before connecting: the session runs over TCP within a second, says so
    once, carries 2 MB exactly; UDP unblocked: it moves back and says so."""
    server, relay, front = relayed
    block_udp(relay, True)
    (tmp_path / "work").mkdir()
    with start_client(server, tmp_path, host=front) as term:
        started = time.monotonic()
        seen = term.read_until(TCP_NOTE, 10)
        wait_shell(term)
        assert time.monotonic() - started < 10
        term.send(f"cd {tmp_path / 'work'}\r")
        check_bulk(term)
        assert relay.stats["down"]["delivered"] == 0  # really nothing came over UDP
        block_udp(relay, False)
        seen += term.read_until(UDP_NOTE, 30)
        wait_for(lambda: relay.stats["down"]["delivered"] > 0, 10, "UDP packets again")
        term.send("echo $((5000+55))\r")
        term.read_until(re.compile(rb"[\r\n]5055\r\n"), 30)
        assert seen.count(TCP_NOTE) == 1
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
    log = client_log(tmp_path)
    assert "UDP blocked, using TCP" in log and "back on UDP" in log


@pytest.mark.timeout(120)
def test_udp_dropped_mid_session_moves_to_tcp_losing_nothing(relayed, tmp_path):
    """UDP works, then stops while TCP still does: what is typed meanwhile arrives once and
    in order over TCP (a resume that keeps its connection), Ctrl-C stops a flood there."""
    server, relay, front = relayed
    with start_client(server, tmp_path, host=front) as term:
        wait_shell(term)
        assert TCP_NOTE not in term.drain(quiet=1.0, limit=3)  # UDP answers: stays on UDP
        block_udp(relay, True)
        for piece in ("echo A", "B$((6", "*7))", "C\r"):
            term.send(piece)
            time.sleep(0.5)
        out = term.read_until(re.compile(rb"[\r\n]AB42C\r\n"), 40)
        out += term.drain(quiet=1.0, limit=5)
        assert out.count(b"AB42C") == 1
        assert TCP_NOTE in out
        server.wait_log("client now at tcp:", 10)
        flood_then_ctrl_c(term)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


def flood_then_ctrl_c(term) -> float:
    """``yes`` pours output, Ctrl-C: the prompt answers again; returns how long it took."""
    term.send("yes flood\r")
    term.read_until(b"flood\r\nflood\r\n", 30)
    term.drain(quiet=0.0, limit=1.0)  # let the flood fill every window
    pressed = time.monotonic()
    term.send(b"\x03")
    term.send("echo $((7000+7))\r")
    term.read_until(re.compile(rb"[\r\n]7007\r\n"), 60)
    return time.monotonic() - pressed


@pytest.mark.timeout(120)
def test_forced_tcp_never_uses_udp(relayed, tmp_path):
    """--transport tcp: UDP is never used (the relay sees none), bulk and Ctrl-C work."""
    server, relay, front = relayed
    (tmp_path / "work").mkdir()
    with start_client(server, tmp_path, "--transport", "tcp", host=front) as term:
        wait_shell(term)
        term.send(f"cd {tmp_path / 'work'}\r")
        check_bulk(term, 200_000)
        flood_then_ctrl_c(term)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
    stats = relay.stats
    assert stats["up"]["delivered"] == 0 and stats["down"]["delivered"] == 0


@pytest.mark.timeout(60)
def test_forced_udp_from_the_environment_does_not_fall_back(relayed, tmp_path):
    """MOSHPIT_TRANSPORT=udp with UDP blocked: no TCP carrier, the usual "firewall?"
    banner instead."""
    server, relay, front = relayed
    block_udp(relay, True)
    env = client_env(tmp_path, MOSHPIT_TRANSPORT="udp")
    with start_client(server, tmp_path, host=front, env=env) as term:
        out = term.read_until(b"(firewall?)", 20)
        assert TCP_NOTE not in out
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
    assert "TCP carrier attached" in server.log()  # offered by the server, closed by us
    assert "client now at" not in server.log()


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("relayed", [{"impair_tcp": True}], indirect=True)
def test_an_outage_on_the_tcp_carrier_loses_nothing(relayed, tmp_path):
    """On TCP (UDP blocked), the whole network goes away for 8 s while the user types:
    the banner shows the silence, and once the network is back what was typed arrives
    once, in order (through the old connection, which TCP kept, or a resume's)."""
    server, relay, front = relayed
    block_udp(relay, True)
    with start_client(server, tmp_path, host=front) as term:
        term.read_until(TCP_NOTE, 15)
        wait_shell(term)
        relay.set_blackout(True)
        start = time.monotonic()
        for at, piece in ((1, "echo O"), (3, "U$((6"), (5, "*7))"), (6, "T\r")):
            time.sleep(max(0.0, start + at - time.monotonic()))
            term.send(piece)
        seen = term.read_until(b"last contact", 15)
        time.sleep(max(0.0, start + 8 - time.monotonic()))
        relay.set_blackout(False)
        seen += term.read_until(re.compile(rb"[\r\n]OU42T\r\n"), 60)
        seen += term.drain(quiet=1.0, limit=5)
        assert seen.count(b"OU42T") == 1
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


@pytest.mark.timeout(120)
def test_a_broken_tcp_carrier_is_replaced_by_a_resume(relayed, tmp_path):
    """On TCP (UDP blocked), the connection is reset (a NAT lost it, the laptop moved):
    the client resumes on a new connection, which becomes the carrier; input typed
    meanwhile arrives once."""
    server, relay, front = relayed
    block_udp(relay, True)
    with start_client(server, tmp_path, host=front) as term:
        term.read_until(TCP_NOTE, 15)
        wait_shell(term)
        # the carrier, and any connection the relay has not yet seen closed (under load, a
        # finished handshake's may linger for a moment)
        assert relay.reset_tcp() >= 1
        for piece in ("echo R", "S$((6", "*7))", "T\r"):
            term.send(piece)
            time.sleep(0.3)
        out = term.read_until(re.compile(rb"[\r\n]RS42T\r\n"), 40)
        out += term.drain(quiet=1.0, limit=5)
        assert out.count(b"RS42T") == 1
        server.wait_log("resumed", 10)
        assert server.log().count("TCP carrier attached") >= 2  # the first, the resume's
        assert "the TCP carrier closed" in client_log(tmp_path)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
