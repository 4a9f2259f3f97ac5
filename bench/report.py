"""The one results table (markdown), the target verdicts, and BENCHMARKS.md: the
generated part lives between two markers; everything outside them is hand-written
and kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

BEGIN = "<!-- bench:generated:begin (written by `make bench`; edit outside these markers) -->"
END = "<!-- bench:generated:end -->"

HEADER = """# Benchmarks

Measured with `make bench` (`python -m bench`, see `bench/__init__.py` for what each row
means). The section between the markers below is overwritten by every run that writes
this file; notes outside it are hand-written.

"""


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.0f}%"


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024 / 1024:.0f}"


@dataclass(slots=True)
class Row:
    target: str
    phase: str
    rate: float | None = None
    ratio: float | None = None
    p50: float | None = None
    p99: float | None = None
    p999: float | None = None
    cpu_us: float | None = None
    rss: str = ""
    notes: str = ""

    def cells(self) -> list[str]:
        return [self.target, self.phase, _num(self.rate), pct(self.ratio), _ms(self.p50), _ms(self.p99),
                _ms(self.p999), _num(self.cpu_us), self.rss or "-", self.notes]


@dataclass
class Report:
    command: str
    date: str
    machine: str
    settings: str
    revision: str = ""
    rows: list[Row] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)

    def table(self) -> str:
        head = ["target", "phase", "msg/s", "vs no-op", "p50 ms", "p99 ms", "p99.9 ms", "server CPU µs/msg",
                "server RSS MB", "notes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |")
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [
            f"Command: `{self.command}`  ",
            f"Date: {self.date}  ",
            f"Code: {self.revision}  ",
            f"Machine: {self.machine}  ",
            f"Settings: {self.settings}",
            "",
            self.table(),
            "",
        ]
        if self.verdicts:
            parts += ["Targets:", ""] + [f"- {v}" for v in self.verdicts] + [""]
        if self.skipped:
            parts += ["Skipped:", ""] + [f"- {s}" for s in self.skipped] + [""]
        if self.profile:
            parts += ["<details><summary>py-spy profiles (extra phases, not the measured ones)</summary>", "",
                      "```", *self.profile, "```", "", "</details>", ""]
        return "\n".join(parts)


def write_benchmarks(path: Path, generated: str) -> None:
    """Replace the generated section of ``path`` (create the file with a header when
    it does not exist or has no markers)."""
    block = f"{BEGIN}\n{generated.rstrip()}\n{END}\n"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = HEADER
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        rest = text[end + len(END):].strip("\n")
        text = text[:start] + block + (f"\n{rest}\n" if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
