"""Rewrite the generated parts of the docs from the code: the settings table of
docs/operating.md and config/wildrydes-stream.toml (from the settings), and the metric tables
of docs/operating.md (from the metric families the applications register). tests/test_docs.py
fails until this has been run after a change to either.

    PYTHONPATH=src python scripts/regen-docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

from wildrydes_stream.cli import render_settings
from wildrydes_stream.observability.catalog import render_metrics, sections

ROOT = Path(__file__).resolve().parents[1]
OPERATING = ROOT / "docs" / "operating.md"


def main() -> None:
    text = OPERATING.read_text()
    settings = re.compile(r"\| Setting \| Variable \| Default \| Meaning \|\n(?:\|.*\|\n)+")
    text = settings.sub(lambda _: render_settings("markdown") + "\n", text, count=1)
    for name in sections():
        block = re.compile(rf"<!-- metrics:{name} -->\n.*?<!-- /metrics:{name} -->", re.DOTALL)
        fresh = (
            f"<!-- metrics:{name} -->\n{render_metrics('markdown', name)}\n<!-- /metrics:{name} -->"
        )
        text, found = block.subn(lambda _, fresh=fresh: fresh, text)
        assert found == 1, f"docs/operating.md has no <!-- metrics:{name} --> block"
    OPERATING.write_text(text)
    (ROOT / "config" / "wildrydes-stream.toml").write_text(render_settings("toml") + "\n")


if __name__ == "__main__":
    main()
