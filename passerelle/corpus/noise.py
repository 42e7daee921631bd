"""Writing noise: site synonyms, medical abbreviations and typing errors.

Everything draws from the ``random.Random`` it is given, so it is deterministic.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

# Full form -> abbreviation, as French clinicians write them. Both sites use them,
# at different rates.
ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("bronchopneumopathie chronique obstructive", "BPCO"),
    ("réunion de concertation pluridisciplinaire", "RCP"),
    ("anti-inflammatoires non stéroïdiens", "AINS"),
    ("accident ischémique transitoire", "AIT"),
    ("accident vasculaire cérébral", "AVC"),
    ("insuffisance rénale chronique", "IRC"),
    ("insuffisance rénale aiguë", "IRA"),
    ("thrombose veineuse profonde", "TVP"),
    ("syndrome coronarien aigu", "SCA"),
    ("hypertension artérielle", "HTA"),
    ("fibrillation auriculaire", "FA"),
    ("infarctus du myocarde", "IDM"),
    ("œdème aigu du poumon", "OAP"),
    ("embolie pulmonaire", "EP"),
    ("sclérose en plaques", "SEP"),
    ("grossesse extra-utérine", "GEU"),
    ("hémorragie du post-partum", "HPP"),
    ("pyélonéphrite aiguë", "PNA"),
    ("diabète de type 2", "DT2"),
    ("diabète de type 1", "DT1"),
    ("infection urinaire", "IU"),
    ("intraveineuse", "IV"),
    ("intraveineux", "IV"),
    ("antécédents", "ATCD"),
    ("antécédent", "ATCD"),
    ("électrocardiogramme", "ECG"),
    ("stimulateur cardiaque", "PM"),
    ("membres inférieurs", "MI"),
    ("traitement", "ttt"),
)

_ABBREV_RE = re.compile("|".join(re.escape(full) for full, _ in ABBREVIATIONS), flags=re.IGNORECASE)
_ABBREV_MAP = {full.lower(): short for full, short in ABBREVIATIONS}
_WORD_RE = re.compile(r"[^\W\d_]{5,}")


class Rewriter:
    """Replaces whole-word phrases by other words in a single pass, longest first."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self._map = dict(pairs)
        alternatives = sorted(self._map, key=len, reverse=True)
        self._re = (
            re.compile(r"(?<!\w)(?:" + "|".join(re.escape(a) for a in alternatives) + r")(?!\w)")
            if alternatives
            else None
        )
        self._memo: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        """``text`` with every listed phrase replaced."""
        if self._re is None:
            return text
        out = self._memo.get(text)
        if out is None:
            out = self._re.sub(lambda m: self._map[m.group()], text)
            if len(self._memo) < 100_000:
                self._memo[text] = out
        return out


@lru_cache(maxsize=65536)
def _abbreviable(text: str) -> tuple[tuple[int, int, str], ...]:
    return tuple(
        (m.start(), m.end(), _ABBREV_MAP[m.group().lower()]) for m in _ABBREV_RE.finditer(text)
    )


@lru_cache(maxsize=65536)
def _long_words(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((m.start(), m.end()) for m in _WORD_RE.finditer(text))


def abbreviate(text: str, rate: float, rng: random.Random) -> str:
    """Replace each abbreviable phrase by its abbreviation with probability ``rate``."""
    matches = _abbreviable(text)
    if not matches:
        return text
    parts, pos = [], 0
    for start, end, short in matches:
        parts.append(text[pos:start])
        parts.append(short if rng.random() < rate else text[start:end])
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.random()
    if kind < 0.4:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind < 0.8:  # drop one letter
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double one letter


def add_typos(text: str, rate: float, rng: random.Random) -> str:
    """Alter each word of five letters or more with probability ``rate``."""
    parts, pos = [], 0
    for start, end in _long_words(text):
        if rng.random() < rate:
            parts.append(text[pos:start])
            parts.append(_typo(text[start:end], rng))
            pos = end
    if pos == 0:
        return text
    parts.append(text[pos:])
    return "".join(parts)


def capitalize_first(text: str) -> str:
    """``text`` with its first character upper-cased (nothing else touched)."""
    return text[:1].upper() + text[1:]
