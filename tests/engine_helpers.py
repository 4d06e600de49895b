"""A real model seen through the engine's one seam, its scheduler: tests hold the worker or pace it here."""
from __future__ import annotations

from typing import Any, Hashable


class Hooked:
    """A real model (everything passes through) whose scheduler tells `added` of each request it
    takes, `stepping` before each step and `event` of each chunk or error a step gives."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def scheduler(self, slots: int = 1) -> "_Scheduler":
        return _Scheduler(self.model.scheduler(slots), self)

    def added(self, params: Any, tenant: str) -> None:
        pass

    def stepping(self) -> None:
        pass

    def event(self, event: Any) -> None:
        pass


class _Scheduler:
    def __init__(self, inner: Any, hooks: Hooked) -> None:
        self._inner = inner
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def add(self, key: Hashable, prompt: list[int], params: Any, started: float | None = None,
            tenant: str = "", sources: Any = ()) -> None:
        self._hooks.added(params, tenant)
        self._inner.add(key, prompt, params, started, tenant, sources)

    def step(self) -> list[tuple[Hashable, Any]]:
        self._hooks.stepping()
        events = self._inner.step()
        for _, event in events:
            self._hooks.event(event)
        return events
