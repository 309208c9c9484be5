"""The compile contract for mixed batches: a new per-row routing of the same length never
recompiles (``error_on_recompile=True``), a switch between whole-batch and per-row mode compiles
each mode's graph once, and a new batch size does recompile under static shapes (the negative
control) but not under dynamic shapes."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo.testing

import lorahot
from lorahot.runtime import wide as wide_layers
from tests.helpers import make_adapter, model_reference, stack_reference, tiny_convnet, tiny_lm, token_ids

TARGETS = ["q_proj", "v_proj", "up_proj", "embed_tokens"]


def _setup(slots: int = 3, device: str = "cpu") -> tuple[torch.nn.Module, lorahot.LoraRuntime, list[dict]]:
    """The tiny LM on ``device`` with an adapter in each slot, and those adapters' (host) factors."""
    model = tiny_lm().to(device)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=slots)
    names = list(runtime.layers)
    held = []
    for k in range(slots):
        ranks = {n: 1 + (k + i) % 4 for i, n in enumerate(names) if (k + i) % 3}
        tensors, ab = make_adapter(model, ranks, seed=k)
        runtime.load(tensors, slot=k)
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    return model, runtime, held


def _per_row(route: list[int], x: torch.Tensor, output_of: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Row ``i`` of ``output_of(x, route[i])``, the float64 reference of the whole batch ``x``
    with that slot's adapter (none for -1). The reference models compute each row on its own
    (no batch norm; a sequence attends to itself alone), so a row of the whole batch's forward
    is that row's forward alone: each slot's reference runs once, not once per row."""
    outputs = {slot: output_of(x, slot) for slot in dict.fromkeys(route)}
    return torch.stack([outputs[slot][i] for i, slot in enumerate(route)])


def _expected(
    ids: torch.Tensor, route: list[int], held: list[dict], reference: torch.nn.Module | None = None
) -> torch.Tensor:
    """Each row through the float64 reference (``reference``, else the tiny LM) with its slot's
    adapter, or none for -1."""
    reference = tiny_lm() if reference is None else reference
    return _per_row(route, ids, lambda x, s: model_reference(reference, x, held[s] if s >= 0 else {}))


@pytest.mark.parametrize("wide", [False, True])
def test_new_routings_and_mode_switches_do_not_recompile(wide: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One graph per mode, none for a new routing or a routed slot's new weights, one for a new
    batch size (the negative control), each output at the per-row float64 reference. The graph
    counts are dynamo's (its guards), the same under any backend: the library formula's layers
    (``wide=False``) compile with ``aot_eager``; the wide layers with inductor, whose default mode
    gives their whole-batch forward to lorahot's wide-group lowering (checked at the reference
    after ``activate(2)``)."""
    if wide:  # the CUDA one-GEMM layers on the CPU: the routed path uses their base rows
        monkeypatch.setattr(wide_layers, "DEVICE_TYPES", {"cpu"})
    model, runtime, held = _setup()
    assert runtime.layers["layers.0.self_attn.q_proj"].wide == wide
    ids = token_ids((4, 6), 32, seed=1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if wide else "aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(ids)  # whole batch, slot 0
        runtime.activate([0, 1, 2, -1])
        torch.testing.assert_close(compiled(ids).double(), _expected(ids, [0, 1, 2, -1], held), rtol=1e-4, atol=1e-5)
        assert counter.frame_count == 2  # one graph per mode
        with torch._dynamo.config.patch(error_on_recompile=True):
            for route in ([2, 2, 0, 1], [-1, -1, -1, 0], torch.tensor([1, 0, 1, 2])):
                runtime.activate(route)
                want = _expected(ids, list(map(int, route)), held)
                torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)
            runtime.load(make_adapter(model, {"layers.1.mlp.up_proj": 3}, seed=9)[0], slot=1)  # a routed slot changes
            held[1] = {
                "layers.1.mlp.up_proj": (
                    *make_adapter(model, {"layers.1.mlp.up_proj": 3}, seed=9)[1]["layers.1.mlp.up_proj"],
                    1.0,
                )
            }
            torch.testing.assert_close(compiled(ids).double(), _expected(ids, [1, 0, 1, 2], held), rtol=1e-4, atol=1e-5)
            runtime.activate(2)  # back to the whole batch: its graph is kept
            torch.testing.assert_close(compiled(ids).double(), _expected(ids, [2] * 4, held), rtol=1e-4, atol=1e-5)
            runtime.activate([0, 0, 1, 1])
            torch.testing.assert_close(compiled(ids).double(), _expected(ids, [0, 0, 1, 1], held), rtol=1e-4, atol=1e-5)
            with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control: a new batch size
                runtime.activate([0, 1])
                compiled(ids[:2])
    assert counter.frame_count == 2


def test_negative_control_a_first_mode_switch_compiles_once() -> None:
    model, runtime, _ = _setup()
    ids = token_ids((2, 5), 32, seed=2)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)  # dynamo's guards: any backend
    with torch.no_grad():
        compiled(ids)
        runtime.activate([0, 1])
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(ids)


def _fused_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers injected from here on take the fused routed path, its operator's CPU formula
    standing in for the kernels, with the fused kernel's row limits."""
    from lorahot.kernels import lora_linear, routed_lora

    monkeypatch.setattr(lora_linear, "supports", lambda base, a: True)
    monkeypatch.setattr(routed_lora, "available", lambda: True)


