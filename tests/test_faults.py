"""Fault injection: runs killed at their worst moments resume to the straight run's losses exactly, and bad
input is refused in one line (exit 2, no traceback) without changing a checkpoint. docs/faults.md keeps the
table of cases these tests hold true."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet_mp import checkpoint
from tests.equivalence import PAPER_NET
from tests.launching import (
    ACCELERATE,
    CPU_CONFIG,
    ENV,
    ROOT,
    free_port,
    in_process,
    metrics,
    one_line_error,
    process_state_restored,
    run_ranks,
    start_ranks,
    train_in_process,
)

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
NET = PAPER_NET  # the debug net (tests/equivalence.py): its checkpoints are a twelfth of the paper net's
PAPER_SPLIT = ["--mode", "paper-split", "--arch", NET, "--batch-size", "4", "--num-classes", "10", "--workers", "0",
               "--steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The losses of 4 uninterrupted steps of paper-split on 2 ranks."""
    folder = tmp_path_factory.mktemp("straight")
    result = run_ranks(*PAPER_SPLIT, "--no-checkpoints", "--output-dir", str(folder), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return [row["loss"] for row in metrics(folder)]


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the run did not get there")
        time.sleep(0.01)


def logged_steps(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def saving(folder: Path) -> bool:
    """A checkpoint's shards are being written (its staging folder exists)."""
    return any((folder / "checkpoints").glob("step-*.tmp"))


def kill_rank_1_mid_step(ranks: list[subprocess.Popen], folder: Path) -> None:
    wait_for(lambda: logged_steps(folder) >= 2)
    ranks[1].kill()


def kill_every_rank_into_a_save(ranks: list[subprocess.Popen], folder: Path) -> None:
    """As soon as a save's staging folder is seen (polled every 10 ms): the kill lands while the shards are written."""
    wait_for(lambda: logged_steps(folder) >= 2 and saving(folder))
    for rank in ranks:
        os.killpg(rank.pid, signal.SIGKILL)


# A SIGTERM to every rank: the stops under each launch form, below.
@pytest.mark.parametrize("fault", [kill_rank_1_mid_step, kill_every_rank_into_a_save],
                         ids=["kill -9 rank 1 mid-step", "kill -9 all mid-save"])
@pytest.mark.slow
def test_a_run_stopped_by_a_fault_resumes_to_the_straight_runs_losses_exactly(straight, fault, tmp_path):
    ranks = start_ranks(*PAPER_SPLIT, "--timeout", "20", "--output-dir", str(tmp_path), processes=2,
                        own_process_groups=True)
    try:
        fault(ranks, tmp_path)
    finally:
        for rank in ranks:
            rank.communicate(timeout=120)
    resumed = run_ranks(*PAPER_SPLIT, "--resume", "auto", "--output-dir", str(tmp_path), processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["loss"] for row in metrics(tmp_path)] == straight
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


@pytest.mark.slow
def test_a_full_disk_mid_save_keeps_the_last_checkpoint_and_resumes_to_the_straight_runs_losses(straight, tmp_path):
    """On a 60 MiB tmpfs (in a mount namespace of its own), step 1's checkpoint (about 37 MiB) fits and
    step 2's does not: the run stops in one line, and the folder copied out resumes exactly."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here to mount a small tmpfs in")
    mounted, kept = tmp_path / "tmpfs", tmp_path / "kept"
    mounted.mkdir()
    script = (f"mount -t tmpfs -o size=60m tmpfs {mounted} && {TORCHRUN} --standalone --nproc_per_node 2 train.py "
              f"{' '.join(PAPER_SPLIT)} --output-dir {mounted}/run; code=$?; cp -r {mounted}/run {kept}; exit $code")
    full = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert full.returncode != 0
    assert "(No space left on device); the newest complete one" in full.stderr
    assert [p.name for p in checkpoint.complete_checkpoints(kept / "checkpoints")] == ["step-00000001"]
    resumed = run_ranks(*PAPER_SPLIT, "--resume", "latest", "--output-dir", str(kept), processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["loss"] for row in metrics(kept)] == straight


@pytest.mark.slow
def test_a_launcher_killed_with_its_process_group_leaves_no_rank_running(tmp_path):
    """torchrun starts each rank in a session of its own, out of reach of a kill of the launcher's group."""
    launcher = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "train.py",
         *PAPER_SPLIT, "--steps", "1000", "--no-checkpoints", "--output-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV},
        start_new_session=True)
    wait_for(lambda: logged_steps(tmp_path) >= 1)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    wait_for(lambda: not _held(tmp_path / "run.lock"), timeout=60)


def _held(lock: Path) -> bool:
    """Whether a process still holds `lock`: not once the last rank has let it go, or removed it."""
    import fcntl

    try:
        file = open(lock)
    except FileNotFoundError:  # removed by its holder as it exited, between any check and this open
        return False
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
        return False


class Killed(Exception):
    pass


def test_pruning_renames_a_checkpoint_out_of_reach_before_deleting_it(tmp_path, monkeypatch):
    old = tmp_path / "step-00000001"
    old.mkdir()
    (old / "meta.json").write_text("{}")

    def killed_while_deleting(path: Path) -> None:
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Killed):
        checkpoint._remove(old)
    assert not old.exists()
    assert checkpoint.complete_checkpoints(tmp_path) == []


