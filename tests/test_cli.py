"""Command-line tests: ``python -m onnxrep IN [-o OUT] [options]`` (docs/verification.md, docs/files.md).

End-to-end runs go through a subprocess (exactly what a user runs); option checks run
``onnxrep.cli.main`` in-process, which is faster and lets part 3 monkeypatch a rule.
Every run checks that the input file is byte-identical afterwards, except with --in-place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import GraphBuilder, assert_same_outputs, ops

from onnxrep import cli
from onnxrep.rules import conv_bn, parallel_add

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
REPVGG = "repvgg_ts.onnx"  # dynamic batch axis, input name "input", Conv 10 -> 5
NOOPT = "repvgg_dynamo_noopt.onnx"  # torch.onnx dynamo=True, optimize=False: BN after every conv


# --------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> List[str]:
        return self.err.strip().splitlines()


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else ""


def _raw(args, subprocess_run: bool) -> Run:
    argv = [str(a) for a in args]
    if subprocess_run:
        p = subprocess.run([sys.executable, "-m", "onnxrep", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return Run(p.returncode, p.stdout, p.stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    return Run(rc, out.getvalue(), err.getvalue())


def run_onnxrep(model, *args, subprocess_run: bool = False) -> Run:
    """Run onnxrep on ``model`` and assert that the input file was not touched."""
    before = _sha(model)
    result = _raw([model, *args], subprocess_run)
    assert _sha(model) == before, f"{model} was modified"
    return result


def assert_one_line_error(r: Run, *needles: str) -> None:
    assert r.rc != 0
    assert r.out == ""
    assert "Traceback" not in r.err
    assert len(r.err_lines) == 1, r.err
    for needle in needles:
        assert needle in r.err, f"{needle!r} not in {r.err!r}"


@pytest.fixture
def copy_model(tmp_path) -> Callable[[str], Path]:
    """Copies a fixture from models/ into tmp_path (never write next to the fixtures)."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copyfile(MODELS / name, dst)
        return dst

    return copy


@pytest.fixture
def repvgg(copy_model) -> Path:
    return copy_model(REPVGG)


def files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------
# 1. Normal runs
# --------------------------------------------------------------------------------------


def test_end_to_end_default_output(repvgg, tmp_path):
    r = run_onnxrep(repvgg, subprocess_run=True)
    assert r.rc == 0, r.err
    assert r.err == ""
    out = tmp_path / "repvgg_ts.rep.onnx"
    assert files(tmp_path) == ["repvgg_ts.onnx", "repvgg_ts.rep.onnx"]
    assert "Conv 10 -> 5" in r.out and "verified" in r.out and str(out) in r.out

    original, optimized = onnx.load(repvgg), onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    assert ops(optimized)["Conv"] == 5 and "BatchNormalization" not in ops(optimized)
    assert [i.name for i in optimized.graph.input] == ["input"]
    assert optimized.opset_import == original.opset_import
    # The batch axis stays dynamic: compare at batch 1 and 3.
    assert not optimized.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert_same_outputs(original, optimized)
    assert_same_outputs(original, optimized, batch=3)


def test_output_gets_usual_file_mode(repvgg, tmp_path):
    # The atomic write goes through mkstemp (mode 0600); the result must not keep that mode.
    assert run_onnxrep(repvgg, "-q").rc == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "repvgg_ts.rep.onnx").stat().st_mode) == 0o666 & ~umask


def test_report_json(repvgg, tmp_path):
    report = tmp_path / "r.json"
    r = run_onnxrep(repvgg, "-o", tmp_path / "out.onnx", "--report", report)
    assert r.rc == 0, r.err
    data = json.loads(report.read_text())
    assert {"before", "after", "rewrites", "verification"} <= data.keys()
    assert data["verification"]["ok"] is True
    assert data["rules_applied"] == {"merge_parallel_add": 5}
    assert data["before"]["convs"] == 10 and data["after"]["convs"] == 5
    assert data["output"] == str(tmp_path / "out.onnx")
    assert data["input_shapes"] == {"input": [1, 3, 16, 16]}


def test_verbose_lists_rewrites(repvgg):
    r = run_onnxrep(repvgg, "-v", "--dry-run")
    assert r.rc == 0
    plus = [line for line in r.out.splitlines() if line.lstrip().startswith("+ ")]
    assert len(plus) == 5 and all("merge_parallel_add at '/blocks/" in line for line in plus)


def test_quiet_prints_nothing(repvgg, tmp_path):
    r = run_onnxrep(repvgg, "-q")
    assert (r.rc, r.out, r.err) == (0, "", "")
    assert (tmp_path / "repvgg_ts.rep.onnx").is_file()


