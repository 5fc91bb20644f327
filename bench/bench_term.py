#!/usr/bin/env python3
"""Screen model benchmark: how fast moshpit_term eats typical terminal output, and how big a
full repaint is.

Usage: bench/bench_term.py [--mb N] [--chunk BYTES] [--json PATH] [--no-record]

Measures
- MB per CPU second (best of 3) of Terminal.feed on recorded real output, fed in
  PTY-read-sized chunks: vim (syntax, scrolling), less (paging), top (refreshing), colourful
  ``ls -l``, plain text (``cat``), and their mix (the figure the issue asks for: >= 10 MB/s),
  the mix without plain text, and generated floods: bench/run.py's bulk output (base64 -w
  100) and ``yes``. The recordings come from programs run in a private tmux server
  (tests/tmux_util.py); without tmux, synthetic stand-ins;
- the same for pyte (the pure-Python emulator in requirements-dev) on the mix, as context;
- serialize() size for a full 200x50 screen: plain text, syntax-coloured text, and every
  cell a different colour (the worst case), plus the time serialize() takes.

Prints a table and writes JSON to bench/results/term-<time>.json.  Not a test: the numbers
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import moshpit_term as mterm  # noqa: E402

ROWS, COLS = 24, 80
TARGET_MB_PER_S = 10.0
SETTLE_SECS = 0.3

# Each recording: (name, shell lines to type). "KEYS:" lines are tmux key names; "SLEEP:n"
# waits n seconds; "NOWAIT:" types a line without waiting for the screen to settle (top).
RECORDINGS = [
    ("vim", ["vim -u NONE -i NONE -N -c 'syntax on' -c 'set laststatus=2 ruler' sample.py",
             *["KEYS:C-f"] * 25, *["KEYS:C-b"] * 10, "KEYS::split", "KEYS:Enter",
             *["KEYS:j"] * 40, "KEYS::qa!", "KEYS:Enter"]),
    ("less", ["less -R colour.txt", *["KEYS:Space"] * 30, "KEYS:g", "KEYS:/line 7",
              "KEYS:Enter", *["KEYS:n"] * 10, "KEYS:q"]),
    ("top", ["NOWAIT:top -d 0.2", "SLEEP:4", "KEYS:q"]),
    ("ls", ["ls --color=always -l /usr/bin /usr/lib /usr/share | head -4000"]),
    ("plain", ["cat plain.txt"]),
]


def sample_files(directory: str) -> None:
    rnd = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "return", "import", "class", "def", "self",
             "value", "result", "None", "True", "for", "in", "range", "print", "data"]
    with open(os.path.join(directory, "sample.py"), "w") as f:
        for i in range(600):
            f.write(f"def function_{i}(x, y={i}):\n")
            f.write("    " + " ".join(rnd.choice(words) for _ in range(9)) + f"  # {i}\n")
            f.write(f"    return \"text {i}\" + str(x * {i})\n")
    with open(os.path.join(directory, "colour.txt"), "w") as f:
        for i in range(3000):
            f.write(f"\x1b[1;3{i % 8}mline {i}\x1b[0m " + " ".join(
                rnd.choice(words) for _ in range(10)) + "\n")
    with open(os.path.join(directory, "plain.txt"), "w") as f:
        for _ in range(40000):
            f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 13))) + "\n")


def record() -> dict:
    """Run each program in a tmux pane and return {name: bytes it wrote}."""
    from tmux_util import COLOUR_PS1, TmuxOracle  # noqa: E402 (tests helper)

    streams = {}
    with tempfile.TemporaryDirectory() as directory:
        sample_files(directory)
        with TmuxOracle(directory, ROWS, COLS) as tmux:
            for name, lines in RECORDINGS:
                pane = tmux.new_pane(name, f"env PS1='{COLOUR_PS1}' bash --norc --noprofile -i")
                tmux.wait_quiet(pane, quiet_secs=SETTLE_SECS)
                tmux.type(pane, f"cd {directory}")
                for line in lines:
                    kind, _, arg = line.partition(":") if line[:1].isupper() else ("", "", line)
                    if kind == "KEYS":
                        tmux.send(pane, arg)
                    elif kind == "SLEEP":
                        time.sleep(float(arg))
                        continue
                    else:
                        tmux.type(pane, arg)
                    if kind != "NOWAIT":
                        tmux.wait_quiet(pane, quiet_secs=0.1 if kind else SETTLE_SECS,
                                        timeout=60)
                streams[name] = tmux.raw(pane)
    return streams


def synthetic() -> dict:
    """Stand-ins when tmux is missing: coloured listings, plain text, cursor-addressed
    full-screen redraws."""
    rnd = random.Random(3)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    ls = b"".join(b"-rw-r--r-- 1 root root %6d Nov 30 12:00 \x1b[01;3%dm%s\x1b[0m\r\n"
                  % (rnd.randint(0, 99999), rnd.randint(1, 7), rnd.choice(words))
                  for _ in range(20000))
    plain = b"".join(b" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 13))) + b"\r\n"
                     for _ in range(40000))
    screen = b"".join(b"\x1b[%d;1H\x1b[38;5;%dm%s\x1b[m\x1b[K" % (
        row % ROWS + 1, rnd.randint(0, 255), b" ".join(rnd.choice(words) for _ in range(8)))
        for row in range(30000))
    return {"ls": ls, "plain": plain, "vim": screen}


def generated() -> dict:
    """What bench/run.py's bulk scenario prints (base64 -w 100 of random bytes) and the
    densest line flood there is (yes)."""
    encoded = base64.b64encode(random.Random(9).randbytes(3_000_000) if hasattr(
        random.Random, "randbytes") else os.urandom(3_000_000))
    bulk = b"\r\n".join(encoded[i:i + 100] for i in range(0, len(encoded), 100)) + b"\r\n"
    return {"bulk (base64 -w 100)": bulk, "yes": b"y\r\n" * 500_000}


def feed_rate(data: bytes, chunk: int, target_mb: float, runs: int = 3) -> float:
    """MB per CPU second of a fresh model fed ``data`` (repeated to about ``target_mb``)
    in chunks; the best of ``runs`` (CPU time, so other load on the machine counts less)."""
    repeat = max(1, int(target_mb * 1e6 / max(len(data), 1)))
    best = float("inf")
    for _ in range(runs):
        term = mterm.Terminal(ROWS, COLS)
        start = time.process_time()
        for _ in range(repeat):
            for pos in range(0, len(data), chunk):
                term.feed(data[pos:pos + chunk])
        best = min(best, time.process_time() - start)
    return len(data) * repeat / best / 1e6


def pyte_rate(data: bytes, chunk: int) -> float:
    try:
        import pyte
    except ImportError:
        return float("nan")
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    data = data[:1_000_000]
    start = time.process_time()
    for pos in range(0, len(data), chunk):
        try:
            stream.feed(data[pos:pos + chunk])
        except TypeError:  # pyte 0.8 crashes on vim 9's CSI > 4;2 m: start over, go on
            stream = pyte.ByteStream(screen)
    return len(data) / (time.process_time() - start) / 1e6


def full_screens() -> dict:
    """serialize() bytes and milliseconds for a 200x50 screen filled three ways."""
    rnd = random.Random(5)
    rows, cols = 50, 200
    words = ["alpha", "beta", "gamma", "delta", "return", "import", "class", "def", "self"]

    def line(coloured: bool) -> str:
        out, used = [], 0
        while used < cols:
            word = rnd.choice(words)
            word = word[:cols - used]
            out.append(f"\x1b[38;5;{rnd.randint(0, 255)}m{word}\x1b[m" if coloured else word)
            used += len(word)
            if used < cols:
                out.append(" ")
                used += 1
        return "".join(out)

    screens = {
        "plain text": "\r\n".join(line(False) for _ in range(rows)),
        "syntax colours": "\r\n".join(line(True) for _ in range(rows)),
        "every cell a new colour": "\r\n".join(
            "".join(f"\x1b[38;2;{rnd.randint(0, 255)};{rnd.randint(0, 255)};0mx"
                    for _ in range(cols)) for _ in range(rows)),
    }
    results = {}
    for name, text in screens.items():
        term = mterm.Terminal(rows, cols)
        term.feed(text.encode())
        start = time.perf_counter()
        data = term.serialize()
        elapsed = time.perf_counter() - start
        copy = mterm.Terminal(rows, cols)
        copy.feed(data)
        assert copy.display() == term.display(), name
        results[name] = {"bytes": len(data), "ms": elapsed * 1e3}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="MB fed per measurement")
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per feed() call")
    parser.add_argument("--no-record", action="store_true", help="synthetic input only")
    parser.add_argument("--json", help="where to write the results (default bench/results/)")
    args = parser.parse_args()

    if not args.no_record and shutil.which("tmux"):
        streams = record()
        source = "recorded in tmux"
    else:
        streams = synthetic()
        source = "synthetic (no tmux)"
    # (The synthetic stand-ins have no less or top: their mix is of what there is.)
    interactive = b"".join(streams.get(name, b"") for name in ("vim", "less", "top", "ls"))
    streams["mix"] = b"".join(streams.values())
    streams["interactive mix"] = interactive
    streams.update(generated())
    rates = {name: feed_rate(data, args.chunk, args.mb) for name, data in streams.items()}
    rates["mix, 64 KiB chunks"] = feed_rate(streams["mix"], 65536, args.mb)
    rates["mix, 256-byte chunks"] = feed_rate(streams["mix"], 256, args.mb)
    pyte = pyte_rate(streams["mix"], args.chunk)
    repaint = full_screens()

    print(f"moshpit_term feed() speed, input {source}, {args.chunk}-byte chunks:")
    for name, rate in rates.items():
        size = len(streams.get(name, streams["mix"]))
        target = f">= {TARGET_MB_PER_S:.0f} MB/s" if name == "mix" else ""
        print(f"  {name:<22} {rate:8.1f} MB/s  ({size / 1e3:8.1f} kB input)  {target}")
    print(f"  {'pyte, mix (context)':<22} {pyte:8.1f} MB/s")
    print("serialize() of a full 200x50 screen:")
    for name, result in repaint.items():
        print(f"  {name:<24} {result['bytes']:8d} bytes  {result['ms']:6.1f} ms")

    path = args.json or os.path.join(HERE, "results", time.strftime("term-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as out:
        json.dump({"source": source, "chunk": args.chunk, "mb_per_s": rates,
                   "pyte_mb_per_s": pyte, "repaint_200x50": repaint,
                   "recorded_bytes": {k: len(v) for k, v in streams.items()},
                   "python": platform.python_version(), "cpus": os.cpu_count()}, out, indent=2)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
