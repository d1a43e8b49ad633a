"""The honest comparison: ``inheritune compare`` (:mod:`.compare`) trains every baseline and
pruning variant (:mod:`.variants`) at the same budget, with the settings in :mod:`.config`.

Commands are reached as ``inheritune.compare.<module>.<command>``; the library API is
re-exported here.
"""

from inheritune.compare.compare import (
    RESULT_JSON,
    SPEC_JSON,
    CompareResult,
    RunContext,
    is_cached,
    render_markdown,
    run_variant,
    tokens_to_reach,
    variant_spec,
)
from inheritune.compare.config import (
    CompareConfig,
)
from inheritune.compare.variants import (
    VARIANTS,
    Variant,
    build_initial,
    check_depth,
    default_depth,
    half_width_reason,
    layer_ranges,
    train_top_warning,
    unbuildable_reason,
)

__all__ = [
    "RESULT_JSON",
    "SPEC_JSON",
    "VARIANTS",
    "CompareConfig",
    "CompareResult",
    "RunContext",
    "Variant",
    "build_initial",
    "check_depth",
    "default_depth",
    "half_width_reason",
    "is_cached",
    "layer_ranges",
    "render_markdown",
    "run_variant",
    "tokens_to_reach",
    "train_top_warning",
    "unbuildable_reason",
    "variant_spec",
]
