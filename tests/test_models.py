"""Specification of repguide.models: every registered model builds, runs and trains at tiny size,
and the properties the paper's comparisons rely on hold (causality, untied layers, no skips)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from repguide import data, models
from repguide.models import create, list_models

VOCAB = 11
Inputs = Callable[[int], tuple[tuple[Tensor, ...], dict]]  # batch size → (args, kwargs)
Shape = Callable[[int], tuple[int, ...]]  # batch size → output shape


@dataclass
class Case:
    kwargs: dict
    inputs: Inputs
    out_shape: Shape


def _images(c: int, size: int) -> Inputs:
    return lambda n: ((torch.randn(n, c, size, size),), {})


def _tokens(vocab: int, t: int) -> Inputs:
    return lambda n: ((torch.randint(0, vocab, (n, t)),), {})


def _bits(t: int) -> Inputs:
    """Parity batches: bits padded with 2 after a random length (the first row is full)."""

    def make(n: int) -> tuple[tuple[Tensor, ...], dict]:
        lengths = torch.randint(1, t + 1, (n,))
        lengths[0] = t
        x = torch.randint(0, 2, (n, t)).masked_fill(torch.arange(t) >= lengths[:, None], 2)
        return (x,), {"lengths": lengths}

    return make


def _classes(k: int) -> Shape:
    return lambda n: (n, k)


def _logits(t: int, vocab: int) -> Shape:
    return lambda n: (n, t, vocab)


RNN = dict(embed_dim=8, hidden_dim=12)
# Tiny knobs per registry name. A newly registered model must be added here to be tested.
TINY: dict[str, Case] = {
    "deep_fcn": Case(dict(input_shape=(1, 8, 8), depth=3, width=16), _images(1, 8), _classes(10)),
    "wide_fcn": Case(dict(input_shape=(3, 4, 4), width=32), _images(3, 4), _classes(10)),
    "plain_convnet": Case(dict(arch="resnet18", width=4), _images(1, 16), _classes(10)),
    "resnet18": Case(dict(width=4, in_channels=3, num_classes=3), _images(3, 16), _classes(3)),
    "resnet50": Case(dict(width=4, num_classes=3), _images(1, 16), _classes(3)),
    "vit": Case(
        dict(image_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32, num_classes=3),
        _images(1, 8),
        _classes(3),
    ),
    "rnn_lm": Case(dict(vocab_size=VOCAB, **RNN), _tokens(VOCAB, 7), _logits(7, VOCAB)),
    "lstm_lm": Case(dict(vocab_size=VOCAB, **RNN), _tokens(VOCAB, 7), _logits(7, VOCAB)),
    "gru_lm": Case(dict(vocab_size=VOCAB, **RNN), _tokens(VOCAB, 7), _logits(7, VOCAB)),
    "transformer_lm": Case(
        dict(vocab_size=VOCAB, dim=16, depth=2, heads=2, max_len=16),
        _tokens(VOCAB, 7),
        _logits(7, VOCAB),
    ),
    "copy_rnn": Case(RNN, _tokens(14, 9), _logits(9, 14)),
    "copy_transformer": Case(dict(dim=16, depth=2, heads=2), _tokens(14, 9), _logits(9, 14)),
    "parity_rnn": Case(dict(embed_dim=4, hidden_dim=12), _bits(9), _classes(2)),
    "parity_transformer": Case(dict(dim=16, depth=2, heads=2), _bits(9), _classes(2)),
}


def _tiny(name: str) -> Case:
    assert name in TINY, f"add tiny knobs for the new model {name!r} to TINY in {__file__}"
    return TINY[name]


# --------------------------------------------------------------------------------------------
# Every registered model


def test_every_tiny_case_names_a_registered_model():
    assert sorted(TINY) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_model_forward_backward_gives_finite_gradients_to_every_parameter(name):
    torch.manual_seed(0)
    case = _tiny(name)
    model = create(name, **case.kwargs)
    args, kwargs = case.inputs(4)
    out = model(*args, **kwargs)
    assert out.shape == case.out_shape(4)
    out.float().square().mean().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_model_runs_on_a_batch_of_one_in_eval_mode(name):
    case = _tiny(name)
    model = create(name, **case.kwargs).eval()
    args, kwargs = case.inputs(1)
    with torch.no_grad():
        assert model(*args, **kwargs).shape == case.out_shape(1)


@pytest.mark.parametrize("name", list_models())
def test_every_module_runs_exactly_once_per_forward(name):
    # Forward hooks identify a layer by its dotted name; a module applied twice (a shared
    # activation, or the official code's one block repeated) would make that name ambiguous.
    case = _tiny(name)
    model = create(name, **case.kwargs)
    # A ModuleList is a container that is never called itself.
    calls = {n: 0 for n, m in model.named_modules() if not isinstance(m, nn.ModuleList)}

    def count(module_name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            calls[module_name] += 1

        return hook

    for module_name, module in model.named_modules():
        if module_name in calls:
            module.register_forward_hook(count(module_name))
    args, kwargs = case.inputs(2)
    model(*args, **kwargs)
    assert {n: c for n, c in calls.items() if c != 1} == {}


# --------------------------------------------------------------------------------------------
# Registry


def test_unknown_model_name_error_names_the_closest_match():
    with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
        create("resnet19")


def test_create_passes_keyword_arguments_to_the_factory():
    model = create("deep_fcn", input_shape=(2, 3, 3), depth=2, width=7, num_classes=4)
    assert model.blocks[0].linear.in_features == 18
    assert model.blocks[1].linear.out_features == 7
    assert model.head.out_features == 4


def test_accepted_kwargs_lists_the_factory_knobs():
    assert models.accepted_kwargs("parity_rnn") == {
        "vocab_size", "embed_dim", "hidden_dim", "num_layers", "dropout", "cell", "pad_id", "initial_state",
        "packed", "fused",
    }
    assert "num_classes" in models.accepted_kwargs("resnet18")
    with pytest.raises(ValueError, match="Did you mean 'vit'"):
        models.accepted_kwargs("vitt")


def test_required_kwargs_are_the_knobs_without_a_default_in_the_builder_or_the_name():
    assert models.required_kwargs("gru_lm") == {"vocab_size"}
    with models.MODELS.restore_on_exit():
        models.register("two_knobs", lambda a, b=1, *, c: nn.Linear(a, c), c=3)
        assert models.required_kwargs("two_knobs") == {"a"}


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError, match="already registered"):
        models.register("deep_fcn")(models.deep_fcn)


def test_list_models_is_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert {"deep_fcn", "resnet18", "plain_convnet", "transformer_lm", "parity_rnn"} <= set(names)


# --------------------------------------------------------------------------------------------
# Fully connected networks


@pytest.mark.parametrize("depth", [1, 5, 48])
def test_deep_fcn_depth_counts_hidden_linear_layers(depth):
    model = models.deep_fcn(input_shape=(1, 4, 4), depth=depth, width=8)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth + 1


def test_fcn_blocks_have_readable_names_and_optional_parts():
    names = dict(models.deep_fcn(depth=2, width=8).named_modules())
    assert {"blocks.0.linear", "blocks.0.norm", "blocks.0.act", "blocks.0.drop"} <= names.keys()
    assert "blocks.1.linear" in names and "head" in names
    plain = dict(models.wide_fcn(width=8, batchnorm=False, dropout=0.0).named_modules())
    assert "blocks.0.norm" not in plain and "blocks.0.drop" not in plain


# --------------------------------------------------------------------------------------------
# ResNets and the plain ConvNet


def _zero_conv_path(block: models.ResNetBlock) -> models.ResNetBlock:
    with torch.no_grad():
        for i in range(1, block.num_convs + 1):
            getattr(block, f"conv{i}").weight.zero_()
    return block.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_plain_convnet_block_is_its_conv_path_alone(arch):
    # With the conv weights zeroed (and BN at init in eval mode) the conv path outputs 0, so any
    # nonzero output could only come through a skip connection.
    model = models.plain_convnet(arch=arch, width=4)
    block = _zero_conv_path(model.layer1[1])
    x = torch.randn(2, block.out_channels, 6, 6)
    assert torch.equal(block(x), torch.zeros_like(x))
    assert not any(name.endswith("downsample") for name, _ in model.named_modules())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_block_adds_its_skip_connection(arch):
    model = getattr(models, arch)(width=4)
    block = _zero_conv_path(model.layer1[1])
    x = torch.randn(2, block.out_channels, 6, 6)
    assert torch.equal(block(x), torch.relu(x))


@pytest.mark.parametrize(
    ("name", "kwargs", "convs"),
    [("resnet18", {}, 20), ("resnet50", {}, 53), ("plain_convnet", {"arch": "resnet50"}, 49)],
)
def test_conv_layer_counts_match_the_paper(name, kwargs, convs):
    # ResNet-18 has 3 downsample projections, ResNet-50 has 4, the plain ConvNet none (paper §2.1).
    model = create(name, width=4, **kwargs)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs


def test_resnets_match_torchvision_parameter_counts_at_imagenet_size():
    kw = dict(in_channels=3, num_classes=1000, small_input=False)
    assert sum(p.numel() for p in models.resnet18(**kw).parameters()) == 11_689_512
    assert sum(p.numel() for p in models.resnet50(**kw).parameters()) == 25_557_032
    # The official NoResNet-50 (the paper's plain ConvNet).
    assert sum(p.numel() for p in models.plain_convnet(**kw).parameters()) == 22_780_456


def test_imagenet_stem_downsamples_by_four():
    model = models.resnet18(width=4, small_input=False)
    stem = model.maxpool(model.act1(model.bn1(model.conv1(torch.randn(1, 1, 32, 32)))))
    assert model.conv1.kernel_size == (7, 7)
    assert stem.shape[-2:] == (8, 8)


# --------------------------------------------------------------------------------------------
# Sequence models: causality


def _future_token_changes(model: nn.Module, vocab: int, t_change: int) -> tuple[Tensor, Tensor]:
    """Logits for a batch and for the same batch with token ``t_change`` replaced."""
    torch.manual_seed(1)
    x = torch.randint(0, vocab, (3, 10))
    x2 = x.clone()
    x2[:, t_change] = (x[:, t_change] + 1) % vocab
    model.eval()
    with torch.no_grad():
        return model(x), model(x2)


CAUSAL_LMS = {
    "transformer_lm (learned positions)": lambda: models.transformer_lm(
        VOCAB, dim=16, depth=3, heads=2
    ),
    "transformer_lm (sinusoidal positions)": lambda: models.transformer_lm(
        VOCAB, dim=16, depth=3, heads=2, positions="sinusoidal"
    ),
    "rnn_lm": lambda: models.rnn_lm(VOCAB, embed_dim=8, hidden_dim=12, num_layers=3),
    "lstm_lm": lambda: models.lstm_lm(VOCAB, embed_dim=8, hidden_dim=12, num_layers=3),
    "gru_lm": lambda: models.gru_lm(VOCAB, embed_dim=8, hidden_dim=12, num_layers=2),
    "transformer_lm (official switches)": lambda: models.transformer_lm(
        VOCAB, dim=16, depth=3, heads=2, norm="post", scale_embeddings=True, init="torch"
    ),
    "transformer_lm (causal memory)": lambda: models.transformer_lm(
        VOCAB, dim=16, depth=3, heads=2, norm="post", memory="causal"
    ),
}


@pytest.mark.parametrize("build", CAUSAL_LMS.values(), ids=CAUSAL_LMS.keys())
@pytest.mark.parametrize("t", [0, 4, 9])
def test_language_model_output_depends_only_on_past_and_current_tokens(build, t):
    torch.manual_seed(0)
    out, out_changed = _future_token_changes(build(), VOCAB, t)
    assert torch.allclose(out[:, :t], out_changed[:, :t], atol=1e-6, rtol=0)
    # Every later position sees the change (so this test can fail).
    for pos in range(t, out.shape[1]):
        changed = not torch.allclose(out[:, pos], out_changed[:, pos], atol=1e-6, rtol=0)
        assert changed, f"output at position {pos} ignores the token at {t}"


def test_recurrent_lm_stacks_separate_single_layer_tanh_rnns():
    model = models.rnn_lm(VOCAB, embed_dim=8, hidden_dim=12, num_layers=3)
    assert [type(layer) for layer in model.layers] == [nn.RNN] * 3
    assert all(layer.num_layers == 1 and layer.nonlinearity == "tanh" for layer in model.layers)
    assert all(type(layer) is nn.LSTM for layer in models.lstm_lm(VOCAB, num_layers=2).layers)
    assert all(type(layer) is nn.GRU for layer in models.gru_lm(VOCAB, num_layers=2).layers)


def test_unknown_cell_raises():
    with pytest.raises(ValueError, match="cell must be one of"):
        models.rnn_lm(VOCAB, cell="elman")


def _reference_stack(model: nn.Module, x: Tensor, cell: str, carry: bool) -> tuple[Tensor, list]:
    """The top layer's outputs and each layer's initial state, from a loop of nn.*Cell steps holding
    the model's weights: layer k+1 starts from layer k's final state when ``carry``, else from zeros."""
    cells = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
    h_seq = model.embed(x)
    n, hidden = x.shape[0], model.layers[0].hidden_size
    zeros = torch.zeros(n, hidden, dtype=h_seq.dtype)
    state = (zeros, zeros) if cell == "lstm" else zeros
    starts = []
    for layer in model.layers:
        step = cells[cell](layer.input_size, hidden).to(h_seq.dtype)
        step.load_state_dict({k.removesuffix("_l0"): v for k, v in layer.state_dict().items()})
        if not carry:
            state = (zeros, zeros) if cell == "lstm" else zeros
        starts.append(state)
        outputs = []
        for t in range(x.shape[1]):
            state = step(h_seq[:, t], state)
            outputs.append(state[0] if cell == "lstm" else state)
        h_seq = torch.stack(outputs, 1)
    return h_seq, starts


RECURRENT_LMS = {"rnn": models.rnn_lm, "lstm": models.lstm_lm, "gru": models.gru_lm}


@pytest.mark.parametrize("cell", RECURRENT_LMS)
def test_default_initial_state_is_zeros_for_every_layer(cell):
    torch.manual_seed(0)
    default = RECURRENT_LMS[cell](VOCAB, embed_dim=8, hidden_dim=12, num_layers=3).double().eval()
    torch.manual_seed(0)
    zeros = RECURRENT_LMS[cell](VOCAB, embed_dim=8, hidden_dim=12, num_layers=3, initial_state="zeros").double().eval()
    assert default.initial_state == "zeros"
    x = torch.randint(0, VOCAB, (4, 9))
    with torch.no_grad():
        out = default(x)
        assert torch.equal(out, zeros(x))
        reference, _ = _reference_stack(default, x, cell, carry=False)
        # Bitwise what the model computed before initial_state existed: each layer called without a state.
        h = default.embed(x)
        for layer in default.layers:
            h, _ = layer(h)
        assert torch.equal(out, default.head(h))
    assert torch.allclose(out, default.head(reference), atol=1e-10, rtol=0)


@pytest.mark.parametrize("cell", RECURRENT_LMS)
def test_carried_initial_state_starts_each_layer_from_the_one_below_s_final_state(cell):
    torch.manual_seed(0)
    model = RECURRENT_LMS[cell](VOCAB, embed_dim=8, hidden_dim=12, num_layers=3, initial_state="carry")
    model = model.double().eval()
    x = torch.randint(0, VOCAB, (4, 9))
    seen: dict[str, object] = {}
    model.layers[0].register_forward_hook(lambda m, args, out: seen.update(final0=out[1]))  # None: output kept
    model.layers[1].register_forward_pre_hook(lambda m, args: seen.update(start1=args[1]))
    with torch.no_grad():
        out = model(x)
        reference, starts = _reference_stack(model, x, cell, carry=True)
    assert torch.allclose(out, model.head(reference), atol=1e-10, rtol=0)
    final0, start1 = seen["final0"], seen["start1"]
    pairs = zip(final0, start1) if cell == "lstm" else [(final0, start1)]  # (h, c) for an LSTM
    for final, start in pairs:
        assert torch.equal(final, start)
    # The reference's own layer-1 start is layer 0's last step, and it is not zero.
    ref_h1 = starts[1][0] if cell == "lstm" else starts[1]
    assert torch.allclose(start1[0][0] if cell == "lstm" else start1[0], ref_h1, atol=1e-10, rtol=0)
    assert ref_h1.abs().sum() > 0


@pytest.mark.parametrize("cell", RECURRENT_LMS)
def test_carried_state_leaks_later_tokens_into_position_0_and_zeros_do_not(cell):
    for initial_state, leaks in (("carry", True), ("zeros", False)):
        torch.manual_seed(0)
        model = RECURRENT_LMS[cell](VOCAB, embed_dim=8, hidden_dim=12, num_layers=2, initial_state=initial_state)
        out, out_changed = _future_token_changes(model, VOCAB, 9)
        moved = not torch.allclose(out[:, 0], out_changed[:, 0], atol=1e-6, rtol=0)
        assert moved == leaks, initial_state


@pytest.mark.parametrize("name", ["rnn_lm", "lstm_lm", "gru_lm", "copy_rnn", "parity_rnn"])
def test_every_recurrent_builder_takes_initial_state_and_calls_each_layer_once(name):
    case = _tiny(name)
    model = create(name, **case.kwargs, num_layers=3, initial_state="carry")
    assert model.initial_state == "carry"
    calls = {k: 0 for k in range(3)}
    for k, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    args, kwargs = case.inputs(2)
    model(*args, **kwargs)
    assert calls == {0: 1, 1: 1, 2: 1}


def test_an_unknown_initial_state_names_the_option_and_its_values():
    from repguide.errors import ModelError

    for name in ("rnn_lm", "lstm_lm", "gru_lm", "copy_rnn", "parity_rnn"):
        with pytest.raises(ModelError, match="initial_state must be one of 'zeros', 'carry', got 'final'"):
            create(name, **_tiny(name).kwargs, initial_state="final")


def test_a_recipe_sets_initial_state_through_model_kwargs():
    from repguide.build import build_model
    from repguide.config import load_recipe

    config = load_recipe("copy_rnn_baseline", "tiny", {"model.kwargs.initial_state": "carry"})
    splits = data.create(config.data.name, **config.data.kwargs)
    assert build_model(config.model, splits, 0).initial_state == "carry"
    assert build_model(load_recipe("copy_rnn_baseline", "tiny").model, splits, 0).initial_state == "zeros"


# --------------------------------------------------------------------------------------------
# Sequence models: the official parity guide's switches (packed, fused)


def _padded_bits(lengths: list[int], t: int) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor(lengths)
    return torch.randint(0, 2, (len(lengths), t)).masked_fill(torch.arange(t) >= lengths[:, None], 2), lengths


def _each_string_alone(model: nn.Module, x: Tensor, lengths: Tensor) -> list[Tensor]:
    """Independent reference for ``packed``: each string's top-layer outputs ``(L, hidden)``, from
    its L valid tokens alone (no padding, no packing) through the model's own modules."""
    modules = [model.rnn] if model.fused else list(model.layers)
    outputs = []
    for row, length in zip(x, lengths.tolist()):
        h, state = model.embed(row[None, :length]), None
        for module in modules:
            h, final = module(h) if state is None else module(h, state)
            state = final if model.initial_state == "carry" else None
        outputs.append(h[0])
    return outputs


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("switches", [dict(), dict(initial_state="carry"), dict(fused=True)], ids=str)
def test_packed_parity_rnn_equals_each_string_run_alone_and_is_zero_past_its_length(cell, switches):
    torch.manual_seed(0)
    model = models.parity_rnn(embed_dim=4, hidden_dim=6, num_layers=3, cell=cell, packed=True, **switches)
    model = model.double().eval()
    x, lengths = _padded_bits([1, 4, 9, 6], 9)
    with torch.no_grad():
        h, logits = model.features(x, lengths), model(x, lengths)
        reference = _each_string_alone(model, x, lengths)
    assert h.shape == (4, 9, 6)
    for i, (ref, length) in enumerate(zip(reference, lengths.tolist())):
        assert torch.allclose(h[i, :length], ref, atol=1e-10, rtol=0)
        assert torch.equal(h[i, length:], torch.zeros_like(h[i, length:]))
        assert torch.allclose(logits[i], model.head(ref[-1]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("switches", [dict(), dict(initial_state="carry"), dict(fused=True)], ids=str)
def test_packed_parity_logits_ignore_the_padding_tokens_and_unpacked_carry_does_not(switches):
    torch.manual_seed(0)
    x, lengths = _padded_bits([1, 4, 9, 6], 9)
    garbage = torch.where(torch.arange(9) >= lengths[:, None], torch.randint(0, 2, (4, 9)), x)
    for packed in (True, False):
        torch.manual_seed(1)
        model = models.parity_rnn(embed_dim=4, hidden_dim=6, num_layers=2, packed=packed, **switches).eval()
        with torch.no_grad():
            same = torch.allclose(model(x, lengths), model(garbage, lengths), atol=1e-6, rtol=0)
        # Unpacked, only the carried state runs through the padding into the read-out.
        assert same == (packed or switches.get("initial_state") != "carry"), packed


def _fused_from(unfused: nn.Module, **kwargs: object) -> nn.Module:
    """The fused twin of ``unfused``: ``layers.k.weight_ih_l0`` → ``rnn.weight_ih_l{k}`` and so on."""
    fused = type(unfused)(**kwargs, fused=True)
    renamed = {re.sub(r"^layers\.(\d+)\.(\w+)_l0$", r"rnn.\2_l\1", k): v for k, v in unfused.state_dict().items()}
    fused.load_state_dict(renamed)  # strict: every fused weight has its unfused counterpart
    return fused


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_layers_compute_what_the_separate_layers_compute_from_the_same_weights(cell):
    torch.manual_seed(0)
    lm_kwargs = dict(vocab_size=VOCAB, embed_dim=8, hidden_dim=12, num_layers=3, dropout=0.2, cell=cell)
    lm = models.RecurrentLM(**lm_kwargs)
    fused_lm = _fused_from(lm, **lm_kwargs)
    assert type(fused_lm.rnn) is type(lm.layers[0]) and fused_lm.rnn.num_layers == 3
    assert fused_lm.rnn.dropout == 0.2 and not hasattr(fused_lm, "layers")
    x = torch.randint(0, VOCAB, (4, 9))
    parity_kwargs = dict(embed_dim=4, hidden_dim=6, num_layers=3, cell=cell, packed=True)
    parity = models.ParityRNN(**parity_kwargs)
    fused_parity = _fused_from(parity, **parity_kwargs)
    bits, lengths = _padded_bits([1, 4, 9, 6], 9)
    with torch.no_grad():
        assert torch.allclose(fused_lm.eval()(x), lm.eval()(x), atol=1e-6, rtol=0)
        assert torch.allclose(fused_parity.eval()(bits, lengths), parity.eval()(bits, lengths), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["rnn_lm", "lstm_lm", "gru_lm", "copy_rnn", "parity_rnn"])
def test_fused_with_a_carried_state_is_refused_naming_both_keys(name):
    from repguide.errors import ModelError

    with pytest.raises(ModelError, match="initial_state='carry' cannot go with fused=True"):
        create(name, **_tiny(name).kwargs, fused=True, initial_state="carry")
    assert create(name, **_tiny(name).kwargs, fused=True).fused


def test_packed_and_fused_are_parity_rnn_switches_only_and_off_by_default():
    assert {"packed", "fused"} <= models.accepted_kwargs("parity_rnn")
    for name in ("rnn_lm", "lstm_lm", "gru_lm", "copy_rnn"):
        assert "fused" in models.accepted_kwargs(name) and "packed" not in models.accepted_kwargs(name)
    default = models.parity_rnn()
    assert not default.packed and not default.fused
    # The default's state_dict is what it was before the switches existed.
    layer = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert list(default.state_dict()) == (
        ["embed.weight"] + [f"layers.{i}.{p}" for i in range(2) for p in layer] + ["head.weight", "head.bias"]
    )
    torch.manual_seed(0)
    off = models.parity_rnn(packed=False, fused=False)
    torch.manual_seed(0)
    plain = models.parity_rnn()
    x, lengths = _padded_bits([1, 4, 9, 6], 9)
    assert torch.equal(off(x, lengths), plain(x, lengths))


@pytest.mark.parametrize("fused", [False, True])
def test_a_packed_parity_rnn_runs_each_recurrent_module_once_on_a_packed_sequence(fused):
    model = models.parity_rnn(embed_dim=4, hidden_dim=6, num_layers=3, packed=True, fused=fused)
    inputs = []
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.register_forward_pre_hook(lambda m, args: inputs.append(type(args[0])))
    model(*_padded_bits([1, 4, 9, 6], 9))
    assert inputs == [PackedSequence] * (1 if fused else 3)


@pytest.mark.parametrize("fused", [False, True])
def test_guidance_captures_a_packed_parity_rnn_s_layers_as_zero_past_each_length(fused):
    import repguide as rg
    from repguide.capture import Capture

    torch.manual_seed(0)
    guide = models.parity_rnn(embed_dim=4, hidden_dim=6, num_layers=3, packed=True, fused=fused).eval()
    x, lengths = _padded_bits([9, 4, 1, 6], 9)
    names = [f"rnn.layer{i}" for i in range(3)] if fused else [f"layers.{i}" for i in range(3)]
    assert [info.name for info in rg.capture.discover(guide, x, lengths)][:3] == names
    capture = Capture(guide, names)
    with torch.no_grad(), capture.record(4) as acts:
        guide(x, lengths)
    for name in names:
        assert acts[name].shape == (4, 9, 6)
        assert (acts[name].abs().sum(-1) > 0).equal(torch.arange(9) < lengths[:, None]), name
    target = models.parity_transformer(dim=16, depth=2, heads=2)
    guidance = rg.Guidance(target, guide, pairs=[("blocks.0.attn.qkv", names[0])], example_input=(x, lengths))
    out = guidance(x, lengths)
    assert out.output.shape == (4, 2) and torch.isfinite(out.loss) and len(out.similarities) == 1


def test_transformer_lm_rejects_sequences_longer_than_max_len():
    model = models.transformer_lm(VOCAB, dim=16, depth=1, heads=2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Sequence models: Transformer weights


def _block_params(model: nn.Module) -> list[list[Tensor]]:
    return [list(block.parameters()) for block in model.blocks]


def test_transformer_layers_have_their_own_weights_by_default():
    blocks = _block_params(models.transformer_lm(VOCAB, dim=16, depth=3, heads=2))
    ptrs = [{p.data_ptr() for p in params} for params in blocks]
    for i in range(len(ptrs)):
        for j in range(i + 1, len(ptrs)):
            assert not ptrs[i] & ptrs[j], f"blocks {i} and {j} share a parameter"


@pytest.mark.parametrize("name", ["transformer_lm", "copy_transformer", "parity_transformer"])
def test_tied_transformer_layers_share_every_weight_but_stay_distinct_modules(name):
    kwargs = dict(TINY[name].kwargs, depth=3, tie_layers=True)
    model = create(name, **kwargs)
    blocks = _block_params(model)
    for params in blocks[1:]:
        assert [p.data_ptr() for p in params] == [p.data_ptr() for p in blocks[0]]
    assert len({id(block) for block in model.blocks}) == 3
    untied = create(name, **dict(kwargs, tie_layers=False))
    per_block = sum(p.numel() for p in blocks[0])
    saved = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters())
    assert saved == 2 * per_block


def test_transformer_lm_init_layernorm_gains_one_and_linear_std_002():
    model = models.transformer_lm(VOCAB, dim=64, depth=2, heads=4)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))


