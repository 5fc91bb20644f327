"""The session rules on the sans-IO cores: a ServerSession and a ClientSession over the
simulated network of test_transport, with a fake clock (no process, socket or sleep).

What the process-level tests used to show by starting mps and waiting, in milliseconds here:
exit reported after the last output, exit while the client is away, shutdown, quit, the
detached and unattached expiry, resume at exact offsets, records across a re-key,
back-pressure, and the record encoding's bounds and version rule.
"""

from __future__ import annotations

import math
import random

import pytest
from test_transport import CLIENT_ADDR, CLIENT_ADDR2, SERVER_ADDR, SimNet, make_keys, random_bytes

import moshpit_session as ms
import moshpit_transport as mt

pytestmark = pytest.mark.timeout(60)

SESSION_ID, SECRET = b"s" * 16, b"r" * 32


class CoreSim:
    """A client core and a server core over a SimNet; the "programs" around them are the
    lists below: what the client typed and saw, what the shell got and the events."""

    def __init__(self, net: SimNet, detached: float = 0, unattached: float = 0,
                 keys=None) -> None:
        keys = keys or make_keys()
        self.net, self.now = net, 0.0
        self.server = ms.ServerSession(keys, 0.0, detached, unattached)
        self.client = ms.ClientSession(keys, 0.0, SERVER_ADDR, SESSION_ID, SECRET, (24, 80))
        self.client_addr = CLIENT_ADDR
        self.client_gone = False  # the client process is not running (laptop asleep)
        self.shell_in = bytearray()  # what reached the PTY
        self.screen = bytearray()  # what reached the client's stdout
        self.server_events: list = []
        self.client_events: list = []
        self.pty_source = b""  # what the shell will write, read only while may_read_pty
        self.pty_read = 0
        self.steps = 0

    def _app(self) -> None:
        server = self.server
        while self.pty_read < len(self.pty_source) and server.may_read_pty():
            chunk = self.pty_source[self.pty_read:self.pty_read + 16384]
            server.pty_output(chunk, self.now)
            self.pty_read += len(chunk)
        for core, events in ((server, self.server_events), (self.client, self.client_events)):
            event = core.next_event()
            while event is not None:
                if isinstance(event, ms.InputReceived):
                    self.shell_in += event.data
                elif isinstance(event, (ms.OutputReceived, ms.RepaintReceived)):
                    self.screen += event[0]  # a repaint is written to the terminal too
                else:
                    events.append(event)
                event = core.next_event()

    def step(self, until: float = float("inf")) -> None:
        self.steps += 1
        assert self.steps < 200_000, "simulation does not converge"
        self._app()
        for core, src in ((self.server, SERVER_ADDR), (self.client, self.client_addr)):
            if core is self.client and self.client_gone:
                continue
            for datagram, dst in core.datagrams_to_send(self.now):
                self.net.send(self.now, datagram, src, dst)
        times = [t for t in (self.server.next_timeout(), self.net.next_time(),
                             None if self.client_gone else self.client.next_timeout())
                 if t is not None]
        self.now = max(self.now, min(times + [until]))
        for datagram, src, dst in self.net.pop_due(self.now):
            if dst == SERVER_ADDR:
                self.server.receive_datagram(datagram, src, self.now)
            elif dst == self.client_addr and not self.client_gone:
                self.client.receive_datagram(datagram, src, self.now)
        self._app()

    def run_until(self, done, limit: float) -> None:
        while not done():
            assert self.now < limit, f"not done by t={limit}"
            self.step(until=limit)

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(until=end)

    def finished_by(self, limit: float) -> None:
        self.run_until(lambda: self.server.finished(self.now), limit)

    def resume(self, keys, addr: tuple = CLIENT_ADDR2) -> None:
        """The resume handshake, as mps and mp apply it: server first, then the client."""
        session_id, secret, client_has = self.client.resume_request()
        assert (session_id, secret) == (SESSION_ID, self.client.resume_secret)
        server_has = self.server.resume(keys, client_has, self.now)
        self.client_addr, self.client_gone = addr, False
        self.client.resumed(keys, server_has, b"n" * 32, SERVER_ADDR, self.now)


def exited(events: list) -> list:
    return [e.exit_status for e in events if isinstance(e, ms.SessionExited)]


# ---------------------------------------------------------------------------
# Exit, quit, shutdown
# ---------------------------------------------------------------------------

def test_exit_is_reported_after_all_output_and_ends_once_acknowledged():
    rng = random.Random(1)
    sim = CoreSim(SimNet(1, loss=0.1))
    sim.pty_source = random_bytes(rng, 300_000)
    sim.client.send_input(b"exit 3\r")
    sim.run_until(lambda: sim.shell_in == b"exit 3\r" and sim.pty_read == len(sim.pty_source),
                  limit=30)
    sim.server.shell_exited(3, sim.now)
    sim.server.pty_closed(sim.now)
    assert sim.server.ending == "shell exited with status 3"
    sim.run_until(lambda: sim.client_events, limit=sim.now + 30)
    assert exited(sim.client_events) == [3]
    assert sim.screen == sim.pty_source, "the status came before the last output"
    sim.finished_by(sim.now + 5)


