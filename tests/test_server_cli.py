"""mps.py command line, configuration, host key handling, listener and signals, through the
real program (a subprocess on loopback)."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat

import pytest
from proc_util import wait_for
from server_util import MpsServer, make_key, run_mps

pytestmark = pytest.mark.timeout(60)


def base_env(home) -> dict:
    return {"HOME": os.fspath(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def config_line(server: MpsServer, key: str) -> str:
    """The server's startup debug line for one config key: "key = value  (source)"."""
    match = re.search(rf"config: ({re.escape(key)} = .*)", server.log())
    assert match, f"no config line for {key} in log:\n{server.log()}"
    return match.group(1)


# -- flags -----------------------------------------------------------------------------


def test_version_and_help(tmp_path):
    result = run_mps(["-V"], base_env(tmp_path))
    assert result.returncode == 0
    assert re.fullmatch(r"mps \d+\.\d+\.\d+\n", result.stdout)
    result = run_mps(["--help"], base_env(tmp_path))
    assert result.returncode == 0
    flags = [("v", "verbose"), ("q", "quiet"), ("e", "enable-std-output"),
             ("c", "config-absolute-path"), ("t", "tracing-absolute-path"),
             ("p", "private-key-path"), ("k", "public-key-path"), ("h", "help"),
             ("V", "version")]
    for short, long in flags:  # "-c PATH, --config-absolute-path PATH" (3.13: "-c, --...")
        assert re.search(rf"-{short}( [A-Z-]+)?, --{long}\b", result.stdout), long
    assert "--udp-port-range LO-HI" in result.stdout
    assert "--generate-host-key" in result.stdout


