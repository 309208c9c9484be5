"""Generated bad calls: every parameter of every public entry point gets hostile values.

``tests/system/test_misuse.py`` pins hand-written bad calls; here hypothesis draws the values:
wrong types (str, bytes, bytearray, float, bool, None, complex, Decimal, Fraction, NumPy
scalars and arrays of every dtype, 0-d, 1-d and 2-d tensors, meta tensors, tensors requiring
grad, nested lists, dicts, sets, generators, objects whose ``__index__``, ``__float__``,
``__len__``, ``__iter__``, ``__bool__``, ``__hash__`` or ``__eq__`` raises), very large ints,
negative zero, NaN, infinities, subnormals, ``True`` where an int is meant, and well-typed values
out of range. Each call runs on the reliability rig (two slots, a valid adapter in each, slot 0
active, one adapter preloaded under the key ``"prepared"``), under a time bound, and must:

- either succeed, with a value the parameter documents (``accepts``) and the documented effect
  (``meaning``: the slot it names, the scale it gives, the routing it sets, ...);
- or raise a :class:`lorahot.LoraError` other than :class:`lorahot.UnexpectedError` (whose
  existence means a check is missing), with every arena buffer, the bookkeeping, the cache
  keys and the output bitwise as before.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

import lorahot
from tests.reliability_helpers import Q0, Rig, assert_unchanged, build_rig, snapshot, within, write_valid
from tests.system.test_misuse import _BadInt, _hand_built, _hand_fields, _Hostile, _RaisingInt, _RaisingRows, _t

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: seconds one call may take: a hang fails the example instead of stalling the suite
BOUND_S = 10.0


# -- hostile values ----------------------------------------------------------------------------


class _RaisingLen(list):
    """A list whose ``len`` raises."""

    def __len__(self) -> int:
        raise RuntimeError("no len")


class _RaisingStr(str):
    """A str whose hash and comparisons raise: lorahot must not hash or compare it as given."""

    def _broken(self, *args: object) -> Any:
        raise RuntimeError("the caller's str broke")

    __hash__ = __eq__ = __ne__ = _broken  # type: ignore[assignment]


class _RaisingFloat(float):
    """A float whose conversion to float raises."""

    def __float__(self) -> float:
        raise RuntimeError("no float")


class _RaisingBool:
    def __bool__(self) -> bool:
        raise RuntimeError("no truth")


class _IndexOnly:
    """An object with ``__index__`` that is no ``numbers.Integral``."""

    def __index__(self) -> int:
        return 1


def _generator() -> Any:
    yield 0
    yield 1


_TORCH_DTYPES = {np.dtype(d) for d in ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32")}
_TORCH_DTYPES |= {np.dtype(d) for d in ("float64", "complex64", "complex128")}


def _tensor(a: np.ndarray, how: str) -> Any:
    """A tensor of ``a``'s values (where torch has its dtype), on meta or requiring grad."""
    if a.dtype not in _TORCH_DTYPES:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))
    if how == "meta":
        return t.to("meta")
    if how == "grad" and t.is_floating_point():
        return t.clone().requires_grad_(True)
    return t


_arrays = npst.arrays(npst.scalar_dtypes(), npst.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))

_scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, -1, -2, 2**31, 2**63, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([-0.0, 5e-324, 2.2250738585072014e-308, 1e308, 3.5e38, 6.6e4, 0.1]),
    st.booleans(),
    st.none(),
    st.complex_numbers(max_magnitude=1e10),
    st.decimals(allow_nan=True, allow_infinity=True, places=3),
    st.fractions(max_denominator=7),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
    npst.arrays(npst.scalar_dtypes(), shape=()).map(lambda a: a[()]),  # NumPy scalars of every dtype
)

