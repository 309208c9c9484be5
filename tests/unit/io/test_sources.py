"""Opening sources: pickles refused unopened; only regular files opened, never waited on; paths
and arguments that cannot name an adapter refused with a typed error."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.reliability_helpers import within


def _peft(rank: int = 2) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.proj.lora_A.weight": torch.randn(rank, 8),
        "base_model.model.proj.lora_B.weight": torch.randn(6, rank),
    }


def test_pickles_are_refused(tmp_path: Path) -> None:
    for name in ("adapter.bin", "adapter.pt", "adapter.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(lorahot.AdapterReadError, match=r"lorahot never unpickles\. Convert it to \.safetensors"):
            lorahot.read_adapter(tmp_path / name)
    with pytest.raises(
        lorahot.AdapterReadError, match=r"holds only pickle checkpoints \(adapter\.bin, adapter\.ckpt, adapter\.pt\)"
    ):
        lorahot.read_adapter(tmp_path)


def _unblock(path: Path) -> None:
    """Lets a reader stuck in open() on the FIFO go (only needed when the check is missing)."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "only.safetensors", "adapter_config.json"])
def test_a_fifo_in_the_adapter_directory_is_refused_not_waited_on(tmp_path: Path, name: str) -> None:
    if name == "adapter_config.json":
        save_file(_peft(), tmp_path / "adapter_model.safetensors")
    os.mkfifo(tmp_path / name)
    what = "adapter config" if name.endswith(".json") else "safetensors file"
    try:
        with pytest.raises(
            lorahot.AdapterReadError, match=rf"{name}: the {what} is a FIFO \(named pipe\), not a regular file"
        ):
            within(10, lambda: lorahot.read_adapter(tmp_path))
    finally:
        _unblock(tmp_path / name)


def test_a_socket_in_the_adapter_directory_is_named_as_one(tmp_path: Path) -> None:
    """A socket cannot even be opened (ENXIO): the error still says what the file is, as for a
    FIFO, rather than that it cannot be found."""
    import socket

    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(tmp_path / "adapter_model.safetensors"))
        with pytest.raises(lorahot.AdapterReadError, match=r"safetensors file is a socket, not a regular file"):
            within(10, lambda: lorahot.read_adapter(tmp_path))
    finally:
        listener.close()


def test_special_files_as_the_source_or_the_weights(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.safetensors")
    try:
        with pytest.raises(lorahot.SourceNotFoundError, match=r"pipe\.safetensors: is a FIFO \(named pipe\), not an"):
            within(10, lambda: lorahot.read_adapter(tmp_path / "pipe.safetensors"))
    finally:
        _unblock(tmp_path / "pipe.safetensors")
    (tmp_path / "dir" / "adapter_model.safetensors").mkdir(parents=True)
    with pytest.raises(lorahot.AdapterReadError, match=r"safetensors file is a directory, not a regular file"):
        lorahot.read_adapter(tmp_path / "dir")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "adapter_model.safetensors").symlink_to("/dev/null")
    with pytest.raises(lorahot.AdapterReadError, match=r"safetensors file is a character device"):
        lorahot.read_adapter(tmp_path / "dev")


def test_a_config_that_is_there_but_unreadable_is_an_error_not_skipped(tmp_path: Path) -> None:
    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(lorahot.AdapterReadError, match=r"adapter_config\.json: is a dangling symlink"):
        lorahot.read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(lorahot.AdapterReadError, match=r"adapter config is a directory, not a regular file"):
        lorahot.read_adapter(tmp_path)


@pytest.mark.parametrize("source", ["", "   ", "\t\n"])
def test_an_empty_source_is_a_usage_error_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    monkeypatch.chdir(tmp_path)  # read_adapter("") used to load this one
    with pytest.raises(lorahot.UsageError, match=r"source=.* is empty\. Pass an adapter directory \('\.' for"):
        lorahot.read_adapter(source)
    assert lorahot.read_adapter(".").ranks == {"proj": 2}


