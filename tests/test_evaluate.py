"""The evaluation table: majority baseline, macro averages, and that the student sees image + question only."""
import dataclasses

import pytest

from data import Sample, eval_world
from distill import teacher_messages
from evaluate import evaluate, family_averages, format_table, majority_baseline


def test_majority_baseline_and_macro_averages_by_hand():
    samples = [Sample(image=None, question="q", answer=a, task=t) for a, t in
               [("2", "count"), ("2", "count"), ("3", "count"), ("1", "count"),
                ("yes", "spatial"), ("no", "spatial"), ("Yes", "spatial"),
                ("4", "dense_count")]]
    baseline = majority_baseline(samples)
    assert baseline["per_family"] == {"count": 0.5, "spatial": pytest.approx(2 / 3), "dense_count": 1.0}
    assert baseline["in_domain_avg"] == pytest.approx((0.5 + 2 / 3) / 2)     # each family counts once
    assert baseline["ood_avg"] == 1.0
    assert baseline["overall"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert family_averages({"count": 1.0})["ood_avg"] != family_averages({"count": 1.0})["ood_avg"]  # nan


def test_evaluation_never_reads_cues_answers_or_rationales(tiny):
    model, processor = tiny
    samples = eval_world(14)
    stripped = [dataclasses.replace(s, answer=s.answer, cue=None, rationale=None, boxes=[]) for s in samples]
    first = evaluate(model, processor, samples, max_new_tokens=10, progress=False)
    second = evaluate(model, processor, stripped, max_new_tokens=10, progress=False)
    # exact: the same prompts, so the same computation, unless a cue, answer or rationale reached the model
    assert [r["prediction"] for r in first["records"]] == [r["prediction"] for r in second["records"]]
    # and the answer is used only for scoring: a different gold changes correctness, not predictions
    wrong = [dataclasses.replace(s, answer="zzz") for s in samples]
    third = evaluate(model, processor, wrong, max_new_tokens=10, progress=False)
    assert [r["prediction"] for r in third["records"]] == [r["prediction"] for r in first["records"]]
    assert not any(r["correct"] for r in third["records"])


def test_a_privileged_prompt_is_an_explicit_choice(tiny):
    model, processor = tiny
    samples = eval_world(7)
    plain = evaluate(model, processor, samples, max_new_tokens=10, progress=False)
    hinted = evaluate(model, processor, samples, max_new_tokens=10, progress=False,
                      messages_fn=lambda s: teacher_messages(s, "cues"))
    assert [r["prediction"] for r in plain["records"]] != [r["prediction"] for r in hinted["records"]]
    table = format_table({"student": plain, "diagnostic: + cue hint": hinted})
    assert "| family | n | student | diagnostic: + cue hint | majority baseline |" in table
    assert table.count("\n") == 2 + 7 + 3 - 1


def test_macro_interval_is_the_family_average_and_its_paired_standard_error():
    """SE of a macro average over F families of per-sample values d: sqrt(sum_f var_f / n_f) / F,
    checked against statistics.variance; the paired version uses after - before per sample."""
    import statistics
    from evaluate import interval_lines, macro_interval
    after = [{"id": i, "task": task, "correct": c} for i, (task, c) in enumerate(
        [("count", 1), ("count", 0), ("count", 1), ("spatial", 1), ("spatial", 1), ("novel_pair", 0)])]
    before = [dict(r, correct=c) for r, c in zip(after, [0, 0, 1, 0, 1, 1])]
    value, se = macro_interval(after, "in-domain")
    exact = dict(rel=1e-12)      # float64 Python arithmetic in another order: a few ulps
    assert value == pytest.approx((2 / 3 + 1) / 2, **exact)
    assert se == pytest.approx((statistics.variance([1, 0, 1]) / 3 + statistics.variance([1, 1]) / 2) ** 0.5 / 2, **exact)
    delta, delta_se = macro_interval(after, "in-domain", against=before)
    assert delta == pytest.approx((1 / 3 + 1 / 2) / 2, **exact)
    assert delta_se == pytest.approx(
        (statistics.variance([1, 0, 0]) / 3 + statistics.variance([1, 0]) / 2) ** 0.5 / 2, **exact)
    found, text = interval_lines(after, before)
    assert set(found) == {"in-domain", "delta in-domain", "out-of-domain", "delta out-of-domain"}
    assert "delta in-domain: +41.7 ± " in text
