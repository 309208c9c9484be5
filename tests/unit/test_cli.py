"""``lorahot inspect`` as ``python -m lorahot`` and as the installed console script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(sys.executable).parent / "lorahot"


@pytest.fixture
def kohya_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
        "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.randn(8, 32, 3, 3, dtype=torch.float16),
        "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.randn(32, 8, 1, 1, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "style.safetensors")
    return tmp_path / "style.safetensors"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_inspect_prints_a_table(kohya_file: Path, capsys: pytest.CaptureFixture) -> None:
    """In this process: the table is cli.main's. Real ``python -m lorahot`` processes print
    (test_a_closed_pipe_ends_quietly) and exit with their status (the unwritable-stdout tests);
    the console script prints and exits 0 (test_console_script_json)."""
    code, stdout, stderr = _main(capsys, "inspect", str(kohya_file))
    assert code == 0 and stderr == "", stderr
    assert "format:  kohya" in stdout and "modules: 2" in stdout
    assert "ranks:   4 (x1), 8 (x1)" in stdout
    assert "dtypes:  float16 (x1), float32 (x1)" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("lora_unet_mid_block_resnets_0_conv1"))
    assert row.split() == ["lora_unet_mid_block_resnets_0_conv1", "lora", "8", "8", "1", "8x32x3x3", "32x8x1x1"]
    assert "kinds:   lora (x2)\n" in stdout and "components: lora_unet_ (x2)" in stdout


@pytest.mark.skipif(not SCRIPT.exists(), reason="lorahot is not installed as a console script here")
def test_console_script_json(kohya_file: Path) -> None:
    out = _run(str(SCRIPT), "inspect", str(kohya_file), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["format"] == "kohya" and data["modules"] == 2
    assert data["bytes"] == (4 * 32 * 2) * 4 + (8 * 32 * 9 + 32 * 8) * 2
    assert data["alphas"] == {"2": 1, "8": 1}
    assert data["table"][0] == {
        "module": "lora_unet_mid_block_attentions_0_proj_in",
        "kind": "lora",
        "rank": 4,
        "alpha": 2.0,
        "scale": 0.5,
        "A": [4, 32],
        "B": [32, 4],
        "dtype": "float32",
    }


def _main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``lorahot ARGS`` in this process: (exit status, stdout, stderr)."""
    from lorahot import cli

    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(result: tuple[int, str, str], text: str) -> None:
    code, out, err = result
    assert code == 2 and out == "", result
    assert err.count("\n") == 1 and err.startswith("lorahot: error: "), err
    assert text in err and "Traceback" not in err


def test_errors_go_to_stderr_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """In this process: the status and the streams are cli.main's. That a real process exits
    with its status 2, nothing on stdout and the one line on stderr is checked by
    test_huggingface_hubs_progress_bars_logs_and_warnings_stay_off_stderr[fail]; python -m lorahot's
    own exit statuses by the closed-pipe and unwritable-stdout tests."""
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    _one_line_error(
        _main(capsys, "inspect", str(tmp_path / "model.ckpt")), "lorahot never unpickles. Convert it to .safetensors"
    )


def test_any_bad_file_or_argument_is_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tensors = {f"foo.bar{i}.weight": torch.ones(2) for i in range(3)}  # a multi-line LoraError
    save_file(tensors, tmp_path / "odd.safetensors")
    _one_line_error(_main(capsys, "inspect", str(tmp_path / "odd.safetensors")), "foo.bar0")
    _one_line_error(_main(capsys, "inspect", "a", "--bogus"), "unrecognized arguments: --bogus")
    _one_line_error(_main(capsys), "the following arguments are required: command")
    _one_line_error(_main(capsys, "inspect", ""), "source='' is empty")


