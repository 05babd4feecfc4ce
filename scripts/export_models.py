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

Manifest fields per file include ``tier`` (1: the seed families repvgg, acnet,
mobileone, orepa_scale; 2: dbb_*, orepa, unireplk, inception, concat, chain_*, bsconv_*, and the
1-D / 3-D families repvgg1d, repvgg3d, acnet3d, unireplk1d), ``input_shape`` (per family:
N C H W, N C L for Conv1d, N C T H W for Conv3d),
``expected_conv`` (Conv count after full re-parameterization) and ``expected_note`` (one
line: what the expected result is and why).

To add a family: write an ``nn.Module`` and add it to ``REGISTRY`` as
``name -> Family(constructor, description, blocks, expected_note, tier=..., expected_conv=...)``;
``expected_conv`` defaults to ``blocks`` (every block collapses, in deploy structure, to
exactly one Conv, optionally followed by a ReLU).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import math
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


# --------------------------------------------------------------------------- tier 2: dbb


def bn_zero_output(bn: nn.BatchNorm2d) -> torch.Tensor:
    """BN(0) per channel: beta - mean * gamma / sqrt(var + eps) (DBB's pad value)."""
    return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


class BNAndPadSlice(nn.Module):
    """DBB's BNAndPadLayer as in the original code: BN, zero pad, then overwrite the border
    with BN(0) by in-place slice assignment."""

    def __init__(self, pad: int, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pad = pad

    def forward(self, x):
        out = self.bn(x)
        p = self.pad
        if p > 0:
            pad_values = bn_zero_output(self.bn).view(1, -1, 1, 1)
            out = F.pad(out, [p] * 4)
            out[:, :, 0:p, :] = pad_values
            out[:, :, -p:, :] = pad_values
            out[:, :, :, 0:p] = pad_values
            out[:, :, :, -p:] = pad_values
        return out


class BNAndPadSub(nn.Module):
    """The same function as BNAndPadSlice, spelled pad(BN(x) - v) + v (Sub, Pad, Add)."""

    def __init__(self, pad: int, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pad = pad

    def forward(self, x):
        v = bn_zero_output(self.bn).view(1, -1, 1, 1)
        return F.pad(self.bn(x) - v, [self.pad] * 4) + v


class DBBBlock(nn.Module):
    """Diverse Branch Block: ReLU(origin + 1x1 + (1x1 -> BNAndPad -> AvgPool -> BN)
    + (1x1 -> BNAndPad -> KxK -> BN)), all convs bias-free, as in Ding et al. 2021."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, bn_and_pad: type[nn.Module]):
        super().__init__()
        p = k // 2
        self.dbb_origin = conv_bn(cin, cout, k, stride, p)
        self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, bias=False))
        self.dbb_avg.add_module("bn", bn_and_pad(p, cout))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=k, stride=stride, padding=0))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cout
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", bn_and_pad(p, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        return self.act(out)


class DBBNet(nn.Module):
    """Stem conv3x3 3->8 + BN + ReLU, then DBB blocks given as (cin, cout, K, stride)."""

    def __init__(self, bn_and_pad: type[nn.Module], specs):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 1, 1), nn.ReLU())
        self.blocks = nn.Sequential(*(DBBBlock(ci, co, k, s, bn_and_pad) for ci, co, k, s in specs))

    def forward(self, x):
        return self.blocks(self.stem(x))


def dbb_slice_net() -> nn.Module:
    # Only two DBB blocks: every slice assignment costs ~125 nodes in the TorchScript export
    # (dynamic batch), four blocks gave a 600 KB file.
    return DBBNet(BNAndPadSlice, [(8, 8, 3, 1), (8, 12, 5, 2)])


def dbb_padsub_net() -> nn.Module:
    return DBBNet(BNAndPadSub, [(8, 8, 3, 1), (8, 12, 3, 2), (12, 12, 5, 1), (12, 16, 5, 2)])


# --------------------------------------------------------------------------- tier 2: orepa


def _orepa_freq_prior(cout: int, k: int) -> torch.Tensor:
    """OREPA's fixed frequency prior (cosine basis along H for the first half of the
    output channels, along W for the second half)."""
    prior = torch.empty(cout, k, k)
    half = cout / 2
    for i in range(cout):
        for h in range(k):
            for w in range(k):
                if i < half:
                    prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / k)
                else:
                    prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half) / k)
    return prior


class OREPABlock(nn.Module):
    """OREPA-style block: the KxK kernel is generated in forward() from parameters and fixed
    priors (Einsum / Mul / Pad / Add over initializers), then F.conv2d, BN, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, k: int = 3):
        super().__init__()
        self.cin, self.cout, self.stride, self.padding, self.k = cin, cout, stride, k // 2, k
        s = 1.0 / math.sqrt(cin * k * k)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape).uniform_(-s, s) * math.sqrt(3.0))

        self.weight_origin = param(cout, cin, k, k)
        self.weight_avg_conv = param(cout, cin)
        self.register_buffer("avg_avg", torch.ones(k, k) / (k * k))
        self.weight_pfir_conv = param(cout, cin)
        self.register_buffer("fre_prior", _orepa_freq_prior(cout, k))
        self.weight_1x1_kxk_idconv1 = param(cin, cin)
        self.register_buffer("id_tensor", torch.eye(cin))
        self.weight_1x1_kxk_conv2 = param(cout, cin, k, k)
        self.weight_1x1 = param(cout, cin, 1, 1)
        self.weight_gconv_dw = param(cin, k, k)
        self.weight_gconv_pw = param(cout, cin)
        self.vector = nn.Parameter(torch.empty(6, cout).uniform_(0.2, 1.0))
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def weight_gen(self) -> torch.Tensor:
        p = self.k // 2
        w_origin = torch.einsum("oihw,o->oihw", self.weight_origin, self.vector[0, :])
        w_avg = torch.einsum("oi,hw->oihw", self.weight_avg_conv, self.avg_avg) * self.vector[1].view(-1, 1, 1, 1)
        w_pfir = torch.einsum("oi,ohw->oihw", self.weight_pfir_conv, self.fre_prior)
        w_pfir = torch.einsum("oihw,o->oihw", w_pfir, self.vector[2, :])
        conv1 = self.weight_1x1_kxk_idconv1 + self.id_tensor
        w_1x1_kxk = torch.einsum("ti,othw->oihw", conv1, self.weight_1x1_kxk_conv2)
        w_1x1_kxk = w_1x1_kxk * self.vector[3].view(-1, 1, 1, 1)
        w_1x1 = F.pad(self.weight_1x1, [p, p, p, p]) * self.vector[4].view(-1, 1, 1, 1)
        w_gconv = torch.einsum("ihw,oi->oihw", self.weight_gconv_dw, self.weight_gconv_pw)
        w_gconv = torch.einsum("oihw,o->oihw", w_gconv, self.vector[5, :])
        weight = w_origin + w_avg + w_pfir + w_1x1_kxk + w_1x1 + w_gconv
        # No-op reshape (as OREPA's dwsc2full ends with one): without it the TorchScript exporter
        # fails with "Unsupported: ONNX export of convolution for kernel of unknown shape", since
        # its F.pad of the 1x1 weight has no static output shape at symbolic time.
        return weight.reshape(self.cout, self.cin, self.k, self.k)

    def forward(self, x):
        out = F.conv2d(x, self.weight_gen(), None, self.stride, self.padding)
        return self.act(self.bn(out))


class OREPANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(OREPABlock(3, 8, 1), OREPABlock(8, 8, 2))

    def forward(self, x):
        return self.blocks(x)


# --------------------------------------------------------------------------- tier 2: unireplk


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet: BN(dw KxK) + sum_(k,d) BN(dw k x k, dilation d), depthwise, stride 1."""

    def __init__(self, c: int, kernel: int = 7, branches=((5, 1), (3, 2), (3, 3))):
        super().__init__()
        self.lk_origin = conv_bn(c, c, kernel, 1, kernel // 2, groups=c)
        self.dil = nn.ModuleList()
        for k, d in branches:
            seq = nn.Sequential()
            seq.add_module("conv", nn.Conv2d(c, c, k, 1, d * (k - 1) // 2, dilation=d, groups=c, bias=False))
            seq.add_module("bn", nn.BatchNorm2d(c))
            self.dil.append(seq)

    def forward(self, x):
        out = self.lk_origin(x)
        for branch in self.dil:
            out = out + branch(x)
        return out


class UniRepLKNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 1, 1), nn.ReLU())
        self.dilated = nn.Sequential(DilatedReparamBlock(8), nn.ReLU())
        self.pw = nn.Sequential(conv_bn(8, 8, 1), nn.ReLU())

    def forward(self, x):
        return self.pw(self.dilated(self.stem(x)))


# --------------------------------------------------------------------------- tier 2: inception


def conv_bn_relu(cin: int, cout: int, kernel, stride: int = 1, padding=0) -> nn.Sequential:
    return nn.Sequential(conv_bn(cin, cout, kernel, stride, padding), nn.ReLU())


class InceptionModule(nn.Module):
    """Concat(a: 1x1, b: 1x1 -> ReLU -> 3x3, c: 1x1 -> ReLU -> 5x5, d: maxpool3 -> 1x1), ReLU."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch_a = conv_bn_relu(cin, 4, 1)
        self.branch_b = nn.Sequential(conv_bn_relu(cin, 4, 1), conv_bn(4, 6, 3, 1, 1))
        self.branch_c = nn.Sequential(conv_bn_relu(cin, 2, 1), conv_bn(2, 4, 5, 1, 2))
        self.branch_d = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 4, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        out = torch.cat([self.branch_a(x), self.branch_b(x), self.branch_c(x), self.branch_d(x)], dim=1)
        return self.act(out)


