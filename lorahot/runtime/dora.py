"""DoRA factors: ``f = m / ||W0 + scale * B @ A||`` per output channel, computed on the device.

A DoRA adapter (PEFT ``use_dora=True``) rescales each output channel of the adapted weight to
its trained magnitude ``m``. PEFT's forward (``DoraLinearLayer.forward``) computes, for a base
layer with weight ``W0`` and bias ``b0``, ``f * (W0 x + scale * (B A x + lora_bias)) + b0``
with ``f = m / ||W0 + scale * B @ A||`` (the norm detached, over each output channel's
weights). The factor depends on the scale, so it is recomputed whenever the region's scales
change: after a load and after ``set_scale``; ``activate`` copies it with the rest of a region.
A LyCORIS or kohya LoRA/LoCon whose magnitude is a ``dora_scale`` gets LyCORIS' factor
``m / (||W0 + scale * B @ A|| + eps)``, ``eps`` the machine epsilon of the dtype the norm is
computed in (:func:`lorahot.adapter.deltas.norm_eps`); PEFT's norm has no ``eps``.
It depends on the base weight and bias too: after ``load_state_dict`` writes them, the runtime
computes the layer's factors again in every region that holds a DoRA adapter for it
(:meth:`lorahot.runtime.lora_runtime.LoraRuntime._base_loaded`, called from the layer's load
hooks, :meth:`lorahot.layers.LoRALayer.attach`), whether the load went through the model, the
LoRA layer or the wrapped module itself. A layer of a copy of the model (``copy.deepcopy``, no
runtime) refuses such a load through it with a UsageError instead, since it cannot compute
them. A write in place by other means that moves the weight's or bias's version counter
(``weight.mul_``, an optimizer's step), or that puts new memory under it (``weight.data = new``,
``prune.remove``), is seen by the layer's next eager forward
(:meth:`lorahot.layers.LoRALayer._check_dora_base`, which compares the versions the layer keeps
in ``_dora_seen`` and has the runtime compute its factors again:
:meth:`lorahot.runtime.lora_runtime.LoraRuntime._base_moved`, :meth:`DoraFactors.moved_one`)
and by the next runtime call (:meth:`DoraFactors.moved`). A compiled forward, a CUDA graph's
capture or replay, ``torch.jit.trace`` and ``torch.func`` transforms run no check: they keep the
factors of the last runtime call. Not seen: a write in place that moves no counter
(``weight.data.copy_``, an inference tensor's), and a load into a copy's wrapped module itself.
Only the layers some slot holds a DoRA adapter for are watched (:meth:`DoraFactors.keep`).

The factor lives in row 0 of each layer's extras (:mod:`lorahot.runtime.buffers`) and
``g = (1 - f) * b0`` in row 2, so the forward ``f * (base(x) + scale * (delta + lora_bias)) + g``
is PEFT's formula whatever the layer's path (the base output includes ``b0``). A DoRA layer
holds one adapter (a stack refuses DoRA on a layer another part touches: PEFT computes a
factor per adapter), so every row it uses has one scale, its row 0's. Computed from
the region's own A, B, scale and magnitude rows, on the device, with the pristine base weight:
a load from a file and one from the host cache compute bitwise the same factors. The norm is
computed in the scales' dtype (float32, float64 for float64 layers); PEFT computes it in the
input's dtype, the same for float32 and float64 models.

:meth:`DoraFactors.check` computes the same factors before anything is written (a load, from
the adapter's tensors; ``set_scale``, from the slot's rows) and refuses scales under which one
would not be finite: a channel whose adapted weight ``W0 + s * B @ A`` has norm 0, or a
magnitude beyond the buffers' range after the division. PEFT's forward would give inf or NaN
there; merged mode refuses the same adapters (:meth:`lorahot.runtime.merge.Merger.check`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from lorahot.adapter import LoraModule
from lorahot.adapter.deltas import norm_eps
from lorahot.errors import AdapterReadError, UsageError, format_problems, lines
from lorahot.layers import LoRALayer
from lorahot.layers.base import EXTRA_F, EXTRA_G, EXTRA_M, stamp
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.layer_weights import Weight, weight_in
from lorahot.runtime.stack import Stack

__all__ = ["DoraFactors"]


class DoraFactors:
    """Computes the DoRA factors of a region's DoRA layers (see the module docstring).

    Args:
        layers: the runtime's layers by name.
        buffers: their buffer manager.
        weight_of: the pristine base weight of a layer, by name.
        bias_of: the pristine base bias of a layer, by name (None if it has none).
    """

    def __init__(
        self,
        layers: dict[str, LoRALayer],
        buffers: BufferManager,
        weight_of: Callable[[str], torch.Tensor],
        bias_of: Callable[[str], torch.Tensor | None],
    ) -> None:
        self._buffers = buffers
        self._items: dict[tuple[int, int], tuple[LoRALayer, str]] = {
            where: (layers[name], name) for name, where in buffers.where.items()
        }
        self._layers = layers
        self._weight_of = weight_of
        self._bias_of = bias_of
        #: per layer, its base weight's and bias's version counters and addresses when its factors
        #: were last computed (:meth:`moved`)
        self._seen: dict[str, tuple[tuple[int | None, int], tuple[int | None, int] | None]] = {}

    def refresh(
        self, region: int, dora: list[list[int]], decomposed: Collection[str] = (), unversioned: bool = False
    ) -> None:
        """Recomputes ``f`` and ``g`` of the layers ``dora`` (per arena, layer indices) in
        ``region`` from its A, B, scales and magnitudes; the layers named in ``decomposed`` hold
        a LyCORIS ``dora_scale``, whose norm gets LyCORIS' ``eps`` (:meth:`Stack.decomposed`).
        Nothing here can fail on the adapter's content: it was checked before the write.
        ``unversioned``: written without moving the arena's version counter (a forward's
        recompute, :meth:`LoRALayer._dora_views`: a DoRA layer's recorded forwards keep their own
        copy of its extras, and the other layers' rows, whose saved views share that counter, are
        not written)."""
        with torch.no_grad():
            for a, indices in enumerate(dora):
                arena = self._buffers.arenas[a]
                rows = max(arena.a_extent[region], arena.b_extent[region])
                for index in indices:
                    layer, name = self._items[(a, index)]
                    e = arena.extras(index, region)
                    if unversioned:
                        e = e.data  # the same memory, under a version counter of its own
                    scale = arena.S[region, index, 0]  # 0-d: every row in use has it
                    eps = norm_eps(scale.dtype) if name in decomposed else 0.0
                    f = e[EXTRA_M] / (self.norm(layer, name, arena.rows(index, region), scale, rows) + eps)
                    e[EXTRA_F].copy_(f)
                    bias = self._bias_of(name)
                    if bias is None:
                        e[EXTRA_G].zero_()
                    else:
                        e[EXTRA_G].copy_((1 - f) * bias.detach().to(e.dtype))
                    self._note(name)

    def _versions(self, name: str) -> tuple[tuple[int | None, int], tuple[int | None, int] | None]:
        """The base weight's and bias's version counters and addresses: ``weight.data = new``
        (pruning's ``prune.remove`` does it) moves no counter, but puts new memory there.
        Unmerged, the layer's own (:meth:`LoRALayer.dora_versions`, which its eager forward
        compares)."""
        layer = self._layers[name]
        if layer.pristine_weight is None and layer.pristine_bias is None:
            return layer.dora_versions()
        weight, bias = self._weight_of(name), self._bias_of(name)
        return stamp(weight), None if bias is None else stamp(bias)

    def _note(self, name: str) -> None:
        """Notes layer ``name``'s base versions as those its factors were computed from, here and,
        unmerged, on the layer, whose eager forward compares them (:meth:`LoRALayer._check_dora_base`)."""
        layer = self._layers[name]
        seen = self._versions(name)
        self._seen[name] = seen
        object.__setattr__(layer, "_dora_seen", None if layer.merged else seen)

    def keep(self, dora: Collection[Sequence[Sequence[int]]]) -> None:
        """Stops watching the layers no slot holds a DoRA adapter for any more: ``dora`` is each
        loaded slot's DoRA layers (per arena, layer indices: :attr:`Stack.dora`). Their forward
        then pays nothing for DoRA (:attr:`LoRALayer._dora_seen` None); a later load of one
        computes its factors, and watches it again."""
        held = {self._items[(a, index)][1] for layers in dora for a, indices in enumerate(layers) for index in indices}
        for name in [name for name in self._seen if name not in held]:
            del self._seen[name]
            object.__setattr__(self._layers[name], "_dora_seen", None)

    def moved_one(self, name: str) -> bool:
        """Whether layer ``name``, watched, had its base weight or bias written in place or given
        new memory since its factors were computed (see :meth:`moved`); noted as seen if so."""
        if name not in self._seen or self._versions(name) == self._seen[name]:
            return False
        self._note(name)
        return True

    def moved(self) -> list[str]:
        """The layers whose base weight or bias was written in place (its version counter
        moved: ``weight.mul_``, ``weight.detach().copy_``, an optimizer's step) or given new
        memory (``weight.data = new``, ``prune.remove``) since their factors were computed; each
        is reported once. ``weight.data`` has a counter of its own, and an inference tensor none:
        their writes in place are not seen."""
        # a base computing its weight at each call (check_stored) is not read: a parametrized weight's
        # read runs the parametrization, and returns a new tensor (whose counter says nothing) each time
        found = [
            name
            for name, seen in self._seen.items()
            if self._layers[name].computed_base() is None and self._versions(name) != seen
        ]
        for name in found:
            self._note(name)
        return found

    def check_stored(self) -> None:
        """Refuses a runtime call while a layer holding a DoRA adapter has a base that computes its
        weight (or bias) anew at each call since the adapter was loaded (a parametrization such
        as ``parametrizations.weight_norm`` or ``spectral_norm``, or forward pre-hooks: the older
        ``weight_norm``, pruning), which the load refuses: PEFT's forward computes the factor
        ``m / ||W0 + scale * B @ A||`` from the weight each call gives, lorahot from the weight
        when the adapter or its scale changes, so every forward since computed with the factor of
        the weight before. Reads the device (:meth:`LoRALayer.holds_dora`) only for such a layer.

        Raises:
            UsageError: naming each such layer, what computes its weight, and the fix.
        """
        found = [
            f"{name}: {why} the weight"
            for name in self._seen
            if (why := self._layers[name].computed_base()) is not None and self._layers[name].holds_dora()
        ]
        if found:
            raise UsageError(
                lines(
                    format_problems(
                        "layers holding a DoRA adapter compute their base weight anew at each call since it was "
                        "loaded:",
                        found,
                    ),
                    "DoRA's factor m / ||W0 + scale * B @ A|| was computed from the weight before (lorahot computes "
                    "it when the adapter or its scale changes; PEFT at each call), so the forward has used a factor "
                    "of another weight since. Remove it (torch.nn.utils.parametrize.remove_parametrizations, "
                    "remove_weight_norm, remove_spectral_norm, prune.remove, or the hook's handle.remove()), or "
                    "unload the slots holding the DoRA adapter.",
                )
            )

    def check(self, stack: Stack, weights: Sequence[Weight], region: int | None = None) -> None:
        """Refuses ``weights`` (one per part of ``stack``) under which a DoRA layer's factor
        ``f`` or ``g`` would not be finite (see the module docstring). ``region`` None: a load,
        the factors from the adapter's tensors; else ``set_scale`` of that region, from its rows.

        Raises:
            AdapterReadError: a part's factors are not finite at its own scale (weight 1).
            UsageError: they are not finite only at ``weights``.
        """
        terms = [
            (name, p, m)
            for name, items in stack.terms.items()
            for p, m in items
            if isinstance(m, LoraModule) and m.magnitude is not None
        ]
        if not terms:
            return
        where = self._buffers.where
        bad = [name for name, p, m in terms if not self._finite(name, m, weight_in(weights[p], *where[name]), region)]
        if not bad:
            return
        for p in range(len(stack.parts)):
            own = [name for name, q, m in terms if q == p and not self._finite(name, m, 1.0, region)]
            if own:
                raise AdapterReadError(
                    lines(
                        format_problems(
                            f"{stack.named(p)}: DoRA factors m / ||W0 + scale * B @ A|| are not finite in:", own
                        ),
                        "A channel's adapted weight has norm 0, or its magnitude overflows the buffers' dtype after "
                        "the division (PEFT's forward would give inf or NaN); the adapter cannot run on this model.",
                    )
                )
        shown = f"{weights[0]:g}" if stack.single else "[" + ", ".join(f"{w:g}" for w in weights) + "]"
        raise UsageError(
            lines(
                format_problems(f"scale={shown}: DoRA factors m / ||W0 + scale * B @ A|| would not be finite in:", bad),
                "At this scale a channel's adapted weight has norm 0 (or the factor overflows); pass another scale.",
            )
        )

    def _finite(self, name: str, m: LoraModule, weight: float, region: int | None) -> bool:
        """Whether layer ``name``'s factors ``f`` and ``g`` are finite with the DoRA module ``m``
        at ``weight`` times its own scale, from ``m``'s tensors or (``region``) the region's rows."""
        a, index = self._buffers.where[name]
        arena = self._buffers.arenas[a]
        layer = self._items[(a, index)][0]
        device, sdtype = arena.S.device, arena.S.dtype
        with torch.no_grad():
            if region is None:
                ab = (
                    m.A.flatten(1).to(device, arena.A.dtype),
                    m.B.flatten(1).t().to(device, arena.B.dtype),
                )
                magnitude = m.magnitude.reshape(-1).to(device, arena.E.dtype)  # type: ignore[union-attr]
                rows = m.rank
            else:
                ab = arena.rows(index, region)
                magnitude = arena.extras(index, region)[EXTRA_M]
                rows = max(arena.a_extent[region], arena.b_extent[region])
            scale = torch.tensor(weight * m.scale, dtype=sdtype, device=device)
            f = magnitude / (self.norm(layer, name, ab, scale, rows) + m.norm_eps(sdtype))
            bias = self._bias_of(name)
            g = f if bias is None else (1 - f) * bias.detach().to(f.dtype)
            return bool(torch.isfinite(f).all()) and bool(torch.isfinite(g).all())

    def norm(
        self, layer: LoRALayer, name: str, ab: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor, rows: int
    ) -> torch.Tensor:
        """``[out]``: ``||W0 + scale * B @ A||`` per output channel, in the scale's dtype."""
        a, bt = ab
        dtype = scale.dtype
        m1, m2 = layer.merge_operands(a[:rows].to(dtype), bt[:rows].to(dtype))
        w0 = self._weight_of(name).detach()
        weight = w0.flatten(1).to(dtype) + scale * (m1 @ m2)
        return layer.dora_norm(weight)
