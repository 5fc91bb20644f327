"""moshpit_term against a real terminal: tmux as the oracle.

Each case runs real programs (bash with a colour prompt, vim, less, man, top, a nested tmux,
the python REPL, CJK and emoji output) in a tmux pane whose output is recorded. At every
step the model fed the recording must show what tmux shows: every cell's glyph and SGR
attributes (capture-pane -e), the text (capture-pane -p), the cursor and the mode flags tmux
reports. Every case ends with the program's exit back to the shell.

The round trip: pane A runs the program; pane B gets only the model's serialization (then
the rest of A's stream after the program exits). Both panes must show the same cells and
flags, with the application on the alternate screen and after it exits.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import time

import pytest
from tmux_util import (COLOUR_PS1, TmuxOracle, compare, compare_views, model_of)

ROWS, COLS = 24, 80
pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
    pytest.mark.timeout(180),
]

PACKAGES = {"vim": "vim", "less": "less", "man": "man-db", "top": "procps"}


@pytest.fixture(scope="session")
def installed():
    """Which programs can run: installs the missing ones with apt-get when we are root;
    a program still missing makes its case skip with the reason."""
    missing = [name for name in PACKAGES if shutil.which(name) is None]
    reason = {}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            # Each xdist worker may get here at once: apt waits for the other's dpkg lock.
            subprocess.run(["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=240",
                            *sorted({PACKAGES[m] for m in missing})],
                           capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            pass
    for name in PACKAGES:
        if shutil.which(name) is None:
            reason[name] = f"{name} is not installed and apt-get could not install it"
    if shutil.which("man") and subprocess.run(["man", "-w", "ls"], capture_output=True,
                                              check=False).returncode:
        reason["man"] = "no manual pages are installed (man -w ls fails)"
    return reason


@pytest.fixture
def tmux(tmp_path):
    with TmuxOracle(tmp_path, ROWS, COLS) as oracle:
        yield oracle


def shell_pane(tmux: TmuxOracle, name: str = "a") -> str:
    command = (f"env PS1={shlex.quote(COLOUR_PS1)} HISTFILE=/dev/null INPUTRC=/dev/null "
               f"bash --norc --noprofile -i")
    pane = tmux.new_pane(name, command)
    tmux.wait_quiet(pane, contains="@host")
    return pane


def check(tmux: TmuxOracle, pane: str, contains=None, step: str = "") -> None:
    view = tmux.wait_quiet(pane, contains=contains)
    term = model_of(tmux.raw(pane), ROWS, COLS)
    diffs = compare(term, view)
    assert not diffs, f"after {step!r}:\n" + "\n".join(diffs)


def sample_files(directory) -> None:
    with open(os.path.join(directory, "sample.py"), "w") as f:
        for i in range(40):
            f.write(f"def function_{i}(x):\n    return x * {i}  # comment {i}\n")
    with open(os.path.join(directory, "long.txt"), "w") as f:
        for i in range(300):
            f.write(f"line {i} " + "lorem ipsum dolor sit amet " * (i % 5) + "\n")


# A step: ("type", text) types text and Enter; ("keys", k1, k2...) sends tmux key names;
# ("literal", text) types text without Enter. The last element of each case is its exit.
CASES = {
    "bash": [
        ("type", "ls --color=always -l /usr"),
        ("type", "printf '\\e[1;31mred\\e[0m \\e[38;5;208m256\\e[0m \\e[38;2;10;200;30mtrue"
                 "\\e[0m \\e[4:3mcurly\\e[0m \\e[7minverse\\e[0m\\n'"),
        ("type", "printf '%0150d\\n' 7; printf 'tab\\there\\tand\\tthere\\n'"),
        ("type", "seq 1 40"),
        ("type", "printf '\\e]2;my title\\a'; clear"),
    ],
    "vim": [
        ("type", "vim -u NONE -i NONE -N -c 'syntax on' -c 'set ruler laststatus=2' sample.py"),
        ("keys", ":split", "Enter"),
        ("keys", "G", "o"),
        ("literal", "hello wörld 中文"),
        ("keys", "Escape"),
        ("keys", ":qa!", "Enter"),
    ],
    "less": [
        ("type", "less long.txt"),
        ("keys", "Space"),
        ("keys", "/"), ("type", "line 3"),
        ("keys", "q"),
    ],
    "man": [
        ("type", "man ls"),
        ("keys", "Space"),
        ("keys", "q"),
    ],
    "top": [
        ("type", "top -d 60"),
        ("keys", "q"),
    ],
    "tmux": [
        ("type", "tmux -L {inner} -f /dev/null new-session"),
        ("type", "printf '\\e[1;32minner\\e[0m\\n'; ls --color=always /"),
        ("type", "exit"),
    ],
    "python": [
        ("type", "python3 -q"),
        ("type", "print('hi ' * 3); import sys; print(sys.version_info[:2])"),
        ("type", "exit()"),
    ],
    "cjk": [
        ("type", "printf '中文字符 テスト 한국어 😀👍 e\\xcc\\x81 café ⚡\\n'"),
        ("type", "printf 'x%.0s' $(seq 79); printf '中文\\n'"),
        ("type", "printf '\\e(0lqqqk\\e(B\\n\\e(0x\\e(B  \\e(0x\\e(B\\n\\e(0mqqqj\\e(B\\n'"),
    ],
    "sequences": [  # the sequence families of test_term.py, against a real terminal
        ("type", "printf 'abcdef\\e[2G\\e[4hXY\\e[4l\\e[3C\\e[2P\\e[1@|\\e[3b\\n'"),
        ("type", "printf '\\e[5;10r\\e[?6h\\e[1;1HR1\\e[20;1HR2\\n\\n\\eM\\eMup\\e[?6l"
                 "\\e[r\\e[12;1H'"),
        # a glyph over a wide glyph's left half (tmux 3.3 leaves stale halves when a right
        # half is overwritten or deleted, unlike xterm: the model follows xterm; see below)
        ("type", "printf '中文字\\e[3Gx\\e[7G e\\xcc\\x81 \\xf0\\x9f\\x98\\x80!\\n'"),
        ("type", "printf '\\e7\\e[1;70H\\e(0lqqk\\e(B\\e[1;31m\\e8saved\\e[m\\n'"),
        ("type", "printf '\\e[44mblue\\e[K\\e[0m\\n\\e[41m\\e[2X\\e[0mok\\e[3;4;9mdeco"
                 "\\e[m\\n'"),
        ("type", "printf 'l1\\nl2\\nl3\\e[2A\\e[L\\e[2S\\e[T\\e[M\\n\\n\\n'"),
        ("type", "printf '\\e[?47hALT\\e[?47l\\e[?1049h\\e[2Jalt\\e[?1049lback\\n'"),
        ("type", "printf '\\e[3g\\e[4G\\eH\\e[12G\\eH\\rA\\tB\\tC\\e[Z\\e[Zd\\t!\\n'"),
        ("type", "printf '\\e[?7l%0100d\\e[?7h\\n\\e[1;1H\\e[2;3H\\e[K\\e[1J\\n'"),
    ],
}
SLOW = {"vim", "man", "tmux", "python", "top"}


def run_step(tmux: TmuxOracle, pane: str, step) -> None:
    kind, *args = step
    if kind == "type":
        tmux.type(pane, args[0])
    elif kind == "literal":
        tmux.send(pane, args[0], literal=True)
    else:
        tmux.send(pane, *args)


def _needs(name: str, installed) -> None:
    program = {"python": "python3", "cjk": "bash", "sequences": "bash"}.get(name, name)
    if name in installed:
        pytest.skip(installed[name])
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def _steps(name: str, tmux: TmuxOracle):
    inner = f"{tmux.socket}-inner"
    if name == "tmux":
        tmux.extra_sockets.append(inner)
    return [tuple(a.replace("{inner}", inner) for a in step) for step in CASES[name]]


def _cd(tmux: TmuxOracle, pane: str) -> None:
    tmux.type(pane, f"cd {shlex.quote(tmux.dir)}; clear")
    tmux.wait_quiet(pane)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CASES])
def test_model_matches_tmux(name, tmux, tmp_path, installed):
    """Every step of the program, through its exit: the model equals tmux's screen."""
    _needs(name, installed)
    sample_files(tmp_path)
    pane = shell_pane(tmux)
    check(tmux, pane, step="start")
    _cd(tmux, pane)
    for step in _steps(name, tmux):
        run_step(tmux, pane, step)
        check(tmux, pane, step=" ".join(step))


