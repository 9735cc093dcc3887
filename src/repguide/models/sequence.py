"""Sequence models: recurrent and Transformer language models, copy-paste and parity models.

All are batch-first and take integer tokens ``x: (n, T)``. Language and copy-paste models return
``(n, T, vocab_size)`` logits and are causal: output t depends on tokens ≤ t only (copy-paste
predicts ``target[t]`` at position t). Parity models return ``(n, 2)`` logits and take the true
length of each padded sequence as ``lengths: (n,)``.
"""

from __future__ import annotations

from functools import partial

from repguide.errors import ModelError
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repguide.models._registry import register

__all__ = [
    "ParityRNN",
    "RecurrentLM",
    "copy_rnn",
    "gru_lm",
    "lstm_lm",
    "parity_rnn",
    "rnn_lm",
]

_CELLS = {"rnn": partial(nn.RNN, nonlinearity="tanh"), "lstm": nn.LSTM, "gru": nn.GRU}
# Where each layer's recurrence starts: "zeros" (every layer from a zero state) or "carry" (layer
# k+1 from layer k's final state, as the official code did; see _RecurrentNet).
INITIAL_STATES = ("zeros", "carry")


# --------------------------------------------------------------------------------------------
# Recurrent models


class _RecurrentNet(nn.Module):
    """``embed``, single-layer RNN/LSTM/GRU modules ``layers.0``, ``layers.1``, …, then ``head``.

    ``initial_state="zeros"`` (default) starts every layer from a zero state, so the network is
    causal. ``"carry"`` is the official code's switch: layer 0 starts from zeros and layer k+1 from
    layer k's *final* state (h, and c too for an LSTM), the state after the whole sequence, so every
    position of the layers above the first sees every token, future ones included (and, in a padded
    parity batch, the padding after a string's end). Each layer is still one module called once
    per forward.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        dropout: float,
        cell: str,
        out_features: int,
        padding_idx: int | None = None,
        initial_state: str = "zeros",
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ModelError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
        if initial_state not in INITIAL_STATES:
            raise ModelError(
                f"initial_state must be one of {', '.join(map(repr, INITIAL_STATES))}, got {initial_state!r}"
            )
        self.initial_state = initial_state
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        # Separate single-layer modules, not one multi-layer nn.RNN, so each layer has its own
        # name for hooks.
        self.layers = nn.ModuleList(
            _CELLS[cell](embed_dim if i == 0 else hidden_dim, hidden_dim, batch_first=True)
            for i in range(num_layers)
        )
        self.dropout = dropout
        self.head = nn.Linear(hidden_dim, out_features)

    def features(self, x: Tensor) -> Tensor:
        """``x: (n, T)`` tokens → top layer's outputs ``(n, T, hidden_dim)``."""
        h = self.embed(x)
        state = None
        for layer in self.layers:
            # With "zeros" no initial state is passed, so every layer starts from zeros. The
            # official code ("carry") started layer i+1 from layer i's final state, a summary of
            # the whole sequence, which leaks future tokens into every position.
            h, final = layer(h) if state is None else layer(h, state)
            if self.initial_state == "carry":
                state = final
            # Functional, not a module: one Dropout module called after every layer would fire
            # its forward hooks once per layer.
            h = F.dropout(h, self.dropout, self.training)
        return h


class RecurrentLM(_RecurrentNet):
    """Recurrent language model: ``(n, T)`` tokens → ``(n, T, vocab_size)`` next-token logits."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        cell: str = "rnn",
        initial_state: str = "zeros",
    ) -> None:
        super().__init__(
            vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, vocab_size, initial_state=initial_state
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def check_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """``lengths: (n,)`` on ``x``'s device, all of ``T`` when None; raises if out of ``[1, T]``."""
    n, t = x.shape
    if lengths is None:
        return torch.full((n,), t, dtype=torch.long, device=x.device)
    if lengths.shape != (n,):
        raise ModelError(f"lengths must have shape ({n},), got {tuple(lengths.shape)}")
    lengths = lengths.to(x.device)
    if lengths.min() < 1 or lengths.max() > t:
        raise ModelError(
            f"lengths must lie in [1, {t}], got min {lengths.min()} and max {lengths.max()}"
        )
    return lengths


class ParityRNN(_RecurrentNet):
    """Sequence classifier: ``(n, T)`` padded tokens, ``lengths: (n,)`` → ``(n, 2)`` logits.

    Reads the top layer's state at each sequence's last valid position. With the default
    ``initial_state="zeros"`` the layers are causal, so that state never sees the padding after it;
    no packing is needed. (With ``"carry"`` the layers above the first start from a state that has
    run through the padding.)
    """

    def __init__(
        self,
        vocab_size: int = 3,
        embed_dim: int = 16,
        hidden_dim: int = 64,
        num_layers: int = 2,
        dropout: float = 0.0,
        cell: str = "rnn",
        pad_id: int = 2,
        initial_state: str = "zeros",
    ) -> None:
        super().__init__(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, 2, pad_id, initial_state)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = check_lengths(x, lengths)
        h = self.features(x)
        return self.head(h[torch.arange(x.shape[0], device=x.device), lengths - 1])


@register("rnn_lm")
def rnn_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
    cell: str = "rnn",
    initial_state: str = "zeros",
) -> RecurrentLM:
    """Stacked recurrent LM; ``cell`` is ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``.

    ``initial_state``: ``"zeros"`` (every layer starts from zeros; causal) or ``"carry"`` (layer
    k+1 starts from layer k's final state, the official code's leak of future tokens).
    """
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, initial_state)


@register("lstm_lm")
def lstm_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
    initial_state: str = "zeros",
) -> RecurrentLM:
    """:func:`rnn_lm` with LSTM layers."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, "lstm", initial_state)


@register("gru_lm")
def gru_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
    initial_state: str = "zeros",
) -> RecurrentLM:
    """:func:`rnn_lm` with GRU layers."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, "gru", initial_state)


@register("copy_rnn")
def copy_rnn(
    vocab_size: int = 14,
    embed_dim: int = 64,
    hidden_dim: int = 128,
    num_layers: int = 2,
    dropout: float = 0.0,
    cell: str = "rnn",
    initial_state: str = "zeros",
) -> RecurrentLM:
    """:func:`rnn_lm` at copy-paste size: the paper's RNN target on copy-paste (``initial_state``
    as there; ``"carry"`` is the official RNN's)."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, initial_state)


@register("parity_rnn")
def parity_rnn(
    vocab_size: int = 3,
    embed_dim: int = 16,
    hidden_dim: int = 64,
    num_layers: int = 2,
    dropout: float = 0.0,
    cell: str = "rnn",
    pad_id: int = 2,
    initial_state: str = "zeros",
) -> ParityRNN:
    """The paper's parity RNN (the guide on parity): bits 0/1 and ``pad_id``, → 2 logits.
    ``initial_state`` as in :func:`rnn_lm`. (The official parity RNN was one multi-layer ``nn.RNN``,
    whose layers all start from zeros; ``"carry"`` is the official *stacked* RNNs' behaviour.)"""
    return ParityRNN(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, pad_id, initial_state)
