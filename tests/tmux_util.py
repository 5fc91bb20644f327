"""tmux as a terminal oracle for moshpit_term's screen model (tests and bench).

Why: tmux is a real, widely used terminal emulator that can run programs in detached panes,
record the bytes they write (pipe-pane) and report what it shows (capture-pane, and format
variables for the cursor and modes). Feeding the recording to ``moshpit_term.Terminal`` and
comparing with tmux's view tells whether the model keeps what a terminal keeps.

    with TmuxOracle(tmp_path, rows=24, cols=80) as tmux:
        pane = tmux.new_pane("a", "bash --norc")
        tmux.send(pane, "ls --color=always", "Enter")
        tmux.wait_quiet(pane)
        assert compare(model_of(tmux.raw(pane), 24, 80), tmux.view(pane)) == []

Each oracle runs its own tmux server on a private socket, killed (by its PID if need be) at
close; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import time
from typing import Dict, List, NamedTuple, Optional

from proc_util import kill_pid, pid_alive

import moshpit_term as mterm

TMUX = shutil.which("tmux") or "/usr/bin/tmux"
COMMAND_TIMEOUT_SECS = 10
# How often a test waiting on a pane looks at it (each look starts a tmux client). In
# wait_quiet a quiet time counts from the first look that saw the last change, so it is
# never shorter than asked.
PANE_POLL_SECS = 0.1
# Format variables compared between tmux and the model (or two tmux panes).
FLAG_NAMES = ("cursor_x", "cursor_y", "alternate_on", "keypad_cursor_flag", "keypad_flag",
              "mouse_standard_flag", "mouse_button_flag", "mouse_all_flag", "mouse_sgr_flag",
              "mouse_utf8_flag", "insert_flag", "wrap_flag", "origin_flag", "cursor_flag",
              "scroll_region_upper", "scroll_region_lower", "pane_title")
ENV = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
ENV.pop("TMUX", None)
# A coloured bash prompt, the kind a real user has.
COLOUR_PS1 = r"\[\e[1;32m\]\u@host\[\e[0m\]:\[\e[1;34m\]\w\[\e[0m\]\$ "


class View(NamedTuple):
    """What tmux shows for a pane: plain rows, rows with SGR (capture-pane -e), flags."""
    plain: List[str]
    escaped: List[str]
    flags: Dict[str, str]


class TmuxOracle:
    """A private tmux server whose panes run programs with their output recorded."""

    def __init__(self, directory, rows: int = 24, cols: int = 80) -> None:
        self.dir = str(directory)
        self.rows, self.cols = rows, cols
        self.socket = f"mpterm-{os.getpid()}-{secrets.token_hex(4)}"
        self.server_pid: Optional[int] = None
        self.extra_sockets: List[str] = []  # nested tmux servers a test started

    def __enter__(self) -> TmuxOracle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tmux(self, *args: str, socket: Optional[str] = None, check: bool = True) -> str:
        done = subprocess.run([TMUX, "-L", socket or self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, env=ENV,
                              timeout=COMMAND_TIMEOUT_SECS, check=False)
        if check and done.returncode:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def new_pane(self, name: str, command: str, record: bool = True) -> str:
        """Start ``command`` (a shell line) in a new session ``name``; its output is appended
        to ``<dir>/<name>.raw`` from its very first byte. Returns the tmux target."""
        gate = os.path.join(self.dir, name + ".go")
        wait = f"while [ ! -e {shlex.quote(gate)} ]; do sleep 0.02; done; exec {command}"
        new = ["new-session", "-d", "-s", name, "-x", str(self.cols), "-y", str(self.rows),
               "sh", "-c", wait]
        if self.server_pid is None:
            self.tmux("start-server", ";", "set", "-g", "status", "off", ";",
                      "set", "-g", "default-terminal", "xterm-256color", ";",
                      "set", "-g", "remain-on-exit", "on", ";",
                      "set", "-g", "history-limit", "200", ";", *new)
            self.server_pid = int(self.tmux("display", "-p", "#{pid}").strip())
        else:
            self.tmux(*new)
        if record:
            raw = os.path.join(self.dir, name + ".raw")
            open(raw, "wb").close()
            self.tmux("pipe-pane", "-o", "-t", name, f"cat >> {shlex.quote(raw)}")
        open(gate, "w").close()
        return name

    def send(self, target: str, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", target, *(["-l"] if literal else []), *keys)

    def type(self, target: str, text: str) -> None:
        """Type ``text`` literally, then Enter."""
        self.send(target, text, literal=True)
        self.send(target, "Enter")

    def raw(self, target: str) -> bytes:
        with open(os.path.join(self.dir, target + ".raw"), "rb") as f:
            return f.read()

    def view(self, target: str) -> View:
        # One tmux client for the three queries (wait_quiet asks many times a second, and
        # each tmux start costs a few ms of CPU): their outputs are told apart by a line no
        # pane can have printed.
        separator = "view-separator-" + secrets.token_hex(8)
        out = self.tmux("capture-pane", "-p", "-t", target, ";",
                        "display", "-p", separator, ";",
                        "capture-pane", "-p", "-e", "-t", target, ";",
                        "display", "-p", separator, ";",
                        "display", "-p", "-t", target,
                        "\t".join("#{" + name + "}" for name in FLAG_NAMES))
        plain, escaped, values = out.split(separator + "\n")
        return View(plain.split("\n")[:self.rows], escaped.split("\n")[:self.rows],
                    dict(zip(FLAG_NAMES, values.rstrip("\n").split("\t"))))

    def wait_quiet(self, target: str, quiet_secs: float = 0.5, timeout: float = 20.0,
                   contains: Optional[str] = None) -> View:
        """Wait until the pane's recording and screen stop changing for ``quiet_secs`` (and
        show ``contains``, if given); return the view then."""
        deadline = time.monotonic() + timeout
        last = None
        since = time.monotonic()
        while True:
            view = self.view(target)
            state = (len(self.raw(target)) if os.path.exists(
                os.path.join(self.dir, target + ".raw")) else 0, view)
            now = time.monotonic()
            if state != last:
                last, since = state, now
            elif now - since >= quiet_secs and (
                    contains is None or any(contains in row for row in view.plain)):
                return view
            if now > deadline:
                raise TimeoutError(f"pane {target} did not settle (waiting for {contains!r}); "
                                   f"screen:\n" + "\n".join(view.plain))
            time.sleep(PANE_POLL_SECS)

    def close(self) -> None:
        for socket in self.extra_sockets:
            self.tmux("kill-server", socket=socket, check=False)
        if self.server_pid is not None:
            self.tmux("kill-server", check=False)
            if pid_alive(self.server_pid):
                kill_pid(self.server_pid)
            self.server_pid = None


def model_of(data: bytes, rows: int, cols: int) -> mterm.Terminal:
    term = mterm.Terminal(rows, cols)
    term.feed(data)
    return term


def model_flags(term: mterm.Terminal, title_default: str) -> Dict[str, str]:
    """The model's state in tmux's format variables (pending wrap: tmux puts the cursor one
    past the last column)."""
    row, col, pending = term.cursor
    values = {
        "cursor_x": term.cols if pending else col, "cursor_y": row,
        "alternate_on": term.alt_screen, "keypad_cursor_flag": term.cursor_keys_app,
        "keypad_flag": term.keypad_app, "mouse_standard_flag": term.mouse_tracking == 1000,
        "mouse_button_flag": term.mouse_tracking == 1002,
        "mouse_all_flag": term.mouse_tracking == 1003,
        "mouse_sgr_flag": term.mouse_encoding == 1006,
        "mouse_utf8_flag": term.mouse_encoding == 1005, "insert_flag": term.insert_mode,
        "wrap_flag": term.autowrap, "origin_flag": term.origin_mode,
        "cursor_flag": term.cursor_visible, "scroll_region_upper": term.top,
        "scroll_region_lower": term.bottom, "pane_title": term.title or title_default}
    return {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in values.items()}


def _cells(term: mterm.Terminal, row: int) -> List[tuple]:
    """(glyph, SGR) per cell of a row, trailing spaces dropped whatever their colour (tmux's
    capture-pane drops them too)."""
    cells = [(term.cell(row, col).char, term.cell(row, col).sgr) for col in range(term.cols)]
    while cells and cells[-1][0] == " ":
        cells.pop()
    return cells


def screen_of_capture(escaped: List[str], rows: int, cols: int) -> mterm.Terminal:
    """capture-pane -e output read back by a fresh model: tmux writes DEC graphics cells
    with SO/SI, taking G1 as the graphics set, so G1 is designated first."""
    term = mterm.Terminal(rows, cols)
    term.feed(b"\x1b)0" + "\r\n".join(escaped).encode())
    return term


_UNGRAPHIC = {glyph: chr(code) for code, glyph in mterm._DEC_GRAPHICS.items()}


def compare(term: mterm.Terminal, view: View) -> List[str]:
    """Differences between the model and tmux's view of the pane, one line each."""
    diffs = []
    shown = screen_of_capture(view.escaped, term.rows, term.cols)
    for row in range(term.rows):
        ours, theirs = _cells(term, row), _cells(shown, row)
        if ours != theirs:
            diffs.append(f"row {row} cells: model {ours!r}\n      tmux  {theirs!r}")
        # capture-pane -p shows DEC graphics cells as the ASCII letters that drew them
        text = term.line_text(row)
        plain = view.plain[row].rstrip(" ") if row < len(view.plain) else ""
        if len(text) != len(plain) or any(
                ours != theirs and _UNGRAPHIC.get(ours) != theirs
                for ours, theirs in zip(text, plain)):
            diffs.append(f"row {row} text: model {text!r} tmux {plain!r}")
    expected = model_flags(term, view.flags["pane_title"])
    for name in FLAG_NAMES:
        if expected[name] != view.flags[name]:
            diffs.append(f"{name}: model {expected[name]} tmux {view.flags[name]}")
    return diffs


def compare_views(a: View, b: View, rows: int, cols: int) -> List[str]:
    """Differences between two tmux panes (cells with attributes, text and flags)."""
    diffs = []
    sa, sb = screen_of_capture(a.escaped, rows, cols), screen_of_capture(b.escaped, rows, cols)
    for row in range(rows):
        if _cells(sa, row) != _cells(sb, row):
            diffs.append(f"row {row}: A {_cells(sa, row)!r}\n        B {_cells(sb, row)!r}")
    for name in FLAG_NAMES:
        if a.flags[name] != b.flags[name]:
            diffs.append(f"{name}: A {a.flags[name]} B {b.flags[name]}")
    return diffs
