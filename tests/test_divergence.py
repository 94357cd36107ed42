"""Divergences, token log-probs, entropy and the sampled-token loss, each checked against a
plain full-materialisation float64 reference written here."""
from distill import clipped_surrogate, masked_mean, sampled_token_loss
from divergences import HiddenLogits, divergence, entropy, token_logprobs

import math

import pytest
import torch

V = 50
SHAPE = (3, 7, V)  # 21 rows
CHUNK = 4  # fewer rows than 21: chunking is exercised, with a ragged last chunk
KINDS = ("fkl", "rkl", "jsd", "topk_jsd")

# Tolerances of float32 results against float64 references, from float32's eps (1.2e-7). Here |log p| <= 16
# (scale-2 logits over V = 50) and a row's log-normaliser <= 12, so each float32 log-prob is off by <= ~20 eps.
EPS32 = torch.finfo(torch.float32).eps
# a divergence compares two such log-probs, p-weighted, over V terms: <= 40 eps + (20 + V) eps |value|
VALUE_ATOL, VALUE_RTOL = 1e-5, 1e-4  # 2x and 10x that bound
# a gradient entry is p_v (d_v - sum_u p_u d_u) for log-prob differences |d| <= 32, where the normalisers' rounding
# cancels: <= ~15 eps relative + ~60 eps absolute
GRAD_ATOL, GRAD_RTOL = 64 * EPS32, 1e-4


# ---------------------------------------------------------------------------
# references: float64, whole batch at once, formulas as written in the papers

