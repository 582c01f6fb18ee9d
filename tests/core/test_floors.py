"""The dependency floors CI tests (`.ci/floors.py`): which pins it computes."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def floors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_floors", ROOT / ".ci" / "floors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_floors"] = module
    spec.loader.exec_module(module)
    return module


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    return path


def test_every_direct_dependency_of_the_project_is_pinned_to_its_floor(
    floors: ModuleType,
) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = {Requirement(p).name: p for p in floors.floor_pins(ROOT / "pyproject.toml")}
    for line in declared:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform's variant (mlx on macOS)
        low = next(s.version for s in req.specifier if s.operator == ">=")
        assert pins[req.name].endswith(f"=={low}"), (line, pins[req.name])


def test_pins_keep_extras_skip_other_platforms_and_take_the_higher_floor(
    tmp_path: Path, floors: ModuleType
) -> None:
    pyproject = write(
        tmp_path,
        """
[project]
dependencies = [
    "alpha>=1.2",
    "beta[fast]>=2.0,<3",
    "gamma>=9; sys_platform == 'nonexistent'",
    "delta>=0.5",
]
[project.optional-dependencies]
dev = ["delta[extra]>=0.7", "epsilon~=4.1"]
other = ["zeta>=1"]
""",
    )
    assert floors.floor_pins(pyproject) == [
        "alpha==1.2",
        "beta[fast]==2.0",
        "delta[extra]==0.7",
        "epsilon==4.1",
    ]


def test_a_dependency_without_a_floor_is_an_error(tmp_path: Path, floors: ModuleType) -> None:
    pyproject = write(tmp_path, '[project]\ndependencies = ["alpha>=1", "beta<2"]\n')
    with pytest.raises(floors.FloorError, match="'beta<2' has no lower bound"):
        floors.floor_pins(pyproject)


def test_print_shows_the_pins(floors: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert floors.main(["--print"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == floors.floor_pins(ROOT / "pyproject.toml")
    assert any(pin.startswith("websockets==") for pin in printed)
