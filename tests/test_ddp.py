"""train.py under torchrun with two CPU ranks (gloo): the default pipeline (SFT stage, then ViCuR) runs,
and a data-parallel step equals one process with the same global batch: SFT, the sharded optimizer
(also across a resume), and on-policy distillation; the metrics too, when the ranks' data differ.

What is compared, and to what tolerance (every tolerance must hold on any x86-64 CPU):
- The promise is that N ranks compute the same step as one process. Its sharpest form is step 0's
  averaged gradient (tests/one_step.py), compared as ||g_N - g_1|| / ||g_1|| <= GRADIENT_TOL = 1e-3.
  The two differ only by float32 rounding: the ranks run other batch shapes (other padding, other
  BLAS blocking), so each sum is taken in another order. float32's unit roundoff is 6e-8; a dot
  product of K terms errs by at most K u relative to the sum of its terms' magnitudes, and a tiny
  model's backward stacks a few dozen such layers with K <= a few thousand: norm-wise ~1e-6 in
  practice, and 1e-3 keeps ~100x margin below what is a bug. The wrong variants (each rank
  dividing by its own token count; a bucket left out of the all-reduce) move it by >= 1e-2, and the
  tests assert that they are caught.
- Weights after several AdamW updates cannot be compared tightly: Adam divides by sqrt(v) + eps, so
  a weight whose gradient is a cancellation near 0 (|g| ~ eps = 1e-8, below the rounding of the sums
  that make it) moves by up to lr in either direction from rounding alone. With betas (0.9, 0.95),
  (1 - b1) < sqrt(1 - b2), so one update moves a weight by at most lr (Kingma & Ba, section 2.1):
  two runs stay within 2 lr per update of each other, plus the rounding of the weights themselves.
  That bound (weight_bound) is what run_logs_agree checks the weights against; the teeth are in the
  gradient tests and in step 1 of the logs.
- The logs: step 1's loss and gradient norm are the same sums in another order: rel 1e-4 (the
  values are O(1), the rounding O(1e-6)). Later steps start from weights that differ as above, only
  in weights whose gradient is ~0, so the loss moves at second order: rel 1e-3."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_run_the_same_steps_and_rank_zero_writes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               "train.py", "--preset=smoke", "--sft_steps=3", "--max_steps=3", "--num_eval=7", "--num_validation=10", "--threads=1",
               "--max_new_tokens=16",
               f"--out_dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout
    for folder in (tmp_path / "sft", tmp_path):
        log = [json.loads(line) for line in open(folder / "log.jsonl")]
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
        assert all(r["time_communication"] >= 0 for r in log if "loss" in r)
        assert os.path.exists(folder / "eval.json") and os.path.exists(folder / "ckpt" / "train_state.pt")
    assert os.path.exists(tmp_path / "ckpt" / "cue_recovery.pt")


# constant lr (no warm-up, no decay), so that a run stopped at step 2 and resumed is the same schedule
EQUAL = ["--max_steps=3", "--lr=1e-3", "--gap_prompts=4", "--num_train=64", "--num_eval=7", "--num_validation=10", "--max_new_tokens=8", "--warmup_steps=0",
         "--min_lr_ratio=1.0", "--threads=1", "--save_every=100"]


def launch(args, out_dir, ranks=1, port=29519):
    """python train.py (ranks=1) or torchrun with that many gloo ranks."""
    runner = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
                                 if ranks > 1 else [])
    done = subprocess.run(runner + ["train.py", f"--out_dir={out_dir}"] + EQUAL + args, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir


GRADIENT_TOL = 1e-3          # see the module docstring


def weight_bound(lr, updates):
    """How far two runs' weights may drift apart from rounding alone (module docstring): at most lr
    per AdamW update each, so 2 lr per update, plus float32 rounding of weights of size <= ~10."""
    return 2 * lr * updates + 10 * updates * 1.2e-7


def assert_same_run(reference, other, keys=("loss", "grad_norm"), lr=1e-3, updates=3):
    logs = [[json.loads(line) for line in open(folder / "log.jsonl") if '"loss"' in line] for folder in (reference, other)]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] == [1, 2, 3]
    for key in keys:
        assert logs[1][0][key] == pytest.approx(logs[0][0][key], rel=1e-4), key                  # step 1
        assert [r[key] for r in logs[1][1:]] == pytest.approx([r[key] for r in logs[0][1:]], rel=1e-3), key
    weights = [load_file(folder / "ckpt" / "model.safetensors") for folder in (reference, other)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= weight_bound(lr, updates)


def one_step(flags, out, ranks=1, wrong="", port=29541):
    """tests/one_step.py: step 0's averaged gradient and reduced metrics, in one process or on gloo ranks."""
    runner = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
                                 if ranks > 1 else [])
    done = subprocess.run(runner + [os.path.join("tests", "one_step.py"), str(out), "--threads=1"] + flags, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "VICUR_WRONG": wrong})
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def gradient_error(step, reference):
    return ((step["grad"] - reference["grad"]).norm() / reference["grad"].norm()).item()


