"""Per-tool adapters for the benchmark: how to start a server and open a session.

Why adapters: one scenario runner measures moshpit, OpenSSH and Mosh the same way; all that
differs between them is how a server is started, how a client is launched (always inside a
real PTY) and which server processes belong to a session.  Every process is started with
tests/proc_util.py and stopped by PID.  Only loopback addresses are used: servers listen on
127.0.0.1 and clients reach them through the impairment relay's front alias.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

from display import COLS, ROWS
from moshpit_keys import load_private_key, load_public_key
from proc_util import ManagedProcess, PtyProcess, kill_pid, proc_children, proc_usage, wait_for
from relay import Relay, free_port, random_front_alias

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACK = "127.0.0.1"
CLIENT_ENV = {"LANG": "C.UTF-8", "TERM": "xterm-256color"}
PREAUTH_NA = "the pre-auth scenario drives moshpit's own handshake (tests/attack_util.py)"
FAIRNESS_NA = "the fairness run is two moshpit sessions against a TCP transfer"
CROWD_NA = "the crowd run drives 100 sessions with moshpit's own client core (bench/crowd.py)"


def tcp_listening(host: str, port: int) -> bool:
    """True if a socket listens on IPv4 ``host``:``port`` (or the wildcard), read from
    /proc/net/tcp so the server under test never sees a probe connection (it would log a
    failed handshake)."""
    wanted = {f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        rows = f.read().splitlines()[1:]
    return any(cols[1] in wanted and cols[3] == "0A" for cols in (row.split() for row in rows))


class Network:
    """The relay between client and server for one measurement: a random front alias, fresh
    ports (free on both addresses) and impairment applied to TCP too, so OpenSSH feels the
    same delay and outages as the UDP tools (and loss and bottlenecks, through the relay's
    model of a TCP sender: relay.TcpWindow).  ``udp_count`` consecutive session ports
    (``udp_ports``; ``udp_port`` is the first) let a server hold several sessions, and
    ``extra_tcp`` more relayed TCP ports (``extra_tcp_ports``) carry other traffic across
    the same relay, hence the same bottleneck."""

    def __init__(self, tcp: bool, udp: bool, seed: int, udp_count: int = 1,
                 extra_tcp: int = 0) -> None:
        self.front = random_front_alias()
        hosts = (BACK, self.front)
        self.tcp_port = free_port(hosts, "tcp") if tcp else None
        self.udp_port = free_port(hosts, "udp", count=udp_count) if udp else None
        self.udp_ports = list(range(self.udp_port, self.udp_port + udp_count)) if udp else []
        self.extra_tcp_ports = [free_port(hosts, "tcp") for _ in range(extra_tcp)]
        self.relay = Relay(front=self.front, back=BACK,
                           tcp_ports=([self.tcp_port] if tcp else []) + self.extra_tcp_ports,
                           udp_ports=self.udp_ports, seed=seed, impair_tcp=True,
                           tcp_loss=True)

    def start(self) -> Network:
        self.relay.start()
        return self

    def close(self) -> None:
        self.relay.close()

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A running client: its PTY plus whatever must be stopped with it."""

    def __init__(self, term: PtyProcess, extra_pids: tuple = ()) -> None:
        self.term = term
        self.extra_pids = list(extra_pids)

    def close(self) -> None:
        """Ask the shell to exit (so servers end the session cleanly), then kill by PID."""
        if self.term.poll() is None and not self.term.eof:
            try:
                # Ctrl-C first (a flood may still run), then exit separately: bash's
                # readline can lose a key that arrives while it handles SIGINT.
                self.term.send(b"\x03")
                self.term.drain(quiet=0.3, limit=2.0)
                self.term.send(b"\x15exit\r")
                self.term.read_to_eof(3.0)
            except (OSError, TimeoutError, EOFError):
                pass
        self.term.close()
        for pid in self.extra_pids:
            kill_pid(pid)


