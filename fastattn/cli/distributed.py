"""torchrun support: DDP (gloo on CPU, NCCL on GPU), FSDP (fully_shard) and tensor parallelism (--tp).

``Single`` is the one-process case; ``setup`` returns it unless torchrun's environment (WORLD_SIZE > 1) is set.
Every rank draws the same global batch (the same data generator) and takes its slice, so N processes at
--batch-size B train exactly what one process at --batch-size N*B does (tests check it). Under --tp all ranks of the
group take the whole batch (tensor parallelism only: --tp must equal the number of processes).

Rank 0 logs. DDP keeps whole weights on every rank, so rank 0 writes the usual checkpoint; FSDP and TP write their
sharded state with torch.distributed.checkpoint (every rank its part) into the same atomically renamed folder, and
rank 0 exports the gathered model to RUN/model at the end.
"""
import contextlib
import gc
import json
import os
import sys
import warnings

import torch


class Single:
    rank, world, replicated = 0, 1, True
    dp_rank, dp_world = 0, 1
    device = None

    def wrap(self, model, cfg, find_unused=False):
        return model

    def no_sync(self, model, skip):
        return contextlib.nullcontext()

    def mean(self, x):
        return x

    def total(self, x):
        return x

    def any(self, flag):
        return bool(flag)

    def barrier(self):
        pass

    def close(self, finished=True):
        pass


