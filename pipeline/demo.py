"""The built-in demo: a real training run, built from scratch, in which a first-token sink emerges.

The task is Bigram-Backcopy (Guo et al. 2024, "Active-Dormant Attention Heads"): every sequence starts with BOS;
after one of a few trigger tokens the next token repeats the token before the trigger; everywhere else the next
token follows a fixed random bigram chain. A tiny Llama (4 layers, width 64, 2 heads), trained on rows of 32 tokens,
learns it in a few hundred steps; its heads then park their attention on position 0 at the queries where they have
nothing to copy, and the heads that do the copy look at the previous token from trigger queries. The demo run is
probed at its trained length, 32 tokens (`pipeline.cli.fit_probe_to_demo`): replayed with the default 64-token
probe, half of every row's queries sit farther from position 0 than any the model trained on.

How the recipe was chosen (measured with `python -m tests.demo_emergence DIR --seed N --threads 1` in a clone of
the repository: eager attention on position 0, mean over heads and queries; CPU seconds of the one training thread):
- this recipe (1,500 steps, checkpoint every 50, seed 0): built in 115 s of CPU; the layer-0 sink passes 0.3 at
  step 650 and ends at 0.76 (layer 1: 0.30 at 700, 0.92 at the end); with seed 1 (checkpoints every 100) at step
  500, ending at 0.81. Replayed by sinktrace at 32 tokens, layer 0 stays above 0.3 from step 650 and ends at 0.74;
  at 64 tokens from step 850, ending at 0.57 (the four layers emerge at 650/750/350/600 at 32 tokens, at
  850/950/900/900 at 64), while its queries 1-31 give the values of the 32-token probe within 0.013 (every layer,
  every checkpoint): the queries 32-63, at distances never trained (0.42 on layer 0 at the end), are what pull the
  64-token curve down and late;
- the vocabulary (512) is large for the width: in an earlier variant with 64 tokens in 64 dimensions (and no weight
  decay) the model solved the task with no sink at all (layer-0 attention on position 0 stayed below 0.1 for
  4,000 steps, at lr 3e-3 and at 1e-2);
- weight decay 0.1: without it (two layers, 64-token rows) one seed in six put the sink in layer 1 only (its
  layer-0 value peaked at 0.22 and faded); with it every seed of 0-9 passed 0.3 in layer 0, by step 1,300 at the
  latest;
- the previous demo (recipe version 1: two layers on 64-token rows, 3,000 steps, 80 ms of CPU a step): layer-0 sink
  past 0.3 at step 800, 0.72 at step 3,000; with two layers the share of anything in "the first two layers" is 1 by
  construction, hence four;
- four layers on 64-token rows (seed 0): at this recipe's other settings the layer-0 sink passes 0.3 at step 1,200
  (0.65 at 2,000; layer 1 passes 0.3 at 800), but a step costs 142 ms of CPU, too slow for a demo that builds in
  about three minutes on two cores. At lr 6e-3 (1,200 steps), or batch 16 at lr 5e-3 (1,500 steps), no layer-0 sink
  formed at all (0.06 throughout: the copy was learnt late, at step 1,100, or not at all). Batch 16 (2,000 steps,
  152 s) or width 48 (2,000 steps, 202 s) learnt the copy (at step 1,400 and 600) with no sink in layers 0 and 1.

`DemoRecipe.family` (`gpt2`: learned absolute positions), `DemoRecipe.packing` (`stream`: rows cut from a BOS-less
stream) and `DemoRecipe.concentration` (sharper bigrams below 1) are the switches of the search for a positional
sink, recorded in docs/data.md.

`build_demo_run` trains such a model and saves checkpoints in the Hugging Face Trainer layout
(`checkpoint-<step>/` with `config.json`, `model.safetensors`, `trainer_state.json`, `optimizer.pt`), so the
demo exercises the same discovery and loading code as a user's run. Each checkpoint is written under a
`checkpoint-<step>.tmp` name and renamed when complete; the build resumes from its last checkpoint after a kill
and writes `DEMO_COMPLETE` when done. `ensure_demo_run` builds once into a cache folder and reuses it after.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .locations import write_json_atomic
from .replay.load import quiet_transformers

RECIPE_VERSION = 2  # 1: two layers on 64-token rows, 3,000 steps
COMPLETE_MARKER = "DEMO_COMPLETE"
RECIPE_FILE = "demo_recipe.json"
BOS = 0  # token id of BOS; content tokens are 1..vocab_size-1
PACKINGS = ("bos", "stream")
FAMILIES = ("llama", "gpt2")


# --------------------------------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo run: same recipe, same checkpoints (on the same thread count)."""

    steps: int = 1500
    every: int = 50  # checkpoint interval; step 0 (the initialisation) is always saved
    seed: int = 0  # model initialisation, the task's chain and triggers, and the data stream
    # task
    vocab_size: int = 512  # BOS + 511 content tokens
    n_triggers: int = 3
    trigger_share: float = 0.1  # probability that a bigram step lands on a trigger (the triggers are frequent)
    branching: int = 8  # non-trigger successors per token in the bigram chain
    concentration: float = 1.0  # of the Dirichlet weights over those successors: below 1, sharper bigrams
    seq_len: int = 32
    packing: str = "bos"  # bos: every row starts with BOS; stream: rows cut from a BOS-less stream at random offsets
    # model
    family: str = "llama"  # llama (RoPE) or gpt2 (learned absolute positions)
    hidden_size: int = 64
    n_layers: int = 4
    n_heads: int = 2
    # optimisation
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.every < 1:
            raise ValueError(f"steps and every must be >= 1 (got steps={self.steps}, every={self.every})")
        if self.vocab_size < self.n_triggers + 3 or self.n_triggers < 1:
            raise ValueError(f"vocab_size={self.vocab_size} leaves no room for {self.n_triggers} triggers")
        if not 1 <= self.branching <= self.vocab_size - 1 - self.n_triggers:
            raise ValueError(f"branching must be in 1..{self.vocab_size - 1 - self.n_triggers} (got {self.branching})")
        if not self.concentration > 0:
            raise ValueError(f"concentration must be > 0 (got {self.concentration})")
        if not 0 <= self.trigger_share < 1:
            raise ValueError(f"trigger_share must be in [0, 1) (got {self.trigger_share})")
        if self.seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 (got {self.seq_len})")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {', '.join(PACKINGS)} (got {self.packing!r})")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)} (got {self.family!r})")

    def schedule(self) -> list[int]:
        """The steps that get a checkpoint: 0, every, 2*every, ..., and always the last step."""
        steps = list(range(0, self.steps, self.every)) + [self.steps]
        return sorted(set(steps))

    def to_dict(self) -> dict:
        return {"recipe_version": RECIPE_VERSION, **dataclasses.asdict(self)}

    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return f"bigram-backcopy-seed{self.seed}-{self.steps}steps-{digest}"


