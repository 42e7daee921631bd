"""Writing, reading and fingerprinting corpus directories.

A corpus directory holds ``stays.jsonl``, ``canaries.jsonl``, ``codes.json`` and
``manifest.json`` (see docs/data-dictionary.md). Writing is atomic; reading checks
every digest, every line's schema and every code, and raises :class:`CorpusError`
naming the file (and line) at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any, NoReturn

from passerelle.corpus.codes import ACTS, ASSOCIATED, DIAGNOSES, SPECIALTIES
from passerelle.corpus.generator import GENERATOR_VERSION
from passerelle.corpus.model import Canary, Corpus, Identifiers, Sections, Stay, join_sections
from passerelle.corpus.sites import PROFILES, SECTION_KEYS
from passerelle.errors import CorpusError
from registry.identifiers import is_valid_nir, name_lists

FORMAT = "passerelle-pmsi-corpus"
FORMAT_VERSION = 1
STAYS_FILE = "stays.jsonl"
CANARIES_FILE = "canaries.jsonl"
CODES_FILE = "codes.json"
MANIFEST_FILE = "manifest.json"
DATA_FILES: tuple[str, ...] = (STAYS_FILE, CANARIES_FILE, CODES_FILE)

_STAY_KEYS = frozenset(
    {
        "stay_id",
        "patient_id",
        "site",
        "admission_date",
        "discharge_date",
        "age",
        "sex",
        "specialty",
        "text",
        "sections",
        "main_diagnosis",
        "true_diagnosis",
        "associated_diagnoses",
        "acts",
        "label_noise",
        "ambiguous",
        "canary",
        "identifiers",
    }
)
_IDENTIFIER_KEYS = frozenset({"name", "nir", "birth_date", "ipp"})
_CANARY_KEYS = frozenset(
    {"canary_id", "stay_ids", "patient_id", "template", "secret", "alphabet", "length", "separator"}
)
_MANIFEST_KEYS = frozenset(
    {
        "format",
        "format_version",
        "generator_version",
        "site",
        "seed",
        "n_stays",
        "n_patients",
        "canaries",
        "canary_repetitions",
        "name_lists_sha256",
        "files",
    }
)


def _dumps_line(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _dumps_doc(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2) + "\n"


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def codes_document() -> dict[str, Any]:
    """The content of ``codes.json``: diagnosis, associated-diagnosis and act tables."""
    return {
        "diagnoses": {d.code: {"label": d.label, "specialty": d.specialty} for d in DIAGNOSES},
        "associated": {a.code: {"label": a.label} for a in ASSOCIATED},
        "acts": {a.code: {"label": a.label, "short": a.short} for a in ACTS},
    }


# ------------------------------------------------------------------------ write


def _write_file(path: Path, content: str) -> dict[str, int | str]:
    data = content.encode()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "lines": data.count(b"\n"),
    }


def write_corpus(corpus: Corpus, out_dir: Path) -> Path:
    """Write ``corpus`` into ``out_dir`` atomically and return the manifest's path.

    Files are written into a temporary sibling directory renamed into place at the
    end. Refuses (:class:`CorpusError`) an ``out_dir`` that exists and is not an
    empty directory; leaves nothing behind on failure.
    """
    if corpus.site not in PROFILES:
        raise CorpusError(f"unknown site {corpus.site!r} in corpus")
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise CorpusError(f"output path exists and is not a directory: {out_dir}")
        if any(out_dir.iterdir()):
            raise CorpusError(f"output directory is not empty, refusing to overwrite: {out_dir}")
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise CorpusError(f"cannot create the output directory {out_dir}: {e}") from e
    try:
        files = {
            STAYS_FILE: _write_file(
                tmp / STAYS_FILE, "".join(_dumps_line(s.to_json()) + "\n" for s in corpus.stays)
            ),
            CANARIES_FILE: _write_file(
                tmp / CANARIES_FILE,
                "".join(_dumps_line(c.to_json()) + "\n" for c in corpus.canaries),
            ),
            CODES_FILE: _write_file(tmp / CODES_FILE, _dumps_doc(codes_document())),
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generator_version": GENERATOR_VERSION,
            "site": corpus.site,
            "seed": corpus.seed,
            "n_stays": sum(1 for s in corpus.stays if not s.canary),
            "n_patients": len({s.patient_id for s in corpus.stays}),
            "canaries": len(corpus.canaries),
            "canary_repetitions": len(corpus.canaries[0].stay_ids) if corpus.canaries else 1,
            "name_lists_sha256": name_lists().digest(),
            "files": files,
        }
        _write_file(tmp / MANIFEST_FILE, _dumps_doc(manifest))
        # mkdtemp made it 0700: the corpus carries (synthetic) identifiers; keep it private.
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorpusError(f"cannot write the corpus to {out_dir}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST_FILE


# ------------------------------------------------------------------------- read


def _fail(where: str, message: str) -> NoReturn:
    raise CorpusError(f"{where}: {message}")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CorpusError(f"missing file: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def _read_manifest(data_dir: Path) -> dict[str, Any]:
    if not data_dir.is_dir():
        raise CorpusError(f"corpus directory not found: {data_dir}")
    path = data_dir / MANIFEST_FILE
    manifest = _load_json(path)
    where = str(path)
    if not isinstance(manifest, dict):
        _fail(where, "not a JSON object")
    missing = sorted(_MANIFEST_KEYS - manifest.keys())
    if missing:
        _fail(where, f"missing keys {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        _fail(where, f"format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        _fail(where, f"unsupported format_version {manifest['format_version']!r}")
    if manifest["site"] not in PROFILES:
        _fail(where, f"unknown site {manifest['site']!r}")
    for key in ("seed", "n_stays", "n_patients", "canaries", "canary_repetitions"):
        if not _is_int(manifest[key]):
            _fail(where, f"{key} is not an integer")
    files = manifest["files"]
    if not isinstance(files, dict):
        _fail(where, "files is not an object")
    for name in DATA_FILES:
        entry = files.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            _fail(where, f"files does not describe {name}")
    return manifest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _verify_file(data_dir: Path, name: str, entry: dict[str, Any]) -> bytes:
    path = data_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise CorpusError(f"missing file: {path}") from e
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CorpusError(
            f"digest mismatch for {path}: manifest says sha256:{entry['sha256']}, "
            f"file has sha256:{digest}"
        )
    if entry.get("bytes") != len(data) or entry.get("lines") != data.count(b"\n"):
        raise CorpusError(f"size mismatch for {path}: does not match the manifest")
    return data


def _jsonl(path: Path, data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8: {e}") from e
    if text and not text.endswith("\n"):
        raise CorpusError(f"{path}: truncated, last line has no newline")
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: invalid JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            _fail(where, "not a JSON object")
        yield where, obj


def _exact_keys(where: str, obj: dict[str, Any], keys: frozenset[str], what: str) -> None:
    if obj.keys() != keys:
        problems = []
        if keys - obj.keys():
            problems.append("missing " + ", ".join(sorted(keys - obj.keys())))
        if obj.keys() - keys:
            problems.append("unexpected " + ", ".join(sorted(obj.keys() - keys)))
        _fail(where, f"{what} keys: {'; '.join(problems)}")


def _str(where: str, obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        _fail(where, f"{key} is not a string")
    return value


def _bool(where: str, obj: dict[str, Any], key: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        _fail(where, f"{key} is not a boolean")
    return value


def _iso_date(where: str, obj: dict[str, Any], key: str) -> date:
    value = _str(where, obj, key)
    try:
        parsed = date.fromisoformat(value)
    except ValueError:
        _fail(where, f"{key} is not an ISO date: {value!r}")
    if parsed.isoformat() != value:
        _fail(where, f"{key} is not an ISO date: {value!r}")
    return parsed


def _str_list(
    where: str,
    obj: dict[str, Any],
    key: str,
    known: Callable[[str], bool],
    unknown: str = f"not in {CODES_FILE}",
) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, f"{key} is not a list of strings")
    for item in value:
        if not known(item):
            _fail(where, f"unknown code {item!r} in {key} ({unknown})")
    return tuple(value)


def _parse_codes(path: Path, data: bytes) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(doc, dict) or set(doc) != {"diagnoses", "associated", "acts"}:
        _fail(str(path), "expected the keys diagnoses, associated, acts")
    for table in doc.values():
        if not isinstance(table, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("label"), str) for v in table.values()
        ):
            _fail(str(path), "every code needs a label")
    for code, entry in doc["diagnoses"].items():
        if entry.get("specialty") not in SPECIALTIES:
            _fail(str(path), f"diagnosis {code} has an unknown specialty")
    return doc


def _parse_stay(
    where: str, obj: dict[str, Any], site: str, codes: dict[str, dict[str, Any]]
) -> Stay:
    _exact_keys(where, obj, _STAY_KEYS, "stay")
    diagnoses, associated, acts = codes["diagnoses"], codes["associated"], codes["acts"]
    stay_id = _str(where, obj, "stay_id")
    patient_id = _str(where, obj, "patient_id")
    if not re.fullmatch(rf"{site}-S\d{{6,}}", stay_id):
        _fail(where, f"bad stay_id {stay_id!r}")
    if not re.fullmatch(rf"{site}-P\d{{6,}}", patient_id):
        _fail(where, f"bad patient_id {patient_id!r}")
    if obj["site"] != site:
        _fail(where, f"site {obj['site']!r} differs from the manifest's {site!r}")
    admission = _iso_date(where, obj, "admission_date")
    discharge = _iso_date(where, obj, "discharge_date")
    if discharge < admission:
        _fail(where, "discharge_date is before admission_date")
    age = obj["age"]
    if not _is_int(age) or not 0 <= age <= 130:
        _fail(where, "age is not an integer in 0..130")
    if obj["sex"] not in ("M", "F"):
        _fail(where, "sex is not 'M' or 'F'")
    for key in ("main_diagnosis", "true_diagnosis"):
        if _str(where, obj, key) not in diagnoses:
            _fail(where, f"unknown code {obj[key]!r} in {key} (not in {CODES_FILE})")
    specialty = _str(where, obj, "specialty")
    if specialty != diagnoses[obj["true_diagnosis"]]["specialty"]:
        _fail(where, "specialty does not match the true diagnosis")
    sections_obj = obj["sections"]
    if not isinstance(sections_obj, dict):
        _fail(where, "sections is not an object")
    _exact_keys(where, sections_obj, frozenset(SECTION_KEYS), "sections")
    sections = Sections(**{k: _str(where, sections_obj, k) for k in SECTION_KEYS})
    text = _str(where, obj, "text")
    if text != join_sections(site, sections):
        _fail(where, "text is not the join of the sections under the site's titles")
    label_noise = _bool(where, obj, "label_noise")
    if label_noise != (obj["main_diagnosis"] != obj["true_diagnosis"]):
        _fail(where, "label_noise does not match main_diagnosis vs true_diagnosis")
    ident = obj["identifiers"]
    if not isinstance(ident, dict):
        _fail(where, "identifiers is not an object")
    _exact_keys(where, ident, _IDENTIFIER_KEYS, "identifiers")
    identifiers = Identifiers(**{k: _str(where, ident, k) for k in sorted(_IDENTIFIER_KEYS)})
    if not is_valid_nir(identifiers.nir):
        _fail(where, "identifiers.nir is not a valid NIR")
    _iso_date(where, ident, "birth_date")
    return Stay(
        stay_id=stay_id,
        patient_id=patient_id,
        site=site,
        admission_date=obj["admission_date"],
        discharge_date=obj["discharge_date"],
        age=age,
        sex=obj["sex"],
        specialty=specialty,
        text=text,
        sections=sections,
        main_diagnosis=obj["main_diagnosis"],
        true_diagnosis=obj["true_diagnosis"],
        associated_diagnoses=_str_list(
            where, obj, "associated_diagnoses", lambda c: c in associated or c in diagnoses
        ),
        acts=_str_list(where, obj, "acts", lambda c: c in acts),
        label_noise=label_noise,
        ambiguous=_bool(where, obj, "ambiguous"),
        canary=_bool(where, obj, "canary"),
        identifiers=identifiers,
    )


def _parse_canary(where: str, obj: dict[str, Any], stays: dict[str, Stay]) -> Canary:
    _exact_keys(where, obj, _CANARY_KEYS, "canary")
    stay_ids = _str_list(where, obj, "stay_ids", lambda s: s in stays, f"not in {STAYS_FILE}")
    length = obj["length"]
    if not _is_int(length) or length < 1:
        _fail(where, "length is not a positive integer")
    canary = Canary(
        canary_id=_str(where, obj, "canary_id"),
        stay_ids=stay_ids,
        patient_id=_str(where, obj, "patient_id"),
        template=_str(where, obj, "template"),
        secret=_str(where, obj, "secret"),
        alphabet=_str(where, obj, "alphabet"),
        length=length,
        separator=_str(where, obj, "separator"),
    )
    if "{secret}" not in canary.template:
        _fail(where, "template has no {secret} placeholder")
    symbols = canary.secret.split(canary.separator) if canary.separator else list(canary.secret)
    if len(symbols) != length or not all(s in canary.symbols for s in symbols):
        _fail(where, "secret does not have the declared length and alphabet")
    sentence = canary.template.format(secret=canary.secret)
    for stay_id in stay_ids:
        stay = stays[stay_id]
        if not stay.canary or stay.patient_id != canary.patient_id or sentence not in stay.text:
            _fail(where, f"stay {stay_id} does not carry this canary")
    return canary


def read_corpus(data_dir: Path) -> Corpus:
    """Load and fully validate a corpus directory written by :func:`write_corpus`."""
    data_dir = Path(data_dir)
    manifest = _read_manifest(data_dir)
    raw = {name: _verify_file(data_dir, name, manifest["files"][name]) for name in DATA_FILES}
    codes = _parse_codes(data_dir / CODES_FILE, raw[CODES_FILE])
    site = manifest["site"]
    stays: dict[str, Stay] = {}
    stays_path = data_dir / STAYS_FILE
    for where, obj in _jsonl(stays_path, raw[STAYS_FILE]):
        try:
            stay = _parse_stay(where, obj, site, codes)
        except (KeyError, TypeError, ValueError) as e:  # defensive: schema checks above
            raise CorpusError(f"{where}: malformed stay: {e}") from e
        if stay.stay_id in stays:
            _fail(where, f"duplicate stay_id {stay.stay_id}")
        stays[stay.stay_id] = stay
    canaries: list[Canary] = []
    carried: set[str] = set()
    for where, obj in _jsonl(data_dir / CANARIES_FILE, raw[CANARIES_FILE]):
        try:
            canary = _parse_canary(where, obj, stays)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorpusError(f"{where}: malformed canary: {e}") from e
        carried.update(canary.stay_ids)
        canaries.append(canary)
    where = str(data_dir / MANIFEST_FILE)
    canary_stays = {s.stay_id for s in stays.values() if s.canary}
    if canary_stays != carried:
        _fail(str(stays_path), "canary stays and canaries.jsonl disagree")
    if manifest["n_stays"] != len(stays) - len(canary_stays):
        _fail(where, "n_stays does not match stays.jsonl")
    if manifest["canaries"] != len(canaries):
        _fail(where, "canaries does not match canaries.jsonl")
    if manifest["n_patients"] != len({s.patient_id for s in stays.values()}):
        _fail(where, "n_patients does not match stays.jsonl")
    return Corpus(site, manifest["seed"], tuple(stays.values()), tuple(canaries))


def manifest_digest(data_dir: Path) -> str:
    """``sha256:<hex>`` of ``manifest.json``'s canonical JSON: the dataset fingerprint."""
    manifest = _read_manifest(Path(data_dir))
    return "sha256:" + hashlib.sha256(_canonical(manifest)).hexdigest()
