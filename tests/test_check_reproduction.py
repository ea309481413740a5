"""scripts/check_reproduction.py: a sidecar that deviates from a published cell in one setting gets
that row flagged, and only that row.

The sidecars are real ones (a 4-image run of the shipped digits model; a 2-step EDM run of the
small EDM network in ../shared/reference/edm) with the values of a published cell written over
them, key by key: every key the check reads must already be in the real sidecar.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from guided_diffusion.run import reproduction as rp
from guided_diffusion.run.configs import load_config
from sample_scripts import ROOT, run_in_process, run_script

EDM_NETWORK = Path(__file__).resolve().parents[2] / "shared" / "reference" / "edm" / "edm-ddpmpp-cond-16.pkl"


@pytest.fixture(scope="module")
def adm_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("adm_run")
    run_in_process("image_sample.py", "--config", "digits_uncond", "--num_samples", "4", "--timestep_respacing", "2",
                   "--output_dir", str(out), "--progress", "False")
    return json.loads((out / "samples_4x8x8x3.json").read_text())


@pytest.fixture(scope="module")
def edm_record(tmp_path_factory):
    if not EDM_NETWORK.is_file():
        pytest.skip(f"{EDM_NETWORK} is absent (the shared reference vectors are not checked out)")
    out = tmp_path_factory.mktemp("edm_run")
    run_in_process("edm_sample.py", "--network", str(EDM_NETWORK), "--num_samples", "4", "--num_steps", "2",
                   "--output_dir", str(out), "--progress", "False")
    return json.loads((out / "samples_4x16x16x3.json").read_text())


def _overwrite(record: dict, values: dict) -> dict:
    missing = sorted(set(values) - set(record))
    assert not missing, f"the real sidecar has no {missing}: the check would read keys that no script writes"
    return {**record, **values}


def adm_cell(record, config_name, respacing="100", eps_scale="1.0"):
    """The real ADM sidecar with the flags and sampling settings of the config's published cell."""
    config = load_config(config_name)
    size = config["flags"]["image_size"]
    values = dict(config["flags"], timestep_respacing=respacing, eps_scale=eps_scale, num_samples=50000,
                  image_shape=[size, size, 3], use_ddim=False, clip_denoised=True, config=config["path"])
    values.setdefault("num_classes", 1000)
    sidecar = _overwrite(record, values)
    if config.get("classifier_scale") is not None:  # classifier_sample.py's keys
        sidecar.update(classifier_scale=config["classifier_scale"], classifier_sha256="c" * 64)
    return sidecar


def edm_cell(record, seeds="0-49999", solver="heun", num_steps=18, eps_scale="1.0"):
    values = dict(solver=solver, num_steps=num_steps, network_evaluations=2 * num_steps - 1, num_samples=50000,
                  image_shape=[32, 32, 3], quantization="edm", seeds=seeds, eps_scale=eps_scale,
                  config=load_config("edm_cifar10_32x32_cond_vp")["path"])
    return _overwrite(record, values)


EDM_SEED_SETS = ("0-49999", "50000-99999", "100000-149999")


def write(folder: Path, records, name="samples"):
    paths = []
    for i, record in enumerate(records):
        path = folder / f"{name}{i}.npz"
        record = dict(record, npz=path.name, npz_sha256=f"{i:064d}")
        path.with_suffix(".json").write_text(json.dumps(record))
        paths.append(path)
    return paths


def flagged(report) -> set:
    return {row["setting"] for row in report["rows"] if row["status"] in rp.FAILING}


def row(report, setting) -> dict:
    return next(r for r in report["rows"] if r["setting"] == setting)


def evaluation(sha, reference="VIRTUAL_imagenet64_labeled.npz", backend="tf"):
    return {"metrics": {"fid": 2.7}, "reference": {"path": f"/refs/{reference}", "sha256": "r" * 64},
            "sample": {"path": "/runs/samples0.npz", "sha256": sha}, "inception": {"backend": backend, "sha256": "g" * 64}}


def test_the_papers_cells_all_match(adm_record, tmp_path):
    for config, respacing, eps, cell, fid in [
        ("cifar10_uncond_admes", "100", "1.0", "100", 3.37),  # the paper's numbers (DESIGN.md)
        ("cifar10_uncond_admes", "100", "1.017", "100", 2.17),
        ("lsun_tower64_admes", "20", "linear:k=0.0008,b=1.0034", "20_linear", 7.60),
        ("imagenet128_cond", "50", "1.004", "50", 4.33),
    ]:
        paths = write(tmp_path, [adm_cell(adm_record, config, respacing, eps)], name=f"{config}{cell}")
        report = rp.check(paths)
        assert (report["config"], report["cell"], report["paper_fid"]) == (config, cell, fid)
        assert flagged(report) == set() and report["exit_status"] == 0 and report["note"] == ""
    report = rp.check(paths, eval_path=_json(tmp_path, evaluation(
        "0" * 64, reference="VIRTUAL_imagenet128_labeled.npz")))
    assert report["exit_status"] == 0 and row(report, "reference batch")["status"] == rp.MATCH
    assert row(report, "checkpoint")["status"] == rp.NOT_RECORDED  # no verified sha256: reported, no failure


