"""Sampling against transformers' own generate, and log-probs against a teacher-forced forward."""
import copy

import torch

from data import collate, eval_world, model_inputs, student_messages
from rollout import VISION_TOKENS, filter_logits, repeat_batch, sample


def prompt_batch(processor, n=6, seed=1):
    return collate(processor, [student_messages(s) for s in eval_world(n, seed=seed)])


def teacher_forced_logprobs(model, processor, batch, rollout, n=1):
    """log p(y_t) from one forward over prompt + completion, built by a fresh collate."""
    chats = [student_messages(s) for s in eval_world(len(rollout.texts) // n, seed=1) for _ in range(n)]
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    full = collate(processor, chats, completions)
    logprobs = model(**model_inputs(full)).logits.float().log_softmax(-1)
    token_logprobs = logprobs[:, :-1].gather(-1, full["input_ids"][:, 1:, None])[..., 0]
    return token_logprobs[full["completion_mask"][:, 1:].bool()]


def test_greedy_equals_generate_token_for_token(tiny):
    model, processor = tiny
    batch = prompt_batch(processor)
    rollout = sample(model, processor, batch, greedy=True, max_new_tokens=16)
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    generated = model.generate(**model_inputs(batch), max_new_tokens=16, do_sample=False, suppress_tokens=vision_ids)
    reference = generated[:, batch["input_ids"].shape[1]:]
    ours = rollout.completion_ids[:, :reference.shape[1]]
    # generate pads finished rows with pad_token_id, as we do
    assert torch.equal(ours, reference)


def test_logprobs_equal_a_fresh_forward_pass(tiny):
    model, processor = tiny
    batch = prompt_batch(processor)
    generator = torch.Generator().manual_seed(0)
    rollout = sample(model, processor, batch, n=2, temperature=1.0, max_new_tokens=12, generator=generator)
    reference = teacher_forced_logprobs(model, processor, batch, rollout, n=2)
    assert torch.allclose(rollout.logprobs[rollout.completion_mask.bool()], reference, atol=1e-4)


def test_temperature_logprobs_are_of_the_tempered_distribution(tiny):
    model, processor = tiny
    batch = prompt_batch(processor, n=2)
    rollout = sample(model, processor, batch, temperature=0.5, max_new_tokens=6,
                     generator=torch.Generator().manual_seed(1))
    full_logits_first = model(**model_inputs(batch)).logits[:, -1].float()
    expected = (full_logits_first / 0.5).log_softmax(-1).gather(-1, rollout.completion_ids[:, :1])[:, 0]
    assert torch.allclose(rollout.logprobs[:, 0], expected, atol=1e-4)


def test_repeat_batch_keeps_each_rows_image(tiny):
    model, processor = tiny
    batch = prompt_batch(processor, n=3)
    repeated = repeat_batch(batch, 2)
    single = model(**model_inputs(batch)).logits[:, -1]
    double = model(**model_inputs(repeated)).logits[:, -1]
    assert torch.allclose(double[0::2], single, atol=1e-5) and torch.allclose(double[1::2], single, atol=1e-5)


def test_stops_at_end_of_turn_and_masks_after_it(tiny):
    model, processor = tiny
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every token equally likely, so some rows end early
    batch = prompt_batch(processor, n=4)
    rollout = sample(uniform, processor, batch, n=4, max_new_tokens=40, generator=torch.Generator().manual_seed(2))
    stop_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    stopped = 0
    for ids, mask in zip(rollout.completion_ids, rollout.completion_mask):
        stops = torch.isin(ids, torch.tensor(stop_ids)).nonzero()
        if len(stops) and stops[0, 0] < len(ids) - 1:
            first = stops[0, 0]
            assert mask[: first + 1].all() and not mask[first + 1:].any()
            assert (ids[first + 1:] == processor.tokenizer.pad_token_id).all()
            stopped += 1
    assert stopped >= 2


def test_rollouts_never_contain_vision_placeholders(tiny):
    model, processor = tiny
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every token equally likely, vision tokens included
    rollout = sample(uniform, processor, prompt_batch(processor, n=4), n=4, max_new_tokens=30,
                     generator=torch.Generator().manual_seed(3))
    vision_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS])
    assert not torch.isin(rollout.completion_ids, vision_ids).any()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=1.0)).tolist() == [[False, False, False, False]]
