"""mp: the moshpit client. ``python3 mp.py [user@]host`` feels like ssh and keeps going like mosh.

Layout, top to bottom (each part uses only the ones above it):

    command line + config   build_parser, cli_overrides, parse_destination
    terminal layer          TerminalGuard (raw mode, always restored), Waker + SignalRouter
                            (signals/threads -> select), EscapeFilter (Ctrl-^ .),
                            ScreenMirror (model of the server's output), StatusBanner
    connecting              Prompter (cooked-mode questions), load_identity (keygen offer,
                            passphrase), HostKeyCheck (known_hosts, pinned on resume),
                            Resumer (resume handshakes in a thread, back-off)
    session                 Session: one select loop over stdin, UDP, wake-up pipe, timers,
                            around moshpit_session.ClientSession (what the session is:
                            input, output, resize, exit, quit, resume bookkeeping)
    main                    exit codes and messages like ssh (255 for our own failures)

Who calls what, in a session's life (the server's side: mps.py; the whole sequence:
moshpit_session's docstring):

1. run_client (main thread, cooked mode): Target.connect runs the first handshake,
   HostKeyCheck.first asks about an unknown host key; the terminal goes raw.
2. Session.run (main thread, the only one touching the ClientSession): each turn of the
   loop reads stdin while ``may_read_input()``, feeds datagrams, turns core events into
   stdout bytes, and flushes ``datagrams_to_send``.
3. Silence past the resume_after_secs setting: Session._maybe_resume hops the UDP port
   and starts Resumer (one thread per attempt) with ``ClientSession.resume_request()``; it runs
   only the blocking handshake (HostKeyCheck.resume: the key must not change) and wakes the
   loop through the Waker.
4. Session._resume_results (main thread) applies the outcome: ``ClientSession.resumed``
   re-keys and resends; a refused key, a changed host key or a vanished session ends it.
5. Endings: an EXIT or SHUTDOWN record (core events), Ctrl-^ . (_quit: a SHUTDOWN record,
   then a quit request over TCP if UDP carries no ack), a signal (SignalRouter), or the
   terminal going away (_hangup); _finish drains the output, turns off what the session
   turned on (ScreenMirror) and restores the terminal.
"""

from __future__ import annotations

import argparse
import atexit
import codecs
import collections
import fcntl
import getpass
import ipaddress
import itertools
import locale
import logging
import os
import pwd
import queue
import re
import select
import shlex
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from typing import Optional

import moshpit
import moshpit_agent
import moshpit_carrier
import moshpit_channels
import moshpit_handshake
import moshpit_keys
import moshpit_session
import moshpit_term
import moshpit_trust

log = logging.getLogger("moshpit.client")

EXIT_FAILURE = 255  # like ssh: our own failures (auth, host key, unreachable) exit 255
BANNER_AFTER_SECS = 6.0  # silence before the "last contact" banner appears
UDP_SILENT_SECS = 3.0  # no UDP packet ever: this soon, say so (UDP blocked, like mosh)
NOTICE_SECS = 4.0  # a status line (such as "UDP blocked, using TCP") stays this long
QUIT_FLUSH_SECS = 1.0  # best-effort wait for the server to ack our goodbye over UDP
QUIT_REQUEST_SECS = 2.0  # then (no ack: UDP down) the quit request over TCP, at most this long
STDIN_CHUNK = 16384
ERR_FD = 2  # a command's stderr (no PTY) goes to ours
OUTPUT_HIGH_WATER = 1 << 20  # local terminal this far behind: stop reading the network
WRITE_BUFFERS = 64  # chunks of output handed to one writev
DIRECT_WRITE_MAX = 4096  # output this small, with the terminal writer idle: the loop writes it
IDLE_WAKE_SECS = 60.0  # the loop wakes at least this often, whatever its timers say
FINAL_ACKS_SECS = 0.5  # at the end: at most this long for the last acks to go out
FINAL_OUTPUT_SECS = 3.0  # ... and for the local terminal to take the rest of the output
ACK_SOON_SECS = 0.1  # a link timer further away than this: nothing is due at the end
# Written at start: input and cursor modes a previous client killed with SIGKILL (which no
# handler sees) may have left on. We cannot ask the terminal what is on, so each part must
# be harmless when already off and must not move the cursor or change the screen:
# ?1047l leaves the alternate screen if shown (?1049l would also restore a saved cursor:
# xterm does even when none was saved); mouse tracking and encodings, focus events,
# bracketed paste, synchronized output off; normal cursor keys (?1l) and keypad (ESC >);
# modifyOtherKeys off (CSI > 4 m; a terminal not knowing it may take it for SGR 4, so it
# comes before SGR 0); cursor visible; default colours. Not reset: a scroll region (CSI r
# moves the cursor home) and the kitty keyboard stack (not popped blindly).
STARTUP_RESET = (b"\x1b[?1047l\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1005l\x1b[?1006l"
                 b"\x1b[?1015l\x1b[?1004l\x1b[?2004l\x1b[?2026l\x1b[?1l\x1b>\x1b[>4m"
                 b"\x1b[?25h\x1b[0m")


# ---------------------------------------------------------------------------
# Command line and configuration
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The seed's ``mp`` flags. Every default is None so only flags the user gave reach
    load_config (a default here would mask the config file and the environment)."""
    p = argparse.ArgumentParser(
        prog="mp",
        description="moshpit client: encrypted remote terminal that survives roaming and outages.",
        epilog="Escape key (default Ctrl-^): Ctrl-^ . quits; Ctrl-^ Ctrl-^ (or Ctrl-^ ^) sends "
        "one Ctrl-^. Exit status: the remote shell's, or 255 if moshpit itself failed or you "
        "quit with the escape key (like ssh's ~.).",
    )
    moshpit.add_common_flags(p, "client")
    p.add_argument("-i", metavar="FILE", dest="identity_file",
                   help="private key file, as ssh -i (same as -p); a .pub file names a key"
                   " held by ssh-agent")
    p.add_argument("-l", "--login-name", metavar="USER", action=FirstLoginName,
                   help="remote user, as ssh -l (as in ssh, the first of -l USER and "
                   "USER@ on the command line wins)")
    p.set_defaults(login_first=False)
    p.add_argument("-s", "--server-port", metavar="PORT", type=int,
                   help=f"server TCP port (default: {moshpit.DEFAULT_TCP_PORT})")
    p.add_argument("--strict-host-key-checking", choices=moshpit.HOST_KEY_POLICIES,
                   help="unknown host keys: ask (default), accept-new (trust on first use), "
                   "yes (refuse unless already in known_hosts)")
    p.add_argument("--transport", choices=moshpit.TRANSPORTS,
                   help="how the session's packets travel: auto (default: UDP, or TCP where"
                   " UDP is blocked), udp (never TCP) or tcp (always TCP)")
    p.add_argument("--predict", choices=moshpit.PREDICT_MODES,
                   help="local echo: adaptive (default: shown on a slow link), always, never, "
                   "or experimental (also in full-screen programs), as mosh's --predict")
    p.add_argument("--print-config", action="store_true",
                   help="print every effective setting and where it came from, then exit")
    p.add_argument("--copy-id", action="store_true",
                   help="instead of connecting, authorize your public key (-k) for "
                   "SERVER_DESTINATION through the system ssh, like ssh-copy-id: appends it "
                   "once to ~/.mp/authorized_keys there (made 0600, ~/.mp 0700)")
    p.add_argument("--ssh-command", "--ssh-cmd", metavar="COMMAND", default="ssh",
                   help="the ssh that --copy-id and --ssh run, with its options "
                   "(default: ssh; e.g. \"ssh -p 2222 -J jump\")")
    p.add_argument("--ssh", action="store_true",
                   help="nothing installed on the server: start a server for this one "
                   "session through the system ssh (needs python3 >= 3.9 with cryptography "
                   "there; no moshpit key or known_hosts entry needed)")
    p.add_argument("--ssh-cache", action="store_true",
                   help="with --ssh: keep moshpit's modules on the server in ~/.cache/moshpit"
                   " (checked by SHA-256), so later runs need not send them (without it, "
                   "--ssh writes nothing on the server)")
    sessions = p.add_mutually_exclusive_group()
    sessions.add_argument("--list", action="store_true", dest="list_sessions",
                          help="list your sessions on the server (id, attached or detached,"
                          " started, last activity, size, title or command), then exit")
    sessions.add_argument("--attach", metavar="ID", nargs="?", const="",
                          help="take over one of your sessions (default: the most recently"
                          " active detached one, else the most recently active one); a"
                          " client holding it is told and exits")
    sessions.add_argument("--kill", metavar="ID", help="end one of your sessions, then exit")
    p.add_argument("-V", "--version", action="version", version=f"mp {moshpit.__version__}")
    # ssh's -t: here --tty, because -t is the seed's --tracing-absolute-path.
    p.add_argument("--tty", dest="pty", action="store_const", const=True,
                   help="run the command on a PTY even if stdin is not a terminal, as ssh -t")
    p.add_argument("-T", "--no-tty", dest="pty", action="store_const", const=False,
                   help="no PTY: the command's bytes pass untouched (the default when stdin "
                   "is not a terminal), as ssh -T")
    # --- forwarding (README "Forwarding"): ssh's spellings ---
    p.add_argument("-L", dest="forwards", action="append", type=lambda v: ("-L", v),
                   metavar="[BIND:]PORT:HOST:HOSTPORT",
                   help="forward local PORT to HOST:HOSTPORT as seen from the server")
    p.add_argument("-R", dest="forwards", action="append", type=lambda v: ("-R", v),
                   metavar="[BIND:]PORT:HOST:HOSTPORT",
                   help="forward the server's PORT (on its loopback; 0: any free port) to "
                   "HOST:HOSTPORT as seen from here")
    p.add_argument("-D", dest="forwards", action="append", type=lambda v: ("-D", v),
                   metavar="[BIND:]PORT", help="SOCKS4a/SOCKS5 proxy on local PORT whose "
                   "connections the server makes")
    p.add_argument("-A", dest="forward_agent", action="store_const", const=True,
                   help="forward the ssh-agent at SSH_AUTH_SOCK to the session")
    p.add_argument("-N", dest="no_command", action="store_true",
                   help="forwarding only: no shell, command or PTY on the server, stdin "
                   "not read; Ctrl-C ends it")
    p.add_argument("server_destination", nargs="?", metavar="SERVER_DESTINATION",
                   help="host, user@host, IPv6 as ::1 or user@[::1]")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="run COMMAND (joined with spaces, as ssh does, and run by the remote "
                   "user's shell with -c) instead of a login shell; its exit status is mp's")
    return p


def split_command(argv: list) -> tuple:
    """``argv`` before the first ``--`` (for argparse) and the command after it (None when
    there is no ``--``): argparse's own handling of ``--`` with REMAINDER differs between
    Python versions, and ``mp host -- ls -l`` must mean the same everywhere."""
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def parse_command_line(argv: list) -> tuple:
    """``(args, command)``: the flags, and the remote command as one string, ssh's way
    (words joined by spaces, the remote shell splits them again), or None for a login
    shell. ``mp -- host ls`` works too, as in ssh."""
    before, after = split_command(argv)
    args = build_parser().parse_args(before)
    if args.server_destination is None and after:
        args.server_destination, after = after[0], after[1:]
    words = list(args.command or []) + list(after or [])
    return args, " ".join(words) if words else None


class FirstLoginName(argparse.Action):
    """``-l USER`` as ssh reads it: a repeated -l keeps the first, and ``login_first``
    records whether it came before the destination (then it beats the destination's
    USER@; after it, USER@ wins: ssh takes the first user it sees)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is None:
            setattr(namespace, self.dest, values)
            namespace.login_first = namespace.server_destination is None


