"""The errors repguide raises about its user's input, files and runs.

Every one derives from :class:`RepguideError`; the command line prints those as one line and exits
with status 2. Anything else that escapes is a bug in repguide and keeps its traceback. Each class
also derives from the built-in type code written before this hierarchy caught (``ValueError`` for
bad values, ``RuntimeError`` for run folders and checkpoints, ...), so ``except ValueError`` in a
user's code keeps working.
"""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = [
    "ArgumentError",
    "CaptureError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DatasetIntegrityError",
    "DatasetNotFoundError",
    "GuideError",
    "GuidanceError",
    "LayerError",
    "MeasureError",
    "ModelError",
    "NonFiniteError",
    "RepguideError",
    "RunDirError",
]


class RepguideError(Exception):
    """A problem with what the user gave repguide; the message says what is wrong and how to fix it."""


class ArgumentError(RepguideError, ValueError):
    """An argument of a repguide function or command has a value it does not allow."""


class ConfigError(RepguideError, ValueError):
    """A recipe or override is invalid; the message names the key, the value and what is allowed."""


class RunDirError(RepguideError, RuntimeError):
    """The run folder cannot be used as asked (it holds results, is locked, or is not writable)."""


class RunInUseError(RunDirError):
    """Another process holds the run folder's lock: it is training that run right now."""


class CheckpointError(RepguideError, RuntimeError):
    """A checkpoint or weights file cannot be read or does not fit this run."""


class DataError(RepguideError, ValueError):
    """A data set cannot be built as asked."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data set's files are not installed; the message gives the install command."""


class DatasetIntegrityError(DataError):
    """A data set's files are there but not what they should be (checksum, shape)."""


class ModelError(RepguideError, ValueError):
    """An unknown model name or an option its factory does not accept."""


class MeasureError(RepguideError, ValueError):
    """An unknown similarity measure, or inputs it cannot compare (too few examples, shapes)."""


class LayerError(RepguideError, ValueError):
    """A layer name, layer pairing or activation that capture cannot use."""


class CaptureError(RepguideError, RuntimeError):
    """A layer to capture did not run in the forward pass (bypassed, or called fewer times)."""


class GuidanceError(RepguideError, ValueError):
    """An argument of :class:`repguide.Guidance` or of a weight schedule is invalid."""


class GuideError(RepguideError, ValueError):
    """The guide (or the target) failed on the inputs it was given; the message says where."""


class NonFiniteError(RepguideError, FloatingPointError):
    """Training produced a NaN or infinite loss, similarity or gradient."""


_REPGUIDE = os.path.dirname(__file__) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the user's line that
    ran repguide: the caller of the outermost repguide frame, past torch's frames and the standard
    library's ``contextlib`` frames (a module call, a ``with`` block's exit). A hook that fires
    inside someone else's model (a Hugging Face block) still points at the line that called the
    guided step. (Only contextlib's own file: a conda or system Python keeps site-packages, and so
    other libraries and the user's installed code, under the standard library's folder.)"""
    import torch  # (imported by then; errors.py itself stays free of it)

    between = (os.path.dirname(torch.__file__) + os.sep, contextlib.__file__)
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(frame.f_code.co_filename)
        frame = frame.f_back
    outermost = max(i for i, name in enumerate(frames) if name.startswith(_REPGUIDE) or i == 0)
    level = outermost + 1
    while level < len(frames) - 1 and frames[level].startswith(between):
        level += 1
    return level + 1
