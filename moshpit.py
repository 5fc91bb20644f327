"""moshpit core, lowest layer: errors, constants, configuration, logging, terminal helpers.

moshpit is split by layer into flat sibling modules (copying stays trivial: every
``moshpit*.py`` plus the CLI you need). Each module uses only the ones above it:

    moshpit.py            errors/constants -> config -> logging -> terminal helpers
    moshpit_keys.py       Ed25519 keys, OpenSSH key files, fingerprints, randomart
    moshpit_handshake.py  TCP handshake (sans-IO) + blocking driver, authorized_keys, known_hosts
    moshpit_transport.py  packet crypto -> reliable stream (sans-IO) -> UDP I/O glue
    mps.py / mp.py / mp_keygen.py   thin CLIs
"""

from __future__ import annotations

__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# Errors and constants
# ---------------------------------------------------------------------------

PROTOCOL_VERSION = 1
DEFAULT_TCP_PORT = 40404
DEFAULT_UDP_PORT_RANGE = (50000, 59999)
MAX_DATAGRAM = 1200  # fits a 1280-byte IPv6 path with IP/UDP headers to spare


class MoshpitError(Exception):
    """An error a user can act on: ``str(err)`` is one line saying what is wrong and what to do.

    CLIs print it as ``prog: message`` and exit non-zero; never a traceback.
    """
