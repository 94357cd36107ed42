"""The paper's tables on the embedded world: every row x seed through train.py (as subprocesses, a few
at a time), then tables.md (mean ± sd over seeds, the paired difference to Base) and the curves.

    python tables.py --out=out/tables --init_from=out/default/sft/ckpt --max_steps=60

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
from evaluate import family_order


SFT_RECIPE = "--mode=sft --max_steps=1600 --lr=1e-3 --warmup_steps=50"                   # the default run's SFT stage
TEACHER_RECIPE = f"{SFT_RECIPE} --student=tiny-large"  # OPD's bigger teacher, the same recipe
GROUPS = "--batch_size=2 --num_rollouts=8"  # GRPO and PTD-PO: 2 prompts x 8 rollouts = the 16 completions a step
TABLE_RUNS = {  # folder: (row, train.py flags); every run starts from the same SFT checkpoint with the same budget
    "grpo": ("GRPO", f"--mode=ptdpo --ptd_coef=0 {GROUPS}"),
    "opsd": ("OPSD", "--mode=opsd"),
    "opsd_vicur": ("OPSD+ViCuR", "--mode=vicur"),
    "opd": ("OPD", "--mode=opd --teacher={teacher}"),
    "opd_vicur": ("OPD+ViCuR", "--mode=vicur --teacher={teacher}"),
    "ptdpo": ("PTD-PO", f"--mode=ptdpo {GROUPS}"),
    "cue_only": ("+ cue hint only", "--mode=vicur --cue_recovery=false"),
    "module_only": ("+ recovery module only", "--mode=vicur --privilege=answer"),
}
COMPARISON = {"base": "Base (SFT)", **{f: TABLE_RUNS[f][0] for f in ("grpo", "opsd", "opsd_vicur", "opd", "opd_vicur",
                                                                      "ptdpo")}}
ABLATION = {"opsd": "answer hint (OPSD)", "cue_only": "+ cue hint only", "module_only": "+ recovery module only",
            "opsd_vicur": "full ViCuR: cue hint + module"}
FIGURES = {  # one curves figure per comparison: {file name: {run folder: row}}
    "teachers": {f: TABLE_RUNS[f][0] for f in ("opsd", "opsd_vicur", "opd", "opd_vicur")},
    "grpo_ptdpo": {f: TABLE_RUNS[f][0] for f in ("grpo", "ptdpo")},
    "ablation": ABLATION}
CURVES = ["loss", "log_ratio", "privilege_gap", "hint_leakage", "reward", "student_entropy", "cue_recall"]


def script(name):
    """argv that runs one of this repository's scripts with this Python."""
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]


def table_commands(folder, seeds, sft, teacher, train_flags, threads, names):
    """{run folder: argv} for the rows `names` and every seed, and the base evaluations of the SFT checkpoint."""
    num_eval = next((f.split("=", 1)[1] for f in train_flags if f.startswith("--num_eval=")),
                    str(EVAL_SAMPLES))
    commands = {}
    for seed in seeds:
        commands[os.path.join(folder, "base", f"seed{seed}")] = [
            *script("evaluate.py"), f"--ckpt={sft}", f"--seed={seed}", f"--num_eval={num_eval}",
            f"--out={os.path.join(folder, 'base', f'seed{seed}', 'eval.json')}"]
        for name in names:
            run = os.path.join(folder, name, f"seed{seed}")
            commands[run] = [*script("train.py"), f"--init_from={sft}",
                             *TABLE_RUNS[name][1].format(teacher=teacher).split(), f"--seed={seed}", f"--threads={threads}",
                             *train_flags, f"--out_dir={run}"]
    return commands


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
    """One finished run folder -> its numbers: eval.json's accuracies (%), the step means of the
    privilege gap and hint leakage from log.jsonl, and the final cue recall (%)."""
    results = json.load(open(os.path.join(run, "eval.json")))
    summary = {task: 100 * value for task, value in results["per_family"].items()}
    summary["families"] = family_order(results["per_family"])
    summary |= {"in_domain_avg": 100 * results["in_domain_avg"], "ood_avg": 100 * results["ood_avg"]}
    if "cue_recall" in results:
        summary["cue_recall"] = 100 * results["cue_recall"]["recall"]
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


