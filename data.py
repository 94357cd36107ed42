"""Samples, the embedded synthetic visual world, JSONL loading, prompts and batching.

The embedded world is a 3x3 grid of 32-pixel cells (96x96 pixels), so each of the
9 merged visual tokens of the tiny Qwen3-VL (16-pixel patches, 2x2 merge) covers exactly
one cell. Cells are named by row letter and column number, a1 (top left) .. c3 (bottom
right). Every object sits in its own cell and has a colour, a shape and a size.

Seven task families stand in for the paper's seven benchmarks:
    in-domain:     count, attribute, spatial, compare, arithmetic
    out-of-domain: dense_count  (counting in scenes with 6-8 objects; training has 2-5)
                   novel_pair   (counting colour-shape pairs never drawn in training)
Each sample carries its visual cue (where the relevant objects are, never the answer),
the boxes of those objects, and a rationale that walks through them to the answer.
"""

import json
import math
import os
import random
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

import cli

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"big": 13, "small": 8}  # half-width in pixels
GRID, CELL = 3, 32
IMAGE_SIZE = GRID * CELL
ROWS = "abc"
CELLS = [f"{r}{c + 1}" for r in ROWS for c in range(GRID)]
HELD_OUT_PAIRS = [("yellow", "triangle"), ("blue", "circle")]  # never drawn in in-domain scenes
IN_DOMAIN = ["count", "attribute", "spatial", "compare", "arithmetic"]
OUT_OF_DOMAIN = ["dense_count", "novel_pair"]
FAMILIES = IN_DOMAIN + OUT_OF_DOMAIN
BENCHMARKS = {  # name: (file in the benchmarks folder, the paper's group, the paper's column title)
    "vision_r1": ("vision_r1_test.jsonl", "in-domain", "Vision R1-Test"),
    "dynamath": ("DynaMath.tsv", "near-domain", "DynaMath"),
    "mathvista": ("MathVista_MINI.tsv", "near-domain", "MathVista"),
    "wemath": ("WeMath.tsv", "near-domain", "WeMath"),
    "mathverse": ("MathVerse_MINI.tsv", "near-domain", "MathVerse"),
    "mmmu": ("MMMU_DEV_VAL.tsv", "out-of-domain", "MMMU-Val"),
    "video_mme": ("Video-MME.tsv", "out-of-domain", "Video-MME"),
}
EVAL_SEED_OFFSET = 1_000_000
EVAL_SAMPLES = 2800  # 400 a family: 2,000 in-domain, so a paired difference's standard error is under a point
VALIDATION_SEED_OFFSET = 2_000_000  # the validation split: another seed range, in-domain families
VALIDATION_SAMPLES = 2000  # 400 an in-domain family: the testbed's headroom and the learning-rate choice
MAX_IMAGE_PIXELS = 40_000_000  # a larger image is almost surely a mistake in the data


@dataclass
class Sample:
    image: Image.Image | list[Image.Image] | None  # a list for several images; None for a video question
    question: str
    answer: str
    rationale: str | None = None
    cue: str | None = None  # the question-relevant visual evidence as text, never the answer
    boxes: list[list[float]] = field(default_factory=list)  # [x0, y0, x1, y1] pixels
    task: str = "default"
    id: str = ""
    video: str | None = None                # a folder of a video's frames (load_frames); then image is None
    choices: list[str] = field(default_factory=list)  # multiple choice: the options' texts, A first
    tolerance: float = 0.0                  # a numeric answer within this distance of `answer` is right


# ----------------------------------------------------------------------------- the world

@dataclass
class Obj:
    color: str
    shape: str
    size: str
    cell: str

    @property
    def box(self):
        row, col = ROWS.index(self.cell[0]), int(self.cell[1]) - 1
        cx, cy, half = col * CELL + CELL // 2, row * CELL + CELL // 2, SIZES[self.size]
        return [cx - half, cy - half, cx + half, cy + half]


def plural(shape):
    return shape + "s"


