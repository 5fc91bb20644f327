"""The entry point of the one-file bundle: ``python3 moshpit.pyz mps|mp|keygen [ARGS...]``.

``make dist`` zips every module and program into ``dist/moshpit.pyz`` (stdlib ``zipapp``)
with this file as its ``__main__.py``: copying one file installs the server, the client and
the key tool. Each subcommand is exactly that program's ``main`` with the rest of
the command line; this module only picks one (it works from a checkout too:
``python3 moshpit_pyz.py mp alice@host``).
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

import moshpit

# Subcommand -> the program's module (each has main(argv) -> exit status).
PROGRAMS = {"mps": "mps", "mp": "mp", "keygen": "mp_keygen"}

USAGE = """\
usage: python3 {me} PROGRAM [ARGS...]

moshpit {version}: a resilient, encrypted remote terminal (like mosh, with native scrollback).

programs:
  mps      the server: serves the current user (run as root: every user)
  mp       the client: mp [user@]host
  keygen   key pairs: keygen generate | fingerprint | verify

examples:
  python3 {me} keygen generate        # your identity: ~/.mp/id_ed25519
  python3 {me} mps --generate-host-key -e
  python3 {me} mp alice@host

`python3 {me} PROGRAM --help` lists a program's options; --version prints the version.
"""


def usage(me: str) -> str:
    return USAGE.format(me=me, version=moshpit.__version__)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the program named by the first argument; without one, or with an unknown one,
    print the usage (exit 2, like a command-line error)."""
    argv = sys.argv[1:] if argv is None else argv
    me = sys.argv[0] or "moshpit.pyz"  # as typed, so the usage lines can be pasted
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(me), end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"moshpit {moshpit.__version__}")
        return 0
    if argv[0] not in PROGRAMS:
        print(f"{me}: unknown program {moshpit.printable(argv[0], 40)!r} "
              f"(one of: {', '.join(PROGRAMS)})\n\n{usage(me)}", end="", file=sys.stderr)
        return 2
    program = importlib.import_module(PROGRAMS[argv[0]])
    return program.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
