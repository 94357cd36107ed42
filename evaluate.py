"""Answer extraction, scoring, the evaluation table, loaders for the paper's seven benchmarks, and the
paper's tables on the embedded world (many runs of train.py, summarised with their curves).

Scoring is pure functions on strings (tests call them directly). `evaluate` answers through
rollout.sample (greedy, or sampled with the paper's settings), seeing only the image (or video)
and the question, and reports accuracy per task family or benchmark, the in-domain / near-domain /
out-of-domain averages and the majority-answer baseline beside them.

    python evaluate.py --ckpt=DIR                 # the embedded world's evaluation set
    python evaluate.py --ckpt=DIR --data=FILE     # a JSONL file in data.py's format
    python evaluate.py --ckpt=DIR --benchmarks=FOLDER --paper_settings=true   # the paper's Table 1 row
    python evaluate.py --tables=FOLDER --init_from=SFT_CKPT   # the paper's tables on the embedded world:
                                                  # every row x 3 seeds through train.py, tables.md, curves
"""

import ast
import base64
import csv
import dataclasses
import datetime
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from fractions import Fraction

import torch
from PIL import Image
from tqdm import tqdm

from data import FAMILIES, OUT_OF_DOMAIN, Sample, collate, eval_world, load_jsonl, student_messages, to_device
from rollout import sample


# ---------------------------------------------------------------------------
# extraction

# Whitespace is allowed everywhere because our tokenizer decodes "\boxed { 7 }", "< / answer >".
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_GSM8K_MARK = re.compile(r"####\s*([^\n]*)")
# "Answer: X", "answer : X", "the answer is X", "final answer is: X", "**Answer:** X"
_ANSWER_PHRASE = re.compile(r"\banswer\s*\**\s*(?:is\b\s*:?|:)\s*\**\s*", re.IGNORECASE)
# The answer ends at the end of its sentence: ". ", "! ", "? " or a final "." (so the '.'
# of 2.5 is kept), or at ", " before a word (so "7, since 3 + 4 = 7" gives "7").
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|,\s+(?=[a-z])", re.IGNORECASE)
# A multiple-choice letter on its own: "B", "(B)", "B.", "B)", "option B", "( b )".
_CHOICE = re.compile(r"(?:(?:option|choice)\s*)?\(?\s*([a-j])\s*\)?\s*[.:]?", re.IGNORECASE)
# ... or leading an option's text: "(B) a red circle".
_CHOICE_WITH_TEXT = re.compile(r"\(\s*([a-j])\s*\)\s.*", re.IGNORECASE | re.DOTALL)


def _last_boxed(text):
    """Content of the last balanced \\boxed{...}, nested braces included, else None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[match.end():end]
    return None


def _first_sentence(text):
    """The first line of text, cut at the end of its first sentence."""
    line = text.split("\n", 1)[0]
    return _SENTENCE_END.split(line, maxsplit=1)[0]


def _last_answer_phrase(text):
    """The answer after the last "answer:" / "the answer is" that is followed by one."""
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        answer = _first_sentence(text[match.end():]).strip().strip("*").strip()
        if answer:
            return answer
    return None


def _choice_letter(text):
    """'(B)', 'b.', 'option B', '(B) red' -> 'B'; anything else -> None."""
    text = text.strip()
    match = _CHOICE.fullmatch(text) or _CHOICE_WITH_TEXT.fullmatch(text)
    return match.group(1).upper() if match else None


def extract_answer(text):
    """The final answer of a reasoning trace, or None.

    Tried in order, the last occurrence winning within each kind: \\boxed{X},
    <answer>X</answer>, "#### X" (GSM8K), "answer: X" / "the answer is X", a text that
    is just a multiple-choice letter, and last a final line of at most 3 words.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in (_ANSWER_TAG, _GSM8K_MARK):
        answers = [m.group(1).strip() for m in pattern.finditer(text) if m.group(1).strip()]
        if answers:
            return answers[-1]
    answer = _last_answer_phrase(text)
    if answer:
        return answer
    letter = _choice_letter(text)
    if letter:
        return letter
    last_line = text.strip().splitlines()[-1].strip()
    return last_line if len(last_line.split()) <= 3 else None


# ---------------------------------------------------------------------------
# normalisation

_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")  # \frac{3}{4}, \dfrac{3}{4}
_LATEX_FRAC_DIGITS = re.compile(r"\\[dt]?frac(\d)(\d)")  # \frac34, \dfrac34
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # 1,000 and 12,345.5, not 1,5
_DECIMAL = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # no exponents: 1e999999 would hang Fraction
_NUMBER = re.compile(rf"([+-]?)({_DECIMAL})(?:/({_DECIMAL}))?")


