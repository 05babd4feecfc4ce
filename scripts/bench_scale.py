#!/usr/bin/env python
"""Speed and scale of onnxrep itself on a synthetic RepVGG-style chain.

Run (from the repository root; needs onnx, onnxruntime, onnx-graphsurgeon, numpy)::

    python scripts/bench_scale.py                       # N = 50, 200, 800, 3200 blocks
    python scripts/bench_scale.py --blocks 50 200 800   # other chain lengths
    python scripts/bench_scale.py --verify-draws 1      # fewer verification draws
    python scripts/bench_scale.py --no-verify           # optimize only
    python scripts/bench_scale.py --skip collapse_affine_region   # leave a rule out
    python scripts/bench_scale.py --repeat 3            # fastest of 3 runs per N (noisy machines)
    python scripts/bench_scale.py --blocks 800 --profile /tmp/prof   # cProfile each run

What it builds: with ``onnx.helper``, a chain of N training-structure RepVGG blocks on an input
``[1, C, H, W]`` (default C=8, H=W=8)::

    y = Relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))

with random conv weights (no conv bias, as RepVGG exports them), randomized BN statistics and
affine parameters, all initializers float32, opset 17. Every model is built and written by its
own subprocess (the driver stays small) to a temporary folder that is removed at the end
(``--keep DIR`` writes them to DIR and keeps them).

What it measures, per N, each in a fresh subprocess (so that peak RSS belongs to one run):

* the model file size;
* ``onnxrep.optimize(path, verify_draws=..., verify=...)``, after ``runtime.tune_allocator()``
  as the command line calls it: ``report.timings`` (load,
  optimize, verify, total; "other" = total - load - optimize - verify is the before/after
  statistics), optimize and verify time per block, Conv count before/after, and the child's
  peak RSS (``VmHWM`` of /proc/self/status on Linux, which unlike ``ru_maxrss`` does not
  inherit the parent's peak across fork + exec; ``ru_maxrss`` elsewhere);
* a baseline child that only imports onnxrep and onnxruntime and loads the model with
  ``onnx.load``: its peak RSS is "the runtime's own" (interpreter, libraries, the loaded proto).

It prints a table and the ratios checked against the targets of the benchmark issue:

* optimize time per block at the largest N / at N=200 (target <= 1.3: flat, no quadratic scans);
* (peak RSS - baseline RSS) / model file size (target < 3).

All numbers are machine-dependent (CPU, core count, library versions, memory allocator); compare
ratios, or absolute numbers only between runs on one machine. ``--repeat R`` runs each child R
times and keeps the fastest timings (and the smallest peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- model construction ---------------------------------------------------------------------


def build_chain(n_blocks: int, channels: int = 8, size: int = 8, seed: int = 0):
    """A RepVGG-style chain of ``n_blocks`` training-structure blocks as an onnx.ModelProto."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = channels
    nodes, inits = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def bn(prefix, x, y):
        # Randomized statistics (never an identity); gamma scaled so activations stay O(1)
        # over thousands of blocks (each block is contractive on average).
        gamma = rng.uniform(0.2, 0.5, c)
        beta = rng.normal(0.0, 0.1, c)
        mean = rng.normal(0.0, 0.1, c)
        var = rng.uniform(0.5, 1.5, c)
        names = [init(f"{prefix}.{k}", v) for k, v in
                 (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var))]
        nodes.append(helper.make_node("BatchNormalization", [x] + names, [y], name=f"{prefix}.bn", epsilon=1e-5))

    x = "input"
    for i in range(n_blocks):
        p = f"block{i}"
        w3 = init(f"{p}.dense.conv.weight", rng.normal(0.0, 1.0 / np.sqrt(9 * c), (c, c, 3, 3)))
        w1 = init(f"{p}.1x1.conv.weight", rng.normal(0.0, 1.0 / np.sqrt(c), (c, c, 1, 1)))
        nodes.append(helper.make_node("Conv", [x, w3], [f"{p}.dense.conv.out"], name=f"{p}.dense.conv",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]))
        nodes.append(helper.make_node("Conv", [x, w1], [f"{p}.1x1.conv.out"], name=f"{p}.1x1.conv",
                                      kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1]))
        bn(f"{p}.dense", f"{p}.dense.conv.out", f"{p}.dense.out")
        bn(f"{p}.1x1", f"{p}.1x1.conv.out", f"{p}.1x1.out")
        bn(f"{p}.identity", x, f"{p}.identity.out")
        nodes.append(helper.make_node("Add", [f"{p}.dense.out", f"{p}.1x1.out"], [f"{p}.add0"], name=f"{p}.add0"))
        nodes.append(helper.make_node("Add", [f"{p}.add0", f"{p}.identity.out"], [f"{p}.sum"], name=f"{p}.add1"))
        y = "output" if i == n_blocks - 1 else f"{p}.out"
        nodes.append(helper.make_node("Relu", [f"{p}.sum"], [y], name=f"{p}.relu"))
        x = y

    graph = helper.make_graph(
        nodes, f"repvgg_chain_{n_blocks}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_scale")
    model.ir_version = 8
    return model


