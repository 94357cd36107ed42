"""Where the OPD teacher's advantage over the base lies, on the embedded world (docs/testbed.md,
amendment 5). Two measurements:

1. KL(student || teacher) over the full vocabulary on the student's own samples (temperature 1, the
   validation split; gap.exact_gap's rollouts and KL), split by part of the rationale: in the nine-cell
   scan (up to the '.' after 'c3'), the mark decisions (the token after an object's shape: ':' marks it
   as one the question asks about, '.' does not) and the rest of the scan; what follows the scan; the
   answer word (the token after the last 'is').
2. On the evaluation samples the teacher answers right and the base wrong (greedy predictions of the
   two models on the same samples), how often the base reads every cell as the teacher does, with
   the query marks (' : red objects') stripped: there the base saw the same scene and went wrong in
   what it did with it.

    python docs/opd_diagnosis.py --student=/work/runs/sft1600_cue08/ckpt --teacher=/work/runs/sft1600/ckpt \
        --base_predictions=/work/runs/tables4/base/seed0/eval_predictions.jsonl \
        --teacher_predictions=/work/runs/tables4/teacher_eval/seed0/eval_predictions.jsonl
"""

import json
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
from data import CELLS, SHAPES, validation_world  # noqa: E402
from gap import exact_gap  # noqa: E402
from model import load_model  # noqa: E402


@dataclass
class Config:
    student: str = ""              # the base checkpoint
    teacher: str = ""              # the OPD teacher's checkpoint
    base_predictions: str = ""     # evaluate.py's eval_predictions.jsonl of the base
    teacher_predictions: str = ""  # the same of the teacher, on the same samples
    prompts: int = 256             # validation prompts for the KL split, 2 rollouts each
    threads: int = 2


def part_of_tokens(words):
    """'mark' / 'scan' / 'after' / 'answer' for each decoded token of one completion."""
    words = [w.strip() for w in words]
    end_scan = next((j + 1 for j, w in enumerate(words) if w == "." and "c3" in words[:j]), len(words))
    answer = max((j + 1 for j, w in enumerate(words) if w == "is"), default=-1)
    return ["answer" if j == answer else "after" if j >= end_scan else
            "mark" if j > 0 and words[j - 1] in SHAPES else "scan" for j in range(len(words))]


def kl_by_part(config):
    student, processor = load_model(config.student)
    teacher, _ = load_model(config.teacher)
    prompts = validation_world(config.prompts, seed=0)
    measured = exact_gap(student, teacher, processor, prompts, "none", 512, 96, rollouts=2, seed=0, per_token=True)
    sums, counts = {}, {}
    for completion, row_kl in measured["per_token"]:
        for part, value in zip(part_of_tokens([processor.tokenizer.decode([t]) for t in completion]), row_kl):
            sums[part] = sums.get(part, 0.0) + value.item()
            counts[part] = counts.get(part, 0) + 1
    total = sum(sums.values())
    print(f"KL(student || teacher) on {len(prompts)} validation prompts x 2 samples, by part:")
    for part in ("mark", "scan", "after", "answer"):
        print(f"  {part:6s} {counts[part]:6d} tokens, {100 * sums[part] / total:5.1f}% of the KL, "
              f"{sums[part] / counts[part]:.4f} nats a token")


def cells_read(prediction):
    """The nine cells as read, marks stripped; None if the scan is not complete."""
    parts = [p.strip() for p in prediction.split(" . ")]
    read = [p.split(" : ")[0] for p in parts[:len(CELLS)]]
    return read if [r.split(" ")[0] for r in read] == list(CELLS) else None


def same_reading(config):
    def rows(path):
        return [json.loads(line) for line in open(path)]
    base, teacher = rows(config.base_predictions), rows(config.teacher_predictions)
    if [b["id"] for b in base] != [t["id"] for t in teacher]:
        sys.exit("error: the two prediction files hold different samples")
    fixed = [(b, t) for b, t in zip(base, teacher) if t["correct"] and not b["correct"]]
    same = sum(cells_read(b["prediction"]) is not None and cells_read(b["prediction"]) == cells_read(t["prediction"])
               for b, t in fixed)
    print(f"teacher right, base wrong: {len(fixed)} of {len(base)} samples; the base reads all nine cells as "
          f"the teacher does in {same} ({100 * same / max(len(fixed), 1):.1f}%)")


def main(argv):
    config = cli.parse(argv, Config, "python docs/opd_diagnosis.py --student=CKPT --teacher=CKPT [...]")
    torch.set_num_threads(config.threads)
    if config.base_predictions and config.teacher_predictions:
        same_reading(config)
    if config.student and config.teacher:
        kl_by_part(config)


if __name__ == "__main__":
    main(sys.argv[1:])