def _clean(text):
    """Strip, lowercase, drop $...$, \\text{}, a trailing '.', and collapse whitespace."""
    text = str(text).strip().replace("\u2212", "-")  # unicode minus
    text = text.rstrip(".").strip().strip("$").strip()
    text = _LATEX_TEXT.sub(r"\1", text)
    text = re.sub(r"\\[,!; ]", "", text)  # LaTeX thin spaces, as in 1\,000
    text = text.replace("\\%", "%")
    text = " ".join(text.split()).rstrip(".").strip()
    return text.lower()


def _parse_number(text):
    """(value, is_decimal) for '1,000', '-2.5', '+3', '3/4', '\\frac{3}{4}', '\\dfrac34'; else None."""
    text = re.sub(r"(?<=\D)\s+|\s+(?=\D)", "", text)  # "- 3" -> "-3", but "1 2" stays apart
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = _LATEX_FRAC_DIGITS.sub(r"\1/\2", text)
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    match = _NUMBER.fullmatch(text)
    if not match:
        return None
    sign, numerator, denominator = match.groups()
    try:  # int() refuses numbers over 4300 digits
        value = Fraction(numerator) / Fraction(denominator or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return (-value if sign == "-" else value), "." in text


def normalize_answer(x):
    """A canonical string for an answer, for comparing and logging.

    Lowercased, stripped of $...$, \\text{}, a trailing '.', extra whitespace; a number
    becomes its exact fraction: '1,000' -> '1000', '2.50' -> '5/2', '0.5' = '1/2' =
    '\\frac{1}{2}' -> '1/2', '−3' -> '-3', '+3' -> '3'. A percentage stays as written,
    so '50%' != '50': datasets disagree on whether the % is part of the answer.
    """
    text = _clean(x)
    number = _parse_number(text)
    return str(number[0]) if number else text


# ---------------------------------------------------------------------------
# scoring

def _looks_like_trace(gold):
    """A gold string that holds its answer inside a trace: \\boxed{}, <answer>, '####'."""
    return bool(_BOXED.search(gold) or _ANSWER_TAG.search(gold) or _GSM8K_MARK.search(gold))


def _numbers_match(a, b):
    """Exact for integers and fractions, relative tolerance 1e-6 if either was a decimal."""
    (a_value, a_decimal), (b_value, b_decimal) = a, b
    if not (a_decimal or b_decimal):
        return a_value == b_value
    # |a - b| <= 1e-6 max(|a|, |b|), in Fractions so huge numbers cannot overflow a float
    return abs(a_value - b_value) <= Fraction(1, 10**6) * max(abs(a_value), abs(b_value))


_CHOICE_THEN_TEXT = re.compile(r"\(?\s*([a-j])\s*[.):]\s+.*", re.IGNORECASE | re.DOTALL)  # "B. 3 cm", "B) text"


_LETTER_IN_TEXT = re.compile(r"\(([A-J])\)")
# a number followed by up to three unit words ('cm', 'm^2', 'square units', '°', '^\circ'); not '%', and
# not a word that changes the number ('50 percent', '12 pi', '3 hundred', '1e5')
_NUMBER_WITH_UNIT = re.compile(r"([+-]?[\d,]*\.?\d+(?:/\d+)?)\s*(?:(?:\^\s*\\circ|°|\\circ|[a-z]+(?:\^?[23²³])?)\s*){1,3}")
_NOT_UNITS = {"percent", "pi", "e", "hundred", "hundreds", "thousand", "thousands", "million", "millions",
              "billion", "billions", "times", "x"}


def _number_of(text):
    """_parse_number of a cleaned answer, also through a unit: '3.5 cm', '40°', '12 square units'."""
    number = _parse_number(text)
    if number:
        return number
    match = _NUMBER_WITH_UNIT.fullmatch(text)
    if not match or _NOT_UNITS & set(re.findall(r"[a-z]+", text[match.end(1):])) or re.match(r"e\d", text[match.end(1):]):
        return None
    return _parse_number(match.group(1))


def _option_letter(prediction, choices):
    """A multiple-choice answer as a letter: 'B', '(B)', 'B. <text>', or the text of exactly one option."""
    letter = _choice_letter(prediction)
    if letter:
        return letter
    match = _CHOICE_THEN_TEXT.fullmatch(prediction)
    if match and ord(match.group(1).upper()) - ord("A") < len(choices):
        return match.group(1).upper()
    same = [i for i, choice in enumerate(choices) if normalize_answer(choice) == normalize_answer(prediction)]
    number = _number_of(prediction)
    if not same and number:                           # '60' for the option '60°': the numbers, units dropped
        same = [i for i, choice in enumerate(choices) if number[0] == (_number_of(_clean(choice)) or (None,))[0]]
    return chr(ord("A") + same[0]) if len(same) == 1 else None


def score(prediction_text, gold, choices=(), tolerance=0.0):
    """True if the final answer of prediction_text equals gold; never a substring match.

    Numbers compare by value, multiple-choice letters case-insensitively ('(b)' = 'B'),
    anything else as normalised strings. With choices (the options' texts, A first) and a
    letter for gold, the prediction may also give the option's text instead of its letter.
    With a tolerance, numbers match when |prediction - gold| <= tolerance (the benchmark's
    own rule, e.g. DynaMath's 0.001). None, empty or unreadable input is False.
    """
    if prediction_text is None or gold is None:
        return False
    gold = str(gold)
    prediction = extract_answer(str(prediction_text))
    if prediction is None and choices:                # "... so the correct option is (C)." on the last line
        lines = str(prediction_text).strip().splitlines()
        letters = _LETTER_IN_TEXT.findall(lines[-1]) if lines else []
        prediction = letters[-1] if len(set(letters)) == 1 else None
    if _looks_like_trace(gold):
        gold = extract_answer(gold)
    if prediction is None or gold is None:
        return False
    prediction, gold = _clean(prediction), _clean(gold)
    if not prediction or not gold:
        return False
    if choices and _choice_letter(gold):
        return _option_letter(prediction, choices) == _choice_letter(gold)
    prediction_number, gold_number = _number_of(prediction), _parse_number(gold)   # "3.5 cm" reads as 3.5
    if prediction_number and gold_number:
        if tolerance:
            return abs(prediction_number[0] - gold_number[0]) <= Fraction(tolerance)
        return _numbers_match(prediction_number, gold_number)
    gold_letter = _choice_letter(gold)
    if gold_letter:
        return _choice_letter(prediction) == gold_letter
    return normalize_answer(prediction) == normalize_answer(gold)


def score_sample(prediction_text, sample):
    """score against a Sample: its answer, with its choices and tolerance."""
    return score(prediction_text, sample.answer, sample.choices, sample.tolerance)


# ---------------------------------------------------------------------------
# evaluation

def domain_of(task):
    """'in-domain', 'near-domain' (the paper's math benchmarks) or 'out-of-domain'."""
    if task in BENCHMARKS:
        return BENCHMARKS[task][1]
    return "out-of-domain" if task in OUT_OF_DOMAIN else "in-domain"


def family_averages(per_family):
    """Macro averages, as the paper averages benchmarks: every family counts once."""
    groups = defaultdict(list)
    for task, value in per_family.items():
        groups[domain_of(task)].append(value)
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    near = {"near_domain_avg": mean(groups["near-domain"])} if groups["near-domain"] else {}
    return {"in_domain_avg": mean(groups["in-domain"]), **near, "ood_avg": mean(groups["out-of-domain"]),
            "overall": mean(list(per_family.values()))}


def majority_baseline(samples):
    """Accuracy of always giving each family's most common gold answer (measured on these samples)."""
    answers = defaultdict(Counter)
    for s in samples:
        answers[s.task][normalize_answer(s.answer)] += 1
    per_family = {task: counts.most_common(1)[0][1] / sum(counts.values()) for task, counts in answers.items()}
    return {"per_family": per_family, **family_averages(per_family)}


def family_order(tasks):
    known = FAMILIES + list(BENCHMARKS)
    return [f for f in known if f in tasks] + sorted(t for t in tasks if t not in known)


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


@torch.no_grad()
def evaluate(model, processor, samples, batch_size=64, max_new_tokens=96, messages_fn=student_messages,
             progress=True, sampling=None, seed=0):
    """Answers for every sample -> {'per_family', 'in_domain_avg', 'ood_avg', 'overall', 'baseline',
    'counts', 'records'}: greedy, or sampled with sampling=PAPER_SAMPLING (each sample from its own
    generator, seeded by seed and its index, so a run is reproducible at any batch size). messages_fn
    builds the prompt: the default is what the student sees at inference (image + question); a
    privileged prompt is for diagnostics only."""
    records = []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress, leave=False):
        chunk = samples[start:start + batch_size]
        batch = to_device(collate(processor, [messages_fn(s) for s in chunk]), model.device)
        if sampling:
            generators = [torch.Generator(model.device).manual_seed(seed * 1_000_003 + start + i)
                          for i in range(len(chunk))]
            rollout = sample(model, processor, batch, max_new_tokens=max_new_tokens, generator=generators, **sampling)
        else:
            rollout = sample(model, processor, batch, greedy=True, max_new_tokens=max_new_tokens)
        for s, text in zip(chunk, rollout.texts):
            records.append({"id": s.id, "task": s.task, "prediction": text, "gold": s.answer,
                            "correct": score_sample(text, s)})
    correct = defaultdict(list)
    for r in records:
        correct[r["task"]].append(r["correct"])
    per_family = {t: sum(correct[t]) / len(correct[t]) for t in family_order(correct)}
    return {"per_family": per_family, **family_averages(per_family), "baseline": majority_baseline(samples),
            "counts": {t: len(correct[t]) for t in per_family}, "records": records}


