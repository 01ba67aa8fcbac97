"""Benchmark results: what each benchmark returns, and the Markdown and JSON written from them."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.cpu import THREAD_KINDS


@dataclass(frozen=True, slots=True)
class Target:
    benchmark: str
    figure: str
    measured: str
    target: str
    met: bool | None  # None: no target, reported for information


@dataclass
class Section:
    name: str  # "B1"
    title: str
    lines: list[str] = field(default_factory=list)  # Markdown of the details
    data: dict[str, object] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def cpu_lines(rows: list[dict[str, float | str]], wall: float, what: str) -> list[str]:
    """The per-process CPU breakdown of a CpuMeter, as Markdown, with the CPU seconds of each
    kind of thread in the Python services (main = event loop; in a worker the other Python
    threads are the image pool)."""
    return [
        f"CPU by process during {what} ({wall:.1f} s of wall time; 100 % = one core busy):",
        "",
        *table(
            ("process", "CPU s", "% of one core", "share of machine", *THREAD_KINDS),
            [
                (
                    r["process"],
                    r["cpu_s"],
                    r["core_percent"],
                    f"{r['machine_share_percent']} %",
                    *(r.get(kind, "") for kind in THREAD_KINDS),
                )
                for r in rows
            ],
        ),
        "",
    ]


def markdown(header: dict[str, object], sections: list[Section]) -> str:
    machine = header["machine"]
    assert isinstance(machine, dict)
    changed = header["settings_changed"]
    lines = [
        f"# imgpipe benchmarks ({header['date']})",
        "",
        f"Command: `{header['command']}` — {header['benchmarks']}; took"
        f" {header['duration_s']:.0f} s.",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB,"
        f" Python {machine['python']}, Pillow {machine['pillow']}; load average"
        f" {machine['loadavg_at_start']:.2f} at the start.",
        "",
        f"Each figure is the median of {header['runs']} runs."
        + (f" Settings changed from the defaults: `{changed}`." if changed else "")
        + " Memory is in MB (10^6 bytes).",
        "",
        "## Targets",
        "",
        *table(
            ("benchmark", "figure", "measured", "target", "result"),
            [
                (t.benchmark, t.figure, t.measured, t.target, _verdict(t.met))
                for s in sections
                for t in s.targets
            ],
        ),
        "",
    ]
    for section in sections:
        lines += [f"## {section.name}: {section.title}", "", *section.lines, ""]
    return "\n".join(lines).rstrip() + "\n"


def _verdict(met: bool | None) -> str:
    return "—" if met is None else "pass" if met else "**miss**"


def write(folder: Path, stem: str, header: dict[str, object], sections: list[Section]) -> str:
    """Write <stem>.md and <stem>.json under `folder`; returns the Markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(header, sections)
    document = header | {
        "targets": [asdict(t) for s in sections for t in s.targets],
        "benchmarks": {s.name: {"title": s.title, **s.data} for s in sections},
    }
    (folder / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(text)
    return text
