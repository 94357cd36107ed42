"""checkpoint.py: train_state.pt loads with weights_only=True, so a checkpoint cannot run code; an
older or foreign train state is a clear error naming the file. (Save, resume and the kill between
the two renames are tested end to end in test_train.py and test_ddp.py.)"""
import os

import numpy as np
import pytest
import torch

import checkpoint


class CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")                               # unpickling calls open(path, "w")


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_none(tmp_path):
    """train_state.pt is read with weights_only=True: a pickle that would create a file is refused with
    an error naming the file, and the file never appears; so is a state from before the format."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "the_pickle_ran"
    torch.save({"format": checkpoint.TRAIN_STATE_FORMAT, "step": 1, "config": CreatesAFileWhenUnpickled(str(marker))},
               ckpt / "train_state.pt")
    for read in (lambda: checkpoint.saved_run(str(ckpt)), lambda: checkpoint.read_train_state(str(ckpt / "train_state.pt"))):
        with pytest.raises(SystemExit, match=f"{ckpt / 'train_state.pt'} cannot be loaded safely"):
            read()
        assert not marker.exists()
    torch.save({"step": 1, "config": {}}, ckpt / "train_state.pt")          # loadable, but no format
    with pytest.raises(SystemExit, match="train-state format none, this vicur reads format 2"):
        checkpoint.saved_run(str(ckpt))
    with pytest.raises(SystemExit, match="cannot be loaded safely"):     # the RNG state as older runs pickled it
        torch.save({"format": 2, "rng": np.random.get_state()}, ckpt / "train_state.pt")
        checkpoint.saved_run(str(ckpt))


def test_no_code_path_loads_a_pickle_or_trusts_remote_code():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.join(root, name) for name in os.listdir(root) if name.endswith(".py")]
    for path in sources:
        text = open(path).read()
        assert "weights_only=False" not in text and "trust_remote_code=True" not in text, path