# ---------------------------------------------------------------------------
# the paper's seven benchmarks, from local copies
#
# The paper evaluated with VLMEvalKit, whose data files are what we read: one TSV per benchmark
# (tab separated, a header row; `image` holds a base64 image, a list of them as a Python literal, or
# the `index` of an earlier row whose image it reuses; multiple-choice options in columns A, B, ...;
# `answer` a letter). VLMEvalKit downloads them into ~/LMUData. No LLM judge here: answers are scored
# by the rules below, so numbers can differ from VLMEvalKit's judged ones by a few points.

BENCHMARKS = {  # name: (file in the benchmarks folder, the paper's group, the paper's column title)
    "vision_r1": ("vision_r1_test.jsonl", "in-domain", "Vision R1-Test"),
    "dynamath": ("DynaMath.tsv", "near-domain", "DynaMath"),
    "mathvista": ("MathVista_MINI.tsv", "near-domain", "MathVista"),
    "wemath": ("WeMath.tsv", "near-domain", "WeMath"),
    "mathverse": ("MathVerse_MINI.tsv", "near-domain", "MathVerse"),
    "mmmu": ("MMMU_DEV_VAL.tsv", "out-of-domain", "MMMU-Val"),
    "video_mme": ("Video-MME.tsv", "out-of-domain", "Video-MME"),
}
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


