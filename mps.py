#!/usr/bin/env python3
"""mps: the moshpit server.

Listens for TCP handshakes, then runs each login as a session: the target user's login shell
on a real PTY, and a UDP socket carrying the encrypted terminal stream. Sessions outlive the
network: a client that goes silent is re-attached by a resume handshake with exact stream
continuation. Run as root it serves every user (switching to them before running anything);
run as a plain user it serves only that user.

    python3 mps.py --generate-host-key -e   # first start: make ~/.mp/mps_host_ed25519_key
    python3 mps.py -c /etc/moshpits/moshpits.toml -t /var/log/moshpits.log

Layout of this file (protocol logic lives in the moshpit* modules; the session rules in
moshpit_session.ServerSession):
    PTY shells -> sessions (one thread + select loop each) -> session processes (spawner,
    session control, the listener's handles) -> server (listener, handshake threads,
    registry, signals) -> one-session server (mp --ssh) -> CLI.

Processes (README "Process model"): the listener runs handshakes and decides; a spawner
(exec'd at start: it never holds the host key) forks one session process per login, which
becomes the user before it touches the network or the PTY and runs a Session below.

Who calls what (the whole resume sequence: moshpit_session's docstring):

1. Server.serve_forever (main thread) accepts TCP connections and hands each to a handshake
   thread (Server._handshake), after the pre-auth admission policy.
2. The handshake thread runs moshpit_handshake.server_handshake, whose ``decide`` hook is
   Server.decide: a new login (Server._new_session: account, slot, UDP port, then
   Server._spawn_session: a session process that starts the shell), a resume
   (Server._resume -> SessionProcess.resume) or a quit request (Server._quit_session ->
   SessionProcess.end_by_client). Those are requests over the session's Unix socket,
   answered by SessionControl (the session process's main thread), which calls the same
   methods of its Session: they post to the session's inbox and wait for its answer.
3. Session._run (the session's own thread, the only one touching its ServerSession and
   PTY): one select loop over the wake-up pipe, the UDP socket and the PTY master; it
   applies inbox messages (ServerSession.resume / end_requested / shutdown), feeds PTY
   output and shell exits to the core, writes InputReceived to the PTY, and ends when
   ``ServerSession.finished(now)`` (the ending rules); the process then exits.
4. The listener's reader thread of that session sees its socket close
   (Server.session_ended: slot, login record); the spawner reports how the process ended
   (Server._process_exited logs a crash). SIGTERM stops the listener alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import errno
import gc
import importlib
import logging
import os
import pwd
import queue
import random
import resource
import secrets
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections import Counter, deque
from typing import Callable, Dict, List, Optional

import moshpit
import moshpit_carrier as carrier
import moshpit_channels
import moshpit_handshake as handshake
import moshpit_ipc
import moshpit_keys as keys
import moshpit_login
import moshpit_session as session_core
import moshpit_term
import moshpit_transport as transport
import moshpit_trust as trust
from moshpit import MoshpitError

log = logging.getLogger("moshpit.server")

# ---------------------------------------------------------------------------
# PTY shells
# ---------------------------------------------------------------------------

USER_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HANGUP_GRACE_SECS = 2.0  # how long a shell may take to exit after SIGHUP before SIGKILL
# The shell starts with every signal at its default, as with sshd: not only those mps
# handles or ignores itself (Python ignores SIGPIPE and SIGXFSZ; the spawner SIGINT and
# SIGHUP) but any mps inherited ignored: `nohup mps &` from a script starts it with SIGINT,
# SIGQUIT and SIGHUP ignored, and a shell inheriting that could not ^C what it runs.
SHELL_DEFAULT_SIGNALS = tuple(sorted(set(signal.valid_signals())
                                     - {signal.SIGKILL, signal.SIGSTOP}))


class ShellError(MoshpitError):
    """The login shell could not be started (bad home, shell missing, privilege drop failed)."""


def login_environment(pw: pwd.struct_passwd, term: str, client_env: Dict[str, str],
                      connection: str, tty_path: str) -> Dict[str, str]:
    """The shell's environment, built from scratch (nothing of the server's leaks in): the
    user's identity, a sane PATH, TERM and LANG/LC_* from the client, and MOSHPIT_CONNECTION
    ("client_ip client_port server_ip server_port").

    SSH_CONNECTION (the same), SSH_CLIENT ("client_ip client_port server_port") and SSH_TTY
    (the PTY's path) are set exactly as sshd sets them: prompts, rc files and tools (tmux,
    screen, "am I remote?" checks) look for them to tell a remote login from a local one."""
    client_ip, client_port, _server_ip, server_port = connection.split()
    env = {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh",
        "PATH": ROOT_PATH if pw.pw_uid == 0 else USER_PATH,
        "TERM": term if moshpit.TERM_NAME_RE.fullmatch(term or "") else "dumb",
        "MOSHPIT_CONNECTION": connection,
        "SSH_CONNECTION": connection,
        "SSH_CLIENT": f"{client_ip} {client_port} {server_port}",
    }
    if tty_path:  # no PTY (a piped command): no SSH_TTY, as sshd
        env["SSH_TTY"] = tty_path
    for name, value in client_env.items():
        if moshpit.is_locale_setting(name, value):
            env[name] = value
    return env


def _close_on_exec_above_stdio() -> None:
    """Mark every descriptor above 2 close-on-exec, so that none reaches the shell (sshd
    closes them all): those that came over SCM_RIGHTS (the session's control, UDP and
    listening sockets) are inheritable, and so may be what PAM modules or NSS opened."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: Python's own descriptors are close-on-exec already
        return
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the directory listdir read, closed since


