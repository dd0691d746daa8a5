"""The distribution ships what an installed (pipx, wheel) copy needs: every package, and the
launch-at-login templates from `installers/` as `sidecar.installers`; and such a copy's
`autostart install` points at its own executables."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("mtls_sidecar-*.whl")
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("sidecar", "tray")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"sidecar.installers"} == listed


def test_the_wheel_carries_the_installer_templates(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {
        f"sidecar/installers/{path.relative_to(ROOT / 'installers').as_posix()}"
        for path in (ROOT / "installers").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert templates and templates <= names
    assert "sidecar/autostart/plan.py" in names and "tray/app.py" in names


def test_a_venv_install_points_autostart_at_its_own_executables(wheel: Path, tmp_path: Path) -> None:
    """What pipx does: a venv of its own with the wheel installed (dependencies here come
    from the system site-packages, to stay offline and quick)."""
    venv = tmp_path / "venv with space"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "HOME": str(tmp_path / "user")}
    done = subprocess.run(
        [str(venv / "bin" / "mtls-sidecar"), "autostart", "install", "--method", "xdg"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the checkout: the installed copy's templates must be found
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    entry = Path(os.environ["XDG_CONFIG_HOME"]) / "autostart" / "mtls-sidecar-daemon.desktop"
    exec_line = next(line for line in entry.read_text().splitlines() if line.startswith("Exec="))
    assert exec_line.startswith(f'Exec="{venv}/bin/mtls-sidecar" --home ')
