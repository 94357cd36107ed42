"""The synthetic world (determinism, consistency, hints free of the answer), the JSONL loader, batches."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from data import (CELLS, COLORS, FAMILIES, HELD_OUT_PAIRS, IMAGE_SIZE, OUT_OF_DOMAIN, ROWS, collate,
                  completion_token_ids, eval_world, load_jsonl, make_sample, make_world, student_messages,
                  world_vocabulary, write_jsonl)
from distill import PRIVILEGES, teacher_messages

import random


def recompute_answer(sample, objects):
    """Answer the question from the scene objects, independently of the generator's code path."""
    q = sample.question.split()
    def pick(words):
        color = next((w for w in words if w in COLORS), None)
        shape = next((w.rstrip("s") for w in words if w.rstrip("s") in ("circle", "square", "triangle")), None)
        return [o for o in objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]
    if sample.task in ("count", "dense_count", "novel_pair"):
        return str(len(pick(q[2:q.index("are")])))
    if sample.task == "arithmetic":
        and_at = q.index("and")
        return str(len(pick(q[2:and_at])) + len(pick(q[and_at + 1:q.index("are")])))
    if sample.task == "compare":
        than = q.index("than")
        return "yes" if len(pick(q[3:than])) > len(pick(q[than + 1:-1])) else "no"
    if sample.task == "spatial":
        (a,), (b,) = pick(q[2:4]), pick(q[-3:-1])
        if "left" in q:
            return "yes" if int(a.cell[1]) < int(b.cell[1]) else "no"
        return "yes" if ROWS.index(a.cell[0]) < ROWS.index(b.cell[0]) else "no"
    if sample.task == "attribute":
        if q[1] == "color":
            (obj,) = [o for o in objects if o.shape == q[4]]
            return obj.color
        if q[1] == "shape":
            (obj,) = [o for o in objects if o.color == q[4]]
            return obj.shape
        (obj,) = [o for o in objects if o.color == q[2] and o.shape == q[3]]
        return obj.size
    raise AssertionError(sample.task)


def test_world_is_deterministic_by_seed():
    a, b, c = make_world(30, seed=5), make_world(30, seed=5), make_world(30, seed=6)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(np.array(x.image), np.array(y.image)) for x, y in zip(a, b))
    assert [s.question + s.answer for s in a] != [s.question + s.answer for s in c]


def test_answers_boxes_and_cues_are_consistent_over_the_world():
    rng = random.Random(0)
    for i in range(700):
        task = FAMILIES[i % len(FAMILIES)]
        sample, objects = make_sample(rng, task, i, 0)
        assert recompute_answer(sample, objects) == sample.answer, sample
        assert sample.rationale.endswith(f"so the answer is {sample.answer} .")
        for x0, y0, x1, y1 in sample.boxes:
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        # every box is the box of an object the cue names by its cell
        named = set(re.findall(r"\b[a-z][0-9]\b", sample.cue))
        assert {o.cell for o in objects if o.box in sample.boxes} == named
        # each box really contains drawn (non-background) pixels
        pixels = np.array(sample.image)
        for x0, y0, x1, y1 in sample.boxes:
            assert (pixels[y0:y1, x0:x1].min(axis=-1) < 200).any()
        if task != "novel_pair":
            assert not any((o.color, o.shape) in HELD_OUT_PAIRS for o in objects)
        if task == "dense_count":
            assert len(objects) >= 6
        else:
            assert 2 <= len(objects) <= 5


@pytest.mark.parametrize("privilege", ["cues", "cues+crops"])
def test_cue_hints_never_state_the_answer(privilege):
    for sample in eval_world(700) + make_world(700, seed=3):
        chat = teacher_messages(sample, privilege)
        hint = chat[0]["content"][1]["text"].split("[Hint]:", 1)[1]
        assert sample.answer not in hint.split(), (sample.question, hint, sample.answer)
        for word in hint.split():  # no number word at all: counts are never spelled out
            assert not word.isdigit(), (hint, word)


def test_families_and_ood_split():
    world = eval_world(70)
    assert sorted({s.task for s in world}) == sorted(FAMILIES) and len(FAMILIES) == 7
    assert set(OUT_OF_DOMAIN) <= set(FAMILIES) and len(OUT_OF_DOMAIN) >= 2
    assert {s.task for s in make_world(50)}.isdisjoint(OUT_OF_DOMAIN)


def test_every_world_text_is_in_the_tiny_vocabulary(tiny):
    _, processor = tiny
    unk = processor.tokenizer.unk_token_id
    for sample in eval_world(350) + make_world(350, seed=1):
        for privilege in PRIVILEGES:
            text = teacher_messages(sample, privilege)[0]["content"][1]["text"]
            assert unk not in processor.tokenizer(text, add_special_tokens=False).input_ids, text
        assert unk not in processor.tokenizer(sample.rationale, add_special_tokens=False).input_ids
    assert len(set(world_vocabulary())) == len(world_vocabulary())


