"""What the names and expressions of a function stand for below an instance, from its syntax
alone (:mod:`lorahot.runtime.weight_reads` reads them).

A path is dotted below the instance (``"proj"`` for ``self.proj``, ``""`` for the instance
itself); ``*`` stands for any element of a list or dict of modules (an iterated
``nn.ModuleList``, an index not known statically), ``**`` for the instance and every module
below it (``self.modules()``). A name bound to a module anywhere in a function stands for it
wherever the function uses that name.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = [
    "Function",
    "Tree",
    "aliases",
    "resolve",
    "receiver_name",
    "parameter_names",
    "parameter",
    "call_arguments",
    "constant",
    "is_getattr",
    "is_super",
    "is_value",
    "global_object",
    "own_attributes",
]

#: Attributes of a weight that describe it rather than compute with it.
_METADATA = frozenset(
    {"dtype", "device", "shape", "size", "ndim", "dim", "numel", "requires_grad", "layout", "is_meta", "data_ptr"}
)
#: Built-ins that test a weight rather than compute with it.
_TESTS = frozenset({"isinstance", "hasattr", "getattr", "type", "id"})
#: Built-ins that hand back the modules of the container they are given.
_SAME = frozenset({"list", "tuple", "iter", "reversed", "sorted"})
#: Methods of a module that hand back its children (``(name, child)`` pairs for some), and
#: those that hand back itself and every module below it.
_ELEMENTS = frozenset({"children", "values", "named_children", "items"})
_DESCENDANTS = frozenset({"modules", "named_modules"})
Function = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


def receiver_name(node: ast.AST | None) -> str | None:
    """The name a method's source gives its instance (its first parameter, ``self`` by custom
    but any name by the language); None for no source, a static or class method, or none."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    if any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in node.decorator_list):
        return None
    params = parameter_names(node)
    return params[0] if params else None


def parameter_names(node: Function) -> list[str]:
    """The names of ``node``'s positional parameters, in order."""
    return [a.arg for a in (*node.args.posonlyargs, *node.args.args)]


@dataclass(frozen=True)
class Tree:
    """One function's syntax as :mod:`lorahot.runtime.weight_reads` reads it: every node, each node's parent, the name
    bindings (target, value, whether the target takes each element of the value) and the
    functions defined in it by name."""

    nodes: list[ast.AST]
    parents: dict[ast.AST, ast.AST]
    bindings: list[tuple[ast.expr, ast.expr, bool]]
    local: dict[str, Function]

    @staticmethod
    def of(fn: Function) -> Tree:
        """The :class:`Tree` of ``fn``, in one pass over its nodes."""
        nodes: list[ast.AST] = [fn]
        parents: dict[ast.AST, ast.AST] = {}
        for node in nodes:  # grows as it goes: one pass over the tree
            for child in ast.iter_child_nodes(node):
                parents[child] = node
                nodes.append(child)
        bindings: list[tuple[ast.expr, ast.expr, bool]] = []
        local: dict[str, Function] = {}
        for node in nodes:
            if isinstance(node, ast.Assign):
                bindings += [(target, node.value, False) for target in node.targets]
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                bindings.append((node.target, node.value, False))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                bindings.append((node.target, node.iter, True))
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                bindings.append((node.optional_vars, node.context_expr, False))
            elif isinstance(node, ast.Match):
                for case in node.cases:
                    for target, value, each in _captures(case.pattern, node.subject):
                        if target is None:  # a weight a class pattern captures: read as ``subject.weight`` is
                            parents[value] = case
                            nodes.append(value)
                        else:
                            bindings.append((target, value, each))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not fn:
                local.setdefault(node.name, node)
        return Tree(nodes, parents, bindings, local)


