#!/usr/bin/env python
"""Build small re-parameterizable CNNs in PaddlePaddle and export them with paddle2onnx.

Like scripts/export_models.py this script is NOT a dependency of the ``onnxrep`` package: only
the written ``.onnx`` files and ``models/paddle2onnx/manifest.json`` are read by the tests
(tests/test_framework_fixtures.py).

Setup (a throw-away virtual environment outside the repository)::

    python3 -m venv /path/to/venv
    /path/to/venv/bin/pip install paddlepaddle paddle2onnx onnx onnxruntime

Run (from the repository root)::

    /path/to/venv/bin/python scripts/export_paddle.py [--out models/paddle2onnx]

The blocks follow PaddleClas (ppcls/arch/backbone): ``DiverseBranchBlock`` with its
``BNAndPad`` layer (BN, then a border of the BN output of a zero input, written with
``paddle.concat`` of expanded per-channel values, which paddle2onnx exports as Concats of
constant slabs, Expand'ed under a dynamic batch) inside a ResNet ``BasicBlock``, and
``RepVGGBlock`` with groups. Every weight is random and every BatchNorm gets random running
statistics and affine parameters (fixed seed), so no fold is an identity.

For every network three files are written: the training structure with batch 1, the same with
a dynamic batch, and the deploy structure (every block fused into one Conv with bias by this
script, with its own numpy arithmetic, independent of onnxrep) with a dynamic batch, the
reference whose operator counts the manifest records. Each exported file is run in onnxruntime
(graph optimizations off) and compared with Paddle's output, and the deploy file with the
training file; the script exits non-zero on a deviation above 1e-4 (relative to the output's
magnitude).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import paddle
import paddle.nn as nn
import paddle2onnx

INPUT_SHAPE = (1, 3, 23, 23)
TOLERANCE = 1e-4
OPSET = 13
COMPARE_OPS = ["Conv", "BatchNormalization", "Add", "Concat", "Pad", "AveragePool", "Expand"]


# --------------------------------------------------------------------------- blocks


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    seq = nn.Sequential()
    seq.add_sublayer("conv", nn.Conv2D(cin, cout, k, stride=stride, padding=padding, groups=groups, bias_attr=False))
    seq.add_sublayer("bn", nn.BatchNorm2D(cout))
    return seq


class IdentityBasedConv1x1(nn.Conv2D):
    """PaddleClas's 1x1 conv whose kernel is its weight plus the identity."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, stride=1, padding=0, groups=groups, bias_attr=False)
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1), np.float32)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = paddle.to_tensor(id_value)

    def forward(self, x):
        kernel = self.weight + self.id_tensor
        return nn.functional.conv2d(x, kernel, None, stride=1, padding=0, groups=self._groups)

    def actual_kernel(self):
        return self.weight.numpy() + self.id_tensor.numpy()