def render(objects):
    """Draw the scene: white background, faint grid, one shape per occupied cell."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i in range(1, GRID):
        draw.line([(i * CELL, 0), (i * CELL, IMAGE_SIZE)], fill=(225, 225, 225))
        draw.line([(0, i * CELL), (IMAGE_SIZE, i * CELL)], fill=(225, 225, 225))
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def random_scene(rng, num_objects, allow_held_out):
    pairs = [(c, s) for c in COLORS for s in SHAPES if allow_held_out or (c, s) not in HELD_OUT_PAIRS]
    cells = rng.sample(CELLS, num_objects)
    return [Obj(*rng.choice(pairs), rng.choice(list(SIZES)), cell) for cell in sorted(cells)]


def cells_text(objs):
    return " ".join(o.cell for o in objs) if objs else "none"


def matches(obj, color=None, shape=None):
    return (color is None or obj.color == color) and (shape is None or obj.shape == shape)


def describe(color, shape):
    """Plural noun phrase: 'red circles', 'circles', 'red objects'."""
    return f"{color + ' ' if color else ''}{plural(shape) if shape else 'objects'}"


def count_question(rng, objects, pairs_only=None):
    """'how many X are there ?' with X a colour, a shape or both."""
    if pairs_only:
        color, shape = rng.choice(pairs_only)
    else:
        obj = rng.choice(objects)
        color, shape = rng.choice([(obj.color, None), (None, obj.shape), (obj.color, obj.shape)])
        if rng.random() < 0.2:  # sometimes ask for a pair that may be absent (never a held-out one)
            color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS])
    found = [o for o in objects if matches(o, color, shape)]
    what = describe(color, shape)
    return (f"how many {what} are there ?", str(len(found)), [(what, found)],
            f"{what} : {cells_text(found)} .", f"the {what} are at : {cells_text(found)}")


def unique_objects(objects, key):
    values = [key(o) for o in objects]
    return [o for o in objects if values.count(key(o)) == 1]


def attribute_question(rng, objects):
    """Colour of the only <shape>, shape of the only <colour> object, or size of one object."""
    kinds = []
    if unique_objects(objects, lambda o: o.shape):
        kinds.append("color")
    if unique_objects(objects, lambda o: o.color):
        kinds.append("shape")
    if unique_objects(objects, lambda o: (o.color, o.shape)):
        kinds.append("size")
    if not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "color":
        obj = rng.choice(unique_objects(objects, lambda o: o.shape))
        question, name, answer = f"what color is the {obj.shape} ?", f"the {obj.shape}", obj.color
    elif kind == "shape":
        obj = rng.choice(unique_objects(objects, lambda o: o.color))
        question, name, answer = f"what shape is the {obj.color} object ?", f"the {obj.color} object", obj.shape
    else:
        obj = rng.choice(unique_objects(objects, lambda o: (o.color, o.shape)))
        question, name, answer = f"is the {obj.color} {obj.shape} big or small ?", f"the {obj.color} {obj.shape}", obj.size
    return (question, answer, [(name, [obj])], f"{name} is at {obj.cell} . it is {answer} .", f"{name} is at {obj.cell}")


def spatial_question(rng, objects):
    """Is the A left of / above the B (A and B unique colour-shape pairs)?"""
    unique = unique_objects(objects, lambda o: (o.color, o.shape))
    if len(unique) < 2:
        return None
    first, second = rng.sample(unique, 2)
    relation = rng.choice(["left of", "above"])
    if relation == "left of":
        first_at, second_at, axis = int(first.cell[1]), int(second.cell[1]), "column"
    else:
        first_at, second_at, axis = ROWS.index(first.cell[0]), ROWS.index(second.cell[0]), "row"
    holds = first_at < second_at
    a, b = f"the {first.color} {first.shape}", f"the {second.color} {second.shape}"
    where = f"{a} is at {first.cell} . {b} is at {second.cell}"
    names = (first.cell[1], second.cell[1]) if axis == "column" else (first.cell[0], second.cell[0])
    steps = f"{where} . {axis} {names[0]} is {'' if holds else 'not '}{relation} {axis} {names[1]} ."
    return f"is {a} {relation} {b} ?", "yes" if holds else "no", [(a, [first]), (b, [second])], steps, where


def two_groups(rng, objects):
    """Two disjoint groups by colour or by shape: ((color, shape), (color, shape))."""
    if rng.random() < 0.5:
        c1, c2 = rng.sample(list(COLORS), 2)
        return (c1, None), (c2, None)
    s1, s2 = rng.sample(SHAPES, 2)
    return (None, s1), (None, s2)


def compare_question(rng, objects):
    (c1, s1), (c2, s2) = two_groups(rng, objects)
    group1 = [o for o in objects if matches(o, c1, s1)]
    group2 = [o for o in objects if matches(o, c2, s2)]
    if len(group1) == len(group2) and rng.random() < 0.7:  # keep ties rarer
        return None
    w1, w2 = describe(c1, s1), describe(c2, s2)
    where = f"{w1} : {cells_text(group1)} . {w2} : {cells_text(group2)}"
    more = len(group1) > len(group2)
    steps = f"{where} . {len(group1)} is {'' if more else 'not '}more than {len(group2)} ."
    return (f"are there more {w1} than {w2} ?", "yes" if len(group1) > len(group2) else "no",
            [(w1, group1), (w2, group2)], steps, where)


def arithmetic_question(rng, objects):
    (c1, s1), (c2, s2) = two_groups(rng, objects)
    group1 = [o for o in objects if matches(o, c1, s1)]
    group2 = [o for o in objects if matches(o, c2, s2)]
    w1, w2 = describe(c1, s1), describe(c2, s2)
    where = f"{w1} : {cells_text(group1)} . {w2} : {cells_text(group2)}"
    total = len(group1) + len(group2)
    steps = f"{where} . {len(group1)} plus {len(group2)} is {total} ."
    return f"how many {w1} and {w2} are there in total ?", str(total), [(w1, group1), (w2, group2)], steps, where


def make_sample(rng, task, index, seed):
    """One sample of a task family; retries scenes until the family's question exists."""
    while True:
        if task == "dense_count":
            objects = random_scene(rng, rng.randint(6, 8), allow_held_out=False)
            made = count_question(rng, objects)
        elif task == "novel_pair":
            objects = random_scene(rng, rng.randint(2, 5), allow_held_out=True)
            present = [p for p in HELD_OUT_PAIRS if any(matches(o, *p) for o in objects)]
            made = count_question(rng, objects, pairs_only=present) if present else None
        else:
            objects = random_scene(rng, rng.randint(2, 5), allow_held_out=False)
            make = {"count": count_question, "attribute": attribute_question, "spatial": spatial_question,
                    "compare": compare_question, "arithmetic": arithmetic_question}[task]
            made = make(rng, objects)
        if made is not None:
            break
    question, answer, groups, steps, cue = made
    relevant = [o for _, group in groups for o in group]
    marks = {o.cell: name for name, group in groups for o in group}
    steps = grid_scan(objects, marks) + " . " + steps  # look at every cell first, then reason over what was seen
    return Sample(image=render(objects), question=question, answer=answer,
                  rationale=f"{steps} so the answer is {answer} .", cue=cue,
                  boxes=[o.box for o in relevant], task=task, id=f"{task}-{seed}-{index}"), objects


