"""Clean Descriptors (PS3.15 E.3.5, option 113105): keep only known-safe words.

PS3.15 E.3.5 suggests cleaning free-text descriptors such as "CT chest abdomen
pelvis - 55F Dr. Smith" by keeping only words known not to identify anyone. Here a
word is kept when it is in the vocabulary (``data/descriptor_words.txt`` plus the
anatomy words generated from CID 4031, ``data/anatomy_words.txt``), or is a number
of at most three digits (a year is four), a decimal, or a number with a unit (``3MM``, ``1.25mm``,
``120KV``). A word equal to a component of one of the patient's names is dropped
even when it is in the vocabulary (a surname can be "Head").

What this does not guarantee: a safe word can still carry meaning in context (the
allow-list approach fails closed on unknown words, not on combinations of known ones).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

__all__ = ["DescriptorCleaner", "vocabulary"]

_WORD = re.compile(r"[A-Za-z0-9]+(?:\.[0-9]+)?\+?")
_NUMBER = re.compile(r"\d{1,3}|\d{0,4}\.\d{1,4}")
_NUMBER_UNIT = re.compile(
    r"\d{1,4}(?:\.\d{1,4})?(?:MM|CM|M|MS|S|SEC|MIN|KV|KVP|KEV|MAS|MA|HU|T|D|X|MCI|MBQ|MGY|CC|ML)",
    re.IGNORECASE,
)


def _words(name: str) -> set[str]:
    text = resources.files(__package__).joinpath("data", name).read_text("utf-8")
    out: set[str] = set()
    for line in text.splitlines():
        out.update(w.upper() for w in line.split("#", 1)[0].split())
    return out


@lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """The built-in vocabulary (upper case)."""
    return frozenset(_words("descriptor_words.txt") | _words("anatomy_words.txt"))


class DescriptorCleaner:
    """Cleans descriptor strings with a vocabulary.

    Parameters
    ----------
    extra_words
        Words to allow besides the built-in vocabulary (e.g. local protocol terms).
    """

    def __init__(self, extra_words: Iterable[str] = ()) -> None:
        self.words = vocabulary() | {w.upper() for w in extra_words}

    def clean(self, value: str, forbidden: frozenset[str] = frozenset()) -> str:
        """Keep the safe words of ``value``, separated by single spaces.

        Parameters
        ----------
        value
            The descriptor (one value; multi-valued strings are cleaned value by value
            by the caller).
        forbidden
            Upper-case words never kept (components of the patient's names).
        """
        kept = []
        for m in _WORD.finditer(value):
            word = m.group(0)
            upper = word.upper()
            if upper in forbidden or upper.rstrip("+") in forbidden:
                continue
            if upper in self.words or upper.rstrip("+") in self.words:
                kept.append(word)
            elif _NUMBER.fullmatch(word) or _NUMBER_UNIT.fullmatch(word):
                kept.append(word)
        return " ".join(kept)
