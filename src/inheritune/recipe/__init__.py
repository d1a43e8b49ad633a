"""Stage 4, the whole recipe: ``inheritune run`` (:mod:`.run`) inherits, trains, compares and
grows; its settings (:mod:`.config`), decisions and run state (:mod:`.growth`) and report
(:mod:`.report`).

Commands are reached as ``inheritune.recipe.<module>.<command>``; the library API is
re-exported here.
"""

from inheritune.recipe.config import (
    GROWTH_MODES,
    RESUMABLE_CHANGES,
    TARGETS,
    RecipeConfig,
)
from inheritune.recipe.growth import (
    STATE_FILE,
    STATE_VERSION,
    RunState,
    choose_init_depth,
    matches,
    next_step,
    resolve_max_depth,
    warm_grow,
)
from inheritune.recipe.report import (
    CURVES_PNG,
    REPORT_JSON,
    REPORT_MD,
    build_report,
    measure_speeds,
    plot_rounds,
    render_markdown,
    verdict_line,
    write_report,
)
from inheritune.recipe.run import (
    RecipeResult,
)

__all__ = [
    "CURVES_PNG",
    "GROWTH_MODES",
    "REPORT_JSON",
    "REPORT_MD",
    "RESUMABLE_CHANGES",
    "STATE_FILE",
    "STATE_VERSION",
    "TARGETS",
    "RecipeConfig",
    "RecipeResult",
    "RunState",
    "build_report",
    "choose_init_depth",
    "matches",
    "measure_speeds",
    "next_step",
    "plot_rounds",
    "render_markdown",
    "resolve_max_depth",
    "verdict_line",
    "warm_grow",
    "write_report",
]
