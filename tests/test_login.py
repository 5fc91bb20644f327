"""moshpit_login's parts on their own: the shadow parser, the account policy and its order,
sshd-style user patterns, the utmp record layout (checked against util-linux's utmpdump),
utmp/wtmp/lastlog writing on scratch files, stale records, and PAM through ctypes with
throwaway service files (root; skipped without libpam)."""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import shutil
import struct
import subprocess
import time

import pytest
import moshpit_login as login
from moshpit import MoshpitError

pytestmark = pytest.mark.timeout(60)
DAY = 86400
NOW = 1_800_000_000.0  # a fixed "now": day 20833
TODAY = int(NOW // DAY)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (reads a shadow file "
                                                           "as root, writes PAM service files)")


def fake_pw(name="alice", uid=1234, shell="/bin/sh", gid=0) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", "/nonexistent", shell))


# -- shadow -------------------------------------------------------------------------------


def test_parse_shadow_fields_and_garbage():
    data = (b"root:$6$salt$hash:19000:0:99999:7:::\n"
            b"alice:!:19000:0:99999:7::20000:\n"
            b"bob:*LK*:::::::\n"
            b"carol:!$6$x$y:19000::::::\n"
            b"broken line\n"
            b"dave:x:notanumber:0:0:0:::\n"
            b"eve:$1$a:1:2:3:4:5:6:\n"
            b"alice:later-duplicate:::::::\n"
            b"\n")
    entries = login.parse_shadow(data)
    assert set(entries) == {"root", "alice", "bob", "carol", "eve"}
    assert entries["eve"] == login.ShadowEntry("eve", "$1$a", 1, 2, 3, 4, 5, 6)
    assert entries["alice"].expire_day == 20000 and entries["alice"].password == "!"
    assert entries["bob"].last_change is None and entries["bob"].expire_day is None
    assert [name for name in entries if entries[name].locked()] == ["alice", "bob", "carol"]


def test_locked_and_expired_follow_sshd():
    entry = login.ShadowEntry("a", "*", 19000, 0, 1, 7, None, None)
    assert not entry.locked()  # "*": no password (key-only), not locked, for sshd neither
    assert not entry.expired(TODAY)  # an aged password does not stop a key login
    assert login.ShadowEntry("a", "!!", None, None, None, None, None, None).locked()
    expires = login.ShadowEntry("a", "*", None, None, None, None, None, TODAY)
    assert not expires.expired(TODAY)  # sshd: expired from the day after sp_expire
    assert expires.expired(TODAY + 1)


@root_only
def test_shadow_entry_reads_a_bounded_regular_file(tmp_path):
    path = tmp_path / "shadow"
    path.write_bytes(b"alice:!:1:::::1:\n")
    assert login.shadow_entry("alice", str(path)).expire_day == 1
    assert login.shadow_entry("nobody-here", str(path)) is None
    assert login.shadow_entry("alice", str(tmp_path / "missing")) is None
    os.mkfifo(tmp_path / "fifo")  # never waited on
    with pytest.raises(OSError):
        login.shadow_entry("alice", str(tmp_path / "fifo"))


# -- policy -------------------------------------------------------------------------------


def policy(tmp_path, shadow=b"", nologin=None, use_pam=False, **lists):
    (tmp_path / "shadow").write_bytes(shadow)
    nologin_path = tmp_path / "nologin"
    if nologin is not None:
        nologin_path.write_bytes(nologin)
    return login.AccountPolicy(lists, use_pam=use_pam, shadow_path=str(tmp_path / "shadow"),
                               nologin_paths=[str(nologin_path)])