SFT_STEP = ["--mode=sft", "--num_train=64", "--num_eval=7", "--num_validation=10", "--grad_accum=2", "--max_length=512"]


def test_an_sft_step_on_two_ranks_has_the_one_process_gradient_and_wrong_variants_do_not(tmp_path):
    """2 ranks x 2 samples x 2 micro-steps against 1 process x 4 x 2, plain and with the sharded
    optimizer; the loss is normalised by the step's global token count, so the uneven completions
    across ranks and micro-batches change nothing. The two wrong variants are caught."""
    one = one_step(SFT_STEP + ["--batch_size=4"], tmp_path / "one.pt")
    two = one_step(SFT_STEP + ["--batch_size=2"], tmp_path / "two.pt", ranks=2)
    sharded = one_step(SFT_STEP + ["--batch_size=2", "--shard_optimizer"], tmp_path / "sharded.pt", ranks=2)
    assert gradient_error(two, one) < GRADIENT_TOL and gradient_error(sharded, one) < GRADIENT_TOL
    for key in ("loss", "token_acc"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4)      # O(1) sums, reordered
    for wrong in ("own_tokens", "skip_bucket"):
        bad = one_step(SFT_STEP + ["--batch_size=2"], tmp_path / f"{wrong}.pt", ranks=2, wrong=wrong)
        assert gradient_error(bad, one) > 10 * GRADIENT_TOL, wrong


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """SFT in one process with a global batch of 4: the reference for the data-parallel runs."""
    return launch(["--mode=sft", "--batch_size=4"], tmp_path_factory.mktemp("one"))


def test_two_ranks_equal_one_process_with_the_same_global_batch(one_process, tmp_path):
    """SFT on 2 gloo ranks x 2 samples equals one process x 4 samples, same seed: the loss is
    normalised by the global token count, so uneven completions across ranks change nothing."""
    two = launch(["--mode=sft", "--batch_size=2"], tmp_path, ranks=2)
    assert_same_run(one_process, two, keys=("loss", "token_acc", "grad_norm"))


def test_the_sharded_optimizer_on_two_ranks_equals_adamw_in_one_process_and_resumes(one_process, tmp_path):
    """--shard_optimizer: each rank keeps half of the master weights and moments; the run equals the
    one-process run (whose unsharded FlatAdamW equals torch's AdamW, test_optimizer.py). A run stopped
    after step 2 and resumed from its checkpoint (all shards gathered into it) ends the same way."""
    sharded = launch(["--mode=sft", "--batch_size=2", "--shard_optimizer"], tmp_path / "full", ranks=2)
    assert_same_run(one_process, sharded)
    stopped = launch(["--mode=sft", "--batch_size=2", "--shard_optimizer", "--max_steps=2"], tmp_path / "cut", ranks=2)
    state = torch.load(stopped / "ckpt" / "train_state.pt", weights_only=True)["optimizer"]
    assert state["master"].numel() == sum(v.numel() for v in load_file(stopped / "ckpt" / "model.safetensors").values())
    shutil.copytree(stopped, tmp_path / "cut_one")
    launch(["--mode=sft", "--batch_size=2", "--shard_optimizer", "--resume"], stopped, ranks=2)
    assert_same_run(sharded, stopped)
    # the same checkpoint resumed by one process: the whole state was gathered into it
    launch(["--mode=sft", "--batch_size=4", "--resume"], tmp_path / "cut_one")
    assert_same_run(sharded, tmp_path / "cut_one")


