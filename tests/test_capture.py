import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import repguide as rg
from repguide.capture import Capture, reduce


class TinyCNNInOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(torch.relu(self.conv2(x)))).flatten(1))


def test_layers_are_listed_in_execution_order():
    model = TinyCNNInOrder()
    assert rg.layers(model, torch.randn(5, 1, 8, 8)) == ["conv2", "conv1", "fc"]


def test_discover_marks_the_output_head():
    infos = rg.discover(TinyCNNInOrder(), torch.randn(5, 1, 8, 8))
    assert [i.is_output for i in infos] == [False, False, True]
    assert infos[0].shape == (5, 4, 8, 8)


def test_discovery_leaves_batchnorm_statistics_and_rng_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    rg.layers(model, x)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class LM(nn.Module):
    def __init__(self, cell, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(11, 8)
        self.rnn = cell(8, 12, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(12, 11)

    def forward(self, x):
        h = self.emb(x)
        out, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        return self.head(out if self.batch_first else out.transpose(0, 1))


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers_give_batch_first_sequences(cell, batch_first):
    model = LM(cell, batch_first)
    infos = {i.name: i for i in rg.discover(model, torch.randint(0, 11, (3, 7)))}
    assert list(infos) == ["rnn.layer0", "rnn.layer1", "head"]  # every layer of the stacked module
    assert infos["rnn.layer0"].shape == infos["rnn.layer1"].shape == (3, 7, 12)
    assert infos["head"].is_output
    assert rg.discover(model, torch.randint(0, 11, (3, 7)), layers="leaves")[0].shape == (3, 7, 12)


def test_packed_sequences_are_unpacked_batch_first():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)

        def forward(self, x, lengths):
            out, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return h[-1]

    model = Packed()
    infos = rg.discover(model, torch.randn(3, 5, 4), lengths=torch.tensor([5, 2, 3]))
    assert infos[0].name == "rnn" and infos[0].shape == (3, 5, 6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_and_transformer_layers_give_batch_first_outputs(batch_first):
    n, t, d = 3, 5, 8
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, 2, 16, batch_first=batch_first), 2, enable_nested_tensor=False
    )
    x = torch.randn(n, t, d) if batch_first else torch.randn(t, n, d)
    infos = rg.discover(enc, x, layers="leaves", input_batch_axis=0 if batch_first else 1)
    names = [i.name for i in infos]
    assert names == [
        "layers.0.self_attn", "layers.0.linear1", "layers.0.linear2", "layers.0",
        "layers.1.self_attn", "layers.1.linear1", "layers.1.linear2", "layers.1",
    ]
    assert infos[1].shape == (n, t, 16)
    assert all(i.shape[0] == n for i in infos)


def test_decoder_layers_are_captured():
    dec = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)
    mem = torch.randn(3, 4, 8)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = dec

        def forward(self, x):
            return self.dec(x, mem)

    names = rg.layers(Wrap(), torch.randn(3, 6, 8))
    assert names[-1] == "dec" and "dec.multihead_attn" in names


class SeqFirstLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):  # x: (T, N, d) with T == N == d
        return self.lin(x).sum()


def test_probing_finds_the_batch_axis_even_when_other_axes_have_the_batch_size():
    x = torch.randn(4, 4, 4)
    assert rg.discover(SeqFirstLinear(), x, input_batch_axis=1)[0].batch_axis == 1
    assert rg.discover(SeqFirstLinear(), x)[0].batch_axis == 0


def test_ambiguous_batch_axis_without_probing_is_an_error_that_says_how_to_name_it():
    model = SeqFirstLinear()
    capture = Capture(model, ["lin"])
    with pytest.raises(ValueError, match=r"batch_axes=\{'lin'"):
        with capture.record(4):
            model(torch.randn(4, 4, 4))
    capture = Capture(model, ["lin"], batch_axes={"lin": 1})
    with capture.record(4) as acts:
        model(torch.randn(4, 4, 4))
    assert acts["lin"].shape == (4, 4, 4)


def test_modules_called_twice_are_named_by_call_index():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x):
            return self.block(torch.relu(self.block(x)))

    assert rg.layers(Shared(), torch.randn(3, 4)) == ["block", "block@1"]


def test_user_modules_and_mapping_outputs_can_be_captured():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return {"hidden": self.lin(x), "aux": None}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)["hidden"].sum(1)

    assert rg.layers(Net(), torch.randn(3, 4), types=(Block,)) == ["block"]
    assert "block" in rg.layers(Net(), torch.randn(3, 4), types="all")


def test_capture_records_only_inside_record_and_checks_completeness():
    model = TinyCNNInOrder()
    capture = Capture(model, ["conv1", "fc"])
    model(torch.randn(2, 1, 8, 8))
    with capture.record(2) as acts:
        model(torch.randn(2, 1, 8, 8))
    assert set(acts) == {"conv1", "fc"} and acts["conv1"].shape == (2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="did not run"):
        capture.check_complete({"fc": acts["fc"]}, "target")


def test_capture_of_an_unknown_layer_names_the_closest_ones():
    with pytest.raises(ValueError, match="Closest: conv1"):
        Capture(TinyCNNInOrder(), ["conv_1"])


def test_reductions():
    seq = torch.randn(3, 5, 4)
    assert reduce(seq, "flatten").shape == (3, 20)
    assert torch.allclose(reduce(seq, "mean"), seq.mean(1))
    assert reduce(seq, "tokens").shape == (3, 5, 4)
    conv = torch.randn(3, 6, 2, 2)
    assert torch.allclose(reduce(conv, "mean", channels_first=True), conv.mean((2, 3)))
    assert torch.equal(reduce(conv, "tokens", channels_first=True)[:, 1], conv[:, :, 0, 1])
    with pytest.raises(ValueError, match="positions"):
        reduce(torch.randn(3, 4), "tokens")
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce(seq, "max")


def test_two_dimensional_and_conv_outputs_take_axis_0_when_sizes_coincide():
    # width == batch size: (n, d) outputs and conv maps are batch-first by PyTorch's definition
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert rg.discover(mlp, torch.randn(8, 8))[0].shape == (8, 8)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
    assert rg.discover(cnn, torch.randn(8, 1, 8, 8))[0].shape == (8, 8, 8, 8)
