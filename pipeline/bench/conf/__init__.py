"""The benchmark's Hydra config (`bench.yaml` and the `bench_preset` group), shipped as `pipeline.bench.conf`."""
