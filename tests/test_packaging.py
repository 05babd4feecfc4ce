"""Packaging: the wheel carries the package, its type marker, the license and the console
script; its metadata states the classifiers, the URLs and the onnxruntime extras; the versions
agree everywhere; CI's minimum-versions pins are the declared lower bounds.

The wheel is built from a copy of the sources with pip. With setuptools>=77 installed (the
`test` extra installs it) the build needs no network; without it pip must fetch setuptools,
and when it cannot (offline) the wheel tests skip. Deselect them with -m "not packaging".
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pytest
from packaging.requirements import Requirement

import onnxrep

ROOT = Path(__file__).resolve().parents[1]
FLAVOURS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu", "directml": "onnxruntime-directml",
            "openvino": "onnxruntime-openvino"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _setuptools_major() -> int:
    try:
        return int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "onnxrep", src / "onnxrep", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    local_setuptools = _setuptools_major() >= 77
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out)]
    cmd += ["--no-build-isolation"] if local_setuptools else ["--retries", "0", "--timeout", "15"]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    try:
        proc = subprocess.run(cmd + [str(src)], capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        if local_setuptools:
            raise
        pytest.skip("pip could not build the wheel in 180 s (no setuptools>=77 here; fetching it timed out)")
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "No module named pip" in err:
            pytest.skip("pip is not installed")
        if not local_setuptools and "requirement setuptools" in err:
            pytest.skip("cannot build the wheel here: setuptools>=77 is not installed and pip could not get it")
        pytest.fail(f"pip wheel failed: {err}")
    wheels = list(out.glob("onnxrep-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def _dist_info(zf: zipfile.ZipFile) -> str:
    (d,) = {n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
    return d


def _metadata(zf: zipfile.ZipFile):
    return Parser().parsestr(zf.read(f"{_dist_info(zf)}/METADATA").decode())


@pytest.mark.packaging
def test_wheel_holds_the_package_the_type_marker_and_the_license(wheel):
    names = set(wheel.namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "onnxrep").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert "onnxrep/rules/parallel_add.py" in names
    assert "onnxrep/py.typed" in names
    dist_info = _dist_info(wheel)
    assert dist_info == f"onnxrep-{onnxrep.__version__}.dist-info"
    license_files = [n for n in names if n.startswith(f"{dist_info}/licenses/")]
    assert license_files == [f"{dist_info}/licenses/LICENSE"]
    assert wheel.read(license_files[0]) == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in wheel.read(license_files[0])
    # only the package and its metadata: no tests, models or scripts
    assert {n.split("/")[0] for n in names} == {"onnxrep", dist_info}


@pytest.mark.packaging
def test_wheel_installs_the_console_script(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{_dist_info(wheel)}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"onnxrep": "onnxrep.cli:main"}


@pytest.mark.packaging
def test_wheel_metadata_states_license_classifiers_urls_and_extras(wheel):
    meta = _metadata(wheel)
    project = _pyproject()["project"]
    assert meta["Name"] == "onnxrep"
    assert meta["Version"] == onnxrep.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier")
    assert classifiers == project["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the expression says it
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls["Repository"] == "https://github.com/onnxrep/onnxrep"
    assert urls["Issues"] == "https://github.com/onnxrep/onnxrep/issues"
    assert "onnx" in meta["Keywords"].split(",")
    assert set(meta.get_all("Provides-Extra")) == set(FLAVOURS) | {"test"}

    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    by_extra = {}
    for r in requires:
        extra = re.search(r'extra == "([^"]+)"', str(r.marker)) if r.marker else None
        by_extra.setdefault(extra.group(1) if extra else None, set()).add(r.name)
    # a plain install must not force one onnxruntime build over another
    assert by_extra[None] == {"onnx", "numpy", "onnx-graphsurgeon"}
    for extra, dist in FLAVOURS.items():
        assert by_extra[extra] == {dist}
    assert {"onnxruntime", "pytest", "hypothesis", "setuptools"} <= by_extra["test"]


def test_version_is_the_same_in_pyproject_package_and_cli():
    assert _pyproject()["project"]["version"] == onnxrep.__version__
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "--version"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"onnxrep {onnxrep.__version__}\n"
    assert proc.stderr == ""


def test_minimum_versions_ci_installs_are_the_declared_lower_bounds():
    project = _pyproject()["project"]
    declared = {}
    for spec in project["dependencies"] + project["optional-dependencies"]["cpu"]:
        req = Requirement(spec)
        (lower,) = [s.version for s in req.specifier if s.operator == ">="]
        declared[req.name] = lower
    pinned = {}
    for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name] = version
    assert pinned == declared
    # every flavour starts at or above the CPU build's lower bound
    cpu_floor = tuple(int(x) for x in declared["onnxruntime"].split("."))
    for extra in FLAVOURS:
        for spec in project["optional-dependencies"][extra]:
            (lower,) = [s.version for s in Requirement(spec).specifier if s.operator == ">="]
            assert tuple(int(x) for x in lower.split(".")) >= cpu_floor, spec
