"""The package's metadata (setup.cfg): what a user's environment and a packager are promised."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _options():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_no_dependency_is_pinned_to_one_version():
    """distributed==2026.8.0 froze dask in the user's whole napari environment."""
    requires = [line.strip() for line in _options()["options"]["install_requires"].splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert requires and not [r for r in requires if "==" in r]


def test_napari_and_python_floors_are_ones_the_panel_runs_on():
    """napari 0.5-0.8 satisfied 'napari>=0.5' and the panel failed as it opened (viewer.canvas);
    napari >= 0.9 needs Python >= 3.11."""
    options = _options()["options"]
    assert "napari>=0.9" in options["install_requires"].split()
    assert options["python_requires"].strip() == ">=3.11"


def test_the_licence_ships():
    metadata = _options()["metadata"]
    assert metadata["license_files"].strip() == "LICENSE" and (ROOT / "LICENSE").read_text().startswith("MIT License")
