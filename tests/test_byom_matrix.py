"""Bring your own model, the whole story for each kind of vendor model (issue 9's matrix).

Each kind goes through the command line as a vendor and two sites would take it: the
vendor's model is made by its own recipe (tests/vendor_recipes.py) on the training corpus
that site X sealed, registered with its manifest (``model register``), audited with
reference models of the same recipe (``model audit``), exported (with a recorded override
when the tiny model FAILs its audit), bundled for site Y, received there and fine-tuned
under DP-SGD on Y's stays, then used to code Y's stays (``predict``, on the fine-tuned
version, or on the received one when it cannot be fine-tuned). A step either passes or
is refused with its stated reason (the random forest at ``finetune``: DP-SGD is
gradient-based). The matrix of outcomes is printed at the end of the module (``pytest -s``).

Sizes are the suite's: a 60-token vocabulary, 8 tokens a stay, the 4 commonest codes,
4 reference models, 2 epochs of DP-SGD.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.corpus import label_table, read_corpus
from passerelle.recipes import TrainingSet
from registry.audit.policy import load_policy
from registry.coder import Examples, split_by_patient
from registry.vocabulary import VocabularyConfig, build_vocabulary, select_text
from tests import vendor_models as vm
from tests import vendor_recipes
from tests.audit_support import sealed, small_policy
from transfer.identity import init_site

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("byom_matrix")]

HELDOUT = {"fraction": 0.25, "seed": 0}
STEPS = 40  # the vendors' declared training steps (batches of 32)
STORY = ("register", "audit", "export", "bundle create", "bundle receive", "finetune",
         "predict")
MATRIX: dict[str, dict[str, str]] = {}


@dataclass(frozen=True)
class World:
    root: Path
    corpus: Path  # X's corpus (the one the reserve was sealed from)
    train: Path  # what X hands the vendor: the corpus without the sealed reserve
    vendor: Path  # the vendor's folder: vocabulary.json, labels.json, models, manifests
    training: TrainingSet  # the vendor's training stays of the 4 codes, token ids
    bow: Any  # the same stays as bag of words
    home_x: Path
    home_y: Path
    corpus_y: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("byom")
    steps.generate_corpus("X", 700, 41, 0, root / "x")
    home_x = root / "home-x"
    train = sealed(home_x, root / "x", root / "train")
    corpus = read_corpus(train)
    examples = Examples(sections=tuple(s.sections.as_dict() for s in corpus.stays),
                        codes=tuple(s.main_diagnosis for s in corpus.stays),
                        patient_ids=tuple(s.patient_id for s in corpus.stays), site="X")
    keep, _ = split_by_patient(examples, HELDOUT["fraction"], HELDOUT["seed"])
    config = VocabularyConfig(min_patients=2, max_size=vm.VOCAB, max_len=vm.MAX_LEN)
    texts = [select_text(examples.sections[i], config.sections) for i in keep]
    vocab = build_vocabulary(texts, [examples.patient_ids[i] for i in keep], config)
    assert len(vocab) == vm.VOCAB
    codes = tuple(sorted(c for c, _ in Counter(examples.codes[i] for i in keep)
                         .most_common(vm.CLASSES)))
    vendor = root / "vendor"
    vendor.mkdir()
    vocab.save(vendor / "vocabulary.json")
    # a pipeline that tokenises itself reads whole stays: its manifest's vocabulary (which
    # gives the sections and the length read) must not cut them at 8 tokens
    dataclasses.replace(vocab, config=dataclasses.replace(config, max_len=512)).save(
        vendor / "vocabulary-whole-stays.json")
    table = label_table()
    (vendor / "labels.json").write_text(json.dumps(
        {"codes": list(codes), "labels": {c: table[c] for c in codes}}, ensure_ascii=False))
    kept = [i for i in keep if examples.codes[i] in codes]
    kept_texts = tuple(select_text(examples.sections[i], config.sections) for i in kept)
    training = TrainingSet(
        inputs=vocab.encode(list(kept_texts)),
        labels=np.array([codes.index(examples.codes[i]) for i in kept], np.int64),
        texts=kept_texts, codes=codes, seed=7, steps=STEPS, vocabulary_size=len(vocab))

    home_y = root / "home-y"
    init_site(home_y, "CH-Y")
    for home, other, name in ((home_x, home_y, "y"), (home_y, home_x, "x")):
        assert main(["site", "show", "--home", str(other), "--out",
                     str(root / f"{name}.id")]) == 0
        assert main(["trust", "add", str(root / f"{name}.id"), "--home", str(home)]) == 0
    steps.generate_corpus("X", 600, 42, 0, root / "y")  # X's case mix, so X's codes occur
    # X pins the suite's small audit policy (4 reference models), as a site would its own
    policy = small_policy(root / "policy.toml")
    assert main(["site", "policy", "set", "audit.policy_sha256", load_policy(policy).digest,
                 "--approver", "DPO CHU-X", "--justification", "test-size audits",
                 "--home", str(home_x)]) == 0
    yield World(root, root / "x", train, vendor, training, vocab.bag_of_words(
        list(kept_texts)), home_x, home_y, root / "y")
    _print_matrix()


def _print_matrix() -> None:
    if not MATRIX:
        return
    width = max(len(k) for k in MATRIX)
    lines = ["", "model kind x step (issue 9):",
             " | ".join(["kind".ljust(width), *STORY])]
    for kind, row in MATRIX.items():
        lines.append(" | ".join([kind.ljust(width), *(row.get(s, "-") for s in STORY)]))
    print("\n".join(lines))


def _manifest(world: World, name: str, kind: str = "token_ids", dtype: str = "int32",
              recipe: str | None = None, vocabulary: str = "vocabulary.json") -> Path:
    doc = {"format": "passerelle-manifest", "format_version": 1, "architecture": name,
           "input": {"kind": kind, "vocabulary": vocabulary, "dtype": dtype},
           "output": {"labels": "labels.json", "multi_label": False, "scores": "logits"},
           "training": {"heldout": HELDOUT, "steps": STEPS, "recipe": recipe}}
    path = world.vendor / f"{name}.manifest.json"
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------ the vendors' models


def _keras(recipe: Callable[[TrainingSet], Any], suffix: str) -> Callable[[World], Path]:
    def make(world: World) -> Path:
        path = world.vendor / f"{suffix}.keras"
        recipe(world.training).save(path)
        return path
    return make


def _text_pipeline(world: World) -> Path:
    import skops.io

    path = world.vendor / "tfidf-linearsvc.skops"
    skops.io.dump(vendor_recipes.text_pipeline(world.training), path)
    return path


def _forest(world: World) -> Path:
    import skops.io

    path = world.vendor / "forest.skops"
    bow = dataclasses.replace(world.training, inputs=world.bow)
    skops.io.dump(vendor_recipes.random_forest(bow), path)
    return path


def _torch(world: World) -> Path:
    path = world.vendor / "torch-conv.onnx"
    onnx.save(vm.torch_conv_classifier(), str(path))
    return path


def _mlflow(world: World) -> str:
    """A Keras Conv1D the vendor logged and registered in its own MLflow (SQLite)."""
    import mlflow

    model = vendor_recipes.keras_conv1d(world.training)
    uri = f"sqlite:///{world.root / 'vendor-mlflow.db'}"
    # both URIs: a registry URI another test left set would get the registration
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:  # its artifacts under the test's folder (a SQLite store's default is ./mlruns)
        experiment = mlflow.create_experiment(
            "vendor", artifact_location=(world.root / "vendor-artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            mlflow.tensorflow.log_model(model, name="model", registered_model_name="conv",
                                        pip_requirements=[])
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model("conv")
    return uri


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[World], Path]
    input_kind: str = "token_ids"
    dtype: str = "int32"
    recipe: str | None = None  # in the manifest
    audit_recipe_kind: str = "module"
    finetunes: bool = True
    vocabulary: str = "vocabulary.json"


KINDS = [
    Kind("keras-conv1d", _keras(vendor_recipes.keras_conv1d, "conv1d"),
         recipe="tests.vendor_recipes:keras_conv1d"),
    Kind("keras-transformer", _keras(vendor_recipes.keras_transformer, "transformer"),
         recipe="tests.vendor_recipes:keras_transformer"),
    Kind("keras-bigru", _keras(vendor_recipes.keras_bigru, "bigru"),
         recipe="tests.vendor_recipes:keras_bigru"),
    Kind("sklearn-tfidf-linearsvc", _text_pipeline, "bag_of_words", "float32",
         recipe="tests.vendor_recipes:text_pipeline",
         vocabulary="vocabulary-whole-stays.json"),
    Kind("sklearn-random-forest", _forest, "bag_of_words", "float32",
         recipe="tests.vendor_recipes:random_forest", finetunes=False),
    Kind("pytorch-style-onnx", _torch, dtype="int64", audit_recipe_kind="onnx-reinit"),
]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else None, out.err.strip()


def _story(world: World, kind: Kind, source: str, tmp: Path,
           capsys: pytest.CaptureFixture[str], *register_extra: str) -> dict[str, str]:
    row: dict[str, str] = {}
    MATRIX[kind.name] = row
    hx, hy = str(world.home_x), str(world.home_y)
    manifest = _manifest(world, kind.name, kind.input_kind, kind.dtype, kind.recipe,
                         kind.vocabulary)
    code, doc, err = _run(capsys, "model", "register", source, "--name", kind.name,
                          "--purpose", "PMSI coding", "--legal-basis", "GDPR 6(1)(e)",
                          "--manifest", str(manifest), "--data", str(world.train),
                          "--home", hx, *register_extra)
    assert code == 0, err
    ref = f"{kind.name}/{doc['version']}"
    row["register"] = "pass"

    code, report, err = _run(capsys, "model", "audit", ref, "--members", str(world.train),
                             "--nonmembers", str(world.corpus), "--policy",
                             str(world.root / "policy.toml"),
                             "--out", str(tmp / "audit"), "--home", hx)
    assert code in (0, 1), err
    assert report["recipe"]["kind"] == kind.audit_recipe_kind
    assert report["reference_models"] == 4 and report["policy"]["pinned"]
    verdict = report["verdict"]
    failed = [c["name"] for c in report["criteria"] if not c["passed"]]
    row["audit"] = f"{verdict} ({report['recipe']['kind']}" + (
        f"; failed {', '.join(failed)}; scan {report['scan']['counts']} "
        f"{[(f['file'], f['where'], f['redacted']) for f in report['scan']['findings'][:6]]})"
        if failed else ")")

    override = [] if verdict == "PASS" else [
        "--override", "--approver", "DPO CHU-X", "--justification", "test-size model"]
    code, _, err = _run(capsys, "model", "export", ref, "--out", str(tmp / "export"),
                        "--home", hx, *override)
    assert code == 0, err
    row["export"] = "pass" if verdict == "PASS" else "pass (override)"

    bundle = tmp / f"{kind.name}.bundle"
    code, _, err = _run(capsys, "bundle", "create", ref, "--to", "CH-Y", "--out",
                        str(bundle), "--home", hx)
    assert code == 0, err
    row["bundle create"] = "pass"
    code, received, err = _run(capsys, "bundle", "receive", str(bundle), "--home", hy)
    assert code == 0, err
    assert received["model"] == f"CHU-X.{kind.name}"
    row["bundle receive"] = "pass"

    code, tuned, err = _run(capsys, "finetune", f"{received['model']}/{received['version']}",
                            "--data", str(world.corpus_y), "--drop-unknown-codes",
                            "--heldout-fraction", "0.3", "--epsilon", "3", "--delta", "1e-5",
                            "--epochs", "2", "--batch-size", "16", "--seed", "1",
                            "--home", hy)
    if kind.finetunes:
        assert code == 0, err
        assert tuned["epsilon_pld"] <= 3.0
        assert math.isfinite(tuned["accuracy_after"])
        row["finetune"] = (f"pass (ε {tuned['epsilon_pld']:.2f}, held-out "
                           f"{tuned['accuracy_before']:.0%}→{tuned['accuracy_after']:.0%})")
    else:
        assert code == 2, err
        assert err.startswith("error:") and len(err.splitlines()) == 1
        assert "tree ensemble" in err and "gradient" in err, err
        row["finetune"] = "refused: DP-SGD is gradient-based, trees have no gradient"

    version = tuned["version"] if kind.finetunes else received["version"]
    coded = tmp / "coded.jsonl"
    code, _, err = _run(capsys, "predict", f"{received['model']}/{version}", "--data",
                        str(world.corpus_y), "--out", str(coded), "--home", hy)
    assert code == 0, err
    lines = [json.loads(line) for line in coded.read_text().splitlines()]
    assert len(lines) == len(read_corpus(world.corpus_y).stays)
    assert all(len(line["codes"]) == vm.CLASSES for line in lines)
    row["predict"] = f"pass (v{version})"
    return row


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_vendor_model_goes_through_the_whole_story(
        kind: Kind, world: World, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    source = kind.make(world)
    row = _story(world, kind, str(source), tmp_path, capsys)
    assert set(row) == set(STORY)


def test_a_model_of_the_vendors_mlflow_goes_through_the_whole_story(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tracking = _mlflow(world)
    kind = Kind("mlflow-models-uri", lambda w: Path(), recipe=KINDS[0].recipe)
    row = _story(world, kind, "models:/conv/1", tmp_path, capsys,
                 "--from-tracking-uri", tracking)
    assert set(row) == set(STORY)
