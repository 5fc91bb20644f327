"""The built-in TOML reader (moshpit.parse_toml_subset), used on Python 3.9/3.10 without tomli.

It must read a config file exactly as tomllib does or refuse it naming the line: compared with
tomllib (or tomli) on every ```toml block of the README, on generated documents within the
subset, and on random token soup (whatever tomllib refuses, it refuses too; whatever tomllib
reads, it reads the same or calls "not supported"). End to end, mps and mp run on a Python
where tomllib and tomli cannot be imported and do what their config files say.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proc_util import PtyProcess
from server_util import REPO, MpsServer, TestClient

import moshpit
from moshpit import ConfigError, TomlSubsetError, load_config, parse_toml_subset

pytestmark = pytest.mark.timeout(60)

oracle = moshpit._toml_reader()  # tomllib on 3.11+, else tomli if installed
needs_oracle = pytest.mark.skipif(oracle is None, reason="neither tomllib nor tomli here")


def readme_toml_blocks() -> list:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```toml\n(.*?)```", f.read(), re.DOTALL)


def outcome(text: str):
    """What the built-in reader makes of ``text``: the table, or the error."""
    try:
        return parse_toml_subset(text)
    except TomlSubsetError as err:
        return err


def oracle_outcome(text: str):
    try:
        return oracle.loads(text)
    except oracle.TOMLDecodeError:
        return None


# -- the README's examples ---------------------------------------------------------------


def test_the_readme_has_toml_examples():
    assert len(readme_toml_blocks()) >= 2


@needs_oracle
@pytest.mark.parametrize("block", readme_toml_blocks())
def test_every_readme_example_reads_as_tomllib_reads_it(block):
    assert parse_toml_subset(block) == oracle.loads(block)


# -- generated documents within the subset -------------------------------------------------

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"',
                 "\\": "\\\\"}
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")

keys = st.one_of(st.text("abcXYZ019_-", min_size=1, max_size=5), st.text(max_size=5))
scalars = st.one_of(st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.text(max_size=10))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=6)
tables = st.recursive(
    st.dictionaries(keys, values, max_size=4),
    lambda inner: st.dictionaries(keys, st.one_of(values, inner), max_size=4), max_leaves=12)


class Renderer:
    """Writes a table as TOML, each choice (quoting, escapes, integer bases, headers or dotted
    keys, blanks, comments, line ends) drawn by hypothesis."""

    def __init__(self, data):
        self.draw = data.draw
        self.newline = self.choose(["\n", "\r\n"])

    def choose(self, options):
        return self.draw(st.sampled_from(options))

    def blank(self) -> str:
        return self.choose(["", " ", "\t", "  \t"])

    def comment(self) -> str:
        return self.choose(["", "", " # note", "#", "\t# a # b 'c' \"d\" [e]"])

    def string(self, text: str) -> str:
        forms = [self.basic(text)]
        if "'" not in text and not CONTROL.search(text):
            forms.append(f"'{text}'")
        return self.choose(forms)

    def basic(self, text: str) -> str:
        out = []
        for ch in text:
            if ch in SHORT_ESCAPES and (ch in '"\\' or CONTROL.match(ch) or self.choose([0, 1])):
                out.append(SHORT_ESCAPES[ch])
            elif CONTROL.match(ch) or self.choose([False, False, True]):
                out.append(self.choose([f"\\u{ord(ch):04x}", f"\\U{ord(ch):08X}"])
                           if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    def key(self, parts) -> str:
        dot = self.choose([".", " . ", ".\t"])
        return dot.join(self.choose([part, self.string(part)]) if BARE_KEY.match(part)
                        else self.string(part) for part in parts)

    def integer(self, n: int) -> str:
        forms = [str(n), f"{n:_}"]
        if n >= 0:
            forms += ["+" + str(n), f"0x{n:x}", f"0x{n:X}", f"0o{n:o}",
                      f"0b{n:b}", f"0x{n:_x}"]
        return self.choose(forms)

    def value(self, value) -> str:
        if isinstance(value, bool):
            return self.choose(["true"] if value else ["false"])
        if isinstance(value, int):
            return self.integer(value)
        if isinstance(value, str):
            return self.string(value)
        items = [self.value(item) for item in value]
        if self.choose([False, True]):  # one line
            tail = ", " if items and self.choose([False, True]) else ""
            return "[" + self.blank() + ", ".join(items) + tail + "]"
        lines = [item + "," + self.comment() for item in items]
        return "[" + self.comment() + self.newline + self.newline.join(lines) + self.newline + "]"

    def document(self, table: dict) -> str:
        lines: list = []
        pending = []  # tables still to write: (path, table, with a header?)
        self.body((), (), table, lines, pending)
        while pending:
            path, sub, header = pending.pop(0)
            if header:
                lines.append("[" + self.blank() + self.key(path) + self.blank() + "]"
                             + self.comment())
                self.body(path, (), sub, lines, pending)
            else:  # only sub-tables: they make this one implicitly
                pending += [(path + (k,), v, True) for k, v in sub.items()]
        if self.choose([False, True]):
            lines.insert(self.choose(range(len(lines) + 1)), self.blank() + self.comment())
        return self.newline.join(lines) + self.choose(["", self.newline])

    def body(self, section, prefix, table, lines, pending) -> None:
        """``table``'s keys as ``key = value`` lines of ``section``, sub-tables as dotted keys
        (``prefix``) or, deferred to ``pending``, under their own headers."""
        for name, value in table.items():
            path = prefix + (name,)
            if not isinstance(value, dict):
                lines.append(self.blank() + self.key(path) + self.blank() + "=" + self.blank()
                             + self.value(value) + self.blank() + self.comment())
            elif value and self.choose([False, True]):
                self.body(section, path, value, lines, pending)
            else:
                implicit = value and all(isinstance(v, dict) and v for v in value.values())
                pending.append((section + path, value, not implicit or self.choose([0, 1])))


@needs_oracle
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables, st.data())
def test_generated_documents_read_as_tomllib_reads_them(table, data):
    text = Renderer(data).document(table)
    assert oracle.loads(text) == table  # the generator writes valid TOML
    assert parse_toml_subset(text) == table


TOKENS = ["a", "b", '"a"', "'b'", ".", "=", " ", "\n", "\r\n", "\r", "[", "]", "[[", ",", "1",
          "0x1f", "-2", "+0", "0123", "_", "true", "false", "#c", '"\\u00e9"', '"\\x"', "\\",
          '"', "'", "{", "}", "1.5", "1e3", "inf", "\t", "\x00", "1979-05-27", '"""', "é"]


