"""moshpit trust: the files that say whom to trust, read safely.

Server side, ``authorized_keys``: the keys that may log in as a user. The server reads it as
root from a directory that user controls, so it is read as sshd's StrictModes demand, and
more carefully than a plain ``open()`` by name, because a user who is not authorized at all
can change what lies at that path at any moment (swap the file for a symlink to a root-only
file, a FIFO that never answers, or a terminal that root would acquire as its controlling
terminal):

* The home directory's path comes from the password database (root's territory) and is
  resolved once with ``realpath``, so root-made symlinks above it (``/home -> /usr/home``)
  keep working. From ``/`` down to the file every component is then opened relative to its
  parent's fd with ``O_NOFOLLOW`` (directories with ``O_DIRECTORY``), so nothing can be
  swapped between a check and the read: every decision is an ``fstat`` of the fd read.
* A symlink anywhere from the home down (or anywhere on the way, for a file outside the
  home) is refused, and the log says so.
* Ownership and modes as sshd's StrictModes: the file and every directory from it up to the
  home directory (the home included; up to ``/`` for a file outside the home) are owned by
  the user or root and not group/world writable; reading bits do not matter (0644 is fine).
  A root-owned sticky directory (``/tmp``) is allowed: others cannot replace our entries.
* The file must be a regular file (no FIFO, device or terminal), and a root-owned file with
  more than one link is refused: it may be a hard link the user made to a root-only file.
  Opening is ``O_NONBLOCK|O_NOCTTY`` (a FIFO cannot hang the server, a terminal cannot
  become its controlling terminal), and what is not a regular file by ``lstat`` is never
  opened at all.
* At most moshpit_keys.MAX_AUTHORIZED_KEYS bytes are read.

Client side, ``known_hosts``: whether to trust a server's host key (the user's own file,
read as that user): lookup, recording and OpenSSH's first-contact prompt.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import stat
from typing import Callable, List, Optional, Tuple

from moshpit import (
    AUTHORIZED_KEYS_FILE,
    DEFAULT_TCP_PORT,
    HOST_KEY_POLICIES,
    MoshpitError,
    make_private_dirs,
)
from moshpit_keys import (
    KEY_TYPE,
    MAX_AUTHORIZED_KEYS,
    PublicKey,
    parse_authorized_keys,
    parse_public_key_line,
)

__all__ = [
    "HOST_KEY_POLICIES",
    "HostKeyError",
    "KnownHosts",
    "TrustError",
    "authorized_keys_for",
    "authorized_keys_path",
    "verify_host_key_policy",
]

log = logging.getLogger("moshpit.trust")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


class TrustError(MoshpitError):
    """A user's authorized_keys cannot be trusted or read (unsafe owner or mode, a symlink,
    not a regular file, missing, too large). ``str()`` is the full reason for the server's
    log; the client is only ever told "permission denied"."""


class HostKeyError(MoshpitError):
    """The server's host key is not trusted (unknown and refused, or changed): final."""


# ---------------------------------------------------------------------------
# Reading a file a user controls
# ---------------------------------------------------------------------------


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_owner(path: str, st: os.stat_result, pw: pwd.struct_passwd) -> None:
    if st.st_uid not in (pw.pw_uid, 0):
        raise TrustError(f"{path} is owned by {_owner_name(st.st_uid)},"
                         f" must be owned by {pw.pw_name} or root")


def _check_not_writable_by_others(path: str, st: os.stat_result,
                                  pw: pwd.struct_passwd) -> None:
    """Owned by the user or root and not group/world writable, as sshd's StrictModes: nobody
    else can replace what lies at or below ``path``. A root-owned sticky directory (like
    /tmp) is safe: others cannot rename or delete our entries in it."""
    _check_owner(path, st, pw)
    sticky_root = stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and not sticky_root:
        raise TrustError(f"{path} is mode {stat.S_IMODE(st.st_mode):04o},"
                         " must not be group/world writable")


def _symlink_refusal(path: str) -> TrustError:
    return TrustError(f"{path} is a symlink: refused (symlinks are not followed in a user's"
                      " authorized_keys path)")


