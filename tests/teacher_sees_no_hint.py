"""train.py with a deliberately wrong teacher rank, to show that test_teacher_ranks.py catches one: it
scores every request under the student's own prompt (privilege 'none'), dropping the hint it was asked for.

    python -m torch.distributed.run --nproc_per_node=3 tests/teacher_sees_no_hint.py [train.py flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import teacher_ranks  # noqa: E402
import train  # noqa: E402

honest = teacher_ranks.teacher_scores          # only a teacher rank calls it through teacher_ranks.answer
teacher_ranks.teacher_scores = lambda teacher, processor, rows, completions, privilege, *args: honest(
    teacher, processor, rows, completions, "none", *args)

if __name__ == "__main__":
    train.main(sys.argv[1:])
