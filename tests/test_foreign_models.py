"""Models repguide did not build, tried as a new user would: ``rg.Guidance(target, guide)`` with no
other argument. Each model is randomly initialised from a tiny config (no download) and wrapped in a
small module that returns logits. The pairs must be the block outputs named here."""

import copy
import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import repguide as rg
from repguide.capture import Capture
from repguide.pairing import resolve_pairs

from _nets import CountForwards

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
VOCAB, LENGTH, BATCH, WIDTH, CLASSES = 50, 16, 6, 32, 5  # the batch size differs from every other size


class Logits(nn.Module):
    """A Hugging Face model, or a stack of blocks, with a linear head: ``(n, ...) → (n, CLASSES)``."""

    def __init__(self, name, body, features=WIDTH):
        super().__init__()
        self.add_module(name, body)
        self.body_name = name
        self.head = nn.Linear(features, CLASSES)

    def forward(self, x):
        hidden = getattr(self, self.body_name)(x)
        if not isinstance(hidden, torch.Tensor):
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden.logits
        return self.head(hidden[:, 0])


class RecurrentLM(nn.Module):
    """Embedding, a 2-layer recurrent module (sequence-first when ``batch_first`` is False), head."""

    def __init__(self, cell, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.rnn = cell(WIDTH, WIDTH, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        out, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


class EncoderLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class HandCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def gpt2():
    t = pytest.importorskip("transformers")
    config = t.GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=64)
    return Logits("gpt2", t.GPT2Model(config))


def bert():
    t = pytest.importorskip("transformers")
    config = t.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
    return Logits("bert", t.BertModel(config, add_pooling_layer=False))


def llama():
    t = pytest.importorskip("transformers")
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return Logits("llama", t.LlamaModel(config))


def vit():
    t = pytest.importorskip("transformers")
    config = t.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)
    return Logits("vit", t.ViTModel(config, add_pooling_layer=False))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, CLASSES))


# name: (factory, input kind, its candidate layers under the default rule, output head left out)
MODELS = {
    "gpt2": (gpt2, "tokens", ["gpt2.h.0", "gpt2.h.1"]),
    "bert": (bert, "tokens", ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]),
    "llama": (llama, "tokens", ["llama.layers.0", "llama.layers.1"]),
    "transformer_encoder": (EncoderLM, "tokens", ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]),
    "gru": (lambda: RecurrentLM(nn.GRU, True), "tokens", ["rnn.layer0", "rnn.layer1"]),
    "lstm": (lambda: RecurrentLM(nn.LSTM, False), "tokens", ["rnn.layer0", "rnn.layer1"]),
    "vit": (vit, "images", ["vit.layers.0", "vit.layers.1"]),
    "mlp": (mlp, "images", ["1", "3"]),
    "cnn": (HandCNN, "images", ["conv1", "bn1", "conv2", "bn2"]),
}
ORDERED_PAIRS = [
    (t, g) for t, g in itertools.permutations(MODELS, 2) if MODELS[t][1] == MODELS[g][1]
]


def build(name, seed):
    torch.manual_seed(seed)
    return MODELS[name][0]()


def batch(kind):
    generator = torch.Generator().manual_seed(0)
    if kind == "tokens":
        return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    return torch.randn(BATCH, 3, 16, 16, generator=generator)


@pytest.mark.parametrize("name", list(MODELS))
def test_default_candidate_layers_are_the_block_outputs(name):
    model = build(name, 0)
    infos = rg.discover(model, batch(MODELS[name][1]))
    assert [i.name for i in infos if not i.is_output] == MODELS[name][2]
    assert all(i.shape[0] == BATCH for i in infos)


@pytest.mark.parametrize("target_name, guide_name", ORDERED_PAIRS)
def test_defaults_pair_block_outputs_and_train_the_target_only(target_name, guide_name):
    target, guide = build(target_name, 1), build(guide_name, 2)
    guide_before = copy.deepcopy(guide.state_dict())
    guidance = rg.Guidance(target, guide)
    out = guidance(batch(MODELS[target_name][1]))
    expected = resolve_pairs("stretch", MODELS[target_name][2], MODELS[guide_name][2])
    assert guidance.pairs == expected and len(expected) >= 2
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in target.parameters())
    assert all(p.grad is None for p in guide.parameters())
    assert all(torch.equal(v, guide_before[k]) for k, v in guide.state_dict().items())


@pytest.mark.parametrize("name", list(MODELS))
def test_every_module_of_a_foreign_model_gives_batch_first_outputs_or_is_left_out(name):
    model = build(name, 0)  # ModelOutputs, (out, weights) attention, sequence-first LSTM outputs
    infos = rg.discover(model, batch(MODELS[name][1]), layers="all")
    assert set(MODELS[name][2]) <= {i.name for i in infos}
    assert all(i.shape[0] == BATCH for i in infos)


