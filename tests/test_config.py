"""Config loading: schema, precedence (env > command line > file > defaults), env mapping,
type and value checks, warnings, the TOML-less fallback. Never touches the real ~."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import moshpit
import moshpit_session
import moshpit_transport
from moshpit import ConfigError, load_config

pytestmark = pytest.mark.timeout(30)


def write_config(home, kind, text):
    path = moshpit.default_config_path(kind, str(home))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


needs_toml = pytest.mark.skipif(moshpit._toml_reader() is None, reason="no tomllib/tomli here")


# -- schema and env names ---------------------------------------------------------------

@pytest.mark.parametrize("kind,name,key", [
    ("server", "MOSHPITS_MPS_PORT", "mps.port"),
    ("server", "MOSHPITS_MPS_UDP_PORT_RANGE", "mps.udp_port_range"),
    ("server", "MOSHPITS_TRACING_FILE_LAYER_WITH_LEVEL", "tracing.file.layer.with_level"),
    ("server", "MOSHPITS_VERBOSE", "verbose"),
    ("client", "MOSHPIT_SERVER_PORT", "server_port"),
    ("client", "MOSHPIT_MAX_RECONNECT_BACKOFF_SECS", "max_reconnect_backoff_secs"),
    ("client", "MOSHPIT_TRACING_STDOUT_DIRECTIVES", "tracing.stdout.directives"),
])
def test_env_names_map_by_schema(kind, name, key):
    assert moshpit.env_names(kind)[name] == key


@pytest.mark.parametrize("kind", ["server", "client"])
def test_env_names_cover_every_key_without_collisions(kind):
    names = moshpit.env_names(kind)
    assert sorted(names.values()) == sorted(moshpit.SCHEMAS[kind])
    assert all(n.startswith(moshpit.ENV_PREFIX[kind]) for n in names)


def test_env_name_collision_is_detected(monkeypatch):
    schema = dict(moshpit.SCHEMAS["client"])
    schema["server.port"] = schema["server_port"]
    monkeypatch.setitem(moshpit.SCHEMAS, "client", schema)
    with pytest.raises(AssertionError):
        moshpit.env_names("client")


def test_defaults(tmp_path):
    server = load_config("server", {}, environ={}, home=str(tmp_path))
    client = load_config("client", {}, environ={}, home=str(tmp_path))
    mp = str(tmp_path / ".mp")
    assert server["mps.ip"] == "0.0.0.0"
    assert server["mps.port"] == 40404
    assert server["mps.udp_port_range"] == "50000-59999"
    assert server["mps.private_key_path"] == os.path.join(mp, "mps_host_ed25519_key")
    assert server["mps.public_key_path"] == os.path.join(mp, "mps_host_ed25519_key.pub")
    assert server["mps.authorized_keys_file"] == ""
    assert (server["mps.max_sessions"], server["mps.max_handshakes"]) == (256, 64)
    assert server["mps.handshake_timeout_secs"] == 10
    assert server["mps.detached_session_timeout_secs"] == 604800
    assert server["mps.max_sessions_per_user"] == 16
    assert server["mps.unattached_session_timeout_secs"] == 60
    assert server["mps.shutdown_flush_secs"] == 2 == moshpit_session.SHUTDOWN_FLUSH_SECS
    assert client["server_port"] == 40404
    assert client["server_destination"] == ""
    assert client["max_reconnect_backoff_secs"] == 3600
    assert client["private_key_path"] == os.path.join(mp, "id_ed25519")
    assert client["public_key_path"] == os.path.join(mp, "id_ed25519.pub")
    assert client["known_hosts_file"] == os.path.join(mp, "known_hosts")
    assert client["strict_host_key_checking"] == "ask"
    assert client["escape_key"] == "^^"
    for config in (server, client):
        assert config["verbose"] == config["quiet"] == 0
        assert config["tracing.file.verbose"] == config["tracing.file.quiet"] == 0
        for layer in ("tracing.stdout", "tracing.file.layer"):
            assert config[f"{layer}.with_level"] is True
            for flag in ("with_target", "with_thread_ids", "with_thread_names",
                         "with_line_number"):
                assert config[f"{layer}.{flag}"] is False
            assert config[f"{layer}.directives"] == ""
        assert all(config.source(k) == "default" for k, _ in config.items())
        assert config.warnings == [] and config.path is None
        assert config.get("verbose") == 0


def test_mp_dir(tmp_path):
    assert moshpit.mp_dir(str(tmp_path)) == str(tmp_path / ".mp")


def test_default_paths(tmp_path):
    h = str(tmp_path)
    assert moshpit.default_config_path("server", h) == f"{h}/.config/moshpits/moshpits.toml"
    assert moshpit.default_config_path("client", h) == f"{h}/.config/moshpit/moshpit.toml"
    assert moshpit.default_log_path("server", h) == f"{h}/.config/moshpits/logs/moshpits.log"
    assert moshpit.default_log_path("client", h) == f"{h}/.config/moshpit/logs/moshpit.log"


# -- precedence: every level, nested and flat key, both kinds ---------------------------

PRECEDENCE_CASES = [
    # kind, key, TOML for the file, file value, cli value, env name, env text, env value
    ("server", "mps.port", "[mps]\nport = 1001\n", 1001, 1002, "MOSHPITS_MPS_PORT", "1003",
     1003),
    ("server", "verbose", "verbose = 1\n", 1, 2, "MOSHPITS_VERBOSE", "3", 3),
    ("client", "server_port", "server_port = 2001\n", 2001, 2002, "MOSHPIT_SERVER_PORT",
     "2003", 2003),
    ("client", "tracing.file.layer.with_level", "[tracing.file.layer]\nwith_level = false\n",
     False, True, "MOSHPIT_TRACING_FILE_LAYER_WITH_LEVEL", "off", False),
]


@needs_toml
@pytest.mark.parametrize("kind,key,toml,file_v,cli_v,env_name,env_text,env_v", PRECEDENCE_CASES)
def test_precedence_env_over_cli_over_file_over_default(
        tmp_path, kind, key, toml, file_v, cli_v, env_name, env_text, env_v):
    home = str(tmp_path)
    path = write_config(home, kind, toml)
    default = moshpit.SCHEMAS[kind][key].default

    def load(cli, environ):
        return load_config(kind, cli, environ=environ, home=home)

    os.rename(path, path + ".off")
    c = load({}, {})
    assert (c[key], c.source(key)) == (default, "default")
    os.rename(path + ".off", path)
    c = load({}, {})
    assert (c[key], c.source(key)) == (file_v, f"file {path}")
    assert c.path == path
    c = load({key: cli_v}, {})
    assert (c[key], c.source(key)) == (cli_v, "command line")
    c = load({key: cli_v}, {env_name: env_text})
    assert (c[key], c.source(key)) == (env_v, f"environment {env_name}")
    c = load({}, {env_name: env_text})  # env beats the file without a flag too
    assert (c[key], c.source(key)) == (env_v, f"environment {env_name}")


@needs_toml
def test_explicit_file_replaces_default_file(tmp_path):
    write_config(tmp_path, "client", "server_port = 1\n")
    other = tmp_path / "other.toml"
    other.write_text("server_port = 2\n")
    c = load_config("client", {}, path=str(other), environ={}, home=str(tmp_path))
    assert c["server_port"] == 2 and c.source("server_port") == f"file {other}"


def test_cli_none_values_never_mask(tmp_path):
    c = load_config("client", {"server_port": None, "private_key_path": None},
                    environ={}, home=str(tmp_path))
    assert c.source("server_port") == "default" and c.source("private_key_path") == "default"


def test_cli_unknown_key_is_a_bug(tmp_path):
    with pytest.raises(ValueError, match="mps.port"):
        load_config("client", {"mps.port": 1}, environ={}, home=str(tmp_path))


def test_home_from_environ(tmp_path):
    c = load_config("client", {}, environ={"HOME": str(tmp_path)})
    assert c["known_hosts_file"] == str(tmp_path / ".mp" / "known_hosts")
    assert c.home == str(tmp_path)


# -- environment values -----------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), (" On ", True),
    ("false", False), ("0", False), ("no", False), ("off", False), ("False", False),
])
def test_env_bool_words(tmp_path, text, value):
    c = load_config("server", {}, environ={"MOSHPITS_TRACING_STDOUT_WITH_TARGET": text},
                    home=str(tmp_path))
    assert c["tracing.stdout.with_target"] is value


def test_env_ints_and_strings(tmp_path):
    env = {"MOSHPITS_MPS_PORT": " 4000 ", "MOSHPITS_QUIET": "-2",
           "MOSHPITS_MPS_IP": "::", "MOSHPITS_MPS_UDP_PORT_RANGE": "6000-6000",
           "MOSHPITS_TRACING_FILE_LAYER_DIRECTIVES": "moshpit=debug"}
    c = load_config("server", {}, environ=env, home=str(tmp_path))
    assert (c["mps.port"], c["quiet"], c["mps.ip"]) == (4000, -2, "::")
    assert c["mps.udp_port_range"] == "6000-6000"
    assert c["tracing.file.layer.directives"] == "moshpit=debug"


def test_empty_env_counts_as_unset(tmp_path):
    c = load_config("client", {"server_port": 7}, environ={"MOSHPIT_SERVER_PORT": ""},
                    home=str(tmp_path))
    assert (c["server_port"], c.source("server_port")) == (7, "command line")


def test_other_prefix_and_unknown_env_ignored(tmp_path):
    env = {"MOSHPITS_SERVER_PORT": "1", "MOSHPIT_MPS_PORT": "2", "MOSHPIT_CONNECTION": "x y"}
    c = load_config("client", {}, environ=env, home=str(tmp_path))
    assert c.source("server_port") == "default" and c.warnings == []
    s = load_config("server", {}, environ=env, home=str(tmp_path))
    assert s.source("mps.port") == "default"


def test_paths_expand_tilde_against_home(tmp_path):
    env = {"MOSHPIT_PRIVATE_KEY_PATH": "~/keys/id"}
    c = load_config("client", {"known_hosts_file": "/abs/kh"}, environ=env,
                    home=str(tmp_path))
    assert c["private_key_path"] == str(tmp_path / "keys" / "id")
    assert c["known_hosts_file"] == "/abs/kh"


# -- bad types and values from each source ----------------------------------------------

@needs_toml
def test_bad_type_in_file_names_file_and_key(tmp_path):
    path = write_config(tmp_path, "server", '[mps]\nport = "abc"\n')
    with pytest.raises(ConfigError) as err:
        load_config("server", {}, environ={}, home=str(tmp_path))
    assert str(err.value) == f"config file {path}: mps.port must be an integer, got 'abc'"


@needs_toml
@pytest.mark.parametrize("toml,message", [
    ("verbose = 1.5\n", "verbose must be an integer, got 1.5"),
    ("verbose = true\n", "verbose must be an integer, got True"),
    ("[tracing.stdout]\nwith_level = 3\n", "tracing.stdout.with_level must be true or false"),
    ("server_destination = 5\n", "server_destination must be a string, got 5"),
    ("server_port = [1]\n", "server_port must be an integer, got [1]"),
    ("server_port = {a = 1}\n", "server_port must be an integer, got {'a': 1}"),
])
def test_bad_types_in_file(tmp_path, toml, message):
    write_config(tmp_path, "client", toml)
    with pytest.raises(ConfigError, match="config file .*: " + message.replace("[", r"\[")):
        load_config("client", {}, environ={}, home=str(tmp_path))


@pytest.mark.parametrize("name,text,message", [
    ("MOSHPITS_MPS_PORT", "abc", "environment MOSHPITS_MPS_PORT: mps.port must be an integer, "
                                 "got 'abc'"),
    ("MOSHPITS_MPS_PORT", "1e3", "mps.port must be an integer"),
    ("MOSHPITS_TRACING_FILE_LAYER_WITH_LEVEL", "maybe",
     "environment MOSHPITS_TRACING_FILE_LAYER_WITH_LEVEL: tracing.file.layer.with_level "
     "must be true or false, got 'maybe'"),
])
def test_bad_types_in_env(tmp_path, name, text, message):
    with pytest.raises(ConfigError) as err:
        load_config("server", {}, environ={name: text}, home=str(tmp_path))
    assert message in str(err.value)


def test_bad_type_on_command_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("client", {"server_port": "http"}, environ={}, home=str(tmp_path))
    assert str(err.value) == "command line: server_port must be an integer, got 'http'"


def test_long_bad_value_is_shortened(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("client", {"server_port": "x" * 500}, environ={}, home=str(tmp_path))
    assert len(str(err.value)) < 150 and str(err.value).endswith("...")


@pytest.mark.parametrize("kind,key,value,message", [
    ("server", "mps.port", 0, "must be between 1 and 65535"),
    ("server", "mps.port", 65536, "must be between 1 and 65535"),
    ("client", "server_port", -1, "must be between 1 and 65535"),
    ("server", "mps.udp_port_range", "5-4", "LO <= HI"),
    ("server", "mps.udp_port_range", "50000", "LO-HI"),
    ("server", "mps.udp_port_range", "0-10", "LO-HI"),
    ("server", "mps.udp_port_range", "1-70000", "LO-HI"),
    ("server", "mps.udp_port_range", "a-b", "LO-HI"),
    ("server", "mps.max_sessions", 0, "must be at least 1"),
    ("server", "mps.detached_session_timeout_secs", -1, "must be at least 0"),
    ("server", "mps.max_sessions_per_user", 0, "must be at least 1"),
    ("server", "mps.unattached_session_timeout_secs", -1, "must be at least 0"),
    ("client", "strict_host_key_checking", "no", "must be one of ask, accept-new, yes"),
    ("client", "escape_key", "^^^", "caret notation"),
    ("client", "escape_key", "", "caret notation"),
    ("client", "escape_key", "é", "caret notation"),
    ("client", "tracing.stdout.directives", "moshpit=loud", "unknown level"),
])
def test_value_checks(tmp_path, kind, key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(kind, {key: value}, environ={}, home=str(tmp_path))
    assert str(err.value).startswith(f"command line: {key} ")
    assert message in str(err.value)


@pytest.mark.parametrize("value", ["1-65535", "50000-50000", " 6000 - 6001 "])
def test_udp_port_range_accepted(tmp_path, value):
    c = load_config("server", {"mps.udp_port_range": value}, environ={}, home=str(tmp_path))
    assert c["mps.udp_port_range"] == value
    lo, hi = moshpit.parse_port_range(value)
    assert 1 <= lo <= hi <= 65535


@pytest.mark.parametrize("kind,key,value,clamped,warned", [
    ("client", "max_reconnect_backoff_secs", *case) for case in [
        (1, 2, True), (-5, 2, True), (2, 2, False), (3600, 3600, False), (86400, 86400, False),
        (86401, 86400, True), (10**9, 86400, True)]
] + [
    # below the minimum an idle session (one keepalive every 3 s) would resume for nothing
    ("client", "resume_after_secs", *case) for case in [
        (0, 4, True), (3, 4, True), (4, 4, False), (10, 10, False), (86401, 86400, True)]
] + [
    ("server", "mps.shutdown_flush_secs", *case) for case in [
        (-1, 0, True), (0, 0, False), (2, 2, False), (60, 60, False), (61, 60, True)]
])
def test_timers_clamped(tmp_path, kind, key, value, clamped, warned):
    env = {name: str(value) for name, dotted in moshpit.env_names(kind).items() if dotted == key}
    c = load_config(kind, {}, environ=env, home=str(tmp_path))
    assert c[key] == clamped
    assert bool(c.warnings) is warned
    if warned:
        assert key in c.warnings[0] and str(clamped) in c.warnings[0]


def test_resume_after_default_and_minimum_outlast_a_keepalive(tmp_path):
    """The resume wait must exceed the keepalive period (plus a round trip): an idle client
    hears from the server only that often."""
    assert load_config("client", {}, environ={}, home=str(tmp_path))["resume_after_secs"] == 10
    assert moshpit.MIN_RESUME_AFTER_SECS > moshpit_transport.KEEPALIVE_SECS + 0.5
    assert moshpit_session.RESUME_AFTER_SECS == moshpit.DEFAULT_RESUME_AFTER_SECS


@pytest.mark.parametrize("text,byte", [
    ("^^", 0x1E), ("^]", 0x1D), ("^a", 0x01), ("^A", 0x01), ("^@", 0x00), ("^?", 0x7F),
    ("^_", 0x1F), ("~", 0x7E), ("^", 0x5E), ("none", None), ("None", None),
])
def test_escape_key(tmp_path, text, byte):
    assert moshpit.parse_escape_key(text) == byte
    c = load_config("client", {"escape_key": text}, environ={}, home=str(tmp_path))
    assert c["escape_key"] == text


def test_strict_host_key_checking_choices(tmp_path):
    for value in ("ask", "accept-new", "yes"):
        c = load_config("client", {"strict_host_key_checking": value}, environ={},
                        home=str(tmp_path))
        assert c["strict_host_key_checking"] == value


# -- files: unknown keys, missing, unreadable, syntax errors, no TOML parser ------------

@needs_toml
def test_unknown_keys_warned_once_with_hint(tmp_path):
    path = write_config(tmp_path, "server",
                        "colour = 1\n[mps]\nprot = 1\nport = 5\n[tracing.stdout.x]\ny = 1\n")
    c = load_config("server", {}, environ={}, home=str(tmp_path))
    assert c["mps.port"] == 5
    assert len(c.warnings) == 1
    w = c.warnings[0]
    assert w.startswith(f"config file {path}: ignoring unknown keys ")
    assert "colour" in w and "mps.prot (did you mean mps.port?)" in w
    assert "tracing.stdout.x.y" in w


@needs_toml
def test_known_table_as_scalar_is_unknown_key(tmp_path):
    write_config(tmp_path, "server", "mps = 5\n")
    c = load_config("server", {}, environ={}, home=str(tmp_path))
    assert "unknown key mps" in c.warnings[0]


def test_missing_explicit_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{missing}.*not found"):
        load_config("client", {}, path=str(missing), environ={}, home=str(tmp_path))


def test_missing_default_file_is_fine(tmp_path):
    c = load_config("server", {}, environ={}, home=str(tmp_path / "nohome"))
    assert c.path is None and c.warnings == []


@needs_toml
def test_unreadable_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("client", {}, path=str(tmp_path), environ={}, home=str(tmp_path))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'server_destination = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"cannot read config file {bad}"):
        load_config("client", {}, path=str(bad), environ={}, home=str(tmp_path))


@needs_toml
def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write_config(tmp_path, "server", "[mps]\nport = 1\nip = \n")
    with pytest.raises(ConfigError) as err:
        load_config("server", {}, environ={}, home=str(tmp_path))
    assert str(err.value).startswith(f"config file {path}: invalid TOML")
    assert "line 3" in str(err.value)


def test_import_falls_back_when_no_toml_parser_is_importable(tmp_path):
    """The real import path: neither tomllib nor tomli importable (a None entry in
    sys.modules makes the import fail), as on a bare Python 3.9/3.10."""
    write_config(tmp_path, "client", "server_port = 1\n")
    code = ("import sys; sys.modules['tomllib'] = sys.modules['tomli'] = None\n"
            "import moshpit\n"
            "c = moshpit.load_config('client', {}, environ={}, home=sys.argv[1])\n"
            "print(moshpit._toml_reader(), c['server_port'], len(c.warnings))\n")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=here, timeout=20,
                         capture_output=True, check=True, text=True).stdout
    assert out.split() == ["None", "1", "0"]  # read by the built-in reader, no warning


def test_without_toml_parser_no_default_file_no_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(moshpit, "_toml_reader", lambda: None)
    c = load_config("client", {}, environ={}, home=str(tmp_path))
    assert c.warnings == []


def test_without_toml_parser_explicit_file_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(moshpit, "_toml_reader", lambda: None)
    path = tmp_path / "x.toml"
    path.write_text("server_port = 1\n")
    c = load_config("client", {}, path=str(path), environ={}, home=str(tmp_path))
    assert (c["server_port"], c.source("server_port"), c.warnings) == (1, f"file {path}", [])


# -- describe (--print-config) ----------------------------------------------------------

def test_describe_lists_every_key_value_and_source(tmp_path):
    c = load_config("client", {"server_destination": 'al"ice@h'},
                    environ={"MOSHPIT_SERVER_PORT": "7"}, home=str(tmp_path))
    lines = c.describe().splitlines()
    assert len(lines) == len(moshpit.SCHEMAS["client"])
    assert "server_port = 7  (environment MOSHPIT_SERVER_PORT)" in lines
    assert 'server_destination = "al\\"ice@h"  (command line)' in lines
    assert "tracing.stdout.with_level = true  (default)" in lines
    assert 'escape_key = "^^"  (default)' in lines