class BNAndPad(nn.Layer):
    """BN, then a border of ``pad_pixels`` holding the BN output of a zero input (PaddleClas)."""

    def __init__(self, pad_pixels, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2D(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x):
        output = self.bn(x)
        if self.pad_pixels > 0:
            bias = -self.bn._mean
            pad_values = self.bn.bias + self.bn.weight * (bias / paddle.sqrt(self.bn._variance + self.bn._epsilon))
            n, c, h, w = output.shape
            values = pad_values.reshape([1, -1, 1, 1])
            w_values = values.expand([n, -1, self.pad_pixels, w])
            x = paddle.concat([w_values, output, w_values], axis=2)
            h = h + self.pad_pixels * 2
            h_values = values.expand([n, -1, h, self.pad_pixels])
            output = paddle.concat([h_values, x, h_values], axis=3)
        return output


class DiverseBranchBlock(nn.Layer):
    """PaddleClas's DiverseBranchBlock (groups < out_channels: the branch with the 1x1 conv)."""

    def __init__(self, cin, cout, k, stride=1, act=None):
        super().__init__()
        padding = (k - 1) // 2
        self.k, self.stride, self.padding = k, stride, padding
        self.act = nn.ReLU() if act else None
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_sublayer("conv", nn.Conv2D(cin, cout, 1, bias_attr=False))
        self.dbb_avg.add_sublayer("bn", BNAndPad(padding, cout))
        self.dbb_avg.add_sublayer("avg", nn.AvgPool2D(k, stride=stride, padding=0))
        self.dbb_avg.add_sublayer("avgbn", nn.BatchNorm2D(cout))
        self.dbb_1x1 = conv_bn(cin, cout, 1, stride)
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_sublayer("idconv1", IdentityBasedConv1x1(cin))
        self.dbb_1x1_kxk.add_sublayer("bn1", BNAndPad(padding, cin))
        self.dbb_1x1_kxk.add_sublayer("conv2", nn.Conv2D(cin, cout, k, stride=stride, padding=0, bias_attr=False))
        self.dbb_1x1_kxk.add_sublayer("bn2", nn.BatchNorm2D(cout))

    def forward(self, x):
        out = self.dbb_origin(x)
        out += self.dbb_1x1(x)
        out += self.dbb_avg(x)
        out += self.dbb_1x1_kxk(x)
        return self.act(out) if self.act else out

    def deploy(self):
        """(W, b) of the one kxk conv this block equals."""
        k, p = self.k, self.padding
        w, b = fuse_bn(self.dbb_origin.conv.weight.numpy(), self.dbb_origin.bn)
        w1, b1 = fuse_bn(self.dbb_1x1.conv.weight.numpy(), self.dbb_1x1.bn)
        w, b = w + pad_to(w1, k), b + b1
        # 1x1 -> BN with its border -> AvgPool (no padding) -> BN
        wa, ba = fuse_bn(self.dbb_avg.conv.weight.numpy(), self.dbb_avg.bn.bn)
        cout = wa.shape[0]
        avg = np.zeros((cout, cout, k, k))
        avg[np.arange(cout), np.arange(cout)] = 1.0 / (k * k)
        wc, bc = compose_1x1_kxk(wa, ba, avg, np.zeros(cout))
        wc, bc = fuse_bn(wc, self.dbb_avg.avgbn, bc)
        w, b = w + wc, b + bc
        # (weight + identity) 1x1 -> BN with its border -> kxk (no padding) -> BN
        wi, bi = fuse_bn(self.dbb_1x1_kxk.idconv1.actual_kernel(), self.dbb_1x1_kxk.bn1.bn)
        wk, bk = compose_1x1_kxk(wi, bi, self.dbb_1x1_kxk.conv2.weight.numpy(), np.zeros(cout))
        wk, bk = fuse_bn(wk, self.dbb_1x1_kxk.bn2, bk)
        assert p == k // 2
        return w + wk, b + bk


class RepVGGBlock(nn.Layer):
    """PaddleClas's RepVGGBlock: BN(conv3x3) + BN(conv1x1) [+ BN(x)], then ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.cin, self.groups = cin, groups
        self.rbr_identity = nn.BatchNorm2D(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.relu = nn.ReLU()

    def forward(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.relu(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)

    def deploy(self):
        w, b = fuse_bn(self.rbr_dense.conv.weight.numpy(), self.rbr_dense.bn)
        w1, b1 = fuse_bn(self.rbr_1x1.conv.weight.numpy(), self.rbr_1x1.bn)
        w, b = w + pad_to(w1, 3), b + b1
        if self.rbr_identity is not None:
            per_group = self.cin // self.groups
            ident = np.zeros((self.cin, per_group, 3, 3))
            ident[np.arange(self.cin), np.arange(self.cin) % per_group, 1, 1] = 1.0
            wi, bi = fuse_bn(ident, self.rbr_identity)
            w, b = w + wi, b + bi
        return w, b


class ConvBNLayer(nn.Layer):
    """PaddleClas ResNet's ConvBNLayer (conv without bias, BN, optional ReLU)."""

    def __init__(self, cin, cout, k, stride=1, act=None):
        super().__init__()
        self.stride, self.padding = stride, (k - 1) // 2
        self.conv = nn.Conv2D(cin, cout, k, stride=stride, padding=self.padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = nn.ReLU() if act else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.act(x) if self.act else x

    def deploy(self):
        return fuse_bn(self.conv.weight.numpy(), self.bn)


class BasicBlock(nn.Layer):
    """PaddleClas ResNet's BasicBlock with DiverseBranchBlock layers; the shortcut is a
    ConvBNLayer 1x1 when the shape changes or ``short`` asks for one (PaddleClas gives the first
    block of every stage one)."""

    def __init__(self, cin, cout, stride, short=False):
        super().__init__()
        self.conv0 = DiverseBranchBlock(cin, cout, 3, stride, act="relu")
        self.conv1 = DiverseBranchBlock(cout, cout, 3, 1, act=None)
        self.short = ConvBNLayer(cin, cout, 1, stride) if short or cin != cout or stride != 1 else None
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv1(self.conv0(x))
        return self.relu(paddle.add(y, x if self.short is None else self.short(x)))


class Head(nn.Layer):
    def __init__(self, channels, classes=10):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(paddle.flatten(self.pool(x), start_axis=1))


class DBBResNet(nn.Layer):
    """A ResNet of DBB BasicBlocks (PaddleClas ResNet with layer_type="DiverseBranchBlock").

    The default is tiny: a ConvBNLayer stem, two BasicBlocks (the second of stride 2 with a 1x1
    shortcut), average pool and a linear classifier. ``resnet18()`` is PaddleClas's ResNet18."""

    def __init__(self, stem=(3, 8, 3, 1), max_pool=False, stages=((8, 1, 1, False), (12, 1, 2, True)), classes=10):
        super().__init__()
        cin, cout, k, stride = stem
        self.stem = ConvBNLayer(cin, cout, k, stride, act="relu")
        self.max_pool = nn.MaxPool2D(3, stride=2, padding=1) if max_pool else None
        blocks, cin = [], cout
        for cout, depth, stride, short in stages:
            for i in range(depth):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, short and i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(cin, classes)

    @staticmethod
    def resnet18():
        return DBBResNet((3, 64, 7, 2), True, ((64, 2, 1, True), (128, 2, 2, True), (256, 2, 2, True),
                                               (512, 2, 2, True)), 1000)

    def forward(self, x):
        x = self.stem(x)
        if self.max_pool is not None:
            x = self.max_pool(x)
        return self.head(self.blocks(x))


class RepVGGNet(nn.Layer):
    """A small RepVGG: stride-2 blocks without identity, stride-1 blocks with it, groups 2 and 4."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            RepVGGBlock(3, 8, 2), RepVGGBlock(8, 8, 1), RepVGGBlock(8, 16, 2, groups=2),
            RepVGGBlock(16, 16, 1, groups=4), RepVGGBlock(16, 16, 1))
        self.head = Head(16)

    def forward(self, x):
        return self.head(self.blocks(x))


# --------------------------------------------------------------------------- deploy structure


def bn_scale_shift(bn):
    std = np.sqrt(bn._variance.numpy().astype(np.float64) + bn._epsilon)
    t = bn.weight.numpy().astype(np.float64) / std
    return t, bn.bias.numpy().astype(np.float64) - bn._mean.numpy().astype(np.float64) * t


def fuse_bn(w, bn, b=None):
    """BN(conv(x; w, b)) as one (w', b')."""
    t, c = bn_scale_shift(bn)
    b = np.zeros(len(t)) if b is None else b
    return np.asarray(w, np.float64) * t[:, None, None, None], b * t + c


def pad_to(w, k):
    p = (k - w.shape[2]) // 2
    return np.pad(w, ((0, 0), (0, 0), (p, p), (p, p)))


def compose_1x1_kxk(w1, b1, w2, b2):
    """conv2(conv1(x)) for a 1x1 conv1 whose output border holds its bias and an unpadded conv2."""
    w = np.einsum("omhw,mi->oihw", w2, w1[:, :, 0, 0])
    return w, b2 + np.einsum("omhw,m->o", w2, b1)


class DeployConv(nn.Layer):
    def __init__(self, w, b, stride, padding, act):
        super().__init__()
        cout, cin, k, _ = w.shape
        self.conv = nn.Conv2D(cin, cout, k, stride=stride, padding=padding)
        self.conv.weight.set_value(w.astype(np.float32))
        self.conv.bias.set_value(b.astype(np.float32))
        self.act = nn.ReLU() if act else None

    def forward(self, x):
        x = self.conv(x)
        return self.act(x) if self.act else x


class DeployBasicBlock(nn.Layer):
    def __init__(self, block: BasicBlock):
        super().__init__()
        c0, c1 = block.conv0, block.conv1
        self.conv0 = DeployConv(*c0.deploy(), c0.stride, c0.padding, True)
        self.conv1 = DeployConv(*c1.deploy(), 1, c1.padding, False)
        self.short = None if block.short is None else DeployConv(*block.short.deploy(), block.short.stride, 0, False)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv1(self.conv0(x))
        return self.relu(paddle.add(y, x if self.short is None else self.short(x)))


class DeployDBBResNet(nn.Layer):
    def __init__(self, net: DBBResNet):
        super().__init__()
        self.stem = DeployConv(*net.stem.deploy(), net.stem.stride, net.stem.padding, True)
        self.max_pool = net.max_pool
        self.blocks = nn.Sequential(*[DeployBasicBlock(b) for b in net.blocks])
        self.head = net.head

    def forward(self, x):
        x = self.stem(x)
        if self.max_pool is not None:
            x = self.max_pool(x)
        return self.head(self.blocks(x))


class DeployRepVGGNet(nn.Layer):
    def __init__(self, net: RepVGGNet):
        super().__init__()
        self.blocks = nn.Sequential(*[
            _grouped(DeployConv(*b.deploy(), b.rbr_dense.conv._stride, 1, True), b.groups) for b in net.blocks])
        self.head = net.head

    def forward(self, x):
        return self.head(self.blocks(x))


def _grouped(layer: DeployConv, groups: int) -> DeployConv:
    if groups == 1:
        return layer
    w, b = layer.conv.weight.numpy(), layer.conv.bias.numpy()
    conv = nn.Conv2D(w.shape[1] * groups, w.shape[0], w.shape[2], stride=layer.conv._stride, padding=1, groups=groups)
    conv.weight.set_value(w)
    conv.bias.set_value(b)
    layer.conv = conv
    return layer


# --------------------------------------------------------------------------- export


def randomize(net: nn.Layer, seed: int) -> None:
    """Random weights and random BN statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    for layer in net.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0, 0.3, c).astype(np.float32))
            layer._mean.set_value(rng.normal(0, 0.3, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype(np.float32))
        elif isinstance(layer, (nn.Conv2D, nn.Linear)):
            w = layer.weight
            fan_in = int(np.prod(w.shape[1:])) if isinstance(layer, nn.Conv2D) else w.shape[0]
            w.set_value((rng.standard_normal(w.shape) / np.sqrt(fan_in)).astype(np.float32))
            if layer.bias is not None:
                layer.bias.set_value(rng.normal(0, 0.1, layer.bias.shape).astype(np.float32))


def export(net: nn.Layer, path: str, batch, shape=INPUT_SHAPE) -> None:
    net.eval()
    spec = [paddle.static.InputSpec([batch, *shape[1:]], "float32", "x")]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "model")
        paddle.jit.save(net, prefix, input_spec=spec)
        program = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
        paddle2onnx.export(program, prefix + ".pdiparams", path, opset_version=OPSET, enable_onnx_checker=True)
    model = onnx.load(path)
    model.doc_string = ""
    onnx.save(model, path)


