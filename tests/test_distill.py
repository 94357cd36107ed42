"""Teacher prompts, teacher scoring aligned by completion mask, the distillation loss and diagnostics."""
import math

import torch
import pytest

from data import collate, eval_world, make_world, student_messages
from distill import (completion_logits, distill_loss, hint_leakage, privilege_gap, rollout_completions,
                     sampled_token_loss, scoring_batch, teacher_logits, teacher_messages, token_logprobs)
from rollout import sample_completions

EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7
# The tiny model's logits (|z| < 1) pass 5 matmul levels (4 layers, the head) that sum <= 384 terms each; batches
# of other shapes take other kernels and orders: <= 5 * 384 eps = 2.3e-4 in the worst case. A token scored one
# position off moves them by ~0.2.
MATMUL_ATOL = 1e-3


def test_teacher_prompt_adds_one_hint_slot_after_the_question():
    s = make_world(1, seed=3)[0]
    assert teacher_messages(s, "none") == student_messages(s)
    assert teacher_messages(s, "answer")[0]["content"][1]["text"] == f"{s.question} [Hint]: {s.answer}"
    assert teacher_messages(s, "cues")[0]["content"][1]["text"] == f"{s.question} [Hint]: {s.cue}"
    crops = teacher_messages(s, "cues+crops")[0]["content"]
    assert [p["type"] for p in crops] == ["image", "text"] + ["image"] * len(s.boxes)
    assert crops[2]["image"].size == (s.boxes[0][2] - s.boxes[0][0], s.boxes[0][3] - s.boxes[0][1])
    with pytest.raises(ValueError, match="unknown privilege 'gold'"):
        teacher_messages(s, "gold")


def test_crops_of_tiny_and_fractional_boxes_go_through_the_processor(tiny):
    """A box thinner than a pixel still gives a 1x1 crop (a zero-size crop broke the processor)."""
    import dataclasses
    _, processor = tiny
    s = dataclasses.replace(make_world(1, seed=3)[0], boxes=[[10.2, 10.2, 10.4, 10.4], [3.5, 4.5, 20.25, 9.75]])
    crops = [p["image"] for p in teacher_messages(s, "cues+crops")[0]["content"][2:]]
    assert [c.size for c in crops] == [(1, 1), (18, 6)]                # floor / ceil: the crop covers the box
    batch = collate(processor, [teacher_messages(s, "cues+crops")])
    assert batch["image_grid_thw"].shape[0] == 3


def test_teacher_scores_are_aligned_by_completion_mask(tiny):
    """Teacher logits from a padded batch of prompts of different lengths equal, token for token,
    those of each sample's own unpadded prompt + completion, concatenated by hand."""
    model, processor = tiny
    samples = eval_world(4, seed=2)
    privileges = ["answer", "cues", "none", "rationale"]           # four different prompt lengths
    words = processor.tokenizer.convert_tokens_to_ids(["red", "circles", ":", "a1", "<|im_end|>"])
    completions = [words[: 2 + i] for i in range(4)]                  # different lengths too
    one_by_one = [teacher_logits(model, processor, [s], p, [c]) for s, p, c in zip(samples, privileges, completions)]
    mixed_batch = scoring_batch(processor, [teacher_messages(s, p) for s, p in zip(samples, privileges)], completions)
    with torch.no_grad():
        mixed, tokens = completion_logits(model, mixed_batch)
    assert tokens.tolist() == [t for c in completions for t in c]
    for i, (s, privilege, completion) in enumerate(zip(samples, privileges, completions)):
        prompt = processor.apply_chat_template([teacher_messages(s, privilege)], add_generation_prompt=True,
                                               tokenize=False)
        alone = processor(text=prompt, images=[p["image"] for p in teacher_messages(s, privilege)[0]["content"]
                                              if p["type"] == "image"], return_tensors="pt")
        ids = torch.cat([alone["input_ids"][0], torch.tensor(completion)])[None]
        types = torch.cat([alone["mm_token_type_ids"][0], torch.zeros(len(completion), dtype=torch.long)])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                           pixel_values=alone["pixel_values"], image_grid_thw=alone["image_grid_thw"]).logits[0]
        by_hand = logits[-len(completion) - 1:-1]                    # position t-1 predicts token t
        start = sum(len(c) for c in completions[:i])
        assert torch.allclose(mixed[start:start + len(completion)], by_hand, atol=MATMUL_ATOL)
        assert torch.allclose(one_by_one[i], by_hand, atol=MATMUL_ATOL)