def ref_kl(p, q):
    """sum_v p (log p - log q), 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), 0).sum(-1)


def ref_jsd(p_s, p_t, beta, stop_grad_weights=False):
    m = (1 - beta) * p_s + beta * p_t
    weights = p_s.detach() if stop_grad_weights else p_s
    student_term = torch.where(p_s > 0, weights * (p_s.log() - m.log()), 0).sum(-1)
    return beta * ref_kl(p_t, m) + (1 - beta) * student_term


def ref_topk_jsd(p_s, p_t, top_k, beta, stop_grad_weights=False):
    """Brute force: for every position build the K+1 buckets one by one."""
    p_s_rows, p_t_rows = p_s.reshape(-1, p_s.shape[-1]), p_t.reshape(-1, p_t.shape[-1])
    values = []
    for row_s, row_t in zip(p_s_rows, p_t_rows):
        top = sorted(range(len(row_s)), key=lambda v: -row_s[v].item())[:top_k]
        buckets_s = [row_s[v] for v in top]
        buckets_t = [row_t[v] for v in top]
        buckets_s.append((1 - sum(buckets_s)).clamp(min=0))
        buckets_t.append((1 - sum(buckets_t)).clamp(min=0))
        values.append(ref_jsd(torch.stack(buckets_s), torch.stack(buckets_t), beta, stop_grad_weights))
    return torch.stack(values).reshape(p_s.shape[:-1])


def ref_divergence(student_logits, teacher_probs, kind, beta=0.5, top_k=None, temperature=1.0, stop_grad_weights=False):
    p_s = torch.softmax(student_logits.double() / temperature, dim=-1)
    if kind == "fkl":
        return ref_kl(teacher_probs, p_s)
    if kind == "rkl":
        return ref_kl(p_s, teacher_probs)
    if kind == "jsd":
        return ref_jsd(p_s, teacher_probs, beta, stop_grad_weights)
    return ref_topk_jsd(p_s, teacher_probs, top_k, beta, stop_grad_weights)


def ref_teacher_probs(teacher_logits, temperature=1.0):
    return torch.softmax(teacher_logits.double() / temperature, dim=-1)


def ref_teacher_from_top(top_logprobs, top_ids, vocab_size):
    """Listed ids get their probability; the leftover is spread evenly over the others."""
    listed = top_logprobs.double().exp()
    num_unlisted = vocab_size - top_ids.shape[-1]
    leftover = (1 - listed.sum(-1, keepdim=True)).clamp(min=0)
    fill = leftover / num_unlisted if num_unlisted else torch.zeros_like(leftover)
    probs = fill.expand(*top_ids.shape[:-1], vocab_size).clone()
    return probs.scatter(-1, top_ids, listed)


def teacher_top(teacher_logits, num_top):
    top = torch.log_softmax(teacher_logits, dim=-1).topk(num_top, dim=-1)
    return top.values, top.indices


def kind_kwargs(kind, top_k=10):
    return {"top_k": top_k} if kind == "topk_jsd" else {}


# ---------------------------------------------------------------------------
# helpers

def random_logits(seed, shape=SHAPE, scale=2.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def value_and_grad(fn, student_logits, seed=99):
    """fn(student) -> (...) values; returns values and d sum(w * values) / d student for random w."""
    student = student_logits.detach().clone().requires_grad_()
    values = fn(student)
    weights = torch.rand(values.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weights = weights.to(values.dtype)
    (grad,) = torch.autograd.grad((values * weights).sum(), student)
    return values.detach(), grad


def assert_matches_reference(ours, reference, student_logits):
    ours_values, ours_grad = value_and_grad(ours, student_logits)
    ref_values, ref_grad = value_and_grad(reference, student_logits.double())
    assert ours_values.dtype == torch.float32
    torch.testing.assert_close(ours_values.double(), ref_values, atol=VALUE_ATOL, rtol=VALUE_RTOL)
    torch.testing.assert_close(ours_grad.double(), ref_grad.double(), atol=GRAD_ATOL, rtol=GRAD_RTOL)


# ---------------------------------------------------------------------------
# divergence: full teacher logits

@pytest.mark.parametrize("kind", KINDS)
def test_divergence_matches_reference(kind):
    student, teacher = random_logits(0), random_logits(1)
    assert_matches_reference(
        lambda s: divergence(s, teacher, kind, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, ref_teacher_probs(teacher), kind, **kind_kwargs(kind)),
        student,
    )


@pytest.mark.parametrize("kind", ["jsd", "topk_jsd"])
@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta(kind, beta):
    student, teacher = random_logits(2), random_logits(3)
    assert_matches_reference(
        lambda s: divergence(s, teacher, kind, beta=beta, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, ref_teacher_probs(teacher), kind, beta=beta, **kind_kwargs(kind)),
        student,
    )


@pytest.mark.parametrize("top_k", [1, 5, V - 1])
def test_topk_jsd_brute_force(top_k):
    student, teacher = random_logits(4), random_logits(5)
    assert_matches_reference(
        lambda s: divergence(s, teacher, "topk_jsd", top_k=top_k, chunk_size=CHUNK),
        lambda s: ref_topk_jsd(torch.softmax(s, -1), ref_teacher_probs(teacher), top_k, beta=0.5),
        student,
    )


def test_topk_jsd_with_k_equal_vocab_is_jsd():
    student, teacher = random_logits(6), random_logits(7)
    assert_matches_reference(
        lambda s: divergence(s, teacher, "topk_jsd", top_k=V, beta=0.3, chunk_size=CHUNK),
        lambda s: divergence(s.float(), teacher, "jsd", beta=0.3).double(),
        student,
    )


@pytest.mark.parametrize("kind", ["jsd", "topk_jsd"])
def test_stop_grad_weights(kind):
    student, teacher = random_logits(8), random_logits(9)
    assert_matches_reference(
        lambda s: divergence(s, teacher, kind, stop_grad_weights=True, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, ref_teacher_probs(teacher), kind, stop_grad_weights=True, **kind_kwargs(kind)),
        student,
    )
    # same value, different gradient than without the stop-gradient
    plain_values, plain_grad = value_and_grad(lambda s: divergence(s, teacher, kind, **kind_kwargs(kind)), student)
    stop_values, stop_grad = value_and_grad(
        lambda s: divergence(s, teacher, kind, stop_grad_weights=True, **kind_kwargs(kind)), student)
    torch.testing.assert_close(stop_values, plain_values, atol=0, rtol=0)  # the same float32 arithmetic
    assert (stop_grad - plain_grad).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_temperature(kind):
    student, teacher = random_logits(10), random_logits(11)
    assert_matches_reference(
        lambda s: divergence(s, teacher, kind, temperature=2.5, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, ref_teacher_probs(teacher, 2.5), kind, temperature=2.5, **kind_kwargs(kind)),
        student,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits(kind):
    # distinct student logits (multiples of 1/8, exact in bf16): bf16 rounding makes ties, and
    # with a tie at the K-th place topk_jsd's bucket set is ambiguous
    ranks = torch.rand(SHAPE, generator=torch.Generator().manual_seed(12)).argsort(-1)
    student_fp32 = (ranks - V / 2) / 8
    student, teacher = student_fp32.bfloat16(), random_logits(13).bfloat16()
    ours = divergence(student, teacher, kind, chunk_size=CHUNK, **kind_kwargs(kind))
    assert ours.dtype == torch.float32
    # float32 math on the bf16 values: as close to the reference as float32 inputs are
    reference = ref_divergence(student, ref_teacher_probs(teacher), kind, **kind_kwargs(kind))
    torch.testing.assert_close(ours.double(), reference, atol=VALUE_ATOL, rtol=VALUE_RTOL)
    # and close to the float32 result before rounding the logits to bf16; the gap is bf16's rounding of the
    # teacher logits (2^-9 |z| <= 1.6e-2 for |z| <= 8), the same on every CPU, and 3x larger in a log-ratio
    full_precision = divergence(student_fp32, random_logits(13), kind, **kind_kwargs(kind))
    torch.testing.assert_close(ours, full_precision, atol=5e-2, rtol=5e-2)
    student.requires_grad_()
    (grad,) = torch.autograd.grad(divergence(student, teacher, kind, chunk_size=CHUNK, **kind_kwargs(kind)).sum(), student)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_does_not_change_the_result(kind):
    student, teacher = random_logits(26), random_logits(27)
    results = [value_and_grad(lambda s: divergence(s, teacher, kind, chunk_size=chunk_size, **kind_kwargs(kind)), student)
               for chunk_size in (1, 5, 21, 1000, None)]
    # a chunk's shape may change the order of float32 sums over V, nothing else: each result is within the float32
    # bound of the exact one, so two are within twice it
    for values, grad in results[1:]:
        torch.testing.assert_close(values, results[0][0], atol=2 * VALUE_ATOL, rtol=2 * VALUE_RTOL)
        torch.testing.assert_close(grad, results[0][1], atol=2 * GRAD_ATOL, rtol=2 * GRAD_RTOL)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "topk_jsd"])
def test_teacher_with_masked_ids(kind):
    """-inf teacher logits (ids the teacher masks) give p_T = 0 there and finite values."""
    student, teacher = random_logits(28), random_logits(29)
    teacher[..., ::3] = float("-inf")
    assert_matches_reference(
        lambda s: divergence(s, teacher, kind, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, ref_teacher_probs(teacher), kind, **kind_kwargs(kind)),
        student,
    )


def test_rkl_against_a_teacher_with_masked_ids_is_inf_without_gradient():
    """KL(p_S || p_T) = +inf where p_T = 0 on an id where p_S > 0 (always: p_S is a softmax). Such a
    position gets a clean +inf and gradient 0, the others their usual value and gradient."""
    student, teacher = random_logits(30), random_logits(31)
    teacher[0, :, ::3] = float("-inf")  # the first sequence's positions mask every third id
    top_logprobs, top_ids = teacher_top(random_logits(31), num_top=8)
    top_logprobs[0, :, -1] = float("-inf")  # a listed id with p_T = 0
    for teacher_input in (teacher, (top_logprobs, top_ids)):
        values, grad = value_and_grad(lambda s: divergence(s, teacher_input, "rkl", chunk_size=CHUNK), student)
        assert torch.isposinf(values[0]).all() and torch.isfinite(values[1:]).all()
        assert (grad[0] == 0).all() and torch.isfinite(grad).all()
    rest_values, rest_grad = value_and_grad(lambda s: divergence(s, teacher[1:], "rkl"), student[1:])
    ref_values, ref_grad = value_and_grad(lambda s: ref_divergence(s, ref_teacher_probs(teacher[1:]), "rkl"),
                                          student[1:].double())
    torch.testing.assert_close(rest_values.double(), ref_values, atol=VALUE_ATOL, rtol=VALUE_RTOL)
    torch.testing.assert_close(rest_grad.double(), ref_grad, atol=GRAD_ATOL, rtol=GRAD_RTOL)


# ---------------------------------------------------------------------------
# divergence: teacher given as its top-M log-probs

@pytest.mark.parametrize("kind", KINDS)
def test_top_m_teacher_matches_reference(kind):
    student, teacher = random_logits(14), random_logits(15)
    top_logprobs, top_ids = teacher_top(teacher, num_top=8)
    teacher_probs = ref_teacher_from_top(top_logprobs, top_ids, V)
    # temperature applies to the student only: the teacher's log-probs are already final
    assert_matches_reference(
        lambda s: divergence(s, (top_logprobs, top_ids), kind, temperature=1.5, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, teacher_probs, kind, temperature=1.5, **kind_kwargs(kind)),
        student,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_top_m_teacher_with_m_equal_vocab_is_full_teacher(kind):
    student, teacher = random_logits(16), random_logits(17)
    top_logprobs, top_ids = teacher_top(teacher, num_top=V)
    assert_matches_reference(
        lambda s: divergence(s, (top_logprobs, top_ids), kind, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: divergence(s.float(), teacher, kind, **kind_kwargs(kind)).double(),
        student,
    )


@pytest.mark.parametrize("kind", ["fkl", "jsd", "topk_jsd"])
def test_top_m_teacher_with_masked_ids(kind):
    """A listed -inf log-prob is p_T = 0 there (0 log 0 = 0), as with full logits; the rest of the
    leftover mass is spread over the unlisted ids as usual."""
    student, teacher = random_logits(32), random_logits(33)
    top_logprobs, top_ids = teacher_top(teacher, num_top=8)
    top_logprobs[..., -3:] = float("-inf")  # the teacher masks its 6th-8th ids
    assert_matches_reference(
        lambda s: divergence(s, (top_logprobs, top_ids), kind, chunk_size=CHUNK, **kind_kwargs(kind)),
        lambda s: ref_divergence(s, ref_teacher_from_top(top_logprobs, top_ids, V), kind, **kind_kwargs(kind)),
        student,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_top_m_teacher_with_a_masked_id_is_the_full_teacher(kind):
    """Issue 14's case: the teacher lists p_T = (1, 0) on ids 0, 1 of V = 4; fkl = log 4 either way."""
    top = (torch.tensor([[0.0, -float("inf")]]), torch.tensor([[0, 1]]))
    full = torch.tensor([[0.0, -float("inf"), -float("inf"), -float("inf")]])
    kwargs = {"top_k": 2} if kind == "topk_jsd" else {}
    top_values, top_grad = value_and_grad(lambda s: divergence(s, top, kind, **kwargs), torch.zeros(1, 4))
    full_values, full_grad = value_and_grad(lambda s: divergence(s, full, kind, **kwargs), torch.zeros(1, 4))
    if kind == "rkl":
        assert torch.isposinf(top_values).all() and torch.isposinf(full_values).all()
    else:  # the top path gives ids 2, 3 p_T = 5.9e-39 each (the clamped leftover): < 1e-36 on either
        torch.testing.assert_close(top_values, full_values, atol=1e-36, rtol=EPS32)
    torch.testing.assert_close(top_grad, full_grad, atol=1e-36, rtol=EPS32)
    if kind == "fkl":
        assert top_values.item() == pytest.approx(math.log(4), rel=EPS32)


