"""Training: config + CLI, manual data parallel, the loop, checkpoints, logs and the report.

    python train.py                                  # the embedded default: SFT, then ViCuR, then evaluation
    python train.py --mode=sft --out_dir=out/sft     # any Config field as --key=value
    torchrun --nproc_per_node=2 train.py             # data parallel (gloo on CPU, nccl on GPU)

A run writes into out_dir: config.json, log.jsonl (one line of metrics per step),
ckpt/ (model + processor, save_pretrained; training state in ckpt/train_state.pt),
eval.json and report.md. A distillation mode started from a tiny (random) student without
--init_from first runs an SFT stage into out_dir/sft, and reuses it when it is complete.
"""

import copy
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cue_recovery
from data import (collate, completion_token_ids, describe_sample, eval_world, load_jsonl, make_world, student_messages,
                  to_device)
from distill import (check_same_tokenizer, completion_logits, distill_loss, entropy, hint_leakage, hint_text,
                     privilege_gap, probe_log_ratio, ptd_reference, ptdpo_loss, rollout_completions, scoring_batch,
                     teacher_logits, teacher_messages, token_logprobs)
from evaluate import evaluate, format_table, score_sample
from model import TINY_SIZES, load_model, memory_plan, num_parameters, tiny_processor
from rollout import sample


@dataclass
class Config:
    # the run: what trains, on what data, into which folder
    mode: str = "vicur"              # sft | opd (stronger teacher) | opsd (self teacher + answer hint)
                                     # | vicur (self teacher + cue hint, student with the cue recovery module)
                                     # | ptdpo (GRPO + privileged tutoring of failed rollouts)
    student: str = "tiny"            # 'tiny', 'tiny-large', a transformers id or a local checkpoint directory
    init_from: str = ""              # start from this checkpoint directory instead of `student`
    data: str = ""                   # a JSONL file (data.py format); empty = the embedded world
    eval_data: str = ""              # a JSONL file to evaluate on; empty = the last num_eval samples of --data
    skip_bad: bool = False           # skip and count bad JSONL lines instead of stopping
    num_train: int = 8000            # embedded world: training samples (in-domain families)
    num_eval: int = 350              # embedded world: evaluation samples (all seven families)
    out_dir: str = "out/default"     # config.json, log.jsonl, ckpt/, eval.json and report.md go here
    # optimisation
    max_steps: int = 2400            # optimizer steps
    batch_size: int = 16             # per rank, per micro-step
    grad_accum: int = 1              # micro-steps per optimizer step
    lr: float = 1e-3                 # peak learning rate (AdamW, betas 0.9 / 0.95)
    min_lr_ratio: float = 0.1        # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50           # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.01       # AdamW's decoupled weight decay
    grad_clip: float = 1.0           # clip the global gradient norm to this
    seed: int = 0                    # the world, the data order, the rollouts' generators
    eval_every: int = 0              # 0: evaluate only at the end
    save_every: int = 500            # steps between checkpoints (and one at the end)
    resume: bool = False             # continue from out_dir/ckpt
    max_length: int = 512            # longest prompt + completion, in tokens
    max_new_tokens: int = 96         # evaluation and rollouts
    eval_batch_size: int = 64        # prompts per batch in evaluation
    # on-policy distillation
    teacher: str = "self"            # 'self' (a frozen copy of the starting student) or a model name / checkpoint
    privilege: str = ""              # none | answer | rationale | cues | cues+crops; empty = the mode's default
    loss: str = "sampled_rkl"        # sampled_rkl (the paper's) | fkl | rkl | jsd | topk_jsd
    beta: float = 0.5                # jsd / topk_jsd mixture weight
    top_k: int = 100                 # topk_jsd: the student's top-K tokens
    num_rollouts: int = 1            # completions per prompt
    temperature: float = 1.0         # sampling temperature of the rollouts
    ppo_epochs: int = 1              # updates per batch of rollouts (ratio = 1 on the first)
    clip_eps: float = 0.2            # PPO's clip: the ratio is kept in [1 - clip_eps, 1 + clip_eps]
    dual_clip: float = 0.0           # dual-clip PPO: bound a negative-advantage token's loss by -c A (verl and
                                     # PTD-PO use c = 3); 0 = off
    # ViCuR: the student's sink-token cue recovery module (cue_recovery.py)
    cue_recovery: bool = True        # vicur mode: attach it (false = the cue hint without the module)
    sink_every: int = 0              # a module after every sink_every-th layer; 0 = 5 on >= 10 layers, else 1
    cue_init: str = "zero"           # zero: W_O = 0, an exact no-op at the start | default: nn.Linear's init
    # PTD-PO: GRPO on the reward + Top-K JSD to the hint-conditioned reference on failed rollouts
    kl_coef: float = 0.0             # k3 KL to the reference policy, in groups that are not tutored
    ptd_coef: float = 0.05           # weight of the tutoring term (0: plain GRPO)
    ptd_tau: float = 1.0             # a group with accuracy below tau is tutored (1.0: any failure)
    ptd_all_rollouts: bool = False   # tutor every rollout of such a group, not only the failed ones
    ptd_entropy_coef: float = 0.0    # entropy bonus on the tutored rollouts
    ptd_stop_grad: bool = False      # no gradient through p_S where it weights KL(p_S || M): then the
                                     # JSD's gradient is identically 0 (see distill.divergence), so off
    # the SFT stage before distilling a tiny (random) student without --init_from
    sft_steps: int = 1600            # steps of that SFT stage
    # SFT: the share of samples shown with privileged context, and of scene descriptions
    sft_cue_frac: float = 0.4        # with the cue hint in the prompt
    sft_answer_frac: float = 0.1     # with the answer hint in the prompt
    sft_describe_frac: float = 0.2   # a scene description instead of a question
    # hardware and memory
    dry_run: bool = False            # print the per-GPU memory plan and stop (no weights are loaded)
    device: str = "cpu"              # cpu or cuda (each torchrun rank takes cuda:LOCAL_RANK)
    threads: int = 0                 # CPU threads per rank; 0 = all cores shared among the ranks
    dtype: str = "float32"           # float32 or bfloat16 (weights; the optimizer keeps float32 master weights)
    shard_optimizer: bool = False    # split the optimizer's state (master weights, moments) across ranks
    grad_ckpt: bool = False          # recompute each decoder layer's activations in the backward pass
    freeze_vision: bool = False      # train the language model (and the cue module), not the vision tower


