"""moshpit core, lowest layer: errors, constants, configuration, logging, terminal helpers.

moshpit is split by layer into flat sibling modules (copying stays trivial: every
``moshpit*.py`` plus the CLI you need). Each module uses only the ones above it:

    moshpit.py            errors/constants -> config (TOML, ssh_config) -> logging -> tty
    moshpit_keys.py       Ed25519 keys, OpenSSH key files, fingerprints, randomart
    moshpit_trust.py      authorized_keys (read safely: files a user controls), known_hosts
    moshpit_handshake.py  TCP handshake (sans-IO) + blocking drivers
    moshpit_transport.py  packet crypto -> reliable stream (sans-IO) -> UDP I/O glue
    moshpit_login.py      account policy, PAM, utmp/wtmp/lastlog (mps only)
    mps.py / mp.py / mp_keygen.py   thin CLIs
    moshpit_pyz.py        __main__ of the one-file bundle (make dist): picks one of the CLIs
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import logging
import os
import re
import shlex
import struct
import sys
import termios
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_TCP_PORT", "DEFAULT_UDP_PORT_RANGE", "MAX_DATAGRAM", "TRANSPORTS",
    "DEFAULT_RESUME_AFTER_SECS", "MIN_RESUME_AFTER_SECS", "DEFAULT_SHUTDOWN_FLUSH_SECS",
    "HOST_KEY_POLICIES", "PREDICT_MODES", "CLIENT_KEY_FILE", "HOST_KEY_FILE", "KNOWN_HOSTS_FILE",
    "AUTHORIZED_KEYS_FILE", "TERM_NAME_RE", "LOCALE_NAME_RE", "LOCALE_VALUE_RE",
    "is_locale_setting", "format_addr", "make_private_dirs",
    "MoshpitError", "ConfigError", "ENV_PREFIX", "mp_dir", "default_config_path",
    "default_log_path", "default_pid_path", "parse_port_range", "parse_max_startups",
    "parse_netblock", "parse_permit_open", "PENALTY_DEFAULTS", "parse_penalties",
    "parse_escape_key", "TRACE",
    "parse_directives", "PATH", "SCHEMAS", "env_names", "Config", "config_report", "load_config",
    "add_common_flags", "common_flag_settings", "ROOT_LOGGER", "verbosity_level", "reset_logging",
    "setup_logging", "PRINTABLE_LIMIT", "ELLIPSIS", "printable", "printable_lines", "get_winsize",
    "set_winsize",
]

__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# Errors and constants
# ---------------------------------------------------------------------------

# 2: session records (resize, exit, shutdown) on stream 1 instead of transport control
# frames (moshpit_session); a version-1 peer is refused with a message saying to upgrade.
# 3: reattach from any client: the TAKE_OVER/LIST/KILL intents, the LISTING answer, the
# detached-session count in a grant, the REPAINT record.
# 4: keys in ssh-agent: the optional ClientOffer/KeyAccepted handshake step (ssh's publickey
# query: the server says which offered key it accepts before the agent is asked to sign);
# channels (moshpit_channels): records 9-15, stream 2, the request's agent forwarding flag;
# the request's no-command flag (mp -N: a session with no process, for forwarding only),
# both in the request's session flags byte;
# local echo prediction: the ECHO_ACK and TTY_MODE records;
# the TCP carrier: the handshake's connection stays open after the grant as the TCP carrier of the
# session's datagrams (u16 length | datagram) where UDP is blocked (moshpit_carrier);
# datagram size discovery: UDP datagrams up to moshpit_transport.LARGEST_DATAGRAM once a padded
# PATH_CHALLENGE of that size was answered on the path (MAX_DATAGRAM stays the base size).
# ACK frames: a u16 gap count (was u8) whose top bit says gaps were left out, as many of the
# lowest gaps as fit in the packet (up to MAX_REORDER_SEGMENTS); the sender infers no loss
# above the region reported when gaps were left out.
PROTOCOL_VERSION = 4
DEFAULT_TCP_PORT = 40404
DEFAULT_UDP_PORT_RANGE = (50000, 59999)
# The client's resume_after_secs (UDP silence before a port hop and a resume handshake): an
# idle client hears from the server only once per keepalive (moshpit_transport.KEEPALIVE_SECS,
# 3 s), so anything shorter than MIN_RESUME_AFTER_SECS would resume a healthy idle session.
DEFAULT_RESUME_AFTER_SECS = 10
MIN_RESUME_AFTER_SECS = 4
# The server's shutdown_flush_secs: stopping, how long a session waits for its client to
# acknowledge the shutdown notice before the shell is hung up.
DEFAULT_SHUTDOWN_FLUSH_SECS = 2
MAX_DATAGRAM = 1200  # fits a 1280-byte IPv6 path with IP/UDP headers to spare: the size every
# path carries (the handshake, the TCP carrier); UDP grows past it only where a probe proves it
TRANSPORTS = ("auto", "udp", "tcp")  # the client's `transport`: see moshpit_carrier

# strict_host_key_checking: prompt on a TTY | trust on first use | recorded keys only
HOST_KEY_POLICIES = ("ask", "accept-new", "yes")
# predict (local echo, moshpit_predict): as mosh's --predict
PREDICT_MODES = ("adaptive", "always", "never", "experimental")

# File names under ~/.mp (the paths in the config default to these).
CLIENT_KEY_FILE = "id_ed25519"
HOST_KEY_FILE = "mps_host_ed25519_key"
KNOWN_HOSTS_FILE = "known_hosts"
AUTHORIZED_KEYS_FILE = "authorized_keys"

# What a client may say about its terminal, checked by the handshake on both sides and
# again by the server before it reaches a shell's environment: TERM a terminfo name,
# LANG/LC_* printable without spaces (a locale name, never a script).
TERM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
LOCALE_NAME_RE = re.compile(r"LANG|LC_[A-Z]{1,32}")
LOCALE_VALUE_RE = re.compile(r"[\x21-\x7e]{0,128}")


def is_locale_setting(name: str, value: str) -> bool:
    """Whether ``name=value`` is a LANG/LC_* setting a client may pass to the shell."""
    return bool(LOCALE_NAME_RE.fullmatch(name) and LOCALE_VALUE_RE.fullmatch(value))


def format_addr(addr) -> str:
    """``host:port``, ``[v6host]:port``, or "?" for no address: for logs and messages."""
    if not addr:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MoshpitError(Exception):
    """An error a user can act on: ``str(err)`` is one line saying what is wrong and what to do.

    CLIs print it as ``prog: message`` and exit non-zero; never a traceback.
    """


class ConfigError(MoshpitError):
    """A configuration problem: the message names the key (or file) and where it came from."""


# The programs, by the name each has as a file beside the modules. The one-file bundle
# (moshpit.pyz, built by `make dist`) runs the same programs as `python3 moshpit.pyz NAME`.
PROGRAM_FILES = {"mps": "mps.py", "mp": "mp.py", "keygen": "mp_keygen.py"}


def bundle_path() -> Optional[str]:
    """The moshpit.pyz these modules run from, or None when they are files: inside a zipapp a
    module's __file__ is a path within the zip file, so its directory is that file."""
    here = os.path.dirname(os.path.abspath(__file__))
    return here if os.path.isfile(here) else None


