"""Training for real: tracking writes its records, checkpoints resume exactly and load in any layout, and
faults stop the run cleanly with one clear line."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from safetensors.torch import load_file

from alexnet_mp import checkpoint, loop
from alexnet_mp.model import build_model
from alexnet_mp.tracking import WANDB_RUN_ID
from tests.equivalence import PAPER_NET
from tests.launching import (
    ROOT,
    in_process,
    launch,
    metrics,
    one_line_error,
    process_state_restored,
    records,
    run_ranks,
    start_ranks,
)

pytestmark = pytest.mark.slow  # whole training runs, launched and in this process

NET = ["--arch", PAPER_NET, "--num-classes", "10"]  # the debug net (tests/equivalence.py)


@pytest.fixture
def training_in_this_process(monkeypatch: pytest.MonkeyPatch):
    with process_state_restored():
        yield monkeypatch


@pytest.mark.usefixtures("training_in_this_process")
def test_tensorboard_tracker_writes_event_files(tmp_path, capsys):
    result = in_process(capsys, "train", "--mode", "single", "--steps", "1", "--batch-size", "2", *NET,
                        "--workers", "0", "--tracker", "tensorboard", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_wandb_that_refuses_to_start_is_one_line_that_says_what_to_do(training_in_this_process, tmp_path, capsys):
    """Here: no API key, as on a machine never logged in to W&B (the stand-in raises wandb's own error)."""
    import wandb
    from accelerate import Accelerator

    def refuse(*args: object, **kwargs: object) -> None:
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    training_in_this_process.setattr(Accelerator, "init_trackers", refuse)
    result = in_process(capsys, "train", "--mode", "single", "--steps", "1", "--batch-size", "2", *NET,
                        "--workers", "0", "--tracker", "wandb", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert one_line_error(result) == ("error: --tracker wandb: No API key configured. Use `wandb login` to log in; "
                                      "or set WANDB_MODE=offline to keep the run's record on disk (`wandb sync` "
                                      "uploads it later), or use --tracker none")


def test_the_loop_asks_for_the_next_batch_before_it_waits_for_the_step(training_in_this_process, tmp_path, capsys):
    """So that on a GPU the host decodes and queues batch k+1 while the device runs step k: the first
    read of step k's results (the flags the ranks agree on) comes after batch k+1 is asked for."""
    order = []
    batches, flags = loop.rank_batches, loop.agreed_flags

    def recorded_batches(*args: object):
        for batch in batches(*args):
            order.append(f"batch {batch[0]}")
            yield batch

    class RecordedFlags:
        def __init__(self, values: torch.Tensor) -> None:
            self.values = values

        def tolist(self) -> list[float]:
            order.append("wait")
            return self.values.tolist()

    training_in_this_process.setattr(loop, "rank_batches", recorded_batches)
    training_in_this_process.setattr(loop, "agreed_flags", lambda *args: RecordedFlags(flags(*args)))
    result = in_process(capsys, "train", "--mode", "single", "--steps", "3", "--batch-size", "2", *NET,
                        "--workers", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert order == ["batch 0", "batch 1", "wait", "batch 2", "wait", "wait"]
    assert [row["step"] for row in metrics(tmp_path)] == [0, 1, 2]


def readme_main_job() -> tuple[Path, list[str]]:
    """The launcher's config file and train.py's arguments in the README's first set-up command."""
    lines = (ROOT / "README.md").read_text().splitlines()
    command = next(line for line in lines if "accelerate launch" in line and "train.py" in line)
    launcher, train = command.split("accelerate launch", 1)[1].split("train.py", 1)
    return ROOT / shlex.split(launcher)[shlex.split(launcher).index("--config_file") + 1], shlex.split(train)


def test_the_readmes_main_job_lowers_the_loss_well_below_its_start_and_chance(tmp_path):
    """Its few steps with He et al.'s init; the paper's init stays at chance for far longer
    (docs/reproduction.md)."""
    config_file, args = readme_main_job()
    result = launch(*args, "--output-dir", str(tmp_path), config_file=config_file)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "were not passed to `accelerate launch`" not in result.stderr  # the README greets with no warning
    losses = [row["loss"] for row in metrics(tmp_path)]
    flags = dict(zip(args[::2], args[1::2], strict=True))  # each of the README's flags takes a value
    chance = math.log(int(flags["--num-classes"]))
    assert len(losses) == int(flags["--steps"])
    assert sum(losses[-5:]) / 5 < min(losses[0], chance) / 2
    assert checkpoint.find(str(tmp_path), tmp_path).step == len(losses)  # for the README's export and evaluate


@pytest.fixture(scope="module")
def image_folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paper-split for one epoch (3 steps of 4) on an image folder of JPEGs and PNGs. (That the JPEGs decoded on
    the device are the pixels the loader's workers decode, for training and validation: tests/test_data.py.)"""
    from tests.test_data import write_image_tree

    data = write_image_tree(tmp_path_factory.mktemp("data"), per_class=4)
    run = tmp_path_factory.mktemp("run")
    result = run_ranks("--mode", "paper-split", "--arch", PAPER_NET, "--data", str(data), "--batch-size", "4",
                       "--steps", "3", "--workers", "1", "--output-dir", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_training_on_an_image_folder_validates_and_checkpoints_at_the_epochs_end(image_folder_run):
    assert [row["step"] for row in metrics(image_folder_run)] == [0, 1, 2]
    (evaluation,) = [row for row in records(image_folder_run) if "val_loss" in row]
    assert 0 <= evaluation["val_top5_error"] <= evaluation["val_top1_error"] <= 1
    assert checkpoint.find("latest", image_folder_run / "checkpoints").step == 3


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """paper-split on 2 ranks: 6 steps straight, and 3 steps + resume + 3 steps (a run's last step is
    checkpointed, mid-epoch too), tracked in offline wandb."""
    common = ["--mode", "paper-split", "--batch-size", "4", *NET, "--workers", "0"]
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    for args in (["--steps", "6", "--output-dir", str(straight)],
                 ["--steps", "3", "--output-dir", str(resumed), "--tracker", "wandb"],
                 ["--steps", "6", "--output-dir", str(resumed), "--tracker", "wandb", "--resume", "latest"]):
        result = run_ranks(*common, *args, processes=2)
        assert result.returncode == 0, result.stderr[-3000:]
    return straight, resumed


def test_a_resumed_run_matches_the_straight_run_step_for_step(straight_and_resumed):
    straight, resumed = straight_and_resumed
    assert [row["step"] for row in metrics(resumed)] == list(range(6))
    assert [row["loss"] for row in metrics(resumed)] == [row["loss"] for row in metrics(straight)]
    one, two = (checkpoint.full_state(checkpoint.find("latest", d / "checkpoints")) for d in (straight, resumed))
    for state_one, state_two in zip(one, two, strict=True):
        assert all(torch.equal(state_one[key], state_two[key]) for key in state_one)


def test_a_resumed_runs_wall_time_goes_on_from_its_checkpoints(straight_and_resumed):
    _, resumed = straight_and_resumed
    rows = metrics(resumed)  # steps 0-2 before the resume, 3-5 after
    assert rows[3]["wall_s"] >= rows[2]["wall_s"] + rows[3]["step_time_s"]


def test_a_resumed_run_continues_its_wandb_run(straight_and_resumed):
    _, resumed = straight_and_resumed
    run_id = (resumed / WANDB_RUN_ID).read_text().strip()
    parts = list((resumed / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(part.name.endswith(f"-{run_id}") for part in parts)


@pytest.mark.usefixtures("training_in_this_process")
def test_resuming_a_finished_run_says_so_and_leaves_its_record_alone(straight_and_resumed, capsys):
    _, resumed = straight_and_resumed
    before = (resumed / "metrics.jsonl").read_text()
    result = in_process(capsys, "train", "--mode", "single", "--batch-size", "4", *NET, "--workers", "0",
                        "--steps", "5", "--resume", "latest", "--output-dir", str(resumed))
    assert result.returncode == 0 and "already at step 6 of 5" in result.stdout
    assert (resumed / "metrics.jsonl").read_text() == before


def test_rank_1s_tower_survives_a_resume(straight_and_resumed):
    _, resumed = straight_and_resumed
    found = checkpoint.find("latest", resumed / "checkpoints")
    shards = sorted(p.name for p in found.path.glob("shard-*.pt"))
    assert shards == ["shard-00000.pt", "shard-00001.pt"]
    tower1 = {key: (offsets, weight) for key, offsets, weight, _ in
              torch.load(found.path / "shard-00001.pt", weights_only=True)["blocks"]}
    offsets, conv1 = tower1["conv1.weight"]
    assert offsets == ((48, 96),) and "fc8.weight" not in tower1
    weights, _ = checkpoint.full_state(found)
    assert torch.equal(weights["conv1.weight"][48:], conv1)


def test_a_paper_split_checkpoint_exports_and_evaluates_on_one_device(straight_and_resumed, tmp_path, capsys):
    _, resumed = straight_and_resumed
    out = tmp_path / "alexnet.safetensors"
    assert in_process(capsys, "export", str(resumed / "checkpoints"), str(out)).returncode == 0
    net = build_model(PAPER_NET, num_classes=10)
    net.load_state_dict(load_file(str(out)))
    weights, _ = checkpoint.full_state(checkpoint.find("latest", resumed / "checkpoints"))
    assert all(torch.equal(net.state_dict()[key], weights[key]) for key in weights)
    result = in_process(capsys, "evaluate", str(resumed / "checkpoints"), "--synthetic-size", "512", "--batch-size",
                        "16", "--workers", "0")  # the data the run trained on: synthetic (a smaller set, for time)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on synthetic" in result.stdout and "top-1 error" in result.stdout and "top-5 error" in result.stdout


@pytest.mark.usefixtures("training_in_this_process")
def test_a_paper_split_checkpoint_resumes_under_data_parallel(straight_and_resumed, tmp_path, capsys):
    _, resumed = straight_and_resumed
    result = in_process(capsys, "train", "--mode", "data-parallel", "--batch-size", "4", *NET, "--workers", "0",
                        "--steps", "7", "--resume", str(resumed / "checkpoints"), "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in metrics(tmp_path)] == [6]


def single_run_in_process(capsys: pytest.CaptureFixture, output: Path, steps: int) -> subprocess.CompletedProcess:
    with process_state_restored():
        return in_process(capsys, "train", "--mode", "single", "--batch-size", "2", *NET, "--workers", "0",
                          "--steps", str(steps), "--resume", "auto", "--output-dir", str(output))


def test_resume_auto_starts_a_new_run_fresh_and_goes_on_from_an_earlier_ones_checkpoint(tmp_path, capsys):
    """One command for a job that may be requeued."""
    records_after = []
    for steps in (1, 2):
        result = single_run_in_process(capsys, tmp_path, steps)
        assert result.returncode == 0, result.stderr[-3000:]
        records_after.append(metrics(tmp_path))
    first, second = records_after
    assert [row["step"] for row in second] == [0, 1] and second[0] == first[0]  # step 0 kept, not run again
    assert checkpoint.find("latest", tmp_path / "checkpoints").step == 2


def test_a_run_resumed_after_its_schedule_lowered_the_rate_goes_on_at_the_lowered_rate_as_the_straight_run(
        tmp_path, capsys):
    """4 images a step, 8 an epoch: the step schedule lowers the rate tenfold at steps 2 and 4."""
    def run(output: Path, steps: int) -> list[tuple[float, float]]:
        with process_state_restored():
            result = in_process(capsys, "train", "--mode", "single", "--batch-size", "4", "--synthetic-size", "8", *NET,
                                "--workers", "0", "--lr-schedule", "step", "--lr-step-epochs", "1", "--steps",
                                str(steps), "--resume", "auto", "--output-dir", str(output))
        assert result.returncode == 0, result.stderr[-3000:]
        return [(row["lr"], row["loss"]) for row in metrics(output)]

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 4)
    assert run(tmp_path / "resumed", 6) == straight
    assert straight[5][0] == pytest.approx(1e-4)


def test_a_resume_after_a_run_killed_mid_line_leaves_out_the_cut_line_and_logs_its_step_again(tmp_path, capsys):
    assert single_run_in_process(capsys, tmp_path, 1).returncode == 0
    with (tmp_path / "metrics.jsonl").open("a") as record:
        record.write('{"step": 1, "wall_s": 0.1, "lo')  # where a kill mid-write leaves it
    result = single_run_in_process(capsys, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in metrics(tmp_path)] == [0, 1]


def test_a_resume_over_a_record_with_a_corrupt_line_is_refused_in_one_line_and_leaves_it_alone(tmp_path, capsys):
    assert single_run_in_process(capsys, tmp_path, 1).returncode == 0
    record = tmp_path / "metrics.jsonl"
    record.write_text("{not json\n" + record.read_text())
    before = record.read_text()
    result = single_run_in_process(capsys, tmp_path, 2)
    assert result.returncode == 2 and "metrics.jsonl line 1 is not JSON" in one_line_error(result)
    assert record.read_text() == before


def test_a_record_that_cannot_be_written_stops_the_run_in_one_line_keeping_its_checkpoints(tmp_path, capsys):
    assert single_run_in_process(capsys, tmp_path, 1).returncode == 0
    (tmp_path / "metrics.jsonl.tmp").symlink_to("/dev/full")  # every write: No space left on device
    result = single_run_in_process(capsys, tmp_path, 2)
    assert result.returncode == 1
    assert "metrics.jsonl.tmp (No space left on device): make room" in one_line_error(result)
    assert checkpoint.find("latest", tmp_path / "checkpoints").step == 1


def test_a_metrics_row_that_cannot_be_written_is_one_error_that_says_what_to_do(tmp_path):
    from types import SimpleNamespace

    from alexnet_mp.config import TrainConfig
    from alexnet_mp.errors import WriteFailed
    from alexnet_mp.tracking import Tracker

    tracker = Tracker(SimpleNamespace(), {}, TrainConfig(output_dir=str(tmp_path)), total=1)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(WriteFailed, match=r"metrics.jsonl \(No space left on device\): make room, then run"):
        tracker.log({"loss": 1.0}, 0)


@pytest.mark.usefixtures("training_in_this_process")
def test_a_resume_with_another_seed_or_batch_size_warns_that_its_batches_are_not_the_straight_runs(
        straight_and_resumed, tmp_path, capsys):
    _, resumed = straight_and_resumed
    result = in_process(capsys, "train", "--mode", "single", "--batch-size", "8", "--seed", "1", *NET,
                        "--workers", "0", "--steps", "7", "--resume", str(resumed), "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: resumed with --seed 1 (was 0), --batch-size 8 (was 4): from step 6 on" in result.stderr


@pytest.mark.usefixtures("training_in_this_process")
def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(straight_and_resumed, capsys):
    _, resumed = straight_and_resumed
    result = in_process(capsys, "train", "--mode", "single", *NET, "--arch", "owt", "--workers", "0",
                        "--steps", "8", "--resume", str(resumed / "checkpoints"), "--output-dir", str(resumed / "owt"))
    assert result.returncode == 2
    assert "--arch paper" in one_line_error(result)


@pytest.mark.parametrize("damage", ["a shard cut short", "a shard missing", "meta.json cut short"])
def test_an_unreadable_checkpoint_is_refused_in_one_line_naming_the_one_before_it(damage, straight_and_resumed,
                                                                                   tmp_path, capsys):
    _, resumed = straight_and_resumed
    newest = checkpoint.find("latest", resumed / "checkpoints").path
    folder = tmp_path / "checkpoints"
    shutil.copytree(newest, folder / "step-00000003", copy_function=os.link)  # an earlier one that verifies
    damaged = folder / "step-00000006"
    damaged.mkdir()
    shutil.copy(newest / "meta.json", damaged / "meta.json")
    if damage == "a shard cut short":
        with (newest / "shard-00000.pt").open("rb") as shard:
            (damaged / "shard-00000.pt").write_bytes(shard.read(4096))
    elif damage == "a shard missing":  # of the two towers' shards, tower 0's alone
        shutil.copy(newest / "shard-00000.pt", damaged / "shard-00000.pt")
    else:
        (damaged / "meta.json").write_text((newest / "meta.json").read_text()[:40])
    result = in_process(capsys, "export", str(folder), str(tmp_path / "alexnet.safetensors"))
    assert result.returncode == 2
    assert one_line_error(result).endswith(f"use an earlier checkpoint: {folder / 'step-00000003'}")


def test_a_runs_output_folder_stands_for_its_newest_checkpoint(straight_and_resumed):
    """What `export` and `evaluate` take, beside step-N and the folder of checkpoints."""
    _, resumed = straight_and_resumed
    newest = checkpoint.find("latest", resumed / "checkpoints").path
    assert checkpoint.find(str(resumed), resumed).path == checkpoint.find(str(resumed / "checkpoints"), resumed).path \
        == newest


@pytest.mark.usefixtures("training_in_this_process")
def test_a_class_with_no_readable_image_stops_training_in_one_line_from_a_loader_worker(tmp_path, capsys):
    from tests.test_data import write_image_tree

    data = write_image_tree(tmp_path / "data")
    for image in (data / "train" / "dog").iterdir():
        image.write_bytes(b"not an image")
    result = in_process(capsys, "train", "--mode", "single", "--data", str(data), "--batch-size", "9", "--steps", "1",
                        "--workers", "1", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert one_line_error(result).startswith("error: class 'dog' has no readable image: replace its files")


@pytest.mark.parametrize("batch_size", [4, 16], ids=["last-batch-filled-up", "set-smaller-than-a-batch"])
def test_evaluation_scores_every_validation_image_once_whatever_the_batch_size(batch_size):
    """The paper scores all 50,000 validation images: none is left out of a last, partial batch, and the
    images that fill it up are not scored twice."""
    import torch.nn.functional as F

    from alexnet_mp.config import TrainConfig
    from alexnet_mp.data import SyntheticImages
    from alexnet_mp.strategies import build

    dataset = SyntheticImages(num_classes=10, size=10, seed=0, split=1)
    layout = build(TrainConfig(mode="single", num_classes=10, init="he"), torch.device("cpu"))
    result = loop.evaluate(layout, dataset, batch_size, workers=0, device=torch.device("cpu"))
    layout.train(False)
    with torch.no_grad():
        images = torch.stack([dataset[(i, 0)][0] for i in range(len(dataset))])
        log_probabilities = layout.forward(images, 0, len(dataset)).log_softmax(-1)
    top5 = log_probabilities.topk(5, -1).indices
    labels = dataset.targets
    assert result.loss == pytest.approx(F.nll_loss(log_probabilities, labels).item(), rel=1e-5)
    assert result.top1_error == pytest.approx(1 - (top5[:, 0] == labels).double().mean().item())
    assert result.top5_error == pytest.approx(1 - (top5 == labels[:, None]).any(-1).double().mean().item())


def test_a_new_run_refuses_an_output_folder_that_holds_checkpoints_before_building_anything(straight_and_resumed,
                                                                                           capsys):
    _, resumed = straight_and_resumed
    before = (resumed / "metrics.jsonl").read_text()
    result = in_process(capsys, "train", "--mode", "paper-split", *NET, "--output-dir", str(resumed))
    assert result.returncode == 2 and "--resume latest" in one_line_error(result)
    assert (resumed / "metrics.jsonl").read_text() == before


def test_a_run_into_a_folder_that_a_live_run_holds_is_refused_in_one_line_naming_the_holder(straight_and_resumed,
                                                                                            capsys):
    from alexnet_mp.tracking import hold_output

    _, resumed = straight_and_resumed
    before = {path: path.read_bytes() for path in resumed.rglob("*") if path.is_file() and path.name != "run.lock"}
    with hold_output(resumed):  # as the live run's main process holds it
        result = in_process(capsys, "train", "--mode", "paper-split", *NET, "--output-dir", str(resumed),
                            "--resume", "latest", "--steps", "12")
    assert result.returncode == 2
    assert f"in use by a live run (pid {os.getpid()} on " in one_line_error(result)
    assert {path: path.read_bytes() for path in before} == before


@pytest.mark.usefixtures("training_in_this_process")
def test_a_loss_that_becomes_infinite_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    result = in_process(capsys, "train", "--mode", "single", "--lr", "1e6", "--batch-size", "4", *NET,
                        "--steps", "20", "--workers", "0", "--checkpoint-every", "1", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    message = one_line_error(result)
    assert "not finite at step" in message
    found = checkpoint.find("latest", tmp_path / "checkpoints")
    assert f"the newest checkpoint, {found.path}, is finite" in message
    weights, _ = checkpoint.full_state(found)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("complete", [1, 0], ids=["after-one-checkpoint", "before-any"])
def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_naming_the_newest_complete_one(
        complete, training_in_this_process, tmp_path, capsys):
    saves = []

    def save_until_the_disk_is_full(obj: object, file: BinaryIO, *args: object, **kwargs: object) -> None:
        saves.append(file)
        if len(saves) > complete:
            file.write(b"part of a shard")
            try:
                raise OSError(28, "No space left on device")
            except OSError:  # as torch's zip writer does on a full disk: closing the file fails in turn
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None
        torch_save(obj, file, *args, **kwargs)

    torch_save = torch.save
    training_in_this_process.setattr(torch, "save", save_until_the_disk_is_full)
    result = in_process(capsys, "train", "--mode", "single", "--batch-size", "2", *NET, "--steps", "3",
                        "--workers", "0", "--checkpoint-every", "1", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    first = tmp_path / "checkpoints" / "step-00000001"
    then = (f"the newest complete one, {first}, is intact: make room, then add --resume latest" if complete
            else "the run has no complete checkpoint yet: make room, then run it again")
    assert one_line_error(result).endswith(f"(No space left on device); {then}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"][:complete]


def test_a_checkpoint_whose_shards_rank_0_does_not_see_stops_in_one_line_saying_to_share_the_output_folder(
        training_in_this_process, tmp_path, capsys):
    """As when the nodes of a multi-node run each write into a folder of their own: here a second rank that
    wrote into one."""
    training_in_this_process.setattr(checkpoint, "_shard_writers", lambda *args: ([0, 1], True))
    result = in_process(capsys, "train", "--mode", "single", "--batch-size", "2", *NET, "--steps", "1",
                        "--workers", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert one_line_error(result).endswith("(rank 0 does not see shard-00001.pt, written by other ranks); the run "
                                           "has no complete checkpoint yet: give every node the same --output-dir, "
                                           "on a file system they share, then run it again")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_rank_that_dies_stops_the_others_with_a_clear_message(tmp_path):
    """The ranks started as a launcher without an agent of its own (srun, say) starts them; under
    `accelerate launch`, torchrun's agent also ends the survivors and names the rank that died."""
    ranks = start_ranks("--mode", "paper-split", "--batch-size", "4", *NET, "--steps", "1000", "--workers", "0",
                        "--timeout", "30", "--output-dir", str(tmp_path), processes=2)
    wait_for_steps(tmp_path, 1)
    ranks[1].kill()
    started = time.monotonic()
    _, stderr = ranks[0].communicate(timeout=120)
    assert ranks[0].returncode == 1
    assert time.monotonic() - started < 60
    assert "lost contact with another process" in one_line_error(subprocess.CompletedProcess([], 1, "", stderr))


def wait_for_steps(directory: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = directory / "metrics.jsonl"
        if path.exists() and len([line for line in path.read_text().splitlines() if json.loads(line)]) >= steps:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no {steps} logged steps in {directory}")


