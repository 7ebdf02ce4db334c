"""Runs a function on N real processes talking over gloo (or NCCL, one GPU each), with no launcher and no ports:
what the equivalence tests, the benchmark and calibrate use."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from alexnet_mp.malloc import steady_malloc

GROUP_TIMEOUT = timedelta(seconds=60)
JOIN_TIMEOUT_S = 240
# Imported once by the fork server, then inherited by every rank it forks: a spawned rank would pay
# for importing torch and torch._dynamo (which the optimizer imports on first use) each time.
# The bench imports torch, the strategies, the step and the data pipeline (torchvision). These
# imports start no threads and touch no GPU, so forking after them is safe.
PRELOAD = ["torch._dynamo", "alexnet_mp.bench.measure"]


def _worker(fn: Callable[..., Any], rank: int, world_size: int, directory: str, threads: int, backend: str,
            args: tuple) -> None:
    torch.set_num_threads(threads)
    steady_malloc()
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per rank
    # A forkserver child inherits "forkserver" as its start method; a launched rank has the platform's
    # default (fork on Linux), which its data loader workers then use: restore it.
    multiprocessing.set_start_method(None, force=True)
    out = Path(directory) / f"rank{rank}.pt"
    try:
        store = dist.FileStore(str(Path(directory) / "store"), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
        # The group is never destroyed: the rank ends in multiprocessing's os._exit. Destroyed here, it could
        # be freed on a gloo thread still releasing a finished collective's callback (DDP's hook state holds
        # the group), whose destructor then joins that thread from itself: "Resource deadlock avoided", SIGABRT.
        result = fn(*args)
        torch.save({"result": result}, out)
        _wait_for_peers()
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise


def _wait_for_peers() -> None:
    """No rank leaves before every rank is done: its exit closes its connections, which a peer still joining a group
    the function made (a `new_group` with no collective after it) takes for a crash. A peer that failed has its own
    error to say why; this rank's result stands."""
    if not dist.is_initialized():  # the function left the group itself (`world.leave_group`), together
        return
    try:
        dist.barrier()
    except RuntimeError:
        pass


def run_distributed(fn: Callable[..., Any], world_size: int, directory: Path, *args: Any, threads: int = 1,
                    backend: str = "gloo") -> list[Any]:
    """fn(*args) on `world_size` fresh processes of `threads` CPU threads each, in a group of `backend` (gloo; or
    nccl, rank r on GPU r) (FileStore under `directory`) with a timeout; returns each rank's result, in rank order.
    The processes are forked from a server started at the first call: they see os.environ as it was then."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "store").unlink(missing_ok=True)  # a store left by an earlier group would join this one to it
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    processes = [context.Process(target=_worker, args=(fn, rank, world_size, str(directory), threads, backend, args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    for process in processes:
        if process.is_alive():
            process.kill()
    results = []
    for rank in range(world_size):
        path = directory / f"rank{rank}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {rank} of {world_size} left no result (exit code {processes[rank].exitcode})")
        outcome = torch.load(path, weights_only=False)
        path.unlink()  # a rank's result can be gigabytes (float64 weights and gradients of the whole net)
        if "error" in outcome:
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{outcome['error']}")
        results.append(outcome["result"])
    return results
