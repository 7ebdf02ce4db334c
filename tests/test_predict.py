"""The cost model fed by a hardware profile: its pieces on known inputs (a profile written by hand), a profile
read back, bad profiles refused in one line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alexnet_mp.bench import held_markdown, machine_drift
from alexnet_mp.bench.matrix import FULL, QUICK
from alexnet_mp.bench.measure import Measurement
from alexnet_mp.calibrate import _layer_passes, _memory_records, fit, fresh_blocks, large_blocks, pass_images
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import (
    HeapWalk,
    heap_served_bytes,
    held_together,
    layer_costs,
    memory_bytes,
    parameters,
    step_blocks,
)
from alexnet_mp.errors import UsageError
from alexnet_mp.hardware import KINDS, PRESETS, Collective, Hardware, ResidentOverhead, load, pass_s, with_links
from alexnet_mp.ledger import BACKWARD, FORWARD
from alexnet_mp.malloc import LargeBlocks
from alexnet_mp.model import PAPER, build_model
from alexnet_mp.predict import (
    Held,
    ProcessMemory,
    StepFigures,
    disordered,
    held_table,
    predict_step,
    process_memory,
)
from alexnet_mp.processes import run_distributed
from alexnet_mp.speed import EAGER, Speed, Variant
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import GATHERING, LAYOUTS, REFERENCE, REPLICATED, Layout, build
from alexnet_mp.strategies.costs import (
    COMMUNICATION,
    COMPUTE,
    CONV_FEATURES,
    DDP_BUCKET_CAPS,
    PartTimes,
    Span,
    bucketed_layers,
    ddp_buckets,
    gradient_bytes,
    met_at_collectives,
    step_end,
)
from alexnet_mp.strategies.pipeline import simulated_schedule
from tests.equivalence import OWT_NET, PAPER_NET
from tests.launching import in_process, one_line_error

LINK = Collective(latency_s=1e-3, bytes_per_s=1e9)
TIMED_LINK = Collective(1e-3, 1e9, measured=((1e5, 2e-3), (1e6, 1e-2), (4e6, 1.6e-2)))
MIB = 2**20


def by_hand(cores: int | None = None, tflops: float = 1.0) -> Hardware:
    """Every layer at `tflops` of training, every collective 1 ms plus 1 GB/s."""
    return Hardware("by hand", "a test", "gloo", cores, tflops=tflops, collectives={"any": dict.fromkeys(KINDS, LINK)})


def test_a_collective_call_costs_its_latency_and_its_bytes_over_its_bandwidth():
    assert LINK.seconds(2e9) == pytest.approx(1e-3 + 2.0)


def test_a_collective_timed_at_several_sizes_costs_a_call_on_the_line_through_the_two_sizes_nearest_its_own():
    assert TIMED_LINK.seconds(5.5e5) == pytest.approx(2e-3 + 0.5 * 8e-3)


def test_a_call_smaller_than_any_size_timed_costs_the_smallest_sizes_time():
    assert TIMED_LINK.seconds(10.0) == pytest.approx(2e-3)


def test_calibrates_fit_keeps_each_sizes_time_but_no_more_than_a_larger_sizes():
    link = fit([(1e3, 5e-3), (1e5, 2e-3), (1e8, 0.1)])
    assert link.measured == ((1e3, 2e-3), (1e5, 2e-3), (1e8, 0.1))


def test_calibrates_line_holds_its_small_sizes_to_their_time_as_closely_as_its_large_ones():
    # 2 ms at the small sizes and 1 GB/s beyond, but for a large size 10% slow: an unweighted least-squares line
    # trades the small sizes' time away for that 10%
    points = [(1e3, 2e-3), (1e5, 2.1e-3), (1e8, 0.102), (4e8, 0.44)]
    line = dataclasses.replace(fit(points), measured=())
    assert all(line.seconds(sent) == pytest.approx(seconds, rel=0.1) for sent, seconds in points[:3])


def test_one_device_costs_its_training_flops_at_the_profiles_rate():
    flops = 3 * sum(cost.flops for cost in layer_costs(PAPER, 10)) * 8
    assert predict_step("single", "paper", 1, 8, by_hand(), 10).step_s == pytest.approx(flops / 1e12)


def test_data_parallel_costs_half_the_compute_and_its_all_reduce_in_ddps_buckets():
    """Three buckets on 10 classes: fc8's gradients with fc7's (fc8's alone are under the first bucket's 1 MiB),
    fc6's, the convs'. Over gloo what runs beside the backward stretches it: the step holds every second of it."""
    whole = predict_step("single", "paper", 1, 8, by_hand(), 10)
    replicas = predict_step("data-parallel", "paper", 2, 8, by_hand(), 10)
    params = parameters(LAYOUTS["data-parallel"].costs.work("paper", 0, 2, 8, 10), PAPER, 10)
    sent = 4 * params  # a ring all-reduce over 2 ranks sends each rank's whole gradient once
    assert replicas.step_s == pytest.approx(whole.step_s / 2 + 3 * 1e-3 + sent / 1e9)


def test_ranks_that_outnumber_the_cores_share_them():
    alone = predict_step("data-parallel", "paper", 2, 8, by_hand(cores=2), 10).compute_s[0]
    sharing = predict_step("data-parallel", "paper", 4, 16, by_hand(cores=2), 10).compute_s[0]
    assert sharing == pytest.approx(2 * alone)


def test_a_calibrated_slowdown_of_ranks_computing_at_once_replaces_ranks_over_cores():
    alone = predict_step("data-parallel", "paper", 2, 8, by_hand(cores=2), 10).compute_s[0]
    measured = dataclasses.replace(by_hand(cores=2), shared_slowdown={"2": 1.1, "4": 2.3})
    assert predict_step("data-parallel", "paper", 2, 8, measured, 10).compute_s[0] == pytest.approx(1.1 * alone)
    assert predict_step("data-parallel", "paper", 4, 16, measured, 10).compute_s[0] == pytest.approx(2.3 * alone)


FC6 = {"images": [2, 8], "forward": [1.0, 2.5], "backward": [2.0, 5.0]}  # a pass's seconds at 2 and 8 images


def test_calibrate_times_passes_of_each_slice_of_the_global_batch_the_layouts_run():
    assert pass_images(32) == [2, 4, 8, 16, 32]
    assert pass_images(24) == [2, 4, 8, 16, 24]
    assert pass_images(2) == [1, 2]


def test_a_measured_layer_costs_each_pass_at_its_images_interpolated_between_the_sizes_measured():
    profile = Hardware("measured", "a test", "gloo", 2, layers={"2": {"paper.fc6@1": FC6}})
    assert profile.layer_s("paper.fc6", 1.0, 1, 0.0, samples=8, passes=2) == pytest.approx((2 * 1.5, 2 * 3.0))


def test_a_measured_layer_pays_the_profiles_fresh_page_cost_on_the_bytes_each_pass_maps_afresh():
    """fc6's backward maps its weight's gradient afresh at every pass, whatever its images."""
    fresh = {**FC6, "fresh_bytes": {"forward": [0.0, 0.0], "backward": [1e8, 1e8]},
             "fresh_at_once_bytes": {"forward": [0.0, 0.0], "backward": [1e8, 1e8]}}
    profile = Hardware("measured", "a test", "gloo", 2, layers={"2": {"paper.fc6@1": fresh}},
                       fresh_page_s_per_byte={"2": 1e-9})
    assert profile.layer_s("paper.fc6", 1.0, 1, 0.0, samples=8, passes=2) == pytest.approx((2 * 1.5, 2 * (3.0 + 0.1)))


def test_fsdp_adds_no_gradient_into_another_its_units_whole_gradients_are_reduce_scattered_into_new_shards():
    profile = dataclasses.replace(by_hand(), accumulate_s_per_byte={"1": 1e-9})
    assert predict_step("fsdp", "paper", 2, 8, profile, 10).compute_s == pytest.approx(
        predict_step("fsdp", "paper", 2, 8, by_hand(), 10).compute_s)


def test_a_layer_run_in_several_passes_adds_each_later_passs_weight_gradient_into_the_accumulated_one():
    """4 micro-batches: 3 additions of the gradient of every parameter the last stage holds."""
    profile = dataclasses.replace(by_hand(), accumulate_s_per_byte={"1": 1e-9})
    options = {"microbatches": 4}
    step = predict_step("pipeline", "paper", 2, 8, profile, 10, options)
    alone = predict_step("pipeline", "paper", 2, 8, by_hand(), 10, options)
    held = parameters(LAYOUTS["pipeline"].costs.work("paper", 1, 2, 8, 10), PAPER, 10)
    assert step.compute_s[1] - alone.compute_s[1] == pytest.approx(3 * 4 * held * 1e-9)


def test_ddp_copies_each_gradient_into_its_bucket_at_the_cost_of_an_addition():
    """On NCCL, where no all-reduce beside the backward stretches it."""
    nccl = dataclasses.replace(by_hand(), backend="nccl")
    added = dataclasses.replace(nccl, accumulate_s_per_byte={"1": 1e-9})
    step, alone = (predict_step("data-parallel", "paper", 2, 8, profile, 10) for profile in (added, nccl))
    held = parameters(LAYOUTS["data-parallel"].costs.work("paper", 0, 2, 8, 10), PAPER, 10)
    assert step.compute_s[0] - alone.compute_s[0] == pytest.approx(4 * held * 1e-9)


@pytest.mark.parametrize(("mode", "ranks", "layers"), [
    ("data-parallel", 2, set(PAPER.layer_names)), ("data-parallel", 1, set()),
    ("weird-trick", 2, {spec.name for spec in PAPER.convs}), ("paper-split", 2, set()),
    ("paper-split", 4, set(PAPER.layer_names))])
def test_ddps_buckets_hold_the_gradients_of_the_layers_a_layout_replicates(mode, ranks, layers):
    costs = LAYOUTS[mode].costs
    work = costs.work("paper", 0, costs.parts(ranks), 8, 10)
    held = {cost.name: cost.parameters for cost in layer_costs(PAPER, 10, work.holds)}
    assert bucketed_layers(costs.expected_traffic("paper", ranks, 8, 10)[0], held) == layers


def test_a_layer_measured_at_another_share_of_its_outputs_costs_in_proportion_to_its_share():
    profile = Hardware("measured", "a test", "gloo", 2, layers={"2": {"paper.fc6@1": FC6}})
    assert profile.layer_s("paper.fc6", 0.5, 1, 0.0, samples=8, passes=2) == pytest.approx((1.5, 3.0))


@pytest.mark.parametrize(("served", "forward"), [(0.0, 0.3 + 0.04), (1e7, 0.3 + 0.03), (1e8, 0.3)])
def test_a_pass_pays_for_the_pages_of_the_blocks_it_maps_afresh_but_not_for_those_its_heap_serves(served, forward):
    """conv1 maps 40 MB afresh a forward pass of 8 images, at 1 ns a byte of fresh pages."""
    conv1 = {"images": [2, 8], "forward": [0.1, 0.3], "backward": [0.2, 0.7],
             "fresh_bytes": {"forward": [0.0, 4e7], "backward": [0.0, 0.0]},
             "fresh_at_once_bytes": {"forward": [0.0, 4e7], "backward": [0.0, 0.0]}}
    profile = Hardware("measured", "a test", "gloo", None, layers={"1": {"paper.conv1@1": conv1}},
                       fresh_page_s_per_byte={"1": 1e-9})
    assert profile.layer_s("paper.conv1", 1.0, 1, 0.0, samples=8, served={"forward": served}) == pytest.approx(
        (forward, 0.7))


def test_a_steady_heap_serves_a_large_block_where_its_free_room_fits_it_and_maps_it_afresh_where_not():
    """A heap of 100 MiB holding 10: 90 free, then 50 after a 40 MiB block, too little for another 60 MiB."""
    walk = HeapWalk(heap=100 * MIB, held=10 * MIB)
    assert walk.allocate(40 * MIB, ("conv1", FORWARD)).in_heap
    assert not walk.allocate(60 * MIB, ("conv1", FORWARD)).in_heap
    assert walk.served == {("conv1", FORWARD): 40 * MIB}


def test_a_steady_heap_grows_to_hold_every_smaller_block_and_frees_only_what_it_holds():
    walk = HeapWalk(heap=12 * MIB, held=10 * MIB)
    small, large = walk.allocate(4 * MIB, ("conv2", FORWARD)), walk.allocate(40 * MIB, ("fc6", BACKWARD))
    assert walk.heap == 14 * MIB
    walk.free([small, large])
    assert walk.used == 10 * MIB


def test_a_passs_transient_blocks_held_together_are_served_while_the_heaps_free_room_fits_them():
    """120 MiB allocated in blocks of 40 MiB, all live at once, in a heap with 90 MiB free: two served, the third
    mapped afresh."""
    walk = HeapWalk(heap=100 * MIB, held=10 * MIB)
    walk.pass_transient(LargeBlocks(120 * MIB, 120 * MIB), 40 * MIB, ("conv1", FORWARD))
    assert walk.served == {("conv1", FORWARD): 80 * MIB} and walk.used == 10 * MIB


def test_a_passs_transient_blocks_live_in_turns_are_each_served_by_the_room_the_turn_before_freed():
    """The same 120 MiB, 80 of it live at once: two blocks, then the third, each turn within the 90 MiB free."""
    walk = HeapWalk(heap=100 * MIB, held=10 * MIB)
    walk.pass_transient(LargeBlocks(120 * MIB, 80 * MIB), 40 * MIB, ("conv1", FORWARD))
    assert walk.served == {("conv1", FORWARD): 120 * MIB} and walk.used == 10 * MIB


def test_the_large_blocks_that_outlast_a_pass_are_what_a_forward_keeps_and_a_backwards_weight_gradient():
    """At 32 images conv1 keeps its ReLU'd output and its LRN's (37 MB each); fc6's backward makes its gradient, and
    conv1's backward only temporaries."""
    lasting = step_blocks(LAYOUTS["single"].costs.work("paper", 0, 1, 32, 10), PAPER, 10, {}).lasting_fresh_bytes()
    assert lasting["conv1", FORWARD] == 2 * 4 * 32 * 96 * 55 * 55
    assert lasting["fc6", BACKWARD] == 4 * (9216 * 4096 + 4096)
    assert lasting["conv1", BACKWARD] == 0


