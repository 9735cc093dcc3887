"""Guidance inside a Hugging Face ``Trainer``: override ``compute_loss``.

The target is a small GPT-2 built from a config (random weights, nothing downloaded), guided by an
untrained repguide LSTM language model. The Trainer is given the :class:`repguide.Guidance` module
as its model; its optimiser takes only parameters that require gradients, so the frozen guide is
never updated. ``compute_loss`` adds the alignment loss to the loss GPT-2 computes from ``labels``.

    pip install transformers accelerate     # or: pip install "repguide[hf]"
    python examples/hf_trainer_guidance.py

GPT-2's blocks (``transformer.h.0``, …) are ``GPT2Block`` modules, which are not among repguide's
default layer types (its projections are ``transformers.pytorch_utils.Conv1D``, not
``nn.Conv1d``), so the pairs name the layers with patterns. See docs/interop.md.
"""

from __future__ import annotations

import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import repguide as rg
from repguide import models

VOCAB, LENGTH = 50, 16


class RandomTokens(Dataset):
    """Random token sequences, as the dicts a Trainer expects; swap in your tokenised data set."""

    def __init__(self, size: int, seed: int = 0):
        self.ids = torch.randint(0, VOCAB, (size, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class GuidedTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)  # model is the Guidance module: GPT-2 gets input_ids and labels
        loss = out.output.loss + out.loss
        return (loss, out.output) if return_outputs else loss


def build(seed: int = 0) -> rg.Guidance:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    target = GPT2LMHeadModel(config)
    guide = models.lstm_lm(vocab_size=VOCAB, embed_dim=16, hidden_dim=32, num_layers=2)
    return rg.Guidance(
        target, guide,
        # Each GPT-2 block with one LSTM layer. "?" matches one character: "transformer.h.*"
        # would also match every module inside the blocks.
        pairs={"target": "transformer.h.?", "guide": "layers.?"},
        measure="cka", weight=1.0,
        # The LSTM takes the token ids only, not GPT-2's keyword arguments.
        guide_input=lambda args, kwargs: ((kwargs["input_ids"],), {}),
    )


def fit(guidance: rg.Guidance, max_steps: int = 20, output_dir: str | None = None) -> rg.Guidance:
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, max_steps=max_steps, per_device_train_batch_size=6,
            learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no",
            disable_tqdm=True, remove_unused_columns=False,
        )
        GuidedTrainer(model=guidance, args=args, train_dataset=RandomTokens(60)).train()
    return guidance


if __name__ == "__main__":
    guidance = fit(build())
    print("pairs:", [(p.target, p.guide) for p in guidance.pairs])
