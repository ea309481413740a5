"""adm_common.cli.cli_main: every way a script can end on the user's side is one `error:` line."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, code=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OPENAI_LOGDIR", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("script,flags,expected", [
    ("image_sample.py", ["--num_samples", "x"], "error: argument --num_samples: invalid int value: 'x'"),
    ("image_sample.py", ["--bogus_flag", "1"], "error: unrecognized arguments: --bogus_flag 1"),
    ("edm_sample.py", ["--solver", "rk4"], "error: argument --solver: invalid choice: 'rk4'"),
    ("image_train.py", ["--use_fp16", "maybe"], "error: argument --use_fp16: boolean value expected"),
])
def test_argparse_errors_are_one_line(script, flags, expected):
    proc = run([str(ROOT / "scripts" / script), *flags])
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith(expected) and line.endswith(f"(see {script} --help)")


def test_help_still_prints_usage():
    proc = run([str(ROOT / "scripts" / "image_sample.py"), "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage:")


def _main_that(body: str) -> str:
    """A script whose main() runs ``body``, through cli_main."""
    return "\n".join([
        "import errno, os, signal",
        "from adm_common.cli import cli_main",
        "def main():",
        textwrap.indent(textwrap.dedent(body).strip("\n"), "    "),
        "cli_main(main)",
    ])


@pytest.mark.parametrize("sig,status,message", [
    (signal.SIGTERM, 143, "error: terminated (SIGTERM); rerun the same command to resume"),
    (signal.SIGINT, 130, "error: interrupted; rerun the same command to resume"),
])
def test_signals_end_with_one_line_after_clean_up(tmp_path, sig, status, message):
    marker = tmp_path / "cleaned"
    proc = run(None, _main_that(f"""
        try:
            os.kill(os.getpid(), {int(sig)})
            signal.pause()
        finally:
            open({str(marker)!r}, "w").close()
    """))
    assert proc.returncode == status
    assert one_error_line(proc) == message
    assert marker.exists(), "the script's finally block did not run"


def test_a_full_disk_is_one_line_naming_the_file():
    proc = run(None, _main_that("""
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/shards/shard-000001.npz")
    """))
    assert proc.returncode == 2
    assert one_error_line(proc) == (
        "error: no space left on the device writing /data/run/shards/shard-000001.npz; free some space and "
        "rerun the same command (finished work is kept)")


def test_an_os_refusal_is_one_line(tmp_path):
    proc = run(None, _main_that(f"""
        open({str(tmp_path / 'missing' / 'x.npz')!r})
    """))
    assert proc.returncode == 2
    assert one_error_line(proc) == f"error: No such file or directory: {tmp_path / 'missing' / 'x.npz'}"


def test_a_bug_keeps_its_traceback():
    proc = run(None, _main_that("""
        raise RuntimeError("a bug")
    """))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