# The client's own flags that are config settings (argparse dest == config key).
CONFIG_FLAGS = ("server_port", "strict_host_key_checking", "server_destination",
                "forward_agent", "transport", "predict")


def cli_overrides(args: argparse.Namespace) -> dict:
    """Only the settings given on the command line, as config keys (``-i`` is ssh's
    spelling of ``-p``)."""
    settings = moshpit.common_flag_settings(args, "client")
    if args.identity_file is not None:
        if settings.get("private_key_path", args.identity_file) != args.identity_file:
            raise moshpit.MoshpitError("-i and -p both name the private key file: give one")
        settings["private_key_path"] = args.identity_file
    settings.update((key, getattr(args, key)) for key in CONFIG_FLAGS
                    if getattr(args, key) is not None)
    return settings


def parse_destination(dest: str, default_user: str, alias=None) -> tuple:
    """``[user@]host`` -> (user, host). Host may be a name, IPv4, bare IPv6 (``::1``) or
    bracketed IPv6 (``[::1]``, ``[fe80::1%eth0]``); brackets are dropped. The port comes from
    -s / server_port, never from the destination (same as the seed).

    ``alias`` (host -> moshpit.SshAlias, the ~/.ssh/config lookup) renames the host to its
    HostName and gives the user where the destination names none: ``user@`` wins, as in ssh.
    The host is checked after that, so the name that reaches DNS and known_hosts is the
    HostName (ssh records it too)."""
    user, at, host = dest.rpartition("@")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host or at and not valid_user(user):
        _bad_destination(dest)
    if alias is not None and not bracketed:
        found = alias(host)
        host = found.hostname or host
        if not at and found.user:
            if not valid_user(found.user):
                raise moshpit.MoshpitError(
                    f"bad user name {found.user!r} for {host} in the ssh config (User)")
            user = found.user
    return user or default_user, checked_host(host, bracketed)


def _bad_destination(dest: str) -> None:
    raise moshpit.MoshpitError(
        f"bad destination {dest!r}: expected host, user@host, or user@[IPv6 address]")


def ssh_alias_lookup(config, prompter):
    """The ~/.ssh/config lookup for parse_destination (None if ``ssh_config = false``): its
    warnings go to the terminal, where each value came from to the log."""
    path = config["ssh_config"]
    if path is False:
        return None

    def lookup(host: str):
        found = moshpit.resolve_ssh_alias(host, path, config.home)
        for warning in found.warnings:
            prompter.say(f"mp: warning: {warning}")
        for note in found.notes:
            log.info("%s", note)
        return found
    return lookup


MAX_HOST_NAME = 253  # DNS: characters in a name, without the trailing dot
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")  # an interface name or number


def checked_host(host: str, bracketed: bool = False) -> str:
    """``host`` if it is a DNS name or an IPv4/IPv6 literal (with an optional ``%scope``),
    else a MoshpitError naming what is wrong. Checked before any network or known_hosts use:
    the host goes verbatim into known_hosts, where ``,`` separates names, whitespace ends
    the field and ``*?!`` are patterns, and into messages on the terminal. An international
    name is taken in its ASCII (IDNA) form, the one DNS and known_hosts see."""
    if bracketed and ":" not in host:
        _bad_host(f"[{host}]", "brackets are only for IPv6 addresses, like [::1]")
    if ":" in host:
        return _checked_ipv6(host)
    bad = next((c for c in host if not (c.isalnum() or c in "-_.")), None)
    if bad is not None:
        _bad_host(host, f"{_describe_char(bad)} cannot appear in a host name; use letters, "
                        "digits, '-', '_' and '.', or an IP address (192.0.2.1, ::1, "
                        "[fe80::1%eth0])")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            _bad_host(host, "not a valid international domain name")
    name = host[:-1] if host.endswith(".") else host  # a fully qualified "host." is fine
    if len(name) > MAX_HOST_NAME:
        _bad_host(host, f"longer than {MAX_HOST_NAME} characters")
    for label in name.split("."):
        if not _HOST_LABEL_RE.match(label):
            _bad_host(host, "each dot-separated part must be 1 to 63 characters and must not "
                            "begin or end with '-'")
    return host


def _checked_ipv6(host: str) -> str:
    address, percent, scope = host.partition("%")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        if host.count(":") == 1 and host.rpartition(":")[2].isdigit():
            _bad_host(host, "the port goes in -s PORT, not after the host")
        _bad_host(host, "not a valid IPv6 address")
    if percent and not _SCOPE_RE.match(scope):
        _bad_host(host, "the scope after '%' must be an interface name or number")
    return host


def _describe_char(ch: str) -> str:
    if ch.isspace():
        return "whitespace"
    if not ch.isprintable():
        return "a control character"
    return f"'{ch}'"


def _bad_host(host: str, why: str) -> None:
    raise moshpit.MoshpitError(
        f"invalid host name '{moshpit.printable(host, 80)}': {why}")


def valid_user(user: str) -> bool:
    """A remote user name we can send: non-empty, no ':' '/' or spaces."""
    return bool(user) and not any(c in user for c in ":/ ")


def remote_user_and_host(destination: str, login=None, login_first: bool = False,
                         alias=None) -> tuple:
    """(user, host) to connect as, from the destination, ``-l`` and ``alias`` (see
    parse_destination): like ssh, the first of ``-l USER`` and ``USER@`` on the command line
    wins, then the ssh config's User; without any, the local user."""
    if login is not None and not valid_user(login):
        raise moshpit.MoshpitError(f"bad login name {login!r} (-l)")
    user, host = parse_destination(destination, local_user(), alias)
    if login and (login_first or "@" not in destination):
        user = login
    return user, host


def local_user() -> str:
    """The local login name, which is the default remote user (like ssh)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


# ---------------------------------------------------------------------------
# Terminal layer
# ---------------------------------------------------------------------------


class Terminated(Exception):
    """SIGTERM/SIGHUP/SIGINT arrived while no select loop was there to notice (prompts, handshake):
    raised from the signal handler so every ``finally`` runs and the terminal is restored."""

    def __init__(self, signum: int):
        super().__init__(f"killed by signal {signum}")
        self.signum = signum


class Waker:
    """A self-pipe that wakes the select loop: from signal handlers (SIGWINCH, SIGTERM,
    SIGHUP, SIGINT) and from the reconnect thread. Handlers only set flags and write one byte;
    the loop does the work, so nothing runs in the middle of a Connection update."""

    def __init__(self):
        self.rfd, self.wfd = os.pipe()
        for fd in (self.rfd, self.wfd):
            os.set_blocking(fd, False)
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)

    def fileno(self) -> int:
        return self.rfd

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"!")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake-up is already pending) or closed at exit

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class SignalRouter:
    """Turns SIGWINCH/SIGTERM/SIGHUP/SIGINT into flags + a wake-up while the session loop runs, and
    into a ``Terminated`` exception otherwise (a blocking prompt or handshake can only be
    interrupted by raising). Either way the terminal guard's ``finally`` restores the tty."""

    HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGWINCH)
    QUIET = (signal.SIGHUP, signal.SIGINT)  # terminal gone / user pressed Ctrl-C: no message

    def __init__(self, waker: Waker):
        self.waker = waker
        self.in_loop = False
        self.winch = False
        self.terminate_signum = None
        self._previous = {}

    def install(self) -> None:
        for signum in self.HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGWINCH:
            self.winch = True
            self.waker.wake()
            return
        self.terminate_signum = signum
        if not self.in_loop:
            raise Terminated(signum)
        self.waker.wake()


class TerminalGuard:
    """Raw mode only while connected, and the terminal always put back exactly as it was.

    Saves the termios attributes of stdin and the file status flags of stdin/stdout before
    touching anything; ``restore()`` is idempotent and is called from ``finally`` (normal exit,
    errors, exceptions, SIGTERM/SIGHUP via SignalRouter) and from atexit as a last resort.
    Raw mode is entered with TCSANOW, not TCSAFLUSH, so keys typed during the handshake
    are kept and sent. stdin/stdout go non-blocking so one slow side never stalls the loop.
    """

    def __init__(self, in_fd: int = 0, out_fd: int = 1, raw: bool = True, err_fd: int = 2):
        self.in_fd, self.out_fd, self.err_fd = in_fd, out_fd, err_fd
        self.is_tty = os.isatty(in_fd)
        self.raw = raw  # False without a remote PTY: the local terminal stays cooked (ssh -T)
        self.saved_attrs = None
        self.saved_flags = {}
        self.active = False

    def enter(self) -> None:
        if self.active:
            return
        if self.is_tty:
            self.saved_attrs = termios.tcgetattr(self.in_fd)
        for fd in {self.in_fd, self.out_fd, self.err_fd}:
            self.saved_flags[fd] = fcntl.fcntl(fd, fcntl.F_GETFL)
            if os.isatty(fd):
                # A terminal is never meant to be non-blocking: only a client killed by
                # SIGKILL (no restore) leaves it so, and the shell's next program reading
                # it would fail with EAGAIN. Hand it back blocking.
                self.saved_flags[fd] &= ~os.O_NONBLOCK
        self._go_raw()

    def reenter(self) -> None:
        """Raw mode again after ``restore()`` (mp continued after a suspend), keeping what
        ``enter()`` saved: the terminal goes back to that at the end, never to a state a
        job-control shell may have left while mp was stopped."""
        if not self.active and self.saved_flags:
            self._go_raw()

    def _go_raw(self) -> None:
        self.active = True
        atexit.register(self.restore)
        if self.is_tty and self.raw:
            tty.setraw(self.in_fd, termios.TCSANOW)
        for fd in self.saved_flags:
            os.set_blocking(fd, False)

    def restore(self) -> None:
        if not self.active:
            return
        self.active = False
        atexit.unregister(self.restore)
        for fd, flags in self.saved_flags.items():
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            except OSError:
                pass  # fd already gone (terminal hung up): nothing left to restore
        if self.saved_attrs is not None:
            try:
                # TCSANOW: TCSADRAIN could hang forever on a terminal that stopped reading.
                termios.tcsetattr(self.in_fd, termios.TCSANOW, self.saved_attrs)
            except (termios.error, OSError):
                pass

    def __enter__(self):
        self.enter()
        return self

    def __exit__(self, *exc):
        self.restore()


