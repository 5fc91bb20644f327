"""Keys are never damaged (issue 11): each scenario done the way the user did it, with the
real programs, checking what the user sees and every key file on disk before and after.

The incident: ``mp.py -p 40500 host`` (ssh's port flag) offered to generate a key, wrote a
private key to ./40500 and replaced ~/.mp/id_ed25519.pub, leaving the real private key
next to someone else's public key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moshpit
import moshpit_keys as mk
import mp
from proc_util import PtyProcess
from server_util import MPS, MpsServer, make_key, run_mps, shared_server
from test_client_session import (QUIT, QUIT_STATUS, USER, client_env, mp_args, run_mp,
                                 wait_shell)

REPO = Path(__file__).resolve().parent.parent
MP = str(REPO / "mp.py")
KEYGEN = str(REPO / "mp_keygen.py")
SSH_KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.timeout(120)


def snapshot(*tops) -> dict:
    """Every file in ``tops`` (files, or directories walked): path -> bytes (symlinks as
    their target)."""
    files = {}
    for top in map(str, tops):
        if os.path.isfile(top):
            files[top] = Path(top).read_bytes()
        for root, _, names in os.walk(top):
            for name in names:
                path = os.path.join(root, name)
                files[path] = (os.readlink(path).encode() if os.path.islink(path)
                               else Path(path).read_bytes())
    return files


@pytest.fixture
def home(tmp_path):
    """A client HOME with a key pair in ~/.mp (made by mp_keygen.py, as a user would)."""
    home = tmp_path / "client-home"
    home.mkdir()
    result = subprocess.run([sys.executable, KEYGEN, "generate", "-N", "", "-C", "me@here"],
                            env=client_env(tmp_path), capture_output=True, text=True,
                            timeout=60, start_new_session=True)
    assert result.returncode == 0, result.stderr
    return home


server = shared_server()


def mp_run(tmp_path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MP, *args], env=client_env(tmp_path), cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


# --- ssh's "-p PORT" -----------------------------------------------------------------------


@pytest.mark.parametrize("value, port", [("40500", "40500"), (":2222", "2222")])
def test_ssh_port_flag_is_refused_and_writes_nothing(tmp_path, home, value, port):
    work = tmp_path / "cwd"
    work.mkdir()
    before = snapshot(home, work)
    result = mp_run(tmp_path, "-p", value, "host", cwd=work)
    assert result.returncode == 255
    assert result.stderr == (
        "mp: -p is the client private key file in moshpit (ssh's -p PORT is -s PORT here): "
        f"no key file '{value}'; did you mean -s {port}?\n")
    assert snapshot(home, work) == before
    assert os.listdir(work) == []


def test_port_like_key_file_needs_a_path(tmp_path, home):
    """A file really named 40500 (say, left by the old bug) is still not taken for -p 40500:
    the message says how to use it on purpose."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "40500").write_bytes((home / ".mp" / "id_ed25519").read_bytes())
    before = snapshot(home, work)
    result = mp_run(tmp_path, "-p", "40500", "host", cwd=work)
    assert result.returncode == 255
    assert result.stderr == (
        "mp: -p is the client private key file in moshpit (ssh's -p PORT is -s PORT here): "
        "'40500' looks like a port; did you mean -s 40500? (for the key file named 40500, "
        "write -p ./40500)\n")
    assert snapshot(home, work) == before


def test_mps_port_like_private_key_flag_is_refused(tmp_path):
    server_home = tmp_path / "srv"
    server_home.mkdir()
    result = run_mps(["-p", "40500", "--generate-host-key"], {"HOME": str(server_home),
                                                             "PATH": "/usr/bin:/bin"},
                     cwd=str(server_home))
    assert result.returncode == 1
    assert result.stderr == (
        "mps: -p is the host private key file in moshpit (the listening port is mps.port): "
        "no key file '40500'; did you mean MOSHPITS_MPS_PORT=40500?\n")
    assert snapshot(server_home) == {}


