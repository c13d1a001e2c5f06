"""Small helpers every stage uses: progress lines, seeds, device, bf16 autocast, LR schedule, step budgets."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import time


def log(*a) -> None:
    print(*a, flush=True)


class Progress:
    """tqdm-style progress lines that read well in logs (no carriage returns)."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, max(1, every)
        self.t0 = time.time()

    @staticmethod
    def _fmt(s: float) -> str:
        s = int(s)
        return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def update(self, i: int, force: bool = False, **info) -> None:
        if not (force or i % self.every == 0 or i == self.total):
            return
        el = time.time() - self.t0
        rate = i / el if el > 0 else 0.0
        eta = (self.total - i) / rate if rate > 0 else 0.0
        pct = 100.0 * i / max(1, self.total)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        log(f"{self.name}: {pct:3.0f}%| {i}/{self.total} [{self._fmt(el)}<{self._fmt(eta)}, {rate:.2f}it/s] {extra}")


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str | None = None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device):
    """bf16 autocast on CUDA (weights and optimiser stay float32); nothing elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    """Linear warmup, then cosine decay to ``min_frac * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class StepBudget:
    """Fits a training loop's step count into a wall-clock budget, so its LR schedule still ends.

    It times steps ``skip``..``probe`` (the first ones include CUDA's warm-up), then lowers ``total`` to what
    the rest of the budget holds at that rate, less ``margin`` for evaluations; ``expired`` is the hard stop
    should the rate drop later."""

    def __init__(self, name: str, total: int, minutes: float, skip: int = 10, probe: int = 50, margin: float = 0.12):
        self.name, self.total, self.seconds = name, total, 60.0 * minutes
        self.skip, self.probe, self.margin = skip, probe, margin
        self.t0 = time.time()
        self.t_skip = None

    def after_step(self, done: int) -> None:
        if self.seconds <= 0 or self.total <= self.probe:
            return
        if done == self.skip:
            self.t_skip = time.time()
        elif done == self.probe and self.t_skip is not None:
            now = time.time()
            rate = (self.probe - self.skip) / max(now - self.t_skip, 1e-6)
            fit = done + int((self.seconds - (now - self.t0)) * (1 - self.margin) * rate)
            if fit < self.total:
                log(f"{self.name}: {rate:.1f} steps/s; {self.total} steps do not fit in {self.seconds / 60:.2f} min, "
                    f"running {fit}")
                self.total = max(fit, done + 1)

    def expired(self) -> bool:
        return self.seconds > 0 and time.time() - self.t0 > self.seconds


def add_config_flags(ap: argparse.ArgumentParser, config_cls) -> None:
    """One ``--field-name`` flag per field of the dataclass ``config_cls`` (default None: keep the preset's value)."""
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "y"), default=None, metavar="BOOL")
        else:
            typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            ap.add_argument(flag, type=typ, default=None)
