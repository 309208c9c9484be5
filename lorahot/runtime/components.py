"""One runtime over several models: a pipeline's components as one module tree.

``lorahot.inject({"unet": unet, "text_encoder": te}, targets, max_rank=...)`` (or a diffusers
pipeline, duck-typed through its ``components`` mapping) holds the components in a
:class:`Components` module, so their layers are named ``<component>.<module path>`` and share
one buffer manager, one set of slots and atomic loads. The components themselves are wrapped
in place: the user keeps calling ``pipe.unet`` and ``pipe.text_encoder``.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from lorahot.errors import UsageError, name_problem, shown
from lorahot.runtime.targets import Targets, _check_single_path, match_targets, through_wrappers

__all__ = ["Components", "Pipeline", "is_several", "components_of", "match_components"]


class Components(nn.Module):
    """The injected components of a pipeline, as children named by component.

    It only holds them (the runtime's ``model``); call the components themselves.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            try:
                self.add_module(name, module)
            except (KeyError, TypeError) as exc:
                raise UsageError(
                    f"component name {shown(name, 200)} cannot name a module ({exc}); use a plain name such as 'unet'."
                ) from None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UsageError("Components only holds a pipeline's components; call the components themselves.")


class Pipeline:
    """The pipeline a runtime's components came from (an object with a ``components``
    mapping), held weakly, to check that it still calls them.

    The runtime's layers live in the modules inject wrapped. A pipeline whose component is
    replaced or removed after inject (``pipe.unet = other_unet``) no longer calls them: a load
    would change nothing it computes, and it would run without the adapter. :meth:`check`
    refuses that; a component compiled since (``pipe.unet = torch.compile(pipe.unet)``, whose
    ``_orig_mod`` is the injected module), compiled again (a function compiling its
    ``forward``), or compiled before inject and called as it is or uncompiled, is the same
    component.
    """

    def __init__(self, pipeline: object, container: nn.Module) -> None:
        try:
            self._ref: weakref.ref[Any] | None = weakref.ref(pipeline)
        except TypeError:  # an object weakref cannot follow: not checked
            self._ref = None
        self._injected = [(name, module) for name, module in container._modules.items() if module is not None]

    def check(self) -> None:
        """Raises :class:`UsageError` naming the first component the pipeline no longer holds."""
        pipeline = self._ref() if self._ref is not None else None
        if pipeline is None:
            return
        for name, module in self._injected:
            now = _component(pipeline, name)
            if _compiled_from(now) is not _compiled_from(module):
                how = "removed" if now is None else f"replaced by another {type(now).__name__}"
                raise UsageError(
                    f"component {name!r} of the pipeline was {how} after inject: this runtime's LoRA layers are in "
                    f"the {type(module).__name__} inject wrapped, which the pipeline no longer calls, so a load or "
                    "activate would change nothing it computes. Call runtime.eject(), then inject into the pipeline "
                    "as it is now."
                )


def _compiled_from(component: object) -> object:
    """The module ``component`` runs, through every wrapper ``torch.compile`` makes, else
    ``component``: a component compiled before inject, after it, or more than once is the same
    component.

    ``torch.compile(module)`` gives an ``OptimizedModule`` (the module under ``_orig_mod``);
    compiling that again, or compiling ``module.forward``, gives a function whose
    ``_torchdynamo_orig_callable`` is the module's bound ``forward``. Any other function or
    method (a caller's own ``lambda x: other(x)``) is not looked through.
    """
    seen: set[int] = set()
    while id(component) not in seen:
        seen.add(id(component))
        inner: object
        if isinstance(component, nn.Module):
            inner = through_wrappers(component)
        elif isinstance(component, types.MethodType):
            bound, calls = component.__self__, component.__func__
            runs = isinstance(bound, nn.Module) and calls in (type(bound).forward, type(bound).__call__)
            inner = bound if runs else None
        else:
            inner = _compiled_callable(component)
        if inner is None or inner is component:
            return component
        component = inner
    return component


def _compiled_callable(function: object) -> object | None:
    """What a function made by ``torch.compile`` compiles, else None.

    That is its ``_torchdynamo_orig_callable`` where set on this very function (torch's own
    unwrapping rule: not one ``functools.wraps`` copied onto a caller's wrapper), or the
    callable in the frame torch wraps around a ``torch.nn`` module's ``forward``
    (``torch._dynamo.external_utils.wrap_inline``).
    """
    if isinstance(function, types.FunctionType) and _is_inline_frame(function):
        cells = function.__closure__ or ()
        called: object = cells[function.__code__.co_freevars.index("fn")].cell_contents
        return called
    attributes = getattr(function, "__dict__", None)
    if not isinstance(attributes, dict) or not callable(function):
        return None
    made_here = attributes.get("_torchdynamo_wrapper_id", id(function)) == id(function)
    return attributes.get("_torchdynamo_orig_callable") if made_here else None


def _is_inline_frame(function: types.FunctionType) -> bool:
    """Whether ``function`` is the frame ``wrap_inline`` makes (its code is that function's
    ``inner``); torch's dynamo is not imported for this: without it no such frame exists."""
    external_utils = sys.modules.get("torch._dynamo.external_utils")
    if external_utils is None:
        return False
    inner = external_utils.wrap_inline(_is_inline_frame)
    return function.__code__ is inner.__code__ and "fn" in function.__code__.co_freevars


def _module_of(component: object) -> nn.Module | None:
    """``component`` where it is a module, the module a function ``torch.compile`` made runs
    (a component compiled twice), else None."""
    if isinstance(component, nn.Module):
        return component
    try:
        inner = _compiled_from(component)
    except Exception:  # an attribute of the caller's object that raises: not a function torch made
        return None
    return inner if isinstance(inner, nn.Module) else None


def _component(pipeline: object, name: str) -> object:
    """The pipeline's component ``name`` now: its attribute of that name (a diffusers
    pipeline's), else its ``components`` entry; None where it has neither or reading raises."""
    try:
        found = getattr(pipeline, name, None)
        if found is None:
            components = getattr(pipeline, "components", None)
            found = components.get(name) if isinstance(components, Mapping) else None
    except Exception:  # a property of the caller's object that raises: no component there to call
        return None
    return found


def is_several(model: object) -> bool:
    """Whether ``model`` is several models: a dict, or an object with a ``components`` mapping."""
    if isinstance(model, nn.Module):
        return False
    if isinstance(model, Mapping):
        return True
    try:
        return isinstance(getattr(model, "components", None), Mapping)
    except Exception as exc:  # a property of the caller's object that raises: not one lorahot can read
        raise UsageError(
            f"model={shown(model, 80)} ({type(model).__name__}): reading its .components raised "
            f"{type(exc).__name__}; pass a torch.nn.Module, a dict of them, or a pipeline whose .components works."
        ) from None


def components_of(model: object) -> tuple[dict[str, nn.Module], bool]:
    """The components of a dict of models or of an object with a ``components`` mapping (a
    diffusers pipeline), and whether the user named each one (a dict: each must take LoRA).

    Raises:
        UsageError: ``model`` is neither, or a dict entry is not an ``nn.Module`` (nor a function
            ``torch.compile`` made of one).
    """
    if isinstance(model, Mapping):
        bad = [k for k, v in model.items() if not (isinstance(k, str) and k and _module_of(v) is not None)]
        if bad or not model:
            raise UsageError(
                f"a dict of components must map non-empty names to torch.nn.Modules; got "
                f"{shown(bad[:3], 200) if bad else 'an empty dict'}."
            )
        return _named_well({k: m for k, v in model.items() if (m := _module_of(v)) is not None}), True
    found = getattr(model, "components", None)
    if isinstance(found, Mapping):
        modules = {k: m for k, v in found.items() if isinstance(k, str) and k and (m := _module_of(v)) is not None}
        if modules:
            return _named_well(modules), False
    raise UsageError(
        f"model must be a torch.nn.Module, a dict of component name -> nn.Module, or an object with a `components` "
        f"mapping of modules (a diffusers pipeline); got {type(model).__name__}."
    )


def _named_well(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``modules``, after refusing a component name no module path could hold (see
    :func:`~lorahot.errors.name_problem`): messages list the components by name."""
    for name in modules:
        if (problem := name_problem(name)) is not None:
            raise UsageError(f"the component name {shown(name)} {problem}. Name each component as a Python attribute.")
    return modules


def match_components(
    modules: dict[str, nn.Module], targets: Targets | Mapping[str, Targets], named: bool
) -> tuple[Components, list[str]]:
    """The container of the components that take LoRA and its matched names
    (``<component>.<path>``).

    ``targets`` is one spec for every component, or a dict per component (which picks the
    components). A component one spec matches nothing in is an error when the user ``named``
    it (a dict of models), else left out (a pipeline's VAE, its scheduler).

    Raises:
        UsageError: a targets key that names no component; a component with no match (named,
            or given its own targets); no match at all; what :func:`match_targets` raises,
            with the component in front.
    """
    if isinstance(targets, Mapping):
        unknown = [k for k in targets if k not in modules]
        if unknown or not targets:
            named_here = f"names component {shown(unknown[0], 200)}" if unknown else "is empty and names no component"
            raise UsageError(
                f"targets {named_here}; the components are {', '.join(modules)}. Key the targets dict by those "
                "names (one entry per component to inject)."
            )
        specs: dict[str, Targets] = dict(targets)
        required = True
    else:
        specs, required = dict.fromkeys(modules, targets), named
    found: dict[str, list[str]] = {}
    for component, spec in specs.items():
        try:
            found[component] = match_targets(modules[component], spec)
        except UsageError as exc:
            if required or "matched no module" not in str(exc):
                raise UsageError(
                    f"component {shown(component, 200)}: {exc}"
                    + (
                        " Give it its own targets (a dict keyed by component), or leave it out."
                        if "matched no module" in str(exc)
                        else ""
                    )
                ) from None
    if not found:
        raise UsageError(
            f"targets={shown(targets, 200)} matched no module in any component ({', '.join(modules)}); pass the "
            f"module names "
            "of the components you want LoRA in."
        )
    container = Components({c: modules[c] for c in found})
    names = [f"{c}.{n}" for c, ns in found.items() for n in ns]
    _check_single_path(container, names, dict(container.named_modules(remove_duplicate=False)))
    return container, names
