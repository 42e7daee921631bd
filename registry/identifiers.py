"""Detectors for direct identifiers in free text and in vocabulary tokens.

Used by the vocabulary filter and by the privacy scan of everything shipped beside
a model's weights, and by the synthetic corpus generator (NIR keys, name lists).

Detectors fail closed: when in doubt a token is flagged. Known limits, by design:

* a last name that is also a common French word (``petit``, ``blanc``, ``masse``,
  ``gros``, ``paris``...) or a first name that is one (``claire``, ``guy``) is
  flagged by :func:`identifier_kind_of_token`; in free text
  (:func:`find_identifiers`) only capitalised or upper-case occurrences count;
* a phone number or a date split by a tokenizer into two-digit pieces (``01``,
  ``23``...) cannot be recognised piece by piece; only the pieces that carry five
  digits or more, a year, or the whole pattern are flagged (a token that holds the
  whole pattern with its spaces or dots, "06 12 34 56 78", is flagged);
* in free text a lower-case name is flagged only as a first name followed by a last
  name ("jean dupont"), since a lone lower-case surname is often a common word.

Person names come from two independent lists: the ``fr_FR`` person provider of the
installed ``faker`` package (:func:`name_lists`, the one the corpus generator draws
from) and the French person dataset of ``mimesis`` (:func:`other_name_lists`, which
the generator never uses), so that the detectors are not tuned to the generator's own
names. Both are read locally; neither package's random generator is used. Accents and
case are ignored when a word is looked up ("Helene", "HÉLÈNE", "hélène" are one name).
"""

from __future__ import annotations

import enum
import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from faker.providers.person.fr_FR import Provider as _FrPersonProvider

__all__ = [
    "DETECTORS",
    "Detector",
    "Finding",
    "IdentifierKind",
    "NameLists",
    "find_identifiers",
    "first_names",
    "identifier_kind_of_token",
    "is_valid_nir",
    "last_names",
    "name_lists",
    "nir_key",
    "other_name_lists",
    "strip_accents",
]


class IdentifierKind(enum.Enum):
    """The kinds of direct identifiers the detectors know."""

    NIR = "nir"
    PHONE = "phone"
    EMAIL = "email"
    DATE = "date"
    IPP = "ipp"
    PERSON_NAME = "person_name"


@dataclass(frozen=True)
class Finding:
    """One identifier found in a text: ``text[start:end] == value``."""

    kind: IdentifierKind
    value: str
    start: int
    end: int


# --------------------------------------------------------------------------- NIR

_CORSICA = {"2A": "19", "2B": "18"}
_NIR13 = re.compile(r"[12]\d{4}(?:\d{2}|2[AB])\d{6}")


def _nir_digits(nir13: str) -> int:
    """The 13-character NIR as an integer, Corsica's 2A/2B replaced by 19/18."""
    dept = nir13[5:7]
    if dept in _CORSICA:
        nir13 = nir13[:5] + _CORSICA[dept] + nir13[7:]
    return int(nir13)


def nir_key(nir13: str) -> int:
    """Control key of a 13-character NIR: ``97 - (NIR mod 97)``, in 1..97.

    Departments 2A and 2B (Corsica) count as 19 and 18. Raises ``ValueError`` when
    ``nir13`` is not 13 characters of the NIR alphabet.
    """
    nir13 = nir13.upper()
    if len(nir13) != 13 or not _NIR13.fullmatch(nir13):
        raise ValueError(f"not a 13-character NIR: {nir13!r}")
    return 97 - _nir_digits(nir13) % 97


def _nir_structure_ok(nir15: str) -> bool:
    """Plausible structure: sex 1/2, month, department, commune, order, key."""
    if not _NIR13.fullmatch(nir15[:13]) or not nir15[13:].isdigit():
        return False
    month = int(nir15[3:5])
    # INSEE months: 01-12, 20-42 and 50-99 for unknown or provisional months.
    if not (1 <= month <= 12 or 20 <= month <= 42 or month >= 50):
        return False
    dept = nir15[5:7]
    if dept == "00":
        return False
    # overseas departments have a 3-digit department and a 2-digit commune
    commune = nir15[8:10] if dept in ("97", "98") else nir15[7:10]
    if int(commune) == 0 or int(nir15[10:13]) == 0:
        return False
    return 1 <= int(nir15[13:]) <= 97