def make_world(num_samples, seed=0, families=IN_DOMAIN):
    """A deterministic list of samples, families in round-robin order."""
    rng = random.Random(seed)
    return [make_sample(rng, families[i % len(families)], i, seed)[0] for i in range(num_samples)]


def eval_world(num_samples, seed=0):
    """The evaluation set: all seven families, from a seed range training never uses."""
    return make_world(num_samples, seed=EVAL_SEED_OFFSET + seed, families=FAMILIES)


def validation_world(num_samples, seed=0):
    """The validation split: in-domain families from a seed range neither training nor evaluation uses
    (the testbed's headroom, the learning-rate choice, the prompts of the exact distillation gap)."""
    return make_world(num_samples, seed=VALIDATION_SEED_OFFSET + seed)


def grid_scan(objects, marks=None):
    """Every cell in reading order with what it holds, and which of the question's groups an object
    belongs to: 'a1 big red circle : red objects . a2 none . a3 small blue square . ...'.
    Marking membership where the object is seen keeps each reasoning step local: a tiny model that
    read every cell right still failed to pick the matching cells back out of an unmarked scan."""
    by_cell, marks = {o.cell: o for o in objects}, marks or {}
    seen = [f"{c} {by_cell[c].size} {by_cell[c].color} {by_cell[c].shape}" if c in by_cell else f"{c} none"
            for c in CELLS]
    return " . ".join(f"{text} : {marks[c]}" if c in marks else text for text, c in zip(seen, CELLS))


