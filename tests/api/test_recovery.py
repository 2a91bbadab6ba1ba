"""Jobs outlive the ingress process that accepted them: another replica (or the restarted
one) takes over jobs whose heartbeat stopped, re-runs them, or fails and refunds them."""

from __future__ import annotations

import asyncio
import gc
import time
from decimal import Decimal

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from service.api import text2img
from service.api.errors import ApiError, ErrorKind
from service.api.protocol import FetchRequest, Text2ImgRequest
from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams
from service.serving.ingress import build_image_service
from service.store.jobs import JobStatus, JobStore
from tests.api.test_routes import KEY, write_model_configs
from tests.recording import RecordingMetrics


async def never(_params: GenerationParams) -> GenerationOutput:
    await asyncio.Event().wait()  # a replica that hangs until it dies
    raise AssertionError("unreachable")


async def works(params: GenerationParams) -> GenerationOutput:
    images = [np.zeros((params.height, params.width, 3), np.uint8)] * params.samples
    return GenerationOutput(images=images, seed=params.seed, batch_size=params.samples)


@pytest.fixture()
def settings(tmp_path):
    write_model_configs(tmp_path / "model")
    return Settings(
        models={"stable-diffu": str(tmp_path / "model")},
        database_url=f"sqlite:///{tmp_path}/db.sqlite",
        image_store_url=str(tmp_path / "images"),
        demo_key=KEY,
        demo_key_balance_usd=1,
        min_size=64,
        orphan_after_s=0.2,
        heartbeat_interval_s=0.05,  # orphan_after_s must span 2 beats
        max_job_attempts=2,
    )


async def accept(service, n: int, **fields) -> list[int]:
    body = {"key": KEY, "prompt": "x", "width": 64, "height": 64, "instant_response": "yes"}
    body.update(fields)
    ids = []
    for _ in range(n):
        response = await service.text2img(Text2ImgRequest(**body), {}, "v6")
        assert response["status"] == "processing"
        ids.append(response["id"])
    return ids


def crash(service) -> None:
    """What a killed process leaves behind: its tasks stop, its job rows stay processing."""
    for task in list(service._running.values()):
        task.cancel()


def test_orphans_of_a_dead_replica_are_re_run_and_charged_once(settings):
    async def scenario():
        dead = build_image_service(settings, never)
        ids = await accept(dead, 3)
        balance_after_reserve = dead.keys.find("demo").balance
        crash(dead)
        await asyncio.sleep(0)

        alive = build_image_service(settings, works)
        assert await alive.maintain_once() == ([], [])  # heartbeats still fresh
        await asyncio.sleep(0.3)
        claimed, failed = await alive.maintain_once()
        assert sorted(claimed) == ids and failed == []
        await alive.drain()
        for job_id in ids:
            job = alive.jobs.get(job_id)
            assert job.status is JobStatus.SUCCESS and job.attempts == 2
            assert job.owner == alive.owner
        assert alive.keys.find("demo").balance == balance_after_reserve
        assert Decimal(1) - balance_after_reserve == Decimal("0.0141")
        assert alive.ledger.audit() == []

    asyncio.run(scenario())


def test_a_job_whose_servers_keep_dying_is_failed_and_refunded(settings):
    async def scenario():
        first = build_image_service(settings, never)
        [job_id] = await accept(first, 1)
        crash(first)
        await asyncio.sleep(0.3)
        second = build_image_service(settings, never)
        assert await second.maintain_once() == ([job_id], [])  # attempt 2 of 2
        crash(second)
        await asyncio.sleep(0.3)
        third = build_image_service(settings, works)
        assert await third.maintain_once() == ([], [job_id])
        job = third.jobs.get(job_id)
        assert job.status is JobStatus.FAILED and "stopped 2 times" in job.message
        assert third.keys.find("demo").balance == Decimal(1)
        assert third.ledger.audit() == []

    asyncio.run(scenario())


def test_a_live_replica_keeps_its_jobs(settings):
    async def scenario():
        busy = build_image_service(settings, never)
        ids = await accept(busy, 2)
        other = build_image_service(settings, works)
        for _ in range(3):
            await asyncio.sleep(0.1)
            await busy.maintain_once()  # heartbeats
            assert await other.maintain_once() == ([], [])
        assert {busy.jobs.get(i).status for i in ids} == {JobStatus.PROCESSING}
        crash(busy)

    asyncio.run(scenario())


