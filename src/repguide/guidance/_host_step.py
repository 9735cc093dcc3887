"""The guided step counter as the host sees it, so that a step reads no tensor value.

``Guidance.step`` stays a buffer (saved with the state dict, restored on resume), but reading it
with ``int()`` is a host-device sync on an accelerator, once per step. :class:`HostStep` keeps a
Python copy and re-reads the buffer only when something else wrote to it (``load_state_dict``,
``step.copy_(...)``, ``step.fill_(...)``, a new tensor assigned to it): those bump the tensor's
version counter, or replace the tensor, which the host sees without reading a value.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["HostStep"]


class HostStep:
    """A host-side mirror of a 0-dim integer step buffer."""

    def __init__(self) -> None:
        self._value = 0
        self._seen: tuple[int, int] | None = None  # (id, version) of the buffer when last read

    def read(self, buffer: Tensor) -> int:
        """The step the buffer holds: a sync only the first time or after an outside write."""
        if self._seen != (id(buffer), buffer._version):
            self._value = int(buffer)
            self._seen = (id(buffer), buffer._version)
        return self._value

    def advance(self, buffer: Tensor) -> None:
        """``buffer += 1`` on its device, and the same on the host."""
        self.read(buffer)
        buffer += 1
        self._value += 1
        self._seen = (id(buffer), buffer._version)
