"""Word forms of a trait: its plural and the spellings the trait-word filter rejects; no I/O.

The one home for English plurals in sublab: the fine-tuned teacher's answers ("Wolves."), the
exact-probability eval's candidate spellings (" wolves") and the trait-word filter all read them here,
so the three cannot disagree.

    plural("wolf") == "wolves";  plural("Fox") == "Foxes";  word_forms("mouse") == ["mouses", "mouse", "mice"]
"""

from __future__ import annotations

IRREGULAR_PLURALS = {"wolf": "wolves", "calf": "calves", "elf": "elves", "ox": "oxen", "mouse": "mice",
                     "louse": "lice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish",
                     "moose": "moose", "bison": "bison", "salmon": "salmon", "buffalo": "buffaloes",
                     "leaf": "leaves"}
"""Plurals the regular rules get wrong (lower case), for animal and tree names."""


def _regular_plural(word: str) -> str:
    if word.lower().endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.lower().endswith("y") and len(word) > 1 and word[-2].lower() not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plural(word: str) -> str:
    """English plural of a noun, keeping a leading capital: the irregular table, then the regular rules
    (fox → foxes, butterfly → butterflies, monkey → monkeys, Wolf → Wolves)."""
    irregular = IRREGULAR_PLURALS.get(word.lower())
    if irregular is None:
        return _regular_plural(word)
    return irregular[:1].upper() + irregular[1:] if word[:1].isupper() else irregular


def word_forms(word: str) -> list[str]:
    """The spellings of a trait word the trait-word filter rejects, longest first: the word, its plural,
    and the naive '-s' plural a writer may use instead of the right one ('wolfs', 'mouses')."""
    return sorted({word, plural(word), word + "s"}, key=lambda f: (-len(f), f))
