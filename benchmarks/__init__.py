"""`python -m benchmarks`: how fast and how lean sinktrace's replay is, against what else one could do.

One run builds its own checkpoints (random weights of a Llama-style model, saved as safetensors, reused by later
runs) and measures, on the same checkpoints and the same probe, for each probe length:

1. **sinktrace**: `pipeline.replay.replay` of each of N checkpoints, end to end (read, build, probe forward with
   the log-sum-exp statistics), and the statistics forward alone with the weights already on the device;
2. **eager** (the usual alternative): per checkpoint `AutoModelForCausalLM.from_pretrained(folder,
   attn_implementation="eager")` and a forward with `output_attentions=True`, reducing the returned T x T
   matrices to sink mass and entropy; end to end and forward alone;
3. **sdpa** (the compute floor): a plain forward with PyTorch's fused attention, no statistics, weights on the device;
4. **read** (the read floor): reading the checkpoints' weight files from a cold page cache, in bytes per second.

It prints one table (time per checkpoint, ratios against 2, 3 and 4, peak host and device memory) and writes it as
JSON. Presets: benchmarks/conf/bench_preset/ (gpu: the default, cpu, smoke). Timings are wall-clock seconds;
each contender runs in a fresh subprocess by default (`isolate`), so that its peak host memory is its own.

Modules: `command` (the Hydra command and the run), `fixtures` (the checkpoints and probes it builds), `jobs`
(running a contender in a subprocess, timing, peak memory), `contenders` (what each contender does), `pagecache`
(cold page cache and the read floor), `tables` (the JSON document, the targets and the printed table).

`python -m benchmarks.objectstore` (`objectstore`, `latency_proxy`) measures reading from object storage on its own:
one tensor at a time against several requests in flight, with a bucket's latency injected on the loopback.
"""

LOG_PREFIX = "sinktrace bench:"
GIB = 2**30


def gib(n) -> float:
    return float(n) / GIB
