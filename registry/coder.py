"""The reference PMSI coder: from a stay's text to its main diagnosis (CIM-10).

Two architectures, both trained on the same vocabulary:

* ``embedding-mean`` (default, Keras on TensorFlow 2.15): token ids -> Embedding
  (masked) -> mean -> Dense(relu) -> Dense logits.
* ``logreg`` (scikit-learn): multinomial logistic regression on token frequencies,
  the kind of model vendors also bring.

Held-out stays are chosen by patient (all stays of a patient on one side), so the
held-out accuracy is the accuracy on patients the model never saw.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from registry.model_dir import (
    LABELS,
    PARITY_INPUTS,
    VOCABULARY,
    Framework,
    InputKind,
    ModelMetadata,
    file_digests,
    write_metadata,
)
from registry.vocabulary import Vocabulary, VocabularyConfig, build_vocabulary, select_text

N_PARITY_INPUTS = 256
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class Architecture(StrEnum):
    EMBEDDING_MEAN = "embedding-mean"
    LOGREG = "logreg"

    @property
    def framework(self) -> Framework:
        return Framework.SKLEARN if self is Architecture.LOGREG else Framework.KERAS

    @property
    def input_kind(self) -> InputKind:
        return InputKind.BAG_OF_WORDS if self is Architecture.LOGREG else InputKind.TOKEN_IDS


@dataclass(frozen=True)
class Examples:
    """Stays as the trainer sees them: sections, coded main diagnosis, patient key."""

    sections: tuple[Mapping[str, str], ...]
    codes: tuple[str, ...]
    patient_ids: tuple[str, ...]
    site: str

    def __post_init__(self) -> None:
        if not (len(self.sections) == len(self.codes) == len(self.patient_ids)):
            raise ValueError("sections, codes and patient_ids differ in length")

    def __len__(self) -> int:
        return len(self.codes)

    def subset(self, idx: Sequence[int]) -> Examples:
        return Examples(
            sections=tuple(self.sections[i] for i in idx),
            codes=tuple(self.codes[i] for i in idx),
            patient_ids=tuple(self.patient_ids[i] for i in idx),
            site=self.site,
        )

    def texts(self, vocab_config: VocabularyConfig) -> list[str]:
        return [select_text(s, vocab_config.sections) for s in self.sections]


@dataclass(frozen=True)
class CoderConfig:
    architecture: Architecture = Architecture.EMBEDDING_MEAN
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    embedding_dim: int = 64
    hidden_units: int = 128
    # 4, not more: at the demo's size 10 epochs reached the same held-out accuracy but the
    # audit's LiRA (online, per patient) showed an epsilon lower bound of 1.97 (FAIL).
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 5e-3
    heldout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be positive")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError("heldout fraction must be in (0, 1)")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["architecture"] = self.architecture.value
        doc["vocabulary"]["sections"] = list(self.vocabulary.sections)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CoderConfig:
        """The inverse of :meth:`to_json` (ValueError/KeyError/TypeError if malformed)."""
        fields = dict(doc)
        vocab = dict(fields.pop("vocabulary"))
        vocab["sections"] = tuple(vocab["sections"])
        return cls(architecture=Architecture(fields.pop("architecture")),
                   vocabulary=VocabularyConfig(**vocab), **fields)


@dataclass(frozen=True)
class Accuracy:
    site: str
    split: str
    stays: int
    top1: float
    top5: float
    label_coverage: float  # share of stays whose code is in the model's label set


@dataclass
class TrainedCoder:
    config: CoderConfig
    vocabulary: Vocabulary
    codes: tuple[str, ...]
    model: Any  # tf.keras.Model or sklearn LogisticRegression
    heldout: Examples
    train_size: int
    train_patients: int

    def logits(self, token_ids: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        return source_logits(self.model, self.config.architecture, self.vocabulary, token_ids)


def split_by_patient(
    examples: Examples, heldout_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of (train, held-out) stays; every patient's stays fall on one side."""
    patients = sorted(set(examples.patient_ids))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    n_held = max(1, round(len(patients) * heldout_fraction))
    held = {patients[i] for i in order[:n_held]}
    train = [i for i, p in enumerate(examples.patient_ids) if p not in held]
    heldout = [i for i, p in enumerate(examples.patient_ids) if p in held]
    if not train or not heldout:
        raise ValueError("too few patients to hold some out")
    return train, heldout


