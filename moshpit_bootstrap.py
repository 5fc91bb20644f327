"""Bootstrap over ssh (``mp --ssh [user@]host``): a session with nothing installed by hand.

The client runs the system ``ssh`` with a short ``/bin/sh`` command that finds a Python 3.9 or
newer on the server (``python3``, ``python3.13`` ... ``python3.9``, platform-python; one with
``cryptography`` first) and starts it with ``-c STAGE1``. Over ssh's stdin (``-T``: no PTY,
binary safe) the client then streams, in this order:

    <len>\\n <stub>           the remote stub (REMOTE_STUB), exec'd by STAGE1
    <json header>\\n          bundle size and SHA-256, cache wanted, this session's client
                             public key, how long to wait for the client
    <bundle>                 moshpit's modules: the zip ``make dist`` builds (moshpit.pyz);
                             with --ssh-cache only after the server says MOSHPIT SEND (no
                             copy with that hash in ~/.cache/moshpit; else MOSHPIT CACHED)

The stub checks ``cryptography`` (imports, version, and that Ed25519/X25519/ChaCha20 work),
imports the modules from the bundle *in memory* (BundleImporter: nothing is written on the
server, no bytecode either), and calls ``run_remote`` with mps: a one-session server
(mps.OneSessionServer) bound to the address ssh connected to (SSH_CONNECTION's server part)
on a port from the UDP port range, with a fresh host key made for this session, that admits
only this session's client key. It answers with one line, like mosh's ``MOSH CONNECT``::

    MOSHPIT CONNECT <port> <user> <address> <base64 host key blob>

then detaches (double fork, setsid, stdio on /dev/null), so ssh ends and the session goes on
as any other (resume, quit, exit status). ssh authenticated both ends, so its channel is a
safe place for the keys: the client pins the host key from that line (no known_hosts entry)
and authenticates with a key that exists only in its memory (no authorized_keys entry).

Failures come back as ``MOSHPIT ERROR <code> <detail>`` (no-python, no-cryptography,
old-cryptography, server) and become one line naming what to install (explain_remote_error).
Everything read from ssh's output is bounded (OutputReader).

This module: the wire format (sans-IO), the remote stub, the bundle, and thin blocking
drivers (the ssh process on the client; detaching on the server).
"""

from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import io
import ipaddress
import json
import os
import re
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
import zipfile
from typing import List, NamedTuple, Optional

import moshpit
import moshpit_keys as keys
import moshpit_trust as trust
from moshpit import MoshpitError

# Interpreters the remote shell tries, in order (a Python with cryptography wins).
PYTHON_CANDIDATES = ("python3", "python3.13", "python3.12", "python3.11", "python3.10",
                     "python3.9", "/usr/libexec/platform-python")
MIN_PYTHON = (3, 9)
MIN_CRYPTOGRAPHY = (3, 4)
NO_PYTHON_STATUS = 97  # the remote shell found no Python >= 3.9 (sshuttle's number)
REMOTE_ERROR_STATUS = 3  # the stub reported a MOSHPIT ERROR

CONNECT_PREFIX = "MOSHPIT CONNECT "
ERROR_PREFIX = "MOSHPIT ERROR "
SEND_LINE = "MOSHPIT SEND"  # --ssh-cache: the server has no copy of the bundle
CACHED_LINE = "MOSHPIT CACHED"  # --ssh-cache: it has (same SHA-256)
MAX_LINE_BYTES = 1024  # a protocol line; longer output lines are passed on in pieces
MAX_NOISE_BYTES = 64 * 1024  # login banners and rc-file output shown before the CONNECT line
MAX_DETAIL_CHARS = 300  # an error line's detail
MAX_HEADER_BYTES = 4096  # the JSON header the stub reads
MAX_BUNDLE_BYTES = 16 << 20
MAX_STDERR_KEPT = 16 * 1024  # ssh's stderr, kept for the error summary

CONNECT_WAIT_SECS = 120.0  # ssh may ask for a password first (OpenSSH LoginGraceTime: 120 s)
SSH_EXIT_WAIT_SECS = 10.0  # after the CONNECT line, for ssh to see the server detach
SSH_G_TIMEOUT_SECS = 3.0  # `ssh -G` only prints its configuration
UNUSED_EXIT_SECS = 60.0  # the one-session server exits if nobody connects this soon (mosh)

