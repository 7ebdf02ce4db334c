"""The speed-ups change how the net runs, never what it computes. channels_last, compiled towers and
CUDA graphs are held to the one-device reference in float64 (1e-10, two SGD steps): in float32 the
early convs' gradients are ill-conditioned at the paper's init (the float32 reference itself is 5e-2
from float64 on conv1's), so a different conv algorithm cannot be told from a bug there. bf16
autocast is held to the stated bf16 tolerances (tests/equivalence.py). With a GPU the same checks
run there too, against the eager net on the GPU."""

from __future__ import annotations

import functools

import pytest
import torch

from alexnet_mp import checkpoint
from alexnet_mp.config import TrainConfig
from alexnet_mp.model import LRN
from alexnet_mp.processes import run_distributed
from alexnet_mp.speed import Speed, Variant
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import build
from tests.conftest import REFERENCE_BATCH as BATCH
from tests.equivalence import (
    BF16_GRADIENT_TOLERANCE,
    BF16_LOGITS_TOLERANCE,
    FLOAT64_TOLERANCE,
    PAPER_NET,
    STEPS,
    Run,
    assert_within,
    late_layers,
    layout_logits,
    merged,
    relative_error,
    run_layout,
)

pytestmark = pytest.mark.slow  # the fast paths held to the reference by training

CHANNELS_LAST = Variant(speed=Speed(channels_last=True))
BF16_CHANNELS_LAST = Variant("bf16", Speed(channels_last=True))
COMPILED = Variant(speed=Speed(compile=True))
GPU_VARIANTS = [CHANNELS_LAST, COMPILED, Variant(speed=Speed(channels_last=True, cuda_graphs=True))]


def run_variant(variant: Variant, device: str = "cpu") -> Run:
    """paper-split with `variant`: two float64 SGD steps, or one float32 step under bf16 autocast."""
    if variant.precision == "bf16":
        return run_layout("paper-split", PAPER_NET, BATCH, 1, torch.float32, variant=variant, device=device)
    return run_layout("paper-split", PAPER_NET, BATCH, STEPS, torch.float64, variant=variant, device=device)


def run_variants(variants: list[Variant]) -> dict[Variant, Run]:
    return {variant: run_variant(variant) for variant in variants}


def errors(ranks: list[Run], reference: Run) -> dict[str, float]:
    """Relative errors against the reference: step 0's logits, every gradient, and (after float64
    runs) every weight after the last step."""
    gradients = merged([block for run in ranks for block in run.gradients], PAPER_NET)
    found = {"logits": relative_error(layout_logits(ranks, 0, BATCH), reference.logits[0])}
    expected = merged(reference.gradients, PAPER_NET)
    found.update({key: relative_error(gradients[key], value) for key, value in expected.items()})
    if len(ranks[0].logits) == STEPS:
        weights = merged([block for run in ranks for block in run.weights], PAPER_NET)
        found.update({f"{key} after {STEPS} steps": relative_error(weights[key], value)
                      for key, value in merged(reference.weights, PAPER_NET).items()})
    return found


@pytest.fixture(scope="module")
def reference(references) -> dict[str, Run]:
    return references(PAPER_NET)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Variant, Run]]:
    return run_distributed(run_variants, 2, tmp_path_factory.mktemp("speed-2"), [CHANNELS_LAST, BF16_CHANNELS_LAST])


def test_channels_last_paper_split_on_two_processes_equals_single_device(two_processes, reference):
    assert_within(errors([ranks[CHANNELS_LAST] for ranks in two_processes], reference["float64"]),
                  FLOAT64_TOLERANCE)


def test_bf16_paper_split_logits_are_within_bf16_tolerance_of_the_float32_reference(two_processes, reference):
    found = errors([ranks[BF16_CHANNELS_LAST] for ranks in two_processes], reference["float32"])
    assert found["logits"] <= BF16_LOGITS_TOLERANCE


def test_bf16_paper_split_late_layer_gradients_are_within_bf16_tolerance(two_processes, reference):
    found = errors([ranks[BF16_CHANNELS_LAST] for ranks in two_processes], reference["float32"])
    assert_within(late_layers(found), BF16_GRADIENT_TOLERANCE)


