# First, before anything imports torch: ddpo_rl sets OMP_WAIT_POLICY=PASSIVE (unless set), so the
# in-process tests' thread pool sleeps instead of spinning when the machine is shared
# (ddpo_rl/threads.py), and patches torchvision on CPU-only torch before transformers/diffusers.
import ddpo_rl  # noqa: F401
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
