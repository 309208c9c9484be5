"""Swap suite: swap from file, swap from the host cache, slot activation, memory, correctness.

Every figure is measured in the same process, on the same model and adapter files, next to
its floor (safetensors ``load_file`` to the device; bytes / pinned H2D bandwidth; a D2D copy
of the same bytes) and, for swaps from file, PEFT's ``hotswap_adapter``.
"""

from __future__ import annotations

from typing import Any

import torch

import lorahot
from benchmarks.common import d2d_ms, h2d_gbps, median_ms, rel_err, sync
from benchmarks.workload import MAX_RANK, TARGETS, Workload, adapter_file


def eager_reference(w: Workload, rank: int) -> torch.Tensor:
    """Logits of a float32 copy of the model with PEFT's fresh eager load of ``rank``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(w.fresh_base(torch.float32), str(w.adapters[rank])).eval()
    with torch.inference_mode():
        out = model(w.prefill).logits.float()
    del model
    return out


def run(w: Workload, refs: dict[int, torch.Tensor], repeat: int) -> dict[str, Any]:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
    from safetensors.torch import load_file

    dev = w.device
    out: dict[str, Any] = {"swap_from_file_ms": {}, "swap_from_host_ms": {}, "rel_err": {}}
    gbps = h2d_gbps(dev)
    out["pinned_h2d_GBps"] = gbps

    model = w.fresh_base()
    mem0 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
    mem1 = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    out["memory"] = {"lorahot_added_bytes": mem1 - mem0, "padded_bytes_x_slots": runtime.nbytes, "slots": 1}

    peft_model = PeftModel.from_pretrained(w.fresh_base(), str(w.adapters[8])).eval()
    prepare_model_for_compiled_hotswap(peft_model, target_rank=MAX_RANK)

    order = [16, 64, 8]
    for rank in order:
        path = w.adapters[rank]
        f = adapter_file(path)
        floor = median_ms(lambda: load_file(f, device=str(dev)), dev, repeat=repeat)
        ours = median_ms(lambda: runtime.load(path), dev, repeat=repeat)
        theirs = median_ms(
            lambda: hotswap_adapter(peft_model, str(path), adapter_name="default", torch_device=str(dev)),
            dev,
            repeat=max(5, repeat // 2),
        )
        with torch.inference_mode():
            out["rel_err"][f"swap_from_file_r{rank}"] = rel_err(model(w.prefill).logits, refs[rank])
        prepared = runtime.preload(path)
        host = median_ms(lambda: runtime.load(prepared), dev, repeat=repeat)
        with torch.inference_mode():
            out["rel_err"][f"swap_from_host_r{rank}"] = rel_err(model(w.prefill).logits, refs[rank])
        nbytes = prepared.nbytes
        out["swap_from_file_ms"][str(rank)] = {"lorahot": ours, "peft": theirs, "floor": floor}
        out["swap_from_host_ms"][str(rank)] = {
            "lorahot": host,
            "floor": nbytes / (gbps * 1e6) if gbps else None,
            "bytes": nbytes,
        }
    del peft_model

    lorahot.eject(model)
    mem_slots = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, slots=2)
    out["memory"]["slots2_added_bytes"] = (torch.cuda.memory_allocated(dev) - mem_slots) if dev.type == "cuda" else 0
    out["memory"]["slots2_padded_bytes"] = runtime.nbytes
    runtime.load(w.adapters[64], slot=0)
    runtime.load(w.adapters[8], slot=1)
    state = {"slot": 0}

    def flip() -> None:
        state["slot"] ^= 1
        runtime.activate(state["slot"])

    act = median_ms(flip, dev, repeat=max(repeat, 50))
    runtime.activate(0)
    with torch.inference_mode():
        out["rel_err"]["activate_r64"] = rel_err(model(w.prefill).logits, refs[64])
    moved = sum(
        a.A[0].nbytes + a.B[0].nbytes + a.S[0].nbytes for a in runtime.buffers.arenas
    )  # activation copies whole regions
    out["activate_slot_ms"] = {"lorahot": act, "floor": d2d_ms(moved, dev), "bytes": moved}
    sync(dev)
    return out