PAPER = {  # the paper's settings: global batch 128 (8 ranks x 2 x 8 micro-steps), lr 1e-6, prompts up to
    # 2,048 and responses up to 4,096 tokens, one rollout per prompt, 5 epochs = 275 steps; bf16 on GPUs,
    # and here the optimizer state sharded and activations recomputed, so that each fits an 80 GB card
    "mode": "vicur", "batch_size": 2, "grad_accum": 8, "lr": 1e-6, "warmup_steps": 0, "max_length": 6144,
    "max_new_tokens": 4096, "num_rollouts": 1, "max_steps": 275, "dtype": "bfloat16", "device": "cuda",
    "shard_optimizer": True, "grad_ckpt": True}
PRESETS = {
    # name: overrides; a preset is a plain dict applied before the command line
    "smoke": {"max_steps": 20, "sft_steps": 20, "num_train": 200, "num_eval": 56, "batch_size": 8, "eval_every": 0},
    "qwen3vl-2b": {**PAPER, "student": "Qwen/Qwen3-VL-2B-Instruct"},  # OPD: --teacher=Qwen/Qwen3-VL-8B-Instruct
    # the same global batch in micro-batches of 1 (8 ranks x 1 x 16): the logits of 2 x 6,144 tokens do not fit
    "qwen3vl-8b": {**PAPER, "student": "Qwen/Qwen3-VL-8B-Instruct", "batch_size": 1, "grad_accum": 16},
    # OPD: --teacher=Qwen/Qwen3-VL-32B-Instruct
}
# where a distillation mode's defaults differ from the Config defaults (which are SFT's)
DISTILL_DEFAULTS = {"max_steps": 120, "lr": 2e-4, "warmup_steps": 10}
PTDPO_DEFAULTS = {"num_rollouts": 8, "batch_size": 4}  # groups of 8 rollouts, as in the paper
# fields that do not change what SFT learns: a complete SFT stage is reused whatever they are
SFT_NEUTRAL = {"resume", "device", "threads", "num_eval", "eval_batch_size", "eval_every", "save_every",
               "max_new_tokens", "eval_data", "skip_bad", "shard_optimizer", "grad_ckpt"}
# the fields that only distillation reads: reset to their defaults for the SFT stage
DISTILL_FIELDS = ["teacher", "privilege", "loss", "beta", "top_k", "num_rollouts", "temperature", "ppo_epochs",
                  "clip_eps", "dual_clip", "cue_recovery", "sink_every", "cue_init", "kl_coef", "ptd_coef", "ptd_tau",
                  "ptd_all_rollouts", "ptd_entropy_coef", "ptd_stop_grad", "sft_steps"]


def config_help():
    """--help: every Config field with its type, default and the comment beside it in the dataclass,
    under the dataclass's own group comments, then the presets."""
    lines = ["usage: python train.py [--key=value ...]   (torchrun --nproc_per_node=N train.py ... for data parallel)",
             "", "Every Config field of train.py, as --key=value (a bool flag alone means true):", ""]
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(Config)}
    for line in inspect.getsource(Config).splitlines()[2:]:
        code, _, comment = line.partition("#")
        if ":" in code and code.split(":")[0].strip() in types:
            name = code.split(":")[0].strip()
            default = repr(getattr(Config, name))
            lines.append(f"  --{name}={default}".ljust(34) + f" {types[name]:<6} {comment.strip()}")
        elif comment and not code.strip() and line.startswith("    #"):
            lines.append(f"\n {comment.strip()}")                       # a group comment of the dataclass
        elif comment:
            lines.append(" " * 42 + comment.strip())                     # a comment's continuation
    lines += ["", "Presets (--preset=NAME applies these before the command line):"]
    lines += [f"  {name}: {' '.join(f'--{k}={v}' for k, v in overrides.items())}" for name, overrides in PRESETS.items()]
    lines += ["", f"A distillation mode ({', '.join(DISTILL_MODES)}) sets, unless given: "
              + " ".join(f"--{k}={v}" for k, v in DISTILL_DEFAULTS.items()) + "; ptdpo also "
              + " ".join(f"--{k}={v}" for k, v in PTDPO_DEFAULTS.items()) + "."]
    return "\n".join(lines)


def parse_args(argv):
    """--key=value overrides of Config, types checked; --preset=NAME applies a dict of overrides first."""
    if "--help" in argv or "-h" in argv:
        print(config_help())
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in argv:
        if arg.startswith("--") and "=" not in arg and type(getattr(Config, arg[2:], None)) is bool:
            arg += "=true"                                              # --resume means --resume=true
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value, got '{arg}'")
        key, value = arg[2:].split("=", 1)
        if key == "preset":
            if value not in PRESETS:
                raise SystemExit(f"error: unknown preset '{value}'; known: {sorted(PRESETS)}")
            overrides = {**PRESETS[value], **overrides}
            continue
        if key not in fields:
            raise SystemExit(f"error: unknown config key '{key}'; known keys: {', '.join(sorted(fields))}")
        kind = type(fields[key].default)
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                overrides[key] = value.lower() in ("true", "1")
            else:
                overrides[key] = kind(value)
        except ValueError:
            raise SystemExit(f"error: --{key} expects a {kind.__name__}, got '{value}'") from None
    if overrides.get("mode", Config.mode) in DISTILL_MODES:
        overrides = {**DISTILL_DEFAULTS, **overrides}
    if overrides.get("mode", Config.mode) == "ptdpo":
        overrides = {**PTDPO_DEFAULTS, **overrides}
    return Config(**overrides)


