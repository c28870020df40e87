"""The command lines of the docs: every line of every ```sh block of README.md and docs/*.md,
split into shell words the way a POSIX shell would for the forms the docs use (continuation
lines, comments, `VAR=value` prefixes, pipelines, `<`/`>` redirections, a trailing `&`,
`$(...)` substitutions and `$VAR` expansions)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fenced block, indented or not (a block inside a list item keeps the item's indent).
_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline: its words, its `<` input and `>` output files."""

    words: list[str]
    stdin: str | None = None
    stdout: str | None = None


@dataclass(frozen=True)
class Line:
    path: Path
    number: int
    text: str
    """As written (continuations joined, comment dropped)."""
    assignments: dict[str, str]
    """`VAR=value` before the command (or the names an `export` sets)."""
    stages: list[Stage]
    background: bool
    substitutions: list[Line] = field(default_factory=list)
    """The `$(...)` commands the line runs to build its words."""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.number}: {self.text}"

    @property
    def command(self) -> str:
        """The first word: `make`, `aws`, `wildrydes-stream`, ..."""
        return self.stages[0].words[0] if self.stages and self.stages[0].words else ""


def doc_lines() -> list[Line]:
    lines = []
    for path in DOCS:
        text = path.read_text()
        for block in _BLOCK.finditer(text):
            first = text.count("\n", 0, block.start(2)) + 1
            raw = block.group(2).splitlines()
            i = 0
            while i < len(raw):
                number = first + i
                joined = raw[i]
                while joined.rstrip().endswith("\\") and i + 1 < len(raw):
                    i += 1
                    joined = joined.rstrip()[:-1] + " " + raw[i].strip()
                i += 1
                if joined.strip() and not joined.strip().startswith("#"):
                    lines.append(parse(path, number, joined.strip()))
    return lines


def parse(path: Path, number: int, text: str) -> Line:
    substitutions = [parse(path, number, inner) for inner in _SUBSTITUTION.findall(text)]
    # What a substitution prints stands in as one word the tests know by its name.
    words = shlex.split(_SUBSTITUTION.sub("SUBSTITUTED", text), comments=True)
    shown = " ".join(shlex.split(text, comments=True)) if not substitutions else text
    background = bool(words) and words[-1] == "&"
    if background:
        words = words[:-1]
    assignments: dict[str, str] = {}
    if words and words[0] == "export":
        for word in words[1:]:
            name, _, value = word.partition("=")
            assignments[name] = value
        return Line(path, number, shown, assignments, [Stage(["export"])], False, substitutions)
    while words and (match := _ASSIGNMENT.match(words[0])):
        assignments[match.group(1)] = match.group(2)
        words = words[1:]
    stages = []
    current: list[str] = []
    stdin = stdout = None
    rest = iter(words)
    for word in rest:
        if word == "|":
            stages.append(Stage(current, stdin, stdout))
            current, stdin, stdout = [], None, None
        elif word == "<":
            stdin = next(rest)
        elif word == ">":
            stdout = next(rest)
        else:
            current.append(word)
    stages.append(Stage(current, stdin, stdout))
    return Line(path, number, shown, assignments, stages, background, substitutions)


def expand(word: str, variables: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced by the variable's value (unknown names stay)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), word)
