"""Process and PTY helpers shared by the integration tests and the benchmark.

Why: every test that runs real programs needs the same three things -- start a process and
be sure it dies at teardown (by its PID, never by name), drive an interactive program
inside a real pseudo-terminal like a user would, and wait for something with a deadline.

    with ManagedProcess(["python3", "mps.py", "-c", cfg], env=env, log=tmp_path / "mps.log") as srv:
        wait_for(lambda: port_open("127.0.0.1", port), 10, "server listening")
        with PtyProcess(["python3", "mp.py", "root@127.0.0.5"], env=env, rows=24, cols=80) as term:
            term.read_until(b"$ ", timeout=10)
            term.send(b"echo hi\\r")
            term.read_until(b"hi", timeout=10)

Everything here is stdlib only and works on Python 3.9+.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from typing import Callable, Optional, Sequence, TypeVar, Union

__all__ = [
    "ManagedProcess",
    "group_members",
    "PtyEOF",
    "PtyProcess",
    "PtyTimeout",
    "kill_pid",
    "pid_alive",
    "pids_with_cmdline",
    "port_open",
    "proc_children",
    "proc_usage",
    "wait_for",
]

T = TypeVar("T")
Pattern = Union[bytes, str, "re.Pattern[bytes]"]


def wait_for(predicate: Callable[[], T], timeout: float, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds, so a failing test
    says what it was waiting for instead of hanging.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to (host, port) succeeds (the connection is closed again)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_socket_open(path: str) -> bool:
    """True if a connection to the Unix socket ``path`` succeeds (closed again). A server
    creates the file at bind(), before listen(): the file alone says nothing."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            return True
    except OSError:
        return False


def _proc_state(pid: int) -> Optional[str]:
    """The process state letter from /proc (``"Z"`` for a zombie), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:][:1].decode()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    state = _proc_state(pid)
    return state is not None and state != "Z"


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (harmless if it is not)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def kill_pid(pid: int, timeout: float = 3.0, group: bool = False) -> None:
    """Stop one process by PID: SIGTERM, wait up to ``timeout``, then SIGKILL.

    With ``group=True`` the signals go to the process group ``pid`` leads (what
    ``start_new_session`` made), so a shell and what it started go too.  Works for
    processes that are not our children (e.g. a daemon that detached).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return
            time.sleep(0.02)
    _reap(pid)


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, resident set size in bytes) of one process, from /proc;
    the CPU time to the nanosecond where the process's CPU clock can be read (/proc counts
    in 10 ms ticks: a 0.2 s figure would be 5% coarse)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    cpu = process_cpu_clock(pid)
    if cpu is None:
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def process_cpu_clock(pid: int) -> Optional[float]:
    """CPU seconds of process ``pid`` (all its threads, dead ones too) from its POSIX CPU
    clock (clock_getcpuclockid, which Python does not wrap), or None where it is not
    available."""
    try:
        getcpuclockid = ctypes.CDLL(None, use_errno=True).clock_getcpuclockid
    except (OSError, AttributeError):
        return None
    clock = ctypes.c_int()
    if getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    try:
        return time.clock_gettime(clock.value)
    except OSError:  # exited meanwhile
        return None


