"""moshpit_trust: authorized_keys read safely with sshd's StrictModes (owners, modes,
symlinks, FIFOs, terminals, hard links, size), and the client's known_hosts policy."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from handshake_util import fake_user, write_authorized_keys

import moshpit_trust as trust
from moshpit_keys import PrivateKey

pytestmark = pytest.mark.timeout(60)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing file owners needs root")
OTHER_UID = 4343
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def key():
    return PrivateKey.generate("alice@laptop").public


@pytest.fixture
def home(tmp_path, key):
    """A home directory with a correct ~/.mp/authorized_keys holding ``key``."""
    home = str(tmp_path / "home" / "alice")
    write_authorized_keys(home, [key])
    return home


def refusal(pw, path=None) -> str:
    with pytest.raises(trust.TrustError) as raised:
        trust.authorized_keys_for(pw, path)
    return str(raised.value)


# ---------------------------------------------------------------------------
# authorized_keys
# ---------------------------------------------------------------------------


def test_correct_setup_returns_the_keys(home, key):
    assert trust.authorized_keys_for(fake_user(home)) == [key]


@pytest.mark.parametrize("target, mode, reason", [
    (".mp/authorized_keys", 0o620, "is mode 0620, must not be group/world writable"),
    (".mp/authorized_keys", 0o602, "is mode 0602, must not be group/world writable"),
    (".mp/authorized_keys", 0o666, "is mode 0666, must not be group/world writable"),
    (".mp", 0o770, "is mode 0770, must not be group/world writable"),
    ("", 0o775, "is mode 0775, must not be group/world writable"),
    ("", 0o757, "is mode 0757, must not be group/world writable"),
])
def test_writable_by_others_is_refused_with_the_reason(home, target, mode, reason):
    path = os.path.join(home, target) if target else home
    os.chmod(path, mode)
    assert refusal(fake_user(home)) == f"{path.rstrip('/')} {reason}"


@pytest.mark.parametrize("home_mode, dir_mode, file_mode", [
    (0o755, 0o755, 0o644),  # sshd's StrictModes: reading bits are fine
    (0o711, 0o700, 0o400),
    (0o700, 0o750, 0o640),
])
def test_readable_modes_are_fine(home, key, home_mode, dir_mode, file_mode):
    os.chmod(home, home_mode)
    os.chmod(os.path.join(home, ".mp"), dir_mode)
    os.chmod(os.path.join(home, ".mp", "authorized_keys"), file_mode)
    assert trust.authorized_keys_for(fake_user(home)) == [key]


@needs_root
@pytest.mark.parametrize("target", [".mp/authorized_keys", ".mp", ""])
def test_wrong_owner_is_refused_with_the_reason(home, target):
    path = os.path.join(home, target).rstrip("/")
    os.chown(path, OTHER_UID, -1)
    assert refusal(fake_user(home)) == (f"{path} is owned by uid {OTHER_UID},"
                                        " must be owned by alice or root")


@needs_root
def test_files_owned_by_the_user_or_root_are_fine(home, key):
    user_uid = 4242
    for path in (home, os.path.join(home, ".mp"), os.path.join(home, ".mp", "authorized_keys")):
        os.chown(path, user_uid, -1)
    pw = fake_user(home, uid=user_uid)
    assert trust.authorized_keys_for(pw) == [key]
    os.chown(os.path.join(home, ".mp", "authorized_keys"), 0, -1)
    assert trust.authorized_keys_for(pw) == [key]


def test_writable_parent_above_home_is_not_checked(home, key, tmp_path):
    """sshd's rule: ownership and modes matter up to the home directory."""
    os.chmod(tmp_path / "home", 0o777)
    assert trust.authorized_keys_for(fake_user(home)) == [key]


