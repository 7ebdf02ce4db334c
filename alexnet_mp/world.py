"""Which process this is, among how many: read here and nowhere else. Before the process group exists the
launcher's environment says (accelerate, torchrun and srun-style launchers set RANK, WORLD_SIZE and
LOCAL_WORLD_SIZE; a plain process is rank 0 of 1); once it exists, the group does."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """This process as the launcher started it, before any process group."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def processes_on_this_machine(world_size: int) -> int:
    """The processes a launcher started on this machine, of the `world_size` it launched."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def current() -> World:
    """This process in the default process group; rank 0 of 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def barrier() -> None:
    if current().size > 1:
        dist.barrier()


def leave_group() -> None:
    """Every rank leaves the process group together once it is done with it: what held the group (DDP's hook state)
    freed first, every rank's collectives done, then the group destroyed and its gloo threads joined while the
    interpreter is whole. Left to the interpreter's exit, a thread still holding a finished collective's tensors can
    abort the process ("terminate called without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    barrier()
    dist.destroy_process_group()


def stop_with_launcher(timeout_s: float) -> None:
    """Stops this rank if the launcher that started it dies. torchrun starts each rank in a session of its
    own, so killing the launcher's process group leaves its ranks training as orphans (holding the output's
    lock): a watcher sees the parent change and sends this process SIGTERM (the step in hand finishes, a
    checkpoint is written, every rank stops together), and exits outright if that takes over `timeout_s`."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(timeout_s)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