# ---- children ---------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's peak RSS.

    On Linux ``VmHWM`` from /proc/self/status: ``ru_maxrss`` survives fork + exec, so a child
    would report its parent's peak whenever that is the larger one. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def child_baseline(path: str) -> dict:
    import onnx
    import onnxruntime  # noqa: F401

    sys.path.insert(0, ROOT)
    import onnxrep  # noqa: F401

    model = onnx.load(path)
    return {"nodes": len(model.graph.node), "peak_rss": _peak_rss_bytes()}


def child_optimize(path: str, verify: bool, draws: int, skip: list, profile: str | None) -> dict:
    sys.path.insert(0, ROOT)
    import onnxrep
    from onnxrep.runtime import tune_allocator

    tune_allocator()  # as the command line does (docs/architecture.md, "Memory")

    kwargs = dict(verify=verify, verify_draws=draws, skip=skip or None)
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        model, report = onnxrep.optimize(path, **kwargs)
        prof.disable()
        prof.dump_stats(profile)
    else:
        model, report = onnxrep.optimize(path, **kwargs)
    v = report.verification
    return {
        "timings": dict(report.timings),
        "conv_before": report.before.convs,
        "conv_after": report.after.convs,
        "nodes_before": report.before.nodes,
        "nodes_after": report.after.nodes,
        "rewrites": len(report.rewrites),
        "rules": report.rules_applied(),
        "verified": None if v is None else bool(v.ok),
        "max_abs_error": None if v is None else v.max_abs_error,
        "peak_rss": _peak_rss_bytes(),
    }