class EscapeFilter:
    """Splits keyboard input into bytes for the server and the local quit command.

    ``ESC .`` quits; ``ESC Ctrl-Z`` asks to suspend mp (``suspend_requested``, which the
    session clears once it has; as mosh, and ssh's ``~^Z``); ``ESC ESC`` or ``ESC <its caret
    letter>`` (Ctrl-^ ^, mosh's spelling) sends one ESC; ``ESC`` followed by anything else
    sends both bytes, so nothing typed is swallowed. (ESC here is the configured escape
    key, Ctrl-^ by default.)

    Decision: like mosh and unlike ssh's ``~.``, the escape key is recognised anywhere, not
    only after a newline. Ctrl-^ is almost never typed on purpose, and a "start of line" rule
    cannot be judged from the client inside full-screen programs (vim, less) where quitting a
    dead session matters most. A lone escape key at the end of a read waits for the next byte.
    """

    QUIT = ord(".")
    SUSPEND = 0x1A  # Ctrl-Z

    def __init__(self, escape):
        self.escape = escape
        self.literal = None if escape is None else {escape, (escape ^ 0x40) & 0x7F}
        self.pending = False
        self.suspend_requested = False

    def key_name(self):
        """How the user types the escape key ("Ctrl-^", "~"), or None when it is disabled."""
        if self.escape is None:
            return None
        if self.escape < 0x20 or self.escape == 0x7F:
            return f"Ctrl-{chr(self.escape ^ 0x40)}"
        return chr(self.escape)

    def feed(self, data: bytes) -> tuple:
        """-> (bytes for the server, quit requested). Bytes after a quit are dropped."""
        if self.escape is None or (not self.pending and self.escape not in data):
            return data, False
        out = bytearray()
        for byte in data:
            if self.pending:
                self.pending = False
                if byte == self.QUIT:
                    return bytes(out), True
                if byte == self.SUSPEND:
                    self.suspend_requested = True
                elif byte in self.literal:
                    out.append(self.escape)
                else:
                    out += bytes((self.escape, byte))
            elif byte == self.escape:
                self.pending = True
            else:
                out.append(byte)
        return bytes(out), False


class OutputQueue:
    """Bytes waiting for the terminal, oldest first: the chunks as they were queued and how
    much of the first one is written. Taking what the terminal accepted moves nothing, and
    one writev hands it several chunks: a bytearray would copy its whole backlog (up to
    OUTPUT_HIGH_WATER during a flood) on nearly every append after a deletion at its
    front, a few ms per MB. Used as the bytearray was: ``+=``, ``len``, truth, ``clear``;
    ``size`` is ``len`` as an attribute, for the loop's every pass. The session loop writes
    it (``write_to``) when select says the terminal takes more: ``polled``."""

    polled = True
    failed = False  # (TerminalWriter: the terminal is gone)

    def __init__(self) -> None:
        self._chunks: collections.deque = collections.deque()
        self.size = 0
        self._written = 0  # of the first chunk

    def __iadd__(self, data) -> OutputQueue:
        if data:
            self._chunks.append(bytes(data))  # (no copy of bytes; a bytearray may change)
            self.size += len(data)
        return self

    def extend(self, chunks: list) -> None:
        """``+=`` each of ``chunks`` (bytes), without joining them first."""
        self._chunks.extend(chunks)
        self.size += sum(map(len, chunks))

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        self._chunks.clear()
        self.size = self._written = 0

    def write_to(self, fd: int) -> None:
        """Write what ``fd`` takes now (OSError as os.writev raises it, BlockingIOError
        when it takes nothing)."""
        chunks = self._chunks
        buffers = [memoryview(chunks[0])[self._written:]]
        buffers += itertools.islice(chunks, 1, WRITE_BUFFERS)
        written = os.writev(fd, buffers)
        self.size -= written
        written += self._written
        while chunks and written >= len(chunks[0]):
            written -= len(chunks.popleft())
        self._written = written


class TerminalWriter(OutputQueue):
    """An OutputQueue written to the terminal by a thread of its own, in blocking writes,
    so that the session loop only queues. During a flood the terminal takes a few KiB at
    a time; waking the loop for each (select, a pass, a writev) cost about a tenth of the
    client's CPU per MB, where a blocking writev waits for the terminal in the kernel.

    The thread writes to a second open of the terminal, blocking: the descriptors the
    session reads and writes share one non-blocking flag (stdin's too). The loop queues
    with ``+=`` and ``extend``, reads ``size`` (what is queued or being written), waits
    with ``drain``, and learns from ``failed`` (after a wake-up) that the terminal is gone.
    ``clear`` drops what waits; a write in progress still ends. While nothing is queued
    or being written, ``+=`` and ``extend`` write a little output (DIRECT_WRITE_MAX) at
    once themselves, through a third, non-blocking open: a keystroke's echo then waits
    for no thread switch. A flood's output is left to the thread: written from the loop
    whenever the queue ran dry, it cost bulk_20mb 6% more client CPU."""

    polled = False

    def __init__(self, fd: int, waker: Waker, direct_fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.direct_fd = direct_fd
        self._waker = waker
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="terminal", daemon=True).start()

    @classmethod
    def open(cls, out_fd: int, waker: Waker) -> Optional[TerminalWriter]:
        """A writer for terminal ``out_fd``, or None if it cannot be opened again (a
        terminal owned by another user, a system without /dev/pts names)."""
        flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC
        try:
            name = os.ttyname(out_fd)
            fd = os.open(name, flags)
        except OSError:
            return None
        try:
            direct_fd = os.open(name, flags | os.O_NONBLOCK)
        except OSError:
            os.close(fd)
            return None
        return cls(fd, waker, direct_fd)

    def __iadd__(self, data) -> TerminalWriter:
        if data:  # (nothing to wake the thread for: the loop adds b"" on most passes)
            self.extend([bytes(data)])
        return self

    def extend(self, chunks: list) -> None:
        if chunks:
            with self._cond:
                if not self.size and sum(map(len, chunks)) <= DIRECT_WRITE_MAX:
                    chunks = self._write_now(chunks)
                super().extend(chunks)
                self._cond.notify()

    def _write_now(self, chunks: list) -> list:
        """With nothing queued or being written, write what the terminal takes at once
        from the loop: a keystroke's echo then waits for no thread switch. Returns what
        is left for the thread."""
        try:
            written = os.writev(self.direct_fd, chunks[:WRITE_BUFFERS])
        except OSError:
            return chunks  # full (or gone: the thread finds out and says so)
        return _unwritten(chunks, written)

    def clear(self) -> None:
        with self._cond:
            self.size -= sum(map(len, self._chunks))  # (a batch being written counts on)
            self._chunks.clear()

    def write_to(self, fd: int) -> None:
        raise TypeError("the writer's thread writes a TerminalWriter")

    def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the terminal to take everything queued."""
        with self._cond:
            self._cond.wait_for(lambda: not self.size or self.failed, seconds)

    def _run(self) -> None:
        chunks, cond = self._chunks, self._cond
        while True:
            with cond:
                cond.wait_for(lambda: chunks)
                batch = [memoryview(chunks.popleft())
                         for _ in range(min(len(chunks), WRITE_BUFFERS))]
            try:
                self._write_all(batch)
            except OSError:  # EIO/EPIPE: nobody is reading our output any more
                with cond:
                    self.failed = True
                    chunks.clear()
                    self.size = 0
                    cond.notify_all()
                self._waker.wake()
                return

    def _write_all(self, batch: list) -> None:
        while batch:
            written = os.writev(self.fd, batch)  # all of it, unless a signal came
            with self._cond:
                was = self.size
                self.size -= written
                self._cond.notify_all()
            if was >= OUTPUT_HIGH_WATER > was - written:
                self._waker.wake()  # the loop stopped reading the network while this far behind
            batch = _unwritten(batch, written)


def _unwritten(buffers: list, written: int) -> list:
    """What is left of ``buffers`` after a writev that took ``written`` bytes of them."""
    for index, buffer in enumerate(buffers):
        if written < len(buffer):
            return [buffer[written:], *buffers[index + 1:]]
        written -= len(buffer)
    return []


def output_queue(out_fd: int, is_terminal: bool, waker: Waker) -> OutputQueue:
    """The queue for the session's output to ``out_fd``: a terminal is written by a
    TerminalWriter; a pipe or file (a command's output, which a second open could not
    append to), or a terminal that cannot be opened again, by the loop when select says
    it takes more. (Not ``writer or OutputQueue()``: an empty queue is false.)"""
    writer = TerminalWriter.open(out_fd, waker) if is_terminal else None
    return writer if writer is not None else OutputQueue()


class ScreenMirror:
    """The client's model of what the server drew on the local terminal (moshpit_term),
    fed with exactly the server's bytes written to stdout (never our banner or messages:
    those are drawn at safe points and taken away again).

    It answers what the end of the session and the banner need: whether the stream sits
    between sequences and characters (the only moments bytes of ours may go in: bytes
    injected inside ``ESC [ 3`` or a half-written UTF-8 character corrupt the screen for
    good), whether the cursor is at column 0 (the fresh-line rule), what turns off every
    mode the session turned on, and what the top row showed under the banner.

    Where the model's rows are the terminal's rows: the client does not clear the screen
    at start (like ssh), so the server's first line lands wherever the local cursor was,
    not on the model's row 1. The two line up once the main screen has scrolled (both
    cursors then sit on the bottom row; IL/DL also count, a rare miss) or while the
    alternate screen (cleared on entry) is shown. Until then the banner row is only
    erased, as the model would repaint the wrong line there.

    Bytes may be fed late (``defer``, a moshpit_term.LateFeed): a flood costs the model
    much less in a few large chunks than in one small chunk per loop pass. Every question
    below first feeds what waits, so the answers are exact; whoever reads ``term`` directly
    (prediction) calls ``catch_up`` first.
    """

    def __init__(self, rows: int, cols: int):
        self.unfed = moshpit_term.LateFeed(moshpit_term.Terminal(rows, cols, history_limit=0))
        self.term = self.unfed.term

    def feed(self, data: bytes) -> None:
        self.catch_up()
        self.term.feed(data)

    def defer(self, chunks: list) -> None:
        """Feed ``chunks`` (bytes) later: at the next question, or once enough wait."""
        self.unfed.add(chunks)

    def behind(self) -> bool:
        """Deferred bytes wait to be fed."""
        return self.unfed.waiting > 0

    def catch_up(self) -> None:
        self.unfed.catch_up()

    @property
    def main_aligned(self) -> bool:
        """The main screen has scrolled: the model's rows are the terminal's there."""
        self.catch_up()
        return self.term.main_scroll_count > 0

    def resize(self, rows: int, cols: int) -> None:
        self.catch_up()  # written for the old size
        self.term.resize(rows, cols)

    def at_safe_point(self) -> bool:
        self.catch_up()
        return self.term.in_ground_state

    def at_line_start(self) -> bool:
        """The cursor is at column 0 of a row the server left blank: a message written
        there starts a line of its own."""
        self.catch_up()
        row, col, pending_wrap = self.term.cursor
        return col == 0 and not pending_wrap and not self.term.line_text(row).strip()

    def repaint_top_row(self):
        """Bytes repainting row 1 as the server drew it, or None where the model's rows are
        not known to be the terminal's. Between ESC 7 and ESC 8 like the banner itself:
        the terminal's cursor is where the real one is, even before the model knows it."""
        self.catch_up()
        term = self.term
        if not (term.alt_screen or self.main_aligned):
            return None
        cells = b"".join(term.render_cell(0, col) for col in range(term.cols)
                         if term.cell(0, col).width)
        return b"\x1b7" + cells + b"\x1b8" + (b"\x1b[4h" if term.insert_mode else b"")

    def end_open_sequence(self) -> bytes:
        """Bytes ending an escape sequence, string or character the server left open (an
        unterminated title would swallow our message and whatever the local shell prints
        next); b"" at a safe point."""
        self.catch_up()
        if self.term.in_ground_state:
            return b""
        self.term.feed(b"\x1b\\")  # ST: ends a string, and an ESC aborts any sequence
        return b"\x1b\\"

    def reset_sequence(self) -> bytes:
        """Bytes turning off what the stream turned on (alternate screen, mouse, bracketed
        paste, cursor keys and keypad, hidden cursor, colours...), at a safe point."""
        self.catch_up()
        return self.term.reset_sequence()