def describe_sample(rng, index, seed):
    """The dense grounded auxiliary task used in SFT: say what every cell holds."""
    objects = random_scene(rng, rng.randint(2, 5), allow_held_out=False)
    listing = grid_scan(objects)
    return Sample(image=render(objects), question="describe the image .", answer=listing,
                  rationale=listing + " .", task="describe", id=f"describe-{seed}-{index}")


def world_vocabulary():
    """Every word the embedded world, its hints and the chat template can produce."""
    words = ["user", "assistant", "system", "[", "]:", "Hint", ":", ".", "?", "so", "the", "answer", "is",
             "how", "many", "are", "there", "in", "total", "and", "what", "color", "shape", "object", "objects",
             "big", "or", "small", "left", "of", "above", "at", "it", "more", "than", "against", "plus", "yes",
             "no", "none", "describe", "image", "look", "crops", "You", "a", "helpful", "Answer", "with",
             "reason", "step", "by", "then", "give", "final", "row", "column", "not"]
    words += list(COLORS) + SHAPES + [plural(s) for s in SHAPES] + CELLS + list(ROWS) + [str(n) for n in range(33)]
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------- files

def write_jsonl(samples, path):
    """Write samples in the on-disk format: images next to the JSONL, paths relative to it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(path, "w") as f:
        for i, sample in enumerate(samples):
            if not isinstance(sample.image, Image.Image):
                raise ValueError(f"write_jsonl writes one image per sample; sample {sample.id or i} has "
                                 f"{'a video' if sample.video else type(sample.image).__name__}")
            name = f"images/{sample.id or i}.png"
            sample.image.save(os.path.join(folder, name))
            record = {"image": name, "question": sample.question, "answer": sample.answer,
                      "rationale": sample.rationale, "cue": sample.cue, "boxes": sample.boxes,
                      "task": sample.task, "id": sample.id,
                      **({"choices": sample.choices} if sample.choices else {}),
                      **({"tolerance": sample.tolerance} if sample.tolerance else {})}
            f.write(json.dumps(record) + "\n")


def parse_record(line, folder):
    """One JSONL line -> Sample; raises ValueError with the reason."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("image", "question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"field '{key}' must be a non-empty string")
    for key in ("rationale", "cue", "task", "id"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"field '{key}' must be a string, got {type(record[key]).__name__}")
    choices = record.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError("field 'choices' must be a list of strings (the options' texts, A first)")
    tolerance = record.get("tolerance") or 0.0
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"field 'tolerance' must be a number >= 0, got {tolerance!r}")
    unknown = set(record) - {"image", "question", "answer", "rationale", "cue", "boxes", "task", "id", "choices",
                             "tolerance"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    image_path = os.path.join(folder, record["image"])
    if not os.path.isfile(image_path):
        raise ValueError(f"image '{record['image']}' not found (looked at {image_path})")
    try:
        with Image.open(image_path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image '{record['image']}' is {width}x{height}, over {MAX_IMAGE_PIXELS} pixels")
            image = image.convert("RGB")  # greyscale, palette and RGBA become RGB; forces a full decode
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"image '{record['image']}' cannot be read ({type(error).__name__}: {error})") from None
    boxes = record.get("boxes") or []
    if not isinstance(boxes, list):
        raise ValueError("field 'boxes' must be a list of [x0, y0, x1, y1]")
    for box in boxes:
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"box {box} is not four numbers [x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {box} is not inside the {width}x{height} image with x0<x1, y0<y1")
    return Sample(image=image, question=record["question"], answer=record["answer"],
                  rationale=record.get("rationale"), cue=record.get("cue"), boxes=boxes,
                  task=record.get("task") or "default", id=record.get("id") or "", choices=choices,
                  tolerance=float(tolerance))


