"""The aggregation stage: raw readings -> per-unicorn, per-minute windows on a stream."""
