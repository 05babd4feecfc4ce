"""File writes (DESIGN 5, docs/files.md): every file onnxrep writes is replaced atomically or
left as it was; the model and its data file always belong together; devices and FIFOs are
written through; colliding paths are refused before any work.

Subprocess runs (signals, concurrency, stdout) use ``python -m onnxrep`` exactly as a user
does; the rest runs ``onnxrep.cli.main`` or ``modelio.save`` in-process. Slow repetitions are
marked ``stress`` and run only with ``pytest -m stress``; a bounded version runs by default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import onnx
import pytest

from helpers import GraphBuilder, assert_same_outputs, ops
from onnxrep import cli, modelio
from onnxrep.errors import OnnxrepError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
TEMP = modelio.TEMP_PREFIX if hasattr(modelio, "TEMP_PREFIX") else ".onnxrep-"


# --------------------------------------------------------------------------------------
# Models and helpers
# --------------------------------------------------------------------------------------


def block_model(c: int = 8, seed: int = 0) -> onnx.ModelProto:
    """One RepVGG block (3x3 + 1x1 + identity, each with BN): folds to one Conv."""
    b = GraphBuilder([1, c, 8, 8], seed=seed)
    y = b.add(b.bn(b.conv(b.x, c, c, k=3, bias=False), c), b.bn(b.conv(b.x, c, c, k=1, bias=False), c), b.bn(b.x, c))
    return b.build(b.node("Relu", [y]))


def heavy_model(c: int = 1536, n: int = 4) -> onnx.ModelProto:
    """~38 MB of 1x1 Conv weights on a 1x1 image: cheap to run, slow enough to write that a
    signal sent when the first temp file appears arrives before the rename."""
    b = GraphBuilder([1, c, 1, 1])
    y = b.x
    for _ in range(n):
        y = b.node("Relu", [b.bn(b.conv(y, c, c, k=1, bias=False), c)])
    return b.build(y)


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    """Store ``model`` as an exporter does: tensors in ``<name>.data`` beside it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save turns the tensors of what it saves into references
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def snapshot(*folders: Path) -> Dict[str, str]:
    """Every entry of the folders (hidden ones included): sha256 of regular files, else the kind."""
    state = {}
    for folder in folders:
        for p in sorted(folder.iterdir()):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                state[str(p)] = stat.filemode(st.st_mode)[0] + (os.readlink(p) if p.is_symlink() else "")
    return state


def temp_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP))


def locations(path: Path) -> tuple:
    """External data files a model file refers to: {name: last byte used}, {name: bytes used}."""
    need: Dict[str, int] = {}
    used: Dict[str, int] = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            end = int(info.get("offset", 0)) + int(info["length"])
            need[info["location"]] = max(need.get(info["location"], 0), end)
            used[info["location"]] = used.get(info["location"], 0) + int(info["length"])
    return need, used


def assert_consistent(out: Path, reference: onnx.ModelProto, only_data: bool = True) -> None:
    """``out`` loads with its data, which holds exactly what it refers to, and runs like
    ``reference``; with ``only_data`` no other data file is left beside it."""
    need, used = locations(out)
    assert len(need) == 1, need
    (name, size), = need.items()
    data = out.parent / name
    assert data.is_file() and data.stat().st_size == size == used[name], \
        f"{name}: {data.stat().st_size} bytes; the model uses {used[name]}, up to byte {size}"
    if only_data:
        assert sorted(p.name for p in out.parent.glob(out.name + "*.data")) == [name]
    assert temp_files(out.parent) == []
    assert_same_outputs(reference, onnx.load(str(out)))


def run_main(*args) -> tuple:
    """(exit status, stdout, stderr) of onnxrep.cli.main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a user's terminal gives them, even when the test run
    itself was started with them ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def onnxrep_process(*args, cwd=ROOT, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxrep", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_signals, **kwargs)


def assert_one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


@pytest.fixture
def external_input(tmp_path) -> Path:
    """``in/model.onnx`` + ``in/model.onnx.data`` (one RepVGG block)."""
    (tmp_path / "in").mkdir()
    return save_external(block_model(), tmp_path / "in" / "model.onnx")


def mounted_tmpfs(folder: Path, size: str):
    """Mount a small tmpfs on ``folder`` (root only), or skip the test."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip() or r.returncode}")
    return folder


@pytest.fixture
def small_fs(tmp_path):
    folder = mounted_tmpfs(tmp_path / "fs", "256k")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


