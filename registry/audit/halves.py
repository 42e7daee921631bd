"""Reference models the vendor trains itself, on halves of the audit pool Passerelle drew.

When the recipe cannot run at the site (the vendor's GPUs, its proprietary pipeline), the
vendor may hand over the reference models instead; what it may not choose is which stays
each model is trained on, or the attacks would be calibrated on models of its choosing.
So:

1. ``model audit REF ... --draw-halves DIR`` draws the assignment exactly as the audit's
   own reference models get it (:func:`assign_halves`: each pool patient IN for half of
   the K models; K = the policy's count; the audit's ``--seed``), writes the K
   half-corpora ``DIR/k/corpus`` (the pool's stays IN for model k) and ``DIR/halves.json``
   (seed, K, each half's patient-set digest and corpus digest, and the assignment digest
   over them), keeps a copy of halves.json in the site's home
   (``HOME/audits/halves/NAME-vVERSION-<digest>.json``) and records an
   ``audit_halves_drawn`` record in the ledger;
2. the vendor trains ``DIR/k/model.keras`` | ``model.skops`` | ``model.onnx`` on
   ``DIR/k/corpus`` (encoded with the target's own vocabulary, as the model expects);
3. ``model audit REF ... --reference-dir DIR`` checks that halves.json is the recorded
   draw for this version (its digest in a signed ledger record) and that every half the
   audit draws again has the recorded digest, then scores those models instead of
   training (:class:`ProvidedReferences`); their digest is recorded as the recipe's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from passerelle.digests import canonical_json, sha256_bytes, sha256_file
from passerelle.errors import BadInput
from passerelle.recipes import RecipeInfo, RecipeKind
from registry.audit.recipe import Encoding, StayScorer, model_scorer
from registry.coder import Examples

HALVES_FILE = "halves.json"
FORMAT = "passerelle-audit-halves"
MODEL_FILES = ("model.keras", "model.skops", "model.onnx")
CORPUS = "corpus"
NAME = "vendor-references"


def assign_halves(patients: Sequence[str], count: int, seed: int) -> npt.NDArray[np.bool_]:
    """(count, len(patients)): patient j is IN for model k. Each patient is IN for half of
    the models (count even) or half +- 1 (count odd); drawn with ``seed``."""
    rng = np.random.default_rng(seed + 7919)
    assignment = np.zeros((count, len(patients)), dtype=bool)
    for j in range(len(patients)):
        assignment[rng.permutation(count)[: count // 2 + (j % 2) * (count % 2)], j] = True
    return assignment


def patients_digest(patients: Sequence[str]) -> str:
    """sha256 of the sorted set of a half's patient ids (what pins the half)."""
    return sha256_bytes(canonical_json(sorted(set(patients))))


def assignment_digest(half_digests: Sequence[str]) -> str:
    return sha256_bytes(canonical_json(list(half_digests)))


@dataclass(frozen=True)
class Halves:
    """What halves.json says (and the ledger record commits to)."""

    model: str
    version: str
    seed: int
    count: int
    half_digests: tuple[str, ...]  # patients_digest of half k
    corpus_digests: tuple[str, ...]  # manifest digest of DIR/k/corpus
    digest: str  # assignment_digest(half_digests)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": 1, "model": self.model,
                "version": self.version, "seed": self.seed, "reference_models": self.count,
                "halves": [{"index": k, "patients_digest": h, "corpus_digest": c}
                           for k, (h, c) in enumerate(zip(self.half_digests,
                                                          self.corpus_digests, strict=True))],
                "assignment_digest": self.digest}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Halves:
        if doc.get("format") != FORMAT or doc.get("format_version") != 1:
            raise ValueError(f"not a {FORMAT} version 1")
        halves = list(doc["halves"])
        if [h["index"] for h in halves] != list(range(len(halves))):
            raise ValueError("halves must be listed by index 0..K-1")
        out = cls(model=str(doc["model"]), version=str(doc["version"]), seed=int(doc["seed"]),
                  count=int(doc["reference_models"]),
                  half_digests=tuple(str(h["patients_digest"]) for h in halves),
                  corpus_digests=tuple(str(h["corpus_digest"]) for h in halves),
                  digest=str(doc["assignment_digest"]))
        if out.count != len(halves) or assignment_digest(out.half_digests) != out.digest:
            raise ValueError("the assignment digest or count does not match the halves")
        return out