def test_a_saturated_replica_answers_429(settings):
    async def scenario():
        service = build_image_service(settings.model_copy(update={"max_inflight_jobs": 2}), never)
        await accept(service, 2)
        body = {"key": KEY, "prompt": "x", "width": 64, "height": 64, "instant_response": "yes"}
        with pytest.raises(ApiError) as info:
            await service.text2img(Text2ImgRequest(**body), {}, "v6")
        assert info.value.kind is ErrorKind.RATE_LIMIT and info.value.retry_after > 0
        assert "Server busy" in info.value.message
        crash(service)

    asyncio.run(scenario())


def gated(gate: asyncio.Event, fails: bool = False):
    async def generate(params: GenerationParams) -> GenerationOutput:
        await gate.wait()
        if fails:
            raise RuntimeError("CUDA error on this replica")
        return await works(params)

    return generate


def image_name(service, job_id: int) -> str:
    [name] = service.jobs.get(job_id).output_names
    return name


def test_a_job_cleared_on_another_replica_leaves_no_image_behind(settings):
    """clear_queue refunds a job a second replica is still generating: when that replica's
    images arrive, they are removed, not served free at the links the client holds."""

    async def scenario():
        gate = asyncio.Event()
        running = build_image_service(settings, gated(gate))
        [job_id] = await accept(running, 1)
        other = build_image_service(settings, works)
        assert (await other.clear_queue())["ids"] == [job_id]
        gate.set()
        await running.drain()
        job = running.jobs.get(job_id)
        assert job.status is JobStatus.FAILED and job.message == "Cancelled by clear_queue"
        assert running.images.read(image_name(running, job_id)) is None
        assert running.keys.find("demo").balance == Decimal(1)
        assert running.ledger.audit() == []

    asyncio.run(scenario())


def test_a_replica_that_lost_its_job_neither_fails_nor_finishes_it(settings):
    """A live replica that missed its heartbeats has had its job taken over: its own failure
    must not refund the new owner's attempt, nor its success settle it twice."""

    async def scenario():
        for first_fails in (True, False):
            first_gate, second_gate = asyncio.Event(), asyncio.Event()
            first = build_image_service(settings, gated(first_gate, fails=first_fails))
            [job_id] = await accept(first, 1)
            await asyncio.sleep(0.3)  # no heartbeat from `first` meanwhile
            second = build_image_service(settings, gated(second_gate))
            assert await second.maintain_once() == ([job_id], [])

            first_gate.set()
            await first.drain()
            job = first.jobs.get(job_id)
            assert job.status is JobStatus.PROCESSING and job.owner == second.owner

            second_gate.set()
            await second.drain()
            job = second.jobs.get(job_id)
            assert job.status is JobStatus.SUCCESS and job.attempts == 2
            assert second.images.read(image_name(second, job_id)) is not None
            assert second.ledger.audit() == []
        assert second.keys.find("demo").balance == Decimal(1) - 2 * Decimal("0.0047")

    asyncio.run(scenario())


def test_a_failed_write_leaves_no_partial_output(settings, monkeypatch):
    async def scenario():
        service = build_image_service(settings, works)
        writes = []

        def write_then_break(name, image):
            if writes:
                raise OSError("disk full")
            writes.append(name)
            original_write(name, image)

        original_write = service.images.write
        monkeypatch.setattr(service.images, "write", write_then_break)
        body = {"key": KEY, "prompt": "x", "width": 64, "height": 64, "samples": 2}
        response = await service.text2img(Text2ImgRequest(**body), {}, "v6")
        assert response["status"] == "failed"
        assert writes and service.images.read(writes[0]) is None
        assert service.keys.find("demo").balance == Decimal(1)

    asyncio.run(scenario())


def test_a_slow_prune_does_not_hold_up_the_heartbeats(settings, monkeypatch):
    async def scenario():
        service = build_image_service(
            settings.model_copy(update={"heartbeat_interval_s": 0.05}), works
        )
        beats, prunes = [], []
        real_round = service.maintain_once

        async def counted_round():
            beats.append(time.monotonic())
            return await real_round()

        def slow_prune():
            prunes.append(time.monotonic())
            time.sleep(1.0)  # a large bucket being walked
            return 0

        monkeypatch.setattr(service, "maintain_once", counted_round)
        monkeypatch.setattr(service, "prune_images", slow_prune)
        loop = asyncio.create_task(service.maintain())
        await asyncio.sleep(0.6)
        loop.cancel()
        assert len(prunes) == 1
        assert len(beats) >= 5, f"{len(beats)} heartbeat rounds in 0.6 s beside a 1 s prune"

    asyncio.run(scenario())


