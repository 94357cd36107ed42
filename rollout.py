"""Batched on-policy sampling with a KV cache: the student's rollouts.

Our own loop (prefill once, then one token per step through transformers' DynamicCache),
so the log-probs of the sampled tokens come out of the same forward that chose them:
    logprob_t = log softmax(logits_t / temperature)[y_t]
the model's tempered distribution, which is the pi_old of the distillation objective. The
sampling filters (presence penalty, top-k, top-p, no vision placeholders, greedy's argmax)
change which token is drawn, never the log-prob it is given: a trainer's PPO ratio
pi_theta / pi_old starts at exactly 1 whatever filters the rollouts used.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from data import model_inputs


@dataclass
class Rollout:
    completion_ids: torch.Tensor      # (B, T) sampled tokens, pad after the end of turn
    completion_mask: torch.Tensor     # (B, T) 1 on generated tokens, the end-of-turn token included
    logprobs: torch.Tensor            # (B, T) log pi_old(y_t), 0 where masked
    texts: list                       # decoded completions, special tokens removed

    @property
    def lengths(self):
        return self.completion_mask.sum(-1)


def cat_rollouts(rollouts, pad_id):
    """One Rollout of the rows of several, in order, completions right-padded to the longest."""
    width = max(r.completion_ids.shape[1] for r in rollouts)
    pad = lambda tensor, value: torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)  # noqa: E731
    return Rollout(completion_ids=torch.cat([pad(r.completion_ids, pad_id) for r in rollouts]),
                   completion_mask=torch.cat([pad(r.completion_mask, 0) for r in rollouts]),
                   logprobs=torch.cat([pad(r.logprobs, 0.0) for r in rollouts]),
                   texts=[text for r in rollouts for text in r.texts])


def split_rollout(rollout, sizes):
    """The rows of a Rollout as consecutive Rollouts of `sizes` rows each."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [Rollout(completion_ids=rollout.completion_ids[start:start + size],
                    completion_mask=rollout.completion_mask[start:start + size],
                    logprobs=rollout.logprobs[start:start + size], texts=rollout.texts[start:start + size])
            for start, size in zip(starts, sizes)]


def repeat_batch(batch, n):
    """Repeat every row of a collated batch n times (row i -> rows i*n .. i*n+n-1), with its
    images and videos: their patches are stored flat, so they are split per row first."""
    if n == 1:
        return batch
    visual = {"pixel_values": ("image_grid_thw", 1), "pixel_values_videos": ("video_grid_thw", 2)}
    out = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()
           if k not in visual and k not in [grid for grid, _ in visual.values()]}
    for key, (grid_key, token_type) in visual.items():
        if key not in batch:
            continue
        tokens = batch["mm_token_type_ids"] == token_type                          # (B, L)
        starts = tokens & ~torch.nn.functional.pad(tokens, (1, 0))[:, :-1]
        # a video is one grid whose frames may be split into several runs of tokens by timestamps
        runs = starts.sum(-1)
        per_row = runs.tolist() if token_type == 1 else [int(r > 0) for r in runs]
        grids = batch[grid_key].split(per_row)
        patches = batch[key].split([int(g.prod(-1).sum()) for g in grids])
        out[key] = torch.cat([p for p in patches for _ in range(n)])
        out[grid_key] = torch.cat([g for g in grids for _ in range(n)])
    return out


def prompt_positions(model, batch):
    """M-RoPE positions of the prompt (3, B, P) and each row's next position (B,)."""
    if "image_grid_thw" not in batch and "video_grid_thw" not in batch:
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return positions.unsqueeze(0).expand(3, -1, -1), batch["attention_mask"].sum(-1)
    positions, rope_deltas = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"])
    return positions, batch["attention_mask"].sum(-1) + rope_deltas.view(-1)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits and the smallest set with probability >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p      # mass before this token already >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


@torch.no_grad()
def sample_completions(model, processor, batch, n=1, temperature=1.0, top_p=1.0, top_k=0, presence_penalty=0.0,
           max_new_tokens=64, greedy=False, generator=None, static_cache=False):
    """Sample n completions per prompt of a collated, left-padded batch -> Rollout.
    generator: one torch.Generator for the whole batch, or a list with one per row of the repeated
    batch (prompt-major: prompt 0's n rows first). With one per row, a row's tokens do not depend on
    which other rows share its batch (up to float rounding): what makes a data-parallel run equal a
    single-process one.
    Rollout.logprobs are log softmax(logits / temperature) of the model at the drawn tokens, taken
    before the presence penalty, top-k, top-p and the vision-placeholder ban, which only shape the
    draw (greedy too: argmax of the filtered logits, log-prob of the tempered model).
    static_cache: decode through transformers' StaticCache, preallocated for prompt + max_new_tokens
    (no reallocation as it grows: a step towards CUDA graphs, whose attention mask would also need a
    fixed length); the same tokens and log-probs as the DynamicCache, up to float rounding."""
    batch = repeat_batch({k: v for k, v in batch.items() if k != "completion_mask"}, n)
    batch_size = batch["input_ids"].shape[0]
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for {batch_size} rows (n={n} per prompt): pass one per row")
    tokenizer = processor.tokenizer
    device = batch["input_ids"].device
    stop_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")], device=device)
    pad_id = tokenizer.pad_token_id
    # a completion never holds vision placeholders (they would need pixels): like top-k, this truncates
    # what is sampled, while the log-probs stay those of the model's full distribution
    vision_ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    was_training = model.training
    model.eval()

    positions, next_position = prompt_positions(model, batch)
    attention_mask = batch["attention_mask"]
    prompt_length = batch["input_ids"].shape[1]
    cache = (StaticCache(config=model.config.get_text_config(), max_cache_len=prompt_length + max_new_tokens)
             if static_cache else DynamicCache(config=model.config.get_text_config()))
    inputs = model_inputs(batch)
    logits = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    seen = torch.zeros(batch_size, logits.shape[-1], dtype=torch.bool, device=device)  # for the presence penalty
    tokens, logprobs, masks = [], [], []
    for _ in range(max_new_tokens):
        model_logits = logits.float()                                                   # (B, V)
        # what may be drawn: logits - penalty * [token already in this row], no vision placeholders
        allowed = model_logits - presence_penalty * seen.float() if presence_penalty else model_logits.clone()
        allowed[:, vision_ids] = float("-inf")
        if greedy:
            token = allowed.argmax(-1)
        else:
            probs = filter_logits(allowed / temperature, top_k, top_p).softmax(-1)
            if isinstance(generator, (list, tuple)):
                token = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
            else:
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        # log pi_old(y_t) = log softmax(z_t / T)[y_t], of the model's logits z_t, not of the filtered ones
        token_logprob = (model_logits / temperature).log_softmax(-1).gather(-1, token[:, None])[:, 0]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(token_logprob), token_logprob))
        masks.append(~finished)
        seen[torch.arange(batch_size, device=device), token] = True
        finished = finished | torch.isin(token, stop_ids)
        if finished.all():
            break
        # one decode step: the new token's M-RoPE position is the same on all three axes
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        step_positions = next_position.view(1, -1, 1).expand(3, -1, -1)
        next_position = next_position + 1
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=step_positions,
                       past_key_values=cache, use_cache=True).logits[:, -1]

    model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)
    completion_mask = torch.stack(masks, dim=1).long()
    texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad_id), skip_special_tokens=True)
    return Rollout(completion_ids=completion_ids, completion_mask=completion_mask,
                   logprobs=torch.stack(logprobs, dim=1), texts=[t.strip() for t in texts])
