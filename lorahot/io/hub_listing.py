"""Which files of a Hub repo's listing a read opens: the ``.safetensors`` file it picks at
the top of ``subfolder`` (:mod:`lorahot.io.weight_names`), and the config beside it. The same
plan checks a listing ``huggingface_hub`` cached, for a read from the cache alone.
"""

from __future__ import annotations

from lorahot.errors import shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.weight_names import check_diffusers, diffusers_guess, pick_weight

__all__: list[str] = []  # helpers of lorahot.io.hub and its parts


def _needed(files: list[str], subfolder: str | None, where: str) -> list[str]:
    """The paths of ``files`` a read of ``subfolder`` opens: the top-level ``*.safetensors``
    file it picks (:func:`~lorahot.io.weight_names.pick_weight`, no other: a repo may hold many
    large ones) and its config (never a checkpoint folder below it, nor a pickle).

    Raises:
        SourceNotFoundError: the level holds several files to pick from, or diffusers'
            ``load_lora_weights`` reads another file of the repo (nothing downloaded).
    """
    inner = f"{subfolder}/" if subfolder else ""
    here = [name[len(inner) :] for name in files if name.startswith(inner) and "/" not in name[len(inner) :]]
    level = f"folder {shown(subfolder, 200)} of the repo" if subfolder else "the repo's top level"
    chosen = pick_weight(here, f"{where}: {level}")
    if chosen is not None:  # diffusers guesses from every file of the repo, and fetches it under subfolder
        theirs = inner + diffusers_guess(files)
        check_diffusers(inner + chosen, theirs if theirs in files else None, where)
    return [inner + name for name in here if name in (chosen, CONFIG_NAME)]
