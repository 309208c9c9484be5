"""Which modules a model computes with by reading their weight instead of calling them.

A LoRA layer adds its update where the module is called. Code that takes the module's weight
itself (``self.dt_proj.weight @ x`` in transformers' Mamba and Jamba mixers,
``x.matmul(self.dense.weight)`` in MobileBERT's prediction head, a module handed to a function
that reads ``conv.weight``) computes with the base weight: unmerged, the LoRA never reaches that
computation (as PEFT's does not); merged, the folded weight does. So a module read so and
never called would take a LoRA that never applies, and merged mode, wherever such a read runs,
would compute something else than unmerged mode and PEFT.

The reads are found in the source of the code on a target's path, once per class (or
function): for each module on it, what its ``forward`` reaches: the methods and properties it
names on its instance (``self.<name>``, ``super().<name>``, those of its base classes too), the
Python functions it hands the instance or one of its modules to (module-level, static and class
methods, a ``functools.partial``'s function, a few calls deep; not torch's or the standard
library's, taken as calling what they are handed), the code of what it holds and calls (an
object's ``__call__``, an attention processor handed the module, a ``functools.partial`` or a
closure), the forward hooks and pre-hooks registered on it and a ``forward`` set on its instance,
with the objects a hook, partial or closure binds. A module is followed through the names it is
bound to in a function (``proj = self.proj``, ``a, b = self.p, self.q``, ``for layer in
self.layers``, ``getattr(self, "proj")``, ``self.layers[0]``, ``self.named_modules()``, ``match
self.layers: case [first, *rest]``, ``case Block(proj=p)``, ``case {"p": p}``, a weight captured
as ``case nn.Module(weight=w)``; an index
or name not known statically stands for every element or child), in any order of the
function's lines. A read is ``<module>.weight`` used as a value, or the weight taken by its
name (``get_parameter("proj.weight")``, ``_parameters["weight"]``, ``state_dict()[...]``);
metadata reads such as ``.dtype`` / ``.device`` / ``.shape``, ``isinstance`` / ``hasattr`` and
``is None`` tests are not reads; a call is ``<module>(...)``, ``<module>.forward(...)``, or the module handed to code
this cannot read (it may call it). Code whose source cannot be read (made at run time, a C
extension) shows neither. The paths found in a class are matched to each instance's modules by
identity, through children, plain attributes and slots (never a property).
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import types
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lorahot.errors import UsageError
from lorahot.runtime.source_paths import (
    Function,
    Tree,
    aliases,
    call_arguments,
    constant,
    global_object,
    is_getattr,
    is_super,
    is_value,
    own_attributes,
    parameter,
    parameter_names,
    receiver_name,
    resolve,
)

__all__ = ["Uses", "Sources", "class_uses", "direct_read", "check_merged_reads"]

#: What a module's forward path starts from, and an object's (not a module's) that it calls.
_FORWARD = frozenset({"forward"})
_OBJECT_ENTRIES = frozenset({"__call__", "forward"})
#: How many calls deep a module handed on (or an object held) is followed.
_DEPTH = 4


@dataclass(frozen=True)
class Uses:
    """What one class's forward path does with its modules, by their path below ``self``
    (``"layers.*"``: any element of ``self.layers``).

    Attributes:
        reads: module path -> where its weight is read as a value (``"Class.method"``).
        calls: module paths the forward path calls, or hands to code that may call them.
        handed: ``(callee, argument, path)`` for each call of something the instance holds
            (``self.processor(self, x)``: which code that is, only the instance says) handed a
            module (``path``, ``""`` for the instance) as ``argument`` (a position or keyword).
    """

    reads: Mapping[str, str] = field(default_factory=dict)
    calls: frozenset[str] = frozenset()
    handed: frozenset[tuple[str, int | str, str]] = frozenset()


@dataclass
class _Reached:
    """What the code of one module (or held object) does to other objects, by identity."""

    reads: dict[int, str] = field(default_factory=dict)
    called: set[int] = field(default_factory=set)


_CACHE: weakref.WeakKeyDictionary[type, dict[frozenset[str], Uses]] = weakref.WeakKeyDictionary()
_HANDED: weakref.WeakKeyDictionary[types.FunctionType, dict[tuple[str, str], Uses]] = weakref.WeakKeyDictionary()


def class_uses(cls: type, sources: Sources | None = None, entries: frozenset[str] = _FORWARD) -> Uses:
    """The :class:`Uses` of the code ``cls``'s methods ``entries`` reach (cached per class)."""
    by_entries = _CACHE.setdefault(cls, {})
    uses = by_entries.get(entries)
    if uses is None:
        uses = by_entries[entries] = _scan_class(cls, sources or Sources(), entries)
    return uses


