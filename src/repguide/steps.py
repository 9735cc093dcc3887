"""What one training step is: its batch, learning rate and seeds (:class:`Schedule`), its losses, the
optimiser step with its non-finite checks (:func:`train_step`), and evaluation.

Every step's batch, learning rate and dropout masks are functions of (seed, step, rank) alone, so
a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repguide import data as datasets
from repguide.capture import first_tensor
from repguide.config import GuidanceConfig, OptimConfig, RunConfig, TrainConfig
from repguide.errors import ConfigError, NonFiniteError, user_stacklevel
from repguide.guidance import Guidance, noise_like

__all__ = [
    "AlignmentWatch", "Evaluation", "Head", "NonFiniteError", "Schedule", "StepContext", "better", "distillation_loss", "evaluate",
    "pair_column", "step_seed", "task_loss", "train_step",
]

IGNORE_INDEX = -100


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, step, rank) streams do not overlap like seed+step."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pair_column(key: tuple[str, str]) -> str:
    return f"sim:{key[0]}|{key[1]}"


def task_loss(output: Any, y: Tensor) -> Tensor:
    """Cross-entropy for classes ``(n, C)`` or tokens ``(n, T, V)`` (targets -100 are ignored)."""
    logits = first_tensor(output)
    if logits.dim() == y.dim() + 1 and logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits.float(), y)


def distillation_loss(student: Any, teacher: Any, y: Tensor, temperature: float) -> Tensor:
    """Hinton's KD term: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), over predicted positions."""
    s, t = first_tensor(student).float(), first_tensor(teacher).float()
    if s.dim() > 2:
        keep = (y != IGNORE_INDEX).flatten()
        s, t = s.flatten(0, -2)[keep], t.flatten(0, -2)[keep]
    log_p = F.log_softmax(s / temperature, dim=-1)
    log_q = F.log_softmax(t / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


@dataclass
class Evaluation:
    loss: float
    metric: float  # accuracy (classes, copy tokens) or perplexity (language modelling)
    metric_name: str
    # Where examples have lengths (``evaluate(..., by_length=True)``): length → (accuracy, targets scored).
    by_length: dict[int, tuple[float, int]] | None = None

    def length_keys(self, split: str) -> dict:
        """The summary's per-length entries of ``split`` (JSON keys: lengths as strings); none without lengths."""
        if self.by_length is None:
            return {}
        return {f"{split}_metric_by_length": {str(k): m for k, (m, _) in self.by_length.items()},
                f"{split}_count_by_length": {str(k): n for k, (_, n) in self.by_length.items()}}


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device, unit: str = "token", by_length: bool = False) -> Evaluation:
    """Mean loss over every predicted target (not a mean of batch means) and the task's metric.
    ``by_length``: for a data set whose examples have lengths (``dataset.lengths``, e.g. parity's), also
    the accuracy and the number of targets scored at each length, counted in the same pass."""
    was_training = model.training
    model.eval()
    lengths = getattr(dataset, "lengths", None) if by_length else None
    if lengths is not None:  # per-length tallies stay on the device, read once at the end
        hits_at = torch.zeros(int(lengths.max()) + 1, dtype=torch.long, device=device)
        targets_at = torch.zeros_like(hits_at)
    total_nll, total_correct, total_targets = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        *inputs, y = (t.to(device) for t in dataset.batch(idx))
        logits = first_tensor(model(*inputs)).float()
        keep = y != IGNORE_INDEX
        hits = (logits.argmax(-1) == y) & keep
        if lengths is not None:
            at = lengths[idx].to(device)
            hits_at.index_add_(0, at, hits.reshape(len(idx), -1).sum(1))
            targets_at.index_add_(0, at, keep.reshape(len(idx), -1).sum(1))
        if logits.dim() > 2:
            logits, y = logits.flatten(0, -2), y.flatten()
        total_nll += float(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
        total_correct += int(hits.sum())
        total_targets += int(keep.sum())
    model.train(was_training)
    mean_nll = total_nll / max(total_targets, 1)
    chunks = dataset.dataset if isinstance(dataset, Head) else dataset
    if isinstance(chunks, datasets.TokenChunks):
        return Evaluation(mean_nll, datasets.perplexity(mean_nll, chunks, unit), f"ppl_{unit}")
    by = None
    if lengths is not None:
        by = {k: (h / n, n) for k, (h, n) in enumerate(zip(hits_at.tolist(), targets_at.tolist())) if n}
    return Evaluation(mean_nll, total_correct / max(total_targets, 1), "accuracy", by)


class Head:
    """The first ``size`` examples of a data set: train accuracy measured on as many examples as val."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def batch(self, idx: Tensor) -> tuple[Tensor, ...]:
        return self.dataset.batch(idx)


def better(best: dict | None, val: Evaluation) -> dict:
    higher = val.metric_name == "accuracy"
    if best is None or (val.metric > best["metric"] if higher else val.metric < best["metric"]):
        return {"metric": val.metric, "loss": val.loss}
    return best


# --------------------------------------------------------------------------------------------
# A step


@dataclass
class Schedule:
    """Which batch every step trains on, and at which learning rate.

    Guidance-driven initialisation comes before the training schedule, not out of it: the ``init_steps``
    train on their task for as many steps as the baseline they are compared with. The data order of
    epoch e is a permutation drawn from (seed, e), kept while the steps run through that epoch."""

    train_set: Any
    seed: int
    batch_size: int
    rank: int
    per_rank: int  # this process's share of a batch
    steps_per_epoch: int
    task_steps: int  # the training schedule's length
    init_steps: int  # guidance-driven initialisation before it
    _order: tuple[int, Tensor] | None = field(default=None, repr=False)  # (epoch, its permutation)

    @classmethod
    def of(cls, config: RunConfig, train_set, rank: int, world: int) -> Schedule:
        tc, gc = config.train, config.guidance
        steps_per_epoch = len(train_set) // tc.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(train_set)} examples, fewer than one batch of "
                f"train.batch_size={tc.batch_size}; lower the batch size"
            )
        task_steps = steps_per_epoch * tc.epochs
        if tc.max_steps is not None:
            task_steps = min(task_steps, tc.max_steps)
        init_steps = gc.init_steps if gc.mode == "guide" else 0
        return cls(train_set, tc.seed, tc.batch_size, rank, tc.batch_size // world, steps_per_epoch, task_steps, init_steps)

    @property
    def total_steps(self) -> int:
        return self.init_steps + self.task_steps

    def epoch(self, step: int) -> int:
        """The training schedule's epoch of ``step``; 0 throughout the init phase."""
        return max(step - self.init_steps, 0) // self.steps_per_epoch

    def lr_factor(self, cfg: OptimConfig, step: int) -> float:
        task_step = max(step - self.init_steps, 0)  # the schedule's position; 0 throughout the init phase
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(task_step / max(self.task_steps, 1), 1.0)))
        if cfg.schedule == "step":
            return cfg.gamma ** (task_step // (cfg.step_epochs * self.steps_per_epoch))
        return 1.0

    def ends_epoch(self, done: int) -> bool:
        """Whether the training set has been seen once more after ``done`` steps (or training is over)."""
        task_done = done - self.init_steps
        return task_done > 0 and (task_done % self.steps_per_epoch == 0 or done == self.total_steps)

    def seek(self, step: int) -> int:
        """Put the training set and the data order in step ``step``'s epoch; returns the step's
        position in it. The init phase runs through the data from its start, as training does."""
        epoch, k = divmod(step if step < self.init_steps else step - self.init_steps, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            if hasattr(self.train_set, "set_epoch"):
                # Augmentation is a function of (seed, epoch, example), resampled data
                # (data.kwargs.resample) of (seed, epoch): a resumed run sees what an uninterrupted one did.
                self.train_set.set_epoch(epoch)
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch))
            self._order = epoch, torch.randperm(len(self.train_set), generator=generator)
        return k

    def batch(self, step: int) -> tuple[tuple[Tensor, ...], Tensor]:
        """This process's share of step ``step``'s batch (on the CPU) and its example positions in
        the training set (see :meth:`seek`)."""
        k = self.seek(step)
        shard = self._order[1][k * self.batch_size : (k + 1) * self.batch_size]
        idx = shard[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return self.train_set.batch(idx), idx


@dataclass
class StepContext:
    """What an optimiser step needs besides its batch: the target and optimiser (both set up by
    Fabric), the guidance or the distillation teacher, and the run's settings."""

    fabric: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gc: GuidanceConfig
    tc: TrainConfig
    grad_clip: float | None = None
    guidance: Guidance | None = None
    guide: nn.Module | None = None  # the frozen guide, or the teacher of guidance.mode=distill


def train_step(ctx: StepContext, inputs: list[Tensor], y: Tensor, step: int, index: Tensor | None = None) -> dict:
    """One optimiser step on ``inputs`` and targets ``y``; returns the row of metrics to log.
    ``index``: the batch's example positions in the training set, for the guide-feature cache."""
    fabric, model, guidance, optimizer, gc, tc = ctx.fabric, ctx.model, ctx.guidance, ctx.optimizer, ctx.gc, ctx.tc
    align, sims, init_phase = None, {}, gc.mode == "guide" and step < gc.init_steps
    # A skipped step must leave no trace, not even the BatchNorm statistics of its forward pass.
    buffers = [b.detach().clone() for b in model.buffers()] if tc.nonfinite == "skip" else []
    if guidance is not None:
        if init_phase and gc.init_input == "noise":
            # Each rank draws its own noise: identical shards would shrink the global batch to one shard.
            seed = step_seed(tc.seed, step, 104729, fabric.global_rank)
            generator = torch.Generator(device=inputs[0].device).manual_seed(seed)
            inputs = [noise_like(t, generator) for t in inputs]
        with fabric.autocast():
            out = guidance(*inputs) if index is None else guidance(*inputs, guide_index=index)
        # Guidance switched off (weight 0) runs no guide: the alignment term is absent, not 0.
        output, align, sims = out.output, (out.loss if out.weight else None), out.similarities
    else:
        with fabric.autocast():
            output = model(*inputs)
    task = task_loss(output, y)
    if gc.mode == "distill":
        with torch.no_grad(), fabric.autocast():
            teacher = ctx.guide(*inputs)
        align = gc.weight * distillation_loss(output, teacher, y, gc.temperature)
    loss = align if init_phase else task + (align if align is not None else 0.0)
    row = {"loss": float(loss.detach()), "task_loss": float(task.detach()),
           "align_loss": None if align is None else float(align.detach())}
    row.update({pair_column(k): float(v.detach()) for k, v in sims.items()})
    culprit = _nonfinite_culprit(task, align, sims, init_phase)
    if fabric.world_size > 1:  # all ranks must skip backward (a collective under DDP) together
        bad = fabric.all_reduce(torch.tensor(float(culprit is not None)), reduce_op="sum")
        if culprit is None and float(bad) > 0:
            culprit = "a loss on another process"
    if culprit is None:
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        culprit = _nonfinite_gradient(model, ctx.grad_clip, fabric, optimizer)
    if culprit is not None:
        if tc.nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite value at step {step + 1} (counted as in metrics.csv): {culprit}. "
                "The last good checkpoint is kept; "
                "lower the learning rate or the alignment weight, or set train.nonfinite=skip"
            )
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return {**row, "loss": float("nan")}
    optimizer.step()
    return row


