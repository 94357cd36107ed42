"""cues.py: the leak filter on hand-written cues, and the cue maker end to end on the tiny model (its
output loads as data, a resumed run writes the same file as an uninterrupted one, bad input names
its line)."""
import json
import os
from fractions import Fraction

import pytest

import cues
from data import load_jsonl, make_world, write_jsonl


@pytest.mark.parametrize("cue, answer, choices, leaks", [
    # numbers, as digits and as words, equal by value
    ("there are five red circles", "5", (), True),
    ("there are 5 red circles", "five", (), True),
    ("twenty-one dots in all", "21", (), True),
    ("the bar is one half shaded", "0.5", (), True),
    ("1/2 of the bar is shaded", "0.5", (), True),
    ("the bar is 0.50 long", "1/2", (), True),
    ("the side is \\frac{1}{2} m", "0.5", (), True),
    ("1,000 people", "1000", (), True),
    ("the side is 8cm", "8", (), True),
    ("sides of 3,4,5", "4", (), True),
    # the answer inside a longer number, or a word holding a digit, is not a leak
    ("segments of 12 and 25", "2", (), False),
    ("the value 2.5 is marked", "2", (), False),
    ("cells a1 and b1", "1", (), False),
    ("a ratio of 1/2", "2", (), False),
    # text answers: whole words only
    ("the square is red", "red", (), True),
    ("the square is reddish", "red", (), False),
    # multiple choice: the option's letter in an option form, or its text
    ("option (B) is drawn", "B", ["3 cm", "4 cm"], True),
    ("see choice B", "B", ["3 cm", "4 cm"], True),
    ("the label reads 4 cm", "B", ["3 cm", "4 cm"], True),
    ("the label reads 4", "B", ["3 cm", "4 cm"], True),
    ("point B lies on the circle", "B", ["3 cm", "4 cm"], False),     # diagrams label points A, B, C
    ("the label reads 3 cm", "B", ["3 cm", "4 cm"], False),
    ("it is a kite", "kite", ["square", "kite"], True),                # the answer given as the option's text
    ("it has four sides", "(B)", ["square", "kite"], False),
])
def test_leak(cue, answer, choices, leaks):
    assert (cues.leak(cue, answer, choices) is not None) == leaks


def test_numbers_in_reads_digits_fractions_and_words():
    assert cues.numbers_in("x and 8, 2.5, 1/2, three hundred, twenty one, a1") == [
        Fraction(8), Fraction(5, 2), Fraction(1, 2), Fraction(300), Fraction(21)]


def test_check_cue_rejects_empty_long_and_answering():
    sample = make_world(1)[0]
    assert cues.check_cue("  ", sample, max_words=5)[0] == "empty"
    assert cues.check_cue("a b c d e f", sample, max_words=5)[0] == "too_long"
    assert cues.check_cue("look at the left", sample, max_words=5)[0] == "accepted"
    wrong = "no" if sample.answer != "no" else "yes"                  # a final answer, not the right one
    assert cues.check_cue(f"a1 red . so the answer is {wrong} .", sample, max_words=20)[0] == "answers"
    assert cues.check_cue(f"the value is \\boxed{{{wrong}}}", sample, max_words=20)[0] == "answers"


def write_world(folder, count=6):
    path = os.path.join(folder, "data", "train.jsonl")
    os.makedirs(os.path.dirname(path))
    write_jsonl(make_world(count, seed=3), path)
    return path


def make(data, out, *flags):
    cues.main([f"--data={data}", f"--out={out}", "--tries=2", "--batch_size=2", "--max_new_tokens=12",
               "--temperature=1.0", *flags])


def test_cue_maker_end_to_end_and_resume(tmp_path):
    """Every input line comes out once, loadable, its image found from --out's own folder; the report
    counts every draw; a rerun cut after the first batch and resumed writes the same bytes."""
    data = write_world(str(tmp_path))
    full = str(tmp_path / "out" / "cues.jsonl")
    make(data, full)
    samples, skipped = load_jsonl(full)
    assert skipped == 0 and [s.id for s in samples] == [s.id for s in load_jsonl(data)[0]]
    report = json.load(open(full + ".report.json"))
    assert sum(report["outcome"].values()) == 6
    assert 6 <= sum(report["drawn"].values()) <= 12               # 1 or 2 tries for each sample
    assert report["drawn"].get("accepted", 0) == report["outcome"].get("accepted", 0)

    resumed = str(tmp_path / "resumed.jsonl")
    lines = open(full).read().splitlines(keepends=True)
    with open(resumed, "w") as f:                                # the first batch, then half a line: a crash
        f.write("".join(lines[:2]) + lines[2][:10])
    with pytest.raises(SystemExit, match="exists"):
        make(data, resumed)
    make(data, resumed, "--resume")
    full_records = [json.loads(line) for line in lines]
    resumed_records = [json.loads(line) for line in open(resumed)]
    for record in full_records + resumed_records:                # the image path is relative to its own file
        record.pop("image")
    assert resumed_records == full_records
    make(data, resumed, "--resume")                              # nothing left: the file stays as it is
    assert len(open(resumed).read().splitlines()) == 6


def test_bad_input_names_file_and_line(tmp_path):
    data = write_world(str(tmp_path), count=2)
    with open(data, "a") as f:
        f.write('{"image": "images/nope.png", "question": "q", "answer": "1"}\n')
    with pytest.raises(SystemExit, match=r"train\.jsonl:3: image 'images/nope.png' not found"):
        make(data, str(tmp_path / "out.jsonl"))
