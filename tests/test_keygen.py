"""mp_keygen.py as a user runs it: scripted (no terminal) and interactive through a real PTY."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import moshpit
import moshpit_keys as mk
from proc_util import PtyProcess

KEYGEN = str(Path(__file__).resolve().parent.parent / "mp_keygen.py")
SSH_KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.timeout(120)


def run(home, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run mp_keygen.py without a controlling terminal (new session), HOME=home."""
    return subprocess.run([sys.executable, KEYGEN, *args], input=stdin, capture_output=True,
                          text=True, timeout=60, start_new_session=True,
                          env=dict(os.environ, HOME=str(home)))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_clean_error(result, *fragments: str, code: int = 1) -> None:
    assert result.returncode == code
    assert result.stderr.startswith("mp_keygen.py: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def keypair(tmp_path):
    """An unencrypted key pair written as ``mp_keygen.py generate -N ''`` writes it, by the
    same call (test_generate_scripted runs the program itself): (private path, PublicKey)."""
    path = tmp_path / "keys" / "id"
    path.parent.mkdir()
    key = mk.create_key_pair(str(path), str(path) + ".pub", "fixture@test", b"")
    return str(path), key.public


# --- generate, non-interactive -----------------------------------------------------------


def test_generate_scripted(tmp_path):
    path = tmp_path / "new" / "dir" / "id"
    result = run(tmp_path, "generate", "-f", str(path), "-N", "", "-C", "ci@build")
    assert result.returncode == 0, result.stderr
    pub = mk.load_public_key(str(path) + ".pub")
    assert pub.comment == "ci@build"
    assert mk.load_private_key(str(path)).public == pub
    assert not mk.private_key_is_encrypted(str(path))
    assert Path(str(path) + ".pub").read_text() == pub.to_line() + "\n"
    assert result.stdout == (
        "Generating public/private ed25519 key pair.\n"
        f"Your private key has been saved in {path}\n"
        f"Your public key has been saved in {path}.pub\n"
        "The key fingerprint is:\n"
        f"{pub.fingerprint()} ci@build\n"
        "The key's randomart image is:\n"
        f"{pub.randomart()}\n"
    )
    assert result.stderr == ""
    assert (mode(path), mode(str(path) + ".pub")) == (0o600, 0o644)
    assert mode(tmp_path / "new") == mode(tmp_path / "new" / "dir") == 0o700
    assert sorted(os.listdir(path.parent)) == ["id", "id.pub"]  # no temp files left


def test_generate_scripted_with_passphrase(tmp_path):
    path = str(tmp_path / "id")
    assert run(tmp_path, "generate", "-f", path, "-N", "s3cret").returncode == 0
    assert mk.private_key_is_encrypted(path)
    key = mk.load_private_key(path, b"s3cret")
    assert key.public == mk.load_public_key(path + ".pub")
    assert "@" in key.public.comment  # default comment is user@host


def test_generate_default_path_without_terminal(tmp_path):
    result = run(tmp_path, "generate", "-N", "")
    assert result.returncode == 0, result.stderr
    priv, pub = mk.default_identity_paths(str(tmp_path))
    assert f"saved in {priv}\n" in result.stdout
    assert mode(priv) == 0o600 and mode(pub) == 0o644
    assert mode(tmp_path / ".mp") == 0o700


def test_generate_refuses_to_overwrite_without_force(tmp_path, keypair):
    path, pub = keypair
    before = Path(path).read_bytes()
    result = run(tmp_path, "generate", "-f", path, "-N", "")
    assert_clean_error(result, f"{path} already exists: pass --force")
    assert Path(path).read_bytes() == before
    result = run(tmp_path, "generate", "-f", path, "-N", "", "--force")
    assert result.returncode == 0
    assert mk.load_public_key(path + ".pub") != pub


def test_generate_counts_a_lone_public_key_as_existing(tmp_path):
    pub = tmp_path / "id.pub"
    pub.write_text("keep me\n")
    result = run(tmp_path, "generate", "-f", str(tmp_path / "id"), "-N", "")
    assert_clean_error(result, f"{pub} already exists: pass --force")
    assert pub.read_text() == "keep me\n"


def test_generate_needs_passphrase_option_without_terminal(tmp_path):
    path = tmp_path / "id"
    result = run(tmp_path, "generate", "-f", str(path))
    assert_clean_error(result, "no terminal to ask for a passphrase", "-N ''")
    assert not path.exists()


def test_generate_into_unwritable_place_is_a_clean_error(tmp_path):
    (tmp_path / "file").write_text("")
    result = run(tmp_path, "generate", "-f", str(tmp_path / "file" / "id"), "-N", "")
    assert_clean_error(result, "cannot write")


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint(tmp_path, keypair):
    path, pub = keypair
    result = run(tmp_path, "fingerprint", path + ".pub")
    assert result.returncode == 0
    assert result.stdout == f"256 {pub.fingerprint()} fixture@test (ED25519)\n"
    result = run(tmp_path, "fingerprint", "--randomart", path + ".pub")
    assert result.stdout == f"256 {pub.fingerprint()} fixture@test (ED25519)\n{pub.randomart()}\n"


def test_fingerprint_defaults_to_identity(tmp_path):
    assert run(tmp_path, "generate", "-N", "", "-C", "").returncode == 0
    result = run(tmp_path, "fingerprint")
    pub = mk.load_public_key(mk.default_identity_paths(str(tmp_path))[1])
    assert result.stdout == f"256 {pub.fingerprint()} no comment (ED25519)\n"


@pytest.mark.skipif(not SSH_KEYGEN, reason="ssh-keygen is not installed")
@pytest.mark.parametrize("n", range(3))
def test_fingerprint_randomart_output_equals_ssh_keygen(tmp_path, n):
    path = str(tmp_path / f"k{n}")
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", f"k{n}@x", "-f", path],
                   check=True, timeout=60, stdin=subprocess.DEVNULL)
    ours = run(tmp_path, "fingerprint", "--randomart", path + ".pub").stdout
    theirs = subprocess.run([SSH_KEYGEN, "-lv", "-f", path + ".pub"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert ours == theirs


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read: No such file or directory"),
    ("", "file is empty"),
    ("moshpit !!!garbage!!! x\n", "not valid base64"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\n", "private key"),
])
def test_fingerprint_bad_files(tmp_path, content, problem):
    path = tmp_path / "id.pub"
    if content is not None:
        path.write_text(content)
    assert_clean_error(run(tmp_path, "fingerprint", str(path)), f"{path}: ", problem)


def test_fingerprint_binary_file(tmp_path):
    path = tmp_path / "id.pub"
    path.write_bytes(os.urandom(64) + b"\0")
    assert_clean_error(run(tmp_path, "fingerprint", str(path)), f"{path}: binary data")


def test_fingerprint_shows_a_hostile_comment_without_obeying_it(tmp_path):
    """A .pub file from elsewhere: its comment is shown, never run by the terminal."""
    pub = mk.PrivateKey.generate().public
    path = tmp_path / "evil.pub"
    path.write_text(pub.to_line(mk.KEY_TYPE) + " x\x1b]0;t\x07\u009b2Jy\n", encoding="utf-8")
    result = run(tmp_path, "fingerprint", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"256 {pub.fingerprint()} x?]0;t?\\u009b2Jy (ED25519)\n"


def test_verify_shows_hostile_input_without_obeying_it(tmp_path, keypair):
    path, pub = keypair
    result = run(tmp_path, "verify", "-k", path + ".pub", "-", stdin="SHA256:\x1b[2Jfake\n")
    assert result.returncode == 1
    assert result.stdout.endswith(f"given: SHA256:^[[2Jfake\nkey:   {pub.fingerprint()}\n")


def test_closed_stdout_is_not_a_traceback(tmp_path, keypair):
    path, _ = keypair
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `mp_keygen.py ... | head -1` after head exits
    try:
        result = subprocess.run([sys.executable, KEYGEN, "fingerprint", "--randomart",
                                 path + ".pub"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=60, start_new_session=True)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


# --- verify ---------------------------------------------------------------------------------


def test_verify_fingerprint(tmp_path, keypair):
    path, pub = keypair
    for given in (pub.fingerprint(), pub.fingerprint()[len("SHA256:"):]):
        result = run(tmp_path, "verify", "-k", path + ".pub", given)
        assert result.returncode == 0
        assert result.stdout == f"OK: the fingerprint matches the key in {path}.pub\n"
    other = mk.PrivateKey.generate().public.fingerprint()
    result = run(tmp_path, "verify", "-k", path + ".pub", other)
    assert result.returncode == 1
    assert result.stdout == (
        f"MISMATCH: the fingerprint does not match the key in {path}.pub\n"
        f"given: {other}\n"
        f"key:   {pub.fingerprint()}\n")


def test_verify_defaults_to_identity(tmp_path):
    assert run(tmp_path, "generate", "-N", "").returncode == 0
    pub = mk.load_public_key(mk.default_identity_paths(str(tmp_path))[1])
    assert run(tmp_path, "verify", pub.fingerprint()).returncode == 0


def test_verify_randomart(tmp_path, keypair):
    path, pub = keypair
    art = pub.randomart()
    for given in (art, " ".join(art.splitlines()), "\n  " + art.replace("\n", "\n  ")):
        result = run(tmp_path, "verify", "--randomart", "-k", path + ".pub", given)
        assert result.returncode == 0, given
        assert result.stdout.startswith("OK: the randomart matches")
    piped = run(tmp_path, "verify", "--randomart", "-k", path + ".pub", "-", stdin=art + "\n")
    assert piped.returncode == 0
    other = mk.PrivateKey.generate().public.randomart()
    result = run(tmp_path, "verify", "--randomart", "-k", path + ".pub", other)
    assert result.returncode == 1
    assert result.stdout == (
        f"MISMATCH: the randomart does not match the key in {path}.pub\n"
        f"given:\n{other}\nkey ({pub.fingerprint()}):\n{art}\n")


def test_verify_missing_key(tmp_path):
    result = run(tmp_path, "verify", "SHA256:x")
    assert_clean_error(result, "id_ed25519.pub: cannot read")


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["-v", "-q", "fingerprint"], ["fingerprint", "-qv"],
                                  ["-v", "fingerprint", "-q"]])
def test_verbose_and_quiet_are_mutually_exclusive(tmp_path, args):
    result = run(tmp_path, *args)
    assert result.returncode == 2
    assert "mutually exclusive" in result.stderr


def test_verbose_shows_log_lines(tmp_path):
    path = str(tmp_path / "id")
    quiet = run(tmp_path, "-q", "generate", "-f", path, "-N", "")
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = run(tmp_path, "-v", "generate", "-v", "-f", path, "-N", "", "--force")
    assert f"mp_keygen.py: INFO: wrote {path} (mode 0600, unencrypted)" in loud.stderr


def test_version(tmp_path):
    result = run(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout == f"mp_keygen.py {moshpit.__version__}\n"


@pytest.mark.parametrize("command", [[], ["generate"], ["fingerprint"], ["verify"]])
def test_help_shows_examples(tmp_path, command):
    result = run(tmp_path, *command, "--help")
    assert result.returncode == 0
    assert "examples:\n  mp_keygen.py " in result.stdout


def test_no_command_is_a_usage_error(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr


# --- interactive, through a real PTY --------------------------------------------------------

PROMPT_TIMEOUT = 30.0


@pytest.fixture
def pty_keygen(tmp_path):
    """Start ``mp_keygen.py ARGS`` on a new PTY with HOME=tmp_path; always stopped."""
    started = []

    def start(*args: str) -> PtyProcess:
        proc = PtyProcess([sys.executable, KEYGEN, *args],
                          env=dict(os.environ, HOME=str(tmp_path)))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def test_interactive_generate_with_passphrase_retry(tmp_path, pty_keygen):
    default = mk.default_identity_paths(str(tmp_path))[0]
    path = tmp_path / "work" / "id_work"
    term = pty_keygen("generate", "-C", "alice@laptop")
    term.read_until(f"Enter file in which to save the key ({default}): ", PROMPT_TIMEOUT)
    term.send(f"{path}\r")
    term.read_until("Enter passphrase (empty for no passphrase): ", PROMPT_TIMEOUT)
    term.send("first-try\r")
    term.read_until("Enter same passphrase again: ", PROMPT_TIMEOUT)
    term.send("typo\r")
    term.read_until("Passphrases do not match.  Try again.", PROMPT_TIMEOUT)
    term.read_until("Enter passphrase (empty for no passphrase): ", PROMPT_TIMEOUT)
    term.send("hunter2 hunter2\r")
    term.read_until("Enter same passphrase again: ", PROMPT_TIMEOUT)
    term.send("hunter2 hunter2\r")
    rest = term.read_to_eof(PROMPT_TIMEOUT)
    assert term.wait(PROMPT_TIMEOUT) == 0
    screen = term.buffer + rest
    assert b"hunter2" not in screen and b"typo" not in screen  # never echoed
    pub = mk.load_public_key(f"{path}.pub")
    assert f"Your private key has been saved in {path}".encode() in rest
    assert f"{pub.fingerprint()} alice@laptop".encode() in rest
    assert pub.randomart().replace("\n", "\r\n").encode() in rest
    assert mk.load_private_key(str(path), b"hunter2 hunter2").public == pub
    assert mode(tmp_path / "work") == 0o700 and mode(path) == 0o600


def test_interactive_defaults(tmp_path, pty_keygen):
    term = pty_keygen("generate")
    term.read_until("Enter file in which to save the key (", PROMPT_TIMEOUT)
    term.send("\r")
    for prompt in ("Enter passphrase (empty for no passphrase): ", "Enter same passphrase again: "):
        term.read_until(prompt, PROMPT_TIMEOUT)
        term.send("\r")
    term.read_to_eof(PROMPT_TIMEOUT)
    assert term.wait(PROMPT_TIMEOUT) == 0
    priv, pub = mk.default_identity_paths(str(tmp_path))
    assert not mk.private_key_is_encrypted(priv)
    assert mk.load_private_key(priv).public == mk.load_public_key(pub)


def test_interactive_existing_key_is_refused_without_a_question(tmp_path, keypair, pty_keygen):
    """On a terminal too: only --force replaces a key (no y/N to answer by reflex), and
    the refusal comes before the passphrase is asked."""
    path, _ = keypair
    before = {p: Path(p).read_bytes() for p in (path, path + ".pub")}
    term = pty_keygen("generate", "-f", path)
    out = term.read_to_eof(PROMPT_TIMEOUT)
    assert term.wait(PROMPT_TIMEOUT) == 1
    assert f"mp_keygen.py: {path} already exists: pass --force to replace the key pair, or " \
           "choose another file with -f; nothing was written".encode() in out
    assert b"passphrase" not in out and b"Overwrite" not in out
    assert {p: Path(p).read_bytes() for p in before} == before


def test_interactive_gives_up_after_three_mismatches(tmp_path, pty_keygen):
    path = tmp_path / "id"
    term = pty_keygen("generate", "-f", str(path))
    for attempt in range(3):
        term.read_until("Enter passphrase (empty for no passphrase): ", PROMPT_TIMEOUT)
        term.send(f"a{attempt}\r")
        term.read_until("Enter same passphrase again: ", PROMPT_TIMEOUT)
        term.send(f"b{attempt}\r")
    out = term.read_to_eof(PROMPT_TIMEOUT)
    assert term.wait(PROMPT_TIMEOUT) == 1
    assert b"mp_keygen.py: passphrases did not match 3 times; no key was written" in out
    assert not path.exists()


def test_interactive_end_of_input_cancels(tmp_path, pty_keygen):
    term = pty_keygen("generate")
    term.read_until("Enter file in which to save the key (", PROMPT_TIMEOUT)
    term.send(b"\x04")  # Ctrl-D on an empty line
    out = term.read_to_eof(PROMPT_TIMEOUT)
    assert term.wait(PROMPT_TIMEOUT) == 1
    assert b"mp_keygen.py: cancelled (end of input); no key was written" in out
    assert not os.path.exists(tmp_path / ".mp")


def test_interactive_ctrl_c_at_passphrase(tmp_path, pty_keygen):
    term = pty_keygen("generate", "-f", str(tmp_path / "id"))
    term.read_until("Enter passphrase (empty for no passphrase): ", PROMPT_TIMEOUT)
    term.send(b"\x03")
    out = term.read_to_eof(PROMPT_TIMEOUT)
    assert term.wait(PROMPT_TIMEOUT) == 130
    assert b"mp_keygen.py: interrupted; no key was written" in out
    assert b"Traceback" not in out
    assert not (tmp_path / "id").exists()
