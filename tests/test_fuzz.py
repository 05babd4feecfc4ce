"""Corrupted models: whatever the bytes, onnxrep answers cleanly (DESIGN 5, "Bad input").

Each case mutates one of the small shipped fixtures, either as raw bytes (flips, overwrites,
truncation, insertion, deletion, invalid UTF-8 inside a name) or as protobuf fields (invalid
element types, missing or duplicated tensors, dangling inputs, cycles, non-UTF-8 attribute
bytes, negative or absurd dims, ...), and runs the CLI in-process on it. The answer must be a
result (exit 0), a verification failure (1) or a bad-input error (2), never an internal error
(3); a non-zero exit prints exactly one line on stderr and never a traceback.

Cases are seeded and deterministic: case ``i`` applies mutation ``MUTATIONS[i % len]`` to
fixture ``FIXTURES[(i // len) % len]`` with ``random.Random(i)``. ``ONNXREP_FUZZ_COUNT`` sets
the number of default cases (one per mutation and fixture, 188); ``pytest -m slow
tests/test_fuzz.py`` runs ``ONNXREP_FUZZ_SLOW_COUNT`` (1200) more in one test (skipped unless
the ``slow`` marker is selected).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxrep import cli

MODELS = Path(__file__).resolve().parents[1] / "models"
FIXTURES = ["bsconv_u_ts.onnx", "concat_ts.onnx", "inception_ts.onnx", "bsconv_u_dynamo.onnx"]
SLOW_COUNT = int(os.environ.get("ONNXREP_FUZZ_SLOW_COUNT", "1200"))

_fixture_bytes: Dict[str, bytes] = {}


def fixture_bytes(name: str) -> bytes:
    if name not in _fixture_bytes:
        _fixture_bytes[name] = (MODELS / name).read_bytes()
    return _fixture_bytes[name]


# --------------------------------------------------------------------------------------
# Raw byte mutations: (data, rng) -> data
# --------------------------------------------------------------------------------------


def flip_byte(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    i = rng.randrange(len(b))
    b[i] ^= rng.randrange(1, 256)
    return bytes(b)


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(2, 8)):
        data = flip_byte(data, rng)
    return data


def flip_bit(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    i = rng.randrange(len(b))
    b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def insert_byte(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + bytes([rng.randrange(256)]) + data[i:]


def delete_byte(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + 1 :]


def duplicate_chunk(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 64))
    return data[:j] + data[i:j] + data[j:]


def _names(model: onnx.ModelProto) -> List[str]:
    g = model.graph
    names = [n.name for n in g.node if n.name] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output if o]
    return sorted({n for n in names if len(n) >= 2})


def name_bad_utf8(data: bytes, rng: random.Random) -> bytes:
    """One byte of a node or tensor name becomes invalid UTF-8 (same length: still parses)."""
    name = rng.choice(_names(onnx.load_from_string(data))).encode()
    starts = [i for i in range(len(data)) if data.startswith(name, i)]
    i = rng.choice(starts) + rng.randrange(len(name))
    return data[:i] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0xFE])]) + data[i + 1 :]


# --------------------------------------------------------------------------------------
# Protobuf field mutations: (model, rng) -> None, in place
# --------------------------------------------------------------------------------------


def _value_infos(model: onnx.ModelProto):
    g = model.graph
    return list(g.input) + list(g.output) + list(g.value_info)


def bad_elem_type(model, rng):
    vi = rng.choice(_value_infos(model))
    vi.type.tensor_type.elem_type = rng.choice([0, 17, 23, 64, 99, 1000, 2**31 - 1])


def bad_initializer_type(model, rng):
    t = rng.choice(model.graph.initializer)
    t.data_type = rng.choice([0, 8, 13, 16, 17, 99, 12345])  # undefined, string, uint64, bf16, ...


def delete_initializer(model, rng):
    inits = model.graph.initializer
    del inits[rng.randrange(len(inits))]


def duplicate_initializer(model, rng):
    t = rng.choice(model.graph.initializer)
    copy = model.graph.initializer.add()
    copy.CopyFrom(t)
    if rng.random() < 0.5:
        copy.raw_data = copy.raw_data[: len(copy.raw_data) // 2]


def _with_inputs(model, rng, n: int = 1) -> onnx.NodeProto:
    """A node with at least ``n`` inputs (exporters also write input-less Constant nodes)."""
    return rng.choice([node for node in model.graph.node if len(node.input) >= n])


def dangling_input(model, rng):
    node = _with_inputs(model, rng)
    node.input[rng.randrange(len(node.input))] = rng.choice(["missing_tensor", "", "input "])


def dangling_output(model, rng):
    model.graph.output[0].name = "no_such_output"


def duplicate_output(model, rng):
    """Two nodes write the same tensor."""
    a, b = rng.sample(list(model.graph.node), 2)
    b.output[0] = a.output[0]


def self_loop(model, rng):
    node = _with_inputs(model, rng)
    node.input[0] = node.output[0]


def cycle(model, rng):
    nodes = model.graph.node
    i = rng.choice([k for k in range(len(nodes) - 1) if nodes[k].input])
    nodes[i].input[0] = nodes[rng.randrange(i + 1, len(nodes))].output[0]


def shuffle_nodes(model, rng):
    nodes = list(model.graph.node)
    rng.shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def bad_attribute_bytes(model, rng):
    """A string attribute whose bytes are not UTF-8 (on a known or an unknown attribute name)."""
    node = rng.choice(model.graph.node)
    name = rng.choice(["auto_pad", "config_proto", "kernel_shape", "mode"])
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, b"\x08\xff\xfe"))


def attribute_wrong_type(model, rng):
    node = rng.choice([n for n in model.graph.node if n.attribute] or list(model.graph.node))
    if not node.attribute:
        node.attribute.append(helper.make_attribute("axis", 1))
    a = rng.choice(node.attribute)
    kind = rng.choice(["float", "ints_empty", "type_mismatch", "undefined", "tensor"])
    if kind == "float":
        a.Clear()
        a.CopyFrom(helper.make_attribute(a.name or "x", 1.5))
    elif kind == "ints_empty":
        del a.ints[:]
        a.type = onnx.AttributeProto.INTS
    elif kind == "type_mismatch":
        a.type = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 14])  # the declared type disagrees with the value
    elif kind == "undefined":
        a.type = onnx.AttributeProto.UNDEFINED
    else:
        a.CopyFrom(helper.make_attribute(a.name or "x", helper.make_tensor("t", 1, [2], [1.0, 2.0])))


def bad_attribute_values(model, rng):
    node = rng.choice([n for n in model.graph.node if n.op_type == "Conv"] or list(model.graph.node))
    name = rng.choice(["kernel_shape", "pads", "strides", "dilations", "group", "axis"])
    value = rng.choice([[0, 0], [-1, 3], [2**40, 1], [1], [1, 1, 1, 1, 1, 1, 1], 0, -3, 2**40])
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def negative_dims(model, rng):
    if rng.random() < 0.5:
        vi = rng.choice(_value_infos(model))
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[rng.randrange(len(dims))]
            d.Clear()
            d.dim_value = rng.choice([-1, -7, 0])
    else:
        t = rng.choice(model.graph.initializer)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([-1, -4, 0])


def huge_dims(model, rng):
    if rng.random() < 0.5:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        d = dims[rng.randrange(len(dims))]
        d.Clear()
        d.dim_value = rng.choice([2**31, 2**40, 2**62])
    else:
        t = rng.choice(model.graph.initializer)
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([2**20, 2**40, 2**62])


def wrong_rank(model, rng):
    vi = rng.choice(_value_infos(model))
    dims = vi.type.tensor_type.shape.dim
    if dims and rng.random() < 0.5:
        del dims[-1]
    else:
        dims.add().dim_value = 2


def raw_data_length(model, rng):
    t = rng.choice(model.graph.initializer)
    if t.raw_data:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))] if rng.random() < 0.5 else t.raw_data + b"\0\0\0"
    else:
        t.float_data.append(1.0)


def both_data_fields(model, rng):
    t = rng.choice(model.graph.initializer)
    t.float_data.extend([1.0] * 3)


def external_data_missing(model, rng):
    t = rng.choice(model.graph.initializer)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    loc = rng.choice(["missing.bin", "../../etc/passwd", "/etc/hostname", ""])
    if loc or rng.random() < 0.5:
        e = t.external_data.add()
        e.key, e.value = "location", loc
    if rng.random() < 0.5:
        e = t.external_data.add()
        e.key, e.value = "length", str(rng.choice([-1, 10**12, 4]))


def unknown_op(model, rng):
    node = rng.choice(model.graph.node)
    node.op_type = rng.choice(["Cnv", "", "StatefulPartitionedCall", "conv", "Frobnicate"])


def unknown_domain(model, rng):
    node = rng.choice(model.graph.node)
    node.domain = rng.choice(["com.example", "ai.onnx.ml", "com.microsoft", "\t"])


def op_from_other_opset(model, rng):
    """An op that exists, but not at the model's opset (or with the wrong arity)."""
    node = rng.choice(model.graph.node)
    node.op_type = rng.choice([op for op in ("Gelu", "Relu", "Add", "Concat", "Scan", "If", "Loop", "Split") if op != node.op_type])


