"""The TCP carrier's sans-IO parts on a fake clock (framing, the client's path choice, the
transport's trusted paths and switches), and the replay defence against a real server.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading

import pytest

import moshpit_carrier as mc
from moshpit import MAX_DATAGRAM
from relay import free_port
from server_util import MpsServer
from test_client_session import MP, QUIT, QUIT_STATUS, client_env, mp_args, wait_shell
from test_transport import (CLIENT_ADDR, MB, SERVER_ADDR, Sim, SimNet, finish, make_keys,
                            random_bytes)
from test_transport_paths import moves

from proc_util import PtyProcess, wait_for

TCP = mc.TcpPath("tcp", 1)

# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


def test_frames_survive_any_chunking():
    rng = random.Random(3)
    datagrams = [rng.randbytes(rng.randint(1, MAX_DATAGRAM)) for _ in range(200)]
    stream = b"".join(mc.frame_datagram(d) for d in datagrams)
    decoder, out, pos = mc.FrameDecoder(), [], 0
    while pos < len(stream):
        step = rng.choice((1, 2, 3, 700, 5000))
        out += decoder.feed(stream[pos:pos + step])
        pos += step
    assert out == datagrams


@pytest.mark.parametrize("length", [0, MAX_DATAGRAM + 1, 0xFFFF])
def test_a_bad_length_closes_the_carrier(length):
    decoder = mc.FrameDecoder()
    assert decoder.feed(mc.frame_datagram(b"ok")) == [b"ok"]
    with pytest.raises(mc.CarrierClosed, match="outside"):
        decoder.feed(length.to_bytes(2, "big") + b"x" * 10)


def test_frame_datagram_refuses_what_the_peer_would_refuse():
    for bad in (b"", b"x" * (MAX_DATAGRAM + 1)):
        with pytest.raises(ValueError):
            mc.frame_datagram(bad)


def tcp_pair() -> tuple:
    """(client, server) ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def test_the_carrier_keeps_no_big_queue_and_drops_whole_datagrams_only():
    """A peer that stops reading: beyond what the connection holds in flight (the peer's
    receive window) the kernel keeps at most NOTSENT_LOWAT unsent, this side at most
    MAX_QUEUED, the rest is dropped datagram by datagram (the transport resends); what
    does arrive is every datagram not dropped, whole and in order."""
    client, server = tcp_pair()
    carrier = mc.TcpCarrier(client)
    try:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == \
                mc.TcpCarrier.NOTSENT_LOWAT
        sent = []
        for n in range(20000):  # 24 MB offered to a peer that reads nothing
            datagram = n.to_bytes(4, "big") * (MAX_DATAGRAM // 4)
            if carrier.send(datagram):
                sent.append(datagram)
            carrier.write()
        assert carrier.dropped > 0 and len(carrier._out) <= mc.TcpCarrier.MAX_QUEUED
        server.setblocking(False)
        decoder, got = mc.FrameDecoder(), []
        while len(got) < len(sent):
            carrier.write()
            try:
                data = server.recv(65536)
            except BlockingIOError:
                continue
            got += decoder.feed(data)
        assert got == sent
    finally:
        carrier.close()
        server.close()


def test_a_peer_closing_or_sending_garbage_ends_the_carrier():
    client, server = tcp_pair()
    carrier = mc.TcpCarrier(client, unread=mc.frame_datagram(b"early"))
    try:
        assert carrier.read() == [b"early"]  # bytes the handshake read past its end
        server.sendall(b"\x00\x00")
        with pytest.raises(mc.CarrierClosed, match="outside"):
            wait_for(carrier.read, 5, "the bad frame")
    finally:
        carrier.close()
        server.close()
    client, server = tcp_pair()
    carrier = mc.TcpCarrier(client)
    server.close()
    with pytest.raises(mc.CarrierClosed, match="closed by the peer"):
        wait_for(carrier.read, 5, "the end of the connection")
    carrier.close()


# ---------------------------------------------------------------------------
# PathSelector (the client's choice), fake clock
# ---------------------------------------------------------------------------


def test_auto_falls_back_after_two_rtts_and_a_margin_and_says_so_once():
    paths = mc.PathSelector("auto")
    paths.started(100.0, rtt=0.05, carrier=True)
    assert paths.active == "udp"
    assert paths.next_deadline() == pytest.approx(100.0 + mc.UDP_TRIAL_PROBE_SECS)
    assert paths.probe_due(100.1) and not paths.probe_due(100.2)  # extra UDP pings meanwhile
    paths.tick(100.39)
    assert paths.active == "udp" and paths.take_note() is None
    paths.tick(100.41)
    assert paths.active == "tcp"
    assert paths.take_note() == mc.NOTE_TCP and paths.take_note() is None
    # A resume while on TCP starts a new trial, silently if UDP is still blocked.
    paths.started(200.0, rtt=0.05, carrier=True)
    paths.tick(201.0)
    assert paths.active == "tcp" and paths.take_note() is None


def test_udp_answering_in_time_keeps_udp_and_closes_the_connection_later():
    paths = mc.PathSelector("auto")
    paths.started(0.0, rtt=0.01, carrier=True)
    paths.udp_heard(0.05)
    paths.tick(5.0)
    assert paths.active == "udp" and paths.take_note() is None
    assert not paths.close_carrier_due(0.05 + mc.CARRIER_LINGER_SECS - 0.01)
    assert paths.close_carrier_due(0.05 + mc.CARRIER_LINGER_SECS)
    assert not paths.carrier and paths.next_deadline() is None


def test_on_tcp_udp_is_probed_with_backoff_and_an_answer_moves_back():
    paths = mc.PathSelector("auto")
    paths.started(0.0, rtt=0.0, carrier=True)
    paths.tick(mc.UDP_TRIAL_MARGIN_SECS)
    t0 = mc.UDP_TRIAL_MARGIN_SECS
    probes, now = [], t0
    while now < t0 + 60:
        if paths.probe_due(now):
            probes.append(round(now - t0, 2))
        now += 0.01
    assert probes[:5] == pytest.approx([1.0, 3.0, 7.0, 15.0, 30.0], abs=0.05)
    assert all(b - a <= mc.UDP_PROBE_MAX_SECS + 0.02 for a, b in zip(probes, probes[1:]))
    paths.take_note()
    paths.udp_heard(now)
    assert paths.active == "udp" and paths.take_note() == mc.NOTE_UDP
    assert not paths.probe_due(now + 100)


def test_forced_transports():
    tcp = mc.PathSelector("tcp")
    tcp.started(0.0, rtt=0.01, carrier=True)
    assert tcp.active == "tcp" and tcp.next_deadline() is None
    tcp.udp_heard(1.0)  # never leaves TCP, never probes
    assert tcp.active == "tcp" and not tcp.probe_due(100.0)
    udp = mc.PathSelector("udp")
    assert not udp.keeps_carrier
    udp.started(0.0, rtt=0.01, carrier=False)
    udp.tick(10.0)
    assert udp.active == "udp"
    with pytest.raises(ValueError):
        mc.PathSelector("quic")


def test_a_lost_carrier_leaves_udp_and_no_timers():
    paths = mc.PathSelector("auto")
    paths.started(0.0, rtt=0.01, carrier=True)
    paths.tick(1.0)
    paths.carrier_lost(2.0)
    assert paths.active == "udp" and not paths.carrier and paths.next_deadline() is None


# ---------------------------------------------------------------------------
# The transport over two paths (UDP on a SimNet, TCP lossless and in order)
# ---------------------------------------------------------------------------


class CarrierSim(Sim):
    """A Sim whose peers also share a TCP carrier (TcpPath TCP): lossless, in order."""

    def __init__(self, net: SimNet, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.tcp = SimNet(99, delay=0.03)
        self.follow_udp = False  # the client moves to UDP when a packet comes over it
        self.client.conn.trust_path(SERVER_ADDR)
        for peer in self.peers():
            peer.conn.trust_path(TCP, mc.CARRIER_MIN_RTO_SECS)

    def step(self, until: float = float("inf")) -> None:
        self.steps += 1
        for peer, other in ((self.client, self.server), (self.server, self.client)):
            peer.pump_app()
            for datagram, dst in peer.conn.datagrams_to_send(self.now):
                if dst == TCP:
                    self.tcp.send(self.now, datagram, TCP, other.addr)
                else:
                    self.net.send(self.now, datagram, peer.addr, dst)
            peer.pump_app()
        times = [t for t in (self.client.conn.next_timeout(), self.server.conn.next_timeout(),
                             self.net.next_time(), self.tcp.next_time()) if t is not None]
        self.now = max(self.now, min(min(times), until))
        for net in (self.net, self.tcp):
            for datagram, src, dst in net.pop_due(self.now):
                for peer in self.peers():
                    if peer.addr == dst:
                        peer.conn.receive_datagram(datagram, src, self.now)
                if self.follow_udp and src == SERVER_ADDR:  # as mp's PathSelector does
                    self.client.conn.use_path(SERVER_ADDR, self.now)
        for peer in self.peers():
            peer.pump_app()


def carrier_sim(seed: int, size: int = MB) -> CarrierSim:
    rng = random.Random(seed)
    return CarrierSim(SimNet(seed), up=random_bytes(rng, size // 4),
                      down=random_bytes(rng, size), keys=make_keys(seed))


def test_udp_blocked_from_the_start_the_server_follows_the_client_to_tcp_at_once():
    sim = carrier_sim(1)
    sim.net.loss = 1.0
    sim.run_for(0.3)  # the trial: nothing came back
    assert not sim.client.received
    sim.client.conn.use_path(TCP, sim.now)
    finish(sim, limit=60)
    assert moves(sim.server) == [TCP]  # no challenge needed: the carrier is trusted


def test_switching_to_tcp_mid_transfer_and_back_loses_and_doubles_nothing():
    sim = carrier_sim(2)
    sim.run_until(lambda: len(sim.client.received) > MB // 4, limit=20)
    sim.net.loss = 1.0  # UDP dies with data in flight both ways
    sim.run_for(1.0)
    sim.client.conn.use_path(TCP, sim.now)
    sim.run_until(lambda: len(sim.client.received) > MB // 2, limit=40)
    assert sim.server.conn.peer_addr == TCP
    sim.net.loss = 0.0  # UDP is back: a probe, then the client moves, the server validates
    sim.follow_udp = True
    sim.net.send(sim.now, sim.client.conn.probe_datagram(sim.now), CLIENT_ADDR, SERVER_ADDR)
    finish(sim, limit=80)
    assert moves(sim.server)[-2:] == [TCP, CLIENT_ADDR]


def test_the_client_never_follows_the_server_to_another_path():
    sim = carrier_sim(3, size=200_000)
    sim.client.conn.use_path(TCP, sim.now)
    sim.run_until(lambda: sim.server.conn.peer_addr == TCP, limit=5)
    sim.client.conn.use_path(SERVER_ADDR, sim.now)  # the server still sends on TCP a while
    finish(sim, limit=30)
    assert sim.client.conn.peer_addr == SERVER_ADDR
    assert moves(sim.client) == [TCP, SERVER_ADDR]


# ---------------------------------------------------------------------------
# Replay: the carrier's bytes replayed on a new connection get nothing
# ---------------------------------------------------------------------------


class RecordingProxy:
    """One TCP connection from the client to the server through here; what the client
    sends is recorded (an on-path observer)."""

    def __init__(self, server_port: int) -> None:
        self.port = free_port("127.0.0.1")
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.server_port = server_port
        self.upstream = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.server_port))
        threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()
        self._pump(client, server, self.upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.timeout(90)
def test_replayed_carrier_bytes_attach_nothing(tmp_path):
    """An observer replays everything a client sent on its carrier (handshake and framed
    datagrams, typed commands included) on a new connection: the server answers a new
    handshake with fresh keys, refuses the replayed authentication, and the session gets
    no second carrier and no input."""
    with MpsServer(tmp_path) as server:
        proxy = RecordingProxy(server.port)
        argv = mp_args(server, tmp_path, "--transport", "tcp")
        argv[argv.index("-s") + 1] = str(proxy.port)
        marker = tmp_path / "ran"
        with PtyProcess(argv, env=client_env(tmp_path)) as term:
            wait_shell(term)
            term.send(f"echo x >> {marker}\r")
            wait_for(marker.exists, 20, "the command to run")
            term.drain(quiet=0.5, limit=3)
            recorded = bytes(proxy.upstream)
            assert len(recorded) > 1000
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as replay:
                replay.sendall(recorded)
                answer = bytearray()
                try:
                    while True:
                        data = replay.recv(65536)
                        if not data:
                            break
                        answer += data
                except OSError:
                    pass
            server.wait_log("handshake from", 10)
            term.send("echo $((1+2))00\r")
            term.read_until(b"300", 20)
            term.send(QUIT)
            assert term.wait(20) == QUIT_STATUS
        proxy.close()
        log = server.log()
        assert log.count("TCP carrier attached") == 1
        assert log.count("accepted ") == 1
        assert marker.read_text() == "x\n"  # the replayed keystrokes ran nothing again
        # The answer is a ServerHello and ServerAuth for a new key exchange, nothing more
        # (a session grant would need the replayed ClientAuth to sign the new transcript).
        assert len(answer) < 2000


def test_the_transport_setting_from_flag_environment_and_file(tmp_path):
    """--transport, MOSHPIT_TRANSPORT and `transport` in the config file, each checked."""
    env = client_env(tmp_path)
    config = tmp_path / "moshpit.toml"
    config.write_text('transport = "udp"\n')

    def effective(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, MP, "-c", str(config), *args, "--print-config",
                               "host"], env={**env, **extra}, capture_output=True, text=True,
                              timeout=30)

    assert 'transport = "udp"  (file ' in effective().stdout
    assert 'transport = "tcp"  (command line)' in effective("--transport", "tcp").stdout
    assert 'transport = "auto"  (environment MOSHPIT_TRANSPORT)' in effective(
        "--transport", "tcp", MOSHPIT_TRANSPORT="auto").stdout
    bad = effective(MOSHPIT_TRANSPORT="quic")
    assert bad.returncode == 255
    assert bad.stderr.strip() == ("mp: environment MOSHPIT_TRANSPORT: transport must be one of"
                                  " auto, udp, tcp, got 'quic'")
