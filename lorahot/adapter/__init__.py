"""The normalized adapter: what every reader produces and the runtime consumes.

Whatever the naming in the file (PEFT, diffusers, kohya, ComfyUI), a reader turns it into an
:class:`Adapter`: per module key, the A and B tensors in PEFT's layout and the scale they
carry. Keys are module paths as the source names them; the runtime resolves them against the
injected model's own names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "LoraModule",
    "WeightModule",
    "FusedPart",
    "Adapter",
    "storage_problem",
    "detached",
    "WEIGHT_KINDS",
    "ROTATION_KINDS",
    "BASE_KINDS",
    "KIND_NAMES",
]

#: The adapter kinds lorahot folds into the base weights (merged mode only), by what a module
#: holds: LyCORIS LoHa (``hada_*``), LoKr (``lokr_*``), LoCon with a Tucker core
#: (``lora_down``/``lora_mid``/``lora_up``), full diffs (``.diff``, ``.diff_b``) and a LoRA/LoCon
#: whose weight decomposition normalizes each input channel (``lora_down``/``lora_up`` with a
#: ``dora_scale`` ``[1, in, ...]``: LyCORIS' ``wd_on_out=False``), and the kinds that rotate the
#: base weight (:data:`ROTATION_KINDS`).
#: ``"lora"`` is a plain LoRA's ``lora_up @ lora_down`` at ``alpha / r``, as ``fuse=`` makes of a
#: LoRA part joined with weight-delta parts (no reader produces it).
WEIGHT_KINDS = (
    "loha",
    "lokr",
    "locon-tucker",
    "diff",
    "locon",
    "lora",
    "oft",
    "boft",
    "kohya-oft",
    "ia3",
    "glora",
    "fused",
)
#: The kinds whose ``ΔW`` is ``rescale * R W0 - W0``, ``R`` an orthogonal rotation of the output
#: channels built from ``oft_blocks`` (Cayley transform) and ``W0`` the pristine base weight:
#: LyCORIS' diagonal OFT (``oft_blocks`` ``[n, b, b]``, optional ``rescale``), LyCORIS' BOFT
#: (``oft_blocks`` ``[m, n, b, b]``, a butterfly of ``m`` stages) and kohya sd-scripts' own OFT
#: network (``oft_unet_<m>.oft_blocks`` ``[n, b, b]``). Their ``.alpha`` is the norm constraint on
#: the skew-symmetric blocks, not a scale (see :mod:`lorahot.adapter.deltas`).
ROTATION_KINDS = ("oft", "boft", "kohya-oft")
#: The kinds whose ``ΔW`` is built from the pristine base weight ``W0``: the rotations, LyCORIS'
#: (IA)^3 (``weight`` and ``on_input``: ``W0`` times one learned factor per output row, or per
#: input column, ``ΔW = W0 * w``) and LyCORIS' GLoRA (``a1``, ``a2``, ``b1``, ``b2``:
#: ``ΔW = W0 a1 a2 + b1 b2`` at ``alpha / r``).
BASE_KINDS = (*ROTATION_KINDS, "ia3", "glora")
#: How a message names a module of each of :data:`WEIGHT_KINDS`, article included ("an OFT",
#: "a LoHa"): the kind ids are lowercase keys, not names.
KIND_NAMES = {
    "loha": "a LoHa",
    "lokr": "a LoKr",
    "locon-tucker": "a Tucker LoCon",
    "diff": "a full diff",
    "locon": "a LoCon",
    "lora": "a LoRA",
    "oft": "an OFT",
    "boft": "a BOFT",
    "kohya-oft": "a kohya OFT",
    "ia3": "an (IA)^3",
    "glora": "a GLoRA",
    "fused": "a fused",
}


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA weights.

    Attributes:
        key: the module path as the source names it (dots, prefix not yet resolved).
        A: ``[r, in]`` (linear), ``[r, in, *kernel]`` (conv) or ``[r, num_embeddings]``.
        B: ``[out, r]``, ``[out, r / groups, 1, ...]`` or ``[dim, r]``.
        alpha: the LoRA alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        use_rslora: whether the scale divides by ``sqrt(r)`` instead of ``r``.
        source_keys: the tensor keys in the source this module came from (for messages).
        base_weight: the copy of the base layer's weight the file carries, if any (PEFT saves
            ``<module>.base_layer.weight`` for LoRA on ``embed_tokens``/``lm_head``, in case the
            vocabulary was resized): ``[num_embeddings, dim]`` or ``[out, in]``, as saved; its key
            is in ``source_keys``. It is not part of the update ``B @ A``: the runtime compares it
            with the model's own weight (equal: nothing to do; different: the adapter was trained
            on another vocabulary). Renames (``prefix``, ``key_map``) carry it along.
        magnitude: DoRA's magnitude vector (PEFT ``lora_magnitude_vector``), one value per
            output channel (``[out]``, or ``[1, out, 1, ...]`` for convs as PEFT saves it; a
            LyCORIS or kohya ``dora_scale``, ``[out, 1, ...]``); None for plain LoRA. The layer
            then computes ``m / ||W0 + scale * B @ A||`` per output channel times
            ``base(x) - bias + scale * (B(A(x)) + lora_bias)``, plus the bias.
        bias: the bias of PEFT's ``lora_B`` (``lora_bias=True``), ``[out]``; the layer adds
            ``scale * bias``. None when the adapter has none.
        unit_scale: the module computes what its source means only at a user scale of 1: a
            LyCORIS or kohya LoRA/LoCon trained with weight decomposition (``dora_scale``), whose
            weight at another strength LyCORIS and ComfyUI compute differently from each other
            and from DoRA at that scale. The runtime refuses any other scale for a slot holding it.
    """

    key: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    source_keys: tuple[str, ...] = ()
    base_weight: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    unit_scale: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        if self.rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def norm_eps(self, dtype: torch.dtype) -> float:
        """What DoRA's factor ``m / (||W0 + scale * B @ A|| + eps)`` adds to each channel's norm,
        computed in ``dtype``: LyCORIS' ``eps`` for a LyCORIS or kohya ``dora_scale`` (a
        :attr:`unit_scale` module), the machine epsilon of the dtype the norm is computed in
        (:func:`~lorahot.adapter.deltas.norm_eps`); 0 for PEFT's magnitude, whose norm has none."""
        if self.magnitude is None or not self.unit_scale:
            return 0.0
        return torch.finfo(dtype).eps


