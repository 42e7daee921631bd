"""The audit's reference models with the vendor's own recipe (passerelle.recipes).

A recipe given as ``module:function`` (tests/vendor_recipes.py: a Keras Conv1D) trains
every reference model of a real audit and is recorded (name, kind, digest of its source
file) in the report, the version's tags and the ledger's audit record; recipes found by
entry point (a test distribution on sys.path, and the worktree's pyproject declaring
``passerelle-coder``); bad specs are one error line, exit 2, nothing recorded; the
ONNX-only recipe re-initialises a graph's weights and retrains it with the executor.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from passerelle import steps
from passerelle.cli import main
from passerelle.digests import sha256_file
from passerelle.errors import BadInput
from passerelle.recipes import ENTRY_POINT_GROUP, RecipeKind, TrainingSet, load_recipe
from registry.coder import CoderConfig
from registry.store import TAG, ModelStore, VersionRef
from tests import vendor_recipes
from tests.audit_support import RELAXED_MEMBERSHIP, sealed, small_policy
from transfer.ledger_site import open_ledger
from transfer.records import RecordKind

pytestmark = pytest.mark.xdist_group("recipes")  # one worker builds the module's fixtures

ROOT = Path(__file__).resolve().parent.parent
CONV1D = "tests.vendor_recipes:keras_conv1d"


@dataclass(frozen=True)
class Site:
    home: Path
    data: Path
    train: Path
    ref: VersionRef  # a built-in coder registered there


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("recipes")
    steps.generate_corpus("X", 700, 21, 0, root / "x")
    train = sealed(root / "home", root / "x", root / "train")
    steps.train_model(train, root / "m", CoderConfig(epochs=2, seed=2))
    ref = steps.register_model(ModelStore(root / "home"), root / "m", "coder", "PMSI coding",
                               "GDPR 6(1)(e)").ref
    return Site(root / "home", root / "x", train, ref)


def _audit(site: Site, out: Path, capsys: pytest.CaptureFixture[str],
           *extra: str) -> tuple[int, dict[str, object], list[str]]:
    policy = small_policy(out.parent / f"{out.name}-policy.toml")
    code = main(["model", "audit", str(site.ref), "--members", str(site.train),
                 "--nonmembers", str(site.data), "--home", str(site.home), "--policy",
                 str(policy), "--out", str(out), "--json", *extra])
    captured = capsys.readouterr()
    return (code, json.loads(captured.out) if captured.out else {},
            captured.err.strip().splitlines())


def _audit_records(home: Path) -> list[dict[str, object]]:
    with open_ledger(home) as ledger:
        return [dict(r.fields) for r in ledger.records(kind=RecordKind.AUDIT_VERDICT)]


@pytest.mark.slow
def test_a_vendor_recipe_trains_every_reference_model_and_is_recorded(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    vendor_recipes.CALLS.clear()
    code, report, err = _audit(site, tmp_path / "r", capsys, "--recipe", CONV1D)
    assert code in (0, 1), err
    digest = sha256_file(ROOT / "tests" / "vendor_recipes.py")
    assert report["recipe"] == {"name": CONV1D, "kind": "module", "digest": digest}
    assert report["reference_models"] == 4
    # the vendor's function trained the four reference models: one call each, distinct
    # seeds, about half the pool, each for the target's steps (2 epochs of 128 here)
    assert len(vendor_recipes.CALLS) == 4
    assert len({seed for seed, _, _ in vendor_recipes.CALLS}) == 4
    assert {s for _, _, s in vendor_recipes.CALLS} == {report["target_steps"]}
    pool = report["members"] + report["nonmembers"]  # type: ignore[operator]
    assert all(n > 0 for _, n, _ in vendor_recipes.CALLS) and pool > 0
    tags = ModelStore(site.home).get(site.ref).tags
    assert tags[TAG + "audit.recipe"] == CONV1D
    assert tags[TAG + "audit.recipe_kind"] == "module"
    assert tags[TAG + "audit.recipe_digest"] == digest
    record = _audit_records(site.home)[-1]
    assert (record["recipe"], record["recipe_kind"], record["recipe_digest"],
            record["reference_models"]) == (CONV1D, "module", digest, 4)


@pytest.mark.slow
def test_without_a_recipe_the_built_in_coder_is_recorded(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["model", "audit", str(site.ref), "--members", str(site.train),
                 "--nonmembers", str(site.data), "--home", str(site.home), "--policy",
                 str(small_policy(tmp_path / "p.toml")), "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "recipe passerelle-coder (builtin, sha256:" in " ".join(out.split())
    assert "reference models' fit: the target's members " in " ".join(out.split())
    record = _audit_records(site.home)[-1]
    assert record["recipe_kind"] == "builtin"
    assert record["recipe_digest"] == sha256_file(ROOT / "registry" / "coder.py")


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("tests.no_such_module:fit", "no module named 'tests.no_such_module'"),
    ("tests.vendor_recipes:nope", "has no 'nope'"),
    ("tests.vendor_recipes:not_callable", "is not callable"),
    ("not a spec", "not an entry-point name nor module:function"),
    ("no-such-recipe", "no recipe named 'no-such-recipe'"),
    ("tests.vendor_recipes:raises", "raised RuntimeError: the vendor's GPU is not here"),
    ("tests.vendor_recipes:returns_a_string", "cannot score"),
    ("tests.vendor_recipes:returns_too_few_scores", "expected ("),
])
def test_a_bad_recipe_is_one_error_line_exit_2_and_nothing_recorded(
    spec: str, message: str, site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    store = ModelStore(site.home)
    before = store.get(site.ref).tags
    records = len(_audit_records(site.home))
    code, report, err = _audit(site, tmp_path / "r", capsys, "--recipe", spec)
    assert code == 2 and report == {}
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "r").exists()
    after = store.get(site.ref).tags
    assert {k: v for k, v in after.items() if k.startswith(TAG + "audit")} == \
        {k: v for k, v in before.items() if k.startswith(TAG + "audit")}
    assert len(_audit_records(site.home)) == records


def _distribution(root: Path, name: str, entry_points: dict[str, str]) -> Path:
    """A minimal installed distribution (dist-info with entry_points.txt) under ``root``."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_recipe_is_found_by_its_entry_point_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(_distribution(tmp_path, "vendor_recipes_pkg",
                                                  {"vendor-conv1d": CONV1D})))
    loaded = load_recipe("vendor-conv1d")
    assert loaded.function is vendor_recipes.keras_conv1d
    assert loaded.info.kind is RecipeKind.ENTRY_POINT and loaded.info.name == "vendor-conv1d"
    assert loaded.info.digest == sha256_file(ROOT / "tests" / "vendor_recipes.py")
    with pytest.raises(BadInput, match=r"installed: .*vendor-conv1d"):
        load_recipe("vendor-conv2d")


