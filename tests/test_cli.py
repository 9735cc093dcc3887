"""Bad input gets a clear error: what is wrong and how to fix it, exit status 2 (or an exception from
the Python API), and nothing lost. Every message checked here is recorded, and docs/errors.md is the
table of them: regenerate it with ``REPGUIDE_WRITE_ERRORS_DOC=1 pytest tests/test_cli.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import repguide as rg
from repguide.cli import main
from repguide.config import SCALES, list_recipes, load_recipe
from repguide.data.images import DEFAULT_ROOT, ENV_VAR, INSTALL_COMMAND
from repguide.runs import RunDir, RunDirError, atomic_save

FMNIST = Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FMNIST} (as root: {INSTALL_COMMAND})",
)

RECIPE = "deep_fcn_untrained_resnet18"
DOC = Path(__file__).parents[1] / "docs" / "errors.md"

# id -> (bad input, how it was given, message with the test's temporary paths and pid replaced)
MESSAGES: dict[str, tuple[str, str, str]] = {}


def record(case: str, bad_input: str, given: str, message: str, tmp_path: Path) -> None:
    message = message.replace(str(tmp_path), "$TMP").replace(f"process {os.getpid()}", "process $PID")
    MESSAGES[case] = (bad_input, given, message)


def run_args(tmp_path: Path, *args: str) -> list[str]:
    return ["run", RECIPE, "--scale", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet", *args]


def cli_error(tmp_path: Path, capsys, *args: str) -> str:
    """Run ``repguide run`` on the tiny recipe; assert exit status 2; return the one-line error."""
    assert main(run_args(tmp_path, *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("repguide: error: ") and "Traceback" not in err
    return err.rstrip("\n")


def nothing_written(tmp_path: Path) -> bool:
    """A failed fresh run leaves no results, so the corrected command needs no --overwrite."""
    return not RunDir(tmp_path / "runs", RECIPE).has_results()


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def mlp(width_in: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(width_in, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def existing_run(tmp_path: Path, **overrides) -> Path:
    """A run folder as a run of the tiny recipe leaves it: config.yaml and metrics.csv."""
    run = RunDir(tmp_path / "runs", RECIPE)
    run.path.mkdir(parents=True)
    run.write_config(load_recipe(RECIPE, "tiny", overrides).model_dump(mode="json"))
    (run.path / "metrics.csv").write_text("step,epoch,split,loss\n1,0,train,2.3\n")
    return run.path


# --------------------------------------------------------------------------------------------
# Recipes and overrides


def test_unknown_recipe_names_the_closest_recipes(tmp_path, capsys):
    assert main(["run", "deep_fcn_untrained_resnt18", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert "no recipe 'deep_fcn_untrained_resnt18'" in err and "Did you mean deep_fcn_untrained_resnet18" in err
    record("recipe", "unknown recipe", "`repguide run deep_fcn_untrained_resnt18`", err, tmp_path)


def test_unknown_recipe_key_suggests_the_right_key(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "train.epoch=3")
    assert "unknown key 'train.epoch' (did you mean 'train.epochs'?)" in err
    assert nothing_written(tmp_path)
    record("key", "unknown recipe key", "`train.epoch=3`", err, tmp_path)


def test_wrong_type_names_the_key_and_the_value(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "train.epochs=three")
    assert "train.epochs: Input should be a valid integer" in err and "(got 'three')" in err
    record("type", "wrong type", "`train.epochs=three`", err, tmp_path)


def test_override_without_a_value_shows_the_form(tmp_path, capsys):
    assert main(["run", RECIPE, "train.epochs", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert "override 'train.epochs' must look like key=value, e.g. train.epochs=3" in err
    record("override", "override without `=`", "`repguide run deep_fcn_untrained_resnet18 train.epochs`", err, tmp_path)


@pytest.mark.parametrize("recipe", list_recipes())
@pytest.mark.parametrize("scale", SCALES)
def test_every_shipped_recipe_validates_at_every_scale(recipe, scale):
    assert load_recipe(recipe, scale).scale == scale


def test_invalid_recipe_yaml_names_the_file_and_the_line(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: deep_fcn_baseline\ntrain:\n  epochs: [3\n")
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert f"recipe {recipe} is not valid YAML at line 4" in err and "Traceback" not in err
    record("yaml", "recipe file that is not valid YAML", "`repguide run mine.yaml` (an unclosed `[`)", err, tmp_path)


def test_override_value_that_is_not_yaml_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "train.epochs=[3")
    assert "override 'train.epochs=[3': the value is not valid YAML" in err
    record("override-yaml", "override value that is not valid YAML", "`train.epochs=[3`", err, tmp_path)


# (override, bad input, message): every size, count and weight is checked when the recipe loads.
OUT_OF_RANGE = [
    ("optim.grad_clip=-1", "negative gradient clip (reverses the gradient)",
     "optim.grad_clip: must be a finite number > 0, or null for no clipping (got -1)"),
    ("guidance.off_after=0", "`off_after` of 0 steps",
     "guidance.off_after: must be an integer >= 1, or null to keep guidance on (got 0)"),
    ("guidance.weight=nan", "NaN guidance weight", "guidance.weight: must be a finite number >= 0 (got 'nan')"),
    ("guidance.weight=-1", "negative guidance weight", "guidance.weight: must be a finite number >= 0 (got -1)"),
    ("guidance.temperature=0", "distillation temperature 0", "guidance.temperature: must be a finite number > 0 (got 0)"),
    ("guidance.init_steps=-2", "negative initialisation steps", "guidance.init_steps: must be an integer >= 0 (got -2)"),
    ("guidance.sketch_dim=0", "sketch width 0", "guidance.sketch_dim: must be an integer >= 1, or null for no sketch (got 0)"),
    ("train.epochs=-1", "negative epochs", "train.epochs: must be an integer >= 1 (got -1)"),
    ("train.max_steps=-5", "negative `max_steps`", "train.max_steps: must be an integer >= 1, or null for the whole schedule (got -5)"),
    ("train.batch_size=-4", "negative batch size", "train.batch_size: must be an integer >= 1 (got -4)"),
    ("train.batch_size=0", "batch size 0", "train.batch_size: must be an integer >= 1 (got 0)"),
    ("train.eval_batch_size=0", "evaluation batch size 0", "train.eval_batch_size: must be an integer >= 1 (got 0)"),
    ("train.log_every=0", "`log_every` 0", "train.log_every: must be an integer >= 1 (got 0)"),
    ("train.checkpoint_every=0", "`checkpoint_every` 0", "train.checkpoint_every: must be an integer >= 1 (got 0)"),
    ("train.num_nodes=0", "0 nodes", "train.num_nodes: must be an integer >= 1 (got 0)"),
    ("train.devices=0", "0 devices", "train.devices: must be an integer >= 1, 'auto', or device indices such as '0,1' (got 0)"),
    ("optim.lr=0", "learning rate 0", "optim.lr: must be a finite number > 0 (got 0)"),
    ("optim.lr=.inf", "infinite learning rate", "optim.lr: must be a finite number > 0 (got inf)"),
    ("optim.weight_decay=-0.1", "negative weight decay", "optim.weight_decay: must be a finite number >= 0 (got -0.1)"),
    ("optim.momentum=-0.9", "negative momentum", "optim.momentum: must be a finite number >= 0 (got -0.9)"),
    ("optim.gamma=-0.1", "negative lr decay factor", "optim.gamma: must be a finite number >= 0 (got -0.1)"),
    ("optim.step_epochs=0", "lr step every 0 epochs", "optim.step_epochs: must be an integer >= 1 (got 0)"),
    ("data.kwargs.train_size=-5", "negative training-set size", "data.kwargs.train_size: must be an integer >= 1 (got -5)"),
]


@pytest.mark.parametrize("override, bad_input, message", OUT_OF_RANGE, ids=[o for o, _, _ in OUT_OF_RANGE])
def test_value_out_of_range_names_the_key_the_value_and_the_range(tmp_path, capsys, override, bad_input, message):
    err = cli_error(tmp_path, capsys, override)
    assert err == f"repguide: error: invalid run config:\n  {message}"
    assert nothing_written(tmp_path)
    record(f"range {override}", bad_input, f"`{override}`", err, tmp_path)


def test_unknown_accelerator_lists_the_known_ones(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "train.accelerator=gpuu")
    assert "train.accelerator: Input should be 'auto', 'cpu', 'cuda', 'gpu', 'mps' or 'tpu' (got 'gpuu')" in err
    record("accelerator", "unknown accelerator", "`train.accelerator=gpuu`", err, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_gpu_accelerator_on_a_machine_without_one_says_what_to_use(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "train.accelerator=gpu")
    assert "train.accelerator='gpu', but torch finds no such device on this machine" in err
    assert "train.accelerator=auto" in err and nothing_written(tmp_path)
    record("no-gpu", "GPU accelerator on a machine without one", "`train.accelerator=gpu`", err, tmp_path)


def test_model_option_of_the_wrong_type_names_it(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "model.kwargs.width=abc")
    assert "model.kwargs.width: Input should be a valid integer (got 'abc')" in err
    record("model-option-type", "model option of the wrong type", "`model.kwargs.width=abc`", err, tmp_path)


def test_unknown_data_option_lists_the_options(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "data.kwargs.trian_size=100")
    assert "data.kwargs: data set 'fashion_mnist' has no option 'trian_size'; it accepts " in err
    assert "Did you mean train_size?" in err
    record("data-option", "unknown data set option", "`data.kwargs.trian_size=100`", err, tmp_path)


@needs_fmnist
def test_a_data_option_value_the_data_set_refuses_names_its_key(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "data.kwargs.canvas=10")
    assert err == "repguide: error: data.kwargs of 'fashion_mnist': canvas must be at least 28, got 10"
    assert nothing_written(tmp_path)
    record("data-value", "a data option's value the data set refuses", "`data.kwargs.canvas=10`", err, tmp_path)


@needs_fmnist
def test_a_token_model_on_image_data_names_the_knob_the_data_does_not_give(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "model.name=lstm_lm", "model.kwargs={}")
    assert "model 'lstm_lm' needs 'vocab_size', which this data set does not give" in err and "model.kwargs" in err
    assert nothing_written(tmp_path)
    given = "`model.name=lstm_lm model.kwargs={}`"
    record("token-model-on-images", "a token model on image data", given, err, tmp_path)


def test_unknown_initial_state_of_a_recurrent_model_names_the_values(tmp_path, capsys):
    args = ["run", "copy_rnn_baseline", "--scale", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert main([*args, "model.kwargs.initial_state=final"]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert err.startswith("repguide: error: ") and "Traceback" not in err
    assert "model.kwargs of 'copy_rnn': initial_state must be one of 'zeros', 'carry', got 'final'" in err
    assert not RunDir(tmp_path / "runs", "copy_rnn_baseline").has_results()
    record("initial-state", "unknown initial state of a recurrent model", "`model.kwargs.initial_state=final`", err, tmp_path)


def test_guided_mode_without_a_guide_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.guide=null")
    assert "guidance.mode='guide' needs guidance.guide (a model name and kwargs)" in err
    record("no-guide", "guidance without a guide", "`guidance.guide=null`", err, tmp_path)


def test_initialisation_and_off_after_together_are_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.init_steps=5", "guidance.off_after=3")
    assert "guidance.init_steps=5 and guidance.off_after=3 cannot both be set" in err
    record("init-off-after", "initialisation steps and `off_after` together",
           "`guidance.init_steps=5 guidance.off_after=3`", err, tmp_path)


def test_guide_feature_cache_with_a_noise_input_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.cache=true", "guidance.guide_input=noise")
    assert "guidance.cache=true stores the guide's features" in err and "sees noise here" in err
    record("cache-noise", "guide-feature cache with a guide that sees noise",
           "`guidance.cache=true guidance.guide_input=noise`", err, tmp_path)


def test_guide_feature_cache_with_augmentation_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.cache=true", "data.kwargs.augment=flip")
    assert "data.kwargs.augment='flip' augments its examples at random" in err
    record("cache-augment", "guide-feature cache with random augmentation",
           "`guidance.cache=true data.kwargs.augment=flip`", err, tmp_path)


def test_guide_feature_cache_with_resampled_data_is_an_error(tmp_path, capsys):
    recipe = "copy_rnn_untrained_transformer"
    args = ["run", recipe, "--scale", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert main([*args, "guidance.cache=true", "data.kwargs.resample=true"]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert err.startswith("repguide: error: invalid run config:") and "Traceback" not in err
    assert "guidance.cache=true stores the guide's features" in err and "data.kwargs.resample=true draws new examples" in err
    assert not (tmp_path / "runs").exists()
    for one in ({"guidance.cache": True}, {"data.kwargs.resample": True}):  # either alone is fine
        load_recipe(recipe, "tiny", one)
    load_recipe("parity_transformer_untrained_rnn", "tiny", {"data.kwargs.resample": True})
    with pytest.raises(ValueError, match="data.kwargs.resample=true draws new examples"):
        load_recipe("parity_transformer_untrained_rnn", "tiny", {"data.kwargs.resample": True, "guidance.cache": True})
    record("cache-resample", "guide-feature cache with training data resampled every epoch",
           "`guidance.cache=true data.kwargs.resample=true`", err, tmp_path)


def test_batch_that_the_processes_cannot_share_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "train.devices=3")
    assert "train.batch_size=64 must be divisible by the 3 processes (train.devices=3 x train.num_nodes=1)" in err
    record("world", "batch not divisible by the processes", "`train.devices=3` (batch 64)", err, tmp_path)


def test_training_set_smaller_than_one_batch_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "data.kwargs.train_size=10")
    assert "the training set has 10 examples (data.kwargs.train_size), fewer than one batch" in err
    record("small-train", "training set smaller than one batch", "`data.kwargs.train_size=10` (batch 64)", err, tmp_path)


@needs_fmnist
def test_unknown_model_lists_the_models(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "model.name=resnet19")
    assert "unknown model 'resnet19'; available: " in err and "Did you mean 'resnet18'?" in err
    assert nothing_written(tmp_path)
    record("model", "unknown model", "`model.name=resnet19`", err, tmp_path)


@needs_fmnist
def test_unknown_model_option_lists_the_options(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "model.kwargs.depht=3")
    assert "model 'deep_fcn' has no option 'depht'; it accepts " in err and "Did you mean depth?" in err
    record("model-option", "unknown model option", "`model.kwargs.depht=3`", err, tmp_path)


@needs_fmnist
def test_unknown_measure_lists_the_measures(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.measure=ckaa")
    assert "unknown similarity measure 'ckaa'; available: " in err and "Did you mean 'cka'?" in err
    record("measure", "unknown similarity measure", "`guidance.measure=ckaa`", err, tmp_path)


# --------------------------------------------------------------------------------------------
# Layers, pairs and the guide


@needs_fmnist
def test_unknown_layer_name_lists_the_closest_names(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.pairs=[[blocks.0.linaer, conv1]]")
    assert "the target has no layer named 'blocks.0.linaer'. Closest: blocks.0.linear" in err
    assert nothing_written(tmp_path)
    record("layer", "unknown layer name", "`guidance.pairs=[[blocks.0.linaer, conv1]]`", err, tmp_path)


@needs_fmnist
def test_empty_pairing_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.pairs=[]")
    assert "the pairing is empty: give at least one (target layer, guide layer) pair" in err
    record("pairs", "empty pairing", "`guidance.pairs=[]`", err, tmp_path)


@needs_fmnist
def test_unbiased_cka_on_fewer_than_4_examples_asks_for_a_larger_batch(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.measure=cka_unbiased", "train.batch_size=2")
    assert "guidance.measure='cka_unbiased' needs at least 4 examples per batch" in err
    assert "raise train.batch_size" in err and nothing_written(tmp_path)
    record("n<4", "n < 4 with the unbiased estimator", "`guidance.measure=cka_unbiased train.batch_size=2`", err, tmp_path)


def test_unbiased_cka_on_fewer_than_4_examples_in_python(tmp_path):
    target, guide = mlp(), mlp()
    guidance = rg.Guidance(target, guide, measure="cka_unbiased")
    with pytest.raises(ValueError, match="needs at least 4 examples") as err:
        guidance(torch.randn(3, 10))
    record("n<4-python", "n < 4 with the unbiased estimator (Python)",
           '`Guidance(target, guide, measure="cka_unbiased")` on a batch of 3', str(err.value), tmp_path)


@needs_fmnist
def test_guide_that_does_not_accept_the_targets_inputs_suggests_guide_input(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.guide.kwargs.in_channels=3")
    assert "the guide failed on the target's inputs (RuntimeError: " in err and "3 channels" in err
    assert "guide_input= a callable" in err and nothing_written(tmp_path)
    record("guide-input", "guide that does not accept the target's inputs",
           "`guidance.guide.kwargs.in_channels=3` (a 3-channel ResNet guide, 1-channel images)", err, tmp_path)


def test_guide_that_does_not_accept_the_targets_inputs_in_python(tmp_path):
    guidance = rg.Guidance(mlp(10), mlp(12))
    with pytest.raises(ValueError, match="the guide failed on the target's inputs") as err:
        guidance(torch.randn(8, 10))
    assert isinstance(err.value.__cause__, RuntimeError)  # the guide's own error stays attached
    record("guide-input-python", "guide that does not accept the target's inputs (Python)",
           "`Guidance(target, guide)` with a guide taking 12 features, a target taking 10", str(err.value), tmp_path)


def test_guide_and_target_inputs_of_different_batch_size(tmp_path):
    half = rg.Guidance(mlp(), mlp(), guide_input=lambda args, kwargs: ((args[0][:4],), kwargs))
    with pytest.raises(ValueError, match="batch size 4 but the target's have 8") as err:
        half(torch.randn(8, 10))
    record("batch", "guide and target inputs of different batch size",
           "`Guidance(..., guide_input=lambda a, k: ((a[0][:4],), k))` on a batch of 8", str(err.value), tmp_path)


# --------------------------------------------------------------------------------------------
# Data, folders, checkpoints


@needs_fmnist
def test_missing_data_set_gives_the_install_command(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ENV_VAR, str(empty))
    err = cli_error(tmp_path, capsys)
    assert f"Fashion-MNIST not found in {empty}" in err and INSTALL_COMMAND in err and ENV_VAR in err
    assert nothing_written(tmp_path)
    record("data", "missing data set", f"`{ENV_VAR}` set to an empty folder", err, tmp_path)


def test_unwritable_run_folder_names_it(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    err = cli_error(tmp_path, capsys)
    assert f"cannot write the run folder {blocker / RECIPE} (Not a directory)" in err and "--runs-dir" in err
    assert blocker.read_text() == "a file where the runs folder should be"
    record("folder", "unwritable run folder", "`--runs-dir` under a regular file", err, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_run_folder_names_it(tmp_path, capsys):
    (tmp_path / "runs").mkdir(mode=0o555)
    err = cli_error(tmp_path, capsys)
    assert "cannot write the run folder" in err and "Permission denied" in err


def test_folder_with_results_is_not_overwritten_without_overwrite(tmp_path, capsys):
    folder = existing_run(tmp_path)
    before = files(folder)
    err = cli_error(tmp_path, capsys)
    assert f"{folder} already holds results; pass --resume" in err and "--overwrite" in err
    assert files(folder) == before
    record("clobber", "run folder that already holds results", "the same command twice, without `--resume`", err, tmp_path)


@pytest.mark.parametrize("name", ["..", ".", "/elsewhere", "a/b", "../runs2", ".hidden"])
def test_run_name_that_leaves_the_runs_folder_is_refused_and_nothing_is_deleted(tmp_path, capsys, name):
    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs" / "notes.txt").write_text("mine too")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    err = cli_error(tmp_path, capsys, f"name={name}", "--overwrite")
    assert f"name: {name!r} is not a run name: a run is one folder directly under the runs folder" in err
    assert "--runs-dir" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    if name == "..":
        record("run-name", "run name that is a path", "`name=.. --overwrite`", err, tmp_path)


def test_run_name_is_checked_where_the_folder_is_opened_too(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"name: '\.\.' is not a run name"):
        RunDir(tmp_path / "runs", "..").open(resume=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_deletes_only_the_files_repguide_wrote(tmp_path):
    folder = existing_run(tmp_path)
    for own in ("final.pt", "summary.json", "curves.png", ".metrics.csv.tmp", ".final.pt.abc123.tmp"):
        (folder / own).write_text("repguide's")
    for mine in ("notes.txt", "analysis.ipynb", ".mine.tmp", "final.pt.bak"):
        (folder / mine).write_text("the user's")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.txt").write_text("the user's")
    run = RunDir(tmp_path / "runs", RECIPE)
    run.open(resume=False, overwrite=True)
    run.close()
    assert sorted(p.name for p in folder.iterdir()) == [".mine.tmp", "analysis.ipynb", "final.pt.bak", "notes.txt", "sub"]
    assert (folder / "sub" / "x.txt").read_text() == "the user's"


def test_overwrite_never_follows_a_link_out_of_the_runs_folder(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.csv").write_text("someone else's")
    (outside / "final.pt").write_text("someone else's")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / RECIPE).symlink_to(outside)
    err = cli_error(tmp_path, capsys, "--overwrite")
    assert f"{tmp_path / 'runs' / RECIPE} is a link" in err and "repguide writes only real folders" in err
    assert sorted(p.name for p in outside.iterdir()) == ["final.pt", "metrics.csv"]
    real = existing_run(tmp_path / "second")
    (real / "final.pt").symlink_to(outside / "final.pt")  # a link inside the run folder: removed, not followed
    run = RunDir(tmp_path / "second" / "runs", RECIPE)
    run.open(resume=False, overwrite=True)
    run.close()
    assert not (real / "final.pt").exists() and (outside / "final.pt").read_text() == "someone else's"


def test_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    holder = RunDir(tmp_path / "runs", RECIPE)
    holder.open(resume=False, overwrite=False)
    try:
        err = cli_error(tmp_path, capsys)
    finally:
        holder.close()
    assert f"is in use by process {os.getpid()}; two runs cannot write the same folder" in err
    record("lock", "run folder in use by a live run", "a second `repguide run` on the same folder", err, tmp_path)


def test_resume_of_a_run_that_has_no_checkpoint_says_it_starts_from_step_0(tmp_path, capsys):
    assert main(run_args(tmp_path, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'runs' / RECIPE} has no checkpoint to resume from; training from step 0" in out
    assert RunDir(tmp_path / "runs", RECIPE).is_finished()


def test_resume_with_an_incompatible_config_names_the_differences(tmp_path, capsys):
    folder = existing_run(tmp_path)
    before = files(folder)
    err = cli_error(tmp_path, capsys, "--resume", "model.kwargs.width=32", "optim.lr=0.01")
    assert "its config differs from this one in model.kwargs.width, optim.lr" in err
    assert "resume with the same recipe and overrides" in err
    assert files(folder) == before
    record("resume-config", "resume with an incompatible config",
           "`--resume model.kwargs.width=32 optim.lr=0.01`", err, tmp_path)


def fake_checkpoint(state_dict: dict) -> dict:
    return {"step": 2, "target": state_dict, "optimizer": {}, "guidance_step": torch.zeros(()), "best": None}


@needs_fmnist
def test_checkpoint_from_another_model_is_refused(tmp_path, capsys):
    folder = existing_run(tmp_path)
    other = rg.models.create("deep_fcn", depth=4, width=32)
    atomic_save(fake_checkpoint(other.state_dict()), folder / "last.ckpt")
    before = files(folder)
    err = cli_error(tmp_path, capsys, "--resume")
    assert f"the checkpoint in {folder} is from another model (size mismatch for blocks.0.linear.weight" in err
    assert "--overwrite" in err and files(folder) == before
    record("checkpoint-model", "checkpoint from another model", "a `last.ckpt` of a wider FCN, `--resume`", err, tmp_path)


@needs_fmnist
def test_every_checkpoint_unreadable_is_a_clear_error(tmp_path, capsys):
    folder = existing_run(tmp_path)
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    (folder / "prev.ckpt").write_bytes(b"")
    before = files(folder)
    err = cli_error(tmp_path, capsys, "--resume")
    assert f"no readable checkpoint in {folder}" in err
    assert f"checkpoint {folder / 'last.ckpt'} is unreadable" in err and "prev.ckpt is unreadable" in err
    assert "start the run again with --overwrite" in err and files(folder) == before
    record("checkpoint-corrupt", "every checkpoint truncated or corrupt", "`--resume`", err, tmp_path)


@needs_fmnist
def test_trained_guide_weights_from_another_model_are_refused(tmp_path, capsys):
    weights = tmp_path / "fcn_final.pt"
    atomic_save(rg.models.create("deep_fcn", depth=4, width=16).state_dict(), weights)
    err = cli_error(tmp_path, capsys, f"guidance.guide_run={weights}")
    assert f"{weights} does not fit the guide resnet18" in err and "point guidance.guide_run at" in err
    record("guide-weights", "trained guide weights from another model", "`guidance.guide_run=fcn_final.pt`", err, tmp_path)


@needs_fmnist
def test_trained_guide_that_was_never_trained_says_how_to_train_it(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.guide_run=resnet18_fmnist")
    assert "trained guide 'resnet18_fmnist': no weights at " in err
    assert "train it first (repguide run resnet18_fmnist --scale tiny)" in err
    record("guide-run", "trained guide whose run does not exist", "`guidance.guide_run=resnet18_fmnist`", err, tmp_path)


@needs_fmnist
def test_nonfinite_loss_names_the_step_and_what_to_change(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "optim.lr=1e30")
    assert "non-finite value at step 2 (counted as in metrics.csv): task loss = nan" in err
    assert "train.nonfinite=skip" in err
    record("nonfinite", "learning rate so large the loss becomes NaN", "`optim.lr=1e30`", err, tmp_path)


def test_an_internal_bug_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    import repguide.cli as cli

    def broken(args):
        raise ValueError("too many values to unpack (expected 2)")  # like a bug deep in repguide

    monkeypatch.setattr(cli, "_recipes", broken)
    with pytest.raises(ValueError, match="too many values") as info:
        cli.main(["recipes"])
    assert any("this is a bug in repguide" in note for note in getattr(info.value, "__notes__", []))


def test_disk_full_is_one_line_that_says_what_to_do(monkeypatch, capsys):
    import errno

    import repguide.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/last.ckpt")

    monkeypatch.setattr(cli, "_recipes", full)
    assert cli.main(["recipes"]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert err == "repguide: error: No space left on device: runs/x/last.ckpt (free some disk space, then continue with --resume)"
    record("disk-full", "disk full while writing", "(any command)", err, Path("/nonexistent"))


def test_the_command_line_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "repguide.cli", "run", "no_such_recipe", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("repguide: error: no recipe 'no_such_recipe'") and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Provenance, shared guides, guide modes, analysis of different tasks


@needs_fmnist
def test_resume_of_a_folder_without_its_config_refuses_and_records_nothing(tmp_path, capsys):
    folder = existing_run(tmp_path)
    (folder / "config.yaml").unlink()
    before = files(folder)
    err = cli_error(tmp_path, capsys, "--resume", "optim.lr=0.5", "train.seed=3")
    assert "its config.yaml is missing and no checkpoint says which config made its results" in err
    assert files(folder) == before  # no config.yaml credited with values the run did not use
    record("resume-no-config", "resume of a run folder whose config.yaml was deleted",
           "`rm config.yaml; --resume optim.lr=0.5`", err, tmp_path)


@needs_fmnist
def test_guide_mode_train_with_the_guide_feature_cache_is_an_error(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "guidance.cache=true", "guidance.guide_mode=train")
    assert "guidance.guide_mode=train gives new ones at every step" in err
    record("cache-guide-mode", "guide-feature cache with a guide in train mode",
           "`guidance.cache=true guidance.guide_mode=train`", err, tmp_path)


def test_error_consistency_of_runs_of_different_tasks_is_a_clear_error(tmp_path, capsys):
    images = existing_run(tmp_path)
    tokens = RunDir(tmp_path / "other", "copy")
    tokens.path.mkdir(parents=True)
    from repguide.config import load_recipe

    tokens.write_config(load_recipe("copy_rnn_baseline", "tiny", []).model_dump(mode="json"))
    assert main(["consistency", str(images), str(tokens.path)]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert "error consistency compares two classifiers on the same task" in err and "was trained on copy" in err
    record("consistency-tasks", "error consistency of runs of different tasks",
           "`repguide consistency runs/deep_fcn_… runs/copy_…`", err, tmp_path)


def test_a_guide_sharing_a_module_with_the_target_is_an_error(tmp_path):
    shared = nn.Linear(10, 8)
    target = nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 3))
    guide = nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="the guide shares the target's module '0'") as err:
        rg.Guidance(target, guide)
    record("shared-module", "guide sharing a module with the target (Python)",
           "`Guidance(target, guide)` with `guide[0] is target[0]`", str(err.value), tmp_path)


def test_guide_mode_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="guide_mode must be one of eval, train") as err:
        rg.Guidance(nn.Linear(4, 4), nn.Linear(4, 4), guide_mode="dropout")
    record("guide-mode", "unknown guide mode (Python)", '`Guidance(..., guide_mode="dropout")`', str(err.value), tmp_path)


def test_packed_guide_with_per_position_similarity_or_cache_is_an_error(tmp_path, capsys):
    recipe = "parity_transformer_untrained_rnn"
    args = ["run", recipe, "--scale", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert main([*args, "guidance.guide.kwargs.packed=true", "guidance.reduction=tokens"]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert err.startswith("repguide: error: invalid run config:") and "Traceback" not in err
    assert "guidance.reduction=tokens compares" in err and "guidance.guide.kwargs.packed=true" in err
    assert not (tmp_path / "runs").exists()
    load_recipe(recipe, "tiny", {"guidance.guide.kwargs.packed": True})  # flatten, no cache: fine
    with pytest.raises(ValueError, match="guidance.cache=true stores"):
        load_recipe(recipe, "tiny", {"guidance.guide.kwargs.packed": True, "guidance.cache": True})
    record("packed-tokens", "a packed guide with per-position similarity",
           "`guidance.guide.kwargs.packed=true guidance.reduction=tokens`", err, tmp_path)


def test_fused_recurrent_layers_with_a_carried_state_is_an_error(tmp_path, capsys):
    args = ["run", "copy_rnn_baseline", "--scale", "tiny", "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    assert main([*args, "model.kwargs.fused=true", "model.kwargs.initial_state=carry"]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert err.startswith("repguide: error: ") and "Traceback" not in err
    assert "fused" in err and "initial_state" in err and "model.kwargs of 'copy_rnn'" in err
    record("fused-carry", "one fused multi-layer RNN whose layers should carry their state",
           "`model.kwargs.fused=true model.kwargs.initial_state=carry`", err, tmp_path)


def test_the_cli_offers_every_layer_rule():
    from repguide import cli
    from repguide.capture import LAYER_RULES

    assert cli._LAYER_RULES == list(LAYER_RULES)  # spelled out there so --help does not import torch


# --------------------------------------------------------------------------------------------
# docs/errors.md


def errors_table() -> str:
    lines = [
        "# Errors",
        "",
        "Every bad input below was tried by `tests/test_cli.py`, and the message is the one it got",
        "(`$TMP` stands for the test's temporary folder, `$PID` for a process id). On the command line each",
        "exits with status 2 and prints only the message; the Python API raises a `repguide.RepguideError`",
        "subclass (most also derive from `ValueError`) with the same text. A failing command deletes nothing, and one that fails before training",
        "starts leaves no results behind, so the corrected command needs no `--overwrite`.",
        "",
        "Regenerate with `REPGUIDE_WRITE_ERRORS_DOC=1 .venv/bin/python -m pytest tests/test_cli.py`.",
        "",
        "| bad input | given as | message |",
        "|---|---|---|",
    ]
    for bad_input, given, message in MESSAGES.values():
        lines.append(f"| {bad_input} | {given.replace('|', chr(92) + '|')} | {_cell(message)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Exact text in a table cell: one code span per line (pipes escaped), lines joined by <br>."""
    spans = []
    for line in text.splitlines():
        line = line.replace("|", "\\|")
        fence = "``" if "`" in line else "`"
        spans.append(f"{fence} {line} {fence}" if fence == "``" else f"`{line}`")
    return "<br>".join(spans)


def test_docs_errors_md_is_the_table_of_these_messages():
    if not MESSAGES:
        pytest.skip("no message was recorded in this session")
    table = errors_table()
    if os.environ.get("REPGUIDE_WRITE_ERRORS_DOC"):
        DOC.write_text(table)
    documented = DOC.read_text().splitlines() if DOC.exists() else []
    stale = [row for row in table.splitlines() if row not in documented]
    assert not stale, "messages changed: regenerate docs/errors.md (see this file's docstring)\n" + "\n".join(stale)
    assert not re.search(r"/tmp/|pytest-of-", table)
