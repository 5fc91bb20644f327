"""Property tests: random and mutated bytes fed to every key parser are rejected cleanly.

A parser may accept its input or raise ValueError (the pure parsers) / KeyFileError (the file
API); any other exception escaping is a bug (a crash on hostile input).
"""

from __future__ import annotations

import base64
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moshpit_keys as mk
from moshpit_keys import KeyFileError, PrivateKey

FAST = settings(max_examples=300, deadline=None)
# Inputs that get past the header reach scrypt (~0.1 s each): fewer examples.
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = PrivateKey(bytes(range(32)), "fuzz@test")
OPENSSH_BODY = mk._encode_openssh(KEY)
LABELS = st.sampled_from([mk.OPENSSH_LABEL, mk.MOSHPIT_LABEL, "PRIVATE KEY", "RSA PRIVATE KEY"])
passphrases = st.one_of(st.none(), st.binary(max_size=8))


def mutated(data: bytes):
    """Strategy: ``data`` truncated, extended, or with one byte changed."""
    n = len(data)
    return st.one_of(
        st.integers(0, n - 1).map(lambda i: data[:i]),
        st.binary(min_size=1, max_size=16).map(lambda extra: data + extra),
        st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
            lambda iv: data[:iv[0]] + bytes([iv[1]]) + data[iv[0] + 1:]),
    )


def parse(parser, *args):
    """Run ``parser``; a clean rejection is fine, any other exception fails the test."""
    try:
        return parser(*args)
    except (ValueError, KeyFileError):
        return None


@FAST
@given(st.binary(max_size=2048), passphrases)
def test_private_decoder_random_bytes(data, passphrase):
    parse(mk._decode_private_key, data, passphrase)


@FAST
@given(LABELS, st.binary(max_size=512), passphrases)
def test_private_decoder_random_armored_bodies(label, body, passphrase):
    parse(mk._decode_private_key, mk._armor(label, body), passphrase)


@FAST
@given(mutated(OPENSSH_BODY))
def test_openssh_decoder_mutated_valid_key(body):
    key = parse(mk._decode_openssh, body, None)
    assert key is None or key.public == KEY.public  # a surviving mutation is still this key


@FAST
@given(mutated(mk._armor(mk.OPENSSH_LABEL, OPENSSH_BODY)))
def test_private_decoder_mutated_valid_file(data):
    parse(mk._decode_private_key, data, None)


@SLOW
@given(mutated(mk._seal_envelope(OPENSSH_BODY, b"pw")))
def test_envelope_mutated(body):
    parse(mk._open_envelope, body, b"pw")


@FAST
@given(st.binary(max_size=256))
def test_blob_parser_random_bytes(blob):
    parse(mk.PublicKey.from_blob, blob)


@FAST
@given(mutated(KEY.public.blob))
def test_blob_parser_mutated(blob):
    parse(mk.PublicKey.from_blob, blob)


@FAST
@given(st.text(max_size=300))
def test_line_parser_random_text(line):
    parse(mk.parse_public_key_line, line)


@FAST
@given(st.sampled_from(["moshpit", "ssh-ed25519"]), st.binary(max_size=80), st.text(max_size=20))
def test_line_parser_random_blobs(kind, blob, comment):
    line = f"{kind} {base64.b64encode(blob).decode()} {comment}"
    parse(mk.parse_public_key_line, line)


@FAST
@given(mutated(KEY.public.to_line().encode()))
def test_line_parser_mutated(raw):
    parse(mk.parse_public_key_line, raw.decode("utf-8", "replace"))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=1024))
def test_file_api_random_bytes(data):
    """The file-level API turns everything into KeyFileError (or reads keys)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "key")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
        for load in (mk.load_private_key, mk.load_public_key, mk.private_key_is_encrypted,
                     mk.read_authorized_keys):
            try:
                load(path)
            except KeyFileError:  # not ValueError: the file API must wrap everything
                pass
