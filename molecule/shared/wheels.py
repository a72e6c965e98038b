"""Build the Carrier wheel from this checkout, and a wheelhouse of its dependencies, for Molecule.

    python wheels.py --project /path/to/checkout --out /var/tmp/carrier-molecule-wheels

Writes ``<out>/dist/carrier-<version>-py3-none-any.whl`` (rebuilt every time: the code under
test) and ``<out>/deps/*.whl`` (kept and reused: the role installs with ``--no-index
--find-links <out>/deps``, so a converge needs no network). The build runs in a copy of the
sources, so the checkout gets no ``build/`` directory. Prints ``{"wheel": ..., "deps": ...}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: What a wheel build reads from the checkout (pyproject's readme and package data included).
SOURCES = ("pyproject.toml", "README.md", "carrier")


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"],
                          capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)


def build(project: Path, out: Path) -> tuple[Path, Path]:
    dist, deps = out / "dist", out / "deps"
    deps.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="carrier-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            item = project / name
            if item.is_dir():
                shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(item, src / name)
        built = Path(tmp) / "out"
        done = _pip("wheel", "--no-deps", "-w", str(built), str(src))
        if done.returncode != 0:
            raise RuntimeError(f"building the Carrier wheel failed: {done.stderr.strip()[-2000:]}")
        (wheel,) = built.glob("carrier-*.whl")
        shutil.rmtree(dist, ignore_errors=True)
        dist.mkdir(parents=True)
        wheel = Path(shutil.move(str(wheel), dist / wheel.name))
    # Offline first (the usual case once the wheelhouse exists), then from the index for what is new.
    done = _pip("wheel", "--no-index", "--find-links", str(deps), "-w", str(deps), str(wheel))
    if done.returncode != 0:
        done = _pip("wheel", "--find-links", str(deps), "-w", str(deps), str(wheel))
        if done.returncode != 0:
            raise RuntimeError(f"building the dependency wheels failed: {done.stderr.strip()[-2000:]}")
    # pip wheel copies the requested wheel too; the one under test lives in dist/ only.
    for stale in deps.glob("carrier-*.whl"):
        stale.unlink()
    return wheel, deps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        wheel, deps = build(args.project.resolve(), args.out.resolve())
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"wheels: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"wheel": str(wheel), "deps": str(deps)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
