"""A vendor's own MLflow: real stores (SQLite in tmp_path; one MLflow server on PostgreSQL),
models logged with MLflow's own flavors, resolved by registry.mlflow_source and loaded back
with the framework's safe loader to check they predict what the logged model predicted."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from passerelle.errors import BadInput
from registry.mlflow_source import ResolvedSource, resolve_mlflow_source

pytestmark = pytest.mark.xdist_group("mlflow_server")  # with test_postgres.py: one server

X = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5).astype(np.int64)  # 3 classes
REQS = ["mlflow"]  # given, so MLflow does not spend ~15 s per model inferring requirements


@contextmanager
def logging_to(uri: str) -> Iterator[None]:
    """mlflow.* logging calls go to ``uri`` inside the block (set_tracking_uri also sets
    $MLFLOW_TRACKING_URI; both are put back)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def tiny_keras() -> Any:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(8, "relu"),
                                 tf.keras.layers.Dense(3)])
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, epochs=1, verbose=0)
    return model


def tiny_sklearn() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)


def tiny_onnx() -> Any:
    """X (n, 4) -> relu(X W1) W2 (n, 3); W1 is 1,280 bytes, so mlflow.onnx's default
    save_as_external_data writes it to a file of its own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 80)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(80, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def copy_of(model: Any) -> Any:
    copy = type(model)()
    copy.CopyFrom(model)
    return copy


def onnx_logits(model_or_path: Any) -> Any:
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") \
        else str(model_or_path)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": X})[0])


@dataclass(frozen=True)
class Vendor:
    uri: str  # the vendor's tracking URI
    run_id: str
    keras: Any
    keras_model_id: str
    sklearn: Any
    sklearn_model_id: str
    onnx: Any
    onnx_model_id: str


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    """A vendor's SQLite MLflow with each flavor logged, registered and aliased."""
    import mlflow
    import skops.io
    import tensorflow as tf

    root = tmp_path_factory.mktemp("vendor-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    keras_model, sk_model, onnx_model = tiny_keras(), tiny_sklearn(), tiny_onnx()
    with logging_to(uri):
        client = mlflow.MlflowClient()
        exp = client.create_experiment("vendor", artifact_location=(root / "art").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            k = mlflow.tensorflow.log_model(keras_model, name="keras", pip_requirements=REQS,
                                            registered_model_name="vendor-keras")
            s = mlflow.sklearn.log_model(
                sk_model, name="skops", serialization_format="skops", pip_requirements=REQS,
                skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(sk_model)),
                registered_model_name="vendor-skops")
            # log_model(save_as_external_data=True) rewrites the proto it is given in place
            # (its tensors then point at a file beside model.onnx): give it a copy.
            o = mlflow.onnx.log_model(copy_of(onnx_model), name="onnx", pip_requirements=REQS,
                                      registered_model_name="vendor-onnx")
            for fmt in ("pickle", "cloudpickle"):
                mlflow.sklearn.log_model(sk_model, name=fmt, serialization_format=fmt,
                                         pip_requirements=REQS,
                                         registered_model_name=f"vendor-{fmt}")

            mlflow.tensorflow.log_model(keras_model, name="h5", pip_requirements=REQS,
                                        keras_model_kwargs={"save_format": "h5"},
                                        registered_model_name="vendor-h5")
            mlflow.tensorflow.log_model(tf.Module(), name="module", pip_requirements=REQS,
                                        registered_model_name="vendor-tf-module")

            class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
                def predict(self, context: Any, model_input: Any) -> Any:
                    return model_input

            mlflow.pyfunc.log_model(name="pyfunc", python_model=Echo(), pip_requirements=REQS,
                                    registered_model_name="vendor-pyfunc")
        client.set_registered_model_alias("vendor-keras", "champion", "1")
        mlflow.register_model(f"models:/{k.model_id}", "vendor-keras")  # version 2, same model
    return Vendor(uri, run.info.run_id, keras_model, k.model_id, sk_model, s.model_id,
                  onnx_model, o.model_id)


def resolve(vendor: Vendor, uri: str, dst: Path) -> ResolvedSource:
    return resolve_mlflow_source(uri, vendor.uri, dst)


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


# -- what is taken ---------------------------------------------------------------------

def test_a_registered_keras_version_resolves_to_its_savedmodel_and_predicts_the_same(
    vendor: Vendor, tmp_path: Path,
) -> None:
    import tensorflow as tf

    dst = tmp_path / "src"
    got = resolve(vendor, "models:/vendor-keras/1", dst)
    assert (got.framework, got.flavor) == ("keras", "tensorflow")
    assert got.uri == f"models:/vendor-keras/1 ({vendor.keras_model_id})"
    assert got.path == dst / "data" / "model" and (got.path / "saved_model.pb").is_file()
    assert got.digest.startswith("sha256:") and len(got.digest) == 71
    # Only MLmodel and the SavedModel came down: not the cloudpickle files MLflow writes
    # beside it, nor its environment files.
    files = files_under(dst)
    assert "MLmodel" in files and all(f == "MLmodel" or f.startswith("data/model/") for f in files)
    loaded = tf.keras.models.load_model(got.path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), vendor.keras.predict(X, verbose=0),
                               atol=1e-6)


