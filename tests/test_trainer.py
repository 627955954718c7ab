"""The shared training skeleton: the DataLoader honours num_workers without changing a single number,
resume stays exact with worker processes, and decoder fine-tuning turns corruption off in one place."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from ldetok.config import resolve_tokenizer_config
from ldetok.corruption import CorruptionConfig
from conftest import step_losses
from ldetok.engine.sampler import ResumableSampler
from ldetok.engine.tokenizer_trainer import TokenizerTrainer, train_tokenizer
from ldetok.engine.trainer import StepBatches

# a constant schedule: extending a run recomputes the schedule for the new length
FAST = dict(batch_size=16, log_every=1, ckpt_every=3, stats_images=64, image_every=0, tensorboard=False,
            warmup_frac=0.0, schedule="constant")


class _Augmenting(torch.utils.data.Dataset):
    """Items drawn from torch's global RNG, as an ImageFolder's random flips are."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.rand(()) + i


def _fetch(ds):
    return lambda idx: torch.stack([ds[i] for i in idx])


def _stream(workers: int, start: int = 0, end: int = 12):
    ds = _Augmenting()
    sampler = ResumableSampler(len(ds), 4, seed=3)
    loader = DataLoader(StepBatches(_fetch(ds), sampler, seed=3), batch_size=None, sampler=range(start, end),
                        num_workers=workers, generator=torch.Generator())
    return [b.clone() for b in loader]


def test_step_batches_are_a_function_of_the_step_whatever_the_workers():
    ref = _stream(0)
    assert torch.equal(torch.stack(_stream(2)), torch.stack(ref))
    assert torch.equal(torch.stack(_stream(2, start=5)), torch.stack(ref[5:]))  # a resumed stream
    # the random part is really random across steps (not one seed for all)
    assert len({float(b[0] - b[0].floor()) for b in ref}) == len(ref)


def test_step_batches_leave_the_callers_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _stream(0, end=3)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_resume_with_two_workers_equals_an_uninterrupted_single_process_run(tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    train_tokenizer(resolve_tokenizer_config("cpu-fmnist", dict(FAST, max_steps=8, num_workers=0)), ref)
    train_tokenizer(resolve_tokenizer_config("cpu-fmnist", dict(FAST, max_steps=5, num_workers=2)), split)
    # extend the finished 5-step run: resumes from its step-5 checkpoint, with two workers
    train_tokenizer(resolve_tokenizer_config("cpu-fmnist", dict(FAST, max_steps=8, num_workers=2)), split)
    a, b = step_losses(ref), step_losses(split)
    assert sorted(a) == list(range(1, 9)) and all(a[s] == b[s] for s in a), (a, b)
    from safetensors.torch import load_file

    wa, wb = load_file(str(ref / "tokenizer" / "model.safetensors")), load_file(str(split / "tokenizer" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_decoder_fine_tuning_trains_without_corruption_and_records_the_encoders(tok_run, tmp_path):
    # the fine-tuning config names other corruption settings than the parent (γ=3, M=0.7) was trained with
    cfg = resolve_tokenizer_config("cpu-fmnist", dict(FAST, max_steps=2, stage="decoder_ft", init_from=str(tok_run),
                                                      gamma=0.5, max_mask_ratio=0.0))
    trainer = TokenizerTrainer(cfg, tmp_path / "ft")
    assert trainer.corruption == CorruptionConfig.off()  # training corrupts nothing
    assert trainer.pass_.cfg == CorruptionConfig.off()
    trainer.fit()
    # the export records what its (frozen) encoder was trained with: the parent's settings
    meta = json.loads((tmp_path / "ft" / "tokenizer" / "tokenizer.json").read_text())
    got = CorruptionConfig.from_dict(meta["corruption"])
    assert (got.gamma, got.max_mask_ratio) == (3.0, 0.7)
