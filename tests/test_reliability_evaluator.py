"""The evaluator and make_reference_batch under the mistakes and faults a user meets: missing, empty,
truncated or damaged files, wrong arrays, unwritable or full output folders, unknown devices, a
damaged Inception graph, no network. Each must end with exit status 2 and exactly one ``error:``
line on stderr (no traceback), leave no output and no temporary file, and be found before the
Inception graph is located (so before any download) wherever the graph is not the problem.

Most cases run the scripts' ``main`` in-process under ``cli_main`` (what ``__main__`` runs); a few
run them as a user does, in a subprocess.
"""

from __future__ import annotations

import errno
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluations import evaluator, inception_file, reference_batch
from evaluations.npz_stream import NpzImages, scan_batch_file
from adm_common.cli import cli_main
from test_evaluator_inception import FLOAT, _blocky, _field, _images, _node, synthetic_inception_graph

ROOT = Path(__file__).resolve().parents[1]
NO_GRAPH = "/nonexistent/classify_image_graph_def.pb"  # a batch or flag error must come before the graph


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb"
    path.write_bytes(synthetic_inception_graph())
    return path


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty graph cache, and no network: a download attempt fails the way an offline one does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception_file.urllib.request, "urlopen", offline)
    return tmp_path / "cache" / "guided_diffusion_es"


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def _fails(main, argv, capfd) -> str:
    """Run ``main(argv)`` as its script does; it must exit 2 with one error line. Returns the line."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: main([str(a) for a in argv]))
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _evaluate_fails(argv, capfd, folder: Path) -> str:
    """The evaluator fails in one line and leaves ``folder`` as it was (no JSON, no temporary file)."""
    before = _files(folder)
    line = _fails(evaluator.main, argv, capfd)
    assert _files(folder) == before
    return line


def _crc_damaged(path: Path, out: Path, member: str = "arr_0.npy", at: float = 0.5) -> Path:
    """A copy of ``path`` with one byte of ``member``'s data flipped (the zip directory intact)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + int(info.compress_size * at)] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def _short_member(path: Path, out: Path, keep: int) -> Path:
    """A well-formed zip whose arr_0 header announces more images than its data holds."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("arr_0.npy")
    header = len(data) - int(np.prod(np.load(path)["arr_0"].shape))
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("arr_0.npy", data[: header + keep])
    return out


# --- batch files ----------------------------------------------------------------------------------


def _bad_batches(folder: Path) -> dict:
    """name -> (path, words the error line must hold)."""
    good = folder / "good.npz"
    np.savez(good, _images(0, 40))
    cases = {"missing": (folder / "missing.npz", "does not exist")}
    (folder / "empty.npz").write_bytes(b"")
    cases["empty"] = (folder / "empty.npz", "is empty (0 bytes)")
    (folder / "text.npz").write_text("not a zip")
    cases["text"] = (folder / "text.npz", "not an .npz file")
    np.save(folder / "single.npy", _images(0, 40))
    shutil.copy(folder / "single.npy", folder / "npy.npz")
    cases["npy"] = (folder / "npy.npz", "single .npy array")
    (folder / "half.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (folder / "half.npz", "truncated")
    (folder / "tail.npz").write_bytes(good.read_bytes()[:-5])
    cases["truncated_end"] = (folder / "tail.npz", "truncated")
    cases["short_member"] = (_short_member(good, folder / "short.npz", 1000), "holds 1 of the 40 images")
    cases["crc"] = (_crc_damaged(good, folder / "crc.npz"), "is damaged (member arr_0.npy: its bytes do not match")
    cases["crc_at_end"] = (_crc_damaged(good, folder / "crc_end.npz", at=0.999), "is damaged")
    stats = {"mu": np.zeros(8), "sigma": np.eye(8), "mu_s": np.zeros(8), "sigma_s": np.eye(8)}
    np.savez(folder / "stats.npz", _images(0, 40), **stats)
    cases["crc_in_statistics"] = (_crc_damaged(folder / "stats.npz", folder / "crc_mu.npz", "sigma.npy"), "sigma.npy")
    np.savez(folder / "labels.npz", arr_1=np.arange(40))
    cases["no_arr_0"] = (folder / "labels.npz", "has no arr_0")
    np.savez(folder / "float.npz", _images(0, 40).astype(np.float32) / 255)
    cases["float"] = (folder / "float.npz", "must be uint8 (0..255), got float32")
    np.savez(folder / "one_channel.npz", _images(0, 40)[..., :1])
    cases["one_channel"] = (folder / "one_channel.npz", "[N, height, width, 3] (NHWC RGB), got shape (40, 16, 16, 1)")
    np.savez(folder / "gray.npz", _images(0, 40)[..., 0])
    cases["gray"] = (folder / "gray.npz", "got shape (40, 16, 16)")
    np.savez(folder / "nchw.npz", np.ascontiguousarray(_images(0, 40).transpose(0, 3, 1, 2)))
    cases["nchw"] = (folder / "nchw.npz", "got shape (40, 3, 16, 16)")
    np.savez(folder / "objects.npz", np.array([None, 1], dtype=object))
    cases["pickle"] = (folder / "objects.npz", "got object")
    np.savez(folder / "one.npz", _images(0, 1))
    cases["one_image"] = (folder / "one.npz", "holds 1 image; precision and recall compare")
    np.savez(folder / "three.npz", _images(0, 3))
    cases["three_images"] = (folder / "three.npz", "holds 3 images")
    np.savez(folder / "part_stats.npz", _images(0, 40), mu=np.zeros(8))
    cases["some_statistics"] = (folder / "part_stats.npz", "holds mu but not sigma, mu_s, sigma_s")
    np.savez(folder / "text_stats.npz", _images(0, 40), **{**stats, "mu": np.array(["a"] * 8)})
    cases["text_statistics"] = (folder / "text_stats.npz", "the statistics must be numbers")
    (folder / "a_folder.npz").mkdir()
    cases["folder"] = (folder / "a_folder.npz", "is a folder")
    return cases


BATCH_CASES = [
    "missing", "empty", "text", "npy", "truncated", "truncated_end", "short_member", "crc", "crc_at_end",
    "crc_in_statistics", "no_arr_0", "float", "one_channel", "gray", "nchw", "pickle", "one_image",
    "three_images", "some_statistics", "text_statistics", "folder",
]


@pytest.mark.parametrize("side", ["reference", "sample"])
def test_bad_batch_files_are_one_line_before_the_graph(side, tmp_path, capfd, no_cache):
    cases = _bad_batches(tmp_path)
    assert sorted(cases) == sorted(BATCH_CASES)
    good = tmp_path / "good.npz"
    for name, (path, words) in cases.items():
        pair = [path, good] if side == "reference" else [good, path]
        # No graph anywhere and no network: an error about the batch proves it came first.
        line = _evaluate_fails([*pair, "--backend", "torch", "--device", "cpu", "--json", tmp_path / "r.json"],
                               capfd, tmp_path)
        assert words in line, (name, line)
        assert str(path) in line, (name, line)
    assert not no_cache.exists() or not any(no_cache.iterdir())  # no download was started


def test_images_of_different_sizes_are_refused_unless_asked(graph, tmp_path, capfd):
    np.savez(tmp_path / "ref.npz", _images(0, 30, 16, 16))
    np.savez(tmp_path / "big.npz", _images(1, 30, 24, 24))
    flags = ["--backend", "torch", "--device", "cpu", "--json", tmp_path / "r.json"]
    line = _evaluate_fails([tmp_path / "ref.npz", tmp_path / "big.npz", *flags, "--inception_path", NO_GRAPH],
                           capfd, tmp_path)
    assert "the reference images are 16x16 but the samples 24x24" in line and "--allow_different_sizes" in line
    result = evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "big.npz"), *map(str, flags),
                             "--inception_path", str(graph), "--allow_different_sizes"])
    assert result["sample"]["image_size"] == [24, 24] and (tmp_path / "r.json").is_file()


def test_crc_error_while_streaming_is_one_line_naming_the_file(tmp_path):
    # The known request: a CRC error found while reading batches (not only by scan_batch_file)
    np.savez(tmp_path / "good.npz", _images(0, 200))
    damaged = _crc_damaged(tmp_path / "good.npz", tmp_path / "damaged.npz", at=0.9)
    with NpzImages(damaged) as images:  # the header is intact: opening succeeds
        with pytest.raises(ValueError, match=r"damaged.npz is damaged \(Bad CRC-32 for file 'arr_0.npy'\)"):
            for _ in images.batches(16):
                pass
    with pytest.raises(ValueError, match="damaged.npz is damaged"):
        scan_batch_file(damaged)
    assert len(scan_batch_file(tmp_path / "good.npz")) == 64


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_random_damage_is_refused_or_harmless(save, tmp_path):
    """Bytes flipped, replaced, cut or removed anywhere: a ValueError naming the file, or the same images."""
    rng = np.random.default_rng(7)
    images = _images(3, 12, 8, 8)
    buffer = io.BytesIO()
    save(buffer, images, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    good = buffer.getvalue()
    path = tmp_path / "batch.npz"
    refused = 0
    for _ in range(300):
        data = bytearray(good)
        kind = rng.integers(4)
        if kind == 0:
            data = data[: rng.integers(0, len(data))]
        elif kind == 1:
            data[rng.integers(len(data))] ^= 1 << rng.integers(8)
        elif kind == 2:
            data[rng.integers(len(data))] = rng.integers(256)
        else:
            start = rng.integers(len(data))
            del data[start : start + rng.integers(1, 100)]
        path.write_bytes(bytes(data))
        try:
            evaluator.check_batch(path)
            with NpzImages(path) as reader:
                np.testing.assert_array_equal(np.concatenate(list(reader.batches(5))), images)
        except ValueError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            refused += 1
    assert refused > 200  # most damage is found, not just survived


# --- the JSON results -------------------------------------------------------------------------------


def test_json_destination_is_checked_before_the_graph(tmp_path, capfd, no_cache):
    np.savez(tmp_path / "a.npz", _images(0, 30))
    np.savez(tmp_path / "b.npz", _images(1, 30))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    cases = {
        tmp_path / "missing" / "r.json": "folder {}/missing for the JSON results does not exist".format(tmp_path),
        tmp_path / "a_file" / "r.json": "is a file, not a folder",
        tmp_path / "a_folder": "is a folder; give --json a file name",
        tmp_path / "a.npz": "is the batch file",
        Path("/proc/evaluator_results.json"): "cannot write the JSON results to /proc/evaluator_results.json",
    }
    for json_path, words in cases.items():
        line = _evaluate_fails([tmp_path / "a.npz", tmp_path / "b.npz", "--backend", "torch", "--device", "cpu",
                                "--json", json_path], capfd, tmp_path)
        assert words in line, line
        assert "choose another --json" in line or "give" in line
    assert not Path("/proc/evaluator_results.json").exists()


def test_a_full_disk_at_the_json_keeps_nothing_but_the_printed_numbers(graph, tmp_path, capfd, monkeypatch):
    np.savez(tmp_path / "a.npz", _images(0, 30))
    np.savez(tmp_path / "b.npz", _images(1, 30))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("adm_common.files.os.fsync", full)
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: evaluator.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--backend", "torch",
                                         "--device", "cpu", "--inception_path", str(graph)]))
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2
    assert [line for line in err.splitlines() if line.strip()] == [
        f"error: no space left on the device writing the JSON results to {tmp_path / 'b.eval.json'}; "
        "the numbers printed above were not saved; free space and rerun"
    ]
    assert "\nFID: " in out and "\nRecall: " in out  # ADM's lines came out before the write failed
    assert _files(tmp_path) == before


def test_stale_temporary_files_are_swept_by_the_next_run(graph, tmp_path):
    np.savez(tmp_path / "a.npz", _images(0, 30))
    np.savez(tmp_path / "b.npz", _images(1, 30))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = tmp_path / f"r.json.tmp{dead_pid}"  # what kill -9 leaves mid-write
        busy = tmp_path / f"r.json.tmp{live.pid}"  # another run writing the same file right now
        other = tmp_path / f"other.json.tmp{dead_pid}"  # not this run's file
        for path in (stale, busy, other):
            path.write_text("{partial")
        evaluator.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--backend", "torch", "--device", "cpu",
                        "--inception_path", str(graph), "--json", str(tmp_path / "r.json")])
        assert not stale.exists() and busy.exists() and other.exists()
        assert (tmp_path / "r.json").read_text().startswith("{\n")
    finally:
        live.kill()
        live.wait()


# --- flags: device, batch size ----------------------------------------------------------------------


def _missing_gpu() -> tuple[str, str]:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda:{count}", f"only {count} CUDA GPU(s) are visible"
    return "cuda", "no CUDA GPU is visible on this machine; use --device cpu"


@pytest.mark.parametrize("script", ["evaluator", "make_reference_batch"])
def test_flags_are_checked_before_the_graph_is_looked_for(script, tmp_path, capfd, no_cache):
    np.savez(tmp_path / "a.npz", _images(0, 30))
    np.savez(tmp_path / "b.npz", _images(1, 30))
    if script == "evaluator":
        main, head = evaluator.main, [tmp_path / "a.npz", tmp_path / "b.npz", "--json", tmp_path / "r.json"]
    else:
        main, head = reference_batch.main, [tmp_path / "a.npz", tmp_path / "ref.npz", "--image_size", 16]
    gpu, gpu_words = _missing_gpu()
    cases = [
        (["--device", "foo"], "unknown --device 'foo'; use cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "unknown --device 'cuda:x'"),
        (["--device", gpu], gpu_words),
        (["--device", "meta"], "--device meta: use cpu, cuda or cuda:N"),
        (["--backend", "tf", "--device", gpu], gpu_words),  # precision/recall run on it with TF too
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--backend", "caffe"], "invalid choice: 'caffe'"),
    ]
    for flags, words in cases:
        before = _files(tmp_path)
        line = _fails(main, [*head, "--backend", "torch", *flags], capfd)  # no --inception_path: the cache
        assert words in line, line
        assert _files(tmp_path) == before
    assert not no_cache.exists() or not any(no_cache.iterdir())


# --- the Inception graph ------------------------------------------------------------------------------


def _bad_graphs(folder: Path, graph: Path) -> dict:
    data = graph.read_bytes()
    cases = {}
    for name, content, words in (
        ("empty.pb", b"", "is empty (0 bytes)"),
        ("truncated.pb", data[: len(data) // 3], "is not a TensorFlow GraphDef (.pb) file"),
        ("garbage.pb", b"\xff" * 300, "is not a TensorFlow GraphDef (.pb) file"),
        ("foreign.pb", _field(1, _node("x", "Placeholder", dtype=FLOAT)), "is not ADM's Inception graph: it has no node"),
        # the real names with a broken network: a conv's weights renamed away
        ("broken.pb", data.replace(b"mixed_7/conv/conv2d_params", b"mixed_7/conv/conv2d_xxxxxx", 1),
         "cannot be used as ADM's Inception graph"),
    ):
        (folder / name).write_bytes(content)
        cases[folder / name] = words
    np.savez(folder / "batch.npz", _images(0, 5))
    cases[folder / "batch.npz"] = "is not a TensorFlow GraphDef (.pb) file"
    cases[folder] = "is a folder; pass the graph file itself"
    return cases


@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_damaged_or_wrong_graph_files_are_one_line(backend, graph, tmp_path, capfd):
    if backend == "tf" and importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (pip install tensorflow-cpu)")
    np.savez(tmp_path / "a.npz", _images(0, 30))
    np.savez(tmp_path / "b.npz", _images(1, 30))
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    for path, words in _bad_graphs(graphs, graph).items():
        line = _evaluate_fails([tmp_path / "a.npz", tmp_path / "b.npz", "--backend", backend, "--device", "cpu",
                                "--inception_path", path, "--json", tmp_path / "r.json"], capfd, tmp_path)
        assert words in line, (path.name, line)
        assert str(path) in line


def test_offline_download_says_where_to_put_the_graph(tmp_path, capfd, no_cache):
    np.savez(tmp_path / "a.npz", _images(0, 30))
    line = _fails(evaluator.main, [tmp_path / "a.npz", tmp_path / "a.npz", "--backend", "torch", "--device", "cpu",
                                   "--json", tmp_path / "r.json"], capfd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "cache"]
    assert line == (
        f"error: the Inception graph is not at {no_cache / 'classify_image_graph_def.pb'} and downloading it "
        "failed ([Errno -3] Temporary failure in name resolution); "
        f"download {inception_file.GRAPH_URL} to that path, or pass --inception_path"
    )
    assert list(no_cache.iterdir()) == []


class _Response:
    """A download that breaks after its first chunk, in the way ``failure`` says."""

    def __init__(self, failure, length=10 << 20):
        self.failure, self.headers, self.sent = failure, {"Content-Length": str(length)}, False

    def read(self, size):
        if not self.sent:
            self.sent = True
            return b"x" * 1000
        if self.failure is None:
            return b""  # the connection closed early: fewer bytes than Content-Length
        raise self.failure

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("failure", [None, "incomplete", "reset", "interrupt"])
def test_a_broken_download_leaves_nothing(failure, tmp_path, monkeypatch):
    import http.client

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    error = {None: None, "incomplete": http.client.IncompleteRead(b"x" * 10, 100),
             "reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
             "interrupt": KeyboardInterrupt()}[failure]
    monkeypatch.setattr(inception_file.urllib.request, "urlopen", lambda url, timeout=None: _Response(error))
    stale = tmp_path / "guided_diffusion_es" / "classify_image_graph_def.pb.tmp999999999"
    stale.parent.mkdir()
    stale.write_bytes(b"left by kill -9")  # no process has that pid
    expected = KeyboardInterrupt if failure == "interrupt" else FileNotFoundError
    with pytest.raises(expected) as info:
        inception_file.locate_inception_graph()
    if failure != "interrupt":
        assert "downloading it failed" in str(info.value) and "download https://" in str(info.value)
    assert list(stale.parent.iterdir()) == []  # neither the partial download nor the stale one


def test_an_unwritable_cache_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))
    with pytest.raises(FileNotFoundError, match="cannot create the folder .*a_file/guided_diffusion_es.*"
                                                "or pass --inception_path"):
        inception_file.locate_inception_graph()


# --- make_reference_batch ------------------------------------------------------------------------------


def _image_folder(folder: Path, count: int, size: int = 16) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(_blocky(i, size, size)).save(folder / f"{i}.png")
    return folder


def test_reference_batch_bad_sources_and_outputs_are_one_line(graph, tmp_path, capfd, no_cache):
    main = reference_batch.main
    images = _image_folder(tmp_path / "images", 8)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for path in sorted(images.iterdir()):
            archive.write(path, path.name)
    np.savez(tmp_path / "source.npz", _images(0, 8))
    (tmp_path / "empty.zip").write_bytes(b"")
    (tmp_path / "half.zip").write_bytes((tmp_path / "images.zip").read_bytes()[:500])
    _crc_damaged(tmp_path / "source.npz", tmp_path / "crc.npz")
    _image_folder(tmp_path / "three", 3)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "out_folder.npz").mkdir()
    out = tmp_path / "out" / "ref.npz"
    out.parent.mkdir()
    cases = [  # (source, output, words); the graph is missing and the network down: checked first
        (tmp_path / "missing", out, "image source {} does not exist".format(tmp_path / "missing")),
        (tmp_path / "three", out, "a reference batch needs at least 4 images"),
        (tmp_path / "empty.zip", out, "empty.zip is empty (0 bytes)"),
        (tmp_path / "half.zip", out, "half.zip is not a zip file, or is truncated"),
        (tmp_path / "crc.npz", out, "crc.npz is damaged (member arr_0.npy"),
        (tmp_path / "images", tmp_path / "out" / "ref.zip", "must be an .npz file"),
        (tmp_path / "images", tmp_path / "missing" / "ref.npz", "output folder {} does not exist".format(
            tmp_path / "missing")),
        (tmp_path / "images", tmp_path / "a_file" / "ref.npz", "is a file, not a folder"),
        (tmp_path / "images", tmp_path / "out_folder.npz", "is a folder; give OUTPUT a file name"),
        (tmp_path / "images", Path("/proc/reference_batch.npz"), "cannot write the reference batch to /proc/"),
    ]
    for source, output, words in cases:
        before = _files(tmp_path)
        line = _fails(main, [source, output, "--image_size", 16, "--backend", "torch", "--device", "cpu"], capfd)
        assert words in line, line
        assert _files(tmp_path) == before
    assert not no_cache.exists() or not any(no_cache.iterdir())


def test_reference_batch_failing_midway_leaves_nothing(graph, tmp_path, capfd):
    main = reference_batch.main
    images = _image_folder(tmp_path / "images", 8)
    (images / "5.png").write_bytes((images / "5.png").read_bytes()[:60])  # read after the first batches
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for i in range(8):
            archive.writestr(f"{i}.png", (images / "0.png").read_bytes())
    _crc_damaged(tmp_path / "images.zip", tmp_path / "crc.zip", "6.png")
    flags = ["--image_size", 16, "--backend", "torch", "--device", "cpu", "--inception_path", graph,
             "--batch_size", 2]
    out = tmp_path / "out"
    out.mkdir()
    line = _fails(main, [images, out / "ref.npz", *flags], capfd)
    assert line.startswith(f"error: cannot read image {images / '5.png'}: ") and "repair or remove it" in line
    line = _fails(main, [tmp_path / "crc.zip", out / "ref.npz", *flags], capfd)
    assert line.startswith(f"error: cannot read image {tmp_path / 'crc.zip'}:6.png: Bad CRC-32") or \
        f"{tmp_path / 'crc.zip'} is damaged" in line
    assert list(out.iterdir()) == []


def test_reference_batch_on_a_full_disk_leaves_nothing(graph, tmp_path, capfd, monkeypatch):
    main = reference_batch.main
    images = _image_folder(tmp_path / "images", 8, 32)
    out = tmp_path / "out"
    out.mkdir()
    write = zipfile._ZipWriteFile.write
    written = []

    def fill_up(self, data):
        written.append(len(data))
        if sum(written) > 4000:  # at the first batch of arr_0, after its header
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", fill_up)
    line = _fails(main, [images, out / "ref.npz", "--image_size", 32, "--backend", "torch", "--device", "cpu",
                         "--inception_path", graph, "--batch_size", 2], capfd)
    assert f"no space left on device writing {out / 'ref.npz'}" in line
    assert sum(written) > 4000 and list(out.iterdir()) == []


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB filesystem (tmpfs; needs root), unmounted afterwards."""
    folder = tmp_path / "small"
    if not _mount_tmpfs(folder, "64k"):
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _only_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_full_disk_as_a_user_meets_it(graph, tmp_path, small_disk):
    """Both scripts as subprocesses writing to a real full filesystem: one line each, nothing left there."""
    images = _image_folder(tmp_path / "images", 8, 64)  # 8 x 64 x 64 x 3 = 96 KiB: more than the disk
    command = [sys.executable, str(ROOT / "scripts" / "make_reference_batch.py"), str(images),
               str(small_disk / "ref.npz"), "--image_size", "64", "--backend", "torch", "--device", "cpu",
               "--inception_path", str(graph)]
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert "no space left on device writing" in _only_error_line(proc)
    assert list(small_disk.iterdir()) == []
    np.savez(tmp_path / "a.npz", _images(0, 30))
    np.savez(tmp_path / "b.npz", _images(1, 30))
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # the JSON fits nowhere now
        with pytest.raises(OSError) as full:
            for _ in range(100):
                filler.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    command = [sys.executable, str(ROOT / "evaluations" / "evaluator.py"), str(tmp_path / "a.npz"),
               str(tmp_path / "b.npz"), "--backend", "torch", "--device", "cpu", "--inception_path", str(graph),
               "--json", str(small_disk / "r.json")]
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert "no space left on the device writing the JSON results" in _only_error_line(proc)
    assert "FID: " in proc.stdout
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_scripts_as_a_user_runs_them(graph, tmp_path):
    """The real entry points: a damaged sample batch, and a GPU that is not there, as subprocesses."""
    np.savez(tmp_path / "good.npz", _images(0, 40))
    damaged = _crc_damaged(tmp_path / "good.npz", tmp_path / "damaged.npz")
    evaluator_py = [sys.executable, str(ROOT / "evaluations" / "evaluator.py")]
    gpu, gpu_words = _missing_gpu()
    for flags, words in (
        ([str(tmp_path / "good.npz"), str(damaged), "--backend", "torch", "--inception_path", str(graph)],
         f"{damaged} is damaged"),
        ([str(tmp_path / "good.npz"), str(tmp_path / "good.npz"), "--device", gpu], gpu_words),
    ):
        proc = subprocess.run([*evaluator_py, *flags], capture_output=True, text=True, env=_env(), timeout=300,
                              cwd=tmp_path)
        assert words in _only_error_line(proc)
    command = [sys.executable, str(ROOT / "scripts" / "make_reference_batch.py"), str(damaged),
               str(tmp_path / "ref.npz"), "--image_size", "16", "--device", gpu]
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert gpu_words in _only_error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.npz", "good.npz"]


