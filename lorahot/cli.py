"""``lorahot inspect PATH_OR_REPO``: what an adapter holds, without a model.

Prints the detected format, module count, the kind of each module (LoRA, or LoHa, LoKr,
Tucker LoCon and diffs, which load only into a runtime injected with ``merged=True``), modules
per component prefix, ranks, alphas, dtypes, total bytes, the keys ``--no-strict`` skipped and
a table of module paths; ``--json`` prints the same as one JSON object. Names from the file are printed
escaped (control characters, lone surrogates), so any name prints.

A bad file or argument exits with status 2 and one line on stderr (``lorahot: error: ...``),
never a traceback; a reader that closes the pipe early (``| head -1``) ends it quietly. While
it reads, ``huggingface_hub``'s progress bars, log records and Python warnings are held back
(unless ``HF_HUB_DISABLE_PROGRESS_BARS=0`` or ``HF_HUB_VERBOSITY`` asks for them), so that
stderr holds that line alone; their settings are restored when it returns.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from lorahot.adapter import Adapter, LoraModule, WeightModule
from lorahot.errors import LoraError, printable
from lorahot.formats import KeyFormat, format_named
from lorahot.io.loader import read_adapter

__all__ = ["main", "summarize"]


def summarize(adapter: Adapter) -> dict[str, Any]:
    """The facts ``inspect`` prints, as plain data: dtypes and bytes as the source stores them
    (a float8 file's, which the reader widens to float32: :attr:`Adapter.stored_dtypes`)."""
    fmt = format_named(adapter.format)
    stored = _Stored(adapter, fmt)
    modules = [
        {
            "module": key,
            "kind": _lora_kind(m),
            "rank": m.rank,
            "alpha": m.alpha,
            "scale": m.scale,
            "A": list(m.A.shape),
            "B": list(m.B.shape),
            "dtype": _dtype_name(stored.dtype(m, "A", m.A)),
        }
        for key, m in adapter.modules.items()
    ] + [_weight_row(key, w, stored) for key, w in adapter.weights.items()]
    prefixes = fmt.prefixes
    return {
        "source": adapter.source,
        "format": adapter.format,
        "modules": len(modules),
        "kinds": _counts(m["kind"] for m in modules),
        "merged_only": sorted({w.kind for w in adapter.weights.values()}),
        "needs_extras": sorted({k for k in map(_lora_kind, adapter.modules.values()) if k != "lora"}),
        "components": _counts(next((p for p in prefixes if m["module"].startswith(p)), "-") for m in modules),
        "ranks": _counts(m["rank"] for m in modules),
        "alphas": _counts(m["alpha"] for m in modules),
        "dtypes": _counts(m["dtype"] for m in modules),
        "rslora": any(m.use_rslora for m in adapter.modules.values()),
        "bytes": stored.nbytes(),
        "skipped": list(adapter.skipped),
        "table": modules,
    }


def _lora_kind(m: LoraModule) -> str:
    """``lora``, or ``dora`` / ``lora+bias`` / ``dora+bias`` for a module with a DoRA magnitude
    or a LoRA bias (which run unmerged only with ``inject(..., extras=True)``)."""
    kind = "dora" if m.magnitude is not None else "lora"
    return kind + "+bias" if m.bias is not None else kind


class _Stored:
    """The dtype each tensor of ``adapter`` has in its source: a module tensor's own, or, where
    the tensors of its role (``A``, ``B``, a factor's name) among the module's ``source_keys``
    were widened as read (:attr:`Adapter.stored_dtypes`), the one dtype they were stored in."""

    def __init__(self, adapter: Adapter, fmt: KeyFormat) -> None:
        self.adapter, self.fmt = adapter, fmt

    def dtype(self, m: LoraModule | WeightModule, role: str, t: torch.Tensor) -> torch.dtype:
        if not self.adapter.stored_dtypes:
            return t.dtype
        found = {
            self.adapter.stored_dtypes[k]
            for k in m.source_keys
            if k in self.adapter.stored_dtypes and (parsed := self.fmt.parse(k)) is not None and parsed[1] == role
        }
        return found.pop() if len(found) == 1 else t.dtype

    def nbytes(self) -> int:
        """Bytes of the LoRA weights A and B and of the weight modules' factors, as stored (as
        :attr:`Adapter.nbytes` counts them)."""
        lora = sum(
            t.numel() * self.dtype(m, role, t).itemsize
            for m in self.adapter.modules.values()
            for role, t in (("A", m.A), ("B", m.B))
        )
        factors = ((w, name, t) for w in self.adapter.weights.values() for name, t in w.factors.items())
        return lora + sum(t.numel() * self.dtype(w, name, t).itemsize for w, name, t in factors)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weight_row(key: str, w: WeightModule, stored: _Stored) -> dict[str, Any]:
    """A LyCORIS/diff module's row: its factors' shapes stand where a LoRA's A and B do."""
    name, first = next(iter(w.factors.items()))
    return {
        "module": key,
        "kind": w.kind,
        "rank": w.rank,
        "alpha": _weight_alpha(w),
        "scale": w.scale,
        "factors": {k: list(t.shape) for k, t in w.factors.items()},
        "dtype": _dtype_name(stored.dtype(w, name, first)),
    }


def _weight_alpha(w: WeightModule) -> float | None:
    """The alpha a weight module's scale is read from: its ``.alpha``, else its rank (LyCORIS'
    default); None where it has none (a diff, a LoKr of whole factors without ``.alpha``: its
    scale is 1)."""
    if w.alpha is not None:
        return w.alpha
    return float(w.rank) if w.rank else None


def _counts(values: Any) -> dict[str, int]:
    counted = Counter(values)
    return {_num(v): counted[v] for v in sorted(counted, key=lambda v: (v is None, 0 if v is None else v))}


def _num(v: Any) -> str:
    """A number as printed; ``-`` for none (a module without an alpha)."""
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _escaped(text: str) -> str:
    """``text`` on one line: every unprintable character (newlines too) as its Python escape."""
    return printable(text, keep="")


def _render(s: dict[str, Any]) -> str:
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} (x{n})" for k, n in d.items())

    lines = [
        f"source:  {_escaped(s['source'])}",
        f"format:  {s['format']}",
        f"modules: {s['modules']}",
        f"kinds:   {counts(s['kinds'])}"
        + (f"  ({', '.join(s['merged_only'])}: load with inject(..., merged=True))" if s["merged_only"] else "")
        + (
            f"  ({', '.join(s['needs_extras'])}: load unmerged with inject(..., extras=True))"
            if s["needs_extras"]
            else ""
        ),
        f"components: {counts({_escaped(k): n for k, n in s['components'].items()})}",
        f"ranks:   {counts(s['ranks'])}",
        f"alphas:  {counts(s['alphas'])}" + ("  (rsLoRA: alpha / sqrt(r))" if s["rslora"] else ""),
        f"dtypes:  {counts(s['dtypes'])}",
        f"bytes:   {s['bytes']:,}",
        *([f"skipped: {len(s['skipped'])} keys: {', '.join(map(_escaped, s['skipped']))}"] if s["skipped"] else []),
        "",
    ]
    rows = [("module", "kind", "rank", "alpha", "scale", "A", "B")] + [
        (
            _escaped(m["module"]),
            m["kind"],
            str(m["rank"]),
            _num(m["alpha"]),
            f"{m['scale']:.4g}",
            *_shapes(m),
        )
        for m in s["table"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit status 2), not the usage text."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see lorahot inspect --help)")


