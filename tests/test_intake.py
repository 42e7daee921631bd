"""Bring your own model: vendors' models registered as they have them, then exported.

The vendor's models are trained here on stays of a tiny generated corpus encoded by a
Passerelle vocabulary (60 tokens, 8 per stay: the sizes of tests/vendor_models.py), on
the patients its manifest declares as training patients, for the 4 commonest codes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.corpus import label_table, manifest_digest, read_corpus
from registry.coder import Examples, split_by_patient
from registry.export import PARITY_TOLERANCE, run_onnx
from registry.model_dir import (
    FORMAT_VERSION,
    METADATA,
    PARITY_INPUTS,
    PARITY_REFERENCE,
    open_model_dir,
)
from registry.store import TAG, ModelStore, VersionRef
from registry.vocabulary import VocabularyConfig, build_vocabulary, select_text
from tests import vendor_models as vm
from tests.cli_contract_support import ledger_rows, snapshot
from tests.conftest import OVERRIDE_ARGS
from transfer.identity import init_site

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("intake")]

HELDOUT: dict[str, Any] = {"fraction": 0.25, "seed": 0}


@dataclass(frozen=True)
class Vendor:
    """A vendor's folder: corpus, vocabulary and labels; training data it encoded."""

    data: Path
    folder: Path
    x: Any  # token ids (n, 8) int32 of the training patients' stays of the 4 codes
    y: Any
    bow: Any  # the same stays as bag of words (n, 60)
    codes: tuple[str, ...]
    texts: tuple[str, ...]  # the same stays' text (the sections the vocabulary reads)


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    root = tmp_path_factory.mktemp("vendor")
    data = root / "corpus"
    steps.generate_corpus("X", 300, 5, 0, data)
    corpus = read_corpus(data)
    examples = Examples(sections=tuple(s.sections.as_dict() for s in corpus.stays),
                        codes=tuple(s.main_diagnosis for s in corpus.stays),
                        patient_ids=tuple(s.patient_id for s in corpus.stays), site="X")
    train, _ = split_by_patient(examples, HELDOUT["fraction"], HELDOUT["seed"])
    config = VocabularyConfig(min_patients=2, max_size=vm.VOCAB, max_len=vm.MAX_LEN)
    texts = [select_text(examples.sections[i], config.sections) for i in train]
    vocab = build_vocabulary(texts, [examples.patient_ids[i] for i in train], config)
    assert len(vocab) == vm.VOCAB
    codes = tuple(sorted(c for c, _ in Counter(examples.codes[i] for i in train)
                         .most_common(vm.CLASSES)))
    folder = root / "vendor"
    folder.mkdir()
    vocab.save(folder / "vocabulary.json")
    table = label_table()
    (folder / "labels.json").write_text(json.dumps(
        {"codes": list(codes), "labels": {c: table[c] for c in codes}}, ensure_ascii=False))
    keep = [i for i in train if examples.codes[i] in codes]
    kept = [select_text(examples.sections[i], config.sections) for i in keep]
    y = np.array([codes.index(examples.codes[i]) for i in keep], np.int64)
    return Vendor(data, folder, vocab.encode(kept), y, vocab.bag_of_words(kept), codes,
                  tuple(kept))


