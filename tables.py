"""The paper's tables on the embedded world, by the protocol of docs/testbed.md: every row through
train.py (subprocesses, a few at a time) at each rate of one learning-rate grid on the first seed,
each row's rate chosen on the validation split, the other seeds at that rate; then tables.md (the
grid, mean ± sd over seeds, the paired difference to Base pooled over seeds with its 95% interval,
the exact gap, the verdicts on the paper's claims and the sanity properties) and the curves.

    python tables.py --out=out/tables --init_from=out/default/sft/ckpt

Any flag tables.py does not know is a train.py flag, given to every run. `python evaluate.py
--tables=FOLDER ...` is the same command.
"""

import datetime
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from PIL import Image, ImageDraw
from tqdm import tqdm

import cli
from data import EVAL_SAMPLES
from evaluate import family_order, macro_interval
from train import Config


# the default run's SFT stage as a run of its own (its sft_* fields); --max_steps=Config.sft_steps
SFT_RECIPE = (f"--mode=sft --lr={Config.sft_lr:g} --warmup_steps={Config.sft_warmup_steps} "
              f"--batch_size={Config.sft_batch_size}")
# OPD's stronger teacher: the same model and recipe with the cue hint in 40% of the samples, not 80%; it learns
# to answer without the hint (at 1,600 steps, 81.6 against the base's 59.8 on validation; docs/testbed.md)
TEACHER_RECIPE = f"{SFT_RECIPE} --max_steps={Config.sft_steps} --sft_cue_frac=0.4"
LR_GRID = "2e-5,6e-5,2e-4"  # one grid for every row; each row's rate is chosen on the validation split
GROUPS = "--batch_size=8 --num_rollouts=4"  # GRPO and PTD-PO: 8 groups of 4 = the 32 completions of every row's step
TABLE_RUNS = {  # folder: (row, train.py flags); every run starts from the same SFT checkpoint with the same budget
    "grpo": ("GRPO", f"--mode=ptdpo --ptd_coef=0 {GROUPS}"),
    "opsd": ("OPSD", "--mode=opsd"),
    "opsd_vicur": ("OPSD+ViCuR", "--mode=vicur"),
    "opd": ("OPD", "--mode=opd --teacher={teacher}"),
    "opd_vicur": ("OPD+ViCuR", "--mode=vicur --teacher={teacher}"),
    "ptdpo": ("PTD-PO", f"--mode=ptdpo {GROUPS}"),
    "cue_only": ("+ cue hint only", "--mode=vicur --cue_recovery=false"),
    "module_only": ("+ recovery module only", "--mode=vicur --privilege=answer"),
    "unrelated_cue": ("control: unrelated cue", "--mode=vicur --privilege=unrelated_cues"),
    "self_no_hint": ("control: self teacher, no hint", "--mode=opsd --privilege=none"),
}
SELF_TEACHER = ["opsd", "opsd_vicur", "cue_only", "module_only", "unrelated_cue", "self_no_hint"]
COMPARISON = {"base": "Base (SFT)", **{f: TABLE_RUNS[f][0] for f in ("grpo", "opsd", "opsd_vicur", "opd", "opd_vicur",
                                                                      "ptdpo", "unrelated_cue", "self_no_hint")}}
ABLATION = {"opsd": "answer hint (OPSD)", "cue_only": "+ cue hint only", "module_only": "+ recovery module only",
            "opsd_vicur": "full ViCuR: cue hint + module"}
FIGURES = {  # one curves figure per comparison: {file name: {run folder: row}}
    "teachers": {f: TABLE_RUNS[f][0] for f in ("opsd", "opsd_vicur", "opd", "opd_vicur")},
    "grpo_ptdpo": {f: TABLE_RUNS[f][0] for f in ("grpo", "ptdpo")},
    "ablation": ABLATION}
