"""Unit tests of mp.py's pure parts: escape filter, output tracker, banner, CLI parsing,
terminal guard. No server needed."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import termios

import pytest

import moshpit
import moshpit_handshake as hs
import moshpit_trust as trust
import mp

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESC = 0x1E  # Ctrl-^


# --- EscapeFilter -----------------------------------------------------------------------


def test_escape_filter_passes_plain_input_through():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"echo hi\r") == (b"echo hi\r", False)


def test_escape_dot_quits_and_keeps_what_came_before():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"ab\x1e.cd") == (b"ab", True)


def test_escape_escape_sends_one_escape():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"\x1e\x1e") == (b"\x1e", False)
    assert f.feed(b"\x1e^x") == (b"\x1ex", False)  # mosh's spelling: Ctrl-^ ^


def test_escape_then_other_key_sends_both():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"\x1ea") == (b"\x1ea", False)
    assert f.feed(b"\x1e\r") == (b"\x1e\r", False)


def test_escape_split_across_reads():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"x\x1e") == (b"x", False)  # held back until the next key
    assert f.feed(b".") == (b"", True)
    g = mp.EscapeFilter(ESC)
    assert g.feed(b"\x1e") == (b"", False)
    assert g.feed(b"q") == (b"\x1eq", False)


def test_escape_ctrl_z_asks_for_a_suspend_and_sends_nothing_for_it():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"ab\x1e") == (b"ab", False) and not f.suspend_requested
    assert f.feed(b"\x1acd") == (b"cd", False) and f.suspend_requested
    assert mp.EscapeFilter(ESC).feed(b"\x1a") == (b"\x1a", False)  # a lone Ctrl-Z is the shell's


@pytest.mark.parametrize("argv, destination, command, pty", [
    (["host", "ls", "-l"], "host", "ls -l", None),  # ssh's form without --
    (["-T", "host", "--", "ls", "-T"], "host", "ls -T", False),  # after --: the command's
    (["-T", "--", "host", "ls"], "host", "ls", False),  # the destination after --, as ssh
    (["--tty", "u@h", "--", "echo", "a b"], "u@h", "echo a b", True),  # joined as ssh joins
    (["host"], "host", None, None),  # a login shell
    (["host", "--"], "host", None, None),
])
def test_command_line_commands_as_ssh_reads_them(argv, destination, command, pty):
    args, remote = mp.parse_command_line(argv)
    assert (args.server_destination, remote, args.pty) == (destination, command, pty)


def test_escape_recognised_anywhere_not_only_after_newline():
    f = mp.EscapeFilter(ESC)
    assert f.feed(b"vim file\x1e.") == (b"vim file", True)


def test_escape_none_disables():
    f = mp.EscapeFilter(None)
    assert f.feed(b"\x1e.") == (b"\x1e.", False)


def test_escape_custom_key():
    f = mp.EscapeFilter(moshpit.parse_escape_key("^]"))
    assert f.feed(b"\x1e.") == (b"\x1e.", False)
    assert f.feed(b"\x1d]") == (b"\x1d", False)
    assert f.feed(b"\x1d.") == (b"", True)


# --- ScreenMirror -----------------------------------------------------------------------


def feed_all(*chunks, rows=24, cols=80):
    t = mp.ScreenMirror(rows, cols)
    for chunk in chunks:
        t.feed(chunk)
    return t


def test_tracker_plain_text_is_safe():
    assert feed_all(b"hello\r\n").at_safe_point()
    assert feed_all(b"").at_safe_point()


@pytest.mark.parametrize("chunks", [
    (b"abc\x1b",),
    (b"\x1b[3",),
    (b"\x1b[38;5;1",),
    (b"\x1b]0;title",),  # OSC without terminator
    (b"\x1b]0;title\x1b",),  # half of ST
    (b"\x1bP1$r",),  # DCS
    (b"\x1b(",),  # charset designation waiting for its final byte
    (b"caf\xc3",),  # first byte of a 2-byte UTF-8 character
    (b"\xe2\x80",),  # 2 of 3 bytes of "…"
    (b"\xe2", b"\x80"),  # split over two chunks
    (b"\xf0\x9f\x98",),  # 3 of 4 bytes of an emoji
    (b"\x1b[1m", b"\x1b[", b"2"),
    (b"\x1b]0;a\x1b]0;b",),  # ESC inside a string starts a new sequence
])
def test_tracker_unsafe_mid_sequence(chunks):
    assert not feed_all(*chunks).at_safe_point()


@pytest.mark.parametrize("chunks", [
    (b"\x1b[3", b"1mred\x1b[m"),
    (b"\x1b[?1049h\x1b[H\x1b[2J",),
    (b"\x1b]0;title\x07",),
    (b"\x1b]0;ti", b"tle\x1b\\"),
    (b"\x1b(B",),
    (b"\x1b7",),
    (b"\x1b[12;3",  b"\x18"),  # CAN aborts the sequence
    (b"caf\xc3", b"\xa9"),
    (b"\xe2", b"\x80", b"\xa6"),
    (b"\xf0\x9f\x98\x80 ok",),
    (b"\x1b[1m" + b"x" * 10000,),
    (b"\x1b]0;a\x1bx",),  # ESC ends the string; ESC x is a complete sequence
    (b"caf\xc3", b"\x1b[m"),  # a sequence abandons a cut character
    (b"\xf0", b"\x9f", b"\x98", b"\x80"),
])
def test_tracker_safe_after_complete_sequences(chunks):
    assert feed_all(*chunks).at_safe_point()


def test_mirror_ends_an_open_string_then_resets_what_the_stream_turned_on():
    m = feed_all(b"\x1b[?1049h\x1b[?1000h\x1b[?1006h\x1b[?2004h\x1b[?1h\x1b=\x1b[?25l"
                 b"\x1b[31m\x1b]0;unterminated title")
    assert m.end_open_sequence() == b"\x1b\\"
    assert m.at_safe_point() and m.end_open_sequence() == b""
    reset = m.reset_sequence()
    for off in (b"\x1b[?1049l", b"\x1b[?1000l", b"\x1b[?1006l", b"\x1b[?2004l", b"\x1b[?1l",
                b"\x1b>", b"\x1b[?25h"):
        assert off in reset
    after = mp.ScreenMirror(24, 80)
    after.feed(b"\x1b[?1049h\x1b[?1000h\x1b[?2004h\x1b[?25l\x1b[31m" + reset)
    assert after.reset_sequence() == b""  # nothing left on


def test_mirror_top_row_repaint_only_once_rows_line_up():
    m = feed_all(b"\x1b[1;33mfirst\x1b[m line\r\n")
    assert m.repaint_top_row() is None  # not scrolled: row 1 is not the server's first line
    m.feed(b"".join(b"line %d\r\n" % i for i in range(30)))
    repaint = m.repaint_top_row()
    assert repaint.startswith(b"\x1b7") and repaint.endswith(b"\x1b8")
    check = mp.ScreenMirror(24, 80)  # the repaint on a blank screen draws the model's row 1
    check.feed(repaint)
    assert check.term.line_text(0) == m.term.line_text(0)
    alt = feed_all(b"\x1b[?1049h\x1b[H\x1b[7mTOP")
    assert b"\x1b[0;7mT" in alt.repaint_top_row()  # the alternate screen is cleared on entry


@pytest.mark.parametrize("tail", [
    b"",  # the flood ends at a blank line start
    b"\x1b]0;open title",  # ... inside a string
    b"\x1b[?1049h\x1b[?2004h\x1b[7mapp",  # ... in an application on the alternate screen
    b"half a line",
])
def test_mirror_fed_late_answers_as_if_fed_at_once(tail):
    """Deferred bytes (a flood, fed in one go later) are fed before any question: every
    answer equals the one of a mirror fed chunk by chunk."""
    chunks = [b"\x1b[1;33mfirst\x1b[m\r\n"] + [b"%05d " % i + b"x" * 90 + b"\r\n"
                                                for i in range(200)] + [tail]
    questions = (lambda m: m.at_safe_point(), lambda m: m.at_line_start(),
                 lambda m: m.repaint_top_row(), lambda m: m.end_open_sequence(),
                 lambda m: m.reset_sequence(),
                 lambda m: (m.catch_up(), m.term.display()))  # term: read after catch_up
    for ask in range(len(questions)):
        now, late = mp.ScreenMirror(24, 80), mp.ScreenMirror(24, 80)
        for chunk in chunks:
            now.feed(chunk)
            late.defer([chunk])
        assert late.behind()
        answers = [question(now) for question in questions[ask:]]
        assert [question(late) for question in questions[ask:]] == answers
        assert not late.behind() and late.main_aligned == now.main_aligned


def test_mirror_defers_at_most_a_bound():
    late = mp.ScreenMirror(24, 80)
    line = b"y" * 98 + b"\r\n"
    for _ in range(late.unfed.limit // len(line) + 1):
        late.defer([line])
    assert late.unfed.waiting < late.unfed.limit
    assert late.term.scroll_count > 0, "the model caught up once the bound was reached"


def test_mirror_resize_feeds_what_waits_for_the_old_size_first():
    now, late = mp.ScreenMirror(5, 10), mp.ScreenMirror(5, 10)
    data = b"0123456789abc\r\nwrapped at ten\r\n"
    now.feed(data)
    late.defer([data])
    now.resize(5, 20)
    late.resize(5, 20)
    assert late.term.display() == now.term.display()


# --- StatusBanner -----------------------------------------------------------------------


def test_banner_render_saves_and_restores_cursor():
    out = mp.StatusBanner.render("moshpit: last contact 12 s ago", 80)
    assert out == (b"\x1b7\x1b[1;1H\x1b[2K\x1b[7mmoshpit: last contact 12 s ago\x1b[m\x1b8")


def test_banner_clipped_to_width_minus_one():
    out = mp.StatusBanner.render("x" * 100, 20)
    assert b"x" * 19 + b"\x1b[m" in out and b"x" * 20 not in out


def test_banner_text():
    assert mp.StatusBanner("…").text(12.7) == "moshpit: last contact 12 s ago, reconnecting…"
    assert mp.StatusBanner().text(40, "connection refused").endswith(
        "reconnecting... (connection refused)")


def test_banner_appears_after_six_seconds_and_updates_each_second():
    b = mp.StatusBanner()
    assert b.update(3.0, 80) == b""
    assert not b.shown
    first = b.update(6.1, 80)
    assert b"last contact 6 s ago" in first and b.shown
    assert b.update(6.9, 80) == b""  # same second: no redraw
    assert b"last contact 7 s ago" in b.update(7.0, 80)
    assert b.update(7.2, 40, force=True).startswith(b"\x1b7")  # resize redraws at once


def test_banner_removed_when_contact_returns():
    b = mp.StatusBanner()
    b.update(8.0, 80)
    assert b.update(0.1, 80) == mp.StatusBanner.erase() == b"\x1b7\x1b[1;1H\x1b[2K\x1b8"
    assert b.update(0.2, 80) == b""  # erased once only
    assert b.hide() == b""


def test_banner_deadlines_never_in_the_past():
    b = mp.StatusBanner()
    assert b.next_deadline(100.0, 101.0) == 106.0
    assert b.next_deadline(100.0, 108.4) == 109.0
    assert b.next_deadline(100.0, 109.0) == 110.0
    b.udp_wait = ("h", 50000)  # no UDP packet yet: the first deadline comes sooner
    assert b.next_deadline(100.0, 101.0) == 103.0


def test_banner_before_any_udp_packet_says_udp_is_silent():
    """Never "last contact" before there was any: after 3 s, mosh's UDP hint instead."""
    b = mp.StatusBanner("…", " — Ctrl-^ . quits")
    b.udp_wait = ("example.net", 50007)
    assert b.update(2.9, 120) == b""
    text = ("nothing received from example.net on UDP port 50007 (firewall?) — Ctrl-^ . quits")
    assert b.update(3.0, 120) == mp.StatusBanner.render(text, 120)
    assert b.update(4.5, 120) == b""  # the text does not change: no redraw each second
    assert b"last contact" not in b.update(9.0, 120, force=True)
    b.udp_wait = None  # the first packet: from now on silence is measured as contact lost
    assert b.update(0.1, 120) == mp.StatusBanner.erase()
    assert b"last contact 7 s ago" in b.update(7.0, 120)


