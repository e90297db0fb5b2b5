"""Tiny checkpoints in the formats from-scratch trainers write, for tests, written by the real writers.

Each writer takes a transformers model (the reference the replay must reproduce) and saves its weights as the
trainer would: under the trainer's names and layouts (the inverse of the converters the key maps follow,
written out here independently), with `torch.distributed.checkpoint.save` in one process for the DCP layouts and
`torch.save` with the trainer's own dictionary for the single-file ones. OLMo-core writes its own checkpoint with
its own model and checkpointing (`olmo_run`). Files are back-dated an hour, so discovery's quiet period is over.

Layouts, from the trainers' code: torchtitan `step-<N>/` (CheckpointManager: the model's entries at the top level,
beside optimizer, lr_scheduler, dataloader and train_state); Megatron-Core `iter_<NNNNNNN>/` torch_dist
(dist_checkpointing: DCP plus metadata.json and common.pt, `latest_checkpointed_iteration.txt` at the root, a
block's tensors stacked over layers); the Hugging Face Trainer with FSDP SHARDED_STATE_DICT
(`checkpoint-<N>/pytorch_model_fsdp_0/` holding `{"model": ...}`, optimizer_0/ beside it, no config.json);
nanoGPT's train.py `ckpt.pt` (kept as a series by copying it after each save: `nanogpt_series`); nanochat's
checkpoint_manager `model_<step:06d>.pt` + `meta_<step:06d>.json` + `optim_<step:06d>_rank0.pt`; litgpt's
pretrain `step-<N:08d>/lit_model.pth` + `model_config.yaml`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import transformers as tf

from tests.ckpt_factory import backdate, tiny_model

HOUR = 3600.0


def _dcp_save(state: dict, folder: Path, **kwargs) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder), **kwargs)


def _adam_state(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Optimizer moments as a trainer's flattened optimizer state dict holds them (never to be read)."""
    return {f"state.{k}.{m}": torch.full_like(v, 7.0) for k, v in named.items() for m in ("exp_avg", "exp_avg_sq")}


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def llama(seed: int = 0):
    return tiny_model(seed=seed)


# ------------------------------------------------------------------------------------------ torchtitan


def interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a half-split (transformers) query/key projection in the interleaved order Meta and torchtitan use."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def torchtitan_names(model, *, release: str = "0.2") -> dict[str, torch.Tensor]:
    """torchtitan's Llama 3 state dict; from release 0.3 on, wq/wk/wv sit under attention.qkv_linear and the output
    projection is lm_head (torchtitan/models/llama3/state_dict_adapter.py)."""
    c, sd = model.config, hf_state(model)
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"layers.{i}.attention.wq.weight": interleave(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": interleave(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    if release >= "0.3":
        out = {
            k.replace(".attention.w", ".attention.qkv_linear.w").replace("qkv_linear.wo", "wo"): v
            for k, v in out.items()
        }
        out["lm_head.weight"] = out.pop("output.weight")
    return out


def torchtitan_step(root, step: int, model, *, release: str = "0.2", age: float = HOUR) -> Path:
    """`<dump>/checkpoint/step-<N>/` as torchtitan's CheckpointManager saves it mid-run."""
    folder = Path(root) / f"step-{step}"
    model_sd = torchtitan_names(model, release=release)
    _dcp_save(
        {
            **model_sd,
            "optimizer": _adam_state(model_sd),
            "lr_scheduler": {"lr_scheduler_0": {"step": step}},
            "dataloader": {"dp_rank_0": b"state"},
            "train_state": {"step": step},
        },
        folder,
    )
    backdate(folder, age)
    return folder


# ------------------------------------------------------------------------------------------ Megatron-Core


def megatron_names(model, *, per_layer: bool = False) -> dict[str, torch.Tensor]:
    """Megatron-Core GPT with Transformer Engine specs: fused QKV grouped per key/value head, fused gate/up, the
    norms inside the fused linears, each block tensor stacked over layers (as torch_dist saves them), or
    `per_layer` under `decoder.layers.<i>.` (as it saves them without stacking)."""
    c, sd = model.config, hf_state(model)
    d = c.hidden_size // c.num_attention_heads
    per = c.num_attention_heads // c.num_key_value_heads

    def qkv(i):
        p = f"model.layers.{i}.self_attn."
        q = sd[p + "q_proj.weight"].view(c.num_key_value_heads, per * d, -1)
        k = sd[p + "k_proj.weight"].view(c.num_key_value_heads, d, -1)
        v = sd[p + "v_proj.weight"].view(c.num_key_value_heads, d, -1)
        return torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)

    def stack(fn):
        return torch.stack([fn(i) for i in range(c.num_hidden_layers)])

    def layer(name):
        return stack(lambda i: sd[f"model.layers.{i}.{name}"])

    pre = "decoder.layers."
    names = {
        "embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        pre + "self_attention.linear_qkv.layer_norm_weight": layer("input_layernorm.weight"),
        pre + "self_attention.linear_qkv.weight": stack(qkv),
        pre + "self_attention.linear_proj.weight": layer("self_attn.o_proj.weight"),
        pre + "mlp.linear_fc1.layer_norm_weight": layer("post_attention_layernorm.weight"),
        pre + "mlp.linear_fc1.weight": stack(
            lambda i: torch.cat(
                [sd[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"model.layers.{i}.mlp.up_proj.weight"]]
            )
        ),
        pre + "mlp.linear_fc2.weight": layer("mlp.down_proj.weight"),
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
        "output_layer.weight": sd["lm_head.weight"],
    }
    if not per_layer:
        return names
    return {
        name: w
        for key, t in names.items()
        for name, w in (
            [(f"{pre}{i}.{key.removeprefix(pre)}", t[i].clone()) for i in range(len(t))]
            if key.startswith(pre)
            else [(key, t)]
        )
    }


