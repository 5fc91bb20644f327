"""The local echo prediction engine (moshpit_predict) against the screen model, with a fake
clock: no process, socket or sleep.

The rig plays both ends. ``model`` is the client's model (fed only with the server's
bytes); ``screen`` is a second Terminal standing for the local terminal, fed with every
byte the client writes (the server's and the overlay's). The invariant checked at every
server chunk: before it is written, the screen equals the model (text, attributes,
cursor), so no server byte can ever act on a predicted glyph.
"""

from __future__ import annotations

import re

import pytest

import moshpit_predict as mpr
from moshpit_session import TtyMode
from moshpit_term import Terminal

pytestmark = pytest.mark.timeout(30)

PROMPT = b"$ "
SLOW_SRTT = 0.2  # send interval 100 ms: predictions shown and underlined
FAST_SRTT = 0.03  # 20 ms: adaptive shows nothing
APP_ECHOES = TtyMode(icanon=False, echo=False, erase=0x7F)  # readline, vim
HIDDEN = TtyMode(icanon=True, echo=False, erase=0x7F)  # read -s, sudo


def cells(term: Terminal) -> list:
    return [[term.cell(r, c) for c in range(term.cols)] for r in range(term.rows)]


class Rig:
    """A client: its model, the predictor, and the terminal that sees everything written."""

    def __init__(self, mode: str = "adaptive", srtt: float = SLOW_SRTT, rows: int = 6,
                 cols: int = 20) -> None:
        self.model = Terminal(rows, cols, history_limit=0)
        self.screen = Terminal(rows, cols, history_limit=0)
        self.engine = mpr.Predictor(self.model, mode)
        self.engine.set_srtt(srtt)
        self.engine.tty_mode(APP_ECHOES)
        self.now = 0.0
        self.sent = 0
        self.written = bytearray()  # everything the client wrote to its terminal

    def write(self, data: bytes) -> None:
        self.written += data
        self.screen.feed(data)

    def type(self, data: bytes, dt: float = 0.05) -> None:
        self.now += dt
        self.sent += len(data)
        self.write(self.engine.keys(data, self.sent, self.now))

    def output(self, data: bytes, acked: int = None) -> None:
        """A server chunk (and the echo ack that came with it)."""
        self.write(self.engine.before_output())
        assert cells(self.screen) == cells(self.model)
        assert self.screen.cursor == self.model.cursor
        self.write(data)
        self.model.feed(data)
        if acked is not None:
            self.engine.echo_acked(acked)
        self.write(self.engine.after_output(self.now))

    def ack(self, offset: int = None) -> None:
        self.engine.echo_acked(self.sent if offset is None else offset)
        self.write(self.engine.after_output(self.now))

    def settled(self) -> bool:
        return (self.screen.display() == self.model.display()
                and cells(self.screen) == cells(self.model)
                and self.screen.cursor == self.model.cursor)

    def confirm_epoch(self, key: bytes = b"e") -> None:
        """Type one key and echo it: the epoch is confirmed, later keys show at once."""
        self.type(key)
        self.output(key, acked=self.sent)


def prompt(rig: Rig) -> Rig:
    rig.output(PROMPT)
    return rig


def test_after_one_confirmed_key_the_next_keys_show_at_once_and_then_match_the_echo():
    rig = prompt(Rig())
    rig.type(b"l")
    assert rig.screen.line_text(0) == "$", "first key of an epoch: tentative, not shown"
    rig.output(b"l", acked=rig.sent)
    rig.type(b"s -l")
    assert rig.screen.line_text(0) == "$ ls -l"
    assert rig.model.line_text(0) == "$ l"
    assert rig.screen.cursor[:2] == (0, 7)
    assert "4" in rig.screen.cell(0, 3).sgr.split(";"), "slow link: underlined"
    rig.output(b"s -l")  # the echo, not yet acked: still drawn over it, same glyphs
    assert rig.screen.line_text(0) == "$ ls -l"
    rig.ack()
    assert rig.settled()


def test_enter_starts_an_epoch_nothing_shows_until_its_first_key_is_confirmed():
    rig = prompt(Rig())
    rig.confirm_epoch(b"x")
    rig.type(b"\r")
    rig.output(b"\r\n$ ", acked=rig.sent)
    rig.type(b"a")
    rig.type(b"b")
    assert rig.screen.line_text(1) == "$"
    rig.output(b"a", acked=rig.sent - 1)
    assert rig.screen.line_text(1) == "$ ab"
    rig.output(b"b", acked=rig.sent)
    assert rig.settled()