class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8, 3, 1, 1)
        self.inception = InceptionModule(8)

    def forward(self, x):
        return self.inception(self.stem(x))


# --------------------------------------------------------------------------- tier 2: concat


class ConcatBlock(nn.Module):
    """ReLU(Concat([BN(conv3x3), BN(conv1x1), BN(conv1x3, pad (0,1))], axis=1))."""

    def __init__(self, cin: int, c3: int, c1: int, c13: int, stride: int):
        super().__init__()
        self.b3 = conv_bn(cin, c3, 3, stride, 1)
        self.b1 = conv_bn(cin, c1, 1, stride, 0)
        self.b13 = conv_bn(cin, c13, (1, 3), stride, (0, 1))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(torch.cat([self.b3(x), self.b1(x), self.b13(x)], dim=1))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ConcatBlock(3, 4, 2, 2, 1), ConcatBlock(8, 6, 4, 6, 2))

    def forward(self, x):
        return self.blocks(x)


# --------------------------------------------------------------------------- tier 2: chains


class ChainBlock(nn.Module):
    """ReLU(BN(conv1x1 project(BN(conv3x3(conv1x1 expand(x)))))), nothing non-linear between.
    ``first_bias``: the expand conv has a (random, non-zero) bias, so composing it with the
    zero-padded 3x3 is not exact on the border."""

    def __init__(self, cin: int, mid: int, cout: int, first_bias: bool):
        super().__init__()
        self.expand = nn.Conv2d(cin, mid, 1, 1, 0, bias=first_bias)
        if first_bias:
            with torch.no_grad():
                self.expand.bias.uniform_(-1.0, 1.0)
        self.conv3 = conv_bn(mid, mid, 3, 1, 1)
        self.project = conv_bn(mid, cout, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.project(self.conv3(self.expand(x))))