class StatusBanner:
    """The one-line "last contact N s ago" notice at the top of the screen, or, while no UDP
    packet has ever arrived, "nothing received from HOST on UDP port N (firewall?)" after
    only UDP_SILENT_SECS (there is no "last contact" before the first one).

    Drawn with save cursor (ESC 7, which also saves colours/attributes), move to row 1,
    erase the line, reverse video, the text, restore (ESC 8): the cursor and the remote
    program's attributes come back untouched. Redrawn once a second while silence lasts.

    On removal the row it covered is repainted from the client's model of the screen
    (ScreenMirror.repaint_top_row), so the remote program's top line is back at once; where
    the model cannot know that row (before the server's output has scrolled the screen) it
    is erased, and the next output touching row 1 (or Ctrl-L) paints it again. Programs
    using origin mode with a scroll region would see the banner inside their region, and a
    program that saved the cursor with ESC 7 before the outage and restores it with ESC 8
    after finds our position in the terminal's single save slot; we accept those rare cases.
    """

    def __init__(self, ellipsis: str = "...", quit_hint: str = ""):
        self.ellipsis = ellipsis
        self.quit_hint = quit_hint  # " - Ctrl-^ . quits", or "" without an escape key
        self.udp_wait = None  # (host, port) until the first UDP packet arrives
        # A status line shown until notice_until (monotonic) whatever the silence, e.g.
        # "moshpit: UDP blocked, using TCP"; a silence's banner takes precedence.
        self.notice = None
        self.notice_until = None
        self.notice_drawn = False  # what is shown is that status line
        self.shown = False
        self.drawn_text = None

    def threshold(self) -> float:
        """Seconds of silence before the banner appears."""
        return BANNER_AFTER_SECS if self.udp_wait is None else UDP_SILENT_SECS

    def text(self, silence: float, note: str = "", cols: int = 0) -> str:
        if self.udp_wait is None:
            line = f"moshpit: last contact {int(silence)} s ago, reconnecting{self.ellipsis}"
        else:
            host, port = self.udp_wait
            line = f"nothing received from {host} on UDP port {port} (firewall?){self.quit_hint}"
            if cols and len(line) >= cols:  # keep the port and the way out on a narrow screen
                line = f"nothing received on UDP port {port} (firewall?){self.quit_hint}"
        return f"{line} ({moshpit.printable(note)})" if note else line

    @staticmethod
    def render(text: str, cols: int, encoding: str = "utf-8") -> bytes:
        """Bytes that draw ``text`` on row 1, clipped to cols - 1 (no autowrap at the edge)."""
        clipped = text[: max(cols - 1, 0)].encode(encoding, errors="replace")
        return b"\x1b7\x1b[1;1H\x1b[2K\x1b[7m" + clipped + b"\x1b[m\x1b8"

    @staticmethod
    def erase() -> bytes:
        return b"\x1b7\x1b[1;1H\x1b[2K\x1b8"

    def update(self, silence: float, cols: int, note: str = "", encoding: str = "utf-8",
               force: bool = False, repaint=None) -> bytes:
        """Bytes to write now (possibly b""): draw when silence passes the threshold,
        redraw when the text changes (the whole-second count) or ``force`` (resize).
        ``repaint``: what hide() writes to take the banner away (default: erase the row)."""
        if silence >= self.threshold():
            text = self.text(silence, note, cols)
        elif self.notice is not None:
            text = self.notice
        else:
            return self.hide(repaint)
        self.notice_drawn = text == self.notice
        if self.shown and text == self.drawn_text and not force:
            return b""
        self.shown, self.drawn_text = True, text
        return self.render(text, cols, encoding)

    def hide(self, repaint=None) -> bytes:
        """Bytes taking the banner away: ``repaint`` (the covered row as it was), else an
        erased row; b"" when it is not shown."""
        if not self.shown:
            return b""
        self.shown, self.drawn_text = False, None
        return self.erase() if repaint is None else repaint

    def next_deadline(self, last_heard: float, now: float) -> float:
        """When the banner next needs attention: its first appearance, then each whole
        second of silence (never in the past, even while drawing has to wait)."""
        silence = now - last_heard
        if silence < self.threshold():
            return last_heard + self.threshold()
        return last_heard + int(silence) + 1


# ---------------------------------------------------------------------------
# Connecting: identity, host key, resume handshakes
# ---------------------------------------------------------------------------


class Prompter:
    """Questions for the user, always in cooked mode before the terminal goes raw: prompts
    go to stderr (stdout may be redirected), answers come from stdin."""

    def __init__(self, stdin=None, stderr=None):
        self.stdin = stdin or sys.stdin
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty()

    def say(self, text: str) -> None:
        """Print a message, one or more lines. Messages quote servers, files and the
        environment, so each line goes through moshpit.printable: no escape sequence in
        them reaches the terminal (the specific sites also cap what they quote)."""
        self.stderr.write(moshpit.printable_lines(text[:-1] if text.endswith("\n") else text)
                          + "\n")
        self.stderr.flush()

    def ask(self, question: str) -> str:
        self.stderr.write(question)
        self.stderr.flush()
        return self.stdin.readline().strip()

    def yes_no(self, question: str, default: bool) -> bool:
        answer = self.ask(question).lower()
        return default if not answer else answer in ("y", "yes")

    def secret(self, question: str) -> bytes:
        return getpass.getpass(question, stream=self.stderr).encode("utf-8")


def keygen_command(private_key_path: str) -> str:
    """The exact command that creates the missing key, runnable from the current directory."""
    command = f"{moshpit.program_command('keygen')} generate"
    if private_key_path != moshpit_keys.default_identity_paths()[0]:
        command += f" -f {shlex.quote(private_key_path)}"
    return command


def warn_if_public_key_differs(key, path: str, public_path: str, prompter: Prompter) -> None:
    """Say so when the public key file beside the key is not its public half (a damaged or
    replaced .pub), with the command that rebuilds it. Only a warning: logging in needs
    only the private key, but that .pub is what the user copies to servers."""
    if not os.path.lexists(public_path):
        return
    try:
        if moshpit_keys.load_public_key(public_path) == key.public:
            return
    except moshpit_keys.KeyFileError:
        pass  # unreadable or garbled: just as unusable as someone else's key
    prompter.say(f"mp: warning: {public_path} is not the public key of {path}; rebuild it "
                 f"with: {moshpit.program_command('keygen')} pubkey -f {shlex.quote(path)} > "
                 f"{shlex.quote(public_path)}")


def load_identity(config, prompter: Prompter, target):
    """The client's private key, its passphrase asked once if it is encrypted. Called by
    the handshake only once the server is reached and its host key trusted (a mistyped
    host never costs a passphrase). A missing key is offered to be generated (default yes
    on a terminal, like the seed); the new key cannot log in yet, so that ends the run with
    what to do next."""
    path, public_path = config["private_key_path"], config["public_key_path"]
    if not os.path.lexists(path):
        generate_identity(path, public_path, prompter)
        raise moshpit.MoshpitError(
            f"{target.host} does not know the new key yet: add the line above to the "
            f"authorized_keys of {target.user} there, then run mp again")
    try:
        key = moshpit_keys.load_private_key(path)
    except moshpit_keys.PassphraseRequired:
        if not prompter.interactive:
            raise moshpit.MoshpitError(
                f"{path} is protected by a passphrase and there is no terminal to ask for it; "
                "run mp from a terminal")
        passphrase = prompter.secret(f"Enter passphrase for key '{path}': ")
        try:
            key = moshpit_keys.load_private_key(path, passphrase)
        except moshpit_keys.WrongPassphrase:
            raise moshpit.MoshpitError(f"wrong passphrase for {path}")
    warn_if_public_key_differs(key, path, public_path, prompter)
    return key


def generate_identity(path: str, public_path: str, prompter: Prompter):
    """First run: make a key pair where the config says (never over an existing file),
    then show the line for the server's authorized_keys. Without a terminal only say how
    (never create keys unasked)."""
    if os.path.lexists(public_path):  # someone's public key: never paired with a new key
        raise moshpit.MoshpitError(
            f"no private key at {path}, but {public_path} exists: restore the private key, "
            f"or move {public_path} away to create a new pair")
    missing = f"no private key at {path}; create one with: {keygen_command(path)}"
    if not prompter.interactive:
        raise moshpit.MoshpitError(missing)
    if not prompter.yes_no(f"No moshpit key at {path}. Generate a new key pair ({path} and "
                           f"{public_path}) now? [Y/n] ", True):
        raise moshpit.MoshpitError(missing)
    for _ in range(3):
        passphrase = prompter.secret("Enter passphrase (empty for no passphrase): ")
        if passphrase == prompter.secret("Enter same passphrase again: "):
            break
        prompter.say("Passphrases do not match. Try again.")
    else:
        raise moshpit.MoshpitError("passphrases did not match; no key was created")
    try:
        key = moshpit_keys.create_key_pair(path, public_path, moshpit_keys.default_comment(),
                                           passphrase or None)
    except moshpit_keys.KeyFileExists as err:  # appeared while the user was typing
        raise moshpit.MoshpitError(f"{err}; not overwriting it, no key was created")
    prompter.say(
        f"Your identification has been saved in {path}\n"
        f"Your public key has been saved in {public_path}\n"
        f"The key fingerprint is: {key.public.fingerprint()}\n"
        "To log in, add this line to ~/.mp/authorized_keys of the remote user:\n"
        f"  {key.public.to_line()}")
    return key


class HostKeyCheck:
    """Host key verification. First connection: the known_hosts policy (ask | accept-new |
    yes) of moshpit_trust, prompting in cooked mode (the handshake does not count the
    user's think time). Resumes: the key must be exactly the one the session began with; no
    prompt can appear in the middle of a session, and a change is final."""

    def __init__(self, known_hosts: str, host: str, port: int, policy: str, prompter: Prompter):
        self.known_hosts, self.host, self.port = known_hosts, host, port
        self.policy, self.prompter = policy, prompter
        self.pinned = None

    def first(self, key) -> None:
        notice = moshpit_trust.verify_host_key_policy(
            self.known_hosts, self.host, self.port, key, self.policy,
            self.prompter.interactive, self.prompter.ask)
        if notice:
            self.prompter.say(notice)
        self.pinned = key

    def resume(self, key) -> None:
        if key != self.pinned:
            raise moshpit_trust.HostKeyError(
                f"the host key of {self.host} changed during the session "
                f"(now {key.fingerprint()}); refusing to resume: someone may be intercepting "
                "the connection")


