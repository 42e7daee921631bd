"""Model source -> model directory v2: the only way a model enters the registry.

:func:`build_model_dir` writes a v2 directory (registry.model_dir) into an empty folder,
from either

* a ``model train`` folder (v1; its manifest is synthesised from its recipe), or
* a vendor's source model (Keras, scikit-learn via skops, ONNX; registry.sources) with
  its manifest (registry.manifest) and the training corpus ``--data``.

Steps, each a refusal point (bad input: BadInput, exit 2; parity: ParityError, exit 1):

1. read the manifest, the vocabulary and the label table it names;
2. fingerprint ``--data`` (passerelle.corpus.manifest_digest) and draw the parity stays
   from it: the declared held-out patients (registry.coder.split_by_patient with the
   manifest's fraction and seed) or, when the model was trained on all of it, a sample
   keyed by the stays' ids; encode them with the vocabulary, as the manifest says;
3. load the source model safely and run it on those inputs (registry.sources): its
   logits are the parity reference; their width must be the number of labels;
4. convert it to ONNX once (one output ``logits`` (n, C)), ``onnx.checker`` full check;
5. onnxruntime on the parity inputs must match the reference (max |diff| <= 1e-4,
   identical top-1);
6. write the directory: source model as given, ``model.onnx``, vocabulary, labels,
   manifest, parity inputs and reference, metadata listing every file's digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from passerelle.corpus import manifest_digest, read_corpus
from passerelle.digests import sha256_bytes, sha256_file
from passerelle.errors import BadInput, ModelDirError, ParityError
from registry.coder import N_PARITY_INPUTS, CoderConfig, Examples, split_by_patient
from registry.manifest import Heldout, Manifest, document, from_document, load_manifest
from registry.model_dir import (
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    ONNX_MODEL,
    PARITY_INPUTS,
    PARITY_REFERENCE,
    SAVEDMODEL,
    VOCABULARY,
    Framework,
    InputDtype,
    InputKind,
    ModelDir,
    ModelMetadata,
    default_dtype,
    file_digests,
    open_model_dir,
    tree_names,
    write_metadata,
)
from registry.sources import check_onnx, load_source, source_logits, to_onnx
from registry.vocabulary import Vocabulary, select_text


@dataclass(frozen=True)
class Source:
    """What is being registered: a local path, its framework, and where it came from."""

    path: Path
    framework: Framework | None  # None: a `model train` folder (v1)
    uri: str | None = None  # an MLflow URI as resolved (registry.mlflow_source)
    flavor: str | None = None
    digest: str | None = None  # the resolver's digest of what it downloaded


def is_model_train_folder(path: Path) -> bool:
    return path.is_dir() and (path / "passerelle-model.json").is_file()


def encode_stays(kind: InputKind, dtype: InputDtype, vocab: Vocabulary,
                 texts: Sequence[str]) -> npt.NDArray[Any]:
    """Texts as the manifest says the model reads them (the vocabulary's encoders)."""
    if kind is InputKind.BAG_OF_WORDS:
        if dtype is not InputDtype.FLOAT32:
            raise BadInput(f"input kind bag_of_words needs dtype float32, not {dtype.value}")
        return vocab.bag_of_words(texts)
    if dtype is InputDtype.FLOAT32:
        raise BadInput("input kind token_ids needs dtype int32 or int64, not float32")
    return vocab.encode(texts).astype(dtype.value)


def examples_of(data: Path) -> Examples:
    corpus = read_corpus(data)
    return Examples(sections=tuple(s.sections.as_dict() for s in corpus.stays),
                    codes=tuple(s.main_diagnosis for s in corpus.stays),
                    patient_ids=tuple(s.patient_id for s in corpus.stays), site=corpus.site)


def parity_stays(examples: Examples, heldout: Heldout | None,
                 stay_keys: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """Indices of the parity stays (at most N_PARITY_INPUTS) and the split's counts."""
    if heldout is not None:
        try:
            train, held = split_by_patient(examples, heldout.fraction, heldout.seed)
        except ValueError as e:
            raise BadInput(f"training.heldout: {e}") from e
        counts = {"train_stays": len(train),
                  "train_patients": len({examples.patient_ids[i] for i in train}),
                  "heldout_stays": len(held),
                  "heldout_patients": len({examples.patient_ids[i] for i in held})}
        return held[:N_PARITY_INPUTS], counts
    order = sorted(range(len(examples)),
                   key=lambda i: hashlib.sha256(stay_keys[i].encode()).hexdigest())
    counts = {"train_stays": len(examples),
              "train_patients": len(set(examples.patient_ids)),
              "heldout_stays": 0, "heldout_patients": 0}
    return order[:N_PARITY_INPUTS], counts


def build_model_dir(source: Source, out: Path, site: str | None,
                    manifest_path: Path | None = None, data: Path | None = None,
                    custom_objects: str | None = None) -> ModelDir:
    """Write the v2 model directory of ``source`` into the empty folder ``out``."""
    if source.framework is None:
        if manifest_path is not None or custom_objects:
            raise BadInput(f"{source.path} is a `model train` folder: its manifest is "
                           "synthesised from its recipe (no --manifest, no --custom-objects)")
        return _from_model_train(source.path, out, data)
    if manifest_path is None or data is None:
        raise BadInput("a model brought from outside needs --manifest FILE (its input "
                       "contract; `passerelle model init-manifest` writes a starting one) "
                       "and --data DIR (the corpus it was trained on)")
    if site is None:
        raise BadInput("registering a vendor's model needs this site's identity (the "
                       "training site): run `passerelle site init NAME` first")
    manifest = load_manifest(manifest_path)                                        # (1)
    vocab, labels = manifest.vocabulary(), manifest.labels()
    fingerprint = manifest_digest(data)                                            # (2)
    corpus = read_corpus(data)
    examples = examples_of(data)
    idx, counts = parity_stays(examples, manifest.heldout,
                               [s.stay_id for s in corpus.stays])
    model = load_source(source.path, source.framework.value, custom_objects)        # (3)
    derived = _text_pipeline_vocabulary(model, source.framework, vocab)
    vocab = derived or vocab
    texts = [select_text(examples.sections[i], vocab.config.sections) for i in idx]
    inputs = encode_stays(manifest.input_kind, manifest.input_dtype, vocab, texts)
    reference = _reference(model, source.framework, inputs, texts, manifest.scores)
    _check_width(reference, labels)
    proto = _convert(model, source.framework, inputs, manifest.scores)            # (4)
    parity = _parity(proto, inputs, reference)                                     # (5)
    truth = [examples.codes[i] for i in idx]
    metrics = {"accuracy": [_accuracy(reference, truth, list(labels), corpus.site,
                                      "held-out" if manifest.heldout else "training")],
               "parity": parity}
    _copy_source(source, out)                                                      # (6)
    if derived is not None:
        derived.save(out / VOCABULARY)
    else:
        shutil.copyfile(manifest.vocabulary_path, out / VOCABULARY)
    shutil.copyfile(manifest.labels_path, out / LABELS)
    doc = json.loads(json.dumps(manifest.document))
    doc["input"]["vocabulary"], doc["output"]["labels"] = VOCABULARY, LABELS
    training = {**manifest.training_block(), **counts, "dataset_fingerprint": fingerprint,
                "site": site, "corpus_site": corpus.site}
    return _finish(out, source, manifest, doc, proto, inputs, reference, tuple(labels),
                   training, metrics)


def _text_pipeline_vocabulary(model: Any, framework: Framework,
                              vocab: Vocabulary) -> Vocabulary | None:
    """For a scikit-learn Pipeline on raw text (TfidfVectorizer/CountVectorizer), the
    vocabulary is its vectorizer's features (adapters.sklearn_text), read with the
    manifest vocabulary's max_len and sections; None for any other model."""
    if framework is not Framework.SKLEARN:
        return None
    from adapters.sklearn_text import prepare_sklearn

    prepared = prepare_sklearn(model, max_len=vocab.config.max_len,
                               sections=vocab.config.sections)
    return prepared.vocabulary


def _from_model_train(path: Path, out: Path, data: Path | None) -> ModelDir:
    """A ``model train`` folder (v1) through the same steps, its manifest synthesised."""
    v1 = open_model_dir(path, version=1)
    meta = v1.metadata
    training = dict(meta.training)
    recorded = str(training.get("dataset_fingerprint", ""))
    if data is not None and manifest_digest(data) != recorded:
        raise BadInput(f"{path} was not trained on {data} (dataset fingerprints differ)")
    try:
        config = CoderConfig.from_json(training["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{path}: the training recipe cannot be read: {e}") from e
    heldout = Heldout(config.heldout_fraction, config.seed)
    steps = config.epochs * math.ceil(int(training.get("train_stays", 0)) / config.batch_size)
    doc = document(meta.architecture, meta.input_kind, default_dtype(meta.input_kind),
                   heldout=heldout, steps=steps or None)
    manifest = from_document(doc, path, str(path / MANIFEST))
    vocab = manifest.vocabulary()
    if data is not None:  # Passerelle encodes the declared held-out stays itself
        examples = examples_of(data)
        corpus = read_corpus(data)
        idx, _ = parity_stays(examples, heldout, [s.stay_id for s in corpus.stays])
        texts = [select_text(examples.sections[i], vocab.config.sections) for i in idx]
        inputs = encode_stays(manifest.input_kind, manifest.input_dtype, vocab, texts)
    else:  # the trainer's held-out token ids (the audit re-draws and re-checks them)
        ids = np.load(path / PARITY_INPUTS, allow_pickle=False)
        inputs = (_bag_of_words(ids, len(vocab)) if meta.input_kind is InputKind.BAG_OF_WORDS
                  else np.asarray(ids, np.int32))
    model = load_source(v1.model_file, meta.framework.value)
    reference = _reference(model, meta.framework, inputs, None, "logits")
    labels = manifest.labels()
    if tuple(labels) != meta.codes:
        raise ModelDirError(f"{path / LABELS}: codes differ from the metadata")
    _check_width(reference, labels)
    proto = _convert(model, meta.framework, inputs, "logits")
    _parity(proto, inputs, reference)
    source = Source(path=v1.model_file, framework=meta.framework)
    _copy_source(source, out)
    shutil.copyfile(path / VOCABULARY, out / VOCABULARY)
    shutil.copyfile(path / LABELS, out / LABELS)
    training |= {**manifest.training_block(), "dataset_fingerprint": recorded}
    return _finish(out, Source(path=path, framework=meta.framework), manifest, doc, proto,
                   inputs, reference, meta.codes, training, dict(meta.metrics),
                   kind="model-train", architecture=meta.architecture,
                   source_digest=v1.digest)


def _bag_of_words(ids: npt.NDArray[Any], size: int) -> npt.NDArray[np.float32]:
    from registry.coder import bag_of_words

    return bag_of_words(np.asarray(ids, np.int32), size)


def _reference(model: Any, framework: Framework, inputs: npt.NDArray[Any],
               texts: Sequence[str] | None, scores: str) -> npt.NDArray[np.float32]:
    try:
        return source_logits(model, framework.value, inputs, texts, scores)
    except BadInput:
        raise
    except Exception as e:  # the framework refusing the manifest's input shape or dtype
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"the model does not take the manifest's input {inputs.dtype} "
                       f"{tuple(inputs.shape)}: {first[:300]}") from e


def _check_width(reference: npt.NDArray[np.float32], labels: Mapping[str, str]) -> None:
    if reference.ndim != 2 or reference.shape[1] != len(labels):
        raise BadInput(f"the model's output has width {reference.shape[1:]} but the label "
                       f"table has {len(labels)} codes: the outputs do not match the labels")


def _convert(model: Any, framework: Framework, inputs: npt.NDArray[Any],
             scores: str) -> onnx.ModelProto:
    proto = to_onnx(model, framework.value, inputs, scores)
    check_onnx(proto, "the converted model")
    outputs = [o.name for o in proto.graph.output]
    if outputs != ["logits"]:
        raise BadInput(f"the converted model has outputs {outputs}; one, logits, expected")
    return proto


def _parity(proto: onnx.ModelProto, inputs: npt.NDArray[Any],
            reference: npt.NDArray[np.float32]) -> dict[str, Any]:
    from registry.export import check_parity, run_onnx

    try:
        got = run_onnx(proto.SerializeToString(), inputs)
    except Exception as e:  # onnxruntime: InvalidArgument, Fail, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"the ONNX model does not take the manifest's input {inputs.dtype} "
                       f"{tuple(inputs.shape)}: {first[:300]}") from e
    parity = check_parity(reference, got)
    if not parity.passed:
        raise ParityError(
            f"ONNX parity failed on {parity.inputs} inputs at registration: max |logit diff| "
            f"{parity.max_abs_diff:.3g} (limit {parity.tolerance:g}), top-1 agreement "
            f"{parity.top1_agreement:.2%} (must be 100%); nothing registered")
    return {"inputs": parity.inputs, "max_abs_diff": parity.max_abs_diff,
            "top1_agreement": parity.top1_agreement, "tolerance": parity.tolerance}


def _accuracy(logits: npt.NDArray[np.float32], truth: Sequence[str], codes: list[str],
              site: str, split: str) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(codes)}
    y = np.array([index.get(c, -1) for c in truth])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    n = max(1, len(truth))
    return {"site": site, "split": split, "stays": len(truth),
            "top1": float(np.sum(top5[:, 0] == y) / n),
            "top5": float(np.sum((top5 == y[:, None]).any(axis=1)) / n),
            "label_coverage": float(np.sum(y >= 0) / n)}