def test_an_alias_and_latest_resolve_to_concrete_versions_of_the_same_files(
    vendor: Vendor, tmp_path: Path,
) -> None:
    by_version = resolve(vendor, "models:/vendor-keras/1", tmp_path / "v")
    by_alias = resolve(vendor, "models:/vendor-keras@champion", tmp_path / "a")
    latest = resolve(vendor, "models:/vendor-keras/latest", tmp_path / "l")
    assert by_alias.uri == f"models:/vendor-keras/1 ({vendor.keras_model_id})"
    assert latest.uri == f"models:/vendor-keras/2 ({vendor.keras_model_id})"
    assert by_version.digest == by_alias.digest == latest.digest


def test_a_logged_model_id_resolves_to_its_skops_file_with_no_untrusted_types(
    vendor: Vendor, tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    import skops.io

    capfd.readouterr()
    got = resolve(vendor, f"models:/{vendor.sklearn_model_id}", tmp_path / "src")
    assert capfd.readouterr() == ("", ""), "no progress bars, no log lines"
    assert (got.framework, got.flavor) == ("sklearn", "sklearn")
    assert got.uri == f"models:/{vendor.sklearn_model_id}"
    assert got.path == tmp_path / "src" / "model.skops"
    assert files_under(tmp_path / "src") == ["MLmodel", "model.skops"]
    assert skops.io.get_untrusted_types(file=got.path) == []
    loaded = skops.io.load(got.path, trusted=[])
    np.testing.assert_allclose(loaded.predict_proba(X), vendor.sklearn.predict_proba(X))


def test_a_run_uri_resolves_to_its_logged_onnx_model_with_external_data_inlined(
    vendor: Vendor, tmp_path: Path,
) -> None:
    import mlflow.artifacts
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    served = mlflow.artifacts.list_artifacts(
        artifact_uri=mlflow.MlflowClient(vendor.uri).get_logged_model(
            vendor.onnx_model_id).artifact_location, tracking_uri=vendor.uri)
    assert len({Path(a.path).name for a in served} - {"MLmodel", "model.onnx", "conda.yaml",
                                           "python_env.yaml", "requirements.txt"}) == 1
    got = resolve(vendor, f"runs:/{vendor.run_id}/onnx", tmp_path / "src")
    assert (got.framework, got.flavor) == ("onnx", "onnx")
    assert got.uri == f"runs:/{vendor.run_id}/onnx ({vendor.onnx_model_id})"
    assert got.path == tmp_path / "src" / "model.onnx"
    # mlflow.onnx wrote w1 to a file of its own; it was downloaded, inlined, removed, and
    # the digest still covers it (the digest is of what MLflow served).
    assert files_under(tmp_path / "src") == ["MLmodel", "model.onnx"]
    header = onnx.load(str(got.path), load_external_data=False)
    assert not any(uses_external_data(t) for t in _get_all_tensors(header))
    np.testing.assert_allclose(onnx_logits(got.path), onnx_logits(vendor.onnx), rtol=1e-6)
    registered = resolve(vendor, "models:/vendor-onnx/1", tmp_path / "reg")
    assert registered.digest == got.digest


def test_onnx_is_taken_over_sklearn_when_a_model_has_both_flavors(
    vendor: Vendor, tmp_path: Path,
) -> None:
    """A model folder logged as plain run artifacts (the MLflow 2 way), whose MLmodel lists
    an onnx and a skops sklearn flavor: ONNX is taken, the skops file is not downloaded."""
    import mlflow
    import skops.io
    from mlflow.models import Model

    folder = tmp_path / "both"
    mlflow.onnx.save_model(copy_of(vendor.onnx), folder, pip_requirements=REQS,
                           save_as_external_data=False)
    skops.io.dump(vendor.sklearn, folder / "model.skops")
    mlmodel = Model.load(folder / "MLmodel")
    mlmodel.add_flavor("sklearn", pickled_model="model.skops", serialization_format="skops")
    mlmodel.save(folder / "MLmodel")
    run_id = log_folder(vendor, folder, "both")
    got = resolve(vendor, f"runs:/{run_id}/both", tmp_path / "src")
    assert (got.framework, got.flavor, got.uri) == ("onnx", "onnx", f"runs:/{run_id}/both")
    assert files_under(tmp_path / "src") == ["MLmodel", "model.onnx"]
    np.testing.assert_allclose(onnx_logits(got.path), onnx_logits(vendor.onnx), rtol=1e-6)
    # Registered from those run artifacts (no LoggedModel, no model id): the same files.
    with logging_to(vendor.uri):
        mlflow.register_model(f"runs:/{run_id}/both", "vendor-both")
    registered = resolve(vendor, "models:/vendor-both/1", tmp_path / "reg")
    assert (registered.uri, registered.digest) == ("models:/vendor-both/1", got.digest)


def log_folder(vendor: Vendor, folder: Path, name: str) -> str:
    """Log a model folder as plain run artifacts (the MLflow 2 way); returns the run id."""
    import mlflow

    experiment = mlflow.MlflowClient(vendor.uri).get_experiment_by_name("vendor")
    assert experiment is not None
    with logging_to(vendor.uri), mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_artifacts(str(folder), artifact_path=name)
    return str(run.info.run_id)


def test_a_keras_flavor_dot_keras_file_is_taken(vendor: Vendor, tmp_path: Path) -> None:
    """The layout mlflow.keras writes with Keras 3 (data/model.keras; with Keras 2.15 it
    writes the tensorflow flavor), here with a .keras file Keras 2.15 can read."""
    import tensorflow as tf
    from mlflow.models import Model

    folder = tmp_path / "k3"
    (folder / "data").mkdir(parents=True)
    vendor.keras.save(folder / "data" / "model.keras")
    mlmodel = Model()
    mlmodel.add_flavor("keras", data="data", keras_version="3.0.0", keras_backend="tensorflow",
                       save_exported_model=False)
    mlmodel.save(folder / "MLmodel")
    run_id = log_folder(vendor, folder, "k3")
    got = resolve(vendor, f"runs:/{run_id}/k3", tmp_path / "src")
    assert (got.framework, got.flavor, got.path) == ("keras", "keras",
                                                     tmp_path / "src" / "data" / "model.keras")
    assert files_under(tmp_path / "src") == ["MLmodel", "data/model.keras"]
    loaded = tf.keras.models.load_model(got.path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), vendor.keras.predict(X, verbose=0),
                               atol=1e-6)


