#!/usr/bin/env python
"""onnxrep against the deploy reference and peer tools on real timm models.

Run from the repository root, in a virtual environment with torch, timm, onnx, onnxscript,
onnxruntime, onnxsim, onnxslim, onnxoptimizer and matplotlib (none of them is a dependency of
onnxrep or its tests)::

    PYTHONPATH=. python scripts/bench.py                          # all models, all tools
    PYTHONPATH=. python scripts/bench.py --models repvgg_a0 resnet18
    PYTHONPATH=. python scripts/bench.py --report-only            # tables + plot from results.json

Per model (timm, ``pretrained=False``, fixed seed):

* every BatchNorm gets random statistics and affine parameters (running_mean ~ N(0, 0.1),
  running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1)) so that no BN fold is an
  identity; timm's LayerScale gammas (initialized to 1e-5, which would hide the branches they
  scale from any error measurement) get U(0.5, 1.5) too (``--keep-layer-scale`` leaves them);
* exports, cached in ``--cache`` (default /tmp/onnxrep-bench/<model>/): the training structure
  with the TorchScript exporter (``train_ts.onnx``, opset 17) and the dynamo exporter
  (``train_dynamo.onnx``, opset 18), and the deploy reference
  ``timm.utils.reparameterize_model(copy.deepcopy(model))`` with TorchScript (``ref.onnx``);
  static input 1x3x224x224 (inception_v3: 1x3x299x299);
* every tool runs on each training export, each (model, export, tool) in its own subprocess
  (a crash or timeout is a row saying why): onnxrep (``onnxrep.optimize``, verification on,
  3 draws), onnxsim (``onnxsim.simplify``), onnxslim (``onnxslim.slim``), onnxoptimizer
  (``onnxoptimizer.optimize`` with ``get_fuse_and_elimination_passes()``), and onnxruntime's
  offline optimizer (``SessionOptions.optimized_model_filepath``, ORT_ENABLE_EXTENDED, CPU
  provider; its model contains com.microsoft ops such as FusedConv, which are not standard ONNX);
* recorded per variant: nodes, Conv count (FusedConv counted as Conv), parameters, FLOPs
  (``onnxrep.stats.model_stats``; FusedConv counted as Conv), tool wall time (the tool call on an
  in-memory model, loading excluded; for onnxrep also its own optimize-only time, verification
  excluded), max |error| and relative error (max|d| / max|y_ref|) against the training export run
  by onnxruntime with ORT_DISABLE_ALL on one random input (seed 0), and whether that is within
  onnxrep's tolerance (max|d| <= 1e-5 + 1e-4 * max|y_ref|);
* whole command lines, as a user runs them after an export: ``python -m onnxrep train.onnx -o out -q``
  (verification included), ``onnxslim train.onnx out`` and ``onnxsim train.onnx out``, each in its own
  process, ``--cli-repeats`` interleaved rounds (the order rotates each round); per tool the fastest
  round's wall time and that process's peak RSS (``os.wait4`` rusage), next to the model file's size;
* latency: onnxruntime CPU, ORT_ENABLE_ALL for every variant (the fair deploy setting: the
  runtime's own Conv+BN / Conv+activation fusions apply to all of them), intra_op_num_threads=1,
  inter_op_num_threads=1, batch 1; one process holds a session for every variant; after warm-up,
  rounds run every variant once in an order that rotates by one each round, until
  ``--latency-budget`` seconds per model have passed (at least ``--min-rounds``, at most
  ``--max-rounds`` rounds); reported: median per variant and its ratio to the reference's median.

Outputs (``--out``, default benchmarks/): results.json (everything, raw latency samples
included), results.csv (one row per model/variant), tables.md (the markdown tables),
latency.png (latency / reference per model and tool) and cli.png (onnxrep's whole-CLI wall time and
peak RSS as ratios to onnxslim's).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODELS = ["repvgg_a0", "repvgg_b0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050", "resnet18", "inception_v3"]
TOOLS = ["onnxrep", "onnxsim", "onnxslim", "onnxoptimizer", "ort"]
EXPORTS = ["ts", "dynamo"]
TOOL_LABEL = {
    "onnxrep": "onnxrep",
    "onnxsim": "onnxsim",
    "onnxslim": "onnxslim",
    "onnxoptimizer": "onnxoptimizer",
    "ort": "ORT offline (EXTENDED)",
}
RTOL, ATOL = 1e-4, 1e-5
INPUT_NAME, OUTPUT_NAME = "input", "output"


def input_size(model_name: str) -> int:
    return 299 if model_name.startswith("inception") else 224


def input_shape(model_name: str):
    s = input_size(model_name)
    return [1, 3, s, s]


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


# ---- worker: export (torch) ---------------------------------------------------------------


def work_export(args) -> int:
    import copy

    import torch
    import timm
    from timm.utils import reparameterize_model

    torch.set_num_threads(2)
    name, folder = args.model, args.dir
    os.makedirs(folder, exist_ok=True)
    meta = {"model": name, "input_shape": input_shape(name), "exports": {}}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    model.eval()
    g = torch.Generator().manual_seed(1234)
    n_bn = n_ls = 0
    with torch.no_grad():
        for mod_name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                n_bn += 1
            elif "LayerScale" in type(m).__name__ and not args.keep_layer_scale:
                for p in m.parameters(recurse=False):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                    n_ls += 1
    meta["randomized_bn"] = n_bn
    meta["randomized_layer_scale"] = n_ls
    meta["torch_params"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(*input_shape(name), generator=torch.Generator().manual_seed(0))

    ref = reparameterize_model(copy.deepcopy(model))
    ref.eval()
    with torch.no_grad():
        y_train = model(x)
        y_ref = ref(x)
    meta["torch_reparam_max_abs_diff"] = float((y_train - y_ref).abs().max())
    meta["torch_output_max_abs"] = float(y_train.abs().max())

    def export(m, path, dynamo):
        t = time.perf_counter()
        kw = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
        if dynamo:
            torch.onnx.export(m, (x,), path, dynamo=True, opset_version=18, external_data=False, **kw)
        else:
            torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17, **kw)
        return time.perf_counter() - t

    for key, m, dynamo in (("ref", ref, False), ("train_ts", model, False), ("train_dynamo", model, True)):
        path = os.path.join(folder, f"{key}.onnx")
        try:
            with torch.no_grad():
                seconds = export(m, path, dynamo)
            meta["exports"][key] = {"ok": True, "path": path, "seconds": round(seconds, 2)}
        except Exception as exc:  # a failing export is a finding, not a crash
            meta["exports"][key] = {"ok": False, "error": one_line(exc)}
            traceback.print_exc()
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return 0


# ---- shared helpers (onnx / onnxruntime, no torch) ----------------------------------------


def stats_of(model, shape):
    """onnxrep.stats.model_stats, with com.microsoft FusedConv counted (and costed) as Conv."""
    import onnx
    from onnxrep.stats import model_stats

    fused = sum(1 for n in model.graph.node if n.op_type == "FusedConv")
    if fused:
        model = _fusedconv_as_conv(model)
    s = model_stats(model, {INPUT_NAME: shape})
    other_domain = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    return {"nodes": s.nodes, "convs": s.convs, "fused_convs": fused, "params": s.params, "flops": s.flops,
            "ops": s.ops, "nonstandard_ops": other_domain}


def _fusedconv_as_conv(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type == "FusedConv":
            n.op_type, n.domain = "Conv", ""
            keep = [a for a in n.attribute if a.name not in ("activation", "activation_params")]
            del n.attribute[:]
            n.attribute.extend(keep)
            if len(n.input) > 3:
                del n.input[3:]
    return m


def ort_session(model_or_path, level: str, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def bench_input(shape):
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def compare(y, y_ref):
    import numpy as np

    d = float(np.max(np.abs(y.astype(np.float64) - y_ref.astype(np.float64))))
    m = float(np.max(np.abs(y_ref)))
    return {"max_abs_error": d, "rel_error": d / m if m else float("inf"), "ref_max_abs": m,
            "within_tol": bool(d <= ATOL + RTOL * m)}


def run_output(model_or_path, x):
    sess = ort_session(model_or_path, "ORT_DISABLE_ALL")
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ---- worker: baseline (stats and outputs of the exports) ----------------------------------


def work_baseline(args) -> int:
    import numpy as np
    import onnx

    folder = args.dir
    shape = input_shape(args.model)
    x = bench_input(shape)
    out = {}
    outputs = {}
    for key in ("train_ts", "train_dynamo", "ref"):
        path = os.path.join(folder, f"{key}.onnx")
        if not os.path.exists(path):
            continue
        try:
            model = onnx.load(path)
            out[key] = {"stats": stats_of(model, shape), "opset": model.opset_import[0].version,
                        "size_mb": round(os.path.getsize(path) / 1e6, 2)}
            outputs[key] = run_output(path, x)
        except Exception as exc:
            out[key] = {"error": one_line(exc)}
    if "train_ts" in outputs:
        for key in ("train_dynamo", "ref"):
            if key in outputs:
                out[key]["vs_train_ts"] = compare(outputs[key], outputs["train_ts"])
    np.savez(os.path.join(folder, "outputs.npz"), x=x, **outputs)
    with open(os.path.join(folder, "baseline.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


# ---- worker: one tool on one export -------------------------------------------------------


def work_tool(args) -> int:
    import numpy as np
    import onnx

    folder, tool, exp = args.dir, args.tool, args.export
    shape = input_shape(args.model)
    src = os.path.join(folder, f"train_{exp}.onnx")
    dst = os.path.join(folder, f"{exp}.{tool}.onnx")
    result_path = os.path.join(folder, f"{exp}.{tool}.result.json")
    res = {"tool": tool, "export": exp, "ok": False}
    try:
        model = onnx.load(src)
        extra = {}
        if tool == "onnxrep":
            import onnxrep

            t = time.perf_counter()
            out, report = onnxrep.optimize(model, input_shapes={INPUT_NAME: shape})
            wall = time.perf_counter() - t
            extra["onnxrep_timings"] = {k: round(v, 4) for k, v in report.timings.items()}
            extra["tool_time_optimize_s"] = report.timings.get("optimize")
            extra["rules_applied"] = report.rules_applied()
            extra["rolled_back"] = [f"{r.rule} at {r.anchor}" for r in report.rolled_back]
            extra["warnings"] = report.warnings
            extra["onnxrep_verify_max_abs_error"] = report.verification.max_abs_error if report.verification else None
            reasons = {}
            for d in report.declines:
                k = f"{d.rule}: {d.reason}"
                reasons[k] = reasons.get(k, 0) + 1
            extra["declines"] = reasons
            onnx.save(out, dst)
        elif tool == "onnxsim":
            import onnxsim

            t = time.perf_counter()
            out, check = onnxsim.simplify(model)
            wall = time.perf_counter() - t
            extra["check"] = bool(check)
            onnx.save(out, dst)
        elif tool == "onnxslim":
            import onnxslim

            t = time.perf_counter()
            out = onnxslim.slim(model)
            wall = time.perf_counter() - t
            onnx.save(out, dst)
        elif tool == "onnxoptimizer":
            import onnxoptimizer

            passes = onnxoptimizer.get_fuse_and_elimination_passes()
            t = time.perf_counter()
            out = onnxoptimizer.optimize(model, passes)
            wall = time.perf_counter() - t
            extra["passes"] = list(passes)
            onnx.save(out, dst)
        elif tool == "ort":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = dst
            so.log_severity_level = 3
            t = time.perf_counter()
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            wall = time.perf_counter() - t
            out = onnx.load(dst)
        else:
            raise ValueError(f"unknown tool {tool}")
        res["tool_time_s"] = wall
        res.update(extra)
        res["stats"] = stats_of(out, shape)
        ref = np.load(os.path.join(folder, "outputs.npz"))
        y = run_output(dst, ref["x"])
        res["vs_train"] = compare(y, ref[f"train_{exp}"])
        res["ok"] = True
    except Exception as exc:
        res["error"] = one_line(exc)
        traceback.print_exc()
    with open(result_path, "w") as f:
        json.dump(res, f, indent=1)
    return 0


# ---- worker: interleaved latency ----------------------------------------------------------


def work_latency(args) -> int:
    import numpy as np

    folder = args.dir
    variants = json.loads(args.variants)  # [[key, path], ...]; the first is the reference
    x = bench_input(input_shape(args.model))
    sessions, errors = {}, {}
    for key, path in variants:
        try:
            sess = ort_session(path, "ORT_ENABLE_ALL", threads=1)
            feed = {sess.get_inputs()[0].name: x}
            for _ in range(args.warmup):
                sess.run(None, feed)
            sessions[key] = (sess, feed)
        except Exception as exc:
            errors[key] = one_line(exc)
    keys = [k for k, _ in variants if k in sessions]
    samples = {k: [] for k in keys}
    t0 = time.perf_counter()
    rounds = 0
    while keys and rounds < args.max_rounds and (rounds < args.min_rounds or time.perf_counter() - t0 < args.budget):
        r = rounds % len(keys)
        for k in keys[r:] + keys[:r]:
            sess, feed = sessions[k]
            t = time.perf_counter()
            sess.run(None, feed)
            samples[k].append(time.perf_counter() - t)
        rounds += 1
    res = {"rounds": rounds, "seconds": time.perf_counter() - t0, "errors": errors, "variants": {}}
    ref_key = variants[0][0]
    ref_med = float(np.median(samples[ref_key])) if ref_key in samples else None
    for k in keys:
        s = np.array(samples[k])
        med = float(np.median(s))
        v = {"median_ms": med * 1e3, "p25_ms": float(np.percentile(s, 25)) * 1e3,
             "p75_ms": float(np.percentile(s, 75)) * 1e3, "min_ms": float(s.min()) * 1e3, "n": int(s.size),
             "samples_ms": [round(t * 1e3, 4) for t in s]}
        if ref_med:
            v["ratio"] = med / ref_med
            v["paired_ratio_median"] = float(np.median(s / np.array(samples[ref_key])))
        res["variants"][k] = v
    with open(os.path.join(folder, "latency.json"), "w") as f:
        json.dump(res, f)
    return 0


# ---- orchestration ------------------------------------------------------------------------


def _child(argv, timeout, log):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    t = time.perf_counter()
    with open(log, "a") as lf:
        lf.write(f"\n$ {' '.join(argv)}\n")
        lf.flush()
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, stdout=lf, stderr=subprocess.STDOUT,
                               env=env, timeout=timeout, cwd=ROOT)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.perf_counter() - t


def _last_line(log):
    try:
        with open(log) as f:
            lines = [l.strip() for l in f if l.strip()]
        if not lines or lines[-1].startswith("$ "):  # the child printed nothing
            return "no output"
        return lines[-1][:200]
    except OSError:
        return ""


def run_model(name, args, log) -> dict:
    folder = os.path.join(args.cache, name)
    os.makedirs(folder, exist_ok=True)
    entry = {"model": name, "input_shape": input_shape(name)}
    meta_path = os.path.join(folder, "meta.json")
    if args.force_export or not os.path.exists(meta_path):
        print(f"[{name}] exporting ...", flush=True)
        rc, secs = _child(["_export", name, folder] + (["--keep-layer-scale"] if args.keep_layer_scale else []),
                          args.export_timeout, log)
        if not os.path.exists(meta_path):
            entry["error"] = f"export worker failed (rc {rc}): {_last_line(log)}"
            return entry
    with open(meta_path) as f:
        entry["meta"] = json.load(f)
    print(f"[{name}] exports: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in entry["meta"]["exports"].items()),
          flush=True)

    rc, _ = _child(["_baseline", name, folder], 900, log)
    try:
        with open(os.path.join(folder, "baseline.json")) as f:
            entry["baseline"] = json.load(f)
    except OSError:
        entry["baseline"] = {}
        entry["error"] = f"baseline worker failed (rc {rc}): {_last_line(log)}"

    entry["tools"] = {}
    for exp in args.exports:
        if not entry["meta"]["exports"].get(f"train_{exp}", {}).get("ok"):
            continue
        for tool in args.tools:
            result_path = os.path.join(folder, f"{exp}.{tool}.result.json")
            if os.path.exists(result_path):
                os.remove(result_path)
            out_path = os.path.join(folder, f"{exp}.{tool}.onnx")
            if os.path.exists(out_path):
                os.remove(out_path)
            rc, secs = _child(["_tool", name, folder, "--tool", tool, "--export", exp], args.tool_timeout, log)
            if os.path.exists(result_path):
                with open(result_path) as f:
                    res = json.load(f)
            else:
                why = "timed out after %ds" % args.tool_timeout if rc == "timeout" else f"worker died (rc {rc})"
                res = {"tool": tool, "export": exp, "ok": False, "error": f"{why}: {_last_line(log)}"}
            res["worker_s"] = round(secs, 2)
            entry["tools"][f"{exp}.{tool}"] = res
            if res["ok"]:
                print(f"[{name}] {exp}.{tool}: {res['tool_time_s']:.2f}s, Conv {res['stats']['convs']}, "
                      f"err {res['vs_train']['max_abs_error']:.2e}", flush=True)
            else:
                print(f"[{name}] {exp}.{tool}: FAILED {res['error']}", flush=True)

    if args.cli_repeats > 0:
        entry["cli"] = run_cli(name, folder, args, log)
    if args.budget <= 0:
        return entry
    variants = []
    for key in ("ref", "train_ts", "train_dynamo"):
        if entry["meta"]["exports"].get(key, {}).get("ok"):
            variants.append([key, os.path.join(folder, f"{key}.onnx")])
    for key, res in entry["tools"].items():
        if res.get("ok"):
            variants.append([key, os.path.join(folder, f"{key}.onnx")])
    if not variants or variants[0][0] != "ref":
        entry["latency"] = {"error": "no reference export"}
        return entry
    lat_path = os.path.join(folder, "latency.json")
    if os.path.exists(lat_path):
        os.remove(lat_path)
    print(f"[{name}] latency: {len(variants)} variants, budget {args.budget}s ...", flush=True)
    rc, _ = _child(["_latency", name, folder, "--variants", json.dumps(variants), "--budget", str(args.budget),
                    "--min-rounds", str(args.min_rounds), "--max-rounds", str(args.max_rounds)],
                   args.budget * 4 + 600, log)
    if os.path.exists(lat_path):
        with open(lat_path) as f:
            entry["latency"] = json.load(f)
        lat = entry["latency"]
        print(f"[{name}] latency: {lat['rounds']} rounds in {lat['seconds']:.0f}s; " + ", ".join(
            f"{k} {v.get('ratio', float('nan')):.3f}" for k, v in lat["variants"].items()), flush=True)
    else:
        entry["latency"] = {"error": f"latency worker failed (rc {rc}): {_last_line(log)}"}
    return entry


# ---- whole command lines: wall time and peak memory ---------------------------------------

CLI_TOOLS = ["onnxrep", "onnxslim", "onnxsim"]


def _cli_argv(tool, src, dst):
    bindir = os.path.dirname(sys.executable)
    if tool == "onnxrep":
        return [sys.executable, "-m", "onnxrep", src, "-o", dst, "-q"]
    exe = os.path.join(bindir, tool)
    return [exe if os.path.exists(exe) else tool, src, dst]


def _run_measured(argv, timeout, log):
    """Wall seconds and peak RSS (bytes) of one child process, from its own rusage (os.wait4)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "a") as lf:
        lf.write(f"\n$ {' '.join(argv)}\n")
        lf.flush()
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                p.returncode = -9
                return None, None, "timeout"
            time.sleep(0.005)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, p.returncode


