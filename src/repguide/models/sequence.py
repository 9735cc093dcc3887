"""Sequence models: recurrent and Transformer language models, copy-paste and parity models.

All are batch-first and take integer tokens ``x: (n, T)``. Language and copy-paste models return
``(n, T, vocab_size)`` logits and are causal: output t depends on tokens ≤ t only (copy-paste
predicts ``target[t]`` at position t). Parity models return ``(n, 2)`` logits and take the true
length of each padded sequence as ``lengths: (n,)``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repguide.models._registry import register
from repguide.models._transformer import check_length, init_weights, make_blocks, make_positions

__all__ = [
    "ParityRNN",
    "ParityTransformer",
    "RecurrentLM",
    "TransformerLM",
    "copy_rnn",
    "copy_transformer",
    "gru_lm",
    "lstm_lm",
    "parity_rnn",
    "parity_transformer",
    "rnn_lm",
    "transformer_lm",
]

_CELLS = {"rnn": partial(nn.RNN, nonlinearity="tanh"), "lstm": nn.LSTM, "gru": nn.GRU}


# --------------------------------------------------------------------------------------------
# Recurrent models


class _RecurrentNet(nn.Module):
    """``embed``, single-layer RNN/LSTM/GRU modules ``layers.0``, ``layers.1``, …, then ``head``."""

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
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
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
        for layer in self.layers:
            # No initial state is passed, so every layer starts from zeros. The official code
            # started layer i+1 from layer i's final state, a summary of the whole sequence,
            # which leaks future tokens into every position (paper.md §4.2 L1).
            h, _ = layer(h)
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
    ) -> None:
        super().__init__(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _check_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """``lengths: (n,)`` on ``x``'s device, all of ``T`` when None; raises if out of ``[1, T]``."""
    n, t = x.shape
    if lengths is None:
        return torch.full((n,), t, dtype=torch.long, device=x.device)
    if lengths.shape != (n,):
        raise ValueError(f"lengths must have shape ({n},), got {tuple(lengths.shape)}")
    lengths = lengths.to(x.device)
    if lengths.min() < 1 or lengths.max() > t:
        raise ValueError(
            f"lengths must lie in [1, {t}], got min {lengths.min()} and max {lengths.max()}"
        )
    return lengths


class ParityRNN(_RecurrentNet):
    """Sequence classifier: ``(n, T)`` padded tokens, ``lengths: (n,)`` → ``(n, 2)`` logits.

    Reads the top layer's state at each sequence's last valid position. The layers are causal,
    so that state never sees the padding after it; no packing is needed.
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
    ) -> None:
        super().__init__(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, 2, pad_id)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = _check_lengths(x, lengths)
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
) -> RecurrentLM:
    """Stacked recurrent LM; ``cell`` is ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell)


@register("lstm_lm")
def lstm_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
) -> RecurrentLM:
    """:func:`rnn_lm` with LSTM layers."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, "lstm")


@register("gru_lm")
def gru_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
) -> RecurrentLM:
    """:func:`rnn_lm` with GRU layers."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, "gru")


@register("copy_rnn")
def copy_rnn(
    vocab_size: int = 14,
    embed_dim: int = 64,
    hidden_dim: int = 128,
    num_layers: int = 2,
    dropout: float = 0.0,
    cell: str = "rnn",
) -> RecurrentLM:
    """:func:`rnn_lm` at copy-paste size: the paper's RNN target on copy-paste."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell)


@register("parity_rnn")
def parity_rnn(
    vocab_size: int = 3,
    embed_dim: int = 16,
    hidden_dim: int = 64,
    num_layers: int = 2,
    dropout: float = 0.0,
    cell: str = "rnn",
    pad_id: int = 2,
) -> ParityRNN:
    """The paper's parity RNN (the guide on parity): bits 0/1 and ``pad_id``, → 2 logits."""
    return ParityRNN(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, pad_id)


# --------------------------------------------------------------------------------------------
# Transformer models


