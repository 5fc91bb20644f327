"""moshpit login policy and records: who may log in, and the traces a login leaves.

sshd's rules, for a root ``mps.py`` (a server without root serves only its own user and can
read neither /etc/shadow nor write the records: it skips those, saying so once in the log):

- Account policy (``AccountPolicy.refusal``), after the client's key is verified:
  a locked password (``!`` prefix as on Linux, Solaris' ``*LK*``), an expired account
  (shadow ``sp_expire``), a login shell that does not exist or is not executable, the
  ``mps.deny_users`` / ``allow_users`` / ``deny_groups`` / ``allow_groups`` lists (sshd's
  DenyUsers, AllowUsers, DenyGroups, AllowGroups, in that order) and ``/etc/nologin`` for
  everyone but root (its text goes to the client). With PAM in use the locked, expired and
  nologin checks are PAM's (``pam_unix``, ``pam_nologin``), as with sshd's ``UsePAM yes``;
  the shell and the lists are always checked.
- PAM (``Pam``, through ctypes; no new dependency): service ``moshpit``, account management
  at login; session management (``PamLogin.open_session`` / ``close_session`` and the
  environment the modules export) for the process that will be the session's parent.
- Login records (``LoginRecord``): utmp (``who``), wtmp (``last``) and lastlog entries,
  closed at logout; ``close_stale_records`` closes those of sessions that ended while the
  listener was down.
- In the session's process, before the uid changes: ``write_loginuid`` (the audit login
  uid, which the shell inherits). Resource limits need nothing here: mps starts its session
  spawner before it raises its own descriptor limit, so sessions have the start-up limits.

Who calls what, and when (mps.py):
    Server start, before listening                   close_stale_records(); loginuid_supported()
    Server.decide, after the key is verified         AccountPolicy.refusal(pw, ...)
    session process, root, before becoming the user  open_user_terminal(pw) (with PAM);
                                                     PamLogin.open_session(); write_loginuid(uid)
    its root monitor, once the session has ended     PamLogin.close()
    listener: shell started / logged out, crashed    LoginRecord.open() / .close()

Library rules: imports only ``moshpit`` and the standard library; logs through ``logging``,
never prints.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import grp
import ipaddress
import logging
import os
import pwd
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from moshpit import MoshpitError, printable

log = logging.getLogger("moshpit.login")

SHADOW_PATH = "/etc/shadow"
NOLOGIN_PATHS = ("/etc/nologin", "/run/nologin")  # sshd reads the first; pam_nologin both
UTMP_PATH = "/var/run/utmp"
WTMP_PATH = "/var/log/wtmp"
LASTLOG_PATH = "/var/log/lastlog"
PAM_SERVICE = "moshpit"
PAM_SERVICE_DIRS = ("/etc/pam.d", "/usr/lib/pam.d", "/lib/pam.d")
PAM_CONF = "/etc/pam.conf"  # read by Linux-PAM only where /etc/pam.d does not exist
MAX_SHADOW_BYTES = 16 << 20  # a larger /etc/shadow is not one we should parse
MAX_NOLOGIN_BYTES = 1024  # text shown to the client (sshd reads it in 1 KiB lines too)
DAY_SECS = 86400

_once_lock = threading.Lock()
_said: set = set()


def _log_once(key: str, level: int, message: str, *args) -> None:
    """Log a fact about this machine (no libpam, no audit) the first time it matters."""
    with _once_lock:
        if key in _said:
            return
        _said.add(key)
    log.log(level, message, *args)


def _read_bounded(path: str, limit: int) -> Optional[bytes]:
    """Up to ``limit`` bytes of the regular file ``path``; None if it does not exist.
    O_NOCTTY|O_NONBLOCK: a FIFO or a terminal put there is never waited on nor acquired."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# /etc/shadow (Python's spwd module is gone in 3.13)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowEntry:
    """One line of shadow(5). Day counts are days since 1970-01-01; None: the field is empty
    (no limit / not set)."""

    name: str
    password: str
    last_change: Optional[int]
    min_days: Optional[int]
    max_days: Optional[int]
    warn_days: Optional[int]
    inactive_days: Optional[int]
    expire_day: Optional[int]

    def locked(self) -> bool:
        """sshd's rule on Linux (LOCKED_PASSWD_PREFIX "!": ``usermod -L``, ``passwd -l``),
        plus Solaris' LOCKED_PASSWD_STRING "*LK*". "*" alone (no password, key logins
        only) is not locked, for sshd neither."""
        return self.password.startswith("!") or self.password == "*LK*"

    def expired(self, today: int) -> bool:
        """The account (not the password) expired: sshd refuses from the day after
        ``sp_expire``. An expired password does not stop a key login (sshd asks for a new
        password only after password authentication)."""
        return self.expire_day is not None and self.expire_day < today


