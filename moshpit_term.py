"""moshpit terminal screen model: a VT parser, the screen it draws, and its serialization.

Why: the server keeps one model per session, fed with every byte the PTY writes, so a client
that (re)attaches gets the screen, modes, title and cursor repainted exactly; the client keeps
one fed with what it writes to stdout, to leave the local terminal clean and to place local
echo. Standard library only; it may import nothing from moshpit's other modules (DESIGN §2).

Server API (reattach, flood skip)::

    term = Terminal(rows=24, cols=80, history_limit=5000)
    term.feed(pty_bytes)                  # chunks of any size; never raises
    term.resize(rows, cols)               # crop or pad, no reflow
    term.serialize(history_lines=200)     # bytes that rebuild it on a fresh terminal
    term.title, term.icon_name            # OSC 0/1/2 (sanitized, bounded)
    term.take_queries()                   # queries seen since last call (DA, DSR, DECRQM,
                                          # OSC colour "?", XTVERSION, DECRQSS...): a flood
                                          # skip re-sends the ones it dropped
    term.history_painted(n)               # the last n history rows as serialize writes them

Feed what one loop tick read in one call rather than many small ones: plain lines reaching
the bottom of the screen are taken in bulk (they go straight to history), and a call costs
about one screen of rows when output scrolls, so large chunks are up to 5x cheaper per MB.

``serialize`` writes: the last ``history_lines`` lines scrolled off the main screen as
ordinary lines (so they land in the terminal's native scrollback), then the main screen, its
saved cursor, then -- if an application owns it -- ``?1049h`` and the alternate screen (so the
right main screen comes back when the application exits), then scroll region, tab stops,
cursor (pending wrap rebuilt by reprinting the last-column cell), pen, charsets, input modes,
title and cursor style. Within a row, a cell that is not one plain column wide (wide,
combining) is followed by a CHA to the next column, so a terminal that measures a glyph
differently cannot shift the rest of the row. Queries are never included.

Client API (never leave the local terminal broken; local echo prediction)::

    term.reset_sequence()          # bytes turning off exactly what the stream turned on
    term.cell(row, col)            # Cell(char, width, sgr): "" for a wide char's right half
    term.cursor                    # (row, col, pending_wrap)
    term.in_ground_state           # no escape sequence, string or UTF-8 char half-read
    term.uncertain                 # set by unknown/malformed sequences; clear by assigning
    term.alt_screen, term.insert_mode, term.origin_mode, term.autowrap, term.g0_charset
    term.scroll_count              # lines moved by scrolling, IL/DL (changes = a scroll)
    term.main_scroll_count         # ... of them on the main screen
    term.render_cell(row, col)     # bytes: CUP + SGR + glyph repainting that cell
    term.cursor_sequence()         # bytes: back to the model's cursor and pen

Sequences understood: C0 (BEL BS HT LF VT FF CR SO SI CAN SUB); ESC 7 8 D E H M c = > N O n
o #8, charset designations ``( ) * + - . /`` with B (ASCII), 0 (DEC graphics), A (UK); CSI
cursor moves (CUU CUD CUF CUB CNL CPL CHA HPA HPR VPA VPR CUP HVP CHT CBT), editing (ED 0-3,
EL, ECH, ICH, DCH, IL, DL, SU, SD, REP, TBC), DECSTBM, SCOSC/SCORC, SGR (0-9, 21-29, 30-49,
53, 55, 58, 59, 90-107; 38/48/58 with ``;5;``/``;2;`` and colon forms; ``4:x`` underline
styles), modes (IRM, LNM; DEC 1 3 5 6 7 12 25 47 66 1047 1048 1049, mouse 9 1000-1003,
encodings 1005 1006 1015, 1004 1007 2004 2026; other DEC private modes are kept as set and
restored), DECSCUSR, DECSTR, XTMODKEYS (``CSI > Pp ; Pv m``), the kitty keyboard stack
(``CSI > u``, ``< u``, ``= u``), the title stack (``CSI 22/23 t``); OSC 0 1 2 titles. DCS,
SOS, PM, APC and other OSCs are swallowed (bounded).

Where it differs from tmux 3.3 (the test oracle) it follows xterm: BS/CUB from a pending wrap
move left of the last column; overwriting or deleting one half of a wide glyph blanks the
other half; CHT (``CSI I``) moves to tab stops (tmux ignores it).

Width rule (documented because the terminal's own rule may differ): a character is 0 columns
wide if its Unicode category is Mn, Me or Cf (except U+00AD), or it is a Hangul medial/final
jamo (U+1160-U+11FF) or U+200B; 2 columns if its East Asian Width is W or F; else 1. A
0-wide character joins the cell before the cursor. Python's ``unicodedata`` sets the Unicode
version.

Bounds: every sequence, string, parameter count and value, title, history and number of
distinct attributes is capped (constants below), so hostile output costs bounded memory.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections import Counter, deque
from itertools import repeat
from typing import Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

DEFAULT_HISTORY_LINES = 5000  # lines kept after they scroll off the main screen
MAX_ROWS = 1000
MAX_COLS = 4000
MAX_SEQUENCE_CHARS = 256  # an ESC/CSI sequence longer than this is dropped whole
MAX_STRING_CHARS = 4096  # OSC/DCS text kept for parsing; the rest is swallowed unread
MAX_TITLE_CHARS = 512
MAX_TITLE_STACK = 10
MAX_PARAMS = 32
MAX_PARAM_VALUE = 65535
MAX_COMBINING_CHARS = 8  # code points joined to one cell
MAX_QUERIES = 32  # kept for take_queries()
# Distinct interned attributes, beyond what both screens can hold, before unused ones are
# dropped (a screen of truecolour art may use one per cell).
MAX_ATTRS = 4096
MAX_KITTY_STACK = 16
MAX_OTHER_MODES = 32  # unknown DEC private modes remembered for the repaint
MAX_REPEAT = MAX_ROWS * MAX_COLS
# Around a chunk's plain lines, at most this much is checked apart rather than copying them.
PLAIN_EDGE_CHARS = 1 << 16
# Bytes a LateFeed holds back before it feeds them. Fewer feeds cost less (a feed builds only
# the rows that still show), but past a few hundred KiB the bytes have left the CPU's cache
# by the time they are fed: 1 MiB cost 5-7% more of a flood's client and server CPU.
LATE_FEED_BYTES = 1 << 18

ESC = "\x1b"
CSI = "\x1b["

# ---------------------------------------------------------------------------
# Widths and charsets
# ---------------------------------------------------------------------------

_width_cache: Dict[str, int] = {}


def char_width(ch: str) -> int:
    """Columns ``ch`` takes on the screen: 0, 1 or 2 (the rule is in the module docstring)."""
    width = _width_cache.get(ch)
    if width is None:
        code = ord(ch)
        category = unicodedata.category(ch)
        if (category in ("Mn", "Me") or (category == "Cf" and code != 0xAD)
                or 0x1160 <= code <= 0x11FF or code == 0x200B):
            width = 0
        elif unicodedata.east_asian_width(ch) in ("W", "F"):
            width = 2
        else:
            width = 1
        if len(_width_cache) < 65536:
            _width_cache[ch] = width
    return width


_DEC_GRAPHICS = dict(zip(
    map(ord, "_`abcdefghijklmnopqrstuvwxyz{|}~"),
    "\u00a0\u25c6\u2592\u2409\u240c\u240d\u240a\u00b0\u00b1\u2424\u240b\u2518\u2510\u250c"
    "\u2514\u253c\u23ba\u23bb\u2500\u23bc\u23bd\u251c\u2524\u2534\u252c\u2502\u2264\u2265"
    "\u03c0\u2260\u00a3\u00b7"))
# Final character of a designation -> translate table (None: ASCII, nothing to translate).
_CHARSETS: Dict[str, Optional[Dict[int, str]]] = {
    "B": None, "0": _DEC_GRAPHICS, "A": {ord("#"): "\u00a3"}}
_DESIGNATORS = "()*+"  # G0..G3 (94-character sets)
_DESIGNATORS_96 = "-./"  # G1..G3 (96-character sets)

# ---------------------------------------------------------------------------
# Attributes: (flags, underline style, fg, bg, underline colour), interned to small ints
# ---------------------------------------------------------------------------

BOLD, DIM, ITALIC, BLINK, RAPID_BLINK, INVERSE, HIDDEN, STRIKE, OVERLINE = (
    1 << i for i in range(9))
# SGR number for each flag, in the order they are written.
_FLAG_SGR = ((BOLD, "1"), (DIM, "2"), (ITALIC, "3"), (BLINK, "5"), (RAPID_BLINK, "6"),
             (INVERSE, "7"), (HIDDEN, "8"), (STRIKE, "9"), (OVERLINE, "53"))
_SGR_SET = {1: BOLD, 2: DIM, 3: ITALIC, 5: BLINK, 6: RAPID_BLINK, 7: INVERSE, 8: HIDDEN,
            9: STRIKE, 53: OVERLINE}
_SGR_CLEAR = {22: BOLD | DIM, 23: ITALIC, 25: BLINK | RAPID_BLINK, 27: INVERSE, 28: HIDDEN,
              29: STRIKE, 55: OVERLINE}
# Colours: DEFAULT, 0-15 (SGR 30-37/90-97 style), PALETTE+n (38;5;n), RGB+0xRRGGBB.
DEFAULT_COLOUR = -1
PALETTE = 0x100
RGB = 0x1000000
_DEFAULT_ATTR = (0, 0, DEFAULT_COLOUR, DEFAULT_COLOUR, DEFAULT_COLOUR)


def _colour_sgr(colour: int, base: int) -> str:
    """SGR text for ``colour`` as foreground (base 30), background (40) or underline (50)."""
    if colour < 8:
        return str(base + colour)
    if colour < 16:
        return str(base + 60 + colour - 8)
    if colour < RGB:
        return f"{base + 8};5;{colour & 0xFF}"
    rgb = colour - RGB
    return f"{base + 8};2;{rgb >> 16};{(rgb >> 8) & 0xFF};{rgb & 0xFF}"


def _attr_sgr(attr: Tuple[int, int, int, int, int]) -> str:
    """SGR parameters (no ``CSI``/``m``) turning a reset pen into ``attr``; "" for default."""
    flags, underline, fg, bg, ulc = attr
    parts = [number for bit, number in _FLAG_SGR if flags & bit]
    if underline:
        parts.append("4" if underline == 1 else f"4:{underline}")
    if fg != DEFAULT_COLOUR:
        parts.append(_colour_sgr(fg, 30))
    if bg != DEFAULT_COLOUR:
        parts.append(_colour_sgr(bg, 40))
    if ulc != DEFAULT_COLOUR:
        parts.append(_colour_sgr(ulc, 50))  # always PALETTE or RGB: SGR 58 sets it
    return ";".join(parts)


class Cell(NamedTuple):
    """One screen cell as read by prediction: glyph ("" for the right half of a wide char;
    base plus combining marks), columns it takes (0 for a right half) and its SGR parameters
    ("" for the default pen)."""
    char: str
    width: int
    sgr: str


class _Line:
    """One row: parallel lists of glyphs and attribute ids. A wide glyph's right half is ""."""
    __slots__ = ("chars", "attrs", "wrapped")

    def __init__(self, cols: int, attr: int = 0) -> None:
        self.chars = [" "] * cols
        self.attrs = [attr] * cols
        self.wrapped = False  # the cursor wrapped from this row onto the next one


