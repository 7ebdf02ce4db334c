"""The user's entry point: `accelerate launch train.py`, the same losses whatever the layout, and
one-line errors for what a layout cannot run."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from tests.equivalence import PAPER_NET
from tests.launching import (
    CPU_CONFIG,
    in_process,
    launch,
    metrics,
    one_line_error,
    process_state_restored,
    run_ranks,
    train_in_process,
)

# mode, processes, launched with launch/cpu-2proc.yaml (else with the README's flags)
# (one process under `accelerate launch` is the README's main job: tests/test_training.py)
LAUNCHED = [("paper-split", 2, False), ("data-parallel", 2, True)]
RUN = ["--arch", PAPER_NET, "--steps", "3", "--batch-size", "4", "--seed", "0", "--num-classes", "10", "--workers", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each layout for 3 steps on the same global batches (batch 4, seed 0, synthetic data): single, the
    reference, in this process (a launch would cost about 8 s more), the others launched."""
    done = {("single", 1): tmp_path_factory.mktemp("single-1")}
    train_in_process("--mode", "single", *RUN, "--output-dir", str(done["single", 1]))
    for mode, processes, with_config in LAUNCHED:
        directory = tmp_path_factory.mktemp(f"{mode}-{processes}")
        result = launch("--mode", mode, *RUN, "--output-dir", str(directory), processes=processes,
                        config_file=CPU_CONFIG if with_config else None)
        assert result.returncode == 0, result.stderr[-3000:]
        done[mode, processes] = directory
    return done


@pytest.mark.slow
def test_paper_split_writes_the_loss_of_every_step_to_metrics_jsonl(runs):
    rows = metrics(runs["paper-split", 2])
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(isinstance(row["loss"], float) for row in rows)


@pytest.mark.slow
def test_each_logged_step_records_the_wall_time_trained_so_far(runs):
    rows = metrics(runs["paper-split", 2])
    trained = 0.0
    for row in rows:
        trained += row["step_time_s"]
        assert row["wall_s"] >= trained
    assert rows[-1]["wall_s"] < 60  # seconds trained, not a clock's reading


@pytest.mark.slow
def test_paper_split_logs_the_time_blocked_on_each_link(runs):
    (first, *_) = metrics(runs["paper-split", 2])
    links = {key.split("/")[1] for key in first if key.startswith("comm_wait_s/")}
    assert links == {"conv3-input", "fc6-input", "fc7-input", "fc8-input"}
    assert first["comm_wait_s"] == pytest.approx(sum(first[f"comm_wait_s/{link}"] for link in links))


@pytest.mark.slow
def test_every_layout_logs_the_same_losses_as_single(runs):
    reference = [row["loss"] for row in metrics(runs["single", 1])]
    for key, directory in runs.items():
        assert [row["loss"] for row in metrics(directory)] == pytest.approx(reference, rel=1e-4), key


@pytest.mark.slow
def test_config_json_records_what_defines_the_run(runs):
    config = json.loads((runs["paper-split", 2] / "config.json").read_text())
    assert (config["mode"], config["world_size"], config["batch_size"], config["per_rank_batch"]) == \
        ("paper-split", 2, 4, 4)
    assert json.loads((runs["data-parallel", 2] / "config.json").read_text())["per_rank_batch"] == 2


