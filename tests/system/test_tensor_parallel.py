"""LoRA on a tensor-parallel model: two CPU processes over gloo, a tiny Llama parallelized with
ColwiseParallel on q/k/v/gate/up and RowwiseParallel on o/down (and sequence parallelism).

Every output of the sharded model, after loads, swaps, stacks, scales, per-row routing and the
host cache, equals the unsharded model's with the same adapters; a load that fails on one rank
only leaves every rank bitwise unchanged. Each scenario runs once per session, whichever
pytest-xdist workers its tests land on, with others of its group (:data:`GROUPS`) in the same
two interpreters, and every check is its own test.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.helpers import make_adapter, save_peft
from tests.parallel_helpers import TinyLlama, once_per_session, run_group, run_ranks, tiny_llama

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)

LINEARS = [
    f"layers.{i}.{name}"
    for i in range(2)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def _write_adapters(folder: Path) -> None:
    """PEFT adapters for the tiny Llama: ``a`` (rank 4 everywhere), ``b`` (rank 3, not on the
    head), ``c`` (rank 2); ``nan_rank1``: ``a`` with NaN only in what rank 1 reads of two
    row-parallel layers; ``wide``: an adapter for a wider model; ``a_values``, ``a_alpha`` and
    ``a_copy``: ``a``'s modules with other values, ``a``'s values with another alpha, ``a``;
    ``a_edited`` and ``a_swapped``: ``a`` with one element of a factor every rank holds whole
    changed (the reproducer of a sampled comparison's blind spot), or two swapped (every sum of
    the values kept), at positions no sample looks at; ``a_one_block``, ``b_one_block`` and
    ``c_one_block``: ``a``, ``b`` and ``c`` for the tiny Llama of one block."""
    model = tiny_llama()
    a, _ = make_adapter(model, dict.fromkeys([*LINEARS, "lm_head"], 4), seed=1, dtype=torch.float64)
    save_peft(folder / "a", a, r=4, lora_alpha=8)
    b, _ = make_adapter(model, dict.fromkeys(LINEARS, 3), seed=2, dtype=torch.float64)
    save_peft(folder / "b", b, r=3, lora_alpha=6)
    c, _ = make_adapter(model, dict.fromkeys(LINEARS[:5], 2), seed=3, dtype=torch.float64)
    save_peft(folder / "c", c, r=2, lora_alpha=2)
    bad = {k: v.clone() for k, v in a.items()}
    bad["base_model.model.layers.1.mlp.down_proj.lora_A.weight"][1, 40] = float("nan")  # rank 1: inputs 25:50
    bad["base_model.model.layers.0.self_attn.o_proj.lora_A.weight"][0, 20] = float("nan")  # rank 1: inputs 16:32
    save_peft(folder / "nan_rank1", bad, r=4, lora_alpha=8)
    wide, _ = make_adapter(TinyLlama(dim=48).double(), dict.fromkeys(LINEARS, 4), seed=4, dtype=torch.float64)
    save_peft(folder / "wide", wide, r=4, lora_alpha=8)
    other, _ = make_adapter(model, dict.fromkeys([*LINEARS, "lm_head"], 4), seed=5, dtype=torch.float64)
    save_peft(folder / "a_values", other, r=4, lora_alpha=8)  # a's modules, other values
    save_peft(folder / "a_alpha", a, r=4, lora_alpha=16)  # a's values, another alpha
    save_peft(folder / "a_copy", a, r=4, lora_alpha=8)  # a at another path
    edited = {k: v.clone() for k, v in a.items()}
    edited["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"][1, 7] += 3  # column-parallel: A whole
    save_peft(folder / "a_edited", edited, r=4, lora_alpha=8)
    swapped = {k: v.clone() for k, v in a.items()}
    o_b = swapped["base_model.model.layers.0.self_attn.o_proj.lora_B.weight"]  # row-parallel: B whole, [32, 4]
    o_b[[1, 2], 1] = o_b[[2, 1], 1].clone()
    save_peft(folder / "a_swapped", swapped, r=4, lora_alpha=8)
    _write_sliced(folder, a, model)
    one = tiny_llama(blocks=1)  # a, b and c for the one-block model the compiled checks trace
    block = [name for name in LINEARS if name.startswith("layers.0.")]
    for name, (targets, r, alpha, seed) in {
        "a": ([*block, "lm_head"], 4, 8, 1),
        "b": (block, 3, 6, 2),
        "c": (LINEARS[:5], 2, 2, 3),
    }.items():
        tensors, _ = make_adapter(one, dict.fromkeys(targets, r), seed=seed, dtype=torch.float64)
        save_peft(folder / f"{name}_one_block", tensors, r=r, lora_alpha=alpha)


#: what :func:`_write_sliced` changes in ``a``: a key and an index into its tensor, by file
SLICED = {
    "a_rows0": ("base_model.model.layers.0.self_attn.q_proj.lora_B.weight", (3, 1)),  # rank 0's rows 0:16
    "a_rows1": ("base_model.model.layers.0.self_attn.q_proj.lora_B.weight", (20, 1)),  # rank 1's rows 16:32
    "a_cols0": ("base_model.model.layers.1.mlp.down_proj.lora_A.weight", (1, 10)),  # rank 0's inputs 0:25
    "a_cols1": ("base_model.model.layers.0.self_attn.o_proj.lora_A.weight", (2, 30)),  # rank 1's inputs 16:32
}


def _write_sliced(folder: Path, a: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Adapters that differ from another only where a rank reads its own slice: ``a`` with one
    element changed in a column-parallel B's rows or a row-parallel A's columns (:data:`SLICED`);
    and ``qkv`` and ``qkv_b``, LoRA on q/k/v only (every target column-parallel) with the same A
    and another B (a LoRA-FA pair, or two trainings from one initialization)."""
    for name, (key, index) in SLICED.items():
        edited = {k: v.clone() for k, v in a.items()}
        edited[key][index] += 3
        save_peft(folder / name, edited, r=4, lora_alpha=8)
    qkv = [f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]
    first, _ = make_adapter(model, dict.fromkeys(qkv, 4), seed=7, dtype=torch.float64)
    second, _ = make_adapter(model, dict.fromkeys(qkv, 4), seed=8, dtype=torch.float64)
    save_peft(folder / "qkv", first, r=4, lora_alpha=8)
    shared_a = {k: first[k] if ".lora_A." in k else v for k, v in second.items()}
    save_peft(folder / "qkv_b", shared_a, r=4, lora_alpha=8)