def test_exit_waits_for_a_quiet_pty_unless_it_closes():
    sim = CoreSim(SimNet(2))
    sim.run_for(0.1)
    sim.server.shell_exited(0, sim.now)
    sim.run_for(0.5)
    sim.server.pty_output(b"late words", sim.now)  # a background job still writing
    words_at = sim.now
    sim.run_until(lambda: sim.server.ending, limit=5)
    assert sim.now == pytest.approx(words_at + ms.PTY_DRAIN_SECS, abs=0.05)
    sim.run_until(lambda: sim.client_events, limit=sim.now + 5)
    assert sim.screen == b"late words" and exited(sim.client_events) == [0]


def test_exit_while_the_client_is_away_arrives_on_resume():
    sim = CoreSim(SimNet(3), detached=3600)
    sim.run_for(0.2)
    sim.client_gone = True  # laptop lid closed
    sim.pty_source = b"the last words"
    sim.run_for(1.0)
    sim.server.shell_exited(5, sim.now)
    sim.server.pty_closed(sim.now)
    sim.run_for(600)  # away for ten minutes: the session waits, nothing acknowledged
    assert not sim.server.finished(sim.now) and not sim.client_events
    sim.resume(make_keys(4))
    sim.run_until(lambda: sim.client_events, limit=sim.now + 5)
    assert exited(sim.client_events) == [5] and sim.screen == b"the last words"
    sim.finished_by(sim.now + 5)


def server_timer(sim: CoreSim) -> float:
    """The server core's next deadline once it has sent what is due now (an answer)."""
    for datagram, dst in sim.server.datagrams_to_send(sim.now):
        sim.net.send(sim.now, datagram, SERVER_ADDR, dst)
    return sim.server.next_timeout()


def count_sends(sim: CoreSim, src: tuple) -> list:
    """The times of the datagrams ``src`` sends from now on (a growing list)."""
    times, send = [], sim.net.send

    def tap(now, datagram, source, dst):
        if source == src:
            times.append(now)
        send(now, datagram, source, dst)

    sim.net.send = tap
    return times


def test_an_idle_server_core_sleeps_until_its_expiry_attached_or_away():
    """Zero wake-ups: once the handshake has settled and the client is quiet, the server's
    only deadline is the detached expiry (the client's keepalives are events, not timers);
    output sent to a client that then went away is resent only for PEER_AWAY_SECS, and the
    client's first packet on its return brings it."""
    sim = CoreSim(SimNet(6, delay=0.02), detached=3600)
    sim.client.send_input(b"ls\r")
    sim.pty_source = b"file\r\n"
    sim.run_for(5)
    for _ in range(100):
        sim.step(until=sim.now + 10)
        assert server_timer(sim) == sim.server.conn.last_heard + 3600
    sent = count_sends(sim, SERVER_ADDR)
    gone = sim.now
    sim.client_gone = True  # laptop lid closed
    sim.pty_source += b"a line written while the client sleeps"
    sim.run_for(600)
    assert sent and max(sent) <= gone + mt.PEER_AWAY_SECS + mt.MAX_BACKOFF_RTO_SECS
    assert server_timer(sim) == sim.server.conn.last_heard + 3600 > sim.now
    sim.client_gone = False  # lid opened: same address, the client's timers are overdue
    sim.run_until(lambda: sim.screen.endswith(b"sleeps"), limit=sim.now + 1)


def test_exit_while_away_with_the_window_full_sleeps_instead_of_spinning():
    """The shell exits while a client that is away holds the output window full: the drain
    deadline passes, but EXIT can only follow the output: no deadline in the past (a busy
    loop in mps) until the client's return opens the window."""
    rng = random.Random(7)
    sim = CoreSim(SimNet(7), detached=3600)
    sim.run_for(0.5)
    sim.client_gone = True
    sim.pty_source = random_bytes(rng, 400_000)
    sim.run_for(3)
    assert not sim.server.may_read_pty(), "the window is full"
    sim.server.shell_exited(2, sim.now)
    sim.run_for(ms.PTY_DRAIN_SECS + 30)
    assert server_timer(sim) == sim.server.conn.last_heard + 3600
    sim.client_gone = False
    sim.run_until(lambda: sim.client_events, limit=sim.now + 10)
    assert exited(sim.client_events) == [2]
    assert sim.screen == sim.pty_source[:sim.pty_read]
    sim.finished_by(sim.now + 5)