# ----------------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True, eq=False)
class BigramBackcopy:
    """One instance of the task: the trigger tokens and the bigram chain, fixed by a seed."""

    vocab_size: int
    triggers: tuple[int, ...]
    successors: np.ndarray  # int64 [vocab_size, n]: the tokens that may follow each token (row 0, BOS, unused)
    probs: np.ndarray  # float64 [vocab_size, n]: their probabilities

    @functools.cached_property
    def _trigger_lookup(self) -> np.ndarray:
        lookup = np.zeros(self.vocab_size, dtype=bool)
        lookup[list(self.triggers)] = True
        return lookup

    def is_trigger(self, tokens) -> np.ndarray:
        return self._trigger_lookup[np.asarray(tokens)]

    def allowed_next(self, token: int) -> set[int]:
        """The tokens the bigram chain may put after `token` (the rule for non-trigger tokens)."""
        return {int(t) for t, p in zip(self.successors[token], self.probs[token]) if p > 0}

    def first_tokens(self) -> np.ndarray:
        """Tokens that may follow BOS: any non-trigger content token (a trigger there would copy BOS)."""
        content = np.arange(1, self.vocab_size)
        return content[~self.is_trigger(content)]


def demo_task(
    *,
    vocab_size: int = DemoRecipe.vocab_size,
    n_triggers: int = DemoRecipe.n_triggers,
    trigger_share: float = DemoRecipe.trigger_share,
    branching: int = DemoRecipe.branching,
    concentration: float = DemoRecipe.concentration,
    seed: int = 0,
) -> BigramBackcopy:
    """The task instance for a seed: random triggers and a random sparse bigram chain over the content tokens.

    Each content token is followed by one of `branching` random non-trigger tokens (Dirichlet(concentration)
    weights) with total probability 1 - trigger_share, or by one of the triggers (equal weights) with total
    trigger_share.
    """
    rng = np.random.default_rng([seed, 1])
    content = np.arange(1, vocab_size)
    triggers = np.sort(rng.choice(content, size=n_triggers, replace=False))
    plain = np.setdiff1d(content, triggers)
    successors = np.zeros((vocab_size, branching + n_triggers), dtype=np.int64)
    probs = np.zeros((vocab_size, branching + n_triggers), dtype=np.float64)
    for token in content:
        successors[token] = np.concatenate([np.sort(rng.choice(plain, size=branching, replace=False)), triggers])
        probs[token] = np.concatenate(
            [
                (1 - trigger_share) * rng.dirichlet(np.full(branching, concentration)),
                np.full(n_triggers, trigger_share / n_triggers),
            ]
        )
    return BigramBackcopy(
        vocab_size=vocab_size, triggers=tuple(int(t) for t in triggers), successors=successors, probs=probs
    )