def _start_reference_batch(graph, source, out):
    command = [sys.executable, str(ROOT / "scripts" / "make_reference_batch.py"), str(source), str(out),
               "--image_size", "16", "--backend", "torch", "--device", "cpu", "--inception_path", str(graph),
               "--batch_size", "1"]
    return subprocess.Popen(command, env=_env(), cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_partial(proc, folder: Path, timeout: float = 120) -> Path:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        partial = [p for p in folder.iterdir() if ".npz.tmp" in p.name]
        if partial:
            return partial[0]
        assert proc.poll() is None, f"the run ended before it was interrupted: {proc.stderr.read()}"
        time.sleep(0.01)
    raise AssertionError("no partial reference batch appeared")


def test_an_interrupted_reference_batch_leaves_nothing_and_kill_9_is_swept(graph, tmp_path):
    import signal

    np.savez(tmp_path / "source.npz", _images(5, 4000))  # one image a batch: seconds of work
    out = tmp_path / "out"
    out.mkdir()
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = _start_reference_batch(graph, tmp_path / "source.npz", out / "ref.npz")
        _wait_for_partial(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "rerun" in lines[0], err
        assert list(out.iterdir()) == []
    proc = _start_reference_batch(graph, tmp_path / "source.npz", out / "ref.npz")
    partial = _wait_for_partial(proc, out)
    proc.kill()  # kill -9: no clean-up runs
    proc.wait()
    assert partial.exists()
    np.savez(tmp_path / "small.npz", _images(6, 8))
    proc = _start_reference_batch(graph, tmp_path / "small.npz", out / "ref.npz")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert [p.name for p in out.iterdir()] == ["ref.npz"]  # the killed run's partial file was swept