def train_coder(
    examples: Examples, config: CoderConfig, progress: Progress | None = None
) -> TrainedCoder:
    """Build the vocabulary on training patients only, then train the chosen model."""
    train_idx, held_idx = split_by_patient(examples, config.heldout_fraction, config.seed)
    return fit_coder(examples.subset(train_idx), config, progress,
                     heldout=examples.subset(held_idx))


def fit_coder(
    train: Examples, config: CoderConfig, progress: Progress | None = None,
    heldout: Examples | None = None,
) -> TrainedCoder:
    """Build the vocabulary on ``train`` and fit the chosen model on all of it."""
    vocab = build_vocabulary(train.texts(config.vocabulary), train.patient_ids, config.vocabulary)
    codes = tuple(sorted(set(train.codes)))
    index = {c: i for i, c in enumerate(codes)}
    x = vocab.encode(train.texts(config.vocabulary))
    y = np.array([index[c] for c in train.codes], dtype=np.int32)
    if config.architecture is Architecture.LOGREG:
        model = _fit_logreg(vocab, x, y, config)
    else:
        model = _fit_keras(vocab, x, y, len(codes), config, progress)
    return TrainedCoder(
        config=config,
        vocabulary=vocab,
        codes=codes,
        model=model,
        heldout=heldout if heldout is not None else train.subset([]),
        train_size=len(train),
        train_patients=len(set(train.patient_ids)),
    )


def build_keras_model(vocab_size: int, n_classes: int, config: CoderConfig) -> Any:
    import tensorflow as tf

    max_len = config.vocabulary.max_len
    inp = tf.keras.Input(shape=(max_len,), dtype="int32", name="token_ids")
    x = tf.keras.layers.Embedding(vocab_size, config.embedding_dim, mask_zero=True,
                                  name="embedding")(inp)
    x = tf.keras.layers.GlobalAveragePooling1D(name="mean")(x)
    x = tf.keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(x)
    out = tf.keras.layers.Dense(n_classes, name="logits")(x)
    return tf.keras.Model(inp, out, name="pmsi_coder")


