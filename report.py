"""One run, one record: the end-of-run evaluation (eval.json, its predictions, validation.json) and
report.md, and the reuse of the SFT stage's evaluation as a distillation run's "before"."""

import json
import os

from data import validation_world
from distill import teacher_messages
from evaluate import evaluate, write_evaluation
from model import num_parameters


def evaluation_settings(config):
    """evaluate()'s settings from a run's Config."""
    return dict(batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)


def reuse_sft_evaluation(config, eval_samples):
    """The evaluation before distilling is the SFT stage's own when this run's SFT stage made the starting
    checkpoint and evaluated these very samples (the same ids): copy it (eval_before.json), do not redo it."""
    sft = os.path.join(config.out_dir, "sft")
    predictions = os.path.join(sft, "eval_predictions.jsonl")
    if config.init_from != os.path.join(sft, "ckpt") or not os.path.isfile(predictions):
        return False
    records = [json.loads(line) for line in open(predictions)]
    if [r["id"] for r in records] != [s.id for s in eval_samples]:
        return False
    results = json.load(open(os.path.join(sft, "eval.json")))
    with open(os.path.join(config.out_dir, "eval_before.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k not in ("headroom", "diagnostics")}, f, indent=2)
    with open(os.path.join(config.out_dir, "eval_before_predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"before distillation: the SFT stage's evaluation of the same weights and samples ({sft}/eval.json)")
    return True


def finish(model, teacher, processor, eval_samples, config, world_size, notes, seconds, extra=None):
    """Rank 0, at the end: the final evaluation (evaluate.write_evaluation: eval.json with `extra`, its
    predictions, the cue-hint diagnostic), and report.md."""
    before_file = os.path.join(config.out_dir, "eval_before.json")
    before, before_records = None, None
    if teacher is not None and config.eval_extras and os.path.exists(before_file):  # the same samples, before distillation
        before = json.load(open(before_file))
        before_records = [json.loads(line) for line in open(before_file.replace(".json", "_predictions.jsonl"))]
    cue_hint = (lambda s: teacher_messages(s, "cues")) if any(s.cue for s in eval_samples) else None
    if not config.eval_extras or (teacher is None and not config.data):  # an embedded SFT run: headroom has it
        cue_hint = None
    _, table = write_evaluation(model, processor, eval_samples, os.path.join(config.out_dir, "eval.json"),
                                **evaluation_settings(config), diagnostic_messages=cue_hint, before=before,
                                before_records=before_records, extra=extra)
    if config.validate:  # what tables.py chooses a learning rate on: never the evaluation samples
        results = evaluate(model, processor, validation_world(config.num_validation, seed=config.seed), progress=False,
                           **evaluation_settings(config))
        results.pop("records")
        with open(os.path.join(config.out_dir, "validation.json"), "w") as f:
            json.dump(results, f, indent=2)
        notes.append(f"validation split ({config.num_validation} samples): in-domain {100 * results['in_domain_avg']:.1f}")
    for note in notes:
        print(note)
    with open(os.path.join(config.out_dir, "report.md"), "w") as f:
        f.write(f"# vicur run: {config.mode}\n\nstudent: {config.init_from or config.student}, "
                f"{num_parameters(model) / 1e6:.2f} M parameters; {config.max_steps} steps x "
                f"{config.batch_size * config.grad_accum * world_size} samples; world size {world_size}\n\n"
                f"training {seconds / 60:.1f} min\n\n## Evaluation (accuracy, %)\n\n{table}\n\nThe diagnostic "
                f"column gives the same model the cue hint in its prompt; it is never a student number.\n\n"
                + "".join(f"{n}\n\n" for n in notes))