def read_halves(directory: Path) -> Halves:
    path = directory / HALVES_FILE
    try:
        return Halves.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as e:
        raise BadInput(f"{path}: missing (write the halves with --draw-halves {directory})") \
            from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: unreadable halves: {e}") from e


def reference_files(directory: Path, count: int) -> list[Path]:
    """``DIR/k/model.*`` for k < count: exactly one model per half, no other half."""
    found: list[Path] = []
    for k in range(count):
        models = [directory / str(k) / name for name in MODEL_FILES
                  if (directory / str(k) / name).is_file()]
        if not models:
            raise BadInput(f"{directory / str(k)}: no reference model ({', '.join(MODEL_FILES)})"
                           f": the {count} halves each need the model trained on them")
        if len(models) > 1:
            raise BadInput(f"{directory / str(k)}: several reference models "
                           f"({', '.join(m.name for m in models)}): one per half")
        found.append(models[0])
    extra = sorted(p.name for p in directory.iterdir()
                   if p.name not in {HALVES_FILE, *map(str, range(count))})
    if extra:
        raise BadInput(f"{directory}: unexpected {', '.join(extra)}: {count} halves were "
                       f"drawn (0..{count - 1})")
    return found


def load_reference(path: Path) -> Any:
    """A vendor's reference model, loaded as the intake loads sources (registry.sources:
    Keras in safe mode, skops with trusted types only, ONNX without external data)."""
    from registry.sources import load_source

    framework = {".keras": "keras", ".skops": "sklearn", ".onnx": "onnx"}[path.suffix]
    try:
        return load_source(path, framework)
    except BadInput as e:
        raise BadInput(f"{path}: the reference model cannot be loaded: {e}") from e


def models_digest(files: Sequence[Path]) -> str:
    return sha256_bytes(canonical_json([sha256_file(f) for f in files]))


@dataclass(frozen=True)
class ProvidedReferences:
    """The audit's :class:`~registry.audit.recipe.Recipe` over the vendor's models: "fitting"
    half k returns the model trained on it, after checking the half is the drawn one."""

    models: tuple[Any, ...]
    halves: Halves
    encoding: Encoding
    info: RecipeInfo

    @property
    def name(self) -> str:
        return NAME

    def steps(self, train_stays: int) -> int | None:
        return None

    def fit(self, train: Examples, seed: int, steps: int | None) -> StayScorer:
        digest = patients_digest(train.patient_ids)
        if digest not in self.halves.half_digests:
            raise BadInput("a half the audit draws is not one of the recorded halves: the "
                           "corpora, the policy's reference-model count or --seed differ "
                           "from the draw")
        k = self.halves.half_digests.index(digest)
        return model_scorer(self.models[k], self.encoding, f"reference model {k}")


def provided_references(directory: Path, halves: Halves, count: int,
                        encoding: Encoding) -> ProvidedReferences:
    if halves.count != count:
        raise BadInput(f"{directory / HALVES_FILE} drew {halves.count} halves; this audit "
                       f"takes {count} reference models")
    files = reference_files(directory, count)
    models = tuple(load_reference(f) for f in files)
    info = RecipeInfo(NAME, RecipeKind.VENDOR_REFERENCES, models_digest(files))
    return ProvidedReferences(models, halves, encoding, info)


def halves_recorded(home: Path, halves: Halves) -> bool:
    """Whether a signed ``audit_halves_drawn`` record of this site commits to ``halves``."""
    from transfer.acts import has_ledger
    from transfer.ledger_site import open_ledger, own_keys
    from transfer.records import RecordKind, check_signature

    if not has_ledger(home):
        return False
    with open_ledger(home) as ledger:
        found = ledger.records(kind=RecordKind.AUDIT_HALVES_DRAWN)
    for record in reversed(found):
        f = record.fields
        if (f.get("assignment_digest"), f.get("model"), f.get("version")) == (
                halves.digest, halves.model, halves.version):
            check_signature(record, own_keys(home))
            return True
    return False


def home_copy(home: Path, halves: Halves) -> Path:
    """Where the site keeps its copy of a draw's halves.json."""
    return (home / "audits" / "halves" /
            f"{halves.model}-v{halves.version}-{halves.digest.removeprefix('sha256:')[:16]}.json")
