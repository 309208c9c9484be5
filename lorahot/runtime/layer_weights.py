"""A weight per component and per UNet block: diffusers' ``set_adapters`` dict weights.

``runtime.set_scale({"unet": 0.8, "text_encoder": 0.0})`` on a runtime over a pipeline gives
each component's layers their own weight, as diffusers'
``pipe.set_adapters(names, adapter_weights=[{...}])`` does; a component the dict leaves out gets
1, as diffusers gives it. A UNet's weight may itself be a dict of blocks (InstantStyle, B-LoRA),
``{"down": 0.0, "mid": 1.0, "up": {"block_0": 0.0, "block_1": [0.0, 1.0, 0.0]}}``, read as
diffusers 0.42.1 reads it (``_maybe_expand_lora_scales`` then PEFT's ``get_module_weight``):

- ``down``/``up``: a number (every block with attentions), a list (every such block, one
  weight per attention), or a dict ``block_<i>`` -> a number or a list of one weight per
  attention of that block (a list of one: every attention); ``mid``: a number (or a list of
  one). What is left out is 1.
- Each expanded entry names ``<down|up>_blocks.<i>.attentions.<j>`` (``mid``:
  ``mid_block.attentions.0``); a layer takes the weight of the first entry whose name is in
  its module path, else, as diffusers' fallback does, the entry
  ``<path[0]>.<path[1]>.attentions.<path[3]>``, else 1: a block's resnets, downsamplers and
  upsamplers take the weight of the attention of their own index, the mid block's resnets 1.

Where diffusers fails or ignores what it was given, lorahot refuses (UsageError, nothing
changed): a key that is no component; a block dict on a component that is not a UNet (diffusers
matches its keys as substrings of the module names there); a key of a block dict other than
``down``/``mid``/``up``, a block that does not exist or has no attentions (diffusers ignores
it), a list of the wrong length, a value that is no finite number; a block dict for a UNet with
no mid-block attention (diffusers fails on every block dict there); a block dict for a part of a
stack any of whose parts has modules on a UNet layer whose path has fewer than four parts that
no entry names (``conv_in``, ``time_embedding.linear_1``: PEFT's ``get_module_weight`` looks every
adapter's weight up on every LoRA layer of the UNet, those of the other adapters too, and fails
there with an IndexError); one dict for a stack of
several parts (diffusers' pipeline ``set_adapters`` pops each component from that shared dict
for the first adapter, so every other adapter gets 1 there): pass a list, one per part.

Each part's weight resolves to :class:`LayerWeights`: its weight on every injected layer, per
arena a float64 vector, which each row's scale multiplies (:meth:`lorahot.runtime.stack.Stack.scales`).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from lorahot.errors import UsageError, shown
from lorahot.resolve.file_names import file_name, wrapper_level, wrapper_levels
from lorahot.runtime.arguments import _per_part, entries, is_sequence, multiplier

__all__ = [
    "LayerWeights",
    "Weight",
    "Resolver",
    "given_weight",
    "given_weights",
    "given_of",
    "peak",
    "weight_in",
    "vector",
    "table",
    "per_layer",
    "displayed",
]

#: the UNet classes whose block dicts diffusers expands (its ``_SET_ADAPTER_SCALE_FN_MAPPING``)
UNETS = ("UNet2DConditionModel", "UNetMotionModel")
_BLOCK_KEYS = ("down", "mid", "up")
#: entries one weight may hold in all (its dicts' items and lists' numbers): far above any UNet's
_MOST = 1 << 16
#: how deep a weight's containers may nest: a component's dict, a UNet's blocks, ``down``/``up``, a block's list
_DEPTH = 4


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One part's weight on every injected layer.

    Attributes:
        given: the weight as given, read back as plain data (numbers as floats, tuples as
            lists): what :attr:`lorahot.PartInfo.scale` reports.
        vectors: per arena, float64 ``[n_layers]``: each layer's weight.
    """

    given: dict[str, object]
    vectors: tuple[np.ndarray, ...]

    @property
    def peak(self) -> float:
        """The largest ``|weight|`` of any layer."""
        return max((float(np.abs(v).max(initial=0.0)) for v in self.vectors), default=0.0)

    def __format__(self, spec: str) -> str:  # messages format weights with :g
        return repr(self.given)