def program_name(program: str) -> str:
    """What help and messages call ``program`` ("mps", "mp" or "keygen"): its file name
    (``mp_keygen.py``), or ``moshpit.pyz keygen`` in the bundle."""
    bundle = bundle_path()
    return f"{os.path.basename(bundle)} {program}" if bundle else PROGRAM_FILES[program]


def program_command(program: str) -> str:
    """The command that runs ``program`` from this copy, for messages that tell someone what
    to type: ``python3 mp_keygen.py`` (relative when under the current directory), or
    ``python3 moshpit.pyz keygen`` from the bundle."""
    bundle = bundle_path()
    target = bundle or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    PROGRAM_FILES[program])
    try:
        relative = os.path.relpath(target)
    except (OSError, ValueError):  # no current directory any more
        relative = ".."
    shown = target if relative.startswith("..") else relative
    return f"python3 {shlex.quote(shown)}" + (f" {program}" if bundle else "")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------
# One table per kind maps dotted keys to (type, default, check). Every source (TOML file,
# command line, environment) goes through the same coercion and checks, so a value means the
# same thing wherever it comes from. Precedence, highest first: environment, command line,
# file, defaults (the seed's order).


def _toml_reader():
    """tomllib (Python 3.11+), else the tomli backport if installed, else None (then
    parse_toml_subset reads the file). Imported when a config file is read: a start without
    one (most clients) does not pay for it."""
    try:
        import tomllib
        return tomllib
    except ImportError:  # 3.9/3.10
        try:
            import tomli
            return tomli
        except ImportError:
            return None


# Directory under ~/.config and stem of the config/log file names; env variable prefix.
_APP_NAME = {"server": "moshpits", "client": "moshpit"}
ENV_PREFIX = {"server": "MOSHPITS_", "client": "MOSHPIT_"}


def mp_dir(home: Optional[str] = None) -> str:
    """``~/.mp`` (keys, authorized_keys, known_hosts) of ``home`` if given, else of $HOME."""
    return os.path.join(home if home is not None else os.path.expanduser("~"), ".mp")


def _home(home: Optional[str], environ=None) -> str:
    if home is not None:
        return home
    environ = os.environ if environ is None else environ
    return environ.get("HOME") or os.path.expanduser("~")


def default_config_path(kind: str, home: Optional[str] = None) -> str:
    """``~/.config/moshpits/moshpits.toml`` (server) or ``~/.config/moshpit/moshpit.toml``."""
    name = _APP_NAME[kind]
    return os.path.join(_home(home), ".config", name, name + ".toml")


def default_log_path(kind: str, home: Optional[str] = None) -> str:
    """``~/.config/moshpits/logs/moshpits.log`` (server) or ``~/.config/moshpit/logs/...``."""
    name = _APP_NAME[kind]
    return os.path.join(_home(home), ".config", name, "logs", name + ".log")


def default_pid_path(home: Optional[str] = None) -> str:
    """``~/.config/moshpits/mps.pid``: where a running mps says who it is (``mps --stop``)."""
    return os.path.join(_home(home), ".config", _APP_NAME["server"], "mps.pid")


def parse_port_range(text: str) -> Tuple[int, int]:
    """``"LO-HI"`` -> ``(LO, HI)`` with 1 <= LO <= HI <= 65535; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not (m and 1 <= lo <= hi <= 65535):
        raise ValueError('must be "LO-HI" with 1 <= LO <= HI <= 65535, e.g. "50000-59999"')
    return lo, hi


def parse_max_startups(text: str) -> Tuple[int, int, int]:
    """sshd's MaxStartups syntax, ``"START:RATE:FULL"`` (or a bare ``"FULL"``) -> (START,
    RATE percent, FULL): from START handshakes in progress, refuse a new one with probability
    RATE %, rising linearly to 100 % at FULL. ValueError unless 1 <= START <= FULL and
    0 <= RATE <= 100."""
    m = re.fullmatch(r"\s*(\d{1,6})(?:\s*:\s*(\d{1,3})\s*:\s*(\d{1,6}))?\s*", text)
    start = rate = full = 0
    if m and m.group(2) is None:
        start, rate, full = int(m.group(1)), 100, int(m.group(1))
    elif m:
        start, rate, full = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (m and 1 <= start <= full and 0 <= rate <= 100):
        raise ValueError('must be "START:RATE:FULL" (as sshd\'s MaxStartups) with'
                         ' 1 <= START <= FULL and RATE a percentage, e.g. "16:30:48"')
    return start, rate, full


def parse_netblock(text: str) -> Tuple[int, int]:
    """``"V4:V6"`` (sshd's PerSourceNetBlockSize) -> the prefix lengths that group source
    addresses, e.g. ``"32:64"``: each IPv4 address alone, each IPv6 /64 as one source."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*(?::\s*(\d{1,3})\s*)?", text)
    v4 = int(m.group(1)) if m else -1
    v6 = int(m.group(2)) if m and m.group(2) is not None else 128
    if not (m and 1 <= v4 <= 32 and 1 <= v6 <= 128):
        raise ValueError('must be "V4:V6" prefix lengths (1-32 and 1-128), e.g. "32:64"')
    return v4, v6


PENALTY_DEFAULTS = {"authfail": 5, "noauth": 1, "grace-exceeded": 10, "max": 600, "min": 15}


def parse_permit_open(text: str) -> Optional[list]:
    """permit_open's entries as (host pattern, port or "*"); None for ``any``, [] for
    ``none``.  Raises ValueError naming a bad entry."""
    words = text.split()
    if not words or words == ["any"]:
        return None
    if words == ["none"]:
        return []
    permits = []
    for word in words:
        host, sep, port = word.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not (port == "*" or port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"has a bad entry {word!r} (use host:port, * for any host or port,"
                             f" or any, or none)")
        permits.append((host.lower(), port if port == "*" else str(int(port))))
    return permits


def parse_penalties(text: str) -> Dict[str, int]:
    """sshd's PerSourcePenalties syntax -> seconds per name, e.g. ``"authfail:5 noauth:1
    grace-exceeded:10 max:600 min:15"``; a name left out keeps its default, ``"no"`` turns
    penalties off. authfail: a refused key or signature; noauth: a peer that left or broke the
    protocol before authenticating; grace-exceeded: a handshake past its deadline. A source's
    penalties add up (to at most ``max``) and count down in real time; it is refused while
    what it has built up exceeds ``min``."""
    if text.strip().lower() == "no":
        return dict.fromkeys(PENALTY_DEFAULTS, 0)
    values = dict(PENALTY_DEFAULTS)
    for item in text.split():
        name, _, secs = item.partition(":")
        if name not in values or not re.fullmatch(r"\d{1,7}", secs):
            raise ValueError(f"has {item!r}: use NAME:SECONDS with NAME one of"
                             f" {', '.join(PENALTY_DEFAULTS)} (or \"no\" to turn penalties off)")
        values[name] = int(secs)
    return values


def parse_escape_key(text: str) -> Optional[int]:
    """Escape key setting -> byte value, or None for ``"none"`` (escape disabled).

    Accepts caret notation (``"^^"`` = 0x1e, ``"^]"``, ``"^a"`` = ``"^A"``, ``"^?"`` = DEL)
    or a single ASCII character taken literally.
    """
    if text.lower() == "none":
        return None
    if len(text) == 2 and text[0] == "^":
        c = text[1].upper()
        if c == "?":
            return 0x7F
        if "@" <= c <= "_":
            return ord(c) - 0x40
    if len(text) == 1 and ord(text) < 0x80:
        return ord(text)
    raise ValueError('must be caret notation like "^^" or "^]", one ASCII character, or "none"')


