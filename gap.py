"""What a distillation run is measured by beside accuracy: the exact distillation gap, and the
testbed's headroom.

    exact_gap   KL(pi_S || pi_T) over the full vocabulary, a token mean over the student's own seeded
                samples of fixed validation prompts, with a bootstrap standard error over prompts; the
                same rollouts' sampled reward and the student's entropy. A distillation run measures it
                before and after training (eval.json's "distill_gap"), paired by prompt (gap_change).
    headroom    what the testbed leaves each kind of teacher to teach: docs/testbed.md's criteria C1-C4
                on the validation split, in points, paired on the same samples.
"""

import torch

from data import collate, student_messages, to_device, validation_world
from distill import (completion_logits, rollout_completions, scoring_batch, teacher_logits, teacher_messages,
                     unrelated_cues)
from divergences import divergence, entropy
from evaluate import evaluate, macro_interval, score_sample
from rollout import sample_completions


@torch.no_grad()
def exact_gap(student, teacher, processor, prompts, privilege, max_length, max_new_tokens, rollouts=2, seed=0,
              batch_size=64, resamples=1000, per_token=False):
    """The distillation gap the objective closes, measured exactly: KL(pi_S || pi_T) over the full
    vocabulary, a mean over the completion tokens of the student's own samples (`rollouts` seeded
    samples at temperature 1 for each fixed prompt; the teacher under its own context x_T), with a
    bootstrap standard error over prompts; and the sampled reward of the same rollouts with its
    standard error, and the student's entropy H(pi_S) on them (a token mean, bootstrap SE).
    -> {"gap", "gap_se", "entropy", "entropy_se", "reward", "reward_se", "per_prompt"}; per_prompt holds
    each prompt's sums ("kl", "entropy"), token count and mean reward, for gap_change's pairing.
    per_token: also "per_token", [(completion ids, (n,) KL of each of its tokens)] for every rollout in order
    (docs/opd_diagnosis.py splits the gap by part of the rationale)."""
    was_training = student.training
    student.eval()
    kl_sums, entropy_sums, token_counts, rewards, tokens = [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = to_device(collate(processor, [student_messages(s) for s in chunk], max_length=max_length - max_new_tokens),
                          student.device)
        generators = [torch.Generator(student.device).manual_seed(seed * 1_000_003 + (start + i) * rollouts + j)
                      for i in range(len(chunk)) for j in range(rollouts)]
        rollout = sample_completions(student, processor, batch, n=rollouts, max_new_tokens=max_new_tokens,
                                     generator=generators)
        completions, rows = rollout_completions(rollout), [s for s in chunk for _ in range(rollouts)]
        teacher_token_logits = teacher_logits(teacher, processor, rows, privilege, completions, max_length)
        student_batch = scoring_batch(processor, [student_messages(s) for s in rows], completions, max_length)
        student_logits, _ = completion_logits(student, to_device(student_batch, student.device))
        kl = divergence(student_logits, teacher_token_logits, "rkl").double().cpu()   # (N,) KL(p_S || p_T) per token
        per_row = kl.split([len(c) for c in completions])
        tokens += list(zip(completions, per_row)) if per_token else []
        entropy_per_row = entropy(student_logits).double().cpu().split([len(c) for c in completions])  # H(p_S)
        for i in range(len(chunk)):
            mine = slice(i * rollouts, (i + 1) * rollouts)
            kl_sums.append(sum(r.sum().item() for r in per_row[mine]))
            entropy_sums.append(sum(r.sum().item() for r in entropy_per_row[mine]))
            token_counts.append(sum(len(r) for r in per_row[mine]))
            rewards.append(sum(score_sample(t, chunk[i]) for t in rollout.texts[i * rollouts:(i + 1) * rollouts])
                           / rollouts)
    student.train(was_training)
    per_prompt = {name: torch.tensor(v, dtype=torch.float64) for name, v in
                  (("kl", kl_sums), ("entropy", entropy_sums), ("tokens", token_counts), ("reward", rewards))}
    picks = bootstrap_picks(len(prompts), resamples, seed)
    result = {"per_prompt": per_prompt, "reward": per_prompt["reward"].mean().item(),
              "reward_se": (per_prompt["reward"].std() / len(prompts) ** 0.5).item()}
    if per_token:
        result["per_token"] = tokens
    for key, sums in (("gap", "kl"), ("entropy", "entropy")):
        result[key] = (per_prompt[sums].sum() / per_prompt["tokens"].sum().clamp_min(1)).item()
        result[f"{key}_se"] = resampled_token_means(per_prompt[sums], per_prompt["tokens"], picks).std().item()
    return result


def bootstrap_picks(count, resamples, seed):
    """(resamples, count) indices: prompts drawn with replacement, the same draws for a before and an after."""
    return torch.randint(count, (resamples, count), generator=torch.Generator().manual_seed(seed))


def resampled_token_means(sums, tokens, picks):
    """A per-prompt sum's token-weighted mean sum_i s_i / sum_i n_i on each resample of prompts: (resamples,)."""
    return sums[picks].sum(1) / tokens[picks].sum(1).clamp_min(1)


def gap_change(before, after, resamples=1000, seed=0):
    """after - before of exact_gap's three numbers on its fixed prompts, with SEs paired by prompt (a
    prompt's difficulty cancels): a token mean's change and its bootstrap SE from the same resampled
    prompts for both; the reward's mean per-prompt difference and its SE. -> {name: (change, se)}."""
    b, a = before["per_prompt"], after["per_prompt"]
    picks = bootstrap_picks(len(b["reward"]), resamples, seed)
    change = {}
    for key, sums in (("gap", "kl"), ("entropy", "entropy")):
        resampled = (resampled_token_means(a[sums], a["tokens"], picks)
                     - resampled_token_means(b[sums], b["tokens"], picks))
        change[key] = (after[key] - before[key], resampled.std().item())
    differences = a["reward"] - b["reward"]                      # (prompts,)
    change["reward"] = (differences.mean().item(), (differences.std() / len(differences) ** 0.5).item())
    return change


def gap_prompts(config, samples):
    """The fixed prompts of the exact distillation gap: the embedded world's validation split (never
    the evaluation set); user data has none, so its first training prompts (for the unrelated-cue
    control, already swapped by train.setup)."""
    if config.data:
        return samples[:config.gap_prompts]
    prompts = validation_world(config.gap_prompts, seed=config.seed)
    return unrelated_cues(prompts, config.seed) if config.privilege == "unrelated_cues" else prompts


def measure_gap(model, teacher, processor, prompts, privilege, config):
    """exact_gap with this run's lengths and seed (the same rollouts' seeds before and after)."""
    return exact_gap(model, teacher, processor, prompts, privilege, config.max_length, config.max_new_tokens,
                     rollouts=config.gap_rollouts, seed=config.seed, batch_size=config.eval_batch_size)


def without_per_prompt(gap):
    """exact_gap's numbers for log.jsonl, without the per-prompt tensors that gap_report pairs."""
    return {key: value for key, value in gap.items() if key != "per_prompt"}


def gap_report(before, after):
    """eval.json's record of exact_gap before and after training, and its line for the report:
    {"distill_gap" | "sampled_reward" | "entropy": {"before", "after", "before_se", "after_se", "change",
    "change_se"}}, the change's SE paired by prompt (gap_change)."""
    change = gap_change(before, after)
    record = {key: {"before": before[name], "after": after[name], "before_se": before[f"{name}_se"],
                    "after_se": after[f"{name}_se"], "change": change[name][0], "change_se": change[name][1]}
              for key, name in (("distill_gap", "gap"), ("sampled_reward", "reward"), ("entropy", "entropy"))}
    line = "; ".join(f"{label} {r['before']:.{digits}f} ± {r['before_se']:.{digits}f} -> {r['after']:.{digits}f} ± "
                     f"{r['after_se']:.{digits}f}, change {r['change']:+.{digits}f} ± {1.96 * r['change_se']:.{digits}f} "
                     f"(95%, paired by prompt)"
                     for label, r, digits in (("exact distillation gap KL(student || teacher), nats a token:",
                                               record["distill_gap"], 5),
                                              ("sampled reward", record["sampled_reward"], 3)))
    return record, line


# the testbed's criteria (issue 16): room for every kind of teacher, in points of the in-domain average on
# the validation split, fixed before any distillation result was looked at. name: (row, minus row, at least)
HEADROOM = {"base - majority answer": ("base", "majority answer", 15.0),
            "base + cue hint - base": ("base + cue hint", "base", 12.0),
            "base + answer hint - base": ("base + answer hint", "base", 0.0),  # above the base: more than 0
            "stronger teacher - base": ("stronger teacher", "base", 10.0)}


def headroom(model, processor, samples, teacher=None, **settings):
    """What the testbed leaves each kind of teacher to teach, on (validation) samples, greedy: the
    in-domain average of the base (image + question), of the same model given the cue hint and the
    answer hint, of a stronger teacher when given, and of the majority answer; then each criterion of
    HEADROOM as a paired difference on the same samples with its standard error (evaluate.macro_interval)
    and whether its estimate reaches the bound. -> ({"rows", "criteria", "samples"}, text)."""
    settings = {"progress": False, **settings}
    runs = {"base": evaluate(model, processor, samples, **settings),
            "base + cue hint": evaluate(model, processor, samples, messages_fn=lambda s: teacher_messages(s, "cues"),
                                        **settings),
            "base + answer hint": evaluate(model, processor, samples,
                                           messages_fn=lambda s: teacher_messages(s, "answer"), **settings)}
    if teacher is not None:
        runs["stronger teacher"] = evaluate(teacher, processor, samples, **settings)
    rows = {name: 100 * r["in_domain_avg"] for name, r in runs.items()}
    rows["majority answer"] = 100 * runs["base"]["baseline"]["in_domain_avg"]
    criteria, lines = {}, []
    for name, (row, minus, bound) in HEADROOM.items():
        if row not in runs:
            continue
        if minus in runs:
            value, se = (100 * v for v in macro_interval(runs[row]["records"], "in-domain", runs[minus]["records"]))
        else:  # the majority answer is a constant of the samples
            value, se = rows[row] - rows[minus], 100 * macro_interval(runs[row]["records"], "in-domain")[1]
        met = value > bound if bound == 0 else value >= bound
        criteria[name] = {"value": value, "se": se, "at_least": bound, "met": met}
        lines.append(f"  {name:<28} {value:+6.1f} ± {1.96 * se:.1f} (95%)   needs {'>' if bound == 0 else '>='} "
                     f"{bound:g}: {'met' if met else 'NOT met'}")
    text = (f"headroom on {len(samples)} validation samples (in-domain average, greedy): "
            + ", ".join(f"{name} {value:.1f}" for name, value in rows.items()) + "\n" + "\n".join(lines))
    return {"rows": rows, "criteria": criteria, "samples": len(samples)}, text
