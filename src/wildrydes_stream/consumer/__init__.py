"""The core every application runs on: the `Consumer` front class, which shards this process
owns (discovery, leases, hand-off, balancing), one owned shard's life, per-shard progress
and checkpoints.

Imports `source` (reading), `sink` (dead letters), `records`, `runtime`, `observability`,
`aws`; never an application (`copy`, `aggregate`, `alerts`): they hand it a sink instead.
"""
