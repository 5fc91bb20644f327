"""Benchmark scenarios: what is measured, identically for every tool.

Every measurement types into a real PTY and times what comes back on it, using markers the
shell computes (``echo R:$((41+1)):Z`` prints ``R:42:Z``: the typed text never contains the
expected output, so a terminal's local echo cannot fake it, and the colons keep base64 bulk
output from ever matching it).  Times are monotonic clock readings taken when the output
chunk that completed the match was read (see display.py for clients that redraw a screen).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import pwd
import random
import re
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from acceptance_util import BANNER_RE
from attack_util import ATTACK_SOURCES, IdleConnectionAttack, legitimate_logins
from crowd import run_crowd
from display import Display
from proc_util import ManagedProcess, PtyProcess, PtyTimeout, pids_with_cmdline, wait_for
from relay import ETHERNET_MTU, free_port
from server_util import TestClient
from tools import (BACK, CLIENT_ENV, Client, Network, Tool, client_usage, pss_total,
                   server_pss, server_usage, server_wakeups, tcp_listening, wakeups)

HERE = os.path.dirname(os.path.abspath(__file__))
ATTACK_UTIL = os.path.join(os.path.dirname(HERE), "tests", "attack_util.py")
TCP_SOURCE = os.path.join(HERE, "tcp_source.py")
BASE64_LINE = re.compile(rb"[A-Za-z0-9+/=]+")
CSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")  # e.g. bash's bracketed-paste switch
BASE64_WIDTH = 100  # base64 -w 100: a line is 75 input bytes and 101 output bytes
ECHO_CHARS = b"zxwvjk"  # letters no terminal escape sequence or status banner here uses
READY_TIMEOUT = 30.0
TCP_MODEL_CAVEAT = ("the relay cannot drop TCP: it sends TCP on as a modelled Reno sender "
                    "(relay.TcpWindow; a lost segment arrives a round trip late)")


class ScenarioError(RuntimeError):
    """A measurement could not be completed (the message says which step failed)."""


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: small samples stay honest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Metric:
    """One table row: ``key`` in the JSON, ``label`` in the table, how to summarize the
    samples (``median``/``p95``/``value``), the display scale/unit, and which way is better."""

    key: str
    label: str
    unit: str
    scale: float = 1000.0
    summary: str = "median"
    better: str = "lower"

    def summarize(self, samples: list[float]) -> float:
        if self.summary == "p95":
            return percentile(samples, 95) * self.scale
        if self.summary == "value":
            return samples[0] * self.scale
        return statistics.median(samples) * self.scale


class Session:
    """A connected client, with the typing and timing primitives scenarios are made of."""

    def __init__(self, client: Client, redraws_screen: bool = False) -> None:
        self.client = client
        self.display = Display(client.term, emulate=redraws_screen)
        self._rng = random.Random()

    def marker(self, tag: str) -> tuple[bytes, bytes]:
        """(command to type, output it prints) for a fresh, unique marker."""
        n = self._rng.randrange(10000, 99999)
        return f"echo {tag}:$(({n}+1)):Z".encode(), f"{tag}:{n + 1}:Z".encode()

    def wait_ready(self, started: float) -> float:
        """Wait until the remote shell runs a command; return seconds since ``started``.

        Typed ahead at once (every client keeps typed-ahead input); typed again every few
        seconds in case a client discarded it while setting up its terminal.
        """
        deadline = started + READY_TIMEOUT
        while True:
            command, expect = self.marker("R")
            self.display.send(b"unset HISTFILE; " + command + b"\r")
            try:
                seen = self.display.wait(expect, min(4.0, max(0.1, deadline - time.monotonic())))
                return seen - started
            except PtyTimeout:
                if time.monotonic() >= deadline:
                    raise ScenarioError("the session never became ready") from None

    def settle(self) -> None:
        """Consume pending output so the next measurement starts from a quiet terminal."""
        self.display.drain(quiet=0.3, limit=5.0)

    def captured_command(self, tag: str, timeout: float, prefix: bytes) -> tuple[float, bytes]:
        """Like ``timed_command``, and also everything the terminal received until the
        marker, raw (for clients that pass the byte stream through)."""
        command, expect = self.marker(tag)
        term, chunks, tail = self.client.term, [], b""
        typed = time.monotonic()
        deadline = typed + timeout
        self.display.send(prefix + command + b"\r")
        while True:
            chunk = term.read_chunk(min(1.0, max(0.0, deadline - time.monotonic())))
            if chunk:
                seen = time.monotonic()
                chunks.append(chunk)
                if expect in tail + chunk:
                    return seen - typed, b"".join(chunks)
                tail = (tail + chunk)[-len(expect):]
            elif time.monotonic() >= deadline:
                raise ScenarioError(f"no {expect.decode()} within {timeout:.0f}s")

    def timed_command(self, tag: str, timeout: float, since: float | None = None,
                      prefix: bytes = b"") -> float:
        """Type ``prefix`` + a marker command; seconds from ``since`` (default: the moment
        it was typed) until its output appears."""
        command, expect = self.marker(tag)
        typed = time.monotonic()
        self.display.send(prefix + command + b"\r")
        try:
            seen = self.display.wait(expect, timeout)
        except PtyTimeout as err:
            raise ScenarioError(f"no {expect.decode()} within {timeout:.0f}s ({err})") from None
        return seen - (typed if since is None else since)

    def echo_latencies(self, count: int, timeout: float) -> list[float]:
        """Type ``count`` single letters at a typist's pace; seconds until each is echoed."""
        self.settle()
        latencies = []
        for i in range(count):
            char = ECHO_CHARS[i % len(ECHO_CHARS):][:1]
            typed = time.monotonic()
            self.display.send(char)
            try:
                seen = self.display.wait(char, timeout, screen=False)
            except PtyTimeout:
                raise ScenarioError(f"keystroke {i} not echoed within {timeout:.0f}s") from None
            latencies.append(seen - typed)
            if i % 25 == 24:
                self.display.send(b"\x15")  # Ctrl-U: keep the line short
                self.settle()
            time.sleep(self._rng.uniform(0.02, 0.06))
        self.display.send(b"\x15")
        self.settle()
        return latencies


