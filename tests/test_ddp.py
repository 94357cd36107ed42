"""train.py under torchrun with two CPU ranks (gloo): the default pipeline (SFT stage, then ViCuR) runs,
and a data-parallel run equals one process with the same global batch: SFT, the sharded optimizer
(also across a resume), and on-policy distillation."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_run_the_same_steps_and_rank_zero_writes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               "train.py", "--preset=smoke", "--sft_steps=3", "--max_steps=3", "--num_eval=7", "--threads=1",
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
EQUAL = ["--max_steps=3", "--num_train=64", "--num_eval=7", "--max_new_tokens=8", "--warmup_steps=0",
         "--min_lr_ratio=1.0", "--threads=1", "--save_every=100"]


def launch(args, out_dir, ranks=1, port=29519):
    """python train.py (ranks=1) or torchrun with that many gloo ranks."""
    runner = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
                                 if ranks > 1 else [])
    done = subprocess.run(runner + ["train.py", f"--out_dir={out_dir}"] + EQUAL + args, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir


def assert_same_run(reference, other, keys=("loss", "grad_norm")):
    logs = [[json.loads(line) for line in open(folder / "log.jsonl") if '"loss"' in line] for folder in (reference, other)]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] == [1, 2, 3]
    for key in keys:
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-4), key
    weights = [load_file(folder / "ckpt" / "model.safetensors") for folder in (reference, other)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4


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
    state = torch.load(stopped / "ckpt" / "train_state.pt", weights_only=False)["optimizer"]
    assert state["master"].numel() == sum(v.numel() for v in load_file(stopped / "ckpt" / "model.safetensors").values())
    shutil.copytree(stopped, tmp_path / "cut_one")
    launch(["--mode=sft", "--batch_size=2", "--shard_optimizer", "--resume"], stopped, ranks=2)
    assert_same_run(sharded, stopped)
    # the same checkpoint resumed by one process: the whole state was gathered into it
    launch(["--mode=sft", "--batch_size=4", "--resume"], tmp_path / "cut_one")
    assert_same_run(sharded, tmp_path / "cut_one")


def test_distillation_on_two_ranks_equals_one_process(tiny, tmp_path):
    """ViCuR from the same start: every rollout is sampled from its own seeded generator, and the loss is
    a mean over the global batch's tokens, so 2 ranks x 2 prompts equal 1 process x 4 prompts."""
    model, processor = tiny
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    # rollouts of different lengths (so that weighting by tokens matters), 2 micro-batches, 2 PPO epochs
    flags = ["--mode=vicur", f"--init_from={tmp_path / 'start'}", "--cue_init=default", "--lr=1e-3",
             "--max_new_tokens=12", "--grad_accum=2", "--ppo_epochs=2"]
    one = launch(flags + ["--batch_size=2"], tmp_path / "one")
    two = launch(flags + ["--batch_size=1", "--shard_optimizer"], tmp_path / "two", ranks=2)
    assert_same_run(one, two, keys=("loss", "grad_norm", "log_ratio", "rollout_length"))
    lengths = [json.loads(line)["rollout_length"] for line in open(one / "log.jsonl") if '"rollout_length"' in line]
    assert any(0 < length < 12 for length in lengths), lengths     # some rollouts ended before the limit