def test_paths_the_system_cannot_look_up_name_the_path(tmp_path: Path) -> None:
    long_name = tmp_path / ("a" * 300 + ".safetensors")
    with pytest.raises(
        lorahot.SourceNotFoundError, match=r"/aaaa.*: cannot open the adapter path \(File name too long\)"
    ):
        lorahot.read_adapter(long_name)
    with pytest.raises(lorahot.SourceNotFoundError, match=r"cannot open the adapter path \(File name too long\)"):
        lorahot.read_adapter("b" * 5000)  # not a repo id either
    with pytest.raises(lorahot.SourceNotFoundError, match=r"cannot open the adapter path \(embedded null byte\)"):
        lorahot.read_adapter(str(tmp_path / "a\0b.safetensors"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_name": 5}, r"weight_name=5 must be a string"),
        ({"subfolder": ["a"]}, r"subfolder=\['a'\] must be a string"),
        ({"revision": 3}, r"revision=3 must be a branch, tag or commit name"),
        ({"token": 1.5}, r"token must be a string, True, False or None"),
        ({"device": "nonsense"}, r"device='nonsense' is not a usable torch device"),
        ({"config": [("r", 4)]}, r"config= must be a mapping of PEFT config fields"),
        ({"config": {"r": -1}}, r"config=: r must be an integer in 1\.\.65536, got -1\. Fix the config= argument"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.read_adapter("org/name", **kwargs)


def test_bytes_paths_are_refused() -> None:
    class BytesPath:
        def __fspath__(self) -> bytes:
            return b"/tmp"

    with pytest.raises(lorahot.UsageError, match=r"must be a str path, not bytes"):
        lorahot.read_adapter(BytesPath())  # type: ignore[arg-type]


def test_mapping_tensors_that_require_grad_are_read_as_values() -> None:
    """preload packs the tensors; autograd used to refuse (a leaf that requires grad)."""
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    tensors = {k: v.requires_grad_() for k, v in _peft().items()}
    adapter = lorahot.read_adapter(tensors)
    assert not adapter.modules["proj"].A.requires_grad
    prepared = runtime.preload(tensors)
    assert runtime.load(prepared).ranks == {"proj": 2}


def test_config_file_path_is_named_in_config_errors(tmp_path: Path) -> None:
    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": "two"}))
    with pytest.raises(lorahot.AdapterReadError, match=r"adapter_config\.json: invalid adapter config: r must be"):
        lorahot.read_adapter(tmp_path)


def test_a_directory_with_both_peft_and_diffusers_weights_is_refused_naming_both(tmp_path: Path) -> None:
    """A directory holding PEFT's adapter_model.safetensors and diffusers'
    pytorch_lora_weights.safetensors was read as the first, silently, where diffusers'
    load_lora_weights reads the second (two adapters here): a diffusers user got another
    adapter's numbers. It is now refused naming both and weight_name=, nothing changed; each
    loads by weight_name=, and either alone is read as before."""
    from diffusers.loaders.lora_base import _best_guess_weight_name
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

    from tests.reliability_helpers import Rig, assert_unchanged, snapshot

    both = tmp_path / "both"
    both.mkdir()
    save_file(_peft(2), both / "adapter_model.safetensors")
    save_file(_peft(3), both / "pytorch_lora_weights.safetensors")
    # the oracles' picks differ
    assert SAFETENSORS_WEIGHTS_NAME == "adapter_model.safetensors"
    assert _best_guess_weight_name(str(both)) == "pytorch_lora_weights.safetensors"
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4, slots=2)
    save_file(_peft(4), tmp_path / "loaded.safetensors")
    runtime.load(str(tmp_path / "loaded.safetensors"))
    rig = Rig(model, runtime, torch.randn(2, 8))
    before = snapshot(rig)
    message = (
        r"both: both adapter_model\.safetensors \(PEFT's PeftModel\.from_pretrained reads it\) and "
        r"pytorch_lora_weights\.safetensors \(diffusers' load_lora_weights reads it\) are there, maybe two adapters; "
        r"pass weight_name="
    )
    for call in (lorahot.read_adapter, runtime.load, runtime.preload, lambda s: runtime.load(s, slot=1)):
        with pytest.raises(lorahot.SourceNotFoundError, match=message):
            call(str(both))
        assert_unchanged(rig, before)
    assert len(runtime.cache) == 0
    for name, rank in (("adapter_model.safetensors", 2), ("pytorch_lora_weights.safetensors", 3)):
        assert lorahot.read_adapter(both, weight_name=name).modules["proj"].rank == rank
        alone = tmp_path / name.partition(".")[0]
        alone.mkdir()
        (both / name).rename(alone / name)
        assert lorahot.read_adapter(alone).modules["proj"].rank == rank
        (alone / name).rename(both / name)


def _diffusers_reads(
    source: str, subfolder: str | None = None, weight_name: str | None = None
) -> dict[str, torch.Tensor]:
    """What diffusers' load_lora_weights reads (its own _fetch_state_dict)."""
    from diffusers.loaders.lora_base import _fetch_state_dict

    state, _ = _fetch_state_dict(
        source, weight_name, True, False, None, False, None, None, None, subfolder, None, False
    )
    return state


@pytest.mark.parametrize(
    "files, subfolder, mine, theirs",
    [
        (["adapter_model.safetensors", "style_pytorch_lora_weights.safetensors"], None, "adapter_model", "style_py"),
        (["pytorch_lora_weights.safetensors", "sub/adapter_model.safetensors"], "sub", "sub/adapter_model", "pytorch"),
    ],
    ids=["a name ending in diffusers' name", "diffusers' name above the subfolder"],
)
def test_a_directory_where_diffusers_reads_another_file_is_refused_naming_both(
    tmp_path: Path, files: list[str], subfolder: str | None, mine: str, theirs: str
) -> None:
    """diffusers' load_lora_weights guesses by a rule of its own (any name ending in
    pytorch_lora_weights.safetensors, from the directory's own entries, read there before
    subfolder=), so it read one file where lorahot read PEFT's adapter_model.safetensors (another
    adapter), silently. Such a directory is now refused naming both files and weight_name=, nothing
    changed; diffusers' own loader is the oracle of its pick; a file diffusers leaves out
    (optimizer.safetensors) changes nothing."""
    from tests.reliability_helpers import Rig, assert_unchanged, snapshot

    for rank, name in enumerate(files, start=2):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        save_file(_peft(rank), tmp_path / name)
    read = _diffusers_reads(str(tmp_path), subfolder)
    assert read["base_model.model.proj.lora_A.weight"].shape[0] == 2 + [n.startswith(theirs) for n in files].index(True)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4, slots=2)
    save_file(_peft(4), tmp_path.parent / f"{tmp_path.name}-loaded.safetensors")
    runtime.load(str(tmp_path.parent / f"{tmp_path.name}-loaded.safetensors"))
    rig = Rig(model, runtime, torch.randn(2, 8))
    before = snapshot(rig)
    why, fix = (
        (r"it opens a file of that name in the directory before subfolder=", r"pass the folder itself, .*/sub, as")
        if subfolder
        else (r"its _best_guess_weight_name: ", r"pass weight_name=")
    )
    message = (
        rf"this read opens {mine}\.safetensors, but diffusers' load_lora_weights opens {theirs}\w*\.safetensors there "
        rf"\({why}.*\), maybe another adapter; {fix}"
    )
    kwargs = {"subfolder": subfolder} if subfolder else {}
    for call in (lorahot.read_adapter, runtime.load, runtime.preload, lambda s, **k: runtime.load(s, slot=1, **k)):
        with pytest.raises(lorahot.SourceNotFoundError, match=message):
            call(str(tmp_path), **kwargs)
        assert_unchanged(rig, before)
    assert len(runtime.cache) == 0
    assert lorahot.read_adapter(tmp_path, weight_name="adapter_model.safetensors", **kwargs).modules[
        "proj"
    ].rank == 2 + (subfolder is not None)


def test_a_cached_subfolder_read_is_read_again_once_diffusers_reads_a_file_above_it(tmp_path: Path) -> None:
    """Whether a read of subfolder= is refused depends on the directory's own entries (diffusers'
    guess, or weight_name=, opened there first): the host cache's key now covers them, so a file
    diffusers opens added above the subfolder makes a load read the source again and refuse it,
    not serve the cached adapter; nothing changed."""
    from tests.reliability_helpers import Rig, assert_unchanged, snapshot

    (tmp_path / "sub").mkdir()
    save_file(_peft(2), tmp_path / "sub" / "adapter_model.safetensors")
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4, slots=2)
    runtime.preload(str(tmp_path), subfolder="sub")
    runtime.load(str(tmp_path), subfolder="sub")
    rig = Rig(model, runtime, torch.randn(2, 8))
    before = snapshot(rig)
    save_file(_peft(3), tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(lorahot.SourceNotFoundError, match=r"diffusers' load_lora_weights opens pytorch_lora_weights"):
        runtime.load(str(tmp_path), subfolder="sub", slot=1)
    assert_unchanged(rig, before)
    named = {"subfolder": "sub", "weight_name": "adapter_model.safetensors"}
    runtime.preload(str(tmp_path), **named)
    before = snapshot(rig)
    save_file(_peft(3), tmp_path / "adapter_model.safetensors")
    with pytest.raises(lorahot.SourceNotFoundError, match=r"diffusers' load_lora_weights opens adapter_model"):
        runtime.load(str(tmp_path), slot=1, **named)
    assert_unchanged(rig, before)


def test_a_weight_name_in_a_subfolder_is_refused_where_diffusers_opens_the_one_above(tmp_path: Path) -> None:
    """diffusers' load_lora_weights(dir, weight_name=w, subfolder='x') opens dir/w where there is
    one (before dir/x/w), so it read another adapter than lorahot's dir/x/w, silently; refused now
    naming both and the fix (the folder itself as the source), and read where dir/w is no file."""
    (tmp_path / "x").mkdir()
    save_file(_peft(2), tmp_path / "x" / "adapter_model.safetensors")
    save_file(_peft(3), tmp_path / "adapter_model.safetensors")
    kwargs = {"weight_name": "adapter_model.safetensors", "subfolder": "x"}
    assert _diffusers_reads(str(tmp_path), **kwargs)["base_model.model.proj.lora_A.weight"].shape[0] == 3
    with pytest.raises(
        lorahot.SourceNotFoundError,
        match=r"this read opens x/adapter_model\.safetensors, but diffusers' load_lora_weights opens "
        r"adapter_model\.safetensors there \(it opens a file of that name in the directory before subfolder=\), maybe "
        r"another adapter; pass the folder itself, .*/x, as the source\.",
    ):
        lorahot.read_adapter(tmp_path, **kwargs)
    assert lorahot.read_adapter(tmp_path / "x").modules["proj"].rank == 2
    (tmp_path / "adapter_model.safetensors").unlink()
    assert lorahot.read_adapter(tmp_path, **kwargs).modules["proj"].rank == 2


def test_a_file_diffusers_leaves_out_does_not_change_the_pick(tmp_path: Path) -> None:
    """diffusers' guess leaves out optimizer, scheduler and checkpoint files: beside one,
    adapter_model.safetensors is what both PEFT and diffusers read, and loads."""
    save_file(_peft(2), tmp_path / "adapter_model.safetensors")
    save_file(_peft(3), tmp_path / "optimizer.safetensors")
    assert _diffusers_reads(str(tmp_path))["base_model.model.proj.lora_A.weight"].shape[0] == 2
    assert lorahot.read_adapter(tmp_path).modules["proj"].rank == 2


def test_a_path_starting_with_a_tilde_names_its_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'~/adapters/x' is not expanded (as open(), PEFT's and diffusers' loaders leave it), and the
    refusal said 'Pass an adapter directory, ...', the caller having passed one: it now says '~'
    is not expanded and gives the expansion."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ad").mkdir()
    save_file(_peft(2), tmp_path / "ad" / "adapter_model.safetensors")
    for text in ("~/ad", "~/ad/adapter_model.safetensors"):
        expanded = os.path.expanduser(text)
        with pytest.raises(
            lorahot.SourceNotFoundError,
            match=rf"^{text}: no such file or directory\. '~' is not expanded \(as open\(\) does not\): pass "
            rf"os\.path\.expanduser\('{text}'\), which is {expanded}\.$",
        ):
            lorahot.read_adapter(text)
        assert lorahot.read_adapter(expanded).modules["proj"].rank == 2


