"""Sampling against transformers' own generate, and log-probs against a teacher-forced forward."""
import copy

import pytest
import torch

from data import collate, eval_world, model_inputs, student_messages
from rollout import VISION_TOKENS, filter_logits, repeat_batch, sample_completions


def prompt_batch(processor, n=6, seed=1):
    return collate(processor, [student_messages(s) for s in eval_world(n, seed=seed)])


# Two float32 computations of the same log-prob along different paths (one token at a time through the
# KV cache vs one forward over prompt + completion, other padding) differ by rounding: here <= 1e-6, a few
# ulps of |log p| ~ 5 (eps = 1.2e-7), after 4 layers of width-128 matmuls with values of size ~1.
# 2^10 eps = 1.2e-4 leaves a 100x margin for another CPU's summation order; the bugs these tests are
# for (a wrong position, a filter leaking into the log-prob) move log-probs by > 1e-2.
LOGPROB_TOLERANCE = 2 ** 10 * torch.finfo(torch.float32).eps


# Greedy tokens chosen along two paths agree where the top-2 logit margin exceeds the paths' rounding
# difference: logits of size ~1 differ by <= 1e-6 between paths here and between CPU kernels
# (ATEN_CPU_CAPABILITY=default vs avx2: 8e-7). A greedy comparison first checks that every compared
# token won by more than 1e-4 (100x that), so no near-tie can flip it on another CPU; this model's
# margins are >= 5e-4 on the prompts compared.
GREEDY_MARGIN = 1e-4


