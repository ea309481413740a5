"""ADM's own numbers: with either backend, the evaluator gives what ADM's evaluations/evaluator.py
printed for the shared evaluator fixture (../shared/reference/evaluator/, README there).

ten numbers: Inception Score, FID, sFID, precision and recall of `near` and of `far` against `ref`,
to 1e-3 (relative for IS, FID and sFID; absolute for precision and recall). Precision and recall
are within one image of ADM's only with ADM's float16 distances; the graph is a small synthetic one,
so its numbers say nothing about image quality, only about the arithmetic.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

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


@pytest.fixture(scope="session")
def adm_numbers():
    return load_reference("evaluator/adm_numbers.json")["results"]


def _backend_metrics(model, sample_sets) -> dict:
    """Our five metrics for each sample set against ref, the reference activations computed once."""
    reference, _ = read_batch(FIXTURE / "ref.npz", model, 64, "reference")
    samples = {name: read_batch(FIXTURE / f"{name}.npz", model, 64, name)[0] for name in sample_sets}
    return {name: compute_metrics(reference, sample, model.softmax_weights) for name, sample in samples.items()}


@pytest.fixture(scope="session")
def adm_fixture_metrics(adm_numbers):
    """{backend: {sample set: metrics}}, each backend's activations and metrics computed once a session.

    The two backends run at once, in two threads: nearly all the time goes to SciPy's matrix square
    roots (four of 2048 x 2048 per backend) and to the Inception forward passes, all of which release
    the GIL, so a second core halves the wall time. A backend that cannot run maps to the reason.
    """
    for name in ("classify_image_graph_def.pb", "ref.npz", *(f"{s}.npz" for s in adm_numbers)):
        if not (FIXTURE / name).is_file():
            pytest.skip(f"evaluator fixture {FIXTURE / name} not found (it lives in ../shared/reference/evaluator)")
    models = {"torch": create_inception("torch", FIXTURE / "classify_image_graph_def.pb", device="cpu")}
    if HAVE_TF:  # TensorFlow is imported here, in the main thread
        models["tf"] = create_inception("tf", FIXTURE / "classify_image_graph_def.pb")
    try:
        with ThreadPoolExecutor(max_workers=len(models)) as pool:
            futures = {backend: pool.submit(_backend_metrics, model, list(adm_numbers))
                       for backend, model in models.items()}
            results = {backend: future.result() for backend, future in futures.items()}
    finally:
        for model in models.values():
            model.close()
    if not HAVE_TF:
        results["tf"] = "TensorFlow is not installed (pip install tensorflow-cpu)"
    return results


@pytest.fixture(params=["tf", "torch"])
def ours(request, adm_fixture_metrics):
    results = adm_fixture_metrics[request.param]
    if isinstance(results, str):
        pytest.skip(results)
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
