"""Checks a built image against what the Dockerfile and docs/operating.md say of it, with
buildah: the OCI labels, entrypoint, command, user, port and stop signal in its config; what
it holds (the package and uvloop in /opt/venv, no pip or setuptools there, no compilers, no
sources or wheels left over, an environment the user cannot change); and that the CLI answers
as the entrypoint with `run` by default and other commands as arguments.

    python3 scripts/check-image.py IMAGE [--base NAME] [--revision REV]   (`make image` runs it)

--base is the image it was built FROM (default: the Dockerfile's PYTHON_IMAGE), --revision
the git revision it was built from (default: HEAD). Needs buildah, as root (or under
`buildah unshare`); where the OCI runtime cannot start a container (crun on a cgroup v1
hybrid host), BUILDAH_ISOLATION=chroot. Not part of `make test`: CI has no buildah.
Exits 1 with one line per failed check.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ["python", "-m", "wildrydes_stream"]
LABELS = ("title", "description", "version", "revision", "licenses", "base.name")
USER = "10001:10001"
DATA_DIR = "/var/lib/wildrydes-stream"

# Runs inside the image as its user: what it holds, as JSON.
PROBE = """
import importlib.metadata as md, importlib.util as u, json, os, shutil, stat, sys
import uvloop, wildrydes_stream
site = [p for p in sys.path if p.endswith("site-packages")]
data_dir = sys.argv[1]
data = os.stat(data_dir)
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "prefix": sys.prefix,
    "python": sys.version.split()[0],
    "package": wildrydes_stream.__file__, "version": md.version("wildrydes-stream"),
    "dunder_version": wildrydes_stream.__version__,
    "forbidden_modules": [m for m in ("pip", "setuptools", "wheel", "_distutils_hack")
                          if u.find_spec(m)],
    "site_entries": sorted(n for d in site for n in os.listdir(d)),
    "compilers": [c for c in ("gcc", "cc", "c++", "g++", "clang", "make", "ld") if shutil.which(c)],
    "leftovers": [p for p in ("/build", "/wheels", "/src", "/opt/venv/src") if os.path.exists(p)],
    "venv_writable": os.access("/opt/venv/lib", os.W_OK),
    "data_dir": [data.st_uid, data.st_gid, stat.S_IMODE(data.st_mode)],
    "data_writable": os.access(data_dir, os.W_OK),
}))
"""


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("--base", help="the image it was built FROM")
    parser.add_argument("--revision", help="the git revision it was built from")
    args = parser.parse_args()
    dockerfile = (ROOT / "Dockerfile").read_text()
    default_base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.M)
    base = args.base or (default_base.group(1) if default_base else "")
    revision = (
        args.revision
        or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    with (ROOT / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]

    failures: list[str] = []

    def expect(ok: bool, what: str, detail: str = "") -> None:
        print(("ok   " if ok else "FAIL ") + what + ("" if ok or not detail else f": {detail}"))
        if not ok:
            failures.append(what)

    inspected = json.loads(buildah("inspect", "--type", "image", args.image).stdout)
    config: dict[str, Any] = inspected["OCIv1"]["config"]
    labels = config.get("Labels") or {}
    for key in LABELS:
        value = labels.get(f"org.opencontainers.image.{key}", "")
        expect(bool(value.strip()), f"label org.opencontainers.image.{key} = {value!r}")
    expect(labels.get("org.opencontainers.image.title") == "wildrydes-stream", "title")
    expect(labels.get("org.opencontainers.image.version") == version, f"version label is {version}")
    expect(
        labels.get("org.opencontainers.image.revision") == revision, f"revision label is {revision}"
    )
    expect(labels.get("org.opencontainers.image.base.name") == base, f"base.name label is {base}")
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    expect(env.get("WILDRYDES_REVISION") == revision, "WILDRYDES_REVISION is the revision")
    expect(config.get("Entrypoint") == ENTRYPOINT, f"entrypoint {config.get('Entrypoint')}")
    expect(config.get("Cmd") == ["run"], f"command {config.get('Cmd')}")
    expect(config.get("User") == USER, f"user {config.get('User')!r}")
    expect(list(config.get("ExposedPorts") or {}) == ["8080/tcp"], "exposes 8080/tcp only")
    expect(config.get("StopSignal") in (None, "SIGTERM"), "stop signal SIGTERM")
    expect(config.get("WorkingDir") == DATA_DIR, f"working directory {DATA_DIR}")
    size = buildah("images", "--format", "{{.Size}}", args.image).stdout.strip()
    print(f"info size {size}")

    container = buildah("from", "--quiet", "--pull-never", args.image).stdout.strip()
    try:

        def run(*command: str) -> subprocess.CompletedProcess[str]:
            return buildah("run", container, "--", *command, check=False)

        probe = run("python", "-c", PROBE, DATA_DIR)
        expect(probe.returncode == 0, "the probe runs in the image", probe.stderr.strip()[-300:])
        if probe.returncode == 0:
            found = json.loads(probe.stdout)
            print(f"info python {found['python']}, package {found['package']}")
            expect([found["uid"], found["gid"]] == [10001, 10001], "runs as 10001:10001")
            expect(found["prefix"] == "/opt/venv", f"python is /opt/venv's ({found['prefix']})")
            expect(found["package"].startswith("/opt/venv/"), "the package is installed, no source")
            expect(found["version"] == found["dunder_version"] == version, f"package {version}")
            expect(
                not found["forbidden_modules"], "no pip/setuptools", str(found["forbidden_modules"])
            )
            bad = [n for n in found["site_entries"] if re.match(r"(pip|setuptools|wheel)\b", n)]
            expect(not bad, "no pip/setuptools in site-packages", str(bad))
            expect(not found["compilers"], "no compilers", str(found["compilers"]))
            expect(not found["leftovers"], "no build leftovers", str(found["leftovers"]))
            expect(not found["venv_writable"], "the user cannot change /opt/venv")
            expect(
                found["data_dir"] == [10001, 10001, 0o750],
                f"{DATA_DIR} 10001 0750",
                str(found["data_dir"]),
            )
            expect(found["data_writable"], f"{DATA_DIR} writable by the user")

        # The entrypoint with the default command, then with others given as arguments.
        for arguments in (
            ["--help"],
            ["--version"],
            ["run", "--help"],
            ["aggregate", "--help"],
            ["status", "--help"],
            ["settings", "--effective"],
        ):
            done = run(*config.get("Entrypoint", ENTRYPOINT), *arguments)
            expect(
                done.returncode == 0, f"{' '.join(arguments)} exits 0", done.stderr.strip()[-200:]
            )
            if arguments == ["--version"]:
                expect(done.stdout.strip() == version, f"--version prints {version}")
            if arguments == ["settings", "--effective"]:
                expect(
                    f'deadletter_file = "{DATA_DIR}/deadletter.jsonl"' in done.stdout,
                    "the dead-letter file is in the data directory",
                )
                expect("http_port = 8080" in done.stdout, "the HTTP port is 8080")
    finally:
        buildah("rm", container, check=False)

    if failures:
        print(f"check-image: {len(failures)} check(s) failed on {args.image}", file=sys.stderr)
        return 1
    print(f"check-image: {args.image} is as documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
