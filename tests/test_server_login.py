"""Account policy and login records of a real root mps.py, with throwaway users: every
refusal is a real login attempt (the client's exact message, the log's reason), and the
records are read back with the system's own `who`, `last` and `lastlog`."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import moshpit_login
from moshpit_handshake import PERMISSION_DENIED, AuthRefused
from proc_util import open_fds, parent_pid, pid_alive, wait_for
from server_util import MpsServer, TestClient
from test_client_messages import run_in_pty
from test_client_session import MP
from users_util import account_tool, authorize, python_for, users_fixture  # noqa: F401  (`users`)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd to create throwaway users"),
]
NO_PAM = {"mps.use_pam": False}  # the built-in checks (sshd's UsePAM no)


def refused(server, user) -> AuthRefused:
    with pytest.raises(AuthRefused) as caught:
        TestClient.for_server(server, user=user).connect()
    assert caught.value.code == PERMISSION_DENIED
    return caught.value


def assert_logs_in(server, user):
    with TestClient.for_server(server, user=user).connect() as client:
        assert client.run("id -un") == user


@pytest.fixture
def private_etc(tmp_path):
    """``etc_with({"nologin": text, "pam.d/moshpit": text})``: an interpreter for MpsServer
    that runs mps.py in a mount namespace of its own, where those files appear in /etc
    (an overlay). Nothing else on the machine sees them: other tests (and other suites
    running on this machine) keep logging in meanwhile."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is needed")
    count = []

    def etc_with(files: dict) -> str:
        count.append(1)
        base = tmp_path / f"etc{len(count)}"
        upper, work = base / "upper", base / "work"
        for name, text in files.items():
            (upper / name).parent.mkdir(parents=True, exist_ok=True)
            (upper / name).write_text(text)
        work.mkdir(parents=True)
        mount = (f"mount --make-rprivate / && mount -t overlay overlay -o lowerdir=/etc,"
                 f"upperdir={upper},workdir={work} /etc")
        probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True,
                               text=True, timeout=30)
        if probe.returncode:
            pytest.skip(f"cannot mount an overlay over /etc here: {probe.stderr.strip()}")
        wrapper = base / "python"
        wrapper.write_text("#!/bin/sh\n"
                           '[ -n "$_ETC_NS" ] || { export _ETC_NS=1; exec unshare -m "$0" "$@"; }\n'
                           f"{mount} || exit 97\n"
                           f'exec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)
    return etc_with


def test_locked_and_expired_accounts_are_refused(tmp_path, users):
    alice, bob, carol = users.user(), users.user(), users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM,
                   udp_ports=4) as server:
        for pw in (alice, bob, carol):
            authorize(pw, server.client_key)
        account_tool(["usermod", "-L", alice.pw_name])
        account_tool(["usermod", "-e", "1970-01-02", bob.pw_name])
        for pw in (alice, bob):
            assert str(refused(server, pw.pw_name)) == \
                f"permission denied (publickey) for {pw.pw_name}@127.0.0.1"
        server.wait_log(f"account {bob.pw_name} has expired (shadow expiry day 1, 1970-01-02)")
        # Each refusal is logged after it is sent, by its own handshake thread: alice's line
        # may come after bob's on a loaded machine.
        log = server.wait_log(f"refused {alice.pw_name}@127.0.0.1")
        assert f"account {alice.pw_name} is locked" in log
        assert_logs_in(server, carol.pw_name)
        account_tool(["usermod", "-U", alice.pw_name])  # back to "*"
        assert_logs_in(server, alice.pw_name)


def test_a_shell_that_is_not_executable_is_refused(tmp_path, users):
    shell = tmp_path / "shell"
    shell.write_text("#!/bin/sh\n")
    shell.chmod(0o644)
    dan = users.user(shell=str(shell))
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM,
                   udp_ports=4) as server:
        authorize(dan, server.client_key)
        refused(server, dan.pw_name)
        server.wait_log(f"login shell {shell} of {dan.pw_name} is not executable")


