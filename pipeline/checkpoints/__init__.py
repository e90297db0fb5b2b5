"""The `checkpoints` group (configured by `conf/checkpoints/`): what a run's checkpoints are and how to read them.

Every root is a source (`sources`): `discover` finds a folder's checkpoints and tells which are finished, `hub`
does the same for `hf://` repositories and fetches their files; `weightfiles`, `ranged` and `digest` read and hash
safetensors weights, `model_config` reads and checks a model's config, `statedict` turns what a trainer saved into
transformers' names, with `formats/` (DCP, `torch.save`) and `keymaps/` (one module per trainer). Nothing here
imports the replay, the store or the cluster.
"""
