"""The training loop, on Lightning Fabric (devices, DDP, precision); every step is written out here.
Its callers draw the plots of a finished run (:func:`repguide.report.update_plots`).

Reproducibility: the data order of epoch e is a permutation drawn from (seed, e), and the global RNG
(dropout) is re-seeded from (seed, step, rank) before every step, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repguide import data as datasets
from repguide.build import build_model, first_mismatch, load_guide, weights_hash
from repguide.capture import _first_tensor
from repguide.config import RunConfig, upgrade
from repguide.guidance import Constant, Guidance, GuideFeatureCache, OffAfter, _noise_like
from repguide.runs import CheckpointError, MetricsLog, RunDir, load_weights

__all__ = ["NonFiniteError", "gather_batches", "train"]

IGNORE_INDEX = -100


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the message names the step and the culprit."""


# --------------------------------------------------------------------------------------------
# Building blocks


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, step, rank) streams do not overlap like seed+step."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def gather_batches(t: Tensor) -> Tensor:
    """``t: (n, ...)`` from every process, concatenated in rank order: ``(world · n, ...)``.

    Gradients flow back to each process's own rows, summed over the processes (all of which
    compute the same global alignment loss); DDP's averaging then leaves exactly the gradient
    one process would get from the whole batch.
    """
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # its suggested replacement lives in a private module
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated")
        return torch.cat(all_gather(t.contiguous()), 0)


def task_loss(output: Any, y: Tensor) -> Tensor:
    """Cross-entropy for classes ``(n, C)`` or tokens ``(n, T, V)`` (targets -100 are ignored)."""
    logits = _first_tensor(output)
    if logits.dim() == y.dim() + 1 and logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits.float(), y)


def distillation_loss(student: Any, teacher: Any, y: Tensor, temperature: float) -> Tensor:
    """Hinton's KD term: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), over predicted positions."""
    s, t = _first_tensor(student).float(), _first_tensor(teacher).float()
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


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device, unit: str = "token") -> Evaluation:
    """Mean loss over every predicted target (not a mean of batch means) and the task's metric."""
    was_training = model.training
    model.eval()
    total_nll, total_correct, total_targets = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        *inputs, y = (t.to(device) for t in dataset.batch(torch.arange(start, min(start + batch_size, len(dataset)))))
        logits = _first_tensor(model(*inputs)).float()
        if logits.dim() > 2:
            logits, y = logits.flatten(0, -2), y.flatten()
        keep = y != IGNORE_INDEX
        total_nll += float(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
        total_correct += int(((logits.argmax(-1) == y) & keep).sum())
        total_targets += int(keep.sum())
    model.train(was_training)
    mean_nll = total_nll / max(total_targets, 1)
    chunks = dataset.dataset if isinstance(dataset, _Head) else dataset
    if isinstance(chunks, datasets.TokenChunks):
        return Evaluation(mean_nll, datasets.perplexity(mean_nll, chunks, unit), f"ppl_{unit}")
    return Evaluation(mean_nll, total_correct / max(total_targets, 1), "accuracy")


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg, step: int, steps_per_epoch: int, total_steps: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    return 1.0


def _pair_column(key: tuple[str, str]) -> str:
    return f"sim:{key[0]}|{key[1]}"


# --------------------------------------------------------------------------------------------
# The loop


def train(
    config: RunConfig,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Run ``config`` to the end (or resume it) in ``runs_dir/<name>``; returns the summary."""
    from lightning_fabric import Fabric

    tc, gc = config.train, config.guidance
    fabric = Fabric(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=tc.strategy, precision=tc.precision,
    )
    if not int(os.environ.get("LT_CLI_USED", "0")):  # under `fabric run`, processes exist; launch() is refused
        fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {world} processes")
    run = RunDir(runs_dir, config.name)
    resolved = config.model_dump(mode="json")
    if resume and run.is_finished() and upgrade(run.read_config()) == resolved:
        # Nothing left to train: keep the results as they are (extend a run by raising train.epochs).
        if rank == 0:
            run.open(resume=True, overwrite=False)  # takes over the lock of a run killed at its very end
            run.close()
        fabric.print(f"{run.path} already finished with this config; nothing to resume")
        fabric.barrier()
        return json.loads((run.path / "summary.json").read_text())
    if rank == 0:
        run.open(resume=resume, overwrite=overwrite)
        previous = run.read_config()
        if resume and previous is not None and _essential(previous) != _essential(resolved):
            run.close()
            raise CheckpointError(
                f"cannot resume {run.path}: its config differs from this one in "
                f"{', '.join(diff_keys(_essential(previous), _essential(resolved)))}; resume with the same "
                "recipe and overrides, or start a new run (another name, or --overwrite)"
            )
        run.write_config(resolved)
    fabric.barrier()
    try:
        return _train(fabric, config, run, resume, quiet, rank, world)
    except NonFiniteError as err:
        if rank == 0:
            run.write_summary({"name": config.name, "status": "failed", "error": str(err)})
        raise
    finally:
        if rank == 0:
            run.close()


def _essential(cfg: dict) -> dict:
    """The parts of a config that must match to resume (not the length of training or logging)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("description", "claim")}
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in ("epochs", "max_steps", "log_every", "checkpoint_every", "nonfinite")}
    return cfg


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys


