"""``make dist``: one file, ``moshpit.pyz`` (a stdlib zipapp), that is the three programs.

Built once per test run into a temporary directory and copied alone into an empty one, so
nothing from the checkout can help it: ``keygen generate``, ``mps --print-config``, the
usage and version lines, the hints it prints (they name the bundle, not files that are not
there), and a real session: the bundle's mps serving on loopback and the bundle's mp on a
terminal connecting to it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from proc_util import PtyProcess
from server_util import REPO, MpsServer

import moshpit

pytestmark = pytest.mark.timeout(120)

VERSION = moshpit.__version__


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    """``make dist`` into a temporary directory; the bundle copied alone into an empty one.
    Returns that directory (the bundle is ``moshpit.pyz`` in it)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(["make", "-s", "dist", f"DIST={build}", f"PYTHON={sys.executable}"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"built {build}/moshpit.pyz")
    assert os.listdir(build) == ["moshpit.pyz"]  # the staging directory is gone
    alone = tmp_path_factory.mktemp("alone")
    shutil.copy(build / "moshpit.pyz", alone / "moshpit.pyz")
    return str(alone)


def run(bundle_dir: str, *args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python3 moshpit.pyz ARGS`` from the bundle's directory, nothing else on the path."""
    env = env or {"HOME": os.path.join(bundle_dir, "home"), "PATH": os.environ["PATH"]}
    return subprocess.run([sys.executable, "moshpit.pyz", *args], cwd=bundle_dir, env=env,
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, **kwargs)


def test_the_bundle_holds_the_modules_the_programs_and_an_entry_point(bundle):
    with zipfile.ZipFile(os.path.join(bundle, "moshpit.pyz")) as z:
        names = sorted(z.namelist())
    modules = sorted(name for name in os.listdir(REPO)
                     if name.endswith(".py") and name.startswith(("moshpit", "mp"))
                     and name != "moshpit_pyz.py")
    sources = sorted(modules + ["__main__.py"])
    assert names == sorted(sources + [name + "c" for name in sources])  # each with its .pyc
    assert {"moshpit.py", "mps.py", "mp.py", "mp_keygen.py"} <= set(names)
    assert os.access(os.path.join(bundle, "moshpit.pyz"), os.X_OK)  # ./moshpit.pyz works too


def loaded_from(bundle_dir: str, python: str) -> list:
    """The files ``python`` imports two of the bundle's modules from (its sys.path: the
    bundle alone) and the bundle's version line, run by that Python."""
    code = ("import sys; sys.path[:0] = ['moshpit.pyz']; import moshpit, moshpit_term; "
            "print(moshpit.__file__, moshpit_term.__file__)")
    env = {"HOME": os.path.join(bundle_dir, "home"), "PATH": os.environ["PATH"]}
    ran = [subprocess.run([python, *args], cwd=bundle_dir, env=env, capture_output=True,
                          text=True, timeout=30) for args in (["-c", code], ["moshpit.pyz",
                                                                             "--version"])]
    assert [r.returncode for r in ran] == [0, 0], [r.stderr for r in ran]
    return ran[0].stdout.split() + [ran[1].stdout]


def other_python() -> str:
    """A Python of another minor version than this one, 3.9 or newer (pyenv's), or skip."""
    root = os.environ.get("PYENV_ROOT", "/root/.pyenv")
    for path in sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3"))):
        version = tuple(int(n) for n in path.split(os.sep)[-3].split(".")[:2])
        if version >= (3, 9) and version != sys.version_info[:2]:
            return path
    pytest.skip("no Python of another version to run the bundle with")


def test_the_building_python_runs_the_bytecode_another_compiles_the_sources(bundle):
    # zipimport takes NAME.pyc when its magic number is this Python's and its hash is the
    # source's: no compile at each start. Another version must fall back to NAME.py.
    version_line = f"moshpit {VERSION}\n"
    assert loaded_from(bundle, sys.executable) == [
        "moshpit.pyz/moshpit.pyc", "moshpit.pyz/moshpit_term.pyc", version_line]
    assert loaded_from(bundle, other_python()) == [
        "moshpit.pyz/moshpit.py", "moshpit.pyz/moshpit_term.py", version_line]


def test_usage_and_versions(bundle):
    bare = run(bundle)
    assert (bare.returncode, bare.stderr) == (2, "")
    assert bare.stdout.startswith("usage: python3 moshpit.pyz PROGRAM [ARGS...]\n")
    assert len(bare.stdout.splitlines()) <= 24  # one screen
    for program in ("mps", "mp", "keygen"):
        assert re.search(rf"^  {program} +", bare.stdout, re.MULTILINE)
    helped = run(bundle, "--help")
    assert (helped.returncode, helped.stdout) == (0, bare.stdout)
    unknown = run(bundle, "mosh")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr == ("moshpit.pyz: unknown program 'mosh' (one of: mps, mp, keygen)"
                              "\n\n" + bare.stdout)
    assert run(bundle, "--version").stdout == f"moshpit {VERSION}\n"
    assert run(bundle, "mps", "--version").stdout == f"mps {VERSION}\n"
    assert run(bundle, "mp", "--version").stdout == f"mp {VERSION}\n"
    assert run(bundle, "keygen", "--version").stdout == f"moshpit.pyz keygen {VERSION}\n"


def test_each_program_names_itself_in_help_and_errors(bundle):
    assert run(bundle, "mps", "--help").stdout.startswith("usage: mps ")
    assert run(bundle, "mp", "--help").stdout.startswith("usage: mp ")
    keygen_help = run(bundle, "keygen", "--help").stdout
    assert keygen_help.startswith("usage: moshpit.pyz keygen ")
    assert "  moshpit.pyz keygen generate -f ~/.mp/mps_host_ed25519_key -N ''" in keygen_help
    bad = run(bundle, "keygen", "frobnicate")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].startswith("moshpit.pyz keygen: error: argument COMMAND")


def test_keygen_generate_then_fingerprint(bundle, tmp_path):
    key = str(tmp_path / "id_ed25519")
    made = run(bundle, "keygen", "generate", "-f", key, "-N", "", "-C", "dist@test")
    assert made.returncode == 0, made.stderr
    fingerprint = re.search(r"^(SHA256:\S+) dist@test$", made.stdout, re.MULTILINE).group(1)
    shown = run(bundle, "keygen", "fingerprint", key + ".pub")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"256 {fingerprint} dist@test")
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"


