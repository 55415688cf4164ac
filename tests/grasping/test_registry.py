"""The model registry and the `pickcell train` / `pickcell models` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic_grasps import make_dataset_synth, trained_model
from test_learning import degraded_copy, write_export

from grasping.learning import gate
from grasping.modelfile import ModelFileError, load_model
from grasping.registry import ModelRegistry, RegistryError
from pickcell.cli import main


@pytest.fixture(scope="module")
def holdout():
    return make_dataset_synth(80, seed=31, scene_prefix="holdout")[0]


def test_add_gate_promote_current_verify(tmp_path, holdout) -> None:
    good = trained_model().path
    reg = ModelRegistry(tmp_path / "reg")
    entry = reg.add(good)
    assert entry.version == "synthetic-v1" and entry.sha256 == load_model(good).sha256
    assert (tmp_path / "reg" / entry.file).read_bytes() == good.read_bytes()
    assert (tmp_path / "reg" / entry.card).read_text().startswith("# Model card: synthetic-v1")
    assert reg.add(good) == entry  # adding the same file again changes nothing
    assert reg.current() is None
    with pytest.raises(RegistryError, match="has not been gated"):
        reg.promote("synthetic-v1")
    reg.record_gate("synthetic-v1", gate(good, None, holdout))
    reg.promote("synthetic-v1", reason="first model")
    assert reg.current() == tmp_path / "reg" / entry.file
    assert reg.history()[-1]["to"] == "synthetic-v1" and reg.history()[-1]["forced"] is False
    assert reg.verify() == []
    index = json.loads((tmp_path / "reg" / "index.json").read_text())
    assert index["current"] == "synthetic-v1"
    assert not [p for p in (tmp_path / "reg").iterdir() if ".tmp" in p.name]  # no half-written index


def test_failed_gate_blocks_promotion_unless_forced(tmp_path, holdout) -> None:
    good = trained_model().path
    bad = tmp_path / "degraded.safetensors"
    degraded_copy(good, bad)
    reg = ModelRegistry(tmp_path / "reg")
    reg.add(good, gate_report=gate(good, None, holdout))
    reg.promote("synthetic-v1")
    reg.add(bad, gate_report=gate(bad, reg.current(), holdout))
    assert reg.get("degraded").gate_passed is False
    with pytest.raises(RegistryError, match="degraded failed the gate"):
        reg.promote("degraded")
    assert reg.current_version() == "synthetic-v1"
    reg.promote("degraded", force=True, reason="operator override test")
    assert reg.current_version() == "degraded" and reg.history()[-1]["forced"] is True
    with pytest.raises(RegistryError, match="not for sha256|is for sha256"):
        reg.record_gate("synthetic-v1", gate(bad, None, holdout))  # a report about another file


def test_tampering_is_detected(tmp_path, holdout) -> None:
    good = trained_model().path
    reg = ModelRegistry(tmp_path / "reg")
    entry = reg.add(good, gate_report=gate(good, None, holdout))
    reg.promote(entry.version)
    stored = tmp_path / "reg" / entry.file
    data = bytearray(stored.read_bytes())
    data[-50] ^= 0x01
    stored.write_bytes(bytes(data))
    problems = reg.verify()
    assert len(problems) == 1 and "sha256 mismatch" in problems[0].problem
    with pytest.raises(ModelFileError, match="does not match the registry index"):
        reg.current()
    with pytest.raises(RegistryError, match="sha256"):
        reg.promote(entry.version)


def test_same_version_with_other_contents_is_refused(tmp_path) -> None:
    good = trained_model().path
    other = tmp_path / "other.safetensors"
    m = load_model(good)
    from grasping.modelfile import save_model

    save_model(other, m.net, m.calibrators, np.array([0.9, 0.9]), m.watchdog, m.meta)  # same version
    reg = ModelRegistry(tmp_path / "reg")
    reg.add(good)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add(other)
    (tmp_path / "reg" / "index.json").write_text("{not json")
    with pytest.raises(RegistryError, match="index.json is corrupt"):
        reg.list()


def test_cli_train_gate_promote_list_show_verify(tmp_path, capsys, holdout) -> None:
    data, _ = make_dataset_synth(40, seed=32)
    write_export(tmp_path / "export", data)
    write_export(tmp_path / "holdout", holdout)
    out = tmp_path / "models" / "cli.safetensors"
    rc = main(["train", "--data", str(tmp_path / "export"), "--out", str(out), "--epochs", "1",
               "--version", "cli-1", "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["version"] == "cli-1" and Path(res["path"]) == out and out.with_suffix(".md").exists()
    reg = str(tmp_path / "reg")
    good = str(trained_model().path)
    assert (
        main(
            [
                "models",
                "gate",
                good,
                "--holdout",
                str(tmp_path / "holdout"),
                "--registry",
                reg,
                "--sim-episodes",
                "0",
            ]
        )
        == 0
    )
    assert "gate PASSED for synthetic-v1" in capsys.readouterr().out
    assert main(["models", "promote", "synthetic-v1", "--registry", reg]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--registry", reg, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == "synthetic-v1" and listing["models"][0]["gate_passed"] is True
    assert main(["models", "show", "current", "--registry", reg, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == "synthetic-v1"
    assert main(["models", "verify", "--registry", reg]) == 0
    assert "all models verified" in capsys.readouterr().out
    # Bad input: clear message on stderr, non-zero exit, nothing registered.
    assert main(["models", "promote", "nope", "--registry", reg]) == 1
    assert "'nope' is not in the registry" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert main(["models", "add", str(junk), "--registry", reg]) == 1
    assert "junk.safetensors: truncated" in capsys.readouterr().err
    assert main(["models", "verify", str(junk)]) == 1
