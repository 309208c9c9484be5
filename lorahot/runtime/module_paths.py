"""Whether a module path lies under one of a set of paths, by a lookup per level of the path.

Runtime checks ask, for every injected layer, whether it sits in some part of the model (a
list of experts, a vision tower, a module that runs sequence-first). Comparing each layer with
each such part costs the layers times the parts, and a model may hold a part per block (an MoE
list, an attention that declares ``batch_first=False``): looking each path above the layer up
in a set costs the depth of its path.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

__all__ = ["above", "within"]


def above(path: str) -> Iterator[str]:
    """Each module path strictly above ``path`` in its model: the root ``""``, then each part
    before one of its dots (``a.b.c``: ``""``, ``a``, ``a.b``); none above the root."""
    if not path:
        return
    yield ""
    at = path.find(".")
    while at >= 0:
        yield path[:at]
        at = path.find(".", at + 1)


def within(path: str, paths: Container[str]) -> bool:
    """Whether ``path`` is one of ``paths`` or under one (``""``, the root, holds every path):
    ``any(path == p or path.startswith(p + ".") or not p for p in paths)``, one lookup per level."""
    return path in paths or any(p in paths for p in above(path))
