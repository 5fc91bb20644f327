"""moshpit_bootstrap (mp --ssh): the CONNECT line and the ssh output reader (sans-IO, every
length bounded), the remote command's quoting, the messages, and the remote side itself run
through ``/bin/sh`` on this machine as ssh would run it (no sshd here: that is
test_bootstrap_ssh.py), with a real handshake against the one-session server it starts."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import zipfile

import moshpit
import moshpit_bootstrap as boot
import moshpit_handshake as handshake
import moshpit_keys as keys
import moshpit_trust as trust
import pytest
from proc_util import wait_for

pytestmark = pytest.mark.timeout(60)

HOST_KEY = keys.PrivateKey.generate("host").public


def line_for(port=50001, user="alice", address="127.0.0.1", key=HOST_KEY) -> str:
    return boot.connect_line(boot.Connect(port, user, address, key))


# -- the CONNECT line -----------------------------------------------------------------------


def test_connect_line_round_trip():
    for address in ("127.0.0.1", "::1", "2001:db8::5"):
        assert boot.parse_connect_line(line_for(address=address)) == boot.Connect(
            50001, "alice", address, HOST_KEY)


MALFORMED_CONNECT_LINES = [
    line_for(port=0), line_for(port=65536), line_for(port=123456),
    line_for(user="a:b"), line_for(user="a/b"), line_for(user="x" * 65),
    line_for(address="example.com"), line_for(address="999.1.1.1"),
    line_for() + " extra", line_for() + "\x1b[2J", line_for().replace("AAAA", "!!!!", 1),
    "MOSHPIT CONNECT 50001 alice 127.0.0.1 " + base64.b64encode(b"\0" * 51).decode(),
    "MOSHPIT CONNECT 50001 alice 127.0.0.1 " + "A" * 200,  # a blob far too long
    "MOSHPIT CONNECT", "MOSHPIT CONNECT 50001 alice 127.0.0.1",
]


# ids by position: the lines hold a key generated at import, which differs between xdist
# workers, and they must all collect the same test names
@pytest.mark.parametrize("line", MALFORMED_CONNECT_LINES,
                         ids=[f"line{i}" for i in range(len(MALFORMED_CONNECT_LINES))])
def test_a_malformed_connect_line_is_a_clean_refusal(line):
    with pytest.raises(moshpit.MoshpitError, match="the server's bootstrap sent a"):
        boot.parse_connect_line(line)


def test_the_reader_shows_noise_then_takes_the_answer_split_anywhere():
    data = (b"Welcome to host\r\n\x1b]0;title\x07motd\n" + line_for().encode() + b"\r\n"
            + b"after\n")
    for step in (1, 7, len(data)):
        reader = boot.OutputReader()
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
        assert reader.result == boot.Connect(50001, "alice", "127.0.0.1", HOST_KEY)
        assert reader.noise == ["Welcome to host", "^[]0;title^Gmotd"]  # no escape reaches us


def test_the_reader_bounds_lines_and_noise():
    reader = boot.OutputReader()
    reader.feed(b"x" * (boot.MAX_LINE_BYTES * 3))  # no newline: passed on in pieces
    assert reader.result is None and len(reader.noise) == 3
    assert all(len(line) <= boot.MAX_LINE_BYTES for line in reader.noise)
    with pytest.raises(moshpit.MoshpitError, match="more than 64 KiB before"):
        reader.feed(b"y\n" * boot.MAX_NOISE_BYTES)


def test_error_lines_become_one_line_naming_what_to_install():
    reader = boot.OutputReader()
    reader.feed(b"MOSHPIT ERROR no-cryptography Python 3.11.2 (/usr/bin/python3): "
                b"ModuleNotFoundError: No module named 'cryptography'\n")
    message = boot.explain_remote_error(reader.result, "host")
    assert message == (
        "host: Python 3.11.2 (/usr/bin/python3) cannot use cryptography (ModuleNotFoundError:"
        " No module named 'cryptography'): install it on the server: "
        "`apt install python3-cryptography`, `dnf install python3-cryptography`, "
        "`apk add py3-cryptography` or `pip install --user cryptography`")
    old = boot.explain_remote_error(boot.RemoteError(
        "old-cryptography", "Python 3.9.2 (/usr/bin/python3) has cryptography 3.3.2"), "h")
    assert "moshpit needs 3.4 or newer" in old and "pip install --user -U cryptography" in old
    none = boot.explain_remote_error(boot.RemoteError("no-python", " none found"), "h")
    assert none.startswith("h has no Python 3.9 or newer: install Python 3.9")
    found = boot.explain_remote_error(boot.RemoteError("no-python", " python3=Python 3.8.1"),
                                      "h")
    assert "(found: python3=Python 3.8.1)" in found
    for message in (none, found, old):
        assert "\n" not in message


def test_ssh_failures_are_summarized():
    assert boot.explain_ssh_failure(
        "h", 255, "Warning: x\nalice@h: Permission denied (publickey).\n\n") == \
        "ssh to h failed: alice@h: Permission denied (publickey)."
    assert boot.explain_ssh_failure("h", 255, "") == "ssh to h failed"
    assert "exited with status 1): Killed" in boot.explain_ssh_failure("h", 1, "Killed\n")


# -- the remote command ---------------------------------------------------------------------


def test_the_remote_command_survives_every_login_shell_quoting():
    # STAGE0 sits in single quotes (no ' and no !: csh's history), STAGE1 in double quotes.
    assert not set("'!") & set(boot.STAGE0)
    assert not set("'!\"$`\\") & set(boot.STAGE1)
    assert boot.remote_command() == "exec /bin/sh -c '" + boot.STAGE0 + "'"


def test_ssh_argv_puts_the_users_options_first():
    argv = boot.ssh_argv("ssh -p 2222 -J 'jump host'", "alice@h", login="bob")
    assert argv[:5] == ["ssh", "-p", "2222", "-J", "jump host"]
    assert argv[5:5 + len(boot.SSH_OPTIONS)] == list(boot.SSH_OPTIONS)
    assert argv[-5:] == ["-l", "bob", "--", "alice@h", boot.remote_command()]
    with pytest.raises(moshpit.MoshpitError, match="empty"):
        boot.ssh_argv("  ", "h")


def test_pick_address():
    def resolve(found):
        return lambda host, port: [(0, 0, 0, "", (a, 0)) for a in found]

    assert boot.pick_address("h", "10.0.0.5", resolve(["::1", "10.0.0.5"])) == "10.0.0.5"
    assert boot.pick_address("h", "10.0.0.5", resolve(["203.0.113.7"])) == "h"  # NAT
    assert boot.pick_address("", "10.0.0.5", resolve([])) == "10.0.0.5"

    def unknown(host, port):
        raise socket.gaierror("nope")
    assert boot.pick_address("h", "10.0.0.5", unknown) == "h"


def test_the_pinned_host_key_refuses_any_other():
    pinned = boot.PinnedHostKey(HOST_KEY, "h")
    pinned.first(HOST_KEY)
    pinned.resume(HOST_KEY)
    other = keys.PrivateKey.generate().public
    for check in (pinned.first, pinned.resume):
        with pytest.raises(trust.HostKeyError, match="not the one its ssh bootstrap"):
            check(other)


def test_server_address_from_ssh_connection():
    assert boot.server_address({"SSH_CONNECTION": "10.1.1.1 5000 10.0.0.5 22"}) == "10.0.0.5"
    assert boot.server_address({"SSH_CONNECTION": "::1 5000 ::ffff:10.0.0.5 22"}) == "10.0.0.5"
    assert boot.server_address({"SSH_CONNECTION": "::1 5000 2001:db8::1 22"}) == "2001:db8::1"
    for bad in ({}, {"SSH_CONNECTION": "1 2 3"}, {"SSH_CONNECTION": "a b host 22"}):
        with pytest.raises(moshpit.MoshpitError, match="SSH_CONNECTION"):
            boot.server_address(bad)


def test_the_bundle_is_what_make_dist_zips():
    with zipfile.ZipFile(io.BytesIO(boot.bundle_bytes())) as z:
        names = set(z.namelist())
    here = os.path.dirname(os.path.abspath(boot.__file__))
    modules = {name for name in os.listdir(here) if name.endswith(".py")
               and name.startswith(("moshpit", "mp")) and name != "moshpit_pyz.py"}
    assert names == modules | {"__main__.py"}


# -- the remote side, run by /bin/sh here (as sshd would run it) ------------------------------


def run_remote(tmp_path, path: str, client_key: keys.PublicKey, unused_exit_secs: float = 2.0,
               home=None):
    """The remote command with stdin as the client sends it, SSH_CONNECTION on loopback."""
    env = {"PATH": path, "HOME": home or str(tmp_path), "LANG": "C.UTF-8",
           "SSH_CONNECTION": "127.0.0.1 40000 127.0.0.1 22"}
    bundle = boot.bundle_bytes()
    data = boot.preamble(bundle, client_key, unused_exit_secs=unused_exit_secs) + bundle
    return subprocess.run(["/bin/sh", "-c", boot.remote_command()], input=data, env=env,
                          capture_output=True, timeout=30, cwd=str(tmp_path))


def python_dir(tmp_path, name: str, target: str) -> str:
    """A directory holding only ``python3`` -> ``target`` (a PATH with one interpreter)."""
    directory = tmp_path / name
    directory.mkdir()
    with open(directory / "python3", "w") as f:
        f.write(f"#!/bin/sh\nexec {target} \"$@\"\n")
    os.chmod(directory / "python3", 0o755)
    return str(directory)


def listening(port: int) -> bool:
    """Whether something listens on the port (a reset is the server's pre-auth limits
    dropping our empty connections: still there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    except OSError:
        pass
    return True


class Offering:
    """An identity that offers its keys before signing, as mp's KeyRing does."""

    def __init__(self, keys):
        self.keys = keys

    def offers(self):
        return [key.public for key in self.keys]

    def signer(self, public):
        return next(key for key in self.keys if key.public == public)

    def tried(self):
        return ""


def test_no_python_on_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_remote(tmp_path, str(empty), HOST_KEY)
    assert result.returncode == boot.NO_PYTHON_STATUS
    assert result.stdout == b"MOSHPIT ERROR no-python  none found\n"


def test_a_python_without_cryptography(tmp_path):
    # -S: no site-packages, so no cryptography, whatever this machine has installed.
    bare = python_dir(tmp_path, "bare", f"{sys.executable} -S")
    result = run_remote(tmp_path, bare, HOST_KEY)
    reader = boot.OutputReader()
    reader.feed(result.stdout)
    assert result.returncode == boot.REMOTE_ERROR_STATUS
    assert reader.result.code == "no-cryptography"
    assert "No module named 'cryptography'" in reader.result.detail


def test_a_python_with_cryptography_is_preferred(tmp_path):
    both = python_dir(tmp_path, "both", f"{sys.executable} -S")  # python3: no cryptography
    with open(os.path.join(both, "python3.12"), "w") as f:  # python3.12: ours, with it
        f.write(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    os.chmod(os.path.join(both, "python3.12"), 0o755)
    result = run_remote(tmp_path, both, HOST_KEY, unused_exit_secs=0.5)
    assert result.returncode == 0 and result.stdout.startswith(b"MOSHPIT CONNECT "), result


def test_the_one_session_server_admits_only_its_key_and_user_then_leaves(tmp_path):
    """The stub answers CONNECT and detaches (the remote command has exited); the server
    refuses another key and another user (the attack: someone on the server's network
    racing the client to the port), and with nobody logged in it exits on its own."""
    client = keys.PrivateKey.generate("mp --ssh")
    ours = python_dir(tmp_path, "ours", sys.executable)
    before = set(os.listdir(tmp_path))
    started = time.monotonic()
    result = run_remote(tmp_path, ours, client.public, unused_exit_secs=3.0)
    reader = boot.OutputReader()
    reader.feed(result.stdout)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    connect = reader.result
    assert isinstance(connect, boot.Connect) and connect.address == "127.0.0.1"
    pinned = boot.PinnedHostKey(connect.host_key, "127.0.0.1")

    def attempt(key, user):
        request = handshake.ClientRequest(user=user, term="xterm", rows=24, cols=80)
        return handshake.client_handshake("127.0.0.1", connect.port, key, request,
                                          pinned.first, timeout=5)

    with pytest.raises(handshake.AuthRefused):
        attempt(keys.PrivateKey.generate("intruder"), connect.user)
    with pytest.raises(handshake.AuthRefused):
        attempt(client, "nobody")
    with pytest.raises(handshake.AuthRefused):  # offered first (as ssh-agent keys are)
        attempt(Offering([keys.PrivateKey.generate("agent key")]), connect.user)
    wait_for(lambda: not listening(connect.port), 10, "the unused server to exit",
             interval=0.5)
    assert time.monotonic() - started >= 3.0
    assert set(os.listdir(tmp_path)) == before  # nothing written in HOME or the cwd


@pytest.mark.parametrize("args, message", [
    (["--ssh-cache", "h"], "mp: --ssh-cache goes with --ssh\n"),
    (["--ssh", "--list", "h"], "mp: --ssh starts a server for one new session: --list, "
                               "--attach and --kill need a running mps\n"),
    (["--ssh"], "mp: --ssh needs a destination: mp --ssh [user@]host\n"),
    (["--ssh", "--ssh-cmd", "/nonexistent/ssh", "h"],
     "mp: cannot run /nonexistent/ssh: No such file or directory (install the OpenSSH client"
     " or pass --ssh-command)\n"),
])
def test_mp_ssh_usage_errors(tmp_path, args, message):
    mp = os.path.join(os.path.dirname(os.path.abspath(boot.__file__)), "mp.py")
    result = subprocess.run([sys.executable, mp, *args], capture_output=True, text=True,
                            env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                            stdin=subprocess.DEVNULL, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (255, "", message)


def test_no_connect_line_names_the_exit_status_and_the_last_error():
    # --ssh-cmd is any program: here one that says something on stderr and exits 3 (ssh's
    # arguments after it are $0, $1... of the script, ignored).
    with pytest.raises(moshpit.MoshpitError) as err:
        boot.start_over_ssh("sh -c 'echo hello; echo Killed >&2; exit 3'", "h")
    assert str(err.value) == ("the moshpit server on h did not start (no MOSHPIT CONNECT line;"
                              " the remote command exited with status 3): Killed")


def test_silence_ends_with_a_clear_line_and_kills_ssh():
    started = time.monotonic()
    with pytest.raises(moshpit.MoshpitError, match=r"no answer from the moshpit bootstrap on h "
                                                   r"in 1 s \(ssh still running"):
        boot.start_over_ssh("sh -c 'exec sleep 30'", "h", wait_secs=1.0)
    assert time.monotonic() - started < 5