#: one part's weight: a number for every layer, or one per layer
Weight = float | LayerWeights


def per_layer(weights: Sequence[Weight]) -> bool:
    """Whether some part has a weight per layer."""
    return any(isinstance(w, LayerWeights) for w in weights)


def peak(w: Weight) -> float:
    """The largest ``|weight|`` of ``w`` on any layer."""
    return w.peak if isinstance(w, LayerWeights) else abs(w)


def weight_in(w: Weight, a: int, i: int) -> float:
    """``w`` on layer ``i`` of arena ``a``."""
    return float(w.vectors[a][i]) if isinstance(w, LayerWeights) else w


def vector(w: Weight, a: int, n: int) -> np.ndarray:
    """``w`` on every layer of arena ``a`` (``n`` layers), float64 ``[n]``."""
    return w.vectors[a] if isinstance(w, LayerWeights) else np.full(n, w, dtype=np.float64)


def table(weights: Sequence[Weight], a: int, n: int) -> np.ndarray:
    """Every part's weight on every layer of arena ``a`` (``n`` layers), float64 ``[parts, n]``."""
    return np.stack([vector(w, a, n) for w in weights])


def displayed(w: Weight) -> float | dict[str, object]:
    """What ``info()`` reports for ``w``: the number, or a copy of the dict as given (the
    caller may edit what ``info()`` returns; the runtime's own stays as it was set)."""
    return copy.deepcopy(w.given) if isinstance(w, LayerWeights) else w


def given_weight(value: object, name: str = "scale") -> float | dict[str, object]:
    """A weight as given (a finite number, or a dict: component -> number, None or block dict;
    or a block dict), read once into plain data; checked against the runtime by :class:`Resolver`.

    The caller's mappings and lists are read once each, bounded: at most :data:`_MOST` entries
    in all and containers at most :data:`_DEPTH` deep (a weight nests four: component, block
    dict, ``down``/``up``, ``block_i``), so a self-containing dict, a lazy endless ``items`` or
    ``__iter__``, or one that raises is refused, never recursed or iterated without end.

    Raises:
        UsageError: a key that is no str, a value that is no finite number (None only as a
            component's), a list where a number goes; a mapping or list that cannot be read,
            holds too many entries or nests too deep.
    """
    if not isinstance(value, Mapping):
        return multiplier(value, name)
    return _read_dict(value, name, [_MOST], 0)


def _read_dict(value: Mapping[object, object], name: str, budget: list[int], depth: int) -> dict[str, object]:
    """``value``'s items read once (at most ``budget[0]`` of them, taken from it) as plain data."""
    try:
        items = list(itertools.islice(iter(value.items()), budget[0] + 1))
    except Exception as exc:
        raise UsageError(f"{name}: reading the dict failed ({type(exc).__name__}: {exc}); pass a plain dict.") from None
    if len(items) > budget[0]:
        raise UsageError(
            f"{name}: the weight holds more than {_MOST} entries in all; a dict weight names components and UNet "
            "blocks. Pass a plain dict."
        )
    budget[0] -= len(items)
    out: dict[str, object] = {}
    for item in items:
        try:
            k, v = item
        except Exception:
            raise UsageError(
                f"{name}: its items() yields {shown(item, 80)}, not a (key, value) pair; pass a plain dict."
            ) from None
        if type(k) is not str and not isinstance(k, str):
            raise UsageError(f"{name} has the key {shown(k, 80)}, not a str; keys name components or UNet blocks.")
        key = str.__str__(k)
        out[key] = _plain_entry(v, f"{name}[{key!r}]", budget, depth + 1)
    return out


