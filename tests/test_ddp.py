"""train.py under torchrun with two CPU ranks (gloo): the default pipeline (SFT stage, then ViCuR);
every rank steps, rank 0 writes the record, the other rank waits for its checkpoints."""
import json
import os
import subprocess
import sys

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