def _captures(pattern: ast.pattern, subject: ast.expr) -> Iterator[tuple[ast.Name | None, ast.expr, bool]]:
    """The names a ``case`` pattern binds to ``subject``: ``case p``, ``case ... as p``, ``case
    [first, *rest]`` (an element; the same list), alternatives of ``|``, a class pattern's
    attributes (``case Block(proj=p)``: ``subject.proj``; a positional one: any child), a
    mapping's values (``case {"p": p, **rest}``). A weight a class pattern captures (``case
    nn.Module(weight=w)``) comes as ``(None, <subject>.weight, False)``: a read of it."""
    if isinstance(pattern, ast.MatchAs):
        if pattern.name is not None:
            yield ast.Name(id=pattern.name, ctx=ast.Store()), subject, False
        if pattern.pattern is not None:
            yield from _captures(pattern.pattern, subject)
    elif isinstance(pattern, ast.MatchOr):
        for alternative in pattern.patterns:
            yield from _captures(alternative, subject)
    elif isinstance(pattern, ast.MatchSequence):
        for element in pattern.patterns:
            if isinstance(element, ast.MatchStar):  # the rest of the same list
                if element.name is not None:
                    yield ast.Name(id=element.name, ctx=ast.Store()), subject, False
            else:
                yield from _captures(element, _element(subject))
    elif isinstance(pattern, ast.MatchClass):
        for element in pattern.patterns:  # by the class's __match_args__, which syntax does not say
            yield from _captures(element, _element(subject))
        for attr, element in zip(pattern.kwd_attrs, pattern.kwd_patterns):
            value = ast.Attribute(value=subject, attr=attr, ctx=ast.Load())
            if attr == "weight" and any(isinstance(n, ast.MatchAs) and n.name for n in ast.walk(element)):
                yield None, value, False
            yield from _captures(element, value)
    elif isinstance(pattern, ast.MatchMapping):
        for key, element in zip(pattern.keys, pattern.patterns):
            yield from _captures(element, _value_at(subject, key))
        if pattern.rest is not None:  # the rest of the same mapping
            yield ast.Name(id=pattern.rest, ctx=ast.Store()), subject, False


def _element(subject: ast.expr) -> ast.expr:
    """An element of ``subject`` not known statically: ``subject[*]``, or any element of a list
    or tuple display (an element of each ``*other`` in it)."""
    if isinstance(subject, (ast.List, ast.Tuple)) and subject.elts:
        elts = [_element(e.value) if isinstance(e, ast.Starred) else e for e in subject.elts]
        return ast.BoolOp(op=ast.Or(), values=elts)
    return ast.Subscript(value=subject, slice=ast.Name(id="<element>", ctx=ast.Load()), ctx=ast.Load())


def _value_at(mapping: ast.expr, key: ast.expr) -> ast.expr:
    """``mapping[key]``; where ``mapping`` is a dict display, the value it gives that constant key
    (any of its values for a key not known statically)."""
    if not isinstance(mapping, ast.Dict):
        return ast.Subscript(value=mapping, slice=key, ctx=ast.Load())
    for k, v in zip(mapping.keys, mapping.values):
        if isinstance(k, ast.Constant) and isinstance(key, ast.Constant) and k.value == key.value:
            return v
    # a key not known statically: any of its values (an element of each ``**other`` in it)
    values = [v if k is not None else _element(v) for k, v in zip(mapping.keys, mapping.values)]
    return ast.BoolOp(op=ast.Or(), values=values) if values else mapping


