"""Run the benchmark suites one after another, then the 17.4M projection and the plot.

``python benchmarks/run.py`` (``make bench``): quick sizes, a few minutes per suite on 2
cores. ``--full`` (``make bench-full``): larger inputs and more repeats. ``--only`` picks
suites. Each suite writes its JSON under results/ and its table in README.md; a suite that
fails is reported and the others still run (the exit status says so).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import HERE

QUICK = {
    "ingest": ["--sizes", "16384", "65536", "--repeats", "3"],
    "dedup": ["--n", "25000", "--images", "4096"],
    "embed": ["--images", "384", "--repeats", "2"],
    "env": ["--points", "1000000", "--repeats", "3"],
}
FULL = {
    "ingest": ["--sizes", "32768", "131072", "--repeats", "5"],
    "dedup": ["--n", "100000", "--images", "16384"],
    "embed": ["--images", "1024", "--repeats", "3"],
    "env": ["--points", "4000000", "--repeats", "5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(QUICK), default=sorted(QUICK))
    args = parser.parse_args()
    failed = []
    for suite in args.only:
        cmd = [sys.executable, str(HERE / f"bench_{suite}.py"), *(FULL if args.full else QUICK)[suite]]
        print(f"=== {suite}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=HERE.parent).returncode:
            failed.append(suite)
        print(f"=== {suite}: {time.perf_counter() - start:.0f} s", flush=True)
    for script in ("project.py", "plot.py"):
        if subprocess.run([sys.executable, str(HERE / script)], cwd=HERE.parent).returncode:
            failed.append(script)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
