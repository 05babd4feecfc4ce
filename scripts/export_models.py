#!/usr/bin/env python
"""Build small training-structure CNNs in PyTorch and export them as ONNX test fixtures.

This script is NOT a dependency of the ``onnxrep`` package: PyTorch is only needed
here, to (re)generate the fixture files under ``models/``. The package and its tests
only read the generated ``.onnx`` files and ``models/manifest.json``.

Setup (any throw-away virtual environment)::

    python -m venv /path/to/venv
    /path/to/venv/bin/pip install torch==2.13.0 onnx onnxscript onnxruntime numpy

Run (from the repository root)::

    /path/to/venv/bin/python scripts/export_models.py [--out models] [--only NAME ...]

For every registered family ``NAME`` three files are written:

- ``NAME_ts.onnx``           TorchScript exporter (dynamo=False), opset 17, dynamic batch axis "N"
- ``NAME_dynamo.onnx``       dynamo exporter, opset 18 (optimized, the default)
- ``NAME_dynamo_noopt.onnx`` dynamo exporter, opset 18, optimize=False

Every BatchNorm gets random running statistics and affine parameters (fixed seed per
family), so BN folding is never an identity. Each exported file is run with
onnxruntime (all graph optimizations disabled) and compared with the PyTorch output;
the script exits non-zero if any file deviates by more than 1e-4 (max abs).

``models/manifest.json`` is rewritten with one entry per file (entries of families
not selected by ``--only`` are kept). Everything is seeded, so re-running gives
equivalent models.

To add a family: write an ``nn.Module`` whose every "block" collapses, in deploy
structure, to exactly one Conv (optionally followed by a ReLU), and add it to
``REGISTRY`` as ``name -> Family(constructor, description, blocks)``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 3, 16, 16)
TOLERANCE = 1e-4


# --------------------------------------------------------------------------- helpers


def conv_bn(cin: int, cout: int, kernel, stride: int = 1, padding=0, groups: int = 1) -> nn.Sequential:
    """Conv (bias=False) followed by BatchNorm2d, as RepVGG's ``conv_bn``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


# --------------------------------------------------------------------------- repvgg


class RepVGGBlock(nn.Module):
    """ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x) when cin == cout and stride == 1])."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if (cin == cout and stride == 1) else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)


class RepVGGNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            RepVGGBlock(3, 8, 2),
            RepVGGBlock(8, 8, 1),
            RepVGGBlock(8, 16, 2),
            RepVGGBlock(16, 16, 1),
            RepVGGBlock(16, 16, 1, groups=2),
        )

    def forward(self, x):
        return self.blocks(x)


# --------------------------------------------------------------------------- acnet


class ACBlock(nn.Module):
    """ReLU(BN(convKxK(x)) + BN(conv1xK(x)) + BN(convKx1(x)))."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        p = k // 2
        self.square = conv_bn(cin, cout, (k, k), stride, (p, p))
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, p))
        self.ver = conv_bn(cin, cout, (k, 1), stride, (p, 0))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


class ACNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            ACBlock(3, 8, 3, 1),
            ACBlock(8, 8, 3, 2),
            ACBlock(8, 12, 5, 1),
            ACBlock(12, 12, 5, 2),
        )

    def forward(self, x):
        return self.blocks(x)


# --------------------------------------------------------------------------- mobileone


class MobileOneDW(nn.Module):
    """Depthwise stage: sum_k BN(dwconv3x3) + BN(dwconv1x1) [+ BN(x) if stride 1], ReLU."""

    def __init__(self, c: int, stride: int, k: int):
        super().__init__()
        self.rbr_conv = nn.ModuleList([conv_bn(c, c, 3, stride, 1, groups=c) for _ in range(k)])
        self.rbr_scale = conv_bn(c, c, 1, stride, 0, groups=c)
        self.rbr_skip = nn.BatchNorm2d(c) if stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.act(out)


class MobileOnePW(nn.Module):
    """Pointwise stage: sum_k BN(conv1x1) [+ BN(x) if cin == cout], ReLU."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.rbr_conv = nn.ModuleList([conv_bn(cin, cout, 1, 1, 0) for _ in range(k)])
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = 0
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.act(out)


class MobileOneNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2, 1), nn.ReLU())
        self.blocks = nn.Sequential(
            MobileOneDW(8, stride=2, k=2),  # no identity
            MobileOnePW(8, 12, k=2),  # no identity
            MobileOneDW(12, stride=1, k=3),  # identity
            MobileOnePW(12, 12, k=3),  # identity
        )

    def forward(self, x):
        return self.blocks(self.stem(x))


# --------------------------------------------------------------------------- orepa_scale


def _rand_param(c: int, lo: float, hi: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(1, c, 1, 1).uniform_(lo, hi))


class ScaleBlockA(nn.Module):
    """ReLU(scale1 * conv3x3(x) + shift1 + conv1x1(x) / div), div a per-channel buffer. No identity."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv3 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.conv1 = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)
        self.scale1 = _rand_param(cout, 0.5, 1.5)
        self.shift1 = _rand_param(cout, -0.5, 0.5)
        self.register_buffer("div", torch.empty(1, cout, 1, 1).uniform_(0.5, 2.0))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.scale1 * self.conv3(x) + self.shift1 + self.conv1(x) / self.div)


