"""What a worker serves that fleet-wide limits hold: the plan its claims follow.

Built once from the handlers' ``max_running`` and ``rate_limit`` and the
scheduler's queue limits (:mod:`sqla_pgotask.limits`); no I/O.  Limited tasks
(of a limited kind, or in a limited queue) are claimed by the locked claim of
``sql/limits.sql``; every other task by the usual one-statement claim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqla_pgotask.config.limits import QueueLimit, RateLimit

if TYPE_CHECKING:
    from sqla_pgotask.config.handlers import Handler


@dataclass(frozen=True)
class Limit:
    """One limit: its row's key, what it applies to, and its settings."""

    key: str
    kind: str | None
    queue: str | None
    max_running: int | None
    rate: RateLimit | None


@dataclass(frozen=True)
class LimitPlan:
    """How a worker claims when some of what it serves is limited.

    Limited tasks (of a limited kind, or in a limited queue) are claimed by
    the locked claim; every other task by the usual one-statement claim
    (``fast_kinds`` and ``fast_queues``), or, when the worker serves every
    queue and some queues are limited, by that claim without those queues.
    """

    limits: tuple[Limit, ...]
    kinds: Mapping[str, int]
    queues: tuple[str, ...] | None
    fast_kinds: Mapping[str, int]
    fast_queues: tuple[str, ...] | None
    excluded_queues: tuple[str, ...]

    @property
    def keys(self) -> list[str]:
        """The keys of the limit rows, sorted (the order they are locked in)."""
        return [limit.key for limit in self.limits]

    @property
    def fast(self) -> bool:
        """Whether some tasks this worker serves are subject to no limit."""
        return bool(self.fast_kinds) and (self.fast_queues is None or bool(self.fast_queues))

    def claim_params(self, worker_id: str, limit: int, lease_seconds: float) -> dict[str, object]:
        """The parameters of ``limits_claim``."""
        return {
            "keys": self.keys,
            "key_kinds": [limit.kind for limit in self.limits],
            "key_queues": [limit.queue for limit in self.limits],
            "max_running": [limit.max_running for limit in self.limits],
            "rate_counts": [None if lm.rate is None else lm.rate.count for lm in self.limits],
            "rate_pers": [None if lm.rate is None else lm.rate.per for lm in self.limits],
            "kinds": list(self.kinds),
            "max_attempts": list(self.kinds.values()),
            "queues": None if self.queues is None else list(self.queues),
            "limit": limit,
            "worker": worker_id,
            "lease_seconds": float(lease_seconds),
        }


def plan_limits(
    handlers: Mapping[str, Handler],
    queue_limits: Mapping[str, QueueLimit],
    queues: Sequence[str] | None,
) -> LimitPlan | None:
    """The plan of a worker serving ``handlers`` and ``queues``; ``None`` if nothing is limited."""
    kinds = {kind: h.max_attempts for kind, h in sorted(handlers.items())}
    served = None if queues is None else tuple(queues)
    limits: list[Limit] = []
    for kind, handler in sorted(handlers.items()):
        if handler.max_running is not None or handler.rate_limit is not None:
            limits.append(
                Limit(f"kind:{kind}", kind, None, handler.max_running, handler.rate_limit)
            )
    limited_queues = sorted(q for q in queue_limits if served is None or q in served)
    for name in limited_queues:
        ql = queue_limits[name]
        limits.append(Limit(f"queue:{name}", None, name, ql.max_running, ql.rate_limit))
    if not limits:
        return None
    limits.sort(key=lambda limit: limit.key)
    limited_kinds = {limit.kind for limit in limits if limit.kind is not None}
    return LimitPlan(
        limits=tuple(limits),
        kinds=kinds,
        queues=served,
        fast_kinds={k: m for k, m in kinds.items() if k not in limited_kinds},
        fast_queues=None if served is None else tuple(q for q in served if q not in queue_limits),
        excluded_queues=tuple(limited_queues) if served is None else (),
    )
