#!/usr/bin/env python
"""onnxrep on the fixtures exported by other frameworks, against their deploy references.

Run from the repository root with onnxrep's own dependencies (no framework needed: the fixtures
and their deploy references are committed under models/<exporter>/)::

    python scripts/bench_frameworks.py                    # every models/*/manifest.json
    python scripts/bench_frameworks.py --only tf2onnx     # one exporter folder
    python scripts/bench_frameworks.py --budget 0         # counts and times, no latency

For every manifest entry: ``onnxrep.optimize`` on the training-structure file (verification
on, wall time of the call), op counts before, after and of the deploy reference
(``deploy_file``, the same network fused by the export script and exported the same way), and
onnxruntime CPU latency (ORT_ENABLE_ALL, one thread, batch 1 at the fixture's input shape) of
the training export, onnxrep's output and the deploy reference, measured side by side:
``--budget`` seconds per fixture of rounds that each run every variant once, in an order
that rotates each round; reported as the median per variant and the median of per-round
ratios to the reference (steadier on a shared machine).

With ``--onnxslim "CMD"`` (a command that runs onnxslim, e.g. ``"/path/to/venv/bin/python -m
onnxslim"``; onnxslim is not one of onnxrep's dependencies), both tools' whole command lines
also run on every fixture, each in its own process, twice in alternating order: the faster
wall time of each and that run's peak RSS (``os.wait4``) are added to the table.

Writes the markdown table to stdout and, with ``--out FILE``, to FILE as well.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxrep  # noqa: E402

SHOWN = ("Conv", "BatchNormalization", "Add", "Mul", "Transpose", "Concat")


def entries(only):
    for manifest in sorted(glob.glob(os.path.join(ROOT, "models", "*", "manifest.json"))):
        folder = os.path.dirname(manifest)
        if only and os.path.basename(folder) not in only:
            continue
        with open(manifest) as f:
            for e in json.load(f):
                yield folder, e


def counts(model):
    c = collections.Counter(n.op_type for n in model.graph.node)
    return {op: c.get(op, 0) for op in SHOWN}


def session(model):
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])


def feeds_for(sess, shape):
    rng = np.random.default_rng(0)
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return {inp.name: rng.standard_normal([1] + list(shape[1:])).astype(dtype)}


def latency(models, shape, budget, min_rounds=30):
    sessions = {k: session(m) for k, m in models.items()}
    feeds = {k: feeds_for(s, shape) for k, s in sessions.items()}
    keys = list(sessions)
    for k in keys:  # warm-up
        for _ in range(3):
            sessions[k].run(None, feeds[k])
    samples = {k: [] for k in keys}
    start, r = time.perf_counter(), 0
    while r < min_rounds or time.perf_counter() - start < budget:
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            samples[k].append(time.perf_counter() - t)
        r += 1
    med = {k: statistics.median(v) for k, v in samples.items()}
    paired = {k: statistics.median(a / b for a, b in zip(samples[k], samples["deploy"])) for k in keys}
    return med, paired, r


#: Runs a command and reports its peak RSS. A child's peak counts the size of the process it was
#: forked from, and this script holds onnxrep, onnxruntime and the fixtures: the tools are
#: started from this small launcher instead, so their peaks are their own.
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")


def measured(argv):
    """(wall seconds, peak RSS MiB, None) of a command run in its own process, or (None, None,
    its last line of stderr) when it fails."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t
    err = p.stderr.decode(errors="replace").strip().splitlines()
    peak = [int(line.split()[1]) for line in err if line.startswith("maxrss ")]
    err = [line for line in err if not line.startswith("maxrss ")]
    if p.returncode != 0 or not peak:
        return None, None, (err[-1] if err else f"exit status {p.returncode}")
    return wall, peak[-1] / 1024, None


def command_lines(path, onnxslim):
    """Best-of-two wall time and its peak RSS for onnxrep's and onnxslim's command lines; a tool
    that fails gets (None, error)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tools = {"onnxrep": [sys.executable, "-m", "onnxrep", path, "-o", os.path.join(tmp, "rep.onnx"), "-q"],
                 "onnxslim": shlex.split(onnxslim) + [path, os.path.join(tmp, "slim.onnx")]}
        best = {}
        for r in range(2):
            for tool in (list(tools) if r == 0 else list(tools)[::-1]):
                wall, rss, err = measured(tools[tool])
                if err is not None:
                    best[tool] = (None, err)
                elif tool not in best or (best[tool][0] is not None and wall < best[tool][0]):
                    best[tool] = (wall, rss)
    return best


def fmt_counts(c, ref=None):
    parts = []
    for op in SHOWN:
        if c[op] or (ref and ref[op]):
            parts.append(f"{op[:4] if op != 'BatchNormalization' else 'BN'} {c[op]}")
    return ", ".join(parts) or "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="exporter folders under models/ (tf2onnx, jax2onnx, paddle2onnx)")
    p.add_argument("--budget", type=float, default=6.0, help="latency seconds per fixture (0: skip latency)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--onnxslim", metavar="CMD", help="command running onnxslim: adds both command lines' "
                   "wall time and peak memory")
    args = p.parse_args(argv)

    head = ("| exporter | fixture | framework | before | **onnxrep** | deploy reference | onnxrep s | "
            "latency / deploy: train | **onnxrep** |")
    rule = "|---|---|---|---|---|---|---:|---:|---:|"
    if args.onnxslim:
        head += " CLI s: onnxrep / onnxslim | peak MiB: onnxrep / onnxslim |"
        rule += "---:|---:|"
    lines, failures = [head, rule], []
    for folder, e in entries(args.only):
        path = os.path.join(folder, e["file"])
        original = onnx.load(path)
        deploy = onnx.load(os.path.join(folder, e["deploy_file"]))
        t = time.perf_counter()
        out, report = onnxrep.optimize(path)
        secs = time.perf_counter() - t
        assert report.verification.ok
        before, after, ref = counts(original), counts(out), counts(deploy)
        lat_train = lat_rep = "-"
        if args.budget > 0:
            med, paired, rounds = latency({"train": original, "onnxrep": out, "deploy": deploy}, e["input_shape"],
                                          args.budget)
            lat_train, lat_rep = f"{paired['train']:.2f}", f"**{paired['onnxrep']:.2f}**"
        name = os.path.relpath(path, os.path.join(ROOT, "models"))
        row = (f"| {e['exporter']} | {name} | {e['framework']} | {fmt_counts(before)} | "
               f"**{fmt_counts(after, ref)}** | {fmt_counts(ref)} | {secs:.2f} | {lat_train} | {lat_rep} |")
        if args.onnxslim:
            best = command_lines(path, args.onnxslim)
            wall = " / ".join("fails" if w is None else f"{w:.1f}" for w, _ in best.values())
            peak = " / ".join("fails" if w is None else f"{r:.0f}" for w, r in best.values())
            row += f" {wall} | {peak} |"
            failures.extend(f"{name}: {tool} fails: {r}" for tool, (w, r) in best.items() if w is None)
        lines.append(row)
        print(lines[-1], file=sys.stderr, flush=True)
    if failures:
        lines += [""] + [f"- {f}" for f in failures]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
