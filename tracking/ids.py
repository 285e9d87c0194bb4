"""Track ids from a counter you can see: one allocator per recording, never a class-level global."""

from __future__ import annotations

__all__ = ["TrackIdAllocator"]


class TrackIdAllocator:
    """Hands out 1, 2, 3, ... for one recording."""

    def __init__(self, start: int = 1) -> None:
        self._next = start

    def allocate(self) -> int:
        """The next unused id."""
        value = self._next
        self._next += 1
        return value

    @property
    def issued(self) -> int:
        """How many ids were handed out."""
        return self._next - 1
