#!/usr/bin/env python
"""Full-size mmpretrain RepLKNet-31B and RepMLP-B: onnxrep's and onnxslim's command lines side by side.

Run from the repository root in the mmpretrain environment of scripts/export_zoo.py (torch,
mmpretrain, mmengine, mmcv-lite, onnxslim; onnxrep from the working tree)::

    python scripts/bench_zoo_large.py [--models replknet-31b repmlp-b224] [--dir /tmp/onnxrep-zoo-large]

Both models run by default (RepMLP-B used to spend more than a quarter of an hour locating
rewrites that failed verification on rounding; see BENCHMARKS.md).

Each model is built with random weights and randomized BatchNorm statistics (no download),
exported with TorchScript (opset 17, 1x3x224x224), and then ``python -m onnxrep IN -o OUT -q``
and ``onnxslim IN OUT`` run in their own processes, two rounds in alternating order; printed:
the file size, each tool's faster wall time and that run's peak RSS (``os.wait4``), and the
Conv and BatchNormalization counts before and after onnxrep.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(name):
    import torch
    from mmpretrain.models import backbones as bb

    if name == "replknet-31b":
        model = bb.RepLKNet("31B", out_indices=(3,))
    elif name == "repmlp-b224":
        model = bb.RepMLPNet("B", img_size=224, out_indices=(3,))
    else:
        raise SystemExit(f"unknown model {name}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.eval()  # mmpretrain's train() returns None: no chaining
    return model


def export(name, path):
    import torch

    model = build(name)

    class Head(torch.nn.Module):  # backbones return a tuple of stage outputs
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[-1]

    torch.onnx.export(Head(model), (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])


def measured(argv):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace").strip().splitlines()
    rc = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, rc, (err[-1] if err and rc else "")


def counts(path):
    import onnx

    c = collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
    return f"Conv {c['Conv']}, BN {c['BatchNormalization']}"


def main():
    if sys.argv[1:2] == ["--export-only"]:
        export(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["replknet-31b", "repmlp-b224"], choices=["replknet-31b", "repmlp-b224"])
    ap.add_argument("--dir", default="/tmp/onnxrep-zoo-large")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print("| model | file MiB | Conv, BN before -> onnxrep | onnxrep s | onnxslim s | onnxrep / onnxslim | "
          "onnxrep peak MiB (x file) | onnxslim peak MiB |\n|---|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for name in args.models:
        src = os.path.join(args.dir, f"{name}.onnx")
        if not os.path.exists(src):  # in a child: a child's peak RSS counts its parent's size at fork
            subprocess.run([sys.executable, os.path.abspath(__file__), "--export-only", name, src], check=True)
        tools = {"onnxrep": [sys.executable, "-m", "onnxrep", src, "-o", os.path.join(args.dir, f"{name}.rep.onnx"), "-q"],
                 "onnxslim": [sys.executable, "-m", "onnxslim", src, os.path.join(args.dir, f"{name}.slim.onnx")]}
        best = {}
        for r in range(2):
            for tool in (list(tools) if r == 0 else list(tools)[::-1]):
                wall, rss, rc, err = measured(tools[tool])
                if rc != 0:
                    raise SystemExit(f"{name}: {tool} failed (exit {rc}): {err}")
                if tool not in best or wall < best[tool][0]:
                    best[tool] = (wall, rss)
        size = os.path.getsize(src) / 2**20
        (rw, rr), (sw, sr) = best["onnxrep"], best["onnxslim"]
        print(f"| {name} | {size:.0f} | {counts(src)} -> {counts(os.path.join(args.dir, f'{name}.rep.onnx'))} | "
              f"{rw:.1f} | {sw:.1f} | {rw / sw:.2f} | {rr:.0f} ({rr / size:.1f}x) | {sr:.0f} |", flush=True)


if __name__ == "__main__":
    main()