def run_child(args: list, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + args
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


# ---- driver -----------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[50, 200, 800, 3200], help="chain lengths (run in this order)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--size", type=int, default=8, help="H = W of the input")
    ap.add_argument("--verify-draws", type=int, default=3, help="onnxrep verify_draws (default 3)")
    ap.add_argument("--no-verify", action="store_true", help="onnxrep verify=False")
    ap.add_argument("--skip", action="append", default=[], metavar="RULE",
                    help="onnxrep skip=[...] (repeatable), e.g. to isolate one rule's cost")
    ap.add_argument("--repeat", type=int, default=1, help="runs per N; the fastest is kept")
    ap.add_argument("--reference", type=int, default=200, help="N the per-block time is compared with")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    ap.add_argument("--keep", metavar="DIR", help="write the models here and keep them")
    ap.add_argument("--profile", metavar="DIR", help="run each optimize child under cProfile, write DIR/chain_N.prof "
                    "and print the top entries by cumulative time (timings are then inflated)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        kind, path, *rest = args.child
        if kind == "build":
            import onnx

            onnx.save(build_chain(int(rest[0]), int(rest[1]), int(rest[2])), path)
            result = {"peak_rss": _peak_rss_bytes()}
        elif kind == "baseline":
            result = child_baseline(path)
        else:
            verify, draws = rest[0] == "1", int(rest[1])
            skip = [s for s in rest[2].split(",") if s]
            profile = rest[3] if len(rest) > 3 else None
            result = child_optimize(path, verify, draws, skip, profile)
        print(json.dumps(result))
        return 0

    workdir = args.keep or tempfile.mkdtemp(prefix="onnxrep_bench_")
    os.makedirs(workdir, exist_ok=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    print(f"onnxrep bench_scale: C={args.channels} H=W={args.size}, verify="
          f"{'off' if args.no_verify else f'{args.verify_draws} draws'}, skip={args.skip or 'none'}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, models in {workdir}", flush=True)

    rows = []
    for n in args.blocks:
        path = os.path.join(workdir, f"chain_{n}.onnx")
        build_s = run_child(["build", path, str(n), str(args.channels), str(args.size)], args.timeout)["wall"]
        size = os.path.getsize(path)
        base = min((run_child(["baseline", path], args.timeout) for _ in range(args.repeat)), key=lambda r: r["peak_rss"])
        runs = []
        for _ in range(args.repeat):
            extra = [os.path.join(args.profile, f"chain_{n}.prof")] if args.profile else []
            runs.append(run_child(["optimize", path, "0" if args.no_verify else "1", str(args.verify_draws),
                                   ",".join(args.skip)] + extra,
                                  args.timeout))
        best = min(runs, key=lambda r: r["timings"]["total"])
        best["peak_rss"] = min(r["peak_rss"] for r in runs)
        t = best["timings"]
        t["other"] = t["total"] - t.get("load", 0) - t.get("optimize", 0) - t.get("verify", 0)
        row = dict(blocks=n, file_bytes=size, build_s=build_s, baseline_rss=base["peak_rss"], **best)
        row["opt_per_block_ms"] = 1e3 * t["optimize"] / n
        row["verify_per_block_ms"] = 1e3 * t["verify"] / n if "verify" in t else None
        row["total_per_block_ms"] = 1e3 * t["total"] / n
        row["extra_rss_over_file"] = (best["peak_rss"] - base["peak_rss"]) / size
        rows.append(row)
        print(f"  N={n}: optimize {t['optimize']:.2f}s, verify {t.get('verify', float('nan')):.2f}s, "
              f"total {t['total']:.2f}s, peak RSS {_mib(best['peak_rss'])} MiB, Conv {best['conv_before']} -> "
              f"{best['conv_after']}, verified={best['verified']}", flush=True)
        if args.profile:
            _print_profile(os.path.join(args.profile, f"chain_{n}.prof"))

    _print_table(rows, args)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _print_table(rows, args) -> None:
    head = ("N", "file MiB", "load s", "optim s", "verify s", "other s", "total s", "opt ms/blk", "ver ms/blk",
            "tot ms/blk", "peak MiB", "base MiB", "(peak-base)/file", "Conv before->after")
    table = []
    for r in rows:
        t = r["timings"]
        table.append((
            str(r["blocks"]), _mib(r["file_bytes"]), f"{t['load']:.2f}", f"{t['optimize']:.2f}",
            f"{t['verify']:.2f}" if "verify" in t else "-", f"{t['other']:.2f}", f"{t['total']:.2f}",
            f"{r['opt_per_block_ms']:.2f}",
            f"{r['verify_per_block_ms']:.2f}" if r["verify_per_block_ms"] is not None else "-",
            f"{r['total_per_block_ms']:.2f}", _mib(r["peak_rss"]), _mib(r["baseline_rss"]),
            f"{r['extra_rss_over_file']:.2f}", f"{r['conv_before']} -> {r['conv_after']}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("(other = report statistics before/after; peak = optimize child's peak RSS; "
          "base = child that imports onnxrep+onnxruntime and loads the model)")

    by_n = {r["blocks"]: r for r in rows}
    ref, top = by_n.get(args.reference), max(rows, key=lambda r: r["blocks"])
    print()
    if ref is not None and top is not ref:
        for key, label in (("opt_per_block_ms", "optimize"), ("verify_per_block_ms", "verify"),
                           ("total_per_block_ms", "total")):
            if ref[key] and top[key] is not None:
                ratio = top[key] / ref[key]
                tag = f"  [target <= 1.3: {'OK' if ratio <= 1.3 else 'MISSED'}]" if key == "opt_per_block_ms" else ""
                print(f"{label} time per block, N={top['blocks']} / N={ref['blocks']}: {ratio:.2f}x{tag}")
    else:
        print(f"(per-block ratio needs N={args.reference} and a larger N in --blocks)")
    for r in rows:
        ok = "OK" if r["extra_rss_over_file"] < 3 else "MISSED"
        print(f"N={r['blocks']}: (peak RSS - baseline RSS) / file size = "
              f"({_mib(r['peak_rss'])} - {_mib(r['baseline_rss'])}) / {_mib(r['file_bytes'])} MiB = "
              f"{r['extra_rss_over_file']:.2f}  [target < 3: {ok}]")


def _print_profile(path: str, top: int = 30) -> None:
    import pstats

    print(f"  profile {path}, top {top} by cumulative time:")
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    sys.exit(main())
