"""Start-up time of ``import piip`` and ``piip --help``, two source trees side by side.

Run: ``python benchmarks/startup.py --trees OLD/src NEW/src --repeats 9``. Each repeat runs every
(command, tree) pair once, interleaved, in a fresh interpreter; prints medians and NEW/OLD ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {"import piip": [sys.executable, "-c", "import piip"],
            "piip --help": [sys.executable, "-m", "piip.cli", "--help"]}


def _seconds(cmd: list[str], src: str) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs=2, required=True, metavar=("OLD", "NEW"), help="two src/ folders")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    for tree in args.trees:
        if not os.path.isdir(os.path.join(tree, "piip")):
            ap.error(f"--trees {tree}: expected a src folder holding piip/")
    times = {(c, t): [] for c in COMMANDS for t in args.trees}
    for _ in range(args.repeats):
        for c, cmd in COMMANDS.items():
            for t in args.trees:
                times[c, t].append(_seconds(cmd, t))
    old, new = args.trees
    for c in COMMANDS:
        a, b = statistics.median(times[c, old]), statistics.median(times[c, new])
        print(f"{c:12s}  old {a:.3f} s  new {b:.3f} s  new/old {b / a:.3f}")


if __name__ == "__main__":
    main()