def manifest(vendor: Vendor, name: str, kind: str = "token_ids", dtype: str = "int32",
             **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "format": "passerelle-manifest", "format_version": 1, "architecture": name,
        "input": {"kind": kind, "vocabulary": "vocabulary.json", "dtype": dtype},
        "output": {"labels": "labels.json", "multi_label": False, "scores": "logits"},
        "training": {"heldout": HELDOUT, "steps": 30, "recipe": None}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[section] = value
    path = vendor.folder / f"{name}.manifest.json"
    path.write_text(json.dumps(doc))
    return path


def keras_trained(builder: Any, vendor: Vendor, epochs: int = 3) -> Any:
    import tensorflow as tf

    model = builder()
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(vendor.x, vendor.y, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def conv1d_file(vendor: Vendor) -> Path:
    path = vendor.folder / "conv1d.keras"
    keras_trained(vm.keras_conv1d, vendor).save(path)
    return path


@pytest.fixture(scope="module")
def transformer_file(vendor: Vendor) -> Path:
    path = vendor.folder / "transformer.keras"
    keras_trained(vm.keras_transformer, vendor).save(path)
    return path


@pytest.fixture(scope="module")
def bigru_file(vendor: Vendor) -> Path:
    path = vendor.folder / "bigru.keras"
    keras_trained(vm.keras_bigru, vendor).save(path)
    return path


@pytest.fixture(scope="module")
def savedmodel_dir(vendor: Vendor) -> Path:
    path = vendor.folder / "conv1d-savedmodel"
    keras_trained(vm.keras_conv1d, vendor, epochs=1).save(path, save_format="tf")
    return path


def keras_custom() -> Any:
    """Embedding -> mean -> a custom Scale layer -> Dense logits."""
    import tensorflow as tf

    from tests.custom_layers import Scale

    tf.keras.utils.set_random_seed(0)
    ids = tf.keras.Input((vm.MAX_LEN,), dtype="int32", name="token_ids")
    h = tf.keras.layers.Embedding(vm.VOCAB, vm.EMBED, name="embedding")(ids)
    h = tf.keras.layers.GlobalAveragePooling1D(name="mean")(h)
    h = Scale(3.0, name="scale")(h)
    return tf.keras.Model(ids, tf.keras.layers.Dense(vm.CLASSES, name="logits")(h))


@pytest.fixture(scope="module")
def custom_file(vendor: Vendor) -> Path:
    path = vendor.folder / "custom.keras"
    keras_trained(keras_custom, vendor, epochs=2).save(path)
    return path


@pytest.fixture(scope="module")
def torch_file(vendor: Vendor) -> Path:
    path = vendor.folder / "torch_conv.onnx"
    onnx.save(vm.torch_conv_classifier(), str(path))
    return path


@pytest.fixture(scope="module")
def skops_file(vendor: Vendor) -> Path:
    import skops.io
    from sklearn.linear_model import LogisticRegression

    path = vendor.folder / "logreg.skops"
    skops.io.dump(LogisticRegression(C=10.0, max_iter=200).fit(vendor.bow, vendor.y), path)
    return path


@pytest.fixture(scope="module")
def tfidf_svc_file(vendor: Vendor) -> Path:
    """A TF-IDF + LinearSVC pipeline on raw text, with a token pattern Passerelle
    reproduces; its manifest's vocabulary file gives max_len (512) and the sections."""
    import skops.io
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    from adapters.sklearn_text import COMPATIBLE_PATTERN
    from passerelle.vocabulary import Vocabulary

    pipeline = make_pipeline(TfidfVectorizer(token_pattern=COMPATIBLE_PATTERN),
                             LinearSVC(C=1.0)).fit(list(vendor.texts), vendor.y)
    path = vendor.folder / "tfidf_svc.skops"
    skops.io.dump(pipeline, path)
    base = Vocabulary.load(vendor.folder / "vocabulary.json")
    Vocabulary(tokens=base.tokens, config=VocabularyConfig(max_len=512),
               stats=base.stats).save(vendor.folder / "vocabulary-512.json")
    return path


@pytest.fixture
def site_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    init_site(home, "CHU-X")
    yield home


def register(home: Path, source: Path | str, man: Path | None, data: Path | None,
             *extra: str, name: str = "vendor") -> tuple[int, str, str]:
    argv = ["model", "register", str(source), "--name", name, "--purpose", "PMSI coding",
            "--legal-basis", "GDPR 6(1)(e)", "--home", str(home), "--json", *extra]
    if man is not None:
        argv += ["--manifest", str(man)]
    if data is not None:
        argv += ["--data", str(data)]
    code = main(argv)
    return code, "", ""


def _register_ok(home: Path, source: Path | str, man: Path, vendor: Vendor,
                 capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    code = register(home, source, man, vendor.data, *extra)[0]
    out = capsys.readouterr()
    assert code == 0, out.err
    doc: dict[str, Any] = json.loads(out.out)
    return doc


def _v2_dir(home: Path, tmp_path: Path, ref: VersionRef) -> Any:
    store = ModelStore(home)
    info = store.get(ref)
    path = store.download(info, "model", tmp_path / "dl")
    model_dir = open_model_dir(path, version=FORMAT_VERSION)
    assert info.tags[TAG + "model_dir_digest"] == model_dir.digest
    return model_dir


@pytest.mark.parametrize(("source", "kind", "dtype", "framework", "model_file"), [
    ("conv1d_file", "token_ids", "int32", "keras", "model.keras"),
    ("transformer_file", "token_ids", "int32", "keras", "model.keras"),
    ("bigru_file", "token_ids", "int32", "keras", "model.keras"),
    ("savedmodel_dir", "token_ids", "int32", "keras", "savedmodel/saved_model.pb"),
    ("torch_file", "token_ids", "int64", "onnx", "source.onnx"),
    ("skops_file", "bag_of_words", "float32", "sklearn", "model.skops"),
])
def test_a_vendors_model_registers_with_its_parity_reference_and_exports(
        source: str, kind: str, dtype: str, framework: str, model_file: str,
        request: pytest.FixtureRequest, vendor: Vendor, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path: Path = request.getfixturevalue(source)
    man = manifest(vendor, source, kind, dtype)
    doc = _register_ok(site_home, path, man, vendor, capsys)
    ref = VersionRef("vendor", doc["version"])
    tags = doc["tags"]
    assert tags[TAG + "framework"] == framework
    assert tags[TAG + "dataset_fingerprint"] == manifest_digest(vendor.data)
    assert tags[TAG + "training_site"] == "CHU-X"  # the home's identity, not a declaration
    assert tags[TAG + "input_dtype"] == dtype
    assert not (site_home / ".intake").exists()  # the staging folder is gone

    model_dir = _v2_dir(site_home, tmp_path, ref)
    meta = model_dir.metadata
    assert (meta.framework.value, meta.input_kind.value, meta.dtype.value) == \
        (framework, kind, dtype)
    assert meta.codes == vendor.codes
    assert meta.source["kind"] == "file" and meta.source["path"] == path.name
    assert meta.source["digest"].startswith("sha256:")
    assert meta.training["heldout"] == HELDOUT and meta.training["steps"] == 30
    assert meta.training["site"] == "CHU-X"
    assert model_file in meta.files
    # the parity inputs are Passerelle's encoding of the declared held-out stays ...
    inputs = np.load(model_dir.path / PARITY_INPUTS)
    reference = np.load(model_dir.path / PARITY_REFERENCE)
    assert inputs.dtype == np.dtype(dtype) and len(inputs) == meta.training["heldout_stays"]
    assert reference.shape == (len(inputs), vm.CLASSES)
    # ... and the registered ONNX reproduces the source model's logits on them
    proto = onnx.load(str(model_dir.path / "model.onnx"))
    assert [o.name for o in proto.graph.output] == ["logits"]
    got = run_onnx(proto.SerializeToString(), inputs)
    assert np.abs(got - reference).max() <= PARITY_TOLERANCE

    out = tmp_path / "export"
    assert main(["model", "export", str(ref), "--out", str(out), "--home", str(site_home),
                 *OVERRIDE_ARGS]) == 0, capsys.readouterr().err
    card = json.loads((out / "model_card.json").read_text())
    assert card["preprocessing"]["input_kind"] == kind
    assert card["preprocessing"]["input_dtype"] == dtype
    assert card["model"]["architecture"] == source
    assert (out / "model.onnx").read_bytes() == (model_dir.path / "model.onnx").read_bytes()
    assert not (out / PARITY_INPUTS).exists() and not (out / METADATA).exists()


def test_an_onnx_artifact_written_by_hand_into_the_registry_is_refused(
        vendor: Vendor, torch_file: Path, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    doc = _register_ok(site_home, torch_file, manifest(vendor, "torch", dtype="int64"),
                       vendor, capsys)
    ref = f"vendor/{doc['version']}"
    assert main(["model", "export", ref, "--out", str(tmp_path / "e1"), "--home",
                 str(site_home), *OVERRIDE_ARGS]) == 0
    capsys.readouterr()
    logged = next((site_home / "mlartifacts").rglob("onnx/model.onnx"))
    other = vm.torch_conv_classifier()
    raw = onnx.numpy_helper.to_array(other.graph.initializer[-1]) + 9.0  # another fc.bias
    other.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(
        raw.astype(np.float32), "fc.bias"))
    logged.write_bytes(other.SerializeToString())

    code = main(["model", "export", ref, "--out", str(tmp_path / "e2"), "--home",
                 str(site_home), *OVERRIDE_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1, err
    assert err[0].startswith("error:") and "written into the registry by hand" in err[0]
    assert not (tmp_path / "e2").exists()

    peer = tmp_path / "peer"
    init_site(peer, "CHU-Y")
    assert main(["site", "show", "--home", str(peer), "--out", str(tmp_path / "y.id")]) == 0
    assert main(["trust", "add", str(tmp_path / "y.id"), "--home", str(site_home)]) == 0
    capsys.readouterr()
    code = main(["bundle", "create", ref, "--to", "CHU-Y", "--out",
                 str(tmp_path / "b.bundle"), "--home", str(site_home)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1, err
    assert "written into the registry by hand" in err[0]
    assert not (tmp_path / "b.bundle").exists()


def test_bad_vendor_input_is_one_error_line_and_logs_registers_records_nothing(
        vendor: Vendor, conv1d_file: Path, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    good = manifest(vendor, "conv1d")
    pickle = vendor.folder / "model.pkl"
    pickle.write_bytes(b"\x80\x04N.")
    unknown = vendor.folder / "model.h5x"
    unknown.write_bytes(b"x")
    five = vendor.folder / "five.json"
    table = label_table()
    codes = [*vendor.codes, next(c for c in sorted(table) if c not in vendor.codes)]
    five.write_text(json.dumps({"codes": codes, "labels": {c: table[c] for c in codes}}))
    cases = {
        "unknown framework": (unknown, good, vendor.data, ()),
        "pickle": (pickle, good, vendor.data, ()),
        "manifest does not validate": (conv1d_file, manifest(
            vendor, "bad", extra_key=1), vendor.data, ()),
        "unknown dtype": (conv1d_file, manifest(vendor, "bad2", dtype="int8"), vendor.data,
                          ()),
        "multi-label": (conv1d_file, manifest(vendor, "multi", output__multi_label=True),
                        vendor.data, ()),
        "outputs do not match the labels": (conv1d_file, manifest(
            vendor, "five", output__labels="five.json"), vendor.data, ()),
        "custom object not importable": (conv1d_file, good, vendor.data,
                                         ("--custom-objects", "no_such_module:Layer")),
        "no manifest": (conv1d_file, None, vendor.data, ()),
        "no data": (conv1d_file, good, None, ()),
    }
    for fresh in (True, False):  # a home with no store nor ledger yet, then one with both
        if not fresh:
            _register_ok(site_home, conv1d_file, good, vendor, capsys)
        _refused_cases(site_home, cases, capsys, fresh)


def _refused_cases(site_home: Path, cases: dict[str, Any],
                   capsys: pytest.CaptureFixture[str], fresh: bool) -> None:
    before, records = snapshot(site_home), ledger_rows(site_home / "ledger.db")
    assert fresh == (not records) and fresh == (not (site_home / "mlflow.db").exists())
    for what, (source, man, data, extra) in cases.items():
        code = register(site_home, source, man, data, *extra)[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (what, err)
        assert len(err) == 1 and err[0].startswith("error:"), (what, err)
    assert snapshot(site_home) == before  # MLflow store, ledger, no staging folder
    assert ledger_rows(site_home / "ledger.db") == records


@pytest.fixture(scope="module")
def receiving_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another hospital's stays (the same case mix, other patients). At 600 stays only 57
    patients kept a code the vendor's model knows, and the keyed held-out draw (30 %)
    gave 8 of them in one CI run, fewer than the 10 finetune needs; 900 stays give about
    1.5 times the patients."""
    out = tmp_path_factory.mktemp("receiving") / "corpus"
    steps.generate_corpus("X", 900, 9, 0, out)
    return out


@pytest.mark.parametrize(("source", "dtype"), [("conv1d_file", "int32"),
                                               ("torch_file", "int64")])
def test_a_vendors_model_travels_and_finetunes_at_the_receiving_site(
        source: str, dtype: str, request: pytest.FixtureRequest, vendor: Vendor,
        receiving_corpus: Path, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path: Path = request.getfixturevalue(source)
    doc = _register_ok(site_home, path, manifest(vendor, source, dtype=dtype), vendor,
                       capsys)
    ref = f"vendor/{doc['version']}"
    assert main(["model", "export", ref, "--out", str(tmp_path / "export"), "--home",
                 str(site_home), *OVERRIDE_ARGS]) == 0
    home_y = tmp_path / "home-y"
    init_site(home_y, "CH-Y")
    for home, other, name in ((site_home, home_y, "y"), (home_y, site_home, "x")):
        assert main(["site", "show", "--home", str(other), "--out",
                     str(tmp_path / f"{name}.id")]) == 0
        assert main(["trust", "add", str(tmp_path / f"{name}.id"), "--home", str(home)]) == 0
    bundle = tmp_path / "vendor.bundle"
    assert main(["bundle", "create", ref, "--to", "CH-Y", "--out", str(bundle), "--home",
                 str(site_home)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["bundle", "receive", str(bundle), "--home", str(home_y), "--json"]) == 0
    received = json.loads(capsys.readouterr().out)
    card = json.loads((Path(received["directory"]) / "model" / "model_card.json").read_text())
    assert card["preprocessing"]["input_dtype"] == dtype

    code = main(["finetune", f"{received['model']}/{received['version']}", "--data",
                 str(receiving_corpus), "--drop-unknown-codes", "--heldout-fraction", "0.3",
                 "--epsilon", "3", "--delta", "1e-5", "--epochs", "2", "--batch-size", "16",
                 "--seed", "1", "--home", str(home_y), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    tuned = json.loads(out.out)
    assert tuned["epsilon_pld"] <= 3.0 and tuned["input_kind"] == "token_ids"
    store = ModelStore(home_y)
    info = store.get(VersionRef(received["model"], tuned["version"]))
    model = store.download(info, "onnx", tmp_path / "tuned")
    proto = onnx.load(str(model / "model.onnx"), load_external_data=False)
    assert proto.graph.input[0].type.tensor_type.elem_type == (
        onnx.TensorProto.INT64 if dtype == "int64" else onnx.TensorProto.INT32)
    before = onnx.load(str(tmp_path / "export" / "model.onnx"))
    moved = [t.name for t, b in zip(proto.graph.initializer, before.graph.initializer,
                                    strict=True)
             if not np.array_equal(onnx.numpy_helper.to_array(t),
                                   onnx.numpy_helper.to_array(b))]
    assert moved, "no weight moved"


@pytest.mark.parametrize(("source", "kind", "dtype", "width"), [
    ("conv1d_file", "token_ids", "int32", vm.MAX_LEN),
    ("torch_file", "token_ids", "int64", vm.MAX_LEN),
    ("skops_file", "bag_of_words", "float32", vm.VOCAB),
])
def test_init_manifest_reads_the_models_input_and_output_and_the_result_registers(
        source: str, kind: str, dtype: str, width: int, request: pytest.FixtureRequest,
        vendor: Vendor, site_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path: Path = request.getfixturevalue(source)
    out = vendor.folder / f"{source}.init.json"
    assert main(["model", "init-manifest", str(path), "--out", str(out), "--force",
                 "--json"]) == 0, capsys.readouterr().err
    found = json.loads(capsys.readouterr().out)
    assert (found["input_width"], found["output_width"]) == (width, vm.CLASSES)
    doc = json.loads(out.read_text())
    assert doc == found["manifest"]
    assert (doc["input"]["kind"], doc["input"]["dtype"]) == (kind, dtype)
    assert doc["training"] == {"heldout": None, "steps": None, "recipe": None}
    # without --force an existing manifest is kept
    assert main(["model", "init-manifest", str(path), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    registered = _register_ok(site_home, path, out, vendor, capsys)
    assert registered["tags"][TAG + "input_kind"] == kind
    model_dir = _v2_dir(site_home, site_home.parent, VersionRef("vendor", "1"))
    # trained on all of --data (heldout null): the parity stays are a keyed sample of it
    assert model_dir.metadata.training["heldout_stays"] == 0
    assert len(np.load(model_dir.path / PARITY_INPUTS)) == 256


def test_a_model_of_the_vendors_own_mlflow_registers_from_its_models_uri(
        vendor: Vendor, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'vendor-mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("vendor", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=exp):
            mlflow.onnx.log_model(vm.torch_conv_classifier(), name="onnx",
                                  pip_requirements=["mlflow"],
                                  registered_model_name="vendor-torch")
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    capsys.readouterr()
    doc = _register_ok(site_home, "models:/vendor-torch/1",
                       manifest(vendor, "torch-mlflow", dtype="int64"), vendor, capsys,
                       "--from-tracking-uri", uri)
    assert doc["tags"][TAG + "source_kind"] == "mlflow"
    model_dir = _v2_dir(site_home, tmp_path, VersionRef("vendor", doc["version"]))
    source = model_dir.metadata.source
    assert source["kind"] == "mlflow" and source["flavor"] == "onnx"
    assert source["uri"].startswith("models:/vendor-torch/1")
    assert source["digest"].startswith("sha256:")
    assert model_dir.metadata.framework.value == "onnx"
    assert not (site_home / ".intake").exists()


def test_a_custom_layer_loads_only_with_custom_objects_and_safe_mode_stays_on(
        vendor: Vendor, custom_file: Path, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    man = manifest(vendor, "custom")
    before = snapshot(site_home)
    assert register(site_home, custom_file, man, vendor.data)[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--custom-objects module:Name" in err[0], err
    assert register(site_home, custom_file, man, vendor.data, "--custom-objects",
                    "tests.custom_layers:Nope")[0] == 2
    assert "has no 'Nope'" in capsys.readouterr().err
    assert snapshot(site_home) == before
    doc = _register_ok(site_home, custom_file, man, vendor, capsys, "--custom-objects",
                       "tests.custom_layers:Scale")
    assert main(["model", "export", f"vendor/{doc['version']}", "--out",
                 str(tmp_path / "e"), "--home", str(site_home), *OVERRIDE_ARGS]) == 0


def test_a_text_pipeline_registers_with_its_vectorizers_vocabulary(
        vendor: Vendor, tfidf_svc_file: Path, site_home: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import skops.io

    man = manifest(vendor, "tfidf-linearsvc", "bag_of_words", "float32",
                   input__vocabulary="vocabulary-512.json")
    doc = _register_ok(site_home, tfidf_svc_file, man, vendor, capsys)
    model_dir = _v2_dir(site_home, tmp_path, VersionRef("vendor", doc["version"]))
    pipeline = skops.io.load(tfidf_svc_file,
                             trusted=skops.io.get_untrusted_types(file=tfidf_svc_file))
    shipped = json.loads((model_dir.path / "vocabulary.json").read_text())
    assert len(shipped["tokens"]) == len(pipeline.steps[0][1].vocabulary_) + 2
    assert shipped["config"]["max_len"] == 512
    # the reference is the vendor's pipeline on the raw texts of the held-out stays
    reference = np.load(model_dir.path / PARITY_REFERENCE)
    inputs = np.load(model_dir.path / PARITY_INPUTS)
    got = run_onnx((model_dir.path / "model.onnx").read_bytes(), inputs)
    assert np.abs(got - reference).max() <= PARITY_TOLERANCE