def test_file_outside_home_is_checked_up_to_root(tmp_path, key):
    shared = tmp_path / "shared"
    keys_home = str(shared / "keys")
    write_authorized_keys(keys_home, [key])
    path = os.path.join(keys_home, ".mp", "authorized_keys")
    pw = fake_user(str(tmp_path / "elsewhere"))
    assert trust.authorized_keys_for(pw, path) == [key]
    os.chmod(shared, 0o777)  # anyone could swap keys/ for their own
    assert refusal(pw, path) == f"{shared} is mode 0777, must not be group/world writable"
    if os.geteuid() == 0:  # root-owned and sticky, like /tmp: safe
        os.chmod(shared, 0o1777)
        assert trust.authorized_keys_for(pw, path) == [key]


@needs_root
def test_home_in_sticky_root_directory_is_fine(tmp_path, key):
    """A home directly in a root-owned sticky directory (like /tmp) is allowed: nobody else
    can rename or delete the user's entries there."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    home = str(sticky / "alice")
    write_authorized_keys(home, [key])
    path = os.path.join(home, ".mp", "authorized_keys")
    assert trust.authorized_keys_for(fake_user(home)) == [key]
    assert trust.authorized_keys_for(fake_user(str(tmp_path / "x")), path) == [key]


def test_symlinked_authorized_keys_is_refused(tmp_path, home):
    target_dir = tmp_path / "real"
    write_authorized_keys(str(target_dir), [PrivateKey.generate().public])
    link = os.path.join(home, ".mp", "authorized_keys")
    os.unlink(link)
    os.symlink(target_dir / ".mp" / "authorized_keys", link)
    assert refusal(fake_user(home)).startswith(f"{link} is a symlink: refused")


def test_symlinked_mp_directory_is_refused(tmp_path, home):
    target_dir = tmp_path / "real"
    write_authorized_keys(str(target_dir), [PrivateKey.generate().public])
    mp = os.path.join(home, ".mp")
    os.rename(mp, os.path.join(home, "old-mp"))
    os.symlink(target_dir / ".mp", mp)
    assert refusal(fake_user(home)).startswith(f"{mp} is a symlink: refused")


def test_symlink_in_a_path_outside_home_is_refused(tmp_path, key):
    """For a file the administrator placed (mps.authorized_keys_file), only the directory
    is resolved: the file itself must not be a symlink."""
    write_authorized_keys(str(tmp_path / "keys"), [key])
    link = str(tmp_path / "keys" / ".mp" / "link")
    os.symlink("authorized_keys", link)
    pw = fake_user(str(tmp_path / "elsewhere"))
    assert refusal(pw, link).startswith(f"{link} is a symlink: refused")


def test_root_symlink_above_home_still_works(tmp_path, key):
    """/home -> /usr/home: the home's path (from the password database, root's) is resolved
    once; only what lies below the home must be free of symlinks."""
    write_authorized_keys(str(tmp_path / "usr" / "home" / "alice"), [key])
    os.symlink(tmp_path / "usr" / "home", tmp_path / "home")
    assert trust.authorized_keys_for(fake_user(str(tmp_path / "home" / "alice"))) == [key]


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(home):
    """A FIFO nobody writes to: opening it for reading would block forever; it is refused
    at once (never opened: lstat says it is no regular file)."""
    path = os.path.join(home, ".mp", "authorized_keys")
    os.unlink(path)
    os.mkfifo(path, 0o600)
    assert refusal(fake_user(home)) == f"{path} is a FIFO, not a regular file: refused"


def test_terminal_is_refused_without_being_opened(tmp_path):
    """A terminal at the path (a pty slave, named as mps.authorized_keys_file could name
    it): refused as a device by lstat, without ever being opened."""
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        pw = fake_user(str(tmp_path / "elsewhere"))
        assert refusal(pw, name) == f"{name} is a device, not a regular file: refused"
    finally:
        os.close(master)
        os.close(slave)


@needs_root
def test_hard_link_to_a_root_file_is_refused(home, key, tmp_path):
    """A user who hard-links a root-only file into ~/.mp (where the kernel allows it) gets
    nothing: a root-owned file with more than one link is refused."""
    pw = fake_user(home, uid=4242)
    for path in (home, os.path.join(home, ".mp")):
        os.chown(path, pw.pw_uid, -1)
    secret = tmp_path / "root-only"
    secret.write_text(key.to_line() + "\n")
    os.chmod(secret, 0o600)
    path = os.path.join(home, ".mp", "authorized_keys")
    os.unlink(path)
    os.link(secret, path)
    assert refusal(pw) == (f"{path} is owned by root and has 2 links: refused (it may be a"
                           " hard link to a file alice may not read)")


def test_missing_or_odd_files_are_refused(home):
    path = os.path.join(home, ".mp", "authorized_keys")
    os.unlink(path)
    assert refusal(fake_user(home)) == f"{path} does not exist"
    os.mkdir(path, 0o700)
    assert refusal(fake_user(home)) == f"{path} is not a regular file"
    os.rmdir(path)
    mp = os.path.join(home, ".mp")
    shutil.rmtree(mp)
    with open(mp, "w"):
        pass
    assert refusal(fake_user(home)) == f"{mp} is not a directory"


def test_relative_path_is_refused():
    """An account without a home directory must not make the server read a path relative
    to wherever it runs."""
    assert refusal(fake_user("")) == ".mp/authorized_keys is not an absolute path (is alice's" \
        " home directory set?)"


# Runs as a session leader without a terminal: the one kind of process that acquires any
# terminal it opens without O_NOCTTY (the server under systemd, before it forks).
CTTY_PROBE = r"""
import os, sys
import moshpit, moshpit_keys
terminal, home = sys.argv[1], sys.argv[2]
def tty_nr():
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[4])
assert os.getsid(0) == os.getpid() and tty_nr() == 0
config = moshpit.load_config("server", path=terminal, environ={}, home=home)  # reads a line
assert config["verbose"] == 2
try:
    moshpit_keys.load_public_key(terminal)  # as mps loads its host key
