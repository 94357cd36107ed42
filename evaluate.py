"""Answer extraction, scoring, the evaluation loop and its table, and the end-of-run evaluation that
every run and `python evaluate.py` write the same way (eval.json and its predictions).

Scoring is pure functions on strings (tests call them directly). `evaluate` answers through
rollout.sample_completions (greedy, or sampled with the paper's settings), seeing only the image (or video)
and the question, and reports accuracy per task family or benchmark, the in-domain / near-domain /
out-of-domain averages and the majority-answer baseline beside them.

    python evaluate.py --ckpt=DIR                 # the embedded world's evaluation set
    python evaluate.py --ckpt=DIR --data=FILE     # a JSONL file in data.py's format
    python evaluate.py --ckpt=DIR --benchmarks=FOLDER --paper_settings=true   # the paper's Table 1 row
    python evaluate.py --ckpt=out/default         # a run folder: its ckpt/
"""

import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction

import torch
from tqdm import tqdm

import cli
import cue_recovery
from data import (BENCHMARKS, EVAL_SAMPLES, FAMILIES, OUT_OF_DOMAIN, VALIDATION_SAMPLES, collate, eval_world, load_jsonl,
                  student_messages, to_device, validation_world)
from model import load_model
from rollout import sample_completions


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


def stated_answer(text):
    """The final answer a text states in so many words, or None: tried in order, the last occurrence
    winning within each kind, \\boxed{X}, <answer>X</answer>, "#### X" (GSM8K), "answer: X" / "the
    answer is X". (cues.py rejects a cue that has one.)"""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in (_ANSWER_TAG, _GSM8K_MARK):
        answers = [m.group(1).strip() for m in pattern.finditer(text) if m.group(1).strip()]
        if answers:
            return answers[-1]
    return _last_answer_phrase(text)


