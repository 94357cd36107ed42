"""Training: config + CLI, manual data parallel, the loop, checkpoints and logs (the run's evaluation
and report.md: report.py).

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
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import cue_recovery
import teacher_ranks
from checkpoint import load_train_state, save_checkpoint, saved_run
from data import (collate, completion_token_ids, describe_sample, eval_world, load_jsonl, make_world, student_messages,
                  to_device, validation_world, EVAL_SAMPLES, VALIDATION_SAMPLES)
from distill import (check_same_tokenizer, hint_text, microbatch_loss, rollout_completions, teacher_messages, timed,
                     unrelated_cues)
from evaluate import evaluate, write_evaluation
from gap import gap_prompts, gap_report, headroom, measure_gap, without_per_prompt
from model import TINY_SIZES, load_model, load_processor, num_parameters, print_memory_plan
from optim import FlatAdamW
from report import evaluation_settings, finish, reuse_sft_evaluation
from rollout import cat_rollouts, sample_completions, split_rollout


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
    num_eval: int = EVAL_SAMPLES     # embedded world: evaluation samples (all seven families, 400 each)
    num_validation: int = VALIDATION_SAMPLES  # embedded world: validation samples (in-domain, 400 a family):
                                     # an SFT run's headroom (0: none), --validate
    out_dir: str = "out/default"     # config.json, log.jsonl, ckpt/, eval.json and report.md go here
    # optimisation
    max_steps: int = 40              # optimizer steps of this run (the SFT stage has sft_steps); with batch_size,
                                     # the one budget of every row of docs/testbed.md: 40 steps of 32 completions
    batch_size: int = 32             # per rank, per micro-step: prompts (each with num_rollouts completions)
    grad_accum: int = 1              # micro-steps per optimizer step
    lr: float = 6e-5                 # peak learning rate (AdamW, betas 0.9 / 0.95); the SFT stage has sft_lr. 6e-5:
                                     # ViCuR's choice from tables.py's grid on the validation split (docs/testbed.md)
    min_lr_ratio: float = 0.1        # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 4            # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.01       # AdamW's decoupled weight decay
    grad_clip: float = 1.0           # clip the global gradient norm to this
    seed: int = 0                    # the world, the data order, the rollouts' generators
    eval_every: int = 0              # 0: evaluate only at the end
    eval_extras: bool = True         # a distillation run also evaluates before (the paired difference) and with the
                                     # cue hint (a diagnostic); tables.py turns both off and pairs rows with its Base
    validate: bool = False           # also evaluate on the validation split (validation.json): tables.py's lr choice
    save_every: int = 500            # steps between checkpoints (and one at the end)
    resume: bool = False             # continue from out_dir/ckpt
    max_length: int = 512            # longest prompt + completion, in tokens
    max_new_tokens: int = 96         # evaluation and rollouts
    eval_batch_size: int = 256       # prompts per batch in evaluation and the exact gap
    # on-policy distillation
    teacher: str = "self"            # 'self' (a frozen copy of the starting student) or a model name / checkpoint
    privilege: str = ""              # none | answer | rationale | cues | cues+crops | unrelated_cues (a control);
                                     # empty = the mode's default
    loss: str = "sampled_rkl"        # sampled_rkl (the paper's) | fkl | rkl | jsd | topk_jsd
    beta: float = 0.5                # jsd / topk_jsd mixture weight
    top_k: int = 100                 # topk_jsd: the student's top-K tokens
    num_rollouts: int = 1            # completions per prompt (ptdpo: the group, at least 2; the paper's 8)
    rollout_batch_size: int = 0      # prompts sampled together, per rank; 0 = all of a step's (batch_size x grad_accum)
    static_cache: bool = False       # rollouts decode through a preallocated KV cache (transformers' StaticCache)
    logits_from_hidden: bool = True  # the student's losses from its final hidden states and lm_head's weight, chunk
                                     # by chunk (divergences.HiddenLogits): no (tokens x V) logits nor their gradient
    temperature: float = 1.0         # sampling temperature of the rollouts
    gap_prompts: int = 512           # the exact distillation gap: this many fixed validation prompts ...
    gap_rollouts: int = 2            # ... times this many seeded student samples (0 prompts: not measured)
    ppo_epochs: int = 1              # updates per batch of rollouts (ratio = 1 on the first)
    clip_eps: float = 0.2            # PPO's clip: the ratio is kept in [1 - clip_eps, 1 + clip_eps]
    loss_agg: str = "token-mean"     # token-mean (the released code) | seq-mean (the paper's Eq. 7: 1 / |y| per
                                     # sequence, then the mean over the step's sequences); not for ptdpo
    dual_clip: float = 0.0           # dual-clip PPO: bound a negative-advantage token's loss by -c A (verl and
                                     # PTD-PO use c = 3); 0 = off
    # ViCuR: the student's sink-token cue recovery module (cue_recovery.py)
    cue_recovery: bool = True        # vicur mode: attach it (false = the cue hint without the module)
    sink_every: int = 0              # a module after every sink_every-th layer; 0 = 5 on >= 10 layers, else 1
    cue_init: str = "zero"           # zero: W_O = 0, an exact no-op at the start | default: nn.Linear's init
                                     # | normal: N(0, initializer_range), the released code's post_init
    # PTD-PO: GRPO on the reward + Top-K JSD to the hint-conditioned reference on failed rollouts
    kl_coef: float = 0.0             # k3 KL to the reference policy, in groups that are not tutored
    ptd_coef: float = 0.05           # weight of the tutoring term (0: plain GRPO)
    ptd_tau: float = 1.0             # a group with accuracy below tau is tutored (1.0: any failure)
    ptd_all_rollouts: bool = False   # tutor every rollout of such a group, not only the failed ones
    ptd_entropy_coef: float = 0.0    # entropy bonus on the tutored rollouts
    ptd_stop_grad: bool = False      # no gradient through p_S where it weights KL(p_S || M): then the
                                     # JSD's gradient is identically 0 (see distill.divergence), so off
    # the SFT stage before distilling a tiny (random) student without --init_from
    sft_steps: int = 2000            # steps of that SFT stage; at 1,600 its headroom's C1 sat on its bound
                                     # (docs/testbed.md, amendment 13)
    sft_lr: float = 1e-3             # its peak learning rate
    sft_warmup_steps: int = 50       # its warm-up
    sft_batch_size: int = 16         # its samples per rank and micro-step
    # SFT: the share of samples shown with privileged context, and of scene descriptions
    sft_cue_frac: float = 0.8        # with the cue hint in the prompt (docs/testbed.md, amendment 4)
    sft_answer_frac: float = 0.1     # with the answer hint in the prompt
    sft_describe_frac: float = 0.2   # a scene description instead of a question
    # hardware and memory
    dry_run: bool = False            # print the per-GPU memory plan and stop (no weights are loaded)
    device: str = "cpu"              # cpu or cuda (each torchrun rank takes cuda:LOCAL_RANK)
    threads: int = 0                 # CPU threads per rank; 0 = all cores shared among the ranks
    dtype: str = "float32"           # float32 or bfloat16 (weights; the optimizer keeps float32 master weights)
    shard_optimizer: bool = False    # split the optimizer's state (master weights, moments) across ranks
    grad_ckpt: bool = False          # recompute each decoder layer's activations in the backward pass
    teacher_ranks: int = 0           # the last K of torchrun's ranks hold only the teacher and answer the others
                                     # over point-to-point calls (teacher_ranks.py); 0 = a teacher on every rank
    freeze_vision: bool = False      # train the language model (and the cue module), not the vision tower


PAPER = {  # the paper's settings: global batch 128 (8 ranks x 2 x 8 micro-steps), lr 1e-6, prompts up to
    # 2,048 and responses up to 4,096 tokens, one rollout per prompt, 5 epochs = 275 steps; bf16 on GPUs,
    # and here the optimizer state sharded and activations recomputed, so that each fits an 80 GB card
    "mode": "vicur", "batch_size": 2, "grad_accum": 8, "lr": 1e-6, "warmup_steps": 0, "max_length": 6144,
    "max_new_tokens": 4096, "num_rollouts": 1, "max_steps": 275, "dtype": "bfloat16", "device": "cuda",
    "shard_optimizer": True, "grad_ckpt": True, "eval_batch_size": 16}
PRESETS = {
    # name: overrides; a preset is a plain dict applied before the command line
    "smoke": {"max_steps": 20, "sft_steps": 20, "num_train": 200, "num_eval": 56, "batch_size": 8, "eval_every": 0,
              "gap_prompts": 32, "num_validation": 40},
    "qwen3vl-2b": {**PAPER, "student": "Qwen/Qwen3-VL-2B-Instruct"},  # OPD: --teacher=Qwen/Qwen3-VL-8B-Instruct
    # the same global batch in micro-batches of 1 (8 ranks x 1 x 16): the logits of 2 x 6,144 tokens do not fit
    "qwen3vl-8b": {**PAPER, "student": "Qwen/Qwen3-VL-8B-Instruct", "batch_size": 1, "grad_accum": 16},
    # OPD: --teacher=Qwen/Qwen3-VL-32B-Instruct
}
# the SFT stage (before distilling a tiny student without --init_from) is a Config of its own: these
# fields it takes from the run, because they change what it learns ...
SFT_LEARNS_FROM = ["student", "data", "num_train", "seed", "max_length", "grad_accum", "min_lr_ratio", "weight_decay",
                   "grad_clip", "dtype", "sft_steps", "sft_lr", "sft_warmup_steps", "sft_batch_size", "sft_cue_frac",
                   "sft_answer_frac", "sft_describe_frac"]
# ... and these, which only change how it runs (a complete stage is reused whatever they are)
SFT_RUNS_WITH = ["eval_data", "skip_bad", "num_eval", "num_validation", "eval_every", "max_new_tokens", "eval_batch_size",
                 "save_every", "device", "threads", "shard_optimizer", "grad_ckpt"]


USAGE = "python train.py [--key=value ...]   (torchrun --nproc_per_node=N train.py ... for data parallel)"


def parse_args(argv):
    """--key=value overrides of Config, types checked; --preset=NAME applies a dict of overrides first."""
    return cli.parse(argv, Config, USAGE, presets=PRESETS)


# ----------------------------------------------------------------------------- distributed

MODE_PRIVILEGE = {"opd": "none", "opsd": "answer", "vicur": "cues", "ptdpo": "hints"}
DISTILL_MODES = list(MODE_PRIVILEGE)
# the process group of the student ranks under --teacher_ranks, in every collective of training (the
# gradient average, the metrics, the checkpoint's check); None = all ranks, torch's default group
STUDENTS = None


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


def collective_device():
    """Where a collective's tensor must live: the GPU under nccl, which serves only CUDA tensors."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


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
        sums = sums.to(collective_device())
        dist.all_reduce(sums, group=STUDENTS)
    return {name: total / weight for name, (total, weight) in zip(names, sums.tolist()) if weight > 0}


