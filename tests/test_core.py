"""core: a rewrite that fails verification is found from the first diverging tensor, without
bisection, rolled back, and the rest kept."""

from dataclasses import replace

import pytest

import onnxrep
from helpers import GraphBuilder, assert_equal_per_channel, ops, random_feeds
from onnxrep import core
from onnxrep.rules import parallel_add


def _chain(blocks: int, grouped: int):
    """RepVGG blocks; block ``grouped`` uses 2 groups (the one the broken kernel gets wrong)."""
    b = GraphBuilder([1, 4, 8, 8])
    y = b.x
    for i in range(blocks):
        g = 2 if i == grouped else 1
        branches = [b.bn(b.conv(y, 4, 4, k=3, group=g), 4), b.bn(b.conv(y, 4, 4, k=1, pad=0, group=g), 4), b.bn(y, 4)]
        y = b.node("Relu", [b.add(*branches)])
    return b.build(y)


@pytest.fixture
def grouped_merge_wrong(monkeypatch):
    real = parallel_add.merge_parallel

    def wrong(*args, **kwargs):
        p = real(*args, **kwargs)
        return replace(p, bias=p.bias + 0.05) if p.group == 2 else p

    monkeypatch.setattr(parallel_add, "merge_parallel", wrong)


def test_failing_rewrite_is_located_from_the_divergence_without_bisection(grouped_merge_wrong, monkeypatch):
    def no_bisect(*args, **kwargs):
        raise AssertionError("bisection was needed")

    monkeypatch.setattr(core, "_bisect", no_bisect)
    model = _chain(6, grouped=2)
    out, report = onnxrep.optimize(model)
    assert [r.rule for r in report.rolled_back] == ["merge_parallel_add"]
    assert report.verification.ok
    assert ops(out)["Conv"] == 7  # five blocks merged, the rolled-back one keeps its two convs
    assert_equal_per_channel(model, out, random_feeds(model))


def test_a_run_whose_every_rewrite_was_rolled_back_says_so(monkeypatch):
    real = parallel_add.merge_parallel
    monkeypatch.setattr(parallel_add, "merge_parallel", lambda *a, **k: replace(real(*a, **k), bias=real(*a, **k).bias + 1))
    model = _chain(1, grouped=-1)
    out, report = onnxrep.optimize(model, only="merge_parallel_add")
    assert report.rewrites == [] and [r.rule for r in report.rolled_back] == ["merge_parallel_add"]
    assert report.status == "unchanged" and report.to_dict()["status"] == "unchanged"
    assert "every rewrite failed verification and was rolled back" in report.summary()
    assert ops(out) == ops(model)
