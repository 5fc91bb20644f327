"""Reattach from any client (mp --attach, --list, --kill) against a real mps.py on loopback:
the real handshake, transport, shell and PTY, driven by server_util.TestClient."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess

import pytest
from moshpit_handshake import NO_SUCH_SESSION, PERMISSION_DENIED, AuthRefused
from proc_util import pid_alive, proc_children, wait_for
from test_client_session import client_env, mp_args
from tmux_util import TMUX, TmuxOracle, compare_views
from server_util import MpsServer, TestClient, make_key, shared_server, write_authorized_keys

from moshpit_transport import KEEPALIVE_SECS

ATTACHED_SECS = 2 * KEEPALIVE_SECS  # mps: a client silent this long is listed as detached

pytestmark = pytest.mark.timeout(90)


server = shared_server(udp_ports=3, settings={"mps.max_sessions_per_user": 1})


def other_key(server: MpsServer, directory):
    """A second key authorized for the same user (another laptop), made in ``directory``."""
    key = make_key(os.path.join(directory, "other_id"), "other")
    write_authorized_keys(server.authorized_keys_path, server.client_key.public, key.public)
    return key


def test_attach_repaints_the_screen_tells_the_old_client_and_takes_the_new_size(server, tmp_path):
    """Another key of the same user takes the session over: it gets the screen first (the
    text written before, the title), the old client is told who took it, the shell goes on
    (same PID) at the new client's size; the old client cannot resume any more."""
    with TestClient.for_server(server).connect() as first:
        pid = int(first.run("echo $$"))
        first.run(r"printf '\033]2;my title\007'; echo painted-$((6*7))")
        with TestClient.for_server(server, identity=other_key(server, tmp_path), rows=30,
                                   cols=100) as second:
            (listed,) = second.sessions()  # a list is not a new session (limit 1)
            assert listed.session_id == first.grant.session_id and listed.attached
            assert listed.title == "my title" and (listed.rows, listed.cols) == (24, 80)
            second.attach(listed.session_id)  # nor is a takeover
            second.pump_for(0.5)
            (screen,) = second.repaints
            assert b"painted-42" in screen and b"\033]2;my title" in screen
            assert screen.startswith(b"\033[0m")  # for a fresh terminal: resets, then paints
            first.pump_for(1.0)
            assert re.fullmatch(r"session taken over from 127\.0\.0\.1:\d+",
                                first.shutdown_reason or "")
            assert int(second.run("echo $$")) == pid
            assert second.run("stty size") == "30 100"
            with pytest.raises(AuthRefused) as refused:  # the resume secret changed
                first.resume()
            assert refused.value.code == NO_SUCH_SESSION
            assert "taken over from" in server.wait_log("repaint of")


def test_the_client_a_session_was_taken_from_is_told_it_is_gone_on_resume(server):
    """Same key on both sides (one laptop, two terminals): the old client's resume (after an
    outage, say) proves the old secret: "no such session", not a forgery (no penalty)."""
    with TestClient.for_server(server).connect() as first:
        first.run("true")
        with TestClient.for_server(server) as second:
            second.attach(first.grant.session_id)
            second.run("true")
            with pytest.raises(AuthRefused) as refused:
                first.resume()
            assert refused.value.code == NO_SUCH_SESSION
            server.wait_log("it was taken over")


def test_list_and_kill(server):
    """--list shows the foreground command when no title is set and whether a client is
    there; --kill ends the session, its client is told, its shell is gone."""
    with TestClient.for_server(server).connect() as first:
        pid = int(first.run("echo $$"))
        first.send("sleep 60\n")
        watcher = TestClient.for_server(server)
        wait_for(lambda: watcher.sessions()[0].title == "sleep", 10, "sleep in the listing")
        result = watcher.kill(first.grant.session_id)
        assert result.grant.session_id == first.grant.session_id
        wait_for(lambda: not pid_alive(pid), 10, "the killed session's shell to end")
        first.pump_for(1.0)
        assert re.fullmatch(r"session killed by mp --kill from 127\.0\.0\.1:\d+",
                            first.shutdown_reason or "")
        wait_for(lambda: watcher.sessions() == [], 10, "the killed session to leave the list")
        with pytest.raises(AuthRefused) as refused:
            watcher.kill(first.grant.session_id)
        assert refused.value.code == NO_SUCH_SESSION


@pytest.mark.slow
def test_a_new_session_is_told_of_detached_ones_and_the_list_says_which(tmp_path):
    settings = {"mps.max_sessions_per_user": 3}
    with MpsServer(tmp_path, udp_ports=3, settings=settings) as server:
        with TestClient.for_server(server).connect() as first:
            first.run("true")
        # gone without a word (kill -9): detached once two keepalives are missed
        wait_for(lambda: not TestClient.for_server(server).sessions()[0].attached,
                 3 * ATTACHED_SECS, "the silent session to be listed as detached")
        with TestClient.for_server(server).connect() as second:
            second.run("true")
            assert second.grant.detached == 1
            infos = second.sessions()
            assert [info.attached for info in infos] == [True, False]  # most recent first
            assert infos[0].session_id == second.grant.session_id


def test_attach_and_kill_need_a_key_of_the_sessions_user(server, tmp_path):
    """A stranger's key is refused before anything (permission denied); an unknown session
    id is "no such session" and the session carries on."""
    with TestClient.for_server(server).connect() as first:
        pid = int(first.run("echo $$"))
        stranger = make_key(str(tmp_path / "stranger_id"), "stranger")
        for attempt in (lambda c: c.attach(first.grant.session_id),
                        lambda c: c.kill(first.grant.session_id), lambda c: c.sessions()):
            with pytest.raises(AuthRefused) as refused:
                attempt(TestClient.for_server(server, identity=stranger))
            assert refused.value.code == PERMISSION_DENIED
        for attempt in (lambda c: c.attach(bytes(16)), lambda c: c.kill(bytes(16))):
            with pytest.raises(AuthRefused) as refused:
                attempt(TestClient.for_server(server))
            assert refused.value.code == NO_SUCH_SESSION
        assert pid_alive(pid) and int(first.run("echo $$")) == pid


