"""repguide: guidance, training a target network to align layer by layer with a frozen guide.

>>> guidance = repguide.Guidance(target, guide, pairs="stretch", measure="cka", weight=1.0)
>>> out = guidance(x)                      # one target forward, one frozen-guide forward
>>> loss = task_loss(out.output, y) + out.loss
"""

from repguide import data, errors, models, similarity
from repguide.analysis import SimilarityMatrix, compare, error_consistency
from repguide.capture import discover, layers
from repguide.errors import RepguideError
from repguide.guidance import Constant, Guidance, GuidanceOutput, GuideFeatureCache, OffAfter, WeightSchedule
from repguide.pairing import Pair, stretch
from repguide.similarity import cka, get_measure, list_measures, register_measure, sketch

__version__ = "0.1.0"

__all__ = [
    "Constant",
    "Guidance",
    "GuidanceOutput",
    "GuideFeatureCache",
    "OffAfter",
    "Pair",
    "RepguideError",
    "SimilarityMatrix",
    "WeightSchedule",
    "cka",
    "compare",
    "data",
    "discover",
    "errors",
    "error_consistency",
    "get_measure",
    "layers",
    "list_measures",
    "models",
    "register_measure",
    "similarity",
    "sketch",
    "stretch",
]
