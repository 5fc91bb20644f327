"""The README's command blocks, run as written: the quick start (``make demo``), the install
steps (ssh, scp, the host key, mps in the background; module by module and as one file), the
key steps (keygen, --copy-id, the by-hand commands), connecting with mp.py on a terminal, and
stopping the server.

The blocks are taken from README.md by their ``<!-- test: NAME -->`` markers, so the README
cannot drift from what is tested. The server is a real sshd on loopback logging in a
throwaway user (tests/sshd_util.py); ``host`` is its ssh alias. Only what a reader would put
in for their own setup is replaced: ``alice`` becomes the throwaway user (mp.py reaches
``host`` through the same ssh alias: its ssh_config is the one the ssh wrappers use), the
example key line becomes ours, and the server user's config file (written before, as an
admin would) keeps mps on 127.0.0.1 and free ports.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
from proc_util import PtyProcess, wait_for
from server_util import REPO, free_port_range, make_key
from sshd_util import SshdHost, sshd_binary_fixture, sshd_host_fixture  # noqa: F401
from users_util import python_for, users_fixture  # noqa: F401  (the `users` fixture)

import moshpit_keys

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for sshd and throwaway users"),
    pytest.mark.slow,
]

README = os.path.join(REPO, "README.md")
EXAMPLE_KEY_LINE = re.compile(r"moshpit AAAA\S+ alice@laptop")


def readme_block(name: str) -> str:
    """The ```sh block right after ``<!-- test: NAME ... -->`` in README.md."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(rf"<!-- test: {re.escape(name)}\b[^>]*-->\n```sh\n(.*?)```", text,
                      re.DOTALL)
    assert match, f"README.md has no ```sh block marked <!-- test: {name} -->"
    return match.group(1)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def mps_config_for(host: SshdHost) -> tuple:
    """The server user's ~/.config/moshpits/moshpits.toml: loopback, a free port and UDP
    range (the defaults would listen on every address). Returns (tcp port, udp range)."""
    port = free_port_range(1, socket.SOCK_STREAM)[0]
    udp = free_port_range(2)
    config_dir = os.path.join(host.user.pw_dir, ".config", "moshpits")
    os.makedirs(config_dir, mode=0o700)
    with open(os.path.join(config_dir, "moshpits.toml"), "w") as f:
        f.write(f'[mps]\nip = "127.0.0.1"\nport = {port}\nudp_port_range = "{udp[0]}-{udp[1]}"\n')
    for path in (os.path.dirname(config_dir), config_dir, f.name):
        os.chown(path, host.user.pw_uid, host.user.pw_gid)
    return port, udp


def as_server_python(host: SshdHost, block: str) -> str:
    """The block, with the server user's own ``python3`` replaced only if that one lacks
    `cryptography` (a user would install it; a test machine may have it elsewhere)."""
    if host.remote("python3 -c 'import cryptography'").returncode == 0:
        return block
    return block.replace("python3 ", python_for(host.user) + " ")


def laptop_python(host: SshdHost) -> None:
    """``python3`` on the laptop side is the interpreter running the tests."""
    link = os.path.join(host.bin, "python3")
    if not os.path.exists(link):
        os.symlink(sys.executable, link)