# ----------------------------------------------------------------------------- distributed

MODE_PRIVILEGE = {"opd": "none", "opsd": "answer", "vicur": "cues", "ptdpo": "hints"}
DISTILL_MODES = list(MODE_PRIVILEGE)


def init_distributed(config):
    """(rank, world_size) from torchrun's environment; world size 1 without it."""
    if "RANK" not in os.environ:
        return 0, 1
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    # rank 0 evaluates while the others wait at a barrier: a large model's evaluation can take long
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    if backend == "nccl":
        config.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(config.device)
    return dist.get_rank(), dist.get_world_size()


def add_metric(metrics, name, mean, weight):
    """Accumulate a weighted mean: metrics[name] = [sum of mean * weight, sum of weight]."""
    total = metrics.setdefault(name, [0.0, 0.0])
    total[0] += mean * weight
    total[1] += weight


def reduce_metrics(metrics, names, world_size):
    """The step's weighted means over all ranks, in one all_reduce of a (len(names), 2) tensor. `names`
    is fixed by the mode, so every rank makes the same call whatever its data held: a metric this rank
    has no value for (no boxes in its rows, no tutored group) is sent as weight 0, never skipped. A
    metric with weight 0 on every rank is left out."""
    assert set(metrics) <= set(names), f"metrics {sorted(set(metrics) - set(names))} are not in the mode's names"
    sums = torch.tensor([metrics.get(name, [0.0, 0.0]) for name in names], dtype=torch.float64)  # (M, 2)
    if world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        sums = sums.to(device)
        dist.all_reduce(sums)
    return {name: total / weight for name, (total, weight) in zip(names, sums.tolist()) if weight > 0}


def all_reduce_mean(value, world_size):
    """The mean over ranks of a Python number (on the GPU under nccl, which serves only CUDA tensors)."""
    if world_size == 1:
        return value
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size


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
                 bucket_elements=2**24):
        self.params = [p for p in params if p.requires_grad]
        if len({p.dtype for p in self.params}) != 1:
            raise ValueError(f"FlatAdamW needs one dtype for all trained weights, got {({p.dtype for p in self.params})}")
        self.total = sum(p.numel() for p in self.params)
        self.parts = world_size if shard else 1
        self.shard_size = math.ceil(self.total / self.parts)           # the last shard is padded with zeros
        self.rank, self.start = rank, (rank * self.shard_size if shard else 0)
        self.world_size, self.weight_decay, self.betas, self.eps = world_size, weight_decay, betas, eps
        self.bucket_elements = bucket_elements
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
            dist.reduce_scatter_tensor(shard, self.grads)
        else:
            shard = self.grads
            if self.world_size > 1:
                for bucket in self.grads.split(self.bucket_elements):    # a few calls, not one per weight
                    dist.all_reduce(bucket)
        return shard.float().div_(self.world_size)     # in place in float32: the buffer is zeroed after the step

    @torch.no_grad()
    def update(self, grad, grad_clip):
        """Clip, AdamW on the shard, send the new weights to every rank's model; returns the norm."""
        # sum of squares in float64, a slice at a time (no float64 copy of the whole shard)
        norm_sq = sum(piece.double().pow(2).sum() for piece in grad.split(self.bucket_elements))
        if self.parts > 1:
            dist.all_reduce(norm_sq)
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
            dist.broadcast(buffer, src=source)
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


# ----------------------------------------------------------------------------- data

def training_samples(config, rank):
    """(training samples, evaluation samples): the embedded world, or the user's JSONL files
    (without --eval_data, the last num_eval samples of --data are held out for evaluation)."""
    if not config.data:
        return make_world(config.num_train, seed=config.seed), eval_world(config.num_eval, seed=config.seed)
    samples, skipped = load_jsonl(config.data, skip_bad=config.skip_bad)
    if config.eval_data:
        eval_samples, eval_skipped = load_jsonl(config.eval_data, skip_bad=config.skip_bad)
        skipped += eval_skipped
    else:
        if len(samples) <= config.num_eval:
            raise SystemExit(f"error: {config.data} has {len(samples)} samples, not more than --num_eval="
                             f"{config.num_eval}; pass --eval_data=FILE or a smaller --num_eval")
        samples, eval_samples = samples[:-config.num_eval], samples[-config.num_eval:]
    if rank == 0:
        print(f"data: {len(samples)} training samples from {config.data}, {len(eval_samples)} for evaluation"
              + (f"; {skipped} bad lines skipped" if skipped else ""))
    return samples, eval_samples


def sft_example(sample, rng, config):
    """(chat, target text): the plain prompt mostly, sometimes with the cue or answer hint in context,
    so that the model learns to read privilege when it is there (later teachers need that)."""
    draw = rng.random()
    if draw < config.sft_cue_frac and sample.cue:
        chat = teacher_messages(sample, "cues")
    elif config.sft_cue_frac <= draw < config.sft_cue_frac + config.sft_answer_frac:
        chat = teacher_messages(sample, "answer")
    else:
        chat = student_messages(sample)
    return chat, sample.rationale or sample.answer


def step_rng(config, step):
    """The data draw of a step: the same on every rank, so ranks slice one global batch."""
    return random.Random(config.seed * 1_000_003 + step)


