"""Identifier detectors: NIR keys, free-text findings, vocabulary tokens."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from registry.identifiers import (
    DETECTORS,
    IdentifierKind,
    find_identifiers,
    first_names,
    identifier_kind_of_token,
    is_valid_nir,
    last_names,
    name_lists,
    nir_key,
)

# Keys computed by hand: key = 97 - (NIR13 mod 97), 2A -> 19 and 2B -> 18.
#   1 84 12 76 451 089 -> 1841276451089 mod 97 = 51 -> key 46
#   2 90 05 2A 004 123 -> 2900519004123 mod 97 = 45 -> key 52
#   1 65 11 2B 123 456 -> 1651118123456 mod 97 = 28 -> key 69
#   2 69 02 99 341 732 -> 2690299341732 mod 97 = 12 -> key 85 (born abroad)
KNOWN_KEYS = [
    ("1841276451089", 46),
    ("290052A004123", 52),
    ("165112B123456", 69),
    ("2690299341732", 85),
]


@pytest.mark.parametrize(("nir13", "key"), KNOWN_KEYS)
def test_nir_key_known_examples(nir13: str, key: int) -> None:
    assert nir_key(nir13) == key
    assert nir_key(nir13.lower()) == key
    assert 1841276451089 % 97 == 51  # the arithmetic behind the first example


def test_corsica_key_uses_19_and_18() -> None:
    assert nir_key("290052A004123") == 97 - 2900519004123 % 97
    assert nir_key("165112B123456") == 97 - 1651118123456 % 97
    assert nir_key("290052A004123") != 97 - 2900520004123 % 97


@pytest.mark.parametrize("bad", ["", "123", "3841276451089", "18412764510890", "18412X6451089"])
def test_nir_key_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        nir_key(bad)


@pytest.mark.parametrize(
    "nir",
    [
        "184127645108946",
        "1 84 12 76 451 089 46",
        "2 90 05 2A 004 123 52",
        "290052a00412352",
        "1 65 11 2B 123 456 69",
        "2 69 02 99 341 732 85",
    ],
)
def test_valid_nirs(nir: str) -> None:
    assert is_valid_nir(nir)


@pytest.mark.parametrize(
    "nir",
    [
        "184127645108947",  # wrong key
        "1 84 12 76 451 089 45",  # wrong key
        "384127645108946",  # sex digit 3
        "184137645108946",  # month 13
        "184120045108946",  # department 00
        "184127600008946",  # commune 000 (key irrelevant)
        "18412764510894",  # too short
        "2 90 05 2A 004 123 53",  # wrong Corsican key
    ],
)
def test_invalid_nirs(nir: str) -> None:
    assert not is_valid_nir(nir)


def test_random_15_digit_strings_with_wrong_key_are_never_nirs() -> None:
    rng = random.Random(1234)  # noqa: S311 - test data
    text_parts = []
    for _ in range(2000):
        nir13 = f"{rng.choice('12')}{rng.randint(0, 99):02d}{rng.randint(1, 12):02d}"
        nir13 += f"{rng.randint(1, 95):02d}{rng.randint(1, 999):03d}{rng.randint(1, 999):03d}"
        good = nir_key(nir13)
        wrong = (good % 97) + 1  # any other key in 1..97
        candidate = f"{nir13}{wrong:02d}"
        assert not is_valid_nir(candidate)
        text_parts.append(candidate)
        assert is_valid_nir(f"{nir13}{good:02d}")
    findings = find_identifiers(" ; ".join(text_parts))
    assert not [f for f in findings if f.kind is IdentifierKind.NIR]


def kinds(text: str) -> list[tuple[IdentifierKind, str]]:
    return [(f.kind, f.value) for f in find_identifiers(text)]


def test_find_nir_spaced_and_compact() -> None:
    text = "NIR : 1 84 12 76 451 089 46, autre 184127645108946 et 2 90 05 2A 004 123 52."
    found = [v for k, v in kinds(text) if k is IdentifierKind.NIR]
    assert found == ["1 84 12 76 451 089 46", "184127645108946", "2 90 05 2A 004 123 52"]


@pytest.mark.parametrize(
    "phone",
    [
        "01 23 45 67 89",
        "01.23.45.67.89",
        "01-23-45-67-89",
        "0123456789",
        "+33 1 23 45 67 89",
        "+33123456789",
        "0033 6 12 34 56 78",
        "+33 (0)1 23 45 67 89",
    ],
)
def test_find_phone(phone: str) -> None:
    assert kinds(f"Tél : {phone} (secrétariat)") == [(IdentifierKind.PHONE, phone)]


def test_phone_is_not_also_an_ipp() -> None:
    assert kinds("appeler le 0241352468") == [(IdentifierKind.PHONE, "0241352468")]


@pytest.mark.parametrize(
    "date",
    ["12/03/1957", "12-03-1957", "1957-03-12", "12 mars 1957", "1er janvier 2001", "3 Août 1960"],
)
def test_find_date(date: str) -> None:
    assert kinds(f"né le {date} à Lyon") == [(IdentifierKind.DATE, date)]


def test_find_email() -> None:
    text = "écrire à marie.dupont-2@chu-montaigu.fr ou a.b@x.org."
    assert kinds(text) == [
        (IdentifierKind.EMAIL, "marie.dupont-2@chu-montaigu.fr"),
        (IdentifierKind.EMAIL, "a.b@x.org"),
    ]


def test_find_ipp_standalone_digit_runs() -> None:
    assert kinds("IPP : 4000123456") == [(IdentifierKind.IPP, "4000123456")]
    assert kinds("dossier 7654321") == [(IdentifierKind.IPP, "7654321")]
    assert kinds("créatinine 450 µmol/l, 123456 plaquettes") == []  # 3 and 6 digits


def test_find_person_names() -> None:
    found = kinds("Patient : DUPONT Marie, vu par le Dr Jean Martin. Le patient est calme.")
    assert (IdentifierKind.PERSON_NAME, "DUPONT") in found
    assert (IdentifierKind.PERSON_NAME, "Marie") in found
    assert (IdentifierKind.PERSON_NAME, "Jean") in found
    assert (IdentifierKind.PERSON_NAME, "Martin") in found
    assert all(v not in ("Le", "patient", "calme", "Dr") for _, v in found)


@pytest.mark.parametrize(
    "text",
    [
        "Pression artérielle 135/80 mmHg, fréquence cardiaque 88/min, SpO2 97 %.",
        "ECG : sus-décalage du segment ST en antérieur de V1 à V4.",
        "Créatinine à 450 µmol/l, hyperkaliémie à 6,2 mmol/l.",
        "Score NIHSS à 14, glycémie à 4,5 g/l.",
    ],
)
def test_clinical_text_without_identifiers(text: str) -> None:
    assert find_identifiers(text) == []


def test_findings_are_sorted_and_do_not_overlap() -> None:
    text = "DUPONT Marie 12/03/1957 tél 01 23 45 67 89 NIR 184127645108946 IPP 4000123456"
    found = find_identifiers(text)
    assert found == sorted(found, key=lambda f: f.start)
    for a, b in pairwise(found):
        assert a.end <= b.start
    for f in found:
        assert text[f.start : f.end] == f.value


def test_detector_table_covers_every_kind() -> None:
    assert set(DETECTORS) == set(IdentifierKind)
    for kind, detector in DETECTORS.items():
        assert all(f.kind is kind for f in detector("DUPONT 01 23 45 67 89 a@b.fr 1957-03-12"))


@pytest.mark.parametrize(
    ("token", "kind"),
    [
        ("184127645108946", IdentifierKind.NIR),
        ("1841276451089", IdentifierKind.NIR),
        ("0123456789", IdentifierKind.PHONE),
        ("33612345678", IdentifierKind.PHONE),
        ("12031957", IdentifierKind.DATE),
        ("12/03/1957", IdentifierKind.DATE),
        ("1957", IdentifierKind.DATE),
        ("2030", IdentifierKind.DATE),
        ("né1957", IdentifierKind.DATE),
        ("4000123456", IdentifierKind.IPP),
        ("12345", IdentifierKind.IPP),
        ("a.b@chu.fr", IdentifierKind.EMAIL),
        ("dupont", IdentifierKind.PERSON_NAME),
        ("DUPONT", IdentifierKind.PERSON_NAME),
        ("lefèvre", IdentifierKind.PERSON_NAME),
        ("lefevre", IdentifierKind.PERSON_NAME),
        ("hélène", IdentifierKind.PERSON_NAME),
        ("helene", IdentifierKind.PERSON_NAME),
        ("silva", IdentifierKind.PERSON_NAME),
        ("petit", IdentifierKind.PERSON_NAME),  # also a common word: flagged (fail closed)
    ],
)
def test_token_kinds(token: str, kind: IdentifierKind) -> None:
    assert identifier_kind_of_token(token) is kind


@pytest.mark.parametrize(
    "token",
    [
        "",
        "01",
        "23",
        "1899",
        "2031",
        "450",
        "1234",
        "v1",
        "spo2",
        "da",
        "le",
        "de",
        "infarctus",
        "pneumopathie",
        "hta",
        "ecg",
        "troponine",
    ],
)
def test_tokens_without_identifiers(token: str) -> None:
    assert identifier_kind_of_token(token) is None


def test_name_lists_come_from_faker_and_are_normalised() -> None:
    lists = name_lists()
    assert len(lists.male_first) > 50 and len(lists.female_first) > 50 and len(lists.last) > 300
    assert len(set(lists.female_first)) == len(lists.female_first)
    assert all(n == n.lower() for n in first_names() | last_names())
    assert {"marie", "jean"} <= first_names()
    assert {"martin", "dupont", "lefèvre", "lefevre"} <= last_names()
    assert not {"da", "le", "de", "dos"} & last_names()
    assert lists.digest().startswith("sha256:")
