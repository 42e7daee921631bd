"""Synthetic PMSI corpus: French discharge letters coded in CIM-10 and CCAM.

No real patient data exists in this project. This package generates, for a site
``X`` (university hospital) or ``Y`` (general hospital), stays whose letters carry
identifiers as real ones do, with realistic noise, optional canary secrets, fully
determined by ``(site, n_stays, seed, canaries, canary_repetitions)``. The on-disk
format is documented in docs/data-dictionary.md.

Public API::

    corpus = generate("X", n_stays=5000, seed=1, canaries=10)
    manifest = write_corpus(corpus, Path("data/x"))
    same = read_corpus(Path("data/x"))
    fingerprint = manifest_digest(Path("data/x"))   # "sha256:..."
"""

from __future__ import annotations

from passerelle.corpus.generator import (
    CANARY_ALPHABET,
    CANARY_LENGTH,
    CANARY_TEMPLATE,
    GENERATOR_VERSION,
    generate,
    label_table,
)
from passerelle.corpus.model import Canary, Corpus, Identifiers, Sections, Stay
from passerelle.corpus.storage import manifest_digest, read_corpus, write_corpus

SITES: tuple[str, ...] = ("X", "Y")

__all__ = [
    "CANARY_ALPHABET",
    "CANARY_LENGTH",
    "CANARY_TEMPLATE",
    "GENERATOR_VERSION",
    "SITES",
    "Canary",
    "Corpus",
    "Identifiers",
    "Sections",
    "Stay",
    "generate",
    "label_table",
    "manifest_digest",
    "read_corpus",
    "write_corpus",
]