def test_post_norm_block_equals_torch_encoder_layer_with_the_same_weights():
    """Independent reference: PyTorch's post-LN ``nn.TransformerEncoderLayer`` (GELU, causal mask)."""
    torch.manual_seed(0)
    dim, heads, mlp = 16, 2, 32
    ours = models.transformer_lm(VOCAB, dim=dim, depth=1, heads=heads, mlp_dim=mlp, norm="post").blocks[0]
    ref = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(ours.attn.proj.bias)
        ref.linear1.load_state_dict(ours.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(ours.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(3, 7, dim)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x, src_mask=mask, is_causal=True), atol=1e-5)


def test_relu_block_mlp_is_fc2_of_relu_of_fc1_and_gelu_stays_the_default():
    torch.manual_seed(0)
    relu = models.transformer_lm(VOCAB, dim=16, depth=1, heads=2, activation="relu").blocks[0].mlp
    assert type(relu.act) is nn.ReLU
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.equal(relu(x), relu.fc2(torch.clamp(relu.fc1(x), min=0)))
    torch.manual_seed(0)
    default = models.transformer_lm(VOCAB, dim=16, depth=2, heads=2)
    torch.manual_seed(0)
    gelu = models.transformer_lm(VOCAB, dim=16, depth=2, heads=2, activation="gelu")
    assert type(default.blocks[0].mlp.act) is nn.GELU
    assert [n for n, _ in default.blocks[0].mlp.named_children()] == ["fc1", "act", "fc2", "drop"]
    assert list(default.state_dict()) == list(gelu.state_dict())
    tokens = torch.randint(0, VOCAB, (3, 7))
    assert torch.equal(default(tokens), gelu(tokens))


