"""A Python regex written out in RE2 syntax: RE2 then reads it as Python does, or it is refused."""

from __future__ import annotations

import re

import pytest

from lorahot.io.re2_syntax import Untranslatable, to_re2

re2 = pytest.importorskip("re2")


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize(
    ("key", "texts"),
    [
        (r"[[:digit:]]", ["[", ":", "d", "]", "1", "[]", ":]"]),
        (r"a{,2}", ["", "a", "aa", "aaa", "a{,2}"]),
        (r"a{,}b", ["b", "aaab", "a{,}b"]),
        (r"(?i:ab)c", ["ABc", "abC", "abc"]),
        (r"(?s:.)x|\.y", ["\nx", "ax", ".y", "ay"]),
        (r"[^\d.]+?_", ["a_", "1_", "._", "ab_"]),
        (r"\Aq\b", ["q", "qa"]),
        (r"(?:a|bc)*\Bd", ["ad", "bcd", "d"]),
        (r"\x00|é|\u00e9\\", ["\x00", "é", "é\\"]),
        (r"a\Z|\\Z|[\\Z]\Z", ["a", "a\n", "\\Z", "Z", "\\", "aZ"]),
    ],
)
def test_re2_reads_the_translation_as_python_reads_the_key(key: str, texts: list[str]) -> None:
    program = re2.compile(to_re2(key))
    for text in texts:
        assert bool(program.fullmatch(text)) == bool(re.fullmatch(key, text)), (key, text)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("(?=a)a", "lookahead"),
        ("(?<!a)b", "negative lookahead or lookbehind"),
        (r"(a)\1", "backreference"),
        ("(a)?(?(1)b|c)", "conditional group"),
        ("(?>ab)", "atomic group"),
        ("a*+", "possessive repeat"),
        ("a)", "does not parse"),
    ],
)
def test_python_only_syntax_is_untranslatable(key: str, why: str) -> None:
    with pytest.raises(Untranslatable, match=why):
        to_re2(key)
