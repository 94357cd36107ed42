"""On-policy distillation: privileged-teacher prompts, teacher scoring, divergences, losses.

The teacher sees the student's prompt plus one privileged slot after the question,
`[Hint]: ...` (the format of the paper and of OPSD):
    none       the student's own prompt (a stronger teacher needs no privilege: OPD)
    answer     the reference answer (OPSD)
    rationale  the reference reasoning, answer included (OPSD's variant)
    cues       the visual cue: where the question-relevant objects are, never the answer (ViCuR)
    cues+crops the cue text plus crops of the cue's boxes as extra images (crop privilege)
"""

import math
import re

import torch
from PIL import Image

from data import collate, model_inputs, student_messages, to_device, user_message
from evaluate import score_sample
from rollout import sample

PRIVILEGES = ["none", "answer", "rationale", "cues", "cues+crops", "hints"]


def hint_text(sample, privilege):
    """The text of the [Hint] slot, or None when the sample has nothing of that kind."""
    if privilege == "answer":
        return sample.answer
    if privilege == "rationale":
        return sample.rationale
    if privilege in ("cues", "cues+crops"):
        return sample.cue
    if privilege == "hints":
        return tutoring_hint(sample)
    return None


def states(text, answer):
    """Does `text` contain `answer` as a run of whole words? Case and punctuation are ignored."""
    words = lambda t: " " + " ".join(re.sub(r"[^0-9a-z]+", " ", t.lower()).split()) + " "  # noqa: E731
    return words(answer).strip() != "" and words(answer) in words(text)


def tutoring_hint(sample):
    """PTD-PO's hint: where to look (the cue, or the boxes in pixels when the cue itself would state the
    answer) and the first reasoning steps: the rationale's sentences up to, not including, the first
    that states the answer or concludes ('so the answer is ...'), at most half of them. None when
    neither part is left."""
    boxes = " ".join(f"[{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]" for x0, y0, x1, y1 in sample.boxes)
    where = next((w for w in (sample.cue, boxes) if w and not states(w, sample.answer)), None)
    steps = []
    if sample.rationale:
        sentences = [t.strip() for t in sample.rationale.split(" . ") if t.strip()]
        for sentence in sentences[:len(sentences) // 2]:
            if states(sentence, "so the answer") or states(sentence, sample.answer):
                break
            steps.append(sentence)
    parts = ([f"look at : {where}"] if where else []) + ([" . ".join(steps)] if steps else [])
    return " . ".join(parts) if parts else None


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


# ----------------------------------------------------------------------------- divergences
#
# Real vocabularies are large (Qwen3-VL: V = 151,936), so every function that looks at a
# full (rows, V) distribution works on chunks of rows: only one chunk's float32
# intermediates are alive at a time, in forward and in backward. The gradient w.r.t. the
# logits (the same size as the logits) is the only full-size tensor allocated.

DIVERGENCES = ("fkl", "rkl", "jsd", "topk_jsd")
_TINY = torch.finfo(torch.float32).tiny  # smallest positive float32; log(_TINY) ~ -87.3
_LOG_ZERO = torch.finfo(torch.float32).min  # stands in for log 0 = -inf: exp() gives 0, differences stay finite
# Default chunk: rows whose float32 (rows, V) block is this big. Measured on a 2-core CPU at
# V = 151,936: 32 MiB (55 rows) ran 2-3x faster than 1024 rows (big blocks are mmap'ed and
# page-faulted in anew on every allocation). On GPU bigger kernels amortise launches;
# 128 MiB (220 rows) keeps per-chunk intermediates around 1 GiB.
_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 128 * 2**20}


def masked_mean(values, mask):
    """mean over positions where mask > 0: sum(values * mask) / sum(mask); 0 if the mask is empty."""
    mask = mask.to(values.dtype)
    values = torch.where(mask > 0, values, 0)  # padding may hold inf/nan; keep it out of the sum
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _log_probs(logits, temperature):
    """log softmax(z / tau) in float32, (rows, V)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _kl(log_p, log_q):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim.

    0 log 0 = 0 holds as long as log-probs are finite: a zero probability is stored as
    _LOG_ZERO (or underflows in exp), so its term is 0 * finite = 0.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _reverse_kl(log_p_student, log_p_teacher):
    """KL(p_S || p_T) over the last dim; +inf on a row where the teacher gives an id p_T = 0 (a -inf
    logit or log-prob, stored as _LOG_ZERO), since p_S, a softmax of finite logits, is > 0 there.
    Such a row's gradient is 0: its value is +inf for every student, no step changes it."""
    teacher_has_zero = (log_p_teacher == _LOG_ZERO).any(-1)  # (rows,)
    return torch.where(teacher_has_zero, math.inf, _kl(log_p_student, log_p_teacher))


