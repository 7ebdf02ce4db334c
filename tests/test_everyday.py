"""Everyday use: a run says what it does in a log file, W&B gets a scalar per rank and honours its own
environment, a toy run can keep no checkpoint, plan writes no file unasked, a clean end leaves no lock,
warm-up raises the learning rate, a net that does not learn is named, and --help is quick."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_mp import loop
from tests.equivalence import PAPER_NET
from tests.launching import ENV, ROOT, in_process, metrics, process_state_restored

pytestmark = pytest.mark.slow  # whole training runs

TOY = ["--mode", "single", "--arch", PAPER_NET, "--batch-size", "4", "--num-classes", "10", "--workers", "0",
       "--synthetic-size", "8"]


@pytest.fixture
def training_in_this_process():
    with process_state_restored():
        yield


@pytest.fixture
def toy_run(training_in_this_process, tmp_path, capsys) -> subprocess.CompletedProcess:
    """Two steps (an epoch, so an evaluation), its output not a terminal, as in a cluster job's log."""
    result = in_process(capsys, "train", *TOY, "--steps", "2", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_run_whose_output_is_not_a_terminal_says_each_step_each_evaluation_and_its_end_in_a_line(toy_run,
                                                                                                   tmp_path):
    lines = toy_run.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert all(part in steps[0] for part in ("| loss ", "| lr 0.01 |", "images/s", "compute", "comm wait",
                                             "data wait", "peak"))
    assert any(line.startswith("evaluation after step 2 | val loss ") and "top-5 error" in line for line in lines)
    assert lines[-1].startswith("trained 2 steps in ") and str(tmp_path / "checkpoints" / "step-00000002") in lines[-1]


def test_a_run_that_ends_cleanly_leaves_no_lock_in_its_folder(toy_run, tmp_path):
    assert not (tmp_path / "run.lock").exists() and (tmp_path / "metrics.jsonl").is_file()


def test_no_checkpoints_writes_none_and_the_run_says_so(training_in_this_process, tmp_path, capsys):
    result = in_process(capsys, "train", *TOY, "--steps", "3", "--checkpoint-every", "1", "--no-checkpoints",
                        "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()
    assert result.stdout.splitlines()[-1].endswith("no checkpoint kept (--no-checkpoints)")


def test_warm_up_raises_the_learning_rate_linearly_to_lr_then_leaves_it(training_in_this_process, tmp_path, capsys):
    result = in_process(capsys, "train", *TOY, "--steps", "6", "--lr", "0.004", "--warmup-steps", "4",
                        "--no-checkpoints", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["lr"] for row in metrics(tmp_path)] == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.004, 0.004])


def test_a_loss_that_stays_at_chance_for_an_epoch_is_named_once(capsys):
    stuck = loop.StuckLoss(num_classes=10)
    for epoch in range(3):
        for loss in (math.log(10) + 0.001, math.log(10) - 0.002):
            stuck.add(loss)
        stuck.epoch_ended(epoch)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "stayed at chance, ln(classes) = 2.303, for all of epoch 0" in warnings[0]
    assert "--warmup-steps" in warnings[0]


def test_a_loss_that_moves_in_its_epoch_is_not_named(capsys):
    stuck = loop.StuckLoss(num_classes=10)
    for loss in (math.log(10), 1.5):
        stuck.add(loss)
    stuck.epoch_ended(0)
    assert "warning" not in capsys.readouterr().err


def wandb_record(folder: Path) -> bytes:
    """An offline W&B run's record stream (it has no public reader: tests look for what it holds)."""
    (record,) = folder.glob("offline-run-*/run-*.wandb")
    return record.read_bytes()


def test_wandb_gets_each_per_rank_figure_as_a_scalar_per_rank_and_honours_its_environment(tmp_path):
    """WANDB_DIR, WANDB_PROJECT, WANDB_RUN_GROUP and WANDB_TAGS, as W&B users set them."""
    wandb_dir = tmp_path / "wandb-here"
    wandb_dir.mkdir()
    env = {**os.environ, **ENV, "WANDB_DIR": str(wandb_dir), "WANDB_PROJECT": "envproject",
           "WANDB_RUN_GROUP": "envgroup", "WANDB_TAGS": "lab-a,lab-b"}
    result = subprocess.run([sys.executable, "-m", "alexnet_mp", "train", *TOY, "--steps", "1", "--no-checkpoints",
                             "--tracker", "wandb", "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "run" / "wandb").exists()
    record = wandb_record(wandb_dir / "wandb")
    assert all(token in record for token in (b"peak_memory_mb/rank0", b"comm_bytes/rank0", b"envproject", b"envgroup",
                                             b"lab-a", b"lab-b", b"torchvision", b"world_size"))


def test_wandb_flags_take_precedence_over_its_environment_and_a_run_has_a_group_and_tags_by_default():
    from alexnet_mp.config import TrainConfig
    from alexnet_mp.tracking import wandb_project, wandb_settings

    description = {"mode": "paper-split", "world_size": 2}
    flagged = TrainConfig(group="mine", project="myproject")
    plain = TrainConfig(batch_size=64, mixed_precision="bf16")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_RUN_GROUP", "theirs")
        env.setenv("WANDB_PROJECT", "theirproject")
        assert wandb_settings(flagged, description)["group"] == "mine"
        assert wandb_project(flagged) == "myproject"
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_RUN_GROUP", "WANDB_PROJECT", "WANDB_TAGS"):
            env.delenv(name, raising=False)
        settings = wandb_settings(plain, description)
        assert settings["group"] == "paper-b64" and wandb_project(plain) == "alexnet-mp"
        assert settings["tags"] == ["paper-split", "x2", "paper", "bf16"]


def test_plan_prints_its_prediction_and_writes_no_file_unless_told_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = in_process(capsys, "plan", "--gpus", "2")
    assert result.returncode == 0 and "| data-parallel | 2 |" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_ten_crop_evaluation_of_synthetic_data_scores_ten_crops():
    from alexnet_mp.data import SyntheticImages

    images, _ = SyntheticImages(10, 64, split=1, ten_crop=True)[(0, 0)]
    assert tuple(images.shape) == (10, 3, 224, 224)


LIGHT_COMMANDS = [["--help"], ["summary"], ["plan", "--gpus", "2"], ["train", "--help"]]


def test_help_summary_and_plan_import_none_of_the_training_stack():
    """torchvision, accelerate, wandb and matplotlib cost seconds to import; these commands use none of them. One
    interpreter runs each in turn, saying after each which of them it has imported so far: the first to import one
    is named."""
    probe = ("import json, sys\nfrom alexnet_mp.cli import main\nfor command in json.loads(sys.argv[1]):\n"
             "    try:\n        main(command)\n    except SystemExit:\n        pass\n"
             "    print('imported', command, sorted(m for m in ('torchvision', 'accelerate', 'wandb', 'matplotlib')"
             " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, json.dumps(LIGHT_COMMANDS)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **ENV})
    said = [line for line in result.stdout.splitlines() if line.startswith("imported ")]
    assert said == [f"imported {command} []" for command in LIGHT_COMMANDS], result.stderr[-2000:]