# ssh options that come after the user's own (ssh keeps the first value it sees for an
# option): no PTY (it would mangle the binary stream), no forwardings (nothing listens on
# the user's behalf while the bootstrap runs: ET#228's clash), no agent.
SSH_OPTIONS = ("-T", "-o", "ClearAllForwardings=yes", "-o", "ForwardAgent=no",
               "-o", "ForwardX11=no")

INSTALL_CRYPTOGRAPHY = ("install it on the server: `apt install python3-cryptography`, "
                        "`dnf install python3-cryptography`, `apk add py3-cryptography` "
                        "or `pip install --user cryptography`")
INSTALL_PYTHON = ("install Python 3.9 or newer on the server (`apt install python3`, "
                  "`dnf install python3`, `apk add python3`)")

# Stage 1, run by `python -c`: exec the stub whose length leads stdin. It sits inside the
# double quotes of STAGE0, which sits inside single quotes: no quotes, $, `, \\ or ! at all.
STAGE1 = "import sys;b=sys.stdin.buffer;exec(b.read(int(b.readline(20))))"

# Stage 0, the remote shell command: pick a Python >= 3.9, one with cryptography first.
STAGE0 = (
    "F=; M=; for P in " + " ".join(PYTHON_CANDIDATES) + "; do "
    "command -v $P >/dev/null 2>&1 || continue; "
    "if $P -c \"import sys; sys.exit(sys.version_info < " + repr(MIN_PYTHON) + ")\" "
    "2>/dev/null; then "
    "$P -c \"import cryptography\" 2>/dev/null && exec $P -c \"" + STAGE1 + "\"; "
    "M=${M:-$P}; "
    "else F=\"$F $P=$($P -V 2>&1)\"; fi; "
    "done; "
    "[ -n \"$M\" ] && exec $M -c \"" + STAGE1 + "\"; "
    "echo \"MOSHPIT ERROR no-python ${F:- none found}\"; "
    f"exit {NO_PYTHON_STATUS}")


def remote_command() -> str:
    """What ssh asks the server to run: STAGE0 through /bin/sh, whatever the login shell is
    (bash, zsh, csh and fish all read ``exec /bin/sh -c '...'`` alike)."""
    return f"exec /bin/sh -c '{STAGE0}'"


# The stub: exec'd by STAGE1 with Python >= 3.9 on the server. It must not need moshpit
# (it checks what moshpit needs first) and writes nothing on the server.
REMOTE_STUB = r'''
import hashlib, importlib.util, io, json, os, re, sys, zipfile

def fail(code, detail):
    sys.stdout.write("MOSHPIT ERROR %s %s\n" % (code, " ".join(str(detail).split())[:300]))
    sys.stdout.flush()
    sys.exit(3)

where = "Python %s (%s)" % (sys.version.split()[0], sys.executable)
try:
    import cryptography
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    Ed25519PrivateKey.generate().sign(b"moshpit")
    X25519PrivateKey.generate().public_key()
    ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), b"moshpit", None)
except Exception as e:
    fail("no-cryptography", "%s: %s: %s" % (where, type(e).__name__, e))
if tuple(int(n) for n in re.findall(r"\d+", cryptography.__version__)[:2]) < MIN_CRYPTOGRAPHY:
    fail("old-cryptography", "%s has cryptography %s" % (where, cryptography.__version__))

class BundleImporter:
    """Imports moshpit's top-level modules from the zip bytes in memory (before any other
    finder: a moshpit.py in the login directory must not shadow them)."""

    def __init__(self, archive):
        self.archive = archive
        self.names = set(archive.namelist())

    def find_spec(self, name, path=None, target=None):
        if "." in name or name + ".py" not in self.names:
            return None
        spec = importlib.util.spec_from_loader(name, self, origin="mp-ssh-bundle/%s.py" % name)
        spec.has_location = True  # a __file__ (a name only: moshpit.bundle_path() reads it)
        return spec

    def create_module(self, spec):
        return None

    def get_source(self, name):
        return self.archive.read(name + ".py").decode("utf-8")

    def exec_module(self, module):
        code = compile(self.get_source(module.__name__), module.__spec__.origin, "exec")
        exec(code, module.__dict__)

def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

def cache_path(digest):
    """mp --ssh-cache: where the bundle is kept, named by its SHA-256."""
    top = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(top, "moshpit", "moshpit-%s.pyz" % digest)

def from_cache(path, digest):
    """The cached bundle if it is there and its hash is the one the client sent."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BUNDLE_BYTES + 1)
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == digest else None

def to_cache(path, data):
    """Keep the bundle (0600 in a 0700 directory, written aside then renamed) in place of
    any other version; best effort: a session does not need its cache."""
    directory = os.path.dirname(path)
    aside = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.makedirs(directory, 0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(aside, path)
        for name in os.listdir(directory):
            other = os.path.join(directory, name)
            if name.startswith("moshpit-") and name.endswith(".pyz") and other != path:
                os.unlink(other)
    except OSError:
        pass

stdin = sys.stdin.buffer
params = json.loads(stdin.readline(MAX_HEADER_BYTES))
size, digest, cache = params["bundle_bytes"], params["bundle_sha256"], params.get("cache")
if not (0 < size <= MAX_BUNDLE_BYTES and re.fullmatch("[0-9a-f]{64}", digest)):
    fail("server", "bad bundle size or hash")
bundle = from_cache(cache_path(digest), digest) if cache else None
if bundle is not None:
    say("MOSHPIT CACHED")
else:
    if cache:
        say("MOSHPIT SEND")
    bundle = stdin.read(size)
    if len(bundle) != size or hashlib.sha256(bundle).hexdigest() != digest:
        fail("server", "the bundle was cut short or damaged (%d of %d bytes)" % (len(bundle), size))
    if cache:
        to_cache(cache_path(digest), bundle)
sys.dont_write_bytecode = True
sys.meta_path.insert(0, BundleImporter(zipfile.ZipFile(io.BytesIO(bundle))))
try:
    import moshpit_bootstrap, mps
except Exception as e:
    fail("server", "cannot load moshpit: %s: %s" % (type(e).__name__, e))
sys.exit(moshpit_bootstrap.run_remote(params, mps))
'''.replace("MIN_CRYPTOGRAPHY", repr(MIN_CRYPTOGRAPHY)).replace(
    "MAX_HEADER_BYTES", str(MAX_HEADER_BYTES)).replace("MAX_BUNDLE_BYTES", str(MAX_BUNDLE_BYTES))