def given_of(value: object) -> float | dict[str, object] | tuple[float | dict[str, object], ...]:
    """``value`` read once, as :func:`given_weights` reads it for any number of parts (see
    :func:`lorahot.runtime.arguments.numbers_of`): a weight, or a tuple of one per entry."""
    if isinstance(value, Mapping) or not is_sequence(value):
        return given_weight(value)
    assert isinstance(value, Sequence)  # for mypy: checked just above
    items = entries(value, "scale", "a list of floats, one weight per part")
    return tuple(given_weight(v, f"scale[{i}]") for i, v in enumerate(items))


def given_weights(value: object, n: int, holder: str) -> tuple[float | dict[str, object], ...]:
    """One weight per part (a finite number, or a dict: see the module docstring), as
    :func:`lorahot.runtime.arguments.weights_of` reads numbers; one dict for several parts is
    refused (see the module docstring).

    Raises:
        UsageError: as ``weights_of``, and for one dict given for several parts.
    """
    if isinstance(value, Mapping) and n > 1:
        raise UsageError(
            f"scale is one dict, but {holder} {n} parts. diffusers' pipeline set_adapters, given one dict for several "
            "adapters, gives its components' weights to the first adapter only (it pops them from the one shared "
            "dict) and 1 to every other; lorahot does not guess. Pass a list of one weight (a number or a dict) per "
            "part, e.g. [{'unet': 0.5}, {'unet': 0.5}]."
        )
    return _per_part(
        value,
        n,
        "scale",
        given_weight,
        "a list of floats, one weight per part",
        ("weight", "weights"),
        holder,
        "pass one weight per part (in the order loaded), or one number for all.",
    )


def _plain_entry(v: object, name: str, budget: list[int], depth: int) -> object:
    if v is None:
        return None
    if isinstance(v, (Mapping, list, tuple)) and depth >= _DEPTH:
        raise UsageError(
            f"{name} is a {type(v).__name__} inside {depth} levels of dicts and lists; a weight nests at most "
            f"{_DEPTH} levels (component -> UNet blocks -> 'down'/'up' -> 'block_i': a list of numbers). Pass a "
            "number there."
        )
    if isinstance(v, Mapping):
        return _read_dict(v, name, budget, depth)
    if isinstance(v, (list, tuple)):
        values = entries(v, name, "a list of numbers, one weight per attention", most=budget[0])
        budget[0] -= len(values)
        return [_plain_entry(x, f"{name}[{j}]", budget, depth + 1) for j, x in enumerate(values)]
    return multiplier(v, name)


