"""lorahot.runtime.module_paths: whether a module path lies under one of a set of paths."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lorahot.runtime.module_paths import above, within

_PATHS = st.lists(st.sampled_from(["a", "b", "ab", "0", "1"]), min_size=0, max_size=4).map(".".join)


@given(path=_PATHS, paths=st.sets(_PATHS, max_size=5))
def test_within_is_equal_or_under_one_of_the_paths_the_root_holding_all(path: str, paths: set[str]) -> None:
    """The comparison with every path that the lookups per level replace: equal to one, or
    starting with it and a dot (``a.b`` is under ``a``, ``ab`` is not), or the root ``""``."""
    expected = any(path == p or path.startswith(p + ".") or not p for p in paths)
    assert within(path, paths) == expected
    strictly = any(path.startswith(p + ".") or (not p and path) for p in paths)
    assert any(p in paths for p in above(path)) == strictly


def test_above_lists_each_strictly_enclosing_path_root_first() -> None:
    assert list(above("a.b.c")) == ["", "a", "a.b"]
    assert list(above("a")) == [""]
    assert list(above("")) == []
