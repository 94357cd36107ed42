"""train.py under torchrun with two CPU ranks (gloo): the default pipeline (SFT stage, then ViCuR);
every rank steps, rank 0 writes the record, the other rank waits for its checkpoints."""
import json
import os
import subprocess
import sys

import pytest
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


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    """SFT on 2 gloo ranks x 2 samples equals one process x 4 samples, same seed: the loss is
    normalised by the global token count, so uneven completions across ranks change nothing."""
    common = ["--mode=sft", "--max_steps=3", "--num_train=64", "--num_eval=7", "--max_new_tokens=8",
              "--warmup_steps=1", "--threads=1", "--save_every=100"]
    single = subprocess.run([sys.executable, "train.py", "--batch_size=4", f"--out_dir={tmp_path / 'one'}"] + common,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                            "train.py", "--batch_size=2", f"--out_dir={tmp_path / 'two'}"] + common,
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    logs = [[json.loads(line) for line in open(tmp_path / name / "log.jsonl")] for name in ("one", "two")]
    for key in ("loss", "token_acc", "grad_norm"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-4), key
    weights = [load_file(tmp_path / name / "ckpt" / "model.safetensors") for name in ("one", "two")]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4