def is_valid_nir(s: str) -> bool:
    """True when ``s`` is a French NIR (15 characters, spaces allowed) with a valid key."""
    compact = s.replace(" ", "").upper()
    if len(compact) != 15 or not _nir_structure_ok(compact):
        return False
    return nir_key(compact[:13]) == int(compact[13:])


# --------------------------------------------------------------------- name lists


def strip_accents(s: str) -> str:
    """``s`` without combining accents (``é`` -> ``e``, ``œ`` kept)."""
    decomposed = unicodedata.normalize("NFD", s)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


@dataclass(frozen=True)
class NameLists:
    """The fr_FR name lists, original case, duplicates removed, order kept."""

    male_first: tuple[str, ...]
    female_first: tuple[str, ...]
    last: tuple[str, ...]

    def digest(self) -> str:
        """``sha256:<hex>`` of the lists, to pin which names a corpus used."""
        h = hashlib.sha256()
        for part in (self.male_first, self.female_first, self.last):
            h.update("\n".join(part).encode())
            h.update(b"\x00")
        return "sha256:" + h.hexdigest()


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@lru_cache(maxsize=1)
def name_lists() -> NameLists:
    """The first and last names of faker's fr_FR person provider."""
    return NameLists(
        male_first=_unique(_FrPersonProvider.first_names_male),
        female_first=_unique(_FrPersonProvider.first_names_female),
        last=_unique(_FrPersonProvider.last_names),
    )


@lru_cache(maxsize=1)
def other_name_lists() -> NameLists:
    """The French first and last names of the ``mimesis`` package (not the generator's)."""
    import json
    from importlib import resources

    doc = json.loads((resources.files("mimesis") / "datasets" / "fr" / "person.json")
                     .read_text(encoding="utf-8"))
    return NameLists(male_first=_unique(doc["names"]["male"]),
                     female_first=_unique(doc["names"]["female"]),
                     last=_unique(doc["surnames"]))


# Particles of compound names ("Da Silva", "Le Gall"): never flagged on their own.
_PARTICLES = frozenset({"da", "de", "del", "della", "des", "di", "do", "dos", "du", "la", "le"})


def _name_forms(names: Iterable[str]) -> frozenset[str]:
    forms: set[str] = set()
    for name in names:
        low = name.lower()
        parts = [low, *re.split(r"[\s'-]+", low)]
        for part in parts:
            if not part or part in _PARTICLES or (part != low and len(part) < 3):
                continue
            forms.add(part)
            forms.add(strip_accents(part))
    return frozenset(forms)


@lru_cache(maxsize=1)
def first_names() -> frozenset[str]:
    """Lower-cased first names (male and female) of both lists, with accent-stripped
    variants."""
    forms: frozenset[str] = frozenset()
    for lists in (name_lists(), other_name_lists()):
        forms |= _name_forms(lists.male_first + lists.female_first)
    return forms


@lru_cache(maxsize=1)
def last_names() -> frozenset[str]:
    """Lower-cased last names and their parts of both lists, with accent-stripped
    variants."""
    return _name_forms(name_lists().last) | _name_forms(other_name_lists().last)


def _is_name(low: str) -> bool:
    bare = strip_accents(low)
    return any(w in first_names() or w in last_names() for w in (low, bare))


# ---------------------------------------------------------------------- patterns

