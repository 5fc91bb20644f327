#!/usr/bin/env python3
"""mp_keygen: generate and inspect moshpit's Ed25519 key pairs, in the manner of ssh-keygen.

A thin CLI: key handling, file formats and safety checks live in moshpit_keys.py. Prompts go
to the controlling terminal (as ssh-keygen's do), so they work with stdin/stdout redirected;
without a terminal, everything the prompts would ask must come from the command line.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import select
import sys
import termios

import moshpit_keys as keys
from typing import List, Optional
from moshpit import MoshpitError, __version__, printable, printable_lines, program_name

PROG = program_name("keygen")  # mp_keygen.py, or moshpit.pyz keygen in the one-file bundle
PASSPHRASE_ATTEMPTS = 3
log = logging.getLogger("moshpit.keygen")


class Terminal:
    """The controlling terminal, for prompts; secrets are read with echo off."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self._stream = stream

    @classmethod
    def open(cls) -> Optional[Terminal]:
        """The terminal, or None when there is none (cron, CI, ssh without -t)."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return None
        return cls(io.TextIOWrapper(io.FileIO(fd, "r+"), encoding="utf-8", errors="replace"))

    def ask(self, prompt: str, secret: bool = False) -> str:
        """One line of the user's answer, without its newline. End of input cancels."""
        fd = self._stream.fileno()
        if secret:  # echo off before the prompt shows, so no typed-ahead key is echoed
            saved = termios.tcgetattr(fd)
            quiet = list(saved)
            quiet[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        try:
            self._stream.write(prompt)
            self._stream.flush()
            # Python runs signal handlers only between bytecodes: a Ctrl-C landing just
            # before a blocking read would wait for the next key. Returning from select()
            # now and then lets a pending KeyboardInterrupt through within 0.25 s.
            while not select.select([fd], [], [], 0.25)[0]:
                pass
            line = self._stream.readline()
        finally:
            if secret:
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
                self._stream.write("\n")  # the user's Enter was not echoed
                self._stream.flush()
        if not line:
            raise MoshpitError("cancelled (end of input); no key was written")
        return line.rstrip("\r\n")

    def close(self) -> None:
        self._stream.close()


def _need(terminal: Optional[Terminal], problem: str) -> Terminal:
    """The terminal, or MoshpitError(problem) when a question cannot be asked."""
    if terminal is None:
        raise MoshpitError(problem)
    return terminal


def _ask_passphrase(terminal: Optional[Terminal]) -> str:
    terminal = _need(terminal, "no terminal to ask for a passphrase: "
                               "pass -N PASSPHRASE (-N '' for none)")
    for _ in range(PASSPHRASE_ATTEMPTS):
        first = terminal.ask("Enter passphrase (empty for no passphrase): ", secret=True)
        if first == terminal.ask("Enter same passphrase again: ", secret=True):
            return first
        print("Passphrases do not match.  Try again.")
    raise MoshpitError(f"passphrases did not match {PASSPHRASE_ATTEMPTS} times; "
                       "no key was written")


def generate(args: argparse.Namespace, terminal: Optional[Terminal]) -> int:
    default_path = keys.default_identity_paths()[0]
    print("Generating public/private ed25519 key pair.")
    path = args.file
    if path is None and terminal is not None:
        path = terminal.ask(f"Enter file in which to save the key ({default_path}): ").strip()
    path = os.path.abspath(os.path.expanduser(path or default_path))
    pub_path = path + ".pub"
    if not args.force:  # checked before the passphrase is asked; create_key_pair rechecks
        existing = next((p for p in (path, pub_path) if os.path.lexists(p)), None)
        if existing:
            raise keys.KeyFileExists(existing)
    passphrase = args.passphrase
    if passphrase is None:
        passphrase = _ask_passphrase(terminal)
    comment = keys.default_comment() if args.comment is None else args.comment
    key = keys.create_key_pair(path, pub_path, comment,
                               passphrase.encode("utf-8", "surrogateescape"),
                               overwrite=args.force, kind=keys.PUBLIC_FORMATS[args.format])
    print(f"Your private key has been saved in {path}")
    print(f"Your public key has been saved in {pub_path}")
    print("The key fingerprint is:")
    print(f"{key.public.fingerprint()} {printable(key.public.comment)}".rstrip())
    print("The key's randomart image is:")
    print(key.public.randomart())
    return 0


def pubkey(args: argparse.Namespace, terminal: Optional[Terminal]) -> int:
    """Print the public key line of a private key file, like ``ssh-keygen -y``: rebuilds a
    lost or damaged .pub (``pubkey -f KEY > KEY.pub``)."""
    path = os.path.expanduser(args.file)
    try:
        key = keys.load_private_key(path)
    except keys.PassphraseRequired:
        terminal = _need(terminal, f"{path} is protected by a passphrase and there is no "
                                   "terminal to ask for it")
        passphrase = terminal.ask(f"Enter passphrase for {path}: ", secret=True)
        key = keys.load_private_key(path, passphrase.encode("utf-8", "surrogateescape"))
    print(key.public.to_line(keys.PUBLIC_FORMATS[args.format]))
    return 0


def fingerprint(args: argparse.Namespace, terminal: Optional[Terminal]) -> int:
    pub = keys.load_public_key(os.path.expanduser(args.path))
    print(f"256 {pub.fingerprint()} {printable(pub.comment) or 'no comment'} (ED25519)")
    if args.randomart:
        print(pub.randomart())
    return 0


def verify(args: argparse.Namespace, terminal: Optional[Terminal]) -> int:
    path = os.path.expanduser(args.key)
    pub = keys.load_public_key(path)
    given = sys.stdin.read() if args.expected == "-" else args.expected
    if args.randomart:
        what, matched, actual = "randomart", pub.matches_randomart(given), pub.randomart()
    else:
        what, matched, actual = "fingerprint", pub.matches_fingerprint(given), pub.fingerprint()
    if matched:
        print(f"OK: the {what} matches the key in {path}")
        return 0
    print(f"MISMATCH: the {what} does not match the key in {path}")
    given = printable_lines(given.strip(), 80)  # may come from a file: shown, never obeyed
    if args.randomart:
        print(f"given:\n{given}\nkey ({pub.fingerprint()}):\n{actual}")
    else:
        print(f"given: {given}\nkey:   {actual}")
    return 1


EXAMPLES = {
    "generate": f"""\
  {PROG} generate                          # asks for path and passphrase
  {PROG} generate -f ~/.mp/mps_host_ed25519_key -N ''   # a server host key, no prompts
  {PROG} generate -f /tmp/k -N '' -C ci@build --force    # replace an existing pair
  {PROG} generate --format openssh         # .pub as "ssh-ed25519 ...", for ssh-keygen -l""",
    "pubkey": f"""\
  {PROG} pubkey                            # the public line of ~/.mp/id_ed25519
  {PROG} pubkey -f ~/.mp/work > ~/.mp/work.pub   # rebuild a lost or damaged .pub
  {PROG} pubkey --format openssh -f ~/.mp/id_ed25519   # as ssh-keygen -y prints it""",
    "fingerprint": f"""\
  {PROG} fingerprint                       # ~/.mp/id_ed25519.pub
  {PROG} fingerprint --randomart ~/.mp/mps_host_ed25519_key.pub
  {PROG} fingerprint ~/.ssh/id_ed25519.pub   # OpenSSH public keys work too""",
    "verify": f"""\
  {PROG} verify SHA256:bbXpuKG6zhzdmnxq256TlqzFBzRl2f6OOg722cYNbU8
  {PROG} verify -k ~/.mp/mps_host_ed25519_key.pub SHA256:...
  {PROG} verify --randomart "+--[ED25519 256]--+ |  ... |"   # line breaks optional
  {PROG} verify --randomart - < art.txt    # read the art from stdin""",
}


def _add_verbosity(parser: argparse.ArgumentParser, dest_suffix: str) -> None:
    """-v/-q, accepted before and after the command (counted together in main)."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        dest="verbose" + dest_suffix,
                        help="more log output (repeatable; conflicts with --quiet)")
    parser.add_argument("-q", "--quiet", action="count", default=0, dest="quiet" + dest_suffix,
                        help="less log output (repeatable; conflicts with --verbose)")


def _add_format(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--format", choices=tuple(keys.PUBLIC_FORMATS), default="moshpit",
                        help=f"{what}: 'moshpit <base64> comment' (default) or OpenSSH's "
                        "'ssh-ed25519 <base64> comment' (readable by ssh-keygen -l); moshpit "
                        "reads both")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Generate and inspect moshpit Ed25519 key pairs.",
        epilog="examples:\n" + "\n".join(EXAMPLES.values()),
        formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    _add_verbosity(parser, "_before")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog="examples:\n" + EXAMPLES[name],
                                  formatter_class=argparse.RawTextHelpFormatter)
        sub.set_defaults(func=func)
        _add_verbosity(sub, "")
        return sub

    default_priv, default_pub = keys.default_identity_paths()
    gen = command("generate", generate,
                  "Create a new key pair; asks for anything not given as an option.")
    gen.add_argument("-f", "--file", metavar="PATH",
                     help=f"private key path (default {default_priv}; public key: PATH.pub)")
    gen.add_argument("-N", "--passphrase", metavar="PASSPHRASE",
                     help="passphrase for the private key ('' for none)")
    gen.add_argument("-C", "--comment", metavar="COMMENT",
                     help=f"comment on the public key line (default {keys.default_comment()})")
    gen.add_argument("--force", action="store_true",
                     help="replace existing key files (without it, an existing private or "
                     "public key file is never touched)")
    _add_format(gen, "the public key file's line")

    pk = command("pubkey", pubkey, "Print the public key line of a private key (as "
                                   "ssh-keygen -y); asks for its passphrase if it has one.")
    pk.add_argument("-f", "--file", default=default_priv, metavar="PATH",
                    help=f"private key file (default {default_priv})")
    _add_format(pk, "the printed line")

    fp = command("fingerprint", fingerprint, "Show the SHA256 fingerprint of a public key.")
    fp.add_argument("path", nargs="?", default=default_pub, metavar="PUBKEY",
                    help=f"public key file (default {default_pub})")
    fp.add_argument("--randomart", action="store_true", help="also show the randomart image")

    ver = command("verify", verify, "Check a fingerprint (or randomart) against a public key; "
                                    "exit 0 if it matches, 1 if not.")
    ver.add_argument("expected", metavar="FINGERPRINT",
                     help="SHA256:... (or the randomart with --randomart; '-' reads stdin)")
    ver.add_argument("-k", "--key", default=default_pub, metavar="PUBKEY",
                     help=f"public key file to compare with (default {default_pub})")
    ver.add_argument("--randomart", action="store_true",
                     help="FINGERPRINT is a randomart image (whitespace between rows is free)")
    return parser


def _setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger = logging.getLogger("moshpit")
    logger.addHandler(handler)
    logger.setLevel(min(max(logging.WARNING - 10 * verbosity, logging.DEBUG), logging.CRITICAL))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose, quiet = args.verbose + args.verbose_before, args.quiet + args.quiet_before
    if verbose and quiet:
        parser.error("-v/--verbose and -q/--quiet are mutually exclusive")
    _setup_logging(verbose - quiet)
    terminal = Terminal.open()
    try:
        return args.func(args, terminal)
    except keys.KeyFileExists as err:
        print(f"{PROG}: {err}: pass --force to replace the key pair, or choose another "
              "file with -f; nothing was written", file=sys.stderr)
        return 1
    except MoshpitError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no key was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Our reader went away (`... | head`): stop quietly like other Unix tools; point
        # stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if terminal is not None:
            terminal.close()


if __name__ == "__main__":
    sys.exit(main())