def test_exit_while_away_past_the_detached_timeout_ends_the_session():
    sim = CoreSim(SimNet(5), detached=60)
    sim.run_for(0.2)
    sim.client_gone = True
    sim.server.shell_exited(0, sim.now)
    sim.server.pty_closed(sim.now)
    sim.finished_by(sim.now + 61)
    assert sim.now == pytest.approx(sim.server.conn.last_heard + 60)


def test_client_quit_ends_the_session_at_once_and_input_after_it_is_dropped():
    sim = CoreSim(SimNet(6, loss=0.3))
    sim.client.send_input(b"ls\r")
    sim.run_until(lambda: sim.shell_in, limit=10)
    sim.client.quit("client quit")
    sim.client.send_input(b"never typed into the shell")
    sim.run_until(lambda: sim.server.finished(sim.now), limit=sim.now + 10)
    assert sim.server.ending == "client: client quit" and sim.shell_in == b"ls\r"
    assert sim.server_events == [ms.ClientAddressChanged(CLIENT_ADDR, True),
                                 ms.ShutdownReceived("client quit")]


def test_quit_request_over_tcp_ends_the_session_at_once():
    sim = CoreSim(SimNet(7))
    sim.client.send_input(b"x" * 100)
    sim.run_until(lambda: len(sim.shell_in) == 100, limit=5)
    assert sim.server.end_requested(sim.now) == 100
    assert sim.server.finished(sim.now) and "quit request" in sim.server.ending


def test_server_shutdown_tells_the_client_then_ends():
    sim = CoreSim(SimNet(8))
    sim.run_for(0.1)
    sim.server.shutdown("server shutting down", sim.now)
    assert not sim.server.may_read_pty()
    sim.run_until(lambda: sim.client_events, limit=5)
    assert sim.client_events == [ms.ShutdownReceived("server shutting down")]
    sim.finished_by(sim.now + 1)


@pytest.mark.parametrize("flush", [None, 5.0, 0.0])
def test_server_shutdown_with_the_client_away_ends_after_the_flush_time(flush):
    """shutdown_flush_secs (default SHUTDOWN_FLUSH_SECS); 0: the notice leaves once, the
    session ends at once."""
    sim = CoreSim(SimNet(9), detached=3600)
    if flush is not None:
        sim.server = ms.ServerSession(make_keys(), 0.0, 3600, 0, shutdown_flush_secs=flush)
    sim.run_for(0.1)
    sim.client_gone = True
    sim.server.shutdown("server shutting down", sim.now)
    start = sim.now
    sim.finished_by(start + 10)
    expected = ms.SHUTDOWN_FLUSH_SECS if flush is None else flush
    assert sim.now == pytest.approx(start + expected, abs=0.01)


# ---------------------------------------------------------------------------
# Detached and unattached expiry
# ---------------------------------------------------------------------------

def test_a_session_nobody_attached_ends_after_the_unattached_timeout():
    sim = CoreSim(SimNet(10), detached=3600, unattached=30)
    sim.client_gone = True  # UDP blocked: not one packet from the client
    sim.finished_by(100)
    assert sim.now == pytest.approx(30, abs=0.01)
    assert sim.server.ending.startswith("never attached: no UDP packet from the client within 30 s")


def test_an_attached_session_gets_the_detached_timeout_and_a_resume_restarts_it():
    sim = CoreSim(SimNet(11), detached=120, unattached=30)
    sim.run_for(0.5)  # attached: the unattached limit no longer applies
    sim.client_gone = True
    sim.run_for(100)
    assert not sim.server.finished(sim.now)
    sim.resume(make_keys(12))  # the handshake counts as contact
    sim.client_gone = True
    away = sim.now
    sim.finished_by(away + 200)
    assert sim.now == pytest.approx(sim.server.conn.last_heard + 120)
    assert sim.server.conn.last_heard >= away
    assert sim.server.ending == "detached for more than 120 s"


def test_zero_timeouts_keep_a_detached_session_forever():
    sim = CoreSim(SimNet(13))
    sim.client_gone = True
    sim.run_for(30 * 86400)
    assert not sim.server.finished(sim.now) and sim.server.next_timeout() is None


# ---------------------------------------------------------------------------
# Resume, re-key, records
# ---------------------------------------------------------------------------

def test_resume_continues_both_streams_at_exact_offsets():
    rng = random.Random(14)
    typed = random_bytes(rng, 200_000)
    sim = CoreSim(SimNet(14, loss=0.2), detached=3600)
    sim.pty_source = random_bytes(rng, 400_000)
    sim.client.send_input(typed[:100_000])
    sim.run_until(lambda: len(sim.screen) > 100_000 and len(sim.shell_in) > 30_000, limit=30)
    sim.net.blackout_until = sim.now + 30
    sim.client.send_input(typed[100_000:])  # typed during the outage: sent once, later
    sim.run_for(15)
    sim.resume(make_keys(15))
    sim.run_until(lambda: sim.shell_in == typed and sim.screen == sim.pty_source
                  and sim.client.all_acked() and sim.server.all_acked(), limit=sim.now + 120)