_SEP = r"[ .\-]?"
_NIR_RE = re.compile(
    r"(?<![\w])[12](?:" + _SEP + r"\d){4}" + _SEP + r"(?:\d" + _SEP + r"\d|2[ABab])"
    r"(?:" + _SEP + r"\d){8}(?![\w])"
)
_PHONE_RE = re.compile(
    r"(?<![\w+])(?:(?:\+|00)33" + _SEP + r"(?:\(0\)" + _SEP + r")?[1-9]|0[1-9])"
    r"(?:" + _SEP + r"\d{2}){4}(?![\w])"
)
_EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_MONTHS = (
    "janvier|février|fevrier|mars|avril|mai|juin|juillet|août|aout|septembre|"
    "octobre|novembre|décembre|decembre"
)
_DATE_RES = (
    re.compile(r"(?<![\w])(\d{1,2})[/.\-](\d{1,2})[/.\-](\d{4})(?![\w])"),
    re.compile(r"(?<![\w])(\d{4})[/.\-](\d{1,2})[/.\-](\d{1,2})(?![\w])"),
    re.compile(r"(?<![\w])(\d{1,2}|1er)\s+(" + _MONTHS + r")\s+(\d{4})(?![\w])", re.IGNORECASE),
    # two-digit years, "12-3-57", "12/03/57": day and month checked, the year any
    re.compile(r"(?<![\w.])(\d{1,2})([/\-])(\d{1,2})\2(\d{2})(?![\w.])"),
)
_DIGIT_RUN_RE = re.compile(r"(?<![\w])\d{7,10}(?![\w])")
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")


def _plausible_dmy(day: int, month: int, year: int) -> bool:
    return 1 <= day <= 31 and 1 <= month <= 12 and 1900 <= year <= 2099


def _dates(text: str) -> Iterable[tuple[int, int]]:
    for pattern in _DATE_RES:
        for m in pattern.finditer(text):
            if pattern is _DATE_RES[3]:
                day, _, month, _ = m.groups()
                if 1 <= int(day) <= 31 and 1 <= int(month) <= 12:
                    yield m.start(), m.end()
                continue
            a, b, c = m.groups()
            if pattern is _DATE_RES[1]:
                ok = _plausible_dmy(int(c), int(b), int(a))
            elif pattern is _DATE_RES[2]:
                day = 1 if a.lower() == "1er" else int(a)
                ok = 1 <= day <= 31 and 1900 <= int(c) <= 2099
            else:
                ok = _plausible_dmy(int(a), int(b), int(c))
            if ok:
                yield m.start(), m.end()


def _is_name_word(word: str) -> bool:
    if len(word) < 2 or not (word[0].isupper()):
        return False
    return _is_name(word.lower())


Detector = Callable[[str], list[Finding]]


def _finditer(kind: IdentifierKind, pattern: re.Pattern[str], text: str) -> list[Finding]:
    return [Finding(kind, m.group(), m.start(), m.end()) for m in pattern.finditer(text)]


def detect_nir(text: str) -> list[Finding]:
    """NIR with a valid key, spaced, dotted or compact."""
    return [
        f
        for f in _finditer(IdentifierKind.NIR, _NIR_RE, text)
        if is_valid_nir(re.sub(r"[ .\-]", "", f.value))
    ]


def detect_phone(text: str) -> list[Finding]:
    """French phone numbers: 0X XX XX XX XX or +33 / 0033, any of ' .-' or none between pairs."""
    return _finditer(IdentifierKind.PHONE, _PHONE_RE, text)


def detect_email(text: str) -> list[Finding]:
    """E-mail addresses."""
    return _finditer(IdentifierKind.EMAIL, _EMAIL_RE, text)


def detect_date(text: str) -> list[Finding]:
    """Dates: dd/mm/yyyy, dd-mm-yyyy, dd.mm.yyyy, yyyy-mm-dd and "12 mars 1957"."""
    return [Finding(IdentifierKind.DATE, text[s:e], s, e) for s, e in _dates(text)]


def detect_ipp(text: str) -> list[Finding]:
    """Standalone runs of 7 to 10 digits (find_identifiers drops those inside a phone or NIR)."""
    return _finditer(IdentifierKind.IPP, _DIGIT_RUN_RE, text)