def megatron_iteration(
    root, iteration: int, model, *, tracker: bool = True, per_layer: bool = False, age: float = HOUR
) -> Path:
    """`iter_<NNNNNNN>/` torch_dist as Megatron-Core's dist_checkpointing saves it, and the tracker file."""
    root = Path(root)
    folder = root / f"iter_{iteration:07d}"
    model_sd = megatron_names(model, per_layer=per_layer)
    optim = {
        f"optimizer.state.{m}.{k}": torch.full_like(v, 3.0)
        for k, v in model_sd.items()
        for m in ("exp_avg", "exp_avg_sq")
    }
    _dcp_save(
        {**model_sd, **optim, "rng_state": b"rng", "decoder.layers.self_attention.linear_qkv._extra_state": b"te"},
        folder,
    )
    (folder / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    torch.save({"args": {"iteration": iteration}, "checkpoint_version": 3.0}, folder / "common.pt")
    if tracker:
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    backdate(root, age)
    return folder


# ------------------------------------------------------------------------------------------ HF Trainer + FSDP


def fsdp_trainer_checkpoint(root, step: int, model, *, final_save: bool = False, age: float = HOUR) -> Path:
    """`checkpoint-<N>/` as the Trainer (transformers 5.24) writes it with FSDP's SHARDED_STATE_DICT: its
    `_save_checkpoint` calls accelerate's `save_fsdp_model`, `dcp.save({"model": state_dict})` into
    pytorch_model_fsdp_0/, and `save_fsdp_optimizer` into optimizer_0/, beside trainer_state.json; its `save_model`
    writes no config.json for SHARDED_STATE_DICT (only FULL_STATE_DICT reaches `_save`, i.e. `save_pretrained`), so
    the checkpoint folder holds none. `final_save`: the end of training as the FSDP guide has it, the state dict
    type set to FULL_STATE_DICT and `trainer.save_model()` writing the whole model (config.json and
    model.safetensors) into the run folder, the output_dir."""
    folder = Path(root) / f"checkpoint-{step}"
    sd = hf_state(model)
    _dcp_save({"model": sd}, folder / "pytorch_model_fsdp_0")
    _dcp_save({"optimizer": _adam_state(sd)}, folder / "optimizer_0")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "num_input_tokens_seen": 0}))
    if final_save:
        model.save_pretrained(root)
    backdate(root if final_save else folder, age)
    return folder


# ------------------------------------------------------------------------------------------ nanoGPT


def gpt2(seed: int = 0, bias: bool = True):
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_positions=64,
        vocab_size=101,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = tf.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not bias:
                p.zero_()
            else:
                p.normal_(0, 0.3)
    return model.eval()