def _json(folder, value, name="eval.json"):
    path = folder / name
    path.write_text(json.dumps(value))
    return path


ADM_DEVIATIONS = [
    # (setting, config, what the run did differently)
    ("model flags", "cifar10_uncond_admes", dict(use_new_attention_order=False)),  # loads, computes otherwise
    ("model flags", "imagenet128_cond", dict(num_heads=1)),  # num_head_channels -1: the head count matters
    ("diffusion flags", "cifar10_uncond_admes", dict(noise_schedule="linear")),
    ("diffusion flags", "cifar10_uncond_admes", dict(rescale_timesteps=True)),
    ("sampler", "cifar10_uncond_admes", dict(use_ddim=True)),
    ("sampler", "cifar10_uncond_admes", dict(do_time_shift=True, window=80, cutoff=300)),
    ("steps", "cifar10_uncond_admes", dict(timestep_respacing="1000")),
    ("steps", "cifar10_uncond_admes", dict(timestep_respacing="ddim100")),
    ("lambda", "cifar10_uncond_admes", dict(eps_scale="1.01")),
    ("classifier scale", "imagenet128_cond", dict(classifier_scale=1.0)),
    ("clip_denoised", "cifar10_uncond_admes", dict(clip_denoised=False)),
    ("images", "cifar10_uncond_admes", dict(num_samples=2000)),
    ("labels", "imagenet64_cond", dict(num_classes=10)),
    ("quantization", "cifar10_uncond_admes", dict(quantization="edm")),
    ("image size", "imagenet64_cond", dict(image_shape=[128, 128, 3])),
]


@pytest.mark.parametrize("setting,config,change", ADM_DEVIATIONS, ids=[f"{s}-{c}" for s, c, _ in ADM_DEVIATIONS])
def test_an_adm_deviation_flags_exactly_its_row(adm_record, tmp_path, setting, config, change):
    sidecar = {**adm_cell(adm_record, config), **change}
    report = rp.check(write(tmp_path, [sidecar]))
    assert flagged(report) == {setting}, report["rows"]
    assert report["exit_status"] == 1 and report["cell"] == "100"


def test_the_steps_row_names_the_papers_fid_at_each_step_count(adm_record, tmp_path):
    report = rp.check(write(tmp_path, [dict(adm_cell(adm_record, "cifar10_uncond_admes"), timestep_respacing="250")]))
    steps = row(report, "steps")
    assert steps["run"] == "250 (--timestep_respacing '250')" and steps["paper"].startswith("100 ")
    assert steps["effect"].endswith("100 / 50 / 20: 3.37 / 4.43 / 10.36")  # the ES paper's CIFAR-10 baselines
    assert "no cell 250" in report["note"]


def test_a_guided_run_of_an_unguided_cell_differs_in_scale_and_labels(adm_record, tmp_path):
    sidecar = dict(adm_cell(adm_record, "imagenet64_cond"), classifier_scale=1.0, classifier_sha256="c" * 64)
    assert flagged(rp.check(write(tmp_path, [sidecar]))) == {"classifier scale"}
    unconditional = dict(adm_cell(adm_record, "cifar10_uncond_admes"), classifier_scale=1.0, classifier_sha256="c" * 64)
    # an unconditional model guided by a classifier draws labels for it: two settings moved
    assert flagged(rp.check(write(tmp_path, [unconditional]))) == {"classifier scale", "labels"}


@pytest.mark.parametrize("key,setting", [("clip_denoised", "clip_denoised"), ("model_sha256", "checkpoint"),
                                         ("noise_schedule", "diffusion flags"), ("eps_scale", "lambda")])
def test_a_setting_missing_from_the_sidecar_fails_its_row(adm_record, tmp_path, key, setting):
    sidecar = adm_cell(adm_record, "cifar10_uncond_admes")
    del sidecar[key]
    report = rp.check(write(tmp_path, [sidecar]))
    assert row(report, setting)["status"] == rp.MISSING and report["exit_status"] == 1
    assert flagged(report) == {setting}


