"""Which timesteps a training batch draws (importance sampling over t), as in ADM."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion):
    """A ScheduleSampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; use one of {', '.join(SCHEDULE_SAMPLERS)}")


class ScheduleSampler(ABC):
    """A distribution over timesteps; losses are reweighted so the objective stays unbiased."""

    @abstractmethod
    def weights(self):
        """Unnormalized, positive weights of each timestep (numpy array of num_timesteps)."""

    def sample(self, batch_size, device):
        """Draw timesteps for a batch.

        Returns (timesteps, weights): weights = 1 / (num_timesteps * p(t)) scales each sample's
        loss so that its expectation equals the loss under uniform t.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1.0 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """Feed this rank's (timestep, loss) pairs; with torch.distributed every rank gets all pairs.

        Every rank must call this with its own batch (sizes may differ) so the samplers stay equal.
        """
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world_size = dist.get_world_size()
        sizes = [th.zeros(1, dtype=th.int64, device=local_ts.device) for _ in range(world_size)]
        dist.all_gather(sizes, th.tensor([len(local_ts)], dtype=th.int64, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)

        def gather_padded(values):
            padded = th.zeros(longest, dtype=values.dtype, device=values.device)
            padded[: len(values)] = values
            gathered = [th.zeros_like(padded) for _ in range(world_size)]
            dist.all_gather(gathered, padded)
            return [v for chunk, n in zip(gathered, sizes, strict=True) for v in chunk[:n].tolist()]

        self.update_with_all_losses(gather_padded(local_ts), gather_padded(local_losses))

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from the (timestep, loss) pairs of every rank, in rank order."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to the RMS of t's recent losses, mixed with a little of the uniform law.

    Uniform until every timestep has ``history_per_term`` losses recorded.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses, strict=True):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
