"""Shared test set-up: a fixed thread count and seeds, so tests are repeatable on 2 cores."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
