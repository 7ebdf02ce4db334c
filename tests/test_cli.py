"""The user's entry point: `accelerate launch train.py`, its record, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def launch(*args: str, processes: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch train.py ARGS` as the README shows it: 1 process, or the CPU multi-process form."""
    command = [ACCELERATE, "launch"]
    extra = {"ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline", **(env or {})}
    if processes > 1:
        command += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    else:
        command += ["--cpu", "--num_processes", "1"]
    return subprocess.run(command + ["train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **extra})


def metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def train_args(directory: Path) -> list[str]:
    return ["--mode", "paper-split", "--steps", "2", "--batch-size", "4", "--seed", "0",
            "--output-dir", str(directory), "--workers", "0"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("one")
    result = launch(*train_args(directory))
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def test_paper_split_on_one_process_writes_the_loss_of_every_step(one_process_run):
    rows = metrics(one_process_run)
    assert [row["step"] for row in rows] == [0, 1]
    assert all(isinstance(row["loss"], float) for row in rows)


def test_paper_split_on_two_processes_logs_the_same_losses_as_one(one_process_run, tmp_path):
    result = launch(*train_args(tmp_path), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(one_process_run), metrics(tmp_path)
    assert [row["loss"] for row in two] == pytest.approx([row["loss"] for row in one], rel=1e-5)
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2


def run_train_py(*args: str, world_size: int = 1) -> subprocess.CompletedProcess:
    """train.py as a launcher would start rank 0 of `world_size`: bad input is refused before any group exists."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "RANK": "0"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize(("args", "world_size", "names"), [
    (["--mode", "model-parallel"], 1, "paper-split"),
    (["--mode", "paper-split"], 3, "--num_processes 2"),
    (["--mode", "paper-split", "--arch", "owt"], 1, "--arch paper"),
    (["--mode", "single"], 2, "data-parallel"),
    (["--mode", "weird-trick"], 3, "use one of"),
    (["--mode", "paper-split", "--exchange", "all"], 2, "weird-trick"),
])
def test_bad_input_is_one_line_naming_what_works_with_exit_code_2(args, world_size, names):
    result = run_train_py(*args, world_size=world_size)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.stderr
