"""moshpit local echo prediction: keystrokes drawn at once, as an overlay the server's bytes
never see.

Why: on a slow link a keystroke's echo takes a round trip; mosh shows most keystrokes at
once by predicting them.  moshpit writes the server's byte stream to the terminal as it is
(native scrollback), so predictions cannot live in a framebuffer the way mosh's do.  They
are an overlay instead, kept honest by the client's screen model (moshpit_term.Terminal,
fed with exactly the server's bytes written to stdout):

* a prediction is a glyph drawn over one cell (overwrite, never insert) and a predicted
  cursor; never in the last column and never anything that could scroll;
* before each server chunk is written, ``before_output()`` rewrites every overlay cell from
  the model and puts the model's cursor and pen back: whenever a server byte reaches the
  terminal, the terminal equals the model, so no escape sequence of the application
  (insert/delete characters, scrolling...) can carry our glyphs anywhere;
* after the chunk is fed to the model, ``after_output(now)`` judges the predictions whose
  key the server has echoed (ECHO_ACK: the output so far holds that key's echo) against
  the model's cells -- confirmed, kept pending, or dropped -- and draws what remains.

Mosh's rules (frontend/terminaloverlay.cc), kept: epochs (after Enter, Tab, Ctrl-C,
Escape, up/down arrows or any key not understood, predictions are tentative: nothing is
shown until one key of the new epoch has been confirmed by its echo; a wrong tentative
guess drops its epoch, a wrong shown one drops everything), the adaptive triggers (shown
when the send interval, ceil(SRTT/2) clamped to [20, 250] ms, exceeds 30 ms or a
prediction is overdue by 250 ms -- here by max(2 SRTT, SRTT + 50 ms) if that is less, so
that the retransmissions of a lossy fast link count as the glitches they are; underlined
when it exceeds 80 ms or a prediction is 5 s overdue) and the paste rule (a read of more
than 100 bytes is never predicted).

Added here, because a byte stream is less forgiving than a framebuffer: nothing is
predicted while the PTY hides input (TTY_MODE with icanon on and echo off: ``read -s``,
sudo, ssh passwords), inside a bracketed paste, on the alternate screen (unless
``experimental``), while the model is unsure (unknown sequence seen, a sequence half-read,
pending wrap, insert or origin mode, a non-ASCII G0 charset), next to glyphs whose width
the terminal may measure differently (wide, ambiguous, combining), or by backspace or left
arrow past where the line's input began.  After a key whose effect is unknown, the cursor
is re-read from the model only once the model holds the echo of every earlier key.  We
never save or restore the cursor (ESC 7 / CSI s belong to the application): every write
ends by moving to the model's cursor with the model's pen.

API (sans-IO: bytes in, bytes to write out, time passed in)::

    engine = Predictor(term, mode="adaptive")
    out += engine.keys(data, input_offset, now)    # after sending them
    engine.echo_acked(offset); engine.tty_mode(mode); engine.set_srtt(secs)
    out += engine.before_output()                  # before server bytes
    out += data; term.feed(data)
    out += engine.after_output(now)                # after them (also after an ack alone)
    out += engine.tick(now)                        # at next_deadline()
    out += engine.reset()                          # resize, repaint, reattach, flood
"""

from __future__ import annotations

import codecs
import math
import unicodedata
from typing import Dict, List, NamedTuple, Optional, Tuple

from moshpit import PREDICT_MODES
from moshpit_term import Terminal, char_width

__all__ = ["PREDICT_MODES", "Predictor", "KeyParser", "send_interval_ms"]

PASTE_BYTES = 100  # a read longer than this is a paste: never predicted (mosh's rule)
# Mosh's adaptive thresholds, against the send interval (not the SRTT).
SEND_INTERVAL_MIN_MS, SEND_INTERVAL_MAX_MS = 20, 250
SRTT_TRIGGER_HIGH_MS, SRTT_TRIGGER_LOW_MS = 30, 20
FLAG_TRIGGER_HIGH_MS, FLAG_TRIGGER_LOW_MS = 80, 50
GLITCH_THRESHOLD_SECS = 0.25  # a prediction pending this long shows predictions...
# ...or, on a fast link, this much longer than the round trip (at least twice it): a lost
# packet's echo then counts as a glitch as a 250 ms wait does on mosh's slower transport.
GLITCH_MARGIN_SECS = 0.05
GLITCH_FLAG_THRESHOLD_SECS = 5.0  # ... this long underlines them too
GLITCH_REPAIR_COUNT = 10  # quick confirmations that take the glitch trigger away
GLITCH_REPAIR_MININTERVAL_SECS = 0.15
TICK_SECS = 0.05  # timer while predictions are pending (the glitch triggers)

