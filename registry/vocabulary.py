"""The tokenizer and vocabulary of the reference PMSI coder.

The vocabulary ships beside the weights, so it is part of what may leak. Its defaults
are privacy-conscious:

* a token enters only if it appears in the stays of at least ``min_patients`` distinct
  patients (a rare token is as good as a name);
* identifier-shaped tokens (long digit runs, years, e-mails, known first and last
  names: :func:`registry.identifiers.identifier_kind_of_token`) are dropped;
* the document header, which carries the patient's identifiers, is not read at all.

Each default can be turned off (``min_patients=1``, ``drop_identifiers=False``,
``sections`` including ``header``) to build the deliberately leaky model the
memorisation audit must catch. What was dropped is counted, never listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from passerelle.vocabulary import (  # re-exported: the source side's view
    ALL_SECTIONS,
    CLINICAL_SECTIONS,
    FORMAT,
    FORMAT_VERSION,
    OOV,
    PAD,
    RESERVED,
    Vocabulary,
    VocabularyConfig,
    VocabularyStats,
    normalise,
    select_text,
    tokenize,
)
from registry.identifiers import identifier_kind_of_token

__all__ = [
    "ALL_SECTIONS",
    "CLINICAL_SECTIONS",
    "FORMAT",
    "FORMAT_VERSION",
    "OOV",
    "PAD",
    "RESERVED",
    "Vocabulary",
    "VocabularyConfig",
    "VocabularyStats",
    "build_vocabulary",
    "count_tokens",
    "normalise",
    "select_text",
    "tokenize",
]


def count_tokens(
    texts: Sequence[str], patient_ids: Sequence[str]
) -> tuple[Counter[str], dict[str, int]]:
    """Occurrences of each token, and the number of distinct patients it appears for."""
    if len(texts) != len(patient_ids):
        raise ValueError("texts and patient_ids differ in length")
    patients_of: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for text, patient in zip(texts, patient_ids, strict=True):
        toks = tokenize(text)
        counts.update(toks)
        for tok in set(toks):
            patients_of.setdefault(tok, set()).add(patient)
    return counts, {tok: len(p) for tok, p in patients_of.items()}


def build_vocabulary(
    texts: Sequence[str], patient_ids: Sequence[str], config: VocabularyConfig
) -> Vocabulary:
    """Build the vocabulary from training texts, counting distinct patients per token."""
    counts, patients = count_tokens(texts, patient_ids)
    dropped_rare = dropped_ident = 0
    kept: list[str] = []
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if patients[tok] < config.min_patients:
            dropped_rare += 1
        elif config.drop_identifiers and identifier_kind_of_token(tok) is not None:
            dropped_ident += 1
        elif tok not in RESERVED:
            kept.append(tok)
    room = config.max_size - len(RESERVED)
    stats = VocabularyStats(
        candidate_tokens=len(counts),
        dropped_rare=dropped_rare,
        dropped_identifier=dropped_ident,
        dropped_over_size=max(0, len(kept) - room),
    )
    return Vocabulary(tokens=RESERVED + tuple(kept[:room]), config=config, stats=stats)