def test_a_recorded_checkpoint_sha256_is_compared(adm_record, tmp_path):
    text = load_config("cifar10_uncond_admes")["path"]
    config = tmp_path / "cifar10_uncond_admes.yaml"
    sidecar = adm_cell(adm_record, "cifar10_uncond_admes")
    for sha, status in ((sidecar["model_sha256"], rp.MATCH), ("f" * 64, rp.DIFFERS)):
        config.write_text(Path(text).read_text().replace("checkpoint_sha256: null", f"checkpoint_sha256: {sha}"))
        report = rp.check(write(tmp_path, [sidecar]), config_name=str(config))
        assert row(report, "checkpoint")["status"] == status
        assert flagged(report) == ({"checkpoint"} if status == rp.DIFFERS else set())


@pytest.mark.parametrize("setting,changes", [
    ("reference batch", dict(reference="cifar10_train.npz")),
    ("evaluator", dict(backend="torch")),
])
def test_an_evaluation_deviation_flags_exactly_its_row(adm_record, tmp_path, setting, changes):
    paths = write(tmp_path, [adm_cell(adm_record, "imagenet64_cond")])
    report = rp.check(paths, eval_path=_json(tmp_path, evaluation("0" * 64, **changes)))
    assert flagged(report) == {setting}


def test_without_eval_the_scoring_rows_are_not_checked(adm_record, tmp_path):
    report = rp.check(write(tmp_path, [adm_cell(adm_record, "imagenet64_cond")]))
    assert {row(report, s)["status"] for s in ("reference batch", "evaluator")} == {rp.NOT_CHECKED}
    assert report["exit_status"] == 0


def test_adm_cells_are_one_seed_set(adm_record, tmp_path):
    base = adm_cell(adm_record, "cifar10_uncond_admes")
    report = rp.check(write(tmp_path, [base, dict(base, seed=1)]))
    assert flagged(report) == {"seed sets"} and row(report, "seed sets")["run"].startswith("2 ")


def test_edm_three_seed_sets_match(edm_record, tmp_path):
    paths = write(tmp_path, [edm_cell(edm_record, seeds) for seeds in EDM_SEED_SETS])
    report = rp.check(paths)
    assert (report["cell"], report["variant"], report["paper_fid"]) == ("heun_18", "baseline", 1.82)
    assert flagged(report) == set() and report["exit_status"] == 0
    es = write(tmp_path, [edm_cell(edm_record, s, solver="euler", num_steps=13, eps_scale="1.0051")
                          for s in EDM_SEED_SETS], name="es")
    report = rp.check(es)
    assert (report["cell"], report["paper_fid"]) == ("euler_13", 6.59) and flagged(report) == set()


EDM_DEVIATIONS = [
    ("sampler", dict(solver="euler")),  # no euler cell at 18 steps: compared with heun_18
    ("steps", dict(num_steps=35)),
    ("lambda", dict(eps_scale="1.0005")),  # the uncond network's lambda on the cond cell (1.0006)
    ("diffusion flags", dict(S_churn=40.0)),
    ("diffusion flags", dict(discretization="vp")),
    ("quantization", dict(quantization="adm")),
    ("images", dict(num_samples=10000)),
    ("labels", dict(class_idx=3)),
    ("image size", dict(image_shape=[64, 64, 3])),
]


@pytest.mark.parametrize("setting,change", EDM_DEVIATIONS, ids=[f"{s}-{list(c)[0]}" for s, c in EDM_DEVIATIONS])
def test_an_edm_deviation_flags_exactly_its_row(edm_record, tmp_path, setting, change):
    records = [{**edm_cell(edm_record, seeds), **change} for seeds in EDM_SEED_SETS]
    report = rp.check(write(tmp_path, records))
    assert flagged(report) == {setting}, report["rows"]


def test_edm_seed_sets_must_be_three_distinct_ones(edm_record, tmp_path):
    one = rp.check(write(tmp_path, [edm_cell(edm_record)]))
    assert flagged(one) == {"seed sets"} and row(one, "seed sets")["paper"] == "3, minimum FID"
    twice = rp.check(write(tmp_path, [edm_cell(edm_record, s) for s in ("0-49999", "0-49999", "50000-99999")]))
    assert flagged(twice) == {"seed sets"} and "the same seeds twice" in row(twice, "seed sets")["run"]


def test_seed_sets_made_with_different_settings_are_shown_per_file(edm_record, tmp_path):
    records = [edm_cell(edm_record, s) for s in EDM_SEED_SETS]
    records[1]["quantization"] = "adm"
    report = rp.check(write(tmp_path, records))
    assert flagged(report) == {"quantization"}
    assert row(report, "quantization")["run"] == "files differ: edm | adm | edm"


