"""Logging setup (file layer always, optional stderr layer, formats, levels, directives) and
the terminal window-size helpers. Log files live under tmp_path only."""

from __future__ import annotations

import logging
import os
import stat
import threading

import pytest

import moshpit
from moshpit import TRACE, ConfigError, load_config, setup_logging

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def clean_logging():
    moshpit.reset_logging()
    yield
    moshpit.reset_logging()


def config(tmp_path, kind="server", **cli):
    return load_config(kind, cli, environ={}, home=str(tmp_path))


def file_layer():
    return [h for h in logging.getLogger("moshpit").handlers
            if isinstance(h, logging.FileHandler)]


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def read_log(path):
    for handler in logging.getLogger("moshpit").handlers:
        handler.flush()
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("n,level", [
    (0, logging.INFO), (1, logging.DEBUG), (2, TRACE), (5, TRACE), (-1, logging.WARNING),
    (-2, logging.ERROR), (-3, logging.CRITICAL), (-10, logging.CRITICAL),
])
def test_verbosity_level(n, level):
    assert moshpit.verbosity_level(n) == level


def test_trace_level_named():
    assert TRACE == 5 and logging.getLevelName(TRACE) == "TRACE"


@pytest.mark.parametrize("kind", ["server", "client"])
def test_default_log_file_created_private_under_home(tmp_path, kind):
    old = os.umask(0)  # prove the modes come from us, not from the umask
    try:
        logger = setup_logging(kind, config(tmp_path, kind))
    finally:
        os.umask(old)
    path = moshpit.default_log_path(kind, str(tmp_path))
    assert logger.name == f"moshpit.{kind}"
    assert mode(path) == 0o600
    name = "moshpits" if kind == "server" else "moshpit"
    assert mode(tmp_path / ".config" / name / "logs") == 0o700
    assert mode(tmp_path / ".config" / name) == 0o700
    assert mode(tmp_path / ".config") == 0o700
    logger.info("hello %s", "world")
    assert "hello world" in read_log(path)