#: PEFT configs of the transformers Llama's adapters: ``hf_a`` on every projection and the head,
#: ``hf_b`` on a few, another rank and rsLoRA; ``hf_e`` on the input embedding and a column- and
#: a row-parallel projection (PEFT saves the embedding's own table with it); ``hf_embedding`` on
#: the input embedding only.
HF_ADAPTERS = {
    "hf_a": {"r": 4, "lora_alpha": 8, "target_modules": [*sorted({n.split(".")[-1] for n in LINEARS}), "lm_head"]},
    "hf_b": {
        "r": 2,
        "lora_alpha": 5,
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
        "use_rslora": True,
    },
    "hf_e": {"r": 3, "lora_alpha": 9, "target_modules": ["embed_tokens", "q_proj", "down_proj"]},
    "hf_embedding": {"r": 2, "lora_alpha": 4, "target_modules": ["embed_tokens"]},
}


#: A tiny DeepSeek-V2 (multi-head latent attention: kv_a_proj_with_mqa is ``mla_kv_a_proj`` in
#: its tp_plan), one dense layer.
TINY_MLA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 8,
    "q_lora_rank": None,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "n_routed_experts": 2,
    "num_experts_per_tok": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 32,
}
#: The PEFT config of its adapter ``hf_mla``: every attention projection and the embedding.
MLA_ADAPTER = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["embed_tokens", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}


#: PEFT configs of the adapters for transformers' Llama parallelized with parallelize_module
PARALLELIZED_ADAPTERS = {
    "peft_x": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted({n.split(".")[-1] for n in LINEARS}),
        "rank_pattern": {"o_proj": 2, "up_proj": 6},
        "alpha_pattern": {"down_proj": 3},
    },
    "peft_y": {"r": 3, "lora_alpha": 5, "target_modules": ["q_proj", "down_proj"], "use_rslora": True},
}