class Context:
    """What a scenario gets: the tool, its network, the open session and the sample size."""

    def __init__(self, tool: Tool, net: Network, quick: bool) -> None:
        self.tool = tool
        self.net = net
        self.relay = net.relay
        self.quick = quick
        self.session: Session | None = None
        self.connect_time = 0.0
        self._clients: list[Client] = []

    def open_session(self, extra: tuple = ()) -> Session:
        """Connect a client (with ``extra`` flags) and wait for its shell; remembers the
        connect time."""
        started = time.monotonic()
        client = self.tool.connect(self.net, extra)
        self._clients.append(client)
        session = Session(client, self.tool.redraws_screen)
        self.connect_time = session.wait_ready(started)
        session.settle()
        return session

    def close_session(self, session: Session) -> None:
        session.client.close()
        self._clients.remove(session.client)

    def close(self) -> None:
        for client in list(self._clients):
            client.close()
        self._clients.clear()


class Scenario:
    """Base: ``name`` (for --only), ``title``, the capability it ``needs`` (tools that lack
    it are reported n/a), relay conditions, sample counts, a time budget and the metrics."""

    name = ""
    title = ""
    needs = ""
    rtt = 0.0
    loss = 0.0
    rate_bps: float | None = None  # a bottleneck each way (relay.Bottleneck), or none
    queue_bytes = 0  # its drop-tail queue
    udp_ports = 1  # session UDP ports the server gets (several sessions at once)
    server_config: dict = {}  # more [mps] keys for moshpit's server (TOML values)
    extra_tcp_ports = 0  # more relayed TCP ports, for other traffic across the same relay
    caveats: dict = {}  # tool name -> how the path differs for it (printed with the table)
    predict = "never"  # local echo prediction of the clients that have it (mosh's modes)
    samples_full = 1
    samples_quick = 1
    in_quick = True
    budget = 120.0
    metrics: tuple = ()

    def samples(self, quick: bool) -> int:
        return self.samples_quick if quick else self.samples_full

    @property
    def path_mtu(self) -> int | None:
        """The relay's MTU: an impaired path (delay, loss, a bottleneck) stands for a real
        network, so it carries 1500-byte packets as Ethernet does; the unimpaired one is
        loopback, with loopback's (64 KiB)."""
        return ETHERNET_MTU if (self.rtt or self.loss or self.rate_bps) else None

    def condition(self, net: Network) -> None:
        """Impair the relay for the measurement (after the session is up)."""
        net.relay.set(delay=self.rtt / 2.0, loss=self.loss)
        if self.rate_bps:
            net.relay.set_bottleneck(self.rate_bps, self.queue_bytes)

    def measure(self, ctx: Context) -> dict:
        """Return {metric key: [samples]} (seconds, or the metric's own unit)."""
        raise NotImplementedError

    def run(self, ctx: Context) -> dict:
        """Open a session, apply the condition, measure."""
        ctx.session = ctx.open_session()
        self.condition(ctx.net)
        return self.measure(ctx)


class Connect(Scenario):
    """Time from launching the client to the first command run by the remote shell
    (mosh: including `mosh-server new`, which its ssh bootstrap would run)."""

    name = "connect"
    title = "connect"
    samples_full, samples_quick = 5, 2
    metrics = (Metric("connect", "connect", "ms"),)

    def run(self, ctx: Context) -> dict:
        times = []
        for _ in range(self.samples(ctx.quick)):
            session = ctx.open_session()
            times.append(ctx.connect_time)
            ctx.close_session(session)
        return {"connect": times}


class Echo(Scenario):
    """Keystroke echo latency through the relay at a given RTT (and loss)."""

    samples_full, samples_quick = 60, 20

    def __init__(self, name: str, title: str, rtt: float, loss: float = 0.0,
                 needs: str = "") -> None:
        self.name, self.title, self.rtt, self.loss, self.needs = name, title, rtt, loss, needs
        self.metrics = (Metric("median", f"{title} median", "ms"),
                        Metric("p95", f"{title} p95", "ms", summary="p95"))
        self.budget = 60.0 + self.samples_full * (1.0 + 20 * rtt)

    def measure(self, ctx: Context) -> dict:
        lat = ctx.session.echo_latencies(self.samples(ctx.quick), timeout=20.0)
        return {"median": lat, "p95": lat}


class Predict(Echo):
    """Keystrokes as typed into a shell command (25 letters, then Ctrl-U: a new line, whose
    first key no predictor may show before its echo), with local echo prediction set to
    ``predict`` for the clients that have it: median time until a key is displayed, and
    the share displayed before one round trip."""

    def __init__(self, name: str, title: str, rtt: float, loss: float = 0.0,
                 predict: str = "adaptive") -> None:
        super().__init__(name, title, rtt, loss, needs="loss" if loss else "")
        self.predict = predict
        self.metrics = (Metric("median", f"{title} median", "ms"),
                        Metric("before_rtt", f"{title} shown before the RTT", "%",
                               scale=100.0, summary="value", better="higher"))

    def measure(self, ctx: Context) -> dict:
        lat = ctx.session.echo_latencies(self.samples(ctx.quick), timeout=20.0)
        return {"median": lat, "before_rtt": [sum(t < self.rtt for t in lat) / len(lat)]}


