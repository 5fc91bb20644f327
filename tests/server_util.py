"""A real ``mps.py`` on loopback for tests, with throwaway keys, config, HOME and ports.

Why: the server, client and end-to-end tests all need the same setup -- a host key, a
client identity in an authorized_keys file, a free TCP port, a small UDP port range, a config
file naming them -- and a server process that is certainly stopped (by PID) afterwards::

    with MpsServer(tmp_path) as server:           # started, listening
        ...connect to 127.0.0.1:server.port with server.client_key,
           trusting server.host_key.public...
    # stopped here (SIGTERM, then SIGKILL)

``TestClient`` is a minimal client built from the real handshake and the real client session
core, moshpit_session.ClientSession (no terminal):
``connect()``, ``send()``, ``resize()``, ``read_until()``, ``wait_closed()``, ``resume()``,
``request_end()``, ``attach()`` / ``sessions()`` / ``kill()`` (mp --attach, --list, --kill).

The server runs with ``HOME`` set to a fresh directory and its log at ``server.log_path``
(``server.log()`` reads it, failures show it). ``run_as`` runs it as another user (for the
non-root server tests; the directory must then be one that user can reach).

Sessions are real login shells of the real user (root here): HOME, /etc/profile, utmp and
the rest as for anyone. Only that user's own start-up files (~/.profile, ~/.bashrc, ...) are
kept out, where we may: see ``quiet_shell_startup``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

from proc_util import kill_pid, proc_children, wait_for
from relay import Relay, free_port, random_front_alias

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import moshpit_handshake  # noqa: E402  (needs the repo on sys.path)
import moshpit_keys  # noqa: E402
import moshpit_session  # noqa: E402
import moshpit_transport  # noqa: E402
import moshpit_trust  # noqa: E402

MPS = os.path.join(REPO, "mps.py")
READY_LINE = "listening on"
# The per-user shell start-up files a test server's sessions see replaced by a quiet one.
SHELL_STARTUP_FILES = (".profile", ".bash_profile", ".bash_login", ".bashrc", ".bash_logout")
PRIVATE_MOUNT_NAMESPACE = ("--mount", "--propagation", "private")  # unshare(1)'s flags


@functools.cache
def private_mount_tools() -> Optional[Tuple[str, str]]:
    """The paths of unshare(1) and mount(8) if this process may start programs in a mount
    namespace of their own (root, both installed, a kernel or container that allows it),
    else None: tried once."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if os.geteuid() != 0 or not (unshare and mount):
        return None
    try:
        done = subprocess.run([unshare, *PRIVATE_MOUNT_NAMESPACE, mount, "--bind", "/", "/"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (unshare, mount) if done.returncode == 0 else None


def quiet_shell_startup(command: Sequence[str], directory: str) -> list:
    """``command`` wrapped so that it, and every shell it starts, sees the start-up files
    (SHELL_STARTUP_FILES) of the user running the tests replaced by a quiet one in
    ``directory``, which also sends that shell history to ``directory``.

    Why: those files are the developer's own configuration, not moshpit's, and can be costly:
    on our machines root's ~/.bashrc runs ``pyenv init`` and ``pyenv virtualenv-init`` (a
    hook at every prompt), so each login shell took about 0.12 s of CPU against a few ms, over
    the hundreds of sessions of a test run; and the sessions' history landed in the
    developer's ~/.bash_history. The shells stay real login shells of the real user, with
    the real HOME, /etc/profile and utmp records: only what the user's own dotfiles would
    add is gone, and only in a private mount namespace (unshare(1), bind mounts) that ends
    with the server; nothing on the machine changes. Where that is not allowed (not root, no
    unshare, a container without the right), ``command`` is returned as it is and the
    sessions read the real files, as a login over ssh would.
    """
    home = pwd.getpwuid(os.geteuid()).pw_dir
    targets = [os.path.join(home, name) for name in SHELL_STARTUP_FILES
               if os.path.isfile(os.path.join(home, name))]
    tools = private_mount_tools()
    if not targets or tools is None:
        return list(command)
    unshare, mount = tools
    quiet = os.path.join(directory, "quiet_shell_startup")
    with open(quiet, "w") as f:
        f.write(f"# Read by this test server's sessions instead of {home}'s own start-up "
                f"files (tests/server_util.py: quiet_shell_startup).\n"
                f"HISTFILE={shlex.quote(os.path.join(directory, 'shell_history'))}\n")
    mounts = "".join(f"{shlex.quote(mount)} --bind {shlex.quote(quiet)} {shlex.quote(target)} && "
                     for target in targets)
    return [unshare, *PRIVATE_MOUNT_NAMESPACE, "/bin/sh", "-c", mounts + 'exec "$@"', "sh",
            *command]


def make_key(path: str, comment: str, replace: bool = False) -> moshpit_keys.PrivateKey:
    """A new unencrypted Ed25519 key pair at ``path`` and ``path.pub`` (``replace``: over an
    existing pair, as a test that swaps a server's host key needs)."""
    key = moshpit_keys.PrivateKey.generate(comment=comment)
    moshpit_keys.save_private_key(path, key, overwrite=replace)
    moshpit_keys.save_public_key(path + ".pub", key.public, overwrite=replace)
    return key


def write_authorized_keys(path: str, *keys: moshpit_keys.PublicKey,
                          owner: Optional[pwd.struct_passwd] = None) -> None:
    """An authorized_keys file (0600, parent 0700) holding ``keys``, owned by ``owner``."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(key.to_line() + "\n" for key in keys)
    os.chmod(path, 0o600)
    if owner is not None:
        os.chown(os.path.dirname(path), owner.pw_uid, owner.pw_gid)
        os.chown(path, owner.pw_uid, owner.pw_gid)


def free_port_range(count: int, kind: int = socket.SOCK_DGRAM) -> tuple:
    """``count`` consecutive ports on 127.0.0.1, free now and claimed for this test
    (relay.free_port): (first, last)."""
    first = free_port("127.0.0.1", "tcp" if kind == socket.SOCK_STREAM else "udp",
                      count=count)
    return first, first + count - 1


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class MpsServer:
    """One ``mps.py`` process with its own directory (keys, config, HOME, log).

    ``settings`` are extra dotted config keys for the file (``{"mps.max_sessions": 2}``);
    ``udp_ports`` is the size of the UDP range (one port: one session at a time).
    ``authorized_keys_file=False`` leaves ``mps.authorized_keys_file`` unset, so each target
    user's own ~/.mp/authorized_keys is consulted. ``env`` adds environment variables,
    ``args`` command-line flags. ``start=False`` only prepares (call ``start()``).
    ``program`` is what ``python`` runs: mps.py, or e.g. ``[pyz, "mps"]`` for the bundle.
    """

    def __init__(self, base_dir, *, ip: str = "127.0.0.1", udp_ports: int = 1,
                 settings: Optional[Dict[str, object]] = None, args: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None, authorized_keys_file: bool = True,
                 run_as: Optional[pwd.struct_passwd] = None, python: str = sys.executable,
                 program: Sequence[str] = (MPS,), start: bool = True,
                 ready_timeout: float = 20.0):
        self.dir = os.path.join(os.fspath(base_dir), "mps")
        os.makedirs(self.dir, mode=0o700)
        self.home = os.path.join(self.dir, "home")
        os.makedirs(self.home, mode=0o700)
        self.ip = ip
        self.port = free_port_range(1, socket.SOCK_STREAM)[0]
        self.udp_range = free_port_range(udp_ports)
        self.host_key_path = os.path.join(self.dir, "host_key")
        self.host_key = make_key(self.host_key_path, "test-host")
        self.client_key_path = os.path.join(self.dir, "id_ed25519")
        self.client_key = make_key(self.client_key_path, "test-client")
        self.authorized_keys_path = os.path.join(self.dir, "ak", "authorized_keys")
        write_authorized_keys(self.authorized_keys_path, self.client_key.public)
        self.log_path = os.path.join(self.dir, "mps.log")
        self.stderr_path = os.path.join(self.dir, "mps.stderr")
        self.config_path = os.path.join(self.dir, "moshpits.toml")
        config = {
            "mps.ip": ip, "mps.port": self.port,
            "mps.udp_port_range": "{}-{}".format(*self.udp_range),
            "mps.private_key_path": self.host_key_path,
            "mps.public_key_path": self.host_key_path + ".pub",
            # Stopping does not wait for clients that are gone (most tests leave their
            # sessions open); the tests of the shutdown notice set the real default.
            "mps.shutdown_flush_secs": 0,
            "verbose": 1,
        }
        if authorized_keys_file:
            config["mps.authorized_keys_file"] = self.authorized_keys_path
        config.update(settings or {})
        with open(self.config_path, "w") as f:
            f.writelines(f"{key} = {toml_value(value)}\n" for key, value in config.items())
        self.args = list(args)
        self.env = {"HOME": self.home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    **(env or {})}
        self.run_as = run_as
        self.python = python
        self.program = list(program)
        self.ready_timeout = ready_timeout
        self.proc: Optional[subprocess.Popen] = None
        self._log_start = 0
        self._log_from = 0  # log() starts at this byte: where the current test began (one_test)
        if run_as is not None:
            for root, dirs, files in os.walk(self.dir):
                for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                    os.chown(name, run_as.pw_uid, run_as.pw_gid)
        if start:
            self.start()

    @property
    def udp_port(self) -> int:
        return self.udp_range[0]

    @property
    def serving_pid(self) -> int:
        """The PID of the process that serves (for CPU/memory figures): started as a session
        leader (as here), mps.py forks once and its child serves, so that it can never
        acquire a controlling terminal; ``proc.pid`` only forwards signals and waits."""
        if os.getsid(self.proc.pid) != self.proc.pid:
            return self.proc.pid
        return wait_for(lambda: (proc_children(self.proc.pid, recursive=False) or [0])[0],
                        10, "the serving child of mps.py")

    def command(self) -> list:
        return [self.python, *self.program, "-c", self.config_path, "-t", self.log_path,
                *self.args]

    def _launch_command(self) -> list:
        """``command()`` as started: for a server running as the user running the tests,
        with that user's shell start-up files kept out of its sessions where we may."""
        if self.run_as is not None:
            return self.command()
        return quiet_shell_startup(self.command(), self.dir)

    def start(self, wait: bool = True) -> MpsServer:
        identity = {}
        if self.run_as is not None:
            identity = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid,
                        "extra_groups": []}
        self._log_start = len(self.log())  # a restart must not count the last run's lines
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self._launch_command(), env=self.env, cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True, **identity)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mps.py exited with {self.proc.returncode} before "
                                   f"listening: {self.stderr()}{self.log()}")
            return READY_LINE in self.log()[self._log_start:]
        wait_for(ready, self.ready_timeout, "mps.py to listen")

    def log(self) -> str:
        """The log: of the current test only, on a server shared by several (one_test)."""
        return _read(self.log_path, self._log_from)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the server log; returns the log."""
        wait_for(lambda: text in self.log(), timeout, f"{text!r} in the mps log")
        return self.log()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit status. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_pid(self.proc.pid, 1.0)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left in its group
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait(5)

    @contextlib.contextmanager
    def one_test(self) -> Iterator[MpsServer]:
        """One test's turn on a server that several tests share (``shared_server``): it
        starts on a running server with no sessions, only the client key authorized and
        ``log()`` showing its own lines; after it, the sessions it left are ended."""
        if self.proc.poll() is not None:  # stopped or crashed during an earlier test
            self.start()
        write_authorized_keys(self.authorized_keys_path, self.client_key.public)
        self._log_from = _size(self.log_path)
        yield self
        try:
            self.end_sessions()
        except Exception:
            self.stop()  # the next test gets a fresh one
            raise

    def end_sessions(self, timeout: float = 15.0) -> None:
        """End every session of the client key's user (as ``mp --kill`` does) and wait until
        the listener has logged each one's end: no line of theirs comes after."""
        if self.proc.poll() is not None:
            return
        write_authorized_keys(self.authorized_keys_path, self.client_key.public)  # ours again
        lister = TestClient.for_server(self)
        for info in lister.sessions():
            try:
                lister.kill(info.session_id)
            except moshpit_handshake.AuthRefused:
                pass  # it was ending anyway
        wait_for(lambda: not self._sessions_not_ended(), timeout,
                 "the sessions left by the test to end")

    def _sessions_not_ended(self) -> set:
        """Names of the sessions this test's log shows started and not yet ended (the
        listener's last line about a session is that its process has ended; the sessions
        of the tests before had all ended when this one began)."""
        log = self.log()
        return (set(re.findall(r"session (\S+) started for ", log))
                - set(re.findall(r"session (\S+) of \S+: its process \d+ has ended", log)))

    def __enter__(self) -> MpsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def shared_server(name: str = "server", **server_kwargs):
    """A fixture ``name``: an MpsServer(**server_kwargs) shared, on each test worker, by
    every test that asks for a server made with the same arguments (in any module), each
    test having it to itself as ``MpsServer.one_test`` says.

    Why: a server start costs about 0.35 s of CPU (two Python programs, mps.py and its
    spawner), and most tests only need a working server. A test that stops, restarts or
    reconfigures the server is marked ``own_server`` and gets a fresh one of its own, as
    before. Assign the result to ``name`` in the test module (pytest finds fixtures by
    module attribute)::

        server = shared_server(udp_ports=4)
    """
    import pytest  # here: the bench and the demo use this module without pytest

    @pytest.fixture(name=name)
    def fixture(request, worker_shared, tmp_path_factory):
        if request.node.get_closest_marker("own_server") is not None:
            with MpsServer(request.getfixturevalue("tmp_path"), **server_kwargs) as server:
                yield server
            return
        server = worker_shared.get(f"MpsServer {sorted(server_kwargs.items())!r}",
                                   lambda: MpsServer(tmp_path_factory.mktemp("shared-server"),
                                                     **server_kwargs))
        with server.one_test():
            yield server
    return fixture