def test_banner_udp_hint_keeps_the_way_out_on_a_narrow_screen():
    b = mp.StatusBanner("...", " - Ctrl-] . quits")
    b.udp_wait = ("a-rather-long-host-name.example.com", 50007)
    assert b.text(5, cols=80) == "nothing received on UDP port 50007 (firewall?) - Ctrl-] . quits"
    assert b.text(5, cols=200).startswith("nothing received from a-rather-long-host-name")


@pytest.mark.parametrize("setting, name", [("^^", "Ctrl-^"), ("^]", "Ctrl-]"), ("~", "~"),
                                           ("^?", "Ctrl-?"), ("none", None)])
def test_escape_key_names(setting, name):
    assert mp.EscapeFilter(moshpit.parse_escape_key(setting)).key_name() == name


@pytest.mark.parametrize("chunks, at_line_start", [
    ((), True),
    ((b"done\r\n",), True),
    ((b"line\n", b"user@host:~$ "), False),
    ((b"user@host:~$ ", b""), False),  # an empty read changes nothing
    ((b"$ exit\r\n", b"logout\r\n"), True),
    ((b"logout\r\n\x1b[?2004l\x1b[0m",), True),  # mode switch and colour reset: no motion
    ((b"done\r\n", b"\x1b[?1l\x1b[m"), True),
    ((b"\x1b[?2004h\x1b[01;32mroot@vm\x1b[00m:~# ",), False),
    ((b"line\r\n\x1b[3A",), False),  # the cursor moved up onto text: no fresh line there
    ((b"x" * 80,), False),  # pending wrap at the right edge
    ((b"abc\r\n\x1b[K\x1b[1G",), True),
])
def test_tracker_knows_when_the_cursor_is_at_line_start(chunks, at_line_start):
    assert feed_all(*chunks).at_line_start() == at_line_start


