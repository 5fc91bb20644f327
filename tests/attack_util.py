"""Pre-authentication attacks on a real mps, from loopback aliases, for tests and `make bench`.

Why here: the test (tests/test_preauth.py) and the benchmark (bench/scenarios.py) perform the
same attacks and the same legitimate logins, so both measure the same thing.

- ``IdleConnectionAttack``: from each of several source addresses, keep ``per_source`` TCP
  connections open and silent, reopening each one the moment the server closes it.
- ``python3 tests/attack_util.py hello-flood PORT SECONDS [SOURCE...]``: from the same
  addresses (or those given, in turn; ``127.0.4.0/22`` gives 1024), open connections and
  send a valid ClientHello on each, as fast as one process can (the server must answer it
  with X25519 and a signature unless it refuses the source first). Run as its own process
  so its CPU is not the measurer's.
- ``legitimate_logins``: a TestClient logs in and resumes, repeatedly; how many succeeded.

All of 127.0.0.0/8 is loopback on Linux, so 127.0.0.2..7 are six distinct source addresses
with no setup.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import sys
import threading
import time
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moshpit_handshake as hs  # noqa: E402
from moshpit_keys import PrivateKey, PublicKey  # noqa: E402

ATTACK_SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 8))
TARGET = "127.0.0.1"
_CONNECT_TIMEOUT_SECS = 1.0


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(_CONNECT_TIMEOUT_SECS)
        sock.connect((TARGET, port))
    except OSError:
        sock.close()
        raise
    return sock


class IdleConnectionAttack:
    """Keeps ``per_source`` idle connections to ``port`` open from each of ``sources``, in a
    thread, reopening any the server closes (or refuses), at most ``max_rate`` connections a
    second in all. ``opened`` counts connections made; use as a context manager."""

    def __init__(self, port: int, sources: Sequence[str] = ATTACK_SOURCES,
                 per_source: int = 16, max_rate: float = 500.0) -> None:
        self.port, self.sources, self.per_source = port, tuple(sources), per_source
        self._interval = 1.0 / max_rate
        self.opened = 0
        self._open: Dict[str, List[socket.socket]] = {source: [] for source in self.sources}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-attack", daemon=True)

    def __enter__(self) -> IdleConnectionAttack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for socks in self._open.values():
            for sock in socks:
                sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._refill()
            self._reap(0.02)

    def _refill(self) -> None:
        for source, socks in self._open.items():
            while len(socks) < self.per_source and not self._stop.is_set():
                try:
                    socks.append(_connect_from(source, self.port))
                    self.opened += 1
                except OSError:
                    break  # backlog full or the like: try again next round
                time.sleep(self._interval)

    def _reap(self, wait: float) -> None:
        """Close the connections the server has answered (a refusal) or closed."""
        every = [sock for socks in self._open.values() for sock in socks]
        readable = select.select(every, [], [], wait)[0] if every else []
        for sock in readable:
            for socks in self._open.values():
                if sock in socks:
                    socks.remove(sock)
            sock.close()


def hello_flood(port: int, seconds: float, sources: Sequence[str] = ATTACK_SOURCES) -> Tuple[
        int, int]:
    """Send valid ClientHellos from ``sources`` in turn for ``seconds``: each on a new
    connection, read the answer, close. Returns (answered with ServerHello, refused)."""
    hello = hs.ClientHandshake(PrivateKey.generate(), hs.ClientRequest("nobody")).data_to_send()
    answered = refused = 0
    deadline = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < deadline:
        source = sources[turn % len(sources)]
        turn += 1
        try:
            with _connect_from(source, port) as sock:
                sock.sendall(hello)
                reply = sock.recv(4096)
        except OSError:
            refused += 1
            continue
        # A refusal is a Refuse message (type 6); anything else began with ServerHello.
        if len(reply) > 4 and reply[4] == 2:
            answered += 1
        else:
            refused += 1
    return answered, refused


def legitimate_logins(port: int, identity: PrivateKey, host_key: PublicKey, rounds: int,
                      pause: float = 0.2) -> Tuple[int, int, List[str]]:
    """``rounds`` times: log in (a new session) and resume it once, then end it. Returns
    (handshakes that succeeded, handshakes tried, the errors seen)."""
    from server_util import TestClient  # only here: it needs the transport, the flood not

    ok = tried = 0
    errors: List[str] = []
    for _ in range(rounds):
        with TestClient(TARGET, port, identity, host_key) as client:
            for step in ("login", "resume"):
                tried += 1
                try:
                    client.connect(timeout=10.0) if step == "login" else client.resume(10.0)
                    ok += 1
                except hs.HandshakeError as err:
                    errors.append(f"{step}: {err}")
                    break
            else:
                client.quit()
        time.sleep(pause)
    return ok, tried, errors


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[0] != "hello-flood":
        print("usage: attack_util.py hello-flood PORT SECONDS [SOURCE_ADDRESS_OR_NET...]",
              file=sys.stderr)
        return 2
    sources = [str(ip) for net in argv[3:] for ip in ipaddress.ip_network(net)]
    started = time.monotonic()
    answered, refused = hello_flood(int(argv[1]), float(argv[2]), sources or ATTACK_SOURCES)
    print(f"answered {answered} refused {refused} seconds {time.monotonic() - started:.3f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