def _write_transformers(folder: Path) -> None:
    """transformers' tiny Llama and tiny DeepSeek-V2 (float64), saved for ``from_pretrained``,
    and PEFT adapters for them saved by PEFT (random B, so every layer's delta shows): those of
    :data:`HF_ADAPTERS`, :data:`MLA_ADAPTER` and :data:`PARALLELIZED_ADAPTERS`."""
    import transformers

    from tests.helpers import tiny_llama as hf_llama

    base = hf_llama().double()
    base.save_pretrained(str(folder / "hf_llama"))
    for seed, (name, config) in enumerate(HF_ADAPTERS.items()):
        _save_peft(base, config, seed, folder / name)
    torch.manual_seed(0)
    mla = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**TINY_MLA)).double().eval()
    mla.save_pretrained(str(folder / "hf_mla_model"))
    _save_peft(mla, MLA_ADAPTER, 7, folder / "hf_mla")
    for seed, (name, config) in enumerate(PARALLELIZED_ADAPTERS.items()):
        _save_peft(base, config, 10 + seed, folder / name)
    _write_hf_sliced(folder)


def _write_hf_sliced(folder: Path) -> None:
    """``hf_a`` with one element changed where only rank 0 of 2 reads: ``hf_a_rows0`` in a
    ``colwise`` q_proj's B rows, ``hf_a_cols0`` in a ``rowwise`` down_proj's A columns."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "hf_a" / "adapter_model.safetensors"))
    edits = {
        "hf_a_rows0": ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", (0, 1)),
        "hf_a_cols0": ("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", (2, 0)),
    }
    for name, (key, index) in edits.items():
        edited = {k: v.clone() for k, v in tensors.items()}
        edited[key][index] += 3
        (folder / name).mkdir()
        save_file(edited, str(folder / name / "adapter_model.safetensors"))
        shutil.copy(folder / "hf_a" / "adapter_config.json", folder / name / "adapter_config.json")


def _save_peft(base: torch.nn.Module, config: dict[str, object], seed: int, path: Path) -> None:
    """A PEFT adapter of ``config`` on ``base`` with random A and B, saved by PEFT at ``path``."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))


#: The scenarios that run in one pair of rank processes, one after the other (each from dynamo's
#: caches emptied: :mod:`tests.parallel_worker`), so the interpreters start once per group.
#: ``fused`` comes last in its group: it puts stand-ins into lorahot's kernel modules while it
#: runs. ``one_rank`` and ``interrupted`` interrupt or fail rank 1 on purpose, and where lorahot
#: got that wrong a rank would wait in a collective until the process group timed out and broke:
#: each runs in processes of its own.
GROUPS = (
    ("parity", "sequence", "compile", "fused"),
    ("atomic", "transformers", "layouts", "replicated_targets"),
    ("one_rank",),
    ("interrupted",),
)

#: Seconds a scenario may take (90 otherwise). ``one_rank`` and ``interrupted``: bounded well
#: below the ranks' process-group timeout (60 s) times the calls that would wait in it, so a
#: rank left waiting for an interrupted one fails the run instead of hanging it.
TIMEOUTS = {"one_rank": 75.0, "interrupted": 75.0}


