"""On-policy distillation: privileged-teacher prompts, teacher scoring, divergences, losses.

The teacher sees the student's prompt plus one privileged slot after the question,
`[Hint]: ...` (the format of the paper and of OPSD):
    none       the student's own prompt (a stronger teacher needs no privilege: OPD)
    answer     the reference answer (OPSD)
    rationale  the reference reasoning, answer included (OPSD's variant)
    cues       the visual cue: where the question-relevant objects are, never the answer (ViCuR)
    cues+crops the cue text plus crops of the cue's boxes as extra images (crop privilege)
"""

from data import student_messages, user_message

PRIVILEGES = ["none", "answer", "rationale", "cues", "cues+crops"]


def hint_text(sample, privilege):
    """The text of the [Hint] slot, or None when the sample has nothing of that kind."""
    if privilege == "answer":
        return sample.answer
    if privilege == "rationale":
        return sample.rationale
    if privilege in ("cues", "cues+crops"):
        return sample.cue
    return None


def teacher_messages(sample, privilege):
    """The teacher's chat: the student's, with `[Hint]: <privileged text>` after the question.
    A sample without that privilege (no cue, no rationale) gets the plain student prompt."""
    if privilege not in PRIVILEGES:
        raise ValueError(f"unknown privilege '{privilege}'; known: {PRIVILEGES}")
    hint = hint_text(sample, privilege)
    if hint is None:
        return student_messages(sample)
    crops = [sample.image.crop(tuple(int(round(v)) for v in box)) for box in sample.boxes] \
        if privilege == "cues+crops" else []
    return [user_message([sample.image], f"{sample.question} [Hint]: {hint}", extra_images=crops)]
