"""lorahot.formats.table: what grouping a file's keys by module remembers between reads."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorahot.formats import FORMATS, KeyFormat, table


def _naming(name: str) -> KeyFormat:
    return next(fmt for fmt in FORMATS if fmt.name == name)


class _ByProbeAlone:
    """A memo of ``_owner``'s probe parses keyed by the probe key alone, not by the naming too:
    the mistake the next test guards against."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: tuple[KeyFormat, str], compute: Any, *args: Any) -> Any:
        if key[1] not in self.values:
            self.values[key[1]] = compute(*args)
        return self.values[key[1]]


@pytest.mark.parametrize("memo", ["per-naming", "negative-control"])
def test_a_skipped_key_finds_its_module_as_each_naming_reads_it_whatever_was_read_before(
    memo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``strict=False`` a key no rule reads is skipped with every key of the module it
    belongs to, found by parsing the key's stem with each module suffix. krea2's naming reads
    ``base_model.model.blk.proj.lora_A.weight`` as module ``base_model.model.blk.proj``, PEFT's
    as ``blk.proj``: read by one, then the other, then the first again, the module is skipped
    whole each time (no key left in the parts). Negative control: the probe parses remembered
    by probe key alone (holding krea2's parse of every probe, as earlier reads leave it), PEFT's
    naming reads krea2's module names, finds no such module, and keeps the module's factors
    without the key that belongs to it."""
    stem = "base_model.model.blk.proj"
    if memo == "negative-control":  # holding krea2's parse of every probe, as reads of other files leave it
        wrong = _ByProbeAlone()
        for probe in table._PROBES:
            wrong.get((_naming("krea2"), f"{stem}.{probe}"), _naming("krea2")._parse, f"{stem}.{probe}")
        monkeypatch.setattr(table, "_PROBED", wrong)
    else:  # a fresh memo: no entry from another test's reads
        monkeypatch.setattr(table, "_PROBED", type(table._PROBED)(1 << 20, lambda k, v: 2 * len(k[1])))
    t = torch.zeros(2, 2)
    tensors = {f"{stem}.lora_A.weight": t, f"{stem}.lora_B.weight": t, f"{stem}.unknown_extra": t}
    results = []
    for name in ("krea2", "peft", "krea2"):
        skipped: list[str] = []
        parts = table.group_keys(_naming(name), tensors, "f.safetensors", skipped)
        results.append((parts == {}, sorted(skipped) == sorted(tensors)))
    if memo == "per-naming":
        assert results == [(True, True)] * 3
    else:
        assert results[0] == (True, True) and results[1] == (False, False)
