import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_gama_ir import create_model, load_checkpoint, save_checkpoint
from napari_gama_ir.model import CheckpointError

from .conftest import make_tiny_model


def test_round_trip_gives_identical_outputs(tmp_path):
    model = make_tiny_model(3)
    path = save_checkpoint(model, tmp_path / "tiny", metadata={"steps": 10})
    assert path.name == "tiny.json" and (tmp_path / "tiny.safetensors").is_file()
    loaded = load_checkpoint(path)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.config.metadata["steps"] == 10
    record = json.loads(path.read_text())
    assert record["config"]["width"] == 8 and len(record["weights_sha256"]) == 64
    # The registry accepts checkpoint paths too, given as weights, config or folder.
    for given in (tmp_path / "tiny.safetensors", str(path), tmp_path):
        assert create_model(str(given)).config == loaded.config


def test_half_precision_storage_loads_as_float32(tmp_path):
    model = make_tiny_model(1)
    save_checkpoint(model, tmp_path / "half", half=True)
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "half.safetensors").values())
    loaded = load_checkpoint(tmp_path / "half.json")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-2)


def test_tampered_weights_are_refused(tmp_path):
    save_checkpoint(make_tiny_model(1), tmp_path / "m")
    tensors = load_file(tmp_path / "m.safetensors")
    tensors["intro.bias"] += 1
    save_file(tensors, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(tmp_path / "m.json")


def test_config_and_tensors_that_disagree_are_refused(tmp_path):
    path = save_checkpoint(make_tiny_model(1), tmp_path / "m")
    record = json.loads(path.read_text())
    record["config"]["width"] = 16  # the hash still matches: the shapes must be checked
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="tensors disagree with the config.*other shapes"):
        load_checkpoint(path)
    record["config"]["width"] = 8
    record["config"]["middle_blocks"] = 2
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a napari-gama-ir checkpoint"):
        load_checkpoint(tmp_path / "other.json")
    path = save_checkpoint(make_tiny_model(1), tmp_path / "m")
    (tmp_path / "m.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file"):
        load_checkpoint(path)


def test_a_pickle_is_never_loaded(tmp_path):
    # A torch.save pickle renamed to .safetensors must be rejected, not unpickled.
    path = save_checkpoint(make_tiny_model(1), tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(path, verify_hash=False)
