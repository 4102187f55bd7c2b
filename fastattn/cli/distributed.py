"""torchrun support: DDP (gloo on CPU, NCCL on GPU), FSDP (fully_shard) and tensor parallelism.

``Single`` is the one-process case; ``setup`` returns it unless torchrun's environment (WORLD_SIZE > 1) is set.
Rank 0 logs and writes checkpoints; gradients are averaged by DDP, so every rank holds the same weights.
"""
import contextlib
import os

import torch


class Single:
    rank, world, replicated = 0, 1, True
    device = None

    def wrap(self, model, cfg):
        return model

    def no_sync(self, model, skip):
        return contextlib.nullcontext()

    def mean(self, x):
        return x

    def any(self, flag):
        return bool(flag)

    def close(self):
        pass


class DDP(Single):
    """Data parallel over torchrun's processes (each samples its own batches: the global batch is world x local)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    def wrap(self, model, cfg):
        if cfg.fsdp or cfg.tp > 1:
            from fastattn.cli.config import CLIError
            raise CLIError("--fsdp / --tp are not available in this build; use plain DDP")
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def no_sync(self, model, skip):
        return model.no_sync() if skip else contextlib.nullcontext()

    def mean(self, x):
        t = torch.tensor([float(x)], device=self.device)
        self.dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag):
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t)
        return t.item() > 0

    def close(self):
        self.dist.destroy_process_group()


def setup(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DDP()
    return Single()
