"""The lock files: every dependency pinned with hashes, current with pyproject.toml, and the
audit wrapper's verdicts (pip-audit itself needs an advisory source: `make audit`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import support as d

LOCK = d.ROOT / "requirements.lock"
BUILD_LOCK = d.ROOT / "requirements-build.lock"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)} of a lock file in pip's requirements format."""
    found: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        match = ENTRY.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            assert current not in found, f"{path.name}: {current} twice"
            found[current] = (match.group(2), [])
        elif line.strip().startswith("--hash=sha256:"):
            digest = line.strip().removeprefix("--hash=sha256:").rstrip(" \\")
            assert re.fullmatch(r"[0-9a-f]{64}", digest), line
            found[current][1].append(digest)
    return found


def pyproject() -> dict[str, object]:
    with (d.ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = pyproject()
    locked = pins(LOCK)
    assert locked
    for name, (version, hashes) in locked.items():
        assert hashes, f"{name}=={version} has no --hash: pip --require-hashes would refuse it"
    dependencies = project["project"]["dependencies"]  # type: ignore[index]
    for text in dependencies:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in requirements.lock: make lock"
        version = locked[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock has {name}=={version}, pyproject.toml wants {requirement}: "
            "make lock"
        )
    # The build backend the image builds the package with.
    build = pins(BUILD_LOCK)
    for text in project["build-system"]["requires"]:  # type: ignore[index]
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in build, f"{requirement.name} is not in requirements-build.lock"
        assert requirement.specifier.contains(build[name][0])
        assert build[name][1]
    # The runtime lock ships: no build tools or test tools in it.
    assert not {"pip", "setuptools", "pytest", "moto", "mypy"} & set(locked)


def test_the_lock_is_what_make_lock_resolves_from_pyproject(tmp_path: Path) -> None:
    """scripts/lock.sh (what `make lock` runs), given the committed locks as the versions to
    keep, must pin exactly what they pin: else pyproject.toml changed without `make lock`."""
    uv = Path(sys.executable).with_name("uv")
    if not uv.is_file():
        pytest.fail("uv is not installed: it is a test dependency, pip install -e '.[test]'")
    for path in (LOCK, BUILD_LOCK):
        shutil.copy(path, tmp_path / path.name)
    result = subprocess.run(
        ["sh", str(d.ROOT / "scripts" / "lock.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "UV": str(uv)},
    )
    assert result.returncode == 0, result.stderr
    for path in (LOCK, BUILD_LOCK):
        fresh = {name: version for name, (version, _) in pins(tmp_path / path.name).items()}
        committed = {name: version for name, (version, _) in pins(path).items()}
        assert fresh == committed, f"{path.name} is out of date with pyproject.toml: make lock"


def _audit(tmp_path: Path, report: Mapping[str, object], *args: str) -> tuple[int, str]:
    """scripts/audit.py with a stand-in pip-audit that answers `report` (no advisory source
    is reachable from a test)."""
    stub = tmp_path / "pip-audit"
    stub.write_text(f"#!{sys.executable}\nprint({json.dumps(json.dumps(report))})\n")
    stub.chmod(0o755)
    result = subprocess.run(
        [sys.executable, str(d.ROOT / "scripts" / "audit.py"), *args, str(LOCK)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PIP_AUDIT": str(stub)},
    )
    return result.returncode, result.stdout + result.stderr


def test_audit_fails_on_a_vulnerability_and_says_when_nothing_could_be_checked(
    tmp_path: Path,
) -> None:
    clean = {"dependencies": [{"name": "orjson", "version": "1", "vulns": []}]}
    assert _audit(tmp_path, clean)[0] == 0
    vulnerable = {
        "dependencies": [
            {"name": "orjson", "version": "1", "vulns": [{"id": "PYSEC-1", "fix_versions": ["2"]}]}
        ]
    }
    code, out = _audit(tmp_path, vulnerable)
    assert code == 1
    assert "VULNERABLE orjson 1: PYSEC-1 (fixed in 2)" in out
    # No advisory source: pip-audit skips everything (and would say "No known
    # vulnerabilities found"); the wrapper says nothing was checked, exits 0 offline and
    # non-zero when told to be strict.
    unreachable = {
        "dependencies": [
            {"name": "orjson", "version": "1", "skip_reason": "Dependency not found on PyPI"}
        ]
    }
    code, out = _audit(tmp_path, unreachable)
    assert code == 0
    assert "1 of 1 locked packages could not be checked" in out
    assert "no known vulnerabilities" not in out
    assert _audit(tmp_path, unreachable, "--strict")[0] != 0
