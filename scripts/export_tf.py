#!/usr/bin/env python
"""Build small training-structure CNNs in Keras and export them with tf2onnx as test fixtures.

This script is NOT a dependency of the ``onnxrep`` package: TensorFlow, Keras and tf2onnx are
only needed here, to (re)generate ``models/tf2onnx/``. The tests only read the files and
``models/tf2onnx/manifest.json``.

Setup (a throw-away virtual environment outside the repository)::

    python3 -m venv /path/to/tf
    /path/to/tf/bin/pip install tensorflow-cpu tf-keras tf2onnx onnx onnxruntime

Run (from the repository root)::

    /path/to/tf/bin/python scripts/export_tf.py [--out models/tf2onnx]

Families (NHWC, input 16x16x8, channels 8; the first block reads the graph input, so its BN
identity branch is computed by tf2onnx in NHWC): RepVGG (3x3+BN, 1x1+BN, BN identity; the second
block has stride 2 and no identity), RepVGG returning two feature maps, grouped RepVGG (groups=2
in the identity blocks), ACNet (3x3, 1x3, 3x1, each with BN; stride 1 and 2), MobileOne
(depthwise: two 3x3+BN, a 1x1+BN and a BN identity; pointwise: two 1x1+BN and a BN identity;
then a stride-2 depthwise block and another pointwise one). Each is built in Keras 3 and in
Keras 2 (tf-keras) with random weights and random BatchNorm statistics (gamma, beta, moving mean
and variance; fixed seeds: the values repeat, TensorFlow's node names may not), and exported with batch 1 and with a dynamic batch. The same network in its deploy structure
(one conv with bias per block, the branches fused here in numpy) is exported the same way as
the reference whose operator counts the manifest records (``deploy_ops``).

Grouped convolutions do not convert: Keras compiles them into a nested (XLA) function that
tf2onnx 1.17 leaves as a TensorFlow ``StatefulPartitionedCall`` (Keras 3) or ``PartitionedCall``
(tf-keras) node, which onnxruntime cannot run. Those batch-1 exports are kept in
``unconverted/`` (onnxrep must refuse them with one line naming the node) and get no manifest
entry.

Every file is checked with onnxruntime: the training-structure export against Keras, and the
deploy export against the training-structure export; the script exits non-zero on a
deviation over 1e-4 of the output's scale.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

H = W = 16
CIN = C = 8
EPS = 1e-3
COMPARE = ["Conv", "BatchNormalization", "Add", "Sub", "Transpose", "Mul"]


def same_pad(size, k, s):
    """TensorFlow's SAME padding (before, after) on one axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


# ---- network specs ------------------------------------------------------------------------
# A block is (kind, cin, cout, stride, groups, branches); a branch is ("conv", kh, kw) or ("bn",).

def spec(family):
    if family in ("repvgg", "repvgg_grouped", "repvgg_features"):
        g = 2 if family == "repvgg_grouped" else 1
        return [("conv", CIN, C, 1, g, [("conv", 3, 3), ("conv", 1, 1), ("bn",)]),
                ("conv", C, C, 2, 1, [("conv", 3, 3), ("conv", 1, 1)]),
                ("conv", C, C, 1, g, [("conv", 3, 3), ("conv", 1, 1), ("bn",)])]
    if family == "acnet":
        return [("conv", CIN, C, 1, 1, [("conv", 3, 3), ("conv", 1, 3), ("conv", 3, 1)]),
                ("conv", C, C, 2, 1, [("conv", 3, 3), ("conv", 1, 3), ("conv", 3, 1)])]
    if family == "mobileone":
        return [("dw", CIN, C, 1, C, [("conv", 3, 3), ("conv", 3, 3), ("conv", 1, 1), ("bn",)]),
                ("conv", C, C, 1, 1, [("conv", 1, 1), ("conv", 1, 1), ("bn",)]),
                ("dw", C, C, 2, C, [("conv", 3, 3), ("conv", 3, 3), ("conv", 1, 1)]),
                ("conv", C, C, 1, 1, [("conv", 1, 1), ("conv", 1, 1), ("bn",)])]
    raise ValueError(family)