def _bn_after_conv(model: onnx.ModelProto) -> int:
    conv_outputs = {o for n in model.graph.node if n.op_type == "Conv" for o in n.output}
    return sum(n.op_type == "BatchNormalization" and n.input[0] in conv_outputs for n in model.graph.node)


def test_only_fold_bn_into_conv(copy_model, tmp_path):
    model = copy_model(NOOPT)
    out = tmp_path / "out.onnx"
    r = run_onnxrep(model, "--only", "fold_bn_into_conv", "-o", out)
    assert r.rc == 0, r.err
    assert "rewrites: fold_bn_into_conv x10" in r.out and "verified" in r.out
    original, result = onnx.load(model), onnx.load(out)
    assert _bn_after_conv(original) == 10 and _bn_after_conv(result) == 0
    assert ops(result)["Add"] == ops(original)["Add"] == 8
    assert ops(result)["BatchNormalization"] == 3  # identity-branch BNs: merge_parallel_add's job
    assert_same_outputs(original, result)


def test_skip_merge_parallel_add_keeps_adds(repvgg, tmp_path):
    out = tmp_path / "out.onnx"
    # the affine-region fallback would merge the branches too: skip both
    r = run_onnxrep(repvgg, "--skip", "merge_parallel_add", "--skip", "collapse_affine_region", "-o", out)
    assert r.rc == 0, r.err
    assert ops(onnx.load(out))["Add"] == 8 and ops(onnx.load(out))["Conv"] == 10


@pytest.mark.parametrize("option", ["--only", "--skip"])
def test_unknown_rule(repvgg, tmp_path, option):
    r = run_onnxrep(repvgg, option, "fold_everything")
    assert r.rc == 2
    assert_one_line_error(r, "fold_everything", "fold_bn_into_conv")  # names the known rules
    assert files(tmp_path) == [REPVGG]