class Distributed(Single):
    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_world = self.rank, self.world
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.kind = "ddp"

    def wrap(self, model, cfg, find_unused=False):
        """model for --tp, --fsdp or DDP; find_unused: parameters the task's loss never reaches (BERT's NSP head in
        MLM-only training), which DDP must be told of."""
        from fastattn.cli.config import CLIError
        if cfg.tp > 1:
            if cfg.tp != self.world:
                raise CLIError(f"--tp {cfg.tp}: tensor parallelism runs over all {self.world} processes "
                               "(--tp must equal --nproc_per_node x nodes)")
            if cfg.mode == "lora":
                raise CLIError("--tp with --mode lora: the adapters are not split across ranks; use DDP or --fsdp")
            self.kind, self.replicated, self.dp_rank, self.dp_world = "tp", False, 0, 1
            return tensor_parallel(model, self.world, self.device)
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            self.kind, self.replicated = "fsdp", False
            for p in model.parameters():  # FSDP shards contiguous parameters only
                p.data = p.data.contiguous()
            for block in _blocks(model):
                fully_shard(block)
            fully_shard(model)
            # FSDP2 warns when a wrapped block returns a view, in case the caller modifies it in place (that would
            # skip its pre-backward all-gather). A block's outputs are views of torch's own 3-D F.linear with bias
            # (and of add+norm's rows), and fastattn.models never modify them in place: the 2-process FSDP tests
            # match one process. The same warning for the user's own modules still shows.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor",
                                    category=UserWarning)
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused)

    def no_sync(self, model, skip):
        if skip and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def mean(self, x):
        t = torch.tensor([float(x)], device=self.device)
        self.dist.all_reduce(t)
        return t.item() / self.world

    def total(self, x):
        """x summed over the data-parallel processes (tensor-parallel ranks hold the same x)."""
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.item() * self.dp_world / self.world

    def any(self, flag):
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t)
        return t.item() > 0

    def barrier(self):
        self.dist.barrier()

    def close(self, finished=True):
        """finished: every rank got here normally, so wait for all of them (a gloo barrier also waits for this
        rank's collectives still in flight, e.g. a gather's unwaited AsyncCollectiveTensors) before tearing the
        group down; tearing it down under a peer's running collective aborts the process. After an error, no
        barrier: the other ranks may never come. Then the run's garbage is collected while the groups and the
        interpreter are alive: the FSDP / tensor-parallel model sits in reference cycles, and freed only at
        interpreter exit, with gloo's works on its tensors, it aborted a rank now and then ("terminate called
        without an active exception", after a finished run: CI once, and once on torch 2.11)."""
        if finished:
            self.dist.barrier()
        gc.collect()
        self.dist.destroy_process_group()

    # ---- sharded checkpoints (FSDP, TP) ----
    def save_sharded(self, trainer, tag=None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from fastattn.cli import checkpoint as ckpt
        name = tag or f"ckpt-{trainer.step:07d}"
        tmp = trainer.run_dir / f".{name}.tmp-sharded"
        if self.rank == 0:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        state = {"model": get_model_state_dict(trainer.model),
                 "optim": get_optimizer_state_dict(trainer.model, trainer.opt)}
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
        torch.save({"rng": torch.get_rng_state()}, tmp / f"rng-rank{self.rank}.pt")
        self.barrier()
        if self.rank == 0:
            files = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"step": trainer.step, "task": trainer.cfg.task, "arch": trainer.arch,
                    "sharded": self.kind, "world": self.world, "train_config": trainer.meta_config(),
                    **trainer.label_meta()}
            writers = {k: (lambda p, src=v: os.replace(src, p)) for k, v in files.items()}
            writers["train_state.json"] = lambda p: p.write_text(json.dumps(meta, indent=2))
            writers["state.pt"] = lambda p: torch.save({"step": trainer.step, "data_rng": trainer.gen.get_state()}, p)
            writers["tokenizer.json"] = lambda p: trainer.tok.save(p)
            writers.update(trainer.carry)  # (the starting folder's generation_config.json)
            ckpt.write_folder(trainer.run_dir / name, writers)
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            if tag is None:
                ckpt.prune(trainer.run_dir, trainer.cfg.keep)
        self.barrier()
        return trainer.run_dir / name

    def load_sharded(self, trainer):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        from fastattn.cli import checkpoint as ckpt
        from fastattn.cli.config import CLIError
        path = ckpt.resume_point(trainer.run_dir, self.rank == 0, self.barrier,
                                 warn=lambda m: print(m) if self.rank == 0 else None)
        if path is None or not (path / "dcp").is_dir():
            raise CLIError(f"--resume: no valid sharded checkpoint in {trainer.run_dir}")
        if self.rank == 0:
            ckpt.set_aside_newer(trainer.run_dir, path)
        state = {"model": get_model_state_dict(trainer.model),
                 "optim": get_optimizer_state_dict(trainer.model, trainer.opt)}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(trainer.model, state["model"])
        set_optimizer_state_dict(trainer.model, trainer.opt, state["optim"])
        rng = path / f"rng-rank{self.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=True)["rng"])
        extra = ckpt.load_state(path)
        trainer.gen.set_state(extra["data_rng"])
        trainer.step = extra["step"]
        if self.rank == 0:
            print(f"resumed from {path} at step {trainer.step} (sharded, {self.kind})", file=sys.stderr)

    def full_state_dict(self, model):
        """The whole model's state dict on rank 0 (gathered from the shards; TP's fused projections' rows put back in
        the model's order)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _unpermute(sd, model.config, self.world) if self.kind == "tp" else sd


def _blocks(model):
    for m in model.modules():
        if type(m).__name__ == "Block":
            yield m


def _rank_order(sizes, tp):
    """Row order of a fused projection of segments ``sizes`` ([q | k | v], or SwiGLU's [gate | up]) that gives
    rank r, in one contiguous chunk, the r-th 1/tp of every segment in turn."""
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    return torch.cat([torch.arange(s + r * (n // tp), s + (r + 1) * (n // tp))
                      for r in range(tp) for s, n in zip(starts, sizes)])


def _fused_segments(cfg):
    """{parameter name suffix: segment sizes} of the fused projections that tensor parallelism reorders."""
    D = cfg.head_dim
    out = {"attn.wqkv": [cfg.n_head * D, cfg.n_kv_head * D, cfg.n_kv_head * D]}
    if getattr(cfg, "mlp", "gelu") in ("swiglu", "geglu"):
        out["mlp.w_in"] = [cfg.d_ff, cfg.d_ff]
    return out


def _unpermute(sd, cfg, tp):
    """A full state dict of a tensor-parallel model with its fused projections' rows back in the model's order."""
    orders = {"." + k: _rank_order(v, tp) for k, v in _fused_segments(cfg).items()}
    out = {}
    for key, t in sd.items():
        module = "." + key.rpartition(".")[0]  # ".blocks.0.attn.wqkv" (not ".cross_attn.wqkv": not split)
        order = next((o for suffix, o in orders.items() if module.endswith(suffix)), None)
        if order is not None:
            t, put = torch.empty_like(t), t
            t[order] = put
        out[key] = t
    return out


def tensor_parallel(model, tp, device):
    """Megatron-style: every self-attention's wqkv and the MLP's w_in column-parallel, wo and w_out row-parallel,
    over all ranks; each rank keeps n_head / tp heads (n_kv_head / tp key/value heads) and d_ff / tp MLP units. The
    fused projections' rows are reordered first so that each rank's column shard holds its part of every segment."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from fastattn.cli.config import CLIError
    cfg = model.config
    if cfg.n_head % tp or cfg.n_kv_head % tp:
        raise CLIError(f"--tp {tp}: n_head={cfg.n_head} and n_kv_head={cfg.n_kv_head} must be divisible by it")
    if cfg.d_ff % tp:
        raise CLIError(f"--tp {tp}: d_ff={cfg.d_ff} must be divisible by it")
    if getattr(cfg, "n_experts", 0):
        raise CLIError(f"--tp {tp}: a mixture-of-experts model is not supported by tensor parallelism (--fsdp shards "
                       f"it)")
    if getattr(cfg, "qk_norm", False):  # its weights would see only each rank's heads: gradients partial per rank
        raise CLIError(f"--tp {tp}: a model with qk_norm (Qwen3-style) is not supported by tensor parallelism")
    if getattr(cfg, "rel_pos_buckets", 0) or getattr(cfg, "relative_buckets", 0):  # (their tables span all heads)
        raise CLIError(f"--tp {tp}: relative-position attention (DeBERTa's, T5's, MPNet's) is not supported by "
                       "tensor parallelism (--fsdp shards it)")
    mesh = init_device_mesh(device.type, (tp,))
    orders = {k: _rank_order(v, tp) for k, v in _fused_segments(cfg).items()}
    for block in _blocks(model):
        with torch.no_grad():
            for name, order in orders.items():
                lin = block.get_submodule(name)
                lin.weight.copy_(lin.weight[order])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias[order])
        attn = block.attn
        attn.n_head, attn.n_kv_head = cfg.n_head // tp, cfg.n_kv_head // tp
        parallelize_module(block, mesh, {"attn.wqkv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
                                         "mlp.w_in": ColwiseParallel(), "mlp.w_out": RowwiseParallel()})
        for lin in (attn.wo, block.mlp.w_out):
            lin.register_forward_hook(lambda mod, args, out: _waited(out))
    return model


def _waited(t):
    """A row-parallel output is an AsyncCollectiveTensor, its all-reduce still in flight: a tensor subclass that
    fastattn's C++ ops must not read as raw memory. Wait for it."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    return t.clone() if isinstance(t, AsyncCollectiveTensor) else t  # an aten op waits; .wait() would drop the graph


def setup(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Distributed()
    if getattr(cfg, "tp", 1) > 1:
        from fastattn.cli.config import CLIError
        raise CLIError(f"--tp {cfg.tp}: tensor parallelism needs torchrun with {cfg.tp} processes "
                       f"(torchrun --nproc_per_node {cfg.tp} -m fastattn train ...); one process here")
    return Single()