def _train(fabric, config: RunConfig, run: RunDir, resume: bool, quiet: bool, rank: int, world: int) -> dict:
    tc, gc, oc = config.train, config.guidance, config.optim
    started = time.time()
    splits = datasets.create(config.data.name, **config.data.kwargs)
    target = build_model(config.model, splits, tc.seed)
    guide = load_guide(config, splits, run.path.parent) if gc.mode != "none" else None
    guide_hash = weights_hash(guide) if guide is not None else None

    train_set = splits.train
    steps_per_epoch = len(train_set) // tc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set has {len(train_set)} examples, fewer than one batch of "
            f"train.batch_size={tc.batch_size}; lower the batch size"
        )
    task_steps = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        task_steps = min(task_steps, tc.max_steps)
    # Guidance-driven initialisation comes before the training schedule, not out of it: the
    # init rows train on their task for as many steps as the baseline they are compared with.
    init_steps = gc.init_steps if gc.mode == "guide" else 0
    total_steps = init_steps + task_steps
    per_rank = tc.batch_size // world

    def batch_at(step: int) -> tuple[list[Tensor], Tensor, Tensor]:
        epoch, k = divmod(step, steps_per_epoch)
        if hasattr(train_set, "set_epoch") and getattr(train_set, "_repguide_epoch", None) != epoch:
            train_set.set_epoch(epoch)  # augmentation is a function of (seed, epoch, example)
            train_set._repguide_epoch = epoch
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(step_seed(tc.seed, epoch)))
        idx = order[k * tc.batch_size : (k + 1) * tc.batch_size][rank * per_rank : (rank + 1) * per_rank]
        *inputs, y = (fabric.to_device(t) for t in train_set.batch(idx))
        return inputs, y, idx

    guidance = None
    example_inputs, _, _ = batch_at(0)
    if gc.mode == "guide":
        if gc.init_steps and gc.off_after:
            raise ValueError("guidance.init_steps and guidance.off_after cannot both be set")
        weight = OffAfter(gc.weight, gc.init_steps or gc.off_after) if (gc.init_steps or gc.off_after) else Constant(gc.weight)
        pairs = [tuple(p) for p in gc.pairs] if isinstance(gc.pairs, list) else gc.pairs
        guidance = Guidance(
            target, guide, pairs=pairs, measure=gc.measure, weight=weight,
            guide_input=gc.guide_input, reduction=gc.reduction, layer_types=gc.layer_types,
            example_input=tuple(t.cpu() for t in example_inputs), noise_seed=step_seed(tc.seed, 7919, rank),
            all_gather=gather_batches if tc.alignment == "global" and world > 1 else None,
            guide_precision=gc.guide_precision, sketch_dim=gc.sketch_dim,
            guide_cache=_guide_cache(gc, train_set),
        )
        aligned = tc.batch_size if tc.alignment == "global" else per_rank
        if aligned < guidance.measure.min_n:
            raise ValueError(
                f"guidance.measure={gc.measure!r} needs at least {guidance.measure.min_n} examples per "
                f"batch, but train.batch_size={tc.batch_size} aligns {aligned} at a time; raise "
                "train.batch_size (or use guidance.measure=cka)"
            )
    optimizer = _optimizer(oc, target.parameters())
    model, optimizer = fabric.setup(target, optimizer)
    if guide is not None:
        guide = fabric.to_device(guide).eval()
    if guidance is not None:
        guidance = fabric.to_device(guidance)
        guidance.run_target_with(model)

    columns = ["step", "epoch", "split", "loss", "task_loss", "align_loss", "metric", "lr", "step_time"]
    if guidance is not None:
        columns += [_pair_column(p.key) for p in guidance.pairs]

    step, best = 0, None
    if resume and any((run.path / f).exists() for f in ("last.ckpt", "prev.ckpt")):
        state, notes = run.load_checkpoint()
        missing = {"target", "optimizer", "step"} - set(state)
        if missing:
            raise CheckpointError(
                f"the checkpoint in {run.path} is not a repguide training checkpoint (no "
                f"{', '.join(sorted(missing))}); start the run again with --overwrite"
            )
        for note in notes:
            fabric.print(f"warning: {note}")
        try:
            model.load_state_dict(state["target"])
        except RuntimeError as err:
            raise CheckpointError(
                f"the checkpoint in {run.path} is from another model ({first_mismatch(err)}); resume with "
                "the recipe and overrides that wrote it, or start again with --overwrite"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        if guidance is not None:
            guidance.step.copy_(state["guidance_step"])
        step, best = int(state["step"]), state.get("best")
    log = MetricsLog(run.path / "metrics.csv", columns, resume_step=step if step else None) if rank == 0 else None

    def checkpoint() -> None:
        if rank == 0:
            run.save_checkpoint({
                "step": step, "target": model.state_dict(), "optimizer": optimizer.state_dict(),
                "guidance_step": guidance.step.cpu() if guidance is not None else torch.zeros(()),
                "best": best,
            })
        fabric.barrier()

    progress = _progress(total_steps, step, config.name, quiet or rank != 0)
    model.train()
    while step < total_steps:
        task_step = max(step - init_steps, 0)  # the schedule's position; 0 throughout the init phase
        epoch = task_step // steps_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = oc.lr * _lr_factor(oc, task_step, steps_per_epoch, task_steps)
        torch.manual_seed(step_seed(tc.seed, step, rank))  # dropout masks depend on (seed, step, rank)
        inputs, y, idx = batch_at(step if step < init_steps else step - init_steps)
        t0 = time.perf_counter()
        row = _step(fabric, model, guidance, guide, optimizer, inputs, y, gc, tc, oc.grad_clip, step,
                    index=fabric.to_device(idx) if gc.cache else None)
        row["step_time"] = time.perf_counter() - t0
        step += 1
        progress.update(1)
        if rank == 0 and (step % tc.log_every == 0 or step == total_steps):
            log.write({**row, "step": step, "epoch": epoch, "split": "train", "lr": optimizer.param_groups[0]["lr"]})
            progress.set_postfix(loss=f"{row['loss']:.3f}", epoch=epoch)
        end_of_epoch = step > init_steps and ((step - init_steps) % steps_per_epoch == 0 or step == total_steps)
        if end_of_epoch:
            val = evaluate(model, splits.val, tc.eval_batch_size, fabric.device, config.data.perplexity_unit)
            best = _better(best, val)
            if rank == 0:
                log.write({"step": step, "epoch": epoch, "split": "val", "loss": val.loss, "metric": val.metric})
                if quiet:
                    fabric.print(f"[{config.name}] epoch {epoch} step {step}: val loss {val.loss:.4f} {val.metric_name} {val.metric:.4f}")
        if end_of_epoch or step % tc.checkpoint_every == 0:
            checkpoint()
    progress.close()

    val = evaluate(model, splits.val, tc.eval_batch_size, fabric.device, config.data.perplexity_unit)
    test = evaluate(model, splits.test, tc.eval_batch_size, fabric.device, config.data.perplexity_unit)
    train_eval = evaluate(model, _Head(train_set, len(splits.val)), tc.eval_batch_size, fabric.device, config.data.perplexity_unit)
    summary = {
        "name": config.name, "status": "finished", "scale": config.scale, "steps": step,
        "init_steps": init_steps,
        "metric": val.metric_name, "train_loss": train_eval.loss, "train_metric": train_eval.metric,
        "val_loss": val.loss, "val_metric": val.metric, "test_loss": test.loss, "test_metric": test.metric,
        "best_val_metric": best["metric"] if best else None, "seconds": time.time() - started,
    }
    if guide is not None:
        summary["guide_weights_sha256_before"] = guide_hash
        summary["guide_weights_sha256_after"] = weights_hash(guide)
        summary["guide_unchanged"] = summary["guide_weights_sha256_before"] == summary["guide_weights_sha256_after"]
        if not summary["guide_unchanged"]:
            raise RuntimeError("the guide's weights changed during training; this is a bug in repguide")
    if rank == 0:
        log.write({"step": step, "epoch": tc.epochs - 1, "split": "test", "loss": test.loss, "metric": test.metric})
        from repguide.runs import atomic_save

        atomic_save(model.state_dict(), run.path / "final.pt")
        run.write_summary(summary)
    fabric.barrier()
    return summary


class _Head:
    """The first ``size`` examples of a data set: train accuracy measured on as many examples as val."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def batch(self, idx: Tensor) -> tuple[Tensor, ...]:
        return self.dataset.batch(idx)


def _better(best: dict | None, val: Evaluation) -> dict:
    higher = val.metric_name == "accuracy"
    if best is None or (val.metric > best["metric"] if higher else val.metric < best["metric"]):
        return {"metric": val.metric, "loss": val.loss}
    return best


def _guide_cache(gc, train_set) -> GuideFeatureCache | None:
    """The guide-feature cache of ``guidance.cache=true``, after checking that it is valid."""
    if not gc.cache:
        return None
    if gc.guide_input != "same" or (gc.init_steps and gc.init_input == "noise"):
        raise ValueError(
            "guidance.cache=true stores the guide's features of each training example, but the guide "
            "sees noise here (guidance.guide_input=noise or guidance.init_input=noise); turn one of them off"
        )
    if getattr(train_set, "augment", "none") != "none":
        raise ValueError(
            "guidance.cache=true needs the guide to see the same input for an example every epoch, but "
            "this data set augments its examples at random; turn the augmentation off or the cache off"
        )
    return GuideFeatureCache(len(train_set))


def _step(fabric, model, guidance, guide, optimizer, inputs, y, gc, tc, grad_clip, step, index=None) -> dict:
    """One optimiser step; returns the row of metrics to log. ``index``: the batch's example
    positions in the training set, for the guide-feature cache."""
    align, sims, init_phase = None, {}, gc.mode == "guide" and step < gc.init_steps
    # A skipped step must leave no trace, not even the BatchNorm statistics of its forward pass.
    buffers = [b.detach().clone() for b in model.buffers()] if tc.nonfinite == "skip" else []
    if guidance is not None:
        if init_phase and gc.init_input == "noise":
            # Each rank draws its own noise: identical shards would shrink the global batch to one shard.
            seed = step_seed(tc.seed, step, 104729, fabric.global_rank)
            generator = torch.Generator(device=inputs[0].device).manual_seed(seed)
            inputs = [_noise_like(t, generator) for t in inputs]
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
            teacher = guide(*inputs)
        align = gc.weight * distillation_loss(output, teacher, y, gc.temperature)
    loss = align if init_phase else task + (align if align is not None else 0.0)
    row = {"loss": float(loss.detach()), "task_loss": float(task.detach()),
           "align_loss": None if align is None else float(align.detach())}
    row.update({_pair_column(k): float(v.detach()) for k, v in sims.items()})
    culprit = _nonfinite_culprit(task, align, sims, init_phase)
    if fabric.world_size > 1:  # all ranks must skip backward (a collective under DDP) together
        bad = fabric.all_reduce(torch.tensor(float(culprit is not None)), reduce_op="sum")
        if culprit is None and float(bad) > 0:
            culprit = "a loss on another process"
    if culprit is None:
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        culprit = _nonfinite_gradient(model, grad_clip, fabric, optimizer)
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


def _progress(total: int, done: int, name: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="step", disable=disable, dynamic_ncols=True)
