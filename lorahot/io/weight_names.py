"""Which ``.safetensors`` file of a directory, or of a Hub repo's level, a read without
``weight_name=`` opens.

One rule for a local directory (its entries) and a Hub repo (the Hub's listing, before anything
is downloaded): PEFT's ``adapter_model.safetensors`` or diffusers'
``pytorch_lora_weights.safetensors``, else the level's only ``*.safetensors``. A level holding
both names is refused, as PEFT's ``PeftModel.from_pretrained`` reads the first and diffusers'
``load_lora_weights`` the second (two adapters, maybe); so is one holding several other files.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorahot.errors import SourceNotFoundError, cut

__all__ = ["PEFT_WEIGHTS", "DIFFUSERS_WEIGHTS", "WEIGHT_NAMES", "pick_weight"]

#: what PEFT's ``save_pretrained`` writes and its ``from_pretrained`` reads
PEFT_WEIGHTS = "adapter_model.safetensors"
#: what diffusers' ``save_lora_weights`` writes and its ``load_lora_weights`` reads first
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
WEIGHT_NAMES = (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS)


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
