"""moshpit_ipc: the listener <-> session process messages. A session process may be a
compromised user's, so each malformed or oversized message must be a clean IpcError."""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import struct

import moshpit_ipc as ipc
import pytest

pytestmark = pytest.mark.timeout(30)


def test_round_trip_with_bytes_nested_and_split_anywhere():
    message = {"op": "resume", "keys": {"conn_id": b"\x00\xffid", "cipher": "chacha"},
               "peer": ["127.0.0.1", 4000], "list": [b"a", b""], "n": None}
    data = ipc.encode_message(message) * 2
    for cut in range(len(data) + 1):
        reader = ipc.MessageReader()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [message, message]
        assert not reader.partial


def test_oversized_length_is_refused_before_reading_the_body():
    reader = ipc.MessageReader()
    with pytest.raises(ipc.IpcError, match="exceeds"):
        reader.feed(struct.pack(">I", ipc.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ipc.IpcError, match="exceeds"):
        ipc.encode_message({"big": "x" * ipc.MAX_MESSAGE_BYTES})


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1, 2]", b"\"text\"",
                                  b"{\"a\": {\"hex\": \"zz\"}}"])
def test_garbage_is_a_clean_error(body):
    with pytest.raises(ipc.IpcError):
        ipc.MessageReader().feed(struct.pack(">I", len(body)) + body)


def test_channel_end_of_stream_and_a_cut_message():
    mine, theirs = socket.socketpair()
    channel = ipc.Channel(mine)
    theirs.sendall(ipc.encode_message({"op": "x"}))
    assert channel.receive() == {"op": "x"}
    theirs.sendall(ipc.encode_message({"op": "y"})[:-1])
    theirs.close()
    with pytest.raises(ipc.IpcError, match="mid-message"):
        channel.receive()
    channel.close()
    mine, theirs = socket.socketpair()
    theirs.close()
    assert ipc.Channel(mine).receive() is None
    mine.close()


def test_messages_one_read_brought_along_are_pending_with_their_descriptor():
    """The listener sends "go" and then "carrier" (with the TCP connection's fd) back to
    back: one read may take both, and the socket is then not readable again, so a select
    loop must see ``pending`` and take the second one without waiting."""
    mine, theirs = socket.socketpair()
    channel = ipc.Channel(mine, accept_fds=True)
    sender = ipc.Channel(theirs)
    carried_r, carried_w = os.pipe()
    try:
        sender.send({"op": "go"})
        sender.send({"op": "carrier"}, [carried_r])
        os.close(carried_r)
        assert channel.receive() == {"op": "go"}
        if channel.pending:  # both came in one read (the usual case on a socketpair)
            assert not _readable(mine)
        assert channel.receive() == {"op": "carrier"}
        assert not channel.pending
        fd = channel.take_fd()
        os.write(carried_w, b"k")
        assert os.read(fd, 1) == b"k"  # the very pipe that was sent
        os.close(fd)
    finally:
        os.close(carried_w)
        channel.close()
        sender.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_peer_credentials_are_the_kernels():
    mine, theirs = socket.socketpair()
    with mine, theirs:
        assert ipc.peer_credentials(mine) == (os.getpid(), os.getuid(), os.getgid())


def test_packets_carry_descriptors_and_a_bad_packet_closes_them():
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        ipc.send_packet(mine, {"op": "spawn"}, [r, w])
        message, fds = ipc.receive_packet(theirs)
        assert message == {"op": "spawn"} and len(fds) == 2
        os.write(fds[1], b"ok")
        assert os.read(r, 2) == b"ok"
        for fd in fds:
            os.close(fd)
        socket.send_fds(mine, [b"\x00\x00\x00\x02{}junk"], [r])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ipc.IpcError):
            ipc.receive_packet(theirs)
        assert set(os.listdir("/proc/self/fd")) <= before  # the passed copy was closed
        mine.close()
        assert ipc.receive_packet(theirs) == (None, [])
    finally:
        os.close(r)
        os.close(w)
        theirs.close()


# ---------------------------------------------------------------------------
# Log relay
# ---------------------------------------------------------------------------

def log_message(text: str, level: object = logging.INFO, name: object = "moshpit.server"):
    return {"op": "log", "name": name, "level": level, "text": text}


