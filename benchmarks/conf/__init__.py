"""The benchmark's Hydra config (`bench.yaml` and the `bench_preset` group), the package `benchmarks.conf`."""
