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


def test_module_inspect_prints_a_table(kohya_file: Path) -> None:
    out = _run(sys.executable, "-m", "lorahot", "inspect", str(kohya_file))
    assert out.returncode == 0, out.stderr
    assert "format:  kohya" in out.stdout and "modules: 2" in out.stdout
    assert "ranks:   4 (x1), 8 (x1)" in out.stdout
    assert "dtypes:  float16 (x1), float32 (x1)" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("lora_unet_mid_block_resnets_0_conv1"))
    assert row.split() == ["lora_unet_mid_block_resnets_0_conv1", "lora", "8", "8", "1", "8x32x3x3", "32x8x1x1"]
    assert "kinds:   lora (x2)\n" in out.stdout and "components: lora_unet_ (x2)" in out.stdout


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


def test_errors_go_to_stderr_with_status_2(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    out = _run(sys.executable, "-m", "lorahot", "inspect", str(tmp_path / "model.ckpt"))
    assert out.returncode == 2 and out.stdout == ""
    assert "lorahot never unpickles. Convert it to .safetensors" in out.stderr


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
