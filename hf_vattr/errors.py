"""The package's error base class.

Why one base: a caller can catch every mistake this package reports with ``except AttributionError``
while each error keeps the builtin type it has always had (``ValueError``, ``OSError``, ...), so
``except ValueError`` written against earlier versions still works.
"""

from __future__ import annotations

__all__ = ["AttributionError"]


class AttributionError(Exception):
    """Base class of every error raised by hf_vattr."""