def test_published_cells_resolve_to_the_papers_lambda_and_fid():
    # ES paper (DESIGN.md): ADM 20-step linear schedules and FIDs, EDM Euler 13 steps.
    expected = {("cifar10_uncond_admes", "20_linear"): ("linear:k=0.0025,b=1.0", 4.31),
                ("ffhq128_admes", "50"): ("1.007", 9.50),
                ("imagenet64_cond", "100"): ("1.006", 2.39),
                ("edm_cifar10_32x32_uncond_vp", "euler_13"): ("1.0048", 8.39),
                ("edm_cifar10_32x32_cond_vp", "heun_11"): ("0.9983", 2.08)}
    from guided_diffusion.eps_scaling import parse_eps_scale

    for (name, key), (lam, fid) in expected.items():
        config = rp.load_protocol_config(name)
        cell = rp.Cell(key, "es", {**config["protocol"], **config["protocol"]["cells"][key]})
        assert rp.paper_eps_scale(config, cell) == parse_eps_scale(lam)
        assert rp._paper_fid(config, key, cell.spec, "es") == fid
    for path in sorted((ROOT / "guided_diffusion" / "configs").glob("*.yaml")):
        config = load_config(str(path))
        if "protocol" not in config:
            continue
        for key, spec in config["protocol"]["cells"].items():  # every cell has both published numbers
            cell = rp.Cell(str(key), "es", {**config["protocol"], **spec})
            assert not rp.paper_eps_scale(config, cell).is_identity
            assert rp._paper_fid(config, str(key), cell.spec, "es") is not None


def _cli(*argv):
    """scripts/check_reproduction.py ARGV in this process: its exit status, and its stdout and stderr as .out, .err."""
    r = run_in_process("check_reproduction.py", *map(str, argv), check=False)
    return r.returncode, SimpleNamespace(out=r.stdout, err=r.stderr)


def test_user_errors_are_one_line_with_status_2(adm_record, tmp_path):
    code, out = _cli(tmp_path / "none.npz")
    assert code == 2 and out.err.splitlines() == [
        f"error: {tmp_path / 'none.json'} does not exist: the sampling scripts write it beside the samples; "
        "give the NPZ (or the folder) they wrote"]
    damaged = tmp_path / "damaged.npz"
    damaged.with_suffix(".json").write_text('{"num_samples": 5')
    code, out = _cli(damaged)
    assert code == 2 and len(out.err.splitlines()) == 1 and "is damaged (not valid JSON" in out.err
    [path] = write(tmp_path, [adm_cell(adm_record, "cifar10_uncond_admes")])
    code, out = _cli(path, "--config", "digits_uncond")
    assert code == 2 and out.err.startswith("error: config digits_uncond records no published protocol; configs "
                                            "with one: cifar10_uncond_admes,") and len(out.err.splitlines()) == 1
    code, out = _cli(path, "--eval", _json(tmp_path, evaluation("9" * 64)))
    assert code == 2 and "scored other samples" in out.err and len(out.err.splitlines()) == 1
    code, out = _cli(path, "--cell", "37")
    assert code == 2 and out.err.splitlines() == [
        "error: --cell 37: cifar10_uncond_admes has the cells 100, 50, 20, 20_linear"]


def test_the_table_and_the_exit_status(adm_record, tmp_path):
    good, = write(tmp_path, [adm_cell(adm_record, "cifar10_uncond_admes")], name="good")
    code, out = _cli(good, "--json", tmp_path / "out.json")
    lines = out.out.splitlines()
    assert code == 0 and lines[0] == "cifar10_uncond_admes, cell 100 (baseline; the paper's FID: 3.37)"
    assert lines[1].split()[:2] == ["setting", "this"] and lines[-1] == "every compared setting matches the paper's protocol"
    assert len(lines) == 3 + len(json.loads((tmp_path / "out.json").read_text())["rows"])


def test_the_script_exits_1_when_a_setting_differs(adm_record, tmp_path):
    bad, = write(tmp_path, [dict(adm_cell(adm_record, "cifar10_uncond_admes"), num_samples=2000)], name="bad")
    proc = run_script("check_reproduction.py", str(bad), check=False)  # the one child process: as the user runs it
    assert proc.returncode == 1 and proc.stdout.splitlines()[-1] == "differs from the paper's protocol: images"
    images = next(line for line in proc.stdout.splitlines() if line.startswith("images "))
    assert images.split()[1:4] == ["2000", "50000", "DIFFERS"]