# --------------------------------------------------------------------------------------
# 1. The data file is replaced, never appended to; it gets the usual mode
# --------------------------------------------------------------------------------------


def test_rerun_replaces_the_data_file(external_input, tmp_path):
    out = tmp_path / "out.onnx"
    for _ in range(3):
        rc, _, err = run_main(external_input, "-o", out, "-q")
        assert rc == 0, err
        assert_consistent(out, block_model())
    umask = os.umask(0)
    os.umask(umask)
    data = out.parent / next(iter(locations(out)[0]))
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_in_place_with_external_data(external_input):
    folder = external_input.parent
    rc, _, err = run_main(external_input, "-o", external_input, "--in-place", "-q")
    assert rc == 0, err
    assert_consistent(external_input, block_model())
    assert ops(onnx.load(str(external_input))) == {"Conv": 1, "Relu": 1}
    assert len(list(folder.iterdir())) == 2  # the model and its new data file: the old data is gone


def test_data_not_made_by_onnxrep_is_never_removed(tmp_path):
    """The previous output referred to 'weights.bin': not named like onnxrep's data for this
    output, so it may belong to something else; it stays (unused) after the model is replaced."""
    out = tmp_path / "out.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(block_model(seed=1))
    onnx.save(copy, str(out), save_as_external_data=True, location="weights.bin", size_threshold=0)
    weights = (tmp_path / "weights.bin").read_bytes()
    src = tmp_path / "model.onnx"
    onnx.save(block_model(), str(src))
    rc, _, err = run_main(src, "-o", out, "-q", "--only", "merge_parallel_add")
    assert rc == 0, err
    assert (tmp_path / "weights.bin").read_bytes() == weights
    assert_same_outputs(block_model(), onnx.load(str(out)))


# --------------------------------------------------------------------------------------
# 2. Failing writes (full disk, read-only folder): previous output intact, exit 2, one line
# --------------------------------------------------------------------------------------


