"""scripts/npz_to_png.py: every pixel and label survives, bad input leaves nothing behind."""

import json

import numpy as np
import pytest
from PIL import Image
from sample_scripts import run_in_process


def run(*argv):
    """scripts/npz_to_png.py --no-progress ARGV in this process: (exit status, stderr)."""
    r = run_in_process("npz_to_png.py", "--no-progress", *map(str, argv), check=False)
    return r.returncode, r.stderr


def test_images_and_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 5, 7, 3), dtype=np.uint8)  # more than one read batch
    labels = rng.integers(0, 1000, size=300)
    np.savez(tmp_path / "s.npz", images, labels)
    code, err = run(tmp_path / "s.npz", tmp_path / "png")
    assert code == 0, err
    files = sorted((tmp_path / "png").glob("*.png"))
    assert [f.name for f in files[:2]] == ["000000.png", "000001.png"] and len(files) == 300
    for i in (0, 255, 256, 299):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / f"{i:06d}.png")), images[i])
    listed = json.loads((tmp_path / "png" / "dataset.json").read_text())["labels"]
    assert listed[299] == ["000299.png", int(labels[299])] and len(listed) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["png", "s.npz"]  # no temporary folder left


def test_unlabelled_batch_has_no_dataset_json(tmp_path):
    np.savez(tmp_path / "s.npz", np.zeros((2, 4, 4, 3), np.uint8))
    assert run(tmp_path / "s.npz", tmp_path / "png")[0] == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["000000.png", "000001.png"]


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "does not exist"),
    (lambda d: (d / "s.npz").write_text("not a zip"), "not an .npz file"),
    (lambda d: np.savez(d / "s.npz", np.zeros((2, 4, 4, 3), np.float32)), "arr_0"),
    (lambda d: np.savez(d / "s.npz", np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int64)), "2 integer labels, found int64 (3,)"),
])
def test_bad_batches_are_one_line_and_write_nothing(tmp_path, make, message):
    make(tmp_path)
    code, err = run(tmp_path / "s.npz", tmp_path / "png")
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not any(p.name.startswith("png") for p in tmp_path.iterdir())


def test_an_existing_folder_is_never_written_over(tmp_path):
    np.savez(tmp_path / "s.npz", np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "keep.txt").write_text("mine")
    code, err = run(tmp_path / "s.npz", tmp_path / "png")
    assert code == 2 and "already exists" in err
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["keep.txt"]
