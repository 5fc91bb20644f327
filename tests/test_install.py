"""smoke"""
import pytest
from sshd_util import sshd_binary, sshd_host_fixture  # noqa: F401
from users_util import users_fixture  # noqa: F401

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("users")]


def test_smoke(sshd_host):
    r = sshd_host.run("ssh host id -un; ssh host 'echo $HOME'")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
