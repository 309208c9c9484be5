"""``lorahot inspect PATH_OR_REPO``: what an adapter holds, without a model.

Prints the detected format, module count, ranks, alphas, dtypes, total bytes and a table of
module paths; ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from lorahot.adapter import Adapter
from lorahot.errors import LoraError
from lorahot.io.loader import read_adapter

__all__ = ["main", "summarize"]


def summarize(adapter: Adapter) -> dict[str, Any]:
    """The facts ``inspect`` prints, as plain data."""
    modules = [
        {
            "module": key,
            "rank": m.rank,
            "alpha": m.alpha,
            "scale": m.scale,
            "A": list(m.A.shape),
            "B": list(m.B.shape),
            "dtype": str(m.A.dtype).removeprefix("torch."),
        }
        for key, m in adapter.modules.items()
    ]
    return {
        "source": adapter.source,
        "format": adapter.format,
        "modules": len(modules),
        "ranks": _counts(m["rank"] for m in modules),
        "alphas": _counts(m["alpha"] for m in modules),
        "dtypes": _counts(m["dtype"] for m in modules),
        "rslora": any(m.use_rslora for m in adapter.modules.values()),
        "bytes": adapter.nbytes,
        "table": modules,
    }


def _counts(values: Any) -> dict[str, int]:
    return {_num(v): n for v, n in sorted(Counter(values).items())}


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _render(s: dict[str, Any]) -> str:
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} (x{n})" for k, n in d.items())

    lines = [
        f"source:  {s['source']}",
        f"format:  {s['format']}",
        f"modules: {s['modules']}",
        f"ranks:   {counts(s['ranks'])}",
        f"alphas:  {counts(s['alphas'])}" + ("  (rsLoRA: alpha / sqrt(r))" if s["rslora"] else ""),
        f"dtypes:  {counts(s['dtypes'])}",
        f"bytes:   {s['bytes']:,}",
        "",
    ]
    rows = [("module", "rank", "alpha", "scale", "A", "B")] + [
        (
            m["module"],
            str(m["rank"]),
            _num(m["alpha"]),
            f"{m['scale']:.4g}",
            "x".join(map(str, m["A"])),
            "x".join(map(str, m["B"])),
        )
        for m in s["table"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorahot", description="Inspect LoRA adapters (lorahot).")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="show what an adapter holds")
    ins.add_argument("source", help="adapter directory, .safetensors file, or Hub repo id")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--weight-name", help="weight file inside the directory or repo")
    ins.add_argument("--subfolder", help="folder inside the directory or repo")
    ins.add_argument("--revision", help="Hub branch, tag or commit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorahot`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        adapter = read_adapter(
            args.source, weight_name=args.weight_name, subfolder=args.subfolder, revision=args.revision
        )
    except LoraError as exc:
        print(f"lorahot: error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(adapter)
    print(json.dumps(summary, indent=2) if args.json else _render(summary))
    return 0