def test_unexpected_exceptions_are_one_line_too(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lorahot import cli

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(cli, "read_adapter", boom)
    _one_line_error(_main(capsys, "inspect", "x"), "lorahot: error: unexpected RuntimeError: first line second line")


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    tensors = {}
    for i in range(2000):  # ~150 KB of table: more than a pipe holds
        tensors[f"lora_unet_block_{i}_proj.lora_down.weight"] = torch.ones(1, 2)
        tensors[f"lora_unet_block_{i}_proj.lora_up.weight"] = torch.ones(2, 1)
    save_file(tensors, tmp_path / "big.safetensors")
    command = f"'{sys.executable}' -m lorahot inspect '{tmp_path / 'big.safetensors'}' | head -1"
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("source:") and out.stderr == "", out.stderr


def test_names_with_control_characters_or_lone_surrogates_print_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    stem = "lora_unet_a\ud800b\x1b[2Jc"  # a lone surrogate and a terminal escape sequence
    header = {
        f"{stem}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        f"{stem}.lora_up.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode()  # ensure_ascii: the surrogate travels as \\ud800
    (tmp_path / "odd.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "odd.safetensors"), "--json")
    assert code == 0 and json.loads(text)["table"][0]["module"] == stem
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as a pipe's stdout: a surrogate raises
    monkeypatch.setattr(sys, "stdout", stdout)
    code, _, err = _main(capsys, "inspect", str(tmp_path / "odd.safetensors"))
    printed = stdout.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert code == 0 and err == "", err
    assert "lora_unet_a\\ud800b\\x1b[2Jc" in printed and "\x1b" not in printed


def test_inspect_names_each_module_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = {
        "lora_unet_a_to_q.lora_down.weight": torch.randn(2, 8),
        "lora_unet_a_to_q.lora_up.weight": torch.randn(8, 2),
        "lora_unet_a_to_k.hada_w1_a": torch.randn(8, 2),
        "lora_unet_a_to_k.hada_w1_b": torch.randn(2, 8),
        "lora_unet_a_to_k.hada_w2_a": torch.randn(8, 2),
        "lora_unet_a_to_k.hada_w2_b": torch.randn(2, 8),
        "lora_unet_a_to_k.alpha": torch.tensor(1.0),
        "lora_te1_text_model_fc1.lokr_w1": torch.randn(2, 2),
        "lora_te1_text_model_fc1.lokr_w2": torch.randn(4, 4),
        "lora_unet_a_to_v.diff": torch.randn(8, 8),
        "lora_unet_a_to_v.diff_b": torch.randn(8),
    }
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "mixed.safetensors"))
    assert code == 0
    assert (
        "kinds:   diff (x1), loha (x1), lokr (x1), lora (x1)  (diff, loha, lokr: load with inject(..., merged=True))"
        in text
    )
    assert "components: lora_te1_ (x1), lora_unet_ (x3)" in text
    row = next(line for line in text.splitlines() if line.startswith("lora_unet_a_to_k"))
    assert row.split() == [
        "lora_unet_a_to_k",
        "loha",
        "2",
        "1",
        "0.5",
        "hada_w1_a=8x2",
        "hada_w1_b=2x8",
        "hada_w2_a=8x2",
        "hada_w2_b=2x8",
    ]
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "mixed.safetensors"), "--json")
    data = json.loads(text)
    assert data["merged_only"] == ["diff", "loha", "lokr"]
    assert {r["module"]: r["kind"] for r in data["table"]}["lora_unet_a_to_v"] == "diff"


