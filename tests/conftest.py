"""Shared fixtures: the tiny model and processor, built once per test session."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

from model import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): the embedded tiny Qwen3-VL with random weights, in eval mode."""
    model, processor = load_model("tiny", seed=0)
    return model.eval(), processor