class _Saved(NamedTuple):
    """What DECSC saves: position, pen, pending wrap, origin mode, charsets."""
    x: int
    y: int
    pen: int
    wrap_pending: bool
    origin: bool
    charsets: Tuple[str, ...]
    gl: int


class _Buffer:
    """The main or the alternate screen: its rows, DECSC slot and kitty keyboard stack."""

    def __init__(self, rows: int, cols: int) -> None:
        self.lines = [_Line(cols) for _ in range(rows)]
        self.saved: Optional[_Saved] = None
        self.kitty_flags: List[int] = []


# One regex splits text into the tokens that make up nearly all real output; anything it
# cannot match at a position (split or malformed sequences) goes to the slow path.
_TOKEN = re.compile(
    r"([^\x00-\x1f\x7f-\x9f]+)"  # 1: printable run
    r"|(\r\n)"  # 2: the commonest pair of controls, in one step
    r"|\x1b\[([0-9;:]*)m([^\x00-\x1f\x7f-\x9f]*)"  # 3, 4: SGR and the text it colours
    r"|\x1b\[([\x30-\x3f]*)([\x20-\x2f]*)([\x40-\x7e])"  # 5-7: CSI params, intermediates, final
    r"|([\x00-\x1a\x1c-\x1f\x7f-\x9f])"  # 8: one control (not ESC)
    r"|\x1b([\x20-\x2f]*)((?<=[\x20-\x2f])[\x30-\x7e]|[\x30-\x4f\x51-\x57\x59\x5a\x5c\x60-\x7e])"
    r"|\x1b([\]PX^_])"  # 11: string opener: OSC, DCS, SOS, PM, APC
    r"|(\x1b)")  # 12: an ESC nothing above takes: split by a chunk's end, or malformed
# Lines bulk output is made of: printable ASCII and short SGRs, each line ending in CR LF.
# (Unrolled, "normal* (special normal*)*": no nested quantifier can backtrack badly.)
_PLAIN_LINES = re.compile(r"(?:[\x20-\x7e]*(?:\x1b\[[0-9;]{0,64}m[\x20-\x7e]*)*\r\n)+")
_PRINTABLE_ASCII = bytes(range(0x20, 0x7f))
_SGR_IN_LINE = re.compile(r"\x1b\[([0-9;]*)m")
_CSI_BODY = re.compile(r"([\x30-\x3f]*)([\x20-\x2f]*)")
_STRING_END = re.compile(r"[\x07\x18\x1a\x1b\x9c]")
# A painted row (SGR, CHA, EL, glyphs) printing a glyph before any move (CHA never leads).
_STARTS_WITH_GLYPH = re.compile(r"(?:\x1b\[[0-9;:]*m)*[^\x1b]")
_CONTROLS_IN_TITLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_MOUSE_TRACKING = (9, 1000, 1001, 1002, 1003)
_MOUSE_ENCODINGS = (1005, 1006, 1015)
_ALT_SCREEN_MODES = (47, 1047, 1049)
# DEC private modes that are plain flags, attribute name -> default.
_DEC_FLAGS = {1: "cursor_keys_app", 5: "reverse_video", 7: "autowrap", 25: "cursor_visible",
              1004: "focus_events", 1007: "alternate_scroll",
              2004: "bracketed_paste", 2026: "sync_output"}
_FLAG_DEFAULTS = {"cursor_keys_app": False, "reverse_video": False, "autowrap": True,
                  "cursor_visible": True, "keypad_app": False, "focus_events": False,
                  "alternate_scroll": False, "bracketed_paste": False, "sync_output": False}
# Window operations (CSI Ps t) that ask the terminal for a reply.
_WINDOW_QUERIES = frozenset((11, 13, 14, 15, 16, 18, 19, 20, 21))
_KNOWN_OSC = frozenset(("7", "8", "9", "104", "105", "110", "111", "112", "117", "119", "133",
                        "633", "777", "1337"))


def _int_params(params: str) -> List[int]:
    """``1;;5:2`` -> [1, 0, 5]: fields (sub-parameters dropped), missing = 0, clamped."""
    values = []
    for field in params.split(";", MAX_PARAMS)[:MAX_PARAMS]:
        head = field.split(":", 1)[0]
        if head.isdigit():
            values.append(int(head) if len(head) < 6 else MAX_PARAM_VALUE)
        else:
            values.append(0)
    return [min(v, MAX_PARAM_VALUE) for v in values]


