"""Probe forwards: calling a module on a probe input, and leaving it (and the process) as it was.

Inject and merged mode check that a module computes what lorahot's math assumes of it by calling
it on a probe input and comparing with the expected output (:func:`forward_mismatch`,
:func:`mismatch`), or read what its forward returns (:func:`probe_forward`); whatever such a call
changes in the module (an observer's buffers, a parametrization's power-iteration vectors, a
counter attribute) is put back afterwards (:func:`_kept_state`, :func:`kept_parametrizations`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["forward_mismatch", "mismatch", "probe_forward", "kept_parametrizations"]


def forward_mismatch(
    module: nn.Module,
    probe: torch.Tensor,
    expected: Callable[[torch.Tensor], torch.Tensor],
    written: Sequence[torch.Tensor] = (),
) -> str | None:
    """Runs ``module(probe)`` and ``expected(probe)``; describes how they differ, or None.

    They agree when the largest difference is within ``sqrt(eps)`` of the output's dtype times
    the largest expected value: rounding and summation order pass, any real transform fails.
    With ``written`` (the tensors merged mode rewrites in place: the weight, the bias) both run
    again after a probe change is written into those tensors in place, as merged mode writes,
    and must agree then too: a forward that computes from a copy of its weight made earlier (a
    transposed or converted cache, filled at construction or at its first call) agrees with the
    weight as it is, and would ignore every rewrite. The change is put back afterwards, bit for
    bit (:func:`_rewritten`). Runs under ``torch.no_grad()``. The module is left as it was: what
    a forward may change in it (an observer's or fake-quantizer's buffers, a parametrization's
    power-iteration vectors, a counter attribute) is put back afterwards (:func:`_kept_state`),
    whatever the outcome.
    """
    outcomes = []
    try:
        with torch.no_grad(), _kept_state(module):
            outcomes.append((module(probe), expected(probe), ""))
            if written:  # its first call's cache, if any, is kept for the second
                with _rewritten(written):
                    outcomes.append((module(probe), expected(probe), _REWRITTEN))
    except Exception as exc:  # the module's own forward: anything can happen
        return f"calling it on a probe input raised {type(exc).__name__}: {exc}"
    for got, want, when in outcomes:
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"on a probe input{when} it returned {shape}, expected a tensor of shape {tuple(want.shape)}"
        off = mismatch(got, want)
        if off is not None:
            diff, size = off
            return (
                f"on a probe input{when} its output differs from the expected one by up to {diff:.3g} (largest value "
                f"{size:.3g})"
            )
    return None


#: how :func:`forward_mismatch` names its second comparison
_REWRITTEN = (
    ", after a probe change was written into its weights in place as merged mode writes them (its forward computes "
    "from something else, such as a copy of the weight made earlier),"
)


@contextlib.contextmanager
def _rewritten(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Adds a probe change to the first slice of each of ``tensors`` along its first dimension
    (a weight's first output row or channel, an embedding's first row, a bias's first element:
    what a probe reads, and only that much copied), random values of about its largest
    magnitude, in place; puts every one back bit for bit on exit."""
    parts = [t.detach()[:1] if t.dim() else t.detach() for t in tensors]  # views: writes reach the tensors
    kept = [p.clone() for p in parts]
    gen = torch.Generator().manual_seed(1)
    inference = any(t.is_inference() for t in tensors)  # written only inside inference mode
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            for p in parts:
                size = float(p.abs().max()) if p.numel() else 0.0
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (size if size > 0 else 1.0)
                p.add_(noise.to(p.device, p.dtype))
        yield
    finally:
        with torch.inference_mode() if inference else torch.no_grad():
            for p, k in zip(parts, kept):
                p.copy_(k)


def mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float] | None:
    """``(largest difference, largest expected value)`` where ``got`` is not ``want`` within
    ``sqrt(eps)`` of ``want``'s dtype times its largest value (rounding and summation order pass,
    any real transform fails; NaN fails too); None where they agree."""
    diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    size = float(want.double().abs().max()) if want.numel() else 0.0
    eps = torch.finfo(want.dtype).eps if want.is_floating_point() else 0.0
    return None if diff <= math.sqrt(eps) * size else (diff, size)


def probe_forward(module: nn.Module, probe: torch.Tensor) -> Any:
    """``module.forward(probe)`` (its forward alone: the instance's own where it has one, no
    forward hooks), leaving the module and the process as they were: under ``torch.no_grad()``,
    with what a forward may change in the module put back (:func:`_kept_state`) and the CPU's
    random generator, and ``probe``'s CUDA device's, restored (a dropout in training mode draws
    from them). Whatever the forward raises passes through."""
    devices = []
    if probe.device.type == "cuda":
        devices = [probe.device.index if probe.device.index is not None else torch.cuda.current_device()]
    with torch.no_grad(), torch.random.fork_rng(devices=devices), _kept_state(module):
        return module.forward(probe)


@contextlib.contextmanager
def kept_parametrizations(models: Sequence[nn.Module]) -> Iterator[None]:
    """Restores, on exit, the state of every parametrization in ``models`` (see
    :func:`_kept_state`): in training mode each read of a parametrized weight runs its
    parametrization's forward, and spectral norm's advances its power-iteration vectors, so
    inject's reads of the weights it wraps (their shapes, dtypes, whether they are sharded)
    would change the model."""
    with contextlib.ExitStack() as stack:
        for model in models:
            for module in model.modules():
                if parametrize.is_parametrized(module):
                    stack.enter_context(_kept_state(module.parametrizations))  # type: ignore[arg-type]
        yield


