"""PTD-PO: GRPO group advantages, the gate, the loss's terms, and the tutoring hint."""
import math
import warnings

import pytest
import torch

from data import eval_world, make_world
from distill import group_advantages, hint_text, ptd_gate, ptdpo_loss, mentions_answer
from divergences import divergence

EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])      # two groups of four
    # group 1: mean 0.5, std (unbiased) sqrt(1/3) -> +-0.5 / (0.57735 + 1e-6) = +-0.8660; group 2: one reward -> 0
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0])
    # a mean, a square root and a division over 4 exact rewards: a few eps
    torch.testing.assert_close(group_advantages(rewards, 4), expected, atol=0, rtol=8 * EPS32)


def test_group_advantages_of_one_reward_or_equal_rewards_are_zero():
    """std of one reward is NaN (and a warning), and the float32 mean of equal fractional rewards need not
    be that reward."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert group_advantages(torch.tensor([1.0, 0.0, 0.5]), 1).tolist() == [0.0, 0.0, 0.0]
    fractional = torch.rand(200, generator=torch.Generator().manual_seed(0))
    for group_size in (3, 7):
        assert (group_advantages(fractional.repeat_interleave(group_size), group_size) == 0).all()


def test_the_gate_tutors_failed_rollouts_of_groups_below_tau():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    gated, tutored = ptd_gate(rewards, 4, tau=1.0)
    assert gated.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert tutored.tolist() == [False, True, True, False] + [False] * 4 + [True] * 4
    _, tutored_all = ptd_gate(rewards, 4, tau=1.0, all_rollouts=True)
    assert tutored_all.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    gated_half, _ = ptd_gate(rewards, 4, tau=0.5)                         # accuracy 0.5 is not below 0.5
    assert gated_half.tolist() == [False] * 8 + [True] * 4


def inputs(seed=0, n=12, vocab=7):
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(n, vocab, generator=g, requires_grad=True)
    tokens = torch.randint(vocab, (n,), generator=g)
    old = torch.log_softmax(student_logits.detach(), -1).gather(-1, tokens[:, None])[:, 0]   # on-policy: ratio 1
    ref = old + 0.3 * torch.randn(n, generator=g)
    tutor = torch.randn(n, vocab, generator=g)
    advantages = torch.randn(n, generator=g)
    tutored = torch.tensor([False, True, True, False] * (n // 4))
    gated = tutored | torch.tensor([True, False, False, False] * (n // 4))
    return student_logits, tokens, old, ref, tutor, advantages, gated, tutored


def loss_of(student_logits, tokens, old, ref, tutor, advantages, gated, tutored, **kwargs):
    new = torch.log_softmax(student_logits, -1).gather(-1, tokens[:, None])[:, 0]
    return ptdpo_loss(new, old, ref, advantages, gated, tutored, student_logits, tutor[tutored], top_k=3, **kwargs)


def test_ptd_coef_zero_is_plain_grpo():
    """At ratio 1 the clipped surrogate's gradient is the policy gradient -mean_t A_t grad log pi(y_t)."""
    student_logits, tokens, old, ref, tutor, advantages, gated, tutored = inputs()
    loss, _ = loss_of(student_logits, tokens, old, ref, tutor, advantages, gated, tutored, ptd_coef=0.0)
    loss.backward()
    reference_logits = student_logits.detach().clone().requires_grad_()
    log_pi = torch.log_softmax(reference_logits, -1).gather(-1, tokens[:, None])[:, 0]
    (-(advantages * log_pi).mean()).backward()
    # ratio exactly 1: the same float32 mean of -A; gradients (|A| / N) (onehot - p), a few eps of <= 0.3
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)
    assert torch.allclose(student_logits.grad, reference_logits.grad, atol=1e-6)


