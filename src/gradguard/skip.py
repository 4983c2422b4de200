"""``SpikeSkip``: the Guard's skip rule, a torch façade over ``gradguard.rules.spike_skip``.

    skip_t = armed and (g_t > mean(G) + threshold * std(G)  or  L_t > mean(L) + threshold * std(L))
             or L_t is not finite

G and L are the last ``window`` accepted norms and losses (float32 rings on the device). The
math, its references and its guarantees are in ``rules.spike_skip``; this class keeps the
state, converts the loss and commits accepted steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .rules import spike_skip as _rule
from .rules.xp_torch import TORCH

__all__ = ["SpikeSkip"]


def _ring_state_dict(values: Tensor | None, count: Tensor | None, size: int) -> dict[str, Any]:
    return {"size": size, "values": None if values is None else values.clone(),
            "count": None if count is None else count.clone()}


class SpikeSkip:
    """Guard skip rule: refuse the update when the total norm, or the loss when it is passed,
    exceeds ``mean + threshold * std`` of the last ``window`` accepted values.

    std is the sample standard deviation, floored at ``1e-3 * |mean|``; the rule is armed once
    ``min_history`` values are in the window (default ``window // 2``, at least 2; OLMo-core
    uses the same). A non-finite loss is a spike; a skipped or non-finite value never enters
    the windows. After ``max_consecutive_skips`` refused steps in a row the Guard raises
    ``GradientExplosionError`` (a Guard argument, default 10).

    ``check`` is pure; ``observe`` appends the accepted values. All on the device, O(window),
    no host read.
    """

    def __init__(self, threshold: float = 6.0, window: int = 128, *,
                 min_history: int | None = None, watch_loss: bool = True):
        self.cfg = _rule.config(threshold, window, min_history=min_history,
                                watch_loss=watch_loss)
        self.threshold = self.cfg.threshold
        self.window = self.cfg.window
        self.min_history = self.cfg.min_history
        self.watch_loss = self.cfg.watch_loss
        self._state: _rule.State | None = None

    def __repr__(self) -> str:
        return (f"SpikeSkip(threshold={self.threshold}, window={self.window}, "
                f"min_history={self.min_history})")

    def _ensure(self, like: Tensor) -> _rule.State:
        st = self._state
        if st is None:
            st = self._state = _rule.init(self.cfg, TORCH, like)
        elif st.norm_count.device != like.device:
            st = self._state = _rule.State(*(t.to(like.device) for t in st))
        return st

    @staticmethod
    def _as_tensor(loss: Any, like: Tensor) -> Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().reshape(()).to(device=like.device, dtype=torch.float32)
        return torch.full((), float(loss), dtype=torch.float32, device=like.device)

    def _obs(self, total_norm: Tensor, loss: Any) -> _rule.Observation:
        lt = self._as_tensor(loss, total_norm) if self.watch_loss else None
        return _rule.Observation(total_norm.detach(), lt)

    def check(self, total_norm: Tensor, loss: Any = None) -> Tensor:
        """0-d bool device tensor: True when this step's update should be refused (pure)."""
        return _rule.check(self.cfg, self._ensure(total_norm), self._obs(total_norm, loss), TORCH)

    def limits(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(norm limit, loss limit) for the next step; inf while not armed."""
        return _rule.limits(self.cfg, self._ensure(like), TORCH)

    def observe(self, total_norm: Tensor, loss: Any, accept: Tensor) -> None:
        """Append the norm (and loss) when ``accept`` and finite."""
        st = self._ensure(total_norm)
        self._state = _rule.propose(self.cfg, st, self._obs(total_norm, loss), TORCH,
                                    accept=accept)

    def state_dict(self) -> dict[str, Any]:
        st = self._state
        if st is None:
            return {"window": self.window, "norm": _ring_state_dict(None, None, self.window),
                    "loss": _ring_state_dict(None, None, self.window)}
        return {"window": self.window,
                "norm": _ring_state_dict(st.norm_values, st.norm_count, self.window),
                "loss": _ring_state_dict(st.loss_values, st.loss_count, self.window)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = []
        for key in ("norm", "loss"):
            sd = state_dict[key]
            if int(sd["size"]) != self.window:
                raise ValueError(f"SpikeSkip state has window={sd['size']}, this rule "
                                 f"window={self.window}")
            parts.append(sd)
        if any(sd["values"] is None for sd in parts):
            # a window never written: start it empty (on the device of the other, if any)
            like = next((sd["values"] for sd in parts if sd["values"] is not None), None)
            fresh = _rule.init(self.cfg, TORCH, like)
            vals = [(fresh.norm_values, fresh.norm_count), (fresh.loss_values, fresh.loss_count)]
            if all(sd["values"] is None for sd in parts):
                self._state = None
                return
            for i, sd in enumerate(parts):
                if sd["values"] is not None:
                    vals[i] = (sd["values"].clone(), sd["count"].clone())
        else:
            vals = [(sd["values"].clone(), sd["count"].clone()) for sd in parts]
        self._state = _rule.State(vals[0][0], vals[0][1], vals[1][0], vals[1][1])