def test_the_fused_routed_path_compiles_once_for_every_routing_with_static_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The routed linears' one-call compiled path (``lorahot.layers.linear.compiled_routed``), the
    operator's CPU formula standing in for the kernels: each routing's output equals the per-row
    reference, on one graph; an input that does not fit the routing is still refused (the
    general path's refusal). Compiled with ``aot_eager``: the graph count and the refusal are
    dynamo's, and inductor's lowering of the fused path's per-row graph is checked at the
    reference by
    :func:`test_per_row_and_per_token_routings_compile_once_each_and_read_the_batch_as_they_say`
    (the stacking of shrinks off, as here) and
    :func:`test_routed_layers_sharing_an_input_share_one_shrink` (on; this batch and routings)."""
    _fused_on_the_cpu(monkeypatch)
    model, runtime, held = _setup()
    assert runtime.layers["layers.0.self_attn.q_proj"]._plan[1]
    ids = token_ids((4, 6), 32, seed=1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        runtime.activate([0, 1, 2, -1])
        torch.testing.assert_close(compiled(ids).double(), _expected(ids, [0, 1, 2, -1], held), rtol=1e-4, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for route in ([2, 2, 0, 1], [-1, -1, -1, 0], torch.tensor([1, 0, 1, 2])):
                runtime.activate(route)
                want = _expected(ids, list(map(int, route)), held)
                torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
    runtime.activate([0, 1, 2])  # three entries for a batch of four
    with torch.no_grad(), pytest.raises(lorahot.UsageError, match="does not fit a routing of 3 entries"):
        torch.compile(model, backend="aot_eager", dynamic=False)(ids)


def _linear_model(extras: bool) -> tuple[torch.nn.Module, lorahot.LoraRuntime]:
    """Two routed linears (slots 0 and 1; slot 0's first layer with a LoRA bias where ``extras``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, slots=2, extras=extras)
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for n, (fin, fout) in {"0": (8, 6), "2": (6, 4)}.items():
            tensors[f"{n}.lora_A.weight"] = torch.randn(3, fin, generator=g)
            tensors[f"{n}.lora_B.weight"] = torch.randn(fout, 3, generator=g)
        if extras and k == 0:
            tensors["0.lora_B.bias"] = torch.randn(6, generator=g)
        runtime.load(lorahot.read_adapter(tensors, config={"r": 3, "lora_alpha": 3, "lora_bias": extras}), slot=k)
    return model, runtime


@pytest.mark.parametrize("case", ["lora bias", "autograd"])
def test_the_compiled_routed_path_leaves_what_it_does_not_serve_to_the_general_path(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled, a routed linear on the fused path takes its one-call form only without extras
    and without autograd (the operator has neither): a LoRA bias, or a forward autograd must
    see, gives the general path's output, as eagerly."""
    _fused_on_the_cpu(monkeypatch)
    model, runtime = _linear_model(extras=case == "lora bias")
    assert model[0]._plan[1]
    runtime.activate([0, 1, -1])
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.enable_grad() if case == "autograd" else torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.requires_grad == (case == "autograd")


def test_a_compiled_routed_linear_refuses_an_input_that_does_not_fit_the_routing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linear layers only (no other layer kind to refuse for them): a batch of 2 sequences of 4
    tokens against a routing of 4 entries is refused, compiled as eagerly."""
    _fused_on_the_cpu(monkeypatch)
    model, runtime = _linear_model(extras=False)
    runtime.activate([0, -1, 0, -1])
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        with pytest.raises(lorahot.UsageError, match="does not fit a routing of 4 entries"):
            model(x)
        with pytest.raises(lorahot.UsageError, match="does not fit a routing of 4 entries"):
            torch.compile(model, backend="aot_eager", dynamic=False)(x)


@pytest.mark.parametrize("fused", [False, True])
def test_per_row_and_per_token_routings_compile_once_each_and_read_the_batch_as_they_say(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same batch ``[2, 4]`` routed per row and per token (``lengths=``): one graph each
    (the compiler guards on which), both equal to the per-row reference, later routings of
    either kind recompile nothing; a per-row routing of 8 entries is not read as 8 tokens
    (refused, compiled as eagerly): only ``lengths=`` says a routing is per token. The fused
    path compiles with inductor (its routed operator lowered there, per row and per token); the
    library formula with ``aot_eager`` (the graph counts are dynamo's guards, as under inductor).

    The fused case is also the negative control of
    :func:`test_routed_layers_sharing_an_input_share_one_shrink`: the stacking of routed shrinks
    off (``stacked_routed.ENABLED``, its default), the post-grad graph of its first (per-row)
    compile holds the six routed linears alone, each with its own shrink."""
    from lorahot.kernels import stacked_routed

    if fused:
        _fused_on_the_cpu(monkeypatch)
        monkeypatch.setattr(stacked_routed, "ENABLED", False)
    model, runtime, held = _setup()
    ids = token_ids((2, 4), 32, seed=5)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if fused else "aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    ops: list[str] = []
    with torch.no_grad():
        for route in ([1, 0], [0, 2], [2, -1]):
            with torch._dynamo.config.patch(error_on_recompile=route != [1, 0]):
                want = _expected(ids, route, held)
                runtime.activate(route)
                with _recording_routed_ops(ops) if route == [1, 0] else contextlib.nullcontext():
                    torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)
                runtime.activate(route, lengths=[4, 4])
                torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)
        assert counter.frame_count == 2
        if fused:  # the stacking's negative control: the pass off, each layer its own shrink
            assert ops == ["lorahot.routed_lora_linear.default"] * 6
        runtime.activate([1, 1, 1, 1, 0, 0, 0, 0])
        with pytest.raises(lorahot.UsageError, match="does not fit a routing of 8 entries"):
            torch.compile(model, backend="aot_eager", dynamic=False)(ids)


@contextlib.contextmanager
def _recording_routed_ops(seen: list[str]) -> Iterator[None]:
    """Appends to ``seen`` the lorahot operators of each post-grad graph inductor compiles in
    the block (after lorahot's own passes), sorted; the FX graph cache off, so that the graph is
    compiled and seen."""

    def record(graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and "lorahot" in str(node.target):
                seen.append(f"{node.target}{'+h' if node.kwargs.get('h') is not None else ''}")

    with torch._inductor.config.patch(post_grad_custom_post_pass=record, fx_graph_cache=False):
        yield
    seen.sort()


def _routed_ops(model: torch.nn.Module, ids: torch.Tensor, dynamic: bool) -> tuple[list[str], torch.nn.Module]:
    """The lorahot operators of the compiled model's post-grad graph (after lorahot's own
    passes), and the compiled model (first called on ``ids``)."""
    seen: list[str] = []
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    with _recording_routed_ops(seen), torch.no_grad():
        compiled(ids)
    return seen, compiled


def test_routed_layers_sharing_an_input_share_one_shrink(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``LORAHOT_STACK_ROUTED`` on (``stacked_routed.ENABLED``), the routed q_proj and
    v_proj of each block (their A rows adjacent in the arena, one input) take one routed shrink
    and each its columns of it; up_proj alone keeps its own. Every routing's output equals the
    per-row reference on one graph (the operators' CPU formulas standing in for the kernels:
    the layers' expands read the stacked shrink's columns there too). The negative control (the
    pass off: six routed linears, no shared shrink) is the inductor compile of the same fused
    model in
    :func:`test_per_row_and_per_token_routings_compile_once_each_and_read_the_batch_as_they_say`."""
    from lorahot.kernels import stacked_routed

    _fused_on_the_cpu(monkeypatch)
    monkeypatch.setattr(stacked_routed, "ENABLED", True)
    model, runtime, held = _setup()
    ids = token_ids((4, 6), 32, seed=1)
    runtime.activate([0, 1, 2, -1])
    ops, compiled = _routed_ops(model, ids, dynamic=False)
    linear, shrink = "lorahot.routed_lora_linear.default", "lorahot.routed_shrink.default"
    assert ops == [linear] * 2 + [f"{linear}+h"] * 4 + [shrink] * 2
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for route in ([0, 1, 2, -1], [2, 2, 0, 1], [-1, -1, -1, 0]):
            runtime.activate(route)
            torch.testing.assert_close(compiled(ids).double(), _expected(ids, route, held), rtol=1e-4, atol=1e-5)


def _q_proj_guards(fused: bool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The guards a compiled routed forward of the tiny model puts on its first q_proj."""
    with monkeypatch.context() as m:
        if fused:
            _fused_on_the_cpu(m)
        model, runtime, _ = _setup()
    runtime.activate([0, 1, 2, -1])
    with torch.no_grad():
        guards = torch._dynamo.explain(model)(token_ids((4, 6), 32, seed=1)).out_guards
    layer = "._modules['layers']._modules['0']._modules['self_attn']._modules['q_proj']"
    return sorted(f"{g.create_fn_name()} {g.name}" for g in guards if layer in g.name)


def test_a_compiled_routed_linear_is_guarded_on_little_more_than_its_base_linear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compiled call re-checks every guard, for every layer, on every call: on an H200 host
    the routed decode's guards cost 0.28 ms per call more than the base model's (154 layers,
    ``benchmarks/experiments/mixed_profile_probe.py``). A routed linear on the fused path is
    traced in one function (``lorahot.layers.linear.compiled_routed``): its guards are the module's own
    (type, hooks, its forward), its plan's and slot geometry's, and its base linear's. The
    general routed path (the library formula, which CPU layers take) is the control: every
    method it calls on the layer is one more guard."""
    fused, general = _q_proj_guards(True, monkeypatch), _q_proj_guards(False, monkeypatch)
    assert len(fused) <= 16, fused
    assert len(general) >= len(fused) + 16, general


@pytest.mark.parametrize("fused", [False, True])
def test_dynamic_shapes_serve_every_batch_size_with_one_routed_graph(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One graph for every batch size. Where the fused routed path applies, the row counts
    cross its limits (16 and 128 rows: 12 to 200 here) and its operator chooses per call, so
    that too compiles once; and with the stacking of routed shrinks on
    (``stacked_routed.ENABLED``), lorahot's pass leaves each layer its own shrink there (the
    operator chooses per call between the fused path and the segmented pair, which shrinks for
    itself): the post-grad graph holds the six routed linears alone. Both compile with
    inductor: its lowering of the library formula's routed layers and of the fused path's
    operator for a symbolic row count, each output at the float64 reference (the other dynamic
    tests of the routed LM compile with ``aot_eager`` and count on this one for that), and
    lorahot's pass on the fused path's post-grad graph."""
    from lorahot.kernels import stacked_routed

    if fused:
        _fused_on_the_cpu(monkeypatch)
        monkeypatch.setattr(stacked_routed, "ENABLED", True)
    model, runtime, held = _setup()
    assert runtime.layers["layers.0.self_attn.q_proj"]._plan[1] == fused
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    ops: list[str] = []
    with torch.no_grad():
        runtime.activate([0, 1, 2])
        with _recording_routed_ops(ops):
            compiled(token_ids((3, 4), 32, seed=0))
        if fused:
            assert ops == ["lorahot.routed_lora_linear.default"] * 6
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rows, length in ((5, 4), (2, 7), (6, 3), (40, 5)):
                route = [(i % 4) - 1 for i in range(rows)]
                runtime.activate(route)
                ids = token_ids((rows, length), 32, seed=rows)
                torch.testing.assert_close(compiled(ids).double(), _expected(ids, route, held), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == frames


@pytest.mark.parametrize("kind", ["lm", "conv"])
def test_a_batch_marked_dynamic_routes_every_batch_size_with_one_graph(kind: str) -> None:
    """``torch._dynamo.mark_dynamic(ids, 0)``, as the base model takes it, under per-row routings
    of every batch size: the routing's length is the batch's, so a constant length would
    specialize the batch marked dynamic, which torch refuses (ConstraintViolationError). One
    routed graph serves them all. The conv compiles with inductor, whose lowering of a
    convolution fixes its group count (a batch in it would be specialized there, not in dynamo:
    :func:`test_negative_control_a_routed_conv_grouped_by_a_symbolic_batch_recompiles`); the LM
    with ``aot_eager`` (its refusal and graph count are dynamo's; inductor's lowering of its
    routed layers under a dynamic batch is checked at the reference by
    :func:`test_dynamic_shapes_serve_every_batch_size_with_one_routed_graph`)."""
    model, runtime, held = _routed_convnet() if kind == "conv" else _setup()
    reference, vocab, tail = (tiny_convnet(), 16, (5, 5)) if kind == "conv" else (tiny_lm(), 32, (6,))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if kind == "conv" else "aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for k, rows in enumerate((4, 3, 6, 2)):
            route = [(i % 3) - 1 for i in range(rows)]
            runtime.activate(route)
            ids = token_ids((rows, *tail), vocab, seed=rows)
            torch._dynamo.mark_dynamic(ids, 0)
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                got = compiled(ids)
            torch.testing.assert_close(got.double(), _expected(ids, route, held, reference), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_runtime_calls_inside_a_compiled_step_run_as_they_do_eagerly() -> None:
    """A serving step compiled whole, ``runtime.activate(slots)`` then the model: the call runs
    eagerly behind a graph break. Routings of new lengths (whose tensors are allocated then)
    raised an UnexpectedError from inside dynamo; activate(k), set_scale, load and unload in the
    step compute what they do outside it."""
    model, runtime, held = _setup()

    @torch.compile(backend="aot_eager", dynamic=True)
    def step(ids: torch.Tensor, route: object, scale: float) -> torch.Tensor:
        runtime.activate(route)
        runtime.set_scale(scale, slot=1)
        return model(ids)

    with torch.no_grad():
        for rows, scale in ((3, 1.0), (5, 0.5), (2, -1.5), (4, 2.0)):
            route = [(i % 4) - 1 for i in range(rows)]
            held[1] = {n: (a, b, scale) for n, (a, b, _) in held[1].items()}
            ids = token_ids((rows, 5), 32, seed=rows)
            for given in (route, torch.tensor(route)):
                torch.testing.assert_close(
                    step(ids, given, scale).double(), _expected(ids, route, held), rtol=1e-4, atol=1e-5
                )
        ids = token_ids((3, 5), 32, seed=7)
        held[1] = {n: (a, b, 0.5) for n, (a, b, _) in held[1].items()}
        torch.testing.assert_close(step(ids, 2, 0.5).double(), _expected(ids, [2] * 3, held), rtol=1e-4, atol=1e-5)

        @torch.compile(backend="aot_eager")
        def swap(ids: torch.Tensor) -> torch.Tensor:
            runtime.unload(0)
            runtime.load(tensors, slot=2)
            runtime.activate([2, -1, 1])
            return model(ids)

        tensors, ab = make_adapter(model, {"layers.1.mlp.up_proj": 3}, seed=9)
        held[0], held[2] = {}, {n: (a, b, 1.0) for n, (a, b) in ab.items()}
        torch.testing.assert_close(swap(ids).double(), _expected(ids, [2, -1, 1], held), rtol=1e-4, atol=1e-5)
    assert runtime.info(0) is None and runtime.routing == (2, -1, 1)


#: the CPU, and CUDA (``gpu``: skipped without a CUDA device)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


@pytest.fixture
def float32_products() -> Iterator[None]:
    """float32 products in float32 on CUDA: TF32 (on for cuDNN's convolutions by default) rounds
    their operands to 2^-11, far past a float32 tolerance. No effect on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("float32_products")
def test_a_serving_step_compiled_with_cuda_graphs_routes_at_the_float64_reference(device: str) -> None:
    """A serving step compiled whole with ``mode="reduce-overhead"`` (CUDA graphs) on CUDA:
    ``runtime.activate(route)``, then the
    float32 model. Every public entry point runs under ``torch.compiler.disable``, so the call
    is the step's one graph break: the step's own frame compiles no graph, its resume frame
    compiles the model's. Expected graphs: one for the first batch size; one more when a
    second size makes the batch dynamic (torch's automatic dynamic shapes, the routing's
    length a dynamic size like the batch's); one more at the first routing of one slot for
    every row (run as the whole batch: the other mode), which is the negative control under
    ``error_on_recompile=True``. Nothing else recompiles: new routings of any later length,
    whole-batch switches between slots, and eagerly between steps ``set_scale`` and loads from
    the host cache (which on CUDA replay CUDA graphs of their own from inside
    ``torch.compiler.disable``, from the second call with a key on: counted), each output at
    the float64 per-row reference. The routing is a host tensor: a Python list would make the
    step's frame guard on its length, one more (graphless) compile per length.

    On the CPU, where inductor would run the same graphs without CUDA graphs, the step compiles
    with ``aot_eager``: the graphs, the graph break and the recompiles are dynamo's, and
    inductor's CPU code for the routed layers is checked against the float64 reference by
    :func:`test_dynamic_shapes_serve_every_batch_size_with_one_routed_graph` (the library
    formula and the fused path under a dynamic batch),
    :func:`test_per_row_and_per_token_routings_compile_once_each_and_read_the_batch_as_they_say`
    and :func:`test_conv_model_routes_under_compile_without_recompiling` (three cold inductor
    compiles of this step's graphs cost the CPU about 45 s).

    Tolerance: float32 (unit roundoff 6e-8) against float64, sums of at most 24 products per
    layer over two blocks: rtol 1e-4, atol 1e-5 is about 10^3 roundings of slack, and rejects
    TF32's 2^-11 (turned off: :func:`float32_products`)."""
    from torch._dynamo.utils import counters

    model, runtime, held = _setup(device=device)
    prepared = [make_adapter(model, dict.fromkeys(runtime.layers, 2 + k), seed=20 + k) for k in range(2)]
    cached = [runtime.preload(tensors) for tensors, _ in prepared]
    compiled = torch.compile(mode="reduce-overhead") if device == "cuda" else torch.compile(backend="aot_eager")

    @compiled
    def step(ids: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        runtime.activate(route)
        return model(ids)

    def check(rows: int, route: list[int], seed: int) -> None:
        ids = token_ids((rows, 5), 32, seed=seed)
        want = _expected(ids, route, held)
        with torch.no_grad():
            got = step(ids.to(device), torch.tensor(route)).double().cpu()  # read before the next replay
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    for shift in range(4):  # CUDA graphs: a warm-up, the capture, then replays
        check(4, [(i * 3 + shift) % 4 - 1 for i in range(4)], seed=shift)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    for shift in range(3):  # a second batch size: the batch dynamic from here on
        check(6, [(i + shift) % 4 - 1 for i in range(6)], seed=6 + shift)
    assert counters["stats"]["unique_graphs"] == graphs + 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (3, 5, 6):
            for shift in range(3):
                check(rows, [(i * 2 + shift) % 4 - 1 for i in range(rows)], seed=10 * rows + shift)
        for scale in (0.5, -1.5, 2.0):  # eagerly between steps; CUDA: the second and third replay
            runtime.set_scale(scale, slot=1)
            held[1] = {n: (a, b, scale) for n, (a, b, _) in held[1].items()}
            check(5, [1, -1, 0, 1, 2], seed=int(scale * 10) % 7)
        for k in (0, 0, 1, 1, 0):  # loads from the host cache into a routed slot; CUDA: a key's second replays
            runtime.load(cached[k], slot=2)
            held[2] = {n: (a, b, 1.0) for n, (a, b) in prepared[k][1].items()}
            check(4, [2, 0, -1, 2], seed=40 + k)
        with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control: the first whole-batch routing
            check(4, [2] * 4, seed=50)
    check(4, [2] * 4, seed=50)  # activate(2) within the step, compiled
    assert counters["stats"]["unique_graphs"] == graphs + 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (0, 2, 0, 2, 1):  # whole-batch switches (activate's CUDA graph from the second of a slot on)
            check(3, [k] * 3, seed=60 + k)
            check(3, [k, -1, 2], seed=70 + k)
    assert counters["stats"]["unique_graphs"] == graphs + 3
    replays = [r.replays for r in (runtime._replay, runtime._load_replay, runtime._activate_replay)]
    assert [n > 0 for n in replays] == [device == "cuda"] * 3, replays  # set_scale, load, activate
    if device == "cuda":  # and every graph of the step ran under CUDA graphs
        assert counters["inductor"]["cudagraph_skips"] == skips


def test_a_runtime_call_inside_a_fullgraph_step_is_refused_by_torch_naming_the_fix() -> None:
    """Under ``fullgraph=True`` the graph break of a lorahot call is refused by torch itself
    (its ``Unsupported``, before any of lorahot runs); its message names the call and the fix
    (torch 2.8 and later show the reason lorahot gives), and nothing changed."""
    if "reason" not in inspect.signature(torch.compiler.disable).parameters:
        pytest.skip("this torch's compiler.disable takes no reason")
    model, runtime, _ = _setup()
    ids = token_ids((3, 5), 32, seed=3)
    with torch.no_grad():
        runtime.activate(1)
        before = model(ids)

        @torch.compile(backend="eager", fullgraph=True)
        def step(ids: torch.Tensor) -> torch.Tensor:
            runtime.activate([0, 1, 2])
            return model(ids)

        with pytest.raises(
            torch._dynamo.exc.Unsupported,
            match=r"lorahot's LoraRuntime\.activate runs eagerly \(host-side checks and in-place writes\); under "
            r"fullgraph=True call it outside the compiled function and compile the model, or compile the function "
            r"without fullgraph=True",
        ):
            step(ids)
        assert runtime.routing is None and runtime.active_slot == 1 and torch.equal(model(ids), before)


def test_a_compiled_model_routes_whatever_is_exporting_answers_inside_torch_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Some torch versions (2.11) answer ``torch.compiler.is_exporting()`` True inside
    ``torch.compile``: a compiled model must not take itself for an export there (which would
    refuse every per-row routing, and mark the runtime as exported). Emulated by the flag that
    answer reads, set while the model compiles. ``aot_eager``: lorahot reads the answer while
    dynamo traces the layers, before any backend."""
    model, runtime, held = _setup()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    ids = token_ids((4, 6), 32, seed=1)
    with torch.no_grad():
        compiled(ids)  # whole batch
        for route in ([0, 1, 2, -1], [2, -1, 1, 0]):
            runtime.activate(route)
            torch.testing.assert_close(compiled(ids).double(), _expected(ids, route, held), rtol=1e-4, atol=1e-5)


def test_negative_control_routed_row_limits_decided_in_python_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the fused path's row limits asked in Python: a batch past a limit
    recompiles."""
    from lorahot.kernels import lora_linear

    _fused_on_the_cpu(monkeypatch)
    monkeypatch.setattr(lora_linear, "decidable", lambda rows: True)
    model, runtime, _ = _setup()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)  # dynamo's guards
    with torch.no_grad():
        runtime.activate([0, 1, 2])
        compiled(token_ids((3, 4), 32, seed=0))
        runtime.activate([(i % 4) - 1 for i in range(40)])
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(token_ids((40, 5), 32, seed=40))


def test_conv_model_routes_under_compile_without_recompiling() -> None:
    model = tiny_convnet()
    runtime = lorahot.inject(model, ["embed", "conv", "proj"], max_rank=4, slots=2)
    held = []
    for k in range(2):
        tensors, ab = make_adapter(model, {"embed": 3, "conv": 2 * (k + 1), "proj": 2}, seed=k)
        runtime.load(tensors, slot=k)
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    ids = token_ids((3, 5, 5), 16, seed=3)
    runtime.activate([1, -1, 0])
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for route in ([0, 1, 1], [-1, 0, -1]):
                runtime.activate(route)
                want = _per_row(route, ids, lambda x, s: model_reference(tiny_convnet(), x, held[s] if s >= 0 else {}))
                torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)


def _routed_convnet() -> tuple[torch.nn.Module, lorahot.LoraRuntime, list[dict]]:
    model = tiny_convnet()
    runtime = lorahot.inject(model, ["conv"], max_rank=4, slots=2)
    held = []
    for k in range(2):
        tensors, ab = make_adapter(model, {"conv": 2 * (k + 1)}, seed=k)
        runtime.load(tensors, slot=k)
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    return model, runtime, held


def test_dynamic_shapes_serve_every_batch_size_of_a_routed_conv_with_one_graph() -> None:
    """A routed conv folds the batch into a group count, which a compiled convolution fixes:
    under dynamic shapes it takes a form without it (``LoRAConv._symbolic_delta``)."""
    model, runtime, held = _routed_convnet()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        runtime.activate([1, -1])
        compiled(token_ids((2, 5, 5), 16, seed=2))
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rows in (3, 4, 7):
                route = [(i % 3) - 1 for i in range(rows)]
                runtime.activate(route)
                ids = token_ids((rows, 5, 5), 16, seed=rows)
                want = _per_row(route, ids, lambda x, s: model_reference(tiny_convnet(), x, held[s] if s >= 0 else {}))
                torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == frames


def test_negative_control_a_routed_conv_grouped_by_a_symbolic_batch_recompiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lorahot.layers import routing

    monkeypatch.setattr(routing, "constant", lambda size: True)  # the batch as a group count
    model, runtime, _ = _routed_convnet()
    # inductor: its lowering of the convolution fixes the group count (``aot_eager`` compiles
    # the grouped form for every batch size without a recompile)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        runtime.activate([1, -1])
        compiled(token_ids((2, 5, 5), 16, seed=2))
        runtime.activate([0, 1, -1])
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(token_ids((3, 5, 5), 16, seed=3))


def _gpu_routed_lm(
    dtype: torch.dtype, dim: int, hidden: int, ranks: list[int]
) -> tuple[torch.nn.Module, lorahot.LoraRuntime, list[dict]]:
    """A tiny LM on the GPU, one slot per rank in ``ranks`` (max_rank 16) each loaded with its
    own adapter, and those adapters' factors on the GPU for the float64 reference."""
    model = tiny_lm(vocab=64, dim=dim, hidden=hidden).to("cuda", dtype)
    runtime = lorahot.inject(model, ["q_proj", "v_proj", "up_proj", "down_proj"], max_rank=16, slots=len(ranks))
    names = list(runtime.layers)
    held = []
    for k, rank in enumerate(ranks):
        tensors, ab = make_adapter(model, dict.fromkeys(names, rank), seed=k)
        runtime.load(tensors, slot=k)
        held.append({n: (a.to("cuda", dtype), b.to("cuda", dtype), 1.0) for n, (a, b) in ab.items()})
    return model, runtime, held


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_reduce_overhead_routings_replay_without_recompiling(dtype: torch.dtype) -> None:
    """CUDA graphs: the routing is a graph input, so each replay reads the new routing."""
    model, runtime, held = _gpu_routed_lm(dtype, 64, 128, [4, 8, 12, 16])
    assert runtime.layers[next(iter(runtime.layers))].fused
    compiled = torch.compile(model, mode="reduce-overhead")
    # the float64 reference starts from the same rounded weights, so what is left is the
    # kernels' rounding of activations, not the cast of the weights
    reference = tiny_lm(vocab=64, dim=64, hidden=128).to("cuda", dtype)
    for rows in (4, 40, 60):  # 12 and 120 tokens: the fused routed kernel; 180: base GEMM, then the segmented pair
        ids = token_ids((rows, 3), 64, seed=rows).cuda()
        runtime.activate([k % 5 - 1 for k in range(rows)])
        for _ in range(3):
            with torch.no_grad():
                compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for shift in range(3):
                route = [(k * 3 + shift) % 5 - 1 for k in range(rows)]
                runtime.activate(route)
                with torch.no_grad():
                    got = compiled(ids).clone()
                torch.testing.assert_close(got.double(), _expected(ids, route, held, reference), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
def test_gpu_stacked_routed_shrinks_match_the_layers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU, reduce-overhead, decode-sized batches: with the routed shrinks of q_proj and
    v_proj stacked (``stacked_routed.ENABLED``), the output equals the float64 per-row
    reference, and every new routing replays the same graph."""
    from lorahot.kernels import stacked_routed

    monkeypatch.setattr(stacked_routed, "ENABLED", True)
    torch._dynamo.reset()
    dtype = torch.bfloat16
    model, runtime, held = _gpu_routed_lm(dtype, 256, 512, [4, 8, 16])
    reference = tiny_lm(vocab=64, dim=256, hidden=512).to("cuda", dtype)
    ids = token_ids((24, 2), 64, seed=3).cuda()
    runtime.activate([k % 4 - 1 for k in range(24)])
    ops, _ = _routed_ops(model, ids, dynamic=False)
    assert ops.count("lorahot.routed_shrink.default") == 2
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    with torch.no_grad():
        compiled(ids), compiled(ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shift in range(3):
            route = [(k * 3 + shift) % 4 - 1 for k in range(24)]
            runtime.activate(route)
            with torch.no_grad():
                got = compiled(ids).clone()
            torch.testing.assert_close(got.double(), _expected(ids, route, held, reference), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
def test_gpu_routed_decode_workspace_is_published_once_and_left_zero() -> None:
    """Wide enough that the routed decode splits K (the shrink then adds into the arena's
    zeroed workspace, which the sum kernel zeroes again): the routing publishes one workspace
    per arena, at one address for every routing, zero after every forward (eager and
    replayed), and the outputs match the per-row float64 reference."""
    from lorahot.layers.tensor_handles import WORKSPACES

    dtype = torch.bfloat16
    model, runtime, held = _gpu_routed_lm(dtype, 512, 1024, [8, 12, 16])
    reference = tiny_lm(vocab=64, dim=512, hidden=1024).to("cuda", dtype)
    ids = token_ids((8, 2), 64, seed=1).cuda()
    compiled = torch.compile(model, mode="reduce-overhead")
    runtime.activate([0] * 7 + [-1])  # per row (one slot for every row would run as the whole batch)
    keys = [arena.handle.key for arena in runtime.buffers.arenas]
    spaces = [WORKSPACES[key] for key in keys]
    assert all(w is not None and w.dtype == torch.float32 and not w.any() for w in spaces)
    for step in range(4):
        route = [(k + step) % 4 - 1 for k in range(8)]
        runtime.activate(route)
        assert all(WORKSPACES[key] is w for key, w in zip(keys, spaces))  # the same tensors, not new ones
        with torch.no_grad():
            eager = model(ids).clone()
            got = compiled(ids).clone()
        assert not any(w.any() for w in spaces)
        want = _expected(ids, route, held, reference)
        torch.testing.assert_close(eager.double(), want, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)


class _SequenceFirst(torch.nn.Module):
    """A sequence-first ``nn.TransformerDecoderLayer`` (``[T, B, 8]``) between a batch-first
    input and a batch-first head."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
        self.head = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)  # (T, B, 8)
        return self.head(self.block(h, h).transpose(0, 1))  # (B, T, 6)


def test_sequence_first_layers_compute_their_base_output_under_a_compiled_routing() -> None:
    """The block's linears see their input sequence-first: a routing to an adapter on them is
    refused at activate; adapters on the head alone route per row, the block computing its
    base output, with no recompile over routings (negative control: a new batch size).
    ``aot_eager``: the refusal and the graph count are dynamo's, the block is torch's own."""
    torch.manual_seed(0)
    base = _SequenceFirst().eval()
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["block.linear1", "block.linear2", "head"], max_rank=4, slots=3)
    held = [{}]
    runtime.load(make_adapter(model, {"block.linear1": 2, "head": 2}, seed=0)[0], slot=0)
    for slot in (1, 2):
        tensors, ab = make_adapter(model, {"head": slot + 1}, seed=slot)
        runtime.load(tensors, slot=slot)
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    x = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(1))  # T == B
    with pytest.raises(lorahot.UsageError, match=r"slot 0, .*sequence-first \('block.linear1'\)"):
        runtime.activate([0, 1, 2, -1])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        runtime.activate([1, 2, -1, 1])
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for route in ([2, 2, 1, -1], [-1, 1, 2, 2]):
                runtime.activate(route)
                want = _per_row(route, x, lambda x, s: model_reference(base, x, held[s] if s >= 0 else {}))
                torch.testing.assert_close(compiled(x).double(), want, rtol=1e-4, atol=1e-5)
            with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control: a new batch size
                runtime.activate([1, 2])
                compiled(x[:2])


def test_cpu_max_autotune_routes_every_batch_size_at_the_float64_reference() -> None:
    """``mode="max-autotune-no-cudagraphs"`` on the CPU: inductor's autotuned ``bmm`` computes a
    symbolic batch as the size it was traced with (torch 2.13). The routed formulas gave each
    row its own weights by batched products (the embedding's and the linear's gathered A and
    B, the conv's expand under dynamic shapes), so once a second batch size made the batch
    symbolic a routed forward failed (a RuntimeError from the bmm on a wrong size, or an index
    out of bounds, on 3 of 4 routings after the first; in six lines of plain torch the same
    bmm returned numbers 1.6e27 off). There the layers now take products of 2-D operands,
    which that mode computes right: an embedding, a grouped conv and a linear, a stacked slot and rows of no slot, at
    the float64 reference for every batch size, and the whole batch on one slot after."""
    _max_autotune_routes("cpu")


@pytest.mark.gpu
@pytest.mark.usefixtures("float32_products")
def test_gpu_max_autotune_routes_every_batch_size_at_the_float64_reference() -> None:
    """The same on CUDA, float32: whether inductor's autotuned GEMMs there (Triton's templates
    beside cuBLAS) compute a symbolic batch right, where the layers keep their batched products
    (``lorahot.kernels.compile_mode.autotunes_gemms`` is the CPU's). Tolerance as on the CPU:
    float32 against float64 over sums of at most 36 products a layer (the grouped 3x3 conv's), TF32
    off."""
    _max_autotune_routes("cuda")


def _max_autotune_routes(device: str) -> None:
    """The convnet on ``device`` (float32) compiled with ``mode="max-autotune-no-cudagraphs"``:
    per-row routings of four batch sizes (the batch dynamic from the second on), then the whole
    batch on a stacked slot at two sizes, each at the float64 reference computed on the CPU."""
    base = tiny_convnet()
    model = copy.deepcopy(base).to(device)
    runtime = lorahot.inject(model, ["embed", "conv", "proj"], max_rank=8, slots=3)
    parts = [make_adapter(model, {"embed": 3, "conv": 2 * (1 + k % 2), "proj": 2 + k}, seed=k) for k in range(4)]
    held = [[parts[0][1]], [parts[1][1], parts[2][1]], [parts[3][1]]]
    runtime.load(parts[0][0], slot=0)
    runtime.load([parts[1][0], parts[2][0]], slot=1)  # a stack: both parts active together
    runtime.load(parts[3][0], slot=2)
    held = [[{n: (a, b, 1.0) for n, (a, b) in part.items()} for part in slot] for slot in held]
    compiled = torch.compile(model, mode="max-autotune-no-cudagraphs")
    with torch.no_grad():
        for route in ([0, 1, 2, -1], [2, 0, 1], [1, -1, 0, 2, 1], [1, 0]):
            runtime.activate(route)
            ids = token_ids((len(route), 4, 4), 16, seed=len(route))
            want = _per_row(route, ids, lambda x, s: stack_reference(base, x, held[s] if s >= 0 else []))
            torch.testing.assert_close(compiled(ids.to(device)).double().cpu(), want, rtol=1e-4, atol=1e-5)
        runtime.activate(1)
        for rows in (4, 3):
            ids = token_ids((rows, 4, 4), 16, seed=rows)
            want = stack_reference(base, ids, held[1])
            torch.testing.assert_close(compiled(ids.to(device)).double().cpu(), want, rtol=1e-4, atol=1e-5)
