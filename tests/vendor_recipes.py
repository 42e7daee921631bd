"""Vendors' recipes for the audit's tests (passerelle.recipes: ``TrainingSet -> model``).

- :func:`keras_conv1d`: a Keras Conv1D text classifier, trained with Adam for the target's
  steps (mini-batches of 32), the kind of recipe a vendor brings;
- :func:`keras_transformer`, :func:`keras_bigru`: the encoder block and the unmasked
  BiGRU of tests/vendor_models.py, re-drawn from the seed and trained the same way;
- :func:`text_pipeline`: TF-IDF (a token pattern Passerelle's tokenizer reproduces) +
  LinearSVC fitted on the stays' texts; :func:`random_forest` on the bag of words;
- the bad ones, each failing one way: :data:`not_callable`, :func:`raises`,
  :func:`returns_a_string`, :func:`returns_too_few_scores`.
"""

from __future__ import annotations

import math
from typing import Any

from passerelle.recipes import TrainingSet

BATCH = 32
CALLS: list[tuple[int, int, int | None]] = []  # (seed, stays, steps) of every call


def keras_conv1d(training: TrainingSet) -> Any:
    """Embedding(16) -> Conv1D(16, 3) -> global max -> Dense; 4 epochs by default."""
    CALLS.append((training.seed, len(training.labels), training.steps))
    return _conv1d(training, embedding=16, filters=16, kernel=3, epochs=4)


def keras_conv1d_wide(training: TrainingSet) -> Any:
    """Embedding(64) -> Conv1D(128, 5) -> global max -> Dense; 8 epochs by default (the
    size of the issue's vendor Conv1D, for scripts/audit_vendor.py)."""
    return _conv1d(training, embedding=64, filters=128, kernel=5, epochs=8)


def _conv1d(training: TrainingSet, embedding: int, filters: int, kernel: int,
            epochs: int) -> Any:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(training.seed)
    layers = tf.keras.layers
    ids = tf.keras.Input((training.inputs.shape[1],), dtype="int32", name="token_ids")
    h = layers.Embedding(training.vocabulary_size, embedding, name="embedding")(ids)
    h = layers.Conv1D(filters, kernel, padding="same", activation="relu", name="conv")(h)
    h = layers.GlobalMaxPooling1D(name="pool")(h)
    model = tf.keras.Model(ids, layers.Dense(len(training.codes), name="logits")(h))
    model.compile(optimizer=tf.keras.optimizers.Adam(5e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    per_epoch = max(1, math.ceil(len(training.labels) / BATCH))
    epochs = max(1, round((training.steps or epochs * per_epoch) / per_epoch))
    model.fit(training.inputs, training.labels, batch_size=BATCH, epochs=epochs, verbose=0,
              shuffle=True)
    return model


def keras_transformer(training: TrainingSet) -> Any:
    """tests/vendor_models.keras_transformer, weights re-drawn from the seed, trained."""
    from tests import vendor_models

    return _fit_keras(vendor_models.keras_transformer(), training, epochs=6)


def keras_bigru(training: TrainingSet) -> Any:
    """tests/vendor_models.keras_bigru (no mask: no Loop), re-drawn from the seed, trained."""
    from tests import vendor_models

    return _fit_keras(vendor_models.keras_bigru(), training, epochs=6)


def _fit_keras(model: Any, training: TrainingSet, epochs: int) -> Any:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(training.seed)
    model.set_weights([(rng.normal(size=w.shape) * 0.3).astype(np.float32)
                       for w in model.get_weights()])
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    per_epoch = max(1, math.ceil(len(training.labels) / BATCH))
    epochs = max(1, round((training.steps or epochs * per_epoch) / per_epoch))
    tf.keras.utils.set_random_seed(training.seed)
    model.fit(training.inputs, training.labels, batch_size=BATCH, epochs=epochs, verbose=0,
              shuffle=True)
    return model


TOKEN_PATTERN = r"(?u)[^\W_][^\W_]+"  # noqa: S105 - words of 2+ letters or digits, split on "_"


def text_pipeline(training: TrainingSet) -> Any:
    """TfidfVectorizer + LinearSVC on the stays' texts (the vendor's own pipeline)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    return make_pipeline(TfidfVectorizer(token_pattern=TOKEN_PATTERN, min_df=2),
                         LinearSVC(C=1.0, random_state=training.seed)).fit(
        list(training.texts), training.labels)


def random_forest(training: TrainingSet) -> Any:
    """A small RandomForest on Passerelle's bag of words."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=10, max_depth=6,
                                  random_state=training.seed).fit(training.inputs,
                                                                  training.labels)


not_callable = 42


def raises(training: TrainingSet) -> Any:
    raise RuntimeError("the vendor's GPU is not here")


def returns_a_string(training: TrainingSet) -> Any:
    return "a model"


def returns_too_few_scores(training: TrainingSet) -> Any:
    from sklearn.linear_model import LogisticRegression

    # three classes only: three scores per stay, not one per code of the table
    return LogisticRegression(max_iter=50).fit(training.inputs, training.labels % 3)