# ---------------------------------------------------------------------------
# The bundle and what the client sends
# ---------------------------------------------------------------------------

PROGRAMS = ("mps.py", "mp.py", "mp_keygen.py")


def bundle_bytes() -> bytes:
    """moshpit's modules as the zip ``make dist`` builds, sources only: the running
    moshpit.pyz's .py entries, or from a checkout the same files (moshpit*.py, the three
    programs, moshpit_pyz.py as __main__.py), zipped in memory. The bundle's .pyc are left
    out: the stub compiles the sources (it writes no bytecode), and they would triple what
    ssh carries. Each entry keeps its date, so the same files give the same bytes (the
    --ssh-cache hash)."""
    archive = getattr(globals().get("__loader__"), "archive", None)  # zipimport: the .pyz
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        if archive:
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    if info.filename.endswith(".py"):
                        z.writestr(info, bundle.read(info))
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            names = sorted(os.path.basename(path)
                           for path in glob.glob(os.path.join(here, "moshpit*.py")))
            for name in [n for n in names if n != "moshpit_pyz.py"] + list(PROGRAMS):
                z.write(os.path.join(here, name), name)
            z.write(os.path.join(here, "moshpit_pyz.py"), "__main__.py")
    return out.getvalue()


def preamble(bundle: bytes, client_key: keys.PublicKey, cache: bool = False,
             unused_exit_secs: float = UNUSED_EXIT_SECS) -> bytes:
    """What the client writes to ssh's stdin before the bundle: the stub and its header
    (the module docstring's layout). The bundle follows at once, or with ``cache`` only if
    the server answers MOSHPIT SEND (it had no copy with the bundle's SHA-256)."""
    stub = REMOTE_STUB.encode()
    header = json.dumps({"bundle_bytes": len(bundle),
                         "bundle_sha256": hashlib.sha256(bundle).hexdigest(), "cache": cache,
                         "client_key": base64.b64encode(client_key.blob).decode("ascii"),
                         "unused_exit_secs": unused_exit_secs}).encode()
    return b"%d\n" % len(stub) + stub + header + b"\n"


# ---------------------------------------------------------------------------
# The CONNECT line (sans-IO)
# ---------------------------------------------------------------------------


class Connect(NamedTuple):
    """What the one-session server announced: where it listens, as whom, with which key."""
    port: int
    user: str
    address: str
    host_key: keys.PublicKey


