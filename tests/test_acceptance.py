"""Acceptance suite (issue 7): moshpit the way a user lives with it.

Real ``mps.py`` and ``mp.py`` processes on loopback only, ``mp.py`` in a real PTY, all
traffic through the impairment relay on a random 127.0.0.N (TCP passed through for the
handshake, UDP impaired).  Every scenario is bounded in time and stops what it started by
PID (tests/acceptance_util.Rig).  Waits are on output markers, never on fixed sleeps, and
timeouts are generous: the machine is shared by many concurrent test runs.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

pytest.importorskip("moshpit_transport")

from acceptance_util import (CTRL_C, KEYGEN, Rig, Shell, Sprayer,  # noqa: E402
                             numbers_in, sha256, wrapper_result)
from proc_util import wait_for  # noqa: E402
from server_util import READY_LINE, make_key  # noqa: E402

import moshpit_keys  # noqa: E402
import moshpit_trust  # noqa: E402

# A full-screen program's output: alternate screen, clear, cursor moves, attributes,
# colours, UTF-8, cursor visibility, erase line, back to the main screen.
TPUT_SCRIPT = ("tput smcup; tput clear; tput cup 5 10; tput bold; tput setaf 1; "
               "printf 'h\\303\\251llo \\342\\200\\246'; tput sgr0; tput civis; tput cnorm; "
               "tput cup 0 0; tput el; tput rmcup")


@pytest.fixture
def rig(tmp_path):
    with Rig(tmp_path) as r:
        yield r


def connect(rig: Rig, *extra: str, rows: int = 24, cols: int = 80, **kwargs):
    """mp.py started (``extra``: more flags) and the remote shell prepared: (terminal,
    shell)."""
    term = rig.start_client(*extra, rows=rows, cols=cols, **kwargs)
    shell = Shell(term)
    try:
        shell.prepare()
    except BaseException:
        term.close()
        raise
    rig.track_server_children()
    return term, shell


def end_session(rig: Rig, term, shell: Shell, status: int = 0) -> None:
    """``exit`` the remote shell: the client exits with its status, terminal restored."""
    shell.send_line(f"exit {status}")
    rc, attrs, out = wrapper_result(term)
    assert rc == status, rig.diagnostics()
    assert attrs == "same"
    assert f"Connection to {rig.front} closed.".encode() in out


# --- 1. fresh HOME: keygen, authorize, first connect, a session, exit status -------------


@pytest.mark.timeout(150)
def test_fresh_home_first_connection(rig):
    key_path = os.path.join(rig.mp_dir, "id_ed25519")
    keygen = subprocess.run(
        [sys.executable, KEYGEN, "generate", "-f", key_path, "-N", "", "-C", "e2e@acceptance"],
        env=rig.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert keygen.returncode == 0, keygen.stderr
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    # Authorize: append the .pub line to the server's authorized_keys (which stays 0600).
    with open(key_path + ".pub") as f:
        pub_line = f.read()
    with open(rig.server.authorized_keys_path, "a") as f:
        f.write(pub_line)
    assert stat.S_IMODE(os.stat(rig.server.authorized_keys_path).st_mode) == 0o600
    assert not os.path.exists(rig.known_hosts)

    host_key = rig.server.host_key.public
    # No -p, no policy flag: the default identity in the fresh HOME, strict checking "ask".
    with rig.start_client(key="", policy=None, rows=33, cols=101) as term:
        prompt = term.read_until(b"(yes/no/[fingerprint])? ", 60)
        assert f"[{rig.front}]:{rig.server.port}".encode() in prompt
        assert host_key.fingerprint().encode() in prompt
        assert host_key.randomart().splitlines()[1].encode() in prompt  # randomart shown
        term.send("yes\r")
        shell = Shell(term)
        shell.prepare()
        rig.track_server_children()

        assert shell.run("echo hello-$((6*7))") == b"hello-42\n"
        assert shell.run("stty size") == b"33 101\n"
        expected = subprocess.run(["sh", "-c", TPUT_SCRIPT],
                                  env={"TERM": "xterm", "PATH": "/usr/bin:/bin"},
                                  capture_output=True, check=True).stdout
        assert b"\x1b[" in expected
        assert shell.run(TPUT_SCRIPT) == expected
        end_session(rig, term, shell, 3)
    status, _line = moshpit_trust.KnownHosts(rig.known_hosts).lookup(
        rig.front, rig.server.port, host_key)
    assert status == "ok"


# --- 2. a 60 s outage while output runs and the user types ------------------------------


@pytest.mark.slow
@pytest.mark.timeout(330)
@pytest.mark.parametrize("cut", ["udp", "udp+tcp"])
def test_outage_60s_nothing_lost_typed_line_runs_once(tmp_path, cut):
    """``udp``: only the session's datagrams are cut, the resume handshakes succeed during
    the outage (input and output cross a rekey). ``udp+tcp``: everything is cut, every
    resume handshake times out, and the session recovers when the network returns."""
    with Rig(tmp_path, impair_tcp=(cut == "udp+tcp")) as rig:
        # A UDP-only cut with TCP up is what `auto` carries on over TCP for
        # (tests/test_carrier_relay.py): this outage is about UDP, so UDP it is.
        _outage(rig, *(("--transport", "udp") if cut == "udp" else ()))


def _outage(rig: Rig, *extra: str) -> None:
    term, shell = connect(rig, *extra)
    with term:
        # Typed-ahead input must not be echoed into the middle of the numbers; the shell's
        # line editor shows the line itself when it reads it after the loop.
        shell.run("stty -echo")
        begin, end = shell.start("for i in $(seq 1000); do echo $i; sleep 0.05; done")
        term.read_until(begin, 60)
        out = term.read_until(b"\n20\n", 60)  # output is flowing
        rig.relay.blackout(60.0)
        outage_start = time.monotonic()
        # The banner redraws every second: wait until the client has been cut off long
        # enough to be hopping ports and trying resume handshakes, then type.
        out += term.read_until(re.compile(rb"last contact 1[5-9] s ago"), 60)
        term.send("echo TYPED-$((6*7))\r")
        assert time.monotonic() - outage_start < 50, "typed too late: not during the outage"
        out += term.read_until(end, 60 + 120)
        loop_output = out
        out += term.read_until(b"TYPED-42", 60)
        out += shell.run("stty echo; echo after-$((1+1))")
        out += shell.run("echo again")
        assert numbers_in(loop_output) == list(range(1, 1001)), rig.diagnostics()
        assert out.count(b"TYPED-42") == 1
        assert time.monotonic() - outage_start > 60  # the outage really happened
        assert rig.relay.stats["up"]["blackout_dropped"] > 0
        # The client tried resume handshakes meanwhile (that they are no longer needed once
        # datagrams flow again is fine): the typed line crossed them exactly once.
        assert rig.relay.stats["tcp"]["accepted"] > 1, rig.diagnostics()
        end_session(rig, term, shell)


# --- 3. roaming: the client's address changes three times during output -----------------


@pytest.mark.timeout(180)
def test_roaming_three_rebinds_nothing_lost(rig):
    term, shell = connect(rig)
    with term:
        before = rig.relay.client_addresses()
        begin, end = shell.start("for i in $(seq 400); do echo $i; sleep 0.01; done")
        term.read_until(begin, 60)
        out = b""
        for mark in (60, 160, 260):
            out += term.read_until(b"\n%d\n" % mark, 60)
            rig.relay.rebind()
        out += term.read_until(end, 90)
        assert numbers_in(out) == list(range(1, 401)), rig.diagnostics()
        shell.ping()
        # Roaming is seamless: no resume handshake was needed (one TCP connection in all),
        # and the client kept its own address (only the relay's source port changed).
        assert rig.relay.stats["tcp"]["accepted"] == 1, rig.diagnostics()
        assert rig.relay.client_addresses() == before
        end_session(rig, term, shell)


# --- 4. 30% loss each way and 50 ms RTT --------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_lossy_link_interactive_and_bulk_output(rig, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(1_500_000))
    expected = subprocess.run(["base64", str(blob)], capture_output=True, check=True).stdout
    assert len(expected) > 2_000_000
    term, shell = connect(rig)
    with term:
        rig.relay.set(loss=0.3, delay=0.025)
        for i in range(10):  # echo round trips keep working
            assert shell.run(f"echo rt-$((1000+{i}))", 60) == f"rt-{1000 + i}\n".encode()
        got = shell.run(f"base64 {blob}", 240)
        assert len(got) == len(expected), rig.diagnostics()
        assert sha256(got) == sha256(expected)
        remote = shell.run(f"base64 {blob} | sha256sum", 120)
        assert remote.split()[0].decode() == sha256(expected)
        assert rig.relay.stats["down"]["lost"] > 0 and rig.relay.stats["up"]["lost"] > 0
        end_session(rig, term, shell)


# --- 5. flood, then Ctrl-C ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_flood_then_ctrl_c_prompt_returns(rig):
    term, shell = connect(rig)
    with term:
        shell.send_line("yes")
        term.read_until(b"y\ny\ny\ny\n", 30)
        flood = term.drain(quiet=5.0, limit=2.0)  # two seconds of flood, read as it comes
        assert len(flood) > 10_000, "no flood to interrupt"
        term.send(CTRL_C)
        shell.ping(60)  # the prompt is back: a marker echo comes through
        for i in range(3):
            assert shell.run(f"echo still-{i}") == f"still-{i}\n".encode()
        end_session(rig, term, shell)


# --- 6. attacks: hostile datagrams, and logins that must be refused -----------------------


@pytest.mark.timeout(180)
def test_garbage_and_replayed_datagrams_change_nothing(rig):
    term, shell = connect(rig)
    with term:
        assert numbers_in(shell.run("seq 300")) == list(range(1, 301))  # traffic to capture
        client_addr = rig.relay.client_addresses()[-1]
        sprayer = Sprayer(rig.relay, ("127.0.0.1", rig.server.udp_port), client_addr,
                          (rig.front, rig.server.udp_port))
        with sprayer:
            out = shell.run("for i in $(seq 300); do echo $i; sleep 0.01; done", 120)
            for i in range(5):
                assert shell.run(f"echo ok-$((7*{i}))") == f"ok-{7 * i}\n".encode()
        assert sprayer.sent > 200, sprayer.sent
        assert sprayer.received == [], "a peer answered the attacker"
        assert numbers_in(out) == list(range(1, 301)), rig.diagnostics()
        assert shell.run("echo after-$((2+2))") == b"after-4\n"
        # Nothing hostile got through: the server never saw the session move, and no
        # resume handshake was needed.
        assert rig.relay.stats["tcp"]["accepted"] == 1, rig.diagnostics()
        end_session(rig, term, shell)
    for log in (rig.server.log(), rig.read_client_log()):
        assert "Traceback" not in log


def refused(rig: Rig, **client_kwargs) -> bytes:
    """Start mp.py, expect it to fail with exit status 255 and the terminal untouched;
    returns what it printed."""
    with rig.start_client(**client_kwargs) as term:
        rc, attrs, out = wrapper_result(term, 60)
    assert rc == 255, out
    assert attrs == "same"
    assert b"Traceback" not in out
    return out


@pytest.mark.timeout(120)
def test_unauthorized_key_refused(rig, tmp_path):
    stranger = str(tmp_path / "stranger_key")
    make_key(stranger, "stranger")
    out = refused(rig, key=stranger)
    assert re.search(rb"mp: permission denied \(publickey\) for \S+@" + rig.front.encode(), out)
    assert moshpit_keys.load_public_key(stranger + ".pub").fingerprint() in rig.server.log()


@pytest.mark.timeout(120)
def test_wrong_host_key_refused(rig, tmp_path):
    impostor = moshpit_keys.PrivateKey.generate(comment="impostor")
    os.makedirs(rig.mp_dir, mode=0o700, exist_ok=True)
    moshpit_trust.KnownHosts(rig.known_hosts).add(rig.front, rig.server.port,
                                                      impostor.public)
    with open(rig.known_hosts, "rb") as f:
        known_before = f.read()
    out = refused(rig, policy=None)  # the default policy: ask
    assert b"REMOTE HOST IDENTIFICATION HAS CHANGED" in out
    assert rig.server.host_key.public.fingerprint().encode() in out
    assert f"{rig.known_hosts}:1".encode() in out  # which line to remove
    assert b"Host key verification failed." in out
    with open(rig.known_hosts, "rb") as f:
        assert f.read() == known_before  # never silently replaced


@pytest.mark.timeout(120)
def test_server_without_users_authorized_keys_refused(tmp_path):
    # "" = the target user's own ~/.mp/authorized_keys; a file the user does not have.
    missing = str(tmp_path / "nowhere" / "authorized_keys")
    with Rig(tmp_path, server_settings={"mps.authorized_keys_file": missing}) as rig:
        out = refused(rig)
        assert re.search(rb"mp: permission denied \(publickey\) for \S+@" + rig.front.encode(),
                         out)
        assert missing in rig.server.log()  # the server's log says what is wrong


# --- 7. the server restarts under a connected client ---------------------------------------


@pytest.mark.timeout(180)
def test_server_restart_client_says_session_gone(rig):
    term, shell = connect(rig)
    with term:
        shell.ping()
        rig.track_server_children()
        # Gone without a word, sessions too (they outlive a listener stopped alone): a crash.
        os.killpg(rig.server.proc.pid, signal.SIGKILL)
        rig.server.proc.wait(10)
        started = rig.server.log().count(READY_LINE)
        rig.server.start(wait=False)  # same port, same keys, no sessions
        wait_for(lambda: rig.server.log().count(READY_LINE) > started, 60,
                 "mps.py to listen again")
        rc, attrs, out = wrapper_result(term, 90)
    assert rc == 255, out
    assert attrs == "same"
    assert (f"moshpit: the session on {rig.front} no longer exists "
            "(server restarted or session expired).").encode() in out
