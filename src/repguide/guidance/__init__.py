"""Guidance: training a target network with an alignment term to a frozen guide.

:mod:`~repguide.guidance.module` holds the :class:`Guidance` module itself,
:mod:`~repguide.guidance.schedules` the alignment weight over steps,
:mod:`~repguide.guidance.guide_cache` the guide-feature cache and
:mod:`~repguide.guidance.guide_input` what the guide is fed and
:mod:`~repguide.guidance.diagnostics` what each pair can carry before training.
"""

from repguide.guidance.diagnostics import PairDiagnostic, diagnose, variance_shares
from repguide.guidance.guide_cache import GuideFeatureCache
from repguide.guidance.guide_input import noise_like
from repguide.guidance.module import Guidance, GuidanceOutput
from repguide.guidance.schedules import Constant, OffAfter, Weight, WeightSchedule

__all__ = [
    "Constant", "Guidance", "GuidanceOutput", "GuideFeatureCache", "OffAfter", "PairDiagnostic", "Weight",
    "WeightSchedule", "diagnose", "noise_like", "variance_shares",
]