class Tool:
    """Base adapter.  Subclasses set ``name``, ``uses_tcp``/``uses_udp`` and ``lacks`` (the
    scenario capabilities they cannot take part in, with the reason)."""

    name = ""
    uses_tcp = False
    uses_udp = False
    redraws_screen = False  # sends screen states, not the byte stream (see display.py)
    lacks: dict = {}
    predict = "never"  # local echo prediction, for clients that have it (set per scenario)

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.server: ManagedProcess | None = None
        self.server_config: dict = {}  # moshpit: more [mps] keys (TOML values) a scenario sets

    def missing(self) -> str | None:
        """Why this tool cannot run here (None when it can)."""
        return None

    def version(self) -> str:
        return ""

    def start_server(self, net: Network) -> None:
        """Start the server side for ``net`` (no-op for tools whose server is per session)."""

    def connect(self, net: Network, extra: tuple = ()) -> Client:
        """Launch a client in a PTY toward ``net.front`` with ``extra`` flags (e.g. ``-L``);
        returns at once (not yet ready)."""
        raise NotImplementedError

    def server_pids(self, client: Client | None) -> list[int]:
        """Server-side processes (listener included) while ``client``'s session exists,
        or before any session (``client`` None); never the shell or what it runs."""
        raise NotImplementedError

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def server_log(self) -> str:
        return self.server.read_log() if self.server else ""

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def _pty(self, argv: list, env_extra: dict | None = None) -> PtyProcess:
        env = dict(os.environ, **CLIENT_ENV)
        env.update(env_extra or {})
        return PtyProcess(argv, env=env, rows=ROWS, cols=COLS)


def _run_version(argv: list) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _sum_usage(pids: list[int]) -> tuple[float, int]:
    cpu = rss = 0
    for pid in pids:
        try:
            c, r = proc_usage(pid)
        except (OSError, ValueError):
            continue
        cpu += c
        rss += r
    return cpu, rss