def test_post_norm_relu_parity_block_equals_torch_s_default_encoder_layer_on_the_valid_positions():
    """Independent reference: ``nn.TransformerEncoderLayer`` with its defaults (post-LN, ReLU), the
    official parity Transformer's layer, bidirectional with a key-padding mask."""
    torch.manual_seed(0)
    dim, heads, mlp = 16, 2, 32
    model = models.parity_transformer(dim=dim, depth=1, heads=heads, mlp_dim=mlp, norm="post", activation="relu")
    ours = model.blocks[0]
    ref = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, batch_first=True)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(ours.attn.proj.state_dict())
        for mine, theirs in (("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"), ("norm1", "norm1"), ("norm2", "norm2")):
            ref.get_submodule(theirs).load_state_dict(ours.get_submodule(mine).state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(4, 9, dim)
    valid = torch.arange(9) < torch.tensor([1, 4, 9, 6])[:, None]
    assert torch.allclose(ours(x, valid)[valid], ref(x, src_key_padding_mask=~valid)[valid], atol=1e-5)


@pytest.mark.parametrize("name", ["transformer_lm", "copy_transformer", "parity_transformer"])
def test_every_transformer_builder_takes_activation_and_refuses_an_unknown_one(name):
    from repguide.errors import ModelError

    model = create(name, **TINY[name].kwargs, activation="relu")
    assert all(type(block.mlp.act) is nn.ReLU for block in model.blocks)
    with pytest.raises(ModelError, match="activation must be one of 'gelu', 'relu', got 'tanh'"):
        create(name, **TINY[name].kwargs, activation="tanh")


def test_official_switches_scale_embeddings_keep_torch_init_and_drop_the_final_norm():
    torch.manual_seed(0)
    small = models.copy_transformer(dim=64)
    official = models.copy_transformer(dim=64, norm="post", scale_embeddings=True, init="torch")
    assert isinstance(official.norm, nn.Identity) and isinstance(small.norm, nn.LayerNorm)
    assert official.embed_scale == 8.0 and small.embed_scale == 1.0
    # PyTorch's init: N(0, 1) embeddings, Kaiming-uniform Linear weights (std 1/sqrt(3 * fan_in)).
    assert abs(official.embed.weight.std().item() - 1.0) < 0.1
    qkv = official.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - (3 * 64) ** -0.5) < 0.01 and qkv.std().item() > 2 * 0.02
    with pytest.raises(ValueError, match="norm must be one of 'pre', 'post'"):
        models.copy_transformer(norm="sandwich")
    with pytest.raises(ValueError, match="init must be one of 'small', 'torch'"):
        models.copy_transformer(init="xavier")


