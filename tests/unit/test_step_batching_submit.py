"""StepBatching.generate alone, with a stand-in engine (no steps are run): a request whose check
loads files (a custom VAE, embeddings) is checked off the replica's event loop."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

from service.engine.protocol import GenerationParams
from service.metrics import NoMetrics
from service.serving.continuous import StepBatching


class CheckingEngine:
    """Records the thread of each check; a check with a custom VAE blocks as a load would."""

    def __init__(self) -> None:
        self.checks: list[tuple[str | None, str]] = []

    def check_request(self, params: GenerationParams) -> None:
        self.checks.append((params.vae, threading.current_thread().name))
        if params.vae is not None and len(self.checks) == 1:
            threading.Event().wait(0.3)  # the first check of the VAE: loading it


def test_a_check_that_loads_files_runs_off_the_event_loop():
    engine = CheckingEngine()
    steps = StepBatching(
        engine,
        max_running_images=4,
        admission="oldest_first",
        metrics=NoMetrics(),
        gpu_hour_price_usd=Decimal(0),
    )

    async def scenario():
        loop_thread = threading.current_thread().name
        ticks = 0

        async def ticking():  # the other requests of the replica, waiting on the loop
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(ticking())
        with_vae = GenerationParams(prompt="x", model_id="m", width=64, height=64, vae="crisp")
        request = asyncio.create_task(steps.generate(with_vae))
        await asyncio.sleep(0.4)  # no step loop runs: the request stays queued
        ticker.cancel()
        request.cancel()
        plain = GenerationParams(prompt="x", model_id="m", width=64, height=64)
        cheap = asyncio.create_task(steps.generate(plain))
        await asyncio.sleep(0.01)
        cheap.cancel()
        return loop_thread, ticks

    loop_thread, ticks = asyncio.run(scenario())
    assert ticks >= 15  # the loop kept turning through the 0.3 s load
    first, second, third = engine.checks
    assert first[0] == "crisp" and first[1] != loop_thread  # the load, in a worker thread
    assert second[0] == "crisp"  # submit's own check, from what the first cached
    assert third == (None, loop_thread)  # nothing to load: checked on submit alone


def make_steps(engine) -> StepBatching:
    return StepBatching(
        engine,
        max_running_images=4,
        admission="oldest_first",
        metrics=NoMetrics(),
        gpu_hour_price_usd=Decimal(0),
    )


def test_an_idle_loop_is_not_stalled_and_a_hung_step_is():
    idle = make_steps(CheckingEngine())
    idle.start()
    try:
        threading.Event().wait(2.0)
        assert idle.stalled(1.0) is None  # waiting for work turns the loop every 0.5 s
    finally:
        idle.stop()

    hung = make_steps(CheckingEngine())
    release = threading.Event()
    hung.batcher.step = lambda: release.wait()  # a device call that never returns
    hung.start()
    try:
        threading.Event().wait(1.2)
        assert "no denoising step has finished" in (hung.stalled(1.0) or "")
        assert hung.stalled(30) is None  # within the limit: not yet
    finally:
        release.set()
        hung.stop()


def test_the_queue_gauge_drops_a_request_cancelled_while_waiting():
    gauge: list[int] = []

    class Metrics(NoMetrics):
        def set_queue_depth(self, depth):
            gauge.append(depth)

    steps = StepBatching(
        CheckingEngine(),
        max_running_images=4,
        admission="oldest_first",
        metrics=Metrics(),
        gpu_hour_price_usd=Decimal(0),
    )

    async def scenario():
        request = asyncio.create_task(
            steps.generate(GenerationParams(prompt="x", model_id="m", width=64, height=64))
        )
        await asyncio.sleep(0.01)
        request.cancel()  # before any step admitted it

    asyncio.run(scenario())
    assert gauge == [1]
    steps.start()
    try:
        threading.Event().wait(0.3)
    finally:
        steps.stop()
    assert gauge[-1] == 0 and steps.queue_depth() == 0
