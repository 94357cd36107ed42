"""On-policy distillation: privileged-teacher prompts, teacher scoring, divergences, losses.

The teacher sees the student's prompt plus one privileged slot after the question,
`[Hint]: ...` (the format of the paper and of OPSD):
    none       the student's own prompt (a stronger teacher needs no privilege: OPD)
    answer     the reference answer (OPSD)
    rationale  the reference reasoning, answer included (OPSD's variant)
    cues       the visual cue: where the question-relevant objects are, never the answer (ViCuR)
    cues+crops the cue text plus crops of the cue's boxes as extra images (crop privilege)
    unrelated_cues  a control: the cue of another sample of the same family (unrelated_cues)
    hints      PTD-PO's tutoring hint: where to look and the first reasoning steps, no answer
"""

import dataclasses
import math
import random
import re
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch
from PIL import Image

import cue_recovery
from data import collate, model_inputs, student_messages, to_device, user_message
from divergences import HiddenLogits, divergence, entropy, token_logprobs
from evaluate import score_sample

PRIVILEGES = ["none", "answer", "rationale", "cues", "cues+crops", "unrelated_cues", "hints"]


def hint_text(sample, privilege):
    """The text of the [Hint] slot, or None when the sample has nothing of that kind."""
    if privilege == "answer":
        return sample.answer
    if privilege == "rationale":
        return sample.rationale
    if privilege in ("cues", "cues+crops", "unrelated_cues"):  # unrelated: after unrelated_cues swapped them
        return sample.cue
    if privilege == "hints":
        return tutoring_hint(sample)
    return None


def mentions_answer(text, answer):
    """Does `text` contain `answer` as a run of whole words? Case and punctuation are ignored."""
    words = lambda t: " " + " ".join(re.sub(r"[^0-9a-z]+", " ", t.lower()).split()) + " "  # noqa: E731
    return words(answer).strip() != "" and words(answer) in words(text)


