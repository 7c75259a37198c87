"""A fixed number of gradient chunks per step, computed by as many processes as the machine allows (the VQGAN and the
pre-training of paper Sec. 3's foundation model, reproduce.py --foundation_ranks).

Why: "same command, same numbers". A data-parallel run whose rank count followed the machine's cores would change
the arithmetic with the machine. Here the count R is a setting: every optimizer step's gradient is the sum, in chunk
order, of the gradients of R contiguous chunks of the global batch. Where R cores are usable, R processes (CPU, gloo,
one thread each) compute one chunk each; elsewhere one process computes the R chunks one after another (gradient
accumulation). Both add the same numbers in the same order, so the weights are bit-identical (tests/test_ranks.py).

- Chunks: which chunks this process computes, and the exchanges between processes (gather in chunk order, ordered
  gradient sum). In one process they are no-ops or plain concatenations.
- launch: runs a function as R rank processes (torch.multiprocessing, a FileStore rendezvous in a temporary folder:
  no TCP port to pick) or in this process, and returns rank 0's result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing


@dataclass(frozen=True)
class Chunks:
    n: int = 1  # chunks per global batch (R): fixes the arithmetic, whatever the process count
    rank: int = 0  # this process among `world`
    world: int = 1  # processes: 1 (all chunks here, in order) or n (one chunk each)

    @property
    def mine(self) -> range:
        """The chunk indices this process computes."""
        per = self.n // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """This process's chunks of a global batch x (B, ...): contiguous B / n rows each, in chunk order."""
        if self.n == 1:
            return [x]
        size = x.shape[0] // self.n
        return [x[k * size : (k + 1) * size] for k in self.mine]

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The tensors of all n chunks (this process's `parts`, one per chunk in `mine`), concatenated on dim 0 in
        chunk order, on every process."""
        local = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.world == 1:
            return local
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local.contiguous())
        return torch.cat(out)

    def total(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The sum over the n chunks of per-chunk values (each (...)), from the same gathered tensor everywhere."""
        if self.n == 1:
            return parts[0]
        return self.gather([p.unsqueeze(0) for p in parts]).sum(0)

    def sum_grads(self, params) -> None:
        """Make every .grad the sum of the chunks' gradients in chunk order, (g0 + g1) + g2 ..., as autograd's
        accumulation adds them in one process (the chunks' backward passes one after another)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (all gradient elements,)
        out = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(out, flat)
        total = out[0]
        for part in out[1:]:
            total += part
        for g, t in zip(grads, total.split([g.numel() for g in grads])):
            g.copy_(t.view_as(g))


ONE_CHUNK = Chunks()  # the whole batch in this process: the computation without chunks


def launch(fn, n: int, processes: bool, folder: str, *args, threads: int = 1, **kw):
    """fn(*args, **kw, chunks=Chunks(...)) with n chunks: as n rank processes when `processes` (each with `threads`
    torch threads), else here. Returns rank 0's result. The processes' arguments, rendezvous and result are files in
    a temporary folder inside `folder`, removed afterwards."""
    if n == 1 or not processes:
        return fn(*args, **kw, chunks=Chunks(n))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ranks-", dir=folder)
    try:
        # the arguments go through a file: torch.multiprocessing would pass their tensors as shared memory, and the
        # ranks' optimizers would then all step the same weights
        torch.save((fn, args, kw), os.path.join(tmp, "args.pt"))
        torch.multiprocessing.spawn(_rank, (n, tmp, threads), nprocs=n)
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rank(rank: int, n: int, tmp: str, threads: int):
    """One rank process of `launch`."""
    torch.set_num_threads(threads)  # a spawned process starts with torch's default (one per core)
    os.environ["LOCAL_RANK"] = str(rank)  # torchrun's variable: the folder locks of the launcher are this rank's too
    fn, args, kw = torch.load(os.path.join(tmp, "args.pt"), weights_only=False)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), n), rank=rank, world_size=n)
    try:
        result = fn(*args, **kw, chunks=Chunks(n, rank, n))
        if rank == 0:
            torch.save(result, os.path.join(tmp, "result.pt"))
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()
