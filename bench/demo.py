"""How fast ``koinonia demo`` builds its history: seconds and rows/s per size.

Starts the embedded Postgres and Redis only (the demo writes Postgres alone; fsync on
unless ``--unsafe``), then runs ``koinonia demo`` as a user would, once per size, and
prints the wall time of the command (start-up and the owner's argon2id hash included),
the build time the command reports, and the rows written. Prints numbers; asserts
nothing.

    uv run python bench/demo.py                               # 300 x 30 and 2000 x 36
    uv run python bench/demo.py --size 300x30 --size 2000x36 --size 10000x36
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.stack import Stack, free_ports  # noqa: E402

DONE = re.compile(r"demo: done: (\d+) rows, \d+ rows/s, ([\d.]+) s")
SUMMARY = re.compile(r"demo: (\d+) members, .*")


def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-demo-bench-"))
    web_port, sim_port = free_ports(2)
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env={**os.environ, "KOINONIA_LOG_LEVEL": "WARNING"},
        fast_unsafe=args.unsafe,
        quiet=True,
    )
    uv = shutil.which("uv")
    command = [uv, "run", "--no-sync", "koinonia"] if uv else [sys.executable, "-m", "deploy.cli"]
    try:
        stack.start_stores()
        print(f"{'members x months':>17} {'wall s':>7} {'build s':>8} {'rows':>9} {'rows/s':>8}")
        for size in args.size:
            members, months = size.split("x")
            started = time.monotonic()
            done = subprocess.run(
                [*command, "demo", "--members", members, "--months", months],
                cwd=ROOT,
                env=stack.env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            wall = time.monotonic() - started
            if done.returncode != 0:
                sys.exit(f"koinonia demo {size} failed:\n{done.stderr}")
            json.loads(done.stdout)
            found = DONE.search(done.stderr)
            if found is None:
                sys.exit(f"no summary in:\n{done.stderr}")
            rows, build = int(found.group(1)), float(found.group(2))
            print(f"{size:>17} {wall:7.1f} {build:8.1f} {rows:9d} {rows / build:8.0f}")
            summary = SUMMARY.search(done.stderr)
            if summary is not None:
                print(f"{'':>17} {summary.group(0)}")
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        action="append",
        default=None,
        help="MEMBERSxMONTHS, repeatable (default: 300x30 and 2000x36)",
    )
    parser.add_argument("--unsafe", action="store_true", help="Postgres with fsync off")
    args = parser.parse_args()
    args.size = args.size or ["300x30", "2000x36"]
    run(args)


if __name__ == "__main__":
    main()