class Resolver:
    """Turns a weight given as a dict into :class:`LayerWeights` for one runtime (see the module
    docstring). ``names``: per arena, each layer's injected name; ``components``: the runtime's
    component names (empty over one model); ``modules``: component name (``""`` over one model)
    -> its module."""

    def __init__(self, names: list[list[str]], components: tuple[str, ...], modules: Mapping[str, nn.Module]) -> None:
        self.names = names
        self.components = components
        self.modules = modules

    def resolve(self, given: dict[str, object], loaded: Sequence[str], part: str) -> LayerWeights:
        """``given`` as every layer's weight; ``loaded``: the layers any part of the stack has
        modules on, where diffusers' ``set_adapters`` looks this part's weight up (checked against
        its failures). ``part`` names it in messages.

        Raises:
            UsageError: naming the key, what it may be, and the fix. Nothing changed.
        """
        if not self.components:
            fn = self._unet_weights("", given, part, set(loaded))
            vectors = tuple(np.array([fn(n) for n in arena], dtype=np.float64) for arena in self.names)
            return LayerWeights(given, vectors)
        unknown = [k for k in given if k not in self.components]
        if unknown:
            raise UsageError(
                f"{part}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} no component of the "
                f"runtime ({', '.join(self.components)}); a dict weight maps components to their weights (a UNet's "
                "may be a dict of blocks: 'down', 'mid', 'up'). Name the runtime's components."
            )
        per: dict[str, object] = {}
        for c, v in given.items():
            if isinstance(v, dict):
                per[c] = self._unet_weights(c, v, f"{part}, {c!r}", {n for n in loaded if n.startswith(c + ".")})
            elif isinstance(v, list):
                raise UsageError(
                    f"{part}: the weight of {c!r} is a list; a component takes a number (or, a UNet, a dict of "
                    "blocks). Pass one number per component."
                )
            else:
                per[c] = 1.0 if v is None else v  # None: as left out (diffusers gives it 1)

        def weight(name: str) -> float:
            c = name.partition(".")[0]
            w = per.get(c, 1.0)
            return float(w(name)) if callable(w) else float(w)  # type: ignore[arg-type]

        return LayerWeights(
            given, tuple(np.array([weight(n) for n in arena], dtype=np.float64) for arena in self.names)
        )

    def _unet_weights(self, component: str, given: dict[str, object], part: str, loaded: set[str]):  # type: ignore[no-untyped-def]
        """The weight of each layer of a UNet component under the block dict ``given``."""
        wrapped = self.modules.get(component)
        modules = list(wrapped.named_modules()) if wrapped is not None else []
        levels = wrapper_levels(modules)  # its paths as the UNet's own: these levels dropped (_path)
        module = wrapped
        while (level := wrapper_level(module)) is not None:  # a UNet compiled or checkpoint-wrapped whole
            module = module._modules[level]  # type: ignore[union-attr]  # a wrapper: not None
        cls = type(module).__name__
        if module is None or cls not in UNETS:
            what = f"component {component!r} is a {cls}" if component else f"the runtime's model is a {cls}"
            raise UsageError(
                f"{part}: a dict of weights by block ({', '.join(map(repr, given))}) applies to a diffusers UNet "
                f"({' or '.join(UNETS)}) only, and {what}: diffusers matches such keys as substrings of its module "
                "names there, which lorahot does not reproduce. Pass a number"
                + (" for the component." if component else ", or inject a pipeline and weigh its components.")
            )
        expanded = _expand(module, given, part, {file_name(n, levels) for n, _ in modules})
        prefix = f"{component}." if component else ""
        crashes = sorted(
            n for n in loaded if (p := _path(n, prefix, levels)) is not None and _weight_of(expanded, p) is None
        )
        if crashes:
            raise UsageError(
                f"{part}: the slot has modules (of this part or another part of its stack) on UNet layers no block of "
                "the dict names, whose paths diffusers cannot read for a block weight (PEFT's get_module_weight, "
                "which looks every adapter's weight up on every LoRA layer of the UNet, fails with an IndexError): "
                f"{', '.join(crashes[:8])}{' ...' if len(crashes) > 8 else ''}. Pass a number for this part's UNet "
                "weight, or load adapters without modules there."
            )

        def weight(name: str) -> float:
            path = _path(name, prefix, levels)
            w = _weight_of(expanded, path) if path is not None else 1.0
            return 1.0 if w is None else w

        return weight


def _path(name: str, prefix: str, levels: frozenset[str]) -> str | None:
    """Layer ``name``'s path in its component as the UNet's own (:func:`~lorahot.resolve.file_names.file_name`:
    the component's wrapper ``levels`` dropped, wherever they are: ``down_blocks.1._orig_mod.attentions.0``
    of a block compiled before inject is the block's ``down_blocks.1.attentions.0``), None outside it."""
    if not name.startswith(prefix):
        return None
    return file_name(name[len(prefix) :], levels)


def _weight_of(expanded: list[tuple[str, float]], path: str) -> float | None:
    """PEFT's ``get_module_weight`` as diffusers calls it: the first entry whose name is in
    ``path``, else the attention of ``path``'s own block and index, else 1; None where diffusers
    fails (a path of fewer than four parts)."""
    for key, w in expanded:
        if key in path:
            return w
    parts = path.split(".")
    if len(parts) < 4:
        return None
    return dict(expanded).get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)


