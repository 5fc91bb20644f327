"""Local echo prediction end to end: mp and mps over the test relay (200 ms round trip with
jitter), the client's terminal a tmux pane, keys typed with ``send-keys``.

Each case types the same keys into two panes: A runs the program through ``mp`` (predicting:
the overlay is drawn, underlined, since the link is slow), B runs it directly. Once input
stops and the link is quiet, A must show exactly what B shows: every cell with its
attributes, the cursor and the modes (0 differences). With echo off (``read -s``, a
sudo-style getpass prompt) no typed character may ever reach A's terminal, not even for a
moment: A's whole output is recorded (pipe-pane) and searched.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import sys
import time

import pytest
from relay import Relay, random_front_alias
from server_util import MpsServer
from test_client_session import client_env, mp_args
from tmux_util import TmuxOracle, compare_views

ROWS, COLS = 12, 40
ONE_WAY_SECS, JITTER_SECS = 0.1, 0.02  # 200 ms round trip, plus up to 40 ms of jitter
KEY_GAP_SECS = 0.03  # a fast typist: several keys in flight per round trip
CLEAR = r"printf '\033[H\033[2J'"  # both panes start from a blank screen, cursor home
BASH = "env PS1='$ ' bash --norc --noprofile -i"
# What the overlay looks like on the wire: a glyph in an SGR ending with underline (4),
# which the test programs never use themselves.
OVERLAY = re.compile(rb"\x1b\[\d+;\d+H\x1b\[0(?:;[0-9;]*)?;4m[ -~]")

ESCAPES = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])")

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
    pytest.mark.timeout(120),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """(server, relay, front address, directory): one mps behind a 200 ms relay."""
    base = tmp_path_factory.mktemp("predict")
    with MpsServer(base, udp_ports=8) as server:
        front = random_front_alias()
        with Relay(front=front, back="127.0.0.1", tcp_ports=[server.port],
                   udp_ports=server_udp_ports(server)) as relay:
            for direction in (relay.up, relay.down):
                direction.update(delay=ONE_WAY_SECS, jitter=JITTER_SECS)
            yield server, relay, front, base


def server_udp_ports(server: MpsServer) -> list:
    low, high = server.udp_range
    return list(range(low, high + 1))


class Pair:
    """Pane A: ``command`` through mp; pane B: the same command run directly."""

    def __init__(self, tmux: TmuxOracle, link, command: str, predict: str = "adaptive"):
        server, self.relay, front, base = link
        self.tmux = tmux
        work = pathlib.Path(tmux.dir)
        env = client_env(work, TERM="xterm-256color")
        argv = mp_args(server, work, "--predict", predict, "--tty", host=front)
        remote = f"{CLEAR}; exec {command}"  # mp joins its arguments with spaces, as ssh
        mp_line = " ".join(shlex.quote(a) for a in
                           ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv,
                            "--", "sh", "-c", shlex.quote(remote)])
        self.a = tmux.new_pane("a", mp_line)
        self.b = tmux.new_pane("b", "env -i TERM=xterm-256color LANG=C.UTF-8 HOME=/tmp "
                               f"PATH={shlex.quote(os.environ['PATH'])} "
                               f"sh -c {shlex.quote(remote)}")

    def ready(self, text: str = "$") -> None:
        self.tmux.wait_quiet(self.a, quiet_secs=0.5, timeout=30, contains=text)
        self.tmux.wait_quiet(self.b, quiet_secs=0.1, timeout=30, contains=text)

    def keys(self, *keys: str, literal: bool = False, gap: float = KEY_GAP_SECS) -> None:
        """Each key to both panes at once, ``gap`` apart (text: one key per character)."""
        for key in (list(keys[0]) if literal else keys):
            flag = ["-l"] if literal else []
            key = "\\;" if key == ";" else key  # a lone ";" separates tmux commands
            self.tmux.tmux("send-keys", "-t", self.a, *flag, key, ";",
                           "send-keys", "-t", self.b, *flag, key)
            time.sleep(gap)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def paste(self, text: str) -> None:
        """A paste: one write of the whole text (bracketed if the program asked for it)."""
        self.tmux.tmux("set-buffer", text, ";", "paste-buffer", "-p", "-t", self.a, ";",
                       "paste-buffer", "-p", "-t", self.b)

    def settle(self) -> list:
        """Wait for both panes to be quiet; the differences between them."""
        # A waits on the slow link (and the echo acks); B, run directly, is quiet by then
        views = [self.tmux.wait_quiet(self.a, quiet_secs=1.0, timeout=30),
                 self.tmux.wait_quiet(self.b, quiet_secs=0.1, timeout=30)]
        diffs = [d for d in compare_views(*views, ROWS, COLS)
                 if not d.startswith("pane_title")]
        if diffs:  # the two screens, to read in the failure
            diffs += ["A: " + "|".join(views[0].plain), "B: " + "|".join(views[1].plain)]
        return diffs

    def assert_same(self) -> None:
        diffs = self.settle()
        assert not diffs, "\n".join(diffs)

    def raw(self) -> bytes:
        return self.tmux.raw(self.a)


@pytest.fixture
def tmux(tmp_path):
    with TmuxOracle(tmp_path, ROWS, COLS) as oracle:
        yield oracle


def test_bash_typing_backspace_arrows_last_column_and_bottom_row(tmux, link):
    pair = Pair(tmux, link, BASH)
    pair.ready()
    pair.type("ecoh")  # mistyped, corrected with backspace
    pair.keys("BSpace", "BSpace")
    pair.type("ho hello wrold")
    pair.keys("Left", "Left", "Left", "Left")
    pair.type("orld")  # overwrites "rold" in place: readline inserts, the echo corrects us
    pair.keys("Enter")
    pair.type("seq 12")
    pair.keys("Enter")  # the prompt now sits on the bottom row
    pair.type("echo " + "x" * (COLS - 4))  # runs past the last column and wraps
    pair.keys("Enter")
    pair.assert_same()
    assert OVERLAY.search(pair.raw()), "no prediction was drawn"


def test_paste_and_an_outage(tmux, link):
    pair = Pair(tmux, link, BASH)
    pair.ready()
    pair.paste("echo " + "pasted " * 20)
    pair.keys("Enter")
    pair.settle()
    pair.relay.blackout(2.0)  # typed during the outage: predicted, then confirmed
    pair.type("echo during the outage")
    time.sleep(2.0)
    pair.keys("Enter")
    pair.assert_same()


def test_echo_off_never_shows_a_typed_character(tmux, link):
    getpass = shlex.quote(f"{sys.executable} -c \"import getpass; "
                          "getpass.getpass('[sudo] password for you: ')\"")
    pair = Pair(tmux, link, BASH)
    pair.ready()
    pair.type("read -s -p 'Password: ' pw; echo; echo ${#pw}")
    pair.keys("Enter")
    pair.type("QZXJQZXJ")
    pair.keys("Enter")
    pair.type(f"eval {getpass}")
    pair.keys("Enter")
    time.sleep(0.5)
    pair.type("JXZQ")
    pair.keys("Enter")
    pair.assert_same()
    text = ESCAPES.sub(b"", pair.raw())  # the glyphs written, not the sequences
    leak = re.search(rb"[QZXJ]", text)
    assert not leak, f"a typed password character was shown: {text[:leak.end() + 20]!r}"


def test_vim_insert_and_normal_mode(tmux, link):
    if shutil.which("vim") is None:
        pytest.skip("vim is not installed")
    pair = Pair(tmux, link, "vim -u NONE -N -i NONE -n", predict="experimental")
    pair.ready("~")
    pair.keys("i")
    pair.type("hello wrold")
    pair.keys("BSpace", "BSpace", "BSpace", "BSpace")
    pair.type("orld")
    pair.keys("Escape")
    pair.type("0xxwdw")  # normal mode: deletes, never shown as typed
    pair.keys("A")
    pair.type(" again")
    pair.keys("Escape")
    pair.assert_same()


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_rprompt_and_fish_autosuggestions(tmux, link, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (make test-tools installs it with apt-get)")
    if shell == "zsh":
        command = "env PS1='$ ' RPROMPT='[right]' zsh -f -i"
    else:
        # fish suggests from its history: "echo hello" is typed once, then suggested
        command = ("env HOME=$(mktemp -d) fish --no-config -i -C "
                   + shlex.quote("function fish_prompt; echo -n '$ '; end; "
                                 "function fish_greeting; end"))
    pair = Pair(tmux, link, command)
    pair.ready()
    pair.type("echo hello")
    pair.keys("Enter")
    pair.type("echo hel")  # fish now suggests "lo" in grey after the cursor
    pair.keys("BSpace")
    pair.type("lp")
    pair.keys("Enter")
    pair.assert_same()