def test_explicit_log_path_and_existing_dirs_untouched(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "a" / "b.log"
    setup_logging("client", config(tmp_path, "client"), log_path=str(path))
    assert mode(path) == 0o600 and mode(tmp_path / "a") == 0o700
    assert mode(tmp_path) == 0o755
    assert not (tmp_path / ".config").exists()


def test_loose_existing_log_file_is_tightened_and_appended(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("old line\n")
    os.chmod(path, 0o644)
    setup_logging("server", config(tmp_path), log_path=str(path)).warning("new line")
    assert mode(path) == 0o600
    assert read_log(path).splitlines()[0] == "old line"
    assert "new line" in read_log(path)


def test_unwritable_log_path_is_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write log file .*-t PATH"):
        setup_logging("server", config(tmp_path), log_path=str(blocker / "x.log"))


def test_calling_twice_does_not_duplicate_handlers(tmp_path):
    root = logging.getLogger("moshpit")
    others = list(root.handlers)  # e.g. pytest's own; must survive
    path = tmp_path / "x.log"
    for _ in range(3):
        setup_logging("server", config(tmp_path), log_path=str(path), stderr=True)
    ours = [h for h in root.handlers if h not in others]
    assert len(ours) == 2
    logging.getLogger("moshpit.x").warning("once")
    assert read_log(path).count("once") == 1
    moshpit.reset_logging()
    assert root.handlers == others and root.level == logging.NOTSET


def test_stderr_layer_only_when_asked(tmp_path, capsys):
    path = str(tmp_path / "x.log")
    setup_logging("server", config(tmp_path), log_path=path).warning("quiet one")
    assert "quiet one" not in capsys.readouterr().err
    setup_logging("server", config(tmp_path), log_path=path, stderr=True).warning("loud one")
    assert "WARNING loud one" in capsys.readouterr().err


@pytest.mark.parametrize("cli,verbosity,file_level,stderr_level", [
    ({}, 0, logging.INFO, logging.INFO),
    ({}, 1, logging.DEBUG, logging.DEBUG),
    ({}, 2, TRACE, TRACE),
    ({}, -1, logging.WARNING, logging.WARNING),
    ({"verbose": 1}, 0, logging.DEBUG, logging.DEBUG),
    ({"verbose": 2, "quiet": 1}, 0, logging.DEBUG, logging.DEBUG),
    ({"quiet": 1}, -1, logging.ERROR, logging.ERROR),
    ({"quiet": 3}, 0, logging.CRITICAL, logging.CRITICAL),
    ({"tracing.file.verbose": 1}, 0, logging.DEBUG, logging.INFO),
    ({"tracing.file.quiet": 2}, 1, logging.WARNING, logging.DEBUG),
])
def test_level_math(tmp_path, cli, verbosity, file_level, stderr_level):
    setup_logging("server", config(tmp_path, **cli), log_path=str(tmp_path / "x.log"),
                  stderr=True, verbosity=verbosity)
    levels = {}
    for handler in logging.getLogger("moshpit").handlers:
        if getattr(handler, "_moshpit_layer", False):
            kind = "file" if isinstance(handler, logging.FileHandler) else "stderr"
            levels[kind] = handler.filters[0].threshold("moshpit.anything")
    assert levels == {"file": file_level, "stderr": stderr_level}
    assert logging.getLogger("moshpit").level == min(file_level, stderr_level)


def test_records_below_level_are_not_written(tmp_path):
    path = tmp_path / "x.log"
    logger = setup_logging("client", config(tmp_path, "client"), log_path=str(path),
                           verbosity=1)
    logger.log(TRACE, "trace-line")
    logger.debug("debug-line")
    text = read_log(path)
    assert "debug-line" in text and "trace-line" not in text
    assert not logger.isEnabledFor(TRACE)


def test_directives_per_logger(tmp_path):
    path = tmp_path / "x.log"
    cfg = config(tmp_path, **{"tracing.file.layer.directives":
                              "warn, moshpit.transport=trace,moshpit::keys=debug,x=off"})
    setup_logging("server", cfg, log_path=str(path))
    logging.getLogger("moshpit.transport.udp").log(TRACE, "t-trace")
    logging.getLogger("moshpit.keys").debug("k-debug")
    logging.getLogger("moshpit.keys").log(TRACE, "k-trace")
    logging.getLogger("moshpit.server").info("s-info")
    logging.getLogger("moshpit.server").warning("s-warn")
    logging.getLogger("moshpit.transportation").debug("prefix-not-a-parent")
    text = read_log(path)
    assert "t-trace" in text and "k-debug" in text and "s-warn" in text
    assert "k-trace" not in text and "s-info" not in text and "prefix-not" not in text


def test_parse_directives():
    assert moshpit.parse_directives("") == (None, {})
    assert moshpit.parse_directives("moshpit=debug,moshpit.transport=info") == (
        None, {"moshpit": logging.DEBUG, "moshpit.transport": logging.INFO})
    assert moshpit.parse_directives(" ERROR ,a::b=Warn") == (logging.ERROR,
                                                               {"a.b": logging.WARNING})
    with pytest.raises(ValueError, match="unknown level"):
        moshpit.parse_directives("moshpit=chatty")


def test_default_format_has_time_level_message(tmp_path):
    path = tmp_path / "x.log"
    setup_logging("server", config(tmp_path), log_path=str(path)).info("plain")
    line = read_log(path).strip()
    stamp, level, message = line.split(None, 2)
    assert len(stamp) == len("2024-01-01T00:00:00.000") and stamp[10] == "T"
    assert (level, message) == ("INFO", "plain")


def test_format_flags(tmp_path):
    path = tmp_path / "x.log"
    layer = "tracing.file.layer."
    cfg = config(tmp_path, **{layer + "with_target": True, layer + "with_thread_ids": True,
                              layer + "with_thread_names": True,
                              layer + "with_line_number": True, layer + "with_level": False})
    setup_logging("server", cfg, log_path=str(path)).info("flagged")
    line = read_log(path).strip()
    assert "INFO" not in line and "[MainThread]" in line
    assert f"<{threading.get_ident()}>" in line
    assert " moshpit.server:" in line and line.endswith(": flagged")
    lineno = line.split("moshpit.server:")[1].split(":")[0]
    assert lineno.isdigit()


def test_line_number_without_target_names_the_file(tmp_path):
    path = tmp_path / "x.log"
    cfg = config(tmp_path, **{"tracing.file.layer.with_line_number": True})
    setup_logging("server", cfg, log_path=str(path)).info("where")
    assert "test_logging.py:" in read_log(path)


def test_stderr_format_from_stdout_section(tmp_path, capsys):
    cfg = config(tmp_path, **{"tracing.stdout.with_target": True,
                              "tracing.stdout.with_level": False})
    setup_logging("server", cfg, log_path=str(tmp_path / "x.log"), stderr=True).info("fmt")
    err = capsys.readouterr().err
    assert "moshpit.server: fmt" in err and "INFO" not in err
    assert "moshpit.server" not in read_log(tmp_path / "x.log")  # file layer: defaults


# -- terminal helpers -------------------------------------------------------------------

def test_winsize_roundtrip_on_pty():
    master, slave = os.openpty()
    try:
        moshpit.set_winsize(master, 33, 120)
        assert moshpit.get_winsize(slave) == (33, 120)
        assert moshpit.get_winsize(master) == (33, 120)
        moshpit.set_winsize(master, 10**6, -4)  # clamped, never raises
        assert moshpit.get_winsize(slave) == (65535, 0)
    finally:
        os.close(master)
        os.close(slave)


def test_get_winsize_on_non_tty_raises_oserror(tmp_path):
    with open(tmp_path / "f", "w") as f, pytest.raises(OSError):
        moshpit.get_winsize(f.fileno())