@pytest.fixture
def previous_output(external_input, tmp_path) -> Path:
    """``out/out.onnx`` with its data file, from an earlier successful run."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "out.onnx"
    assert run_main(external_input, "-o", out, "-q")[0] == 0
    return out


def _failing(function, err: int, calls: List[int]):
    def fail(*args, **kwargs):
        calls.append(1)
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
def test_full_disk_keeps_previous_output(call, external_input, previous_output, monkeypatch):
    before = snapshot(external_input.parent, previous_output.parent)
    calls: List[int] = []
    monkeypatch.setattr(os, call, _failing(getattr(os, call), errno.ENOSPC, calls))
    rc, out, err = run_main(external_input, "-o", previous_output, "-q")
    monkeypatch.undo()
    assert calls, f"os.{call} was never called: the write does not go through it"
    assert rc == 2, err
    assert_one_line(err, str(previous_output), "No space left on device")
    assert snapshot(external_input.parent, previous_output.parent) == before


def test_full_tmpfs_keeps_previous_output(small_fs, tmp_path):
    """A real full file system: the new model (512 KiB of weights) does not fit in 256 KiB."""
    out = small_fs / "out.onnx"
    small = save_external(block_model(), tmp_path / "small.onnx")
    assert run_main(small, "-o", out, "-q")[0] == 0
    before = snapshot(small_fs)
    big = save_external(heavy_model(c=256, n=2), tmp_path / "big.onnx")
    rc, _, err = run_main(big, "-o", out, "-q")
    assert rc == 2, err
    assert_one_line(err, str(out), "No space left on device")
    assert snapshot(small_fs) == before
    assert_consistent(out, block_model())


def test_read_only_folder(small_fs, external_input):
    out = small_fs / "out.onnx"
    assert run_main(external_input, "-o", out, "-q")[0] == 0
    before = snapshot(small_fs)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    rc, _, err = run_main(external_input, "-o", out, "-q")
    assert rc == 2, err
    assert_one_line(err, str(out), "Read-only file system")
    assert snapshot(small_fs) == before


def test_read_only_folder_found_while_writing(external_input, previous_output, monkeypatch):
    """The check before the run cannot see every refusal (a folder made read-only meanwhile,
    an ACL, a quota): the write itself reports it the same way."""
    before = snapshot(previous_output.parent)
    calls: List[int] = []
    real_open, fail = os.open, _failing(os.open, errno.EROFS, calls)
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: (fail if flags & os.O_CREAT else real_open)(path, flags, *a, **k))
    rc, _, err = run_main(external_input, "-o", previous_output, "-q")
    monkeypatch.undo()
    assert calls and rc == 2, err
    assert_one_line(err, str(previous_output), "Read-only file system")
    assert snapshot(previous_output.parent) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in a 0555 folder")
def test_folder_without_write_permission(external_input, previous_output):
    folder = previous_output.parent
    before = snapshot(folder)
    folder.chmod(0o555)
    try:
        rc, _, err = run_main(external_input, "-o", previous_output, "-q")
    finally:
        folder.chmod(0o755)
    assert rc == 2
    assert_one_line(err, str(previous_output), "Permission denied")
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------
# Every step of the write interrupted or failing: old files, or the complete new pair
# --------------------------------------------------------------------------------------


class _Injector:
    """Counts the file operations a write makes and breaks the n-th one. ``err``: the call
    fails with that errno instead of running. Otherwise a real SIGINT is raised just before the
    call or (``after``) just after it, as Ctrl-C would arrive: where the write holds signals
    back, the KeyboardInterrupt comes when it lets them through, as in a real run."""

    NAMES = ["open", "write", "fsync", "link", "replace"]

    def __init__(self, monkeypatch, n: int, err: int, after: bool):
        self.count, self.hit = 0, False
        # Interrupts also hit the removal of temp files (a second Ctrl-C); a failing unlink
        # (the disk is full) is not a thing.
        for name in self.NAMES + ([] if err else ["unlink"]):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name), n, err, after))

    def _wrap(self, real, n, err, after):
        def call(*args, **kwargs):
            self.count += 1
            if self.count != n:
                return real(*args, **kwargs)
            self.hit = True
            if err:
                raise OSError(err, os.strerror(err))
            if not after:
                signal.raise_signal(signal.SIGINT)
            result = real(*args, **kwargs)
            if after:
                signal.raise_signal(signal.SIGINT)
            return result

        return call


def _crash_points(tmp_path, monkeypatch, target: Path, new: onnx.ModelProto, old: onnx.ModelProto, keep):
    """Break every call of a save of ``new`` over ``target`` in turn (an interrupt before or
    after it, or a full disk); each time the folder must hold the old files unchanged, or the
    new model with its data, and no temp file."""
    folder = target.parent
    initial = snapshot(folder)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _crash_all(monkeypatch, target, new, old, keep, folder, initial)
    finally:
        signal.signal(signal.SIGINT, previous)


def _crash_all(monkeypatch, target, new, old, keep, folder, initial):
    for err, after in [(0, False), (0, True), (errno.ENOSPC, False)]:
        n = 0
        while True:
            n += 1
            with monkeypatch.context() as m:
                injector = _Injector(m, n, err, after)
                try:
                    modelio.save(new, str(target), True, keep=keep)
                    raised = None
                except (KeyboardInterrupt, OnnxrepError) as e:
                    raised = e
            assert temp_files(folder) == [], (err, after, n)
            if not injector.hit:
                assert raised is None
                break
            if err and raised is not None:
                assert isinstance(raised, OnnxrepError) and "No space left on device" in str(raised)
            if snapshot(folder) == initial:
                assert raised is not None, (err, after, n)
                continue  # nothing happened: the old pair is as it was
            # Committed (a failure after the rename, such as making the folder durable, is
            # not an error): the new model is in place with its own data.
            assert_consistent(target, new, only_data=False)
            # Reset for the next step.
            for p in folder.iterdir():
                p.unlink()
            save_external(old, target)
            assert snapshot(folder) == initial
        assert n > 6, "the write made fewer calls than expected"


def test_every_step_of_a_rewrite_can_fail(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    save_external(block_model(seed=1), folder / "out.onnx")
    _crash_points(tmp_path, monkeypatch, folder / "out.onnx", block_model(), block_model(seed=1), keep=())


def test_every_step_of_an_in_place_rewrite_can_fail(external_input, monkeypatch, tmp_path):
    # In place, the input's data file is the previous output's: kept until the new pair is in.
    new = onnx.load(str(external_input))
    new.graph.node[-1].name = "renamed"  # any change
    _crash_points(tmp_path, monkeypatch, external_input, new, block_model(), keep=())


# --------------------------------------------------------------------------------------
# 3. Interrupted runs (SIGINT, SIGTERM): earlier files untouched, own temp files removed
# --------------------------------------------------------------------------------------


def _signal_when_writing(proc: subprocess.Popen, folder: Path, sig: int, timeout: float = 120) -> bool:
    """Send ``sig`` as soon as a temp file shows up in ``folder``; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(name.startswith(TEMP) for name in os.listdir(folder)):
            proc.send_signal(sig)
            return True
        time.sleep(0.0002)  # leave the CPU to the run
    return False


