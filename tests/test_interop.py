"""repguide with other libraries' models and training loops. Each test skips when its library is
not installed: transformers and accelerate (``pip install "repguide[hf]"``), lightning
(``repguide[lightning]``), timm."""

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import repguide as rg
from repguide import models
from repguide.analysis import compare

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB, LENGTH, BATCH = 50, 16, 6  # the batch size differs from every layer's width and the length


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def lstm():
    torch.manual_seed(1)
    return models.lstm_lm(vocab_size=VOCAB, embed_dim=16, hidden_dim=32, num_layers=2)


def logits(output):
    return output.logits if hasattr(output, "logits") else output


def train_one_step(guidance):
    """One guided step of next-token prediction; returns (target before, guide before, output)."""
    target_before = copy.deepcopy(guidance.target.state_dict())
    guide_before = copy.deepcopy(guidance.guide.state_dict())
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(guidance.target.parameters(), lr=1e-2)
    out = guidance(tokens)
    task = F.cross_entropy(logits(out.output)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    (task + out.loss).backward()
    optimizer.step()
    return target_before, guide_before, out


def assert_target_changed_and_guide_unchanged(guidance, target_before, guide_before):
    after = guidance.target.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in target_before.items())
    for k, v in guidance.guide.state_dict().items():
        assert torch.equal(v, guide_before[k]), k
    assert all(p.grad is None for p in guidance.guide.parameters())


def test_a_gpt2_guide_trains_an_lstm_target():
    guidance = rg.Guidance(lstm(), tiny_gpt2(), pairs={"target": "layers.?", "guide": "transformer.h.?"})
    target_before, guide_before, out = train_one_step(guidance)
    assert [p.key for p in guidance.pairs] == [("layers.0", "transformer.h.0"), ("layers.1", "transformer.h.1")]
    assert all(torch.isfinite(s) and 0 < s <= 1 for s in out.similarities.values())
    assert_target_changed_and_guide_unchanged(guidance, target_before, guide_before)


def test_an_lstm_guide_trains_a_gpt2_target_whose_output_is_a_model_output():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    guidance = rg.Guidance(tiny_gpt2(), lstm(), pairs="stretch", layer_types=(GPT2Block, torch.nn.LSTM))
    target_before, guide_before, out = train_one_step(guidance)
    assert isinstance(out.output, transformers.utils.ModelOutput)
    assert [p.key for p in guidance.pairs] == [("transformer.h.0", "layers.0"), ("transformer.h.1", "layers.1")]
    assert_target_changed_and_guide_unchanged(guidance, target_before, guide_before)


def test_compare_reads_gpt2_blocks_through_their_model_output():
    tokens = torch.randint(0, VOCAB, (4 * BATCH, LENGTH), generator=torch.Generator().manual_seed(3))
    result = compare(tiny_gpt2(), lstm(), [tokens[:12], tokens[12:]], "transformer.h.?", "layers.?")
    assert result.layers_a == ["transformer.h.0", "transformer.h.1"]
    assert result.examples == 24 and torch.isfinite(result.matrix).all()


def test_lightning_example_trains_the_target_and_leaves_the_guide_unchanged():
    pytest.importorskip("lightning")
    example = load_example("lightning_guidance")
    module, loader = example.build()
    target_before = copy.deepcopy(module.guidance.target.state_dict())
    guide_before = copy.deepcopy(module.guidance.guide.state_dict())
    example.fit(module, loader, max_steps=2)
    assert int(module.guidance.step) == 2
    assert_target_changed_and_guide_unchanged(module.guidance, target_before, guide_before)


def test_hugging_face_trainer_example_trains_the_target_and_leaves_the_guide_unchanged(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = load_example("hf_trainer_guidance")
    guidance = example.build()
    target_before = copy.deepcopy(guidance.target.state_dict())
    guide_before = copy.deepcopy(guidance.guide.state_dict())
    example.fit(guidance, max_steps=2, output_dir=str(tmp_path))
    assert int(guidance.step) == 2
    assert [p.key for p in guidance.pairs] == [("transformer.h.0", "layers.0"), ("transformer.h.1", "layers.1")]
    assert_target_changed_and_guide_unchanged(guidance, target_before, guide_before)


def test_a_timm_model_guides_a_target():
    timm = pytest.importorskip("timm")
    guide = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    target = models.deep_fcn(input_shape=(1, 32, 32), depth=4, width=32)
    guidance = rg.Guidance(target, guide, pairs="stretch")  # timm's convolutions are nn.Conv2d
    x, y = torch.randn(BATCH, 1, 32, 32), torch.randint(0, 10, (BATCH,))
    target_before = copy.deepcopy(target.state_dict())
    guide_before = copy.deepcopy(guide.state_dict())
    out = guidance(x)
    (F.cross_entropy(out.output, y) + out.loss).backward()
    torch.optim.SGD(target.parameters(), lr=0.1).step()
    assert_target_changed_and_guide_unchanged(guidance, target_before, guide_before)