def sft_batch(samples, step, rank, world_size, config, processor):
    """This rank's micro-batch: the global batch is drawn from a seeded RNG, then sliced by rank."""
    rng = step_rng(config, step)
    global_size = config.batch_size * world_size
    examples = []
    for i in range(global_size):
        index = rng.randrange(len(samples))
        if rng.random() < config.sft_describe_frac:
            sample = describe_sample(rng, step * global_size + i, config.seed)
            examples.append((student_messages(sample), sample.rationale))
        else:
            examples.append(sft_example(samples[index], rng, config))
    chats, targets = zip(*examples[rank::world_size])
    return collate(processor, list(chats), [completion_token_ids(processor, t) for t in targets],
                   max_length=config.max_length)


def sft_loss(model, batch):
    """Summed cross-entropy on completion tokens, -sum_t log p(y_t | y_<t, x), and the number of
    tokens right under argmax (the caller divides both by the step's token count)."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs).logits[:, :-1].float()                     # (B, L-1, V)
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    return loss, (logits[mask].argmax(-1) == targets[mask]).sum().item()


def sft_step(model, processor, samples, step, rank, world_size, config, times):
    """Forward/backward of one optimizer step's micro-batches; returns the metrics.
    L = -(1 / N) sum over the step's N completion tokens (all micro-batches, all ranks): each rank
    scales its sum by world_size / N, so that all_reduce's average gives exactly the loss of one
    process with the whole global batch, however the tokens fall across ranks and micro-batches."""
    with timed(times, "data"):
        batches = [to_device(sft_batch(samples, step * config.grad_accum + micro, rank, world_size, config,
                                       processor), config.device) for micro in range(config.grad_accum)]
        tokens = sum(int(b["completion_mask"][:, 1:].sum()) for b in batches)
    with timed(times, "communication"):
        total = all_reduce_mean(float(tokens), world_size) * world_size    # N, over all ranks
    metrics = {}
    for batch in batches:
        with timed(times, "student"):
            loss_sum, correct = sft_loss(model, batch)
            (loss_sum * world_size / total).backward()
        count = int(batch["completion_mask"][:, 1:].sum())
        add_metric(metrics, "loss", loss_sum.item() / max(count, 1), count)   # over all ranks: L
        add_metric(metrics, "token_acc", correct / max(count, 1), count)
    return metrics


@contextmanager
def timed(times, name):
    """Add the wall time of a block to times[name] (seconds)."""
    start = time.time()
    yield
    times[name] = times.get(name, 0.0) + time.time() - start


# ----------------------------------------------------------------------------- on-policy distillation

def load_teacher(config, student, processor):
    """'self': a frozen copy of the student as it starts (never trained; on --resume it is loaded
    again from where the run started, not from the trained checkpoint); else a stronger model."""
    if config.teacher == "self" and not config.resume:
        teacher = copy.deepcopy(student)
    elif config.teacher == "self":
        teacher, _ = load_model(config.init_from or config.student, dtype=getattr(torch, config.dtype),
                                seed=config.seed, device=config.device)
    else:
        teacher, teacher_processor = load_model(config.teacher, dtype=getattr(torch, config.dtype),
                                                device=config.device)
        check_same_tokenizer(processor, teacher_processor, config.teacher)
    if config.teacher == "self" and cue_recovery.get(teacher) is not None:
        raise SystemExit(f"error: the self teacher is the plain starting model, but {config.init_from} carries a "
                         f"cue recovery module; start from a checkpoint without one")
    teacher.eval().requires_grad_(False)
    return teacher


def attach_cue_recovery(model, processor, config, rank):
    """vicur mode: give the student its sink-token module (once; a resumed checkpoint has it)."""
    if config.mode != "vicur" or not config.cue_recovery or cue_recovery.get(model) is not None:
        return
    cue_recovery.attach(model, processor, sink_every=config.sink_every or None, init=config.cue_init)
    count, share = cue_recovery.parameter_count(model)
    if rank == 0:
        print(f"cue recovery: modules after layers {cue_recovery.get(model).layers}, {count / 1e6:.3f} M "
              f"parameters ({100 * share:.1f}% of the student), W_O init '{config.cue_init}'")


def draw_rollouts(student, processor, samples, micro_step, rank, world_size, config):
    """(rows, rollout, completions) of this rank for one micro-batch: its slice of the seeded global
    batch, num_rollouts samples of the student each. Every rollout draws from its own generator, seeded
    by its place in the global batch, so it is the same token for token whichever rank samples it and
    whatever shares its batch (up to float rounding)."""
    rng = step_rng(config, micro_step)
    global_size, n = config.batch_size * world_size, config.num_rollouts
    chosen = [samples[rng.randrange(len(samples))] for _ in range(global_size)]
    seeds = [rng.randrange(2**62) for _ in range(global_size * n)]
    mine = range(rank, global_size, world_size)
    prompts = [chosen[i] for i in mine]
    generators = [torch.Generator(device=config.device).manual_seed(seeds[i * n + j]) for i in mine for j in range(n)]
    # the prompt must leave room for max_new_tokens, so that scoring never exceeds max_length
    prompt = collate(processor, [student_messages(s) for s in prompts], max_length=config.max_length - config.max_new_tokens)
    rollout = sample(student, processor, to_device(prompt, config.device), n=n, temperature=config.temperature,
                     max_new_tokens=config.max_new_tokens, generator=generators)
    return [s for s in prompts for _ in range(n)], rollout, rollout_completions(rollout)


def score_with_teacher(teacher, processor, rows, rollout, completions, privilege, config, with_gap):
    """(the teacher's logits on the student's tokens (N, V), PTD-PO's tutoring dict or None, and the
    privilege gap when with_gap: how much the hint changes the teacher on these tokens)."""
    if config.mode == "ptdpo":
        scored, tutoring = ptd_reference(teacher, processor, rows, rollout, completions, privilege,
                                         config.num_rollouts, config.ptd_tau, config.ptd_all_rollouts, config.max_length)
        tutored = tutoring["tutored"]
        gap = privilege_gap(tutoring["tutor_logits"], scored[tutored]) if with_gap and tutored.any() else 0.0
        return scored, tutoring, gap
    scored = teacher_logits(teacher, processor, rows, privilege, completions, config.max_length)
    gap = 0.0
    if with_gap and privilege != "none":
        gap = privilege_gap(scored, teacher_logits(teacher, processor, rows, "none", completions, config.max_length))
    return scored, None, gap


def step_metric_names(config, has_module):
    """The metrics a step of this mode logs: one fixed list, the same on every rank (reduce_metrics)."""
    if config.mode == "sft":
        return ["loss", "token_acc"]
    names = ["loss", "log_ratio", "clip_frac", "student_entropy", "teacher_entropy", "privilege_gap",
             "rollout_length", "reward", "hint_leakage"]
    if config.mode == "ptdpo":
        names += ["kl_ref", "ptd_jsd", "tutored_tokens", "failed_share", "gated_share"]
    return names + (["cue_recall"] if has_module else [])


def add_step_metrics(metrics, loss, stats, student_logits, teacher_logits, gap, rows, rollout, tutoring, privilege,
                     recall):
    """One micro-batch's statistics: token means weighted by its completion tokens, rollout means by
    its rollouts, the tutored-token means (PTD-PO) by its tutored tokens, cue recall by its rows with
    boxes (weight 0 when there are none)."""
    tokens, count = len(student_logits), len(rows)
    tutored = int(tutoring["tutored"].sum()) if tutoring is not None else 0
    for name, value in [("loss", loss.item()), *stats.items()]:
        add_metric(metrics, name, value, tutored if name == "ptd_jsd" else tokens)
    add_metric(metrics, "student_entropy", entropy(student_logits.detach()).mean().item(), tokens)
    add_metric(metrics, "teacher_entropy", entropy(teacher_logits).mean().item(), tokens)
    add_metric(metrics, "privilege_gap", gap, tutored if tutoring is not None else tokens)
    add_metric(metrics, "rollout_length", rollout.lengths.float().mean().item(), count)
    rewards = tutoring["rewards"].tolist() if tutoring is not None else \
        [score_sample(text, row) for text, row in zip(rollout.texts, rows)]
    add_metric(metrics, "reward", sum(rewards) / count, count)
    add_metric(metrics, "hint_leakage", hint_leakage(rows, rollout.texts, privilege), count)
    if recall is not None:
        add_metric(metrics, "cue_recall", recall, sum(bool(row.boxes) for row in rows))
    if tutoring is not None:
        add_metric(metrics, "failed_share", 1 - tutoring["rewards"].mean().item(), count)
        add_metric(metrics, "gated_share", tutoring["gated"].float().mean().item(), count)


def distill_step(student, teacher, optimizer, processor, samples, step, rank, world_size, config, times):
    """One optimizer step of on-policy distillation (the student samples, the teacher scores the same
    tokens under its own context, the student moves toward it token by token); returns the metrics.
    All micro-batches are sampled first (the loss needs the step's token count); then the teacher
    scores one micro-batch at a time, so that only one micro-batch of its (N, V) logits is alive."""
    privilege = config.privilege or MODE_PRIVILEGE[config.mode]
    with timed(times, "sample"):
        drawn = [draw_rollouts(student, processor, samples, step * config.grad_accum + micro, rank, world_size, config)
                 for micro in range(config.grad_accum)]
    # L = (1 / N) sum over the step's N completion tokens (all micro-batches, all ranks), as in sft_step:
    # a micro-batch's token mean is weighted by its share of N, times world_size for all_reduce's average
    with timed(times, "communication"):
        total = all_reduce_mean(float(sum(int(r.completion_mask.sum()) for _, r, _ in drawn)), world_size) * world_size
    metrics = {}
    for epoch in range(config.ppo_epochs):             # later epochs score again: the teacher is frozen
        for rows, rollout, completions in drawn:
            with timed(times, "teacher"):
                scored, tutoring, gap = score_with_teacher(teacher, processor, rows, rollout, completions, privilege,
                                                           config, with_gap=epoch == 0)
            with timed(times, "student"):
                student_batch = to_device(scoring_batch(processor, [student_messages(s) for s in rows], completions,
                                                        config.max_length), config.device)
                module = cue_recovery.get(student) if epoch == 0 else None
                if module is not None:
                    module.recorded = []                        # the sink's attention, for the cue recall
                student_logits, tokens = completion_logits(student, student_batch)
                if module is not None:
                    recorded, module.recorded = module.recorded, None  # not again in --grad_ckpt's recompute
                    recall = cue_recovery.rows_cue_recall(torch.stack(recorded, 1).detach(), rows, student_batch,
                                                          processor) if recorded else None
                old_logprobs = rollout.logprobs[rollout.completion_mask.bool()].to(config.device)
                if tutoring is None:
                    loss, stats = distill_loss(student_logits, tokens, old_logprobs, scored, config.loss,
                                               beta=config.beta, top_k=config.top_k, temperature=config.temperature,
                                               clip_eps=config.clip_eps, dual_clip=config.dual_clip)
                else:
                    ref_logprobs = token_logprobs(scored, tokens, config.temperature)
                    loss, stats = ptdpo_loss(
                        token_logprobs(student_logits, tokens, config.temperature), old_logprobs,
                        ref_logprobs, tutoring["advantages"],
                        tutoring["gated"], tutoring["tutored"], student_logits, tutoring["tutor_logits"],
                        clip_eps=config.clip_eps, dual_clip=config.dual_clip, kl_coef=config.kl_coef,
                        ptd_coef=config.ptd_coef, top_k=config.top_k, beta=config.beta, stop_grad_weights=config.ptd_stop_grad,
                        entropy_coef=config.ptd_entropy_coef, temperature=config.temperature)
                    stats["log_ratio"] = (old_logprobs - ref_logprobs).mean().item()
                share = len(tokens) * world_size / total          # its share of N, times the ranks' average
                (loss * share).backward()
            if epoch == 0:
                add_step_metrics(metrics, loss, stats, student_logits, scored, gap, rows, rollout, tutoring,
                                 privilege, recall if module is not None else None)
            del scored, tutoring, student_logits, loss
        if epoch + 1 < config.ppo_epochs:  # the last epoch's step is the caller's
            optimizer_step(optimizer, config, times)
    return metrics


# ----------------------------------------------------------------------------- the optimizer step

def optimizer_step(optimizer, config, times):
    """Average the gradients across ranks (explicit collectives, timed as communication), then clip
    and update (FlatAdamW); returns the gradient norm before clipping."""
    with timed(times, "communication"):
        grad = optimizer.average_gradients()
    with timed(times, "optimizer"):
        return optimizer.update(grad, config.grad_clip)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(model, processor, optimizer, step, config, rank=0, world_size=1):
    """Every rank calls it: the ranks check they agree and gather the optimizer's shards, then rank 0
    writes out_dir/ckpt atomically: into a temporary folder, then renamed over the old one."""
    check_ranks_agree(model, step, world_size)
    optimizer_state = optimizer.state_dict()
    if rank != 0:
        return
    final = os.path.join(config.out_dir, "ckpt")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cue_recovery.save(model, tmp)  # the sink module's weights and layers, when the model has one
    processor.save_pretrained(tmp)
    torch.save({"format": TRAIN_STATE_FORMAT, "optimizer": optimizer_state, "step": step,
                "config": dataclasses.asdict(config), "rng": rng_states()}, os.path.join(tmp, "train_state.pt"))
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def check_ranks_agree(model, step, world_size):
    """Before rank 0 saves: every rank must be at the same step with the same weights (a float64 sum
    of all parameters; identical all-reduced updates keep the replicas bitwise equal)."""
    if world_size == 1:
        return
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    views = [None] * world_size
    dist.all_gather_object(views, (step, checksum))
    if any(view != views[0] for view in views):
        raise RuntimeError(f"ranks disagree before saving: (step, weight checksum) per rank = {views}")


# train_state.pt holds only tensors, lists, dicts, numbers and strings, so that it loads with
# weights_only=True: a checkpoint someone shares cannot run code when it is read
TRAIN_STATE_FORMAT = 2


def rng_states():
    """The Python, numpy and torch RNG states in plain types (no numpy arrays, no pickled objects)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {"python": [version, list(python_state), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
            "torch": torch.get_rng_state()}


def set_rng_states(states):
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])