@pytest.fixture(scope="module")
def start(tiny, tmp_path_factory):
    """The tiny random model as a checkpoint folder: the start of every distillation run here."""
    model, processor = tiny
    folder = tmp_path_factory.mktemp("start")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_distillation_on_two_ranks_equals_one_process(start, tmp_path):
    """ViCuR from the same start: every rollout is sampled from its own seeded generator, and the loss is
    a mean over the global batch's tokens, so 2 ranks x 2 prompts equal 1 process x 4 prompts: step 0's
    gradient, and a whole run of 3 steps x 2 PPO epochs (6 updates) within the AdamW bound."""
    # rollouts of different lengths (so that weighting by tokens matters), 2 micro-batches
    flags = ["--mode=vicur", f"--init_from={start}", "--cue_init=default", "--lr=1e-3",
             "--max_new_tokens=12", "--grad_accum=2"]
    step = flags + ["--num_train=64", "--num_eval=7", "--num_validation=10", "--max_new_tokens=24"]   # step 0: one rollout of 14 tokens
    one = one_step(step + ["--batch_size=2"], tmp_path / "one.pt")
    assert one["metrics"]["rollout_length"] < 24                    # so the ranks' token counts differ
    for wrong in ("", "own_tokens", "skip_bucket"):
        two = one_step(step + ["--batch_size=1"], tmp_path / f"two{wrong}.pt", ranks=2, wrong=wrong)
        assert (gradient_error(two, one) < GRADIENT_TOL) == (wrong == ""), wrong
        assert not wrong or gradient_error(two, one) > 10 * GRADIENT_TOL, wrong
    # the paper's Eq. 7 (--loss_agg=seq-mean): N is the step's sequences; 2 ranks still equal 1 process,
    # and with rollouts of 24 and 14 tokens the gradient is not the token mean's
    seq_one = one_step(step + ["--batch_size=2", "--loss_agg=seq-mean"], tmp_path / "seq_one.pt")
    seq_two = one_step(step + ["--batch_size=1", "--loss_agg=seq-mean"], tmp_path / "seq_two.pt", ranks=2)
    assert gradient_error(seq_two, seq_one) < GRADIENT_TOL < gradient_error(seq_one, one) / 10
    one = launch(flags + ["--batch_size=2", "--ppo_epochs=2"], tmp_path / "one")
    two = launch(flags + ["--batch_size=1", "--ppo_epochs=2", "--shard_optimizer"], tmp_path / "two", ranks=2)
    assert_same_run(one, two, keys=("loss", "grad_norm", "log_ratio", "rollout_length"), updates=6)
    lengths = [json.loads(line)["rollout_length"] for line in open(one / "log.jsonl") if '"rollout_length"' in line]
    assert any(0 < length < 12 for length in lengths), lengths     # some rollouts ended before the limit


def boxes_on_rank_zero_only(folder, flags):
    """The embedded world as JSONL, with boxes kept only on the rows that rank 0 of 2 draws in step 0
    (draw_rollouts' seeded draw), so that rank 1 has no cue recall to report."""
    import data
    data.main([f"--out={folder}", "--num_train=24", "--num_eval=7"])
    path = folder / "train.jsonl"
    records = [json.loads(line) for line in open(path)]
    config = train.parse_args(flags)
    keep = set()
    for micro in range(config.grad_accum):
        rng = train.step_rng(config, micro)
        drawn = [rng.randrange(len(records)) for _ in range(config.batch_size * 2)]
        keep |= set(drawn[0::2])                                    # rank 0's slice of the global batch
        rank_one = set(drawn[1::2])
    keep -= rank_one
    assert keep, "the draw gave rank 0 no row of its own; change the seed"
    with open(path, "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "boxes" or i in keep}) + "\n"
                     for i, r in enumerate(records))
    return path


def test_metrics_are_the_one_process_ones_when_only_one_rank_has_boxes(start, tmp_path):
    """Cue recall is a mean over rows with boxes; here only rank 0's rows carry boxes. Both ranks still
    make one all_reduce of the same metric names (rank 1 sends cue_recall with weight 0), and the
    result equals one process with the whole batch. Log-prob means are O(1-10) nats computed in
    float32 along other batch shapes: abs 1e-4 is ~10x their rounding; shares of rows are exact."""
    flags = ["--mode=vicur", f"--init_from={start}", "--cue_init=default", "--max_new_tokens=12", "--grad_accum=1",
             "--batch_size=2"]
    data_path = boxes_on_rank_zero_only(tmp_path / "world", flags)
    data_flags = [f"--data={data_path}", f"--eval_data={tmp_path / 'world' / 'eval.jsonl'}"]
    one = one_step(flags[:-1] + ["--batch_size=4"] + data_flags, tmp_path / "one.pt")["metrics"]
    two = one_step(flags + data_flags, tmp_path / "two.pt", ranks=2)["metrics"]
    assert set(two) == set(one) and "cue_recall" in one
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


def reduce_worker(rank, world_size, port, path):
    """Rank 1 has no cue recall and no tutored tokens in its rows: its dict lacks those keys."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    metrics = {}
    for name, mean, weight in RANK_METRICS[rank]:
        train.add_metric(metrics, name, mean, weight)
    reduced = train.reduce_metrics(metrics, ["loss", "cue_recall", "ptd_jsd", "never_seen"], world_size)
    if rank == 0:
        torch.save(reduced, path)
    dist.destroy_process_group()


RANK_METRICS = [[("loss", 0.5, 10), ("cue_recall", 0.25, 2), ("ptd_jsd", 0.125, 4)],   # (name, mean, weight)
                [("loss", 1.5, 30)]]


def test_reduce_metrics_makes_one_call_with_weight_zero_for_what_a_rank_lacks(tmp_path):
    """The missing keys are reduced as weight 0: the result is each metric's mean over the ranks that
    have it, weighted, as one process would compute it; a metric no rank has is left out. The values
    are dyadic (exact in binary), so equality is exact."""
    mp.spawn(reduce_worker, args=(2, 29651 + random.randrange(100), str(tmp_path / "reduced.pt")), nprocs=2)
    assert torch.load(tmp_path / "reduced.pt", weights_only=True) == {
        "loss": (0.5 * 10 + 1.5 * 30) / 40, "cue_recall": 0.25, "ptd_jsd": 0.125}