@root_only
def test_policy_refusals_in_sshds_order(tmp_path):
    shadow = (b"alice:!:19000::::::\n"
              b"bob:*:19000:::::" + str(TODAY - 1).encode() + b":\n"
              b"carol:*:19000::::::\n")
    rules = policy(tmp_path, shadow, nologin=b"down for maintenance\n",
                   deny_users="alice bob carol", deny_groups="root")

    def why(pw):
        refusal = rules.refusal(pw, "127.0.0.1", now=NOW)
        return refusal and str(refusal)
    # locked/expired first, then the shell, then the lists; nologin last
    assert "account alice is locked" in why(fake_pw("alice"))
    assert "account bob has expired" in why(fake_pw("bob"))
    assert why(fake_pw("carol", shell="/nonexistent")) == \
        "login shell /nonexistent of carol does not exist"
    assert why(fake_pw("carol", shell="/etc")) == "login shell /etc of carol is not executable"
    assert why(fake_pw("carol")) == "carol from 127.0.0.1 is listed in mps.deny_users"
    assert why(fake_pw("dave")) == "dave from 127.0.0.1: group root is listed in mps.deny_groups"
    free = policy(tmp_path, shadow, nologin=b"down for maintenance\n")
    refusal = free.refusal(fake_pw("dave"), "127.0.0.1", now=NOW)
    assert refusal.client_message == "down for maintenance"
    assert str(refusal).startswith(f"{tmp_path}/nologin exists: logins are disabled")
    assert free.refusal(fake_pw("root", uid=0), "127.0.0.1", now=NOW) is None  # root may