class ChainNet(nn.Module):
    def __init__(self, first_bias: bool):
        super().__init__()
        self.blocks = nn.Sequential(ChainBlock(3, 16, 8, first_bias), ChainBlock(8, 16, 8, first_bias))

    def forward(self, x):
        return self.blocks(x)


def chain_nobias_net() -> nn.Module:
    return ChainNet(first_bias=False)


def chain_bias_net() -> nn.Module:
    return ChainNet(first_bias=True)


# --------------------------------------------------------------------------- tier 2: bsconv


class BSConvU(nn.Module):
    """BSConv-U: conv1x1 pointwise -> depthwise 3x3 -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)
        self.dw = conv_bn(cout, cout, 3, stride, 1, groups=cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dw(self.pw(x)))


class BSConvS(nn.Module):
    """BSConv-S: conv1x1 (cin -> mid, mid < cin) -> conv1x1 (mid -> cout) -> depthwise 3x3 -> BN -> ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.pw1 = nn.Conv2d(cin, mid, 1, 1, 0, bias=False)
        self.pw2 = nn.Conv2d(mid, cout, 1, 1, 0, bias=False)
        self.dw = conv_bn(cout, cout, 3, stride, 1, groups=cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dw(self.pw2(self.pw1(x))))


class BSConvUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(BSConvU(3, 8, 1), BSConvU(8, 16, 2))

    def forward(self, x):
        return self.blocks(x)


class BSConvSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(BSConvS(3, 2, 8, 1), BSConvS(8, 4, 16, 2))

    def forward(self, x):
        return self.blocks(x)


# --------------------------------------------------------------------------- tier 2: 1-D and 3-D convs

CONV_ND = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_ND = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INPUT_1D = (1, 3, 32)  # audio / sequence: N C L
INPUT_3D = (1, 3, 6, 8, 8)  # video: N C T H W


def conv_bn_nd(dims: int, cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1,
               dilation=1) -> nn.Sequential:
    """conv_bn over ``dims`` spatial axes (Conv1d/Conv3d + BatchNorm1d/3d).

    A Conv3d keeps its bias: for a bias-less Conv3d, torch 2.13's dynamo exporter with
    optimize=False writes a zero bias of shape [Cout, 2], which onnxruntime rejects.
    """
    seq = nn.Sequential()
    seq.add_module("conv", CONV_ND[dims](cin, cout, kernel, stride, padding, dilation=dilation, groups=groups,
                                         bias=dims == 3))
    seq.add_module("bn", BN_ND[dims](cout))
    return seq


class RepVGGBlockND(nn.Module):
    """RepVGGBlock over ``dims`` spatial axes: ReLU(BN(conv3(x)) + BN(conv1(x)) [+ BN(x)])."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.rbr_dense = conv_bn_nd(dims, cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn_nd(dims, cin, cout, 1, stride, 0, groups)
        self.rbr_identity = BN_ND[dims](cin) if (cin == cout and stride == 1) else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)


def repvgg1d_net() -> nn.Module:
    return nn.Sequential(RepVGGBlockND(1, 3, 8, 2), RepVGGBlockND(1, 8, 8, 1), RepVGGBlockND(1, 8, 16, 2),
                         RepVGGBlockND(1, 16, 16, 1, groups=2))


def repvgg3d_net() -> nn.Module:
    return nn.Sequential(RepVGGBlockND(3, 3, 4, 2), RepVGGBlockND(3, 4, 4, 1), RepVGGBlockND(3, 4, 8, 2),
                         RepVGGBlockND(3, 8, 8, 1, groups=2))


class ACBlock3d(nn.Module):
    """ACNet for video: ReLU(BN(conv KxKxK) + BN(conv 1xKxK, spatial) + BN(conv Kx1x1, temporal))."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        p = k // 2
        self.cube = conv_bn_nd(3, cin, cout, (k, k, k), stride, (p, p, p))
        self.spatial = conv_bn_nd(3, cin, cout, (1, k, k), stride, (0, p, p))
        self.temporal = conv_bn_nd(3, cin, cout, (k, 1, 1), stride, (p, 0, 0))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.cube(x) + self.spatial(x) + self.temporal(x))