_objects = st.sampled_from(
    [
        lambda: _Hostile(),
        lambda: _RaisingInt(1),
        lambda: _BadInt(1),
        lambda: _RaisingRows([0, 1]),
        lambda: _RaisingLen([0, 1]),
        lambda: _RaisingFloat(1.0),
        lambda: _RaisingBool(),
        lambda: _IndexOnly(),
        lambda: _generator(),
        lambda: iter([0, 1]),
        lambda: range(2),
        lambda: range(10**20),
        lambda: memoryview(b"\x01\x00"),
        lambda: object(),
        lambda: Ellipsis,
        lambda: torch.float32,
        lambda: torch.device("meta"),
        lambda: Path("/nonexistent/adapter"),
        lambda: {"a": 1},
        lambda: {1, 2},
        lambda: frozenset(),
        lambda: slice(0, 1),
        lambda: lambda *a: True,
    ]
).map(lambda make: make())


def hostile() -> st.SearchStrategy[Any]:
    """Any of the values above, alone, as a tensor, or nested in lists, tuples and dicts."""
    leaves = st.one_of(
        _scalars,
        _objects,
        _arrays,
        st.tuples(_arrays, st.sampled_from(["cpu", "meta", "grad"])).map(lambda p: _tensor(*p)),
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=3), inner)
        ),
        max_leaves=4,
    )


# -- what a parameter accepts and what success must mean -----------------------------------------


def _integer(v: object) -> bool:
    """An integer lorahot can read (its conversion does not raise)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        return False
    try:
        int(v)
    except Exception:
        return False
    return True


def _slot(v: object, slots: int = 2) -> bool:
    return _integer(v) and 0 <= int(v) < slots  # type: ignore[call-overload]


def _real(v: object) -> bool:
    """A finite real number (a float of a subclass by the float it holds, whatever its ``__float__``)."""
    if isinstance(v, float):
        return math.isfinite(float.__float__(v))
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(float(v))


def _weights(v: object, n: int) -> tuple[float, ...] | None:
    """The weights a valid ``scale`` gives ``n`` parts, or None where ``v`` is no valid scale."""
    if _real(v):
        return (_float(v),) * n
    if isinstance(v, (list, tuple)) and len(v) == n and all(_real(w) for w in v):
        return tuple(_float(w) for w in v)
    return None


def _float(v: Any) -> float:
    return float.__float__(v) if isinstance(v, float) else float(v)


@dataclass(frozen=True)
class Param:
    """One parameter of one entry point: ``call(rig, value)`` makes the call with every other
    argument valid; ``meaning(rig, value, result)`` asserts what a call that succeeded must
    mean (it raises AssertionError where the value should have been refused)."""

    id: str
    call: Callable[[Rig, Any], Any]
    meaning: Callable[[Rig, Any, Any], None]
    changes: bool = True  # False: a success must change nothing either


def _only_if(accepts: Callable[[Any], bool]) -> Callable[[Rig, Any, Any], None]:
    def meaning(rig: Rig, v: Any, result: Any) -> None:
        assert accepts(v), "accepted a value it documents no meaning for"

    return meaning


def _own_denoiser(v: Any) -> bool:
    """A runtime over one model takes no ``denoiser=`` but None, or a list of one None (its one
    part's own routing)."""
    return v is None or (isinstance(v, (list, tuple)) and len(v) == 1 and v[0] is None)


def _slot_meaning(effect: Callable[[Rig, int, Any], None]) -> Callable[[Rig, Any, Any], None]:
    def meaning(rig: Rig, v: Any, result: Any) -> None:
        assert _slot(v) or v is None, "accepted a slot that is no int in 0..1"
        effect(rig, 0 if v is None else int(v), result)

    return meaning


def _scale_meaning(slot: int, parts: int) -> Callable[[Rig, Any, Any], None]:
    def meaning(rig: Rig, v: Any, result: Any) -> None:
        weights = _weights(v, parts)
        assert weights is not None, "accepted a scale that is no finite real number (or list of them)"
        info = rig.runtime.info(slot)
        assert info is not None and tuple(p.scale for p in info.parts) == weights, "the scale was taken as another"

    return meaning


def _routing_meaning(rig: Rig, v: Any, result: Any) -> None:
    entries = list(v)
    assert all(_integer(e) and -1 <= int(e) < 2 for e in entries), "accepted a routing entry that is no slot"
    assert rig.runtime.routing == tuple(int(e) for e in entries)


def _routing_array_meaning(rig: Rig, v: Any, result: Any) -> None:
    if isinstance(v, (np.ndarray, torch.Tensor)):
        assert v.ndim == 1 and v.dtype not in (np.bool_, torch.bool), "accepted a routing array that is no 1-D ints"
        assert rig.runtime.routing == tuple(int(e) for e in v.tolist())
    elif _integer(v):
        assert _slot(v) and rig.runtime.active_slot == int(v) and rig.runtime.routing is None
    else:
        assert isinstance(v, Sequence) and not isinstance(v, (str, bytes, bytearray, memoryview)), "not a routing"
        _routing_meaning(rig, v, result)


def _lengths_meaning(rig: Rig, v: Any, result: Any) -> None:
    values = v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else list(v)
    assert len(values) == 2 and all(_integer(n) or isinstance(n, int) for n in values), "lengths taken as another"
    assert all(not isinstance(n, bool) and n >= 0 for n in values)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _option(kinds: tuple[type, ...]) -> Callable[[Any], bool]:
    return lambda v: v is None or (isinstance(v, kinds) and not (bool not in kinds and isinstance(v, bool)))


def _int_at_least(least: int, top: float) -> Callable[[Any], bool]:
    return lambda v: _integer(v) and least <= int(v) <= top


def _fresh() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4))


