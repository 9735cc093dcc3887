"""The training loop, on Lightning Fabric (devices, DDP, precision, checkpoint I/O): set-up, resume,
the loop, checkpoints and the summary. What one step does is :mod:`repguide.steps`; the callers
draw a finished run's plots (:func:`repguide.report.update_plots`)."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from repguide import data as datasets
from repguide.build import build_data, build_model, first_mismatch, load_guide, weights_hash
from repguide.config import RunConfig, diff_keys, resume_essentials, upgrade
from repguide.errors import ConfigError, user_stacklevel
from repguide.guidance import Constant, Guidance, GuideFeatureCache, OffAfter, PairDiagnostic
from repguide.runs import CheckpointError, MetricsLog, RunDir, atomic_save
from repguide.steps import (
    AlignmentWatch, Evaluation, Head, NonFiniteError, Schedule, StepContext, better, evaluate, pair_column, step_seed, train_step,
)

__all__ = ["gather_batches", "pair_diagnostics", "train"]


# --------------------------------------------------------------------------------------------
# Building blocks


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


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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

    tc = config.train
    fabric = Fabric(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=tc.strategy, precision=tc.precision,
    )
    if not int(os.environ.get("LT_CLI_USED", "0")):  # under `fabric run`, processes exist; launch() is refused
        fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the {world} processes")
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
    fresh = False  # whether this start found the folder without results (rank 0)
    if rank == 0:
        run.open(resume=resume, overwrite=overwrite)
        fresh = not run.has_results()
        previous = _previous_config(run) if resume else run.read_config()
        if resume and previous is not None and resume_essentials(previous) != resume_essentials(resolved):
            run.close()
            raise CheckpointError(
                f"cannot resume {run.path}: its config differs from this one in "
                f"{', '.join(diff_keys(resume_essentials(previous), resume_essentials(resolved)))}; resume with the same "
                "recipe and overrides, or start a new run (another name, or --overwrite)"
            )
        run.write_config(resolved)
    fabric.barrier()
    try:
        return _train(fabric, config, run, resume, quiet)
    except BaseException as err:
        if rank == 0 and fresh and not run.has_checkpoint():
            run.discard()  # a start that failed left nothing to resume: the corrected command starts afresh
        elif rank == 0 and isinstance(err, NonFiniteError):
            run.write_summary({"name": config.name, "status": "failed", "error": str(err)})
        raise
    finally:
        if rank == 0:
            run.close()


def _previous_config(run: RunDir) -> dict | None:
    """The config a run folder's results were made with: config.yaml, or where it is gone, the one
    its checkpoint carries. None for a folder without results; a folder whose results no longer
    say which config made them is refused rather than credited to this one."""
    previous = run.read_config()
    if previous is not None or not run.has_results():
        return previous
    carried = None
    if run.has_checkpoint():
        try:
            carried = upgrade(run.load_checkpoint()[0].get("config"))
        except CheckpointError:
            carried = None
    if carried is None:
        run.close()
        raise CheckpointError(
            f"cannot resume {run.path}: its config.yaml is missing and no checkpoint says which config "
            "made its results; put config.yaml back, or start again with --overwrite"
        )
    return carried


def _train(fabric, config: RunConfig, run: RunDir, resume: bool, quiet: bool) -> dict:
    training = _set_up(fabric, config, run)
    if resume and run.has_checkpoint():
        _resume(training)
    elif resume:  # said: a misspelt name would otherwise start a new run silently
        fabric.print(f"{run.path} has no checkpoint to resume from; training from step 0")
    if fabric.global_rank == 0:
        training.log = MetricsLog(run.path / "metrics.csv", _columns(training.ctx.guidance),
                                  resume_step=training.step if training.step else None)
    _loop(training, quiet)
    return _finish(training)


# --------------------------------------------------------------------------------------------
# Set-up: the run's state between set-up and finish


@dataclass
class _Training:
    """A run between set-up and finish: what it trains, how, and how far it has got."""

    config: RunConfig
    run: RunDir
    splits: datasets.Splits
    schedule: Schedule
    ctx: StepContext
    guide_hash: str | None
    started: float
    step: int = 0  # steps taken
    best: dict | None = None  # the best validation so far
    log: MetricsLog | None = None  # on rank 0 only


def _set_up(fabric, config: RunConfig, run: RunDir) -> _Training:
    """Data, target, guide, schedule, guidance and optimiser, built in the order that fixes their seeds."""
    tc, gc, oc = config.train, config.guidance, config.optim
    started = time.time()
    splits = build_data(config.data)
    target = build_model(config.model, splits, tc.seed)
    guide = load_guide(config, splits, run.path.parent) if gc.mode != "none" else None
    guide_hash = weights_hash(guide, _hash_buffers(gc)) if guide is not None else None
    schedule = Schedule.of(config, splits.train, fabric.global_rank, fabric.world_size)
    guidance = _guidance(config, target, guide, schedule, fabric.world_size) if gc.mode == "guide" else None
    fresh = not any((run.path / f).exists() for f in ("pairs.json", "last.ckpt", "prev.ckpt"))
    if guidance is not None and fabric.global_rank == 0 and fresh:  # a resume changes nothing before it loads
        report = _diagnose(config, guidance, schedule)
        run.write_json("pairs.json", [d.as_dict() for d in report])
        for d in report:
            if d.warning:
                warnings.warn(f"pair ({d.target}, {d.guide}) {d.warning} (see {run.path / 'pairs.json'})", stacklevel=user_stacklevel())
    model, optimizer = fabric.setup(target, _optimizer(oc, target.parameters()))
    if guide is not None:
        guide = fabric.to_device(guide).eval()
    if guidance is not None:
        guidance = fabric.to_device(guidance)
        guidance.run_target_with(model)
    ctx = StepContext(fabric, model, optimizer, gc, tc, oc.grad_clip, guidance, guide)
    return _Training(config, run, splits, schedule, ctx, guide_hash, started)


def _guidance(config: RunConfig, target: nn.Module, guide: nn.Module, schedule: Schedule, world: int) -> Guidance:
    """The Guidance module of ``guidance.mode=guide``, after checking that its options fit together."""
    tc, gc = config.train, config.guidance
    if gc.init_steps and gc.off_after:
        raise ConfigError("guidance.init_steps and guidance.off_after cannot both be set")
    weight = OffAfter(gc.weight, gc.init_steps or gc.off_after) if (gc.init_steps or gc.off_after) else Constant(gc.weight)
    pairs = [tuple(p) for p in gc.pairs] if isinstance(gc.pairs, list) else gc.pairs
    (*example_input, _), _ = schedule.batch(0)
    guidance = Guidance(
        target, guide, pairs=pairs, measure=gc.measure, weight=weight,
        guide_input=gc.guide_input, reduction=gc.reduction, layers=gc.layers,
        example_input=tuple(example_input), noise_seed=step_seed(tc.seed, 7919, schedule.rank),
        all_gather=gather_batches if tc.alignment == "global" and world > 1 else None,
        guide_precision=gc.guide_precision, sketch_dim=gc.sketch_dim, guide_mode=gc.guide_mode,
        guide_cache=_guide_cache(gc, schedule.train_set), compile=gc.compile,
    )
    aligned = tc.batch_size if tc.alignment == "global" else schedule.per_rank
    if aligned < guidance.measure.min_n:
        raise ConfigError(
            f"guidance.measure={gc.measure!r} needs at least {guidance.measure.min_n} examples per "
            f"batch, but train.batch_size={tc.batch_size} aligns {aligned} at a time; raise "
            "train.batch_size (or use guidance.measure=cka)"
        )
    return guidance


def _diagnose(config: RunConfig, guidance: Guidance, schedule: Schedule) -> list[PairDiagnostic]:
    """Every pair's diagnostics on the first training batch, with the task's position groups."""
    (*inputs, y), _ = schedule.batch(0)
    positions = datasets.position_groups(config.data.name, inputs[0], y, **config.data.kwargs)
    return guidance.diagnose(*inputs, positions=positions)


def pair_diagnostics(config: RunConfig, runs_dir: str | Path = "runs") -> list[PairDiagnostic]:
    """What ``config``'s pairs start from, before any training (``repguide pairs RECIPE``): the run's
    data, target and guide built as training builds them, on one process."""
    if config.guidance.mode != "guide":
        raise ConfigError(f"guidance.mode={config.guidance.mode!r} has no pairs; pairs exist with guidance.mode=guide")
    splits = build_data(config.data)
    target = build_model(config.model, splits, config.train.seed)
    guide = load_guide(config, splits, Path(runs_dir))
    schedule = Schedule.of(config, splits.train, 0, 1)
    return _diagnose(config, _guidance(config, target, guide, schedule, 1), schedule)


def _columns(guidance: Guidance | None) -> list[str]:
    columns = ["step", "epoch", "split", "loss", "task_loss", "align_loss", "metric", "lr", "step_time"]
    return columns + ([pair_column(p.key) for p in guidance.pairs] if guidance is not None else [])


# --------------------------------------------------------------------------------------------
# Resume, the loop, checkpoints and the finish


def _resume(t: _Training) -> None:
    """Continue from the run's last good checkpoint: weights, optimiser, guidance step, best validation."""
    run, ctx = t.run, t.ctx
    state, notes = run.load_checkpoint()
    missing = {"target", "optimizer", "step"} - set(state)
    if missing:
        raise CheckpointError(
            f"the checkpoint in {run.path} is not a repguide training checkpoint (no "
            f"{', '.join(sorted(missing))}); start the run again with --overwrite"
        )
    for note in notes:
        ctx.fabric.print(f"warning: {note}")
    try:
        ctx.model.load_state_dict(state["target"])
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint in {run.path} is from another model ({first_mismatch(err)}); resume with "
            "the recipe and overrides that wrote it, or start again with --overwrite"
        ) from None
    ctx.optimizer.load_state_dict(state["optimizer"])
    if ctx.guidance is not None:
        ctx.guidance.step.copy_(state["guidance_step"])
    t.step, t.best = int(state["step"]), state.get("best")