def _copy_source(source: Source, out: Path) -> None:
    assert source.framework is not None  # noqa: S101 - checked by the callers
    if source.path.is_dir():
        if (source.path / "saved_model.pb").is_file():
            shutil.copytree(source.path, out / SAVEDMODEL, symlinks=False)
            return
        raise BadInput(f"{source.path}: not a SavedModel folder")
    if source.path.is_symlink() or not source.path.is_file():
        raise BadInput(f"{source.path}: not a regular file")
    shutil.copyfile(source.path, out / source.framework.model_file)


def _source_names(out: Path, framework: Framework) -> list[str]:
    if (out / SAVEDMODEL).is_dir():
        return [f"{SAVEDMODEL}/{n}" for n in tree_names(out / SAVEDMODEL)]
    return [framework.model_file]


def _finish(out: Path, source: Source, manifest: Manifest, doc: Mapping[str, Any],
            proto: onnx.ModelProto, inputs: npt.NDArray[Any],
            reference: npt.NDArray[np.float32], codes: tuple[str, ...],
            training: Mapping[str, Any], metrics: Mapping[str, Any], *,
            kind: str | None = None, architecture: str | None = None,
            source_digest: str | None = None) -> ModelDir:
    assert source.framework is not None  # noqa: S101 - checked by the callers
    (out / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    (out / ONNX_MODEL).write_bytes(proto.SerializeToString())
    np.save(out / PARITY_INPUTS, inputs, allow_pickle=False)
    np.save(out / PARITY_REFERENCE, reference.astype(np.float32), allow_pickle=False)
    names = [*_source_names(out, source.framework), MANIFEST, ONNX_MODEL, VOCABULARY,
             LABELS, PARITY_INPUTS, PARITY_REFERENCE]
    files = file_digests(out, names)
    if source.uri is not None:
        origin: dict[str, Any] = {"kind": "mlflow", "uri": source.uri, "flavor": source.flavor,
                                  "digest": source.digest}
    else:
        own = [n for n in names if n.startswith(SAVEDMODEL + "/")] or \
            [source.framework.model_file]
        digest = source_digest or (files[own[0]] if len(own) == 1 else
                                   sha256_bytes(json.dumps({n: files[n] for n in own},
                                                           sort_keys=True).encode()))
        origin = {"kind": kind or "file", "path": source.path.name, "digest": digest}
    metadata = ModelMetadata(
        framework=source.framework,
        architecture=architecture or manifest.architecture,
        input_kind=manifest.input_kind,
        input_dtype=manifest.input_dtype,
        codes=codes,
        training=dict(training),
        metrics=dict(metrics),
        files=files,
        source=origin,
        onnx_digest=sha256_file(out / ONNX_MODEL),
        format_version=FORMAT_VERSION,
    )
    write_metadata(out, metadata)
    return open_model_dir(out, version=FORMAT_VERSION)