def all_reduce_mean(value, world_size):
    """The mean over ranks of a Python number."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, group=STUDENTS)
    return tensor.item() / world_size


# ----------------------------------------------------------------------------- data

def training_samples(config, rank):
    """(training samples, evaluation samples): the embedded world, or the user's JSONL files
    (without --eval_data, the last num_eval samples of --data are held out for evaluation); under
    --privilege=unrelated_cues (the control) every training sample carries another one's cue."""
    if config.privilege == "unrelated_cues":
        samples, eval_samples = training_samples(dataclasses.replace(config, privilege=""), rank)
        return unrelated_cues(samples, config.seed), eval_samples
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


# ----------------------------------------------------------------------------- on-policy distillation

def load_teacher(config, student, processor):
    """'self': a frozen copy of the student as it starts (never trained; on --resume, or on a teacher
    rank, where student is None, it is loaded from where the run started, not from a trained
    checkpoint); else a stronger model."""
    if config.teacher == "self" and student is not None and not config.resume:
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


def step_prompts(samples, micro_step, rank, world_size, config):
    """(prompts, generators) of this rank for one micro-batch: its slice of the seeded global batch and
    one generator per rollout (num_rollouts per prompt), seeded by its place in the global batch, so
    that a rollout is the same token for token whichever rank samples it and whatever shares its
    batch (up to float rounding)."""
    rng = step_rng(config, micro_step)
    global_size, n = config.batch_size * world_size, config.num_rollouts
    chosen = [samples[rng.randrange(len(samples))] for _ in range(global_size)]
    seeds = [rng.randrange(2**62) for _ in range(global_size * n)]
    mine = range(rank, global_size, world_size)
    generators = [torch.Generator(device=config.device).manual_seed(seeds[i * n + j]) for i in mine for j in range(n)]
    return [chosen[i] for i in mine], generators


