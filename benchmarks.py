"""The paper's seven benchmarks, read from local copies of VLMEvalKit's files, and the paper's
evaluation settings (sampled answers, a system prompt, its image sizes).

    python evaluate.py --ckpt=DIR --benchmarks=FOLDER --paper_settings=true   # the paper's Table 1 row

docs/benchmarks.md says which files go in FOLDER and how to make Video-MME's frames.
"""

import ast
import base64
import csv
import dataclasses
import io
import os
import re

from PIL import Image

from data import BENCHMARKS, Sample, load_jsonl, student_messages
from evaluate import normalize_answer


# The paper's evaluation (its Table 4, "Evaluation hyperparameters used in VLMEvalKit"): sampled rather
# than greedy, a system prompt, up to 4,096 new tokens, each image resized to between 3,584 and
# 401,408 pixels (repetition penalty 1.0, i.e. none; Video-MME with 64 frames).
PAPER_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}
PAPER_MAX_NEW_TOKENS = 4096
PAPER_PIXELS = {"shortest_edge": 3584, "longest_edge": 401408}  # the image processor's min / max pixels
SYSTEM_PROMPT = "You are a helpful assistant."


def paper_messages(sample):
    """The student's prompt with the paper's system prompt before it."""
    return [{"role": "system", "content": SYSTEM_PROMPT}] + student_messages(sample)


# The paper evaluated with VLMEvalKit, whose data files are what we read: one TSV per benchmark
# (tab separated, a header row; `image` holds a base64 image, a list of them as a Python literal, or
# the `index` of an earlier row whose image it reuses; multiple-choice options in columns A, B, ...;
# `answer` a letter). VLMEvalKit downloads them into ~/LMUData. No LLM judge here: answers are scored
# by the rules below, so numbers can differ from VLMEvalKit's judged ones by a few points.

# 'Choices: (A) yes (B) no' (DynaMath), 'Choices:\nA:40°\nB:60°' (MathVerse); an option ends at the next
# option or at the end of its line
_INLINE_CHOICES = re.compile(r"(?:^|\s)\(?([A-H])[):.：][ \t]*([^\n]+?)(?=\s+\(?[A-H][):.：]|[ \t]*\n|\s*$)")


def missing(cell):
    """An empty cell, as pandas writes NaN or None."""
    return cell is None or cell.strip() in ("", "nan", "NaN", "None")


def decode_image(cell):
    """A base64 image cell -> an RGB PIL image."""
    return Image.open(io.BytesIO(base64.b64decode(cell))).convert("RGB")


def read_tsv(path):
    """VLMEvalKit TSV -> (line number, row dict) one row at a time, with an image cell that refers to an
    earlier row's index replaced by that row's image (still base64)."""
    csv.field_size_limit(2**31 - 1)
    images = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for row in reader:
            for key in ("index", "question", "answer"):
                if key not in row or row[key] is None:
                    raise ValueError(f"{path}:{reader.line_num}: no '{key}' column")
            cell = row.get("image")
            if not missing(cell) and len(cell) <= 64:                    # the index of a row with the same image
                if cell not in images:
                    raise ValueError(f"{path}:{reader.line_num}: image refers to index {cell}, which no earlier row has")
                row["image"] = images[cell]
            elif not missing(cell):
                images[row["index"]] = cell
            yield reader.line_num, row


def column_choices(row):
    """Options in columns A, B, ... (an empty cell ends the list)."""
    choices = []
    for letter in "ABCDEFGHIJ":
        if missing(row.get(letter)):
            break
        choices.append(row[letter].strip())
    return choices


def inline_choices(question):
    """Options written inside the question: 'Choices: (A) yes (B) no' or 'Choices:\\nA:40°\\nB:60°'."""
    if "Choices" not in question:
        return []
    found = _INLINE_CHOICES.findall(question.split("Choices", 1)[1])
    return [text.strip() for letter, text in found] if [l for l, _ in found] == list("ABCDEFGH"[:len(found)]) else []


def with_options(question, choices):
    """VLMEvalKit's multiple-choice prompt: the question, then 'Options:' and one 'A. text' per line."""
    return question + "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)) \
        + "\nPlease select the correct answer from the options above."