def _read(path: str, offset: int = 0) -> str:
    """The file's text from byte ``offset`` on ("" if there is no file)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def relay_in_front(server: MpsServer, **options) -> Relay:
    """A relay.Relay (start it with ``with``) on a random loopback alias (``relay.front``)
    in front of ``server``'s TCP port and its first UDP port; ``options`` as Relay's."""
    return Relay(front=random_front_alias(), back="127.0.0.1", tcp_ports=[server.port],
                 udp_ports=[server.udp_port], **options)


def run_mps(args: Sequence[str], env: Dict[str, str], timeout: float = 20.0,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run mps.py to completion (for the CLI error paths): output as text."""
    return subprocess.run([sys.executable, MPS, *args], env=env, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)



class TestClient:
    """A minimal moshpit client for tests: moshpit_handshake.client_handshake plus mp's own
    session core (moshpit_session.ClientSession) on a UdpLink, driven by ``pump()``; no
    terminal, no reconnect logic of its own (``resume()`` does one resume handshake when a
    test asks for it).

    Everything the server sent is in ``output``; ``read_until`` consumes it from ``pos``.
    ``exit_status`` / ``shutdown_reason`` are set when the session ends.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, host: str, port: int, identity: moshpit_keys.PrivateKey,
                 host_key: moshpit_keys.PublicKey, user: Optional[str] = None,
                 term: str = "xterm", rows: int = 24, cols: int = 80,
                 env: Optional[Dict[str, str]] = None, forward_agent: bool = False):
        self.host, self.port = host, port
        self.forward_agent = forward_agent  # mp -A
        self.identity = identity
        self.host_key = host_key
        self.user = user or pwd.getpwuid(os.geteuid()).pw_name
        self.term, self.rows, self.cols = term, rows, cols
        self.env = env or {}
        self.output = bytearray()
        self.pos = 0
        self.exit_status: Optional[int] = None
        self.shutdown_reason: Optional[str] = None
        self.grant = None
        self.keys = None
        self.repaints: list = []  # REPAINT bodies (also written to ``output``)
        self.events: list = []  # the core's other events (echo acks, tty modes), in order
        self.core: Optional[moshpit_session.ClientSession] = None
        self.link: Optional[moshpit_transport.UdpLink] = None

    @classmethod
    def for_server(cls, server: MpsServer, **kwargs) -> TestClient:
        host = kwargs.pop("host", "::1" if server.ip == "::1" else "127.0.0.1")
        return cls(host, server.port, kwargs.pop("identity", server.client_key),
                   server.host_key.public, **kwargs)

    def _verify(self, key: moshpit_keys.PublicKey) -> None:
        if key != self.host_key:
            raise moshpit_trust.HostKeyError(f"unexpected host key {key.fingerprint()}")

    def _handshake(self, resume: bool, timeout: float, end_session: bool = False,
                   identity: Optional[moshpit_keys.PrivateKey] = None,
                   resume_secret: Optional[bytes] = None, intent: int = 0,
                   session_id: Optional[bytes] = None):
        request = moshpit_handshake.ClientRequest(
            user=self.user, term=self.term, rows=self.rows, cols=self.cols, env=self.env,
            end_session=end_session, intent=intent, resume_session_id=session_id,
            forward_agent=self.forward_agent)
        if resume:
            session_id, secret, recv_offset = self.core.resume_request()
            request.resume_session_id = session_id
            request.resume_secret = resume_secret or secret
            request.resume_recv_offset = recv_offset
        return moshpit_handshake.client_handshake(self.host, self.port, identity or self.identity,
                                                  request, self._verify, timeout=timeout)

    def connect(self, timeout: float = 15.0) -> TestClient:
        """New session (raises the handshake's AuthRefused/HandshakeError)."""
        return self._start(self._handshake(False, timeout))

    def attach(self, session_id: bytes, timeout: float = 15.0) -> TestClient:
        """Take ``session_id`` over (mp --attach): its screen comes first, as a REPAINT."""
        return self._start(self._handshake(False, timeout, intent=moshpit_handshake.TAKE_OVER,
                                           session_id=session_id), attaching=True)

    def sessions(self, timeout: float = 15.0) -> list:
        """The user's sessions (mp --list): SessionInfo, most recently active first."""
        return self._handshake(False, timeout, intent=moshpit_handshake.LIST).grant.sessions

    def kill(self, session_id: bytes, timeout: float = 15.0):
        """End ``session_id`` (mp --kill); returns the ClientResult."""
        return self._handshake(False, timeout, intent=moshpit_handshake.KILL,
                               session_id=session_id)

    def _start(self, result, attaching: bool = False) -> TestClient:
        self.grant, self.keys = result.grant, result.keys
        peer = (result.server_addr[0], result.grant.udp_port)
        self.core = moshpit_session.ClientSession(
            result.keys, time.monotonic(), peer, result.grant.session_id,
            result.grant.resume_secret, (self.rows, self.cols), attaching=attaching)
        self._bind(peer)
        self.link.flush(time.monotonic())
        return self

    def _bind(self, peer: tuple) -> None:
        self.link = moshpit_transport.UdpLink.bind(
            self.core, "::1" if ":" in peer[0] else "127.0.0.1")

    def resume(self, timeout: float = 15.0) -> None:
        """Re-attach from a new local UDP port (like a client after an outage)."""
        result = self._handshake(True, timeout)
        self.grant, self.keys = result.grant, result.keys
        peer = (result.server_addr[0], result.grant.udp_port)
        if self.link is None:
            self._bind(peer)
        else:
            self.link.hop_port()
        self.core.resumed(result.keys, result.grant.recv_offset, result.grant.resume_secret,
                          peer, time.monotonic())
        self.link.flush(time.monotonic())

    def request_end(self, identity: Optional[moshpit_keys.PrivateKey] = None,
                    resume_secret: Optional[bytes] = None, timeout: float = 15.0):
        """The quit request over TCP (what mp.py sends when UDP cannot carry its goodbye);
        another ``identity`` or ``resume_secret`` plays someone who is not the owner.
        Returns the ClientResult; raises the handshake's AuthRefused/HandshakeError."""
        return self._handshake(True, timeout, end_session=True, identity=identity,
                               resume_secret=resume_secret)

    def send(self, data: Union[bytes, str]) -> None:
        self.core.send_input(data.encode() if isinstance(data, str) else data)
        self.link.flush(time.monotonic())

    def resize(self, rows: int, cols: int) -> None:
        self.core.resize(rows, cols)
        self.link.flush(time.monotonic())

    def quit(self) -> None:
        """What Ctrl-^ . does: tell the server, flush briefly."""
        self.core.quit("client quit")
        deadline = time.monotonic() + 2.0
        while not self.core.all_acked() and time.monotonic() < deadline:
            self.pump(0.05)

    def pump(self, timeout: float) -> None:
        """One round: wait up to ``timeout`` for datagrams or timers, handle, send."""
        now = time.monotonic()
        link_timeout = self.link.timeout(now)
        wait = timeout if link_timeout is None else min(timeout, link_timeout)
        ready, _, _ = select.select([self.link], [], [], max(0.0, wait))
        now = time.monotonic()
        if ready:
            self.link.handle_readable(now)
        while True:
            event = self.core.next_event()
            if event is None:
                break
            if isinstance(event, moshpit_session.OutputReceived):
                self.output += event.data
            elif isinstance(event, moshpit_session.RepaintReceived):
                self.repaints.append(event.screen)
                self.output += event.screen
            elif isinstance(event, moshpit_session.SessionExited):
                self.exit_status = event.exit_status
            elif isinstance(event, moshpit_session.ShutdownReceived):
                self.shutdown_reason = event.reason
            else:
                self.events.append(event)
        self.link.flush(now)

    def pump_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())

    def read_until(self, pattern: Union[bytes, str, re.Pattern[bytes]],
                   timeout: float = 15.0) -> bytes:
        """Output from ``pos`` up to the end of the first match (consumed); TimeoutError
        with the output tail otherwise."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.pos)
            if match:
                out = bytes(self.output[self.pos:match.end()])
                self.pos = match.end()
                return out
            if time.monotonic() >= deadline or self.ended:
                raise TimeoutError(f"no {pattern!r} within {timeout:g}s (ended: "
                                   f"{self.exit_status}, {self.shutdown_reason}); output "
                                   f"tail: {bytes(self.output[-600:])!r}")
            self.pump(min(0.5, deadline - time.monotonic()))

    def run(self, command: str, timeout: float = 15.0) -> str:
        """Type ``command`` into the shell and return its output (text between markers that
        only the command's output, not the echoed command line, contains)."""
        tag = f"{random.randrange(10**8):08d}"
        self.send(f"echo S{tag}$((1)); {command}; echo E{tag}$((1))\n")
        self.read_until(f"S{tag}1", timeout)
        body = self.read_until(f"E{tag}1", timeout)
        return body[:-len(f"E{tag}1")].decode("utf-8", "replace").replace("\r\n", "\n").strip()

    @property
    def ended(self) -> bool:
        return self.exit_status is not None or self.shutdown_reason is not None

    def wait_closed(self, timeout: float = 15.0) -> int:
        """The shell's exit status as the server reports it."""
        deadline = time.monotonic() + timeout
        while self.exit_status is None:
            if time.monotonic() >= deadline or self.shutdown_reason is not None:
                raise TimeoutError(f"session not closed within {timeout:g}s (shutdown: "
                                   f"{self.shutdown_reason}); output tail: "
                                   f"{bytes(self.output[-600:])!r}")
            self.pump(min(0.5, deadline - time.monotonic()))
        self.pump_for(0.1)  # let the final ack go out
        return self.exit_status

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
