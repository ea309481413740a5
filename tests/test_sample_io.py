"""Per-image seeds, quantization and the sharded, resumable NPZ writer."""

import json
import shutil

import numpy as np
import pytest
import torch

from guided_diffusion import image_noise
from guided_diffusion.run.batching import AlignedNetwork
from guided_diffusion.image_noise import ImageNoise, image_labels
from guided_diffusion.run.output import SampleRun, quantize, run_sampling


def test_image_noise_rows_do_not_depend_on_batch_composition():
    a = ImageNoise(7, [0, 1, 2, 3]).randn((4, 3, 2, 2))
    b = ImageNoise(7, [2, 3]).randn((2, 3, 2, 2))
    c = ImageNoise(7, [3]).randn((1, 3, 2, 2))
    assert torch.equal(a[2:], b)
    assert torch.equal(a[3:], c)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, ImageNoise(8, [0, 1, 2, 3]).randn((4, 3, 2, 2)))


def test_successive_draws_advance_each_stream():
    noise = ImageNoise(0, [5])
    first, second = noise.randn((1, 4)), noise.randn((1, 4))
    gen = image_noise.image_generator(0, 5)
    assert torch.equal(first[0], torch.randn(4, generator=gen))
    assert torch.equal(second[0], torch.randn(4, generator=gen))


def test_noise_batch_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="batch 3"):
        ImageNoise(0, [0, 1]).randn((3, 2))


def test_labels_are_per_image_and_in_range():
    labels = image_labels(3, range(200), 10)
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < 10
    assert torch.equal(labels[50:60], image_labels(3, range(50, 60), 10))
    assert len(set(labels.tolist())) == 10


def test_quantize_matches_adm_formula_on_known_values():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = quantize(x)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    # (x + 1) * 127.5, clamped to [0, 255], truncated toward zero by the uint8 cast
    assert out[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]


def _fake_sampler(seed, shape=(3, 4, 4), num_classes=5):
    def sample_batch(indices):
        images = ImageNoise(seed, indices).randn((len(indices), *shape)).clamp(-1, 1)
        return images, image_labels(seed, indices, num_classes)
    return sample_batch


def _run(tmp_path, name, num, batch, settings=None, sampler=None, **kw):
    run = SampleRun(tmp_path / name, settings or {"seed": 1}, num, batch, (4, 4, 3), True, **kw)
    return run, run_sampling(run, sampler or _fake_sampler(1), {"note": "test"}, progress=False)


def test_final_npz_is_adm_format_and_independent_of_batch_size(tmp_path):
    _, p4 = _run(tmp_path, "b4", 11, 4)
    _, p7 = _run(tmp_path, "b7", 11, 7)
    assert p4.name == "samples_11x4x4x3.npz"
    assert p4.read_bytes() == p7.read_bytes()
    data = np.load(p4)
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (11, 4, 4, 3)
    assert data["arr_1"].dtype == np.int64
    expected = quantize(ImageNoise(1, range(11)).randn((11, 3, 4, 4)).clamp(-1, 1))
    assert np.array_equal(data["arr_0"], expected)
    sidecar = json.loads(p4.with_suffix(".json").read_text())
    assert sidecar["num_samples"] == 11 and sidecar["note"] == "test"
    assert "torch_version" in sidecar and sidecar["world_size"] == 1
    assert not list((tmp_path / "b4" / "shards").glob("shard-*"))


def test_resume_after_interruption_gives_identical_npz(tmp_path):
    _, reference = _run(tmp_path, "full", 10, 3)
    calls = []
    base = _fake_sampler(1)

    def dying(indices):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two shards
        calls.append(indices)
        return base(indices)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "resumed", 10, 3, sampler=dying)
    shard_dir = tmp_path / "resumed" / "shards"
    assert len(list(shard_dir.glob("shard-*.npz"))) == 2
    (shard_dir / "shard-00000009-00000009.npz.tmp123").write_bytes(b"half a file")
    resumed_calls = []

    def counting(indices):
        resumed_calls.append(list(indices))
        return base(indices)

    _, path = _run(tmp_path, "resumed", 10, 4, sampler=counting)  # a different batch size is fine
    assert resumed_calls == [[6, 7, 8, 9]]
    assert path.read_bytes() == reference.read_bytes()
    assert not list(shard_dir.glob("*.tmp*"))


def _dies_after(count: int):
    """A sampler that makes ``count`` batches, then is killed."""
    calls, base = [], _fake_sampler(1)

    def sampler(indices):
        if len(calls) == count:
            raise KeyboardInterrupt
        calls.append(indices)
        return base(indices)

    return sampler


def test_shards_from_other_settings_are_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "x", 6, 2, sampler=_dies_after(1))
    with pytest.raises(ValueError, match="other settings.*seed"):
        _run(tmp_path, "x", 6, 2, settings={"seed": 2})


