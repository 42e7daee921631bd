"""A tiny vendor model registered through the real intake, for tests that need a version
of the registry but are about something else (bundles, kills).

:func:`registered_torch_onnx` registers tests/vendor_models.py's PyTorch-style ONNX
(int64 token ids, 4 classes) with a manifest, a 60-token vocabulary and the 4 commonest
codes of a small generated corpus: the model directory v2, its parity reference and its
ONNX are Passerelle's own, as for any vendor.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from passerelle import steps
from passerelle.corpus import label_table, read_corpus
from registry.store import ModelStore
from registry.vocabulary import VocabularyConfig, build_vocabulary, select_text
from tests import vendor_models as vm


def registered_torch_onnx(home: Path, root: Path, name: str = "pmsi-coder",
                          pad_mib: int = 0) -> str:
    """Register the model in ``home`` (which must have a site identity); ``pad_mib`` adds
    an unused float initializer of that many MiB (a longer export and encryption, for
    kill tests). Returns ``NAME/VERSION``."""
    vendor, data = torch_onnx_files(root, pad_mib)
    info = steps.register_model(ModelStore(home), vendor / "model.onnx", name,
                                "PMSI coding", "GDPR 6(1)(e)", data,
                                manifest=vendor / "manifest.json")
    return str(info.ref)


def torch_onnx_files(root: Path, pad_mib: int = 0) -> tuple[Path, Path]:
    """The vendor's files (``vendor/model.onnx``, ``manifest.json``, vocabulary, labels)
    and the training corpus under ``root``: ``(vendor folder, corpus folder)``, for
    ``model register VENDOR/model.onnx --manifest VENDOR/manifest.json --data CORPUS``."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "corpus"
    steps.generate_corpus("X", 200, 5, 0, data)
    stays = read_corpus(data).stays
    config = VocabularyConfig(min_patients=1, max_size=vm.VOCAB, max_len=vm.MAX_LEN)
    texts = [select_text(s.sections.as_dict(), config.sections) for s in stays]
    vocab = build_vocabulary(texts, [s.patient_id for s in stays], config)
    assert len(vocab) == vm.VOCAB, len(vocab)
    codes = sorted(c for c, _ in Counter(s.main_diagnosis for s in stays)
                   .most_common(vm.CLASSES))
    vendor = root / "vendor"
    vendor.mkdir()
    vocab.save(vendor / "vocabulary.json")
    table = label_table()
    (vendor / "labels.json").write_text(json.dumps(
        {"codes": codes, "labels": {c: table[c] for c in codes}}, ensure_ascii=False))
    (vendor / "manifest.json").write_text(json.dumps({
        "format": "passerelle-manifest", "format_version": 1, "architecture": "torch-conv",
        "input": {"kind": "token_ids", "vocabulary": "vocabulary.json", "dtype": "int64"},
        "output": {"labels": "labels.json", "multi_label": False, "scores": "logits"},
        "training": {"heldout": None, "steps": None, "recipe": None}}))
    proto = vm.torch_conv_classifier()
    if pad_mib:
        padding = np.random.default_rng(0).normal(size=pad_mib << 18).astype(np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(padding, "unused.padding"))
    onnx.save(proto, str(vendor / "model.onnx"))
    return vendor, data
