"""The channel layer (moshpit_channels) on the sans-IO session cores over the simulated
network of test_transport, with a fake clock: opens and refusals, exact bytes both ways
under loss, half-close, per-channel flow windows (a slow reader stalls only its own
sender, never the terminal), outages with a resume, the open timeout, -R listener
requests, takeovers, and malformed or hostile records rejected cleanly.  Plus the sans-IO
parsers: SOCKS4/4a/5, -L/-R/-D specs, permit_open.
"""

from __future__ import annotations

import os
import random
import stat
import struct

import pytest
from test_session import CoreSim
from test_transport import SimNet, make_keys, random_bytes

import moshpit_channels as mc
import moshpit_session as ms

pytestmark = pytest.mark.timeout(60)


def typed(events) -> list:
    """Events with their types: NamedTuples of one arity compare equal otherwise."""
    return [(type(event), tuple(event)) for event in events]


def has(events, event) -> bool:
    return (type(event), tuple(event)) in typed(events)


class Endpoint:
    """A local socket's far end, as the program sees it: ``source`` is what it will send
    (then EOF if ``eof``), ``got`` what it received, ``rate`` bytes it takes per step
    (None: all)."""

    def __init__(self, source: bytes = b"", eof: bool = True, rate=None) -> None:
        self.source, self.eof, self.rate = source, eof, rate
        self.read = 0
        self.got = bytearray()
        self.got_eof = False
        self.eof_given = False


