"""The synthetic PMSI corpus: content, determinism, sites, canaries, file format."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import date
from itertools import pairwise
from pathlib import Path

import pytest

from passerelle.corpus import (
    CANARY_ALPHABET,
    CANARY_TEMPLATE,
    SITES,
    Corpus,
    Stay,
    generate,
    label_table,
    manifest_digest,
    read_corpus,
    write_corpus,
)
from passerelle.corpus.codes import ACTS, ASSOCIATED, DIAGNOSES, DIAGNOSIS_BY_CODE, SPECIALTIES
from passerelle.errors import BadInput, CorpusError
from registry.identifiers import IdentifierKind, find_identifiers, is_valid_nir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_x() -> Corpus:
    return generate("X", 5000, 11)


@pytest.fixture(scope="module")
def corpus_y() -> Corpus:
    return generate("Y", 5000, 11)


@pytest.fixture(scope="module")
def small() -> Corpus:
    return generate("X", 200, 5, canaries=2, canary_repetitions=2)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------ determinism


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    a = write_corpus(generate("Y", 300, 3, canaries=2), tmp_path / "a").parent
    b = write_corpus(generate("Y", 300, 3, canaries=2), tmp_path / "b").parent
    assert files_of(a) == files_of(b)
    assert manifest_digest(a) == manifest_digest(b)


def test_different_seed_gives_different_corpus(tmp_path: Path) -> None:
    a = write_corpus(generate("X", 300, 1), tmp_path / "a").parent
    b = write_corpus(generate("X", 300, 2), tmp_path / "b").parent
    assert (a / "stays.jsonl").read_bytes() != (b / "stays.jsonl").read_bytes()
    assert manifest_digest(a) != manifest_digest(b)


def test_independent_of_pythonhashseed() -> None:
    code = (
        "import hashlib, json; from passerelle.corpus import generate; "
        "c = generate('X', 150, 9, canaries=1); "
        "print(hashlib.sha256(json.dumps([s.to_json() for s in c.stays]).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_larger_corpus_extends_smaller_one() -> None:
    small, large = generate("X", 100, 4), generate("X", 400, 4)
    # every patient but the last (whose stays may be truncated) is identical
    last = small.stays[-1].patient_id
    head = [s.to_json() for s in small.stays if s.patient_id != last]
    assert head == [s.to_json() for s in large.stays[: len(head)]]


def test_canaries_do_not_change_other_stays() -> None:
    plain = generate("Y", 200, 8)
    planted = generate("Y", 200, 8, canaries=3, canary_repetitions=2)
    assert [s.text for s in plain.stays] == [s.text for s in planted.stays if not s.canary]


# ------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"site": "Z", "n_stays": 10, "seed": 1},
        {"site": "x", "n_stays": 10, "seed": 1},
        {"site": "X", "n_stays": 0, "seed": 1},
        {"site": "X", "n_stays": -5, "seed": 1},
        {"site": "X", "n_stays": True, "seed": 1},
        {"site": "X", "n_stays": 10, "seed": "1"},
        {"site": "X", "n_stays": 10, "seed": 1, "canaries": -1},
        {"site": "X", "n_stays": 10, "seed": 1, "canary_repetitions": 0},
    ],
)
def test_generate_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(CorpusError):
        generate(**kwargs)  # type: ignore[arg-type]


def test_corpus_error_is_bad_input() -> None:
    assert issubclass(CorpusError, BadInput)
    assert SITES == ("X", "Y")


# --------------------------------------------------------------------- patients


def by_patient(corpus: Corpus) -> dict[str, list[Stay]]:
    groups: dict[str, list[Stay]] = defaultdict(list)
    for s in corpus.stays:
        groups[s.patient_id].append(s)
    return groups


def test_stays_per_patient_between_1_and_6_and_skewed(corpus_x: Corpus, corpus_y: Corpus) -> None:
    for corpus in (corpus_x, corpus_y):
        counts = Counter(len(v) for v in by_patient(corpus).values())
        assert set(counts) <= set(range(1, 7))
        assert counts[1] > counts[2] > counts[3] > counts[4] >= counts[6]
        assert counts[1] / sum(counts.values()) > 0.45
        assert len(corpus.stays) == 5000


def test_patient_keeps_identity_and_antecedents(corpus_x: Corpus) -> None:
    for stays in by_patient(corpus_x).values():
        first = stays[0]
        for s in stays:
            assert s.identifiers == first.identifiers
            assert s.sex == first.sex
            assert s.associated_diagnoses == first.associated_diagnoses
        for prev, nxt in pairwise(stays):
            assert date.fromisoformat(prev.discharge_date) < date.fromisoformat(nxt.admission_date)
            assert nxt.stay_id > prev.stay_id
        for s in stays:
            born = date.fromisoformat(s.identifiers.birth_date)
            adm = date.fromisoformat(s.admission_date)
            age = adm.year - born.year - ((adm.month, adm.day) < (born.month, born.day))
            assert s.age == age
            assert s.admission_date <= s.discharge_date


def test_chronic_antecedents_are_written_in_every_stay(corpus_x: Corpus) -> None:
    with_chronic = [s for s in corpus_x.stays if s.associated_diagnoses]
    assert len(with_chronic) > 1000
    for s in with_chronic:
        lines = [ln for ln in s.sections.antecedents.splitlines() if ln.startswith("- ")]
        assert len(lines) >= len(s.associated_diagnoses)


def test_ids_patient_key_distinct_from_ipp(corpus_x: Corpus) -> None:
    ids = [s.stay_id for s in corpus_x.stays]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"X-S\d{6}", i) for i in ids)
    assert all(re.fullmatch(r"X-P\d{6}", s.patient_id) for s in corpus_x.stays)
    ipps = {s.patient_id: s.identifiers.ipp for s in corpus_x.stays}
    assert len(set(ipps.values())) == len(ipps)
    assert all(p.split("-P")[1] not in ipp for p, ipp in ipps.items())


# ------------------------------------------------------------------ identifiers


def test_every_nir_is_valid_and_matches_sex_and_birth(corpus_x: Corpus, corpus_y: Corpus) -> None:
    departments: Counter[str] = Counter()
    for corpus in (corpus_x, corpus_y):
        nirs = {}
        for s in corpus.stays:
            nir = s.identifiers.nir
            assert is_valid_nir(nir), nir
            born = date.fromisoformat(s.identifiers.birth_date)
            assert nir[0] == ("1" if s.sex == "M" else "2")
            assert nir[1:3] == f"{born.year % 100:02d}" and nir[3:5] == f"{born.month:02d}"
            nirs[s.patient_id] = nir
            departments[nir[5:7]] += 1
        assert len(set(nirs.values())) == len(nirs)
    assert departments["2A"] + departments["2B"] > 0  # Corsica is covered
    assert departments["99"] > 0 and departments["97"] > 0


def test_header_carries_the_identifiers(corpus_x: Corpus, corpus_y: Corpus) -> None:
    for corpus in (corpus_x, corpus_y):
        for s in corpus.stays[:300]:
            header = s.sections.header
            ident = s.identifiers
            last, first = ident.name.split(" ", 1)[0], ident.name.split(" ")[-1]
            assert last in header and first in header
            assert ident.ipp in header
            born = date.fromisoformat(ident.birth_date).strftime("%d/%m/%Y")
            assert born in header
            assert ident.nir in header.replace(" ", "")
            kinds = {f.kind for f in find_identifiers(header)}
            assert {
                IdentifierKind.NIR,
                IdentifierKind.IPP,
                IdentifierKind.DATE,
                IdentifierKind.PHONE,
                IdentifierKind.PERSON_NAME,
            } <= kinds


def test_some_bodies_mention_the_patient_and_doctor(corpus_y: Corpus) -> None:
    body_mentions = sum(
        s.identifiers.name.split(" ")[0] in s.sections.motif for s in corpus_y.stays
    )
    assert 0.3 < body_mentions / len(corpus_y.stays) < 0.9
    assert all("Dr " in s.sections.conclusion for s in corpus_y.stays)
    phones = sum("Tél" in s.sections.conclusion for s in corpus_y.stays)
    assert phones > 100


def test_ipp_format_differs_between_sites(corpus_x: Corpus, corpus_y: Corpus) -> None:
    assert all(re.fullmatch(r"40\d{8}", s.identifiers.ipp) for s in corpus_x.stays)
    assert all(re.fullmatch(r"7\d{7}", s.identifiers.ipp) for s in corpus_y.stays)


# ------------------------------------------------------------------------ codes


def test_code_tables() -> None:
    labels = label_table()
    assert len(labels) >= 48
    assert len({d.specialty for d in DIAGNOSES}) >= 8
    assert set(SPECIALTIES) == {d.specialty for d in DIAGNOSES}
    assert all(labels[d.code] == d.label and len(d.label) > 3 for d in DIAGNOSES)
    assert labels["I21.4"] == "Infarctus sous-endocardique aigu du myocarde"
    assert labels["N39.0"] == "Infection des voies urinaires, siège non précisé"
    assert len(ACTS) >= 25
    assert {"DEQP003", "ZBQK002"} <= {a.code for a in ACTS}
    assert all(re.fullmatch(r"[A-Z]{4}\d{3}", a.code) for a in ACTS)
    assert all(re.fullmatch(r"[A-Z]\d{2}(\.\d)?", d.code) for d in DIAGNOSES)
    assert {"E11.9", "I10", "N18.3", "F17.1"} <= {a.code for a in ASSOCIATED}
    for d in DIAGNOSES:
        assert len(d.motifs) >= 3 and len(d.examens) >= 3 and len(d.conclusions) >= 3


def test_every_stay_uses_known_codes_and_constraints(corpus_x: Corpus, corpus_y: Corpus) -> None:
    acts = {a.code for a in ACTS}
    associated = {a.code for a in ASSOCIATED}
    for corpus in (corpus_x, corpus_y):
        for s in corpus.stays:
            d = DIAGNOSIS_BY_CODE[s.true_diagnosis]
            assert s.main_diagnosis in DIAGNOSIS_BY_CODE
            assert s.specialty == d.specialty
            assert set(s.acts) <= acts
            assert set(s.associated_diagnoses) <= associated
            assert d.sex is None or d.sex == s.sex
            assert d.age[0] <= s.age <= d.age[1]
            if d.specialty == "obstétrique":
                assert s.sex == "F" and 16 <= s.age <= 45
            if s.true_diagnosis in ("N40", "C61", "N41.0"):
                assert s.sex == "M"


# ------------------------------------------------------------------------ sites


def test_sites_differ_in_case_mix(corpus_x: Corpus, corpus_y: Corpus) -> None:
    px = Counter(s.main_diagnosis for s in corpus_x.stays)
    py = Counter(s.main_diagnosis for s in corpus_y.stays)
    tv = 0.5 * sum(abs(px[c] / 5000 - py[c] / 5000) for c in set(px) | set(py))
    assert tv > 0.2
    sx = Counter(s.specialty for s in corpus_x.stays)
    sy = Counter(s.specialty for s in corpus_y.stays)
    assert sx["cardiologie"] > sy["cardiologie"] and sx["oncologie"] > sy["oncologie"]
    assert sy["gériatrie"] > sx["gériatrie"] and sy["obstétrique"] > sx["obstétrique"]
    # same label space, a few codes absent at one site
    assert {"G35", "C79.3"} <= set(px) and not {"G35", "C79.3"} & {
        s.true_diagnosis for s in corpus_y.stays
    }
    assert len(set(px) & set(py)) >= 60


def tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_sites_differ_in_style(corpus_x: Corpus, corpus_y: Corpus) -> None:
    x_vocab: set[str] = set()
    for s in corpus_x.stays:
        x_vocab |= tokens(s.text)
    y_docs: Counter[str] = Counter()
    for s in corpus_y.stays:
        y_docs.update(tokens(s.text))
    y_only_frequent = {t for t, n in y_docs.items() if n >= 100 and t not in x_vocab}
    assert {"oppressive", "aeg", "atb", "tdm", "rad", "sau", "tropo"} <= y_only_frequent
    assert corpus_x.stays[0].text.startswith("COMPTE RENDU D'HOSPITALISATION")
    assert corpus_y.stays[0].text.startswith("COURRIER DE SORTIE")


def test_abbreviations_and_typos(corpus_x: Corpus, corpus_y: Corpus) -> None:
    def share(corpus: Corpus, word: str) -> float:
        return sum(word in tokens(s.text) for s in corpus.stays) / len(corpus.stays)

    assert share(corpus_y, "hta") > share(corpus_x, "hta") > 0
    assert share(corpus_y, "atcd") > 0.05
    assert share(corpus_y, "bpco") > share(corpus_x, "bpco") > 0
    clean: set[str] = {
        "patient",
        "patiente",
        "conscient",
        "consciente",
        "orienté",
        "orientée",
        "pression",
        "artérielle",
        "fréquence",
        "cardiaque",
        "ambiant",
        "température",
    }
    for d in DIAGNOSES:
        for phrase in d.motifs + d.examens + d.conclusions:
            clean |= tokens(phrase)
    for corpus, low, high in ((corpus_x, 0.002, 0.03), (corpus_y, 0.005, 0.06)):
        words = [
            t for s in corpus.stays for t in re.findall(r"[^\W\d_]{5,}", s.sections.examen.lower())
        ]
        if corpus is corpus_y:  # Y rewrites some words in its own style
            clean |= set().union(*(tokens(s.sections.examen) for s in generate("Y", 300, 99).stays))
        typos = sum(w not in clean for w in words) / len(words)
        assert low < typos < high, typos


def test_text_is_the_join_of_titled_sections(corpus_x: Corpus, corpus_y: Corpus) -> None:
    for corpus in (corpus_x, corpus_y):
        for s in corpus.stays[:200]:
            parts = s.text.split("\n\n")
            assert len(parts) == 6
            assert parts[1].split("\n", 1)[1] == s.sections.motif


# ------------------------------------------------------------- noise and labels


def test_label_noise_rate_and_consistency(corpus_x: Corpus, corpus_y: Corpus) -> None:
    for corpus in (corpus_x, corpus_y):
        noisy = [s for s in corpus.stays if s.label_noise]
        assert 0.025 < len(noisy) / len(corpus.stays) < 0.06
        assert all(s.main_diagnosis != s.true_diagnosis for s in noisy)
        assert all(s.main_diagnosis == s.true_diagnosis for s in corpus.stays if not s.label_noise)
        siblings = sum(
            s.main_diagnosis in DIAGNOSIS_BY_CODE[s.true_diagnosis].siblings for s in noisy
        )
        assert siblings / len(noisy) > 0.4
        ambiguous = sum(s.ambiguous for s in corpus.stays) / len(corpus.stays)
        assert 0.05 < ambiguous < 0.15


def test_ambiguous_stays_mention_a_competitor(corpus_x: Corpus) -> None:
    amb = [s for s in corpus_x.stays if s.ambiguous]
    assert amb and all("Notion de " in s.sections.motif for s in amb)
    assert not any("Notion de " in s.sections.motif for s in corpus_x.stays if not s.ambiguous)


# --------------------------------------------------------------------- canaries


def test_canaries_are_planted_with_consistent_metadata() -> None:
    corpus = generate("X", 500, 21, canaries=4, canary_repetitions=3)
    assert len(corpus.stays) == 500 + 4 * 3
    stays = {s.stay_id: s for s in corpus.stays}
    assert len(corpus.canaries) == 4
    secrets = set()
    for c in corpus.canaries:
        assert c.template == CANARY_TEMPLATE and "{secret}" in c.template
        symbols = c.secret.split(c.separator) if c.separator else list(c.secret)
        assert len(symbols) == c.length == 6 and all(x in c.symbols for x in symbols)
        assert len(c.symbols) == 16
        assert len(c.stay_ids) == 3
        for sid in c.stay_ids:
            s = stays[sid]
            assert s.canary and s.patient_id == c.patient_id
            assert c.template.format(secret=c.secret) in s.text
        assert {s.stay_id for s in corpus.stays if s.patient_id == c.patient_id} == set(c.stay_ids)
        secrets.add(c.secret)
    assert len(secrets) == 4
    assert sum(s.canary for s in corpus.stays) == 12
    assert not any("Mention de contrôle" in s.text for s in corpus.stays if not s.canary)


def test_canary_words_are_kept_by_a_vocabulary_with_a_patient_floor() -> None:
    """A secret out of the vocabulary could never be memorised: its words must be
    ordinary clinical words that every site writes for many patients, and no identifier."""
    from registry.identifiers import identifier_kind_of_token
    from registry.vocabulary import CLINICAL_SECTIONS, VocabularyConfig, build_vocabulary
    from registry.vocabulary import select_text as select

    for site in ("X", "Y"):
        corpus = generate(site, 1500, 3)
        texts = [select(s.sections.as_dict(), CLINICAL_SECTIONS) for s in corpus.stays]
        vocab = build_vocabulary(texts, [s.patient_id for s in corpus.stays],
                                 VocabularyConfig(min_patients=5))
        assert set(CANARY_ALPHABET.split()) <= set(vocab.tokens), site
    assert all(identifier_kind_of_token(w) is None for w in CANARY_ALPHABET.split())
    assert generate("X", 50, 21).canaries == ()


# ---------------------------------------------------------------------- storage


def test_round_trip(tmp_path: Path, small: Corpus) -> None:
    manifest = write_corpus(small, tmp_path / "c")
    assert manifest == tmp_path / "c" / "manifest.json"
    assert read_corpus(tmp_path / "c") == small
    doc = json.loads(manifest.read_text())
    assert doc["format"] == "passerelle-pmsi-corpus" and doc["format_version"] == 1
    assert doc["site"] == "X" and doc["seed"] == 5 and doc["n_stays"] == 200
    assert doc["canaries"] == 2 and doc["canary_repetitions"] == 2
    assert doc["n_patients"] == len({s.patient_id for s in small.stays})
    assert set(doc["files"]) == {"stays.jsonl", "canaries.jsonl", "codes.json"}
    lines = (tmp_path / "c" / "stays.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 204
    first = json.loads(lines[0])
    assert list(first) == sorted(first)
    codes = json.loads((tmp_path / "c" / "codes.json").read_text(encoding="utf-8"))
    assert codes["diagnoses"]["I21.0"]["specialty"] == "cardiologie"
    assert codes["acts"]["DEQP003"]["label"].startswith("Électrocardiographie")


def test_empty_canaries_file_is_written(tmp_path: Path) -> None:
    write_corpus(generate("Y", 20, 1), tmp_path / "c")
    assert (tmp_path / "c" / "canaries.jsonl").read_bytes() == b""
    assert read_corpus(tmp_path / "c").canaries == ()


def test_manifest_digest(tmp_path: Path, small: Corpus) -> None:
    write_corpus(small, tmp_path / "c")
    digest = manifest_digest(tmp_path / "c")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert digest == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    with pytest.raises(CorpusError):
        manifest_digest(tmp_path / "nothing")


def rewrite(directory: Path, name: str, data: bytes) -> None:
    """Replace a data file and update the manifest so that digests still match."""
    (directory / name).write_bytes(data)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "lines": data.count(b"\n"),
    }
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture()
def written(tmp_path: Path, small: Corpus) -> Path:
    write_corpus(small, tmp_path / "c")
    return tmp_path / "c"


def test_read_refuses_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "absent")


@pytest.mark.parametrize("name", ["canaries.jsonl", "stays.jsonl", "codes.json", "manifest.json"])
def test_read_refuses_missing_file(written: Path, name: str) -> None:
    (written / name).unlink()
    with pytest.raises(CorpusError, match=f"missing file: .*{re.escape(name)}"):
        read_corpus(written)


def test_read_refuses_truncated_file(written: Path) -> None:
    data = (written / "stays.jsonl").read_bytes()
    rewrite(written, "stays.jsonl", data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"stays\.jsonl"):
        read_corpus(written)


def test_read_refuses_bad_json_line(written: Path) -> None:
    lines = (written / "stays.jsonl").read_bytes().splitlines(keepends=True)
    lines[6] = b'{"stay_id": "X-S000007", \n'
    rewrite(written, "stays.jsonl", b"".join(lines))
    with pytest.raises(CorpusError, match=r"stays\.jsonl:7: invalid JSON"):
        read_corpus(written)


def test_read_refuses_digest_mismatch(written: Path) -> None:
    path = written / "stays.jsonl"
    data = bytearray(path.read_bytes())
    data[100] = ord("#") if data[100] != ord("#") else ord("$")
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"digest mismatch for .*stays\.jsonl"):
        read_corpus(written)


def test_read_refuses_unknown_code(written: Path) -> None:
    lines = (written / "stays.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    obj = json.loads(lines[2])
    obj["main_diagnosis"] = "Z99.9"
    obj["label_noise"] = True
    lines[2] = json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"
    rewrite(written, "stays.jsonl", "".join(lines).encode())
    with pytest.raises(CorpusError, match=r"stays\.jsonl:3: unknown code 'Z99\.9'"):
        read_corpus(written)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("age", "67", "age"),
        ("sex", "X", "sex"),
        ("admission_date", "2020-13-01", "admission_date"),
        ("acts", ["NOPE001"], "unknown code 'NOPE001'"),
        ("text", "edited", "join of the sections"),
        ("canary", 1, "canary is not a boolean"),
    ],
)
def test_read_refuses_bad_schema(written: Path, key: str, value: object, message: str) -> None:
    lines = (written / "stays.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    obj = json.loads(lines[0])
    obj[key] = value
    lines[0] = json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"
    rewrite(written, "stays.jsonl", "".join(lines).encode())
    with pytest.raises(CorpusError, match=message):
        read_corpus(written)


def test_read_refuses_extra_key_and_bad_manifest(written: Path) -> None:
    lines = (written / "stays.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    obj = json.loads(lines[0])
    obj["extra"] = 1
    lines[0] = json.dumps(obj) + "\n"
    rewrite(written, "stays.jsonl", "".join(lines).encode())
    with pytest.raises(CorpusError, match="unexpected extra"):
        read_corpus(written)
    (written / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match=r"manifest\.json:1: invalid JSON"):
        read_corpus(written)


def test_read_refuses_tampered_canary(written: Path) -> None:
    lines = (written / "canaries.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    obj = json.loads(lines[0])
    obj["secret"] = "1 2 3"  # noqa: S105 - a canary, not a password
    lines[0] = json.dumps(obj) + "\n"
    rewrite(written, "canaries.jsonl", "".join(lines).encode())
    with pytest.raises(CorpusError, match=r"canaries\.jsonl:1"):
        read_corpus(written)


def test_write_refuses_non_empty_dir_and_leaves_no_temp(tmp_path: Path, small: Corpus) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CorpusError, match="not empty"):
        write_corpus(small, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CorpusError, match="not a directory"):
        write_corpus(small, tmp_path / "file")


def test_write_into_empty_existing_dir(tmp_path: Path, small: Corpus) -> None:
    (tmp_path / "out").mkdir()
    write_corpus(small, tmp_path / "out")
    assert read_corpus(tmp_path / "out") == small
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_write_leaves_nothing(
    tmp_path: Path, small: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CorpusError, match="disk full"):
        write_corpus(small, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
