"""Which modules a model computes with by reading their weight instead of calling them.

A LoRA layer adds its update where the module is called. Code that takes the module's weight
itself (``self.dt_proj.weight @ x`` in transformers' Mamba and Jamba mixers,
``x.matmul(self.dense.weight)`` in MobileBERT's prediction head, a module handed to a function
that reads ``conv.weight``) computes with the base weight: unmerged, the LoRA never reaches that
computation (as PEFT's does not); merged, the folded weight does. So a module read so and
never called would take a LoRA that never applies, and merged mode, wherever such a read runs,
would compute something else than unmerged mode and PEFT.

The reads are found in the source of the model's classes, once per class: for each module on
a target's path, the methods its ``forward`` reaches through ``self.<method>(...)`` calls
(those of its base classes too), and the Python functions those methods hand one of its
modules to (one level deep). A read is ``self.<path>.weight`` used as a value (metadata reads
such as ``.dtype`` / ``.device`` / ``.shape``, ``isinstance`` / ``hasattr`` and ``is None``
tests are not reads); a call is ``self.<path>(...)``, ``self.<path>.forward(...)``, or the
module handed to code this cannot read (it may call it). A class whose source cannot be read
(made at run time, a C extension) shows neither.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from torch import nn

from lorahot.errors import UsageError

__all__ = ["Uses", "Sources", "class_uses", "direct_read", "check_merged_reads"]

#: Attributes of a weight that describe it rather than compute with it.
_METADATA = frozenset(
    {"dtype", "device", "shape", "size", "ndim", "dim", "numel", "requires_grad", "layout", "is_meta", "data_ptr"}
)
#: Built-ins that test a weight rather than compute with it.
_TESTS = frozenset({"isinstance", "hasattr", "getattr", "type", "id"})


@dataclass(frozen=True)
class Uses:
    """What one class's forward path does with its modules, by their path below ``self``.

    Attributes:
        reads: module path -> where its weight is read as a value (``"Class.method"``).
        calls: module paths the forward path calls, or hands to code that may call them.
    """

    reads: Mapping[str, str] = field(default_factory=dict)
    calls: frozenset[str] = frozenset()


_CACHE: weakref.WeakKeyDictionary[type, Uses] = weakref.WeakKeyDictionary()


def class_uses(cls: type, sources: Sources | None = None) -> Uses:
    """The :class:`Uses` of ``cls``'s forward path (cached per class)."""
    uses = _CACHE.get(cls)
    if uses is None:
        uses = _CACHE[cls] = _scan_class(cls, sources or Sources())
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
    where, called = None, False
    parts = name.split(".")
    for depth in range(len(parts)):
        owner = modules.get(".".join(parts[:depth]))
        if owner is None:
            continue
        uses = class_uses(type(owner), sources)
        rel = ".".join(parts[depth:])
        if rel in uses.reads and where is None:
            where = f"{uses.reads[rel]} reads self.{rel}.weight"
        called = called or rel in uses.calls
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
    kept; the syntax trees go with this object). Each function's own lines are parsed where
    they can be found (a file such as diffusers' ``attention_processor.py`` holds thousands of
    lines, most never on a target's path), else its module's whole file, once."""

    def __init__(self) -> None:
        self._own: dict[tuple[str, str], ast.FunctionDef | ast.AsyncFunctionDef | None] = {}
        self._index: dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]] = {}

    def function(self, module_name: str, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        """The definition of the function or method ``qualname`` in module ``module_name``."""
        key = (module_name, qualname)
        if key not in self._own:
            self._own[key] = _own_source(module_name, qualname)
        node = self._own[key]
        if node is not None:
            return node
        index = self._index.get(module_name)
        if index is None:
            index = self._index[module_name] = _functions(sys.modules.get(module_name))
        return index.get(qualname)


def _own_source(module_name: str, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The definition of the function ``qualname`` of module ``module_name`` parsed from its own
    lines: the object found under that name (through ``functools.wraps`` decorators) must be a
    function of that module by that qualified name, and its lines one definition of that name;
    None otherwise (the caller parses the whole file then)."""
    obj: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
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


def _functions(module: object) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method of a module's source, by qualified name (none where its
    source cannot be read)."""
    try:
        tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
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


def _scan_class(cls: type, sources: Sources) -> Uses:
    reads: dict[str, str] = {}
    calls: set[str] = set()
    todo, seen = ["forward"], set()
    while todo:
        method = todo.pop()
        if method in seen:
            continue
        seen.add(method)
        for klass in cls.__mro__:
            if klass in (object, nn.Module) or method not in vars(klass):
                continue
            node = sources.function(klass.__module__, f"{klass.__qualname__}.{method}")
            receiver = _receiver(node)
            if node is None or receiver is None:
                continue
            found = _scan_function(node, receiver, klass.__module__, sources, own=True)
            for path in found.reads:
                reads.setdefault(path, f"{klass.__name__}.{method}")
            calls |= found.calls
            todo += sorted(found.methods)
    return Uses(reads, frozenset(calls))


@dataclass
class _Found:
    reads: set[str] = field(default_factory=set)
    calls: set[str] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)


def _receiver(node: ast.AST | None) -> str | None:
    """The name a method's source gives its instance (its first parameter, ``self`` by custom
    but any name by the language); None for no source, a static or class method, or none."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    if any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in node.decorator_list):
        return None
    params = [*node.args.posonlyargs, *node.args.args]
    return params[0].arg if params else None


