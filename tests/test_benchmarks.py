"""The paper's seven benchmarks: each loader on a few records written here in that benchmark's
format (VLMEvalKit's TSVs, our JSONL for Vision-R1, frame folders for Video-MME), the paper's
evaluation settings, and scoring on real-looking outputs."""
import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

import evaluate
from data import collate
from data import load_frames
from benchmarks import load_benchmark, paper_messages
from data import BENCHMARKS
from evaluate import score
from rollout import sample_completions
from test_rollout import GREEDY_MARGIN, top2_margins


def b64(color, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A benchmarks folder holding a few records of each of the seven."""
    root = tmp_path_factory.mktemp("benchmarks")
    (root / "images").mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "images" / "g1.png")
    with open(root / "vision_r1_test.jsonl", "w") as f:
        f.write(json.dumps({"image": "images/g1.png", "question": "<image>Find x.", "answer": "3", "id": "g1"}) + "\n")
    write_tsv(root / "DynaMath.tsv", [
        {"index": 0, "image": b64("red"), "question": "Is Dark Magenta greater than Rosy Brown? Choices: (A) yes (B) no",
         "answer": "B", "answer_type": "multiple choice", "qid": 5, "varid": 1},
        {"index": 1, "image": "0", "question": "What is the period of this function? Answer the question with a "
         "floating-point number.", "answer": "2.0944", "answer_type": "float", "qid": 6, "varid": 1},  # reuses row 0's image
        {"index": 2, "image": b64("blue"), "question": "Which month is the hottest?", "answer": "May",
         "answer_type": "text", "qid": 7, "varid": 1}])
    write_tsv(root / "MathVista_MINI.tsv", [
        {"index": 5, "image": b64("green"), "question": "Find $m\\angle H$", "answer": "97", "answer_option": "A",
         "choices": "['97', '102', '107', '122']", "question_type": "multi_choice", "answer_type": "text"},
        {"index": 1, "image": b64("green"), "question": "By what distance $d$ is the spring compressed?",
         "answer": "1.2", "choices": "", "question_type": "free_form", "answer_type": "float", "precision": "1.0"}])
    write_tsv(root / "WeMath.tsv", [
        {"index": 0, "image": b64("gray"), "question": "OA = ( ) m, AB = ( ) m", "A": "300, 400", "B": "400, 300",
         "C": "3000, 4000", "D": "4000, 3000", "E": "No correct answer", "answer": "C", "ID": "2steps_1",
         "key": "2steps_1"}])
    write_tsv(root / "MathVerse_MINI.tsv", [
        {"index": 0, "image": b64("white"), "question": "As shown in the figure, find the angle.\nChoices:\nA:40°\n"
         "B:60°\nC:80°\nD:100°", "answer": "B", "question_type": "multi-choice", "problem_version": "Vision Intensive"},
        {"index": 1, "image": b64("white"), "question": "Find L.", "answer": "14", "question_type": "free-form",
         "problem_version": "Text Dominant"}])
    write_tsv(root / "MMMU_DEV_VAL.tsv", [
        {"index": 0, "image": b64("red"), "question": "<image 1> dev question", "A": "x", "B": "y", "answer": "A",
         "split": "dev"},
        {"index": 1, "image": str([b64("red", (20, 10)), b64("blue", (30, 16))]),
         "question": "<image 1> <image 2> Which costs are incurred?", "A": "$6", "B": "$7", "C": "$8", "D": "$9",
         "answer": "B", "split": "validation"},
        {"index": 2, "image": b64("red"), "question": "<image 1> What is the ratio?", "A": "", "B": "",
         "answer": "1.06", "split": "validation"}])
    (root / "video" / "fFjv93ACGo8").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (48, 32), (60 * i, 0, 0)).save(root / "video" / "fFjv93ACGo8" / f"{i:03d}.jpg")
    (root / "video" / "fFjv93ACGo8" / "fps.txt").write_text("0.5\n")     # 4 frames of an 8-second video
    write_tsv(root / "Video-MME.tsv", [
        {"index": 0, "video": "fFjv93ACGo8", "question": "Which decoration is most numerous?",
         "candidates": str(["A. Apples.", "B. Candles.", "C. Berries.", "D. The same."]), "answer": "C",
         "duration": "short"}])
    return root


def test_every_loader_reads_its_format(folder):
    loaded = {name: load_benchmark(name, folder) for name in BENCHMARKS}
    assert {name: len(samples) for name, samples in loaded.items()} == {
        "vision_r1": 1, "dynamath": 3, "mathvista": 2, "wemath": 1, "mathverse": 2, "mmmu": 2, "video_mme": 1}
    assert all(s.task == name for name, samples in loaded.items() for s in samples)
    assert loaded["vision_r1"][0].question == "Find x."
    mc, num, text = loaded["dynamath"]
    assert (mc.answer, mc.choices, num.tolerance, text.choices) == ("B", ["yes", "no"], 1e-3, [])
    assert num.image.size == mc.image.size                             # the image reused from row 0
    vista_mc, vista_float = loaded["mathvista"]
    assert (vista_mc.answer, vista_mc.choices[0]) == ("A", "97") and "A. 97" in vista_mc.question
    assert vista_float.tolerance == pytest.approx(0.05)                 # precision 1: right when rounded to 1.2
    assert loaded["wemath"][0].choices[2] == "3000, 4000" and "E. No correct answer" in loaded["wemath"][0].question
    assert loaded["mathverse"][0].choices == ["40°", "60°", "80°", "100°"] and loaded["mathverse"][1].choices == []
    mmmu_mc, mmmu_open = loaded["mmmu"]                                # the dev row is left out
    assert [i.size for i in mmmu_mc.image] == [(20, 10), (30, 16)] and mmmu_mc.choices == ["$6", "$7", "$8", "$9"]
    assert (mmmu_open.choices, mmmu_open.tolerance, mmmu_open.answer) == ([], 0.005, "1.06")
    assert score("The ratio is about 1.057, so the answer is 1.057", mmmu_open.answer, (), mmmu_open.tolerance)
    video = loaded["video_mme"][0]
    frames, fps = load_frames(video.video)
    assert video.image is None and len(frames) == 4 and fps == 0.5 and video.choices[1] == "Candles."
    assert load_benchmark("dynamath", folder, limit=2)[1].answer == "2.0944"


def test_empty_cells_as_pandas_writes_them(tmp_path):
    """pandas writes NaN as an empty cell: an absent option ends the options, an absent answer_option
    is found from the answer's text, and an absent image or answer is an error naming the line."""
    write_tsv(tmp_path / "MathVista_MINI.tsv", [
        {"index": 1, "image": b64("red"), "question": "Which is largest?", "answer": "2.0", "answer_option": "",
         "choices": "['1', '2', '3']", "question_type": "multi_choice", "precision": ""}])
    (vista,) = load_benchmark("mathvista", tmp_path)
    assert (vista.answer, vista.tolerance) == ("B", 0.0)
    write_tsv(tmp_path / "WeMath.tsv", [{"index": 0, "image": b64("red"), "question": "q", "A": "x", "B": "y",
                                         "C": "", "D": "", "answer": "B"},
                                        {"index": 1, "image": "", "question": "q", "A": "x", "answer": "A"}])
    with pytest.raises(ValueError, match=r"WeMath.tsv:3: no image"):
        load_benchmark("wemath", tmp_path)
    assert load_benchmark("wemath", tmp_path, limit=1)[0].choices == ["x", "y"]
    write_tsv(tmp_path / "DynaMath.tsv", [{"index": 0, "image": b64("red"), "question": "q", "answer": "nan"}])
    with pytest.raises(ValueError, match=r"DynaMath.tsv:2: no answer"):
        load_benchmark("dynamath", tmp_path)


def test_a_bad_row_names_the_file_and_line(folder, tmp_path):
    write_tsv(tmp_path / "WeMath.tsv", [{"index": 0, "image": b64("red"), "question": "q", "A": "x", "answer": "A"},
                                        {"index": 1, "image": "7", "question": "q", "A": "x", "answer": "A"}])
    with pytest.raises(ValueError, match=r"WeMath.tsv:3: image refers to index 7"):
        load_benchmark("wemath", tmp_path)
    with pytest.raises(FileNotFoundError, match="DynaMath.tsv"):
        load_benchmark("dynamath", tmp_path)
    write_tsv(tmp_path / "Video-MME.tsv", [{"index": 0, "video": "missing", "question": "q",
                                            "candidates": "['A. x']", "answer": "A"}])
    with pytest.raises(ValueError, match="Video-MME.tsv:2: no frames folder"):
        load_benchmark("video_mme", tmp_path)
    write_tsv(tmp_path / "Video-MME.tsv", [{"index": 0, "video": "missing", "question": "q", "answer": "A"}])
    with pytest.raises(ValueError, match="Video-MME.tsv:2: no 'candidates' column"):
        load_benchmark("video_mme", tmp_path)


def test_video_and_multi_image_questions_go_through_the_processor_and_sampling(tiny, folder):
    """A batch mixing a Video-MME question (frames through the video processor) and an MMMU question:
    our sampler's greedy tokens equal transformers' generate on it."""
    model, processor = tiny
    samples = load_benchmark("video_mme", folder) * 2 + load_benchmark("mmmu", folder)[:1]   # two videos, two images
    batch = collate(processor, [paper_messages(s) for s in samples])
    assert batch["video_grid_thw"].shape == (2, 3) and batch["image_grid_thw"].shape == (2, 3)
    assert set(batch["mm_token_type_ids"][0].unique().tolist()) == {0, 2}   # video tokens in the first row
    ours = sample_completions(model, processor, batch, greedy=True, max_new_tokens=6)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    reference = generated.sequences[:, batch["input_ids"].shape[1]:]
    # generate, our decode, and our decode on the doubled batch are three paths: no compared token may be
    # a near-tie that rounding on another CPU could flip (see test_rollout.GREEDY_MARGIN); generate may
    # pick a vision placeholder and we may not, so the margin is over all tokens
    margins = top2_margins(torch.stack(generated.logits, dim=1))                      # (B, T)
    assert margins[ours.completion_mask[:, :reference.shape[1]].bool()].min() > GREEDY_MARGIN
    assert torch.equal(ours.completion_ids[:, :reference.shape[1]], reference)
    twice = sample_completions(model, processor, batch, n=2, greedy=True, max_new_tokens=6)   # each row's video/images repeated
    assert torch.equal(twice.completion_ids[::2], ours.completion_ids)
    assert torch.equal(twice.completion_ids[1::2], ours.completion_ids)


def test_the_paper_settings_sample_reproducibly_and_print_the_paper_table(tiny, folder, tmp_path, capsys):
    model, processor = tiny
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    argv = [f"--ckpt={tmp_path / 'ckpt'}", f"--benchmarks={folder}", "--paper_settings=true", "--max_new_tokens=4",
            "--batch_size=3"]
    evaluate.main(argv + [f"--out={tmp_path / 'a.json'}"])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "Vision R1-Test" in line)
    assert header.split("|")[2:-1] == [f" {BENCHMARKS[b][2]} " for b in BENCHMARKS] + [" Avg. "]
    # other batches, same samples: each sample's tokens come from its own generator, so they match; the
    # batches differ in rounding only (~1e-6 on logits), which could flip a draw only where two tokens'
    # p_i / E_i (multinomial's exponential race) or the top-p boundary lie within ~1e-6 of each other
    # (a chance of ~1e-4 over these ~50 draws), unlike greedy argmaxes, which are checked for near-ties
    evaluate.main(argv[:-1] + ["--batch_size=5", f"--out={tmp_path / 'b.json'}"])
    predictions = [[json.loads(line)["prediction"] for line in open(tmp_path / f"{n}_predictions.jsonl")]
                   for n in "ab"]
    assert predictions[0] == predictions[1]
    assert json.load(open(tmp_path / "a.json"))["settings"] == "paper (sampled)"
    evaluate.main(argv + ["--seed=1", f"--out={tmp_path / 'c.json'}"])          # sampled: another seed differs
    other = [json.loads(line)["prediction"] for line in open(tmp_path / "c_predictions.jsonl")]
    assert other != predictions[0]