def remove_input(model, rng):
    node = rng.choice(model.graph.node)
    if node.input:
        del node.input[rng.randrange(len(node.input))]


def extra_input(model, rng):
    node = rng.choice(model.graph.node)
    node.input.append(rng.choice(list(node.input) or ["input"]))


def change_opset(model, rng):
    model.opset_import[0].version = rng.choice([1, 6, 7, 9, 11, 13, 21, 22, 23, 24, 25, 26, 99, -1])


def change_ir_version(model, rng):
    model.ir_version = rng.choice([0, 1, 2, 3, 4, 7, 11, 12, 13, 99, -1])


def opset_imports(model, rng):
    kind = rng.choice(["none", "duplicate", "alias", "unknown"])
    if kind == "none":
        del model.opset_import[:]
    elif kind == "duplicate":
        model.opset_import.add().CopyFrom(helper.make_opsetid("", 13))
    elif kind == "alias":
        model.opset_import[0].domain = "ai.onnx"
    else:
        model.opset_import.add().CopyFrom(helper.make_opsetid("com.example", 1))


def input_type(model, rng):
    vi = model.graph.input[0]
    kind = rng.choice(["no_type", "no_shape", "sequence", "int"])
    if kind == "no_type":
        vi.ClearField("type")
    elif kind == "no_shape":
        vi.type.tensor_type.ClearField("shape")
    elif kind == "sequence":
        vi.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(1, [1, 3, 16, 16])))
    else:
        vi.type.tensor_type.elem_type = TensorProto.INT64


