"""The host cache is keyed by a source's identity (real path, size, mtime of what a read would
open; the Hub id with revision/subfolder/weight_name), and a ``key`` given to ``preload``
serves a later ``load(key)``."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from lorahot.errors import AdapterMismatchError, SourceNotFoundError
from lorahot.io import identity
from lorahot.io.identity import source_identity
from lorahot.runtime import cache as cache_module
from lorahot.runtime import lora_runtime, racy
from tests.helpers import make_adapter, save_peft, tiny_lm
from tests.reliability_helpers import assert_unchanged, build_rig, snapshot

Q0 = "layers.0.self_attn.q_proj"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Counts the runtime's reads of a source (a cache hit reads nothing)."""
    seen: list[object] = []
    real = lora_runtime.read_adapter

    def counting(source, **kwargs):
        seen.append(source)
        return real(source, **kwargs)

    monkeypatch.setattr(lora_runtime, "read_adapter", counting)
    return seen


def _setup(tmp_path: Path, seed: int = 1) -> tuple[torch.nn.Module, lorahot.LoraRuntime, Path]:
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    return model, runtime, save_peft(tmp_path / "ad", make_adapter(model, {Q0: 4}, seed=seed)[0], r=4)


def test_relative_and_absolute_path_are_one_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads) -> None:
    _, runtime, path = _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    runtime.preload("ad")
    runtime.preload(str(path.resolve()))
    assert len(runtime.cache) == 1
    runtime.load("./ad/../ad")
    assert len(reads) == 2  # the two preloads; the load was a hit


def test_a_file_rewritten_after_preload_is_read_again(tmp_path: Path, reads) -> None:
    model, runtime, path = _setup(tmp_path)
    runtime.preload(path)
    fresh, ab = make_adapter(model, {Q0: 4}, seed=9)  # same shapes, so the same size
    save_peft(path, fresh, r=4)
    runtime.load(path)
    assert len(reads) == 2
    a = runtime.layers[Q0].lora_A[:4]
    assert torch.equal(a, ab[Q0][0])