class Resumer(moshpit_session.ResumeSchedule):
    """Resume handshakes (TCP) in a background thread, so the session loop keeps reading
    stdin, drawing the banner and listening on UDP while the handshake waits on the network.

    When: moshpit_session.ResumeSchedule. The thread only runs the blocking handshake with
    values copied at start; the loop thread applies the result (rekey), so the session core
    is never touched from two threads.
    """

    def __init__(self, handshake, waker: Waker, max_backoff: float,
                 resume_after: float = moshpit_session.RESUME_AFTER_SECS):
        super().__init__(max_backoff, resume_after)
        self.handshake = handshake  # request -> ClientResult, raises MoshpitError
        self.waker = waker
        # A deque, not a queue.Queue: take() runs on every loop pass, and an empty Queue
        # answers with a lock and an exception (append and popleft are atomic).
        self.results: collections.deque = collections.deque()

    def start(self, request) -> None:
        self.started()
        threading.Thread(target=self._run, args=(request,), name="resume", daemon=True).start()

    def _run(self, request) -> None:
        self.results.append(attempt_handshake(self.handshake, request))
        self.waker.wake()

    def take(self, now: float):
        """The finished attempt's ClientResult or MoshpitError, or None; schedules the next."""
        if not self.results:
            return None
        self.finished(now)
        return self.results.popleft()


def attempt_handshake(handshake, request):
    """``handshake(request)`` for a background thread: its ClientResult, or the MoshpitError
    it failed with. Never raises: a bug must not kill the session, it counts as a failure."""
    try:
        return handshake(request)
    except moshpit.MoshpitError as err:
        return err
    except Exception as err:
        log.exception("handshake crashed")
        return moshpit_handshake.HandshakeError(f"handshake failed: {err!r}")


def is_final(err: moshpit.MoshpitError) -> bool:
    """Resume failures that retrying cannot fix (refused key, changed host key, session
    gone): stop, restore, explain. Anything else (unreachable, busy, timeout) is retried."""
    return isinstance(err, (moshpit_handshake.AuthRefused, moshpit_trust.HostKeyError))


def is_gone(err: moshpit.MoshpitError) -> bool:
    return getattr(err, "code", None) == moshpit_handshake.NO_SUCH_SESSION


# ---------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------


class Outcome:
    """How the session ended: the exit status and the one line to print after the
    terminal is restored (None: print nothing)."""

    def __init__(self, status: int, message=None):
        self.status, self.message = status, message


# Before a takeover's repaint (written for a fresh terminal): leave the alternate screen a
# killed mp may have left this terminal in (the repaint resets the rest itself).
REPAINT_PREAMBLE = b"\x1b[?1049l"


