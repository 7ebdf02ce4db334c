"""The experiment runner and the comparison report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alexnet_mp.hardware import FORMAT
from alexnet_mp.predict import HELD_HEADER
from tests.equivalence import PAPER_NET
from tests.launching import ENV, ROOT, in_process, metrics, one_line_error

pytestmark = pytest.mark.slow  # experiments of launched runs

PLOTS = ("images_per_s.png", "step_time_breakdown.png", "loss.png", "bytes_per_step.png", "timeline.png")


def by_hand_profile(folder: Path) -> Path:
    """A gloo profile written by hand: every layer at 0.05 TFLOP/s of training, every collective 1 ms plus 1 GB/s."""
    link = {"latency_s": 1e-3, "bytes_per_s": 1e9}
    profile = {"format": FORMAT, "name": "by hand", "source": "a test", "backend": "gloo", "cores": 2, "tflops": 0.05,
               "collectives": {"2": dict.fromkeys(("all-reduce", "all-gather", "reduce-scatter", "gather", "scatter"),
                                                  link)}}
    (folder / "profile.json").write_text(json.dumps(profile))
    return folder / "profile.json"


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """single and paper-split (2 processes), 3 steps each, on the same batches, tracked in offline wandb, predicted
    on a profile written by hand."""
    out = tmp_path_factory.mktemp("experiments")
    result = subprocess.run([sys.executable, "-m", "alexnet_mp", "experiment", "--name", "trial",
                             "--modes", "single,paper-split", "--ranks", "2", "--arch", PAPER_NET,
                             "--output-dir", str(out), "--hardware", str(by_hand_profile(out)),
                             "--steps", "3", "--batch-size", "4", "--num-classes", "10", "--workers", "0",
                             "--tracker", "wandb"],
                            cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "trial"


def test_experiment_writes_each_run_into_its_own_folder_and_a_report(trial):
    assert (trial / "single-1" / "metrics.jsonl").is_file() and (trial / "paper-split-2" / "metrics.jsonl").is_file()
    report = (trial / "comparison.md").read_text()
    assert "paper-split x2" in report and "single x1" in report


def test_experiment_puts_its_runs_in_one_wandb_group_with_a_summary_table_and_plots(trial):
    for run in ("single-1", "paper-split-2"):
        (record,) = (trial / run / "wandb").glob("offline-run-*/run-*.wandb")
        assert b"trial" in record.read_bytes()
    (summary,) = (trial / "wandb").glob("offline-run-*")
    (table,) = summary.glob("files/media/table/comparison_*.table.json")
    data = json.loads(table.read_text())
    assert [row[0] for row in data["data"]] == ["single x1", "paper-split x2"]
    assert b"summary" in next(summary.glob("run-*.wandb")).read_bytes()
    images = [path.name for path in summary.glob("files/media/images/comparison/*.png")]
    assert len(images) == len(PLOTS)
    assert all(any(image.startswith(Path(plot).stem + "_") for image in images) for plot in PLOTS)


def test_experiments_wandb_summary_sets_each_runs_predicted_figures_beside_its_measured_ones(trial):
    (summary,) = (trial / "wandb").glob("offline-run-*")
    (table,) = summary.glob("files/media/table/predicted_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == HELD_HEADER
    assert [row[0] for row in data["data"]] == ["single x1", "paper-split x2"]
    assert all(" / " in cell for row in data["data"] for cell in row[1:])


def test_each_run_keeps_its_config_job_type_and_layout_name_in_its_offline_wandb_record(trial):
    (record,) = (trial / "paper-split-2" / "wandb").glob("offline-run-*/run-*.wandb")
    # An offline run keeps its config in the binary record stream, with no public reader: look for it.
    data = record.read_bytes()
    assert all(token in data for token in (b"world_size", b"per_rank_batch", b'"paper-split"', b"trial",
                                           b"paper-split x2"))


def test_a_one_device_run_logs_one_rank_and_no_communication(trial):
    rows = metrics(trial / "single-1")
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(len(row["peak_memory_mb"]) == 1 and row["comm_bytes"] == [0] and row["comm_wait_s"] == 0
               for row in rows)


def test_each_rank_logs_the_memory_training_added_to_what_was_in_use_before_the_net(trial):
    for row in metrics(trial / "paper-split-2"):
        assert len(row["training_memory_mb"]) == 2
        assert all(0 < added < peak for added, peak in zip(row["training_memory_mb"], row["peak_memory_mb"],
                                                             strict=True))


def test_the_report_plots_open_as_images(trial):
    for name in PLOTS:
        with Image.open(trial / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_loss_difference_from_single_is_below_float_tolerance(trial):
    header, _, *rows = (trial / "comparison.md").read_text().split("\n\n")[0].splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in (header, *rows)]
    column = cells[0].index("max loss diff vs single")
    (row,) = [row for row in cells[1:] if row[0] == "paper-split x2"]
    assert float(row[column]) <= 1e-3


def test_an_experiment_with_a_failed_run_compares_the_others_then_exits_1_naming_it(trial, tmp_path, capsys,
                                                                                     monkeypatch):
    """The runs are stood in for: single by a launch that writes the trial's record, paper-split by one that
    fails."""
    from alexnet_mp import experiment

    class Launched:
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            self.code = 1 if "paper-split" in command else 0
            if "single" in command:
                single = tmp_path / "trial" / "single-1"
                single.mkdir(parents=True)
                for record in ("config.json", "metrics.jsonl"):
                    shutil.copy(trial / "single-1" / record, single / record)

        def wait(self) -> int:
            return self.code

    monkeypatch.setattr(experiment.subprocess, "Popen", Launched)
    result = in_process(capsys, "experiment", "--name", "trial", "--modes", "single,paper-split", "--output-dir",
                        str(tmp_path))
    assert result.returncode == 1
    assert "1 of 2 runs failed: paper-split-2 (exit code 1)" in one_line_error(result)
    assert "single x1" in result.stdout and (tmp_path / "trial" / "comparison.md").is_file()


def test_an_experiment_over_several_rank_counts_runs_each_layout_at_each_and_single_once(tmp_path, capsys,
                                                                                          monkeypatch):
    from alexnet_mp import experiment

    launched = []

    class Launched:
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            launched.append(Path(command[command.index("--output-dir") + 1]).name)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(experiment.subprocess, "Popen", Launched)
    in_process(capsys, "experiment", "--name", "scaling", "--modes", "single,data-parallel,weird-trick", "--ranks",
               "2,4", "--output-dir", str(tmp_path))
    assert launched == ["single-1", "data-parallel-2", "data-parallel-4", "weird-trick-2", "weird-trick-4"]


@pytest.mark.parametrize("stop", ["ctrl-c", "SIGTERM"])
def test_a_stopped_experiment_waits_for_the_run_in_hand_then_ends_in_one_line(stop, tmp_path, capsys, monkeypatch):
    """The run gets the signal too (Ctrl-C: the terminal signals the whole process group; SIGTERM: the
    runner passes it on) and checkpoints: it is waited for, and no later run starts."""
    from alexnet_mp import experiment

    launched = []

    class InterruptedRun:
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            self.command, self.waits, self.signals = command, 0, []
            launched.append(self)

        def send_signal(self, number: int) -> None:
            self.signals.append(number)

        def wait(self) -> int:
            self.waits += 1
            if self.waits == 1 and stop == "ctrl-c":
                raise KeyboardInterrupt
            if self.waits == 1:
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            return 0

    monkeypatch.setattr(experiment.subprocess, "Popen", InterruptedRun)
    result = in_process(capsys, "experiment", "--name", "trial", "--modes", "single,paper-split", "--output-dir",
                        str(tmp_path))
    assert result.returncode == 130 and "stopped by a signal" in one_line_error(result)
    (run,) = launched
    assert "single" in run.command and run.waits == 2
    assert run.signals == ([signal.SIGTERM] if stop == "SIGTERM" else [])


def test_compare_names_a_broken_run_and_reports_the_others(trial, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trial / "paper-split-2", broken)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (broken / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    missing = tmp_path / "missing"
    shutil.copytree(trial / "single-1", missing)
    (missing / "metrics.jsonl").unlink()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    result = in_process(capsys, "compare", str(trial / "single-1"), str(broken), str(missing), str(a_file),
                        "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert f"{broken}: metrics.jsonl line 2 is not JSON" in result.stderr
    assert f"{missing}: metrics.jsonl is missing" in result.stderr
    assert f"{a_file}: not a run folder" in result.stderr
    assert "single x1" in result.stdout and (tmp_path / "report" / "comparison.md").is_file()


def test_compare_reads_a_run_killed_mid_line_up_to_its_last_whole_line(trial, tmp_path, capsys):
    killed = tmp_path / "killed"
    shutil.copytree(trial / "single-1", killed)
    with (killed / "metrics.jsonl").open("a") as record:
        record.write('{"step": 99, "lo')
    result = in_process(capsys, "compare", str(killed), "--out", str(tmp_path / "report"))
    assert result.returncode == 0 and "cannot compare" not in result.stderr
    assert "single x1" in result.stdout


def test_runs_of_one_layout_are_told_apart_by_their_folders(trial, tmp_path, capsys):
    """One layout at two batch sizes, say: rows, bars and curves would otherwise share a label."""
    again = tmp_path / "again"
    shutil.copytree(trial / "single-1", again)
    result = in_process(capsys, "compare", str(trial / "single-1"), str(again), str(trial / "paper-split-2"),
                        "--out", str(tmp_path / "report"))
    labels = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert labels == [f"single x1 [{trial / 'single-1'}]", f"single x1 [{again}]", "paper-split x2"]


def test_compare_with_a_profile_sets_each_runs_predicted_step_beside_its_measured_one(trial, tmp_path, capsys):
    result = in_process(capsys, "compare", str(trial / "single-1"), str(trial / "paper-split-2"),
                        "--out", str(tmp_path / "report"), "--hardware", str(by_hand_profile(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "predicted step ms (error)" in result.stdout.splitlines()[0]
    record = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert [run["run"] for run in record["runs"]] == ["single x1", "paper-split x2"]
    for run in record["runs"]:
        measured, predicted, error = run["measured"], run["predicted"], run["error"]
        assert predicted.keys() == measured.keys() == error.keys() == {"step_s", "compute_s", "comm_s",
                                                                       "bytes_per_rank", "memory_mb"}
        assert predicted["step_s"] > 0 and measured["step_s"] > 0
        assert error["step_s"] == pytest.approx(predicted["step_s"] / measured["step_s"] - 1)
        assert predicted["bytes_per_rank"] == pytest.approx(measured["bytes_per_rank"])
        assert error["memory_mb"] == pytest.approx(max(predicted["memory_mb"]) / max(measured["memory_mb"]) - 1)
    report = (tmp_path / "report" / "comparison.md").read_text()
    assert "## Predicted beside measured: by hand (a test)" in report and "order of the layouts" in report


def test_compare_predicts_the_runs_its_profile_times_and_says_why_not_the_others(trial, tmp_path, capsys):
    """A profile's layers ran in one precision, with or without each speed-up: another runs at other rates."""
    in_bf16 = tmp_path / "bf16"
    shutil.copytree(trial / "paper-split-2", in_bf16)
    config = json.loads((in_bf16 / "config.json").read_text())
    (in_bf16 / "config.json").write_text(json.dumps({**config, "mixed_precision": "bf16"}))
    result = in_process(capsys, "compare", str(trial / "single-1"), str(in_bf16), "--out", str(tmp_path / "report"),
                        "--hardware", str(by_hand_profile(tmp_path)))
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "report" / "comparison.json").read_text())["runs"]
    assert ["predicted" in run for run in runs] == [True, False]
    assert runs[1]["not_predicted"] == ("the hardware profile 'by hand' times its layers in fp32, eager, not bf16 as "
                                        "this run: compare it with a profile of its own setting")
    assert "Not predicted:\n- paper-split x2" in (tmp_path / "report" / "comparison.md").read_text()