def test_settings_that_made_no_image_do_not_hold_the_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # e.g. out of memory in the first batch
        _run(tmp_path, "x", 6, 2, sampler=_dies_after(0))
    _, path = _run(tmp_path, "x", 6, 2, settings={"seed": 2})
    assert json.loads((tmp_path / "x" / "shards" / "run.json").read_text())["seed"] == 2
    assert json.loads(path.with_suffix(".json").read_text())["run_identity"]["seed"] == 2


def test_a_finished_npz_from_other_settings_is_refused_without_its_shards(tmp_path):
    _, path = _run(tmp_path, "done", 5, 2)
    before = path.read_bytes()
    shutil.rmtree(tmp_path / "done" / "shards")  # what the refusal used to tell the user to delete
    with pytest.raises(ValueError, match=r"other settings \(differing: seed\).*samples_5x4x4x3.npz with its .json"):
        _run(tmp_path, "done", 5, 2, settings={"seed": 2}, sampler=lambda idx: pytest.fail("sampled"))
    assert path.read_bytes() == before
    _, again = _run(tmp_path, "done", 5, 2, sampler=lambda idx: pytest.fail("resampled a finished run"))
    assert again.read_bytes() == before


def test_completed_run_is_not_redone(tmp_path):
    _, first = _run(tmp_path, "done", 5, 2)
    before = first.read_bytes()
    _, again = _run(tmp_path, "done", 5, 2, sampler=lambda idx: pytest.fail("resampled a finished run"))
    assert again.read_bytes() == before


def test_two_ranks_split_batches_without_overlap(tmp_path):
    runs = [SampleRun(tmp_path, {"seed": 0}, 9, 2, (4, 4, 3), False, rank=r, world_size=2) for r in range(2)]
    runs[0].prepare()
    batches = runs[0].pending_batches()
    mine = [runs[r].my_batches(batches) for r in range(2)]
    flat = sorted(i for part in mine for b in part for i in b)
    assert flat == list(range(9))
    assert not set(i for b in mine[0] for i in b) & set(i for b in mine[1] for i in b)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        SampleRun(tmp_path, {}, 0, 4, (4, 4, 3), False)
    run = SampleRun(tmp_path, {}, 4, 4, (4, 4, 3), False)
    run.prepare()
    with pytest.raises(ValueError, match="uint8"):
        run.write_shard([0, 1], np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="consecutive"):
        run.write_shard([0, 2], np.zeros((2, 4, 4, 3), dtype=np.uint8))
    assert not list((tmp_path / "shards").glob("shard-*"))


def test_unwritable_output_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = SampleRun(blocker / "out", {}, 2, 2, (4, 4, 3), False)
    with pytest.raises(PermissionError, match="cannot write to output folder"):
        run.prepare()


def test_aligned_network_places_images_in_fixed_slots():
    calls = []

    def model(x, t, y=None):
        calls.append((x.shape[0], x[:, 0].tolist()))
        return x * t.view(-1, 1).float() + y.view(-1, 1).float()

    x = torch.arange(10.0).view(5, 2)
    out = AlignedNetwork(model, [6, 7, 8, 9, 10], 4)(x, torch.arange(5), y=torch.arange(5))
    assert torch.equal(out, x * torch.arange(5.0).view(-1, 1) + torch.arange(5.0).view(-1, 1))
    # images 6, 7 sit in slots 2, 3 of chunk 1; images 8-10 in slots 0-2 of chunk 2; free slots
    # repeat the chunk's first image
    assert calls == [(4, [0.0, 0.0, 0.0, 2.0]), (4, [4.0, 6.0, 8.0, 4.0])]


def test_aligned_network_makes_outputs_independent_of_the_batch_split():
    from guided_diffusion.digits.demo import load_shipped

    model, _ = load_shipped("digits_uncond")
    x = ImageNoise(0, range(16)).randn((16, 3, 8, 8))
    t = torch.full((16,), 500)
    with torch.no_grad():
        whole = AlignedNetwork(model, range(16), 16)(x, t)
        split = torch.cat([AlignedNetwork(model, range(0, 7), 16)(x[:7], t[:7]),
                           AlignedNetwork(model, range(7, 16), 16)(x[7:], t[7:])])
        plain = model(x, t)
    assert torch.equal(whole, split)
    assert torch.allclose(whole, plain, atol=1e-5)


def test_aligned_network_refuses_a_wrong_batch():
    with pytest.raises(ValueError, match="network_batch_size"):
        AlignedNetwork(lambda x, t: x, [0], 0)
    with pytest.raises(ValueError, match="3 images but the batch holds 2"):
        AlignedNetwork(lambda x, t: x, [0, 1], 4)(torch.zeros(3, 1), torch.zeros(3))
