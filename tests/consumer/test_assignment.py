"""The assignment rules on lease snapshots and a hand-driven clock: no table, no loop."""

from __future__ import annotations

from wildrydes_stream.consumer.assignment import Assignment
from wildrydes_stream.consumer.lease import Lease

LEASE_DURATION = 10.0
HANDOFF_TIMEOUT = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease(shard: int, owner: str | None, counter: int = 1, **extra: object) -> Lease:
    return Lease(f"shardId-{shard:012d}", "TRIM_HORIZON", owner, counter, **extra)  # type: ignore[arg-type]


def snapshot(*leases: Lease) -> dict[str, Lease]:
    return {one.shard_id: one for one in leases}


def assignment(clock: Clock, me: str = "me") -> Assignment:
    return Assignment(me, LEASE_DURATION, HANDOFF_TIMEOUT, clock)


def test_a_lone_worker_doubles_what_it_takes_each_look_up_to_every_shard() -> None:
    decide = assignment(Clock())
    leases = snapshot()
    held, looks = 0, []
    while held < 8:
        allowed = decide.takes_allowed(8, leases, held)
        looks.append(allowed)
        held += allowed
    assert looks == [1, 1, 2, 4]


def test_the_share_counts_other_live_owners_only() -> None:
    clock = Clock()
    decide = assignment(clock)
    leases = snapshot(*(lease(i, "other") for i in range(4)), lease(4, "dead"))
    decide.observe(leases)
    assert decide.takes_allowed(8, leases, 2) == 1  # three workers: ceil(8 / 3) = 3, held 2
    clock.now += LEASE_DURATION  # no counter moved: both others expired
    assert decide.takes_allowed(8, leases, 2) == 2  # alone: doubling what is held


def test_a_lease_expires_only_when_its_counter_stands_still_for_the_lease_duration() -> None:
    clock = Clock()
    decide = assignment(clock)
    decide.observe(snapshot(lease(1, "other", counter=5)))
    clock.now += LEASE_DURATION - 1
    decide.observe(snapshot(lease(1, "other", counter=6)))  # renewed
    clock.now += LEASE_DURATION - 1
    moved = lease(1, "other", counter=6)
    assert not decide.expired(moved)
    assert decide.held_by_other(moved)
    clock.now += 1
    assert decide.expired(moved)
    assert not decide.held_by_other(moved)
    assert decide.takeable(moved)


def test_unowned_and_own_leases_are_takeable_and_a_live_others_is_not() -> None:
    decide = assignment(Clock())
    assert decide.takeable(lease(1, None))
    assert decide.takeable(lease(2, "me"))
    assert not decide.takeable(lease(3, "other"))


def test_a_lease_in_a_hand_off_is_not_taken_until_the_hand_off_times_out() -> None:
    clock = Clock()
    decide = assignment(clock)
    pending = lease(1, "me", checkpoint_owner="old")
    assert not decide.takeable(pending)
    clock.now += HANDOFF_TIMEOUT - 1
    assert not decide.takeable(pending)
    clock.now += 1
    assert decide.takeable(pending)


def test_a_finished_hand_off_restarts_the_timeout_for_the_next_one() -> None:
    clock = Clock()
    decide = assignment(clock)
    decide.takeable(lease(1, "me", checkpoint_owner="old"))
    clock.now += HANDOFF_TIMEOUT
    decide.observe(snapshot(lease(1, "me")))  # cleared: that hand-off is over
    assert not decide.takeable(lease(1, "me", checkpoint_owner="old"))


def test_held_shards_now_named_for_another_are_handed_over_or_dropped() -> None:
    decide = assignment(Clock())
    scanned = snapshot(
        lease(1, "asker", checkpoint_owner="me"),  # a hand-off asked of us
        lease(2, "thief"),  # taken outright
        lease(3, "me"),  # still ours
        lease(4, None),  # released by someone else (reset): not ours any more
    )
    taken = decide.taken(list(scanned), scanned)
    assert taken.to_hand_over == ["shardId-000000000001"]
    assert taken.to_drop == ["shardId-000000000002", "shardId-000000000004"]


def test_a_lease_is_asked_only_of_a_busy_worker_seen_renewing() -> None:
    clock = Clock()
    decide = assignment(clock)
    busy = [lease(i, "busy", counter=1) for i in range(4)]
    decide.observe(snapshot(*busy))
    # Never seen renewing: it may be dead, and asking a dead worker is never answered.
    assert decide.lease_to_ask_for(busy, held=()) is None
    renewed = [lease(i, "busy", counter=2) for i in range(4)]
    decide.observe(snapshot(*renewed))
    asked = decide.lease_to_ask_for(renewed, held=())
    assert asked is not None
    assert asked.owner == "busy"


def test_nothing_is_asked_when_the_spread_is_fair_or_the_lease_is_in_a_hand_off() -> None:
    clock = Clock()
    decide = assignment(clock)
    first = [lease(i, "busy", counter=1) for i in range(2)] + [lease(2, "me"), lease(3, "me")]
    decide.observe(snapshot(*first))
    later = [lease(i, "busy", counter=2) for i in range(2)] + [lease(2, "me"), lease(3, "me")]
    decide.observe(snapshot(*later))
    assert decide.lease_to_ask_for(later, held={"shardId-000000000002"}) is None  # 2 and 2
    in_hand_off = [lease(i, "busy", counter=2, checkpoint_owner="x") for i in range(4)]
    assert decide.lease_to_ask_for(in_hand_off, held=()) is None
