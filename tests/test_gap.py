"""The exact distillation gap (KL(pi_S || pi_T) on the student's own seeded samples, paired before and
after by prompt) and the testbed's headroom criteria."""
import copy
import statistics

import pytest
import torch

from data import collate, eval_world, make_world, student_messages
from distill import completion_logits, rollout_completions, scoring_batch, teacher_logits
from gap import HEADROOM, bootstrap_picks, exact_gap, gap_change, headroom
from rollout import sample_completions


def test_exact_gap_is_the_token_mean_kl_of_the_students_own_samples(tiny):
    """exact_gap against a float64 recomputation on the same seeded rollouts; KL to itself is 0."""
    model, processor = tiny
    prompts = eval_world(5, seed=8)
    self_gap = exact_gap(model, copy.deepcopy(model), processor, prompts, "none", 512, 6, rollouts=2, seed=3)
    assert self_gap["gap"] == 0.0 and self_gap["gap_se"] == 0.0          # the same logits exactly: 0
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1.5)
    result = exact_gap(model, teacher, processor, prompts, "answer", 512, 6, rollouts=2, seed=3, batch_size=2,
                       per_token=True)
    # the reference: the same generators, in one batch, KL in float64 from the float32 logits
    batch = collate(processor, [student_messages(s) for s in prompts], max_length=512 - 6)
    generators = [torch.Generator().manual_seed(3 * 1_000_003 + i * 2 + j) for i in range(5) for j in range(2)]
    rollout = sample_completions(model, processor, batch, n=2, max_new_tokens=6, generator=generators)
    completions, rows = rollout_completions(rollout), [s for s in prompts for _ in range(2)]
    with torch.no_grad():
        teacher_rows = teacher_logits(teacher, processor, rows, "answer", completions).double()
        student_rows, _ = completion_logits(model, scoring_batch(processor, [student_messages(s) for s in rows],
                                                                 completions))
    log_s, log_t = student_rows.double().log_softmax(-1), teacher_rows.log_softmax(-1)
    reference = (log_s.exp() * (log_s - log_t)).sum(-1).mean().item()
    # other batch shapes (batch_size=2 vs 5) move the logits by matmul rounding, the KL by ~1e-6 of itself
    assert result["gap"] == pytest.approx(reference, rel=1e-4) and result["gap"] > 1e-3
    assert 0 < result["gap_se"] < result["gap"]
    # the student's entropy on the same tokens: -sum p log p in float64 (rel 1e-4 for the same reason)
    assert result["entropy"] == pytest.approx(-(log_s.exp() * log_s).sum(-1).mean().item(), rel=1e-4)
    assert 0 < result["entropy_se"] < result["entropy"]
    # per_token: every rollout's ids and its tokens' KL, in order; their mean is the gap (float64 sums of the
    # same values in another order: a few ulps)
    assert [ids for ids, _ in result["per_token"]] == completions and "per_token" not in self_gap
    per_token = torch.cat([kl for _, kl in result["per_token"]])
    assert per_token.mean().item() == pytest.approx(result["gap"], rel=1e-12)
    rows = [kl for _, kl in result["per_token"]]
    assert all(len(kl) == len(ids) for ids, kl in result["per_token"])
    by_prompt = torch.tensor([(rows[2 * i].sum() + rows[2 * i + 1].sum()).item() for i in range(5)], dtype=torch.float64)
    assert torch.allclose(by_prompt, result["per_prompt"]["kl"], rtol=1e-12, atol=0)    # each row's KL, in place


def test_headroom_pairs_each_criterion_on_the_same_samples(tiny):
    """A criterion is the paired difference of the in-domain averages; the teacher row is the teacher's.
    With the student as its own 'stronger teacher' that difference is exactly 0 and not met."""
    model, processor = tiny
    samples = make_world(10, seed=4)
    result, text = headroom(model, processor, samples, teacher=model, max_new_tokens=4)
    assert set(result["criteria"]) == set(HEADROOM) and result["samples"] == 10
    rows, criteria = result["rows"], result["criteria"]
    assert criteria["base + cue hint - base"]["value"] == pytest.approx(rows["base + cue hint"] - rows["base"], abs=1e-9)
    assert criteria["base - majority answer"]["value"] == pytest.approx(rows["base"] - rows["majority answer"], abs=1e-9)
    assert criteria["stronger teacher - base"]["value"] == 0 and not criteria["stronger teacher - base"]["met"]
    assert "NOT met" in text


def test_gap_change_pairs_before_and_after_by_prompt():
    """The change's SE resamples the same prompts for before and after, so a prompt's own level cancels:
    here every prompt's gap moves by -10% of a level that varies 100-fold, and the paired SE is far below
    the unpaired sqrt(se_before^2 + se_after^2). The reward's SE is that of per-prompt differences."""
    levels = torch.logspace(-3, -1, 64, dtype=torch.float64)                 # per-prompt gap, nats a token
    tokens = torch.arange(64, dtype=torch.float64) % 7 + 3
    reward_before = (torch.arange(64) % 3 == 0).double()
    reward_after = reward_before.clone()
    reward_after[:8] = 1.0                                                   # 5 of 8 prompts gain a right answer
    def gap_of(scale, rewards):
        per_prompt = {"kl": levels * scale * tokens, "entropy": tokens * 0.5, "tokens": tokens, "reward": rewards}
        picks = bootstrap_picks(64, 1000, 0)
        resampled = per_prompt["kl"][picks].sum(1) / tokens[picks].sum(1)
        return {"per_prompt": per_prompt, "gap": (per_prompt["kl"].sum() / tokens.sum()).item(),
                "gap_se": resampled.std().item(), "entropy": 0.5, "entropy_se": 0.0, "reward": rewards.mean().item()}
    before, after = gap_of(1.0, reward_before), gap_of(0.9, reward_after)
    change = gap_change(before, after)
    assert change["gap"][0] == pytest.approx(-0.1 * before["gap"], rel=1e-12)
    # every resample's change is exactly -0.1 of its before: the paired SE is 0.1 of before's SE (float64 sums)
    assert change["gap"][1] == pytest.approx(0.1 * before["gap_se"], rel=1e-9)
    unpaired = (before["gap_se"] ** 2 + after["gap_se"] ** 2) ** 0.5
    assert change["gap"][1] < unpaired / 10                                  # what pairing buys here
    differences = (reward_after - reward_before).tolist()
    assert change["reward"][0] == pytest.approx(statistics.mean(differences), abs=1e-15)
    assert change["reward"][1] == pytest.approx(statistics.stdev(differences) / 8, rel=1e-12)
    assert change["entropy"] == (0.0, 0.0)
