"""The audit's sealed reserve: non-members drawn by the site, before any training.

``passerelle data seal DIR --fraction F --out TRAIN_DIR`` (:func:`seal_corpus`), run by
the site administrator at the training site:

1. every patient of DIR whose keyed fraction (transfer.pseudonym, purpose
   ``audit-reserve``) is below F is in the reserve: the site's secret key decides, not
   the model's owner, and a patient's side does not move when others come or go;
2. the corpus handed to training (TRAIN_DIR) is DIR without the reserve's patients (their
   stays and canaries);
3. a ``reserve_sealed`` record commits to it: the digests of both corpora, F, the counts,
   and a keyed digest of the reserve's patient set (it reveals nothing without the key).

The audit (:func:`open_reserve`) finds the record whose training corpus is the one the
model version declares, re-reads DIR, draws the reserve again with the key and checks it
against the commitment: its non-members are patients the owner never had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from passerelle.corpus import Corpus, manifest_digest, read_corpus, write_corpus
from passerelle.errors import BadInput, Refused

PURPOSE = "audit-reserve"
_SET_PURPOSE = "audit-reserve-set"
MIN_FRACTION, MAX_FRACTION = 0.05, 0.5


class ReserveError(Refused):
    """The sealed reserve does not match its commitment in the ledger."""


@dataclass(frozen=True)
class Seal:
    """What a ``reserve_sealed`` record commits to."""

    corpus: str  # manifest digest of the sealed corpus (reserve included)
    training_corpus: str  # manifest digest of the corpus handed to training
    fraction: float
    reserve_digest: str  # keyed digest of the sorted reserve patient ids
    reserve_patients: int
    reserve_stays: int
    training_patients: int
    training_stays: int

    def fields(self) -> dict[str, object]:
        return {"corpus": self.corpus, "training_corpus": self.training_corpus,
                "fraction": self.fraction, "reserve_digest": self.reserve_digest,
                "reserve_patients": self.reserve_patients, "reserve_stays": self.reserve_stays,
                "training_patients": self.training_patients,
                "training_stays": self.training_stays}


@dataclass(frozen=True)
class Reserve:
    seal: Seal
    corpus: Corpus  # the sealed corpus, reserve included
    patients: frozenset[str]


def _check_fraction(fraction: float) -> None:
    if not MIN_FRACTION <= fraction <= MAX_FRACTION:
        raise BadInput(f"--fraction {fraction:g} is outside [{MIN_FRACTION:g}, "
                       f"{MAX_FRACTION:g}]")


def draw_reserve(home: Path, corpus: Corpus, fraction: float) -> frozenset[str]:
    """The patients of ``corpus`` in the site's reserve at ``fraction``."""
    from transfer.pseudonym import keyed_fraction_with, site_key

    key = site_key(home)
    patients = {s.patient_id for s in corpus.stays}
    return frozenset(p for p in patients if keyed_fraction_with(key, PURPOSE, p) < fraction)


def reserve_digest(home: Path, patients: Sequence[str] | frozenset[str]) -> str:
    from transfer.pseudonym import keyed_id

    return keyed_id(home, _SET_PURPOSE, "\n".join(sorted(patients)))


def training_part(corpus: Corpus, reserve: frozenset[str]) -> Corpus:
    """``corpus`` without the reserve's patients (stays and canaries)."""
    return Corpus(corpus.site, corpus.seed,
                  tuple(s for s in corpus.stays if s.patient_id not in reserve),
                  tuple(c for c in corpus.canaries if c.patient_id not in reserve))


def seal_corpus(home: Path, data: Path, fraction: float, out: Path) -> Seal:
    """Draw the reserve, write the training corpus to ``out``, record the commitment."""
    from transfer.acts import has_ledger, recorder
    from transfer.records import RecordKind, Subject

    _check_fraction(fraction)
    if not has_ledger(home):
        raise BadInput(f"{home}: no site identity here; sealing a reserve needs the site's "
                       "key and ledger (run `passerelle site init NAME` first)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty directory")
    corpus = read_corpus(data)
    reserve = draw_reserve(home, corpus, fraction)
    train = training_part(corpus, reserve)
    patients = {s.patient_id for s in corpus.stays}
    if not reserve or len(reserve) == len(patients):
        raise BadInput(f"{data}: a reserve of {len(reserve)} of {len(patients)} patients "
                       "leaves nothing to train on or nothing to audit with")
    write_corpus(train, out)
    try:
        seal = Seal(corpus=manifest_digest(data), training_corpus=manifest_digest(out),
                    fraction=fraction, reserve_digest=reserve_digest(home, reserve),
                    reserve_patients=len(reserve),
                    reserve_stays=len(corpus.stays) - len(train.stays),
                    training_patients=len(patients) - len(reserve),
                    training_stays=len(train.stays))
        with recorder(home) as rec:
            rec.record(RecordKind.RESERVE_SEALED,
                       [Subject.of(f"dataset:{corpus.site}", seal.corpus),
                        Subject.of(f"dataset:{corpus.site}-training", seal.training_corpus)],
                       seal.fields())
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        raise
    return seal


def find_seal(home: Path, training_corpus: str) -> Seal | None:
    """The newest ``reserve_sealed`` record whose training corpus is ``training_corpus``."""
    from transfer.acts import has_ledger
    from transfer.ledger_site import open_ledger, own_keys
    from transfer.records import RecordKind, check_signature

    if not has_ledger(home):
        return None
    with open_ledger(home) as ledger:
        found = ledger.records(kind=RecordKind.RESERVE_SEALED)
    for record in reversed(found):
        if record.fields.get("training_corpus") != training_corpus:
            continue
        check_signature(record, own_keys(home))
        f = record.fields
        try:
            return Seal(corpus=str(f["corpus"]), training_corpus=str(f["training_corpus"]),
                        fraction=float(f["fraction"]), reserve_digest=str(f["reserve_digest"]),
                        reserve_patients=int(f["reserve_patients"]),
                        reserve_stays=int(f["reserve_stays"]),
                        training_patients=int(f["training_patients"]),
                        training_stays=int(f["training_stays"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ReserveError(f"the reserve_sealed record {record.id} is malformed: {e}") from e
    return None


def open_reserve(home: Path, training_corpus: str, sealed_dir: Path) -> Reserve:
    """The reserve sealed for ``training_corpus``, re-drawn from ``sealed_dir`` and checked."""
    seal = find_seal(home, training_corpus)
    if seal is None:
        raise BadInput("no sealed reserve for the corpus this version was trained on: the "
                       "site seals one before training (`passerelle data seal DIR --fraction "
                       "F --out TRAIN_DIR`) and the vendor trains on TRAIN_DIR")
    if manifest_digest(sealed_dir) != seal.corpus:
        raise BadInput(f"{sealed_dir} is not the corpus sealed for this training corpus "
                       f"(expected the manifest digest {seal.corpus})")
    corpus = read_corpus(sealed_dir)
    reserve = draw_reserve(home, corpus, seal.fraction)
    if reserve_digest(home, reserve) != seal.reserve_digest or \
            len(reserve) != seal.reserve_patients:
        raise ReserveError("the reserve drawn again does not match its sealed commitment "
                           "(the site's key or the corpus changed)")
    return Reserve(seal=seal, corpus=corpus, patients=reserve)
