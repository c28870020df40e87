"""Prometheus metrics, the health/metrics HTTP server and log formatting."""
