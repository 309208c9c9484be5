"""The README's Python examples run as written, and its API names are lorahot's.

Every ```` ```python ```` block of ``README.md`` runs here, in a fresh directory, as a new user
would paste it after the Usage block's ``import torch, lorahot``. What the README leaves to the
reader is made by rule from what a block reads and does not define:

- ``model`` / ``build_model()``: a tiny Llama built from a config (``ids`` / ``inputs``: token ids
  of 5 rows); with ``mesh`` read too, the Llama's decoder (its layers named ``layers.N``) and a
  one-process gloo group's CPU mesh;
- ``pipe`` / ``prompt``: a tiny SDXL pipeline (a tiny Flux.1 one where the block reads
  ``pipe.transformer``), its calls at 1 step on an 8x8 latent;
- every adapter a string names (``load``, ``preload``, ``prefetch``, ``plan_targets``) and
  ``paths`` / ``adapters`` / ``targets``: random LoRAs written there, PEFT-named for the Llama;
  for the SDXL pipeline diffusers-named over its UNet and text encoders, kohya-named where the
  name says ``kohya``, over the UNet alone where it says ``unet_only``; for Flux over its
  transformer.

``torch.compile`` runs with the ``aot_eager`` backend (as the examples do on the CPU): inductor
would compile for minutes here, and the compile contract is ``tests/system/test_compile.py``'s.
A block that cannot run on this machine says why in its fence's info string,
```` ```python not-run: <reason> ````, and is skipped by that rule. An example of ``lorahot
inspect`` (a block opening with ``$ lorahot inspect``) is what the command prints on the file its
own table describes.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
import lorahot.cli
from tests.helpers import make_adapter, save_peft, tiny_llama

README = Path(__file__).resolve().parents[2] / "README.md"
NOT_RUN = "not-run:"
#: The runtime calls whose first argument names adapters (one, or a list of them).
ADAPTER_CALLS = {"load", "preload", "prefetch", "plan_targets"}
LLM_TARGETS = ["q_proj", "v_proj"]
WORDS = ["a", "photo", "of", "cat", "dog", "in", "the", "style"]
UNET_TARGETS = ["to_q", "to_v"]


@dataclass(frozen=True)
class Block:
    """One fenced block: the README line of its opening fence, its info string, its text."""

    line: int
    info: str
    source: str


def _blocks() -> list[Block]:
    blocks, opened, body = [], None, []
    for number, text in enumerate(README.read_text().splitlines(), start=1):
        if not text.startswith("```"):
            body.append(text)
        elif opened is None:
            opened, body = (number, text[3:].strip()), []
        else:
            blocks.append(Block(opened[0], opened[1], "\n".join(body) + "\n"))
            opened = None
    assert opened is None, f"README.md:{opened[0]}: a fence is never closed"
    return blocks


PYTHON = [b for b in _blocks() if b.info.split()[:1] == ["python"]]


def _free_names(source: str) -> set[str]:
    """The names a block reads and never binds (nor imports), builtins left out."""
    tree = ast.parse(source)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
            bound.update(a.arg for a in node.args.args + node.args.kwonlyargs)
    return read - bound - set(dir(builtins))


def _adapter_names(source: str) -> list[str]:
    """The adapters a block names as strings in the calls that read adapters."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ADAPTER_CALLS:
                first = node.args[0]
                for item in first.elts if isinstance(first, (ast.List, ast.Tuple)) else [first]:
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        names.append(item.value)
    return list(dict.fromkeys(names))


# -- what the README leaves to the reader ---------------------------------------------------


def _write(tensors: dict[str, torch.Tensor], where: str) -> str:
    """A file where the name ends in .safetensors, else a PEFT directory (config beside it)."""
    path = Path(where)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        save_peft(path, tensors, r=4, lora_alpha=8)
    return where


def _llm_adapter(model: nn.Module, where: str, seed: int) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in LLM_TARGETS]
    tensors, _ = make_adapter(model, dict.fromkeys(names, 4), seed=seed)
    return _write(tensors, where)


