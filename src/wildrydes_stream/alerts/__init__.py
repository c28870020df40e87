"""Low-magic alerts of `run`: the per-unicorn state that moves with a shard's lease, the stage
that evaluates each record and delivers alerts, and the destinations (log, SNS, webhook).
"""