def _fail(message: str) -> NoReturn:
    """Exits with status 2 after writing ``message`` as one escaped line on stderr (the status
    stands where stderr cannot be written: closed, or a full disk)."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    try:
        sys.stderr.write(f"lorahot: error: {_escaped(line)}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed or full: the status still says it
        pass
    raise SystemExit(2)


def _shapes(row: dict[str, Any]) -> tuple[str, str]:
    """The A and B columns: a LoRA's shapes, or a weight kind's factors (``name=shape``)."""
    if "factors" in row:  # a 0-d factor ((IA)^3's on_input) shows its shape as ()
        return " ".join(f"{k}={'x'.join(map(str, v)) or '()'}" for k, v in row["factors"].items()), ""
    return "x".join(map(str, row["A"])), "x".join(map(str, row["B"]))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lorahot", description="Inspect LoRA adapters (lorahot).")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="show what an adapter holds")
    ins.add_argument("source", help="adapter directory, .safetensors file, or Hub repo id")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--weight-name", help="weight file inside the directory or repo")
    ins.add_argument("--subfolder", help="folder inside the directory or repo")
    ins.add_argument("--revision", help="Hub branch, tag or commit")
    ins.add_argument(
        "--no-strict", action="store_true", help="skip keys lorahot cannot load (listed as skipped) instead of failing"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorahot`` console script: returns the exit status, or exits.

    0: printed; 1: stdout was closed early; ``SystemExit(2)``: a bad file or argument (one
    line on stderr).
    """
    if hasattr(sys.stdout, "reconfigure"):  # a name the terminal's encoding lacks prints escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        args = _parser().parse_args(argv)
        with _quiet_hub():
            text = _inspect(args)
    except LoraError as exc:
        _fail(str(exc))
    except Exception as exc:  # a last resort: still one line, never a traceback
        _fail(f"unexpected {type(exc).__name__}: {exc}")
    return _write(text)