def read_jsonl(path, skip_bad=False):
    """[(line number, the line's JSON object, its Sample)] of a JSONL file of samples, each line validated.
    A bad line raises ValueError('FILE:LINE: reason'), or with skip_bad=True is skipped and counted.
    A sample without an id gets 'FILE:LINE'. -> (rows, ['FILE:LINE: reason' of each skipped line])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    folder = os.path.dirname(os.path.abspath(path))
    rows, skipped = [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"not valid UTF-8 (byte {error.start})") from None
                sample = parse_record(line, folder)
            except ValueError as error:
                if not skip_bad:
                    raise ValueError(f"{path}:{line_number}: {error}") from None
                skipped.append(f"{path}:{line_number}: {error}")
                continue
            sample.id = sample.id or f"{os.path.basename(path)}:{line_number}"
            rows.append((line_number, json.loads(line), sample))
    return rows, skipped


def load_jsonl(path, skip_bad=False):
    """Load and validate a JSONL file of samples (read_jsonl). Returns (samples, num_skipped)."""
    rows, skipped = read_jsonl(path, skip_bad)
    if skipped:
        print(f"load_jsonl: skipped {len(skipped)} bad line(s) in {path}; first: {skipped[0]}")
    if not rows:
        raise ValueError(f"{path}: no valid samples")
    return [sample for _, _, sample in rows], len(skipped)


# ----------------------------------------------------------------------------- prompts and batches

VIDEO_FRAMES = 64  # the paper's Video-MME setting


def load_frames(folder, count=VIDEO_FRAMES):
    """(frames, frames per second) of a video extracted beforehand into folder (image files, in name
    order; the runtime has no video decoder), e.g. 64 evenly spaced frames of a video of D seconds:
        ffmpeg -i VIDEO.mp4 -vf "fps=64/D" -frames:v 64 FOLDER/%03d.jpg
    More than count frames are thinned evenly to count. fps.txt in folder gives the frames' rate
    (64 / D) for Qwen3-VL's timestamps; without it they assume 1 frame per second."""
    if not os.path.isdir(folder):
        raise ValueError(f"no frames folder {folder} (extract the video's frames into it first)")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise ValueError(f"{folder} holds no .jpg or .png frames")
    picked = [names[round(i * (len(names) - 1) / max(1, count - 1))] for i in range(min(count, len(names)))]
    fps = 1.0
    if os.path.isfile(os.path.join(folder, "fps.txt")):
        with open(os.path.join(folder, "fps.txt")) as f:
            fps = float(f.read()) * len(picked) / len(names)
    frames = []
    for name in picked:
        with Image.open(os.path.join(folder, name)) as frame:
            frames.append(frame.convert("RGB"))
    return frames, fps


def user_message(sample, text, extra_images=()):
    """One user turn: the sample's image(s) or video, the text, then any extra images (crops).
    A video's frames are read from disk here, one batch at a time."""
    if sample.video:
        frames, fps = load_frames(sample.video)
        visual = [{"type": "video", "video": frames, "fps": fps}]
    else:
        images = sample.image if isinstance(sample.image, list) else [sample.image]
        visual = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": visual + [{"type": "text", "text": text}]
            + [{"type": "image", "image": image} for image in extra_images]}


def chat_parts(chat, kind):
    """The image parts ('image') or video parts ('video': frames and fps) of a chat, in template order."""
    return [part for message in chat if not isinstance(message["content"], str)
            for part in message["content"] if part["type"] == kind]


def student_messages(sample):
    """What the student (and every evaluation) sees: the image and the question, nothing else."""
    return [user_message(sample, sample.question)]


