"""propagate_transposes: NHWC spellings (tf2onnx, jax2onnx) reach NCHW blocks, and what must stay."""

import numpy as np
import onnx
import pytest

import onnxrep
from helpers import GraphBuilder, assert_same_outputs, ops, random_feeds, run
from onnxrep.rules.layout import compose, inverse, permute_constant

RULE = ["propagate_transposes"]
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
C = 4


def nhwc_builder(batch=1, seed=0):
    return GraphBuilder([batch, 6, 6, C], seed=seed)


def t(b, x, perm):
    return b.node("Transpose", [x], perm=list(perm))


def bn_nhwc(b, x, shape=(C,)):
    """Keras 3's BatchNormalization on NHWC: x * s + h with constants on the last axis."""
    s = b.const(b.rng.uniform(0.5, 1.5, shape).astype(np.float32), "scale")
    h = b.const(b.rand(*shape), "shift")
    return b.node("Add", [b.node("Mul", [x, s]), h])


def check(model, out, report=None, batch=1):
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    for a, o in zip(model.graph.output, out.graph.output):
        assert a.type.tensor_type.elem_type == o.type.tensor_type.elem_type
        assert len(a.type.tensor_type.shape.dim) == len(o.type.tensor_type.shape.dim)
    assert ops(out)["Transpose"] <= ops(model)["Transpose"]
    assert_same_outputs(model, out, batch=batch)
    for got, ref in zip(run(out, random_feeds(model, batch=batch)), run(model, random_feeds(model, batch=batch))):
        assert got.shape == ref.shape


# ---- the algebra -------------------------------------------------------------------------


def test_perm_helpers_agree_with_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    for r, s in [((0, 3, 1, 2), (0, 2, 3, 1)), ((0, 2, 3, 1), (0, 2, 3, 1)), ((3, 1, 0, 2), (1, 0, 3, 2))]:
        np.testing.assert_array_equal(np.transpose(np.transpose(x, r), s), np.transpose(x, compose(r, s)))
        np.testing.assert_array_equal(np.transpose(np.transpose(x, r), inverse(r)), x)


@pytest.mark.parametrize("shape", [(), (1,), (C,), (6, 1, C), (1, 6, 6, C), (6, 6, 1), (2, 6, 1, C)])
def test_permuted_constant_broadcasts_like_the_original(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 6, C))
    c = rng.standard_normal(shape)
    if len(shape) == 4 and shape[0] == 2:
        x = rng.standard_normal((2, 6, 6, C))
    p = (0, 3, 1, 2)
    np.testing.assert_array_equal(np.transpose(x + c, p), np.transpose(x, p) + permute_constant(c, p))


def test_per_channel_constant_on_the_last_axis_becomes_c11():
    assert permute_constant(np.arange(C, dtype=np.float32), (0, 3, 1, 2)).shape == (C, 1, 1)


# ---- the spellings -----------------------------------------------------------------------


def identity_bn_block(b, x, out_nhwc=False):
    """RepVGG block as tf2onnx writes it when the block's input is the NHWC graph input:
    each conv reads its own Transpose(x), the identity BN runs on x and is transposed."""
    a = b.conv(t(b, x, TO_NCHW), C, C, k=3)
    c = b.conv(t(b, x, TO_NCHW), C, C, k=1)
    i = t(b, bn_nhwc(b, x), TO_NCHW)
    y = b.node("Relu", [b.add(a, c, i)])
    return t(b, y, TO_NHWC) if out_nhwc else y


def test_identity_bn_on_the_nhwc_input_moves_after_the_shared_transpose():
    b = nhwc_builder()
    model = b.build(identity_bn_block(b, b.x))
    out, report = onnxrep.optimize(model, only=RULE)
    counts = ops(out)
    assert counts["Transpose"] == 1  # three Transpose(x) -> one, the BN's Transpose is gone
    assert counts["Mul"] == counts["Add"] - 2 == 1  # the BN stays (in NCHW) for the merge
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    assert [consts[i].shape for i in mul.input if i in consts] == [(C, 1, 1)]
    check(model, out)


def test_identity_bn_block_reaches_one_conv():
    b = nhwc_builder()
    model = b.build(identity_bn_block(b, b.x, out_nhwc=True))
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Transpose": 2, "Conv": 1, "Relu": 1}
    check(model, out)


def nhwc_block(b, x, identity=True):
    """Branches end in Transpose(.., [0,2,3,1]) and join in NHWC (spelling 1)."""
    a = t(b, b.conv(t(b, x, TO_NCHW), C, C, k=3), TO_NHWC)
    c = t(b, b.conv(t(b, x, TO_NCHW), C, C, k=1), TO_NHWC)
    terms = [a, c] + ([bn_nhwc(b, x)] if identity else [])
    return b.node("Relu", [b.add(*terms)])


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, "N"])
def test_blocks_joined_in_nhwc_reach_one_conv_each(blocks, batch):
    b = nhwc_builder(batch=batch)
    y = b.x
    for _ in range(blocks):
        y = nhwc_block(b, y)
    model = b.build(y)
    out, report = onnxrep.optimize(model)
    assert ops(out) == {"Transpose": 2, "Conv": blocks, "Relu": blocks}
    check(model, out, batch=2 if batch == "N" else 1)