def acnet3d_net() -> nn.Module:
    return nn.Sequential(ACBlock3d(3, 4, 3, 1), ACBlock3d(4, 8, 3, 2), ACBlock3d(8, 8, 3, 1))


class DilatedReparamBlock1d(nn.Module):
    """UniRepLKNet's dilated reparam block on sequences: BN(dw k7) + BN(dw k5) + BN(dw k3 d2) + BN(dw k3 d3)."""

    def __init__(self, c: int, kernel: int = 7, branches=((5, 1), (3, 2), (3, 3))):
        super().__init__()
        self.lk_origin = conv_bn_nd(1, c, c, kernel, 1, kernel // 2, groups=c)
        self.dil = nn.ModuleList(conv_bn_nd(1, c, c, k, 1, d * (k - 1) // 2, groups=c, dilation=d) for k, d in branches)

    def forward(self, x):
        out = self.lk_origin(x)
        for branch in self.dil:
            out = out + branch(x)
        return out


def unireplk1d_net() -> nn.Module:
    return nn.Sequential(conv_bn_nd(1, 3, 8, 3, 1, 1), nn.ReLU(), DilatedReparamBlock1d(8), nn.ReLU(),
                         conv_bn_nd(1, 8, 8, 1), nn.ReLU())


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Family:
    constructor: Callable[[], nn.Module]
    description: str
    blocks: int  # number of blocks (stem included)
    expected_note: str  # one line: what full re-parameterization should give, and why
    tier: int = 1  # 1: the seed families; 2: harder structures (DBB, OREPA, concat, chains, ...)
    # Conv count expected after full re-parameterization; None: one Conv per block.
    expected_conv: int | None = None
    # Conv count expected with --allow-growth (rewrites that raise FLOPs); None: as expected_conv.
    expected_conv_allow_growth: int | None = None
    # the example input (N C L for 1-D convs, N C H W, N C T H W for 3-D); the batch axis is dynamic
    input_shape: tuple = INPUT_SHAPE

    @property
    def expected(self) -> int:
        return self.blocks if self.expected_conv is None else self.expected_conv

    @property
    def expected_growth(self) -> int:
        return self.expected if self.expected_conv_allow_growth is None else self.expected_conv_allow_growth


REGISTRY: dict[str, Family] = {
    # ---- tier 1: every block collapses to exactly one Conv (optionally + ReLU)
    "repvgg": Family(
        RepVGGNet,
        "RepVGG: BN(conv3x3)+BN(conv1x1)[+BN(x)], incl. stride 2 and groups=2",
        5,
        "5: each RepVGG block (3x3 + 1x1 [+ BN identity], same stride/groups) sums into one 3x3 conv",
    ),
    "acnet": Family(
        ACNet,
        "ACNet: BN(convKxK)+BN(conv1xK)+BN(convKx1), K=3/5, stride 1/2",
        4,
        "4: per block the 1xK and Kx1 kernels nest centred in the KxK window, so the three branches sum into one KxK conv",
    ),
    "mobileone": Family(
        MobileOneNet,
        "MobileOne: stem conv_bn, depthwise k x BN(dw3x3)+BN(dw1x1)[+BN(x)], pointwise k x BN(1x1)[+BN(x)]",
        5,
        "5: stem + each depthwise stage (dw3x3s + dw1x1 [+ identity]) -> one dw3x3, each pointwise stage -> one 1x1",
    ),
    "orepa_scale": Family(
        OREPAScaleNet,
        "OREPA-style per-channel scale/shift parameters, division and subtraction by buffers, BN identity",
        3,
        "3: per-channel Mul/Div/Add/Sub by constants fold into each branch conv, branches then sum into one 3x3 conv",
    ),
    # ---- tier 2
    "dbb_slice": Family(
        dbb_slice_net,
        "DBB (Diverse Branch Block): origin KxK + 1x1 + (1x1 -> BNAndPad -> AvgPool -> BN) + "
        "(1x1 -> BNAndPad -> KxK -> BN); stem + blocks 8->8 K3 s1, 8->12 K5 s2; BNAndPad border written by "
        "in-place slice assignment",
        3,
        "3: stem + one KxK conv per DBB block; BNAndPad pads with the 1x1+BN branch's zero-input value, so "
        "1x1->BN->pad->AvgPool/KxK compose exactly (AvgPool = depthwise 1/K^2 conv) and the four branches sum",
        tier=2,
    ),
    "dbb_padsub": Family(
        dbb_padsub_net,
        "DBB as dbb_slice, BNAndPad spelled pad(BN(x) - v) + v (Sub, Pad, Add), v = BN(0); stem + blocks "
        "8->8 K3 s1, 8->12 K3 s2, 12->12 K5 s1, 12->16 K5 s2",
        5,
        "5: stem + one KxK conv per DBB block, as dbb_slice (same math, the BNAndPad border is spelled Sub, Pad, Add)",
        tier=2,
    ),
    "orepa": Family(
        OREPANet,
        "OREPA: 3x3 kernel generated in forward() (einsum/mul/pad/add of params and fixed priors), "
        "F.conv2d, BN, ReLU; 3->8 s1, 8->8 s2",
        2,
        "2: the generated kernel is a constant subgraph over initializers (fold it), then Conv->BN folds: one conv per block",
        tier=2,
    ),
    "unireplk": Family(
        UniRepLKNet,
        "UniRepLKNet dilated reparam: stem conv3x3 3->8, BN(dw7x7) + BN(dw5x5 d1) + BN(dw3x3 d2) + BN(dw3x3 d3) "
        "on 8 ch, ReLU, then conv1x1+BN+ReLU",
        3,
        "3: stem + one dense depthwise 7x7 (dilated k x k = (k-1)d+1 kernel with zero taps, all centred in 7x7) "
        "+ the pointwise 1x1; a ReLU separates the dw block from the 1x1 (the stem is needed for 3 input channels)",
        tier=2,
    ),
    "inception": Family(
        InceptionNet,
        "Inception: stem conv3x3 3->8; Concat(1x1, 1x1->ReLU->3x3, 1x1->ReLU->5x5, maxpool3->1x1) on 8 ch, ReLU",
        2,
        "5: 7 convs (stem + 6 in the module); the three leading 1x1 convs on the same input merge "
        "horizontally into one 1x1 + Split (7 - 2); nothing else is linear-adjacent (ReLU / MaxPool between)",
        tier=2,
        expected_conv=5,
    ),
    "concat": Family(
        ConcatNet,
        "Concat block: ReLU(Concat([BN(conv3x3), BN(conv1x1), BN(conv1x3 pad (0,1))])), 3->8 s1, 8->16 s2",
        2,
        "6 by default, 2 with --allow-growth: the 1x1 and 1x3 kernels nest centred in the 3x3 window, so each "
        "depth concat is exactly one 3x3 conv, but their zero taps raise MACs 13 -> 27 per output pixel, so "
        "that merge is a growth rewrite",
        tier=2,
        expected_conv=6,
        expected_conv_allow_growth=2,
    ),
    "chain_nobias": Family(
        chain_nobias_net,
        "Chain: 1x1 expand (no bias, no BN) -> 3x3 pad 1 + BN -> 1x1 project + BN, ReLU; 3->16->16->8, 8->16->16->8",
        2,
        "2: per block 1x1 (bias 0) -> padded 3x3 composes exactly (zero border stays zero), and 3x3 -> 1x1 is "
        "always exact: one 3x3 conv per block",
        tier=2,
    ),
    "chain_bias": Family(
        chain_bias_net,
        "Chain as chain_nobias, but the 1x1 expand has a random non-zero bias",
        2,
        "4: per block the expand 1x1 stays (its bias makes 1x1 -> zero-padded 3x3 inexact on the border) and "
        "3x3 -> 1x1 project fuses (always exact): 2 convs per block",
        tier=2,
        expected_conv=4,
    ),
    "bsconv_u": Family(
        BSConvUNet,
        "BSConv-U: conv1x1 pointwise -> depthwise 3x3 + BN, ReLU; 3->8 s1, 8->16 s2",
        2,
        "4: unchanged from the export (1x1 + dw3x3 per block): composing pointwise -> depthwise into one dense "
        "3x3 is exact but multiplies FLOPs, so it is not applied by default (2 with --allow-growth)",
        tier=2,
        expected_conv=4,
        expected_conv_allow_growth=2,
    ),
    "bsconv_s": Family(
        BSConvSNet,
        "BSConv-S: conv1x1 (cin->mid) -> conv1x1 (mid->cout) -> depthwise 3x3 + BN, ReLU; 3->2->8 s1, 8->4->16 s2",
        2,
        "6: unchanged from the export (1x1 + 1x1 + dw3x3 per block): merging the thin 1x1 pair or composing into "
        "a dense 3x3 is exact but raises FLOPs, so it is not applied by default (2 with --allow-growth)",
        tier=2,
        expected_conv=6,
        expected_conv_allow_growth=2,
    ),
    "repvgg1d": Family(
        repvgg1d_net,
        "RepVGG with Conv1d/BatchNorm1d (audio, sequences): BN(conv3)+BN(conv1)[+BN(x)], 3->8 s2, 8->8, "
        "8->16 s2, 16->16 groups=2; input N x 3 x 32",
        4,
        "4: per axis the same algebra as 2-D RepVGG; each block (k3 + k1 [+ BN identity]) sums into one k3 Conv1d",
        tier=2,
        input_shape=INPUT_1D,
    ),
    "repvgg3d": Family(
        repvgg3d_net,
        "RepVGG with Conv3d/BatchNorm3d (video): BN(conv3x3x3)+BN(conv1x1x1)[+BN(x)], 3->4 s2, 4->4, 4->8 s2, "
        "8->8 groups=2; input N x 3 x 6 x 8 x 8",
        4,
        "4: each block (3x3x3 + 1x1x1 [+ BN identity]) sums into one 3x3x3 Conv3d",
        tier=2,
        input_shape=INPUT_3D,
    ),
    "acnet3d": Family(
        acnet3d_net,
        "ACNet for video: BN(conv3x3x3)+BN(conv1x3x3 pad (0,1,1))+BN(conv3x1x1 pad (1,0,0)), 3->4, 4->8 s2, "
        "8->8; input N x 3 x 6 x 8 x 8",
        3,
        "3: per block the spatial 1x3x3 and temporal 3x1x1 kernels nest centred in the 3x3x3 window: one Conv3d",
        tier=2,
        input_shape=INPUT_3D,
    ),
    "unireplk1d": Family(
        unireplk1d_net,
        "UniRepLKNet dilated reparam on sequences: stem Conv1d k3 3->8 + BN, ReLU; BN(dw k7) + BN(dw k5) + "
        "BN(dw k3 d2) + BN(dw k3 d3) on 8 ch, ReLU; conv k1 + BN, ReLU; input N x 3 x 32",
        3,
        "3: stem + one depthwise k7 Conv1d (dilated k3 = extent (k-1)d+1 with zero taps, all centred in 7) "
        "+ the pointwise k1; ReLUs separate them",
        tier=2,
        input_shape=INPUT_1D,
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
    x = torch.randn(REGISTRY[name].input_shape, generator=torch.Generator().manual_seed(seed + 2))
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
        x3 = torch.randn((3,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(7))
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
                    "input_shape": list(fam.input_shape),
                    "dynamic_batch": dynamic,
                    "tier": fam.tier,
                    "blocks": fam.blocks,
                    "expected_conv": fam.expected,
                    "expected_conv_allow_growth": fam.expected_growth,
                    "expected_note": fam.expected_note,
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
