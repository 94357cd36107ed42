"""Checkpoints: out_dir/ckpt written atomically by rank 0 after the ranks check they agree, and read
back for --resume. The weights go through save_pretrained (safetensors); ckpt/train_state.pt holds the
optimizer's state, the step, the config and the RNG states in plain types only, so that it loads with
torch.load(weights_only=True): a checkpoint someone shares cannot run code when it is read.
"""

import dataclasses
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

import cue_recovery

TRAIN_STATE_FORMAT = 2  # of train_state.pt; 1 (before 2026-12) pickled numpy arrays


def save_checkpoint(model, processor, optimizer, step, config, rank=0, world_size=1):
    """Every rank calls it: the ranks check they agree and gather the optimizer's shards, then rank 0
    writes out_dir/ckpt atomically: into a temporary folder, then renamed over the old one."""
    check_ranks_agree(model, step, world_size, optimizer.group)
    optimizer_state = optimizer.state_dict()
    if rank != 0:
        return
    final = os.path.join(config.out_dir, "ckpt")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cue_recovery.save(model, tmp)  # the sink module's weights and layers, when the model has one
    processor.save_pretrained(tmp)
    torch.save({"format": TRAIN_STATE_FORMAT, "optimizer": optimizer_state, "step": step,
                "config": dataclasses.asdict(config), "rng": rng_states()}, os.path.join(tmp, "train_state.pt"))
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def check_ranks_agree(model, step, world_size, group=None):
    """Before rank 0 saves: every rank must be at the same step with the same weights (a float64 sum
    of all parameters; identical all-reduced updates keep the replicas bitwise equal)."""
    if world_size == 1:
        return
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    views = [None] * world_size
    dist.all_gather_object(views, (step, checksum), group=group)
    if any(view != views[0] for view in views):
        raise RuntimeError(f"ranks disagree before saving: (step, weight checksum) per rank = {views}")


def rng_states():
    """The Python, numpy and torch RNG states in plain types (no numpy arrays, no pickled objects)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {"python": [version, list(python_state), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
            "torch": torch.get_rng_state()}


def set_rng_states(states):
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])


def read_train_state(path, mmap=False):
    """A checkpoint's train_state.pt, loaded with weights_only=True; a file that is not one of ours
    (an older format, a pickle of other objects, a damaged file) is a clear error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError, by the damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: {path} cannot be loaded safely (weights_only=True): {reason}\n"
                         f"  it is from an older vicur (before format {TRAIN_STATE_FORMAT}) or not a vicur "
                         f"checkpoint; its weights still load: start a new run with --init_from="
                         f"{os.path.dirname(path)}") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format", "none") if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"error: {path} has train-state format {found}, this vicur reads format "
                         f"{TRAIN_STATE_FORMAT}; start a new run with --init_from={os.path.dirname(path)}")
    return state


def load_train_state(config, optimizer):
    # memory-mapped: each rank reads only its own shard of the optimizer state
    path = os.path.join(config.out_dir, "ckpt", "train_state.pt")
    state = read_train_state(path, mmap=True)
    optimizer.load_state_dict(state["optimizer"], where=path)
    set_rng_states(state["rng"])
    return state["step"]


def saved_run(ckpt):
    """(step, config dict) of a checkpoint's train_state.pt, or (None, None)."""
    path = os.path.join(ckpt, "train_state.pt")
    if not os.path.isfile(path):
        return None, None
    state = read_train_state(path)
    return state["step"], state["config"]
