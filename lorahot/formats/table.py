"""The declarative description of an adapter naming, and the one routine that applies it.

Each format is a :class:`KeyFormat`: a table of :class:`Rule` (a regex over a tensor key and
the role the tensor plays: ``A``, ``B`` or ``alpha``), the component prefixes files put in
front of module paths, the separator that replaced the model's dots, and the keys it knows
but lorahot refuses (DoRA, LoRA biases, LyCORIS variants). Detection and grouping are driven
by these tables only; no format has code of its own.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from lorahot.errors import UnknownFormatError, format_problems

__all__ = ["Rule", "KeyFormat", "Parts", "group_keys"]


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


#: module key -> role -> (tensor key, tensor)
Parts = dict[str, dict[str, tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class Rule:
    """One tensor-key pattern: ``pattern`` must fully match and capture ``(?P<module>...)``.

    Attributes:
        pattern: the regex over the whole tensor key.
        role: ``"A"`` (down), ``"B"`` (up) or ``"alpha"`` (a scalar alpha for the module).
    """

    pattern: str
    role: str

    def match(self, key: str) -> str | None:
        m = _compiled(self.pattern).fullmatch(key)
        return None if m is None else m["module"]


@dataclass(frozen=True, eq=False)  # identity hash: the memoized methods hash self on every call
class KeyFormat:
    """One adapter naming, as data.

    Attributes:
        name: what :attr:`lorahot.Adapter.format` says for files of this naming.
        rules: tensor-key patterns and their roles, tried in order.
        prefixes: component prefixes in front of module paths (``"unet."``, ``"lora_te1_"``);
            resolved against the injected model, never assumed.
        require_prefix: detect this format only if every module key starts with a prefix.
        separator: what stands for the model's ``.`` in module keys (``"_"`` for kohya).
        renames: ``(regex, replacement)`` applied in order to every module key, to undo
            spellings of the format (``.processor.`` in old diffusers attention keys).
        refuse: ``(regex, reason)`` for keys this format knows but lorahot does not load.
        marker: if set, detect this format only if some key matches this regex (what tells
            it apart from a naming whose rules it shares).
        aliases: ``(regex, replacement)`` tried on a module key that names no injected layer
            (``to_q`` -> ``q_proj`` where one spelling served several model families).
        roles: what the format calls A and B, for messages.
        example: an example key, for documentation (the tests detect each format from it).
    """

    name: str
    rules: tuple[Rule, ...]
    prefixes: tuple[str, ...] = ()
    require_prefix: bool = False
    separator: str = "."
    renames: tuple[tuple[str, str], ...] = ()
    refuse: tuple[tuple[str, str], ...] = ()
    marker: str = ""
    aliases: tuple[tuple[str, str], ...] = ()
    roles: tuple[str, str] = ("lora_A", "lora_B")
    example: str = ""

    def strip_prefix(self, module: str) -> str:
        """``module`` without this format's component prefix, if it has one."""
        prefix = next((p for p in self.prefixes if module.startswith(p)), "")
        return module[len(prefix) :]

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - formats are module-level constants
    def parse(self, key: str) -> tuple[str, str] | None:
        """``(module key, role)`` for a tensor key of this format, or None.

        Memoized: a server swapping among the same adapters parses each key once.
        """
        for rule in self.rules:
            module = rule.match(key)
            if module is not None:
                for pattern, repl in self.renames:
                    module = re.sub(pattern, repl, module)
                return module, rule.role
        return None

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - formats are module-level constants
    def refusal(self, key: str) -> str | None:
        """Why lorahot refuses ``key``, if this format knows it as an unsupported feature."""
        return next((why for pattern, why in self.refuse if re.search(pattern, key)), None)

    def score(self, keys: list[str]) -> int:
        """How many keys this format parses; -1 if its marker or required prefix is absent."""
        if self.marker and not any(re.search(self.marker, k) for k in keys):
            return -1
        modules = [p[0] for p in map(self.parse, keys) if p is not None]
        if self.require_prefix and not any(m.startswith(self.prefixes) for m in modules):
            return -1
        return len(modules)

    def detect(self, keys: list[str]) -> bool:
        """True if every key parses (or is a known refusal) and prefixes agree."""
        if not keys or (self.marker and not any(re.search(self.marker, k) for k in keys)):
            return False
        modules = []
        for key in keys:
            parsed = self.parse(key)
            if parsed is None and self.refusal(key) is None:
                return False
            if parsed is not None:
                modules.append(parsed[0])
        if self.require_prefix:
            return bool(modules) and all(m.startswith(self.prefixes) for m in modules)
        return True


def group_keys(fmt: KeyFormat, tensors: dict[str, torch.Tensor], source: str) -> Parts:
    """Groups tensor keys by module and role, per ``fmt``.

    Raises:
        UnknownFormatError: keys that match no rule, refused features (DoRA, bias, LyCORIS),
            or two tensors claiming one module's role. All are listed at once.
    """
    parts: Parts = {}
    problems: list[str] = []
    for key, tensor in tensors.items():
        why = fmt.refusal(key)
        parsed = None if why else fmt.parse(key)
        if parsed is None:
            problems.append(f"{key}: {why or f'not a LoRA key of the {fmt.name} naming'}")
            continue
        module, role = parsed
        roles = parts.setdefault(module, {})
        if role in roles:
            problems.append(f"{key}: a second {role} for module {module!r} (also {roles[role][0]})")
            continue
        roles[role] = (key, tensor)
    if problems:
        raise UnknownFormatError(
            format_problems(f"{source}: keys lorahot cannot load ({fmt.name} naming):", problems)
            + "\nRemove them, or convert the adapter to plain LoRA (lora_A/lora_B or lora_down/lora_up)."
        )
    return parts


#: Keys every format may carry for features lorahot refuses, with the reason and the fix.
REFUSED: tuple[tuple[str, str], ...] = (
    (
        r"(lora_magnitude_vector|dora_scale)",
        "DoRA magnitude vector: DoRA adapters are not supported; use a plain LoRA adapter",
    ),
    (
        r"(lora_B|lora_up|lora\.up|lora_linear_layer\.up)(\.[^.]+)?\.bias$",
        "LoRA bias (PEFT lora_bias=True): not supported; re-train without a LoRA bias",
    ),
    (
        r"\.(hada_w\d_[ab]|hada_t\d|lokr_w\d(_[ab])?|lokr_t\d|lora_mid\.weight|oft_blocks|diff|diff_b)$",
        "LyCORIS (LoHa/LoKr/Tucker/OFT/diff) weights: only plain LoRA is supported",
    ),
)
