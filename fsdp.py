"""
Sharded training for `torchrun --nproc-per-node N train.py ... --fsdp`: PyTorch's FSDP2 (fully_shard) on each
transformer block and on the root, so weights, gradients and AdamW's state are split over the N processes
(full fine-tuning holds ~18 bytes a parameter on one GPU: README, "Memory").

- Each rank builds the model on the meta device and reads only its own rows of every tensor from the
  safetensors files; no rank holds the whole model while loading it. The embedded GGUF model (135M) is read
  whole on each rank and then sharded: its tensors are quantized blocks, not rows to slice.
- Every forward of a sharded model is a collective (it all-gathers each block's weights), so every rank runs
  every forward: the same generations and measurements, whose results rank 0 keeps.
- The resumable training state is saved and loaded sharded (torch.distributed.checkpoint: each rank writes its
  own shards); the final weights are gathered once into one Hugging Face folder on rank 0.
"""

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from checkpoint import check_weights, hf_tensors, init_rope, load_gguf, locate
from model import Transformer
from tokenizer import Tokenizer

# LoRA's training state is its adapters: the frozen base is the model files, read again on resume
TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def load(name: str, run, adapters=None, theta0=False) -> tuple[Transformer, Tokenizer]:
    """The model `name` sharded over the run's processes. adapters(model) adds LoRA's adapters before
    sharding, so they are sharded with it; theta0=True: theta0's frozen copy, for full fine-tuning."""
    path = locate(name)
    if os.path.isdir(path):
        cfg, slices = hf_tensors(path)
        with torch.device("meta"):
            model = Transformer(cfg)
        check_weights(model, {k: s.get_shape() for k, s in slices.items()}, path)
        tok = Tokenizer.from_dir(path)
    else:
        if not theta0:  # said once, for the model
            run.print(f"--fsdp: {os.path.basename(path)} is read whole on each rank, then sharded "
                      f"(a GGUF holds quantized blocks, not rows to slice)")
        (model, tok), slices = load_gguf(path), None
    if theta0:
        model.requires_grad_(False)
    if adapters is not None:
        adapters(model)
    mesh = init_device_mesh(run.device.type, (run.world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the embeddings, the final norm and lm_head
    if slices is not None:
        model.load_state_dict(own_rows(model, slices, run.device), assign=True)
    return init_rope(model, run.device).eval(), tok


def own_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of a dim of n that FSDP2 gives this rank: it splits dim 0 as torch.chunk does,
    ceil(n / world) rows a rank, so the last ranks hold fewer or none."""
    size = -(-n // world)
    return min(rank * size, n), min((rank + 1) * size, n)


def own_rows(model, slices, device) -> dict:
    """The sharded model's state with this rank's rows of each weight read from the files; parameters that
    are not on the meta device (LoRA's adapters, made before sharding) keep their values."""
    state = {}
    for name, p in model.named_parameters():
        if p.device.type != "meta":
            state[name] = p
            continue
        start, stop = own_range(p.shape[0], p.device_mesh.get_local_rank(), p.device_mesh.size())
        rows = slices[name][start:stop].to(device=device, dtype=torch.float32)
        # a Parameter, which load_state_dict assigns as it is: a plain tensor would be wrapped in a new
        # Parameter per name, and tied embeddings would become two parameters
        shard = DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride())
        state[name] = torch.nn.Parameter(shard, p.requires_grad)
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def save_state(model, opt, path: str):
    """The trainable parameters and AdamW's state, each rank writing its own shards into the folder `path`
    (collective: every rank calls it)."""
    weights, optimizer = get_state_dict(model, opt, options=TRAINABLE)
    dcp.save({"model": weights, "optimizer": optimizer}, checkpoint_id=path)


def load_state(model, opt, path: str):
    """save_state's inverse, into a model and optimizer set up as the saved ones were (collective). AdamW
    holds no state for a parameter that never had a gradient (MLPCT never reaches the last down_proj), while
    get_state_dict makes one for every parameter to load into: only the saved ones are loaded, and the others
    stay absent, as they were in the run that saved them."""
    weights, optimizer = get_state_dict(model, opt, options=TRAINABLE)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    optimizer["state"] = {name: s for name, s in optimizer["state"].items()
                          if f"optimizer.state.{name}.step" in saved}
    state = {"model": weights, "optimizer": optimizer}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"], options=TRAINABLE)
    set_optimizer_state_dict(model, opt, state["optimizer"],
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_state(model) -> dict:
    """Every parameter whole, in CPU memory on rank 0 ({} on the others), for save_model (collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def same_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0's tokens on every rank (model.generate's sync)."""
    dist.broadcast(tokens, 0)
    return tokens
