"""The official code's candidate layers (``layers="official"``) and mapping (``pairs="official"``).

The expected pairs of the copy-paste guide are those read from the official code
(../shared/official-code.md): with a 4-layer RNN under a 4-layer post-LN decoder guide whose one
layer object is repeated, RNN_0 ← layer 1's linear2, RNN_1 ← layer 2's output, RNN_2 ← layer 4's
norm1, RNN_3 ← layer 4's output.
"""

import math

import pytest
import torch
from torch import nn

import repguide as rg
from repguide.capture import discover
from repguide.models import create
from repguide.pairing import official_mapping, resolve_pairs, stretch


class OfficialStyleCopyGuide(nn.Module):
    """Written the way the official copy-paste guide is: torch's decoder layer, one object
    called four times with the scaled input as unmasked memory, no final norm, a head."""

    def __init__(self, vocab=12, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerDecoderLayer(dim, 2, dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.scale = math.sqrt(dim)

    def forward(self, x):
        h = self.embed(x) * self.scale
        memory = h
        for _ in range(4):
            h = self.layer(h, memory)
        return self.head(h)


class FourLayerRNN(nn.Module):
    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnns = nn.ModuleList(nn.RNN(dim, dim, batch_first=True) for _ in range(4))
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        h = self.embed(x)
        for rnn in self.rnns:
            h, _ = rnn(h)
        return self.head(h)


DECODER_CALL = ["self_attn", "norm1", "multihead_attn", "norm2", "linear1", "linear2", "norm3", ""]


def _official_names(model, x):
    return [info.name for info in discover(model, x, layers="official")]


def test_official_rule_records_each_call_of_torchs_decoder_layer_and_drops_the_head():
    names = _official_names(OfficialStyleCopyGuide().eval(), torch.randint(0, 12, (5, 7)))
    expected = []
    for call in range(4):
        suffix = "" if call == 0 else f"@{call}"
        expected += [("layer." + part if part else "layer") + suffix for part in DECODER_CALL]
    # MultiheadAttention's out_proj is a subclass of Linear: the exact-class rule leaves it out.
    assert names == expected


def test_official_rule_on_repguides_copy_guide_matches_torchs_decoder_layer_one_for_one():
    guide = create("copy_transformer", dim=16, depth=4, heads=2, norm="post", memory="unmasked",
                   tie_layers=True, init="torch", scale_embeddings=True).eval()
    names = _official_names(guide, torch.randint(0, 12, (5, 7)))
    ours = ["attn", "norm1", "cross", "norm_cross", "mlp.fc1", "mlp.fc2", "norm2", ""]
    assert names == [f"blocks.{i}" + (f".{part}" if part else "") for i in range(4) for part in ours]


def test_official_mapping_gives_the_official_copy_paste_pairs():
    x = torch.randint(0, 12, (5, 7))
    pairs = rg.Guidance(FourLayerRNN(), OfficialStyleCopyGuide(), pairs="official", layers="official",
                        example_input=x).pairs
    assert [(p.target, p.guide) for p in pairs] == [
        ("rnns.0", "layer.linear2"), ("rnns.1", "layer@1"), ("rnns.2", "layer.norm1@3"), ("rnns.3", "layer@3"),
    ]


def _reference_mapping(t, s):
    """From the formula: target j keeps the largest guide index i with min(round(i·step), t−1) = j."""
    step = (t - 1) / (s - 1) if s > 1 else 1.0
    keep = {}
    for i in range(s):
        j = min(round(i * step), t - 1)
        keep[j] = max(keep.get(j, -1), i)
    return [(f"t{j}", f"g{keep[j]}") for j in sorted(keep)]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 7, 12])
@pytest.mark.parametrize("s", [1, 2, 3, 5, 8, 21, 32])
def test_official_mapping_against_the_formula_and_stretch(t, s):
    target, guide = [f"t{j}" for j in range(t)], [f"g{i}" for i in range(s)]
    pairs = official_mapping(target, guide)
    assert [(p.target, p.guide) for p in pairs] == _reference_mapping(t, s)
    assert pairs[-1].guide == guide[-1]  # the deepest guide layer always counts
    if s <= t:
        assert pairs == stretch(target, guide)
    assert resolve_pairs("official", target, guide) == pairs


def test_official_rule_keeps_a_stacked_rnn_as_one_layer():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(3, 4)
            self.rnn = nn.RNN(4, 8, num_layers=4, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(self.embed(x))[0][:, -1])

    model, x = Stacked(), torch.randint(0, 3, (5, 9))
    assert _official_names(model, x) == ["rnn"]
    assert rg.layers(model, x) == ["rnn.layer0", "rnn.layer1", "rnn.layer2", "rnn.layer3", "head"]


def test_unknown_pairing_and_rule_name_what_is_allowed():
    with pytest.raises(ValueError, match="'stretch', 'official'"):
        resolve_pairs("oficial", ["a"], ["b"])
    with pytest.raises(ValueError, match="official"):
        discover(nn.Linear(2, 2), torch.randn(3, 2), layers="offical")


def test_official_rule_on_models_from_outside():
    """Hugging Face GPT-2 guiding torch's encoder LM: LayerNorms (GPT-2's blocks are Conv1D, not an
    official class) against the encoder's attention, norms and Linears; a GRU, not an official
    class either, leaves its LM no layer, and the error says what was looked for."""
    pytest.importorskip("transformers")
    from test_foreign_models import MODELS, batch, build

    x = batch("tokens")
    names = [info.name for info in discover(build("gpt2", 0), x, layers="official")]
    assert names == ["gpt2.h.0.ln_1", "gpt2.h.0.ln_2", "gpt2.h.1.ln_1", "gpt2.h.1.ln_2", "gpt2.ln_f"]
    target = build("transformer_encoder", 0)
    guidance = rg.Guidance(target, build("gpt2", 1), layers="official", pairs="official")
    out = guidance(x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and len(out.similarities) >= 2
    assert [p.guide for p in guidance.pairs][-1] == "gpt2.ln_f"  # the deepest guide layer counts
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in target.parameters())
    assert MODELS["gru"][1] == "tokens"
    with pytest.raises(ValueError, match="exact class is one of repguide.capture.OFFICIAL_LAYER_TYPES"):
        discover(build("gru", 0), x, layers="official")