@pytest.mark.parametrize(("args", "world_size", "names"), [
    (["--mode", "model-parallel"], 1, "paper-split"),
    (["--mode", "paper-split"], 3, "--num_processes 2"),
    (["--mode", "paper-split", "--arch", "owt"], 1, "--arch paper"),
    (["--mode", "single"], 2, "data-parallel"),
    (["--mode", "weird-trick"], 3, "use one of"),
    (["--mode", "tensor-parallel"], 3, "--mode tensor-parallel splits fc6/fc7"),
    (["--mode", "tensor-parallel"], 1, "--mode tensor-parallel needs 2 or more processes"),
    (["--mode", "weird-trick", "--exchange", "slice", "--batch-size", "6"], 4, "use a multiple of 16"),
    (["--mode", "fsdp"], 1, "2 or more processes"),
    (["--mode", "fsdp", "--batch-size", "6"], 4, "use a multiple of 4"),
    (["--mode", "pipeline"], 1, "2 to 8"),
    (["--mode", "pipeline"], 9, "2 to 8"),
    (["--mode", "pipeline", "--microbatches", "3", "--batch-size", "8"], 2, "use a multiple of 3"),
    (["--mode", "pipeline", "--schedule", "1f1b"], 2, "--microbatches 2 or more"),
    (["--mode", "pipeline", "--schedule", "zigzag"], 2, "argument --schedule: invalid choice"),
    (["--mode", "data-parallel", "--microbatches", "2"], 2, "--microbatches applies to --mode pipeline only"),
    (["--mode", "paper-split", "--exchange", "all"], 2, "weird-trick"),
    (["--mode", "weird-trick", "--fc-update", "per-round"], 2, "add --exchange one-at-a-time or slice"),
    (["--mode", "weird-trick", "--fc-update", "often"], 2, "argument --fc-update: invalid choice: 'often'"),
    (["--mode", "weird-trick", "--exchange", "slice", "--fc-update", "per-round", "--mixed-precision", "fp16"], 2,
     "fp32 or bf16"),
    (["--mode", "data-parallel", "--fc-update", "per-step"], 2, "--fc-update applies to --mode weird-trick only"),
    (["--cuda-graphs"], 1, "--compile"),  # CI has no GPU
    (["--triton-lrn"], 1, "drop the flag"),
])
def test_bad_input_is_one_line_naming_what_works_with_exit_code_2(args, world_size, names, monkeypatch, capsys):
    """train.py's own code path, in this process: the launcher's environment for rank 0 of `world_size`
    (tests/test_training.py runs train.py itself into such a refusal)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    result = in_process(capsys, "train", *args)
    assert result.returncode == 2 and names in one_line_error(result)


@pytest.mark.parametrize(("args", "says"), [
    (["train", "--log-every", "0"], "argument --log-every: must be at least 1, not 0"),
    (["train", "--workers", "-1"], "argument --workers: must be at least 0, not -1"),
    (["train", "--lr", "-0.01"], "argument --lr: must be at least 0, not -0.01"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["plan", "--device-tflops", "0"], "argument --device-tflops: must be more than 0, not 0"),
    (["plan", "--device-tflops", "1e300"], "argument --device-tflops: must be at most 1e+06, not 1e300"),
    (["train", "--timeout", "1e300"], "argument --timeout: must be at most 1e+09, not 1e300"),
    (["train", "--seed", "-1"], "argument --seed: must be at least 0, not -1"),
    (["calibrate", "--arch", "paper,alexnet"], "argument --arch: no net 'alexnet': choose from owt,"),
    (["experiment", "--name", "trial", "--modes", "single", "--batch-size", "0"], "argument --batch-size"),
])
def test_a_malformed_argument_is_refused_in_one_line_before_anything_runs(args, says, tmp_path, capsys):
    """argparse's own refusals too (a usage block of 40 options would bury them); the experiment runner
    refuses its training arguments before its first run."""
    result = in_process(capsys, *args, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and says in one_line_error(result) and "see --help" in one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "names"), [
    (["--modes", "single,paper-split", "--ranks", "3"], "--mode paper-split runs on 1 process or an even number"),
    (["--modes", "single,model-parallel"], "unknown --mode 'model-parallel'"),
    (["--modes", "single,paper-split", "--exchange", "all"], "--exchange applies to --mode weird-trick only"),
    (["--modes", "weird-trick", "--ranks", "4", "--exchange", "slice", "--batch-size", "6"], "use a multiple of 16"),
])
def test_an_experiment_refuses_a_layout_that_cannot_run_before_the_first_run(args, names, tmp_path, capsys):
    result = in_process(capsys, "experiment", "--name", "trial", *args, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and names in one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--mode", "data-parallel"], ["--mod", "single"], ["--group", "other"]])
def test_an_experiment_refuses_the_training_flags_it_sets_for_each_run(flag, tmp_path, capsys):
    """Passed on to every run, they would override the runner's: every run the same layout, or out of the group."""
    result = in_process(capsys, "experiment", "--name", "trial", "--modes", "single,paper-split", *flag,
                        "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "--modes" in one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "tracker", "install"), [
    (["train"], "wandb", "pip install wandb"),
    (["train"], "tensorboard", "pip install 'alexnet-mp[tensorboard]'"),
    (["experiment", "--name", "trial", "--modes", "single"], "wandb", "pip install wandb"),
])
def test_a_tracker_whose_package_is_missing_is_refused_in_one_line_before_any_run(command, tracker, install, tmp_path,
                                                                                 monkeypatch, capsys):
    """accelerate would only warn, then log nothing to it; the experiment runner would run every layout first."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == tracker else real(name, *rest))
    result = in_process(capsys, *command, "--tracker", tracker, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and install in one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "names"), [
    (["train", "--output-dir", "{}"], "--output-dir"),
    (["experiment", "--name", "trial", "--modes", "single", "--output-dir", "{}"], "--output-dir"),
    (["bench", "--quick", "--output-dir", "{}"], "--output-dir"),
    (["plan", "--output-dir", "{}"], "--output-dir"),
    (["compare", "runs/a", "--out", "{}"], "--out"),
    (["export", "runs/a", "{}/alexnet.safetensors"], "file to write"),
    (["calibrate", "--output", "{}/hardware.json"], "--output"),
])
def test_an_output_folder_that_cannot_be_written_is_refused_in_one_line_before_the_work(command, names, tmp_path,
                                                                                        capsys):
    """Here a folder under a file; as well, one without write permission or on a read-only file system."""
    (tmp_path / "a-file").write_text("kept")
    result = in_process(capsys, *(arg.format(tmp_path / "a-file" / "out") for arg in command))
    assert result.returncode == 2 and f"choose another {names}" in one_line_error(result)
    assert (tmp_path / "a-file").read_text() == "kept"


@pytest.mark.parametrize("gbps", ["nan", "inf"])
def test_a_link_bandwidth_that_is_not_a_finite_number_is_refused_in_one_line(gbps, capsys):
    result = in_process(capsys, "plan", "--link-gbps", f"16,{gbps}")
    assert result.returncode == 2 and f"--link-gbps takes positive finite numbers, not '16,{gbps}'" in \
        one_line_error(result)


def test_an_output_folder_on_a_file_system_that_takes_no_files_is_refused_in_one_line_even_for_root(capsys):
    """/proc: its mode lets root write, its file system makes no file."""
    result = in_process(capsys, "plan", "--output-dir", "/proc/alexnet-mp-plan")
    assert result.returncode == 2
    assert "/proc is not a folder this user can write to; choose another --output-dir" in one_line_error(result)


@pytest.mark.parametrize(("command", "suffix"), [
    (["export", "runs/a", "{}"], ".safetensors"),
    (["calibrate", "--output", "{}"], ".json"),
])
def test_a_folder_named_as_the_file_to_write_is_refused_in_one_line_before_the_work(command, suffix, tmp_path, capsys):
    """calibrate would measure for minutes, then fail to write its profile over the folder."""
    result = in_process(capsys, *(arg.format(tmp_path) for arg in command))
    assert result.returncode == 2 and f"is a folder: name the {suffix} file to write" in one_line_error(result)


def test_every_launch_config_names_its_process_count():
    import yaml

    from tests.launching import ROOT

    expected = {"one-process.yaml": 1, "cpu-2proc.yaml": 2, "paper-split-2gpu.yaml": 2, "4gpu.yaml": 4,
                "2node-4gpu.yaml": 4}
    for name, processes in expected.items():
        assert yaml.safe_load((ROOT / "launch" / name).read_text())["num_processes"] == processes


@pytest.mark.parametrize(("scaling", "expected"), [("none", 0.01), ("linear", 0.04), ("sqrt", 0.02)])
def test_lr_scaling_scales_from_the_papers_batch_of_128(scaling, expected):
    from alexnet_mp.config import TrainConfig

    assert TrainConfig(lr=0.01, batch_size=512, lr_scaling=scaling).scaled_lr == pytest.approx(expected)


def test_a_resume_compares_only_the_sample_flags_its_data_reads():
    from alexnet_mp.config import TrainConfig

    saved = TrainConfig(data="/data/imagenet").to_dict()
    assert TrainConfig(data="/data/imagenet", synthetic_size=64, lr=0.1, workers=8).sample_stream_changes(saved) == []
    assert TrainConfig(data="/data/other").sample_stream_changes(saved) == ["--data /data/other (was /data/imagenet)"]


@pytest.mark.parametrize(("flags", "expected"), [
    ([], ("/data/cifar", "cifar10", 512)),
    (["--data", "/data/imagenet"], ("/data/imagenet", "imagefolder", 512)),
    (["--data", "synthetic", "--synthetic-size", "64"], ("synthetic", "imagefolder", 64)),
])
def test_evaluate_scores_the_data_the_run_trained_on_unless_given_other_data(flags, expected):
    from alexnet_mp.cli import evaluation_data, parser
    from alexnet_mp.config import TrainConfig

    trained = TrainConfig(data="/data/cifar", dataset="cifar10", synthetic_size=512)
    spec = evaluation_data(parser().parse_args(["evaluate", "runs/a", *flags]), 10, trained.to_dict())
    assert (spec.data, spec.dataset, spec.synthetic_size) == expected


@pytest.mark.parametrize(("launcher", "flags", "expected"), [
    (None, [], "no"),
    ("bf16", [], "bf16"),  # accelerate launch --mixed_precision bf16, or its config file
    ("bf16", ["--mixed-precision", "fp16"], "fp16"),
])
def test_mixed_precision_is_the_flags_else_the_launchers(launcher, flags, expected, monkeypatch):
    """The Accelerator is given the run's value: were it always the flag's default, it would override the
    launcher's silently."""
    from alexnet_mp.arguments import train_config

    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert train_config(train_arguments(*flags)).mixed_precision == expected


