"""Speed and memory, measured against references in the same process: the chunked divergences
against plain full-materialisation, the cue module against the plain model, our sampler against
model.generate; and a training step's time split.

    python bench.py                       # 2048 tokens over Qwen3-VL's 151,936-token vocabulary
    python bench.py --tokens=512 --repeats=1
    python bench.py --from_hidden         # the paper's log-probs from hidden states (d 2048) against the logits multiplied out
    python bench.py --sink                # prefill and decode time with and without the cue recovery module
    python bench.py --sink --sink_model=2b   # the same on a random model with Qwen3-VL-2B's shapes (GPU)
    python bench.py --rollout             # rollout.sample_completions's tokens per second against model.generate's
    python bench.py --train_step          # where a ViCuR training step's time goes
    python bench.py --all                 # all five in one run, then one markdown table of ratios
    python bench.py --check               # --all, then each part alone in a fresh process: do the rows agree?
    python bench.py --all --json=rows.json   # also write the rows: [{what, ours, reference, ratio, goal}]

--all runs each part from the state a fresh `python bench.py --<part>` starts in (see `fresh_state`):
train.py sets its own thread count, and every part seeds torch and builds its own models.

For every divergence we time forward + backward (sum of the per-token values, backward into the
student logits) and record the peak memory it takes on top of what was allocated before
the call (the student and teacher logits). The student logits' gradient is allocated
during the call and counted in "peak"; it is the same size (tokens x V x 4 bytes) for
both implementations and unavoidable, so the table also gives the ratio without it.

Memory: on CUDA, torch.cuda.max_memory_allocated. On CPU (Linux), the process's peak
resident set size (VmHWM in /proc/self/status, reset before each call by writing "5" to
/proc/self/clear_refs); torch's large CPU tensors are mmap'ed and returned to the OS when
freed, so this tracks live tensors. The script checks the method first by allocating a
1 GiB tensor.

The references live here, not in tests/: the tests' references are float64 oracles for
correctness; the baseline to beat is what one would write without chunking, in float32.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from divergences import HiddenLogits, divergence, token_logprobs

GiB = 2**30


# ---------------------------------------------------------------------------
# references: the whole batch at once, float32, autograd saves every (N, V) intermediate

def reference_teacher_logprobs(teacher, vocab_size):
    if not isinstance(teacher, tuple):
        return torch.log_softmax(teacher.float(), dim=-1)
    top_logprobs, top_ids = teacher  # (N, M) each: leftover mass spread evenly over the rest
    leftover = (1 - top_logprobs.exp().sum(-1, keepdim=True)).clamp_min(1e-30)
    fill = leftover.log() - torch.log(torch.tensor(float(vocab_size - top_ids.shape[-1])))
    return fill.expand(-1, vocab_size).clone().scatter(-1, top_ids, top_logprobs)


def reference_jsd(log_p_s, log_p_t, beta):
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    log_m = ((1 - beta) * p_s + beta * p_t).log()  # M = (1-beta) p_S + beta p_T
    return beta * (p_t * (log_p_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_p_s - log_m)).sum(-1)


def reference_divergence(student_logits, teacher, kind, beta=0.5, top_k=None):
    log_p_s = torch.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    log_p_t = reference_teacher_logprobs(teacher, student_logits.shape[-1])  # (N, V)
    if kind == "fkl":
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if kind == "rkl":
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    if kind == "jsd":
        return reference_jsd(log_p_s, log_p_t, beta)
    top_ids = log_p_s.detach().topk(top_k, dim=-1).indices  # topk_jsd: K+1 buckets
    buckets = []
    for log_p in (log_p_s, log_p_t):
        top = log_p.gather(-1, top_ids)
        tail = (1 - top.exp().sum(-1, keepdim=True)).clamp_min(1e-30)
        buckets.append(torch.cat([top, tail.log()], dim=-1))
    return reference_jsd(*buckets, beta)


# ---------------------------------------------------------------------------
# measuring

def _read_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_of(fn, device):
    """Run fn() and return (result, bytes of peak memory above what was allocated before)."""
    gc.collect()
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so RSS = live memory
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    before = _read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    result = fn()
    return result, _read_status_kib("VmHWM") - before


def forward_backward(fn, student_logits):
    student_logits.grad = None
    values = fn(student_logits)
    values.sum().backward()
    if student_logits.is_cuda:
        torch.cuda.synchronize()
    return values.detach()


def measure(fn, student_logits, repeats, device):
    """-> (median seconds, max peak bytes, values) over `repeats` forward+backward calls."""
    seconds, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        values, peak = peak_memory_of(lambda: forward_backward(fn, student_logits), device)
        seconds.append(time.perf_counter() - start)
        peaks.append(peak)
        student_logits.grad = None
    return statistics.median(seconds), max(peaks), values


# ---------------------------------------------------------------------------
# the divergences: ours against the reference, forward + backward

def bench_divergences(args, device):
    """Each divergence, forward + backward, ours against the float32 full-materialisation reference."""
    _, one_gib = peak_memory_of(lambda: torch.ones(GiB // 4, device=device).sum(), device)
    print(f"device {device}; memory check: a 1 GiB tensor reads as {one_gib / GiB:.3f} GiB")

    student = (torch.randn(args.tokens, args.vocab, device=device) * 2).requires_grad_()  # (N, V) fp32
    teacher = torch.randn(args.tokens, args.vocab, device=device) * 2  # (N, V)
    # teacher's top-M as a server would return it: M distinct ids, log-probs summing to 0.9
    offsets = torch.randint(args.vocab, (args.tokens, 1), device=device)
    top_ids = (offsets + torch.arange(args.top_m, device=device) * (args.vocab // args.top_m)) % args.vocab
    top_logprobs = torch.log_softmax(torch.randn(args.tokens, args.top_m, device=device) * 2, -1) + torch.tensor(0.9).log()
    teacher_top = (top_logprobs, top_ids)
    gc.collect()
    grad_bytes = student.numel() * student.element_size()

    cases = [  # (label, kind, teacher, kwargs)
        ("fkl", "fkl", teacher, {}),
        ("rkl", "rkl", teacher, {}),
        ("jsd", "jsd", teacher, {}),
        (f"topk_jsd K={args.top_k}", "topk_jsd", teacher, {"top_k": args.top_k}),
        (f"topk_jsd K={args.top_k}, teacher top-M={args.top_m}", "topk_jsd", teacher_top, {"top_k": args.top_k}),
    ]
    print(f"{args.tokens} tokens x V={args.vocab}, fp32 logits ({grad_bytes / GiB:.2f} GiB each), "
          f"chunk_size={args.chunk_size or 'default'}, median of {args.repeats} run(s); "
          f"peak = memory above the inputs during forward+backward, incl. the logits' gradient")
    header = (f"{'case':<36} {'ref s':>7} {'ours s':>7} {'time':>6} {'ref GiB':>8} {'ours GiB':>9} "
              f"{'peak':>6} {'peak-grad':>10} {'max |diff|':>11}")
    print(header)
    print("-" * len(header))
    rows = []
    for label, kind, teacher_input, kwargs in cases:
        ref_s, ref_peak, ref_values = measure(
            lambda s: reference_divergence(s, teacher_input, kind, **kwargs), student, args.repeats, device)
        ours_s, ours_peak, ours_values = measure(
            lambda s: divergence(s, teacher_input, kind, chunk_size=args.chunk_size, **kwargs), student, args.repeats, device)
        max_diff = (ours_values - ref_values).abs().max().item()
        print(f"{label:<36} {ref_s:>7.2f} {ours_s:>7.2f} {ours_s / ref_s:>6.2f} {ref_peak / GiB:>8.2f} "
              f"{ours_peak / GiB:>9.2f} {ours_peak / ref_peak:>6.2f} "
              f"{(ours_peak - grad_bytes) / (ref_peak - grad_bytes):>10.2f} {max_diff:>11.1e}", flush=True)
        rows += [(f"{label}: time, {args.tokens} x {args.vocab}", f"{ours_s:.2f} s", f"{ref_s:.2f} s", ours_s / ref_s,
                  "<= 1"),
                 (f"{label}: peak memory", f"{ours_peak / GiB:.2f} GiB", f"{ref_peak / GiB:.2f} GiB",
                  ours_peak / ref_peak, "<= 0.25"),
                 (f"{label}: peak memory without the logits' gradient", f"{(ours_peak - grad_bytes) / GiB:.2f} GiB",
                  f"{(ref_peak - grad_bytes) / GiB:.2f} GiB", (ours_peak - grad_bytes) / (ref_peak - grad_bytes), None)]
    print("time, peak, peak-grad: ours / reference (lower is better; goal: peak <= 0.25 at time <= 1)")
    return rows


# ---------------------------------------------------------------------------
# the paper's loss from hidden states: HiddenLogits against the logits multiplied out

def bench_hidden(args, device):
    """log pi(y_t) of N tokens from hidden states h (N, d) and the output projection W (V, d), forward
    + backward into h and W: ours (divergences.HiddenLogits, chunk by chunk) against plain torch
    (log_softmax(h W^T), every (N, V) intermediate saved). Memory is the peak above the inputs, W and
    W's gradient buffer, which training holds anyway: the activations of the loss."""
    hidden = (torch.randn(args.tokens, args.hidden, device=device) * 0.5).requires_grad_()        # (N, d)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_()         # (V, d)
    weight.grad = torch.zeros_like(weight)                          # the buffer training holds anyway
    tokens = torch.randint(args.vocab, (args.tokens,), device=device)

    chunked = lambda h: token_logprobs(HiddenLogits(h, weight), tokens, chunk_size=args.chunk_size)  # noqa: E731
    plain = lambda h: torch.log_softmax(h @ weight.T, -1).gather(-1, tokens[:, None])[:, 0]  # noqa: E731
    results = {name: measure(fn, hidden, args.repeats, device) for name, fn in (("reference", plain), ("ours", chunked))}
    (ref_s, ref_peak, ref_values), (ours_s, ours_peak, ours_values) = results["reference"], results["ours"]
    where = f"{args.tokens} tokens, d={args.hidden}, V={args.vocab}"
    print(f"device {device}; the sampled-token log-probs from hidden states, {where}, float32, median of "
          f"{args.repeats} run(s); max |diff| {(ours_values - ref_values).abs().max().item():.1e}")
    print(f"{'':<10} {'seconds':>8} {'GiB':>7}\n{'reference':<10} {ref_s:>8.2f} {ref_peak / GiB:>7.2f}\n"
          f"{'ours':<10} {ours_s:>8.2f} {ours_peak / GiB:>7.2f}\nratio      {ours_s / ref_s:>8.2f} {ours_peak / ref_peak:>7.2f}")
    return [(f"log-probs from hidden states: time, {where}", f"{ours_s:.2f} s", f"{ref_s:.2f} s", ours_s / ref_s, "<= 1"),
            (f"log-probs from hidden states: activation memory, {where}", f"{ours_peak / GiB:.2f} GiB",
             f"{ref_peak / GiB:.2f} GiB", ours_peak / ref_peak, "<= 0.10")]