class Session:
    """One select loop over stdin, the UDP link, the wake-up pipe and timers.

    stdin -> EscapeFilter -> Connection stream (exact across resumes, so nothing typed
    while disconnected is lost or sent twice); Connection events -> stdout buffer (written
    as the terminal accepts it); silence -> banner, then port hop + resume handshakes.
    """

    def __init__(self, target, hostcheck: HostKeyCheck, first, identity, config,
                 router: SignalRouter, waker: Waker, guard: TerminalGuard, in_fd: int = 0,
                 out_fd: int = 1, attaching: bool = False, forwards=()):
        self.target = target
        self.guard = guard  # entered: the suspend key leaves and re-enters raw mode
        self.hostcheck = hostcheck
        self.identity = identity
        self.router, self.waker = router, waker
        self.in_fd, self.out_fd = in_fd, out_fd
        self.output_fds = frozenset((out_fd, ERR_FD))  # a pass that only writes waits on these
        # No banner in a pipe or file, nor without a remote PTY (the output is data then).
        self.out_is_tty = os.isatty(out_fd) and target.pty
        # Like ssh, the escape key works only on a PTY: without one every byte is data.
        self.escape = EscapeFilter(moshpit.parse_escape_key(config["escape_key"])
                                   if target.pty else None)
        self.encoding = terminal_encoding()
        utf8 = codecs.lookup(self.encoding).name == "utf-8"
        key, dash = self.escape.key_name(), "\u2014" if utf8 else "-"
        self.banner = StatusBanner("\u2026" if utf8 else "...",
                                   f" {dash} {key} . quits" if key else "")
        self.banner.udp_wait = (target.host, first.grant.udp_port)
        self.banner_note = ""
        self.screen = ScreenMirror(*target.winsize())
        # Local echo prediction: only on a terminal, over a remote PTY (its module is
        # imported only then: a piped command or -N does not load it), and not at all with
        # --predict never (it would draw nothing, and cost every pass of a flood a few calls).
        self.predictor = None
        if self.out_is_tty and os.isatty(in_fd) and config["predict"] != "never":
            import moshpit_predict
            self.predictor = moshpit_predict.Predictor(self.screen.term, config["predict"])
        self.out = output_queue(out_fd, self.out_is_tty, waker)
        self.err = bytearray()  # a command's stderr (no PTY), for our stderr
        self._waiting = None  # what select waits for, while only output is written (_wait_sets)
        self.stdin_open = not target.no_command  # -N: nothing to type into
        self.outcome = None
        self.exited = None  # the shell's exit Outcome while forwarded connections drain
        self.finished = False  # _finish handed the terminal back
        self.quit_failure = None  # why the server could not be told that we quit
        self.core = moshpit_session.ClientSession(
            first.keys, time.monotonic(), udp_peer(first), first.grant.session_id,
            first.grant.resume_secret, target.winsize(), attaching=attaching)
        wildcard = "::" if ":" in first.server_addr[0] else "0.0.0.0"
        self.link = moshpit_carrier.CarrierLink.bind(self.core, wildcard)
        self.paths = moshpit_carrier.PathSelector(config["transport"])
        self.udp_addr = udp_peer(first)
        self.tcp_path = moshpit_carrier.new_tcp_path()  # the carrier's, once there is one
        self._new_paths(first, time.monotonic())
        # A silence may be blocked UDP or a broken TCP connection, which the resume's new
        # TCP carrier gets around: resume sooner than over UDP alone.
        first_resume = float(config["resume_after_secs"])
        if self.paths.keeps_carrier:
            first_resume = min(first_resume, moshpit_carrier.CARRIER_RESUME_AFTER_SECS)
        self.resumer = Resumer(self._resume_handshake, waker,
                               float(config["max_reconnect_backoff_secs"]), first_resume)
        self.channels = forwarding_sockets(self.core, forwards, config["forward_agent"],
                                           self._notify)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> Outcome:
        self.router.in_loop = True
        try:
            while self.outcome is None:
                self._step()
            if self.quit_failure:  # before _finish: it starts a fresh line for any message
                self.outcome.message = "\n".join(filter(None, (self.outcome.message,
                                                               self.quit_failure)))
            self._finish()
        finally:
            self.router.in_loop = False
            self.link.close()
            self.channels.close()
            if not self.finished:
                self._reset_now()
        return self.outcome

    def _reset_now(self) -> None:
        """An error ended the loop: still turn off what the session turned on (best effort,
        what the terminal has not taken of the output is dropped)."""
        if self.out_is_tty:
            self.out.clear()  # (the writer's thread would write it after the reset)
            try:
                os.write(self.out_fd, self.screen.end_open_sequence() +
                         self.screen.reset_sequence())
            except OSError:
                pass  # terminal gone or full: nothing more we can do

    def _step(self) -> None:
        now = time.monotonic()
        out_size, err_size = self.out.size, len(self.err)
        stalled = out_size >= OUTPUT_HIGH_WATER or err_size >= OUTPUT_HIGH_WATER  # far behind
        _, readers, writers, deadline = self._wait_sets(
            now, (stalled, out_size > 0 and self.out.polled, err_size > 0))
        readable, writable, _ = select.select(readers, writers, [], max(0.0, deadline - now))
        now = time.monotonic()
        if stalled:
            self.core.last_contact = now  # we are not listening, so the server is not silent
        if not readable and now < deadline and self.output_fds.issuperset(writable):
            # Only the terminal took more output (a flood wakes us mostly for that), and no
            # timer is due: the rest of a pass would find nothing to do.
            self._write_pending()
            return
        self._waiting = None  # a full pass: sockets, channels and timers may all change
        tcp = self.link.carrier
        if self.waker in readable:
            self.waker.drain()
            if self.out.failed:
                self._hangup()
        self._signals()
        if tcp is not None and tcp in writable:
            self.link.carrier_writable()
        self._receive(now, readable)
        self._contact(now)
        self._events()
        if self.in_fd in readable:
            self._read_stdin()
        self.channels.handle(readable, writable, now)
        if self.exited is not None and self.outcome is None and not self.channels.mux.busy():
            self.outcome = self.exited  # the shell has exited, its connections have closed
        self._resume_results(now)
        self._maybe_resume(now)
        self._steer(now)
        if self.predictor is not None:
            self.predictor.set_srtt(self.core.conn.srtt)
            self.out += self.predictor.tick(now)
        self.link.flush(now)
        self._write_pending()

    def _wait_sets(self, now: float, output: tuple) -> tuple:
        """(output, readers, writers, deadline) for select. Built after each full pass and
        kept through the passes that only write to the terminal (a flood makes ~100 of them
        per MB, and building these cost as much as the write): those change nothing here
        but ``output``, (far behind, stdout waits, stderr waits). A deadline kept from
        earlier only wakes the loop sooner than one computed now would."""
        waiting = self._waiting
        if waiting is None or waiting[0] != output:
            stalled = output[0]
            readers = [self.waker]
            if not stalled:
                readers += self._network()
            if self.stdin_open and self.core.may_read_input():
                readers.append(self.in_fd)
            readers += self.channels.readers()
            writers = self._pending_writers() + self.channels.writers()
            tcp = self.link.carrier
            if tcp is not None and tcp.wants_write():
                writers.append(tcp)
            self._waiting = waiting = (output, readers, writers, self._next_deadline(now))
        return waiting

    def _write_pending(self) -> None:
        if self.out.size and self.out.polled:
            self._write_out()
        if self.err:
            self._write_err()

    def _next_deadline(self, now: float) -> float:
        deadlines = [now + IDLE_WAKE_SECS, self.banner.next_deadline(self.core.last_contact, now)]
        for wait in (self.link.timeout(now), self.channels.timeout(now)):
            if wait is not None:
                deadlines.append(now + wait)
        if not self.resumer.running:
            deadlines.append(self.resumer.next_attempt(self.core.last_contact))
        for deadline in (self.paths.next_deadline(), self.banner.notice_until):
            if deadline is not None:
                deadlines.append(deadline)
        if self.predictor is not None:
            deadlines.append(self.predictor.next_deadline(now) or deadlines[0])
        return min(deadlines)

    def _network(self) -> list:
        """What to read from the network: the UDP socket and the TCP carrier, if any."""
        tcp = self.link.carrier
        return [self.link] if tcp is None else [self.link, tcp]

    def _receive(self, now: float, readable: list) -> None:
        if self.link in readable:
            before = self.core.last_contact
            self.link.handle_readable(now)
            if self.core.last_contact != before:
                self.paths.udp_heard(now)
        tcp = self.link.carrier
        if tcp is not None and tcp in readable:
            self.link.carrier_readable(now)
        if self.core.udp_heard:
            self.banner.udp_wait = None  # packets arrive: from now on silence is "last contact"

    def _new_paths(self, result, now: float) -> None:
        """After a handshake: the server's UDP address, and its connection kept as the TCP
        carrier (replacing the last one), both trusted (we dialled them)."""
        self.udp_addr = udp_peer(result)
        self.core.conn.trust_path(self.udp_addr)
        if result.connection is not None:
            self.link.attach(moshpit_carrier.TcpCarrier(result.connection, result.unread))
            self.tcp_path = self.link.carrier.path
        else:
            self.link.detach()
        self.paths.started(now, result.rtt, result.connection is not None)

    def _steer(self, now: float) -> None:
        """Carriers (moshpit_carrier.PathSelector): its timers, the path the Connection
        sends on, UDP probes while on TCP, closing a connection no longer needed, and the
        status line when the path changes."""
        paths, link, conn = self.paths, self.link, self.core.conn
        if paths.carrier and link.carrier is None:
            paths.carrier_lost(now)  # closed by the server, or broken
        paths.tick(now)
        if paths.close_carrier_due(now):
            link.detach()
        # On TCP with the carrier gone (forced tcp), datagrams go to its dead path: dropped.
        conn.use_path(self.tcp_path if paths.active == "tcp" else self.udp_addr, now)
        if paths.probe_due(now):
            link.send_to(conn.probe_datagram(now), self.udp_addr)
        note = paths.take_note()
        if note is not None:
            log.warning("%s", note)
            self.banner.notice = f"moshpit: {note}"
            self.banner.notice_until = now + NOTICE_SECS
            self._redraw_banner(now, force=True)

    # -- inputs -----------------------------------------------------------------------

    def _signals(self) -> None:
        signum = self.router.terminate_signum
        if signum is not None and self.outcome is None:
            self._quit("client terminated")
            self.outcome = Outcome(EXIT_FAILURE, killed_message(signum))
        if self.router.winch:
            self.router.winch = False
            size = self.target.winsize()
            if size != self.core.winsize:
                self.core.resize(*size)
                self._forget_predictions()  # erased from the model of the old size
                self.screen.resize(*size)
                if self.banner.shown:
                    self._redraw_banner(time.monotonic(), force=True)

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.in_fd, STDIN_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: our terminal is gone (window closed)
            self._hangup()
            return
        if not data:
            if self.target.is_tty and self.target.pty:  # raw: EOF only once hung up
                self._hangup()
            elif not self.target.pty:
                self.core.end_input()  # the command reads EOF once it has read the rest
            self.stdin_open = False  # a pipe or file: the session goes on
            return
        data, quit_requested = self.escape.feed(data)
        if data:
            self.core.send_input(data)
            if self.predictor is not None:
                self._catch_up_screen()
                self.predictor.set_srtt(self.core.conn.srtt)
                self.out += self.predictor.keys(data, self.core.input_offset, time.monotonic())
                self._write_pending()  # shown before the packet is built: the point of it
        if self.escape.suspend_requested and not quit_requested:
            self.escape.suspend_requested = False
            self._suspend()
        if quit_requested:  # exits 255 like ssh's ~., so a script can tell it from "exit 0"
            self._quit("client quit")
            self.outcome = Outcome(EXIT_FAILURE, f"Connection to {self.target.host} closed.")

    def _await_channels(self) -> None:
        """The shell exited while forwarded connections are open: as ssh, hand the terminal
        back now (the remote screen is over, stdin is no longer read, Ctrl-C quits) and
        end once they have closed. The session carries them on meanwhile, across outages."""
        self.stdin_open = False
        self._end_screen()
        if self.out_is_tty and not self.screen.at_line_start():
            self.out += b"\r\n"
        self._drain_out(FINAL_OUTPUT_SECS)
        self.guard.restore()
        self.out_is_tty = False  # the terminal is the user's again: no banner, no model
        count = len(self.channels.mux.channels())
        text = (f"the remote shell has exited; waiting for {count} forwarded connection(s)"
                " to close (Ctrl-C ends them)")
        if self.target.pty:
            self._notify(text)
        else:
            log.info("%s", text)

    def _suspend(self) -> None:
        """Ctrl-^ Ctrl-Z: stop mp's job as ssh's ~^Z does, the terminal handed back cooked
        (the output so far written, the banner erased) so the local shell works; after
        ``fg`` raw mode again, and the size sent if it changed meanwhile. The session
        carries on: a long stop is an outage like any other, resumed the usual way."""
        self._forget_predictions()
        if self.banner.shown:
            self.out += self.banner.hide(self.screen.repaint_top_row())
        self._drain_out(FINAL_OUTPUT_SECS)
        self.guard.restore()
        try:
            os.kill(0, signal.SIGTSTP)  # the whole job; ignored without job control
        finally:
            self.guard.reenter()
        self.router.winch = True  # the window may have been resized while stopped
        self.waker.wake()

    def _events(self) -> None:
        output = []
        repaint = judge = False
        while True:
            event = self.core.next_event()
            if event is None:
                break
            if isinstance(event, moshpit_session.RepaintReceived):
                repaint = True
                event = moshpit_session.OutputReceived(REPAINT_PREAMBLE + event.screen)
            if isinstance(event, moshpit_session.OutputReceived):
                output.append(event.data)
            elif isinstance(event, moshpit_session.EchoAcked):
                judge = self.predictor is not None
                if judge:
                    self.predictor.echo_acked(event.input_offset)
            elif isinstance(event, moshpit_session.TtyModeChanged):
                if self.predictor is not None:
                    self.predictor.tty_mode(event.mode)
            elif isinstance(event, moshpit_session.ErrorOutputReceived):
                self.err += event.data
            elif isinstance(event, moshpit_session.SessionExited):
                status = event.exit_status
                # ssh says this only with a PTY: a piped command's stderr stays its own
                closed = f"Connection to {self.target.host} closed." if self.target.pty else None
                self.exited = Outcome(status if 0 <= status <= 255 else EXIT_FAILURE, closed)
                if self.channels.mux.busy():
                    self._await_channels()
            elif isinstance(event, moshpit_session.ShutdownReceived):
                self.outcome = Outcome(EXIT_FAILURE,
                                       shutdown_message(self.target.host, event.reason))
        if output:
            self._write_output(output, repaint)
        elif judge:
            self.out += self.predictor.after_output(time.monotonic())

    def _write_output(self, chunks: list, repaint: bool) -> None:
        """The server's bytes of this tick (``chunks``, as they came): predictions taken off
        the terminal first (it then equals the model), and judged against the model once
        it has them. While nothing is predicted the model is fed late, in larger chunks
        (ScreenMirror.defer): a flood costs it several times less; nor are the chunks
        joined then. Only for a terminal: a pipe or file (a command's bytes) is never
        drawn on."""
        predictor = self.predictor
        if predictor is None or (predictor.idle() and not repaint):
            self.out.extend(chunks)
            if self.out_is_tty:
                self.screen.defer(chunks)
            return
        data = b"".join(chunks)
        self.screen.catch_up()  # (nothing waits unless a repaint ends an idle spell)
        self.out += predictor.reset() if repaint else predictor.before_output()
        self.out += data
        if self.out_is_tty:
            self.screen.feed(data)
        self.out += predictor.after_output(time.monotonic())

    def _catch_up_screen(self) -> None:
        """Feed the model what waits, and let prediction see it (as it would have seen it
        tick by tick: an idle predictor only notes that the screen moved)."""
        if self.screen.behind():
            self.screen.catch_up()
            if self.predictor is not None:
                self.out += self.predictor.after_output(time.monotonic())

    def _forget_predictions(self) -> None:
        """Take every prediction away (resize, suspend, the end): the terminal equals the
        model again."""
        if self.predictor is not None:
            self.out += self.predictor.reset()

    # -- connection health ------------------------------------------------------------

    def _contact(self, now: float) -> None:
        """Banner on/off/update from the silence. Packets flowing again is immediate
        recovery: banner gone, resume back-off reset, no handshake needed. A status line
        (``banner.notice``) stays its few seconds while packets flow."""
        silence = self.core.silence(now)
        banner = self.banner
        if silence < self.resumer.resume_after:  # not yet a silence a resume is for
            self.resumer.contact()
        if banner.notice_until is not None and now >= banner.notice_until:
            banner.notice = banner.notice_until = None
        if silence >= banner.threshold() or banner.notice is not None:
            self._redraw_banner(now)
            return
        if banner.shown and self.screen.at_safe_point():
            if not banner.notice_drawn:
                log.info("contact with %s is back", self.target.host)
            self.out += banner.hide(self.screen.repaint_top_row())
        self.banner_note = ""

    def _redraw_banner(self, now: float, force: bool = False) -> None:
        if not self.out_is_tty or not self.screen.at_safe_point():
            return  # never inject bytes into the middle of an escape sequence / character
        silence = self.core.silence(now)
        repaint = self.screen.repaint_top_row() if silence < self.banner.threshold() else None
        self.out += self.banner.update(silence, self.core.winsize[1], self.banner_note,
                                       self.encoding, force, repaint)

    def _maybe_resume(self, now: float) -> None:
        if self.outcome is not None or not self.resumer.due(now, self.core.last_contact):
            return
        log.info("no contact for %.0f s: new UDP port %s, resume handshake #%d",
                 self.core.silence(now), self.link.hop_port(), self.resumer.attempts + 1)
        request = self.target.request(*self.core.winsize, resume=self.core.resume_request())
        self.resumer.start(request)

    def _resume_handshake(self, request):
        """Runs in the Resumer's thread: only immutable inputs, no Connection access. A
        resume's connection stays open as the next TCP carrier (a quit request's not)."""
        keep = self.paths.keeps_carrier and not request.end_session
        return self.target.connect(self.identity, request, self.hostcheck.resume, keep)

    def _resume_results(self, now: float) -> None:
        outcome = self.resumer.take(now)
        if outcome is None:
            return
        if isinstance(outcome, moshpit.MoshpitError):
            if is_gone(outcome):
                self.outcome = Outcome(EXIT_FAILURE, gone_message(self.target.host))
            elif is_final(outcome):
                self.outcome = Outcome(EXIT_FAILURE, f"mp: {outcome}")
            else:
                log.info("resume attempt failed: %s", outcome)
                self.banner_note = str(outcome)
            return
        # Applied even if packets came back meanwhile: the server now uses the new keys.
        log.info("session resumed (server had %d bytes of our input, we had %d of its output)",
                 outcome.grant.recv_offset, self.core.recv_offset)
        self.core.resumed(outcome.keys, outcome.grant.recv_offset, outcome.grant.resume_secret,
                          udp_peer(outcome), now)
        self._new_paths(outcome, now)
        self.banner_note = "server answered, waiting for UDP"
        if self.banner.udp_wait is not None:
            self.banner.udp_wait = (self.target.host, outcome.grant.udp_port)

    # -- output and endings -----------------------------------------------------------

    def _write_out(self) -> None:
        try:
            self.out.write_to(self.out_fd)
        except BlockingIOError:
            pass  # the terminal takes nothing now: select says when it does
        except OSError:  # EIO/EPIPE: nobody is reading our output any more
            self._hangup()

    def _pending_writers(self) -> list:
        """The output fds with bytes waiting for them."""
        out_pending = self.out.polled and self.out.size
        return [fd for fd, pending in ((self.out_fd, out_pending), (ERR_FD, self.err)) if pending]

    def _notify(self, text: str) -> None:
        """A forwarding message for the person (ssh prints these on stderr too)."""
        log.info("%s", text)
        self.err += f"mp: {text}{chr(13) if self.out_is_tty else ''}\n".encode(
            self.encoding, "replace")

    def _write_err(self) -> None:
        try:
            written = os.write(ERR_FD, self.err)
        except BlockingIOError:
            return
        except OSError:  # nobody reads our stderr any more: the command's goes nowhere
            written = len(self.err)
        del self.err[:written]

    def _hangup(self) -> None:
        self.stdin_open = False
        self.out.clear()
        if self.outcome is None:
            self._quit("client terminal closed")
            self.outcome = Outcome(EXIT_FAILURE, None)

    def _quit(self, reason: str) -> None:
        """Tell the server the session is over, so it hangs up the shell instead of keeping
        the session detached for days: over UDP, waiting briefly for the ack (not at all
        in an outage), and without an ack by a quit request over TCP. A few seconds at
        most: the server may be unreachable and the user wants out."""
        self.core.quit(reason)
        in_outage = self.core.silence(time.monotonic()) >= BANNER_AFTER_SECS
        self._linger(0.0 if in_outage else QUIT_FLUSH_SECS, self.core.all_acked)
        if self.core.all_acked():
            return
        why = self._request_end()
        if why is not None:
            log.warning("could not end the session on the server: %s", why)
            self.quit_failure = (f"mp: the server could not be told to end the session ({why});"
                                 " it stays there, detached, until the server's"
                                 " detached_session_timeout_secs runs out (a week by default).")

    def _request_end(self):
        """The quit request over TCP: a resume handshake (our key, the resume secret's proof)
        asking the server to end the session. None once it has (or the session was gone
        already), else why not. Bounded by QUIT_REQUEST_SECS; the thread left running after
        that is a daemon and dies with us."""
        request = self.target.request(*self.core.winsize, resume=self.core.resume_request(),
                                     end_session=True)
        results = queue.Queue()
        threading.Thread(target=lambda: results.put(
            attempt_handshake(self._resume_handshake, request)), name="quit", daemon=True).start()
        try:
            outcome = results.get(timeout=QUIT_REQUEST_SECS)
        except queue.Empty:
            return f"no answer within {QUIT_REQUEST_SECS:g} s"
        if is_gone(outcome):
            log.info("quit request: the session had ended already")
        elif isinstance(outcome, moshpit.MoshpitError):
            return str(outcome)
        else:
            log.info("quit request: the server ended the session")
        return None

    def _finish(self) -> None:
        """Ack what the server sent last (it resends a close until acked), write what is
        left of the output (a few seconds at most) and take the banner away, so the final
        screen is the remote program's. Then hand the terminal back clean (ScreenMirror:
        open sequence ended, every mode the session turned on turned off, so our message
        lands on the main screen, in default colours, with a visible cursor), and start a
        fresh line for our message, so it never lands on the remote prompt's line."""
        self._linger(FINAL_ACKS_SECS, self._nothing_due)
        self._end_screen()
        self.finished = True
        if self.out_is_tty and self.outcome.message and not self.screen.at_line_start():
            self.out += b"\r\n"
        self._drain_out(FINAL_OUTPUT_SECS)

    def _end_screen(self) -> None:
        """Queue what hands the terminal back clean: predictions taken away, the open
        sequence ended, the banner gone, every mode the session turned on turned off."""
        self._forget_predictions()
        if self.out_is_tty:
            self.out += self.screen.end_open_sequence()
            self.out += self.banner.hide(self.screen.repaint_top_row())
            self.out += self.screen.reset_sequence()

    def _drain_out(self, seconds: float) -> None:
        """Write the pending output, waiting up to ``seconds`` for the terminal to take it."""
        deadline = time.monotonic() + seconds
        if not self.out.polled:
            self.out.drain(seconds)
        while self._pending_writers() and time.monotonic() < deadline:
            select.select([], self._pending_writers(), [],
                          max(0.0, deadline - time.monotonic()))
            self._write_pending()

    def _nothing_due(self) -> bool:
        wait = self.link.timeout(time.monotonic())
        return wait is None or wait > ACK_SOON_SECS

    def _linger(self, seconds: float, done) -> None:
        """Run only the network for up to ``seconds`` or until ``done()``."""
        deadline = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            self.link.flush(now)
            if done() or now >= deadline:
                return
            wait = self.link.timeout(now)
            wait = deadline - now if wait is None else min(wait, deadline - now)
            tcp = self.link.carrier
            writers = [tcp] if tcp is not None and tcp.wants_write() else []
            readable, writable, _ = select.select(self._network(), writers, [], max(0.0, wait))
            if writable:
                self.link.carrier_writable()
            self._receive(time.monotonic(), readable)


