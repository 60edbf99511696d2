"""The wheel and the image are built from pyproject.toml's package list: a package folder missing
from it would be missing in the agent and the sidecar (as ModuleNotFoundError at run time)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = project["package-dir"]
    listed = set(project["packages"])
    found = {".".join([top, *init.relative_to(ROOT / folder).parent.parts])
             for top, folder in dirs.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "these are listed but have no __init__.py"
