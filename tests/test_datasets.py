"""Training data: the built-in digits against scikit-learn, ADM's image folders, crops, resumable order."""

import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import dist_util, image_datasets
from guided_diffusion.digits.data import DigitsDataset, digits_arrays, parse_digits_spec
from guided_diffusion.image_datasets import ImageDataset, center_crop_arr, load_data, load_superres_data, random_crop_arr

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def sk_digits():
    bunch = sklearn_datasets.load_digits()
    return bunch.images, bunch.target


def _take(data, n):
    return list(itertools.islice(data, n))


# -- digits ---------------------------------------------------------------------------------------


def test_digits_batches_match_sklearn(sk_digits):
    images, target = sk_digits
    data = load_data(data_dir="digits", batch_size=100, image_size=8, class_cond=True, deterministic=True, seed=0)
    batches = _take(data, 3)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1]["y"] for b in batches])
    assert x.shape == (300, 3, 8, 8) and x.dtype == torch.float32
    expected = images[:300] / 8.0 - 1.0  # 0..16 -> -1..1
    for c in range(3):
        np.testing.assert_allclose(x[:, c].numpy(), expected, rtol=0, atol=1e-6)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), target[:300])
    assert x.min() == -1.0 and x.max() == 1.0


def test_digits_unconditional_has_no_labels():
    x, cond = next(load_data(data_dir="digits", batch_size=4, image_size=8, seed=0))
    assert cond == {} and x.shape == (4, 3, 8, 8)


def test_upscaled_digits_match_pil_bilinear(sk_digits):
    images, _ = sk_digits
    up, labels = digits_arrays(16)
    assert up.shape == (1797, 3, 16, 16) and len(labels) == 1797
    for i in (0, 5, 1796):
        gray = Image.fromarray((images[i] / 8.0 - 1.0).astype(np.float32), mode="F")
        ref = np.asarray(gray.resize((16, 16), resample=Image.BILINEAR))
        np.testing.assert_allclose(up[i, 0].numpy(), ref, atol=1e-5)
        assert torch.equal(up[i, 0], up[i, 2])


def test_digits_size_is_checked():
    assert parse_digits_spec("digits") == 8 and parse_digits_spec("digits:32") == 32
    with pytest.raises(ValueError, match="digits:16"):
        parse_digits_spec("digits:sixteen")
    with pytest.raises(ValueError, match="smaller than the native"):
        parse_digits_spec("digits:4")
    with pytest.raises(ValueError, match="use --data_dir digits:16"):
        load_data(data_dir="digits:32", batch_size=4, image_size=16)
    with pytest.raises(ValueError, match="use --data_dir digits$"):
        load_data(data_dir="digits:16", batch_size=4, image_size=8)


def test_digits_flip_mirrors_some_images():
    plain = DigitsDataset(8)
    flipping = DigitsDataset(8, random_flip=True)
    flipped = 0
    for i in range(40):
        out, _ = flipping[(i, 1000 + i)]
        if torch.equal(out, plain[i][0].flip(-1)) and not torch.equal(out, plain[i][0]):
            flipped += 1
        else:
            assert torch.equal(out, plain[i][0])
    assert 5 < flipped < 35
    # the same augmentation seed gives the same choice
    assert all(torch.equal(flipping[(i, 7)][0], flipping[(i, 7)][0]) for i in range(10))


