"""Where the Inception graph file comes from: a given path, the cache folder, or a download.

OpenAI publishes no checksum for classify_image_graph_def.pb, so the sha256 of the first
download is recorded beside the file (``.sha256``) and printed; every later run checks the file
against that record, and the evaluator's JSON report carries the hash.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from tqdm import tqdm

from adm_common.files import (
    DISK_FULL,
    atomic_write_text,
    remove_file,
    sha256_file,
    sweep_stale_temporaries,
    temp_path_for,
)

GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
GRAPH_FILENAME = "classify_image_graph_def.pb"
HASH_SUFFIX = ".sha256"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/guided_diffusion_es, or ~/.cache/guided_diffusion_es."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "guided_diffusion_es"


def locate_inception_graph(inception_path=None, url: str = GRAPH_URL) -> tuple[Path, str]:
    """(path, sha256) of the graph: ``inception_path`` if given, else the cached copy, downloaded if absent."""
    if inception_path:
        path = Path(inception_path)
        if path.is_dir():
            raise ValueError(f"--inception_path {path} is a folder; pass the graph file itself ({GRAPH_FILENAME})")
        if not path.is_file():
            raise FileNotFoundError(f"Inception graph {path} does not exist; download {url} to that path")
    else:
        path = cache_dir() / GRAPH_FILENAME
        if path.is_dir():
            raise ValueError(f"{path} is a folder; remove it so that the Inception graph can be downloaded there")
        if not path.is_file():
            _download(url, path)
    return path, verified_sha256(path)


def verified_sha256(path: Path) -> str:
    """The file's sha256, checked against the one recorded beside it when it was downloaded."""
    digest = sha256_file(path)
    record = path.with_name(path.name + HASH_SUFFIX)
    if record.is_file():
        words = record.read_text(errors="replace").split()
        recorded = words[0] if words else "nothing"
        if digest != recorded:
            raise ValueError(
                f"{path} has sha256 {digest}, but {recorded} was recorded when it was downloaded; "
                "delete both files to download it again"
            )
    return digest


def _download(url: str, path: Path) -> None:
    """Download ``url`` to ``path`` through a temporary sibling, removed however the download ends."""
    def failed(reason) -> FileNotFoundError:
        return FileNotFoundError(
            f"the Inception graph is not at {path} and downloading it failed ({reason}); "
            f"download {url} to that path, or pass --inception_path"
        )

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise failed(f"cannot create the folder {path.parent}: {exc.strerror or exc}") from None
    sweep_stale_temporaries(path)
    partial = temp_path_for(path)
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc="Inception graph", disable=None) as progress:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.update(len(chunk))
                received = out.tell()
            if size is not None and received != size:
                raise http.client.IncompleteRead(b"", size - received)
            os.replace(partial, path)
        except OSError as exc:  # urllib's URLError included; a full disk too
            if exc.errno in DISK_FULL:
                raise failed(f"no space left on the device; free space under {path.parent}") from None
            raise failed(getattr(exc, "reason", None) or exc.strerror or exc) from None
        except http.client.IncompleteRead as exc:  # the connection was cut
            raise failed(f"the connection closed {exc.expected} bytes before the end") from None
        except (http.client.HTTPException, ValueError) as exc:  # a broken response; a malformed URL
            raise failed(f"{type(exc).__name__}: {exc}") from None
    finally:
        remove_file(partial)
    record = path.with_name(path.name + HASH_SUFFIX)
    atomic_write_text(record, f"{digest.hexdigest()}  {path.name}\n", "the graph's sha256 record")
    print(f"downloaded {path.name}: sha256 {digest.hexdigest()}")
    print(f"(recorded in {record}; later runs check the file against it)")