def direct_read(modules: Mapping[str, nn.Module], name: str, sources: Sources | None = None) -> tuple[str, bool] | None:
    """Whether a module on the path of module ``name`` reads its weight as a value.

    Args:
        modules: the model's ``dict(named_modules())``.
        name: the qualified name of a module in it.
        sources: the parsed files to reuse across calls (a fresh :class:`Sources` if None).

    Returns:
        None where no such read is found, else where it is (``"Class.method reads
        self.<path>.weight"``) and whether any module on the path also calls it.
    """
    sources = sources or Sources()
    target = modules.get(name)
    where, called = None, False
    parts = name.split(".")
    for depth in range(len(parts)):
        owner = modules.get(".".join(parts[:depth]))
        if owner is None or target is None:
            continue
        reached = sources.reached(owner)
        where = where or reached.reads.get(id(target))
        called = called or id(target) in reached.called
    return None if where is None else (where, called)


def check_merged_reads(model: nn.Module, names: list[str]) -> None:
    """Refuses, for merged mode, a target whose weight a module on its path reads as a value.

    Unmerged, such a read computes with the base weight (as PEFT's LoRA layers leave it);
    merged, it would compute with the folded one, so the two modes would differ wherever
    that code runs (a branch taken on some inputs, in training or on a cached decode step).

    Raises:
        UsageError: naming the target, the method that reads its weight, and the fix.
    """
    modules = dict(model.named_modules())
    found = Sources()
    for name in names:
        read = direct_read(modules, name, found)
        if read is not None:
            raise UsageError(
                f"{name}: {read[0]} (computing with it directly, not through the module): unmerged, as with PEFT, "
                "the LoRA does not reach that computation, while merged mode would fold it in, so the two would "
                "compute differently wherever it runs. Inject without merged=True, or exclude it from targets."
            )