def notifications(*services) -> list[tuple[int, int]]:
    """(which service, job id) of every webhook each service starts, in order."""
    sent: list[tuple[int, int]] = []
    for index, service in enumerate(services):
        service._notify = lambda job_id, index=index: sent.append((index, job_id))
    return sent


HOOK = {"webhook": "https://hooks.example.com/sdserve"}


def test_one_webhook_per_job_end_whichever_replica_ends_it(settings):
    async def scenario():
        # taken over: the new owner finishes first, the old one later; only the first says so
        old_gate, new_gate = asyncio.Event(), asyncio.Event()
        old = build_image_service(settings, gated(old_gate))
        [job_id] = await accept(old, 1, **HOOK)
        await asyncio.sleep(0.3)
        new = build_image_service(settings, gated(new_gate))
        sent = notifications(old, new)
        assert await new.maintain_once() == ([job_id], [])
        new_gate.set()
        await new.drain()
        old_gate.set()
        await old.drain()
        assert new.jobs.get(job_id).status is JobStatus.SUCCESS
        assert sent == [(1, job_id)]

        # cleared by another replica: the one that cleared it says so, the runner does not
        gate = asyncio.Event()
        running = build_image_service(settings, gated(gate))
        [job_id] = await accept(running, 1, **HOOK)
        clearing = build_image_service(settings, works)
        sent = notifications(running, clearing)
        assert (await clearing.clear_queue())["ids"] == [job_id]
        gate.set()
        await running.drain()
        assert sent == [(1, job_id)]

        # cleared on its own replica, its task cancelled: once as well
        gate = asyncio.Event()
        alone = build_image_service(settings, gated(gate))
        [job_id] = await accept(alone, 1, **HOOK)
        sent = notifications(alone)
        assert (await alone.clear_queue())["ids"] == [job_id]
        await alone.drain()
        assert sent == [(0, job_id)]

    asyncio.run(scenario())


def database_error() -> OperationalError:
    return OperationalError(
        "UPDATE jobs", {}, Exception("server closed the connection unexpectedly")
    )