def _check_regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_refusal(path)
    if stat.S_ISFIFO(st.st_mode):
        raise TrustError(f"{path} is a FIFO, not a regular file: refused")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        raise TrustError(f"{path} is a device, not a regular file: refused")
    if not stat.S_ISREG(st.st_mode):
        raise TrustError(f"{path} is not a regular file")


def _refusal(err: OSError, path: str, parent_fd: int, name: str) -> TrustError:
    """The log reason for a failed no-follow open of ``name`` in ``parent_fd``."""
    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                return _symlink_refusal(path)
        except OSError:
            pass
        if err.errno == errno.ENOTDIR:
            return TrustError(f"{path} is not a directory")
    if err.errno == errno.ENOENT:
        return TrustError(f"{path} does not exist")
    return TrustError(f"{path}: {err.strerror or err}")


def _read_fd_bounded(fd: int, limit: int, path: str) -> bytes:
    """At most ``limit`` bytes from ``fd`` (a regular file), or TrustError if larger."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise TrustError(f"{path} is too large (over {limit} bytes)")
    return b"".join(chunks)


def _split(path: str) -> List[str]:
    return [part for part in path.split("/") if part]


class _Walk:
    """Opens one path component by component from ``/``, each relative to its parent's fd
    and without following symlinks; directories entered with ``check`` (and the file) get the
    StrictModes checks on their own fd. Closes every fd it opened."""

    def __init__(self, pw: pwd.struct_passwd) -> None:
        self.pw = pw
        self.fd = os.open("/", _DIR_FLAGS)
        self.path = "/"

    def close(self) -> None:
        os.close(self.fd)

    def enter(self, name: str, check: bool) -> None:
        """Step into directory ``name``."""
        path = os.path.join(self.path, name)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as err:
            raise _refusal(err, path, self.fd, name) from None
        os.close(self.fd)
        self.fd, self.path = fd, path
        if check:
            _check_not_writable_by_others(path, os.fstat(fd), self.pw)

    def read_file(self, name: str, limit: int) -> bytes:
        """The checked contents of regular file ``name`` in the current directory."""
        path = os.path.join(self.path, name)
        try:
            # What is not a regular file is never opened (opening a device can have effects);
            # a swap after this lstat is caught by O_NOFOLLOW and the fstat of what was opened.
            _check_regular(path, os.stat(name, dir_fd=self.fd, follow_symlinks=False))
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        except OSError as err:
            raise _refusal(err, path, self.fd, name) from None
        try:
            st = os.fstat(fd)
            _check_regular(path, st)
            _check_not_writable_by_others(path, st, self.pw)
            if st.st_uid != self.pw.pw_uid and st.st_nlink > 1:
                raise TrustError(f"{path} is owned by {_owner_name(st.st_uid)} and has"
                                 f" {st.st_nlink} links: refused (it may be a hard link to a"
                                 f" file {self.pw.pw_name} may not read)")
            return _read_fd_bounded(fd, limit, path)
        finally:
            os.close(fd)


def _anchor(path: str, home: str) -> Tuple[str, List[str], int]:
    """(trusted directory, components below it, depth of the first directory to check,
    ``/`` being depth 0). Under the home: the resolved home, checked from the home down.
    Elsewhere (a file the administrator placed): its resolved directory, checked from /."""
    home = os.path.normpath(home)
    if path.startswith(home.rstrip("/") + "/"):
        real_home = os.path.realpath(home)
        return real_home, _split(path[len(home):]), len(_split(real_home))
    return os.path.realpath(os.path.dirname(path)), [os.path.basename(path)], 0


def read_user_file(path: str, pw: pwd.struct_passwd, limit: int) -> bytes:
    """The bytes of ``path``, a file under the control of ``pw``'s user, read as the module
    docstring says (no symlinks, StrictModes, regular file only, at most ``limit`` bytes).
    Raises TrustError naming the path and the problem."""
    if not os.path.isabs(path):  # e.g. an account without a home directory
        raise TrustError(f"{path} is not an absolute path (is {pw.pw_name}'s home directory"
                         " set?)")
    base, below, checked_from = _anchor(os.path.normpath(path), pw.pw_dir)
    try:
        walk = _Walk(pw)
        try:
            if checked_from == 0:
                _check_not_writable_by_others("/", os.fstat(walk.fd), pw)
            for depth, name in enumerate(_split(base) + below[:-1], 1):
                walk.enter(name, check=depth >= checked_from)
            return walk.read_file(below[-1], limit)
        finally:
            walk.close()
    except OSError as err:  # e.g. EMFILE, EIO, EACCES for a server without root
        raise TrustError(f"{path}: {err.strerror or err}") from None


# ---------------------------------------------------------------------------
# Server policy: authorized_keys
# ---------------------------------------------------------------------------


def authorized_keys_path(pw: pwd.struct_passwd, template: Optional[str] = None) -> str:
    """Where ``pw``'s user's authorized keys are: ``template`` as sshd's AuthorizedKeysFile
    reads it (``%h`` the user's home, ``%u`` the user name, ``%%`` a percent sign; a
    relative path or ``~/`` starts at the user's home), or ~user/.mp/authorized_keys."""
    if not template:
        return os.path.join(pw.pw_dir, ".mp", AUTHORIZED_KEYS_FILE)
    tokens = {"%h": pw.pw_dir, "%u": pw.pw_name, "%%": "%"}
    path = re.sub(r"%.", lambda m: tokens.get(m.group(0), m.group(0)), template)
    if path == "~" or path.startswith("~/"):
        path = path[2:]
    return os.path.join(pw.pw_dir, path)  # an absolute ``path`` stays as it is


def authorized_keys_for(pw: pwd.struct_passwd, template: Optional[str] = None) -> List[PublicKey]:
    """The keys that may log in as ``pw``'s user, from ``authorized_keys_path(pw, template)``,
    read safely (see the module docstring). Any problem raises TrustError whose message
    names the path and the problem; lines that are not keys are skipped with a warning."""
    path = authorized_keys_path(pw, template)
    return parse_authorized_keys(read_user_file(path, pw, MAX_AUTHORIZED_KEYS), path)


# ---------------------------------------------------------------------------
# Client policy: known_hosts
# ---------------------------------------------------------------------------

_MAX_KNOWN_HOSTS = 4 << 20  # bytes
_MAX_PROMPTS = 5


class KnownHosts:
    """The client's ``known_hosts``: lines ``HOST KEYTYPE BASE64`` (``[HOST]:PORT`` for a port
    other than 40404; several hosts may share a line, comma-separated)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def host_pattern(host: str, port: int) -> str:
        host = host.lower()
        return host if port == DEFAULT_TCP_PORT else f"[{host}]:{port}"

    def _lines(self) -> List[str]:
        try:
            # The user's own file, read as the user: a symlink (dotfile managers) or /dev/null
            # is fine; a FIFO or terminal there must not hang or capture the client.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise HostKeyError(f"cannot read {self.path}: {err.strerror or err}") from None
        try:
            data = _read_fd_bounded(fd, _MAX_KNOWN_HOSTS, self.path)
        except TrustError as err:
            raise HostKeyError(str(err)) from None
        except OSError as err:
            raise HostKeyError(f"cannot read {self.path}: {err.strerror or err}") from None
        finally:
            os.close(fd)
        return data.decode("utf-8", "replace").split("\n")

    def lookup(self, host: str, port: int, key: PublicKey) -> Tuple[str, Optional[int]]:
        """("ok", line) if the key is recorded for the host, ("changed", line of the first
        other key recorded for it), or ("unknown", None)."""
        pattern = self.host_pattern(host, port)
        changed = None
        for lineno, line in enumerate(self._lines(), 1):
            fields = line.split(None, 1)
            if len(fields) < 2 or pattern not in fields[0].lower().split(","):
                continue
            try:
                recorded = parse_public_key_line(fields[1])
            except ValueError:
                log.debug("%s:%d: skipped: not a key moshpit understands", self.path, lineno)
                continue
            if recorded == key:
                return "ok", lineno
            if changed is None:
                changed = lineno
        return ("changed", changed) if changed is not None else ("unknown", None)

    def add(self, host: str, port: int, key: PublicKey) -> None:
        """Append the host's key: one O_APPEND write (atomic for a line this size, also with
        several clients at once), file created 0600 in a directory created 0700."""
        line = f"{self.host_pattern(host, port)} {PublicKey.from_raw(key.raw).to_line(KEY_TYPE)}\n"
        directory = os.path.dirname(self.path)
        try:
            if directory:
                make_private_dirs(directory)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOCTTY, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = "\n" + line
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise HostKeyError(f"cannot record the host key in {self.path}:"
                               f" {err.strerror or err}") from None


def _confirm_new_host(pattern: str, key: PublicKey, ask: Callable[[str], str]) -> bool:
    """OpenSSH's first-contact prompt: yes, no, or the fingerprint pasted back."""
    fingerprint = key.fingerprint()
    prompt = (f"The authenticity of host '{pattern}' can't be established.\n"
              f"ED25519 key fingerprint is {fingerprint}.\n{key.randomart()}\n"
              "Are you sure you want to continue connecting (yes/no/[fingerprint])? ")
    for _ in range(_MAX_PROMPTS):
        try:
            answer = ask(prompt)
        except EOFError:
            return False
        if isinstance(answer, bool):  # the caller asked the question its own way
            return answer
        answer = answer.strip()
        if answer.lower() in ("", "no"):
            return False
        if answer.lower() == "yes" or answer == fingerprint:
            return True
        prompt = "Please type 'yes', 'no' or the fingerprint: "
    return False


