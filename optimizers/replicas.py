"""What an optimizer step needs to know of the other data-parallel processes (one process: nothing).

Which gradients are synchronised in a sharpness-aware step is a choice of algorithm (docs/pitfalls.md §28).

Every backward the optimizers take is of an objective ``Σ_i c_i l_i`` over this process's examples, with
coefficients c that sum to 1 over the examples of a *group* of processes: all of them for the global batch, or this
process alone (``--local-ascent``'s ascent). The gradients are then averaged over all W processes, which divides by
W; so a process multiplies its objective by the size of the group its coefficients are normalised over (W for the
global batch, 1 for its own share). With uniform coefficients c_i = 1/N (N the group's examples), the averaged
gradient is exactly the gradient of the mean loss over the group's examples, whatever the split.

Why explicit all-reduces rather than ``DistributedDataParallel``'s backward hooks: a sharpness-aware step has
backward passes that need different synchronisation (the ascent: global, or none with ``--local-ascent``; the
descent: always, and before GSAM's or LookSAM's combination in the global case), probe forwards without a backward
(δ-SAM), backward passes on a subset of the batch (efficient SAM, ESAM), and gradient accumulation that must
synchronise once. DDP's reducer synchronises in every backward of its wrapped forward and has to be steered
through ``no_sync`` and ``find_unused_parameters`` for each of these cases; here the optimizer all-reduces at the
points the algorithm defines, in buckets of one flat buffer. The price: communication does not overlap the
backward (on the CPU with gloo measured in ``benchmarks/distributed.py``).
"""

from __future__ import annotations

import torch

#: elements per all-reduce bucket of the gradient average (100 MB of float32): bounds the extra memory
BUCKET_ELEMENTS = 25_000_000


class Replicas:
    """One process: every collective is the identity. The base of :class:`ProcessGroupReplicas`."""

    world_size: int = 1
    rank: int = 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (a new tensor; ``tensor`` is left as it was)."""
        return tensor.clone()

    def gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """The 1-D ``tensor`` of every process concatenated in rank order, and where this process's part lies."""
        return tensor, slice(0, tensor.numel())

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace every ``p.grad`` by its mean over the processes."""

    def agree(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any of them (all processes must call it)."""
        return flag

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every process (a decision, an error message: sent as bytes, never pickled)."""
        return text

    def gather_tensors(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` (the same shape and dtype on every process) of every process, in rank order."""
        return [tensor]

    def barrier(self) -> None:
        """Wait until every process got here."""


SINGLE = Replicas()


class ProcessGroupReplicas(Replicas):
    """The processes of torch.distributed's default group (``torchrun`` starts them; gloo on CPUs, NCCL on GPUs).

    Collective tensors live on ``device`` (NCCL only reduces CUDA tensors); results come back there too.
    """

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupReplicas needs torch.distributed.init_process_group() first")
        self.dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.device = device

    def sum(self, tensor):
        total = tensor.detach().to(self.device, copy=True)
        self.dist.all_reduce(total)
        return total.to(tensor.device)

    def gather(self, tensor):
        local = tensor.detach().reshape(-1).to(self.device)
        counts = [int(c) for c in self.gather_tensors(torch.tensor([local.numel()], device=self.device))]
        padded = torch.zeros(max(counts), dtype=local.dtype, device=self.device)
        padded[: local.numel()] = local
        parts = self.gather_tensors(padded)
        whole = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).to(tensor.device)
        start = sum(counts[: self.rank])
        return whole, slice(start, start + counts[self.rank])

    def gather_tensors(self, tensor):
        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self.dist.all_gather(parts, local)
        return [part.to(tensor.device) for part in parts]

    def average_gradients(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in grads:
            bucket.append(grad)
            size += grad.numel()
            if size >= BUCKET_ELEMENTS:
                self._average_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._average_bucket(bucket)

    def _average_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def agree(self, flag):
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0)

    def broadcast_text(self, text):
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        length = torch.tensor([data.numel()], device=self.device)
        self.dist.broadcast(length, src=0)
        if self.rank != 0:
            data = torch.zeros(int(length), dtype=torch.uint8, device=self.device)
        self.dist.broadcast(data, src=0)
        return bytes(data.cpu().tolist()).decode()

    def barrier(self):
        self.dist.barrier()
