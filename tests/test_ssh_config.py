"""Host aliases from ~/.ssh/config: the line splitter, Host patterns, the walk (first value
wins, Include with globs and depth limit, Match blocks skipped), the ``ssh_config`` setting,
parse_destination's precedence, a comparison with ``ssh -G`` where OpenSSH is installed, and
mp.py connecting through an alias to a real mps on loopback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from proc_util import PtyProcess
from server_util import REPO, MpsServer
from users_util import users_fixture  # noqa: F401  (the `users` fixture)

import moshpit
import mp
from moshpit import ConfigError, load_config, parse_ssh_config, resolve_ssh_alias, \
    ssh_config_words, ssh_host_matches

pytestmark = pytest.mark.timeout(60)

HOME = "/home/me"
CONFIG = HOME + "/.ssh/config"


# -- the line format ----------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ("a b", ["a", "b"]),
    ("  a\t\tb  ", ["a", "b"]),
    ('"a b" c', ["a b", "c"]),
    ("'a b'c", ["a bc"]),
    (r'"a\"b"', ['a"b']),
    (r"a\ b", ["a b"]),
    (r"a\\b", ["a\\b"]),
    (r"a\xb", ["a\\xb"]),
    ("a #rest is a comment", ["a"]),
    ("a#b", ["a#b"]),
    ('"#x"', ["#x"]),
    ('""', [""]),
    ("", []),
])
def test_words_are_split_as_ssh_splits_them(text, words):
    assert ssh_config_words(text) == words


@pytest.mark.parametrize("text", ['"a b', "'a", r'"a\"'])
def test_an_unclosed_quote_is_refused(text):
    with pytest.raises(ValueError, match="unbalanced quotes"):
        ssh_config_words(text)


def test_keywords_any_case_with_blanks_or_equals():
    text = ("# comment\n\n  Host a b\nHOSTNAME=x\n\tuser = bob\nHostName\t= 'y z'\n"
            "  # indented comment\nUser\nPort \"22\n")
    lines, problems = parse_ssh_config(text)
    assert [(line.number, line.keyword, line.args) for line in lines] == [
        (3, "host", ["a", "b"]), (4, "hostname", ["x"]), (5, "user", ["bob"]),
        (6, "hostname", ["y z"])]
    assert problems == ["line 8: no argument after User", "line 9: unbalanced quotes"]


@pytest.mark.parametrize("host,patterns,matches", [
    ("web", ["web"], True),
    ("web", ["we"], False),
    ("web1.example.com", ["*.example.com"], True),
    ("example.com", ["*.example.com"], False),
    ("web1", ["web?"], True),
    ("web12", ["web?"], False),
    ("db", ["web", "db"], True),  # several patterns on one line
    ("x", ["*"], True),
    ("web.prod", ["*", "!*.prod"], False),  # a matching negation vetoes the line
    ("web.prod", ["!*.prod", "*"], False),  # wherever it stands
    ("web.dev", ["*", "!*.prod"], True),
    ("web.dev", ["!*.prod"], False),  # a negation alone matches nothing
    ("a.b", ["a?b"], True),  # '.' is an ordinary character
    ("a[1]", ["a[1]"], True),  # no character classes, unlike fnmatch
    ("a1", ["a[1]"], False),
])
def test_host_patterns(host, patterns, matches):
    assert ssh_host_matches(host, patterns) is matches


# -- the walk: which values win -----------------------------------------------------------


class FileTree:
    """ssh_config files in memory, and which of them were read (the walk's I/O)."""

    def __init__(self, files: dict):
        self.files = files
        self.read_paths: list = []

    def read(self, path: str) -> str:
        self.read_paths.append(path)
        if path not in self.files:
            raise FileNotFoundError(path)
        if self.files[path] is None:
            raise PermissionError(13, "Permission denied")
        return self.files[path]

    def expand(self, pattern: str) -> list:
        regex = re.compile(re.escape(pattern).replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        return sorted(path for path in self.files if regex.fullmatch(path))

    def resolve(self, host: str) -> moshpit.SshAlias:
        return resolve_ssh_alias(host, CONFIG, HOME, read=self.read, expand=self.expand)


def test_first_value_wins_across_blocks():
    tree = FileTree({CONFIG: "Host web\n  HostName 192.0.2.7\nHost *\n  HostName other\n"
                             "  User deploy\nHost web\n  User late\n"})
    found = tree.resolve("web")
    assert (found.hostname, found.user, found.warnings) == ("192.0.2.7", "deploy", [])
    assert found.notes == [f"ssh config {CONFIG} line 2: web is 192.0.2.7",
                           f"ssh config {CONFIG} line 5: user deploy"]
    other = tree.resolve("db")
    assert (other.hostname, other.user) == ("other", "deploy")


def test_lines_before_any_host_apply_to_every_host():
    found = FileTree({CONFIG: "User everyone\nHost web\n  User webby\n"}).resolve("web")
    assert found.user == "everyone"


def test_nothing_matches_nothing_changes():
    found = FileTree({CONFIG: "Host web\n  HostName 192.0.2.7\n"}).resolve("db")
    assert found == moshpit.SshAlias(None, None, [], [])


def test_host_patterns_match_the_name_as_typed_and_percent_h_is_it_in_lower_case():
    tree = FileTree({CONFIG: "Host BOX*\n  HostName %h.example.com\n"
                             "Host pct\n  HostName 100%%-%h\n"})
    assert tree.resolve("BOX1").hostname == "box1.example.com"
    assert tree.resolve("box1").hostname is None  # case counts, as in ssh
    assert tree.resolve("pct").hostname == "100%-pct"


def test_an_unknown_hostname_token_is_an_error_naming_the_line():
    tree = FileTree({CONFIG: "Host web\n  HostName %r.example.com\n"})
    with pytest.raises(ConfigError) as err:
        tree.resolve("web")
    assert str(err.value) == (f"ssh config {CONFIG} line 2: HostName token %r is not supported "
                              "(only %h and %%); fix the line or set ssh_config = false")


def test_include_reads_a_glob_in_order_relative_to_dot_ssh():
    conf_d = HOME + "/.ssh/conf.d/"
    tree = FileTree({
        CONFIG: "Include conf.d/*.conf ~/extra\nHost web\n  HostName from-main\n",
        conf_d + "20-web.conf": "Host web\n  HostName from-20\n  User twenty\n",
        conf_d + "10-web.conf": "Host web\n  HostName from-10\n",
        conf_d + "web.bak": "Host web\n  User bak\n",
        HOME + "/extra": "Host *\n  User extra\n",
    })
    found = tree.resolve("web")
    assert (found.hostname, found.user) == ("from-10", "twenty")
    assert tree.read_paths == [CONFIG, conf_d + "10-web.conf", conf_d + "20-web.conf",
                               HOME + "/extra"]


def test_include_in_a_block_that_does_not_match_is_not_read():
    tree = FileTree({CONFIG: "Host other\n  Include private\nHost *\n  User all\n",
                     HOME + "/.ssh/private": "User secret\n"})
    assert tree.resolve("web").user == "all"
    assert tree.read_paths == [CONFIG]


def test_an_included_file_does_not_change_the_including_block():
    """The included file ends inside a non-matching Host block; the lines after the Include
    still belong to the including file's (matching) block."""
    tree = FileTree({CONFIG: "Host web\n  Include inc\n  User after\n",
                     HOME + "/.ssh/inc": "HostName included\nHost nomatch\n  User no\n"})
    found = tree.resolve("web")
    assert (found.hostname, found.user) == ("included", "after")


def test_include_loops_stop_at_the_depth_limit_with_a_warning():
    tree = FileTree({CONFIG: "Include config\nUser me\n"})
    found = tree.resolve("web")
    assert found.user == "me"
    assert len(tree.read_paths) == moshpit.SSH_INCLUDE_MAX_DEPTH + 1
    assert found.warnings == [f"ssh config {CONFIG} line 1: Include nested more than "
                              f"{moshpit.SSH_INCLUDE_MAX_DEPTH} deep; not followed"]


def test_missing_files_say_nothing_unreadable_ones_warn():
    assert FileTree({}).resolve("web") == moshpit.SshAlias(None, None, [], [])
    tree = FileTree({CONFIG: "Include nothere secret\nUser me\n",
                     HOME + "/.ssh/secret": None})
    found = tree.resolve("web")
    assert found.user == "me"
    assert found.warnings == [f"cannot read ssh config {HOME}/.ssh/secret: Permission denied; "
                              "its host aliases are not applied"]


def test_match_blocks_are_skipped_and_noted():
    tree = FileTree({CONFIG: "Match host web\n  HostName via-match\n  User m\n"
                             "Host web\n  HostName via-host\n"})
    found = tree.resolve("web")
    assert (found.hostname, found.user) == ("via-host", None)
    assert found.notes[0] == f"ssh config {CONFIG} line 1: Match blocks are not applied by moshpit"


def test_bad_lines_are_warned_about_and_the_rest_applies():
    found = FileTree({CONFIG: 'Host web\n  HostName "oops\n  User ok\n'}).resolve("web")
    assert (found.hostname, found.user) == (None, "ok")
    assert found.warnings == [f"ssh config {CONFIG} line 2: unbalanced quotes; line ignored"]


def test_a_real_unreadable_file_is_a_warning(tmp_path):
    found = resolve_ssh_alias("web", str(tmp_path), str(tmp_path))  # a directory
    assert found.warnings == [f"cannot read ssh config {tmp_path}: Is a directory; its host "
                              "aliases are not applied"]


# -- OpenSSH itself as the reference ------------------------------------------------------

SSH_G_CASES = [
    "Host web\n  HostName 192.0.2.7\nHost *\n  HostName other\n  User deploy\n",
    "User first\nHost web\n  User second\n",
    "Host *.prod !db.prod\n  User produser\nHost *\n  User anyone\n",
    "Host web db\n  HostName %h.example.com\n",
    "Host WEB\n  HostName %h.upper\nHost web\n  HostName %h.lower\n",
    "Host=web\nHOSTNAME = 'quoted.example'\nuser=\"q u\"\n",
    "Host web\n  Include {dir}/inc/*.conf\n  User after\nHost *\n  User star\n",
    "Host db\n  Include {dir}/inc/*.conf\nHost *\n  User star\n",
]
SSH_G_HOSTS = ["web", "db", "x.prod", "db.prod", "WEB"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
@pytest.mark.parametrize("text", SSH_G_CASES)
def test_hostname_and_user_are_what_ssh_dash_g_says(tmp_path, text):
    """``ssh -G -F file host`` prints what ssh would use (without connecting). Match blocks
    are left out: ssh applies them, moshpit does not (test_match_blocks_are_skipped_and_noted)."""
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "20.conf").write_text("HostName twenty\nHost *\n  User inc-star\n")
    (tmp_path / "inc" / "10.conf").write_text("Host web\n  HostName ten.%h\n")
    config = tmp_path / "config"
    config.write_text(text.format(dir=tmp_path))
    me = mp.local_user()
    for host in SSH_G_HOSTS:
        out = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True,
                             text=True, timeout=20, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        said = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
        found = resolve_ssh_alias(host, str(config), str(tmp_path))
        assert (found.hostname or host.lower(), found.user or me) == \
            (said["hostname"], said["user"]), host


# -- the setting and the destination ------------------------------------------------------

@pytest.mark.parametrize("environ,expected", [
    ({}, "/h/.ssh/config"),
    ({"MOSHPIT_SSH_CONFIG": "false"}, False),
    ({"MOSHPIT_SSH_CONFIG": "none"}, False),
    ({"MOSHPIT_SSH_CONFIG": "~/other"}, "/h/other"),
])
def test_the_ssh_config_setting(environ, expected):
    assert load_config("client", {}, environ=environ, home="/h")["ssh_config"] == expected


@pytest.mark.skipif(moshpit._toml_reader() is None, reason="no tomllib/tomli here")
@pytest.mark.parametrize("toml,expected", [
    ("ssh_config = false\n", False),
    ('ssh_config = "/etc/my_ssh_config"\n', "/etc/my_ssh_config"),
])
def test_the_ssh_config_setting_in_the_file(tmp_path, toml, expected):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    config = load_config("client", {}, path=str(path), environ={}, home=str(tmp_path))
    assert config["ssh_config"] == expected
    assert f"ssh_config = {moshpit._toml_value(expected)}  (file {path})" in config.describe()


@pytest.mark.parametrize("word", ["yes", "True", "on"])
def test_ssh_config_true_is_refused(word):
    with pytest.raises(ConfigError) as err:
        load_config("client", {}, environ={"MOSHPIT_SSH_CONFIG": word}, home="/h")
    assert str(err.value) == (f"environment MOSHPIT_SSH_CONFIG: ssh_config must be false or a "
                              f"path, got {word!r}")


def alias_table(table: dict):
    def lookup(host):
        hostname, user = table.get(host, (None, None))
        return moshpit.SshAlias(hostname, user, [], [])
    return lookup


@pytest.mark.parametrize("dest,expected", [
    ("web", ("deploy", "192.0.2.7")),  # the file's User and HostName
    ("alice@web", ("alice", "192.0.2.7")),  # user@ beats the file's User
    ("nouser", ("me", "198.51.100.1")),  # no User in the file: the local user
    ("other", ("me", "other")),  # not an alias
    ("[::1]", ("me", "::1")),  # a bracketed address is never an alias
])
def test_destination_through_an_alias(dest, expected):
    aliases = alias_table({"web": ("192.0.2.7", "deploy"), "nouser": ("198.51.100.1", None),
                           "::1": ("wrong", "wrong")})
    assert mp.parse_destination(dest, "me", aliases) == expected


@pytest.mark.parametrize("dest,login,login_first,user", [
    ("web", None, False, "deploy"),  # the file's User
    ("web", "lee", False, "lee"),  # -l beats it
    ("web", "lee", True, "lee"),
    ("alice@web", "lee", False, "alice"),  # the first of user@ and -l wins, as before
    ("alice@web", "lee", True, "lee"),
])
def test_login_name_and_alias_user(monkeypatch, dest, login, login_first, user):
    monkeypatch.setattr(mp, "local_user", lambda: "me")
    aliases = alias_table({"web": ("192.0.2.7", "deploy")})
    assert mp.remote_user_and_host(dest, login, login_first, aliases) == (user, "192.0.2.7")


def test_a_bad_user_name_in_the_file_is_named():
    with pytest.raises(moshpit.MoshpitError) as err:
        mp.parse_destination("web", "me", alias_table({"web": ("192.0.2.7", "a b")}))
    assert str(err.value) == "bad user name 'a b' for 192.0.2.7 in the ssh config (User)"


def test_the_hostname_from_the_file_is_checked_like_a_typed_one():
    with pytest.raises(moshpit.MoshpitError, match="invalid host name 'a,b'"):
        mp.parse_destination("web", "me", alias_table({"web": ("a,b", None)}))


# -- end to end -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a throwaway user")
@pytest.mark.timeout(90)
def test_mp_connects_through_an_alias_as_its_user(tmp_path, users):
    """``mp.py box`` with ~/.ssh/config saying ``Host box`` -> HostName 127.0.0.1, User
    (a throwaway account, not the local user): the session is that user's on 127.0.0.1, and
    known_hosts records 127.0.0.1, the name that was connected to."""
    alice = users.user()
    server = MpsServer(tmp_path)
    with server:
        home = tmp_path / "client-home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text(
            "Host other\n  User nobody\n"
            f"Host box !nobox\n  HostName 127.0.0.1\n  User {alice.pw_name}\n"
            "Host *\n  User fallback\n")
        env = {"HOME": str(home), "TERM": "xterm", "PATH": os.environ["PATH"],
               "LANG": "C.UTF-8"}
        argv = [sys.executable, os.path.join(REPO, "mp.py"), "-s", str(server.port),
                "-p", server.client_key_path, "-t", str(tmp_path / "mp.log"),
                "--strict-host-key-checking", "accept-new", "box"]
        with PtyProcess(argv, env=env) as terminal:
            terminal.send("echo \"I am $(id -un) on $((40+2))\"\r")
            terminal.read_until(f"I am {alice.pw_name} on 42".encode(), 30)
            terminal.send("exit 4\r")
            terminal.read_to_eof(30)
            assert terminal.wait(10) == 4
        known = (home / ".mp" / "known_hosts").read_text()
        assert known.startswith(f"[127.0.0.1]:{server.port} ssh-ed25519 ") and "box" not in known
        log = (tmp_path / "mp.log").read_text()
        config = home / ".ssh" / "config"
        assert f"ssh config {config} line 4: box is 127.0.0.1" in log
        assert f"ssh config {config} line 5: user {alice.pw_name}" in log