def duplicate_graph_input(model, rng):
    g = model.graph
    if rng.random() < 0.5:
        g.input.add().CopyFrom(g.input[0])
    else:
        g.input.add().CopyFrom(helper.make_tensor_value_info(g.initializer[0].name, 1, None))


def empty_names(model, rng):
    g = model.graph
    target = rng.choice(["input", "output", "initializer", "node_output"])
    if target == "input":
        g.input[0].name = ""
    elif target == "output":
        g.output[0].name = ""
    elif target == "initializer":
        rng.choice(g.initializer).name = ""
    else:
        rng.choice(g.node).output[0] = ""


def empty_graph(model, rng):
    g = model.graph
    if rng.random() < 0.5:
        del g.node[:]
    else:
        del g.output[:]


def sparse_initializer(model, rng):
    """An initializer moved into sparse_initializer, sometimes with inconsistent indices."""
    from onnx import numpy_helper

    t = rng.choice(model.graph.initializer)
    dense = numpy_helper.to_array(t)
    flat = dense.reshape(-1)
    idx = [i for i in range(flat.size) if flat[i] != 0]
    values = numpy_helper.from_array(flat[idx].copy(), t.name)
    indices = numpy_helper.from_array(np.asarray(idx, dtype=np.int64), t.name + "_idx")
    kind = rng.choice(["ok", "bad_index", "bad_dims", "duplicate"])
    if kind == "bad_index" and idx:
        indices = numpy_helper.from_array(np.full(len(idx), flat.size + 5, dtype=np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, list(dense.shape) if kind != "bad_dims" else [-1])
    model.graph.sparse_initializer.append(sparse)
    if kind != "duplicate":
        model.graph.initializer.remove(t)


def functions(model, rng):
    """A node calling a model-local function (valid or broken)."""
    node = rng.choice(model.graph.node)
    f = onnx.FunctionProto()
    f.name, f.domain = "MyRelu", "local"
    f.input.append("a")
    f.output.append("b")
    f.node.append(helper.make_node(rng.choice(["Relu", "Cnv"]), ["a"], [rng.choice(["b", "c"])]))
    f.opset_import.add().CopyFrom(helper.make_opsetid("", model.opset_import[0].version))
    model.functions.append(f)
    model.opset_import.add().CopyFrom(helper.make_opsetid("local", 1))
    if node.op_type == "Relu" or rng.random() < 0.5:
        node.op_type, node.domain = "MyRelu", "local"


def subgraph_attribute(model, rng):
    """A graph attribute on a node that takes none, or an If whose branches are broken."""
    node = rng.choice(model.graph.node)
    body = helper.make_graph([helper.make_node("Relu", ["zz"], ["yy"])], "body", [], [helper.make_tensor_value_info("yy", 1, None)])
    node.attribute.append(helper.make_attribute(rng.choice(["then_branch", "body", "pads"]), body))


def value_info_garbage(model, rng):
    g = model.graph
    vi = g.value_info.add()
    vi.name = rng.choice([n.output[0] for n in g.node] + ["unrelated"])
    vi.type.tensor_type.elem_type = rng.choice([1, 7, 10, 99])
    for d in rng.choice([[1], [1, 2, 3, 4, 5], [-1, 3], [0, 0, 0, 0]]):
        vi.type.tensor_type.shape.dim.add().dim_value = d


def reshape_initializer(model, rng):
    """Same data, other dims (a weight read with the wrong layout)."""
    t = rng.choice([t for t in model.graph.initializer if len(t.dims) > 1] or list(model.graph.initializer))
    dims = list(t.dims) or [1]
    count = int(np.prod(dims))
    new = rng.choice([[count], [1, count], dims[::-1], [dims[0], count // dims[0], 1, 1], [count, 1, 1, 1]])
    del t.dims[:]
    t.dims.extend(new)


def swap_inputs(model, rng):
    node = _with_inputs(model, rng, 2)
    i, j = rng.sample(range(len(node.input)), 2)
    node.input[i], node.input[j] = node.input[j], node.input[i]


def plausible_attribute(model, rng):
    """A valid-looking attribute value that does not fit the rest of the graph."""
    node = rng.choice(model.graph.node)
    choices = {
        "Conv": [("group", rng.choice([2, 3, 4, 8])), ("strides", [2, 2]), ("strides", [1, 3]), ("dilations", [2, 2]),
                 ("pads", [0, 0, 2, 2]), ("pads", [3, 3, 3, 3]), ("auto_pad", b"SAME_UPPER"), ("auto_pad", b"VALID")],
        "Concat": [("axis", rng.choice([0, 2, 3, -1, -4]))],
        "MaxPool": [("kernel_shape", [5, 5]), ("strides", [3, 3]), ("ceil_mode", 1)],
    }.get(node.op_type, [("alpha", 0.5)])
    name, value = rng.choice(choices)
    for a in list(node.attribute):
        if a.name == name or (name == "auto_pad" and a.name == "pads"):
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def metadata_garbage(model, rng):
    kind = rng.choice(["dup_key", "long_doc", "producer"])
    if kind == "dup_key":
        for _ in range(2):
            p = model.metadata_props.add()
            p.key, p.value = "k", "v"
    elif kind == "long_doc":
        model.graph.node[0].doc_string = "x" * 100_000
    else:
        model.producer_name = "\u2603" * 10


RAW: Dict[str, Callable[[bytes, random.Random], bytes]] = {
    f.__name__: f for f in (flip_byte, flip_bytes, flip_bit, truncate, insert_byte, delete_byte, duplicate_chunk,
                            name_bad_utf8)
}
PROTO: Dict[str, Callable[[onnx.ModelProto, random.Random], None]] = {
    f.__name__: f
    for f in (
        bad_elem_type, bad_initializer_type, delete_initializer, duplicate_initializer, dangling_input,
        dangling_output, duplicate_output, self_loop, cycle, shuffle_nodes, bad_attribute_bytes,
        attribute_wrong_type, bad_attribute_values, negative_dims, huge_dims, wrong_rank, raw_data_length,
        both_data_fields, external_data_missing, unknown_op, unknown_domain, op_from_other_opset, remove_input,
        extra_input, change_opset, change_ir_version, opset_imports, input_type, duplicate_graph_input,
        empty_names, empty_graph, sparse_initializer, functions, subgraph_attribute, value_info_garbage,
        metadata_garbage, reshape_initializer, swap_inputs, plausible_attribute,
    )
}
MUTATIONS = list(RAW) + list(PROTO)
#: By default every mutation runs once on every fixture.
COUNT = int(os.environ.get("ONNXREP_FUZZ_COUNT", str(len(MUTATIONS) * len(FIXTURES))))


def mutate(i: int):
    """Case ``i``: (fixture, mutation name, mutated bytes), the same on every run. A mutation
    that happens to leave the model as it was is drawn again (from the same generator)."""
    kind = MUTATIONS[i % len(MUTATIONS)]
    fixture = FIXTURES[(i // len(MUTATIONS)) % len(FIXTURES)]
    rng = random.Random(i)
    data = fixture_bytes(fixture)
    for _ in range(10):
        if kind in RAW:
            mutated = RAW[kind](data, rng)
        else:
            model = onnx.load_from_string(data)
            PROTO[kind](model, rng)
            mutated = model.SerializeToString()
        if mutated != data:
            break
    return fixture, kind, mutated


# --------------------------------------------------------------------------------------
# Running the CLI in-process
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_fds():
    """Everything written to file descriptors 1 and 2 (onnxruntime's C++ logger writes there,
    past Python's sys.stderr), as a list that holds (stdout, stderr) afterwards."""
    result: List[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield result
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            for f in (out, err):
                f.seek(0)
                result.append(f.read().decode("utf-8", "replace"))


def run_cli(path: Path, out: Path):
    """(exit code, stdout, stderr) of the CLI run in-process, C++ output included."""
    argv = [str(path), "-o", str(out), "-q", "--verify-draws", "1"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with captured_fds() as fds, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, fds[0] + stdout.getvalue(), fds[1] + stderr.getvalue()


def check_case(i: int, folder: Path) -> None:
    fixture, kind, data = mutate(i)
    path = folder / f"case{i}.onnx"
    path.write_bytes(data)
    rc, out, err = run_cli(path, folder / f"case{i}.rep.onnx")
    where = f"case {i}: {kind} on {fixture}"
    assert rc in (0, 1, 2), f"{where}: exit {rc}: {err.strip()}"
    assert "Traceback" not in err, f"{where}: {err}"
    if rc != 0:
        assert out == "", f"{where}: {out}"
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{where}: {err}"
        assert str(path) in lines[0], f"{where}: the message does not name the file: {err}"
        assert not (folder / f"case{i}.rep.onnx").exists(), f"{where}: written despite exit {rc}"
    else:
        assert err == "", f"{where}: {err}"


@pytest.mark.parametrize("i", range(COUNT))
def test_mutated_model_gets_a_clean_answer(i, tmp_path):
    check_case(i, tmp_path)


@pytest.mark.slow
def test_many_mutated_models_get_clean_answers(tmp_path, request):
    """Cases COUNT .. COUNT + SLOW_COUNT, all failures listed at once."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long run: pytest -m slow tests/test_fuzz.py")
    failures = []
    for i in range(COUNT, COUNT + SLOW_COUNT):
        folder = tmp_path / str(i)
        folder.mkdir()
        try:
            check_case(i, folder)
        except AssertionError as exc:
            failures.append(str(exc).strip().splitlines()[0])
        shutil.rmtree(folder)
    assert not failures, f"{len(failures)} of {SLOW_COUNT} cases:\n" + "\n".join(failures[:30])


def test_every_mutation_changes_the_model():
    """Guards the fuzzer itself: a mutation that silently does nothing tests nothing."""
    for i in range(len(MUTATIONS) * len(FIXTURES)):
        fixture, kind, data = mutate(i)
        assert data != fixture_bytes(fixture), f"case {i}: {kind} left {fixture} unchanged"