def test_a_model_without_candidate_layers_is_an_error_that_says_what_to_do():
    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)

        def forward(self, x):
            return self.embed(x).sum(1)

    with pytest.raises(ValueError) as err:
        rg.layers(Embedder(), batch("tokens"))
    message = str(err.value)
    for part in ("Embedder", "blocks", "Embedding ×1", "layer_types=(", "pairs="):
        assert part in message


# -- every layer of a stacked recurrent module ------------------------------------------------


class Stacked(nn.Module):
    def __init__(self, cell, batch_first, bidirectional, packed, initial_state, dropout=0.0):
        super().__init__()
        self.rnn = cell(4, 6, num_layers=3, batch_first=batch_first, bidirectional=bidirectional, dropout=dropout)
        self.packed, self.initial_state, self.batch_first = packed, initial_state, batch_first

    def forward(self, x):  # x: (n, T, 4)
        rows = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        h0 = torch.linspace(-1, 1, rows * x.shape[0] * 6).reshape(rows, x.shape[0], 6)
        hx = None if not self.initial_state else (h0, -h0) if isinstance(self.rnn, nn.LSTM) else h0
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            seq = pack_padded_sequence(seq, torch.tensor([5, 2, 4]), self.batch_first, enforce_sorted=False)
        out, h = self.rnn(seq, hx)
        final = torch.cat(h, -1) if isinstance(h, tuple) else h
        return (out.data if self.packed else out), final


CASES = [
    (cell, batch_first, bidirectional, packed, initial_state)
    for cell in (nn.RNN, nn.LSTM, nn.GRU)
    for batch_first, bidirectional, packed, initial_state in
    [(True, False, False, False), (False, True, False, True), (True, True, True, False), (False, False, True, True)]
]
LAYERS = ["rnn.layer0", "rnn.layer1", "rnn.layer2"]


def _run_both(model, x):
    """The model's outputs fused, and layer by layer under a capture of every layer."""
    fused = model(x)
    capture = Capture(model, LAYERS)
    with capture.record(x.shape[0]) as acts:
        by_layer = model(x)
    capture.remove()
    return fused, by_layer, acts


@pytest.mark.parametrize("cell, batch_first, bidirectional, packed, initial_state", CASES)
def test_stacked_recurrent_layers_reproduce_the_fused_module_in_eval_mode(
    cell, batch_first, bidirectional, packed, initial_state
):
    torch.manual_seed(0)
    model = Stacked(cell, batch_first, bidirectional, packed, initial_state).eval()
    x = torch.randn(3, 5, 4)
    (out, h), (out_l, h_l), acts = _run_both(model, x)
    torch.testing.assert_close(out_l, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_l, h, atol=1e-6, rtol=0)
    width = 12 if bidirectional else 6
    assert [tuple(acts[n].shape) for n in LAYERS] == [(3, 5, width)] * 3  # batch-first, padded
    assert "forward" not in vars(model.rnn) and not model.rnn._forward_hooks  # removed cleanly


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_stacked_recurrent_layers_use_the_module_s_own_inter_layer_dropout(cell):
    torch.manual_seed(0)
    # Dropout 1 zeroes every layer's input but the first's in both the fused module and the layers.
    model = Stacked(cell, True, False, False, True, dropout=1.0).train()
    (out, h), (out_l, h_l), _ = _run_both(model, torch.randn(3, 5, 4))
    torch.testing.assert_close(out_l, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_l, h, atol=1e-6, rtol=0)


def test_stacked_recurrent_layers_follow_new_weights_and_dispatch_what_the_fused_module_does():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = Stacked(nn.LSTM, True, False, False, False).eval()
    x = torch.randn(3, 5, 4)
    _run_both(model, x)  # builds the single-layer modules once
    model.rnn.weight_hh_l1 = nn.Parameter(torch.randn_like(model.rnn.weight_hh_l1))  # a weight replaced
    (out, h), (out_l, h_l), _ = _run_both(model, x)
    torch.testing.assert_close(out_l, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_l, h, atol=1e-6, rtol=0)
    with torch.no_grad():
        with Ops() as fused:
            model.rnn(x)
        capture = Capture(model, LAYERS)
        with capture.record(3):  # the first record copies every layer, to see which are overwritten later
            model.rnn(x)
        with capture.record(3), Ops() as by_layer:
            model.rnn(x)
        capture.remove()
    # No module is built per call (its meta-device init would dispatch empty/uniform_ ops), and
    # per layer the same kernel runs, with no copy between layers; what differs is ≤ 4 ops a
    # layer (its own zero states and final-state stacks, its output's batch-first view).
    assert by_layer.names.count("mkldnn_rnn_layer") == fused.names.count("mkldnn_rnn_layer") == 3
    assert "uniform_" not in by_layer.names and "empty" not in by_layer.names
    assert by_layer.names.count("clone") == fused.names.count("clone") == 1
    assert len(by_layer.names) <= len(fused.names) + 4 * 3, (by_layer.names, fused.names)


