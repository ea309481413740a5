"""Batch invariance of the network itself: every network call has one shape, every image one slot."""

from __future__ import annotations

from typing import Sequence

import torch

from guided_diffusion.run.non_finite import NonFiniteError, images_text, index_ranges
from guided_diffusion.script_util import DEFAULT_NETWORK_BATCH


class AlignedNetwork:
    """Evaluate ``model`` on chunks of a fixed size, image i always in slot i % chunk of chunk i // chunk.

    CPU and GPU kernels may pick another algorithm (and so another rounding) for another batch
    size, so an image's pixels could depend on --batch_size or the rank count. Here every network
    call has the same shape and every image the same slot whatever batch it came in; slots of
    images not in the batch repeat a real image, and they do not touch the real rows, which are
    computed independently of each other. Use it for every network a sampler
    calls (the classifier of guidance too); ``chunk`` is part of what determines the pixels.
    Every call checks that its output is finite (one reduction) and otherwise stops the batch with
    one line naming the network evaluation, its timestep and the images (NonFiniteError).
    ``t`` and keyword tensors are split with the images where they have one row per image and
    passed whole otherwise (a scalar timestep, None).
    """

    def __init__(self, model, indices: Sequence[int], chunk: int = DEFAULT_NETWORK_BATCH):
        if chunk < 1:
            raise ValueError(f"--network_batch_size must be at least 1, got {chunk}")
        self.model = model
        self.chunk = int(chunk)
        self.indices = [int(i) for i in indices]
        self.calls = 0
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for row, index in enumerate(indices):
            slots, rows = groups.setdefault(int(index) // self.chunk, ([], []))
            slots.append(int(index) % self.chunk)
            rows.append(row)
        self.groups = list(groups.values())
        self.batch = len(indices)

    def _pad(self, value, slots, rows):
        """Rows of a per-image tensor placed in their slots; free slots repeat the first real row."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != self.batch:
            return value
        padded = value[rows[0]].expand(self.chunk, *value.shape[1:]).clone()
        padded[slots] = value[rows]
        return padded

    def __call__(self, x, t, **kwargs):
        if x.shape[0] != self.batch:
            raise ValueError(f"network input has {x.shape[0]} images but the batch holds {self.batch}")
        outputs = [None] * self.batch
        for slots, rows in self.groups:
            if slots == list(range(self.chunk)) and rows == list(range(rows[0], rows[0] + self.chunk)):
                part = slice(rows[0], rows[0] + self.chunk)  # a whole aligned chunk: no copy
                out = self.model(x[part], _rows(t, part, self.batch),
                                 **{k: _rows(v, part, self.batch) for k, v in kwargs.items()})
            else:
                padded = {k: self._pad(v, slots, rows) for k, v in kwargs.items()}
                out = self.model(self._pad(x, slots, rows), self._pad(t, slots, rows), **padded)
                out = out[slots]
            for j, row in enumerate(rows):
                outputs[row] = out[j]
        out = torch.stack(outputs)
        self.calls += 1
        if not bool(torch.isfinite(out).all()):  # one reduction per call; details only when it fails
            self._refuse_non_finite(out, t)
        return out

    def _refuse_non_finite(self, out: torch.Tensor, t) -> None:
        finite = torch.isfinite(out.reshape(self.batch, -1)).all(dim=1)
        rows = torch.nonzero(~finite).flatten().tolist()
        bad = [self.indices[r] for r in rows]
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.batch:
            t = t[rows[0]]
        level = ""
        if isinstance(t, (int, float)) or (isinstance(t, torch.Tensor) and t.numel() == 1):
            level = f" (t = {float(t):g})"
        raise NonFiniteError(
            f"the network returned NaN or infinite values at network evaluation {self.calls} of batch "
            f"{index_ranges(self.indices)}{level}, for {images_text(bad)}; nothing of this batch was written: "
            "check the checkpoint and the flags"
        )


def _rows(value, part: slice, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[part]
    return value