CURVES = ["loss", "log_ratio", "privilege_gap", "hint_leakage", "reward", "student_entropy", "cue_recall"]
# the paper's claims (docs/testbed.md): (claim, row A, relation, row B) on the pooled paired in-domain difference
CLAIMS = [("OPSD <= Base", "opsd", "<=", "base"), ("OPSD+ViCuR > OPSD", "opsd_vicur", ">", "opsd"),
          ("OPD+ViCuR > OPD", "opd_vicur", ">", "opd"),
          ("the module adds to the cue hint: OPSD+ViCuR > cue hint only", "opsd_vicur", ">", "cue_only"),
          *[(f"GRPO > {TABLE_RUNS[r][0]}", "grpo", ">", r) for r in ("opsd", "opsd_vicur", "opd", "opd_vicur")],
          ("PTD-PO > GRPO", "ptdpo", ">", "grpo")]


def script(name):
    """argv that runs one of this repository's scripts with this Python."""
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]


def run_folder(folder, name, lr, seed):
    return os.path.join(folder, name, f"lr{lr}", f"seed{seed}")


def table_commands(folder, seeds, lrs, sft, teacher, train_flags, threads, names, validate):
    """{run folder: argv}: the rows `names` at each learning rate of `lrs` (a list, or {row: list}) and
    each seed, with a validation evaluation when `validate` (the grid); and the evaluations of Base
    (the SFT checkpoint) and of the stronger teacher on each seed's evaluation samples."""
    num_eval = next((f.split("=", 1)[1] for f in train_flags if f.startswith("--num_eval=")), str(EVAL_SAMPLES))
    commands = {}
    for seed in seeds:
        for model, path in (("base", sft), ("teacher_eval", teacher)):
            if model == "teacher_eval" and not any("{teacher}" in TABLE_RUNS[n][1] for n in names):
                continue
            out = os.path.join(folder, model, f"seed{seed}")
            commands[out] = [*script("evaluate.py"), f"--ckpt={path}", f"--seed={seed}", f"--num_eval={num_eval}",
                             f"--out={os.path.join(out, 'eval.json')}"]
        for name in names:
            for lr in lrs[name] if isinstance(lrs, dict) else lrs:
                run = run_folder(folder, name, lr, seed)
                commands[run] = [*script("train.py"), f"--init_from={sft}",
                                 *TABLE_RUNS[name][1].format(teacher=teacher).split(), f"--lr={lr}", f"--seed={seed}",
                                 f"--threads={threads}", "--eval_extras=false", *(["--validate"] if validate else []),
                                 *train_flags, f"--out_dir={run}"]
    return commands


def choose_lr(folder, names, lrs, seed):
    """{row: the rate whose seed-`seed` run has the highest validation in-domain average}; a tie within
    0.05 points goes to the smaller rate."""
    chosen = {}
    for name in names:
        scores = {lr: 100 * json.load(open(os.path.join(run_folder(folder, name, lr, seed), "validation.json")))[
            "in_domain_avg"] for lr in lrs}
        best = max(scores.values())
        chosen[name] = min((lr for lr, score in scores.items() if score >= best - 0.05), key=float)
    return chosen


def run_commands(commands, jobs):
    """Run {folder: argv}, `jobs` at a time, each printing into folder.log. A folder whose eval.json
    exists and whose command.txt matches is complete and skipped, so an interrupted table resumes."""
    todo = {}
    for run, argv in commands.items():
        command = " ".join(argv)
        done = os.path.isfile(os.path.join(run, "eval.json")) and os.path.isfile(os.path.join(run, "command.txt"))
        if not (done and open(os.path.join(run, "command.txt")).read().strip() == command):
            todo[run] = argv
    running, progress = {}, tqdm(total=len(todo), desc="runs")
    for run, argv in list(todo.items()) + [(None, None)]:
        while running and (run is None or len(running) >= jobs):   # wait for a free slot (or for all, at the end)
            for finished in [r for r, (p, _) in running.items() if p.poll() is not None]:
                process, log = running.pop(finished)
                log.close()
                if process.returncode != 0:
                    for other, _ in running.values():
                        other.kill()
                    tail = open(finished + ".log").read()[-2000:]
                    raise SystemExit(f"error: {' '.join(commands[finished])} failed (exit {process.returncode}); "
                                     f"the end of {finished}.log:\n{tail}")
                with open(os.path.join(finished, "command.txt"), "w") as f:
                    f.write(" ".join(commands[finished]) + "\n")
                progress.update(1)
            time.sleep(0.5)
        if run is not None:
            os.makedirs(run, exist_ok=True)
            log = open(run + ".log", "w")
            running[run] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
    progress.close()


