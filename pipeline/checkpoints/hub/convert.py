"""A revision's pickled weights as a safetensors copy for replay."""

from __future__ import annotations

import json
import os
import shutil

from ...errors import CheckpointError, describe
from ...locations import read_bytes
from ..weightfiles import CONFIG_NAME, SAFE_WEIGHTS_NAME, shard_names
from .revisions import PICKLE_INDEX, PICKLE_WEIGHTS


def convert(snapshot: str, fetched: list[str], folder: str) -> None:
    """Pickled weights -> model.safetensors beside a copy of config.json, read with weights_only=True (no
    code runs while unpickling); `fetched`: the revision's files fetched, `snapshot`: the folder holding them."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(folder, SAFE_WEIGHTS_NAME)):  # converted by an earlier run
        return
    names = [PICKLE_WEIGHTS] if PICKLE_WEIGHTS in fetched else index_shards(os.path.join(snapshot, PICKLE_INDEX))
    state, seen = {}, set()
    for name in names:
        path = os.path.join(snapshot, name)
        try:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # files saved before torch 1.6 (not zip) cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(path, f"torch.load(weights_only=True) cannot read it: {describe(e)}") from None
        for key, tensor in part.items():
            # safetensors stores no shared storage: a tied weight is written as its own copy
            ptr = tensor.untyped_storage().data_ptr()
            state[key] = tensor.clone() if ptr in seen else tensor.contiguous()
            seen.add(ptr)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copyfile(os.path.join(snapshot, CONFIG_NAME), os.path.join(tmp, CONFIG_NAME))
    save_file(state, os.path.join(tmp, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def index_shards(index_path: str) -> list[str]:
    try:  # its size is checked against checkpoints.max_read_size before it is read
        return shard_names(json.loads(read_bytes(index_path).decode("utf-8")))
    except ValueError as e:
        raise CheckpointError(index_path, f"{os.path.basename(index_path)} is unusable: {e}") from None
