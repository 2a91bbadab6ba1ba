"""The generator in request mode (`@serve.batch`): its queue count (`queue_depth` gauge,
`system_details`) loses a request exactly once, whether it reaches a batch, fails, or is
cancelled while its model loads or while it waits in `@serve.batch`'s queue (which drops
cancelled requests unseen); and a warm-up never runs inside a pipeline call.

A unit test of the Generator alone: the blank engine, the model loader stubbed, and the replica
context `@serve.batch` reads its `max_ongoing_requests` from."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray import serve

from service.config import Settings
from service.engine.protocol import GenerationParams
from service.serving.generator import Generator
from tests.recording import RecordingMetrics


@pytest.fixture
def generator(monkeypatch):
    context = SimpleNamespace(
        _deployment_config=SimpleNamespace(max_ongoing_requests=64), replica_tag="replica-1"
    )
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return Generator(
        Settings(models={"stable-diffu": "unused"}, warmup=False),
        max_batch_size=8,
        batch_wait_timeout_s=0.3,
        max_batch_images=16,
        engine="service.engine.blank:BlankEngine",
        batching="request",
    )


def test_cancelled_and_served_requests_all_leave_the_queue_count(generator):
    params = GenerationParams(prompt="x", model_id="stable-diffu", width=64, height=64)

    async def scenario():
        async def cold_load(model_id):
            await asyncio.sleep(1.0)
            return model_id

        async def warm(model_id):
            return model_id

        generator._get_model = cold_load
        loading = asyncio.create_task(generator.generate(params))
        await asyncio.sleep(0.1)
        assert generator.details()["queue_depth"] == 1
        loading.cancel()  # while its model loads

        generator._get_model = warm
        queued = asyncio.create_task(generator.generate(params))
        await asyncio.sleep(0.1)  # inside the batch's 0.3 s wait
        queued.cancel()
        served = await generator.generate(params)
        await asyncio.gather(loading, queued, return_exceptions=True)
        assert len(served.images) == 1
        assert generator.details()["queue_depth"] == 0

    asyncio.run(scenario())


def test_a_warm_up_waits_for_the_running_pipeline_call(generator, monkeypatch):
    """A warm-up generates without LoRAs: run during a batch, it would switch the batch's LoRAs
    off for its remaining steps. It waits for the call instead, as in step mode."""
    import threading

    events = []
    release = threading.Event()
    real_generate = generator.engine.generate

    def slow_generate(chunk):
        events.append("batch starts")
        release.wait(timeout=10)
        events.append("batch ends")
        return real_generate(chunk)

    monkeypatch.setattr(generator.engine, "generate", slow_generate)
    monkeypatch.setattr(generator.engine, "warmup", lambda model_id: events.append("warm-up"))
    monkeypatch.setattr(generator.settings, "warmup", True)
    params = GenerationParams(prompt="x", model_id="stable-diffu", width=64, height=64)

    async def scenario():
        call = asyncio.create_task(generator._run_chunk([params]))
        while not events:
            await asyncio.sleep(0.01)
        warming = asyncio.create_task(asyncio.to_thread(generator._load_and_warm, "stable-diffu"))
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.gather(call, warming)

    asyncio.run(scenario())
    assert events == ["batch starts", "batch ends", "warm-up"]


def test_an_unusable_replica_refuses_work_so_that_it_is_sent_elsewhere(generator):
    """After a fatal device error a replica runs nothing more: each request and each shared
    call is refused with ReplicaUnusable, which the ingress retries on another replica."""
    from service.serving.generator import ReplicaUnusable
    from service.serving.ingress import REPLICA_GONE

    params = GenerationParams(prompt="x", model_id="stable-diffu", width=64, height=64)

    async def warm(model_id):
        return model_id

    async def scenario():  # one event loop: @serve.batch's queue belongs to the first
        generator._get_model = warm
        generator._note_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
        with pytest.raises(ReplicaUnusable, match="illegal memory access") as refused:
            await generator.generate(params)
        assert isinstance(refused.value, REPLICA_GONE)
        with pytest.raises(ReplicaUnusable):
            async for _ in generator.generate_stream([params, params]):
                pass

    asyncio.run(scenario())
    assert generator.details()["queue_depth"] == 0
    with pytest.raises(RuntimeError, match="unusable"):
        generator.check_health()


def test_a_replica_asked_to_restart_still_serves_until_it_is_replaced(generator):
    generator.request_restart()
    with pytest.raises(RuntimeError, match="restart requested"):
        generator.check_health()
    assert generator.ready() is False and generator.details()["healthy"] is False
    generator._refuse_if_unusable()  # its work still runs: it is healthy, only being replaced


def test_clear_cache_keeps_the_models_of_requests_on_the_replica(generator):
    params = GenerationParams(prompt="x", model_id="stable-diffu", width=64, height=64)

    async def scenario():
        async def cold_load(model_id):
            await asyncio.sleep(1.0)
            return model_id

        generator.engine.load("stable-diffu")
        generator._get_model = cold_load
        request = asyncio.create_task(generator.generate(params))
        await asyncio.sleep(0.1)
        kept = generator.clear_cache()
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        return kept, generator.clear_cache()

    kept, cleared = asyncio.run(scenario())
    assert kept["unloaded"] == [] and kept["loaded_models"] == ["stable-diffu"]
    assert cleared["unloaded"] == ["stable-diffu"] and cleared["loaded_models"] == []


def test_a_stuck_step_loop_fails_the_health_check(generator):
    """A hung device never finishes its step: Serve replaces the replica (health check)."""

    class StuckLoop:
        def stalled(self, limit_s):
            assert limit_s == generator.settings.step_stall_timeout_s
            return "no denoising step has finished for 900 s"

    generator.check_health()
    generator._steps = StuckLoop()
    with pytest.raises(RuntimeError, match="step loop stuck: no denoising step .* 900 s"):
        generator.check_health()


def test_a_request_the_device_failed_under_is_handed_back_as_unusable(generator):
    """A fatal device error during a request: it is refused as ReplicaUnusable (sent again by
    the ingress), not failed with the CUDA error."""
    from service.serving.generator import ReplicaUnusable

    params = GenerationParams(prompt="x", model_id="stable-diffu", width=64, height=64)

    async def breaking_load(model_id):
        error = RuntimeError("CUDA error: an illegal memory access was encountered")
        generator._note_fatal(error)
        raise error

    async def scenario():
        generator._get_model = breaking_load
        with pytest.raises(ReplicaUnusable) as refused:
            await generator.generate(params)
        assert "illegal memory access" in str(refused.value.__cause__)

    asyncio.run(scenario())
    assert generator.details()["queue_depth"] == 0


def test_concurrent_safety_checks_count_their_own_device_time_only(generator):
    """Eight requests' safety checks at once on one device: the device time recorded is the
    work (8 x 0.2 s), not each check's wall time, most of it spent waiting for the others."""
    import threading
    import time as clock
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from service.engine.protocol import GenerationOutput

    device = threading.Lock()  # kernels of concurrent threads run one after another

    class Checker:
        def flags(self, images):
            with device:
                clock.sleep(0.2)
            return [False] * len(images)

    generator.safety, generator.metrics = Checker(), RecordingMetrics()
    params = GenerationParams(prompt="x", model_id="stable-diffu", width=8, height=8)

    def check(_):
        output = GenerationOutput(images=[np.zeros((8, 8, 3), np.uint8)], seed=1)
        return generator._check_safety(params, output)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, range(8)))
    recorded = [
        seconds for _stage, _model, seconds, _price in generator.metrics.of("gpu_work_done")
    ]
    assert len(recorded) == 8
    assert sum(recorded) < 8 * 0.2 * 1.5  # about 1.6 s; unlocked, it read about 6.6 s