def seed_table(runs, rows, families):
    """Markdown: one line per {folder: row title}, a column per family, the two averages, the paired
    difference to Base (the same seed, so the same evaluation samples), then the privilege gap,
    hint leakage and cue recall; every cell the mean ± standard deviation over seeds."""
    def cell(values, digits=1):
        if not values:
            return "-"
        mean, spread = mean_and_spread(values)
        return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")
    header = ["row", *families, "in-domain", "out-of-domain", "Δ in-domain", "Δ out-of-domain", "privilege gap",
              "hint leakage", "cue recall"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for folder, title in rows.items():
        seeds = runs[folder]
        column = lambda key: [s[key] for s in seeds.values() if key in s]  # noqa: E731
        delta = lambda key: [s[key] - runs["base"][seed][key] for seed, s in seeds.items()  # noqa: E731
                             if seed in runs.get("base", {})]
        cells = [cell(column(f)) for f in families]
        cells += [cell(column("in_domain_avg")), cell(column("ood_avg"))]
        cells += ["-" if folder == "base" else cell(delta(k)) for k in ("in_domain_avg", "ood_avg")]
        cells += [cell(column("privilege_gap"), 4), cell(column("hint_leakage"), 2), cell(column("cue_recall"))]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
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


def write_tables(folder, seeds, names, minutes):
    """tables.md and a curves PNG per comparison, from the finished run folders of the rows `names`."""
    runs = {name: {seed: run_summary(os.path.join(folder, name, f"seed{seed}")) for seed in seeds}
            for name in ["base", *names]}
    present = lambda rows: {row: title for row, title in rows.items() if row in runs}  # noqa: E731
    families = runs["base"][seeds[0]]["families"]
    date = datetime.date.today().isoformat()
    text = (f"# The paper's tables on the embedded world\n\n{date}; seeds {', '.join(map(str, seeds))}; "
            f"{minutes:.0f} min. Accuracy in %, mean ± standard deviation over seeds. Δ: the row minus Base on "
            f"the same seed's evaluation samples. Privilege gap (nats a token) and hint leakage: means over the "
            f"steps of log.jsonl. Cue recall: % of the sink's attention inside the cue boxes, at the end.\n\n"
            f"## Table 1: which teacher privilege helps\n\n{seed_table(runs, present(COMPARISON), families)}\n\n"
            f"## Component ablation (the OPSD setting)\n\n{seed_table(runs, present(ABLATION), families)}\n")
    with open(os.path.join(folder, "tables.md"), "w") as f:
        f.write(text)
    for name, rows in FIGURES.items():
        rows = present(rows)
        if not rows:
            continue
        series = {title: {m: step_series([os.path.join(folder, row, f"seed{s}") for s in seeds], m) for m in CURVES}
                  for row, title in rows.items()}
        draw_curves(series, os.path.join(folder, f"curves_{name}.png"),
                    f"{', '.join(rows.values())}: the mean over seeds {', '.join(map(str, seeds))}, "
                    f"then a moving average of 10 steps")
    return text


@dataclass
class TablesConfig:
    out: str = "out/tables"          # the folder of every run, tables.md and the curves
    seeds: str = "0,1,2"             # one evaluation set, training world and set of rollouts per seed
    jobs: int = 2                    # runs at a time, the cores shared among them
    init_from: str = ""              # the SFT checkpoint every row starts from; empty = train one (SFT_RECIPE)
    teacher: str = ""                # OPD's stronger teacher; empty = train one (TEACHER_RECIPE)
    rows: str = ""                   # a comma-separated subset of TABLE_RUNS; empty = all


def main(argv):
    config, train_flags = cli.parse(argv, TablesConfig, "python tables.py [--key=value ...] [train.py flags]",
                                    epilog="\nevery other --key=value is a train.py flag, given to every run; "
                                           f"the rows: {', '.join(TABLE_RUNS)}", passthrough=True)
    folder, start = config.out, time.time()
    seeds = [int(s) for s in config.seeds.split(",")]
    names = config.rows.split(",") if config.rows else list(TABLE_RUNS)
    if set(names) - set(TABLE_RUNS):
        sys.exit(f"error: --rows: unknown {sorted(set(names) - set(TABLE_RUNS))}; the rows are {list(TABLE_RUNS)}")
    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    train = script("train.py")
    needed = {}
    sft = config.init_from or os.path.join(folder, "sft", "ckpt")
    teacher = config.teacher or os.path.join(folder, "teacher", "ckpt")
    if not config.init_from:
        needed[os.path.join(folder, "sft")] = train + SFT_RECIPE.split() + [f"--out_dir={os.path.join(folder, 'sft')}"]
    if not config.teacher and any("{teacher}" in TABLE_RUNS[n][1] for n in names):
        needed[os.path.join(folder, "teacher")] = train + TEACHER_RECIPE.split() + [
            f"--out_dir={os.path.join(folder, 'teacher')}"]
    for path in [p for p in (config.init_from, config.teacher) if p]:
        if not os.path.isdir(path):
            sys.exit(f"error: {path} is not a checkpoint directory")
    commands = table_commands(folder, seeds, sft, teacher, train_flags, threads, names)
    print(f"the paper's tables: {len(needed)} starting run(s), then {len(commands)} runs, {config.jobs} at a time "
          f"with {threads} thread(s) each, into {folder}/ (each command in <run>/command.txt, its output in <run>.log)")
    run_commands(needed, config.jobs)
    run_commands(commands, config.jobs)
    text = write_tables(folder, seeds, names, (time.time() - start) / 60)
    print(text + f"\nwrote {folder}/tables.md and curves_{{{','.join(FIGURES)}}}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
