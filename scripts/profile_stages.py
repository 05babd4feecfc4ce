#!/usr/bin/env python
"""Peak memory and time of each stage of one onnxrep run, in this process (Linux only).

    python scripts/profile_stages.py MODEL.onnx [--no-verify]

Runs ``onnxrep.optimized`` on MODEL with the command line's allocator setting and, at every stage
the progress callback reports (and when the result is handed over), prints the stage's wall time,
the peak resident memory since the previous stage (VmHWM, reset between stages through
/proc/self/clear_refs) and the resident memory at its end. Nothing is written. Whole command lines
are measured by scripts/bench_zoo_large.py and scripts/bench.py; this shows where a peak comes from.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxrep  # noqa: E402
from onnxrep import runtime  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    raise SystemExit(f"no {key} in /proc/self/status: this script needs Linux")


class Stages:
    def __init__(self):
        self.stage, self.start = "loading", time.perf_counter()

    def __call__(self, stage: str, count=None) -> None:
        if count is not None:  # a rewrite within a stage
            return
        now = time.perf_counter()
        print(f"{self.stage:>28s}  {now - self.start:7.2f} s  peak {_status('VmHWM'):6d} MiB  "
              f"end {_status('VmRSS'):6d} MiB", flush=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current size
        self.stage, self.start = stage, now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    runtime.tune_allocator()
    print(f"{'stage':>28s}  {'time':>9s}  {'peak RSS':>15s}  {'RSS at its end':>14s}")
    stages = Stages()
    with onnxrep.optimized(args.model, verify=not args.no_verify, progress=stages) as (_, report):
        stages("(result handed over)")
    print(f"file {os.path.getsize(args.model) / 2**20:.0f} MiB; {report.summary().splitlines()[0]}")


if __name__ == "__main__":
    main()