def draw_rollouts(student, processor, samples, step, rank, world_size, config):
    """[(rows, rollout, completions)] of this rank, one per micro-batch of the step. The step's prompts
    are sampled together, rollout_batch_size at a time (0: all at once), whatever the micro-batch
    that trains on them: decoding is one forward per token, so a larger batch costs about the same
    number of forwards for more rollouts."""
    micro = [step_prompts(samples, step * config.grad_accum + m, rank, world_size, config)
             for m in range(config.grad_accum)]
    prompts, generators = [p for ps, _ in micro for p in ps], [g for _, gs in micro for g in gs]
    size, n = config.rollout_batch_size or len(prompts), config.num_rollouts
    rollouts = []
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        # the prompt must leave room for max_new_tokens, so that scoring never exceeds max_length
        batch = collate(processor, [student_messages(s) for s in chunk], max_length=config.max_length - config.max_new_tokens)
        rollouts.append(sample_completions(student, processor, to_device(batch, config.device), n=n,
                                           temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                                           generator=generators[start * n:(start + len(chunk)) * n],
                                           static_cache=config.static_cache))
    parts = split_rollout(cat_rollouts(rollouts, processor.tokenizer.pad_token_id), [len(ps) * n for ps, _ in micro])
    return [([s for s in ps for _ in range(n)], part, rollout_completions(part)) for (ps, _), part in zip(micro, parts)]


