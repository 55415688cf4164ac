"""Model files: round trip, and every way a file can be bad gives ModelFileError naming the file."""

from __future__ import annotations

import json
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from grasping.calibration import ISOTONIC, Calibrator, fit_isotonic
from grasping.learned_scorer import LearnedScorer, load_scorer
from grasping.model import GraspNet
from grasping.modelfile import (
    FORMAT_VERSION,
    ModelFileError,
    file_sha256,
    load_model,
    read_sidecar,
    save_model,
    sidecar_path,
)
from grasping.scoring import Scorer
from grasping.watchdog import Watchdog


def write_model(path: Path, version: str = "test-1", seed: int = 0) -> str:
    torch.manual_seed(seed)
    net = GraspNet(2, 32, 4)
    net.set_feature_normalisation(torch.arange(4.0), torch.full((4,), 2.0))
    rng = np.random.default_rng(seed)
    z = rng.normal(size=200)
    iso = fit_isotonic(z, (rng.random(200) < 1 / (1 + np.exp(-z))).astype(float))
    wd = Watchdog(rng.normal(size=64), np.eye(64) * 0.5, 7.0, 1.5, 2.5, 0.99, 0.3)
    cals = (Calibrator("temperature", temperature=1.7, bias=-0.2), iso)
    return save_model(
        path, net, cals, np.array([0.81, np.inf]), wd, {"model_version": version, "metrics": {"auroc": 0.9}}
    )


def scene(m: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.random((m, 2, 32, 32)).astype(np.float32),
        rng.random((m, 4)).astype(np.float32),
        rng.integers(0, 2, m),
    )


