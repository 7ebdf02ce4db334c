"""Starting train.py the ways a user does: `accelerate launch` (1 process, or the documented CPU
multi-process form); or one plain python process per rank, with the environment a launcher gives
each rank, as a launcher without an agent of its own (srun, say) starts them. Tests of the
launcher's own path use the first; the others the second, which saves the launcher's start (about
3 s of imports) per run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# One thread a process: the pytest workers each start ranks on 2 cores, and a rank with a thread per core
# oversubscribes them (its threads spin while they wait for each other); and under every launcher alike (torchrun's
# default; a one-process accelerate launch sets none), so that a stopped run and its resume compute what the straight
# run computes, bit for bit.
ENV = {"ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


CPU_CONFIG = ROOT / "launch" / "cpu-2proc.yaml"
PORT_TAKEN = "EADDRINUSE"  # torch's words where the store's port is in use


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


def start_ranks(*args: str, processes: int = 1, own_process_groups: bool = False,
                env: dict[str, str] = ENV, program: Sequence[str] = ("train.py",)) -> list[subprocess.Popen]:
    """train.py ARGS (or `program` ARGS) once per rank, each with the environment a launcher sets (one plain process
    when `processes` is 1) over `env`; with `own_process_groups`, each rank leads a process group of its own,
    which its loader's workers join, as torchrun starts them (`os.killpg(rank.pid, ...)` signals all of them)."""
    port = free_port() if processes > 1 else None

    def launcher(rank: int) -> dict[str, str]:
        if port is None:
            return {}
        return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}

    return [subprocess.Popen([sys.executable, *program, *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **env, **launcher(rank)},
                             start_new_session=own_process_groups)
            for rank in range(processes)]


def run_ranks(*args: str, processes: int = 1, timeout: float = 300, env: dict[str, str] = ENV,
              program: Sequence[str] = ("train.py",)) -> subprocess.CompletedProcess:
    """`start_ranks`, waited for: the first failing exit code (else 0), rank 0's output, every rank's errors. Started
    once more where another process took the free port before rank 0 could listen on it (as torch's own tests retry
    such runs): the ranks then fail before they train, and leave nothing behind."""
    for _ in range(2):
        ranks = start_ranks(*args, processes=processes, env=env, program=program)
        outputs = [rank.communicate(timeout=timeout) for rank in ranks]
        errors = "".join(err for _, err in outputs)
        if PORT_TAKEN not in errors:
            break
    code = next((rank.returncode for rank in ranks if rank.returncode), 0)
    return subprocess.CompletedProcess(ranks[0].args, code, outputs[0][0], errors)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`python -m alexnet_mp ARGS` run in this process, for commands that start no process group, training
    in one process included (a fresh interpreter costs about 5 s of imports): its exit code and output."""
    from alexnet_mp.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exited:
        code = exited.code
    output = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "alexnet_mp", *args], code, output.out, output.err)


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """Training in the pytest process installs its stop-signal handlers and accelerate's shared state:
    both are put back afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def train_in_process(*args: str) -> None:
    """`python -m alexnet_mp train ARGS` in this process, for a fixture (no capsys): one that fails fails it."""
    from alexnet_mp.cli import main

    with process_state_restored():
        main(["train", *args])


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