@pytest.fixture(scope="module")
def heavy_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heavy")
    return save_external(heavy_model(), folder / "heavy.onnx")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("scenario", ["in_place", "rerun"])
def test_interrupted_write_leaves_earlier_files(scenario, sig, status, heavy_files, tmp_path):
    src = tmp_path / "heavy.onnx"
    for p in heavy_files.parent.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    if scenario == "in_place":
        out, args = src, ["--in-place"]
    else:
        out, args = tmp_path / "out.onnx", []
        assert run_main(src, "-o", out, "-q")[0] == 0
    before = snapshot(tmp_path)
    proc = onnxrep_process(src, "-o", out, "-q", *args)
    sent = _signal_when_writing(proc, tmp_path, sig)
    _, err = proc.communicate(timeout=120)
    assert sent, f"the run ended (status {proc.returncode}) before its first temp file was seen"
    assert proc.returncode == status, err
    assert_one_line(err.decode(), "interrupted")
    assert snapshot(tmp_path) == before


def test_sigterm_handler_is_restored(external_input, tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert run_main(external_input, "-o", tmp_path / "o.onnx", "-q")[0] == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_importing_onnxrep_installs_no_signal_handler():
    code = "import signal; h = signal.getsignal(signal.SIGTERM); import onnxrep, onnxrep.cli; " \
           "assert signal.getsignal(signal.SIGTERM) is h"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True)


# --------------------------------------------------------------------------------------
# 4. Path collisions: refused before any work, nothing written
# --------------------------------------------------------------------------------------