def test_a_config_rewritten_after_preload_is_read_again(tmp_path: Path, reads) -> None:
    _, runtime, path = _setup(tmp_path)
    runtime.preload(path)
    (path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    runtime.load(path)
    assert len(reads) == 2 and set(runtime.layers[Q0].lora_scale.tolist()) == {2.0}


def _coarse_clock(monkeypatch: pytest.MonkeyPatch, path: Path, after_ns: int) -> None:
    """Stands in a filesystem whose timestamps move in coarse ticks: from now on, the cache's
    stat of each file in ``path`` answers what it answers now (a same-size rewrite keeps size,
    mtime, ctime and inode), and its clock reads ``after_ns`` past the newest of those times."""
    frozen = {os.path.realpath(f): os.stat(f) for f in path.iterdir()}
    real = identity.file_stat
    monkeypatch.setattr(identity, "file_stat", lambda p: frozen.get(p) or real(p))
    newest = max(max(st.st_mtime_ns, st.st_ctime_ns) for st in frozen.values())
    monkeypatch.setattr(racy, "now_ns", lambda: newest + after_ns)


def _opened(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
    """Records every file under ``path`` lorahot opens from now on."""
    seen: list[str] = []
    real = os.open

    def counting(file, *args, **kwargs):
        if str(file).startswith(str(path)):
            seen.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return seen


@pytest.mark.parametrize("rewritten", ["weights", "config"])
def test_a_rewrite_within_the_timestamp_tick_of_preload_is_read_again(
    rewritten: str, tmp_path: Path, reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem with coarse timestamps (a jiffy on Linux before 6.13, 1-2 s on network
    filesystems and FAT), a same-size rewrite within the tick of preload's stat keeps the file's
    key: the old adapter was served, silently. A file written within the racy margin of its
    preload keeps a digest of what was read, and a load hashes it again."""
    model, runtime, path = _setup(tmp_path)
    (path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    _coarse_clock(monkeypatch, path, after_ns=1_000_000)  # preloaded 1 ms after the write
    runtime.preload(path)
    assert {p for p, _ in runtime.cache.peek(runtime.cache.keys()[0]).racy} == {
        os.path.realpath(path / n) for n in ("adapter_model.safetensors", "adapter_config.json")
    }
    fresh, ab = make_adapter(model, {Q0: 4}, seed=9)  # same shapes: the same size
    if rewritten == "weights":
        save_peft(path, fresh, r=4)
        (path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    else:
        (path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2}')
    runtime.load(path)
    assert len(reads) == 2
    want = ab[Q0][0] if rewritten == "weights" else make_adapter(model, {Q0: 4}, seed=1)[1][Q0][0]
    assert torch.equal(runtime.layers[Q0].lora_A[:4], want)
    assert set(runtime.layers[Q0].lora_scale.tolist()) == {2.0 if rewritten == "weights" else 0.5}


@pytest.mark.parametrize("written", ["within the margin", "before the margin"])
def test_an_unchanged_file_is_served_from_the_cache_and_an_old_one_is_not_hashed(
    written: str, tmp_path: Path, reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's digest of a recent file is what a load computes from the file (the load is
    a hit: no second read of the adapter, its files hashed once); a file older than the margin
    keeps the stat check alone: the load opens nothing."""
    _, runtime, path = _setup(tmp_path)
    recent = written == "within the margin"
    _coarse_clock(monkeypatch, path, after_ns=1_000_000 if recent else racy.MARGIN_NS + 1)
    runtime.preload(path)
    opened = _opened(monkeypatch, path)
    runtime.load(path)
    assert len(reads) == 1
    assert sorted(map(os.path.basename, opened)) == (
        ["adapter_config.json", "adapter_model.safetensors"] if recent else []
    )


def test_a_racy_entry_settles_once_its_files_are_older_than_the_margin(
    tmp_path: Path, reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter preloaded right after it was written is hashed at each load while its files
    are within the margin; the first load that finds them unchanged and older than it settles
    the entry (a later write changes their stat, hence the key), so later loads open nothing:
    before, every load of the entry hashed its files for as long as it stayed cached. A rewrite
    after that is still read again (its stat moved)."""
    model, runtime, path = _setup(tmp_path)
    _coarse_clock(monkeypatch, path, after_ns=1_000_000)
    runtime.preload(path)
    opened = _opened(monkeypatch, path)
    runtime.load(path)  # within the margin: hashed, kept racy
    assert len(opened) == 2 and runtime.cache.peek(runtime.cache.keys()[0]).racy
    newest = racy.now_ns() - 1_000_000
    monkeypatch.setattr(racy, "now_ns", lambda: newest + racy.MARGIN_NS + 1)
    runtime.load(path)  # older than the margin now: hashed once more, then settled
    assert len(opened) == 4 and runtime.cache.peek(runtime.cache.keys()[0]).racy == ()
    runtime.load(path)
    assert len(opened) == 4 and len(reads) == 1  # the stat check alone, a hit
    monkeypatch.undo()  # the real stat and clock: a rewrite lands in a later tick
    fresh, ab = make_adapter(model, {Q0: 4}, seed=9)
    time.sleep(0.01)
    save_peft(path, fresh, r=4)
    runtime.load(path)
    assert torch.equal(runtime.layers[Q0].lora_A[:4], ab[Q0][0])


def test_key_given_to_preload_serves_load_of_that_key(tmp_path: Path, reads, monkeypatch) -> None:
    _, runtime, path = _setup(tmp_path)
    prepared = runtime.preload(path, key="my-style")
    assert "my-style" in runtime.cache and prepared.key == "my-style"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a miss would go to the Hub and fail
    info = runtime.load("my-style", slot=0, scale=0.5)
    assert len(reads) == 1 and info.scale == 0.5 and info.source.endswith("adapter_model.safetensors")


@pytest.mark.parametrize("gone", ["no cache", "evicted", "discarded"])
def test_a_preload_key_the_cache_no_longer_holds_is_refused_not_read(
    gone: str, tmp_path: Path, reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key is a name, not a source: once its entry is gone (``cache_bytes=0``, evicted by a
    later preload, discarded), ``load(key)`` is refused with what to do, before anything is
    written, and nothing is read (it used to be read as a Hub id: a repository of that name
    would have been loaded in its place). ``load(prepared)`` still works."""
    model = tiny_lm()
    tensors, ab = make_adapter(model, {Q0: 4}, seed=1)
    path = save_peft(tmp_path / "ad", tensors, r=4)
    budget = 0 if gone == "no cache" else sum(t.numel() * 4 for t in tensors.values()) * 3 // 2
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4, cache_bytes=budget)
    prepared = runtime.preload(path, key="my-style")
    if gone == "evicted":
        runtime.preload(save_peft(tmp_path / "other", make_adapter(model, {Q0: 4}, seed=2)[0], r=4), key="other")
    elif gone == "discarded":
        runtime.cache.discard("my-style")
    assert "my-style" not in runtime.cache
    before = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reads.clear()
    with pytest.raises(lorahot.UsageError, match=r"'my-style' is a key given to preload.*runtime.load\(prepared\)"):
        runtime.load("my-style")
    after = [t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    assert reads == [] and all(torch.equal(t, u) for t, u in zip(after, before, strict=True))
    runtime.load(prepared)
    assert torch.equal(runtime.layers[Q0].lora_A[:4], ab[Q0][0])


def test_a_key_that_is_its_source_s_path_reads_the_file_again(tmp_path: Path, reads) -> None:
    """Negative control: where the key is the path itself, a miss reads that path, as any
    load of a path does."""
    model = tiny_lm()
    path = save_peft(tmp_path / "ad", make_adapter(model, {Q0: 4}, seed=1)[0], r=4)
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4, cache_bytes=0)
    runtime.preload(str(path), key=str(path))
    runtime.load(str(path))
    assert len(reads) == 2


def test_a_key_that_is_its_source_s_path_does_not_outlive_a_rewrite(tmp_path: Path, reads) -> None:
    """``preload(path, key=path)``: the key is the source's own name, so the entry is kept by
    the file's identity, and a rewritten file is read again (the key used to serve the old
    adapter, silently); so is a plain load of a path preloaded under it with a config."""
    model, runtime, path = _setup(tmp_path)
    runtime.preload(str(path), key=str(path))
    fresh, ab = make_adapter(model, {Q0: 4}, seed=9)
    save_peft(path, fresh, r=4)
    runtime.load(str(path))
    assert len(reads) == 2 and torch.equal(runtime.layers[Q0].lora_A[:4], ab[Q0][0])
    runtime.preload(str(path), key=str(path), config={"r": 4, "lora_alpha": 1})
    runtime.load(str(path))
    assert set(runtime.layers[Q0].lora_scale.tolist()) == {2.0}  # save_peft's alpha 8 / r 4, not 1 / 4


def test_read_options_with_a_preload_key_are_refused(tmp_path: Path, reads) -> None:
    """A key's adapter was read already: options for reading it are a mistake, said as such
    (they used to send the key to the Hub as a repository id)."""
    _, runtime, path = _setup(tmp_path)
    runtime.preload(path, key="my-style")
    with pytest.raises(lorahot.UsageError, match=r"read options \(strict\) do not apply to 'my-style'"):
        runtime.load("my-style", strict=False)
    assert len(reads) == 1


def test_a_preloaded_mapping_is_the_adapter_as_preloaded(tmp_path: Path) -> None:
    """The caller's tensors are not the entry's: filled with NaN after preload, they change
    neither a stack loaded from the prepared adapter (which reads the adapter's own tensors)
    nor its checks."""
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=8)
    tensors, ab = make_adapter(model, {Q0: 4}, seed=1)
    other, ab2 = make_adapter(model, {Q0: 4}, seed=2)
    want = torch.cat([ab[Q0][0], ab2[Q0][0]])  # before the fill: ab holds the same tensors
    prepared = runtime.preload(tensors)
    for t in tensors.values():
        t.fill_(float("nan"))
    runtime.load([prepared, other])
    assert torch.equal(runtime.layers[Q0].lora_A[:8], want)


@pytest.mark.parametrize("then", ["discarded", "preloaded again under its own name"])
def test_a_path_once_used_as_a_key_loads_the_path_once_preloaded_as_one(then: str, tmp_path: Path) -> None:
    """A path given as the key of another adapter is a key; preloaded as a source afterwards it
    is that source again: ``load(path)`` serves the file, not the refusal (or the old entry)."""
    model, runtime, path = _setup(tmp_path)
    other = make_adapter(model, {Q0: 4}, seed=7)[0]
    runtime.preload(other, key=str(path))
    if then == "discarded":
        runtime.cache.discard(str(path))
        runtime.preload(path)
    else:
        runtime.preload(str(path), key=str(path))
    runtime.load(str(path))
    direct = lorahot.inject(tiny_lm(), ["q_proj"], max_rank=4)
    direct.load(str(path))
    assert torch.equal(runtime.layers[Q0].lora_A, direct.layers[Q0].lora_A)


def test_a_preloaded_adapter_object_is_copied_whatever_its_tensors() -> None:
    """An :class:`Adapter` whose tensors are not graph leaves preloads (its deep copy was
    refused by torch), and later changes to its tensors do not reach a stack from the entry."""
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=8)
    tensors = make_adapter(model, {Q0: 4}, seed=1)[0]
    gain = torch.ones((), requires_grad=True)
    read = lorahot.read_adapter(tensors)
    adapter = dataclasses.replace(
        read, modules={k: dataclasses.replace(m, A=m.A * gain) for k, m in read.modules.items()}
    )
    want = adapter.modules[Q0].A.detach().clone()
    prepared = runtime.preload(adapter)
    with torch.no_grad():
        adapter.modules[Q0].A.mul_(0).add_(float("nan"))
    runtime.load([prepared, make_adapter(model, {Q0: 4}, seed=2)[0]])
    assert torch.equal(runtime.layers[Q0].lora_A[:4], want)


def test_read_options_are_part_of_the_key(tmp_path: Path, reads) -> None:
    _, runtime, path = _setup(tmp_path)
    runtime.preload(path)
    runtime.load(path, config={"lora_alpha": 2})  # other options: another adapter
    runtime.load(path)
    assert len(reads) == 2


def test_mapping_sources_are_never_looked_up(tmp_path: Path, reads) -> None:
    model, runtime, _ = _setup(tmp_path)
    tensors = make_adapter(model, {Q0: 2}, seed=3)[0]
    runtime.preload(tensors)
    runtime.load(tensors)
    assert len(reads) == 2


# -- source_identity ------------------------------------------------------------------------------


def test_identity_of_spellings_of_one_directory_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, path = _setup(tmp_path)
    os.symlink(path, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    ids = {source_identity(p) for p in ("ad", "./ad", str(path), path, tmp_path / "link")}
    assert len(ids) == 1 and next(iter(ids)).startswith(f"file:{os.path.realpath(path)}|")


def test_identity_follows_size_and_mtime_and_reads_no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, path = _setup(tmp_path)
    before = source_identity(path)
    weights = path / "adapter_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert source_identity(path) != before

    def no_open(*args, **kwargs):
        raise AssertionError("source_identity opened a file")

    monkeypatch.setattr("builtins.open", no_open)
    monkeypatch.setattr(Path, "open", no_open)
    assert source_identity(path) == source_identity(weights.parent)


def test_identity_honours_subfolder_and_weight_name(tmp_path: Path) -> None:
    model = tiny_lm()
    save_peft(tmp_path / "sub", make_adapter(model, {Q0: 2}, seed=1)[0])
    (tmp_path / "sub" / "other.safetensors").write_bytes(b"x")
    whole = source_identity(tmp_path, subfolder="sub")
    one = source_identity(tmp_path, subfolder="sub", weight_name="adapter_model.safetensors")
    assert whole != one and whole is not None and one is not None
    (tmp_path / "sub" / "other.safetensors").write_bytes(b"xy")
    assert source_identity(tmp_path, subfolder="sub", weight_name="adapter_model.safetensors") == one
    assert source_identity(tmp_path, subfolder="sub") != whole
    assert source_identity(tmp_path, subfolder="../x") is None  # the read refuses it, naming the problem


def test_identity_of_hub_ids_and_in_memory_sources() -> None:
    assert source_identity("org/name", revision="v1", subfolder="s").startswith('hub:["org/name", "v1", "s", ""]|')
    commit = "0123456789abcdef0123456789abcdef01234567"  # immutable: no ref to consult
    assert source_identity("org/name", revision=commit) == f'hub:["org/name", "{commit}", "", ""]'
    assert source_identity("org/name") != source_identity("org/name", revision="v1")
    # names holding the separators a joined key would use stay two sources (a hunt's collision)
    assert source_identity("org/name", subfolder="s|weight_name=w.safetensors") != source_identity(
        "org/name", subfolder="s", weight_name="w.safetensors|weight_name="
    )
    assert source_identity(Path("org/name")) is None  # a path object names a local path, here none
    assert source_identity({"a": torch.ones(1)}) is None
    assert source_identity("./no/such/dir") is None
    assert source_identity(42) is None
    assert identity.__all__ == ["source_identity", "source_files", "file_stat"]


# -- AdapterCache arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["2GB", -1, 2.5, True, None])
def test_cache_budget_must_be_bytes(budget: object) -> None:
    with pytest.raises(lorahot.UsageError, match=r"cache_bytes=.* must be an int number of bytes >= 0"):
        lorahot.AdapterCache(budget)  # type: ignore[arg-type]
    cache = lorahot.AdapterCache(10)
    with pytest.raises(lorahot.UsageError, match=r"must be an int number of bytes"):
        cache.budget_bytes = budget  # type: ignore[assignment]
    assert cache.budget_bytes == 10


def test_cache_keys_and_entries_are_checked() -> None:
    cache = lorahot.AdapterCache(10)
    with pytest.raises(lorahot.UsageError, match=r"cache keys are str, got list"):
        cache.get([1])  # type: ignore[arg-type]
    with pytest.raises(lorahot.UsageError, match=r"AdapterCache holds PreparedAdapter objects .*, not dict"):
        cache.put({})  # type: ignore[arg-type]
    assert [1] not in cache and len(cache) == 0


def test_an_entry_prepared_for_another_runtime_is_refused(tmp_path: Path) -> None:
    model, runtime, _ = _setup(tmp_path)
    other = lorahot.inject(tiny_lm(), ["q_proj", "v_proj"], max_rank=4)
    runtime.cache.put(other.preload(make_adapter(model, {Q0: 2}, seed=3)[0], key="theirs"))
    before = runtime.layers[Q0].lora_A.clone()
    with pytest.raises(lorahot.UsageError, match=r"^the cache entry 'theirs' was prepared for another runtime"):
        runtime.load("theirs")
    assert torch.equal(runtime.layers[Q0].lora_A, before)


def test_an_entry_counts_the_tensors_it_keeps_alive_besides_its_packs() -> None:
    """A float32 file for a float16 model: the entry keeps the file's tensors (for stacks and
    merged mode) beside its float16 packs, and counts both, each storage once, so the cache's
    budget bounds the host memory its entries hold."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).half()
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, cache_bytes=1 << 20)
    tensors = {
        f"base_model.model.{n}.lora_{k}.weight": torch.randn(shape)
        for n in ("0", "1")
        for k, shape in (("A", (8, 64)), ("B", (64, 8)))
    }
    runtime.preload(tensors, key="a")
    entry = runtime.cache.get("a")
    packs = sum(p.nbytes for p in entry.packs)
    files = sum(t.numel() * t.element_size() for t in tensors.values())
    assert entry.nbytes >= packs + files
    assert runtime.cache.nbytes == entry.nbytes


def test_the_budget_bounds_what_a_cache_of_many_small_adapters_keeps_alive(tmp_path: Path) -> None:
    """A server preloading thousands of small adapters: each entry's plan, packs and adapter
    objects count against the budget with its tensors' data, so what the entries keep alive
    stays within it. Before, an entry counted its data alone (about 2 KB for a rank-1 adapter
    on four layers of the tiny LM, which keeps about 26 KB alive): a 256 KiB cache kept 124 of
    them, 1 MB of Python objects and 3.7 MiB of RSS."""
    model = tiny_lm()
    budget = 256 << 10
    runtime = lorahot.inject(model, ["q_proj", "v_proj", "down_proj", "embed_tokens"], max_rank=4, cache_bytes=budget)
    names = list(runtime.layers)

    def preload(i: int) -> None:  # one header for all: the header and recipe memos keep one entry
        path = tmp_path / f"{i}.safetensors"
        save_file({k: v.contiguous() for k, v in make_adapter(model, dict.fromkeys(names, 1), seed=i)[0].items()}, path)
        runtime.preload(path)
        path.unlink()

    for i in range(20):  # warm: memos, read buffers, a full cache
        preload(i)
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(20, 320):
            preload(i)
        gc.collect()
        # Python objects only (the tensors' own data is not seen), and only those lorahot's code
        # allocated: what other threads of the process allocate meanwhile (pytest-xdist's channel
        # under load) is not the cache's
        package = os.path.join(os.path.dirname(lorahot.__file__), "*")
        traces = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, package)])
        kept = sum(stat.size for stat in traces.statistics("filename"))
        everything = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert runtime.cache.nbytes <= budget
    assert kept < budget, f"{len(runtime.cache)} entries keep {kept} bytes of objects ({everything} in all)"


def test_the_names_a_cache_remembers_are_bounded_in_bytes_and_an_entry_counts_its_key() -> None:
    """A name given to preload is any str: the cache remembers the last NAMES_KEPT of them and
    at most NAMES_BYTES together (the newest kept), and an entry's key counts against the
    budget. Before, 65,536 names of a megabyte each were all kept (64 GiB)."""
    cache = lorahot.AdapterCache(1 << 20)
    for i in range(40):
        cache.name(f"{i:03d}" + "x" * (1 << 20))  # 40 MiB of names
    kept = [i for i in range(40) if cache.is_name(f"{i:03d}" + "x" * (1 << 20))]
    assert kept == list(range(40 - len(kept), 40)) and 0 < len(kept) * (1 << 20) <= cache_module.NAMES_BYTES
    cache.unname(f"{39:03d}" + "x" * (1 << 20))
    cache.name("short")
    assert cache.is_name("short") and cache.is_name(f"{38:03d}" + "x" * (1 << 20))
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    tensors = make_adapter(model, {Q0: 4}, seed=1)[0]
    short, long = runtime.preload(tensors, key="k"), runtime.preload(tensors, key="k" * (1 << 20))
    assert long.nbytes - short.nbytes == len(long.key) - len(short.key)  # ASCII: a byte a character


def test_a_put_costs_the_same_in_a_cache_of_thousands_of_entries() -> None:
    """The cache keeps its entries' total: a put (and an eviction) into a cache of 8,000 entries
    costs what it does into one of 100. Before, each put summed every entry's size, once per
    eviction too: 0.8 ms a put at 8,000 entries and 8 ms at 40,000 on the CPU box (17 us now),
    which a cache of many small adapters reaches."""
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    entry = runtime.preload(make_adapter(model, {Q0: 4}, seed=1)[0], key="entry")
    cache = lorahot.AdapterCache(1 << 40)

    def seconds_per_put(tag: str) -> float:
        copies = [dataclasses.replace(entry, key=f"{tag}{i}") for i in range(100)]
        start = time.perf_counter()
        for copy in copies:
            cache.put(copy)
        return (time.perf_counter() - start) / len(copies)

    small = min(seconds_per_put(f"small{i}-") for i in range(3))
    for i in range(80):
        seconds_per_put(f"fill{i}-")
    assert len(cache) == 8_300
    large = min(seconds_per_put(f"large{i}-") for i in range(3))
    cache.budget_bytes = cache.nbytes - 1  # from now on every put evicts
    evicting = min(seconds_per_put(f"evict{i}-") for i in range(3))
    keys = cache.keys()
    assert cache.nbytes <= cache.budget_bytes and cache.nbytes == sum(cache.peek(k).nbytes for k in keys)
    cache.discard(keys[0])
    assert cache.nbytes == sum(cache.peek(k).nbytes for k in keys[1:])
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0
    assert max(large, evicting) < 10 * small + 1e-4, (small, large, evicting)


def test_a_failed_load_leaves_the_cache_order_and_a_load_marks_its_entries(tmp_path: Path) -> None:
    """Entries are least recently used first. A load that fails after its cache lookup (a part
    that is not there; a stack over max_rank) leaves the order as it was; a load that succeeds
    marks its entries most recently used (from the prepared packs, and each part of a list)."""
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=8)
    for name, rank, seed in (("first", 4, 1), ("second", 4, 2), ("big", 8, 3)):
        path = save_peft(tmp_path / name, make_adapter(model, {Q0: rank}, seed=seed)[0], r=rank)
        runtime.preload(path, key=name)
    assert runtime.cache.keys() == ["first", "second", "big"]
    with pytest.raises(SourceNotFoundError):
        runtime.load(["first", str(tmp_path / "missing")])
    with pytest.raises(AdapterMismatchError, match="max_rank 8"):
        runtime.load(["first", "big"], scale=[0.5, 0.5])
    assert runtime.cache.keys() == ["first", "second", "big"]
    runtime.load("first")
    assert runtime.cache.keys() == ["second", "big", "first"]
    runtime.load(["second", "first"], scale=[0.5, 0.5])
    assert runtime.cache.keys() == ["big", "second", "first"]


def test_a_load_that_fails_in_its_write_leaves_the_cache_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that passes every check and then fails while writing (here merged mode's rebuild
    of the weights: a WriteError, the slot emptied) served nothing: its entries keep their
    place, and a load that succeeds afterwards marks them."""
    from lorahot.errors import WriteError
    from lorahot.runtime import merge

    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4, merged=True)
    for name, seed in (("first", 1), ("second", 2)):
        runtime.preload(save_peft(tmp_path / name, make_adapter(model, {Q0: 4}, seed=seed)[0], r=4), key=name)
    real = merge.Merger.apply

    def failing(self: merge.Merger, *args: object, **kwargs: object) -> None:
        raise RuntimeError("device fault")

    monkeypatch.setattr(merge.Merger, "apply", failing)
    with pytest.raises(WriteError, match="device fault"):
        runtime.load("first")
    assert runtime.cache.keys() == ["first", "second"]
    monkeypatch.setattr(merge.Merger, "apply", real)
    runtime.load("first")
    assert runtime.cache.keys() == ["second", "first"]


def test_a_preloaded_base_weight_copy_is_compared_with_the_model_s_weight_at_load() -> None:
    """An adapter carrying a copy of the base weight (PEFT's ``base_layer.weight``, saved for
    LoRA on embeddings) loads only where it is the model's weight. Preloaded while it was, then
    the model's weight changed (``load_state_dict``), its load by key, by the prepared handle
    and as a stack's part is refused naming the layer, as a load of the tensors is, with every
    parameter, buffer and arena bitwise unchanged and the cache's order kept; they used to load
    it silently (preload's checks were not repeated). With the weight put back it loads again.
    (Merged mode refuses any load after ``load_state_dict`` changed a targeted weight.)"""
    model = tiny_lm()
    runtime = lorahot.inject(model, ["embed_tokens", "q_proj"], max_rank=8)
    tensors, ab = make_adapter(model, {"embed_tokens": 4}, seed=1)
    original = model.state_dict()["embed_tokens.weight"].clone()
    tensors["base_model.model.embed_tokens.base_layer.weight"] = original.clone()
    prepared = runtime.preload(tensors, key="emb")
    other = runtime.preload(make_adapter(model, {Q0: 4}, seed=2)[0], key="q")
    runtime.load("q")
    state = model.state_dict()
    state["embed_tokens.weight"] = original + 1
    model.load_state_dict(state)
    before = [t.clone() for t in (*model.state_dict(keep_vars=True).values(), *_arenas(runtime))]
    order = runtime.cache.keys()
    for source in (tensors, "emb", prepared, ["q", "emb"], [other, prepared]):
        with pytest.raises(
            AdapterMismatchError, match=r"embed_tokens .*carries a copy of the base weight that differs"
        ):
            runtime.load(source, slot=0)
    after = [*model.state_dict(keep_vars=True).values(), *_arenas(runtime)]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert runtime.cache.keys() == order
    state["embed_tokens.weight"] = original
    model.load_state_dict(state)
    runtime.load("emb")
    assert torch.equal(runtime.layers["embed_tokens"].lora_A[:4], ab["embed_tokens"][0])


def _arenas(runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    return [t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]


def _expanded(model: torch.nn.Module, as_adapter: bool) -> object:
    """A valid adapter whose q_proj A is an expanded view of one float: 2**40 elements (4 TiB
    once copied) held in 4 bytes."""
    tensors, _ = make_adapter(model, {Q0: 4}, seed=1)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(1, 1).expand(2**36, 16)
    if not as_adapter:
        return tensors
    adapter = lorahot.read_adapter(make_adapter(model, {Q0: 4}, seed=1)[0])
    module = dataclasses.replace(adapter.modules[Q0], A=tensors[key])
    return dataclasses.replace(adapter, modules={Q0: module})


@pytest.mark.parametrize("as_adapter", [False, True], ids=["mapping", "adapter"])
def test_a_tensor_no_layer_could_take_is_refused_before_it_is_copied(as_adapter: bool, tmp_path: Path) -> None:
    """preload and prefetch copy the caller's tensors: an expanded view declaring terabytes is
    refused from its shape, as a file's header is, by load, preload, prefetch and a stack alike,
    with the model and the runtime bitwise unchanged (copied, it could not be allocated)."""
    rig = build_rig(tmp_path / "rig")
    source = _expanded(rig.model, as_adapter)
    before = snapshot(rig)
    calls = [
        lambda: rig.runtime.preload(source),
        lambda: rig.runtime.preload(source, key="big"),
        lambda: rig.runtime.prefetch(source).result(timeout=60),
        lambda: rig.runtime.load(source, slot=1),
        lambda: rig.runtime.load([tmp_path / "rig" / "valid0", source], slot=1),
    ]
    for call in calls:
        with pytest.raises(AdapterMismatchError, match=r"declares shape \(68719476736, 16\) \(1099511627776 elements"):
            call()
        assert_unchanged(rig, before)


def test_a_path_whose_stat_fails_during_preload_is_not_cached_under_a_key_no_load_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[object]
) -> None:
    """A transient stat failure (EIO) while preload takes a file's identity left no identity, and
    the entry was cached under an anonymous key ('<str #0>') that no load of the path computes:
    it held its bytes of the budget until evicted, while load(path) read the file again. Such a
    preload is not cached (as a file that changed while it was read is not); what it returned
    loads, and the next preload is cached under the path's identity, which load(path) finds."""
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    tensors, _ = make_adapter(model, {Q0: 2}, seed=1, dtype=torch.float64)
    save_peft(tmp_path, tensors, r=2, lora_alpha=2)
    os.utime(tmp_path / "adapter_model.safetensors", (1e9, 1e9))  # older than the racy margin
    real, failures = identity._stat, [OSError(5, "Input/output error")]

    def flaky(path: Path) -> str:
        if failures:
            raise failures.pop()
        return real(path)

    monkeypatch.setattr(identity, "_stat", flaky)
    prepared = runtime.preload(str(tmp_path))
    assert runtime.cache.keys() == [] and runtime.cache.nbytes == 0
    assert runtime.load(prepared).ranks == {Q0: 2} and len(reads) == 1
    runtime.preload(str(tmp_path))
    runtime.load(str(tmp_path))
    assert len(reads) == 2 and len(runtime.cache.keys()) == 1  # the second preload's read alone