def _loop(t: _Training, quiet: bool) -> None:
    """Train from step ``t.step`` to the end of the schedule."""
    ctx, schedule, tc, oc = t.ctx, t.schedule, t.config.train, t.config.optim
    rank = ctx.fabric.global_rank
    progress = _progress(schedule.total_steps, t.step, t.config.name, quiet or rank != 0)
    watch = _watch(t)
    ctx.model.train()
    while t.step < schedule.total_steps:
        # The step's learning rate, dropout masks and batch: functions of (seed, step, rank) alone.
        epoch = schedule.epoch(t.step)
        for group in ctx.optimizer.param_groups:
            group["lr"] = oc.lr * schedule.lr_factor(oc, t.step)
        torch.manual_seed(step_seed(tc.seed, t.step, rank))
        batch, idx = schedule.batch(t.step)
        *inputs, y = (ctx.fabric.to_device(x) for x in batch)
        # One optimiser step (or a skipped one, with train.nonfinite=skip).
        t0 = time.perf_counter()
        row = train_step(ctx, inputs, y, t.step, index=ctx.fabric.to_device(idx) if t.config.guidance.cache else None)
        row["step_time"] = time.perf_counter() - t0
        t.step += 1
        progress.update(1)
        # The metrics row, every train.log_every steps and at the last.
        watch.observe(row)
        if rank == 0 and (t.step % tc.log_every == 0 or t.step == schedule.total_steps):
            watch.warn()
            t.log.write({**row, "step": t.step, "epoch": epoch, "split": "train", "lr": ctx.optimizer.param_groups[0]["lr"]})
            progress.set_postfix(loss=f"{row['loss']:.3f}", epoch=epoch)
        # Validation at the end of every epoch; a checkpoint then and every train.checkpoint_every steps.
        end_of_epoch = schedule.ends_epoch(t.step)
        if end_of_epoch:
            _validate(t, epoch, quiet)
        if end_of_epoch or t.step % tc.checkpoint_every == 0:
            _checkpoint(t)
    progress.close()