def test_top_m_teacher_whose_top_holds_all_mass_stays_finite():
    student = random_logits(18)
    teacher = torch.full(SHAPE, -1e4).scatter(-1, torch.zeros(*SHAPE[:-1], 1, dtype=torch.long), 0.0)
    top_logprobs, top_ids = teacher_top(teacher, num_top=3)  # leftover rounds to 0
    for kind in KINDS:
        values, grad = value_and_grad(lambda s: divergence(s, (top_logprobs, top_ids), kind, **kind_kwargs(kind)), student)
        assert torch.isfinite(values).all() and torch.isfinite(grad).all(), kind


# ---------------------------------------------------------------------------
# divergence: errors and autograd contract

def test_bad_arguments_raise():
    student, teacher = random_logits(19), random_logits(20)
    with pytest.raises(ValueError, match="fkl, rkl, jsd, topk_jsd"):
        divergence(student, teacher, "kl")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="beta"):
            divergence(student, teacher, "jsd", beta=beta)
    with pytest.raises(ValueError, match="top_k"):
        divergence(student, teacher, "topk_jsd")
    with pytest.raises(ValueError, match="stop_grad_weights"):
        divergence(student, teacher, "fkl", stop_grad_weights=True)
    with pytest.raises(ValueError, match="must match"):
        divergence(student, teacher[..., :-1], "fkl")


