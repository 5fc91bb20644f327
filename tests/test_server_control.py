"""Looking at and controlling a running mps without ``ps``: ``--print-config``, the pid file
and ``--stop``, and start-up warnings shown where mps was started (a terminal) and logged.
Each test runs the real mps.py and checks what the user sees and the files on disk."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from proc_util import PtyProcess, wait_for
from server_util import MpsServer, run_mps

import moshpit

pytestmark = pytest.mark.timeout(60)


def pid_file_of(server: MpsServer) -> str:
    return os.path.join(server.home, ".config", "moshpits", "mps.pid")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_print_config_shows_every_setting_its_source_and_the_files(tmp_path):
    home = tmp_path / "home"
    conf = tmp_path / "moshpits.toml"
    conf.write_text('[mps]\nip = "127.0.0.1"\nprot = 1\n')
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "MOSHPITS_MPS_PORT": "4242"}
    result = run_mps(["--print-config", "-c", str(conf), "--udp-port-range", "50000-50010"],
                     env)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"# config file: {conf}",
                         f"# log file: {home}/.config/moshpits/logs/moshpits.log",
                         f"# pid file: {home}/.config/moshpits/mps.pid"]
    assert "mps.port = 4242  (environment MOSHPITS_MPS_PORT)" in lines
    assert f'mps.ip = "127.0.0.1"  (file {conf})' in lines
    assert 'mps.udp_port_range = "50000-50010"  (command line)' in lines
    assert "mps.max_sessions = 256  (default)" in lines
    assert 'mps.pid_file = ""  (default)' in lines
    settings = [line.split(" = ")[0] for line in lines if not line.startswith("#")]
    assert settings == list(moshpit.SCHEMAS["server"])  # every setting, once, in order
    assert lines[-1] == (f"# warning: config file {conf}: ignoring unknown key mps.prot "
                         "(did you mean mps.port?)")
    assert not home.exists()  # only looked: no log, no pid file, no key written


def test_stop_ends_the_running_server_and_its_pid_file(tmp_path):
    with MpsServer(tmp_path) as server:
        pid_file = pid_file_of(server)
        serving_pid = server.serving_pid
        assert read(pid_file) == f"{serving_pid}\n"
        assert os.stat(os.path.dirname(pid_file)).st_mode & 0o077 == 0
        result = run_mps(["--stop", "-c", server.config_path], server.env)
        assert (result.returncode, result.stdout, result.stderr) == (
            0, f"mps: stopped mps (pid {serving_pid})\n", "")
        assert server.proc.wait(5) == 0
        assert not os.path.exists(pid_file)
        assert "SIGTERM received" in server.log() and "mps stopped" in server.log()
        again = run_mps(["--stop", "-c", server.config_path], server.env)
        assert (again.returncode, again.stdout, again.stderr) == (
            1, "", f"mps: no mps is running (no pid file {pid_file})\n")


def test_a_second_server_on_the_same_pid_file_is_refused(tmp_path):
    with MpsServer(tmp_path) as first:
        pid_file = pid_file_of(first)
        other_port = MpsServer(tmp_path / "b", start=False).port
        result = run_mps(["-c", first.config_path, "-t", first.log_path],
                         dict(first.env, MOSHPITS_MPS_PORT=str(other_port)))
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == (
            f"mps: another mps is already running (pid {first.serving_pid}, pid file "
            f"{pid_file}): stop it with `python3 mps.py --stop`, or give this one its own "
            "mps.pid_file and mps.port\n")
        assert read(pid_file) == f"{first.serving_pid}\n"  # the first one's, untouched
        assert first.proc.poll() is None


def test_a_stale_pid_file_neither_blocks_a_start_nor_fools_stop(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    not_mps = os.getpid()  # alive, but pytest: a reused pid after a reboot looks like this
    for n, pid in enumerate((dead.pid, not_mps)):
        server = MpsServer(tmp_path / str(n), start=False,
                           settings={"mps.pid_file": str(tmp_path / f"mps{n}.pid")})
        (tmp_path / f"mps{n}.pid").write_text(f"{pid}\n")
        with server.start():
            assert read(str(tmp_path / f"mps{n}.pid")) == f"{server.serving_pid}\n"
            server.wait_log(f"replacing stale pid file {tmp_path}/mps{n}.pid "
                            f"(pid {pid} is not running)")
    stale = tmp_path / "mps0.pid"
    stale.write_text(f"{dead.pid}\n")
    result = run_mps(["--stop"], {"HOME": str(tmp_path), "PATH": os.environ["PATH"],
                                  "MOSHPITS_MPS_PID_FILE": str(stale)})
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"mps: no mps is running (pid {dead.pid} in {stale} has exited; "
                             "removed the stale pid file)\n")
    assert not stale.exists()


def _run_on_terminal(argv, server: MpsServer) -> str:
    """Start mps on a pseudo-terminal as a user would; the terminal's text once listening."""
    with PtyProcess(argv, env=server.env, cwd=server.dir) as terminal:
        def listening():
            assert terminal.poll() is None, terminal.drain().decode("utf-8", "replace")
            return "listening on" in server.log()
        wait_for(listening, 20, "mps to listen")
        shown = terminal.drain(quiet=0.3).decode("utf-8", "replace").replace("\r\n", "\n")
        assert terminal.poll() is None, shown
    return shown


def test_startup_warnings_show_on_the_terminal_and_in_the_log(tmp_path):
    server = MpsServer(tmp_path, start=False, settings={"mps.prot": 1})
    warning = (f"config file {server.config_path}: ignoring unknown key mps.prot "
               "(did you mean mps.port?)")
    shown = _run_on_terminal(server.command(), server)
    assert shown == f"mps: warning: {warning}\n"  # and nothing else: INFO lines go to the log
    assert re.search(rf"WARNING +{re.escape(warning)}\n", server.log())