def test_two_transposed_branches_join_under_one_transpose():
    b = nhwc_builder()
    y = nhwc_block(b, b.x, identity=False)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Transpose"] == 2  # Transpose(x) twice -> once; two output Transposes -> one after the Relu
    last = out.graph.node[-1]
    assert last.op_type == "Transpose" and list(last.attribute[0].ints) == TO_NHWC
    check(model, out)


def test_feature_map_output_keeps_its_name_and_layout():
    b = nhwc_builder()
    y1 = nhwc_block(b, b.x)
    y2 = nhwc_block(b, y1)
    b.mark_output(y1)
    model = b.build(y2)
    out, report = onnxrep.optimize(model)
    assert ops(out)["Conv"] == 2 and ops(out)["Transpose"] == 3
    check(model, out)


def test_transposes_cancel_and_compose():
    b = nhwc_builder()
    y = t(b, t(b, b.x, TO_NCHW), TO_NHWC)  # cancels
    y = b.node("Relu", [y])
    z = t(b, t(b, y, TO_NHWC), TO_NHWC)  # composes into one Transpose
    model = b.build(b.node("Sigmoid", [z]))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 1, "Transpose": 1, "Sigmoid": 1}
    perm = next(n for n in out.graph.node if n.op_type == "Transpose").attribute[0].ints
    assert list(perm) == list(compose(TO_NHWC, TO_NHWC))
    check(model, out)


def test_a_reader_that_reads_the_pair_twice_is_recreated_once():
    b = nhwc_builder()
    y = t(b, t(b, b.x, TO_NCHW), TO_NHWC)
    model = b.build(b.node("Relu", [b.node("Mul", [y, y])]))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Mul": 1, "Relu": 1}
    check(model, out)


def test_identical_transposes_become_one():
    b = nhwc_builder()
    ys = [b.conv(t(b, b.x, TO_NCHW), C, C, k=1) for _ in range(3)]
    model = b.build(b.add(*ys))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Transpose"] == 1
    check(model, out)


@pytest.mark.parametrize("shape", [(), (6, 6, C), (6, 1, 1), (1, 1, 6, 1)])
def test_constants_of_any_broadcast_shape_move_exactly(shape):
    b = nhwc_builder()
    a = t(b, b.conv(t(b, b.x, TO_NCHW), C, C, k=3), TO_NHWC)
    c = t(b, b.conv(t(b, b.x, TO_NCHW), C, C, k=1), TO_NHWC)
    k = b.const(b.rng.uniform(0.5, 1.5, shape).astype(np.float32))
    y = b.node("Mul", [b.add(a, c), k])
    y = t(b, b.node("Relu", [y]), TO_NCHW)
    model = b.build(b.conv(y, C, C, k=1))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Transpose"] == 1
    check(model, out)


def test_rank_3_layouts_move_too():
    b = GraphBuilder([1, 5, C])  # [N, L, C] -> [N, C, L]
    a = t(b, b.x, [0, 2, 1])
    y = b.node("Add", [t(b, b.node("Relu", [a]), [0, 2, 1]), b.const(b.rand(C))])
    model = b.build(t(b, y, [0, 2, 1]))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Transpose"] == 1
    check(model, out)


# ---- what must stay ---------------------------------------------------------------------


def test_transpose_feeding_a_graph_output_and_a_consumer_is_not_duplicated():
    b = nhwc_builder()
    a = t(b, b.x, TO_NCHW)
    b.mark_output(a)
    y = b.node("Relu", [t(b, b.node("Relu", [a]), TO_NHWC)])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Transpose"] <= 2
    check(model, out)


def test_inverse_pair_on_a_graph_output_stays_named():
    b = nhwc_builder()
    y = t(b, t(b, b.node("Relu", [b.x]), TO_NCHW), TO_NHWC)
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 1}  # the Relu writes the output itself
    check(model, out)
    assert out.graph.output[0].name == y


def test_identity_transpose_before_a_graph_output_goes():
    b = nhwc_builder()
    y = t(b, b.node("Relu", [b.x]), [0, 1, 2, 3])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 1}
    check(model, out)


def test_inverse_pair_on_a_graph_input_and_output_stays():
    b = nhwc_builder()
    model = b.build(t(b, t(b, b.x, TO_NCHW), TO_NHWC))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    check(model, out)


@pytest.mark.parametrize("op, attrs", [("Softmax", {"axis": 1}), ("ReduceMean", {"axes": [1], "keepdims": 1}),
                                        ("Flatten", {"axis": 1})])
def test_ops_that_depend_on_the_layout_stop_the_transposes(op, attrs):
    b = nhwc_builder()
    y = b.node(op, [t(b, b.x, TO_NCHW)], **attrs)
    if op != "Flatten":
        y = t(b, y, TO_NHWC)
    model = b.build(y, opset=17)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert report.rewrites == []


