"""What users of onnxsim / onnxslim / polygraphy expect from the command line and the report:
positional output, NAME:dims shapes, a summary with per-op counts and sizes, a versioned JSON
report (also on failure), progress on a terminal only, and a quiet pipe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onnxrep import __version__, cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "repvgg_ts.onnx"


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "onnxrep", *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def model(tmp_path) -> Path:
    dst = tmp_path / MODEL.name
    shutil.copyfile(MODEL, dst)
    return dst


def test_positional_output_like_onnxsim(model, tmp_path):
    rc, out, err = run(model, tmp_path / "slim.onnx")
    assert rc == 0, err
    assert (tmp_path / "slim.onnx").is_file() and not (tmp_path / "repvgg_ts.rep.onnx").exists()
    rc, _, err = run(model, tmp_path / "a.onnx", "-o", tmp_path / "b.onnx")
    assert rc == 2 and "two outputs" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("spelling", ["input=2,3,16,16", "input:2,3,16,16", "input=2x3x16x16"])
def test_input_shape_spellings(spelling):
    assert cli.parse_shapes([spelling]) == {"input": [2, 3, 16, 16]}


def test_input_shape_name_with_a_colon():
    assert cli.parse_shapes(["x:0:1,3,8,8"]) == {"x:0": [1, 3, 8, 8]}
    assert cli.parse_shapes(["x:0=1,3,8,8"]) == {"x:0": [1, 3, 8, 8]}


def test_summary_has_op_table_sizes_and_the_shape_flops_were_counted_at(model, tmp_path):
    rc, out, _ = run(model, "-o", tmp_path / "o.onnx")
    assert rc == 0
    assert "(at input=1x3x16x16)" in out
    table = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0] in
             ("Conv", "Add", "BatchNormalization", "total")]
    assert ["Conv", "10", "5"] in table and ["Add", "8", "0"] in table and ["total", "26", "10"] in table
    in_size, out_size = MODEL.stat().st_size, (tmp_path / "o.onnx").stat().st_size
    size_line = next(line for line in out.splitlines() if line.strip().startswith("size "))
    assert f"{in_size / 1e3:.1f} kB" in size_line and f"{out_size / 1e3:.1f} kB" in size_line


def test_declines_are_counted_in_the_default_summary(tmp_path):
    model = ROOT / "models" / "bsconv_u_ts.onnx"  # every composition declines (growth)
    rc, out, _ = run(model, "--dry-run")
    assert rc == 0 and "declined (-v shows why)" in out
    rc, out, _ = run(model, "--dry-run", "-v")
    assert "declined (-v shows why)" not in out and "declined at" in out


def test_json_report_is_versioned_and_complete(model, tmp_path):
    rc, _, err = run(model, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema_version"] == 1 and data["onnxrep_version"] == __version__
    assert data["status"] == "ok"
    assert data["input_bytes"] == MODEL.stat().st_size
    assert data["output_bytes"] == (tmp_path / "o.onnx").stat().st_size
    assert data["verification"]["ok"] is True


def test_report_of_a_bad_input_says_why(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    rc, _, err = run(bad, "--report", tmp_path / "r.json")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "error" and "bad.onnx" in data["error"] and data["output"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "r.json"]


def test_report_of_a_path_clash_is_not_written(model, tmp_path):
    rc, _, err = run(model, "--report", model)
    assert rc == 2
    assert model.read_bytes() == MODEL.read_bytes()


def test_progress_only_on_a_terminal(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main([str(model), "-o", str(tmp_path / "o.onnx")]) == 0
    err = capsys.readouterr().err
    assert "onnxrep: rewriting: 5" in err and "verifying" in err
    assert err.endswith("\r\x1b[K")  # the progress line is cleared at the end
    assert cli.main([str(model), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_no_progress_when_not_a_terminal(model, tmp_path):
    rc, out, err = run(model, "-o", tmp_path / "o.onnx")
    assert rc == 0 and err == ""


def test_summary_into_a_closed_pipe_is_not_an_error(model, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "onnxrep", str(model), "-o", str(tmp_path / "o.onnx")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader went away (`onnxrep ... | head -0`)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "internal error" not in err
    assert (tmp_path / "o.onnx").is_file()