def test_an_outage_without_resume_loses_and_doubles_nothing():
    """The path comes back after 20 s and the same session carries on (no handshake)."""
    rng = random.Random(27)
    sim = CoreSim(SimNet(27, loss=0.05), detached=3600)
    sim.pty_source = random_bytes(rng, 200_000)
    sim.run_until(lambda: len(sim.screen) > 20_000, limit=10)
    sim.net.blackout_until = sim.now + 20
    sim.client.send_input(b"typed in the dark\r")
    sim.run_until(lambda: sim.screen == sim.pty_source and sim.shell_in == b"typed in the dark\r"
                  and sim.client.all_acked() and sim.server.all_acked(), limit=sim.now + 60)
    assert not sim.server.finished(sim.now)


def test_resize_survives_a_resume_and_sizes_coalesce():
    sim = CoreSim(SimNet(16, loss=0.3), detached=3600)
    sim.run_for(0.5)
    sim.net.blackout_until = sim.now + 20
    for cols in range(81, 200):  # the window dragged during the outage
        sim.client.resize(24, cols)
    sim.run_for(10)
    sim.resume(make_keys(17))
    sim.run_until(lambda: sim.client.all_acked(), limit=sim.now + 30)
    resizes = [e for e in sim.server_events if isinstance(e, ms.ResizeRequested)]
    assert resizes[-1] == ms.ResizeRequested(24, 199) and len(resizes) <= 3
    sim.client.resize(24, 199)  # unchanged: nothing to send
    assert sim.client.all_acked()


def test_records_unacknowledged_before_a_rekey_are_sent_again_and_reported_once():
    sim = CoreSim(SimNet(18), detached=3600)
    sim.run_for(0.5)
    sim.net.blackout_until = sim.now + 60
    sim.server.shell_exited(9, sim.now)
    sim.server.pty_closed(sim.now)
    sim.run_for(10)
    sim.resume(make_keys(19))
    sim.run_for(0.01)
    sim.resume(make_keys(20))  # a second resume while the record may be in flight
    sim.net.blackout_until = sim.now
    sim.run_until(lambda: sim.server.finished(sim.now), limit=sim.now + 20)
    assert exited(sim.client_events) == [9]


def test_back_pressure_stops_pty_reads_until_the_client_acknowledges():
    sim = CoreSim(SimNet(21, delay=0.05))
    sim.pty_source = b"y" * (4 * 1024 * 1024)  # `yes`
    sim.run_for(0.01)
    assert not sim.server.may_read_pty()
    assert sim.pty_read <= 256 * 1024 + 16384, "read only what the window holds"
    sim.run_until(lambda: len(sim.screen) == len(sim.pty_source), limit=60)
    assert sim.server.may_read_pty()


def test_pty_room_is_what_may_be_read_before_back_pressure_stops_reading():
    """mps reads the PTY until it has ``pty_room()`` bytes and hands them over in one call:
    it stops where a read-at-a-time loop asking ``may_read_pty()`` would have stopped."""
    sim = CoreSim(SimNet(25))
    sim.run_for(0.1)
    room = sim.server.pty_room()
    sim.server.pty_output(b"y" * (math.ceil(room) - 1), sim.now)
    assert sim.server.may_read_pty() and 0 < sim.server.pty_room() <= 1
    sim.server.pty_output(b"y", sim.now)
    assert not sim.server.may_read_pty() and sim.server.pty_room() <= 0
    sim.run_until(lambda: len(sim.screen) == math.ceil(room), limit=5)
    assert sim.server.pty_room() > 0, "all acknowledged: room again"
    sim.server.pty_closed(sim.now)
    assert sim.server.pty_room() == 0 and not sim.server.may_read_pty()


def test_the_client_reads_stdin_only_while_the_input_window_has_room():
    sim = CoreSim(SimNet(22))
    sim.client_gone = False
    sim.net.blackout_until = 1e9
    while sim.client.may_read_input():
        sim.client.send_input(b"p" * 16384)
    # Reading stops once a little waits unsent (the pacing rate's SEND_QUEUE_SECS worth),
    # long before the window would stop it: nothing can build a backlog.
    assert 16384 <= sim.client.conn.unacked_bytes() <= 256 * 1024


def test_silence_counts_udp_only_not_the_resume_handshake():
    sim = CoreSim(SimNet(23), detached=3600)
    assert not sim.client.udp_heard
    sim.client.send_input(b"x")
    sim.run_until(lambda: sim.client.all_acked(), limit=1)
    assert sim.client.udp_heard and sim.client.silence(sim.now) < 0.1
    sim.net.blackout_until = sim.now + 1000
    sim.run_for(20)
    heard = sim.client.last_contact
    sim.resume(make_keys(24))
    assert sim.client.last_contact == heard, "a handshake is not UDP contact"
    sim.run_for(90)
    assert sim.client.silence(sim.now) > 100


