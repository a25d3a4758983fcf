"""The reconciler's two lanes: the periodic re-check of every unfinished QLoRAJob never makes a
new QLoRAJob's reconcile wait behind it (bench/operator_scale.py measures the effect at 1,000 jobs)."""

from __future__ import annotations

import asyncio
import threading
import time

from qlora_operator import reconcile as reconcile_mod
from qlora_operator.settings import OperatorSettings


def test_a_watch_trigger_does_not_queue_behind_a_resync_of_many_jobs(monkeypatch):
    started: dict[str, float] = {}
    lock = threading.Lock()

    def slow_reconcile(api, settings, namespace, name, *, ensure=False):
        with lock:
            started[name] = time.monotonic()
        time.sleep(0.2)  # a reconcile's API round trips, in its worker thread
        return reconcile_mod.Outcome(phase="Suspended")

    monkeypatch.setattr(reconcile_mod, "reconcile", slow_reconcile)
    settings = OperatorSettings(max_concurrent_reconciles=2)

    async def scenario() -> float:
        reconciler = reconcile_mod.Reconciler(api=None, settings=settings)
        for i in range(20):
            reconciler.trigger("ns", f"old-{i}", resync=True)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        reconciler.trigger("ns", "new")
        while "new" not in started:
            await asyncio.sleep(0.01)
        waited = started["new"] - t0
        while len(started) < 21:
            await asyncio.sleep(0.05)
        return waited

    waited = asyncio.run(scenario())
    # One shared lane of 2 would start it after ~2 s (20 re-checks of 0.2 s, two at a time);
    # the resync lane holds 1 slot, so the new job starts at once.
    assert waited < 0.15, waited
    old_starts = sorted(v for k, v in started.items() if k.startswith("old-"))
    gaps = [b - a for a, b in zip(old_starts, old_starts[1:])]
    assert min(gaps) > 0.15, "re-checks run one at a time (half of max_concurrent_reconciles=2)"
