"""A layer's name as an adapter file names it: its module path without wrapper levels.

``torch.compile(module)`` holds the module under ``_orig_mod`` and torch's activation
checkpointing (``CheckpointWrapper``, FSDP's ``apply_activation_checkpointing``) under
``_checkpoint_wrapped_module``. A block wrapped so before inject puts that level inside the paths
of its layers (``layers.0._orig_mod.self_attn.q_proj``), where a file saved from the unwrapped model
has none (``layers.0.self_attn.q_proj``; the checkpoint wrapper's ``state_dict`` drops its level, so
PEFT saves that spelling from a checkpointed model too). Key matching looks a layer up by both its
path and its file name (:mod:`lorahot.resolve.keys`); errors, ``info()`` and everything else name
the path. :func:`is_compile_wrapper` tells ``torch.compile``'s wrapper apart, for inject's refusals.

A level is a wrapper's only where its parent is that wrapper (:func:`wrapper_levels` of the model's
modules): a module of the model's own that is merely named ``_orig_mod`` (an attribute of an ordinary
module) is a level of its layers' names in PEFT's keys (``blk._orig_mod.proj``), and a key without it
(``blk.proj``) names another module, or none. A key's own levels are dropped by their names alone
(the model that saved it is not at hand).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable

__all__ = [
    "WRAPPER_LEVELS",
    "file_name",
    "may_hold_wrapper",
    "is_compile_wrapper",
    "is_checkpoint_wrapper",
    "wrapper_level",
    "wrapper_levels",
]

#: The child under which a wrapper made of a module holds it and calls it: ``torch.compile``'s
#: (``OptimizedModule``) and torch's activation checkpointing's (``CheckpointWrapper``).
WRAPPER_LEVELS = ("_orig_mod", "_checkpoint_wrapped_module")


def may_hold_wrapper(text: str) -> bool:
    """Whether ``text`` holds a wrapper level's name at all (as a substring, a level or not): a key
    without one has no other spelling to try, which most keys of most files are (a few tenths of a
    microsecond per key, where :func:`file_name` of each of its candidates costs several times that)."""
    return "_orig_mod" in text or "_checkpoint_wrapped_module" in text


def file_name(path: str, levels: Collection[str] | None = None) -> str:
    """``path`` with every wrapper level (:data:`WRAPPER_LEVELS`) dropped, wherever it is:
    ``layers.0._orig_mod.self_attn.q_proj`` -> ``layers.0.self_attn.q_proj``; ``path`` itself
    where it has none. ``levels``: the model's wrapper levels (:func:`wrapper_levels`), where the
    model is known: a level is dropped only where its own path is one of them; None (a key of a
    file): every level of those names."""
    if not may_hold_wrapper(path):
        return path
    parts = path.split(".")
    if levels is None:
        return ".".join(part for part in parts if part not in WRAPPER_LEVELS)
    kept = [p for i, p in enumerate(parts) if p not in WRAPPER_LEVELS or ".".join(parts[: i + 1]) not in levels]
    return ".".join(kept)


def is_compile_wrapper(module: object) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper of a module (``OptimizedModule``, which holds
    it under ``_orig_mod``). Where ``torch._dynamo`` was never imported, no such wrapper was made."""
    wrapper = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    return wrapper is not None and isinstance(module, wrapper)


def is_checkpoint_wrapper(module: object) -> bool:
    """Whether ``module`` is torch's activation checkpointing (or offloading) wrapper of a module
    (``ActivationWrapper``: ``CheckpointWrapper``, ``OffloadWrapper``, which hold it under
    ``_checkpoint_wrapped_module``). Where their module was never imported, no such wrapper was made."""
    checkpoint = sys.modules.get("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    wrapper = getattr(checkpoint, "ActivationWrapper", None)
    return wrapper is not None and isinstance(module, wrapper)


def wrapper_level(module: object) -> str | None:
    """The child under which ``module``, a wrapper made of a module, holds and calls it
    (``_orig_mod``, ``_checkpoint_wrapped_module``); None for any other module, whatever its
    children are named."""
    if is_compile_wrapper(module):
        level = WRAPPER_LEVELS[0]
    elif is_checkpoint_wrapper(module):
        level = WRAPPER_LEVELS[1]
    else:
        return None
    return level if level in getattr(module, "_modules", {}) else None


def wrapper_levels(modules: Iterable[tuple[str, object]]) -> frozenset[str]:
    """The paths of the wrapper levels among ``modules`` (a model's ``named_modules()``): each
    wrapper's path with its level (``layers.0._orig_mod``; ``_orig_mod`` where the model itself is
    ``torch.compile``'s wrapper), what :func:`file_name` drops of a layer's path."""
    found = ((name, wrapper_level(module)) for name, module in modules)
    return frozenset(f"{name}.{level}" if name else level for name, level in found if level is not None)
