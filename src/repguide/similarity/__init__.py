"""Differentiable similarity measures between two representations of the same examples.

Every measure takes ``x: (n, d1)`` and ``y: (n, d2)`` (rows are the same n examples) and returns a
0-dim tensor. All are computed in float32 at least (float64 stays float64), outside autocast, so
bf16/fp16 activations from mixed-precision training are measured exactly as fp32 ones would be.

Conventions shared by every measure:

* Features are centred by subtracting column means (never with an n×n centring-matrix product).
* Each input is divided by its (detached) largest absolute centred entry before any product. Every
  measure here is invariant to isotropic scaling, so this changes neither the value nor the gradient,
  and it keeps 1e-20- or 1e20-scaled activations from under- or overflowing in float32.
  (:meth:`Prepared.gram_only`, for a frozen guide's layers, shifts the rows by the first one and
  scales by the range in one pass, then centres the n×n Gram, all on the device:
  :mod:`~repguide.similarity.fused`, which also holds the one-node linear CKA a guided step uses;
  on a CPU it centres the raw Gram where a host-side check finds that precise. The Grams of
  :class:`MinibatchCKA`, summed over batches and never differentiated, are only centred, and
  redone with the rescale where their diagonal shows it was needed:
  :mod:`~repguide.similarity.minibatch_grams`.)
* A *constant* input (every row identical, to rounding) has no structure to compare: the
  similarity is defined as exactly 0, with zero (finite) gradients. Note this means a layer that has
  collapsed to a constant receives no alignment gradient.

Modules: :mod:`~repguide.similarity.base` (the registry :data:`MEASURES`, :class:`Measure`, shared
numerics), :mod:`~repguide.similarity.prepared` (:class:`Prepared` inputs; guide layers prepared in
batches), :mod:`~repguide.similarity.kernel_alignment` (linear, unbiased and RBF CKA; minibatch CKA over a data set;
its Grams in :mod:`~repguide.similarity.minibatch_grams`),
:mod:`~repguide.similarity.rsa`, :mod:`~repguide.similarity.procrustes` and
:mod:`~repguide.similarity.sketching`. A measure is added with :func:`register_measure`.
"""

from repguide.similarity.base import (
    MEASURES,
    Measure,
    Prepared,
    get_measure,
    list_measures,
    register_measure,
    similarity,
)
from repguide.similarity.kernel_alignment import LinearCKA, MinibatchCKA, RbfCKA, UnbiasedLinearCKA, cka
from repguide.similarity.procrustes import Procrustes
from repguide.similarity.rsa import RSA
from repguide.similarity.sketching import sketch

__all__ = [
    "LinearCKA",
    "MEASURES",
    "Measure",
    "MinibatchCKA",
    "Prepared",
    "Procrustes",
    "RSA",
    "RbfCKA",
    "UnbiasedLinearCKA",
    "cka",
    "get_measure",
    "list_measures",
    "register_measure",
    "similarity",
    "sketch",
]
