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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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
State = Tensor | tuple[Tensor, Tensor] | None  # a recurrent module's (h) or (h, c) state; None: zeros


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

    ``fused=True`` is the official parity guide's form: one multi-layer module ``rnn``
    (``nn.RNN(..., num_layers=k, dropout=dropout)``, LSTM/GRU likewise) in place of ``layers``.
    It computes what the separate layers compute from the same weights (``rnn.weight_ih_l{k}`` is
    ``layers.{k}.weight_ih_l0``), but every layer starts from zeros, so ``initial_state="carry"``
    is refused; capture names its layers ``rnn.layer0``, ``rnn.layer1``, ….
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
        fused: bool = False,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ModelError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
        if initial_state not in INITIAL_STATES:
            raise ModelError(
                f"initial_state must be one of {', '.join(map(repr, INITIAL_STATES))}, got {initial_state!r}"
            )
        if fused and initial_state == "carry":
            raise ModelError(
                "initial_state='carry' cannot go with fused=True: a fused multi-layer module starts every "
                "layer from zeros; use initial_state='zeros' with fused=True, or fused=False with 'carry'"
            )
        self.initial_state = initial_state
        self.fused = fused
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        if fused:
            # Dropout between the layers only where there are two (nn.RNN warns otherwise); the
            # top layer's dropout is applied in features, as for the separate layers.
            self.rnn = _CELLS[cell](
                embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
            )
        else:
            # Separate single-layer modules, not one multi-layer nn.RNN, so each layer has its own
            # name for hooks.
            self.layers = nn.ModuleList(
                _CELLS[cell](embed_dim if i == 0 else hidden_dim, hidden_dim, batch_first=True)
                for i in range(num_layers)
            )
        self.dropout = dropout
        self.head = nn.Linear(hidden_dim, out_features)

    def features(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``x: (n, T)`` tokens → top layer's outputs ``(n, T, hidden_dim)``.

        With ``lengths: (n,)`` every recurrent module runs on the sequences packed to those lengths,
        so its outputs are 0 past each length and its final state is the state at each length.
        """
        h = self.embed(x)
        if self.fused:
            return F.dropout(_run_recurrent(self.rnn, h, None, lengths)[0], self.dropout, self.training)
        state = None
        for layer in self.layers:
            # With "zeros" no initial state is passed, so every layer starts from zeros. The
            # official code ("carry") started layer i+1 from layer i's final state, a summary of
            # the whole sequence, which leaks future tokens into every position.
            h, final = _run_recurrent(layer, h, state, lengths)
            if self.initial_state == "carry":
                state = final
            # Functional, not a module: one Dropout module called after every layer would fire
            # its forward hooks once per layer.
            h = F.dropout(h, self.dropout, self.training)
        return h


def _run_recurrent(module: nn.RNNBase, h: Tensor, state: State, lengths: Tensor | None) -> tuple[Tensor, State]:
    """``module`` on ``h: (n, T, d)`` from ``state`` (None: zeros): its outputs ``(n, T, hidden)`` and
    final state; packed to ``lengths: (n,)`` when given, the outputs padded back to T with zeros."""
    if lengths is not None:
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = module(packed) if state is None else module(packed, state)
        return pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])[0], final
    return module(h) if state is None else module(h, state)


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
        fused: bool = False,
    ) -> None:
        super().__init__(
            vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, vocab_size,
            initial_state=initial_state, fused=fused,
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

    ``packed=True`` is the official parity guide's form: each recurrent module runs on a
    ``PackedSequence`` of the true lengths, so its outputs are exactly 0 past each length (still
    ``(n, T, hidden_dim)``) and, with ``"carry"``, the state carried up is each string's state at its
    own end.
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
        packed: bool = False,
        fused: bool = False,
    ) -> None:
        super().__init__(
            vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, 2, pad_id, initial_state, fused
        )
        self.packed = packed

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = check_lengths(x, lengths)
        h = self.features(x, lengths if self.packed else None)
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
    fused: bool = False,
) -> RecurrentLM:
    """Stacked recurrent LM; ``cell`` is ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``.

    ``initial_state``: ``"zeros"`` (every layer starts from zeros; causal) or ``"carry"`` (layer
    k+1 starts from layer k's final state, the official code's leak of future tokens).
    ``fused``: one multi-layer module ``rnn`` instead of the single-layer ``layers.i`` (the
    official parity guide's form; its layers all start from zeros, so not with ``"carry"``).
    """
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, initial_state, fused)


@register("lstm_lm")
def lstm_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
    initial_state: str = "zeros",
    fused: bool = False,
) -> RecurrentLM:
    """:func:`rnn_lm` with LSTM layers."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, "lstm", initial_state, fused)


@register("gru_lm")
def gru_lm(
    vocab_size: int,
    embed_dim: int = 128,
    hidden_dim: int = 256,
    num_layers: int = 2,
    dropout: float = 0.0,
    initial_state: str = "zeros",
    fused: bool = False,
) -> RecurrentLM:
    """:func:`rnn_lm` with GRU layers."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, "gru", initial_state, fused)


@register("copy_rnn")
def copy_rnn(
    vocab_size: int = 14,
    embed_dim: int = 64,
    hidden_dim: int = 128,
    num_layers: int = 2,
    dropout: float = 0.0,
    cell: str = "rnn",
    initial_state: str = "zeros",
    fused: bool = False,
) -> RecurrentLM:
    """:func:`rnn_lm` at copy-paste size: the paper's RNN target on copy-paste (``initial_state``
    and ``fused`` as there; ``"carry"`` is the official RNN's)."""
    return RecurrentLM(vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, initial_state, fused)


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
    packed: bool = False,
    fused: bool = False,
) -> ParityRNN:
    """The paper's parity RNN (the guide on parity): bits 0/1 and ``pad_id``, → 2 logits.

    ``initial_state`` as in :func:`rnn_lm`. (The official parity RNN was one multi-layer ``nn.RNN``,
    whose layers all start from zeros; ``"carry"`` is the official *stacked* RNNs' behaviour.)
    Two switches, off by default, build the official parity guide: ``packed=True`` runs every
    recurrent module on a ``PackedSequence`` of the true lengths, as the official code did, so its
    outputs are exactly 0 past each string's length (the default runs through the padding, which
    the causal layers' outputs before a length never see); ``fused=True`` makes the layers one
    multi-layer module ``rnn`` (``nn.RNN(num_layers=num_layers)``), as the official code did, whose
    layers capture names ``rnn.layer0`` … (not with ``initial_state="carry"``). The official guide
    is ``num_layers=4, packed=True, fused=True``.
    """
    return ParityRNN(
        vocab_size, embed_dim, hidden_dim, num_layers, dropout, cell, pad_id, initial_state, packed, fused
    )
