"""Row and column sums of many word views in one launch: the plan of its items (on the CPU),
and the kernel against ``torch.sum`` bit for bit (on CUDA; in Triton's interpreter by
``tests/unit/kernels/test_interpreted.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorahot.kernels import word_sums
from lorahot.runtime.written_probes import sums

#: a word the launch must leave as it is (between the pieces it writes)
SENTINEL = 0x5A5A5A5A

#: rows, columns, row stride in words (None: contiguous), first column in a wider storage
SHAPES = [
    (1, 700, None, 0),  # one row over three column strips
    (530, 1, None, 0),  # one column over two items, the second not a whole tile
    (45, 260, None, 0),  # past a tile's last row and a strip's last column
    (37, 300, 310, 3),  # a column slice: rows 310 words apart, 12 bytes off alignment
    (8, 12, None, 0),
    (1, 0, None, 0),  # no columns: no items, its row sum 0
    (8, 4, None, 0),  # every word 2**30 + 1: sums past 2**32 that wrap
]


def word_views(device: str, seed: int = 0) -> tuple[list[torch.Tensor], list[int], list[int], torch.Tensor]:
    """Views of :data:`SHAPES` of random int32 words over the whole range (sums that wrap), the
    offsets of their row and column sums in an output one word apart from each other, and that
    output: zeros where sums go, :data:`SENTINEL` between them."""
    g = torch.Generator().manual_seed(seed)
    views, rows_at, cols_at, at = [], [], [], 1
    for rows, cols, ld, first in SHAPES:
        storage = torch.randint(-(2**31), 2**31, (rows, (ld or cols)), generator=g, dtype=torch.int64)
        w = storage.to(torch.int32).to(device)[:, first : first + cols]
        if (rows, cols) == (8, 4):
            w.fill_(2**30 + 1)
        views.append(w)
        rows_at.append(at)
        cols_at.append(at + rows + 1)
        at += rows + cols + 2
    out = torch.full((at,), SENTINEL, dtype=torch.int32, device=device)
    for w, r, c in zip(views, rows_at, cols_at, strict=True):
        out[r : r + w.shape[0]] = 0
        out[c : c + w.shape[1]] = 0
    return views, rows_at, cols_at, out


def assert_sums(views: list[torch.Tensor], rows_at: list[int], cols_at: list[int], out: torch.Tensor) -> None:
    """Each view's sums where they go, equal to the library's :func:`sums` bit for bit, and the
    words between them as they were."""
    untouched = torch.ones_like(out, dtype=torch.bool)
    for w, r, c in zip(views, rows_at, cols_at, strict=True):
        assert torch.equal(out[r : r + w.shape[0]], sums(w, 1)), tuple(w.shape)
        assert torch.equal(out[c : c + w.shape[1]], sums(w, 0)), tuple(w.shape)
        untouched[r : r + w.shape[0]] = False
        untouched[c : c + w.shape[1]] = False
    assert (out[untouched] == SENTINEL).all()
    wrapped = views[SHAPES.index((8, 4, None, 0))]
    assert int(sums(wrapped, 0)[0]) == 8  # 8 * (2**30 + 1) modulo 2**32


@given(
    shapes=st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 700), st.integers(0, 40)), min_size=1, max_size=4),
    block_c=st.sampled_from([4, 256]),
    item_rows=st.sampled_from([1, 7, 512]),
)
def test_the_items_cover_every_word_of_every_view_once(
    shapes: list[tuple[int, int, int]], block_c: int, item_rows: int
) -> None:
    """Every word of every view belongs to exactly one item (items on the grid of ``item_rows``
    by ``block_c``, each cut at the view's edge), at the address and with the sums' offsets of
    its first row and column; a view with no rows or columns has none."""
    table = [[1 << 40 | i << 20, r, c, c + pad, 10_000 * i, 10_000 * i + 5_000] for i, (r, c, pad) in enumerate(shapes)]
    planned = word_sums.items(torch.tensor(table, dtype=torch.int64).reshape(-1, 6), block_c, item_rows)
    assert planned.dtype == torch.int64 and planned.shape[1] == 6
    starts = set()
    for addr, ld, rows, cols, rows_at, cols_at in planned.tolist():
        i, r0 = divmod(rows_at, 10_000)
        base, view_rows, view_cols, view_ld, _, c_at = table[i]
        c0 = cols_at - c_at
        assert (ld, addr) == (view_ld, base + (r0 * ld + c0) * 4)
        assert r0 % item_rows == 0 and c0 % block_c == 0
        assert (rows, cols) == (min(item_rows, view_rows - r0), min(block_c, view_cols - c0)) and rows > 0 and cols > 0
        starts.add((i, r0, c0))
    assert len(starts) == len(planned) == sum(-(-r // item_rows) * -(-c // block_c) for r, c, _ in shapes)


def test_the_items_of_a_view_past_2_to_the_31_bytes_have_exact_addresses() -> None:
    """A view of 70,000 rows of 16,384 words (4.6 GB) at an address past 2**40: its last item
    starts at the exact byte, computed in int64 (an int32 offset would have wrapped)."""
    rows, cols, addr = 70_000, 16_384, (1 << 40) + 256
    planned = word_sums.items(torch.tensor([[addr, rows, cols, cols, 0, rows]], dtype=torch.int64))
    last = planned[-1].tolist()
    r0 = (rows - 1) // word_sums.ITEM_ROWS * word_sums.ITEM_ROWS
    c0 = (cols - 1) // word_sums.BLOCK_C * word_sums.BLOCK_C
    assert last == [addr + (r0 * cols + c0) * 4, cols, rows - r0, cols - c0, r0, rows + c0]
    assert last[0] - addr > 2**32


def test_views_allowing_128_bit_loads_are_told_apart() -> None:
    """The kernel's aligned variant only where every item starts on 16 bytes with rows and
    columns in fours; a column slice 12 bytes off, or columns of 3, take the other."""
    aligned = [torch.zeros(5, 8, dtype=torch.int32), torch.zeros(1, 260, dtype=torch.int32)]
    assert word_sums.WordSums(aligned, [0, 5], [10, 20]).aligned
    off = torch.zeros(5, 12, dtype=torch.int32)[:, 3:11]
    assert not word_sums.WordSums([*aligned, off], [0, 5, 40], [10, 20, 50]).aligned
    assert not word_sums.WordSums([torch.zeros(5, 3, dtype=torch.int32)], [0], [5]).aligned


def test_a_view_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match=r"2-D int32 .* contiguous rows; got torch.int32 \(4, 3\) strides \(1, 4\)"):
        word_sums.WordSums([torch.zeros(3, 4, dtype=torch.int32).t()], [0], [4])
    with pytest.raises(ValueError, match=r"got torch.int16"):
        word_sums.WordSums([torch.zeros(3, 4, dtype=torch.int16)], [0], [4])


def test_no_launch_on_the_cpu() -> None:
    assert not word_sums.available(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_one_launch_equals_the_library_sums_bitwise() -> None:
    assert word_sums.available(torch.device("cuda"))
    views, rows_at, cols_at, out = word_views("cuda")
    summer = word_sums.WordSums(views, rows_at, cols_at)
    assert not summer.aligned  # the column slice
    summer(out)
    assert_sums(views, rows_at, cols_at, out)
    aligned = [torch.randint(-(2**31), 2**31, s, device="cuda", dtype=torch.int64).int() for s in [(600, 1024), (3, 8)]]
    out = torch.zeros(600 + 1024 + 3 + 8, dtype=torch.int32, device="cuda")
    summer = word_sums.WordSums(aligned, [0, 1624], [600, 1627])
    assert summer.aligned
    summer(out)
    assert torch.equal(out[:600], sums(aligned[0], 1)) and torch.equal(out[600:1624], sums(aligned[0], 0))
    assert torch.equal(out[1624:1627], sums(aligned[1], 1)) and torch.equal(out[1627:], sums(aligned[1], 0))
