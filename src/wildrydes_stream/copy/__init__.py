"""The `run` application: a record of the aggregated stream becomes an item of
`UnicornSensorData` (with low-magic alerts beside the writes), and the table check at start.

Imports the consumer core, `sink`, `alerts`, `records`; nothing imports it but the commands.
"""
