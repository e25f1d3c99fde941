"""Numerical guards: a run stops at the first non-finite number instead of training on it for
hours, and says where it happened, on which examples, and which checkpoint is still good.

- :func:`check_step` runs after the backward of every optimizer step and before the update:
  a NaN/inf loss or gradient norm raises :class:`~alignkit.errors.TrainingError` and the update
  is never applied, so the weights in memory and on disk stay finite.
- :func:`check_rollout` runs after each RLHF rollout is scored: a non-finite reward or KL stops
  the run before the rollout is trained on; a KL that explodes is reported (one line) but does
  not stop the run, because a large KL is a tuning problem, not corrupted state.

The checks cost one device→host sync per step on a GPU (none on the CPU beyond the host
compare): the price of never training on garbage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from alignkit.engine import checkpoint, dist
from alignkit.errors import TrainingError

# Mean KL to the reference per response token, in nats, above which a rollout's KL is called
# exploding. Healthy RLHF runs sit around 0.01-0.2 nats per token; at 1 nat per token every
# token of a response is on average e times likelier under the policy than under the
# reference, far past the regime where the KL penalty keeps the policy near the reference.
EXPLODING_KL_PER_TOKEN = 1.0
_SHOWN = 16  # example ids named in a message


def check_step(loss_sum: torch.Tensor, grad_norm: torch.Tensor, *, step: int,
               ids: Sequence[int], ckpt_root: Path,
               params: Iterable[tuple[str, torch.nn.Parameter]] = ()) -> None:
    """Raise TrainingError when the loss or the gradient norm of optimizer step ``step``
    (1-based) is not finite on any process.

    ``ids`` are this process's example indices of the step; ``params`` (name, parameter)
    pairs, searched only on failure for the first one whose gradient is not finite.
    """
    finite_loss, finite_grad = torch.isfinite(loss_sum), torch.isfinite(grad_norm)
    bad = (~(finite_loss & finite_grad)).float().reshape(1)
    if dist.all_reduce_sum(bad).item() == 0:  # the one host sync
        return
    what = "loss" if not finite_loss.item() else "gradient norm"
    culprit = _first_non_finite_grad(params) if finite_loss.item() else None
    if culprit:
        what += f" (first in {culprit})"
    raise TrainingError(f"non-finite {what} at step {step} (examples {_ids(ids)}); the step "
                        f"was not applied; {last_good(ckpt_root)}")


def check_rollout(stats: dict, samples: Sequence[dict], *, rollout: int, step: int,
                  ckpt_root: Path, log: Callable[[str], None] = print) -> None:
    """Check one scored rollout before it is trained on.

    ``stats`` has the rollout's mean ``kl`` (nats per sequence) and mean ``response_length``
    (tokens); ``samples`` one dict per rollout row with its raw ``score`` and ``prompt``.
    ``step`` is the 0-based update the rollout serves first. Non-finite scores or KL raise
    TrainingError naming the rows; a KL above :data:`EXPLODING_KL_PER_TOKEN` is logged.
    """
    where = f"rollout {rollout} (before step {step + 1})"
    bad = [i for i, s in enumerate(samples) if not math.isfinite(s["score"])]
    if bad:
        prompt = " ".join(str(samples[bad[0]].get("prompt", "")).split())[:60]
        raise TrainingError(f"non-finite reward at {where}: rollout rows {_ids(bad)} of "
                            f"{len(samples)} (first prompt: {prompt!r}); the rollout was not "
                            f"trained on; {last_good(ckpt_root)}")
    kl = stats.get("kl", 0.0)
    if not math.isfinite(kl):
        raise TrainingError(f"non-finite KL to the reference ({kl}) at {where}; the policy "
                            f"or the reference produced NaN/inf log-probs; "
                            f"{last_good(ckpt_root)}")
    per_token = kl / max(stats.get("response_length", 0.0), 1.0)
    if abs(per_token) > EXPLODING_KL_PER_TOKEN:
        log(f"warning: the KL to the reference is exploding at {where}: {kl:.3g} nats per "
            f"response ({per_token:.3g} per token, limit {EXPLODING_KL_PER_TOKEN}); lower "
            f"train.lr, raise kl_coef, or set kl_target or target_kl")


def last_good(ckpt_root: Path) -> str:
    """``"last good checkpoint: PATH"``, or that none was written yet."""
    good = checkpoint.latest_good(ckpt_root, quiet=True)
    return f"last good checkpoint: {good.path}" if good else "no checkpoint was written yet"


def _ids(ids: Sequence[int]) -> str:
    ids = list(ids)
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return f"{ids[:_SHOWN]}{more}"


def _first_non_finite_grad(params: Iterable[tuple[str, torch.nn.Parameter]]) -> str | None:
    """Only a hint for the message: a sharded (FSDP) gradient this cannot inspect is skipped
    rather than hiding the error being reported."""
    for name, p in params:
        try:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return name
        except (RuntimeError, NotImplementedError):
            continue
    return None