def test_inspect_names_dora_and_lora_bias_modules_and_the_flag_they_need(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = {
        "base_model.model.q.lora_A.weight": torch.randn(2, 8),
        "base_model.model.q.lora_B.weight": torch.randn(6, 2),
        "base_model.model.q.lora_magnitude_vector": torch.rand(6) + 0.5,
        "base_model.model.v.lora_A.weight": torch.randn(2, 8),
        "base_model.model.v.lora_B.weight": torch.randn(6, 2),
        "base_model.model.v.lora_B.bias": torch.randn(6),
        "base_model.model.k.lora_A.weight": torch.randn(2, 8),
        "base_model.model.k.lora_B.weight": torch.randn(6, 2),
    }
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "dora.safetensors"))
    assert code == 0
    assert (
        "kinds:   dora (x1), lora (x1), lora+bias (x1)  (dora, lora+bias: load unmerged with inject(..., extras=True))"
        in text
    )
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "dora.safetensors"), "--json")
    data = json.loads(text)
    assert data["needs_extras"] == ["dora", "lora+bias"]
    assert {r["module"]: r["kind"] for r in data["table"]} == {"q": "dora", "v": "lora+bias", "k": "lora"}


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
def test_an_unwritable_stdout_is_one_line_on_stderr_not_a_traceback(tmp_path: Path, redirect: str) -> None:
    """stdout closed, or on a full device: exit 1 with one line saying so (an independent
    audit found a traceback); a pipe whose reader left stays quiet (above)."""
    if redirect == ">/dev/full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    save_file(
        {"lora_unet_a.lora_down.weight": torch.ones(1, 2), "lora_unet_a.lora_up.weight": torch.ones(2, 1)},
        tmp_path / "a.safetensors",
    )
    command = f"'{sys.executable}' -m lorahot inspect '{tmp_path / 'a.safetensors'}' {redirect}"
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("lorahot: cannot write the output:") and out.stderr.count("\n") == 1, out.stderr


def test_a_bad_file_exits_2_even_where_stderr_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status carries the failure when its line cannot be written (stderr closed or full):
    before, the write's OSError escaped and Python exited 1."""
    from lorahot import cli

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    monkeypatch.setattr(sys, "stderr", Full())
    with pytest.raises(SystemExit) as exited:
        cli.main(["inspect", str(tmp_path / "model.ckpt")])
    assert exited.value.code == 2


_NOISY_HUB = """
import os, sys, types, warnings
import huggingface_hub

def repo_info(self, repo_id, **kwargs):  # the Hub lists the one file, and no request is sent
    return types.SimpleNamespace(sha="0" * 40, siblings=[types.SimpleNamespace(rfilename="style.safetensors")])

def noisy_hf_hub_download(repo_id, filename, **kwargs):
    # imported here, as huggingface_hub's own modules first import them during a fetch
    from huggingface_hub.utils import logging as hub_logging, tqdm

    bar = tqdm(total=2, desc="Downloading", name="huggingface_hub.file_download")
    bar.update(2)
    bar.close()
    hub_logging.get_logger("huggingface_hub.file_download").warning("a huggingface_hub log warning")
    warnings.warn("a huggingface_hub warning")
    if sys.argv[1] == "fail":
        raise TimeoutError("read timed out")
    return os.path.join(sys.argv[2], filename)

huggingface_hub.HfApi.repo_info = repo_info
huggingface_hub.hf_hub_download = noisy_hf_hub_download
from lorahot import cli
sys.exit(cli.main(["inspect", "org/adapter"]))
"""