def test_nologin_refuses_everyone_but_root_and_shows_its_text(tmp_path, users,
                                                              private_etc):
    alice = users.user()
    nologin = {"nologin": "Down for maintenance until 18:00.\n\x1b[2Jbye\n"}
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM, udp_ports=4,
                   python=private_etc(nologin)) as server:
        authorize(alice, server.client_key)
        refusal = refused(server, alice.pw_name)
        assert str(refusal) == (f"permission denied for {alice.pw_name}@127.0.0.1; the server"
                                " says:\nDown for maintenance until 18:00.\n^[[2Jbye")
        server.wait_log(f"refused {alice.pw_name}@127.0.0.1")
        assert "/etc/nologin exists: logins are disabled for everyone but root" in server.log()
        # What mp.py shows on a terminal: the text, its escape sequence made visible.
        status, shown = run_in_pty(
            [sys.executable, MP, "-s", str(server.port), "-p", server.client_key_path,
             "-t", str(tmp_path / "mp.log"), "--strict-host-key-checking", "accept-new",
             f"{alice.pw_name}@127.0.0.1"], tmp_path)
        assert status == 255
        assert (f"mp: permission denied for {alice.pw_name}@127.0.0.1; the server says:\r\n"
                "Down for maintenance until 18:00.\r\n^[[2Jbye\r\n").encode() in shown
        with open(server.authorized_keys_path) as keys:  # root: its own authorized_keys
            assert server.client_key.public.to_line() in keys.read()
        with MpsServer(tmp_path / "root", settings=NO_PAM,
                       python=private_etc(nologin)) as for_root:
            assert_logs_in(for_root, "root")


def test_allow_and_deny_lists(tmp_path, users):
    staff, blocked = users.group(), users.group()
    alice, bob = users.user(groups=[staff]), users.user(groups=[staff, blocked])
    carol, dave = users.user(), users.user(groups=[staff])
    settings = {**NO_PAM, "mps.allow_users": f"{alice.pw_name} {bob.pw_name} mpu*@127.0.0.1",
                "mps.deny_users": f"{dave.pw_name}", "mps.deny_groups": blocked,
                "mps.allow_groups": staff}
    with MpsServer(tmp_path, authorized_keys_file=False, settings=settings,
                   udp_ports=4) as server:
        for pw in (alice, bob, carol, dave):
            authorize(pw, server.client_key)
        assert_logs_in(server, alice.pw_name)
        for pw, why in ((dave, "is listed in mps.deny_users"),
                        (bob, f"group {blocked} is listed in mps.deny_groups"),
                        (carol, "is in mps.allow_groups")):
            assert str(refused(server, pw.pw_name)) == \
                f"permission denied (publickey) for {pw.pw_name}@127.0.0.1"
            server.wait_log(why)
        assert f"{dave.pw_name} from 127.0.0.1 is listed in mps.deny_users" in server.log()


