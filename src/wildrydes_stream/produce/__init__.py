"""The workshop's producer: simulated unicorns putting one raw reading a second on a stream."""
