"""Starting train.py the ways a user does: `accelerate launch` (1 process, or the documented CPU
multi-process form), or plain python as one rank of a launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = {"ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


CPU_CONFIG = ROOT / "launch" / "cpu-2proc.yaml"


def launch_command(processes: int, config_file: Path | None = None) -> list[str]:
    command = [ACCELERATE, "launch"]
    if config_file is not None:
        return command + ["--config_file", str(config_file)]
    if processes > 1:
        return command + ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    return command + ["--cpu", "--num_processes", "1"]


def launch(*args: str, processes: int = 1, config_file: Path | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch train.py ARGS`, with flags or with one of launch/'s config files."""
    command = launch_command(processes, config_file) + ["train.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV})


def run_train_py(*args: str, world_size: int = 1) -> subprocess.CompletedProcess:
    """train.py as a launcher starts rank 0 of `world_size`: bad input is refused before any group exists."""
    env = {**os.environ, **ENV, "WORLD_SIZE": str(world_size), "RANK": "0"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)


def records(directory: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl: training steps and evaluations."""
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def metrics(directory: Path) -> list[dict]:
    """The per-step training rows of a run's metrics.jsonl."""
    return [row for row in records(directory) if "loss" in row]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]
