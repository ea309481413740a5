"""ADM's own numbers: with either backend, the evaluator gives what ADM's evaluations/evaluator.py
printed for the shared evaluator fixture (../shared/reference/evaluator/, README there).

ten numbers: Inception Score, FID, sFID, precision and recall of `near` and of `far` against `ref`,
to 1e-3 (relative for IS, FID and sFID; absolute for precision and recall). Precision and recall
are within one image of ADM's only with ADM's float16 distances; the graph is a small synthetic one,
so its numbers say nothing about image quality, only about the arithmetic.
"""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REFERENCE_DIR, load_reference
from evaluations.evaluator import compute_metrics, read_batch
from evaluations.inception import create_inception

FIXTURE = REFERENCE_DIR / "evaluator"
METRICS = {  # ADM's printed name -> ours
    "Inception Score": "inception_score",
    "FID": "fid",
    "sFID": "sfid",
    "Precision": "precision",
    "Recall": "recall",
}
RELATIVE = ("Inception Score", "FID", "sFID")
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(scope="module")
def adm_numbers():
    return load_reference("evaluator/adm_numbers.json")["results"]


@pytest.fixture(scope="module", params=["tf", "torch"])
def ours(request, adm_numbers):
    """Our metrics for each sample set of the fixture, reference activations computed once per backend."""
    if request.param == "tf" and not HAVE_TF:
        pytest.skip("TensorFlow is not installed (pip install tensorflow-cpu)")
    for name in ("classify_image_graph_def.pb", "ref.npz", *(f"{s}.npz" for s in adm_numbers)):
        if not (FIXTURE / name).is_file():
            pytest.skip(f"evaluator fixture {FIXTURE / name} not found (it lives in ../shared/reference/evaluator)")
    model = create_inception(request.param, FIXTURE / "classify_image_graph_def.pb", device="cpu")
    try:
        reference, _ = read_batch(FIXTURE / "ref.npz", model, 64, "reference")
        results = {}
        for sample_set in adm_numbers:
            sample, _ = read_batch(FIXTURE / f"{sample_set}.npz", model, 64, sample_set)
            results[sample_set] = compute_metrics(reference, sample, model.softmax_weights)
    finally:
        model.close()
    return request.param, results


@pytest.mark.parametrize("sample_set", ["near", "far"])
def test_evaluator_gives_adms_numbers(ours, adm_numbers, sample_set):
    backend, results = ours
    expected = adm_numbers[sample_set]
    assert set(expected) == set(METRICS)
    for adm_name, key in METRICS.items():
        got, want = results[sample_set][key], expected[adm_name]
        if adm_name in RELATIVE:
            assert got == pytest.approx(want, rel=1e-3), f"{backend} {sample_set} {adm_name}"
        else:
            assert got == pytest.approx(want, abs=1e-3), f"{backend} {sample_set} {adm_name}"