def test_in_bf16_the_large_blocks_that_outlast_a_forward_are_what_it_keeps_at_two_bytes_and_autocasts_weight_copy():
    """At 32 images in bf16 conv1's ReLU'd output and its LRN's are 18.6 MB each, under the 32 MiB of a block mapped
    afresh; fc6's forward leaves autocast's bf16 copy of its weights (75 MB), held all step."""
    work = LAYOUTS["single"].costs.work("paper", 0, 1, 32, 10)
    lasting = step_blocks(work, PAPER, 10, {}, Variant("bf16")).lasting_fresh_bytes()
    assert lasting["conv1", FORWARD] == 0
    assert lasting["fc6", FORWARD] == 2 * (9216 * 4096 + 4096)
    assert lasting["fc6", BACKWARD] == 4 * (9216 * 4096 + 4096)


def test_a_one_device_step_at_32_images_finds_conv1s_large_outputs_in_the_heap_its_smaller_blocks_grew():
    """conv1's ReLU'd output and its LRN's, 37 MB each, the only blocks of 32 MiB and up its forward keeps."""
    blocks = step_blocks(LAYOUTS["single"].costs.work("paper", 0, 1, 32, 10), PAPER, 10, {})
    assert heap_served_bytes(blocks)["conv1", FORWARD] == 2 * 4 * 32 * 96 * 55 * 55


def test_a_pass_beyond_the_sizes_measured_follows_the_nearest_two_but_costs_no_less_than_the_smallest_scaled_down():
    assert pass_s([2, 8, 32], [1.0, 2.5, 14.5], 64) == pytest.approx(14.5 + 12.0 / 24 * 32)
    assert pass_s([2, 8, 32], [1.0, 2.5, 14.5], 1) == pytest.approx(0.75)
    assert pass_s([2, 8], [0.1, 4.0], 1) == pytest.approx(0.05)


def test_fsdp_sends_each_units_share_of_a_link_in_a_call_of_its_own():
    config = TrainConfig(mode="fsdp", arch="paper")
    calls = LAYOUTS["fsdp"].costs.call_elements("parameters", 1000.0, 2, config, {"conv1": 100, "fc6": 300})
    assert calls == pytest.approx([250.0, 750.0])


def test_ddp_sends_each_buckets_share_of_the_replicated_gradients_in_a_call_of_its_own():
    """fc7's 3 MiB of gradients close the first bucket; conv1's 1 MiB are the last."""
    config = TrainConfig(mode="data-parallel", arch="paper")
    calls = LAYOUTS["data-parallel"].costs.call_elements("gradients", 1000.0, 2, config,
                                                         {"conv1": 2**18, "fc7": 3 * 2**18})
    assert calls == pytest.approx([750.0, 250.0])


def test_fsdp_and_tensor_parallelism_are_costed_at_the_flat_tensor_collectives_their_engines_call():
    fsdp, tensor_parallel = (LAYOUTS[mode].costs for mode in ("fsdp", "tensor-parallel"))
    assert {fsdp.collective("parameters", direction) for direction in (FORWARD, BACKWARD)} == {"all-gather-single"}
    assert fsdp.collective("gradients", BACKWARD) == "reduce-scatter-single"
    assert [tensor_parallel.collective(CONV_FEATURES.name, direction) for direction in (FORWARD, BACKWARD)] == [
        "all-gather-single", "reduce-scatter-single"]


def test_a_layouts_dtensor_parameters_step_at_the_foreach_kernels_rate_the_rest_at_the_fused_one():
    rates = {"fused": 1e-9, "foreach": 6e-9}
    profile = dataclasses.replace(by_hand(), optimizer_s_per_parameter={"1": rates})
    costs = LAYOUTS["tensor-parallel"].costs
    held = layer_costs(PAPER, 10, costs.work("paper", 0, 2, 8, 10).holds)
    dtensors = sum(cost.parameters for cost in held if cost.name in ("fc6", "fc7"))
    without = predict_step("tensor-parallel", "paper", 2, 8, by_hand(), 10).compute_s[0]
    with_optimizer = predict_step("tensor-parallel", "paper", 2, 8, profile, 10).compute_s[0]
    assert with_optimizer - without == pytest.approx(
        1e-9 * (sum(cost.parameters for cost in held) - dtensors) + 6e-9 * dtensors)


