"""Installed, not only editable: the wheel carries the DeepSpeed templates and the console command, and a recipe's
`ds_configs/zero3_bf16.json` resolves inside the installed package from any cwd."""

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the wheel with pip, then imports the unpacked wheel in a child process
REPO = Path(__file__).resolve().parents[2]

TEMPLATES = sorted(p.name for p in (REPO / "coconut_scale" / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel .` builds, from a copy of the sources (the build must not write into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "coconut_scale", src / "coconut_scale", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(dist), "."], cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = dist.glob("coconut_scale-*.whl")
    return path


def test_wheel_ships_the_ds_configs_and_the_console_command(wheel):
    assert len(TEMPLATES) >= 6
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {f"coconut_scale/ds_configs/{t}" for t in TEMPLATES} <= names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = configparser.ConfigParser()
        scripts.read_string(z.read(entry_points).decode())
    assert scripts["console_scripts"]["coconut-scale"] == "coconut_scale.cli.main:main"


def test_installed_package_resolves_ds_configs_from_any_cwd(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # a wheel is the site-packages layout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import coconut_scale, pathlib; from coconut_scale.config.recipe import resolve_path; "
             "print(pathlib.Path(coconut_scale.__file__).parent); print(resolve_path('ds_configs/zero3_bf16.json'))")
    # PYTHONPATH comes before the checkout's editable install on sys.path: this runs the unpacked wheel.
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    package, resolved = proc.stdout.split()
    assert package == str(site / "coconut_scale")
    assert resolved == str(site / "coconut_scale" / "ds_configs" / "zero3_bf16.json")
