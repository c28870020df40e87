"""The README and the example config document every setting, so neither can fall behind."""

from __future__ import annotations

from pathlib import Path

from wildrydes_stream.config import Settings, describe, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_a_row_for_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, env, default, _ in describe():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), "")
        assert row, f"README has no row for {name}"
        assert env.split(" / ")[0] in row
        assert f"`{default}`" in row or (default == "" and '`""`' in row)


def test_example_config_file_loads_to_the_defaults() -> None:
    assert load_settings(ROOT / "config" / "wildrydes-stream.toml", environ={}) == Settings()