# ---------------------------------------------------------------------------
# Record encoding
# ---------------------------------------------------------------------------

def test_records_decode_across_any_split():
    stream = (ms.encode_record(ms.RECORD_RESIZE, b"\x00\x18\x00\x50")
              + ms.encode_record(200, b"a future record")
              + ms.encode_record(ms.RECORD_SHUTDOWN, "bye ✓".encode()))
    for cut in range(len(stream) + 1):
        decoder = ms.RecordDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == [(1, b"\x00\x18\x00\x50"), (200, b"a future record"),
                       (3, "bye ✓".encode())]


def test_oversized_records_are_skipped_without_being_buffered():
    decoder = ms.RecordDecoder()
    huge = ms.RECORD_HEADER.pack(ms.RECORD_SHUTDOWN, 10 * ms.MAX_RECORD_BODY)
    assert decoder.feed(huge + b"z" * 1000) == []
    chunks = (10 * ms.MAX_RECORD_BODY - 1000) // 65536
    for _ in range(chunks):
        assert decoder.feed(b"z" * 65536) == []
        assert len(decoder._buf) < ms.RECORD_HEADER.size
    rest = 10 * ms.MAX_RECORD_BODY - 1000 - 65536 * chunks
    assert decoder.feed(b"z" * rest + ms.encode_record(ms.RECORD_SHUTDOWN, b"ok")) == [
        (ms.RECORD_SHUTDOWN, b"ok")]
    # An oversized record that arrived whole is stepped over in place.
    whole = ms.RECORD_HEADER.pack(200, ms.MAX_RECORD_BODY + 1) + bytes(ms.MAX_RECORD_BODY + 1)
    assert ms.RecordDecoder().feed(whole + ms.encode_record(ms.RECORD_SHUTDOWN, b"ok")) == [
        (ms.RECORD_SHUTDOWN, b"ok")]
    with pytest.raises(ValueError):
        ms.encode_record(ms.RECORD_SHUTDOWN, bytes(ms.MAX_RECORD_BODY + 1))


def test_unknown_records_are_skipped_and_longer_bodies_read_as_far_as_known():
    """The version rule: a newer peer's new record types and appended fields change
    nothing for this version."""
    sim = CoreSim(SimNet(25))
    sim.run_for(0.1)
    sim.client.records.send(77, b"something from the future")
    sim.client.records.send(ms.RECORD_RESIZE, ms.RESIZE_BODY.pack(50, 132) + b"new fields")
    sim.client.records.send(ms.RECORD_RESIZE, b"\x00")  # too short: ignored
    sim.run_until(lambda: sim.client.all_acked(), limit=5)
    assert sim.server_events[1:] == [ms.ResizeRequested(50, 132)]


def test_shutdown_reasons_are_cut_on_a_character_boundary():
    sim = CoreSim(SimNet(26))
    sim.client.quit("client quit ✓" + "✓" * 400)
    sim.run_until(lambda: sim.server.ending, limit=5)
    reason = sim.server.ending[len("client: "):]
    assert reason.startswith("client quit ✓") and "\ufffd" not in reason
    assert len(reason.encode()) <= ms.MAX_REASON_BYTES


def test_resume_schedule_waits_for_silence_backs_off_and_resets():
    schedule = ms.ResumeSchedule(max_backoff_secs=5.0)
    last_contact = 100.0
    assert schedule.next_attempt(last_contact) == 100.0 + ms.RESUME_AFTER_SECS
    now, starts = schedule.next_attempt(last_contact), []
    for _ in range(5):
        assert schedule.due(now, last_contact)
        schedule.started()
        assert not schedule.due(now + 1000, last_contact), "one attempt at a time"
        starts.append(now)
        now += 0.5  # the handshake failed after half a second
        schedule.finished(now)
        now = schedule.next_attempt(last_contact)
    assert [round(b - a, 3) for a, b in zip(starts, starts[1:])] == [2.5, 4.5, 5.5, 5.5]
    assert schedule.attempts == 5
    schedule.contact()
    assert schedule.next_attempt(200.0) == 200.0 + ms.RESUME_AFTER_SECS


def test_resume_schedule_follows_the_resume_after_setting():
    schedule = ms.ResumeSchedule(max_backoff_secs=5.0, resume_after_secs=4.0)
    assert not schedule.due(103.9, last_contact=100.0)
    assert schedule.due(104.0, last_contact=100.0)
    schedule.started()
    schedule.finished(104.5)
    assert schedule.next_attempt(100.0) == 104.5 + ms.FIRST_BACKOFF_SECS
    schedule.contact()
    assert schedule.next_attempt(300.0) == 304.0