def test_equal_pipeline_stages_leave_the_bubble_of_m_plus_n_minus_1_slots():
    for schedule in ("gpipe", "1f1b"):
        step = step_end(simulated_schedule(schedule, [1.0] * 4, [2.0] * 4, [0.0] * 4, [0.0] * 4, 8))
        assert step == pytest.approx((8 + 4 - 1) / 8 * 3.0)


def test_the_slowest_pipeline_stage_sets_the_pace_and_transfers_delay_the_others():
    step = step_end(simulated_schedule("gpipe", [1.0, 3.0], [2.0, 6.0], [0.4, 0.0], [0.0, 0.4], 4))
    # stage 1's work, 9, after the first micro-batch reached it (stage 0's first forward, 0.25, and its
    # transfer, 0.1), then the last backward's gradient back to stage 0 (0.1) and that backward (0.5)
    assert step == pytest.approx(0.25 + 0.1 + 9.0 + 0.1 + 0.5)


def test_a_pipeline_stage_waits_for_its_input_in_the_bubble_between_its_micro_batches_compute():
    """One micro-batch on 2 stages: stage 1 computes while stage 0 waits for its gradient, and the other way."""
    timeline = simulated_schedule("gpipe", [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0], 1)
    assert timeline == [[Span("micro-batch 0 forward", "compute", 0.0, 1.0),
                         Span("activations backward", "communication", 1.0, 4.0),
                         Span("micro-batch 0 backward", "compute", 4.0, 6.0)],
                        [Span("activations forward", "communication", 0.0, 1.0),
                         Span("micro-batch 0 forward", "compute", 1.0, 2.0),
                         Span("micro-batch 0 backward", "compute", 2.0, 4.0)]]


def test_a_pipeline_stage_runs_each_micro_batch_layer_by_layer_and_steps_its_optimizer_after_the_last():
    config = TrainConfig(mode="pipeline", options={"schedule": "gpipe", "microbatches": 2})
    stage = PartTimes(dict.fromkeys(PAPER.layer_names, (0.0, 0.0)) | {"conv1": (1.0, 2.0), "conv2": (3.0, 2.0)},
                      0.5, {}, {})
    (spans,) = LAYOUTS["pipeline"].costs.timeline([stage], 1, config, blocking=True)
    assert [(span.name, span.end_s) for span in spans] == [
        ("conv1 forward", 0.5), ("conv2 forward", 2.0), ("conv1 forward", 2.5), ("conv2 forward", 4.0),
        ("conv2 backward", 5.0), ("conv1 backward", 6.0), ("conv2 backward", 7.0), ("conv1 backward", 8.0),
        ("optimizer step", 8.5)]


def part_times(forward_s: float, backward_s: float, comm: dict[tuple[str, str], float], fc_s: float = 0.0,
               parameters: dict[str, int] | None = None, **layers: tuple[float, float]) -> PartTimes:
    """A part of the paper net: its compute all conv1's but `fc_s` of fc6's backward, or the `layers` given."""
    given = layers or {"conv1": (forward_s, backward_s - fc_s), "fc6": (0.0, fc_s)}
    return PartTimes(dict.fromkeys(PAPER.layer_names, (0.0, 0.0)) | given, 0.0, comm, parameters or {})


@pytest.mark.parametrize(("blocking", "backward"), [(True, 1.5), (False, 1.0)])
def test_ddp_reduces_each_bucket_once_the_backward_fills_it_and_the_rank_waits_for_what_is_left(blocking, backward):
    """fc7's 3 MiB of gradients close DDP's first bucket (1.2 s of the 1.6 s reduction) once fc7's backward is done;
    conv1's 1 MiB, the last (0.4 s), once the backward is: 0.6 s of the reduction comes after it. On gloo the 1 s
    beside the backward runs on its cores and stretches it."""
    comm = {("gradients", BACKWARD): 1.6}
    config = TrainConfig(mode="data-parallel", arch="paper")
    part = part_times(0, 0, comm, parameters={"conv1": 2**18, "fc7": 3 * 2**18}, conv1=(0.5, 1.0), fc7=(0.5, 1.0))
    (spans,) = LAYOUTS["data-parallel"].costs.timeline([part], 2, config, blocking)
    assert [span.name for span in spans] == [
        "conv1 forward", "fc7 forward", "fc7 backward", "conv1 backward", "gradients backward"]
    assert [span.end_s for span in spans] == pytest.approx([0.5, 1.0, 1.0 + backward, 1.0 + 2 * backward,
                                                            1.6 + 2 * backward])


def test_ddp_buckets_gradients_as_torch_assigns_them():
    """torch's own assignment (private: `_compute_bucket_assignment_by_size`, which DDP's rebuild after the first
    step calls with its caps) of the paper net's parameters in the order the backward makes their gradients."""
    net = build_model("paper", 1000)
    for link in ("gradients", "conv-gradients"):
        held = [(name, param) for name, param in reversed(list(net.named_parameters()))
                if name.startswith(link.removesuffix("gradients").removesuffix("-"))]
        buckets, _ = dist._compute_bucket_assignment_by_size([param for _, param in held], list(DDP_BUCKET_CAPS),
                                                             [False] * len(held))
        theirs = [list(dict.fromkeys(held[i][0].split(".")[0] for i in bucket)) for bucket in buckets]
        counts = {name: sum(cost.parameters for cost in layer_costs(PAPER) if cost.name == name)
                  for name in PAPER.layer_names}
        assert ddp_buckets(gradient_bytes(link, counts)) == theirs


def test_a_part_waits_for_a_layers_input_before_its_forward_and_for_its_gradient_after_its_backward():
    comm = {("conv3-input", FORWARD): 0.5, ("conv3-input", BACKWARD): 0.25}
    config = TrainConfig(mode="paper-split", arch="paper")
    part = part_times(0, 0, comm, conv2=(1.0, 2.0), conv3=(1.0, 2.0))
    spans, _ = LAYOUTS["paper-split"].costs.timeline([part, part], 2, config, blocking=True)
    assert [(span.name, span.start_s) for span in spans] == [
        ("conv2 forward", 0.0), ("conv3-input forward", 1.0), ("conv3 forward", 1.5), ("conv3 backward", 2.5),
        ("conv3-input backward", 4.5), ("conv2 backward", 4.75)]


def test_a_part_idles_while_another_computes_a_layer_it_does_not_hold_until_their_next_collective():
    """fc8 on the first part alone: the second sends its fc7 outputs, then waits for their gradient, which the
    first scatters once it has run fc8 forward and backward."""
    config = TrainConfig(mode="weird-trick", arch="paper")
    first = part_times(0, 0, {("fc8-input", BACKWARD): 0.5}, fc7=(1.0, 1.0), fc8=(1.0, 1.0))
    second = part_times(0, 0, {("fc8-input", FORWARD): 0.5}, fc7=(1.0, 1.0))
    _, spans = LAYOUTS["weird-trick"].costs.timeline([first, second], 2, config, blocking=True)
    assert [(span.name, span.start_s, span.end_s) for span in spans] == [
        ("fc7 forward", 0.0, 1.0), ("fc8-input forward", 1.0, 1.5), ("fc8-input backward", 3.5, 4.0),
        ("fc7 backward", 4.0, 5.0)]


@pytest.mark.parametrize("mode", sorted(set(LAYOUTS) - {"single", "pipeline"}))  # a pipeline's sends delay stages
def test_every_layouts_predicted_ranks_wait_for_each_link_they_send_on_and_never_do_two_things_at_once(mode):
    """On links far slower than the compute, nothing hides: every (link, direction) a rank sends on shows in its
    timeline."""
    predicted = predict_step(mode, "paper", 2, 8, by_hand(tflops=1e3), 10)
    sent = {f"{link} {direction}" for link, direction in LAYOUTS[mode].costs.expected_traffic("paper", 2, 8, 10)[0]}
    for spans in predicted.timeline:
        assert all(span.end_s <= after.start_s for span, after in itertools.pairwise(spans))
    assert sent <= {span.name for span in predicted.timeline[0] if span.category == "communication"}


def test_a_predicted_steps_communication_is_rank_0s_wait_as_the_record_times_it():
    """At one micro-batch the first stage waits out the second stage's whole pass: its wait, as the ledger counts
    it, is the bubble, not only its transfers."""
    predicted = predict_step("pipeline", "paper", 2, 8, by_hand(), 10, {"microbatches": 1})
    assert predicted.figures().compute_s == pytest.approx(predicted.compute_s[0])
    assert predicted.figures().comm_s >= predicted.compute_s[1] > 0


def test_a_prediction_that_reverses_two_clearly_different_measurements_is_named():
    runs = [("fast", 1.0, 2.0), ("slow", 2.0, 1.0), ("close", 1.1, 3.0), ("near", 1.05, 0.5)]
    assert disordered(runs) == ["fast measured faster than slow, predicted slower",
                                "close measured faster than slow, predicted slower"]


def test_a_reversed_pair_says_in_how_many_launches_the_measurement_itself_went_the_other_way():
    runs = [("fast", 1.0, 2.0), ("slow", 2.0, 1.0)]
    assert disordered(runs, launches={"fast": [1.0, 2.2, 0.9], "slow": [2.0, 2.1, 2.4]}) == [
        "fast measured faster than slow, predicted slower (1 of 3 launches measured it slower)"]