def _scan_function(
    fn: ast.AST, root: str, module_name: str, sources: Sources, depth: int = 0, own: bool = False
) -> _Found:
    """Reads and calls of ``root.<path>`` in one function; ``root`` is the method's own instance
    (``own``: its first parameter, ``self`` by custom) or the parameter a module was handed in as."""
    found = _Found()
    parents = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and node.attr == "weight" and isinstance(node.ctx, ast.Load):
            path = _path(node.value, root, own)
            if path is not None and _is_value(node, parents):
                found.reads.add(path)
        elif isinstance(node, ast.Call):
            func = node.func
            called = _path(func, root, own)
            if called is None and isinstance(func, ast.Attribute) and func.attr == "forward":
                called = _path(func.value, root, own)
            if called is not None:
                if own and "." not in called:
                    found.methods.add(called)
                found.calls.add(called)
            for position, arg in _arguments(node):
                handed = _path(arg, root, own)
                if handed is not None:
                    inner = _handed(func, position, module_name, sources) if not depth else None
                    if inner is None or "" in inner.calls:
                        found.calls.add(handed)
                    if inner is not None and "" in inner.reads:
                        found.reads.add(handed)
    return found


def _handed(func: ast.expr, position: int | str, module_name: str, sources: Sources) -> _Found | None:
    """What a module-level function does with the module given as its argument ``position``
    (its reads and calls of ``""``, the module itself); None where it cannot be read."""
    if not isinstance(func, ast.Name):
        return None
    target = getattr(sys.modules.get(module_name), func.id, None)
    if not inspect.isfunction(target):
        return None
    node = sources.function(target.__module__, target.__qualname__)
    if node is None:
        return None
    params = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
    kwonly = [a.arg for a in node.args.kwonlyargs]
    if isinstance(position, int):
        name = params[position] if position < len(params) else None
    else:
        name = position if position in params or position in kwonly else None
    if name is None:
        return None
    return _scan_function(node, name, target.__module__, sources, depth=1)


def _arguments(call: ast.Call) -> Iterator[tuple[int | str, ast.expr]]:
    yield from enumerate(call.args)
    for keyword in call.keywords:
        if keyword.arg is not None:
            yield keyword.arg, keyword.value


def _path(node: ast.expr, root: str, own: bool = False) -> str | None:
    """``"a.b"`` for the expression ``<root>.a.b``; ``""`` for ``<root>`` itself (None where
    ``root`` is the method's own instance); else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id != root:
        return None
    if own and not names:
        return None
    return ".".join(reversed(names))


def _is_value(node: ast.Attribute, parents: Mapping[ast.AST, ast.AST]) -> bool:
    """Whether ``<x>.weight`` is used as a value, not described or tested."""
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute):
        return parent.attr not in _METADATA
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id in _TESTS:
        return False
    return not (isinstance(parent, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops))
