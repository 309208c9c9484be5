"""Which ``.safetensors`` file of a directory, or of a Hub repo's level, a read without
``weight_name=`` opens.

One rule for a local directory (its entries) and a Hub repo (the Hub's listing, before anything
is downloaded): PEFT's ``adapter_model.safetensors`` or diffusers'
``pytorch_lora_weights.safetensors``, else the level's only ``*.safetensors``. A level holding
both names is refused, as PEFT's ``PeftModel.from_pretrained`` reads the first and diffusers'
``load_lora_weights`` the second (two adapters, maybe); so is one holding several other files.

diffusers' ``load_lora_weights`` picks by a rule of its own (``_best_guess_weight_name``: any
path ending in diffusers' name, else the first ``.safetensors`` path, a Hub repo's files in every
folder, in the listing's order, and a directory's top-level entries in ``os.listdir``'s order);
where the file it reads is another than the one picked here, the read is refused too, naming both
(:func:`check_diffusers`), as it would read another adapter.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorahot.errors import SourceNotFoundError, cut

__all__ = ["PEFT_WEIGHTS", "DIFFUSERS_WEIGHTS", "WEIGHT_NAMES", "pick_weight", "diffusers_guess", "check_diffusers"]

#: what PEFT's ``save_pretrained`` writes and its ``from_pretrained`` reads
PEFT_WEIGHTS = "adapter_model.safetensors"
#: what diffusers' ``save_lora_weights`` writes and its ``load_lora_weights`` reads first
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHT_NAMES = (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS)
#: parts of a path diffusers' ``_best_guess_weight_name`` leaves out, as no LoRA's weights
_DIFFUSERS_SKIPS = ("scheduler", "optimizer", "checkpoint")


def pick_weight(names: Iterable[str], where: str) -> str | None:
    """The name among ``names`` (the entries of one level) a read without ``weight_name=``
    opens; None where none is a ``.safetensors`` file.

    Args:
        names: the level's entry names (no folder part).
        where: the level, as an error names it (a directory, or ``org/name@rev: the repo's top level``).

    Raises:
        SourceNotFoundError: both PEFT's and diffusers' names are there, or neither and several
            other ``.safetensors`` files; the message names them and says to pass ``weight_name=``.
    """
    found = sorted(name for name in names if name.endswith(".safetensors"))
    named = [name for name in WEIGHT_NAMES if name in found]
    if len(named) > 1:
        raise SourceNotFoundError(
            f"{where}: both {PEFT_WEIGHTS} (PEFT's PeftModel.from_pretrained reads it) and {DIFFUSERS_WEIGHTS} "
            "(diffusers' load_lora_weights reads it) are there, maybe two adapters; pass weight_name= (the CLI's "
            "--weight-name) to pick one."
        )
    if named:
        return named[0]
    if len(found) > 1:
        raise SourceNotFoundError(
            f"{where}: several .safetensors files ({cut(', '.join(found))}); pass weight_name= (the CLI's "
            "--weight-name) to pick one."
        )
    return found[0] if found else None


def diffusers_guess(paths: Iterable[str]) -> str:
    """The name diffusers' ``load_lora_weights`` asks for without ``weight_name=``: its
    ``_best_guess_weight_name`` over ``paths`` (a Hub repo's every file, in the listing's order,
    or a directory's entries, in ``os.listdir``'s order), else its default name.

    The ``.safetensors`` paths holding none of ``scheduler``, ``optimizer``, ``checkpoint``;
    of those, the ones ending in ``pytorch_lora_weights.safetensors`` where there are some; the
    first (diffusers logs a warning where there are several); ``pytorch_lora_weights.safetensors``
    where none is left.
    """
    found = [p for p in paths if p.endswith(".safetensors") and not any(s in p for s in _DIFFUSERS_SKIPS)]
    named = [p for p in found if p.endswith(DIFFUSERS_WEIGHTS)]
    return (named or found or [DIFFUSERS_WEIGHTS])[0]


#: why diffusers reads the file it reads, as :func:`check_diffusers` says unless told another
GUESSED = (
    f"its _best_guess_weight_name: a file ending in {DIFFUSERS_WEIGHTS} anywhere, else the first .safetensors file"
)
#: the fix :func:`check_diffusers` gives unless told another
PICK_ONE = "pass weight_name= (the CLI's --weight-name) to pick one"


def check_diffusers(chosen: str, theirs: str | None, where: str, why: str = GUESSED, fix: str = PICK_ONE) -> None:
    """Refuses the pick ``chosen`` where diffusers' ``load_lora_weights`` reads another file.

    Args:
        chosen: the file the read opens, as a path inside the repo or directory.
        theirs: the file diffusers reads there (as a path inside it; :func:`diffusers_guess`, joined
            as diffusers joins it), or None where it reads none (no such file: it fails).
        where: the repo or directory, as an error names it.
        why: why diffusers reads ``theirs``, as the error says it.
        fix: what to do, as the error says it.

    Raises:
        SourceNotFoundError: ``theirs`` is another file, naming both, ``why`` and ``fix``.
    """
    if theirs is None or theirs == chosen:
        return
    raise SourceNotFoundError(
        f"{where}: this read opens {cut(chosen, 200)}, but diffusers' load_lora_weights opens {cut(theirs, 200)} "
        f"there ({why}), maybe another adapter; {fix}."
    )
