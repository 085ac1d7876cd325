"""A name -> implementation registry whose errors name the registered keys (advantage estimators,
policy and preference losses, merge methods, weight-sync kinds)."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, name: str, item: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = item
        return item

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {', '.join(sorted(self))}") from None