def aliases(bindings: list[tuple[ast.expr, ast.expr, bool]], env: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Which paths each name of a function stands for: ``env`` and the names ``bindings`` bind
    to them (an assignment, a loop or comprehension, tuple unpacking, ``with ... as``), in any
    order."""
    names = {k: set(v) for k, v in env.items()}
    if not bindings:
        return names
    for _ in range(4):  # a chain of names grows by one link per round
        changed = False
        for target, value, each in bindings:
            for name, paths in _bind(target, value, each, names):
                if paths - names.get(name, set()):
                    names.setdefault(name, set()).update(paths)
                    changed = True
        if not changed:
            break
    return names


def _bind(
    target: ast.expr, value: ast.expr, each: bool, names: Mapping[str, set[str]]
) -> Iterator[tuple[str, set[str]]]:
    """The names ``target`` binds to paths, given ``value`` (``each``: an element of it)."""
    if isinstance(target, ast.Name):
        paths = resolve(value, names)
        yield target.id, {_join(p, "*") for p in paths} if each else paths
        return
    if not isinstance(target, (ast.Tuple, ast.List)):
        return
    elts = target.elts
    if each and isinstance(value, ast.Call) and not value.keywords:
        fname = value.func.id if isinstance(value.func, ast.Name) else None
        if fname == "enumerate" and len(elts) == 2 and value.args:
            yield from _bind(elts[1], value.args[0], True, names)
        elif fname == "zip" and len(elts) == len(value.args):
            for t, v in zip(elts, value.args):
                yield from _bind(t, v, True, names)
        elif (
            isinstance(value.func, ast.Attribute) and value.func.attr.startswith(("named_", "items")) and len(elts) == 2
        ):
            yield from _bind(elts[1], value, True, names)  # for name, module in self.blocks.items()
    elif not each and isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(elts):
        for t, v in zip(elts, value.elts):
            yield from _bind(t, v, False, names)
    elif not each:  # a, b = self.layers
        for t in elts:
            yield from _bind(t, value, True, names)


def resolve(node: ast.expr, names: Mapping[str, set[str]]) -> set[str]:
    """The paths below the instance that expression ``node`` may stand for (none: not one)."""
    parts: list[str] = []  # an attribute or index chain, walked in a loop: it may be any length
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            if node.attr == "weight" or node.attr in _METADATA or node.attr.startswith("__"):
                return set()
            parts.append(node.attr)
        elif not isinstance(node.slice, ast.Slice):  # a slice: a part of the same list
            part = constant(node.slice)
            parts.append(str(part) if isinstance(part, str) or (isinstance(part, int) and part >= 0) else "*")
        node = node.value
    paths = _resolve_base(node, names)
    for part in reversed(parts):
        paths = {_join(p, part) for p in paths}
    return paths


def _resolve_base(node: ast.expr, names: Mapping[str, set[str]]) -> set[str]:
    if isinstance(node, ast.Name):
        return set(names.get(node.id, ()))
    if isinstance(node, ast.Call):
        func = node.func
        if is_getattr(node):
            attr = constant(node.args[1])
            if attr == "weight":
                return set()
            return {_join(p, attr if isinstance(attr, str) else "*") for p in resolve(node.args[0], names)}
        if isinstance(func, ast.Name) and func.id in _SAME and node.args:
            return resolve(node.args[0], names)
        if isinstance(func, ast.Name) and func.id == "next" and node.args:
            return {_join(p, "*") for p in resolve(node.args[0], names)}
        if isinstance(func, ast.Attribute) and func.attr in _ELEMENTS:
            return resolve(func.value, names)
        if isinstance(func, ast.Attribute) and func.attr in _DESCENDANTS:
            return {_join(p, "**") for p in resolve(func.value, names)}
        return set()
    if isinstance(node, ast.IfExp):
        found = set()
        while isinstance(node, ast.IfExp):  # a chain of conditionals needs no parentheses either
            found |= resolve(node.body, names)
            node = node.orelse
        return found | resolve(node, names)
    if isinstance(node, ast.BoolOp):
        return set().union(*(resolve(v, names) for v in node.values))
    if isinstance(node, ast.NamedExpr):
        return resolve(node.value, names)
    return set()


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def constant(node: ast.expr) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def is_getattr(node: ast.Call) -> bool:
    return isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2


def is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def global_object(func: ast.expr, module_name: str) -> object:
    """What a name or dotted name (``f``, ``utils.f``, ``Class.method``) refers to in module
    ``module_name``, through modules and classes only (no property runs); None otherwise."""
    chain = []
    while isinstance(func, ast.Attribute):
        chain.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    obj = own_attributes(sys.modules.get(module_name)).get(func.id)
    obj = vars(builtins).get(func.id) if obj is None else obj
    for part in reversed(chain):
        if isinstance(obj, types.ModuleType):
            obj = own_attributes(obj).get(part)
        elif isinstance(obj, type):
            obj = inspect.getattr_static(obj, part, None)
        else:
            return None
    return obj


def own_attributes(obj: object) -> Mapping[str, object]:
    """``obj``'s own ``__dict__`` and the values in its ``__slots__``, read without running its
    code (no ``__getattr__``, which an object with ``__slots__`` or a stand-in for a module in
    ``sys.modules`` may define to raise or to compute; no property); empty where it has none."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:  # no __dict__, or a class's own descriptor for it that fails
        attrs = {}
    if not isinstance(attrs, (dict, types.MappingProxyType)):
        attrs = {}
    slots = {} if isinstance(obj, type) else _slot_values(obj)
    return {**slots, **attrs} if slots else attrs  # a class's: a mapping proxy


def _slot_values(obj: object) -> dict[str, object]:
    """The values ``obj``'s slots hold, by name (its classes' member descriptors, which read the
    slot itself; a slot never set holds nothing)."""
    found: dict[str, object] = {}
    for klass in type(obj).__mro__:
        for name, attr in vars(klass).items():
            if isinstance(attr, types.MemberDescriptorType) and not name.startswith("__") and name not in found:
                try:
                    found[name] = attr.__get__(obj, type(obj))
                except AttributeError:  # not set
                    continue
    return found


def parameter(fn: Function, position: int | str) -> str | None:
    """The parameter of ``fn`` an argument at ``position`` (an index or a keyword) binds to."""
    params = parameter_names(fn)
    if isinstance(position, int):
        return params[position] if position < len(params) else None
    return position if position in params or position in [a.arg for a in fn.args.kwonlyargs] else None


def call_arguments(call: ast.Call) -> Iterator[tuple[int | str, ast.expr]]:
    yield from enumerate(call.args)
    for keyword in call.keywords:
        if keyword.arg is not None:
            yield keyword.arg, keyword.value


def is_value(node: ast.expr, parents: Mapping[ast.AST, ast.AST]) -> bool:
    """Whether ``<x>.weight`` is used as a value, not described or tested."""
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute):
        return parent.attr not in _METADATA
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id in _TESTS:
        return False
    return not (isinstance(parent, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops))
