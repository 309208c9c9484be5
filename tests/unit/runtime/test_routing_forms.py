"""Every form ``runtime.activate`` takes a per-row routing in (tensors of each integer dtype,
strided or made under inference mode, NumPy arrays of other byte orders, read-only or strided)
computes what the same routing as a list of ints does, bitwise; and changing the tensor or array
after ``activate`` changes nothing (the routing is read once)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import lorahot
from tests.helpers import make_adapter

ROUTE = [1, -1, 0, 2]


def _readonly(values: list[int]) -> np.ndarray:
    array = np.array(values)
    array.setflags(write=False)
    return array


def _inference(values: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.tensor(values)


FORMS: dict[str, Callable[[list[int]], object]] = {
    **{
        str(dtype).removeprefix("torch."): (lambda v, d=dtype: torch.tensor(v, dtype=d))
        for dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    },
    "strided-tensor": lambda v: torch.tensor([[s, 9] for s in v])[:, 0],
    "inference-tensor": _inference,
    "int16-array": lambda v: np.array(v, dtype=np.int16),
    "big-endian-array": lambda v: np.array(v, dtype=">i4"),
    "read-only-array": _readonly,
    "strided-array": lambda v: np.array([[s, 9] for s in v])[:, 0],
    "tuple": tuple,
}


def _model() -> tuple[torch.nn.Module, lorahot.LoraRuntime]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).double()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, slots=3, dtype=torch.float64)
    for slot in range(3):
        adapter = make_adapter(model, dict.fromkeys(runtime.layers, 1 + slot), seed=slot, dtype=torch.float64)[0]
        runtime.load(adapter, slot=slot, scale=[1.0, -0.5, 2.0][slot])
    return model, runtime


@pytest.mark.parametrize("form", list(FORMS))
def test_each_routing_form_computes_the_list_s_routing_and_is_read_once(form: str) -> None:
    model, runtime = _model()
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runtime.activate(ROUTE)
    with torch.no_grad():
        want = model(x)
    runtime.activate(0)
    given = FORMS[form](ROUTE)
    runtime.activate(given)
    assert runtime.routing == tuple(ROUTE)
    if isinstance(given, torch.Tensor) and not given.is_inference():
        given.fill_(2)
    elif isinstance(given, np.ndarray) and given.flags.writeable:
        given.fill(2)
    with torch.no_grad():
        assert torch.equal(model(x), want)