def test_a_relayed_line_is_prefixed_on_one_line_and_bounded(caplog):
    """The attack: a session process relays a record with a newline and a fake listener
    line after it, controls, a bidi override, an unknown logger, a bogus level and a huge
    body. Each comes out as one line, marked as that session's, cut to MAX_LOG_TEXT."""
    receiver = ipc.LogReceiver("1a2b3c4d alice")
    forged = "ok\n2026-11-30T22:00:00.000 INFO  session 99999999 of bob ended\x1b[2J\u202e"
    with caplog.at_level(logging.DEBUG, logger="moshpit"):
        receiver.receive(log_message(forged), 0.0)
        receiver.receive(log_message("x" * 100_000, level=[1], name="moshpit.nosuch.logger"),
                         0.0)
        receiver.receive(log_message("top", level=True, name="evil"), 0.0)
    first, long, top = caplog.records
    assert first.getMessage() == ("[1a2b3c4d alice] ok^J2026-11-30T22:00:00.000 INFO  session"
                                  " 99999999 of bob ended^[[2J\\u202e")
    assert first.name == "moshpit.server" and first.levelno == logging.INFO
    assert long.name == "moshpit.server" and long.levelno == logging.INFO
    assert len(long.getMessage()) <= len("[1a2b3c4d alice] ") + ipc.MAX_LOG_TEXT
    assert "moshpit.nosuch.logger" not in logging.Logger.manager.loggerDict, "no new logger"
    assert (top.name, top.levelno, top.getMessage()) == (
        "moshpit.server", logging.INFO, "[1a2b3c4d alice] top")


def test_relayed_lines_are_rate_limited_and_the_drops_said(caplog):
    receiver = ipc.LogReceiver("s u")
    logging.getLogger("moshpit.transport")  # exists in a session process and its listener
    with caplog.at_level(logging.INFO, logger="moshpit"):
        for i in range(1000):  # a flood, all at once
            receiver.receive(log_message(f"line {i}", name="moshpit.transport"), 10.0)
        assert len(caplog.records) == ipc.LOG_BURST
        assert caplog.records[-1].name == "moshpit.transport", "the record's own logger"
        receiver.receive(log_message("a second later"), 11.0)
    said = [r.getMessage() for r in caplog.records[ipc.LOG_BURST:]]
    assert said == [f"[s u] {1000 - ipc.LOG_BURST} log line(s) dropped: more than"
                    f" {ipc.LOG_BURST} at once or {ipc.LOG_LINES_PER_SEC:g} per second",
                    "[s u] a second later"]


class _Sink:
    """A channel stand-in: what was sent, or OSError once ``gone``."""

    def __init__(self):
        self.sent, self.gone = [], False

    def send(self, message):
        if self.gone:
            raise OSError("gone")
        self.sent.append(message)


def test_a_session_holds_its_lines_while_no_listener_does_and_says_what_it_dropped():
    sender = ipc.LogSender()
    logger = logging.getLogger("moshpit.test_relay")
    logger.addHandler(sender)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        first = _Sink()
        sender.attach(first)
        logger.warning("started %s", "ok")
        assert [m["text"] for m in first.sent] == ["started ok"]
        assert first.sent[0]["level"] == logging.WARNING
        first.gone = True  # the listener stopped
        extra = 5
        for i in range(ipc.MAX_HELD_LOG_LINES + extra):
            logger.warning("while away %d", i)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        second = _Sink()
        sender.attach(second)  # the next listener claims the session
        texts = [m["text"] for m in second.sent]
        assert texts[0] == f"{extra + 1} earlier log line(s) dropped: no listener held the session"
        assert re.fullmatch(rf"\(held, logged at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\) while away"
                            rf" {extra + 1}", texts[1])
        assert len(texts) == ipc.MAX_HELD_LOG_LINES + 1
        assert "failed\nTraceback" in texts[-1] and "ValueError: boom" in texts[-1]
        sender.detach(first)  # an older channel closing changes nothing
        logger.info("after")
        assert second.sent[-1]["text"] == "after"
    finally:
        logger.removeHandler(sender)
        logger.propagate = True


def test_the_listener_channel_takes_log_messages_aside():
    ours, theirs = socket.socketpair()
    channel = ipc.Channel(ours)
    relayed = []
    channel.on_log = relayed.append
    theirs.sendall(ipc.encode_message(log_message("one")) + ipc.encode_message({"op": "reply"})
                   + ipc.encode_message(log_message("two")))
    theirs.close()
    assert channel.receive() == {"op": "reply"}
    assert channel.receive() is None
    assert [m["text"] for m in relayed] == ["one", "two"]
    channel.close()