SINGLE = ["--mode", "single", "--arch", NET, "--batch-size", "4", "--num-classes", "10", "--workers", "0",
          "--synthetic-size", "8"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-process run of 2 steps with checkpoints at both (once a worker: its classes share it)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(*SINGLE, "--steps", "2", "--checkpoint-every", "1", "--output-dir", str(folder))
    return folder


def link_or_copy(source: str, destination: str) -> None:
    """Shards hard-linked (each is hundreds of MB; nothing rewrites one in place: see `rewrite`), the rest copied."""
    if source.endswith(".pt"):
        os.link(source, destination)
    else:
        shutil.copy2(source, destination)


@pytest.fixture
def single_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of `finished_run` of this test's own."""
    return Path(shutil.copytree(finished_run, tmp_path / "run", copy_function=link_or_copy))


def rewrite(path: Path, data: bytes) -> None:
    """A new file at `path`: a shard's other links keep their contents."""
    path.unlink()
    path.write_bytes(data)


def test_a_start_removes_what_a_cut_short_save_or_pruning_left_and_says_so(single_run, capsys):
    folder = single_run / "checkpoints"
    leftovers = [folder / "removing-step-00000000", folder / "step-00000004.tmp"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "shard-00000.pt.part").write_bytes(b"half")
    with process_state_restored():
        result = in_process(capsys, "train", *SINGLE, "--steps", "3", "--resume", "latest",
                            "--output-dir", str(single_run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"removed {leftover}: an incomplete checkpoint" in result.stderr for leftover in leftovers)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]


def test_a_step_folder_without_meta_json_is_never_deleted_and_a_save_of_its_step_sets_it_aside(single_run, capsys):
    """It may hold the only copy of some weights: nothing this program writes leaves such a folder."""
    orphan = single_run / "checkpoints" / "step-00000003"
    orphan.mkdir()
    (orphan / "shard-00000.pt").write_bytes(b"weights")
    with process_state_restored():
        result = in_process(capsys, *TRAIN, "--resume", "latest", "--output-dir", str(single_run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (single_run / "checkpoints" / "step-00000003.set-aside" / "shard-00000.pt").read_bytes() == b"weights"
    assert (orphan / "meta.json").is_file()


def test_a_net_that_diverges_is_never_checkpointed_and_the_error_names_the_newest_finite_one(single_run, capsys):
    with process_state_restored():
        result = in_process(capsys, "train", *SINGLE, "--steps", "6", "--lr", "1e39",
                            "--checkpoint-every", "1", "--resume", "latest", "--output-dir", str(single_run))
    assert result.returncode == 1
    message = one_line_error(result)
    assert "not finite" in message and f"the newest checkpoint, {single_run / 'checkpoints'}" in message
    for found in checkpoint.complete_checkpoints(single_run / "checkpoints"):
        weights, momentum = checkpoint.full_state(checkpoint.find(str(found), found.parent))
        assert all(value.isfinite().all() for value in [*weights.values(), *momentum.values()])


def test_more_unreadable_images_than_the_limit_stop_the_run_in_one_line(tmp_path, capsys):
    from tests.test_data import write_image_tree

    root = write_image_tree(tmp_path / "data", per_class=4)
    for image in sorted((root / "train").glob("*/*"))[:3]:
        image.write_bytes(b"not an image")
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--arch", NET, "--data", str(root), "--batch-size",
                            "4", "--workers", "0", "--steps", "6", "--max-bad-images", "2", "--no-checkpoints",
                            "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "3 training images are unreadable, more than --max-bad-images 2" in one_line_error(result)


def test_unreadable_images_within_the_limit_are_counted_at_each_epochs_end(tmp_path, capsys):
    from tests.test_data import write_image_tree

    root = write_image_tree(tmp_path / "data", per_class=4)
    (next((root / "train").glob("*/*"))).write_bytes(b"not an image")
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--arch", NET, "--data", str(root), "--batch-size",
                            "4", "--workers", "0", "--epochs", "1", "--no-checkpoints",
                            "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 0: 1 unreadable training images skipped so far" in result.stdout + result.stderr


@pytest.mark.slow
def test_unreadable_images_met_by_different_ranks_are_each_counted_once(tmp_path):
    from tests.test_data import write_image_tree

    root = write_image_tree(tmp_path / "data", per_class=4)
    bad = [next(folder.iterdir()) for folder in sorted((root / "train").iterdir())]
    for image in bad:
        image.write_bytes(b"not an image")
    # data-parallel: each rank reads its half of a batch, so a rank's own count misses the other's images
    result = run_ranks("--mode", "data-parallel", "--arch", NET, "--data", str(root), "--batch-size", "4",
                       "--workers", "0", "--epochs", "1", "--max-bad-images", "10", "--no-checkpoints", "--output-dir",
                       str(tmp_path / "run"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"epoch 0: {len(bad)} unreadable training images skipped so far" in result.stdout


@pytest.mark.slow
def test_every_rank_that_refuses_input_says_so_in_its_own_line_naming_itself(tmp_path):
    """A launcher may kill the other ranks as soon as one exits: a line left to rank 0 alone could be lost."""
    result = run_ranks("--mode", "weird-trick", "--fc-update", "per-round", "--output-dir", str(tmp_path),
                       processes=2)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2
    assert sorted(line.split("error:")[0] for line in lines) == ["", "rank 1: "]
    assert all(line.endswith("add --exchange one-at-a-time or slice") for line in lines)


def files_digest(folder: Path) -> list[tuple[str, int, int, int]]:
    """Each file's name, inode, size and modification time: what any write to a checkpoint changes."""
    return [(str(path.relative_to(folder)), path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))]


def meta_of(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002" / "meta.json"


def shard_of(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002" / "shard-00000.pt"


def edit_meta(run: Path, **changes: object) -> None:
    """The newest checkpoint's meta.json with `changes` (None: the field removed)."""
    meta = json.loads(meta_of(run).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    rewrite(meta_of(run), json.dumps(meta).encode())


def saved(run: Path, key: str) -> dict:
    """The newest checkpoint's meta.json's `key`: the run's config or its schedule."""
    return json.loads(meta_of(run).read_text())[key]


def overwrite_middle(path: Path, byte: int, count: int = 8000) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes([byte]) * count
    rewrite(path, bytes(data))


TRAIN = ["train", *SINGLE, "--steps", "3"]
# (what is wrong, how to make it given a finished run's folder, the arguments after TRAIN, words of the refusal)
BAD_INPUTS = [
    ("--lr nan", None, ["--lr", "nan"], "must be a finite number"),
    ("--momentum inf", None, ["--momentum", "inf"], "must be a finite number"),
    ("--weight-decay -1", None, ["--weight-decay", "-1"], "must be at least 0"),
    ("--timeout nan", None, ["--timeout", "nan"], "must be a finite number"),
    ("--batch-size 0", None, ["--batch-size", "0"], "must be at least 1"),
    ("--steps x", None, ["--steps", "x"], "invalid int value"),
    ("a --synthetic-size past torch's largest integer", None, ["--synthetic-size", str(2 ** 63)],
     "must be at most 9223372036854775807"),
    ("an unknown mode", None, ["--mode", "magic"], "unknown --mode 'magic'; choose one of"),
    ("an unknown flag", None, ["--speed", "11"], "unrecognized arguments"),
    ("another layout's option", None, ["--exchange", "slice"], "--exchange"),
    ("a batch larger than the data", None, ["--batch-size", "16", "--resume", "latest"],
     "larger than the 8 training images"),
    ("a data folder that does not exist", None, ["--data", "/nonexistent", "--resume", "latest"], "no such folder"),
    ("a new run into a folder with checkpoints", None, [], "already holds a run with checkpoints"),
    ("--resume latest with no checkpoint", lambda run: shutil.rmtree(run / "checkpoints"), ["--resume", "latest"],
     "no checkpoint in"),
    ("a meta.json that is not JSON", lambda run: rewrite(meta_of(run), b"{"), ["--resume", "latest"],
     "meta.json is corrupt"),
    ("a meta.json that is a list", lambda run: rewrite(meta_of(run), b"[]"), ["--resume", "latest"],
     "meta.json is corrupt"),
    ("a meta.json without its fields", lambda run: rewrite(meta_of(run), b'{"step": 2}'), ["--resume", "latest"],
     "meta.json is corrupt"),
    ("a truncated shard", lambda run: rewrite(shard_of(run), shard_of(run).read_bytes()[:1000]),
     ["--resume", "latest"], "does not match the SHA-256"),
    ("a truncated shard of a checkpoint written before checksums", lambda run: (
        edit_meta(run, sha256=None), rewrite(shard_of(run), shard_of(run).read_bytes()[:1000])),
     ["--resume", "latest"], "cannot be read (RuntimeError)"),
    ("a missing shard", lambda run: shard_of(run).unlink(), ["--resume", "latest"], "lacks shard-00000.pt of its 1"),
    ("a checkpoint of another class count", None, ["--resume", "latest", "--num-classes", "5"],
     "pass the same --arch and --num-classes"),
    ("a checkpoint of another arch", None, ["--resume", "latest", "--arch", "owt"],
     "pass the same --arch and --num-classes"),
    ("a meta.json without the schedule", lambda run: edit_meta(run, scheduler=None), ["--resume", "latest"],
     "lacks the training run's config or schedule"),
    ("a meta.json without the config", lambda run: edit_meta(run, config=None), ["--resume", "latest"],
     "lacks the training run's config or schedule"),
    ("a meta.json with a negative step", lambda run: edit_meta(run, step=-3), ["--resume", "latest"],
     "meta.json is corrupt (step -3"),
    ("a meta.json whose config has a negative seed", lambda run: edit_meta(run, config={**saved(run, "config"),
                                                                                          "seed": -1}),
     ["--resume", "latest"], "no usable seed"),
    ("a meta.json whose schedule's progress is not a count",
     lambda run: edit_meta(run, scheduler={**saved(run, "scheduler"), "num_bad_epochs": "x"}), ["--resume", "latest"],
     "meta.json is corrupt (its scheduler's num_bad_epochs)"),
    ("a meta.json whose lowered rate is not a share of the rate", lambda run: edit_meta(run, lowered_by=2),
     ["--resume", "latest"], "lowered_by 2 is not a share of the learning rate"),
    ("a meta.json whose loss scale is not a number",
     lambda run: edit_meta(run, loss_scale={"value": "x", "clean_steps": 0}),
     ["--resume", "latest", "--mixed-precision", "fp16"], "its loss_scale is not a scale and a count"),
    ("a checkpoint of format 1", lambda run: edit_meta(run, format=1), ["--resume", "latest"],
     "has checkpoint format 1; this version reads format 2 only"),
    ("a shard with 8000 bytes changed", lambda run: overwrite_middle(shard_of(run), 0x5A), ["--resume", "latest"],
     "shard-00000.pt does not match the SHA-256 recorded when it was written"),
    ("a shard with 8000 bytes set to 0xFF", lambda run: overwrite_middle(shard_of(run), 0xFF), ["--resume", "latest"],
     "shard-00000.pt does not match the SHA-256 recorded when it was written"),
    ("another learning-rate schedule", None, ["--resume", "latest", "--lr-schedule", "step"],
     "pass --lr-schedule plateau"),
    ("a new run into a folder that holds a --no-checkpoints run", lambda run: shutil.rmtree(run / "checkpoints"), [],
     "already holds a run's config.json and metrics.jsonl"),
    ("a run.lock that links elsewhere", lambda run: (run / "run.lock").symlink_to(run / "config.json"),
     ["--resume", "latest"], "run.lock is a symbolic link"),
]


@pytest.mark.parametrize(("damage", "arguments", "says"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_with_exit_2_and_changes_no_checkpoint(single_run, damage, arguments, says,
                                                                                  capsys):
    if damage:
        damage(single_run)
    before = files_digest(single_run / "checkpoints") if (single_run / "checkpoints").exists() else None
    with process_state_restored():
        result = in_process(capsys, *TRAIN, *arguments, "--output-dir", str(single_run))
    assert result.returncode == 2
    assert says in one_line_error(result)
    assert "Traceback" not in result.stderr
    after = files_digest(single_run / "checkpoints") if (single_run / "checkpoints").exists() else None
    assert before == after
    assert json.loads((single_run / "config.json").read_text())["steps"] == 2  # the run's record is its own
    assert not (single_run / "run.lock").exists() or (single_run / "run.lock").is_symlink()


# Files a user hands in run no code.

class RunsCode:
    """What a crafted pickle holds: loading it would run a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def craft_checkpoint(run: Path, marker: Path, format_: int) -> None:
    """The newest checkpoint of `run` with its shard a pickle that runs code when loaded, and a meta.json that
    vouches for it with the shard's SHA-256, as someone who writes both files would make it."""
    shard = shard_of(run)
    shard.unlink()
    with open(shard, "wb") as file:
        torch.save({"blocks": RunsCode(marker), "pieces": RunsCode(marker)}, file)
    edit_meta(run, format=format_, sha256={shard.name: hashlib.sha256(shard.read_bytes()).hexdigest()})


# each command that reads a checkpoint: its arguments, given a run's folder and a folder of the test's own
READS_A_CHECKPOINT = {
    "train --resume PATH": lambda run, out: [*TRAIN, "--resume", str(run / "checkpoints" / "step-00000002"),
                                             "--output-dir", str(out / "run")],
    "train --resume latest": lambda run, out: [*TRAIN, "--resume", "latest", "--output-dir", str(run)],
    "train --resume auto": lambda run, out: [*TRAIN, "--resume", "auto", "--output-dir", str(run)],
    "export": lambda run, out: ["export", str(run), str(out / "net.safetensors")],
    "evaluate": lambda run, out: ["evaluate", str(run), "--workers", "0"],
}


class TestFilesAUserHandsInRunNoCode:
    @pytest.mark.parametrize("format_", [1, 2], ids=["format 1", "format 2 with its checksum"])
    @pytest.mark.parametrize("command", READS_A_CHECKPOINT)
    def test_a_crafted_checkpoint_runs_no_code_through_any_command(self, single_run, tmp_path, command, format_,
                                                                   capsys):
        marker = tmp_path / "code-ran"
        craft_checkpoint(single_run, marker, format_)
        with process_state_restored():
            result = in_process(capsys, *READS_A_CHECKPOINT[command](single_run, tmp_path))
        assert result.returncode == 2, result.stderr[-3000:]
        assert not marker.exists()
        assert "step-00000002" in one_line_error(result) and "Traceback" not in result.stderr


    @pytest.mark.parametrize("command", ["train", "evaluate"])
    def test_a_crafted_cifar_batch_runs_no_code(self, single_run, tmp_path, command, capsys):
        from tests.test_data import write_cifar

        root, marker = write_cifar(tmp_path / "data"), tmp_path / "code-ran"
        for name in ("batches.meta", "data_batch_1", "test_batch"):
            (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(RunsCode(marker)))
        data = ["--dataset", "cifar10", "--data", str(root)]
        arguments = [*TRAIN, *data, "--output-dir", str(tmp_path / "new-run")] if command == "train" else \
            ["evaluate", str(single_run), *data, "--workers", "0"]
        with process_state_restored():
            result = in_process(capsys, *arguments)
        assert result.returncode == 2
        assert not marker.exists()
        assert "which a CIFAR-10 batch does not hold" in one_line_error(result)


    def test_a_cifar_batch_of_the_wrong_shape_is_refused_in_one_line(self, tmp_path, capsys):
        from tests.test_data import write_cifar

        root = write_cifar(tmp_path / "data")
        (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(
            pickle.dumps({b"data": np.zeros((4, 1000), np.uint8), b"labels": [0, 1, 2, 3]}))
        with process_state_restored():
            result = in_process(capsys, *TRAIN, "--dataset", "cifar10", "--data", str(root), "--output-dir",
                                str(tmp_path / "run"))
        assert result.returncode == 2
        assert "its data is uint8 (4, 1000), not rows of 3072 bytes" in one_line_error(result)

    def test_a_cifar_batch_giving_a_length_past_any_memory_is_refused_as_corrupt_not_as_out_of_memory(
            self, tmp_path, capsys):
        from tests.test_data import write_cifar

        root = write_cifar(tmp_path / "data")
        bytes_of_2_to_the_62 = b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little") + b"."  # pickle's BINBYTES8
        (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(bytes_of_2_to_the_62)
        with process_state_restored():
            result = in_process(capsys, *TRAIN, "--dataset", "cifar10", "--data", str(root), "--output-dir",
                                str(tmp_path / "run"))
        assert result.returncode == 2
        assert "data_batch_2 is not a CIFAR-10 python batch (it gives a length past any memory)" in \
            one_line_error(result)


    @pytest.fixture
    def world_readable(self) -> Iterator[Path]:
        """A folder any user can reach (pytest's own are root's alone), removed afterwards."""
        folder = Path(tempfile.mkdtemp())
        folder.chmod(0o755)
        yield folder
        shutil.rmtree(folder)


    @pytest.mark.parametrize("unreadable", ["an image folder", "a CIFAR batch"])
    def test_data_this_user_cannot_read_is_refused_in_one_line(self, world_readable, unreadable, capsys):
        """Run as `nobody`: root reads every file whatever its mode."""
        from tests.test_data import write_cifar, write_image_tree

        if os.geteuid() != 0:
            pytest.skip("needs root, to act as another user")
        if unreadable == "an image folder":
            root, data = write_image_tree(world_readable / "data"), []
            (root / "train").chmod(0o700)
        else:
            root, data = write_cifar(world_readable / "data"), ["--dataset", "cifar10"]
            (root / "cifar-10-batches-py" / "data_batch_3").chmod(0o600)
        out = world_readable / "out"
        out.mkdir()
        out.chmod(0o777)
        os.setegid(65534)
        os.seteuid(65534)
        try:
            with process_state_restored():
                result = in_process(capsys, *TRAIN, "--data", str(root), *data, "--output-dir", str(out / "run"))
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert result.returncode == 2
        assert "cannot be read (Permission denied): give this user read access" in one_line_error(result)


    @pytest.mark.parametrize("name", ["../../x", "a/b", "..", ""])
    def test_an_experiment_name_is_one_folder_name(self, tmp_path, name, capsys):
        result = in_process(capsys, "experiment", "--name", name, "--modes", "single", "--output-dir",
                            str(tmp_path / "runs" / "here"))
        assert result.returncode == 2
        assert "give one folder name" in one_line_error(result)
        assert list(tmp_path.iterdir()) == []


# No checkpoint lost or silently altered.

class TestNoCheckpointLostOrChanged:
    @pytest.mark.parametrize("named", ["step-00000002", "step-00000002.tmp"])
    def test_a_refused_resume_deletes_nothing_of_the_folder_it_names(self, single_run, named, capsys):
        folder = single_run / "checkpoints" / named
        os.replace(single_run / "checkpoints" / "step-00000002", folder)
        (folder / "meta.json").unlink()
        before = files_digest(single_run / "checkpoints")
        with process_state_restored():
            result = in_process(capsys, *TRAIN, "--resume", str(folder), "--output-dir", str(single_run))
        assert result.returncode == 2
        assert "is not a checkpoint folder (no meta.json)" in one_line_error(result)
        assert files_digest(single_run / "checkpoints") == before


    @pytest.mark.parametrize("command", READS_A_CHECKPOINT)
    def test_a_changed_shard_is_named_with_the_newest_earlier_checkpoint_that_verifies(self, single_run, tmp_path,
                                                                                      command, capsys):
        overwrite_middle(shard_of(single_run), 0xFF)
        with process_state_restored():
            result = in_process(capsys, *READS_A_CHECKPOINT[command](single_run, tmp_path))
        assert result.returncode == 2
        message = one_line_error(result)
        assert f"{shard_of(single_run)} does not match the SHA-256 recorded when it was written" in message
        assert message.endswith(f"use an earlier checkpoint: {single_run / 'checkpoints' / 'step-00000001'}")


    def test_an_earlier_checkpoint_that_does_not_verify_is_not_offered(self, single_run, capsys):
        overwrite_middle(shard_of(single_run), 0xFF)
        overwrite_middle(single_run / "checkpoints" / "step-00000001" / "shard-00000.pt", 0xFF)
        with process_state_restored():
            result = in_process(capsys, *TRAIN, "--resume", "latest", "--output-dir", str(single_run))
        assert result.returncode == 2
        assert one_line_error(result).endswith("no earlier checkpoint beside it verifies")


    @pytest.mark.parametrize("meta", [{"num_classes": 1000}, {"num_classes": -1}, {"arch": "owt"}],
                             ids=["num_classes 1000", "num_classes -1", "arch owt"])
    @pytest.mark.parametrize("command", ["export", "evaluate"])
    def test_a_meta_json_that_does_not_match_its_shards_is_refused_in_one_line(self, single_run, tmp_path, command,
                                                                              meta, capsys):
        edit_meta(single_run, **meta)
        with process_state_restored():
            result = in_process(capsys, *READS_A_CHECKPOINT[command](single_run, tmp_path))
        assert result.returncode == 2
        assert "step-00000002" in one_line_error(result) and "Traceback" not in result.stderr

    @pytest.mark.parametrize("config", [{"seed": -1}, {"synthetic_size": True}, {"data": None}],
                             ids=["seed -1", "synthetic_size true", "no data"])
    def test_evaluate_refuses_a_checkpoint_whose_runs_config_it_cannot_use_in_one_line(self, single_run, tmp_path,
                                                                                       config, capsys):
        edit_meta(single_run, config={**saved(single_run, "config"), **config})
        before = files_digest(single_run / "checkpoints")
        with process_state_restored():
            result = in_process(capsys, *READS_A_CHECKPOINT["evaluate"](single_run, tmp_path))
        assert result.returncode == 2
        assert f"lacks the training run's config or schedule (no usable {next(iter(config))}" in one_line_error(result)
        assert files_digest(single_run / "checkpoints") == before


@pytest.mark.slow
def test_running_out_of_host_memory_is_one_line_saying_what_to_lower(tmp_path):
    """6 GB of address space: the imports and the net fit in it (a batch of 4 trains), a batch of 1000 does not."""
    script = (f"ulimit -v 6000000; exec {sys.executable} train.py {' '.join(SINGLE)} --batch-size 1000 "
              f"--synthetic-size 1000 --steps 1 --no-checkpoints --output-dir {tmp_path / 'run'}")
    result = subprocess.run(["sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **ENV})
    assert result.returncode == 1
    assert "rank 0 ran out of host memory: lower --batch-size" in one_line_error(result)


def test_master_port_0_is_refused_before_any_process_group(tmp_path, monkeypatch, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        monkeypatch.setenv(name, value)
    result = in_process(capsys, *TRAIN, "--mode", "data-parallel", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "MASTER_PORT is 0" in one_line_error(result)


def test_restarts_on_a_store_shared_across_attempts_are_refused_before_the_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    result = in_process(capsys, *TRAIN, "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in one_line_error(result)


@pytest.mark.slow
def test_a_rank_that_cannot_join_its_group_says_so_in_one_line_within_its_timeout(tmp_path):
    """Rank 1 alone: nobody serves the store at MASTER_PORT."""
    environment = {**os.environ, **ENV, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "train.py", *PAPER_SPLIT, "--timeout", "3", "--output-dir",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 1 and time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: rank 1 could not join the process group at 127.0.0.1:")


# A stop, however it arrives, under each launch form: the step in hand finishes, a checkpoint is written, and a
# resume goes on as the straight run.

STOPPABLE = ["--mode", "paper-split", "--arch", NET, "--batch-size", "4", "--num-classes", "10", "--workers", "1",
             "--timeout", "30"]
STEPS = 12  # the straight run's; a stopped run is signalled after its second step, long before its last


def launchers(form: str, folder: Path) -> list[list[str]]:
    """The command lines that start a run of STOPPABLE into `folder` as the README's launch `form` does it."""
    train = ["train.py", *STOPPABLE, "--steps", str(STEPS), "--output-dir", str(folder)]
    if form == "accelerate, 1 process":
        return [[ACCELERATE, "launch", "-q", "--config_file", str(ROOT / "launch" / "one-process.yaml"), *train]]
    if form == "accelerate, 2 processes":
        return [[ACCELERATE, "launch", "-q", "--config_file", str(CPU_CONFIG), *train]]
    if form == "torchrun":
        return [[TORCHRUN, "--standalone", "--nproc_per_node", "2", *train]]
    port = str(free_port())  # two nodes: one launcher each, as launch/2node-4gpu.yaml starts them
    return [[ACCELERATE, "launch", "-q", "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--same_network",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port, *train]
            for rank in range(2)]


def stop(how: str, launched: list[subprocess.Popen]) -> None:
    """A stop as it arrives from a terminal, `timeout`, systemd or a batch scheduler."""
    import psutil

    for launcher in launched:
        if how == "SIGTERM to the launcher":
            launcher.send_signal(signal.SIGTERM)
        elif how == "SIGTERM to its process group":
            os.killpg(launcher.pid, signal.SIGTERM)
        elif how == "SIGINT to its process group (Ctrl-C)":
            os.killpg(launcher.pid, signal.SIGINT)
        else:  # as Slurm stops a job: every process of it, loader workers included
            for process in [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGTERM)


FORMS = ["accelerate, 1 process", "accelerate, 2 processes", "torchrun", "accelerate, 2 nodes"]
STOPS = ["SIGTERM to the launcher", "SIGTERM to its process group", "SIGTERM to every process",
         "SIGINT to its process group (Ctrl-C)"]
# Each launch form under one kind of stop, each kind of stop under one form: 4 of the 16 pairs. A form decides who
# passes a stop on (and how long it waits), a kind of stop who receives it first; the step's end and the
# checkpoint are one mechanism under all of them.
FORM_STOPS = list(zip(FORMS, STOPS, strict=True))


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[float]]:
    """The losses of uninterrupted runs on 1 and on 2 ranks, by rank count."""
    losses = {}
    for processes in (1, 2):
        folder = tmp_path_factory.mktemp(f"straight-{processes}")
        result = run_ranks(*STOPPABLE, "--workers", "0", "--steps", str(STEPS), "--no-checkpoints",
                           "--output-dir", str(folder), processes=processes, env=ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[processes] = [row["loss"] for row in metrics(folder)]
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(("form", "how"), FORM_STOPS)
def test_a_stop_finishes_the_step_checkpoints_and_resumes_to_the_straight_runs_losses(
        straight_losses, form, how, tmp_path):
    launched = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **ENV}, start_new_session=True)
                for command in launchers(form, tmp_path)]
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2)
        stop(how, launched)
        output = "".join(launcher.communicate(timeout=120)[0] for launcher in launched)
    finally:
        for launcher in launched:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
    stopped_at = len(metrics(tmp_path))
    # torchrun's own launcher prints a traceback when signalled (torch's SignalException); the ranks print none
    assert "stopped by a signal" in output, output[-3000:]
    assert output.count("Traceback") == output.count("SignalException: Process"), output[-3000:]
    assert stopped_at < STEPS
    assert checkpoint.find("latest", tmp_path / "checkpoints").step == stopped_at
    processes = 1 if form == "accelerate, 1 process" else 2
    resumed = run_ranks(*STOPPABLE, "--workers", "0", "--steps", str(stopped_at + 1), "--resume", "latest",
                        "--output-dir", str(tmp_path), processes=processes, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'}" in resumed.stderr
    assert [row["loss"] for row in metrics(tmp_path)] == straight_losses[processes][:stopped_at + 1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate launch"])
def test_a_rank_killed_under_elastic_restarts_is_restarted_and_the_run_ends_as_the_straight_one(straight, launcher,
                                                                                              tmp_path):
    """The README's elastic forms: c10d rendezvous on a store of each attempt's own (accelerate takes the rendezvous
    backend as a flag only: its flag's default overrides a config file's)."""
    port = str(free_port())
    command = [TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}"] if launcher == "torchrun" else \
        [ACCELERATE, "launch", "-q", "--config_file", str(CPU_CONFIG), "--rdzv_backend", "c10d", "--max_restarts",
         "1", "--main_process_port", port]
    run = subprocess.Popen([*command, "train.py", *PAPER_SPLIT, "--resume", "auto", "--timeout", "30",
                            "--output-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, **ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                           start_new_session=True)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2)
        import psutil

        ranks = [p for p in psutil.Process(run.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())
                 and p.environ().get("RANK") == "1"]
        ranks[0].kill()
        _, errors = run.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, errors[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'}" in errors
    assert [row["loss"] for row in metrics(tmp_path)] == straight


@pytest.mark.slow
def test_a_one_process_accelerate_launch_shows_a_refusal_as_its_one_line():
    """`-q`: without it accelerate wraps a failed run in a CalledProcessError traceback of its own."""
    result = subprocess.run([ACCELERATE, "launch", "-q", "--config_file", str(ROOT / "launch" / "one-process.yaml"),
                             "train.py", "--mode", "magic"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **ENV})
    assert result.returncode == 1  # accelerate's own exit code for any failure
    assert result.stderr.strip().splitlines() == [
        "error: unknown --mode 'magic'; choose one of: single, data-parallel, paper-split, weird-trick, fsdp, "
        "pipeline, tensor-parallel"]


def test_every_documented_accelerate_launch_is_quiet():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "launch").glob("*.yaml"))]
    loud = [f"{path.name}: {match.group(0)}" for path in documents
            for match in re.finditer(r"accelerate launch (?!-q)(--config_file|train\.py|--multi_gpu)\S*",
                                     path.read_text())]
    assert loud == []


def data_parallel_steps_then_leave_the_group() -> bool:
    """On a rank: a few steps of DDP (its hook state holds the group), the group left, and whether it is still there."""
    import torch.distributed as dist

    from alexnet_mp.bench.matrix import QUICK
    from alexnet_mp.bench.measure import layout_steps
    from alexnet_mp.world import leave_group

    layout_steps("data-parallel", NET, {}, 4, QUICK)
    leave_group()
    return dist.is_initialized()


def test_every_rank_leaves_its_process_group_after_training_before_the_interpreter_exits(tmp_path):
    """Left to the interpreter's exit, the group's gloo threads can abort a finished run."""
    from alexnet_mp.processes import run_distributed

    assert run_distributed(data_parallel_steps_then_leave_the_group, 2, tmp_path) == [False, False]
