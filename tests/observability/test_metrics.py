"""What a fresh service exports, before anything happened: the series alerts need at 0."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wildrydes_stream import __version__
from wildrydes_stream.observability.metrics import DATA_APIS, DEAD_LETTER_KINDS, Metrics


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(Metrics().registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_labelled_counters_with_known_labels_start_at_zero() -> None:
    exported = samples()
    for kind in DEAD_LETTER_KINDS:
        key = ("wildrydes_records_dead_lettered_total", (("reason", kind),))
        assert exported[key] == 0.0, kind
    for api in DATA_APIS:
        assert exported[("wildrydes_throttles_total", (("api", api),))] == 0.0
        assert exported[("wildrydes_aws_errors_total", (("api", api),))] == 0.0


def test_process_and_build_info_are_exported_and_no_created_series() -> None:
    exported = samples()
    names = {name for name, _ in exported}
    assert "process_resident_memory_bytes" in names
    assert "process_cpu_seconds_total" in names
    assert "process_open_fds" in names
    [(labels, value)] = [(lb, v) for (n, lb), v in exported.items() if n == "wildrydes_build_info"]
    assert value == 1.0
    assert dict(labels)["version"] == __version__
    assert {"revision", "python"} <= dict(labels).keys()
    assert not [name for name in names if name.endswith("_created")]
