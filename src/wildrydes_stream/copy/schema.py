"""The item table's shape the settings write into: keys (Name, StatusTime) and their types.

Checked by `run` at start and by `provision` on a table that already exists.
"""

from __future__ import annotations

from typing import Any

from wildrydes_stream.config import Settings


def table_problems(table: dict[str, Any], settings: Settings) -> list[str]:
    """What is wrong with the item table for these settings: key schema, StatusTime type."""
    name = settings.table_name
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    keys = {k["AttributeName"]: k["KeyType"] for k in table["KeySchema"]}
    if keys != {"Name": "HASH", "StatusTime": "RANGE"}:
        found = ", ".join(f"{k} ({v})" for k, v in keys.items())
        return [
            f"DynamoDB table {name!r} must have partition key Name and sort key StatusTime; "
            f"it has {found}"
        ]
    expected = "N" if settings.status_time_format == "epoch_ms" else "S"
    if types.get("StatusTime") != expected:
        return [
            f"DynamoDB table {name!r} stores StatusTime as {types.get('StatusTime')} but "
            f"status_time_format={settings.status_time_format} writes {expected}: change the "
            "setting (WILDRYDES_STATUS_TIME_FORMAT)"
        ]
    return []
