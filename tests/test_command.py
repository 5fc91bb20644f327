"""``mp host -- command``: a real mp.py running a command through a real mps.py on loopback.

Without a PTY (stdin not a terminal, or -T) the bytes pass untouched both ways and stdin's
EOF reaches the command; with one (stdin a terminal, or --tty) the command sees a terminal.
The command's exit status is mp's.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import termios

import pytest
from proc_util import PtyProcess, wait_for
from server_util import shared_server
from test_client_session import client_env, client_log, mp_args

pytestmark = pytest.mark.timeout(120)


server = shared_server()


def mp_command(server, tmp_path, *command, flags=()) -> list:
    return mp_args(server, tmp_path, *flags) + ["--", *command]


def run_mp(server, tmp_path, *command, flags=(), stdin=b"") -> subprocess.CompletedProcess:
    """mp.py with pipes on all three: subprocess.run kills it (by PID) if it overruns."""
    return subprocess.run(mp_command(server, tmp_path, *command, flags=flags),
                          env=client_env(tmp_path), input=stdin, capture_output=True,
                          timeout=60)


def test_piped_output_is_a_byte_exact_copy(server, tmp_path):
    data = os.urandom(1 << 20)  # every byte value, CR and LF included: no terminal mangling
    source = tmp_path / "random.bin"
    source.write_bytes(data)
    copy = tmp_path / "copy.bin"
    with open(copy, "wb") as out:
        result = subprocess.run(mp_command(server, tmp_path, "cat", str(source)),
                                env=client_env(tmp_path), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert b"closed" not in result.stderr  # ssh says "Connection closed" only with a PTY
    assert "Traceback" not in client_log(tmp_path)


def test_the_command_exit_status_is_mp_exit_status(server, tmp_path):
    # Joined with spaces and run by the remote shell with -c, as ssh does.
    assert run_mp(server, tmp_path, "sh", "-c", "'exit 7'").returncode == 7
    assert run_mp(server, tmp_path, "true").returncode == 0


def test_stdin_reaches_the_command_and_its_eof_ends_it(server, tmp_path):
    data = os.urandom(300_000)
    result = run_mp(server, tmp_path, "wc", "-c", stdin=data)
    assert (result.returncode, result.stdout.strip()) == (0, str(len(data)).encode())
    result = run_mp(server, tmp_path, "cat", stdin=data)  # and back, byte for byte
    assert result.stdout == data


def test_no_pty_when_piped_or_with_T_and_one_with_tty(server, tmp_path):
    result = run_mp(server, tmp_path, "tty")
    assert (result.returncode, result.stdout) == (1, b"not a tty\n")
    result = run_mp(server, tmp_path, "tty", flags=["--tty"])
    assert result.returncode == 0 and re.match(rb"/dev/pts/\d+\r\n$", result.stdout)
    assert b"Connection to 127.0.0.1 closed." in result.stderr


def test_a_command_from_a_terminal_gets_a_pty_unless_T(server, tmp_path):
    env = client_env(tmp_path)
    with PtyProcess(mp_command(server, tmp_path, "tty"), env=env) as term:
        term.read_until(re.compile(rb"/dev/pts/\d+\r\n"), 30)
        assert term.wait(30) == 0
    # -T: no remote terminal, and the local one stays cooked: cat reads a line, and
    # Ctrl-D (EOF of the cooked terminal) ends its input.
    with PtyProcess(mp_command(server, tmp_path, "sh", "-c", "'tty; cat'", flags=["-T"]),
                    env=env) as term:
        term.read_until(b"not a tty", 30)
        term.send(b"line one\n")
        term.read_until(b"line one", 10)
        term.send(b"\x04")
        assert term.wait(30) == 0


def test_a_plain_session_still_gets_a_login_shell_on_a_pty(server, tmp_path):
    """No command and stdin piped: the login shell on a PTY, as before commands existed."""
    result = subprocess.run(mp_args(server, tmp_path), env=client_env(tmp_path),
                            input=b"tty; echo $0; exit 3\n", capture_output=True, timeout=60)
    assert result.returncode == 3
    assert re.search(rb"/dev/pts/\d+\r\n-\w+\r\n", result.stdout)


def test_a_too_long_command_is_refused_with_one_clear_line(server, tmp_path):
    result = run_mp(server, tmp_path, "echo", "x" * (64 * 1024))
    assert result.returncode == 255
    assert b"longer than" in result.stderr and b"Traceback" not in result.stderr


def _local_attrs(term: PtyProcess) -> list:
    return termios.tcgetattr(term.fd)  # Linux: the master reports the terminal's modes


def _is_raw(term: PtyProcess) -> bool:
    lflag = _local_attrs(term)[3]
    return not lflag & (termios.ICANON | termios.ECHO)


def test_escape_ctrl_z_suspends_mp_with_the_terminal_restored(server, tmp_path):
    """Under an interactive bash (job control): Ctrl-^ Ctrl-Z stops mp ("Stopped"), the
    terminal is cooked for the local shell, ``fg`` brings back raw mode and the session."""
    argv = ["bash", "--norc", "--noprofile", "-i"]
    env = client_env(tmp_path, PS1="local$ ")
    with PtyProcess(argv, env=env) as term:
        term.read_until(b"local$ ", 15)
        term.send(shlex.join(mp_args(server, tmp_path)) + "\r")
        term.send("echo REMOTE-$((40+2))\r")
        term.read_until(re.compile(rb"[\r\n]REMOTE-42\r\n"), 30)
        wait_for(lambda: _is_raw(term), 10, "mp's raw mode")
        term.send(b"\x1e\x1a")
        term.read_until(b"Stopped", 15)
        term.read_until(b"local$ ", 15)
        term.send("stty -a\r")
        modes = term.read_until(b"local$ ", 15)
        assert re.search(rb"[\s;]icanon[\s;]", modes) and re.search(rb"[\s;]echo[\s;]", modes)
        term.send("fg\r")
        wait_for(lambda: _is_raw(term), 10, "raw mode after fg")
        term.send("echo BACK-$((50+5))\r")
        term.read_until(re.compile(rb"[\r\n]BACK-55\r\n"), 30)
        term.send("exit 4\r")
        term.read_until(b"local$ ", 30)
        term.send("echo status=$?; stty -a\r")
        out = term.read_until(re.compile(rb"status=4\r\n.*local\$ ", re.S), 15)
        assert re.search(rb"[\s;]icanon[\s;]", out) and re.search(rb"[\s;]echo[\s;]", out)
        term.send("exit\r")
        term.wait(10)
    assert "Traceback" not in client_log(tmp_path)


# A minimal job-control shell: runs its arguments as the terminal's foreground job, and
# when the job stops reports the terminal exactly as the job left it (bash would put its
# own modes back first), then on a line of input continues the job in the foreground.
JOB_SHELL = r"""
import os, signal, subprocess, sys, termios
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
job = subprocess.Popen(sys.argv[1:], preexec_fn=os.setpgrp)
os.tcsetpgrp(0, job.pid)
_, status = os.waitpid(job.pid, os.WUNTRACED)
lflag = termios.tcgetattr(0)[3]
os.tcsetpgrp(0, os.getpgrp())
print("job", "stopped" if os.WIFSTOPPED(status) else "ended",
      "icanon" if lflag & termios.ICANON else "-icanon",
      "echo" if lflag & termios.ECHO else "-echo",
      "blocking" if os.get_blocking(0) else "nonblocking", flush=True)
