"""Fault injection: runs killed at their worst moments resume to the straight run's losses exactly, and bad
input is refused in one line (exit 2, no traceback) without changing a checkpoint. docs/faults.md keeps the
table of cases these tests hold true."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from alexnet_mp import checkpoint
from tests.launching import (
    ENV,
    ROOT,
    in_process,
    metrics,
    one_line_error,
    process_state_restored,
    run_ranks,
    start_ranks,
    train_in_process,
)

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
PAPER_SPLIT = ["--mode", "paper-split", "--batch-size", "4", "--num-classes", "10", "--workers", "0",
               "--steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The losses of 4 uninterrupted steps of paper-split on 2 ranks."""
    folder = tmp_path_factory.mktemp("straight")
    result = run_ranks(*PAPER_SPLIT, "--output-dir", str(folder), processes=2)
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


def kill_every_rank_into_a_save(delay_s: float) -> Callable[[list[subprocess.Popen], Path], None]:
    def kill(ranks: list[subprocess.Popen], folder: Path) -> None:
        wait_for(lambda: logged_steps(folder) >= 2 and saving(folder))
        time.sleep(delay_s)
        for rank in ranks:
            os.killpg(rank.pid, signal.SIGKILL)
    return kill


def stop_every_rank(ranks: list[subprocess.Popen], folder: Path) -> None:
    wait_for(lambda: logged_steps(folder) >= 2)
    for rank in ranks:
        os.killpg(rank.pid, signal.SIGTERM)


@pytest.mark.parametrize("fault", [kill_rank_1_mid_step, kill_every_rank_into_a_save(0.0),
                                   kill_every_rank_into_a_save(0.15), kill_every_rank_into_a_save(0.4),
                                   stop_every_rank],
                         ids=["kill -9 rank 1 mid-step", "kill -9 all 0 s into a save",
                              "kill -9 all 0.15 s into a save", "kill -9 all 0.4 s into a save", "SIGTERM"])
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


def test_a_full_disk_mid_save_keeps_the_last_checkpoint_and_resumes_to_the_straight_runs_losses(straight, tmp_path):
    """On a 700 MiB tmpfs (in a mount namespace of its own), step 1's checkpoint (about 435 MiB) fits and
    step 2's does not: the run stops in one line, and the folder copied out resumes exactly."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here to mount a small tmpfs in")
    mounted, kept = tmp_path / "tmpfs", tmp_path / "kept"
    mounted.mkdir()
    script = (f"mount -t tmpfs -o size=700m tmpfs {mounted} && {TORCHRUN} --standalone --nproc_per_node 2 train.py "
              f"{' '.join(PAPER_SPLIT)} --output-dir {mounted}/run; code=$?; cp -r {mounted}/run {kept}; exit $code")
    full = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert full.returncode != 0
    assert "(No space left on device); the newest complete one" in full.stderr
    assert [p.name for p in checkpoint.complete_checkpoints(kept / "checkpoints")] == ["step-00000001"]
    resumed = run_ranks(*PAPER_SPLIT, "--resume", "latest", "--output-dir", str(kept), processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["loss"] for row in metrics(kept)] == straight


def test_a_launcher_killed_with_its_process_group_leaves_no_rank_running(tmp_path):
    """torchrun starts each rank in a session of its own, out of reach of a kill of the launcher's group."""
    launcher = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "train.py",
         *PAPER_SPLIT[:-6], "--steps", "1000", "--no-checkpoints", "--output-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV},
        start_new_session=True)
    wait_for(lambda: logged_steps(tmp_path) >= 1)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    wait_for(lambda: not (tmp_path / "run.lock").exists() or not _held(tmp_path / "run.lock"), timeout=60)


def _held(lock: Path) -> bool:
    import fcntl

    with open(lock) as file:
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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-process run of 2 steps with checkpoints at both."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    train_in_process("--mode", "single", "--batch-size", "4", "--num-classes", "10", "--workers", "0",
                     "--synthetic-size", "8", "--steps", "2", "--checkpoint-every", "1", "--output-dir", str(folder))
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
    leftovers = [folder / "removing-step-00000000", folder / "step-00000003", folder / "step-00000004.tmp"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "shard-00000.pt.part").write_bytes(b"half")
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--batch-size", "4", "--num-classes", "10",
                            "--workers", "0", "--synthetic-size", "8", "--steps", "3", "--resume", "latest",
                            "--output-dir", str(single_run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"removed {leftover}: an incomplete checkpoint" in result.stderr for leftover in leftovers)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]


def test_a_net_that_diverges_is_never_checkpointed_and_the_error_names_the_newest_finite_one(single_run, capsys):
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--batch-size", "4", "--num-classes", "10",
                            "--workers", "0", "--synthetic-size", "8", "--steps", "6", "--lr", "1e39",
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
        result = in_process(capsys, "train", "--mode", "single", "--data", str(root), "--batch-size", "4",
                            "--workers", "0", "--steps", "6", "--max-bad-images", "2", "--no-checkpoints",
                            "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "3 training images are unreadable, more than --max-bad-images 2" in one_line_error(result)


def test_unreadable_images_within_the_limit_are_counted_at_each_epochs_end(tmp_path, capsys):
    from tests.test_data import write_image_tree

    root = write_image_tree(tmp_path / "data", per_class=4)
    (next((root / "train").glob("*/*"))).write_bytes(b"not an image")
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--data", str(root), "--batch-size", "4",
                            "--workers", "0", "--epochs", "1", "--no-checkpoints",
                            "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 0: 1 unreadable training images skipped so far" in result.stdout + result.stderr


def test_unreadable_images_met_by_different_ranks_are_each_counted_once(tmp_path):
    from tests.test_data import write_image_tree

    root = write_image_tree(tmp_path / "data", per_class=4)
    bad = [next(folder.iterdir()) for folder in sorted((root / "train").iterdir())]
    for image in bad:
        image.write_bytes(b"not an image")
    # data-parallel: each rank reads its half of a batch, so a rank's own count misses the other's images
    result = run_ranks("--mode", "data-parallel", "--data", str(root), "--batch-size", "4", "--workers", "0",
                       "--epochs", "1", "--max-bad-images", "10", "--no-checkpoints", "--output-dir",
                       str(tmp_path / "run"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"epoch 0: {len(bad)} unreadable training images skipped so far" in result.stdout


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


TRAIN = ["train", "--mode", "single", "--batch-size", "4", "--num-classes", "10", "--workers", "0",
         "--synthetic-size", "8", "--steps", "3"]
# (what is wrong, how to make it given a finished run's folder, the arguments after TRAIN, words of the refusal)
BAD_INPUTS = [
    ("--lr nan", None, ["--lr", "nan"], "must be a finite number"),
    ("--momentum inf", None, ["--momentum", "inf"], "must be a finite number"),
    ("--weight-decay -1", None, ["--weight-decay", "-1"], "must be at least 0"),
    ("--timeout nan", None, ["--timeout", "nan"], "must be a finite number"),
    ("--batch-size 0", None, ["--batch-size", "0"], "must be at least 1"),
    ("--steps x", None, ["--steps", "x"], "invalid int value"),
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
     ["--resume", "latest"], "cannot be read"),
    ("a missing shard", lambda run: shard_of(run).unlink(), ["--resume", "latest"], "has no shard files"),
    ("a checkpoint of another class count", None, ["--resume", "latest", "--num-classes", "5"],
     "pass the same --arch and --num-classes"),
    ("a checkpoint of another arch", None, ["--resume", "latest", "--arch", "owt"],
     "pass the same --arch and --num-classes"),
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
