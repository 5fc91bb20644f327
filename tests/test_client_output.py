"""mp.OutputQueue: what waits for the terminal is written in order, whatever the terminal
takes at a time. Written through a real pipe with a one-page buffer, so writev is cut at
chunk boundaries and inside chunks, and refused (EAGAIN) when the pipe is full."""

from __future__ import annotations

import array
import fcntl
import os
import random
import termios

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
