"""Exponential moving average of a model's parameters and persistent buffers.

Rule (as in the official l-DeTok code, constant decay, no warm-up): trainable floating-point
parameters and floating-point buffers are averaged, `ema = decay * ema + (1 - decay) * live`;
frozen parameters (requires_grad=False) and integer/bool buffers (e.g. BatchNorm's
num_batches_tracked) are copied. Consequence worth knowing: during decoder fine-tuning the
frozen encoder's EMA is simply the raw encoder, which is also what the official code produces.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ldetok.engine.distributed import unwrap_model

__all__ = ["EMA"]


class EMA:
    """Shadow copy of `model` updated with `update(model)` after every optimiser step.

    `device=None` keeps each shadow tensor on its live tensor's device (fastest); pass e.g. "cpu"
    to keep the shadow off the accelerator at the cost of a transfer per update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, device: str | torch.device | None = None):
        self.decay = self._check_decay(decay)
        self.device = torch.device(device) if device is not None else None
        m = unwrap_model(model)
        # Non-persistent buffers (RoPE tables, latent stats set by reset_stats) are derived or
        # installed values, not learnt ones: averaging them would only make them lag, so skip them.
        persistent = set(m.state_dict().keys())
        self._param_names: list[str] = []
        self._buffer_names: list[str] = []
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in m.named_parameters():
                self._param_names.append(name)
                self.shadow[name] = self._fresh(p)
            for name, b in m.named_buffers():
                if name in persistent:
                    self._buffer_names.append(name)
                    self.shadow[name] = self._fresh(b)
        self._buffer_set = set(self._buffer_names)
        self.num_updates = 0

    # ----------------------------------------------------------------------- internals

    @staticmethod
    def _check_decay(decay: float) -> float:
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        return decay

    def _fresh(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device if self.device is not None else t.device, copy=True)

    def _live(self, model: nn.Module) -> dict[str, torch.Tensor]:
        m = unwrap_model(model)
        params = dict(m.named_parameters())
        buffers = dict(m.named_buffers())
        out: dict[str, torch.Tensor] = {}
        missing = []
        for name in self._param_names:
            if name in params:
                out[name] = params[name]
            else:
                missing.append(name)
        for name in self._buffer_names:
            if name in buffers:
                out[name] = buffers[name]
            else:
                missing.append(name)
        if missing:
            raise KeyError(
                f"EMA was built for a different model: {len(missing)} tensor(s) missing from the live "
                f"model, e.g. {missing[:5]}."
            )
        return out

    # ----------------------------------------------------------------------- updates

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step from the live model (call after optimizer.step())."""
        d = self.decay if decay is None else self._check_decay(decay)
        live = self._live(model)
        trainable = {n for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
        # _foreach_lerp_ needs matching device/dtype inside one call, so bucket by them.
        buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = defaultdict(lambda: ([], []))
        for name, src in live.items():
            dst = self.shadow[name]
            if self.device is None and dst.device != src.device:
                # The model moved (e.g. EMA built before model.to(device)): follow it once.
                dst = self.shadow[name] = dst.to(src.device)
            # Buffers: average floats, copy ints/bools. Params: average only the trainable ones.
            average = dst.is_floating_point() and (name in self._buffer_set or name in trainable)
            if average:
                e, l_ = buckets[(dst.device, dst.dtype)]
                e.append(dst)
                l_.append(src.to(device=dst.device, dtype=dst.dtype))
            else:
                dst.copy_(src)
        weight = 1.0 - d
        for ema_list, live_list in buckets.values():
            # lerp: ema + (1 - decay) * (live - ema) == decay * ema + (1 - decay) * live
            torch._foreach_lerp_(ema_list, live_list, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and persistent buffers with the EMA values."""
        for name, dst in self._live(model).items():
            dst.copy_(self.shadow[name])

    @contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap EMA weights into `model` (e.g. for evaluation); live weights come back after.

        Evaluate through the unwrapped module it yields: a DDP forward would re-broadcast buffers.
        """
        live = self._live(model)
        backup = {n: t.detach().clone() for n, t in live.items()}
        self.copy_to(model)
        try:
            yield unwrap_model(model)
        finally:
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(backup[n])

    def module(self, model: nn.Module) -> nn.Module:
        """A deep copy of `model` holding the EMA weights, in eval mode with grads off (for eval/export)."""
        m = copy.deepcopy(unwrap_model(model))
        for p in m.parameters():
            p.grad = None
        self.copy_to(m)
        return m.eval().requires_grad_(False)

    def to(self, device: str | torch.device) -> EMA:
        self.device = torch.device(device)
        self.shadow = {n: t.to(self.device) for n, t in self.shadow.items()}
        return self

    # ----------------------------------------------------------------------- (de)serialisation

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain name -> tensor dict (live references, like nn.Module.state_dict); weights_only-safe."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> tuple[list, list]:
        """Load a name -> tensor dict. strict=False accepts e.g. official `model_ema` dicts (params only).

        Returns (missing_keys, unexpected_keys) like nn.Module.load_state_dict.
        """
        missing = [k for k in self.shadow if k not in state]
        unexpected = [k for k in state if k not in self.shadow]
        if strict and (missing or unexpected):
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}."
            )
        for k, v in state.items():
            if k not in self.shadow:
                continue
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"EMA state entry {k!r} is a {type(v).__name__}, expected a tensor.")
            if v.shape != self.shadow[k].shape:
                raise ValueError(
                    f"EMA state entry {k!r} has shape {tuple(v.shape)}, the model expects "
                    f"{tuple(self.shadow[k].shape)}."
                )
            self.shadow[k].copy_(v)
        return missing, unexpected
