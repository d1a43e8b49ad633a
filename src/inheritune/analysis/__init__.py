"""Stage 1, measuring the reference: attention-collapse metrics (:mod:`.metrics`), the
``inheritune analyze`` report (:mod:`.analyze`, :mod:`.report`), layer-importance scores
(:mod:`.scoring`) and the figures every report draws (:mod:`.plots`).

Commands are reached as ``inheritune.analysis.<module>.<command>``; the library API is
re-exported here.
"""

from inheritune.analysis.analyze import (
    AnalyzeConfig,
    HeadMeans,
    eager_attention,
    run_analysis,
    sample_inputs,
)
from inheritune.analysis.metrics import (
    REFINE_MARGIN,
    SHARE_ATOL,
    HeadStats,
    approx_rank,
    column_shares,
    dominant_mass,
    head_stats,
    layer_avg_mass,
    layer_max_rank,
    lazy_groups,
    lazy_layers,
    squared_singular_values,
    suggest_depth,
    top_column_share,
)
from inheritune.analysis.plots import (
    plot_curves,
    plot_layer_collapse,
    plot_rank_heatmap,
    save,
)
from inheritune.analysis.report import (
    RULES,
    AnalysisResult,
    definitions,
    load_report,
    summary_table,
    write_report,
)
from inheritune.analysis.scoring import (
    ANGULAR_TOKENS,
    angular_distances,
    angular_distances_from_states,
    best_block_drop,
    block_influence,
    block_influence_from_states,
    block_states,
    keep_last_drop,
    lowest_bi_drop,
    lowest_score_drop,
)

__all__ = [
    "ANGULAR_TOKENS",
    "REFINE_MARGIN",
    "RULES",
    "SHARE_ATOL",
    "AnalysisResult",
    "AnalyzeConfig",
    "HeadMeans",
    "HeadStats",
    "angular_distances",
    "angular_distances_from_states",
    "approx_rank",
    "best_block_drop",
    "block_influence",
    "block_influence_from_states",
    "block_states",
    "column_shares",
    "definitions",
    "dominant_mass",
    "eager_attention",
    "head_stats",
    "keep_last_drop",
    "layer_avg_mass",
    "layer_max_rank",
    "lazy_groups",
    "lazy_layers",
    "load_report",
    "lowest_bi_drop",
    "lowest_score_drop",
    "plot_curves",
    "plot_layer_collapse",
    "plot_rank_heatmap",
    "run_analysis",
    "sample_inputs",
    "save",
    "squared_singular_values",
    "suggest_depth",
    "summary_table",
    "top_column_share",
    "write_report",
]