def _open_fifo(path: str, timeout: float = 10.0) -> int:
    """Open ``path`` for writing once pane B's reader has it open."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            time.sleep(0.01)


ROUND_TRIP = {"vim": 4, "less": 3, "tmux": 2, "bash": 4}  # steps before the serialization


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(name, tmux, tmp_path, installed):
    """Pane B shows only serialize() of A's model, then A's later output: both panes stay
    equal while the application runs and after it exits."""
    _needs(name, installed)
    sample_files(tmp_path)
    pane_a = shell_pane(tmux)
    _cd(tmux, pane_a)
    steps = _steps(name, tmux)
    cut = ROUND_TRIP[name]
    for step in steps[:cut]:
        run_step(tmux, pane_a, step)
        tmux.wait_quiet(pane_a)
    view_a = tmux.wait_quiet(pane_a)
    sent = tmux.raw(pane_a)
    term = model_of(sent, ROWS, COLS)
    if name != "bash":
        assert term.alt_screen, "the application should own the alternate screen here"
    fifo = os.path.join(str(tmp_path), "b.fifo")
    os.mkfifo(fifo)
    pane_b = tmux.new_pane("b", "sh -c " + shlex.quote(f"stty raw -echo; exec cat {fifo}"),
                           record=False)
    fd = _open_fifo(fifo)
    try:
        _write_all(fd, term.serialize(history_lines=100))
        view_b = tmux.wait_quiet(pane_b)
        diffs = compare_views(view_a, view_b, ROWS, COLS)
        assert not diffs, "while running:\n" + "\n".join(diffs)
        for step in steps[cut:]:
            run_step(tmux, pane_a, step)
            tmux.wait_quiet(pane_a)
        view_a = tmux.wait_quiet(pane_a)
        _write_all(fd, tmux.raw(pane_a)[len(sent):])
        view_b = tmux.wait_quiet(pane_b)
        diffs = compare_views(view_a, view_b, ROWS, COLS)
        assert not diffs, "after the exit:\n" + "\n".join(diffs)
    finally:
        os.close(fd)