@needs_oracle
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=20))
def test_token_soup_is_refused_or_read_as_tomllib_reads_it(tokens):
    text = "".join(tokens)
    mine, theirs = outcome(text), oracle_outcome(text)
    if theirs is None:
        assert isinstance(mine, TomlSubsetError), text
    elif isinstance(mine, TomlSubsetError):
        assert mine.unsupported, (text, str(mine))
    else:
        assert mine == theirs


# -- errors: what and where ----------------------------------------------------------------

@pytest.mark.parametrize("text,line,message", [
    ('a = 1\nb = "x\n', 2, "unterminated string"),
    ("[mps]\nport = 1\nport = 2\n", 3, "key mps.port is defined twice"),
    ("[mps]\nport = 1\n[tracing]\n[mps]\n", 4, "table [mps] is defined twice"),
    ("mps.port = 1\n\n[mps]\n", 3, "table [mps] is defined twice"),
    ("[a.b]\n[a]\nb.c = 1\n", 3, "table a.b is defined elsewhere; dotted keys cannot add to it"),
    ("a = 1\n[a.b]\n", 2, "a is already a value, not a table"),
    ('a = "\\q"\n', 1, "invalid escape '\\\\q' in a string"),
    ('a = "\\ud800"\n', 1, "escape \\ud800 is not a Unicode scalar value"),
    ("# fine\n\na = 0123\n", 3, "expected the end of the line, found '1'"),
    ("a = [1,\n2\n3]\n", 3, "expected ',' or ']' in an array"),
    ("a =\n", 1, "expected a value (a string, integer, true/false or array)"),
    ("= 1\n", 1, "expected a key"),
    ("[a\n", 1, "expected ']' at the end of the table header"),
    ("a = 'x\x01'\n", 1, "control character in a string (write it as an escape)"),
])
def test_invalid_toml_names_the_line(text, line, message):
    err = outcome(text)
    assert isinstance(err, TomlSubsetError) and not err.unsupported
    assert (err.line, str(err)) == (line, f"line {line}: {message}")
    if oracle is not None:
        assert oracle_outcome(text) is None  # tomllib refuses it too


