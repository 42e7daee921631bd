"""The whole transfer through the command line with a real trained model: register and
export at X, ``bundle create`` for Y, ``bundle verify`` and ``bundle receive`` at Y."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from passerelle import steps
from passerelle.cli import main
from registry.store import ModelStore, VersionRef
from tests.conftest import TEST_OVERRIDE


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 and out.out.strip() else {}), out.err


@pytest.mark.slow
def test_model_travels_from_x_to_y_through_the_cli(
        tmp_path: Path, keras_model: steps.TrainReport,
        capsys: pytest.CaptureFixture[str]) -> None:
    hx, hy = str(tmp_path / "x"), str(tmp_path / "y")
    for name, home in (("X", hx), ("Y", hy)):
        assert _run(capsys, "site", "init", name, "--home", home)[0] == 0
        assert main(["site", "show", "--home", home, "--out",
                     str(tmp_path / f"{name}.id")]) == 0
        capsys.readouterr()
    assert _run(capsys, "trust", "add", str(tmp_path / "Y.id"), "--home", hx)[0] == 0
    assert _run(capsys, "trust", "add", str(tmp_path / "X.id"), "--home", hy)[0] == 0

    store_x = ModelStore(Path(hx))
    info = steps.register_model(store_x, keras_model.out_dir, "pmsi-coder",
                                "aide au codage PMSI", "RGPD art. 6(1)(e) et 9(2)(h)")
    # Not audited and not exported: it may not leave.
    code, _, err = _run(capsys, "bundle", "create", "pmsi-coder/1", "--to", "Y",
                        "--out", str(tmp_path / "early.bundle"), "--home", hx)
    assert code == 1 and "may not leave this site" in err
    assert not (tmp_path / "early.bundle").exists()
    # refused before converting: no ONNX export was logged on the version
    assert "passerelle.onnx_digest" not in store_x.get(info.ref).tags
    assert store_x.client.list_artifacts(info.run_id, "onnx") == []
    assert list(tmp_path.glob(".early.bundle-*")) == []
    steps.export_model(store_x, info.ref, tmp_path / "export", TEST_OVERRIDE)

    code, _, err = _run(capsys, "bundle", "create", "pmsi-coder/1", "--to", "NOWHERE",
                        "--out", str(tmp_path / "no.bundle"), "--home", hx)
    assert code == 2 and "no trusted site named 'NOWHERE'" in err
    assert not (tmp_path / "no.bundle").exists()

    bundle = tmp_path / "coder-1.bundle"
    code, created, err = _run(capsys, "bundle", "create", "pmsi-coder/1", "--to", "Y",
                              "--out", str(bundle), "--home", hx)
    assert code == 0, err
    assert created["sequence"] == 1 and created["recipients"] == ["Y"]

    # X itself is not a recipient: it can check the header only after trusting itself,
    # so verify at Y.
    code, verified, err = _run(capsys, "bundle", "verify", str(bundle), "--home", hy)
    assert code == 0, err
    assert verified["decrypted"] is True and verified["sender"] == "X"
    assert list((Path(hy) / ".receiving").iterdir()) == []

    code, received, err = _run(capsys, "bundle", "receive", str(bundle), "--home", hy)
    assert code == 0, err
    tags = received["tags"]
    assert isinstance(tags, dict)
    assert tags["passerelle.received_from"] == "X"
    assert tags["passerelle.bundle_digest"] == created["bundle_digest"]
    assert tags["passerelle.source_model"] == "pmsi-coder"
    assert tags["passerelle.source_version"] == "1"
    assert tags["passerelle.audit_verdict"] == "none (export override by Test Suite)"
    installed = Path(str(received["directory"])) / "model"
    assert {p.name for p in installed.iterdir()} == {
        "model.onnx", "vocabulary.json", "labels.json", "model_card.json",
        "transfer_statement.json"}
    store_y = ModelStore(Path(hy))
    # Registered under a name that shows the sender, never merged into a local model.
    assert received["model"] == "X.pmsi-coder"
    assert store_y.get(VersionRef("X.pmsi-coder", "1")).tags["passerelle.received_from"] == "X"

    # Receiving the same bundle again is a no-op that says so: exit 0, nothing new.
    code, again, err = _run(capsys, "bundle", "receive", str(bundle), "--home", hy)
    assert code == 0 and again["already_received"] is True and again["version"] == "1"
    assert store_y.versions("X.pmsi-coder") == ["1"]
    assert [m.name for m in store_y.client.search_registered_models()] == ["X.pmsi-coder"]

    # A second version, exported on an override: its sequence number follows.
    info2 = steps.register_model(store_x, keras_model.out_dir, "pmsi-coder",
                                 "aide au codage PMSI", "RGPD art. 6(1)(e) et 9(2)(h)")
    exported = steps.export_model(store_x, info2.ref, tmp_path / "export2", TEST_OVERRIDE)
    # ... and then audited (a PASS verdict for these bytes, as registry.audit logs it):
    # the report travels with the model.
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "audit-report.json").write_text('{"verdict": "PASS"}')
    from registry.audit.policy import load_policy

    store_x.attach(store_x.get(info2.ref), audit, "audit", {
        "passerelle.audit.verdict": "PASS",
        "passerelle.audit.onnx_digest": exported.onnx_digest,
        "passerelle.audit.policy_digest": load_policy().digest})  # the site's default
    bundle2 = tmp_path / "coder-2.bundle"
    code, created2, err = _run(capsys, "bundle", "create", str(info2.ref), "--to", "Y",
                               "--out", str(bundle2), "--home", hx)
    assert code == 0, err
    assert created2["sequence"] == 2
    code, received2, err = _run(capsys, "bundle", "receive", str(bundle2), "--home", hy)
    assert code == 0, err
    assert received2["version"] == "2" and received2["source_version"] == "2"
    tags2 = received2["tags"]
    assert isinstance(tags2, dict) and tags2["passerelle.audit_verdict"] == "PASS"
    report = Path(str(received2["directory"])) / "model" / "audit_report.json"
    assert json.loads(report.read_text()) == {"verdict": "PASS"}


def test_export_gate_needs_a_pass_or_an_override_for_these_exact_bytes() -> None:
    from passerelle.errors import GateRefused
    from registry.store import VersionInfo
    from transfer.exchange import export_gate

    mine, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    pinned, unpinned = "sha256:" + "c" * 64, "sha256:" + "d" * 64

    def info(**tags: str) -> VersionInfo:
        return VersionInfo(VersionRef("m", "1"), "run", "source",
                           {f"passerelle.{k.replace('__', '.')}": v for k, v in tags.items()})

    assert export_gate(info(audit__verdict="PASS", audit__onnx_digest=mine,
                            audit__policy_digest=pinned), mine, pinned) == "PASS"
    for refused in (info(), info(audit__verdict="PASS", audit__onnx_digest=other,
                                 audit__policy_digest=pinned),
                    info(audit__verdict="PASS", audit__onnx_digest=mine,
                         audit__policy_digest=unpinned),
                    info(audit__verdict="FAIL", audit__onnx_digest=mine),
                    info(export__override__onnx_digest=other)):
        with pytest.raises(GateRefused, match="may not leave"):
            export_gate(refused, mine, pinned)
    overridden = info(audit__verdict="FAIL", audit__onnx_digest=mine,
                      export__override__onnx_digest=mine, export__override__approver="Ann")
    assert export_gate(overridden, mine, pinned) == "FAIL (export override by Ann)"
