"""lorahot's own safetensors reader: same tensors as the library, one buffer, honest failures."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorahot
from lorahot.io.safety import check_safetensors
from lorahot.io.tensorfile import read_tensors


@pytest.fixture
def data_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The paths whose data section lorahot's reader reads (a read of the header alone, on the
    meta device, is not one)."""
    from lorahot.io import sources

    read = sources.read_safetensors
    reads: list[object] = []

    def counting(p: object, device: object = None, *args: object) -> object:
        if device is None or getattr(device, "type", None) != "meta":
            reads.append(p)
        return read(p, device, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sources, "read_safetensors", counting)
    return reads


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a.safetensors"
    tensors = {
        "odd.f16": torch.randn(3, dtype=torch.float16),  # 6 bytes: the next tensor starts misaligned
        "x.f32": torch.randn(5, 7),
        "y.bf16": torch.randn(2, 3, 4).to(torch.bfloat16),
        "z.f64": torch.randn(4, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(path))
    return path


def test_reads_what_safetensors_reads(tmp_path: Path) -> None:
    path = _file(tmp_path)
    ours = read_tensors(path, check_safetensors(path))
    theirs = load_file(str(path))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_large_file_is_read_in_parallel_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorahot.io.tensorfile as tf

    monkeypatch.setattr(tf, "_CHUNK", 1000)  # many chunks for a small file
    path = _file(tmp_path)
    ours = read_tensors(path, check_safetensors(path))
    assert all(torch.equal(ours[k], v) for k, v in load_file(str(path)).items())


def test_a_failed_chunk_read_returns_only_once_no_other_chunk_still_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are read on several threads; where one fails, the read raises only once the others
    have stopped: the caller then closes the descriptor and reuses the buffer (the runtime's read
    buffers), which a straggling chunk would otherwise read from a closed, perhaps reused,
    descriptor into. Before, the failure returned at once with three chunks still reading."""
    import lorahot.io.tensorfile as tf

    monkeypatch.setattr(tf, "_CHUNK", 64)
    path = _file(tmp_path)
    header = check_safetensors(path)
    real, running, first = os.preadv, [0], header.data_start
    lock = threading.Lock()

    def slow_or_failing(fd: int, bufs: list[memoryview], offset: int) -> int:
        if offset == first:
            raise OSError(5, "Input/output error")
        with lock:
            running[0] += 1
        time.sleep(0.05)
        try:
            return real(fd, bufs, offset)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(os, "preadv", slow_or_failing)
    with pytest.raises(lorahot.AdapterReadError, match="cannot read the tensor data"):
        read_tensors(path, header)
    assert running[0] == 0


def test_file_shrunk_after_header_check_is_a_read_error(tmp_path: Path) -> None:
    path = _file(tmp_path)
    header = check_safetensors(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(lorahot.AdapterReadError, match=r"a\.safetensors: the file is shorter than its header says"):
        read_tensors(path, header)


@pytest.mark.parametrize("when", ["after the header", "during the data read"])
def test_file_rewritten_in_place_while_read_is_a_read_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Another writer rewrites the file in place, same size, between the header check and the end
    of the data read: the read is refused (its data could mix both versions: found by an
    independent audit, 3 torn reads in 300 prefetches), and a load through a runtime changes
    nothing. The sleep crosses the file system's timestamp tick, as any real rewrite does."""
    import time

    from lorahot.io import sources, tensorfile

    path = _file(tmp_path)
    other = {k: v + 1 for k, v in load_file(path).items()}
    save_file(other, tmp_path / "b.safetensors")
    rewritten = (tmp_path / "b.safetensors").read_bytes()
    assert len(rewritten) == path.stat().st_size

    def rewrite() -> None:
        time.sleep(0.05)
        with open(path, "r+b") as f:
            f.seek(len(rewritten) // 2)
            f.write(rewritten[len(rewritten) // 2 :])

    if when == "after the header":
        check = sources.check_safetensors
        monkeypatch.setattr(sources, "check_safetensors", lambda *a: (check(*a), rewrite())[0])
    else:
        read_into = tensorfile._read_into
        monkeypatch.setattr(tensorfile, "_read_into", lambda *a: (read_into(*a), rewrite())[0])
    with pytest.raises(
        lorahot.AdapterReadError, match=r"a\.safetensors: the file changed while its tensor data was read"
    ):
        sources.read_safetensors(path)  # the file's tensors are no adapter: read_adapter refuses them first


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int64, torch.bool]


@settings(max_examples=40, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=8
    ),
    seed=st.integers(0, 2**16),
)
def test_any_mix_of_dtypes_shapes_and_offsets_reads_back_exactly(
    tmp_path_factory: pytest.TempPathFactory, specs: list[tuple[torch.dtype, list[int]]], seed: int
) -> None:
    """Scalars, empty tensors, and tensors that start off their element boundary (after an odd
    sized neighbour) all come back equal to the library's, contiguous, with their own dtype."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
        for i, (dtype, shape) in enumerate(specs)
    }
    path = tmp_path_factory.mktemp("mix") / "m.safetensors"
    save_file(tensors, str(path))
    ours = read_tensors(path, check_safetensors(path))
    for k, v in load_file(str(path)).items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and ours[k].is_contiguous(), k
        assert torch.equal(ours[k], v), k


def test_a_sparse_file_declaring_a_huge_tensor_is_refused_before_its_data_is_read(tmp_path: Path) -> None:
    """A few kilobytes on disk that declare 2 GiB of factor under an injected layer's key: the
    runtime refuses it from the header (the load read and allocated the whole 2 GiB, 6 GiB in
    the audit's case, before the rank check failed)."""
    import json
    import time

    rows = 1 << 26  # x 8 float32 columns: 2 GiB
    header = json.dumps(
        {
            "base_model.model.0.lora_A.weight": {"dtype": "F32", "shape": [rows, 8], "data_offsets": [0, rows * 32]},
            "base_model.model.0.lora_B.weight": {
                "dtype": "F32",
                "shape": [4, 2],
                "data_offsets": [rows * 32, rows * 32 + 32],
            },
        }
    ).encode()
    path = tmp_path / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + rows * 32 + 32)  # sparse: nothing written
    runtime = lorahot.inject(torch.nn.Sequential(torch.nn.Linear(8, 4)), ["0"], max_rank=4)
    start = time.perf_counter()
    # the fit planned from the header at the file's first read (B's shape does not match A's rank)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"B has shape \(4, 2\), expected \(4, 67108864\)"):
        runtime.load(path)
    assert time.perf_counter() - start < 5
    assert runtime.info(0) is None


def test_a_file_whose_tensors_cannot_form_an_adapter_is_refused_before_its_data_is_read(
    tmp_path: Path, data_reads: list[object]
) -> None:
    """A sparse file of a few hundred KB declaring 2,000 unpaired A tensors (32 MB of data): the
    load allocated and read the whole data section before it found them unpaired (an independent
    audit: 343 MB for a 1.9 MB file). A file seen the first time is now grouped into modules from
    its header alone first; a second load of a good file reads its header's recipe only once."""
    import json

    n, numel = 2000, 2000
    header = json.dumps(
        {
            f"base_model.model.junk.{i}.lora_A.weight": {
                "dtype": "F64",
                "shape": [numel],
                "data_offsets": [i * numel * 8, (i + 1) * numel * 8],
            }
            for i in range(n)
        }
    ).encode()
    path = tmp_path / "junk.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + n * numel * 8)
    runtime = lorahot.inject(torch.nn.Sequential(torch.nn.Linear(8, 4)), ["0"], max_rank=4)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"junk\.0: has lora_A .* but no lora_B"):
        runtime.load(path)
    assert data_reads == []
    good = tmp_path / "good.safetensors"
    save_file(
        {"base_model.model.0.lora_A.weight": torch.randn(2, 8), "base_model.model.0.lora_B.weight": torch.randn(4, 2)},
        good,
    )
    runtime.load(good)
    runtime.load(good)
    assert len(data_reads) == 2


@pytest.mark.parametrize("checked", [True, False], ids=["header-first", "negative-control"])
@pytest.mark.parametrize("misfit", ["another model's modules", "shapes of another width", "another model's DoRA"])
def test_an_adapter_that_cannot_fit_the_model_is_refused_before_its_data_is_read(
    misfit: str, checked: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_reads: list[object]
) -> None:
    """A well-formed adapter made for another model (its modules pair, but name no injected
    layer, or their shapes do not fit it): the first read of the file plans its fit from the
    header alone and refuses it with the load's own message before the data is read, each time
    (a refused file's structure is not memoized). The negative control plans nothing from the header:
    the same refusal comes after the whole data was read."""
    from lorahot.runtime import lora_runtime

    if not checked:
        monkeypatch.setattr(lora_runtime, "check_fit", lambda *args: None)
    width, name = 8, "0"
    if misfit == "another model's modules":
        name = "encoder.layers.3.fc"
    elif misfit == "shapes of another width":
        width = 16
    path = tmp_path / "adapter.safetensors"
    prefix = f"base_model.model.{name}"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(2, width), f"{prefix}.lora_B.weight": torch.randn(4, 2)}
    if misfit == "another model's DoRA":  # a magnitude of another width
        tensors[f"{prefix}.lora_magnitude_vector"] = torch.rand(6)
    save_file(tensors, path)
    runtime = lorahot.inject(torch.nn.Sequential(torch.nn.Linear(8, 4)), ["0"], max_rank=4)
    message = {
        "another model's modules": r"encoder\.layers\.3\.fc",
        "another model's DoRA": r"DoRA magnitude vector has shape \(6,\), expected 4 values",
        "shapes of another width": r"A has shape \(2, 16\), expected \(r, 8\)",
    }[misfit]
    for _ in range(2):
        with pytest.raises(lorahot.AdapterMismatchError, match=message):
            runtime.load(path)
    assert data_reads == ([] if checked else [path, path])