# --- command line -----------------------------------------------------------------------


@pytest.mark.parametrize("dest, expected", [
    ("host", ("me", "host")),
    ("alice@host.example.com", ("alice", "host.example.com")),
    ("alice@192.168.1.10", ("alice", "192.168.1.10")),
    ("::1", ("me", "::1")),
    ("[::1]", ("me", "::1")),
    ("alice@[::1]", ("alice", "::1")),
    ("alice@fe80::1%eth0", ("alice", "fe80::1%eth0")),
    ("alice@[fe80::1%eth0]", ("alice", "fe80::1%eth0")),
    ("a@b@host", ("a@b", "host")),
    ("host.example.com.", ("me", "host.example.com.")),
    ("my_host-2", ("me", "my_host-2")),
    ("bücher.example", ("me", "xn--bcher-kva.example")),  # IDNA: what DNS and known_hosts see
])
def test_parse_destination(dest, expected):
    assert mp.parse_destination(dest, "me") == expected


@pytest.mark.parametrize("dest", ["", "alice@", "@host", "alice@[::1", "al ice@host", "h/x"])
def test_parse_destination_rejects_garbage(dest):
    with pytest.raises(moshpit.MoshpitError):
        mp.parse_destination(dest, "me")


CHARS_HINT = ("use letters, digits, '-', '_' and '.', or an IP address (192.0.2.1, ::1, "
              "[fe80::1%eth0])")