@pytest.mark.parametrize("outcome", ["fail", "ok"])
def test_huggingface_hubs_progress_bars_logs_and_warnings_stay_off_stderr(
    kohya_file: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """A Hub fetch's progress bar, its log warnings (``No files matched ...``) and Python
    warnings wrote to stderr around the error line (or alone, on success)."""
    pytest.importorskip("huggingface_hub")
    for name in ("HF_HUB_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(kohya_file.parent / "hub"))  # where the fetch records the branch
    out = _run(sys.executable, "-c", _NOISY_HUB, outcome, str(kohya_file.parent))
    if outcome == "fail":
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == (
            "lorahot: error: org/adapter: cannot get the adapter from the Hub (TimeoutError: read timed out). The Hub "
            "could not be reached: no answer within 10 s to a request (HF_HUB_ETAG_TIMEOUT) or 10 s to a read of a "
            "download (HF_HUB_DOWNLOAD_TIMEOUT): check the network (a proxy, HF_ENDPOINT) and retry, or raise those "
            "timeouts for a slow link; a copy in the local cache loads with HF_HUB_OFFLINE=1.\n"
        )
    else:
        assert out.returncode == 0 and "format:  kohya" in out.stdout
        assert out.stderr == ""


def test_the_cli_restores_huggingface_hubs_settings(
    kohya_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Quieting is the CLI's alone: progress bars (a group's setting included), the Hub's log
    level and the warning filters are as they were once it returns."""
    import logging
    import warnings

    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)
    states = sys.modules["huggingface_hub.utils.tqdm"].progress_bar_states
    logger = logging.getLogger(hub_logging.__name__.partition(".")[0])
    saved = dict(states), logger.level
    seen = {}

    def hf_hub_download(repo_id: str, filename: str, **kwargs: object) -> str:
        seen["bars off"] = are_progress_bars_disabled("huggingface_hub.file_download")
        seen["warnings logged"] = logger.isEnabledFor(logging.WARNING)
        return str(kohya_file.parent / filename)

    listing = SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=kohya_file.name)])
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(kohya_file.parent / "hub"))  # the branch is recorded
    monkeypatch.setattr(hub.HfApi, "repo_info", lambda self, repo_id, **kwargs: listing)
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    try:
        logger.setLevel(logging.INFO)
        disable_progress_bars("huggingface_hub.some_group")
        before = dict(states), logger.level, list(warnings.filters)
        assert _main(capsys, "inspect", "org/adapter")[0] == 0
        assert seen == {"bars off": True, "warnings logged": False}
        assert (dict(states), logger.level, list(warnings.filters)) == before
        assert not are_progress_bars_disabled() and are_progress_bars_disabled("huggingface_hub.some_group")
    finally:
        states.clear()
        states.update(saved[0])
        logger.setLevel(saved[1])


def _lora(module: str, out: int = 16, rank: int = 4, spelling: str = "lora_down/lora_up", alpha: float | None = None):
    down, up = spelling.split("/")
    tensors = {f"{module}.{down}.weight": torch.randn(rank, 16), f"{module}.{up}.weight": torch.randn(out, rank)}
    return tensors | ({f"{module}.alpha": torch.tensor(alpha)} if alpha is not None else {})


def _lokr(module: str, alpha: float | None = 2.0) -> dict[str, torch.Tensor]:
    tensors = {f"{module}.lokr_w1": torch.randn(4, 4), f"{module}.lokr_w2_a": torch.randn(4, 2)}
    tensors[f"{module}.lokr_w2_b"] = torch.randn(2, 4)
    return tensors | ({f"{module}.alpha": torch.tensor(alpha)} if alpha is not None else {})


#: one small file per naming and kind of the README's format table: its tensors, its header, and
#: what inspect says of it (naming, kinds, components, ranks, alphas, the kinds needing merged=True)
NAMINGS = {
    "peft": (
        _lora("base_model.model.layers.0.q_proj", spelling="lora_A/lora_B"),
        None,
        "peft",
        {"lora": 1},
        {"-": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
    "peft-bare-lokr": (
        _lokr("transformer_blocks.0.attn.to_q"),
        None,
        "peft",
        {"lokr": 1},
        {"-": 1},
        {"2": 1},
        {"2": 1},
        ["lokr"],
    ),
    "diffusers-metadata": (
        _lora("transformer.transformer_blocks.0.attn.to_q", spelling="lora_A/lora_B"),
        {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})},
        "diffusers",
        {"lora": 1},
        {"transformer.": 1},
        {"4": 1},
        {"8": 1},
        [],
    ),
    "diffusers-old": (
        _lora("unet.mid.processor.to_q_lora", spelling="down/up"),
        None,
        "diffusers-old",
        {"lora": 1},
        {"unet.": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
    "kohya-alpha-mix": (
        _lora("lora_unet_mid_proj_in", alpha=2.0) | _lora("lora_te1_text_model_fc1"),
        None,
        "kohya",
        {"lora": 2},
        {"lora_te1_": 1, "lora_unet_": 1},
        {"4": 2},
        {"2": 1, "4": 1},
        [],
    ),
    "kohya-diff": (
        {"lora_unet_mid_proj_in.diff": torch.randn(16, 16), "lora_unet_mid_proj_in.diff_b": torch.randn(16)},
        None,
        "kohya",
        {"diff": 1},
        {"lora_unet_": 1},
        {"0": 1},
        {"-": 1},
        ["diff"],
    ),
    "kohya-whole-lokr": (
        {"lora_unet_mid_proj_in.lokr_w1": torch.randn(4, 4), "lora_unet_mid_proj_in.lokr_w2": torch.randn(4, 4)},
        None,
        "kohya",
        {"lokr": 1},
        {"lora_unet_": 1},
        {"0": 1},
        {"-": 1},
        ["lokr"],
    ),
    "comfyui-te": (
        _lora("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1", alpha=2.0),
        None,
        "comfyui",
        {"lora": 1},
        {"text_encoders.clip_l.transformer.": 1},
        {"4": 1},
        {"2": 1},
        [],
    ),
    "flux-kohya": (
        _lora("lora_unet_double_blocks_0_img_attn_qkv", 48, alpha=2.0),
        None,
        "flux-kohya",
        {"lora": 1},
        {"lora_unet_": 1},
        {"4": 1},
        {"2": 1},
        [],
    ),
    "flux-bfl-lokr": (
        _lokr("diffusion_model.double_blocks.0.img_attn.qkv"),
        None,
        "flux-bfl",
        {"lokr": 1},
        {"diffusion_model.": 1},
        {"2": 1},
        {"2": 1},
        ["lokr"],
    ),
    "flux-xlabs": (
        _lora("double_blocks.0.processor.qkv_lora1", 48, spelling="down/up"),
        None,
        "flux-xlabs",
        {"lora": 1},
        {"-": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
    "flux-fal-lokr": (
        _lokr("base_model.model.double_blocks.0.img_attn.qkv"),
        None,
        "flux-fal",
        {"lokr": 1},
        {"-": 1},
        {"2": 1},
        {"2": 1},
        ["lokr"],
    ),
    "wan-diff-b": (
        _lora("diffusion_model.blocks.0.self_attn.q", spelling="lora_A/lora_B")
        | {"diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(16)},
        None,
        "wan",
        {"lora+bias": 1},
        {"diffusion_model.": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
    "wan-vace": (
        _lora("diffusion_model.vace_blocks.0.before_proj", alpha=2.0),
        None,
        "wan",
        {"lora": 1},
        {"diffusion_model.": 1},
        {"4": 1},
        {"2": 1},
        [],
    ),
    "wan-musubi-lokr": (
        _lokr("lora_unet_blocks_0_self_attn_q"),
        None,
        "wan-musubi",
        {"lokr": 1},
        {"lora_unet_": 1},
        {"2": 1},
        {"2": 1},
        ["lokr"],
    ),
    "hunyuan-video-musubi": (
        _lora("lora_unet_double_blocks_0_img_mlp_fc1", alpha=2.0),
        None,
        "hunyuan-video-musubi",
        {"lora": 1},
        {"lora_unet_": 1},
        {"4": 1},
        {"2": 1},
        [],
    ),
    "hunyuan-video": (
        _lora("diffusion_model.double_blocks.0.img_attn_qkv", 48),
        None,
        "hunyuan-video",
        {"lora": 1},
        {"diffusion_model.": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
    "sd3-kohya": (
        _lora("lora_unet_joint_blocks_0_x_block_attn_qkv", 48, alpha=2.0),
        None,
        "sd3-kohya",
        {"lora": 1},
        {"lora_unet_": 1},
        {"4": 1},
        {"2": 1},
        [],
    ),
    "sd3-lokr": (
        _lokr("transformer.joint_blocks.0.x_block.attn.qkv"),
        None,
        "sd3",
        {"lokr": 1},
        {"transformer.": 1},
        {"2": 1},
        {"2": 1},
        ["lokr"],
    ),
    "lumina2": (
        _lora("diffusion_model.layers.0.attention.qkv", 48),
        None,
        "lumina2",
        {"lora": 1},
        {"diffusion_model.": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
    "minimax-h3-header-alpha": (
        _lora("diffusion_model.blocks.0.attn.qkv_proj", 48, spelling="lora_A/lora_B"),
        {"alpha": "8"},
        "minimax-h3",
        {"lora": 1},
        {"diffusion_model.": 1},
        {"4": 1},
        {"8": 1},
        [],
    ),
    "minimax-h3-musubi": (
        _lora("lora_unet_blocks_0_attn_qkv_proj", 48, alpha=2.0),
        None,
        "minimax-h3-musubi",
        {"lora": 1},
        {"lora_unet_": 1},
        {"4": 1},
        {"2": 1},
        [],
    ),
    "minimax-h3-diffsynth": (
        _lora("blocks.0.attn.qkv_proj", 48, spelling="lora_A.default/lora_B.default"),
        None,
        "minimax-h3-diffsynth",
        {"lora": 1},
        {"-": 1},
        {"4": 1},
        {"4": 1},
        [],
    ),
}


@pytest.mark.parametrize("case", NAMINGS)
def test_inspect_and_read_adapter_agree_on_every_naming(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lorahot

    torch.manual_seed(0)
    tensors, header, naming, kinds, components, ranks, alphas, merged_only = NAMINGS[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path), metadata=header)
    code, text, err = _main(capsys, "inspect", str(path), "--json")
    assert code == 0 and err == "", err
    data = json.loads(text)
    assert (data["format"], data["kinds"], data["components"]) == (naming, kinds, components)
    assert (data["ranks"], data["alphas"], data["merged_only"]) == (ranks, alphas, merged_only)
    adapter = lorahot.read_adapter(str(path))
    assert (adapter.format, len(adapter.modules) + len(adapter.weights)) == (naming, data["modules"])
    code, text, _ = _main(capsys, "inspect", str(path))
    assert code == 0 and f"format:  {naming}\n" in text
    assert "alphas:  " + ", ".join(f"{a} (x{n})" for a, n in alphas.items()) + "\n" in text


def test_a_module_without_an_alpha_shows_none_not_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A diff and a LoKr of whole factors without .alpha have no rank to take an alpha from:
    their scale is 1, and inspect shows no alpha rather than alpha 0 (a scale of 0 as a LoRA reads it)."""
    tensors = {
        "lora_unet_a_to_v.diff": torch.randn(8, 8),
        "lora_unet_a_to_k.lokr_w1": torch.randn(2, 2),
        "lora_unet_a_to_k.lokr_w2": torch.randn(4, 4),
    }
    save_file(tensors, str(tmp_path / "whole.safetensors"))
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "whole.safetensors"))
    assert code == 0 and "alphas:  - (x2)\n" in text
    rows = {line.split()[0]: line.split()[1:5] for line in text.splitlines() if line.startswith("lora_unet_a_")}
    assert rows == {"lora_unet_a_to_k": ["lokr", "0", "-", "1"], "lora_unet_a_to_v": ["diff", "0", "-", "1"]}
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "whole.safetensors"), "--json")
    assert [(r["alpha"], r["scale"]) for r in json.loads(text)["table"]] == [(None, 1.0), (None, 1.0)]