class ShellProcess:
    """The login shell, started by ``spawn`` (what subprocess.Popen would be, for a child
    it cannot start): ``poll``/``wait``/``kill`` as Popen's."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None

    @classmethod
    def spawn(cls, argv: List[str], executable: str, stdio: tuple, cwd: str,
              env: Dict[str, str], tty_path: str) -> ShellProcess:
        """Start ``executable`` in a new session (setsid) with ``stdio`` as fds 0-2, in
        ``cwd``; with ``tty_path`` fd 0 is that terminal opened anew in the child, which
        makes it the session's controlling terminal (a session leader without one acquires
        the first terminal it opens), and 1 and 2 are copies of it.

        By posix_spawn (vfork and exec in the C library): no Python code runs in the child
        (no preexec_fn), and nothing of this process's memory is copied, which makes the
        shell start in a fraction of a millisecond where a fork of this interpreter takes
        several. The signals the session process handles or ignores are back to their
        defaults in the child, its mask empty. posix_spawn has no chdir action: this
        process moves to ``cwd`` for the call (it must be single-threaded: checked) and
        back. A failure (exec, terminal) is ShellError: no shell."""
        if threading.active_count() != 1:
            raise ShellError("internal error: a shell may only be started by a single-threaded"
                             " session process")
        if tty_path:
            actions = [(os.POSIX_SPAWN_OPEN, 0, tty_path, os.O_RDWR, 0),
                       (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
        else:
            actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
        _close_on_exec_above_stdio()
        try:
            os.chdir(cwd)
            try:
                pid = os.posix_spawn(executable, argv, env, file_actions=actions, setsid=True,
                                     setsigmask=(), setsigdef=SHELL_DEFAULT_SIGNALS)
            finally:
                os.chdir("/")
        except OSError as e:
            raise ShellError(e.strerror or str(e))
        return cls(pid)

    def poll(self) -> Optional[int]:
        """The exit status once reaped (-N: killed by signal N, as Popen), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """Reap the shell; subprocess.TimeoutExpired if it is still running at ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.pid, timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class PtyShell:
    """The target user's login shell (``-bash`` style argv0) on a new PTY; we keep the master.

    With ``command`` the shell runs it instead (``shell -c COMMAND``, argv0 not a login
    shell: sshd's rule). With ``pty`` False there is no terminal: the child's stdin, stdout
    and stderr are one end of a socket pair and ``master_fd`` the other, so bytes pass
    untouched (no CR/LF translation, no echo) and ``close_input`` gives the command EOF;
    its stderr is a pipe of its own (``stderr_fd``), carried apart from stdout.

    Started by a session process that is already the user with ShellProcess.spawn (no
    preexec_fn), on a PTY it opens (so the user owns it), or on ``terminal`` (master,
    slave): one opened while root for PAM_TTY and given to the user
    (moshpit_login.open_user_terminal). The login record
    (utmp/wtmp/lastlog) is the listener's: it is root; ``logout`` is called once the shell
    is gone, so the listener closes the record while the session may still linger.
    """

    def __init__(self, pw: pwd.struct_passwd, term: str, rows: int, cols: int,
                 client_env: Dict[str, str], connection: str, command: Optional[str] = None,
                 pty: bool = True, agent_sock: Optional[str] = None,
                 pam_env: Optional[Dict[str, str]] = None,
                 terminal: Optional[tuple] = None):
        self.user = pw.pw_name
        self.rows, self.cols = rows, cols
        self.is_pty = pty
        shell = pw.pw_shell or "/bin/sh"
        self.shell_name = os.path.basename(shell)
        cwd = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"
        name = os.path.basename(shell)
        argv = ["-" + name] if command is None else [name, "-c", command]
        self.stderr_fd: Optional[int] = None
        err_w = None
        if pty:
            master, slave = terminal or os.openpty()
            self._socket = None
        else:
            self._socket, child_end = socket.socketpair()
            master, slave = self._socket.fileno(), child_end.detach()
            self.stderr_fd, err_w = os.pipe()
        try:
            tty_path = os.ttyname(slave) if pty else ""
            env = login_environment(pw, term, client_env, connection, tty_path)
            if agent_sock:  # --- forwarding: -A (moshpit_channels.AgentSocketDir) ---
                env["SSH_AUTH_SOCK"] = agent_sock
            for name, value in (pam_env or {}).items():  # XDG_RUNTIME_DIR, pam_env's
                env.setdefault(name, value)
            if pty:
                moshpit.set_winsize(master, rows, cols)
            self.proc = ShellProcess.spawn(
                argv, shell, (slave, slave, slave if pty else err_w), cwd, env, tty_path)
        except (OSError, ShellError) as e:
            self._close_master(master)
            self.close_stderr()
            raise ShellError(f"cannot start login shell {shell} for {pw.pw_name}: {e}")
        finally:
            os.close(slave)
            if err_w is not None:
                os.close(err_w)
        os.set_blocking(master, False)
        if self.stderr_fd is not None:
            os.set_blocking(self.stderr_fd, False)
        self.master_fd: Optional[int] = master
        self.pid = self.proc.pid
        self.tty_path = tty_path
        self.logout: Callable[[], None] = lambda: None  # --- login records: the listener's

    def _close_master(self, master: int) -> None:
        if self._socket is not None:
            self._socket.close()
        else:
            os.close(master)

    def read_stderr(self, size: int) -> Optional[bytes]:
        """The command's stderr (no PTY): bytes; None if nothing is ready; b"" at its end."""
        try:
            return os.read(self.stderr_fd, size)
        except BlockingIOError:
            return None

    def close_stderr(self) -> None:
        if self.stderr_fd is not None:
            os.close(self.stderr_fd)
            self.stderr_fd = None

    def close_input(self) -> None:
        """The client's input ended: the command reads EOF (no PTY only; on a terminal
        end of input is a key, which the client sends as it is)."""
        if self._socket is not None and self.master_fd is not None:
            try:
                self._socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the command is gone already

    def resize(self, rows: int, cols: int) -> None:
        """New window size; the kernel sends SIGWINCH to the terminal's foreground group."""
        if self.is_pty and self.master_fd is not None and rows > 0 and cols > 0:
            moshpit.set_winsize(self.master_fd, rows, cols)
            self.rows, self.cols = rows, cols

    def command_name(self) -> str:
        """The name of the terminal's foreground program (what mp --list shows when it
        set no title): the shell, or what the shell runs."""
        try:
            with open(f"/proc/{os.tcgetpgrp(self.master_fd)}/comm", encoding="utf-8",
                      errors="replace") as comm:
                return comm.read().strip() or self.shell_name
        except (OSError, TypeError):  # no /proc, the group just ended, the PTY closed
            return self.shell_name

    def read(self, size: int) -> Optional[bytes]:
        """Output of the shell: bytes; None if nothing is ready; b"" once every process has
        closed the terminal (Linux reports that as EIO, only after the data is drained)."""
        try:
            return os.read(self.master_fd, size)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise

    def write(self, data: bytes) -> int:
        """Input for the shell, without blocking: how many bytes were taken (all of them once
        the terminal is gone: nobody will read them)."""
        try:
            return os.write(self.master_fd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EIO, errno.EPIPE):  # EPIPE: the command closed its input
                return len(data)
            raise

    def tty_mode(self) -> Optional[session_core.TtyMode]:
        """The PTY's input modes (on Linux the master reports the slave's termios), None
        when unknown (no PTY, closed)."""
        if not self.is_pty or self.master_fd is None:
            return None
        try:
            attrs = termios.tcgetattr(self.master_fd)
        except termios.error:
            return None
        erase = attrs[6][termios.VERASE]
        return session_core.TtyMode(bool(attrs[3] & termios.ICANON),
                                    bool(attrs[3] & termios.ECHO),
                                    erase[0] if isinstance(erase, bytes) else erase)

    def poll(self) -> Optional[int]:
        """The shell's exit status once it has exited (reaped), 128+N if killed by signal N."""
        status = self.proc.poll()
        if status is None:
            return None
        self._logged_out()  # --- login records: the logout (the session may linger) ---
        return 128 - status if status < 0 else status

    def hangup(self) -> None:
        """End the login: SIGHUP (+SIGCONT, as the kernel's hangup does) to the shell's process
        group, close the master, reap the shell (SIGKILL if it ignores the hangup)."""
        if self.proc.poll() is None:  # only while unreaped: the group id cannot be reused
            for sig in (signal.SIGHUP, signal.SIGCONT):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
        # --- login records: the logout, before the master goes (as sshd does): once it is
        # closed another login may get this tty, and a logout written after that login
        # would blank its utmp entry: `who` would not show it.
        self._logged_out()
        if self.master_fd is not None:
            self._close_master(self.master_fd)
            self.master_fd = None
        self.close_stderr()
        try:
            self.proc.wait(timeout=HANGUP_GRACE_SECS)
        except subprocess.TimeoutExpired:
            log.warning("shell %d of %s ignored SIGHUP: killing it", self.pid, self.user)
            self.proc.kill()
            self.proc.wait(HANGUP_GRACE_SECS)

    def _logged_out(self) -> None:
        logout, self.logout = self.logout, lambda: None
        logout()


class NoCommand:
    """mp -N's session (the request's no_command flag): no process at all, not even a shell,
    so no PTY and no login record (as sshd for ssh -N). It stands where a PtyShell would and
    never exits: the session carries forwarded channels until the client quits, the server
    stops or the detached timeout ends it."""

    is_pty = False
    master_fd = stderr_fd = pid = None
    tty_path = ""  # no terminal: no login record

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols

    def resize(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols

    def command_name(self) -> str:
        return "(no command: forwarding only)"

    def poll(self) -> None:
        return None  # nothing runs, so nothing exits

    def tty_mode(self) -> None:
        return None  # no terminal: nothing to predict

    def close_input(self) -> None:
        """Nothing reads the client's input."""

    def hangup(self) -> None:
        """Nothing to hang up."""


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------

PTY_READ_SIZE = 16384
PTY_READS_PER_PASS = 64  # reads of the PTY per loop pass (each gives 4 KiB at most): see _read_pty
PTY_WRITE_SIZE = 65536  # client input handed to the PTY per write (it takes what fits)
WAKE_READ_SIZE = 4096  # wake-up pipe bytes drained per read
ACCEPT_ERROR_PAUSE_SECS = 0.1  # accept() failing (EMFILE): let the backlog wait this long
CHILD_POLL_SECS = 1.0  # the shell is reaped by polling (no SIGCHLD handler across threads)
RESUME_WAIT_SECS = 5.0
MAX_PENDING_INPUT = 1 << 20  # client input held for a shell that is not reading it
# Lines scrolled off the screen sent with a takeover's repaint (they land in the new
# terminal's native scrollback); the model keeps no more (memory, and a cheaper feed).
REPAINT_HISTORY_LINES = 200
# The screen model is fed late (moshpit_term.LateFeed) while output flows, and with whatever
# is left once the loop is idle: feeding each read (or at each ack) would cost twice the CPU
# per MB; it only has to be current for a takeover or a listing, which feed the rest first.
SCREEN_FEED_SECS = 0.05  # the PTY quiet this long: the rest is fed (mp --list's title)
# A client heard within this is listed as attached: it pings every KEEPALIVE_SECS, so two
# missed pings mean it is gone (killed, asleep, off the network).
ATTACHED_SECS = 2 * transport.KEEPALIVE_SECS
REPLACED_SECRETS_KEPT = 4
REPAINT_TOO_LARGE = b"\x1b[0m\x1b[r\x1b[H\x1b[2J"  # a cleared screen in place of the repaint


class SessionBusy(moshpit.MoshpitError):
    """The session thread did not take a request in time: the session lives, but the
    client is told the server is busy (it retries) rather than that its session is gone."""


class _Request:
    """A request handed from a handshake thread to the session thread; answered with the
    session's received-input offset (None: the session ended meanwhile)."""

    def __init__(self):
        self.recv_offset: Optional[int] = None
        self.done = threading.Event()


class _Resume(_Request):
    """Re-attach the client under new keys; resend our output from ``peer_recv_offset``."""

    def __init__(self, keys, peer_recv_offset: int):
        super().__init__()
        self.keys = keys
        self.peer_recv_offset = peer_recv_offset


class _Carrier:
    """The handshake that resumed or started the session leaves its connection as the TCP
    carrier (moshpit_carrier)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock


class _EndRequest(_Request):
    """The session's owner quit and said so over TCP (UDP could not carry it): end it. With
    a ``reason`` (mp --kill), the client holding the session is told it."""

    def __init__(self, reason: Optional[str] = None):
        super().__init__()
        self.reason = reason


class _Describe(_Request):
    """mp --list: the session thread describes the session (``info``), screen up to date."""

    def __init__(self):
        super().__init__()
        self.info: Optional[handshake.SessionInfo] = None


class _TakeOver(_Request):
    """Another client takes the session over (mp --attach): repaint it there, at its size."""

    def __init__(self, keys, rows: int, cols: int, peer: tuple):
        super().__init__()
        self.keys = keys
        self.rows, self.cols = rows, cols
        self.peer = peer


class Session:
    """One login: the shell on its PTY, the session's UDP socket and its session core
    (moshpit_session.ServerSession: the rules), and the thread that runs them in one select
    loop.

    Only the session thread touches the core, the PTY and the screen model (every byte
    the shell writes, for a takeover's repaint); other threads talk to it with
    ``resume()`` / ``take_over()`` / ``describe()`` / ``end_by_client()`` / ``shutdown()``,
    which go through a queue and a wake-up pipe (the resume sequence end to end:
    moshpit_session's docstring).
    """

    def __init__(self, server: Server, session_id: bytes, user: str, client_key,
                 udp_sock: socket.socket, shell: PtyShell, forwarding: Optional[tuple] = None):
        self.server = server
        self.session_id = session_id
        self.resume_secret = secrets.token_bytes(32)
        # Secrets of clients the session was taken from: their resumes are told the session
        # is gone, not refused as a forgery (a bounded few).
        self.replaced_secrets: deque = deque(maxlen=REPLACED_SECRETS_KEPT)
        self.name = session_id[:4].hex()  # enough to follow a session in the log
        self.user = user
        self.client_key = client_key
        self.udp_sock = udp_sock
        self.udp_port = udp_sock.getsockname()[1]
        self.shell = shell
        self.core: Optional[session_core.ServerSession] = None
        self.link = None
        self.thread: Optional[threading.Thread] = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._to_pty = bytearray()  # client input not yet taken by the PTY
        self._shell_status: Optional[int] = None  # set once the shell is reaped
        self.screen = moshpit_term.Terminal(shell.rows, shell.cols, REPAINT_HISTORY_LINES)
        self._unfed = moshpit_term.LateFeed(self.screen)  # PTY output sent, not yet fed
        self._output_at = 0.0  # monotonic time of the latest PTY output
        self.started = time.time()
        self.last_activity = self.started  # wall clock of the latest input or output
        self._eof_pending = False  # the client's stdin hit EOF: close the command's input
        self.reap_on_signal = False  # SIGCHLD wakes the loop: no CHILD_POLL_SECS polling
        self._reap_due = False  # with reap_on_signal: a SIGCHLD came, the shell is polled
        self._carrier_fd = -1  # the TCP carrier's fd as registered with the selector
        # --- forwarding: (ForwardPolicy, AgentSocketDir or None, may bind ports < 1024) ---
        self._forwarding = forwarding
        self.channels: Optional[moshpit_channels.ChannelSockets] = None

    # -- other threads -------------------------------------------------------------------

    def start(self, keys, peer) -> None:
        """The handshake completed: create the session core and run the session thread."""
        self.core = session_core.ServerSession(keys, time.monotonic(),
                                               self.server.detached_timeout,
                                               self.server.unattached_timeout,
                                               self.server.shutdown_flush)
        if self.shell.stderr_fd is not None:
            self.core.expect_stderr()
        self.core.tty_mode(self.shell.tty_mode(), time.monotonic())  # starts the polling
        if self._forwarding is not None:  # --- forwarding: the session's channels ---
            policy, agent_dir, privileged_ports = self._forwarding
            mux = moshpit_channels.ChannelMux(self.core, "server", policy)
            self.channels = moshpit_channels.ChannelSockets(
                mux, lambda text: log.info("session %s: %s", self.name, text),
                privileged_ports=privileged_ports, agent_dir=agent_dir)
        self.link = carrier.CarrierLink(self.core, self.udp_sock)
        self.thread = threading.Thread(target=self._run, name=f"session-{self.name}",
                                       daemon=True)
        self.thread.start()
        log.info("session %s started for %s from %s (udp port %d, shell pid %s)",
                 self.name, self.user, moshpit.format_addr(peer), self.udp_port, self.shell.pid)

    def abandon(self) -> None:
        """The handshake failed after the session was set up: undo it (never started)."""
        if self._forwarding is not None and self._forwarding[1] is not None:
            self._forwarding[1].close()
        self._close_wake()
        self.shell.hangup()
        self.udp_sock.close()

    def attach_carrier(self, sock: socket.socket) -> None:
        """Carry the session over ``sock`` too (handshake thread): the connection whose
        handshake just granted this session; ours to close."""
        if not self._post(_Carrier(sock)):
            sock.close()

    def resume(self, keys, peer_recv_offset: int) -> Optional[int]:
        """Re-attach a client (handshake thread): the session thread rekeys its Connection and
        resends from ``peer_recv_offset``. Returns our received-input offset, or None if the
        session ended meanwhile or did not answer in time."""
        return self._ask(_Resume(keys, peer_recv_offset))

    def take_over(self, keys, rows: int, cols: int, peer: tuple) -> Optional[int]:
        """Move the session to another client (handshake thread): the old one is told, the
        new one gets the screen first. None if the session ended meanwhile."""
        return self._ask(_TakeOver(keys, rows, cols, peer))

    def describe(self) -> Optional[handshake.SessionInfo]:
        """What mp --list shows (handshake thread), None if the session ended meanwhile."""
        request = _Describe()
        self._ask(request)
        return request.info

    def _info(self) -> handshake.SessionInfo:
        core = self.core
        attached = core.client_addr is not None and (
            time.monotonic() - core.conn.last_heard < ATTACHED_SECS)
        return handshake.SessionInfo(
            self.session_id, attached, int(self.started), int(self.last_activity),
            self.shell.rows, self.shell.cols,
            self.screen.title or self.shell.command_name())

    def end_by_client(self, reason: Optional[str] = None) -> Optional[int]:
        """The owner's quit request, or with ``reason`` a kill (handshake thread): the
        session thread hangs up the shell. Returns our received-input offset, or None if
        the session had already ended."""
        return self._ask(_EndRequest(reason))

    def _ask(self, request: _Request) -> Optional[int]:
        """Hand ``request`` to the session thread and wait for its answer. Not taken in
        time (a flood on a loaded machine) is not "ended": SessionBusy."""
        if self._post(request) and not request.done.wait(RESUME_WAIT_SECS):
            raise SessionBusy(f"session {self.name} did not take a request within "
                              f"{RESUME_WAIT_SECS:g} s")
        return request.recv_offset

    def shutdown(self) -> None:
        """The server is stopping: tell the client, hang up the shell (main thread)."""
        self._post("shutdown")

    def shell_may_have_exited(self) -> None:
        """SIGCHLD arrived (a session process has one shell): reap it now. Once this is
        called, the shell is no longer polled: an idle session has no timer at all."""
        self.reap_on_signal = True
        self._post("reap")

    def _post(self, message) -> bool:
        """Queue ``message`` for the session thread; False if the session is over."""
        with self._wake_lock:
            if self._wake_closed:  # the session is over
                if isinstance(message, _Request):
                    message.done.set()
                return False
            self._inbox.put(message)
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # pipe full: already woken
                pass
            return True

    def _close_wake(self) -> None:
        """No more messages: close the wake-up pipe (under the lock: a closed fd number may be
        reused at once) and release handshake threads waiting on a resume."""
        with self._wake_lock:
            self._wake_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        for message in self._posted():
            if isinstance(message, _Request):
                message.done.set()
            elif isinstance(message, _Carrier):
                message.sock.close()

    def _posted(self):
        """Take the messages posted so far, oldest first."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    # -- session thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug must end this session only, loudly
            log.exception("session %s failed", self.name)
        finally:
            self.server.unregister(self)
            self._close_wake()
            self.shell.hangup()
            self.link.close()
            if self.channels is not None:
                self.channels.close()
            log.info("session %s of %s ended (%s)", self.name, self.user,
                     self.core.ending or "error")

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            watched: Dict[str, int] = {}  # what the selector waits for on "udp" and "pty"
            while True:
                now = time.monotonic()
                if self.core.finished(now):
                    return
                for name, fd, events in (("udp", self.link.fileno(), self._udp_interest()),
                                         ("pty", self.shell.master_fd, self._pty_interest()),
                                         ("err", self.shell.stderr_fd, self._err_interest()),
                                         self._carrier_watch()):
                    _watch(sel, watched, name, fd, events)
                if self.channels is not None:
                    self.channels.sync_selector(sel)
                ready = sel.select(self._timeout(now))
                now = time.monotonic()
                if self._unfed.waiting and not ready and now - self._output_at >= SCREEN_FEED_SECS:
                    self._unfed.catch_up()  # output paused: catch up (a flood: in large chunks)
                for key, events in ready:
                    if key.data == moshpit_channels.SELECTOR_TAG:
                        continue  # after the session's events, below
                    if key.data == "wake":
                        self._handle_inbox(now, sel, watched)
                    elif key.data == "udp":
                        self.link.handle_readable(now)
                    elif key.data == "tcp":
                        self._carrier_ready(events, now)
                    elif key.data == "err":
                        self._read_stderr(now, sel, watched)
                    else:
                        if events & selectors.EVENT_WRITE:
                            self._write_pty()
                        if events & selectors.EVENT_READ:
                            self._read_pty(now)
                self._handle_events(now)
                if self.channels is not None:
                    self.channels.handle_selected(ready, now)
                self._check_shell(now)
                self._poll_tty(now)
                self.link.flush(now)

    def _udp_interest(self) -> int:
        # Input the shell is not reading stays unacknowledged in the network instead of
        # piling up here: the client's send window then stops it.
        return selectors.EVENT_READ if len(self._to_pty) < MAX_PENDING_INPUT else 0

    def _carrier_watch(self) -> tuple:
        """("tcp", fd, events) for the selector: read as UDP is read, write when queued;
        nothing once the carrier has closed (the fd it had is then unregistered)."""
        tcp = self.link.carrier
        if tcp is None:
            return ("tcp", self._carrier_fd, 0)
        events = self._udp_interest()
        if tcp.wants_write():
            events |= selectors.EVENT_WRITE
        return ("tcp", self._carrier_fd, events)

    def _carrier_ready(self, events: int, now: float) -> None:
        alive = True
        if events & selectors.EVENT_WRITE:
            alive = self.link.carrier_writable()
        if alive and events & selectors.EVENT_READ:
            self.link.carrier_readable(now)

    def _attach_carrier(self, sock: socket.socket, sel: selectors.BaseSelector,
                        watched: Dict[str, int]) -> None:
        """A new carrier replaces the old one (the client's newest handshake wins)."""
        _watch(sel, watched, "tcp", self._carrier_fd, 0)
        self.link.attach(carrier.TcpCarrier(sock))
        self._carrier_fd = sock.fileno()
        log.info("session %s: TCP carrier attached", self.name)

    def _pty_interest(self) -> int:
        if self.shell.master_fd is None or self.core.ending:
            return 0
        events = 0
        if self.core.may_read_pty():  # back-pressure: DESIGN 6
            events |= selectors.EVENT_READ
        if self._to_pty:
            events |= selectors.EVENT_WRITE
        return events

    def _err_interest(self) -> int:
        if self.shell.stderr_fd is None or not self.core.may_read_stderr():
            return 0
        return selectors.EVENT_READ

    def _read_stderr(self, now: float, sel: selectors.BaseSelector,
                     watched: Dict[str, int]) -> None:
        data = self.shell.read_stderr(PTY_READ_SIZE)
        if data:
            self.core.stderr_output(data, now)
        elif data == b"":
            _watch(sel, watched, "err", self.shell.stderr_fd, 0)  # before the fd is closed
            self.shell.close_stderr()
            self.core.stderr_closed(now)

    def _timeout(self, now: float) -> Optional[float]:
        """Seconds until the core's next deadline, or the next poll of a running shell."""
        wait = self.link.timeout(now)
        polled = self._shell_status is None and not self.reap_on_signal
        for limit in (CHILD_POLL_SECS if polled else None,
                      SCREEN_FEED_SECS if self._unfed.waiting else None,
                      self.channels.timeout(now) if self.channels is not None else None):
            if limit is not None:
                wait = limit if wait is None else min(wait, limit)
        return wait

    def _handle_inbox(self, now: float, sel: selectors.BaseSelector,
                      watched: Dict[str, int]) -> None:
        try:
            while os.read(self._wake_r, WAKE_READ_SIZE):
                pass
        except BlockingIOError:
            pass
        for message in self._posted():
            if isinstance(message, _Resume):
                message.recv_offset = self.core.resume(message.keys, message.peer_recv_offset,
                                                       now)
                message.done.set()
                log.info("session %s resumed (client had %d bytes, we had %d)", self.name,
                         message.peer_recv_offset, message.recv_offset)
            elif isinstance(message, _TakeOver):
                self._take_over(message, now)
            elif isinstance(message, _Describe):
                self._unfed.catch_up()
                message.info = self._info()
                message.done.set()
            elif isinstance(message, _EndRequest):
                if message.reason and not self.core.ending:
                    self.core.shutdown(message.reason, now)
                    message.recv_offset = self.core.recv_offset
                else:
                    message.recv_offset = self.core.end_requested(now)
                message.done.set()
            elif isinstance(message, _Carrier):
                self._attach_carrier(message.sock, sel, watched)
            elif message == "shutdown":
                self.core.shutdown(handshake.SHUTTING_DOWN, now)
            elif message == "reap":
                self._reap_due = True

    def _take_over(self, message: _TakeOver, now: float) -> None:
        """The new client's size first (the application redraws for it after the repaint),
        then the old client's goodbye, then the repaint on a fresh stream."""
        if self.core.ending:
            message.done.set()  # recv_offset None: the session is over
            return
        self._unfed.catch_up()
        self._resize(message.rows, message.cols)
        screen = self._repaint()
        reason = f"session taken over from {moshpit.format_addr(message.peer)}"
        for datagram, addr in self.core.take_over(message.keys, screen, reason, now):
            self.link.send_to(datagram, addr)  # the old client is maybe gone anyway
        if self.link.carrier is not None:
            self.link.carrier_writable()
        message.recv_offset = self.core.recv_offset
        message.done.set()
        log.info("session %s taken over from %s (repaint of %d bytes)", self.name,
                 moshpit.format_addr(message.peer), len(screen))

    def _repaint(self) -> bytes:
        """The screen for a REPAINT record: with some history if it fits, else the screen
        alone, else (a huge, colourful screen) just a cleared one the application redraws
        after the resize."""
        for history in (REPAINT_HISTORY_LINES, 0):
            screen = self.screen.serialize(history)
            if len(screen) <= session_core.MAX_RECORD_BODY:
                return screen
        log.warning("session %s: the screen (%d bytes serialized) is too large to repaint",
                    self.name, len(screen))
        return REPAINT_TOO_LARGE

    def _resize(self, rows: int, cols: int) -> None:
        self._unfed.catch_up()  # the output so far was written for the old size
        self.shell.resize(rows, cols)
        self.screen.resize(rows, cols)


    def _handle_events(self, now: float) -> None:
        while True:
            event = self.core.next_event()
            if event is None:
                return
            if isinstance(event, session_core.InputReceived):
                self._to_pty += event.data
                self.last_activity = time.time()
                self._write_pty()
            elif isinstance(event, session_core.InputEnded):
                self._eof_pending = True  # for the command, after the input still queued
                self._write_pty()
            elif isinstance(event, session_core.ResizeRequested):
                self._resize(event.rows, event.cols)
            elif isinstance(event, session_core.ClientAddressChanged) and not event.first:
                log.info("session %s: client now at %s", self.name, moshpit.format_addr(event.addr))

    def _poll_tty(self, now: float) -> None:
        """The PTY's termios for local echo prediction, when the core asks (while input
        is recent)."""
        if self.core.tty_poll_due(now):
            self.core.tty_mode(self.shell.tty_mode(), now)

    def _write_pty(self) -> None:
        if self._to_pty and self.shell.master_fd is not None:
            taken = self.shell.write(bytes(self._to_pty[:PTY_WRITE_SIZE]))
            del self._to_pty[:taken]
            self.core.input_written(taken, time.monotonic())
        if self._eof_pending and not self._to_pty:
            self._eof_pending = False
            self.shell.close_input()

    def _read_pty(self, now: float) -> None:
        """Read what the shell wrote, a few reads per loop pass while the core still wants
        output: Linux hands a PTY's output over 4 KiB at a time, and one read per pass made
        the pass (select, timers, flush) the cost of every 4 KiB of a flood. 16 reads (64
        KiB, or less once the core's send queue is full) made a 20 MB flood ~15% cheaper
        at both ends than 4 did: fuller GSO batches, fewer passes here and at the client.
        The core is asked once how much it takes and gets the pass's reads in one piece:
        handing over each 4 KiB read (and asking again after it) cost a 20 MB flood ~15%
        more server CPU (user 9.5 ms/MB instead of 7.6). With that, 64 reads a pass took
        ~13% fewer passes than 16 and ~7% less server CPU; most passes still end at an
        empty PTY, and the room the core gives (its send queue: what waits there delays a
        Ctrl-C's prompt) bounds a pass's reads as before."""
        room = self.core.pty_room()
        chunks = []
        data = None
        for _ in range(PTY_READS_PER_PASS):
            data = self.shell.read(PTY_READ_SIZE)
            if not data:
                break
            chunks.append(data)
            room -= len(data)
            if room <= 0:
                break
        if chunks:
            self._pty_output(b"".join(chunks), now)
        if data == b"":
            self.core.pty_closed(now)

    def _pty_output(self, data: bytes, now: float) -> None:
        """Output the shell wrote: to the client, and to the screen model (in large chunks)."""
        self.core.pty_output(data, now)
        if self.shell.is_pty:  # a command's piped bytes are not a screen
            self._unfed.add((data,))
            self._output_at = now
        self.last_activity = time.time()

    def _check_shell(self, now: float) -> None:
        """Reap the shell; the core sends its status after the rest of its output. Polled
        at every loop pass, or once SIGCHLD says so (a waitpid at every pass of a flood
        would be for nothing)."""
        if self._shell_status is not None or self.core.ending:
            return
        if self.reap_on_signal:
            if not self._reap_due:
                return
            self._reap_due = False
        self._shell_status = self.shell.poll()
        if self._shell_status is not None:
            log.info("session %s: shell exited with status %d", self.name, self._shell_status)
            self.core.shell_exited(self._shell_status, now)


def _watch(sel: selectors.BaseSelector, watched: Dict[str, int], name: str, fd: int,
           events: int) -> None:
    """Make ``sel`` wait for ``events`` (0: nothing) on ``fd``, registered as ``name``."""
    old = watched.get(name, 0)
    if events == old:
        return
    if not old:
        sel.register(fd, events, name)
    elif not events:
        sel.unregister(fd)
    else:
        sel.modify(fd, events, name)
    watched[name] = events


# ---------------------------------------------------------------------------
# Session processes: each session in a process of its own, as its user
# ---------------------------------------------------------------------------
#
# The listener (which holds the host key) never runs a session. At start it execs a fresh
# interpreter, the spawner (``mps.py --session-spawner``: it never sees the host key), which
# forks one session process per login; that process becomes the user before it reads a
# packet, opens the PTY, starts the shell and runs the Session above. The listener talks to
# it over a Unix socket (moshpit_ipc messages); a listener started later finds the running
# sessions by their sockets in the sessions directory and claims them. DESIGN terms: README
# "Process model".

RUNTIME_DIR = "/run/moshpit"  # root's; a plain user's is under ~/.config/moshpits
START_WAIT_SECS = 30.0  # a session process waits this long for its start and its go
SPAWN_WAIT_SECS = 10.0  # the listener waits this long for the spawner to fork
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent dies
SPAWN_AHEAD_DELAY_SECS = 0.05  # after a login, the spawner forks the next process this late
CLAIM_WAIT_SECS = 2.0  # a listener at start waits this long for each running session
DESCRIBE_WORKERS = 8  # session processes a listing (or a login's count) asks at once
SESSION_SOCKET_BACKLOG = 4  # listeners and mps --stop-sessions connecting at once
MAX_SOCKET_PATH = 107  # sockaddr_un's sun_path, without its terminating NUL
MPS_PATH = os.path.abspath(__file__)


def own_command(*args: str) -> List[str]:
    """The command that runs this mps again (this file, or the bundle's mps)."""
    bundle = moshpit.bundle_path()
    return [sys.executable, *([bundle, "mps"] if bundle else [MPS_PATH]), *args]


def sessions_dir(config: moshpit.Config) -> str:
    """Where the running sessions of the mps on this port have their sockets: under
    mps.runtime_dir (/run/moshpit for root, ~/.config/moshpits/run otherwise)."""
    base = os.path.expanduser(config["mps.runtime_dir"]) or (
        RUNTIME_DIR if os.geteuid() == 0
        else os.path.join(os.path.dirname(moshpit.default_pid_path(config.home)), "run"))
    return os.path.join(base, f"port-{config['mps.port']}")


FORWARDING_KEYS = ("mps.allow_tcp_forwarding", "mps.permit_open", "mps.allow_agent_forwarding")


def pam_wanted(config: moshpit.Config) -> bool:
    """PAM is used: mps.use_pam and the system has libpam and /etc/pam.d/moshpit."""
    return config["mps.use_pam"] and moshpit_login.pam_available(
        asked=config.source("mps.use_pam") != "default")


def spawner_settings(config: moshpit.Config) -> dict:
    """What each session process needs from the config."""
    return {"detached_timeout": config["mps.detached_session_timeout_secs"],
            "unattached_timeout": config["mps.unattached_session_timeout_secs"],
            "shutdown_flush": config["mps.shutdown_flush_secs"],
            "use_pam": pam_wanted(config),
            "forwarding": {name: config[name] for name in FORWARDING_KEYS}}


def _session_socket_path(directory: str, session_id: bytes) -> str:
    return os.path.join(directory, session_id[:8].hex() + ".sock")


def become_user(pw: pwd.struct_passwd) -> None:
    """(Session process, root.) Irrevocably become ``pw``: the audit login uid first (it can
    be written only before), then the groups, and gid and uid each as real, effective and
    saved id, so nothing can switch back; at that uid change the kernel drops every
    capability. Checked: MoshpitError if root could still be regained."""
    moshpit_login.write_loginuid(pw.pw_uid)
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    if pw.pw_uid == 0:
        return
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise MoshpitError(f"privilege drop to {pw.pw_name} failed: root could be regained")


def _keys_message(session_keys) -> dict:
    return dataclasses.asdict(session_keys)


def _keys_from(message: dict):
    return handshake.SessionKeys(**message["keys"])


class _SessionHost:
    """What a Session asks of its server, inside a session process: the timeouts, and
    ``unregister`` at its end, which wakes the control loop so that the process exits."""

    def __init__(self, settings: dict):
        self.detached_timeout = settings["detached_timeout"]
        self.unattached_timeout = settings["unattached_timeout"]
        self.shutdown_flush = settings["shutdown_flush"]
        self.ended_r, self.ended_w = os.pipe()

    def unregister(self, session: Session) -> None:
        os.write(self.ended_w, b"\0")


class SessionControl:
    """(Session process, main thread, once the session thread runs.) Answers the listeners'
    requests by calling the Session's methods (which post to its inbox and wait for the
    session thread), and tells the listener that claimed the session last when the shell
    has logged out. Connections come on the session's own socket (a listener started after
    a restart, mps --stop-sessions) and are served only from root or the listener's uid
    (SO_PEERCRED). SIGTERM ends the session as a server shutdown would (the client is
    told)."""

    def __init__(self, session: Session, host: _SessionHost, listen_sock: socket.socket,
                 channel: moshpit_ipc.Channel, listener_uid: int, client_address: str,
                 signal_fd: int):
        self.session = session
        self.signal_fd = signal_fd
        self.host = host
        self.listen_sock = listen_sock
        self.owner: Optional[moshpit_ipc.Channel] = channel
        self.allowed_uids = {0, listener_uid}
        self.client_address = client_address
        self.logged_out = False
        self.shell_exit: dict = {}  # how the shell ended, once it has: shell_exit_report
        # The relay of this process's log records (None where logging is the process's own).
        self.log_sender = moshpit_ipc.LogSender.installed()

    def logged_out_now(self) -> None:
        """(Session thread.) The shell is gone: the listener closes the login record and
        notes how the shell ended (a listener that claimed the session after a restart is
        not its parent: it learns the status only so)."""
        self.shell_exit = shell_exit_report(getattr(self.session.shell, "proc", None))
        self.logged_out = True
        owner = self.owner
        if owner is not None:
            try:
                owner.send(dict(self.shell_exit, op="logout"))
            except OSError:
                pass  # the listener is gone: its successor reads ``logged_out`` at its claim

    def run(self) -> None:
        self.session.shell_may_have_exited()  # a SIGCHLD may have come before this loop
        with selectors.DefaultSelector() as sel:
            sel.register(self.listen_sock, selectors.EVENT_READ, "accept")
            sel.register(self.host.ended_r, selectors.EVENT_READ, "ended")
            sel.register(self.signal_fd, selectors.EVENT_READ, "signal")
            sel.register(self.owner.sock, selectors.EVENT_READ, self.owner)
            if self.owner.pending:  # read along with "go" (the carrier, say)
                self._serve(sel, self.owner)
            while True:
                for key, _ in sel.select():
                    if key.data == "ended":
                        return
                    if key.data == "signal":
                        self._on_signals(os.read(self.signal_fd, WAKE_READ_SIZE))
                    elif key.data == "accept":
                        self._accept(sel)
                    else:
                        self._serve(sel, key.data)

    def _on_signals(self, signals: bytes) -> None:
        if signal.SIGCHLD in signals:
            self.session.shell_may_have_exited()
        if signal.SIGTERM in signals:
            log.info("session %s: SIGTERM received: ending it", self.session.name)
            self.session.shutdown()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            sock, _ = self.listen_sock.accept()
        except OSError:
            return
        _, uid, _ = moshpit_ipc.peer_credentials(sock)
        if uid not in self.allowed_uids:
            log.warning("session %s: refused a control connection from uid %d",
                        self.session.name, uid)
            sock.close()
            return
        sock.settimeout(RESUME_WAIT_SECS)
        channel = moshpit_ipc.Channel(sock, accept_fds=True)
        sel.register(sock, selectors.EVENT_READ, channel)

    def _serve(self, sel: selectors.BaseSelector, channel: moshpit_ipc.Channel) -> None:
        """Answer what ``channel`` says: one read from its socket, then every message that
        read brought along (the listener sends "go" and "carrier" back to back: one read
        may hold both, and select signals the socket only once)."""
        try:
            while True:
                message = channel.receive()
                if message is None:
                    break
                try:
                    reply = self._answer(channel, message)
                except SessionBusy as busy:
                    log.warning("%s", busy)
                    reply = {"busy": True}
                if reply is not None:
                    channel.send(dict(reply, op="reply", id=message.get("id")))
                if message.get("op") == "claim" and message.get("logs") is True:
                    _relay_log_to(channel)  # after the claim's answer, as it expects
                if not channel.pending:
                    return
        except (OSError, moshpit_ipc.IpcError, KeyError, TypeError, ValueError) as e:
            log.warning("session %s: control connection dropped: %s", self.session.name, e)
        sel.unregister(channel.sock)
        if self.log_sender is not None:
            self.log_sender.detach(channel)
        channel.close()
        if channel is self.owner:
            self.owner = None

    def _answer(self, channel: moshpit_ipc.Channel, message: dict) -> Optional[dict]:
        session, op = self.session, message.get("op")
        if op == "claim":
            self.owner = channel
            return self.state()
        if op == "resume":
            return {"recv_offset": session.resume(_keys_from(message),
                                                  int(message["peer_recv_offset"]))}
        if op == "take_over":
            session.replaced_secrets.append(session.resume_secret)
            session.resume_secret = message["resume_secret"]
            session.client_key = keys.PublicKey.from_line(message["client_key"])
            return {"recv_offset": session.take_over(
                _keys_from(message), int(message["rows"]), int(message["cols"]),
                tuple(message["peer"]))}
        if op == "describe":
            info = session.describe()
            return {"info": None if info is None else dataclasses.asdict(info)}
        if op == "end":
            return {"recv_offset": session.end_by_client(message.get("reason"))}
        if op == "shutdown":
            session.shutdown()
            return {}
        if op == "carrier":  # no answer: the listener does not wait for it
            fd = channel.take_fd()
            if fd is not None:
                session.attach_carrier(socket.socket(fileno=fd))
            return None
        raise ValueError(f"unknown request {op!r}")

    def state(self) -> dict:
        """What a listener needs to serve the session (its claim's answer)."""
        session = self.session
        return {"ipc_version": moshpit_ipc.IPC_VERSION,
                "session_id": session.session_id, "user": session.user,
                "client_key": session.client_key.to_line(),
                "resume_secret": session.resume_secret,
                "replaced_secrets": list(session.replaced_secrets),
                "udp_port": session.udp_port, "pid": os.getpid(),
                "shell_pid": session.shell.pid, "tty": session.shell.tty_path,
                "client_address": self.client_address, "logged_out": self.logged_out,
                "shell_exit": self.shell_exit}


def shell_exit_report(proc) -> dict:
    """How a reaped shell ended, for the listener: {"status": N} or {"signal": N}; {} if it
    is unknown (mp -N has no shell; not reaped)."""
    code = getattr(proc, "returncode", None)
    if code is None:
        return {}
    return {"signal": -code} if code < 0 else {"status": code}


def reported_exit(report: dict) -> Optional[tuple]:
    """(signal, status) from a session process's shell_exit_report, one of them 0; None if
    it is unknown or malformed (the report is not trusted)."""
    status, sig = report.get("status"), report.get("signal")
    if type(status) is int and 0 <= status <= 255:
        return 0, status
    if type(sig) is int and 0 < sig < 128:
        return sig, 0
    return None


def describe_shell_exit(report: dict) -> str:
    """The log's words for a session process's shell_exit_report."""
    if report.get("no_command"):
        return "it ran no command (mp -N)"
    ended = reported_exit(report)
    if ended is None:
        return "its shell's exit status is unknown"
    sig, status = ended
    if not sig:
        return f"its shell exited with status {status}"
    try:
        return f"its shell was killed by {signal.Signals(sig).name}"
    except ValueError:
        return f"its shell was killed by signal {sig}"


def _note_signal(signum, frame) -> None:
    """A signal handler that does nothing: the wake-up fd (signal.set_wakeup_fd) tells."""


def run_session_process(fds: List[int], settings: dict) -> int:
    """(A fresh fork of the spawner.) Receive the login from the listener, become the user,
    start the shell, answer with its pid and terminal, then (once the handshake completed)
    run the session; the exit status of the process."""
    ctl_fd, udp_fd, listen_fd = fds
    channel = moshpit_ipc.Channel(socket.socket(fileno=ctl_fd), accept_fds=True)
    udp_sock = socket.socket(fileno=udp_fd)
    listen_sock = socket.socket(fileno=listen_fd)
    channel.sock.settimeout(START_WAIT_SECS)
    start = channel.receive()
    if start is None:
        return 1
    pw = pwd.getpwnam(start["user"])
    # Signals come to the control loop through a pipe (set before the shell starts, so
    # its SIGCHLD cannot be missed): SIGCHLD reaps the shell, SIGTERM ends the session.
    signal_r, signal_w = os.pipe()
    os.set_blocking(signal_w, False)
    signal.set_wakeup_fd(signal_w)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, _note_signal)
    pam = None
    pam_env: Dict[str, str] = {}
    forwarding = terminal = monitor = None
    try:
        if os.geteuid() == 0:
            if settings["use_pam"]:  # --- PAM session: as root, before the uid change ---
                if start["pty"] and not start["no_command"]:
                    terminal = moshpit_login.open_user_terminal(pw)  # for PAM_TTY
                pam = moshpit_login.PamLogin(pw.pw_name, start["client_address"],
                                             tty=os.ttyname(terminal[1]) if terminal else "")
                pam_env = pam.open_session()
                monitor = PamMonitor(pam)
                if monitor.fork():  # the root parent: only waits, then closes the session
                    return monitor.run((channel.sock, udp_sock, listen_sock),
                                       (signal_r, signal_w, *(terminal or ())))
                pam = None  # the monitor's, closed there as root
            become_user(pw)
            if monitor is not None:
                monitor.end_with_it()
        # Before a packet or the PTY: root's log file (the PAM monitor keeps it) and stderr.
        _log_through_listener(channel)
        # --- forwarding: set up by the user's own process (it binds what the user may) ---
        forwarding = _forwarding_setup(settings["forwarding"], start["forward_agent"], pw,
                                       start["listener_uid"] == 0)
        agent_dir = forwarding[1]
        if start["no_command"]:  # mp -N
            shell = NoCommand(start["rows"], start["cols"])
        else:
            shell = PtyShell(pw, start["term"], start["rows"], start["cols"], start["env"],
                             start["connection"], start["command"], start["pty"],
                             agent_dir.path if agent_dir is not None else None, pam_env,
                             terminal)
        listen_sock.listen(SESSION_SOCKET_BACKLOG)  # as the user: whom a claim's SO_PEERCRED sees
    except (MoshpitError, OSError) as e:
        if pam is not None:
            pam.close()
        if forwarding is not None and forwarding[1] is not None:
            forwarding[1].close()
        channel.send({"op": "reply", "error": str(e)})
        return 1
    # Answered first: the listener grants the login while this process builds the session.
    channel.send({"op": "reply", "shell_pid": shell.pid, "tty": shell.tty_path,
                  "pid": os.getpid()})
    host = _SessionHost(settings)
    session = Session(host, start["session_id"], pw.pw_name,
                      keys.PublicKey.from_line(start["client_key"]), udp_sock, shell, forwarding)
    session.resume_secret = start["resume_secret"]
    try:
        go = channel.receive()
    except (OSError, moshpit_ipc.IpcError):
        go = None
    if go is None or go.get("op") != "go":
        session.abandon()
        return 0
    channel.sock.settimeout(RESUME_WAIT_SECS)
    control = SessionControl(session, host, listen_sock, channel, start["listener_uid"],
                             start["client_address"], signal_r)
    shell.logout = control.logged_out_now
    session.start(_keys_from(go), tuple(go["peer"]))
    try:
        control.run()
    finally:
        session.thread.join()
        if pam is not None:
            pam.close()  # as the user now: what a module can undo without root, it does
    return 0


class PamMonitor:
    """(Session process, root, with PAM.) sshd's privileged monitor, reduced to what PAM
    needs. Once its PAM session is open (PAM_TTY set), the session process forks: the child
    becomes the user for good and runs the session; this root parent keeps the PAM handle
    and nothing else (no socket, no terminal, no key), waits for the child, then closes
    the PAM session and deletes the credentials as root (what pam_systemd, pam_mount or
    pam_exec scripts undo may need it) and exits as the child did: with its status, or
    killed by the same signal, so that the spawner reports a crash as the child's.
    SIGTERM sent to it is passed on to the child. It execs nothing: its memory of its own
    is the pages its child rewrote since the fork (about 2 MB, README "Accounts and login
    records")."""

    def __init__(self, pam: moshpit_login.PamLogin):
        self.pam = pam
        self.child = 0
        self.monitor = os.getpid()

    def fork(self) -> bool:
        """Fork: True in the parent (the monitor), False in the child (the session)."""
        self.child = os.fork()
        return self.child != 0

    def end_with_it(self) -> None:
        """(The child, once the user: the kernel clears the setting at a uid change.) A
        monitor killed (SIGKILL) could not close the PAM session: the child gets SIGTERM
        then and ends the session as ``kill`` of it would, the client told."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("the session will not end with its PAM monitor: prctl: %s",
                        os.strerror(ctypes.get_errno()))
        elif os.getppid() != self.monitor:  # it died before the prctl
            os.kill(os.getpid(), signal.SIGTERM)

    def _forward(self, signum, frame) -> None:
        try:
            os.kill(self.child, signum)
        except ProcessLookupError:
            pass

    def run(self, sockets: tuple, fds: tuple) -> int:
        """(The parent.) Close ``sockets`` and ``fds`` (the child's now: the listener must
        see the channel end when the child does, the shell the terminal's hangup), wait,
        close the PAM session; the child's exit status."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, self._forward)
        for sock in sockets:
            sock.close()  # no shutdown: that would end the child's copy too
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(self.child, 0)
        code = os.waitstatus_to_exitcode(status)
        self.pam.close()
        log.debug("PAM session of %s closed (session process %d ended: %d)", self.pam.user,
                  self.child, code)
        if code < 0:  # killed: die the same way, without a second core dump
            logging.shutdown()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            code = 128 - code  # a signal whose default is not to end a process
        return code


def run_spawner(sock_fd: int) -> int:
    """``mps.py --session-spawner FD``: the process that forks session processes.

    Exec'd by the listener (a fresh interpreter: the host key never was in its memory) and
    single-threaded, so a fork copies no lock another thread holds. It loads the config and
    the log like the listener, then for each ``spawn`` message (three descriptors: the
    control socket, the UDP socket, the session's listening socket) forks a session process
    and answers its pid; it reports each one's exit (a crash's signal) to the listener. It
    exits when the listener closes its socket; the sessions go on without it."""
    sock = socket.socket(fileno=sock_fd)
    init, _ = moshpit_ipc.receive_packet(sock)
    if init is None:
        return 1
    config = moshpit.load_config("server", cli=init["cli"], path=init["config_path"])
    moshpit.setup_logging("server", config, log_path=init["log_path"], stderr=init["stderr"])
    return _spawner_loop(sock, init["settings"])


# Standard modules Python imports on first use. A session process is the user by then,
# and may not be able to read the interpreter's files (one under /root, a pyenv): the
# spawner imports them first (getaddrinfo of a name needs the idna codec, for -R/-L).
PRELOADED_MODULES = ("encodings.idna", "unicodedata", "stringprep")


def _spawner_loop(sock: socket.socket, settings: dict, ahead: bool = True) -> int:
    """The spawner's work (single-threaded): hand each ``spawn`` message's descriptors to
    a session process (with ``ahead``, one forked in advance), report exits, return at the
    end of ``sock``."""
    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    if settings["use_pam"]:  # loaded once, shared: not in each session's own memory
        moshpit_login.libpam()
    for sig in (signal.SIGINT, signal.SIGHUP):  # a ^C at mps -e must not end sessions
        signal.signal(sig, signal.SIG_IGN)
    child_r, child_w = os.pipe()
    os.set_blocking(child_r, False)
    os.set_blocking(child_w, False)
    signal.set_wakeup_fd(child_w)
    signal.signal(signal.SIGCHLD, _note_signal)
    gc.freeze()  # what is loaded now stays shared with the session processes (no gc writes)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ, "listener")
        sel.register(child_r, selectors.EVENT_READ, "child")
        warm = _WarmProcess(settings, (sel, sock, child_r, child_w), ahead)
        while True:
            events = sel.select(warm.wait_secs(time.monotonic()))
            if not events:
                warm.prepare()
            for key, _ in events:
                if key.data == "child":
                    os.read(child_r, WAKE_READ_SIZE)
                    _report_exits(sock)
                    continue
                message, fds = moshpit_ipc.receive_packet(sock, max_fds=3)
                if message is None:
                    warm.discard()
                    return 0
                if message.get("op") != "spawn" or len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    moshpit_ipc.send_packet(sock, {"op": "spawned", "error": "bad request"})
                    continue
                pid, error = warm.take(fds)
                for fd in fds:
                    os.close(fd)
                moshpit_ipc.send_packet(sock, {"op": "spawned", "pid": pid, "error": error})
                warm.taken(time.monotonic())


class _WarmProcess:
    """(Spawner.) A session process forked ahead of need: it waits on a socket pair for the
    descriptors of the next login, so a login does not wait for a fork (the biggest single
    step of a session process's start). Forked before any user is known, it holds nothing
    the spawner does not: the settings and the shared modules. It exits when the spawner
    closes its end (the listener stopped)."""

    def __init__(self, settings: dict, spawner_fds: tuple, ahead: bool):
        self.settings = settings
        self.spawner_fds = spawner_fds
        self.ahead = ahead  # False: fork at each login (mp --ssh's single session)
        self.pid = 0
        self.sock: Optional[socket.socket] = None
        self._prepare_at: Optional[float] = None
        self.prepare()

    def taken(self, now: float) -> None:
        """A login took the waiting process: fork the next one once that login's start is
        over (a fork now would compete for the CPU with the start it waits for)."""
        self._prepare_at = now + SPAWN_AHEAD_DELAY_SECS

    def wait_secs(self, now: float) -> Optional[float]:
        """How long the spawner may sleep before it forks the next waiting process."""
        return None if self._prepare_at is None else max(0.0, self._prepare_at - now)

    def prepare(self) -> None:
        """Fork the waiting process (if none waits); without one, ``take`` forks."""
        self._prepare_at = None
        if self.sock is not None or not self.ahead:
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("cannot fork a session process in advance: %s", e.strerror or e)
            mine.close()
            theirs.close()
            return
        if pid == 0:
            mine.close()
            _session_process_main(theirs, self.settings, self.spawner_fds)
        theirs.close()
        self.pid, self.sock = pid, mine

    def take(self, fds: List[int]) -> tuple:
        """(pid, error) of the session process that now holds (copies of) ``fds``."""
        if self.sock is not None:
            sock, self.sock = self.sock, None
            try:
                moshpit_ipc.send_packet(sock, {"op": "spawn"}, fds)
                return self.pid, ""
            except OSError:  # it died meanwhile (its exit is reported): fork one now
                pass
            finally:
                sock.close()
        try:
            pid = os.fork()
        except OSError as e:
            return 0, f"cannot fork: {e.strerror or e}"
        if pid == 0:
            _session_process_main(fds, self.settings, self.spawner_fds)
        return pid, ""

    def discard(self) -> None:
        """The spawner ends: the waiting process reads EOF and exits."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _session_process_main(source, settings: dict, spawner_fds: tuple) -> None:
    """(Forked child of the spawner.) Drop what is the spawner's, run the session, exit.
    ``source``: the session's descriptors, or the socket a warm process receives them on."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sel, sock, child_r, child_w = spawner_fds
        sel.close()
        sock.close()
        os.close(child_r)
        os.close(child_w)
        if isinstance(source, socket.socket):  # warm: wait for a login
            _message, fds = moshpit_ipc.receive_packet(source, max_fds=3)
            source.close()
            if len(fds) != 3:  # the spawner ended first
                for fd in fds:
                    os.close(fd)
                os._exit(0)
        else:
            fds = source
        status = run_session_process(fds, settings)
    except BaseException:
        log.exception("session process %d failed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(status)


def _log_through_listener(channel: moshpit_ipc.Channel) -> None:
    """(Session process, as the user now.) Give up the spawner's log file and stderr
    (root's, the listener's): the session's records go to the listener at the end of
    ``channel`` (moshpit_ipc "Log relay")."""
    moshpit.relay_logging(moshpit_ipc.LogSender())
    _relay_log_to(channel)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _relay_log_to(channel: moshpit_ipc.Channel) -> None:
    """(Session process.) Send our log records to the listener at the end of ``channel``."""
    sender = moshpit_ipc.LogSender.installed()
    if sender is not None:
        sender.attach(channel)


def _report_exits(sock: socket.socket) -> None:
    """Reap ended session processes and tell the listener (the status: -N for signal N)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            moshpit_ipc.send_packet(sock, {"op": "exited", "pid": pid,
                                           "status": os.waitstatus_to_exitcode(status)})
        except OSError:
            pass  # the listener is gone


class Spawner:
    """(Listener.) Its handle on the spawner process: ``spawn`` a session process with its
    three descriptors; exits are passed to ``on_exit(pid, status)`` (reader thread). Started
    again if it died."""

    def __init__(self, init: dict, on_exit: Optional[Callable[[int, int], None]] = None,
                 fork: bool = False):
        self.init = init
        self.on_exit = on_exit
        self.fork = fork
        self._lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._start()

    def _start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.fork:
            self._fork(mine, theirs)
            return
        try:
            self.proc = subprocess.Popen(own_command("--session-spawner", str(theirs.fileno())),
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         cwd="/")
        except OSError as e:
            mine.close()
            raise MoshpitError(f"cannot start the session spawner: {e.strerror or e}")
        finally:
            theirs.close()
        self.sock = mine
        moshpit_ipc.send_packet(mine, self.init)
        threading.Thread(target=self._read, args=(mine,), name="spawner", daemon=True).start()

    def _fork(self, mine: socket.socket, theirs: socket.socket) -> None:
        """``fork`` mode (mp --ssh's one-session server: its modules may exist only in its
        memory, so there is nothing to exec): the spawner is a fork of this process, which
        must be single-threaded here. It runs as the same user; it has a copy of that
        session's own host key (made for it, dropped with it). It forks no session process
        ahead: there is only one session."""
        if threading.active_count() != 1:
            raise MoshpitError("internal error: the spawner can only be forked before any "
                               "thread starts")
        try:
            pid = os.fork()
        except OSError as e:
            raise MoshpitError(f"cannot start the session spawner: {e.strerror or e}")
        if pid == 0:  # pragma: no cover (the forked spawner exits here)
            status = 1
            try:
                mine.close()
                status = _spawner_loop(theirs, self.init["settings"], ahead=False)
            finally:
                os._exit(status)
        theirs.close()
        self.proc = ShellProcess(pid)
        self.sock = mine
        threading.Thread(target=self._read, args=(mine,), name="spawner", daemon=True).start()

    def _read(self, sock: socket.socket) -> None:
        try:
            while True:
                message, _ = moshpit_ipc.receive_packet(sock, max_fds=0)
                if message is None:
                    break
                if message.get("op") == "exited" and self.on_exit is not None:
                    self.on_exit(int(message["pid"]), int(message["status"]))
                else:
                    self._replies.put(message)
        except (OSError, moshpit_ipc.IpcError):
            pass
        self._replies.put(None)

    def spawn(self, fds: List[int]) -> int:
        """The pid of a new session process holding ``fds``; ShellError if none started."""
        with self._lock:
            if self.proc.poll() is not None:
                log.error("the session spawner (pid %d) exited with status %d: restarting it",
                          self.proc.pid, self.proc.returncode)
                self.sock.close()
                self._start()
            try:
                moshpit_ipc.send_packet(self.sock, {"op": "spawn"}, fds)
                reply = self._replies.get(timeout=SPAWN_WAIT_SECS)
            except (OSError, queue.Empty):
                reply = None
        if reply is None or reply.get("error") or not reply.get("pid"):
            raise ShellError("cannot start a session process: "
                             + (reply.get("error") if reply else "the spawner did not answer"))
        return int(reply["pid"])

    def close(self) -> None:
        """The listener stops: the spawner exits (the sessions it started go on)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # EOF for it, and wakes our reader
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=SPAWN_WAIT_SECS)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class SessionProcess:
    """(Listener.) A session running in a session process: what the listener knows of it
    (owner, key, resume secrets, UDP port, login record) and its channel to it. The same
    methods as Session (start/abandon, resume, take_over, describe, end_by_client,
    shutdown), each a request the session process answers: Server's code is the same for
    both."""

    def __init__(self, server: Server, channel: moshpit_ipc.Channel, state: dict,
                 record: moshpit_login.LoginRecord, socket_path: str):
        self.server = server
        self.channel = channel
        self.session_id = state["session_id"]
        self.name = self.session_id[:4].hex()
        self.user = state["user"]
        self.client_key = keys.PublicKey.from_line(state["client_key"])
        self.resume_secret = state["resume_secret"]
        self.replaced_secrets: deque = deque(state.get("replaced_secrets", ()),
                                             maxlen=REPLACED_SECRETS_KEPT)
        self.udp_port = int(state["udp_port"])
        self.pid = int(state["pid"])
        self.record = record
        self.socket_path = socket_path
        # How its shell ended, as the session process reports it (state: a shell that
        # ended before our claim): the status is ours to log even when the process is not
        # our spawner's child.
        self.shell_exit = state.get("shell_exit") if isinstance(state.get("shell_exit"),
                                                                dict) else {}
        if state.get("shell_pid") is None:
            self.shell_exit = {"no_command": True}  # mp -N: nothing ran
        if channel.on_log is None:  # claimed (a new session's has relayed since its start)
            channel.on_log = moshpit_ipc.LogReceiver(f"{self.name} {self.user}")
        self.log_receiver = channel.on_log
        self.thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._next_id = 0

    def start(self, keys=None, peer=None) -> None:
        """Serve the session's messages; with ``keys`` (a new session whose handshake
        completed) first tell the session process to go."""
        if keys is not None:
            self.channel.send({"op": "go", "keys": _keys_message(keys), "peer": list(peer)})
        self.channel.sock.settimeout(None)
        self.thread = threading.Thread(target=self._read, name=f"session-{self.name}",
                                       daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        """The handshake failed: the session process hangs up the shell and exits."""
        try:
            self.channel.send({"op": "abandon"})
        except OSError:
            pass
        self.channel.close()
        self.record.close()
        _unlink(self.socket_path)

    def detach(self) -> None:
        """The listener stops: leave the session running (its successor claims it)."""
        self.channel.close()

    def attach_carrier(self, sock: socket.socket) -> None:
        """Hand the session process the TCP connection that granted it (its carrier)."""
        try:
            self.channel.send({"op": "carrier"}, [sock.fileno()])
        except OSError:
            pass  # the session is gone
        finally:
            sock.close()

    def resume(self, keys, peer_recv_offset: int) -> Optional[int]:
        return self._ask({"op": "resume", "keys": _keys_message(keys),
                          "peer_recv_offset": peer_recv_offset}, "recv_offset")

    def take_over(self, keys, rows: int, cols: int, peer: tuple) -> Optional[int]:
        """(After the caller set the new resume secret and client key.)"""
        return self._ask({"op": "take_over", "keys": _keys_message(keys), "rows": rows,
                          "cols": cols, "peer": list(peer), "resume_secret": self.resume_secret,
                          "client_key": self.client_key.to_line()}, "recv_offset")

    def describe(self) -> Optional[handshake.SessionInfo]:
        """None if the session is gone, or too slow to answer (one busy session leaves
        the others' listing alone)."""
        try:
            info = self._ask({"op": "describe"}, "info")
        except handshake.AuthRefused as slow:
            log.warning("%s", slow)
            return None
        return None if info is None else handshake.SessionInfo(**info)

    def end_by_client(self, reason: Optional[str] = None) -> Optional[int]:
        return self._ask({"op": "end", "reason": reason}, "recv_offset")

    def shutdown(self) -> None:
        try:
            self._ask({"op": "shutdown"}, "op")
        except handshake.AuthRefused as slow:
            log.warning("%s", slow)  # it ends when it gets to the request

    def _ask(self, message: dict, answer: str):
        """Send a request; the named field of its reply, None if the session is gone.

        A session process that is alive but slow to answer (a flood on a loaded machine)
        has not ended: the client is told the server is busy, which it retries, rather
        than that its session no longer exists, which would end it."""
        with self._lock:
            self._next_id += 1
            message["id"] = self._next_id
            try:
                self.channel.send(message)
            except OSError:
                return None
            deadline = time.monotonic() + RESUME_WAIT_SECS + 1.0
            while True:
                try:
                    reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    reply = {"id": message["id"], "busy": True}
                if reply is None:
                    self._replies.put(None)  # the channel is closed: so for later requests
                    return None
                if reply.get("id") == message["id"]:
                    if reply.get("busy"):
                        raise handshake.AuthRefused(
                            handshake.SERVER_BUSY, f"session {self.name} was too busy to "
                            f"answer a {message['op']} request in time")
                    return reply.get(answer)

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                if message is None:
                    break
                if message.get("op") == "reply":
                    self._replies.put(message)
                elif message.get("op") == "logout":
                    self.shell_exit = message
                    # --- login records: the shell has gone (how: ut_exit) ---
                    self.record.close(*(reported_exit(message) or (0, 0)))
        except (OSError, moshpit_ipc.IpcError) as e:
            if not self.server.stopping:
                log.warning("session %s: its control channel failed: %s", self.name, e)
        self.log_receiver.close()
        self._replies.put(None)
        self.server.session_ended(self)


def _unlink(path: str) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def claim_session(path: str, expected_uid: Optional[int] = None) -> tuple:
    """Connect to a running session's socket and claim it: (channel, state). ``expected_uid``
    (a listener's claim): the session process must run as the user it says it serves
    (SO_PEERCRED), else MoshpitError; it also relays its log records to us from then on.
    OSError if nothing answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CLAIM_WAIT_SECS)
    try:
        sock.connect(path)
        channel = moshpit_ipc.Channel(sock)
        _, uid, _ = moshpit_ipc.peer_credentials(sock)
        channel.send({"op": "claim", "id": 0, "logs": expected_uid is not None})
        state = channel.receive()
        if state is None:
            raise ConnectionResetError(errno.ECONNRESET, "closed at once")
        if state.get("ipc_version") != moshpit_ipc.IPC_VERSION:
            raise MoshpitError(f"session socket {path} speaks another version of mps's "
                               "messages: end that session (kill its process)")
        if expected_uid is not None:
            want = pwd.getpwnam(state["user"]).pw_uid if expected_uid == 0 else expected_uid
            if uid != want:
                raise MoshpitError(f"session socket {path} is served by uid {uid}, "
                                   f"not by {state['user']}'s")
            # The socket's name was given by root for the session's id; the answer is the
            # (maybe hijacked) session process's word, so a session could take the resumes
            # of another of its user's sessions.
            named = _session_socket_path(os.path.dirname(path), state["session_id"])
            if named != path:
                raise MoshpitError(f"session socket {path} answers for another session "
                                   f"({state['session_id'][:4].hex()})")
    except BaseException:
        sock.close()
        raise
    return channel, state


def stop_sessions(config: moshpit.Config) -> int:
    """``mps --stop-sessions``: end every running session of this mps (its clients are told
    the server shut down), whether or not a listener runs."""
    directory = sessions_dir(config)
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".sock"))
    except FileNotFoundError:
        names = []
    ended = 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            channel, _ = claim_session(path)
        except OSError:
            continue  # gone already
        except MoshpitError as e:  # garbage, another version
            print(f"mps: warning: {e}", file=sys.stderr)
            continue
        try:
            channel.send({"op": "shutdown", "id": 1})
            channel.receive()
            ended += 1
        except (OSError, moshpit_ipc.IpcError):
            pass
        finally:
            channel.close()
    print(f"mps: ended {ended} session(s)")
    return 0


# ---------------------------------------------------------------------------
# Server: listener, handshake threads, session registry, signals
# ---------------------------------------------------------------------------


def _udp_host(local: tuple) -> str:
    """The address to bind a session's UDP socket on: the local address of the accepted TCP
    connection (DESIGN 5); IPv4-mapped IPv6 (dual-stack listener) becomes plain IPv4."""
    host = local[0]
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


def bind_udp_port(local: tuple, lo: int, hi: int) -> Optional[socket.socket]:
    """A UDP socket bound on ``local``'s address to a free port in [lo, hi] (the bind is the
    allocation, so concurrent handshakes cannot collide), or None if every port is taken."""
    host = _udp_host(local)
    return bind_in_range(lambda port: transport.udp_socket(host, port), lo, hi)


def bind_in_range(bind, lo: int, hi: int) -> Optional[socket.socket]:
    """``bind(port)``'s socket for the first port in [lo, hi] not in use, or None if every
    port is taken. Starts at a random port so a busy range is not scanned from its start
    every time."""
    first = random.randint(lo, hi)
    for i in range(hi - lo + 1):
        try:
            return bind(lo + (first - lo + i) % (hi - lo + 1))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    return None


ACCEPT_BATCH = 64  # connections the accept loop takes per wake-up


def admission_limits(config: moshpit.Config) -> handshake.AdmissionLimits:
    """The pre-authentication limits (README "Pre-authentication limits") from the config."""
    return handshake.AdmissionLimits(
        max_handshakes=config["mps.max_handshakes"],
        startups=moshpit.parse_max_startups(config["mps.max_startups"]),
        max_per_source=config["mps.max_handshakes_per_source"],
        netblock=moshpit.parse_netblock(config["mps.source_netblock"]),
        penalties=moshpit.parse_penalties(config["mps.source_penalties"]),
        trusted_secs=float(config["mps.trusted_source_secs"]),
        startups_per_sec=float(config["mps.max_startups_per_sec"]))


class Server:
    """Accepts TCP connections, runs each handshake in its own thread (bounded in number and
    time), and keeps the registry of sessions (SessionProcess handles) for new logins,
    resumes and takeovers; new sessions are forked by ``spawner``. Create it in the main
    thread: it installs the SIGTERM/SIGINT/SIGHUP handlers."""

    # Each session process listens on a socket in sessions_dir (a later listener finds it
    # there); False: on an unnamed one (a server whose sessions end with it).
    session_sockets = True

    def __init__(self, config: moshpit.Config, host_key, spawner: Optional[Spawner]):
        self.config = config
        self.spawner = spawner
        if spawner is not None:
            spawner.on_exit = self._process_exited
        self.sessions_dir = sessions_dir(config)
        # Spawned process pid -> ("session S of U", pid of its session process: the same,
        # or the child of its PAM monitor).
        self._processes: Dict[int, tuple] = {}
        self.host_key = host_key
        self.port_range = moshpit.parse_port_range(config["mps.udp_port_range"])
        self.max_sessions = config["mps.max_sessions"]
        self.max_sessions_per_user = config["mps.max_sessions_per_user"]
        self.detached_timeout = config["mps.detached_session_timeout_secs"]
        self.unattached_timeout = config["mps.unattached_session_timeout_secs"]
        self.shutdown_flush = config["mps.shutdown_flush_secs"]
        self.handshake_timeout = float(config["mps.handshake_timeout_secs"])
        self.hello_timeout = float(config["mps.hello_timeout_secs"])
        self.confirm_timeout = float(config["mps.confirm_timeout_secs"])
        self.authorized_keys_file = config["mps.authorized_keys_file"] or None
        # --- account policy (moshpit_login): sshd's allowed_user, nologin, PAM account ---
        self.account_policy = moshpit_login.AccountPolicy(
            {name: config["mps." + name] for name in moshpit_login.AccountPolicy.LISTS},
            use_pam=pam_wanted(config))
        moshpit_login.close_stale_records()  # sessions that ended while no mps was running
        if os.geteuid() == 0:
            moshpit_login.loginuid_supported()  # says once in the log if it is not
        self.limiter = handshake.HandshakeLimiter(
            handshake.AdmissionPolicy(admission_limits(config)))
        self.listeners: List[socket.socket] = []
        self._lock = threading.Lock()
        self._sessions: Dict[bytes, SessionProcess] = {}
        # New sessions inside a handshake, by user: counted against the limits already.
        self._setting_up: Counter = Counter()
        self._signals: List[int] = []
        self.stopping = False
        # Listings ask the user's session processes in parallel (threads made on demand).
        self._describers = concurrent.futures.ThreadPoolExecutor(DESCRIBE_WORKERS,
                                                                 "describe")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Before anything can announce that we listen, so a signal never hits the defaults.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # -- listening -------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind the TCP listener(s) on mps.ip:mps.port; "::" is dual-stack (IPv4 and IPv6)."""
        host, port = self.config["mps.ip"], self.config["mps.port"]
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise MoshpitError(f"cannot listen on {host!r}: {e.strerror} (check mps.ip)")
        errors = []
        for family, type_, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    dual = address[0] == "::"
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
                sock.bind(address)
                sock.listen(128)
            except OSError as e:
                sock.close()
                errors.append(f"{moshpit.format_addr(address)}: {e.strerror or e}")
                continue
            self.listeners.append(sock)
            log.info("listening on %s (TCP), session UDP ports %d-%d", moshpit.format_addr(address),
                     *self.port_range)
        if errors and not self.listeners:
            raise MoshpitError(f"cannot listen on {'; '.join(errors)} "
                               "(another mps running? choose another mps.port / -c config)")
        for error in errors:
            log.warning("not listening on %s", error)
        self.adopt_sessions()

    def adopt_sessions(self) -> None:
        """Claim the sessions a previous mps on this port left running (their sockets in the
        sessions directory); a socket nobody answers on is a session that ended meanwhile."""
        try:
            moshpit.make_private_dirs(self.sessions_dir)
            names = sorted(os.listdir(self.sessions_dir))
        except OSError as e:
            raise MoshpitError(f"cannot use the sessions directory {self.sessions_dir}: "
                               f"{e.strerror or e} (set mps.runtime_dir)")
        if len(_session_socket_path(self.sessions_dir, bytes(8))) > MAX_SOCKET_PATH:
            raise MoshpitError(f"the sessions directory {self.sessions_dir} is too long a path "
                               "for Unix sockets: set mps.runtime_dir to a shorter one")
        for name in names:
            path = os.path.join(self.sessions_dir, name)
            try:
                channel, state = claim_session(path, os.geteuid())
            except (OSError, moshpit_ipc.IpcError, KeyError) as e:
                log.debug("session socket %s: %s: removed", path, e)
                _unlink(path)
                continue
            except MoshpitError as e:
                log.warning("%s: not claimed", e)
                continue
            record = moshpit_login.LoginRecord(
                state["user"], pwd.getpwnam(state["user"]).pw_uid, state["tty"],
                state["shell_pid"], state["client_address"])
            record.opened = bool(state["tty"]) and not state["logged_out"] and (
                os.geteuid() == 0)  # --- login records: the previous mps opened it ---
            session = SessionProcess(self, channel, state, record, path)
            with self._lock:
                self._sessions[session.session_id] = session
            session.start()
            log.info("claimed running session %s of %s (pid %d)", session.name, session.user,
                     session.pid)

    def serve_forever(self) -> int:
        """Accept connections until SIGTERM/SIGINT, then end every session; returns 0."""
        with selectors.DefaultSelector() as sel:
            for sock in self.listeners:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        os.read(self._wake_r, WAKE_READ_SIZE)
                    else:
                        self._accept(key.fileobj)
                while self._signals:
                    sig = self._signals.pop(0)
                    if sig == signal.SIGHUP:
                        log.info("SIGHUP received: ignored (mps does not reload its config; "
                                 "restart it to apply changes)")
                    else:
                        return self._stop(signal.Signals(sig).name)

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _stop(self, why: str) -> int:
        """Stop listening and leave: the sessions run on in their processes, and the next
        mps on this port claims them (``mps --stop-sessions`` ends them)."""
        self.stopping = True
        with self._lock:
            sessions = list(self._sessions.values())
        log.info("%s received: stopping; %d session(s) keep running", why, len(sessions))
        for sock in self.listeners:
            sock.close()
        for session in sessions:
            session.detach()
        self._describers.shutdown(wait=False)
        self.spawner.close()
        log.info("mps stopped")
        return 0

    def _accept(self, listener: socket.socket) -> None:
        """Take what the backlog holds (up to ACCEPT_BATCH per wake-up: a flood of refused
        connections then costs one select per batch, not one per connection)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # e.g. EMFILE: don't spin, let the backlog wait
                log.error("accept failed: %s", e)
                time.sleep(ACCEPT_ERROR_PAUSE_SECS)
                return
            sock.setblocking(True)
            self.limiter.spawn(sock, self._handshake)  # refused by the pre-auth limits?

    # -- handshakes ------------------------------------------------------------------------

    def _handshake(self, sock: socket.socket, report) -> None:
        """One handshake (own thread; the limiter closes ``sock`` and gets its outcome through
        ``report``). A new session set up by ``decide`` starts only if the handshake
        completes; otherwise it is undone."""
        created: List[Session] = []
        continued: List[Session] = []  # the session the connection goes on to carry

        def decide(auth):
            grant, session = self.decide(auth)
            if session is not None:
                created.append(session)
            request = auth.request
            if isinstance(grant, handshake.SessionGrant) and not request.end_session \
                    and request.intent != handshake.KILL:
                with self._lock:
                    continued.append(session or self._sessions.get(grant.session_id))
            return grant

        auth = None
        try:
            auth = handshake.server_handshake(sock, self.host_key, decide,
                                              timeout=self.handshake_timeout,
                                              hello_timeout=self.hello_timeout, report=report,
                                              acceptable=self.acceptable_key,
                                              confirm_timeout=self.confirm_timeout)
        finally:
            for session in created:
                self._setup_done(session, auth)
        if auth is not None and continued and continued[0] is not None:
            self._keep_as_carrier(sock, continued[0])

    def _keep_as_carrier(self, sock: socket.socket, session: Session) -> None:
        """The connection that authenticated a client for ``session`` stays open as its TCP
        carrier (the limiter closes ``sock``: the session gets a duplicate). A client that
        does not want it closes it; the session then drops it."""
        try:
            kept = sock.dup()
        except OSError as e:
            log.warning("session %s: cannot keep the TCP connection: %s", session.name, e)
            return
        session.attach_carrier(kept)

    def _setup_done(self, session: Session, auth) -> None:
        why = "the handshake did not complete" if auth is None else "the server is stopping"
        with self._lock:
            self._release_slot(session.user)
            if auth is not None and not self.stopping:
                # Started and registered together: shutdown sees only running sessions.
                try:
                    session.start(auth.keys, auth.peer)
                    self._sessions[session.session_id] = session
                    return
                except (RuntimeError, OSError) as e:  # "can't start new thread", gone
                    why = f"cannot start it: {e}"
        log.warning("session %s for %s abandoned: %s", session.name, session.user, why)
        session.abandon()

    def session_ended(self, session: SessionProcess) -> None:
        """(The session's reader thread.) Its process closed the channel: it has ended
        (or the listener is stopping, and leaves it running)."""
        if self.stopping:
            return
        with self._lock:
            self._sessions.pop(session.session_id, None)
        session.record.close()  # --- login records: even after a crash ---
        _unlink(session.socket_path)
        log.info("session %s of %s: its process %d has ended; %s", session.name, session.user,
                 session.pid, describe_shell_exit(session.shell_exit))

    def _process_exited(self, pid: int, status: int) -> None:
        """(Spawner's reader thread.) A session process has exited: a crash is logged."""
        with self._lock:
            what, worker = self._processes.pop(pid, (f"session process {pid}", pid))
        if status < 0:
            log.error("%s: its process %d was killed by %s", what, worker,
                      signal.Signals(-status).name)
        elif status:
            log.warning("%s: its process %d exited with status %d", what, worker, status)

    def decide(self, auth):
        """Authorize one handshake (handshake thread): the target user, their authorized_keys,
        then a new session or a resume. Returns (SessionGrant, new Session or None); raises
        AuthRefused with a reason code for the client and a reason for the log."""
        if self.stopping:
            raise handshake.AuthRefused(handshake.SHUTTING_DOWN, "the server is stopping")
        pw = self._authorized_user(auth)
        request = auth.request
        if request.end_session:
            return self._quit_session(auth), None
        if request.intent == handshake.LIST:
            return self._list_sessions(auth), None
        if request.intent == handshake.TAKE_OVER:
            return self._take_over(auth), None
        if request.intent == handshake.KILL:
            return self._kill_session(auth), None
        if request.resume_session_id is not None:
            return self._resume(auth), None
        # --- account policy: a new login (a resume continues one) ---
        refusal = self.account_policy.refusal(pw, moshpit_login.client_address(auth.peer))
        if refusal is not None:
            raise handshake.AuthRefused(handshake.PERMISSION_DENIED, str(refusal),
                                        refusal.client_message)
        return self._new_session(auth, pw)

    def _authorized_user(self, auth) -> pwd.struct_passwd:
        """The password entry of the requested user if the client's key may log in as them.

        No oracle: until a key is shown valid for the requested user, every refusal reads
        "permission denied" (the log keeps the real reason), so a stranger learns neither
        which users exist nor whom a non-root server runs as. Only a client holding a key
        authorized for a non-root server's own account hears "user not served" (it could
        log in as that account anyway)."""
        me = pwd.getpwuid(os.geteuid())
        if os.geteuid() != 0 and auth.user != me.pw_name:
            not_served = (f"this server runs as {me.pw_name} and only serves user {me.pw_name},"
                          f" not {auth.user!r} (run mps as root to serve every user)")
            if self._key_authorized(auth.client_key, me):
                raise handshake.AuthRefused(handshake.USER_NOT_SERVED, not_served)
            raise handshake.AuthRefused(
                handshake.PERMISSION_DENIED,
                f"{not_served}; key {auth.client_key.fingerprint()} is not authorized for"
                f" {me.pw_name} either")
        try:
            pw = pwd.getpwnam(auth.user)
        except (KeyError, ValueError):
            raise handshake.AuthRefused(handshake.PERMISSION_DENIED,
                                        f"no such user {auth.user!r}")
        if not self._key_authorized(auth.client_key, pw):
            raise handshake.AuthRefused(
                handshake.PERMISSION_DENIED,
                f"key {auth.client_key.fingerprint()} is not authorized for {pw.pw_name}")
        return pw

    def acceptable_key(self, user: str, keys) -> Optional[int]:
        """A ClientOffer (handshake thread): the index of the first key that decide() would
        not refuse for its key alone (a non-root server checks its own account, as
        _authorized_user does), or None. Nothing is proven yet: decide() checks again."""
        try:
            pw = pwd.getpwnam(user) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
            authorized = trust.authorized_keys_for(pw, self.authorized_keys_file)
        except (KeyError, ValueError, trust.TrustError) as e:
            log.info("key offer for %r: %s", user, e)
            return None
        return next((index for index, key in enumerate(keys) if key in authorized), None)

    def _key_authorized(self, key, pw: pwd.struct_passwd) -> bool:
        """Whether ``key`` is in ``pw``'s authorized_keys; a file that cannot be trusted is
        "permission denied" with moshpit_trust's reason in the log."""
        try:
            return key in trust.authorized_keys_for(pw, self.authorized_keys_file)
        except trust.TrustError as e:
            raise handshake.AuthRefused(handshake.PERMISSION_DENIED, str(e)) from None

    def _owned_session(self, auth, what: str) -> SessionProcess:
        """The session a resume or quit request names, if this client owns it: same user,
        same key, and proof (in this handshake) of the session's resume secret."""
        with self._lock:
            session = self._sessions.get(auth.request.resume_session_id)
        if session is None or session.user != auth.user or session.client_key != auth.client_key:
            raise handshake.AuthRefused(handshake.NO_SUCH_SESSION,
                                        f"{what} of an unknown session (or another user's/key's)")
        if any(auth.resume_proof_valid(old) for old in session.replaced_secrets):
            raise handshake.AuthRefused(handshake.NO_SUCH_SESSION,
                                        f"{what} of session {session.name}: it was taken over")
        if not auth.resume_proof_valid(session.resume_secret):
            raise handshake.AuthRefused(handshake.PERMISSION_DENIED,
                                        f"{what} of session {session.name}: bad resume proof")
        return session

    def _users_session(self, auth, what: str) -> SessionProcess:
        """The session a takeover or kill names, if it belongs to the requesting user (any
        key authorized for the user may take over or end the user's sessions, as any of
        them may start one)."""
        with self._lock:
            session = self._sessions.get(auth.request.resume_session_id)
        if session is None or session.user != auth.user:
            raise handshake.AuthRefused(handshake.NO_SUCH_SESSION,
                                        f"{what} of an unknown session (or another user's)")
        return session

    def _describe_sessions(self, user: str) -> list:
        """Ask each of ``user``'s session processes for its description, in parallel:
        futures for ``_described``."""
        with self._lock:
            own = [session for session in self._sessions.values() if session.user == user]
        return [self._describers.submit(session.describe) for session in own]

    @staticmethod
    def _described(futures: list) -> List[handshake.SessionInfo]:
        """The answers to ``_describe_sessions`` (sessions that ended meanwhile left out)."""
        return [info for info in (future.result() for future in futures) if info is not None]

    def _list_sessions(self, auth) -> handshake.SessionListing:
        """mp --list: the user's running sessions, most recently active first."""
        listed = sorted(self._described(self._describe_sessions(auth.user)),
                        key=lambda info: info.last_activity, reverse=True)
        return handshake.SessionListing(listed[:handshake.MAX_LISTED])

    def _take_over(self, auth):
        """mp --attach: the session moves to this client (the old one is told and exits);
        a new resume secret, so only the new client can resume it from now on."""
        session = self._users_session(auth, "takeover")
        session.replaced_secrets.append(session.resume_secret)
        session.resume_secret = secrets.token_bytes(32)
        session.client_key = auth.client_key
        request = auth.request
        recv_offset = session.take_over(auth.keys, request.rows, request.cols, auth.peer)
        return _grant(session, recv_offset, gone="ended before the takeover")

    def _kill_session(self, auth):
        """mp --kill: end a session of the user's, whoever holds it."""
        session = self._users_session(auth, "kill")
        recv_offset = session.end_by_client(
            f"session killed by mp --kill from {moshpit.format_addr(auth.peer)}")
        return _grant(session, recv_offset, gone="had ended before the kill")

    def _resume(self, auth):
        session = self._owned_session(auth, "resume")
        recv_offset = session.resume(auth.keys, auth.request.resume_recv_offset)
        return _grant(session, recv_offset, gone="ended during the resume")

    def _quit_session(self, auth):
        """The client quit while UDP was down: end its session now rather than keep it
        detached. Granted once the session thread has taken the request (it then hangs up
        the shell); "no such session" if the session had ended anyway."""
        session = self._owned_session(auth, "quit request")
        recv_offset = session.end_by_client()
        return _grant(session, recv_offset, gone="had ended before the quit request")

    def _claim_slot(self, user: str) -> None:
        """Count a new session of ``user`` against max_sessions and max_sessions_per_user
        from now on (its handshake is still running), or refuse it naming the limit hit."""
        with self._lock:
            total = len(self._sessions) + sum(self._setting_up.values())
            if total >= self.max_sessions:
                raise handshake.AuthRefused(
                    handshake.SESSION_LIMIT, f"max_sessions ({self.max_sessions}) reached")
            own = self._setting_up[user] + sum(
                1 for session in self._sessions.values() if session.user == user)
            if own >= self.max_sessions_per_user:
                raise handshake.AuthRefused(
                    handshake.USER_SESSION_LIMIT,
                    f"{user} has {own} sessions: max_sessions_per_user"
                    f" ({self.max_sessions_per_user}) reached")
            self._setting_up[user] += 1

    def _release_slot(self, user: str) -> None:
        """The handshake of a session claimed by ``_claim_slot`` is over (hold the lock)."""
        self._setting_up[user] -= 1
        if not self._setting_up[user]:
            del self._setting_up[user]

    def _new_session(self, auth, pw):
        self._claim_slot(pw.pw_name)
        try:
            try:
                udp = bind_udp_port(auth.local, *self.port_range)
            except OSError as e:
                raise handshake.AuthRefused(handshake.SERVER_BUSY, f"cannot bind a UDP port: {e}")
            if udp is None:
                lo, hi = self.port_range
                raise handshake.AuthRefused(handshake.SERVER_BUSY,
                                            f"every UDP port in {lo}-{hi} is in use")
            # The grant counts the user's detached sessions: asked while the process starts.
            others = self._describe_sessions(pw.pw_name)
            try:
                session = self._spawn_session(auth, pw, udp)
            finally:
                udp.close()  # the session process has its own copy
        except BaseException:
            with self._lock:
                self._release_slot(pw.pw_name)
            raise
        detached = sum(not info.attached for info in self._described(others))
        return _grant(session, 0, detached), session

    def _spawn_session(self, auth, pw: pwd.struct_passwd,
                       udp: socket.socket) -> SessionProcess:
        """A session process for this login: forked by the spawner with its descriptors
        (the channel's other end, the UDP socket, its own listening socket), told the
        login, started its shell as the user; AuthRefused if it could not."""
        session_id = secrets.token_bytes(16)
        path = _session_socket_path(self.sessions_dir, session_id) if self.session_sockets else ""
        request = auth.request
        connection = " ".join(str(part) for part in (auth.peer[0], auth.peer[1],
                                                     auth.local[0], auth.local[1]))
        address = moshpit_login.client_address(auth.peer)
        resume_secret = secrets.token_bytes(32)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        start = moshpit_ipc.encode_message({
            "op": "start", "user": pw.pw_name, "term": request.term, "rows": request.rows,
            "cols": request.cols, "env": request.env, "connection": connection,
            "command": request.command, "pty": request.pty, "session_id": session_id,
            "resume_secret": resume_secret, "client_key": auth.client_key.to_line(),
            "client_address": address, "listener_uid": os.geteuid(),
            "forward_agent": request.forward_agent, "no_command": request.no_command})
        try:
            # listen() is the session process's: SO_PEERCRED's uid. No path: an abstract
            # name the kernel picks (Linux autobind), known to nobody else.
            listen_sock.bind(path)
            # The start goes into the socket before the process exists (what fits in its
            # buffer: all of it but for a huge command), so it reads it the moment it has
            # its descriptors: no round trip between the spawner's answer and the start.
            mine.setblocking(False)
            try:
                sent = mine.send(start)
            except BlockingIOError:
                sent = 0
            mine.settimeout(START_WAIT_SECS)
            pid = spawned = self.spawner.spawn(
                [theirs.fileno(), udp.fileno(), listen_sock.fileno()])
            what = f"session {session_id[:4].hex()} of {pw.pw_name}"
            with self._lock:
                self._processes[pid] = (what, pid)
            mine.sendall(start[sent:])
            channel = moshpit_ipc.Channel(mine)
            channel.on_log = moshpit_ipc.LogReceiver(f"{session_id[:4].hex()} {pw.pw_name}")
            started = channel.receive()
            if started is None or started.get("error"):
                raise ShellError(started.get("error") if started else
                                 "the session process ended before starting the shell")
            pid = int(started["pid"])
            with self._lock:
                if spawned in self._processes:  # (not reaped yet)
                    self._processes[spawned] = (what, pid)
        except (ShellError, OSError, moshpit_ipc.IpcError) as e:
            mine.close()
            _unlink(path)
            raise handshake.AuthRefused(handshake.PERMISSION_DENIED, str(e))
        finally:
            theirs.close()
            listen_sock.close()
        # --- login records (moshpit_login): who/last/lastlog, written by the root listener ---
        record = moshpit_login.LoginRecord(pw.pw_name, pw.pw_uid, started["tty"],
                                           started["shell_pid"], address)
        if started["tty"]:
            record.open()
        state = {"session_id": session_id, "user": pw.pw_name,
                 "client_key": auth.client_key.to_line(), "resume_secret": resume_secret,
                 "udp_port": udp.getsockname()[1], "pid": pid,
                 "shell_pid": started["shell_pid"]}
        return SessionProcess(self, channel, state, record, path)


def _forwarding_setup(config, forward_agent: bool, pw: pwd.struct_passwd,
                      root_server: bool) -> tuple:
    """--- forwarding --- (ForwardPolicy, the -A socket directory or None, whether -R may
    bind ports below 1024) for a new session, in its process (``config``: the
    mps.allow_tcp_forwarding, permit_open and allow_agent_forwarding settings), which is
    the user already. A root server forwards for a user only what the user could bind
    (where the kernel lets everyone bind low ports, the rule still holds)."""
    policy = moshpit_channels.ForwardPolicy(config["mps.allow_tcp_forwarding"],
                                            config["mps.permit_open"],
                                            config["mps.allow_agent_forwarding"])
    agent_dir = None
    if forward_agent and policy.allow_agent:
        try:
            agent_dir = moshpit_channels.AgentSocketDir(pw.pw_uid, pw.pw_gid)
        except OSError as e:  # the session works without it, as with sshd
            log.warning("no agent forwarding for %s: %s", pw.pw_name, e)
    elif forward_agent:
        log.info("agent forwarding for %s refused: allow_agent_forwarding is off", pw.pw_name)
    return policy, agent_dir, not root_server or pw.pw_uid == 0


def _grant(session: SessionProcess, recv_offset: Optional[int], detached: int = 0,
           gone: str = "has ended"):
    """What the client is told about its session: where it is and how to resume it (and,
    for a new one, how many of the user's sessions are detached). ``recv_offset`` None: the
    session answered that it had ended first; the client hears "no such session" and the
    log says when (``gone``)."""
    if recv_offset is None:
        raise handshake.AuthRefused(handshake.NO_SUCH_SESSION, f"session {session.name} {gone}")
    return handshake.SessionGrant(session_id=session.session_id,
                                  resume_secret=session.resume_secret,
                                  udp_port=session.udp_port, recv_offset=recv_offset,
                                  detached=detached)


# ---------------------------------------------------------------------------
# One session for mp --ssh (started on the server by moshpit_bootstrap's stub)
# ---------------------------------------------------------------------------


class OneSessionServer(Server):
    """The server of one session bootstrapped over ssh (mp --ssh): it runs as the user ssh
    logged in, serves only that user and only the client key the bootstrap brought, with a
    host key made for it (the client pins it), listens on the address ssh came to, and
    stops when its session ends or when no session started in time. Writes nothing: no
    log file, no pid file, no keys on disk."""

    LISTEN_BACKLOG = 8

    session_sockets = False  # its session ends with it: nobody needs to find it again

    def __init__(self, config: moshpit.Config, client_key, address: str):
        super().__init__(config, keys.PrivateKey.generate("mps --ssh"), None)
        self.client_key = client_key
        self.address = address
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.port = 0

    @classmethod
    def start(cls, client_key, address: str) -> OneSessionServer:
        """Configured (the user's server config, if any: e.g. mps.udp_port_range) and
        listening; logs go nowhere."""
        logging.getLogger(moshpit.ROOT_LOGGER).addHandler(logging.NullHandler())
        server = cls(moshpit.load_config("server"), client_key, address)
        server.listen()
        return server

    def listen(self) -> None:
        """TCP on the address ssh came to, on a port of the session port range (the one
        range a firewall has to open)."""
        host = self.address

        def listener(port: int) -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
                sock.listen(self.LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            return sock

        sock = bind_in_range(listener, *self.port_range)
        if sock is None:
            raise MoshpitError("every port in {}-{} is in use".format(*self.port_range))
        self.listeners.append(sock)
        self.port = sock.getsockname()[1]

    def serve(self, unused_exit_secs: float) -> int:
        """Serve the session; stop after ``unused_exit_secs`` if none has started. (After
        the bootstrap detached: the spawner is forked here, before any thread.)"""
        self.spawner = Spawner({"settings": spawner_settings(self.config)},
                               self._process_exited, fork=True)
        timer = threading.Timer(unused_exit_secs, self._stop_if_unused)
        timer.daemon = True
        timer.start()
        return self.serve_forever()

    def _stop_if_unused(self) -> None:
        with self._lock:
            unused = not self._sessions and not self._setting_up
        if unused:
            self._on_signal(signal.SIGTERM, None)

    def acceptable_key(self, user: str, keys) -> Optional[int]:
        if user != self.user:
            return None
        return next((index for index, key in enumerate(keys) if key == self.client_key), None)

    def _authorized_user(self, auth) -> pwd.struct_passwd:
        me = pwd.getpwuid(os.geteuid())
        if auth.user != me.pw_name or auth.client_key != self.client_key:
            raise handshake.AuthRefused(handshake.PERMISSION_DENIED,
                                        "not the user or key of this ssh-bootstrapped session")
        return me

    def session_ended(self, session: SessionProcess) -> None:
        super().session_ended(session)
        self._on_signal(signal.SIGTERM, None)  # its one session has ended: so does the server

    def _stop(self, why: str) -> int:
        """Its session ends with it (no later listener could find it)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.shutdown()
        return super()._stop(why)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """The seed's ``mps [OPTIONS]``, plus --udp-port-range and --generate-host-key. Defaults
    are None so that only flags actually given reach load_config (never masking file/env)."""
    parser = argparse.ArgumentParser(
        prog="mps", description="moshpit server: resilient encrypted remote terminal sessions.")
    moshpit.add_common_flags(parser, "server")
    parser.add_argument("-e", "--enable-std-output", action="store_true",
                        help="also log to stderr (not recommended when running as a daemon)")
    parser.add_argument("--udp-port-range", metavar="LO-HI",
                        help="UDP ports for sessions (default {}-{})".format(
                            *moshpit.DEFAULT_UDP_PORT_RANGE))
    parser.add_argument("--generate-host-key", action="store_true",
                        help="create the host key pair if it does not exist yet")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print-config", action="store_true",
                        help="print every effective setting and where it came from, then exit")
    action.add_argument("--stop", action="store_true",
                        help="stop the mps running with this configuration (its mps.pid_file);"
                             " its sessions keep running")
    action.add_argument("--stop-sessions", action="store_true",
                        help="end every session of the mps with this configuration (their "
                             "clients are told the server shut down)")
    action.add_argument("--session-spawner", metavar="FD", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-V", "--version", action="version",
                        version=f"mps {moshpit.__version__}")
    return parser.parse_args(argv)


def cli_overrides(args: argparse.Namespace) -> Dict[str, object]:
    """Config keys given on the command line (only those given)."""
    settings = moshpit.common_flag_settings(args, "server")
    if args.udp_port_range is not None:
        settings["mps.udp_port_range"] = args.udp_port_range
    return settings


def load_host_key(config: moshpit.Config, generate: bool):
    """The host private key; generated first if asked to and missing. Refuses a key file
    readable by others (moshpit_keys does) and a public key file that does not match."""
    path, pub_path = config["mps.private_key_path"], config["mps.public_key_path"]
    if not os.path.exists(path):
        if not generate:
            raise MoshpitError(
                f"host key {path} not found: create it with "
                f"`{moshpit.program_command('keygen')} generate -f {shlex.quote(path)} -N ''` "
                "(or start mps once with --generate-host-key)")
        try:
            key = keys.create_key_pair(path, pub_path, f"mps@{socket.gethostname()}")
        except keys.KeyFileExists as err:  # the public file (the private one was missing)
            raise MoshpitError(
                f"host key {path} not found, but {err.path} exists; not overwriting it: "
                "restore the host key, or move that file away and generate again "
                "(a public key can be rebuilt from its private key with "
                "`mp_keygen.py pubkey -f KEY`)") from None
        log.info("generated host key %s (%s)", path, key.public.fingerprint())
        return key
    try:
        key = keys.load_private_key(path)
    except keys.PassphraseRequired:
        raise MoshpitError(f"host key {path} is passphrase-protected: mps needs an "
                           "unencrypted host key (mode 0600)")
    if os.path.exists(pub_path) and keys.load_public_key(pub_path) != key.public:
        raise MoshpitError(f"public key {pub_path} does not belong to host key {path}: "
                           "fix -k / mps.public_key_path or regenerate the pair")
    return key


def _raise_fd_limit() -> None:
    """Each session holds a few descriptors; lift the soft limit toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


SUPERVISED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def leave_session_leadership() -> Optional[int]:
    """Make sure the process that serves can never acquire a controlling terminal.

    Why: on Linux (and System V) a session leader without a controlling terminal acquires any
    terminal it opens without O_NOCTTY, and then a ^C typed there stops the server and every
    session. moshpit's own opens all carry O_NOCTTY, but Python's open(), logging and any
    library open by name do not. Under systemd (and setsid, start_new_session) mps starts
    as a session leader, and a session leader cannot stop being one: setsid() fails for it,
    and TIOCNOTTY would only undo an acquisition after a ^C could already have landed.

    So a session leader forks once: the child (same session and process group, but not the
    leader: only a leader can acquire a terminal) does all the work; the parent opens
    nothing, forwards SIGTERM/SIGINT/SIGHUP to it and exits with its status, so the PID that
    a service manager or script knows still stops the server. If the parent is killed
    outright (SIGKILL), the child notices (the pipe it holds closes) and ends the same way,
    as the single process would have. Returns None in the process that goes on to serve,
    else (in the parent) the exit status to return.
    """
    if os.getsid(0) != os.getpid():
        return None
    alive_r, alive_w = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED_SIGNALS)  # none lost
    try:
        child = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise MoshpitError(f"cannot start the server process: {e.strerror or e}")
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(alive_w)
        threading.Thread(target=_end_with_supervisor, args=(alive_r,), daemon=True,
                         name="supervisor-watch").start()
        return None
    os.close(alive_r)

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in SUPERVISED_SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    _, status = os.waitpid(child, 0)  # retried after each forwarded signal (PEP 475)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128+N


def _end_with_supervisor(alive_fd: int) -> None:
    """(Thread of the serving process.) The supervisor holds the write end of ``alive_fd``
    and never writes: end of file means it was killed without a chance to forward a signal.
    Go the same way, so killing the PID that was started still kills the server."""
    while os.read(alive_fd, 1):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


class PidFile:
    """``mps.pid_file``: the running mps's pid, so ``mps --stop`` needs no ``ps`` and a second
    mps with the same configuration is refused before it touches anything. Created atomically
    (a complete file or none: written aside, then hard-linked into place, which fails if the
    name exists) and removed at exit by the process that wrote it."""

    def __init__(self, path: str):
        self.path = path
        self._owned = False

    def pid(self) -> Optional[int]:
        """The pid in the file, or None (no file, or not a pid)."""
        try:
            with open(self.path) as f:
                text = f.read(32).strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise MoshpitError(f"cannot read pid file {self.path}: {e.strerror or e}")
        return int(text) if text.isdigit() and int(text) > 0 else None

    def running(self) -> Optional[int]:
        """The pid in the file if that process is alive and is an mps (after a reboot or a
        crash the number may belong to something else, which must not block a start)."""
        pid = self.pid()
        return pid if pid is not None and _is_mps(pid) else None

    def create(self) -> None:
        """Write our pid; MoshpitError if a live mps holds the file. A stale file is
        replaced (with a log line naming the dead pid)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            moshpit.make_private_dirs(directory)
            for _ in range(3):  # stale file removed -> retry; another mps won -> refused
                aside = f"{self.path}.{os.getpid()}.tmp"
                with open(aside, "w") as f:
                    f.write(f"{os.getpid()}\n")
                try:
                    os.link(aside, self.path)
                    self._owned = True
                    return
                except FileExistsError:
                    pass
                finally:
                    os.unlink(aside)
                other = self.running()
                if other is not None:
                    raise MoshpitError(
                        f"another mps is already running (pid {other}, pid file "
                        f"{self.path}): stop it with `{moshpit.program_command('mps')} "
                        "--stop`, or give this one its own mps.pid_file and mps.port")
                log.info("replacing stale pid file %s (pid %s is not running)", self.path,
                         self.pid() or "?")
                self.discard()
        except OSError as e:
            raise MoshpitError(f"cannot create pid file {self.path}: {e.strerror or e} "
                               "(set mps.pid_file to a writable path)")
        raise MoshpitError(f"cannot create pid file {self.path}: it keeps reappearing")

    def discard(self) -> None:
        """Remove the file whoever wrote it (it was found stale)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        """Remove the file if we wrote it and it still names us."""
        if self._owned and self.pid() == os.getpid():
            self.discard()
        self._owned = False


def _is_mps(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process running mps, as far as we can tell."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's: judge by its command line below
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False  # exited; its parent has not collected it yet
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return True  # no /proc: a live process is the best evidence we have
    return any(os.path.basename(arg) in (b"mps.py", b"mps") for arg in argv)


# mps --stop waits for mps's own shutdown (its shutdown_flush_secs + HANGUP_GRACE_SECS), and
# this much more
STOP_MARGIN_SECS = 2.0


def pid_file_path(config: moshpit.Config) -> str:
    return os.path.expanduser(config["mps.pid_file"]) or moshpit.default_pid_path(config.home)


def stop_server(config: moshpit.Config) -> int:
    """``mps --stop``: SIGTERM the mps named by the pid file and wait for it to exit."""
    pid_file = PidFile(pid_file_path(config))
    pid = pid_file.running()
    if pid is None:
        stale = pid_file.pid()
        if stale is None:
            print(f"mps: no mps is running (no pid file {pid_file.path})", file=sys.stderr)
        else:
            pid_file.discard()
            print(f"mps: no mps is running (pid {stale} in {pid_file.path} has exited; "
                  "removed the stale pid file)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        print(f"mps: cannot stop mps (pid {pid}): it runs as another user; run --stop as "
              "that user or as root", file=sys.stderr)
        return 1
    except ProcessLookupError:
        pass  # exited meanwhile: the loop below reports it
    wait_secs = config["mps.shutdown_flush_secs"] + HANGUP_GRACE_SECS + STOP_MARGIN_SECS
    deadline = time.monotonic() + wait_secs
    while _is_mps(pid):  # a zombie counts as gone: the parent may be slow to reap it
        if time.monotonic() >= deadline:
            print(f"mps: mps (pid {pid}) has not exited {wait_secs:g} s after SIGTERM; "
                  f"`kill -KILL {pid}` ends it at once", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"mps: stopped mps (pid {pid})")
    return 0


class _StartupWarnings(logging.Handler):
    """Until mps has started, copy WARNING records to stderr as ``mps: warning: ...``, so a
    skipped config file or a listener that failed is seen where mps was started (a terminal,
    the systemd journal), not only in the log. Not used with -e, which logs to stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.addFilter(lambda record: record.levelno == logging.WARNING)  # errors: main says

    def emit(self, record: logging.LogRecord) -> None:
        print(f"mps: warning: {record.getMessage()}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging_ready = False
    startup_warnings = None
    pid_file = None
    started = False
    root_logger = logging.getLogger(moshpit.ROOT_LOGGER)
    if args.session_spawner is not None:
        return run_spawner(args.session_spawner)
    try:
        status = leave_session_leadership()
        if status is not None:
            return status  # the supervisor: the child served and has ended
        config = moshpit.load_config("server", cli=cli_overrides(args), path=args.config)
        log_path = args.tracing or moshpit.default_log_path("server", config.home)
        if args.print_config:
            print(moshpit.config_report(config, {"log file": log_path,
                                                 "pid file": pid_file_path(config)}))
            return 0
        if args.stop or args.stop_sessions:
            for warning in config.warnings:
                print(f"mps: warning: {warning}", file=sys.stderr)
            return stop_server(config) if args.stop else stop_sessions(config)
        moshpit.setup_logging("server", config, log_path=log_path,
                              stderr=args.enable_std_output)
        logging_ready = True
        if not args.enable_std_output:
            startup_warnings = _StartupWarnings()
            root_logger.addHandler(startup_warnings)
        for line in config.describe().splitlines():
            log.debug("config: %s", line)
        for warning in config.warnings:
            log.warning("%s", warning)
        pid_file = PidFile(pid_file_path(config))
        pid_file.create()
        # The spawner (and every session process it forks) is started before the listener
        # raises its descriptor limit (the shells get mps's start-up limits) and before the
        # host key is read: it is exec'd, so the key could not reach it anyway.
        spawner = Spawner({"config_path": args.config, "cli": cli_overrides(args),
                           "log_path": log_path, "stderr": args.enable_std_output,
                           "settings": spawner_settings(config)})
        host_key = load_host_key(config, args.generate_host_key)
        _raise_fd_limit()
        server = Server(config, host_key, spawner)
        server.listen()
        started = True
    except MoshpitError as e:
        if logging_ready:
            log.error("%s", e)
        print(f"mps: {e}", file=sys.stderr)
        return 1
    finally:
        if startup_warnings is not None:
            root_logger.removeHandler(startup_warnings)
        if pid_file is not None and not started:
            pid_file.remove()
    log.info("mps %s started (pid %d, host key %s)", moshpit.__version__, os.getpid(),
             host_key.public.fingerprint())
    try:
        return server.serve_forever()
    finally:
        pid_file.remove()


if __name__ == "__main__":
    sys.exit(main())
