"""``LoRAEmbedding``: LoRA on ``nn.Embedding``, in PEFT's layout.

Files store ``lora_embedding_A [r, num_embeddings]`` and ``lora_embedding_B [dim, r]``; the
output is ``base(ids) + (A.T[ids] * s) @ B.T`` with ``s`` the per-row scales.

Scaled embeddings: some models' embeddings scale their own output (transformers' Gemma,
Gemma2 and Gemma3 ``*ScaledWordEmbedding``: ``super().forward(ids) * self.embed_scale``).
The LoRA delta is a change of the embedding table, so the base scales it too: merged mode does
so by construction (it rewrites the table), and the unmerged forward multiplies the delta by
the base's ``embed_scale``, read at forward time (so ``model.to()`` and dtype casts follow), as
PEFT does. An embedding class that overrides ``forward`` any other way is refused at inject:
lorahot cannot tell what it does to its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import routing
from lorahot.layers.base import LayerSpec, LoRALayer, overrides_forward
from lorahot.layers.probes import forward_mismatch

__all__ = ["LoRAEmbedding", "embedding_output_scale"]

#: The attribute holding the factor a scaled embedding multiplies its output by.
SCALE_ATTR = "embed_scale"


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``.

    Buffers (views into the arena): ``lora_A [R, num_embeddings]``, ``lora_B [R, dim]``
    (B stored transposed) and ``lora_scale`` (``[R]``; float32, float64 for float64 layers).

    Raises:
        UsageError: ``base_layer`` is not an ``nn.Embedding``, has a ``max_norm``, or its class
            overrides ``forward`` with anything but a verified ``embed_scale`` output scale.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise UsageError(f"{type(base_layer).__name__} is not an nn.Embedding")
        if base_layer.max_norm is not None:  # PEFT renormalizes the looked-up rows of A.T in place too
            raise UsageError(
                f"nn.Embedding with max_norm={base_layer.max_norm} renormalizes the rows each call looks up, in place; "
                "PEFT does so to the LoRA's A as well, so the output would depend on which ids earlier calls read. "
                "lorahot does not reproduce that: target other modules, or set max_norm=None on the embedding"
            )
        scaled = embedding_output_scale(base_layer)
        # the table's own [num, dim], which is all its forward reads (num_embeddings and
        # embedding_dim may be stale: a table sliced or replaced by hand)
        num, dim = (int(n) for n in base_layer.weight.shape)
        super().__init__(base_layer, LayerSpec("embedding", num, dim, (num,)))
        self._scaled = scaled  # constant after inject: the compiler sees a constant

    def live_views(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arena rows ``[R, num]``, ``[R, dim]`` are used as they are."""
        return a_rows, b_rows

    #: the forward refuses a call while the base has a ``max_norm`` set after inject (:meth:`refuse_call`)
    checks_max_norm = True

    def refuse_call(self) -> None:
        """Refuses a call, before anything runs, while the base has a ``max_norm`` set after
        inject (the forward calls it only then): the base's forward would renormalize the
        looked-up rows of its table in place first, the folded LoRA's too in merged mode.

        Raises:
            UsageError: :meth:`max_norm_refusal`.
        """
        raise self.max_norm_refusal()

    def max_norm_refusal(self) -> UsageError:
        """The refusal of a call while the base has a ``max_norm`` set after inject (inject refuses
        one set before): its forward renormalizes the rows each call looks up in place, where
        PEFT's renormalizes the base's rows and its A's apart. Checked where the delta is
        computed, inline (the base's own forward reads ``max_norm`` too, so a compiled graph is
        already guarded on it: the check adds no guard)."""
        return UsageError(
            f"{self._describe()}: its nn.Embedding has max_norm={self._base.max_norm}, set after inject; it "
            "renormalizes the rows each call looks up, in place, which lorahot does not reproduce (inject refuses "
            "it). Set max_norm back to None, or eject and leave this embedding out of targets."
        )

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self._base.max_norm is not None:  # set after inject (see max_norm_refusal)
            raise self.max_norm_refusal()
        h = F.embedding(x, a.t())  # (..., R)
        delta = torch.matmul((h * scale).to(h.dtype), b)  # (..., dim)
        if self._scaled:  # the base scales its output: the delta of its table is scaled too
            factor = self._base.embed_scale
            delta = delta * (factor.to(delta.dtype) if isinstance(factor, torch.Tensor) else factor)
        return delta

    def routed_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Ids ``[L, T]`` (``x`` split into ``L`` groups) look up their own slot's ``A.T``, then
        each entry's B gathered, or, where that would copy a slot's B for every id or two
        (:func:`lorahot.layers.routing.gathers`: packed tokens) or where batched products
        miscompute (:func:`lorahot.layers.routing.batched_products`), one product with every
        slot's B (:func:`lorahot.layers.routing.every_slot_expand`)."""
        if self._base.max_norm is not None:  # set after inject (see max_norm_refusal)
            raise self.max_norm_refusal()
        length = index.shape[0]
        ids = x.reshape(length, -1)  # (L, T)
        h = a.transpose(1, 2)[index[:, None], ids]  # (L, T, R)
        if routing.gathers(length, ids.shape[1], b.shape[0]) and routing.batched_products(x):
            delta = torch.bmm((h * scales[:, None, :]).to(h.dtype), b[index])
        else:  # each id's row in its own slot's place among the slots' (L, T, S, R), zero elsewhere
            delta = routing.every_slot_expand(h[:, :, None, :].expand(-1, -1, b.shape[0], -1), b, scales, index)
        delta = delta.reshape(*x.shape, b.shape[-1])
        if self._scaled:
            factor = self._base.embed_scale
            delta = delta * (factor.to(delta.dtype) if isinstance(factor, torch.Tensor) else factor)
        return delta

    def row_dims(self, x: torch.Tensor) -> int:
        """Every dimension of the ids is a row dimension."""
        return 0

    def channel_dim(self) -> int:
        """Weight ``[num, dim]``: PEFT's DoRA norms each embedding dimension over the vocabulary."""
        return 1

    def merge_refusal(self) -> str | None:
        """None where the table takes ``A.T @ B.T`` (one with ``max_norm`` is refused at inject): a
        subclass that overrides ``forward`` must compute ``nn.Embedding.forward`` (times its
        ``embed_scale``) from the table as it is when it runs, checked on a few rows before and
        after a probe change written into the table (:func:`~lorahot.layers.probes.forward_mismatch`)."""
        base = self.base_layer
        if not isinstance(base, nn.Embedding) or not overrides_forward(base, nn.Embedding):
            return None
        mismatch = _scaled_mismatch(base, written=True)
        if mismatch is not None:
            return f"{type(base).__name__} overrides forward and does not compute from its table ({mismatch})"
        return None

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding weight ``[num, dim]``: ``A.T @ B.T``."""
        return a.t(), bt


def embedding_output_scale(base: nn.Embedding) -> bool:
    """Whether ``base`` scales its output by its ``embed_scale`` (checked on a few rows).

    False for a plain ``nn.Embedding`` forward (an ``embed_scale`` attribute it never uses is
    ignored); True for a class whose forward is ``nn.Embedding.forward`` times a scalar
    ``embed_scale`` (tensor or number).

    Raises:
        UsageError: the class overrides ``forward`` and that is not what it computes.
    """
    if not overrides_forward(base, nn.Embedding):
        return False
    kind = type(base).__name__
    if not hasattr(base, SCALE_ATTR):
        raise UsageError(
            f"{kind} overrides nn.Embedding.forward, and lorahot cannot tell what it does to the output (it "
            f"recognizes only a scalar `{SCALE_ATTR}` attribute the output is multiplied by, as in Gemma's scaled "
            "embeddings). Exclude this module from targets."
        )
    factor = getattr(base, SCALE_ATTR)
    is_number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
    if not (is_number or (isinstance(factor, torch.Tensor) and factor.numel() == 1 and factor.is_floating_point())):
        shown = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise UsageError(
            f"{kind}.{SCALE_ATTR} is {shown}; lorahot applies only a scalar float {SCALE_ATTR} to the LoRA delta. "
            "Exclude this module from targets."
        )
    if base.weight.is_meta or base.max_norm is not None:
        raise UsageError(
            f"{kind} overrides nn.Embedding.forward and its output cannot be checked "
            f"({'its weight is on the meta device' if base.weight.is_meta else 'max_norm renormalizes its table'}). "
            "Materialize the model first, or exclude this module from targets."
        )
    mismatch = _scaled_mismatch(base)
    if mismatch is not None:
        raise UsageError(
            f"{kind} overrides nn.Embedding.forward and has {SCALE_ATTR}, but its output is not "
            f"nn.Embedding.forward(ids) * {SCALE_ATTR}: {mismatch}. Exclude this module from targets."
        )
    return True


def _scaled_mismatch(base: nn.Embedding, written: bool = False) -> str | None:
    """How ``base``'s output on a few rows differs from ``nn.Embedding.forward(ids) *
    embed_scale`` (the scale 1 where it has none), or None; ``written``: also after a probe
    change written into its table in place (:func:`~lorahot.layers.probes.forward_mismatch`)."""
    factor = getattr(base, SCALE_ATTR, 1.0)
    num = int(base.weight.shape[0])
    rows = sorted({0, 1, 2, num - 1} & set(range(num)))
    probe = torch.tensor(rows, device=base.weight.device)

    def expected(ids: torch.Tensor) -> torch.Tensor:
        out = nn.Embedding.forward(base, ids)
        return out * (factor.to(out.dtype) if isinstance(factor, torch.Tensor) else factor)

    return forward_mismatch(base, probe, expected, [base.weight] if written else [])