def _jsd(log_p_student, log_p_teacher, beta, stop_grad_weights=False):
    """GKD's generalised JSD over the last dim.

    M = (1 - beta) p_S + beta p_T
    JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
    stop_grad_weights (PTD-PO): KL(p_S || M) = sum sg(p_S) (log p_S - log M).
    """
    # log M = logsumexp(log(1 - beta) + log p_S, log(beta) + log p_T)
    log_m = torch.logaddexp(log_p_student + math.log(1 - beta), log_p_teacher + math.log(beta))
    teacher_term = _kl(log_p_teacher, log_m)
    if stop_grad_weights:
        student_term = (log_p_student.detach().exp() * (log_p_student - log_m)).sum(-1)
    else:
        student_term = _kl(log_p_student, log_m)
    return beta * teacher_term + (1 - beta) * student_term


def _with_tail_bucket(top_logprobs):
    """(rows, K) log-probs on K ids -> (rows, K+1): the same K plus log(1 - sum_K p).

    The tail is clamped at the smallest positive float32 instead of 0 (rounding can
    push it below 0), which keeps its log and gradient finite; it changes the value
    by < 1e-36.
    """
    tail = (1 - top_logprobs.exp().sum(-1, keepdim=True)).clamp_min(_TINY)
    return torch.cat([top_logprobs, tail.log()], dim=-1)


def _topk_jsd(log_p_student, log_p_teacher, top_k, beta, stop_grad_weights=False):
    """PTD-PO's Top-K JSD with tail compensation.

    S = the student's top-K ids; each distribution becomes K+1 buckets:
    (p(v) for v in S, 1 - sum_{v in S} p(v)), not renormalised; then JSD(beta) over them.
    """
    top_ids = log_p_student.detach().topk(top_k, dim=-1).indices  # (rows, K)
    student_buckets = _with_tail_bucket(log_p_student.gather(-1, top_ids))  # (rows, K+1)
    teacher_buckets = _with_tail_bucket(log_p_teacher.gather(-1, top_ids))  # (rows, K+1)
    return _jsd(student_buckets, teacher_buckets, beta, stop_grad_weights)


def _teacher_logprobs_from_top(top_logprobs, top_ids, vocab_size):
    """Rebuild the teacher's full (rows, V) log-probs from its top-M (rows, M) log-probs.

    Ids the teacher did not list share its leftover mass evenly:
    p_T(v) = (1 - sum_M p_T) / (V - M). A leftover that rounds to <= 0 is clamped to the
    smallest positive float32 so that log p_T stays finite (rkl stays finite). A listed -inf
    (an id the teacher masks) is stored as _LOG_ZERO, as in the full-logits path.
    """
    top_logprobs = top_logprobs.float().clamp_min(_LOG_ZERO)
    num_unlisted = max(vocab_size - top_logprobs.shape[-1], 1)
    leftover = (1 - top_logprobs.exp().sum(-1, keepdim=True)).clamp_min(_TINY)  # (rows, 1)
    log_fill = leftover.log() - math.log(num_unlisted)
    full = log_fill.expand(-1, vocab_size).clone()  # (rows, V)
    return full.scatter_(-1, top_ids.long(), top_logprobs)


class _RowwiseChunked(torch.autograd.Function):
    """values[r] = row_fn(logits[r], *row_inputs[r]), computed chunk by chunk.

    Rows are independent, so the gradient of sum(values) w.r.t. a chunk is each row's own
    d values[r] / d logits[r]. We compute it in the forward pass, chunk by chunk, into one
    logits-sized buffer, and the backward pass only scales it by grad_output[r] in place
    (as Liger-Kernel's fused cross-entropy does). Only one chunk's intermediates are ever
    alive, nothing is recomputed, and no second full-size gradient is built. The price:
    backward can run once (no retain_graph, no double backward).
    """

    @staticmethod
    def forward(ctx, row_fn, chunk_size, needs_grad, logits, *row_inputs):
        num_rows = logits.shape[0]
        values = torch.empty(num_rows, dtype=torch.float32, device=logits.device)  # (N,)
        grad_logits = torch.empty_like(logits) if needs_grad else None  # (N, V)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            inputs = [row_input[rows] for row_input in row_inputs]
            if not needs_grad:
                values[rows] = row_fn(logits[rows], *inputs)
                continue
            with torch.enable_grad():
                chunk = logits[rows].detach().requires_grad_()
                chunk_values = row_fn(chunk, *inputs)  # (c,)
                (grad_logits[rows],) = torch.autograd.grad(chunk_values.sum(), chunk)
            values[rows] = chunk_values.detach()
        ctx.grad_logits = grad_logits
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        grad_logits, ctx.grad_logits = ctx.grad_logits, None
        if grad_logits is None:
            raise RuntimeError(
                "divergence/token_logprobs: backward can run only once per forward (the gradient "
                "is computed in the forward pass); call the function again instead of retain_graph=True"
            )
        grad_logits.mul_(grad_values.unsqueeze(-1))  # dL/dlogits[r] = dL/dvalues[r] * dvalues[r]/dlogits[r]
        return (None, None, None, grad_logits) + (None,) * (len(ctx.needs_input_grad) - 4)


