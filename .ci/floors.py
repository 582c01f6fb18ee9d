"""Install the lowest declared versions of the direct dependencies and run the tests.

A fresh ``pip install`` takes the newest release of every dependency, so a
floor in ``pyproject.toml`` that is too low (``websockets>=14`` for code
that passes ``proxy=``, which websockets 15 added) goes unnoticed until a
user installs into an environment that already holds the old version. This
script makes the floors true by testing them:

1. it reads ``[project] dependencies`` and the ``dev`` extra from
   ``pyproject.toml`` (so a dependency anyone adds is covered), keeps those
   whose environment marker applies here, and pins each to its lower bound
   (``websockets>=15`` becomes ``websockets==15``; a requirement without a
   ``>=`` or ``==`` bound is an error: every direct dependency needs one);
2. it creates a virtual environment (default ``.venv-floors``) and installs
   the project with those pins in one resolution (indirect dependencies get
   whatever the resolver picks), then checks that every pin was installed
   as asked;
3. it runs pytest there with the arguments after ``--`` (default: the fast
   tests, ``-m "not slow"``).

Run it through ``make test-floors``; ``--print`` only shows the pins.
Exit status: pytest's, or 2 when the pins cannot be computed or installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev",)
DEFAULT_PYTEST_ARGS = ["-q", "-m", "not slow", "-p", "no:cacheprovider"]


class FloorError(Exception):
    """A requirement whose floor cannot be pinned; ``str()`` names it."""


def floor_pin(requirement: str) -> str | None:
    """``name[extras]==lowest`` for one requirement, ``None`` if its marker excludes us.

    The lowest version is the one of ``>=`` (or ``==``, ``~=``) in the
    specifier; the extras are kept, since they can add dependencies.
    """
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(default_environment() | {"extra": ""}):
        return None
    lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if not lows:
        raise FloorError(
            f"{requirement!r} has no lower bound; give it one (>=) that the tests pass with"
        )
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}=={max(lows, key=Version)}"


def floor_pins(pyproject: Path, extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """The pins for ``[project] dependencies`` and the ``extras`` of ``pyproject``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    pins: dict[str, Requirement] = {}
    for requirement in requirements:
        pin = floor_pin(requirement)
        if pin is None:
            continue
        req = Requirement(pin)
        name = canonicalize_name(req.name)
        if name in pins:
            # Listed twice (say, in dependencies and in the dev extra): the
            # higher floor is the one that holds, with both sets of extras.
            other = pins[name]
            req.extras |= other.extras
            if _floor(other) > _floor(req):
                req.specifier = other.specifier
        pins[name] = req
    return [str(req) for req in pins.values()]


def _floor(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    versions = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[canonicalize_name(name)] = version
    return versions


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, pytest_args = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-floors")
    parser.add_argument("--print", action="store_true", help="print the pins and exit")
    args = parser.parse_args(argv)
    try:
        pins = floor_pins(ROOT / "pyproject.toml")
    except FloorError as exc:
        print(f"floors: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print("\n".join(pins))
        return 0

    venv: Path = args.venv
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"floors: installing {' '.join(pins)}", flush=True)
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*install, "-e", f"{ROOT}[{','.join(EXTRAS)}]", *pins], cwd=ROOT)
    if done.returncode != 0:
        print(
            "floors: the lowest declared versions cannot be installed together; "
            "raise the floor that pip names above",
            file=sys.stderr,
        )
        return 2
    versions = installed_versions(python)
    wrong = []
    for pin in pins:
        req = Requirement(pin)
        want = _floor(req)
        have = versions.get(canonicalize_name(req.name))
        if have is None or Version(have) != want:
            wrong.append(f"{req.name}: want {want}, have {have}")
    if wrong:
        print(f"floors: not installed as pinned: {'; '.join(wrong)}", file=sys.stderr)
        return 2
    print(f"floors: running pytest {' '.join(pytest_args or DEFAULT_PYTEST_ARGS)}", flush=True)
    return subprocess.run(
        [str(python), "-m", "pytest", *(pytest_args or DEFAULT_PYTEST_ARGS)], cwd=ROOT
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
