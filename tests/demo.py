"""`make demo`: a throwaway moshpit server and client on loopback, no setup needed.

Makes keys in a temporary directory, starts ``mps.py`` on 127.0.0.1 with a config that
points at them, and connects ``mp.py`` to it. On a terminal you land in your own shell over
moshpit (leave with ``exit`` or Ctrl-^ .); without one (CI, a pipe) a short scripted session
runs inside a pseudo-terminal and its output is shown. Everything started is stopped and the
directory removed on the way out, whatever happens.
"""

from __future__ import annotations

import getpass
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
SCRIPTED_INPUT = b"echo moshpit demo: $((6*7)) from $(hostname) as $(id -un); exit 3\r"


def free_port(kind: int) -> int:
    """A port the kernel says is free now on 127.0.0.1 (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: str, comment: str) -> None:
    subprocess.run(
        [PY, os.path.join(HERE, "mp_keygen.py"), "generate", "-f", path, "-N", "", "-C", comment],
        check=True, stdout=subprocess.DEVNULL,
    )


def write_server_config(tmp: str, port: int, udp_port: int) -> str:
    path = os.path.join(tmp, "moshpits.toml")
    with open(path, "w") as f:
        f.write(
            "[mps]\n"
            'ip = "127.0.0.1"\n'
            f"port = {port}\n"
            f'udp_port_range = "{udp_port}-{udp_port}"\n'
            f'private_key_path = "{tmp}/host_key"\n'
            f'public_key_path = "{tmp}/host_key.pub"\n'
            f'authorized_keys_file = "{tmp}/authorized_keys"\n'
        )
    return path


def wait_listening(port: int, server: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo: the server exited early (status {server.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: the server did not start listening within 10 s")


def run_scripted(argv: list, env: dict) -> int:
    """Run mp.py in a pseudo-terminal, type one command line, echo what comes back."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(PY, argv, env)
    deadline = time.monotonic() + 30
    typed = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                # The shell has drawn its prompt and gone quiet: type the line once.
                if not typed:
                    os.write(fd, SCRIPTED_INPUT)
                    typed = True
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the client exited and closed the terminal
                break
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="moshpit-demo-")
    os.chmod(tmp, 0o700)
    server = None
    try:
        keygen(os.path.join(tmp, "host_key"), "demo-host")
        keygen(os.path.join(tmp, "id_ed25519"), f"{getpass.getuser()}@demo")
        shutil.copy(os.path.join(tmp, "id_ed25519.pub"), os.path.join(tmp, "authorized_keys"))
        os.chmod(os.path.join(tmp, "authorized_keys"), 0o600)
        port, udp_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        config = write_server_config(tmp, port, udp_port)
        env = dict(os.environ, HOME=tmp)
        server = subprocess.Popen(
            [PY, os.path.join(HERE, "mps.py"), "-c", config, "-t", os.path.join(tmp, "mps.log")],
            env=env, stdin=subprocess.DEVNULL,
        )
        wait_listening(port, server)
        client = [
            PY, os.path.join(HERE, "mp.py"), "-s", str(port),
            "-p", os.path.join(tmp, "id_ed25519"), "-k", os.path.join(tmp, "id_ed25519.pub"),
            "-t", os.path.join(tmp, "mp.log"), "--strict-host-key-checking", "accept-new",
            f"{getpass.getuser()}@127.0.0.1",
        ]
        print(f"demo: moshpit server on 127.0.0.1:{port} (UDP {udp_port}), throwaway keys in {tmp}")
        if sys.stdin.isatty() and sys.stdout.isatty():
            print("demo: connecting; leave with `exit` or Ctrl-^ then .\n")
            return subprocess.call(client, env=env)
        print("demo: no terminal here, so a scripted session runs in a pseudo-terminal:\n")
        status = run_scripted(client, env)
        print(f"\ndemo: the client exited with status {status} (the remote `exit 3`)")
        return 0 if status == 3 else 1
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