def test_mps_print_config_and_hints_name_the_bundle(bundle, tmp_path):
    home = str(tmp_path / "home")
    env = {"HOME": home, "PATH": os.environ["PATH"], "MOSHPITS_MPS_PORT": "4242"}
    shown = run(bundle, "mps", "--print-config", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "mps.port = 4242  (environment MOSHPITS_MPS_PORT)" in shown.stdout.splitlines()
    missing = run(bundle, "mps", env=env)
    key = os.path.join(home, ".mp", "mps_host_ed25519_key")
    assert missing.returncode == 1
    assert missing.stderr == (f"mps: host key {key} not found: create it with `python3 "
                              f"moshpit.pyz keygen generate -f {key} -N ''` (or start mps once "
                              "with --generate-host-key)\n")


@pytest.mark.timeout(90)
def test_a_session_between_the_bundles_mps_and_mp(bundle, tmp_path):
    pyz = os.path.join(bundle, "moshpit.pyz")
    with MpsServer(tmp_path, program=[pyz, "mps"]) as server:
        assert f"moshpit.pyz mps -c {server.config_path}" in " ".join(server.command())
        home = tmp_path / "client-home"
        home.mkdir()
        env = {"HOME": str(home), "PATH": os.environ["PATH"], "TERM": "xterm",
               "LANG": "C.UTF-8"}
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        argv = [sys.executable, pyz, "mp", "-s", str(server.port), "-p", server.client_key_path,
                "-t", str(tmp_path / "mp.log"), "--strict-host-key-checking", "accept-new",
                f"{user}@127.0.0.1"]
        with PtyProcess(argv, env=env, cwd=bundle) as terminal:
            terminal.send("echo from the bundle $((6*7))\r")
            terminal.read_until(re.compile(rb"[\r\n]from the bundle 42\r\n"), 30)
            terminal.send("exit 5\r")
            out = terminal.read_to_eof(30)
            assert b"Connection to 127.0.0.1 closed." in out
            assert terminal.wait(10) == 5
        assert "Traceback" not in server.log() + server.stderr()
