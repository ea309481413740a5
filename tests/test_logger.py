"""logger: ADM's (OpenAI baselines') output formats, file names, environment variables, scopes,
profiling, MPI averaging and TensorBoard event files, checked against their layouts."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion import logger


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    """Each test starts from the default logger and leaves it behind."""
    for name in ("OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "OPENAI_LOG_FORMAT_MPI", "PMI_RANK", "OMPI_COMM_WORLD_RANK",
                 "RANK"):
        monkeypatch.delenv(name, raising=False)
    previous = logger.Logger.CURRENT
    logger.Logger.CURRENT = None
    yield
    current = logger.Logger.CURRENT
    if current is not None and current is not logger.Logger.DEFAULT:
        current.close()
    logger.Logger.CURRENT = previous


# ADM's table: keys sorted, cells cut to 30 characters (27 + "..."), numbers as "%-8.3g",
# columns as wide as their widest cell, and a rule of dashes as wide as the table.
EXPECTED_TABLE = (
    "---------------------------------------------\n"
    "| a_very_long_key_name_that_e... | x        |\n"
    "| loss                           | 0.123    |\n"
    "| step                           | 10       |\n"
    "| Zeta                           | 1.23e+05 |\n"
    "---------------------------------------------\n"
)


def test_table_layout_is_adms(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=["stdout"], rank=0)
    capsys.readouterr()
    logger.logkv("loss", 0.1234567)
    logger.logkv("step", 10)
    logger.logkv("Zeta", 123456.0)
    logger.logkv("a_very_long_key_name_that_exceeds_thirty", "x")
    row = logger.dumpkvs()
    assert capsys.readouterr().out == EXPECTED_TABLE
    assert row == {"loss": 0.1234567, "step": 10, "Zeta": 123456.0, "a_very_long_key_name_that_exceeds_thirty": "x"}
    assert logger.getkvs() == {}  # the row was cleared


def test_text_goes_to_text_outputs_by_level(tmp_path, capsys):
    logger.configure(dir=str(tmp_path), format_strs=["stdout", "log"], rank=0)
    logger.log("a", 1, 2.5)
    logger.debug("hidden")
    logger.set_level(logger.DEBUG)
    logger.debug("shown")
    logger.set_level(logger.WARN)
    logger.info("hidden")
    logger.warn("warned")
    logger.error("failed")
    logger.set_level(logger.DISABLED)
    logger.error("silenced")
    expected = f"Logging to {tmp_path}\na 1 2.5\nshown\nwarned\nfailed\n"
    assert capsys.readouterr().out == expected
    assert (tmp_path / "log.txt").read_text() == expected


def test_csv_header_grows_and_earlier_rows_are_padded(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"], rank=0)
    logger.logkv("b", 1)
    logger.dumpkvs()
    logger.logkvs({"b": 2, "a": 0.5, "c": "x"})
    logger.dumpkvs()
    logger.logkv("c", "y")
    logger.dumpkvs()
    logger.reset()
    assert (tmp_path / "progress.csv").read_text() == "b,a,c\n1,,\n2,0.5,x\n,,y\n"


def test_json_lines_with_numpy_values(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["json"], rank=0)
    logger.logkv("loss", np.float32(0.25))
    logger.logkv("step", 3)
    logger.dumpkvs()
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    logger.dumpkvs()
    logger.reset()
    lines = (tmp_path / "progress.json").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"loss": 0.25, "step": 3}, {"loss": 1.5}]


def test_logkv_mean_is_the_mean_and_logkv_the_last_value(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=[], rank=0)
    values = [0.5, 2.0, -1.25, 7.0, 3.5]
    for v in values:
        logger.logkv_mean("m", v)
        logger.record_tabular("last", v)
    row = logger.dump_tabular()
    assert row["m"] == pytest.approx(sum(values) / len(values), rel=1e-15)
    assert row["last"] == values[-1]
    assert logger.record_tabular is logger.logkv and logger.dump_tabular is logger.dumpkvs


def test_file_names_follow_the_suffix_and_the_rank(tmp_path):
    logger.configure(dir=str(tmp_path / "r0"), format_strs=["log", "json", "csv", "tensorboard"], log_suffix="-x")
    logger.logkv("a", 1)
    logger.dumpkvs()
    names = sorted(os.listdir(tmp_path / "r0"))
    assert names == ["log-x.txt", "progress-x.csv", "progress-x.json", "tb-x"]
    logger.configure(dir=str(tmp_path / "r2"), format_strs=["log", "csv"], log_suffix="-x", rank=2)
    assert sorted(os.listdir(tmp_path / "r2")) == ["log-x-rank002.txt", "progress-x-rank002.csv"]
    with pytest.raises(ValueError, match="unknown log format 'html'"):
        logger.make_output_format("html", str(tmp_path))


def test_configure_reads_adms_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "json,csv")
    logger.configure()
    assert logger.get_dir() == str(tmp_path / "env")
    assert sorted(os.listdir(tmp_path / "env")) == ["progress.csv", "progress.json"]
    # another rank: OPENAI_LOG_FORMAT_MPI (default "log"), its rank from the launcher's environment
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert logger.get_rank_without_mpi_import() == 3
    logger.configure(dir=str(tmp_path / "mpi"))
    assert os.listdir(tmp_path / "mpi") == ["log-rank003.txt"]
    monkeypatch.setenv("OPENAI_LOG_FORMAT_MPI", "csv")
    logger.configure(dir=str(tmp_path / "mpi2"))
    assert os.listdir(tmp_path / "mpi2") == ["progress-rank003.csv"]
    # neither dir nor OPENAI_LOGDIR: a time-stamped folder in the temp dir, as ADM
    monkeypatch.delenv("OPENAI_LOGDIR")
    monkeypatch.setattr(logger.tempfile, "gettempdir", lambda: str(tmp_path / "temp"))
    logger.configure(format_strs=[])
    made = Path(logger.get_dir())
    assert made.parent == tmp_path / "temp" and made.name.startswith("openai-") and made.is_dir()


def test_scoped_configure_restores_the_previous_logger(tmp_path):
    logger.configure(dir=str(tmp_path / "outer"), format_strs=["csv"], rank=0)
    outer = logger.get_current()
    logger.logkv("kept", 1)
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["log"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.log("inside")
    assert logger.get_current() is outer and logger.getkvs() == {"kept": 1}
    logger.dumpkvs()  # the outer files are still open
    assert (tmp_path / "inner" / "log.txt").read_text().endswith("inside\n")
    assert (tmp_path / "outer" / "progress.csv").read_text() == "kept\n1\n"


def test_before_configure_the_logger_writes_to_stdout_only(capsys):
    assert logger.get_dir() is None
    logger.log("hello")
    assert capsys.readouterr().out == "hello\n"
    assert logger.get_current() is logger.Logger.DEFAULT


def test_profile_adds_the_seconds_spent_to_wait_keys(tmp_path, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs=[], rank=0)
    clock = iter([100.0, 100.25, 200.0, 200.5, 300.0, 301.0])
    monkeypatch.setattr(logger.time, "time", lambda: next(clock))

    @logger.profile("work")
    def work(x):
        """doc"""
        return 2 * x

    assert work(21) == 42 and work(1) == 2 and work.__name__ == "work"
    with logger.profile_kv("io"):
        pass
    assert logger.getkvs() == {"wait_work": 0.75, "wait_io": 1.0}


class FakeComm:
    """The slice of an mpi4py communicator the logger uses, for ranks that all live in this test."""

    def __init__(self, rank, everyone):
        self.rank = rank
        self.everyone = everyone

    def gather(self, value):
        return self.everyone if self.rank == 0 else None


def test_mpi_weighted_mean_weights_by_counts():
    everyone = [{"loss": (1.0, 1), "acc": (0.5, 2)}, {"loss": (4.0, 3), "name": ("x", 1)}]
    with pytest.warns(UserWarning, match="non-float name=x"):
        means = logger.mpi_weighted_mean(FakeComm(0, everyone), everyone[0])
    assert means == {"loss": (1.0 * 1 + 4.0 * 3) / 4, "acc": 0.5}
    assert logger.mpi_weighted_mean(FakeComm(1, everyone), everyone[1]) == {}


def test_dumpkvs_with_a_comm_averages_over_the_ranks():
    rank1 = {"loss": (3.0, 1)}
    rank0 = logger.Logger(dir=None, output_formats=[], comm=None)
    rank0.logkv_mean("loss", 1.0)
    rank0.logkv_mean("loss", 2.0)  # mean 1.5 over 2 values
    rank0.set_comm(FakeComm(0, [{"loss": (1.5, 2)}, rank1]))
    assert rank0.dumpkvs() == {"loss": (1.5 * 2 + 3.0) / 3}
    other = logger.Logger(dir=None, output_formats=[], comm=FakeComm(1, None))
    other.logkv("loss", 3.0)
    assert other.dumpkvs() == {"dummy": 1}


def test_crc32c_matches_the_standard_check_value():
    assert logger.crc32c(b"123456789") == 0xE3069283  # RFC 3720's CRC-32C check value
    assert logger.crc32c(b"") == 0


def _records(path):
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
    return out


def test_tensorboard_events_frame_each_row(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["tensorboard"], rank=0)
    logger.logkv("loss", 0.5)
    logger.logkv("note", "text")  # not a number: left to the other outputs
    logger.dumpkvs()
    logger.logkv("loss", 0.25)
    logger.dumpkvs()
    logger.reset()
    (events,) = (tmp_path / "tb").iterdir()
    assert events.name.startswith("events.out.tfevents.")
    records = _records(events)
    assert len(records) == 3  # the file version, then one event per row
    assert b"brain.Event:2" in records[0]
    assert struct.pack("<f", 0.5) in records[1] and b"loss" in records[1] and b"note" not in records[1]


def test_tensorboard_events_read_back_with_tensorflow(tmp_path):
    """TensorFlow's own reader (which checks every CRC) sees the tags, values and steps."""
    pytest.importorskip("tensorflow")
    logger.configure(dir=str(tmp_path), format_strs=["tensorboard"], rank=0)
    for step, loss in enumerate([0.5, 0.25, 0.125]):
        logger.logkv("loss", loss)
        logger.logkv("step", step)
        logger.dumpkvs()
    logger.reset()
    (events,) = (tmp_path / "tb").iterdir()
    reader = (
        "import json, sys, tensorflow as tf\n"
        "rows = []\n"
        "for e in tf.compat.v1.train.summary_iterator(sys.argv[1]):\n"
        "    rows.append([e.step, e.file_version, {v.tag: v.simple_value for v in e.summary.value}])\n"
        "print(json.dumps(rows))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", reader, str(events)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows[0][:2] == [0, "brain.Event:2"]
    assert [r[0] for r in rows[1:]] == [1, 2, 3]
    assert [r[2] for r in rows[1:]] == [{"loss": 0.5, "step": 0.0}, {"loss": 0.25, "step": 1.0},
                                        {"loss": 0.125, "step": 2.0}]