def test_unmasked_memory_lets_an_early_position_see_a_later_token_as_the_official_guide_did():
    torch.manual_seed(0)
    model = models.transformer_lm(VOCAB, dim=16, depth=2, heads=2, memory="unmasked")
    out, out_changed = _future_token_changes(model, VOCAB, 9)
    assert not torch.allclose(out[:, 0], out_changed[:, 0], atol=1e-6, rtol=0)
    assert [n for n, _ in model.blocks[0].named_children()][-2:] == ["norm_cross", "cross"]
    with pytest.raises(ValueError, match="memory must be one of 'none', 'causal', 'unmasked'"):
        models.copy_transformer(memory="full")


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible"):
        models.transformer_lm(VOCAB, dim=30, heads=4)


def test_transformer_blocks_have_named_parts():
    model = models.transformer_lm(VOCAB, dim=16, depth=2, heads=2)
    names = {name for name, _ in model.named_modules()}
    for i in range(2):
        assert {f"blocks.{i}.{part}" for part in ("attn", "mlp", "norm1", "norm2")} <= names
    assert {"embed", "pos", "norm", "head"} <= names


# --------------------------------------------------------------------------------------------
# Parity models


@pytest.mark.parametrize("name", ["parity_rnn", "parity_transformer"])
def test_parity_logits_ignore_tokens_beyond_each_length(name):
    torch.manual_seed(0)
    model = create(name, **TINY[name].kwargs).eval()
    lengths = torch.tensor([1, 4, 9, 6])
    x = torch.randint(0, 2, (4, 9)).masked_fill(torch.arange(9) >= lengths[:, None], 2)
    garbage = torch.where(torch.arange(9) >= lengths[:, None], torch.randint(0, 3, (4, 9)), x)
    with torch.no_grad():
        out, out_garbage = model(x, lengths=lengths), model(garbage, lengths=lengths)
        # A change inside the valid part must move the logits (so the test can fail).
        flipped = x.clone()
        flipped[:, 0] = 1 - flipped[:, 0]
        out_flipped = model(flipped, lengths=lengths)
    assert not torch.equal(x, garbage)
    assert torch.allclose(out, out_garbage, atol=1e-6, rtol=0)
    assert not torch.allclose(out, out_flipped, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["parity_rnn", "parity_transformer"])
def test_parity_without_lengths_treats_every_sequence_as_full(name):
    model = create(name, **TINY[name].kwargs).eval()
    x = torch.randint(0, 2, (3, 9))
    with torch.no_grad():
        assert torch.equal(model(x), model(x, lengths=torch.full((3,), 9)))


@pytest.mark.parametrize("name", ["parity_rnn", "parity_transformer"])
@pytest.mark.parametrize("lengths", [[0, 3], [3, 10]])
def test_parity_rejects_lengths_outside_the_sequence(name, lengths):
    model = create(name, **TINY[name].kwargs)
    with pytest.raises(ValueError, match="lengths must lie in"):
        model(torch.zeros(2, 9, dtype=torch.long), lengths=torch.tensor(lengths))


# --------------------------------------------------------------------------------------------
# Vision Transformer


def test_vit_blocks_are_named_and_input_size_is_checked():
    model = models.vit(image_size=8, patch_size=4, dim=16, depth=3, heads=2, mlp_dim=32)
    names = {name for name, _ in model.named_modules()}
    assert {"patch_embed", "blocks.0", "blocks.2", "norm", "head"} <= names
    with pytest.raises(ValueError, match="8×8"):
        model(torch.randn(1, 1, 12, 12))
