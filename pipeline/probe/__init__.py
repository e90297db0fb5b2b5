"""The `probe` group (configured by `conf/probe/`): the token batch every checkpoint is measured on.

`batch` builds it (random tokens, a token file, or text) and names its store group; `text` reads a text probe's
documents and packs them into rows; `tokenizer` finds the run's tokenizer and notices one that changes between
checkpoints.
"""

from .batch import build_probe, open_store, probe_attrs

__all__ = ["build_probe", "open_store", "probe_attrs"]