# ---------------------------------------------------------------------------
# Takeover (mp --attach)
# ---------------------------------------------------------------------------

def take_over(sim: CoreSim, keys, reason: str = "session taken over from 127.0.0.3:1") -> tuple:
    """What mps and a fresh mp --attach do: the server's model stands for everything it read
    from the PTY (here: a line naming that count), the old client gets the goodbye
    datagrams, and a new attaching client at CLIENT_ADDR2 replaces it in the simulation."""
    old = sim.client
    screen = b"SCREEN after %d bytes\r\n" % sim.pty_read
    for datagram, addr in sim.server.take_over(keys, screen, reason, sim.now):
        assert addr == sim.client_addr
        old.receive_datagram(datagram, SERVER_ADDR, sim.now)
    sim.client = ms.ClientSession(keys, sim.now, SERVER_ADDR, SESSION_ID, b"n" * 32, (30, 100),
                                  attaching=True)
    sim.client_addr = CLIENT_ADDR2
    sim.screen = bytearray()
    return old, screen, sim.pty_read


def test_takeover_repaints_first_then_continues_the_output_exactly():
    """The new client sees the repaint, then exactly the output read after it (with loss:
    output overtaking the REPAINT waits for it); the old client is told why; input from
    both clients reaches the shell once each."""
    rng = random.Random(31)
    sim = CoreSim(SimNet(31, loss=0.2), detached=3600)
    sim.pty_source = random_bytes(rng, 300_000)
    sim.client.send_input(b"before\r")
    sim.run_until(lambda: len(sim.screen) > 50_000 and sim.shell_in == b"before\r", limit=30)
    sim.pty_source += random_bytes(rng, 300_000)  # the shell goes on writing
    old, screen, read_at = take_over(sim, make_keys(32))
    assert 0 < read_at < len(sim.pty_source)
    old_events = [old.next_event() for _ in range(3)]
    assert ms.ShutdownReceived("session taken over from 127.0.0.3:1") in old_events
    sim.client.send_input(b"after\r")
    sim.run_until(lambda: sim.screen == screen + sim.pty_source[read_at:]
                  and sim.shell_in == b"before\rafter\r"
                  and sim.client.all_acked() and sim.server.all_acked(), limit=sim.now + 120)
    assert sim.server.client_addr == CLIENT_ADDR2 and not sim.server.finished(sim.now)


def test_output_that_overtakes_the_repaint_is_held_until_the_repaint():
    """Datagrams reordered on the way: the attaching client gets output read after the
    take-over before the REPAINT; it writes nothing until the repaint, then the output."""
    sim = CoreSim(SimNet(35), detached=3600)
    sim.run_for(0.5)
    keys = make_keys(36)
    sim.server.take_over(keys, b"REPAINT", "taken over", sim.now)
    client = ms.ClientSession(keys, sim.now, SERVER_ADDR, SESSION_ID, b"n" * 32, (24, 80),
                              attaching=True)
    for datagram, _ in client.datagrams_to_send(sim.now):  # the server learns its address
        sim.server.receive_datagram(datagram, CLIENT_ADDR2, sim.now)
    with_repaint = sim.server.datagrams_to_send(sim.now)
    sim.server.pty_output(b"after", sim.now)
    with_output = sim.server.datagrams_to_send(sim.now)

    def deliver(datagrams) -> list:
        for datagram, _ in datagrams:
            client.receive_datagram(datagram, SERVER_ADDR, sim.now)
        return list(iter(client.next_event, None))
    assert deliver(with_output) == []
    assert deliver(with_repaint) == [ms.RepaintReceived(b"REPAINT"), ms.OutputReceived(b"after")]


def test_takeover_of_a_detached_session_sends_no_goodbye_and_exit_follows_the_repaint():
    sim = CoreSim(SimNet(33), detached=3600)
    sim.client_gone = True  # the first client never sent a packet (killed at once)
    sim.run_for(0.5)
    assert sim.server.take_over(make_keys(34), b"S", "taken over", sim.now) == []
    sim.client = ms.ClientSession(make_keys(34), sim.now, SERVER_ADDR, SESSION_ID, b"n" * 32,
                                  (24, 80), attaching=True)
    sim.client_addr, sim.client_gone = CLIENT_ADDR2, False
    sim.server.shell_exited(3, sim.now)
    sim.server.pty_closed(sim.now)
    sim.finished_by(sim.now + 10)
    assert sim.screen == b"S" and exited(sim.client_events) == [3]