except moshpit_keys.KeyFileError:
    pass
moshpit.setup_logging("server", config, log_path=terminal)  # write-only: safe on Linux anyway
moshpit.logging.getLogger("moshpit.server").warning("logged to a terminal")
print(tty_nr())
os.close(os.open(terminal, os.O_RDWR))  # the control: a plain open acquires it
print(tty_nr())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_server_file_opens_never_acquire_a_terminal(tmp_path):
    """The server's own opens (config, key and log files) carry O_NOCTTY: a session leader
    without a terminal that reads them from a terminal does not acquire it (the control
    open does)."""
    master, slave = os.openpty()
    os.write(master, b"verbose = 2\n\x04")  # the config file's line, then end of file
    try:
        done = subprocess.run([sys.executable, "-c", CTTY_PROBE, os.ttyname(slave),
                               str(tmp_path)], cwd=REPO, env={"PYTHONPATH": REPO},
                              start_new_session=True, capture_output=True, text=True,
                              timeout=30)
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 0, done.stderr
    after_server_opens, after_plain_open = map(int, done.stdout.split())
    assert after_server_opens == 0
    assert after_plain_open != 0  # the probe would have seen an acquisition


def test_oversized_file_is_refused(home, monkeypatch):
    monkeypatch.setattr(trust, "MAX_AUTHORIZED_KEYS", 100)
    path = os.path.join(home, ".mp", "authorized_keys")
    with open(path, "a") as f:
        f.write("#" * 200 + "\n")
    assert refusal(fake_user(home)) == f"{path} is too large (over 100 bytes)"


def test_bad_lines_are_skipped(home, key):
    path = os.path.join(home, ".mp", "authorized_keys")
    with open(path, "a") as f:
        f.write("ssh-rsa AAAAB3NzaC1yc2E= rsa\ngarbage\n\n")
    assert trust.authorized_keys_for(fake_user(home)) == [key]