_CONNECT_RE = re.compile(r"MOSHPIT CONNECT (\d{1,5}) ([!-~]{1,64}) ([0-9A-Fa-f.:]{1,45}) "
                         r"([A-Za-z0-9+/]{1,128}={0,2})\Z")


def connect_line(connect: Connect) -> str:
    return (f"{CONNECT_PREFIX}{connect.port} {connect.user} {connect.address} "
            f"{base64.b64encode(connect.host_key.blob).decode('ascii')}")


def parse_connect_line(line: str) -> Connect:
    """The CONNECT line's fields, each checked (port in range, user without ':' or '/', an
    IP address, a well-formed ssh-ed25519 blob); anything else is a MoshpitError."""
    m = _CONNECT_RE.match(line)
    port = int(m.group(1)) if m else 0
    if not m or not 1 <= port <= 65535 or any(c in m.group(2) for c in ":/"):
        raise MoshpitError(f"the server's bootstrap sent a malformed line: "
                           f"{moshpit.printable(line, 80)!r}")
    try:
        address = str(ipaddress.ip_address(m.group(3)))
        host_key = keys.PublicKey.from_blob(base64.b64decode(m.group(4), validate=True))
    except (ValueError, binascii.Error) as err:
        raise MoshpitError(f"the server's bootstrap sent a bad address or host key: {err}")
    return Connect(port, m.group(2), address, host_key)


class RemoteError(NamedTuple):
    """A ``MOSHPIT ERROR <code> <detail>`` line."""
    code: str
    detail: str


class OutputReader:
    """Reads ssh's stdout: lines before ours (motd, rc files) are noise to show the user,
    up to MAX_NOISE_BYTES; the first CONNECT or ERROR line is the answer. Feed bytes; after
    each feed, ``result`` is None (more needed), a Connect or a RemoteError, and
    ``send_bundle`` / ``cached`` tell what the server said about its cache."""

    def __init__(self):
        self._buf = bytearray()
        self.noise: List[str] = []
        self._noise_bytes = 0
        self.result = None
        self.send_bundle = False
        self.cached = False

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self.result is None:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) >= MAX_LINE_BYTES:  # not ours: pass a long line in pieces
                    self._add_noise(bytes(self._buf[:MAX_LINE_BYTES]))
                    del self._buf[:MAX_LINE_BYTES]
                    continue
                return
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[:end + 1]
            self._line(line)

    def _line(self, line: bytes) -> None:
        text = line.decode("ascii", "replace")
        if text.startswith(CONNECT_PREFIX):
            self.result = parse_connect_line(text)
        elif text == SEND_LINE:
            self.send_bundle = True
        elif text == CACHED_LINE:
            self.cached = True
        elif text.startswith(ERROR_PREFIX):
            code, _, detail = text[len(ERROR_PREFIX):].partition(" ")
            self.result = RemoteError(moshpit.printable(code, 40),
                                      moshpit.printable(detail, MAX_DETAIL_CHARS))
        else:
            self._add_noise(line)

    def _add_noise(self, line: bytes) -> None:
        self._noise_bytes += len(line) + 1
        if self._noise_bytes > MAX_NOISE_BYTES:
            raise MoshpitError(f"the server printed more than {MAX_NOISE_BYTES // 1024} KiB "
                               "before the moshpit server started (a login script?)")
        self.noise.append(moshpit.printable(line.decode("utf-8", "replace")))


def explain_remote_error(error: RemoteError, host: str) -> str:
    """The one-line message for a MOSHPIT ERROR line, naming what to install."""
    if error.code == "no-python":
        found = f" (found:{error.detail})" if error.detail.strip() != "none found" else ""
        return f"{host} has no Python 3.9 or newer{found}: {INSTALL_PYTHON}"
    if error.code == "no-cryptography":
        where, _, why = error.detail.partition(": ")
        return f"{host}: {where} cannot use cryptography ({why}): {INSTALL_CRYPTOGRAPHY}"
    if error.code == "old-cryptography":
        need = ".".join(map(str, MIN_CRYPTOGRAPHY))
        return (f"{host}: {error.detail}, moshpit needs {need} or newer: "
                f"{INSTALL_CRYPTOGRAPHY.replace('pip install --user', 'pip install --user -U')}")
    return f"the moshpit server on {host} could not start: {error.detail}"