def _shadow_day(field: str) -> Optional[int]:
    if field == "":
        return None
    value = int(field)  # ValueError for garbage: the line is skipped
    return None if value < 0 else value  # -1 in some tools' output means "not set"


def parse_shadow(data: bytes) -> Dict[str, ShadowEntry]:
    """Entries of a shadow(5) file by name. Lines that are not 9 colon-separated fields
    with numbers where numbers belong are skipped (as getspnam does); the first entry for a
    name wins."""
    entries: Dict[str, ShadowEntry] = {}
    for raw in data.split(b"\n"):
        fields = raw.decode("utf-8", "surrogateescape").split(":")
        if len(fields) != 9 or not fields[0] or fields[0] in entries:
            continue
        try:
            days = [_shadow_day(field) for field in fields[2:8]]
        except ValueError:
            continue
        entries[fields[0]] = ShadowEntry(fields[0], fields[1], *days)
    return entries


def shadow_entry(name: str, path: str = SHADOW_PATH) -> Optional[ShadowEntry]:
    """``name``'s shadow entry, or None (no entry, no shadow file). Root only: OSError else."""
    data = _read_bounded(path, MAX_SHADOW_BYTES + 1)
    if data is None:
        return None
    if len(data) > MAX_SHADOW_BYTES:
        raise OSError(errno.EFBIG, f"{path} is larger than {MAX_SHADOW_BYTES} bytes")
    return parse_shadow(data).get(name)


# ---------------------------------------------------------------------------
# Allow/Deny lists (sshd's AllowUsers, DenyUsers, AllowGroups, DenyGroups)
# ---------------------------------------------------------------------------


def _wildcard(pattern: str) -> re.Pattern:
    """sshd's match_pattern: ``*`` any run, ``?`` one character, everything else literal."""
    return re.compile("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch)
                              for ch in pattern), re.DOTALL)


