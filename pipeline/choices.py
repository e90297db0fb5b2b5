"""The values a config key may take where it names one of a fixed set, each list written once: `settings.check`
refuses what is not here, and the module that acts on the value reads the same list. It imports nothing, so the
check never loads torch.
"""

from __future__ import annotations

# replay.dtype: the names, then the other spellings of each (what torch and the usual short forms call them)
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp64": "float64",
    "double": "float64",
}
FIRST_TOKENS = ("auto", "keep", "bos", "random")  # probe.first_token: pipeline/probe/
PACKINGS = ("document", "stream")  # probe.packing (probe=text): pipeline/probe/text.py
CHECKPOINT_FORMATS = (
    "auto",
    "hf",
    "dcp",
    "torch",
)  # checkpoints.format: pipeline/checkpoints/ (discover, formats/)


def dtype_name(dtype) -> str:
    """`replay.dtype` as one of DTYPES: any case, an alias, or torch's spelling ("torch.float16").

    Raises:
        ValueError: a name that is none of these.
    """
    name = str(dtype).lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"replay.dtype={dtype}: choose from {', '.join(DTYPES)}")
    return name
