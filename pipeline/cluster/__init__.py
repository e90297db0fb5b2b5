"""The `cluster` group (configured by `conf/cluster/`): where replays run (`dispatch`), on the Dask cluster that
`factories` builds from `cluster.build` or finds at `cluster.address`."""