TRACE = 5  # below DEBUG: packet-level detail, enabled by -vv
logging.addLevelName(TRACE, "TRACE")
_LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}


def parse_directives(text: str) -> Tuple[Optional[int], Dict[str, int]]:
    """``"info,moshpit=debug,moshpit.transport=trace"`` -> (layer level, {logger: level}).

    Like tracing's EnvFilter: a bare level sets the layer's level, ``target=level`` sets it for
    a logger and its children. Rust-style ``a::b`` targets are read as ``a.b``.
    """
    default, targets = None, {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, _, level = item.rpartition("=")
        if level.strip().lower() not in _LEVELS:
            raise ValueError(f"has an unknown level in {item!r} (use one of {', '.join(_LEVELS)})")
        if target.strip():
            targets[target.strip().replace("::", ".")] = _LEVELS[level.strip().lower()]
        else:
            default = _LEVELS[level.strip().lower()]
    return default, targets


def _between(lo: int, hi: int) -> Callable[[Any], Any]:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return check


def _at_least(lo: int) -> Callable[[Any], Any]:
    def check(value: int) -> int:
        if value < lo:
            raise ValueError(f"must be at least {lo}")
        return value
    return check


def _clamp(lo: int, hi: int) -> Callable[[Any], Any]:
    def check(value: int) -> int:
        return min(max(value, lo), hi)
    return check


def _one_of(*choices: str) -> Callable[[Any], Any]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value
    return check


def _parsed_by(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """A check that validates with ``parse`` but keeps the setting's text."""
    def check(value: str) -> str:
        parse(value)
        return value
    return check


class _Key(NamedTuple):
    type: Any  # bool, int, str, PATH (a str with ~ expanded; default is relative to ~/.mp),
    #            or PATH_OR_OFF (False, or a str with ~ expanded; default "~/..." as given)
    default: Any
    check: Optional[Callable[[Any], Any]] = None  # returns the value (maybe clamped) or raises


PATH = "path"
PATH_OR_OFF = "path or false"
_PORT = _between(1, 65535)
_TRACING_FLAGS = ("with_target", "with_thread_ids", "with_thread_names", "with_line_number",
                  "with_level")


def _common_keys() -> Dict[str, _Key]:
    keys = {"verbose": _Key(int, 0), "quiet": _Key(int, 0),
            "tracing.file.quiet": _Key(int, 0), "tracing.file.verbose": _Key(int, 0)}
    for layer in ("tracing.stdout", "tracing.file.layer"):
        for flag in _TRACING_FLAGS:
            keys[f"{layer}.{flag}"] = _Key(bool, flag == "with_level")
        keys[f"{layer}.directives"] = _Key(str, "", _parsed_by(parse_directives))
    return keys


SCHEMAS: Dict[str, Dict[str, _Key]] = {
    "server": {
        "mps.ip": _Key(str, "0.0.0.0"),
        "mps.port": _Key(int, DEFAULT_TCP_PORT, _PORT),
        "mps.udp_port_range": _Key(str, "{}-{}".format(*DEFAULT_UDP_PORT_RANGE),
                                   _parsed_by(parse_port_range)),
        "mps.private_key_path": _Key(PATH, HOST_KEY_FILE),
        "mps.public_key_path": _Key(PATH, HOST_KEY_FILE + ".pub"),
        # "" = ~/.mp/authorized_keys of the *target* user: resolved per login by the server.
        "mps.authorized_keys_file": _Key(str, ""),
        "mps.max_sessions": _Key(int, 256, _at_least(1)),
        "mps.max_sessions_per_user": _Key(int, 16, _at_least(1)),
        "mps.max_handshakes": _Key(int, 64, _at_least(1)),
        "mps.handshake_timeout_secs": _Key(int, 10, _at_least(1)),
        # Pre-authentication limits (README "Pre-authentication limits"): sshd-like defaults.
        "mps.hello_timeout_secs": _Key(int, 2, _at_least(1)),
        "mps.max_startups": _Key(str, "16:30:48", _parsed_by(parse_max_startups)),
        "mps.max_handshakes_per_source": _Key(int, 8, _at_least(1)),
        "mps.source_netblock": _Key(str, "32:64", _parsed_by(parse_netblock)),
        "mps.source_penalties": _Key(str, " ".join(f"{name}:{secs}" for name, secs
                                              in PENALTY_DEFAULTS.items()),
                                     _parsed_by(parse_penalties)),
        "mps.trusted_source_secs": _Key(int, 604800, _at_least(0)),
        "mps.max_startups_per_sec": _Key(int, 100, _at_least(0)),  # 0 = no limit
        # Keys in ssh-agent (README "Keys in ssh-agent"): once a key offer is accepted, the
        # time allowed for its signature (a person confirming ssh-add -c, a hardware key).
        "mps.confirm_timeout_secs": _Key(int, 60, _at_least(1)),
        "mps.detached_session_timeout_secs": _Key(int, 604800, _at_least(0)),  # 0 = never
        # A session whose client never reached it over UDP (mosh-server waits 60 s too).
        "mps.unattached_session_timeout_secs": _Key(int, 60, _at_least(0)),  # 0 = never
        # Stopping (README "Stopping mps"): the wait for each client's acknowledgement of
        # the shutdown notice; 0 = the notice goes out once and the shells are hung up.
        "mps.shutdown_flush_secs": _Key(int, DEFAULT_SHUTDOWN_FLUSH_SECS, _clamp(0, 60)),
        # "" = ~/.config/moshpits/mps.pid of the user running mps (default_pid_path).
        "mps.pid_file": _Key(str, ""),
        # Account policy (README "Accounts and login records"): sshd's UsePAM, DenyUsers,
        # AllowUsers, DenyGroups, AllowGroups; patterns are checked by moshpit_login.
        "mps.use_pam": _Key(bool, True),
        "mps.deny_users": _Key(str, ""),
        "mps.allow_users": _Key(str, ""),
        "mps.deny_groups": _Key(str, ""),
        "mps.allow_groups": _Key(str, ""),
        # Forwarding (README "Forwarding"): sshd's AllowTcpForwarding (yes, all, no, local,
        # remote), PermitOpen (any, none, or host:port entries) and AllowAgentForwarding.
        "mps.allow_tcp_forwarding": _Key(str, "yes", _one_of("yes", "all", "no", "local",
                                                             "remote")),
        "mps.permit_open": _Key(str, "any", _parsed_by(parse_permit_open)),
        "mps.allow_agent_forwarding": _Key(bool, True),
        # Session processes (README "Process model"): where the running sessions' sockets
        # live; "" = /run/moshpit for root, ~/.config/moshpits/run for a plain user.
        "mps.runtime_dir": _Key(str, ""),
        **_common_keys(),
    },
    "client": {
        "server_port": _Key(int, DEFAULT_TCP_PORT, _PORT),
        "server_destination": _Key(str, ""),
        "max_reconnect_backoff_secs": _Key(int, 3600, _clamp(2, 86400)),
        # Resume timing (README "Resume timing"): UDP silence before the client resumes.
        "resume_after_secs": _Key(int, DEFAULT_RESUME_AFTER_SECS,
                                  _clamp(MIN_RESUME_AFTER_SECS, 86400)),
        "private_key_path": _Key(PATH, CLIENT_KEY_FILE),
        "public_key_path": _Key(PATH, CLIENT_KEY_FILE + ".pub"),
        "known_hosts_file": _Key(PATH, KNOWN_HOSTS_FILE),
        "strict_host_key_checking": _Key(str, "ask", _one_of(*HOST_KEY_POLICIES)),
        "escape_key": _Key(str, "^^", _parsed_by(parse_escape_key)),
        # HostName and User of `mp alias` from this ssh_config file; false: aliases off.
        "ssh_config": _Key(PATH_OR_OFF, "~/.ssh/config"),
        # Automatic TCP fallback (moshpit_carrier): UDP, falling back to TCP where UDP is
        # blocked (auto), or only one of them.
        "transport": _Key(str, "auto", _one_of(*TRANSPORTS)),
        # Local echo prediction (README "Prediction"): mosh's modes; adaptive shows
        # predictions only on a slow link or when the echo is overdue.
        "predict": _Key(str, "adaptive", _one_of(*PREDICT_MODES)),
        # Forwarding (README "Forwarding"): relay the session's SSH_AUTH_SOCK to ours (-A).
        "forward_agent": _Key(bool, False),
        **_common_keys(),
    },
}


def env_names(kind: str) -> Dict[str, str]:
    """Environment variable name -> dotted key, e.g. MOSHPITS_MPS_UDP_PORT_RANGE ->
    mps.udp_port_range. Raises AssertionError if two keys would share a name."""
    names = {ENV_PREFIX[kind] + key.upper().replace(".", "_"): key for key in SCHEMAS[kind]}
    if len(names) != len(SCHEMAS[kind]):
        raise AssertionError(f"two {kind} config keys map to the same environment variable")
    return names


for _kind in SCHEMAS:  # fail at import, not at a user's first typo, if the schema collides
    env_names(_kind)

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}
_OFF_WORDS = {word for word, meaning in _BOOL_WORDS.items() if not meaning} | {"none"}


def _coerce(key_type: Any, raw: Any) -> Any:
    """``raw`` (from TOML, argv or the environment) as ``key_type``; ValueError if it is not."""
    if key_type is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[raw.strip().lower()]
        raise ValueError("must be true or false")
    if key_type is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", raw):
            return int(raw)
        raise ValueError("must be an integer")
    if key_type is PATH_OR_OFF:
        word = raw.strip().lower() if isinstance(raw, str) else raw
        if raw is False or word in _OFF_WORDS:
            return False
        if not isinstance(raw, str) or word in _BOOL_WORDS:  # "on" names no file
            raise ValueError("must be false or a path")
    if isinstance(raw, str):
        return raw
    raise ValueError("must be a string")


def _expand_path(value: Any, home: str) -> Any:
    if value is False:  # PATH_OR_OFF turned off
        return value
    if value == "~" or value.startswith("~/"):
        return home + value[1:]
    return os.path.expanduser(value)


class Config:
    """The effective settings of one program run: ``config["mps.port"]``, where each came from
    (``.source(key)``), and the warnings to show the user (unknown keys, clamped values)."""

    def __init__(self, kind: str, values: Dict[str, Any], sources: Dict[str, str],
                 warnings: List[str], path: Optional[str], home: str):
        self.kind = kind
        self.home = home  # whose ~ the defaults (and the default log path) refer to
        self._values = values
        self._sources = sources
        self.warnings = warnings
        self.path = path  # the config file that was read, or None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]  # KeyError for a key not in the schema: a programming error

    def get(self, key: str) -> Any:
        return self._values[key]

    def source(self, key: str) -> str:
        """"default", "file /p/x.toml", "command line" or "environment MOSHPIT_X"."""
        return self._sources[key]

    def items(self) -> List[Tuple[str, Any]]:
        return list(self._values.items())

    def describe(self) -> str:
        """One ``key = value  (source)`` line per setting, values in TOML syntax
        (what ``--print-config`` shows)."""
        return "\n".join(f"{key} = {_toml_value(value)}  ({self._sources[key]})"
                         for key, value in self._values.items())


def config_report(config: Config, files: Dict[str, str]) -> str:
    """What ``--print-config`` prints: the files in play (``{"log file": path}``; the config
    file comes first), every setting with its source, then the warnings, as comments."""
    lines = [f"# config file: {config.path or 'none'}"]
    lines += [f"# {label}: {path}" for label, path in files.items()]
    lines.append(config.describe())
    lines += [f"# warning: {warning}" for warning in config.warnings]
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flatten(table: Dict[str, Any], schema: Dict[str, _Key], prefix: str = "") -> Dict[str, Any]:
    """Nested TOML tables -> dotted keys; a known key keeps its value even if it is a table
    (the type check then rejects it by name)."""
    flat = {}
    for name, value in table.items():
        key = prefix + name
        if isinstance(value, dict) and key not in schema:
            flat.update(_flatten(value, schema, key + "."))
        else:
            flat[key] = value
    return flat


# The built-in TOML reader: Python 3.9/3.10 without tomli still read their config files. It
# reads the part of TOML moshpit's configs use and names the line of anything else, so a file
# is either read exactly as tomllib reads it or refused with a reason (tests/test_toml_subset.py
# compares the two on the README's examples and a generated corpus).

TOML_UNSUPPORTED = ("not supported by moshpit's built-in TOML reader "
                    "(install tomli, or use Python 3.11+)")
_TOML_WS = " \t"
_TOML_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_CONTROL = frozenset(chr(i) for i in range(32) if chr(i) != "\t") | {"\x7f"}
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_TOML_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}")
# tomllib's number grammar: a float part after a valid integer marks a float (not supported).
_TOML_NUMBER_RE = re.compile(r"""
    0(?:x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|b[01](?:_?[01])*|o[0-7](?:_?[0-7])*)
    |(?P<int>[+-]?(?:0|[1-9](?:_?[0-9])*))
     (?P<float>(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?)
""", re.VERBOSE)
_TOML_INT_BASES = {"0x": 16, "0o": 8, "0b": 2}


