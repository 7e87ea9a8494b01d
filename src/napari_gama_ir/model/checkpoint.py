"""Safe checkpoints: a ``.safetensors`` weights file plus a JSON config beside it.

Nothing is ever unpickled: tensors come from safetensors, everything else from JSON. The JSON
records the weights file's SHA-256, so a weights file that was swapped or edited is refused, and
the tensors' names and shapes are checked against the architecture the config describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import GamaIRConfig
from .network import GamaIR

FORMAT = "napari-gama-ir checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or its config and tensors disagree."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_path(path: str | os.PathLike) -> Path:
    """The JSON file of a checkpoint given as its JSON, its weights, its stem or its folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected exactly one checkpoint .json in the folder, found {len(found)}")
        return found[0]
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


def save_checkpoint(
    model: GamaIR,
    path: str | os.PathLike,
    *,
    half: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as ``<stem>.safetensors`` and ``<stem>.json``; return the JSON path.

    Parameters
    ----------
    model : GamaIR
        The network; its config is stored in full.
    path : path-like
        Stem, ``.json`` or ``.safetensors`` path of the checkpoint.
    half : bool
        Store the tensors as float16 (half the size; loading casts back to float32).
    metadata : dict, optional
        Merged into the config's ``metadata`` (training data, steps, metrics...).
    """
    config_path = _config_path(path)
    weights_path = config_path.with_suffix(".safetensors")
    config = model.config
    if metadata:
        config = config.replace(metadata={**config.metadata, **metadata})
    dtype = torch.float16 if half else torch.float32
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    # Write both files under temporary names first, so a crash never leaves a half checkpoint.
    tmp_weights = weights_path.with_name(weights_path.name + ".tmp")
    save_file(tensors, str(tmp_weights))
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "gama_ir",
        "config": config.to_dict(),
        "weights": weights_path.name,
        "weights_sha256": file_sha256(tmp_weights),
        "dtype": str(dtype).removeprefix("torch."),
    }
    tmp_config = config_path.with_name(config_path.name + ".tmp")
    tmp_config.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)
    return config_path


def read_checkpoint_record(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read and check a checkpoint's JSON; return it and the weights path."""
    config_path = _config_path(path)
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: checkpoint config not found")
    try:
        record = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: not a readable JSON checkpoint config ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not a {FORMAT} config")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: unsupported checkpoint version {record.get('format_version')}")
    weights_path = config_path.parent / str(record.get("weights", ""))
    if not weights_path.is_file():
        raise CheckpointError(f"{config_path}: weights file {weights_path.name!r} not found beside it")
    return record, weights_path


def load_checkpoint(path: str | os.PathLike, *, verify_hash: bool = True) -> GamaIR:
    """Build the network a checkpoint describes and load its weights (float32, eval mode).

    Raises
    ------
    CheckpointError
        If a file is missing or unreadable, the weights' hash differs from the one recorded, or
        the tensors' names or shapes do not match the architecture of the config.
    """
    record, weights_path = read_checkpoint_record(path)
    if verify_hash and file_sha256(weights_path) != record.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path}: weights do not match their config (SHA-256 differs); refusing to load"
        )
    try:
        config = GamaIRConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{weights_path.with_suffix('.json')}: bad config ({error})") from None
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({error})") from None
    model = GamaIR(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        reshaped = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            details.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if reshaped:
            n = reshaped[0]
            details.append(f"{len(reshaped)} with other shapes (e.g. {n}: {found[n]} vs {expected[n]})")
        raise CheckpointError(f"{weights_path}: tensors disagree with the config: " + ", ".join(details))
    model.load_state_dict({name: t.float() for name, t in tensors.items()})
    model.checkpoint_sha256 = record["weights_sha256"]
    return model.eval()
