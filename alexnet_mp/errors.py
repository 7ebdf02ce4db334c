"""The errors the program reports in one line: one family, each kind with the exit code the command line
gives it and whether its message names the rank that met it (a failure on one rank) or not (a refusal every
rank makes alike, which ranks other than 0 prefix with their rank). The command line maps the family, never a
message, to what it prints."""

from __future__ import annotations

import shutil
from typing import ClassVar

import torch


class AlexNetMPError(Exception):
    exit_code: ClassVar[int] = 1
    names_rank: ClassVar[bool] = False


class UsageError(AlexNetMPError):
    """Bad input (a flag, a world size, data, a checkpoint): refused before it can cost work or data."""

    exit_code = 2


class Diverged(AlexNetMPError):
    """The loss stopped being finite; the checkpoints written so far are intact."""


class WriteFailed(AlexNetMPError):
    """A checkpoint or the run's record could not be written (most often: the disk is full)."""

    names_rank = True


class PeerLost(AlexNetMPError):
    """Another process died or did not answer within --timeout."""

    names_rank = True


class GroupNotFormed(AlexNetMPError):
    """A rank could not join the process group: a launcher's address or port, or a rank that never started."""

    names_rank = True


class OutOfMemory(AlexNetMPError):
    """The device, or the shared memory through which loader workers hand batches over, ran out."""

    names_rank = True


# What gloo and NCCL say when a peer is gone, where they raise a plain RuntimeError rather than a DistError.
PEER_FAILURE_WORDS = ("Connection reset", "Connection closed", "timed out", "Timed out", "Broken pipe",
                      "NCCL communicator was aborted")


def from_torch(error: BaseException, rank: int) -> AlexNetMPError | None:
    """The family's error for a failure torch reports in its own terms, on rank `rank`; None for any other."""
    if isinstance(error, torch.cuda.OutOfMemoryError):  # a traceback into the allocator says less than what to change
        return OutOfMemory(f"rank {rank} ran out of GPU memory: lower --batch-size (the global batch), or add "
                           "--mixed-precision bf16 (--resume auto goes on from the newest checkpoint, if any)")
    if isinstance(error, MemoryError) or "DefaultCPUAllocator" in str(error):  # the host's, or what `ulimit -v` allows
        return OutOfMemory(f"rank {rank} ran out of host memory: lower --batch-size (the global batch) or --workers "
                           "(--resume auto goes on from the newest checkpoint, if any)")
    if not isinstance(error, RuntimeError):
        return None
    if "shared memory" in str(error):  # loader workers hand batches over through /dev/shm
        return OutOfMemory(f"rank {rank}: the data loader's workers ran out of shared memory ({shared_memory_size()}): "
                           "give the container more (docker run --shm-size 16g, or --ipc host), or lower --workers "
                           "(0 needs none)")
    if isinstance(error, torch.distributed.DistError) or any(word in str(error) for word in PEER_FAILURE_WORDS):
        return PeerLost(f"rank {rank} lost contact with another process ({first_line(error)}); see that process's "
                        "output, then resume with --resume latest")
    return None


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (torch's carry C++ stack traces after it)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def shared_memory_size() -> str:
    """/dev/shm's size, as the out-of-shared-memory line names it (Docker's default is 64 MB)."""
    try:
        return f"/dev/shm holds {shutil.disk_usage('/dev/shm').total / 2**20:.0f} MiB"
    except OSError:
        return "no /dev/shm"