class TomlSubsetError(ValueError):
    """Invalid TOML, or TOML beyond the built-in reader (``unsupported``), at ``line``."""

    def __init__(self, line: int, message: str, unsupported: bool = False):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.unsupported = unsupported


class _TomlSubsetReader:
    """One pass over a document, with tomllib's rules for defining tables: a ``[header]``
    defines its table once; dotted keys define theirs for the rest of their section, after
    which neither a header nor another section's dotted keys may reopen them (sub-tables
    may still be added with headers)."""

    def __init__(self, text: str):
        self.text = text.replace("\r\n", "\n")
        self.pos = 0
        self.root: Dict[str, Any] = {}
        self.section: Tuple[str, ...] = ()
        self.closed: set = set()  # tables no header or dotted key may define again
        self.dotted: set = set()  # tables made by dotted keys in the current section

    def fail(self, message: str, unsupported: bool = False) -> None:
        raise TomlSubsetError(self.text.count("\n", 0, self.pos) + 1, message, unsupported)

    def unsupported(self, what: str) -> None:
        self.fail(f"{what} are {TOML_UNSUPPORTED}", True)

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def skip_ws(self) -> None:
        while self.peek() and self.peek() in _TOML_WS:
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            end = len(self.text) if end < 0 else end
            while self.pos < end:
                if self.text[self.pos] in _TOML_CONTROL:
                    self.fail("control character in a comment")
                self.pos += 1

    def parse(self) -> Dict[str, Any]:
        while True:
            self.skip_ws()
            char = self.peek()
            if not char:
                return self.root
            if char == "[":
                self.header()
            elif char not in "#\n":
                self.key_value()
            self.skip_ws()
            self.skip_comment()
            if self.peek() not in ("", "\n"):
                self.fail(f"expected the end of the line, found {self.peek()!r}")
            self.pos += 1

    def header(self) -> None:
        self.pos += 1
        if self.peek() == "[":
            self.unsupported("arrays of tables ([[...]])")
        path = self.key()
        if self.peek() != "]":
            self.fail("expected ']' at the end of the table header")
        self.pos += 1
        self.closed |= self.dotted
        self.dotted = set()
        if path in self.closed:
            self.fail(f"table [{'.'.join(path)}] is defined twice")
        self.table(path)
        self.closed.add(path)
        self.section = path

    def key_value(self) -> None:
        key = self.key()
        if self.peek() != "=":
            self.fail("expected '=' after the key")
        self.pos += 1
        self.skip_ws()
        value = self.value()
        for i in range(1, len(key)):
            table = self.section + key[:i]
            if table in self.closed:
                self.fail(f"table {'.'.join(table)} is defined elsewhere; "
                          "dotted keys cannot add to it")
            self.dotted.add(table)
        parent = self.table(self.section + key[:-1])
        if key[-1] in parent:
            self.fail(f"key {'.'.join(self.section + key)} is defined twice")
        parent[key[-1]] = value

    def table(self, path: Tuple[str, ...]) -> Dict[str, Any]:
        """The table at ``path``, made (with its parents) if new."""
        table = self.root
        for i, name in enumerate(path):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                self.fail(f"{'.'.join(path[:i + 1])} is already a value, not a table")
        return table

    def key(self) -> Tuple[str, ...]:
        """A bare, quoted or dotted key, and the blanks after it."""
        parts = []
        while True:
            self.skip_ws()
            char = self.peek()
            if char in ('"', "'"):
                parts.append(self.string())
            else:
                match = _TOML_BARE_KEY_RE.match(self.text, self.pos)
                if not match:
                    self.fail("expected a key")
                parts.append(match.group())
                self.pos = match.end()
            self.skip_ws()
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1

    def value(self) -> Any:
        char = self.peek()
        if char in ('"', "'"):
            return self.string()
        if char == "[":
            return self.array()
        if char == "{":
            self.unsupported("inline tables ({...})")
        for word, meaning in (("true", True), ("false", False)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return meaning
        return self.number()

    def number(self) -> int:
        if _TOML_DATE_RE.match(self.text, self.pos):
            self.unsupported("dates and times")
        match = _TOML_NUMBER_RE.match(self.text, self.pos)
        if match and match.group("float") or re.match(r"[+-]?(inf|nan)", self.peek(4)):
            self.unsupported("floats")
        if not match:
            self.fail("expected a value (a string, integer, true/false or array)")
        self.pos = match.end()
        digits = match.group().replace("_", "")
        return int(digits[2:], _TOML_INT_BASES[digits[:2]]) if match.group("int") is None \
            else int(digits)

    def string(self) -> str:
        quote = self.peek()
        if self.peek(3) == quote * 3:
            self.unsupported("multi-line strings")
        self.pos += 1
        chars = []
        while True:
            char = self.peek()
            if char == quote:
                self.pos += 1
                return "".join(chars)
            if not char or char == "\n":
                self.fail("unterminated string")
            if char in _TOML_CONTROL:
                self.fail("control character in a string (write it as an escape)")
            if char == "\\" and quote == '"':
                chars.append(self.escape())
            else:
                chars.append(char)
                self.pos += 1

    def escape(self) -> str:
        code = self.text[self.pos + 1:self.pos + 2]
        if code in _TOML_ESCAPES:
            self.pos += 2
            return _TOML_ESCAPES[code]
        width = {"u": 4, "U": 8}.get(code)
        digits = self.text[self.pos + 2:self.pos + 2 + (width or 0)]
        if not width or len(digits) != width or not re.fullmatch(r"[0-9A-Fa-f]+", digits):
            self.fail(f"invalid escape {self.text[self.pos:self.pos + 2]!r} in a string")
        point = int(digits, 16)
        if 0xD800 <= point <= 0xDFFF or point > 0x10FFFF:
            self.fail(f"escape \\{code}{digits} is not a Unicode scalar value")
        self.pos += 2 + width
        return chr(point)

    def array(self) -> List[Any]:
        self.pos += 1
        items: List[Any] = []
        while True:
            self.skip_array_blanks()
            if self.peek() == "]":
                self.pos += 1
                return items
            items.append(self.value())
            self.skip_array_blanks()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                self.fail("expected ',' or ']' in an array")

    def skip_array_blanks(self) -> None:
        """Blanks, newlines and comments: an array may span lines."""
        while True:
            self.skip_ws()
            self.skip_comment()
            if self.peek() != "\n":
                return
            self.pos += 1


def parse_toml_subset(text: str) -> Dict[str, Any]:
    """``text`` as tomllib.loads reads it, for tables, dotted and quoted keys, strings
    (basic with escapes, literal), integers, booleans, arrays and comments. Raises
    TomlSubsetError with the line number for invalid TOML or anything beyond that subset."""
    return _TomlSubsetReader(text).parse()


def _open_no_ctty(path: str, flags: int, mode: int = 0o666) -> int:
    """os.open that can never make a terminal found at ``path`` the caller's controlling
    terminal (O_NOCTTY; the server must never acquire one) nor leak into children."""
    return os.open(path, flags | os.O_NOCTTY | os.O_CLOEXEC, mode)


def _read_file(path: str, explicit: bool) -> Optional[Dict[str, Any]]:
    """The TOML table in ``path``; None if an absent default file. Unreadable or invalid files
    raise ConfigError. Without tomllib/tomli (Python 3.9/3.10) the built-in reader reads it."""
    where = f"config file {path}"
    if not explicit and not os.path.exists(path):
        return None
    try:
        with open(path, "rb", opener=_open_no_ctty) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where} not found (check the -c path)")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {where}: {getattr(e, 'strerror', None) or e}")
    toml = _toml_reader()
    if toml is None:
        try:
            return parse_toml_subset(text)
        except TomlSubsetError as e:
            raise ConfigError(f"{where}: {e}" if e.unsupported else f"{where}: invalid TOML: {e}")
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}")


