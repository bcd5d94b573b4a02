"""Test-session settings: one intra-op thread per pytest worker (xdist runs 2)."""

import os

import torch

torch.set_num_threads(int(os.environ.get("SINGD_TEST_THREADS", "1")))