def test_the_tracking_uri_defaults_to_the_environment(
    vendor: Vendor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", vendor.uri)
    got = resolve_mlflow_source("models:/vendor-skops/1", None, tmp_path / "src")
    assert got.uri == f"models:/vendor-skops/1 ({vendor.sklearn_model_id})"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(BadInput, match="no MLflow tracking URI"):
        resolve_mlflow_source("models:/vendor-skops/1", None, tmp_path / "none")
    assert not (tmp_path / "none").exists()


# -- what is refused -------------------------------------------------------------------

def refused(vendor: Vendor, uri: str, dst: Path, tracking: str | None = None) -> str:
    with pytest.raises(BadInput) as e:
        resolve_mlflow_source(uri, tracking or vendor.uri, dst)
    assert not dst.exists(), "nothing may be left behind"
    return str(e.value)


@pytest.mark.parametrize(("name", "why"), [
    ("vendor-pickle", "serialization_format='pickle'"),
    ("vendor-cloudpickle", "serialization_format='cloudpickle'"),
    ("vendor-pyfunc", "a PythonModel stored with cloudpickle"),
])
def test_pickle_flavors_are_refused(vendor: Vendor, tmp_path: Path, name: str,
                                    why: str) -> None:
    message = refused(vendor, f"models:/{name}/1", tmp_path / "src")
    assert message.startswith(f"models:/{name}/1 (MLflow at {vendor.uri}): ")
    assert why in message
    assert message.endswith("is a pickle flavor; log it with serialization_format='skops', "
                            "or as ONNX (mlflow.onnx)")


@pytest.mark.parametrize(("name", "says"), [
    ("vendor-h5", "HDF5 file (save_format='h5')"),
    ("vendor-tf-module", "holds a tf2-module model, not a Keras model"),
])
def test_tensorflow_models_that_are_not_keras_2_savedmodels_are_refused(
    vendor: Vendor, tmp_path: Path, name: str, says: str,
) -> None:
    assert says in refused(vendor, f"models:/{name}/1", tmp_path / "src")


def test_a_pytorch_flavor_is_refused_as_pickle(vendor: Vendor, tmp_path: Path) -> None:
    """An MLmodel as mlflow.pytorch writes it (torch is not a dependency: written here)."""
    from mlflow.models import Model

    folder = tmp_path / "torch"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "model.pth").write_bytes(b"not read")
    mlmodel = Model()
    mlmodel.add_flavor("pytorch", model_data="data", pytorch_version="2.5.0")
    mlmodel.add_flavor("python_function", loader_module="mlflow.pytorch", data="data")
    mlmodel.save(folder / "MLmodel")
    run_id = log_folder(vendor, folder, "torch")
    message = refused(vendor, f"runs:/{run_id}/torch", tmp_path / "src")
    assert "the pytorch flavor" in message and message.endswith(
        "is a pickle flavor; log it with serialization_format='skops', or as ONNX (mlflow.onnx)")


