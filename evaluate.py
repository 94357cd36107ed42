"""Answer extraction, scoring, and the evaluation table.

Scoring is pure functions on strings (tests call them directly). `evaluate` answers
greedily through rollout.sample, seeing only the image and the question, and reports
accuracy per task family, the in-domain / out-of-domain averages and the
majority-answer baseline beside them.

    python evaluate.py --ckpt=DIR                 # the embedded world's evaluation set
    python evaluate.py --ckpt=DIR --data=FILE     # a JSONL file in data.py's format
"""

import json
import os
import re
import sys
from collections import Counter, defaultdict
from fractions import Fraction

import torch
from tqdm import tqdm

from data import FAMILIES, OUT_OF_DOMAIN, collate, eval_world, load_jsonl, student_messages, to_device
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


def score(prediction_text, gold):
    """True if the final answer of prediction_text equals gold; never a substring match.

    Numbers compare by value, multiple-choice letters case-insensitively ('(b)' = 'B'),
    anything else as normalised strings. None, empty or unreadable input is False.
    """
    if prediction_text is None or gold is None:
        return False
    gold = str(gold)
    prediction = extract_answer(str(prediction_text))
    if _looks_like_trace(gold):
        gold = extract_answer(gold)
    if prediction is None or gold is None:
        return False
    prediction, gold = _clean(prediction), _clean(gold)
    if not prediction or not gold:
        return False
    prediction_number, gold_number = _parse_number(prediction), _parse_number(gold)
    if prediction_number and gold_number:
        return _numbers_match(prediction_number, gold_number)
    gold_letter = _choice_letter(gold)
    if gold_letter:
        return _choice_letter(prediction) == gold_letter
    return normalize_answer(prediction) == normalize_answer(gold)


# ---------------------------------------------------------------------------
# evaluation

def family_averages(per_family):
    """Macro averages, as the paper averages benchmarks: every family counts once."""
    in_domain = [v for k, v in per_family.items() if k not in OUT_OF_DOMAIN]
    out_of_domain = [v for k, v in per_family.items() if k in OUT_OF_DOMAIN]
    mean = lambda values: sum(values) / len(values) if values else float("nan")
    return {"in_domain_avg": mean(in_domain), "ood_avg": mean(out_of_domain), "overall": mean(list(per_family.values()))}


def majority_baseline(samples):
    """Accuracy of always giving each family's most common gold answer (measured on these samples)."""
    answers = defaultdict(Counter)
    for s in samples:
        answers[s.task][normalize_answer(s.answer)] += 1
    per_family = {task: counts.most_common(1)[0][1] / sum(counts.values()) for task, counts in answers.items()}
    return {"per_family": per_family, **family_averages(per_family)}


def family_order(tasks):
    return [f for f in FAMILIES if f in tasks] + sorted(t for t in tasks if t not in FAMILIES)


@torch.no_grad()
def evaluate(model, processor, samples, batch_size=64, max_new_tokens=96, messages_fn=student_messages,
             progress=True):
    """Greedy answers for every sample -> {'per_family', 'in_domain_avg', 'ood_avg', 'overall',
    'baseline', 'counts', 'records'}. messages_fn builds the prompt: the default is what the student
    sees at inference (image + question); a privileged prompt is for diagnostics only."""
    records = []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress, leave=False):
        chunk = samples[start:start + batch_size]
        batch = to_device(collate(processor, [messages_fn(s) for s in chunk]), model.device)
        rollout = sample(model, processor, batch, greedy=True, max_new_tokens=max_new_tokens)
        for s, text in zip(chunk, rollout.texts):
            records.append({"id": s.id, "task": s.task, "prediction": text, "gold": s.answer,
                            "correct": score(text, s.answer)})
    correct = defaultdict(list)
    for r in records:
        correct[r["task"]].append(r["correct"])
    per_family = {t: sum(correct[t]) / len(correct[t]) for t in family_order(correct)}
    return {"per_family": per_family, **family_averages(per_family), "baseline": majority_baseline(samples),
            "counts": {t: len(correct[t]) for t in per_family}, "records": records}


def format_table(columns):
    """Markdown table, in percent: one column per {title: results}, the majority baseline last.
    Every column must come from the same samples."""
    first = next(iter(columns.values()))
    baseline = first["baseline"]
    lines = ["| family | n | " + " | ".join(columns) + " | majority baseline |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for task in first["per_family"]:
        kind = " (ood)" if task in OUT_OF_DOMAIN else ""
        cells = " | ".join(f"{100 * r['per_family'][task]:.1f}" for r in columns.values())
        lines.append(f"| {task}{kind} | {first['counts'][task]} | {cells} | {100 * baseline['per_family'][task]:.1f} |")
    for key, name in (("in_domain_avg", "in-domain avg"), ("ood_avg", "out-of-domain avg"), ("overall", "overall")):
        cells = " | ".join(f"**{100 * r[key]:.1f}**" for r in columns.values())
        lines.append(f"| **{name}** | | {cells} | {100 * baseline[key]:.1f} |")
    return "\n".join(lines)


def main(argv):
    import cue_recovery               # evaluate.py as a script; the library part needs no model loading
    from model import load_model
    args = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    known = {"ckpt", "data", "num_eval", "seed", "batch_size", "max_new_tokens", "out", "heatmaps", "device"}
    if "ckpt" not in args or set(args) - known or len(args) != len(argv):
        sys.exit(f"usage: python evaluate.py --ckpt=DIR [--data=FILE.jsonl] [--num_eval=N] [--seed=S] "
                 f"[--batch_size=B] [--max_new_tokens=T] [--out=FILE.json] [--heatmaps=N] [--device=D]; got {argv}")
    model, processor = load_model(args["ckpt"], device=args.get("device", "cpu"))
    if "data" in args:
        samples, _ = load_jsonl(args["data"])
    else:
        samples = eval_world(int(args.get("num_eval", 350)), seed=int(args.get("seed", 0)))
    batch_size = int(args.get("batch_size", 64))
    results = evaluate(model, processor, samples, batch_size=batch_size,
                       max_new_tokens=int(args.get("max_new_tokens", 96)))
    print(format_table({"student (image + question)": results}))
    results = {k: v for k, v in results.items() if k != "records"}
    recall = cue_recovery.evaluation_cue_recall(model, processor, samples, batch_size) \
        if cue_recovery.get(model) is not None else None
    if recall:
        results["cue_recall"] = recall
        print(cue_recovery.recall_line(recall))
    out = args.get("out", os.path.join(args["ckpt"], "eval.json"))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")
    if int(args.get("heatmaps", 0)) > 0:
        if cue_recovery.get(model) is None:
            sys.exit(f"--heatmaps: {args['ckpt']} has no cue recovery module (train it with --mode=vicur)")
        folder = os.path.join(os.path.dirname(out) or ".", "heatmaps")  # the embedded world: families in turn
        paths = cue_recovery.write_heatmaps(model, processor, samples[:int(args["heatmaps"])], folder)
        print(f"wrote {len(paths)} heat maps to {folder}/")


if __name__ == "__main__":
    main(sys.argv[1:])