def test_sampled_rkl_gradient_is_the_policy_gradient_toward_the_teacher(tiny):
    """With ratio 1 the paper's loss has gradient -mean_t A_t grad log pi(y_t), A_t = log pi_T - log pi_old."""
    model, processor = tiny
    samples = eval_world(3, seed=5)
    rollout = sample_completions(model, processor, collate(processor, [student_messages(s) for s in samples]),
                     max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    completions = rollout_completions(rollout)
    teacher = teacher_logits(model, processor, samples, "answer", completions)
    student_batch = scoring_batch(processor, [student_messages(s) for s in samples], completions)
    student_logits, tokens = completion_logits(model, student_batch)
    old = rollout.logprobs[rollout.completion_mask.bool()]
    loss, stats = distill_loss(student_logits, tokens, old, teacher)
    (grad,) = torch.autograd.grad(loss, student_logits)
    advantage = (token_logprobs(teacher, tokens) - old).clamp(-10, 10)
    new = token_logprobs(student_logits, tokens)
    reference_loss = -(advantage * new).mean()
    (reference,) = torch.autograd.grad(reference_loss, student_logits)
    # ours carries r_t = exp(new - old), 1 only up to the sampling pass's matmul rounding (a log-prob: two logits'),
    # the reference takes r = 1
    ratio_gap = (new - old).abs().max().item()
    assert ratio_gap < MATMUL_ATOL
    assert torch.allclose(grad, reference, atol=1e-6, rtol=math.expm1(ratio_gap) + 8 * EPS32)
    # two float32 means of the same N values: <= N eps max|d|
    assert stats["log_ratio"] == pytest.approx(-advantage.mean().item(),
                                               abs=len(tokens) * EPS32 * advantage.abs().max().item())
    assert stats["clip_frac"] == 0.0


def test_privilege_gap_is_zero_without_privilege_and_positive_with_it(tiny):
    model, processor = tiny
    samples = eval_world(4, seed=7)
    completions = [processor.tokenizer.convert_tokens_to_ids(["red", "circles", ":"])] * 4
    plain = teacher_logits(model, processor, samples, "none", completions)
    hinted = teacher_logits(model, processor, samples, "cues", completions)
    assert privilege_gap(plain, plain) == 0.0                       # the same float32 log-probs, differenced
    hinted64, plain64 = hinted.double(), plain.double()
    reference = (hinted64.softmax(-1) * (hinted64.log_softmax(-1) - plain64.log_softmax(-1))).sum(-1).mean()
    # float32 log-probs here (|log p| < 6, log-normaliser < 6 over V = 120) round by <= ~13 eps; a KL subtracts
    # two and sums V terms of total size ~0.1: <= ~40 eps
    assert privilege_gap(hinted, plain) == pytest.approx(reference.item(), abs=48 * EPS32) and reference > 0
    # the direction, KL(privileged || plain), where the two directions are far apart (here they are 5e-6 apart)
    generator = torch.Generator().manual_seed(0)
    privileged, unprivileged = torch.randn(6, 40, generator=generator) * 2, torch.randn(6, 40, generator=generator) * 2
    p, q = privileged.double().softmax(-1), unprivileged.double().softmax(-1)
    expected = (p * (p / q).log()).sum(-1).mean().item()                 # 3.54; KL(q || p) is 4.69
    assert privilege_gap(privileged, unprivileged) == pytest.approx(expected, rel=1e-4)  # float32: <= 1e-5 relative


def test_hint_leakage_counts_quoted_hint_ngrams_absent_from_the_question():
    s = make_world(1, seed=0)[0]                         # cue: 'the red objects are at : a1 b1'
    cue_words = s.cue.split()
    assert hint_leakage([s], [" ".join(cue_words[-4:])], "cues") == 1.0
    assert hint_leakage([s], [s.question], "cues") == 0.0
    assert hint_leakage([s, s], ["the hint says so", "nothing"], "answer") == 0.5
    assert hint_leakage([s], [f"so the answer is {s.answer} ."], "answer") == 0.0   # the answer itself is no leak


def test_teacher_with_another_tokenizer_is_refused(tiny):
    import copy
    from distill import check_same_tokenizer
    _, processor = tiny
    other = copy.deepcopy(processor)
    other.tokenizer.add_tokens(["zebra"])
    check_same_tokenizer(processor, copy.deepcopy(processor), "twin")
    with pytest.raises(ValueError, match="teacher 'other' uses a different tokenizer"):
        check_same_tokenizer(processor, other, "other")


def test_a_full_divergence_loss_is_the_mean_over_completion_tokens():
    from divergences import divergence
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, 30, generator=generator, requires_grad=True)
    teacher = torch.randn(7, 30, generator=generator)
    tokens, old = torch.randint(0, 30, (7,), generator=generator), torch.randn(7, generator=generator)
    loss, stats = distill_loss(student, tokens, old, teacher, loss="jsd", beta=0.3)
    assert torch.allclose(loss, divergence(student, teacher, "jsd", beta=0.3).mean())   # 7 JSDs >= 0: <= 7 eps apart
    log_ratio = old - token_logprobs(teacher, tokens)
    # two float32 means of the same 7 values: <= 7 eps max|d|
    assert stats["log_ratio"] == pytest.approx(log_ratio.mean().item(), abs=7 * EPS32 * log_ratio.abs().max().item())