def _inject_param(name: str, accepts: Callable[[Any], bool], attr: Callable[[Any], Any] | None = None) -> Param:
    def meaning(rig: Rig, v: Any, runtime: Any) -> None:
        assert accepts(v), f"inject accepted {name}={v!r}"
        if attr is not None:
            assert attr(runtime) == (int(v) if _integer(v) else v)

    return Param(f"inject.{name}", lambda rig, v: lorahot.inject(_fresh(), ["0"], **{"max_rank": 2, name: v}), meaning)


_OPTION_KINDS: dict[str, tuple[type, ...]] = {
    "revision": (str,),
    "subfolder": (str,),
    "token": (str, bool),
    "weight_name": (str,),
    "config": (Mapping,),
    "prefix": (str,),
    "key_map": (Mapping,),
    "fuse": (Mapping,),
    "split": (Mapping,),
    "strict": (bool,),
}


def _loaded_meaning(rig: Rig, slot: int, info: Any) -> None:
    assert rig.runtime.info(slot) == info and info.source.endswith("adapter_model.safetensors")


def _active(rig: Rig, slot: int, result: Any) -> None:
    assert rig.runtime.active_slot == slot and rig.runtime.routing is None


def _emptied(rig: Rig, slot: int, result: Any) -> None:
    assert rig.runtime.info(slot) is None


def _rescaled(rig: Rig, slot: int, result: Any) -> None:
    info = rig.runtime.info(slot)
    assert info is not None and all(p.scale == 0.5 for p in info.parts)


def _described(rig: Rig, slot: int, result: Any) -> None:
    assert result == rig.runtime.info(slot)


def _module_field(name: str, accepts: Callable[[Any], bool]) -> Param:
    return Param(
        f"LoraModule.{name}", lambda rig, v: rig.runtime.load(_hand_built(rig, **{name: v})), _only_if(accepts)
    )


def _adapter_field(name: str, accepts: Callable[[Any], bool]) -> Param:
    return Param(f"Adapter.{name}", lambda rig, v: rig.runtime.load(_hand_fields(rig, **{name: v})), _only_if(accepts))


def _tensor_like(v: object) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim >= 1


