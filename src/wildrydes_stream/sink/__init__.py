"""Writing out: batched DynamoDB writers and the dead-letter destinations."""