def _all_processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from /proc."""
    rows = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # it exited meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()
        rows.append((int(name), fields[0].decode(), int(fields[1]), int(fields[2])))
    return rows


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    return [pid for pid, state, _ppid, pgrp in _all_processes() if pgrp == pgid and state != "Z"]


def pids_with_cmdline(fragment: bytes) -> list[int]:
    """PIDs whose NUL-separated command line contains ``fragment`` (e.g. b"yes\\0X42"):
    to check that a program a test started remotely is really running.  For looking only;
    stop processes by the PID you started, never by what this finds."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if fragment in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def open_fds(pid: int) -> dict:
    """What ``pid``'s descriptors point at ({"1": "/dev/null", ...}), from /proc/PID/fd; one
    closed while we look (a pipe of the moment) is left out."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return fds


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (from /proc/PID/stat, past the command name in parentheses)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def proc_children(pid: int, recursive: bool = True) -> list[int]:
    """PIDs of the children (and, if ``recursive``, all descendants) of ``pid``."""
    parents: dict[int, list[int]] = {}
    for child, _state, ppid, _pgrp in _all_processes():
        parents.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        if recursive:
            todo.extend(kids)
    return found


class ManagedProcess:
    """A subprocess that is always stopped, by PID, when the ``with`` block ends.

    It runs in its own session (so its process group can be signalled as a whole and a
    Ctrl-C in the test runner's terminal does not reach it).  Output goes to ``log`` (a
    path) if given, else is discarded; ``read_log()`` returns it for failure messages.
    """

    def __init__(self, argv: Sequence[str], env: Optional[dict] = None,
                 cwd: Optional[str] = None, log: Union[str, os.PathLike, None] = None,
                 stdin: Optional[int] = subprocess.DEVNULL, kill_group: bool = True) -> None:
        self.argv = list(argv)
        self.log_path = os.fspath(log) if log is not None else None
        self.kill_group = kill_group
        with open(self.log_path or os.devnull, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=env, cwd=cwd, stdin=stdin, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """Exit status; raises ``subprocess.TimeoutExpired`` if still running."""
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group) if it is still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def read_log(self, tail: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return f.read()[-tail:].decode("utf-8", "replace")

    def close(self, timeout: float = 3.0) -> None:
        """SIGTERM then SIGKILL (the group too, if ``kill_group``); reap. Idempotent."""
        if self.proc.poll() is None:
            kill_pid(self.pid, timeout, group=False)
        if self.kill_group:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # stragglers it left behind
            except (ProcessLookupError, PermissionError):
                pass
            else:
                try:
                    wait_for(lambda: not group_members(self.pid), timeout, "group exit", 0.02)
                except TimeoutError:
                    pass  # unkillable (D state): nothing more we can do
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


class PtyTimeout(TimeoutError):
    """``read_until`` did not see its pattern in time; the message shows the output tail."""


class PtyEOF(EOFError):
    """The program closed the terminal (exited) before the pattern appeared."""


# A program for PtyProcess: runs its arguments as a child in the same terminal, then reports
# their exit status and whether the terminal attributes (termios of the PTY) after it exited
# equal those before it started, as a line WRAPPER_RE matches. Proves a client restored the
# terminal on every way out.
WRAPPER = r"""
import subprocess, sys, termios
before = termios.tcgetattr(0)
rc = subprocess.call(sys.argv[1:])
after = termios.tcgetattr(0)
sys.stdout.write("\r\nWRAPPER rc=%d attrs=%s\r\n"
                 % (rc, "same" if after == before else "DIFF %r -> %r" % (before, after)))
