"""The paper's tables on the embedded world: the runner, the seed table and the curves."""
import json
import os
import statistics
import sys

import pytest
import torch
from PIL import Image

import evaluate
import tables
from data import collate, eval_world, model_inputs, student_messages
from model import load_model
from rollout import VISION_TOKENS, sample_completions
from test_rollout import GREEDY_MARGIN, top2_margins


def fake_run(folder, per_family, steps=(), cue_recall=None, seed=0, extra=None, n=10):
    """A finished run folder: eval.json, its answers (n a family, the first round(n * accuracy) right,
    ids unique per seed as the real world's are) and log.jsonl."""
    os.makedirs(folder, exist_ok=True)
    results = {"per_family": per_family, **evaluate.family_averages(per_family), **(extra or {})}
    if cue_recall is not None:
        results["cue_recall"] = {"recall": cue_recall}
    json.dump(results, open(os.path.join(folder, "eval.json"), "w"))
    with open(os.path.join(folder, "eval_predictions.jsonl"), "w") as f:
        f.writelines(json.dumps({"id": f"{task}-{seed}-{i}", "task": task, "correct": i < round(n * accuracy)}) + "\n"
                     for task, accuracy in per_family.items() for i in range(n))
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "distill_gap": {"gap": 0.5}}) + "\n")          # not a step line
        f.writelines(json.dumps({"step": i + 1, "loss": 1.0, **record}) + "\n" for i, record in enumerate(steps))


def cells_of(text, row):
    line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def gap(before, after, se=0.001):
    return {"before": before, "after": after, "before_se": se, "after_se": se, "change": after - before, "change_se": se / 4}


def test_the_seed_table_by_hand(tmp_path):
    """Means and sample standard deviations over seeds (statistics as the reference), the paired
    difference to Base pooled over seeds with its interval, the exact gap before -> after, the grid's
    choice on the validation average, step means of the logged gap and leakage, the final recall."""
    base = {0: {"count": 0.8, "spatial": 0.6, "novel_pair": 0.5}, 1: {"count": 0.6, "spatial": 0.6, "novel_pair": 0.7}}
    opsd = {0: {"count": 0.9, "spatial": 0.5, "novel_pair": 0.4}, 1: {"count": 0.8, "spatial": 0.7, "novel_pair": 0.9}}
    for seed in (0, 1):
        fake_run(tmp_path / "base" / f"seed{seed}", base[seed], seed=seed)
        fake_run(tmp_path / "opsd" / "lr2e-4" / f"seed{seed}", opsd[seed],
                 [{"privilege_gap": 0.1 * (seed + 1), "hint_leakage": 0.0}, {"privilege_gap": 0.3, "hint_leakage": 0.5}],
                 seed=seed, extra={"distill_gap": gap(0.01, 0.02 + 0.01 * seed), "entropy": gap(0.5, 0.4)})
        fake_run(tmp_path / "opsd_vicur" / "lr2e-4" / f"seed{seed}", base[seed], [{"privilege_gap": 0.2, "hint_leakage": 1.0}],
                 cue_recall=0.10 + 0.02 * seed, seed=seed, extra={"distill_gap": gap(0.01, 0.005)})
    for name, lr, score in (("opsd", "1e-4", 0.7), ("opsd", "2e-4", 0.7), ("opsd_vicur", "1e-4", 0.5),
                            ("opsd_vicur", "2e-4", 0.6)):
        run = tmp_path / name / f"lr{lr}" / "seed0"
        if not (run / "eval.json").exists():
            fake_run(run, base[0], extra={"distill_gap": gap(0.01, 0.011)})
        json.dump({"in_domain_avg": score}, open(run / "validation.json", "w"))
    chosen = tables.choose_lr(str(tmp_path), ["opsd", "opsd_vicur"], ["1e-4", "2e-4"], seed=0)
    assert chosen == {"opsd": "1e-4", "opsd_vicur": "2e-4"}             # a tie goes to the smaller rate
    chosen["opsd"] = "2e-4"                                             # the finished runs above are at 2e-4
    text = tables.write_tables(str(tmp_path), [0, 1], ["opsd", "opsd_vicur"], ["1e-4", "2e-4"], chosen, minutes=1.0)
    assert text == open(tmp_path / "tables.md").read()
    grid, text = text.split("## Table 1")
    assert dict(zip(cells_of(grid, "row"), cells_of(grid, "OPSD")))["chosen"] == "2e-4"
    header = cells_of(text, "row")
    assert header[:5] == ["lr", "seeds", "count", "spatial", "novel_pair"]

    def expect(values, digits=1):
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    opsd_cells = dict(zip(header, cells_of(text, "OPSD")))
    assert opsd_cells["lr"] == "2e-4" and opsd_cells["seeds"] == "2" and opsd_cells["count"] == expect([90.0, 80.0])
    assert opsd_cells["in-domain"] == expect([70.0, 75.0])                    # (count + spatial) / 2 per seed
    assert opsd_cells["out-of-domain"] == expect([40.0, 90.0])
    # pooled over seeds: per family the mean of the paired per-sample differences, then the macro average;
    # SE = sqrt(sum_f var_f / n_f) / F with the sample variance of those differences
    def pooled(family_of_rows):
        diffs = {f: [float(a) - float(b) for s in (0, 1) for a, b in
                     zip(*[[i < round(10 * runs[s][f]) for i in range(10)] for runs in (opsd, base)])]
                 for f in family_of_rows}
        mean = statistics.mean([statistics.mean(d) for d in diffs.values()])
        se = sum(statistics.variance(d) / len(d) for d in diffs.values()) ** 0.5 / len(diffs)
        return f"{100 * mean:+.1f} ± {196 * se:.1f}"
    assert opsd_cells["Δ in-domain (95%)"] == pooled(["count", "spatial"])
    assert opsd_cells["Δ out-of-domain (95%)"] == pooled(["novel_pair"])
    assert opsd_cells["exact gap"] == "0.01000 -> 0.02500" and opsd_cells["entropy after"] == "0.400 ± 0.000"
    assert opsd_cells["privilege gap"] == expect([0.2, 0.25], 4)              # step means, per seed
    assert opsd_cells["hint leakage"] == expect([0.25, 0.25], 2)
    assert opsd_cells["cue recall"] == "-" and opsd_cells["sampled reward"] == "-"
    vicur_cells = dict(zip(header, cells_of(text, "OPSD+ViCuR")))
    assert vicur_cells["cue recall"] == expect([10.0, 12.0]) and vicur_cells["Δ in-domain (95%)"] == "+0.0 ± 0.0"
    assert cells_of(text, "Base (SFT)")[header.index("Δ in-domain (95%)")] == "-"
    ablation = text.split("## Component ablation")[1].split("## The paper's claims")[0]
    assert "| answer hint (OPSD) |" in ablation and "| full ViCuR: cue hint + module |" in ablation
    assert "+ cue hint only" not in ablation                                  # a row that did not run
    claim = dict(zip(cells_of(text, "claim"), cells_of(text, "OPSD+ViCuR > OPSD")))
    # each seed's in-domain difference (70 - 70, 60 - 75), then mean ± t_1 sd / sqrt(2) with t_1 = 12.706
    spread = 12.706 * statistics.stdev([0.0, -15.0]) / 2 ** 0.5
    assert claim["per seed; over seeds (t, 95%)"] == f"+0.0, -15.0; -7.5 ± {spread:.1f}"
    # the sanity table: each rate's paired change; OPSD's lowest at 1e-4, +0.001 ± 1.96 * 0.00025: does not fall
    assert "| OPSD: some rate lowers its exact gap (lowest: lr 1e-4, +0.001000 ± 0.000490) |" in text
    assert sorted(p.name for p in tmp_path.glob("curves_*.png")) == ["curves_ablation.png", "curves_teachers.png"]