@root_only
def test_policy_with_pam_leaves_locked_expired_nologin_to_pam(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(login, "pam_account_refusal",
                        lambda user, rhost, service: asked.append((user, rhost)))
    rules = policy(tmp_path, b"alice:!:1::::::1:\n", nologin=b"", use_pam=True)
    assert rules.refusal(fake_pw("alice"), "::1", now=NOW) is None
    assert asked == [("alice", "::1")]
    rules = policy(tmp_path, use_pam=True, deny_users="alice")  # the lists are still ours
    assert "mps.deny_users" in str(rules.refusal(fake_pw("alice"), "::1", now=NOW))
    assert asked == [("alice", "::1")]


def test_allow_lists(tmp_path):
    rules = policy(tmp_path, allow_users="al* ?ob carol@127.0.0.1 dave@10.0.0.0/8,!10.9.*")
    for name, address in (("alice", "::1"), ("alfred", "1.2.3.4"), ("bob", "::1"),
                          ("carol", "127.0.0.1"), ("dave", "10.1.2.3")):
        assert rules._list_refusal(fake_pw(name), address) is None, (name, address)
    for name, address in (("rob2", "::1"), ("carol", "127.0.0.2"), ("dave", "10.9.0.1"),
                          ("dave", "::1"), ("Alice", "::1")):
        assert rules._list_refusal(fake_pw(name), address) == \
            f"{name} from {address} is not listed in mps.allow_users"
    root = pwd.getpwuid(0)
    groups = policy(tmp_path, allow_groups="wheel adm")
    assert "none of the groups root is in mps.allow_groups" in groups._list_refusal(root, "::1")
    assert policy(tmp_path, allow_groups="r?o*")._list_refusal(root, "::1") is None
    both = policy(tmp_path, allow_users="root", deny_users="r*")  # deny comes first
    assert "mps.deny_users" in both._list_refusal(root, "::1")


def test_bad_patterns_name_the_setting(tmp_path):
    with pytest.raises(MoshpitError, match=r"mps.allow_users: bad pattern 'bob@10.0.0.1/8'"):
        policy(tmp_path, allow_users="alice bob@10.0.0.1/8")
    with pytest.raises(MoshpitError, match="mps.deny_users: bad pattern 'x@'"):
        policy(tmp_path, deny_users="x@")


def test_nologin_text_is_capped_and_defaulted(tmp_path):
    path = tmp_path / "nologin"
    path.write_bytes(b"x" * 5000)
    assert login.nologin_text([str(path)]) == (str(path), "x" * login.MAX_NOLOGIN_BYTES)
    path.write_bytes(b"\n")
    assert login.nologin_text([str(path)])[1] == "Logins are currently disabled."
    assert login.nologin_text([str(tmp_path / "none")]) is None


# -- utmp / wtmp / lastlog ------------------------------------------------------------------


def test_utmp_layout_round_trip():
    entry = login.UtmpEntry(login.USER_PROCESS, 4242, "pts/17", b"mh", "alice",
                            "192.0.2.7", 1_700_000_000.25, bytes([192, 0, 2, 7]), 4242)
    packed = entry.pack()
    assert len(packed) == login.UTMP_SIZE == 384
    assert struct.unpack_from("<h", packed, 0)[0] == 7
    assert packed[8:14] == b"pts/17" and packed[40:42] == b"mh" and packed[44:49] == b"alice"
    assert struct.unpack_from("<iii", packed, 336) == (4242, 1_700_000_000, 250000)
    back = login.UtmpEntry.unpack(packed)
    assert (back.type, back.pid, back.line, back.id, back.user, back.host, back.time) == \
        (7, 4242, "pts/17", b"mh", "alice", "192.0.2.7", 1_700_000_000.25)
    dead = login.UtmpEntry(login.DEAD_PROCESS, 4242, "pts/17", b"mh", "", "", 0.0,
                           exit_signal=9, exit_status=0)
    assert struct.unpack_from("<hh", dead.pack(), 332) == (9, 0)  # struct exit_status
    assert login.UtmpEntry.unpack(dead.pack()).exit_signal == 9
    assert login._utmp_id("pts/17") == b"mh" and login._utmp_id("pts/1295") == b"mzz"
    assert login._utmp_id("tty1") == b"tty1"


@pytest.mark.skipif(not shutil.which("utmpdump"), reason="utmpdump (util-linux) not installed")
def test_utmpdump_reads_our_records(tmp_path):
    path = tmp_path / "wtmp"
    path.write_bytes(b"")
    when = 1_700_000_000.5
    assert login.append_wtmp(login.UtmpEntry(login.USER_PROCESS, 99, "pts/5", b"m5", "alice",
                                             "2001:db8::1", when,
                                             login._packed_address("2001:db8::1")), str(path))
    out = subprocess.run(["utmpdump", str(path)], capture_output=True, text=True,
                         check=True).stdout
    fields = [f.strip() for f in out.strip().strip("[]").split("] [")]
    assert fields[:7] == ["7", "00099", "m5", "alice", "pts/5", "2001:db8::1", "2001:db8::1"]
    assert fields[7].startswith("2023-11-14T22:13:20,500000")


@root_only
def test_write_utmp_replaces_the_same_line_and_appends_others(tmp_path):
    path = tmp_path / "utmp"
    path.write_bytes(b"")

    def entry(kind, line, user, pid=1):
        return login.UtmpEntry(kind, pid, line, login._utmp_id(line), user, "", time.time())
    login.write_utmp(entry(login.USER_PROCESS, "pts/1", "alice"), str(path))
    login.write_utmp(entry(login.USER_PROCESS, "pts/2", "bob"), str(path))
    login.write_utmp(entry(login.DEAD_PROCESS, "pts/1", ""), str(path))
    # sshd's stale record for the same terminal (another ut_id) is replaced by line
    stale = login.UtmpEntry(login.USER_PROCESS, 1, "pts/2", b"ts/2", "carol", "", 0)
    with open(path, "r+b") as f:
        f.seek(login.UTMP_SIZE)
        f.write(stale.pack())
    login.write_utmp(entry(login.USER_PROCESS, "pts/2", "dave"), str(path))
    assert [(e.type, e.line, e.user) for e in login.read_utmp(str(path))] == \
        [(login.DEAD_PROCESS, "pts/1", ""), (login.USER_PROCESS, "pts/2", "dave")]
    assert login.write_utmp(entry(login.USER_PROCESS, "pts/3", "x"),
                            str(tmp_path / "missing")) is False  # never created


@root_only
def test_close_stale_records(tmp_path):
    utmp, wtmp = tmp_path / "utmp", tmp_path / "wtmp"
    utmp.write_bytes(b"")
    wtmp.write_bytes(b"")
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    records = [
        login.UtmpEntry(login.USER_PROCESS, dead.pid, "pts/40", b"m14", "gone", "::1", now),
        login.UtmpEntry(login.USER_PROCESS, os.getpid(), "pts/41", b"m15", "here", "::1", now),
        # our pid, but the record is older than this process: the pid was reused
        login.UtmpEntry(login.USER_PROCESS, os.getpid(), "pts/42", b"m16", "old", "::1", 1e9),
        login.UtmpEntry(login.USER_PROCESS, dead.pid, "pts/43", b"s/43", "sshd's", "::1", now),
    ]
    utmp.write_bytes(b"".join(r.pack() for r in records))
    assert login.close_stale_records(str(utmp), str(wtmp)) == 2
    assert [(e.type, e.line) for e in login.read_utmp(str(utmp))] == [
        (login.DEAD_PROCESS, "pts/40"), (login.USER_PROCESS, "pts/41"),
        (login.DEAD_PROCESS, "pts/42"), (login.USER_PROCESS, "pts/43")]
    assert [(e.type, e.line, e.user) for e in login.read_utmp(str(wtmp))] == [
        (login.DEAD_PROCESS, "pts/40", ""), (login.DEAD_PROCESS, "pts/42", "")]


@root_only
def test_login_record_writes_utmp_wtmp_lastlog(tmp_path):
    paths = tuple(str(tmp_path / name) for name in ("utmp", "wtmp", "lastlog"))
    for path in paths:
        open(path, "wb").close()
    record = login.LoginRecord("alice", 3, "/dev/pts/9", 777, "127.0.0.1", paths)
    record.open()
    (entry,) = login.read_utmp(paths[0])
    assert (entry.type, entry.user, entry.line, entry.host, entry.addr[:4]) == \
        (login.USER_PROCESS, "alice", "pts/9", "127.0.0.1", bytes([127, 0, 0, 1]))
    with open(paths[2], "rb") as f:
        data = f.read()
    assert len(data) == 4 * 292
    when, line, host = struct.unpack("<i32s256s", data[3 * 292:])
    assert abs(when - time.time()) < 5 and line.rstrip(b"\0") == b"pts/9"
    assert host.rstrip(b"\0") == b"127.0.0.1"
    record.close(exit_status=7)
    record.close()  # once only
    assert [e.type for e in login.read_utmp(paths[0])] == [login.DEAD_PROCESS]
    assert [(e.type, e.user, e.exit_signal, e.exit_status)
            for e in login.read_utmp(paths[1])] == [
        (login.USER_PROCESS, "alice", 0, 0), (login.DEAD_PROCESS, "", 0, 7)]  # ut_exit


# -- PAM ------------------------------------------------------------------------------------

pam_needed = pytest.mark.skipif(os.geteuid() != 0 or login.libpam() is None,
                                reason="needs root and libpam (apt-get install libpam0g)")


@pytest.fixture
def pam_service():
    """Write /etc/pam.d/moshpit-test-XXXX from the text given; removed afterwards."""
    made = []

    def write(text: str) -> str:
        name = "moshpit-test-" + secrets.token_hex(4)
        with open(f"/etc/pam.d/{name}", "x") as f:
            f.write(text)
        made.append(name)
        return name
    yield write
    for name in made:
        os.unlink(f"/etc/pam.d/{name}")


@pam_needed
def test_pam_account_refusals(tmp_path, pam_service):
    nologin = tmp_path / "nologin"
    nologin.write_text("back at 6\n")
    access = tmp_path / "access.conf"
    access.write_text("-:nobody:ALL\n+:ALL:ALL\n")
    service = pam_service(f"account required pam_nologin.so file={nologin}\n"
                          f"account required pam_access.so accessfile={access}\n"
                          "account required pam_permit.so\n")
    refusal = login.pam_account_refusal("daemon", "127.0.0.1", service)
    assert "PAM account management for daemon" in str(refusal)
    assert "back at 6" in refusal.client_message  # pam_nologin's text, for the client
    assert login.pam_account_refusal("root", "127.0.0.1", service) is None  # root passes
    nologin.unlink()
    refusal = login.pam_account_refusal("nobody", "127.0.0.1", service)
    assert str(refusal) == "PAM account management for nobody: Permission denied"
    assert login.pam_account_refusal("daemon", "127.0.0.1", service) is None
    deny = pam_service("account required pam_deny.so\n")
    assert str(login.pam_account_refusal("root", "::1", deny)) == \
        "PAM account management for root: Authentication failure"


@pam_needed
def test_pam_session_environment(tmp_path, pam_service):
    envfile = tmp_path / "env"
    envfile.write_text("MOSHPIT_PAM_TEST=from-pam-env\n")
    service = pam_service("auth required pam_permit.so\naccount required pam_permit.so\n"
                          f"session required pam_env.so readenv=1 envfile={envfile} "
                          "user_readenv=0 conffile=/dev/null\n"
                          "session optional pam_echo.so hello from the session stack\n")
    with login.PamLogin("root", "127.0.0.1", tty="/dev/pts/99", service=service) as pam:
        pam.acct_mgmt()
        env = pam.open_session()
        assert env.get("MOSHPIT_PAM_TEST") == "from-pam-env"
        assert "hello from the session stack" in pam.messages
    assert not pam._handle  # pam_end done


@pam_needed
def test_pam_conversation_answers_no_prompt(pam_service):
    with login.PamLogin("root", "::1", service=pam_service("account required pam_permit.so\n")
                        ) as pam:
        def call(style: int, text: bytes) -> int:
            message = login._PamMessage(style, text)
            pointers = (ctypes.POINTER(login._PamMessage) * 1)(ctypes.pointer(message))
            reply = ctypes.POINTER(login._PamResponse)()
            status = pam._conv_func(1, pointers, ctypes.byref(reply), None)
            if reply:
                pam._pam.free(ctypes.cast(reply, ctypes.c_void_p))
            return status
        assert call(login.PAM_PROMPT_ECHO_OFF, b"Password: ") == login.PAM_CONV_ERR
        assert call(login.PAM_PROMPT_ECHO_ON, b"login: ") == login.PAM_CONV_ERR
        assert call(login.PAM_TEXT_INFO, b"\x1b[2Jnote") == login.PAM_SUCCESS
        assert pam.messages == ["\x1b[2Jnote"]  # kept raw; printed only through printable


def test_pam_service_configured_needs_a_file_or_a_pam_conf_line_for_it(tmp_path):
    """Debian's /etc/pam.conf is comments alone: it configures no service (and Linux-PAM
    ignores it where /etc/pam.d exists), so it must not turn PAM on through "other"."""
    pam_d, conf = tmp_path / "pam.d", tmp_path / "pam.conf"
    dirs = (str(pam_d), str(tmp_path / "vendor"))
    conf.write_text("# ----------------------------------------------------------------#\n"
                    "# /etc/pam.conf                                                    #\n"
                    "# service  type  control  module-path  module-arguments\n")
    assert not login.pam_service_configured("moshpit", dirs, str(conf))  # no pam.d, comments
    conf.write_text(conf.read_text() + "moshpit account required pam_permit.so\n")
    assert login.pam_service_configured("moshpit", dirs, str(conf))
    assert not login.pam_service_configured("other-service", dirs, str(conf))
    pam_d.mkdir()  # with /etc/pam.d, PAM reads only its files
    assert not login.pam_service_configured("moshpit", dirs, str(conf))
    (pam_d / "moshpit").write_text("account required pam_permit.so\n")
    assert login.pam_service_configured("moshpit", dirs, str(conf))
