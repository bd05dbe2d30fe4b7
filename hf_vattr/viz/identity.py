"""Keys that let ``functools.lru_cache`` keep drawing parts per *object*: region maps, images and arrays are
unhashable, or equal by value when what matters is which object was drawn.

An :class:`Identity` key hashes by ``id`` and is equal only to a key of the same object. The cache holds
the key and the key holds its object, so while an entry lives its object lives, its ``id`` is not reused,
and a lookup can never return an entry made for another object.
"""

from __future__ import annotations

from typing import Any

from .images import is_size

__all__ = ["Identity", "image_key", "image_of"]


class Identity:
    """A hashable stand-in for one object, equal only to a stand-in for the very same object."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"Identity({type(self.obj).__name__} at {id(self.obj):#x})"


def image_key(image: Any) -> Any:
    """The cache key of an ``images`` entry: a size ``(h, w)`` by value, anything else by identity."""
    return tuple(image) if is_size(image) else Identity(image)


def image_of(key: Any) -> Any:
    """The ``images`` entry an :func:`image_key` stands for."""
    return key.obj if isinstance(key, Identity) else key