def _rowwise(row_fn, logits, *row_inputs, chunk_size=None):
    """Apply row_fn to (..., V) logits and per-row inputs (..., *) in chunks of rows -> (...) float32.

    Gradient flows to `logits` only; row_inputs are treated as constants.
    chunk_size: rows per chunk; None picks it from _CHUNK_BYTES.
    """
    leading_shape, vocab_size = logits.shape[:-1], logits.shape[-1]
    if chunk_size is None:
        chunk_bytes = _CHUNK_BYTES["cuda" if logits.is_cuda else "cpu"]
        chunk_size = max(1, chunk_bytes // (4 * vocab_size))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logits_flat = logits.reshape(-1, vocab_size)  # (N, V)
    inputs_flat = [x.detach().reshape(logits_flat.shape[0], *x.shape[len(leading_shape):]) for x in row_inputs]
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    values = _RowwiseChunked.apply(row_fn, chunk_size, needs_grad, logits_flat, *inputs_flat)
    return values.view(leading_shape)


def token_logprobs(logits, token_ids, temperature=1.0, chunk_size=None):
    """log p(y_t) = z[y_t] / tau - logsumexp(z / tau) per position, chunked over rows.

    logits (..., V), token_ids (...) -> (...) float32; never builds a full float32 log_softmax.
    """
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must be logits shape without V {tuple(logits.shape[:-1])}")

    def row_fn(logits_rows, ids_rows):  # (c, V), (c,) -> (c,)
        scaled = logits_rows.float() / temperature if temperature != 1.0 else logits_rows.float()
        return scaled.gather(-1, ids_rows.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)

    return _rowwise(row_fn, logits, token_ids.long(), chunk_size=chunk_size)


@torch.no_grad()
def entropy(logits, temperature=1.0, chunk_size=None):
    """H(p) = -sum_v p_v log p_v per position, p = softmax(z / tau); (..., V) -> (...) float32, no gradient."""

    def row_fn(logits_rows):  # (c, V) -> (c,)
        log_p = _log_probs(logits_rows, temperature).clamp_min(_LOG_ZERO)
        return -(log_p.exp() * log_p).sum(-1)  # -sum p log p, with 0 log 0 = 0

    return _rowwise(row_fn, logits, chunk_size=chunk_size)


def divergence(student_logits, teacher_logits, kind, beta=0.5, top_k=None, temperature=1.0,
               stop_grad_weights=False, chunk_size=None):
    """Per-position divergence between student and teacher next-token distributions.

    student_logits: (..., V), any float dtype (math is float32), divided by temperature.
    teacher_logits: (..., V) full logits (divided by temperature too), or a tuple
        (teacher_top_logprobs, teacher_top_ids), each (..., M): the teacher's top-M
        log-probs, already at the right temperature (temperature is applied to the
        student only). An id not listed gets p_T = (1 - sum_M p_T) / (V - M).
    kind:
        fkl       KL(p_T || p_S)
        rkl       KL(p_S || p_T); +inf (gradient 0) on a position where the teacher has p_T = 0 somewhere
        jsd       beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = (1 - beta) p_S + beta p_T
        topk_jsd  jsd over K+1 buckets: the student's top-K ids (K = top_k) + one tail bucket
    stop_grad_weights: jsd/topk_jsd only; KL(p_S || M) = sum sg(p_S) (log p_S - log M). Beware: over
        buckets that sum to one, the gradient is then -(1-beta) sum_v (beta p_T + (1-beta) p_S) / M grad p_S
        = -(1-beta) grad sum_v p_S = 0: the value is the JSD's, the gradient is identically zero.
    chunk_size: rows per chunk (None: about 32 MiB of float32 per (rows, V) block on CPU,
        128 MiB on GPU).
    A -inf teacher logit or log-prob is p_T = 0 there, with 0 log 0 = 0: fkl, jsd and topk_jsd stay
    finite, rkl is +inf.
    Returns (...) float32. Gradient flows to student_logits only, and backward can run
    once per call.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; known kinds: {', '.join(DIVERGENCES)}")
    if kind in ("jsd", "topk_jsd") and not 0 < beta < 1:
        raise ValueError(f"{kind} needs 0 < beta < 1, got beta={beta}")
    if stop_grad_weights and kind not in ("jsd", "topk_jsd"):
        raise ValueError(f"stop_grad_weights applies to jsd and topk_jsd only, not {kind!r}")
    vocab_size = student_logits.shape[-1]
    if kind == "topk_jsd" and (top_k is None or not 1 <= top_k <= vocab_size):
        raise ValueError(f"topk_jsd needs top_k in [1, {vocab_size}], got top_k={top_k}")

    teacher_is_top = isinstance(teacher_logits, (tuple, list))
    if teacher_is_top:
        top_logprobs, top_ids = teacher_logits
        expected = student_logits.shape[:-1]
        if top_logprobs.shape != top_ids.shape or top_logprobs.shape[:-1] != expected or top_ids.shape[-1] > vocab_size:
            raise ValueError(
                f"teacher top-M log-probs {tuple(top_logprobs.shape)} and ids {tuple(top_ids.shape)} "
                f"must both be {tuple(expected)} + (M,) with M <= V={vocab_size}"
            )
        teacher_inputs = (top_logprobs, top_ids.long())
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must match student logits {tuple(student_logits.shape)}")
        teacher_inputs = (teacher_logits,)

    def row_fn(student_rows, *teacher_rows):  # (c, V), teacher (c, V) or (c, M) x2 -> (c,)
        log_p_student = _log_probs(student_rows, temperature)  # student logits must be finite
        if teacher_is_top:
            log_p_teacher = _teacher_logprobs_from_top(*teacher_rows, vocab_size)
        else:  # a teacher may mask ids with -inf logits; keep their log-probs finite
            log_p_teacher = _log_probs(teacher_rows[0], temperature).clamp_min(_LOG_ZERO)
        if kind == "fkl":
            return _kl(log_p_teacher, log_p_student)
        if kind == "rkl":
            return _reverse_kl(log_p_student, log_p_teacher)
        if kind == "jsd":
            return _jsd(log_p_student, log_p_teacher, beta, stop_grad_weights)
        return _topk_jsd(log_p_student, log_p_teacher, top_k, beta, stop_grad_weights)

    return _rowwise(row_fn, student_logits, *teacher_inputs, chunk_size=chunk_size)


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
    stats = {"log_ratio": masked_mean(log_ratio, mask).item(), "clip_frac": masked_mean(clip_active, mask).item()}
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


def completion_logits(model, batch):
    """Logits that predict the completion tokens, (N, V) with N = number of completion tokens,
    and those tokens (N,): logits at position t-1 predict the token at t."""
    logits = model(**model_inputs(batch)).logits                      # (B, L, V)
    predicts_completion = batch["completion_mask"][:, 1:].bool()      # (B, L-1)
    return logits[:, :-1][predicts_completion], batch["input_ids"][:, 1:][predicts_completion]


@torch.no_grad()
def teacher_logits(teacher, processor, samples, privilege, completions, max_length=None):
    """The frozen teacher's logits on the student's tokens under its own (privileged) prompt, (N, V)."""
    batch = scoring_batch(processor, [teacher_messages(s, privilege) for s in samples], completions, max_length)
    return completion_logits(teacher, to_device(batch, teacher.device))[0]


def check_same_tokenizer(student_processor, teacher_processor, teacher_name):
    """Teacher and student must score the same ids: their vocabularies must be identical."""
    if student_processor.tokenizer.get_vocab() != teacher_processor.tokenizer.get_vocab():
        raise ValueError(f"teacher '{teacher_name}' uses a different tokenizer from the student; on-policy "
                         f"distillation scores the student's token ids, so both must share one vocabulary")


# ----------------------------------------------------------------------------- losses and diagnostics

def distill_loss(student_logits, tokens, old_logprobs, teacher_logits, loss="sampled_rkl", beta=0.5,
                 top_k=None, temperature=1.0, clip_eps=0.2, dual_clip=0.0):
    """The student's loss on its own completion tokens, all inputs flat over tokens: (N, V) / (N,).

    sampled_rkl (the paper): PPO surrogate with A_t = -clamp(log pi_old(y_t) - log pi_T(y_t), -10, 10),
        dual-clipped at -c A_t for A_t < 0 when dual_clip = c > 1 (0 = off)
    fkl / rkl / jsd / topk_jsd: mean_t D(p_S(.|t), p_T(.|t)) over the completion tokens
    """
    if dual_clip and loss != "sampled_rkl":
        raise ValueError(f"dual_clip bounds the PPO surrogate of loss=sampled_rkl; loss={loss!r} has none "
                         f"(set dual_clip=0)")
    mask = torch.ones_like(tokens, dtype=torch.float32)
    teacher_token_logprobs = token_logprobs(teacher_logits, tokens, temperature)  # log pi_T(y_t | x_T), same temperature
    log_ratio = old_logprobs - teacher_token_logprobs
    if loss == "sampled_rkl":
        new_logprobs = token_logprobs(student_logits, tokens, temperature)  # log pi_theta(y_t), tempered as sampled
        value, stats = sampled_token_loss(new_logprobs, old_logprobs, teacher_token_logprobs, mask, clip_eps,
                                          dual_clip=dual_clip)
        return value, stats
    per_token = divergence(student_logits, teacher_logits, loss, beta=beta, top_k=top_k, temperature=temperature)
    return masked_mean(per_token, mask), {"log_ratio": masked_mean(log_ratio, mask).item(), "clip_frac": 0.0}


@torch.no_grad()
def probe_log_ratio(student, teacher, processor, probe_samples, privilege, max_length, max_new_tokens):
    """mean_t log pi_S(y_t) - log pi_T(y_t | x_T) on the student's greedy answers to fixed prompts:
    the distillation gap measured the same way before and after training, free of sampling noise."""
    prompt = to_device(collate(processor, [student_messages(s) for s in probe_samples],
                               max_length=max_length - max_new_tokens), student.device)
    completions = rollout_completions(sample(student, processor, prompt, greedy=True, max_new_tokens=max_new_tokens))
    scored = teacher_logits(teacher, processor, probe_samples, privilege, completions, max_length)
    student_batch = scoring_batch(processor, [student_messages(s) for s in probe_samples], completions, max_length)
    was_training = student.training
    student_logits, tokens = completion_logits(student.eval(), to_device(student_batch, student.device))
    student.train(was_training)
    return (token_logprobs(student_logits, tokens) - token_logprobs(scored, tokens)).mean().item()


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
            log_p = torch.log_softmax(tutored_logits.float() / temperature, -1)   # (n, V): tutored tokens only
            extra = extra + entropy_coef * (log_p.exp() * log_p).sum(-1)         # - entropy_coef * H
        per_token = per_token.index_put((tutored.nonzero()[:, 0],), per_token[tutored] + extra)
    stats = {"clip_frac": clip_active.mean().item(), "kl_ref": kl.detach().mean().item(), "ptd_jsd": jsd.item(),
             "tutored_tokens": tutored.float().mean().item()}
    return per_token.mean(), stats


@torch.no_grad()
def ptd_reference(reference, processor, rows, rollout, completions, privilege, group_size, tau=1.0,
                  all_rollouts=False, max_length=None):
    """PTD-PO's view of the frozen reference -> (its logits under the plain prompt for every token, for
    the KL term and the log-ratio; a dict of per-token advantages, gates and, for the tutored rollouts
    only, its logits under the hint prompt). The reward is evaluate.score of each rollout; per-rollout
    values are repeated over that rollout's tokens, in completion_logits' row-major order."""
    rewards = torch.tensor([float(score_sample(text, row)) for text, row in zip(rollout.texts, rows)])
    advantages = group_advantages(rewards, group_size)
    gated, tutored = ptd_gate(rewards, group_size, tau, all_rollouts)
    plain = teacher_logits(reference, processor, rows, "none", completions, max_length)
    picked = tutored.nonzero()[:, 0].tolist()
    tutor = teacher_logits(reference, processor, [rows[i] for i in picked], privilege,
                           [completions[i] for i in picked], max_length) if picked else None
    per_token = lambda values: values.repeat_interleave(rollout.lengths.cpu()).to(plain.device)  # noqa: E731
    return plain, {"rewards": rewards, "advantages": per_token(advantages), "gated": per_token(gated),
                   "tutored": per_token(tutored), "tutor_logits": tutor}
