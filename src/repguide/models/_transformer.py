"""Pieces shared by the Transformer models: attention, pre-norm block, positions, init."""

from __future__ import annotations

import math
from collections import OrderedDict

from repguide.errors import ModelError
import torch
import torch.nn.functional as F
from torch import Tensor, nn


NORMS = ("pre", "post")  # where a block's LayerNorms sit
INITS = ("small", "torch")  # init_weights' GPT-2-style N(0, 0.02), or PyTorch's own module init
MEMORIES = ("none", "causal", "unmasked")  # cross-attention to the stack's input, and its mask
# The MLP's nonlinearity: GELU, or ReLU as in nn.TransformerEncoderLayer's default (the official code's).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal or bidirectional: ``(n, T, dim) → (n, T, dim)``.

    Written on ``scaled_dot_product_attention`` rather than ``nn.MultiheadAttention`` so the
    module returns one batch-first tensor (no tuple for hooks to unpack). ``stands_for``: the
    class the official code's layer rule records it as (``layers="official"``).
    """

    stands_for = nn.MultiheadAttention

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ModelError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x: (n, T, dim)``; ``key_mask: (n, T)`` bool, True where a key may be attended."""
        n, t, dim = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        return self.proj(out.transpose(1, 2).reshape(n, t, dim))


class CrossAttention(nn.Module):
    """Multi-head attention from ``x: (n, T, dim)`` to ``memory: (n, S, dim)`` → ``(n, T, dim)``.

    ``causal`` lets position t attend memory positions ≤ t only (memory of the same length as x)."""

    stands_for = nn.MultiheadAttention

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ModelError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, key_mask: Tensor | None = None) -> Tensor:
        n, t, dim = x.shape
        s = memory.shape[1]
        q = self.q(x).view(n, t, self.heads, dim // self.heads).transpose(1, 2)
        k, v = self.kv(memory).view(n, s, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal,
        )
        return self.proj(out.transpose(1, 2).reshape(n, t, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block, ``x + attn(norm1(x))`` then ``+ mlp(norm2(x))``: ``(n, T, dim) → same``.

    ``norm="post"`` is the original Transformer's order (and PyTorch's ``nn.TransformerEncoderLayer``
    default, which the official code used): ``norm1(x + attn(x))`` then ``norm2(x + mlp(x))``.
    ``memory`` other than ``"none"`` adds a cross-attention sub-layer (``cross``, with ``norm_cross``)
    between the two, attending the stack's input passed as ``memory``: as the official copy-paste
    guide's ``nn.TransformerDecoderLayer`` did with its own input, ``"unmasked"`` (every position
    sees the whole input, future tokens included) or ``"causal"``. ``activation`` is the MLP's
    nonlinearity (``mlp.act``): ``"gelu"`` or ``"relu"``, ``nn.TransformerEncoderLayer``'s default,
    which the official parity Transformer used. For the official layer rule
    (``layers="official"``) a block with memory stands for that ``nn.TransformerDecoderLayer``, one
    without for an ``nn.TransformerEncoderLayer`` (which the official code did not record).
    """

    def __init__(
        self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, causal: bool = False,
        norm: str = "pre",
        memory: str = "none",
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ModelError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        if memory not in MEMORIES:
            raise ModelError(f"memory must be one of {', '.join(map(repr, MEMORIES))}, got {memory!r}")
        if activation not in ACTIVATIONS:
            raise ModelError(
                f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}"
            )
        self.post_norm = norm == "post"
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, causal)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(dim, mlp_dim),
                act=ACTIVATIONS[activation](),
                fc2=nn.Linear(mlp_dim, dim),
                drop=nn.Dropout(dropout),
            )
        )
        if memory != "none":
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = CrossAttention(dim, heads, dropout, causal=memory == "causal")

    @property
    def stands_for(self) -> type[nn.Module]:
        return nn.TransformerDecoderLayer if hasattr(self, "cross") else nn.TransformerEncoderLayer

    def forward(self, x: Tensor, key_mask: Tensor | None = None, memory: Tensor | None = None) -> Tensor:
        """``x: (n, T, dim)``; ``key_mask: (n, T)`` bool, True at real (non-pad) tokens;
        ``memory: (n, T, dim)``, the stack's input, for a block built with ``memory``."""
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, key_mask)))
            if hasattr(self, "cross"):
                x = self.norm_cross(x + self.drop(self.cross(x, memory, key_mask)))
            return self.norm2(x + self.mlp(x))
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        if hasattr(self, "cross"):
            x = x + self.drop(self.cross(self.norm_cross(x), memory, key_mask))
        return x + self.mlp(self.norm2(x))


def make_blocks(
    depth: int, dim: int, heads: int, mlp_dim: int, dropout: float, causal: bool, tie: bool = False,
    norm: str = "pre",
    memory: str = "none",
    activation: str = "gelu",
) -> nn.ModuleList:
    """``depth`` blocks, each with its own weights unless ``tie``.

    Tied blocks stay distinct modules that share parameter tensors, so a forward hook on
    ``blocks.i`` fires once per forward, at depth i (the official code repeated one module object,
    which made the layers indistinguishable).
    """
    blocks = nn.ModuleList(
        TransformerBlock(dim, heads, mlp_dim, dropout, causal, norm, memory, activation) for _ in range(depth)
    )
    if tie:
        for block in blocks[1:]:
            for src, dst in zip(blocks[0].modules(), block.modules()):
                for name, param in src.named_parameters(recurse=False):
                    setattr(dst, name, param)
    return blocks


class LearnedPositions(nn.Module):
    """Adds a learned vector per position: ``(n, T, dim) → (n, T, dim)``, ``T ≤ max_len``."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[: x.shape[1]]


class SinusoidalPositions(nn.Module):
    """Adds Vaswani et al.'s fixed sin/cos table: ``(n, T, dim) → (n, T, dim)``, ``T ≤ max_len``."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq[: dim // 2])
        # Not persistent: it is a function of (max_len, dim), so checkpoints need not carry it.
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.table[: x.shape[1]]


def make_positions(kind: str, max_len: int, dim: int) -> nn.Module:
    """The position module for ``kind`` = ``"learned"`` or ``"sinusoidal"``."""
    if kind == "learned":
        return LearnedPositions(max_len, dim)
    if kind == "sinusoidal":
        return SinusoidalPositions(max_len, dim)
    raise ModelError(f"positions must be 'learned' or 'sinusoidal', got {kind!r}")


def init_weights(model: nn.Module, positions: str, init: str = "small") -> None:
    """GPT-2 style init: Linear and Embedding weights N(0, 0.02), biases 0.

    ``init="torch"`` keeps PyTorch's own init instead (Linear: Kaiming-uniform weights, Embedding:
    N(0, 1)), as the official code did. At random init the two differ in what a guide carries:
    with N(0, 0.02) attention outputs are tiny beside the embeddings, so every position's
    representation is little more than its own token.

    LayerNorm keeps PyTorch's init (gain 1, bias 0); the official code drew its gains from
    N(0, 0.02), which almost switches every normalised branch off. Token embeddings start at the
    scale of the position signal added to them: 0.02 beside learned positions, 1 beside the
    unit-amplitude sinusoidal table.
    """
    if init not in INITS:
        raise ModelError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if init == "torch":
        return
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0 if positions == "sinusoidal" else 0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()


def check_length(t: int, max_len: int) -> None:
    """Raise if a sequence of length ``t`` does not fit the position table."""
    if t > max_len:
        raise ModelError(
            f"sequence length {t} exceeds max_len={max_len}; build the model with a larger max_len"
        )