def test_the_tutoring_term_touches_only_tutored_rollouts():
    student_logits, tokens, old, ref, tutor, _, gated, tutored = inputs(seed=1)
    zero = torch.zeros(len(tokens))
    loss, stats = loss_of(student_logits, tokens, old, ref, tutor, zero, gated, tutored, ptd_coef=1.0)
    loss.backward()
    touched = student_logits.grad.abs().sum(-1) > 0
    assert touched.tolist() == tutored.tolist()
    expected = divergence(student_logits[tutored].detach(), tutor[tutored], "topk_jsd", top_k=3).sum() / len(tokens)
    # the same 6 JSDs (>= 0) summed in another order: <= 6 eps relative
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["ptd_jsd"] == pytest.approx((expected * len(tokens) / tutored.sum()).item(), rel=1e-5)


def test_the_reference_kl_skips_gated_groups():
    student_logits, tokens, old, ref, tutor, _, gated, tutored = inputs(seed=2)
    zero = torch.zeros(len(tokens))
    loss, _ = loss_of(student_logits, tokens, old, ref, tutor, zero, gated, tutored, ptd_coef=0.0, kl_coef=1.0)
    q = ref - old                                                          # log pi_ref - log pi_theta
    expected = torch.where(gated, 0, q.exp() - q - 1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # the same float32 arithmetic, one sum of 12


def test_tutoring_hints_never_state_the_answer():
    samples = make_world(1500, seed=3) + eval_world(700, seed=3)
    for sample in samples:
        hint = hint_text(sample, "hints")
        assert hint.startswith("look at : ") and sample.cue in hint, sample.id
        assert sample.answer.lower() not in hint.lower().split(), (sample.id, hint)
        assert "so the answer" not in hint


def test_stopping_the_gradient_through_the_weights_leaves_no_gradient():
    """Why --ptd_stop_grad is off by default: with sg(p_S) as the weights of KL(p_S || M), the
    JSD's gradient is -(1-beta) grad sum_v p_S = 0 for distributions (or buckets) that sum to one."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 9, generator=generator)
    for kind, top_k in (("jsd", None), ("topk_jsd", 3)):
        logits.grad = None
        divergence(logits, teacher, kind, top_k=top_k, stop_grad_weights=True).sum().backward()
        # exactly 0; float32 leaves the rounding of sums of 9 terms of size <= 1 / (1 - beta) = 2: <= 18 eps
        assert logits.grad.abs().max() < 18 * EPS32
        logits.grad = None
        divergence(logits, teacher, kind, top_k=top_k).sum().backward()
        assert logits.grad.abs().max() > 1e-3


def test_dual_clip_bounds_negative_advantage_tokens_in_ptdpo_loss():
    """With dual_clip = c, a token with A < 0 costs at most -c A; off, or with every ratio below c, nothing
    changes. By hand: the mean over tokens of max(-A r, -A clip(r)), capped at -A c when A < 0."""
    ratios = torch.tensor([0.5, 1.1, 2.0, 5.0, 5.0, 8.0])
    advantages = torch.tensor([-1.0, 0.5, -0.3, -2.0, 1.0, -0.4])
    new = torch.zeros(6, requires_grad=True)
    old = -ratios.log()                                                    # r = exp(new - old)
    none = torch.zeros(6, dtype=torch.bool)
    student_logits = torch.zeros(6, 3)

    def loss(**kwargs):
        return ptdpo_loss(new, old, new.detach(), advantages, none, none, student_logits, None, ptd_coef=0.0,
                          **kwargs)

    plain, plain_stats = loss()
    clipped = torch.minimum(torch.maximum(ratios, torch.tensor(0.8)), torch.tensor(1.2))
    by_hand = torch.maximum(-advantages * ratios, -advantages * clipped)
    capped = torch.where(advantages < 0, torch.minimum(by_hand, -advantages * 3.0), by_hand)
    assert torch.equal(loss(dual_clip=0.0)[0], plain) and torch.equal(loss(dual_clip=10.0)[0], plain)
    dual, dual_stats = loss(dual_clip=3.0)
    # float32 r = exp(-log r) then a product and a mean of 6: <= 10 eps relative
    assert plain.item() == pytest.approx(by_hand.mean().item(), rel=10 * EPS32)
    assert dual.item() == pytest.approx(capped.mean().item(), rel=10 * EPS32)
    # tokens 3 and 5 drop from 10 to 6 and from 3.2 to 1.2 (1e-6: float32's 0.4)
    assert (by_hand - capped).tolist() == pytest.approx([0, 0, 0, 4, 0, 2], abs=1e-6)
    assert dual_stats["clip_frac"] == pytest.approx(plain_stats["clip_frac"] + 2 / 6)
    with pytest.raises(ValueError, match="dual_clip"):
        loss(dual_clip=1.0)


@pytest.mark.parametrize("answer, cue, rationale", [
    ("top left", "the dog is near the window", "the dog sits at the top left . it is brown . so the answer is top left ."),
    ("3", "look at the apples", "one apple . two apples . 3. apples in all . so the answer is 3 ."),
    ("3", "the 3 apples on the table", "count the apples . so the answer is 3 ."),
    ("Paris", "the sign", "The sign reads PARIS, france . it is old . so The Answer is Paris ."),
])
def test_tutoring_hints_of_user_data_never_state_the_answer(answer, cue, rationale):
    """Multi-word answers, punctuation, case, and a cue that itself states the answer."""
    from PIL import Image
    from data import Sample
    sample = Sample(image=Image.new("RGB", (40, 40)), question="q ?", answer=answer, rationale=rationale, cue=cue,
                    boxes=[[1, 2, 30, 31]])
    hint = hint_text(sample, "hints")
    assert not mentions_answer(hint, answer) and "answer" not in hint.lower(), hint
    assert hint.startswith("look at : ")


def test_states_matches_whole_words_only():
    assert mentions_answer("the top left cell .", "top left") and mentions_answer("it is 3.", "3") and mentions_answer("PARIS, fr", "paris")
    assert not mentions_answer("a 13 b", "3") and not mentions_answer("topleft", "top left") and not mentions_answer("x", "")


def test_ptd_groups_and_the_reference_line_up_with_the_student_tokens(tiny):
    """Per-rollout rewards, advantages and gates are spread over each rollout's tokens in the order
    completion_logits flattens them; the reference's plain log-probs cover every token, its logits
    under the hint exactly the tutored tokens."""
    from data import collate, student_messages
    from distill import completion_logits, ptd_groups, rollout_completions, scoring_batch, teacher_scores
    from rollout import sample_completions
    from train import Config
    model, processor = tiny
    prompts = eval_world(2, seed=5)
    rollout = sample_completions(model, processor, collate(processor, [student_messages(s) for s in prompts]), n=3,
                     max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    rows = [s for s in prompts for _ in range(3)]
    completions = rollout_completions(rollout)
    tutoring = ptd_groups(rows, rollout, group_size=3)
    scores = teacher_scores(model, processor, rows, completions, "hints", Config(mode="ptdpo", num_rollouts=3),
                            with_gap=True, tutored_rows=tutoring["tutored_rows"])
    _, tokens = completion_logits(model, scoring_batch(processor, [student_messages(s) for s in rows], completions))
    assert torch.equal(tokens, torch.tensor([t for c in completions for t in c]))
    row_of_token = torch.arange(len(rows)).repeat_interleave(torch.tensor([len(c) for c in completions]))
    assert torch.equal(tutoring["advantages"], group_advantages(tutoring["rewards"], 3)[row_of_token])
    gated, tutored = ptd_gate(tutoring["rewards"], 3)
    assert torch.equal(tutoring["tutored"], tutored[row_of_token]) and torch.equal(tutoring["gated"], gated[row_of_token])
    assert tutoring["tutored_rows"] == tutored.nonzero()[:, 0].tolist()
    assert scores.token_logprobs.shape == tokens.shape and scores.logits is None
    assert int(tutored[row_of_token].sum()) == (0 if scores.tutor_logits is None else len(scores.tutor_logits))
