"""Write the images of an ADM sample batch (.npz) as a folder of PNG files.

    python scripts/npz_to_png.py samples/samples_50000x32x32x3.npz samples/png

For tools that read image folders (EDM's fid.py, torch-fidelity, clean-fid). Image i becomes
``OUT/{i:06d}.png``; when the batch holds labels (arr_1), ``OUT/dataset.json`` lists them in
EDM's dataset format ({"labels": [["000000.png", 3], ...]}). The folder is written under a
temporary name and renamed when complete, so an interrupted run leaves no partial folder.
"""

import argparse
import glob
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from evaluations.npz_stream import NpzImages
from adm_common.files import is_temp_name, locked, temp_path_for, writing
from adm_common.errors import UsageError
from adm_common.cli import cli_main

LABELS_MEMBER = "arr_1.npy"


def read_labels(path: Path, count: int):
    """arr_1 of the batch as a list of ints, or None when it has no labels."""
    with zipfile.ZipFile(path) as archive:
        if LABELS_MEMBER not in archive.namelist():
            return None
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = data["arr_1"]
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read arr_1 (the labels): {exc}; the file is damaged") from None
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: arr_1 should hold {count} integer labels, found {labels.dtype} {labels.shape}")
    return [int(v) for v in labels]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", help="ADM sample batch (.npz with arr_0 uint8 [N, H, W, 3])")
    parser.add_argument("output", help="folder to create (must not exist)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists():
        raise UsageError(f"{out} already exists; give a new folder (the images are never written over)")
    try:
        opened = NpzImages(args.batch)
    except zipfile.BadZipFile as exc:  # a damaged member found while reading its header
        raise UsageError(f"{args.batch} is damaged ({exc}); nothing was written") from None
    with opened as images:
        labels = read_labels(Path(args.batch), len(images))
        width = max(6, len(str(len(images) - 1)))
        names = [f"{i:0{width}d}.png" for i in range(len(images))]
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {out.parent} ({exc.strerror}); give an output folder in a writable place") from None
        # One writer per output folder; holding the lock, partial folders of killed runs are ours to sweep.
        lock = out.parent / f".{out.name}.lock"
        with locked(lock, f"output folder {out}", "wait for it to finish or give another output folder"):
            if out.exists():
                raise UsageError(f"{out} already exists; give a new folder (the images are never written over)")
            for stale in out.parent.glob(f"{glob.escape(out.name)}.tmp*"):
                if stale.name[len(out.name):].startswith(".tmp") and is_temp_name(stale.name) and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            partial = temp_path_for(out)
            try:
                with writing(out):
                    partial.mkdir()
                    done = 0
                    with tqdm(total=len(images), unit="img", desc="writing PNGs", disable=not args.progress) as bar:
                        for batch in images.batches(256):
                            for image in batch:
                                Image.fromarray(image).save(partial / names[done])
                                done += 1
                            bar.update(len(batch))
                    if labels is not None:
                        listing = json.dumps({"labels": [list(p) for p in zip(names, labels)]})
                        (partial / "dataset.json").write_text(listing)
                    os.replace(partial, out)
            except zipfile.BadZipFile as exc:  # a damaged member (CRC) found while reading it
                shutil.rmtree(partial, ignore_errors=True)
                raise UsageError(f"{args.batch} is damaged ({exc}); nothing was written") from None
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
    print(f"wrote {len(names)} PNG files to {out}" + (" with dataset.json (labels)" if labels is not None else ""))


if __name__ == "__main__":
    cli_main(main)