def read_train_state(path, mmap=False):
    """A checkpoint's train_state.pt, loaded with weights_only=True; a file that is not one of ours
    (an older format, a pickle of other objects, a damaged file) is a clear error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError, by the damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: {path} cannot be loaded safely (weights_only=True): {reason}\n"
                         f"  it is from an older vicur (before format {TRAIN_STATE_FORMAT}) or not a vicur "
                         f"checkpoint; its weights still load: start a new run with --init_from="
                         f"{os.path.dirname(path)}") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format", "none") if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"error: {path} has train-state format {found}, this vicur reads format "
                         f"{TRAIN_STATE_FORMAT}; start a new run with --init_from={os.path.dirname(path)}")
    return state


def load_train_state(config, optimizer):
    # memory-mapped: each rank reads only its own shard of the optimizer state
    path = os.path.join(config.out_dir, "ckpt", "train_state.pt")
    state = read_train_state(path, mmap=True)
    optimizer.load_state_dict(state["optimizer"], where=path)
    set_rng_states(state["rng"])
    return state["step"]


def learning_rate(step, config):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- main

STUDENT = "student (image + question)"


def run_evaluation(model, processor, eval_samples, config, privileged=True):
    """The student's table (image + question only), and, as a labelled diagnostic, the same
    model with the cue hint in its context."""
    columns = {STUDENT: evaluate(model, processor, eval_samples, config.eval_batch_size,
                                                      config.max_new_tokens)}
    if privileged and any(s.cue for s in eval_samples):
        columns["diagnostic: + cue hint"] = evaluate(model, processor, eval_samples, config.eval_batch_size,
                                                     config.max_new_tokens,
                                                     messages_fn=lambda s: teacher_messages(s, "cues"))
    return columns


def strip_records(results):
    return {k: v for k, v in results.items() if k != "records"}


def saved_run(ckpt):
    """(step, config dict) of a checkpoint's train_state.pt, or (None, None)."""
    path = os.path.join(ckpt, "train_state.pt")
    if not os.path.isfile(path):
        return None, None
    state = read_train_state(path)
    return state["step"], state["config"]