def test_a_wrong_guess_is_taken_away_and_the_screen_equals_the_model():
    rig = prompt(Rig())
    rig.confirm_epoch()
    rig.type(b"abc")
    assert rig.screen.line_text(0) == "$ eabc"
    rig.output(b"ABC", acked=rig.sent)  # the application echoed something else
    assert rig.screen.line_text(0) == "$ eABC"
    assert rig.settled()


def test_a_mistyped_word_corrected_with_backspace():
    rig = prompt(Rig())
    rig.confirm_epoch(b"e")
    rig.type(b"cgo")
    rig.type(b"\x7f\x7f")
    rig.type(b"ho")
    assert rig.screen.line_text(0) == "$ echo"
    assert rig.screen.cursor[:2] == (0, 6)
    rig.output(b"cgo\b \b\b \bho", acked=rig.sent)
    assert rig.settled()


def test_backspace_and_left_arrow_stop_where_the_input_began():
    rig = prompt(Rig())
    rig.confirm_epoch(b"a")
    rig.type(b"\x7f")  # over our own input: predicted
    assert rig.screen.line_text(0) == "$" and rig.screen.cursor[:2] == (0, 2)
    rig.output(b"\b \b", acked=rig.sent)
    rig.type(b"\x7f")  # into the prompt: not predicted (readline rings the bell)
    rig.type(b"\x1b[D")
    assert rig.settled()
    rig.output(b"\x07", acked=rig.sent)
    assert rig.settled()


def test_arrows_move_the_predicted_cursor_and_typing_overwrites_there():
    rig = prompt(Rig())
    rig.confirm_epoch(b"a")
    rig.type(b"bc")
    rig.type(b"\x1b[D\x1b[")  # left, and a CSI cut by the end of the read...
    rig.type(b"D")  # ...is the rest of a left arrow (a lone ESC there: the Escape key)
    assert rig.screen.cursor[:2] == (0, 3)
    rig.type(b"X")  # overwrite, never insert
    assert rig.screen.line_text(0) == "$ aXc"
    rig.type(b"\x1bOC")  # right arrow in application cursor mode
    assert rig.screen.cursor[:2] == (0, 5)


def test_echo_off_hides_every_key_even_from_a_confirmed_epoch():
    rig = prompt(Rig())
    rig.confirm_epoch()
    rig.engine.tty_mode(HIDDEN)
    rig.type(b"secret")
    assert b"secret" not in rig.written and rig.settled()
    rig.engine.tty_mode(APP_ECHOES)  # the prompt is over; a new epoch starts
    rig.type(b"x")
    assert rig.settled()


def test_a_paste_and_a_bracketed_paste_are_never_predicted():
    rig = prompt(Rig())
    rig.confirm_epoch()
    rig.type(b"y" * (mpr.PASTE_BYTES + 1))
    assert rig.settled()
    rig.output(b"y" * 10, acked=rig.sent)
    rig.type(b"\x1b[200~abc\x1b[201~")
    assert rig.settled()


def test_never_the_last_column_nor_a_row_with_wide_or_ambiguous_glyphs():
    rig = prompt(Rig(cols=8))
    rig.confirm_epoch(b"a")
    rig.type(b"bcd")  # columns 3-5; column 6 would leave the cursor on the last one
    assert rig.screen.line_text(0) == "$ abcd"
    rig.type(b"ef")
    assert rig.screen.line_text(0) == "$ abcd"
    rig2 = Rig()
    rig2.output("\u4e2d$ ".encode())  # a wide glyph left of the cursor
    rig2.confirm_epoch()
    rig2.type(b"abc")
    assert rig2.settled()


def test_alternate_screen_only_in_experimental_mode():
    for mode, shown in (("adaptive", False), ("experimental", True)):
        rig = Rig(mode)
        rig.output(b"\x1b[?1049h\x1b[H")
        rig.confirm_epoch(b"i")
        rig.type(b"hi")
        assert (rig.screen.line_text(0) == "ihi") is shown, mode