# --- ssh's -i and -l -----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_identity_flag_pairs_with_its_own_public_key(server, tmp_path, home):
    """``mp -i KEY``: KEY.pub (not ~/.mp/id_ed25519.pub) is the public half, and the session
    logs in with KEY; no key file changes."""
    key = server.client_key_path
    before = snapshot(home, key, key + ".pub")
    printed = mp_run(tmp_path, "-i", key, "--print-config").stdout.splitlines()
    assert f'private_key_path = "{key}"  (command line)' in printed
    assert f'public_key_path = "{key}.pub"  (private_key_path + .pub, command line)' in printed
    args = mp_args(server, tmp_path)
    args[args.index("-p")] = "-i"
    with PtyProcess(args, env=client_env(tmp_path)) as term:
        wait_shell(term)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS
    after = snapshot(home, key, key + ".pub")
    assert {p: after[p] for p in before} == before  # only known_hosts was added


def test_i_and_p_naming_different_files_is_an_error(tmp_path, home):
    result = mp_run(tmp_path, "-i", "/a", "-p", "/b", "host")
    assert result.returncode == 255
    assert result.stderr == "mp: -i and -p both name the private key file: give one\n"


@pytest.mark.parametrize("argv, user", [
    (["-l", "bob", "host"], "bob"),
    (["host"], None),  # the local user
    (["alice@host"], "alice"),
    (["-l", "bob", "alice@host"], "bob"),  # ssh: the first user given wins ...
    (["alice@host", "-l", "bob"], "alice"),  # ... whichever way round
    (["-l", "bob", "-l", "carol", "host"], "bob"),  # a repeated -l keeps the first
])
def test_login_name_is_resolved_like_ssh(argv, user):
    """Matches OpenSSH (``ssh -G -l bob alice@host`` says bob; ``ssh -G alice@host -l bob``
    says alice): -l and USER@ each set the user only if it is not set yet."""
    args = mp.build_parser().parse_args(argv)
    got = mp.remote_user_and_host(args.server_destination, args.login_name, args.login_first)
    assert got == (user or mp.local_user(), "host")


def test_login_name_beats_a_configured_destination_user():
    """The command line beats the config file: -l replaces the user of server_destination
    from the config (no destination on the command line)."""
    args = mp.build_parser().parse_args(["-l", "bob"])
    assert mp.remote_user_and_host("alice@host", args.login_name, args.login_first) == \
        ("bob", "host")


def test_bad_login_name_is_refused():
    with pytest.raises(moshpit.MoshpitError, match=r"^bad login name 'a b' \(-l\)$"):
        mp.remote_user_and_host("host", "a b", True)


@pytest.mark.timeout(90)
def test_login_flag_logs_in_as_that_user(server, tmp_path):
    args = mp_args(server, tmp_path)
    args[-1:] = ["-l", USER, "127.0.0.1"]
    with PtyProcess(args, env=client_env(tmp_path)) as term:
        wait_shell(term)
        term.send("echo \"<$(whoami)>\"\r")
        term.read_until(f"<{USER}>\r\n", 30)
        term.send(QUIT)
        assert term.wait(20) == QUIT_STATUS


# --- the public path follows the private path ------------------------------------------------