def test_no_grad_and_second_backward():
    student, teacher = random_logits(21), random_logits(22)
    with torch.no_grad():
        no_grad_values = divergence(student.requires_grad_(), teacher, "jsd", chunk_size=CHUNK)
    values = divergence(student, teacher, "jsd", chunk_size=CHUNK)
    torch.testing.assert_close(values.detach(), no_grad_values)
    values.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        values.sum().backward()


# ---------------------------------------------------------------------------
# token_logprobs, entropy, masked_mean

def test_token_logprobs():
    logits = random_logits(23)
    token_ids = torch.randint(0, V, SHAPE[:-1], generator=torch.Generator().manual_seed(0))
    assert_matches_reference(
        lambda z: token_logprobs(z, token_ids, temperature=0.7, chunk_size=CHUNK),
        lambda z: torch.log_softmax(z / 0.7, -1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1),
        logits,
    )


def test_entropy():
    logits = random_logits(24)
    p = torch.softmax(logits.double() / 1.3, -1)
    reference = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy(logits, temperature=1.3, chunk_size=CHUNK).double(), reference,
                               atol=VALUE_ATOL, rtol=VALUE_RTOL)
    # with a gradient (PTD-PO's entropy bonus): the float64 autograd gradient of the same sum, weighted
    logits.requires_grad_()
    weights = torch.rand(logits.shape[:-1], generator=torch.Generator().manual_seed(3))
    (entropy(logits, temperature=1.3, chunk_size=CHUNK) * weights).sum().backward()
    exact = logits.detach().double().requires_grad_()
    p = torch.softmax(exact / 1.3, -1)
    (-(p * p.log()).sum(-1) * weights.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_masked_mean_ignores_masked_garbage():
    values = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------------------
# sampled_token_loss

def test_sampled_token_loss_at_ratio_one_is_policy_gradient():
    logits = random_logits(25)
    gen = torch.Generator().manual_seed(1)
    token_ids = torch.randint(0, V, SHAPE[:-1], generator=gen)
    teacher_logprobs = -torch.rand(SHAPE[:-1], generator=gen) * 8
    mask = (torch.rand(SHAPE[:-1], generator=gen) > 0.3).float()
    logits.requires_grad_()
    new_logprobs = token_logprobs(logits, token_ids, chunk_size=CHUNK)
    old_logprobs = new_logprobs.detach()
    loss, stats = sampled_token_loss(new_logprobs, old_logprobs, teacher_logprobs, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    # by hand: A = -clamp(old - teacher); d log pi(y)/d z = onehot(y) - softmax(z);
    # grad = -(1 / num_tokens) sum_t mask_t A_t (onehot - softmax)
    advantage = -(old_logprobs - teacher_logprobs).clamp(-10, 10)
    dlogp = torch.nn.functional.one_hot(token_ids, V) - torch.softmax(logits.detach(), -1)
    expected = -(mask * advantage / mask.sum()).unsqueeze(-1) * dlogp
    # elementwise: softmax as exp(z - logsumexp z) vs torch.softmax, <= 20 eps relative (see EPS32)
    torch.testing.assert_close(grad, expected, atol=GRAD_ATOL, rtol=20 * EPS32)
    torch.testing.assert_close(loss, -(mask * advantage).sum() / mask.sum(), atol=0, rtol=0)  # ratio exactly 1
    assert stats["clip_frac"] == 0.0
    # the same float32 sum; only the final division is float32 (<= eps / 2 off) in one and float64 in the other
    log_ratio_sum = ((old_logprobs - teacher_logprobs) * mask).sum().item()
    assert stats["log_ratio"] == pytest.approx(log_ratio_sum / mask.sum().item(), rel=2 * EPS32)


def test_sampled_token_loss_clipping():
    old = torch.full((1, 4), -1.0)
    # A = teacher - old:   +1      -1      +1      -1
    teacher = old + torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    # ratio:               1.5     0.5     0.5     1.5
    new = (old + torch.tensor([[1.5, 0.5, 0.5, 1.5]]).log()).requires_grad_()
    loss, stats = sampled_token_loss(new, old, teacher, torch.ones(1, 4))
    (grad,) = torch.autograd.grad(loss, new)
    # tokens 0, 1: the ratio is out of range in the direction the advantage pushes -> no gradient;
    # tokens 2, 3: unclipped branch -> d(-r A / n)/d new = -r A / n
    expected = torch.tensor([[0.0, 0.0, -0.5 * 1.0 / 4, -1.5 * -1.0 / 4]])
    torch.testing.assert_close(grad, expected, atol=0, rtol=8 * EPS32)  # r = exp(log r): <= 3 eps, a 1-ulp exp included
    assert stats["clip_frac"] == pytest.approx(0.5)


def test_sampled_token_loss_clamps_the_log_ratio():
    old = torch.tensor([[-0.1, -0.1]])
    teacher = torch.tensor([[-50.1, 30.0]])  # d = 50 and -30.1
    loss, stats = sampled_token_loss(old.clone(), old, teacher, torch.ones(1, 2))
    assert loss.item() == pytest.approx((10 - 10) / 2)  # -(A_0 + A_1)/2 with A = -(+10), -(-10)
    loss, stats = sampled_token_loss(old[:, :1].clone(), old[:, :1], teacher[:, :1], torch.ones(1, 1))
    assert loss.item() == pytest.approx(10.0)  # -A = clamp(50) = 10
    assert stats["log_ratio"] == pytest.approx(50.0)  # logged unclamped


def test_sampled_token_loss_ignores_masked_tokens():
    gen = torch.Generator().manual_seed(2)
    old, teacher = -torch.rand(2, 5, generator=gen), -torch.rand(2, 5, generator=gen) * 3
    new = (old + 0.1 * torch.randn(2, 5, generator=gen)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).float()
    loss, stats = sampled_token_loss(new, old, teacher, mask)
    (grad,) = torch.autograd.grad(loss, new)
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).all()
    # garbage at masked positions changes nothing
    garbage_teacher = teacher.masked_fill(mask == 0, float("-inf"))
    garbage_teacher[1, 4] = float("nan")
    garbage_new = new.detach().masked_fill(mask == 0, 30.0).requires_grad_()
    loss2, stats2 = sampled_token_loss(garbage_new, old, garbage_teacher, mask)
    (grad2,) = torch.autograd.grad(loss2, garbage_new)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert stats2 == stats


# ---------------------------------------------------------------------------
# dual-clip PPO

def ref_surrogate(ratio, advantage, clip_eps=0.2, dual_clip=0.0):
    """One token, by hand: max(-A r, -A clip(r, 1-eps, 1+eps)); for A < 0 and c > 0, at most -A c."""
    loss = max(-advantage * ratio, -advantage * min(max(ratio, 1 - clip_eps), 1 + clip_eps))
    return min(loss, -advantage * dual_clip) if dual_clip and advantage < 0 else loss


def surrogate_and_grad(ratios, advantages, **kwargs):
    """clipped_surrogate per token and its gradient w.r.t. log r (new log-probs with old ones at 0)."""
    log_ratio = torch.tensor(ratios, dtype=torch.float64).log().float().requires_grad_()
    per_token, clip_active = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), torch.tensor(advantages), 0.2,
                                               **kwargs)
    (grad,) = torch.autograd.grad(per_token.sum(), log_ratio)
    return per_token.detach(), grad, clip_active