@pytest.mark.parametrize("dest, message", [
    ("a,b", f"invalid host name 'a,b': ',' cannot appear in a host name; {CHARS_HINT}"),
    ("alice@a b", f"invalid host name 'a b': whitespace cannot appear in a host name; "
                  f"{CHARS_HINT}"),
    ("*.example.com", f"invalid host name '*.example.com': '*' cannot appear in a host name; "
                      f"{CHARS_HINT}"),
    ("h?st", f"invalid host name 'h?st': '?' cannot appear in a host name; {CHARS_HINT}"),
    ("!host", f"invalid host name '!host': '!' cannot appear in a host name; {CHARS_HINT}"),
    ("a\x1b]0;owned\x07", "invalid host name 'a^[]0;owned^G': a control character cannot "
                          f"appear in a host name; {CHARS_HINT}"),
    ("a\tb", f"invalid host name 'a^Ib': whitespace cannot appear in a host name; {CHARS_HINT}"),
    ("a\x9bb", "invalid host name 'a\\u009bb': a control character cannot appear in a host "
              f"name; {CHARS_HINT}"),
    ("ä,b", f"invalid host name 'ä,b': ',' cannot appear in a host name; {CHARS_HINT}"),
    ("host:22", "invalid host name 'host:22': the port goes in -s PORT, not after the host"),
    ("[host]", "invalid host name '[host]': brackets are only for IPv6 addresses, like [::1]"),
    ("1:2:3", "invalid host name '1:2:3': not a valid IPv6 address"),
    ("fe80::1%a,b", "invalid host name 'fe80::1%a,b': the scope after '%' must be an interface "
                    "name or number"),
    ("-oProxy", "invalid host name '-oProxy': each dot-separated part must be 1 to 63 "
                "characters and must not begin or end with '-'"),
    ("a..b", "invalid host name 'a..b': each dot-separated part must be 1 to 63 characters and "
             "must not begin or end with '-'"),
    ("x" * 64 + ".com", f"invalid host name '{'x' * 64}.com': each dot-separated part must be "
                        "1 to 63 characters and must not begin or end with '-'"),
    (".".join(["a" * 60] * 5), "invalid host name '" + ".".join(["a" * 60] * 5)[:77] +
     "...': longer than 253 characters"),
])
def test_invalid_host_names_say_what_is_wrong(dest, message):
    with pytest.raises(moshpit.MoshpitError) as raised:
        mp.parse_destination(dest, "me")
    assert str(raised.value) == message