def test_digits_are_sharded_by_rank(monkeypatch, sk_digits):
    images, target = sk_digits
    monkeypatch.setattr(dist_util, "get_rank", lambda: 1)
    monkeypatch.setattr(dist_util, "get_world_size", lambda: 3)
    x, cond = next(load_data(data_dir="digits", batch_size=50, image_size=8, class_cond=True, deterministic=True))
    np.testing.assert_allclose(x[:, 0].numpy(), images[1::3][:50] / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(cond["y"].numpy(), target[1::3][:50])


# -- resumable order ------------------------------------------------------------------------------


def test_batches_resume_at_any_index_across_epochs():
    kwargs = dict(data_dir="digits", batch_size=400, image_size=8, class_cond=True, seed=3)  # 4 batches/epoch
    full = _take(load_data(**kwargs), 10)
    resumed = _take(load_data(**kwargs, start_batch=6), 4)
    for a, b in zip(full[6:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["y"], b[1]["y"])
    # the next epoch is ordered differently, and so is another seed
    assert not torch.equal(full[0][0], full[4][0])
    other_seed = next(load_data(**{**kwargs, "seed": 4}))
    assert not torch.equal(full[0][0], other_seed[0])


def test_epoch_is_a_permutation():
    sampler = image_datasets.ResumableBatchSampler(10, 3, shuffle=True, seed=0)
    batches = _take(iter(sampler), 6)  # 3 batches per epoch, the 10th item dropped
    for epoch in (batches[:3], batches[3:]):
        indices = [i for batch in epoch for i, _ in batch]
        assert len(set(indices)) == 9 and set(indices) <= set(range(10))
    deterministic = _take(iter(image_datasets.ResumableBatchSampler(10, 3, shuffle=False, seed=0)), 4)
    assert [i for i, _ in deterministic[0]] == [0, 1, 2] and [i for i, _ in deterministic[3]] == [0, 1, 2]


# -- image folders --------------------------------------------------------------------------------


def _write_png(path, value, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_folder_labels_come_from_file_name_prefix(tmp_path):
    # value encodes the file; labels are the sorted prefixes: n01 -> 0, n02 -> 1, zebra -> 2
    files = {"b/n02_7.png": 20, "a/n01_1.png": 40, "n01_2.PNG": 60, "a/zebra_x_3.png": 80, "c/n02_9.gif": 100}
    for name, value in files.items():
        _write_png(tmp_path / name, value)
    (tmp_path / "notes.txt").write_text("not an image")
    x, cond = next(load_data(data_dir=str(tmp_path), batch_size=5, image_size=8, class_cond=True, deterministic=True))
    label_of = {"n01": 0, "n02": 1, "zebra": 2}
    seen = {}
    for image, label in zip(x, cond["y"].tolist()):
        value = round((float(image.mean()) + 1) * 127.5)
        seen[value] = label
    expected = {v: label_of[name.split("/")[-1].split("_")[0]] for name, v in files.items()}
    assert seen == expected


def test_folder_files_are_sharded_and_sorted(tmp_path):
    for i in range(6):
        _write_png(tmp_path / f"c{i % 2}_{i}.png", 10 * i)
    paths = image_datasets.list_image_files_recursively(str(tmp_path))
    names = [p.rsplit("/", 1)[1] for p in paths]
    assert names == ["c0_0.png", "c0_2.png", "c0_4.png", "c1_1.png", "c1_3.png", "c1_5.png"]
    shard = ImageDataset(8, paths, classes=[0, 0, 0, 1, 1, 1], shard=1, num_shards=2, random_flip=False)
    assert shard.local_images == paths[1::2] and shard.local_classes == [0, 1, 1]
    arr, out = shard[0]
    assert arr.shape == (3, 8, 8) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, 20 / 127.5 - 1, atol=1e-6)
    assert out["y"] == 0


def test_files_are_listed_in_adms_order(tmp_path):
    # ADM walks each folder's entries in sorted name order and lists a sub-folder where its name
    # sorts, so "b/" comes before "b.png" ("b" < "b.png"); extensions in any case, others skipped
    for rel in ["b.png", "b/c.png", "b/a/z.JPEG", "a.gif", "B.Jpg", "c/d.jpeg"]:
        _write_png(tmp_path / rel, 0)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "README").write_text("x")
    (tmp_path / "empty").mkdir()
    expected = ["B.Jpg", "a.gif", "b/a/z.JPEG", "b/c.png", "b.png", "c/d.jpeg"]
    found = image_datasets._list_image_files_recursively(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in found] == expected
    assert image_datasets.list_image_files_recursively(str(tmp_path)) == found
    assert image_datasets._list_image_files_recursively(str(tmp_path / "empty")) == []  # ADM: no error here


def test_folder_images_are_flipped_by_default(tmp_path):
    left_half = np.zeros((8, 8, 3), np.uint8)
    left_half[:, :4] = 255
    Image.fromarray(left_half).save(tmp_path / "x_0.png")
    data = load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, seed=0)
    lefts = [bool(b[0][0, 0, 0, 0] > 0) for b in _take(data, 30)]
    assert 0 < sum(lefts) < 30  # both orientations occur
    no_flip = load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, seed=0, random_flip=False)
    assert all(b[0][0, 0, 0, 0] > 0 for b in _take(no_flip, 10))


def test_center_crop_without_resize_is_the_middle():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)  # H=10, W=14
    out = center_crop_arr(Image.fromarray(arr), 10)
    np.testing.assert_array_equal(out, arr[:, 2:12])


def test_center_crop_halves_large_images_with_a_box_filter():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(20, 40, 3)).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 10)  # 40x20 -> box to 20x10 -> crop columns 5..15
    block_mean = arr.astype(np.float64).reshape(10, 2, 20, 2, 3).mean(axis=(1, 3))
    assert out.shape == (10, 10, 3)
    assert np.abs(out.astype(np.float64) - block_mean[:, 5:15]).max() <= 1.0


def test_random_crop_is_a_window_of_the_image():
    import random

    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    offsets = set()
    for seed in range(20):
        out = random_crop_arr(Image.fromarray(arr), 10, min_crop_frac=1.0, max_crop_frac=1.0, rng=random.Random(seed))
        matches = [k for k in range(5) if np.array_equal(out, arr[:, k : k + 10])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_superres_low_res_is_the_area_downsample():
    large, cond = next(load_superres_data("digits:16", 4, large_size=16, small_size=8, deterministic=True, seed=0))
    expected = large.reshape(4, 3, 8, 2, 8, 2).mean(dim=(3, 5))
    torch.testing.assert_close(cond["low_res"], expected)


def test_bad_data_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="--data_dir"):
        load_data(data_dir="", batch_size=4, image_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(data_dir=str(tmp_path / "missing"), batch_size=4, image_size=8)
    with pytest.raises(ValueError, match="no .jpg"):
        load_data(data_dir=str(tmp_path), batch_size=4, image_size=8)
    _write_png(tmp_path / "a_1.png", 3)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        load_data(data_dir=str(tmp_path), batch_size=4, image_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        load_data(data_dir="digits", batch_size=0, image_size=8)