def completion_token_ids(processor, text):
    """Token ids of an assistant completion, ending in the end-of-turn token."""
    tokenizer = processor.tokenizer
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def collate(processor, chats, completion_ids=None, max_length=None, sample_ids=None):
    """Batch chat prompts (and optional completions) through the processor, left padded.

    chats: one chat (list of messages, images inside their parts) per row.
    completion_ids: optional list of token-id lists appended after each prompt.
    Returns input_ids, attention_mask, mm_token_type_ids (B, L: 0 text, 1 image, 2 video), pixel_values
    and image_grid_thw when there are images, pixel_values_videos and video_grid_thw when there are
    videos, and completion_mask (B, L), 1 on completion tokens, when completions are given.
    """
    texts = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    images = [part["image"] for chat in chats for part in chat_parts(chat, "image")]
    video_parts = [chat_parts(chat, "video") for chat in chats]
    if any(len(parts) > 1 for parts in video_parts):
        raise ValueError("a prompt with more than one video is not supported (rollout.repeat_batch assumes one)")
    videos = [part for parts in video_parts for part in parts]
    # a video's frames are sampled already: the processor takes them all, stamped at their fps
    metadata = [{"fps": v["fps"], "total_num_frames": len(v["video"]), "frames_indices": list(range(len(v["video"])))}
                for v in videos]
    video_args = dict(videos=[v["video"] for v in videos], do_sample_frames=False, video_metadata=metadata) \
        if videos else {}
    prompt = processor(text=texts, images=images or None, return_tensors="pt", padding=True, **video_args)
    pad_id = processor.tokenizer.pad_token_id
    rows = []
    for i in range(len(texts)):
        keep = prompt["attention_mask"][i].bool()
        ids, types = prompt["input_ids"][i][keep].tolist(), prompt["mm_token_type_ids"][i][keep].tolist()
        completion = list(completion_ids[i]) if completion_ids is not None else []
        rows.append((ids + completion, types + [0] * len(completion), [0] * len(ids) + [1] * len(completion)))
    length = max(len(ids) for ids, _, _ in rows)
    if max_length is not None and length > max_length:
        row = max(range(len(rows)), key=lambda r: len(rows[r][0]))
        name = f" (sample {sample_ids[row]})" if sample_ids else ""
        raise ValueError(f"a sequence of {length} tokens{name} exceeds max_length={max_length}; "
                         f"shorten the prompt or raise --max_length")

    def left_pad(values, fill):
        return torch.tensor([[fill] * (length - len(v)) + v for v in values])

    batch = {
        "input_ids": left_pad([r[0] for r in rows], pad_id),
        "attention_mask": left_pad([[1] * len(r[0]) for r in rows], 0),
        "mm_token_type_ids": left_pad([r[1] for r in rows], 0),
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in prompt:
            batch[key] = prompt[key]
    if completion_ids is not None:
        batch["completion_mask"] = left_pad([r[2] for r in rows], 0)
    return batch


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch):
    """The keys of a batch that the model's forward takes."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw")
    return {k: batch[k] for k in keys if k in batch}


@dataclass
class WorldConfig:
    out: str = "world"               # writes OUT/train.jsonl, OUT/eval.jsonl (OUT/validation.jsonl) and OUT/images/
    num_train: int = 8000            # training samples (in-domain families)
    num_eval: int = 350              # evaluation samples (all seven families)
    num_validation: int = 0          # validation samples (in-domain; the split of the headroom and the exact gap)
    seed: int = 0                    # the world's seed (the evaluation set has its own offset)


def main(argv):
    """python data.py --out=DIR: write the embedded world in the JSONL format --data reads."""
    config = cli.parse(argv, WorldConfig, "python data.py --out=DIR [--key=value ...]")
    os.makedirs(config.out, exist_ok=True)
    write_jsonl(make_world(config.num_train, seed=config.seed), os.path.join(config.out, "train.jsonl"))
    write_jsonl(eval_world(config.num_eval, seed=config.seed), os.path.join(config.out, "eval.jsonl"))
    if config.num_validation:
        write_jsonl(validation_world(config.num_validation, seed=config.seed),
                    os.path.join(config.out, "validation.jsonl"))
    print(f"wrote {config.out}/train.jsonl and eval.jsonl" + (" and validation.jsonl" if config.num_validation else ""))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