class ScaleBlockB(nn.Module):
    """ReLU(scale1 * conv3x3(x) + shift1 + scale2 * conv1x1(x) + BN(x)), cin == cout, stride 1."""

    def __init__(self, c: int):
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.conv1 = nn.Conv2d(c, c, 1, 1, 0, bias=False)
        self.scale1 = _rand_param(c, 0.5, 1.5)
        self.shift1 = _rand_param(c, -0.5, 0.5)
        self.scale2 = _rand_param(c, 0.5, 1.5)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.scale1 * self.conv3(x) + self.shift1 + self.scale2 * self.conv1(x) + self.bn(x))


class ScaleBlockC(nn.Module):
    """ReLU((conv3x3(x) - sub) * scale1 + scale2 * conv1x1(x)), stride 2, sub a per-channel buffer."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv3 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.conv1 = nn.Conv2d(cin, cout, 1, 2, 0, bias=False)
        self.register_buffer("sub", torch.empty(1, cout, 1, 1).uniform_(-0.5, 0.5))
        self.scale1 = _rand_param(cout, 0.5, 1.5)
        self.scale2 = _rand_param(cout, 0.5, 1.5)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act((self.conv3(x) - self.sub) * self.scale1 + self.scale2 * self.conv1(x))


class OREPAScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ScaleBlockA(3, 8), ScaleBlockB(8), ScaleBlockC(8, 12))

    def forward(self, x):
        return self.blocks(x)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Family:
    constructor: Callable[[], nn.Module]
    description: str
    blocks: int  # number of blocks; each collapses to exactly one Conv in deploy structure


REGISTRY: dict[str, Family] = {
    "repvgg": Family(
        RepVGGNet,
        "RepVGG: BN(conv3x3)+BN(conv1x1)[+BN(x)], incl. stride 2 and groups=2",
        5,
    ),
    "acnet": Family(
        ACNet,
        "ACNet: BN(convKxK)+BN(conv1xK)+BN(convKx1), K=3/5, stride 1/2",
        4,
    ),
    "mobileone": Family(
        MobileOneNet,
        "MobileOne: stem conv_bn, depthwise k x BN(dw3x3)+BN(dw1x1)[+BN(x)], pointwise k x BN(1x1)[+BN(x)]",
        5,
    ),
    "orepa_scale": Family(
        OREPAScaleNet,
        "OREPA-style per-channel scale/shift parameters, division and subtraction by buffers, BN identity",
        3,
    ),
}

EXPORTERS = ("ts", "dynamo", "dynamo_noopt")


# --------------------------------------------------------------------------- build / export


def family_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.empty(c).uniform_(-1.0, 1.0, generator=gen))
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=gen))
                m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(torch.empty(c).uniform_(-0.5, 0.5, generator=gen))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    seed = family_seed(name)
    torch.manual_seed(seed)
    model = REGISTRY[name].constructor()
    randomize_bn(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed + 2))
    return model, x


def export_ts(model: nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
        )


def export_dynamo(model: nn.Module, x: torch.Tensor, path: str, optimize: bool) -> None:
    # dynamic batch dimension; torch.export treats size-1 dims specially, Dim.DYNAMIC
    # allows the example batch of 1 without specializing.
    dynamic_shapes = ({0: torch.export.Dim.DYNAMIC},)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=18,
                optimize=optimize,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
    except Exception:
        sys.stderr.write(log.getvalue())
        raise
    proto = prog.model_proto
    strip_bulky_metadata(proto)
    # make sure every tensor is inline (no external data file next to the model)
    onnx.external_data_helper.convert_model_from_external_data(proto)
    onnx.save(proto, path)


# Node metadata_props the dynamo exporter writes that are dropped to keep the fixtures
# small and machine-independent (stack traces hold absolute paths of this checkout).
# "pkg.torch.onnx.name_scopes" and "pkg.onnxscript.rewriter.rule_name"
# are kept, so the fixtures still carry node metadata as real dynamo exports do.
DROPPED_METADATA = (
    "pkg.torch.onnx.stack_trace",
    "pkg.torch.onnx.fx_node",
    "pkg.torch.onnx.class_hierarchy",
    "namespace",
)


def strip_bulky_metadata(proto: onnx.ModelProto) -> None:
    for node in proto.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key not in DROPPED_METADATA]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)


def export_one(model: nn.Module, x: torch.Tensor, path: str, exporter: str) -> None:
    if exporter == "ts":
        export_ts(model, x, path)
    elif exporter == "dynamo":
        export_dynamo(model, x, path, optimize=True)
    elif exporter == "dynamo_noopt":
        export_dynamo(model, x, path, optimize=False)
    else:
        raise ValueError(exporter)


# --------------------------------------------------------------------------- checks


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )


def run_ort(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


def batch_dim(model: onnx.ModelProto) -> int | str:
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_param if d.HasField("dim_param") else d.dim_value


def verify(model: nn.Module, x: torch.Tensor, path: str) -> tuple[float, bool]:
    """Compare ORT with PyTorch; returns (max abs error, dynamic batch). Raises on mismatch."""
    proto = onnx.load(path, load_external_data=False)
    if uses_external_data(proto):
        raise RuntimeError(f"{path}: uses external data")
    onnx.checker.check_model(proto, full_check=True)
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != ["input"] or names_out != ["output"]:
        raise RuntimeError(f"{path}: inputs {names_in} outputs {names_out}, expected ['input'] ['output']")
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_ort(path, x.numpy())
    if got.shape != ref.shape:
        raise RuntimeError(f"{path}: output shape {got.shape} != torch {ref.shape}")
    err = float(np.max(np.abs(got - ref)))
    if not err < TOLERANCE:
        raise RuntimeError(f"{path}: max abs error {err:.3g} >= {TOLERANCE}")
    dynamic = isinstance(batch_dim(proto), str)
    if dynamic:  # also check another batch size
        x3 = torch.randn((3,) + INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref3 = model(x3).numpy()
        err3 = float(np.max(np.abs(run_ort(path, x3.numpy()) - ref3)))
        if not err3 < TOLERANCE:
            raise RuntimeError(f"{path}: batch 3 max abs error {err3:.3g} >= {TOLERANCE}")
        err = max(err, err3)
    return err, dynamic


def op_counts(path: str) -> collections.Counter:
    """Op types of the main graph (functions / subgraphs are not expected here)."""
    proto = onnx.load(path)
    if len(proto.functions):
        raise RuntimeError(f"{path}: has {len(proto.functions)} local functions, not expected")
    return collections.Counter(n.op_type for n in proto.graph.node)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(REGISTRY), help="families to export")
    args = ap.parse_args(argv)
    # "torchvision is not installed. Skipping torchvision::nms" etc.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    out_dir = os.path.normpath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    names = args.only or list(REGISTRY)
    manifest_path = os.path.join(out_dir, "manifest.json")

    entries: list[dict] = []
    if args.only and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            entries = [e for e in json.load(f) if e.get("family") not in names]

    failures = []
    for name in names:
        fam = REGISTRY[name]
        model, x = build(name)
        for exporter in EXPORTERS:
            fname = f"{name}_{exporter}.onnx"
            path = os.path.join(out_dir, fname)
            try:
                export_one(model, x, path, exporter)
                err, dynamic = verify(model, x, path)
            except Exception as e:  # report every failure, then fail
                failures.append(f"{fname}: {type(e).__name__}: {e}")
                print(f"FAIL {fname}: {e}", file=sys.stderr)
                continue
            ops = op_counts(path)
            opset = next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))
            entries.append(
                {
                    "file": fname,
                    "family": name,
                    "exporter": exporter,
                    "opset": opset,
                    "input_shape": list(INPUT_SHAPE),
                    "dynamic_batch": dynamic,
                    "blocks": fam.blocks,
                    "expected_conv": fam.blocks,
                    "conv_before": ops.get("Conv", 0),
                    "bn_before": ops.get("BatchNormalization", 0),
                    "add_before": ops.get("Add", 0),
                    "ops_before": dict(sorted(ops.items())),
                    "description": fam.description,
                }
            )
            print(
                f"ok   {fname:32s} {os.path.getsize(path):7d} B  err={err:.2e}  "
                f"dyn={dynamic!s:5s} {dict(sorted(ops.items()))}"
            )

    if failures:
        print("\nFAILED (manifest.json left unchanged):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1

    order = {n: i for i, n in enumerate(REGISTRY)}
    entries.sort(key=lambda e: (order.get(e["family"], len(order)), e["family"], EXPORTERS.index(e["exporter"])))
    with open(manifest_path, "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
