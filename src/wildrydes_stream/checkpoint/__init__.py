"""Progress: which records are finished per shard, and the lease table that stores it."""