def load_config(kind: str, cli: Optional[Dict[str, Any]] = None, path: Optional[str] = None,
                environ=None, home: Optional[str] = None) -> Config:
    """Effective configuration for ``kind`` ("server" or "client").

    ``cli`` holds only the flags the user gave, as dotted keys (None values are ignored, so
    argparse defaults of None never mask the file or environment). ``path`` is an explicit
    ``-c`` file (must exist); otherwise the default file is read if present. ``environ``
    defaults to os.environ; an empty variable counts as unset. ``home`` defaults to $HOME.
    Raises ConfigError naming the key and its source for any invalid value.
    """
    schema = SCHEMAS[kind]
    environ = os.environ if environ is None else environ
    home = _home(home, environ)
    warnings: List[str] = []
    values, sources = {}, {}
    for key, spec in schema.items():
        if spec.type is PATH:
            values[key] = os.path.join(mp_dir(home), spec.default)
        elif spec.type is PATH_OR_OFF:
            values[key] = _expand_path(spec.default, home)
        else:
            values[key] = spec.default
        sources[key] = "default"

    layers = []  # (source label, {key: raw value}), lowest precedence first
    file_path = os.path.abspath(path) if path else default_config_path(kind, home)
    table = _read_file(file_path, path is not None)
    if table is not None:
        flat = _flatten(table, schema)
        unknown = [k for k in flat if k not in schema]
        if unknown:
            warnings.append(f"config file {file_path}: ignoring unknown "
                            f"key{'s' if len(unknown) > 1 else ''} "
                            + ", ".join(_with_hint(k, schema) for k in unknown))
        layers.append((f"file {file_path}", {k: v for k, v in flat.items() if k in schema}))
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    bad = [k for k in cli if k not in schema]
    if bad:
        raise ValueError(f"not {kind} config keys: {', '.join(bad)}")  # a bug in the CLI
    layers.append(("command line", cli))
    for name, key in env_names(kind).items():
        if environ.get(name):
            layers.append((f"environment {name}", {key: environ[name]}))

    for label, raw_values in layers:
        where = "config " + label if label.startswith("file ") else label
        for key, raw in raw_values.items():
            spec = schema[key]
            try:
                value = _coerce(spec.type, raw)
                checked = spec.check(value) if spec.check else value
            except ValueError as e:
                shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
                raise ConfigError(f"{where}: {key} {e}, got {shown}")
            if checked != value:
                warnings.append(f"{where}: {key} = {value} is out of range, using {checked}")
            values[key] = _expand_path(checked, home) if spec.type in (PATH, PATH_OR_OFF) \
                else checked
            sources[key] = label
    _pair_public_key_path(kind, values, sources)
    return Config(kind, values, sources, warnings, file_path if table is not None else None,
                  home)