def forwarding_sockets(core, forwards, forward_agent: bool, notify):
    """--- forwarding --- The session's channels: -L/-D listeners here (a port that cannot
    be bound is a warning, as in ssh), -R requests to the server, -A's agent socket."""
    mux = moshpit_channels.ChannelMux(core, "client", agent=forward_agent)
    agent = os.environ.get("SSH_AUTH_SOCK") if forward_agent else None
    sockets = moshpit_channels.ChannelSockets(mux, notify, agent_path=agent)
    for number, (option, spec) in enumerate(forwards, 1):
        if option == "-R":
            sockets.request_remote(number, spec)
            continue
        try:
            sockets.listen_local(option, spec)
        except OSError as err:
            notify(f"cannot listen on {spec.bind_host}:{spec.bind_port} for {option}: "
                   f"{err.strerror or err}")
    return sockets


class NoCommand:
    """-N's "remote command": none at all, not even a shell (the request's no_command flag:
    the server starts no process). A class, never a string someone could type as a
    command."""


def parse_forwards(given) -> list:
    """-L/-R/-D arguments as (option, ForwardSpec), in order; a bad one is an error."""
    try:
        return [(option, moshpit_channels.parse_forward(option, text))
                for option, text in given or ()]
    except ValueError as err:
        raise moshpit.MoshpitError(f"bad forwarding: {err}") from None


def terminal_encoding() -> str:
    """The local terminal's character encoding (for the banner text), per the locale."""
    name = locale.getpreferredencoding(False)
    try:
        codecs.lookup(name)
    except LookupError:
        return "utf-8"
    return name


def killed_message(signum: int):
    """What to say after a terminating signal (None: nothing; nobody is there to read it)."""
    return None if signum in SignalRouter.QUIET else f"mp: killed by signal {signum}"


def udp_peer(result) -> tuple:
    """Where UDP goes: the address we dialled for TCP (so a relay or NAT in front keeps
    working) and the port the server granted."""
    return (result.server_addr[0], result.grant.udp_port)


def shutdown_message(host: str, reason: str) -> str:
    """The server ended the session on its own (a ShutdownReceived, not a shell exit)."""
    if reason == moshpit_handshake.SHUTTING_DOWN:
        return f"moshpit: server {host} is shutting down; session ended."
    return f"moshpit: server {host} ended the session ({moshpit.printable(reason)})."


def gone_message(host: str) -> str:
    """A resume was answered "no such session" (the wording agreed in contracts.md)."""
    return (f"moshpit: the session on {host} no longer exists "
            "(server restarted or session expired).")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


class Target:
    """Where and as whom we connect, and what we tell the server about our terminal."""

    def __init__(self, user: str, host: str, port: int, in_fd: int = 0, command=None,
                 pty=None, forward_agent: bool = False):
        self.user, self.host, self.port = user, host, port
        self.forward_agent = forward_agent  # -A
        self.in_fd = in_fd
        self.is_tty = os.isatty(in_fd)
        self.no_command = command is NoCommand  # -N
        self.command = None if self.no_command else command
        # --tty / -T force it; by default a command gets a PTY when stdin is a terminal (as
        # ssh -t would), and a login shell always does (as before commands existed).
        self.pty = pty if pty is not None else (self.is_tty or command is None)

    def winsize(self) -> tuple:
        try:
            rows, cols = moshpit.get_winsize(self.in_fd)
        except OSError:
            return 24, 80
        return (rows or 24, cols or 80)

    def request(self, rows: int, cols: int, resume=None, end_session: bool = False,
                intent: int = 0, session_id=None):
        """The handshake's request: a new session, with ``resume`` (ClientSession's
        ``resume_request()``: session id, resume secret, bytes received) a resume, or with
        ``intent`` (and ``session_id`` for TAKE_OVER and KILL) mp --attach, --list, --kill."""
        session_id, resume_secret, recv_offset = resume or (session_id, None, 0)
        return moshpit_handshake.ClientRequest(
            user=self.user, term=os.environ.get("TERM") or "dumb", rows=rows, cols=cols,
            env=moshpit_handshake.locale_env(os.environ), resume_session_id=session_id,
            resume_secret=resume_secret,
            resume_recv_offset=recv_offset, end_session=end_session, command=self.command,
            pty=self.pty, intent=intent, forward_agent=self.forward_agent,
            no_command=self.no_command)

    def connect(self, identity, request, verify_host_key, keep_connection: bool = False):
        return moshpit_handshake.client_handshake(
            self.host, self.port, identity, request, verify_host_key,
            keep_connection=keep_connection)


class Connector:
    """Where to connect, as whom, with which key (loaded once, when first needed) and which
    host key check: what every handshake of one mp run shares."""

    def __init__(self, config, prompter: Prompter, login=None, login_first: bool = False,
                 command=None, pty=None):
        destination = config["server_destination"]
        if not destination:
            raise moshpit.MoshpitError(
                "no server destination: give [user@]host, or set server_destination in the"
                " config")
        self.destination = destination
        user, host = remote_user_and_host(destination, login, login_first,
                                          ssh_alias_lookup(config, prompter))
        self.target = Target(user, host, config["server_port"], command=command, pty=pty,
                             forward_agent=config["forward_agent"])
        self.identity = moshpit_agent.KeyRing(
            config["private_key_path"], config["public_key_path"],
            lambda: load_identity(config, prompter, self.target),
            moshpit_agent.AgentClient.from_environ(), self._agent_waits,
            moshpit_handshake.MAX_OFFERED_KEYS)
        self.prompter, self.in_session = prompter, False
        self.hostcheck = HostKeyCheck(config["known_hosts_file"], host, self.target.port,
                                      config["strict_host_key_checking"], prompter)

    def _agent_waits(self, key) -> None:
        """ssh-agent waits for the user to confirm a signature: say so, except in the session
        (the terminal is raw then; the agent's own prompt shows)."""
        log.info("waiting for ssh-agent to sign with %s", key.fingerprint())
        if not self.in_session:
            self.prompter.say(f"mp: waiting for ssh-agent to sign with {key.fingerprint()}"
                              " (confirm it, or touch the key)")

    def connect(self, intent: int = 0, session_id=None, keep_connection: bool = False):
        """One handshake (the host key checked as on first contact); ``keep_connection``:
        the result's connection is left open, for the TCP carrier."""
        target = self.target
        return target.connect(self.identity, target.request(*target.winsize(), intent=intent,
                                                            session_id=session_id),
                              self.hostcheck.first, keep_connection)

    def sessions(self) -> list:
        """The user's sessions on the server (mp --list), most recently active first."""
        return self.connect(moshpit_handshake.LIST).grant.sessions

    def pick(self, wanted: str) -> moshpit_handshake.SessionInfo:
        """The session whose id starts with ``wanted`` (hex, as --list shows it), or with
        ``wanted`` empty the most recently active detached one (none detached: the most
        recently active one; a client killed a moment ago still counts as attached)."""
        host = self.target.host
        listing = self.sessions()
        if not wanted:
            if not listing:
                raise moshpit.MoshpitError(f"no session of {self.target.user} on {host}")
            return next((info for info in listing if not info.attached), listing[0])
        found = [info for info in listing if info.session_id.hex().startswith(wanted.lower())]
        if len(found) != 1:
            what = "no session" if not found else f"{len(found)} sessions"
            raise moshpit.MoshpitError(
                f"{what} with id {moshpit.printable(wanted, 40)} on {host}:"
                f" mp --list {self.destination} shows yours")
        return found[0]


