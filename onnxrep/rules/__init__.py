"""The rewrite rules, one per module, and the default order they run in.

Each module's docstring states the pattern before and after and the formula it rests on.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

from ..errors import UsageError
from ..passes import Rule
from .affine_before import FoldAffineIntoNextLayer
from .affine_conv import FoldAffineIntoConv
from .affine_region import CollapseAffineRegion
from .border_pad import FoldBorderPadIntoConv
from .concat import MergeHorizontalConvs, MergeParallelConcat
from .conv_bn import FoldBnIntoConv
from .gelu import CanonicalizeGelu
from .matmul_bn import FoldBnThroughReshape
from .pad_conv import FoldPadIntoConv
from .parallel_add import MergeParallelAdd
from .sequential import ComposeSequentialConvs

#: Rules run by default, in this order within each pass (an explicit tuple: no registration
#: by import side effects).
DEFAULT_RULES: Tuple[Rule, ...] = (
    FoldPadIntoConv(),
    FoldBorderPadIntoConv(),
    FoldBnIntoConv(),
    FoldBnThroughReshape(),
    FoldAffineIntoConv(),
    FoldAffineIntoNextLayer(),
    MergeParallelAdd(),
    ComposeSequentialConvs(),
    MergeParallelConcat(),
    CanonicalizeGelu(),
    MergeHorizontalConvs(),
    CollapseAffineRegion(),
)

RULES_BY_NAME: Dict[str, Rule] = {rule.name: rule for rule in DEFAULT_RULES}


def select_rules(only: Optional[Iterable[str]] = None, skip: Optional[Iterable[str]] = None) -> Tuple[Rule, ...]:
    """The default rules filtered by ``only`` / ``skip`` names (one name or several); unknown
    names are an error."""
    only = [only] if isinstance(only, str) else list(only or ())
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    for name in only + skip:
        if name not in RULES_BY_NAME:
            raise UsageError(f"unknown rule '{name}' (known: {', '.join(RULES_BY_NAME)})")
    return tuple(r for r in DEFAULT_RULES if (not only or r.name in only) and r.name not in skip)