# ---------------------------------------------------------------------------
# known_hosts
# ---------------------------------------------------------------------------


@pytest.fixture
def host_key():
    return PrivateKey.generate("root@server").public


@pytest.fixture
def known_hosts(tmp_path):
    return str(tmp_path / "dot-mp" / "known_hosts")


def test_known_hosts_lookup_and_add(known_hosts, host_key):
    known = trust.KnownHosts(known_hosts)
    assert known.lookup("server", 40404, host_key) == ("unknown", None)
    known.add("Server", 40404, host_key)
    known.add("server", 2222, host_key)
    assert known.lookup("SERVER", 40404, host_key) == ("ok", 1)
    assert known.lookup("server", 2222, host_key) == ("ok", 2)
    assert known.lookup("server", 2223, host_key) == ("unknown", None)
    lines = Path(known_hosts).read_text().splitlines()
    assert lines[0] == "server " + host_key.to_line("ssh-ed25519").split(" root@")[0]
    assert lines[1].startswith("[server]:2222 ssh-ed25519 ")
    assert stat.S_IMODE(os.stat(known_hosts).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(known_hosts)).st_mode) == 0o700


def test_known_hosts_reads_openssh_style_lines(known_hosts, host_key):
    other = PrivateKey.generate().public
    os.makedirs(os.path.dirname(known_hosts))
    with open(known_hosts, "w") as f:
        f.write("# comment\n\ngarbage line\nalias,server,10.0.0.1 "
                + host_key.to_line("ssh-ed25519") + "\n"
                + "[other]:2222 " + other.to_line() + "\nssh-rsa only-two")  # no final newline
    known = trust.KnownHosts(known_hosts)
    assert known.lookup("10.0.0.1", 40404, host_key) == ("ok", 4)
    assert known.lookup("other", 2222, other) == ("ok", 5)
    assert known.lookup("other", 2222, host_key) == ("changed", 5)
    known.add("new", 40404, host_key)  # repairs the missing newline first
    assert Path(known_hosts).read_text().splitlines()[-2:] == [
        "ssh-rsa only-two", "new " + host_key.to_line("ssh-ed25519").split(" root@")[0]]


def test_concurrent_adds_keep_every_line(known_hosts, host_key):
    known = trust.KnownHosts(known_hosts)
    threads = [threading.Thread(target=known.add, args=(f"host{i}", 40404, host_key))
               for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(20):
        assert known.lookup(f"host{i}", 40404, host_key)[0] == "ok"


def test_accept_new_records_then_trusts(known_hosts, host_key, capsys):
    notice = trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, "accept-new",
                                          tty=False)
    assert "Permanently added 'server' (ED25519)" in notice
    assert trust.KnownHosts(known_hosts).lookup("server", 40404, host_key) == ("ok", 1)
    for policy in trust.HOST_KEY_POLICIES:  # known now: every policy accepts, silently
        assert trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, policy,
                                            tty=False) is None
    assert capsys.readouterr().err == ""  # the library never writes to the terminal itself


@pytest.mark.parametrize("policy", trust.HOST_KEY_POLICIES)
def test_changed_key_is_refused_loudly(known_hosts, host_key, policy):
    trust.KnownHosts(known_hosts).add("decoy", 40404, host_key)
    trust.KnownHosts(known_hosts).add("server", 40404, host_key)
    impostor = PrivateKey.generate().public
    with pytest.raises(trust.HostKeyError) as raised:
        trust.verify_host_key_policy(known_hosts, "server", 40404, impostor, policy, tty=True,
                                  ask=lambda prompt: pytest.fail("must not ask"))
    message = str(raised.value)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in message
    assert f"{known_hosts}:2" in message and "remove that line" in message
    assert impostor.fingerprint() in message