def _watch(t: _Training) -> AlignmentWatch:
    tc, guidance = t.config.train, t.ctx.guidance
    aligned = tc.batch_size if tc.alignment == "global" else t.schedule.per_rank
    return AlignmentWatch(aligned, [pair_column(p.key) for p in guidance.pairs] if guidance is not None else [])


def _validate(t: _Training, epoch: int, quiet: bool) -> None:
    ctx, config = t.ctx, t.config
    val = evaluate(ctx.model, t.splits.val, config.train.eval_batch_size, ctx.fabric.device, config.data.perplexity_unit)
    t.best = better(t.best, val)
    if ctx.fabric.global_rank == 0:
        t.log.write({"step": t.step, "epoch": epoch, "split": "val", "loss": val.loss, "metric": val.metric})
        if quiet:
            ctx.fabric.print(f"[{config.name}] epoch {epoch} step {t.step}: val loss {val.loss:.4f} {val.metric_name} {val.metric:.4f}")


def _checkpoint(t: _Training) -> None:
    ctx = t.ctx
    if ctx.fabric.global_rank == 0:
        t.run.save_checkpoint({
            "step": t.step, "target": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
            "guidance_step": ctx.guidance.step.cpu() if ctx.guidance is not None else torch.zeros(()),
            "best": t.best, "config": t.config.model_dump(mode="json"),  # the run's provenance
        })
    ctx.fabric.barrier()