def sft_stage(config, rank, world_size):
    """A tiny student starts from random weights, so a distillation mode without --init_from first
    runs SFT into out_dir/sft -> that checkpoint. A complete SFT run there with the same settings
    is reused; an incomplete one is continued under --resume."""
    defaults = Config()
    reset = DISTILL_FIELDS + list(DISTILL_DEFAULTS) + list(PTDPO_DEFAULTS)  # SFT's own values for these
    sft = dataclasses.replace(config, **{key: getattr(defaults, key) for key in reset})
    sft = dataclasses.replace(sft, mode="sft", out_dir=os.path.join(config.out_dir, "sft"), max_steps=config.sft_steps,
                              freeze_vision=False)  # a random vision tower must learn to see first
    ckpt = os.path.join(sft.out_dir, "ckpt")
    step, saved = saved_run(ckpt)
    affects = lambda c: {k: v for k, v in c.items() if k not in SFT_NEUTRAL}  # noqa: E731
    same = saved is not None and affects(saved) == affects(dataclasses.asdict(sft))
    if world_size > 1:  # rank 0 decides, so that the ranks never take different paths
        decision = [same, step]
        dist.broadcast_object_list(decision, src=0)
        same, step = decision
    if same and step == sft.max_steps:
        if rank == 0:
            print(f"SFT stage: reusing the complete run in {ckpt} ({step} steps)")
        return ckpt
    if rank == 0:
        print(f"SFT stage: {sft.max_steps} steps into {sft.out_dir}, then {config.mode}")
    train(dataclasses.replace(sft, resume=config.resume and same), rank, world_size)
    return ckpt