class ChanSim(CoreSim):
    """CoreSim plus a ChannelMux on each side; endpoints play the sockets, and requested
    channels are accepted (or refused by ``refuse``) at once."""

    def __init__(self, net: SimNet, policy=None, agent: bool = False, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.policy = policy if policy is not None else mc.ForwardPolicy()
        self.smux = mc.ChannelMux(self.server, "server", self.policy)
        self.cmux = mc.ChannelMux(self.client, "client", agent=agent)
        self.ends = {"server": {}, "client": {}}
        self.events = {"server": [], "client": []}
        self.answer = {}  # side -> Endpoint factory for requested channels (None: refuse)

    def mux(self, side: str) -> mc.ChannelMux:
        return self.smux if side == "server" else self.cmux

    def _app(self) -> None:
        super()._app()
        for side in ("server", "client"):
            mux, ends = self.mux(side), self.ends[side]
            mux.check_timeouts(self.now)
            event = mux.next_event()
            while event is not None:
                self.events[side].append(event)
                if isinstance(event, mc.ChannelRequested):
                    make = self.answer.get(side, Endpoint)
                    if make is None:
                        mux.refuse(event.chan, mc.CONNECT_FAILED, "Connection refused")
                    else:
                        ends[event.chan] = make()
                        mux.accept(event.chan)
                event = mux.next_event()
            for chan, end in list(ends.items()):
                allowance = mux.read_allowance(chan)
                if allowance and end.read < len(end.source):
                    chunk = end.source[end.read:end.read + min(allowance, 16384)]
                    end.read += len(chunk)
                    mux.local_data(chan, chunk, self.now)
                elif allowance and end.eof and not end.eof_given and end.read == len(end.source):
                    end.eof_given = True
                    mux.local_eof(chan, self.now)
                out = mux.output(chan)
                if end.rate is not None:
                    out = out[:end.rate]
                if out:
                    end.got += out
                    mux.output_written(chan, len(out))
                if mux.should_shut_write(chan):
                    end.got_eof = True
                    mux.write_shut(chan)
            mux.pump(self.now)

    def open(self, source: bytes = b"", host: str = "127.0.0.1", port: int = 80, **kw) -> int:
        chan = self.cmux.open(mc.KIND_TCP, host, port, self.now)
        self.ends["client"][chan] = Endpoint(source, **kw)
        return chan

    def finished(self, side: str, chan: int) -> bool:
        return has(self.events[side], mc.ChannelFinished(chan))


def test_bytes_flow_exactly_both_ways_under_loss_and_half_close_ends_the_channel():
    rng = random.Random(1)
    sim = ChanSim(SimNet(1, loss=0.1, jitter=0.01))
    up, down = random_bytes(rng, 700_000), random_bytes(rng, 900_000)
    sim.answer["server"] = lambda: Endpoint(down)
    chan = sim.open(up)
    sim.run_until(lambda: sim.finished("client", chan) and sim.finished("server", chan),
                  limit=120)
    server_end, client_end = sim.ends["server"][chan], sim.ends["client"][chan]
    assert server_end.got == up and server_end.got_eof
    assert client_end.got == down and client_end.got_eof
    assert has(sim.events["server"], mc.ChannelRequested(chan, mc.KIND_TCP, "127.0.0.1", 80, 0))
    assert has(sim.events["client"], mc.ChannelOpened(chan))
    assert sim.smux.channels() == [] and sim.cmux.channels() == []


def test_half_close_keeps_the_other_direction_open():
    """A client that shuts its sending side (EOF) still gets the whole answer."""
    sim = ChanSim(SimNet(2))
    answer = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100_000
    sim.answer["server"] = lambda: Endpoint(answer, eof=False)  # keeps its side open
    chan = sim.open(b"GET / HTTP/1.0\r\n\r\n")
    sim.run_until(lambda: len(sim.ends["client"][chan].got) == len(answer), limit=10)
    server_end = sim.ends["server"][chan]
    assert server_end.got == b"GET / HTTP/1.0\r\n\r\n" and server_end.got_eof
    assert not sim.finished("client", chan)  # the server's side has not ended yet
    server_end.eof = True
    sim.run_until(lambda: sim.finished("client", chan) and sim.finished("server", chan),
                  limit=sim.now + 5)
    assert sim.ends["client"][chan].got_eof


def test_a_slow_reader_stalls_only_its_own_sender_and_never_the_terminal():
    rng = random.Random(3)
    sim = ChanSim(SimNet(3, loss=0.05))
    bulk = random_bytes(rng, 4_000_000)
    sim.answer["server"] = lambda: Endpoint(bulk, eof=False)
    slow = sim.open(b"", eof=False)
    sim.ends["client"][slow].rate = 0  # the local reader takes nothing
    fast_data = random_bytes(rng, 600_000)
    sim.run_for(2.0)
    sim.answer["server"] = lambda: Endpoint(fast_data)
    fast = sim.open(b"")
    sim.client.send_input(b"echo hi\r")
    start = sim.now
    sim.run_until(lambda: sim.shell_in == b"echo hi\r", limit=sim.now + 1)
    keystroke_secs = sim.now - start
    sim.run_until(lambda: sim.finished("client", fast), limit=sim.now + 30)
    assert sim.ends["client"][fast].got == fast_data
    # The slow channel's sender stopped at the window: bounded buffering on both sides.
    assert sim.cmux.buffered() <= mc.CHANNEL_WINDOW
    server_read = sim.ends["server"][slow].read
    assert server_read <= mc.CHANNEL_WINDOW + mc.MAX_PENDING
    assert keystroke_secs < 0.2  # a couple of round trips at 20 ms, despite the bulk
    # The reader wakes up: everything arrives, exactly.
    sim.ends["client"][slow].rate = None
    sim.ends["server"][slow].eof = sim.ends["client"][slow].eof = True
    sim.run_until(lambda: sim.finished("client", slow), limit=sim.now + 60)
    assert sim.ends["client"][slow].got == bulk


def test_an_outage_and_a_resume_lose_and_double_nothing():
    rng = random.Random(4)
    sim = ChanSim(SimNet(4, loss=0.05))
    up, down = random_bytes(rng, 2_000_000), random_bytes(rng, 2_000_000)
    sim.answer["server"] = lambda: Endpoint(down)
    chan = sim.open(up)
    sim.run_until(lambda: len(sim.ends["client"][chan].got) > 500_000, limit=30)
    sim.client_gone = True  # the laptop sleeps: both sides stall
    sim.run_for(20)
    assert not sim.finished("client", chan)
    sim.resume(make_keys(5))
    sim.run_until(lambda: sim.finished("client", chan) and sim.finished("server", chan),
                  limit=sim.now + 60)
    assert sim.ends["client"][chan].got == down and sim.ends["server"][chan].got == up


def test_refusals_carry_the_reason():
    sim = ChanSim(SimNet(5), policy=mc.ForwardPolicy(permit_open="127.0.0.1:22 [::1]:*"))
    allowed = sim.open(b"", port=22)
    forbidden = sim.open(b"", host="10.0.0.1", port=22)
    sim.run_until(lambda: len(sim.events["client"]) == 2, limit=5)
    refused = [e for e in sim.events["client"] if isinstance(e, mc.ChannelRefused)]
    assert refused == [mc.ChannelRefused(forbidden, mc.PROHIBITED,
                                         "10.0.0.1:22 is not in the server's permit_open")]
    assert has(sim.events["client"], mc.ChannelOpened(allowed))
    # The server never saw the forbidden target as a request: no connect was attempted.
    assert [e.chan for e in sim.events["server"] if isinstance(e, mc.ChannelRequested)] == [allowed]

    off = ChanSim(SimNet(6), policy=mc.ForwardPolicy(allow_tcp="no"))
    chan = off.open(b"")
    off.run_until(lambda: off.events["client"], limit=5)
    assert typed(off.events["client"]) == typed([mc.ChannelRefused(
        chan, mc.PROHIBITED, "local port forwarding is disabled on this server")])


def test_a_failed_connect_is_reported_and_forgotten():
    sim = ChanSim(SimNet(7))
    sim.answer["server"] = None
    chan = sim.open(b"data")
    sim.run_until(lambda: sim.events["client"], limit=5)
    assert typed(sim.events["client"]) == typed([mc.ChannelRefused(chan, mc.CONNECT_FAILED,
                                                       "Connection refused")])
    assert sim.smux.channels() == [] and sim.cmux.channels() == []


def test_an_open_unanswered_for_a_minute_fails():
    sim = ChanSim(SimNet(8))
    sim.run_for(0.2)
    sim.client_gone = True
    sim.client_gone = False
    sim.net.blackout_until = float("inf")
    chan = sim.open(b"")
    sim.run_for(mc.OPEN_TIMEOUT_SECS - 1)
    assert typed(sim.events["client"]) == typed([])
    sim.run_for(2)
    assert typed(sim.events["client"]) == typed([mc.ChannelRefused(chan, mc.TIMED_OUT,
                                                      "no answer from the peer")])


def test_remote_listeners_are_requested_answered_and_refused_by_policy():
    sim = ChanSim(SimNet(9))
    sim.cmux.listen(1, "localhost", 8080)
    sim.run_until(lambda: sim.events["server"], limit=5)
    assert typed(sim.events["server"]) == typed([mc.ListenRequested(1, "localhost", 8080)])
    sim.smux.answer_listen(1, mc.OPENED, 8080)
    sim.run_until(lambda: sim.events["client"], limit=5)
    assert typed(sim.events["client"]) == typed([mc.ListenAnswered(1, mc.OPENED, 8080, "")])
    # A connection to it: the server opens a FORWARDED channel, the client connects.
    sim.answer["client"] = lambda: Endpoint(b"pong")
    chan = sim.smux.open(mc.KIND_FORWARDED, "127.0.0.1", 40000, sim.now, ref=1)
    sim.ends["server"][chan] = Endpoint(b"ping")
    sim.run_until(lambda: sim.finished("server", chan), limit=5)
    assert sim.ends["client"][chan].got == b"ping" and sim.ends["server"][chan].got == b"pong"
    assert chan % 2 == 0  # server-opened channels are even

    off = ChanSim(SimNet(10), policy=mc.ForwardPolicy(allow_tcp="local"))
    off.cmux.listen(1, "localhost", 8080)
    off.run_until(lambda: off.events["client"], limit=5)
    assert typed(off.events["server"]) == typed([])
    assert typed(off.events["client"]) == typed([mc.ListenAnswered(
        1, mc.PROHIBITED, 8080, "remote port forwarding is disabled on this server")])


def test_the_client_refuses_channels_it_did_not_ask_for():
    sim = ChanSim(SimNet(11))
    agent = sim.smux.open(mc.KIND_AGENT, "", 0, sim.now)
    forwarded = sim.smux.open(mc.KIND_FORWARDED, "127.0.0.1", 1, sim.now, ref=7)
    sim.run_until(lambda: len(sim.events["server"]) == 2, limit=5)
    assert typed(sim.events["server"]) == typed([
        mc.ChannelRefused(agent, mc.PROHIBITED, "agent forwarding was not requested"),
        mc.ChannelRefused(forwarded, mc.PROHIBITED, "no remote forward 7")])
    assert typed(sim.events["client"]) == typed([])


def test_takeover_ends_the_old_clients_channels_and_listeners():
    sim = ChanSim(SimNet(12))
    sim.answer["server"] = lambda: Endpoint(b"", eof=False)
    chan = sim.open(b"", eof=False)
    sim.cmux.listen(1, "localhost", 0)
    sim.run_until(lambda: has(sim.events["client"], mc.ChannelOpened(chan)), limit=5)
    sim.smux.answer_listen(1, mc.OPENED, 40001)
    sim.server.take_over(make_keys(13), b"screen", "taken over", sim.now)
    assert has(sim.events["server"], mc.ChannelFinished(chan)) or \
        sim.smux.next_event() == mc.ChannelFinished(chan)
    assert sim.smux.channels() == [] and sim.smux.listeners == {}


def test_an_exited_shell_keeps_the_session_until_its_channels_close():
    """As ssh: the shell's exit status reaches the client at once, but the session stays
    while a forwarded connection is open, its bytes all arrive, no new -R listener is
    taken, and it ends once the connection closes."""
    rng = random.Random(14)
    payload = random_bytes(rng, 600_000)
    sim = ChanSim(SimNet(14, loss=0.05))
    sim.answer["server"] = lambda: Endpoint(payload, eof=False)
    chan = sim.open(b"", eof=False)
    sim.cmux.listen(1, "localhost", 0)
    sim.run_until(lambda: has(sim.events["client"], mc.ChannelOpened(chan)), limit=5)
    sim.server.pty_closed(sim.now)
    sim.server.shell_exited(3, sim.now)
    sim.run_until(lambda: sim.client_events, limit=10)
    assert typed(sim.client_events) == typed([ms.SessionExited(3)])
    assert not sim.smux.accepting and not sim.cmux.accepting and sim.smux.listeners == {}
    sim.run_until(lambda: sim.server.all_acked(), limit=30)
    assert not sim.server.finished(sim.now)  # acked, but the channel is still open
    sim.cmux.listen(2, "localhost", 0)  # a late -R request is refused, not bound
    sim.run_until(lambda: len(sim.events["client"]) > 1, limit=40)
    assert typed(sim.events["client"][-1:]) == typed([mc.ListenAnswered(
        2, mc.PROHIBITED, 0, "the session's shell has exited")])
    for end in (sim.ends["server"][chan], sim.ends["client"][chan]):
        end.eof = True  # both sides close their sockets
    sim.run_until(lambda: sim.server.finished(sim.now), limit=60)
    assert sim.ends["client"][chan].got == payload
    assert "shell exited with status 3" in sim.server.ending


def test_a_quit_ends_an_exited_session_with_open_channels_at_once():
    sim = ChanSim(SimNet(15))
    sim.answer["server"] = lambda: Endpoint(b"", eof=False)
    sim.open(b"", eof=False)
    sim.run_until(lambda: sim.events["client"], limit=5)
    sim.server.pty_closed(sim.now)
    sim.server.shell_exited(0, sim.now)
    sim.run_until(lambda: sim.client_events and sim.server.all_acked(), limit=10)
    assert not sim.server.finished(sim.now)
    sim.client.quit("client quit")  # Ctrl-C while waiting for the connections
    sim.run_until(lambda: sim.server.finished(sim.now), limit=12)
    assert sim.server.ending == "client: client quit"


# ---------------------------------------------------------------------------
# Hostile peers: every malformed record is a clean rejection
# ---------------------------------------------------------------------------

def _deliver(sim: ChanSim, record_type: int, body: bytes) -> None:
    """A record as the client's mux would send it, through the real session and network."""
    sim.client.records.send(record_type, body)
    sim.run_for(0.2)


def test_data_beyond_the_window_closes_that_channel_only():
    sim = ChanSim(SimNet(14))
    sim.answer["server"] = lambda: Endpoint(b"", eof=False)
    victim = sim.open(b"", eof=False)
    other = sim.open(b"hello", eof=False)
    sim.run_until(lambda: sim.ends["server"].get(other) and sim.ends["server"][other].got,
                  limit=5)
    sim.ends["server"][victim].rate = 0  # its reader is stuck: the grant stays put
    for i in range(mc.CHANNEL_WINDOW // mc.MAX_CHUNK + 2):  # past the 256 KiB grant
        sim.client.records.send(mc.RECORD_DATA, mc.DATA_HEADER.pack(victim, i * mc.MAX_CHUNK)
                                + b"x" * mc.MAX_CHUNK)
    sim.run_for(2)
    assert sim.smux.violations >= 1
    assert victim not in sim.smux.channels() and other in sim.smux.channels()
    assert len(sim.ends["server"][victim].got) <= mc.CHANNEL_WINDOW
    # The session and the other channel carry on.
    sim.client.send_input(b"ok\r")
    sim.run_until(lambda: sim.shell_in == b"ok\r", limit=sim.now + 2)


@pytest.mark.parametrize("record_type, body", [
    (mc.RECORD_OPEN, b""),  # too short
    (mc.RECORD_OPEN, mc.OPEN_BODY.pack(3, mc.KIND_TCP, 1000, 0, 80) + b"\x09127.0"),  # host cut
    (mc.RECORD_OPEN, mc.OPEN_BODY.pack(3, mc.KIND_TCP, 1000, 0, 80) + b"\x02\xff\xfe"),  # not UTF-8
    (mc.RECORD_OPEN, mc.OPEN_BODY.pack(3, mc.KIND_TCP, 1000, 0, 80) + b"\x02a\n"),  # control
    (mc.RECORD_OPEN, mc.OPEN_BODY.pack(4, mc.KIND_TCP, 1000, 0, 80) + b"\x01a"),  # server's id
    (mc.RECORD_RESULT, b"\x00"),
    (mc.RECORD_DATA, b"\x00\x00"),
    (mc.RECORD_WINDOW, b"\x00" * 5),
    (mc.RECORD_EOF, b""),
    (mc.RECORD_CLOSE, b"\x01"),
    (mc.RECORD_LISTEN, b"\x09" * 7),  # unknown op
    (mc.RECORD_LISTEN, mc.LISTEN_BODY.pack(mc.LISTEN_REQUEST, 1, 80) + b"\xff"),  # host cut
])
def test_malformed_records_are_rejected_and_the_session_goes_on(record_type, body):
    sim = ChanSim(SimNet(15))
    _deliver(sim, record_type, body)
    assert sim.smux.violations == 1
    assert [e for e in sim.events["server"] if isinstance(e, mc.ChannelRequested)] == []
    sim.answer["server"] = lambda: Endpoint(b"fine")
    chan = sim.open(b"")
    sim.run_until(lambda: sim.finished("client", chan), limit=sim.now + 5)
    assert sim.ends["client"][chan].got == b"fine"


def test_an_open_for_another_kind_or_a_repeated_id_is_not_a_second_connect():
    sim = ChanSim(SimNet(16))
    _deliver(sim, mc.RECORD_OPEN, mc.OPEN_BODY.pack(1, mc.KIND_AGENT, 1000, 0, 0) + b"\x00")
    refused = [e for e in sim.events["server"] if isinstance(e, mc.ChannelRequested)]
    assert refused == [] and sim.smux.channels() == []
    open_body = mc.OPEN_BODY.pack(3, mc.KIND_TCP, 1000, 0, 80) + b"\x09127.0.0.1"
    _deliver(sim, mc.RECORD_OPEN, open_body)
    _deliver(sim, mc.RECORD_OPEN, open_body)  # a replayed copy
    requested = [e for e in sim.events["server"] if isinstance(e, mc.ChannelRequested)]
    assert [e.chan for e in requested] == [3]


def test_an_oversized_record_is_skipped_unread():
    sim = ChanSim(SimNet(17))
    sim.client.conn.send(struct.pack("!BI", mc.RECORD_DATA, ms.MAX_RECORD_BODY + 1)
                         + b"z" * (ms.MAX_RECORD_BODY + 1), mc.STREAM_ID)
    sim.run_for(1)
    sim.answer["server"] = lambda: Endpoint(b"after")
    chan = sim.open(b"")
    sim.run_until(lambda: sim.finished("client", chan), limit=sim.now + 5)
    assert sim.ends["client"][chan].got == b"after"


def test_too_many_channels_are_refused_not_buffered():
    sim = ChanSim(SimNet(18))
    sim.answer["server"] = lambda: Endpoint(b"", eof=False)
    chans = [sim.open(b"", eof=False) for _ in range(mc.MAX_CHANNELS + 3)]
    sim.run_for(2)
    refused = [e.chan for e in sim.events["client"] if isinstance(e, mc.ChannelRefused)]
    assert refused == chans[mc.MAX_CHANNELS:]
    assert len(sim.smux.channels()) == mc.MAX_CHANNELS


# ---------------------------------------------------------------------------
# Sans-IO parsers
# ---------------------------------------------------------------------------

def _feed_bytewise(parser: mc.SocksParser, data: bytes) -> bytes:
    return b"".join(parser.feed(data[i:i + 1]) for i in range(len(data)))


def test_socks5_connect_by_name_ipv4_and_ipv6_in_pieces():
    for request, target in [
        (b"\x05\x01\x00\x03\x09localhost\x1f\x90", ("localhost", 8080)),
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", ("127.0.0.1", 80)),
        (b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x01\xbb", ("::1", 443)),
    ]:
        parser = mc.SocksParser()
        answer = _feed_bytewise(parser, b"\x05\x02\x02\x00" + request + b"GET")
        assert answer == b"\x05\x00" and parser.target == target
        assert parser.leftover == b"GET"  # the connection's first bytes, one at a time
    whole = mc.SocksParser()
    assert whole.feed(b"\x05\x01\x00\x05\x01\x00\x03\x01a\x00\x16data") == b"\x05\x00"
    assert whole.target == ("a", 22) and whole.leftover == b"data"


def test_socks4_and_4a():
    parser = mc.SocksParser()
    _feed_bytewise(parser, b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00")
    assert parser.target == ("127.0.0.1", 80) and parser.version == 4
    parser = mc.SocksParser()
    parser.feed(b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example.test\x00rest")
    assert parser.target == ("example.test", 80) and parser.leftover == b"rest"
    assert mc.socks_reply(4, True)[:2] == b"\x00\x5a"
    assert mc.socks_reply(5, mc.socks5_code(mc.PROHIBITED))[:2] == b"\x05\x02"


@pytest.mark.parametrize("data, reply", [
    (b"GET / HTTP/1.1\r\n", b""),  # not SOCKS at all
    (b"\x05\x01\x02", b"\x05\xff"),  # only username/password offered
    (b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x07"),  # BIND
    (b"\x05\x01\x00\x05\x01\x00\x09", b"\x05\x08"),  # unknown address type
    (b"\x05\x01\x00\x05\x01\x00\x03\x02\xff\xfe\x00\x50", b"\x05\x01"),  # a binary name
    (b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5b"),  # SOCKS4 BIND
])
def test_socks_garbage_is_refused_with_the_right_answer(data, reply):
    parser = mc.SocksParser()
    with pytest.raises(mc.SocksError) as caught:
        _feed_bytewise(parser, data)
    assert caught.value.reply[:2] == reply
    assert parser.target is None


def test_a_socks_request_cannot_grow_without_bound():
    parser = mc.SocksParser()
    with pytest.raises(mc.SocksError):
        parser.feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 1000)


def test_forward_specs_as_ssh_spells_them():
    assert mc.parse_forward("-L", "8080:localhost:80") == mc.ForwardSpec(
        "localhost", 8080, "localhost", 80)
    assert mc.parse_forward("-L", "*:8080:[::1]:80") == mc.ForwardSpec("*", 8080, "::1", 80)
    assert mc.parse_forward("-R", "[::1]:0:db:5432") == mc.ForwardSpec("::1", 0, "db", 5432)
    assert mc.parse_forward("-D", "1080") == mc.ForwardSpec("localhost", 1080, None, 0)
    assert mc.parse_forward("-D", "0.0.0.0:1080").bind_host == "0.0.0.0"
    for option, bad in [("-L", "8080:host"), ("-L", "0:h:80"), ("-L", "80:h:99999"),
                        ("-D", "a:b:c"), ("-R", "x:h:1"), ("-L", "1::2")]:
        with pytest.raises(ValueError):
            mc.parse_forward(option, bad)
    assert mc.bind_address("localhost") == "127.0.0.1" and mc.bind_address("*") == "::"


def test_permit_open_as_sshd():
    assert mc.ForwardPolicy(permit_open="any").refusal("10.1.2.3", 9) is None
    none = mc.ForwardPolicy(permit_open="none")
    assert none.refusal("127.0.0.1", 80)[0] == mc.PROHIBITED
    some = mc.ForwardPolicy(permit_open="localhost:* *.example.com:443 [::1]:22")
    assert some.refusal("LOCALHOST", 5) is None
    assert some.refusal("www.example.com", 443) is None
    assert some.refusal("www.example.com", 80) is not None
    assert some.refusal("::1", 22) is None and some.refusal("::1", 23) is not None
    for bad in ("host", "host:http", ":80", "a:0"):
        with pytest.raises(ValueError):
            mc.parse_permit_open(bad)
    remote_only = mc.ForwardPolicy(allow_tcp="remote")
    assert remote_only.refusal("127.0.0.1", 80)[0] == mc.PROHIBITED
    assert remote_only.allow_remote


def test_a_flood_of_opens_whose_answers_are_never_acknowledged_stays_bounded():
    """The peer opens channel after channel and never acknowledges our answers: they stop
    at the record stream's window instead of piling up."""
    sim = ChanSim(SimNet(19), policy=mc.ForwardPolicy(permit_open="none"))
    for chan in range(1, 40_001, 2):  # fed straight in: no acknowledgement ever comes
        sim.smux.on_record(mc.RECORD_OPEN, mc.OPEN_BODY.pack(chan, mc.KIND_TCP, 1000, 0, 80)
                           + b"\x01a", sim.now)
    unacked = sim.server.conn.unacked_bytes(ms.STREAM_RECORDS)
    assert unacked < ms.RECORD_WINDOW + 1000
    assert sim.smux.violations > 10_000 and sim.smux.channels() == []


# ---------------------------------------------------------------------------
# The agent socket directory
# ---------------------------------------------------------------------------

def test_the_agent_directory_is_private_and_removed(tmp_path):
    agent_dir = mc.AgentSocketDir(os.getuid(), os.getgid())
    info = os.lstat(agent_dir.dir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert stat.S_IMODE(os.lstat(agent_dir.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.lstat(agent_dir.path).st_mode)
    agent_dir.close()
    assert not os.path.exists(agent_dir.dir)


def test_a_directory_swapped_for_a_symlink_does_not_redirect_the_cleanup(tmp_path):
    """The user owns the directory, so they can rename it and leave a symlink to somewhere
    else holding an ``agent.sock``: the server's cleanup must not follow it."""
    agent_dir = mc.AgentSocketDir(os.getuid(), os.getgid())
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "agent.sock").write_text("not yours")
    moved = str(tmp_path / "moved")
    os.rename(agent_dir.dir, moved)
    os.symlink(decoy, agent_dir.dir)
    try:
        agent_dir.close()
        assert (decoy / "agent.sock").read_text() == "not yours"
        assert os.path.islink(agent_dir.dir)  # not removed either
        assert os.listdir(moved) == []  # the real socket went, through the descriptor
    finally:
        os.unlink(agent_dir.dir)