def build(K, blocks, deploy=False, outputs=(-1,)):
    """The Keras model of ``blocks`` (training structure, or deploy: one conv per block) whose
    outputs are the feature maps after the blocks ``outputs``."""
    L = K.layers
    x = inp = K.Input((H, W, CIN), name="x")
    features = []
    for bi, (kind, cin, cout, s, g, branches) in enumerate(blocks):
        if deploy:
            k = max(b[1] for b in branches if b[0] == "conv")
            if kind == "dw":
                x = L.DepthwiseConv2D(k, s, padding="same", use_bias=True, name=f"b{bi}")(x)
            else:
                x = L.Conv2D(cout, k, s, padding="same", groups=g, use_bias=True, name=f"b{bi}")(x)
        else:
            ys = []
            for j, br in enumerate(branches):
                if br[0] == "bn":
                    ys.append(L.BatchNormalization(epsilon=EPS, name=f"b{bi}_bn{j}")(x))
                    continue
                if kind == "dw":
                    y = L.DepthwiseConv2D(br[1:], s, padding="same", use_bias=False, name=f"b{bi}_c{j}")(x)
                else:
                    y = L.Conv2D(cout, br[1:], s, padding="same", groups=g, use_bias=False, name=f"b{bi}_c{j}")(x)
                ys.append(L.BatchNormalization(epsilon=EPS, name=f"b{bi}_bn{j}")(y))
            x = L.Add(name=f"b{bi}_add")(ys)
        x = L.ReLU(name=f"b{bi}_relu")(x)
        features.append(x)
    outs = [features[i] for i in outputs]
    return K.Model(inp, outs if len(outs) > 1 else outs[0])


def randomize(model, rng):
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if "bn" in layer.name:
            c = ws[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c),
                               rng.normal(0, 0.3, c), rng.uniform(0.5, 2.0, c)])
        else:
            layer.set_weights([rng.normal(0, 0.3, w.shape) for w in ws])


