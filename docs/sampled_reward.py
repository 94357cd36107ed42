"""The sampled reward of two checkpoints on the same validation prompts, paired by prompt
(docs/testbed.md, amendment 8): gap.exact_gap's rollouts and reward (`samples` seeded completions
a prompt at temperature 1, the same seeds for both models) and gap_change's pairing, on more prompts
and samples than a run's own gap_prompts x gap_rollouts. Each model is its own teacher here, with no
hint: only the reward is read.

    python docs/sampled_reward.py --before=/work/runs/sft1600_cue08/ckpt --after=/work/runs/long_7a_grpo/ckpt
"""

import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
from data import validation_world  # noqa: E402
from gap import exact_gap, gap_change  # noqa: E402
from model import load_model  # noqa: E402


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


def measure(path, prompts, config):
    model, processor = load_model(path)
    return exact_gap(model, model, processor, prompts, "none", config.max_length, config.max_new_tokens,
                     rollouts=config.samples, seed=config.seed, batch_size=config.batch_size)


def main(argv):
    config = cli.parse(argv, Config, "python docs/sampled_reward.py --before=CKPT --after=CKPT [...]")
    if not (config.before and config.after):
        sys.exit("error: give --before=CKPT and --after=CKPT")
    torch.set_num_threads(config.threads)
    started = time.time()
    prompts = validation_world(config.prompts, seed=config.seed)
    before, after = (measure(path, prompts, config) for path in (config.before, config.after))
    change, change_se = gap_change(before, after)["reward"]
    print(f"sampled reward on {len(prompts)} validation prompts x {config.samples} samples: "
          f"{before['reward']:.4f} ± {1.96 * before['reward_se']:.4f} -> {after['reward']:.4f} ± "
          f"{1.96 * after['reward_se']:.4f}, change {change:+.4f} ± {1.96 * change_se:.4f} (95%, paired by prompt); "
          f"{(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
