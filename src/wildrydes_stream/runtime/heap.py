"""Process-wide tuning for a long-running consumer, applied once the service has started.

The hot path allocates a few small dicts per record (the item's attributes, the envelope), and
each page's records stay alive in the queues until written. With CPython's default collector
thresholds (a young collection every 700 allocations) the cyclic collector ran thousands of
times a second and walked those live records, and every older collection walked botocore's
service models and every loaded module too: about a third of the CPU of a catching-up service
(`make bench`, the `null` contender). What the service allocates per record is freed by
reference counting (nothing on the data path makes cycles), so collecting rarely loses nothing.
"""

from __future__ import annotations

import gc
from typing import Final

# A young collection every 10,000 net allocations instead of 700; the older generations as
# often, relative to it, as by default.
GC_THRESHOLDS: Final = (10_000, 50, 50)


def settle_heap() -> None:
    """Move what start-up created (modules, service models, clients) out of the collector's
    sight for good (`gc.freeze`), and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
