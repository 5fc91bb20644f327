"""moshpit_ipc: the listener <-> session process messages. A session process may be a
compromised user's, so each malformed or oversized message must be a clean IpcError."""

from __future__ import annotations

import os
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
