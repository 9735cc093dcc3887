"""Runs survive what happens to real runs: SIGKILL at any point, torn or foreign checkpoints, a second
process on the same folder, non-finite losses and gradients. Every comparison is bitwise (CPU)."""

from __future__ import annotations

import csv
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import repguide as rg
import repguide.train

from repguide.similarity import base as similarity  # the module that holds the registry
from repguide.cli import main
from repguide.config import load_recipe
from repguide.data.images import DEFAULT_ROOT, ENV_VAR, INSTALL_COMMAND
from repguide.errors import RepguideError
from repguide.runs import CheckpointError, RunDir, RunDirError, atomic_save
from repguide.steps import AlignmentWatch

from test_cli import cli_error, nothing_written, run_args as cli_run_args

FMNIST = Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FMNIST} (as root: {INSTALL_COMMAND})",
)

# A tiny guided run with dropout (deep_fcn's default 0.1) and BatchNorm: 4 steps per epoch, 12 steps,
# a checkpoint every 2 steps, so a kill can land before, between and after several checkpoints.
RECIPE = "deep_fcn_untrained_resnet18"
OVERRIDES = ["train.max_steps=12", "train.checkpoint_every=2", "train.epochs=6"]
ROWS_OF_A_FINISHED_RUN = 12 + 3 + 1  # train rows, one val row per epoch, the test row
TIMEOUT = 300


def run_args(runs_dir: Path, *extra: str) -> list[str]:
    return ["run", RECIPE, *OVERRIDES, "--scale", "tiny", "--runs-dir", str(runs_dir), "--quiet", *extra]


