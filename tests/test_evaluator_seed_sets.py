"""The evaluator on several sample files (seed sets): the spread over files, the bootstrap interval
of FID, and ADM's output kept for one file.

The spread is checked against Python's statistics module, the bootstrap against resamples made
by copying rows and against the spread of FID over fresh sample sets from the same distribution,
and the several-file run against one-file runs of each file. The Inception graph is the small
synthetic one of test_evaluator_inception.py.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from adm_common.cli import cli_main
from evaluations import evaluator
from evaluations.feature_statistics import FIDStatistics
from evaluations.seed_sets import bootstrap_fid, summarize
from test_evaluator_inception import _images, synthetic_inception_graph

METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb"
    path.write_bytes(synthetic_inception_graph())
    return path


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """A reference and three sample files of one 'model' (same distribution, other seeds)."""
    folder = tmp_path_factory.mktemp("batches")
    np.savez(folder / "ref.npz", _images(20, 130))
    for seed, count in ((21, 120), (22, 120), (23, 110)):
        np.savez(folder / f"seed{seed}.npz", _images(seed, count) // 2 + 60)
    return folder


def _run(graph, argv, capsys) -> tuple[dict, str]:
    common = ["--backend", "torch", "--inception_path", str(graph), "--device", "cpu", "--batch_size", "32"]
    result = evaluator.main([str(a) for a in argv] + common)
    return result, capsys.readouterr().out


def _frechet(rows, reference: FIDStatistics) -> float:
    rows = np.asarray(rows, dtype=np.float64)
    return FIDStatistics(rows.mean(0), np.cov(rows, rowvar=False)).frechet_distance(reference)


# --- the spread over files ------------------------------------------------------------------------


def test_summary_is_the_mean_std_min_and_max_over_files():
    rng = np.random.default_rng(0)
    per_file = [{key: float(rng.uniform(0, 10)) for key in METRICS} for _ in range(3)]
    summary = summarize(per_file)
    assert list(summary) == list(METRICS)
    for key in METRICS:
        values = [metrics[key] for metrics in per_file]
        assert summary[key]["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert summary[key]["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)  # n - 1
        assert summary[key]["min"] == min(values) and summary[key]["max"] == max(values)


def test_summary_needs_two_files():
    with pytest.raises(ValueError, match="at least 2"):
        summarize([{"fid": 1.0}])


# --- the bootstrap interval of FID ----------------------------------------------------------------

REFERENCE = FIDStatistics(np.zeros(3), np.eye(3))
SAMPLE_MEAN, SAMPLE_VARIANCE = np.array([0.5, 0.0, 0.0]), np.array([1.5, 1.0, 0.7])


def _sample_rows(rng, count: int = 400) -> np.ndarray:
    return (SAMPLE_MEAN + rng.standard_normal((count, 3)) * np.sqrt(SAMPLE_VARIANCE)).astype(np.float32)


def test_bootstrap_is_the_percentiles_of_fid_over_resampled_rows():
    rows = _sample_rows(np.random.default_rng(1), 200)
    got = bootstrap_fid(rows, REFERENCE, 40, seed=7)
    rng = np.random.default_rng(7)  # the documented draws, made here by copying the rows
    fids = [_frechet(rows[rng.integers(0, len(rows), size=len(rows))], REFERENCE) for _ in range(40)]
    low, high = np.percentile(fids, [2.5, 97.5])
    assert got["low"] == pytest.approx(low, rel=1e-9) and got["high"] == pytest.approx(high, rel=1e-9)
    assert got["resamples"] == 40 and got["seed"] == 7 and got["percentiles"] == [2.5, 97.5]


def test_bootstrap_is_seeded_and_covers_the_point_fid_with_the_sampling_spread():
    rng = np.random.default_rng(5)
    rows = _sample_rows(rng)
    point = _frechet(rows, REFERENCE)
    interval = bootstrap_fid(rows, REFERENCE, 300, seed=0)
    assert bootstrap_fid(rows, REFERENCE, 300, seed=0) == interval
    other = bootstrap_fid(rows, REFERENCE, 300, seed=1)
    assert (other["low"], other["high"]) != (interval["low"], interval["high"])
    assert interval["low"] < point < interval["high"]
    # FID of fresh sample sets of the same distribution spreads about as widely as the bootstrap says
    fresh = [_frechet(_sample_rows(rng), REFERENCE) for _ in range(300)]
    low, high = np.percentile(fresh, [2.5, 97.5])
    assert 0.7 < (interval["high"] - interval["low"]) / (high - low) < 1.4


def test_bootstrap_needs_two_resamples():
    with pytest.raises(ValueError, match="at least 2 resamples"):
        bootstrap_fid(_sample_rows(np.random.default_rng(0), 10), REFERENCE, 1)


# --- the command line -----------------------------------------------------------------------------


def test_one_file_gives_adms_output_unchanged(graph, batches, tmp_path, capsys):
    out = tmp_path / "one.json"
    result, printed = _run(graph, [batches / "ref.npz", batches / "seed21.npz", "--json", out], capsys)
    assert json.loads(out.read_text()) == result
    assert list(result) == ["metrics", "reference", "sample", "inception", "batch_size", "distance_dtype"]
    m, ref, sample, graph_record = result["metrics"], result["reference"], result["sample"], result["inception"]
    expected = "\n".join([
        "computing reference batch activations...",
        "computing sample batch activations...",
        "Computing evaluations...",
        f"Inception Score: {m['inception_score']}",
        f"FID: {m['fid']}",
        f"sFID: {m['sfid']}",
        f"Precision: {m['precision']}",
        f"Recall: {m['recall']}",
        "",
        "metric                  value",
        f"Inception Score  {m['inception_score']:>12.4f}",
        f"FID              {m['fid']:>12.4f}",
        f"sFID             {m['sfid']:>12.4f}",
        f"Precision        {m['precision']:>12.4f}",
        f"Recall           {m['recall']:>12.4f}",
        "",
        "batch        images  size     statistics  sha256",
        f"reference       130  16x16    computed    {ref['sha256']}",
        f"sample          120  16x16    computed    {sample['sha256']}",
        f"inception graph sha256 {graph_record['sha256']} (torch backend)",
        "precision/recall distances in float16 (ADM's)",
        f"wrote {out}",
        "",
    ])
    assert printed == expected


def test_seed_sets_report_each_file_and_their_spread(graph, batches, tmp_path, capsys):
    names = ["seed21.npz", "seed22.npz", "seed23.npz"]
    alone = {}
    for name in names[1:]:
        alone[name], _ = _run(graph, [batches / "ref.npz", batches / name, "--bootstrap", "20",
                                      "--bootstrap_seed", "3", "--json", tmp_path / f"{name}.json"], capsys)
    alone[names[0]], _ = _run(graph, [batches / "ref.npz", batches / names[0], "--bootstrap", "20",
                                      "--bootstrap_seed", "3", "--json", tmp_path / "first.json"], capsys)
    result, printed = _run(graph, [batches / "ref.npz", *(batches / n for n in names), "--bootstrap", "20",
                                   "--bootstrap_seed", "3"], capsys)
    written = batches / "seed21.seed_sets.eval.json"
    assert json.loads(written.read_text()) == result
    assert list(result) == ["reference", "samples", "summary", "inception", "batch_size", "distance_dtype"]
    assert printed.count("computing reference batch activations") == 1
    for record, name in zip(result["samples"], names):
        single = alone[name]
        assert record["path"] == str(batches / name) and record["sha256"] == single["sample"]["sha256"]
        assert record["metrics"] == pytest.approx(single["metrics"], rel=1e-9)
        assert record["fid_bootstrap"] == pytest.approx(single["fid_bootstrap"], rel=1e-9)  # the file's alone
        assert record["fid_bootstrap"]["low"] < record["metrics"]["fid"] < record["fid_bootstrap"]["high"]
    for key in METRICS:
        values = [alone[name]["metrics"][key] for name in names]
        spread = result["summary"][key]
        assert spread["mean"] == pytest.approx(statistics.mean(values), rel=1e-9)
        assert spread["std"] == pytest.approx(statistics.stdev(values), rel=1e-6, abs=1e-12)
        assert spread["min"] == pytest.approx(min(values), rel=1e-9)
        assert spread["max"] == pytest.approx(max(values), rel=1e-9)
    fid_row = next(line for line in printed.splitlines() if line.startswith("FID   "))
    assert fid_row.split()[1:] == [f"{v:.4f}" for v in
                                   [r["metrics"]["fid"] for r in result["samples"]] +
                                   [result["summary"]["fid"][c] for c in ("mean", "std", "min", "max")]]
    assert "sample 3        110  16x16" in printed


def _error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: evaluator.main([str(a) for a in argv]))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_seed_set_mistakes_are_one_line_before_inception(batches, tmp_path, capsys):
    no_graph = ["--backend", "torch", "--inception_path", "/nonexistent/graph.pb", "--device", "cpu"]
    ref, first = batches / "ref.npz", batches / "seed21.npz"
    line = _error_line([ref, first, batches / "seed22.npz", first, *no_graph], capsys)
    assert line.startswith("error: sample files") and "give each seed set once" in line
    for value in ("1", "-5"):
        line = _error_line([ref, first, "--bootstrap", value, *no_graph], capsys)
        assert line == f"error: --bootstrap must be 0 (no interval) or at least 2 resamples, got {value}"
    np.savez(tmp_path / "big.npz", _images(0, 10, 24, 24))
    line = _error_line([ref, first, tmp_path / "big.npz", *no_graph], capsys)
    assert f"but the samples 24x24 in {tmp_path / 'big.npz'}" in line
    assert not list(batches.glob("*.eval.json.tmp*"))


def test_a_bootstrap_of_samples_that_store_their_statistics_is_refused(batches, tmp_path, capsys):
    """FID of such a file uses its stored mu and sigma; resampling its images would not."""
    stored = tmp_path / "stored.npz"
    np.savez(stored, _images(21, 120) // 2 + 60, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    no_graph = ["--backend", "torch", "--inception_path", "/nonexistent/graph.pb", "--device", "cpu"]
    line = _error_line([batches / "ref.npz", stored, "--bootstrap", "10", *no_graph], capsys)
    assert line == (f"error: {stored} stores its own FID statistics, which a bootstrap of its images would not "
                    "reproduce; drop --bootstrap or pass the samples without them")
