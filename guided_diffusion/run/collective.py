"""Errors agreed across ranks: a user error on one rank stops every rank with the same line."""

from __future__ import annotations

from adm_common.errors import UsageError, one_line


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def together(action):
    """Run ``action()`` on this rank (None: nothing) and return its result; with several ranks, then
    learn whether any rank's failed. A user error on one rank (UsageError, ValueError, OSError) is
    raised on every rank as the same one line, so no rank waits forever for one that stopped and
    the launcher's rank 0 prints it. A collective: every rank calls it at the same point.
    """
    if not _distributed():
        return action() if action is not None else None
    import torch.distributed as dist

    result, problem = None, None
    try:
        if action is not None:
            result = action()
    except (ValueError, OSError) as exc:
        problem = one_line(exc)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first is not None:
        raise UsageError(first)
    return result
