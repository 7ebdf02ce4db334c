"""`python -m alexnet_mp bench`: every layout's training step timed side by side in one run, against the
plain PyTorch loop, plus the input pipeline alone: the measurement (measure.py), what is measured
(matrix.py) and the ratios and report (report.py). Medians with min-max; the ratios compare figures of
this run."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch

from alexnet_mp.bench.matrix import FULL, FULL_GPU, QUICK, layout_variant, run_matrix
from alexnet_mp.bench.measure import Measurement, Sizes
from alexnet_mp.bench.report import as_markdown, comparisons, environment, plot_layouts
from alexnet_mp.errors import UsageError
from alexnet_mp.hardware import Hardware
from alexnet_mp.predict import Held, StepFigures, predict_run
from alexnet_mp.report import held_section
from alexnet_mp.strategies import REFERENCE_STEP


def bench(output: Path, quick: bool, ranks: tuple[int, ...] | None = None,
          modes: tuple[str, ...] | None = None, hardware: Hardware | None = None, launches: int = 1) -> list[str]:
    """Runs the matrix (with `modes`, those layouts alone, beside the one-device step) `launches` times over,
    writing OUTPUT/bench.json and bench.md after each measurement: each measurement's median launch
    (`median_launches`), each layout's step beside the cost model's prediction on `hardware` as calibrated where one
    is given, and how far the machine's probe reads from the profile's at the bench's start and end (`machine_drift`).
    Returns the measurements that failed, each with its error's last line."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = QUICK if quick else FULL_GPU if device_type == "cuda" else FULL
    if ranks:
        sizes = replace(sizes, ranks=ranks)
    output.mkdir(parents=True, exist_ok=True)
    env = environment()
    drifts = {"start": machine_drift(hardware)} if hardware else {}

    def write(measurements: list[Measurement], not_measured: list[str]) -> str:
        """bench.json and bench.md of the measurements so far: a run cut short keeps what it measured."""
        held, unpredicted = predictions(measurements, sizes, hardware) if hardware else ([], {})
        rows = comparisons({m.name: m for m in measurements}, sizes, device_type, held)
        text = (as_markdown(measurements, rows, not_measured, sizes, quick, env)
                + held_markdown(held, hardware, drifts, {m.name: m.launch_steps_s for m in measurements}, unpredicted))
        record = {"environment": env, "sizes": asdict(sizes), "quick": quick, "skipped": not_measured,
                  "measurements": [{**asdict(m), "median_images_per_s": m.median} for m in measurements],
                  "comparisons": [{**asdict(c), "verdict": c.verdict} for c in rows],
                  "predicted": [h.to_json() for h in held], "not_predicted": unpredicted,
                  "hardware": None if hardware is None else {"name": hardware.name, "source": hardware.provenance,
                                                             "drift": drifts}}
        (output / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
        (output / "bench.md").write_text(text)
        return text

    launched: list[list[Measurement]] = []
    skipped: list[str] = []
    failures: list[str] = []  # of every launch

    def measured(so_far: list[Measurement], missing: list[str]) -> None:
        write(median_launches([*launched, so_far]), list(dict.fromkeys(failures + missing)))

    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=output))
    try:
        for _ in range(launches):
            found, skipped, failed = run_matrix(sizes, scratch, device_type, measured, modes)
            launched.append(found)
            failures = list(dict.fromkeys(failures + failed))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    measurements = median_launches(launched)
    if hardware:
        drifts["end"] = machine_drift(hardware)
    print(write(measurements, skipped + failures))
    plot_layouts(measurements, layout_variant(device_type).named(REFERENCE_STEP), output / "layouts.png")
    return failures


def median_launches(launched: list[list[Measurement]]) -> list[Measurement]:
    """Of each measurement in every launch of the matrix, the launch whose step is the median (the faster of the
    middle two), with every launch's step beside it: a machine whose speed moves between launches (a shared
    virtual machine) moves the median less than any one launch."""
    by_name: dict[str, list[Measurement]] = {}
    for found in launched:
        for m in found:
            by_name.setdefault(m.name, []).append(m)
    return [replace(sorted(runs, key=lambda m: m.step_s)[(len(runs) - 1) // 2], launch_steps_s=[m.step_s for m in runs])
            for runs in by_name.values()]


def predictions(measurements: list[Measurement], sizes: Sizes, hardware: Hardware,
                ) -> tuple[list[Held], dict[str, str]]:
    """Each layout's measured step beside the cost model's on `hardware`; and why each step the profile cannot
    predict (a net it did not calibrate, a precision or speed-up its layers did not run in) is not."""
    held, unpredicted = [], {}
    for m in measurements:
        if m.mode and m.step_s:
            try:
                predicted = predict_run(m.mode, m.arch or "paper", m.ranks, m.batch, hardware, sizes.num_classes,
                                        m.options, m.variant)
            except UsageError as refused:
                unpredicted[m.name] = str(refused)
                continue
            waited = m.wait_per_rank_s[0]  # rank 0's, as the prediction's figures are
            measured = StepFigures(m.step_s, m.step_s - waited, waited, m.bytes_per_rank, m.training_memory_mb or None)
            held.append(Held(m.name, measured, predicted.figures(), predicted.timeline))
    return held, unpredicted


def machine_drift(hardware: Hardware) -> dict[str, float]:
    """`calibrate.drift` of this machine against `hardware`."""
    from alexnet_mp.calibrate import drift  # calibrate measures with bench's own steps

    return drift(hardware)


def held_markdown(held: list[Held], hardware: Hardware | None, drifts: dict[str, dict[str, float]],
                  launches: Mapping[str, list[float]] | None = None, unpredicted: Mapping[str, str] | None = None,
                  ) -> str:
    """bench.md's section of each layout's step beside its prediction (with each run's step in each launch, and why
    each step not predicted is not), and how far the machine had drifted from its calibration at the bench's start
    and end."""
    moved = "; ".join(f"{threads} thread(s): " + ", ".join(f"{drifts[when][threads]:+.0%} at the {when}"
                                                              for when in drifts)
                      for threads in drifts.get("start", {}))
    said = (f"\n\nThe machine against its calibration, slower (+) or faster (-) than the profile says (calibrate's "
            f"probe run again): {moved}. The predictions above take the profile as calibrated: on a shared machine the "
            f"probe moves from one process to the next by as much as the drift it reads (docs/predicting.md)."
            if moved and held else "")
    return "\n" + held_section(held, hardware, launches, unpredicted) + said + "\n"