def run_cli(name, folder, args, log) -> dict:
    """Every command-line tool on every training export, ``--cli-repeats`` interleaved rounds (the tool
    order rotates each round); per tool the fastest round's wall time and that round's peak RSS."""
    out = {}
    tools = [t for t in CLI_TOOLS if t in args.tools]
    for exp in args.exports:
        src = os.path.join(folder, f"train_{exp}.onnx")
        if not os.path.exists(src):
            continue
        runs = {t: [] for t in tools}
        for r in range(args.cli_repeats):
            for t in tools[r % len(tools):] + tools[:r % len(tools)]:
                dst = os.path.join(folder, f"{exp}.{t}.cli.onnx")
                if os.path.exists(dst):
                    os.remove(dst)
                wall, rss, rc = _run_measured(_cli_argv(t, src, dst), args.tool_timeout, log)
                runs[t].append({"wall_s": wall, "peak_rss": rss, "rc": rc,
                                "out_bytes": os.path.getsize(dst) if rc == 0 and os.path.exists(dst) else None})
        for t, rs in runs.items():
            good = [x for x in rs if x["rc"] == 0]
            best = min(good, key=lambda x: x["wall_s"]) if good else None
            out[f"{exp}.{t}"] = {"tool": t, "export": exp, "file_bytes": os.path.getsize(src), "runs": rs,
                                 "wall_s": best and best["wall_s"], "peak_rss": best and best["peak_rss"],
                                 "out_bytes": best and best["out_bytes"],
                                 "error": None if best else f"exit {rs[-1]['rc']}: {_last_line(log)}"}
        for t in tools:
            e = out[f"{exp}.{t}"]
            print(f"[{name}] cli {exp}.{t}: " + (f"{e['wall_s']:.2f}s, peak {e['peak_rss'] / 2**20:.0f} MiB"
                                                  if e["wall_s"] else f"FAILED {e['error']}"), flush=True)
    return out