def test_compare_reports_a_run_of_a_net_its_profile_has_not_timed_and_names_the_calibration_it_needs(trial, tmp_path,
                                                                                                        capsys):
    of_owt = tmp_path / "owt"
    shutil.copytree(trial / "single-1", of_owt)
    config = json.loads((of_owt / "config.json").read_text())
    (of_owt / "config.json").write_text(json.dumps({**config, "arch": "owt-debug"}))
    times = {"images": [2, 4], "forward": [0.1, 0.2], "backward": [0.2, 0.4]}
    (tmp_path / "paper.json").write_text(json.dumps({"format": FORMAT, "name": "paper only", "source": "a test",
                                                     "backend": "gloo", "cores": 2,
                                                     "layers": {"2": {f"{PAPER_NET}.conv1@1.0": times}}}))
    result = in_process(capsys, "compare", str(of_owt), "--out", str(tmp_path / "report"), "--hardware",
                        str(tmp_path / "paper.json"))
    assert result.returncode == 0, result.stderr
    assert f"calibrate --ranks 1 --arch {PAPER_NET},owt-debug`" in (tmp_path / "report" / "comparison.md").read_text()


def test_compare_without_a_profile_says_none_was_given(trial, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/hardware.json here
    result = in_process(capsys, "compare", str(trial / "single-1"), "--out", str(tmp_path / "report"))
    assert result.returncode == 0
    assert "No hardware profile given" in (tmp_path / "report" / "comparison.md").read_text()
    assert "predicted" not in json.loads((tmp_path / "report" / "comparison.json").read_text())["runs"][0]


def test_compare_sets_rank_0s_traced_spans_beside_the_predicted_ones_where_they_differ_most(trial, tmp_path, capsys):
    result = in_process(capsys, "compare", str(trial / "single-1"), str(trial / "paper-split-2"),
                        "--out", str(tmp_path / "report"), "--hardware", str(by_hand_profile(tmp_path)))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "report" / "comparison.json").read_text())
    split = next(run for run in record["runs"] if run["run"] == "paper-split x2")["rank_0_spans"]
    assert split["conv3 forward"]["measured_s"] > 0 and split["conv3 forward"]["predicted_s"] > 0
    assert split["conv3-input forward"]["predicted_s"] > 0
    report = (tmp_path / "report" / "comparison.md").read_text()
    assert "## Where the prediction misses, span by span" in report