def test_verdicts_follow_the_protocols_rule():
    """docs/testbed.md: A > B supported when the 95% interval is above 0, not supported when it is
    below +1 point, else inconclusive; A <= B the complement; an exact-gap difference has no margin."""
    assert tables.verdict(2.0, 0.5, ">") == "supported"             # [1.02, 2.98]
    assert tables.verdict(0.0, 0.4, ">") == "not supported"         # [-0.78, 0.78] lies below +1
    assert tables.verdict(0.5, 0.5, ">") == "inconclusive"          # [-0.48, 1.48]
    assert tables.verdict(0.0, 0.4, "<=") == "supported" and tables.verdict(2.0, 0.5, "<=") == "not supported"
    assert tables.verdict(0.5, 0.5, "<=") == "inconclusive"
    assert tables.verdict(-0.01, 0.001, ">0") == "not supported" and tables.verdict(0.001, 0.001, ">0") == "inconclusive"


def test_over_seeds_uses_students_t():
    """Three seeds: t with 2 degrees of freedom (4.303), not the normal's 1.96; one seed: no interval."""
    assert tables.over_seeds([1.0, 2.0, 6.0]) == f"+1.0, +2.0, +6.0; +3.0 ± {4.303 * 7 ** 0.5 / 3 ** 0.5:.1f}"
    assert tables.over_seeds([1.0, 2.0, 6.0]) != f"+1.0, +2.0, +6.0; +3.0 ± {1.96 * 7 ** 0.5 / 3 ** 0.5:.1f}"
    assert tables.over_seeds([0.5]) == "+0.5"


def test_step_series_averages_seeds_then_smooths(tmp_path):
    for seed, values in ((0, [1.0, 2.0, 3.0]), (1, [3.0, 4.0, 5.0])):
        fake_run(tmp_path / f"seed{seed}", {"count": 1.0}, [{"reward": v} for v in values])
    runs = [tmp_path / "seed0", tmp_path / "seed1"]
    assert tables.step_series(runs, "reward", smooth=1) == [(1, 2.0), (2, 3.0), (3, 4.0)]
    assert tables.step_series(runs, "reward", smooth=2) == [(1, 2.0), (2, 2.5), (3, 3.5)]
    assert tables.step_series(runs, "cue_recall") == []


