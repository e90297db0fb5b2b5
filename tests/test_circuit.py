"""A hand-built P0 circuit: the first block's MLP writes one fixed, large vector at position 0 and nothing elsewhere.
The measurement and the analysis must find the writer there, and recognise position zero from that block on."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import analysis as an
from pipeline.checkpoints.model_config import attention_route, config_fingerprint
from pipeline.replay.measure import measure
from pipeline.replay.step import to_dataset
from tests.test_families import VOCAB, build, probe

pytestmark = pytest.mark.usefixtures("one_thread")


class P0Writer(nn.Module):
    """An MLP that ignores its input: a fixed vector at position 0, zero at every other position."""

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.register_buffer("vector", vector)

    def forward(self, x):
        out = torch.zeros_like(x)
        out[:, 0] = self.vector
        return out


def test_hand_built_writer_is_found_in_the_first_block():
    model = build("llama")
    torch.manual_seed(1)
    vector = torch.randn(model.config.hidden_size)
    model.model.layers[0].mlp = P0Writer(1e4 * vector / vector.norm())
    ids = probe()
    ids[:, 0] = [7, 19, 42]  # a different first token in every row
    stats = measure(model, ids, batch_size=2, measures=("outputs", "similarity"))

    np.testing.assert_allclose(stats["mlp_out_norm_p0"][0], 1e4, rtol=1e-6)
    assert stats["mlp_out_norm"][0] == 0
    # any first token: the same state after block 0 (up to the rest of the block, 1e-3 of its norm)
    assert stats["p0_similarity"][0] > 1 - 1e-5
    assert stats["rest_similarity"][0] < 0.5  # the other positions keep their content

    attrs = {
        "architecture": model.config.model_type,
        "config_fingerprint": config_fingerprint(model.config.to_dict()),
        "attention_route": attention_route(model),
    }
    ds = to_dataset(stats, attrs, ids.shape[1]).expand_dims(step=[0, 100])
    ds.attrs["probe_first_token"] = "random"
    np.testing.assert_array_equal(an.circuit_writer(ds).values, [0.5, 0.5])  # layer 0's MLP
    assert float(an.writer_settle_step(ds)) == 0
    assert float(an.recognition_step(ds)) == 0
    assert float(an.circuit_share(ds).isel(step=0)) > 0.99


def test_without_the_writer_position_zero_is_not_recognised():
    model = build("llama")
    ids = probe()
    ids[:, 0] = [7, 19, 42]
    stats = measure(model, ids, batch_size=2, measures=("similarity",))
    assert stats["p0_similarity"].max() < 0.9
    assert np.all(stats["p0_similarity"] < 1 - 1e-3)
    assert VOCAB > 42
