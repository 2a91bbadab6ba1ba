"""GeneratorFleet alone, against a fake deployment handle: how requests share generator calls,
and what happens to each when a call, a request or a replica fails. The real deployment path
(Ray Serve, tiny model) is in tests/e2e and tests/serving."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError

from service.engine.protocol import GenerationOutput, GenerationParams
from service.serving import ingress
from service.serving.generator import Generator, ReplicaUnusable
from service.serving.ingress import GeneratorFleet


def params(seed: int, model_id: str = "m1") -> GenerationParams:
    return GenerationParams(prompt=f"p{seed}", model_id=model_id, seed=seed, width=64, height=64)


class FakeHandle:
    """Streams answers back like Serve does, through the real `Generator.generate_stream` and
    `cancel_requests` over a stand-in replica: each request's output (seed echoed) after
    `delay_s` plus its own `num_inference_steps` hundredths of a second; a request whose seed
    is in `fail_seeds` gets an exception in its place, one in `unusable_seeds` (once) the
    replica's ReplicaUnusable; the first `replica_losses` calls die as a lost replica would. As
    with Serve, a caller that stops waiting does not stop the call: only `cancel()` on the
    response does."""

    def __init__(self, delay_s: float = 0.01):
        self.delay_s = delay_s
        self.calls: list[tuple[str, list[int]]] = []
        self.single_calls: list[int] = []
        self.fail_seeds: set[int] = set()
        self.unusable_seeds: set[int] = set()
        self.replica_losses = 0
        self.cancelled = 0  # streams cancelled whole
        self.requests_cancelled: list[int] = []  # seeds stopped one by one
        self.finished: list[int] = []  # seeds, in the order the generator finished them
        self.replica = _Replica(self)

    def options(self, multiplexed_model_id: str, stream: bool = False):
        return _Bound(self, multiplexed_model_id)

    def broadcast(self, method: str, *args):
        assert method == "cancel_requests"
        return _Broadcast(Generator.cancel_requests(self.replica, *args))


class _Replica:
    """What `Generator.generate_stream` uses of a replica."""

    def __init__(self, fake: FakeHandle):
        self.fake = fake
        self._by_token: dict = {}

    def _refuse_if_unusable(self) -> None:
        pass

    async def generate(self, p: GenerationParams) -> GenerationOutput:
        fake = self.fake
        try:
            await asyncio.sleep(fake.delay_s + p.num_inference_steps / 100)
        except asyncio.CancelledError:
            fake.requests_cancelled.append(p.seed)
            raise
        fake.finished.append(p.seed)
        if p.seed in fake.fail_seeds:
            raise ValueError(f"bad seed {p.seed}")
        if p.seed in fake.unusable_seeds:
            fake.unusable_seeds.discard(p.seed)
            raise ReplicaUnusable("generator replica unusable: CUDA error")
        return GenerationOutput(images=[], seed=p.seed)


class _Broadcast:
    def __init__(self, work):
        self._work = work

    async def results_async(self, timeout_s=None, return_exceptions=False):
        return [await self._work]


class _Bound:
    """The handle bound to one model, as `options(multiplexed_model_id=...)` returns it."""

    def __init__(self, fake: FakeHandle, model_id: str):
        self.fake, self.model_id = fake, model_id
        self.generate_stream = _Method(lambda *a: _Stream(self._stream(*a)))
        self.generate = _Method(lambda p: asyncio.ensure_future(self._one(p)))

    async def _stream(self, batch: list[GenerationParams], tokens=None):
        fake = self.fake
        fake.calls.append((self.model_id, [p.seed for p in batch]))
        if fake.replica_losses:
            fake.replica_losses -= 1
            raise ActorUnavailableError("replica gone", b"0" * 16)
        try:
            async for item in Generator.generate_stream(fake.replica, batch, tokens):
                yield item
        except asyncio.CancelledError:
            fake.cancelled += 1
            raise

    async def _one(self, p: GenerationParams):
        self.fake.single_calls.append(p.seed)
        return GenerationOutput(images=[], seed=p.seed)


class _Stream:
    """A DeploymentResponseGenerator: async-iterable, cancellable; runs on its own task."""

    def __init__(self, agen):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(agen))

    async def _pump(self, agen):
        try:
            async for item in agen:
                await self._queue.put(("item", item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await self._queue.put(("error", exc))
            return
        await self._queue.put(("end", None))

    def cancel(self):
        self._task.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self._queue.get()
        if kind == "item":
            return value
        if kind == "end":
            raise StopAsyncIteration
        raise value


class _Method:
    def __init__(self, fn):
        self.remote = fn


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(ingress, "REPLICA_RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(ingress, "UNUSABLE_RETRY_DELAY_S", 0.0)


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


def test_a_call_an_unusable_replica_refused_is_sent_again(monkeypatch):
    original = _Bound._stream
    refusals = [ReplicaUnusable("generator replica unusable: CUDA error")]

    async def refusing(self, batch, tokens=None):
        if refusals:
            self.fake.calls.append((self.model_id, [p.seed for p in batch]))
            raise refusals.pop()
        async for item in original(self, batch, tokens):
            yield item

    monkeypatch.setattr(_Bound, "_stream", refusing)

    async def scenario():
        handle = FakeHandle()
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
        outputs = await asyncio.gather(*(fleet.generate(params(s)) for s in (1, 2)))
        assert [o.seed for o in outputs] == [1, 2]
        assert handle.calls == [("m1", [1, 2]), ("m1", [1, 2])]

    run(scenario())


def test_a_request_its_replica_failed_as_unusable_is_sent_again_alone():
    """The device broke under one request of a shared call: that one is sent again (to the
    replacement), the others keep the answers they already had."""

    async def scenario():
        handle = FakeHandle()
        handle.unusable_seeds = {2}
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
        outputs = await asyncio.gather(*(fleet.generate(params(s)) for s in (1, 2, 3)))
        assert [o.seed for o in outputs] == [1, 2, 3]
        assert handle.calls == [("m1", [1, 2, 3]), ("m1", [2])]

    run(scenario())


def test_a_unusable_replica_is_waited_out_but_not_for_ever(monkeypatch):
    monkeypatch.setattr(ingress, "UNUSABLE_RETRY_S", 0.2)
    monkeypatch.setattr(ingress, "UNUSABLE_RETRY_DELAY_S", 0.05)

    async def always_refusing(self, batch, tokens=None):
        self.fake.calls.append((self.model_id, [p.seed for p in batch]))
        raise ReplicaUnusable("generator replica unusable: CUDA error")
        yield  # an async generator, as the real one

    monkeypatch.setattr(_Bound, "_stream", always_refusing)

    async def scenario():
        handle = FakeHandle()
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.0)
        with pytest.raises(ReplicaUnusable):
            await fleet.generate(params(1))
        # retried past the lost-replica count (3), within UNUSABLE_RETRY_S
        assert 3 < len(handle.calls) <= 6

    run(scenario())


def test_nothing_is_sent_again_once_every_request_has_its_answer(monkeypatch):
    original = _Bound._stream

    async def dies_after_answering(self, batch, tokens=None):
        async for item in original(self, batch, tokens):
            yield item
        raise ActorUnavailableError("replica gone", b"0" * 16)

    monkeypatch.setattr(_Bound, "_stream", dies_after_answering)

    async def scenario():
        handle = FakeHandle()
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
        outputs = await asyncio.gather(*(fleet.generate(params(s)) for s in (1, 2)))
        assert [o.seed for o in outputs] == [1, 2]
        assert handle.calls == [("m1", [1, 2])]  # no empty second call

    run(scenario())


def test_a_cancelled_request_of_a_shared_call_is_stopped_alone():
    """clear_queue cancels one job of a call whose other request is still wanted (or already
    answered): the generator stops that one, by its token, and the call streams on."""

    async def scenario():
        handle = FakeHandle(delay_s=0.0)
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)

        def request(seed, steps):
            p = GenerationParams(
                prompt="p",
                model_id="m1",
                seed=seed,
                width=64,
                height=64,
                num_inference_steps=steps,
            )
            return asyncio.create_task(fleet.generate(p))

        fast, slow, wanted = request(1, 2), request(2, 50), request(3, 30)
        assert (await fast).seed == 1  # answered: the call is no longer all-cancellable
        slow.cancel()
        assert (await wanted).seed == 3
        await asyncio.sleep(0.05)
        assert handle.requests_cancelled == [2] and 2 not in handle.finished
        assert handle.cancelled == 0  # the stream itself went on for request 3
        assert slow.cancelled()

    run(scenario())


def test_each_request_of_a_shared_call_is_answered_when_it_is_ready():
    """A 2-step request that travelled with a 50-step one is answered when its own image is
    done, not when the call's slowest is."""

    async def scenario():
        handle = FakeHandle(delay_s=0.0)
        fleet = GeneratorFleet(handle, max_per_call=8, window_s=0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answered: dict[int, float] = {}

        async def timed(seed: int, steps: int):
            p = GenerationParams(
                prompt="p",
                model_id="m1",
                seed=seed,
                width=64,
                height=64,
                num_inference_steps=steps,
            )
            await fleet.generate(p)
            answered[seed] = loop.time() - started

        await asyncio.gather(timed(1, 50), timed(2, 2))
        assert handle.calls == [("m1", [1, 2])]  # one call
        assert answered[2] < 0.2 < answered[1]

    run(scenario())


def test_a_cancelled_call_is_stopped_on_the_generator(monkeypatch):
    """Serve does not stop a call whose caller stopped waiting: the fleet cancels it, whether
    the request went alone or in a shared call."""

    async def slow_one(self, p):
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            self.fake.cancelled += 1
            raise
        self.fake.finished.append(p.seed)
        return GenerationOutput(images=[], seed=p.seed)

    monkeypatch.setattr(_Bound, "_one", slow_one)

    async def scenario():
        for max_per_call in (1, 8):
            handle = FakeHandle(delay_s=0.3)
            fleet = GeneratorFleet(handle, max_per_call=max_per_call, window_s=0.0)
            job = asyncio.create_task(fleet.generate(params(1)))
            await asyncio.sleep(0.05)
            job.cancel()
            await asyncio.sleep(0.4)
            assert handle.cancelled == 1, max_per_call
            assert handle.finished == [], max_per_call

    run(scenario())
