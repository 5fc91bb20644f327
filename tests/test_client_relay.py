"""mp.py through the impairment relay (tests/relay.py): outages, roaming, loss.

The relay's front is a random loopback alias with the server's port numbers; the client
dials the front, so its UDP goes through the relay. Loopback only.
"""

from __future__ import annotations

import re
import time

import pytest

from proc_util import pid_alive, wait_for
from server_util import make_key, relay_in_front, shared_server, write_authorized_keys
from test_client_session import (ERASE_BANNER, QUICK_RESUME, QUIT, QUIT_STATUS, USER,
                                 client_env, client_log, remote_shell_pid, start_client,
                                 wait_shell, wrapper_result)


server = shared_server()


@pytest.fixture
def relayed(server, request):
    """(server, relay, front address) with the relay started; indirect parameters are
    Relay options (``{"impair_tcp": True}``: a blackout freezes TCP too)."""
    with relay_in_front(server, **getattr(request, "param", {})) as relay:
        yield server, relay, relay.front


def type_slowly(term, text: str, gap: float = 0.05) -> None:
    for ch in text:
        term.send(ch)
        time.sleep(gap)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_blackout_banner_then_typed_input_arrives_once(relayed, tmp_path):
    server, relay, front = relayed
    # UDP only: the relay's blackout leaves TCP up, which `auto` would fall back to.
    with start_client(server, tmp_path, "--transport", "udp", host=front,
                      env=client_env(tmp_path, **QUICK_RESUME)) as term:
        wait_shell(term)
        seen = bytearray()
        relay.set_blackout(True)
        start = time.monotonic()
        # Typed in pieces while nothing gets through (before the resume handshake at 4 s,
        # between it and the banner at 6 s, after both); the result only exists if every
        # piece arrived once and in order.
        for at, piece in ((1, "echo X"), (3, "Y$((6"), (5, "*7))"), (7, "Z\r")):
            time.sleep(max(0.0, start + at - time.monotonic()))
            term.send(piece)
        seen += term.read_until(b"last contact", 15)
        assert b"reconnecting" in term.read_until(b"reconnecting", 5)
        time.sleep(max(0.0, start + 10 - time.monotonic()))
        relay.set_blackout(False)
        seen += term.read_until(re.compile(rb"[\r\n]XY42Z\r\n"), 60)
        seen += term.drain(quiet=2.0, limit=10)
        assert seen.count(b"XY42Z") == 1
        last_banner = seen.rfind(b"last contact")
        assert seen.rfind(ERASE_BANNER) > last_banner, "banner not removed after recovery"
        term.send("echo $((1000+234))\r")  # the session carries on normally
        term.read_until(re.compile(rb"[\r\n]1234\r\n"), 30)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_escape_quit_during_udp_outage_ends_the_session(relayed, tmp_path):
    """UDP is down, the banner is up, the user presses Ctrl-^ .: mp exits at once (within a
    few seconds), and the server ends the session (the shell is hung up) instead of keeping
    it detached for a week: the quit went over TCP as a quit request."""
    server, relay, front = relayed
    with start_client(server, tmp_path, "--transport", "udp", host=front,
                      wrapped=True) as term:  # UDP only: TCP stays up, auto would use it
        wait_shell(term)
        pid = remote_shell_pid(term, tmp_path)
        relay.set_blackout(True)
        term.read_until(b"last contact", 30)
        term.send(QUIT)
        pressed = time.monotonic()
        rc, attrs, out = wrapper_result(term, 20)
        took = time.monotonic() - pressed
        assert (rc, attrs) == (QUIT_STATUS, "same")
        assert f"Connection to {front} closed.".encode() in out
        assert b"could not be told" not in out
    assert took < 8.0, f"quitting took {took:.1f} s"
    log = server.wait_log("ended (by the client's quit request)", 10)
    assert "ending a session" in log
    wait_for(lambda: not pid_alive(pid), 10, "the remote shell to be hung up")
    assert "quit request: the server ended the session" in client_log(tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("relayed", [{"impair_tcp": True}], indirect=True)
def test_escape_quit_with_server_unreachable_says_the_session_stays(relayed, tmp_path):
    """UDP and TCP both down (the relay freezes TCP too): mp still exits within a few
    seconds, says the session could not be ended, and the session is indeed still there."""
    server, relay, front = relayed
    with start_client(server, tmp_path, host=front, wrapped=True) as term:
        wait_shell(term)
        pid = remote_shell_pid(term, tmp_path)
        relay.set_blackout(True)
        term.send(QUIT)
        pressed = time.monotonic()
        rc, attrs, out = wrapper_result(term, 20)
        took = time.monotonic() - pressed
        assert (rc, attrs) == (QUIT_STATUS, "same")
        assert (b"mp: the server could not be told to end the session (no answer within 2 s);"
                b" it stays there, detached, until the server's detached_session_timeout_secs"
                b" runs out (a week by default).") in out
    assert took < 8.0, f"quitting took {took:.1f} s"
    assert pid_alive(pid)  # detached, not ended
    assert "by the client's quit request" not in server.log()


@pytest.mark.timeout(120)
def test_rebind_mid_session_keeps_session(relayed, tmp_path):
    server, relay, front = relayed
    with start_client(server, tmp_path, host=front) as term:
        wait_shell(term)
        relay.rebind()  # the client now appears from another address (a NAT rebinding)
        term.send("echo $((3000+21))\r")
        term.read_until(re.compile(rb"[\r\n]3021\r\n"), 30)
        server.wait_log("client now at", 20)  # the server saw the client move
        term.send("exit 4\r")
        assert b"closed." in term.read_to_eof(30)
        assert term.wait(10) == 4


@pytest.mark.timeout(150)
def test_typing_through_30_percent_loss(relayed, tmp_path):
    server, relay, front = relayed
    relay.set(loss=0.3)
    with start_client(server, tmp_path, "--transport", "udp", host=front) as term:
        wait_shell(term, timeout=60)
        for a, b in ((7, 191), (12, 34), (99, 99)):
            type_slowly(term, f"echo $(({a}*{b}))\r")
            # the result starts a line: after a newline, or after the sequence that puts
            # the cursor back where prediction found it (predictions show on this lossy link)
            term.read_until(re.compile(rb"(?:[\r\n]|\x1b\[[0-9;]*[A-Za-z])%d\r\n" % (a * b)),
                            60)
        term.send("exit 5\r")
        assert b"Connection to " in term.read_to_eof(60)
        assert term.wait(10) == 5
    stats = relay.stats
    assert stats["up"]["lost"] > 0 and stats["down"]["lost"] > 0  # loss really happened


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_refused_key_on_resume_is_final(relayed, tmp_path):
    server, relay, front = relayed
    with start_client(server, tmp_path, host=front, wrapped=True,
                      env=client_env(tmp_path, **QUICK_RESUME)) as term:
        wait_shell(term)
        stranger = make_key(str(tmp_path / "stranger"), "stranger")
        write_authorized_keys(server.authorized_keys_path, stranger.public)  # access revoked
        relay.set_blackout(True)  # UDP silence -> resume handshake over TCP -> refused
        rc, attrs, out = wrapper_result(term, 60)
        assert (rc, attrs) == (255, "same")
        assert f"mp: permission denied (publickey) for {USER}@{front}".encode() in out
    assert client_log(tmp_path).count("resume handshake #") == 1  # never retried