# Importing torch and Lightning takes seconds, so each run is forked from a process that has already
# imported them (as DataLoader workers are): a fresh `repguide run` process without the start-up cost.
FORK_SERVER = """
import json, os, sys, traceback
import repguide.cli, repguide.report, repguide.train

for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = repguide.cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Run:
    """One `repguide run` process, forked by the server; ``log`` holds its stdout and stderr."""

    def __init__(self, server: subprocess.Popen, argv: list[str], log: Path):
        self.server, self.log = server, log
        server.stdin.write(json.dumps([argv, str(log)]) + "\n")
        server.stdin.flush()
        self.pid = int(server.stdout.readline())
        try:  # signals through a pidfd reach this process, never a later one given the same pid
            self.pidfd: int | None = os.pidfd_open(self.pid)
        except ProcessLookupError:  # it has already ended
            self.pidfd = None
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""
        if self.returncode is not None:
            return self.returncode
        ended = self.pidfd is None or select.select([self.pidfd], [], [], 0)[0]
        return self.wait() if ended else None

    def kill(self) -> None:
        if self.returncode is None and self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:  # it had already ended
                pass

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = int(self.server.stdout.readline())
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
        return self.returncode

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """``runner(runs_dir, *extra_args)`` starts a tiny run in a fresh process and returns its :class:`Run`."""
    server = subprocess.Popen(
        [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    logs = tmp_path_factory.mktemp("logs")
    runs: list[Run] = []

    def start(runs_dir: Path, *extra: str) -> Run:
        if runs:
            runs[-1].wait()  # one at a time, even after a test that failed while its run was going
        runs.append(Run(server, run_args(runs_dir, *extra), logs / f"{len(runs)}.log"))
        return runs[-1]

    yield start
    server.stdin.close()
    server.wait(timeout=TIMEOUT)


def finish(run: Run) -> str:
    assert run.wait() == 0, run.output()
    return run.output()


def data_rows(folder: Path) -> int:
    try:
        return max((folder / "metrics.csv").read_text().count("\n") - 1, 0)
    except FileNotFoundError:
        return 0


def metrics(folder: Path) -> list[dict]:
    """metrics.csv without the wall-clock column."""
    with (folder / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "step_time"} for row in csv.DictReader(f)]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def assert_same_run(folder: Path, reference: Path) -> None:
    assert_same_weights(folder / "final.pt", reference / "final.pt")
    assert metrics(folder) == metrics(reference)
    summary, expected = (json.loads((f / "summary.json").read_text()) for f in (folder, reference))
    summary.pop("seconds"), expected.pop("seconds")
    assert summary == expected


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> Path:
    """The folder of the tiny run, trained once without interruption."""
    runs = tmp_path_factory.mktemp("reference")
    finish(runner(runs))
    return runs / RECIPE


def copy_run(reference: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / RECIPE
    shutil.copytree(reference, folder)
    return folder


# --------------------------------------------------------------------------------------------
# Resume after a kill


@needs_fmnist
def test_a_run_killed_at_random_points_resumes_to_bitwise_identical_weights_and_metrics(runner, reference, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    runs, folder = tmp_path / "runs", tmp_path / "runs" / RECIPE
    # Kill once a random number of metric rows exist (progress, not wall time, so a slow machine
    # moves the kill points with the run), then after a random delay that can land inside a
    # checkpoint write; the last attempt kills after the test row, while final.pt is written.
    thresholds = sorted(rng.sample(range(1, ROWS_OF_A_FINISHED_RUN), 3)) + [ROWS_OF_A_FINISHED_RUN]
    kills = []
    finished = False
    for threshold in thresholds:
        threshold = max(threshold, data_rows(folder) + 1)  # the old file counts until the resume rewrites it
        delay = rng.uniform(0.0, 0.4)
        run = runner(runs, *(["--resume"] if folder.exists() else []))
        deadline = time.monotonic() + TIMEOUT
        while run.poll() is None and data_rows(folder) < threshold:
            assert time.monotonic() < deadline, "the run hung"
            time.sleep(0.005)
        time.sleep(delay)
        if run.poll() is None:
            run.kill()
            kills.append((threshold, round(delay, 3)))
        if run.wait() == 0:  # it finished before the kill: the result must still be the same
            finished = True
            break
        assert run.returncode == -signal.SIGKILL, run.output()
    if not finished:
        finish(runner(runs, "--resume"))
    context = f"random seed {seed}, kills at (rows, delay) {kills}"
    try:
        assert_same_run(folder, reference)
    except AssertionError as err:
        raise AssertionError(f"{context}: {err}") from err
    assert not list(folder.glob(".*.tmp")) and not (folder / ".lock").exists(), context


@needs_fmnist
def test_truncated_last_checkpoint_warns_naming_it_and_resumes_from_prev_to_the_same_result(runner, reference, tmp_path):
    folder = copy_run(reference, tmp_path)
    for name in ("summary.json", "final.pt"):  # as if killed after the last checkpoint
        (folder / name).unlink()
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert torch.load(folder / "prev.ckpt", weights_only=True)["step"] == 10
    out = finish(runner(tmp_path / "runs", "--resume"))
    assert f"warning: checkpoint {last} is unreadable" in out
    assert "falling back to the previous checkpoint" in out
    assert_same_run(folder, reference)  # steps 11 and 12 were taken again, exactly


class _Interrupted(Exception):
    pass


def test_a_resampled_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """data.kwargs.resample=true: 4 steps per epoch, 3 epochs, checkpoints at steps 3, 4, 6, 8, 9;
    the run stops before step 11, so the resume starts inside epoch 2 from the checkpoint of step 9
    and must draw epoch 2's examples again, not epoch 0's."""
    overrides = {"data.kwargs.resample": True, "data.kwargs.train_size": 128, "train.max_steps": None,
                 "train.epochs": 3, "train.checkpoint_every": 3, "train.log_every": 1}
    config = load_recipe("copy_rnn_baseline", "tiny", overrides)
    repguide.train.train(config, tmp_path / "whole", quiet=True)
    real_step = repguide.train.train_step

    def interrupted(ctx, inputs, y, step, **kwargs):
        if step == 10:
            raise _Interrupted
        return real_step(ctx, inputs, y, step, **kwargs)

    monkeypatch.setattr(repguide.train, "train_step", interrupted)
    with pytest.raises(_Interrupted):
        repguide.train.train(config, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(repguide.train, "train_step", real_step)
    assert torch.load(tmp_path / "cut" / config.name / "last.ckpt", weights_only=True)["step"] == 9
    repguide.train.train(config, tmp_path / "cut", resume=True, quiet=True)
    assert_same_run(tmp_path / "cut" / config.name, tmp_path / "whole" / config.name)
    # The switch reached the data: a run on the fixed split ends elsewhere.
    fixed = load_recipe("copy_rnn_baseline", "tiny", {**overrides, "data.kwargs.resample": False})
    repguide.train.train(fixed, tmp_path / "fixed", quiet=True)
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "fixed" / config.name / "final.pt", tmp_path / "whole" / config.name / "final.pt")


class _TouchOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_a_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    run = RunDir(tmp_path, "run")
    run.path.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "payload": _TouchOnUnpickle(marker)}, run.path / "last.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt is unreadable .*never unpickled: Unsupported global"):
        run.load_checkpoint()
    assert not marker.exists()


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    run = RunDir(tmp_path, "run")
    run.path.mkdir()
    run.save_checkpoint({"step": 1, "w": torch.ones(3)})

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint({"step": 2, "w": torch.zeros(3)})
    state, notes = run.load_checkpoint()
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3)) and notes == []
    assert sorted(f.name for f in run.path.iterdir()) == ["prev.ckpt"]  # no temporary file left


def test_atomic_save_replaces_the_file_whole(tmp_path):
    path = tmp_path / "w.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))
    assert [f.name for f in tmp_path.iterdir()] == ["w.pt"]


# --------------------------------------------------------------------------------------------
# No clobbering


def test_overwrite_starts_the_folder_afresh(tmp_path):
    run = RunDir(tmp_path, "run")
    run.path.mkdir()
    for name in ("metrics.csv", "last.ckpt", "final.pt", "summary.json"):
        (run.path / name).write_text("old")
    run.open(resume=False, overwrite=True)
    try:
        assert sorted(f.name for f in run.path.iterdir()) == [".lock"]
    finally:
        run.close()
    assert not (run.path / ".lock").exists()


HOLD_LOCK = """
import sys, time
from repguide.runs import RunDir
RunDir(sys.argv[1], "run").open(resume=False, overwrite=False)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_folder_in_use_is_refused_and_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid}; two runs cannot write"):
            RunDir(tmp_path, "run").open(resume=True, overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run" / ".lock").read_text() == str(holder.pid)  # left behind by the kill
    run = RunDir(tmp_path, "run")
    run.open(resume=True, overwrite=False)
    assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
    run.close()


def test_two_handles_in_one_process_also_exclude_each_other(tmp_path):
    first = RunDir(tmp_path, "run")
    first.open(resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="in use"):
        RunDir(tmp_path, "run").open(resume=False, overwrite=False)
    first.close()
    second = RunDir(tmp_path, "run")
    second.open(resume=False, overwrite=False)
    second.close()


# --------------------------------------------------------------------------------------------
# Non-finite values


def read_metrics(folder: Path) -> list[dict]:
    with (folder / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@needs_fmnist
def test_a_huge_learning_rate_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    code = main(run_args(tmp_path, "optim.lr=1e30", "train.checkpoint_every=1"))
    err = capsys.readouterr().err
    assert code == 2
    assert "repguide: error: non-finite value at step 2 (counted as in metrics.csv): task loss = nan" in err
    assert "train.nonfinite=skip" in err
    folder = tmp_path / RECIPE
    state = torch.load(folder / "last.ckpt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["target"].values())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 2" in summary["error"]
    assert not (folder / "final.pt").exists()


@needs_fmnist
def test_nonfinite_skip_drops_the_bad_steps_and_finishes_with_finite_weights(tmp_path, capsys):
    assert main(run_args(tmp_path, "optim.lr=1e30", "train.nonfinite=skip", "train.max_steps=4")) == 0
    folder = tmp_path / RECIPE
    rows = [r for r in read_metrics(folder) if r["split"] == "train"]
    assert len(rows) == 4 and rows[0]["loss"] != "nan" and all(r["loss"] == "nan" for r in rows[1:])
    weights = torch.load(folder / "final.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"


@pytest.fixture
def private_measures():
    """Measures registered by a test vanish after it (other tests iterate over the registry)."""
    with similarity.MEASURES.restore_on_exit():
        yield


@needs_fmnist
def test_a_nonfinite_similarity_stops_the_run_naming_the_step_and_the_layer_pair(tmp_path, capsys, private_measures):
    calls = []

    @similarity.register_measure("nan_from_step_3")
    def nan_from_step_3(x, y):  # 4 pairs per step: NaN from the 9th call, the first pair of step 3
        if torch.is_grad_enabled():  # the pair diagnostics written before training run without grad
            calls.append(1)
        value = similarity.get_measure("cka")(x, y)
        return value * float("nan") if len(calls) > 8 else value

    code = main(run_args(tmp_path, "guidance.measure=nan_from_step_3", "train.checkpoint_every=1"))
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "non-finite value at step 3 (counted as in metrics.csv): similarity of pair "
        "(target 'blocks.0.linear', guide 'conv1') = nan" in err
    )
    assert torch.load(tmp_path / RECIPE / "last.ckpt", weights_only=True)["step"] == 2


@needs_fmnist
def test_a_nonfinite_gradient_stops_the_run_naming_the_parameter(tmp_path, capsys, private_measures):
    @similarity.register_measure("nan_gradient")
    def nan_gradient(x, y):  # value 1, but d sqrt(u)/du at u = 0 is inf, times 0: NaN gradients
        return 1 - torch.sqrt((x * 0).sum())

    assert main(run_args(tmp_path, "guidance.measure=nan_gradient")) == 2
    err = capsys.readouterr().err
    assert "non-finite value at step 1 (counted as in metrics.csv): gradient of parameter 'blocks.0.linear.weight'" in err


# --------------------------------------------------------------------------------------------
# The guide


@needs_fmnist
def test_the_guide_weights_are_bitwise_unchanged_by_a_run(reference):
    from repguide import data
    from repguide.config import load_recipe
    from repguide.build import build_model, weights_hash

    summary = json.loads((reference / "summary.json").read_text())
    assert summary["guide_unchanged"] is True
    assert summary["guide_weights_sha256_before"] == summary["guide_weights_sha256_after"]
    config = load_recipe(RECIPE, "tiny")  # the guide is rebuilt from its seed, independently of the run
    splits = data.create(config.data.name, **config.data.kwargs)
    guide = build_model(config.guidance.guide, splits, config.guidance.guide_seed)
    assert weights_hash(guide) == summary["guide_weights_sha256_after"]


# --------------------------------------------------------------------------------------------
# A failed start leaves nothing behind; provenance survives a lost config.yaml; warnings where
# guidance cannot work; errors of the guide's own


@needs_fmnist
def test_resume_without_config_rebuilds_it_from_the_checkpoint_and_refuses_other_values(tmp_path, capsys):
    args = ["train.max_steps=2", "train.checkpoint_every=1", "train.epochs=1"]
    assert main(cli_run_args(tmp_path, *args)) == 0
    folder = tmp_path / "runs" / RECIPE
    used = (folder / "config.yaml").read_text()
    (folder / "config.yaml").unlink()
    (folder / "summary.json").unlink()
    err = cli_error(tmp_path, capsys, "--resume", *args, "optim.lr=0.5")
    assert "its config differs from this one in optim.lr" in err and not (folder / "config.yaml").exists()
    assert main(cli_run_args(tmp_path, "--resume", *args)) == 0
    assert (folder / "config.yaml").read_text() == used


@needs_fmnist
def test_a_start_that_fails_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, monkeypatch):
    err = cli_error(tmp_path, capsys, "guidance.guide.kwargs.in_channels=3")  # fails at set-up
    assert "the guide failed on the target's inputs" in err and nothing_written(tmp_path)

    def broken_step(*args, **kwargs):
        raise RuntimeError("failed in the first step")

    monkeypatch.setattr(repguide.train, "train_step", broken_step)  # fails after metrics.csv is opened
    with pytest.raises(RuntimeError, match="failed in the first step"):
        main(cli_run_args(tmp_path, "train.max_steps=2", "train.epochs=1"))
    assert nothing_written(tmp_path)
    monkeypatch.undo()
    assert main(cli_run_args(tmp_path, "train.max_steps=2", "train.epochs=1")) == 0  # no "already holds results"
    assert RunDir(tmp_path / "runs", RECIPE).is_finished()


def test_an_error_of_the_guides_own_keeps_its_type_and_message_and_says_where_it_was_raised(tmp_path):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(10, 8)

        def forward(self, x):
            raise RuntimeError("the guide's own bug")

    target = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(RuntimeError) as err:
        rg.Guidance(target, Broken())(torch.randn(8, 10))
    assert str(err.value) == "the guide's own bug" and not isinstance(err.value, RepguideError)
    assert "raised inside the guide's forward" in err.value.__notes__[0]


def test_a_batch_of_two_and_a_pair_stuck_at_1_warn_when_metrics_are_logged_once_per_run():
    column = "sim:0|1"
    small = AlignmentWatch(2, [column])
    with pytest.warns(UserWarning, match="aligns 2 examples at a time: with n <= 2"):
        small.observe({column: 1.0})
        small.warn()
    stuck = AlignmentWatch(16, [column])
    for value in (0.9995, 1.0):
        stuck.observe({column: value})
    with pytest.warns(UserWarning, match=r"pair 0\|1 stayed at 0.9995 or above over the last 2 steps") as seen:
        stuck.warn()
    assert [w.filename for w in seen] == [__file__]  # the caller's line, not repguide's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stuck.observe({column: 1.0})
        stuck.warn()  # once per run
        fine = AlignmentWatch(16, [column])
        for value in (0.5, 1.0):
            fine.observe({column: value})
        fine.warn()  # not stuck over the window


@needs_fmnist
def test_a_run_with_a_batch_of_two_warns_through_the_loop(tmp_path):
    with pytest.warns(UserWarning, match="aligns 2 examples at a time"):
        assert main(cli_run_args(tmp_path, "train.batch_size=2", "train.max_steps=3", "train.epochs=1", "train.log_every=1")) == 0