def test_a_held_prediction_gives_each_figures_relative_error_bytes_and_memory_of_the_busiest_rank():
    measured = StepFigures(0.2, 0.15, 0.05, [100e6, 300e6], [50.0, 80.0])
    predicted = StepFigures(0.25, 0.1, 0.1, [100e6, 330e6], [40.0, 100.0])
    assert Held("run", measured, predicted, []).error == pytest.approx(
        {"step_s": 0.25, "compute_s": -1 / 3, "comm_s": 1.0, "bytes_per_rank": 0.1, "memory_mb": 0.25})
    assert held_table([Held("run", measured, predicted, [])])[0] == [
        "run", "200.0 / 250.0 (+25%)", "150.0 / 100.0 (-33%)", "50.0 / 100.0 (+100%)", "300.0 / 330.0 (+10%)",
        "80 / 100 (+25%)"]


def test_a_measurement_without_its_memory_or_communication_leaves_those_errors_out():
    measured = StepFigures(0.2, 0.2, 0.0, [0.0], None)
    held = Held("single", measured, StepFigures(0.25, 0.25, 0.0, [0.0], [40.0]), [])
    assert held.error == {"step_s": pytest.approx(0.25), "compute_s": pytest.approx(0.25), "comm_s": None,
                          "bytes_per_rank": None, "memory_mb": None}
    assert held_table([held])[0][-2:] == ["0.0 / 0.0", "-"]


def test_a_profile_reads_back_as_written(tmp_path):
    conv1 = {"images": [2.0, 8.0], "forward": [0.1, 0.3], "backward": [0.2, 0.7],
             "fresh_bytes": {"forward": [0.0, 4e7], "backward": [0.0, 8e7]},
             "fresh_at_once_bytes": {"forward": [0.0, 4e7], "backward": [0.0, 4e7]}}
    profile = Hardware("written", "a test", "gloo", 2, layers={"1": {"paper.conv1@1": conv1}},
                       optimizer_s_per_parameter={"1": {"fused": 1e-9, "foreach": 6e-9}},
                       accumulate_s_per_byte={"1": 2e-10}, collectives={"2": {"all-reduce": LINK, "send": TIMED_LINK}},
                       fresh_copy_s_per_byte={"1": 5e-10}, fresh_page_s_per_byte={"1": 4e-10},
                       resident_overhead={"1": ResidentOverhead(1e8, 0.5, 2e7, 0.3)},
                       shared_slowdown={"2": 1.05}, probe_s={"1": 0.9}, links_source="another machine's",
                       variant=Variant("bf16", Speed(channels_last=True)), net_tflops={"owt": 3.0})
    (tmp_path / "profile.json").write_text(json.dumps(profile.to_json()))
    assert load(tmp_path / "profile.json") == profile


def test_a_bf16_profile_counts_the_activations_on_a_link_at_two_bytes_and_the_gradients_at_four():
    eager = by_hand()
    mixed = dataclasses.replace(eager, variant=Variant("bf16"))
    for mode, share in (("paper-split", 0.5), ("data-parallel", 1.0)):
        fp32, bf16 = (predict_step(mode, "paper", 2, 8, profile, 10) for profile in (eager, mixed))
        assert bf16.bytes_per_rank == pytest.approx([share * sent for sent in fp32.bytes_per_rank]), mode


def test_a_bf16_profile_times_each_collective_at_the_bytes_it_carries_in_bf16():
    eager = Hardware("bandwidth only", "a test", "nccl", None, tflops=1.0,
                     collectives={"any": dict.fromkeys(KINDS, Collective(0.0, 1e9))})
    fp32, bf16 = (predict_step("paper-split", "paper", 2, 8, profile, 10)
                  for profile in (eager, dataclasses.replace(eager, variant=Variant("bf16"))))
    assert bf16.comm_s == pytest.approx([seconds / 2 for seconds in fp32.comm_s])


def test_every_preset_predicts_every_layout_it_is_asked_for(capsys):
    result = in_process(capsys, "plan", "--gpus", "1,2,4", "--batch", "256", "--hardware", "h100-nvlink")
    assert result.returncode == 0
    assert {"| single | 1 | 256 |", "| paper-split | 2 | 256 |", "| pipeline (M=4) | 4 | 256 |"} <= {
        line[:line.index(" | 256 |") + 8] for line in result.stdout.splitlines() if " | 256 |" in line}


def test_plan_on_a_preset_says_it_times_each_nets_layers_at_one_rate(capsys):
    """Another layer kind or pass size runs at another rate on the same GPU: the reader is told."""
    result = in_process(capsys, "plan", "--gpus", "2", "--batch", "256", "--hardware", "a100-nvlink")
    assert "each net's layers at one rate" in result.stdout.splitlines()[0]


def test_a_preset_times_each_nets_layers_at_the_rate_measured_on_that_net():
    """The owt net does the paper net's FLOPs to 1% in half the time on an H100: its own rate, not the paper net's."""
    h100 = PRESETS["h100-nvlink"]
    paper, owt = (predict_step("single", arch, 1, 256, h100).compute_s[0] for arch in ("paper", "owt"))
    assert owt / paper == pytest.approx(69.4 / 146.0, rel=0.02)


def one_device_profile(tmp_path: Path) -> Path:
    """A profile of one GPU, as `calibrate` writes on a machine that has one: no collectives."""
    path = tmp_path / "one-gpu.json"
    path.write_text(json.dumps(Hardware("one gpu", "a test", "nccl", None, tflops=50.0).to_json()))
    return path


def test_links_lend_a_profile_of_one_device_their_collectives_and_leave_its_compute():
    one = Hardware("one gpu", "a test", "nccl", None, tflops=50.0)
    joined = with_links(one, PRESETS["h100-pcie"])
    assert joined.collectives == PRESETS["h100-pcie"].collectives and joined.tflops == 50.0
    assert predict_step("data-parallel", "paper", 2, 64, joined, 10).step_s == pytest.approx(predict_step(
        "data-parallel", "paper", 2, 64, dataclasses.replace(one, collectives=PRESETS["h100-pcie"].collectives),
        10).step_s)


def test_plan_with_links_plans_a_profile_of_one_gpu_on_several_and_says_where_each_figure_comes_from(tmp_path,
                                                                                                      capsys):
    result = in_process(capsys, "plan", "--gpus", "1,2", "--batch", "64", "--hardware",
                        str(one_device_profile(tmp_path)), "--links", "h100-nvlink")
    assert result.returncode == 0, result.stderr
    assert "| data-parallel | 2 | 64 |" in result.stdout
    assert "(a test; links: h100-nvlink's, nccl-tests' bus bandwidth on NVLink 4" in result.stdout.splitlines()[0]


def test_plan_on_a_profile_plans_what_it_can_and_says_what_it_lacks_for_the_rest(tmp_path, capsys):
    result = in_process(capsys, "plan", "--gpus", "1,2", "--batch", "64", "--hardware",
                        str(one_device_profile(tmp_path)))
    assert result.returncode == 0 and "| single | 1 | 64 |" in result.stdout
    assert "- on 2 GPUs, data-parallel: the hardware profile 'one gpu' has no all-reduce over 2 ranks" in result.stdout


def test_plan_on_a_profile_that_can_plan_nothing_asked_says_what_it_lacks_in_one_line(tmp_path, capsys):
    result = in_process(capsys, "plan", "--gpus", "2", "--hardware", str(one_device_profile(tmp_path)))
    assert result.returncode == 2 and "has no all-reduce over 2 ranks" in one_line_error(result)


def test_links_without_a_profile_to_lend_them_to_are_refused_in_one_line(capsys):
    result = in_process(capsys, "plan", "--gpus", "2", "--links", "h100-nvlink")
    assert result.returncode == 2
    assert "--links lends its collectives to a --hardware profile: add --hardware FILE" in one_line_error(result)


def test_links_from_a_profile_without_collectives_are_refused_in_one_line(tmp_path, capsys):
    profile = str(one_device_profile(tmp_path))
    result = in_process(capsys, "plan", "--gpus", "2", "--hardware", "h100-nvlink", "--links", profile)
    assert result.returncode == 2 and "'one gpu' has no collectives to lend: name a preset" in one_line_error(result)


