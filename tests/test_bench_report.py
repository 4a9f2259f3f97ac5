"""bench/report.py write_benchmarks: the generated section of BENCHMARKS.md is
replaced in place, and an --output in a directory that does not exist yet is
written, not lost at the end of a long run."""

from __future__ import annotations

from pathlib import Path

from bench.report import BEGIN, END, write_benchmarks


def test_the_generated_section_is_written_into_a_new_directory_and_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "BENCHMARKS.md"
    write_benchmarks(path, "first run")
    path.write_text(path.read_text() + "\nnotes written by hand\n")
    write_benchmarks(path, "second run")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second run" in text and "first run" not in text
    assert text.rstrip().endswith("notes written by hand")