def test_readme_install_keys_connect_and_stop_as_written(sshd_host):
    host, user = sshd_host, sshd_host.user.pw_name
    laptop_python(host)
    port, _ = mps_config_for(host)

    # Install: copy, host key, start in the background. Each line must return (a hang fails
    # the run's timeout); bash -e stops at the first failing line.
    install = as_server_python(host, readme_block("install"))
    result = host.run(install, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    host_pub = moshpit_keys.load_public_key(
        os.path.join(host.user.pw_dir, ".mp", "mps_host_ed25519_key.pub"))
    assert f"The key fingerprint is:\n{host_pub.fingerprint()} " in result.stdout
    copied = os.listdir(os.path.join(host.user.pw_dir, "moshpit"))
    assert sorted(name for name in copied if name.endswith(".py")) == sorted(
        ["moshpit.py", "moshpit_keys.py", "moshpit_trust.py", "moshpit_handshake.py",
         "moshpit_session.py", "moshpit_channels.py", "moshpit_term.py", "moshpit_login.py",
         "moshpit_ipc.py", "moshpit_transport.py", "moshpit_carrier.py", "mps.py",
         "mp_keygen.py"])
    log_path = os.path.join(host.user.pw_dir, ".config", "moshpits", "logs", "moshpits.log")
    wait_for(lambda: "started (pid" in _read(log_path), 20, "mps started by the README")
    with open(os.path.join(host.user.pw_dir, ".config", "moshpits", "mps.pid")) as f:
        mps_pid = int(f.read())
    assert os.stat(f"/proc/{mps_pid}").st_uid == host.user.pw_uid

    # Keys: generate on a terminal (answering its questions: default path, no passphrase),
    # then --copy-id through ssh.
    with PtyProcess(["bash", "-e", "-c", readme_block("keys")], env=host.env(),
                    cwd=REPO) as terminal:
        terminal.read_until("Enter file in which to save the key", 20)
        terminal.send("\r")
        terminal.read_until("Enter passphrase", 20)
        terminal.send("\r")
        terminal.read_until("Enter same passphrase again", 20)
        terminal.send("\r")
        client_pub = os.path.join(host.home, ".mp", "id_ed25519.pub")
        out = terminal.read_until(re.compile(rb"mp: key SHA256:\S+ added to [^\r\n]+"), 30)
        assert terminal.wait(20) == 0, out
    client_key = moshpit_keys.load_public_key(client_pub)
    assert terminal.last_match.group(0).decode() == (
        f"mp: key {client_key.fingerprint()} added to host:~/.mp/authorized_keys")

    # Connect on a terminal, check the host key against what the install printed, run a
    # command, exit with a status.
    connect = readme_block("connect").replace("alice@host", f"{user}@host")
    with PtyProcess(["bash", "-e", "-c", connect], cwd=REPO,
                    env=host.env(MOSHPIT_SERVER_PORT=str(port),
                                 MOSHPIT_SSH_CONFIG=host.ssh_config)) as terminal:
        terminal.read_until(f"ED25519 key fingerprint is {host_pub.fingerprint()}.", 30)
        terminal.read_until("(yes/no/[fingerprint])? ", 10)
        terminal.send("yes\r")
        terminal.read_until("$ ", 30)  # the user's bash prompt, over moshpit
        terminal.send("echo hello from $(id -un); exit 7\r")
        terminal.read_until(f"hello from {user}", 20)
        terminal.read_until("Connection to 127.0.0.1 closed.", 20)
        assert terminal.wait(20) == 7

    # Stop, as the README says; then the pid file is gone and mps has exited.
    result = host.run(as_server_python(host, readme_block("stop")), cwd=REPO, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"mps: stopped mps (pid {mps_pid})\n")
    assert not os.path.exists(os.path.join(host.user.pw_dir, ".config", "moshpits", "mps.pid"))
    assert _read(f"/proc/{mps_pid}/stat").rsplit(")", 1)[-1].split()[:1] in ([], ["Z"])


def test_readme_one_file_install_as_written(sshd_host, tmp_path):
    """The one-file block: build, copy, host key, background start; then --stop as the text
    after it says. The bundle is built into a temporary directory, not the checkout's dist/."""
    host = sshd_host
    laptop_python(host)
    mps_config_for(host)
    build = tmp_path / "build"
    block = readme_block("one-file")
    assert block.startswith("make dist\nscp dist/moshpit.pyz host:\n")
    block = block.replace("dist/moshpit.pyz", f"{build}/moshpit.pyz").replace(
        "make dist", f"make -s dist DIST={build} PYTHON={sys.executable}")
    result = host.run(as_server_python(host, block), cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.listdir(host.user.pw_dir).count("moshpit.pyz") == 1
    host_pub = moshpit_keys.load_public_key(
        os.path.join(host.user.pw_dir, ".mp", "mps_host_ed25519_key.pub"))
    assert f"The key fingerprint is:\n{host_pub.fingerprint()} " in result.stdout
    log_path = os.path.join(host.user.pw_dir, ".config", "moshpits", "logs", "moshpits.log")
    wait_for(lambda: "started (pid" in _read(log_path), 20, "the bundle's mps to start")
    with open(os.path.join(host.user.pw_dir, ".config", "moshpits", "mps.pid")) as f:
        mps_pid = int(f.read())
    assert os.stat(f"/proc/{mps_pid}").st_uid == host.user.pw_uid
    stop = as_server_python(host, "ssh host python3 moshpit.pyz mps --stop")
    result = host.run(stop, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"mps: stopped mps (pid {mps_pid})\n")


@pytest.mark.parametrize("protocol", [(), ("-O",)], ids=["sftp", "legacy-scp"])
def test_readme_copy_step_works_with_either_scp_protocol(sshd_host, protocol):
    """Debian 12's scp (OpenSSH 9.2) copies over SFTP; Ubuntu 22.04's (8.9) with the legacy
    SCP protocol, which `scp -O` selects here. The legacy one fails to copy into a folder
    that does not exist (SFTP mode makes it, mode 0744), which is why the README makes the
    folder first; the README's two lines work with both."""
    sshd_host.wrap("scp", *protocol)
    without_mkdir = sshd_host.run("scp moshpit.py mps.py host:moshpit-missing/", cwd=REPO)
    if protocol:
        assert without_mkdir.returncode == 1
        assert "scp: moshpit-missing/: No such file or directory" in without_mkdir.stderr
    copy = "\n".join(readme_block("install").splitlines()[:2])
    assert copy.startswith("ssh host mkdir -p moshpit\nscp ")
    result = sshd_host.run(copy, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(sshd_host.user.pw_dir, "moshpit", "mp_keygen.py"))


def test_why_the_start_line_is_one_redirected_command(sshd_host):
    """The README's claim: backgrounding `cd dir && nohup cmd <redirections> &` keeps ssh
    waiting (the backgrounded && list holds the session's output); one redirected command
    lets it return at once. `sleep` stands in for mps."""
    held = "ssh host 'cd /tmp && nohup sleep 60 </dev/null >/dev/null 2>&1 &'"
    with pytest.raises(subprocess.TimeoutExpired):
        sshd_host.run(held, timeout=3)
    start_line = readme_block("install").splitlines()[-1]
    assert re.fullmatch(r"ssh host 'nohup [^&;]+ </dev/null >/dev/null 2>&1 &'", start_line)
    result = sshd_host.run("ssh host 'nohup sleep 60 </dev/null >/dev/null 2>&1 &'", timeout=10)
    assert result.returncode == 0, result.stderr


def test_readme_authorize_by_hand_as_written(sshd_host):
    """The by-hand block, run on the server by the user's login shell, with our key line in
    place of the example one: files with the modes mps requires, the line once."""
    key = make_key(os.path.join(sshd_host.home, "moshpit_id"), "alice@laptop")
    block = readme_block("authorize-by-hand")
    assert EXAMPLE_KEY_LINE.search(block)
    ours = EXAMPLE_KEY_LINE.sub(key.public.to_line(), block)
    result = sshd_host.run(f"ssh host {shlex.quote(ours)}")
    assert result.returncode == 0, result.stderr
    mp_dir = os.path.join(sshd_host.user.pw_dir, ".mp")
    ak = os.path.join(mp_dir, "authorized_keys")
    assert (os.stat(mp_dir).st_mode & 0o777, os.stat(ak).st_mode & 0o777) == (0o700, 0o600)
    assert (os.stat(ak).st_uid, os.stat(mp_dir).st_uid) == (sshd_host.user.pw_uid,) * 2
    with open(ak) as f:
        assert f.read() == key.public.to_line() + "\n"


def test_readme_quick_start_demo_as_written():
    """`make demo` on a terminal: you land in your shell over moshpit, and leave it."""
    block = readme_block("quick-start")
    assert block.splitlines()[0].split("#")[0].strip() == "make demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    stamp = subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO, env=env,
                           capture_output=True)
    if stamp.returncode != 0:
        pytest.skip("make demo would first (re)install .venv: run it after `make test`")
    with PtyProcess(["make", "demo"], cwd=REPO, env=env) as terminal:
        terminal.read_until("demo: connecting", 60)
        terminal.read_until(re.compile(rb"[#$] $"), 30)
        terminal.send("echo demo answer $((6*7)); exit\r")
        terminal.read_until("demo answer 42", 20)
        assert terminal.wait(30) == 0