def test_a_launchers_mixed_precision_this_project_does_not_run_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    result = in_process(capsys, "train", "--steps", "1")
    assert result.returncode == 2 and "mixed precision 'fp8'" in one_line_error(result)


def train_arguments(*flags: str):
    import argparse

    from alexnet_mp.arguments import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(flags))


def test_a_layouts_flags_become_its_options_and_only_those_given():
    from alexnet_mp.arguments import train_config

    config = train_config(train_arguments("--mode", "pipeline", "--microbatches", "4"))
    assert config.options == {"microbatches": 4}
    assert config.to_dict()["microbatches"] == 4 and "options" not in config.to_dict()


def test_an_option_value_given_in_code_outside_its_choices_is_refused_in_one_line():
    from alexnet_mp.config import TrainConfig
    from alexnet_mp.errors import UsageError
    from alexnet_mp.strategies import check_layout

    with pytest.raises(UsageError, match="--exchange diagonal is not one of: all, one-at-a-time, slice"):
        check_layout(TrainConfig(mode="weird-trick", options={"exchange": "diagonal"}), 2)


def test_speed_flags_become_the_layouts_speed_ups():
    from alexnet_mp.arguments import train_config
    from alexnet_mp.speed import Speed

    config = train_config(train_arguments("--channels-last", "--compile"))
    assert config.speed == Speed(channels_last=True, compile=True, cuda_graphs=False)