RATIOS = [0.3, 0.9, 1.1, 2.0, 2.9, 3.5, 8.0]
ADVANTAGES = [-2.0, -0.5, 0.0, 0.7, 1.5]
GRID = [(r, a) for r in RATIOS for a in ADVANTAGES]


def test_dual_clip_matches_a_hand_written_reference():
    ratios, advantages = zip(*GRID)
    values, grad, clip_active = surrogate_and_grad(ratios, advantages, dual_clip=3.0)
    dual_clipped = lambda r, a: ref_surrogate(r, a, clip_eps=0.2, dual_clip=3.0)  # noqa: E731
    expected = [dual_clipped(r, a) for r, a in GRID]
    h = 1e-6  # d/d log r by central differences of the float64 reference
    expected_grad = [(dual_clipped(r * math.exp(h), a) - dual_clipped(r * math.exp(-h), a)) / (2 * h) for r, a in GRID]
    # float32 r = exp(log r) and a product: <= 3 eps relative; the differences add h^2 / 6 and 1e-16 |L| / h < 1e-8
    torch.testing.assert_close(values.double(), torch.tensor(expected, dtype=torch.float64), atol=0, rtol=8 * EPS32)
    torch.testing.assert_close(grad.double(), torch.tensor(expected_grad, dtype=torch.float64), atol=1e-8,
                               rtol=8 * EPS32)
    assert clip_active.tolist() == [float(g == 0 and a != 0) for g, (r, a) in zip(expected_grad, GRID)]


