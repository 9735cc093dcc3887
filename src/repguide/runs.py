"""A run's folder on disk: lock, config, metrics log, atomic checkpoints with fallback, summary.

    runs/<name>/
      config.yaml     the resolved config
      metrics.csv     one row per logged train step and per evaluation
      last.ckpt       latest checkpoint; prev.ckpt the one before (fallback if last is corrupt)
      final.pt        the target's final weights (what a later run loads as a trained guide)
      summary.json    final metrics, guide integrity, timing
      *.png           plots
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from repguide.errors import CheckpointError, RunDirError, RunInUseError

__all__ = [
    "CheckpointError", "OWN_FILES", "RunDir", "RunDirError", "atomic_save", "check_run_name", "is_main_process",
    "load_weights",
]

# Every file repguide writes into a run folder. ``--overwrite`` deletes these and nothing else, so a
# run folder that also holds a user's files (or a name that points at the wrong folder) loses only
# what repguide itself put there.
OWN_FILES = frozenset({
    "config.yaml", "metrics.csv", "last.ckpt", "prev.ckpt", "final.pt", "summary.json",
    "curves.png", "similarity.png", "length_accuracy.png", "alignment.png", "alignment_start.csv",
    "alignment_end.csv", "pairs.json",
})

# One folder name under the runs folder: no separators, no "." or "..", no leading dot.
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,199}")


def check_run_name(name: str) -> str:
    """``name`` if it is one folder name under the runs folder, else a ValueError saying what is allowed."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a run name: a run is one folder directly under the runs folder, "
            "named with letters, digits and _ - . + = @ (at most 200, not starting with '.'); "
            "choose the parent folder with --runs-dir instead of a path in the name"
        )
    return name


def is_main_process() -> bool:
    """Whether this process writes the run folder: rank 0 of a process group, or the only process."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({_unreadable_reason(path, err)})") from err


def _unreadable_reason(path: Path, err: Exception) -> str:
    """Why torch.load failed, in one line (torch's own text for weights_only runs to paragraphs)."""
    if not zipfile.is_zipfile(path):
        return "not a complete torch.save file: truncated, or not a checkpoint"
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().partition("\n")[0]
        return f"it holds objects other than tensors and containers, which are never unpickled: {detail}"
    first_line = text.partition("\n")[0]
    return f"{type(err).__name__}: {first_line}"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved by a run (``final.pt``), loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    return _load(path)


class RunDir:
    def __init__(self, root: str | Path, name: str):
        self.path = Path(root) / name
        self.name = name
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        return any((self.path / f).exists() for f in ("last.ckpt", "prev.ckpt"))

    def has_results(self) -> bool:
        return any(
            (self.path / f).exists() for f in ("metrics.csv", "last.ckpt", "prev.ckpt", "final.pt", "summary.json")
        )

    def is_finished(self) -> bool:
        summary = self.path / "summary.json"
        return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"

    def open(self, resume: bool, overwrite: bool) -> None:
        """Create (or reuse) the folder and take its lock.

        Only a folder directly under the runs folder is written, never one reached through a link."""
        try:
            check_run_name(self.name)
        except ValueError as err:
            raise RunDirError(f"name: {err}") from None
        if self.path.is_symlink():
            raise RunDirError(
                f"{self.path} is a link (to {os.readlink(self.path)}); repguide writes only real folders "
                "under the runs folder: remove the link or give this run another name"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):  # a private name: two starters may probe at once
                pass
        except OSError as err:
            raise RunDirError(
                f"cannot write the run folder {self.path} ({err.strerror}); choose another folder "
                "with --runs-dir or fix its permissions"
            ) from None
        self._lock()
        for tmp in self.path.glob(".*.tmp"):  # left by a run killed while writing one of its files
            if _own_temporary(tmp.name):
                tmp.unlink()
        if self.has_results() and not (resume or overwrite):
            self.close()
            raise RunDirError(
                f"{self.path} already holds results; pass --resume to continue it or --overwrite "
                "to start again (its files will be replaced)"
            )
        if overwrite and not resume:
            self.discard()

    def discard(self) -> None:
        """Delete the files repguide writes (and only those) from the folder."""
        for name in OWN_FILES:  # a link is removed itself; what it points to is never touched
            f = self.path / name
            if f.is_symlink() or f.is_file():
                f.unlink()

    def _lock(self) -> None:
        """An exclusive flock on ``.lock``. The kernel releases it when its process dies, so the lock
        of a killed run is taken over, with no race between two starters and no trust in pids."""
        lock = self.path / ".lock"
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunInUseError(
                    f"{self.path} is in use by process {_read_pid(lock) or '(unknown)'}; two runs "
                    "cannot write the same folder: wait for it to end, or give this run another name"
                ) from None
            if _same_file(fd, lock):  # else its holder unlinked it while closing: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            (self.path / ".lock").unlink(missing_ok=True)  # before unlocking: see _lock
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- files -------------------------------------------------------------------------------

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict | None:
        f = self.path / "config.yaml"
        return yaml.safe_load(f.read_text()) if f.exists() else None

    def write_json(self, name: str, obj: Any) -> None:
        """One of the run's own JSON files (``name`` in OWN_FILES), written atomically."""
        assert name in OWN_FILES, name
        atomic_write_text(self.path / name, json.dumps(obj, indent=2))

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, sort_keys=True))

    def save_checkpoint(self, state: dict) -> None:
        last, prev = self.path / "last.ckpt", self.path / "prev.ckpt"
        if last.exists():
            os.replace(last, prev)
        atomic_save(state, last)

    def load_checkpoint(self) -> tuple[dict, list[str]]:
        """The newest readable checkpoint, and a note for each unreadable one skipped."""
        errors = []
        for name in ("last.ckpt", "prev.ckpt"):
            path = self.path / name
            if not path.exists():
                continue
            try:
                return _load(path), [f"{e}; falling back to the previous checkpoint" for e in errors]
            except CheckpointError as err:
                errors.append(str(err))
        raise CheckpointError(
            f"no readable checkpoint in {self.path}" + (f" ({'; '.join(errors)})" if errors else "")
            + "; start the run again with --overwrite"
        )


class MetricsLog:
    """metrics.csv with a fixed header; on resume, rows after the checkpoint's step are dropped,
    and the test row (written after training, so again by the resumed run)."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None = None):
        self.path, self.columns = path, columns
        rows = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step and r["split"] != "test"]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())  # a kill while rewriting must not lose the kept rows

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: _fmt(row.get(k)) for k in self.columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv with numbers parsed (empty cells become None)."""
    with Path(path).open(newline="") as f:
        return [
            {k: (None if v == "" else _number(v)) for k, v in row.items()} for row in csv.DictReader(f)
        ]


def _number(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _own_temporary(name: str) -> bool:
    """A temporary file of atomic_save (``.NAME.XXXX.tmp``) or atomic_write_text (``.NAME.tmp``)."""
    return any(name == f".{own}.tmp" or (name.startswith(f".{own}.") and name.endswith(".tmp")) for own in OWN_FILES)


def _read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