def run_summary(run):
    """One finished run folder -> its numbers: eval.json's accuracies (%), its answers, the exact gap,
    sampled reward and entropy (before and after, with SEs), the validation average, the step means of
    the privilege gap and hint leakage from log.jsonl, and the final cue recall (%)."""
    results = json.load(open(os.path.join(run, "eval.json")))
    summary = {task: 100 * value for task, value in results["per_family"].items()}
    summary["families"] = family_order(results["per_family"])
    summary |= {"in_domain_avg": 100 * results["in_domain_avg"], "ood_avg": 100 * results["ood_avg"]}
    summary["records"] = [json.loads(line) for line in open(os.path.join(run, "eval_predictions.jsonl"))]
    summary |= {key: results[key] for key in ("distill_gap", "sampled_reward", "entropy") if key in results}
    if "cue_recall" in results:
        summary["cue_recall"] = 100 * results["cue_recall"]["recall"]
    if os.path.isfile(os.path.join(run, "validation.json")):
        summary["validation"] = 100 * json.load(open(os.path.join(run, "validation.json")))["in_domain_avg"]
    log = os.path.join(run, "log.jsonl")
    steps = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    steps = [r for r in steps if "loss" in r]
    for name in ("privilege_gap", "hint_leakage"):  # PTD-PO logs the gap only in steps that tutored
        values = [r[name] for r in steps if name in r]
        if values:
            summary[name] = sum(values) / len(values)
    return summary


def mean_and_spread(values):
    """'mean ± sample standard deviation' (just the mean for one value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def pooled_delta(runs, row, against, domain="in-domain"):
    """The paired difference row - against in points, pooled over the seeds both have (each seed's own
    evaluation samples, ids unique across seeds), with its SE (evaluate.macro_interval)."""
    seeds = [s for s in runs[row] if s in runs[against]]
    value, se = macro_interval([r for s in seeds for r in runs[row][s]["records"]], domain,
                               [r for s in seeds for r in runs[against][s]["records"]])
    return 100 * value, 100 * se


def mean_difference(terms):
    """[(x, se_x, y, se_y)] of independent estimates, one per seed -> (mean of x - y, its SE
    sqrt(sum of se_x^2 + se_y^2) / S)."""
    return (sum(x - y for x, _, y, _ in terms) / len(terms),
            sum(se_x ** 2 + se_y ** 2 for _, se_x, _, se_y in terms) ** 0.5 / len(terms))


def pooled_change(summaries, key):
    """The mean over seeds of summary[key]'s after - before, and its SE sqrt(sum_s se_s^2) / S from each
    seed's SE paired by prompt (gap.gap_change); None when no summary has the key."""
    values = [s[key] for s in summaries if key in s]
    if not values:
        return None
    return mean_difference([(v["change"], v["change_se"], 0.0, 0.0) for v in values])


def verdict(value, se, relation):
    """docs/testbed.md's rule on a 95% interval in points: A > B is supported above 0 and not
    supported below +1; A <= B is its complement; a difference of exact gaps ('>0') has no margin."""
    low, high = value - 1.96 * se, value + 1.96 * se
    if relation == ">":
        return "supported" if low > 0 else "not supported" if high < 1 else "inconclusive"
    if relation == "<=":
        return "supported" if high < 1 else "not supported" if low > 0 else "inconclusive"
    return "supported" if low > 0 else "not supported" if high < 0 else "inconclusive"


def interval(value, se, digits=1):
    return f"{value:+.{digits}f} ± {1.96 * se:.{digits}f}"


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t quantiles, df


def over_seeds(differences, digits=1):
    """'each seed's A - B; mean ± t_{S-1} sd / sqrt(S)': the seeds' spread (training randomness), which
    the pooled interval (evaluation samples of the trained models) does not contain. Reported beside
    the protocol's verdict, not used by it."""
    cells = ", ".join(f"{d:+.{digits}f}" for d in differences)
    mean, sd = mean_and_spread(differences)
    if sd is None or len(differences) - 1 not in T_975:
        return cells
    return f"{cells}; {mean:+.{digits}f} ± {T_975[len(differences) - 1] * sd / len(differences) ** 0.5:.{digits}f}"


