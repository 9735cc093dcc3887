"""repguide: guidance, training a target network to align layer by layer with a frozen guide."""

from repguide import similarity
from repguide.similarity import cka, get_measure, list_measures, register_measure

__version__ = "0.1.0"

__all__ = ["cka", "get_measure", "list_measures", "register_measure", "similarity"]