def _fit_keras(
    vocab: Vocabulary,
    x: npt.NDArray[np.int32],
    y: npt.NDArray[np.int32],
    n_classes: int,
    config: CoderConfig,
    progress: Progress | None,
) -> Any:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(config.seed)
    model = build_keras_model(len(vocab), n_classes, config)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(config.learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = [_ProgressCallback(progress, config.epochs)] if progress else []
    model.fit(x, y, epochs=config.epochs, batch_size=config.batch_size, shuffle=True,
              verbose=0, callbacks=callbacks)
    return model


def _ProgressCallback(progress: Progress, epochs: int) -> Any:
    import tensorflow as tf

    class _Callback(tf.keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            progress("train", epoch + 1, epochs)

    return _Callback()


def _fit_logreg(
    vocab: Vocabulary, x: npt.NDArray[np.int32], y: npt.NDArray[np.int32], config: CoderConfig
) -> Any:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=20.0, max_iter=300, random_state=config.seed)
    model.fit(_sparse_bag_of_words(x, len(vocab)), y)
    return model


def _sparse_bag_of_words(token_ids: npt.NDArray[np.int32], vocab_size: int) -> Any:
    from scipy.sparse import csr_matrix

    rows, cols = np.nonzero(token_ids > 1)
    ids = token_ids[rows, cols]
    per_row = np.bincount(rows, minlength=token_ids.shape[0]).astype(np.float32)
    vals = 1.0 / per_row[rows]
    return csr_matrix((vals, (rows, ids)), shape=(token_ids.shape[0], vocab_size),
                      dtype=np.float32)


def bag_of_words(token_ids: npt.NDArray[np.int32], vocab_size: int) -> npt.NDArray[np.float32]:
    """Dense token frequencies (known tokens only), the logreg model's input."""
    return np.asarray(_sparse_bag_of_words(token_ids, vocab_size).toarray(), dtype=np.float32)


def source_logits(
    model: Any, architecture: Architecture, vocab: Vocabulary, token_ids: npt.NDArray[np.int32]
) -> npt.NDArray[np.float32]:
    """Logits of the source-framework model (decision function for logreg)."""
    if architecture is Architecture.LOGREG:
        scores = model.decision_function(_sparse_bag_of_words(token_ids, len(vocab)))
        return np.asarray(scores, dtype=np.float32)
    return np.asarray(model(token_ids, training=False), dtype=np.float32)


def evaluate(
    coder: TrainedCoder, examples: Examples, split: str
) -> Accuracy:
    """Top-1 and top-5 accuracy; a code outside the label set counts as a miss."""
    index = {c: i for i, c in enumerate(coder.codes)}
    logits = coder.logits(coder.vocabulary.encode(examples.texts(coder.config.vocabulary)))
    truth = np.array([index.get(c, -1) for c in examples.codes])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return Accuracy(
        site=examples.site,
        split=split,
        stays=len(examples),
        top1=float(np.mean(top5[:, 0] == truth)),
        top5=float(np.mean((top5 == truth[:, None]).any(axis=1))),
        label_coverage=float(np.mean(truth >= 0)),
    )


def save_coder(
    coder: TrainedCoder,
    out_dir: Path,
    labels: Mapping[str, str],
    training: Mapping[str, Any],
    metrics: Sequence[Accuracy],
) -> None:
    """Write the model directory (registry.model_dir) into an existing empty ``out_dir``."""
    framework = coder.config.architecture.framework
    if framework is Framework.KERAS:
        coder.model.save(out_dir / framework.model_file)
    else:
        import skops.io

        skops.io.dump(coder.model, out_dir / framework.model_file)
    coder.vocabulary.save(out_dir / VOCABULARY)
    missing = [c for c in coder.codes if c not in labels]
    if missing:
        raise ValueError(f"no label for codes {missing}")
    (out_dir / LABELS).write_text(json.dumps(
        {"codes": list(coder.codes), "labels": {c: labels[c] for c in coder.codes}},
        ensure_ascii=False, indent=1) + "\n")
    held = coder.vocabulary.encode(coder.heldout.texts(coder.config.vocabulary))
    np.save(out_dir / PARITY_INPUTS, held[:N_PARITY_INPUTS], allow_pickle=False)
    names = [framework.model_file, VOCABULARY, LABELS, PARITY_INPUTS]
    metadata = ModelMetadata(
        framework=framework,
        architecture=coder.config.architecture.value,
        input_kind=coder.config.architecture.input_kind,
        codes=coder.codes,
        training={**training, "config": coder.config.to_json(),
                  "train_stays": coder.train_size, "train_patients": coder.train_patients,
                  "heldout_stays": len(coder.heldout),
                  "heldout_patients": len(set(coder.heldout.patient_ids))},
        metrics={"accuracy": [asdict(m) for m in metrics]},
        files=file_digests(out_dir, names),
    )
    write_metadata(out_dir, metadata)


def load_source_model(model_file: Path, framework: Framework) -> Any:
    """Load a source-framework model from a verified model directory."""
    if framework is Framework.KERAS:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        return tf.keras.models.load_model(model_file, compile=False, safe_mode=True)
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=model_file)
    if untrusted:
        raise ValueError(f"model file holds types that are not trusted: {untrusted}")
    return skops.io.load(model_file)