@pytest.mark.parametrize("text,line,what", [
    ("a = 1\nb = 1.5\n", 2, "floats"),
    ("a = -inf\n", 1, "floats"),
    ("a = 1e3\n", 1, "floats"),
    ("\n\n[tracing]\nstdout = { with_level = true }\n", 4, "inline tables ({...})"),
    ("x = 1979-05-27\n", 1, "dates and times"),
    ("x = 07:32:00\n", 1, "dates and times"),
    ('x = """a"""\n', 1, "multi-line strings"),
    ("x = '''a'''\n", 1, "multi-line strings"),
    ("[[x]]\n", 1, "arrays of tables ([[...]])"),
])
def test_toml_beyond_the_subset_is_named_with_its_line(text, line, what):
    err = outcome(text)
    assert isinstance(err, TomlSubsetError) and err.unsupported
    assert str(err) == (f"line {line}: {what} are not supported by moshpit's built-in TOML "
                        "reader (install tomli, or use Python 3.11+)")
    if oracle is not None:
        assert oracle_outcome(text) is not None  # valid TOML, just not ours


def write_config(home, kind, text):
    path = moshpit.default_config_path(kind, str(home))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_without_tomllib_the_config_file_is_read_by_the_built_in_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(moshpit, "_toml_reader", lambda: None)
    path = write_config(tmp_path, "server", "[mps] # the server\nport = 0x1_f40\n"
                        "[tracing.file.layer]\nwith_target = true\n")
    c = load_config("server", {}, environ={}, home=str(tmp_path))
    assert (c.path, c.warnings) == (path, [])
    assert (c["mps.port"], c.source("mps.port")) == (8000, f"file {path}")
    assert c["tracing.file.layer.with_target"] is True


def test_without_tomllib_errors_name_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(moshpit, "_toml_reader", lambda: None)
    path = write_config(tmp_path, "client", "server_port = 1\nserver_port = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config("client", {}, environ={}, home=str(tmp_path))
    assert str(err.value) == (f"config file {path}: invalid TOML: line 2: "
                              "key server_port is defined twice")
    path = write_config(tmp_path, "client", "server_port = 1\nx = {}\n")
    with pytest.raises(ConfigError) as err:
        load_config("client", {}, environ={}, home=str(tmp_path))
    assert str(err.value) == (f"config file {path}: line 2: inline tables ({{...}}) are not "
                              "supported by moshpit's built-in TOML reader (install tomli, or "
                              "use Python 3.11+)")


# -- end to end: the programs on a Python without tomllib or tomli -------------------------


def no_toml_site(tmp_path) -> str:
    """A directory whose sitecustomize makes ``import tomllib`` and ``import tomli`` fail (a
    None entry in sys.modules), as on a bare Python 3.9/3.10: put it in PYTHONPATH."""
    site = tmp_path / "no-toml-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.modules['tomllib'] = sys.modules['tomli'] = None\n")
    return str(site)


@pytest.mark.timeout(90)
def test_mps_and_mp_apply_their_config_files_without_tomllib(tmp_path):
    """mps reads its config file (address, ports, keys: nothing else tells it) and mp reads
    its default one (destination, port, key, host key policy): a session runs, so both files
    were applied by the built-in reader, and neither program warns about them."""
    site = no_toml_site(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import moshpit; print(moshpit._toml_reader())"],
                           env={"PYTHONPATH": site}, cwd=REPO, capture_output=True, text=True,
                           timeout=20)
    assert probe.stdout == "None\n", probe.stderr
    server = MpsServer(tmp_path, start=False, env={"PYTHONPATH": site})
    with open(server.config_path) as f:
        flat = f.readlines()
    with open(server.config_path, "w") as f:  # as a person would write it: with a [mps] table
        f.write("# moshpit server\n" + "".join(line for line in flat if "." not in line[:4])
                + "\n[mps]  # where and with what key\n"
                + "".join("  " + line[len("mps."):] for line in flat if line.startswith("mps.")))
    with server.start():
        client_home = tmp_path / "client-home"
        user = TestClient.for_server(server).user
        write_config(client_home, "client", (
            f'server_destination = "{user}@127.0.0.1"  # no destination on the command line\n'
            f"server_port = {server.port:_}\n"
            f"private_key_path = '{server.client_key_path}'\n"
            'strict_host_key_checking = "accept-new"\n'))
        env = {"HOME": str(client_home), "TERM": "xterm", "PATH": os.environ["PATH"],
               "LANG": "C.UTF-8", "PYTHONPATH": site}
        with PtyProcess([sys.executable, os.path.join(REPO, "mp.py"), "-t",
                         str(tmp_path / "mp.log")], env=env) as terminal:
            terminal.send("echo $((4200+42))\r")
            terminal.read_until(re.compile(rb"[\r\n]4242\r\n"), 30)
            terminal.send("exit 3\r")
            shown = terminal.read_to_eof(30)
            assert terminal.wait(10) == 3
        assert b"warning" not in shown
        assert "warning" not in server.stderr() + server.log()