def test_public_key_path_follows_the_private_one(tmp_path):
    """The config layer pairs X with X.pub unless the public path was set as firmly."""
    conf = tmp_path / "c.toml"
    conf.write_text('private_key_path = "/f/key"\npublic_key_path = "/f/key.pub"\n')

    def public(cli=None, environ=None, path=None):
        config = moshpit.load_config("client", cli=cli, path=path, environ=environ or {},
                                     home=str(tmp_path))
        return config["public_key_path"], config.source("public_key_path")

    assert public() == (f"{tmp_path}/.mp/id_ed25519.pub", "default")
    assert public({"private_key_path": "/k/work"}) == \
        ("/k/work.pub", "private_key_path + .pub, command line")
    # The file's pair is replaced by the command line's key as a whole ...
    assert public({"private_key_path": "/k/work"}, path=str(conf)) == \
        ("/k/work.pub", "private_key_path + .pub, command line")
    assert public(path=str(conf)) == ("/f/key.pub", f"file {conf}")
    # ... an explicit public path given as firmly still wins.
    assert public({"private_key_path": "/k/work", "public_key_path": "/k/other.pub"}) == \
        ("/k/other.pub", "command line")
    assert public({"private_key_path": "/k/work"}, {"MOSHPIT_PUBLIC_KEY_PATH": "/e.pub"}) == \
        ("/e.pub", "environment MOSHPIT_PUBLIC_KEY_PATH")
    assert public(environ={"MOSHPIT_PRIVATE_KEY_PATH": "/e/key"}) == \
        ("/e/key.pub", "private_key_path + .pub, environment MOSHPIT_PRIVATE_KEY_PATH")


def test_mp_and_mps_print_config_show_the_paired_public_key(tmp_path):
    """Both programs derive the pair in the config layer, and --print-config says so."""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    client = mp_run(tmp_path, "-p", "/k/work", "--print-config").stdout.splitlines()
    assert 'public_key_path = "/k/work.pub"  (private_key_path + .pub, command line)' \
        in client
    server = run_mps(["-p", "/etc/mp/host", "--print-config"], env).stdout.splitlines()
    assert 'mps.private_key_path = "/etc/mp/host"  (command line)' in server
    assert ('mps.public_key_path = "/etc/mp/host.pub"  (mps.private_key_path + .pub, '
            'command line)') in server


@pytest.mark.timeout(60)
def test_mps_with_only_p_checks_its_own_public_key(tmp_path):
    """``mps -p KEY`` compares KEY with KEY.pub, not with ~/.mp/mps_host_ed25519_key.pub
    (which belongs to another key here and used to make mps refuse to start)."""
    with MpsServer(tmp_path, start=False) as srv:
        make_key(os.path.join(srv.home, ".mp", "mps_host_ed25519_key"), "another")
        srv.args = ["-p", srv.host_key_path]
        with open(srv.config_path) as f:  # only -p names the host key
            lines = [line for line in f if "_key_path" not in line]
        with open(srv.config_path, "w") as f:
            f.writelines(lines)
        srv.start()
        assert srv.proc.poll() is None


# --- never overwrite ------------------------------------------------------------------------


def test_keygen_refuses_an_existing_public_key_without_force(tmp_path, home):
    """The private key is gone but its .pub is there: generate must not replace it."""
    (home / ".mp" / "id_ed25519").unlink()
    before = snapshot(home)
    result = subprocess.run([sys.executable, KEYGEN, "generate", "-N", ""],
                            env=client_env(tmp_path), capture_output=True, text=True,
                            timeout=60, start_new_session=True)
    assert result.returncode == 1
    pub = home / ".mp" / "id_ed25519.pub"
    assert result.stderr == (f"mp_keygen.py: {pub} already exists: pass --force to replace "
                             "the key pair, or choose another file with -f; nothing was "
                             "written\n")
    assert snapshot(home) == before


def test_keygen_force_replaces_both_files_as_a_pair(tmp_path, home):
    before = snapshot(home)
    result = subprocess.run([sys.executable, KEYGEN, "generate", "-N", "", "--force"],
                            env=client_env(tmp_path), capture_output=True, text=True,
                            timeout=60, start_new_session=True)
    assert result.returncode == 0, result.stderr
    after = snapshot(home)
    assert after.keys() == before.keys() and all(after[p] != before[p] for p in before)
    priv = str(home / ".mp" / "id_ed25519")
    assert mk.load_private_key(priv).public == mk.load_public_key(priv + ".pub")