def test_modes_and_triggers():
    never = prompt(Rig("never"))
    never.confirm_epoch()
    never.type(b"abc")
    assert never.written == b"$ e"
    fast = prompt(Rig(srtt=FAST_SRTT))
    fast.confirm_epoch()
    fast.type(b"abc")
    assert fast.settled(), "fast link: adaptive shows nothing"
    fast.now += mpr.GLITCH_THRESHOLD_SECS + 0.01
    fast.write(fast.engine.tick(fast.now))
    assert fast.screen.line_text(0) == "$ eabc", "overdue: shown"
    assert "4" not in fast.screen.cell(0, 3).sgr.split(";")
    fast.now += mpr.GLITCH_FLAG_THRESHOLD_SECS
    fast.write(fast.engine.tick(fast.now))
    assert "4" in fast.screen.cell(0, 3).sgr.split(";"), "5 s overdue: underlined"
    always = prompt(Rig("always", srtt=FAST_SRTT))
    always.confirm_epoch()
    always.type(b"abc")
    assert always.screen.line_text(0) == "$ eabc"
    assert mpr.send_interval_ms(0.1) == 50 and mpr.send_interval_ms(0.01) == 20
    assert mpr.send_interval_ms(5) == 250
    with pytest.raises(ValueError):
        mpr.Predictor(Terminal(), "sometimes")


def test_application_edits_never_carry_our_glyphs_and_scrolling_resets():
    rig = prompt(Rig())
    rig.confirm_epoch()
    rig.type(b"abc")
    rig.output(b"\x1b[1;1H\x1b[5@\x1b[1;8H")  # insert characters under the prediction
    rig.output(b"\x1b[6;1H\n\n")  # scroll: every prediction is dropped
    assert rig.settled()
    rig.type(b"z")
    assert rig.settled(), "after a reset the epoch is tentative again"


def test_reset_takes_the_overlay_away_and_trusts_the_model_again():
    rig = prompt(Rig())
    rig.confirm_epoch()
    rig.type(b"abc")
    rig.write(rig.engine.reset())
    assert rig.settled()
    rig.output(b"\x1b[?999999z")  # unknown: the model is unsure, nothing predicted
    assert rig.model.uncertain
    rig.confirm_epoch()
    rig.type(b"q")
    assert rig.settled()
    rig.write(rig.engine.reset())
    assert not rig.model.uncertain


def test_pending_wrap_insert_mode_and_colours():
    rig = Rig(cols=10)
    rig.output(b"\x1b[4h$ ")
    rig.confirm_epoch()
    rig.type(b"ab")
    assert rig.settled(), "insert mode: not predicted"
    rig = Rig()
    rig.output(b"\x1b[32m$\x1b[0m \x1b[1m")  # a green prompt, then the app's pen is bold
    rig.confirm_epoch()
    rig.type(b"ab")
    assert rig.screen.line_text(0) == "$ eab"
    rig.output(b"ab", acked=rig.sent)
    assert rig.settled(), "the model's pen (bold) is back before the server's bytes"


def test_our_bytes_never_save_or_restore_the_cursor():
    rig = prompt(Rig())
    rig.confirm_epoch()
    for keys in (b"abc", b"\x1b[D", b"\x7f", b"x"):
        rig.type(keys)
        rig.output(b"", acked=rig.sent - 1)
    rig.output(b"\x1b[2J")
    assert b"\x1b7" not in rig.written and b"\x1b[s" not in rig.written


def test_key_parser():
    parser = mpr.KeyParser()
    assert parser.feed("aé\x7f\r".encode()) == [mpr.Key("char", "a"), mpr.Key("char", "é"),
                                                 mpr.Key("erase"), mpr.Key("other")]
    assert parser.feed(b"\x1b[A\x1b[1;5D\x1bx\x1b") == [mpr.Key("other")] * 4
    assert parser.feed(b"\xc3") == [] and parser.feed(b"\xa9") == [mpr.Key("char", "é")]
    assert parser.feed(b"\x1bO") == [] and parser.feed(b"D") == [mpr.Key("left")]
    parser.erase = "\x08"
    assert parser.feed(b"\x08") == [mpr.Key("erase")]


