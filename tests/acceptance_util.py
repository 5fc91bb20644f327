"""Helpers for the end-to-end acceptance suite (tests/test_acceptance*.py).

The suite runs what a user runs: a real ``mps.py`` (tests/server_util.MpsServer), a real
``mp.py`` in a real PTY (tests/proc_util.PtyProcess), and between them the impairment relay
(tests/relay.py) on a random loopback alias, so the client dials ``FRONT:port`` and its UDP
goes through the relay to the server on 127.0.0.1.  Everything started is stopped by PID.

``Rig`` is one such setup.  ``mp.py`` runs under a tiny wrapper (``WRAPPER``) that records the
terminal attributes before the client starts and compares them after it exits, and prints
the client's exit status; ``wrapper_result`` reads that line.  ``Shell`` drives the remote
shell through the client's terminal: it types commands and reads their output between
markers that only the command's output (never the echoed command line) contains.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pwd
import random
import re
import secrets
import shutil
import socket
import sys
import threading
from typing import Optional

from proc_util import WRAPPER, WRAPPER_RE, PtyProcess, kill_pid, pid_alive, proc_children
from relay import Relay, RelayError, random_front_alias
from server_util import REPO, MpsServer

MP = os.path.join(REPO, "mp.py")
KEYGEN = os.path.join(REPO, "mp_keygen.py")
USER = pwd.getpwuid(os.geteuid()).pw_name
CTRL_C = b"\x03"


# The client's "last contact" banner: drawn and erased between ESC 7 (save cursor) and
# ESC 8 (restore), always at a safe point of the output stream (see mp.StatusBanner).
BANNER_RE = re.compile(rb"\x1b7.*?\x1b8", re.S)


class SniffingRelay(Relay):
    """The impairment relay, keeping copies of the last datagrams it received per direction
    (what an on-path attacker would capture, for replay attacks)."""

    KEEP = 256

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captured = {"up": collections.deque(maxlen=self.KEEP),
                         "down": collections.deque(maxlen=self.KEEP)}

    def _impair(self, direction, data: bytes, deliver, *rest) -> None:
        self.captured[direction.name].append(bytes(data))
        super()._impair(direction, data, deliver, *rest)


class Rig:
    """A server, a relay in front of it on a random 127.0.0.N, and a fresh client HOME.

    ``server_settings`` are extra config keys for mps.py.  ``impair_tcp`` makes the relay's
    blackouts freeze the handshake's TCP too (a real outage); by default only the session's
    UDP is cut, so the client's resume handshakes get through.  ``close()`` (or leaving the
    ``with`` block) stops the relay and the server, then every process the server started
    (shells and their children) that is still alive, by PID.
    """

    def __init__(self, tmp_path, server_settings: Optional[dict] = None,
                 impair_tcp: bool = False) -> None:
        self.tmp_path = tmp_path
        self.impair_tcp = impair_tcp
        self.server_pids: set = set()
        self.server = MpsServer(tmp_path, settings=server_settings)
        self.relay: Optional[SniffingRelay] = None
        try:
            self.relay = self._start_relay()
        except BaseException:
            self.server.stop()
            raise
        self.front = self.relay.front
        self.home = os.path.join(os.fspath(tmp_path), "client-home")
        os.makedirs(self.home, mode=0o700)
        self.mp_dir = os.path.join(self.home, ".mp")
        self.known_hosts = os.path.join(self.mp_dir, "known_hosts")
        self.client_log = os.path.join(os.fspath(tmp_path), "mp.log")

    def _start_relay(self) -> SniffingRelay:
        last: Optional[Exception] = None
        for _ in range(20):  # an alias whose (alias, port) pairs are taken: try another
            relay = SniffingRelay(front=random_front_alias(), back="127.0.0.1",
                                  tcp_ports=[self.server.port],
                                  udp_ports=[self.server.udp_port],
                                  impair_tcp=self.impair_tcp)
            try:
                return relay.start()
            except RelayError as err:
                last = err
        raise RuntimeError(f"no loopback alias for the relay: {last}")

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def track_server_children(self) -> None:
        """Remember the server's descendants now (shells), to stop them by PID at the end
        even if the server itself is killed meanwhile."""
        proc = self.server.proc
        if proc is not None and proc.poll() is None:
            self.server_pids.update(proc_children(proc.pid))

    def close(self) -> None:
        self.track_server_children()
        if self.relay is not None:
            self.relay.close()
        self.server.stop()
        for pid in self.server_pids:
            if pid_alive(pid):
                kill_pid(pid, 2.0)

    # -- the client -------------------------------------------------------------------

    def env(self, **extra: str) -> dict:
        env = {"HOME": self.home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "TERM": "xterm", "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def mp_argv(self, *extra: str, key: Optional[str] = None,
                policy: Optional[str] = "accept-new") -> list:
        """mp.py's command line for this rig: port, log, the key (default: the server's
        authorized test key; "" = the default identity in the client HOME), host key policy
        (None = the default, ``ask``)."""
        argv = [sys.executable, MP, "-s", str(self.server.port), "-t", self.client_log]
        key = self.server.client_key_path if key is None else key
        if key:
            argv += ["-p", key]
        if policy:
            argv += ["--strict-host-key-checking", policy]
        return [*argv, *extra, f"{USER}@{self.front}"]

    def start_client(self, *extra: str, rows: int = 24, cols: int = 80, **kwargs) -> PtyProcess:
        """mp.py under WRAPPER in a new PTY of ``rows`` x ``cols``."""
        argv = [sys.executable, "-c", WRAPPER, *self.mp_argv(*extra, **kwargs)]
        return PtyProcess(argv, env=self.env(), rows=rows, cols=cols)

    def read_client_log(self) -> str:
        try:
            with open(self.client_log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        """Logs and relay counters, for assertion messages."""
        return (f"\n--- relay stats: {self.relay.stats if self.relay else None}"
                f"\n--- mp.log tail:\n{self.read_client_log()[-3000:]}"
                f"\n--- mps.log tail:\n{self.server.log()[-3000:]}"
                f"\n--- mps stderr:\n{self.server.stderr()[-1000:]}")


def wrapper_result(term: PtyProcess, timeout: float = 60.0) -> tuple:
    """(mp.py's exit status, "same" or "DIFF ..." for the terminal attributes, all output
    up to the wrapper's report)."""
    out = term.read_until(WRAPPER_RE, timeout)
    match = WRAPPER_RE.search(out)
    return int(match.group(1)), match.group(2).decode(), out


class Shell:
    """The remote shell seen through mp.py's terminal.

    ``run(command)`` types ``printf '<%s>' B<tag>; command; printf '<%s>' E<tag>`` and
    returns the bytes between ``<B<tag>>`` and ``<E<tag>>``: the markers only exist in the
    shell's output, so the echo of the typed line never matches.
    """

    def __init__(self, term: PtyProcess) -> None:
        self.term = term

    @staticmethod
    def tag() -> str:
        return secrets.token_hex(4)

    def send_line(self, line: str) -> None:
        self.term.send(line + "\r")

    def start(self, command: str) -> tuple:
        """Type ``command`` between markers; returns (begin, end) markers to wait for."""
        tag = self.tag()
        self.send_line(f"printf '<%s>' B{tag}; {command}; printf '<%s>' E{tag}")
        return f"<B{tag}>".encode(), f"<E{tag}>".encode()

    def run(self, command: str, timeout: float = 60.0) -> bytes:
        begin, end = self.start(command)
        self.term.read_until(begin, timeout)
        return self.term.read_until(end, timeout)[:-len(end)]

    def ping(self, timeout: float = 60.0) -> None:
        """One round trip through the session: an echo whose output we wait for."""
        self.run(":", timeout)

    def prepare(self, timeout: float = 90.0) -> None:
        """Wait for the login shell, then make it predictable: no history file, no prompt
        hooks, and output bytes exactly as programs write them (``stty -onlcr``)."""
        self.ping(timeout)
        self.run("unset HISTFILE PROMPT_COMMAND; PS1='$ '; stty -onlcr", timeout)


def numbers_in(output: bytes) -> list:
    """The integers printed one per line in ``output``, ignoring the client's banner."""
    clean = BANNER_RE.sub(b"", output)
    return [int(n) for n in re.findall(rb"(?m)^(\d+)\r?$", clean)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def have(program: str) -> bool:
    return shutil.which(program) is not None


class Sprayer:
    """Sprays hostile datagrams at a session from a thread, until ``stop()``.

    An attacker on the path (or anywhere, spoofing nothing) sends: replays of captured
    client packets to the server port (directly, and through the relay front so they come
    from a new address, as a roaming client would), replays of captured server packets to
    the client, each direction's packets reflected at the other side, captured packets
    bit-flipped or truncated, packets with the real connection id and a huge packet number
    but a bogus tag, and random garbage of random sizes.  ``sent`` counts them.

    ``received`` collects whatever comes back to the attacker's socket: a server that took a
    replayed packet as a roaming client would start sending the session there.
    """

    def __init__(self, relay: SniffingRelay, server_port_addr: tuple, client_addr: tuple,
                 front_addr: tuple, rate: float = 500.0) -> None:
        self.up = list(relay.captured["up"])
        self.down = list(relay.captured["down"])
        if not self.up or not self.down:
            raise ValueError("nothing captured yet: run some traffic first")
        self.targets = {"server": server_port_addr, "client": client_addr, "front": front_addr}
        self.interval = 1.0 / rate
        self.sent = 0
        self.received: list = []
        self._rng = random.Random(secrets.randbits(32))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sprayer", daemon=True)

    def __enter__(self) -> Sprayer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _datagram(self) -> tuple:
        rng = self._rng
        kind = rng.randrange(8)
        if kind == 0:
            return "server", rng.choice(self.up)  # replay toward the server
        if kind == 1:
            return "front", rng.choice(self.up)  # replay from a new address (via the relay)
        if kind == 2:
            return "client", rng.choice(self.down)  # replay toward the client
        if kind == 3:  # reflection: each side's own packets sent back at it
            return rng.choice((("client", rng.choice(self.up)),
                               ("server", rng.choice(self.down))))
        if kind == 4:  # one bit flipped
            data = bytearray(rng.choice(self.up + self.down))
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            return rng.choice(("server", "client", "front")), bytes(data)
        if kind == 5:  # truncated
            data = rng.choice(self.up + self.down)
            return rng.choice(("server", "client")), data[:rng.randrange(len(data))]
        if kind == 6:  # real header (flags, conn_id), far-future packet number, bogus body
            data = rng.choice(self.up + self.down)
            pn = (1 << 62) + rng.randrange(1 << 20)
            forged = data[:9] + pn.to_bytes(8, "big") + rng.randbytes(rng.randrange(16, 1200))
            return rng.choice(("server", "client", "front")), forged
        return (rng.choice(("server", "client", "front")),
                rng.randbytes(rng.randrange(0, 1500)))

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            while not self._stop.wait(self.interval * 10):
                for _ in range(10):
                    target, data = self._datagram()
                    try:
                        sock.sendto(data, self.targets[target])
                    except OSError:
                        pass  # ICMP errors from earlier sends, full buffers: keep spraying
                    self.sent += 1
                self._collect(sock)

    def _collect(self, sock: socket.socket) -> None:
        while len(self.received) < 1000:
            try:
                self.received.append(sock.recvfrom(65535))
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error reported on the socket: not a datagram
