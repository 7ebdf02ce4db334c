"""The experiment runner: every layout in turn on the same seed, data and global batch, each into
OUTPUT/NAME/<mode>-<ranks>/, all in one tracker group, then the comparison report."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from alexnet_mp.arguments import Parser, add_train_arguments, train_config
from alexnet_mp.errors import UsageError
from alexnet_mp.hardware import Hardware
from alexnet_mp.preflight import check_run
from alexnet_mp.report import compare
from alexnet_mp.strategies import layout_named
from alexnet_mp.tracking import publish_comparison


def launch_command(processes: int) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` for several ranks (NCCL on GPUs, gloo processes on a CPU-only machine); one rank
    is a plain process, which a Ctrl-C lets finish its checkpoint (accelerate's one-process launcher exits
    at once, and the runner would stop before its run has)."""
    train = ["-m", "alexnet_mp", "train"]
    if processes == 1:
        return [sys.executable, *train], {}
    env = {} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"}
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *train], env


def planned_runs(modes: Sequence[str], ranks: Sequence[int], folder: Path) -> list[tuple[str, int, Path]]:
    """(mode, processes, run folder): each mode at each rank count, a layout that runs on one world size
    only (single) once, on that."""
    runs: list[tuple[str, int, Path]] = []
    for mode in modes:
        for count in ranks:
            processes = layout_named(mode).fixed_world_size or count
            run = (mode, processes, folder / f"{mode}-{processes}")
            if run not in runs:
                runs.append(run)
    return runs


def run_experiment(name: str, modes: Sequence[str], ranks: Sequence[int], output: Path, train_args: Sequence[str],
                   hardware: Hardware | None = None) -> tuple[list[str], int]:
    """Runs each mode (single on 1 process, the others on each of `ranks`) and writes the comparison; returns
    the runs that failed, each with its exit code, and how many ran. What no run could do (an unknown mode,
    a world size or flag a layout refuses, a missing tracker) is refused first."""
    config, folder = train_config(_train_arguments(train_args)), output / name
    runs = planned_runs(modes, ranks, folder)
    for mode, processes, directory in runs:
        check_run(replace(config, mode=mode, output_dir=str(directory)), processes)
    directories, failed = [], []
    for mode, processes, directory in runs:
        command, env = launch_command(processes)
        # mixed precision as resolved here, for every run alike: a plain process would otherwise take it from
        # the runner's environment, a launched one from its launcher's --mixed_precision
        command += ["--mode", mode, "--output-dir", str(directory), "--group", name,
                    "--mixed-precision", config.mixed_precision, "--trace", *train_args]
        print(f"[{name}] {mode} on {processes} process(es) -> {directory}", flush=True)
        code = _run(command, {**os.environ, **env})
        if code:
            print(f"[{name}] {mode} failed (exit code {code}); the comparison leaves it out", file=sys.stderr)
            failed.append(f"{directory.name} (exit code {code})")
        directories.append(directory)
    comparison = compare(directories, folder, hardware)
    for line in comparison.broken:
        print(f"cannot compare {line}", file=sys.stderr)
    print(comparison.table)
    if config.tracker == "wandb" and comparison.rows:
        publish_comparison(comparison.tables(), comparison.plots, config.project, name, folder)
    return failed, len(runs)


def _run(command: list[str], env: dict[str, str]) -> int:
    """A run's exit code. Ctrl-C reaches the run as well (the terminal signals its whole process group),
    and a SIGTERM to the runner is passed on to it: the run finishes its step and checkpoints, which is
    waited for before the stop goes on, as a KeyboardInterrupt."""
    process = subprocess.Popen(command, env=env)

    def pass_on(signum: int, frame: object) -> None:
        process.send_signal(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, pass_on)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, before)


def _train_arguments(train_args: Sequence[str]) -> argparse.Namespace:
    """The training runs' arguments, read as they will read them. --mode and --group are the runner's to
    set: given among them, they would override it, and every run would be the same layout."""
    parser = Parser(add_help=False)
    add_train_arguments(parser)
    parser.set_defaults(mode=None, group=None)
    args = parser.parse_args(train_args)
    if args.mode is not None or args.group is not None:
        raise UsageError("an experiment sets each run's --mode and --group: give the layouts as --modes and the "
                         "group as --name")
    return args