class Sources:
    """The parsed sources of functions for one round of checks (a class's :class:`Uses` are
    kept; the syntax trees, and what each module instance reaches, go with this object). Each
    function's own lines are parsed where they can be found (a file such as diffusers'
    ``attention_processor.py`` holds thousands of lines, most never on a target's path), else
    its module's whole file, once."""

    def __init__(self) -> None:
        self._own: dict[tuple[str, str], Function | None] = {}
        self._index: dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]] = {}
        self._alone: dict[types.CodeType, Function | None] = {}
        self._trees: dict[int, tuple[Function, Tree]] = {}
        self._reached: dict[tuple[int, frozenset[str]], tuple[object, _Reached]] = {}

    def function(self, module_name: str, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        """The definition of the function or method ``qualname`` in module ``module_name``."""
        key = (module_name, qualname)
        if key not in self._own:
            self._own[key] = _own_source(module_name, qualname)
        node = self._own[key]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
        index = self._index.get(module_name)
        if index is None:
            index = self._index[module_name] = _functions(sys.modules.get(module_name))
        return index.get(qualname)

    def of(self, fn: types.FunctionType) -> Function | None:
        """The definition of the function object ``fn``: by its name in its module, else (a
        function defined in another function, a lambda) parsed from its own lines."""
        if "<" not in fn.__qualname__:
            return self.function(fn.__module__, fn.__qualname__)
        code = fn.__code__
        if code not in self._alone:
            self._alone[code] = _parsed_alone(fn)
        return self._alone[code]

    def tree(self, fn: Function) -> Tree:
        """``fn``'s nodes, each node's parent, its name bindings and local functions (once)."""
        kept = self._trees.get(id(fn))
        if kept is None or kept[0] is not fn:
            kept = self._trees[id(fn)] = (fn, Tree.of(fn))
        return kept[1]

    def reached(self, owner: object, entries: frozenset[str] = _FORWARD, depth: int = 0) -> _Reached:
        """What ``owner``'s code (its class's ``entries``, its hooks, the objects it holds and
        calls) reads and calls, by the identity of the objects its paths lead to."""
        key = (id(owner), entries)
        kept = self._reached.get(key)
        if kept is not None and kept[0] is owner:
            return kept[1]
        reached = _Reached()
        self._reached[key] = (owner, reached)  # before following held objects: a cycle ends here
        uses = class_uses(type(owner), self, entries)
        held = _resolve_uses(owner, uses, reached)
        if isinstance(owner, nn.Module):
            self._own_forward(owner, reached)
            for hook in _hooks(owner):
                for fn, at in _functions_of(hook, 0):  # called with the module first
                    hooked = _handed_uses(fn, at, "", self)
                    named = {p: f"the forward hook {w} on {type(owner).__name__}" for p, w in hooked.reads.items()}
                    _resolve_uses(owner, Uses(named, hooked.calls), reached)
                inner = self.bound(hook.func, hook.args, hook.keywords) if isinstance(hook, functools.partial) else None
                inner = self.bound(hook) if inner is None else inner
                _merge(reached, inner, f", a forward hook on {type(owner).__name__},")
        for callee, argument, path in sorted(uses.handed, key=str):
            for fn, at in _callables(owner, callee, argument):
                handed = _handed_uses(fn, at, path, self)
                named = {p: f"{w}, called as self.{callee} by {type(owner).__name__}," for p, w in handed.reads.items()}
                _resolve_uses(owner, Uses(named, handed.calls), reached)
        for obj, method, at in held if depth < _DEPTH else ():
            if isinstance(obj, functools.partial):
                inner = self.bound(obj.func, obj.args, obj.keywords)
            elif isinstance(obj, types.FunctionType):
                inner = self.bound(obj)
            else:
                inner = self.reached(obj, frozenset({method}) if method else _OBJECT_ENTRIES, depth + 1)
            for ident, where in inner.reads.items():
                reached.reads.setdefault(
                    ident, f"{where}, in the {type(obj).__name__} {type(owner).__name__} holds as self.{at}"
                )
            reached.called |= inner.called
        return reached

    def _own_forward(self, owner: nn.Module, reached: _Reached) -> None:
        """Adds what a ``forward`` set on the instance (a ``functools.partial`` over it, a method
        bound to it) does to ``reached``."""
        own = vars(owner).get("forward")
        if isinstance(own, functools.partial):
            _merge(
                reached,
                self.bound(own.func, own.args, own.keywords),
                f", as the forward of {type(owner).__name__}'s own",
            )
        elif isinstance(own, types.MethodType) and own.__self__ is owner:
            for fn, at in _functions_of(own.__func__, 0):
                uses = _handed_uses(fn, at, "", self)
                named = {p: f"{w} (the forward of {type(owner).__name__}'s own)" for p, w in uses.reads.items()}
                _resolve_uses(owner, Uses(named, uses.calls), reached)

    def bound(
        self, fn: object, args: tuple[object, ...] = (), keywords: Mapping[str, object] | None = None
    ) -> _Reached:
        """What function ``fn`` does with the objects bound in it: ``args`` and ``keywords`` (a
        ``functools.partial``'s) and the variables it closes over (a hook defined in
        ``__init__`` that uses ``self``), by their identity."""
        reached = _Reached()
        node = self.of(fn) if isinstance(fn, types.FunctionType) and not _library(fn) else None
        if node is None or not isinstance(fn, types.FunctionType):
            return reached
        values = {**dict(zip(parameter_names(node), args)), **(keywords or {}), **_closed_over(fn)}
        if not values:
            return reached
        label = f"{fn.__qualname__} (bound in a functools.partial)" if args or keywords else fn.__qualname__
        scan = _Scan(None, fn.__module__, self)
        scan.function(node, {name: {name} for name in values}, label)
        for path, where in scan.reads.items():
            for obj in _walk(values, path)[0]:
                reached.reads.setdefault(id(obj), f"{where} reads {path}.weight")
        for path in scan.calls:
            reached.called.update(id(obj) for obj in _walk(values, path)[0])
        return reached


def _binds(obj: object) -> bool:
    """Whether ``obj`` is code with objects bound in it: a ``functools.partial``, a closure."""
    return isinstance(obj, functools.partial) or (isinstance(obj, types.FunctionType) and bool(obj.__closure__))


def _closed_over(fn: types.FunctionType) -> dict[str, object]:
    """The variables ``fn`` closes over that hold a value, by name."""
    found = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            found[name] = cell.cell_contents
        except ValueError:  # not bound yet
            continue
    return found


def _merge(reached: _Reached, inner: _Reached, suffix: str) -> None:
    for ident, where in inner.reads.items():
        reached.reads.setdefault(ident, where + suffix)
    reached.called |= inner.called


def _resolve_uses(owner: object, uses: Uses, reached: _Reached) -> list[tuple[object, str | None, str]]:
    """Adds what ``uses``' paths lead to from ``owner`` to ``reached``; returns the objects (not
    modules) on its called paths, each with the method of it called (None: the object itself)
    and its path, whose own code runs then."""
    for path, where in uses.reads.items():
        for obj in _walk(owner, path)[0]:
            reached.reads.setdefault(id(obj), f"{where} reads {_shown(path)}.weight")
    held: list[tuple[object, str | None, str]] = []
    for path in uses.calls:
        found, on_path = _walk(owner, path)
        reached.called.update(id(obj) for obj in found)
        held += on_path
    return sorted(held, key=lambda h: h[2])  # the first message for an object: its first path


def _callables(owner: object, callee: str, argument: int | str) -> Iterator[tuple[types.FunctionType, int | str]]:
    """The Python functions a call of ``owner.<callee>`` runs (:func:`_functions_of`), and a
    held object's method called by name (``self.kernel.run(...)``)."""
    found, _ = _walk(owner, callee)
    if not found and "." in callee:
        head, _, name = callee.rpartition(".")
        for obj in _walk(owner, head)[0]:
            attr = inspect.getattr_static(type(obj), name, None)
            if isinstance(attr, staticmethod):
                yield from _shifted(attr.__func__, argument, 0)
            elif isinstance(attr, types.FunctionType):
                yield from _shifted(attr, argument, 1)
    for obj in found:
        yield from _functions_of(obj, argument)


def _functions_of(obj: object, argument: int | str) -> Iterator[tuple[types.FunctionType, int | str]]:
    """The Python function calling ``obj`` runs, with the parameter position (or keyword) its
    call's ``argument`` binds to: a function, a bound method, a ``functools.partial``'s function,
    a module's ``forward``, an object's ``__call__``; none where that is not Python code."""
    if isinstance(obj, functools.partial):
        yield from _functions_of(obj.func, argument + len(obj.args) if isinstance(argument, int) else argument)
    elif isinstance(obj, types.MethodType):
        yield from _shifted(obj.__func__, argument, 1)
    elif isinstance(obj, types.FunctionType):
        yield from _shifted(obj, argument, 0)
    elif isinstance(obj, nn.Module) or _is_object(obj):
        method = inspect.getattr_static(type(obj), "forward" if isinstance(obj, nn.Module) else "__call__", None)
        yield from _shifted(method, argument, 1)


def _shifted(fn: object, argument: int | str, offset: int) -> Iterator[tuple[types.FunctionType, int | str]]:
    if isinstance(fn, types.FunctionType) and not _library(fn):
        yield fn, argument + offset if isinstance(argument, int) else argument


def _handed_uses(fn: types.FunctionType, argument: int | str, path: str, sources: Sources) -> Uses:
    """What ``fn`` does with the module ``path`` of the instance that calls it, handed as
    ``argument``, by paths below that instance; nothing where ``fn`` cannot be read."""
    by_argument = _HANDED.setdefault(fn, {})
    key = (str(argument), path)
    uses = by_argument.get(key)
    if uses is None:
        node = sources.of(fn)
        param = parameter(node, argument) if node is not None else None
        scan = _Scan(None, fn.__module__, sources)
        if node is not None and param is not None:
            scan.function(node, {param: {path}}, fn.__qualname__)
        uses = by_argument[key] = Uses(dict(scan.reads), frozenset(scan.calls))
    return uses


def _shown(path: str) -> str:
    """``self.<path>`` as a message shows it (``self.layers[*]``: any element of the list)."""
    parts: list[str] = []
    for part in path.replace("**.*", "**").split("."):
        if part == "**":
            parts.append(".<any submodule>")
        elif part == "*":
            parts.append("[*]" if parts else ".<any child>")
        else:
            parts.append(f".{part}")
    return "self" + "".join(parts)


def _by_name(node: ast.Subscript | ast.Call, names: Mapping[str, set[str]]) -> set[str]:
    """The modules whose weight ``node`` takes by its name: ``m._parameters["weight"]``,
    ``m.get_parameter("a.weight")``, ``m.state_dict()["a.weight"]`` (paths of ``m.a``)."""
    key: object = None
    owner: ast.expr | None = None
    if isinstance(node, ast.Subscript):
        key, holder = constant(node.slice), node.value
        if isinstance(holder, ast.Attribute) and holder.attr == "_parameters":
            key, owner = (key, holder.value) if key == "weight" else (None, None)
        elif (
            isinstance(holder, ast.Call) and isinstance(holder.func, ast.Attribute) and holder.func.attr == "state_dict"
        ):
            owner = holder.func.value
    elif isinstance(node.func, ast.Attribute) and node.func.attr == "get_parameter" and node.args:
        key, owner = constant(node.args[0]), node.func.value
    if owner is None or not isinstance(key, str) or key.rpartition(".")[2] != "weight":
        return set()
    prefix = key.rpartition(".")[0]
    return {".".join(p for p in (path, prefix) if p) for path in resolve(owner, names)}


def _own_class(node: ast.expr, names: Mapping[str, set[str]]) -> bool:
    """Whether ``node`` is the instance's class: ``type(self)`` or ``self.__class__``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" and node.args:
        return "" in resolve(node.args[0], names)
    return isinstance(node, ast.Attribute) and node.attr == "__class__" and "" in resolve(node.value, names)


def _library(fn: types.FunctionType) -> bool:
    """Whether ``fn`` is torch's or the standard library's: code taken as calling the modules
    it is handed and reading none of their weights (not followed: ``inspect.signature`` or
    ``torch.utils.checkpoint`` would only cost time)."""
    top = fn.__module__.partition(".")[0] if isinstance(fn.__module__, str) else ""
    return top == "torch" or top in sys.stdlib_module_names


def _walk(root: object, path: str) -> tuple[list[object], list[tuple[object, str | None, str]]]:
    """The objects ``root.<path>`` stands for (``*``: every element), found through modules'
    children and objects' own attributes, never through a property or ``__getattr__``; and the
    objects (not modules, tensors or containers) on the way, each with the next part of the
    path and its own path."""
    if isinstance(root, nn.Module) and root._modules.get(path) is not None:  # most paths: a child
        return [root._modules[path]], []
    parts = path.split(".")
    found, held = [root], []
    for i, part in enumerate(parts):
        found = [child for obj in found for child in _step(obj, part)]
        if not found:
            break
        if not all(isinstance(obj, nn.Module) for obj in found):
            at = ".".join(parts[: i + 1])
            rest = parts[i + 1] if i + 1 < len(parts) else None
            held += [(obj, rest, at) for obj in found if _is_object(obj) or _binds(obj)]
    return found, held


def _step(obj: object, part: str) -> list[object]:
    if part == "**":
        return list(obj.modules()) if isinstance(obj, nn.Module) else []
    if part == "*":
        if isinstance(obj, nn.Module):
            return list(obj._modules.values())
        if isinstance(obj, (list, tuple)):
            return list(obj)
        return list(obj.values()) if isinstance(obj, dict) else []
    if isinstance(obj, nn.Module) and obj._modules.get(part) is not None:
        return [obj._modules[part]]
    if isinstance(obj, (list, tuple)):
        return [obj[int(part)]] if part.isdigit() and int(part) < len(obj) else []
    if isinstance(obj, dict):
        return [obj[part]] if part in obj else []
    attrs = own_attributes(obj)
    return [attrs[part]] if isinstance(attrs, dict) and part in attrs else []


#: What is not code a module holds: modules, tensors, containers, values, functions.
_NOT_OBJECTS = (
    nn.Module,
    torch.Tensor,
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    functools.partial,
    list,
    tuple,
    dict,
    set,
    frozenset,
    str,
    bytes,
    int,
    float,
    torch.dtype,
    torch.device,
)


def _is_object(obj: object) -> bool:
    """Whether ``obj`` is an instance of a class of its own (code that may hold a module)."""
    return not isinstance(obj, _NOT_OBJECTS) and obj is not None and type(obj).__module__ != "builtins"


def _hooks(module: nn.Module) -> list[object]:
    """The forward pre-hooks and hooks that run around ``module``'s forward (its own and the
    global ones)."""
    glob = sys.modules["torch.nn.modules.module"]
    found = [getattr(glob, "_global_forward_pre_hooks", None), getattr(glob, "_global_forward_hooks", None)]
    found += [module._forward_pre_hooks, module._forward_hooks]
    return [hook for hooks in found if hooks for hook in hooks.values()]


def _own_source(module_name: str, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The definition of the function ``qualname`` of module ``module_name`` parsed from its own
    lines: the object found under that name (through ``functools.wraps`` decorators) must be a
    function of that module by that qualified name, and its lines one definition of that name;
    None otherwise (the caller parses the whole file then)."""
    obj: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = own_attributes(obj).get(part)
    if isinstance(obj, functools.cached_property):
        obj = obj.func
    obj = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)  # or a static/class method
    if not inspect.isfunction(obj):
        return None
    try:
        fn = inspect.unwrap(obj)
        if not inspect.isfunction(fn) or fn.__module__ != module_name or fn.__qualname__ != qualname:
            return None
        lines, _ = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    node = tree.body[0] if len(tree.body) == 1 else None
    name = qualname.rpartition(".")[2]
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name else None