def tutoring_hint(sample):
    """PTD-PO's hint: where to look (the cue, or the boxes in pixels when the cue itself would state the
    answer) and the first reasoning steps: the rationale's sentences up to, not including, the first
    that states the answer or concludes ('so the answer is ...'), at most half of them. None when
    neither part is left."""
    boxes = " ".join(f"[{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]" for x0, y0, x1, y1 in sample.boxes)
    where = next((w for w in (sample.cue, boxes) if w and not mentions_answer(w, sample.answer)), None)
    steps = []
    if sample.rationale:
        sentences = [t.strip() for t in sample.rationale.split(" . ") if t.strip()]
        for sentence in sentences[:len(sentences) // 2]:
            if mentions_answer(sentence, "so the answer") or mentions_answer(sentence, sample.answer):
                break
            steps.append(sentence)
    parts = ([f"look at : {where}"] if where else []) + ([" . ".join(steps)] if steps else [])
    return " . ".join(parts) if parts else None


def unrelated_cues(samples, seed):
    """The unrelated-hint control (arXiv 2608.09228 finds an unrelated solution does as well as OPSD):
    each sample's cue replaced by the cue of another sample of the same family, by a seeded cycle
    through the family, so that the hint has the right form and says nothing true of this image. The
    boxes stay the sample's own (cue recall asks whether the student finds its own evidence)."""
    rng, by_task = random.Random(seed), defaultdict(list)
    for index, sample in enumerate(samples):
        if sample.cue:
            by_task[sample.task].append(index)
    swapped = list(samples)
    for indices in by_task.values():
        order = rng.sample(indices, len(indices))
        for mine, other in zip(order, order[1:] + order[:1]):  # each takes the next one's cue (its own only if alone)
            swapped[mine] = dataclasses.replace(samples[mine], cue=samples[other].cue)
    return swapped


def pixel_box(box):
    """[x0, y0, x1, y1] in (fractional) pixels -> the integer crop that covers it, at least 1x1."""
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    return x0, y0, max(math.ceil(box[2]), x0 + 1), max(math.ceil(box[3]), y0 + 1)


def teacher_messages(sample, privilege):
    """The teacher's chat: the student's, with `[Hint]: <privileged text>` after the question.
    A sample without that privilege (no cue, no rationale) gets the plain student prompt."""
    if privilege not in PRIVILEGES:
        raise ValueError(f"unknown privilege '{privilege}'; known: {PRIVILEGES}")
    hint = hint_text(sample, privilege)
    if hint is None:
        return student_messages(sample)
    if privilege == "cues+crops" and sample.boxes and not isinstance(sample.image, Image.Image):
        raise ValueError(f"cues+crops crops one image; sample {sample.id} has {'a video' if sample.video else 'several'}")
    crops = [sample.image.crop(pixel_box(box)) for box in sample.boxes] if privilege == "cues+crops" else []
    return [user_message(sample, f"{sample.question} [Hint]: {hint}", extra_images=crops)]


# ----------------------------------------------------------------------------- losses

def mean_log_ratio(old_logprobs, teacher_logprobs, mask=None):
    """The distillation gap on the sampled tokens, mean_t d_t with d_t = log pi_old(y_t) - log pi_T(y_t)."""
    log_ratio = old_logprobs - teacher_logprobs
    return (log_ratio.mean() if mask is None else masked_mean(log_ratio, mask)).item()


def masked_mean(values, mask):
    """mean over positions where mask > 0: sum(values * mask) / sum(mask); 0 if the mask is empty."""
    mask = mask.to(values.dtype)
    values = torch.where(mask > 0, values, 0)  # padding may hold inf/nan; keep it out of the sum
    return (values * mask).sum() / mask.sum().clamp_min(1)


def sampled_token_loss(new_logprobs, old_logprobs, teacher_logprobs, completion_mask, clip_eps=0.2, clamp=10.0,
                       dual_clip=0.0):
    """The paper's on-policy distillation objective on the sampled tokens (PPO-clipped).

    d_t = clamp(log pi_old(y_t) - log pi_T(y_t | x_T), -clamp, clamp);  A_t = -d_t (no gradient)
    r_t = pi_new(y_t) / pi_old(y_t)
    L = mean_t over completion tokens of -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)
    dual_clip = c > 1 bounds a token with A_t < 0 at -c A_t (see clipped_surrogate); 0 = off.
    All inputs (B, T); completion_mask is 1 on completion tokens. Returns (loss, stats)
    with stats = {log_ratio: mean unclamped d_t, clip_frac: share of tokens where a clip
    binds}.
    """
    mask = completion_mask.float()
    old_logprobs, teacher_logprobs = old_logprobs.detach(), teacher_logprobs.detach()
    log_ratio = old_logprobs - teacher_logprobs  # d_t = log pi_old - log pi_T
    # A_t = -clamp(d_t); 0 off the completion, where padding may hold inf/nan
    advantage = torch.where(mask > 0, -log_ratio.clamp(-clamp, clamp), 0)
    per_token, clip_active = clipped_surrogate(new_logprobs, old_logprobs, advantage, clip_eps, dual_clip)
    stats = {"log_ratio": mean_log_ratio(old_logprobs, teacher_logprobs, mask),
             "clip_frac": masked_mean(clip_active, mask).item()}
    return masked_mean(per_token, mask), stats


def clipped_surrogate(new_logprobs, old_logprobs, advantage, clip_eps, dual_clip=0.0):
    """Per token -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) with r_t = pi_new(y_t) / pi_old(y_t),
    and where a clip binds (A > 0 and r > 1+eps, or A < 0 and r < 1-eps) as a float mask.

    dual_clip = c > 1 (Ye et al. 2020; verl and PTD-PO use c = 3) also bounds a token with A < 0 at
    -c A, so that one token whose ratio has grown far past 1 + eps cannot dominate; there it binds
    when r > c. 0 = off.
    """
    if dual_clip != 0 and not dual_clip > 1:
        raise ValueError(f"dual_clip must be 0 (off) or > 1 (the bound -c A on a token with A < 0; verl and "
                         f"PTD-PO use 3.0), got {dual_clip}")
    ratio = torch.exp(new_logprobs - old_logprobs.detach())  # r_t = pi_new / pi_old
    unclipped = ratio * advantage  # r_t A_t
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage  # clip(r_t) A_t
    per_token = -torch.minimum(unclipped, clipped)  # L_t = max(-A r, -A clip(r, 1-eps, 1+eps))
    with torch.no_grad():
        clip_active = ((advantage > 0) & (ratio > 1 + clip_eps)) | ((advantage < 0) & (ratio < 1 - clip_eps))
    if dual_clip:  # A < 0: L_t = min(max(-A r, -A clip(r, 1-eps, 1+eps)), -A c)
        per_token = torch.where(advantage < 0, torch.minimum(per_token, -advantage * dual_clip), per_token)
        clip_active |= (advantage < 0) & (ratio > dual_clip)
    return per_token, clip_active.float()


# ----------------------------------------------------------------------------- teacher scoring
#
# Teacher and student score the same completion token ids after prompts of different
# lengths. Both batches are left padded, so each row's completion is its last tokens;
# completion_logits picks, row by row, the logits that predict those tokens, giving the
# same (N, V) order for both: aligned by completion mask, never by absolute position.

def rollout_completions(rollout):
    """The sampled token ids of each row, without padding (the end-of-turn token kept)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def scoring_batch(processor, chats, completions, max_length=None):
    """prompt + the student's completion ids (the same ids, not re-tokenised text)."""
    return collate(processor, chats, completion_ids=completions, max_length=max_length)


def completion_logits(model, batch, from_hidden=False):
    """Logits that predict the completion tokens, (N, V) with N = number of completion tokens,
    and those tokens (N,): logits at position t-1 predict the token at t. from_hidden: the logits as
    HiddenLogits(final hidden states (N, d), lm_head's weight (V, d)), never multiplied out whole."""
    predicts_completion = batch["completion_mask"][:, 1:].bool()      # (B, L-1)
    tokens = batch["input_ids"][:, 1:][predicts_completion]
    if from_hidden:
        hidden = model.model(**model_inputs(batch)).last_hidden_state  # (B, L, d): lm_head's input
        return HiddenLogits(hidden[:, :-1][predicts_completion], model.lm_head.weight), tokens
    logits = model(**model_inputs(batch)).logits                      # (B, L, V)
    return logits[:, :-1][predicts_completion], tokens


@torch.no_grad()
def teacher_logits(teacher, processor, samples, privilege, completions, max_length=None):
    """The frozen teacher's logits on the student's tokens under its own (privileged) prompt, (N, V).
    A teacher on its own ranks (teacher_ranks.RemoteTeacher) computes them there and sends them."""
    if hasattr(teacher, "remote_logits"):
        return teacher.remote_logits(samples, privilege, completions)
    batch = scoring_batch(processor, [teacher_messages(s, privilege) for s in samples], completions, max_length)
    return completion_logits(teacher, to_device(batch, teacher.device))[0]


@dataclasses.dataclass
class TeacherScores:
    """What a micro-batch's loss and logs need from the teacher, over its N completion tokens: all that a
    teacher on its own ranks sends back (teacher_ranks.py)."""
    token_logprobs: torch.Tensor              # (N,) log pi_T(y_t | x_T), tempered as sampled; PTD-PO: plain prompt
    logits: torch.Tensor | None = None        # (N, V) the full rows, for a divergence --loss (fkl, rkl, jsd, topk_jsd)
    tutor_logits: torch.Tensor | None = None  # PTD-PO: (tutored tokens, V) under the hint
    entropy: float = 0.0                      # mean_t H(p_T) of those rows (a logged stat)
    privilege_gap: float = 0.0                # mean_t KL(p_T(.|x_T) || p_T(.|x)) when asked (PTD-PO: tutored tokens)


@torch.no_grad()
def teacher_scores(teacher, processor, rows, completions, privilege, config, with_gap, tutored_rows=()):
    """The frozen teacher on the student's tokens -> TeacherScores. PTD-PO: the reference under the plain
    prompt on every token (its log-probs for the KL term and the log-ratio), and under the hint on the
    rows tutored_rows (the Top-K JSD's target). The full rows go back only when the loss reads them."""
    if hasattr(teacher, "remote_scores"):
        return teacher.remote_scores(rows, completions, privilege, config, with_gap, tutored_rows)
    tokens = torch.tensor([t for c in completions for t in c], device=teacher.device)
    if config.mode == "ptdpo":
        logits = teacher_logits(teacher, processor, rows, "none", completions, config.max_length)
        picked = list(tutored_rows)
        tutor = teacher_logits(teacher, processor, [rows[i] for i in picked], privilege,
                               [completions[i] for i in picked], config.max_length) if picked else None
        row_of_token = torch.arange(len(rows)).repeat_interleave(torch.tensor([len(c) for c in completions]))
        tutored_tokens = torch.isin(row_of_token, torch.tensor(picked, dtype=torch.long)).to(logits.device)
        gap = privilege_gap(tutor, logits[tutored_tokens]) if with_gap and picked else 0.0
        full = None
    else:
        logits, tutor = teacher_logits(teacher, processor, rows, privilege, completions, config.max_length), None
        gap = privilege_gap(logits, teacher_logits(teacher, processor, rows, "none", completions, config.max_length)) \
            if with_gap and privilege != "none" else 0.0
        full = logits if config.loss != "sampled_rkl" else None
    return TeacherScores(token_logprobs(logits, tokens, config.temperature), full, tutor,
                         entropy(logits).mean().item(), gap)


def check_same_tokenizer(student_processor, teacher_processor, teacher_name):
    """Teacher and student must score the same ids: their vocabularies must be identical."""
    if student_processor.tokenizer.get_vocab() != teacher_processor.tokenizer.get_vocab():
        raise ValueError(f"teacher '{teacher_name}' uses a different tokenizer from the student; on-policy "
                         f"distillation scores the student's token ids, so both must share one vocabulary")


# ----------------------------------------------------------------------------- losses and diagnostics

def distill_loss(student_logits, tokens, old_logprobs, teacher_logits, loss="sampled_rkl", beta=0.5,
                 top_k=None, temperature=1.0, clip_eps=0.2, dual_clip=0.0, token_weights=None,
                 teacher_token_logprobs=None):
    """The student's loss on its own completion tokens, all inputs flat over tokens: (N, V) / (N,).

    sampled_rkl (the paper): PPO surrogate with A_t = -clamp(log pi_old(y_t) - log pi_T(y_t), -10, 10),
        dual-clipped at -c A_t for A_t < 0 when dual_clip = c > 1 (0 = off)
    fkl / rkl / jsd / topk_jsd: mean_t D(p_S(.|t), p_T(.|t)) over the completion tokens
    token_weights (N,): the mean is sum_t w_t L_t / sum_t w_t; None = 1 (a token mean, as the released
        code aggregates); w_t = 1 / |y_i| of token t's sequence gives the paper's Eq. 7, a mean over
        sequences of each sequence's token mean (the logged stats are weighted the same way)
    teacher_token_logprobs (N,): log pi_T(y_t), when the teacher sent only those (TeacherScores); then
        teacher_logits may be None for sampled_rkl
    """
    if dual_clip and loss != "sampled_rkl":
        raise ValueError(f"dual_clip bounds the PPO surrogate of loss=sampled_rkl; loss={loss!r} has none "
                         f"(set dual_clip=0)")
    mask = torch.ones_like(tokens, dtype=torch.float32) if token_weights is None else token_weights.float()
    if teacher_token_logprobs is None:
        teacher_token_logprobs = token_logprobs(teacher_logits, tokens, temperature)  # log pi_T(y_t | x_T), same temperature
    if loss == "sampled_rkl":
        new_logprobs = token_logprobs(student_logits, tokens, temperature)  # log pi_theta(y_t), tempered as sampled
        value, stats = sampled_token_loss(new_logprobs, old_logprobs, teacher_token_logprobs, mask, clip_eps,
                                          dual_clip=dual_clip)
        return value, stats
    per_token = divergence(student_logits, teacher_logits, loss, beta=beta, top_k=top_k, temperature=temperature)
    return masked_mean(per_token, mask), {"log_ratio": mean_log_ratio(old_logprobs, teacher_token_logprobs, mask),
                                          "clip_frac": 0.0}


@torch.no_grad()
def privilege_gap(privileged_logits, plain_logits):
    """How much the teacher leans on what the student cannot see: mean_t KL(p_T(.|x_T) || p_T(.|x))."""
    return divergence(privileged_logits, plain_logits, "rkl").mean().item()


def word_ngrams(text, n):
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def hint_leakage(samples, completions_text, privilege, n=3):
    """Share of rollouts that quote the hint: they name the hint ('hint'), or contain a word n-gram
    of the hint that the question does not contain (hints shorter than n words, such as a bare
    answer, are checked for the first kind only, since the answer itself is no leak)."""
    leaked = 0
    for row, text in zip(samples, completions_text):
        hint = hint_text(row, privilege)
        if not hint:
            continue
        novel = word_ngrams(hint, n) - word_ngrams(row.question, n)
        leaked += "hint" in text.lower().split() or bool(novel & word_ngrams(text, n))
    return leaked / max(1, len(completions_text))


# ----------------------------------------------------------------------------- PTD-PO (arXiv 2606.07000)
#
# GRPO on a verifiable reward, plus privileged tutoring: in a group of rollouts of one prompt
# whose accuracy is below tau, the failed rollouts are pulled toward a frozen reference that
# sees a hint (where to look + the first reasoning steps, never the answer), on their own
# tokens, with the Top-K JSD. The student is always optimised in its hint-free context.

def group_advantages(rewards, group_size, eps=1e-6):
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps) over the group_size rollouts of each
    prompt (rollouts of a prompt are consecutive); a group with one reward throughout (a single
    rollout included) gets A = 0."""
    groups = rewards.float().view(-1, group_size)
    if group_size == 1:
        return torch.zeros(groups.numel(), device=groups.device)  # std of one reward is undefined; A = 0
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    same_throughout = (groups == groups[:, :1]).all(1, keepdim=True)  # the mean may round off r: force 0
    return torch.where(same_throughout, 0.0, advantages).view(-1)


def ptd_gate(rewards, group_size, tau=1.0, all_rollouts=False):
    """(gated, tutored) boolean per rollout: a group is gated when its accuracy is below tau; in a
    gated group the failed rollouts (all of them with all_rollouts) get the tutoring term."""
    rewards = rewards.float()
    gated = (rewards.view(-1, group_size).mean(1, keepdim=True) < tau).expand(-1, group_size).reshape(-1)
    return gated, gated & ((rewards == 0) | all_rollouts)


def ptdpo_loss(new_logprobs, old_logprobs, ref_logprobs, advantages, gated, tutored, student_logits, tutor_logits,
               clip_eps=0.2, kl_coef=0.0, ptd_coef=0.05, top_k=100, beta=0.5, stop_grad_weights=False,
               entropy_coef=0.0, temperature=1.0, dual_clip=0.0):
    """PTD-PO's loss, a mean over all completion tokens; inputs flat over tokens (N,) except
    advantages, gated, tutored, which are per token already (their rollout's), and tutor_logits,
    which are (number of tutored tokens, V) in token order.

        L_t = -min(r_t A, clip(r_t) A)                                   GRPO, A of the token's rollout;
                                                                         at most -c A if A < 0 (dual_clip = c)
              + kl_coef  * (exp(q_t) - q_t - 1), q_t = log pi_ref - log pi_theta   the k3 KL, groups not gated
              + ptd_coef * TopK-JSD(p_theta, p_ref(. | x + hint))_t     tutored rollouts only
              - entropy_coef * H(p_theta)_t                             tutored rollouts only (optional)
    """
    surrogate, clip_active = clipped_surrogate(new_logprobs, old_logprobs, advantages, clip_eps, dual_clip)
    q = ref_logprobs.detach() - new_logprobs
    kl = torch.exp(q) - q - 1                                           # k3 estimate of KL(pi_theta || pi_ref)
    per_token = surrogate + kl_coef * torch.where(gated, 0, kl)
    jsd = torch.zeros((), device=new_logprobs.device)
    if tutored.any():
        tutored_logits = student_logits[tutored]
        jsd_tokens = divergence(tutored_logits, tutor_logits, "topk_jsd", beta=beta, top_k=top_k,
                                temperature=temperature, stop_grad_weights=stop_grad_weights)
        jsd = jsd_tokens.mean()
        extra = ptd_coef * jsd_tokens
        if entropy_coef:
            extra = extra - entropy_coef * entropy(tutored_logits, temperature)  # tutored tokens only
        per_token = per_token.index_put((tutored.nonzero()[:, 0],), per_token[tutored] + extra)
    stats = {"clip_frac": clip_active.mean().item(), "kl_ref": kl.detach().mean().item(), "ptd_jsd": jsd.item(),
             "tutored_tokens": tutored.float().mean().item()}
    return per_token.mean(), stats


def ptd_groups(rows, rollout, group_size, tau=1.0, all_rollouts=False):
    """PTD-PO's groups, on the student's side: the reward of each rollout (evaluate.score), its GRPO
    advantage and gates, repeated over the rollout's tokens in completion_logits' row-major order, and
    the tutored rollouts' indices (what the reference scores under the hint)."""
    rewards = torch.tensor([float(score_sample(text, row)) for text, row in zip(rollout.texts, rows)])
    gated, tutored = ptd_gate(rewards, group_size, tau, all_rollouts)
    over_tokens = lambda values: values.repeat_interleave(rollout.lengths.cpu())  # noqa: E731
    return {"rewards": rewards, "advantages": over_tokens(group_advantages(rewards, group_size)),
            "gated": over_tokens(gated), "tutored": over_tokens(tutored), "tutored_rows": tutored.nonzero()[:, 0].tolist()}


# ----------------------------------------------------------------------------- one micro-batch

@contextmanager
def timed(times, name):
    """Add the wall time of a block to times[name] (seconds)."""
    start = time.time()
    yield
    times[name] = times.get(name, 0.0) + time.time() - start


def microbatch_loss(student, teacher, processor, rows, rollout, completions, privilege, config, times,
                    with_stats=True):
    """One micro-batch of on-policy distillation -> (the mode's loss, a token mean over its completion
    tokens; stats {name: (mean, weight)}, empty unless with_stats). The teacher scores the student's
    own tokens under its context (x_T), the student scores them under its prompt (x), recording the
    sink's attention for the cue recall when it has the module; then distill_loss, or ptdpo_loss."""
    tutoring = ptd_groups(rows, rollout, config.num_rollouts, config.ptd_tau, config.ptd_all_rollouts) \
        if config.mode == "ptdpo" else None
    with timed(times, "teacher"):
        scores = teacher_scores(teacher, processor, rows, completions, privilege, config, with_gap=with_stats,
                                tutored_rows=tutoring["tutored_rows"] if tutoring else ())
    with timed(times, "student"):
        batch = to_device(scoring_batch(processor, [student_messages(s) for s in rows], completions,
                                        config.max_length), config.device)
        recording = cue_recovery.recording(student) if with_stats and cue_recovery.get(student) is not None else nullcontext([])
        with recording as recorded:
            student_logits, tokens = completion_logits(student, batch, from_hidden=config.logits_from_hidden)
        old_logprobs = rollout.logprobs[rollout.completion_mask.bool()].to(config.device)
        if tutoring is None:
            lengths = rollout.completion_mask.sum(-1)                                   # (rows,) |y_i|
            weights = (1 / lengths.float()).repeat_interleave(lengths).to(config.device) \
                if config.loss_agg == "seq-mean" else None
            loss, stats = distill_loss(student_logits, tokens, old_logprobs, scores.logits, config.loss,
                                       beta=config.beta, top_k=config.top_k, temperature=config.temperature,
                                       clip_eps=config.clip_eps, dual_clip=config.dual_clip, token_weights=weights,
                                       teacher_token_logprobs=scores.token_logprobs)
        else:
            ref_logprobs = scores.token_logprobs
            on_device = {k: tutoring[k].to(config.device) for k in ("advantages", "gated", "tutored")}
            loss, stats = ptdpo_loss(
                token_logprobs(student_logits, tokens, config.temperature), old_logprobs, ref_logprobs,
                on_device["advantages"], on_device["gated"], on_device["tutored"], student_logits,
                scores.tutor_logits, clip_eps=config.clip_eps, dual_clip=config.dual_clip,
                kl_coef=config.kl_coef, ptd_coef=config.ptd_coef, top_k=config.top_k, beta=config.beta,
                stop_grad_weights=config.ptd_stop_grad, entropy_coef=config.ptd_entropy_coef,
                temperature=config.temperature)
            stats["log_ratio"] = mean_log_ratio(old_logprobs, ref_logprobs)
    if not with_stats:
        return loss, {}
    recall = cue_recovery.rows_cue_recall(torch.stack(recorded, 1).detach(), rows, batch, processor) \
        if recorded else None
    return loss, microbatch_stats(loss, stats, student_logits, scores, rows, rollout, tutoring, privilege, recall)


def microbatch_stats(loss, stats, student_logits, scores, rows, rollout, tutoring, privilege, recall):
    """{name: (mean, weight)}: token means weighted by the micro-batch's completion tokens, rollout
    means by its rollouts, PTD-PO's tutored-token means by its tutored tokens, cue recall by its rows
    with boxes (weight 0 where there are none: train.reduce_metrics)."""
    tokens, count = len(student_logits), len(rows)
    tutored = int(tutoring["tutored"].sum()) if tutoring is not None else 0
    out = {name: (value, tutored if name == "ptd_jsd" else tokens) for name, value in [("loss", loss.item()),
                                                                                        *stats.items()]}
    out["student_entropy"] = (entropy(student_logits.detach()).mean().item(), tokens)
    out["teacher_entropy"] = (scores.entropy, tokens)
    out["privilege_gap"] = (scores.privilege_gap, tutored if tutoring is not None else tokens)
    out["rollout_length"] = (rollout.lengths.float().mean().item(), count)
    rewards = tutoring["rewards"].tolist() if tutoring is not None else \
        [score_sample(text, row) for text, row in zip(rollout.texts, rows)]
    out["reward"] = (sum(rewards) / count, count)
    out["hint_leakage"] = (hint_leakage(rows, rollout.texts, privilege), count)
    if recall is not None:
        out["cue_recall"] = (recall, sum(bool(row.boxes) for row in rows))
    if tutoring is not None:
        out["failed_share"] = (1 - tutoring["rewards"].mean().item(), count)
        out["gated_share"] = (tutoring["gated"].float().mean().item(), count)
    return out