def demo_batch(
    task: BigramBackcopy, *, batch_size: int, seq_len: int, seed: int, step: int, packing: str = "bos"
) -> torch.Tensor:
    """The training batch for one step: int64 [batch_size, seq_len], a function of (task, seed, step) only.

    Position 0 is BOS, position 1 a uniform non-trigger content token; then, for t >= 1, the token after a trigger
    at t repeats the token at t-1, and the token after any other token is drawn from the bigram chain.
    `packing="stream"`: each row is instead a window of seq_len tokens cut from such a row of twice that length at a
    uniform offset 1..seq_len, so no row holds BOS and position 0 holds whatever content token the cut left there
    (as in pretraining data packed without BOS at row starts).
    """
    if packing == "stream":
        rng = np.random.default_rng([seed, 3, step])
        long = demo_batch(task, batch_size=batch_size, seq_len=2 * seq_len, seed=seed, step=step)
        offsets = rng.integers(1, seq_len + 1, size=batch_size)
        return long[np.arange(batch_size)[:, None], offsets[:, None] + np.arange(seq_len)]
    rng = np.random.default_rng([seed, 2, step])
    tokens = np.empty((batch_size, seq_len), dtype=np.int64)
    tokens[:, 0] = BOS
    tokens[:, 1] = rng.choice(task.first_tokens(), size=batch_size)
    cdf = np.cumsum(task.probs, axis=1)
    cdf[:, -1] = 1.0  # guard against rounding: u < 1 always lands in the row
    for t in range(1, seq_len - 1):
        current = tokens[:, t]
        pick = (rng.random(batch_size)[:, None] >= cdf[current]).sum(axis=1)
        bigram = task.successors[current, pick]
        tokens[:, t + 1] = np.where(task.is_trigger(current), tokens[:, t - 1], bigram)
    return torch.from_numpy(tokens)


# ---------------------------------------------------------------------------------------------------- the model


def demo_config(
    *,
    vocab_size: int = DemoRecipe.vocab_size,
    hidden_size: int = DemoRecipe.hidden_size,
    n_layers: int = DemoRecipe.n_layers,
    n_heads: int = DemoRecipe.n_heads,
    seq_len: int = DemoRecipe.seq_len,
    family: str = DemoRecipe.family,
):
    """The demo model: a tiny Llama (RoPE, RMSNorm, SwiGLU), BOS = token 0, no EOS or padding; `family="gpt2"`: a
    tiny GPT-2 (learned absolute positions, LayerNorm, GELU) of the same size, without dropout."""
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=BOS,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
            use_cache=False,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        head_dim=hidden_size // n_heads,
        max_position_embeddings=seq_len,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        use_cache=False,
    )


def _recipe_config(recipe: DemoRecipe):
    return demo_config(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        n_layers=recipe.n_layers,
        n_heads=recipe.n_heads,
        seq_len=recipe.seq_len,
        family=recipe.family,
    )