def test_non_inverse_perms_around_an_elementwise_op_compose():
    b = nhwc_builder()
    y = t(b, b.node("Relu", [t(b, b.x, TO_NCHW)]), [0, 1, 3, 2])
    model = b.build(b.node("Sigmoid", [y]))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == {"Relu": 1, "Transpose": 1, "Sigmoid": 1}
    check(model, out)


def test_a_move_that_gains_nothing_is_not_made():
    b = nhwc_builder()
    a = t(b, b.x, TO_NCHW)
    y = t(b, b.node("Relu", [a]), [0, 1, 3, 2])  # a is read by the conv too: it stays
    model = b.build(b.add(b.conv(a, C, C, k=1), y))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out) == ops(model)
    assert report.rewrites == []


def test_a_move_that_would_add_transposes_is_declined():
    b = nhwc_builder()
    a = t(b, b.x, TO_NCHW)
    other = b.conv(a, C, C, k=1)  # an NCHW operand that is not a Transpose
    y = b.node("Add", [t(b, b.node("Relu", [a]), TO_NHWC), t(b, other, TO_NHWC)])
    y = b.node("Add", [y, b.node("Sigmoid", [b.x])])
    model = b.build(y)
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Transpose"] <= ops(model)["Transpose"]
    check(model, out)


def test_operand_of_lower_rank_that_is_not_constant_stops_the_region():
    b = nhwc_builder()
    gate = b.node("ReduceMean", [b.x], axes=[1, 2], keepdims=0)  # [N, C]: rank 2
    a = t(b, b.conv(t(b, b.x, TO_NCHW), C, C, k=1), TO_NHWC)
    y = b.node("Mul", [a, gate])
    model = b.build(t(b, y, TO_NCHW))
    out, report = onnxrep.optimize(model, only=RULE)
    assert ops(out)["Mul"] == 1 and ops(out)["Transpose"] == 3
    check(model, out)


def test_transposes_read_inside_a_subgraph_stay():
    b = nhwc_builder()
    a = t(b, b.x, TO_NCHW)
    twin = t(b, b.x, TO_NCHW)
    body_out = onnx.helper.make_tensor_value_info("body_y", onnx.TensorProto.FLOAT, None)
    body = onnx.helper.make_graph([onnx.helper.make_node("Relu", [twin], ["body_y"])], "body", [], [body_out])
    cond = b.const(np.array(True))
    y = b.node("If", [cond], then_branch=body, else_branch=body)
    model = b.build(b.add(b.node("Relu", [a]), y), output_shape=[1, C, 6, 6])
    out, report = onnxrep.optimize(model, only=RULE)
    # the Transpose read inside the If stays; the other one is its duplicate
    assert [n.output[0] for n in out.graph.node if n.op_type == "Transpose"] == [twin]
    check(model, out)


def test_the_layout_rule_runs_first():
    from onnxrep.rules import DEFAULT_RULES
    assert DEFAULT_RULES[0].name == "propagate_transposes" and DEFAULT_RULES[0].default


# ---- random graphs of Transposes and elementwise ops ----------------------------------------

PERMS = [(0, 3, 1, 2), (0, 2, 3, 1), (1, 0, 2, 3), (3, 2, 1, 0), (0, 1, 3, 2)]


def random_layout_graph(seed):
    """Every tensor is [3, 3, 3, 3], so any Transpose and any pair of tensors combine; constants
    broadcast over random axes; some intermediates are graph outputs too."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder([3, 3, 3, 3], seed=seed)
    tensors = [b.x]
    for _ in range(int(rng.integers(3, 14))):
        a = tensors[int(rng.integers(len(tensors)))]
        kind = rng.choice(["T", "T", "T", "Relu", "Sigmoid", "Add", "Mul", "Sub"])
        if kind == "T":
            y = t(b, a, PERMS[int(rng.integers(len(PERMS)))])
        elif kind in ("Relu", "Sigmoid"):
            y = b.node(str(kind), [a])
        else:
            if rng.random() < 0.5:
                other = tensors[int(rng.integers(len(tensors)))]
            else:
                shape = [int(rng.choice([1, 3])) for _ in range(int(rng.integers(0, 5)))]
                other = b.const(rng.uniform(0.5, 1.5, shape).astype(np.float32))
            y = b.node(str(kind), [a, other] if rng.random() < 0.5 else [other, a])
        tensors.append(y)
    read = {i for n in b.nodes for i in n.input}
    for y in tensors[1:-1]:
        if y not in read or rng.random() < 0.2:
            b.mark_output(y)
    return b.build(tensors[-1])


@pytest.mark.parametrize("seed", range(40))
def test_random_layout_graphs_stay_exact_with_no_more_transposes(seed):
    model = random_layout_graph(seed)
    out, report = onnxrep.optimize(model, only=RULE)
    check(model, out)