NANOGPT_LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_checkpoint(
    out_dir, model, iter_num: int, *, bias: bool = True, compiled: bool = True, age: float = HOUR
) -> Path:
    """nanoGPT's train.py checkpoint: `{"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}`
    in out_dir/ckpt.pt; the model's state dict as the compiled model gives it (`_orig_mod.` prefix)."""
    c = model.config
    sd = {}
    for k, v in hf_state(model).items():
        if not bias and k.endswith(".bias"):
            continue
        sd[k] = v.t().contiguous() if k.endswith(NANOGPT_LINEAR) else v
    for i in range(c.n_layer):  # the causal mask buffer nanoGPT keeps without flash attention
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(c.n_positions, c.n_positions)).view(
            1, 1, c.n_positions, c.n_positions
        )
    if compiled:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    model_args = {
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "block_size": c.n_positions,
        "bias": bias,
        "vocab_size": c.vocab_size,
        "dropout": 0.0,
    }
    optimizer = {
        "state": {0: {"step": torch.tensor(float(iter_num)), "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": [0]}],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": sd,
            "optimizer": optimizer,
            "model_args": model_args,
            "iter_num": iter_num,
            "best_val_loss": torch.tensor(2.5),
            "config": {"batch_size": 12, "learning_rate": 6e-4},
        },
        out_dir / "ckpt.pt",
    )
    backdate(out_dir, age)
    return out_dir / "ckpt.pt"


def nanogpt_series(out_dir, steps, layout: str, *, age: float = HOUR) -> dict:
    """A nanoGPT run kept as a series: after each save, train.py's `out_dir/ckpt.pt` is copied to `layout` (a
    format string for the step, relative to out_dir: `step_{}/ckpt.pt`, `ckpt_{}.pt`), as researchers do since
    nanoGPT overwrites the one file; the last ckpt.pt stays where nanoGPT wrote it. {step: reference model}."""
    out_dir, models = Path(out_dir), {}
    for i, step in enumerate(steps):
        models[step] = gpt2(seed=30 + i)
        target = out_dir / layout.format(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(nanogpt_checkpoint(out_dir, models[step], step, age=age), target)
    backdate(out_dir, age)
    return models


# ------------------------------------------------------------------------------------------ nanochat


def nanochat_config() -> dict:
    """nanochat's GPTConfig for a tiny model, as meta_<step>.json records it."""
    return {"sequence_len": 64, "vocab_size": 101, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32}


def nanochat_meta(config) -> dict:
    """The GPTConfig nanochat records for a model of transformers' NanoChatConfig `config`."""
    return {
        "sequence_len": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_kv_head": config.num_key_value_heads,
        "n_embd": config.hidden_size,
    }


def nanochat_model(seed: int = 0):
    c = nanochat_config()
    torch.manual_seed(seed)
    config = tf.NanoChatConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["n_embd"],
        intermediate_size=4 * c["n_embd"],
        num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_kv_head"],
        max_position_embeddings=c["sequence_len"],
    )
    model = tf.NanoChatForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def nanochat_checkpoint(folder, step: int, model, *, age: float = HOUR) -> Path:
    """nanochat's checkpoint_manager.save_checkpoint: model_<step:06d>.pt (the model's state dict alone),
    meta_<step:06d>.json (with model_config) and optim_<step:06d>_rank0.pt, in one folder per model."""
    names = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
    rename = {
        "self_attn.q_proj": "attn.c_q",
        "self_attn.k_proj": "attn.c_k",
        "self_attn.v_proj": "attn.c_v",
        "self_attn.o_proj": "attn.c_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    sd = {}
    for k, v in hf_state(model).items():
        if k in names:
            sd[names[k]] = v
            continue
        i, rest = k.removeprefix("model.layers.").split(".", 1)
        module = rest.removesuffix(".weight")
        sd[f"transformer.h.{i}.{rename[module]}.weight"] = v
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / f"model_{step:06d}.pt")
    (folder / f"meta_{step:06d}.json").write_text(
        json.dumps({"step": step, "val_bpb": 1.1, "model_config": nanochat_meta(model.config), "user_config": {}})
    )
    torch.save([{"state": {}, "param_groups": []}], folder / f"optim_{step:06d}_rank0.pt")
    backdate(folder, age)
    return folder / f"model_{step:06d}.pt"


# ------------------------------------------------------------------------------------------ litgpt


def litgpt_names(model, *, grouped: bool = False) -> dict[str, torch.Tensor]:
    """litgpt's GPT names for a Llama-style model; `grouped`: lit-gpt's older `attn.attn` with the query, key
    and value rows interleaved per key/value group (TinyLlama's code), else litgpt's `attn.qkv` ([q; k; v])."""
    c, sd = model.config, hf_state(model)
    d = c.hidden_size // c.num_attention_heads
    per = c.num_attention_heads // c.num_key_value_heads
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        if grouped:
            fused = torch.cat(
                [
                    q.view(c.num_key_value_heads, per * d, -1),
                    k.view(c.num_key_value_heads, d, -1),
                    v.view(c.num_key_value_heads, d, -1),
                ],
                dim=1,
            ).reshape(-1, c.hidden_size)
            out[h + "attn.attn.weight"] = fused
        else:
            out[h + "attn.qkv.weight"] = torch.cat([q, k, v])
        out |= {
            h + "attn.proj.weight": sd[p + "self_attn.o_proj.weight"],
            h + "norm_1.weight": sd[p + "input_layernorm.weight"],
            h + "norm_2.weight": sd[p + "post_attention_layernorm.weight"],
            h + "mlp.fc_1.weight": sd[p + "mlp.gate_proj.weight"],
            h + "mlp.fc_2.weight": sd[p + "mlp.up_proj.weight"],
            h + "mlp.proj.weight": sd[p + "mlp.down_proj.weight"],
        }
    return out