def test_curves_draw_every_row_in_its_colour(tmp_path):
    series = {"rising": {"loss": [(1, 0.0), (50, 1.0)], "reward": [(1, 0.5), (50, 0.5)]},
              "falling": {"loss": [(1, 1.0), (50, 0.0)]}}
    path = tables.draw_curves(series, tmp_path / "curves.png", "test")
    image = Image.open(path).convert("RGB")
    assert image.size == (4 * 330, 30 + 220)                 # two metric panels and the legend: one row of 4
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert tables.COLORS[0] in colours and tables.COLORS[1] in colours and tables.COLORS[2] not in colours


def test_the_runner_skips_finished_runs_reruns_changed_ones_and_reports_failures(tmp_path):
    write = "import os, sys; open(os.path.join(sys.argv[1], 'eval.json'), 'w').write('{}'); " \
            "open(os.path.join(sys.argv[1], os.pardir, 'calls'), 'a').write(sys.argv[2])"
    commands = {str(tmp_path / name): [sys.executable, "-c", write, str(tmp_path / name), name] for name in "abc"}
    tables.run_commands(commands, jobs=2)
    assert sorted(open(tmp_path / "calls").read()) == ["a", "b", "c"]
    tables.run_commands(commands, jobs=2)                                    # all complete: nothing runs
    commands[str(tmp_path / "b")].append("changed")
    tables.run_commands(commands, jobs=2)                                    # only the changed command
    assert sorted(open(tmp_path / "calls").read()) == ["a", "b", "b", "c"]
    failing = {str(tmp_path / "d"): [sys.executable, "-c", "print('the reason'); raise SystemExit(3)"]}
    with pytest.raises(SystemExit, match="(?s)exit 3.*the reason"):
        tables.run_commands(failing, jobs=1)


def test_the_tables_command_end_to_end(tiny, tmp_path):
    """Two rows and Base, one seed, one step: the real train.py and evaluate.py in subprocesses.
    Base (evaluate.py on the SFT checkpoint) must equal what train.py measured before distillation."""
    model, processor = tiny
    model.save_pretrained(tmp_path / "sft")
    processor.save_pretrained(tmp_path / "sft")
    tables.main([f"--out={tmp_path / 'tables'}", "--seeds=3", "--lrs=2e-4", "--rows=opsd,opsd_vicur",
                 f"--init_from={tmp_path / 'sft'}", "--max_steps=1", "--num_eval=7", "--num_train=40", "--batch_size=2",
                 "--max_new_tokens=6", "--gap_prompts=4", "--eval_extras=true"])
    text = open(tmp_path / "tables" / "tables.md").read()
    assert all(f"| {row} |" in text for row in ("Base (SFT)", "OPSD", "OPSD+ViCuR", "full ViCuR: cue hint + module"))
    base = json.load(open(tmp_path / "tables" / "base" / "seed3" / "eval.json"))
    before = json.load(open(tmp_path / "tables" / "opsd" / "lr2e-4" / "seed3" / "eval_before.json"))
    # the same greedy evaluation (7 prompts in one batch, the same weights) in two processes whose thread
    # counts differ, which may reorder float sums: exact equality holds as no greedy token is a near-tie
    samples = eval_world(7, seed=3)
    rollout = sample_completions(model, processor, collate(processor, [student_messages(s) for s in samples]), greedy=True,
                     max_new_tokens=6)
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    full = collate(processor, [student_messages(s) for s in samples], completions)
    with torch.no_grad():
        logits = model(**model_inputs(full)).logits[:, :-1]
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert top2_margins(logits, vision_ids)[full["completion_mask"][:, 1:].bool()].min() > GREEDY_MARGIN
    assert base["per_family"] == before["per_family"] and len(base["per_family"]) == 7
    config = json.load(open(tmp_path / "tables" / "opsd_vicur" / "lr2e-4" / "seed3" / "config.json"))
    assert (config["seed"], config["max_steps"], config["mode"]) == (3, 1, "vicur")
    log = [json.loads(line) for line in open(tmp_path / "tables" / "opsd_vicur" / "lr2e-4" / "seed3" / "log.jsonl")]
    assert 0 < next(r for r in log if "loss" in r)["cue_recall"] < 1
    assert os.path.isfile(tmp_path / "tables" / "curves_teachers.png")
    assert os.path.isfile(tmp_path / "tables" / "opsd" / "lr2e-4" / "seed3" / "validation.json")   # the grid's choice
    load_model(str(tmp_path / "tables" / "opsd_vicur" / "lr2e-4" / "seed3" / "ckpt"))   # a usable checkpoint


def test_a_curves_title_names_the_seeds_of_each_row():
    """Under --seed_rows a row may have one seed while another has three; the title says which."""
    runs = {"opd": {0: {}, 1: {}, 2: {}}, "opsd_vicur": {0: {}}}
    title = tables.curves_title({"opsd_vicur": "OPSD+ViCuR", "opd": "OPD"}, runs)
    assert title.startswith("OPSD+ViCuR (seed 0), OPD (seeds 0, 1, 2): the mean over each row's seeds")