def verify_host_key_policy(known_hosts_path: str, host: str, port: int, key: PublicKey,
                           policy: str, tty: bool,
                           ask: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """Trust ``key`` for ``host`` ``port`` per ``policy`` or raise HostKeyError; never a
    silent accept. ``policy`` (strict_host_key_checking): "ask" prompts on a TTY (``ask``
    shows the prompt and returns the typed answer, "yes"/"no"/a fingerprint, or a bool if it
    put the question itself; EOFError means no; without ``ask`` nobody can be asked, as
    without a TTY), "accept-new" records unknown hosts, "yes" only trusts recorded keys. A
    changed key is always refused.

    Returns the notice the user should see when a key was recorded (OpenSSH's "Permanently
    added" line), else None: this module never writes to the terminal itself."""
    if policy not in HOST_KEY_POLICIES:
        raise HostKeyError(f"strict_host_key_checking must be one of"
                           f" {', '.join(HOST_KEY_POLICIES)}, not {policy!r}")
    known = KnownHosts(known_hosts_path)
    pattern = known.host_pattern(host, port)
    status, lineno = known.lookup(host, port, key)
    if status == "ok":
        return None
    fingerprint = key.fingerprint()
    if status == "changed":
        raise HostKeyError(
            f"WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED for {pattern}!\n"
            "Someone could be eavesdropping on you right now (man-in-the-middle attack),"
            " or the host key has just been changed.\n"
            f"The server now presents the ED25519 key {fingerprint}.\n"
            f"Offending key in {known_hosts_path}:{lineno}: remove that line if you know"
            " the change is legitimate.\nHost key verification failed.")
    if policy == "yes":
        raise HostKeyError(
            f"host key verification failed: no key is recorded for {pattern} in"
            f" {known_hosts_path} and strict host key checking is 'yes'; the server presents"
            f" {fingerprint}: after checking it, add the server's key to that file")
    if policy == "ask" and not (tty and ask is not None):
        raise HostKeyError(
            f"host key verification failed: {pattern} is not a known host and there is no"
            f" terminal to ask about its key {fingerprint}; after checking the fingerprint,"
            " run once with --strict-host-key-checking accept-new, or add the server's key"
            f" line ('{pattern} ssh-ed25519 ...') to {known_hosts_path}")
    if policy == "ask" and not _confirm_new_host(pattern, key, ask):
        raise HostKeyError(f"host key verification failed: the key of {pattern} was not"
                           " accepted")
    known.add(host, port, key)
    log.warning("permanently added %s (%s) to %s", pattern, fingerprint, known_hosts_path)
    return f"Warning: Permanently added '{pattern}' (ED25519) to the list of known hosts."