class _TransformerNet(nn.Module):
    """``embed``, ``pos``, ``drop``, ``blocks.0 ..``, final ``norm``, ``head``.

    The defaults are a pre-norm stack with GPT-2-style N(0, 0.02) init. The official code's guides
    differ in three ways that decide what an *untrained* guide carries, each a switch here:
    ``norm="post"`` (LayerNorm after each residual sum), ``scale_embeddings=True`` (token embeddings
    times √dim), ``init="torch"`` (PyTorch's module init) and ``memory`` (``"unmasked"``: every block
    also attends the stack's input, future tokens included, as the official copy-paste guide's
    decoder layers did; ``"causal"``: the same, masked).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int | None,
        max_len: int,
        positions: str,
        dropout: float,
        tie_layers: bool,
        causal: bool,
        out_features: int,
        padding_idx: int | None = None,
        norm: str = "pre",
        scale_embeddings: bool = False,
        init: str = "small",
        memory: str = "none",
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.uses_memory = memory != "none"
        self.embed_scale = math.sqrt(dim) if scale_embeddings else 1.0
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.pos = make_positions(positions, max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = make_blocks(
            depth, dim, heads, mlp_dim or 4 * dim, dropout, causal, tie_layers, norm, memory
        )
        # A post-norm stack already ends in a LayerNorm.
        self.norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(dim, out_features)
        init_weights(self, positions, init)

    def features(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x: (n, T)`` tokens, ``key_mask: (n, T)`` bool, True at real tokens → ``(n, T, dim)``.

        The output is after the final ``norm``.
        """
        check_length(x.shape[1], self.max_len)
        h = self.drop(self.pos(self.embed(x) * self.embed_scale))
        memory = h if self.uses_memory else None
        for block in self.blocks:
            h = block(h, key_mask, memory)
        return self.norm(h)


class TransformerLM(_TransformerNet):
    """Causal decoder-only Transformer: ``(n, T)`` tokens → ``(n, T, vocab_size)`` logits."""

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int | None = None,
        max_len: int = 512,
        positions: str = "learned",
        dropout: float = 0.0,
        tie_layers: bool = False,
        norm: str = "pre",
        scale_embeddings: bool = False,
        init: str = "small",
        memory: str = "none",
    ) -> None:
        super().__init__(
            vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
            causal=True,
            out_features=vocab_size,
            norm=norm, scale_embeddings=scale_embeddings, init=init, memory=memory,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ParityTransformer(_TransformerNet):
    """Transformer encoder classifier: ``(n, T)`` padded tokens, ``lengths: (n,)`` → ``(n, 2)``.

    Padding is masked out of attention and of the mean-pool, so the logits depend on the valid
    positions only.
    """

    def __init__(
        self,
        vocab_size: int = 3,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int | None = None,
        max_len: int = 512,
        positions: str = "sinusoidal",
        dropout: float = 0.0,
        tie_layers: bool = False,
        pad_id: int = 2,
        norm: str = "pre",
        scale_embeddings: bool = False,
        init: str = "small",
    ) -> None:
        super().__init__(
            vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
            causal=False,
            out_features=2,
            padding_idx=pad_id,
            norm=norm, scale_embeddings=scale_embeddings, init=init,
        )

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = _check_lengths(x, lengths)
        valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        h = self.features(x, valid)
        pooled = torch.where(valid[..., None], h, 0.0).sum(dim=1) / lengths[:, None].to(h.dtype)
        return self.head(pooled)


@register("transformer_lm")
def transformer_lm(
    vocab_size: int,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int | None = None,
    max_len: int = 512,
    positions: str = "learned",
    dropout: float = 0.0,
    tie_layers: bool = False,
    norm: str = "pre",
    scale_embeddings: bool = False,
    init: str = "small",
    memory: str = "none",
) -> TransformerLM:
    """Causal Transformer LM, pre-norm by default.

    ``mlp_dim`` defaults to ``4 * dim``; ``positions`` is ``"learned"`` or ``"sinusoidal"``;
    ``tie_layers`` shares one set of block weights across depth; ``norm``, ``scale_embeddings``,
    ``init`` and ``memory`` are the official code's switches (see ``_TransformerNet``).
    """
    return TransformerLM(
        vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
        norm, scale_embeddings, init, memory,
    )


@register("copy_transformer")
def copy_transformer(
    vocab_size: int = 14,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int | None = None,
    max_len: int = 512,
    positions: str = "sinusoidal",
    dropout: float = 0.0,
    tie_layers: bool = False,
    norm: str = "pre",
    scale_embeddings: bool = False,
    init: str = "small",
    memory: str = "none",
) -> TransformerLM:
    """:func:`transformer_lm` at copy-paste size: the paper's Transformer guide on copy-paste
    (sinusoidal positions as in the official code, but truly causal and with untied layers;
    ``norm="post", scale_embeddings=True, init="torch", memory="unmasked"`` build it as the
    official code did)."""
    return TransformerLM(
        vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
        norm, scale_embeddings, init, memory,
    )


@register("parity_transformer")
def parity_transformer(
    vocab_size: int = 3,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int | None = None,
    max_len: int = 512,
    positions: str = "sinusoidal",
    dropout: float = 0.0,
    tie_layers: bool = False,
    pad_id: int = 2,
    norm: str = "pre",
    scale_embeddings: bool = False,
    init: str = "small",
) -> ParityTransformer:
    """The paper's parity Transformer target: encoder, masked mean-pool, → 2 logits
    (``norm``, ``scale_embeddings``, ``init``: the official code's switches, see ``_TransformerNet``)."""
    return ParityTransformer(
        vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers, pad_id,
        norm, scale_embeddings, init,
    )