# -- mp.py end to end, in a tmux pane -------------------------------------------------------


@contextlib.contextmanager
def pane_with_shell(server: MpsServer, tmp_path):
    """A tmux pane running a local shell (where the user types mp commands); gives
    (tmux, pane, run) with run(*mp_flags) typing an mp.py command line into it."""
    if not shutil.which("vim") or not os.path.exists(TMUX):
        pytest.skip("needs vim and tmux (make test-tools)")
    env = client_env(tmp_path)
    with TmuxOracle(tmp_path, rows=24, cols=80) as tmux:
        pane = tmux.new_pane("a", "env -i " + " ".join(
            shlex.quote(f"{k}={v}") for k, v in dict(env, TERM="xterm-256color").items())
            + " bash --norc --noprofile -i", record=False)

        def run(*flags: str) -> None:
            tmux.type(pane, shlex.join(mp_args(server, tmp_path, *flags)))

        yield tmux, pane, run


def mp_processes(tmux: TmuxOracle, pane: str) -> list:
    shell = int(tmux.tmux("display", "-p", "-t", pane, "#{pane_pid}").strip())
    return [pid for pid in proc_children(shell)
            if b"mp.py" in open(f"/proc/{pid}/cmdline", "rb").read()]


@pytest.mark.slow
def test_vim_survives_kill_9_of_the_client_and_attach_in_the_same_pane(server, tmp_path):
    """The issue's end-to-end case: vim open in a session, the client killed with SIGKILL,
    mp --attach from a fresh client in the same pane: the pane shows exactly what it showed
    before, typing goes on, and the file vim saves has every keystroke once."""
    with pane_with_shell(server, tmp_path) as (tmux, pane, run):
        vim_after_kill_9_and_attach(tmux, pane, run, tmp_path)


def vim_after_kill_9_and_attach(tmux: TmuxOracle, pane: str, run, tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    run()
    tmux.type(pane, "echo ready-$((6*7))")
    tmux.wait_quiet(pane, contains="ready-42")
    tmux.type(pane, f"vim -u NONE -N -i NONE {notes}")
    tmux.wait_quiet(pane, contains="notes.txt")
    tmux.send(pane, "i", "first line", "Enter", "second line", "Escape")
    before = tmux.wait_quiet(pane, quiet_secs=1.0)
    (first_mp,) = mp_processes(tmux, pane)
    os.kill(first_mp, signal.SIGKILL)
    wait_for(lambda: not pid_alive(first_mp), 10, "the first mp to die")
    run("--attach")
    wait_for(lambda: mp_processes(tmux, pane), 10, "mp --attach to start")
    after = tmux.wait_quiet(pane, quiet_secs=1.0)
    assert after.plain == before.plain, "\n".join(after.plain)
    assert compare_views(before, after, 24, 80) == []
    tmux.send(pane, "o", "third line", "Escape", ":wq", "Enter")
    wait_for(lambda: notes.exists() and notes.read_text() == "first line\nsecond line\n"
             "third line\n", 15, "vim to save every line once")


@pytest.mark.slow
def test_mp_list_kill_and_the_detached_notice(tmp_path):
    """--list prints a header and one line per session; a plain mp names the detached
    sessions and how to attach; --kill ends the one named (its shell is gone)."""
    with MpsServer(tmp_path, udp_ports=3) as server, \
            pane_with_shell(server, tmp_path) as (tmux, pane, run):
        list_notice_and_kill(server, tmux, pane, run, tmp_path)


def list_notice_and_kill(server: MpsServer, tmux: TmuxOracle, pane: str, run,
                         tmp_path) -> None:
    with TestClient.for_server(server) as detached:
        detached.connect()
        pid = int(detached.run("echo $$"))
        detached.run(r"printf '\033]2;editing notes\007'")
        detached.close()
        session = detached.grant.session_id.hex()[:8]
    wait_for(lambda: not TestClient.for_server(server).sessions()[0].attached,
             3 * ATTACHED_SECS, "the session to be listed as detached")
    argv = mp_args(server, tmp_path, "--list")
    listing = subprocess.run(argv, env=client_env(tmp_path), capture_output=True, text=True,
                             timeout=30)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0] == "ID        STATE     STARTED           LAST ACTIVITY     SIZE       TITLE"
    assert re.fullmatch(session + r"  detached  \d{4}-\d\d-\d\d \d\d:\d\d  \d{4}-\d\d-\d\d"
                        r" \d\d:\d\d  80x24      editing notes", lines[1]), lines
    assert len(lines) == 2
    run()
    tmux.wait_quiet(pane, contains="1 detached session(s): mp --attach")
    killed = subprocess.run(mp_args(server, tmp_path, "--kill", session),
                            env=client_env(tmp_path), capture_output=True, text=True,
                            timeout=30)
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout == f"mp: session {session} on 127.0.0.1 ended\n"
    wait_for(lambda: not pid_alive(pid), 10, "the killed session's shell to end")
    gone = subprocess.run(mp_args(server, tmp_path, "--kill", session),
                          env=client_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert gone.returncode == 255
    assert gone.stderr.startswith(f"mp: no session with id {session} on 127.0.0.1:")