class Moshpit(Tool):
    """mps.py on 127.0.0.1 (TOML config in a temp dir, HOME pointing there) and mp.py."""

    name = "moshpit"
    uses_tcp = uses_udp = True

    def missing(self) -> str | None:
        for script in ("mps.py", "mp.py", "mp_keygen.py"):
            if not os.path.exists(os.path.join(REPO, script)):
                return f"{script} is not in the repository yet"
        return None

    def version(self) -> str:
        return _run_version([sys.executable, os.path.join(REPO, "mp.py"), "-V"])

    def _make_keys(self) -> None:
        """Host key, client identity (``mp_keygen.py generate``) and authorized_keys."""
        for stem in ("host_key", "id_ed25519"):
            subprocess.run([sys.executable, os.path.join(REPO, "mp_keygen.py"), "generate",
                            "-f", self._path(stem), "-N", "", "-C", f"bench-{stem}"],
                           check=True, capture_output=True, timeout=60,
                           env=self._env(self._path("client_home")))
        with open(self._path("id_ed25519.pub")) as f:
            line = f.read()
        fd = os.open(self._path("authorized_keys"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(line)

    def _env(self, home: str) -> dict:
        os.makedirs(home, mode=0o700, exist_ok=True)
        return dict(os.environ, HOME=home, **CLIENT_ENV)

    def start_server(self, net: Network) -> None:
        if not os.path.exists(self._path("host_key")):
            self._make_keys()
        config = self._path("mps.toml")
        with open(config, "w") as f:
            f.write("[mps]\n"
                    f'ip = "{BACK}"\n'
                    f"port = {net.tcp_port}\n"
                    f'udp_port_range = "{net.udp_ports[0]}-{net.udp_ports[-1]}"\n'
                    f'authorized_keys_file = "{self._path("authorized_keys")}"\n'
                    f'private_key_path = "{self._path("host_key")}"\n'
                    f'public_key_path = "{self._path("host_key.pub")}"\n')
            f.writelines(f"{key} = {value}\n" for key, value in self.server_config.items())
        self.server = ManagedProcess(
            [sys.executable, os.path.join(REPO, "mps.py"), "-e", "-c", config],
            env=self._env(self._path("server_home")), cwd=REPO, log=self._path("mps.log"))
        wait_for(lambda: tcp_listening(BACK, net.tcp_port) or self.server.poll() is not None,
                 15, "mps.py to listen")
        if self.server.poll() is not None:
            raise RuntimeError(f"mps.py exited: {self.server.read_log(800)}")

    def keys(self) -> tuple:
        """(client identity, host public key) as loaded keys, for clients built in Python."""
        return (load_private_key(self._path("id_ed25519")),
                load_public_key(self._path("host_key.pub")))

    def connect(self, net: Network, extra: tuple = ()) -> Client:
        argv = [sys.executable, os.path.join(REPO, "mp.py"), "-s", str(net.tcp_port),
                "-p", self._path("id_ed25519"), "--strict-host-key-checking", "accept-new",
                "--predict", self.predict, *extra, f"root@{net.front}"]
        env = self._env(self._path("client_home"))
        return Client(PtyProcess(argv, env=env, cwd=REPO, rows=ROWS, cols=COLS))

    def server_pids(self, client: Client | None) -> list[int]:
        """mps.py and its descendants running mps.py: the serving child (when it forked to
        shed session leadership, as under ManagedProcess), the session spawner and every
        session process; not the shells."""
        if not self.server:
            return []
        pids = [self.server.pid]
        for pid in proc_children(self.server.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"mps.py" in f.read():
                        pids.append(pid)
            except OSError:
                continue
        return pids


class OpenSSH(Tool):
    """sshd -D on 127.0.0.1 with throwaway host/user keys and a temp config; ssh client."""

    name = "ssh"
    uses_tcp = True
    lacks = {"loss": "TCP through a userspace relay cannot model packet loss",
             "outage": "a relay can only freeze TCP, not model a real outage",
             "forward_outage": "a relay can only freeze TCP, not model a real outage",
             "roam": "ssh cannot follow an address change",
             "detach": "an ssh session ends with its client",
             "preauth": PREAUTH_NA,
             "fairness": FAIRNESS_NA,
             "crowd": CROWD_NA}
    SSHD = "/usr/sbin/sshd"

    def missing(self) -> str | None:
        if not (os.path.exists(self.SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
            return "openssh-server/openssh-client not installed (apt-get install openssh-server)"
        if os.geteuid() != 0:
            return "sshd needs root to log in as root on loopback"
        return None

    def version(self) -> str:
        return _run_version(["ssh", "-V"])

    def start_server(self, net: Network) -> None:
        for stem in ("host", "id"):
            if not os.path.exists(self._path(stem)):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                                "-f", self._path(stem)], check=True, timeout=30)
        shutil.copyfile(self._path("id.pub"), self._path("authorized_keys"))
        os.chmod(self._path("authorized_keys"), 0o600)
        config = self._path("sshd_config")
        with open(config, "w") as f:
            f.write(f"Port {net.tcp_port}\nListenAddress {BACK}\n"
                    f"HostKey {self._path('host')}\nPidFile {self._path('sshd.pid')}\n"
                    f"AuthorizedKeysFile {self._path('authorized_keys')}\n"
                    "StrictModes no\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                    "UsePAM no\nPrintMotd no\nPrintLastLog no\nUseDNS no\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.server = ManagedProcess([self.SSHD, "-D", "-e", "-f", config],
                                     log=self._path("sshd.log"))
        wait_for(lambda: tcp_listening(BACK, net.tcp_port) or self.server.poll() is not None,
                 15, "sshd to listen")
        if self.server.poll() is not None:
            raise RuntimeError(f"sshd exited: {self.server.read_log(800)}")

    def connect(self, net: Network, extra: tuple = ()) -> Client:
        argv = ["ssh", "-F", "/dev/null", "-i", self._path("id"), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-p", str(net.tcp_port),
                *extra, f"root@{net.front}"]
        return Client(self._pty(argv))

    def server_pids(self, client: Client | None) -> list[int]:
        """The listening sshd and its per-connection sshd processes, not the shell."""
        if not self.server:
            return []
        pids = [self.server.pid]
        for pid in proc_children(self.server.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip().startswith("sshd"):
                        pids.append(pid)
            except OSError:
                continue
        return pids


class Mosh(Tool):
    """mosh-server new -i 127.0.0.1 -p PORT per session (no ssh), mosh-client with MOSH_KEY.

    Prediction is off (MOSH_PREDICTION_DISPLAY=never) so echo times measure the network
    path, as the loss comparison requires, except in the prediction scenarios."""

    name = "mosh"
    uses_udp = True
    redraws_screen = True
    lacks = {"preauth": PREAUTH_NA,
             "every_byte": "mosh sends screen states: it skips output, so bytes cannot be "
                           "checked",
             "fairness": FAIRNESS_NA,
             "tcp_fallback": "mosh has no TCP mode (mosh#13): nothing gets through",
             "forward": "mosh has no port forwarding",
             "forward_outage": "mosh has no port forwarding",
             "crowd": CROWD_NA}
    CONNECT = re.compile(rb"MOSH CONNECT (\d+) (\S+)")
    DETACHED = re.compile(rb"detached, pid = (\d+)")

    def missing(self) -> str | None:
        if not (shutil.which("mosh-server") and shutil.which("mosh-client")):
            return "mosh not installed (apt-get install mosh)"
        return None

    def version(self) -> str:
        return _run_version(["mosh-client", "--version"])

    def connect(self, net: Network, extra: tuple = ()) -> Client:
        env = dict(os.environ, **CLIENT_ENV)
        ports = f"{net.udp_ports[0]}:{net.udp_ports[-1]}"  # a second session: the next one
        out = subprocess.run(["mosh-server", "new", "-i", BACK, "-p", ports,
                              "-l", "LANG=C.UTF-8"], capture_output=True, env=env, timeout=15)
        found, pid = self.CONNECT.search(out.stdout), self.DETACHED.search(out.stderr)
        if pid and not found:
            kill_pid(int(pid.group(1)))
        if not (found and pid):
            raise RuntimeError(f"mosh-server did not start: {out.stderr[-400:]!r}")
        term = self._pty(["mosh-client", net.front, found.group(1).decode()],
                         {"MOSH_KEY": found.group(2).decode(),
                          "MOSH_PREDICTION_DISPLAY": self.predict})
        return Client(term, extra_pids=(int(pid.group(1)),))

    def server_pids(self, client: Client | None) -> list[int]:
        return list(client.extra_pids) if client else []  # one mosh-server per session


TOOLS = (Moshpit, OpenSSH, Mosh)


def server_usage(tool: Tool, client: Client | None) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) summed over ``tool.server_pids(client)``."""
    return _sum_usage(tool.server_pids(client))


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (its shared pages divided among their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def pss_total(pids) -> int:
    """Proportional set size (bytes) summed over ``pids``: pages shared between processes
    (a forked session's, the libraries') count once in all, unlike RSS."""
    total = 0
    for pid in pids:
        try:
            total += pss_bytes(pid)
        except OSError:
            continue
    return total


def server_pss(tool: Tool, client: Client | None) -> int:
    return pss_total(tool.server_pids(client))


def server_wakeups(tool: Tool, client: Client | None) -> int:
    return wakeups(tool.server_pids(client))


def wakeups(pids) -> int:
    """Context switches so far, summed over every thread of ``pids``: each time one of
    them woke up (a timer, a packet) and slept again."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    total += sum(int(line.split()[1]) for line in f
                                 if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
            except OSError:
                continue
    return total


def client_usage(client: Client) -> tuple[float, int]:
    return _sum_usage([client.term.pid])


def make_workdir(tool_name: str) -> str:
    """A private temp dir (0700, under root-owned sticky /tmp: safe for strict modes)."""
    return tempfile.mkdtemp(prefix=f"bench-{tool_name}-")
