"""The machine's level and each step kind's cost, told apart: a Kalman filter of one batch bucket's log step times.

A step of kind j (a method at some K and context bucket, or plain decoding) takes log t = level + offset_j + noise.
The level is the machine's speed now: a random walk (LEVEL_DRIFT a step), moved by host phases, clocks and other
processes. The offsets are what adaptive K compares: each kind's cost over the others', nearly constant (KEY_DRIFT).

A run of one kind shows only their sum. What tells them apart is a change of kind: an explore step at K + 1 between
steps at K, the first steps of a pass at another K. The filter keeps the covariance of all of them, so a step of
another kind right after a run measures its offset against a level the run has just measured, and a kind timed
minutes ago keeps its offset where the level has moved since. Per-kind moving averages instead compared kinds at the
levels of when each last ran: on an H100 the machine's drafting steps ran ~0.4-0.5 ms slower in some phases
(forty-third round), a K timed in such a phase looked 15-25% costlier than its neighbours beside it, and adaptive
settled on the wrong K for whole requests. In the CPU emulation of that H100 (`engine.bench.emulate`, phases of ~300
steps adding 0.3 ms to drafting steps) decisions from the true step times, phases known, were worth 0.985-0.993x the
best fixed K, from the averages 0.963-0.971x.

An update costs O(keys²) of numpy: on the 2-core CPU ~10 us with 25 keys in a bucket (three methods at K = 1..8, one
context bucket), ~50 us with 240 (every context bucket); the engine runs it while the next step computes.
"""

from __future__ import annotations

import numpy as np

LEVEL_DRIFT = 0.01  # the level's change per step (sd, log): a 17% phase is followed within ~10 steps
KEY_DRIFT = 0.001  # an offset's change per step (sd, log): a kind untimed for 1000 steps is uncertain by ~3% (0.002
# weighed single explore steps more: in the emulation without phases its decisions were worth 0.986x fixed K = 6 on
# average against 0.995x)
STEP_NOISE = 0.03  # one step's time about its kind's (sd, log)
WRITE_BACK = 1e-3  # an offset moved by more than this (log) since it was last read out is read out again


class LevelFilter:
    """Level and offsets of one batch bucket. ``add`` a kind once its first timings have set its offset, then
    ``observe`` its steps; ``level`` and ``moved`` read the estimates out."""

    def __init__(self, outlier: float, level_drift: float | None = None, key_drift: float | None = None,
                 noise: float | None = None) -> None:
        self.outlier = outlier  # a step's surprise counts as at most this, in logs (a stall, a page fault: the
        # caller's clamp of a step time, ``engine.adaptive``'s STALL_CLAMP)
        # the module's constants as they are now (``engine.bench.emulate --set`` changes them for a run)
        level_drift = LEVEL_DRIFT if level_drift is None else level_drift
        key_drift = KEY_DRIFT if key_drift is None else key_drift
        noise = STEP_NOISE if noise is None else noise
        self.x = np.zeros(1)  # [level, offset of each kind ...]
        self.cov = np.zeros((1, 1))  # the level starts at 0 by convention: known exactly
        self.kinds: list = []
        self.index: dict = {}  # kind -> its row in x
        self._read = np.zeros(1)  # x as last read out (``moved``)
        self._q_level, self._q_kind, self._r = level_drift ** 2, key_drift ** 2, noise ** 2

    @property
    def level(self) -> float:
        return float(self.x[0])

    def add(self, kind, offset: float, timings: int) -> None:
        """A kind whose first ``timings`` steps put its offset at ``offset`` (their log mean less the level then)."""
        n = len(self.x)
        x, cov = np.zeros(n + 1), np.zeros((n + 1, n + 1))
        x[:n], cov[:n, :n] = self.x, self.cov
        x[n] = offset
        # offset = the timings' mean - the level: uncertain by their noise and by the level's own uncertainty, and
        # against every other estimate as the level is, negated
        cov[n, :n] = cov[:n, n] = -self.cov[0]
        cov[n, n] = self._r / max(1, timings) + self.cov[0, 0]
        self.x, self.cov = x, cov
        self._read = np.append(self._read, offset)
        self.index[kind] = n
        self.kinds.append(kind)

    def observe(self, kind, log_seconds: float, steps: int = 1) -> None:
        """A step of ``kind`` (added) took exp(``log_seconds``), ``steps`` steps after the last one observed here."""
        i, cov, x = self.index[kind], self.cov, self.x
        diagonal = cov.reshape(-1)[::len(x) + 1]  # a view
        diagonal[1:] += self._q_kind * steps
        diagonal[0] += self._q_level * steps
        ph = cov[:, 0] + cov[:, i]  # cov @ h, with h picking the level and the kind
        s = float(ph[0] + ph[i]) + self._r
        surprise = max(-self.outlier, min(self.outlier, log_seconds - float(x[0] + x[i])))
        gain = ph / s
        x += gain * surprise
        cov -= np.multiply.outer(gain, ph)

    def moved(self) -> list[tuple[object, float]]:
        """(kind, offset) of every kind whose offset moved by more than WRITE_BACK since it was last read out here."""
        idx = np.flatnonzero(np.abs(self.x[1:] - self._read[1:]) > WRITE_BACK) + 1
        if not len(idx):
            return []
        self._read[idx] = self.x[idx]
        return [(self.kinds[i - 1], float(self.x[i])) for i in idx]
