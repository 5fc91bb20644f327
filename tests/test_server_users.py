"""mps.py serving other users: as root it logs each user in as themselves (their uid, groups,
home, authorized_keys); as a plain user it serves only that user. Uses throwaway accounts
(useradd/userdel), so these tests need root; they are skipped otherwise."""

from __future__ import annotations

import os
import secrets
import shutil

import pytest
from moshpit_handshake import PERMISSION_DENIED, USER_NOT_SERVED, USER_SESSION_LIMIT, AuthRefused
from server_util import MpsServer, TestClient, make_key, write_authorized_keys
from users_util import authorize, python_for, users_fixture  # noqa: F401  (the `users` fixture)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                       reason="needs root and useradd to create throwaway users"),
]


def test_root_server_logs_in_as_the_target_user(tmp_path, users):
    extra = users.group()
    alice = users.user(groups=[extra])
    with MpsServer(tmp_path, authorized_keys_file=False) as server:
        authorize(alice, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            assert client.run("id -u") == str(alice.pw_uid)
            assert client.run("id -g") == str(alice.pw_gid)
            expected_groups = {str(g) for g in os.getgrouplist(alice.pw_name, alice.pw_gid)}
            assert set(client.run("id -G").split()) == expected_groups
            assert extra in client.run("id -Gn").split()
            assert client.run("echo $HOME") == alice.pw_dir
            assert client.run("pwd") == alice.pw_dir
            assert client.run("echo $USER $LOGNAME") == f"{alice.pw_name} {alice.pw_name}"
            assert client.run("stat -c %U $(tty)") == alice.pw_name  # owns their terminal
            assert client.run("touch ~/made-here && echo ok") == "ok"
            assert client.run("cat /root/.bashrc >/dev/null 2>&1 || echo denied") == "denied"
        assert os.stat(os.path.join(alice.pw_dir, "made-here")).st_uid == alice.pw_uid


def test_only_the_target_users_authorized_keys_count(tmp_path, users):
    alice, bob = users.user(), users.user()
    with MpsServer(tmp_path, authorized_keys_file=False) as server:
        bob_key = make_key(os.path.join(server.dir, "bob_id"), "bob")
        authorize(alice, server.client_key)
        authorize(bob, bob_key)
        # Bob's key is good for bob only.
        with TestClient.for_server(server, user=bob.pw_name, identity=bob_key).connect() as c:
            assert c.run("id -un") == bob.pw_name
        with pytest.raises(AuthRefused) as refused:
            TestClient.for_server(server, user=alice.pw_name, identity=bob_key).connect()
        assert refused.value.code == PERMISSION_DENIED
        server.wait_log(f"key {bob_key.public.fingerprint()} is not authorized for "
                        f"{alice.pw_name}")
        # The server's own (configured nowhere) file does not count: only ~alice/.mp's.
        os.remove(os.path.join(alice.pw_dir, ".mp", "authorized_keys"))
        with pytest.raises(AuthRefused):
            TestClient.for_server(server, user=alice.pw_name).connect()
        server.wait_log(f"{alice.pw_dir}/.mp/authorized_keys does not exist")


def test_session_limit_is_per_user(tmp_path, users):
    """alice at max_sessions_per_user is refused a new session, by name; bob is not."""
    alice, bob = users.user(), users.user()
    settings = {"mps.max_sessions_per_user": 1}
    with MpsServer(tmp_path, authorized_keys_file=False, udp_ports=3, settings=settings) as server:
        authorize(alice, server.client_key)
        authorize(bob, server.client_key)
        with TestClient.for_server(server, user=alice.pw_name).connect() as first:
            first.run("true")
            with pytest.raises(AuthRefused) as refused:
                TestClient.for_server(server, user=alice.pw_name).connect()
            assert refused.value.code == USER_SESSION_LIMIT
            assert str(refused.value).startswith(f"too many sessions for {alice.pw_name} on ")
            with TestClient.for_server(server, user=bob.pw_name).connect() as other:
                assert other.run("id -un") == bob.pw_name


def test_strict_modes_on_the_users_authorized_keys(tmp_path, users):
    alice = users.user()
    with MpsServer(tmp_path, authorized_keys_file=False) as server:
        path = authorize(alice, server.client_key)
        os.chmod(path, 0o664)  # group-writable: refused, as sshd's StrictModes
        with pytest.raises(AuthRefused):
            TestClient.for_server(server, user=alice.pw_name).connect()
        server.wait_log(f"{path} is mode 0664, must not be group/world writable")
        os.chmod(path, 0o644)  # readable by others: fine
        os.chmod(os.path.dirname(path), 0o755)
        with TestClient.for_server(server, user=alice.pw_name).connect() as client:
            assert client.run("id -un") == alice.pw_name


def test_a_shell_that_cannot_start_is_a_clean_refusal(tmp_path, users):
    erin = users.user(shell="/nonexistent/shell")
    with MpsServer(tmp_path, authorized_keys_file=False) as server:
        authorize(erin, server.client_key)
        with pytest.raises(AuthRefused):
            TestClient.for_server(server, user=erin.pw_name).connect()
        server.wait_log(f"login shell /nonexistent/shell of {erin.pw_name} does not exist")
        assert server.proc.poll() is None


def test_missing_home_falls_back_to_root_dir(tmp_path, users):
    frank = users.user()
    keys = os.path.join(tmp_path, "frank_keys", "authorized_keys")
    with MpsServer(tmp_path, settings={"mps.authorized_keys_file": keys}) as server:
        write_authorized_keys(keys, server.client_key.public)
        os.rename(frank.pw_dir, frank.pw_dir + ".away")
        try:
            with TestClient.for_server(server, user=frank.pw_name).connect() as client:
                assert client.run("pwd") == "/"
                assert client.run("echo $HOME") == frank.pw_dir
        finally:
            os.rename(frank.pw_dir + ".away", frank.pw_dir)


def test_unknown_user_is_refused(tmp_path):
    with MpsServer(tmp_path) as server:
        with pytest.raises(AuthRefused) as refused:
            TestClient.for_server(server, user="nosuchuser" + secrets.token_hex(3)).connect()
        assert refused.value.code == PERMISSION_DENIED
        server.wait_log("no such user")


def test_non_root_server_serves_only_its_own_user(users):
    carol, dave = users.user(), users.user()
    server = MpsServer(carol.pw_dir, run_as=carol, python=python_for(carol),
                       authorized_keys_file=False, start=False)
    authorize(carol, server.client_key)
    authorize(dave, server.client_key)
    with server.start():
        with TestClient.for_server(server, user=carol.pw_name).connect() as client:
            assert client.run("id -un") == carol.pw_name
            assert client.run("pwd") == carol.pw_dir
        # A client holding one of carol's keys may learn that this server serves only
        # carol; the same answer for a user that does not exist: no oracle for user names.
        for other in (dave.pw_name, "root", "no-such-user-here"):
            with pytest.raises(AuthRefused) as refused:
                TestClient.for_server(server, user=other).connect()
            assert refused.value.code == USER_NOT_SERVED
            assert "serves only the user it runs as" in str(refused.value)
            server.wait_log(f"this server runs as {carol.pw_name} and only serves user "
                            f"{carol.pw_name}, not {other!r}")
        # Without a key of carol's, every name reads "permission denied": a stranger does
        # not learn whom the server runs as (nor whether dave exists and trusts the key).
        dave_key = make_key(os.path.join(server.dir, "dave_id"), "dave")
        authorize(dave, dave_key)
        for other in (dave.pw_name, "no-such-user-here", carol.pw_name):
            with pytest.raises(AuthRefused) as refused:
                TestClient.for_server(server, user=other, identity=dave_key).connect()
            assert refused.value.code == PERMISSION_DENIED
        server.wait_log(f"not {dave.pw_name!r} (run mps as root to serve every user); key "
                        f"{dave_key.public.fingerprint()} is not authorized for "
                        f"{carol.pw_name} either")
