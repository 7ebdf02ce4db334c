"""Random streams keyed by tuples of integers, so a draw depends only on what it is for."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from a tuple such as (seed, step, layer), well mixed by SeedSequence."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))
