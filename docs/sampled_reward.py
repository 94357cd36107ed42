"""The sampled reward of two checkpoints on the same validation prompts, paired by prompt
(docs/testbed.md, amendment 8). Each prompt gets `samples` completions at temperature 1, seeded by
prompt and sample index, the same seeds for both models (as distill.exact_gap seeds its rollouts).
A prompt's reward is the share of its completions that are right; the change is the mean over
prompts of after - before, with its standard error over prompts.

    python docs/sampled_reward.py --before=/work/runs/sft1600_cue08/ckpt --after=/work/runs/long_7a_grpo/ckpt
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
from data import collate, student_messages, to_device, validation_world  # noqa: E402
from evaluate import score_sample  # noqa: E402
from model import load_model  # noqa: E402
from rollout import sample_completions  # noqa: E402


@dataclass
class Config:
    before: str = ""            # a checkpoint (the base)
    after: str = ""             # a checkpoint trained from it
    prompts: int = 2000         # validation prompts (the whole split: 2,000)
    samples: int = 8            # seeded completions a prompt
    seed: int = 0
    batch_size: int = 64
    max_length: int = 512
    max_new_tokens: int = 96
    threads: int = 2


@torch.no_grad()
def rewards_by_prompt(path, prompts, config):
    """(prompts,) float64: the share of each prompt's seeded completions that are right."""
    model, processor = load_model(path)
    model.eval()
    rewards = []
    for start in tqdm(range(0, len(prompts), config.batch_size), desc=os.path.basename(os.path.dirname(path))):
        chunk = prompts[start:start + config.batch_size]
        batch = to_device(collate(processor, [student_messages(s) for s in chunk],
                                  max_length=config.max_length - config.max_new_tokens), "cpu")
        generators = [torch.Generator().manual_seed(config.seed * 1_000_003 + (start + i) * config.samples + j)
                      for i in range(len(chunk)) for j in range(config.samples)]
        rollout = sample_completions(model, processor, batch, n=config.samples, max_new_tokens=config.max_new_tokens,
                                     generator=generators)
        for i, sample in enumerate(chunk):
            texts = rollout.texts[i * config.samples:(i + 1) * config.samples]
            rewards.append(sum(score_sample(t, sample) for t in texts) / config.samples)
    return torch.tensor(rewards, dtype=torch.float64)


def main(argv):
    config = cli.parse(argv, Config, "python docs/sampled_reward.py --before=CKPT --after=CKPT [...]")
    if not (config.before and config.after):
        sys.exit("error: give --before=CKPT and --after=CKPT")
    torch.set_num_threads(config.threads)
    started = time.time()
    prompts = validation_world(config.prompts, seed=config.seed)
    before, after = (rewards_by_prompt(path, prompts, config) for path in (config.before, config.after))
    change = after - before
    se = lambda x: (x.std() / len(x) ** 0.5).item()  # noqa: E731
    print(f"sampled reward on {len(prompts)} validation prompts x {config.samples} samples: "
          f"{before.mean():.4f} ± {1.96 * se(before):.4f} -> {after.mean():.4f} ± {1.96 * se(after):.4f}, "
          f"change {change.mean():+.4f} ± {1.96 * se(change):.4f} (95%, paired by prompt); "
          f"{(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
