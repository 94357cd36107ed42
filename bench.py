"""Speed and memory, measured against references in the same process: the chunked divergences
against plain full-materialisation, the cue module against the plain model, our sampler against
model.generate; and a training step's time split.

    python bench.py                       # 2048 tokens over Qwen3-VL's 151,936-token vocabulary
    python bench.py --tokens=512 --repeats=1
    python bench.py --sink                # prefill and decode time with and without the cue recovery module
    python bench.py --sink --sink_model=2b   # the same on a random model with Qwen3-VL-2B's shapes (GPU)
    python bench.py --rollout             # rollout.sample's tokens per second against model.generate's
    python bench.py --train_step          # where a ViCuR training step's time goes
    python bench.py --all                 # all four in one run, then one markdown table of ratios

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
import ctypes
import gc
import statistics
import time

import torch

from distill import divergence

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
    """(prefill seconds, seconds per decoded token) of one round of the calls rollout.sample makes."""
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

def bench_rollout(args, device):
    """Greedy decoding of the same batch by rollout.sample and by model.generate (which must agree
    token for token), timed in alternating rounds; new tokens per second, medians."""
    from data import collate, eval_world, student_messages
    from model import load_model
    from rollout import sample
    if args.sink_model == "2b":
        raise SystemExit("--rollout times a tiny model (--sink_model=tiny or tiny-large): the 2B shapes have no tokenizer")
    model, processor = load_model(args.sink_model, device=device)
    model.eval()
    samples = eval_world(args.batch, seed=1)
    batch = {k: v.to(device) for k, v in collate(processor, [student_messages(s) for s in samples]).items()}
    width = batch["input_ids"].shape[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, tokens_of = {"ours": [], "generate": []}, {}
    for round_ in range(max(args.repeats, 5) + 1):                 # the first round warms up
        for name in times:
            sync()
            start = time.perf_counter()
            if name == "ours":
                ids = sample(model, processor, batch, greedy=True, max_new_tokens=args.decode_steps).completion_ids
            else:
                ids = model.generate(**batch, max_new_tokens=args.decode_steps, do_sample=False)[:, width:]
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
            tokens_of[name] = ids
    ours, theirs = tokens_of["ours"], tokens_of["generate"]
    assert torch.equal(ours[:, :theirs.shape[1]], theirs), "our greedy tokens differ from generate's"
    tokens = args.batch * theirs.shape[1]
    print(f"device {device}; model {args.sink_model}; batch {args.batch} x {theirs.shape[1]} new tokens "
          f"(greedy, identical tokens); median of {len(times['ours'])} alternating rounds")
    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    for name in ("generate", "ours"):
        print(f"{name:<9} {median[name]:>8.3f} s {tokens / median[name]:>10.0f} tokens/s")
    ratio = median["generate"] / median["ours"]
    print(f"throughput ratio ours / generate: {ratio:.2f} (goal >= 1)")
    return [(f"sampling: tokens/s, batch {args.batch} x {theirs.shape[1]} greedy", f"{tokens / median['ours']:.0f}",
             f"{tokens / median['generate']:.0f} (generate)", ratio, ">= 1")]


# ---------------------------------------------------------------------------
# a training step: where its time goes

def bench_train_step(args, device):
    """A few ViCuR steps of train.py (batch --batch, rollouts of up to --decode_steps tokens) from a
    random tiny student (or --ckpt): the step's time split as train.py logs it (time_* per step), and
    completion tokens per second; the first step is left out as warm-up."""
    import json
    import os
    import tempfile
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
    for name, seconds in shares + [("other", step_time - sum(seconds for _, seconds in shares))]:
        print(f"  {name:<14} {seconds:>7.3f} s {100 * seconds / step_time:>6.1f}%")
        rows.append((f"training step ({args.batch} x up to {args.decode_steps} tokens): {name}", f"{seconds:.3f} s",
                     f"{step_time:.3f} s a step", seconds / step_time, "share of the step"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--top_k", type=int, default=100, help="K of topk_jsd")
    parser.add_argument("--top_m", type=int, default=100, help="M of the teacher's top-M log-probs")
    parser.add_argument("--chunk_size", type=int, default=None, help="rows per chunk (default: ours)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (median)")
    parser.add_argument("--sink", action="store_true", help="time the cue recovery module instead")
    parser.add_argument("--rollout", action="store_true", help="time rollout.sample against model.generate instead")
    parser.add_argument("--train_step", action="store_true", help="split a ViCuR training step's time instead")
    parser.add_argument("--all", action="store_true", help="all four in one run, then one table of ratios")
    parser.add_argument("--ckpt", default="", help="--train_step: start from this checkpoint (default: random tiny)")
    parser.add_argument("--sink_model", default="tiny", help="tiny | tiny-large | 2b (random, Qwen3-VL-2B shapes)")
    parser.add_argument("--grid", type=int, default=32, help="2b: patches per image side (32 -> 256 visual tokens)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode_steps", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.sink:
        return bench_cue_recovery(args, device)
    if args.rollout:
        return bench_rollout(args, device)
    if args.train_step:
        return bench_train_step(args, device)
    if not args.all:
        return bench_divergences(args, device)
    # everything in one run, each part at the size its README line uses
    rows = bench_divergences(args, device)
    rows += bench_rollout(argparse.Namespace(**{**vars(args), "batch": 8, "decode_steps": 32, "repeats": 5}), device)
    rows += bench_train_step(argparse.Namespace(**{**vars(args), "batch": 16, "decode_steps": 96, "repeats": 5}), device)
    rows += bench_cue_recovery(argparse.Namespace(**{**vars(args), "batch": 8, "decode_steps": 16, "repeats": 5}), device)
    print(f"\n| measurement ({device}) | ours | reference | ratio | goal |\n|---|---|---|---|---|")
    for what, ours, reference, ratio, goal in rows:
        print(f"| {what} | {ours} | {reference} | {ratio:.2f} | {goal} |")


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
                  f"{(ref_peak - grad_bytes) / GiB:.2f} GiB", (ours_peak - grad_bytes) / (ref_peak - grad_bytes), "")]
    print("time, peak, peak-grad: ours / reference (lower is better; goal: peak <= 0.25 at time <= 1)")
    return rows


if __name__ == "__main__":
    main()