def _source_rank(source: str) -> int:
    """Precedence of a source label, lowest first (defaults, file, command line, env)."""
    for rank, start in enumerate(("default", "file ", "command line", "environment ")):
        if source.startswith(start):
            return rank
    raise ValueError(f"unknown config source {source!r}")  # a bug in load_config


def _pair_public_key_path(kind: str, values: Dict[str, Any], sources: Dict[str, str]) -> None:
    """The public key file follows the private one (``X`` -> ``X.pub``, as ssh-keygen pairs
    them) unless the public path was itself set at the same or a higher precedence: so
    ``-p ~/.mp/work`` never pairs the work key with the default (or the config file's)
    public key, while an explicit ``-k`` or public_key_path still wins."""
    private, public = _key_path_keys(kind)
    if _source_rank(sources[public]) < _source_rank(sources[private]):
        values[public] = values[private] + ".pub"
        sources[public] = f"{private} + .pub, {sources[private]}"


# The flags mps and mp share, as the seed names them. Their values are config settings, so
# they go through load_config like any other source (the environment still wins).
class _KeyFlags(NamedTuple):
    prefix: str  # of the config keys private_key_path / public_key_path
    role: str  # whose key, for the help text
    stem: str  # default file name in ~/.mp
    port_here: str  # where ssh users' "-p PORT" goes in this program
    port_fix: str  # the fix to suggest, formatted with the port


_KEY_FILE_FLAGS = {
    "server": _KeyFlags("mps.", "host", HOST_KEY_FILE,
                        "the listening port is mps.port", "MOSHPITS_MPS_PORT={port}"),
    "client": _KeyFlags("", "client", CLIENT_KEY_FILE, "ssh's -p PORT is -s PORT here",
                        "-s {port}"),
}
_PORT_LIKE = re.compile(r":?\d+")


def _key_path_keys(kind: str) -> Tuple[str, str]:
    """The config keys of ``kind``'s key pair: (private_key_path, public_key_path)."""
    prefix = _KEY_FILE_FLAGS[kind].prefix
    return prefix + "private_key_path", prefix + "public_key_path"


def add_common_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    """Add ``-v -q -c -t -p -k``. Every default is None so that only flags the user gave
    reach load_config: an argparse default would mask the config file and the environment."""
    flags = _KEY_FILE_FLAGS[kind]
    app = _APP_NAME[kind]
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="count",
                      help="turn up logging verbosity (repeatable)")
    loud.add_argument("-q", "--quiet", action="count",
                      help="turn down logging verbosity (repeatable)")
    parser.add_argument("-c", "--config-absolute-path", metavar="PATH", dest="config",
                        help=f"alternate config file (default ~/.config/{app}/{app}.toml)")
    parser.add_argument("-t", "--tracing-absolute-path", metavar="PATH", dest="tracing",
                        help=f"alternate log file (default ~/.config/{app}/logs/{app}.log)")
    parser.add_argument("-p", "--private-key-path", metavar="PATH",
                        help=f"{flags.role} private key (default ~/.mp/{flags.stem}); "
                        f"not a port: {flags.port_here}")
    parser.add_argument("-k", "--public-key-path", metavar="PATH",
                        help=f"{flags.role} public key (default: the private key's path "
                        f"+ .pub, so ~/.mp/{flags.stem}.pub)")


def _check_private_key_flag(value: str, kind: str) -> None:
    """ConfigError if a ``-p`` value is a port, as ssh's ``-p PORT`` would be: moshpit's
    -p names a key file, and a key file named "40500" is far likelier a mistake (one that
    used to end with a key written to ./40500) than a choice; ``-p ./40500`` still works."""
    if not _PORT_LIKE.fullmatch(value):
        return
    flags = _KEY_FILE_FLAGS[kind]
    fix = flags.port_fix.format(port=value.lstrip(":"))
    where = f"-p is the {flags.role} private key file in moshpit ({flags.port_here})"
    if os.path.lexists(value):
        raise ConfigError(f"{where}: '{value}' looks like a port; did you mean {fix}? "
                          f"(for the key file named {value}, write -p ./{value})")
    raise ConfigError(f"{where}: no key file '{value}'; did you mean {fix}?")


def common_flag_settings(args: argparse.Namespace, kind: str) -> Dict[str, Any]:
    """The config settings given with add_common_flags' flags (only those given). A ``-p``
    that looks like a port is a ConfigError (_check_private_key_flag)."""
    if args.private_key_path is not None:
        _check_private_key_flag(args.private_key_path, kind)
    private, public = _key_path_keys(kind)
    given = {"verbose": args.verbose, "quiet": args.quiet,
             private: args.private_key_path, public: args.public_key_path}
    return {key: value for key, value in given.items() if value is not None}