def test_a_repaint_resent_after_a_resume_is_written_once():
    """The REPAINT may be in flight when the new client resumes: the lane sends it again,
    the client writes it once."""
    sim = CoreSim(SimNet(35), detached=3600)
    sim.run_for(0.5)
    keys = make_keys(36)
    sim.server.take_over(keys, b"SCREEN", "taken over", sim.now)
    sim.client = ms.ClientSession(keys, sim.now, SERVER_ADDR, SESSION_ID, b"n" * 32, (24, 80),
                                  attaching=True)
    sim.client_addr, sim.screen = CLIENT_ADDR2, bytearray()
    sim.pty_source, sim.pty_read = b"live", 0
    sim.run_for(0.2)
    sim.resume(make_keys(37))
    sim.run_until(lambda: sim.screen == b"SCREENlive" and sim.server.all_acked(),
                  limit=sim.now + 10)
    # a copy whose ack was lost, arriving after the resume: not written again
    sim.client._on_record(ms.RECORD_REPAINT, b"SCREEN", sim.now)
    sim.run_for(1.0)
    assert sim.screen == b"SCREENlive"


def test_input_eof_reaches_the_server_once_after_the_last_input_byte():
    """INPUT_EOF travels on the urgent record stream and may overtake the input it ends:
    the server reports InputEnded only once every input byte before it has come, once."""
    rng = random.Random(41)
    sim = CoreSim(SimNet(41, loss=0.2, jitter=0.05, duplicate=0.1))
    data = random_bytes(rng, 150_000)
    shell_in_at_eof = []
    next_event = sim.server.next_event

    def spy():
        event = next_event()
        if isinstance(event, ms.InputEnded):
            shell_in_at_eof.append(bytes(sim.shell_in))
        return event

    sim.server.next_event = spy
    sent = 0
    while sent < len(data):  # as mp does: only while the window has room
        if sim.client.may_read_input():
            sim.client.send_input(data[sent:sent + 4096])
            sent += 4096
        sim.step(until=sim.now + 0.01)
    sim.client.end_input()
    sim.run_until(lambda: shell_in_at_eof, limit=sim.now + 60)
    sim.run_for(5)
    assert shell_in_at_eof == [data], "EOF before the last input byte, or twice"
    assert [e for e in sim.server_events if isinstance(e, ms.InputEnded)] == [ms.InputEnded()]


def test_stderr_arrives_exactly_once_in_order_across_a_resume_and_before_exit():
    """A command's stderr rides the record lane (resent whole after a re-key): the client
    keeps each byte once, and EXIT waits for the stderr's end."""
    rng = random.Random(43)
    sim = CoreSim(SimNet(43, loss=0.1))
    sim.server.expect_stderr()
    err = random_bytes(rng, 200_000)
    got = bytearray()
    sent = 0

    def app_stderr():
        nonlocal sent
        while sent < len(err) and sim.server.may_read_stderr():
            sim.server.stderr_output(err[sent:sent + 1000], sim.now)  # small: whole ones pass
            sent += 1000
        got.extend(b"".join(e.data for e in sim.client_events
                            if isinstance(e, ms.ErrorOutputReceived)))
        sim.client_events[:] = [e for e in sim.client_events
                                if not isinstance(e, ms.ErrorOutputReceived)]

    while len(got) < 60_000:
        app_stderr()
        sim.step(until=sim.now + 0.01)
    # The client gets stderr records but its acks are lost: the resume resends them whole.
    send, acks_lost = sim.net.send, [True]
    sim.net.send = lambda now, datagram, src, dst: (
        None if acks_lost[0] and dst == SERVER_ADDR else send(now, datagram, src, dst))
    for _ in range(50):
        app_stderr()
        sim.step(until=sim.now + 0.01)
    assert len(got) > 60_000, "no record got through unacknowledged"
    acks_lost[0] = False
    sim.resume(make_keys())
    sim.server.shell_exited(0, sim.now)
    sim.server.pty_closed(sim.now)
    assert sim.server.ending is None, "EXIT before the end of stderr"
    while sent < len(err) or len(got) < len(err):
        app_stderr()
        sim.step(until=sim.now + 0.01)
        assert sim.now < 120
    sim.server.stderr_closed(sim.now)
    sim.run_until(lambda: exited(sim.client_events), limit=sim.now + 30)
    app_stderr()
    assert bytes(got) == err


# ---------------------------------------------------------------------------
# Local echo prediction: echo acks and the tty mode
# ---------------------------------------------------------------------------

class EchoShell(CoreSim):
    """A CoreSim whose shell echoes each input byte, 10 ms after the PTY took it."""

    def __init__(self, net: SimNet) -> None:
        super().__init__(net)
        self.echo_due: list = []  # (time, byte)

    def _app(self) -> None:
        taken = len(self.shell_in)
        super()._app()
        if len(self.shell_in) > taken:
            self.server.input_written(len(self.shell_in) - taken, self.now)
            self.echo_due += [(self.now + 0.01, bytes([b])) for b in self.shell_in[taken:]]
        due = [data for t, data in self.echo_due if t <= self.now]
        self.echo_due = [(t, data) for t, data in self.echo_due if t > self.now]
        if due:
            self.server.pty_output(b"".join(due), self.now)


