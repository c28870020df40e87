"""Operator commands: `status` (read only) and `reset` over the lease table, `redrive` (dead
letters back where they were going) and `provision` (streams and tables).
"""