def test_a_database_blip_at_the_end_does_not_fail_a_generated_job(settings, monkeypatch):
    """The connection drops as a generated job is recorded: recording is tried again, the job
    succeeds with its images, charged once; no database text reaches the client."""

    async def scenario():
        service = build_image_service(settings, works)
        original, calls = service.jobs.finish, []

        def finish_after_a_blip(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise database_error()
            return original(*args, **kwargs)

        monkeypatch.setattr(service.jobs, "finish", finish_after_a_blip)
        monkeypatch.setattr(text2img, "SETTLE_BACKOFF_S", 0.01)
        body = {"key": KEY, "prompt": "x", "width": 64, "height": 64}
        response = await service.text2img(Text2ImgRequest(**body), {}, "v6")
        assert response["status"] == "success", response
        assert len(calls) == 2
        assert service.images.read(image_name(service, response["id"])) is not None
        assert service.keys.find("demo").balance == Decimal(1) - Decimal("0.0047")
        assert service.ledger.audit() == []

    asyncio.run(scenario())


def test_a_commit_that_raised_after_it_landed_is_this_replicas_end(settings, monkeypatch):
    """The success was committed but the answer was lost: the next try finds it ended by this
    replica and reports it so (charged once), instead of ending nothing."""

    async def scenario():
        service = build_image_service(settings, works)
        original = service.jobs.finish
        lost = []

        def commits_then_raises(*args, **kwargs):
            if not lost:
                lost.append(original(*args, **kwargs))
                raise database_error()
            return original(*args, **kwargs)

        monkeypatch.setattr(service.jobs, "finish", commits_then_raises)
        monkeypatch.setattr(text2img, "SETTLE_BACKOFF_S", 0.01)
        [job_id] = await accept(service, 1)
        task = service._running[job_id]
        await service.drain()
        assert task.result() is not None and task.result().status is JobStatus.SUCCESS
        assert service.keys.find("demo").balance == Decimal(1) - Decimal("0.0047")

    asyncio.run(scenario())


def test_a_job_whose_end_cannot_be_recorded_is_answered_and_finished_later(settings, monkeypatch):
    """The database stays unreachable as a waiting request's job ends: the client gets its id
    and fetch link, not a bare 503; the job stays processing, and once the database answers
    the sweep runs it again: success, same links, charged once."""

    async def scenario():
        service = build_image_service(settings, works)
        down = True
        original = service.jobs.finish

        def finish(*args, **kwargs):
            if down:
                raise database_error()
            return original(*args, **kwargs)

        def get(*args, **kwargs):
            if down:
                raise database_error()
            return JobStore.get(service.jobs, *args, **kwargs)

        monkeypatch.setattr(service.jobs, "finish", finish)
        monkeypatch.setattr(service.jobs, "get", get)
        monkeypatch.setattr(text2img, "SETTLE_BACKOFF_S", 0.01)
        body = {"key": KEY, "prompt": "x", "width": 64, "height": 64}
        response = await service.text2img(Text2ImgRequest(**body), {}, "v6")
        assert response["status"] == "processing", response
        assert response["fetch_result"].endswith(f"/api/v6/images/fetch/{response['id']}")
        assert len(response["future_links"]) == 1

        down = False
        assert service.jobs.get(response["id"]).status is JobStatus.PROCESSING
        await asyncio.sleep(0.3)  # its heartbeat stopped with its task
        claimed, failed = await service.maintain_once()
        assert claimed == [response["id"]] and failed == []
        await service.drain()
        fetched = await service.fetch(FetchRequest(key=KEY), {}, response["id"], "v6")
        assert fetched["status"] == "success" and fetched["output"] == response["future_links"]
        assert service.keys.find("demo").balance == Decimal(1) - Decimal("0.0047")
        assert service.ledger.audit() == []

    asyncio.run(scenario())


def test_a_job_the_sweep_gives_up_on_leaves_no_image_behind(settings):
    """A dead replica wrote an image, then died before recording the end, as many times as
    allowed: the job is failed and refunded, and that image is not served free."""

    async def scenario():
        dead = build_image_service(settings, never)
        [job_id] = await accept(dead, 1)
        name = image_name(dead, job_id)
        dead.images.write(name, np.zeros((64, 64, 3), np.uint8))  # its partial output
        crash(dead)
        await asyncio.sleep(0.3)
        second = build_image_service(settings, never)
        assert await second.maintain_once() == ([job_id], [])
        crash(second)
        await asyncio.sleep(0.3)
        third = build_image_service(settings, works)
        assert await third.maintain_once() == ([], [job_id])
        assert third.jobs.get(job_id).status is JobStatus.FAILED
        assert third.images.read(name) is None
        assert third.keys.find("demo").balance == Decimal(1)

    asyncio.run(scenario())


def test_a_failed_background_job_is_not_reported_as_an_unretrieved_task_error(settings, caplog):
    async def scenario():
        done = asyncio.Event()
        service = build_image_service(settings, gated(done, fails=True))
        [job_id] = await accept(service, 1)
        done.set()
        await asyncio.sleep(0.05)
        assert service.jobs.get(job_id).status is JobStatus.FAILED

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(scenario())
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_job_cleared_on_another_replica_stops_generating_here(settings):
    """clear_queue on one replica fails a job another replica generates: that replica's next
    heartbeat round sees it and stops the generation, instead of finishing it for nothing."""

    async def scenario():
        stopped = asyncio.Event()

        async def until_cancelled(params):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped.set()
                raise
            raise AssertionError("unreachable")

        running = build_image_service(settings, until_cancelled)
        [job_id] = await accept(running, 1)
        task = running._running[job_id]
        assert await running.maintain_once() == ([], [])
        assert not task.done()  # its own, still processing: left running

        clearing = build_image_service(settings, works)
        assert (await clearing.clear_queue())["ids"] == [job_id]
        await running.maintain_once()
        await asyncio.sleep(0)
        assert stopped.is_set() and task.cancelled()
        assert running.jobs.get(job_id).status is JobStatus.FAILED
        assert running.keys.find("demo").balance == Decimal(1)
        await running.drain()

    asyncio.run(scenario())


def test_a_long_pod_name_still_fits_the_owner_column():
    """KubeRay worker pods have names of up to 63 characters: PostgreSQL refused the job rows
    (HTTP 500 on every request) when the owner outgrew jobs.owner."""
    from service.store.jobs import Job

    column = Job.__table__.c.owner.type.length
    pod = "sdserve-prod-raycluster-x7k2p-gpu-workers-worker-ab12c-abcdefgh"[:63]
    owners = {text2img.job_owner(pod, 4194304) for _ in range(20)}
    assert len(owners) == 20  # still unique per process
    assert all(len(owner) <= column for owner in owners)
    assert all(owner.startswith(pod[:40]) and "-4194304-" in owner for owner in owners)
    short = text2img.job_owner("host", 7)
    assert short.startswith("host-7-") and len(short) == len("host-7-") + 8


def test_a_landed_end_whose_answer_was_lost_is_announced_once_the_database_answers(
    settings, monkeypatch
):
    """The success was committed, then every answer was lost while the database stayed down:
    no sweep will take the job (it is a success), so this replica announces it when it can."""

    async def scenario():
        service = build_image_service(settings, works)
        original = service.jobs.finish
        down = True

        def commits_then_the_database_goes(*args, **kwargs):
            if down and not landed:
                landed.append(original(*args, **kwargs))
            if down:
                raise database_error()
            return original(*args, **kwargs)

        landed: list = []
        monkeypatch.setattr(service.jobs, "finish", commits_then_the_database_goes)
        monkeypatch.setattr(text2img, "SETTLE_BACKOFF_S", 0.01)
        monkeypatch.setattr(text2img, "RECONCILE_FIRST_DELAY_S", 0.05)
        real_get = service.jobs.get

        def get(*args):
            if down:
                raise database_error()
            return real_get(*args)

        monkeypatch.setattr(service.jobs, "get", get)
        sent = notifications(service)
        service.metrics = metrics = RecordingMetrics()
        [job_id] = await accept(service, 1, **HOOK)
        await service.drain()
        assert sent == [] and landed  # its end is not known here yet
        down = False
        await asyncio.gather(*service._background)
        assert sent == [(0, job_id)]
        price = service.prices.price_per_image(real_get(job_id).model_id)
        assert [usd for *_, usd in metrics.of("billed")] == [price] and price > 0
        assert real_get(job_id).status is JobStatus.SUCCESS
        assert await service.maintain_once() == ([], [])  # nothing for the sweep
        assert sent == [(0, job_id)]

    asyncio.run(scenario())


def test_a_replica_takes_over_no_more_orphans_than_it_has_room_for(settings):
    """A dead replica left 5 jobs; a survivor with room for 2 more takes 2 (the oldest), and
    the rest as its own jobs end: the others stay for other replicas meanwhile."""

    async def scenario():
        dead = build_image_service(settings, never)
        ids = await accept(dead, 5)
        crash(dead)
        await asyncio.sleep(0.3)
        gate = asyncio.Event()
        survivor = build_image_service(
            settings.model_copy(update={"max_inflight_jobs": 2}), gated(gate)
        )
        assert await survivor.maintain_once() == (ids[:2], [])
        assert await survivor.maintain_once() == ([], [])  # full: nothing more taken
        gate.set()
        await survivor.drain()
        await asyncio.sleep(0.3)
        claimed, _ = await survivor.maintain_once()
        assert claimed == ids[2:4]
        await survivor.drain()
        assert [survivor.jobs.get(i).status for i in ids[:4]] == [JobStatus.SUCCESS] * 4

    asyncio.run(scenario())


def test_a_job_cleared_with_nobody_running_it_leaves_no_image_behind(settings):
    """An attempt wrote its image, then its end was never recorded (its task is gone): when
    clear_queue refunds the job, that image goes too."""

    async def scenario():
        dead = build_image_service(settings, never)
        [job_id] = await accept(dead, 1)
        name = image_name(dead, job_id)
        dead.images.write(name, np.zeros((64, 64, 3), np.uint8))
        crash(dead)
        await asyncio.sleep(0)
        clearing = build_image_service(settings, works)
        assert (await clearing.clear_queue())["ids"] == [job_id]
        assert clearing.images.read(name) is None
        assert clearing.keys.find("demo").balance == Decimal(1)

    asyncio.run(scenario())


def test_a_failure_after_a_take_over_is_not_counted_by_the_replica_that_lost_the_job(settings):
    async def scenario():
        gate = asyncio.Event()
        first = build_image_service(settings, gated(gate, fails=True))
        first.metrics = lost = RecordingMetrics()
        [job_id] = await accept(first, 1)
        await asyncio.sleep(0.3)
        second = build_image_service(settings, works)
        second.metrics = taker = RecordingMetrics()
        assert await second.maintain_once() == ([job_id], [])
        await second.drain()
        gate.set()
        await first.drain()
        assert second.jobs.get(job_id).status is JobStatus.SUCCESS
        assert [status for *_, status, _s in taker.of("job_done")] == ["success"]
        assert lost.of("job_done") == []  # its attempt failed, but the job was not its own

    asyncio.run(scenario())