@contextlib.contextmanager
def _kept_state(module: nn.Module) -> Iterator[None]:
    """Restores, on exit, what a probe forward may change in ``module`` and its submodules: each
    buffer (the tensor object and its values), each parameter (the object, the data it holds, as
    a forward that rebinds ``weight.data`` changes it: bitsandbytes' 4-bit layers repack their
    weight on a CPU at their first call in eval mode, and its Python attributes, such as the
    ``quant_state`` describing that data), and each other plain attribute of a module (the object,
    a list's, dict's or set's items, in place: hook dicts keep their identity, which their
    handles rely on). A plain object held by such an attribute (a state object its forward
    updates) gets its own attributes back too (:func:`_fields`). Parameters' values are not
    copied (a forward that writes its own weights in place is refused by its output, or not at
    all)."""
    modules = list(module.modules())
    buffers = [dict(m._buffers) for m in modules]
    values = [{k: b.detach().clone() for k, b in bufs.items() if b is not None} for bufs in buffers]
    params = [dict(m._parameters) for m in modules]
    datas = [{k: (p, p.detach(), _kept_attrs(p.__dict__, ())) for k, p in ps.items() if p is not None} for ps in params]
    skip = {"_parameters", "_buffers", "_modules"}
    attrs = [_kept_attrs(m.__dict__, skip) for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs, vals, ps, kept_params, kept in zip(modules, buffers, values, params, datas, attrs):
                if any(m._buffers.get(k) is not b for k, b in bufs.items()) or len(m._buffers) != len(bufs):
                    m._buffers.clear()
                    m._buffers.update(bufs)
                for k, v in vals.items():
                    b = bufs[k]
                    assert b is not None  # values hold only the buffers that were tensors
                    if b.dtype != v.dtype or b.device != v.device:  # converted in place (``buffer.data = ...``)
                        b.data = v
                    elif b.shape != v.shape:  # resized in place (an observer's first call): onto the saved copy
                        b.set_(v.untyped_storage(), v.storage_offset(), v.shape, v.stride())
                    else:  # an inference tensor is written only inside inference mode
                        with torch.inference_mode() if b.is_inference() else contextlib.nullcontext():
                            b.copy_(v)
                if any(m._parameters.get(k) is not p for k, p in ps.items()) or len(m._parameters) != len(ps):
                    m._parameters.clear()
                    m._parameters.update(ps)
                for p, data, p_attrs in kept_params.values():
                    if _rebound(p, data):
                        p.data = data
                    _put_attrs(p.__dict__, p_attrs, ())
                _put_attrs(m.__dict__, kept, skip)


#: what :func:`_kept_attrs` holds of one attribute: the object, its items (:func:`_items`) and
#: its own attributes (:func:`_fields`)
_Kept = dict[str, tuple[Any, "list[Any] | None", "dict[str, Any] | None"]]


def _kept_attrs(namespace: dict[str, Any], skip: Collection[str]) -> _Kept:
    """Each entry of an object's ``__dict__`` but those in ``skip``, with what
    :func:`_put_attrs` needs to put it back."""
    return {k: (v, _items(v), _fields(v)) for k, v in namespace.items() if k not in skip}


def _put_attrs(namespace: dict[str, Any], kept: _Kept, skip: Collection[str]) -> None:
    """Puts an object's ``__dict__`` back as :func:`_kept_attrs` found it: entries added since
    deleted, each object back in place, its items and its own attributes as they were."""
    for k in [k for k in namespace if k not in skip and k not in kept]:
        del namespace[k]
    for k, (obj, items, fields) in kept.items():
        if namespace.get(k) is not obj:
            namespace[k] = obj
        if items is not None and not _same_items(obj, items):
            _put_items(obj, items)
        own: dict[str, Any] = obj.__dict__ if fields is not None else {}
        if fields is not None and not _same_items(own, list(fields.items())):
            own.clear()
            own.update(fields)


def _fields(value: object) -> dict[str, Any] | None:
    """A plain object's own attributes (a copy of its ``__dict__``: bitsandbytes' ``QuantState``
    or ``MatmulLtState``, which a forward updates), to be put back; None for tensors, modules,
    classes, callables and objects without a ``__dict__`` (one level only: an object such an
    object holds is kept as an object, not looked into)."""
    if isinstance(value, (torch.Tensor, nn.Module, type)) or callable(value):
        return None
    try:
        namespace = vars(value)
    except TypeError:  # no __dict__ (a builtin, a slotted object)
        return None
    return dict(namespace) if isinstance(namespace, dict) else None


def _rebound(param: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether ``param`` no longer holds the tensor ``data`` (its ``detach()`` from before): its
    ``.data`` was rebound to another storage, dtype, shape or view. False where its storage cannot
    be read (a wrapper tensor subclass, torchao's: it is not rebound in place by a forward)."""
    if param.dtype != data.dtype or param.device != data.device or param.shape != data.shape:
        return True
    try:
        return (
            param.untyped_storage().data_ptr() != data.untyped_storage().data_ptr()
            or param.storage_offset() != data.storage_offset()
            or param.stride() != data.stride()
        )
    except (RuntimeError, NotImplementedError):
        return False


def _items(value: object) -> list[Any] | None:
    """A list's or set's items, a dict's ``(key, value)`` pairs (held, to be put back); None for
    anything else."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, set)):
        return list(value)
    return None


def _same_items(obj: Any, items: list[Any]) -> bool:
    """Whether ``obj`` still holds exactly ``items`` (:func:`_items`), compared by identity."""
    now = _items(obj)
    if now is None or len(now) != len(items):
        return False
    if isinstance(obj, dict):
        return all(k1 == k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(now, items))
    if isinstance(obj, set):
        return {id(v) for v in now} == {id(v) for v in items}
    return all(a is b for a, b in zip(now, items))


def _put_items(obj: Any, items: list[Any]) -> None:
    """Puts ``items`` (:func:`_items`) back into ``obj``, in place."""
    obj.clear()
    if isinstance(obj, dict):
        obj.update(items)
    elif isinstance(obj, list):
        obj.extend(items)
    else:
        obj.update(items)