def cli_markdown(results) -> str:
    out = ["| model | export | file MiB | onnxrep s | onnxslim s | onnxsim s | **onnxrep / onnxslim** | onnxrep peak MiB "
           "(x file) | onnxslim peak MiB | onnxsim peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in results["models"].items():
        cli = entry.get("cli") or {}
        for exp in EXPORTS:
            rows = {t: cli.get(f"{exp}.{t}") for t in CLI_TOOLS}
            if not any(rows.values()):
                continue
            size = next(r["file_bytes"] for r in rows.values() if r)

            def wall(t):
                r = rows[t]
                return "-" if r is None else ("fail" if not r["wall_s"] else f"{r['wall_s']:.2f}")

            def rss(t, rel=False):
                r = rows[t]
                if r is None or not r["peak_rss"]:
                    return "-"
                mib = r["peak_rss"] / 2**20
                return f"{mib:.0f} ({r['peak_rss'] / size:.1f}x)" if rel else f"{mib:.0f}"

            a, b = rows["onnxrep"], rows["onnxslim"]
            ratio = f"**{a['wall_s'] / b['wall_s']:.2f}**" if a and b and a["wall_s"] and b["wall_s"] else "-"
            out.append(f"| {name} | {exp} | {size / 2**20:.1f} | {wall('onnxrep')} | {wall('onnxslim')} | {wall('onnxsim')} | "
                       f"{ratio} | {rss('onnxrep', True)} | {rss('onnxslim')} | {rss('onnxsim')} |")
    return "\n".join(out)


def cli_plot(results, path):
    """Per model and export: onnxrep's whole-CLI wall time and peak RSS, each as a ratio to onnxslim's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, wall, mem = [], [], []
    for name, entry in results["models"].items():
        cli = entry.get("cli") or {}
        for exp in EXPORTS:
            a, b = cli.get(f"{exp}.onnxrep"), cli.get(f"{exp}.onnxslim")
            if not (a and b and a["wall_s"] and b["wall_s"]):
                continue
            labels.append(f"{name}\n{exp}")
            wall.append(a["wall_s"] / b["wall_s"])
            mem.append(a["peak_rss"] / b["peak_rss"])
    if not labels:
        return
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) + 2), 4.2))
    ax.bar(x - 0.2, wall, 0.4, label="wall time / onnxslim", color="#d62728")
    ax.bar(x + 0.2, mem, 0.4, label="peak RSS / onnxslim", color="#1f77b4")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("onnxrep / onnxslim (whole CLI)")
    ax.set_title("onnxrep (verification included) vs onnxslim: command-line wall time and peak RSS", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "nproc": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib import metadata

    for pkg in ("torch", "timm", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "onnxscript", "numpy"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        info["onnxrep_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "onnxrep"], capture_output=True,
                               text=True).stdout.split("\n")
        info["onnxrep_uncommitted_files"] = sorted(l[3:] for l in dirty if l.strip())
    except OSError:
        pass
    return info


# ---- report: rows, tables, csv, plot ------------------------------------------------------


def rows_of(entry) -> list:
    """One row per variant of a model: reference, training exports, tool outputs."""
    rows = []
    lat = (entry.get("latency") or {}).get("variants", {})
    lat_err = (entry.get("latency") or {}).get("errors", {})
    base = entry.get("baseline", {})
    exports = (entry.get("meta") or {}).get("exports", {})

    def add(key, variant, export, tool, stats=None, err=None, tool_time=None, opt_time=None, error=None):
        row = {"model": entry["model"], "variant": variant, "key": key, "export": export, "tool": tool,
               "error": error}
        if stats:
            row.update(nodes=stats["nodes"], convs=stats["convs"],  # stats_of counts FusedConv as Conv
                       fused_convs=stats.get("fused_convs", 0), params=stats["params"], flops=stats["flops"])
        if err:
            row.update(max_abs_error=err["max_abs_error"], rel_error=err["rel_error"], within_tol=err["within_tol"])
        row["tool_time_s"] = tool_time
        row["optimize_time_s"] = opt_time
        if key in lat:
            row.update(latency_ms=lat[key]["median_ms"], ratio=lat[key].get("ratio"),
                       paired_ratio=lat[key].get("paired_ratio_median"))
        elif key in lat_err:
            row["error"] = (row["error"] or "") + f" latency: {lat_err[key]}"
        rows.append(row)

    for key, label, exp in (("ref", "reference (timm reparameterize_model)", "ts"), ("train_ts", "training export", "ts"),
                            ("train_dynamo", "training export", "dynamo")):
        ex = exports.get(key)
        if ex is None:
            continue
        if not ex.get("ok"):
            add(key, label, exp, None, error=f"export failed: {ex.get('error')}")
            continue
        b = base.get(key, {})
        add(key, label, exp, None, stats=b.get("stats"), err=b.get("vs_train_ts") if key != "train_ts" else None,
            error=b.get("error"))
        if key == "train_ts":  # tool rows follow their export
            for k, r in entry.get("tools", {}).items():
                if r["export"] == "ts":
                    add(k, TOOL_LABEL[r["tool"]], "ts", r["tool"], stats=r.get("stats"), err=r.get("vs_train"),
                        tool_time=r.get("tool_time_s"), opt_time=r.get("tool_time_optimize_s"), error=r.get("error"))
        if key == "train_dynamo":
            for k, r in entry.get("tools", {}).items():
                if r["export"] == "dynamo":
                    add(k, TOOL_LABEL[r["tool"]], "dynamo", r["tool"], stats=r.get("stats"), err=r.get("vs_train"),
                        tool_time=r.get("tool_time_s"), opt_time=r.get("tool_time_optimize_s"), error=r.get("error"))
    return rows


def _si(n):
    if n is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if unit != "G" else f"{n / scale:.3f}G"
    return str(int(n))


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(results) -> str:
    out = []
    for name, entry in results["models"].items():
        shape = "x".join(map(str, entry.get("input_shape", [])))
        meta = entry.get("meta", {})
        out.append(f"### {name} ({shape})\n")
        if entry.get("error"):
            out.append(f"**error:** {entry['error']}\n")
        lat = entry.get("latency") or {}
        if lat.get("rounds"):
            out.append(f"Latency: {lat['rounds']} interleaved rounds in {lat['seconds']:.0f} s. "
                       f"PyTorch: reparameterize_model changes the output by {meta.get('torch_reparam_max_abs_diff', float('nan')):.2e} "
                       f"(max |y| {meta.get('torch_output_max_abs', float('nan')):.3g}).\n")
        elif lat.get("error"):
            out.append(f"Latency: {lat['error']}\n")
        out.append("| variant | export | nodes | Conv | params | FLOPs | tool s | onnxrep optimize s | max abs err | rel err | ok "
                   "| latency ms | / ref (medians) | / ref (paired) |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|")
        for r in rows_of(entry):
            conv = "" if r.get("convs") is None else str(r["convs"]) + (f" ({r['fused_convs']} FusedConv)" if r.get("fused_convs") else "")
            ok = "" if r.get("within_tol") is None else ("yes" if r["within_tol"] else "**NO**")
            cells = [r["variant"], r["export"], _fmt(r.get("nodes"), "d"), conv, _si(r.get("params")), _si(r.get("flops")),
                     _fmt(r.get("tool_time_s"), ".2f"), _fmt(r.get("optimize_time_s"), ".2f"),
                     _fmt(r.get("max_abs_error"), ".2e"), _fmt(r.get("rel_error"), ".1e"), ok,
                     _fmt(r.get("latency_ms"), ".2f"), _fmt(r.get("ratio"), ".3f"), _fmt(r.get("paired_ratio"), ".3f")]
            out.append("| " + " | ".join(cells) + " |")
            if r.get("error"):
                out.append(f"| ↳ *{r['variant']} ({r['export']}) failed:* {r['error'].replace('|', '/')} ||||||||||||||")
        out.append("")
    return "\n".join(out)


def summary_markdown(results) -> str:
    """Per model and export: Conv counts, latency ratios, onnxrep parity and time next to the peers."""
    out = ["| model | export | Conv ref / train / **onnxrep** / best peer | latency / ref, medians (paired): train | **onnxrep** | "
           "best peer | onnxrep rel err (within tol) | optimize s: **onnxrep** / onnxslim |",
           "|---|---|---|---|---|---|---|---|"]

    def ratio(r):
        if r is None or r.get("ratio") is None:
            return "fail" if r is not None and r.get("error") else "-"
        return f"{r['ratio']:.3f} ({r['paired_ratio']:.3f})"

    for name, entry in results["models"].items():
        rows = {r["key"]: r for r in rows_of(entry)}
        ref = rows.get("ref") or {}
        for exp in EXPORTS:
            train = rows.get(f"train_{exp}")
            if train is None:
                continue
            rep = rows.get(f"{exp}.onnxrep")
            peers = [rows[f"{exp}.{t}"] for t in TOOLS[1:] if rows.get(f"{exp}.{t}", {}).get("convs") is not None]
            best_conv = min(peers, key=lambda r: r["convs"]) if peers else None
            lat_peers = [r for r in peers if r.get("ratio") is not None]
            best_lat = min(lat_peers, key=lambda r: r["paired_ratio"]) if lat_peers else None
            slim = rows.get(f"{exp}.onnxslim")

            def conv(r):
                return "-" if r is None else ("fail" if r.get("convs") is None else str(r["convs"]))

            rep_err = "-"
            if rep is not None:
                rep_err = "fail: " + (rep.get("error") or "")[:80] if rep.get("rel_error") is None else \
                    f"{rep['rel_error']:.1e} ({'yes' if rep['within_tol'] else 'NO'})"
            out.append("| " + " | ".join([
                name, exp,
                f"{conv(ref)} / {conv(train)} / **{conv(rep)}** / "
                + (f"{best_conv['convs']} ({best_conv['tool']})" if best_conv else "-"),
                ratio(train), f"**{ratio(rep)}**",
                f"{ratio(best_lat)} {best_lat['tool']}" if best_lat else "-",
                rep_err,
                f"**{_fmt((rep or {}).get('optimize_time_s'), '.2f') or '-'}** / {_fmt((slim or {}).get('tool_time_s'), '.2f') or '-'}",
            ]) + " |")
    return "\n".join(out)


def write_csv(results, path):
    fields = ["model", "variant", "key", "export", "tool", "nodes", "convs", "fused_convs", "params", "flops", "tool_time_s",
              "optimize_time_s", "max_abs_error", "rel_error", "within_tol", "latency_ms", "ratio", "paired_ratio", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for entry in results["models"].values():
            for r in rows_of(entry):
                w.writerow(r)


def plot(results, path):
    """Grouped bars: per model and tool, the median over rounds of latency / reference latency in the same
    round (paired ratio); a black tick marks the ratio of the two medians. One panel per export."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FixedLocator, NullLocator

    models = list(results["models"])
    series = [("train", "training export (no tool)"), ("onnxrep", "onnxrep"), ("onnxsim", "onnxsim"), ("onnxslim", "onnxslim"),
              ("onnxoptimizer", "onnxoptimizer"), ("ort", "ORT offline (EXTENDED)")]
    colors = ["#bbbbbb", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    exports = [e for e in EXPORTS if any((m.get("meta") or {}).get("exports", {}).get(f"train_{e}", {}).get("ok")
                                         for m in results["models"].values())]
    all_r = [v.get(k) for m in results["models"].values() for v in ((m.get("latency") or {}).get("variants", {})).values()
             for k in ("ratio", "paired_ratio_median") if v.get(k)]
    lo, hi = min(all_r + [0.9]) * 0.95, max(all_r + [1.1]) * 1.08
    fig, axes = plt.subplots(len(exports), 1, figsize=(max(9, 1.5 * len(models) + 2), 4.3 * len(exports) + 0.8), squeeze=False)
    width = 0.8 / len(series)
    for ax, exp in zip(axes[:, 0], exports):
        x = np.arange(len(models))
        for i, ((tool, label), color) in enumerate(zip(series, colors)):
            paired, med = [], []
            for m in models:
                lat = (results["models"][m].get("latency") or {}).get("variants", {})
                v = lat.get(f"train_{exp}" if tool == "train" else f"{exp}.{tool}", {})
                paired.append(v.get("paired_ratio_median", np.nan))
                med.append(v.get("ratio", np.nan))
            paired, med = np.array(paired, dtype=float), np.array(med, dtype=float)
            pos = x - 0.4 + width * (i + 0.5)
            ok = ~np.isnan(paired)
            ax.bar(pos[ok], paired[ok] - lo, width, bottom=lo, label=label, color=color, edgecolor="black", linewidth=0.3)
            ax.plot(pos[ok], med[ok], linestyle="none", marker="_", color="black", markersize=7)
            for p in pos[~ok]:
                ax.text(p, 1.0, "x", ha="center", va="center", fontsize=8, color=color, fontweight="bold")
            if tool == "onnxrep":
                for p, v, mv in zip(pos[ok], paired[ok], med[ok]):
                    top = max(v, mv if not np.isnan(mv) else v)
                    ax.text(p, top * 1.015, f"{v:.2f}", ha="center", va="bottom", fontsize=6.5, rotation=90, color=color)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ticks = [t for t in (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 4, 5, 6) if lo <= t <= hi]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticklabels([f"{t:g}" for t in ticks])
        ax.axhline(1.0, color="black", linewidth=1)
        ax.axhspan(0.97, 1.03, color="#999999", alpha=0.35, zorder=0)
        ax.set_xticks(x)
        ax.set_xticklabels(models)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_ylabel("latency / deploy reference (log)")
        ax.set_title(f"Tools on the {'TorchScript' if exp == 'ts' else 'dynamo'} training export: onnxruntime CPU, ORT_ENABLE_ALL, "
                     "1 thread, batch 1", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.text(0.5, 0.045, "bar: median over interleaved rounds of (variant / reference in the same round); black tick: "
             "median variant / median reference; band: reference +/-3%; x: no result", ha="center", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def report(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write("## Summary\n\n" + summary_markdown(results) + "\n\n## Whole command line: wall time and peak memory\n\n"
                + cli_markdown(results) + "\n\n## Per model\n\n" + markdown(results) + "\n")
    write_csv(results, os.path.join(out_dir, "results.csv"))
    try:
        plot(results, os.path.join(out_dir, "latency.png"))
    except Exception as exc:
        print(f"plot failed: {one_line(exc)}", flush=True)
    try:
        cli_plot(results, os.path.join(out_dir, "cli.png"))
    except Exception as exc:
        print(f"cli plot failed: {one_line(exc)}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--exports", nargs="+", default=EXPORTS, choices=EXPORTS)
    p.add_argument("--cache", default="/tmp/onnxrep-bench", help="exports and tool outputs (default /tmp/onnxrep-bench)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks"), help="results folder (default benchmarks/)")
    p.add_argument("--budget", type=float, default=45.0, help="latency seconds per model (0: skip latency)")
    p.add_argument("--min-rounds", type=int, default=20)
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--tool-timeout", type=int, default=900)
    p.add_argument("--cli-repeats", type=int, default=2,
                   help="interleaved rounds of the whole command lines (onnxrep, onnxslim, onnxsim); 0 skips them")
    p.add_argument("--export-timeout", type=int, default=1800)
    p.add_argument("--force-export", action="store_true", help="re-export even when cached")
    p.add_argument("--keep-layer-scale", action="store_true", help="leave timm's LayerScale gammas at their init (1e-5)")
    p.add_argument("--merge", action="store_true", help="keep other models already in results.json")
    p.add_argument("--report-only", action="store_true", help="rewrite tables, CSV and plot from results.json")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    if args.report_only:
        with open(results_path) as f:
            results = json.load(f)
        report(results, args.out)
        return 0

    t0 = time.perf_counter()
    results = {"models": {}}
    if args.merge and os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    results["command"] = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results["environment"] = environment()
    results["settings"] = {k: getattr(args, k) for k in ("budget", "min_rounds", "max_rounds", "tools", "exports", "keep_layer_scale",
                                                             "cli_repeats")}
    os.makedirs(args.cache, exist_ok=True)
    log = os.path.join(args.cache, "bench.log")
    for name in args.models:
        tm = time.perf_counter()
        try:
            entry = run_model(name, args, log)
        except Exception as exc:  # never lose the other models
            entry = {"model": name, "input_shape": input_shape(name), "error": one_line(exc)}
            traceback.print_exc()
        entry["wall_s"] = round(time.perf_counter() - tm, 1)
        results["models"][name] = entry
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"[{name}] done in {entry['wall_s']:.0f}s", flush=True)
    order = [m for m in MODELS if m in results["models"]] + [m for m in results["models"] if m not in MODELS]
    results["models"] = {m: results["models"][m] for m in order}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    report(results, args.out)
    print(f"total {results['wall_s']:.0f}s; wrote {args.out}/results.json, results.csv, tables.md, latency.png", flush=True)
    return 0


def _worker(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("job")
    p.add_argument("model")
    p.add_argument("dir")
    p.add_argument("--tool")
    p.add_argument("--export")
    p.add_argument("--variants")
    p.add_argument("--budget", type=float, default=45.0)
    p.add_argument("--min-rounds", type=int, default=20)
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--keep-layer-scale", action="store_true")
    args = p.parse_args(argv)
    return {"_export": work_export, "_baseline": work_baseline, "_tool": work_tool, "_latency": work_latency}[args.job](args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(_worker(sys.argv[1:]))
    sys.exit(main())
