"""Reading Kinesis: shard discovery and lineage, and one GetRecords loop per shard."""