@pytest.mark.parametrize("spelling", ["x/", "x//", "./x", "x/."])
def test_a_subfolder_with_a_trailing_slash_or_dot_parts_is_the_folder(tmp_path: Path, spelling: str) -> None:
    """subfolder='x/' (as os.path.join and PEFT's subfolder= read it) was refused as 'must stay
    inside the adapter directory', which it does; it now reads folder x, with the same host cache
    identity as 'x'; '.' is the directory itself."""
    from lorahot.io.identity import source_identity

    (tmp_path / "x").mkdir()
    save_file(_peft(2), tmp_path / "x" / "adapter_model.safetensors")
    assert lorahot.read_adapter(tmp_path, subfolder=spelling).modules["proj"].rank == 2
    assert source_identity(str(tmp_path), subfolder=spelling) == source_identity(str(tmp_path), subfolder="x")
    # (an adapter of the directory's own, which diffusers would open for subfolder='x')
    save_file(_peft(3), tmp_path / "adapter_model.safetensors")
    assert lorahot.read_adapter(tmp_path, subfolder=".").modules["proj"].rank == 3
    with pytest.raises(lorahot.SourceNotFoundError, match=r"^subfolder='x//y' has an empty part \('//'\): write"):
        lorahot.read_adapter(tmp_path, subfolder="x//y")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subfolder": "x//y"}, r"subfolder='x//y' has an empty part \('//'\): write it as 'x/y'\."),
        ({"subfolder": "x///y//"}, r"subfolder='x///y//' has an empty part \('//'\): write it as 'x/y'\."),
        (
            {"weight_name": "x//adapter_model.safetensors"},
            r"weight_name='x//adapter_model\.safetensors' has an empty part \('//'\): write it as "
            r"'x/adapter_model\.safetensors'\.",
        ),
        (
            {"weight_name": "x/"},
            r"weight_name='x/' ends with '/', naming a folder where a file belongs: name the file in it, as "
            r"'x/<name>\.safetensors', or pass the folder as subfolder=\.",
        ),
    ],
    ids=["subfolder", "subfolder, trailing", "weight_name", "weight_name, trailing"],
)
def test_a_path_with_an_empty_part_is_refused_saying_what_is_wrong(
    tmp_path: Path, kwargs: dict[str, str], message: str
) -> None:
    """subfolder='x//y' was refused as having "an empty part ('//' or a trailing '/')", though a
    subfolder's trailing '/' is read as the folder (x/ is x); the message now says which of the
    two it is, and the spelling that reads."""
    (tmp_path / "x" / "y").mkdir(parents=True)
    save_file(_peft(2), tmp_path / "x" / "y" / "adapter_model.safetensors")
    save_file(_peft(2), tmp_path / "x" / "adapter_model.safetensors")
    with pytest.raises(lorahot.SourceNotFoundError, match=rf"^{message}$"):
        lorahot.read_adapter(tmp_path, **kwargs)


_FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


@pytest.mark.parametrize("dtype", _FLOAT8, ids=str)
@pytest.mark.parametrize("where", ["file", "mapping", "header"])
def test_float8_tensors_are_read_widened_to_float32_value_for_value(tmp_path: Path, where: str, dtype) -> None:
    """An adapter saved in float8 (as PEFT loads it into float32 parameters, and ComfyUI casts
    it to the model's dtype) was refused: "A has dtype torch.float8_e4m3fn; LoRA weights must be
    float16, bfloat16, float32 or float64". Each value is now read as its float32 value, exactly;
    planning from the header alone (``plan_targets``, the meta device) sees float32 too."""
    stored = {k: (v * 8).to(dtype) for k, v in _peft(4).items()}
    if where == "mapping":
        source: object = stored
    else:
        save_file(stored, tmp_path / "adapter_model.safetensors")
        source = tmp_path
    if where == "header":
        model = torch.nn.Module()
        model.proj = torch.nn.Linear(8, 6)
        assert lorahot.plan_targets(source, model).ranks == {"proj": 4}
        return
    module = lorahot.read_adapter(source).modules["proj"]
    for got, key in ((module.A, "lora_A"), (module.B, "lora_B")):
        assert got.dtype == torch.float32
        assert torch.equal(got, stored[f"base_model.model.proj.{key}.weight"].to(torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _FLOAT8, ids=str)
def test_gpu_a_float8_file_computes_what_its_float32_values_do(tmp_path: Path, dtype) -> None:
    """On CUDA the file's data lands on the GPU before it is widened (and through the runtime's
    read buffers on later loads, and from the host cache): every way in computes bitwise what
    the same values saved in float32 do."""
    stored = {k: (v * 8).to(dtype) for k, v in _peft(4).items()}
    save_file(stored, tmp_path / "f8.safetensors")
    save_file({k: v.to(torch.float32) for k, v in stored.items()}, tmp_path / "f32.safetensors")
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    model = model.cuda()
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    x = torch.randn(3, 8, device="cuda")
    runtime.load(tmp_path / "f32.safetensors")
    expected = model(x)
    for load in range(3):
        runtime.unload()
        runtime.load(runtime.preload(tmp_path / "f8.safetensors") if load == 2 else tmp_path / "f8.safetensors")
        assert torch.equal(model(x), expected), load