def _collision_setup(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src = save_external(block_model(), tmp_path / "in" / "model.onnx")
    assert run_main(src, "-o", tmp_path / "out" / "out.onnx", "-q")[0] == 0
    os.symlink("in", tmp_path / "in_link")
    os.symlink("model.onnx.data", tmp_path / "in" / "data_link")
    return src


def _out_data(tmp_path: Path) -> str:
    return "out/" + next(iter(locations(tmp_path / "out" / "out.onnx")[0]))


COLLISIONS = {
    # name: (arguments after the input, words the message must hold)
    "report_is_input_data": (["--report", "in/model.onnx.data"], ["--report", "data file of the input"]),
    "report_is_input_data_dot": (["--report", "./in/../in/model.onnx.data"], ["--report", "data file of the input"]),
    "report_is_input_data_symlink": (["--report", "in/data_link"], ["--report", "data file of the input"]),
    "report_is_input_data_hardlink": (["--report", "data_hardlink"], ["--report", "data file of the input"]),
    "report_is_input_via_folder_link": (["--report", "in_link/model.onnx"], ["--report", "input"]),
    "report_is_output": (["-o", "out/out.onnx", "--report", "./out/out.onnx"], ["--report", "output"]),
    "report_is_output_via_folder_link": (["-o", "in/x.onnx", "--report", "in_link/x.onnx"], ["--report", "output"]),
    "report_is_output_data": (["-o", "out/out.onnx", "--report", "{out_data}"], ["--report", "data file of"]),
    "output_is_input_data": (["-o", "in/model.onnx.data"], ["data file of the input"]),
    "output_is_input_data_in_place": (["-o", "in_link/model.onnx.data", "--in-place"], ["data file of the input"]),
    "output_is_input_via_folder_link": (["-o", "in_link/model.onnx"], ["--in-place"]),
    "both_to_stdout": (["-o", "-", "--report", "-"], ["stdout"]),
}


@pytest.mark.parametrize("case", COLLISIONS.values(), ids=COLLISIONS.keys())
def test_path_collisions_are_refused(case, tmp_path, monkeypatch):
    args, needles = case
    _collision_setup(tmp_path)
    if "data_hardlink" in args:  # (onnx refuses to load data with several links: only here)
        os.link(tmp_path / "in" / "model.onnx.data", tmp_path / "data_hardlink")
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{out_data}", _out_data(tmp_path)) for a in args]
    before = snapshot(tmp_path, tmp_path / "in", tmp_path / "out")
    rc, out, err = run_main("in/model.onnx", *args, "-q")
    assert rc == 2, err
    assert out == ""
    assert_one_line(err, *needles)
    assert snapshot(tmp_path, tmp_path / "in", tmp_path / "out") == before


def test_in_place_through_a_symlinked_folder_is_allowed(tmp_path, monkeypatch):
    _collision_setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main("in/model.onnx", "-o", "in_link/model.onnx", "--in-place", "-q")
    assert rc == 0, err
    assert_consistent(tmp_path / "in" / "model.onnx", block_model(), only_data=False)


# --------------------------------------------------------------------------------------
# 5. Devices, FIFOs, stdout: written through, never replaced
# --------------------------------------------------------------------------------------


@pytest.fixture
def null_device(tmp_path) -> Path:
    """A private /dev/null (same device numbers) that a faulty rename cannot harm the system by
    replacing. Root only; elsewhere the real /dev/null (which a non-root rename cannot replace)."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return Path(os.devnull)
    path = tmp_path / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.stat(os.devnull).st_rdev)
        with open(path, "wb") as f:
            f.write(b"x")
    except OSError as exc:
        pytest.skip(f"cannot make a character device here: {exc}")
    return path


@pytest.fixture
def plain_input(tmp_path) -> Path:
    src = tmp_path / "model.onnx"
    onnx.save(block_model(), str(src))
    return src


@pytest.mark.parametrize("args", [["-o", "{null}"], ["--report", "{null}", "--dry-run"], ["-o", "{null}", "--report", "{null}"]],
                         ids=["model", "report", "both"])
def test_null_device(args, plain_input, null_device, tmp_path):
    """``-o /dev/null`` checks a model without keeping the result."""
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = run_main(plain_input, *[a.replace("{null}", str(null_device)) for a in args])
    assert rc == 0, err
    assert stat.S_ISCHR(null_device.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "verified" in out


def test_symlink_to_a_device_stays_a_symlink(plain_input, null_device, tmp_path):
    link = tmp_path / "sink"
    os.symlink(null_device, link)
    assert run_main(plain_input, "-o", link, "--report", link, "-q")[0] == 0
    assert link.is_symlink() and stat.S_ISCHR(link.stat().st_mode)


def test_symlink_to_a_regular_file_stays_a_symlink(plain_input, tmp_path):
    (tmp_path / "real.json").write_text("{}")
    os.symlink("real.json", tmp_path / "link.json")
    assert run_main(plain_input, "--report", tmp_path / "link.json", "-q")[0] == 0
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads((tmp_path / "real.json").read_text())["verification"]["ok"] is True


def test_external_data_to_a_device_is_refused(external_input, null_device, tmp_path):
    before = snapshot(tmp_path / "in")
    rc, out, err = run_main(external_input, "-o", null_device)
    assert rc == 2
    assert_one_line(err, str(null_device), "external data")
    assert snapshot(tmp_path / "in") == before


def test_large_model_to_a_device_is_refused(plain_input, null_device, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1024)  # known only after optimizing
    rc, out, err = run_main(plain_input, "-o", null_device, "--report", plain_input.parent / "r.json")
    assert rc == 2
    assert_one_line(err, str(null_device), "external data")
    report = json.loads((plain_input.parent / "r.json").read_text())  # the report says why
    assert report["status"] == "error" and "external data" in report["error"] and report["output"] is None


def _read_fifo(path: Path, into: list) -> threading.Thread:
    def read():
        with open(path, "rb") as f:
            into.append(f.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_fifos_with_readers(plain_input, tmp_path):
    model_fifo, report_fifo = tmp_path / "model.fifo", tmp_path / "report.fifo"
    os.mkfifo(model_fifo)
    os.mkfifo(report_fifo)
    got_model, got_report = [], []
    threads = [_read_fifo(model_fifo, got_model), _read_fifo(report_fifo, got_report)]
    rc, _, err = run_main(plain_input, "-o", model_fifo, "--report", report_fifo, "-q")
    for t in threads:
        t.join(timeout=30)
    assert rc == 0, err
    assert stat.S_ISFIFO(model_fifo.stat().st_mode) and stat.S_ISFIFO(report_fifo.stat().st_mode)
    result = onnx.load_from_string(got_model[0])
    assert ops(result) == {"Conv": 1, "Relu": 1}
    assert_same_outputs(block_model(), result)
    assert json.loads(got_report[0])["output"] == str(model_fifo)


def test_report_to_stdout_with_dash(plain_input, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(plain_input, "--report", "-")
    assert rc == 0, err
    assert json.loads(out)["verification"]["ok"] is True  # stdout holds the report only
    assert "verified" in err  # the summary went to stderr
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("spelling", ["/dev/stdout", "link"])
def test_report_to_dev_stdout(spelling, plain_input, tmp_path):
    """/dev/stdout is a symlink to /proc/self/fd/1: written through to the pipe, and neither
    link replaced. ("link" is a symlink of our own to /dev/stdout.)"""
    if not os.path.exists("/proc/self/fd/1"):
        pytest.skip("no /proc/self/fd")
    os.symlink("/dev/stdout", tmp_path / "link")
    path = spelling if spelling.startswith("/") else tmp_path / spelling
    proc = onnxrep_process(plain_input, "-o", tmp_path / "out.onnx", "--report", path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["verification"]["ok"] is True
    assert b"verified" in err
    assert (tmp_path / "link").is_symlink() and os.path.islink("/dev/stdout")


def test_model_to_stdout(plain_input, tmp_path):
    proc = onnxrep_process(plain_input, "-o", "-")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert ops(onnx.load_from_string(out)) == {"Conv": 1, "Relu": 1}
    assert b"verified" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_report_appends_to_stdout_opened_for_append(plain_input, tmp_path):
    """``onnxrep ... --report /dev/stdout >> log``: the report is added to the log, whose
    earlier content stays (reopening /dev/stdout would truncate it)."""
    log = tmp_path / "log"
    log.write_text("earlier line\n")
    with open(log, "ab") as f:
        proc = subprocess.run([sys.executable, "-m", "onnxrep", str(plain_input), "--dry-run", "--report",
                               "/dev/stdout"], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, rest = log.read_text().split("\n", 1)
    assert first == "earlier line" and json.loads(rest)["verification"]["ok"] is True


# --------------------------------------------------------------------------------------
# 6. Concurrent runs writing the same output: the model and its data stay a pair
# --------------------------------------------------------------------------------------


def _concurrent_rounds(tmp_path: Path, rounds: int) -> None:
    models = [block_model(c=128, seed=s) for s in (1, 2)]  # 0.6 MB each
    sources = [save_external(m, tmp_path / f"m{s}.onnx") for s, m in enumerate(models)]
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "out.onnx"
    for _ in range(rounds):
        procs = [onnxrep_process(src, "-o", out, "-q") for src in sources]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        written = onnx.load(str(out))
        matching = [m for m in models if _same_outputs(m, written)]
        assert len(matching) == 1, "the model is not the result of either run"
        assert_consistent(out, matching[0])


def _same_outputs(reference: onnx.ModelProto, written: onnx.ModelProto) -> bool:
    try:
        assert_same_outputs(reference, written)
        return True
    except AssertionError:
        return False


def test_concurrent_runs_keep_model_and_data_together(tmp_path):
    _concurrent_rounds(tmp_path, rounds=5)


def test_overlapping_saves_leave_no_unused_data_file(tmp_path, monkeypatch):
    """Two saves to one path that both read the old model's data reference before either
    swaps its model in would each remove that old file, and the data file of the model
    replaced in between would stay behind unused. The folder lock makes the second save
    read the reference only after the first is done (here: the first waits in vain for the
    second at the barrier, then goes on alone)."""
    out = tmp_path / "out.onnx"
    models = [block_model(seed=s) for s in (1, 2, 3)]
    modelio.save(models[0], str(out), True)
    barrier = threading.Barrier(2, timeout=1.0)
    real = modelio.data_files

    def data_files_then_wait(path):
        found = real(path)
        if Path(path) == out:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return found

    monkeypatch.setattr(modelio, "data_files", data_files_then_wait)
    errors: list = []

    def save(model):
        try:
            modelio.save(model, str(out), True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(m,)) for m in models[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    written = onnx.load(str(out))
    (reference,) = [m for m in models[1:] if _same_outputs(m, written)]
    assert_consistent(out, reference)


@pytest.mark.stress
def test_concurrent_runs_stress(tmp_path, request):
    if "stress" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("stress run: pytest -m stress")
    _concurrent_rounds(tmp_path, rounds=int(os.environ.get("ONNXREP_STRESS_ROUNDS", "40")))
