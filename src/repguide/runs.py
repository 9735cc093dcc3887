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
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = ["CheckpointError", "RunDir", "RunDirError", "atomic_save", "load_weights"]


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (it holds results, is locked, or is not writable)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run."""


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
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err


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

    def has_results(self) -> bool:
        return any((self.path / f).exists() for f in ("metrics.csv", "last.ckpt", "summary.json"))

    def is_finished(self) -> bool:
        summary = self.path / "summary.json"
        return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"

    def open(self, resume: bool, overwrite: bool) -> None:
        """Create (or reuse) the folder and take its lock."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunDirError(
                f"cannot write the run folder {self.path} ({err.strerror}); choose another folder "
                "with --runs-dir or fix its permissions"
            ) from None
        self._lock()
        if self.has_results() and not (resume or overwrite):
            self.close()
            raise RunDirError(
                f"{self.path} already holds results; pass --resume to continue it or --overwrite "
                "to start again (its files will be replaced)"
            )
        if overwrite and not resume:
            for f in self.path.iterdir():
                if f.is_file() and f.name != ".lock":
                    f.unlink()

    def _lock(self) -> None:
        lock = self.path / ".lock"
        for _ in range(2):
            try:
                self._lock_fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(self._lock_fd, str(os.getpid()).encode())
                return
            except FileExistsError:
                pid = _read_pid(lock)
                if pid is not None and _alive(pid):
                    raise RunDirError(
                        f"{self.path} is in use by process {pid}; two runs cannot write the same "
                        "folder (remove .lock only if that process is gone)"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its process was killed
        raise RunDirError(f"could not lock {self.path}")

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            (self.path / ".lock").unlink(missing_ok=True)
            self._lock_fd = None

    # -- files -------------------------------------------------------------------------------

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict | None:
        f = self.path / "config.yaml"
        return yaml.safe_load(f.read_text()) if f.exists() else None

    def write_summary(self, summary: dict) -> None:
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
        os.replace(tmp, self.path / "summary.json")

    def save_checkpoint(self, state: dict) -> None:
        last, prev = self.path / "last.ckpt", self.path / "prev.ckpt"
        if last.exists():
            os.replace(last, prev)
        atomic_save(state, last)

    def load_checkpoint(self) -> tuple[dict, list[str]]:
        """The newest readable checkpoint, and a note for each unreadable one skipped."""
        notes = []
        for name in ("last.ckpt", "prev.ckpt"):
            path = self.path / name
            if not path.exists():
                continue
            try:
                return _load(path), notes
            except CheckpointError as err:
                notes.append(f"{err}; falling back to the previous checkpoint")
        raise CheckpointError(
            f"no readable checkpoint in {self.path}" + (f" ({'; '.join(notes)})" if notes else "")
        )


class MetricsLog:
    """metrics.csv with a fixed header; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None = None):
        self.path, self.columns = path, columns
        rows = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

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


def _read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True
