"""Transformer sequence models: the causal LM (also the copy-paste guide) and the parity encoder.

Both are batch-first and take integer tokens ``x: (n, T)``; see :mod:`repguide.models.sequence`
for the shapes each task uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from repguide.models._registry import register
from repguide.models._transformer import check_length, init_weights, make_blocks, make_positions
from repguide.models.sequence import check_lengths

__all__ = [
    "ParityTransformer",
    "TransformerLM",
    "copy_transformer",
    "parity_transformer",
    "transformer_lm",
]


class _TransformerNet(nn.Module):
    """``embed``, ``pos``, ``drop``, ``blocks.0 ..``, final ``norm``, ``head``.

    The defaults are a pre-norm stack with GPT-2-style N(0, 0.02) init. The official code's guides
    differ in three ways that decide what an *untrained* guide carries, each a switch here:
    ``norm="post"`` (LayerNorm after each residual sum), ``scale_embeddings=True`` (token embeddings
    times √dim), ``init="torch"`` (PyTorch's module init) and ``memory`` (``"unmasked"``: every block
    also attends the stack's input, future tokens included, as the official copy-paste guide's
    decoder layers did; ``"causal"``: the same, masked). ``activation="relu"`` is the official
    parity Transformer's MLP nonlinearity (``nn.TransformerEncoderLayer``'s default) in place of GELU.
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
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.uses_memory = memory != "none"
        self.embed_scale = math.sqrt(dim) if scale_embeddings else 1.0
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.pos = make_positions(positions, max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = make_blocks(
            depth, dim, heads, mlp_dim or 4 * dim, dropout, causal, tie_layers, norm, memory, activation
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
        activation: str = "gelu",
    ) -> None:
        super().__init__(
            vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
            causal=True,
            out_features=vocab_size,
            norm=norm, scale_embeddings=scale_embeddings, init=init, memory=memory, activation=activation,
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
        activation: str = "gelu",
    ) -> None:
        super().__init__(
            vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
            causal=False,
            out_features=2,
            padding_idx=pad_id,
            norm=norm, scale_embeddings=scale_embeddings, init=init, activation=activation,
        )

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = check_lengths(x, lengths)
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
    activation: str = "gelu",
) -> TransformerLM:
    """Causal Transformer LM, pre-norm by default.

    ``mlp_dim`` defaults to ``4 * dim``; ``positions`` is ``"learned"`` or ``"sinusoidal"``;
    ``tie_layers`` shares one set of block weights across depth; ``norm``, ``scale_embeddings``,
    ``init`` and ``memory`` are the official code's switches (see ``_TransformerNet``);
    ``activation`` is the MLP's nonlinearity, ``"gelu"`` or ``"relu"`` (``nn.TransformerEncoderLayer``'s
    default, the official parity Transformer's).
    """
    return TransformerLM(
        vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
        norm, scale_embeddings, init, memory, activation,
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
    activation: str = "gelu",
) -> TransformerLM:
    """:func:`transformer_lm` at copy-paste size: the paper's Transformer guide on copy-paste
    (sinusoidal positions as in the official code, but truly causal and with untied layers;
    ``norm="post", scale_embeddings=True, init="torch", memory="unmasked"`` build it as the
    official code did; ``activation="relu"`` is the MLP nonlinearity of PyTorch's Transformer
    layers by default)."""
    return TransformerLM(
        vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers,
        norm, scale_embeddings, init, memory, activation,
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
    activation: str = "gelu",
) -> ParityTransformer:
    """The paper's parity Transformer target: encoder, masked mean-pool, → 2 logits
    (``norm``, ``scale_embeddings``, ``init``: the official code's switches, see ``_TransformerNet``;
    ``activation="relu"``: the MLP's ReLU of the official code's ``nn.TransformerEncoderLayer``, in
    place of the default GELU)."""
    return ParityTransformer(
        vocab_size, dim, depth, heads, mlp_dim, max_len, positions, dropout, tie_layers, pad_id,
        norm, scale_embeddings, init, activation,
    )