def test_echo_acks_arrive_after_the_output_holding_the_echo():
    sim = EchoShell(SimNet(31, delay=0.05))
    acks = []
    for key in b"hello":
        sim.client.send_input(bytes([key]))
        sent = sim.client.input_offset
        sim.run_until(lambda sent=sent: ms.EchoAcked(sent) in sim.client_events,
                      limit=sim.now + 2)
        ack = [e for e in sim.client_events if isinstance(e, ms.EchoAcked)][-1]
        acks.append(ack.input_offset)
        # the echo was in the output reported before the ack
        assert bytes(sim.screen).endswith(b"hello"[:sent])
    assert acks == [1, 2, 3, 4, 5]


def test_an_echo_ack_waits_for_the_echo_timeout_and_for_its_output():
    sim = EchoShell(SimNet(32, delay=0.05))
    sim.client.send_input(b"x")
    sim.run_until(lambda: sim.shell_in == b"x", limit=1)
    written = sim.now
    sim.run_until(lambda: ms.EchoAcked(1) in sim.client_events, limit=2)
    assert sim.now >= written + ms.ECHO_ACK_SECS + 0.05
    # an ack whose output has not arrived is held back (records overtake terminal bytes)
    client = ms.ClientSession(make_keys(), 0.0, SERVER_ADDR, SESSION_ID, SECRET, (24, 80))
    client._on_record(ms.RECORD_ECHO_ACK, ms.ECHO_ACK_BODY.pack(7, 3), 0.0)
    assert client.next_event() is None


class TtyShell(CoreSim):
    """A CoreSim whose PTY has the termios ``tty`` (polled as mps does: when asked)."""

    def __init__(self, net: SimNet, tty: ms.TtyMode) -> None:
        super().__init__(net)
        self.tty, self.polls = tty, 0
        self.server.tty_mode(tty, 0.0)

    def _app(self) -> None:
        taken = len(self.shell_in)
        super()._app()
        self.server.input_written(len(self.shell_in) - taken, self.now)
        if self.server.tty_poll_due(self.now):
            self.polls += 1
            self.server.tty_mode(self.tty, self.now)


def test_tty_mode_is_sent_when_it_changes_and_polled_only_while_input_is_recent():
    cooked, hidden = ms.TtyMode(True, True, 0x7F), ms.TtyMode(True, False, 0x7F)
    sim = TtyShell(SimNet(33, delay=0.02), cooked)
    sim.run_for(10)
    assert sim.polls == 0  # no input: no polling
    sim.client.send_input(b"sudo\r")
    sim.run_until(lambda: sim.shell_in, limit=sim.now + 1)
    sim.run_for(0.5)
    sim.tty = hidden  # sudo asks for the password
    sim.run_for(0.5)
    changes = [e.mode for e in sim.client_events if isinstance(e, ms.TtyModeChanged)]
    assert changes == [cooked, hidden]
    polls = sim.polls
    assert 5 <= polls <= 12
    sim.run_for(ms.TTY_POLL_WINDOW_SECS + 5)
    assert sim.polls <= polls + ms.TTY_POLL_WINDOW_SECS / ms.TTY_POLL_SECS + 1  # then stops
    polls = sim.polls
    sim.run_for(5)
    assert sim.polls == polls
    # a prompt printed long after the last key (sudo after a slow command) is looked at,
    # and a flood of output costs at most one poll per TTY_POLL_SECS
    sim.tty = cooked
    for _ in range(50):
        sim.server.pty_output(b"x" * 100, sim.now)
        sim.run_for(0.01)
    assert [e.mode for e in sim.client_events if isinstance(e, ms.TtyModeChanged)][-1] == cooked
    assert 3 <= sim.polls - polls <= 0.5 / ms.TTY_POLL_SECS + 1


def test_echo_records_are_bounded_and_malformed_ones_ignored():
    """A hostile server cannot grow the client's pending acks; short bodies are dropped;
    a server whose PTY is not read keeps a bounded list of writes."""
    client = ms.ClientSession(make_keys(), 0.0, SERVER_ADDR, SESSION_ID, SECRET, (24, 80))
    for n in range(1, 10_000):
        client._on_record(ms.RECORD_ECHO_ACK, ms.ECHO_ACK_BODY.pack(n, 10**12 + n), 0.0)
    assert len(client._acks) == ms.MAX_PENDING_ACKS
    client._on_record(ms.RECORD_ECHO_ACK, b"\x00" * 15, 0.0)
    client._on_record(ms.RECORD_TTY_MODE, b"\x01", 0.0)
    assert client.next_event() is None
    server = ms.ServerSession(make_keys(), 0.0)
    for n in range(10_000):
        server.input_written(1, n * 1e-6)
    assert len(server._echo._writes) == ms.MAX_UNACKED_WRITES
    assert server._echo.ack_due(1.0) == 10_000  # the merged writes are acked all the same
