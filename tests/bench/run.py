"""Run the benchmarks in tests/bench and write tests/bench/RESULTS.md.

Each ``bench_<name>.py`` has ``main() -> str`` returning a markdown section whose figures are
ratios against a baseline measured side by side in the same run (machines here are noisy).
``python tests/bench/run.py [name ...]`` runs all or some; sections of benches not run are kept.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MARK = "<!-- bench:{name} -->"


def _load(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while it executes
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> dict[str, str]:
    found = re.findall(r"<!-- bench:(\w+) -->\n(.*?)(?=<!-- bench:\w+ -->|\Z)", text, flags=re.S)
    return {name: body.rstrip() + "\n" for name, body in found}


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE.parents[1]))
    available = {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}
    chosen = argv or list(available)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(available)}", file=sys.stderr)
        return 2
    sections = _sections(RESULTS.read_text()) if RESULTS.exists() else {}
    failed = 0
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            body = _load(available[name]).main()  # type: ignore[attr-defined]
        except Exception:  # a broken bench is reported in the results, the others still run
            failed += 1
            body = f"### {name}\n\nFAILED:\n\n```\n{traceback.format_exc()}```\n"
        took = time.monotonic() - started
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        sections[name] = f"{body.rstrip()}\n\n_run {stamp}, {took:.0f} s_\n"
    header = (
        "# Benchmark results\n\n"
        "Written by `make bench` (`python tests/bench/run.py`). Every figure is a ratio against a\n"
        "baseline measured side by side in the same run, so a noisy machine moves both.\n"
        f"Last machine: {platform.node() or 'unknown'}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}.\n\n"
    )
    body = "\n".join(f"{MARK.format(name=n)}\n{s}" for n, s in sorted(sections.items()))
    RESULTS.write_text(header + body)
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
