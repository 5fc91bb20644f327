"""How the benchmark sees a client's terminal output, so one scenario fits every tool.

ssh and moshpit pass the remote program's bytes through: a marker the shell prints shows
up verbatim in the stream.  Mosh does not: it sends screen states and redraws only the
cells that changed, so ``B:12345:Z`` printed where ``B:12999:Z`` was before arrives as
``45`` plus cursor moves.  For such clients the output is also fed to a terminal emulator
(pyte, a test-only dependency) and markers are looked for on the emulated screen.

pyte is slow (well under 1 MB/s here), so it must not sit in the timing path: while
output streams in, chunks are only stamped and queued; when the output pauses, the
emulator catches up chunk by chunk and a marker found there is dated by the chunk that
drew it.  Processing time is therefore never counted, only arrival time.
"""

from __future__ import annotations

import time

from proc_util import PtyProcess, PtyTimeout

try:
    import pyte
except ImportError:  # the bench still runs; mosh markers are then matched on raw output
    pyte = None

ROWS, COLS = 40, 120
PAUSE = 0.05  # seconds without output after which the emulator catches up
MAX_PENDING = 4 * 1024 * 1024  # catch up at least this often during a flood (memory bound)


class Display:
    """Reads a client's PTY and answers "has ``expect`` appeared yet, and when?".

    ``wait(expect, timeout, screen=True)`` matches markers (on the emulated screen too,
    when ``emulate``); ``screen=False`` matches the raw bytes only, which is right for a
    single echoed keystroke (the screen shows many letters).
    """

    def __init__(self, term: PtyProcess, emulate: bool) -> None:
        self.term = term
        self.emulate = emulate and pyte is not None
        if self.emulate:
            self._screen = pyte.Screen(COLS, ROWS)
            self._stream = pyte.ByteStream(self._screen)
        self._pending: list[tuple[float, bytes]] = []  # (read time, chunk) not yet emulated
        self._pending_bytes = 0
        self._tail = b""  # end of the previous chunk: a raw match may straddle chunks

    def send(self, data: bytes) -> None:
        self.term.send(data)

    def wait(self, expect: bytes, timeout: float, screen: bool = True) -> float:
        """Monotonic time at which ``expect`` was read; raises PtyTimeout (or PtyEOF)."""
        if not self.emulate:
            self.term.read_until(expect, timeout)
            return self.term.match_time
        deadline = time.monotonic() + timeout
        while True:
            chunk = self.term.read_chunk(min(PAUSE, max(0.0, deadline - time.monotonic())))
            now = time.monotonic()
            if chunk:
                window = self._tail + chunk
                self._tail = window[-(len(expect) - 1):] if len(expect) > 1 else b""
                self._queue(now, chunk)
                if expect in window:
                    self._catch_up(None)
                    self._tail = b""
                    return now
                if self._pending_bytes < MAX_PENDING and now < deadline:
                    continue
            seen = self._catch_up(expect.decode() if screen else None)
            if seen is not None:
                self._tail = b""
                return seen
            if now >= deadline:
                raise PtyTimeout(f"no {expect!r} within {timeout:.1f}s; screen ends: "
                                 f"{self._screen.display[-3:]!r}")

    def _queue(self, now: float, chunk: bytes) -> None:
        self._pending.append((now, chunk))
        self._pending_bytes += len(chunk)

    def _catch_up(self, text: str | None) -> float | None:
        """Feed queued chunks to the emulator; read time of the first chunk after which
        ``text`` is on a changed line of the screen (None if it never is)."""
        found = None
        for stamp, chunk in self._pending:
            self._stream.feed(chunk)
            if text is not None and found is None and any(
                    text in self._line(y) for y in self._screen.dirty):
                found = stamp
            self._screen.dirty.clear()
        self._pending.clear()
        self._pending_bytes = 0
        return found

    def _line(self, y: int) -> str:
        row = self._screen.buffer[y]
        return "".join(row[x].data for x in range(self._screen.columns))

    def drain(self, quiet: float = 0.3, limit: float = 5.0) -> None:
        """Consume output until ``quiet`` seconds pass without any (at most ``limit``)."""
        if not self.emulate:
            self.term.drain(quiet, limit)
            return
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            chunk = self.term.read_chunk(min(quiet, max(0.0, deadline - time.monotonic())))
            if not chunk:
                break
            self._queue(time.monotonic(), chunk)
            if self._pending_bytes >= MAX_PENDING:
                self._catch_up(None)
        self._catch_up(None)
        self._tail = b""
