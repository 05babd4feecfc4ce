#!/usr/bin/env python
"""Build small re-parameterizable Flax (nnx) CNNs and export them with jax2onnx as ONNX fixtures.

This script is NOT a dependency of the ``onnxrep`` package: JAX, Flax and jax2onnx are only
needed here, to (re)generate the files under ``models/jax2onnx/``. The package and its tests only
read the generated ``.onnx`` files and ``models/jax2onnx/manifest.json``.

Setup (jax2onnx needs Python >= 3.12; any throw-away virtual environment)::

    python3.12 -m venv /path/to/venv
    /path/to/venv/bin/pip install jax==0.12.0.1 jaxlib==0.12.0.1 flax==0.12.12 jax2onnx==0.17.1 \\
        onnx==1.23.2 onnxruntime==1.32.0 numpy==2.5.5

Run (from the repository root)::

    /path/to/venv/bin/python scripts/export_jax.py [--out models/jax2onnx]

Families (input 16x16, 8 channels, NHWC as Flax lays it out; every block ends in a ReLU):

- ``repvgg``:    BN(conv3x3) + BN(conv1x1) [+ BN(x)], three blocks 8->8, 8->16 stride 2, 16->16
- ``acnet``:     BN(conv3x3) + BN(conv1x3) + BN(conv3x1), two blocks 8->8, 8->16 stride 2
- ``mobileone``: depthwise stage (two BN(dw conv3x3) + BN(dw conv1x1) [+ BN(x)]) then pointwise
  stage (two BN(conv1x1) [+ BN(x)]), three blocks 8->8, 8->16 stride 2, 16->16

For every family four files are written under the output folder:

- ``NAME_b1.onnx``          training structure, batch fixed to 1
- ``NAME_dyn.onnx``         training structure, symbolic batch axis "B"
- ``deploy/NAME_b1.onnx``   deploy structure (one biased conv per block/stage, weights fused here
  with numpy by the standard RepVGG/ACNet/MobileOne fusion), batch 1
- ``deploy/NAME_dyn.onnx``  the same with the symbolic batch axis

plus ``manifest.json``: one entry per training-structure file, with the deploy reference's file
and operator counts (``deploy_ops``) that onnxrep must reach for ``compare_ops``.

All weights and every BatchNorm's running mean/var, scale and bias are random (fixed seed per
family; the models run in eval mode, ``use_running_average=True``), so no BN folds to an
identity. Each written file is run with onnxruntime (graph optimizations disabled) on a seeded
input and compared with the Flax model, and each training-structure file with its deploy
reference; the script exits non-zero if any max abs error exceeds 1e-4 of the output scale
(max abs of the reference output, at least 1).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import zlib
from importlib.metadata import version

import jax
import numpy as np
import onnx
import onnxruntime as ort
from flax import nnx
from jax2onnx import to_onnx

CIN, HW = 8, 16
EPS = 1e-5
TOL = 1e-4
COMPARE_OPS = ["Conv", "BatchNormalization", "Add", "Transpose", "Mul"]


# --------------------------------------------------------------------------- random parameters
class Params:
    """Seeded source of conv kernels (HWIO, as Flax stores them) and BatchNorm statistics."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def kernel(self, kh: int, kw: int, cin_g: int, cout: int) -> np.ndarray:
        std = 1.0 / np.sqrt(kh * kw * cin_g)
        return (self.rng.standard_normal((kh, kw, cin_g, cout)) * std).astype(np.float32)

    def bn(self, c: int) -> dict:
        r = self.rng
        return {
            "mean": (r.standard_normal(c) * 0.2).astype(np.float32),
            "var": r.uniform(0.5, 1.5, c).astype(np.float32),
            "scale": r.uniform(0.5, 1.5, c).astype(np.float32),
            "bias": (r.standard_normal(c) * 0.2).astype(np.float32),
        }


def _set(var, value: np.ndarray) -> None:
    var.set_value(jax.numpy.asarray(value))


