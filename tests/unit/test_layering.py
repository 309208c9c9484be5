"""The package's folders are layers: each imports only from the layers below it (and itself).

This pins the architecture the README describes, so a shortcut import shows up as a failure
rather than as a cycle months later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorahot

ROOT = Path(lorahot.__file__).parent

#: Layer of each top-level module or folder; imports may only go to a strictly lower layer.
LAYERS = {
    "errors": 0,
    "adapter": 0,
    "memo": 0,
    "formats": 1,
    "resolve": 2,
    "io": 3,
    "kernels": 3,
    "layers": 4,
    "runtime": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 7,
}


def _part(module: str) -> str:
    """``lorahot.io.loader`` -> ``io``; ``lorahot`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorahot"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("lorahot")]
    return found


def test_every_module_belongs_to_a_layer() -> None:
    tops = {
        p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert tops <= set(LAYERS), f"unassigned: {tops - set(LAYERS)}"
    modules = list(ROOT.glob("*.py"))
    assert len(modules) <= 6, f"at most six modules directly in lorahot/: {sorted(p.name for p in modules)}"


def test_imports_only_go_down_the_layers() -> None:
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        own = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"
        for target in _imports(path):
            other = _part(target)
            if other != own and LAYERS[other] >= LAYERS[own]:
                problems.append(f"{rel} ({own}, layer {LAYERS[own]}) imports {target} ({other}, layer {LAYERS[other]})")
    assert not problems, "\n".join(problems)