def step_metric_names(config, has_module):
    """The metrics a step of this mode logs: one fixed list, the same on every rank (reduce_metrics)."""
    if config.mode == "sft":
        return ["loss", "token_acc"]
    names = ["loss", "log_ratio", "clip_frac", "student_entropy", "teacher_entropy", "privilege_gap",
             "rollout_length", "reward", "hint_leakage"]
    if config.mode == "ptdpo":
        names += ["kl_ref", "ptd_jsd", "tutored_tokens", "failed_share", "gated_share"]
    return names + (["cue_recall"] if has_module else [])


def distill_step(student, teacher, optimizer, processor, samples, step, rank, world_size, config, times):
    """One optimizer step of on-policy distillation: sample every micro-batch's rollouts, then for each
    the loss of distill.microbatch_loss (the teacher scores the student's tokens, the student moves
    toward it), backward; returns the metrics as (mean, weight) sums for reduce_metrics.
    L = (1 / N) sum over the step's N completion tokens (all micro-batches, all ranks), as in sft_step;
    with --loss_agg=seq-mean, N is its sequences and each token weighs 1 / |y| of its own."""
    privilege = config.privilege or MODE_PRIVILEGE[config.mode]
    with timed(times, "sample"):
        drawn = draw_rollouts(student, processor, samples, step, rank, world_size, config)
    # token-mean: N = the step's completion tokens; seq-mean: N = its sequences (each weighs 1 in total)
    def units(rollout):
        return int(rollout.completion_mask.sum()) if config.loss_agg == "token-mean" else len(rollout.texts)
    with timed(times, "communication"):
        total = all_reduce_mean(float(sum(units(r) for _, r, _ in drawn)), world_size) * world_size
    metrics = {}
    for epoch in range(config.ppo_epochs):             # later epochs score again: the teacher is frozen
        for rows, rollout, completions in drawn:
            loss, stats = microbatch_loss(student, teacher, processor, rows, rollout, completions, privilege, config,
                                          times, with_stats=epoch == 0)
            with timed(times, "student"):
                # this micro-batch's share of N, times world_size for all_reduce's average over ranks
                (loss * units(rollout) * world_size / total).backward()
            for name, (mean, weight) in stats.items():
                add_metric(metrics, name, mean, weight)
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