def tsv_sample(name, row, folder):
    """One VLMEvalKit row -> Sample, by the benchmark's answer format (None: a row not in the split)."""
    if name == "mmmu" and row.get("split", "validation") != "validation":
        return None
    if missing(row["answer"]):
        raise ValueError("no answer")
    question, answer, choices, tolerance = row["question"].strip(), row["answer"].strip(), [], 0.0
    if name in ("wemath", "mmmu") or (name == "mathvista" and row.get("question_type") == "multi_choice"):
        choices = column_choices(row) or ([] if missing(row.get("choices")) else list(ast.literal_eval(row["choices"])))
        if name == "mathvista" and not missing(row.get("answer_option")):
            answer = row["answer_option"].strip()
        elif name == "mathvista":                                   # the gold is the option's text
            same = [i for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(answer)]
            if len(same) != 1:
                raise ValueError(f"answer {answer!r} is not exactly one of the choices {choices}")
            answer = chr(ord("A") + same[0])
        if choices and (name != "mathvista" or "Choices" not in question):
            question = with_options(question, choices)
    elif name in ("dynamath", "mathverse"):
        choices = inline_choices(question) if len(answer) == 1 and answer.isalpha() else []
    if name == "dynamath" and row.get("answer_type") == "float":
        tolerance = 1e-3                                            # DynaMath's own: |pred - gold| <= 0.001
    if name == "mathvista" and not missing(row.get("precision")):
        tolerance = 0.5 * 10 ** -int(float(row["precision"]))      # right when rounded to its precision
    if name == "mmmu" and not choices:
        tolerance = 0.005                                           # MMMU's open questions: 2 decimals
    image, video = None, None
    if name == "video_mme":
        choices = [re.sub(r"^[A-H]\.\s*", "", c) for c in ast.literal_eval(row["candidates"])]
        question = with_options(question, choices)
        video = os.path.join(folder, "video", row["video"])         # frames read when the batch is built
        if not os.path.isdir(video):
            raise ValueError(f"no frames folder {video} (extract each video's frames into video/<videoID>/)")
    elif missing(row.get("image")):
        raise ValueError("no image")
    elif row["image"].startswith("["):                              # several images (MMMU), in order
        image = [decode_image(cell) for cell in ast.literal_eval(row["image"])]
    else:
        image = decode_image(row["image"])
    return Sample(image=image, question=question, answer=answer, task=name, id=f"{name}-{row['index']}",
                  choices=choices, tolerance=tolerance, video=video)


def load_benchmark(name, folder, limit=None):
    """The samples (the first `limit`) of one of the paper's benchmarks from folder (see BENCHMARKS for
    the file names); each sample's task is the benchmark's name. A bad row raises 'FILE:LINE: reason'."""
    path = os.path.join(folder, BENCHMARKS[name][0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found ({name} is read from {BENCHMARKS[name][0]} in --benchmarks)")
    if name == "vision_r1":   # data.py's JSONL; geometry3k-style problems may open with an "<image>" tag
        samples = [dataclasses.replace(s, task=name, question=s.question.replace("<image>", "").strip())
                   for s in load_jsonl(path)[0]]
        return samples[:limit] if limit else samples
    samples = []
    for line, row in read_tsv(path):
        if limit and len(samples) == limit:
            break
        try:
            sample = tsv_sample(name, row, folder)
        except KeyError as error:
            raise ValueError(f"{path}:{line}: no {error} column") from None
        except (ValueError, SyntaxError, OSError) as error:
            raise ValueError(f"{path}:{line}: {error}") from None
        if sample is not None:
            samples.append(sample)
    return samples


def paper_table(per_benchmark, name="model"):
    """One row of the paper's Table 1, in %: a column per benchmark present, then their average."""
    present = [b for b in BENCHMARKS if b in per_benchmark]
    header = "| | " + " | ".join(BENCHMARKS[b][2] for b in present) + " | Avg. |"
    values = [100 * per_benchmark[b] for b in present]
    row = f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / len(values):.2f} |"
    return "\n".join([header, "|---|" + "---|" * (len(present) + 1), row])
