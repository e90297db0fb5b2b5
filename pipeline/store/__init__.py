"""The `store` group (configured by `conf/store/`): the Zarr cube of sink statistics.

`schema` is the cube's schema (imported by writers and readers alike, it imports numpy only), `cube` writes it
(one writer, one step per chunk, kill-safe) and opens it (`open_sinks`), `lock` keeps a second writer out.
"""