def learning_rate(step, config):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- main

def sft_stage(config, rank, world_size):
    """A tiny student starts from random weights, so a distillation mode without --init_from first
    runs SFT into out_dir/sft -> that checkpoint. A complete SFT run there with the same settings
    is reused; an incomplete one is continued under --resume."""
    # all of the vision tower trains: a random one must learn to see first (no freeze_vision here)
    sft = Config(**{key: getattr(config, key) for key in SFT_LEARNS_FROM + SFT_RUNS_WITH}, mode="sft",
                 out_dir=os.path.join(config.out_dir, "sft"), max_steps=config.sft_steps, lr=config.sft_lr,
                 warmup_steps=config.sft_warmup_steps, batch_size=config.sft_batch_size)
    ckpt = os.path.join(sft.out_dir, "ckpt")
    step, saved = saved_run(ckpt)
    learns = SFT_LEARNS_FROM + ["mode", "max_steps", "lr", "warmup_steps", "batch_size"]
    same = saved is not None and all(saved.get(key) == getattr(sft, key) for key in learns)
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


def set_threads(config, ranks):
    """--threads, or the cores shared among the ranks on this machine."""
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // ranks))


def teacher_pool(config, samples):
    """The rows a student asks its teacher rank about, in one order on both sides (teacher_ranks.py):
    the training samples, then the exact gap's prompts."""
    return samples + gap_prompts(config, samples)


def setup(config, rank, world_size):
    """Seeds, threads, and the run's parts: (source, model, processor, teacher or None, optimizer,
    training samples, evaluation samples, the step to start from)."""
    torch.manual_seed(config.seed)
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    set_threads(config, world_size)
    resume_dir = os.path.join(config.out_dir, "ckpt")
    if config.resume and not os.path.isdir(resume_dir) and os.path.isdir(resume_dir + ".old"):
        os.replace(resume_dir + ".old", resume_dir)  # killed between save_checkpoint's two renames
    if config.resume and not os.path.isdir(resume_dir):
        raise SystemExit(f"error: --resume=true but {resume_dir} does not exist")
    source = resume_dir if config.resume else (config.init_from or config.student)
    model, processor = load_model(source, dtype=getattr(torch, config.dtype), seed=config.seed, device=config.device)
    samples, eval_samples = training_samples(config, rank)
    # the self teacher is a copy of the student as it starts, taken before the student gets its module
    teacher = None
    if config.mode in DISTILL_MODES and config.teacher_ranks:                 # on a rank of its own
        teacher = teacher_ranks.RemoteTeacher(teacher_ranks.teacher_of(rank, world_size, dist.get_world_size()),
                                              teacher_pool(config, samples), collective_device())
    elif config.mode in DISTILL_MODES:
        teacher = load_teacher(config, model, processor)
    if config.mode == "vicur" and config.cue_recovery and cue_recovery.get(model) is None:  # a resumed run has it
        cue_recovery.attach(model, processor, sink_every=config.sink_every or None, init=config.cue_init)
        count, share = cue_recovery.parameter_count(model)
        if rank == 0:
            print(f"cue recovery: modules after layers {cue_recovery.get(model).layers}, {count / 1e6:.3f} M "
                  f"parameters ({100 * share:.1f}% of the student), W_O init '{config.cue_init}'")
    if config.freeze_vision:
        model.model.visual.requires_grad_(False)
    if config.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = FlatAdamW(model.parameters(), config.lr, config.weight_decay, (0.9, 0.95), rank, world_size,
                          shard=config.shard_optimizer, group=STUDENTS)
    step = load_train_state(config, optimizer) if config.resume else 0
    return source, model, processor, teacher, optimizer, samples, eval_samples, step