CSI = "\x1b["


def send_interval_ms(srtt_secs: float) -> int:
    """Mosh's send interval for an SRTT: ceil(SRTT / 2), clamped to [20, 250] ms."""
    return min(max(math.ceil(srtt_secs * 1000 / 2), SEND_INTERVAL_MIN_MS), SEND_INTERVAL_MAX_MS)


def safe_glyph(ch: str) -> bool:
    """One column wide by every terminal's measure: ASCII, or a letter, digit, punctuation
    or symbol that is not wide, ambiguous or combining."""
    if len(ch) != 1:
        return False
    if " " <= ch <= "~":
        return True
    return (ch.isprintable() and char_width(ch) == 1
            and unicodedata.east_asian_width(ch) in ("N", "Na", "H")
            and unicodedata.category(ch)[0] in "LNPS")


class Key(NamedTuple):
    """One keystroke: ``kind`` is "char" (``char`` set), "erase" (DEL or the tty's erase
    character), "left", "right", "paste" (bracketed paste start/end) or "other"."""
    kind: str
    char: str = ""


class KeyParser:
    """Keystrokes out of the input bytes, across reads: UTF-8 characters, CSI and SS3
    sequences (arrows) whole. A lone ESC at the end of a read is the Escape key."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # an escape sequence cut by the end of a read
        self.erase = "\x7f"

    def feed(self, data: bytes) -> List[Key]:
        text = self._pending + self._decoder.decode(data)
        self._pending = ""
        keys, pos, end = [], 0, len(text)
        while pos < end:
            ch = text[pos]
            if ch == "\x1b":
                taken = self._escape(text, pos, keys)
                if taken is None:
                    self._pending = text[pos:]
                    break
                pos = taken
                continue
            pos += 1
            if ch == "\x7f" or ch == self.erase:
                keys.append(Key("erase"))
            elif ch >= " " and ch.isprintable():
                keys.append(Key("char", ch))
            else:
                keys.append(Key("other"))
        return keys

    @staticmethod
    def _escape(text: str, pos: int, keys: List[Key]) -> Optional[int]:
        """Parse the escape sequence at ``pos``; None if it is cut by the end of the text
        (a lone ESC there is the Escape key, taken at once)."""
        end = len(text)
        if pos + 1 >= end:
            keys.append(Key("other"))
            return end
        intro = text[pos + 1]
        if intro == "O":  # SS3: cursor keys in application mode, F1-F4
            if pos + 2 >= end:
                return None
            final = text[pos + 2]
            keys.append(Key({"C": "right", "D": "left"}.get(final, "other")))
            return pos + 3
        if intro != "[":
            keys.append(Key("other"))  # Alt-key, or ESC ESC
            return pos + 2
        j = pos + 2
        while j < end and not "\x40" <= text[j] <= "\x7e":
            if j - pos > 32 or text[j] < " ":  # not a key: give up on it
                keys.append(Key("other"))
                return j
            j += 1
        if j >= end:
            return None
        params, final = text[pos + 2:j], text[j]
        if final == "~" and params in ("200", "201"):
            keys.append(Key("paste", params))
        elif not params and final in "CD":
            keys.append(Key("right" if final == "C" else "left"))
        else:
            keys.append(Key("other"))
        return j + 1


class _Cell(NamedTuple):
    """A predicted glyph: where, what was there before, and when it is judged."""
    glyph: str
    originals: Tuple[str, ...]
    epoch: int
    offset: int  # judged once the echo of input up to here is in the model
    time: float


class _Cursor(NamedTuple):
    row: int
    col: int
    epoch: int
    offset: int


class Predictor:
    """The prediction engine for one terminal model (see the module docstring)."""

    def __init__(self, term: Terminal, mode: str = "adaptive") -> None:
        if mode not in PREDICT_MODES:
            raise ValueError(f"prediction mode {mode!r} is not one of {', '.join(PREDICT_MODES)}")
        self.term = term
        self.mode = mode
        self._parser = KeyParser()
        self._cells: Dict[Tuple[int, int], _Cell] = {}
        self._cursors: List[_Cursor] = []
        self._cursor: Optional[Tuple[int, int]] = None  # predicted cursor; None: unknown
        self._floor = 0  # backspace/left arrow are not predicted left of this column
        self._epoch, self._confirmed = 1, 0
        self._sent = 0  # input offset after the latest key
        self._acked = 0  # input offset whose echo the model holds
        self._hidden = False  # the PTY hides input (icanon, -echo)
        self._in_paste = False
        self._srtt = 1.0  # seconds; mosh starts from a 1 s SRTT
        self._send_interval = send_interval_ms(self._srtt)
        # Mosh's first judgement runs on that 1 s SRTT and raises the SRTT trigger; its
        # hysteresis then keeps predictions shown on any path whose send interval stays
        # above 20 ms (a 40 ms RTT) and takes them away on a faster one once none pends.
        self._srtt_trigger = self._flagging = True
        self._glitch = 0
        self._last_quick = float("-inf")
        self._screen_key = self._screen_state()
        self._shown: Dict[Tuple[int, int], bytes] = {}  # cells drawn over the model
        self._shown_cursor: Optional[Tuple[int, int]] = None  # where we moved the cursor

    # -- inputs ------------------------------------------------------------------------

    def keys(self, data: bytes, input_offset: int, now: float) -> bytes:
        """Keystrokes just sent (``input_offset``: the input stream's offset after them):
        predict them; returns the bytes drawing the overlay."""
        before, self._sent = self._sent, input_offset
        keys = self._parser.feed(data)
        if self.mode == "never":
            return b""
        if len(data) > PASTE_BYTES:
            self._lose_track()
            return self._sync()
        for key in keys:
            if key.kind == "paste":
                self._in_paste = key.char == "200"
                self._lose_track()
            elif not self._may_predict() or (self._cursor is None
                                             and not self._seed(before)):
                self._lose_track()
            else:
                self._predict(key, input_offset, now)
            if self._cursor is None:  # the rest of this read waits for this key's echo
                before = input_offset
        return self._sync()

    def echo_acked(self, input_offset: int) -> None:
        """The model now holds the echo of input up to ``input_offset`` (apply with
        ``after_output``)."""
        self._acked = max(self._acked, input_offset)

    def tty_mode(self, mode) -> None:
        """The PTY's modes (moshpit_session.TtyMode): input is hidden while canonical mode
        is on and echo off (a password prompt)."""
        self._hidden = mode.icanon and not mode.echo
        self._parser.erase = chr(mode.erase) if mode.erase else "\x7f"
        if self._hidden:
            self._lose_track()

    def set_srtt(self, srtt_secs: float) -> None:
        self._srtt = srtt_secs
        self._send_interval = send_interval_ms(srtt_secs)

    def _glitch_threshold(self) -> float:
        """How long a prediction may be pending before it counts as a glitch: mosh's 250
        ms, or less on a fast link (max(2 SRTT, SRTT + 50 ms)), where a lost packet's
        retransmission is the glitch the user feels."""
        return min(GLITCH_THRESHOLD_SECS, max(2 * self._srtt, self._srtt + GLITCH_MARGIN_SECS))

    # -- output ------------------------------------------------------------------------

    def before_output(self) -> bytes:
        """Bytes that take every overlay away (each cell rewritten from the model, then
        the model's cursor and pen): write them before any server byte."""
        if not self._shown and self._shown_cursor is None:
            return b""
        out = [self.term.render_cell(row, col) for row, col in self._shown]
        out.append(self.term.cursor_sequence())
        self._shown, self._shown_cursor = {}, None
        return b"".join(out)

    def after_output(self, now: float) -> bytes:
        """The model has taken the server's bytes (or an echo ack came): judge the
        predictions that are due, then draw what remains."""
        if self._screen_state() != self._screen_key:
            self._screen_key = self._screen_state()
            self._reset()  # scrolled, switched screens or resized: rows moved under us
        else:
            self._judge(now)
        return self._sync()

    def idle(self) -> bool:
        """Nothing predicted, tracked or drawn: until the next ``keys``, the model's state
        changes nothing here but the epoch (a screen that moved starts a new one), so the
        caller may feed it late, and then calls ``after_output`` once."""
        return (not self._cells and not self._cursors and self._cursor is None
                and not self._shown and self._shown_cursor is None)

    def tick(self, now: float) -> bytes:
        """The timer (next_deadline): overdue predictions raise the glitch trigger."""
        self._judge(now)
        return self._sync()

    def next_deadline(self, now: float) -> Optional[float]:
        return now + TICK_SECS if self._cells and self.mode != "never" else None

    def reset(self) -> bytes:
        """Forget every prediction (resize, repaint, reattach, flood) and take the overlay
        away; the model is trusted again (its ``uncertain`` flag cleared)."""
        out = self.before_output()
        self._reset()
        self.term.uncertain = False
        self._screen_key = self._screen_state()
        return out

    @property
    def showing(self) -> bool:
        """Predictions are drawn now (mode and triggers)."""
        if self.mode == "never":
            return False
        return self.mode != "adaptive" or self._srtt_trigger or self._glitch > 0

    # -- predicting --------------------------------------------------------------------

    def _may_predict(self) -> bool:
        term = self.term
        return not (self._hidden or self._in_paste or term.uncertain
                    or not term.in_ground_state or term.cursor[2] or term.insert_mode
                    or term.origin_mode or term.g0_charset != "B"
                    or (term.alt_screen and self.mode != "experimental"))

    def _seed(self, before: int) -> bool:
        """Take the cursor from the model, if it holds the echo of every earlier key."""
        if self._acked < before:
            return False
        row, col, _wrap = self.term.cursor
        self._cursor, self._floor = (row, col), col
        return True

    def _row_is_safe(self, row: int, col: int) -> bool:
        """Every glyph up to ``col`` is one column wide by any terminal's measure (else
        our column numbers may not be the terminal's)."""
        text = self.term.line_text(row)[:col + 1]
        if text.isascii() and len(text) == min(col + 1, len(text)):
            return True  # the common case, at the cost of one join
        cell = self.term.cell
        return all(safe_glyph(cell(row, c).char) for c in range(col + 1))

    def _predict(self, key: Key, offset: int, now: float) -> None:
        row, col = self._cursor
        cols = self.term.cols
        if self.mode == "experimental":
            self._epoch = self._confirmed  # mosh: experimental is never tentative
        if key.kind == "char":
            if not safe_glyph(key.char) or col >= cols - 2 or not self._row_is_safe(row, col):
                self._lose_track()  # never the last column: the cursor would wrap
                return
            self._cell(row, col, key.char, offset, now)
            col += 1
        elif key.kind == "erase":
            if col - 1 < self._floor or not self._row_is_safe(row, col):
                self._lose_track()
                return
            col -= 1
            self._cell(row, col, " ", offset, now)
        elif key.kind == "left":
            if col - 1 < self._floor:
                self._lose_track()
                return
            col -= 1
        elif key.kind == "right" and col + 1 <= cols - 2:
            col += 1
        else:  # Enter, Tab, Ctrl-C, Escape, up/down, anything else: a new epoch
            self._lose_track()
            return
        self._cursor = (row, col)
        self._cursors.append(_Cursor(row, col, self._epoch, offset))

    def _cell(self, row: int, col: int, glyph: str, offset: int, now: float) -> None:
        before = self._cells.get((row, col))
        originals = before.originals if before else (self.term.cell(row, col).char,)
        if before:
            originals += (before.glyph,)
        self._cells[(row, col)] = _Cell(glyph, originals, self._epoch, offset, now)

    def _lose_track(self) -> None:
        """A key whose effect is unknown: a new (tentative) epoch, the cursor unknown."""
        self._epoch += 1
        self._cursor = None
        self._cursors.clear()

    def _reset(self) -> None:
        self._cells.clear()
        self._lose_track()

    def _kill_epoch(self, epoch: int) -> None:
        self._cells = {pos: c for pos, c in self._cells.items() if c.epoch < epoch}
        self._lose_track()

    # -- judging -----------------------------------------------------------------------

    def _judge(self, now: float) -> None:
        for pos, cell in sorted(self._cells.items(), key=lambda item: item[1].offset):
            if self._cells.get(pos) is not cell:
                continue  # dropped with its epoch meanwhile
            if cell.offset > self._acked:
                overdue = now - cell.time
                if overdue >= GLITCH_FLAG_THRESHOLD_SECS:
                    self._glitch = GLITCH_REPAIR_COUNT * 2
                elif (overdue >= self._glitch_threshold()
                      and self._glitch < GLITCH_REPAIR_COUNT):
                    self._glitch = GLITCH_REPAIR_COUNT
                continue
            del self._cells[pos]
            actual = self.term.cell(*pos).char
            if cell.glyph == " ":
                continue  # a blank is too easy to match: no credit, never wrong
            if actual == cell.glyph:
                if cell.glyph not in cell.originals:
                    self._confirm(cell, now)
            elif cell.epoch > self._confirmed:
                self._kill_epoch(cell.epoch)  # never shown: only its epoch goes
            elif self.mode != "experimental":
                self._reset()
                return
        self._judge_cursor()

    def _confirm(self, cell: _Cell, now: float) -> None:
        self._confirmed = max(self._confirmed, cell.epoch)
        if (now - cell.time < self._glitch_threshold() and self._glitch > 0
                and now - self._last_quick >= GLITCH_REPAIR_MININTERVAL_SECS):
            self._glitch -= 1
            self._last_quick = now

    def _judge_cursor(self) -> None:
        """The newest predicted cursor, once every key is echoed (an older one would race
        with the echo of later keys already in the output): where the model's is?"""
        if not self._cursors or self._cursors[-1].offset > self._acked:
            return
        newest = self._cursors[-1]
        self._cursors.clear()
        row, col, wrap = self.term.cursor
        if (newest.row, newest.col) != (row, col) or wrap:
            if newest.epoch > self._confirmed:
                self._kill_epoch(newest.epoch)
            else:
                self._reset()

    def _update_triggers(self) -> None:
        """Mosh's hysteresis on the send interval."""
        interval = self._send_interval
        if interval > SRTT_TRIGGER_HIGH_MS:
            self._srtt_trigger = True
        elif interval <= SRTT_TRIGGER_LOW_MS and not self._cells:
            self._srtt_trigger = False
        if interval > FLAG_TRIGGER_HIGH_MS:
            self._flagging = True
        elif interval <= FLAG_TRIGGER_LOW_MS:
            self._flagging = False

    # -- drawing -----------------------------------------------------------------------

    def _screen_state(self) -> tuple:
        term = self.term
        return term.scroll_count, term.alt_screen, term.rows, term.cols

    def _wanted(self) -> Tuple[Dict[Tuple[int, int], bytes], Optional[Tuple[int, int]]]:
        """The overlay cells (with their bytes) and the cursor position to show now."""
        self._update_triggers()
        if not self.showing or not self.term.in_ground_state:
            return {}, None
        underline = ";4" if self._flagging or self._glitch > GLITCH_REPAIR_COUNT else ""
        term, cells = self.term, {}
        for (row, col), cell in self._cells.items():
            if cell.epoch > self._confirmed:
                continue
            current = term.cell(row, col)
            if cell.glyph == " " and current.char == " ":
                continue  # blank over blank: nothing to show
            pen = term.cell(row, col - 1).sgr if col else current.sgr
            cells[(row, col)] = (f"{CSI}{row + 1};{col + 1}H{CSI}0{';' if pen else ''}{pen}"
                                 f"{underline}m{cell.glyph}").encode()
        cursor = None
        if self._cursors and self._cursors[-1].epoch <= self._confirmed:
            cursor = self._cursor
        if cursor == term.cursor[:2]:
            cursor = None
        return cells, cursor

    def _sync(self) -> bytes:
        """Bytes turning the overlay on the terminal into the one wanted now."""
        cells, cursor = self._wanted()
        if cells == self._shown and cursor == self._shown_cursor:
            return b""
        term = self.term
        out = [term.render_cell(row, col) for row, col in self._shown if (row, col) not in cells]
        out += [seq for pos, seq in cells.items() if self._shown.get(pos) != seq]
        out.append(term.cursor_sequence())
        if cursor is not None:
            out.append(f"{CSI}{cursor[0] + 1};{cursor[1] + 1}H".encode())
        self._shown, self._shown_cursor = cells, cursor
        return b"".join(out)