# ---------------------------------------------------------------------------
# the cue recovery module: prefill and per-token decode time with and without it

def qwen3_vl_2b_shaped(tokenizer):
    """A randomly initialised model with Qwen3-VL-2B's shapes (model.QWEN3_VL_SHAPES) and the tiny
    tokenizer's special-token ids: for timing only."""
    from transformers import Qwen3VLForConditionalGeneration
    from model import shaped_config
    return Qwen3VLForConditionalGeneration(shaped_config("Qwen/Qwen3-VL-2B-Instruct", tokenizer))


def synthetic_prompts(model, tokenizer, batch_size, grid, text_tokens, device):
    """<|im_start|> user <vision_start> image pads <vision_end> text...: one grid x grid-patch image each."""
    ids = tokenizer.convert_tokens_to_ids
    merged = (grid // 2) ** 2
    row = ([ids("<|im_start|>"), ids("user"), ids("<|vision_start|>")] + [ids("<|image_pad|>")] * merged
           + [ids("<|vision_end|>")] + [ids("red")] * text_tokens + [ids("<|im_end|>"), ids("<|im_start|>")])
    input_ids = torch.tensor([row] * batch_size, device=device)
    patch_dim = 3 * 2 * 16 * 16
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == ids("<|image_pad|>")).long(),
            "pixel_values": torch.randn(batch_size * grid * grid, patch_dim, device=device, dtype=model.dtype),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * batch_size, device=device)}


