"""The jinja2 environment every HTML view renders through (report, step table, notebook view, web page).

Templates live in ``hf_vattr/viz/templates`` (package data) and are autoescaped: text from a trace or a user
is escaped where it is printed. HTML that is already safe (a rendered row, passed on to the table) is
marked with :func:`markupsafe.Markup` by its caller.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2

__all__ = ["environment", "render", "macros"]


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one environment (built on first use, not at import)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("hf_vattr.viz", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, not an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """The template ``name`` rendered with ``context``."""
    return environment().get_template(name).render(**context)


def macros(name: str) -> Any:
    """The macros of the template ``name``, as callables that return safe HTML (``macros("app.html").message(...)``)."""
    return environment().get_template(name).module