def test_stacked_recurrent_layers_train_with_one_target_forward_per_step():
    torch.manual_seed(0)
    target, guide = CountForwards(RecurrentLM(nn.GRU, True)), build("transformer_encoder", 1)
    rnn_calls = []
    target.model.rnn.register_forward_pre_hook(lambda m, a: rnn_calls.append(1))
    tokens = batch("tokens")
    guidance = rg.Guidance(target, guide, example_input=tokens)
    assert {p.target for p in guidance.pairs} == {"model.rnn.layer0", "model.rnn.layer1"}
    target.calls, rnn_calls[:] = 0, []  # the probing forwards of discovery do not count
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-2)
    before = target.model.rnn.weight_hh_l0.detach().clone()
    for step in range(3):
        out = guidance(tokens)
        optimizer.zero_grad()
        out.loss.backward()
        assert target.model.rnn.weight_hh_l0.grad.abs().sum() > 0  # layer 0 of the fused module
        optimizer.step()
        assert target.calls == rnn_calls.__len__() == step + 1
    assert not torch.equal(target.model.rnn.weight_hh_l0, before)


class _TransposedHead(nn.Module):
    """A sequence-first LSTM as users write it: the head's output is transposed back to batch-first."""

    def __init__(self):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(VOCAB, WIDTH), nn.LSTM(WIDTH, WIDTH, 3), nn.Linear(WIDTH, VOCAB)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x).transpose(0, 1))[0]).transpose(0, 1)


class _DictBlocks(nn.Module):
    """Residual blocks kept in an ``nn.ModuleDict``; the forward returns a dict."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB)
        self.blocks = nn.ModuleDict(
            {f"b{i}": nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.LayerNorm(WIDTH)) for i in range(3)}
        )

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks.values():
            h = h + block(h)
        return {"logits": self.head(h)}


class _BareLSTM(nn.Module):
    """A recurrent feature extractor with no head: its last layer's output is the model's output."""

    def __init__(self):
        super().__init__()
        self.embed, self.lstm = nn.Embedding(VOCAB, WIDTH), nn.LSTM(WIDTH, WIDTH, 3, batch_first=True)

    def forward(self, x):
        return self.lstm(self.embed(x))[0]


class _MnistExample(nn.Module):
    """PyTorch's MNIST example (pytorch/examples, mnist/main.py) as users copy it: log-softmax output."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, 1), nn.Conv2d(8, 16, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(16 * 6 * 6, 32), nn.Linear(32, CLASSES)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


class _TemperatureHead(nn.Module):
    """A classifier whose logits are divided by a temperature (calibration), as users write it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3 * 16 * 16, 32), nn.Linear(32, CLASSES)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1)))) / self.temperature


class _MultiLabel(nn.Module):
    """A multi-label classifier: a sigmoid per class on the head's logits."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, CLASSES)

    def forward(self, x):
        return torch.sigmoid(self.fc(F.relu(self.conv(x)).mean((2, 3))))


def _bare_bert():
    t = pytest.importorskip("transformers")
    return t.BertModel(t.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)


@pytest.mark.parametrize("factory, layers, head", [
    # a headless model's last block is a layer (Hugging Face's last hidden state), not a task head
    (_bare_bert, ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"], []),
    (_BareLSTM, ["lstm.layer0", "lstm.layer1", "lstm.layer2"], []),
    # the head is the head when the output is a view of it (a transpose back to batch-first)
    (_TransposedHead, ["lstm.layer0", "lstm.layer1", "lstm.layer2"], ["head"]),
    # blocks in an nn.ModuleDict are blocks too (not the leaves inside them)
    (_DictBlocks, ["blocks.b0", "blocks.b1", "blocks.b2"], []),
    # the head is the head when the model returns its log-softmax
    (_MnistExample, ["conv1", "conv2", "fc1"], ["fc2"]),
    # ... or its logits divided by a temperature, or a sigmoid of them
    (_TemperatureHead, ["fc1"], ["fc2"]),
    (_MultiLabel, ["conv"], ["fc"]),
])
def test_the_default_layers_of_models_written_outside_repguide(factory, layers, head):
    torch.manual_seed(0)
    model = factory()
    x = batch("images" if factory in (_MnistExample, _TemperatureHead, _MultiLabel) else "tokens")
    infos = rg.discover(model, x)
    assert [i.name for i in infos if not i.is_output] == layers
    assert [i.name for i in infos if i.is_output] == head
    guidance = rg.Guidance(factory(), model)
    out = guidance(x)
    assert [p.target for p in guidance.pairs] == [p.guide for p in guidance.pairs] == layers
    assert torch.isfinite(out.loss)