def test_a_failed_fstat_of_an_open_adapter_file_is_a_read_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.fstat`` of an adapter file lorahot holds open fails (EIO on a network or failing
    disk; ESTALE on NFS) at its k-th call of a load, for every k: a typed read error naming
    the file, never an ``UnexpectedError`` that calls it a gap in lorahot's checks (the stamp
    taken to refuse a file rewritten while it is read, ``tensorfile.file_stamp``, let the
    ``OSError`` through: 3 of the load's fstat calls); the runtime's buffers, slots and output
    are bitwise as before; then the load goes through and computes the float64 reference."""
    import copy
    import errno

    from tests.helpers import make_adapter, model_reference, save_peft

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)).double()
    plain = copy.deepcopy(model)
    runtime = lorahot.inject(model, ["0", "1"], max_rank=4)
    first, _ = make_adapter(model, {"0": 2, "1": 2}, seed=1, dtype=torch.float64)
    runtime.load(first)
    tensors, ab = make_adapter(model, {"0": 2, "1": 3}, seed=2, dtype=torch.float64)
    folder = save_peft(tmp_path / "adapter", tensors, r=2, rank_pattern={"1": 3}, lora_alpha=4)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        before_out = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = os.fstat, [0, 0]  # calls so far, the one that fails

    def fstat(fd: int) -> os.stat_result:
        calls[0] += 1
        if calls[0] == calls[1]:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    failed = 0
    for k in range(1, 100):
        calls[:] = [0, k]
        try:
            runtime.load(folder)
        except lorahot.LoraError as exc:
            failed += 1
            where = f"fstat failing at its call {k}"
            assert not isinstance(exc, lorahot.UnexpectedError), f"{where}: {exc}"
            assert str(folder) in str(exc) and "Input/output error" in str(exc), f"{where}: {exc}"
            assert runtime.info(0) is not None and runtime.info(0).ranks == {"0": 2, "1": 2}, where
            assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items()), where
            with torch.no_grad():
                assert torch.equal(model(x), before_out), where
            continue
        if calls[0] < k:  # went through with every fstat answered
            break
    monkeypatch.setattr(os, "fstat", real)
    assert failed >= 3, f"a load made {failed} fstat calls"
    runtime.load(folder)
    loras = {n: (a, b, (4 / 2 if n == "0" else 4 / 3)) for n, (a, b) in ab.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), model_reference(plain, x, loras), rtol=1e-12, atol=1e-12)
