"""GeneratorFleet alone, against a fake deployment handle: how requests share generator calls,
and what happens to each when a call, a request or a replica fails. The real deployment path
(Ray Serve, tiny model) is in tests/e2e and tests/serving."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError

from service.engine.protocol import GenerationOutput, GenerationParams
from service.serving import ingress
from service.serving.ingress import GeneratorFleet


def params(seed: int, model_id: str = "m1") -> GenerationParams:
    return GenerationParams(prompt=f"p{seed}", model_id=model_id, seed=seed, width=64, height=64)


class FakeHandle:
    """Answers `generate_many` with one output per request (seed echoed), after `delay_s`;
    a request whose seed is in `fail_seeds` gets an exception in its place; the first
    `replica_losses` calls die as a lost replica would."""

    def __init__(self, delay_s: float = 0.01):
        self.delay_s = delay_s
        self.calls: list[tuple[str, list[int]]] = []
        self.single_calls: list[int] = []
        self.fail_seeds: set[int] = set()
        self.replica_losses = 0
        self.cancelled = 0

    def options(self, multiplexed_model_id: str):
        return _Bound(self, multiplexed_model_id)


class _Bound:
    """The handle bound to one model, as `options(multiplexed_model_id=...)` returns it."""

    def __init__(self, fake: FakeHandle, model_id: str):
        self.fake, self.model_id = fake, model_id
        self.generate_many = _Method(self._many)
        self.generate = _Method(self._one)

    async def _many(self, batch: list[GenerationParams]):
        fake = self.fake
        fake.calls.append((self.model_id, [p.seed for p in batch]))
        if fake.replica_losses:
            fake.replica_losses -= 1
            raise ActorUnavailableError("replica gone", b"0" * 16)
        try:
            await asyncio.sleep(fake.delay_s)
        except asyncio.CancelledError:
            fake.cancelled += 1
            raise
        return [
            ValueError(f"bad seed {p.seed}")
            if p.seed in fake.fail_seeds
            else GenerationOutput(images=[], seed=p.seed)
            for p in batch
        ]

    async def _one(self, p: GenerationParams):
        self.fake.single_calls.append(p.seed)
        return GenerationOutput(images=[], seed=p.seed)


class _Method:
    def __init__(self, fn):
        self.remote = fn


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(ingress, "REPLICA_RETRY_DELAY_S", 0.0)


def run(coro):
    return asyncio.run(coro)


def test_requests_within_the_window_share_one_call_per_model():
    async def scenario():
        handle = FakeHandle()
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.02)
        seeds = [1, 2, 3, 4, 5]
        jobs = [fleet.generate(params(s)) for s in seeds]
        jobs += [fleet.generate(params(s, "m2")) for s in (6, 7)]
        outputs = await asyncio.gather(*jobs)
        return handle, [o.seed for o in outputs]

    handle, seeds = run(scenario())
    assert seeds == [1, 2, 3, 4, 5, 6, 7]  # each request gets its own answer
    assert sorted(handle.calls) == [("m1", [1, 2, 3, 4, 5]), ("m2", [6, 7])]


def test_a_full_call_leaves_at_once_and_the_rest_start_another():
    async def scenario():
        handle = FakeHandle()
        # a window far longer than the test: only filling up can send the first two calls
        fleet = GeneratorFleet(handle, max_per_call=4, window_s=0.5)
        started = asyncio.get_running_loop().time()
        first_eight = await asyncio.gather(*(fleet.generate(params(s)) for s in range(8)))
        return handle, first_eight, asyncio.get_running_loop().time() - started

    handle, outputs, seconds = run(scenario())
    assert [o.seed for o in outputs] == list(range(8))
    assert [seeds for _, seeds in handle.calls] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert seconds < 0.4


def test_one_failed_request_fails_alone():
    async def scenario():
        handle = FakeHandle()
        handle.fail_seeds = {2}
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
        return await asyncio.gather(
            *(fleet.generate(params(s)) for s in (1, 2, 3)), return_exceptions=True
        )

    first, second, third = run(scenario())
    assert first.seed == 1 and third.seed == 3
    assert isinstance(second, ValueError) and "bad seed 2" in str(second)


def test_a_lost_replica_is_retried_with_the_whole_call():
    async def scenario():
        handle = FakeHandle()
        handle.replica_losses = 1
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
        outputs = await asyncio.gather(*(fleet.generate(params(s)) for s in (1, 2, 3)))
        return handle, [o.seed for o in outputs]

    handle, seeds = run(scenario())
    assert seeds == [1, 2, 3]
    assert [s for _, s in handle.calls] == [[1, 2, 3], [1, 2, 3]]


def test_a_call_stops_when_every_request_of_it_is_cancelled_but_not_before():
    async def scenario():
        handle = FakeHandle(delay_s=0.3)
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.0)
        one = asyncio.create_task(fleet.generate(params(1)))
        two = asyncio.create_task(fleet.generate(params(2)))
        await asyncio.sleep(0.05)  # the call has left
        one.cancel()
        await asyncio.sleep(0.05)
        still_running = handle.cancelled == 0
        two.cancel()
        await asyncio.sleep(0.05)
        return handle, still_running, one.cancelled() and two.cancelled()

    handle, still_running_after_one, both_cancelled = run(scenario())
    assert still_running_after_one  # the other request still wanted its image
    assert both_cancelled and handle.cancelled == 1


def test_one_request_per_call_when_asked():
    async def scenario():
        handle = FakeHandle()
        fleet = GeneratorFleet(handle, max_per_call=1)
        outputs = await asyncio.gather(*(fleet.generate(params(s)) for s in (1, 2)))
        return handle, [o.seed for o in outputs]

    handle, seeds = run(scenario())
    assert seeds == [1, 2] and handle.single_calls == [1, 2] and handle.calls == []


def test_a_call_an_unusable_replica_refused_is_sent_again():
    from service.serving.generator import ReplicaUnusable

    async def scenario():
        handle = FakeHandle()
        refusals = [ReplicaUnusable("generator replica unusable: CUDA error")]
        many = _Bound._many

        async def refusing(self, batch):
            if refusals:
                self.fake.calls.append((self.model_id, [p.seed for p in batch]))
                raise refusals.pop()
            return await many(self, batch)

        _Bound._many = refusing
        try:
            fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
            outputs = await asyncio.gather(*(fleet.generate(params(s)) for s in (1, 2)))
        finally:
            _Bound._many = many
        assert [o.seed for o in outputs] == [1, 2]
        assert handle.calls == [("m1", [1, 2]), ("m1", [1, 2])]

    run(scenario())