class CtrlC(Scenario):
    """`yes` floods the terminal; time from Ctrl-C to the next command's output.  Across a
    slow link (``rate_bps`` behind ``queue_bytes``) this is mostly the queue the flood
    built, which the prompt waits behind."""

    samples_full, samples_quick = 3, 1

    def __init__(self, name: str = "ctrl_c", label: str = "Ctrl-C during yes flood",
                 rtt: float = 0.0, rate_bps: float | None = None, queue_bytes: int = 0,
                 flood_seconds: float = 1.5, caveats: dict | None = None) -> None:
        self.name, self.title, self.rtt = name, label, rtt
        self.rate_bps, self.queue_bytes, self.flood_seconds = rate_bps, queue_bytes, flood_seconds
        self.caveats = caveats or {}
        self.metrics = (Metric("ctrl_c", label, "ms"),)

    def measure(self, ctx: Context) -> dict:
        session, times = ctx.session, []
        for _ in range(self.samples(ctx.quick)):
            # mosh sends only screen changes (a repeated flood may show as a few digits),
            # so check that this flood's `yes` runs rather than counting output.
            word = f"F{random.randrange(10000, 99999)}".encode()
            session.display.send(b"yes " + word + b"\r")
            session.display.drain(quiet=2.0, limit=self.flood_seconds)
            if not pids_with_cmdline(b"yes\0" + word):
                raise ScenarioError("the yes flood did not start")
            pressed = time.monotonic()
            session.display.send(b"\x03")
            try:
                times.append(session.timed_command("C", 60.0, since=pressed))
            except ScenarioError as err:  # say which half failed: the Ctrl-C or the marker
                flood = ("still runs: the Ctrl-C did not stop it"
                         if pids_with_cmdline(b"yes\0" + word) else "ended")
                raise ScenarioError(f"{err}; the yes flood {flood}") from None
            session.settle()
        return {"ctrl_c": times}


class Bulk(Scenario):
    """Output throughput: base64 of random bytes until a marker after it appears."""

    name = "bulk"
    title = "bulk output"
    samples_full, samples_quick = 3, 1
    metrics = (Metric("throughput", "bulk output", "MB/s", scale=1.0, better="higher"),)

    def measure(self, ctx: Context) -> dict:
        raw = (32 if not ctx.quick else 8) * 1000 * 1000
        produced = raw * 4 / 3 * (1 + 1 / 100)  # base64 -w 100 output, newlines included
        rates = []
        for _ in range(self.samples(ctx.quick)):
            elapsed = ctx.session.timed_command(
                "B", 120.0, prefix=f"head -c {raw} /dev/urandom | base64 -w 100; ".encode())
            rates.append(produced / elapsed / 1e6)
            ctx.session.settle()
        return {"throughput": rates}


def received_bytes(output: bytes) -> bytes:
    """The bytes a terminal showed as ``base64 -w 100`` output, decoded: its lines that are
    pure base64 (not the typed command, the prompt or the marker), with moshpit's status
    banner (drawn and erased between ESC 7 and ESC 8), control sequences and the PTY's
    carriage returns removed."""
    text = CSI.sub(b"", BANNER_RE.sub(b"", output)).replace(b"\r", b"")
    payload = b"".join(line for line in text.split(b"\n") if BASE64_LINE.fullmatch(line))
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ScenarioError(f"the terminal's base64 does not decode ({err})") from None


