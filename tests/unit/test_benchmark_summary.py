"""The benchmark summaries write the fields the issues name with exactly the issues' keys
(``benchmarks/results/latest.json``: suites outside the project read them as written), every
other configuration a run timed beside them."""

from __future__ import annotations

import json

from benchmarks import diffusion, rows
from benchmarks.run import summary


def test_rows_summary_keeps_the_issue_keys_and_moves_other_configurations_beside_them() -> None:
    ms = {"base": 1.0, "lorahot": 1.1, "lorahot_merged": 1.0, "peft_bf16": 2.0, "lorahot_extras": 1.2}
    prepare = {"base": 100.0, "lorahot": 120.0, "lorahot_merged": 99.0, "peft_bf16": 150.0, "lorahot_extras": 200.0}
    out = summary({"forward_rows_ms": {"1": ms, "prefill2048": ms}, "forward_rows_prepare_s": prepare})
    for row in ("1", "prefill2048"):
        assert list(out["forward_rows_ms"][row]) == ["base", "lorahot", "lorahot_merged", "peft_bf16"]
        assert out["forward_rows_other_ms"][row] == {"lorahot_extras": 1.2}
    assert out["compile_s"] == {"llm": {"base": 100.0, "lorahot": 120.0}}
    assert out["compile_s_all"] == {"llm": prepare}


def test_rows_summary_of_the_issue_configurations_alone_has_no_other_field() -> None:
    ms = {"base": 1.0, "lorahot": 1.1}
    out = summary({"forward_rows_ms": {"1": ms}})
    assert out["forward_rows_ms"] == {"1": ms}
    assert "forward_rows_other_ms" not in out


def test_a_default_mode_rows_run_never_overwrites_the_reduce_overhead_figures() -> None:
    """The rows suite in default mode (``--modes default``) keys its results by the mode, in the
    run file and in the summary; its compile times are not the issue's (no CUDA graphs)."""
    ms = {"base": 1.0, "lorahot": 1.2}
    found = rows.keyed(
        {"forward_rows_ms": {"1": ms}, "forward_rows_rel_err": {"1": {"lorahot": 0.02}}, "forward_rows_prepare_s": ms},
        "default",
    )
    assert set(found) == {"forward_rows_default_ms", "forward_rows_default_rel_err", "forward_rows_default_prepare_s"}
    out = summary(found)
    assert out["default_mode_rows_ms"] == {"1": ms}
    assert out["default_mode_rows_rel_err"] == {"1": {"lorahot": 0.02}}
    assert not {"forward_rows_ms", "forward_rows_rel_err", "compile_s"} & set(out)
    assert rows.keyed({"forward_rows_ms": {}}, "reduce-overhead") == rows.keyed({"forward_rows_ms": {}}, None)


def test_default_mode_summary_keeps_the_round_medians_and_gives_the_paired_figures_beside_them() -> None:
    """The forward suite's paired timing (configurations taken in turn call by call) goes to
    ``default_mode_paired_ms``; ``default_mode_ms`` keeps the round medians, as before."""
    timed = {"decode": 6.0, "prefill": 7.0, "decode_paired": 5.0, "prefill_paired": 5.5}
    lora = {"decode": 9.0, "prefill": 9.5, "decode_paired": 5.6, "prefill_paired": 6.1, "recompiles": 0}
    out = summary({"forward": {"default": {"base": timed, "lorahot": lora}}})
    assert out["default_mode_ms"] == {"decode": {"base": 6.0, "lorahot": 9.0}, "prefill": {"base": 7.0, "lorahot": 9.5}}
    assert out["default_mode_paired_ms"] == {
        "decode": {"base": 5.0, "lorahot": 5.6},
        "prefill": {"base": 5.5, "lorahot": 6.1},
    }
    unpaired = summary({"forward": {"default": {"base": {"decode": 6.0, "prefill": 7.0}}}})
    assert "default_mode_paired_ms" not in unpaired


def test_diffusion_summary_compile_times_hold_base_and_lorahot() -> None:
    res = {c: {"compile_s": 10.0 + i, "step_ms": 1.0} for i, c in enumerate(diffusion.CONFIGS)}
    raw = {"diffusion": {"model": "m", "adapter_effect": 0.1, "modes": {"default": res}}}
    out = diffusion.summary(raw)
    assert out["compile_s"] == {"unet": {"base": 10.0, "lorahot": 11.0}}
    assert out["compile_s_all"]["unet"] == {c: 10.0 + i for i, c in enumerate(diffusion.CONFIGS)}
    assert set(out["diffusion_step_ms"]) == {"model", "mode", "base", "lorahot", "lorahot_merged", "diffusers"}


def test_a_flux_run_s_fields_are_named_after_it_and_leave_the_unet_s_alone() -> None:
    res = {c: {"compile_s": 10.0 + i, "step_ms": 1.0} for i, c in enumerate(diffusion.CONFIGS)}
    raw = {"diffusion": {"model": "m", "family": "flux", "adapter_effect": 0.1, "modes": {"default": res}}}
    out = diffusion.summary(raw)
    assert out["diffusion_flux_compile_s"] == {"base": 10.0, "lorahot": 11.0}
    assert "compile_s" not in out and "compile_s_all" not in out  # the issue's field keeps llm and unet only
    assert set(out["diffusion_flux_step_ms"]) == {"model", "mode", "base", "lorahot", "lorahot_merged", "diffusers"}
    assert all(k.startswith("diffusion_flux_") for k in out)


def test_diffusion_summary_gives_each_mode_s_profiled_gpu_time_in_ms() -> None:
    profiled = {"base": 30000.0, "lorahot": 34500.0}
    res = {
        c: {
            "compile_s": 1.0,
            "step_ms": 1.0,
            **({"profile": {"gpu_us_per_call": profiled[c]}} if c in profiled else {}),
        }
        for c in diffusion.CONFIGS
    }
    raw = {"diffusion": {"model": "m", "adapter_effect": 0.1, "modes": {"default": res, "reduce-overhead": {}}}}
    out = diffusion.summary(raw)
    assert out["diffusion_gpu_ms_by_mode"] == {"default": {"base": 30.0, "lorahot": 34.5}, "reduce-overhead": {}}
    unprofiled = {
        "diffusion": {"model": "m", "adapter_effect": 0.1, "modes": {"default": {c: {} for c in diffusion.CONFIGS}}}
    }
    assert "diffusion_gpu_ms_by_mode" not in diffusion.summary(unprofiled)


def test_a_run_record_replaces_the_one_before_whole_while_figures_merge_key_by_key(tmp_path, monkeypatch) -> None:
    """A newer run's record (``*_run``) must not keep an older run's fields (a stale commit read as
    the code measured); figure tables keep the entries the newer run did not time."""
    from benchmarks.common import commit, merge_results

    path = tmp_path / "latest.json"
    path.write_text(
        json.dumps(
            {"diffusion_run": {"commit": "old", "device": "A"}, "diffusion_step_ms": {"base": 1, "diffusers": 3}}
        )
    )
    merged = merge_results(path, {"diffusion_run": {"device": "B"}, "diffusion_step_ms": {"base": 2}})
    assert merged["diffusion_run"] == {"device": "B"}
    assert merged["diffusion_step_ms"] == {"base": 2, "diffusers": 3}
    monkeypatch.setenv("LORAHOT_COMMIT", "abc1234")
    assert commit() == "abc1234"