@pytest.fixture
def utmp():
    """/var/run/utmp for `who` (containers often lack it; systemd makes it at boot), held
    under a lock: a test that created it removes it at the end, and xdist's groups do not
    keep two such tests apart."""
    if not shutil.which("who") or not shutil.which("last"):
        pytest.skip("who (coreutils) and last (util-linux) are needed")
    if not os.path.exists(moshpit_login.WTMP_PATH):
        pytest.skip(f"{moshpit_login.WTMP_PATH} does not exist")
    with open("/tmp/moshpit-tests-utmp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = not os.path.exists(moshpit_login.UTMP_PATH)
        if created:
            fd = os.open(moshpit_login.UTMP_PATH, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o664)
            os.close(fd)
        try:
            yield moshpit_login.UTMP_PATH
        finally:
            if created:
                os.unlink(moshpit_login.UTMP_PATH)


def who(user: str) -> list:
    out = subprocess.run(["who"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.split()[:1] == [user]]


def last(user: str) -> list:
    out = subprocess.run(["last", "-w", "-i", user], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line.split()[:1] == [user]]


def shell_pid(server, user: str, earlier: int = 0) -> int:
    """The pid of the user's shell that the server's log names after ``earlier`` others (mps
    logs a session's start a moment after its session is running)."""
    pids = wait_for(lambda: started_shells(server, user)[earlier:], 10,
                    f"the server's log to name {user}'s shell")
    return int(pids[0])


def started_shells(server, user: str) -> list:
    """The pids of the user's shells, as the server's log names them, in order."""
    return re.findall(rf"started for {user} from \S+ \(udp port \d+, shell pid (\d+)\)",
                      server.log())


def test_who_last_lastlog_and_loginuid(tmp_path, users, utmp):
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM,
                   udp_ports=4) as server:
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            tty = client.run("tty")[len("/dev/"):]
            (line,) = who(alice.pw_name)
            assert line.split()[1] == tty and line.endswith("(127.0.0.1)")
            (line,) = last(alice.pw_name)
            assert tty in line and "127.0.0.1" in line and "still logged in" in line
            assert client.run("cat /proc/self/loginuid") == str(alice.pw_uid)
            client.send("exit 3\n")
            assert client.wait_closed() == 3
        server.wait_log(f"of {alice.pw_name} ended")
        wait_for(lambda: not who(alice.pw_name), 10, "the utmp record to be closed")
        (line,) = wait_for(lambda: [line for line in last(alice.pw_name)
                                    if re.search(r" - \d\d:\d\d +\(00:\d\d\)$", line)],
                           10, "`last` to show the logout")
        if shutil.which("lastlog"):
            out = subprocess.run(["lastlog", "-u", alice.pw_name], capture_output=True,
                                 text=True).stdout
            assert tty in out and "127.0.0.1" in out


def test_a_shell_that_ignores_the_hangup_cannot_hide_the_next_login_on_its_tty(tmp_path, users,
                                                                             utmp):
    """The attack: alice's shell ignores SIGHUP and lets go of its terminal, so the tty is
    free the moment mps closes the PTY master, while mps still waits HANGUP_GRACE_SECS for
    the shell to exit. Bob's login then gets that tty. A logout record written after that
    wait (mps did so until 61d5705) blanks bob's utmp entry, and `who` no longer shows him:
    the logout must be written before the master closes, as sshd does."""
    alice, bob = users.user(), users.user()
    with MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM,
                   udp_ports=4) as server:
        for user in (alice, bob):
            authorize(user, server.client_key)
        for _ in range(5):  # another test may take the freed tty first: try again
            tty, pid, killed = _quit_leaving_a_shell_that_ignores_the_hangup(server, alice)
            with TestClient.for_server(server, user=bob.pw_name).connect() as client:
                if client.run("tty") != f"/dev/{tty}":
                    client.quit()  # (closing alone would leave bob's session detached)
                    continue
                wait_for(lambda: server.log().count(GAVE_UP) > killed, 15,  # noqa: B023
                         "mps to give up waiting for alice's shell")
                wait_for(lambda: not pid_alive(pid), 10, "alice's shell to be killed")  # noqa: B023
                assert tty in [line.split()[1] for line in who(bob.pw_name)], \
                    "the late logout of the tty's last user blanked bob's login record"
                return
        pytest.skip("the tty alice's session freed went to another test's PTY every time")


GAVE_UP = "ignored SIGHUP: killing it"  # mps's log, HANGUP_GRACE_SECS after the hangup


def _quit_leaving_a_shell_that_ignores_the_hangup(server, user) -> tuple:
    """Log ``user`` in, turn the shell (same pid: the one mps waits for) into a process that
    ignores SIGHUP and has no descriptor on its tty, and quit. (tty, shell pid, how many
    times the server's log said GAVE_UP before.)"""
    earlier = len(started_shells(server, user.pw_name))
    with TestClient.for_server(server, user=user.pw_name).connect() as client:
        tty = client.run("tty")[len("/dev/"):]
        client.send("exec sh -c \"trap '' HUP; exec sleep 60 </dev/null >/dev/null 2>&1\"\n")
        pid = shell_pid(server, user.pw_name, earlier)
        wait_for(lambda: not _tty_fds(pid), 10, "the shell to let go of its tty")
        killed = server.log().count(GAVE_UP)
        client.quit()
    return tty, pid, killed


