"""DiffLoss samples follow the data after a short training (the CPU sizes' linear schedule), and the
cosine schedule's near-zero final alpha_bar is what breaks an imprecise head (why the CPU sizes differ)."""

import pytest
import torch

from ldetok.generators import build_generator
from ldetok.generators.diffloss import DiffLoss


def train_toy(schedule, steps=500):
    torch.manual_seed(0)
    dl = DiffLoss(4, 8, depth=2, width=64, num_sampling_steps="50", batch_mul=1, schedule=schedule)
    opt = torch.optim.AdamW(dl.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(256, 4, generator=g) * 0.5 + 1.0
        loss = dl(x, torch.zeros(256, 8), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return dl.sample(torch.zeros(2000, 8), generator=torch.Generator().manual_seed(1))


def test_trained_diffloss_samples_match_the_data_with_the_linear_schedule():
    s = train_toy("linear")
    assert s.mean().item() == pytest.approx(1.0, abs=0.15)
    assert s.std().item() == pytest.approx(0.5, abs=0.1)


def test_cpu_sizes_use_the_linear_schedule():
    for name in ("mar_tiny", "randomar_tiny", "rasterar_tiny"):
        assert build_generator(name).config_dict()["noise_schedule"] == "linear"
    with torch.device("meta"):
        assert build_generator("mar_base").config_dict()["noise_schedule"] == "cosine"
