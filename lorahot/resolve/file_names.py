"""A layer's name as an adapter file names it: its module path without wrapper levels.

``torch.compile(module)`` holds the module under ``_orig_mod`` and torch's activation
checkpointing (``CheckpointWrapper``, FSDP's ``apply_activation_checkpointing``) under
``_checkpoint_wrapped_module``. A block wrapped so before inject puts that level inside the paths
of its layers (``layers.0._orig_mod.self_attn.q_proj``), where a file saved from the unwrapped model
has none (``layers.0.self_attn.q_proj``; the checkpoint wrapper's ``state_dict`` drops its level, so
PEFT saves that spelling from a checkpointed model too). Key matching looks a layer up by both its
path and its file name (:mod:`lorahot.resolve.keys`); errors, ``info()`` and everything else name
the path. :func:`is_compile_wrapper` tells ``torch.compile``'s wrapper apart, for inject's refusals.
"""

from __future__ import annotations

import sys

__all__ = ["WRAPPER_LEVELS", "file_name", "may_hold_wrapper", "is_compile_wrapper"]

#: The child under which a wrapper made of a module holds it and calls it: ``torch.compile``'s
#: (``OptimizedModule``) and torch's activation checkpointing's (``CheckpointWrapper``).
WRAPPER_LEVELS = ("_orig_mod", "_checkpoint_wrapped_module")


def may_hold_wrapper(text: str) -> bool:
    """Whether ``text`` holds a wrapper level's name at all (as a substring, a level or not): a key
    without one has no other spelling to try, which most keys of most files are (a few tenths of a
    microsecond per key, where :func:`file_name` of each of its candidates costs several times that)."""
    return "_orig_mod" in text or "_checkpoint_wrapped_module" in text


def file_name(path: str) -> str:
    """``path`` with every wrapper level (:data:`WRAPPER_LEVELS`) dropped, wherever it is:
    ``layers.0._orig_mod.self_attn.q_proj`` -> ``layers.0.self_attn.q_proj``; ``path`` itself
    where it has none."""
    if not may_hold_wrapper(path):
        return path
    return ".".join(part for part in path.split(".") if part not in WRAPPER_LEVELS)


def is_compile_wrapper(module: object) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper of a module (``OptimizedModule``, which holds
    it under ``_orig_mod``). Where ``torch._dynamo`` was never imported, no such wrapper was made."""
    wrapper = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    return wrapper is not None and isinstance(module, wrapper)
