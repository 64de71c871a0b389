"""The npe2 manifest: valid, installed, its commands importable, and cheap to import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import napari_boltzformer

PACKAGE = Path(napari_boltzformer.__file__).parent
TOP = PACKAGE.parent


def test_manifest_is_a_relative_symlink_to_the_top_level_one():
    link = PACKAGE / "napari.yaml"
    assert link.is_symlink()
    assert os.readlink(link) == "../napari.yaml"
    assert link.resolve() == (TOP / "napari.yaml").resolve()


def test_manifest_validates_with_its_imports():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(TOP / "napari.yaml")
    manifest.validate_imports()  # every python_name resolves
    contrib = manifest.contributions
    assert [w.display_name for w in contrib.widgets] == ["BoltzFormer"]
    assert {s.display_name for s in contrib.sample_data} == {
        "Synthetic chest CT (nodules)", "Synthetic brain MRI (MS lesions)",
    }
    reader = contrib.readers[0]
    assert reader.accepts_directories
    assert contrib.writers[0].layer_types == ["labels"]


def test_manifest_file_types_are_the_cores():
    """The reader's patterns are the core's readable extensions (single DICOM files included), no
    more, no fewer; the writer offers NIfTI extensions the core writes."""
    from npe2 import PluginManifest

    from boltzformer.io import DICOM_EXTENSIONS, INPUT_EXTENSIONS, OUTPUT_EXTENSIONS

    contrib = PluginManifest.from_file(TOP / "napari.yaml").contributions
    patterns = contrib.readers[0].filename_patterns
    assert sorted(patterns) == sorted(f"*{ext}" for ext in (*INPUT_EXTENSIONS, *DICOM_EXTENSIONS))
    extensions = contrib.writers[0].filename_extensions
    assert set(extensions) <= set(OUTPUT_EXTENSIONS) and {INPUT_EXTENSIONS[e] for e in extensions} == {"NIfTI"}
    from napari_boltzformer._writer import NIFTI_EXTENSIONS  # what the writer itself takes

    assert tuple(extensions) == NIFTI_EXTENSIONS


def test_npe2_validate_command_accepts_the_installed_plugin():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", "napari-boltzformer"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_reader_writer_and_sample_modules_do_not_import_torch():
    code = (
        "import sys; import napari_boltzformer._reader, napari_boltzformer._writer, "
        "napari_boltzformer._sample_data, napari_boltzformer._layers, napari_boltzformer._widget; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_plugin_modules_import_each_other_without_a_circle_and_stay_small():
    """The house drawn from the plugin's own imports (top level and inside functions) has no
    circle, and no module grows past 600 lines."""
    import ast

    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {node.module for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        assert len(path.read_text().splitlines()) <= 600, path.name

    def visit(module, trail):
        assert module not in trail, " -> ".join([*trail, module])
        for imported in graph.get(module, ()):
            visit(imported, [*trail, module])

    for module in graph:
        visit(module, [])
