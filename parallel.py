"""
One process of a training run: alone, or one of torchrun's N. Under torchrun the processes train data parallel
(each holds the whole model; gradients are averaged by hand, Run.average_grads) or, with --fsdp, sharded
(fsdp.py); either way rank 0 prints, keeps the run folder and decides for all of them (Run.from_main).

    run = Run(sharded=cfg.fsdp)      # joins torchrun's process group if launched under it
"""

import os

import torch
import torch.distributed as dist

import fsdp


class Run:
    """Rank, device and printing for one process of a (possibly distributed) run. sharded: the model is
    sharded over the processes (--fsdp), so every rank runs every forward, and sync makes generation's tokens
    the same on all of them."""

    def __init__(self, sharded=False):
        self.ddp = "RANK" in os.environ
        if sharded and not self.ddp:
            raise ValueError("--fsdp shards the model over torchrun's processes: launch with "
                             "`torchrun --nproc-per-node N train.py ... --fsdp` (N >= 1), or drop --fsdp")
        # a caller that started the process group itself (a test running several runs) keeps it
        self.owns_group = self.ddp and not dist.is_initialized()
        if self.ddp:
            cuda = torch.cuda.is_available()
            self.device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
            if cuda:  # FSDP2 places shards on the current device
                torch.cuda.set_device(self.device)
            if self.owns_group:
                dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.main = self.rank == 0
        self.sharded = sharded
        self.sync = fsdp.same_tokens if sharded else None
        # what the run.json should say about how the data was made (e.g. the filter's survivors)
        self.record = {}

    def print(self, *a):
        if self.main:
            print(*a, flush=True)

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def from_main(self, obj):
        """Rank 0's obj on every rank (a decision they must all take alike)."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, x: float) -> float:
        if not self.ddp:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def average_grads(self, params):
        """Average the gradients over processes, in one all_reduce of all of them flattened. Done by hand
        rather than with DDP, whose reducer expects a gradient for every parameter the forward's outputs
        reach: MLPCT never reaches the last down_proj, ACT never the final norm, and compiled blocks make
        every weight of a block look reached. A parameter no process has a gradient for keeps None, so
        AdamW skips it as it does in one process. FSDP2 averages a sharded model's gradients itself."""
        if not self.ddp or self.sharded:
            return
        dev = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        dist.all_reduce(has)
        dist.all_reduce(flat)
        for p, got, g in zip(params, has.tolist(), flat.split([p.numel() for p in params])):
            if got:
                p.grad = g.view_as(p) / self.world

    def broadcast(self, params):
        """Start every process from rank 0's parameters (LoRA's random init included); a sharded model's are
        each rank's own."""
        if self.ddp and not self.sharded:
            for p in params:
                dist.broadcast(p.data, 0)
