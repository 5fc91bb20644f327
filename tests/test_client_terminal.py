"""mp.py leaves the local terminal as it found it, with tmux as the local terminal.

A remote program turns on the alternate screen, mouse tracking, bracketed paste, application
cursor keys and keypad, a hidden cursor and a colour; then the session ends each way it can
(the server vanishing, SIGTERM to mp, Ctrl-^ .) and tmux reports every mode back off, with
mp's final message on the main screen in default colours. After ``kill -9`` of a client the
next mp resets those modes at start. After an outage the banner's row shows again what the
server had drawn there. Real mp.py and mps.py on loopback; tmux on a private socket.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from typing import Optional

import pytest

from proc_util import wait_for
from relay import Relay, random_front_alias
from server_util import MpsServer, shared_server
from test_client_session import QUICK_RESUME, kill_server, mp_args, restart_server
from tmux_util import PANE_POLL_SECS, TmuxOracle

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/tmux"), reason="needs tmux")

# What a full-screen program with a mouse turns on (vim with mouse=a, htop, mc...).
MODES_ON = (r"\e[?1049h\e[H\e[2J\e[?1000h\e[?1006h\e[?2004h\e[?1h\e=\e[?25l\e[31m"
            r"MODES\055ON\e[5;3H")  # the typed line shows it as MODES\055ON
# tmux's view of those modes: (format, value while on, value when back to normal).
MODE_FLAGS = (("alternate_on", "1", "0"), ("mouse_any_flag", "1", "0"),
              ("mouse_sgr_flag", "1", "0"), ("keypad_cursor_flag", "1", "0"),
              ("keypad_flag", "1", "0"), ("cursor_flag", "0", "1"))
PASTE = "pasted-text"


def flags(tmux: TmuxOracle, pane: str) -> dict:
    out = tmux.tmux("display", "-p", "-t", pane,
                    "\t".join("#{" + name + "}" for name, _, _ in MODE_FLAGS)).rstrip("\n")
    return dict(zip((name for name, _, _ in MODE_FLAGS), out.split("\t")))


def client_pane(tmux: TmuxOracle, server: MpsServer, tmp_path, name: str, runs: int = 1,
                host: str = "127.0.0.1", env: Optional[dict] = None,
                extra: tuple = ()) -> str:
    """A tmux pane running mp ``runs`` times, then ``cat -v``: it shows what the terminal
    sends for a paste (bracket marks if bracketed paste is still on). ``stty sane`` after
    each run does what bash and zsh do when a job dies of a signal (the pane's ``sh``
    does not): termios back to cooked, so a killed mp's raw mode does not outlive it.
    ``env``: more environment variables for mp; ``extra``: more arguments."""
    home = tmp_path / "client-home"
    home.mkdir(exist_ok=True)
    client = " ".join(map(shlex.quote, mp_args(server, tmp_path, *extra, host=host)))
    line = "; ".join([f"{client}; echo mp-status-$?; stty sane"] * runs + ["exec cat -v"])
    env_vars = "".join(f"{var}={shlex.quote(value)} " for var, value in (env or {}).items())
    return tmux.new_pane(name, f"env HOME={shlex.quote(str(home))} TERM=xterm-256color {env_vars}"
                               f"sh -c {shlex.quote(line)}", record=False)


def wait_screen(tmux: TmuxOracle, pane: str, pattern: str, timeout: float = 30.0) -> list:
    rows = []

    def shown():
        rows[:] = tmux.tmux("capture-pane", "-p", "-t", pane).split("\n")
        return rows if any(re.search(pattern, row) for row in rows) else None
    try:
        return wait_for(shown, timeout, f"{pattern!r} on the screen", PANE_POLL_SECS)
    except TimeoutError as err:
        raise TimeoutError(f"{err}; screen:\n" + "\n".join(rows)) from None


def mp_pid(tmux: TmuxOracle, pane: str) -> int:
    shell = int(tmux.tmux("display", "-p", "-t", pane, "#{pane_pid}").strip())
    def child():
        with open(f"/proc/{shell}/task/{shell}/children") as f:
            pids = f.read().split()
        return int(pids[0]) if pids else None
    return wait_for(child, 10, "mp.py under the pane's shell")


def turn_modes_on(tmux: TmuxOracle, pane: str) -> None:
    wait_screen(tmux, pane, r"[$#] ?$")  # the remote prompt
    tmux.type(pane, f"printf '{MODES_ON}'; sleep 600")
    wait_screen(tmux, pane, "MODES-ON")
    assert flags(tmux, pane) == {name: on for name, on, _ in MODE_FLAGS}


def assert_terminal_back_to_normal(tmux: TmuxOracle, pane: str, message: str) -> None:
    rows = wait_screen(tmux, pane, "mp-status-")
    assert flags(tmux, pane) == {name: off for name, _, off in MODE_FLAGS}
    escaped = tmux.tmux("capture-pane", "-p", "-e", "-t", pane)
    assert "MODES-ON" not in "\n".join(rows), "still on the alternate screen"
    line = next(row for row in escaped.split("\n") if message in row)
    assert "\x1b[" not in line.split(message)[0], f"message not in default colours: {line!r}"
    tmux.tmux("set-buffer", PASTE)  # bracketed paste off: cat -v shows the text bare
    tmux.tmux("paste-buffer", "-p", "-t", pane)
    tmux.send(pane, "Enter")
    rows = wait_screen(tmux, pane, "^" + PASTE + "$")
    assert not any("[200~" in row for row in rows)


server = shared_server()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.own_server
def test_modes_reset_when_the_server_vanishes(server, tmp_path):
    with TmuxOracle(tmp_path) as tmux:
        pane = client_pane(tmux, server, tmp_path, "gone", env=QUICK_RESUME)
        turn_modes_on(tmux, pane)
        kill_server(server)
        restart_server(server)  # same port and keys, the session is gone
        assert_terminal_back_to_normal(tmux, pane, "no longer exists")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_modes_reset_on_sigterm(server, tmp_path):
    with TmuxOracle(tmp_path) as tmux:
        pane = client_pane(tmux, server, tmp_path, "term")
        turn_modes_on(tmux, pane)
        os.kill(mp_pid(tmux, pane), signal.SIGTERM)
        assert_terminal_back_to_normal(tmux, pane, "mp-status-255")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_modes_reset_on_escape_quit(server, tmp_path):
    with TmuxOracle(tmp_path) as tmux:
        pane = client_pane(tmux, server, tmp_path, "quit")
        turn_modes_on(tmux, pane)
        tmux.tmux("send-keys", "-t", pane, "-H", "1e", "2e")  # Ctrl-^ .
        assert_terminal_back_to_normal(tmux, pane, "Connection to 127.0.0.1 closed.")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_next_client_resets_modes_a_killed_client_left(tmp_path):
    """Also the file status flags: the killed mp left the terminal non-blocking, which
    makes the next program reading it (here ``cat``) fail with EAGAIN unless mp clears it."""
    with MpsServer(tmp_path, udp_ports=2) as server, TmuxOracle(tmp_path) as tmux:
        # Two UDP ports: the killed client's session stays on the server, detached.
        pane = client_pane(tmux, server, tmp_path, "killed", runs=2)
        turn_modes_on(tmux, pane)
        os.kill(mp_pid(tmux, pane), signal.SIGKILL)  # no handler runs: modes stay on
        # The second mp resets them before it even connects; then the new remote shell. (Not
        # waited for: the pane's "mp-status-137", written on the alternate screen the killed
        # mp left on, which the second mp leaves within milliseconds: a poll can miss it.)
        wait_for(lambda: flags(tmux, pane) == {name: off for name, _, off in MODE_FLAGS},
                 30, "the modes reset by the next mp", PANE_POLL_SECS)
        wait_screen(tmux, pane, r"[$#] ?$")
        tmux.tmux("send-keys", "-t", pane, "-H", "1e", "2e")
        assert_terminal_back_to_normal(tmux, pane, "Connection to 127.0.0.1 closed.")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("screen", ["alternate", "scrolled"])
def test_banner_row_repainted_after_outage(tmp_path, screen):
    """The top row after an outage is the row the server drew there (colours too), not a
    blank one: on the alternate screen and on a main screen the output has scrolled."""
    with MpsServer(tmp_path) as server:
        front = random_front_alias()
        with Relay(front=front, back="127.0.0.1", tcp_ports=[server.port],
                   udp_ports=[server.udp_port]) as relay, TmuxOracle(tmp_path) as tmux:
            # UDP only: the relay's blackout leaves TCP up, which `auto` would fall back to.
            pane = client_pane(tmux, server, tmp_path, "banner", host=front,
                               extra=("--transport", "udp"))
            wait_screen(tmux, pane, r"[$#] ?$")
            if screen == "alternate":
                tmux.type(pane, r"printf '\e[?1049h\e[H\e[2J\e[1;33mTOP\e[m row\e[5;1H';"
                                " sleep 600")
                wait_screen(tmux, pane, "^TOP row")
            else:
                tmux.type(pane, r"for i in $(seq 100 160); do printf '\e[32mline\e[m %s\n' $i;"
                                " done")
                wait_screen(tmux, pane, "^line 160")
                time.sleep(0.5)  # the prompt after the loop
            before = tmux.tmux("capture-pane", "-p", "-e", "-t", pane).split("\n")
            relay.set_blackout(True)
            wait_screen(tmux, pane, "last contact")
            relay.set_blackout(False)
            wait_for(lambda: "last contact" not in tmux.tmux("capture-pane", "-p", "-t", pane),
                     60, "the banner to go", PANE_POLL_SECS)
            after = tmux.tmux("capture-pane", "-p", "-e", "-t", pane).split("\n")
            assert after[0] == before[0] and before[0].strip()
            assert after == before
            tmux.tmux("send-keys", "-t", pane, "-H", "1e", "2e")
            wait_screen(tmux, pane, "mp-status-")
