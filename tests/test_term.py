"""moshpit_term: the screen model, sequence by sequence, plus its properties.

- Tables: bytes -> rows, attributes, cursor and modes, one case per sequence family.
- Chunking: the same stream fed whole, byte by byte or at random splits gives the same model.
- Fuzz: random bytes never raise or hang and keep the model's invariants.
- Round trip: serialize() fed to a fresh model gives the same screens, cursor and modes.
- Bounds: hostile streams (huge OSC, long CSI, huge counts, colour floods) cost bounded memory.
- The client helpers: reset_sequence, render_cell, cursor_sequence.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moshpit_term as mterm

pytestmark = pytest.mark.timeout(120)


def fed(data: bytes, rows: int = 5, cols: int = 10, **kwargs) -> mterm.Terminal:
    term = mterm.Terminal(rows, cols, **kwargs)
    term.feed(data)
    return term


def sgr_at(term: mterm.Terminal, row: int, col: int) -> str:
    return term.cell(row, col).sgr


# ---------------------------------------------------------------------------
# Tables: (bytes, expected rows (prefix), expected cursor (row, col, pending))
# ---------------------------------------------------------------------------

SCREEN_CASES = {
    "text and CRLF": (b"ab\r\ncd", ["ab", "cd"], (1, 2, False)),
    "pending wrap at the last column": (b"0123456789", ["0123456789"], (0, 9, True)),
    "the next glyph wraps": (b"0123456789x", ["0123456789", "x"], (1, 1, False)),
    "CR cancels the wrap": (b"0123456789\rX", ["X123456789"], (0, 1, False)),
    "BS leaves the last column (xterm)": (b"0123456789\bX", ["01234567X9"], (0, 9, False)),
    "no autowrap: the last column is overwritten":
        (b"\x1b[?7l0123456789abc", ["012345678c"], (0, 9, False)),
    "LF scrolls at the bottom": (b"1\r\n2\r\n3\r\n4\r\n5\r\n6", ["2", "3", "4", "5", "6"],
                                 (4, 1, False)),
    "tab stops every 8": (b"a\tb", ["a       b"], (0, 9, False)),
    "HTS, TBC and CBT": (b"\x1b[3g\x1b[4G\x1bH\r\tx\x1b[Zy", ["   y"], (0, 4, False)),
    "CHT to the last column": (b"\x1b[5Ix", ["         x"], (0, 9, True)),
    "CUP, clamped": (b"\x1b[3;4Hx\x1b[99;99Hy", ["", "", "   x", "", "         y"],
                     (4, 9, True)),
    "CUU CUD CUF CUB": (b"\x1b[3;3H\x1b[2A\x1b[4C\x1b[1B\x1b[2Dx", ["", "    x"],
                        (1, 5, False)),
    "CNL CPL CHA VPA HPR VPR": (b"\x1b[2Ea\x1b[1Fb\x1b[5Gc\x1b[4dd\x1b[2ae\x1b[1ef",
                                ["", "b   c", "a", "     d  e", "         f"], (4, 9, True)),
    "EL 0/1/2": (b"abcdef\x1b[3G\x1b[K\r\nabcdef\x1b[3G\x1b[1K\r\nabc\x1b[2K",
                 ["ab", "   def", ""], (2, 3, False)),
    "ED 0": (b"aaa\r\nbbb\r\nccc\x1b[2;2H\x1b[J", ["aaa", "b"], (1, 1, False)),
    "ED 1": (b"aaa\r\nbbb\r\nccc\x1b[2;2H\x1b[1J", ["", "  b", "ccc"], (1, 1, False)),
    "ED 2 keeps the cursor": (b"aaa\r\nbbb\x1b[2J", ["", ""], (1, 3, False)),
    "ECH": (b"abcdef\x1b[2G\x1b[3X", ["a   ef"], (0, 1, False)),
    "ICH": (b"abcdef\x1b[2G\x1b[2@", ["a  bcdef"], (0, 1, False)),
    "ICH pushes cells off the row": (b"0123456789\x1b[1G\x1b[3@", ["   0123456"], (0, 0, False)),
    "DCH": (b"abcdef\x1b[2G\x1b[2P", ["adef"], (0, 1, False)),
    "IL inside the region": (b"1\r\n2\r\n3\x1b[2;1H\x1b[L", ["1", "", "2", "3"], (1, 0, False)),
    "DL": (b"1\r\n2\r\n3\x1b[1;1H\x1b[2M", ["3"], (0, 0, False)),
    "SU and SD": (b"1\r\n2\r\n3\x1b[S\x1b[2T", ["", "", "2", "3"], (2, 1, False)),
    "REP": (b"ab\x1b[3b", ["abbbb"], (0, 5, False)),
    "IRM inserts": (b"abc\x1b[2G\x1b[4hXY", ["aXYbc"], (0, 3, False)),
    "LNM: LF also returns": (b"\x1b[20hab\ncd", ["ab", "cd"], (1, 2, False)),
    "DECSTBM homes; LF scrolls the region only":
        (b"1\r\n2\r\n3\r\n4\r\n5\x1b[2;4r\x1b[4;1H\nx", ["1", "3", "4", "x", "5"],
         (3, 1, False)),
    "RI at the top margin scrolls down": (b"1\r\n2\r\n3\x1b[2;3r\x1b[2;1H\x1bMx",
                                          ["1", "x", "2", "", ""], (1, 1, False)),
    "IND and NEL": (b"ab\x1bDc\x1bEd", ["ab", "  c", "d"], (2, 1, False)),
    "origin mode: CUP is relative to the region and clamped":
        (b"\x1b[2;3r\x1b[?6h\x1b[1;1Ha\x1b[9;1Hb", ["", "a", "b"], (2, 1, False)),
    "CUU stops at the top margin": (b"\x1b[3;5r\x1b[4;1H\x1b[9Ax", ["", "", "x"], (2, 1, False)),
    "DECALN": (b"\x1b#8", ["EEEEEEEEEE"] * 5, (0, 0, False)),
    "wide glyphs take two cells": ("中文x".encode(), ["中文x"], (0, 5, False)),
    "a wide glyph at the last column wraps early": ("123456789中".encode(),
                                                    ["123456789", "中"], (1, 2, False)),
    "overwriting half of a wide glyph blanks the other half":
        ("中文\x1b[2Gx\x1b[4Gy".encode(), [" x y"], (0, 4, False)),
    "combining marks join the previous cell": ("e\u0301x".encode(), ["e\u0301x"],
                                               (0, 2, False)),
    "combining after a wide glyph": ("中\u0301".encode(), ["中\u0301"], (0, 2, False)),
    "DEC graphics in G0": (b"\x1b(0lqk\x1b(Bq", ["\u250c\u2500\u2510q"], (0, 4, False)),
    "SO/SI with G1 graphics": (b"\x1b)0a\x0eq\x0fq", ["a\u2500q"], (0, 3, False)),
    "UK charset": (b"\x1b(A#", ["\u00a3"], (0, 1, False)),
    "single shift from G2": (b"\x1b*0\x1bNqq", ["\u2500q"], (0, 2, False)),
    "DECSC/DECRC": (b"ab\x1b7\x1b[4;4Hx\x1b8y", ["aby", "", "", "   x"], (0, 3, False)),
    "SCOSC/SCORC": (b"ab\x1b[s\x1b[4;4Hx\x1b[uy", ["aby", "", "", "   x"], (0, 3, False)),
    "RIS": (b"abc\x1b[?1049h\x1b[5;5Hx\x1bc", ["", ""], (0, 0, False)),
    "C0 controls inside a CSI act at once": (b"ab\x1b[2\r;3Hx", ["ab", "  x"], (1, 3, False)),
    "CAN cancels a sequence": (b"a\x1b[3\x18b", ["ab"], (0, 2, False)),
    "DEL and NUL are ignored": (b"a\x7f\x00b", ["ab"], (0, 2, False)),
}


@pytest.mark.parametrize("name", sorted(SCREEN_CASES))
def test_screen_table(name):
    data, rows, cursor = SCREEN_CASES[name]
    term = fed(data)
    assert term.display()[:len(rows)] == rows
    assert term.cursor == cursor


SGR_CASES = {
    "bold red": (b"\x1b[1;31mx", "1;31"),
    "bright colours": (b"\x1b[95;104mx", "95;104"),
    "256 colours": (b"\x1b[38;5;208;48;5;17mx", "38;5;208;48;5;17"),
    "truecolour": (b"\x1b[38;2;1;2;3mx", "38;2;1;2;3"),
    "colon forms": (b"\x1b[38:2::10:20:30;48:5:9mx", "38;2;10;20;30;48;5;9"),
    "colon truecolour without colour space": (b"\x1b[38:2:10:20:30mx", "38;2;10;20;30"),
    "underline styles": (b"\x1b[4:3mx", "4:3"),
    "double underline": (b"\x1b[21mx", "4:2"),
    "underline colour": (b"\x1b[4;58;5;9mx", "4;58;5;9"),
    "all flags": (b"\x1b[1;2;3;5;6;7;8;9;53mx", "1;2;3;5;6;7;8;9;53"),
    "resets 22-29": (b"\x1b[1;2;3;4;5;7;8;9m\x1b[22;23;24;25;27;28;29mx", ""),
    "39 and 49": (b"\x1b[31;41m\x1b[39;49mx", ""),
    "empty SGR resets": (b"\x1b[1m\x1b[mx", ""),
    "bad colour keeps the rest": (b"\x1b[38;5;999;1mx", "1"),
    "unknown numbers are skipped": (b"\x1b[11;1;73mx", "1"),
}


@pytest.mark.parametrize("name", sorted(SGR_CASES))
def test_sgr_table(name):
    data, sgr = SGR_CASES[name]
    assert sgr_at(fed(data), 0, 0) == sgr


def test_erase_uses_the_background_colour():
    term = fed(b"\x1b[1;44mab\x1b[K\x1b[2X")
    assert sgr_at(term, 0, 0) == "1;44"
    assert [sgr_at(term, 0, c) for c in (2, 3, 9)] == ["44"] * 3


MODE_CASES = {
    "DECCKM": (b"\x1b[?1h", "cursor_keys_app", True),
    "keypad": (b"\x1b=", "keypad_app", True),
    "keypad off": (b"\x1b=\x1b>", "keypad_app", False),
    "DECNKM": (b"\x1b[?66h", "keypad_app", True),
    "hidden cursor": (b"\x1b[?25l", "cursor_visible", False),
    "blink": (b"\x1b[?12h", "cursor_blink", True),
    "mouse button tracking": (b"\x1b[?1000h\x1b[?1002h", "mouse_tracking", 1002),
    "mouse off": (b"\x1b[?1003h\x1b[?1000l", "mouse_tracking", 0),
    "SGR mouse": (b"\x1b[?1006h", "mouse_encoding", 1006),
    "focus": (b"\x1b[?1004h", "focus_events", True),
    "bracketed paste": (b"\x1b[?2004h", "bracketed_paste", True),
    "synchronized output": (b"\x1b[?2026h", "sync_output", True),
    "alternate scroll": (b"\x1b[?1007h", "alternate_scroll", True),
    "several at once": (b"\x1b[?1;2004h", "bracketed_paste", True),
    "cursor style": (b"\x1b[5 q", "cursor_style", 5),
    "modifyOtherKeys": (b"\x1b[>4;2m", "modify_keys", {4: 2}),
    "modifyOtherKeys off": (b"\x1b[>4;2m\x1b[>4m", "modify_keys", {}),
    "insert": (b"\x1b[4h", "insert_mode", True),
    "origin": (b"\x1b[?6h", "origin_mode", True),
    "reverse video": (b"\x1b[?5h", "reverse_video", True),
    "other private modes are kept": (b"\x1b[?1034h\x1b[?7727h", "other_modes",
                                     {1034: True, 7727: True}),
    "soft reset": (b"\x1b[?1h\x1b[4h\x1b[2;3r\x1b[!p", "insert_mode", False),
}


@pytest.mark.parametrize("name", sorted(MODE_CASES))
def test_mode_table(name):
    data, attribute, value = MODE_CASES[name]
    assert getattr(fed(data), attribute) == value


def test_kitty_keyboard_stack():
    term = fed(b"\x1b[>1u\x1b[>3u\x1b[=4;2u")
    assert term.main.kitty_flags == [1, 7]
    term.feed(b"\x1b[<u")
    assert term.main.kitty_flags == [1]
    term.feed(b"\x1b[?1049h\x1b[>5u")
    assert term.alt.kitty_flags == [5] and term.main.kitty_flags == [1]


def test_alternate_screen_1049():
    term = fed(b"main\x1b[1;31m\x1b[?1049h\x1b[mALT\x1b[3;3Hx")
    assert term.alt_screen and term.display()[:3] == ["    ALT", "", "  x"]
    term.feed(b"\x1b[?1049l")
    assert not term.alt_screen
    assert term.display()[0] == "main" and term.cursor == (0, 4, False)
    assert term.sgr(term.pen) == "1;31"  # the pen saved on entry comes back
    term.feed(b"\x1b[?1049h")
    assert term.display() == [""] * 5  # the alternate screen starts blank


@pytest.mark.parametrize("mode", [47, 1047])
def test_alternate_screen_47_1047(mode):
    term = fed(b"main\x1b[?%dhALT" % mode)
    assert term.alt_screen and term.line_text(0) == "    ALT"
    term.feed(b"\x1b[?%dl" % mode)
    assert term.line_text(0) == "main" and term.cursor == (0, 7, False)
    term.feed(b"\x1b[?%dh" % mode)
    assert term.line_text(0) == ("" if mode == 1047 else "    ALT")


def test_title_osc_and_stack():
    term = fed(b"\x1b]0;both\x07\x1b]2;win\x1b\\\x1b]1;icon\x07")
    assert (term.title, term.icon_name) == ("win", "icon")
    term.feed(b"\x1b[22;0t\x1b]2;vim\x07")
    assert term.title == "vim"
    term.feed(b"\x1b[23;0t")
    assert term.title == "win"
    term.feed(b"\x1b]2;a\x1bb\x9bc\x07")  # ESC ends the OSC; the title stays clean
    assert term.title == "a"
    term.feed("\x1b]2;x\u009by\x07".encode())
    assert term.title == "xy"


def test_queries_are_recorded_not_answered():
    term = fed(b"\x1b[c\x1b[>c\x1b[6n\x1b[?2004$p\x1b]11;?\x07\x1b[>q\x1bP$qm\x1b\\"
               b"\x1bZ\x1b[18t\x1b[?u")
    assert term.take_queries() == [
        b"\x1b[c", b"\x1b[>c", b"\x1b[6n", b"\x1b[?2004$p", b"\x1b]11;?\x07", b"\x1b[>q",
        b"\x1bP$qm\x1b\\", b"\x1bZ", b"\x1b[18t", b"\x1b[?u"]
    assert term.take_queries() == []
    assert term.queries_total == 10
    assert term.display() == [""] * 5 and not term.uncertain


def test_unknown_sequences_are_skipped_and_flagged():
    term = fed(b"a\x1b[5yb\x1b#3c")
    assert term.line_text(0) == "abc"
    assert term.uncertain and term.unknown_count == 2 and "#3" in term.last_unknown
    term.uncertain = False
    term.feed(b"\x1b[?1034h\x1b]777;notify\x07")  # no effect on cells: not uncertain
    assert not term.uncertain


def test_in_ground_state():
    term = mterm.Terminal(5, 10)
    for part, ground in ((b"a", True), (b"\x1b", False), (b"[3", False), (b"1m", True),
                         (b"\xe4", False), (b"\xb8\xad", True), (b"\x1b]2;t", False),
                         (b"\x07", True), (b"\x1bP", False), (b"x\x1b\\", True)):
        term.feed(part)
        assert term.in_ground_state == ground, part


def test_scroll_counter_and_history():
    term = fed(b"".join(b"line %d\r\n" % i for i in range(8)), history_limit=3)
    assert term.scroll_count == 4
    assert [text for text, _ in term.history_painted()] == ["line 1", "line 2", "line 3"]
    term.feed(b"\x1b[2;4r\x1b[4;1H\n")  # region not at the top: nothing to history
    assert len(term.history) == 3 and term.scroll_count == 5
    term.feed(b"\x1b[r\x1b[?1049h" + b"\n" * 9 + b"\x1b[?1049l")
    assert [text for text, _ in term.history_painted()][-1] == "line 3"  # alt screen: no history
    assert term.scroll_count == 10 and term.main_scroll_count == 5  # the alt screen's apart
    term.feed(b"\x1b[3J")
    assert not term.history


def test_history_keeps_colours_and_soft_wraps():
    term = fed(b"\x1b[31mred\x1b[m\r\n" + b"x" * 15 + b"\r\n" * 5)
    assert term.history_painted()[:3] == [("\x1b[0;31mred\x1b[m", False), ("x" * 10, True),
                                      ("xxxxx", False)]


def test_resize_crops_pads_and_keeps_the_cursor():
    term = fed(b"0123456789\r\nab\r\ncd\r\nef", rows=5, cols=10)
    term.resize(3, 6)
    assert term.display() == ["ab", "cd", "ef"]
    assert term.cursor == (2, 2, False)
    assert [t for t, _ in term.history_painted()] == ["0123456789"]
    term.resize(4, 12)
    assert term.display() == ["ab", "cd", "ef", ""] and term.tabs >= {8}
    term.resize(2, 12)  # blank rows below the cursor go first
    assert term.display() == ["cd", "ef"]


def test_resize_splits_a_cut_wide_glyph():
    term = fed("abcd中".encode(), rows=2, cols=8)
    term.resize(2, 5)
    assert term.line_text(0) == "abcd"


# ---------------------------------------------------------------------------
# Client helpers
# ---------------------------------------------------------------------------

def test_cell_access():
    term = fed("\x1b[1;31m中\x1b[mx".encode())
    assert term.cell(0, 0) == mterm.Cell("中", 2, "1;31")
    assert term.cell(0, 1) == mterm.Cell("", 0, "1;31")
    assert term.cell(0, 2) == mterm.Cell("x", 1, "")


def test_render_cell_repaints_from_the_model():
    term = fed("ab\x1b[4;38;5;3m中\x1b[m".encode())
    assert term.render_cell(0, 3) == "\x1b[1;3H\x1b[0;4;38;5;3m中".encode()
    shadow = fed(b"")
    shadow.feed(b"ab\x1b[1;3H\x1b[7mXY")  # an overlay was drawn over the glyph
    shadow.feed(term.render_cell(0, 2) + term.cursor_sequence())
    assert shadow.display() == term.display() and shadow.cursor == term.cursor
    assert shadow.cell(0, 2) == term.cell(0, 2) and shadow.pen == 0


def test_render_cell_and_cursor_sequence_under_modes():
    term = fed(b"\x1b[2;4r\x1b[?6h\x1b[4h\x1b(0\x1b[2;2Hq")
    shadow = fed(b"\x1b[2;4r\x1b[?6h\x1b[4h\x1b(0\x1b[2;2H")
    shadow.feed(term.render_cell(2, 1) + term.cursor_sequence())
    assert shadow.display() == term.display()
    assert shadow.cursor == term.cursor
    assert (shadow.origin_mode, shadow.insert_mode, shadow.g0_charset) == (True, True, "0")


def test_reset_sequence_turns_off_what_was_turned_on():
    term = fed(b"\x1b[?1049h\x1b[?1002h\x1b[?1006h\x1b[?1004h\x1b[?2004h\x1b[?1h\x1b="
               b"\x1b[?25l\x1b[1;31m\x1b[2;3r\x1b[?6h\x1b[?2026h\x1b[4 q\x1b(0\x1b[4h"
               b"\x1b[>4;2m\x1b[?12h\x1b[>1u")
    reset = term.reset_sequence()
    term.feed(reset)
    assert term.reset_sequence() == b""
    fresh = mterm.Terminal(5, 10)
    for name in ("alt_screen", "mouse_tracking", "mouse_encoding", "focus_events",
                 "bracketed_paste", "cursor_keys_app", "keypad_app", "cursor_visible", "pen",
                 "top", "bottom", "origin_mode", "sync_output", "cursor_style", "charsets",
                 "insert_mode", "modify_keys"):
        assert getattr(term, name) == getattr(fresh, name), name
    assert fed(b"plain text\r\n").reset_sequence() == b""


# ---------------------------------------------------------------------------
# Model state, for the properties
# ---------------------------------------------------------------------------

def screen_state(term: mterm.Terminal, buffer) -> list:
    return [[(c, term.sgr(a)) for c, a in zip(line.chars, line.attrs)] for line in buffer.lines]


def visible_state(term: mterm.Terminal) -> dict:
    """What a terminal shows and how it takes input: what serialize() must reproduce."""
    state = {name: getattr(term, name) for name in (
        "rows", "cols", "cursor", "alt_screen", "top", "bottom", "tabs", "charsets", "gl",
        "insert_mode", "newline_mode", "origin_mode", "cursor_keys_app", "keypad_app",
        "autowrap", "cursor_visible", "reverse_video", "focus_events", "alternate_scroll",
        "bracketed_paste", "sync_output", "cursor_blink", "cursor_style", "mouse_tracking",
        "mouse_encoding", "modify_keys", "other_modes")}
    state["pen"] = term.sgr(term.pen)
    state["main"] = screen_state(term, term.main)
    state["title"] = (term.title, term.icon_name)
    state["kitty"] = (term.main.kitty_flags, term.alt.kitty_flags if term.alt_screen else [])
    if term.alt_screen:
        state["alt"] = screen_state(term, term.alt)
    # An alternate screen not shown is not carried, its saved cursor no more than its cells
    # (only an application that comes back with 47/1047 and DECRC without a DECSC could
    # tell: the copy's cursor goes home).
    for name, buffer in (("main saved", term.main), ("alt saved", term.alt)):
        if buffer.saved is not None and (buffer is term.main or term.alt_screen):
            state[name] = buffer.saved._replace(pen=term.sgr(buffer.saved.pen))
    return state


def full_state(term: mterm.Terminal) -> dict:
    state = visible_state(term)
    state.update(alt=screen_state(term, term.alt), history=term.history_painted(),
                 queries=list(term.queries), counters=(term.queries_total, term.unknown_count,
                                                       term.scroll_count, term.bell_count,
                                                       term.main_scroll_count),
                 uncertain=term.uncertain, ground=term.in_ground_state,
                 wrapped=[line.wrapped for line in term.main.lines], alt_mode=term.alt_mode,
                 title_stack=list(term._title_stack), saved=(term.main.saved, term.alt.saved))
    return state


def check_invariants(term: mterm.Terminal) -> None:
    assert 0 <= term.y < term.rows and 0 <= term.x < term.cols
    assert 0 <= term.top < term.bottom < term.rows
    assert not term.wrap_pending or term.x == term.cols - 1
    for buffer in (term.main, term.alt):
        assert len(buffer.lines) == term.rows
        for line in buffer.lines:
            assert len(line.chars) == len(line.attrs) == term.cols
            assert line.chars[0] != ""
            for col, char in enumerate(line.chars):
                assert len(char) <= mterm.MAX_COMBINING_CHARS + 1
                if char == "":  # a right half follows its wide left half
                    assert mterm.char_width(line.chars[col - 1][0]) == 2
                elif mterm.char_width(char[0]) == 2:
                    assert col + 1 < term.cols and line.chars[col + 1] == ""
            assert all(0 <= a < len(term._attrs) for a in line.attrs)
    assert len(term.title or "") <= mterm.MAX_TITLE_CHARS
    assert len(term._pending) <= mterm.MAX_SEQUENCE_CHARS


# A vocabulary of real sequences (and some broken ones) to build streams from.
_WORDS = [
    b"hello", b"x" * 13, "中文".encode(), "e\u0301".encode(), "😀".encode(), "\u200d".encode(),
    b"\r", b"\n", b"\r\n", b"\b", b"\t", b"\x07", b"\x0e", b"\x0f", b"\x1b7", b"\x1b8",
    b"\x1bD", b"\x1bE", b"\x1bM", b"\x1bH", b"\x1b(0", b"\x1b(B", b"\x1b)0", b"\x1b=", b"\x1b>",
    b"\x1b[?1049h", b"\x1b[?1049l", b"\x1b[?47h", b"\x1b[?1047l", b"\x1b[?1048h",
    b"\x1b[?1048l", b"\x1b[?6h", b"\x1b[?6l", b"\x1b[?7l", b"\x1b[?7h", b"\x1b[4h", b"\x1b[4l",
    b"\x1b[20h", b"\x1b[20l", b"\x1b[?25l", b"\x1b[?1002h", b"\x1b[?1006h", b"\x1b[?2004h",
    b"\x1b[?1h", b"\x1b[?2026h", b"\x1b[?2026l", b"\x1b[3 q", b"\x1b[>4;2m", b"\x1b[>1u",
    b"\x1b[m", b"\x1b[1;31m", b"\x1b[38;5;100m", b"\x1b[48:2::1:2:3m", b"\x1b[7;4:3m",
    b"\x1b[K", b"\x1b[1K", b"\x1b[2J", b"\x1b[J", b"\x1b[3X", b"\x1b[2@", b"\x1b[2P",
    b"\x1b[L", b"\x1b[2M", b"\x1b[S", b"\x1b[T", b"\x1b[3b", b"\x1b[g", b"\x1b[3g",
    b"\x1b[2;4r", b"\x1b[r", b"\x1b]2;title\x07", b"\x1b]0;t\x1b\\", b"\x1b[22t", b"\x1b[23t",
    b"\x1b[6n", b"\x1bP$qm\x1b\\", b"\x1b[5y", b"\x1b[?12h", b"\x1b[?1034h",
]
_MOVES = st.builds(lambda r, c, f: b"\x1b[%d;%d%s" % (r, c, f), st.integers(0, 12),
                   st.integers(0, 12), st.sampled_from([b"H", b"f"])) | st.builds(
    lambda n, f: b"\x1b[%d%s" % (n, f), st.integers(0, 12), st.sampled_from(
        [b"A", b"B", b"C", b"D", b"E", b"F", b"G", b"d", b"I", b"Z", b"a", b"e"]))
WELL_FORMED = st.lists(st.sampled_from(_WORDS) | _MOVES, max_size=60).map(b"".join)
STREAMS = st.lists(st.sampled_from(_WORDS) | _MOVES | st.binary(max_size=12),
                   max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STREAMS, st.randoms(use_true_random=False))
def test_chunking_does_not_matter(data, rnd):
    whole = fed(data, history_limit=20)
    bytewise = mterm.Terminal(5, 10, history_limit=20)
    for i in range(len(data)):
        bytewise.feed(data[i:i + 1])
    split = mterm.Terminal(5, 10, history_limit=20)
    pos = 0
    while pos < len(data):
        step = rnd.randint(1, 8)
        split.feed(data[pos:pos + step])
        pos += step
    assert full_state(bytewise) == full_state(whole)
    assert full_state(split) == full_state(whole)


_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=25)
_SGR = st.sampled_from(["\x1b[44m", "\x1b[m", "\x1b[1;31m", "\x1b[7;42m", "\x1b[38;5;9m"])
_LINE = _ASCII | st.builds(lambda a, sgr, b, sgr2: a + sgr + b + sgr2, _ASCII, _SGR, _ASCII,
                           _SGR | st.just("")) | (
    st.sampled_from(["\x1b[44m", "\x1b[m", "\x1b[1;31m", "\x1b[2;4r", "\x1b[r", "中"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINE, max_size=40), st.sampled_from([0, 3, 50]), st.booleans())
def test_plain_lines_in_bulk_match_line_by_line(lines, history_limit, alt):
    """Runs of plain lines at the bottom are taken in one step (bulk output): the result
    must be exactly what feeding them one byte at a time gives."""
    data = (b"\x1b[?1049h" if alt else b"") + b"\x1b[5;1H" + "\r\n".join(lines).encode()
    whole = fed(data, history_limit=history_limit)
    bytewise = mterm.Terminal(5, 10, history_limit=history_limit)
    for i in range(len(data)):
        bytewise.feed(data[i:i + 1])
    assert full_state(whole) == full_state(bytewise)


_FLOOD_LINE = st.sampled_from([0, 1, 9, 10, 11, 20, 21, 35]).map(lambda n: "x" * n) | _ASCII
# What may break a run of plain lines: stray or swapped CR/LF, an SGR, a C0 control, UTF-8.
_FLOOD_BREAK = st.sampled_from(["\r", "\n", "\n\r", "\r\r\n", "\x1b[1m", "\x1b[m", "\t",
                                "\x07", "\x7f", "é", "\x1b"])


def assert_chunks_equal_bytes(data: bytes, history_limit: int, rnd) -> tuple:
    """Feed ``data`` to a 5x10 model one byte at a time, in random chunks and all at once:
    the three states must be equal. Returns (chunked, bytewise) for further checks."""
    bytewise = mterm.Terminal(5, 10, history_limit=history_limit)
    for i in range(len(data)):
        bytewise.feed(data[i:i + 1])
    chunked = mterm.Terminal(5, 10, history_limit=history_limit)
    pos = 0
    while pos < len(data):
        step = rnd.choice([1, 7, 64, 300, len(data)])
        chunked.feed(data[pos:pos + step])
        pos += step
    assert full_state(chunked) == full_state(bytewise)
    assert full_state(fed(data, history_limit=history_limit)) == full_state(bytewise)
    return chunked, bytewise


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FLOOD_LINE | _FLOOD_BREAK, min_size=1, max_size=150),
       st.sampled_from([0, 3, 50]), st.randoms(use_true_random=False))
def test_floods_fed_in_chunks_match_byte_by_byte(items, history_limit, rnd):
    """A flood (many more lines than the screen and history hold, some wrapping, some of
    exactly the width; now and then a stray control, SGR or non-ASCII character) fed in
    chunks of any size, the way bulk output arrives: only the rows that can still show are
    built, and the result must be exactly what one byte at a time gives."""
    data = b"\x1b[5;1H" + "\r\n".join(items).encode() + b"\r\n"
    assert_chunks_equal_bytes(data, history_limit, rnd)


_FLOOD_WIDTH = st.sampled_from([0, 1, 9, 10, 11, 20, 21]) | st.integers(0, 35)
# How a flood may end or be broken: a partial line (pending wrap at 10), a bare LF (the
# column stays), a tab, REP (repeats the last glyph the flood printed), CR alone, SGR, UTF-8.
_FLOOD_END = st.sampled_from(["", "abc", "x" * 10, "x" * 10 + "\n", "\n", "ab\n", "\t",
                              "\x1b[3b", "\r", "\x1b[1m", "é", "\r\r\n", "\x1b"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FLOOD_LINE | _FLOOD_BREAK, max_size=6), _FLOOD_WIDTH, st.integers(1, 160),
       st.lists(_FLOOD_WIDTH | _FLOOD_END, max_size=4), st.lists(_FLOOD_END, max_size=3),
       st.sampled_from([0, 3, 50]), st.randoms(use_true_random=False))
def test_fixed_width_floods_fed_in_chunks_match_byte_by_byte(
        before, width, count, inside, after, history_limit, rnd):
    """A flood of lines of one width (base64, hex dumps, ``yes``), long enough that most of
    it scrolls past unseen and is only counted (_Unseen), wrapping or not, interrupted now
    and then, after and before odd states (pending wrap, a bare LF, a tab, REP of the last
    glyph, a half-read sequence), fed in chunks of any size: the result must be exactly
    what one byte at a time gives (rows, wrap flags, history, cursor, counters)."""
    flood = [f"{n % 10 ** width:0{width}d}" if width else "" for n in range(count)]
    for item in inside:  # an odd line or break somewhere in the run
        piece = "y" * item if isinstance(item, int) else item
        flood.insert(rnd.randint(0, len(flood)), piece)
    text = "\r\n".join(before + flood) + "\r\n" + "".join(after)
    data = b"\x1b[5;1H" + text.encode()
    chunked, bytewise = assert_chunks_equal_bytes(data, history_limit, rnd)
    assert chunked._last_glyph == bytewise._last_glyph  # what REP repeats next


def test_plain_lines_to_end_counts_unseen_fixed_width_lines():
    """Lines of one width before the last ``kept`` are described, not returned; lines of
    other widths, or CR LF pairs that are not where the width puts them, are returned."""
    plain = mterm.Terminal._plain_lines_to_end
    text = "abc\r\n" * 5 + "de\r\n\r\nf"
    lines, stop, unseen = plain(text, 0, kept=2)
    assert (lines, stop) == (["de", ""], len(text) - 1)
    assert unseen == mterm._Unseen(count=5, width=3, end=25, glyph="c")
    assert unseen.rows(cols=2) == 10 and unseen.rows(cols=3) == 5
    blank = plain("\r\n" * 6, 0, kept=2)
    assert blank[0] == ["", ""] and blank[2] == mterm._Unseen(4, 0, 8, None)
    assert blank[2].rows(cols=80) == 4
    assert plain(text, 0, kept=7)[2] is None  # no more lines than kept: all returned
    for uneven in ("abc\r\nabcd\r\nabc\r\nx\r\n", "abcde\r\na\r\nbc\r\nx\r\n"):
        lines, _stop, unseen = plain(uneven, 0, kept=1)
        assert unseen is None and len(lines) == uneven.count("\r\n"), uneven


def test_plain_lines_to_end_checks_ascii_chunks_in_place():
    """Given the chunk as bytes (all ASCII), the controls before ``pos`` and after the last
    CR LF are told apart from those of the lines: the same answers as from the text."""
    plain = mterm.Terminal._plain_lines_to_end
    cases = [("\x1b[1mab\r\n" + "cd\r\n" * 6 + "e\x07\t", 8), ("\tx\r\nab\r\n\x1b[m", 4),
             ("ab\r\ncd", 0), ("a\r\n\x07b\r\nc", 3), ("a\r\nb\rc\r\n", 3),
             ("a\r\nb\r\n\r\n", 3), ("no line end\x07", 0)]
    for text, pos in cases:
        for kept in (0, 2):
            assert plain(text, pos, kept, text.encode()) == plain(text, pos, kept), text
    flood = "\x1b[1mab\r\n" + "cd\r\n" * 6 + "e"
    assert plain(flood, 8, 2, flood.encode())[2] == mterm._Unseen(4, 2, 24, "d")


def test_plain_lines_to_end_takes_only_whole_plain_lines():
    """The whole-string check behind the bulk path: every CR LF-ended line from ``pos`` on,
    or nothing when anything but printable ASCII and CR LF pairs is in them."""
    plain = mterm.Terminal._plain_lines_to_end
    assert plain("ab\r\ncd\r\nef", 0) == (["ab", "cd"], 8, None)
    assert plain("ab\r\n\r\n", 0) == (["ab", ""], 6, None)
    assert plain("xxab\r\n", 2) == (["ab"], 6, None)
    assert plain("no line end", 0) is None
    for broken in ("a\rb\r\n", "a\nb\r\n", "a\n\rb\r\n", "a\r\r\n", "\x1b[m\r\n", "é\r\n",
                   "a\tb\r\n", "a\x7f\r\n"):
        assert plain(broken, 0) is None, broken


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WELL_FORMED)
def test_serialize_round_trip(data):
    term = fed(data, history_limit=20)
    copy = fed(term.serialize(), history_limit=20)
    assert visible_state(copy) == visible_state(term)
    assert term.take_queries() == [] or copy.take_queries() == []  # never repeats a query


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    term = fed(data)
    check_invariants(term)
    term.serialize(history_lines=10)
    term.reset_sequence()
    check_invariants(fed(term.serialize()))


def test_fuzz_long_random_streams_stay_fast_and_sane():
    rnd = random.Random(1234)
    term = mterm.Terminal(24, 80, history_limit=100)
    alphabet = bytes(range(256)) + b"\x1b[;?0123456789" * 4
    for _ in range(200):
        chunk = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(1, 2000)))
        term.feed(chunk)
    check_invariants(term)
    assert len(term.history) <= 100


# ---------------------------------------------------------------------------
# Serialization details
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("screen", [b"", b"\x1b[?1049h"])
def test_serialize_keeps_the_pending_wrap_of_a_saved_cursor(screen):
    """DECSC right after a glyph went into the last column saves the pending wrap: after
    DECRC the next glyph starts the next line, on the copy as on the original (the copy
    had the cursor stay on the last column and overwrote it)."""
    term = fed(screen + b"\x1b[2;1H0123456789\x1b7\x1b[H")
    copy = fed(term.serialize())
    for each in (term, copy):
        each.feed(b"\x1b8X")
    assert term.display()[1:3] == ["0123456789", "X"]
    assert copy.display() == term.display() and copy.cursor == term.cursor


def test_serialize_puts_history_first_and_restores_main_under_the_app():
    term = fed(b"".join(b"%d\r\n" % i for i in range(9)) + b"\x1b[?1049hAPP")
    data = term.serialize(history_lines=2)
    assert data.index(b"3\r\n4") < data.index(b"\x1b[?1049h") < data.index(b"APP")
    copy = fed(data)
    assert [text for text, _ in copy.history_painted()] == ["3", "4"]
    assert copy.display() == ["", "", "", "", "APP"]
    copy.feed(b"\x1b[?1049l")
    term.feed(b"\x1b[?1049l")
    assert visible_state(copy) == visible_state(term)


def test_serialize_rebuilds_pending_wrap_and_anchors_wide_glyphs():
    term = fed("中x\x1b[31m0123456".encode())
    data = term.serialize()
    assert b"\x1b[3G" in data  # a CHA after the wide glyph
    copy = fed(data)
    assert copy.cursor == (0, 9, True)
    copy.feed(b"y")
    term.feed(b"y")
    assert copy.display() == term.display()


def test_serialize_never_writes_queries_and_keeps_titles_clean():
    term = fed(b"\x1b[6n\x1b]11;?\x07\x1b[c")
    assert term.serialize() == fed(b"").serialize()


def test_serialize_trailing_background_becomes_el():
    term = fed(b"ab\x1b[44m\x1b[K\x1b[m")
    assert b"\x1b[0;44m\x1b[K" in term.serialize()


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------

def test_huge_osc_and_title_are_bounded():
    term = fed(b"\x1b]2;" + b"t" * 100000 + b"\x07after")
    assert len(term.title) == mterm.MAX_TITLE_CHARS and term.line_text(0) == "after"[:10]
    term = fed(b"\x1bP" + b"d" * 100000 + b"\x1b\\x")
    assert term.line_text(0) == "x" and term._string_len == 0


def test_long_csi_is_dropped_whole():
    term = fed(b"\x1b[" + b"1;" * 1000 + b"Hx")
    assert term.line_text(0) == "x" and term.uncertain
    term = mterm.Terminal(5, 10)
    for piece in (b"\x1b[", b"1;" * 1000, b"Hx"):
        term.feed(piece)
    assert term.line_text(0) == "x" and len(term._pending) <= mterm.MAX_SEQUENCE_CHARS


def test_huge_parameters_are_clamped():
    term = fed(b"\x1b[99999999999;99999999999Hx\x1b[99999999999bz\x1b[999999999@")
    check_invariants(term)
    assert term.cursor[0] == 4


def test_truecolour_flood_keeps_the_attribute_table_bounded():
    term = mterm.Terminal(5, 10)
    for i in range(3 * mterm.MAX_ATTRS):
        term.feed(b"\x1b[38;2;%d;%d;%dmx" % (i >> 16, (i >> 8) & 255, i & 255))
    assert len(term._attrs) <= mterm.MAX_ATTRS + 2 * 5 * 10
    check_invariants(term)
    i = 3 * mterm.MAX_ATTRS - 1
    assert term.sgr(term.pen) == f"38;2;{i >> 16};{(i >> 8) & 255};{i & 255}"


def test_width_rule():
    assert [mterm.char_width(c) for c in "a中😀\u0301\u200b\u200d\u00ad\u1160é"] == [
        1, 2, 2, 0, 0, 0, 1, 0, 1]