def fsdp_in_bf16() -> Run:
    return run_layout("fsdp", PAPER_NET, BATCH, 1, torch.float32, variant=Variant("bf16"))


def test_fsdp_under_bf16_gathers_bf16_parameters_and_is_within_bf16_tolerance(reference, tmp_path):
    """MixedPrecisionPolicy: each unit's parameters all-gathered in bf16 (2 bytes an element), gradients reduced
    in float32 (4)."""
    ranks = run_distributed(fsdp_in_bf16, 2, tmp_path)
    found = errors(ranks, reference["float32"])
    assert found["logits"] <= BF16_LOGITS_TOLERANCE
    assert_within(late_layers(found), BF16_GRADIENT_TOLERANCE)
    for run in ranks:
        sent = {(link, direction): run.traffic_bytes[part, link, direction] / count
                for (part, link, direction), count in run.traffic.items()}
        assert sent == {("parameters", "forward"): 2, ("parameters", "backward"): 2, ("gradients", "backward"): 4}


def test_compiled_towers_in_one_process_equal_single_device(reference, monkeypatch):
    """Traced as --compile traces them (dynamo, AOT autograd, each conv layer one graph between the links) and
    run by the aot_eager backend: inductor's C++ code takes most of a minute to build from a cold cache on a CPU,
    and the GPU checks below hold inductor's own kernels to the reference."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert_within(errors([run_variant(COMPILED)], reference["float64"]), FLOAT64_TOLERANCE)


def test_lrn_gives_the_same_maps_in_channels_last_and_keeps_that_layout():
    x = torch.randn(2, 96, 7, 7)
    lrn = LRN(groups=2)
    out = lrn(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, lrn(x), rtol=1e-6, atol=0)


def test_resumed_momentum_takes_its_parameters_memory_format(tmp_path):
    def strategy_and_optimizer():
        config = TrainConfig(mode="single", arch=PAPER_NET, num_classes=10, channels_last=True)
        layout = build(config, torch.device("cpu"))
        return layout, make_optimizer(layout.parameters(), config)

    layout, optimizer = strategy_and_optimizer()
    train_step(layout, optimizer, torch.randn(2, 3, 224, 224), torch.tensor([1, 2]), 0, 2)
    checkpoint.save(tmp_path, layout, optimizer, {"step": 1}, keep=1)
    resumed, resumed_optimizer = strategy_and_optimizer()
    checkpoint.load(checkpoint.find("latest", tmp_path), resumed, resumed_optimizer)
    conv1 = resumed.model.conv1.weight
    momentum = resumed_optimizer.state[conv1]["momentum_buffer"]
    assert momentum.stride() == conv1.stride()
    torch.testing.assert_close(momentum, optimizer.state[layout.model.conv1.weight]["momentum_buffer"])


@pytest.fixture(scope="module")
def gpu_reference() -> dict[str, Run]:
    """The eager one-device net on the GPU: dropout masks drawn there differ from the CPU's (another
    generator), so the GPU's speed-ups are held to the GPU's reference. TF32 off for float32."""
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        return {"float64": run_layout("single", PAPER_NET, BATCH, STEPS, torch.float64, device="cuda"),
                "float32": run_layout("single", PAPER_NET, BATCH, 1, torch.float32, device="cuda")}
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", GPU_VARIANTS, ids=lambda v: v.label())
def test_speedups_on_the_gpu_equal_single_device(variant, gpu_reference):
    assert_within(errors([run_variant(variant, "cuda")], gpu_reference["float64"]), FLOAT64_TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("speed", [Speed(channels_last=True, compile=True),
                                   Speed(channels_last=True, compile=True, triton_lrn=True)], ids=Speed.describe)
def test_bf16_compiled_towers_on_the_gpu_are_within_bf16_tolerance(speed, gpu_reference):
    found = errors([run_variant(Variant("bf16", speed), "cuda")], gpu_reference["float32"])
    assert found["logits"] <= BF16_LOGITS_TOLERANCE
    assert_within(late_layers(found), BF16_GRADIENT_TOLERANCE)
