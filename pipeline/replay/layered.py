"""Layer-by-layer replay, for models whose weights exceed the device memory budget (`replay.max_device_memory`).

The model is built with its parameters on the meta device (they take no memory) and the probe runs layer-major
instead of row-major: every micro-batch passes through block i while block i's weights are resident, then block i
is dropped and block i+1, read from the safetensors files by a background thread meanwhile, takes its place. Each
weight byte is read once, and the device holds one block's weights (the next block's are meanwhile read into host
memory, pinned for a GPU), the weights outside the blocks, and the probe's hidden states between two blocks.

Each pass still runs the model's own forward (embeddings, rotary tables, masks: cheap next to a block), so every
family whole-model replay measures runs here unchanged: the blocks already done are stood in for by modules that
hand on the stored hidden states, and a hook on the current block ends the forward after it. Weights go through
transformers' own loader, so renamed and fused tensors (Qwen3-MoE's experts) load as they do in from_pretrained.

Checkpoints read through a key map (DCP folders, torch.save files, safetensors under a trainer's names) stream the
same way (`SavedBlockStream`): the key map's plan, worked out from names and shapes alone, says which checkpoint
tensors feed each block; those alone are read and mapped when the block's turn comes, into the model's own names,
and assigned to the block. Their digest is hashed part by part as they are read, the output head's tensors
included (read for the digest alone), so that it equals the whole route's.
"""

from __future__ import annotations

import contextlib
import re
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import torch
from torch import nn

from ..checkpoints.digest import PendingDigest, digest_of_lines, tensor_lines
from ..checkpoints.opened import OpenedCheckpoint, open_checkpoint
from ..checkpoints.weightfiles import CONFIG_NAME
from ..devices import concrete_device, load_dtype, release_pinned
from ..errors import CheckpointError, describe
from ..locations import join, local_folder
from ..records import Checkpoint
from .load import (
    check_loading,
    check_state_dict,
    checked,
    mapped_config,
    parameters_on_meta,
    quiet_transformers,
    remote_code,
    stored_dtype,
)
from .measure import find_blocks


@contextlib.contextmanager
def open_layered(
    ckpt: Checkpoint | OpenedCheckpoint,
    *,
    device: str | torch.device,
    dtype,
    trust_remote_code: bool = False,
    attn_implementation: str = "sinkstats",
):
    """The checkpoint's model with only the weights outside its blocks loaded, and the `run_rows` that streams
    its blocks. `ckpt`, `dtype` and `attn_implementation` as for load_model.

    Yields (model, run_rows); pass both to `measure(model, ids, run_rows=run_rows)`. The opened checkpoint's
    `digest` is then that of load_model. Checks the files as `load_model` does; a tensor that is missing,
    unexpected or of the wrong shape raises CheckpointError.
    """
    from . import attention  # noqa: F401  (registers "sinkstats")

    opened = open_checkpoint(ckpt)
    device = concrete_device(device)
    if opened.mapped:  # through a key map: its plan says which checkpoint tensors each block's come from
        config = mapped_config(opened, trust_remote_code)
        plan = opened.plan
        want = load_dtype(dtype, device, stored_dtype(plan.outputs))
        model = _skeleton(opened, device, want, False, attn_implementation, config)
        stream = SavedBlockStream(opened, model, device, want, plan)
        opened.digest_from(stream.digest)
    else:
        want = checked(opened, device, dtype, trust_remote_code)
        opened.digest  # noqa: B018  (hashing starts now, beside the build)
        # the weights are read from the files opened (byte ranges for a URL), block by block, the output head never
        model = _skeleton(opened, device, want, trust_remote_code, attn_implementation)
        stream = BlockStream(opened, model, device, want)
    with stream:
        yield model, stream.run_rows