def _recipe_task(recipe: DemoRecipe) -> BigramBackcopy:
    return demo_task(
        vocab_size=recipe.vocab_size,
        n_triggers=recipe.n_triggers,
        trigger_share=recipe.trigger_share,
        branching=recipe.branching,
        concentration=recipe.concentration,
        seed=recipe.seed,
    )


def _lr_at(recipe: DemoRecipe, step: int) -> float:
    """Linear warm-up, then constant: a decay would slow the sink down right where the demo wants to show it."""
    return recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup))


# ----------------------------------------------------------------------------------------------------- the build


def build_demo_run(
    root: str | Path,
    *,
    steps: int = DemoRecipe.steps,
    every: int = DemoRecipe.every,
    seed: int = DemoRecipe.seed,
    progress: bool = True,
    **recipe_overrides,
) -> Path:
    """Train the demo model into `root`, one `checkpoint-<step>/` folder per scheduled step; returns `root`.

    Resumable: after a kill, calling again with the same recipe continues from the last complete checkpoint
    (leftover `*.tmp` folders are removed). A folder holding a different recipe is refused, not overwritten.

    Args:
        root: the run folder (created if missing).
        steps, every, seed: the run's length, checkpoint interval and seed.
        progress: draw a tqdm bar over the training steps.
        **recipe_overrides: any other `DemoRecipe` field (lr, warmup, vocab_size, ...).
    """
    recipe = DemoRecipe(steps=steps, every=every, seed=seed, **recipe_overrides)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        _check_recipe(root, recipe)
        if _is_complete(root, recipe):
            return root
        (root / COMPLETE_MARKER).unlink(missing_ok=True)
        for leftover in root.glob("checkpoint-*.tmp"):
            shutil.rmtree(leftover)
        _train(root, recipe, progress)
        write_json_atomic(root / COMPLETE_MARKER, recipe.to_dict(), indent=2, sort_keys=True)
    return root


def ensure_demo_run(cache_dir: str | Path, **kwargs) -> Path:
    """The demo run for this recipe under `cache_dir/<recipe name>/`: built on the first call, reused after."""
    progress = kwargs.pop("progress", True)
    recipe = DemoRecipe(**kwargs)
    root = Path(cache_dir) / recipe.name()
    if _is_complete(root, recipe):
        return root
    overrides = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("steps", "every", "seed")}
    return build_demo_run(
        root, steps=recipe.steps, every=recipe.every, seed=recipe.seed, progress=progress, **overrides
    )


def _train(root: Path, recipe: DemoRecipe, progress: bool) -> None:
    # Two threads beat one only on an idle machine (45 vs 80 ms/step on 2 cores), and collapse to ~2 s/step when
    # anything else runs beside them (OpenMP spin-waits); one thread keeps the demo at a few minutes either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_steps(root, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _train_steps(root: Path, recipe: DemoRecipe, progress: bool) -> None:
    from transformers import AutoModelForCausalLM

    task = _recipe_task(recipe)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_recipe_config(recipe))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    schedule = set(recipe.schedule())
    resumed = _resume(root, recipe, model, optimizer)
    if resumed is not None:
        start, log_history = resumed
    else:
        start, log_history = 0, []
        _save_checkpoint(root, recipe, 0, model, optimizer, log_history)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.steps, initial=start, desc="demo training", unit="step", dynamic_ncols=True)
    window = _LossWindow()
    model.train()
    try:
        for step in range(start, recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(recipe, step)
            batch = demo_batch(
                task,
                batch_size=recipe.batch_size,
                seq_len=recipe.seq_len,
                seed=recipe.seed,
                step=step,
                packing=recipe.packing,
            )
            logits = model(input_ids=batch).logits[:, :-1]
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)
            loss = per_token.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()

            window.add(task, batch, per_token.detach(), float(grad_norm))
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            done = step + 1
            if done in schedule:
                log_history.append({"step": done, "learning_rate": _lr_at(recipe, step), **window.summary()})
                window = _LossWindow()
                _save_checkpoint(root, recipe, done, model, optimizer, log_history)
    finally:
        if bar is not None:
            bar.close()


