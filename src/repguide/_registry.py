"""One name → builder registry, shared by the models, the data sets and the similarity measures, and
:func:`did_you_mean`, the closest-name hint of every unknown-name error."""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

__all__ = ["Entry", "Registry", "did_you_mean"]

B = TypeVar("B", bound=Callable[..., Any])


def did_you_mean(
    names: str | Iterable[str],
    choices: Iterable[str],
    form: str = " Did you mean {}?",
    *,
    n: int = 1,
    cutoff: float = 0.6,
    show: Callable[[str], str] = str,
) -> str:
    """``form`` around the choices closest to ``names`` (difflib's, up to ``n`` for each name, each
    written by ``show``, comma-joined), or "" when none is close enough: an error message's hint."""
    names = [names] if isinstance(names, str) else list(names)
    choices = list(choices)
    close = [m for name in names for m in difflib.get_close_matches(name, choices, n=n, cutoff=cutoff)]
    return form.format(", ".join(map(show, close))) if close else ""


@dataclass(frozen=True)
class Entry(Generic[B]):
    """A registered builder (a class or a factory) and the keyword defaults its name binds."""

    builder: B
    defaults: dict[str, Any] = field(default_factory=dict)

    def build(self, **kwargs: Any) -> Any:
        """The builder called with the name's defaults, overridden by ``kwargs``."""
        return self.builder(**{**self.defaults, **kwargs})

    def accepted_kwargs(self) -> frozenset[str]:
        """The keyword arguments the builder takes."""
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(self.builder).parameters.values()
        return frozenset(p.name for p in params if p.kind in keyword)

    def required_kwargs(self) -> frozenset[str]:
        """The keyword arguments the builder needs and the name's defaults do not give."""
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(self.builder).parameters.values()
        return frozenset(p.name for p in params if p.kind in keyword and p.default is p.empty) - set(self.defaults)


class Registry(Generic[B]):
    """Builders by name, for things of one ``kind`` ("model", "data set", ...), named in errors.

    ``register(name, builder, **defaults)`` adds an entry, or ``@register(name, **defaults)`` on a
    class or factory; one builder may serve several names with different defaults. ``get(name)``
    suggests the closest registered name when ``name`` is unknown. ``with restore_on_exit():``
    undoes what is registered or unregistered inside it (a test's temporary entries).
    """

    def __init__(self, kind: str, error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self.error = error  # what an unknown or taken name raises (a repguide.errors class)
        self._entries: dict[str, Entry[B]] = {}

    def register(self, name: str, builder: B | None = None, **defaults: Any) -> Any:
        """Add ``builder`` under ``name``; without ``builder``, a decorator that adds what it decorates."""

        def add(obj: B) -> B:
            if name in self._entries:
                raise self.error(f"a {self.kind} named {name!r} is already registered")
            self._entries[name] = Entry(obj, dict(defaults))
            return obj

        return add if builder is None else add(builder)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a test's temporary entry)."""
        self.get(name)
        del self._entries[name]

    @contextlib.contextmanager
    def restore_on_exit(self) -> Iterator[Registry[B]]:
        """A context in which registrations are temporary: on exit the entries are again exactly
        those on entry, whatever was registered or unregistered inside."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries.clear()
            self._entries.update(saved)

    def get(self, name: str) -> Entry[B]:
        """The entry registered as ``name``; an error naming the closest names if there is none."""
        if name not in self._entries:
            hint = did_you_mean(name, self._entries, show=repr)
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.list())}.{hint}")
        return self._entries[name]

    def list(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
