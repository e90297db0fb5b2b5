"""The `cluster` group (configured by `conf/cluster/`): where replays run, on a Dask cluster."""