def _finish(t: _Training) -> dict:
    """Final evaluation on val, test (by length too, where examples have one) and as many training
    examples; final.pt and summary.json."""
    ctx, config, splits = t.ctx, t.config, t.splits
    tc = config.train

    def evaluated(dataset, by_length: bool = False) -> Evaluation:
        return evaluate(ctx.model, dataset, tc.eval_batch_size, ctx.fabric.device, config.data.perplexity_unit, by_length)

    if t.step:  # train metrics on the last step's epoch (augmented or resampled data), resumed or not
        t.schedule.seek(t.step - 1)
    val, test = evaluated(splits.val, by_length=True), evaluated(splits.test, by_length=True)
    train_eval = evaluated(Head(splits.train, len(splits.val)))
    summary = {
        "name": config.name, "status": "finished", "scale": config.scale, "steps": t.step,
        "init_steps": t.schedule.init_steps,
        "metric": val.metric_name, "train_loss": train_eval.loss, "train_metric": train_eval.metric,
        "val_loss": val.loss, "val_metric": val.metric, "test_loss": test.loss, "test_metric": test.metric,
        "best_val_metric": t.best["metric"] if t.best else None, "seconds": time.time() - t.started,
        **val.length_keys("val"), **test.length_keys("test"),  # where examples have lengths (parity)
    }
    if ctx.guide is not None:
        summary["guide_weights_sha256_before"] = t.guide_hash
        summary["guide_weights_sha256_after"] = weights_hash(ctx.guide, _hash_buffers(config.guidance))
        summary["guide_unchanged"] = summary["guide_weights_sha256_before"] == summary["guide_weights_sha256_after"]
        if not summary["guide_unchanged"]:
            raise RuntimeError("the guide's weights changed during training; this is a bug in repguide")
    if ctx.fabric.global_rank == 0:
        t.log.write({"step": t.step, "epoch": tc.epochs - 1, "split": "test", "loss": test.loss, "metric": test.metric})
        atomic_save(ctx.model.state_dict(), t.run.path / "final.pt")
        t.run.write_summary(summary)
    ctx.fabric.barrier()
    return summary


def _hash_buffers(gc) -> bool:
    """Whether the guide's buffers stay fixed too: not where guidance.guide_mode=train updates them."""
    return not (gc.mode == "guide" and gc.guide_mode == "train")


def _guide_cache(gc, train_set) -> GuideFeatureCache | None:
    """The guide-feature cache of ``guidance.cache=true``, after checking that it is valid."""
    if not gc.cache:
        return None
    if gc.guide_input != "same" or (gc.init_steps and gc.init_input == "noise"):
        raise ConfigError(
            "guidance.cache=true stores the guide's features of each training example, but the guide "
            "sees noise here (guidance.guide_input=noise or guidance.init_input=noise); turn one of them off"
        )
    if getattr(train_set, "augment", "none") != "none":
        raise ConfigError(
            "guidance.cache=true needs the guide to see the same input for an example every epoch, but "
            "this data set augments its examples at random; turn the augmentation off or the cache off"
        )
    return GuideFeatureCache(len(train_set))


def _progress(total: int, done: int, name: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="step", disable=disable, dynamic_ncols=True)
