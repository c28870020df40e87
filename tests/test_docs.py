"""The README's settings table and the example config are generated from the settings
themselves (`wildrydes-stream settings --format markdown|toml`); these tests keep them so."""

from __future__ import annotations

from pathlib import Path

from wildrydes_stream.cli import render_settings
from wildrydes_stream.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render_settings("markdown") in readme, (
        "README settings table is stale: regenerate it with "
        "`wildrydes-stream settings --format markdown`"
    )


def test_example_config_file_is_current_and_loads_to_the_defaults() -> None:
    path = ROOT / "config" / "wildrydes-stream.toml"
    assert path.read_text().strip() == render_settings("toml").strip()
    assert load_settings(path, environ={}) == Settings()