def test_the_pyproject_declares_the_built_in_coder_as_the_entry_point_passerelle_coder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worktree's pyproject (not the venv's installed copy) as a distribution."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][ENTRY_POINT_GROUP]
    monkeypatch.syspath_prepend(str(_distribution(tmp_path, "passerelle_worktree", declared)))
    from registry.audit.recipe import coder_recipe

    loaded = load_recipe("passerelle-coder")
    assert loaded.function is coder_recipe and loaded.info.kind is RecipeKind.ENTRY_POINT
    rng = np.random.default_rng(0)
    x = rng.integers(1, 40, size=(64, 12)).astype(np.int32)
    y = (x[:, 0] % 3).astype(np.int64)
    model = coder_recipe(TrainingSet(x, y, ("",) * 64, ("A", "B", "C"), 1, 8, 40))
    assert np.asarray(model(x, training=False)).shape == (64, 3)


# ----------------------------------------------------------- ONNX re-initialised copies


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch-conv", "keras-conv1d"])
def test_onnx_reinit_retrains_a_reinitialised_copy_that_learns_and_runs_in_onnxruntime(
    name: str,
) -> None:
    from adapters.onnx_tf import OnnxExecutor
    from registry.audit.onnx_reinit import reinitialised, retrain
    from tests.vendor_models import VOCAB, vendor_model

    vendor = vendor_model(name, n_train=400)
    executor, roles = reinitialised(vendor.proto, seed=5)
    assert set(roles.values()) <= {"weight", "bias", "scale"} and "weight" in roles.values()
    original = OnnxExecutor.from_model(vendor.proto).variables_by_name
    for weight, role in roles.items():  # every weight re-drawn: none is the vendor's
        value = executor.variables_by_name[weight].numpy()
        assert not np.array_equal(value, original[weight].numpy()), weight
        if role == "bias":
            assert not value.any()
    again, _ = reinitialised(vendor.proto, seed=5)  # seeded
    assert all(np.array_equal(again.variables_by_name[w].numpy(),
                              executor.variables_by_name[w].numpy()) for w in roles)

    y = vendor.train_y
    training = TrainingSet(vendor.train_x, y, ("",) * len(y), ("A", "B", "C", "D"), 3, None,
                           VOCAB)
    trained = retrain(vendor.proto, training)
    assert [n.name for n in trained.graph.node] == [n.name for n in vendor.proto.graph.node]
    session = ort.InferenceSession(trained.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {vendor.input_name: vendor.train_x})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == y))
    chance = float(np.bincount(y).max() / len(y))
    print(f"{name}: retrained accuracy {accuracy:.3f} on its training half, chance {chance:.3f}")
    assert accuracy > chance + 0.25