def _tty_fds(pid: int) -> list:
    """What process ``pid`` has open on a /dev/pts tty."""
    return [path for path in open_fds(pid).values() if path.startswith("/dev/pts/")]


def test_records_of_sessions_that_ended_while_mps_was_down_are_closed(tmp_path, users,
                                                                      utmp):
    alice = users.user()
    server = MpsServer(tmp_path, authorized_keys_file=False, settings=NO_PAM,
                   udp_ports=4)
    try:
        authorize(alice, server.client_key)
        client = TestClient.for_server(server, user=alice.pw_name).connect()
        client.run("true")
        pid = shell_pid(server, alice.pw_name)
        assert len(who(alice.pw_name)) == 1
        os.kill(server.proc.pid, signal.SIGKILL)  # its serving child follows at once
        server.proc.wait(10)
        client.close()
        # The session outlives the listener; it ends (its process killed) while none runs.
        os.kill(parent_pid(pid), signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, "the shell to end with its terminal")
        # (Not checked that the record is still open here: in a parallel run any other mps
        # that starts closes it, as it should.)
        server.start()
        # Any mps that starts closes every stale moshpit record on the machine: in a parallel
        # run another test's server may get there first, so wait for the outcome, not our log.
        wait_for(lambda: who(alice.pw_name) == [], 10, "`who` to drop the stale record")
        wait_for(lambda: [line for line in last(alice.pw_name)
                          if re.search(r" - \d\d:\d\d +\(00:\d\d\)$", line)],
                 10, "`last` to show the logout")
    finally:
        server.stop()


def test_pam_account_management(tmp_path, users, private_etc):
    if moshpit_login.libpam() is None:
        pytest.skip("no libpam on this machine (apt-get install libpam0g)")
    alice, bob = users.user(), users.user()
    subprocess.run(["usermod", "-L", bob.pw_name], check=True)  # "!*": PAM's business now
    access = tmp_path / "access.conf"
    access.write_text(f"-:{alice.pw_name}:ALL\n+:ALL:ALL\n")
    nologin = tmp_path / "nologin"
    python = private_etc({"pam.d/moshpit": f"account required pam_nologin.so file={nologin}\n"
                                           f"account required pam_access.so"
                                           f" accessfile={access}\n"
                                           "account required pam_permit.so\n"})
    with MpsServer(tmp_path, authorized_keys_file=False, udp_ports=4,  # use_pam by default
                   python=python) as server:
        for pw in (alice, bob):
            authorize(pw, server.client_key)
        assert str(refused(server, alice.pw_name)) == \
            f"permission denied (publickey) for {alice.pw_name}@127.0.0.1"
        server.wait_log(f"PAM account management for {alice.pw_name}: Permission denied")
        assert_logs_in(server, bob.pw_name)  # locked, but PAM decides (sshd's UsePAM yes)
        nologin.write_text("PAM says: back soon\n")
        refusal = refused(server, bob.pw_name)
        assert str(refusal).endswith("; the server says:\nPAM says: back soon")


def test_a_server_without_root_says_what_it_skips(users):
    """It can read neither /etc/shadow nor the records: shell and lists only, said once."""
    carol = users.user()
    subprocess.run(["usermod", "-L", carol.pw_name], check=True)  # unseen without root
    server = MpsServer(carol.pw_dir, run_as=carol, python=python_for(carol), udp_ports=2,
                       authorized_keys_file=False, start=False,
                       settings={"mps.deny_groups": "root"})
    authorize(carol, server.client_key)
    with server.start():
        for _ in range(2):
            assert_logs_in(server, carol.pw_name)
        log = server.wait_log("no utmp/wtmp/lastlog records")
        assert log.count("not running as root: /etc/shadow is not readable, so locked and"
                         " expired accounts are not checked") == 1
        assert log.count("not running as root: PAM is not used") == 1
