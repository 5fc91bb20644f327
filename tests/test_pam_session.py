"""The PAM session as sshd runs it (README "Accounts and login records"): the terminal is
opened while root, so the session stack sees it as PAM_TTY, and handed to the user (owner the
user, group tty, mode 0620); a root monitor per session keeps the PAM handle while its child
(the session process proper) becomes the user, and closes the PAM session as root once that
child has ended, even when it crashed.

A pam_exec script in a private /etc/pam.d/moshpit (an overlay seen only by that mps, see
test_server_login's ``private_etc``) writes one line per call of the session stack: the
call, PAM_TTY, PAM_USER, the uid it runs as, and the children of the process that called it.
Root only (throwaway users)."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import stat

import moshpit_login
import pytest
from proc_util import open_fds, parent_pid, pid_alive, wait_for
from server_util import MpsServer, TestClient
from test_procmodel import status_fields
from test_server_login import private_etc  # noqa: F401  (fixture)
from users_util import authorize, users_fixture  # noqa: F401  (the `users` fixture)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd to create throwaway users"),
]

RECORDER = """#!/bin/sh
echo "$PAM_TYPE tty=$PAM_TTY user=$PAM_USER uid=$(id -u) caller=$PPID \
children=$(cat /proc/$PPID/task/$PPID/children)" >> {log}
"""


@pytest.fixture
def pam_recording(tmp_path, private_etc):  # noqa: F811
    """(python for MpsServer, path of the lines the session stack's pam_exec writes)."""
    if moshpit_login.libpam() is None:
        pytest.skip("no libpam on this machine (apt-get install libpam0g)")
    log = tmp_path / "pam_calls"
    script = tmp_path / "record_pam"
    script.write_text(RECORDER.format(log=log))
    script.chmod(0o755)
    python = private_etc({"pam.d/moshpit": "account required pam_permit.so\n"
                                           f"session required pam_exec.so {script}\n"})
    return python, log


def calls(log) -> list:
    """The recorded calls: one dict per line (type, tty, user, uid, caller, children)."""
    if not log.exists():
        return []
    recorded = []
    for line in log.read_text().splitlines():
        kind, rest = line.split(" ", 1)
        fields = dict(part.split("=", 1) for part in rest.split(" ", 5)[:5])
        fields["children"] = fields["children"].split()
        recorded.append(dict(fields, type=kind))
    return recorded


def closes(log) -> list:
    return [call for call in calls(log) if call["type"] == "close_session"]


def test_pam_sees_the_terminal_and_closes_the_session_as_root(tmp_path, users, pam_recording):
    python, log = pam_recording
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, python=python) as server:
        authorize(alice, server.client_key)
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        tty = client.run("tty")
        (opened,) = calls(log)
        assert (opened["type"], opened["tty"], opened["user"], opened["uid"]) == \
            ("open_session", tty, alice.pw_name, "0")
        # --- the terminal: the user's, group tty, 0620 (as sshd leaves it) ---
        info = os.stat(tty)
        assert info.st_uid == alice.pw_uid
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (grp.getgrnam("tty").gr_gid, 0o620)
        # --- the processes: root monitor -> the user's session process -> shell ---
        worker = parent_pid(int(client.run("echo $$")))
        monitor = parent_pid(worker)
        assert monitor == int(opened["caller"])  # the process that opened PAM stays root
        assert status_fields(monitor)["Uid"].split() == ["0"] * 4
        assert status_fields(worker)["Uid"].split() == [str(alice.pw_uid)] * 4
        monitor_fds = list(open_fds(monitor).values())
        assert tty not in monitor_fds and "/dev/ptmx" not in monitor_fds
        assert not any(target.startswith("socket:") for target in monitor_fds)
        assert closes(log) == []
        client.send("exit\n")
        assert client.wait_closed() == 0
        wait_for(lambda: closes(log), 10, "the PAM session to be closed")
        (closed,) = closes(log)
        assert (closed["tty"], closed["user"], closed["uid"], closed["caller"]) == \
            (tty, alice.pw_name, "0", str(monitor))
        assert len(closed["children"]) == 1  # the script alone: the session process has ended
        assert not pid_alive(worker)
        wait_for(lambda: not pid_alive(monitor), 10, "the monitor to exit")


def test_a_crashed_session_process_still_closes_its_pam_session(tmp_path, users,
                                                                pam_recording):
    """SIGSEGV in the user's session process: the listener logs it with that process's
    pid, its monitor closes the PAM session as root, and the other session goes on.
    SIGTERM to a monitor is passed to its session (the client is told)."""
    python, log = pam_recording
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, python=python,
                   udp_ports=3) as server:
        authorize(alice, server.client_key)
        doomed = TestClient.for_server(server, user=alice.pw_name).connect()
        other = TestClient.for_server(server, user=alice.pw_name).connect()
        doomed_tty, other_tty = doomed.run("tty"), other.run("tty")
        crashed = parent_pid(int(doomed.run("echo $$")))
        os.kill(crashed, signal.SIGSEGV)
        name = doomed.grant.session_id[:4].hex()
        server.wait_log(f"session {name} of {alice.pw_name}: its process {crashed} was "
                        "killed by SIGSEGV")
        (closed,) = closes(log)
        assert (closed["tty"], closed["uid"]) == (doomed_tty, "0")
        assert other.run("echo still fine") == "still fine"
        monitor = parent_pid(parent_pid(int(other.run("echo $$"))))
        os.kill(monitor, signal.SIGTERM)
        wait_for(lambda: other.pump(0.1) or other.shutdown_reason, 10, "the shutdown notice")
        wait_for(lambda: len(closes(log)) == 2, 10, "the second PAM session to be closed")
        assert closes(log)[1]["tty"] == other_tty
        doomed.close()
        other.close()


def test_a_killed_monitor_ends_its_session(tmp_path, users, pam_recording):
    """SIGKILL to a monitor (it cannot pass that on): its child gets SIGTERM from the kernel
    (the parent-death signal) and ends the session as a kill of it would, the client told."""
    python, _log = pam_recording
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, python=python) as server:
        authorize(alice, server.client_key)
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        worker = parent_pid(int(client.run("echo $$")))
        os.kill(parent_pid(worker), signal.SIGKILL)
        wait_for(lambda: client.pump(0.1) or client.shutdown_reason, 10, "the shutdown notice")
        wait_for(lambda: not pid_alive(worker), 10, "the session process to exit")
        client.close()
