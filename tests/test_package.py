import subprocess
import sys

import napari_gama_ir

BLOCK_GUI = (
    "import sys\n"
    "for name in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'npe2'):\n"
    "    sys.modules[name] = None  # any import of these now fails\n"
    "import napari_gama_ir, napari_gama_ir.cli, napari_gama_ir.engine, napari_gama_ir.model, napari_gama_ir.train\n"
    "from napari_gama_ir import create_model, restore\n"
    "print('core ok')\n"
)


def test_core_imports_without_napari_or_qt():
    result = subprocess.run([sys.executable, "-c", BLOCK_GUI], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "core ok"


def test_public_api_is_at_the_top_level():
    for name in ("create_model", "restore", "load_checkpoint", "save_checkpoint", "list_models", "GamaIRConfig"):
        assert hasattr(napari_gama_ir, name)
