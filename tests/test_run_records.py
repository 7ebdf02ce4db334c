"""A run folder handed to `compare` is read as untrusted: what the comparison cannot use is named in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from alexnet_mp.config import TrainConfig
from alexnet_mp.report import BrokenRun, read_run
from alexnet_mp.tracking import CorruptRecord, read_metrics
from tests.equivalence import PAPER_NET
from tests.launching import in_process, one_line_error

CONFIG = {**TrainConfig(mode="paper-split", arch=PAPER_NET, batch_size=8, num_classes=10).to_dict(), "world_size": 2}
STEP = {"step": 0, "wall_s": 0.3, "loss": 2.3, "lr": 0.01, "epoch": 0, "step_time_s": 0.2, "data_wait_s": 0.01,
        "images_per_s": 40.0, "comm_bytes": [1000, 1000], "comm_wait_s": 0.02, "peak_memory_mb": [900.0, 910.0],
        "training_memory_mb": [180.0, 190.0]}
SPAN = {"name": "conv1 forward", "cat": "compute", "ph": "X", "pid": 0, "ts": 10.0, "dur": 5.0}


def run_folder(folder: Path, config: Any = CONFIG, rows: list[Any] | None = None, trace: str | None = None) -> Path:
    """A run's record as `train` writes one (its config, a step's row), with what a test puts in its place."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows or [STEP]))
    if trace is not None:
        (folder / "trace.json").write_text(trace)
    return folder


def test_a_record_as_train_writes_it_is_read_with_its_traced_spans(tmp_path):
    run = read_run(run_folder(tmp_path / "run", trace=json.dumps({"traceEvents": [SPAN]})))
    assert run.label == "paper-split x2" and run.losses == [2.3] and run.spans == [SPAN]


@pytest.mark.parametrize(("config", "says"), [
    ([CONFIG], "config.json is not a run's config (not an object)"),
    ({**CONFIG, "mode": "ddp"}, "mode 'ddp' is no layout this version has"),
    ({**CONFIG, "mode": ["single"]}, "mode ['single'] is no layout this version has"),
    ({**CONFIG, "arch": "vgg"}, "arch 'vgg' is no net this version has"),
    ({**CONFIG, "batch_size": "8"}, "batch_size not a count of 1 or more"),
    ({key: value for key, value in CONFIG.items() if key != "world_size"}, "world_size not a count of 1 or more"),
    ({**CONFIG, "mixed_precision": 16}, "mixed_precision 16 is not one of: no, bf16, fp16"),
    ({**CONFIG, "world_size": 3}, "--mode paper-split runs on 1 process or an even number"),
    ({**CONFIG, "mode": "pipeline", "microbatches": 3}, "--batch-size 8 does not split evenly for --mode pipeline"),
    ({**CONFIG, "mode": "pipeline", "microbatches": "x"}, "--microbatches x is not what --microbatches takes"),
    ({**CONFIG, "mode": "weird-trick", "exchange": "diagonal"}, "--exchange diagonal is not one of: all,"),
])
def test_a_config_the_comparison_cannot_use_names_what_is_wrong(config, says, tmp_path):
    with pytest.raises(BrokenRun, match="config.json is not a run's config") as broken:
        read_run(run_folder(tmp_path / "run", config=config))
    assert says in str(broken.value)


@pytest.mark.parametrize(("row", "says"), [
    ({**STEP, "loss": "2.3"}, "step 0 has loss not as train writes them"),
    ({**STEP, "images_per_s": None}, "step 0 has images_per_s not as train writes them"),
    ({**STEP, "comm_bytes": [1000]}, "step 0 has comm_bytes not as train writes them (a number, or one per rank)"),
    ({**STEP, "peak_memory_mb": ["900", 910.0]}, "step 0 has peak_memory_mb not as train writes them"),
    ({key: value for key, value in STEP.items() if key != "step_time_s"}, "step 0 lacks 'step_time_s'"),
])
def test_a_step_row_the_comparison_cannot_use_names_its_step_and_figure(row, says, tmp_path):
    with pytest.raises(BrokenRun, match=re.escape(f"metrics.jsonl's {says}")):
        read_run(run_folder(tmp_path / "run", rows=[row]))


@pytest.mark.parametrize("line", ["5", "[]", '{"loss": 2.3}', '{"step": "0"}', '{"step": -1}'])
def test_a_record_line_that_is_not_a_steps_row_is_named(line, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(STEP) + "\n" + line + "\n")
    with pytest.raises(CorruptRecord, match="metrics.jsonl line 2 is not a step's row"):
        read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("trace", ["{not json", "[]", '{"traceEvents": {}}', json.dumps({"traceEvents": [
    {**SPAN, "dur": "5"}]}), json.dumps({"traceEvents": [{key: v for key, v in SPAN.items() if key != "pid"}]})])
def test_a_trace_train_did_not_write_is_named_with_how_to_compare_the_run_without_it(trace, tmp_path):
    with pytest.raises(BrokenRun, match="trace.json is not a trace `train --trace` writes .*; move it aside"):
        read_run(run_folder(tmp_path / "run", trace=trace))


def test_compare_of_only_unreadable_runs_names_each_and_exits_2_without_a_traceback(tmp_path, capsys):
    broken = run_folder(tmp_path / "run", config={**CONFIG, "mode": "ddp"})
    result = in_process(capsys, "compare", str(broken), "--out", str(tmp_path / "report"))
    assert result.returncode == 2 and one_line_error(result) == "error: no run could be read"
    assert f"cannot compare {broken}: config.json is not a run's config" in result.stderr
    assert "Traceback" not in result.stderr
