"""The registry's lookup: :data:`REGISTRY`, :func:`get`, :func:`names`, :func:`label`.

This module imports nothing of the package but its errors, so that the optimizer layer
(``create_optimizer`` reads a method's optimizer class, options and flags through it) sits below the
methods' behaviour, which builds on that optimizer layer. The entries are declared, with their
behaviour, in :mod:`galore_mini.methods.catalog`, which registers them when the
``galore_mini.methods`` package is imported (and importing this module imports the package first).

Example::

    >>> from galore_mini.methods import registry
    >>> registry.get("galore_mini").projected, registry.get("lora").kind
    (True, 'adapter')
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from galore_mini.errors import UsageError

if TYPE_CHECKING:  # annotations only
    from galore_mini.methods.method import Method

#: every method by name, in the catalog's order (filled by :mod:`galore_mini.methods.catalog`)
REGISTRY: dict[str, Method] = {}


def register(*entries: Method) -> None:
    """Add `entries` to :data:`REGISTRY` (a name may be registered once)."""
    for entry in entries:
        if entry.name in REGISTRY:
            raise ValueError(f"method {entry.name!r} is registered twice")
        REGISTRY[entry.name] = entry


def names(kind: str | None = None) -> tuple[str, ...]:
    """Every method name in registry order, or those of one kind (``"optimizer"`` / ``"adapter"``)."""
    return tuple(m.name for m in REGISTRY.values() if kind is None or m.kind == kind)


def get(name: str, what: str = "method") -> Method:
    """The registry entry for `name`; a `UsageError` with a did-you-mean for anything else."""
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{what}={name!r} is unknown{hint}; use one of {', '.join(REGISTRY)}")
    return method


def label(name: str) -> str:
    """The paper's name for `name` (the name itself for anything unregistered)."""
    method = REGISTRY.get(name)
    return method.label if method else name


_DERIVED = {"METHODS": None, "OPTIMIZER_METHODS": "optimizer", "ADAPTER_METHODS": "adapter"}


def __getattr__(name: str):
    # the name tuples are read after the catalog registered the entries, so they are computed when asked for
    if name in _DERIVED:
        return names(_DERIVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