def run(path: str, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check(label: str, got: np.ndarray, want: np.ndarray) -> None:
    err = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    print(f"  {label}: max relative deviation {err:.2e}")
    if err > TOLERANCE:
        sys.exit(f"{label}: deviation {err:.2e} above {TOLERANCE}")


def op_counts(path: str) -> dict:
    return dict(sorted(collections.Counter(n.op_type for n in onnx.load(path).graph.node).items()))


NETWORKS = {
    "dbb_resnet": (DBBResNet, DeployDBBResNet, "dbb",
                   "tiny ResNet: ConvBNLayer stem, 2 BasicBlocks of PaddleClas DiverseBranchBlocks (BNAndPad "
                   "border as Concat of constant slabs), one of stride 2 with a ConvBNLayer 1x1 shortcut"),
    "repvgg": (RepVGGNet, DeployRepVGGNet, "repvgg",
               "small RepVGG (PaddleClas RepVGGBlock): stride-2 blocks, identity BN branches, groups 2 and 4"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("models", "paddle2onnx"))
    ap.add_argument("--resnet18", metavar="DIR",
                    help="instead, write PaddleClas's ResNet18 with DBB layers at 3x224x224 (batch 1, dynamic batch, "
                         "deploy) into DIR: a measurement, far too large for a fixture")
    args = ap.parse_args(argv)
    paddle.set_device("cpu")
    if args.resnet18:
        return export_resnet18(args.resnet18)
    os.makedirs(os.path.join(args.out, "deploy"), exist_ok=True)
    framework = f"paddlepaddle {paddle.__version__}"
    exporter = f"paddle2onnx {paddle2onnx.__version__}"
    entries = []
    rng = np.random.default_rng(1)
    for seed, (name, (build, build_deploy, family, description)) in enumerate(NETWORKS.items()):
        print(name)
        paddle.seed(seed)
        net = build()
        randomize(net, seed)
        net.eval()
        deploy = build_deploy(net)
        deploy.eval()
        deploy_file = os.path.join(args.out, "deploy", f"{name}_deploy.onnx")
        export(deploy, deploy_file, None)
        x2 = rng.standard_normal((2,) + INPUT_SHAPE[1:]).astype(np.float32)
        want2 = net(paddle.to_tensor(x2)).numpy()
        check("paddle deploy vs training", deploy(paddle.to_tensor(x2)).numpy(), want2)
        check("deploy onnx vs paddle", run(deploy_file, x2), want2)
        deploy_ops = op_counts(deploy_file)
        for dynamic in (False, True):
            file = f"{name}_{'dynamic' if dynamic else 'b1'}.onnx"
            path = os.path.join(args.out, file)
            export(net, path, None if dynamic else 1)
            x = x2 if dynamic else x2[:1]
            check(file, run(path, x), want2[: len(x)])
            entries.append({
                "file": file,
                "framework": framework,
                "exporter": exporter,
                "family": family,
                "dynamic_batch": dynamic,
                "input_shape": list(INPUT_SHAPE),  # the shape measured at (batch 1 also when dynamic)
                "opset": OPSET,
                "deploy_file": os.path.relpath(deploy_file, args.out),  # relative to the manifest's folder
                "deploy_ops": deploy_ops,
                "compare_ops": [op for op in COMPARE_OPS if op in op_counts(path) or op in deploy_ops],
                "no_channel_mul": True,
                "ops_before": op_counts(path),
                "description": description + (", dynamic batch" if dynamic else ", batch 1"),
            })
            print(f"  {file}: {entries[-1]['ops_before']}")
        print(f"  deploy: {deploy_ops}")
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")
    return 0


def export_resnet18(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    shape = (1, 3, 224, 224)
    paddle.seed(0)
    net = DBBResNet.resnet18()
    randomize(net, 0)
    net.eval()
    deploy = DeployDBBResNet(net)
    deploy.eval()
    x = np.random.default_rng(1).standard_normal((2,) + shape[1:]).astype(np.float32)
    want = net(paddle.to_tensor(x)).numpy()
    for name, layer, batch in (("b1", net, 1), ("dynamic", net, None), ("deploy", deploy, None)):
        path = os.path.join(out, f"resnet18_dbb_{name}.onnx")
        export(layer, path, batch, shape)
        n = 1 if batch == 1 else 2
        check(path, run(path, x[:n]), want[:n])
        print(f"  {path}: {op_counts(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
