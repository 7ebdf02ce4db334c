"""The benchmark in its tiny configuration: it runs every part of the matrix and its output parses.
No timing is asserted here; the figures are for people (docs/results/). That each layout's bytes are its
analytic count is tests/test_strategies.py's, on the same ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alexnet_mp.bench.matrix import QUICK
from alexnet_mp.bench.measure import Measurement, layout_steps
from alexnet_mp.bench.report import bubbles
from alexnet_mp.hardware import FORMAT, KINDS
from alexnet_mp.predict import Held, StepFigures, plan_parts
from alexnet_mp.processes import run_distributed
from alexnet_mp.speed import Variant
from alexnet_mp.strategies.costs import Span
from tests.launching import ENV, ROOT, in_process, one_line_error

pytestmark = pytest.mark.slow  # the benchmark matrix, run on real processes


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    link = {"latency_s": 1e-3, "bytes_per_s": 1e9}
    (out / "profile.json").write_text(json.dumps({
        "format": FORMAT, "name": "by hand", "source": "a test", "backend": "gloo", "cores": 2, "tflops": 0.05,
        "collectives": {"2": dict.fromkeys(KINDS, link)}}))
    result = subprocess.run([sys.executable, "-m", "alexnet_mp", "bench", "--quick", "--ranks", "2",
                             "--output-dir", str(out), "--hardware", str(out / "profile.json")], cwd=ROOT,
                            capture_output=True, text=True, timeout=400, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob("bench-*")), "the scratch folder (JPEGs, rank results) is left behind"
    return {"json": json.loads((out / "bench.json").read_text()), "md": (out / "bench.md").read_text(),
            "stdout": result.stdout, "plot": out / "layouts.png"}


def test_bench_measures_every_layout_the_plain_loop_and_the_input_pipeline_decoding_in_both_places(quick):
    names = {m["name"] for m in quick["json"]["measurements"]}
    assert {"plain loop, torchvision alexnet", "single, paper", "single, owt", "paper-split x2", "data-parallel x2",
            "weird-trick (all) x2", "weird-trick (one-at-a-time) x2", "input pipeline, 2 workers",
            "single, paper, fed by the input pipeline", "input pipeline, 2 workers, JPEGs decoded on the device",
            "single, paper, fed by the input pipeline, JPEGs decoded on the device",
            "single, paper, traced (train --trace)"} <= names
    assert "the traced step vs the step" in quick["md"]
    for m in quick["json"]["measurements"]:
        assert m["median_images_per_s"] > 0 and len(m["peak_memory_mb"]) == m["ranks"]


def test_bench_sets_each_layouts_predicted_step_beside_its_measured_one(quick):
    predicted = {row["run"]: row for row in quick["json"]["predicted"]}
    measured = {m["name"] for m in quick["json"]["measurements"] if m["mode"] and m["ranks"] == 2}
    assert measured <= predicted.keys() and "single, paper" in predicted
    for row in predicted.values():
        assert row["error"]["step_s"] == pytest.approx(row["predicted"]["step_s"] / row["measured"]["step_s"] - 1)
        assert row["error"]["memory_mb"] == pytest.approx(max(row["predicted"]["memory_mb"]) /
                                                          max(row["measured"]["memory_mb"]) - 1)
    assert "## Predicted beside measured: by hand (a test)" in quick["md"] and "order of the layouts" in quick["md"]


def test_bench_measures_every_registered_layout_with_each_option_value_it_compares(quick):
    names = {m["name"] for m in quick["json"]["measurements"]}
    assert {"fsdp x2", "tensor-parallel x2", "weird-trick (slice) x2", "pipeline (gpipe, M=1) x2",
            "pipeline (gpipe, M=4) x2", "pipeline (1f1b, M=2) x2", "pipeline (1f1b, M=4) x2"} <= names
    assert any(line.startswith("pipeline (1f1b, M=1) x2: --schedule 1f1b fills the pipeline")
               for line in quick["json"]["skipped"])


def test_bench_sets_each_pipelines_measured_bubble_beside_the_predicted_one(quick):
    rows = {c["ours"]: c for c in quick["json"]["comparisons"] if c["what"].endswith("bubble, measured over predicted")}
    assert "pipeline (gpipe, M=1) x2" in rows  # its first stage idles while the second computes
    assert rows.keys() <= {"pipeline (gpipe, M=1) x2", "pipeline (gpipe, M=2) x2", "pipeline (gpipe, M=4) x2",
                           "pipeline (1f1b, M=2) x2", "pipeline (1f1b, M=4) x2"}
    assert {row["theirs"] for row in rows.values()} == {"the cost model's timeline"}


def pipeline_measured(waits: list[float]) -> Measurement:
    return Measurement("pipeline (gpipe, M=4) x2", 2, 1, 8, [8.0], 0.0, [0.0, 0.0], [100.0, 100.0], "paper",
                       wait_per_rank_s=waits, step_s=1.0, mode="pipeline",
                       options={"schedule": "gpipe", "microbatches": 4})


def test_a_pipelines_bubble_without_a_profile_is_held_to_that_of_equal_stages():
    (bubble,) = bubbles([pipeline_measured([0.5, 0.25])], {})
    assert bubble.detail.endswith("predicted 20%")  # (N - 1) / (M + N - 1)


def test_a_pipeline_whose_busiest_stage_is_predicted_to_idle_no_more_than_a_rounding_error_has_no_bubble_ratio():
    measured = pipeline_measured([0.5, 0.0])
    timeline = [[Span("work", "compute", 0.0, 0.5)],
                [Span("work", "compute", 0.0, 0.5), Span("work", "compute", 0.5 + 1e-12, 1.0)]]
    held = Held(measured.name, StepFigures(1.0, 0.5, 0.5, [0.0], None), StepFigures(1.0, 0.5, 0.5, [0.0], None),
                timeline)
    assert bubbles([measured], {measured.name: held}) == []


def test_a_pipelines_bubble_is_held_to_the_busiest_ranks_idle_share_in_the_predicted_timeline():
    measured = pipeline_measured([0.5, 0.25])  # the busiest rank idle a quarter of its step
    timeline = [[Span("work", "compute", 0.0, 0.5)],
                [Span("work", "compute", 0.0, 0.5), Span("work", "compute", 0.625, 1.0)]]
    held = Held(measured.name, StepFigures(1.0, 0.5, 0.5, [0.0], None), StepFigures(1.0, 0.5, 0.5, [0.0], None),
                timeline)
    (bubble,) = bubbles([measured], {measured.name: held})
    assert bubble.ratio == pytest.approx(0.25 / 0.125)


def test_bench_draws_every_layout_ranked_beside_the_one_device_step(quick):
    from PIL import Image

    with Image.open(quick["plot"]) as plot:
        assert plot.size[0] > 300 and plot.size[1] > 300


def test_bench_compares_fsdp_with_data_parallel_in_speed_memory_and_bytes(quick):
    (row,) = [c for c in quick["json"]["comparisons"] if c["what"].startswith("fsdp vs data-parallel at 2 ranks")]
    assert row["detail"].startswith("peak MiB per rank (largest) ") and "bytes/step on rank 0: " in row["detail"]


def test_bench_times_the_wait_of_each_link_and_the_part_after_the_last_rank_arrived(quick):
    scheme_b = {m["name"]: m for m in quick["json"]["measurements"]}["weird-trick (one-at-a-time) x2"]
    assert set(scheme_b["link_wait_s"]) == {"fc6-input", "fc7-input", "fc8-input", "conv-gradients"}
    assert all(scheme_b["link_transfer_s"][link] <= wait for link, wait in scheme_b["link_wait_s"].items())


def test_scheme_b_is_judged_on_the_transfer_of_the_feature_exchange_and_its_whole_wait_is_shown(quick):
    rows = [c for c in quick["json"]["comparisons"] if c["what"].startswith("weird-trick (b) vs (a) at 2 ranks")]
    assert [(row["what"].split(": ")[1], row["target"]) for row in rows] == [
        ("exchange transfer hidden", 0.5), ("exchange wait hidden, slower ranks included", None)]
    assert all(row["detail"].startswith("fc6-input blocked") for row in rows)


def test_a_wait_that_ends_when_the_last_rank_arrives_is_not_counted_as_transfer():
    from alexnet_mp.bench.measure import blocked_per_rank

    forward, backward = ("fc6-input", "forward"), ("fc6-input", "backward")
    # rank 0 reaches the link 90 ms before rank 1 and is blocked 100 ms; rank 1 is blocked 10 ms;
    # backward, both arrive together
    step = ({"blocked": {forward: 0.1, backward: 0.02}, "arrivals": {forward: 5.0, backward: 6.0}},
            {"blocked": {forward: 0.01, backward: 0.02}, "arrivals": {forward: 5.09, backward: 6.0}})
    assert blocked_per_rank(step, {"fc6-input"}, after_last_arrival=False) == pytest.approx([0.12, 0.03])
    assert blocked_per_rank(step, {"fc6-input"}, after_last_arrival=True) == pytest.approx([0.03, 0.03])


def test_bench_reports_ratios_with_targets_in_markdown_and_json(quick):
    comparisons = quick["json"]["comparisons"]
    assert any(c["what"].startswith("paper-split on 2 ranks vs single") and c["target"] == 0.95 for c in comparisons)
    assert all(c["verdict"] in ("-", "met") or c["verdict"].startswith("missed by") for c in comparisons)
    assert "| comparison | ratio | target | verdict | detail |" in quick["md"]
    assert quick["json"]["environment"]["torch"] and quick["md"] in quick["stdout"]


def test_on_a_gpu_every_speed_up_is_held_to_twice_the_plain_loop():
    from alexnet_mp.bench.matrix import FULL_GPU, PLAIN_LOOP, single_variants
    from alexnet_mp.bench.report import comparisons

    names = [PLAIN_LOOP] + [variant.named("single, paper") for variant in single_variants("cuda")]
    found = {name: Measurement(name, 1, 16, 256, [1000.0 * (i + 1)], 0.0, [0.0], [1.0], "paper")
             for i, name in enumerate(names)}
    rows = {row.ours: row for row in comparisons(found, FULL_GPU, "cuda")}
    for variant in single_variants("cuda")[1:]:
        row = rows[variant.named("single, paper")]
        assert row.theirs == PLAIN_LOOP and row.target == 2.0
    assert rows[names[-1]].ratio == len(names)  # the last variant measured len(names) x the plain loop


def test_on_a_gpu_the_pipeline_is_also_measured_decoding_on_the_device_in_the_workers():
    from alexnet_mp.bench.matrix import decode_places
    from alexnet_mp.data import DECODE_PLACES

    assert decode_places("cuda", []) == list(DECODE_PLACES)
    assert "device-in-workers" not in decode_places("cpu", [])  # there, the workers' decoding again


def test_on_a_gpu_the_paper_nets_missed_targets_are_shown_beside_torchvisions_layout_with_the_same_speed_ups(
        monkeypatch):
    from alexnet_mp.bench import report
    from alexnet_mp.bench.matrix import FULL_GPU, PLAIN_LOOP
    from alexnet_mp.bench.report import comparisons
    from alexnet_mp.speed import FAST_GPU

    monkeypatch.setattr(report, "peak_tflops", lambda precision: report.PEAK_TFLOPS["H100"][precision])

    def measured(name: str, images_per_s: float, arch: str, precision: str = "bf16") -> Measurement:
        return Measurement(name, 1, 16, 256, [images_per_s], 0.0, [0.0], [1.0], arch, precision)

    paper, owt = FAST_GPU.named("single, paper"), FAST_GPU.named("single, owt")
    found = {PLAIN_LOOP: measured(PLAIN_LOOP, 1000.0, "owt", "fp32"), paper: measured(paper, 1000.0, "paper"),
             owt: measured(owt, 2200.0, "owt")}
    rows = comparisons(found, FULL_GPU, "cuda")
    (twice,) = [row for row in rows if row.ours == paper and row.target == 2.0]
    assert twice.verdict == "missed by 1.00" and "(owt) with these speed-ups: 2.20x" in twice.detail
    (utilisation,) = [row for row in rows if row.what.startswith("model FLOPs utilisation")]
    assert "torchvision's layout (owt) " in utilisation.detail


def test_a_benchmark_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    from alexnet_mp import bench
    from alexnet_mp.bench.matrix import PLAIN_LOOP

    plain_loop = Measurement(PLAIN_LOOP, 1, 2, 4, [10.0], 0.0, [0.0], [100.0], "owt")

    def cut_short(sizes, scratch, device_type, measured, modes):
        measured([plain_loop], [])
        raise KeyboardInterrupt  # as a timeout's signal ends it

    monkeypatch.setattr(bench, "run_matrix", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench.bench(tmp_path, quick=True)
    assert [m["name"] for m in json.loads((tmp_path / "bench.json").read_text())["measurements"]] == [PLAIN_LOOP]
    assert PLAIN_LOOP in (tmp_path / "bench.md").read_text()


def test_a_failed_measurement_exits_1_in_one_line_after_writing_the_others(tmp_path, monkeypatch, capsys):
    from alexnet_mp import bench
    from alexnet_mp.bench.matrix import PLAIN_LOOP

    plain_loop = Measurement(PLAIN_LOOP, 1, 2, 4, [10.0], 0.0, [0.0], [100.0], "owt")
    monkeypatch.setattr(bench, "run_matrix", lambda *args: ([plain_loop], [], ["single, paper: FAILED: out of memory"]))
    result = in_process(capsys, "bench", "--quick", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert one_line_error(result) == \
        f"error: single, paper: FAILED: out of memory (the others are in {tmp_path}/bench.md)"
    assert PLAIN_LOOP in (tmp_path / "bench.md").read_text()


def test_bench_launched_several_times_shows_each_measurements_median_launch_beside_every_launchs_step(
        tmp_path, monkeypatch, capsys):
    from alexnet_mp import bench
    from alexnet_mp.bench.matrix import PLAIN_LOOP

    steps = iter([0.3, 0.1, 0.2])

    def launch(sizes, scratch, device_type, measured, modes):
        step = next(steps)
        return [Measurement(PLAIN_LOOP, 1, 2, 4, [4 / step], 0.0, [0.0], [100.0], "owt", step_s=step)], [], []

    monkeypatch.setattr(bench, "run_matrix", launch)
    assert in_process(capsys, "bench", "--quick", "--launches", "3", "--output-dir", str(tmp_path)).returncode == 0
    (measured,) = json.loads((tmp_path / "bench.json").read_text())["measurements"]
    assert measured["step_s"] == 0.2 and measured["launch_steps_s"] == [0.3, 0.1, 0.2]
    assert "| 300 / 100 / 200 |" in (tmp_path / "bench.md").read_text()


def test_bench_refuses_an_unknown_layout_before_measuring_anything(tmp_path, capsys):
    result = in_process(capsys, "bench", "--modes", "weird-trick,ddp", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown --mode 'ddp'" in one_line_error(result)
    assert not list(tmp_path.iterdir())


def test_a_bf16_bench_step_runs_its_layout_in_bf16_as_training_does(tmp_path):
    """FSDP gathers its units in the run's precision: bench's ranks (and so calibrate's) send what a bf16 run sends."""
    bf16 = Variant("bf16")
    measured = run_distributed(layout_steps, 2, tmp_path, "fsdp", QUICK.paper_net, {}, QUICK.batch, QUICK, bf16)
    parts = plan_parts("fsdp", QUICK.paper_net, 2, QUICK.batch, QUICK.num_classes, variant=bf16)
    assert [rank["bytes"] for rank in measured] == pytest.approx([part.sent_bytes() for part in parts])
