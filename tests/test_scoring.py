"""Answer extraction, normalisation and scoring, checked against hand-written cases."""
from evaluate import extract_answer, score, normalize_answer

import random
import string

import pytest


# ---------------------------------------------------------------------------
# extract_answer

@pytest.mark.parametrize("text, expected", [
    # \boxed{}, nested braces, last one wins, spaced tokens
    (r"so we get \boxed{42}.", "42"),
    (r"the result is \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\text{yes}}", r"\text{yes}"),
    (r"first \boxed{3} then, correcting, \boxed{4}", "4"),
    (r"the answer is \boxed { 7 } .", "7"),
    (r"\boxed{5} but the answer is 6", "5"),  # \boxed beats "the answer is"
    # <answer> tags
    ("<think>3 + 4 = 7</think><answer>7</answer>", "7"),
    ("<answer> first </answer> hmm <answer>second</answer>", "second"),
    ("< answer > blue < / answer >", "blue"),
    ("<ANSWER>\nB\n</ANSWER>", "B"),
    # GSM8K marker
    ("She pays 3 * 24 = 72 dollars.\n#### 72", "72"),
    # answer phrases
    ("Answer: 12", "12"),
    ("answer : 12", "12"),
    ("ANSWER: Paris", "Paris"),
    ("The final answer is 3.", "3"),
    ("the final answer is: 3", "3"),
    ("So the answer is yes.", "yes"),
    ("**Answer:** 9", "9"),
    ("The answer is **9**.", "9"),
    ("Final Answer:\n\n8", "8"),
    ("the answer is 7, since 3 + 4 = 7.", "7"),
    ("The answer is 5. Then some trailing words here.", "5"),
    ("the answer is 4\nbecause the rest follows", "4"),
    ("the answer is 1. no wait, the answer is 2.", "2"),  # last occurrence wins
    # decimals, commas, fractions survive the sentence cut
    ("the answer is 2.5.", "2.5"),
    ("the answer is 2.5", "2.5"),
    ("the answer is 0.75 meters.", "0.75 meters"),
    ("the answer is 1,000.", "1,000"),
    ("the answer is 3/4.", "3/4"),
    ("the answer is $\\frac{3}{4}$.", "$\\frac{3}{4}$"),
    ("the answer is -3.", "-3"),
    # our tokenizer's spaced decoding
    ("b2 has a red circle . so the answer is 2 .", "2"),
    ("the answer is yes .", "yes"),
    ("count them : 1 , 2 , 3 . so the answer is 3 . done", "3"),
    # multiple-choice letters when the text is just that
    ("(B)", "B"),
    ("B.", "B"),
    ("option c", "C"),
    ("( d )", "D"),
    ("The answer is (B).", "(B)"),
    # fallback: a short last line
    ("Some reasoning about the picture.\n42", "42"),
    ("Let me look.\nthe red one", "the red one"),
    ("blue", "blue"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    None,
    "",
    "   \n  ",
    "I looked at the picture and could not decide what it shows at all",
    "We need to find the answer. Let me think about the whole picture carefully now.",
    "<answer></answer> and then nothing much more than this sentence",
    12,
])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


# ---------------------------------------------------------------------------
# normalize_answer

@pytest.mark.parametrize("a, b", [
    ("1,000", "1000"),
    ("2.50", "2.5"),
    ("0.5", "1/2"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{1}{2}", "1/2"),
    (r"\dfrac12", "1/2"),
    (r"\tfrac{3}{4}", "0.75"),
    ("-3", "\u22123"),  # unicode minus
    ("+3", "3"),
    ("- 3", "-3"),
    ("1 / 2", "1/2"),
    ("3.", "3"),
    ("$5$", "5"),
    (r"$\frac{1}{2}$", "0.5"),
    (r"\text{Yes}", "yes"),
    ("  Red  Car. ", "red car"),
    ("1\\,000", "1000"),
    ("12,345.5", "12345.5"),
])
def test_normalize_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize("a, b", [
    ("50%", "50"),  # a percentage is not its number, on purpose
    ("12", "2"),
    ("1 2", "12"),
    ("1,5", "15"),
    ("red", "reddish"),
    ("0.5", "5"),
    ("-3", "3"),
])
def test_normalize_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_normalize_canonical_forms():
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("2.50") == "5/2"
    assert normalize_answer(" $\\text{The Cat}$. ") == "the cat"


# ---------------------------------------------------------------------------
# score

@pytest.mark.parametrize("prediction, gold", [
    ("the answer is 7.", "7"),
    ("the answer is 7.", 7),  # gold straight from a dataset as an int
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{\frac{1}{2}}", "1/2"),
    ("Answer: 1,000", "1000"),
    ("Answer: 2.50", "2.5"),
    ("Answer: -3", "\u22123"),
    ("Answer: +3", "3"),
    ("the answer is 3.0000001", "3"),  # decimals within relative 1e-6
    ("the answer is 0.3333333", "1/3"),
    ("the answer is YES.", "yes"),
    ("So the answer is Yes .", "yes"),
    ("b2 has a red circle . so the answer is 2 .", "2"),
    ("the answer is (b).", "B"),
    ("the answer is B.", "(B)"),
    ("option b", "b"),
    ("The answer is (B) a red circle.", "B"),
    ("<answer>(C)</answer>", "C"),
    ("the answer is \\text{blue}.", "Blue"),
    ("the answer is $42$.", "42"),
    ("<answer>4</answer>", "#### 4"),  # gold that is itself a trace
    ("the answer is 4", r"so it is \boxed{4}"),
    ("the answer is 7 apples", "7"),  # a number followed by its unit or noun reads as the number
    ("the answer is 3.5 cm", "3.5"),
])
def test_score_true(prediction, gold):
    assert score(prediction, gold) is True


@pytest.mark.parametrize("prediction, gold", [
    # never a substring match
    ("the answer is 12.", "2"),
    ("the answer is 2.", "12"),
    ("the answer is yes.", "yes and no"),
    ("the answer is yes and no.", "yes"),
    ("the answer is reddish.", "red"),
    ("the answer is red.", "reddish"),
    ("the answer is 7 apples", "8"),
    ("the answer is 7 apples and 2 pears", "7"),
    ("the answer is 3 hundred", "3"),  # words that change the number are not units
    # close but not equal numbers
    ("the answer is 3.001", "3"),
    ("the answer is 0.33", "1/3"),
    ("the answer is 50%", "50"),
    ("the answer is -3", "3"),
    # wrong letter, or a word that merely starts like a letter
    ("the answer is (C).", "B"),
    ("the answer is a cat.", "A"),
    ("blue", "B"),
    # None, empty, nothing extractable
    (None, "7"),
    ("the answer is 7", None),
    ("", "7"),
    ("the answer is 7", ""),
    ("   ", "  "),
    ("I could not work out what the picture shows at all, sorry", "7"),
    ("the answer is 7", "#### "),
])
def test_score_false(prediction, gold):
    assert score(prediction, gold) is False


LONG_TRACE = """Let me count the objects in the image.
There are 3 red cubes and 4 blue spheres, so 3 + 4 = 7 objects.
Wait, one sphere is hidden behind a cube: 7 - 1 = 6 visible... no, hidden ones count.
Checking again: 3 cubes, 4 spheres, 2 + 1 + 4 = 7.
Therefore, the answer is 7."""


@pytest.mark.parametrize("gold, expected", [("7", True), ("3", False), ("4", False), ("6", False)])
def test_score_only_the_final_answer_counts(gold, expected):
    assert score(LONG_TRACE, gold) is expected


def test_score_never_raises_on_odd_input():
    rng = random.Random(0)
    alphabet = string.printable + "{}\\$<>/#−√π你"
    fragments = ["\\boxed{", "}", "<answer>", "</answer>", "answer:", "the answer is",
                 "####", "\\frac{", "1,000", "2.5", "(B)", "1" * 5000, "/0", "."]
    for _ in range(1000):
        length = rng.randint(0, 60)
        pieces = [rng.choice(alphabet) if rng.random() < 0.8 else rng.choice(fragments)
                  for _ in range(length)]
        prediction = "".join(pieces)
        gold = "".join(rng.choice(alphabet + "0123456789") for _ in range(rng.randint(0, 8)))
        assert score(prediction, gold) in (True, False)
        assert score(gold, prediction) in (True, False)
    for odd in [b"bytes", 3.5, 0, [], {}, object(), "\x00", "}" * 100, "\\boxed{" * 100]:
        assert score(odd, "7") in (True, False)
        assert score("the answer is 7", odd) in (True, False)