def test_create_key_pair_checks_both_files_before_writing(tmp_path):
    pub = tmp_path / "id.pub"
    pub.write_bytes(b"someone else's key\n")
    with pytest.raises(mk.KeyFileExists, match=f"^{pub} already exists$"):
        mk.create_key_pair(str(tmp_path / "id"), str(pub), "c")
    assert snapshot(tmp_path) == {str(pub): b"someone else's key\n"}


def test_create_key_pair_rolls_back_when_the_public_file_appears_meanwhile(tmp_path,
                                                                         monkeypatch):
    """The public file is created between the check and its write (a race): the new
    private key is removed again and the intruding file is untouched."""
    priv, pub = tmp_path / "id", tmp_path / "id.pub"
    save_private = mk.save_private_key

    def save_then_race(*args, **kwargs):
        save_private(*args, **kwargs)
        pub.write_bytes(b"raced in\n")

    monkeypatch.setattr(mk, "save_private_key", save_then_race)
    with pytest.raises(mk.KeyFileExists, match=f"^{pub} already exists$"):
        mk.create_key_pair(str(priv), str(pub), "c")
    assert snapshot(tmp_path) == {str(pub): b"raced in\n"}


def test_create_key_pair_refuses_one_path_for_both(tmp_path):
    with pytest.raises(mk.KeyFileError, match="the private and public key files must differ"):
        mk.create_key_pair(str(tmp_path / "id"), str(tmp_path / "id"), "c")
    assert not os.listdir(tmp_path)


