"""The command line, a short real run of train.py, checkpoints and resume."""
import json
import os

import pytest
import torch

import train
from data import eval_world
from evaluate import evaluate
from model import load_model


def test_learning_rate_schedule():
    config = train.Config(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert train.learning_rate(0, config) == pytest.approx(0.1)
    assert train.learning_rate(9, config) == pytest.approx(1.0)
    assert train.learning_rate(10, config) == pytest.approx(1.0)
    assert train.learning_rate(60, config) == pytest.approx(0.55)
    assert train.learning_rate(110, config) == pytest.approx(0.1)


SHORT_RUN = ["--mode=sft", "--max_steps=40", "--lr=1e-3", "--num_train=300", "--num_eval=14", "--num_validation=10", "--batch_size=8", "--warmup_steps=5",
             "--save_every=20", "--max_new_tokens=24", "--lr=2e-3"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    train.main(SHORT_RUN + [f"--out_dir={out_dir}"])
    return out_dir


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_short_run_lowers_the_loss_and_writes_its_record(short_run):
    losses = [r["loss"] for r in read_log(short_run) if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for name in ("config.json", "eval.json", "report.md", "eval_predictions.jsonl", "ckpt/train_state.pt"):
        assert os.path.exists(os.path.join(short_run, name)), name
    results = json.load(open(os.path.join(short_run, "eval.json")))
    assert {"per_family", "in_domain_avg", "ood_avg", "overall", "baseline"} <= set(results)
    assert json.load(open(os.path.join(short_run, "config.json")))["max_steps"] == 40


def test_checkpoint_round_trip_gives_the_same_model(short_run):
    model, processor = load_model(os.path.join(short_run, "ckpt"))
    samples = eval_world(14)
    predictions = [r["prediction"] for r in evaluate(model, processor, samples, max_new_tokens=24,
                                                     progress=False)["records"]]
    saved = [json.loads(line)["prediction"] for line in open(os.path.join(short_run, "eval_predictions.jsonl"))]
    assert predictions == saved
    assert not os.path.exists(os.path.join(short_run, "ckpt.tmp"))


class Crash(Exception):
    pass


def unbroken_and_resumed(common, tmp_path, monkeypatch):
    """Run `common` to the end in tmp_path/full; in tmp_path/broken, crash right after the first
    checkpoint and --resume. -> (full folder, broken folder, their step logs)."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    train.main(common + [f"--out_dir={full}"])
    save = train.save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise Crash()
    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train.main(common + [f"--out_dir={broken}"])
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(common + [f"--out_dir={broken}", "--resume=true"])
    return full, broken, [[r for r in read_log(folder) if "loss" in r] for folder in (full, broken)]


def test_resume_gives_the_same_steps_as_a_run_that_never_stopped(tmp_path, monkeypatch):
    """Crash a run right after its step-20 checkpoint, resume it: steps 21..40 match the unbroken run."""
    common = [a for a in SHORT_RUN if not a.startswith("--max_steps")] + ["--max_steps=40", "--num_eval=7"]
    _, _, (full_log, broken_log) = unbroken_and_resumed(common, tmp_path, monkeypatch)
    assert [r["step"] for r in broken_log] == list(range(1, 21)) + list(range(21, 41))
    # the same computation in the same process and thread count, from weights, moments and RNG states
    # restored bit for bit: equal floats are expected, and a wrong RNG or moment state moves them by ~1e-2
    assert [r["loss"] for r in broken_log[20:]] == pytest.approx([r["loss"] for r in full_log[20:]], rel=1e-5)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--resume=true but .* does not exist"):
        train.main(["--mode=sft", "--resume=true", f"--out_dir={tmp_path}"])


def test_evaluate_cli_scores_a_checkpoint(short_run, tmp_path, capsys):
    import evaluate
    out = tmp_path / "eval.json"
    evaluate.main([f"--ckpt={short_run}/ckpt", "--num_eval=14", "--max_new_tokens=24", f"--out={out}"])
    printed = capsys.readouterr().out
    assert "| family | n | student (image + question) | majority baseline |" in printed
    saved = json.load(open(out))
    reference = json.load(open(os.path.join(short_run, "eval.json")))
    assert saved["per_family"] == reference["per_family"]         # the same greedy answers as the run's own
    with pytest.raises(SystemExit, match="unknown config key 'checkpoint'; known keys: against, batch_size, benchmarks, ckpt"):
        evaluate.main(["--checkpoint=x"])
    evaluate.main([f"--ckpt={short_run}", "--num_eval=14", "--max_new_tokens=24", f"--out={tmp_path / 'run.json'}"])
    assert json.load(open(tmp_path / "run.json"))["per_family"] == saved["per_family"]   # a run folder: its ckpt/
    # --against: the paired difference to another model's answers on the same samples; here its own: 0 ± 0
    evaluate.main([f"--ckpt={short_run}", "--num_eval=14", "--max_new_tokens=24", f"--out={tmp_path / 'again.json'}",
                   f"--against={tmp_path / 'eval_predictions.jsonl'}"])
    assert json.load(open(tmp_path / "again.json"))["intervals"]["delta in-domain"] == [0.0, 0.0]
    with pytest.raises(SystemExit, match="holds the answers to other samples"):
        evaluate.main([f"--ckpt={short_run}", "--num_eval=7", "--max_new_tokens=24", f"--out={tmp_path / 'x.json'}",
                       f"--against={tmp_path / 'eval_predictions.jsonl'}"])
    lines = open(tmp_path / "eval_predictions.jsonl").readlines()
    for bad, reason in [("{not json\n", "line 3: Expecting property name"), ('{"id": "x"}\n', "line 3: not an answer record")]:
        (tmp_path / "bad.jsonl").write_text("".join(lines[:2]) + bad + "".join(lines[3:]))
        with pytest.raises(SystemExit, match=f"--against=.*bad.jsonl, {reason}"):
            evaluate.main([f"--ckpt={short_run}", "--num_eval=14", "--max_new_tokens=24", f"--out={tmp_path / 'x.json'}",
                           f"--against={tmp_path / 'bad.jsonl'}"])


def test_training_on_jsonl_files_goes_through_the_real_loader(tmp_path):
    import data
    data.main([f"--out={tmp_path / 'world'}", "--num_train=40", "--num_eval=7"])
    out_dir = tmp_path / "run"
    train.main(["--mode=sft", f"--data={tmp_path / 'world' / 'train.jsonl'}", f"--eval_data={tmp_path / 'world' / 'eval.jsonl'}",
                "--max_steps=2", "--batch_size=4", "--max_new_tokens=8", f"--out_dir={out_dir}"])
    results = json.load(open(out_dir / "eval.json"))
    assert sum(results["counts"].values()) == 7 and len(results["per_family"]) == 7


def test_a_resumed_self_distillation_keeps_the_starting_teacher(tiny, tmp_path):
    """--teacher=self is the student as it started, also when a later run resumes from a trained checkpoint."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    trained, _ = load_model(str(tmp_path))
    with torch.no_grad():
        trained.lm_head.weight.add_(1.0)                  # the student has moved since the start
    for resume in (False, True):
        config = train.Config(mode="opsd", teacher="self", init_from=str(tmp_path), resume=resume)
        teacher = train.load_teacher(config, model if not resume else trained, processor)
        assert torch.equal(teacher.lm_head.weight, model.lm_head.weight)
        assert not any(p.requires_grad for p in teacher.parameters())


DISTILL_METRICS = {"loss", "log_ratio", "clip_frac", "student_entropy", "teacher_entropy", "rollout_length", "reward",
                   "privilege_gap", "hint_leakage", "time_sample", "time_teacher", "time_student",
                   "time_communication", "time_optimizer"}


@pytest.mark.parametrize("flags", [
    ["--mode=opsd", "--num_rollouts=2", "--ppo_epochs=2"],                      # the paper's loss, PPO epochs
    ["--mode=opsd", "--privilege=cues", "--loss=topk_jsd", "--top_k=5"],         # a full divergence
    ["--mode=opd", "--teacher=tiny-large", "--loss=jsd", "--beta=0.3"],          # another model as teacher
    # the paper's component ablation, one flag each: the cue hint without the module, the module with the
    # answer hint, both (full ViCuR); the answer hint alone is the first case (opsd); and OPD + ViCuR
    ["--mode=vicur", "--cue_recovery=false"],
    ["--mode=vicur", "--privilege=answer"],
    ["--mode=vicur"],
    ["--mode=vicur", "--teacher=tiny-large"],
    # PTD-PO and its comparison, plain GRPO (with the reference KL)
    ["--mode=ptdpo", "--num_rollouts=2"],
    ["--mode=ptdpo", "--num_rollouts=2", "--ptd_coef=0", "--kl_coef=0.1"],
])
def test_distillation_modes_run_end_to_end(flags, tmp_path):
    train.main(flags + ["--sft_steps=2", "--max_steps=2", "--batch_size=2", "--max_new_tokens=8", "--num_eval=7", "--num_validation=10",
                        "--warmup_steps=1", "--gap_prompts=8", f"--out_dir={tmp_path}"])
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    log = [r for r in records if "loss" in r]
    assert [r["step"] for r in log] == [1, 2]
    assert all(DISTILL_METRICS <= set(r) for r in log)
    assert [r["step"] for r in records if "distill_gap" in r] == [0, 2]        # before and after
    gap = json.load(open(tmp_path / "eval.json"))["distill_gap"]
    assert set(gap) == {"before", "after", "before_se", "after_se", "change", "change_se"} and gap["before_se"] > 0
    assert gap["change"] == pytest.approx(gap["after"] - gap["before"], abs=1e-12)
    assert all(r["rollout_length"] > 0 for r in log)
    assert os.path.exists(tmp_path / "eval_before.json") and os.path.exists(tmp_path / "eval.json")
    # the SFT stage measured its headroom on the validation split; its evaluation is the one before distilling
    sft = json.load(open(tmp_path / "sft" / "eval.json"))
    assert set(sft["headroom"]["criteria"]) == {"base - majority answer", "base + cue hint - base",
                                                "base + answer hint - base"} and sft["headroom"]["samples"] == 10
    assert json.load(open(tmp_path / "eval_before.json"))["per_family"] == sft["per_family"]
    assert open(tmp_path / "eval_before_predictions.jsonl").read() == open(tmp_path / "sft" / "eval_predictions.jsonl").read()
    if "--mode=opd" in flags:
        assert all(r["privilege_gap"] == 0 for r in log)
    if "--mode=ptdpo" in flags:
        assert all({"failed_share", "gated_share", "ptd_jsd", "kl_ref"} <= set(r) for r in log)
    config = json.load(open(tmp_path / "config.json"))
    assert config["init_from"] == str(tmp_path / "sft" / "ckpt")                  # the SFT stage ran first
    with_module = config["mode"] == "vicur" and config["cue_recovery"]
    assert os.path.exists(tmp_path / "ckpt" / "cue_recovery.pt") == with_module
    assert ("cue_recall" in json.load(open(tmp_path / "eval.json"))) == with_module
    assert all(("cue_recall" in r) == with_module for r in log)                # the sink's attention, each step


def test_the_default_pipeline_reuses_a_complete_sft_stage(tmp_path, capsys):
    """A distillation mode from a tiny student runs SFT first; a second run reuses it, a changed
    SFT setting runs it again."""
    assert train.parse_args([]).mode == "vicur" and train.parse_args([]).lr == train.Config.lr
    flags = ["--sft_steps=2", "--max_steps=1", "--batch_size=2", "--max_new_tokens=8", "--num_eval=7", "--num_validation=10", "--gap_prompts=4",
             "--warmup_steps=1", f"--out_dir={tmp_path}"]
    train.main(flags)
    assert "SFT stage: 2 steps" in capsys.readouterr().out
    train.main(flags)
    assert "SFT stage: reusing the complete run" in capsys.readouterr().out
    train.main(flags + ["--sft_describe_frac=0.5"])
    assert "SFT stage: 2 steps" in capsys.readouterr().out


def test_a_vicur_run_resumes_like_one_that_never_stopped(tiny, tmp_path, monkeypatch):
    """The module is saved with the checkpoint and restored on --resume; the self teacher is
    reloaded from --init_from (without a module): steps after the crash match the unbroken run."""
    model, processor = tiny
    start = tmp_path / "start"
    model.save_pretrained(start)
    processor.save_pretrained(start)
    common = ["--mode=vicur", f"--init_from={start}", "--max_steps=4", "--save_every=2", "--batch_size=2", "--gap_prompts=4",
              "--max_new_tokens=8", "--num_eval=7", "--num_validation=10", "--num_train=50", "--warmup_steps=1", "--cue_init=default"]
    full, broken, (full_log, broken_log) = unbroken_and_resumed(common, tmp_path, monkeypatch)
    assert [r["step"] for r in broken_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in broken_log[2:]] == pytest.approx([r["loss"] for r in full_log[2:]], rel=1e-5)
    recalls = [json.load(open(folder / "eval.json"))["cue_recall"]["recall"] for folder in (full, broken)]
    assert recalls[0] == pytest.approx(recalls[1], rel=1e-5)


def test_pipeline_errors_and_the_sft_stage_of_ptdpo(tmp_path):
    with pytest.raises(SystemExit, match="--num_rollouts must be at least 2"):
        train.main(["--mode=ptdpo", "--num_rollouts=1", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="neither .*/ckpt nor .*/sft/ckpt exists"):
        train.main(["--resume=true", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="--validate evaluates on the validation split, but --num_validation=0"):
        train.main(["--validate", "--num_validation=0", f"--out_dir={tmp_path}"])
    # the SFT stage is a Config of its own: its sft_* schedule, none of PTD-PO's groups; config.json
    # of each run is the config that ran
    captured = {}
    original = train.train
    try:
        train.train = lambda config, rank, world_size: captured.setdefault(config.mode, config)
        train.main(["--mode=ptdpo", "--num_rollouts=8", "--batch_size=4", f"--out_dir={tmp_path}"])
    finally:
        train.train = original
    sft, config = captured["sft"], train.Config()
    assert (sft.batch_size, sft.num_rollouts, sft.max_steps, sft.lr, sft.warmup_steps) == (
        config.sft_batch_size, 1, config.sft_steps, config.sft_lr, config.sft_warmup_steps)
    assert (captured["ptdpo"].batch_size, captured["ptdpo"].num_rollouts) == (4, 8)


def test_a_vicur_run_on_data_without_boxes_ends_cleanly(tmp_path):
    import data
    data.main([f"--out={tmp_path / 'world'}", "--num_train=30", "--num_eval=7"])
    for name in ("train", "eval"):                               # drop the boxes, keep the cues
        path = tmp_path / "world" / f"{name}.jsonl"
        records = [json.loads(line) for line in open(path)]
        with open(path, "w") as f:
            f.writelines(json.dumps({k: v for k, v in r.items() if k != "boxes"}) + "\n" for r in records)
    train.main([f"--data={tmp_path / 'world' / 'train.jsonl'}", f"--eval_data={tmp_path / 'world' / 'eval.jsonl'}", "--gap_prompts=4",
                "--sft_steps=2", "--max_steps=2", "--batch_size=2", "--max_new_tokens=8", f"--out_dir={tmp_path / 'run'}"])
    results = json.load(open(tmp_path / "run" / "eval.json"))
    assert "cue_recall" not in results and os.path.exists(tmp_path / "run" / "report.md")


def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(tmp_path):
    """SIGKILL a real process once its first checkpoint is on disk, --resume it: every step after that
    checkpoint has the loss of a run that never stopped (the last entry of a step counts: a killed
    run may have logged steps past its checkpoint)."""
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = [sys.executable, "train.py", "--mode=sft", "--max_steps=30", "--save_every=5", "--num_train=64",
              "--num_eval=7", "--num_validation=10", "--batch_size=2", "--max_new_tokens=8", "--warmup_steps=2", "--threads=1"]
    subprocess.run(common + [f"--out_dir={tmp_path / 'full'}"], cwd=root, check=True, capture_output=True)
    broken = tmp_path / "broken"
    process = subprocess.Popen(common + [f"--out_dir={broken}"], cwd=root, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state = broken / "ckpt" / "train_state.pt"
    while not state.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL                    # it died mid-run, not at the end
    saved_step = torch.load(state, weights_only=True)["step"]
    assert saved_step < 30
    subprocess.run(common + [f"--out_dir={broken}", "--resume=true"], cwd=root, check=True, capture_output=True)
    full = {r["step"]: r["loss"] for r in read_log(tmp_path / "full") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_log(broken) if "loss" in r}
    assert sorted(resumed) == list(range(1, 31))
    after = range(saved_step + 1, 31)
    assert [resumed[s] for s in after] == pytest.approx([full[s] for s in after], rel=1e-5)


def test_resume_finds_the_checkpoint_of_a_run_killed_between_the_two_renames(tmp_path):
    """save_checkpoint renames ckpt -> ckpt.old, then ckpt.tmp -> ckpt: a kill in between leaves only
    ckpt.old, which --resume uses."""
    args = [a for a in SHORT_RUN if not a.startswith("--max_steps")]
    train.main(args + ["--max_steps=20", f"--out_dir={tmp_path}"])
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")
    train.main(args + ["--max_steps=22", f"--out_dir={tmp_path}", "--resume=true"])
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r][-2:] == [21, 22]
    assert not os.path.exists(tmp_path / "ckpt.old")


def test_dry_run_prints_the_memory_plan_of_both_presets(capsys, monkeypatch):
    from model import parameter_counts, tiny_processor
    tokenizer = tiny_processor().tokenizer
    # the shapes give the published sizes: Qwen3-VL-2B 2.13 B, 8B 8.77 B parameters
    assert round(parameter_counts("Qwen/Qwen3-VL-2B-Instruct", tokenizer)[0] / 1e9, 2) == 2.13
    assert round(parameter_counts("Qwen/Qwen3-VL-8B-Instruct", tokenizer)[0] / 1e9, 2) == 8.77
    monkeypatch.setenv("WORLD_SIZE", "8")
    for preset, weights_gib in (("qwen3vl-2b", 2.13e9 * 2 / 2**30), ("qwen3vl-8b", 8.77e9 * 2 / 2**30)):
        train.main([f"--preset={preset}", "--dry_run"])
        printed = capsys.readouterr().out
        assert "memory plan" in printed and "world size 8" in printed and "(global batch 128)" in printed
        line = next(l for l in printed.splitlines() if "student weights" in l)
        assert float(line.split()[-2]) == pytest.approx(weights_gib, abs=0.06)
        assert "total" in printed and "80 GB card" in printed
    assert train.parse_args(["--resume"]).resume is True


def test_dry_run_prints_both_roles_with_the_teacher_on_its_own_ranks(capsys, monkeypatch):
    """8B student + 32B teacher: on every rank it does not fit on 80 GB; on 4 + 4 ranks both roles fit."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    flags = ["--preset=qwen3vl-8b", "--mode=opd", "--teacher=Qwen/Qwen3-VL-32B-Instruct", "--dry_run"]
    train.main(flags)
    assert "does NOT fit" in capsys.readouterr().out
    train.main(flags + ["--teacher_ranks=4"])
    printed = capsys.readouterr().out
    assert "(4 student + 4 teacher ranks)" in printed and " a student rank:" in printed and " a teacher rank:" in printed
    totals = [float(l.split()[-2]) for l in printed.splitlines() if l.strip().startswith("total")]
    assert len(totals) == 2 and max(totals) < 80e9 / 2**30 and "does NOT fit" not in printed


def test_rollouts_sampled_in_chunks_reach_each_micro_batch_as_sampled_one_micro_batch_at_a_time(tiny, monkeypatch):
    """draw_rollouts samples a step's prompts together, rollout_batch_size at a time; each micro-batch
    must get its own prompts and, row for row, the rollouts of its own generators. A stand-in sampler
    makes each row's tokens, length and log-probs a function of that row's generator alone, so the
    comparison is exact (the real sampler's rows agree across batch shapes up to float rounding)."""
    from rollout import Rollout
    from data import make_world

    def fake_sampler(model, processor, batch, n=1, generator=None, **settings):
        assert len(generator) == batch["input_ids"].shape[0] * n
        seeds = [g.initial_seed() for g in generator]
        lengths = [1 + seed % 5 for seed in seeds]                         # rows of different lengths
        width = max(lengths)
        ids = torch.tensor([[seed % 97 if t < length else 0 for t in range(width)] for seed, length in zip(seeds, lengths)])
        mask = torch.tensor([[int(t < length) for t in range(width)] for length in lengths])
        logprobs = -mask * (torch.tensor(seeds)[:, None] % 7 + 1).double()  # a row's own values, 0 where masked
        return Rollout(completion_ids=ids, completion_mask=mask, logprobs=logprobs, texts=[str(seed) for seed in seeds])
    monkeypatch.setattr(train, "sample_completions", fake_sampler)
    model, processor = tiny
    samples = make_world(20, seed=1)
    config = train.Config(batch_size=3, grad_accum=2, num_rollouts=2)

    def drawn(rollout_batch_size):
        config.rollout_batch_size = rollout_batch_size
        return train.draw_rollouts(model, processor, samples, 5, 0, 1, config)
    reference = drawn(3)                                   # one micro-batch at a time, as before
    for size in (0, 1, 2, 4):
        for (rows, rollout, completions), (ref_rows, ref_rollout, ref_completions) in zip(drawn(size), reference):
            assert [s.id for s in rows] == [s.id for s in ref_rows] and completions == ref_completions
            assert rollout.texts == ref_rollout.texts
            mask = rollout.completion_mask.bool()
            assert torch.equal(rollout.logprobs[mask], ref_rollout.logprobs[mask])
    # the micro-batches are the seeded draws of steps 10 and 11 (step 5 x grad_accum 2): 3 prompts x 2 each
    assert [len(rows) for rows, _, _ in reference] == [6, 6]
    assert [s.id for s in reference[0][0][::2]] == [s.id for s in train.step_prompts(samples, 10, 0, 1, config)[0]]
    assert [s.id for s in reference[1][0][::2]] == [s.id for s in train.step_prompts(samples, 11, 0, 1, config)[0]]


def test_an_sft_run_without_a_validation_split_skips_its_headroom(tmp_path):
    train.main(["--mode=sft", "--max_steps=1", "--num_train=8", "--num_eval=7", "--num_validation=0", "--batch_size=2",
                "--max_new_tokens=8", "--warmup_steps=0", f"--out_dir={tmp_path}"])
    with open(tmp_path / "eval.json") as f:
        assert "headroom" not in json.load(f)
