"""The tensors already carry transformers' names (a Hugging Face model saved by DCP, FSDP or torch.save).

torch.compile's `_orig_mod.` prefix is dropped, as transformers' own loading does not know it.
"""

SIGNATURE = r"."


def rules(config):
    from . import Rule

    return [Rule(r"(?:_orig_mod\.)?(.+)", "{0}")]