def test_mps_generate_host_key_refuses_another_keys_public_file(tmp_path):
    server_home = tmp_path / "srv"
    mp_dir = server_home / ".mp"
    mp_dir.mkdir(parents=True, mode=0o700)
    stranger = mk.PrivateKey.generate("stranger").public
    mk.save_public_key(str(mp_dir / "mps_host_ed25519_key.pub"), stranger)
    before = snapshot(server_home)
    result = subprocess.run([sys.executable, MPS, "--generate-host-key", "-t",
                             str(tmp_path / "mps.log")],
                            env={"HOME": str(server_home), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr == (
        f"mps: host key {mp_dir}/mps_host_ed25519_key not found, but "
        f"{mp_dir}/mps_host_ed25519_key.pub exists; not overwriting it: restore the host key, "
        "or move that file away and generate again (a public key can be rebuilt from its "
        "private key with `mp_keygen.py pubkey -f KEY`)\n")
    assert snapshot(server_home) == before


@pytest.mark.timeout(90)
def test_first_run_with_a_stray_public_key_offers_nothing(server, tmp_path):
    """~/.mp/id_ed25519.pub exists without its private key: mp must not pair a new key
    with it (the incident's damage), nor overwrite it."""
    mp_dir = tmp_path / "client-home" / ".mp"
    mp_dir.mkdir(parents=True, mode=0o700)
    mk.save_public_key(str(mp_dir / "id_ed25519.pub"), mk.PrivateKey.generate("x").public)
    before = snapshot(mp_dir)
    args = mp_args(server, tmp_path)
    del args[args.index("-p"):args.index("-p") + 2]
    with PtyProcess(args, env=client_env(tmp_path)) as term:
        out = term.read_to_eof(60)
        assert term.wait(10) == 255
    assert out.rstrip().splitlines()[-1] == (
        f"mp: no private key at {mp_dir}/id_ed25519, but {mp_dir}/id_ed25519.pub exists: "
        f"restore the private key, or move {mp_dir}/id_ed25519.pub away to create a new "
        "pair").encode()
    assert b"Generate" not in out
    after = snapshot(mp_dir)
    assert {p: after[p] for p in before} == before and "id_ed25519" not in os.listdir(mp_dir)


@pytest.mark.timeout(90)
def test_missing_key_without_a_terminal_says_how_to_make_one(server, tmp_path):
    args = mp_args(server, tmp_path)
    del args[args.index("-p"):args.index("-p") + 2]
    result = run_mp(args, client_env(tmp_path))
    key = tmp_path / "client-home" / ".mp" / "id_ed25519"
    assert result.returncode == 255
    assert result.stderr.splitlines()[-1] == \
        f"mp: no private key at {key}; create one with: python3 mp_keygen.py generate"
    assert not key.exists()


# --- rebuilding a public key, OpenSSH's form ---------------------------------------------------


def keygen(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, KEYGEN, *args], env=client_env(tmp_path),
                          capture_output=True, text=True, timeout=60, start_new_session=True)


def test_pubkey_rebuilds_a_deleted_public_key(tmp_path, home):
    pub = home / ".mp" / "id_ed25519.pub"
    original = pub.read_bytes()
    pub.unlink()
    result = keygen(tmp_path, "pubkey", "-f", str(home / ".mp" / "id_ed25519"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == original
    assert keygen(tmp_path, "pubkey").stdout.encode() == original  # default -f


def test_pubkey_of_an_encrypted_key_asks_on_the_terminal(tmp_path):
    key = tmp_path / "locked"
    made = keygen(tmp_path, "generate", "-f", str(key), "-N", "s3cret", "-C", "me@here")
    assert made.returncode == 0, made.stderr
    original = Path(f"{key}.pub").read_bytes()
    with PtyProcess([sys.executable, KEYGEN, "pubkey", "-f", str(key)],
                    env=client_env(tmp_path)) as term:
        term.read_until(f"Enter passphrase for {key}: ", 30)
        term.send("s3cret\r")
        out = term.read_to_eof(30)
        assert term.wait(10) == 0
    assert out.strip().splitlines()[-1] == original.strip()
    without_terminal = keygen(tmp_path, "pubkey", "-f", str(key))
    assert without_terminal.returncode == 1
    assert without_terminal.stderr == (f"mp_keygen.py: {key} is protected by a passphrase "
                                       "and there is no terminal to ask for it\n")


@pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen (OpenSSH) is not installed")
def test_openssh_format_is_read_by_ssh_keygen(tmp_path):
    key = tmp_path / "id"
    made = keygen(tmp_path, "generate", "-f", str(key), "-N", "", "-C", "me@here",
                  "--format", "openssh")
    assert made.returncode == 0, made.stderr
    line = Path(f"{key}.pub").read_text()
    assert line.startswith("ssh-ed25519 ") and line.endswith(" me@here\n")
    fingerprint = mk.load_private_key(str(key)).public.fingerprint()
    listed = subprocess.run([SSH_KEYGEN, "-lf", f"{key}.pub"], capture_output=True, text=True,
                            timeout=30)
    assert listed.stdout == f"256 {fingerprint} me@here (ED25519)\n", listed.stderr
    printed = keygen(tmp_path, "pubkey", "-f", str(key), "--format", "openssh").stdout
    assert printed == line
    # ssh-keygen -y derives the same key from our private key file.
    derived = subprocess.run([SSH_KEYGEN, "-y", "-f", str(key)], capture_output=True, text=True,
                             timeout=30)
    assert derived.stdout.split()[:2] == line.split()[:2]
    assert mk.load_public_key(f"{key}.pub") == mk.load_private_key(str(key)).public


# --- the passphrase is asked only once the server is reached --------------------------------


@pytest.fixture
def locked_key(server, tmp_path):
    path = str(tmp_path / "locked_key")
    mk.save_private_key(path, mk.load_private_key(server.client_key_path), b"open sesame")
    return path


@pytest.mark.parametrize("host", ["refused", "unresolvable"])
def test_unreachable_host_costs_no_passphrase(server, tmp_path, locked_key, host):
    args = mp_args(server, tmp_path)
    args[args.index("-p") + 1] = locked_key
    if host == "refused":
        args[args.index("-s") + 1] = "1"
    else:  # a name that fails before any lookup leaves the machine (label over 63 chars)
        args[-1] = f"{USER}@{'x' * 64}.example"
    env = client_env(tmp_path)
    before = snapshot(tmp_path / "client-home", locked_key)
    with PtyProcess(args, env=env) as term:
        out = term.read_to_eof(30)
        assert term.wait(10) == 255
    assert b"passphrase" not in out
    assert out.strip().splitlines()[-1].startswith(b"mp: ")
    if host == "refused":
        assert out.strip().splitlines()[-1] == \
            b"mp: nothing listens on 127.0.0.1:1 (is mps running? is the port right: -s PORT)"
    assert snapshot(tmp_path / "client-home", locked_key) == before


@pytest.mark.timeout(90)
def test_passphrase_asked_once_even_if_the_server_gives_up_meanwhile(tmp_path):
    """The server's handshake timeout (1 s here) passes while the user types: mp connects
    again with the key it already has; the passphrase is asked exactly once."""
    with MpsServer(tmp_path, settings={"mps.handshake_timeout_secs": 1}) as server:
        locked = str(tmp_path / "locked_key")
        mk.save_private_key(locked, mk.load_private_key(server.client_key_path), b"pw")
        args = mp_args(server, tmp_path)
        args[args.index("-p") + 1] = locked
        with PtyProcess(args, env=client_env(tmp_path)) as term:
            seen = term.read_until(f"Enter passphrase for key '{locked}': ", 30)
            assert b"Permanently added" in seen  # the host key came first
            server.wait_log("timed out", 15)
            term.send("pw\r")
            term.read_until(b"\r\n", 30)  # getpass is done (it flushes typeahead until then)
            wait_shell(term)
            term.send("exit 3\r")
            rest = term.read_to_eof(30)
            assert term.wait(10) == 3
        assert b"passphrase" not in rest


@pytest.mark.parametrize("pub_mode", [0o644, 0o600])
def test_a_public_key_given_as_the_private_key_is_named_as_such(tmp_path, home, pub_mode):
    """``pubkey -f KEY.pub`` (or -p KEY.pub): the message says what the file is, not
    "chmod 600" on a public key file."""
    pub = home / ".mp" / "id_ed25519.pub"
    pub.chmod(pub_mode)
    before = snapshot(home)
    result = keygen(tmp_path, "pubkey", "-f", str(pub))
    assert result.returncode == 1
    assert result.stderr == (f"mp_keygen.py: {pub}: this is a public key, not a private key "
                             "(give the private key file, usually the same name without "
                             ".pub)\n")
    assert snapshot(home) == before


@pytest.mark.timeout(90)
def test_damaged_public_key_is_reported_with_the_fix(server, tmp_path):
    """The incident's aftermath: the real private key beside someone else's .pub. Logging
    in still works (only the private key is used); mp says what is wrong and how to fix it,
    and the fix it prints rebuilds the right file."""
    mp_dir = tmp_path / "client-home" / ".mp"
    mp_dir.mkdir(parents=True, mode=0o700)
    key, pub = mp_dir / "id_ed25519", mp_dir / "id_ed25519.pub"
    key.write_bytes(Path(server.client_key_path).read_bytes())
    key.chmod(0o600)
    mk.save_public_key(str(pub), mk.PrivateKey.generate("someone-else").public)
    args = mp_args(server, tmp_path)
    del args[args.index("-p"):args.index("-p") + 2]
    result = subprocess.run(args, env=client_env(tmp_path), cwd=tmp_path, input="exit 4\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    fix = f"python3 {KEYGEN} pubkey -f {key} > {pub}"
    assert f"mp: warning: {pub} is not the public key of {key}; rebuild it with: {fix}" \
        in result.stderr.splitlines()
    rebuilt = subprocess.run(fix.split(" > ")[0].split(), env=client_env(tmp_path),
                             capture_output=True, text=True, timeout=60)
    assert rebuilt.stdout == Path(server.client_key_path + ".pub").read_text()
