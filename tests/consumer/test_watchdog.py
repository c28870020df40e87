"""The lease watchdog's deadlines: a round's leases fall due together, never after expiry."""

from __future__ import annotations

import random

from wildrydes_stream.consumer.owned import due_on_grid

LEASE_DURATION = 10.0
GRID = LEASE_DURATION / 20


def test_leases_renewed_in_one_round_fall_due_in_one_or_two_wake_ups() -> None:
    rng = random.Random(7)
    for _ in range(200):
        # A round of 256 renewals confirmed over 50 ms, at any moment of the loop's clock.
        start = rng.uniform(0, 10_000)
        deadlines = [start + rng.uniform(0, 0.05) + LEASE_DURATION for _ in range(256)]
        due = {due_on_grid(deadline, GRID) for deadline in deadlines}
        assert len(due) <= 2, due  # two only when the round straddles a grid point


def test_a_lease_falls_due_before_it_expires_and_at_most_a_grid_step_early() -> None:
    rng = random.Random(11)
    for _ in range(10_000):
        deadline = rng.uniform(0, 100_000)
        due = due_on_grid(deadline, GRID)
        assert deadline - GRID < due <= deadline
