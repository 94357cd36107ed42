"""Divergences between the student's and the teacher's next-token distributions, over the full
vocabulary (or a top-M teacher), chunked over rows with a hand-written backward.

Real vocabularies are large (Qwen3-VL: V = 151,936), so every function that looks at a full
(rows, V) distribution works on chunks of rows: only one chunk's float32 intermediates are alive
at a time, in forward and in backward. Given logits, the gradient w.r.t. them (the same size) is
the only full-size tensor allocated. Given HiddenLogits (the final hidden states and the output
projection), not even that: the rows of the logits are built chunk by chunk, in backward again.
"""

import math

import torch

DIVERGENCES = ("fkl", "rkl", "jsd", "topk_jsd")
_TINY = torch.finfo(torch.float32).tiny  # smallest positive float32; log(_TINY) ~ -87.3
_LOG_ZERO = torch.finfo(torch.float32).min  # stands in for log 0 = -inf: exp() gives 0, differences stay finite
# Default chunk: rows whose float32 (rows, V) block is this big. Measured on a 2-core CPU at
# V = 151,936: 32 MiB (55 rows) ran 2-3x faster than 1024 rows (big blocks are mmap'ed and
# page-faulted in anew on every allocation). On GPU bigger kernels amortise launches;
# 128 MiB (220 rows) keeps per-chunk intermediates around 1 GiB.
_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 128 * 2**20}


def default_chunk_rows(vocab_size, cuda):
    """Rows per chunk: as many as fit _CHUNK_BYTES of float32 (rows, V) on this kind of device."""
    return max(1, _CHUNK_BYTES["cuda" if cuda else "cpu"] // (4 * vocab_size))


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


class HiddenLogits:
    """Logits z = hidden W^T kept as their two factors: hidden (..., d), the final hidden states of the
    rows, and weight (V, d), the output projection (tied to the embedding or not). Every function here
    that takes logits also takes these: it builds one chunk's rows of z at a time, and its backward
    recomputes them, so that neither z (N, V) nor its gradient exists for all rows at once."""

    def __init__(self, hidden, weight):
        self.hidden, self.weight = hidden, weight

    @property
    def shape(self):
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def is_cuda(self):
        return self.hidden.is_cuda

    @property
    def requires_grad(self):
        return self.hidden.requires_grad or self.weight.requires_grad

    def __len__(self):
        return len(self.hidden)

    def __getitem__(self, rows):
        return HiddenLogits(self.hidden[rows], self.weight)

    def detach(self):
        return HiddenLogits(self.hidden.detach(), self.weight.detach())


def _hidden_values(row_fn, chunk_size, hidden, weight, row_inputs):
    """row_fn over the rows of z = hidden W^T (the model's own lm_head product), one chunk at a time -> (N,)."""
    values = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        values[rows] = row_fn(torch.nn.functional.linear(hidden[rows], weight), *[x[rows] for x in row_inputs])
    return values


class _HiddenChunked(torch.autograd.Function):
    """values[r] = row_fn(z[r], *row_inputs[r]) with z = hidden W^T built chunk by chunk. The gradient
    is taken in backward, where each chunk's z is recomputed: unlike _RowwiseChunked's, it cannot be
    taken in forward, since dL/dW = sum_r g_r (dvalues[r]/dz[r])^T h[r] needs every row's g_r first.
        dz = g_r dvalues[r]/dz[r]  (c, V);   dh[r] = dz W;   dW += dz^T h   (at least float32)"""

    @staticmethod
    def forward(ctx, row_fn, chunk_size, hidden, weight, *row_inputs):
        ctx.row_fn, ctx.chunk_size = row_fn, chunk_size
        ctx.save_for_backward(hidden, weight, *row_inputs)
        return _hidden_values(row_fn, chunk_size, hidden, weight, row_inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        hidden, weight, *row_inputs = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[2] else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)     # bf16 weights: a float32 sum
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if ctx.needs_input_grad[3] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            with torch.enable_grad():
                logits = torch.nn.functional.linear(hidden[rows], weight).detach().requires_grad_()  # (c, V)
                chunk_values = ctx.row_fn(logits, *[x[rows] for x in row_inputs])
                (grad_logits,) = torch.autograd.grad((chunk_values * grad_values[rows]).sum(), logits)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight                                # (c, d)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.to(accumulate).T, hidden[rows].to(accumulate))  # += (V, d), in place
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return (None, None, grad_hidden, grad_weight) + (None,) * len(row_inputs)


def _rowwise(row_fn, logits, *row_inputs, chunk_size=None):
    """Apply row_fn to (..., V) logits and per-row inputs (..., *) in chunks of rows -> (...) float32.

    logits may be HiddenLogits (then chunks of rows of hidden W^T, _HiddenChunked). Gradient flows to
    `logits` only (to hidden and weight for HiddenLogits); row_inputs are treated as constants.
    chunk_size: rows per chunk; None picks it from _CHUNK_BYTES.
    """
    leading_shape, vocab_size = logits.shape[:-1], logits.shape[-1]
    if chunk_size is None:
        chunk_size = default_chunk_rows(vocab_size, logits.is_cuda)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(logits, HiddenLogits):
        hidden = logits.hidden.reshape(-1, logits.hidden.shape[-1])  # (N, d)
        inputs_flat = [x.detach().reshape(hidden.shape[0], *x.shape[len(leading_shape):]) for x in row_inputs]
        if torch.is_grad_enabled() and logits.requires_grad:
            values = _HiddenChunked.apply(row_fn, chunk_size, hidden, logits.weight, *inputs_flat)
        else:
            with torch.no_grad():
                values = _hidden_values(row_fn, chunk_size, hidden, logits.weight, inputs_flat)
        return values.view(leading_shape)
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


def entropy(logits, temperature=1.0, chunk_size=None):
    """H(p) = -sum_v p_v log p_v per position, p = softmax(z / tau); (..., V) -> (...) float32, chunked
    over rows; with a gradient when logits require one (PTD-PO's entropy bonus)."""

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