def test_dual_clip_reaches_the_sampled_token_loss():
    """distill_loss(dual_clip=c) is sampled_token_loss(dual_clip=c) on the same tokens; it changes the loss of a
    token with A < 0 whose ratio is above c, and applies to the sampled-token loss only."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 30, generator=generator), torch.randn(6, 30, generator=generator)
    tokens = torch.randint(0, 30, (6,), generator=generator)
    teacher[torch.arange(6), tokens] = -30.0                               # log pi_T(y_t) ~ -33: A_t = -10
    new = token_logprobs(student, tokens)
    old = new - math.log(5.0)                                               # r_t = 5 > c = 3
    loss, _ = distill_loss(student, tokens, old, teacher, dual_clip=3.0)
    expected, _ = sampled_token_loss(new, old, token_logprobs(teacher, tokens), torch.ones(6), dual_clip=3.0)
    assert torch.equal(loss, expected) and loss.item() == pytest.approx(30.0)   # -A c = 10 * 3 on every token
    plain, _ = distill_loss(student, tokens, old, teacher)
    assert plain.item() == pytest.approx(50.0, rel=8 * EPS32)             # -A r = 10 * 5 (float32 exp(log 5))
    with pytest.raises(ValueError, match="dual_clip bounds the PPO surrogate"):
        distill_loss(student, tokens, old, teacher, loss="jsd", dual_clip=3.0)


def test_seq_mean_is_the_mean_over_sequences_of_each_sequences_token_mean():
    """--loss_agg=seq-mean (the paper's Eq. 7): token weights 1 / |y_i| make distill_loss the mean of the
    sequences' own token means, where the token mean weighs a long sequence more."""
    from divergences import divergence
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(7, 11, generator=generator), torch.randn(7, 11, generator=generator)
    tokens = torch.randint(11, (7,), generator=generator)
    lengths = torch.tensor([1, 2, 4])                                   # three sequences, 7 tokens
    weights = (1 / lengths.float()).repeat_interleave(lengths)
    per_token = divergence(student.double(), teacher.double(), "fkl")
    by_sequence = torch.stack([piece.mean() for piece in per_token.split(lengths.tolist())]).mean()
    loss, _ = distill_loss(student, tokens, torch.zeros(7), teacher, "fkl", token_weights=weights)
    # float32 against float64: a few roundings of O(1) values
    assert loss.item() == pytest.approx(by_sequence.item(), rel=64 * EPS32)
    assert abs(by_sequence.item() - per_token.mean().item()) > 1e-2     # the two aggregations differ here


def test_the_unrelated_cue_control_gives_each_sample_another_samples_cue_of_its_family():
    from distill import unrelated_cues
    samples = make_world(40, seed=2)
    swapped = unrelated_cues(samples, seed=5)
    assert [s.id for s in swapped] == [s.id for s in samples] and [s.boxes for s in swapped] == [s.boxes for s in samples]
    for task in {s.task for s in samples}:
        own = [s.cue for s in samples if s.task == task]
        given = [s.cue for s in swapped if s.task == task]
        assert sorted(given) == sorted(own)                                 # the family's cues, each used once
        assert all(g is not o for g, o in zip(given, own))                  # never a sample's own cue object
    assert unrelated_cues(samples, seed=5) == swapped and unrelated_cues(samples, seed=6) != swapped   # seeded
    assert teacher_messages(swapped[0], "unrelated_cues") == teacher_messages(swapped[0], "cues")


@pytest.mark.parametrize("flags", [dict(mode="vicur"), dict(mode="opsd", loss="jsd"), dict(mode="opsd", loss="topk_jsd"),
                                   dict(mode="ptdpo", num_rollouts=2, ptd_coef=0.5, kl_coef=0.1)],
                         ids=["sampled_rkl", "jsd", "topk_jsd", "ptdpo"])
def test_a_micro_batch_from_hidden_states_equals_the_one_from_logits(tiny, flags):
    """microbatch_loss with the student's logits as HiddenLogits (the default) against the (N, V) logits:
    the same loss and the same gradient. The two paths differ in the lm_head product only (chunks of rows
    vs the whole batch, so other float32 blocking) and in how its gradient is summed: measured here, the
    losses agree exactly and the gradients to 1.5e-7 to 3e-7 norm-wise. rel 1e-4 on both leaves over 300x;
    a student whose lm_head gets no gradient from the loss fails every case."""
    import copy
    import cue_recovery
    from distill import microbatch_loss
    from train import Config
    model, processor = tiny
    student, teacher = copy.deepcopy(model).train(), copy.deepcopy(model)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1.3)                       # a teacher that differs from the student
    if flags["mode"] == "vicur":
        cue_recovery.attach(student, processor, init="default")
    rows = [s for s in make_world(6, seed=2) for _ in range(flags.get("num_rollouts", 1))]
    prompts = rows[::flags.get("num_rollouts", 1)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(rows))]
    rollout = sample_completions(student, processor, collate(processor, [student_messages(s) for s in prompts]),
                                 n=flags.get("num_rollouts", 1), max_new_tokens=10, generator=generators)
    privilege = {"vicur": "cues", "opsd": "answer", "ptdpo": "hints"}[flags["mode"]]
    results = []
    for from_hidden in (False, True):
        config = Config(**flags, logits_from_hidden=from_hidden, max_new_tokens=10)
        student.zero_grad(set_to_none=True)
        loss, stats = microbatch_loss(student, teacher, processor, rows, rollout, rollout_completions(rollout),
                                      privilege, config, times={})
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results.append((loss.item(), gradient, stats))
    (loss_logits, grad_logits, stats_logits), (loss_hidden, grad_hidden, stats_hidden) = results
    assert loss_hidden == pytest.approx(loss_logits, rel=1e-4) and grad_logits.norm() > 0
    assert (grad_hidden - grad_logits).norm() <= 1e-4 * grad_logits.norm()
    assert stats_hidden["student_entropy"][0] == pytest.approx(stats_logits["student_entropy"][0], rel=1e-4)