def test_a_logged_model_whose_logging_did_not_finish_is_refused(vendor: Vendor,
                                                                tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(vendor.uri)
    experiment = client.get_experiment_by_name("vendor")
    assert experiment is not None
    pending = client.create_logged_model(experiment.experiment_id, name="half-logged")
    assert "is PENDING, not READY" in refused(vendor, f"models:/{pending.model_id}",
                                              tmp_path / "src")


@pytest.mark.parametrize(("uri", "says"), [
    ("models:/no-such-model/1", "Registered Model with name=no-such-model not found"),
    ("models:/vendor-keras/9", "(name=vendor-keras, version=9) not found"),
    ("models:/vendor-keras@no-such-alias", "alias no-such-alias not found"),
    ("models:/no-such-model@champion", "Registered Model with name=no-such-model not found"),
    ("models:/no-such-model/latest", "Registered Model with name=no-such-model not found"),
    ("models:/m-0123456789abcdef0123456789abcdef", "not found"),
    ("runs:/0123456789abcdef0123456789abcdef/keras", "Run with id=0123456789abcdef0123456789"),
])
def test_unknown_models_versions_aliases_and_runs_are_refused(
    vendor: Vendor, tmp_path: Path, uri: str, says: str,
) -> None:
    message = refused(vendor, uri, tmp_path / "src")
    assert message.startswith(f"{uri} (MLflow at {vendor.uri}): ") and says in message


def test_a_run_path_that_holds_no_model_is_refused(vendor: Vendor, tmp_path: Path) -> None:
    uri = f"runs:/{vendor.run_id}/no-such-path"
    message = refused(vendor, uri, tmp_path / "src")
    assert "artifact MLmodel is missing" in message and uri in message


@pytest.mark.parametrize(("uri", "says"), [
    ("models:/vendor-keras", "is not an MLflow model URI"),
    ("models:/vendor-keras/1/data", "is not an MLflow model URI"),
    ("models:/vendor-keras/", "is not an MLflow model URI"),
    ("runs:/abc", "is not an MLflow model URI"),
    ("runs:/abc/../../etc", "is not an MLflow model URI"),
    ("s3://bucket/model", "is not an MLflow model URI"),
    ("models:/vendor-keras/1\n", "is not an MLflow model URI"),
    ("models:/vendor\nkeras/1", "is not an MLflow model URI"),
    ("models:/vendor-keras/Production", "stage 'Production' is not accepted"),
])
def test_malformed_uris_and_stages_are_refused_before_mlflow_is_asked(
    vendor: Vendor, tmp_path: Path, uri: str, says: str,
) -> None:
    assert says in refused(vendor, uri, tmp_path / "src")


def test_a_store_that_is_not_there_is_refused_not_created(tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    with pytest.raises(BadInput, match="no MLflow store at"):
        resolve_mlflow_source("models:/m/1", f"sqlite:///{db}", tmp_path / "src")
    assert not db.exists() and not (tmp_path / "src").exists()


def test_a_model_larger_than_the_download_cap_is_refused_and_nothing_is_left(
    vendor: Vendor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cap is checked on the sizes MLflow lists before a download (a SavedModel
    folder summed over its files) and on the bytes on disk after it."""
    import registry.mlflow_source as source

    size = sum((tmp_path / "whole").joinpath(f).stat().st_size for f in files_under(
        resolve(vendor, "models:/vendor-keras/1", tmp_path / "whole").path.parent.parent))
    monkeypatch.setattr(source, "MAX_DOWNLOAD_BYTES", size - 1)
    dst = tmp_path / "src"
    with pytest.raises(BadInput, match=r"would take \d+ bytes \(with data/model\), more than"):
        resolve(vendor, "models:/vendor-keras/1", dst)
    assert not dst.exists()
    monkeypatch.setattr(source, "MAX_DOWNLOAD_BYTES", size)
    assert resolve(vendor, "models:/vendor-keras/1", dst).path.is_dir()
    # a server that lists less than it serves is caught once the bytes are on disk
    monkeypatch.setattr(source, "MAX_DOWNLOAD_BYTES", size - 1)
    monkeypatch.setattr(source._Fetcher, "_listed_bytes", lambda self, rel: 0)
    with pytest.raises(BadInput, match="more than"):
        resolve(vendor, "models:/vendor-keras/1", tmp_path / "lied")
    assert not (tmp_path / "lied").exists()


def test_an_existing_destination_is_refused_and_left_alone(vendor: Vendor,
                                                           tmp_path: Path) -> None:
    dst = tmp_path / "src"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    with pytest.raises(BadInput, match="already exists"):
        resolve(vendor, "models:/vendor-skops/1", dst)
    assert (dst / "keep").read_text() == "mine"


def test_a_server_that_is_down_is_refused_quickly_with_the_password_redacted(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    tracking = f"http://vendor:s3cret@127.0.0.1:{port}"
    capfd.readouterr()
    start = time.monotonic()
    with pytest.raises(BadInput) as e:
        resolve_mlflow_source("models:/vendor-keras/1", tracking, tmp_path / "src")
    elapsed = time.monotonic() - start
    message = str(e.value)
    assert capfd.readouterr() == ("", ""), "no retry warnings on the terminal"
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert message.startswith(f"models:/vendor-keras/1 (MLflow at http://vendor:***@127.0.0.1:"
                              f"{port}): ")
    assert "s3cret" not in message and "\n" not in message
    assert not (tmp_path / "src").exists()


# -- a vendor's MLflow server on PostgreSQL ---------------------------------------------

@pytest.mark.postgres
@pytest.mark.slow
def test_a_model_version_is_resolved_through_an_mlflow_server_on_postgres(
    mlflow_server: str, tmp_path: Path,
) -> None:
    """The server serves artifacts itself (mlflow-artifacts:/ locations), as in production."""
    import mlflow
    import skops.io

    model = tiny_sklearn()
    with logging_to(mlflow_server):
        exp = mlflow.MlflowClient().create_experiment("vendor-on-server")
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.sklearn.log_model(model, name="skops", serialization_format="skops",
                                            pip_requirements=REQS,
                                            registered_model_name="server-skops")
    version = info.registered_model_version
    got = resolve_mlflow_source(f"models:/server-skops/{version}", mlflow_server,
                                tmp_path / "src")
    assert got.uri == f"models:/server-skops/{version} ({info.model_id})"
    assert (got.framework, got.flavor) == ("sklearn", "sklearn")
    assert skops.io.get_untrusted_types(file=got.path) == []
    np.testing.assert_allclose(skops.io.load(got.path, trusted=[]).predict_proba(X),
                               model.predict_proba(X))
    missing = tmp_path / "missing"
    with pytest.raises(BadInput, match="not found"):
        resolve_mlflow_source("models:/server-skops/99", mlflow_server, missing)
    assert not missing.exists()

    # A server whose artifact location is a path on the caller's machine does not get to
    # make the caller copy its own files.
    client = mlflow.MlflowClient(mlflow_server)
    local = tmp_path / "this-machine"
    exp_local = client.create_experiment("vendor-local-path", artifact_location=local.as_uri())
    planted = client.create_logged_model(exp_local, name="planted")
    client.finalize_logged_model(planted.model_id, "READY")
    with pytest.raises(BadInput, match="gives a local path as the artifact location"):
        resolve_mlflow_source(f"models:/{planted.model_id}", mlflow_server, tmp_path / "p")
    assert not (tmp_path / "p").exists()