def _inspect(args: argparse.Namespace) -> str:
    adapter = read_adapter(
        args.source,
        weight_name=args.weight_name,
        subfolder=args.subfolder,
        revision=args.revision,
        strict=not args.no_strict,
    )
    summary = summarize(adapter)
    return json.dumps(summary, indent=2) if args.json else _render(summary)


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """Holds back ``huggingface_hub``'s progress bars and log records, and every Python warning,
    for the ``with`` block; restores the process-wide settings it changed when the block ends.

    An environment variable the user set (``HF_HUB_DISABLE_PROGRESS_BARS=0``,
    ``HF_HUB_VERBOSITY``) keeps what it asks for.
    """
    with warnings.catch_warnings():  # scoped: the filters in force before come back on exit
        warnings.simplefilter("ignore")
        try:
            bars = importlib.import_module("huggingface_hub.utils.tqdm")
            # imported now, since importing it sets the library's log level (a fetch would
            # import it first, after the level set here)
            importlib.import_module("huggingface_hub.utils.logging")
        except ImportError:  # no huggingface_hub: nothing of it to quiet
            yield
            return
        states = getattr(bars, "progress_bar_states", None)
        saved = dict(states) if isinstance(states, dict) else None
        were_disabled = bars.are_progress_bars_disabled()
        logger = logging.getLogger("huggingface_hub")
        level = logger.level
        bars.disable_progress_bars()  # a no-op (and a warning, ignored) under HF_HUB_DISABLE_PROGRESS_BARS=0
        if not os.environ.get("HF_HUB_VERBOSITY"):
            logger.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            logger.setLevel(level)
            if saved is not None and isinstance(states, dict):
                states.clear()
                states.update(saved)
            elif not were_disabled:
                bars.enable_progress_bars()


def _write(text: str) -> int:
    """Writes ``text`` to stdout; 1, quietly, if the reader has gone (``| head -1``); 1, with a
    line on stderr, if stdout cannot be written (closed, ``>&-``; a full disk, ``>/dev/full``)."""
    out = sys.stdout
    try:
        if out is None:
            raise OSError("stdout is closed")
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point stdout at
        # /dev/null so that flush succeeds (the Python docs' recipe for SIGPIPE).
        _silence_stdout()
        return 1
    except (OSError, ValueError) as exc:  # ValueError: a closed file object
        _silence_stdout()
        if sys.stderr is not None:
            sys.stderr.write(f"lorahot: cannot write the output: {exc}\n")
        return 1
    return 0


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that Python's flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
    except OSError:
        pass
