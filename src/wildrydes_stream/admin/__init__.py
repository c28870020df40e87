"""Operator commands over the lease table: `status` (read only) and `reset`."""
