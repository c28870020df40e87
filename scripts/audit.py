"""Known vulnerabilities in the locked dependencies: pip-audit over the lock files (`make audit`).

    python scripts/audit.py [--strict] LOCK_FILE... [pip-audit options, e.g. --service osv]

pip-audit reads the pinned, hashed versions (no pip, no install) and asks an advisory source:
PyPI's JSON API by default, OSV with `--service osv`. Exit 1 when a locked version has a known
vulnerability. Where the source cannot be reached (a machine whose only way out is a package
mirror) pip-audit skips every package and would still print "No known vulnerabilities found":
this says instead how many packages went unchecked and exits 0, so `make audit` stays usable
offline; with --strict (AUDIT_STRICT=1) an unchecked package is an error, for CI that has
internet. PIP_AUDIT names the pip-audit executable (default: the one beside this Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

UNCHECKED = 3


def main(argv: list[str]) -> int:
    strict = "--strict" in argv
    args = [a for a in argv if a != "--strict"]
    locks = [a for a in args if not a.startswith("-") and Path(a).is_file()]
    options = [a for a in args if a not in locks]
    if not locks:
        print("audit: name at least one lock file", file=sys.stderr)
        return 2
    tool = os.environ.get("PIP_AUDIT") or str(Path(sys.executable).with_name("pip-audit"))
    command = [tool, "--require-hashes", "--disable-pip", "--format", "json"]
    command += ["--progress-spinner", "off", *options]
    for lock in locks:
        command += ["-r", lock]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        print(f"audit: {tool} is not installed: `make audit` installs it", file=sys.stderr)
        return 2
    try:
        report = json.loads(result.stdout)
    except ValueError:
        print(f"audit: pip-audit failed (exit {result.returncode}):\n{result.stderr.strip()}")
        return UNCHECKED if strict else 0
    dependencies = report.get("dependencies", [])
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if "skip_reason" in d]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fixed release"
            print(f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    checked = len(dependencies) - len(skipped)
    if skipped:
        print(
            f"audit: {len(skipped)} of {len(dependencies)} locked packages could not be checked "
            f"({skipped[0]['name']}: {skipped[0]['skip_reason']}); the advisory source is not "
            "reachable from here. Run `make audit` where it is (AUDIT_STRICT=1 in CI), or try "
            "ARGS='--service osv'."
        )
    if vulnerable:
        print(f"audit: {len(vulnerable)} locked packages have known vulnerabilities")
        return 1
    if checked:
        print(f"audit: no known vulnerabilities in {checked} checked packages")
    return UNCHECKED if skipped and strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
