"""The `checkpoints` group (configured by `conf/checkpoints/`): what a run's checkpoints are and how to read them.

Every root is a source (`sources`): `discover` finds a folder's checkpoints and tells which are finished, `hub`
does the same for `hf://` repositories and fetches their files; `opened` opens one checkpoint once for everything
the replay asks of it; `weightfiles` (which files hold the weights), `safetensorsfile` (the one safetensors header
parser and reader, local or by byte ranges) and `digest` read and hash safetensors weights, `model_config` reads and
checks a model's config and names its attention route, `statedict` turns what a trainer saved into transformers'
names, with `formats/` (DCP, `torch.save`) and `keymaps/` (one module per trainer). Nothing here imports the
replay, the store or the cluster.
"""