class BulkTransfer(Scenario):
    """``base64 -w 100`` of a random file (``megabytes`` MB of text, newlines included) to
    the terminal, then a marker: wall time from typing the command to the marker, MB/s,
    and CPU seconds per MB of the client and of the server side (utime+stime from /proc:
    moshpit's server process, ssh's client and sshd's session processes, mosh-client and
    mosh-server).  Where the client passes the stream through, the base64 the terminal
    got is decoded and its sha256 compared with the file's: a difference is an error."""

    samples_full, samples_quick = 3, 1

    def __init__(self, name: str, title: str, megabytes: float, rtt: float = 0.0,
                 loss: float = 0.0, needs: str = "", in_quick: bool = True,
                 samples: int = 3, caveats: dict | None = None) -> None:
        self.name, self.title, self.rtt, self.loss, self.needs = name, title, rtt, loss, needs
        self.in_quick, self.samples_full = in_quick, samples
        self.caveats = caveats or {}
        self.lines = round(megabytes * 1e6 / (BASE64_WIDTH + 1))
        self.megabytes = self.lines * (BASE64_WIDTH + 1) / 1e6
        self.timeout = 30.0 + 10.0 * self.megabytes  # slower than 0.1 MB/s: give up
        self.budget = 60.0 + samples * self.timeout
        self.metrics = (Metric("seconds", title, "s", scale=1.0),
                        Metric("rate", "  throughput", "MB/s", scale=1.0, better="higher"),
                        Metric("client_cpu", "  client CPU per MB", "ms/MB"),
                        Metric("server_cpu", "  server CPU per MB", "ms/MB"))

    def measure(self, ctx: Context) -> dict:
        source = os.path.join(ctx.tool.workdir, "bulk.bin")
        data = os.urandom(self.lines * BASE64_WIDTH * 3 // 4)
        with open(source, "wb") as f:
            f.write(data)
        digest = hashlib.sha256(data).hexdigest()
        session, client = ctx.session, ctx.session.client
        prefix = f"base64 -w {BASE64_WIDTH} {source}; ".encode()
        samples: dict = {m.key: [] for m in self.metrics}
        for _ in range(self.samples(ctx.quick)):
            session.settle()
            client0, server0 = client_usage(client)[0], server_usage(ctx.tool, client)[0]
            if ctx.tool.redraws_screen:  # mosh skips output: time it, nothing to check
                seconds = session.timed_command("B", self.timeout, prefix=prefix)
            else:
                seconds, output = session.captured_command("B", self.timeout, prefix)
                got = received_bytes(output)
                if hashlib.sha256(got).hexdigest() != digest:
                    raise ScenarioError(f"the terminal did not show every byte: {len(got)} "
                                        f"of {len(data)} decoded, sha256 differs")
            client1, server1 = client_usage(client)[0], server_usage(ctx.tool, client)[0]
            samples["seconds"].append(seconds)
            samples["rate"].append(self.megabytes / seconds)
            samples["client_cpu"].append((client1 - client0) / self.megabytes)
            samples["server_cpu"].append((server1 - server0) / self.megabytes)
        return samples


class _UdpBlocked:
    """Mixin: the relay drops every UDP datagram from before the client connects, so
    moshpit runs over its TCP carrier (ssh is TCP anyway; mosh has no TCP mode)."""

    needs = "tcp_fallback"

    def run(self, ctx: Context) -> dict:
        ctx.relay.tcp_loss = False  # the loss setting drops UDP only: TCP passes untouched
        ctx.relay.set(loss=1.0)
        ctx.session = ctx.open_session()
        return self.measure(ctx)


class CtrlCUdpBlocked(_UdpBlocked, CtrlC):
    """CtrlC with UDP blocked: the carrier must not queue a flood in front of the prompt."""


class BulkUdpBlocked(_UdpBlocked, BulkTransfer):
    """BulkTransfer with UDP blocked: every byte, checked, over the TCP carrier."""


def jain_index(rates: list[float]) -> float:
    """Jain's fairness index: 1 when every flow gets the same, 1/n when one gets all."""
    squares = sum(r * r for r in rates)
    return sum(rates) ** 2 / (len(rates) * squares) if squares else 0.0


class Fairness(Scenario):
    """Two moshpit sessions flood output (base64 of /dev/urandom) while a bulk TCP transfer
    (bench/tcp_source.py sending zeros behind the relay, ``cat`` reading them from
    /dev/tcp in front: a ``dd | nc``) crosses the same bottleneck in the same direction.
    After a warm-up: each flow's throughput at the bottleneck (bytes that left its queue,
    headers included), Jain's index over the three, and the sessions' goodput (what their
    terminals showed)."""

    name = "fairness"
    title = "fairness"
    needs = "fairness"
    rtt, rate_bps, queue_bytes = 0.1, 10e6, 1_000_000
    udp_ports, extra_tcp_ports = 2, 1
    warmup_seconds = 3.0
    seconds_full, seconds_quick = 10.0, 5.0
    caveats = {"moshpit": TCP_MODEL_CAVEAT}
    metrics = (Metric("jain", "fairness: Jain's index, 2 sessions + TCP", "", scale=1.0,
                      better="higher"),
               Metric("session_a", "  moshpit session A", "Mbit/s", scale=1.0, better="higher"),
               Metric("session_b", "  moshpit session B", "Mbit/s", scale=1.0, better="higher"),
               Metric("tcp", "  TCP transfer", "Mbit/s", scale=1.0, better="higher"),
               Metric("goodput", "  moshpit goodput, both sessions", "Mbit/s", scale=1.0,
                      better="higher"))

    def run(self, ctx: Context) -> dict:
        sessions = [ctx.open_session(), ctx.open_session()]
        ctx.session = sessions[0]
        self.condition(ctx.net)
        port = ctx.net.extra_tcp_ports[0]
        seconds = self.seconds_quick if ctx.quick else self.seconds_full
        log = os.path.join(ctx.tool.workdir, "tcp-source.log")
        with ManagedProcess([sys.executable, TCP_SOURCE, BACK, str(port)], log=log) as source:
            wait_for(lambda: tcp_listening(BACK, port) or source.poll() is not None, 15,
                     "the TCP source to listen")
            with ManagedProcess(["bash", "-c", f"exec cat < /dev/tcp/{ctx.net.front}/{port} "
                                               "> /dev/null"]) as sink:
                for session in sessions:
                    session.display.send(b"base64 /dev/urandom\r")
                self._read(sessions, self.warmup_seconds)
                flows0, shown0 = self._snapshot(ctx, sessions)
                started = time.monotonic()
                self._read(sessions, seconds)
                elapsed = time.monotonic() - started
                flows1, shown1 = self._snapshot(ctx, sessions)
                if sink.poll() is not None or source.poll() is not None:
                    raise ScenarioError(f"the TCP transfer ended early: {source.read_log(300)}")
        mbits = {flow: (flows1[flow] - flows0.get(flow, 0)) * 8 / elapsed / 1e6
                 for flow in flows1}
        udp = sorted(flow for flow in mbits if flow.startswith("udp:"))
        if len(udp) != 2:
            raise ScenarioError(f"expected two session flows at the bottleneck, saw {udp}")
        shares = [mbits[udp[0]], mbits[udp[1]], mbits.get(f"tcp:{port}", 0.0)]
        return {"jain": [jain_index(shares)], "session_a": [shares[0]],
                "session_b": [shares[1]], "tcp": [shares[2]],
                "goodput": [(sum(shown1) - sum(shown0)) * 8 / elapsed / 1e6]}

    @staticmethod
    def _read(sessions: list[Session], seconds: float) -> None:
        """Keep reading every session's terminal (a client blocked on its terminal would
        stop taking data) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for session in sessions:
                session.client.term.read_chunk(0.005)

    @staticmethod
    def _snapshot(ctx: Context, sessions: list[Session]) -> tuple[dict, list[int]]:
        """(bytes that left the down bottleneck per flow, bytes each terminal showed)."""
        flows = ctx.relay.stats["down"]["bottleneck"]["flows"]
        return flows, [session.client.term.bytes_read for session in sessions]


class DataSource:
    """A TCP server on 127.0.0.1 (the server's side) sending ``data`` to every connection,
    then closing: the far end of a forwarded download."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sock = socket.create_server((BACK, 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.data)
            except OSError:
                pass  # the reader gave up: the measurement says so

    def close(self) -> None:
        self.sock.close()


def download(port: int, timeout: float) -> tuple[bytes, float]:
    """(sha256 of everything read from 127.0.0.1:``port`` until EOF, seconds it took)."""
    digest = hashlib.sha256()
    started = time.monotonic()
    with socket.create_connection((BACK, port), timeout=timeout) as sock:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
    return digest.digest(), time.monotonic() - started


def forwarded_download(ctx: Context, scenario: Scenario, megabytes: float, timeout: float,
                       before: Callable[[], object] = lambda: None,
                       during: Callable[[threading.Thread], object] = lambda t: None) -> dict:
    """The forwarding scenarios' download: open a session forwarding a local port (-L) to a
    source of ``megabytes`` random bytes on the server's side, set the network up as
    ``scenario`` says, call ``before()``, download in a thread while ``during(thread)``
    runs, and check the sha256 (a difference is an error). Returns the byte count, the
    download's start (monotonic) and seconds, and what ``before`` and ``during`` returned."""
    data = os.urandom(int(megabytes * 1e6))
    source = DataSource(data)
    try:
        local = free_port(BACK, "tcp")
        ctx.session = ctx.open_session(("-L", f"{local}:{BACK}:{source.port}"))
        scenario.condition(ctx.net)
        result: dict = {"bytes": len(data), "before": before()}

        def fetch() -> None:
            try:
                result["digest"], result["seconds"] = download(local, timeout)
            except OSError as err:
                result["error"] = err
        transfer = threading.Thread(target=fetch, daemon=True)
        result["started"] = time.monotonic()
        transfer.start()
        time.sleep(1.0)  # the transfer under way before anything else happens
        result["during"] = during(transfer)
        transfer.join(timeout)
        if "error" in result or transfer.is_alive():
            raise ScenarioError(f"the download failed: {result.get('error', 'timed out')}")
        if result.pop("digest") != hashlib.sha256(data).digest():
            raise ScenarioError("the forwarded bytes differ from the source (sha256)")
    finally:
        source.close()
    return result


class Forwarded(Scenario):
    """A download through ``-L`` (the tool's port forwarding: mp -L, ssh -L) from a server
    on the server's side, at a given RTT and loss: wall time, MB/s, the sha256 compared
    with what was sent (a difference is an error), and keystroke echo while the transfer
    runs against echo on the idle link just before (the ratio: forwarded bulk must not
    delay keystrokes)."""

    needs = "forward"
    samples_full = samples_quick = 1
    caveats = {"ssh": TCP_MODEL_CAVEAT}

    def __init__(self, name: str, title: str, megabytes: float, rtt: float, loss: float,
                 in_quick: bool = True) -> None:
        self.name, self.title, self.rtt, self.loss = name, title, rtt, loss
        self.megabytes, self.in_quick = megabytes, in_quick
        self.timeout = 60.0 + 5.0 * megabytes  # slower than 0.2 MB/s: give up
        self.budget = 120.0 + self.timeout
        self.metrics = (Metric("seconds", title, "s", scale=1.0),
                        Metric("rate", "  throughput", "MB/s", scale=1.0, better="higher"),
                        Metric("echo_idle", "  echo before, idle (median)", "ms"),
                        Metric("echo_busy", "  echo during the transfer (median)", "ms"),
                        Metric("echo_busy_p95", "  echo during the transfer (p95)", "ms",
                               summary="p95"),
                        Metric("echo_ratio", "  echo during / idle (medians)", "x",
                               scale=1.0))

    def run(self, ctx: Context) -> dict:
        def echo_while(transfer: threading.Thread) -> list:
            busy = []
            while transfer.is_alive() and len(busy) < 200:
                busy += ctx.session.echo_latencies(5, timeout=30.0)
            if len(busy) < 5:
                raise ScenarioError("the transfer ended before echo could be measured")
            return busy

        result = forwarded_download(
            ctx, self, self.megabytes, self.timeout,
            before=lambda: ctx.session.echo_latencies(20, timeout=20.0), during=echo_while)
        idle, busy = result["before"], result["during"]
        return {"seconds": [result["seconds"]],
                "rate": [result["bytes"] / 1e6 / result["seconds"]],
                "echo_idle": idle, "echo_busy": busy, "echo_busy_p95": busy,
                "echo_ratio": [statistics.median(busy) / statistics.median(idle)]}


class ForwardedOutage(Scenario):
    """A download through ``-L`` with a blackout of ``seconds`` both ways in the middle of
    it: the transfer must complete with the sha256 of what was sent; wall time, and how
    long after the network came back the last byte arrived."""

    needs = "forward_outage"
    samples_full = samples_quick = 1

    def __init__(self, seconds: float, megabytes: float, in_quick: bool = False) -> None:
        self.seconds, self.megabytes, self.in_quick = seconds, megabytes, in_quick
        self.name = f"forward_outage_{seconds:g}s"
        self.title = f"{megabytes:g} MB through -L across a {seconds:g} s outage"
        self.rate_bps, self.queue_bytes = 8e6, 100_000  # so the transfer takes a while
        self.timeout = 120.0 + seconds
        self.budget = 120.0 + self.timeout
        self.metrics = (Metric("seconds", self.title, "s", scale=1.0),
                        Metric("after", "  last byte after the network returned", "s",
                               scale=1.0))

    def run(self, ctx: Context) -> dict:
        def outage(transfer: threading.Thread) -> float:
            if not transfer.is_alive():
                raise ScenarioError("the transfer ended before the outage")
            ctx.relay.blackout(self.seconds)
            return time.monotonic() + self.seconds  # when the network is back

        result = forwarded_download(ctx, self, self.megabytes, self.timeout, during=outage)
        return {"seconds": [result["seconds"]],
                "after": [result["started"] + result["seconds"] - result["during"]]}


class Outage(Scenario):
    """Blackout both ways; a command typed during it; time from the network's return
    until the command's output shows."""

    needs = "outage"
    samples_quick = 1

    def __init__(self, seconds: float, samples: int, in_quick: bool) -> None:
        self.seconds = seconds
        self.samples_full = samples
        self.in_quick = in_quick
        self.name = f"outage_{int(seconds)}s"
        self.title = f"recovery after {int(seconds)} s outage"
        self.metrics = (Metric("recovery", self.title, "s", scale=1.0),)
        self.budget = 60.0 + samples * (60.0 + seconds)

    def measure(self, ctx: Context) -> dict:
        times = []
        for _ in range(self.samples(ctx.quick)):
            ctx.relay.blackout(self.seconds)
            restored = time.monotonic() + self.seconds
            time.sleep(min(1.0, self.seconds / 2))
            times.append(ctx.session.timed_command("O", 45.0 + self.seconds, since=restored))
            ctx.session.settle()
        return {"recovery": times}


class Roam(Scenario):
    """The relay rebinds (the client's address as the server sees it changes); time from
    the rebind until a command typed right after it has run."""

    name = "roam"
    title = "roaming recovery"
    needs = "roam"
    samples_full, samples_quick = 3, 1
    metrics = (Metric("roam", "roaming recovery", "ms"),)

    def measure(self, ctx: Context) -> dict:
        times = []
        for _ in range(self.samples(ctx.quick)):
            moved = time.monotonic()
            ctx.relay.rebind()
            times.append(ctx.session.timed_command("M", 60.0, since=moved))
            ctx.session.settle()
        return {"roam": times}


IDLE_AFTER_INPUT_SECS = 4.0


class Idle(Scenario):
    """Server CPU, wake-ups and memory of one idle session (and the client's CPU).  Memory
    per session is the server side's RSS (and PSS: shared pages divided among the processes
    sharing them) with the session minus before it, so a shared listener (sshd's, moshpit's)
    is not counted against the session; a second session's figures show what each more
    session costs.  Wake-ups are the server threads' context switches while idle (the
    client's keepalives included, which wake every tool's server), and the client's.  Idle
    starts IDLE_AFTER_INPUT_SECS after the last key typed (the shell's readiness check):
    moshpit's server polls the PTY's mode (echo off for a password?) for 3 s after input."""

    name = "idle"
    title = "idle session"
    udp_ports = 2  # the second session, for what one more costs
    metrics = (Metric("server_cpu", "server idle CPU", "%", scale=1.0),
               Metric("server_wakeups", "server wake-ups idle", "/s", scale=1.0),
               Metric("server_rss", "server RSS per session", "MB", scale=1.0),
               Metric("server_pss", "server PSS first session", "MB", scale=1.0),
               Metric("server_pss_next", "server PSS next session", "MB", scale=1.0),
               Metric("server_rss_total", "server RSS total", "MB", scale=1.0),
               Metric("client_cpu", "client idle CPU", "%", scale=1.0),
               Metric("client_wakeups", "client wake-ups idle", "/s", scale=1.0))

    def run(self, ctx: Context) -> dict:
        time.sleep(1.0)  # the server's processes are done starting (moshpit's spawner)
        _, rss_before = server_usage(ctx.tool, None)
        pss_before = server_pss(ctx.tool, None)
        ctx.session = ctx.open_session()
        seconds = 4.0 if ctx.quick else 10.0
        client = ctx.session.client
        time.sleep(IDLE_AFTER_INPUT_SECS)
        server0, _ = server_usage(ctx.tool, client)
        wakeups0 = server_wakeups(ctx.tool, client)
        client0, _ = client_usage(client)
        client_wakeups0 = wakeups([client.term.pid])
        time.sleep(seconds)
        server1, rss = server_usage(ctx.tool, client)
        wakeups1 = server_wakeups(ctx.tool, client)
        client1, _ = client_usage(client)
        client_wakeups1 = wakeups([client.term.pid])
        if rss == 0:
            raise ScenarioError("no server process found for the session")
        pss_one = server_pss(ctx.tool, client)
        second = ctx.open_session()
        time.sleep(1.0)
        pss_two = pss_total(set(ctx.tool.server_pids(client))  # mosh: a server per session
                            | set(ctx.tool.server_pids(second.client)))
        ctx.close_session(second)
        return {"server_cpu": [(server1 - server0) / seconds * 100],
                "server_wakeups": [(wakeups1 - wakeups0) / seconds],
                "server_rss": [(rss - rss_before) / 1e6],
                "server_pss": [(pss_one - pss_before) / 1e6],
                "server_pss_next": [(pss_two - pss_one) / 1e6],
                "server_rss_total": [rss / 1e6],
                "client_cpu": [(client1 - client0) / seconds * 100],
                "client_wakeups": [(client_wakeups1 - client_wakeups0) / seconds]}


class IdleDetached(Scenario):
    """Server wake-ups of a detached session: its client killed (no keepalives any more)
    just after the shell was told to write a line, so output is in flight to nobody."""

    name = "idle_detached"
    title = "detached session"
    needs = "detach"
    metrics = (Metric("server_wakeups", "server wake-ups detached", "/s", scale=1.0),)

    def run(self, ctx: Context) -> dict:
        ctx.session = ctx.open_session()
        client = ctx.session.client
        pids = ctx.tool.server_pids(client)  # while the client can still name them
        ctx.session.display.send(b"sleep 1; echo written after the client left\r")
        time.sleep(0.3)
        os.kill(client.term.pid, signal.SIGKILL)
        time.sleep(IDLE_AFTER_INPUT_SECS)
        seconds = 4.0 if ctx.quick else 10.0
        wakeups0 = wakeups(pids)
        time.sleep(seconds)
        return {"server_wakeups": [(wakeups(pids) - wakeups0) / seconds]}


class Crowd(Scenario):
    """100 sessions on one server (moshpit only: bench/crowd.py drives them with moshpit's
    client core): 5 flood output, 95 type a key about every second; echo median/p95 of the
    typing ones, errors, and the server's memory in all (listener, spawner, sessions)."""

    name = "crowd"
    title = "100 sessions, 5 flooding"
    needs = "crowd"
    sessions, flooders = 100, 5
    udp_ports = sessions + 5
    server_config = {"max_sessions": sessions + 10, "max_sessions_per_user": sessions + 10}
    budget = 600.0
    metrics = (Metric("echo_median", "echo median, 95 typing", "ms"),
               Metric("echo_p95", "echo p95, 95 typing", "ms", summary="p95"),
               Metric("errors", "errors (logins, echoes)", "", scale=1.0),
               Metric("rss", "server RSS total", "MB", scale=1e-6),
               Metric("pss", "server PSS total", "MB", scale=1e-6),
               Metric("connect", "login, each (one after another)", "ms"))

    def run(self, ctx: Context) -> dict:
        identity, host_key = ctx.tool.keys()
        samples = run_crowd(
            lambda: TestClient(BACK, ctx.net.tcp_port, identity, host_key).connect(timeout=60),
            lambda: ctx.tool.server_pids(None), self.sessions, self.flooders,
            10.0 if ctx.quick else 20.0)
        return {"echo_median": samples["echo"], "echo_p95": samples["echo"],
                "errors": samples["errors"], "rss": samples["rss"], "pss": samples["pss"],
                "connect": samples["connect"]}


class Preauth(Scenario):
    """Pre-authentication attacks on the server (moshpit only: tests/attack_util.py drives
    its handshake). First, six loopback addresses keep refilling idle connections while a
    client logs in and resumes over and over: the share of those handshakes that succeed.
    Then keystroke echo of a live session, without and during a ClientHello flood (another
    process, as fast as it can) from six addresses, then from 1024 in turn (more sources
    than penalties catch in time, like a botnet): medians, ratios to the quiet median, and
    how many ClientHellos a second the server answered (X25519 + signature each) or refused."""

    name = "preauth"
    title = "pre-auth attacks"
    needs = "preauth"
    samples_full, samples_quick = 60, 20
    rounds_full, rounds_quick = 15, 5
    floods = (("six", ("127.0.0.12/31", "127.0.0.14/31", "127.0.0.16/31")),
              ("1024", ("127.0.4.0/22",)))
    budget = 300.0
    metrics = (
        Metric("legit_ok", "logins+resumes OK, idle-conn attack", "%", scale=1.0,
               better="higher"),
        Metric("echo_quiet", "echo median, no flood", "ms"),
        *(metric for label, _ in floods for metric in (
            Metric(f"echo_{label}", f"echo median, flood from {label}", "ms"),
            Metric(f"ratio_{label}", f"  flood/no flood ({label}; <= 1.5)", "x", scale=1.0),
            Metric(f"answered_{label}", f"  ClientHellos answered ({label})", "/s",
                   scale=1.0),
            Metric(f"refused_{label}", f"  connections refused ({label})", "/s", scale=1.0,
                   better="higher"))),
    )

    def run(self, ctx: Context) -> dict:
        identity, host_key = ctx.tool.keys()
        port = ctx.net.tcp_port
        with IdleConnectionAttack(port, ATTACK_SOURCES, per_source=16):
            time.sleep(1.5)  # the attackers hold every slot they can, idle, before a login
            ok, tried, errors = legitimate_logins(port, identity, host_key,
                                                  self.rounds_quick if ctx.quick
                                                  else self.rounds_full)
        if errors:
            print(f"  preauth: {len(errors)} of {tried} failed, first: {errors[0]}",
                  file=sys.stderr)
        samples = {"legit_ok": [100.0 * ok / tried]}
        ctx.session = ctx.open_session()
        count = self.samples(ctx.quick)
        quiet = samples["echo_quiet"] = ctx.session.echo_latencies(count, timeout=20.0)
        for label, sources in self.floods:
            echo, answered, refused = self._flooded_echo(ctx, count, label, sources)
            samples.update({f"echo_{label}": echo,
                            f"ratio_{label}": [statistics.median(echo) / statistics.median(quiet)],
                            f"answered_{label}": [answered], f"refused_{label}": [refused]})
        return samples

    @staticmethod
    def _flooded_echo(ctx: Context, count: int, label: str, sources: tuple) -> tuple:
        """Echo latencies during a flood from ``sources``; the flood's answered and refused
        ClientHellos a second."""
        log = os.path.join(ctx.tool.workdir, f"flood-{label}.log")
        seconds = 4.0 + count * 0.25  # outlasts the measurement even on a loaded machine
        with ManagedProcess([sys.executable, ATTACK_UTIL, "hello-flood", str(ctx.net.tcp_port),
                             str(seconds), *sources], log=log) as flood:
            time.sleep(1.0)  # flooding at full speed before the first keystroke
            echo = ctx.session.echo_latencies(count, timeout=20.0)
            if flood.poll() is not None:
                raise ScenarioError(f"the flood ended early: {flood.read_log(400)}")
            flood.wait(seconds + 30.0)
        answered, refused, elapsed = (float(word) for word in flood.read_log().split()[1::2])
        return echo, answered / elapsed, refused / elapsed


def local_shell_startup(samples: int = 3) -> float:
    """Median seconds for this user's login shell, run locally in a PTY, to run a command:
    the part of every tool's connect time that is the shell's, not the tool's."""
    pw = pwd.getpwuid(os.getuid())
    env = dict(CLIENT_ENV, HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name,
               SHELL=pw.pw_shell, PATH=os.environ.get("PATH", "/usr/bin:/bin"))
    times = []
    for _ in range(samples):
        started = time.monotonic()
        client = Client(PtyProcess([pw.pw_shell, "-l"], env=env, cwd=pw.pw_dir))
        try:
            times.append(Session(client).wait_ready(started))
        finally:
            client.close()
    return statistics.median(times)


SCENARIOS = (
    Connect(),
    Echo("echo_0ms", "echo 0 ms RTT", rtt=0.0),
    Echo("echo_100ms", "echo 100 ms RTT", rtt=0.1),
    CtrlC(),
    Bulk(),
    # issue 14's paths: a 10 Mbit/s link with a 1 MB queue, bulk output, bulk across loss
    CtrlC("ctrl_c_slow", "Ctrl-C during yes flood, 10 Mbit/s 100 ms RTT 1 MB queue",
          rtt=0.1, rate_bps=10e6, queue_bytes=1_000_000, flood_seconds=4.0,
          caveats={"ssh": TCP_MODEL_CAVEAT}),
    BulkTransfer("bulk_20mb", "20 MB base64 to the terminal", 20.0),
    BulkTransfer("bulk_loss_2mb", "2 MB base64, 10% loss 40 ms RTT", 2.0, rtt=0.04,
                 loss=0.10, needs="every_byte", caveats={"ssh": TCP_MODEL_CAVEAT}),
    BulkTransfer("bulk_loss_20mb", "20 MB base64, 10% loss 40 ms RTT", 20.0, rtt=0.04,
                 loss=0.10, needs="every_byte", in_quick=False, samples=2,
                 caveats={"ssh": TCP_MODEL_CAVEAT}),
    # issue 17: UDP blocked, moshpit on its TCP carrier
    CtrlCUdpBlocked("ctrl_c_tcp", "Ctrl-C during yes flood, UDP blocked (TCP carrier)"),
    BulkUdpBlocked("bulk_tcp_2mb", "2 MB base64, UDP blocked (TCP carrier)", 2.0,
                   needs="tcp_fallback"),
    Fairness(),
    Forwarded("forward_10mb", "10 MB through -L, 10% loss 40 ms RTT", 10.0, rtt=0.04,
              loss=0.10),
    Forwarded("forward_100mb", "100 MB through -L, 10% loss 40 ms RTT", 100.0, rtt=0.04,
              loss=0.10, in_quick=False),
    ForwardedOutage(20.0, 4.0),
    Outage(5.0, samples=3, in_quick=True),
    Outage(20.0, samples=2, in_quick=False),
    Roam(),
    Echo("loss_10", "echo 10% loss 50 ms RTT", rtt=0.05, loss=0.10, needs="loss"),
    Echo("loss_30", "echo 30% loss 50 ms RTT", rtt=0.05, loss=0.30, needs="loss"),
    # issue 16: local echo prediction on (mosh's default, adaptive) and off, same paths
    Predict("predict_100ms", "predicted echo 100 ms RTT", rtt=0.1),
    Predict("predict_100ms_off", "echo, prediction off, 100 ms RTT", rtt=0.1,
            predict="never"),
    Predict("predict_loss30", "predicted echo 30% loss 40 ms RTT", rtt=0.04, loss=0.30),
    Predict("predict_loss30_off", "echo, prediction off, 30% loss 40 ms RTT", rtt=0.04,
            loss=0.30, predict="never"),
    Idle(),
    IdleDetached(),
    Crowd(),
    Preauth(),
)

SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


def selected(only: list[str], quick: bool) -> list[Scenario]:
    """The scenarios to run: ``only`` (a name picks that scenario alone; something that
    names none is a prefix) if given, else all (or the quick set)."""
    if only:
        picked = [s for s in SCENARIOS
                  if any(s.name == o or (o not in SCENARIO_NAMES and s.name.startswith(o))
                         for o in only)]
        unknown = [o for o in only if not any(s.name.startswith(o) for s in SCENARIOS)]
        if unknown:
            raise ValueError(f"unknown scenario {', '.join(unknown)} "
                             f"(known: {', '.join(SCENARIO_NAMES)})")
        return picked
    return [s for s in SCENARIOS if s.in_quick or not quick]

