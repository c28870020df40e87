"""The core every application runs on: the `Consumer` front class; the `ShardSupervisor` front
over shard discovery, lease assignment (pure decisions over a lease snapshot) and the owned
shards (each one's life from take to let-go: reading, renewals, checkpoints, hand-off); the
lease table and the state table; per-shard progress.

Imports `source` (reading), `sink` (dead letters), `records`, `runtime`, `observability`,
`aws`; never an application (`copy`, `aggregate`, `alerts`): they hand it a sink instead.
"""
