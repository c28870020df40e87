"""The generated parts of the docs are current, and the docs hold together.

The settings table of docs/operating.md and the example config are generated from the settings
themselves (`wildrydes-stream settings --format markdown|toml`), the metric tables from the
metric families the applications register (`wildrydes-stream metrics --format markdown`);
`scripts/regen-docs.py` rewrites all of them. Every relative link and #anchor in README.md and
docs/*.md points at a file and heading that exist, and every alert of the PrometheusRules has
its runbook section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from wildrydes_stream.cli import render_settings
from wildrydes_stream.config import Settings, load_settings
from wildrydes_stream.observability.catalog import families, render_metrics, sections

ROOT = Path(__file__).resolve().parents[1]
OPERATING = ROOT / "docs" / "operating.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REGENERATE = "regenerate it with `PYTHONPATH=src python scripts/regen-docs.py`"


def test_settings_table_is_current() -> None:
    assert render_settings("markdown") in OPERATING.read_text(), (
        f"the settings table of docs/operating.md is stale: {REGENERATE}"
    )


def test_example_config_file_is_current_and_loads_to_the_defaults() -> None:
    path = ROOT / "config" / "wildrydes-stream.toml"
    assert path.read_text().strip() == render_settings("toml").strip()
    assert load_settings(path, environ={}) == Settings()


def generated_block(name: str) -> str:
    text = OPERATING.read_text()
    match = re.search(rf"<!-- metrics:{name} -->\n(.*?)\n<!-- /metrics:{name} -->", text, re.DOTALL)
    assert match, f"docs/operating.md has no <!-- metrics:{name} --> block"
    return match.group(1)


@pytest.mark.parametrize("name", ["core", "run", "aggregate"])
def test_metric_tables_are_current(name: str) -> None:
    assert generated_block(name) == render_metrics("markdown", name), (
        f"the {name} metric table of docs/operating.md is stale: {REGENERATE}"
    )


def test_metric_tables_cover_every_family_of_both_applications() -> None:
    documented = {f.name for rows in sections().values() for f in rows}
    for app in ("run", "aggregate"):
        assert {f.name for f in families(app)} <= documented, app
    assert all(f.help for rows in sections().values() for f in rows), "a family without HELP"


def test_a_help_text_change_makes_the_table_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import Counter as real

    def reworded(name: str, documentation: str, *args: object, **kwargs: object) -> object:
        if name == "records_written_total":
            documentation += " Reworded."
        return real(name, documentation, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("wildrydes_stream.observability.metrics.Counter", reworded)
    assert generated_block("run") != render_metrics("markdown", "run")


# --- links -----------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces
    to `-` (markup such as backticks goes with the punctuation)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = github_anchor(line.lstrip("#"))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_github_anchors_are_computed_as_github_does() -> None:
    assert github_anchor("When AWS fails: what you see") == "when-aws-fails-what-you-see"
    assert github_anchor("Metrics of `run`") == "metrics-of-run"
    assert github_anchor("2. Create the streams and the table") == (
        "2-create-the-streams-and-the-table"
    )
    assert github_anchor("Replicas, leases and hand-off") == "replicas-leases-and-hand-off"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    found = links(path)
    assert found or path.name != "README.md"
    for link in found:
        if re.match(r"[a-z]+:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: {link} points at no file"
        if anchor:
            assert file.suffix == ".md", f"{path.name}: {link}"
            assert anchor in anchors(file), f"{path.name}: {link}: no such heading"


def test_the_docs_are_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in DOCS[1:]:
        assert f"](docs/{path.name}" in readme, path.name


# --- alerts ------------------------------------------------------------------------------------


def alert_names() -> list[str]:
    names = []
    for rule_file in ("prometheusrule.yaml", "aggregate-prometheusrule.yaml"):
        document = yaml.safe_load((ROOT / "config" / "kubernetes" / rule_file).read_text())
        for group in document["spec"]["groups"]:
            names += [rule["alert"] for rule in group["rules"] if "alert" in rule]
    return names


def test_every_alert_has_a_row_and_a_runbook_section() -> None:
    text = OPERATING.read_text()
    headings = anchors(OPERATING)
    names = alert_names()
    assert len(names) >= 20
    for name in names:
        assert f"| `{name}` |" in text, f"{name} has no row in the alert tables"
        assert name.lower() in headings, f"{name} has no runbook section (#### {name})"
        section = text.split(f"#### {name}\n", 1)[1].split("\n#", 1)[0]
        for part in ("**Means:**", "**Check:**", "**Do:**"):
            assert part in section, f"{name}'s runbook section lacks {part}"
    runbooks = re.findall(r"^#### (Wildrydes\w+)$", text, flags=re.MULTILINE)
    assert sorted(runbooks) == sorted(names), "a runbook section for an alert that is gone"
