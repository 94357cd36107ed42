"""The real-checkpoint path, offline: a checkpoint directory this test writes (a tiny Qwen3-VL saved
with save_pretrained, a tokenizer with Qwen's special-token names and a Qwen-style chat template)
goes through from_pretrained exactly as Qwen/Qwen3-VL-2B-Instruct would, and trains on a JSONL file."""
import dataclasses
import os

import cue_recovery
import train
from data import make_world, write_jsonl
from model import load_model

# Qwen's chat layout: a default system turn, images and videos as vision_start/pad/vision_end,
# optional "Picture N:" labels, and the assistant turn opened for generation
QWEN_STYLE_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_checkpoint(folder):
    model, processor = load_model("tiny", seed=1)
    processor.chat_template = QWEN_STYLE_TEMPLATE
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_saved_qwen3_vl_directory_loads_through_from_pretrained(tmp_path):
    folder = write_checkpoint(tmp_path / "Qwen3-VL-tiny")
    model, processor = load_model(str(folder))
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor.tokenizer.padding_side == "left"
    sample = make_world(1)[0]
    text = processor.apply_chat_template([[{"role": "user", "content": [
        {"type": "image", "image": sample.image}, {"type": "text", "text": sample.question}]}]],
        add_generation_prompt=True, tokenize=False)[0]
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_vicur_and_opd_train_a_checkpoint_directory_on_a_jsonl_file(tmp_path, capsys):
    """--student=DIR --data=FILE: samples without a cue fall back to the plain prompt, counted and reported."""
    folder = str(write_checkpoint(tmp_path / "Qwen3-VL-tiny"))
    samples = make_world(24, seed=2)
    samples = [dataclasses.replace(s, cue=None) if i % 4 == 0 else s for i, s in enumerate(samples)]
    write_jsonl(samples, tmp_path / "data" / "train.jsonl")
    common = [f"--data={tmp_path / 'data' / 'train.jsonl'}", "--num_eval=4", "--max_steps=2", "--batch_size=2",
              "--max_new_tokens=8", "--eval_batch_size=4"]
    train.main(["--mode=vicur", f"--student={folder}", f"--out_dir={tmp_path / 'vicur'}"] + common)
    printed = capsys.readouterr().out
    assert "note: 5 of 20 training samples have no cues; for them the teacher sees the student's prompt" in printed
    assert "SFT stage" not in printed                       # a real checkpoint is distilled as it is
    trained, _ = load_model(str(tmp_path / "vicur" / "ckpt"))
    assert cue_recovery.get(trained) is not None            # the student's module came back with it
    train.main(["--mode=opd", f"--student={folder}", f"--teacher={folder}", f"--out_dir={tmp_path / 'opd'}"] + common)
    assert os.path.exists(tmp_path / "opd" / "eval.json")