def _with_hint(key: str, schema: Dict[str, _Key]) -> str:
    import difflib  # only for an unknown key: not at every start

    close = difflib.get_close_matches(key, schema, n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


# ---------------------------------------------------------------------------
# Host aliases from ~/.ssh/config (client)
# ---------------------------------------------------------------------------
# `mp myalias` goes where `ssh myalias` goes: the HostName and User of the Host blocks that
# match, read the way OpenSSH reads them (first value wins, Include, negated patterns). Only
# those two directives apply: ssh's Port is sshd's port, not mps's. It is configuration read
# before anything connects, so it lives here beside the TOML reader; mp.py only calls
# resolve_ssh_alias. Parsing is pure (parse_ssh_config); the walk reads files through
# functions passed in, so tests can give it any file tree.

SSH_INCLUDE_MAX_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH
# A keyword ends at blanks or one '=' (`HostName x`, `HostName=x`, `HostName = x`).
_SSH_KEYWORD_RE = re.compile(r"[ \t]*([^ \t=]+)[ \t]*(?:=[ \t]*)?(.*)")


class SshConfigLine(NamedTuple):
    number: int
    keyword: str  # lower case: ssh's keywords are case-insensitive
    args: List[str]


def ssh_config_words(text: str) -> List[str]:
    """The arguments of a line as OpenSSH splits them: blanks separate, "..." and '...'
    quote, a backslash escapes a quote, a backslash or (outside quotes) a blank, and an
    unquoted '#' starting a word ends the line. ValueError for an unclosed quote."""
    words: List[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == "#":
            break
        word, quote = [], ""
        while i < n and (quote or text[i] not in " \t"):
            ch = text[i]
            if ch == "\\" and i + 1 < n and (text[i + 1] in "'\"\\" or
                                             (not quote and text[i + 1] in " \t")):
                word.append(text[i + 1])
                i += 2
                continue
            if not quote and ch in "'\"":
                quote = ch
            elif ch == quote:
                quote = ""
            else:
                word.append(ch)
            i += 1
        if quote:
            raise ValueError("unbalanced quotes")
        words.append("".join(word))
    return words


def parse_ssh_config(text: str) -> Tuple[List[SshConfigLine], List[str]]:
    """An ssh_config file's directives, and the lines it cannot use ("line N: why")."""
    lines, problems = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        match = _SSH_KEYWORD_RE.match(raw)
        if not match or match.group(1).startswith("#"):
            continue  # blank or comment
        keyword = match.group(1).lower()
        try:
            args = ssh_config_words(match.group(2))
        except ValueError as err:
            problems.append(f"line {number}: {err}")
            continue
        if not args:
            problems.append(f"line {number}: no argument after {match.group(1)}")
            continue
        lines.append(SshConfigLine(number, keyword, args))
    return lines, problems


def _ssh_pattern(pattern: str) -> re.Pattern:
    """ssh's host pattern: ``*`` any run of characters, ``?`` one character, nothing else."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern), re.DOTALL)


def ssh_host_matches(host: str, patterns: List[str]) -> bool:
    """A ``Host`` line's verdict: some pattern matches and no ``!pattern`` does."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _ssh_pattern(pattern[1:] if negated else pattern).fullmatch(host):
            if negated:
                return False
            matched = True
    return matched


class SshAlias(NamedTuple):
    """What ssh_config says about a host: its HostName (``%h`` expanded) and User, None where
    it says nothing; ``warnings`` for the user (unreadable files, lines ignored) and ``notes``
    for the log (where the values came from, Match blocks not applied)."""
    hostname: Optional[str]
    user: Optional[str]
    warnings: List[str]
    notes: List[str]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _glob_sorted(pattern: str) -> List[str]:
    return sorted(glob.glob(pattern))


class _SshConfigWalk:
    """One lookup: the files in the order ssh reads them, the first HostName and User seen in
    an active block. A block is active after a matching ``Host`` line (or before any Host
    line); ``Match`` blocks are never active (their conditions are not evaluated). An Include
    is read only from an active block, like ssh, and does not change the including file's
    state."""

    def __init__(self, host: str, home: str, read: Callable[[str], str],
                 expand: Callable[[str], List[str]]):
        self.host = host
        self.home = home
        self.read, self.expand = read, expand
        self.values: Dict[str, Tuple[str, str, int]] = {}  # keyword -> (value, file, line)
        self.warnings: List[str] = []
        self.notes: List[str] = []

    def file(self, path: str, depth: int) -> None:
        try:
            text = self.read(path)
        except FileNotFoundError:
            return  # like ssh: a missing file (or Include) is no error
        except (OSError, UnicodeDecodeError) as err:
            why = getattr(err, "strerror", None) or err
            self.warnings.append(f"cannot read ssh config {path}: {why}; its host aliases "
                                 "are not applied")
            return
        lines, problems = parse_ssh_config(text)
        self.warnings += [f"ssh config {path} {problem}; line ignored" for problem in problems]
        active = True
        for line in lines:
            if line.keyword == "host":
                active = ssh_host_matches(self.host, line.args)
            elif line.keyword == "match":
                active = False
                self.notes.append(f"ssh config {path} line {line.number}: Match blocks are "
                                  "not applied by moshpit")
            elif active and line.keyword == "include":
                self.include(line, path, depth)
            elif active and line.keyword in ("hostname", "user"):
                self.values.setdefault(line.keyword, (line.args[0], path, line.number))

    def include(self, line: SshConfigLine, path: str, depth: int) -> None:
        if depth >= SSH_INCLUDE_MAX_DEPTH:
            self.warnings.append(f"ssh config {path} line {line.number}: Include nested more "
                                 f"than {SSH_INCLUDE_MAX_DEPTH} deep; not followed")
            return
        for arg in line.args:
            if arg == "~" or arg.startswith("~/"):
                pattern = self.home + arg[1:]
            else:  # relative to ~/.ssh, as ssh reads a user's config
                pattern = os.path.join(self.home, ".ssh", arg)
            for name in self.expand(pattern):
                self.file(name, depth + 1)

    def alias(self) -> SshAlias:
        hostname = user = None
        if "hostname" in self.values:
            value, path, number = self.values["hostname"]
            hostname = _expand_ssh_tokens(value, self.host.lower(),
                                          f"ssh config {path} line {number}")
            self.notes.append(f"ssh config {path} line {number}: {self.host} is {hostname}")
        if "user" in self.values:
            user, path, number = self.values["user"]
            self.notes.append(f"ssh config {path} line {number}: user {user}")
        return SshAlias(hostname, user, self.warnings, self.notes)


def _expand_ssh_tokens(value: str, host: str, where: str) -> str:
    """HostName's tokens: ``%h`` the name given, ``%%`` a percent sign; anything else is an
    error, as in ssh."""
    def token(match: re.Match) -> str:
        if match.group(1) == "h":
            return host
        if match.group(1) == "%":
            return "%"
        raise ConfigError(f"{where}: HostName token %{match.group(1)} is not supported "
                          "(only %h and %%); fix the line or set ssh_config = false")
    return re.sub(r"%(.?)", token, value, flags=re.DOTALL)


def resolve_ssh_alias(host: str, path: str, home: str, read: Callable[[str], str] = _read_text,
                      expand: Callable[[str], List[str]] = _glob_sorted) -> SshAlias:
    """``host`` looked up in the ssh_config file ``path`` (a missing file says nothing). As in
    ssh, Host patterns match the name as typed (case counts) and ``%h`` is it in lower case.
    Relative Includes are under ``home``/.ssh."""
    walk = _SshConfigWalk(host, home, read, expand)
    walk.file(path, 0)
    return walk.alias()


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------
# Two layers like the seed's tracing setup: a file (always) and stderr (mps -e). Each layer
# has its own format ([tracing.stdout] / [tracing.file.layer]) and its own levels (verbosity
# plus `directives`), so the level decision lives in a per-handler filter; the "moshpit"
# logger's own level is only the lowest threshold, so disabled records are never built.

ROOT_LOGGER = "moshpit"


def verbosity_level(n: int) -> int:
    """Net verbosity -> logging level: 0 INFO, 1 DEBUG, >=2 TRACE, -1 WARNING, -2 ERROR,
    <=-3 CRITICAL."""
    if n >= 2:
        return TRACE
    return {1: logging.DEBUG, 0: logging.INFO, -1: logging.WARNING,
            -2: logging.ERROR}.get(n, logging.CRITICAL)


class _LayerFilter(logging.Filter):
    """Passes a record if it reaches the level of the most specific matching directive
    target, else the layer's level."""

    def __init__(self, level: int, targets: Dict[str, int]):
        super().__init__()
        self.level = level
        self.targets = sorted(targets.items(), key=lambda t: -len(t[0]))  # longest first

    def threshold(self, name: str) -> int:
        for target, level in self.targets:
            if name == target or name.startswith(target + "."):
                return level
        return self.level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.threshold(record.name)

    def lowest(self) -> int:
        return min([self.level] + [level for _, level in self.targets])


def _layer(handler: logging.Handler, config: Config, section: str,
           verbosity: int) -> logging.Handler:
    """Format ``handler`` per ``[section]``'s with_* flags; filter it per its directives."""
    def flag(name: str) -> bool:
        return config[f"{section}.{name}"]
    parts = ["%(asctime)s.%(msecs)03d"]
    if flag("with_level"):
        parts.append("%(levelname)-5s")
    if flag("with_thread_names"):
        parts.append("[%(threadName)s]")
    if flag("with_thread_ids"):
        parts.append("<%(thread)d>")
    if flag("with_target") or flag("with_line_number"):
        where = "%(name)s" if flag("with_target") else "%(filename)s"
        parts.append(where + (":%(lineno)d" if flag("with_line_number") else "") + ":")
    parts.append("%(message)s")
    handler.setFormatter(logging.Formatter(" ".join(parts), "%Y-%m-%dT%H:%M:%S"))
    default, targets = parse_directives(config[f"{section}.directives"])
    handler.addFilter(_LayerFilter(
        verbosity_level(verbosity) if default is None else default, targets))
    handler._moshpit_layer = True  # marks handlers that reset_logging() owns
    return handler


def make_private_dirs(directory: str) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (existing ones untouched)."""
    if os.path.isdir(directory):
        return
    make_private_dirs(os.path.dirname(directory))
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass  # created meanwhile by another process
    else:
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def reset_logging() -> None:
    """Remove and close the handlers setup_logging() installed (tests; re-configuration)."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, "_moshpit_layer", False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)


def relay_logging(handler: logging.Handler) -> None:
    """Replace the log file and stderr handlers by ``handler`` (a session process, which
    must hold no descriptor of root's log file nor the listener's stderr): it receives the
    records any of them would have written, and the file is closed here."""
    logger = logging.getLogger(ROOT_LOGGER)
    replaced = [h for h in logger.handlers if getattr(h, "_moshpit_layer", False)]
    filters = [f for h in replaced for f in h.filters]
    level = logger.level
    reset_logging()
    handler.addFilter(lambda record: any(f.filter(record) for f in filters))
    handler._moshpit_layer = True
    logger.addHandler(handler)
    logger.setLevel(level)


class _NoCttyFileHandler(logging.FileHandler):
    """A FileHandler that opens its file with O_NOCTTY: whatever lies at the log path, the
    server never acquires a controlling terminal by logging."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=_open_no_ctty)


def setup_logging(kind: str, config: Config, log_path: Optional[str] = None,
                  stderr: bool = False, verbosity: int = 0) -> logging.Logger:
    """Send the "moshpit" loggers to the log file (always; ``-t`` gives ``log_path``) and, if
    ``stderr``, to stderr. Returns the ``moshpit.<kind>`` logger.

    Levels: net verbosity = ``verbosity`` + verbose - quiet; the file layer adds
    tracing.file.verbose - tracing.file.quiet. A CLI may put its -v/-q counts in ``cli`` as
    "verbose"/"quiet" (they then replace the file's values; env still wins) or pass
    ``verbosity`` = count(-v) - count(-q) (added on top of them). Directories are created
    0700, the file 0600. Calling it again replaces the previous handlers. Raises ConfigError
    if the log file cannot be written.
    """
    reset_logging()
    path = log_path or default_log_path(kind, config.home)
    try:
        make_private_dirs(os.path.dirname(os.path.abspath(path)))
        os.close(_open_no_ctty(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # logs name users and addresses: keep them private
        file_handler = _NoCttyFileHandler(path, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise ConfigError(f"cannot write log file {path}: {e.strerror or e}; "
                          "choose another with -t PATH")
    base = verbosity + config["verbose"] - config["quiet"]
    handlers = [_layer(file_handler, config, "tracing.file.layer",
                       base + config["tracing.file.verbose"] - config["tracing.file.quiet"])]
    if stderr:
        handlers.append(_layer(logging.StreamHandler(sys.stderr), config, "tracing.stdout",
                               base))
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(min(f.lowest() for h in handlers for f in h.filters))
    return logging.getLogger(f"{ROOT_LOGGER}.{kind}")


# ---------------------------------------------------------------------------
# Terminal helpers
# ---------------------------------------------------------------------------


PRINTABLE_LIMIT = 200  # characters: foreign text quoted in one message line
ELLIPSIS = "..."
# Bidirectional embedding/override/isolate controls: they reorder how the rest of the line
# is displayed, so quoted text could make a message read differently than it is.
_BIDI_CONTROLS = frozenset(range(0x202A, 0x202F)) | frozenset(range(0x2066, 0x206A))


def _visible(ch: str) -> str:
    """One character as it may appear on a terminal: controls become visible escapes."""
    code = ord(ch)
    if code < 0x20:
        return "^" + chr(code + 0x40)  # ESC -> ^[, BEL -> ^G, newline -> ^J
    if code == 0x7F:
        return "^?"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if 0x80 <= code <= 0x9F or 0xD800 <= code <= 0xDFFF or code in _BIDI_CONTROLS:
        return f"\\u{code:04x}"  # C1 controls (U+009B is CSI), lone surrogates, bidi
    return ch


def printable(text: Union[str, bytes], limit: Optional[int] = PRINTABLE_LIMIT) -> str:
    """``text`` from a server or a file, made safe to print on a terminal.

    A server or a file must never drive the user's terminal: set its title, clear the
    screen, or fake a local prompt after the session. So C0 controls (newlines and tabs
    included: a message is one line), DEL, C1 controls and bidi overrides are shown as
    visible escapes (``^[``, ``^?``, ``\\u009b``); bytes are taken as UTF-8, an invalid byte
    shows as ``\\xff``. The result is at most ``limit`` characters (None: no cap), cut with
    an ellipsis, so a peer cannot flood the screen either.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    if (limit is None or len(text) <= limit) and text.isprintable():
        return text  # the common case; everything _visible changes is not isprintable()
    pieces: List[str] = []
    used = 0
    for ch in text:
        piece = _visible(ch)
        pieces.append(piece)
        used += len(piece)
        if limit is not None and used > limit:
            while pieces and used + len(ELLIPSIS) > limit:
                used -= len(pieces.pop())
            pieces.append(ELLIPSIS)
            break
    return "".join(pieces)


def printable_lines(text: str, limit: Optional[int] = None) -> str:
    """Several lines of text for a terminal: each line as ``printable`` makes it (capped at
    ``limit`` characters, None: no cap), the newlines kept."""
    return "\n".join(printable(line, limit) for line in text.split("\n"))


def get_winsize(fd: int) -> Tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; OSError if it is not a terminal."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal (e.g. a PTY master) on ``fd``; values are clamped to
    0..65535 so a peer's numbers can never raise here."""
    rows, cols = (min(max(int(v), 0), 0xFFFF) for v in (rows, cols))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
