"""The stream's shards as Kinesis lists them, and the lease table kept in step with them.

A shard is readable only once its parents are done (read to the end, SHARD_END checkpointed).
Finished shards' leases get their children's ids (KCL's `childShardIds`), and are deleted once
Kinesis no longer lists the shard (trimmed after the stream's retention), as KCL does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.lease import AT_TIMESTAMP, LATEST, Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.statestore import StateStore
from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.source.shards import Shard, list_shards, readable_shards

log = logging.getLogger(__name__)


class ShardDiscovery:
    def __init__(
        self, kinesis: Any, settings: Settings, leases: LeaseTable, store: StateStore | None
    ) -> None:
        self._kinesis = kinesis
        self._settings = settings
        self._leases = leases
        self._store = store
        self.shards: list[Shard] = []
        """As of the last listing."""

    async def refresh(self) -> None:
        self.shards = await list_shards(self._kinesis, self._settings.stream_name)

    async def reconcile(self, leases: Mapping[str, Lease]) -> tuple[list[Shard], set[str]]:
        """Bring the lease table in step with the listing; returns the shards readable now
        (in the order to take them) and the ids of the trimmed shards whose leases went."""
        shards = self.shards
        finished = {shard_id for shard_id, lease in leases.items() if lease.at_shard_end}
        trimmed = await self._forget_trimmed(finished - {shard.shard_id for shard in shards})
        self._check_positions(leases)
        await self._note_children(shards, leases)
        readable = readable_shards(
            shards,
            finished,
            leases.keys(),
            skip_unleased_closed=self._settings.starting_position == LATEST,
        )
        return readable, trimmed

    async def _forget_trimmed(self, shard_ids: set[str]) -> set[str]:
        """Delete the leases of finished shards Kinesis no longer lists, so the lease table does
        not grow with every reshard. Their children treat an unlisted parent as done, so
        nothing waits on these leases."""
        deleted: set[str] = set()
        for shard_id in sorted(shard_ids):
            if await self._leases.delete_finished(shard_id):
                deleted.add(shard_id)
                if self._store is not None:
                    await self._store.prune(shard_id, None)
                log.info("deleted the lease of a trimmed shard", extra={"shard": shard_id})
        return deleted

    def _check_positions(self, leases: Mapping[str, Lease]) -> None:
        """A lease KCL left at the sentinel AT_TIMESTAMP carries no time: without one configured
        it cannot be read, which must be one line at start, not a failure inside a shard."""
        if self._settings.starting_datetime() is not None:
            return
        for lease in leases.values():
            if lease.checkpoint == AT_TIMESTAMP and lease.starting_ms is None:
                raise WildrydesError(
                    f"lease {lease.shard_id} in {self._leases.table_name} is at AT_TIMESTAMP "
                    "with no time: set starting_timestamp (WILDRYDES_STARTING_TIMESTAMP)"
                )

    async def _note_children(self, shards: list[Shard], leases: Mapping[str, Lease]) -> None:
        children: dict[str, list[str]] = {}
        for shard in shards:
            for parent in shard.parents:
                children.setdefault(parent, []).append(shard.shard_id)
        for shard_id, lease in leases.items():
            listed = children.get(shard_id)
            if lease.at_shard_end and listed and set(listed) != set(lease.children):
                await self._leases.note_children(shard_id, listed)