def test_round_trip_keeps_weights_calibration_thresholds_watchdog_and_metadata(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    digest = write_model(path)
    assert digest == file_sha256(path) == read_sidecar(path)
    m = load_model(path)
    assert m.version == "test-1" and m.sha256 == digest
    assert m.meta["arch"] == {
        "in_channels": 2,
        "patch_size": 32,
        "n_features": 4,
        "embed_dim": 64,
        "channels": [8, 16, 32],
    }
    assert m.meta["metrics"] == {"auroc": 0.9}
    assert m.calibrators[0].temperature == pytest.approx(1.7) and m.calibrators[0].bias == pytest.approx(-0.2)
    assert m.calibrators[1].method == ISOTONIC
    assert m.thresholds[0] == pytest.approx(0.81) and np.isinf(m.thresholds[1])
    assert m.watchdog.scene_mu == 7.0 and m.watchdog.threshold_sigma == 2.5
    torch.testing.assert_close(m.net.feature_std, torch.full((4,), 2.0))
    torch.manual_seed(0)
    ref = GraspNet(2, 32, 4)
    ref.set_feature_normalisation(torch.arange(4.0), torch.full((4,), 2.0))
    p, f, g = scene()
    with torch.no_grad():
        a = ref.eval()(torch.from_numpy(p), torch.from_numpy(f), torch.from_numpy(g))[0]
        b = m.net(torch.from_numpy(p), torch.from_numpy(f), torch.from_numpy(g))[0]
    torch.testing.assert_close(a, b)


def test_scorer_implements_the_protocol_and_scores_a_scene(tmp_path) -> None:
    write_model(tmp_path / "m.safetensors")
    s = LearnedScorer.from_file(tmp_path / "m.safetensors")
    assert isinstance(s, Scorer) and s.version == "test-1"
    p, f, g = scene(300)
    r = s.score(p, f, g)
    assert r.learned.shape == r.calibrated.shape == r.ood.shape == (300,)
    assert np.all((r.calibrated >= 0) & (r.calibrated <= 1))
    # Per-gripper calibrators: suction rows use the temperature, jaw rows the isotonic map.
    logits, _ = s.logits_and_embeddings(p, f, g)
    np.testing.assert_allclose(
        r.calibrated[g == 0], 1 / (1 + np.exp(-(logits[g == 0] / 1.7 - 0.2))), rtol=1e-6
    )
    # One threshold per scene: the top-ranked candidate's gripper's (suction 0.81, jaw "never").
    top_gripper = g[np.argmax(r.calibrated)]
    assert r.threshold == (pytest.approx(0.81) if top_gripper == 0 else np.inf)
    assert s.score(p[g == 0], f[g == 0], g[g == 0]).threshold == pytest.approx(0.81)
    assert np.isinf(s.score(p[g == 1], f[g == 1], g[g == 1]).threshold)
    np.testing.assert_allclose(s.candidate_thresholds(g)[g == 0], 0.81)
    empty = s.score(p[:0], f[:0], g[:0])
    assert empty.calibrated.shape == (0,) and empty.in_distribution


def test_scorer_rejects_malformed_input(tmp_path) -> None:
    write_model(tmp_path / "m.safetensors")
    s = LearnedScorer.from_file(tmp_path / "m.safetensors")
    p, f, g = scene(10)
    with pytest.raises(ValueError, match="patches must be"):
        s.score(p[:, :1], f, g)
    with pytest.raises(ValueError, match="features must be"):
        s.score(p, f[:, :3], g)
    with pytest.raises(ValueError, match="gripper values"):
        s.score(p, f, g + 5)
    p[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        s.score(p, f, g)


def test_missing_truncated_and_corrupt_files_name_the_file(tmp_path) -> None:
    good = tmp_path / "good.safetensors"
    write_model(good)
    data = good.read_bytes()
    with pytest.raises(ModelFileError, match=r"nope\.safetensors: does not exist"):
        load_model(tmp_path / "nope.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"trunc\.safetensors: truncated"):
        load_model(trunc)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(ModelFileError, match=r"tiny\.safetensors: truncated"):
        load_model(tiny)
    garbage = tmp_path / "garbage.safetensors"
    n = struct.unpack("<Q", data[:8])[0]
    garbage.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    with pytest.raises(ModelFileError, match=r"garbage\.safetensors: corrupt safetensors header"):
        load_model(garbage)


def test_sidecar_and_expected_hash_mismatches_are_refused(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    digest = write_model(path)
    with pytest.raises(ModelFileError, match=r"m\.safetensors: sha256 mismatch"):
        load_model(path, expected_sha256="0" * 64)
    # Flip one byte of the weights: framing is intact, only the hash can tell.
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        ModelFileError, match=r"m\.safetensors: sha256 mismatch.*recorded in m\.safetensors\.sha256"
    ):
        load_model(path)
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        load_model(path, expected_sha256=digest)


def test_wrong_format_version_and_foreign_safetensors_are_refused(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    write_model(path)
    tensors = load_file(path)
    with open(path, "rb") as fh:
        header = json.loads(fh.read(8 + struct.unpack("<Q", path.read_bytes()[:8])[0])[8:])
    meta = dict(header["__metadata__"])
    meta["pickcell.format_version"] = str(FORMAT_VERSION + 1)
    future = tmp_path / "future.safetensors"
    save_file(tensors, future, metadata=meta)
    with pytest.raises(
        ModelFileError, match=rf"future\.safetensors: format version {FORMAT_VERSION + 1} is not"
    ):
        load_model(future)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match=r"foreign\.safetensors: not a pickcell grasp model"):
        load_model(foreign)
    # Right format, but weights that do not fit the declared architecture.
    broken = tmp_path / "broken.safetensors"
    del tensors["net.fuse.0.weight"]
    save_file(tensors, broken, metadata=header["__metadata__"])
    with pytest.raises(ModelFileError, match=r"broken\.safetensors: contents do not match"):
        load_model(broken)


class _Exploit:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_without_being_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ModelFileError, match=r"evil\.safetensors: is a pickle"):
        load_model(evil)
    ckpt = tmp_path / "ckpt.safetensors"
    torch.save({"state": _Exploit(marker)}, ckpt)  # a torch zip archive with a pickle inside
    with pytest.raises(ModelFileError, match=r"ckpt\.safetensors: is a pickle"):
        load_model(ckpt)
    assert not marker.exists()


def test_load_scorer_falls_back_only_where_configured(tmp_path, caplog) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    with caplog.at_level(logging.WARNING):
        assert load_scorer(bad, fallback_to_analytic=True) is None
    assert "bad.safetensors" in caplog.text and "analytic" in caplog.text
    with pytest.raises(ModelFileError, match=r"bad\.safetensors"):
        load_scorer(bad, fallback_to_analytic=False)
    assert load_scorer(None, fallback_to_analytic=True) is None
    with pytest.raises(ModelFileError):
        load_scorer(None, fallback_to_analytic=False)
    good = tmp_path / "good.safetensors"
    write_model(good)
    assert load_scorer(good, fallback_to_analytic=False).version == "test-1"


def test_save_is_atomic_and_writes_the_sidecar(tmp_path) -> None:
    path = tmp_path / "sub" / "m.safetensors"
    write_model(path, version="a")
    first = path.read_bytes()
    write_model(path, version="b", seed=1)
    assert load_model(path).version == "b" and path.read_bytes() != first
    assert sidecar_path(path).read_text().split() == [file_sha256(path), "m.safetensors"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors", "m.safetensors.sha256"]
    with pytest.raises(ValueError, match="model_version"):
        save_model(path, GraspNet(2, 32, 4), (), np.zeros(0), None, {})  # type: ignore[arg-type]


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path) -> None:
    """The first byte is the header length's low byte: 0x80 there is not a pickle opcode."""
    for pad in range(0, 2048, 1):
        path = tmp_path / f"p{pad}.safetensors"
        torch.manual_seed(0)
        net = GraspNet(2, 32, 4)
        wd = Watchdog(np.zeros(64), np.eye(64), 1.0, 1.0, 2.0)
        cal = Calibrator("temperature")
        save_model(path, net, (cal, cal), np.array([0.8, 0.8]), wd, {"model_version": "p", "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        raise AssertionError("no padding gave a header length with low byte 0x80")
    assert load_model(path).version == "p"


def test_one_isotonic_calibrator_pooled_for_both_grippers_is_saved_and_loaded(tmp_path) -> None:
    """With too few rows of its own, each gripper gets the pooled calibrator: the same object twice.
    Its knots became two tensors sharing one buffer, which safetensors refuses to write, and a
    learning round of the continual experiment died with "Some tensors share memory"."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=200)
    iso = fit_isotonic(z, (rng.random(200) < 1 / (1 + np.exp(-z))).astype(float))
    assert iso.method == ISOTONIC
    wd = Watchdog(rng.normal(size=64), np.eye(64) * 0.5, 7.0, 1.5, 2.5, 0.99, 0.3)
    path = tmp_path / "pooled.safetensors"
    save_model(path, GraspNet(2, 32, 4), (iso, iso), np.array([0.8, 0.8]), wd, {"model_version": "pooled"})
    loaded = load_model(path)
    for cal in loaded.calibrators:
        assert cal.method == ISOTONIC
        np.testing.assert_array_equal(cal.iso_x, iso.iso_x)
        np.testing.assert_array_equal(cal.iso_y, iso.iso_y)