def detect_person_name(text: str) -> list[Finding]:
    """Capitalised or upper-case words (or hyphenated parts) found in the name lists,
    accents ignored; in lower case, a first name followed by a last name."""
    found = []
    words = list(_WORD_RE.finditer(text))
    for i, m in enumerate(words):
        if any(_is_name_word(p) for p in re.split(r"['’\-]", m.group())):
            found.append(Finding(IdentifierKind.PERSON_NAME, m.group(), m.start(), m.end()))
            continue
        nxt = words[i + 1] if i + 1 < len(words) else None
        low = strip_accents(m.group().lower())
        if nxt is not None and text[m.end():nxt.start()].strip() == "" and \
                low in first_names() and len(low) >= 3 and \
                strip_accents(nxt.group().lower()) in last_names():
            found.append(Finding(IdentifierKind.PERSON_NAME, text[m.start():nxt.end()],
                                 m.start(), nxt.end()))
    return found


#: The detectors, keyed by kind, in the priority order used to resolve overlaps.
DETECTORS: Mapping[IdentifierKind, Detector] = MappingProxyType(
    {
        IdentifierKind.NIR: detect_nir,
        IdentifierKind.EMAIL: detect_email,
        IdentifierKind.PHONE: detect_phone,
        IdentifierKind.DATE: detect_date,
        IdentifierKind.IPP: detect_ipp,
        IdentifierKind.PERSON_NAME: detect_person_name,
    }
)


def find_identifiers(text: str) -> list[Finding]:
    """Every identifier found in ``text``, sorted by position, spans not overlapping.

    Runs every detector of :data:`DETECTORS`; where spans overlap, the detector
    earlier in that table wins (so a phone number is not also reported as an IPP).
    """
    kept: list[Finding] = []
    for detector in DETECTORS.values():
        for f in detector(text):
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
    kept.sort(key=lambda f: (f.start, f.end))
    return kept


# ------------------------------------------------------------------------ tokens

_RUN5_RE = re.compile(r"\d{5,}")
_RUN4_RE = re.compile(r"(?<!\d)(\d{4})(?!\d)")


def _digit_run_kind(run: str) -> IdentifierKind:
    if len(run) == 15 and is_valid_nir(run):
        return IdentifierKind.NIR
    if len(run) == 13 and _NIR13.fullmatch(run):
        return IdentifierKind.NIR
    if (len(run) == 10 and run[0] == "0" and run[1] != "0") or (
        len(run) == 11 and run.startswith("33")
    ):
        return IdentifierKind.PHONE
    if len(run) == 8:
        day, month, year = int(run[:2]), int(run[2:4]), int(run[4:])
        if _plausible_dmy(day, month, year) or _plausible_dmy(
            int(run[6:]), int(run[4:6]), int(run[:4])
        ):
            return IdentifierKind.DATE
    return IdentifierKind.IPP


def identifier_kind_of_token(token: str) -> IdentifierKind | None:
    """The identifier kind a single vocabulary token may carry, or ``None``.

    Flags any token that contains an e-mail address, a run of five digits or more
    (NIR, phone, compact date, or else IPP), a date pattern or a four-digit year
    between 1900 and 2030, or that is a known first or last name (case and accents
    ignored). Names that are also common words are flagged too (fail closed).
    """
    tok = token.strip().lower()
    if not tok:
        return None
    if _EMAIL_RE.search(tok):
        return IdentifierKind.EMAIL
    for hit in find_identifiers(token):  # a whole pattern in one token, spaced or dotted
        if hit.kind not in (IdentifierKind.PERSON_NAME, IdentifierKind.IPP):
            return hit.kind
    compact = re.sub(r"[\s.\-/]", "", tok)
    run = _RUN5_RE.search(tok) or (_RUN5_RE.fullmatch(compact) if compact.isdigit() else None)
    if run:
        return _digit_run_kind(run.group())
    if any(True for _ in _dates(tok)):
        return IdentifierKind.DATE
    for m in _RUN4_RE.finditer(tok):
        if 1900 <= int(m.group(1)) <= 2030:
            return IdentifierKind.DATE
    if _is_name(tok) or any(len(w) >= 3 and _is_name(w) for w in re.split(r"[\s'’\-./:]+", tok)
                            if w != tok):
        return IdentifierKind.PERSON_NAME
    return None