# ----------------------------------------------------------------------------- JSONL

def test_jsonl_round_trip_through_the_real_loader(tmp_path):
    samples = make_world(12, seed=2)
    write_jsonl(samples, tmp_path / "train.jsonl")
    (tmp_path / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text() + "\n\n")  # blank lines are fine
    loaded, skipped = load_jsonl(str(tmp_path / "train.jsonl"))
    assert skipped == 0 and len(loaded) == 12
    for a, b in zip(samples, loaded):
        assert (a.question, a.answer, a.rationale, a.cue, a.boxes, a.task, a.id) == \
               (b.question, b.answer, b.rationale, b.cue, b.boxes, b.task, b.id)
        assert np.array_equal(np.array(a.image), np.array(b.image))


def good_record(**changes):
    record = {"image": "img.png", "question": "how many ?", "answer": "2", "cue": "look", "boxes": [[1, 1, 5, 5]]}
    record.update(changes)
    return record


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps(good_record(question="")), "'question' must be a non-empty string"),
    (json.dumps(good_record(answer=3)), "'answer' must be a non-empty string"),
    (json.dumps(good_record(cue=["a"])), "'cue' must be a string"),
    (json.dumps(good_record(image="missing.png")), "not found"),
    (json.dumps(good_record(image="broken.png")), "cannot be read"),
    (json.dumps(good_record(boxes=[[0, 0, 50, 5]])), "not inside the 20x10 image"),
    (json.dumps(good_record(boxes=[[5, 1, 2, 4]])), "not inside"),
    (json.dumps(good_record(boxes=[[1, 2, 3]])), "not four numbers"),
    (json.dumps(good_record(boxes="0 0 1 1")), "must be a list"),
    (json.dumps(good_record(colour="red")), "unknown field"),
    (b'{"image": "img.png", "question": "\xff"}'.decode("latin-1"), "not valid UTF-8"),
]


@pytest.fixture
def jsonl_folder(tmp_path):
    Image.new("L", (20, 10), 128).save(tmp_path / "img.png")  # greyscale: converted to RGB
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_a_bad_line_names_file_line_and_reason(jsonl_folder, line, reason):
    path = jsonl_folder / "data.jsonl"
    path.write_bytes((json.dumps(good_record()) + "\n\n").encode() + line.encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as error:
        load_jsonl(str(path))
    assert f"{path}:3: " in str(error.value) and reason in str(error.value)


def test_skip_bad_skips_and_counts(jsonl_folder, capsys):
    path = jsonl_folder / "data.jsonl"
    path.write_bytes("\n".join([json.dumps(good_record())] + [line for line, _ in BAD_LINES]
                               + [json.dumps(good_record(id="last"))]).encode("latin-1") + b"\n")
    samples, skipped = load_jsonl(str(path), skip_bad=True)
    assert skipped == len(BAD_LINES) and [s.id for s in samples] == ["data.jsonl:1", "last"]
    assert samples[0].image.mode == "RGB"
    assert f"skipped {len(BAD_LINES)} bad line(s)" in capsys.readouterr().out


def test_oversized_image_is_refused(jsonl_folder, monkeypatch):
    import data
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    path = jsonl_folder / "data.jsonl"
    path.write_text(json.dumps(good_record(boxes=[])) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: .*over 100 pixels"):
        load_jsonl(str(path))


# ----------------------------------------------------------------------------- batches

def test_collate_shapes_and_completion_mask(tiny):
    model, processor = tiny
    samples = make_world(3, seed=4)
    completions = [completion_token_ids(processor, s.rationale) for s in samples]
    batch = collate(processor, [student_messages(s) for s in samples], completions)
    config = model.config
    B, L = batch["input_ids"].shape
    assert batch["attention_mask"].shape == batch["mm_token_type_ids"].shape == batch["completion_mask"].shape == (B, L)
    patches = IMAGE_SIZE // 16
    assert batch["image_grid_thw"].tolist() == [[1, patches, patches]] * 3      # 16-pixel patches
    assert batch["pixel_values"].shape == (3 * patches ** 2, 3 * 2 * 16 * 16)
    # 2x2 merge: one visual token per 32-pixel grid cell
    assert ((batch["input_ids"] == config.image_token_id).sum(-1) == len(CELLS)).all()
    assert ((batch["mm_token_type_ids"] == 1) == (batch["input_ids"] == config.image_token_id)).all()
    for row, completion in enumerate(completions):
        # left padded: the completion is exactly the last tokens of each row
        assert batch["input_ids"][row, -len(completion):].tolist() == completion
        assert batch["completion_mask"][row].sum() == len(completion)
        assert batch["completion_mask"][row, -len(completion):].all()
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits.shape[:2] == (B, L)


def test_over_long_sequence_is_a_clear_error(tiny):
    _, processor = tiny
    sample = make_world(1)[0]
    with pytest.raises(ValueError, match="exceeds max_length=10"):
        collate(processor, [student_messages(sample)], max_length=10, sample_ids=[sample.id])
