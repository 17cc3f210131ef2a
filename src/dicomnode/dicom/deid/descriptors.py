"""Clean Descriptors (PS3.15 E.3.5, option 113105): keep only known-safe words.

PS3.15 E.3.5 suggests cleaning free-text descriptors such as "CT chest abdomen
pelvis - 55F Dr. Smith" by keeping only words known not to identify anyone. Here a
word is kept when it is in the vocabulary (``data/descriptor_words.txt`` plus the
anatomy words generated from CID 4031, ``data/anatomy_words.txt``). A word equal to a
component of one of the patient's names is dropped even when it is in the vocabulary
(a surname can be "Head").

Numbers are kept by what they are, never by their length (a length rule lets a date
``12/05/2023`` through as ``12 05`` and ``12.05.23`` whole as a "decimal"). Cleaning
runs in two passes:

1. **Removal** of spans that are identifiers whatever the vocabulary says: dates in
   every common written form (numeric with ``/ . -`` separators and 2- or 4-digit
   years, ISO and compact ``YYYYMMDD``, month names and abbreviations in English,
   German, French and Spanish), times (``14:30``, ``14h30``, ``2 pm``, ``14.30 Uhr``),
   phone-number shapes (two or more digit groups split by space, dot, dash or slash,
   with or without a ``+``/``00`` country prefix), digit runs of five or more, and digit
   runs next to an address or identifier word (``Room 12``, ``MRN: 4711``,
   ``Hauptstraße 12``, ``12 Main Street``, ``Tel 030...``).
2. **Allow-list** of the remaining words. A word with digits is kept only when it
   matches a clinical pattern: a vocabulary word (``T2``, ``3D``, ``B0``), a number
   with a unit attached or following (``5mm``, ``5 mm``, ``3.0 T``, ``120 kV``), a
   spinal level or range (``C3-C4``, ``L4/5``, ``T12``), a b-value (``b1000``), a
   matrix (``512x512``), a count ``2 of 3``, or a small counter after a counter word
   (``phase 2``, ``echo 3``), or a decimal that cannot be read as a day and month
   (``0.625``). Any other number is dropped: ``1.25`` alone may be January 25.

Kept words are joined by their original separator when it is plain punctuation
(``-``, ``/``, ``+``, ``,``, ``:``, ``&``, ``(``, ``)``) with nothing dropped between
them, else by one space, so that clinical descriptors pass unchanged.

What this does not guarantee: a safe word can still carry meaning in context (the
allow-list approach fails closed on unknown words, not on combinations of known ones).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

__all__ = ["DescriptorCleaner", "vocabulary"]

# Unicode words: ASCII-only words would split "Müller" into "M" (a vocabulary word).
_WORD = re.compile(r"[^\W_]+(?:\.[0-9]+[^\W_]*)?\+?")
_INT = re.compile(r"\d{1,4}")
_DECIMAL = re.compile(r"\d{1,4}(?:\.\d{1,4})?")
# Units attached to the number ("5MM"). M and D are left out: "55M" is an age and sex.
_NUMBER_UNIT = re.compile(
    r"\d{1,4}(?:\.\d{1,4})?(?:MM|CM|MS|S|SEC|MIN|KV|KVP|KEV|MAS|MA|HU|T|X|MCI|MBQ|MGY|GY|CC|ML|MG)",
    re.IGNORECASE,
)
# Units as a separate word after a number ("3.0 T", "120 kV").
_UNIT_WORDS = frozenset(
    "MM CM MS SEC SECS MIN MINS KV KVP KEV MAS MA HU T TESLA MCI MBQ MGY GY CC ML MG".split()
)
_SPINE = re.compile(r"(?:[CTLS]|TH)\d{1,2}", re.IGNORECASE)
_BVALUE = re.compile(r"B\d{2,4}", re.IGNORECASE)
_MATRIX = re.compile(r"\d{1,4}X\d{1,4}", re.IGNORECASE)
# Words after which a small integer counts something of the acquisition ("phase 2").
_COUNTERS = frozenset(
    "PHASE PHASES ECHO ECHOES RUN PART SERIES SCAN STEP PASS VIEW SEQUENCE SEQ ACQ "
    "ACQUISITION SLAB BOLUS TIMEPOINT TP SET VOLUME VOL FRAME CYCLE".split()
)
_JOINERS = frozenset("-/+,:&()=")
_GAP = "\x00"  # replaces removed spans: never part of a word, breaks adjacency

# --- pass 1: spans removed whatever the vocabulary says -------------------------------

_MONTHS = (
    # English
    "january|february|march|april|may|june|july|august|september|october|november|"
    "december|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|"
    # German
    "januar|jänner|jaenner|februar|feber|märz|maerz|mrz|mai|juni|juli|oktober|"
    "dezember|okt|dez|"
    # French
    "janvier|janv|février|fevrier|févr|fevr|fév|fev|mars|avril|avr|juin|juillet|juil|"
    "août|aout|septembre|octobre|novembre|décembre|decembre|déc|"
    # Spanish
    "enero|ene|febrero|marzo|abril|abr|mayo|junio|julio|agosto|ago|septiembre|"
    "setiembre|octubre|noviembre|diciembre|dic"
)
# longest first, and never followed by a letter: "mars" is not "mar" + "s"
_M = "(?:{})(?![^\\W\\d_])\\.?".format(
    "|".join(sorted(set(_MONTHS.split("|")), key=len, reverse=True))
)
_DAY = r"(?:[0-3]?\d)(?:st|nd|rd|th|er|º|°|\.)?"
_YEAR = r"(?:'?\d{2}|\d{4})"
_OF = r"(?:\s*(?:de|of|del)\s+|\s*[-/.,]?\s*)"

# Phone shapes (at least 6 digits in all, so that "12.50 mm" is not one): +49 30 1234 5678,
# (030) 123-45-67, 06.12.34.56.78, 555 123 4567, +33 6 12 34 56 78.
_PHONE = re.compile(
    r"(?:(?<![\w+])(?:\+|00)\d{1,3}[\s./-]*)?(?<![\w.])\(?\d{2,5}\)?"
    r"(?:[\s./-]{1,2}\(?\d{2,5}\)?)+(?![\w])"
    r"|(?<![\w+])(?:\+|00)\d{1,3}[\s./-]*\d[\d\s./-]{4,}\d",
)
_MONTH_DATES = re.compile(
    "|".join(
        rf"(?:{p})"
        for p in (
            # 12 March 2023, 12. März 23, 1er janvier 2023, 5 de mayo de 2023, 12-Mar-2023
            rf"\b{_DAY}{_OF}{_M}(?:{_OF}{_YEAR}\b)?",
            # March 12, 2023; Mar 12th 23; mayo 5 2023
            rf"\b{_M}\s*{_DAY}(?:\s*,?\s*{_YEAR}\b)?",
            # March 2023, mars 23, Jan-2023
            rf"\b{_M}{_OF}{_YEAR}\b",
            # the month name alone (an unknown word anyway; removed for adjacency)
            rf"\b{_M}",
        )
    ),
    re.IGNORECASE,
)
_NUMERIC_DATES = re.compile(
    "|".join(
        rf"(?:{p})"
        for p in (
            # numeric dates: 12/05/2023, 12.05.23, 2023-05-12, 5-12-23, 2023/5/12
            r"(?<![\w.])\d{1,4}\s?[./-]\s?\d{1,2}\s?[./-]\s?\d{2,4}(?![\w])",
            # month and year: 05/2023, 2023-05, 5.2023
            r"(?<![\w.])(?:\d{1,2}[./-](?:19|20)\d{2}|(?:19|20)\d{2}[./-]\d{1,2})(?![\w])",
            # day and month with a slash or dash: 12/05, 3-4 (a fraction is no clinical pattern)
            r"(?<![\w.])\d{1,2}[/-]\d{1,2}(?![\w/-])",
            # times: 14:30, 14:30:15.123, 2:30 pm, 14h30, 14.30 Uhr, 2 pm, 7am
            r"(?<![\w.])\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:\s*(?:am|pm|a\.m\.|p\.m\.|uhr|h)\b)?",
            r"(?<![\w.])\d{1,2}h\d{2}\b",
            r"(?<![\w.])\d{1,2}(?:[.:]\d{2})?\s*(?:am|pm|a\.m\.|p\.m\.|uhr)(?![A-Za-z])",
            # long digit runs (MRNs, compact dates 20230512, TM 143015)
            r"\d{5,}",
        )
    ),
    re.IGNORECASE,
)

_ID_WORDS = (
    # identifiers
    "mrn|id|pid|nr|nro|no|num|number|nummer|numero|número|n°|nº|acc|accession|case|"
    "fall|fallnr|pat|patient|patienten|paciente|dossier|file|chart|akte|ssn|nhs|ahv|"
    "insee|dob|geb|geboren|born|née|nee|né|nacido|nacida|nac|"
    # rooms, beds, contact
    "room|rm|bed|bett|zimmer|chambre|lit|habitación|habitacion|hab|cama|sala|box|"
    "tel|tél|phone|telephone|telefon|teléfono|telefono|fax|mob|mobile|handy|cell|"
    "zip|plz|postcode|cp|"
    # addresses
    "street|st|str|strasse|straße|road|rd|avenue|ave|av|avenida|lane|ln|drive|blvd|"
    "boulevard|bd|way|weg|gasse|platz|allee|ring|rue|calle|plaza|paseo|apt|apartment|"
    "suite|floor|etage|piso|house|haus|postfach|box"
)
_ADDRESS_SUFFIX = r"[A-Za-zÀ-ÿ]+(?:strasse|straße|str\.|weg|gasse|platz|allee|ring)"
_ID_WORD = rf"(?:\b(?:{_ID_WORDS})\b\.?|{_ADDRESS_SUFFIX}|#)"
_ID_DIGITS = re.compile(
    "|".join(
        (
            # the word, then a digit run: "Room 12", "MRN: 4711", "Hauptstraße 12a", "#12"
            rf"{_ID_WORD}[\s:#=.,°º-]{{0,3}}\d[\w/.-]*",
            # a digit run, up to three words, then an address word: "12 Main Street"
            rf"\b\d+[A-Za-z]?\b(?=,?(?:\s+[A-Za-zÀ-ÿ'.]+){{0,3}}\s+(?:{_ID_WORDS})\b)",
        )
    ),
    re.IGNORECASE,
)


_LETTERS = re.compile(r"[^\W\d_]+")
_DIGIT = re.compile(r"\d").search
_MONTH_SET = frozenset(_MONTHS.split("|"))
_ID_SET = frozenset(_ID_WORDS.split("|"))
_ADDRESS_ENDINGS = ("strasse", "straße", "str", "weg", "gasse", "platz", "allee", "ring")


def _mask(value: str) -> str:
    """``value`` with every identifier span replaced by ``_GAP`` characters (same length)."""
    if not _DIGIT(value):
        return value  # every removed span has a digit; month names alone are unknown words
    # The word patterns are slow (long alternations tried at every position): run them
    # only in a window around a month or identifier word (a date or "Room 12" is short).
    windows: list[tuple[re.Pattern[str], int, int]] = []
    n = len(value)
    for m in _LETTERS.finditer(value):
        word = m.group(0).lower()
        if word in _MONTH_SET:
            windows.append((_MONTH_DATES, max(0, m.start() - 16), min(n, m.end() + 16)))
        if word in _ID_SET or word.endswith(_ADDRESS_ENDINGS):
            windows.append((_ID_DIGITS, max(0, m.start() - 40), min(n, m.end() + 24)))
    for c in "#°º":
        i = value.find(c)
        if i >= 0:
            windows.append((_ID_DIGITS, max(0, i - 8), min(n, i + 24)))
    out = list(value)

    def blank(rx: re.Pattern[str], pos: int = 0, endpos: int = n) -> None:
        for m in rx.finditer("".join(out), pos, endpos):
            if rx is _PHONE and sum(c.isdigit() for c in m.group(0)) < 6:
                continue
            out[m.start() : m.end()] = _GAP * (m.end() - m.start())

    for rx, pos, endpos in sorted(windows, key=lambda w: w[0] is _MONTH_DATES):
        blank(rx, pos, endpos)  # identifier words first, as before the phone shapes
    blank(_PHONE)
    blank(_NUMERIC_DATES)
    return "".join(out)


def _glued(masked: str, token: tuple[int, int, str]) -> bool:
    """Whether a token touches a removed span (directly or through one ``. - / :``)."""
    start, end, _word = token
    before = masked[max(0, start - 2) : start]
    after = masked[end : end + 2]
    return (
        before.endswith(_GAP)
        or (len(before) == 2 and before[0] == _GAP and before[1] in ".-/:")
        or after.startswith(_GAP)
        or (len(after) == 2 and after[1] == _GAP and after[0] in ".-/:")
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
        """Keep the safe words of ``value`` (module docstring: what is kept and why).

        Parameters
        ----------
        value
            The descriptor (one value; multi-valued strings are cleaned value by value
            by the caller).
        forbidden
            Upper-case words never kept (components of the patient's names).
        """
        masked = _mask(value)
        tokens = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(masked)]
        n = len(tokens)
        uppers = [t[2].upper() for t in tokens]
        # seps[i]: the text between token i-1 and token i; adjacent[i]: no removed span in it
        seps = [""] + [masked[tokens[i - 1][1] : tokens[i][0]] for i in range(1, n)]
        adjacent = [i > 0 and _GAP not in seps[i] for i in range(n)]
        keep = [False] * n
        for i, (_s, _e, word) in enumerate(tokens):
            upper = uppers[i]
            bare = upper.rstrip("+")
            if upper in forbidden or bare in forbidden:
                continue
            if not _DIGIT(word):
                if upper in self.words or bare in self.words:
                    keep[i] = True
                elif bare in _UNIT_WORDS and i and adjacent[i] and keep[i - 1]:
                    keep[i] = True  # "3.0 T": the number before it was kept for it
                continue
            if _glued(masked, tokens[i]):
                continue  # "77.0000" left of a removed "1980.77.175.": part of it
            keep[i] = self._number_kept(i, uppers, seps, adjacent, keep)
        return self._join(tokens, seps, adjacent, keep)

    def _number_kept(
        self,
        i: int,
        uppers: list[str],
        seps: list[str],
        adjacent: list[bool],
        keep: list[bool],
    ) -> bool:
        """Whether token ``i`` (a word with digits) matches a clinical pattern."""
        upper = uppers[i].rstrip("+")
        if upper in self.words or _NUMBER_UNIT.fullmatch(upper) or _MATRIX.fullmatch(upper):
            return True
        if _SPINE.fullmatch(upper) or _BVALUE.fullmatch(upper):
            return True
        if not _DECIMAL.fullmatch(upper):
            return False  # "55F", "4711A": letters and digits of no known pattern
        if re.fullmatch(r"0\.\d+|\d{1,4}\.\d{3,4}", upper):
            return True  # "0.625", "1.250": no day.month or month.day reading
        nxt = uppers[i + 1].rstrip("+") if i + 1 < len(uppers) and adjacent[i + 1] else ""
        if nxt in _UNIT_WORDS:
            return True  # "5 mm", "3.0 T"
        prev = uppers[i - 1].rstrip("+") if i and adjacent[i] else ""
        if not _INT.fullmatch(upper):
            return False
        if prev == "B" and seps[i].strip() in ("", "="):
            keep[i - 1] = True  # "b=1000", "b 800": a diffusion b-value
            return True
        if len(upper) > 3:
            return False
        if nxt == "OF" and i + 2 < len(uppers) and adjacent[i + 2]:
            if _INT.fullmatch(uppers[i + 2]) and len(uppers[i + 2]) <= 3:
                return True  # "2 of 3" (not "12 of 2023")
        if prev == "OF" and i >= 2 and adjacent[i - 1] and keep[i - 2]:
            return _INT.fullmatch(uppers[i - 2]) is not None  # the 3 of "2 of 3"
        if prev in _COUNTERS and keep[i - 1]:
            return True  # "phase 2", "echo 3"
        if prev and _SPINE.fullmatch(prev) and keep[i - 1] and len(upper) <= 2:
            sep = seps[i].strip()
            return sep in ("-", "/")  # "L4-5", "L5/S1" is two levels already
        return False

    @staticmethod
    def _join(
        tokens: list[tuple[int, int, str]], seps: list[str], adjacent: list[bool], keep: list[bool]
    ) -> str:
        """The kept words, joined by their own plain-punctuation separator or one space."""
        parts: list[str] = []
        prev_kept = -2
        for i, (_start, _end, word) in enumerate(tokens):
            if not keep[i]:
                continue
            if parts:
                core = seps[i].strip()
                joined = prev_kept == i - 1 and adjacent[i]
                if joined and core and len(core) <= 2 and set(core) <= _JOINERS:
                    parts.append(seps[i] if len(seps[i]) <= 3 else f" {core} ")
                else:
                    parts.append(" ")
            parts.append(word)
            prev_kept = i
        return "".join(parts).strip()
