"""Property: the verifier rejects a small error planted in a conv that a rewrite created.

Random multi-branch blocks (``strategies.model_specs``) are optimized without verification; one
Conv of the result that a rewrite created is then made wrong in one output channel, in one of
three ways:

* ``scale``: that channel's weights and bias times (1 + 1e-2);
* ``tap``: that channel's largest weight set to 0;
* ``bias``: 1e-2 * (the channel's max |output| at a standard normal input) added to its bias.

The verifier built from the original must accept the unperturbed result (no false alarm) and
reject the perturbed one; when the perturbed conv's output exists in the original, it must be
named as the first divergence, with that conv as its node.

Settings as in test_properties (environment ``ONNXREP_PROPERTY_PROFILE`` "ci": 25 examples, no
shrinking; "thorough": 300; ``ONNXREP_PROPERTY_EXAMPLES``; ``ONNXREP_PROPERTY_RANDOM=1``).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxrep
from helpers import random_feeds, run
from onnxrep.verify import Verifier
from strategies import model_specs, runnable_model

PROFILE = os.environ.get("ONNXREP_PROPERTY_PROFILE", "ci")
EXAMPLES = int(os.environ.get("ONNXREP_PROPERTY_EXAMPLES", str({"ci": 25, "thorough": 300}.get(PROFILE, 25))))
RANDOM = os.environ.get("ONNXREP_PROPERTY_RANDOM", "0") not in ("", "0")
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.generate, Phase.target] if PROFILE == "ci" else list(Phase),
)

KINDS = ("scale", "tap", "bias")


def _outputs(model: onnx.ModelProto, extra: str):
    """Run ``model`` with ``extra`` as one more output; returns (graph outputs..., extra)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    tapped.graph.output.append(helper.make_tensor_value_info(extra, onnx.TensorProto.FLOAT, None))
    return run(tapped, random_feeds(model))


def _perturb(model: onnx.ModelProto, conv_name: str, kind: str, channel: int, channel_scale: float):
    """A copy of ``model`` with one output channel of conv ``conv_name`` made wrong (new
    initializers, so nothing else that shares the old ones changes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == conv_name)
    inits = {t.name: t for t in out.graph.initializer}
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    bias = numpy_helper.to_array(inits[node.input[2]]).copy() if len(node.input) > 2 and node.input[2] else None
    if kind == "scale":
        w[channel] *= np.float32(1 + 1e-2)
        if bias is not None:
            bias[channel] *= np.float32(1 + 1e-2)
    elif kind == "tap":
        taps = w[channel].reshape(-1)
        taps[int(np.argmax(np.abs(taps)))] = 0
    else:
        if bias is None:
            bias = np.zeros(w.shape[0], w.dtype)
        bias[channel] += np.float32(1e-2 * channel_scale)
    out.graph.initializer.append(numpy_helper.from_array(w, f"{conv_name}_wrong_w"))
    node.input[1] = f"{conv_name}_wrong_w"
    if bias is not None:
        out.graph.initializer.append(numpy_helper.from_array(bias, f"{conv_name}_wrong_b"))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = f"{conv_name}_wrong_b"
    used = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


@PROPERTY
@given(spec=model_specs(), data=st.data())
def test_verifier_rejects_one_wrong_channel_in_a_rewritten_conv(spec, data):
    model = runnable_model(spec)
    try:
        out, report = onnxrep.optimize(model, verify=False)
    except onnxrep.OnnxrepError as exc:
        note(f"declined cleanly: {exc}")
        assume(False)
    created = {name for r in report.rewrites for name in r.created}
    convs = [n for n in out.graph.node if n.op_type == "Conv" and n.name in created]
    assume(convs)
    conv = data.draw(st.sampled_from(convs), label="conv")
    cout = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == conv.input[1])).shape[0]
    channel = data.draw(st.integers(0, cout - 1), label="channel")
    kind = data.draw(st.sampled_from(KINDS), label="kind")

    before = _outputs(out, conv.output[0])[-1]
    scale = float(np.abs(before[:, channel]).max())
    wrong = _perturb(out, conv.name, kind, channel, scale)
    changed = np.abs(_outputs(wrong, conv.output[0])[-1] - before).max()
    assume(changed > 0)  # e.g. a tap that only ever reads padding: the model is still right
    note(f"{kind} on channel {channel} of {conv.name} (max |y_c| {scale:.3g}, conv output changed by {changed:.3g})")

    verifier = Verifier(model, {"x": [1, spec.channels, spec.height, spec.width]}, "property")
    right = verifier.check(out)
    assert right.ok, f"false alarm on the unperturbed result: {right.describe()}"
    result = verifier.check(wrong)
    note(result.describe())
    assert not result.ok, f"a wrong channel passed: {result.describe()}"
    if conv.output[0] in verifier.tensors:
        assert result.first_divergence is not None
        assert (result.first_divergence.tensor, result.first_divergence.node) == (conv.output[0], conv.name)