class SshConnector(Connector):
    """mp --ssh: the server of this one session is started through the system ssh
    (moshpit_bootstrap), which also carries the keys: the client logs in with a key made for
    this session and pins the host key the bootstrap announced."""

    def __init__(self, config, prompter: Prompter, ssh_command: str, cache: bool = False,
                 login=None, command=None, pty=None):
        destination = config["server_destination"]
        if not destination:
            raise moshpit.MoshpitError("--ssh needs a destination: mp --ssh [user@]host")
        self.destination = destination
        # Imported here, not at the top: only --ssh needs it, and its zipfile and json would
        # cost every other start of mp some 7 ms of CPU.
        import moshpit_bootstrap
        started = moshpit_bootstrap.start_over_ssh(ssh_command, destination, login, cache)
        for line in started.noise + started.stderr.splitlines():
            prompter.say(moshpit.printable(line))  # motd, ssh's warnings: as ssh shows them
        connect = started.connect
        host = moshpit_bootstrap.pick_address(
            moshpit_bootstrap.ssh_hostname(ssh_command, destination, login), connect.address)
        log.info("bootstrapped over ssh (modules %s, ssh exit status %d): %s@%s port %d, "
                 "host key %s", "cached on the server" if started.cached else "sent",
                 started.ssh_status, connect.user, host, connect.port,
                 connect.host_key.fingerprint())
        self.target = Target(connect.user, host, connect.port, command=command, pty=pty,
                             forward_agent=config["forward_agent"])
        self.identity = moshpit_handshake.LazyIdentity(lambda: started.client_key)
        self.hostcheck = moshpit_bootstrap.PinnedHostKey(connect.host_key, host)


LIST_HEADER = ("ID", "STATE", "STARTED", "LAST ACTIVITY", "SIZE", "TITLE")
LIST_ROW = "{:<8}  {:<8}  {:<16}  {:<16}  {:<9}  {}"


def session_lines(sessions: list) -> list:
    """mp --list's table: a header, then one line per session (local times)."""
    def when(seconds: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))
    lines = [LIST_ROW.format(*LIST_HEADER)]
    for info in sessions:
        lines.append(LIST_ROW.format(
            info.session_id[:4].hex(), "attached" if info.attached else "detached",
            when(info.started), when(info.last_activity), f"{info.cols}x{info.rows}",
            moshpit.printable(info.title, 80)).rstrip())
    return lines


def manage_sessions(config, prompter: Prompter, login=None, login_first: bool = False,
                    kill=None) -> int:
    """mp --list (``kill`` None) or mp --kill ID: one or two handshakes, no session."""
    connector = Connector(config, prompter, login, login_first)
    host = connector.target.host
    if kill is None:
        sessions = connector.sessions()
        if not sessions:
            print(f"no sessions for {connector.target.user} on {host}")
        else:
            print("\n".join(session_lines(sessions)))
        return 0
    info = connector.pick(kill)
    connector.connect(moshpit_handshake.KILL, info.session_id)
    print(f"mp: session {info.session_id[:4].hex()} on {host} ended")
    return 0


def run_client(config, prompter: Prompter, login=None, login_first: bool = False,
               command=None, pty=None, attach=None, ssh_command=None,
               ssh_cache: bool = False, forwards=()) -> int:
    """Connect (prompts in cooked mode), run the session in raw mode, and return the exit
    status. The terminal is restored before the final message is printed, whatever
    happened; SIGTERM/SIGHUP/SIGINT during prompts or the handshake end here too.
    ``login``/``login_first``: ``-l USER`` and whether it came before the destination.
    ``command``: run it instead of a login shell; ``pty``: --tty (True), -T (False) or None
    (a PTY when stdin is a terminal). ``attach``: take over that session (mp --attach;
    "": the latest detached one). ``ssh_command``: mp --ssh, through that ssh (and
    ``ssh_cache``: --ssh-cache)."""
    moshpit.parse_escape_key(config["escape_key"])  # fail now, not after connecting
    if ssh_command is not None:
        connector = SshConnector(config, prompter, ssh_command, ssh_cache, login, command,
                                 pty)
    else:
        connector = Connector(config, prompter, login, login_first, command, pty)
    target, hostcheck, identity = connector.target, connector.hostcheck, connector.identity
    waker = Waker()
    router = SignalRouter(waker)
    guard = TerminalGuard(0, 1, raw=target.pty)
    router.install()
    try:
        keep = config["transport"] != "udp"  # the handshake's connection: the TCP carrier
        if attach is None:
            first = connector.connect(keep_connection=keep)
            if first.grant.detached:
                prompter.say(f"mp: {first.grant.detached} detached session(s):"
                             f" mp --attach {connector.destination}")
        else:
            first = connector.connect(moshpit_handshake.TAKE_OVER,
                                      connector.pick(attach).session_id, keep)
        log.info("connected to %s@%s port %d, UDP %s", target.user, target.host, target.port,
                 udp_peer(first))
        if os.isatty(1) and target.pty:  # once connected (a failure prints one line only)
            try:
                os.write(1, STARTUP_RESET)  # blocking stdout, a few dozen bytes
            except OSError:
                pass  # a terminal already gone: the session will say so
        connector.in_session = True
        with guard:
            outcome = Session(target, hostcheck, first, identity, config, router,
                              waker, guard, attaching=attach is not None,
                              forwards=forwards).run()
    except Terminated as err:
        outcome = Outcome(EXIT_FAILURE, killed_message(err.signum))
    finally:
        guard.restore()
        router.uninstall()
        waker.close()
    if outcome.message:
        try:
            prompter.say(outcome.message)
        except OSError:
            pass  # terminal gone
    return outcome.status


# What --copy-id runs on the server, through `sh` whatever the login shell is (csh, fish):
# the key line arrives on stdin. Private modes from the start (umask) and enforced on what
# exists (`: >>` creates the file without touching an existing one's time). The key is
# appended only if no uncommented line holds the same key blob (its `moshpit` or
# `ssh-ed25519` form, any comment), after a newline if the file lacks a final one.
COPY_ID_SCRIPT = r"""
umask 077
cd || exit 1
mkdir -p .mp && chmod 700 .mp && : >> .mp/authorized_keys && chmod 600 .mp/authorized_keys \
    || exit 1
IFS= read -r line || exit 1
set -f
set -- $line
if awk -v blob="$2" '!/^[ \t]*#/ { for (i = 1; i <= NF; i++) if ($i == blob) found = 1 }
        END { exit !found }' .mp/authorized_keys; then
    echo "moshpit-copy-id: present"
else
    if [ -s .mp/authorized_keys ] && [ -n "$(tail -c 1 .mp/authorized_keys)" ]; then
        echo >> .mp/authorized_keys
    fi
    printf '%s\n' "$line" >> .mp/authorized_keys && echo "moshpit-copy-id: added"
fi
"""


def copy_id(config, ssh_command: str, login=None, login_first: bool = False) -> int:
    """``mp --copy-id [user@]host``: add our public key to the server user's
    ~/.mp/authorized_keys through the system ssh (its config, agent, password prompts on the
    terminal), once. Returns ssh's exit status (0 when the key is there). With ``-l`` the
    user is the one mp would log in as (run_client's rule)."""
    destination = config["server_destination"]
    if not destination:
        raise moshpit.MoshpitError("--copy-id needs a destination: mp --copy-id [user@]host")
    if login is not None:
        destination = "{}@{}".format(*remote_user_and_host(destination, login, login_first))
    path = config["public_key_path"]
    if not os.path.exists(path):
        raise moshpit.MoshpitError(
            f"no public key at {path}; create a key pair with: "
            f"{moshpit.program_command('keygen')} generate")
    key = moshpit_keys.load_public_key(path)
    remote = "exec sh -c " + shlex.quote(COPY_ID_SCRIPT)
    argv = shlex.split(ssh_command) + ["--", destination, remote]
    try:
        result = subprocess.run(argv, input=key.to_line() + "\n", stdout=subprocess.PIPE,
                                text=True)
    except OSError as err:
        raise moshpit.MoshpitError(f"cannot run {argv[0]}: {err.strerror or err} "
                                   "(install the OpenSSH client or pass --ssh-command)")
    where = f"{destination}:~/.mp/authorized_keys"
    said = result.stdout.splitlines()
    if result.returncode == 0 and "moshpit-copy-id: added" in said:
        print(f"mp: key {key.fingerprint()} added to {where}")
    elif result.returncode == 0 and "moshpit-copy-id: present" in said:
        print(f"mp: key {key.fingerprint()} is already in {where}; nothing changed")
    else:
        print(f"mp: could not add key {key.fingerprint()} to {where} "
              f"({argv[0]} exited with status {result.returncode})", file=sys.stderr)
        return result.returncode or EXIT_FAILURE
    return 0


def main(argv=None) -> int:
    args, command = parse_command_line(sys.argv[1:] if argv is None else list(argv))
    if args.attach and args.server_destination is None:
        # "mp --attach HOST": the optional ID took the destination
        args.server_destination, args.attach = args.attach, ""
    prompter = Prompter()
    try:
        config = moshpit.load_config("client", cli=cli_overrides(args), path=args.config)
        if args.print_config:
            log_path = args.tracing or moshpit.default_log_path("client", config.home)
            print(moshpit.config_report(config, {"log file": log_path}))
            return 0
        for warning in config.warnings:
            prompter.say(f"mp: warning: {warning}")
        if args.copy_id:
            return copy_id(config, args.ssh_command, args.login_name, args.login_first)
        moshpit.setup_logging("client", config, log_path=args.tracing)
        managing = args.list_sessions or args.kill is not None or args.attach is not None
        if managing and command is not None:
            raise moshpit.MoshpitError("--list, --attach and --kill take no remote command")
        if args.no_command:
            if command is not None or args.pty or managing:
                raise moshpit.MoshpitError("-N (forwarding only) takes no remote command, "
                                           "no --tty, and no --list, --attach or --kill")
            command, args.pty = NoCommand, False
        if args.ssh_cache and not args.ssh:
            raise moshpit.MoshpitError("--ssh-cache goes with --ssh")
        if args.ssh and managing:
            raise moshpit.MoshpitError("--ssh starts a server for one new session: --list, "
                                       "--attach and --kill need a running mps")
        if args.list_sessions or args.kill is not None:
            return manage_sessions(config, prompter, args.login_name, args.login_first,
                                   args.kill)
        return run_client(config, prompter, args.login_name, args.login_first, command,
                          args.pty, args.attach, args.ssh_command if args.ssh else None,
                          args.ssh_cache, parse_forwards(args.forwards))
    except moshpit.MoshpitError as err:
        log.info("exiting: %s", err)
        prompter.say(f"mp: {err}")
        return EXIT_FAILURE
    except OSError as err:  # the local system refused something (socket, terminal, file)
        log.exception("local error")
        prompter.say(f"mp: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""))
        return EXIT_FAILURE
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place
        return EXIT_FAILURE
    except Exception:
        log.exception("mp crashed")  # the terminal is already restored by run_client
        raise


if __name__ == "__main__":
    sys.exit(main())