@dataclass(frozen=True)
class FusedPart:
    """One part of a ``"fused"`` :class:`WeightModule`: its key, kind, alpha, output rows and
    the tensor keys it came from (for messages)."""

    key: str
    kind: str
    alpha: float | None
    out: int
    source_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightModule:
    """One module whose update is a full ``ΔW`` built from factors (not ``B @ A``).

    lorahot loads these only in merged mode: ``ΔW`` is built on the weights' device from the
    factors (:mod:`lorahot.adapter.deltas`) and folded into the pristine base weight.

    Attributes:
        key: the module path as the source names it.
        kind: one of :data:`WEIGHT_KINDS`.
        factors: the tensors by their name in the file (``hada_w1_a``, ``lokr_w2_b``, ``diff``,
            ``diff_b``, ``lora_down``/``lora_mid``/``lora_up``, ``dora_scale``), as saved. A
            ``dora_scale`` (LyCORIS' weight decomposition) makes the folded weight
            ``V * dora_scale / (||V|| + eps)``, ``V = W0 + scale * ΔW``, the norm per output
            channel (``dora_scale`` ``[out, 1, ...]``) or per input channel (``[1, in, ...]``),
            ``eps`` the machine epsilon of ``dora_scale``'s dtype, as LyCORIS computes it at
            multiplier 1 (see :attr:`unit_scale`). The rotation kinds (:data:`ROTATION_KINDS`)
            hold ``oft_blocks`` and, for LyCORIS' diagonal OFT, an optional ``rescale``
            ``[out, 1, *ones]``; (IA)^3 ``weight`` (its ``<module>.weight``) and ``on_input``;
            GLoRA ``a1`` ``[in, r, *ones]``, ``a2`` ``[r, in, *ones]``, ``b1`` ``[out, r, *ones]``,
            ``b2`` ``[r, in, *kernel]``.
        alpha: the ``.alpha`` tensor's value, or None (then alpha equals the rank); a negative
            one scales by ``alpha / r`` as given, as LyCORIS and ComfyUI scale it. For the
            rotation kinds, the norm constraint (0 or None: none; LyCORIS and sd-scripts bound
            the blocks' skew part to ``alpha * out``).
        source_keys: the tensor keys in the source this module came from (for messages).
        rows: where the module is a part of a fused module (Flux's ``img_attn.qkv`` placed on
            ``to_q``), the rows of the fused module's ``ΔW`` it folds, in order (``[out]``
            int64; a re-ordering where the rows of one module are re-stacked): the factors
            stay the fused module's, and its ``diff_b`` and ``dora_scale`` are already this
            part's rows. None for a whole module.
        whole_rows: the fused module's ``ΔW`` rows where :attr:`rows` is given, else 0.
        parts: for kind ``"fused"`` (``fuse=``: separate modules joined onto one fused layer),
            each part in the fused layer's row order; a part's factors are this module's under
            ``"<index>.<name>"`` (:meth:`part_modules`), and ``diff_b``, where some part has one,
            is the parts' stacked (zeros for the others). Its ``ΔW`` stacks each part's
            ``ΔW`` times that part's scale, so its own :attr:`scale` is 1; a part of a kind
            built from the base weight builds it from its own rows of ``W0``, and a part's
            ``dora_scale`` normalizes that part's rows (:func:`~lorahot.adapter.deltas.fold_delta`).
    """

    key: str
    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float | None = None
    source_keys: tuple[str, ...] = ()
    rows: torch.Tensor | None = None
    whole_rows: int = 0
    parts: tuple[FusedPart, ...] = ()

    @property
    def rank(self) -> int:
        """The rank the alpha divides: the low-rank factors' (0 where the kind has none: a diff
        alone, a full LoKr). A diff with a LoRA pair (``lora_down``/``lora_up``) has the pair's
        rank; that pair takes its ``alpha / r`` inside ``ΔW`` (:mod:`lorahot.adapter.deltas`),
        so the diff's :attr:`scale` stays 1."""
        f = self.factors
        if self.kind == "loha":
            return int(f["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            low = f.get("lokr_w1_b", f.get("lokr_w2_b"))
            return 0 if low is None else int(low.shape[0])
        if self.kind in ("locon-tucker", "diff", "locon", "lora") and "lora_down" in f:
            return int(f["lora_down"].shape[0])
        if self.kind == "glora" and f["a2"].ndim:
            return int(f["a2"].shape[0])
        return 0

    @property
    def scale(self) -> float:
        """The factor on ``ΔW``: ``alpha / rank`` (1 where there is no rank, as LyCORIS does,
        and for a diff, whose LoRA pair is scaled inside ``ΔW``)."""
        r = self.rank
        return 1.0 if r == 0 or self.alpha is None or self.kind == "diff" else self.alpha / r

    def part_modules(self) -> list[WeightModule]:
        """The parts of a ``"fused"`` module as modules of their own (their factors, kind, alpha
        and key), in row order; empty for any other kind."""
        out = []
        for i, part in enumerate(self.parts):
            head = f"{i}."
            factors = {k[len(head) :]: t for k, t in self.factors.items() if k.startswith(head)}
            out.append(WeightModule(part.key, part.kind, factors, part.alpha, part.source_keys or self.source_keys))
        return out

    def part_rows(self) -> list[tuple[WeightModule, slice]]:
        """Each part of a ``"fused"`` module with its rows of the fused ``ΔW``, in order;
        ``[(self, every row)]`` for any other kind."""
        if self.kind != "fused":
            return [(self, slice(None))]
        starts = [0]
        for part in self.parts:
            starts.append(starts[-1] + part.out)
        return [(m, slice(a, b)) for m, a, b in zip(self.part_modules(), starts, starts[1:])]

    @property
    def named(self) -> str:
        """Its kind as a message names it, article included (:data:`KIND_NAMES`: "an OFT")."""
        return KIND_NAMES.get(self.kind, f"a {self.kind}")

    @property
    def rotates(self) -> bool:
        """Its ``ΔW`` rotates the pristine base weight (:data:`ROTATION_KINDS`)."""
        return self.kind in ROTATION_KINDS

    @property
    def reads_base(self) -> bool:
        """Its ``ΔW`` is built from the pristine base weight (:data:`BASE_KINDS`; a ``"fused"``
        module where a part is)."""
        return self.kind in BASE_KINDS or any(p.kind in BASE_KINDS for p in self.parts)

    @property
    def decomposes(self) -> bool:
        """It carries a ``dora_scale`` (LyCORIS' weight decomposition; a ``"fused"`` module where
        a part does)."""
        return "dora_scale" in self.factors or any(f"{i}.dora_scale" in self.factors for i in range(len(self.parts)))

    @property
    def unit_scale(self) -> bool:
        """The module computes what its source means only at a user scale of 1 (as
        :attr:`LoraModule.unit_scale`): it carries a ``dora_scale``, or it is a LyCORIS OFT or
        BOFT, whose weight at another strength LyCORIS (``I + s (R - I)`` per block or butterfly
        stage) and ComfyUI (that rotation's ``ΔW`` times ``s`` once more) compute differently.
        kohya's OFT is scaled by sd-scripts' own multiplier, ``I + s (R - I)`` per block, which
        makes ``W0 + s (R W0 - W0)``; ComfyUI does not read its ``oft_unet_`` names. A
        ``"fused"`` module is where any part is."""
        return self.decomposes or self.kind in ("oft", "boft") or any(p.kind in ("oft", "boft") for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.factors.values())


@dataclass
class Adapter:
    """A LoRA adapter in normalized form.

    Attributes:
        modules: module key -> :class:`LoraModule`.
        format: the detected naming (``"peft"``, ``"diffusers"``, ``"kohya"``, ...).
        source: where it came from (path, repo id, or ``"<mapping>"``), for messages.
        config: the adapter config as read (PEFT's ``adapter_config.json`` fields), if any.
        skipped: tensor keys left out because they cannot be loaded (``strict=False`` only):
            keys of no known naming, refused features, a module's A without its B.
        weights: module key -> :class:`WeightModule` (LoHa, LoKr, Tucker LoCon, diffs), which
            load in merged mode only.
        file_keys: the module keys as the file names them, where ``key_map=``, ``fuse=`` or
            ``split=`` renamed them since (after ``prefix=``, which selects a component's keys):
            what tells a file of one model by its names (:meth:`lorahot.formats.table.KeyFormat.for_file`:
            Krea 2's ``blocks.0.attn.wq`` marks a PEFT file as Krea 2's, however a rename spells it);
            empty: the keys of :attr:`modules` and :attr:`weights`.
        stored_dtypes: tensor key in the source -> the dtype the source stores it in, for the
            tensors read as another dtype: a float8 tensor is read as float32, every value exactly
            (:func:`lorahot.io.dtypes.widened`), and ``lorahot inspect`` reports it as stored.
            Empty where every tensor is read as stored. Renames keep it: it is keyed by
            ``source_keys``.
    """

    modules: dict[str, LoraModule]
    format: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    weights: dict[str, WeightModule] = field(default_factory=dict)
    file_keys: tuple[str, ...] = ()
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the LoRA weights A and B as held (base-weight copies not counted; a float8
        file's tensors widened to float32: see :attr:`stored_dtypes`)."""
        return sum(m.A.nbytes + m.B.nbytes for m in self.modules.values()) + sum(
            w.nbytes for w in self.weights.values()
        )


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as a plain ``torch.Tensor`` of the same memory: a subclass of the
    caller's (its ``__torch_function__``, a ``detach`` of its own) is not called, here or by any
    operation lorahot runs on the result. A runtime call reads the caller's tensors before it
    checks the model and must run nothing of the caller's after (see
    ``LoraRuntime._check_usable``). A subclass that dispatches in Python (a wrapper: DTensor,
    torchao's) stays one, for :func:`storage_problem` to refuse."""
    if type(t) is torch.Tensor:
        return t.detach()
    with torch._C.DisableTorchFunctionSubclass():
        return torch.Tensor.detach(t)


def storage_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot hold LoRA values whatever its dtype (sparse, meta, nested, quantized, a
    wrapper whose values are not in its storage), or None."""
    if t.is_nested or t.is_quantized:
        return f"a {'nested' if t.is_nested else 'quantized'} tensor"
    if _wrapper(t):
        return (
            f"a {type(t).__name__}, a tensor subclass whose values are not in its own storage (a DTensor, a fake, "
            "functional or quantized tensor subclass); pass plain tensors (DTensor.full_tensor(), or dequantize)"
        )
    if t.layout != torch.strided or t.device.type == "meta":
        return f"a {t.layout} tensor on {t.device}"
    return None


def _wrapper(t: torch.Tensor) -> bool:
    """Whether ``t`` keeps its values outside its own storage: a subclass that dispatches in
    Python (DTensor, FakeTensor, torchao's quantized tensors), a functionalization or functorch
    wrapper. ``nn.Parameter`` and other plain subclasses hold their values and pass."""
    keys = torch._C._dispatch_keys(t)
    return (
        keys.has(torch._C.DispatchKey.Python)
        or keys.has(torch._C.DispatchKey.Functionalize)
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
    )
