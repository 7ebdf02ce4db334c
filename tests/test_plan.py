"""The cost model: the papers' argument from the layer shapes, and the plan command's table and plot.
That its bytes equal the ledger's is tested beside the ledger (test_strategies, test_paper_split)."""

from __future__ import annotations

import matplotlib.image
import pytest

from alexnet_mp.plan import layouts, one_gpu, plan, predict, shares
from alexnet_mp.predict import process_memory
from alexnet_mp.speed import Speed, Variant
from tests.launching import in_process, one_line_error


def test_conv_layers_hold_few_parameters_and_most_of_the_flops():
    line = shares("paper")
    assert "conv layers hold 3.8% of the parameters and do 91.9% of the FLOPs" in line


def test_weird_trick_sends_less_than_data_parallel_at_every_gpu_count():
    for gpus in (2, 4, 8, 16):
        trick, data = (predict(mode, "paper", gpus, 128, 100.0) for mode in ("weird-trick", "data-parallel"))
        assert max(trick.bytes_per_rank) < max(data.bytes_per_rank) / 5


def test_overlap_never_lengthens_a_step_and_hides_only_gradients():
    for prediction in plan([2, 4], "paper", 128, 100.0):
        for gbps in (16.0, 450.0):
            activations, _ = prediction.comm_s(gbps)
            overlapped = prediction.step_s(gbps, overlap=True)
            assert prediction.compute_s + activations <= overlapped <= prediction.step_s(gbps, overlap=False)


def test_rounds_hide_the_feature_exchange_behind_the_fc_layers_work_and_nothing_else():
    """R rounds, each round's transfer beside the FC layers' work on the round before: (R - 1) / R of the
    shorter of the two is hidden. Scheme (a) waits for the whole exchange."""
    at_once, rounds = (predict("weird-trick", "paper", 4, 512, 5.0, options={"exchange": scheme})
                       for scheme in ("all", "slice"))
    assert (at_once.rounds, rounds.rounds) == (0, 4) and rounds.layout == "weird-trick (slice)"
    for gbps in (8.0, 450.0):
        transfer = rounds.round_bytes / (gbps * 1e9)
        hidden = at_once.step_s(gbps, overlap=True) - rounds.step_s(gbps, overlap=True)
        assert hidden == pytest.approx(3 / 4 * min(transfer, rounds.fc_compute_s))
        assert rounds.step_s(gbps, overlap=False) == pytest.approx(at_once.step_s(gbps, overlap=False))
    assert 0 < rounds.fc_compute_s < rounds.compute_s


def test_per_gpu_batches_grow_the_global_batch_with_the_gpus():
    predictions = plan([1, 2, 4], "paper", 128, 5.0, per_gpu=True)
    assert {(p.gpus, p.batch) for p in predictions} == {(1, 128), (2, 256), (4, 512)}
    (single,) = [p for p in predictions if p.gpus == 1]
    assert single.images_per_s(16.0) == pytest.approx(one_gpu("paper", 128, 5.0).images_per_s(16.0))


def test_compute_divides_across_ranks():
    single = predict("single", "paper", 1, 128, 100.0)
    for mode in ("data-parallel", "paper-split"):
        assert predict(mode, "paper", 4, 128, 100.0).compute_s == pytest.approx(single.compute_s / 4, rel=0.02)


def test_only_layouts_that_can_run_are_planned():
    assert layouts(1, "paper") == ["single"]
    assert layouts(2, "owt") == ["data-parallel", "weird-trick", "fsdp", "pipeline", "tensor-parallel"]
    assert "pipeline" not in layouts(16, "paper")  # one stage per weight layer at most
    assert "paper-split" not in layouts(3, "paper")


def test_a_pipeline_step_is_predicted_with_its_bubble():
    """M micro-batches on N stages take M + N - 1 slots for M of work: compute stretched by (M + N - 1) / M."""
    pipelined = predict("pipeline", "paper", 4, 128, 100.0, options={"microbatches": 4})
    assert pipelined.layout == "pipeline (M=4)" and pipelined.slots == 7 / 4
    assert pipelined.busy_s == pytest.approx(pipelined.compute_s * 7 / 4)
    assert pipelined.step_s(450.0, overlap=False) > pipelined.busy_s