def test_verbose_and_quiet_conflict(tmp_path):
    result = run_mps(["-v", "-q"], base_env(tmp_path))
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_missing_explicit_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    result = run_mps(["-c", os.fspath(missing)], base_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("mps: ")
    assert str(missing) in result.stderr and "not found" in result.stderr


# -- host key ----------------------------------------------------------------------------


def test_missing_host_key_says_how_to_make_one(tmp_path):
    """Defaults: the key and the log live under $HOME; the message is one line with the
    exact command to run."""
    result = run_mps([], base_env(tmp_path))
    assert result.returncode == 1
    key_path = os.path.join(tmp_path, ".mp", "mps_host_ed25519_key")
    assert result.stderr == (f"mps: host key {key_path} not found: create it with "
                             f"`python3 mp_keygen.py generate -f {key_path} -N ''` "
                             "(or start mps once with --generate-host-key)\n")
    log_path = tmp_path / ".config" / "moshpits" / "logs" / "moshpits.log"
    assert "not found" in log_path.read_text()
    assert stat.S_IMODE(os.stat(log_path.parent).st_mode) == 0o700


def test_generate_host_key_then_reuse_it(tmp_path):
    server = MpsServer(tmp_path, start=False)
    os.remove(server.host_key_path)
    os.remove(server.host_key_path + ".pub")
    server.args = ["--generate-host-key"]
    with server.start():
        assert stat.S_IMODE(os.stat(server.host_key_path).st_mode) == 0o600
        fingerprint = re.search(r"host key \S+ \((SHA256:\S+)\)", server.log()).group(1)
    assert server.proc.returncode == 0
    server.args = []
    with server.start():
        assert server.log().count(fingerprint) >= 2  # generated, then loaded as it was


def test_host_key_readable_by_others_is_refused(tmp_path):
    server = MpsServer(tmp_path, start=False)
    os.chmod(server.host_key_path, 0o644)
    result = run_mps(["-c", server.config_path, "-t", server.log_path], server.env)
    assert result.returncode == 1
    assert server.host_key_path in result.stderr
    assert "chmod" in result.stderr


def test_public_key_must_match_private_key(tmp_path):
    server = MpsServer(tmp_path, start=False)
    other = make_key(os.fspath(tmp_path / "other"), "other")
    result = run_mps(["-c", server.config_path, "-t", server.log_path,
                      "-k", os.fspath(tmp_path / "other.pub")], server.env)
    assert other and result.returncode == 1
    assert "does not belong to host key" in result.stderr


# -- configuration precedence: env > flags > file > defaults ---------------------------


def test_precedence_file_flag_env(tmp_path):
    server = MpsServer(tmp_path, start=False, settings={
        "mps.max_handshakes": 7,
        "mps.port": 1,  # the environment overrides this
        "mps.private_key_path": "/nonexistent/key",  # the flag overrides this
    })
    lo, hi = server.udp_range
    server.args = ["--udp-port-range", "1-2", "-p", server.host_key_path]
    server.env["MOSHPITS_MPS_UDP_PORT_RANGE"] = f"{lo}-{hi}"  # env beats the flag
    server.env["MOSHPITS_MPS_PORT"] = str(server.port)
    with server.start():
        assert config_line(server, "mps.port") == \
            f"mps.port = {server.port}  (environment MOSHPITS_MPS_PORT)"
        assert config_line(server, "mps.udp_port_range") == \
            f'mps.udp_port_range = "{lo}-{hi}"  (environment MOSHPITS_MPS_UDP_PORT_RANGE)'
        assert config_line(server, "mps.private_key_path") == \
            f'mps.private_key_path = "{server.host_key_path}"  (command line)'
        assert config_line(server, "mps.max_handshakes") == \
            f"mps.max_handshakes = 7  (file {server.config_path})"
        assert config_line(server, "mps.max_sessions") == "mps.max_sessions = 256  (default)"
        assert f"session UDP ports {lo}-{hi}" in server.log()


def test_flag_beats_file(tmp_path):
    server = MpsServer(tmp_path, start=False, udp_ports=2)
    lo, _ = server.udp_range
    server.args = ["--udp-port-range", f"{lo}-{lo}"]
    with server.start():
        assert config_line(server, "mps.udp_port_range") == \
            f'mps.udp_port_range = "{lo}-{lo}"  (command line)'


def test_env_maps_nested_and_flat_keys(tmp_path):
    server = MpsServer(tmp_path, start=False, env={
        "MOSHPITS_TRACING_FILE_LAYER_WITH_THREAD_NAMES": "true",  # nested
        "MOSHPITS_MPS_DETACHED_SESSION_TIMEOUT_SECS": "0",
        "MOSHPITS_QUIET": "1",  # flat: file says verbose = 1, net 0 -> no DEBUG lines
    })
    with server.start():
        assert "[MainThread]" in server.log()
    assert "DEBUG" not in server.log()
    server2 = MpsServer(tmp_path / "b", start=False,
                        env={"MOSHPITS_MPS_DETACHED_SESSION_TIMEOUT_SECS": "0"})
    with server2.start():
        assert config_line(server2, "mps.detached_session_timeout_secs") == (
            "mps.detached_session_timeout_secs = 0  "
            "(environment MOSHPITS_MPS_DETACHED_SESSION_TIMEOUT_SECS)")
        assert "[MainThread]" not in server2.log()


@pytest.mark.parametrize("where", ["file", "env", "flag"])
def test_bad_values_name_the_key_and_source(tmp_path, where):
    server = MpsServer(tmp_path, start=False)
    args = ["-c", server.config_path, "-t", server.log_path]
    env = dict(server.env)
    if where == "file":
        with open(server.config_path, "a") as f:
            f.write('mps.max_sessions = "many"\n')
        expect = (f"mps: config file {server.config_path}: mps.max_sessions must be an integer",)
    elif where == "env":
        env["MOSHPITS_MPS_PORT"] = "forty"
        expect = ("mps: environment MOSHPITS_MPS_PORT: mps.port must be an integer",)
    else:
        args += ["--udp-port-range", "9-3"]
        expect = ("mps: command line: mps.udp_port_range", "LO-HI")
    result = run_mps(args, env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    for text in expect:
        assert text in result.stderr


def test_unknown_key_is_warned_about(tmp_path):
    server = MpsServer(tmp_path, start=False, settings={"mps.max_sesions": 3})
    with server.start():
        assert "mps: warning:" in server.stderr()
        assert "mps.max_sesions (did you mean mps.max_sessions?)" in server.stderr()


def test_stderr_only_with_e(tmp_path):
    with MpsServer(tmp_path / "quiet") as server:
        assert server.stderr() == ""
    with MpsServer(tmp_path / "loud", args=["-e"]) as server:
        server.wait_log("listening on")
        # (each record goes to the log file first, then to stderr: wait for the second)
        wait_for(lambda: "listening on" in server.stderr(), 10, "the ready line on stderr")


# -- listener and signals ---------------------------------------------------------------


def _connects(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
        except OSError:
            return False
    return True


def test_ipv6_dual_stack_listener(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with MpsServer(tmp_path, ip="::") as server:
        assert _connects("::1", server.port)
        assert _connects("127.0.0.1", server.port)


def test_port_in_use_is_a_clear_error(tmp_path):
    with MpsServer(tmp_path / "a") as first:
        second = MpsServer(tmp_path / "b", start=False)
        result = run_mps(["-c", second.config_path, "-t", second.log_path,
                          "-p", first.host_key_path, "-k", first.host_key_path + ".pub"],
                         dict(second.env, MOSHPITS_MPS_PORT=str(first.port)))
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{first.port}" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_zero(tmp_path, sig):
    with MpsServer(tmp_path) as server:
        server.signal(signal.SIGHUP)
        server.wait_log("SIGHUP received: ignored")
        assert server.proc.poll() is None
        assert _connects("127.0.0.1", server.port)
        server.signal(sig)
        assert server.proc.wait(15) == 0
        assert f"{signal.Signals(sig).name} received" in server.log()
