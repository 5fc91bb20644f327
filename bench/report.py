"""Benchmark results: the record of one (scenario, tool) run, the table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

from scenarios import Scenario

PEERS = ("ssh", "mosh")


@dataclass
class Result:
    """Outcome of one scenario for one tool: summarized metrics, raw samples, or why not."""

    scenario: str
    tool: str
    metrics: dict = field(default_factory=dict)   # metric key -> summarized value
    samples: dict = field(default_factory=dict)   # metric key -> raw samples
    note: str = ""                                # n/a or skipped: why
    error: str = ""                               # failed: what went wrong
    seconds: float = 0.0
    relay_stats: dict = field(default_factory=dict)
    server_log_tail: str = ""


def _cell(result: Result | None, key: str) -> str:
    if result is None:
        return "-"
    if result.error:
        return "error"
    if result.note:
        return "n/a"
    value = result.metrics.get(key)
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _ratio(mine: Result | None, peer: Result | None, key: str) -> str:
    try:
        a, b = mine.metrics[key], peer.metrics[key]
    except (AttributeError, KeyError):
        return ""
    return f"{a / b:.2f}" if b else ""


def table(scenarios: list[Scenario], results: list[Result], tools: list[str]) -> str:
    """One table: a row per metric, a column per tool, then moshpit/peer ratios."""
    by_key = {(r.scenario, r.tool): r for r in results}
    peers = [p for p in PEERS if p in tools] if "moshpit" in tools else []
    header = ["metric", "unit", "better"] + tools + [f"mp/{p}" for p in peers]
    rows = [header]
    for scenario in scenarios:
        for metric in scenario.metrics:
            mine = by_key.get((scenario.name, "moshpit"))
            row = [metric.label, metric.unit, metric.better]
            row += [_cell(by_key.get((scenario.name, t)), metric.key) for t in tools]
            row += [_ratio(mine, by_key.get((scenario.name, p)), metric.key) for p in peers]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = sorted({f"{r.tool} {r.scenario}: {r.note or r.error}"
                    for r in results if r.note or r.error}
                   | {f"{tool} {s.name}: {caveat}" for s in scenarios
                      for tool, caveat in s.caveats.items() if tool in tools})
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def machine() -> dict:
    return {"host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg()}


def write_json(path: str, results: list[Result], meta: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc = dict(meta, date=time.strftime("%Y-%m-%d %H:%M:%S %z"), machine=machine(),
               results=[asdict(r) for r in results])
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
