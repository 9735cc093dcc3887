"""Guidance inside a Lightning ``LightningModule``.

The module holds a :class:`repguide.Guidance` (the target plus the frozen guide); ``training_step``
adds the alignment loss to the task loss, and ``configure_optimizers`` hands the optimiser the
target's parameters only. Lightning keeps the loop, devices, precision and logging.

    pip install lightning          # or: pip install "repguide[lightning]"
    python examples/lightning_guidance.py

It trains on random images so that it runs anywhere; pass your own DataLoader to ``fit``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import repguide as rg
from repguide import models


class GuidedClassifier(L.LightningModule):
    def __init__(self, target: nn.Module, guide: nn.Module, weight: float = 1.0, lr: float = 1e-3):
        super().__init__()
        # Guidance puts the guide in eval mode without gradients, and keeps it there when
        # Lightning calls .train() on the module (Lightning then warns that modules are in eval
        # mode at the start of training: those are the guide's, as intended).
        self.guidance = rg.Guidance(target, guide, pairs="stretch", measure="cka", weight=weight)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.guidance.target(x)  # inference needs no guide

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.guidance(x)  # one target forward, one guide forward
        task = F.cross_entropy(out.output, y)
        self.log_dict({"task_loss": task, "align_loss": out.loss}, prog_bar=True)
        self.log_dict({f"sim/{t}|{g}": s for (t, g), s in out.similarities.items()})
        return task + out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.guidance.target.parameters(), lr=self.lr)


def build(seed: int = 0) -> tuple[GuidedClassifier, DataLoader]:
    """A small Deep FCN guided by an untrained ResNet-18, and a loader of random 28×28 images."""
    torch.manual_seed(seed)
    target = models.deep_fcn(input_shape=(1, 28, 28), depth=8, width=64)
    guide = models.resnet18(in_channels=1, width=8)
    data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    return GuidedClassifier(target, guide), DataLoader(data, batch_size=32, shuffle=True)


def fit(module: GuidedClassifier, loader: DataLoader, max_steps: int = 20) -> GuidedClassifier:
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


if __name__ == "__main__":
    module = fit(*build())
    print("pairs:", [(p.target, p.guide) for p in module.guidance.pairs])
