"""--teacher_ranks: 2 student ranks + 1 teacher rank (gloo) equal 2 ranks that each hold the teacher,
for OPD (a stronger teacher, a Top-K JSD loss: the teacher sends its full rows), ViCuR (the paper's
loss: only the sampled tokens' log-probs come back) and PTD-PO (the plain reference's log-probs and
the tutored rows under the hint).

The tolerance is test_ddp.py's (assert_same_run: step 1 rel 1e-4, later steps rel 1e-3, the weights
within the AdamW rounding bound), although the two runs compute the same thing: the teacher rank runs
the same forward on the same rows, at the same thread count, as the colocated teacher, and what it
sends is exact (float32 log-probs inside a float64 tensor, logits in their own dtype). Measured here,
the logs and the weights come out bitwise equal. A teacher rank that drops the hint it was asked for
(tests/teacher_sees_no_hint.py) moves step 1's loss far outside the tolerance, and is caught."""
import json
import subprocess
import sys

import pytest

from test_ddp import ROOT, assert_same_run, start  # noqa: F401  (start: the tiny model as a checkpoint)

RUN = ["--lr=1e-3", "--max_new_tokens=12", "--grad_accum=2", "--batch_size=1", "--max_steps=3", "--gap_prompts=4",
       "--num_train=64", "--num_eval=7", "--num_validation=10", "--warmup_steps=0", "--min_lr_ratio=1.0",
       "--threads=1", "--save_every=100", "--eval_extras=false"]
MODES = {"opd": ["--mode=opd", "--teacher=tiny-large", "--loss=topk_jsd", "--top_k=20"],
         "vicur": ["--mode=vicur", "--cue_init=default"],
         "ptdpo": ["--mode=ptdpo", "--num_rollouts=2", "--ptd_coef=0.5"]}


def torchrun(script, ranks, flags, out_dir, port):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                           f"--master_port={port}", script, f"--out_dir={out_dir}"] + RUN + flags,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir


@pytest.mark.parametrize("mode", list(MODES))
def test_a_teacher_on_its_own_rank_equals_a_teacher_on_every_rank(start, tmp_path, mode):  # noqa: F811
    flags = MODES[mode] + [f"--init_from={start}"]
    colocated = torchrun("train.py", 2, flags, tmp_path / "colocated", 29701)
    remote = torchrun("train.py", 3, flags + ["--teacher_ranks=1"], tmp_path / "remote", 29703)
    assert_same_run(colocated, remote, keys=("loss", "grad_norm", "log_ratio", "teacher_entropy", "privilege_gap"))
    gaps = [json.load(open(folder / "eval.json"))["distill_gap"] for folder in (colocated, remote)]
    assert gaps[1]["before"] == pytest.approx(gaps[0]["before"], rel=1e-4)   # rank 0's exact gap: full rows sent
    assert gaps[1]["after"] == pytest.approx(gaps[0]["after"], rel=1e-3)
    if mode == "vicur":
        wrong = torchrun("tests/teacher_sees_no_hint.py", 3, flags + ["--teacher_ranks=1"], tmp_path / "wrong", 29705)
        with pytest.raises(AssertionError):
            assert_same_run(colocated, wrong)


def test_teacher_ranks_needs_a_checkpoint_and_a_student_rank(start, tmp_path):  # noqa: F811
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29707",
                           "train.py", "--teacher_ranks=2", f"--init_from={start}", f"--out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "fewer teacher ranks than torchrun's 2" in done.stderr + done.stdout