def _skeleton(opened: OpenedCheckpoint, device, dtype, trust_remote_code, attn_implementation, config=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    with contextlib.ExitStack() as stack:
        try:
            if remote_code(opened, trust_remote_code):  # the config's class ships with the checkpoint, in its folder
                folder = stack.enter_context(local_folder(opened.path, weights=False))
                config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
            elif config is None:
                config = opened.transformers_config
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(
                    config, attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=trust_remote_code
                )
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(join(opened.path, CONFIG_NAME), f"transformers rejects it: {describe(e)}") from e
    for module in model.modules():  # buffers (rotary tables) are real: computed by the model's own __init__
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval()


class _Stop(Exception):
    """Raised by the hook on the current block: the rest of the forward has nothing to compute yet."""


class _StandIn(nn.Module):
    """Takes the place of a block already replayed: hands on its input, or (for the block just before the current
    one) the stored output of that block for the micro-batch being run. Attribute reads fall through to the block."""

    def __init__(self, block: nn.Module, fmt, stored: list | None = None):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its meta parameters stay out of the tree
        self.fmt, self.stored, self.batch = fmt, stored, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        h = self.stored[self.batch] if self.stored is not None else (args[0] if args else kwargs["hidden_states"])
        return h if self.fmt is None else (h, *([None] * (self.fmt - 1)))


class BlockStream:
    """A skeleton model's weights, read from the checkpoint's files: everything outside the blocks at once, each
    block when its turn comes (see `run_rows`)."""

    def __init__(self, opened: OpenedCheckpoint, model, device: torch.device, dtype: torch.dtype):
        self.folder, self.model, self.device, self.dtype = opened.path, model, device, dtype
        self.blocks = find_blocks(model)
        self.head = model.get_output_embeddings()  # never read: statistics stop at the last block's output
        self.prefix = next(name for name, m in model.named_modules() if m is self.blocks)
        self._files = {} if opened.mapped else {f.path: f for f in opened.weight_files}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sinktrace-read")
        try:
            self.slices = self._group()
            self._load(None, self._read(None))
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._files.clear()
        self.model.to("meta")  # drop every weight now, not when the caller lets go of the model
        if self.device.type == "cuda":
            release_pinned()

    def _group(self) -> dict[int | None, dict]:
        """File tensors by the block their model name falls in (None: outside the blocks), the output head left out:
        statistics stop at the last block's output. Every name and shape is checked here, before any block runs."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        names = self.model.state_dict()
        head_names = {f"{n}." for n, m in self.model.named_modules() if self.head is not None and m is self.head}
        in_block = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.")
        groups: dict[int | None, dict] = {}
        unexpected, mismatched = set(), []
        for path, f in self._files.items():
            for key in f.keys():
                target, converted = rename_source_key(key, renamings, converters, self.model.base_model_prefix, names)
                if any(target.startswith(h) for h in head_names):
                    continue
                if target not in names:  # includes blocks beyond config.json's num_hidden_layers
                    unexpected.add(target)
                    continue
                sl = f.get_slice(key)
                if converted is None and tuple(sl.get_shape()) != tuple(names[target].shape):
                    mismatched.append((target, sl.get_shape(), names[target].shape))
                m = in_block.match(target)
                groups.setdefault(int(m.group(1)) if m else None, {})[key] = (path, sl)
        # tensors transformers knows to drop (old buffers such as GPT-2's attn.bias) are no error here either
        info = SimpleNamespace(missing_keys=set(), unexpected_keys=unexpected)
        self.model._adjust_missing_and_unexpected_keys(info)
        check_loading(self.folder, {"unexpected_keys": info.unexpected_keys, "mismatched_keys": mismatched})
        return groups

    def _read(self, index: int | None) -> dict[str, torch.Tensor]:
        """Read a group's tensors from the files (this is where the disk time goes), each file's at once (for a URL,
        byte ranges in flight: `SafetensorsFile.read_many`), into pinned memory for a GPU."""
        pin = self.device.type == "cuda"
        keys: dict[str, list[str]] = {}
        for key, (path, _) in self.slices.get(index, {}).items():
            keys.setdefault(path, []).append(key)
        out = {}
        for path, names in keys.items():
            try:
                got = self._files[path].read_many(names)
            except Exception as e:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise CheckpointError(path, f"reading {shown} failed: {describe(e)}") from e
            for key in names:  # each tensor let go of once pinned: the block is in host memory once, not twice
                t = got.pop(key)
                out[key] = t.pin_memory() if pin else t
        return out

    def _load(self, index: int | None, tensors: dict[str, torch.Tensor]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=self.mapping)
        try:
            with quiet_transformers():  # one bar per block would bury the replay's own
                info, _ = convert_and_load_state_dict_in_model(self.model, tensors, config)
        except Exception as e:
            where = "outside the blocks" if index is None else f"of block {index}"
            raise CheckpointError(self.folder, f"transformers could not load the weights {where}: {describe(e)}") from e
        self._check_loaded(index, list(info.mismatched_keys))

    def _check_loaded(self, index: int | None, mismatched: list) -> None:
        """That every parameter of the part just loaded (everything outside the blocks but the head, or block
        `index`) holds a weight."""
        if index is None:
            part, prefix = self.model, ""
            skip = {id(p) for m in (self.blocks, self.head) if m is not None for p in m.parameters()}
        else:
            part, prefix, skip = self.blocks[index], f"{self.prefix}.{index}.", set()
        missing = [prefix + n for n, p in part.named_parameters() if p.is_meta and id(p) not in skip]
        check_loading(self.folder, {"missing_keys": missing, "mismatched_keys": mismatched})

    def run_rows(self, forward, batches: list[torch.Tensor], on_batch=None) -> None:
        """Run every micro-batch of probe rows through the model (`forward(input_ids=...)`), block after block;
        `on_batch(b)` is called before micro-batch b runs through each block (measure's passes switch there)."""
        blocks, originals = self.blocks, list(self.blocks)
        stored: list = [None] * len(batches)
        current = {"batch": 0, "fmt": None}

        def keep(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            current["fmt"] = len(output) if isinstance(output, (tuple, list)) else None
            stored[current["batch"]] = h
            raise _Stop

        pending = self._pool.submit(self._read, 0)
        try:
            for i, block in enumerate(originals):
                tensors, pending = pending.result(), None
                self._load(i, tensors)
                del tensors
                if i + 1 < len(originals):
                    pending = self._pool.submit(self._read, i + 1)
                if i:
                    blocks[i - 1] = _StandIn(originals[i - 1], current["fmt"], stored)
                if i > 1:
                    blocks[i - 2] = _StandIn(originals[i - 2], current["fmt"])
                feeder = blocks[i - 1] if i else None
                handle = block.register_forward_hook(keep)
                try:
                    for b, rows in enumerate(batches):
                        current["batch"] = b
                        if on_batch is not None:
                            on_batch(b)
                        if feeder is not None:
                            feeder.batch = b
                        try:
                            forward(input_ids=rows.to(self.device))
                        except _Stop:
                            continue
                        raise RuntimeError(f"block {i} of {type(self.model).__name__} never ran in its forward")
                finally:
                    handle.remove()
                block.to("meta")  # its output is in `stored`; its weights make room for the next block's
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


class SavedBlockStream(BlockStream):
    """The same stream for a checkpoint read through a key map (`checkpoints.statedict`: DCP folders, torch.save
    files, safetensors under a trainer's names). The key map's plan (`keymaps.Plan`) names the model tensors of each
    block and the checkpoint tensors they come from; those alone are read (`Saved.tensors(names)`) and mapped when
    the block's turn comes. `digest` is the whole route's (`start_tensor_digest` over the mapped state dict): each
    part's tensors are hashed as they are read, the output head's too, which is read for the digest alone."""

    def __init__(self, opened: OpenedCheckpoint, model, device: torch.device, dtype: torch.dtype, plan):
        self.plan, self.saved = plan, opened.saved
        self._lines: dict[str, str] = {}
        self._digest: Future = Future()
        self.digest = PendingDigest(self._digest)
        super().__init__(opened, model, device, dtype)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if not self._digest.done():
            self._digest.set_exception(RuntimeError("the replay stopped before every block was read"))

    def _group(self) -> dict:
        """The model's tensor names by the block they fall in (None: outside the blocks; "head": the output head),
        every name and shape checked against the model before any block runs."""
        check_state_dict(self.folder, self.plan.outputs, self.model)
        head = tuple(f"{n}." for n, m in self.model.named_modules() if self.head is not None and m is self.head)
        in_block = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.")
        groups: dict = {}
        for name in self.plan.outputs:
            m = in_block.match(name)
            part = "head" if head and name.startswith(head) else int(m.group(1)) if m else None
            groups.setdefault(part, []).append(name)
        return groups

    def _read(self, index: int | None) -> dict[str, torch.Tensor]:
        """A part's model tensors, from the checkpoint tensors feeding them; with the part outside the blocks, the
        head's, hashed and dropped."""
        targets = self.slices.get(index, []) + (self.slices.get("head", []) if index is None else [])
        try:
            tensors = self.plan.subset(self.saved.tensors(self.plan.feeding(targets)), targets)
        except CheckpointError:
            raise
        except Exception as e:
            where = "outside the blocks" if index is None else f"of block {index}"
            raise CheckpointError(self.folder, f"reading the tensors {where} failed: {describe(e)}") from e
        self._lines |= tensor_lines(tensors)
        if len(self._lines) == len(self.plan.outputs):
            self._digest.set_result(digest_of_lines(self._lines))
        pin, head = self.device.type == "cuda", set(self.slices.get("head", ()))
        kept = {k: t.to(self.dtype) for k, t in tensors.items() if k not in head}
        return {k: t.pin_memory() for k, t in kept.items()} if pin else kept

    def _load(self, index: int | None, tensors: dict[str, torch.Tensor]) -> None:
        part, prefix = (self.model, "") if index is None else (self.blocks[index], f"{self.prefix}.{index}.")
        part.load_state_dict(
            {k.removeprefix(prefix): t.to(self.device, non_blocking=True) for k, t in tensors.items()},
            strict=False,
            assign=True,
        )
        self._check_loaded(index, [])