def test_dual_clip_off_or_below_c_is_the_plain_surrogate():
    ratios, advantages = zip(*GRID)
    plain = surrogate_and_grad(ratios, advantages)
    for result in (surrogate_and_grad(ratios, advantages, dual_clip=0.0),  # off
                   surrogate_and_grad(ratios, advantages, dual_clip=10.0)):  # every ratio below c
        for ours, reference in zip(result, plain):
            assert torch.equal(ours, reference)


def test_dual_clip_caps_a_negative_advantage_token_with_a_large_ratio():
    # A = -1, r = 5: plain loss -A r = 5 with gradient -A r = 5; dual-clipped: -A c = 3, no gradient
    plain_value, plain_grad, _ = surrogate_and_grad([5.0, 5.0], [-1.0, 1.0])
    value, grad, clip_active = surrogate_and_grad([5.0, 5.0], [-1.0, 1.0], dual_clip=3.0)
    assert plain_value[0].item() == pytest.approx(5.0, rel=8 * EPS32)  # r = exp(log 5) in float32
    assert plain_grad[0].item() == pytest.approx(5.0, rel=8 * EPS32)
    assert value[0].item() == 3.0 and grad[0].item() == 0.0 and clip_active[0].item() == 1.0
    assert value[1] == plain_value[1] and grad[1] == plain_grad[1]  # A > 0: unchanged (-A (1 + eps), clipped)
    # through sampled_token_loss: A = -clamp(log pi_old - log pi_T) = -1 and +1, mean over the two tokens
    old = torch.zeros(1, 2)
    loss, stats = sampled_token_loss(torch.full((1, 2), math.log(5.0)), old, torch.tensor([[-1.0, 1.0]]),
                                     torch.ones(1, 2), dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2, rel=8 * EPS32) and stats["clip_frac"] == 1.0


