"""Original Stable Diffusion (LDM / sgm) UNet block names -> diffusers block names.

SD and SDXL checkpoints, and kohya/ComfyUI LoRAs trained on them, name UNet modules
``input_blocks.<i>.<j>``, ``middle_block.<j>`` and ``output_blocks.<i>.<j>``; diffusers names
them ``down_blocks.<b>.{resnets,attentions,downsamplers}.<k>``, ``mid_block...`` and
``up_blocks...``. With ``L`` layers per block, input block ``i >= 1`` is down block
``(i-1) // (L+1)``, layer ``(i-1) % (L+1)`` (layer ``L`` being the downsampler); output block
``i`` is up block ``i // (L+1)``, layer ``i % (L+1)``. Names work on the underscore form
(``input_blocks_4_1_proj_in``), which is what kohya files use and what dotted names become.
"""

from __future__ import annotations

import re

__all__ = ["LDM_MARKER", "layers_per_block", "to_diffusers"]

#: An underscore-form name that uses LDM block names.
LDM_MARKER = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")

#: Whole-module renames: modules outside the numbered blocks.
_FIXED = (
    (r"input_blocks_0_0", "conv_in"),
    (r"out_2", "conv_out"),
    (r"time_embed_0", "time_embedding_linear_1"),
    (r"time_embed_2", "time_embedding_linear_2"),
    (r"label_emb_0_0", "add_embedding_linear_1"),
    (r"label_emb_0_2", "add_embedding_linear_2"),
)
#: Inside a resnet or sampler: LDM layer name -> diffusers layer name.
_INNER = (
    (r"^in_layers_2$", "conv1"),
    (r"^out_layers_3$", "conv2"),
    (r"^emb_layers_1$", "time_emb_proj"),
    (r"^skip_connection$", "conv_shortcut"),
    (r"^op$", "conv"),
)
#: ``middle_block_<j>`` -> diffusers part of ``mid_block``.
_MIDDLE = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}
_KINDS = {0: "resnets", 1: "attentions"}


def layers_per_block(names: list[str]) -> int:
    """diffusers ``layers_per_block`` read off module names (2, SD's value, if they say nothing).

    Down blocks hold ``L`` resnets/attentions, up blocks ``L + 1``.
    """
    down = [
        int(m[1]) + 1 for n in names for m in [re.search(r"down_blocks\.\d+\.(?:resnets|attentions)\.(\d+)", n)] if m
    ]
    up = [int(m[1]) for n in names for m in [re.search(r"up_blocks\.\d+\.(?:resnets|attentions)\.(\d+)", n)] if m]
    return max(down + up, default=2) or 2


def to_diffusers(name: str, per_block: int) -> str | None:
    """The diffusers underscore-form name of an LDM underscore-form ``name``, or None.

    None also for block and layer indices SD's UNet does not have (``input_blocks_1_5``): such a
    name maps nowhere, so it matches no injected layer rather than a wrong one.
    """
    for pattern, repl in _FIXED:
        if re.fullmatch(pattern, name):
            return repl
    m = re.fullmatch(r"input_blocks_([0-9]{1,4})_([0-9]{1,4})_(.+)", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), _inner(m[3])
        if i < 1:
            return None  # input_blocks_0_0 is conv_in (above); nothing else sits in block 0
        block, layer = divmod(i - 1, per_block + 1)
        if layer == per_block:
            return f"down_blocks_{block}_downsamplers_0_{rest}" if j == 0 else None
        return f"down_blocks_{block}_{_KINDS[j]}_{layer}_{rest}" if j in _KINDS else None
    m = re.fullmatch(r"middle_block_([0-9]{1,4})_(.+)", name)
    if m and int(m[1]) in _MIDDLE:
        return f"mid_block_{_MIDDLE[int(m[1])]}_{_inner(m[2])}"
    m = re.fullmatch(r"output_blocks_([0-9]{1,4})_([0-9]{1,4})_(.+)", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), _inner(m[3])
        block, layer = divmod(i, per_block + 1)
        if j == 2 or (j == 1 and rest == "conv"):
            return f"up_blocks_{block}_upsamplers_0_{rest}"
        return f"up_blocks_{block}_{_KINDS[j]}_{layer}_{rest}" if j in _KINDS else None
    return None


def _inner(rest: str) -> str:
    for pattern, repl in _INNER:
        if re.fullmatch(pattern, rest):
            return repl
    return rest