@pytest.mark.slow
def test_an_audit_with_onnx_reinit_records_it(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, report, err = _audit(site, tmp_path / "r", capsys, "--recipe", "onnx-reinit")
    assert code in (0, 1), err
    recipe = report["recipe"]
    assert isinstance(recipe, dict) and recipe["kind"] == "onnx-reinit"
    assert recipe["digest"] == sha256_file(ROOT / "registry" / "audit" / "onnx_reinit.py")
    assert _audit_records(site.home)[-1]["recipe_kind"] == "onnx-reinit"


# --------------------------------------------- reference models trained by the vendor


def _vendor_trains(site: Site, halves_dir: Path, model: Path) -> None:
    """The vendor's side: its Keras Conv1D on each drawn half, encoded with its own
    vocabulary and label table (those of the registered model directory)."""
    from passerelle.corpus import read_corpus
    from registry.vocabulary import Vocabulary, select_text

    vocab = Vocabulary.load(model / "vocabulary.json")
    codes = tuple(json.loads((model / "labels.json").read_text())["codes"])
    index = {c: i for i, c in enumerate(codes)}
    for k in range(4):
        stays = [s for s in read_corpus(halves_dir / str(k) / "corpus").stays
                 if s.main_diagnosis in index]
        texts = tuple(select_text(s.sections.as_dict(), vocab.config.sections) for s in stays)
        training = TrainingSet(vocab.encode(list(texts)),
                               np.array([index[s.main_diagnosis] for s in stays], np.int64),
                               texts, codes, 100 + k, None, len(vocab))
        vendor_recipes.keras_conv1d(training).save(halves_dir / str(k) / "model.keras")


@pytest.mark.slow
def test_reference_models_the_vendor_trained_on_recorded_halves_are_scored_and_recorded(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    from registry.audit.halves import home_copy, models_digest, read_halves

    halves_dir = tmp_path / "halves"
    policy = small_policy(tmp_path / "p.toml")
    base = ["model", "audit", str(site.ref), "--members", str(site.train), "--nonmembers",
            str(site.data), "--home", str(site.home), "--policy", str(policy)]
    assert main([*base, "--draw-halves", str(halves_dir)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    halves = read_halves(halves_dir)
    assert halves.count == 4 and sorted(p.name for p in halves_dir.iterdir()) == [
        "0", "1", "2", "3", "halves.json"]
    assert home_copy(site.home, halves).read_bytes() == (halves_dir / "halves.json").read_bytes()
    with open_ledger(site.home) as ledger:
        drawn = ledger.records(kind=RecordKind.AUDIT_HALVES_DRAWN)
    assert drawn[-1].fields["assignment_digest"] == halves.digest
    # each pool patient is IN for two of the four halves
    from passerelle.corpus import read_corpus

    ins: dict[str, int] = {}
    for k in range(4):
        for p in {s.patient_id for s in read_corpus(halves_dir / str(k) / "corpus").stays}:
            ins[p] = ins.get(p, 0) + 1
    assert set(ins.values()) == {2}

    _vendor_trains(site, halves_dir, _model_dir(site))
    records = len(_audit_records(site.home))

    def refused(directory: Path, message: str, *extra: str) -> None:
        code = main([*base, "--reference-dir", str(directory), "--out", str(tmp_path / "r"),
                     *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "r").exists() and len(_audit_records(site.home)) == records

    bad = tmp_path / "bad"
    shutil.copytree(halves_dir, bad)
    (bad / "3" / "model.keras").unlink()
    refused(bad, "no reference model")
    shutil.copyfile(bad / "2" / "model.keras", bad / "3" / "model.keras")
    (bad / "4").mkdir()
    refused(bad, "unexpected 4")
    (bad / "4").rmdir()
    shutil.copyfile(bad / "3" / "model.keras", bad / "3" / "model.onnx")
    refused(bad, "several reference models")
    (bad / "3" / "model.onnx").unlink()
    refused(halves_dir, "drawn with --seed 0", "--seed", "1")
    # a swapped assignment, made self-consistent: no record of the site commits to it
    doc = json.loads((halves_dir / "halves.json").read_text())
    doc["halves"][0], doc["halves"][1] = doc["halves"][1], doc["halves"][0]
    for i, h in enumerate(doc["halves"]):
        h["index"] = i
    from registry.audit.halves import assignment_digest

    doc["assignment_digest"] = assignment_digest([h["patients_digest"] for h in doc["halves"]])
    (bad / "halves.json").write_text(json.dumps(doc))
    refused(bad, "no audit_halves_drawn record")

    code = main([*base, "--reference-dir", str(halves_dir), "--out", str(tmp_path / "r"),
                 "--json"])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    report = json.loads(captured.out)
    files = [halves_dir / str(k) / "model.keras" for k in range(4)]
    assert report["recipe"] == {"name": "vendor-references", "kind": "vendor-references",
                                "digest": models_digest(files)}
    assert report["reference_models"] == 4
    assert _audit_records(site.home)[-1]["recipe_kind"] == "vendor-references"


def _model_dir(site: Site) -> Path:
    return site.train.parent / "m"


# ------------------------------------------- vendors' model directories (format v2)


@pytest.fixture(scope="module")
def vendor_conv1d(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vendor's side: its Conv1D trained with its recipe on the declared training
    patients of the sealed training corpus, encoded with its own vocabulary; the folder
    holds model.keras, model.onnx (the same model exported), vocabulary, labels."""
    from passerelle.corpus import label_table, read_corpus
    from registry.coder import split_by_patient
    from registry.vocabulary import VocabularyConfig, build_vocabulary, select_text

    folder = tmp_path_factory.mktemp("vendor-conv1d")
    examples = steps.examples_of(read_corpus(site.train))
    train_idx, _ = split_by_patient(examples, 0.2, 7)
    train = examples.subset(train_idx)
    config = VocabularyConfig(max_len=64)
    vocab = build_vocabulary(train.texts(config), train.patient_ids, config)
    codes = tuple(sorted(set(train.codes)))
    texts = tuple(select_text(s, config.sections) for s in train.sections)
    training = TrainingSet(vocab.encode(list(texts)),
                           np.array([codes.index(c) for c in train.codes], np.int64), texts,
                           codes, 7, None, len(vocab))
    model = vendor_recipes.keras_conv1d(training)  # 4 epochs: the steps it really took
    (folder / "steps-taken").write_text(
        str(4 * math.ceil(len(training.labels) / vendor_recipes.BATCH)))
    model.save(folder / "model.keras")
    from adapters.onnx_export import keras_to_onnx

    (folder / "model.onnx").write_bytes(keras_to_onnx(model, 64).SerializeToString())
    vocab.save(folder / "vocabulary.json")
    table = label_table()
    (folder / "labels.json").write_text(json.dumps(
        {"codes": list(codes), "labels": {c: table[c] for c in codes}}, ensure_ascii=False))
    return folder


def _manifest(folder: Path, recipe: str | None, steps: int = 20) -> Path:
    path = folder / f"manifest-{recipe or 'none'}-{steps}.json".replace(":", "_")
    path.write_text(json.dumps({
        "format": "passerelle-manifest", "format_version": 1, "architecture": "conv1d",
        "input": {"kind": "token_ids", "vocabulary": "vocabulary.json", "dtype": "int32"},
        "output": {"labels": "labels.json", "multi_label": False, "scores": "logits"},
        "training": {"heldout": {"fraction": 0.2, "seed": 7}, "steps": steps,
                     "recipe": recipe}}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("source, recipe, kind", [
    ("model.keras", CONV1D, "module"),  # the manifest's training.recipe
    ("model.onnx", None, "onnx-reinit"),  # an ONNX-only model without a recipe
])
def test_a_vendor_model_directory_is_audited_with_the_recipe_its_manifest_names(
    source: str, recipe: str | None, kind: str, site: Site, vendor_conv1d: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    store = ModelStore(site.home)
    ref = steps.register_model(store, vendor_conv1d / source, f"vendor-{kind}", "PMSI coding",
                               "GDPR 6(1)(e)", site.train,
                               manifest=_manifest(vendor_conv1d, recipe)).ref
    vendor_recipes.CALLS.clear()
    code = main(["model", "audit", str(ref), "--members", str(site.train), "--nonmembers",
                 str(site.data), "--home", str(site.home), "--policy",
                 str(small_policy(tmp_path / "p.toml")), "--out", str(tmp_path / "r"),
                 "--json"])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    report = json.loads(captured.out)
    assert report["recipe"]["kind"] == kind and report["target_steps"] == 20
    assert report["split"]["heldout_stays"] > 0
    if kind == "module":  # the vendor's function, for the declared 20 steps
        assert report["recipe"]["name"] == CONV1D
        assert [s for _, _, s in vendor_recipes.CALLS] == [20] * 4
    assert _audit_records(site.home)[-1]["recipe_kind"] == kind


@pytest.mark.slow
def test_reference_models_that_fit_less_than_the_target_fail_the_audit(
    site: Site, vendor_conv1d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The declared steps are the vendor's word. Declared as taken, the vendor's recipe
    reproduces the target: its members sit among the reference models trained on them.
    Declared as an eighth, the reference models fit less, the members stand above them,
    and the audit FAILs on the recipe's fit however the other limits are set (all
    relaxed here): LiRA calibrated on such models would be blunt."""
    taken = int((vendor_conv1d / "steps-taken").read_text())
    relaxed = small_policy(tmp_path / "relaxed.toml", **RELAXED_MEMBERSHIP, **{
        "max_rare_tokens = 0": "max_rare_tokens = 1000000",
        "max_identifier_findings = 0": "max_identifier_findings = 1000000"})
    store = ModelStore(site.home)
    shifts = {}
    for declared in (taken, max(1, taken // 8)):
        ref = steps.register_model(
            store, vendor_conv1d / "model.keras", f"vendor-steps-{declared}", "PMSI coding",
            "GDPR 6(1)(e)", site.train, manifest=_manifest(vendor_conv1d, CONV1D, declared)).ref
        code = main(["model", "audit", str(ref), "--members", str(site.train), "--nonmembers",
                     str(site.data), "--home", str(site.home), "--policy", str(relaxed),
                     "--out", str(tmp_path / f"r{declared}"), "--json"])
        report = json.loads(capsys.readouterr().out)
        failed = {c["name"] for c in report["failed"]}
        shifts[declared] = report["reference_fit_shift"]
        assert report["target_steps"] == declared
        if declared == taken:
            assert code == 0 and not failed, (report["failed"], shifts)
            assert abs(shifts[declared]["members"]) < 1.0, shifts
        else:
            assert code == 1 and "recipe.members_fit_shift" in failed, (report["failed"],
                                                                         shifts)
            assert failed <= {"recipe.members_fit_shift", "recipe.nonmembers_fit_shift"}
            assert shifts[declared]["members"] > 2.0, shifts
    table = {k: (round(v["members"], 2), round(v["nonmembers"], 2)) for k, v in shifts.items()}
    print(f"reference fit shift (members, non-members) by declared steps (taken {taken}): {table}")
    assert _audit_records(site.home)[-1]["verdict"] == "FAIL"