def test_input_shape(repvgg, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = run_onnxrep(repvgg, "--input-shape", "input=2,3,16,16", "-o", out, "--report", report)
    assert r.rc == 0, r.err
    assert json.loads(report.read_text())["input_shapes"] == {"input": [2, 3, 16, 16]}
    assert_same_outputs(onnx.load(repvgg), onnx.load(out), batch=2)


def test_no_verify_warns_and_writes(repvgg, tmp_path):
    r = run_onnxrep(repvgg, "--no-verify")
    assert r.rc == 0
    assert "WARNING" in r.err and "NOT" in r.err
    assert "NOT VERIFIED" in r.out
    assert (tmp_path / "repvgg_ts.rep.onnx").is_file()


def test_dry_run_writes_nothing(repvgg, tmp_path):
    r = run_onnxrep(repvgg, "--dry-run", "-o", tmp_path / "out.onnx")
    assert r.rc == 0 and "(not written)" in r.out and "verified" in r.out
    assert files(tmp_path) == [REPVGG]


def test_in_place(repvgg):
    original = onnx.load(repvgg)
    r = _raw([repvgg, "-o", repvgg, "--in-place", "-q"], subprocess_run=False)
    assert r.rc == 0, r.err
    optimized = onnx.load(repvgg)
    assert ops(optimized)["Conv"] == 5
    assert_same_outputs(original, optimized)
    assert files(repvgg.parent) == [REPVGG]  # no temp file left behind


# --------------------------------------------------------------------------------------
# 2. Bad input: one line naming the file (and node), non-zero exit, nothing written
# --------------------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)  # no checker: some of these are deliberately invalid
    return path


def _conv_model(opset: int = 17) -> onnx.ModelProto:
    b = GraphBuilder([1, 4, 8, 8])
    return b.build(b.bn(b.conv(b.x, 4, 4), 4), opset=opset, output_shape=[1, 4, 8, 8])


def make_missing(tmp):
    return tmp / "missing.onnx"


def make_missing_folder(tmp):
    return tmp / "no_such_folder" / "m.onnx"


def make_directory(tmp):
    (tmp / "folder.onnx").mkdir()
    return tmp / "folder.onnx"


def make_empty(tmp):
    (tmp / "empty.onnx").write_bytes(b"")
    return tmp / "empty.onnx"


def make_random_bytes(tmp):
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp / "random.onnx"


def make_truncated(tmp):
    data = (MODELS / REPVGG).read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.onnx"


def make_text(tmp):
    (tmp / "notes.onnx").write_text("this is not a model\nbut a text file\n")
    return tmp / "notes.onnx"


def make_opset_99(tmp):
    model = _conv_model()
    model.opset_import[0].version = 99
    return _save(model, tmp / "opset99.onnx")


def make_custom_op(tmp):
    b = GraphBuilder([1, 4, 8, 8])
    y = b.node("Frobnicate", [b.x], domain="com.example")
    graph = helper.make_graph(b.nodes, "custom", b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    return _save(model, tmp / "custom.onnx")


def make_dynamic_dims(tmp):
    b = GraphBuilder(["N", 4, "H", "W"])
    return _save(b.build(b.conv(b.x, 4, 4), output_shape=["N", 4, "H", "W"]), tmp / "dynamic.onnx")


def make_training_bn(tmp):
    b = GraphBuilder([2, 4, 8, 8])
    y = b.bn(b.conv(b.x, 4, 4), 4, training_mode=1)
    return _save(b.build(y, opset=15, output_shape=[2, 4, 8, 8]), tmp / "training_bn.onnx")


def make_good(tmp):
    shutil.copyfile(MODELS / REPVGG, tmp / REPVGG)
    return tmp / REPVGG


@dataclass
class Bad:
    make: Callable[[Path], Path]
    needles: tuple = ()
    args: tuple = ()  # "{in}" / "{tmp}" are replaced by the input path / tmp_path
    named: str = "{in}"  # the path the message must name


BAD_INPUTS = {
    "missing": Bad(make_missing, ("no such file",)),
    "missing_folder": Bad(make_missing_folder, ("no such file",)),
    "directory": Bad(make_directory, ("directory",)),
    "empty": Bad(make_empty, ("empty",)),
    "random_bytes": Bad(make_random_bytes, ("not a readable ONNX model",)),
    "truncated": Bad(make_truncated, ("not a readable ONNX model",)),
    "text": Bad(make_text, ("not a readable ONNX model",)),
    "opset_99": Bad(make_opset_99, ("opset 99",)),
    # onnxruntime's message names the op type; see the report for naming the node itself.
    "custom_op": Bad(make_custom_op, ("cannot be verified", "--no-verify", "Frobnicate")),
    "dynamic_dims": Bad(make_dynamic_dims, ("'H'", "--input-shape x=1,4,H,W")),
    "training_bn": Bad(make_training_bn, ("training_mode=1", "'BatchNormalization_")),
    "output_folder_missing": Bad(make_good, ("does not exist",), ("-o", "{tmp}/nope/out.onnx"), "{tmp}/nope/out.onnx"),
    "output_is_input": Bad(make_good, ("--in-place",), ("-o", "{in}")),
    "output_is_directory": Bad(make_good, ("directory",), ("-o", "{tmp}"), "{tmp}"),
    "report_is_input": Bad(make_good, ("--report", "input"), ("--report", "{in}")),
    "report_folder_missing": Bad(make_good, ("does not exist",), ("--report", "{tmp}/nope/r.json"), "{tmp}/nope/r.json"),
    "shape_no_equals": Bad(make_good, ("--input-shape", "NAME=D0,D1"), ("--input-shape", "1,3,16,16")),
    "shape_not_ints": Bad(make_good, ("--input-shape",), ("--input-shape", "input=1,3,a,16")),
    "shape_zero": Bad(make_good, ("--input-shape",), ("--input-shape", "input=0,3,16,16")),
    "shape_rank": Bad(make_good, ("rank 3",), ("--input-shape", "input=1,3,16")),
    "shape_fixed_axis": Bad(make_good, ("axis 1",), ("--input-shape", "input=1,4,16,16")),
    "shape_unknown_input": Bad(make_good, ("unknown input", "images"), ("--input-shape", "images=1,3,16,16")),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(case: Bad, tmp_path):
    path = case.make(tmp_path)
    fill = lambda s: s.replace("{in}", str(path)).replace("{tmp}", str(tmp_path))  # noqa: E731
    before = files(tmp_path)
    r = run_onnxrep(path, *map(fill, case.args), subprocess_run=True)
    assert r.rc == 2, r.err
    assert_one_line_error(r, fill(case.named), *case.needles)
    assert files(tmp_path) == before  # nothing written, no temp file left


def test_bad_option_is_one_line(repvgg, tmp_path):
    for args in ([], [repvgg, "--verify-draws", "many"], [repvgg, "--no-such-option"], [repvgg, "--verify-draws", "0"],
                 [repvgg, "--rtol", "-1"], [repvgg, "--rtol", "nan"], [repvgg, "--atol", "-0.1"], [repvgg, "-q", "-v"]):
        r = _raw(args, subprocess_run=False)
        assert r.rc == 2
        assert_one_line_error(r, "--help")
    assert files(tmp_path) == [REPVGG]


def test_custom_op_with_no_verify_is_written(tmp_path):
    path = make_custom_op(tmp_path)
    r = run_onnxrep(path, "--no-verify")
    assert r.rc == 0 and "WARNING" in r.err
    assert ops(onnx.load(tmp_path / "custom.rep.onnx")) == ops(onnx.load(path))


def test_weight_as_graph_input_is_left_alone(tmp_path):
    """A Conv whose weight is a graph input is a runtime value, not a parameter.

    Decision: onnxrep declines every rewrite that would have to change that weight (folding a BN
    into it would change what the caller's W means), rewrites the rest of the model, and still
    verifies. Verification draws the weight input at random like any other input, which is a
    meaningful check here: the candidate must equal the original for every (x, W), and the
    structure around W is unchanged. The decline reason is listed with -v.
    """
    b = GraphBuilder([1, 4, 8, 8])
    b.inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4, 3, 3]))
    dyn = b.bn(b.node("Conv", [b.x, "W"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 4)
    y = b.bn(b.conv(b.add(dyn, b.conv(b.x, 4, 4)), 4, 4), 4)  # this conv + BN does fold
    path = _save(b.build(y, output_shape=[1, 4, 8, 8]), tmp_path / "weight_input.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"

    r = run_onnxrep(path, "-v", "-o", out, "--report", report, subprocess_run=True)
    assert r.rc == 0, r.err
    assert "weight 'W' is not a constant" in r.out
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] is True
    assert data["rules_applied"] == {"fold_bn_into_conv": 1}
    assert data["input_shapes"] == {"x": [1, 4, 8, 8], "W": [4, 4, 3, 3]}
    original, result = onnx.load(path), onnx.load(out)
    assert [i.name for i in result.graph.input] == ["x", "W"]
    assert ops(result)["BatchNormalization"] == 1  # the BN after Conv(x, W) stays
    assert any(n.op_type == "Conv" and n.input[1] == "W" for n in result.graph.node)
    assert_same_outputs(original, result)


# --------------------------------------------------------------------------------------
# 3. A rewrite that breaks the model: rolled back, or (--no-rollback) exit 1
# --------------------------------------------------------------------------------------


def _wrong_for_group_2(fn):
    """``fn`` returning ConvParams, with bias + 1 on grouped convs only (one block of the fixture)."""

    def wrong(*args, **kwargs):
        p = fn(*args, **kwargs)
        return replace(p, bias=p.bias + 1.0) if p.group == 2 else p

    return wrong


# (module whose imported kernel name is patched, kernel name, model, options, rule, bad anchors)
BROKEN_RULES = {
    "merge_parallel_add": (parallel_add, "merge_parallel", REPVGG, (), "merge_parallel_add",
                           ["/blocks/blocks.4/Add_1"]),
    "fold_bn_into_conv": (conv_bn, "affine_after_conv", NOOPT, ("--only", "fold_bn_into_conv"),
                          "fold_bn_into_conv", ["node__native_batch_norm_legit_no_training_10__0",
                                                "node__native_batch_norm_legit_no_training_11__0"]),
}


@pytest.fixture(params=BROKEN_RULES.values(), ids=BROKEN_RULES.keys())
def broken(request, monkeypatch, copy_model):
    module, name, model, options, rule, anchors = request.param
    monkeypatch.setattr(module, name, _wrong_for_group_2(getattr(module, name)))
    return copy_model(model), options, rule, anchors


def test_failing_rewrite_is_rolled_back(broken, tmp_path):
    model, options, rule, anchors = broken
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = run_onnxrep(model, *options, "-o", out, "--report", report)
    assert r.rc == 0, r.err
    assert "rolled back" in r.out and "verified" in r.out
    data = json.loads(report.read_text())
    rolled = [rb["anchor"] for rb in data["rolled_back"]]
    assert rolled and all(rb["rule"] == rule for rb in data["rolled_back"])
    assert rolled == anchors
    assert data["rewrites"], "the good rewrites are kept"
    assert data["verification"]["ok"] is True
    assert_same_outputs(onnx.load(model), onnx.load(out))


def test_failing_rewrite_without_rollback(broken, tmp_path):
    model, options, rule, anchors = broken
    before = files(tmp_path)
    r = run_onnxrep(model, *options, "--no-rollback", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert r.rc == 1
    assert_one_line_error(r, str(model), rule, "fails verification", "node '")
    assert f"node '{anchors[0]}'" in r.err
    assert files(tmp_path) == sorted(before + ["r.json"])  # no model; the report says why
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "verification_failed" and data["output"] is None
    assert rule in data["error"] and data["schema_version"] == 1