def _scenario(name: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """The ranks' results of scenario ``name``: its group of :data:`GROUPS` runs once per
    session, with the adapters its scenarios read. A scenario that has no results (the ranks
    failed in it or before it, or its deadline passed) fails its tests with why and the ranks'
    output, never with another scenario's results."""
    group = next(g for g in GROUPS if name in g)

    def run(folder: Path) -> dict[str, list[dict[str, str]] | str]:
        folder.mkdir(parents=True)
        _write_adapters(folder)
        if {"atomic", "transformers"} & set(group):
            _write_transformers(folder)
        if "one_rank" in group:
            _write_one_rank_adapters(folder)
        return run_group(list(group), folder, timeouts=TIMEOUTS)

    outcome = once_per_session("+".join(group), tmp_path_factory.getbasetemp(), run)[name]
    assert not isinstance(outcome, str), outcome
    return outcome


def _write_one_rank_adapters(folder: Path) -> None:
    """``a`` with one thing wrong, each loaded by rank 1 only: ``shape`` (down_proj's A made for
    49 inputs), ``ranks`` (down_proj's A of rank 5, its B of 4), ``fewer`` (no up_proj in block
    1), ``extra`` (a module no layer takes) and ``nan_columns`` (NaN in q_proj's B at an output
    rank 1 holds, 16:32)."""
    a, _ = make_adapter(tiny_llama(), dict.fromkeys([*LINEARS, "lm_head"], 4), seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    down, up = "base_model.model.layers.1.mlp.down_proj", "base_model.model.layers.1.mlp.up_proj"
    save_peft(folder / "shape", {**a, f"{down}.lora_A.weight": torch.randn(4, 49, generator=gen)}, r=4, lora_alpha=8)
    save_peft(folder / "ranks", {**a, f"{down}.lora_A.weight": torch.randn(5, 50, generator=gen)}, r=4, lora_alpha=8)
    save_peft(folder / "fewer", {k: v for k, v in a.items() if not k.startswith(up)}, r=4, lora_alpha=8)
    nowhere = "base_model.model.layers.1.mlp.nowhere"
    extra = {f"{nowhere}.lora_A.weight": torch.randn(4, 8, generator=gen), f"{nowhere}.lora_B.weight": torch.ones(8, 4)}
    save_peft(folder / "extra", {**a, **extra}, r=4, lora_alpha=8)
    nan = {k: v.clone() for k, v in a.items()}
    nan["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"][20, 1] = float("nan")
    save_peft(folder / "nan_columns", nan, r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("parity", tmp_path_factory)


@pytest.fixture(scope="module")
def atomic(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("atomic", tmp_path_factory)


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("sequence", tmp_path_factory)


def _assert_check(results: list[dict[str, str]], name: str) -> None:
    for rank, checks in enumerate(results):
        assert "scenario" not in checks, f"rank {rank}: {checks['scenario']}"
        assert checks.get(name) == "ok", f"rank {rank}, {name}: {checks.get(name, 'not run')}"


PARITY = [
    "inject keeps the outputs",
    "row-parallel layer holds its columns of A",
    "column-parallel layer holds its rows of B",
    "layers are sharded wrappers",
    "load",
    "swap to another slot",
    "swap in place",
    "stack",
    "set_scale of a stack",
    "per-row routing",
    "per-row routing rewritten",
    "load from the host cache",
    "stack from the host cache and a file",
    "unload",
    "the wrapper runs the parallelize hooks",
    "eject gives the hooks back",
    "eject restores the model",
]


@pytest.mark.parametrize("name", PARITY)
def test_sharded_model_computes_the_unsharded_one(parity: list[dict[str, str]], name: str) -> None:
    _assert_check(parity, name)


#: the loads :func:`tests.parallel_worker.sliced_factors` makes with files that differ only in
#: the slices each rank reads alone
SLICED_CASES = [
    "another B in rank 0's rows of a column-parallel layer on rank 1",
    "another B in rank 1's rows of a column-parallel layer on rank 1",
    "another A in rank 0's columns of a row-parallel layer on rank 1",
    "another A in rank 1's columns of a row-parallel layer on rank 1",
    "the same A with another B on rank 1, every target column-parallel",
    "a stack with another B in rank 0's rows on rank 1",
    "a preload with another A in rank 0's columns on rank 1",
    "a cached copy on rank 0 and another B in rank 0's rows on rank 1",
    "a dict of tensors with another B in rank 0's rows on rank 1",
]

ATOMIC = [
    "NaN in rank 1's slice only",
    "unchanged after the NaN slice",
    "NaN in rank 1's slice, in a stack",
    "unchanged after the stack",
    "a file only rank 1 lacks",
    "unchanged after the missing file",
    "an overflowing scale",
    "unchanged after the scale",
    "an overflowing set_scale on rank 1",
    "unchanged after set_scale",
    "an adapter for another model",
    "unchanged after the mismatch",
    "a preload failing on rank 1",
    "nothing cached after it",
    "prefetch is refused",
    "a good load still works",
    "and computes the reference",
    *(
        check
        for what in (
            "another file on rank 1",
            "another alpha on rank 1",
            "another scale on rank 1",
            "another slot on rank 1",
            "another set_scale on rank 1",
            "a preload of another file on rank 1",
            "another activate on rank 1",
            "another routing on rank 1",
            "the same routing per token on rank 1",
            "another unload on rank 1",
            "an unload of every slot on rank 1 only",
            "one element of a replicated A on rank 1",
            "two elements of a replicated B swapped on rank 1",
            "a stack with one element changed on rank 1",
            "a preload with one element changed on rank 1",
            "a cached copy on rank 0 and an edited file on rank 1",
            *SLICED_CASES,
        )
        for check in (what, f"unchanged after {what}")
    ),
    "lengths with one slot on rank 1 only",
    "unchanged after lengths with one slot",
    "nothing cached after the preloads",
    "the same contents at another path load",
    "and compute the reference",
    "the same contents as a dict of tensors on rank 1 load",
    "and compute the reference from the dict",
    "a cache hit on rank 0 and a read on rank 1 load",
    "and compute the reference too",
    *(
        check
        for what in ("bias", "magnitude")
        for check in (f"another LoRA {what} on rank 1", f"unchanged after another LoRA {what} on rank 1")
    ),
    *(
        check
        for what in ("load", "set_scale")
        for check in (
            f"a {what} whose write fails on rank 1 only",
            f"every rank emptied the slot after the {what}",
            f"and computes the base model after the {what}",
        )
    ),
    "merged mode is refused",
    "a sharded embedding is refused",
    "DoRA on a sharded layer is refused",
    "LoRA bias on a sharded layer is refused",
    "an embedding transformers' tp_plan sharded whose class has a forward of its own is refused",
    "a packed_colwise projection is refused",
    "the model keeps its modules after the refusal",
    "a sharded linear with another engine's forward is refused",
]


@pytest.mark.parametrize("name", ATOMIC)
def test_a_load_failing_on_one_rank_changes_no_rank(atomic: list[dict[str, str]], name: str) -> None:
    _assert_check(atomic, name)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("interrupted", tmp_path_factory)


INTERRUPTED = [
    *(
        check
        for name in (
            "a load interrupted mid-write",
            "a load interrupted before its first write",
            "a set_scale interrupted",
        )
        for check in (
            f"{name} on rank 1",
            f"every rank emptied slot 0 after {name}",
            f"and computes the base model bitwise after {name}",
        )
    ),
    *(
        check
        for name in ("an activate interrupted", "an activate failing")
        for check in (
            f"{name} on rank 1",
            f"every rank serves slot 0 after {name}",
            f"and computes what it did bitwise after {name}",
        )
    ),
    "an activate whose putting back fails on rank 1",
    "and the activate it names computes what it did bitwise after it",
    *(
        check
        for name in ("an unload interrupted", "an unload failing")
        for check in (
            f"{name} on rank 1",
            f"every rank emptied every slot after {name}",
            f"and computes the base model bitwise after {name}",
        )
    ),
    *(
        check
        for name in (
            "an unload interrupted whose second try fails",
            "an unload of slot 1 failing whose second try fails",
        )
        for check in (
            f"{name} on rank 1",
            f"no rank names an adapter in the slots after {name}",
            f"and the unload it names empties every rank after {name}",
        )
    ),
    "a load interrupted whose emptying fails on rank 1",
    "no rank names an adapter in slot 0 after it",
    "and the unload it names empties every rank after it",
    "a load after them computes the reference",
]


@pytest.mark.parametrize("name", INTERRUPTED)
def test_a_call_interrupted_or_failing_on_one_rank_leaves_every_rank_alike(
    interrupted: list[dict[str, str]], name: str
) -> None:
    """Rank 1 interrupted (KeyboardInterrupt) or failing in a write, activate or unload after
    every rank's checks passed: it still tells the others before its error goes on, so none
    waits for it in a collective, every rank ends in the same state, and rank 0 raises a
    WriteError naming rank 1 (:func:`tests.parallel_worker.scenario_interrupted`)."""
    _assert_check(interrupted, name)


#: what :func:`tests.parallel_worker.compiled_swaps` checks
COMPILED = [
    "compiled",
    "swap without recompiling",
    "stack without recompiling",
    "set_scale without recompiling",
    "a load from the host cache without recompiling",
    "another input length recompiles",
    "per-row routing compiled",
    "another routing without recompiling",
]


@pytest.mark.parametrize(
    "name",
    [
        "inject keeps the outputs",
        "load",
        "stack",
        "set_scale of a stack",
        "per-row routing",
        "load from the host cache",
        "unload",
        *COMPILED,
    ],
)
def test_sequence_parallel_model_computes_the_unsharded_one(sequence: list[dict[str, str]], name: str) -> None:
    _assert_check(sequence, name)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("compile", tmp_path_factory)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_sharded_model_swaps_without_recompiling(compiled: list[dict[str, str]], name: str) -> None:
    _assert_check(compiled, name)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("layouts", tmp_path_factory)


LAYOUTS = [
    f"hidden {hidden}, local outputs {columns}/{rows}, {targets}: {call}"
    for hidden, columns, rows in ((22, True, True), (22, False, True), (22, True, False), (21, False, False))
    for targets in (["gate_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"], ["down_proj"], ["gate_proj"])
    for call in (
        "load",
        "set_scale",
        "a weighted stack",
        "per-row routing",
        "unload",
        "load from the host cache",
        "eject",
    )
]


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_computes_the_dense_reference(layouts: list[dict[str, str]], name: str) -> None:
    """ColwiseParallel / RowwiseParallel with ``use_local_output`` True and False, an uneven
    hidden width, another rank and alpha per module, rsLoRA and partial targets, against the
    float64 dense reference (:func:`tests.parallel_worker.scenario_layouts`)."""
    _assert_check(layouts, name)


@pytest.mark.parametrize(
    "name",
    [
        "a Shard(0) weight given a Replicate() input computes the unsharded model",
        "a Shard(1) weight given a Shard(dim=1) input computes the unsharded model",
        *(
            f"a Shard({dim}) weight given a {placement} input is refused{how}"
            for dim, placement in ((0, "Shard(dim=0)"), (0, "Shard(dim=1)"), (1, "Shard(dim=0)"), (1, "Replicate()"))
            for how in ("", " compiled")
        ),
        "an undeclared sequence-sharded input: the base model computes it",
        "an undeclared sequence-sharded input is refused naming input_layouts",
    ],
)
def test_an_input_placed_otherwise_than_the_style_makes_is_refused(layouts: list[dict[str, str]], name: str) -> None:
    """A sharded linear given a DTensor input of a placement its LoRA part cannot compute on:
    refused naming the placement (a column-parallel one given a batch-sharded input computed a
    wrong delta: :func:`tests.parallel_worker.misplaced_inputs`)."""
    _assert_check(layouts, name)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("one_rank", tmp_path_factory)


ONE_RANK = [
    check
    for what in (
        "a shape that fits no layer in rank 1's file",
        "A of another rank than B in rank 1's file",
        "a module fewer in rank 1's file",
        "a module no layer takes in rank 1's file",
        "strict=False on rank 1 only, skipping a module",
        "NaN in rank 1's rows of a column-parallel B",
        "a cache key only rank 0 holds",
        "a slot out of range on rank 1",
        "a stack of another length on rank 1",
        "an unknown read option on rank 1",
        "a preload of a missing file on rank 1",
        "another preload key on rank 1",
        "activate out of range on rank 1",
        "a routing out of range on rank 1",
        "a routing of another length on rank 1",
        "set_scale of another length on rank 1",
        "set_scale NaN on rank 1",
        "set_scale a dict on rank 1",
        "load at a dict on rank 1",
        "unload out of range on rank 1",
    )
    for check in (what, f"unchanged after {what}")
]


@pytest.mark.parametrize("name", [*ONE_RANK, "nothing cached under the refused preloads' keys"])
def test_a_call_refused_on_one_rank_is_refused_on_every_rank(one_rank: list[dict[str, str]], name: str) -> None:
    _assert_check(one_rank, name)


@pytest.mark.parametrize(
    "name",
    [
        *(
            check
            for what in ("load", "activate")
            for check in (
                f"a {what} interrupted in rank 1's checks",
                f"unchanged after a {what} interrupted in rank 1's checks",
            )
        ),
        "a load after the interrupted checks computes the reference",
    ],
)
def test_a_call_interrupted_in_one_ranks_checks_leaves_no_rank_waiting(
    one_rank: list[dict[str, str]], name: str
) -> None:
    """A KeyboardInterrupt in rank 1's checks: rank 0 is told at once (it waited in the
    agreement's collective until the process group timed out, and the group broke), nothing
    changes, the next call works (:func:`tests.parallel_worker.interrupted_checks`)."""
    _assert_check(one_rank, name)


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("fused", tmp_path_factory)


@pytest.mark.parametrize(
    "name",
    [
        "the sharded layers take the fused path, but a row-parallel one with a bias",
        "load",
        "the fused stand-in ran",
        "stack",
        "set_scale of a stack",
        "per-row routing",
        "the routed op ran",
        "compiled",
        "swap without recompiling",
    ],
)
def test_the_fused_path_on_the_shards_computes_the_unsharded_model(fused: list[dict[str, str]], name: str) -> None:
    _assert_check(fused, name)


def test_an_empty_shard_computes_the_unsharded_model(tmp_path: Path) -> None:
    results = run_ranks("empty_shard", tmp_path, world=3)
    for name in (
        "plan_targets checks the whole layers",
        "plan_targets refuses an adapter that fits a shard only",
        "an empty shard, whole batch",
        "an empty shard, per-row routing",
        "a sharded weight gathered after inject is refused",
        "after the refused gathering the model computes the unsharded one",
        "parallelizing ['0.base_layer', '2.base_layer'] after inject is refused",
        "after the refused ['0.base_layer', '2.base_layer'] the model computes what it did",
        "parallelizing ['2.base_layer'] after inject is refused",
        "after the refused ['2.base_layer'] the model computes what it did",
        "a weight made a DTensor behind nn.Module's back is refused at the next load",
    ):
        _assert_check(results, name)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return _scenario("replicated_targets", tmp_path_factory)


def test_a_model_whose_targets_are_all_replicated_keeps_its_ranks_alike(replicated: list[dict[str, str]]) -> None:
    """LoRA on layers a tensor-parallel model keeps whole on every rank (its ``lm_head``
    alone): a load failing on rank 1 only, or another scale on rank 1, changes no rank. Before,
    such a runtime had no agreement: rank 0 loaded alone and the ranks' logits differed
    (:func:`tests.parallel_worker.scenario_replicated_targets`)."""
    for name in (
        "a load only rank 1 fails",
        "unchanged after a load only rank 1 fails",
        "the ranks compute alike after a load only rank 1 fails",
        "another scale on rank 1",
        "unchanged after another scale on rank 1",
        "a load on every rank computes the unsharded model",
    ):
        _assert_check(replicated, name)


@pytest.fixture(scope="module")
def transformers_tp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    return _scenario("transformers", tmp_path_factory)


@pytest.mark.parametrize(
    "name",
    [
        "the sharded base model computes the unsharded one",
        "the layers take the style's layout",
        "inject keeps the outputs",
        "load",
        "load, autograd on",
        "an embedding_rowwise embedding takes a whole LoRA",
        "an embedding_rowwise embedding: load",
        "an embedding_rowwise embedding: load, autograd on",
        "an embedding_rowwise embedding: per-row routing",
        "an embedding_rowwise embedding: per-row routing, decode rows",
        "a load only rank 1 fails changes no rank, the embedding the only sharded target",
        "one all-reduce of [tokens, max_rank] per row-parallel layer, and nothing else",
        "swap to another slot",
        "swap in place",
        "stack",
        "set_scale of a stack",
        "per-row routing",
        "per-row routing, decode rows",
        "a file only rank 1 lacks changes no rank",
        "a file differing in rank 0's slice of a colwise layer on rank 1 changes no rank",
        "a file differing in rank 0's slice of a rowwise layer on rank 1 changes no rank",
        "plan_targets reads the whole layers",
        "unload",
        "eject restores the model",
        "a rowwise_split_input head takes a whole LoRA",
        "an embedding_colwise embedding takes a whole LoRA",
        "DeepSeek-V2's mla_kv_a_proj keeps its weight whole and takes a whole LoRA",
        "DeepSeek-V2 sharded by its tp_plan computes PEFT on the unsharded model",
        "compiled",
        "swap without recompiling",
        "swap to an adapter on the embedding without recompiling",
        "stack without recompiling",
        "set_scale without recompiling",
        "another input shape recompiles",
        *(
            f"parallelize_module: {name}"
            for name in ("load", "swap", "a weighted stack", "set_scale of a stack", "per-row routing", "unload")
        ),
    ],
)
def test_a_model_transformers_parallelized_computes_peft_on_the_unsharded_one(
    transformers_tp: list[dict[str, str]], name: str
) -> None:
    """transformers' own tensor parallelism (``from_pretrained(distributed_config=...)``): the
    colwise, rowwise and colwise_gather_output layers and the embedding_rowwise embedding take
    LoRA and compute what PEFT computes on the unsharded model, with one all-reduce of the shrink
    per row-parallel layer and none for the embedding. So does the same Llama sharded by
    ``parallelize_module`` instead, with adapters of ``rank_pattern`` / ``alpha_pattern`` and
    rsLoRA (:func:`tests.parallel_worker.peft_parallelized`)."""
    _assert_check(transformers_tp, name)
