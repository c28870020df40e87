"""Rewrite the README's settings table and config/wildrydes-stream.toml from the settings."""

from __future__ import annotations

import re
from pathlib import Path

from wildrydes_stream.cli import render_settings

ROOT = Path(__file__).resolve().parents[1]

readme = ROOT / "README.md"
text = readme.read_text()
table = re.compile(r"\| Setting \| Variable \| Default \| Meaning \|\n(?:\|.*\|\n)+")
readme.write_text(table.sub(lambda _: render_settings("markdown") + "\n", text, count=1))
(ROOT / "config" / "wildrydes-stream.toml").write_text(render_settings("toml") + "\n")
