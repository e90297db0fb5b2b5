"""A second, independent measurement of the demo run's emergence: layer-0 attention on position 0 from eager
attention (`output_attentions=True`), checked against the demo's recipe by tests/test_demo.py.

`python -m tests.demo_emergence RUN_DIR` (from the repository's root) builds a demo run there and prints its layer-0
emergence table: how the demo's recipe was chosen (see pipeline/demo.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from pipeline.demo import BOS, RECIPE_FILE, BigramBackcopy, DemoRecipe, build_demo_run, demo_batch, demo_task
from pipeline.replay.load import quiet_transformers


def layer0_sink(
    folder: str | Path, task_tokens: torch.Tensor, task: BigramBackcopy, random_tokens: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Attention to position 0 per (layer, head) with eager attention, over queries 1..T-1.

    Returns "all" (task rows, every query), "non_trigger" (task rows, queries whose token is not a trigger) and,
    with `random_tokens`, "random" (those rows, every query).
    """
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()

    def first_column(tokens):
        with torch.no_grad():
            out = model(input_ids=tokens, output_attentions=True, use_cache=False)
        return torch.stack([a[:, :, 1:, 0] for a in out.attentions], dim=1)  # [rows, layer, head, T-1]

    col = first_column(task_tokens)
    keep = torch.from_numpy(~task.is_trigger(task_tokens[:, 1:].numpy()))[:, None, None, :]
    result = {
        "all": col.mean(dim=(0, 3)).numpy(),
        "non_trigger": ((col * keep).sum(dim=(0, 3)) / keep.sum(dim=(0, 3))).numpy(),
    }
    if random_tokens is not None:
        result["random"] = first_column(random_tokens).mean(dim=(0, 3)).numpy()
    return result


def emergence_table(root: str | Path, *, rows: int = 32, probe_seed: int = 0) -> list[dict]:
    """Layer-0 sink (mean over heads) at every checkpoint of a demo run, measured with eager attention."""
    root = Path(root)
    recipe_dict = json.loads((root / RECIPE_FILE).read_text())
    recipe = DemoRecipe(**{k: v for k, v in recipe_dict.items() if k != "recipe_version"})
    task = demo_task(
        vocab_size=recipe.vocab_size,
        n_triggers=recipe.n_triggers,
        trigger_share=recipe.trigger_share,
        branching=recipe.branching,
        concentration=recipe.concentration,
        seed=recipe.seed,
    )
    task_tokens = demo_batch(
        task, batch_size=rows, seq_len=recipe.seq_len, seed=recipe.seed + 10_000, step=0, packing=recipe.packing
    )
    # like pipeline.probe's random probe: uniform ids over the whole vocabulary, then BOS at position 0 (a model
    # trained on stream-packed rows never saw BOS: its rows keep a random first token, like probe.first_token=random)
    random_tokens = np.random.default_rng(probe_seed).integers(0, recipe.vocab_size, size=(rows, recipe.seq_len))
    if recipe.packing == "bos":
        random_tokens[:, 0] = BOS
    table = []
    for step in recipe.schedule():
        folder = root / f"checkpoint-{step}"
        state = json.loads((folder / "trainer_state.json").read_text())
        sink = layer0_sink(folder, task_tokens, task, torch.from_numpy(random_tokens))
        last_log = state["log_history"][-1] if state["log_history"] else {}
        table.append(
            {
                "step": step,
                "all": float(sink["all"][0].mean()),
                "non_trigger": float(sink["non_trigger"][0].mean()),
                "random": float(sink["random"][0].mean()),
                "heads_non_trigger": [round(float(x), 3) for x in sink["non_trigger"][0]],
                "layer1_all": float(sink["all"][1].mean()) if sink["all"].shape[0] > 1 else math.nan,
                "random_layers": [round(float(x), 3) for x in sink["random"].mean(axis=1)],
                "loss_bigram": last_log.get("loss_bigram", math.nan),
                "loss_backcopy": last_log.get("loss_backcopy", math.nan),
            }
        )
    return table


def main(argv=None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Build a demo run and print its layer-0 sink emergence table.")
    parser.add_argument("root", help="the run folder")
    parser.add_argument("--steps", type=int, default=DemoRecipe.steps)
    parser.add_argument("--every", type=int, default=DemoRecipe.every)
    parser.add_argument("--seed", type=int, default=DemoRecipe.seed)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for the measurement (training always runs on one)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override another DemoRecipe field, e.g. --set lr=0.005",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    types = {f.name: f.type for f in dataclasses.fields(DemoRecipe)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            parser.error(f"--set {item}: no DemoRecipe field {key!r}")
        kind = {"float": float, "int": int, "str": str}.get(types[key], types[key])
        overrides[key] = kind(value)
    t0, c0 = time.perf_counter(), time.process_time()
    build_demo_run(
        args.root, steps=args.steps, every=args.every, seed=args.seed, progress=not args.no_progress, **overrides
    )
    build_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    print(f"# {args.root}: built in {build_s:.1f} s wall, {cpu_s:.1f} s CPU, {torch.get_num_threads()} thread(s)")
    print("step   all  non_trig  random  heads(non_trig)  layer1_all  loss_bigram  loss_backcopy  random(layers)")
    for row in emergence_table(args.root):
        print(
            f"{row['step']:5d}  {row['all']:.3f}  {row['non_trigger']:.3f}    {row['random']:.3f}   "
            f"{row['heads_non_trigger']}  {row['layer1_all']:.3f}  {row['loss_bigram']:.3f}  "
            f"{row['loss_backcopy']:.3f}  {row['random_layers']}"
        )


if __name__ == "__main__":
    main()