class _LossWindow:
    """Mean losses since the last checkpoint, split by what the target needs: a copy or a bigram step."""

    def __init__(self):
        self.sums = {"loss": 0.0, "loss_backcopy": 0.0, "loss_bigram": 0.0, "grad_norm": 0.0}
        self.counts = dict.fromkeys(self.sums, 0)

    def add(self, task: BigramBackcopy, batch: torch.Tensor, per_token: torch.Tensor, grad_norm: float) -> None:
        after_trigger = torch.from_numpy(task.is_trigger(batch[:, :-1].numpy()))
        after_bigram = ~after_trigger
        # the token after BOS is uniform, neither a copy nor a bigram step; in a stream-packed row a trigger at
        # position 0 copies a token the row does not hold
        after_bigram[:, 0] &= batch[:, 0] != BOS
        after_trigger[:, 0] = False
        for key, value, n in (
            ("loss", per_token.sum(), per_token.numel()),
            ("loss_backcopy", per_token[after_trigger].sum(), int(after_trigger.sum())),
            ("loss_bigram", per_token[after_bigram].sum(), int(after_bigram.sum())),
            ("grad_norm", grad_norm, 1),
        ):
            self.sums[key] += float(value)
            self.counts[key] += n

    def summary(self) -> dict:
        return {k: round(self.sums[k] / self.counts[k], 6) for k in self.sums if self.counts[k]}


def _save_checkpoint(root: Path, recipe: DemoRecipe, step: int, model, optimizer, log_history) -> None:
    """Write `checkpoint-<step>.tmp/` in full, then rename it: a complete name always means a complete folder."""
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
        model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _write_trainer_state(tmp, recipe, step, log_history)
    if final.exists():  # a stale copy past the resume point (see _resume): this run's version replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_trainer_state(folder: Path, recipe: DemoRecipe, step: int, log_history) -> None:
    state = {
        "global_step": step,
        "max_steps": recipe.steps,
        "num_input_tokens_seen": step * recipe.batch_size * recipe.seq_len,
        "save_steps": recipe.every,
        "logging_steps": recipe.every,
        "train_batch_size": recipe.batch_size,
        "log_history": list(log_history),
        "is_world_process_zero": True,
        "is_local_process_zero": True,
    }
    write_json_atomic(folder / "trainer_state.json", state, indent=2, sort_keys=True)


def _resume(root: Path, recipe: DemoRecipe, model, optimizer):
    """Load the latest checkpoint that, with every scheduled one before it, is complete; None if there is none."""
    from safetensors.torch import load_file

    usable = []
    for step in recipe.schedule():
        if not _checkpoint_complete(root / f"checkpoint-{step}", step):
            break
        usable.append(step)
    for step in reversed(usable):
        folder = root / f"checkpoint-{step}"
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
            model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        except Exception:  # unreadable (e.g. a disk filled mid-write before the rename): fall back one checkpoint
            continue
        return step, state.get("log_history", [])
    return None


def _checkpoint_complete(folder: Path, step: int) -> bool:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    names = ("config.json", "model.safetensors", "optimizer.pt")
    return state.get("global_step") == step and all((folder / n).is_file() for n in names)


def _is_complete(root: Path, recipe: DemoRecipe) -> bool:
    try:
        marker = json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != recipe.to_dict():
        return False
    return all((root / f"checkpoint-{s}" / "model.safetensors").is_file() for s in recipe.schedule())


def _check_recipe(root: Path, recipe: DemoRecipe) -> None:
    path = root / RECIPE_FILE
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = None
        if found is not None and found != recipe.to_dict():
            raise ValueError(
                f"{path}: this folder holds a demo run with another recipe ({_recipe_diff(found, recipe.to_dict())}); "
                "use another folder or delete this one"
            )
        if found is not None:
            return
    elif any(root.glob("checkpoint-*")):
        raise ValueError(f"{root}: holds checkpoint folders but no {RECIPE_FILE}; refusing to build a demo run into it")
    write_json_atomic(path, recipe.to_dict(), indent=2, sort_keys=True)


def _recipe_diff(found: dict, wanted: dict) -> str:
    keys = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
    return ", ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} asked" for k in keys)


def _build_lock(root: Path):
    """One builder per folder at a time (a second caller waits), so two processes never interleave checkpoints: the
    OS file lock pipeline/store/lock.py takes too, dropped by the kernel however its holder ends."""
    from filelock import FileLock

    return FileLock(root / ".build.lock")
