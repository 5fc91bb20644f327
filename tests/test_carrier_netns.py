"""The TCP carrier against a real packet filter: mps.py and mp.py run in a network namespace
this test creates (its own loopback only), where nftables drops the server's UDP ports from
the start, then not, then again mid-session. Needs root, `ip netns` and nft (installed with
apt-get if missing and possible); skips saying which is missing otherwise.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from proc_util import PtyProcess
from server_util import MPS, MpsServer
from test_carrier_relay import TCP_NOTE, UDP_NOTE, check_bulk
from test_client_session import QUIT, QUIT_STATUS, client_env, mp_args, wait_shell

pytestmark = pytest.mark.xdist_group("netns")


def _run(*argv: str, timeout: float = 20.0, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)


def _have_nft() -> str:
    """Why nft cannot be had, or "" once it is installed."""
    if shutil.which("nft"):
        return ""
    if not shutil.which("apt-get"):
        return "nft is missing and there is no apt-get to install nftables"
    for argv in (("apt-get", "install", "-y", "-q", "nftables"), ("apt-get", "update", "-q"),
                 ("apt-get", "install", "-y", "-q", "nftables")):
        try:
            _run(*argv, timeout=150)
        except subprocess.TimeoutExpired:
            return "installing nftables timed out"
        if shutil.which("nft"):
            return ""
    return "nft is missing and apt-get could not install nftables"


@pytest.fixture
def netns():
    """A fresh network namespace with its loopback up; deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and nftables need root")
    if not shutil.which("ip"):
        pytest.skip("no `ip` command (iproute2) to create a network namespace")
    why = _have_nft()
    if why:
        pytest.skip(why)
    name = f"mpcarrier-{secrets.token_hex(4)}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        up = _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        probe = _run("ip", "netns", "exec", name, "nft", "list", "ruleset")
        if up.returncode or probe.returncode:
            pytest.skip(f"nftables unusable in a namespace: {(up.stderr + probe.stderr).strip()}")
        yield name
    finally:
        _run("ip", "netns", "del", name)


def block_udp(ns: str, ports: tuple, blocked: bool) -> None:
    """Drop (or stop dropping) UDP to and from the server's port range inside ``ns``."""
    if blocked:
        lo, hi = ports
        rules = (f"table inet mpblock {{\n chain out {{\n"
                 f"  type filter hook output priority 0;\n"
                 f"  udp dport {lo}-{hi} drop\n  udp sport {lo}-{hi} drop\n }}\n}}\n")
        result = _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)
    else:
        result = _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "mpblock")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.timeout(420)  # apt-get may have to install nftables first (make test-tools does)
def test_nftables_udp_drop_from_the_start_and_mid_session(netns, tmp_path):
    in_ns = ["ip", "netns", "exec", netns]
    with MpsServer(tmp_path, python=in_ns[0], program=[*in_ns[1:], sys.executable, MPS]) \
            as server:
        block_udp(netns, server.udp_range, True)
        (tmp_path / "work").mkdir()
        with PtyProcess([*in_ns, *mp_args(server, tmp_path)], env=client_env(tmp_path)) as term:
            seen = term.read_until(TCP_NOTE, 15)
            wait_shell(term)
            term.send(f"cd {tmp_path / 'work'}\r")
            check_bulk(term, 500_000)
            block_udp(netns, server.udp_range, False)
            seen += term.read_until(UDP_NOTE, 30)
            wait_shell(term)
            # Mid-session: UDP dropped again while the session runs; typed input goes on.
            block_udp(netns, server.udp_range, True)
            for piece in ("echo N", "F$((6", "*7))", "T\r"):
                term.send(piece)
                time.sleep(0.5)
            out = term.read_until(re.compile(rb"[\r\n]NF42T\r\n"), 40)
            out += term.drain(quiet=1.0, limit=5)
            assert out.count(b"NF42T") == 1
            assert TCP_NOTE in out
            server.wait_log("client now at tcp:", 10)
            term.send(QUIT)
            assert term.wait(20) == QUIT_STATUS