sys.stdin.readline()
os.tcsetpgrp(0, job.pid)
os.killpg(job.pid, signal.SIGCONT)
print("job status", job.wait(), flush=True)
"""


def test_the_terminal_is_restored_before_mp_stops_and_raw_after(server, tmp_path):
    argv = [sys.executable, "-c", JOB_SHELL, *mp_args(server, tmp_path)]
    with PtyProcess(argv, env=client_env(tmp_path)) as term:
        term.send("echo REMOTE-$((40+2))\r")
        term.read_until(re.compile(rb"[\r\n]REMOTE-42\r\n"), 30)
        term.send(b"\x1e\x1a")
        term.read_until(b"job stopped icanon echo blocking\r\n", 15)
        term.send("\r")  # the job shell's "fg"
        wait_for(lambda: _is_raw(term), 10, "raw mode after the job continued")
        term.send("echo BACK-$((50+5))\r")
        term.read_until(re.compile(rb"[\r\n]BACK-55\r\n"), 30)
        term.send("exit 4\r")
        term.read_until(b"job status 4", 30)
        assert not _is_raw(term)


def test_stderr_is_carried_apart_from_stdout_both_byte_exact(server, tmp_path):
    out, err = os.urandom(1 << 20), os.urandom(300_000)
    (tmp_path / "out.bin").write_bytes(out)
    (tmp_path / "err.bin").write_bytes(err)
    script = f"'cat {tmp_path}/err.bin >&2 & cat {tmp_path}/out.bin; wait; exit 3'"
    result = run_mp(server, tmp_path, "sh", "-c", script)
    assert result.returncode == 3
    assert result.stdout == out
    assert err in result.stderr  # after mp's own "Permanently added" line