def _parsed_alone(fn: types.FunctionType) -> Function | None:
    """A function defined in another function, or a lambda, parsed from its own lines (a
    lambda's lines may be part of a longer statement: then a line of its own is tried)."""
    try:
        lines, _ = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return None
    source = textwrap.dedent("".join(lines))
    arguments = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    for text in (source, f"(\n{source}\n)", source.strip().rstrip(",") + "\n"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Lambda) and fn.__name__ == "<lambda>" and parameter_names(node) == arguments:
                return node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn.__name__:
                return node
    return None


def _functions(module: object) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method of a module's source, by qualified name (none where its
    source cannot be read)."""
    if not isinstance(module, types.ModuleType):  # a stand-in for one in sys.modules: its own code
        return {}
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError, ValueError):
        return {}
    found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    todo: list[tuple[str, ast.AST]] = [("", tree)]
    while todo:
        prefix, node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                todo.append((f"{prefix}{child.name}.", child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.setdefault(prefix + child.name, child)
            elif isinstance(child, (ast.If, ast.Try)):  # definitions under `if TYPE_CHECKING:` or `try:`
                todo.append((prefix, child))
    return found


def _scan_class(cls: type, sources: Sources, entries: frozenset[str]) -> Uses:
    reads: dict[str, str] = {}
    calls: set[str] = set()
    handed: set[tuple[str, int | str, str]] = set()
    todo, seen = sorted(entries), set()
    while todo:
        method = todo.pop()
        if method in seen:
            continue
        seen.add(method)
        for klass in cls.__mro__:
            if klass in (object, nn.Module) or not _is_code(vars(klass).get(method)):
                continue
            node, module_name = _method_source(klass, method, sources)
            receiver = receiver_name(node)
            if node is None or receiver is None:
                continue
            scan = _Scan(cls, module_name, sources)
            scan.function(node, {receiver: {""}}, f"{klass.__name__}.{method}")
            for path, where in scan.reads.items():
                reads.setdefault(path, where)
            calls |= scan.calls
            handed |= scan.handed
            todo += sorted(scan.members - seen)
    return Uses(reads, frozenset(calls), frozenset(handed))


def _method_source(klass: type, method: str, sources: Sources) -> tuple[Function | None, str]:
    """The definition of ``klass``'s own ``method`` and the module whose names it reads: found
    by the class's qualified name, else from the function object itself (a class defined in a
    function, whose name holds ``<locals>``; a function of another name set as a method,
    ``forward = _shared_forward``)."""
    node = sources.function(klass.__module__, f"{klass.__qualname__}.{method}")
    if node is not None:
        return node, klass.__module__
    attr = vars(klass).get(method)
    if isinstance(attr, functools.cached_property):
        attr = attr.func
    fn = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
    if not isinstance(fn, types.FunctionType) or _library(fn):
        return None, klass.__module__
    return sources.of(fn), fn.__module__ if isinstance(fn.__module__, str) else klass.__module__


def _is_code(attr: object) -> bool:
    """Whether a class attribute runs code when reached on an instance (a method, a property)."""
    return inspect.isfunction(attr) or isinstance(
        attr, (property, functools.cached_property, staticmethod, classmethod)
    )


class _Scan:
    """The reads and calls of one class's instance (paths below it, ``""`` the instance) in the
    functions its methods reach; ``members`` are the names used on the instance (methods and
    properties to scan next)."""

    def __init__(self, cls: type | None, module_name: str, sources: Sources) -> None:
        self.cls, self.module_name, self.sources = cls, module_name, sources
        self.reads: dict[str, str] = {}
        self.calls: set[str] = set()
        self.members: set[str] = set()
        self.handed: set[tuple[str, int | str, str]] = set()
        self._seen: set[tuple[int, tuple[tuple[str, tuple[str, ...]], ...]]] = set()

    def function(
        self, fn: Function, env: Mapping[str, set[str]], label: str, depth: int = 0, module_name: str = ""
    ) -> None:
        """Scans ``fn``, whose names ``env`` stand for paths below the instance."""
        key = (id(fn), tuple(sorted((k, tuple(sorted(v))) for k, v in env.items())))
        if key in self._seen:
            return
        self._seen.add(key)
        module_name = module_name or self.module_name
        tree = self.sources.tree(fn)
        names = aliases(tree.bindings, env)
        for node in tree.nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                base = resolve(node.value, names)
                if "" in base or is_super(node.value):
                    self.members.add(node.attr)
                if node.attr == "weight" and is_value(node, tree.parents):
                    self._read(base, label)
            elif isinstance(node, ast.Call):
                self._call(node, names, tree.parents, tree.local, label, depth, module_name)
            if isinstance(node, (ast.Subscript, ast.Call)) and is_value(node, tree.parents):
                self._read(_by_name(node, names), label)

    def _read(self, paths: set[str], label: str) -> None:
        for path in paths:
            if path:  # the instance's own weight is its own forward's business
                self.reads.setdefault(path, label)

    def _call(
        self,
        node: ast.Call,
        names: Mapping[str, set[str]],
        parents: Mapping[ast.AST, ast.AST],
        local: Mapping[str, Function],
        label: str,
        depth: int,
        module_name: str,
    ) -> None:
        func = node.func
        called = resolve(func, names)
        if isinstance(func, ast.Attribute) and func.attr in ("forward", "__call__"):
            called |= resolve(func.value, names)
        self.calls |= called - {""}
        if is_getattr(node) and constant(node.args[1]) == "weight" and is_value(node, parents):
            self._read(resolve(node.args[0], names), label)
        arguments = list(call_arguments(node))
        if global_object(func, module_name) is functools.partial and node.args:  # partial(f, *handed)
            func = node.args[0]
            arguments = [(p - 1 if isinstance(p, int) else p, a) for p, a in arguments if p != 0]
        handed = [(position, paths) for position, arg in arguments if (paths := resolve(arg, names))]
        if not handed:
            return
        callee = self._callee(func, names, local, module_name) if depth < _DEPTH else None
        env: dict[str, set[str]] = {}
        for position, paths in handed:
            at = position + callee[1] if callee is not None and isinstance(position, int) else position
            param = parameter(callee[0], at) if callee is not None else None
            if param is None:
                self.calls |= paths - {""}  # code this cannot read may call it
                if callee is None:  # which code, only the instance says (self.processor(self, x))
                    self.handed |= {(c, position, p) for c in called - {""} for p in paths}
            else:
                env.setdefault(param, set()).update(paths)
        if callee is not None and env:
            fn, _, where, fn_module = callee
            inner = label if "(through" in label else f"{label} (through {where})"
            self.function(fn, env, inner, depth + 1, fn_module)

    def _callee(
        self, func: ast.expr, names: Mapping[str, set[str]], local: Mapping[str, Function], module_name: str
    ) -> tuple[Function, int, str, str] | None:
        """The definition a call goes to, the parameters its instance or class takes first
        (0 or 1), its name and its module; None where this cannot read it."""
        offset = 0
        if isinstance(func, ast.Name) and func.id in local:
            return local[func.id], 0, func.id, module_name
        if isinstance(func, ast.Attribute) and "" in resolve(func.value, names):
            obj = inspect.getattr_static(self.cls, func.attr, None) if self.cls is not None else None
            offset = 0 if isinstance(obj, staticmethod) else 1
        elif isinstance(func, ast.Attribute) and _own_class(func.value, names):  # type(self).m(self, x)
            obj = inspect.getattr_static(self.cls, func.attr, None) if self.cls is not None else None
            offset = 1 if isinstance(obj, classmethod) else 0
        else:
            obj = global_object(func, module_name)
            if isinstance(obj, classmethod):
                offset = 1
        obj = getattr(obj, "__func__", obj)  # a static or class method
        if not isinstance(obj, types.FunctionType) or _library(obj):
            return None
        node = self.sources.of(obj)
        return None if node is None else (node, offset, obj.__qualname__, obj.__module__)
