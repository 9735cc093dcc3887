"""The ``repguide`` command."""

from __future__ import annotations

import argparse
import errno
import json
import sys

from repguide.errors import ArgumentError, RepguideError

__all__ = ["main"]

# repguide.capture.LAYER_RULES, spelled out so that `repguide --help` need not import torch
# (tests/test_cli.py checks that they agree).
_LAYER_RULES = ["blocks", "leaves", "all", "official"]

DEMO_RUNS = [
    ("deep FCN, no guidance", "deep_fcn_baseline"),
    ("deep FCN guided by an untrained ResNet-18", "deep_fcn_untrained_resnet18"),
]


def _run(args: argparse.Namespace) -> int:
    from repguide.config import load_recipe, parse_overrides
    from repguide.report import update_plots
    from repguide.runs import RunDir, is_main_process
    from repguide.train import train

    config = load_recipe(args.recipe, args.scale, parse_overrides(args.overrides))
    summary = train(config, args.runs_dir, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    if is_main_process():  # one set of plots and one summary, not one per process
        update_plots(RunDir(args.runs_dir, config.name).path)
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from repguide.config import list_recipes, load_recipe

    for name in list_recipes():
        cfg = load_recipe(name, "small")
        print(f"{name:40s} {cfg.description}")
    return 0


def _layers(args: argparse.Namespace) -> int:
    import torch

    from repguide import data
    from repguide.build import build_model
    from repguide.capture import discover
    from repguide.config import ModelConfig, parse_overrides

    name, kwargs = _example_data(args.model) if args.data is None else (args.data, parse_overrides(args.data_kwargs))
    splits = data.create(name, **kwargs)
    model = build_model(ModelConfig(name=args.model, kwargs=parse_overrides(args.kwargs)), splits, 0, recipe_key=None)
    *inputs, _ = splits.train.batch(torch.arange(min(8, len(splits.train))))
    try:
        found = discover(model, *inputs, layers=args.layers)
    except (RuntimeError, TypeError, IndexError) as err:
        raise ArgumentError(
            f"model {args.model!r} cannot run on an example of data set {name!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}); give the data it takes with --data"
        ) from err
    print(f"# {args.model}: {args.layers} layers, on an example of {name}")
    for info in found:
        head = "  (output head)" if info.is_output else ""
        print(f"{info.name:40s} {info.module_type:28s} {str(info.shape[1:]):20s}{head}")
    return 0


def _example_data(model: str) -> tuple[str, dict]:
    """The data set (and its tiny-scale options) of the first shipped recipe that uses ``model`` as
    its target or guide, so a sequence model gets token ids; for a model no recipe uses, that of the
    first recipe whose target takes token ids too if ``model`` does; Fashion-MNIST otherwise."""
    from repguide.config import list_recipes, load_recipe
    from repguide.models import accepted_kwargs

    configs = [load_recipe(recipe, "tiny") for recipe in list_recipes()]
    for config in configs:
        guide = config.guidance.guide
        if model in (config.model.name, guide.name if guide else None):
            return config.data.name, dict(config.data.kwargs)
    if "vocab_size" in accepted_kwargs(model):
        config = next(c for c in configs if "vocab_size" in accepted_kwargs(c.model.name))
        return config.data.name, dict(config.data.kwargs)
    return "fashion_mnist", {}


def _pairs(args: argparse.Namespace) -> int:
    from repguide.config import load_recipe, parse_overrides
    from repguide.train import pair_diagnostics

    config = load_recipe(args.recipe, args.scale, parse_overrides(args.overrides))
    report = pair_diagnostics(config, args.runs_dir)
    groups = sorted({g for d in report for g in d.shares if g != "all"})
    print(f"# {config.name} ({args.scale}): {config.guidance.measure} on one batch of {config.train.batch_size}; "
          "floor = the same pair on a shuffled batch; share = the guide layer's across-example variance there")
    print(f"{'target':24s} {'guide':28s} {'similarity':>10s} {'floor':>7s}" + "".join(f" {'share ' + g:>12s}" for g in groups))
    for d in report:
        shares = "".join(f" {d.shares.get(g, float('nan')):12.3f}" for g in groups)
        print(f"{d.target:24s} {d.guide:28s} {d.similarity:10.3f} {d.floor:7.3f}{shares}" + (f"  ! {d.warning}" if d.warning else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Guided vs unguided deep FCN on Fashion-MNIST: real training, a small table at the end."""
    from repguide.config import load_recipe
    from repguide.report import update_plots
    from repguide.runs import RunDir, is_main_process
    from repguide.train import train

    print("repguide demo: a 48-layer fully-connected network (BatchNorm, ReLU, dropout) on 5,000")
    print("Fashion-MNIST images barely trains on its own; guidance from an untrained ResNet-18")
    print("(1 - linear CKA per stretched layer pair) lets it train. Two short runs follow.\n")
    rows = []
    for label, recipe in DEMO_RUNS:
        config = load_recipe(recipe, "small", {"name": f"demo_{recipe}", "train.epochs": args.epochs})
        summary = train(config, args.runs_dir, overwrite=True, quiet=args.quiet)
        if is_main_process():
            update_plots(RunDir(args.runs_dir, config.name).path)
        rows.append((label, summary))
    print(f"\n{'run':45s} {'train acc':>9s} {'val acc':>8s} {'test acc':>8s} {'time':>6s}")
    for label, s in rows:
        print(f"{label:45s} {s['train_metric']:9.3f} {s['val_metric']:8.3f} {s['test_metric']:8.3f} {s['seconds']:5.0f}s")
    print(f"\nRuns, metrics.csv and plots are in {args.runs_dir}/demo_*.")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from repguide.config import parse_overrides
    from repguide.reproduce import reproduce

    only = args.only.split(",") if args.only else None
    recipes = args.recipes.split(",") if args.recipes else None
    path = reproduce(args.scale, args.seeds, args.runs_dir, only, args.report, quiet=not args.progress,
                     overrides=parse_overrides(args.overrides), recipes=recipes)
    print(f"wrote {path}")
    return 0


def _eval_splits(args: argparse.Namespace):
    """The data to measure on: --data, else the data the first run folder among the models used."""
    from pathlib import Path

    from repguide import data
    from repguide.build import build_data, check_model_ref, run_config
    from repguide.config import parse_overrides

    if args.data is not None:
        return data.create(args.data, **parse_overrides(args.data_kwargs))
    for ref in (args.a, args.b):
        path = Path(ref)
        if path.exists():
            config = run_config(path if path.is_dir() else path.parent)
            return build_data(config.data)
    for ref in (args.a, args.b):
        check_model_ref(ref)  # a misspelt model says so, not that --data is missing
    raise ArgumentError("give --data: neither model is a run folder whose data could be used")


def _two_models(args: argparse.Namespace):
    from repguide.build import load_model
    from repguide.config import parse_overrides

    splits = _eval_splits(args)
    a = load_model(args.a, splits, seed=args.seed_a, kwargs=parse_overrides(args.a_kwargs))
    b = load_model(args.b, splits, seed=args.seed_b, kwargs=parse_overrides(args.b_kwargs))
    return a, b, getattr(splits, args.split)


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repguide.analysis import compare, ordered_batches
    from repguide.report import plot_similarity_matrix

    a, b, dataset = _two_models(args)
    batches = ordered_batches(dataset, args.batch_size, args.examples)
    result = compare(a, b, batches, args.layers_a, args.layers_b, reduction=args.reduction, layers=args.layers)
    out = args.out or f"compare_{Path(args.a).name}_{Path(args.b).name}".replace(":", "_")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    title = f"{args.a} vs {args.b}: minibatch linear CKA, {result.examples} {args.split} examples"
    for path in (result.to_csv(f"{out}.csv"), plot_similarity_matrix(result, f"{out}.png", title, (args.a, args.b))):
        print(f"wrote {path}")
    return 0


def _consistency(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from repguide.analysis import correct, error_consistency, ordered_batches

    _check_same_task(args)
    a, b, dataset = _two_models(args)
    hits = [correct(m, ordered_batches(dataset, args.batch_size, args.examples)) for m in (a, b)]
    print(json.dumps(asdict(error_consistency(*hits)), indent=2))
    return 0


def _check_same_task(args: argparse.Namespace) -> None:
    """Error consistency compares two classifiers' answers on the same examples: refuse run
    folders trained on another data set than the one measured on."""
    from pathlib import Path

    from repguide.build import run_config

    trained = {}
    for ref in (args.a, args.b):
        path = Path(ref)
        if path.exists():
            trained[ref] = run_config(path if path.is_dir() else path.parent).data.name
    used = args.data if args.data is not None else next(iter(trained.values()), None)
    other = [f"{ref} was trained on {name}" for ref, name in trained.items() if name != used]
    if other:
        raise ArgumentError(
            f"error consistency compares two classifiers on the same task, but {' and '.join(other)}, "
            f"not {used}; give two models of one data set"
        )


def _report(args: argparse.Namespace) -> int:
    from repguide.report import report_run

    for path in report_run(args.run_dir, split=args.split, examples=args.examples,
                           batch_size=args.batch_size, reduction=args.reduction):
        print(f"wrote {path}")
    return 0


def _add_model_pair(parser: argparse.ArgumentParser) -> None:
    refs = "a model name (untrained), a run folder (runs/<name>, its final.pt), a weights file in one, or NAME:WEIGHTS"
    parser.add_argument("a", help=refs)
    parser.add_argument("b", help="the same kinds as a")
    parser.add_argument("--data", default=None, help="data set name (default: the data of a run folder given)")
    parser.add_argument("--data-kwargs", nargs="*", default=[], help="key=value")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--examples", type=int, default=None, help="use the first N examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--a-kwargs", nargs="*", default=[], help="size knobs of a model name, key=value")
    parser.add_argument("--b-kwargs", nargs="*", default=[], help="size knobs of b")
    parser.add_argument("--seed-a", type=int, default=0, help="initialisation seed of a model name")
    parser.add_argument("--seed-b", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repguide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one recipe (a shipped name or a YAML file)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="key=value overrides, dotted (train.epochs=3)")
    run.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run folder that holds results")
    run.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    run.set_defaults(func=_run)

    rep = sub.add_parser("reproduce", help="train every recipe the paper's claims need; write REPRODUCTION.md")
    rep.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    rep.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    rep.add_argument("--seeds", type=int, default=3)
    rep.add_argument("--runs-dir", default=None, help="default: runs/reproduce-<scale>")
    rep.add_argument("--only", default=None, help="comma-separated claim ids, e.g. C1,C4")
    rep.add_argument("--recipes", default=None,
                     help="comma-separated recipes or row run names: train only these rows (and their guides)")
    rep.add_argument("--report", default="REPRODUCTION.md")
    rep.add_argument("--progress", action="store_true", help="progress bars instead of log lines")
    rep.set_defaults(func=_reproduce)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=_recipes)

    layers = sub.add_parser("layers", help="list a model's candidate layers in execution order")
    layers.add_argument("model")
    layers.add_argument("kwargs", nargs="*", help="model size knobs, key=value")
    layers.add_argument("--data", default=None, help="data set giving the example input (default: the data of a recipe using the model)")
    layers.add_argument("--data-kwargs", nargs="*", default=[])
    layers.add_argument("--layers", default="blocks", choices=_LAYER_RULES, help="the layer rule")
    layers.set_defaults(func=_layers)

    pairs = sub.add_parser("pairs", help="a recipe's pairs before training: initial similarity, floor, variance shares")
    pairs.add_argument("recipe")
    pairs.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    pairs.add_argument("--scale", default="small", choices=["tiny", "small", "paper"])
    pairs.add_argument("--runs-dir", default="runs", help="where a trained guide's run is found")
    pairs.set_defaults(func=_pairs)

    demo = sub.add_parser("demo", help="guided vs unguided deep FCN on Fashion-MNIST (a few minutes)")
    demo.add_argument("--runs-dir", default="runs")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_demo)

    cmp = sub.add_parser("compare", help="layer×layer similarity of two models over a data set (CSV + heatmap)")
    _add_model_pair(cmp)
    cmp.add_argument("--layers", default="blocks", choices=_LAYER_RULES, help="the layer rule (default: blocks)")
    cmp.add_argument("--layers-a", nargs="*", default=None, help="layer names or globs (default: candidate layers)")
    cmp.add_argument("--layers-b", nargs="*", default=None)
    cmp.add_argument("--reduction", default="flatten", choices=["flatten", "mean"])
    cmp.add_argument("--out", default=None, help="writes OUT.csv and OUT.png (default: compare_<a>_<b>)")
    cmp.set_defaults(func=_compare)

    cons = sub.add_parser("consistency", help="error consistency (Cohen's kappa) of two classifiers")
    _add_model_pair(cons)
    cons.set_defaults(func=_consistency)

    report = sub.add_parser("report", help="plots of a finished run, with start/end target-vs-guide heatmaps")
    report.add_argument("run_dir")
    report.add_argument("--split", default="val", choices=["train", "val", "test"])
    report.add_argument("--examples", type=int, default=2048)
    report.add_argument("--batch-size", type=int, default=256)
    report.add_argument("--reduction", default=None, choices=["flatten", "mean"], help="default: the run's")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (argparse stops a positional list at the
    # first option), so collect the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if getattr(args, "command", None) == "reproduce" and args.runs_dir is None:
        args.runs_dir = f"runs/reproduce-{args.scale}"
    # Errors about the user's input, files or machine: one line and exit status 2, no traceback.
    # Anything else is a bug in repguide and keeps its traceback (Python exits with status 1).
    try:
        return args.func(args)
    except RepguideError as err:
        print(f"repguide: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _MACHINE_ERRNOS:
            raise
        print(f"repguide: error: {err.strerror}: {err.filename or ''} ({_MACHINE_ERRNOS[err.errno]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repguide: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: the traceback stays, with a word on what to do with it
        if hasattr(err, "add_note"):
            err.add_note(_BUG_NOTE)
        else:  # Python 3.10
            print(_BUG_NOTE, file=sys.stderr)
        raise


_BUG_NOTE = (
    "repguide: this is a bug in repguide, not a problem with your input; please report it with "
    "the command you ran and the traceback above"
)

# The OS errors a user fixes on their machine, and what to do about each.
_MACHINE_ERRNOS = {
    errno.ENOSPC: "free some disk space, then continue with --resume",
    errno.EDQUOT: "free some of your disk quota, then continue with --resume",
    errno.EACCES: "fix the permissions, or choose another folder",
    errno.EPERM: "fix the permissions, or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOENT: "check the path",
}


if __name__ == "__main__":
    sys.exit(main())