def seed_table(runs, rows, families, chosen):
    """Markdown: one line per {folder: row title}: the chosen rate, a column per family and the two
    averages (mean ± sd over seeds), the pooled paired difference to Base with its 95% interval, the
    exact gap and the sampled reward before -> after (means over seeds), the entropy after, the step
    means of the privilege gap and hint leakage, and the cue recall."""
    def cell(values, digits=1):
        if not values:
            return "-"
        mean, spread = mean_and_spread(values)
        return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")

    def before_after(seeds, key, digits):
        values = [s[key] for s in seeds if key in s]
        if not values:
            return "-"
        return " -> ".join(f"{sum(v[k] for v in values) / len(values):.{digits}f}" for k in ("before", "after"))
    header = ["row", "lr", "seeds", *families, "in-domain", "out-of-domain", "Δ in-domain (95%)", "Δ out-of-domain (95%)",
              "exact gap", "sampled reward", "entropy after", "privilege gap", "hint leakage", "cue recall"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for folder, title in rows.items():
        seeds = list(runs[folder].values())
        column = lambda key: [s[key] for s in seeds if key in s]  # noqa: E731
        cells = [chosen.get(folder, "-"), str(len(seeds)), *(cell(column(f)) for f in families)]
        cells += [cell(column("in_domain_avg")), cell(column("ood_avg"))]
        cells += ["-" if folder == "base" else interval(*pooled_delta(runs, folder, "base", d))
                  for d in ("in-domain", "out-of-domain")]
        cells += [before_after(seeds, "distill_gap", 5), before_after(seeds, "sampled_reward", 3)]
        cells += [cell([s["entropy"]["after"] for s in seeds if "entropy" in s], 3)]
        cells += [cell(column("privilege_gap"), 4), cell(column("hint_leakage"), 2), cell(column("cue_recall"))]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(grid, lrs, chosen):
    """Markdown: per row, each rate's validation in-domain average and exact gap before -> after (seed 0)."""
    lines = ["| row | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |", "|---" * (len(lrs) + 2) + "|"]
    for name, by_lr in grid.items():
        cells = []
        for lr in lrs:
            s = by_lr[lr]
            gap = s.get("distill_gap")
            cells.append(f"{s['validation']:.1f}" + (f" (gap {gap['before']:.5f} -> {gap['after']:.5f})" if gap else ""))
        lines.append(f"| {TABLE_RUNS[name][0]} | " + " | ".join(cells) + f" | {chosen[name]} |")
    return "\n".join(lines)


def claims_and_sanity(runs, grid):
    """docs/testbed.md's verdicts on the paper's claims and the sanity properties -> markdown lines."""
    lines = ["| claim | Δ in-domain (95%), points | verdict | per seed; over seeds (t, 95%) |", "|---|---|---|---|"]
    for claim, a, relation, b in CLAIMS:
        if a in runs and b in runs:
            value, se = pooled_delta(runs, a, b)
            seeds = over_seeds([runs[a][s]["in_domain_avg"] - runs[b][s]["in_domain_avg"]
                                for s in runs[a] if s in runs[b]])
            lines.append(f"| {claim} | {interval(value, se)} | {verdict(value, se, relation)} | {seeds} |")
    for claim, a, b, key, when in (("the cue's privilege gap > the answer's (exact gap at step 0)", "opsd_vicur", "opsd",
                                    "distill_gap", "before"),
                                   ("PTD-PO's entropy after > GRPO's", "ptdpo", "grpo", "entropy", "after")):
        if a in runs and b in runs:
            terms = [(runs[a][s][key][when], runs[a][s][key][f"{when}_se"], runs[b][s][key][when],
                      runs[b][s][key][f"{when}_se"]) for s in runs[a] if s in runs[b]]
            value, se = mean_difference(terms)
            lines.append(f"| {claim} | {interval(value, se, 5)} (nats) | {verdict(value, se, '>0')} | "
                         f"{over_seeds([x - y for x, _, y, _ in terms], 5)} |")
    lines += ["", "| sanity property | measured | holds |", "|---|---|---|"]
    if "opd" in runs:
        change = pooled_change(list(runs["opd"].values()), "distill_gap")
        lines.append(f"| OPD's exact gap falls | {interval(*change, 6)} | {verdict(-change[0], change[1], '>0') == 'supported'} |")
    if "opd" in runs and "teacher_eval" in runs:
        mean = lambda row: sum(s["in_domain_avg"] for s in runs[row].values()) / len(runs[row])  # noqa: E731
        share = (mean("opd") - mean("base")) / (mean("teacher_eval") - mean("base"))
        lines.append(f"| OPD closes >= 1/3 of the teacher - base gap (base {mean('base'):.1f}, teacher "
                     f"{mean('teacher_eval'):.1f}, OPD {mean('opd'):.1f}) | {share:.2f} | {share >= 1 / 3} |")
    if "grpo" in runs:
        change = pooled_change(list(runs["grpo"].values()), "sampled_reward")
        lines.append(f"| GRPO's sampled reward rises | {interval(*change, 3)} | {verdict(*change, '>0') == 'supported'} |")
    for name in [n for n in SELF_TEACHER if n in grid and n != "self_no_hint"]:
        falls = {lr: pooled_change([s], "distill_gap") for lr, s in grid[name].items()}
        best = min(falls, key=lambda lr: falls[lr][0])
        lines.append(f"| {TABLE_RUNS[name][0]}: some rate lowers its exact gap (lowest: lr {best}, "
                     f"{interval(*falls[best], 6)}) | "
                     + ", ".join(f"{lr}: {falls[lr][0]:+.6f}" for lr in falls)
                     + f" | {any(verdict(-v, se, '>0') == 'supported' for v, se in falls.values())} |")
    return "\n".join(lines)


def step_series(runs_of_row, metric, smooth=10):
    """The mean over seeds of a logged metric at each step, then a trailing moving average: [(step, value)]."""
    by_step = defaultdict(list)
    for run in runs_of_row:
        for line in open(os.path.join(run, "log.jsonl")):
            record = json.loads(line)
            if metric in record and "loss" in record:
                by_step[record["step"]].append(record[metric])
    steps = sorted(by_step)
    means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    return [(step, sum(means[max(0, i - smooth + 1):i + 1]) / len(means[max(0, i - smooth + 1):i + 1]))
            for i, step in enumerate(steps)]


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def draw_curves(series, path, title, panel=(330, 220), columns=4):
    """series {row: {metric: [(step, value)]}} -> one PNG: a panel per metric (CURVES order), a line per
    row in its colour, the value range written at the axis ends, the legend in the last panel."""
    metrics = [m for m in CURVES if any(s.get(m) for s in series.values())]
    rows_of_panels = (len(metrics) + 1 + columns - 1) // columns
    width, height = panel
    image = Image.new("RGB", (columns * width, 30 + rows_of_panels * height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    left, top, right, bottom = 52, 22, 12, 28                       # margins inside a panel
    for index, metric in enumerate(metrics):
        x0, y0 = (index % columns) * width, 30 + (index // columns) * height
        points = [p for s in series.values() for p in s.get(metric, [])]
        low, high = min(v for _, v in points), max(v for _, v in points)
        high = high if high > low else low + 1e-9
        first, last = min(t for t, _ in points), max(t for t, _ in points)
        last = last if last > first else first + 1
        to_x = lambda t: x0 + left + (t - first) / (last - first) * (width - left - right)  # noqa: E731
        to_y = lambda v: y0 + height - bottom - (v - low) / (high - low) * (height - top - bottom)  # noqa: E731
        draw.rectangle([x0 + left, y0 + top, x0 + width - right, y0 + height - bottom], outline=(160, 160, 160))
        draw.text((x0 + left, y0 + 6), metric, fill="black")
        draw.text((x0 + 2, y0 + top), f"{high:.3g}", fill=(90, 90, 90))
        draw.text((x0 + 2, y0 + height - bottom - 10), f"{low:.3g}", fill=(90, 90, 90))
        draw.text((x0 + left, y0 + height - bottom + 4), f"step {first}", fill=(90, 90, 90))
        draw.text((x0 + width - right - 60, y0 + height - bottom + 4), f"step {last}", fill=(90, 90, 90))
        for color, curve in zip(COLORS, series.values()):
            line = [(to_x(t), to_y(v)) for t, v in curve.get(metric, [])]
            if len(line) > 1:
                draw.line(line, fill=color, width=2)
    x0, y0 = (len(metrics) % columns) * width, 30 + (len(metrics) // columns) * height
    for i, (color, row) in enumerate(zip(COLORS, series)):
        draw.line([(x0 + 20, y0 + 30 + 18 * i), (x0 + 50, y0 + 30 + 18 * i)], fill=color, width=3)
        draw.text((x0 + 58, y0 + 24 + 18 * i), row, fill="black")
    image.save(path)
    return path


def curves_title(rows, runs):
    """A figure's title: each row with the seeds its curves average (under --seed_rows, some rows have one)."""
    def seeds_of(row):
        seeds = sorted(runs[row])
        return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (", ".join(f"{title} ({seeds_of(row)})" for row, title in rows.items())
            + ": the mean over each row's seeds, then a moving average of 10 steps")


def write_tables(folder, seeds, names, lrs, chosen, minutes):
    """tables.md (the grid, the tables, the verdicts) and a curves PNG per comparison, from the
    finished run folders of the rows `names`."""
    finished = lambda run: os.path.isfile(os.path.join(run, "eval.json"))  # noqa: E731  (--seed_rows: not every seed)
    runs = {name: {seed: run_summary(run_folder(folder, name, chosen[name], seed)) for seed in seeds
                   if finished(run_folder(folder, name, chosen[name], seed))} for name in names}
    for model in ("base", "teacher_eval"):
        if os.path.isdir(os.path.join(folder, model)):
            runs[model] = {seed: run_summary(os.path.join(folder, model, f"seed{seed}")) for seed in seeds
                           if finished(os.path.join(folder, model, f"seed{seed}"))}
    grid = {name: {lr: run_summary(run_folder(folder, name, lr, seeds[0])) for lr in lrs} for name in names}
    present = lambda rows: {row: title for row, title in rows.items() if row in runs}  # noqa: E731
    families = runs["base"][seeds[0]]["families"]
    date = datetime.date.today().isoformat()
    text = (f"# The paper's tables on the embedded world\n\n{date}; seeds {', '.join(map(str, seeds))}; "
            f"{minutes:.0f} min in this invocation (runs kept from earlier ones not counted); the protocol: "
            f"docs/testbed.md. Accuracy in %, mean ± standard deviation over seeds. Δ: the row minus Base, "
            f"paired on the same samples and pooled over the seeds, with its 95% interval. Exact gap: "
            f"KL(student || teacher), nats a token, before -> after (means over seeds). Privilege gap and hint "
            f"leakage: means over the steps of log.jsonl. Cue recall: % of the sink's attention inside the cue "
            f"boxes, at the end. The claims' last column: each seed's difference and a t interval over seeds "
            f"(the spread of training), beside the protocol's verdict.\n\n"
            f"## The learning-rate grid (seed {seeds[0]}, validation in-domain average)\n\n"
            f"{grid_table(grid, lrs, chosen)}\n\n"
            f"## Table 1: which teacher privilege helps, PTD-PO, and the controls\n\n"
            f"{seed_table(runs, present(COMPARISON), families, chosen)}\n\n"
            f"## Component ablation (the OPSD setting)\n\n{seed_table(runs, present(ABLATION), families, chosen)}\n\n"
            f"## The paper's claims and the sanity properties\n\n{claims_and_sanity(runs, grid)}\n")
    with open(os.path.join(folder, "tables.md"), "w") as f:
        f.write(text)
    for name, rows in FIGURES.items():
        rows = {row: title for row, title in rows.items() if row in names}
        if not rows:
            continue
        series = {title: {m: step_series([run_folder(folder, row, chosen[row], s) for s in runs[row]], m) for m in CURVES}
                  for row, title in rows.items()}
        draw_curves(series, os.path.join(folder, f"curves_{name}.png"), curves_title(rows, runs))
    return text


@dataclass
class TablesConfig:
    out: str = "out/tables"          # the folder of every run, tables.md and the curves
    seeds: str = "0,1,2"             # one evaluation set, training world and set of rollouts per seed
    lrs: str = LR_GRID               # the learning-rate grid, run at the first seed; the others at the chosen rate
    jobs: int = 2                    # runs at a time, the cores shared among them
    init_from: str = ""              # the SFT checkpoint every row starts from; empty = train one (SFT_RECIPE)
    teacher: str = ""                # OPD's stronger teacher; empty = train one (TEACHER_RECIPE)
    rows: str = ""                   # a comma-separated subset of TABLE_RUNS; empty = all
    seed_rows: str = ""              # the rows that run the seeds after the first; empty = all of --rows


def main(argv):
    config, train_flags = cli.parse(argv, TablesConfig, "python tables.py [--key=value ...] [train.py flags]",
                                    epilog="\nevery other --key=value is a train.py flag, given to every run; "
                                           f"the rows: {', '.join(TABLE_RUNS)}", passthrough=True)
    folder, start = config.out, time.time()
    seeds = [int(s) for s in config.seeds.split(",")]
    lrs = config.lrs.split(",")
    names = config.rows.split(",") if config.rows else list(TABLE_RUNS)
    if set(names) - set(TABLE_RUNS):
        sys.exit(f"error: --rows: unknown {sorted(set(names) - set(TABLE_RUNS))}; the rows are {list(TABLE_RUNS)}")
    if any(f.startswith("--lr=") for f in train_flags):
        sys.exit("error: --lr is chosen from the grid; pass --lrs=A,B,... (one value: no choice)")
    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    train = script("train.py")
    needed = {}
    sft = config.init_from or os.path.join(folder, "sft", "ckpt")
    teacher = config.teacher or os.path.join(folder, "teacher", "ckpt")
    if not config.init_from:
        needed[os.path.join(folder, "sft")] = train + SFT_RECIPE.split() + [
            f"--max_steps={Config.sft_steps}", f"--out_dir={os.path.join(folder, 'sft')}"]
    if not config.teacher and any("{teacher}" in TABLE_RUNS[n][1] for n in names):
        needed[os.path.join(folder, "teacher")] = train + TEACHER_RECIPE.split() + [
            f"--out_dir={os.path.join(folder, 'teacher')}"]
    for path in [p for p in (config.init_from, config.teacher) if p]:
        if not os.path.isdir(path):
            sys.exit(f"error: {path} is not a checkpoint directory")
    seeded = config.seed_rows.split(",") if config.seed_rows else names
    if set(seeded) - set(names):
        sys.exit(f"error: --seed_rows: {sorted(set(seeded) - set(names))} are not in --rows")
    grid = table_commands(folder, seeds[:1], lrs, sft, teacher, train_flags, threads, names, validate=True)
    print(f"the paper's tables: {len(needed)} starting run(s), a grid of {len(grid)} runs (seed {seeds[0]}), then "
          f"{len(seeded) * (len(seeds) - 1)} at the chosen rates, {config.jobs} at a time with {threads} thread(s) "
          f"each, into {folder}/ (each command in <run>/command.txt, its output in <run>.log)")
    run_commands(needed, config.jobs)
    run_commands(grid, config.jobs)
    chosen = choose_lr(folder, names, lrs, seeds[0])
    print("chosen on the validation split: " + ", ".join(f"{n} {lr}" for n, lr in chosen.items()))
    run_commands(table_commands(folder, seeds[1:], {n: [chosen[n]] for n in seeded}, sft, teacher, train_flags, threads,
                                seeded, validate=False), config.jobs)
    text = write_tables(folder, seeds, names, lrs, chosen, (time.time() - start) / 60)
    print(text + f"\nwrote {folder}/tables.md and curves_{{{','.join(FIGURES)}}}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