PARTIAL = {
    "t-lora": {"lora_unet_b_proj_out.lambda_layer": torch.randn(1, 4)},
    "diff-m": {"lora_unet_b_proj_out.diff_m": torch.randn(6, 16)},
}


@pytest.mark.parametrize("case", PARTIAL)
def test_a_file_strict_false_would_partly_load_is_refused_naming_what_it_keeps(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The strict read's refusal says what strict=False (--no-strict) reads and skips, and
    read_adapter and inspect give the same refusal; a file of refused keys alone does not."""
    import lorahot
    from lorahot.errors import UnknownFormatError

    torch.manual_seed(0)
    (key,) = PARTIAL[case]
    save_file(_lora("lora_unet_a_proj_in", alpha=2.0) | PARTIAL[case], str(tmp_path / "part.safetensors"))
    save_file(PARTIAL[case], str(tmp_path / "none.safetensors"))
    with pytest.raises(UnknownFormatError) as refused:
        lorahot.read_adapter(str(tmp_path / "part.safetensors"))
    said = (
        "Or load the rest with strict=False (lorahot inspect --no-strict): it reads 1 module of the file and skips "
        f"1 key ('{key}')."
    )
    assert str(refused.value).endswith(said)
    _one_line_error(_main(capsys, "inspect", str(tmp_path / "part.safetensors")), said)
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "part.safetensors"), "--no-strict", "--json")
    assert code == 0 and json.loads(text)["skipped"] == [key] and json.loads(text)["modules"] == 1
    with pytest.raises(UnknownFormatError) as refused:
        lorahot.read_adapter(str(tmp_path / "none.safetensors"))
    assert "strict=False (lorahot inspect" not in str(refused.value)


def test_inspect_reports_the_dtypes_and_bytes_a_float8_file_stores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A float8 file is read widened to float32 (exactly), but inspect reports what the file
    holds: each module's dtype as stored and the bytes the file spends on A and B (a module may
    mix dtypes: its A in float8, its B in float32), in the text and in --json; a float32 file
    read the same way stays float32."""
    f8, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    tensors = {
        "lora_unet_a_to_q.lora_down.weight": (torch.randn(4, 16) / 8).to(f8),
        "lora_unet_a_to_q.lora_up.weight": (torch.randn(16, 4) / 8).to(f8),
        "lora_unet_a_to_k.lora_down.weight": (torch.randn(2, 16) / 8).to(e5),
        "lora_unet_a_to_k.lora_up.weight": torch.randn(16, 2) / 8,
        "lora_unet_a_to_v.lora_down.weight": torch.randn(2, 16) / 8,
        "lora_unet_a_to_v.lora_up.weight": torch.randn(16, 2) / 8,
        "lora_unet_a_to_out.hada_w1_a": (torch.randn(16, 2) / 8).to(f8),
        "lora_unet_a_to_out.hada_w1_b": (torch.randn(2, 16) / 8).to(f8),
        "lora_unet_a_to_out.hada_w2_a": (torch.randn(16, 2) / 8).to(f8),
        "lora_unet_a_to_out.hada_w2_b": (torch.randn(2, 16) / 8).to(f8),
    }
    save_file(tensors, str(tmp_path / "f8.safetensors"))
    stored = 2 * 64 + (32 + 32 * 4) + (32 + 32) * 4 + 4 * 32
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "f8.safetensors"), "--json")
    assert code == 0
    data = json.loads(text)
    assert data["bytes"] == stored == sum(t.nbytes for t in tensors.values())
    assert data["dtypes"] == {"float32": 1, "float8_e4m3fn": 2, "float8_e5m2": 1}
    assert {r["module"]: r["dtype"] for r in data["table"]} == {
        "lora_unet_a_to_q": "float8_e4m3fn",
        "lora_unet_a_to_k": "float8_e5m2",
        "lora_unet_a_to_v": "float32",
        "lora_unet_a_to_out": "float8_e4m3fn",
    }
    code, text, _ = _main(capsys, "inspect", str(tmp_path / "f8.safetensors"))
    assert code == 0
    assert "dtypes:  float32 (x1), float8_e4m3fn (x2), float8_e5m2 (x1)\n" in text
    assert f"bytes:   {stored:,}\n" in text
