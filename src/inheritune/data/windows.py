"""Token windows: what training samples and what validation scores.

:class:`WindowSampler` visits training windows of ``seq_len + 1`` tokens in a seeded permutation
per epoch and can report and restore its position, so a resumed run continues exactly.
:func:`fixed_windows` and :func:`eval_windows` give the same validation windows at every
evaluation and in every run; :func:`sample_windows` draws random windows (the analysis's
inputs, calibration sets), :func:`gather_windows` stacks them into a batch, and
:func:`check_length` refuses a split too short for one window with a message naming it.
"""

from __future__ import annotations

import numpy as np
import torch

from inheritune.data.sources import DataError
from inheritune.data.tokens import Tokens


def check_length(
    split: np.ndarray, seq_len: int, what: str, min_windows: int = 1, flag: str = "--seq-len"
) -> None:
    """Raise unless ``split`` holds ``min_windows`` windows of ``seq_len`` tokens (``flag``: the
    setting the message names)."""
    if len(split) == 0:
        raise DataError(f"the {what} split is empty: the corpus has too little text")
    if len(split) < seq_len * min_windows:
        raise DataError(
            f"the {what} split has {len(split)} tokens, fewer than {min_windows} window(s) of "
            f"{flag} {seq_len}; use a shorter {flag} or more data"
        )


def sample_windows(
    split: np.ndarray,
    num: int,
    seq_len: int,
    seed: int,
    what: str = "sampled",
    flag: str = "--seq-len",
) -> np.ndarray:
    """``num`` windows of ``seq_len`` tokens at random (seeded) start positions: (num, seq_len);
    ``what`` and ``flag`` name the split and the setting in the error on a split too short."""
    check_length(split, seq_len, what, flag=flag)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(split) - seq_len + 1, size=num)
    return np.stack([np.asarray(split[s : s + seq_len], dtype=np.int64) for s in starts])


def fixed_windows(split: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of ``split``: (n, seq_len)."""
    check_length(split, seq_len, "evaluation")
    n = len(split) // seq_len
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // seq_len))
    return np.asarray(split[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# ----------------------------------------------------------------------------- windows


class WindowSampler:
    """Global batches of window start positions from a seeded per-epoch permutation.

    Window i covers tokens [i*T, i*T + T + 1) of the split. ``(epoch, cursor)`` is the data
    position; a batch that would run past the end of an epoch starts the next epoch instead.
    """

    def __init__(self, num_tokens: int, seq_len: int, seed: int):
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (num_tokens - 1) // seq_len
        self.epoch = 0
        self.cursor = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.num_windows))
        return self._perm[1]

    def next_starts(self, batch: int) -> np.ndarray:
        """Token offsets of the next ``batch`` windows: (batch,)."""
        if self.cursor + batch > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._permutation()[self.cursor : self.cursor + batch]
        self.cursor += batch
        return idx.astype(np.int64) * self.seq_len

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def gather_windows(split: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """(len(starts), seq_len + 1) int64 token windows."""
    return torch.from_numpy(
        np.stack([np.asarray(split[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    )


def eval_windows(tokens: Tokens, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Fixed validation windows, (n, seq_len + 1) int64: inputs are ``w[:, :-1]``, targets
    ``w[:, 1:]``.

    Consecutive windows from the start of the validation split, each sharing its last token with
    the next one's first, so every validation token is predicted once. n = eval_tokens // seq_len
    (at least 1), capped by the split. The same array at every evaluation and in every run.
    """
    val = tokens.val
    check_length(val, seq_len + 1, "validation")
    n = min((len(val) - 1) // seq_len, max(1, eval_tokens // seq_len))
    return np.stack(
        [np.asarray(val[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)]
    )