def _linear_loras(model: nn.Module, targets: list[str], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """Random rank-4 factors on ``model``'s Linears named ``targets``, keyed ``prefix.<name>.lora_A/B``."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out[f"{prefix}.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            out[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    return out


def _pipeline_adapter(pipe: Any, where: str, seed: int) -> str:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    tensors = _linear_loras(getattr(pipe, denoiser), UNET_TARGETS, denoiser, seed)
    if denoiser == "unet" and "unet_only" not in where:
        for component in ("text_encoder", "text_encoder_2"):
            if isinstance(getattr(pipe, component, None), nn.Module):
                tensors |= _linear_loras(getattr(pipe, component), LLM_TARGETS, component, seed + 1)
    if "kohya" in where:
        tensors = convert_state_dict_to_kohya(tensors)
    return _write(tensors, where)


def _transformers() -> Any:
    return importlib.import_module("transformers")


def _tokenizer() -> Any:
    """A word-level tokenizer of a few words, built in memory (CLIP's needs its vocabulary files)."""
    import tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=8, pad_token="<eos>", eos_token="<eos>", unk_token="<unk>"
    )


def _clip(cls: str) -> nn.Module:
    config = _transformers().CLIPTextConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    model: nn.Module = getattr(_transformers(), cls)(config).eval()
    return model


def _tiny_sdxl() -> Any:
    import diffusers

    class TinySDXL(diffusers.StableDiffusionXLPipeline):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("num_inference_steps", 1)
            return super().__call__(*args, **kwargs)

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    return TinySDXL(
        vae=vae,
        text_encoder=_clip("CLIPTextModel"),
        text_encoder_2=_clip("CLIPTextModelWithProjection"),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
    )


def _tiny_flux() -> Any:
    import diffusers

    class TinyFlux(diffusers.FluxPipeline):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            for key, value in (("num_inference_steps", 1), ("height", 16), ("width", 16), ("max_sequence_length", 8)):
                kwargs.setdefault(key, value)
            return super().__call__(*args, **kwargs)

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    t5 = (
        _transformers()
        .T5EncoderModel(_transformers().T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
        .eval()
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return TinyFlux(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_clip("CLIPTextModel"),
        tokenizer=_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_tokenizer(),
        transformer=transformer,
    )


@pytest.fixture
def aot_eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` with the ``aot_eager`` backend, whatever mode or backend is asked for."""
    compile_ = torch.compile

    def compile_with_aot_eager(model: Any = None, **options: Any) -> Any:
        options.pop("mode", None)
        options["backend"] = "aot_eager"
        return compile_(model, **options) if model is not None else compile_(**options)

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[Any]:
    """A one-process gloo group and its 1-D CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _namespace(block: Block, request: pytest.FixtureRequest) -> dict[str, Any]:
    """What the block reads and does not define, built by the rules of the module docstring."""
    free = _free_names(block.source)
    ns: dict[str, Any] = {"torch": torch, "lorahot": lorahot}
    if "pipe" in free:
        pipe = _tiny_flux() if "pipe.transformer" in block.source else _tiny_sdxl()
        ns |= {"pipe": pipe, "prompt": "a photo of a cat"}
        write = lambda where, seed: _pipeline_adapter(pipe, where, seed)  # noqa: E731
    else:
        model, reference = tiny_llama(), tiny_llama()
        if "mesh" in free:
            ns["mesh"] = request.getfixturevalue("process_group")
            model = model.model  # the decoder: its layers are named layers.N, as the block names them
        ns |= {"model": model, "build_model": lambda: model, "targets": LLM_TARGETS}
        ns["ids"] = ns["inputs"] = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(0))
        write = lambda where, seed: _llm_adapter(reference, where, seed)  # noqa: E731
    for seed, where in enumerate(_adapter_names(block.source)):
        write(where, seed)
    if "paths" in free:
        ns["paths"] = [write(f"adapter_{k}", 10 + k) for k in range(8)]
    if "adapters" in free:
        ns["adapters"] = {name: write(name, 20 + k) for k, name in enumerate(("style", "persona", "support"))}
    missing = free - ns.keys()
    assert not missing, f"README.md:{block.line}: no rule here gives the block {sorted(missing)}"
    return ns


@pytest.mark.parametrize("block", PYTHON, ids=[f"line-{b.line}" for b in PYTHON])
@pytest.mark.usefixtures("one_torch_thread")
def test_readme_python_block_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    reason = block.info.split(maxsplit=1)[1] if len(block.info.split()) > 1 else ""
    if reason.startswith(NOT_RUN):
        assert reason[len(NOT_RUN) :].strip(), f"README.md:{block.line}: say why the block is not run"
        pytest.skip(reason)
    assert not reason, f"README.md:{block.line}: unknown fence info {block.info!r} (use '{NOT_RUN} <reason>')"
    pytest.importorskip("transformers")
    if "pipe" in _free_names(block.source):
        pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    request.getfixturevalue("aot_eager_compile")
    ns = _namespace(block, request)
    code = compile("\n" * block.line + block.source, str(README), "exec")  # tracebacks give README lines
    exec(code, ns)


def test_every_public_name_is_in_the_readme() -> None:
    text = README.read_text()
    missing = [name for name in lorahot.__all__ if not re.search(rf"`[^`\n]*\b{name}\b[^`\n]*`", text)]
    assert not missing, f"lorahot.__all__ names the README never shows: {missing}"


def test_every_lorahot_name_the_readme_shows_exists() -> None:
    unknown = []
    for dotted in sorted(set(re.findall(r"\blorahot(?:\.[A-Za-z_]\w*)+", README.read_text()))):
        parts, obj = dotted.split("."), None
        for end in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:end]))
            except ImportError:
                continue
            for attr in parts[end:]:
                obj = getattr(obj, attr, None)
            break
        if obj is None:
            unknown.append(dotted)
    assert not unknown, f"the README shows names lorahot does not have: {unknown}"


#: The entry points whose calls and signatures the README writes out, by the name it calls them.
ENTRY_POINTS: dict[str, Any] = {
    name: getattr(lorahot, name) for name in ("inject", "eject", "plan_targets", "read_adapter")
}
ENTRY_POINTS |= {
    name: getattr(lorahot.LoraRuntime, name)
    for name in ("load", "preload", "prefetch", "set_scale", "activate", "unload", "info")
}
#: A backticked call or signature: `inject(...)`, `lorahot.plan_targets(...) -> TargetPlan`,
#: `runtime.load(...)`; a bullet that opens with one documents that signature.
CALL = re.compile(r"(^- )?(?<![\w.])`((?:lorahot\.|runtime\.)?)(\w+)\(([^`]*?)\)(?: -> [^`]*)?`", re.M)


def _arguments(text: str) -> list[str]:
    """``text`` cut at its top-level commas."""
    pieces, depth, piece = [], 0, ""
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            pieces.append(piece)
            piece = ""
        else:
            piece += ch
    return [p.strip() for p in [*pieces, piece] if p.strip()]


def test_the_readme_calls_lorahot_with_its_own_parameter_names() -> None:
    """Every keyword a backticked call passes is a parameter (a load's, preload's or
    plan_targets' read options: read_adapter's), and a documented signature names the
    parameters in their order."""
    read_options = set(inspect.signature(lorahot.read_adapter).parameters) - {"source"}
    text, wrong = README.read_text(), []
    for match in CALL.finditer(text):
        bullet, _, name, arguments = match.groups()
        if name not in ENTRY_POINTS:
            continue
        params = [p for p in inspect.signature(ENTRY_POINTS[name]).parameters.values() if p.name != "self"]
        takes = {p.name for p in params}
        if any(p.kind is p.VAR_KEYWORD for p in params):
            takes |= {o for o in read_options if not o.startswith("_")}
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        written, keyword_only = [], False
        for piece in _arguments(arguments):
            keyword = re.match(r"(\w+)\s*=(?!=)", piece)
            bare = re.fullmatch(r"\w+", piece) is not None
            named = keyword.group(1) if keyword else piece if bullet and bare and keyword_only else None
            if piece == "*":
                keyword_only = True
            elif named is not None and named not in takes:
                wrong.append(f"{name}() takes no {named}: {match.group(0)}")
            elif bullet and bare and not keyword_only:
                written.append(piece)
        if bullet and written != positional[: len(written)]:
            wrong.append(f"{name}() takes {positional}, the README writes {written}: {match.group(0)}")
    assert not wrong, "\n".join(wrong)


def _inspect_examples() -> list[Block]:
    return [b for b in _blocks() if b.source.startswith("$ lorahot inspect ")]


@pytest.mark.parametrize("block", _inspect_examples(), ids=lambda b: f"line-{b.line}")
def test_readme_inspect_example_is_what_lorahot_inspect_prints(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example's file is written back from its own table (each module's A and B shapes, its
    alpha, the dtype), and ``lorahot inspect`` on it prints the example, line for line."""
    command, *printed = block.source.rstrip("\n").split("\n")
    source = command.removeprefix("$ lorahot inspect ")
    dtype = getattr(torch, re.search(r"^dtypes:\s+(\w+)", block.source, re.M).group(1))  # type: ignore[union-attr]
    header = next(i for i, line in enumerate(printed) if line.startswith("module "))
    tensors = {}
    for row in printed[header + 1 :]:
        module, kind, _, alpha, _, a, b = row.split()
        assert kind == "lora", f"README.md:{block.line}: write {kind} modules back here"
        for name, shape in (("lora_down.weight", a), ("lora_up.weight", b)):
            tensors[f"{module}.{name}"] = torch.ones(*map(int, shape.split("x")), dtype=dtype)
        tensors[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    monkeypatch.chdir(tmp_path)
    save_file(tensors, source)
    assert lorahot.cli.main(["inspect", source]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n") == printed


def test_every_attribute_the_readme_reads_exists() -> None:
    """``runtime.<name>``, ``plan.<name>``, ``info.<name>`` and ``<Class>.<name>`` of lorahot's
    public classes, as the README writes them in code, are attributes lorahot has."""
    runtime = lorahot.inject(nn.Sequential(nn.Linear(4, 4)), ["0"], max_rank=2)
    owners: dict[str, Any] = {"runtime": runtime, "plan": lorahot.TargetPlan, "info": lorahot.AdapterInfo}
    owners |= {name: getattr(lorahot, name) for name in lorahot.__all__ if isinstance(getattr(lorahot, name), type)}
    attribute = re.compile(rf"(?<![\w./])({'|'.join(owners)})\.(?!py\b)([A-Za-z_]\w*)")  # not info.py
    missing = set()
    for code in re.findall(r"`([^`\n]+)`", README.read_text()):
        for owner, name in attribute.findall(code):
            has = hasattr(owners[owner], name) or (
                dataclasses.is_dataclass(owners[owner]) and name in {f.name for f in dataclasses.fields(owners[owner])}
            )
            if not has:
                missing.add(f"{owner}.{name}")
    assert not missing, f"the README reads attributes lorahot does not have: {sorted(missing)}"


def test_every_test_and_test_file_the_readme_cites_exists() -> None:
    """A test the README gives as evidence (``test_name``, ``test_name[case]``, a ``test_prefix_*``
    glob, a ``tests/...py`` path) is one the suite has, so a renamed or removed test cannot leave
    a claim pointing at nothing."""
    root = README.parent
    text = README.read_text()
    tests = list((root / "tests").rglob("*.py"))
    defined = {m for p in tests for m in re.findall(r"^\s*(?:async )?def (test_\w+)", p.read_text(), re.M)}
    modules = {p.stem for p in tests}
    cited = set(re.findall(r"\b(test_\w+)(\*?)", text))
    missing = [
        name + star
        for name, star in sorted(cited)
        if not (star and any(d.startswith(name) for d in defined | modules)) and name not in defined | modules
    ]
    absent = sorted(p for p in set(re.findall(r"\btests/[\w/]+\.py\b", text)) if not (root / p).is_file())
    assert not missing and not absent, f"the README cites tests that do not exist: {missing + absent}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_reaches_a_heading() -> None:
    """A ``[text](#anchor)`` link names a heading the README has, so a renamed section cannot
    leave its entry in "Where to look" pointing nowhere."""
    text = README.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "the README links none of its own sections"
    assert links <= anchors, f"links to no heading: {sorted(links - anchors)}"