def test_a_password_typed_before_the_prompt_is_known_is_never_drawn():
    """sudo's prompt and its echo-off mode arrive after the keys: the epoch begun by Enter
    keeps every key hidden, and its wrong guesses are dropped unseen."""
    rig = prompt(Rig())
    rig.confirm_epoch(b"s")
    rig.type(b"udo ls")
    rig.type(b"\r")
    for key in b"hunter2":
        rig.type(bytes([key]), dt=0.01)
    rig.output(b"udo ls\r\n[sudo] password for you: ", acked=rig.sent - 7)
    rig.ack()  # every key written: the password's guesses are judged wrong, unseen
    rig.engine.tty_mode(HIDDEN)
    rig.type(b"x")
    after_prompt = rig.written.split(b"password for you: ")[-1]
    glyphs = re.sub(rb"\x1b\[[0-?]*[ -/]*[@-~]", b"", after_prompt)
    assert glyphs == b"", f"drawn after the prompt: {glyphs!r}"
    assert rig.settled()


def test_the_srtt_trigger_starts_raised_as_on_mosh_and_its_hysteresis_decides():
    """Mosh judges first on its initial 1 s SRTT, which raises the trigger; it falls only
    with a send interval of 20 ms or less (SRTT <= 40 ms) and nothing pending. So a 45 ms
    path shows predictions from its first confirmed key on, with no glitch first, and a
    40 ms path shows nothing."""
    middling = prompt(Rig(srtt=0.045))
    middling.confirm_epoch()
    middling.type(b"ab")
    assert middling.screen.line_text(0) == "$ eab"
    fast = prompt(Rig(srtt=0.04))
    fast.confirm_epoch()
    fast.type(b"ab")
    assert fast.settled()


def test_on_a_fast_lossy_link_a_late_echo_turns_predictions_on():
    """SRTT 40 ms: mosh's send-interval trigger stays off, but an echo later than
    max(2 SRTT, SRTT + 50 ms) (a lost packet) is a glitch: predictions show, and ten quick
    confirmations, 150 ms apart, take them away again."""
    rig = prompt(Rig(srtt=0.04))
    rig.confirm_epoch()
    rig.type(b"a")
    rig.now += 0.08
    rig.write(rig.engine.tick(rig.now))
    assert rig.settled(), "not late yet"
    rig.now += 0.02
    rig.write(rig.engine.tick(rig.now))
    assert rig.screen.line_text(0) == "$ ea"
    rig.output(b"a", acked=rig.sent)
    for _ in range(mpr.GLITCH_REPAIR_COUNT):
        rig.type(b"b", dt=0.16)
        assert rig.screen.line_text(0).endswith("b")
        rig.output(b"b", acked=rig.sent)
    rig.type(b"c")
    assert rig.settled(), "quick echoes again: adaptive hides predictions"


def test_keys_after_enter_in_the_same_read_wait_for_its_echo():
    rig = prompt(Rig("experimental"))  # never tentative: a misplaced guess would show
    rig.confirm_epoch()
    rig.type(b"\rab")  # the model's cursor is still on the old line: never seeded from it
    assert rig.settled()
    rig.output(b"\r\n$ ab", acked=rig.sent)
    assert rig.settled()


def test_idle_while_nothing_is_predicted_and_a_late_fed_model_predicts_the_same():
    """``idle()``: nothing predicted, tracked or drawn, so the client may feed its model
    late (mp.ScreenMirror.defer) and call after_output once. A flood fed that way, then a
    keystroke, must draw exactly what feeding every chunk at once draws."""
    flood = [b"line %d of the flood\r\n" % i for i in range(30)] + [PROMPT]
    now_fed, late_fed = prompt(Rig()), prompt(Rig())
    for rig in (now_fed, late_fed):
        rig.confirm_epoch()
        assert not rig.engine.idle(), "a confirmed key leaves a tracked cursor"
        rig.type(b"\r")
        rig.output(b"\r\n", acked=rig.sent)
    for chunk in flood:
        now_fed.output(chunk)
        assert now_fed.engine.idle(), "scrolling output drops what was tracked"
        late_fed.write(chunk)  # to the terminal now, to the model later
    assert late_fed.engine.idle()
    late_fed.model.feed(b"".join(flood))
    late_fed.write(late_fed.engine.after_output(late_fed.now))
    for rig in (now_fed, late_fed):
        rig.confirm_epoch(b"x")
        rig.type(b"yz")
        assert not rig.engine.idle()
    assert late_fed.written == now_fed.written
    assert cells(late_fed.screen) == cells(now_fed.screen)
    assert late_fed.screen.cursor == now_fed.screen.cursor
