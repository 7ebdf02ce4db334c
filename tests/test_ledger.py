"""The ledger is where every link counts: a link never sends uncounted."""

from __future__ import annotations

import pytest
import torch

from alexnet_mp.ledger import FORWARD, Ledger, current_meter, metered
from alexnet_mp.links import all_gather, gather_to_first
from tests.clocks import DeferredClock


@pytest.mark.parametrize("link", [all_gather, gather_to_first])
def test_a_link_used_outside_metered_is_refused_before_it_sends(link):
    with pytest.raises(RuntimeError, match="outside `metered"):
        link(torch.ones(2, 3), 0, None)


def test_metered_names_the_ledger_and_link_the_collectives_within_count_into():
    ledger = Ledger()
    with metered(ledger, "fc6-input", part=1):
        current_meter().sent(FORWARD, 12, 4)
    assert ledger.sent(1) == {("fc6-input", FORWARD): 12} and ledger.total_bytes() == 48


def test_a_ledger_times_its_waits_by_its_clock_and_reads_them_only_when_asked():
    clock = DeferredClock()
    ledger = Ledger(clock=clock)
    for _ in range(2):
        with ledger.waiting("fc6-input", FORWARD):
            clock.stamp()  # the collective: one tick of the clock between the wait's stamps
    clock.done = True
    assert ledger.blocked == {("fc6-input", FORWARD): 4.0} and ledger.wait_s == 4.0


def test_a_ledger_reset_forgets_the_waits_it_has_not_read():
    clock = DeferredClock()
    ledger = Ledger(clock=clock)
    with ledger.waiting("fc6-input", FORWARD):
        pass
    ledger.reset()
    clock.done = True
    assert ledger.wait_s == 0