def _nonfinite_culprit(task, align, sims, init_phase) -> str | None:
    if not init_phase and not torch.isfinite(task):
        return f"task loss = {float(task.detach())}"
    for (t, g), s in sims.items():
        if not torch.isfinite(s):
            return f"similarity of pair (target {t!r}, guide {g!r}) = {float(s.detach())}"
    if align is not None and not torch.isfinite(align):
        return f"alignment loss = {float(align.detach())}"
    return None


def _nonfinite_gradient(model, grad_clip, fabric, optimizer) -> str | None:
    if grad_clip is not None:
        norm = fabric.clip_gradients(model, optimizer, max_norm=grad_clip, error_if_nonfinite=False)
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
    if torch.isfinite(norm) or getattr(fabric.strategy.precision, "scaler", None) is not None:
        return None  # fp16's loss scaler skips an overflowing step itself, and lowers its scale
    for name, p in getattr(model, "module", model).named_parameters():  # names without Fabric's wrapper
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient of parameter {name!r}"
    return "gradient norm"


class AlignmentWatch:
    """Warnings, made when metrics are logged, where guidance cannot work: a batch too small for
    any similarity to tell layers apart, or a pair whose similarity stays at 1 (its alignment loss
    is 0 and gives no gradient). It reads the rows :func:`train_step` returns, which are already
    numbers on the host, so it adds no synchronisation."""

    SATURATED = 0.999

    def __init__(self, aligned: int, columns: list[str]):
        self.aligned, self.columns = aligned, columns
        self._low: dict[str, float] = {}  # the lowest similarity of each pair since the last log
        self._steps = 0
        self._warned: set[str] = set()

    def observe(self, row: dict) -> None:
        for column in self.columns:
            value = row.get(column)
            if value is not None and math.isfinite(value):
                self._low[column] = min(self._low.get(column, math.inf), value)
        self._steps += 1

    def warn(self) -> None:
        """At a logged step: warn once per run about each problem seen over the logged window."""
        if self.columns and self.aligned <= 2 and "batch" not in self._warned:
            self._warned.add("batch")
            warnings.warn(
                f"guidance aligns {self.aligned} examples at a time: with n <= 2 every similarity of "
                "centred activations is 1 (or 0) whatever the layers, so the alignment term has no "
                "gradient; raise train.batch_size", stacklevel=user_stacklevel(),
            )
        elif self.aligned > 2:
            for column, low in self._low.items():
                if low >= self.SATURATED and column not in self._warned:
                    self._warned.add(column)
                    warnings.warn(
                        f"the similarity of pair {column.removeprefix('sim:')} stayed at "
                        f"{low:.4f} or above over the last {self._steps} steps: its alignment loss "
                        "is about 0 and gives the target almost no gradient (the layers already "
                        "match, or a layer is degenerate)", stacklevel=user_stacklevel(),
                    )
        self._low, self._steps = {}, 0
