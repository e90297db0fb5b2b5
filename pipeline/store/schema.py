"""The sink cube's schema, spelled once: the dims of each statistic, the statistics each `replay.measure` group adds,
the `sink` labels, the query bins, and the step coordinates with their dtypes and fill values (docs/data.md,
"Layout"). The writers (`measure`, `replay`, `store`) and the readers (`analysis`, `report`) import it; it imports
numpy only, so reading a cube never loads torch.
"""

from __future__ import annotations

import numpy as np

# The dims of each statistic of one step (the store adds `step` in front).
DIMS = {
    "sink_mass": ("layer", "head"),
    "entropy": ("layer", "head"),
    "learned_sink_mass": ("layer", "head"),
    "sink_mass_by_q": ("layer", "head", "qbin"),
    "key_mass": ("layer", "head", "key"),
    "key_norm_p0": ("layer", "kv_head"),
    "value_norm_p0": ("layer", "kv_head"),
    "key_norm": ("layer", "kv_head"),
    "value_norm": ("layer", "kv_head"),
    "resid_norm_p0": ("layer",),
    "resid_norm": ("layer",),
    "resid_max_p0": ("layer",),
    "resid_median": ("layer",),
    # replay.measure: outputs
    "attn_out_norm_p0": ("layer",),
    "attn_out_norm": ("layer",),
    "mlp_out_norm_p0": ("layer",),
    "mlp_out_norm": ("layer",),
    # replay.measure: similarity
    "p0_similarity": ("layer",),
    "rest_similarity": ("layer",),
    # replay.measure: mixing
    "collapse": ("layer", "sink"),
    "sensitivity": ("layer", "sink"),
}
# The statistics each group of replay.measure adds to a cube, in the order the measurement computes them.
MEASURED = {
    "outputs": ("attn_out_norm_p0", "attn_out_norm", "mlp_out_norm_p0", "mlp_out_norm"),
    "similarity": ("p0_similarity", "rest_similarity"),
    "mixing": ("collapse", "sensitivity"),
}
# Every replay.measure group: those above, and `loss`, the training loss discovery reads into the `loss` coordinate.
MEASURE_GROUPS = (*MEASURED, "loss")
# Statistics stored only where the model has them (learned sink logits) or replay.measure asks for them.
OPTIONAL = frozenset({"learned_sink_mass", *(name for names in MEASURED.values() for name in names)})
SINK_LABELS = ("kept", "removed")  # the `sink` coordinate of collapse and sensitivity

# A step's `status`.
PENDING, DONE, FAILED = "pending", "done", "failed"
# Variable-length UTF-8 strings (zarr v3 "string"): no fixed width to outgrow, and no warning on write or read, unlike
# numpy "U" arrays, which zarr 3.1 stores as an unspecified fixed-width type with an UnstableSpecificationWarning.
STRING = np.dtypes.StringDType()
FLOAT = np.dtype(np.float64)
# The coordinates along `step` besides `step` itself: name -> (dtype, the value of a step not written yet).
STEP_COORDS = {
    "tokens_seen": (FLOAT, np.nan),  # what the checkpoint says about its step; NaN where it does not say
    "loss": (FLOAT, np.nan),
    "status": (STRING, PENDING),
    "error": (STRING, ""),  # why a step failed
    "weights_digest": (STRING, ""),  # pipeline/checkpoints/digest.py
    # how the step was replayed (pipeline/replay/step.py): "whole" or "layered" (block by block), on which device,
    # with the weights in which dtype
    "replay_route": (STRING, ""),
    "replay_device": (STRING, ""),
    "replay_dtype": (STRING, ""),
}
NUMERIC_STEP_COORDS = tuple(name for name, (dtype, _) in STEP_COORDS.items() if dtype == FLOAT)
STRING_STEP_COORDS = tuple(name for name, (dtype, _) in STEP_COORDS.items() if dtype == STRING)
# The step coordinates a step's Dataset carries itself, as scalar coordinates; empty until the step is done.
REPLAY_COORDS = ("weights_digest", "replay_route", "replay_device", "replay_dtype")
# The probe's token ids, a coordinate of each group without a step dim: [probe_row, probe_position], int64.
PROBE_TOKENS = "probe_tokens"
PROBE_DIMS = ("probe_row", "probe_position")
# Attributes every step's Dataset must share with its group: one cube, one model.
STEP_ATTRS = ("architecture", "config_fingerprint", "attention_route")


def qbin_edges(seq_len: int) -> np.ndarray:
    """Query-bin edges over positions 1..T-1: [1, 2, 4, ..., T]; bin i holds queries [edges[i], edges[i+1])."""
    if seq_len < 2:
        raise ValueError(f"need at least 2 positions, got {seq_len}")
    edges = [1]
    while edges[-1] * 2 < seq_len:
        edges.append(edges[-1] * 2)
    edges.append(seq_len)
    return np.asarray(edges, dtype=np.int64)