def fuse(model, blocks, size=H):
    """Per block (kernel HWIO or HW C 1 for depthwise, bias): the branches summed."""
    out = []
    for bi, (kind, cin, cout, s, g, branches) in enumerate(blocks):
        k = max(b[1] for b in branches if b[0] == "conv")
        top, _ = same_pad(size, k, s)
        in_g = 1 if kind == "dw" else cin // g
        kernel = np.zeros((k, k, in_g, cout))
        bias = np.zeros(cout)
        for j, br in enumerate(branches):
            gamma, beta, mean, var = model.get_layer(f"b{bi}_bn{j}").get_weights()
            a = gamma / np.sqrt(var + EPS)
            bias += beta - mean * a
            if br[0] == "bn":
                ident = np.zeros((k, k, in_g, cout))
                for o in range(cout):
                    ident[top, top, 0 if kind == "dw" else o % in_g, o] = 1.0
                kernel += ident * a
                continue
            w = model.get_layer(f"b{bi}_c{j}").get_weights()[0]  # (kh, kw, in_g, cout) or (kh, kw, C, 1)
            if kind == "dw":
                w = np.transpose(w, (0, 1, 3, 2))
            kh, kw = w.shape[:2]
            r0 = top - same_pad(size, kh, s)[0]
            c0 = top - same_pad(size, kw, s)[0]
            kernel[r0:r0 + kh, c0:c0 + kw] += w * a
        if kind == "dw":
            kernel = np.transpose(kernel, (0, 1, 3, 2))
        out.append((kernel, bias))
        size = -(-size // s)
    return out


def export(model, batch, path, opset):
    import tensorflow as tf
    import tf2onnx

    sig = (tf.TensorSpec((batch, H, W, CIN), tf.float32, name="x"),)

    @tf.function(input_signature=sig)
    def f(x):
        return model(x, training=False)

    proto, _ = tf2onnx.convert.from_function(f, input_signature=sig, opset=opset)
    import onnx
    onnx.save(proto, path)
    return proto


def ort_run(path, x):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def run_keras(model, x):
    out = model(x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def check(label, got, ref):
    err = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref))) or 1.0
    if err > 1e-4 * scale:
        sys.exit(f"{label}: max deviation {err:.3g} (scale {scale:.3g})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("models", "tf2onnx"))
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()

    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx
    import tf_keras

    os.makedirs(os.path.join(args.out, "deploy"), exist_ok=True)
    frameworks = [("k3", keras, f"keras {keras.__version__} / tensorflow {tf.__version__}"),
                  ("k2", tf_keras, f"tf-keras {tf_keras.__version__} / tensorflow {tf.__version__}")]
    families = ["repvgg", "repvgg_features", "repvgg_grouped", "acnet", "mobileone"]
    descriptions = {
        "repvgg": "RepVGG: BN(conv3x3)+BN(conv1x1)[+BN(x)]; the first block has the BN identity on the NHWC input, the second stride 2",
        "repvgg_features": "RepVGG returning two feature maps (after the first and the last block)",
        "repvgg_grouped": "RepVGG with groups=2 in the identity blocks",
        "acnet": "ACNet: BN(conv3x3)+BN(conv1x3)+BN(conv3x1), stride 1 and 2",
        "mobileone": "MobileOne: depthwise 2x(3x3+BN) + 1x1+BN + BN(x), pointwise 2x(1x1+BN) + BN(x)",
    }
    rng_x = np.random.default_rng(7)
    entries = []
    for tag, K, framework in frameworks:
        for fi, family in enumerate(families):
            blocks = spec(family)
            outputs = (0, -1) if family == "repvgg_features" else (-1,)
            K.utils.set_random_seed(100 + fi)
            train = build(K, blocks, outputs=outputs)
            randomize(train, np.random.default_rng(1000 + fi))
            deploy = build(K, blocks, deploy=True, outputs=outputs)
            for bi, (kernel, bias) in enumerate(fuse(train, blocks)):
                deploy.get_layer(f"b{bi}").set_weights([kernel, bias])
            x = rng_x.standard_normal((1, H, W, CIN)).astype(np.float32)
            for got, ref in zip(run_keras(deploy, x), run_keras(train, x)):
                check(f"{family} {tag}: deploy Keras model", got, ref)
            for batch, suffix in ((1, "b1"), (None, "dyn")):
                name = f"{family}_{tag}_{suffix}.onnx"
                path = os.path.join(args.out, name)
                dpath = os.path.join(args.out, "deploy", name)
                try:
                    export(train, batch, path, args.opset)
                except Exception as exc:  # noqa: BLE001 - report and go on with the others
                    print(f"{name}: tf2onnx failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    continue
                dproto = export(deploy, batch, dpath, args.opset)
                xb = np.concatenate([x, x[:, ::-1]]) if batch is None else x
                refb = run_keras(train, xb)
                try:
                    for got, dgot, ref in zip(ort_run(path, xb), ort_run(dpath, xb), refb):
                        check(name, got, ref)
                        check(f"deploy/{name}", dgot, ref)
                except Exception as exc:  # noqa: BLE001 - e.g. a TF op left unconverted
                    print(f"{name}: onnxruntime cannot run it: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    os.remove(dpath)
                    if batch is None:
                        os.remove(path)
                    else:  # kept as the input onnxrep must refuse with one line naming the node
                        os.makedirs(os.path.join(args.out, "unconverted"), exist_ok=True)
                        os.replace(path, os.path.join(args.out, "unconverted", name))
                    continue
                counts = collections.Counter(n.op_type for n in dproto.graph.node)
                entries.append({
                    "file": name,
                    "framework": framework,
                    "exporter": f"tf2onnx {tf2onnx.__version__}",
                    "opset": args.opset,
                    "family": family,
                    "dynamic_batch": batch is None,
                    "input_shape": [1 if batch is None else batch, H, W, CIN],
                    "deploy_file": os.path.join("deploy", name),
                    "deploy_ops": dict(sorted(counts.items())),
                    "compare_ops": COMPARE,
                    "no_channel_mul": True,
                    "description": f"{descriptions[family]}; NHWC input, exported with "
                                   f"tf2onnx.convert.from_function ({'dynamic' if batch is None else 'static'} batch)",
                })
                print(f"{name}: {dict(collections.Counter(n.op_type for n in onnx.load(path).graph.node))} "
                      f"-> deploy {dict(counts)}")
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