class _Unseen(NamedTuple):
    """Plain lines of one length at the start of a flood's chunk, enough of them before the
    rest that they scroll past without ever showing (see Terminal._plain_lines_to_end)."""
    count: int
    width: int  # characters in each line
    end: int  # where they end in the text (after the last one's CR LF)
    glyph: Optional[str]  # the last one's last character (None when they are empty)

    @classmethod
    def of(cls, text: str, pos: int, count: int) -> Optional[_Unseen]:
        """The first ``count`` lines of ``text`` from ``pos`` on (plain text, every CR and
        LF in CR LF pairs, as checked before) as an _Unseen, if they all have the first
        one's length: a CR at every (width + 2)th character from the first one's, an LF
        after each."""
        cr = text.find("\r\n", pos)
        step = cr - pos + 2
        end = pos + count * step
        if (end <= len(text) and text[cr:end:step] == "\r" * count
                and text[cr + 1:end:step] == "\n" * count):
            return cls(count, step - 2, end, text[end - 3] if step > 2 else None)
        return None

    def rows(self, cols: int) -> int:
        """The rows they take on a screen ``cols`` wide (an empty line takes one)."""
        return self.count * (-(-self.width // cols) or 1)


class Terminal:
    """A VT screen model: feed it output bytes, read cells, modes and cursor, serialize it."""

    def __init__(self, rows: int = 24, cols: int = 80,
                 history_limit: int = DEFAULT_HISTORY_LINES) -> None:
        self.rows = min(max(int(rows), 1), MAX_ROWS)
        self.cols = min(max(int(cols), 2), MAX_COLS)
        # Rows scrolled off the top of the main screen, oldest first, stored compactly as
        # (glyphs, attributes, wrapped): glyphs as one str when every cell is one ASCII glyph
        # (else a tuple of cells); attribute values (tuples, not ids: history must not pin
        # the attribute table) as a 1-tuple when all cells share one, else one per cell.
        self.history: Deque[tuple] = deque(maxlen=max(0, int(history_limit)))
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # the start of an escape sequence cut by the end of a chunk
        self._raw: Optional[bytes] = None  # the chunk being parsed, if plain ASCII (feed)
        self._string: Optional[str] = None  # OSC/DCS/... being read: its opener
        self._string_parts: List[str] = []
        self._string_len = 0
        # Inside an over-long sequence: 0 when not; else the lowest final byte (0x40 for a
        # CSI, 0x30 for an ESC sequence) ending the part that is dropped.
        self._ignore_from = 0
        self.queries: Deque[bytes] = deque(maxlen=MAX_QUERIES)
        self.queries_total = 0
        self.unknown_count = 0
        self.last_unknown = ""
        self.uncertain = False
        self.scroll_count = 0
        self.main_scroll_count = 0  # of those, on the main screen
        self.bell_count = 0
        self.title: Optional[str] = None  # None: never set by the stream
        self.icon_name: Optional[str] = None
        self._title_stack: List[Tuple[Optional[str], Optional[str]]] = []
        self._attr_ids: Dict[Tuple[int, int, int, int, int], int] = {_DEFAULT_ATTR: 0}
        self._attrs: List[Tuple[int, int, int, int, int]] = [_DEFAULT_ATTR]
        self._sgr_text: Dict[int, str] = {}
        self._sgr_cache: Dict[Tuple[int, str], int] = {}
        self._erase_cache: Dict[int, int] = {}
        self._pen_texts: Dict[Tuple[int, int, int, int, int], str] = {}
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        """Power-on state (RIS): both screens blank, every mode at its default."""
        self.main = _Buffer(self.rows, self.cols)
        self.alt = _Buffer(self.rows, self.cols)
        self.buf = self.main
        self.alt_mode = 0  # which of 47/1047/1049 entered the alternate screen
        self.x = self.y = 0
        self.wrap_pending = False
        self.pen = 0
        self.top, self.bottom = 0, self.rows - 1
        self.tabs = set(range(8, self.cols, 8))
        self.charsets = ["B", "B", "B", "B"]
        self.gl = 0
        self._single_shift: Optional[int] = None
        self._last_glyph: Optional[str] = None
        self.insert_mode = False
        self.newline_mode = False
        self.origin_mode = False
        for name, default in _FLAG_DEFAULTS.items():
            setattr(self, name, default)
        self.cursor_blink: Optional[bool] = None  # ?12 as set; None: the terminal's default
        self.cursor_style = 0  # DECSCUSR
        self.mouse_tracking = 0  # 0 or one of _MOUSE_TRACKING
        self.mouse_encoding = 0  # 0 or one of _MOUSE_ENCODINGS
        self.modify_keys: Dict[int, int] = {}  # XTMODKEYS resource -> value
        self.other_modes: Dict[int, bool] = {}

    # ------------------------------------------------------------------ read access

    @property
    def alt_screen(self) -> bool:
        """True while an application shows the alternate screen."""
        return self.buf is self.alt

    @property
    def g0_charset(self) -> str:
        """The designation of the charset printing now ("B" ASCII, "0" DEC graphics, "A")."""
        return self.charsets[self.gl]

    @property
    def cursor(self) -> Tuple[int, int, bool]:
        """(row, col, pending wrap), 0-based; col stays on the last column while wrap pends."""
        return self.y, self.x, self.wrap_pending

    @property
    def in_ground_state(self) -> bool:
        """No escape sequence, string or UTF-8 character is half-read."""
        return (not self._pending and self._string is None and not self._ignore_from
                and not self._decoder.getstate()[0])

    def cell(self, row: int, col: int) -> Cell:
        """The cell at (row, col) of the screen shown now."""
        line = self.buf.lines[row]
        char = line.chars[col]
        if char == "":
            width = 0
        elif col + 1 < self.cols and line.chars[col + 1] == "":
            width = 2
        else:
            width = 1
        return Cell(char, width, self.sgr(line.attrs[col]))

    def sgr(self, attr: int) -> str:
        """SGR parameters for an attribute id ("" for default)."""
        text = self._sgr_text.get(attr)
        if text is None:
            text = self._sgr_text[attr] = _attr_sgr(self._attrs[attr])
        return text

    def line_text(self, row: int) -> str:
        """Row ``row`` of the shown screen as text, trailing blanks removed."""
        return "".join(self.buf.lines[row].chars).rstrip(" ")

    def display(self) -> List[str]:
        """Every row of the shown screen as text (see ``line_text``)."""
        return [self.line_text(row) for row in range(self.rows)]

    def take_queries(self) -> List[bytes]:
        """The queries seen since the last call, oldest first (at most MAX_QUERIES)."""
        queries = list(self.queries)
        self.queries.clear()
        return queries

    # ------------------------------------------------------------------ attributes

    def _intern(self, attr: Tuple[int, int, int, int, int]) -> int:
        ident = self._attr_ids.get(attr)
        if ident is None:
            if len(self._attrs) >= self._attr_limit():
                self._compact_attrs()
            ident = self._attr_ids[attr] = len(self._attrs)
            self._attrs.append(attr)
        return ident

    def _attr_limit(self) -> int:
        return MAX_ATTRS + 2 * self.rows * self.cols

    def _compact_attrs(self) -> None:
        """Renumber the attributes still in use (cells, pens, saved cursors) and forget the
        rest, so truecolour floods cannot grow the table without bound."""
        saved = [b.saved for b in (self.main, self.alt) if b.saved is not None]
        used = {0, self.pen, *(s.pen for s in saved)}
        for buffer in (self.main, self.alt):
            for line in buffer.lines:
                used.update(line.attrs)
        old = self._attrs
        order = sorted(used)
        remap = {o: n for n, o in enumerate(order)}
        self._attrs = [old[o] for o in order]
        self._attr_ids = {a: n for n, a in enumerate(self._attrs)}
        self._sgr_text.clear()
        self._sgr_cache.clear()
        self._erase_cache.clear()
        for buffer in (self.main, self.alt):
            for line in buffer.lines:
                line.attrs = [remap[a] for a in line.attrs]
            if buffer.saved is not None:
                buffer.saved = buffer.saved._replace(pen=remap[buffer.saved.pen])
        self.pen = remap[self.pen]

    def _erase_attr(self, pen: Optional[int] = None) -> int:
        """Attribute of erased cells: the pen's (or ``pen``'s) background only (xterm's
        BCE)."""
        if pen is None:
            pen = self.pen
        if pen == 0:
            return 0
        erase = self._erase_cache.get(pen)
        if erase is None:
            bg = self._attrs[pen][3]
            erase = self._intern((0, 0, DEFAULT_COLOUR, bg, DEFAULT_COLOUR))
            self._erase_cache[pen] = erase
        return erase

    # ------------------------------------------------------------------ parser

    def feed(self, data: bytes) -> None:
        """Apply output bytes to the model. Any chunking gives the same result; never raises
        on any input (unknown sequences are skipped and counted in ``unknown_count``)."""
        text = self._decoder.decode(data)
        if self._pending:
            text, self._pending = self._pending + text, ""
        if text:
            # ASCII bytes that decoded one to one (nothing carried over from the last chunk)
            # are ``text`` as bytes: the bulk path checks them in place (_plain_lines_to_end)
            self._ascii = data if len(data) == len(text) and data.isascii() else None
            self._parse(text)
            self._ascii = None

    def _parse(self, text: str) -> None:
        sgr_cache = self._sgr_cache
        print_text = self._print
        pos, end = 0, len(text)
        while pos < end:
            if self._string is not None:
                pos = self._string_feed(text, pos)
                continue
            if self._ignore_from:
                pos = self._ignore_feed(text, pos)
                continue
            # The ground state: every character belongs to some token (the last alternative
            # takes a lone ESC), so tokens follow each other until one opens a string, plain
            # lines are taken in bulk, or an ESC needs the slow path.
            for token in _TOKEN.finditer(text, pos):
                kind = token.lastindex
                if kind == 1:
                    print_text(token[1])
                elif kind == 4:
                    pen = sgr_cache.get((self.pen, token[3]))
                    if pen is not None:
                        self.pen = pen
                    elif token.start(4) - token.start() > MAX_SEQUENCE_CHARS:
                        self._flag("over-long CSI", uncertain=True)
                    else:
                        self._csi(token[3], "", "m")
                    if token[4]:
                        print_text(token[4])
                elif kind == 2:
                    after = self._crlf(text, token.end())
                    if after != token.end():
                        pos = after
                        break
                elif kind == 7:
                    if token.end() - token.start() > MAX_SEQUENCE_CHARS:
                        self._flag("over-long CSI", uncertain=True)
                    else:
                        self._csi(token[5], token[6], token[7])
                elif kind == 8:
                    self._control(token[8])
                elif kind == 10:
                    if token.end() - token.start() > MAX_SEQUENCE_CHARS:
                        self._flag("over-long escape sequence", uncertain=True)
                    else:
                        self._esc(token[9], token[10])
                elif kind == 11:
                    self._string = token[11]
                    self._string_parts = []
                    self._string_len = 0
                    pos = token.end()
                    break
                else:
                    pos = self._slow(text, token.start())
                    break
            else:
                pos = end

    def _slow(self, text: str, pos: int) -> int:
        """An ESC the token regex could not take: cut by the chunk's end, carrying controls,
        or malformed. Returns where parsing continues."""
        end = len(text)
        if pos + 1 >= end:
            self._pending = text[pos:]
            return end
        nxt = text[pos + 1]
        if nxt == "[":
            return self._slow_csi(text, pos)
        if "\x20" <= nxt <= "\x2f":
            j = pos + 1
            while j < end and "\x20" <= text[j] <= "\x2f":
                j += 1
            if j - pos >= MAX_SEQUENCE_CHARS:
                self._flag("over-long escape sequence", uncertain=True)
                self._ignore_from = 0x30
                return pos + MAX_SEQUENCE_CHARS
            if j >= end:
                self._pending = text[pos:]
                return end
            self._flag("malformed escape sequence", uncertain=True)
            return j
        if nxt not in "\x1b\x18\x1a":  # ESC ESC restarts; CAN/SUB cancel quietly
            self._flag("malformed escape sequence", uncertain=True)
        return pos + 1

    def _slow_csi(self, text: str, pos: int) -> int:
        """A CSI with C0 controls inside (they act at once, as on a VT), cut by the chunk's
        end, over-long, aborted by ESC/CAN/SUB, or malformed."""
        end = len(text)
        controls = []
        j = pos + 2
        while j < end:
            code = ord(text[j])
            if 0x40 <= code <= 0x7E:
                break
            if code < 0x20:
                if code == 0x1B:
                    self._flag("CSI cut by ESC", uncertain=True)
                    self._run_controls(controls)
                    return j
                if code in (0x18, 0x1A):
                    self._run_controls(controls)
                    return j + 1
                controls.append(text[j])
            elif code > 0x7F:
                self._flag("malformed CSI", uncertain=True)
                self._run_controls(controls)
                return j
            j += 1
            if j - pos >= MAX_SEQUENCE_CHARS:
                self._flag("over-long CSI", uncertain=True)
                self._run_controls(controls)
                self._ignore_from = 0x40
                return j
        else:
            self._pending = text[pos:]
            return end
        self._run_controls(controls)
        body = "".join(ch for ch in text[pos + 2:j] if ch >= "\x20" and ch != "\x7f")
        parts = _CSI_BODY.fullmatch(body)
        if parts is None:
            self._flag("malformed CSI", uncertain=True)
        else:
            self._csi(parts.group(1), parts.group(2), text[j])
        return j + 1

    def _run_controls(self, controls: List[str]) -> None:
        for control in controls:
            self._control(control)

    def _ignore_feed(self, text: str, pos: int) -> int:
        """Drop the rest of an over-long sequence up to its final byte; controls still act."""
        end = len(text)
        while pos < end:
            ch = text[pos]
            code = ord(ch)
            if self._ignore_from <= code <= 0x7E or code > 0x7F:
                self._ignore_from = 0
                return pos + 1 if code <= 0x7E else pos
            if code < 0x20:
                if code in (0x1B, 0x18, 0x1A):
                    self._ignore_from = 0
                    return pos if code == 0x1B else pos + 1
                if self._ignore_from == 0x30:
                    self._ignore_from = 0  # escape sequences end at a control
                    return pos
                self._control(ch)
            pos += 1
        return end

    def _string_feed(self, text: str, pos: int) -> int:
        """Collect an OSC/DCS/SOS/PM/APC string up to BEL, ST (ESC \\ or U+009C), CAN/SUB."""
        found = _STRING_END.search(text, pos)
        if found is None:
            self._string_add(text[pos:])
            return len(text)
        j = found.start()
        self._string_add(text[pos:j])
        ch = text[j]
        if ch == ESC:
            if j + 1 >= len(text):
                self._pending = ESC  # ST or a new sequence: decided by the next chunk
                return len(text)
            self._string_end()
            return j + 2 if text[j + 1] == "\\" else j
        if ch in "\x07\x9c":
            self._string_end()
        else:  # CAN/SUB abort the string
            self._string = None
        return j + 1

    def _string_add(self, piece: str) -> None:
        room = MAX_STRING_CHARS - self._string_len
        if room > 0 and piece:
            piece = piece[:room]
            self._string_parts.append(piece)
            self._string_len += len(piece)

    def _string_end(self) -> None:
        kind, body = self._string, "".join(self._string_parts)
        self._string, self._string_parts, self._string_len = None, [], 0
        if kind == "]":
            self._osc(body)
        elif kind == "P" and body[:2] in ("$q", "+q"):  # DECRQSS, XTGETTCAP
            self._query(ESC + "P" + body + ESC + "\\")

    def _flag(self, what: str, uncertain: bool = False) -> None:
        """Note a sequence the model skipped; ``uncertain`` if it may have changed cells."""
        self.unknown_count += 1
        self.last_unknown = what
        if uncertain:
            self.uncertain = True

    def _query(self, sequence: str) -> None:
        self.queries.append(sequence.encode("utf-8", "replace"))
        self.queries_total += 1

    # ------------------------------------------------------------------ printing

    def _print(self, text: str) -> None:
        if self._single_shift is not None:
            table = _CHARSETS[self.charsets[self._single_shift]]
            self._single_shift = None
            first = text[0]
            self._print_chars(first.translate(table) if table else first)
            text = text[1:]
            if not text:
                return
        table = _CHARSETS[self.charsets[self.gl]]
        if table is not None:
            text = text.translate(table)
        if text.isascii() and not self.insert_mode:
            x = self.x
            stop = x + len(text)
            if stop < self.cols and not self.wrap_pending:  # fits in the row: the commonest
                line = self.buf.lines[self.y]
                chars = line.chars
                if chars[x] == "" and x:
                    chars[x - 1] = " "  # we overwrite the right half of a wide glyph
                if chars[stop] == "":
                    chars[stop] = " "  # ... or the left half
                chars[x:stop] = text
                line.attrs[x:stop] = [self.pen] * len(text)
                self.x = stop
            else:
                self._print_ascii(text)
            self._last_glyph = text[-1]
        else:
            self._print_chars(text)

    def _print_ascii(self, text: str) -> None:
        """The fast path: one-column glyphs written by slices."""
        cols = self.cols
        pen = self.pen
        i, n = 0, len(text)
        while i < n:
            if self.wrap_pending:
                self._wrap()
            x = self.x
            line = self.buf.lines[self.y]
            chars = line.chars
            k = min(cols - x, n - i)
            stop = x + k
            if chars[x] == "" and x:
                chars[x - 1] = " "  # we overwrite the right half of a wide glyph
            if stop < cols and chars[stop] == "":
                chars[stop] = " "  # ... or the left half
            chars[x:stop] = text[i:i + k]
            line.attrs[x:stop] = [pen] * k
            i += k
            if stop < cols:
                self.x = stop
            elif self.autowrap:
                self.x = cols - 1
                self.wrap_pending = True
            else:
                self.x = cols - 1
                if i < n:  # without autowrap the rest lands on the last column
                    chars[cols - 1] = text[n - 1]
                    i = n

    def _print_chars(self, text: str) -> None:
        """Any glyphs: wide ones take two cells, 0-wide ones join the previous cell."""
        cols = self.cols
        for ch in text:
            width = char_width(ch)
            if width == 0:
                self._combine(ch)
                continue
            if self.wrap_pending:
                self._wrap()
            if width == 2 and self.x == cols - 1:
                if not self.autowrap:
                    continue  # a wide glyph cannot fit: dropped, as xterm does
                self.buf.lines[self.y].wrapped = True
                self.x = 0
                self._linefeed()
            x = self.x
            line = self.buf.lines[self.y]
            if self.insert_mode:
                self._insert_blanks(line, x, width, 0)
            chars, attrs = line.chars, line.attrs
            if chars[x] == "" and x:
                chars[x - 1] = " "
            after = x + width
            if after < cols and chars[after] == "":
                chars[after] = " "
            chars[x] = ch
            attrs[x] = self.pen
            if width == 2:
                chars[x + 1] = ""
                attrs[x + 1] = self.pen
            self._last_glyph = ch
            if after < cols:
                self.x = after
            else:
                self.x = cols - 1
                self.wrap_pending = self.autowrap

    def _combine(self, mark: str) -> None:
        x = self.x if self.wrap_pending else self.x - 1
        if x < 0:
            return
        chars = self.buf.lines[self.y].chars
        if chars[x] == "" and x:
            x -= 1
        if len(chars[x]) < MAX_COMBINING_CHARS:
            chars[x] += mark

    def _wrap(self) -> None:
        self.buf.lines[self.y].wrapped = True
        self.x = 0
        self.wrap_pending = False
        self._linefeed()

    # ------------------------------------------------------------------ controls

    def _control(self, ch: str) -> None:
        if ch == "\r":
            self.x = 0
            self.wrap_pending = False
        elif ch in "\n\x0b\x0c":
            self._linefeed()
            if self.newline_mode:
                self.x = 0
                self.wrap_pending = False
        elif ch == "\x08":
            self.wrap_pending = False
            self.x = max(self.x - 1, 0)
        elif ch == "\t":
            self._tab_forward(1)
        elif ch == "\x07":
            self.bell_count += 1
        elif ch == "\x0e":
            self.gl = 1
        elif ch == "\x0f":
            self.gl = 0
        # NUL, DEL, the rest of C0 and C1: nothing (UTF-8 terminals ignore C1 code points)

    def _crlf(self, text: str, pos: int) -> int:
        """CR LF ending at ``pos``. On the bottom row of a whole-screen region, the plain
        lines that follow (printable ASCII, each ending in CR LF) are taken in one step, as
        bulk output (cat, logs, yes) is: returns where parsing goes on."""
        self.x = 0
        self.wrap_pending = False
        if (self.y == self.rows - 1 == self.bottom and not self.top and self.autowrap
                and not self.insert_mode and self._single_shift is None
                and _CHARSETS[self.charsets[self.gl]] is None):
            plain = self._plain_lines_to_end(text, pos, self._rows_that_show(), self._ascii)
            if plain is not None:
                lines, stop, unseen = plain
                self._scroll_in(lines, unseen)
                return stop
            block = _PLAIN_LINES.match(text, pos)
            if block is not None:
                taken = block.group()
                lines = taken.split("\r\n")[:-1]
                if ESC not in taken:
                    self._scroll_in(lines)
                    return block.end()
                # each SGR may add a pen and its erase attribute: none may renumber ids
                if len(self._attrs) + 2 * taken.count(ESC) + 2 < self._attr_limit():
                    self._scroll_in_coloured(lines)
                    return block.end()
        self._linefeed()
        return pos

    @staticmethod
    def _plain_lines_to_end(text: str, pos: int, kept: int = 0, raw: Optional[bytes] = None
                            ) -> Optional[Tuple[List[str], int, Optional[_Unseen]]]:
        """The lines from ``pos`` to the last CR LF of ``text`` and where they end, if all of
        them are plain (printable ASCII, each ending in CR LF), else None. What a flood's
        chunk (base64, logs, ``yes``) looks like; checked with a few whole-string C
        operations rather than the regex, which costs more than everything else a plain
        line needs.

        When more than ``kept`` lines come and all but the last ``kept`` have one length
        (fixed-width output: base64, hex dumps, ``yes``), those scroll past without ever
        showing: they are described (``_Unseen``) after two stride slices, never split
        into strings, which would cost most of a flood's time here. Else every line is
        returned, and None.

        ``raw`` is ``text`` as bytes when it is all ASCII: its non-printable characters
        are then taken from the whole chunk, less those around the lines, so that a flood's
        chunk is never copied whole (each MB-sized copy is fresh memory the allocator hands
        back soon after: page faults that cost as much as the copy)."""
        last = text.rfind("\r\n", pos)
        if last < 0:
            return None
        stop = last + 2
        if raw is not None and pos + len(raw) - stop <= PLAIN_EDGE_CHARS:
            others = raw.translate(None, _PRINTABLE_ASCII)
            before = len(raw[:pos].translate(None, _PRINTABLE_ASCII))
            after = len(raw[stop:].translate(None, _PRINTABLE_ASCII))
            others = others[before:len(others) - after]
        else:
            taken = text[pos:stop]
            if not taken.isascii():
                return None
            others = taken.encode("ascii").translate(None, _PRINTABLE_ASCII)
        # What is not printable ASCII must be exactly the CR LF pairs ending the lines.
        pairs = len(others) // 2
        if others != b"\r\n" * pairs:
            return None
        if kept and pairs > kept:
            unseen = _Unseen.of(text, pos, pairs - kept)
            if unseen is not None:
                lines = text[unseen.end:stop].split("\r\n")
                lines.pop()  # the empty text after the last CR LF
                # Every CR and LF is in one of the pairs counted: the unseen lines held
                # theirs at the stride, so these lines hold the rest, and each is a pair.
                if len(lines) == kept:
                    return lines, stop, unseen
        lines = text[pos:stop].split("\r\n")
        lines.pop()  # the empty text after the last CR LF
        return (lines, stop, None) if 2 * len(lines) == len(others) else None

    def _scroll_out(self, count: int) -> Tuple[Optional[Deque], int]:
        """Make room for ``count`` rows scrolling in at the bottom of a whole-screen region:
        the rows they push off go to history (main screen only). Returns the history to add
        to (None when there is none) and how many of the incoming rows pass straight through
        to it without ever showing."""
        screen = self.buf.lines
        history = self.history if self.buf is self.main and self.history.maxlen else None
        gone = min(count, self.rows)
        if history is not None:
            history.extend(map(self._store, screen[:gone]))
        del screen[:gone]
        return history, count - self.rows if count > self.rows else 0

    def _rows_that_show(self) -> int:
        """The rows that can still be seen: the screen's, and history's on the main one."""
        keeps_history = self.buf is self.main and self.history.maxlen
        return self.rows + (self.history.maxlen if keeps_history else 0)

    def _scroll_in(self, lines: List[str], unseen: Optional[_Unseen] = None) -> None:
        """What LF, then each of ``lines`` and CR LF, do with the cursor on the bottom row of
        a whole-screen region (after the ``unseen`` lines, if any): every row the screen
        scrolls past goes straight to history. Only the rows that can still be seen (the
        screen, and history as far as it reaches back) are built; the lines before them
        only count (how many rows they wrapped into). Built from C-level list and iterator
        operations where it can: bulk output's speed is decided here."""
        cols = self.cols
        pen, erase = self.pen, self._erase_attr()
        kept = self._rows_that_show()
        for line in reversed(lines):
            if line:
                self._last_glyph = line[-1]
                break
        else:
            if unseen is not None and unseen.glyph is not None:
                self._last_glyph = unseen.glyph
        # +1 everywhere: the row the last CR LF leaves blank
        before = 0 if unseen is None else unseen.rows(cols)
        if max(map(len, lines)) <= cols:  # no line wraps: one row each
            count = before + len(lines) + 1
            glyph_rows = lines[-kept:] if kept < count else lines[:]
            wrapped_rows = None
        else:
            count = before + 1 + sum(number * (-(-length // cols) or 1)
                                     for length, number in Counter(map(len, lines)).items())
            glyph_rows, wrapped_rows = [], []
            start = len(lines)
            taken = 1
            while start and taken < kept:  # the lines whose rows can show, from the end
                start -= 1
                taken += -(-len(lines[start]) // cols) or 1
            for line in lines[start:]:
                if len(line) <= cols:
                    glyph_rows.append(line)
                    wrapped_rows.append(False)
                else:
                    parts = [line[i:i + cols] for i in range(0, len(line), cols)]
                    glyph_rows.extend(parts)
                    wrapped_rows.extend([True] * (len(parts) - 1))
                    wrapped_rows.append(False)
        glyph_rows.append("")
        # glyph_rows holds the last rows scrolling in: row i of all ``count`` is
        # glyph_rows[i - skipped]
        skipped = count - len(glyph_rows)
        screen = self.buf.lines
        history, passing = self._scroll_out(count)
        if history is not None and passing:
            first = max(0, passing - history.maxlen) - skipped
            passing -= skipped
            flags = repeat(False) if wrapped_rows is None else wrapped_rows[first:passing]
            pen_attr, erase_attr = self._attrs[pen], self._attrs[erase]
            if pen_attr == erase_attr:  # the usual case: one attribute per row
                history.extend(zip(map(str.ljust, glyph_rows[first:passing], repeat(cols)),
                                   repeat((pen_attr,)), flags))
            else:
                for glyphs, wrapped in zip(glyph_rows[first:passing], flags):
                    used = len(glyphs)
                    history.append((glyphs.ljust(cols), (pen_attr,) if used == cols else (
                        erase_attr,) if not used else
                        (pen_attr,) * used + (erase_attr,) * (cols - used), wrapped))
        else:
            passing -= skipped
        last = len(glyph_rows) - 1
        for i in range(passing, last + 1):
            line = _Line.__new__(_Line)
            glyphs = glyph_rows[i]
            used = len(glyphs)
            line.chars = list(glyphs.ljust(cols))
            line.attrs = [pen] * used + [erase] * (cols - used)
            line.wrapped = wrapped_rows is not None and i < last and wrapped_rows[i]
            screen.append(line)
        self._scrolled(count)

    def _scroll_in_coloured(self, lines: List[str]) -> None:
        """``_scroll_in`` for lines with SGRs in them (coloured listings, compiler output):
        each row's cells get the pen in force when they were printed, blanks the erase
        attribute of the pen in force when the row scrolled in (at the CR LF before it, or
        when the glyph that wrapped onto it was printed). The caller made sure no SGR here
        can renumber attribute ids (see _compact_attrs)."""
        cols = self.cols
        rows_in: List[Tuple[str, List[int], bool]] = []  # (glyphs, attribute ids, wrapped)
        erase = self._erase_attr()
        for line in lines:
            glyphs: List[str] = []
            cells: List[int] = []
            for i, part in enumerate(_SGR_IN_LINE.split(line)):
                if i % 2:
                    self._csi(part, "", "m")
                elif part:
                    glyphs.append(part)
                    cells.extend([self.pen] * len(part))
            text = "".join(glyphs)
            if text:
                self._last_glyph = text[-1]
            for start in range(0, max(len(text), 1), cols):
                if start:  # a wrap scrolled this row in, with the pen of its first glyph
                    erase = self._erase_attr(cells[start])
                row = text[start:start + cols]
                rows_in.append((row, cells[start:start + cols] + [erase] * (cols - len(row)),
                                start + cols < len(text)))
            erase = self._erase_attr()  # the CR LF scrolls in a row with this
        rows_in.append(("", [erase] * cols, False))
        count = len(rows_in)
        screen = self.buf.lines
        history, passing = self._scroll_out(count)
        if history is not None and passing:
            history.extend(self._stored(glyphs.ljust(cols), cells, wrapped) for glyphs, cells,
                           wrapped in rows_in[max(0, passing - history.maxlen):passing])
        for glyphs, cells, wrapped in rows_in[passing:]:
            line = _Line.__new__(_Line)
            line.chars = list(glyphs.ljust(cols))
            line.attrs = cells
            line.wrapped = wrapped
            screen.append(line)
        self._scrolled(count)

    def _linefeed(self) -> None:
        if self.y != self.bottom:
            if self.y < self.rows - 1:
                self.y += 1
        elif self.top == 0 and self.bottom == self.rows - 1:
            # the whole screen moves up one row: the commonest scroll, done here in one step
            lines = self.buf.lines
            gone = lines.pop(0)
            fresh = _Line.__new__(_Line)
            fresh.chars = [" "] * self.cols
            fresh.attrs = [self._erase_attr() if self.pen else 0] * self.cols
            fresh.wrapped = False
            lines.append(fresh)
            if self.buf is self.main and self.history.maxlen:
                self.history.append(self._store(gone))
            self._scrolled(1)
        else:
            self._scroll_up(1)

    def _scrolled(self, count: int) -> None:
        self.scroll_count += count
        if self.buf is self.main:
            self.main_scroll_count += count

    def _reverse_index(self) -> None:
        if self.y == self.top:
            self._scroll_down(1)
        elif self.y > 0:
            self.y -= 1

    def _tab_forward(self, count: int) -> None:
        x = self.x
        for _ in range(min(count, self.cols)):
            x = min((t for t in self.tabs if t > x), default=self.cols - 1)
        if x != self.x:
            self.wrap_pending = False
        self.x = x

    def _tab_back(self, count: int) -> None:
        x = self.x
        for _ in range(min(count, self.cols)):
            x = max((t for t in self.tabs if t < x), default=0)
        self.x = x
        self.wrap_pending = False

    # ------------------------------------------------------------------ scrolling & editing

    def _blank_lines(self, count: int) -> List[_Line]:
        attr = self._erase_attr()
        return [_Line(self.cols, attr) for _ in range(count)]

    def _scroll_up(self, count: int, top: Optional[int] = None) -> None:
        """Move rows top..bottom up by ``count``; rows leaving the top of the main screen go
        to history when the region starts at the first row."""
        top = self.top if top is None else top
        lines = self.buf.lines
        count = min(count, self.bottom - top + 1)
        if count <= 0:
            return
        gone = lines[top:top + count]
        del lines[top:top + count]
        lines[self.bottom + 1 - count:self.bottom + 1 - count] = self._blank_lines(count)
        if top == 0 and self.buf is self.main and self.history.maxlen:
            self.history.extend(map(self._store, gone))
        self._scrolled(count)

    def _scroll_down(self, count: int, top: Optional[int] = None) -> None:
        top = self.top if top is None else top
        count = min(count, self.bottom - top + 1)
        if count <= 0:
            return
        lines = self.buf.lines
        del lines[self.bottom + 1 - count:self.bottom + 1]
        lines[top:top] = self._blank_lines(count)
        self._scrolled(count)

    def _erase(self, line: _Line, start: int, stop: int) -> None:
        """Blank columns start..stop-1, splitting wide glyphs cut at either edge."""
        start, stop = max(start, 0), min(stop, self.cols)
        if start >= stop:
            return
        chars = line.chars
        if chars[start] == "" and start:
            chars[start - 1] = " "
        if stop < self.cols and chars[stop] == "":
            chars[stop] = " "
        chars[start:stop] = " " * (stop - start)
        line.attrs[start:stop] = [self._erase_attr()] * (stop - start)
        if stop == self.cols:
            line.wrapped = False

    def _insert_blanks(self, line: _Line, x: int, count: int, attr: int) -> None:
        cols = self.cols
        count = min(count, cols - x)
        chars, attrs = line.chars, line.attrs
        if chars[x] == "" and x:
            chars[x - 1] = " "
            chars[x] = " "
        chars[x:x] = [" "] * count
        attrs[x:x] = [attr] * count
        del chars[cols:], attrs[cols:]
        last = chars[cols - 1]
        if last and char_width(last[0]) == 2:
            chars[cols - 1] = " "  # a wide glyph pushed half off the row

    def _delete_chars(self, count: int) -> None:
        line = self.buf.lines[self.y]
        x, cols = self.x, self.cols
        count = min(count, cols - x)
        chars, attrs = line.chars, line.attrs
        if chars[x] == "" and x:
            chars[x - 1] = " "
        if x + count < cols and chars[x + count] == "":
            chars[x + count] = " "
        del chars[x:x + count], attrs[x:x + count]
        chars.extend(" " * count)
        attrs.extend([self._erase_attr()] * count)

    def _erase_display(self, mode: int) -> None:
        lines = self.buf.lines
        if mode == 0:
            self._erase(lines[self.y], self.x, self.cols)
            rows = range(self.y + 1, self.rows)
        elif mode == 1:
            self._erase(lines[self.y], 0, self.x + 1)
            rows = range(self.y)
        elif mode == 2:
            rows = range(self.rows)
        elif mode == 3:
            self.history.clear()
            return
        else:
            return
        for row in rows:
            self._erase(lines[row], 0, self.cols)

    def _insert_lines(self, count: int, delete: bool) -> None:
        if not self.top <= self.y <= self.bottom:
            return
        if delete:
            self._scroll_up(count, top=self.y)
        else:
            self._scroll_down(count, top=self.y)
        self.x = 0
        self.wrap_pending = False

    # ------------------------------------------------------------------ cursor

    def _move_to(self, row: int, col: int) -> None:
        """Absolute move; ``row`` is relative to the region in origin mode."""
        if self.origin_mode:
            row = min(max(row + self.top, self.top), self.bottom)
        self.y = min(max(row, 0), self.rows - 1)
        self.x = min(max(col, 0), self.cols - 1)
        self.wrap_pending = False

    def _move_vertical(self, delta: int) -> None:
        """CUU/CUD: stop at the region's margin when starting inside it."""
        y = self.y + delta
        if delta < 0:
            y = max(y, self.top if self.y >= self.top else 0)
        else:
            y = min(y, self.bottom if self.y <= self.bottom else self.rows - 1)
        self.y = y
        self.wrap_pending = False

    def _save_cursor(self) -> None:
        self.buf.saved = _Saved(self.x, self.y, self.pen, self.wrap_pending, self.origin_mode,
                                tuple(self.charsets), self.gl)

    def _restore_cursor(self) -> None:
        saved = self.buf.saved
        if saved is None:
            saved = _Saved(0, 0, 0, False, False, ("B",) * 4, 0)
        self.x = min(saved.x, self.cols - 1)
        self.y = min(saved.y, self.rows - 1)
        self.pen = saved.pen
        self.wrap_pending = saved.wrap_pending and self.x == self.cols - 1
        self.origin_mode = saved.origin
        self.charsets = list(saved.charsets)
        self.gl = saved.gl

    # ------------------------------------------------------------------ ESC

    def _esc(self, inter: str, final: str) -> None:
        if not inter:
            action = self._ESC_ACTIONS.get(final)
            if action is not None:
                action(self)
            elif final == "Z":
                self._query(ESC + "Z")
            elif final == "\\":
                pass  # a stray ST
            else:
                self._flag("ESC " + final, uncertain=True)
        elif len(inter) == 1 and inter in _DESIGNATORS + _DESIGNATORS_96:
            slot = (_DESIGNATORS.find(inter) if inter in _DESIGNATORS
                    else _DESIGNATORS_96.find(inter) + 1)
            if final in _CHARSETS:
                self.charsets[slot] = final
            else:
                self.charsets[slot] = "B"
                self._flag("charset " + final, uncertain=True)
        elif inter == "#" and final == "8":
            self._decaln()
        elif inter in ("%", " "):
            pass  # UTF-8 select, 7/8-bit controls: nothing to model
        else:
            self._flag("ESC " + inter + final, uncertain=True)

    def _decaln(self) -> None:
        for line in self.buf.lines:
            line.chars[:] = "E" * self.cols
            line.attrs[:] = [0] * self.cols
            line.wrapped = False
        self.top, self.bottom = 0, self.rows - 1
        self.origin_mode = False
        self._move_to(0, 0)

    def _full_reset(self) -> None:
        title, icon = self.title, self.icon_name
        self._reset_state()
        self.title, self.icon_name = title, icon
        self._title_stack.clear()

    def _next_line(self) -> None:
        self.x = 0
        self.wrap_pending = False
        self._linefeed()

    def _single_shift_to(self, slot: int) -> None:
        self._single_shift = slot

    def _set_keypad(self, on: bool) -> None:
        self.keypad_app = on

    _ESC_ACTIONS = {
        "7": _save_cursor, "8": _restore_cursor, "D": _linefeed, "E": _next_line,
        "H": lambda self: self.tabs.add(self.x), "M": _reverse_index, "c": _full_reset,
        "=": lambda self: self._set_keypad(True), ">": lambda self: self._set_keypad(False),
        "N": lambda self: self._single_shift_to(2), "O": lambda self: self._single_shift_to(3),
        "n": lambda self: setattr(self, "gl", 2), "o": lambda self: setattr(self, "gl", 3),
    }

    # ------------------------------------------------------------------ CSI

    def _csi(self, params: str, inter: str, final: str) -> None:
        prefix = ""
        if params and params[0] in "<=>?":
            prefix, params = params[0], params[1:]
        if final == "m" and not prefix and not inter:
            key = (self.pen, params)
            pen = self._sgr_cache.get(key)
            if pen is None:
                pen = self._apply_sgr(params)
                if len(self._sgr_cache) > 4096:
                    self._sgr_cache.clear()  # the same dict object: _parse holds it
                self._sgr_cache[(self.pen, params)] = pen
            self.pen = pen
            return
        action = self._CSI_ACTIONS.get((prefix, inter, final))
        if action is not None:
            action(self, _int_params(params))
        elif self._is_query(prefix, inter, final, params):
            self._query(CSI + prefix + params + inter + final)
        else:
            self._flag(f"CSI {prefix}{params}{inter}{final}", uncertain=True)

    @staticmethod
    def _is_query(prefix: str, inter: str, final: str, params: str) -> bool:
        if inter == "$" and final == "p":
            return True  # DECRQM
        if not inter and final in "cn" and prefix in ("", ">", "=", "?"):
            return True  # DA1/DA2/DA3, DSR
        if not inter and final == "q" and prefix == ">":
            return True  # XTVERSION
        if not inter and final == "m" and prefix == "?":
            return True  # XTQMODKEYS
        if not inter and final == "u" and prefix == "?":
            return True  # kitty keyboard flags
        if not inter and final == "x" and not prefix:
            return True  # DECREQTPARM
        return not inter and final == "S" and prefix == "?"  # XTSMGRAPHICS

    def _cursor_up(self, p):
        self._move_vertical(-max(p[0] if p else 1, 1))

    def _cursor_down(self, p):
        self._move_vertical(max(p[0] if p else 1, 1))

    def _cursor_right(self, p):
        self.x = min(self.x + max(p[0] if p else 1, 1), self.cols - 1)
        self.wrap_pending = False

    def _cursor_left(self, p):
        self.x = max(self.x - max(p[0] if p else 1, 1), 0)
        self.wrap_pending = False

    def _next_lines(self, p):
        self._cursor_down(p)
        self.x = 0

    def _prev_lines(self, p):
        self._cursor_up(p)
        self.x = 0

    def _column(self, p):
        self.x = min(max(p[0] if p else 1, 1), self.cols) - 1
        self.wrap_pending = False

    def _row(self, p):
        row = max(p[0] if p else 1, 1) - 1
        self._move_to(row, self.x)

    def _row_relative(self, p):
        self._cursor_down(p)

    def _position(self, p):
        row = max(p[0], 1) if p else 1
        col = max(p[1], 1) if len(p) > 1 else 1
        self._move_to(row - 1, col - 1)

    def _erase_line(self, p):
        mode = p[0] if p else 0
        line = self.buf.lines[self.y]
        if mode == 0:
            self._erase(line, self.x, self.cols)
        elif mode == 1:
            self._erase(line, 0, self.x + 1)
        elif mode == 2:
            self._erase(line, 0, self.cols)

    def _erase_chars(self, p):
        self._erase(self.buf.lines[self.y], self.x, self.x + max(p[0] if p else 1, 1))
        self.wrap_pending = False

    def _insert_chars(self, p):
        self._insert_blanks(self.buf.lines[self.y], self.x, max(p[0] if p else 1, 1),
                            self._erase_attr())
        self.wrap_pending = False

    def _delete(self, p):
        self._delete_chars(max(p[0] if p else 1, 1))
        self.wrap_pending = False

    def _repeat(self, p):
        glyph = self._last_glyph
        if glyph is not None:
            count = min(max(p[0] if p else 1, 1), self.rows * self.cols)
            if glyph.isascii() and not self.insert_mode:
                self._print_ascii(glyph * count)
            else:
                self._print_chars(glyph * count)

    def _clear_tabs(self, p):
        mode = p[0] if p else 0
        if mode == 0:
            self.tabs.discard(self.x)
        elif mode == 3:
            self.tabs.clear()

    def _set_region(self, p):
        top = max(p[0], 1) if p else 1
        bottom = p[1] if len(p) > 1 and p[1] else self.rows
        bottom = min(bottom, self.rows)
        if top < bottom:
            self.top, self.bottom = top - 1, bottom - 1
            self._move_to(0, 0)

    def _window_op(self, p):
        op = p[0] if p else 0
        if op in (22, 23):
            which = p[1] if len(p) > 1 else 0
            if op == 22 and len(self._title_stack) < MAX_TITLE_STACK:
                self._title_stack.append((self.title, self.icon_name))
            elif op == 23 and self._title_stack:
                title, icon = self._title_stack.pop()
                if which in (0, 2):
                    self.title = title
                if which in (0, 1):
                    self.icon_name = icon
        elif op in _WINDOW_QUERIES:
            self._query(CSI + ";".join(map(str, p)) + "t")
        # other window operations (move, resize, raise...) change nothing on the screen

    def _cursor_style(self, p):
        style = p[0] if p else 0
        if style <= 6:
            self.cursor_style = style

    def _soft_reset(self, p):
        self.insert_mode = self.origin_mode = False
        self.cursor_visible, self.autowrap = True, True
        self.cursor_keys_app = self.keypad_app = False
        self.top, self.bottom = 0, self.rows - 1
        self.charsets, self.gl, self.pen = ["B"] * 4, 0, 0
        self.buf.saved = None

    def _modify_keys(self, p):
        if not p:
            self.modify_keys.clear()
        elif len(p) == 1 or p[0] > 7 or (p[1] == 0 and p[0] in (0, 4)):
            # no value (vim sends CSI > 4 ; m on exit), or 0 where 0 is the default: reset
            self.modify_keys.pop(p[0], None)
        else:
            self.modify_keys[p[0]] = p[1]

    def _modify_keys_off(self, p):
        if p:
            self.modify_keys.pop(p[0], None)

    def _kitty_push(self, p):
        stack = self.buf.kitty_flags
        if len(stack) >= MAX_KITTY_STACK:
            del stack[0]
        stack.append(p[0] if p else 0)

    def _kitty_pop(self, p):
        stack = self.buf.kitty_flags
        del stack[max(len(stack) - max(p[0] if p else 1, 1), 0):]

    def _kitty_set(self, p):
        stack = self.buf.kitty_flags
        flags = p[0] if p else 0
        mode = p[1] if len(p) > 1 else 1
        current = stack[-1] if stack else 0
        new = {1: flags, 2: current | flags, 3: current & ~flags}.get(mode, current)
        if stack:
            stack[-1] = new
        elif new:
            stack.append(new)

    def _ansi_modes(self, p, on):
        for mode in p:
            if mode == 4:
                self.insert_mode = on
            elif mode == 20:
                self.newline_mode = on
            else:
                self._flag(f"ANSI mode {mode}")

    def _set_ansi(self, p):
        self._ansi_modes(p, True)

    def _reset_ansi(self, p):
        self._ansi_modes(p, False)

    def _set_dec(self, p):
        for mode in p:
            self._dec_mode(mode, True)

    def _reset_dec(self, p):
        for mode in p:
            self._dec_mode(mode, False)

    def _dec_mode(self, mode: int, on: bool) -> None:
        name = _DEC_FLAGS.get(mode)
        if name is not None:
            setattr(self, name, on)
            if mode == 7 and not on:
                self.wrap_pending = False
        elif mode in _MOUSE_TRACKING:
            self.mouse_tracking = mode if on else 0
        elif mode in _MOUSE_ENCODINGS:
            self.mouse_encoding = mode if on else 0
        elif mode in _ALT_SCREEN_MODES:
            self._alternate(mode, on)
        elif mode == 1048:
            (self._save_cursor if on else self._restore_cursor)()
        elif mode == 6:
            self.origin_mode = on
            self._move_to(0, 0)
        elif mode == 12:
            self.cursor_blink = on
        elif mode == 66:  # DECNKM: the same switch as ESC = / ESC >
            self.keypad_app = on
        elif mode == 3:  # DECCOLM: the width stays; the screen clears, as tmux does
            self.top, self.bottom = 0, self.rows - 1
            self._erase_display(2)
            self._move_to(0, 0)
        elif mode in self.other_modes or len(self.other_modes) < MAX_OTHER_MODES:
            self.other_modes[mode] = on
            self._flag(f"DEC mode {mode}")

    def _alternate(self, mode: int, on: bool) -> None:
        if on == (self.buf is self.alt):
            return
        if on:
            if mode == 1049:
                self._save_cursor()
            self.buf = self.alt
            self.alt_mode = mode
            if mode == 1049:
                for line in self.alt.lines:
                    self._erase(line, 0, self.cols)
        else:
            if mode in (1047, 1049):
                pen = self.pen
                self.pen = 0
                for line in self.alt.lines:
                    self._erase(line, 0, self.cols)
                self.pen = pen
            self.buf = self.main
            self.alt_mode = 0
            if mode == 1049:
                self._restore_cursor()
        self.wrap_pending = False

    _CSI_ACTIONS = {
        ("", "", "A"): _cursor_up, ("", "", "B"): _cursor_down, ("", "", "C"): _cursor_right,
        ("", "", "D"): _cursor_left, ("", "", "E"): _next_lines, ("", "", "F"): _prev_lines,
        ("", "", "G"): _column, ("", "", "`"): _column, ("", "", "a"): _cursor_right,
        ("", "", "d"): _row, ("", "", "e"): _row_relative, ("", "", "H"): _position,
        ("", "", "f"): _position, ("", "", "I"): lambda s, p: s._tab_forward(max(
            p[0] if p else 1, 1)),
        ("", "", "Z"): lambda s, p: s._tab_back(max(p[0] if p else 1, 1)),
        ("", "", "J"): lambda s, p: s._erase_display(p[0] if p else 0),
        ("?", "", "J"): lambda s, p: s._erase_display(p[0] if p else 0),
        ("", "", "K"): _erase_line, ("?", "", "K"): _erase_line,
        ("", "", "X"): _erase_chars, ("", "", "@"): _insert_chars, ("", "", "P"): _delete,
        ("", "", "L"): lambda s, p: s._insert_lines(max(p[0] if p else 1, 1), False),
        ("", "", "M"): lambda s, p: s._insert_lines(max(p[0] if p else 1, 1), True),
        ("", "", "S"): lambda s, p: s._scroll_up(max(p[0] if p else 1, 1)),
        ("", "", "T"): lambda s, p: s._scroll_down(max(p[0] if p else 1, 1)),
        ("", "", "b"): _repeat, ("", "", "g"): _clear_tabs, ("", "", "r"): _set_region,
        ("", "", "s"): lambda s, p: s._save_cursor(),
        ("", "", "u"): lambda s, p: s._restore_cursor(),
        ("", "", "t"): _window_op, ("", " ", "q"): _cursor_style, ("", "!", "p"): _soft_reset,
        ("", "", "h"): _set_ansi, ("", "", "l"): _reset_ansi,
        ("?", "", "h"): _set_dec, ("?", "", "l"): _reset_dec,
        (">", "", "m"): _modify_keys, (">", "", "n"): _modify_keys_off,
        (">", "", "u"): _kitty_push, ("<", "", "u"): _kitty_pop, ("=", "", "u"): _kitty_set,
        ("", "\"", "q"): lambda s, p: None,  # DECSCA: protection is not modelled or needed
        ("", "%", "m"): lambda s, p: None,  # vim 9 sends it at start; no effect on cells
    }

    # ------------------------------------------------------------------ SGR

    def _apply_sgr(self, params: str) -> int:
        flags, underline, fg, bg, ulc = self._attrs[self.pen]
        fields = params.split(";", MAX_PARAMS)[:MAX_PARAMS] if params else ["0"]
        i = 0
        while i < len(fields):
            field = fields[i]
            i += 1
            if ":" in field:
                sub = field.split(":")
                head = sub[0]
                if head in ("38", "48", "58"):
                    colour = self._colour(sub[1:], colon=True)
                    if colour is not None:
                        fg, bg, ulc = self._set_colour(head, colour, fg, bg, ulc)
                elif head == "4":
                    style = sub[1] if len(sub) > 1 else ""
                    underline = int(style) if style.isdigit() and int(style) <= 5 else 1
                continue
            code = int(field) if field.isdigit() and len(field) < 6 else (0 if not field
                                                                             else -1)
            if code == 0:
                flags, underline, fg, bg, ulc = _DEFAULT_ATTR
            elif code in _SGR_SET:
                flags |= _SGR_SET[code]
            elif code in _SGR_CLEAR:
                flags &= ~_SGR_CLEAR[code]
            elif code == 4:
                underline = 1
            elif code == 21:
                underline = 2
            elif code == 24:
                underline = 0
            elif 30 <= code <= 37:
                fg = code - 30
            elif 40 <= code <= 47:
                bg = code - 40
            elif 90 <= code <= 97:
                fg = code - 82
            elif 100 <= code <= 107:
                bg = code - 92
            elif code == 39:
                fg = DEFAULT_COLOUR
            elif code == 49:
                bg = DEFAULT_COLOUR
            elif code == 59:
                ulc = DEFAULT_COLOUR
            elif code in (38, 48, 58):
                kind = fields[i] if i < len(fields) else ""
                need = 2 if kind == "5" else 4 if kind == "2" else 1
                colour = self._colour(fields[i:i + need], colon=False)
                i += need
                if colour is not None:
                    fg, bg, ulc = self._set_colour(str(code), colour, fg, bg, ulc)
            # anything else (fonts, frames, ideogram attributes) changes nothing we model
        return self._intern((flags, underline, fg, bg, ulc))

    @staticmethod
    def _set_colour(which: str, colour: int, fg: int, bg: int, ulc: int):
        if which == "38":
            return colour, bg, ulc
        if which == "48":
            return fg, colour, ulc
        return fg, bg, colour

    @staticmethod
    def _colour(spec: List[str], colon: bool) -> Optional[int]:
        """``5;n`` / ``2;r;g;b`` (or colon forms ``5:n``, ``2::r:g:b``) -> colour, else None."""
        if not spec:
            return None
        kind = spec[0]
        values = spec[1:]
        if kind == "2" and colon and len(values) >= 4:
            values = values[1:4]  # 2:<colour space>:r:g:b
        nums = []
        for value in values:
            if not value.isdigit() or len(value) > 3 or int(value) > 255:
                return None
            nums.append(int(value))
        if kind == "5" and len(nums) >= 1:
            return PALETTE + nums[0]
        if kind == "2" and len(nums) >= 3:
            return RGB + (nums[0] << 16) + (nums[1] << 8) + nums[2]
        return None

    # ------------------------------------------------------------------ OSC

    def _osc(self, body: str) -> None:
        code, _, rest = body.partition(";")
        if code in ("0", "1", "2"):
            text = _CONTROLS_IN_TITLE.sub("", rest)[:MAX_TITLE_CHARS]
            if code in ("0", "2"):
                self.title = text
            if code in ("0", "1"):
                self.icon_name = text
        elif rest.endswith("?") or (code == "4" and "?" in rest.split(";")):
            self._query(ESC + "]" + body + "\x07")
        elif code not in _KNOWN_OSC:
            self._flag("OSC " + code[:16])

    # ------------------------------------------------------------------ resize

    def resize(self, rows: int, cols: int) -> None:
        """New size: rows and columns are cropped or padded (no reflow). Shrinking the main
        screen drops blank rows below the cursor first, then moves top rows to history, as
        tmux and xterm do. The scroll region resets; the cursor stays in bounds."""
        rows = min(max(int(rows), 1), MAX_ROWS)
        cols = min(max(int(cols), 2), MAX_COLS)
        for buffer in (self.main, self.alt):
            lines = buffer.lines
            if rows < len(lines):
                active = buffer is self.buf
                while len(lines) > rows and active and len(lines) - 1 > self.y and not "".join(
                        lines[-1].chars).strip(" ") and not any(lines[-1].attrs):
                    lines.pop()
                extra = len(lines) - rows
                if extra > 0:
                    if active:
                        if buffer is self.main and self.history.maxlen:
                            self.history.extend(map(self._store, lines[:extra]))
                        del lines[:extra]
                        self.y = max(self.y - extra, 0)
                    else:
                        del lines[rows:]
            for line in lines:
                self._resize_line(line, cols)
            lines.extend(_Line(cols) for _ in range(rows - len(lines)))
        old_cols = self.cols
        self.rows, self.cols = rows, cols
        self.tabs = {t for t in self.tabs if t < cols} | set(range(
            (old_cols + 7) // 8 * 8, cols, 8))
        self.top, self.bottom = 0, rows - 1
        self.x = min(self.x, cols - 1)
        self.y = min(self.y, rows - 1)
        self.wrap_pending = False

    @staticmethod
    def _resize_line(line: _Line, cols: int) -> None:
        width = len(line.chars)
        if cols > width:
            line.chars.extend(" " * (cols - width))
            line.attrs.extend([0] * (cols - width))
        elif cols < width:
            del line.chars[cols:], line.attrs[cols:]
            if line.chars[cols - 1] and char_width(line.chars[cols - 1][0]) == 2:
                line.chars[cols - 1] = " "
            line.wrapped = False

    # ------------------------------------------------------------------ serialization

    def history_painted(self, count: Optional[int] = None) -> List[Tuple[str, bool]]:
        """The last ``count`` history rows (all if None), oldest first, each as the text
        ``serialize`` writes for it (see ``_paint_line``) and whether it wrapped."""
        if count is not None and count <= 0:
            return []
        rows = list(self.history)[-count:] if count else list(self.history)
        return [(self._paint_line(chars, attrs * len(chars) if len(attrs) == 1 else attrs,
                                  wrapped), wrapped) for chars, attrs, wrapped in rows]

    def _store(self, line: _Line) -> tuple:
        """A row as history keeps it (see ``history`` in __init__)."""
        return self._stored(line.chars, line.attrs, line.wrapped)

    def _stored(self, chars, ids: List[int], wrapped: bool) -> tuple:
        text = "".join(chars)
        cols = len(chars)
        first = ids[0]
        return (text if len(text) == cols and text.isascii() else tuple(chars),
                (self._attrs[first],) if ids.count(first) == cols else tuple(
                    map(self._attrs.__getitem__, ids)), wrapped)

    def _paint_line(self, chars, attrs, wrapped: bool) -> str:
        """A row as text to print from column 0 with a reset pen; ends with a reset pen.
        ``attrs`` are attribute values (tuples), not ids, so history rows need no ids.

        Trailing default blanks are left out (unless the row wrapped: then every cell is
        written so the terminal wraps too); trailing blanks of one background become EL."""
        cols = len(chars)
        stop = cols
        last = attrs[cols - 1]
        if not wrapped:
            while stop and chars[stop - 1] == " " and attrs[stop - 1] == last:
                stop -= 1
        tail = last if stop < cols and last != _DEFAULT_ATTR else None
        if tail is not None and tail[:3] != (0, 0, DEFAULT_COLOUR):
            stop, tail = cols, None  # blanks with more than a background: write them out
        first = attrs[0]
        plain = "".join(chars[:stop])
        current = _DEFAULT_ATTR
        if not stop:
            out = []
        elif (len(plain) == stop and plain.isascii() and first == attrs[stop - 1]
                and attrs[:stop].count(first) == stop):
            # one pen, one ASCII glyph per cell: the common case
            out = [self._pen_text(first) if first != _DEFAULT_ATTR else "", plain]
            current = first
        else:
            out = []
            anchor = False
            col = 0
            while col < stop:
                char = chars[col] or " "  # "": an orphan right half
                attr = attrs[col]
                if anchor:
                    out.append(f"{CSI}{col + 1}G")
                    anchor = False
                if attr != current:
                    out.append(self._pen_text(attr))
                    current = attr
                out.append(char)
                wide = col + 1 < cols and chars[col + 1] == ""
                if wide or len(char) > 1 or not char.isascii():
                    anchor = col + 1 + wide < stop
                col += 2 if wide else 1
        if tail is not None:
            if tail != current:
                out.append(self._pen_text(tail))
            out.append(f"{CSI}K")
            current = tail
        if current != _DEFAULT_ATTR:
            out.append(f"{CSI}m")
        return "".join(out)

    def _pen_text(self, attr: Tuple[int, int, int, int, int]) -> str:
        """SGR setting the pen to ``attr`` from any pen."""
        text = self._pen_texts.get(attr)
        if text is None:
            if len(self._pen_texts) > MAX_ATTRS:
                self._pen_texts.clear()
            sgr = _attr_sgr(attr)
            text = self._pen_texts[attr] = f"{CSI}0;{sgr}m" if sgr else f"{CSI}m"
        return text

    def _attr_values(self, line: _Line) -> List[Tuple[int, int, int, int, int]]:
        return list(map(self._attrs.__getitem__, line.attrs))

    def _cup(self, row: int, col: int) -> str:
        return f"{CSI}{row + 1};{col + 1}H"

    def _charset_text(self, charsets, gl: int) -> str:
        out = [ESC + _DESIGNATORS[i] + cs for i, cs in enumerate(charsets) if cs != "B"]
        out.append(("\x0f", "\x0e", ESC + "n", ESC + "o")[gl] if gl else "")
        return "".join(out)

    def _saved_text(self, buffer: _Buffer) -> str:
        """Bytes that leave a terminal in the state DECSC saved on ``buffer`` (origin mode,
        position, pending wrap, pen, charsets), written while that buffer is shown, its
        scroll region the whole screen, IRM off and G0 ASCII, as the serializer leaves them."""
        saved = buffer.saved
        out = f"{CSI}?6h" if saved.origin else ""  # (first: it homes the cursor)
        if saved.wrap_pending and saved.x == self.cols - 1:  # the last glyph printed again
            out += self._glyph_text(buffer, saved.y, saved.x, saved.y)
        else:
            out += self._cup(saved.y, saved.x)
        return out + self._pen_reset_text(saved.pen) + self._charset_text(saved.charsets,
                                                                           saved.gl)

    def _pen_reset_text(self, attr: int) -> str:
        """SGR that sets pen ``attr`` from the default."""
        pen = self.sgr(attr)
        return f"{CSI}0{';' if pen else ''}{pen}m"

    def _glyph_text(self, buffer: _Buffer, y: int, col: int, row: int) -> str:
        """Bytes printing the glyph at ``col`` of ``buffer``'s line ``y`` again, a wide one
        whole, with its own pen (``row``: ``y`` as CUP addresses it). In the last column
        this leaves a wrap pending, as printing it did."""
        line = buffer.lines[y]
        if line.chars[col] == "" and col:
            col -= 1  # the right half of a wide glyph
        return self._cup(row, col) + self._pen_reset_text(line.attrs[col]) + (
            line.chars[col] or " ")

    def _kitty_text(self, buffer: _Buffer) -> str:
        return "".join(f"{CSI}>{flags}u" for flags in buffer.kitty_flags)

    def serialize(self, history_lines: int = 0) -> bytes:
        """Bytes that, written to a fresh terminal of this size, reproduce the screens,
        modes, title and cursor; the last ``history_lines`` history lines come first."""
        out = [f"{CSI}0m{CSI}r{CSI}?6l{CSI}?7h{CSI}4l{ESC}(B\x0f{CSI}H{CSI}2J"]
        rows = self.history_painted(history_lines) + [
            (self._paint_line(line.chars, self._attr_values(line), line.wrapped), line.wrapped)
            for line in self.main.lines]
        last = len(rows) - 1
        for i, (text, wrapped) in enumerate(rows):
            out.append(text)
            # a soft-wrapped row runs on into the next (the terminal then knows it wrapped),
            # but only if that row starts with a glyph: the wrap happens when one is printed
            if i < last and not (wrapped and _STARTS_WITH_GLYPH.match(rows[i + 1][0])):
                out.append("\r\n")
        out.append(self._title_text())
        out.append(self._kitty_text(self.main))
        reset_charsets = f"{CSI}?6l{ESC}(B{ESC})B{ESC}*B{ESC}+B\x0f"
        if self.buf is self.alt:
            if self.main.saved is not None:
                out.append(self._saved_text(self.main))
            # 1049 saves the cursor the application gets back on exit; without a saved one
            # (it came in with 47/1047), 1047 switches screens saving nothing
            switch = 1049 if self.main.saved is not None else 1047
            out.append(f"{CSI}?{switch}h{reset_charsets}{CSI}0m{CSI}H{CSI}2J")
            for row, line in enumerate(self.alt.lines):
                text = self._paint_line(line.chars, self._attr_values(line), line.wrapped)
                if text:
                    out.append(self._cup(row, 0) + text)
            out.append(self._kitty_text(self.alt))
            if self.alt.saved is not None:
                out.append(self._saved_text(self.alt) + ESC + "7" + reset_charsets)
        elif self.main.saved is not None:
            out.append(self._saved_text(self.main) + ESC + "7" + reset_charsets)
        if (self.top, self.bottom) != (0, self.rows - 1):
            out.append(f"{CSI}{self.top + 1};{self.bottom + 1}r")
        if self.tabs != set(range(8, self.cols, 8)):
            out.append(f"{CSI}3g" + "".join(f"{CSI}{t + 1}G{ESC}H" for t in sorted(self.tabs)))
        out.append(self._cursor_text())
        out.append(self._modes_text())
        out.append(self._charset_text(self.charsets, self.gl))
        return "".join(out).encode("utf-8", "replace")

    def _title_text(self) -> str:
        """The title stack (CSI 22 t pushes) and the current title and icon name. Titles the
        stream never set are not written: the terminal keeps its own."""
        out = [self._osc_title(title, icon) + f"{CSI}22;0t" for title, icon in self._title_stack]
        out.append(self._osc_title(self.title, self.icon_name))
        return "".join(out)

    @staticmethod
    def _osc_title(title: Optional[str], icon: Optional[str]) -> str:
        if title == icon:
            return "" if title is None else f"{ESC}]0;{title}\x07"
        return ("" if icon is None else f"{ESC}]1;{icon}\x07") + (
            "" if title is None else f"{ESC}]2;{title}\x07")

    def _cursor_text(self) -> str:
        """Origin mode, cursor (pending wrap rebuilt by reprinting the last cell) and pen;
        written while IRM is off and G0 is ASCII, as the serializer leaves them."""
        out = []
        if self.origin_mode:
            out.append(f"{CSI}?6h")
        row = self.y - self.top if self.origin_mode else self.y
        if self.wrap_pending:
            out.append(self._glyph_text(self.buf, self.y, self.cols - 1, row))
        else:
            out.append(self._cup(row, self.x))
        out.append(self._pen_reset_text(self.pen))
        return "".join(out)

    def _modes_text(self) -> str:
        out = []
        if self.insert_mode:
            out.append(f"{CSI}4h")
        if self.newline_mode:
            out.append(f"{CSI}20h")
        for mode, name in _DEC_FLAGS.items():
            value = getattr(self, name)
            if value != _FLAG_DEFAULTS[name] and mode != 2026:
                out.append(f"{CSI}?{mode}{'h' if value else 'l'}")
        if self.keypad_app:
            out.append(ESC + "=")
        for mode in (self.mouse_tracking, self.mouse_encoding):
            if mode:
                out.append(f"{CSI}?{mode}h")
        if self.cursor_blink is not None:
            out.append(f"{CSI}?12{'h' if self.cursor_blink else 'l'}")
        if self.cursor_style:
            out.append(f"{CSI}{self.cursor_style} q")
        for resource, value in sorted(self.modify_keys.items()):
            out.append(f"{CSI}>{resource};{value}m")
        for mode, on in sorted(self.other_modes.items()):
            out.append(f"{CSI}?{mode}{'h' if on else 'l'}")
        if self.sync_output:
            out.append(f"{CSI}?2026h")
        return "".join(out)

    def cursor_sequence(self) -> bytes:
        """Bytes putting a terminal that equals the model (but for cursor and pen) back at
        the model's cursor with the model's pen (prediction's "erase" step ends with it)."""
        out = [f"{CSI}4l" if self.insert_mode else "",
               f"{ESC}(B\x0f" if self.charsets[self.gl] != "B" or self.gl else ""]
        out.append(self._cursor_text())
        out.append(f"{CSI}4h" if self.insert_mode else "")
        if out[1]:
            out.append(self._charset_text(self.charsets, self.gl))
        return "".join(out).encode("utf-8", "replace")

    def render_cell(self, row: int, col: int) -> bytes:
        """Bytes repainting the cell at (row, col) from the model (a wide glyph whole).
        Afterwards pen and cursor differ from the model's: follow with cursor_sequence()."""
        pre = [f"{CSI}?6l" if self.origin_mode else "", f"{CSI}4l" if self.insert_mode else "",
               f"{ESC}(B\x0f" if self.charsets[self.gl] != "B" or self.gl else ""]
        return ("".join(pre) + self._glyph_text(self.buf, row, col, row)).encode("utf-8",
                                                                                 "replace")

    def reset_sequence(self) -> bytes:
        """Bytes that turn off what the stream turned on (alternate screen, input modes,
        cursor looks, pen, region, charsets), leaving everything else as it is."""
        out = []
        if self.sync_output:
            out.append(f"{CSI}?2026l")
        if self.buf is self.alt:
            out.append(f"{CSI}?{1049 if self.alt_mode == 1049 else 1047}l")
        if (self.top, self.bottom) != (0, self.rows - 1):
            out.append(f"{CSI}r")
        if self.origin_mode:
            out.append(f"{CSI}?6l")
        if self.insert_mode:
            out.append(f"{CSI}4l")
        if self.newline_mode:
            out.append(f"{CSI}20l")
        for mode, name in _DEC_FLAGS.items():
            if mode != 2026 and getattr(self, name) != _FLAG_DEFAULTS[name]:
                out.append(f"{CSI}?{mode}{'h' if _FLAG_DEFAULTS[name] else 'l'}")
        if self.keypad_app:
            out.append(ESC + ">")
        for mode in (self.mouse_tracking, self.mouse_encoding):
            if mode:
                out.append(f"{CSI}?{mode}l")
        if self.cursor_blink:
            out.append(f"{CSI}?12l")
        if self.cursor_style:
            out.append(f"{CSI}0 q")
        for resource in sorted(self.modify_keys):
            out.append(f"{CSI}>{resource}m")
        if self.main.kitty_flags:
            out.append(f"{CSI}<{len(self.main.kitty_flags)}u")
        if self.charsets != ["B"] * 4 or self.gl:
            out.append(f"{ESC}(B{ESC})B{ESC}*B{ESC}+B\x0f")
        if self.pen:
            out.append(f"{CSI}0m")
        return "".join(out).encode()


class LateFeed:
    """A Terminal fed late, in large pieces: a flood costs the model far less in a few large
    feeds than in one small feed per read.

    The owner adds what the application wrote as it is written, and calls ``catch_up``
    before it reads ``term``; the model feeds itself once LATE_FEED_BYTES wait.  Used by the
    client's mirror of its terminal and by the server's screen for repaints and listings.
    """

    def __init__(self, term: Terminal, limit: int = LATE_FEED_BYTES) -> None:
        self.term = term
        self.limit = limit
        self._chunks: List[bytes] = []  # joined once when fed: no buffer regrown and copied
        self.waiting = 0  # bytes not fed yet

    def add(self, chunks: Sequence[bytes]) -> None:
        self._chunks += chunks
        self.waiting += sum(map(len, chunks))
        if self.waiting >= self.limit:
            self.catch_up()

    def catch_up(self) -> None:
        """Feed whatever waits: ``term`` is then current."""
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self.waiting = 0
            self.term.feed(data)
