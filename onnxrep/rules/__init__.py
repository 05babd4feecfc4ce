"""The rewrite rules, one per module, and the default order they run in.

Each module's docstring states the pattern before and after and the formula it rests on.
"""

from __future__ import annotations

from typing import Dict, Tuple

from ..errors import UsageError
from ..passes import Rule
from .affine_before import FoldAffineIntoNextLayer
from .affine_conv import FoldAffineIntoConv
from .affine_region import CollapseAffineRegion
from .border_pad import FoldBorderPadIntoConv
from .concat import MergeHorizontalConvs, MergeParallelConcat
from .conv_bn import FoldBnIntoConv
from .fc_view import MergeConvIntoFcView
from .gelu import CanonicalizeGelu
from .layout import PropagateTransposes
from .lower import LowerChannelAffineConv
from .matmul_bn import FoldBnThroughReshape
from .pad_conv import FoldPadIntoConv
from .parallel_add import MergeParallelAdd
from .sequential import ComposeSequentialConvs

#: Every rule, in the order they run within each pass (an explicit tuple: no registration by
#: import side effects). Those with ``default = False`` run only when enabled.
DEFAULT_RULES: Tuple[Rule, ...] = (
    PropagateTransposes(),  # first: later rules see NCHW blocks
    FoldPadIntoConv(),
    FoldBorderPadIntoConv(),
    FoldBnIntoConv(),
    FoldBnThroughReshape(),
    FoldAffineIntoConv(),
    FoldAffineIntoNextLayer(),
    MergeParallelAdd(),
    MergeConvIntoFcView(),
    ComposeSequentialConvs(),
    MergeParallelConcat(),
    CanonicalizeGelu(),
    CollapseAffineRegion(),  # late: before horizontal merging, which would split its convs
    MergeHorizontalConvs(),
    LowerChannelAffineConv(),  # final: once every other rule has converged
)

RULES_BY_NAME: Dict[str, Rule] = {rule.name: rule for rule in DEFAULT_RULES}


def select_rules(only=None, skip=None, enable=None) -> Tuple[Rule, ...]:
    """The rules to run, in order: those on by default plus ``enable``, or exactly ``only``;
    minus ``skip``. Each takes one name or several; unknown names are an error."""
    only, skip, enable = ([x] if isinstance(x, str) else list(x or ()) for x in (only, skip, enable))
    for name in only + skip + enable:
        if name not in RULES_BY_NAME:
            raise UsageError(f"unknown rule '{name}' (known: {', '.join(RULES_BY_NAME)})")
    chosen = (lambda r: r.name in only) if only else (lambda r: r.default or r.name in enable)
    return tuple(r for r in DEFAULT_RULES if chosen(r) and r.name not in skip)
