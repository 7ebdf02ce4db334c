"""The ledger is where every link counts: a link never sends uncounted."""

from __future__ import annotations

import pytest
import torch

from alexnet_mp.ledger import FORWARD, Ledger, current_meter, metered
from alexnet_mp.links import all_gather, gather_to_first


@pytest.mark.parametrize("link", [all_gather, gather_to_first])
def test_a_link_used_outside_metered_is_refused_before_it_sends(link):
    with pytest.raises(RuntimeError, match="outside `metered"):
        link(torch.ones(2, 3), 0, None)


def test_metered_names_the_ledger_and_link_the_collectives_within_count_into():
    ledger = Ledger()
    with metered(ledger, "fc6-input", part=1):
        current_meter().sent(FORWARD, 12, 4)
    assert ledger.sent(1) == {("fc6-input", FORWARD): 12} and ledger.total_bytes() == 48