PARAMS = [
    # -- inject / eject ----------------------------------------------------------------------------
    Param("inject.model", lambda rig, v: lorahot.inject(v, ["0"], max_rank=2), _only_if(lambda v: False)),
    Param(
        "inject.targets",
        lambda rig, v: lorahot.inject(_fresh(), v, max_rank=2),
        _only_if(lambda v: isinstance(v, (str, list, tuple))),
    ),
    _inject_param("max_rank", _int_at_least(1, 65536), lambda rt: rt.max_rank),
    _inject_param("slots", _int_at_least(1, 4096), lambda rt: rt.slots),
    _inject_param("dtype", lambda v: v is None or v in (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    _inject_param("cache_bytes", _int_at_least(0, math.inf), lambda rt: rt.cache.budget_bytes),
    *(_inject_param(flag, lambda v: isinstance(v, bool)) for flag in ("merged", "fused", "extras", "regional")),
    Param("eject.model", lambda rig, v: lorahot.eject(v), _only_if(lambda v: False)),
    # -- read_adapter / plan_targets ---------------------------------------------------------------
    Param("read_adapter.source", lambda rig, v: lorahot.read_adapter(v), _only_if(lambda v: False), changes=False),
    *(
        Param(
            f"read_adapter.{name}",
            lambda rig, v, name=name: lorahot.read_adapter(rig.source, **{name: v}),
            _only_if(_option(kinds)),
            changes=False,
        )
        for name, kinds in _OPTION_KINDS.items()
    ),
    Param(
        "read_adapter.device",
        lambda rig, v: lorahot.read_adapter(rig.source, device=v),
        _only_if(lambda v: v is None or isinstance(v, (str, torch.device))),
        changes=False,
    ),
    Param("plan_targets.sources", lambda rig, v: lorahot.plan_targets(v), _only_if(lambda v: True), changes=False),
    Param(
        "plan_targets.model",
        lambda rig, v: lorahot.plan_targets(rig.source, v),
        _only_if(lambda v: v is None),
        changes=False,
    ),
    Param(
        "plan_targets.stacked",
        lambda rig, v: lorahot.plan_targets(rig.source, stacked=v),
        _only_if(lambda v: isinstance(v, bool)),
        changes=False,
    ),
    Param(
        "plan_targets.denoiser",
        lambda rig, v: lorahot.plan_targets(rig.source, denoiser=v),
        _only_if(lambda v: v is None),  # no model: nothing to route
        changes=False,
    ),
    # -- load / preload / prefetch -----------------------------------------------------------------
    Param("load.source", lambda rig, v: rig.runtime.load(v), _only_if(lambda v: isinstance(v, (Mapping, str)))),
    Param("load.slot", lambda rig, v: rig.runtime.load(rig.source, slot=v), _slot_meaning(_loaded_meaning)),
    Param("load.scale", lambda rig, v: rig.runtime.load(rig.source, scale=v), _scale_meaning(0, 1)),
    Param(
        "load.stack_scale", lambda rig, v: rig.runtime.load([rig.source, "prepared"], scale=v), _scale_meaning(0, 2)
    ),
    Param(
        "load.stack_weight",
        lambda rig, v: rig.runtime.load([rig.source, "prepared"], scale=[v, 0.5]),
        lambda rig, v, r: _scale_meaning(0, 2)(rig, [v, 0.5], r),
    ),
    Param("load.stack_part", lambda rig, v: rig.runtime.load([rig.source, v]), _only_if(lambda v: True)),
    *(
        Param(
            f"load.{name}",
            lambda rig, v, name=name: rig.runtime.load(rig.source, **{name: v}),
            _only_if(_option(kinds)),
        )
        for name, kinds in _OPTION_KINDS.items()
    ),
    Param("load.unknown_option", lambda rig, v: rig.runtime.load(rig.source, rank=v), _only_if(lambda v: False)),
    Param("preload.source", lambda rig, v: rig.runtime.preload(v), _only_if(lambda v: isinstance(v, Mapping))),
    Param(
        "preload.key",
        lambda rig, v: rig.runtime.preload(rig.source, key=v),
        _only_if(lambda v: v is None or (isinstance(v, str) and len(v) > 0)),
    ),
    Param(
        "prefetch.key",
        lambda rig, v: rig.runtime.prefetch(rig.source, key=v).result(timeout=BOUND_S),
        _only_if(lambda v: v is None or (isinstance(v, str) and len(v) > 0)),
    ),
    *(
        Param(f"{entry}.denoiser", call, _only_if(_own_denoiser))
        for entry, call in (
            ("load", lambda rig, v: rig.runtime.load(rig.source, denoiser=v)),
            ("preload", lambda rig, v: rig.runtime.preload(rig.source, denoiser=v)),
            ("prefetch", lambda rig, v: rig.runtime.prefetch(rig.source, denoiser=v).result(timeout=BOUND_S)),
        )
    ),
    # -- activate / unload / set_scale / info ------------------------------------------------------
    Param("activate.slot", lambda rig, v: rig.runtime.activate(v), _routing_array_meaning),
    Param(
        "activate.routing_entry",
        lambda rig, v: rig.runtime.activate([0, v]),
        lambda rig, v, r: _routing_meaning(rig, [0, v], r),
    ),
    Param(
        "activate.lengths",
        lambda rig, v: rig.runtime.activate([0, 1], lengths=v),
        lambda rig, v, r: None if v is None else _lengths_meaning(rig, v, r),
    ),
    Param(
        "activate.lengths_entry",
        lambda rig, v: rig.runtime.activate([0, 1], lengths=[3, v]),
        lambda rig, v, r: _lengths_meaning(rig, [3, v], r),
    ),
    Param("unload.slot", lambda rig, v: rig.runtime.unload(v), _slot_meaning(_emptied)),
    Param("set_scale.value", lambda rig, v: rig.runtime.set_scale(v), _scale_meaning(0, 1)),
    Param("set_scale.stack_value", lambda rig, v: rig.runtime.set_scale(v, slot=1), _scale_meaning(1, 2)),
    Param(
        "set_scale.stack_weight",
        lambda rig, v: rig.runtime.set_scale([0.5, v], slot=1),
        lambda rig, v, r: _scale_meaning(1, 2)(rig, [0.5, v], r),
    ),
    Param("set_scale.slot", lambda rig, v: rig.runtime.set_scale(0.5, slot=v), _slot_meaning(_rescaled)),
    Param("info.slot", lambda rig, v: rig.runtime.info(v), _slot_meaning(_described), changes=False),
    # -- the host cache ----------------------------------------------------------------------------
    *(
        Param(
            f"cache.{method}",
            lambda rig, v, method=method: getattr(rig.runtime.cache, method)(v),
            _only_if(_is_str),
            changes=method not in ("get", "peek", "is_name"),
        )
        for method in ("get", "peek", "discard", "name", "unname", "is_name")
    ),
    Param(
        "cache.touch",
        lambda rig, v: rig.runtime.cache.touch(v),
        _only_if(lambda v: isinstance(v, (list, tuple)) and not v),
        changes=False,
    ),
    Param("cache.put", lambda rig, v: rig.runtime.cache.put(v), _only_if(lambda v: False)),
    Param(
        "cache.budget_bytes",
        lambda rig, v: setattr(rig.runtime.cache, "budget_bytes", v),
        _only_if(_int_at_least(0, math.inf)),
    ),
    Param(
        "AdapterCache.budget_bytes",
        lambda rig, v: lorahot.AdapterCache(v),
        _only_if(_int_at_least(0, math.inf)),
        changes=False,
    ),
    # -- hand-built adapters -------------------------------------------------------------------------
    _module_field("A", _tensor_like),
    _module_field("B", _tensor_like),
    _module_field("alpha", _real),
    _module_field("use_rslora", lambda v: isinstance(v, bool)),
    _module_field("unit_scale", lambda v: isinstance(v, bool)),
    _module_field("base_weight", lambda v: v is None or _tensor_like(v)),
    _module_field("magnitude", lambda v: v is None or _tensor_like(v)),
    _module_field("bias", lambda v: v is None or _tensor_like(v)),
    _adapter_field("modules", lambda v: isinstance(v, dict)),
    _adapter_field("format", _is_str),
    _adapter_field("source", _is_str),
    _adapter_field("config", lambda v: isinstance(v, dict)),
    _adapter_field("skipped", lambda v: isinstance(v, (list, tuple))),
    _adapter_field("weights", lambda v: isinstance(v, dict)),
]  # fmt: skip


# -- the check -----------------------------------------------------------------------------------


class _Bench:
    """The rig, rebuilt only after a call that succeeded (and so may have changed it)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rig: Rig | None = None

    def get(self) -> Rig:
        if self.rig is None:
            rig = build_rig(self.tmp / "rig")
            source = write_valid(self.tmp / "cached", rig.model, {Q0: 2}, seed=7)
            rig.runtime.preload(str(source), key="prepared")
            rig.runtime.load([_t(rig), "prepared"], slot=1, scale=[1.0, 1.0])
            rig.source = str(source)  # type: ignore[attr-defined]
            self.rig = rig
        return self.rig


def check_call(bench: _Bench, param: Param, value: Any) -> None:
    rig = bench.get()
    before = snapshot(rig)
    try:
        result = within(BOUND_S, lambda: param.call(rig, value))
    except lorahot.UnexpectedError as exc:
        raise AssertionError(f"{param.id}: an UnexpectedError, a missing check: {exc.__cause__!r}") from exc
    except lorahot.LoraError:
        assert_unchanged(rig, before)
        return
    except Exception as exc:
        raise AssertionError(f"{param.id}: {type(exc).__name__} escaped: {exc}") from exc
    if param.changes:
        bench.rig = None  # a success may change the rig: the next example starts afresh
        param.meaning(rig, value, result)
    else:
        param.meaning(rig, value, result)
        assert_unchanged(rig, before)


#: values every parameter gets besides what hypothesis draws (each kind the fuzz found an escape with)
_ALWAYS: list[Callable[[], Any]] = [
    lambda: True,
    lambda: np.bool_(True),
    lambda: 1.0,
    lambda: -0.0,
    lambda: float("nan"),
    lambda: 10**400,
    lambda: np.float16(0.1),
    lambda: np.int64(1),
    lambda: bytearray(b"\x02"),
    lambda: memoryview(b"\x02"),
    lambda: range(10**20),
    lambda: _RaisingLen([0, 1]),
    lambda: _RaisingStr("prepared"),
    lambda: _RaisingFloat(1.0),
    lambda: _RaisingInt(1),
    lambda: _RaisingBool(),
    lambda: _Hostile(),
    lambda: np.array([0, 1]),
    lambda: torch.tensor(1.0, device="meta"),
    lambda: torch.tensor(2.0),
    lambda: [[0.5]],
]


@pytest.mark.parametrize("param", PARAMS, ids=[p.id for p in PARAMS])
def test_a_hostile_argument_is_refused_with_nothing_changed_or_means_what_it_says(param: Param, tmp_path: Path) -> None:
    bench = _Bench(tmp_path)
    for make in _ALWAYS:
        check_call(bench, param, make())

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(value=hostile())
    def run(value: Any) -> None:
        check_call(bench, param, value)

    run()


def test_every_public_entry_point_has_parameters_here() -> None:
    """A new public method or parameter must be added to :data:`PARAMS` (or to the reasons it
    is left out)."""
    ids = {p.id.split(".")[0] for p in PARAMS}
    assert ids >= {"inject", "eject", "read_adapter", "plan_targets", "load", "preload", "prefetch", "activate"}
    assert ids >= {"unload", "set_scale", "info", "cache", "AdapterCache", "LoraModule", "Adapter"}
    cache_methods = {n for n in vars(lorahot.AdapterCache) if not n.startswith("_")}
    # keys, clear and nbytes take no argument; nbytes_locked is the lock holder's
    assert cache_methods - {p.id.split(".")[1] for p in PARAMS if p.id.startswith("cache.")} == {
        "keys",
        "clear",
        "nbytes",
        "nbytes_locked",
    }
    fields = {f.name for f in dataclasses.fields(lorahot.LoraModule)} - {"key", "source_keys"}
    assert fields == {p.id.split(".")[1] for p in PARAMS if p.id.startswith("LoraModule.")}
