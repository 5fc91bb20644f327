"""The benchmark's reading of a terminal that repaints only changed cells (bench/display.py).

Mosh sends screen states: a marker printed where the screen already showed some of its
characters arrives in pieces between cursor moves.  Recorded from mosh-client in the
bench's ``ctrl_c_slow`` (marker ``C:91505:Z`` over a row of ``yes`` output with a 5 in its
fifth column): ``C:91`` ESC[39;6H ``05:Z``.  Matched on the raw bytes it is never seen (the
bench's mosh Ctrl-C rows timed out that way without pyte); on the emulated screen it is.
"""

from __future__ import annotations

import os
import sys

import pytest
from proc_util import PtyProcess, PtyTimeout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from display import COLS, ROWS, Display, pyte  # noqa: E402

MARKER = b"C:91505:Z"
# The row as the flood left it, then the marker as mosh-client painted it over that row.
PAINT = r"printf '\033[39;1HF12356'; sleep 0.2; printf '\033[39;1HC:91\033[39;6H05:Z'; sleep 30"


def painting_terminal() -> PtyProcess:
    return PtyProcess(["sh", "-c", PAINT], rows=ROWS, cols=COLS)


@pytest.mark.timeout(30)
@pytest.mark.skipif(pyte is None, reason="pyte (requirements-dev.txt) is not installed")
def test_a_marker_painted_in_pieces_is_found_on_the_emulated_screen():
    with painting_terminal() as term:
        assert Display(term, emulate=True).wait(MARKER, 10.0) > 0


@pytest.mark.timeout(30)
def test_the_raw_output_never_shows_such_a_marker():
    with painting_terminal() as term, pytest.raises(PtyTimeout):
        Display(term, emulate=False).wait(MARKER, 2.0)