@pytest.mark.parametrize("dual_clip", [0.5, 1.0, -3.0])
def test_dual_clip_must_exceed_one(dual_clip):
    old = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip must be 0 .off. or > 1"):
        sampled_token_loss(old.clone(), old, old, torch.ones(1, 2), dual_clip=dual_clip)


# ---------------------------------------------------------------------------
# HiddenLogits: the same functions from the final hidden states and the output projection

HIDDEN = 8      # d: the logits are hidden (21, d) @ weight (V, d)^T, never built whole in float32
# From the factors, a gradient is dL/dz (within GRAD_ATOL, GRAD_RTOL of float64 per entry, above) times W or
# h: sums of d = 8 or 21 rows' products, each adding <= K eps relative to the sum of magnitudes. Norm-wise,
# ours is measured 1e-7 to 7e-7 off float64 here (the four divergences); HIDDEN_GRAD_RTOL = 1e-4 leaves over
# 100x, and a backward that drops the rows' g_r, or halves dW, fails every case
HIDDEN_GRAD_RTOL = 1e-4


@pytest.mark.parametrize("case", ["token_logprobs", "entropy", *KINDS, "rkl_top_m"])
def test_hidden_logits_give_the_values_and_gradients_of_their_product(case):
    """Values against float64 on z = h W^T as everywhere above; gradients for h and W against float64
    autograd through the product, for random per-row weights of the values (PTD-PO's and the PPO
    surrogate's g_r differ by row, so the backward must scale each row's dz before summing into dW)."""
    generator = torch.Generator().manual_seed(31)
    hidden = torch.randn(21, HIDDEN, generator=generator)
    weight = torch.randn(V, HIDDEN, generator=generator) * 0.7
    tokens = torch.randint(0, V, (21,), generator=generator)
    teacher = random_logits(32, shape=(21, V))
    functions = {  # case: (ours on logits or HiddenLogits, float64 reference on logits)
        "token_logprobs": (lambda z: token_logprobs(z, tokens, temperature=0.7, chunk_size=CHUNK),
                           lambda z: torch.log_softmax(z / 0.7, -1).gather(-1, tokens[:, None])[:, 0]),
        "entropy": (lambda z: entropy(z, temperature=1.3, chunk_size=CHUNK),
                    lambda z: -(torch.softmax(z / 1.3, -1) * torch.log_softmax(z / 1.3, -1)).sum(-1)),
        "rkl_top_m": (lambda z: divergence(z, teacher_top(teacher, 12), "rkl", chunk_size=CHUNK),
                      lambda z: ref_divergence(z, ref_teacher_from_top(*teacher_top(teacher, 12), V), "rkl")),
        **{kind: (lambda z, kind=kind: divergence(z, teacher, kind, chunk_size=CHUNK, **kind_kwargs(kind)),
                  lambda z, kind=kind: ref_divergence(z, ref_teacher_probs(teacher), kind, **kind_kwargs(kind)))
           for kind in KINDS}}
    ours_fn, reference_fn = functions[case]
    row_weights = torch.rand(21, generator=generator, dtype=torch.float64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    values = ours_fn(HiddenLogits(h, w))
    grads = torch.autograd.grad((values.double() * row_weights).sum(), (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    reference = reference_fn(h64 @ w64.T)
    reference_grads = torch.autograd.grad((reference * row_weights).sum(), (h64, w64))
    assert values.dtype == torch.float32 and values.shape == (21,)
    torch.testing.assert_close(values.double(), reference.detach(), atol=VALUE_ATOL, rtol=VALUE_RTOL)
    for ours, exact in zip(grads, reference_grads):
        assert (ours.double() - exact).norm() <= HIDDEN_GRAD_RTOL * exact.norm()
    # without a gradient (the stats' entropy): the same values, nothing recorded for backward
    with torch.no_grad():
        torch.testing.assert_close(ours_fn(HiddenLogits(hidden, weight)), values.detach())
