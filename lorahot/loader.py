"""``read_adapter``: any supported source, in any supported naming, to an :class:`Adapter`."""

from __future__ import annotations

from typing import Any

from lorahot.adapter import Adapter
from lorahot.config import AdapterConfig
from lorahot.errors import UnknownFormatError
from lorahot.formats import FORMATS
from lorahot.sources import Source, open_source

__all__ = ["read_adapter"]


def read_adapter(source: Source | Adapter, *, weight_name: str | None = None, config: dict[str, Any] | None = None) -> Adapter:
    """Reads an adapter and normalizes it.

    Args:
        source: a directory, a ``.safetensors`` file, a mapping of tensors, or an
            :class:`Adapter` (returned as is).
        weight_name: the weight file inside a directory, if not a usual name.
        config: PEFT config fields (``r``, ``lora_alpha``, ``rank_pattern``, ...) to use when
            the source has no ``adapter_config.json``, or to override it.

    Returns:
        The adapter: per module key, A, B, rank and alpha.

    Raises:
        lorahot.LoraError: a subclass saying what is wrong with the source and how to fix it.
    """
    if isinstance(source, Adapter):
        return source
    raw = open_source(source, weight_name=weight_name)
    cfg_dict = dict(raw.config or {})
    cfg_dict.update(config or {})
    cfg = AdapterConfig.from_dict(cfg_dict, raw.source)
    keys = list(raw.tensors)
    fmt = next((f for f in FORMATS if f.detect(keys)), None)
    if fmt is None:
        fmt = FORMATS[0]  # the PEFT reader names each key it cannot place
        if not keys:
            raise UnknownFormatError(f"{raw.source}: holds no tensors. Point lorahot at a LoRA adapter.")
    modules = fmt.build_modules(raw.tensors, cfg, raw.source)
    return Adapter(modules, fmt.NAME, raw.source, cfg_dict)
