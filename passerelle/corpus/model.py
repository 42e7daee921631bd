"""The corpus records: stays, canaries, and the corpus that holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from passerelle.corpus.sites import PROFILES, SECTION_KEYS


@dataclass(frozen=True)
class Sections:
    """The six sections of a discharge letter, without their titles."""

    header: str
    motif: str
    antecedents: str
    examen: str
    conclusion: str
    actes: str

    def as_dict(self) -> dict[str, str]:
        """The sections keyed as in ``stays.jsonl``."""
        return {key: getattr(self, key) for key in SECTION_KEYS}


@dataclass(frozen=True)
class Identifiers:
    """Ground truth of what the header carries: display name, NIR, birth date, IPP."""

    name: str
    nir: str
    birth_date: str
    ipp: str


def join_sections(site: str, sections: Sections) -> str:
    """The full letter: each section under its site-specific title, blank-line separated."""
    titles = PROFILES[site].titles
    return "\n\n".join(f"{titles[key]}\n{getattr(sections, key)}" for key in SECTION_KEYS)


@dataclass(frozen=True)
class Stay:
    """One hospital stay: its letter, its codes and its ground truth."""

    stay_id: str
    patient_id: str
    site: str
    admission_date: str
    discharge_date: str
    age: int
    sex: str
    specialty: str
    text: str
    sections: Sections
    main_diagnosis: str
    true_diagnosis: str
    associated_diagnoses: tuple[str, ...]
    acts: tuple[str, ...]
    label_noise: bool
    ambiguous: bool
    canary: bool
    identifiers: Identifiers

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``stays.jsonl``."""
        return {
            "stay_id": self.stay_id,
            "patient_id": self.patient_id,
            "site": self.site,
            "admission_date": self.admission_date,
            "discharge_date": self.discharge_date,
            "age": self.age,
            "sex": self.sex,
            "specialty": self.specialty,
            "text": self.text,
            "sections": self.sections.as_dict(),
            "main_diagnosis": self.main_diagnosis,
            "true_diagnosis": self.true_diagnosis,
            "associated_diagnoses": list(self.associated_diagnoses),
            "acts": list(self.acts),
            "label_noise": self.label_noise,
            "ambiguous": self.ambiguous,
            "canary": self.canary,
            "identifiers": {
                "name": self.identifiers.name,
                "nir": self.identifiers.nir,
                "birth_date": self.identifiers.birth_date,
                "ipp": self.identifiers.ipp,
            },
        }


@dataclass(frozen=True)
class Canary:
    """A planted secret: ``template.format(secret=secret)`` appears in each listed stay.

    ``secret`` is the exact substituted string: ``length`` symbols drawn from
    ``alphabet``, joined by ``separator``. The alphabet is a string of one-character
    symbols, or, when it holds spaces, a space-separated list of words (the generator's
    canaries are words a vocabulary keeps, so that a model can memorise them).
    """

    canary_id: str
    stay_ids: tuple[str, ...]
    patient_id: str
    template: str
    secret: str
    alphabet: str
    length: int
    separator: str = ""

    @property
    def symbols(self) -> tuple[str, ...]:
        """The alphabet's symbols: its words when it holds spaces, else its characters."""
        return tuple(self.alphabet.split()) if " " in self.alphabet else tuple(self.alphabet)

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``canaries.jsonl``."""
        return {
            "canary_id": self.canary_id,
            "stay_ids": list(self.stay_ids),
            "patient_id": self.patient_id,
            "template": self.template,
            "secret": self.secret,
            "alphabet": self.alphabet,
            "length": self.length,
            "separator": self.separator,
        }


@dataclass(frozen=True)
class Corpus:
    """A generated or loaded corpus of one site."""

    site: str
    seed: int
    stays: tuple[Stay, ...]
    canaries: tuple[Canary, ...]
