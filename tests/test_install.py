"""Installed as users install it: a wheel (not editable) in a fresh environment, run from elsewhere.

The configs and the shipped digits weights are package data, so after `pip install .` a sample
script copied out of the checkout finds `--config digits_uncond` and the shipped model, and makes
the same NPZ, byte for byte, as the same command run from the checkout.
"""

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "guided_diffusion"
# What setup.py builds from; the build runs on a copy so it writes no build/ or egg-info here.
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "guided_diffusion", "evaluations", "adm_common")
SAMPLE_FLAGS = ["--config", "digits_uncond", "--num_samples", "8", "--seed", "3", "--output_dir", "out"]


def _run(cmd, cwd, env=None, timeout=120):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _can_build_without_isolation() -> bool:
    """setuptools here, and able to write wheels (built in since 70.1, else the wheel package)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv site-packages, wheel path): the wheel built from this checkout and installed."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, src / name)
    wheel_dir = tmp / "wheel"
    isolation = ["--no-build-isolation"] if _can_build_without_isolation() else []
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, src, "-w", wheel_dir],
                 tmp, _clean_env(), timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheel_dir.glob("guided_diffusion_es-*.whl")

    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp)
    assert made.returncode == 0, made.stderr
    python = venv / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp,
                        _clean_env()).stdout.strip())
    if sys.prefix != sys.base_prefix:
        # Started from a venv: --system-site-packages reaches the base interpreter's packages only,
        # so name this interpreter's (torch, pip, ...) too, after the new venv's own.
        outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p) != purelib]
        (purelib / "zz_outer_site.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    put = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp, _clean_env(),
               timeout=300)
    assert put.returncode == 0, put.stderr[-3000:]
    return python, purelib, wheel


def test_the_wheel_ships_every_config_and_the_shipped_weights(installed):
    _, purelib, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    data = sorted(PACKAGE.glob("configs/*.yaml")) + [PACKAGE / "configs" / "README.md"]
    data += sorted(PACKAGE.glob("assets/*.safetensors"))
    assert len(data) > 30 and PACKAGE / "configs" / "digits_uncond.yaml" in data
    missing = [str(p.relative_to(ROOT)) for p in data if str(p.relative_to(ROOT)) not in names]
    assert missing == []
    for path in data:  # and the installed copies are these files
        assert (purelib / path.relative_to(ROOT)).read_bytes() == path.read_bytes(), path


def test_installed_wheel_samples_the_shipped_model_from_outside_the_checkout(installed, tmp_path):
    python, purelib, _ = installed
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "work").mkdir(parents=True)
    script = elsewhere / "image_sample.py"
    shutil.copy2(ROOT / "scripts" / "image_sample.py", script)
    probe = elsewhere / "probe.py"  # imports as the copied script does (same folder, same cwd)
    probe.write_text("import json, sys, guided_diffusion\n"
                     "print(json.dumps([guided_diffusion.__file__, sys.path]))\n")
    looked = _run([python, probe], elsewhere / "work", _clean_env())
    assert looked.returncode == 0, looked.stderr
    module_file, path = json.loads(looked.stdout)
    assert Path(module_file).resolve().is_relative_to(purelib.resolve())
    assert not any(p and Path(p).resolve() == ROOT for p in path)

    ran = _run([python, script, *SAMPLE_FLAGS], elsewhere / "work", _clean_env(), timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    npz = elsewhere / "work" / "out" / "samples_8x8x8x3.npz"
    assert npz.is_file()
    sidecar = json.loads(npz.with_suffix(".json").read_text())
    assert Path(sidecar["model_path"]).resolve() == (purelib / "guided_diffusion/assets/digits_uncond.safetensors").resolve()
    assert Path(sidecar["config"]).resolve() == (purelib / "guided_diffusion/configs/digits_uncond.yaml").resolve()

    # The same command from the checkout, with the checkout's package: the same bytes.
    here = tmp_path / "checkout_run"
    here.mkdir()
    ref = _run([sys.executable, ROOT / "scripts" / "image_sample.py", *SAMPLE_FLAGS], here,
               _clean_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_npz = here / "out" / npz.name
    ref_sidecar = json.loads(ref_npz.with_suffix(".json").read_text())
    assert Path(ref_sidecar["model_path"]).resolve().is_relative_to(ROOT)
    assert npz.read_bytes() == ref_npz.read_bytes()


def test_installed_wheel_names_its_configs_when_one_is_unknown(installed, tmp_path):
    python, _, _ = installed
    script = tmp_path / "image_sample.py"
    shutil.copy2(ROOT / "scripts" / "image_sample.py", script)
    ran = _run([python, script, "--config", "digits_uncondd"], tmp_path, _clean_env())
    assert ran.returncode == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config 'digits_uncondd' not found; known configs: ")
    known = lines[0].split("known configs: ", 1)[1].split(", ")
    assert sorted(known) == sorted(p.stem for p in PACKAGE.glob("configs/*.yaml"))
    assert not (tmp_path / "out").exists()
