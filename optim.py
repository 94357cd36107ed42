"""The optimizer: AdamW written out by hand over one flat vector of the trained weights, with its
state optionally sharded across data-parallel ranks (ZeRO stage 1), the collectives in plain sight."""

import math

import torch
import torch.distributed as dist


class FlatAdamW:
    """AdamW by hand over one flat vector of the trainable weights, its state optionally sharded
    across ranks (ZeRO stage 1). Every p.grad is a view into one flat gradient buffer, so backward
    accumulates into it in place and it is communicated as it lies. One step, t its count:

        g    = the ranks' average gradient                 all_reduce in buckets (shard=False), or
        g_r  = the same on rank r's shard only              reduce_scatter (shard=True)
        g    = g * min(1, clip / (||g|| + 1e-6))           ||g|| over all shards: one all_reduce
        w    = w (1 - lr wd)                               w: float32 master weights of the shard
        m    = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        w    = w - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)     torch.optim.AdamW's formula
        every rank's model gets the updated shards, cast to the model's dtype, one shard at a time

    A rank holds 12 bytes per weight / world_size (w, m, v in float32) when sharded, and bf16 weights
    get float32 master weights and moments, where an lr of 1e-6 does not round away. Unlike torch's
    AdamW, a weight that got no gradient in a step still decays and moves with its momentum (its
    gradient is 0, not None), as under DDP; every weight of our models gets a gradient every step."""

    def __init__(self, params, lr, weight_decay, betas, rank=0, world_size=1, shard=False, eps=1e-8,
                 bucket_elements=2**24, group=None):
        self.params = [p for p in params if p.requires_grad]
        if len({p.dtype for p in self.params}) != 1:
            raise ValueError(f"FlatAdamW needs one dtype for all trained weights, got {({p.dtype for p in self.params})}")
        self.total = sum(p.numel() for p in self.params)
        self.parts = world_size if shard else 1
        self.shard_size = math.ceil(self.total / self.parts)           # the last shard is padded with zeros
        self.rank, self.start = rank, (rank * self.shard_size if shard else 0)
        self.world_size, self.weight_decay, self.betas, self.eps = world_size, weight_decay, betas, eps
        self.bucket_elements = bucket_elements
        self.group = group                      # the ranks that train (None: all; see train.STUDENTS)
        self.param_groups = [{"lr": lr}]                                 # set by the loop, as on torch's optimizers
        device, dtype = self.params[0].device, self.params[0].dtype
        self.grads = torch.zeros(self.shard_size * self.parts, dtype=dtype, device=device)
        self.master = torch.zeros(self.shard_size, dtype=torch.float32, device=device)
        for p, offset in zip(self.params, self.offsets()):
            p.grad = self.grads[offset:offset + p.numel()].view_as(p)
            self.copy_overlap(p.detach().reshape(-1), offset, self.master, self.start)
        self.exp_avg, self.exp_avg_sq, self.step_count = torch.zeros_like(self.master), torch.zeros_like(self.master), 0

    def offsets(self):
        offset = 0
        for p in self.params:
            yield offset
            offset += p.numel()

    @staticmethod
    def copy_overlap(source, source_start, target, target_start):
        """Copy the part of source (flat, at source_start in the whole vector) that falls in target."""
        lo, hi = max(source_start, target_start), min(source_start + source.numel(), target_start + target.numel())
        if lo < hi:
            target[lo - target_start:hi - target_start].copy_(source[lo - source_start:hi - source_start])

    def zero_grad(self):
        self.grads.zero_()

    @torch.no_grad()
    def average_gradients(self):
        """The ranks' mean gradient over this rank's shard, in float32 (the communication of a step)."""
        if self.parts > 1:
            shard = torch.empty(self.shard_size, dtype=self.grads.dtype, device=self.grads.device)
            dist.reduce_scatter_tensor(shard, self.grads, group=self.group)
        else:
            shard = self.grads
            if self.world_size > 1:
                for bucket in self.grads.split(self.bucket_elements):    # a few calls, not one per weight
                    dist.all_reduce(bucket, group=self.group)
        return shard.float().div_(self.world_size)     # in place in float32: the buffer is zeroed after the step

    @torch.no_grad()
    def update(self, grad, grad_clip):
        """Clip, AdamW on the shard, send the new weights to every rank's model; returns the norm."""
        # sum of squares in float64, a slice at a time (no float64 copy of the whole shard)
        norm_sq = sum(piece.double().pow(2).sum() for piece in grad.split(self.bucket_elements))
        if self.parts > 1:
            dist.all_reduce(norm_sq, group=self.group)
        norm = norm_sq.sqrt().item()
        grad.mul_(min(1.0, grad_clip / (norm + 1e-6)))
        lr, (beta1, beta2) = self.param_groups[0]["lr"], self.betas
        self.step_count += 1
        self.master.mul_(1 - lr * self.weight_decay)
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** self.step_count)).add_(self.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-lr / (1 - beta1 ** self.step_count))
        for source, piece in self.shards(self.master.to(self.params[0].dtype)):
            for p, offset in zip(self.params, self.offsets()):
                self.copy_overlap(piece, source * self.shard_size, p.detach().view(-1), offset)
        self.zero_grad()
        return norm

    def shards(self, tensor):
        """(source rank, its shard of `tensor`) for every rank in turn, one shard in flight at a time (a
        broadcast each); `tensor` itself is never overwritten. Unsharded: (0, tensor)."""
        if self.parts == 1:
            yield 0, tensor
            return
        buffer = torch.empty_like(tensor)
        for source in range(self.parts):
            if source == self.rank:
                buffer.copy_(tensor)
            dist.broadcast(buffer, src=source, group=self.group)  # the student ranks are ranks 0..S-1
            yield source, buffer

    def layout(self):
        return [(tuple(p.shape), str(p.dtype)) for p in self.params]

    def state_dict(self):
        """The whole state in rank 0's CPU memory (every rank must call it: it gathers the shards one
        at a time), with the weights' layout, so that a checkpoint resumes on any world size."""
        state = {"step_count": self.step_count, "layout": self.layout()}
        for name in ("master", "exp_avg", "exp_avg_sq"):
            whole = torch.zeros(self.total) if self.rank == 0 else None
            for source, piece in self.shards(getattr(self, name)):
                if self.rank == 0:
                    self.copy_overlap(piece.cpu(), source * self.shard_size, whole, 0)
            state[name] = whole
        return state

    def load_state_dict(self, state, where="the checkpoint"):
        """This rank's shard of a saved state (the whole vectors may be memory-mapped: only the shard is read)."""
        if state.get("layout") != self.layout():
            raise SystemExit(f"error: {where} holds optimizer state for other trained weights than this run's "
                             f"(did --freeze_vision, --cue_recovery or the model change?); resume with the same "
                             f"settings, or start a new run with --init_from")
        self.step_count = state["step_count"]
        for name in ("master", "exp_avg", "exp_avg_sq"):
            target = getattr(self, name)
            target.zero_()
            self.copy_overlap(state[name], 0, target, self.start)
