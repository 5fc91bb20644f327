"""mp.OutputQueue: what waits for the terminal is written in order, whatever the terminal
takes at a time. Written through a real pipe with a one-page buffer, so writev is cut at
chunk boundaries and inside chunks, and refused (EAGAIN) when the pipe is full. And
mp.TerminalWriter, its thread's blocking writes to a real PTY read slowly, cleared,
drained, and closed under it."""

from __future__ import annotations

import array
import fcntl
import os
import random
import select
import termios
import tty

import pytest

import mp

pytestmark = pytest.mark.timeout(30)


def small_pipe():
    """A non-blocking pipe whose buffer holds one page, as a slow terminal would."""
    reader, writer = os.pipe()
    fcntl.fcntl(writer, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    os.set_blocking(writer, False)
    os.set_blocking(reader, False)
    return reader, writer


def test_output_queue_writes_everything_in_order_through_partial_writes():
    rnd = random.Random(14)
    reader, writer = small_pipe()
    try:
        queue = mp.OutputQueue()
        sent, got = bytearray(), bytearray()
        for round_ in range(200):
            for _ in range(rnd.randint(0, 5)):  # overlay-sized bits and flood-sized chunks
                chunk = os.urandom(rnd.choice([0, 1, 7, 300, 5000, 20000]))
                queued = bytearray(chunk) if round_ % 3 == 0 else chunk
                queue += queued
                if isinstance(queued, bytearray):
                    queued[:] = b"x" * len(queued)  # changed after queueing: not written
                sent += chunk
            assert len(queue) == len(sent) - len(got) - pipe_unread(reader)
            if queue:
                try:
                    queue.write_to(writer)
                except BlockingIOError:
                    pass  # the pipe is full: the reader takes some below
            got += read_available(reader, rnd.choice([1, 100, 4096]))
        while queue:
            try:
                queue.write_to(writer)
            except BlockingIOError:
                pass
            got += read_available(reader)
        assert bytes(got) == bytes(sent) and len(queue) == 0 and not queue
    finally:
        os.close(reader)
        os.close(writer)


def test_output_queue_clear_drops_what_waits():
    reader, writer = small_pipe()
    try:
        queue = mp.OutputQueue()
        queue += b"a" * 10000
        with pytest.raises(BlockingIOError):
            for _ in range(3):
                queue.write_to(writer)  # one page, then a full pipe
        queue.clear()
        assert len(queue) == 0 and not queue
        queue += b"next"
        assert read_available(reader) == b"a" * 4096
        queue.write_to(writer)
        assert read_available(reader) == b"next"
    finally:
        os.close(reader)
        os.close(writer)


def pipe_unread(fd: int) -> int:
    """Bytes written to the pipe that the reader has not read yet (FIONREAD)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def read_available(fd: int, most: int = 1 << 20) -> bytes:
    try:
        return os.read(fd, most)
    except BlockingIOError:
        return b""


# --- TerminalWriter ----------------------------------------------------------------------


class Terminal:
    """A real PTY in raw mode: the writer opens its slave by name, the test reads the
    master as slowly as it likes."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.waker = mp.Waker()

    def read(self, most: int) -> bytes:
        ready, _, _ = select.select([self.master], [], [], 5.0)
        assert ready, "the writer wrote nothing for 5 s"
        return os.read(self.master, most)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.waker.close()


@pytest.fixture
def terminal():
    term = Terminal()
    yield term
    term.close()


def test_terminal_writer_writes_everything_in_order_to_a_slow_terminal(terminal):
    writer = mp.TerminalWriter.open(terminal.slave, terminal.waker)
    rnd = random.Random(15)
    sent = b"".join(os.urandom(rnd.choice([1, 300, 5000, 20000])) for _ in range(60))
    pieces = [sent[i:i + 7777] for i in range(0, len(sent), 7777)]
    writer += pieces[0]
    writer.extend(pieces[1:])
    writer += b""
    got = bytearray()
    while len(got) < len(sent):  # a few hundred bytes at a time: the writer waits on us
        got += terminal.read(rnd.choice([1, 300, 4096]))
    assert bytes(got) == sent
    writer.drain(5.0)
    assert writer.size == 0 and not writer and not writer.failed


def test_an_idle_terminal_writer_writes_at_once_from_the_loop(terminal):
    """A keystroke's echo waits for no thread switch: it is on the terminal when ``+=``
    returns. Behind it, what waits keeps its place."""
    writer = mp.TerminalWriter.open(terminal.slave, terminal.waker)
    writer += b"k"
    assert writer.size == 0 and select.select([terminal.master], [], [], 0)[0]
    assert terminal.read(10) == b"k"
    tail = os.urandom(300_000)  # more than the PTY holds: the thread writes the rest
    writer.extend([b"head", tail])
    writer += b"end"
    got = bytearray()
    while len(got) < 4 + len(tail) + 3:
        got += terminal.read(65536)
    assert bytes(got) == b"head" + tail + b"end"


def test_terminal_writer_drain_waits_and_clear_drops_what_waits(terminal):
    writer = mp.TerminalWriter.open(terminal.slave, terminal.waker)
    writer.extend([b"a" * 1000] * 200)  # more than the PTY holds: the thread's write blocks
    writer.drain(0.2)
    assert writer.size > 0, "nobody read: drain gave up after its time"
    writer.clear()  # what waits goes; the write under way ends once the terminal takes it
    got = bytearray()
    while True:  # (size counts a write until writev returns, after its last byte is read)
        written = not writer.size  # then the master holds the rest of the output
        if select.select([terminal.master], [], [], 0.2)[0]:
            got += os.read(terminal.master, 65536)
        elif written:
            break
    assert 0 < len(got) < 200_000 and set(got) == {ord("a")}
    assert len(got) % 1000 == 0, "only whole chunks that waited are dropped"
    writer += b"next"
    assert terminal.read(100) == b"next"


def test_terminal_writer_reports_a_terminal_that_went_away(terminal):
    writer = mp.TerminalWriter.open(terminal.slave, terminal.waker)
    os.close(terminal.master)  # the window closed: writes fail with EIO
    writer += b"x" * 100_000
    ready, _, _ = select.select([terminal.waker], [], [], 5.0)
    assert ready, "the loop was not woken"
    assert writer.failed and writer.size == 0
    writer.drain(5.0)  # returns at once: nothing will ever be taken


def test_terminal_writer_wakes_the_loop_once_no_longer_far_behind(terminal, monkeypatch):
    """The loop stops reading the network while the terminal is OUTPUT_HIGH_WATER behind,
    and has nothing else to wake it then: the writer wakes it on the way back down."""
    monkeypatch.setattr(mp, "OUTPUT_HIGH_WATER", 64 * 1024)
    writer = mp.TerminalWriter.open(terminal.slave, terminal.waker)
    writer.extend([b"b" * 1000] * 200)
    writer.drain(0.2)  # the PTY is full and nobody reads
    assert writer.size >= mp.OUTPUT_HIGH_WATER
    assert not select.select([terminal.waker], [], [], 0)[0], "woken while far behind"
    while writer.size >= mp.OUTPUT_HIGH_WATER:
        terminal.read(65536)
    assert select.select([terminal.waker], [], [], 5.0)[0], "the loop was not woken"
    writer.clear()


def test_the_session_writes_a_terminal_from_the_writer_and_a_pipe_itself(terminal):
    writer = mp.output_queue(terminal.slave, True, terminal.waker)
    assert isinstance(writer, mp.TerminalWriter)  # (empty, and so false, at first)
    reader, pipe_fd = os.pipe()
    try:
        for is_terminal in (True, False):  # a pipe, told a terminal or not
            queue = mp.output_queue(pipe_fd, is_terminal, terminal.waker)
            assert type(queue) is mp.OutputQueue and queue.polled
    finally:
        for fd in (reader, pipe_fd):
            os.close(fd)


def test_terminal_writer_is_for_terminals_only():
    reader, writer_fd = os.pipe()
    waker = mp.Waker()
    try:
        assert mp.TerminalWriter.open(writer_fd, waker) is None  # a pipe: the loop writes it
        with pytest.raises(TypeError, match="thread writes"):
            mp.TerminalWriter(writer_fd, waker, writer_fd).write_to(writer_fd)
    finally:
        for fd in (reader, writer_fd):
            os.close(fd)
        waker.close()