@pytest.mark.parametrize("output, gold, choices, tolerance, right", [
    ("First, the triangle has sides 3, 4 and 5.\nSo its perimeter is 3 + 4 + 5 = 12.\nThe answer is \\boxed{12}.",
     "12", [], 0, True),
    ("Comparing the two bars, the magenta one is shorter. Therefore the answer is (B) no.", "B", ["yes", "no"], 0, True),
    ("Comparing the bars... so the answer is no.", "B", ["yes", "no"], 0, True),          # option text, not letter
    ("Comparing the bars... so the answer is yes.", "B", ["yes", "no"], 0, False),
    ("After weighing every option, the correct option is (C).", "C", ["a", "b", "c", "d"], 0, True),
    ("Answer: C. 3000, 4000", "C", ["300, 400", "400, 300", "3000, 4000"], 0, True),
    ("The spring is compressed by \\boxed{1.2 m}.", "1.2", [], 0.05, True),              # units
    ("The spring is compressed by 1.24 m, so the answer is 1.24 m", "1.2", [], 0.05, True),  # rounds to 1.2
    ("so the answer is 1.3", "1.2", [], 0.05, False),
    ("The period is 2\\pi/3, which is about 2.0944. Final answer: 2.094", "2.0944", [], 1e-3, True),
    ("The angle is 60°, so the answer is 60^\\circ.", "60", [], 0, True),
    ("The answer is 12 square units.", "12", [], 0, True),
    ("The answer is 50%.", "50", [], 0, False),                                       # a percentage is not 50
    ("The hottest month is May, so the answer is May.", "may", [], 0, True),
    ("The answer is Mayday.", "May", [], 0, False),                                   # never a substring
    ("The answer is 50 percent.", "50", [], 0, False),                                # words that change the number
    ("The answer is 12 pi.", "12", [], 0, False),
    ("So the answer is 60.", "B", ["40°", "60°", "80°"], 0, True),                   # option text without its unit
    ("The ratio is 1.06, so the answer is 1.057.", "1.06", [], 0.005, True),          # MMMU: 2 decimals
])
def test_scoring_real_looking_outputs(output, gold, choices, tolerance, right):
    assert score(output, gold, choices, tolerance) is right