def test_ask_without_tty_refuses_and_says_how_to_accept(known_hosts, host_key):
    with pytest.raises(trust.HostKeyError) as raised:
        trust.verify_host_key_policy(known_hosts, "server", 2222, host_key, "ask", tty=False)
    message = str(raised.value)
    assert "--strict-host-key-checking accept-new" in message
    assert known_hosts in message and host_key.fingerprint() in message
    assert "[server]:2222" in message
    assert not os.path.exists(known_hosts)


def test_strict_yes_refuses_unknown_hosts(known_hosts, host_key):
    with pytest.raises(trust.HostKeyError, match="strict host key checking is 'yes'"):
        trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, "yes", tty=True)
    with pytest.raises(trust.HostKeyError, match="must be one of"):
        trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, "maybe", tty=True)


class Answers:
    """A scripted user at the prompt."""

    def __init__(self, *answers):
        self.answers, self.prompts = list(answers), []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.answers:
            raise EOFError
        return self.answers.pop(0)


@pytest.mark.parametrize("answers, accepted", [
    (("yes",), True),
    (("YES\n",), True),
    (("no",), False),
    (("",), False),
    ((), False),  # EOF
    (("maybe", "yes"), True),
    (("SHA256:wrong", "no"), False),
    (("what",) * 10, False),
    ((True,), True),
    ((False,), False),
])
def test_ask_on_a_tty(known_hosts, host_key, answers, accepted):
    user = Answers(*answers)
    if accepted:
        trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, "ask", True, user)
        assert trust.KnownHosts(known_hosts).lookup("server", 40404, host_key)[0] == "ok"
    else:
        with pytest.raises(trust.HostKeyError, match="not accepted"):
            trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, "ask", True, user)
        assert trust.KnownHosts(known_hosts).lookup("server", 40404, host_key)[0] == "unknown"
    first = user.prompts[0]
    assert "The authenticity of host 'server' can't be established." in first
    assert f"ED25519 key fingerprint is {host_key.fingerprint()}." in first
    assert host_key.randomart() in first
    assert first.endswith("(yes/no/[fingerprint])? ")
    assert all(p == "Please type 'yes', 'no' or the fingerprint: " for p in user.prompts[1:])


def test_pasting_the_fingerprint_accepts(known_hosts, host_key):
    user = Answers(host_key.fingerprint())
    trust.verify_host_key_policy(known_hosts, "server", 40404, host_key, "ask", True, user)
    assert trust.KnownHosts(known_hosts).lookup("server", 40404, host_key)[0] == "ok"


@pytest.mark.parametrize("template, expected", [
    (None, "/home/al/.mp/authorized_keys"),
    ("", "/home/al/.mp/authorized_keys"),
    ("/etc/moshpit/keys/%u", "/etc/moshpit/keys/al"),
    ("%h/.ssh/authorized_keys", "/home/al/.ssh/authorized_keys"),
    (".mp/keys", "/home/al/.mp/keys"),
    ("~/.mp/keys", "/home/al/.mp/keys"),
    ("/srv/100%%/%u/%x", "/srv/100%/al/%x"),
])
def test_authorized_keys_path_tokens_like_sshd(template, expected):
    """One setting serves every user of a root server: %h, %u and home-relative paths give
    each user their own file, as sshd's AuthorizedKeysFile does."""
    pw = type("pw", (), {"pw_name": "al", "pw_dir": "/home/al"})()
    assert trust.authorized_keys_path(pw, template) == expected


def test_authorized_keys_file_template_selects_each_users_file(tmp_path):
    alice = fake_user(str(tmp_path / "alice"))
    key = PrivateKey.generate().public
    write_authorized_keys(alice.pw_dir, [key])
    assert trust.authorized_keys_for(alice, f"{tmp_path}/%u/.mp/authorized_keys") == [key]
    bob = fake_user(str(tmp_path / "bob"), name="bob")  # no file of his own: refused
    with pytest.raises(trust.TrustError, match="does not exist"):
        trust.authorized_keys_for(bob, f"{tmp_path}/%u/.mp/authorized_keys")