"""
WRAPPER_RE = re.compile(rb"WRAPPER rc=(-?\d+) attrs=(same|DIFF[^\r\n]*)")


class PtyProcess:
    """A program running in a real pseudo-terminal, driven like ``expect``.

    ``send(bytes)`` types into the terminal; ``read_until(pattern, timeout)`` reads the
    terminal's output until ``pattern`` (bytes, str or compiled bytes regex) appears and
    returns everything up to the end of the match.  ``match_time`` is the monotonic time
    at which the chunk completing the match was read (what latency measurements need),
    ``last_match`` the regex match (or None for plain bytes).  Unconsumed output stays
    buffered for the next call.  To keep floods affordable, a buffer that outgrows
    ``max_buffer`` without a match drops its oldest bytes (``bytes_read`` still counts
    them).
    """

    OVERLAP = 4096  # bytes kept across dropped data so a match straddling chunks is found

    def __init__(self, argv: Sequence[str], env: Optional[dict] = None,
                 cwd: Optional[str] = None, rows: int = 24, cols: int = 80,
                 max_buffer: int = 4 * 1024 * 1024) -> None:
        self.argv = list(argv)
        self.max_buffer = max_buffer
        self.buffer = bytearray()
        self.bytes_read = 0
        self.eof = False
        self.match_time = 0.0
        self.last_match: Optional[re.Match] = None
        self._status: Optional[int] = None
        env = dict(os.environ if env is None else env)
        fd, slave = os.openpty()
        try:
            _set_winsize(slave, rows, cols)
            # util-linux's `setsid --ctty` makes the program a session leader with this
            # terminal as its controlling tty, all in C: no Python runs between fork and
            # exec, which forkpty() cannot promise in a test process with relay threads.
            self._proc = subprocess.Popen(["setsid", "--ctty", *self.argv], env=env, cwd=cwd,
                                          stdin=slave, stdout=slave, stderr=slave)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.close(slave)
        self.pid = self._proc.pid
        self.fd = fd
        os.set_blocking(fd, False)

    def __enter__(self) -> PtyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- input / terminal ----------------------------------------------------------

    def send(self, data: Union[bytes, str]) -> None:
        """Type ``data`` (str is UTF-8 encoded); blocks briefly if the terminal is full."""
        if isinstance(data, str):
            data = data.encode()
        view = memoryview(data)
        deadline = time.monotonic() + 10.0
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PtyTimeout("terminal input is not being read") from None
                select.select([], [self.fd], [], 0.1)

    def set_winsize(self, rows: int, cols: int) -> None:
        """Resize the terminal; the kernel sends SIGWINCH to the program."""
        _set_winsize(self.fd, rows, cols)

    # -- output ---------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False on timeout or EOF."""
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError as err:  # Linux reports a closed PTY slave as EIO
            if err.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        self.bytes_read += len(data)
        return True

    def read_until(self, pattern: Pattern, timeout: float) -> bytes:
        """Consume and return output up to the end of the first match of ``pattern``."""
        regex = pattern if isinstance(pattern, re.Pattern) else None
        needle = pattern.encode() if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        scanned = 0  # buffer offset before which no match can start (for plain needles)
        while True:
            if regex is not None:
                match = regex.search(self.buffer)
                end = match.end() if match else -1
            else:
                start = self.buffer.find(needle, scanned)
                end = start + len(needle) if start >= 0 else -1
                scanned = max(0, len(self.buffer) - len(needle) + 1)
                match = None
            if end >= 0:
                self.match_time = time.monotonic()
                out = bytes(self.buffer[:end])
                del self.buffer[:end]
                # Matched again on the returned bytes: a match on the buffer would read the
                # bytes that move into its place once the buffer is consumed.
                self.last_match = regex.search(out) if regex is not None else None
                return out
            scanned = max(0, scanned - self._trim())
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (not self._fill(remaining) and (
                    self.eof or time.monotonic() >= deadline)):
                tail = bytes(self.buffer[-600:])
                if self.eof:
                    raise PtyEOF(f"{self.argv[0]} closed the terminal before {pattern!r}; "
                                 f"output tail: {tail!r}")
                raise PtyTimeout(f"no {pattern!r} from {self.argv[0]} within {timeout:.1f}s; "
                                 f"output tail: {tail!r}")

    def _trim(self) -> int:
        """Drop old output beyond ``max_buffer``; return how many bytes were dropped."""
        if len(self.buffer) <= self.max_buffer:
            return 0
        dropped = len(self.buffer) - self.OVERLAP
        del self.buffer[:dropped]
        return dropped

    def read_chunk(self, timeout: float) -> bytes:
        """Consume and return what is buffered, else wait up to ``timeout`` for output;
        ``b""`` on timeout, PtyEOF once the program has closed the terminal."""
        if not self.buffer:
            self._fill(timeout)
        if not self.buffer and self.eof:
            raise PtyEOF(f"{self.argv[0]} closed the terminal")
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def drain(self, quiet: float = 0.2, limit: float = 10.0) -> bytes:
        """Read until no output arrives for ``quiet`` seconds (at most ``limit`` seconds);
        return and consume everything buffered."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self._fill(quiet):
            self._trim()
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def read_to_eof(self, timeout: float) -> bytes:
        """Everything until the program closes the terminal; PtyTimeout if it does not."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if time.monotonic() >= deadline:
                raise PtyTimeout(f"{self.argv[0]} still running after {timeout:.1f}s; "
                                 f"output tail: {bytes(self.buffer[-600:])!r}")
            self._fill(deadline - time.monotonic())
            self._trim()
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    # -- lifetime ---------------------------------------------------------------------

    def poll(self) -> Optional[int]:
        """Exit status (negative signal number if killed) or None while running."""
        if self._status is None:
            self._status = self._proc.poll()
        return self._status

    def wait(self, timeout: float) -> int:
        """Wait for the exit status; keeps reading output so the program cannot block."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise PtyTimeout(f"{self.argv[0]} did not exit within {timeout:.1f}s")
            if not self._fill(0.05):
                time.sleep(0.01)
            self._trim()
        return self._status  # type: ignore[return-value]

    def close(self, timeout: float = 3.0) -> None:
        """Stop the program (SIGHUP, SIGTERM, SIGKILL to its session by PID), close the fd."""
        if self.poll() is None:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    wait_for(lambda: self.poll() is not None, timeout / 3, "exit", 0.02)
                    break
                except TimeoutError:
                    continue
        if group_members(self.pid):  # anything it started in its session goes too
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
