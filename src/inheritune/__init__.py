"""inheritune: smaller, stronger language models inherited from a larger pretrained one.

Measure attention collapse layer by layer (:mod:`inheritune.analysis.analyze`), inherit the first layers
(:mod:`inheritune.surgery`), train them (:mod:`inheritune.training.train`) and grow until the reference's
validation loss is matched (:mod:`inheritune.recipe`). See the README for the module tree.
"""

__version__ = "0.1.0"
