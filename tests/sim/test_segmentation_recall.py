"""benchmarks/segmentation_recall.py's scoring on hand-built grids whose right answers are known."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "segmentation_recall.py"
_spec = importlib.util.spec_from_file_location("segmentation_recall", _PATH)
seg_recall = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seg_recall)


def _cloud(labels: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(labels=labels, valid=np.ones(labels.shape, bool), n_clusters=int(labels.max()) + 1)


def test_found_fragmented_missed_and_merged_items_are_counted_per_family():
    truth = np.full((6, 12), -1)
    truth[0:2, 0:4] = 10  # a bottle cut in two by the segmenter
    truth[3:5, 0:3] = 11  # a small part it never labels
    truth[0:2, 6:9] = 12  # a carton and ...
    truth[0:2, 9:11] = 13  # ... a mailer it takes for one item
    truth[4, 8] = 14  # a tube that shows one cell only: not visible
    labels = np.full(truth.shape, -1)
    labels[0:2, 0:2] = 0
    labels[0:2, 2:4] = 1
    labels[0:2, 6:11] = 2
    families = {10: "bottle", 11: "small_part", 12: "carton", 13: "mailer", 14: "tube"}
    res = seg_recall.score_frame(_cloud(labels), truth, families, min_cells=4)
    fam = res["families"]
    assert fam["bottle"] == {"visible": 1, "found": 1, "fragmented": 1}
    assert fam["small_part"] == {"visible": 1}  # visible, never found
    assert fam["carton"] == {"visible": 1, "found": 1}  # the merged cluster's majority
    assert fam["mailer"] == {"visible": 1}  # the minority of a merged cluster is not found
    assert "tube" not in fam
    assert res["merged"] == 1 and res["clusters"] == 3
    assert seg_recall._rates(fam["bottle"])["fragmented_share"] == 1.0