def _expand(unet: nn.Module, given: dict[str, object], part: str, names: set[str]) -> list[tuple[str, float]]:
    """diffusers' ``_maybe_expand_lora_scales_for_one_adapter`` for ``unet``, whose module paths are
    ``names`` (its own, without wrapper levels: :func:`_path`), in its order: each attention's
    module path and weight; what diffusers fails on or ignores is refused."""
    unknown = [k for k in given if k not in _BLOCK_KEYS]
    if unknown:
        raise UsageError(
            f"{part}: {', '.join(map(repr, unknown))} is not a block key; a UNet's dict of weights takes 'down', "
            "'mid' and 'up' (diffusers' set_adapters), e.g. {'down': 0.0, 'mid': 1.0, 'up': {'block_1': [0.0, 1.0, "
            "0.0]}}."
        )
    layers = getattr(getattr(unet, "config", None), "layers_per_block", None)
    if type(layers) is not int:
        raise UsageError(
            f"{part}: the UNet's config.layers_per_block is {layers!r}, not one int; diffusers' block weights count "
            "the attentions per block from it (and fail otherwise). Pass a number for the UNet."
        )
    if not any("mid_block.attentions.0" in n for n in names):
        raise UsageError(
            f"{part}: the UNet has no mid-block attention (mid_block.attentions.0), where diffusers' set_adapters "
            "fails on every dict of block weights. Pass a number for the UNet."
        )
    order: dict[str, object] = {}
    mid = given.get("mid", 1.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise UsageError(f"{part}: 'mid' has {len(mid)} weights; the mid block takes one (a number).")
        mid = mid[0]
    if not _number(mid):
        raise UsageError(f"{part}: 'mid' is {mid!r}; it takes a finite number.")
    order["mid"] = mid
    for updown, count in (("up", layers + 1), ("down", layers)):
        blocks = [i for i, b in enumerate(getattr(unet, f"{updown}_blocks")) if hasattr(b, "attentions")]
        value = given.get(updown, 1.0)
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i in blocks}
        extra = [k for k in value if k not in {f"block_{i}" for i in blocks}]
        if extra:
            raise UsageError(
                f"{part}: {updown!r} has {', '.join(map(repr, extra))}, no block of the UNet's {updown}_blocks with "
                f"attentions (those are {', '.join(f'block_{i}' for i in blocks) or 'none'}); diffusers ignores "
                "such a key, which would leave the layers you meant at 1. Name blocks with attentions."
            )
        for i in blocks:
            w = value.get(f"block_{i}", 1.0)
            ws = w if isinstance(w, list) else [w] * count
            if len(ws) == 1:
                ws = ws * count
            if len(ws) != count:
                raise UsageError(
                    f"{part}: {updown}.block_{i} has {len(ws)} weights, but the block has {count} attentions (one "
                    "weight each, or one number for all)."
                )
            for j, x in enumerate(ws):
                if not _number(x):
                    raise UsageError(f"{part}: {updown}.block_{i}[{j}] is {x!r}; it takes a finite number.")
                order[f"{updown}.block_{i}.{j}"] = x
    out = []
    for key, w in order.items():
        path = _module_path(key)
        if not any(path in n for n in names):
            raise UsageError(
                f"{part}: {key} names {path}, which the UNet does not have (diffusers fails: it has no attentions "
                "there). Give weights for the attentions the UNet has."
            )
        out.append((path, float(w)))  # type: ignore[arg-type]
    return out


def _module_path(key: str) -> str:
    """diffusers' ``_translate_into_actual_layer_name``: ``up.block_1.2`` -> ``up_blocks.1.attentions.2``."""
    if key == "mid":
        return "mid_block.attentions.0"
    updown, block, attn = key.split(".")
    return f"{updown}_blocks.{block.removeprefix('block_')}.attentions.{attn}"


def _number(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x)