@pytest.mark.slow
def test_fp16_paper_split_runs_with_a_loss_scale_and_starts_at_the_float32_loss(runs, tmp_path):
    """fp16 autocast through the links, with one dynamic loss scale every rank agrees on. Steps whose
    scaled gradients overflow are skipped (and the scale halved), as with any dynamic loss scale, so
    only the first loss is compared with float32's (1e-2 relative)."""
    result = run_ranks("--mode", "paper-split", *RUN, "--steps", "2", "--mixed-precision", "fp16",
                       "--output-dir", str(tmp_path), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(metrics(runs["paper-split", 2])[0]["loss"], rel=1e-2)
    assert all(math.isfinite(row["loss"]) and math.log2(row["loss_scale"]).is_integer() for row in rows)


@pytest.mark.slow
def test_bf16_paper_split_logs_the_float32_losses_within_bf16_tolerance(runs, tmp_path):
    """--mixed-precision bf16 through the loop, both towers in this process (bf16 across processes' links:
    tests/test_speed.py); tolerance 2e-2 relative (bf16 keeps 8 bits of mantissa)."""
    train_in_process("--mode", "paper-split", *RUN, "--steps", "2", "--mixed-precision", "bf16",
                     "--output-dir", str(tmp_path))
    expected = [row["loss"] for row in metrics(runs["paper-split", 2])][:2]
    assert [row["loss"] for row in metrics(tmp_path)] == pytest.approx(expected, rel=2e-2)


def test_summary_per_tower_splits_the_paper_nets_parameters_between_its_towers(capsys):
    def totals(*args: str) -> list[int]:
        result = in_process(capsys, "summary", *args)
        assert result.returncode == 0, result.stderr
        (total,) = [line for line in result.stdout.splitlines() if line.startswith("| total")]
        cells = [cell.strip() for cell in total.strip("|").split("|")]
        return [int(cell.replace(",", "")) for cell in cells if "," in cell]

    (whole,) = totals()
    assert whole == 60_965_224 and sum(totals("--tower")) == whole  # fc8 lives on tower 0


def test_summary_per_tower_refuses_the_one_column_net(capsys):
    result = in_process(capsys, "summary", "--arch", "owt", "--tower")
    assert result.returncode == 2 and "--arch paper" in one_line_error(result)


def test_an_output_folder_on_a_file_system_without_locks_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    from alexnet_mp.tracking import hold_output

    def no_locks(file: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_output(tmp_path):
        assert (tmp_path / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert "has no locks (No locks available)" in capsys.readouterr().err


def training_that_raises(error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                         output: Path) -> subprocess.CompletedProcess:
    """`train` whose loop raises `error`, as a failure deep in a run would."""
    from alexnet_mp import loop

    def fails(*args: object) -> None:
        raise error

    monkeypatch.setattr(loop, "train", fails)
    with process_state_restored():
        return in_process(capsys, "train", "--mode", "single", "--output-dir", str(output))


def test_running_out_of_gpu_memory_is_one_line_that_says_what_to_lower(tmp_path, monkeypatch, capsys):
    import torch

    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
    result = training_that_raises(error, monkeypatch, capsys, tmp_path)
    assert result.returncode == 1
    assert "ran out of GPU memory: lower --batch-size" in one_line_error(result)


def test_loader_workers_out_of_shared_memory_is_one_line_that_says_how_to_give_them_more(tmp_path, monkeypatch,
                                                                                          capsys):
    """As torch reports it from a worker, when a container's /dev/shm (64 MB in Docker) cannot hold the batches."""
    error = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\nRuntimeError: unable to allocate shared memory(shm) for file "
                         "</torch_24787_4283425755_0>: No space left on device (28)\n")
    result = training_that_raises(error, monkeypatch, capsys, tmp_path)
    assert result.returncode == 1
    assert "workers ran out of shared memory (/dev/shm holds" in one_line_error(result)


@pytest.mark.parametrize("on_cpu", [False, True], ids=["on-gpus", "accelerate-use-cpu"])
def test_more_ranks_on_a_machine_than_it_has_gpus_are_refused_in_one_line_unless_they_run_on_the_cpu(
        on_cpu, monkeypatch):
    import torch

    from alexnet_mp.errors import UsageError
    from alexnet_mp.preflight import check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1" if on_cpu else "0")
    if on_cpu:
        check_gpus(2)
    else:
        with pytest.raises(UsageError, match="2 processes on this machine, 1 GPU"):
            check_gpus(2)
