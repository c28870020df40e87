"""ShardProgress: the checkpoint covers exactly the contiguous prefix of finished records."""

from __future__ import annotations

import random

import pytest

from wildrydes_stream.consumer.progress import ShardProgress

# A real Kinesis sequence number (56 digits); tests pair it with neighbours that have fewer or
# more digits, where comparing as text gets the order wrong ("9..." > "1...").
REAL = 49590338271490256608559692538361571095921575989136588898


def _sequences(count: int, rng: random.Random | None = None) -> list[int]:
    """Increasing sequence numbers of Kinesis size whose digit counts change along the way."""
    rng = rng or random.Random(0)
    start = 10**54 - 5  # 54 digits; crosses into 55 and 56 digits along the way
    values = []
    current = start
    for i in range(count):
        values.append(current)
        # mostly small steps, now and then a jump of several orders of magnitude
        current += rng.randint(1, 3) if i % 7 else rng.randint(1, 10**55)
    return values


def test_a_record_finished_later_holds_the_checkpoint_back() -> None:
    progress = ShardProgress("shardId-000000000000")
    seqs = [REAL + i for i in range(5)]
    for seq in seqs:
        progress.register(seq)
    assert progress.checkpoint is None
    progress.finish(seqs[0])
    assert progress.checkpoint == seqs[0]
    # the second record is slow; everything after it finishes
    for seq in seqs[2:]:
        progress.finish(seq)
        assert progress.checkpoint == seqs[0]
    assert progress.in_flight == 4
    assert not progress.drained.is_set()
    progress.finish(seqs[1])
    assert progress.checkpoint == seqs[-1]
    assert progress.in_flight == 0
    assert progress.drained.is_set()


def test_nothing_checkpointed_while_the_first_record_is_in_flight() -> None:
    progress = ShardProgress("s")
    for seq in (10, 20, 30):
        progress.register(seq)
    progress.finish(30)
    progress.finish(20)
    assert progress.checkpoint is None
    progress.finish(10)
    assert progress.checkpoint == 30


def test_sequence_numbers_are_compared_as_integers_across_digit_counts() -> None:
    progress = ShardProgress("s")
    # As strings these sort the other way round: "99..." > "100...".
    small = 10**55 - 1  # 55 nines
    big = 10**55  # 56 digits
    bigger = REAL * 10  # 57 digits
    assert str(small) > str(big)
    progress.register(small)
    progress.register(big)
    progress.register(bigger)
    progress.finish(big)
    assert progress.checkpoint is None  # `small` still holds it back
    progress.finish(small)
    assert progress.checkpoint == big
    progress.finish(bigger)
    assert progress.checkpoint == bigger
    assert str(progress.checkpoint) == str(REAL) + "0"


def test_sequences_must_be_registered_in_increasing_order() -> None:
    progress = ShardProgress("s")
    progress.register(10**55)
    with pytest.raises(ValueError, match="out of order"):
        progress.register(10**55 - 1)  # fewer digits: smaller, even if "9" > "1" as text
    with pytest.raises(ValueError, match="out of order"):
        progress.register(10**55)  # a repeat


def test_at_shard_end_only_after_end_and_everything_finished() -> None:
    progress = ShardProgress("s")
    assert not progress.at_shard_end  # nothing in flight, but not ended
    progress.register(REAL)
    progress.register(REAL + 1)
    progress.finish(REAL + 1)
    assert not progress.at_shard_end
    progress.end()
    assert progress.ended
    assert not progress.at_shard_end  # REAL still in flight
    progress.finish(REAL)
    assert progress.at_shard_end
    assert progress.checkpoint == REAL + 1


def test_an_empty_ended_shard_is_at_its_end() -> None:
    progress = ShardProgress("s")
    progress.end()
    assert progress.at_shard_end
    assert progress.checkpoint is None


def test_nothing_registers_after_end() -> None:
    progress = ShardProgress("s")
    progress.end()
    with pytest.raises(RuntimeError, match="already ended"):
        progress.register(1)


@pytest.mark.parametrize("seed", range(200))
def test_checkpoint_is_the_contiguous_finished_prefix_in_any_finish_order(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.randint(1, 60)
    seqs = _sequences(count, rng)
    finish_order = list(range(count))
    rng.shuffle(finish_order)
    progress = ShardProgress("s")
    registered = 0
    finished: set[int] = set()
    ended = False
    while len(finished) < count:
        # Registration and finishing interleave, like the poller reading while writers ack.
        ready = [i for i in finish_order if i not in finished and i < registered]
        if registered < count and (not ready or rng.random() < 0.5):
            progress.register(seqs[registered])
            registered += 1
            if registered == count and rng.random() < 0.5:
                progress.end()
                ended = True
            continue
        index = ready[0]
        progress.finish(seqs[index])
        finished.add(index)
        prefix = 0
        while prefix < registered and prefix in finished:
            prefix += 1
        assert progress.checkpoint == (seqs[prefix - 1] if prefix else None)
        assert progress.in_flight == registered - prefix
        assert progress.drained.is_set() == (prefix == registered)
        assert progress.at_shard_end == (ended and prefix == registered)
    assert progress.checkpoint == seqs[-1]
    progress.end()
    assert progress.at_shard_end