def describe_teacher(teacher, samples, config):
    """Rank 0, before distilling: who the teacher is and what it sees -> the privilege."""
    privilege = config.privilege or MODE_PRIVILEGE[config.mode]
    remote = isinstance(teacher, teacher_ranks.RemoteTeacher)
    count = teacher.num_parameters if remote else num_parameters(teacher)
    print(f"teacher: {config.teacher} ({count / 1e6:.2f} M parameters"
          + (f", on {config.teacher_ranks} rank(s) of its own" if remote else "")
          + f"), privilege '{privilege}', loss {config.loss}")
    lacking = sum(hint_text(s, privilege) is None for s in samples) if privilege != "none" else 0
    if lacking:
        print(f"note: {lacking} of {len(samples)} training samples have no {privilege}; "
              f"for them the teacher sees the student's prompt")
    return privilege


def train(config, rank, world_size):
    """One run of one mode: load, (distill from a teacher or SFT), save, evaluate, report."""
    start_time = time.time()
    source, model, processor, teacher, optimizer, samples, eval_samples, step = setup(config, rank, world_size)
    log_file = None
    if rank == 0:
        os.makedirs(config.out_dir, exist_ok=True)
        with open(os.path.join(config.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
        print(f"{config.mode}: student {source} ({num_parameters(model) / 1e6:.2f} M parameters), "
              f"{len(samples)} training samples, world size {world_size}, out_dir {config.out_dir}")
        log_file = open(os.path.join(config.out_dir, "log.jsonl"), "a" if config.resume else "w")
    if rank == 0 and teacher is not None:
        privilege, prompts = describe_teacher(teacher, samples, config), gap_prompts(config, samples)
        gap_before = measure_gap(model, teacher, processor, prompts, privilege, config) if prompts else None
        if gap_before:
            print(f"exact distillation gap before, on {len(prompts)} prompts x {config.gap_rollouts} samples: "
                  f"{gap_before['gap']:.5f} ± {gap_before['gap_se']:.5f} nats a token")
            log_file.write(json.dumps({"step": step, "distill_gap": without_per_prompt(gap_before)}) + "\n")
        if not config.resume and config.eval_extras and not reuse_sft_evaluation(config, eval_samples):
            print("before distillation:")
            write_evaluation(model, processor, eval_samples, os.path.join(config.out_dir, "eval_before.json"),
                             **evaluation_settings(config))

    if isinstance(teacher, teacher_ranks.RemoteTeacher):
        teacher.training()                         # its requests before training (the exact gap) are over
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
                results = evaluate(model, processor, eval_samples, **evaluation_settings(config))
                log_file.write(json.dumps({"step": step + 1, "eval_in_domain_avg": results["in_domain_avg"],
                                           "eval_ood_avg": results["ood_avg"]}) + "\n")
                model.train()
        if (step + 1) % config.save_every == 0:
            save_checkpoint(model, processor, optimizer, step + 1, config, rank, world_size)
    train_time = time.time() - start_time

    save_checkpoint(model, processor, optimizer, config.max_steps, config, rank, world_size)
    if rank == 0:
        notes, extra = [], {}
        if teacher is not None and gap_before:
            gap_after = measure_gap(model, teacher, processor, prompts, privilege, config)
            log_file.write(json.dumps({"step": config.max_steps, "distill_gap": without_per_prompt(gap_after)}) + "\n")
            extra, line = gap_report(gap_before, gap_after)
            notes.append(line)
            extra |= {"gap_prompts": len(prompts), "gap_rollouts": config.gap_rollouts}
        if teacher is None and not config.data and config.num_validation:  # SFT on the embedded world: the room it leaves teachers
            extra["headroom"], text = headroom(model, processor, validation_world(config.num_validation, seed=config.seed),
                                               **evaluation_settings(config))
            notes.append(text)
        finish(model, teacher, processor, eval_samples, config, world_size, notes, train_time, extra)
        print(f"done in {(time.time() - start_time) / 60:.1f} min; wrote {config.out_dir}/report.md, eval.json, ckpt/")
        log_file.close()
    if isinstance(teacher, teacher_ranks.RemoteTeacher):
        teacher.stop()
    if world_size > 1:
        dist.barrier(group=STUDENTS)  # the other ranks wait for rank 0's checkpoint and evaluation


def train_with_teacher_ranks(config, rank, world_size):
    """--teacher_ranks=K: ranks 0..S-1 train the student in their own process group (STUDENTS), ranks
    S..W-1 serve the teacher (teacher_ranks.serve)."""
    global STUDENTS
    students = world_size - config.teacher_ranks
    if config.mode not in DISTILL_MODES or not 0 < config.teacher_ranks < world_size:
        raise SystemExit(f"error: --teacher_ranks={config.teacher_ranks} needs a distillation mode and fewer teacher "
                         f"ranks than torchrun's {world_size}, so that at least one rank trains")
    if not config.init_from and config.student in TINY_SIZES:
        raise SystemExit("error: --teacher_ranks starts from a checkpoint (--init_from=DIR); the tiny default's SFT "
                         "stage runs without it: python train.py --mode=sft first")
    STUDENTS = dist.new_group(list(range(students)))                      # every rank takes part in making it
    if rank < students:
        train(config, rank, students)
    else:
        set_threads(config, world_size)
        samples, _ = training_samples(config, rank)
        processor = load_processor(config.init_from or config.student)   # prompts as the students make them
        teacher_ranks.serve(load_teacher(config, None, processor), processor, config, rank, students, world_size,
                            teacher_pool(config, samples), collective_device())
    dist.destroy_process_group()


def main(argv):
    config = parse_args(argv)
    if config.mode not in ["sft"] + DISTILL_MODES:
        raise SystemExit(f"error: unknown --mode={config.mode}; available: {['sft'] + DISTILL_MODES}")
    if config.mode == "ptdpo" and config.num_rollouts < 2:
        raise SystemExit(f"error: --mode=ptdpo compares rollouts within a group: --num_rollouts must be at least 2, "
                         f"got {config.num_rollouts} (the paper's groups: --num_rollouts=8 --batch_size=4)")
    if config.loss_agg not in ("token-mean", "seq-mean") or (config.loss_agg == "seq-mean" and config.mode == "ptdpo"):
        raise SystemExit(f"error: --loss_agg={config.loss_agg}: token-mean or seq-mean (the distillation modes; "
                         f"PTD-PO's loss is a token mean)")
    if config.mode in DISTILL_MODES and config.max_new_tokens >= config.max_length:
        raise SystemExit(f"error: --max_new_tokens={config.max_new_tokens} leaves no room for the prompt in "
                         f"--max_length={config.max_length}")
    if config.validate and not config.num_validation:
        raise SystemExit("error: --validate evaluates on the validation split, but --num_validation=0")
    if config.dry_run:
        # WORLD_SIZE=8 python train.py ...: the plan of one GPU of 8
        return print_memory_plan(config, int(os.environ.get("WORLD_SIZE", 1)), config.mode in DISTILL_MODES)
    rank, world_size = init_distributed(config)
    if config.teacher_ranks:
        return train_with_teacher_ranks(config, rank, world_size)
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


if __name__ == "__main__":
    main(sys.argv[1:])