def litgpt_model_config(model) -> str:
    c = model.config
    return "\n".join(
        [
            "name: tiny-llama",
            f"block_size: {c.max_position_embeddings}",
            f"vocab_size: {c.vocab_size}",
            f"padded_vocab_size: {c.vocab_size}",
            f"n_layer: {c.num_hidden_layers}",
            f"n_head: {c.num_attention_heads}",
            f"n_embd: {c.hidden_size}",
            f"n_query_groups: {c.num_key_value_heads}",
            f"head_size: {c.hidden_size // c.num_attention_heads}",
            "rotary_percentage: 1.0",
            "parallel_residual: false",
            "bias: false",
            "norm_class_name: RMSNorm",
            f"norm_eps: {c.rms_norm_eps}",
            "mlp_class_name: LLaMAMLP",
            f"intermediate_size: {c.intermediate_size}",
            f"rope_base: {int(c.rope_parameters['rope_theta'])}",
            "",
        ]
    )


def litgpt_step(out_dir, step: int, model, *, age: float = HOUR) -> Path:
    """litgpt pretrain's `out/pretrain/step-<N:08d>/lit_model.pth` (fabric.save of the training state) with
    model_config.yaml beside it."""
    folder = Path(out_dir) / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    sd = litgpt_names(model)
    torch.save(
        {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "iter_num": step * 4, "step_count": step},
        folder / "lit_model.pth",
    )
    (folder / "model_config.yaml").write_text(litgpt_model_config(model))
    backdate(folder, age)
    return folder


def tinyllama_iteration(out_dir, iteration: int, model, *, age: float = HOUR) -> Path:
    """TinyLlama's (lit-gpt based) pretrain: `iter-<N:06d>-ckpt.pth` in the run's folder, fabric.save of
    {"model", "optimizer", "hparams", "iter_num", "step_count"}, the fused attention grouped per key/value head."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"iter-{iteration:06d}-ckpt.pth"
    torch.save(
        {
            "model": litgpt_names(model, grouped=True),
            "optimizer": {"state": {}, "param_groups": []},
            "hparams": {"learning_rate": 4e-4},
            "iter_num": iteration,
            "step_count": iteration // 2,
        },
        path,
    )
    backdate(out_dir, age)
    return path


# ------------------------------------------------------------------------------------------ OLMo-core


def olmo_run(root, steps, *, seed: int = 0):
    """A tiny OLMo 2 run written by OLMo-core itself: its own Transformer and save_model_and_optim_state into
    `step<N>/model_and_optim/` with the experiment's config.json beside it, and the equivalent transformers model
    built by OLMo-core's own HF conversion (olmo_core.nn.hf: get_hf_config and the state converter).
    Returns (root, {step: transformers model})."""
    from olmo_core.distributed.checkpoint import save_model_and_optim_state
    from olmo_core.nn.hf.checkpoint import save_hf_model
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    root = Path(root)
    config = TransformerConfig.llama_like(
        d_model=32,
        n_layers=2,
        n_heads=4,
        vocab_size=101,
        block_name=TransformerBlockType.reordered_norm,
        qk_norm=True,
        rope_theta=500_000,
        layer_norm_eps=1e-6,
    )
    references = {}
    for n, step in enumerate(steps):
        torch.manual_seed(seed + n)
        model = config.build(init_device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
        optim = torch.optim.AdamW(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            save_model_and_optim_state(root / f"step{step}" / "model_and_optim", model, optim)
            save_hf_model(root.parent / f"{root.name}-hf-{step}", model.state_dict(), model)
        # what OLMo-core's ConfigSaverCallback writes into every checkpoint folder (ExperimentConfig.as_config_dict)
        (root / f"step{step}" / "config.json").write_text(
            json.dumps({"run_name": "tiny", "model": config.as_config_dict()})
        )
        references[step] = tf.AutoModelForCausalLM.from_pretrained(
            root.parent / f"{root.name}-hf-{step}", dtype=torch.float32
        ).eval()
    backdate(root, HOUR)
    return root, references
