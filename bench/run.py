#!/usr/bin/env python3
"""`make bench`: moshpit side by side with OpenSSH and Mosh, on loopback, through the relay.

Usage: bench/run.py [--quick] [--only SCENARIO[,SCENARIO]] [--tools moshpit,ssh,mosh]
                    [--seed N] [--json PATH] [--list]

For every scenario and tool: a fresh relay (random 127.0.0.N front, fresh ports), the
tool's server on 127.0.0.1, a client inside a real PTY, the measurement, then everything
stopped by PID.  Each run is bounded in time (a failure is recorded, the bench goes on).
Missing peers are skipped with a note (this script never installs anything:
`apt-get install openssh-server mosh`).  Prints one table with moshpit/peer ratios and
writes JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests"), os.path.dirname(HERE)]

from display import pyte  # noqa: E402
from report import Result, table, write_json  # noqa: E402
from scenarios import (  # noqa: E402
    SCENARIO_NAMES, Context, Scenario, local_shell_startup, selected)
from tools import TOOLS, Network, Tool, make_workdir  # noqa: E402


class BudgetExceeded(Exception):
    """A scenario ran past its time budget."""


@contextmanager
def time_budget(seconds: float):
    """Raise BudgetExceeded in the main thread after ``seconds`` (SIGALRM)."""
    def expired(_signum, _frame):
        raise BudgetExceeded(f"exceeded its {seconds:.0f}s budget")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def unreadable(cls: type[Tool]) -> str | None:
    """Why the bench cannot read this tool's terminal (None: it can).

    A tool that sends screen states repaints only the cells that changed: a marker printed
    where the screen showed some of its characters arrives in pieces between cursor moves
    (``C:91`` ESC[39;6H ``05:Z``), so it can be found only on an emulated screen.  Matched on
    the raw output instead, most Ctrl-C samples of such a tool timed out.  The rule is the
    same for every tool: one whose screen cannot be read is not measured."""
    if cls.redraws_screen and pyte is None:
        return ("pyte is not installed, and this client repaints only changed cells, so its "
                "output cannot be read without it: run .venv/bin/python bench/run.py (as "
                "make bench does) or pip install pyte")
    return None


class Runner:
    """Runs each selected scenario for each available tool and collects Results."""

    def __init__(self, tools: list[type[Tool]], quick: bool, seed: int) -> None:
        self.tools = tools
        self.quick = quick
        self.seed = seed
        self.missing = {cls.name: cls(workdir="").missing() or unreadable(cls) for cls in tools}

    def run_all(self, scenarios: list[Scenario]) -> list[Result]:
        results = []
        try:
            for scenario in scenarios:
                for cls in self.tools:
                    result = self.run_one(scenario, cls)
                    results.append(result)
                    self._progress(result)
        except KeyboardInterrupt:  # everything started is already stopped: report so far
            print("bench: interrupted; reporting what was measured", file=sys.stderr)
        return results

    def run_one(self, scenario: Scenario, cls: type[Tool]) -> Result:
        result = Result(scenario.name, cls.name)
        if self.missing[cls.name]:
            result.note = f"skipped: {self.missing[cls.name]}"
            return result
        if scenario.needs in cls.lacks:
            result.note = cls.lacks[scenario.needs]
            return result
        workdir = make_workdir(cls.name)
        tool = cls(workdir)
        tool.predict = scenario.predict
        started = time.monotonic()
        net = ctx = None
        try:
            net = Network(tool.uses_tcp, tool.uses_udp, self.seed, scenario.udp_ports,
                          scenario.extra_tcp_ports)
            net.relay.mtu = scenario.path_mtu
            net.start()
            ctx = Context(tool, net, self.quick)
            with time_budget(scenario.budget):  # cleanup below runs outside the budget
                tool.server_config = scenario.server_config
                tool.start_server(net)
                samples = scenario.run(ctx)
            result.samples = samples
            result.metrics = {m.key: m.summarize(samples[m.key]) for m in scenario.metrics}
        except Exception as err:  # recorded, and the bench carries on with the next run
            result.error = f"{type(err).__name__}: {err}"[:500]
            result.server_log_tail = tool.server_log()[-2000:]
        finally:
            if ctx is not None:
                ctx.close()
            if net is not None:
                result.relay_stats = net.relay.stats
                net.close()
            tool.stop_server()
            shutil.rmtree(workdir, ignore_errors=True)
            result.seconds = round(time.monotonic() - started, 2)
        return result

    @staticmethod
    def _progress(result: Result) -> None:
        summary = result.note or result.error or ", ".join(
            f"{k}={v:.4g}" for k, v in result.metrics.items())
        print(f"  {result.scenario:<11} {result.tool:<8} {summary}", file=sys.stderr,
              flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced set, fewer samples")
    p.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                   help=f"run only these (repeat or comma-separate; prefixes work): "
                        f"{', '.join(SCENARIO_NAMES)}")
    p.add_argument("--tools", default="moshpit,ssh,mosh",
                   help="comma-separated subset of moshpit,ssh,mosh")
    p.add_argument("--seed", type=int, default=1, help="relay randomness (loss pattern)")
    p.add_argument("--json", metavar="PATH", help="JSON output (default bench/results/...)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p.parse_args(argv)


def interruptible_children() -> None:
    """Let the shells the servers start be interrupted, whoever started the bench.

    A bench started in the background of a script (``make bench &``, ``nohup``) inherits
    SIGINT and SIGQUIT ignored, and an ignored signal stays ignored across fork and exec:
    mosh-server passes it on to its shell, so Ctrl-C never stopped the flood and every mosh
    Ctrl-C sample timed out.  (moshpit's server resets every signal for its shells, as sshd
    does, so it hid the fault.)
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interruptible_children()
    if args.list:
        for name in SCENARIO_NAMES:
            print(name)
        return 0
    known = {cls.name: cls for cls in TOOLS}
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not wanted or any(t not in known for t in wanted):
        print(f"bench: --tools takes a subset of {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        scenarios = selected([o for arg in args.only for o in arg.split(",") if o],
                             args.quick)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    runner = Runner([known[t] for t in wanted], args.quick, args.seed)
    for name, why in runner.missing.items():
        if why:
            print(f"bench: {name} skipped: {why}", file=sys.stderr)
    print(f"bench: {len(scenarios)} scenarios x {len(wanted)} tools"
          f"{' (quick)' if args.quick else ''}", file=sys.stderr)
    meta = {"quick": args.quick, "seed": args.seed, "loadavg_at_start": os.getloadavg(),
            "skipped": {k: v for k, v in runner.missing.items() if v}}
    results = runner.run_all(scenarios)
    print(table(scenarios, results, wanted))
    if any(s.name == "connect" for s in scenarios):
        meta["local_shell_startup_ms"] = round(local_shell_startup() * 1000, 1)
        print(f"  (connect includes the login shell's own startup: "
              f"{meta['local_shell_startup_ms']:.0f} ms run locally)")
    path = args.json or os.path.join(
        HERE, "results", time.strftime("bench-%Y%m%d-%H%M%S.json"))
    versions = {cls.name: ("" if runner.missing[cls.name] else cls(workdir="").version())
                for cls in runner.tools}
    write_json(path, results, dict(meta, versions=versions))
    print(f"\nJSON: {os.path.relpath(path)}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
