"""The base of every config section, and the value types sections share.

It imports msgspec alone, so it sits at the bottom of the import graph: each component's
config module (esperd.config, esperd.analyzer.config, esperd.policy.config, esperd.learn.config,
esperd.sim.config) builds on it without importing the component itself, or torch.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PositiveFloat = Annotated[float, Meta(gt=0.0)]
PositiveInt = Annotated[int, Meta(gt=0)]
Coef = Annotated[float, Meta(ge=0.0, le=1e3)]
Discount = Annotated[float, Meta(ge=0.0, le=1.0)]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A config section: frozen, keyword-only, and an unknown key is an error (a typo must not
    silently fall back to a default). Subclasses say frozen=True again: mypy does not inherit it."""


def check_fields(section: str, checks: dict[str, bool]) -> None:
    """ValueError naming every field whose check is False (for `__post_init__`, which runs on
    direct construction too; the Meta bounds are checked only when a section is decoded)."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{section} config: invalid {', '.join(bad)}")