def test_plan_command_prints_a_table_and_draws_a_plot(tmp_path, capsys):
    result = in_process(capsys, "plan", "--gpus", "1,2,4", "--batch", "128", "--link-gbps", "16,450",
                        "--device-tflops", "50", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "| weird-trick | 4 |" in result.stdout and "step ms @ 450 GB/s" in result.stdout
    assert (tmp_path / "plan.md").read_text().count("| data-parallel |") == 2
    assert matplotlib.image.imread(tmp_path / "plan.png").shape[2] in (3, 4)


def test_plan_on_a_profile_writes_its_table_and_plot_where_told(tmp_path, capsys):
    result = in_process(capsys, "plan", "--gpus", "1,2", "--batch", "64", "--hardware", "h100-nvlink",
                        "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "| paper-split | 2 | 64 |" in (tmp_path / "plan.md").read_text()
    assert matplotlib.image.imread(tmp_path / "plan.png").shape[2] in (3, 4)


@pytest.mark.parametrize("profile", [[], ["--hardware", "h100-nvlink"]])
def test_plan_refuses_a_batch_no_layout_can_split_in_one_line(profile, capsys):
    result = in_process(capsys, "plan", "--gpus", "3", "--batch", "1", *profile)
    assert result.returncode == 2 and "no layout runs a batch of 1 on 3 GPUs" in one_line_error(result)


@pytest.mark.parametrize("profile", [[], ["--hardware", "h100-nvlink"]])
def test_plan_says_why_a_layout_it_leaves_out_cannot_run(profile, capsys):
    result = in_process(capsys, "plan", "--gpus", "2", "--batch", "128", "--microbatches", "3", *profile)
    assert result.returncode == 0 and "| pipeline" not in result.stdout
    assert "- on 2 GPUs: --batch-size 128 does not split evenly for --mode pipeline" in result.stdout


def test_plan_predicts_the_papers_scaling_speed_ups_over_one_gpu(capsys):
    """128 images per GPU, the 2014 paper's scheme (b): each row's speed-up is over one GPU at 128 images."""
    result = in_process(capsys, "plan", "--gpus", "1,2,4,8", "--batch-per-gpu", "128", "--exchange", "one-at-a-time",
                        "--link-gbps", "8", "--device-tflops", "1")
    assert result.returncode == 0, result.stderr
    assert "128 images per GPU" in result.stdout and "| single | 1 | 128 |" in result.stdout
    assert "| weird-trick (one-at-a-time) | 8 | 1024 |" in result.stdout and "1.00x)" in result.stdout


def test_plan_refuses_gpu_counts_that_are_not_numbers(tmp_path, capsys):
    result = in_process(capsys, "plan", "--gpus", "2,four", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--gpus takes comma-separated numbers" in one_line_error(result)


def test_plans_memory_is_the_cost_models_peak_of_the_busiest_process_the_foreach_copy_included():
    """At 8 images a tensor-parallel rank peaks in the optimizer's step, with the copy of its DTensors' gradients."""
    planned = predict("tensor-parallel", "paper", 2, 8, 1.0, 10)
    assert planned.memory["optimizer"] > 0
    assert sum(planned.memory.values()) == max(process.tensors
                                               for process in process_memory("tensor-parallel", "paper", 2, 8, 10))


def test_plan_at_a_rate_in_bf16_sends_activations_at_two_bytes_and_gradients_at_four(capsys):
    result = in_process(capsys, "plan", "--gpus", "2", "--batch", "128", "--link-gbps", "16", "--mixed-precision",
                        "bf16")
    assert result.returncode == 0, result.stderr
    assert "as a step in bf16 holds them" in result.stdout
    assert "| paper-split | 2 | 128 | 14.3 |" in result.stdout  # 28.6 MiB in float32
    assert "| data-parallel | 2 | 128 | 232.6 |" in result.stdout  # the same in float32


def test_plan_at_a_rate_counts_the_memory_of_a_compiled_bf16_step_as_its_graphs_keep_it():
    compiled = Variant("bf16", Speed(compile=True))
    planned = predict("single", "paper", 1, 256, 70.0, options={}, variant=compiled)
    assert sum(planned.memory.values()) == max(process.tensors for process in
                                               process_memory("single", "paper", 1, 256, variant=compiled))


def test_plan_refuses_a_precision_beside_a_profile_which_plans_as_its_layers_ran(capsys):
    result = in_process(capsys, "plan", "--gpus", "2", "--hardware", "h100-nvlink", "--mixed-precision", "bf16")
    assert result.returncode == 2 and "a --hardware profile plans a step as its layers ran" in one_line_error(result)