def print_memory_plan(config, world_size):
    """--dry_run: what one GPU holds for this config, from the model's shapes alone (model.memory_plan)."""
    teacher = None
    if config.mode in DISTILL_MODES:
        teacher = config.init_from or config.student if config.teacher == "self" else config.teacher
    tokens = config.batch_size * (config.num_rollouts if config.mode in DISTILL_MODES else 1) * config.max_length
    rows = memory_plan(config.init_from or config.student, teacher, torch.finfo(getattr(torch, config.dtype)).bits // 8,
                       tokens, tiny_processor().tokenizer, world_size, config.shard_optimizer, config.grad_ckpt,
                       config.freeze_vision)
    total = sum(size for _, size in rows)
    print(f"memory plan per GPU: {config.mode}, student {config.init_from or config.student}, {config.dtype}, "
          f"world size {world_size}, micro-batch {tokens} tokens (global batch "
          f"{config.batch_size * config.grad_accum * world_size})")
    for name, size in rows + [("total", total)]:
        print(f"  {name:<56} {size / 2**30:>8.1f} GiB")
    print(f"  {'fits on an 80 GB card' if total < 80e9 else 'does NOT fit on an 80 GB card'}; the activation line "
          f"is an estimate; --shard_optimizer, --grad_ckpt and --freeze_vision each shrink a line")


def main(argv):
    config = parse_args(argv)
    if config.mode not in ["sft"] + DISTILL_MODES:
        raise SystemExit(f"error: unknown --mode={config.mode}; available: {['sft'] + DISTILL_MODES}")
    if config.mode == "ptdpo" and config.num_rollouts < 2:
        raise SystemExit(f"error: --mode=ptdpo compares rollouts within a group: --num_rollouts must be at least 2, "
                         f"got {config.num_rollouts}")
    if config.mode in DISTILL_MODES and config.max_new_tokens >= config.max_length:
        raise SystemExit(f"error: --max_new_tokens={config.max_new_tokens} leaves no room for the prompt in "
                         f"--max_length={config.max_length}")
    if config.dry_run:
        return print_memory_plan(config, int(os.environ.get("WORLD_SIZE", 1)))  # WORLD_SIZE=8 python train.py ...
    rank, world_size = init_distributed(config)
    if config.mode in DISTILL_MODES and not config.init_from and config.student in TINY_SIZES:
        if config.resume and not any(os.path.isdir(os.path.join(config.out_dir, d, "ckpt")) for d in ("", "sft")):
            raise SystemExit(f"error: --resume=true but neither {config.out_dir}/ckpt nor {config.out_dir}/sft/ckpt "
                             f"exists")
        config = dataclasses.replace(config, init_from=sft_stage(config, rank, world_size))
        if world_size > 1:
            dist.barrier()  # rank 0 wrote the SFT checkpoint
        if config.resume and not os.path.isdir(os.path.join(config.out_dir, "ckpt")):
            config = dataclasses.replace(config, resume=False)  # the interruption came during the SFT stage
    train(config, rank, world_size)
    if world_size > 1:
        dist.destroy_process_group()


def setup(config, rank, world_size):
    """Seeds, threads, and the run's parts: (source, model, processor, teacher or None, optimizer,
    training samples, evaluation samples, the step to start from)."""
    torch.manual_seed(config.seed)
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // world_size))
    resume_dir = os.path.join(config.out_dir, "ckpt")
    if config.resume and not os.path.isdir(resume_dir) and os.path.isdir(resume_dir + ".old"):
        os.replace(resume_dir + ".old", resume_dir)  # killed between save_checkpoint's two renames
    if config.resume and not os.path.isdir(resume_dir):
        raise SystemExit(f"error: --resume=true but {resume_dir} does not exist")
    source = resume_dir if config.resume else (config.init_from or config.student)
    model, processor = load_model(source, dtype=getattr(torch, config.dtype), seed=config.seed, device=config.device)
    samples, eval_samples = training_samples(config, rank)
    # the self teacher is a copy of the student as it starts, taken before the student gets its module
    teacher = load_teacher(config, model, processor) if config.mode in DISTILL_MODES else None
    attach_cue_recovery(model, processor, config, rank)
    if config.freeze_vision:
        model.model.visual.requires_grad_(False)
    if config.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = FlatAdamW(model.parameters(), config.lr, config.weight_decay, (0.9, 0.95), rank, world_size,
                          shard=config.shard_optimizer)
    step = load_train_state(config, optimizer) if config.resume else 0
    return source, model, processor, teacher, optimizer, samples, eval_samples, step


