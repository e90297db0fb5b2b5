"""That the model a config describes is the network a checkpoint's tensors hold, checked before any replay.

A config given by hand (`checkpoints.model_config`) or found in a run folder may describe another network than the
one the trainer saved: other head counts or head dims, another vocabulary, biases the checkpoint lacks or holds,
an output head tied to the embeddings where the trainer trained its own. The model is built on the meta device
(no memory, no random init) and the key map is planned over the checkpoint's tensor names and shapes (its metadata
only), with the loader's own checks: nothing missing, unexpected or of the wrong shape. A tied head is compared
with the checkpoint's own: the two tensors are read, nothing else. Head counts that multiply to the same widths
leave no trace in the shapes; those only the config can say.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, describe
from .load import check_state_dict, mapped_config, parameters_on_meta, quiet_transformers

EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


class Misfit(CheckpointError):
    """The model config describes another network than this checkpoint's tensors (the tensors themselves could be
    read): the config's fault when no checkpoint of the run fits it, this checkpoint's when another one does."""


def check_fits(opened, trust_remote_code: bool) -> None:
    """That `opened` (a checkpoint read through its key map) fills the model its config describes exactly.

    Raises:
        Misfit: naming the config and the first disagreement.
        CheckpointError: the checkpoint's tensors cannot be listed (a damaged or refused file).
    """
    from transformers import AutoModelForCausalLM

    config = mapped_config(opened, trust_remote_code)
    where = opened.config_path
    try:
        plan = opened.plan
    except RuntimeError as e:  # a layout change (a head permutation, a split) that the config's shapes do not allow
        raise Misfit(
            where, f"the key map cannot lay out the checkpoint's tensors for this model config: {describe(e)}"
        ) from None
    try:
        with parameters_on_meta(), quiet_transformers():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise Misfit(where, f"transformers could not build the model: {describe(e)}") from e
    try:
        check_state_dict(opened.path, plan.outputs, model)
    except CheckpointError as e:
        raise Misfit(where, f"the model config does not fit the checkpoint's tensors: {e.problem}") from None
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in plan.outputs:
        _check_tied(opened, plan, where)


def _check_tied(opened, plan, where: str) -> None:
    embedding = next((name for name in EMBEDDINGS if name in plan.outputs), None)
    if embedding is None:
        return
    wanted = plan.feeding([embedding, "lm_head.weight"])
    tensors = plan.subset(opened.saved.tensors(wanted), [embedding, "lm_head.weight"])
    if not torch.equal(tensors[embedding], tensors["lm_head.weight"]):
        raise Misfit(
            where,
            "the model config ties the output head to the embeddings (tie_word_embeddings), but the checkpoint's "
            "head differs from its embeddings: the trainer trained an untied head",
        )
