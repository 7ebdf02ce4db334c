"""How far this machine's speed moves from one run to the next, and whether calibrate's probe follows it: each
run named (as bench names it) measured ROUNDS times as bench measures it, each time between two probes run like
for like (`calibrate.probe` on its ranks and threads at once). Prints, per run, how far apart its steps came over
the rounds (the largest over the smallest, less 1), how far apart the probes before it came, how far apart the
step over the mean of the probes either side of it came (what a per-run correction would leave), and how the
step correlates with that mean.

    python launch/machine_noise.py [--rounds 6] [--runs "single, paper" "data-parallel x2" ...]

A correction by the probe helps where the third spread is well under the first; on this project's machine it
took out a quarter to two fifths at best, leaving more than the cost model's error (docs/results/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from alexnet_mp import calibrate
from alexnet_mp.bench.matrix import FULL, layout_runs
from alexnet_mp.bench.measure import layout_steps, measure
from alexnet_mp.speed import EAGER
from alexnet_mp.strategies import REFERENCE, REFERENCE_STEP

DEFAULT_RUNS = (REFERENCE_STEP, "data-parallel x2", "weird-trick (all) x4")


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def probed_run(name: str, ranks: int, mode: str, options: dict, threads: int, scratch: Path,
               ) -> tuple[float, float, float]:
    """The probe on the run's ranks and threads, the run's step (bench's median), and the probe again: seconds."""
    def like_for_like() -> float:
        return calibrate.probe(FULL.paper_net, [threads], ranks=ranks)[str(threads)]

    before = like_for_like()
    step = measure(name, layout_steps, ranks, threads, FULL.batch, scratch, mode, FULL.paper_net, options, FULL.batch,
                   FULL, EAGER).step_s
    return before, step, like_for_like()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    args = parser.parse_args()
    known = {name: (ranks, mode, options) for name, ranks, mode, options in layout_runs(FULL, "cpu", [])}
    known[REFERENCE_STEP] = (1, REFERENCE, {})
    unknown = [name for name in args.runs if name not in known]
    if unknown:
        parser.error(f"unknown runs {unknown}: choose among {sorted(known)}")
    cores = os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="machine-noise-"))
    seen: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.runs}
    for _ in range(args.rounds):
        for name in args.runs:
            ranks, mode, options = known[name]
            seen[name].append(probed_run(name, ranks, mode, options, max(1, cores // ranks), scratch))
    print(f"\n{args.rounds} rounds | step spread | probe spread | step / probe spread | correlation")
    print("|---|---|---|---|---|")
    for name, rows in seen.items():
        steps = [step for _, step, _ in rows]
        probes = [(before + after) / 2 for before, _, after in rows]
        corrected = [step / probe for step, probe in zip(steps, probes, strict=True)]
        print(f"| {name} | {spread(steps):.0%} | {spread([before for before, _, _ in rows]):.0%} | "
              f"{spread(corrected):.0%} | {statistics.correlation(steps, probes):+.2f} |")


if __name__ == "__main__":
    main()