def extract_answer(text):
    """The final answer of a reasoning trace, or None.

    Tried in order: stated_answer (\\boxed{X}, <answer>X</answer>, "#### X", "answer: X" / "the answer
    is X"), a text that is just a multiple-choice letter, and last a final line of at most 3 words.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    answer = stated_answer(text)
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
            rollout = sample_completions(model, processor, batch, max_new_tokens=max_new_tokens, generator=generators, **sampling)
        else:
            rollout = sample_completions(model, processor, batch, greedy=True, max_new_tokens=max_new_tokens)
        for s, text in zip(chunk, rollout.texts):
            records.append({"id": s.id, "task": s.task, "prediction": text, "gold": s.answer,
                            "correct": score_sample(text, s)})
    correct = defaultdict(list)
    for r in records:
        correct[r["task"]].append(r["correct"])
    per_family = {t: sum(correct[t]) / len(correct[t]) for t in family_order(correct)}
    return {"per_family": per_family, **family_averages(per_family), "baseline": majority_baseline(samples),
            "counts": {t: len(correct[t]) for t in per_family}, "records": records}


def macro_interval(records, domain, against=None):
    """(the macro average over a domain's families of the accuracy, or with `against` of the paired
    difference records - against on the same samples, and its standard error): with d_i the per-sample
    value and F families, SE = sqrt(sum_f var_f(d) / n_f) / F. None when the domain has no samples."""
    before = {r["id"]: r["correct"] for r in against} if against is not None else None
    by_family = defaultdict(list)
    for r in records:
        if domain_of(r["task"]) == domain:
            by_family[r["task"]].append(float(r["correct"]) - (float(before[r["id"]]) if before else 0.0))
    if not by_family:
        return None
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    variance = lambda values: sum((v - mean(values)) ** 2 for v in values) / max(len(values) - 1, 1)  # noqa: E731
    value = mean([mean(values) for values in by_family.values()])
    se = sum(variance(values) / len(values) for values in by_family.values()) ** 0.5 / len(by_family)
    return value, se


def interval_lines(records, before_records=None):
    """95% intervals (1.96 SE) of the in-domain and out-of-domain averages, and of the paired
    difference to an earlier evaluation of the same samples -> ({name: [value, se]}, text)."""
    found, lines = {}, []
    for domain in ("in-domain", "out-of-domain"):
        interval = macro_interval(records, domain)
        if interval:
            found[domain] = list(interval)
            lines.append(f"{domain} average: {100 * interval[0]:.1f} ± {196 * interval[1]:.1f} (95%)")
        delta = macro_interval(records, domain, before_records) if before_records is not None else None
        if delta:
            found[f"delta {domain}"] = list(delta)
            lines.append(f"delta {domain}: {100 * delta[0]:+.1f} ± {196 * delta[1]:.1f} (95%)")
    return found, "; ".join(lines)


STUDENT = "student (image + question)"


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


def write_evaluation(model, processor, samples, out, batch_size=64, max_new_tokens=96, messages_fn=student_messages,
                     sampling=None, seed=0, diagnostic_messages=None, before=None, before_records=None, extra=None):
    """The evaluation every run ends with, and evaluate.py's: the student's answers (image + question
    only), the cue recall when the model has the module, and, as a labelled diagnostic when
    diagnostic_messages is given, the same model with privileged context. Prints the table and writes
    `out` (eval.json) and the student's answers beside it (<out without .json>_predictions.jsonl).
    before, before_records: an earlier result on the same samples, shown as a first column, and its
    answers, for the paired difference with its interval; extra: more keys for
    eval.json (a run's exact distillation gap). Returns (results, table)."""
    settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
    columns = {STUDENT: evaluate(model, processor, samples, messages_fn=messages_fn, **settings)}
    if diagnostic_messages is not None:
        columns["diagnostic: + cue hint"] = evaluate(model, processor, samples, messages_fn=diagnostic_messages,
                                                     **settings)
    records = [results.pop("records") for results in columns.values()][0]    # the student's answers
    results = {**columns[STUDENT], "settings": "paper (sampled)" if sampling else "greedy", **(extra or {})}
    diagnostics = {name: r for name, r in columns.items() if name.startswith("diagnostic")}
    if diagnostics:
        results["diagnostics"] = diagnostics
    recall = cue_recovery.evaluation_cue_recall(model, processor, samples, batch_size) \
        if cue_recovery.get(model) is not None else None
    if recall:
        results["cue_recall"] = recall
    results["intervals"], intervals = interval_lines(records, before_records)
    table = format_table({**({"student before distillation": before} if before else {}), **columns})
    table += f"\n\n{intervals}"
    print(table + (f"\n{cue_recovery.recall_line(recall)}" if recall else ""))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(out)[0] + "_predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return results, table


@dataclass
class EvalConfig:
    ckpt: str = ""                   # the model: a checkpoint folder (or a run folder: its ckpt/), or a transformers id
    data: str = ""                   # a JSONL file (data.py format) instead of the embedded world
    benchmarks: str = ""             # a folder of the paper's benchmark files (docs/benchmarks.md)
    only: str = ""                   # with --benchmarks: these benchmarks only, comma-separated
    limit: int = 0                   # with --benchmarks: the first N samples of each; 0 = all
    paper_settings: bool = False     # the paper's sampling, system prompt and image sizes (else greedy)
    num_eval: int = EVAL_SAMPLES     # embedded world: evaluation samples (400 a family)
    split: str = "eval"              # embedded world: eval (all seven families) | validation (in-domain, its own
                                     # seeds: what learning rates are chosen on; 2,000 samples)
    headroom: bool = False           # embedded world: the testbed's headroom criteria on the validation split
    teacher: str = ""                # with --headroom: the stronger teacher of its last criterion
    seed: int = 0                    # the embedded world's seed, and the sampling seed
    batch_size: int = 256            # prompts per batch
    max_new_tokens: int = 0          # longest answer; 0 = 96, or the paper's 4,096 with --paper_settings
    out: str = ""                    # the results file; empty = CKPT/eval.json (headroom.json with --headroom)
    against: str = ""                # another model's answers on the same samples (a run's *_predictions.jsonl):
                                     # the paired difference to them, with its 95% interval
    heatmaps: int = 0                # draw the sink's attention over this many images (a ViCuR checkpoint)
    device: str = "cpu"              # cpu or cuda
    dtype: str = "float32"           # float32 or bfloat16


USAGE = "python evaluate.py --ckpt=DIR|MODEL_ID [--key=value ...]   (python tables.py: the paper's tables)"


def read_predictions(path, samples):
    """The answers in an *_predictions.jsonl, checked to be of these samples, in this order."""
    records = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    if not (isinstance(record, dict) and {"id", "task", "correct"} <= record.keys()):
                        raise ValueError("not an answer record with id, task and correct")
                except ValueError as error:  # json.JSONDecodeError is a ValueError
                    sys.exit(f"error: --against={path}, line {number}: {error}")
                records.append(record)
    except OSError as error:
        sys.exit(f"error: --against={path}: {error.strerror}")
    if [r["id"] for r in records] != [s.id for s in samples]:
        sys.exit(f"error: --against={path} holds the answers to other samples than this evaluation's "
                 f"{len(samples)} (the same --split, --seed and --num_eval as the run that wrote it?)")
    return records


def has_weights(folder):
    return any(name.endswith(".safetensors") for name in os.listdir(folder))


def checkpoint_folder(path):
    """A checkpoint folder as given, or a run folder (train.py's out_dir, with no weights of its own)
    -> its ckpt/; a hub id as given."""
    if os.path.isdir(path) and not has_weights(path) and os.path.isdir(os.path.join(path, "ckpt")):
        return os.path.join(path, "ckpt")
    return path


def main(argv):
    if any(arg.startswith("--tables=") for arg in argv):  # the older spelling of python tables.py --out=FOLDER
        import tables
        return tables.main([arg.replace("--tables=", "--out=", 1) for arg in argv])
    config = cli.parse(argv, EvalConfig, USAGE)
    if not config.ckpt:
        sys.exit("error: --ckpt=DIR|MODEL_ID is required (python evaluate.py --help lists the flags)")
    if config.dtype not in ("float32", "bfloat16"):
        sys.exit(f"error: --dtype expects float32 or bfloat16, got '{config.dtype}'")
    import benchmarks  # its loaders read answers with this file's normalisation, so it imports this file
    ckpt = checkpoint_folder(os.path.expanduser(config.ckpt))
    if os.path.isdir(ckpt) and not has_weights(ckpt):
        sys.exit(f"error: {ckpt} holds no model weights (*.safetensors); pass a checkpoint folder (a run's "
                 f"ckpt/, e.g. --ckpt=out/default/ckpt) or a run folder")
    model, processor = load_model(ckpt, dtype=getattr(torch, config.dtype), device=config.device)
    paper = config.paper_settings
    if paper:
        processor.image_processor.size = dict(benchmarks.PAPER_PIXELS)
    if config.benchmarks:
        names = config.only.split(",") if config.only else [b for b in BENCHMARKS if os.path.isfile(
            os.path.join(config.benchmarks, BENCHMARKS[b][0]))]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown or not names:
            sys.exit(f"--benchmarks={config.benchmarks}: {'unknown ' + str(unknown) if unknown else 'none found'}; "
                     f"expected files: {', '.join(f'{b} = {f}' for b, (f, _, _) in BENCHMARKS.items())}")
        samples = [s for n in names for s in benchmarks.load_benchmark(n, config.benchmarks, config.limit or None)]
    elif config.data:
        samples, _ = load_jsonl(config.data)
    elif config.split == "validation":
        samples = validation_world(VALIDATION_SAMPLES, seed=config.seed)
    elif config.split == "eval":
        samples = eval_world(config.num_eval, seed=config.seed)
    else:
        sys.exit(f"error: --split expects eval or validation, got '{config.split}'")
    name = "headroom.json" if config.headroom else "eval.json"
    out = config.out or (os.path.join(ckpt, name) if os.path.isdir(ckpt) else name)
    if config.headroom:
        import gap  # it scores with this file, so it imports this file
        teacher = load_model(checkpoint_folder(config.teacher), dtype=getattr(torch, config.dtype),
                             device=config.device)[0] if config.teacher else None
        results, text = gap.headroom(model, processor, validation_world(VALIDATION_SAMPLES, seed=config.seed),
                                      teacher, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens or 96)
        print(text)
        with open(out, "w") as f:
            json.dump({**results, "ckpt": config.ckpt, "teacher": config.teacher}, f, indent=2)
        return print(f"wrote {out}")
    results, _ = write_evaluation(
        model, processor, samples, out, config.batch_size,
        config.max_new_tokens or (benchmarks.PAPER_MAX_NEW_TOKENS if paper else 96),
        messages_fn=benchmarks.paper_messages if paper else student_messages,
        sampling=benchmarks.PAPER_SAMPLING if paper else None, seed=config.seed,
        before_records=read_predictions(config.against, samples) if config.against else None)
    if config.benchmarks:
        print(benchmarks.paper_table(results["per_family"], config.ckpt))
    print(f"wrote {out}")
    if config.heatmaps > 0:
        if cue_recovery.get(model) is None:
            sys.exit(f"--heatmaps: {config.ckpt} has no cue recovery module (train it with --mode=vicur)")
        folder = os.path.join(os.path.dirname(out) or ".", "heatmaps")  # the embedded world: families in turn
        paths = cue_recovery.write_heatmaps(model, processor, samples[:config.heatmaps], folder)
        print(f"wrote {len(paths)} heat maps to {folder}/")


if __name__ == "__main__":
    main(sys.argv[1:])