@pytest.mark.parametrize(("text", "says"), [
    ("not json", "is not a hardware profile"),
    ('{"format": 9}', "format must be 10"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "tcp"}', "backend must be gloo or nccl"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "collectives": {"2": {}}}',
     "neither layer times nor tflops"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, '
     '"collectives": {"2": {"send": {"latency_s": -1, "bytes_per_s": 1}}}}', "send latency_s must be a positive"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "collectives": {"2": {"send": '
     '{"latency_s": 1, "bytes_per_s": 1, "measured": [[8, 1], [4, 2]]}}}}', "send measured must be two or more sizes"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "fresh_copy_s_per_byte": {"1": -1}, '
     '"collectives": {"2": {"send": {"latency_s": 1, "bytes_per_s": 1}}}}', "fresh_copy_s_per_byte must be"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "accumulate_s_per_byte": {"1": -1}, '
     '"collectives": {"2": {"send": {"latency_s": 1, "bytes_per_s": 1}}}}', "accumulate_s_per_byte must be"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "resident_overhead": {"1": '
     '{"fixed_bytes": 1e8, "per_activation_byte": -1, "in_group_bytes": 0, "per_gathered_byte": 0}}, '
     '"collectives": {"2": {"send": {"latency_s": 1, "bytes_per_s": 1}}}}',
     "resident_overhead per_activation_byte must be a number"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "shared_slowdown": {"2": 0}, '
     '"collectives": {"2": {"send": {"latency_s": 1, "bytes_per_s": 1}}}}', "shared_slowdown must be a positive"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "optimizer_s_per_parameter": '
     '{"1": {"fused": 1e-9}}, "collectives": {"2": {"send": {"latency_s": 1, "bytes_per_s": 1}}}}', "'foreach'"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "layers": {"1": {"paper.fc6@1": '
     '{"images": [8, 2], "forward": [1, 1], "backward": [1, 1]}}}}', "images must be two or more sizes that rise"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "layers": {"1": {"paper.fc6@1": '
     '{"images": [2, 8], "forward": [1], "backward": [1, 1]}}}}', "forward must have a figure for each of its images"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "layers": {"1": {"paper.fc6@1": '
     '{"images": [2, 8], "forward": [1, 1], "backward": [1, 1], "fresh_bytes": {"forward": [0, 0], '
     '"backward": [0, -1]}}}}}', "fresh_bytes.backward must be a number of bytes"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "layers": {"1": {"paper.fc6@1": '
     '{"images": [2, 8], "forward": [1, 1], "backward": [1, 1], "fresh_bytes": {"forward": [0, 0], '
     '"backward": [0, 0]}}}}}', "'fresh_at_once_bytes'"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "variant": {"precision": "fp8", '
     '"speed": {}}}', "variant.precision must be fp32 or bf16"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "variant": {"precision": "bf16", '
     '"speed": {"compile": "yes"}}}', "variant.speed's flags must be true or false"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "net_tflops": {"owt": 0}}',
     "net_tflops.owt must be a positive number"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "collectives": []}',
     "is not a hardware profile this program reads"),
    ('{"format": 10, "name": "x", "source": "y", "backend": "gloo", "tflops": 1, "variant": {"precision": "bf16", '
     '"speed": []}}', "is not a hardware profile this program reads"),
])
def test_a_malformed_profile_is_refused_in_one_line(text, says, tmp_path, capsys):
    (tmp_path / "profile.json").write_text(text)
    result = in_process(capsys, "plan", "--hardware", str(tmp_path / "profile.json"))
    assert result.returncode == 2 and says in one_line_error(result)


def test_a_profile_without_what_a_prediction_needs_names_what_to_measure():
    profile = Hardware("partial", "a test", "gloo", 2, tflops=1.0, collectives={"2": {"all-reduce": LINK}})
    with pytest.raises(UsageError, match="no all-reduce over 4 ranks: run `python -m alexnet_mp calibrate --ranks 4`"):
        predict_step("data-parallel", "paper", 4, 8, profile, 10)


def test_a_profile_of_one_device_predicts_its_step_and_names_calibrate_for_ranks_it_has_not_measured():
    one = Hardware("one device", "a test", "gloo", None, tflops=1.0)
    assert predict_step("single", "paper", 1, 8, one, 10).step_s > 0
    with pytest.raises(UsageError, match="no all-reduce over 2 ranks: run `python -m alexnet_mp calibrate --ranks 2`"):
        predict_step("data-parallel", "paper", 2, 8, one, 10)


def test_calibrate_on_gpus_refuses_more_ranks_than_gpus_before_it_measures(monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(calibrate, "time_layers", lambda *args: pytest.fail("measured before refusing"))
    with pytest.raises(UsageError, match="one rank a GPU, and this machine has 1: --ranks up to 1"):
        calibrate.calibrate([2])


def test_a_missing_profile_file_names_calibrate_and_the_presets(capsys):
    result = in_process(capsys, "plan", "--hardware", str(Path("nowhere") / "profile.json"))
    assert result.returncode == 2 and "calibrate --output" in one_line_error(result)


def probed(seconds: float) -> Hardware:
    """A profile whose probe took `seconds` on 1 thread, and whose layers take `seconds` a pass at any size."""
    times = {"images": [2.0, 32.0], "forward": [seconds] * 2, "backward": [seconds] * 2}
    return dataclasses.replace(by_hand(), layers={"1": {"paper.conv1@1": times}}, probe_s={"1": seconds})


def test_the_machine_reads_slower_than_a_profile_whose_probe_took_no_time_and_faster_than_one_whose_took_an_hour(
        monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(calibrate, "PROBE_SWEEPS", 1)
    threads = torch.get_num_threads()
    assert machine_drift(probed(1e-6))["1"] > 1
    assert machine_drift(probed(3600.0))["1"] == pytest.approx(-1, abs=1e-3)
    assert torch.get_num_threads() == threads  # the bench's process keeps its threads


def test_a_probe_on_ranks_at_once_reads_each_thread_count_it_is_given(monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(calibrate, "PROBE_SWEEPS", 1)
    found = calibrate.probe(PAPER_NET, [1], ranks=2)
    assert list(found) == ["1"] and found["1"] > 0


def test_a_preset_has_no_probe_to_hold_the_machine_to():
    assert machine_drift(PRESETS["h100-nvlink"]) == {}


def test_bench_says_how_far_the_machine_was_from_its_calibration_at_its_start_and_its_end():
    held = [Held("single, paper", StepFigures(1.0, 1.0, 0.0, [0.0], None), StepFigures(1.1, 1.1, 0.0, [0.0], None), [])]
    text = held_markdown(held, probed(0.1), {"start": {"1": 0.12}, "end": {"1": -0.03}})
    assert "1 thread(s): +12% at the start, -3% at the end" in text


def test_bench_predicts_each_layout_on_the_profile_as_calibrated_and_records_the_drift_it_probed(tmp_path, monkeypatch):
    from alexnet_mp import bench

    run = Measurement("single, paper", 1, 1, 8, [8.0], 0.0, [0.0], [0.0], arch="paper", step_s=1.0, mode="single",
                      wait_per_rank_s=[0.0])
    monkeypatch.setattr(bench, "run_matrix", lambda *args: ([run], [], []))
    monkeypatch.setattr(bench, "plot_layouts", lambda *args: None)
    probes = iter([{"1": 0.2}, {"1": 0.6}])
    monkeypatch.setattr(bench, "machine_drift", lambda hardware: next(probes))
    bench.bench(tmp_path, quick=True, hardware=probed(0.1))
    record = json.loads((tmp_path / "bench.json").read_text())
    (held,) = record["predicted"]
    assert held["predicted"]["step_s"] == pytest.approx(
        predict_step("single", "paper", 1, 8, probed(0.1), QUICK.num_classes).step_s)
    assert record["hardware"]["drift"] == {"start": {"1": 0.2}, "end": {"1": 0.6}}


def test_bench_predicts_only_the_steps_that_ran_as_the_profiles_layers_did_and_says_why_not_the_others():
    from alexnet_mp import bench

    eager, in_bf16 = (Measurement(name, 1, 1, 8, [8.0], 0.0, [0.0], [0.0], arch="paper", precision=precision,
                                  step_s=1.0, mode="single", wait_per_rank_s=[0.0])
                      for name, precision in (("single, paper", "fp32"), ("single, paper, bf16", "bf16")))
    held, unpredicted = bench.predictions([eager, in_bf16], QUICK, probed(0.1))
    assert [h.run for h in held] == ["single, paper"]
    assert unpredicted == {"single, paper, bf16": "the hardware profile 'by hand' times its layers in fp32, eager, "
                                                  "not bf16 as this run: compare it with a profile of its own setting"}
    assert "- single, paper, bf16: the hardware profile 'by hand' times" in held_markdown(held, probed(0.1), {}, None,
                                                                                         unpredicted)


def test_a_comparisons_tables_for_wandb_say_why_a_run_is_not_predicted():
    from alexnet_mp.report import Comparison

    comparison = Comparison(["run"], [["single x1"]], [], unpredicted={"single x1": "its net is not timed"})
    assert comparison.tables()["not_predicted"] == (["run", "why"], [["single x1", "its net is not timed"]])


def test_a_profile_timed_in_another_variant_names_the_calibration_of_that_variant_for_what_it_lacks():
    compiled = dataclasses.replace(by_hand(), tflops=None, variant=PRESETS["h100-nvlink"].variant)
    with pytest.raises(UsageError, match="calibrate --ranks 1 --arch paper --mixed-precision bf16 --channels-last "
                                         "--compile`"):
        predict_step("single", "paper", 1, 8, compiled, 10)


@pytest.mark.parametrize("variant", [EAGER, Variant("bf16"), Variant("bf16", Speed(channels_last=True, compile=True))])
def test_a_variants_training_flags_run_a_step_that_reads_back_as_that_variant(variant):
    assert Variant.of_run(TrainConfig(**variant.train_flags()).to_dict()) == variant


def test_a_runs_variant_is_read_from_its_flags():
    run = {"mixed_precision": "bf16", "channels_last": True, "compile": True, "cuda_graphs": False}
    assert Variant.of_run(run) == PRESETS["h100-nvlink"].variant
    assert Variant.of_run({"mixed_precision": "no"}) == EAGER


@pytest.mark.slow  # measures this machine: layers on each thread count, collectives over 2 gloo processes
def test_calibrate_writes_a_profile_that_reads_back_and_predicts_every_layout(tmp_path, capsys, monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(calibrate, "SHARES", (1.0, 0.5))  # halves: every layout at 2 ranks
    monkeypatch.setattr(calibrate, "REPEATS", 1)
    monkeypatch.setattr(calibrate, "LOOP_S", 0.0)  # one call a loop
    monkeypatch.setattr(calibrate, "PROBE_SWEEPS", 1)
    monkeypatch.setattr(calibrate, "SIZES", calibrate.SIZES[:2])  # two points a line: each collective's fit
    # the gathering layout's memory run as short as the others'
    monkeypatch.setattr(calibrate, "FULL", dataclasses.replace(calibrate.FULL, steps=calibrate.SETTLING_STEPS))
    result = in_process(capsys, "calibrate", "--ranks", "2", "--batch", "2", "--output",
                        str(tmp_path / "hardware.json"))
    assert result.returncode == 0, result.stderr
    profile = load(tmp_path / "hardware.json")
    assert profile.backend == "gloo" and set(profile.collectives["2"]) == set(KINDS)
    assert all(len(link.measured) == 2 for link in profile.collectives["2"].values())  # each size's time kept
    assert set(profile.fresh_copy_s_per_byte) == set(profile.fresh_page_s_per_byte) == set(profile.layers)
    assert min(profile.fresh_copy_s_per_byte.values()) > 0
    assert set(profile.accumulate_s_per_byte) == set(profile.layers) and min(profile.accumulate_s_per_byte.values()) > 0
    assert profile.layers["1"]["paper.fc6@1"]["fresh_bytes"]["backward"][0] >= 4 * 9216 * 4096  # its weight's gradient
    assert profile.layers["1"]["paper.fc6@1"]["fresh_at_once_bytes"]["backward"][0] >= 4 * 9216 * 4096
    assert set(profile.resident_overhead) == set(profile.layers)  # each thread count a rank runs
    assert profile.resident_overhead["2"].in_group_bytes == 0  # 2 threads: the one-device process, in no group
    assert set(profile.shared_slowdown) == {"2"} and profile.shared_slowdown["2"] >= 1
    assert "layer sweeps within" in profile.source  # how steady the machine was, beside the figures
    assert set(profile.probe_s) == set(profile.layers)  # what bench probes again to see how far the machine drifted
    for mode in LAYOUTS:
        ranks = 1 if mode == "single" else 2
        assert predict_step(mode, "paper", ranks, 2, profile, 10).step_s > 0, mode


@pytest.mark.slow  # measures this machine's layers, and what a training process keeps resident
def test_calibrate_times_the_layers_of_every_net_it_is_given(tmp_path, capsys, monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(calibrate, "REPEATS", 1)
    monkeypatch.setattr(calibrate, "PROBE_SWEEPS", 1)
    result = in_process(capsys, "calibrate", "--ranks", "1", "--batch", "2", "--arch", f"{PAPER_NET},{OWT_NET}",
                        "--output", str(tmp_path / "hardware.json"))
    assert result.returncode == 0, result.stderr
    (layers,) = load(tmp_path / "hardware.json").layers.values()
    assert {key.split(".")[0] for key in layers} == {PAPER_NET, OWT_NET}


def test_calibrate_leaves_the_thread_count_of_its_own_process_as_it_found_it():
    """The figures it times in its own process, on a rank's threads: the process goes on after (a test's, say)."""
    from alexnet_mp import calibrate

    before = torch.get_num_threads()
    calibrate.time_optimizer(before + 1, parameters=1024)
    calibrate.time_accumulation(before + 1, elements=1024)
    calibrate.time_fresh_copy(before + 1, elements=1024)
    assert torch.get_num_threads() == before


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a GPU")
def test_calibrate_on_a_gpu_times_its_layers_there_for_nccl(monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(calibrate, "REPEATS", 1)
    profile = calibrate.calibrate([1], batch=4, log=lambda line: None)
    assert profile.backend == "nccl" and profile.cores is None and set(profile.layers) == {"1"}
    assert not profile.fresh_copy_s_per_byte and not profile.fresh_page_s_per_byte
    assert set(profile.accumulate_s_per_byte) == {"1"}
    assert not profile.resident_overhead
    assert predict_step("single", "paper", 1, 4, profile, 1000).step_s > 0


def test_a_part_left_computing_while_the_others_wait_at_a_collective_has_the_cores_they_leave():
    """Two parts on one core, their compute given at the pace of both at once: 2 s and 6 s. Both run at half speed
    until the first is done (2 s); the second's last 2 s of work it then runs alone, in 2; the collective (1 s)
    starts once both are there."""
    ops = [[("fc6 forward", COMPUTE, seconds), ("fc7-input forward", COMMUNICATION, 1.0)] for seconds in (2.0, 6.0)]
    first, second = met_at_collectives(ops, sharing=float)
    assert [edge for span in first for edge in (span.start_s, span.end_s)] == pytest.approx([0, 2, 4, 5])
    assert [edge for span in second for edge in (span.start_s, span.end_s)] == pytest.approx([0, 4, 4, 5])


def test_pipeline_stages_that_share_cores_each_run_slower_while_others_compute_beside_them():
    """2 stages, each twice as slow while both compute: stage 0's first forward alone (1), its second beside
    stage 1's first (each 1 of work at half speed: 2), stage 1's second alone (1); no backward."""
    step = step_end(simulated_schedule("gpipe", [2.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], 2, slowdown=float))
    assert step == pytest.approx(4.0)


def test_one_micro_batch_runs_stages_that_share_cores_in_turn_at_their_own_speed():
    """4 stages on 2 cores, each stage's times given as stretched 2x with all four at once: one micro-batch takes
    the stages one at a time, unstretched, 4 x 1.5."""
    config = TrainConfig(mode="pipeline", options={"microbatches": 1})
    costs = LAYOUTS["pipeline"].costs
    timeline = costs.timeline([part_times(1.0, 2.0, {})] * 4, 4, config, blocking=True,
                              sharing=lambda busy: max(1.0, busy / 2))
    assert step_end(timeline) == pytest.approx(6.0)


class LiveTensors(TorchDispatchMode):
    """The bytes of the tensors ops create and that are still alive (each storage once), and their peak."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {tensor.untyped_storage().data_ptr(): 0 for tensor in existing}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in (t.untyped_storage() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            if storage.data_ptr() not in self.live:
                self.live[storage.data_ptr()] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self.freed, storage.data_ptr())
        return out

    def freed(self, address: int) -> None:
        self.now -= self.live.pop(address, 0)


OptimizerOf = Callable[[TrainConfig, Iterable[torch.Tensor]], torch.optim.Optimizer]


def after_first_step(mode: str, arch: str, batch: int, optimizer_of: OptimizerOf, variant: Variant = EAGER,
                     ) -> tuple[Layout, torch.optim.Optimizer, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`mode`'s layout, its optimizer and this rank's share of a batch of `batch` images after one step on them (the
    momentum made) run as `variant` says, and what a rank keeps between steps: its parameters, momentum and batch."""
    config = TrainConfig(mode=mode, arch=arch, num_classes=10, seed=0, batch_size=batch, **variant.train_flags())
    layout = build(config, torch.device("cpu"))
    optimizer = optimizer_of(config, layout.parameters())
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    images, labels = images[layout.image_rows(batch)], labels[layout.label_rows(batch)]
    with variant.autocast(torch.device("cpu")):
        train_step(layout, optimizer, images, labels, 0, batch)
    kept = [*layout.parameters(), *(value for state in optimizer.state.values() for value in state.values()),
            images, labels]
    return layout, optimizer, images, labels, kept


def second_step_bytes(arch: str, batch: int, optimizer_of: OptimizerOf, variant: Variant = EAGER,
                      mode: str = REFERENCE) -> float:
    """The second step (its momentum made by the first) of `mode` in one process on `batch` images, in `variant`'s
    precision as the loop runs it (the whole step under autocast): what it keeps (weights, momentum, the batch) and
    the peak of the tensors the step makes."""
    layout, optimizer, images, labels, kept = after_first_step(mode, arch, batch, optimizer_of, variant)
    with variant.autocast(torch.device("cpu")), LiveTensors(kept) as step:
        train_step(layout, optimizer, images, labels, 1, batch)
    return sum(tensor.nbytes for tensor in kept) + step.peak


def test_the_predicted_memory_of_a_step_is_its_peak_of_live_tensors():
    """Weights and momentum, and the peak of the tensors the step makes (gradients, what autograd keeps, the
    backward's temporaries), with its images."""
    measured = second_step_bytes(PAPER_NET, 8, lambda config, params: make_optimizer(params, config))
    assert predict_step("single", PAPER_NET, 1, 8, by_hand(), 10).memory_bytes[0] == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("arch", [PAPER_NET, "owt"])  # the paper net peaks at an LRN's backward, owt at fc6's
def test_the_predicted_memory_of_a_bf16_step_is_its_peak_of_live_tensors(arch):
    """Beside the float32 weights, momentum and gradients: autocast's bf16 copy of each weight, held all step, the
    activations in bf16, the LRN's backward in float32, and a layer's bf16 weight gradient cast into float32."""
    bf16 = Variant("bf16")
    measured = second_step_bytes(arch, 8, lambda config, params: make_optimizer(params, config), bf16)
    predicted = predict_step("single", arch, 1, 8, dataclasses.replace(by_hand(), variant=bf16), 10).memory_bytes[0]
    assert predicted == pytest.approx(measured, rel=0.05)


def allocated_second_step_bytes(mode: str, arch: str, batch: int, variant: Variant = EAGER) -> float:
    """A rank's second step of `mode` on `arch` on its share of `batch` images, run as `variant` says: what it keeps
    (its blocks or shards of the weights and of the momentum, its images), and the peak of the bytes the step allocates
    beyond them, as the profiler's records of the CPU allocator count them (gloo's copies of the collectives'
    inputs among them)."""
    layout, optimizer, images, labels, kept = after_first_step(
        mode, arch, batch, lambda config, params: make_optimizer(params, config), variant)
    storages = {local.untyped_storage().data_ptr(): local.untyped_storage().nbytes()
                for local in (getattr(tensor, "_local_tensor", tensor) for tensor in kept)}
    with variant.autocast(torch.device("cpu")), _memory_records() as records:
        train_step(layout, optimizer, images, labels, 1, batch)
    return sum(storages.values()) + max(itertools.accumulate(record["Bytes"] for record in records))


@pytest.mark.slow  # compiles the net's conv layers, in a process of its own
def test_the_predicted_memory_of_a_compiled_bf16_step_is_its_peak_of_allocated_bytes(tmp_path):
    """Each conv layer one graph, whose partitioner keeps less than eager autograd (a layer with LRN: its conv's
    output and the LRN's float32 squares; else the ReLU's mask; the pool's output and int8 offsets) and whose LRN
    backward is fused."""
    compiled = Variant("bf16", Speed(channels_last=True, compile=True))
    measured = run_distributed(allocated_second_step_bytes, 1, tmp_path, REFERENCE, PAPER_NET, 32, compiled)
    predicted = predict_step(REFERENCE, PAPER_NET, 1, 32, dataclasses.replace(by_hand(), variant=compiled), 10)
    assert predicted.memory_bytes == pytest.approx(measured, rel=0.05)


def test_fsdps_predicted_memory_is_each_ranks_peak_of_live_tensors(tmp_path):
    """At fc6's reduce-scatter (2 ranks, 4 images each): its input and gloo's copy of it, fc6's new gradient shard
    and the shards held."""
    measured = run_distributed(allocated_second_step_bytes, 2, tmp_path, "fsdp", "paper", 8)
    predicted = [process.tensors for process in process_memory("fsdp", "paper", 2, 8, 10)]
    assert measured == pytest.approx(predicted, rel=0.05)


@pytest.mark.slow  # each layout on 2 processes
@pytest.mark.parametrize("mode", [mode for mode in LAYOUTS if mode != REFERENCE])
def test_each_layouts_predicted_memory_in_bf16_is_each_ranks_peak_of_allocated_bytes(mode, tmp_path):
    bf16 = Variant("bf16")
    measured = run_distributed(allocated_second_step_bytes, 2, tmp_path, mode, "paper", 8, bf16)
    predicted = predict_step(mode, "paper", 2, 8, dataclasses.replace(by_hand(), variant=bf16), 10).memory_bytes
    assert measured == pytest.approx(predicted, rel=0.05)


def test_a_foreach_optimizers_step_peaks_with_every_gradient_and_a_copy_of_them_with_weight_decay_added():
    """The paper net on 2 images: its 61M parameters outweigh the activations, so the step's peak is the optimizer's."""
    measured = second_step_bytes("paper", 2, lambda config, params: torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, foreach=True))
    work = LAYOUTS["single"].costs.work("paper", 0, 1, 2, 10)
    predicted = memory_bytes(work, PAPER, 10, foreach=parameters(work, PAPER, 10))
    assert predicted["optimizer"] > 0
    assert sum(predicted.values()) == pytest.approx(measured, rel=0.05)


def test_a_second_pass_peaks_with_the_gradient_it_produces_beside_those_it_adds_into():
    """Two passes of 2 images through the paper net, its gradients accumulating (a pipeline stage's micro-batches): the
    second pass holds every gradient of the first and, in fc6's backward, fc6's new one beside them (dropout off)."""
    net = build_model("paper", num_classes=10, seed=0).eval()
    images, labels = torch.randn(2, 3, 224, 224), torch.randint(0, 10, (2,))
    torch.nn.functional.cross_entropy(net(images), labels).backward()
    kept = [*net.parameters(), *(param.grad for param in net.parameters()), images, labels]
    with LiveTensors(kept) as second:
        torch.nn.functional.cross_entropy(net(images), labels).backward()
    predicted = memory_bytes(LAYOUTS["single"].costs.work("paper", 0, 1, 2, 10), PAPER, 10, added=PAPER.layer_names)
    assert sum(predicted.values()) - predicted["momentum"] == pytest.approx(
        sum(tensor.nbytes for tensor in kept) + second.peak, rel=0.05)


@pytest.mark.parametrize(("blocking", "step"), [(True, 1.0 + 2.0 + 0.8), (False, 1.0 + 2.0 + 0.8 - 3 / 4 * 0.4)])
def test_the_weird_tricks_rounds_hide_their_exchange_behind_the_fc_layers_work_where_collectives_run_beside_it(
        blocking, step):
    """4 rounds of the conv features, 0.8 s of exchange in all, behind 0.4 s of FC work: on NCCL 3/4 of the shorter
    is hidden; on gloo each round blocks."""
    comm = {(CONV_FEATURES.name, FORWARD): 0.5, (CONV_FEATURES.name, BACKWARD): 0.3}
    config = TrainConfig(mode="weird-trick", arch="paper", options={"exchange": "one-at-a-time"})
    costs = LAYOUTS["weird-trick"].costs
    assert step_end(costs.timeline([part_times(1.0, 2.0, comm, fc_s=0.4)], 4, config, blocking)) == pytest.approx(step)


@pytest.mark.parametrize(("blocking", "step"), [(True, 7.5), (False, 1.0 + 2.0 + 0.5 / 8 + 2.0)])
def test_fsdp_on_nccl_waits_for_its_first_gather_and_what_the_compute_cannot_cover(blocking, step):
    """A forward of 1 s, a backward of 2 s, 8 units gathering 0.5 s in the forward, 3 s in the backward, reducing
    1 s: on gloo each collective blocks; on NCCL the forward covers its gathers but the first unit's share, and the
    backward 2 of its 4 s."""
    comm = {("parameters", FORWARD): 0.5, ("parameters", BACKWARD): 3.0, ("gradients", BACKWARD): 1.0}
    config = TrainConfig(mode="fsdp", arch="paper", num_classes=10)
    timeline = LAYOUTS["fsdp"].costs.timeline([part_times(1.0, 2.0, comm)], 2, config, blocking)
    assert step_end(timeline) == pytest.approx(step)


def test_both_towers_in_one_process_run_in_turn_with_no_collective_between_them():
    two = predict_step("paper-split", "paper", 2, 8, by_hand(), 10)
    one = predict_step("paper-split", "paper", 1, 8, by_hand(), 10)
    assert one.step_s == pytest.approx(sum(two.compute_s)) and one.comm_s == [0]
    assert one.bytes_per_rank == pytest.approx([sum(two.bytes_per_rank)])


def test_a_process_holding_both_towers_holds_both_towers_tensors_but_one_towers_backward_temporaries_at_a_time():
    measured = second_step_bytes("paper", 32, lambda config, params: make_optimizer(params, config), mode="paper-split")
    assert predict_step("paper-split", "paper", 1, 32, by_hand(), 10).memory_bytes[0] == pytest.approx(measured,
                                                                                                      rel=0.05)


def kept_by_hand(monkeypatch, points: dict[tuple[str, int], list[tuple[float, float, float]]]) -> dict[str, int]:
    """calibrate's processes replaced by `points`: per (layout, global batch), each rank's (activations, gathered,
    kept beyond its tensors), in bytes. Returns the steps each layout was measured over, as calibrate asks."""
    from alexnet_mp import calibrate

    steps_asked: dict[str, int] = {}

    def kept(mode, arch, ranks, batch, threads, scratch, steps=calibrate.SETTLING_STEPS, variant=EAGER):
        steps_asked[mode] = steps
        return [calibrate.Kept(ProcessMemory(0.0, activations, gathered, 0.0), kept)
                for activations, gathered, kept in points[mode, batch]]

    monkeypatch.setattr(calibrate, "kept_beyond_tensors", kept)
    return steps_asked


@pytest.mark.parametrize(("kept_at_32", "slope"), [(300e6, 200 / 216), (50e6, 0.0)])
def test_calibrates_resident_line_runs_through_the_references_larger_batch_rising_as_its_two_batches_do(
        monkeypatch, tmp_path, kept_at_32, slope):
    """The reference keeps 100 MB beyond its tensors at 72 MB of activations (a quarter of the batch); at 288 MB,
    more (the line rises between them) or less (it stays level)."""
    from alexnet_mp import calibrate

    kept_by_hand(monkeypatch, {(REFERENCE, 8): [(72e6, 0.0, 100e6)], (REFERENCE, 32): [(288e6, 0.0, kept_at_32)]})
    line = calibrate.resident_overhead("paper", 32, 1, None, tmp_path)
    assert line.per_activation_byte == pytest.approx(slope)
    assert line.bytes(288e6, 0.0, in_group=False) == pytest.approx(kept_at_32)


def test_calibrate_measures_what_a_rank_of_a_group_keeps_above_the_references_line_and_per_byte_it_gathers(
        monkeypatch, tmp_path):
    """The reference's line: 28 MB and 1 a byte of activations. At 8 images on 2 ranks, data-parallel's ranks keep 40
    and 60 MB above it (50 on average); FSDP's, at the whole batch of 32 and over bench's steps (its heap grows for
    longer there), 50 + 150 MB above it with 300 MB gathered: 0.5 a byte."""
    from alexnet_mp import calibrate

    steps = kept_by_hand(monkeypatch, {(REFERENCE, 8): [(72e6, 0.0, 100e6)], (REFERENCE, 32): [(288e6, 0.0, 316e6)],
                                       (REPLICATED, 8): [(30e6, 0.0, 98e6), (30e6, 0.0, 118e6)],
                                       (GATHERING, 32): [(20e6, 300e6, 248e6)] * 2})
    line = calibrate.resident_overhead("paper", 32, 1, 2, tmp_path)
    assert (line.fixed_bytes, line.per_activation_byte) == (pytest.approx(28e6), pytest.approx(1.0))
    assert (line.in_group_bytes, line.per_gathered_byte) == (pytest.approx(50e6), pytest.approx(0.5))
    assert steps[GATHERING] == FULL.steps


@pytest.mark.parametrize(("batch", "copies_later"), [(32, True), (8, False)])
def test_a_cpu_process_maps_its_foreach_copies_beside_the_heap_its_backward_left_where_its_peak_was_the_backward(
        batch, copies_later):
    """Tensor parallelism's fc6 and fc7 step foreach, which copies their gradients (72 and 32 MiB, both mapped
    afresh): at 32 images the backward's peak is past when they map; at 8 the optimizer's step is the peak, with
    them."""
    held = layer_costs(PAPER, 10, LAYOUTS["tensor-parallel"].costs.work("paper", 0, 2, batch, 10).holds)
    copies = 4 * sum(cost.parameters for cost in held if cost.name in ("fc6", "fc7"))
    cpu = dataclasses.replace(by_hand(), resident_overhead={"1": ResidentOverhead(0.0, 0.0, 0.0, 0.0)})
    tensors = predict_step("tensor-parallel", "paper", 2, batch, by_hand(), 10).memory_bytes[0]
    assert predict_step("tensor-parallel", "paper", 2, batch, cpu, 10).memory_bytes[0] == pytest.approx(
        tensors + copies_later * copies)


def test_calibrate_times_quarters_of_a_layer_only_for_four_ranks_or_more():
    from alexnet_mp.calibrate import shares_for

    assert shares_for([1]) == shares_for([2]) == (1.0, 0.5)
    assert shares_for([2, 4]) == (1.0, 0.5, 0.25)


def test_calibrate_hands_each_layer_its_input_in_the_dtype_the_layer_before_returns_under_autocast():
    passes = _layer_passes(PAPER_NET, 1.0, [2], torch.device("cpu"), Variant("bf16"))
    assert [timed.input_dtype for timed in passes] == [torch.float32] + [torch.bfloat16] * (len(passes) - 1)


def test_calibrate_times_layers_with_the_speed_ups_of_the_variant_asked():
    (conv2,) = [timed for timed in _layer_passes(PAPER_NET, 1.0, [2], torch.device("cpu"),
                                                 Variant(speed=Speed(channels_last=True)))
                if timed.key == f"{PAPER_NET}.conv2@1"]
    assert conv2.segment[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_calibrate_writes_the_variant_its_flags_ask_for_into_the_profile(tmp_path, capsys, monkeypatch):
    from alexnet_mp import calibrate

    monkeypatch.setattr(calibrate, "calibrate", lambda ranks, arch, batch, log, variant: dataclasses.replace(
        by_hand(), variant=variant))
    result = in_process(capsys, "calibrate", "--ranks", "1", "--mixed-precision", "bf16", "--channels-last",
                        "--compile", "--output", str(tmp_path / "profile.json"))
    assert result.returncode == 0, result.stderr
    assert load(tmp_path / "profile.json").variant == PRESETS["h100-nvlink"].variant


def test_calibrate_counts_the_blocks_a_pass_allocates_that_a_training_process_maps_afresh():
    """A quarter of fc6: its weight's gradient (37.7 MB) is one; nothing else it makes on 2 images reaches 32 MiB."""
    (fc6,) = [timed for timed in _layer_passes("paper", 0.25, [2], torch.device("cpu"))
              if timed.key == "paper.fc6@0.25"]
    assert fresh_blocks(fc6) == (LargeBlocks(0.0, 0.0), LargeBlocks(4 * 9216 * 1024, 4 * 9216 * 1024))


def test_calibrate_counts_the_large_blocks_a_pass_allocates_in_all_and_at_once_and_not_those_freed_from_before():
    """Profiler records in order: 40 MiB allocated and freed, 40 and 50 held together, 1 MiB (too small to count),
    and a block allocated before the records began freed."""
    records = [{"Bytes": 40 * MIB, "Addr": 1}, {"Bytes": -40 * MIB, "Addr": 1}, {"Bytes": 40 * MIB, "Addr": 2},
               {"Bytes": 50 * MIB, "Addr": 3}, {"Bytes": MIB, "Addr": 4}, {"Bytes": -60 * MIB, "Addr": 5}]
    assert large_blocks(records) == LargeBlocks(130 * MIB, 90 * MIB)


def test_only_fsdp_copies_into_fresh_blocks_beyond_its_layers_own_tensors_each_large_unit_three_times_a_step():
    """A layer's own tensors are counted in its passes' fresh bytes, a collective's output in the collective's time;
    fc6's and fc7's weights are the units above 32 MiB."""
    single, fsdp = (LAYOUTS[mode].costs for mode in ("single", "fsdp"))
    assert single.fresh_bytes(PAPER, 1000) == {}
    assert fsdp.fresh_bytes(PAPER, 1000) == {("fc6", FORWARD): 4 * 37_748_736, ("fc6", BACKWARD): 2 * 4 * 37_748_736,
                                             ("fc7", FORWARD): 4 * 16_777_216, ("fc7", BACKWARD): 2 * 4 * 16_777_216}


def test_a_step_pays_the_profiles_fresh_copy_cost_on_what_it_copies_into_fresh_blocks():
    fresh = dataclasses.replace(by_hand(), fresh_copy_s_per_byte={"1": 1e-9})
    mapped = sum(LAYOUTS["fsdp"].costs.fresh_bytes(PAPER, 10).values())
    assert mapped > 0
    assert predict_step("fsdp", "paper", 2, 8, fresh, 10).compute_s[0] == pytest.approx(
        predict_step("fsdp", "paper", 2, 8, by_hand(), 10).compute_s[0] + 1e-9 * mapped)


def test_fsdps_copies_into_fresh_blocks_are_costed_in_the_passes_they_sit_beside_not_in_its_optimizer_step():
    """As a trace of it shows them: the gathered parameters copied out before a unit's forward and backward, its
    gradient copied into the reduce-scatter's input after its backward."""
    def span_s(hardware: Hardware) -> dict[str, float]:
        spans = predict_step("fsdp", "paper", 2, 8, hardware, 10).timeline[0]
        return {name: sum(span.end_s - span.start_s for span in spans if span.name == name)
                for name in ("fc6 forward", "fc6 backward", "optimizer step")}

    copied, plain = span_s(dataclasses.replace(by_hand(), fresh_copy_s_per_byte={"1": 1e-9})), span_s(by_hand())
    fc6_bytes = 4 * 37_748_736
    assert copied["fc6 forward"] == pytest.approx(plain["fc6 forward"] + 1e-9 * fc6_bytes)
    assert copied["fc6 backward"] == pytest.approx(plain["fc6 backward"] + 2e-9 * fc6_bytes)
    assert copied["optimizer step"] == pytest.approx(plain["optimizer step"])


def test_a_process_keeps_beyond_its_tensors_the_profiles_fixed_bytes_and_its_shares_of_its_activations_and_gathers():
    """On 2 cores one process runs 2 threads, each of 2 ranks one; the paper split's two towers share a process (and
    their activations); a rank of a group keeps more, and FSDP's gathered parameters and gradients keep their own
    share; beside them, the blocks it maps afresh after its tensors' peak (FSDP's, at the optimizer's step after a
    peak in the backward)."""
    lines = {"1": ResidentOverhead(1e8, 0.5, 3e7, 0.2), "2": ResidentOverhead(3e8, 0.25, 5e7, 0.4)}
    kept = dataclasses.replace(by_hand(cores=2), resident_overhead=lines)
    for mode, ranks, line in (("paper-split", 1, lines["2"]), ("paper-split", 2, lines["1"]), ("fsdp", 2, lines["1"])):
        costs = LAYOUTS[mode].costs
        parts = costs.parts(ranks)
        works = [costs.work("paper", part, parts, 8, 10) for part in range(parts // ranks)]
        foreach = [parameters(work, PAPER, 10) if mode == "fsdp" else 0 for work in works]  # FSDP's are DTensors
        kinds = held_together([memory_bytes(work, PAPER, 10, foreach=count)
                               for work, count in zip(works, foreach, strict=True)])
        activations, gathered = kinds["activations"] + kinds["temporaries"], kinds["gathered"]
        tensors = predict_step(mode, "paper", ranks, 8, by_hand(cores=2), 10).memory_bytes[0]
        later = process_memory(mode, "paper", ranks, 8, 10)[0].mapped_later
        assert predict_step(mode, "paper", ranks, 8, kept, 10).memory_bytes[0] == pytest.approx(
            tensors + line.fixed_bytes + line.per_activation_byte * activations
            + (line.in_group_bytes if ranks > 1 else 0) + line.per_gathered_byte * gathered + later), mode