def explain_ssh_failure(host: str, status: int, stderr: str) -> str:
    """ssh ended without a CONNECT or ERROR line: say why in one line (ssh's last words)."""
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    said = f": {moshpit.printable(last, 200)}" if last else ""
    if status == 255:
        return f"ssh to {host} failed{said}"
    if status == 127:
        return f"{host} could not run the bootstrap command (no /bin/sh?){said}"
    return (f"the moshpit server on {host} did not start (no MOSHPIT CONNECT line; the remote "
            f"command exited with status {status}){said}")


# ---------------------------------------------------------------------------
# Client: run ssh, read the answer
# ---------------------------------------------------------------------------


class Started(NamedTuple):
    """A bootstrapped one-session server, and the key this client logs in with."""
    connect: Connect
    client_key: keys.PrivateKey
    noise: List[str]
    stderr: str
    cached: bool  # --ssh-cache: the server had the bundle, it was not sent
    ssh_status: int  # 0: ssh ended by itself once the server detached; -1: it was killed


def ssh_argv(ssh_command: str, destination: str, login: Optional[str] = None) -> List[str]:
    """The ssh command line: the user's ssh and options, ours, then the destination."""
    argv = shlex.split(ssh_command)
    if not argv:
        raise MoshpitError("--ssh-command is empty: give the ssh to run, e.g. \"ssh -p 2222\"")
    login_options = ["-l", login] if login else []
    return argv + list(SSH_OPTIONS) + login_options + ["--", destination, remote_command()]


def start_over_ssh(ssh_command: str, destination: str, login: Optional[str] = None,
                   cache: bool = False, wait_secs: float = CONNECT_WAIT_SECS) -> Started:
    """Run ssh, stream the stub and the bundle into the server's Python, and return its
    CONNECT line once ssh has ended (the server detached). With ``cache`` the server keeps
    the bundle (~/.cache/moshpit) and the client sends it only when asked. Raises
    MoshpitError with one line for every failure: ssh's, the server's
    (explain_remote_error), or silence."""
    client_key = keys.PrivateKey.generate("mp --ssh")
    bundle = bundle_bytes()
    argv = ssh_argv(ssh_command, destination, login)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as err:
        raise MoshpitError(f"cannot run {argv[0]}: {err.strerror or err} (install the "
                           "OpenSSH client or pass --ssh-command)")
    stderr = _Collector(proc.stderr)
    feeder = _Feeder(proc.stdin)
    first = preamble(bundle, client_key.public, cache)
    feeder.write(first if cache else first + bundle, close=not cache)
    try:
        reader = _read_answer(proc, wait_secs, destination,
                              lambda: feeder.write(bundle, close=True))
        status = _wait(proc, SSH_EXIT_WAIT_SECS if reader.result is not None else wait_secs)
        stderr.done.wait(1.0)
        said = stderr.text()
        if isinstance(reader.result, Connect):
            return Started(reader.result, client_key, reader.noise, said, reader.cached,
                           status)
        if isinstance(reader.result, RemoteError):
            raise MoshpitError(explain_remote_error(reader.result, destination))
        raise MoshpitError(explain_ssh_failure(destination, status, said))
    finally:
        if proc.poll() is None:
            proc.kill()  # ours: the ssh we started and nothing else
            proc.wait()


def _read_answer(proc: subprocess.Popen, wait_secs: float, host: str,
                 send_bundle) -> OutputReader:
    """ssh's stdout up to the answer; ``send_bundle()`` once if the server asks for it."""
    reader = OutputReader()
    asked = False
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + wait_secs
    while reader.result is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MoshpitError(f"no answer from the moshpit bootstrap on {host} in "
                               f"{wait_secs:g} s (ssh still running; is the server busy?)")
        if not select.select([fd], [], [], left)[0]:
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        reader.feed(data)
        if reader.send_bundle and not asked:
            asked = True
            send_bundle()
    return reader


def _wait(proc: subprocess.Popen, secs: float) -> int:
    """ssh's exit status; ``-1`` if it has not ended in ``secs`` (then it is killed)."""
    try:
        return proc.wait(secs)
    except subprocess.TimeoutExpired:
        return -1