def make_bn(c: int, p: Params) -> nnx.BatchNorm:
    bn = nnx.BatchNorm(c, use_running_average=True, epsilon=EPS, rngs=nnx.Rngs(0))
    for k, v in p.bn(c).items():
        _set(getattr(bn, k), v)
    return bn


def make_conv(cin: int, cout: int, k, stride: int, groups: int, p: Params, bias: bool = False) -> nnx.Conv:
    kh, kw = k
    conv = nnx.Conv(cin, cout, (kh, kw), strides=(stride, stride),
                    padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
                    feature_group_count=groups, use_bias=bias, rngs=nnx.Rngs(0))
    _set(conv.kernel, p.kernel(kh, kw, cin // groups, cout))
    return conv


# --------------------------------------------------------------------------- numpy fusion
def bn_fold(bn: nnx.BatchNorm):
    """(t, shift): BN(y) == y * t + shift, per channel."""
    g = np.asarray(bn.scale.get_value(), np.float64)
    b = np.asarray(bn.bias.get_value(), np.float64)
    m = np.asarray(bn.mean.get_value(), np.float64)
    v = np.asarray(bn.var.get_value(), np.float64)
    t = g / np.sqrt(v + bn.epsilon)
    return t, b - m * t


def fuse_conv_bn(conv: nnx.Conv, bn: nnx.BatchNorm, k: int):
    """Kernel (k, k, cin_g, cout), zero-padded to the centre, and bias of BN(conv(x))."""
    w = np.asarray(conv.kernel.get_value(), np.float64)
    kh, kw = w.shape[:2]
    t, shift = bn_fold(bn)
    out = np.zeros((k, k) + w.shape[2:])
    oh, ow = (k - kh) // 2, (k - kw) // 2
    out[oh:oh + kh, ow:ow + kw] = w * t
    return out, shift


def fuse_identity_bn(bn: nnx.BatchNorm, c: int, groups: int, k: int):
    """Kernel and bias of BN(x) as a k x k conv with ``groups`` groups (c in = c out)."""
    cin_g = c // groups
    w = np.zeros((k, k, cin_g, c))
    for o in range(c):
        w[k // 2, k // 2, o % cin_g, o] = 1.0
    t, shift = bn_fold(bn)
    return w * t, shift


def fuse_branches(parts):
    return sum(w for w, _ in parts), sum(b for _, b in parts)


# --------------------------------------------------------------------------- training structure
class RepVGGBlock(nnx.Module):
    def __init__(self, cin, cout, stride, p):
        self.cin, self.cout, self.stride = cin, cout, stride
        self.c3, self.bn3 = make_conv(cin, cout, (3, 3), stride, 1, p), make_bn(cout, p)
        self.c1, self.bn1 = make_conv(cin, cout, (1, 1), stride, 1, p), make_bn(cout, p)
        self.bnid = make_bn(cin, p) if cin == cout and stride == 1 else None

    def __call__(self, x):
        y = self.bn3(self.c3(x)) + self.bn1(self.c1(x))
        if self.bnid is not None:
            y = y + self.bnid(x)
        return nnx.relu(y)

    def deploy(self):
        parts = [fuse_conv_bn(self.c3, self.bn3, 3), fuse_conv_bn(self.c1, self.bn1, 3)]
        if self.bnid is not None:
            parts.append(fuse_identity_bn(self.bnid, self.cin, 1, 3))
        return [(fuse_branches(parts), self.cin, self.cout, 3, self.stride, 1)]


class ACBlock(nnx.Module):
    def __init__(self, cin, cout, stride, p):
        self.cin, self.cout, self.stride = cin, cout, stride
        self.sq, self.bnsq = make_conv(cin, cout, (3, 3), stride, 1, p), make_bn(cout, p)
        self.hor, self.bnhor = make_conv(cin, cout, (1, 3), stride, 1, p), make_bn(cout, p)
        self.ver, self.bnver = make_conv(cin, cout, (3, 1), stride, 1, p), make_bn(cout, p)

    def __call__(self, x):
        return nnx.relu(self.bnsq(self.sq(x)) + self.bnhor(self.hor(x)) + self.bnver(self.ver(x)))

    def deploy(self):
        parts = [fuse_conv_bn(self.sq, self.bnsq, 3), fuse_conv_bn(self.hor, self.bnhor, 3),
                 fuse_conv_bn(self.ver, self.bnver, 3)]
        return [(fuse_branches(parts), self.cin, self.cout, 3, self.stride, 1)]


class MobileOneBlock(nnx.Module):
    BRANCHES = 2

    def __init__(self, cin, cout, stride, p):
        self.cin, self.cout, self.stride = cin, cout, stride
        n = self.BRANCHES
        self.dw = nnx.List([make_conv(cin, cin, (3, 3), stride, cin, p) for _ in range(n)])
        self.dwbn = nnx.List([make_bn(cin, p) for _ in range(n)])
        self.dwscale, self.dwscalebn = make_conv(cin, cin, (1, 1), stride, cin, p), make_bn(cin, p)
        self.dwid = make_bn(cin, p) if stride == 1 else None
        self.pw = nnx.List([make_conv(cin, cout, (1, 1), 1, 1, p) for _ in range(n)])
        self.pwbn = nnx.List([make_bn(cout, p) for _ in range(n)])
        self.pwid = make_bn(cin, p) if cin == cout else None

    def __call__(self, x):
        y = self.dwscalebn(self.dwscale(x))
        for c, bn in zip(self.dw, self.dwbn):
            y = y + bn(c(x))
        if self.dwid is not None:
            y = y + self.dwid(x)
        x = nnx.relu(y)
        y = None
        for c, bn in zip(self.pw, self.pwbn):
            y = bn(c(x)) if y is None else y + bn(c(x))
        if self.pwid is not None:
            y = y + self.pwid(x)
        return nnx.relu(y)

    def deploy(self):
        dw = [fuse_conv_bn(c, bn, 3) for c, bn in zip(self.dw, self.dwbn)]
        dw.append(fuse_conv_bn(self.dwscale, self.dwscalebn, 3))
        if self.dwid is not None:
            dw.append(fuse_identity_bn(self.dwid, self.cin, self.cin, 3))
        pw = [fuse_conv_bn(c, bn, 1) for c, bn in zip(self.pw, self.pwbn)]
        if self.pwid is not None:
            pw.append(fuse_identity_bn(self.pwid, self.cin, 1, 1))
        return [(fuse_branches(dw), self.cin, self.cin, 3, self.stride, self.cin),
                (fuse_branches(pw), self.cin, self.cout, 1, 1, 1)]


class Net(nnx.Module):
    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


# --------------------------------------------------------------------------- deploy structure
class DeployNet(nnx.Module):
    """One biased conv + ReLU per fused stage, weights from the training network's fusion."""

    def __init__(self, train: Net):
        convs = []
        for block in train.blocks:
            for (w, b), cin, cout, k, stride, groups in block.deploy():
                conv = nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                                padding=((k // 2, k // 2), (k // 2, k // 2)),
                                feature_group_count=groups, use_bias=True, rngs=nnx.Rngs(0))
                _set(conv.kernel, w.astype(np.float32))
                _set(conv.bias, b.astype(np.float32))
                convs.append(conv)
        self.convs = nnx.List(convs)

    def __call__(self, x):
        for c in self.convs:
            x = nnx.relu(c(x))
        return x


FAMILIES = {
    "repvgg": (RepVGGBlock, [(8, 8, 1), (8, 16, 2), (16, 16, 1)],
               "RepVGG: BN(conv3x3)+BN(conv1x1)[+BN(x)], blocks 8->8, 8->16 stride 2, 16->16; NHWC"),
    "acnet": (ACBlock, [(8, 8, 1), (8, 16, 2)],
              "ACNet: BN(conv3x3)+BN(conv1x3)+BN(conv3x1), blocks 8->8, 8->16 stride 2; NHWC"),
    "mobileone": (MobileOneBlock, [(8, 8, 1), (8, 16, 2), (16, 16, 1)],
                  "MobileOne: 2x BN(dw3x3)+BN(dw1x1)[+BN(x)], ReLU, 2x BN(conv1x1)[+BN(x)], ReLU; "
                  "blocks 8->8, 8->16 stride 2, 16->16; NHWC"),
}


def build(name: str) -> Net:
    block, spec, _ = FAMILIES[name]
    p = Params(zlib.crc32(name.encode()))
    return Net([block(cin, cout, s, p) for cin, cout, s in spec])


# --------------------------------------------------------------------------- export and checks
def export(model, path: str, dynamic: bool):
    """Export with jax2onnx and save; returns (proto, whether stale value_info had to be dropped).

    jax2onnx 0.17.1 lifts Add/Relu chains out of NCHW<->NHWC Transpose pairs but leaves the
    NHWC shapes it had declared for the tensors downstream (value_info), so onnx's full check and
    onnxruntime's loader reject the file. When (and only when) the full check fails, the
    intermediate value_info entries are dropped (they are optional); nothing else is changed.
    """
    shape = ("B" if dynamic else 1, HW, HW, CIN)
    proto = to_onnx(model, [shape], model_name=os.path.splitext(os.path.basename(path))[0],
                    input_names=["x"], output_names=["y"])
    dropped = False
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        del proto.graph.value_info[:]
        dropped = True
        onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return proto, dropped


def run_ort(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check(label: str, got: np.ndarray, ref: np.ndarray) -> bool:
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    ok = got.shape == ref.shape and err <= TOL * scale
    print(f"  {label:<40} max abs err {err:.2e} (scale {scale:.2f}) {'ok' if ok else 'FAIL'}")
    return ok


def op_counts(proto: onnx.ModelProto) -> dict:
    return dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("models", "jax2onnx"))
    args = ap.parse_args(argv)
    os.makedirs(os.path.join(args.out, "deploy"), exist_ok=True)
    framework = f"flax {version('flax')} / jax {version('jax')}"
    exporter = f"jax2onnx {version('jax2onnx')}"
    manifest, ok = [], True
    for name in FAMILIES:
        train = build(name)
        deploy = DeployNet(train)
        for dynamic in (False, True):
            tag = "dyn" if dynamic else "b1"
            batch = 3 if dynamic else 1
            x = np.random.default_rng(zlib.crc32(f"{name}/input".encode())).standard_normal(
                (batch, HW, HW, CIN)).astype(np.float32)
            ref = np.asarray(train(jax.numpy.asarray(x)), np.float64)
            fname, dname = f"{name}_{tag}.onnx", f"deploy/{name}_{tag}.onnx"
            print(f"{fname}:")
            tproto, tdropped = export(train, os.path.join(args.out, fname), dynamic)
            dproto, ddropped = export(deploy, os.path.join(args.out, dname), dynamic)
            ok &= check("flax deploy vs flax train", np.asarray(deploy(jax.numpy.asarray(x))), ref)
            ok &= check("onnxruntime train file vs flax train", run_ort(os.path.join(args.out, fname), x), ref)
            ok &= check("onnxruntime deploy file vs flax train", run_ort(os.path.join(args.out, dname), x), ref)
            ok &= check("onnxruntime deploy file vs train file", run_ort(os.path.join(args.out, dname), x),
                        run_ort(os.path.join(args.out, fname), x).astype(np.float64))
            dops = op_counts(dproto)
            print(f"  ops train {op_counts(tproto)}\n  ops deploy {dops}")
            manifest.append({
                "file": fname,
                "framework": framework,
                "exporter": exporter,
                "opset": tproto.opset_import[0].version,
                "family": name,
                "dynamic_batch": dynamic,
                "input_shape": [1, HW, HW, CIN],
                "layout": "NHWC",
                "ops_before": op_counts(tproto),
                "value_info_dropped": tdropped,
                "deploy_file": dname,
                "deploy_value_info_dropped": ddropped,
                "deploy_ops": dops,
                "compare_ops": COMPARE_OPS,
                "no_channel_mul": True,
                "description": FAMILIES[name][2] + (", symbolic batch B" if dynamic else ", batch 1"),
            })
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    if not ok:
        print("FAILED: an exported file deviates by more than the tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