def format_table(columns):
    """Markdown table, in percent: one column per {title: results}, the majority baseline last.
    Every column must come from the same samples."""
    first = next(iter(columns.values()))
    baseline = first["baseline"]
    lines = ["| family | n | " + " | ".join(columns) + " | majority baseline |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for task in first["per_family"]:
        kind = {"in-domain": "", "near-domain": " (near)", "out-of-domain": " (ood)"}[domain_of(task)]
        cells = " | ".join(f"{100 * r['per_family'][task]:.1f}" for r in columns.values())
        lines.append(f"| {task}{kind} | {first['counts'][task]} | {cells} | {100 * baseline['per_family'][task]:.1f} |")
    for key, name in (("in_domain_avg", "in-domain avg"), ("near_domain_avg", "near-domain avg"),
                      ("ood_avg", "out-of-domain avg"), ("overall", "overall")):
        if key not in first:
            continue
        cells = " | ".join(f"**{100 * r[key]:.1f}**" for r in columns.values())
        lines.append(f"| **{name}** | | {cells} | {100 * baseline[key]:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the paper's tables on the embedded world: many runs of train.py, one table per comparison

SFT_RECIPE = "--mode=sft --max_steps=1600"                     # the default run's SFT stage
TEACHER_RECIPE = "--mode=sft --student=tiny-large --max_steps=1600"  # OPD's bigger teacher, the same recipe
GROUPS = "--batch_size=2 --num_rollouts=8"  # GRPO and PTD-PO: 2 prompts x 8 rollouts = the 16 completions a step
TABLE_RUNS = {  # folder: (row, train.py flags); every run starts from the same SFT checkpoint with the same budget
    "grpo": ("GRPO", f"--mode=ptdpo --ptd_coef=0 {GROUPS}"),
    "opsd": ("OPSD", "--mode=opsd"),
    "opsd_vicur": ("OPSD+ViCuR", "--mode=vicur"),
    "opd": ("OPD", "--mode=opd --teacher={teacher}"),
    "opd_vicur": ("OPD+ViCuR", "--mode=vicur --teacher={teacher}"),
    "ptdpo": ("PTD-PO", f"--mode=ptdpo {GROUPS}"),
    "cue_only": ("+ cue hint only", "--mode=vicur --cue_recovery=false"),
    "module_only": ("+ recovery module only", "--mode=vicur --privilege=answer"),
}
COMPARISON = {"base": "Base (SFT)", **{f: TABLE_RUNS[f][0] for f in ("grpo", "opsd", "opsd_vicur", "opd", "opd_vicur",
                                                                      "ptdpo")}}
ABLATION = {"opsd": "answer hint (OPSD)", "cue_only": "+ cue hint only", "module_only": "+ recovery module only",
            "opsd_vicur": "full ViCuR: cue hint + module"}
FIGURES = {  # one curves figure per comparison: {file name: {run folder: row}}
    "teachers": {f: TABLE_RUNS[f][0] for f in ("opsd", "opsd_vicur", "opd", "opd_vicur")},
    "grpo_ptdpo": {f: TABLE_RUNS[f][0] for f in ("grpo", "ptdpo")},
    "ablation": ABLATION}
CURVES = ["loss", "log_ratio", "privilege_gap", "hint_leakage", "reward", "student_entropy", "cue_recall"]


def script(name):
    """argv that runs one of this repository's scripts with this Python."""
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]


def table_commands(folder, seeds, sft, teacher, train_flags, threads, names):
    """{run folder: argv} for the rows `names` and every seed, and the base evaluations of the SFT checkpoint."""
    num_eval = next((f.split("=", 1)[1] for f in train_flags if f.startswith("--num_eval=")), "350")
    commands = {}
    for seed in seeds:
        commands[os.path.join(folder, "base", f"seed{seed}")] = [
            *script("evaluate.py"), f"--ckpt={sft}", f"--seed={seed}", f"--num_eval={num_eval}",
            f"--out={os.path.join(folder, 'base', f'seed{seed}', 'eval.json')}"]
        for name in names:
            run = os.path.join(folder, name, f"seed{seed}")
            commands[run] = [*script("train.py"), f"--init_from={sft}",
                             *TABLE_RUNS[name][1].format(teacher=teacher).split(), f"--seed={seed}", f"--threads={threads}",
                             *train_flags, f"--out_dir={run}"]
    return commands


def run_commands(commands, jobs):
    """Run {folder: argv}, `jobs` at a time, each printing into folder.log. A folder whose eval.json
    exists and whose command.txt matches is complete and skipped, so an interrupted table resumes."""
    todo = {}
    for run, argv in commands.items():
        command = " ".join(argv)
        done = os.path.isfile(os.path.join(run, "eval.json")) and os.path.isfile(os.path.join(run, "command.txt"))
        if not (done and open(os.path.join(run, "command.txt")).read().strip() == command):
            todo[run] = argv
    running, progress = {}, tqdm(total=len(todo), desc="runs")
    for run, argv in list(todo.items()) + [(None, None)]:
        while running and (run is None or len(running) >= jobs):   # wait for a free slot (or for all, at the end)
            for finished in [r for r, (p, _) in running.items() if p.poll() is not None]:
                process, log = running.pop(finished)
                log.close()
                if process.returncode != 0:
                    for other, _ in running.values():
                        other.kill()
                    tail = open(finished + ".log").read()[-2000:]
                    raise SystemExit(f"error: {' '.join(commands[finished])} failed (exit {process.returncode}); "
                                     f"the end of {finished}.log:\n{tail}")
                with open(os.path.join(finished, "command.txt"), "w") as f:
                    f.write(" ".join(commands[finished]) + "\n")
                progress.update(1)
            time.sleep(0.5)
        if run is not None:
            os.makedirs(run, exist_ok=True)
            log = open(run + ".log", "w")
            running[run] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
    progress.close()


def run_summary(run):
    """One finished run folder -> its numbers: eval.json's accuracies (%), the step means of the
    privilege gap and hint leakage from log.jsonl, and the final cue recall (%)."""
    results = json.load(open(os.path.join(run, "eval.json")))
    summary = {task: 100 * value for task, value in results["per_family"].items()}
    summary["families"] = family_order(results["per_family"])
    summary |= {"in_domain_avg": 100 * results["in_domain_avg"], "ood_avg": 100 * results["ood_avg"]}
    if "cue_recall" in results:
        summary["cue_recall"] = 100 * results["cue_recall"]["recall"]
    log = os.path.join(run, "log.jsonl")
    steps = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    steps = [r for r in steps if "loss" in r]
    for name in ("privilege_gap", "hint_leakage"):  # PTD-PO logs the gap only in steps that tutored
        values = [r[name] for r in steps if name in r]
        if values:
            summary[name] = sum(values) / len(values)
    return summary


def mean_and_spread(values):
    """'mean ± sample standard deviation' (just the mean for one value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def seed_table(runs, rows, families):
    """Markdown: one line per {folder: row title}, a column per family, the two averages, the paired
    difference to Base (the same seed, so the same evaluation samples), then the privilege gap,
    hint leakage and cue recall; every cell the mean ± standard deviation over seeds."""
    def cell(values, digits=1):
        if not values:
            return "-"
        mean, spread = mean_and_spread(values)
        return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")
    header = ["row", *families, "in-domain", "out-of-domain", "Δ in-domain", "Δ out-of-domain", "privilege gap",
              "hint leakage", "cue recall"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for folder, title in rows.items():
        seeds = runs[folder]
        column = lambda key: [s[key] for s in seeds.values() if key in s]  # noqa: E731
        delta = lambda key: [s[key] - runs["base"][seed][key] for seed, s in seeds.items()  # noqa: E731
                             if seed in runs.get("base", {})]
        cells = [cell(column(f)) for f in families]
        cells += [cell(column("in_domain_avg")), cell(column("ood_avg"))]
        cells += ["-" if folder == "base" else cell(delta(k)) for k in ("in_domain_avg", "ood_avg")]
        cells += [cell(column("privilege_gap"), 4), cell(column("hint_leakage"), 2), cell(column("cue_recall"))]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_series(runs_of_row, metric, smooth=10):
    """The mean over seeds of a logged metric at each step, then a trailing moving average: [(step, value)]."""
    by_step = defaultdict(list)
    for run in runs_of_row:
        for line in open(os.path.join(run, "log.jsonl")):
            record = json.loads(line)
            if metric in record and "loss" in record:
                by_step[record["step"]].append(record[metric])
    steps = sorted(by_step)
    means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    return [(step, sum(means[max(0, i - smooth + 1):i + 1]) / len(means[max(0, i - smooth + 1):i + 1]))
            for i, step in enumerate(steps)]


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def draw_curves(series, path, title, panel=(330, 220), columns=4):
    """series {row: {metric: [(step, value)]}} -> one PNG: a panel per metric (CURVES order), a line per
    row in its colour, the value range written at the axis ends, the legend in the last panel."""
    from PIL import ImageDraw
    metrics = [m for m in CURVES if any(s.get(m) for s in series.values())]
    rows_of_panels = (len(metrics) + 1 + columns - 1) // columns
    width, height = panel
    image = Image.new("RGB", (columns * width, 30 + rows_of_panels * height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    left, top, right, bottom = 52, 22, 12, 28                       # margins inside a panel
    for index, metric in enumerate(metrics):
        x0, y0 = (index % columns) * width, 30 + (index // columns) * height
        points = [p for s in series.values() for p in s.get(metric, [])]
        low, high = min(v for _, v in points), max(v for _, v in points)
        high = high if high > low else low + 1e-9
        first, last = min(t for t, _ in points), max(t for t, _ in points)
        last = last if last > first else first + 1
        to_x = lambda t: x0 + left + (t - first) / (last - first) * (width - left - right)  # noqa: E731
        to_y = lambda v: y0 + height - bottom - (v - low) / (high - low) * (height - top - bottom)  # noqa: E731
        draw.rectangle([x0 + left, y0 + top, x0 + width - right, y0 + height - bottom], outline=(160, 160, 160))
        draw.text((x0 + left, y0 + 6), metric, fill="black")
        draw.text((x0 + 2, y0 + top), f"{high:.3g}", fill=(90, 90, 90))
        draw.text((x0 + 2, y0 + height - bottom - 10), f"{low:.3g}", fill=(90, 90, 90))
        draw.text((x0 + left, y0 + height - bottom + 4), f"step {first}", fill=(90, 90, 90))
        draw.text((x0 + width - right - 60, y0 + height - bottom + 4), f"step {last}", fill=(90, 90, 90))
        for color, curve in zip(COLORS, series.values()):
            line = [(to_x(t), to_y(v)) for t, v in curve.get(metric, [])]
            if len(line) > 1:
                draw.line(line, fill=color, width=2)
    x0, y0 = (len(metrics) % columns) * width, 30 + (len(metrics) // columns) * height
    for i, (color, row) in enumerate(zip(COLORS, series)):
        draw.line([(x0 + 20, y0 + 30 + 18 * i), (x0 + 50, y0 + 30 + 18 * i)], fill=color, width=3)
        draw.text((x0 + 58, y0 + 24 + 18 * i), row, fill="black")
    image.save(path)
    return path


def write_tables(folder, seeds, names, minutes):
    """tables.md and a curves PNG per comparison, from the finished run folders of the rows `names`."""
    runs = {name: {seed: run_summary(os.path.join(folder, name, f"seed{seed}")) for seed in seeds}
            for name in ["base", *names]}
    present = lambda rows: {row: title for row, title in rows.items() if row in runs}  # noqa: E731
    families = runs["base"][seeds[0]]["families"]
    date = datetime.date.today().isoformat()
    text = (f"# The paper's tables on the embedded world\n\n{date}; seeds {', '.join(map(str, seeds))}; "
            f"{minutes:.0f} min. Accuracy in %, mean ± standard deviation over seeds. Δ: the row minus Base on "
            f"the same seed's evaluation samples. Privilege gap (nats a token) and hint leakage: means over the "
            f"steps of log.jsonl. Cue recall: % of the sink's attention inside the cue boxes, at the end.\n\n"
            f"## Table 1: which teacher privilege helps\n\n{seed_table(runs, present(COMPARISON), families)}\n\n"
            f"## Component ablation (the OPSD setting)\n\n{seed_table(runs, present(ABLATION), families)}\n")
    with open(os.path.join(folder, "tables.md"), "w") as f:
        f.write(text)
    for name, rows in FIGURES.items():
        rows = present(rows)
        if not rows:
            continue
        series = {title: {m: step_series([os.path.join(folder, row, f"seed{s}") for s in seeds], m) for m in CURVES}
                  for row, title in rows.items()}
        draw_curves(series, os.path.join(folder, f"curves_{name}.png"),
                    f"{', '.join(rows.values())}: the mean over seeds {', '.join(map(str, seeds))}, "
                    f"then a moving average of 10 steps")
    return text


def tables_main(args, train_flags):
    """python evaluate.py --tables=FOLDER [--seeds=0,1,2] [--jobs=2] [--init_from=SFT] [--teacher=DIR]
    [--rows=opsd,opsd_vicur,...] [any train.py --key=value, given to every run]."""
    folder, start = args["tables"], time.time()
    seeds = [int(s) for s in args.get("seeds", "0,1,2").split(",")]
    jobs = int(args.get("jobs", 2))
    names = args["rows"].split(",") if "rows" in args else list(TABLE_RUNS)
    if set(names) - set(TABLE_RUNS):
        sys.exit(f"error: --rows: unknown {sorted(set(names) - set(TABLE_RUNS))}; the rows are {list(TABLE_RUNS)}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    train = script("train.py")
    needed = {}
    sft = args.get("init_from") or os.path.join(folder, "sft", "ckpt")
    teacher = args.get("teacher") or os.path.join(folder, "teacher", "ckpt")
    if "init_from" not in args:
        needed[os.path.join(folder, "sft")] = train + SFT_RECIPE.split() + [f"--out_dir={os.path.join(folder, 'sft')}"]
    if "teacher" not in args and any("{teacher}" in TABLE_RUNS[n][1] for n in names):
        needed[os.path.join(folder, "teacher")] = train + TEACHER_RECIPE.split() + [
            f"--out_dir={os.path.join(folder, 'teacher')}"]
    for path in [p for p in (args.get("init_from"), args.get("teacher")) if p]:
        if not os.path.isdir(path):
            sys.exit(f"error: --tables: {path} is not a checkpoint directory")
    commands = table_commands(folder, seeds, sft, teacher, train_flags, threads, names)
    print(f"the paper's tables: {len(needed)} starting run(s), then {len(commands)} runs, {jobs} at a time with "
          f"{threads} thread(s) each, into {folder}/ (each command in <run>/command.txt, its output in <run>.log)")
    run_commands(needed, jobs)
    run_commands(commands, jobs)
    text = write_tables(folder, seeds, names, (time.time() - start) / 60)
    print(text + f"\nwrote {folder}/tables.md and curves_{{{','.join(FIGURES)}}}.png")


EVALUATE_FLAGS = {  # flag: what it does (python evaluate.py --help prints these)
    "ckpt": "DIR|MODEL_ID: the model to evaluate (a checkpoint folder or a transformers id); required",
    "data": "FILE.jsonl: evaluate on these samples (data.py format) instead of the embedded world",
    "benchmarks": "FOLDER: the paper's benchmark files (VLMEvalKit TSVs), see BENCHMARKS",
    "only": "NAME,...: with --benchmarks, only these benchmarks",
    "limit": "N: with --benchmarks, the first N samples of each",
    "paper_settings": "true|false: the paper's sampling, prompt and image size (default false: greedy)",
    "num_eval": "N: embedded world: this many evaluation samples (default 350)",
    "seed": "S: the embedded world's seed and the sampling seed (default 0)",
    "batch_size": "B: prompts per batch (default 64)",
    "max_new_tokens": "T: longest answer (default 96; the paper's setting with --paper_settings)",
    "out": "FILE.json: where to write the results (default CKPT/eval.json; predictions beside it)",
    "heatmaps": "N: draw the sink's attention over N images per family (a ViCuR checkpoint)",
    "device": "D: cpu or cuda (default cpu)",
    "dtype": "float32|bfloat16 (default float32)"}
TABLES_FLAGS = {
    "tables": "FOLDER: run every row x seed of the paper's tables through train.py and write FOLDER/tables.md",
    "seeds": "0,1,2: the seeds (default 0,1,2)",
    "jobs": "N: runs at a time (default 2)",
    "init_from": "SFT_CKPT: the start of every row (default: train one with the default run's recipe)",
    "teacher": "CKPT: OPD's stronger teacher (default: train tiny-large)",
    "rows": "NAME,...: only these rows",
    "(any train.py flag)": "--key=value is passed to every run"}


def evaluate_help():
    flags = lambda table: "\n".join(f"  --{name:<20} {text}" for name, text in table.items())  # noqa: E731
    return ("usage: python evaluate.py --ckpt=DIR|MODEL_ID [flags]     score a model\n"
            "   or: python evaluate.py --tables=FOLDER [flags]         the paper's tables on the embedded world\n\n"
            f"scoring a model:\n{flags(EVALUATE_FLAGS)}\n\nthe tables:\n{flags(TABLES_FLAGS)}")


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(evaluate_help())
        raise SystemExit(0)
    import cue_recovery               # evaluate.py as a script; the library part needs no model loading
    from model import load_model
    args = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    if "tables" in args:   # the paper's tables: runs train.py; flags it does not know go to every run
        own = {"tables", "seeds", "jobs", "init_from", "teacher", "rows"}
        return tables_main({k: v for k, v in args.items() if k in own},
                           [a for a in argv if a[2:].split("=", 1)[0] not in own])
    if "ckpt" not in args or set(args) - set(EVALUATE_FLAGS) or len(args) != len(argv):
        sys.exit(f"{evaluate_help()}\n\nerror: got {argv}")
    paper = {"true": True, "1": True, "false": False, "0": False}.get(args.get("paper_settings", "false").lower())
    if paper is None:
        sys.exit(f"--paper_settings expects true or false, got '{args['paper_settings']}'")
    if args.get("dtype", "float32") not in ("float32", "bfloat16"):
        sys.exit(f"--dtype expects float32 or bfloat16, got '{args['dtype']}'")
    model, processor = load_model(args["ckpt"], dtype=getattr(torch, args.get("dtype", "float32")),
                                  device=args.get("device", "cpu"))
    if paper:
        processor.image_processor.size = dict(PAPER_PIXELS)
    settings = dict(batch_size=int(args.get("batch_size", 64)), messages_fn=paper_messages if paper else student_messages,
                    max_new_tokens=int(args.get("max_new_tokens", PAPER_MAX_NEW_TOKENS if paper else 96)),
                    sampling=PAPER_SAMPLING if paper else None, seed=int(args.get("seed", 0)))
    if "benchmarks" in args:
        names = args["only"].split(",") if "only" in args else [b for b in BENCHMARKS if os.path.isfile(
            os.path.join(args["benchmarks"], BENCHMARKS[b][0]))]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown or not names:
            sys.exit(f"--benchmarks={args['benchmarks']}: {'unknown ' + str(unknown) if unknown else 'none found'}; "
                     f"expected files: {', '.join(f'{b} = {f}' for b, (f, _, _) in BENCHMARKS.items())}")
        samples = [s for n in names for s in load_benchmark(n, args["benchmarks"], int(args.get("limit", 0)) or None)]
    elif "data" in args:
        samples, _ = load_jsonl(args["data"])
    else:
        samples = eval_world(int(args.get("num_eval", 350)), seed=int(args.get("seed", 0)))
    results = evaluate(model, processor, samples, **settings)
    print(format_table({"student (image + question)": results}))
    if "benchmarks" in args:
        print(paper_table(results["per_family"], args["ckpt"]))
    records = results.pop("records")
    recall = cue_recovery.evaluation_cue_recall(model, processor, samples, settings["batch_size"]) \
        if cue_recovery.get(model) is not None else None
    if recall:
        results["cue_recall"] = recall
        print(cue_recovery.recall_line(recall))
    out = args.get("out") or (os.path.join(args["ckpt"], "eval.json") if os.path.isdir(args["ckpt"]) else "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({**results, "settings": "paper (sampled)" if paper else "greedy"}, f, indent=2)
    with open(os.path.splitext(out)[0] + "_predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {out}")
    if int(args.get("heatmaps", 0)) > 0:
        if cue_recovery.get(model) is None:
            sys.exit(f"--heatmaps: {args['ckpt']} has no cue recovery module (train it with --mode=vicur)")
        folder = os.path.join(os.path.dirname(out) or ".", "heatmaps")  # the embedded world: families in turn
        paths = cue_recovery.write_heatmaps(model, processor, samples[:int(args["heatmaps"])], folder)
        print(f"wrote {len(paths)} heat maps to {folder}/")


if __name__ == "__main__":
    main(sys.argv[1:])