def top2_margins(logits, banned_ids=()):
    """(...,) top-1 minus top-2 of logits (..., V), the banned ids out of the running."""
    logits = logits.float().clone()
    logits[..., list(banned_ids)] = float("-inf")
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def teacher_forced_logits(model, processor, rollout, n=1):
    """(N, V) float32 logits that predict each of the N completion tokens of the rollout (row-major),
    from one forward over prompt + completion built by a fresh collate; and the completions as lists."""
    chats = [student_messages(s) for s in eval_world(len(rollout.texts) // n, seed=1) for _ in range(n)]
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    full = collate(processor, chats, completions)
    with torch.no_grad():
        logits = model(**model_inputs(full)).logits[:, :-1].float()
    return logits[full["completion_mask"][:, 1:].bool()], completions


def teacher_forced_logprobs(model, processor, batch, rollout, n=1, temperature=1.0):
    """log softmax(logits / T)[y_t] from one forward over prompt + completion: (N,)."""
    logits, completions = teacher_forced_logits(model, processor, rollout, n)
    tokens = torch.tensor([token for completion in completions for token in completion])
    return (logits / temperature).log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def test_greedy_equals_generate_token_for_token(tiny):
    model, processor = tiny
    batch = prompt_batch(processor)
    rollout = sample_completions(model, processor, batch, greedy=True, max_new_tokens=16)
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    generated = model.generate(**model_inputs(batch), max_new_tokens=16, do_sample=False, suppress_tokens=vision_ids,
                               output_logits=True, return_dict_in_generate=True)
    reference = generated.sequences[:, batch["input_ids"].shape[1]:]
    ours = rollout.completion_ids[:, :reference.shape[1]]
    # our cached decode and generate's are two paths: no compared token may be a near-tie (see GREEDY_MARGIN)
    margins = top2_margins(torch.stack(generated.logits, dim=1), vision_ids)          # (B, T)
    assert margins[rollout.completion_mask[:, :reference.shape[1]].bool()].min() > GREEDY_MARGIN
    # generate pads finished rows with pad_token_id, as we do
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic_cache", "static_cache"])
def test_logprobs_equal_a_fresh_forward_pass(tiny, static_cache):
    model, processor = tiny
    batch = prompt_batch(processor)
    generator = torch.Generator().manual_seed(0)
    rollout = sample_completions(model, processor, batch, n=2, temperature=1.0, max_new_tokens=12, generator=generator,
                                 static_cache=static_cache)
    reference = teacher_forced_logprobs(model, processor, batch, rollout, n=2)
    assert torch.allclose(rollout.logprobs[rollout.completion_mask.bool()], reference, rtol=0, atol=LOGPROB_TOLERANCE)


def seen_before(completions, vocab_size):
    """(N, V) bool: token v already appears earlier in the same completion (what the presence penalty hits)."""
    rows = []
    for completion in completions:
        seen = torch.zeros(vocab_size, dtype=torch.bool)
        for token in completion:
            rows.append(seen.clone())
            seen[token] = True
    return torch.stack(rows)


@pytest.mark.parametrize("filters", [dict(presence_penalty=1.5), dict(top_k=5), dict(top_p=0.8),
                                     dict(top_k=20, top_p=0.8, presence_penalty=1.5),
                                     dict(greedy=True, presence_penalty=1.5)],
                         ids=["presence_penalty", "top_k", "top_p", "paper_settings", "greedy_presence_penalty"])
def test_logprobs_are_the_tempered_models_whatever_the_sampling_filters(tiny, filters):
    """pi_old(y_t) = softmax(z_t / T)[y_t] of the model: the filters choose what is drawn, and must not
    leak into the log-prob (else a PPO ratio starts != 1)."""
    model, processor = tiny
    batch = prompt_batch(processor)
    temperature = 0.7
    rollout = sample_completions(model, processor, batch, n=2, temperature=temperature, max_new_tokens=12,
                     generator=torch.Generator().manual_seed(4), **filters)
    logits, completions = teacher_forced_logits(model, processor, rollout, n=2)            # (N, V)
    tokens = torch.tensor([token for completion in completions for token in completion])[:, None]
    reference = (logits / temperature).log_softmax(-1).gather(-1, tokens)[:, 0]
    ours = rollout.logprobs[rollout.completion_mask.bool()]
    assert len(ours) >= 60 and (ours - reference).abs().max() <= LOGPROB_TOLERANCE
    # the filters are in force here: the log-prob of the filtered distribution is far from the model's
    filtered = logits - filters.get("presence_penalty", 0.0) * seen_before(completions, logits.shape[-1]).float()
    filtered = filter_logits(filtered / temperature, filters.get("top_k", 0), filters.get("top_p", 1.0))
    leaked = filtered.log_softmax(-1).gather(-1, tokens)[:, 0]
    assert (leaked - reference).abs().max() > 100 * LOGPROB_TOLERANCE


def test_temperature_logprobs_are_of_the_tempered_distribution(tiny):
    model, processor = tiny
    batch = prompt_batch(processor, n=2)
    rollout = sample_completions(model, processor, batch, temperature=0.5, max_new_tokens=6,
                     generator=torch.Generator().manual_seed(1))
    full_logits_first = model(**model_inputs(batch)).logits[:, -1].float()
    expected = (full_logits_first / 0.5).log_softmax(-1).gather(-1, rollout.completion_ids[:, :1])[:, 0]
    # the first token: prefill (logits_to_keep=1) vs a full forward, two paths (see LOGPROB_TOLERANCE)
    assert torch.allclose(rollout.logprobs[:, 0], expected, rtol=0, atol=LOGPROB_TOLERANCE)


def test_repeat_batch_keeps_each_rows_image(tiny):
    model, processor = tiny
    batch = prompt_batch(processor, n=3)
    repeated = repeat_batch(batch, 2)
    single = model(**model_inputs(batch)).logits[:, -1]
    double = model(**model_inputs(repeated)).logits[:, -1]
    # batch 6 vs batch 3: other GEMM shapes, so logits of size ~1 may differ by rounding (~1e-6 on another
    # CPU); 1e-4 leaves a 100x margin, and a row given another row's image moves its logits by > 0.1
    assert torch.allclose(double[0::2], single, atol=1e-4) and torch.allclose(double[1::2], single, atol=1e-4)


def test_stops_at_end_of_turn_and_masks_after_it(tiny):
    model, processor = tiny
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every token equally likely, so some rows end early
    batch = prompt_batch(processor, n=4)
    rollout = sample_completions(uniform, processor, batch, n=4, max_new_tokens=40, generator=torch.Generator().manual_seed(2))
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
    rollout = sample_completions(uniform, processor, prompt_batch(processor, n=4), n=4, max_new_tokens=30,
                     generator=torch.Generator().manual_seed(3))
    vision_ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS])
    assert not torch.isin(rollout.completion_ids, vision_ids).any()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    # the mass before the third token is 0.8 exactly in decimals, not in float32 (a softmax of logs): which
    # side of top_p=0.8 it falls on is rounding, so the boundary is checked just on either side of it
    assert torch.isinf(filter_logits(logits, top_p=0.799)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.801)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=1.0)).tolist() == [[False, False, False, False]]


@pytest.mark.parametrize("with_module", [False, True], ids=["plain", "cue_module"])
def test_the_static_cache_decodes_the_dynamic_caches_tokens(tiny, with_module):
    """The preallocated cache attends over a longer, masked key length: other float sums, the same tokens.
    Greedy, so each compared token is first checked to have won by more than GREEDY_MARGIN (a teacher-
    forced forward's logits), then the tokens must be equal and the log-probs within LOGPROB_TOLERANCE."""
    import cue_recovery
    model, processor = tiny
    if with_module:                       # the module works in prefill only: the cache must not change that
        model = copy.deepcopy(model)
        cue_recovery.attach(model, processor, init="default")
    batch = prompt_batch(processor)
    dynamic = sample_completions(model, processor, batch, greedy=True, max_new_tokens=12)
    static = sample_completions(model, processor, batch, greedy=True, max_new_tokens=12, static_cache=True)
    logits, _ = teacher_forced_logits(model, processor, dynamic)
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert top2_margins(logits, vision_ids).min() > GREEDY_MARGIN
    assert torch.equal(static.completion_ids, dynamic.completion_ids) and static.texts == dynamic.texts
    assert torch.allclose(static.logprobs, dynamic.logprobs, rtol=0, atol=LOGPROB_TOLERANCE)
