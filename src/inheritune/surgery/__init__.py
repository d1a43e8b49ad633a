"""Stage 2, building the target: pure model-surgery functions (:mod:`.build`), the fitted
bridge block (:mod:`.bridge`), final-norm calibration (:mod:`.calibrate`), mergekit export
(:mod:`.mergekit`) and the ``inheritune inherit`` command (:mod:`.inherit`).

Commands are reached as ``inheritune.surgery.<module>.<command>``; the library API is
re-exported here.
"""

from inheritune.analysis.selection import check_indices, parse_layers
from inheritune.surgery.bridge import (
    BRIDGE_INITS,
    BRIDGES,
    BridgeConfig,
    add_bridge_block,
    bridge_on_corpus,
    build_bridged,
    calibration_windows,
    fit_bridge,
    fit_linear_map,
    linear_map_r2,
    state_loss,
)
from inheritune.surgery.build import (
    FRESH_PARTS,
    PARTS,
    check_depth,
    drop_layers,
    first_layers,
    fresh_parts,
    half_width,
    parse_fresh,
    random_init,
    resize_config,
    select_layers,
)
from inheritune.surgery.calibrate import (
    calibrate_final_norm,
)
from inheritune.surgery.inherit import (
    InheritConfig,
)
from inheritune.surgery.mergekit import (
    check_path,
    config_dtype,
    export_selections,
    layers_from_slices,
    slices_from_layers,
    source_name,
    to_yaml,
    variant_path,
    write_config,
)

__all__ = [
    "BRIDGES",
    "BRIDGE_INITS",
    "FRESH_PARTS",
    "PARTS",
    "BridgeConfig",
    "InheritConfig",
    "add_bridge_block",
    "bridge_on_corpus",
    "build_bridged",
    "calibrate_final_norm",
    "calibration_windows",
    "check_depth",
    "check_indices",
    "check_path",
    "config_dtype",
    "drop_layers",
    "export_selections",
    "first_layers",
    "fit_bridge",
    "fit_linear_map",
    "fresh_parts",
    "half_width",
    "layers_from_slices",
    "linear_map_r2",
    "parse_fresh",
    "parse_layers",
    "random_init",
    "resize_config",
    "select_layers",
    "slices_from_layers",
    "source_name",
    "state_loss",
    "to_yaml",
    "variant_path",
    "write_config",
]
