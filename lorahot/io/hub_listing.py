"""Where in a Hub repo a read looks (:class:`_Level`), and which files of the repo's listing it
opens there: the ``.safetensors`` file it picks at the top of ``subfolder``
(:mod:`lorahot.io.weight_names`), and the config beside it. The same plan checks a listing
``huggingface_hub`` cached, for a read from the cache alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lorahot.errors import shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.weight_names import check_diffusers, diffusers_guess, pick_weight

__all__: list[str] = []  # helpers of lorahot.io.hub and its parts


@dataclass(frozen=True)
class _Level:
    """Where in a Hub repo a read looks: folder ``subfolder`` (a clean relative path, as
    :func:`~lorahot.io.hub.check_relative` leaves it), or the repo's top level where None."""

    subfolder: str | None

    @property
    def inner(self) -> str:
        """What the repo's paths at this level start with: ``subfolder/``, or nothing at the top."""
        return f"{self.subfolder}/" if self.subfolder else ""

    @property
    def name(self) -> str:
        """The level as an error names it."""
        return f"folder {shown(self.subfolder, 200)} of the repo" if self.subfolder else "the repo's top level"

    def folder(self, root: Path) -> Path:
        """The level's folder in the snapshot folder ``root``."""
        return root / self.subfolder if self.subfolder else root

    def entries(self, paths: Iterable[str]) -> list[str]:
        """The names of the entries of ``paths`` (the repo's, from its listing) at this level, none below it."""
        inner = self.inner
        return [p[len(inner) :] for p in paths if p.startswith(inner) and "/" not in p[len(inner) :]]


def _needed(files: list[str], subfolder: str | None, where: str) -> list[str]:
    """The paths of ``files`` a read of ``subfolder`` opens: the top-level ``*.safetensors``
    file it picks (:func:`~lorahot.io.weight_names.pick_weight`, no other: a repo may hold many
    large ones) and its config (never a checkpoint folder below it, nor a pickle).

    Raises:
        SourceNotFoundError: the level holds several files to pick from, or diffusers'
            ``load_lora_weights`` reads another file of the repo (nothing downloaded).
    """
    level = _Level(subfolder)
    inner, here = level.inner, level.entries(files)
    chosen = pick_weight(here, f"{where}: {level.name}")
    if chosen is not None:  # diffusers guesses from every file of the repo, and fetches it under subfolder
        theirs = inner + diffusers_guess(files)
        check_diffusers(inner + chosen, theirs if theirs in files else None, where)
    return [inner + name for name in here if name in (chosen, CONFIG_NAME)]