def test_only_given_flags_reach_config():
    args = mp.build_parser().parse_args(["alice@h"])
    assert mp.cli_overrides(args) == {"server_destination": "alice@h"}
    args = mp.build_parser().parse_args(
        ["-vv", "-s", "2222", "-p", "/k", "-k", "/k.pub",
         "--strict-host-key-checking", "accept-new", "h"])
    assert mp.cli_overrides(args) == {
        "verbose": 2, "server_port": 2222, "private_key_path": "/k",
        "public_key_path": "/k.pub", "strict_host_key_checking": "accept-new",
        "server_destination": "h"}


def run_mp(args, tmp_path, env=None, timeout=20):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOSHPIT")}
    full_env.update(HOME=str(tmp_path), **(env or {}))
    return subprocess.run([sys.executable, os.path.join(HERE, "mp.py"), *args],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_version_flag(tmp_path):
    res = run_mp(["-V"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"mp {moshpit.__version__}"


def test_verbose_and_quiet_conflict(tmp_path):
    res = run_mp(["-v", "-q", "host"], tmp_path)
    assert res.returncode == 2 and "not allowed with" in res.stderr


def test_print_config_shows_values_and_sources(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('max_reconnect_backoff_secs = 60\n')
    res = run_mp(["--print-config", "-c", str(conf), "-s", "2222", "alice@[::1]"], tmp_path,
                 env={"MOSHPIT_ESCAPE_KEY": "^]"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "server_port = 2222  (command line)" in lines
    assert 'server_destination = "alice@[::1]"  (command line)' in lines
    assert f"max_reconnect_backoff_secs = 60  (file {conf})" in lines
    assert 'escape_key = "^]"  (environment MOSHPIT_ESCAPE_KEY)' in lines
    assert f'private_key_path = "{tmp_path}/.mp/id_ed25519"  (default)' in lines


def test_missing_explicit_config_is_an_error(tmp_path):
    res = run_mp(["-c", str(tmp_path / "nope.toml"), "host"], tmp_path)
    assert res.returncode == 255 and res.stderr.startswith("mp: ")
    assert "nope.toml" in res.stderr and "Traceback" not in res.stderr


def test_no_destination_is_an_error(tmp_path):
    res = run_mp([], tmp_path)
    assert res.returncode == 255
    assert "no server destination" in res.stderr


@pytest.mark.parametrize("args", [["-N", "h", "--", "ls"], ["-N", "--tty", "h"],
                                  ["-N", "--list", "h"], ["-N", "--attach", "h"],
                                  ["-N", "--kill", "ab12", "h"]])
def test_dash_n_with_a_command_or_session_management_is_a_usage_error(tmp_path, args):
    res = run_mp(["-s", "1", *args], tmp_path)
    assert res.returncode == 255
    assert res.stderr == ("mp: -N (forwarding only) takes no remote command, no --tty, "
                          "and no --list, --attach or --kill\n")


def test_unreachable_server_is_reported_before_the_missing_key(tmp_path):
    """The key is looked at only once the server is reached (test_keys_safety has the
    reachable case: how to make one)."""
    res = run_mp(["-s", "1", "alice@127.0.0.1"], tmp_path)
    assert res.returncode == 255
    assert res.stderr == \
        "mp: nothing listens on 127.0.0.1:1 (is mps running? is the port right: -s PORT)\n"
    assert "id_ed25519" not in res.stderr
    assert not (tmp_path / ".mp").exists()


# --- TerminalGuard ----------------------------------------------------------------------


@pytest.fixture
def pty_pair():
    master, slave = pty.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_guard_raw_mode_and_exact_restore(pty_pair):
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    guard = mp.TerminalGuard(slave, slave)
    guard.enter()
    raw = termios.tcgetattr(slave)
    assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO
    assert not os.get_blocking(slave)
    guard.restore()
    assert termios.tcgetattr(slave) == before
    assert os.get_blocking(slave)
    guard.restore()  # idempotent
    assert termios.tcgetattr(slave) == before


def test_guard_keeps_typeahead(pty_pair):
    master, slave = pty_pair
    os.write(master, b"typed early")
    with mp.TerminalGuard(slave, slave):
        assert os.read(slave, 100) == b"typed early"


def test_guard_not_a_tty_is_fine(tmp_path):
    r, w = os.pipe()
    try:
        with mp.TerminalGuard(r, w) as guard:
            assert not guard.is_tty
        assert os.get_blocking(r) and os.get_blocking(w)
    finally:
        os.close(r)
        os.close(w)


def test_waker_wakes_select():
    import select
    waker = mp.Waker()
    try:
        assert select.select([waker], [], [], 0)[0] == []
        for _ in range(10000):  # a full pipe never blocks the waker
            waker.wake()
        assert select.select([waker], [], [], 0)[0] == [waker]
        waker.drain()
        assert select.select([waker], [], [], 0)[0] == []
    finally:
        waker.close()


# --- Resumer schedule and failure classification ------------------------------------------


def finished_attempt(resumer, waker, now):
    import select
    assert select.select([waker], [], [], 10)[0], "the resume thread never reported"
    waker.drain()
    return resumer.take(now)


def test_resumer_schedule_backs_off_and_resets():
    waker = mp.Waker()
    try:
        failure = hs.HandshakeError("cannot connect to h port 1: connection refused")

        def handshake(request):
            raise failure

        r = mp.Resumer(handshake, waker, max_backoff=5.0)
        heard = 100.0
        assert not r.due(109.9, heard) and r.due(110.0, heard)
        starts = []
        now = 110.0
        for _ in range(5):
            assert r.due(now, heard)
            r.start(request=None)
            assert not r.due(now + 1000, heard)  # one attempt at a time
            assert finished_attempt(r, waker, now) is failure
            starts.append(now)
            now = r.next_attempt(heard)
        assert [b - a for a, b in zip(starts, starts[1:])] == [2.0, 4.0, 5.0, 5.0]  # capped
        r.contact()
        assert r.next_attempt(200.0) == 210.0 and r.backoff == 2.0
    finally:
        waker.close()


def test_resumer_reports_a_crash_as_a_failure():
    waker = mp.Waker()
    try:
        r = mp.Resumer(lambda request: 1 / 0, waker, max_backoff=60.0)
        r.start(request=None)
        outcome = finished_attempt(r, waker, 0.0)
        assert isinstance(outcome, moshpit.MoshpitError) and not mp.is_final(outcome)
    finally:
        waker.close()


def test_resume_failures_final_or_retried():
    gone = hs.AuthRefused(hs.NO_SUCH_SESSION, "the session on h no longer exists")
    assert mp.is_gone(gone) and mp.is_final(gone)
    assert mp.is_final(hs.AuthRefused(hs.PERMISSION_DENIED)) and not mp.is_gone(
        hs.AuthRefused(hs.PERMISSION_DENIED))
    assert mp.is_final(trust.HostKeyError("changed"))
    for code in (hs.SESSION_LIMIT, hs.USER_SESSION_LIMIT):  # only ever a new session's answer
        assert mp.is_final(hs.AuthRefused(code))
    for code in (hs.SERVER_BUSY, hs.SHUTTING_DOWN, hs.PROTOCOL_ERROR):
        assert not mp.is_final(hs.HandshakeError("x", code))
    assert not mp.is_final(hs.HandshakeError("cannot connect to h port 1: timed out"))


def test_keygen_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(HERE)
    assert mp.keygen_command(str(tmp_path / ".mp" / "id_ed25519")) == \
        "python3 mp_keygen.py generate"
    assert mp.keygen_command("/keys/my key") == "python3 mp_keygen.py generate -f '/keys/my key'"
    monkeypatch.chdir("/")
    assert mp.keygen_command(str(tmp_path / ".mp" / "id_ed25519")) == \
        f"python3 {HERE[1:]}/mp_keygen.py generate"
