"""A guided step written the way the paper's official code computes it, as the baseline for R2.

Reproduces the official code's costs, on the same pairs as repguide:

* the target runs twice: once for the task loss, once more (gradient-carrying) to collect its
  activations (E3);
* a feature extractor registers a forward hook on *every* module of both networks on every call
  and removes them afterwards (E2); it records the output of every module of the official types
  (exact type match) in execution order, batch axis fixed by size, the last one dropped, all of
  them kept until the loss is built (E6);
* linear CKA by explicit centring matrices, H K H with H = I − 11ᵀ/n rebuilt on every call, and
  three HSIC evaluations per pair (K-L, K-K, L-L) that rebuild their Gram matrices: 4 Grams and
  8 n×n centring products per pair (E1). Activations are flattened and cast to float32.

It is a benchmark baseline, not part of the library.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

OFFICIAL_TYPES = (
    nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.LSTM, nn.RNN,
    nn.TransformerDecoderLayer, nn.LayerNorm, nn.MultiheadAttention,
)


class FeatureMapExtractor:
    """Hooks on every module; records the official layer types' outputs by module name."""

    def __init__(self, model: nn.Module):
        self.features: dict[str, Tensor] = {}
        self.names = {module: name for name, module in model.named_modules()}
        self.handles = []
        model.apply(self._register)

    def _register(self, module: nn.Module) -> None:
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            self.handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if type(module) not in OFFICIAL_TYPES:
            return
        if isinstance(output, tuple):  # RNN/LSTM: the output sequence; attention: the output
            output = output[0]
        batch = inputs[0].shape[0] if inputs and isinstance(inputs[0], Tensor) else output.shape[0]
        if output.shape[0] != batch:
            axes = [i for i, s in enumerate(output.shape) if s == batch]
            if len(axes) != 1:
                return  # silently dropped, as the official code does
            output = output.transpose(0, axes[0])
        self.features[self.names[module]] = output

    def collect(self) -> dict[str, Tensor]:
        for handle in self.handles:
            handle.remove()
        kept = list(self.features.items())[:-1]  # the last recorded map is always discarded
        return dict(kept)


def centering(k: Tensor) -> Tensor:
    n = k.shape[0]
    unit = torch.ones([n, n], device=k.device)
    identity = torch.eye(n, device=k.device)
    h = identity - unit / n
    return torch.matmul(torch.matmul(h, k), h)


def linear_hsic(x: Tensor, y: Tensor) -> Tensor:
    return torch.sum(centering(x @ x.T) * centering(y @ y.T))


def linear_self_hsic(x: Tensor) -> Tensor:
    kc = centering(x @ x.T)
    return torch.sum(kc * kc)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    hsic = linear_hsic(x, y)
    var1 = torch.sqrt(linear_self_hsic(x))
    var2 = torch.sqrt(linear_self_hsic(y))
    return hsic / (var1 * var2)


def alignment_loss(target: nn.Module, guide: nn.Module, pairs, x: Tensor) -> Tensor:
    """Σ (1 − CKA) over ``pairs`` of (target layer, guide layer) names, the official way."""
    extractor = FeatureMapExtractor(guide)
    with torch.no_grad():
        guide(x)
    guide_features = extractor.collect()
    extractor = FeatureMapExtractor(target)
    target(x)  # the second, gradient-carrying target forward
    target_features = extractor.collect()
    n = x.shape[0]
    loss = 0.0
    for t_name, g_name in pairs:
        t = target_features[t_name].reshape(n, -1).float()
        g = guide_features[g_name].reshape(n, -1).float()
        loss = loss + (1 - linear_cka(t, g))
    return loss


def step(target, guide, pairs, optimizer, loss_fn, x: Tensor, y: Tensor) -> None:
    """One official-style guided optimiser step."""
    task = loss_fn(target(x), y)
    loss = task + alignment_loss(target, guide, pairs, x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