class _Feeder:
    """Writes to ssh's stdin from a thread (so reading its output never waits on a full
    pipe), one write after the other. A server that exits early (an error line) closes its
    end: not our error to report."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._thread: Optional[threading.Thread] = None

    def write(self, data: bytes, close: bool) -> None:
        previous = self._thread

        def run() -> None:
            if previous is not None:
                previous.join()
            try:
                self.pipe.write(data)
                self.pipe.flush()
            except (OSError, ValueError):
                return
            if close:
                self.close()

        self._thread = threading.Thread(target=run, daemon=True, name="ssh-stdin")
        self._thread.start()

    def close(self) -> None:
        """(The writing thread.) No more input: the server reads nothing after the bundle."""
        try:
            self.pipe.close()
        except (OSError, ValueError):
            pass


class _Collector:
    """(Thread.) Reads ssh's stderr to its end, keeping the last MAX_STDERR_KEPT bytes."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.data = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="ssh-stderr").start()

    def _run(self) -> None:
        try:
            for chunk in iter(lambda: self.pipe.read1(65536), b""):
                self.data += chunk
                del self.data[:-MAX_STDERR_KEPT]
        except (OSError, ValueError):
            pass
        self.done.set()

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")


def ssh_hostname(ssh_command: str, destination: str, login: Optional[str] = None) -> str:
    """The host ssh connects to after its configuration (``ssh -G``: HostName of an alias),
    or "" if that cannot be told."""
    argv = shlex.split(ssh_command) + (["-l", login] if login else []) + ["-G", "--",
                                                                           destination]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=SSH_G_TIMEOUT_SECS).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname":
            return value.strip()
    return ""


def pick_address(hostname: str, bound: str, resolve=socket.getaddrinfo) -> str:
    """Where the client sends the handshake: the server's bound address if ssh's host name
    resolves to it (so a name with IPv4 and IPv6 addresses reaches the one bound), else the
    host name (the server is behind NAT: its address means nothing here), else the bound
    address (no name known)."""
    if not hostname:
        return bound
    try:
        found = {str(ipaddress.ip_address(info[4][0].split("%")[0]))
                 for info in resolve(hostname, None)}
    except (OSError, ValueError):
        return hostname
    return bound if bound in found else hostname


class PinnedHostKey:
    """The host key check of a bootstrapped session: the key from the CONNECT line, which
    ssh's authenticated channel delivered. No known_hosts, no prompt; anything else refused
    (first contact and resumes alike)."""

    def __init__(self, key: keys.PublicKey, host: str):
        self.key, self.host = key, host

    def first(self, key: keys.PublicKey) -> None:
        if key != self.key:
            raise trust.HostKeyError(
                f"{self.host} answered with host key {key.fingerprint()}, not the one its "
                "ssh bootstrap announced: someone may be intercepting the connection")

    resume = first


# ---------------------------------------------------------------------------
# Server: run_remote (called by the stub with mps), detaching
# ---------------------------------------------------------------------------


def server_address(environ) -> str:
    """The address the ssh client connected to (SSH_CONNECTION's third field); an
    IPv4-mapped IPv6 address (sshd on a dual-stack socket) as the IPv4 address it is."""
    fields = environ.get("SSH_CONNECTION", "").split()
    if len(fields) != 4:
        raise MoshpitError("SSH_CONNECTION is not set: mp --ssh must run through sshd")
    try:
        address = ipaddress.ip_address(fields[2].split("%")[0])
        return str(getattr(address, "ipv4_mapped", None) or address)
    except ValueError:
        raise MoshpitError(f"SSH_CONNECTION has no server address: "
                           f"{moshpit.printable(fields[2], 60)!r}") from None


def run_remote(params: dict, mps) -> int:
    """The server side, after the stub loaded the bundle: start ``mps``'s one-session server,
    say CONNECT on stdout, detach, and serve until the session ends (or nobody came)."""
    try:
        client_key = keys.PublicKey.from_blob(base64.b64decode(params["client_key"],
                                                               validate=True))
        wait = float(params.get("unused_exit_secs", UNUSED_EXIT_SECS))
        address = server_address(os.environ)
        server = mps.OneSessionServer.start(client_key, address)
    except (MoshpitError, OSError, ValueError, KeyError, TypeError, binascii.Error) as err:
        print(f"{ERROR_PREFIX}server {' '.join(str(err).split())[:MAX_DETAIL_CHARS]}",
              flush=True)
        return REMOTE_ERROR_STATUS
    print(connect_line(Connect(server.port, server.user, address, server.host_key.public)),
          flush=True)
    detach()
    return server.serve(wait)


def detach() -> None:
    """Leave ssh: double fork (the parent's exit is ssh's exit status 0), a new session
    without a terminal, stdio on /dev/null (sshd closes the channel when no one holds it),
    working directory / (no mount kept busy)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