class _HostPattern:
    """The HOST of USER@HOST: a comma-separated list of address wildcards or CIDR blocks,
    each maybe negated with ``!`` (sshd's match_host_and_ip over the client address; mps does
    no reverse DNS, so names never match)."""

    def __init__(self, text: str):
        self.items: List[Tuple[bool, object]] = []
        for item in text.split(","):
            negated = item.startswith("!")
            item = item[1:] if negated else item
            if not item:
                raise ValueError(f"empty host in {text!r}")
            if "/" in item:
                self.items.append((negated, ipaddress.ip_network(item, strict=True)))
            else:
                self.items.append((negated, _wildcard(item)))

    def matches(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        found = False
        for negated, test in self.items:
            if isinstance(test, re.Pattern):
                hit = bool(test.fullmatch(address))
            else:
                hit = ip is not None and ip.version == test.version and ip in test
            if hit and negated:
                return False
            found = found or hit
        return found


class UserPattern:
    """One AllowUsers/DenyUsers word: ``USER`` or ``USER@HOST`` (see _HostPattern)."""

    def __init__(self, text: str):
        self.text = text
        user, at, host = text.rpartition("@") if "@" in text else (text, "", "")
        self.user = _wildcard(user)
        self.host = _HostPattern(host) if at else None

    def matches(self, user: str, address: str) -> bool:
        return bool(self.user.fullmatch(user)) and (self.host is None
                                                     or self.host.matches(address))


def parse_user_patterns(text: str) -> List[UserPattern]:
    """Space-separated USER[@HOST] patterns; ValueError naming a bad one."""
    patterns = []
    for word in text.split():
        try:
            patterns.append(UserPattern(word))
        except ValueError as e:
            raise ValueError(f"bad pattern {word!r}: {e}") from None
    return patterns


def _group_names(pw: pwd.struct_passwd) -> List[str]:
    names = []
    for gid in os.getgrouplist(pw.pw_name, pw.pw_gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass  # a gid without a name cannot match a name pattern
    return names


# ---------------------------------------------------------------------------
# Account policy
# ---------------------------------------------------------------------------


class Refusal(MoshpitError):
    """A login refused by account policy: ``str()`` is the log's reason; ``client_message``
    is text for the client (the nologin file, PAM's messages), usually empty."""

    def __init__(self, reason: str, client_message: str = ""):
        super().__init__(reason)
        self.client_message = client_message


def nologin_text(paths: Sequence[str] = NOLOGIN_PATHS) -> Optional[Tuple[str, str]]:
    """(path, text for the client) of the first nologin file that exists, else None. The
    text is capped at MAX_NOLOGIN_BYTES; sshd's default when it is empty or unreadable."""
    for path in paths:
        try:
            data = _read_bounded(path, MAX_NOLOGIN_BYTES)
        except OSError:
            data = b"" if os.path.lexists(path) else None
        if data is not None:
            text = data.decode("utf-8", "replace").strip() or "Logins are currently disabled."
            return path, text
    return None


class AccountPolicy:
    """sshd's allowed_user() and do_nologin() for mps (see the module docstring).

    ``settings``: the mps.allow_users / deny_users / allow_groups / deny_groups strings.
    ``use_pam``: PAM does the locked/expired/nologin checks (sshd's UsePAM yes).
    Raises MoshpitError naming the setting if a pattern is malformed."""

    LISTS = ("deny_users", "allow_users", "deny_groups", "allow_groups")

    def __init__(self, settings: Dict[str, str], use_pam: bool = False,
                 shadow_path: str = SHADOW_PATH,
                 nologin_paths: Sequence[str] = NOLOGIN_PATHS, pam_service: str = PAM_SERVICE):
        self.lists: Dict[str, list] = {}
        for name in self.LISTS:
            text = settings.get(name, "")
            try:
                if name.endswith("_users"):
                    self.lists[name] = parse_user_patterns(text)
                else:
                    self.lists[name] = [_wildcard(word) for word in text.split()]
            except ValueError as e:
                raise MoshpitError(f"mps.{name}: {e}") from None
        self.use_pam = use_pam
        self.pam_service = pam_service
        self.shadow_path = shadow_path
        self.nologin_paths = tuple(nologin_paths)

    def refusal(self, pw: pwd.struct_passwd, client_address: str,
                now: Optional[float] = None) -> Optional[Refusal]:
        """Why ``pw`` may not log in from ``client_address`` (a Refusal), or None.
        Order as sshd: locked/expired, shell, DenyUsers, AllowUsers, DenyGroups, AllowGroups;
        then PAM account management, or without PAM nologin (sshd checks it when the
        session starts, after all of these)."""
        now = time.time() if now is None else now
        for check in (self._shadow_refusal, self._shell_refusal):
            reason = check(pw, now)
            if reason:
                return Refusal(reason)
        reason = self._list_refusal(pw, client_address)
        if reason:
            return Refusal(reason)
        if self.use_pam:
            return pam_account_refusal(pw.pw_name, client_address, self.pam_service)
        return self._nologin_refusal(pw)

    def _shadow_refusal(self, pw: pwd.struct_passwd, now: float) -> Optional[str]:
        if self.use_pam:
            return None
        if os.geteuid() != 0:
            _log_once("shadow", logging.INFO, "not running as root: %s is not readable, so "
                      "locked and expired accounts are not checked", self.shadow_path)
            return None
        try:
            entry = shadow_entry(pw.pw_name, self.shadow_path)
        except OSError as e:
            return f"cannot read {self.shadow_path}: {e.strerror or e}"
        if entry is not None and entry.expired(int(now // DAY_SECS)):
            return (f"account {pw.pw_name} has expired (shadow expiry day {entry.expire_day},"
                    f" {time.strftime('%Y-%m-%d', time.gmtime(entry.expire_day * DAY_SECS))})")
        locked = entry.locked() if entry is not None else pw.pw_passwd.startswith("!")
        if locked:
            return (f"account {pw.pw_name} is locked (its password in {self.shadow_path} "
                    "starts with '!' or is '*LK*'; usermod -U unlocks it, usermod -p '*' "
                    "makes it a key-only account)")
        return None

    @staticmethod
    def _shell_refusal(pw: pwd.struct_passwd, now: float) -> Optional[str]:
        shell = pw.pw_shell or "/bin/sh"
        try:
            st = os.stat(shell)
        except OSError:
            return f"login shell {shell} of {pw.pw_name} does not exist"
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            return f"login shell {shell} of {pw.pw_name} is not executable"
        return None

    def _list_refusal(self, pw: pwd.struct_passwd, address: str) -> Optional[str]:
        who = f"{pw.pw_name} from {address}"
        if any(p.matches(pw.pw_name, address) for p in self.lists["deny_users"]):
            return f"{who} is listed in mps.deny_users"
        allow = self.lists["allow_users"]
        if allow and not any(p.matches(pw.pw_name, address) for p in allow):
            return f"{who} is not listed in mps.allow_users"
        deny_groups, allow_groups = self.lists["deny_groups"], self.lists["allow_groups"]
        if not deny_groups and not allow_groups:
            return None
        groups = _group_names(pw)
        for name in groups:
            if any(p.fullmatch(name) for p in deny_groups):
                return f"{who}: group {name} is listed in mps.deny_groups"
        if allow_groups and not any(p.fullmatch(name) for name in groups
                                    for p in allow_groups):
            return f"{who}: none of the groups {' '.join(groups)} is in mps.allow_groups"
        return None

    def _nologin_refusal(self, pw: pwd.struct_passwd) -> Optional[Refusal]:
        if pw.pw_uid == 0:
            return None
        found = nologin_text(self.nologin_paths)
        if found is None:
            return None
        path, text = found
        return Refusal(f"{path} exists: logins are disabled for everyone but root"
                       f" ({printable(text, 120)})", text)


# ---------------------------------------------------------------------------
# PAM through ctypes
# ---------------------------------------------------------------------------

PAM_SUCCESS = 0
PAM_CONV_ERR = 19
PAM_BUF_ERR = 5
PAM_USER, PAM_TTY, PAM_RHOST, PAM_CONV, PAM_RUSER = 2, 3, 4, 5, 8
PAM_SILENT = 0x8000
PAM_ESTABLISH_CRED, PAM_DELETE_CRED = 0x2, 0x4
PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON, PAM_ERROR_MSG, PAM_TEXT_INFO = 1, 2, 3, 4
MAX_PAM_MESSAGES = 16  # kept for the client per call; more are only logged
MAX_PAM_ENV = 256  # variables taken from pam_getenvlist


class _PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class _PamResponse(ctypes.Structure):
    _fields_ = [("resp", ctypes.c_char_p), ("resp_retcode", ctypes.c_int)]


_CONV_FUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int,
                              ctypes.POINTER(ctypes.POINTER(_PamMessage)),
                              ctypes.POINTER(ctypes.POINTER(_PamResponse)), ctypes.c_void_p)


class _PamConv(ctypes.Structure):
    _fields_ = [("conv", _CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


class _Libpam:
    """The C functions of libpam and libc's calloc (PAM frees the replies we allocate)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path, use_errno=True)
        handle_p = ctypes.c_void_p
        for name, args in (("pam_start", [ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.POINTER(_PamConv), ctypes.POINTER(handle_p)]),
                           ("pam_set_item", [handle_p, ctypes.c_int, ctypes.c_void_p]),
                           ("pam_acct_mgmt", [handle_p, ctypes.c_int]),
                           ("pam_setcred", [handle_p, ctypes.c_int]),
                           ("pam_open_session", [handle_p, ctypes.c_int]),
                           ("pam_close_session", [handle_p, ctypes.c_int]),
                           ("pam_end", [handle_p, ctypes.c_int])):
            func = getattr(lib, name)
            func.argtypes, func.restype = args, ctypes.c_int
        lib.pam_strerror.argtypes, lib.pam_strerror.restype = [handle_p, ctypes.c_int], \
            ctypes.c_char_p
        lib.pam_getenvlist.argtypes = [handle_p]
        lib.pam_getenvlist.restype = ctypes.POINTER(ctypes.c_void_p)
        self.lib = lib
        libc = ctypes.CDLL(None)
        self.calloc = libc.calloc
        self.calloc.argtypes, self.calloc.restype = [ctypes.c_size_t, ctypes.c_size_t], \
            ctypes.c_void_p
        self.free = libc.free
        self.free.argtypes, self.free.restype = [ctypes.c_void_p], None


_libpam: Optional[_Libpam] = None
_libpam_loaded = False


def libpam() -> Optional[_Libpam]:
    """libpam if this machine has it (loaded once), else None (logged once)."""
    global _libpam, _libpam_loaded
    with _once_lock:
        if not _libpam_loaded:
            _libpam_loaded = True
            path = ctypes.util.find_library("pam")
            try:
                _libpam = _Libpam(path) if path else None
            except (OSError, AttributeError) as e:
                log.warning("cannot load %s: %s: the built-in account checks apply", path, e)
    if _libpam is None:
        _log_once("libpam", logging.INFO, "no libpam on this machine: the built-in account "
                  "checks apply (locked, expired, nologin)")
    return _libpam


def pam_service_configured(service: str = PAM_SERVICE,
                           dirs: Sequence[str] = PAM_SERVICE_DIRS,
                           conf: str = PAM_CONF) -> bool:
    """Whether PAM has a service file for ``service`` in ``dirs``, or, where the first of
    them (/etc/pam.d) does not exist, a line for it in ``conf`` (/etc/pam.conf: Linux-PAM
    reads it only then; Debian ships one of comments alone). Without one PAM would use
    "other", which denies everything on some systems (Fedora) and runs a whole login stack
    on others: mps then keeps to its built-in checks."""
    if any(os.path.exists(os.path.join(d, service)) for d in dirs):
        return True
    if os.path.isdir(dirs[0]):
        return False
    try:
        with open(conf, encoding="utf-8", errors="replace") as lines:
            return any(line.split()[:1] == [service] for line in lines)
    except OSError:
        return False


def pam_available(service: str = PAM_SERVICE, asked: bool = False) -> bool:
    """Whether a root mps can use PAM here: libpam, root, and a ``service`` file. A missing
    service file is a warning only when the admin ``asked`` for PAM (use_pam set, not the
    default); otherwise the built-in checks are the expected state and it is logged as info."""
    if os.geteuid() != 0:
        _log_once("pam-root", logging.INFO, "not running as root: PAM is not used")
        return False
    if libpam() is None:
        return False
    if not pam_service_configured(service):
        _log_once("pam-service", logging.WARNING if asked else logging.INFO,
                  "use_pam: no PAM service file %s/%s: "
                  "PAM is not used, the built-in account checks apply (README: PAM)",
                  PAM_SERVICE_DIRS[0], service)
        return False
    return True


class PamError(MoshpitError):
    """A PAM call failed: ``str()`` names the call and PAM's reason; ``messages`` are what
    the modules said through the conversation (for the client)."""

    def __init__(self, message: str, messages: Sequence[str] = ()):
        super().__init__(message)
        self.messages = list(messages)


class PamLogin:
    """One PAM transaction (pam_start .. pam_end) for one login, used by one thread at a time.

    The conversation answers no prompt (moshpit authenticates by key, not by PAM): a module
    that asks gets PAM_CONV_ERR; error and info messages are logged and kept in
    ``messages`` (the client sees them if the login is refused)."""

    def __init__(self, user: str, rhost: str, tty: str = "", service: str = PAM_SERVICE,
                 lib: Optional[_Libpam] = None):
        self._pam = lib or libpam()
        if self._pam is None:
            raise PamError("libpam is not available")
        self.user = user
        self.messages: List[str] = []
        self._conv_func = _CONV_FUNC(self._converse)  # kept: C holds only a pointer
        self._conv = _PamConv(self._conv_func, None)
        self._handle = ctypes.c_void_p()
        self._session_open = False
        self._cred = False
        status = self._pam.lib.pam_start(service.encode(), user.encode(),
                                         ctypes.byref(self._conv), ctypes.byref(self._handle))
        if status != PAM_SUCCESS:
            raise PamError(f"pam_start({service}, {user}) failed: status {status}")
        self._last = PAM_SUCCESS
        try:
            self._set(PAM_RHOST, rhost)
            self._set(PAM_RUSER, user)  # sshd sets the remote user to the local one
            if tty:
                self._set(PAM_TTY, tty)
        except PamError:
            self.close()
            raise

    def _set(self, item: int, value: str) -> None:
        self._check("pam_set_item", self._pam.lib.pam_set_item(
            self._handle, item, ctypes.c_char_p(value.encode())))

    def _check(self, call: str, status: int) -> None:
        self._last = status
        if status != PAM_SUCCESS:
            reason = self._pam.lib.pam_strerror(self._handle, status) or b"?"
            raise PamError(f"PAM {call} for {self.user}: {reason.decode(errors='replace')}",
                           self.messages)

    def _converse(self, count, messages, responses, _appdata) -> int:
        """(Called by libpam, on the thread that made the PAM call.)"""
        try:
            if count <= 0 or count > 64:
                return PAM_CONV_ERR
            replies = self._pam.calloc(count, ctypes.sizeof(_PamResponse))
            if not replies:
                return PAM_BUF_ERR
            for i in range(count):
                message = messages[i].contents
                text = (message.msg or b"").decode("utf-8", "replace")
                if message.msg_style in (PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON):
                    log.info("PAM asked %s a question (%s): moshpit answers none",
                             self.user, printable(text, 80))
                    self._pam.free(replies)
                    return PAM_CONV_ERR
                log.info("PAM %s for %s: %s", "error" if message.msg_style == PAM_ERROR_MSG
                         else "info", self.user, printable(text))
                if len(self.messages) < MAX_PAM_MESSAGES:
                    self.messages.append(text)
            responses[0] = ctypes.cast(replies, ctypes.POINTER(_PamResponse))
            return PAM_SUCCESS
        except Exception:  # never let an exception unwind through C
            log.exception("PAM conversation failed")
            return PAM_CONV_ERR

    def acct_mgmt(self) -> None:
        """pam_acct_mgmt: PamError if PAM refuses the account (expired, pam_nologin,
        pam_access, an expired password: moshpit cannot ask for a new one)."""
        self._check("account management", self._pam.lib.pam_acct_mgmt(self._handle, 0))

    def open_session(self) -> Dict[str, str]:
        """pam_setcred(ESTABLISH) and pam_open_session, in the process that becomes the
        session's parent (modules act on the calling process: pam_limits sets its limits,
        pam_loginuid its audit uid, pam_systemd moves it into a logind session). Returns
        the environment the modules set (XDG_RUNTIME_DIR, pam_env's variables)."""
        self._check("setcred", self._pam.lib.pam_setcred(self._handle, PAM_ESTABLISH_CRED))
        self._cred = True
        self._check("open_session", self._pam.lib.pam_open_session(self._handle, 0))
        self._session_open = True
        return self.environment()

    def environment(self) -> Dict[str, str]:
        """pam_getenvlist as a dict (at most MAX_PAM_ENV entries); the list is freed."""
        env: Dict[str, str] = {}
        array = self._pam.lib.pam_getenvlist(self._handle)
        if not array:
            return env
        i = 0
        while array[i]:
            entry = ctypes.string_at(array[i]).decode("utf-8", "surrogateescape")
            name, sep, value = entry.partition("=")
            if sep and name and len(env) < MAX_PAM_ENV:
                env[name] = value
            self._pam.free(array[i])
            i += 1
        self._pam.free(array)
        return env

    def close(self) -> None:
        """pam_close_session and pam_setcred(DELETE) if opened, then pam_end (idempotent)."""
        if not self._handle:
            return
        try:
            if self._session_open:
                self._session_open = False
                self._last = self._pam.lib.pam_close_session(self._handle, PAM_SILENT)
            if self._cred:
                self._cred = False
                self._pam.lib.pam_setcred(self._handle, PAM_DELETE_CRED | PAM_SILENT)
        finally:
            self._pam.lib.pam_end(self._handle, self._last)
            self._handle = ctypes.c_void_p()

    def __enter__(self) -> PamLogin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pam_account_refusal(user: str, rhost: str,
                        service: str = PAM_SERVICE) -> Optional[Refusal]:
    """PAM account management for ``user`` logging in from ``rhost``: a Refusal (the PAM
    reason for the log, the modules' messages for the client) or None."""
    try:
        with PamLogin(user, rhost, service=service) as pam:
            pam.acct_mgmt()
    except PamError as e:
        return Refusal(str(e), "\n".join(e.messages))
    return None


# ---------------------------------------------------------------------------
# utmp / wtmp / lastlog (glibc's struct utmp on Linux: 384 bytes, 32-bit times)
# ---------------------------------------------------------------------------

USER_PROCESS, DEAD_PROCESS = 7, 8
_UTMP = struct.Struct("<h2xi32s4s32s256shhiii16s20x")
UTMP_SIZE = _UTMP.size  # 384
_LASTLOG = struct.Struct("<i32s256s")  # 292
LOCK_WAIT_SECS = 1.0  # how long a record write waits for another writer's lock


@dataclass
class UtmpEntry:
    """A struct utmp; ``host`` is the client's address, ``addr`` its packed IP."""

    type: int
    pid: int
    line: str
    id: bytes
    user: str
    host: str
    time: float
    addr: bytes = b""
    session: int = 0
    # ut_exit of a DEAD_PROCESS record: how the process ended (the killing signal, the exit
    # status), as init records it.
    exit_signal: int = 0
    exit_status: int = 0

    def pack(self) -> bytes:
        secs = int(self.time)
        return _UTMP.pack(self.type, self.pid, self.line.encode()[:32], self.id[:4],
                          self.user.encode()[:32], self.host.encode()[:256], self.exit_signal,
                          self.exit_status, self.session, secs, int((self.time - secs) * 1e6),
                          self.addr.ljust(16, b"\0")[:16])

    @classmethod
    def unpack(cls, data: bytes) -> UtmpEntry:
        (kind, pid, line, id_, user, host, exit_signal, exit_status, session, secs, usecs,
         addr) = _UTMP.unpack(data)

        def text(raw: bytes) -> str:
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return cls(kind, pid, text(line), id_.rstrip(b"\0"), text(user), text(host),
                   secs + usecs / 1e6, addr, session, exit_signal, exit_status)


def _utmp_id(line: str) -> bytes:
    """ut_id of a moshpit record: "m" + the pty number in base 36 ("pts/12" -> b"mc"), so
    close_stale_records can tell moshpit's records from sshd's and login's (whose id is the
    end of the line name)."""
    number = line[4:] if line.startswith("pts/") else ""
    if number.isdigit() and int(number) < 36 ** 3:
        value, digits = int(number), ""
        while True:
            value, digit = divmod(value, 36)
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
            if not value:
                return ("m" + digits).encode()
    return line.encode()[-4:]


def _packed_address(address: str) -> bytes:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return b""
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.packed


def _lock(fd: int, deadline: float) -> bool:
    """An exclusive fcntl lock (glibc's utmp functions lock the same way), waiting a little."""
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _open_record_file(path: str, flags: int) -> Optional[int]:
    """A record file opened for writing, or None if it does not exist (it is created at boot
    by the system; mps never creates it)."""
    try:
        return os.open(path, flags | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        _log_once("missing " + path, logging.INFO, "%s does not exist: no records there",
                  path)
    except OSError as e:
        log.warning("cannot open %s: %s", path, e.strerror or e)
    return None


def _update_record_file(path: str, flags: int, update: Callable[[int], None],
                        lock: bool = True) -> bool:
    """Open the record file ``path`` (it must exist), take its lock if ``lock``, and let
    ``update(fd)`` write; False, with the reason logged, if any of that fails."""
    fd = _open_record_file(path, flags)
    if fd is None:
        return False
    try:
        if lock and not _lock(fd, time.monotonic() + LOCK_WAIT_SECS):
            log.warning("%s is locked by another program: record not written", path)
            return False
        update(fd)
        return True
    except OSError as e:
        log.warning("cannot write %s: %s", path, e.strerror or e)
        return False
    finally:
        os.close(fd)


def write_utmp(entry: UtmpEntry, path: str = UTMP_PATH) -> bool:
    """Put ``entry`` in utmp in place of the record with the same ut_id or ut_line (as
    pututline and login do), else append it. False if the file is missing or busy."""
    def update(fd: int) -> None:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size - size % UTMP_SIZE, 0)
        offset = size - size % UTMP_SIZE
        for at in range(0, len(data), UTMP_SIZE):
            old = UtmpEntry.unpack(data[at:at + UTMP_SIZE])
            if old.type in (USER_PROCESS, DEAD_PROCESS) and (old.id == entry.id
                                                               or old.line == entry.line):
                offset = at
                break
        os.pwrite(fd, entry.pack(), offset)
    return _update_record_file(path, os.O_RDWR, update)


def read_utmp(path: str = UTMP_PATH) -> List[UtmpEntry]:
    """Every record of a utmp/wtmp file (for close_stale_records and tests)."""
    data = _read_bounded(path, 64 << 20) or b""
    return [UtmpEntry.unpack(data[at:at + UTMP_SIZE])
            for at in range(0, len(data) - UTMP_SIZE + 1, UTMP_SIZE)]


def append_wtmp(entry: UtmpEntry, path: str = WTMP_PATH) -> bool:
    """Append ``entry`` to wtmp (as updwtmp: a torn tail is cut off first)."""
    def update(fd: int) -> None:
        size = os.fstat(fd).st_size
        if size % UTMP_SIZE:
            os.ftruncate(fd, size - size % UTMP_SIZE)
        os.pwrite(fd, entry.pack(), size - size % UTMP_SIZE)
    return _update_record_file(path, os.O_WRONLY, update)


def write_lastlog(uid: int, line: str, host: str, when: float,
                  path: str = LASTLOG_PATH) -> bool:
    """The user's lastlog record (``lastlog`` shows it), if the file exists. Unlocked, as
    login writes it: each user has their own fixed slot."""
    record = _LASTLOG.pack(int(when), line.encode()[:32], host.encode()[:256])
    return _update_record_file(path, os.O_WRONLY,
                               lambda fd: os.pwrite(fd, record, uid * _LASTLOG.size),
                               lock=False)


class LoginRecord:
    """The utmp/wtmp/lastlog trace of one login on one PTY: ``open()`` when the shell has
    started (``who`` lists it), ``close()`` when the session ends (``last`` shows its span).
    Root only (the files are root's); without root both do nothing."""

    def __init__(self, user: str, uid: int, tty_path: str, pid: int, client_address: str,
                 paths: Tuple[str, str, str] = (UTMP_PATH, WTMP_PATH, LASTLOG_PATH)):
        self.user, self.uid, self.pid = user, uid, pid
        self.line = tty_path[len("/dev/"):] if tty_path.startswith("/dev/") else tty_path
        self.host = client_address
        self.utmp_path, self.wtmp_path, self.lastlog_path = paths
        self.opened = False

    def _entry(self, kind: int, user: str, host: str) -> UtmpEntry:
        return UtmpEntry(kind, self.pid, self.line, _utmp_id(self.line), user, host,
                         time.time(), _packed_address(host) if host else b"",
                         session=self.pid)

    def open(self) -> None:
        if os.geteuid() != 0:
            _log_once("records-root", logging.INFO,
                      "not running as root: no utmp/wtmp/lastlog records")
            return
        entry = self._entry(USER_PROCESS, self.user, self.host)
        write_utmp(entry, self.utmp_path)
        append_wtmp(entry, self.wtmp_path)
        write_lastlog(self.uid, self.line, self.host, entry.time, self.lastlog_path)
        self.opened = True

    def close(self, exit_signal: int = 0, exit_status: int = 0) -> None:
        """The logout records (idempotent), with how the shell ended if known (ut_exit)."""
        if self.opened:
            self.opened = False
            dead = self._entry(DEAD_PROCESS, "", "")
            dead.exit_signal, dead.exit_status = exit_signal, exit_status
            write_utmp(dead, self.utmp_path)
            append_wtmp(dead, self.wtmp_path)


def _alive_since(pid: int, when: float) -> bool:
    """Whether ``pid`` runs and started no later than ``when`` (a later start: the number
    was reused, the recorded process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError):
        return False
    if fields[0] == b"Z":
        return False
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= when + 2.0  # /proc's boot time is rounded to the second


def close_stale_records(utmp_path: str = UTMP_PATH, wtmp_path: str = WTMP_PATH) -> int:
    """At listener start: close moshpit's utmp records whose shell is gone (the session ended
    while no listener was there to record it), in utmp and in wtmp. Returns how many."""
    if os.geteuid() != 0:
        return 0
    closed = 0
    for entry in read_utmp(utmp_path):
        if (entry.type == USER_PROCESS and entry.id.startswith(b"m")
                and entry.id == _utmp_id(entry.line) and not _alive_since(entry.pid,
                                                                          entry.time)):
            dead = UtmpEntry(DEAD_PROCESS, entry.pid, entry.line, entry.id, "", "",
                             time.time(), session=entry.session)
            if write_utmp(dead, utmp_path):
                append_wtmp(dead, wtmp_path)
                closed += 1
                log.info("closed the login record of %s on %s (pid %d had ended while mps"
                         " was down)", entry.user, entry.line, entry.pid)
    return closed


# ---------------------------------------------------------------------------
# The shell's process: audit login uid, resource limits
# ---------------------------------------------------------------------------

LOGINUID_PATH = "/proc/self/loginuid"


def loginuid_supported() -> bool:
    """Whether this kernel keeps an audit login uid (logged once where it does not)."""
    if os.path.exists(LOGINUID_PATH):
        return True
    _log_once("loginuid", logging.INFO, "%s does not exist (no audit in this kernel): login"
              " uids are not recorded", LOGINUID_PATH)
    return False


def write_loginuid(uid: int) -> None:
    """(Child, before the uid change.) The audit login uid, as pam_loginuid writes it; a
    kernel without audit (ENOENT) or a container without CAP_AUDIT_CONTROL (EPERM) leaves
    it unset, as sshd does. No logging here: this runs between fork and exec."""
    try:
        fd = os.open(LOGINUID_PATH, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, str(uid).encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def client_address(peer: tuple) -> str:
    """The client's IP from a socket address, IPv4-mapped IPv6 shown as IPv4."""
    host = peer[0] if peer else "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(ip.ipv4_mapped) if ip.version == 6 and ip.ipv4_mapped else str(ip)



TTY_GROUP = "tty"


def open_user_terminal(pw: pwd.struct_passwd) -> Tuple[int, int]:
    """(Session process, root, before the uid change.) A new PTY (master, slave) whose slave
    is the user's as sshd leaves it: owner the user, group ``tty`` with mode 0620 (so that
    write(1) and wall, setgid tty, reach it), or the user's own group with 0600 where there
    is no tty group. Opened while root so that the PAM session can name it (PAM_TTY)."""
    try:
        gid, mode = grp.getgrnam(TTY_GROUP).gr_gid, 0o620
    except KeyError:
        gid, mode = pw.pw_gid, 0o600
    master, slave = os.openpty()
    try:
        os.fchown(slave, pw.pw_uid, gid)
        os.fchmod(slave, mode)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return master, slave