def train(config, rank, world_size):
    """One run of one mode: load, (distill from a teacher or SFT), save, evaluate, report."""
    start_time = time.time()
    source, model, processor, teacher, optimizer, samples, eval_samples, step = setup(config, rank, world_size)

    if rank == 0:
        os.makedirs(config.out_dir, exist_ok=True)
        with open(os.path.join(config.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
        print(f"{config.mode}: student {source} ({num_parameters(model) / 1e6:.2f} M parameters), "
              f"{len(samples)} training samples, world size {world_size}, out_dir {config.out_dir}")
    log_file = open(os.path.join(config.out_dir, "log.jsonl"), "a" if config.resume else "w") if rank == 0 else None

    if rank == 0 and teacher is not None:
        privilege = config.privilege or MODE_PRIVILEGE[config.mode]
        print(f"teacher: {config.teacher} ({num_parameters(teacher) / 1e6:.2f} M parameters), privilege "
              f"'{privilege}', loss {config.loss}")
        lacking = sum(hint_text(s, privilege) is None for s in samples) if privilege != "none" else 0
        if lacking:
            print(f"note: {lacking} of {len(samples)} training samples have no {privilege}; "
                  f"for them the teacher sees the student's prompt")
        probe = samples[:64]
        probe_before = probe_log_ratio(model, teacher, processor, probe, privilege, config.max_length, config.max_new_tokens)
        print(f"probe log-ratio (student greedy answers to {len(probe)} training prompts) before: {probe_before:.4f}")
        log_file.write(json.dumps({"step": step, "probe_log_ratio": probe_before}) + "\n")
        if not config.resume:
            before = run_evaluation(model, processor, eval_samples, config, privileged=False)
            print("before distillation:\n" + format_table(before))
            with open(os.path.join(config.out_dir, "eval_before.json"), "w") as f:
                json.dump(strip_records(before[STUDENT]), f, indent=2)

    metric_names = step_metric_names(config, has_module=cue_recovery.get(model) is not None)
    model.train()
    progress = tqdm(range(step, config.max_steps), initial=step, total=config.max_steps, disable=rank != 0,
                    desc=config.mode)
    for step in progress:
        step_start, times = time.time(), {}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        if teacher is None:
            metrics = sft_step(model, processor, samples, step, rank, world_size, config, times)
        else:
            metrics = distill_step(model, teacher, optimizer, processor, samples, step, rank, world_size, config, times)
        grad_norm = optimizer_step(optimizer, config, times)
        metrics = reduce_metrics(metrics, metric_names, world_size)
        if rank == 0:
            record = {"step": step + 1, **metrics, "grad_norm": grad_norm, "lr": learning_rate(step, config),
                      "step_time": time.time() - step_start, **{f"time_{k}": v for k, v in times.items()}}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            progress.set_postfix({k: f"{metrics[k]:.3f}" for k in ("loss", "token_acc", "log_ratio", "reward")
                                  if k in metrics})
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
                results = evaluate(model, processor, eval_samples, config.eval_batch_size, config.max_new_tokens)
                log_file.write(json.dumps({"step": step + 1, "eval_in_domain_avg": results["in_domain_avg"],
                                           "eval_ood_avg": results["ood_avg"]}) + "\n")
                model.train()
        if (step + 1) % config.save_every == 0:
            save_checkpoint(model, processor, optimizer, step + 1, config, rank, world_size)
    train_time = time.time() - start_time

    save_checkpoint(model, processor, optimizer, config.max_steps, config, rank, world_size)
    if rank == 0:
        notes = []
        if teacher is not None:
            probe_after = probe_log_ratio(model, teacher, processor, probe, privilege, config.max_length, config.max_new_tokens)
            notes.append(f"probe log-ratio before: {probe_before:.4f}, after: {probe_after:.4f}")
            log_file.write(json.dumps({"step": config.max_steps, "probe_log_ratio": probe_after}) + "\n")
        columns = run_evaluation(model, processor, eval_samples, config)
        student = columns[STUDENT]
        before_file = os.path.join(config.out_dir, "eval_before.json")
        if teacher is not None and os.path.exists(before_file):  # the same samples, before distillation
            columns = {"student before distillation": json.load(open(before_file)), **columns}
        table = format_table(columns)
        recall = None
        if cue_recovery.get(model) is not None:
            recall = cue_recovery.evaluation_cue_recall(model, processor, eval_samples, config.eval_batch_size)
        if recall:
            notes.append(cue_recovery.recall_line(recall))
        print(table + "".join("\n" + note for note in notes))
        with open(os.path.join(config.out_dir, "eval.json"), "w") as f:
            json.dump({**strip_records(student),
                       "diagnostics": {name: strip_records(r) for name, r in columns.items()
                                       if name.startswith("diagnostic")},
                       **({"cue_recall": recall} if recall else {})}, f, indent=2)
        with open(os.path.join(config.out_dir, "predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in student["records"])
        total_time = time.time() - start_time
        with open(os.path.join(config.out_dir, "report.md"), "w") as f:
            f.write(f"# vicur run: {config.mode}\n\nstudent: {source}, {num_parameters(model) / 1e6:.2f} M parameters; "
                    f"{config.max_steps} steps x {config.batch_size * config.grad_accum * world_size} samples; "
                    f"world size {world_size}\n\ntraining {train_time / 60:.1f} min, total {total_time / 60:.1f} min\n\n"
                    f"## Evaluation (accuracy, %)\n\n{table}\n\nThe diagnostic column gives the same model the "
                    f"cue hint in its prompt; it is never a student number.\n\n" + "".join(f"{n}\n\n" for n in notes))
        print(f"done in {total_time / 60:.1f} min; wrote {config.out_dir}/report.md, eval.json, ckpt/")
        log_file.close()
    if world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's checkpoint and evaluation


if __name__ == "__main__":
    main(sys.argv[1:])