@torch.no_grad()
def time_prefill_and_decode(model, batch, decode_steps):
    """(prefill seconds, seconds per decoded token) of one round of the calls rollout.sample_completions makes."""
    from rollout import prompt_positions
    from transformers import DynamicCache
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    positions, next_position = prompt_positions(model, batch)
    cache = DynamicCache(config=model.config.get_text_config())
    sync()
    start = time.perf_counter()
    logits = model(**batch, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    sync()
    prefill = time.perf_counter() - start
    mask = batch["attention_mask"]
    start = time.perf_counter()
    for _ in range(decode_steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token, attention_mask=mask, position_ids=next_position.view(1, -1, 1).expand(3, -1, -1),
                       past_key_values=cache, use_cache=True).logits
        next_position = next_position + 1
    sync()
    return prefill, (time.perf_counter() - start) / decode_steps


def bench_cue_recovery(args, device):
    """The plain model and a copy with the module, timed in alternating rounds (medians), so that
    clock and cache drift fall on both alike."""
    import copy
    import cue_recovery
    from model import load_model, tiny_processor
    processor = tiny_processor()
    if args.sink_model == "2b":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        plain = qwen3_vl_2b_shaped(processor.tokenizer).to(device=device, dtype=dtype)
        grid = args.grid
    else:
        plain, _ = load_model(args.sink_model, device=device)
        grid = 6                                                   # the tiny world's 96x96 images
    plain.eval()
    with_module = copy.deepcopy(plain)
    cue_recovery.attach(with_module, processor, init="default")    # non-zero W_O: the module does its full work
    batch = synthetic_prompts(plain, processor.tokenizer, args.batch, grid, text_tokens=32, device=device)
    rounds = {"plain": [], "module": []}
    for round_ in range(max(args.repeats, 5) + 1):                 # the first round warms up
        for name, model in (("plain", plain), ("module", with_module)):
            timing = time_prefill_and_decode(model, batch, args.decode_steps)
            if round_:
                rounds[name].append(timing)
    (a_prefill, a_decode), (b_prefill, b_decode) = [[statistics.median(t[i] for t in rounds[name]) for i in (0, 1)]
                                                    for name in ("plain", "module")]
    count, share = cue_recovery.parameter_count(with_module)
    print(f"device {device}; model {args.sink_model} ({plain.dtype}); batch {args.batch}, "
          f"{batch['input_ids'].shape[1]} prompt tokens of which {(grid // 2) ** 2} visual; module after layers "
          f"{cue_recovery.get(with_module).layers}: {count / 1e6:.2f} M parameters ({100 * share:.1f}% of the model); "
          f"median of {len(rounds['plain'])} alternating rounds")
    print(f"{'':<10} {'plain':>10} {'+ module':>10} {'ratio':>7}")
    for name, a, b in (("prefill", a_prefill, b_prefill), ("decode/tok", a_decode, b_decode)):
        print(f"{name:<10} {1000 * a:>8.2f}ms {1000 * b:>8.2f}ms {b / a:>7.3f}")
    where = f"{args.sink_model}, batch {args.batch}"
    return [(f"cue module: prefill ({where})", f"{1000 * b_prefill:.2f} ms", f"{1000 * a_prefill:.2f} ms without",
             b_prefill / a_prefill, "the paper: 1.04-1.25"),
            (f"cue module: decode per token ({where})", f"{1000 * b_decode:.2f} ms", f"{1000 * a_decode:.2f} ms without",
             b_decode / a_decode, "1 (no module work)")]


# ---------------------------------------------------------------------------
# rollouts: our sampling loop against transformers' generate, same model, batch and tokens

def time_rollout(model, processor, batch_size, args, device):
    """Greedy decoding of one batch of batch_size prompts by rollout.sample_completions (dynamic and
    static KV cache) and by model.generate, which must all agree token for token, in alternating
    rounds -> (new tokens, median seconds of ours, of ours with the static cache, of generate)."""
    from data import collate, eval_world, student_messages
    from rollout import sample_completions
    samples = eval_world(batch_size, seed=1)
    batch = {k: v.to(device) for k, v in collate(processor, [student_messages(s) for s in samples]).items()}
    width = batch["input_ids"].shape[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, tokens_of = {"ours": [], "static": [], "generate": []}, {}
    for round_ in range(max(args.repeats, 5) + 1):                 # the first round warms up
        for name in times:
            sync()
            start = time.perf_counter()
            if name in ("ours", "static"):
                ids = sample_completions(model, processor, batch, greedy=True, max_new_tokens=args.decode_steps,
                                         static_cache=name == "static").completion_ids
            else:
                ids = model.generate(**batch, max_new_tokens=args.decode_steps, do_sample=False)[:, width:]
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
            tokens_of[name] = ids
    ours, theirs = tokens_of["ours"], tokens_of["generate"]
    assert torch.equal(ours[:, :theirs.shape[1]], theirs), "our greedy tokens differ from generate's"
    assert torch.equal(tokens_of["static"], ours), "the static cache's greedy tokens differ from the dynamic cache's"
    return batch_size * theirs.shape[1], *(statistics.median(times[name]) for name in ("ours", "static", "generate"))


def bench_rollout(args, device):
    """Tokens per second of our sampler against model.generate on the same greedy tokens, at each
    batch size of --rollout_batches (medians of alternating rounds); and how sampling scales from
    batch 2 (the presets' micro-batch) to the largest batch: train.draw_rollouts samples a step's
    prompts together for that reason."""
    from model import load_model
    if args.sink_model == "2b":
        raise SystemExit("--rollout times a tiny model (--sink_model=tiny or tiny-large): the 2B shapes have no tokenizer")
    model, processor = load_model(args.sink_model, device=device)
    model.eval()
    sizes = [int(size) for size in args.rollout_batches.split(",")]
    print(f"device {device}; model {args.sink_model}; {args.decode_steps} new tokens a prompt at most (greedy, "
          f"identical tokens); median of {max(args.repeats, 5)} alternating rounds")
    print(f"{'batch':>5} {'ours tokens/s':>14} {'generate tokens/s':>18} {'ratio':>6} {'static cache tokens/s':>22}")
    rows, throughput = [], {}
    for size in sizes:
        tokens, ours, static, theirs = time_rollout(model, processor, size, args, device)
        throughput[size] = tokens / ours
        print(f"{size:>5} {tokens / ours:>14.0f} {tokens / theirs:>18.0f} {theirs / ours:>6.2f} {tokens / static:>22.0f}")
        rows.append((f"sampling: tokens/s, batch {size} greedy", f"{tokens / ours:.0f}", f"{tokens / theirs:.0f} (generate)",
                     theirs / ours, ">= 1"))
        rows.append((f"sampling with the static cache: tokens/s, batch {size} greedy", f"{tokens / static:.0f}",
                     f"{tokens / ours:.0f} (dynamic cache)", ours / static, None))
    if 2 in throughput and max(sizes) > 2:
        largest = max(sizes)
        scale = throughput[largest] / throughput[2]
        print(f"batch {largest} against batch 2, tokens/s: {scale:.2f}")
        rows.append((f"sampling: tokens/s at batch {largest} over batch 2 (ours)", f"{throughput[largest]:.0f}",
                     f"{throughput[2]:.0f} (batch 2)", scale, ">= 4"))
    return rows


# ---------------------------------------------------------------------------
# a training step: where its time goes

def bench_train_step(args, device):
    """A few ViCuR steps of train.py (batch --batch, rollouts of up to --decode_steps tokens) from a
    random tiny student (or --ckpt): the step's time split as train.py logs it (time_* per step), and
    completion tokens per second; the first step is left out as warm-up."""
    import train
    from model import load_model
    with tempfile.TemporaryDirectory() as folder:
        start = args.ckpt
        if not start:
            model, processor = load_model("tiny")
            start = os.path.join(folder, "start")
            model.save_pretrained(start)
            processor.save_pretrained(start)
        train.main(["--mode=vicur", f"--init_from={start}", f"--max_steps={max(args.repeats, 3) + 1}",
                    f"--batch_size={args.batch}", f"--max_new_tokens={args.decode_steps}", "--num_eval=7",
                    f"--device={device}", f"--out_dir={os.path.join(folder, 'run')}"])
        with open(os.path.join(folder, "run", "log.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"step_time"' in line][1:]
    step_time = statistics.median(r["step_time"] for r in steps)
    parts = sorted({k for r in steps for k in r if k.startswith("time_")})
    print(f"device {device}; ViCuR steps of {args.batch} prompts x 1 rollout (up to {args.decode_steps} tokens), "
          f"median of {len(steps)} steps: {step_time:.3f} s per step, "
          f"{statistics.median(r['rollout_length'] * args.batch / r['step_time'] for r in steps):.0f} completion tokens/s")
    rows = []
    shares = [(part[5:], statistics.median(r.get(part, 0.0) for r in steps)) for part in parts]
    other = statistics.median(r["step_time"] - sum(r.get(part, 0.0) for part in parts) for r in steps)  # per step
    for name, seconds in shares + [("other", other)]:
        print(f"  {name:<14} {seconds:>7.3f} s {100 * seconds / step_time:>6.1f}%")
        rows.append((f"training step ({args.batch} x up to {args.decode_steps} tokens): {name}", f"{seconds:.3f} s",
                     f"{step_time:.3f} s a step", seconds / step_time, "share of the step"))
    return rows


# ---------------------------------------------------------------------------
# --all: every part from the same state, and the check that its rows match the parts run alone

# name: (function, the sizes --all runs it at): those of its README line, with more rounds where they
# are cheap (seconds): with 5, two runs of the cue module's decode ratio came out 25% apart, and two
# training steps' shares 0.16 and 0.13
PARTS = {
    "divergences": (bench_divergences, {}),
    "from_hidden": (bench_hidden, {"tokens": 1024}),
    "rollout": (bench_rollout, {"rollout_batches": "1,2,8,32", "decode_steps": 32, "repeats": 15}),
    "train_step": (bench_train_step, {"batch": 16, "decode_steps": 96, "repeats": 10}),
    "sink": (bench_cue_recovery, {"batch": 8, "decode_steps": 16, "repeats": 15}),
}
SIZE_FLAGS = ("tokens", "vocab", "hidden", "top_k", "top_m", "chunk_size", "repeats", "ckpt", "sink_model", "grid",
              "batch", "rollout_batches", "decode_steps")
ROW_FIELDS = ("what", "ours", "reference", "ratio", "goal")
TOLERANCE = 0.15  # --check: the largest relative difference between a row in --all and alone


@contextlib.contextmanager
def fresh_state(seed=0):
    """Run a part from the state `python bench.py --<part>` starts in, and leave that state behind:
    the thread count as it was (train.py sets its own, os.cpu_count() // world size, which is not
    torch's default under taskset, a container's CPU limit, OMP_NUM_THREADS or SMT), torch seeded
    (the 2b model's random weights and every random input), earlier parts' models and heap freed."""
    threads = torch.get_num_threads()
    gc.collect()                                        # models left in reference cycles
    ctypes.CDLL("libc.so.6").malloc_trim(0)             # their freed heap back to the OS
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:          # only then: setting it also resets MKL's and oneDNN's
            torch.set_num_threads(threads)


def part_args(name, args):
    """The options part `name` runs with in --all: the command line's, with the part's sizes over them."""
    return argparse.Namespace(**{**vars(args), **PARTS[name][1]})


def run_all(args, device):
    """Every part in this process, each from a fresh state -> all their rows."""
    rows = []
    for name, (bench_part, _) in PARTS.items():
        with fresh_state():
            rows += bench_part(part_args(name, args), device)
    return rows


def part_command(name, args, json_path):
    """The command line that runs part `name` alone at --all's sizes and writes its rows to json_path."""
    options = vars(part_args(name, args))
    flags = [f"--{key}={options[key]}" for key in SIZE_FLAGS if options[key] is not None]
    part_flag = [] if name == "divergences" else [f"--{name}"]  # the divergences run when no part is named
    return [sys.executable, os.path.abspath(__file__), *part_flag, *flags, f"--json={json_path}"]


def rows_alone(args):
    """Each part run alone in a fresh process, at --all's sizes -> {what: ratio} of all their rows."""
    ratios = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in PARTS:
            json_path = os.path.join(folder, f"{name}.json")
            command = part_command(name, args, json_path)
            print(f"alone: {' '.join(command[1:-1])}", flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(json_path) as f:
                ratios |= {row["what"]: row["ratio"] for row in json.load(f)}
    return ratios


def agree(ratio_all, ratio_alone):
    """Within TOLERANCE of the larger of the two; ratios under 0.2 (a share of the step, the peak without
    the gradient) on the scale of 0.2, as 0.03 of a step or of the reference's peak is run-to-run noise."""
    return abs(ratio_all - ratio_alone) <= TOLERANCE * max(abs(ratio_all), abs(ratio_alone), 0.2)


def cpu_seconds():
    """(seconds the machine's CPUs were busy, seconds this process and its finished children ran, wall clock)."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = (int(n) for n in stat.readline().split()[1:9])
    own = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system, time.perf_counter())


def share_of_others(start):
    """The share of the machine's CPU time other processes (and the hypervisor) took since `start`,
    a cpu_seconds(): with more runnable threads than cores each OpenMP barrier waits out a time slice,
    so the small ops of a tiny model slow many times over, and unevenly."""
    busy, own, wall = (now - then for now, then in zip(cpu_seconds(), start))
    return max(0.0, busy - own) / (wall * os.cpu_count())


def check_against_alone(rows, args, others_during_all):
    """Print each row's ratio in --all beside the same part's alone, and how busy other processes kept the
    machine meanwhile; exit 1 when any row differs by more than TOLERANCE."""
    start = cpu_seconds()
    alone = rows_alone(args)
    others_during_alone = share_of_others(start)
    print(f"\n| measurement | --all | alone | agree within {TOLERANCE:.0%} |\n|---|---|---|---|")
    differing = []
    for what, _, _, ratio, _ in rows:
        agrees = agree(ratio, alone[what])
        differing += [] if agrees else [what]
        print(f"| {what} | {ratio:.2f} | {alone[what]:.2f} | {'yes' if agrees else '**no**'} |")
    print(f"other processes took {others_during_all:.0%} of the CPUs during --all, {others_during_alone:.0%} during "
          f"the runs alone")
    if differing:
        busiest = max(others_during_all, others_during_alone)
        cause = (f"other processes took up to {busiest:.0%} of the CPUs: rerun on an idle machine" if busiest > 0.1
                 else "the machine was idle: rerun (--repeats=3 takes the divergences' medians) to tell a part's "
                      "run-to-run noise from a part disturbing the next")
        raise SystemExit(f"--check: {len(differing)} of {len(rows)} rows differ between --all and the part alone by "
                         f"more than {TOLERANCE:.0%}: {differing}; {cause}")
    print(f"--check: all {len(rows)} rows of --all agree with the parts run alone within {TOLERANCE:.0%}")


def print_table(rows, device):
    """The rows as one markdown table of ratios."""
    print(f"\n| measurement ({device}) | ours | reference | ratio | goal |\n|---|---|---|---|---|")
    for what, ours, reference, ratio, goal in rows:
        print(f"| {what} | {ours} | {reference} | {ratio:.2f} | {goal or ''} |")


def write_rows(rows, path):
    """The rows as a JSON list of {what, ours, reference, ratio, goal} (goal null where there is none)."""
    with open(path, "w") as f:
        json.dump([dict(zip(ROW_FIELDS, row)) for row in rows], f, indent=1)


def parse_args(argv):
    """The command line (None: sys.argv) -> its options; --help lists each with its meaning."""
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="divergences: tokens (rows of the logits)")
    parser.add_argument("--vocab", type=int, default=151936, help="divergences: vocabulary size (columns)")
    parser.add_argument("--top_k", type=int, default=100, help="divergences: K of topk_jsd")
    parser.add_argument("--top_m", type=int, default=100, help="divergences: M of the teacher's top-M log-probs")
    parser.add_argument("--chunk_size", type=int, default=None, help="divergences: rows per chunk (default: ours)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per case, median (--sink, --rollout: at least 5; --train_step: at least 3)")
    parser.add_argument("--hidden", type=int, default=2048, help="--from_hidden: d, the hidden size (Qwen3-VL-2B's)")
    parser.add_argument("--from_hidden", action="store_true",
                        help="the sampled-token log-probs from hidden states against the logits multiplied out, instead")
    parser.add_argument("--sink", action="store_true", help="time the cue recovery module instead")
    parser.add_argument("--rollout", action="store_true",
                        help="time rollout.sample_completions against model.generate instead")
    parser.add_argument("--train_step", action="store_true", help="split a ViCuR training step's time instead")
    parser.add_argument("--all", action="store_true", help="all five in one run, then one table of ratios")
    parser.add_argument("--check", action="store_true",
                        help=f"--all, then each part alone in a fresh process at the same sizes: a table of both "
                             f"ratios per row; exit 1 when one differs by more than {100 * TOLERANCE:.0f} percent")
    parser.add_argument("--json", default="", help="also write the rows to this file: [{what, ours, reference, "
                                                   "ratio, goal}], goal null where there is none")
    parser.add_argument("--ckpt", default="", help="--train_step: start from this checkpoint (default: random tiny)")
    parser.add_argument("--sink_model", default="tiny",
                        help="--sink, --rollout: tiny | tiny-large | 2b (random, Qwen3-VL-2B shapes; --sink only)")
    parser.add_argument("--grid", type=int, default=32, help="--sink 2b: patches per image side (32 -> 256 visual tokens)")
    parser.add_argument("--batch", type=int, default=8, help="--sink, --train_step: prompts per batch")
    parser.add_argument("--rollout_batches", default="1,2,8,32",
                        help="--rollout: the batch sizes to time (with 2 and a larger one: their tokens/s ratio)")
    parser.add_argument("--decode_steps", type=int, default=32,
                        help="--sink, --rollout: tokens decoded; --train_step: the rollouts' most new tokens")
    return parser.parse_args(argv)


def main(argv=None):
    """One part (the divergences unless --sink, --rollout or --train_step), or --all's table, then --check."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.all or args.check:
        start = cpu_seconds()
        rows = run_all(args, device)
        print_table(rows, device)
        others_during_all = share_of_others(start)
    else:
        name = next((name for name in ("from_hidden", "sink", "rollout", "train_step") if getattr(args, name)),
                    "divergences")
        with fresh_state():
            rows = PARTS[name][0](args, device)
    if args.json:
        write_rows(rows, args.json)
    if args.check:
        check_against_alone(rows, args, others_during_all)


if __name__ == "__main__":
    main()
