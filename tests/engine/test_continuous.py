"""Step-level continuous batching on the tiny model: a request's image does not depend on what
shared its denoising steps, for every scheduler; admission is bounded, FIFO and starves no
bucket; LoRA sets never share a forward; failures stay with their request.

Tolerance: 1/255 per pixel, what request-level batching achieves on CPU (tests/engine/
test_pipeline.py::test_batch_invariance): a UNet forward over other rows changes float sums in
the last bits, nothing more.
"""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from concurrent.futures import Future

import numpy as np
import pytest

from service.engine.continuous import ContinuousBatcher, StepReport, bucket_key
from service.engine.optimize import runner_for
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.schedulers import SCHEDULERS
from service.engine.tiny_model import build_tiny_lora, build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

MODEL = "stable-diffu"
TOLERANCE = 1  # per pixel, out of 255


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    path = build_tiny_model(root / "tiny-sd2", seed=0)
    style = build_tiny_lora(path, root / "loras" / "style.safetensors", seed=3)
    return Engine({MODEL: path}, loras={"style": style})


def request(**overrides) -> GenerationParams:
    defaults = {
        "prompt": "a red fox in the snow",
        "model_id": MODEL,
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "seed": 1234,
    }
    return GenerationParams(**{**defaults, **overrides})


def alone(engine: Engine, params: GenerationParams) -> list[np.ndarray]:
    return engine.generate([params])[0].images


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def assert_same_images(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for image, reference in zip(got, expected, strict=True):
        assert max_diff(image, reference) <= TOLERANCE


# A busy mix: other schedulers (multistep, ancestral, two evaluations per step), other step
# counts, guidance off and on, two images, another clip_skip.
NEIGHBOURS = [
    {"prompt": "a lighthouse", "seed": 1, "scheduler": "DPMSolverMultistepScheduler",
     "algorithm_type": "dpmsolver+++", "num_inference_steps": 5, "guidance_scale": 3.0},
    {"prompt": "cubist portrait", "negative_prompt": "text", "seed": 2, "samples": 2,
     "scheduler": "HeunDiscreteScheduler", "num_inference_steps": 2},
    {"prompt": "no guidance at all", "seed": 3, "guidance_scale": 1.0,
     "scheduler": "EulerAncestralDiscreteScheduler", "num_inference_steps": 4},
    {"prompt": "skip a layer", "seed": 4, "guidance_scale": 12.0, "clip_skip": 2,
     "scheduler": "KDPM2AncestralDiscreteScheduler", "num_inference_steps": 3},
]  # fmt: skip


def busy_run(
    batcher: ContinuousBatcher, target: GenerationParams
) -> tuple[Future, list[StepReport]]:
    """Two neighbours start, the target joins two steps in, two more join a step later."""
    first, second, third, fourth = (request(**fields) for fields in NEIGHBOURS)
    batcher.submit(first)
    batcher.submit(second)
    reports = batcher.run_until_idle(max_steps=2)
    future = batcher.submit(target)
    reports += batcher.run_until_idle(max_steps=1)
    batcher.submit(third)
    batcher.submit(fourth)
    reports += batcher.run_until_idle()
    assert batcher.idle()
    return future, reports


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_busy_batch_equals_alone_for_every_scheduler(engine, scheduler):
    target = request(
        scheduler=scheduler, negative_prompt="blurry", samples=2, seed=99, num_inference_steps=3
    )
    expected = alone(engine, target)
    future, reports = busy_run(ContinuousBatcher(engine, max_running_images=16), target)
    output = future.result(timeout=0)
    assert_same_images(output.images, expected)
    assert output.seed == 99
    assert output.extra["scheduler"] == scheduler
    # it really shared forwards with requests of other schedulers and step counts
    assert output.batch_size > target.samples
    assert max(report.requests for report in reports) >= 4


def test_every_request_of_a_mixed_batch_equals_alone(engine):
    batcher = ContinuousBatcher(engine, max_running_images=16)
    mix = [request(**fields) for fields in NEIGHBOURS] + [
        request(prompt="unipc", seed=5, scheduler="UniPCMultistepScheduler", samples=2),
        request(prompt="ddim", seed=6, scheduler="DDIMScheduler", num_inference_steps=6),
        request(prompt="pndm", seed=7, scheduler="PNDMScheduler", num_inference_steps=4),
    ]
    futures = []
    for params in mix:  # one arrival per step: each joins the running set mid-flight
        futures.append(batcher.submit(params))
        batcher.step()
    batcher.run_until_idle()
    for params, future in zip(mix, futures, strict=True):
        assert_same_images(future.result(timeout=0).images, alone(engine, params))


def test_one_forward_holds_every_running_request_each_at_its_own_timestep(engine, monkeypatch):
    batcher = ContinuousBatcher(engine, max_running_images=16)
    runner = runner_for(engine.load(MODEL))
    calls = []
    real_unet = runner.unet

    def spy(sample, timestep, encoder_hidden_states, **options):
        calls.append((sample.shape[0], timestep.tolist()))
        return real_unet(sample, timestep, encoder_hidden_states, **options)

    monkeypatch.setattr(runner, "unet", spy)
    guided = request(seed=1, num_inference_steps=4, scheduler="EulerDiscreteScheduler")
    batcher.submit(guided)
    (first,) = batcher.run_until_idle(max_steps=1)
    unguided = request(seed=2, guidance_scale=1.0, num_inference_steps=2, samples=2)
    batcher.submit(unguided)
    second = batcher.step()
    # 1 guided image (2 rows) + 2 unguided images (1 row each): no unconditional pass for them
    assert (first.unet_rows, second.unet_rows) == (2, 4)
    assert [rows for rows, _ in calls[:2]] == [2, 4]
    assert (second.requests, second.images) == (2, 3)
    _, timesteps = calls[1]
    # rows: [uncond of guided] + [cond of guided] + [2 unguided]; guided is one step ahead
    assert timesteps[0] == timesteps[1] != timesteps[2] == timesteps[3]
    batcher.run_until_idle()


def test_running_set_is_bounded_and_admission_is_fifo(engine):
    batcher = ContinuousBatcher(engine, max_running_images=3)
    sizes = [1, 2, 1, 1, 1]
    for seed, samples in enumerate(sizes):
        batcher.submit(request(seed=seed, samples=samples, num_inference_steps=2))
    reports = batcher.run_until_idle()
    assert max(report.images for report in reports) == 3
    admitted = [params.seed for report in reports for params, _ in report.admitted]
    assert admitted == [0, 1, 2, 3, 4]
    # seed 2 fits into the first step's leftover room only after seed 1 (2 images) is in
    assert [params.seed for params, _ in reports[0].admitted] == [0, 1]
    assert all(wait >= 0 for report in reports for _, wait in report.admitted)


def test_a_request_larger_than_the_running_set_runs_alone(engine):
    batcher = ContinuousBatcher(engine, max_running_images=2)
    small = batcher.submit(request(seed=1, num_inference_steps=2))
    large = batcher.submit(request(seed=2, samples=3, num_inference_steps=2))
    reports = batcher.run_until_idle()
    assert [report.images for report in reports] == [1, 1, 3, 3]
    assert len(large.result(timeout=0).images) == 3
    assert small.result(timeout=0).batch_size == 1


@pytest.mark.parametrize("admission", ["oldest_first", "round_robin"])
def test_a_busy_bucket_does_not_starve_another(engine, admission):
    """Bucket 64×64 gets a new request every step, forever; the 128×64 request still ends."""
    batcher = ContinuousBatcher(engine, max_running_images=4, admission=admission)
    busy = {"num_inference_steps": 2, "scheduler": "DDIMScheduler"}
    batcher.submit(request(seed=0, **busy))
    batcher.step()
    other = batcher.submit(request(width=128, seed=7, num_inference_steps=3))
    steps = 0
    while not other.done():
        batcher.submit(request(seed=steps + 1, **busy))
        report = batcher.step()
        assert report.requests >= 1
        steps += 1
        assert steps < 12, "the other bucket starved"
    assert other.result(timeout=0).images[0].shape == (64, 128, 3)
    batcher.run_until_idle()


def test_oldest_first_serves_the_oldest_request_first(engine):
    batcher = ContinuousBatcher(engine, admission="oldest_first")
    first = batcher.submit(request(seed=1, num_inference_steps=3))
    wide = batcher.submit(request(width=128, seed=2, num_inference_steps=3))
    reports = batcher.run_until_idle()
    assert [(report.width, report.requests) for report in reports] == [(64, 1)] * 3 + [(128, 1)] * 3
    assert first.done() and wide.done()


def test_lora_sets_never_share_a_forward(engine, monkeypatch):
    base = request(seed=11, scheduler="DPMSolverMultistepScheduler", num_inference_steps=4)
    styled = request(seed=12, loras=(("style", 1.0),), num_inference_steps=3)
    half = request(seed=13, loras=(("style", 0.5),), num_inference_steps=3)
    expected = {params: alone(engine, params) for params in (base, styled, half)}

    forwards = []
    real_step = engine.denoise_step

    def spy(pipe, states):
        forwards.append({state.params.loras for state in states})
        return real_step(pipe, states)

    monkeypatch.setattr(engine, "denoise_step", spy)
    batcher = ContinuousBatcher(engine, admission="round_robin")
    futures = {}
    for params in (base, styled, half, base):
        futures[params] = batcher.submit(params)
        batcher.step()
    batcher.run_until_idle()
    assert all(len(loras) == 1 for loras in forwards)
    assert {bucket_key(p)[1] for p in expected} == {(), (("style", 1.0),), (("style", 0.5),)}
    for params, future in futures.items():
        assert_same_images(future.result(timeout=0).images, expected[params])


def test_failures_stay_with_their_request(engine):
    batcher = ContinuousBatcher(engine)
    with pytest.raises(ValueError, match="^width:"):
        batcher.submit(request(width=100))
    with pytest.raises(ValueError, match="^model_id:"):
        batcher.submit(request(model_id="sdxl"))
    with pytest.raises(ValueError, match="^scheduler:"):
        batcher.submit(request(scheduler="NoSuchScheduler"))
    with pytest.raises(ValueError, match="^num_inference_steps:"):
        batcher.submit(request(scheduler="LCMScheduler", num_inference_steps=51))

    good = request(seed=21)
    bad = request(seed=22, clip_skip=6)  # the tiny text encoder has 5 layers
    missing_lora = request(seed=23, loras=(("nope", 1.0),))
    futures = [batcher.submit(params) for params in (good, bad, missing_lora)]
    reports = batcher.run_until_idle()
    assert_same_images(futures[0].result(timeout=0).images, alone(engine, good))
    with pytest.raises(ValueError, match="^clip_skip:"):
        futures[1].result(timeout=0)
    with pytest.raises(ValueError, match="'nope'"):
        futures[2].result(timeout=0)
    failed = [params.seed for report in reports for params, _ in report.failed]
    assert sorted(failed) == [22, 23]
    assert batcher.idle()


def test_a_dead_device_fails_every_request_and_says_so_even_when_its_timer_fails(
    engine, monkeypatch
):
    """After a sticky CUDA error every CUDA call raises, recording a timing event included:
    the running set and later arrivals must still fail (with the error in the step report,
    which marks the replica unhealthy), not wait for ever."""
    from service.engine.continuous import WallTimer

    dead = RuntimeError("CUDA error: an illegal memory access was encountered")

    class DeadAfterFault(WallTimer):
        faulted = False

        def start(self):
            if self.faulted:
                raise dead
            return super().start()

        def stop(self, started):
            if self.faulted:
                raise dead
            return super().stop(started)

    timer = DeadAfterFault()

    def fault(pipe, states):
        timer.faulted = True
        raise dead

    monkeypatch.setattr(engine, "denoise_step", fault)
    reports = []
    batcher = ContinuousBatcher(engine, on_step=reports.append)
    batcher.timer = timer
    first = batcher.submit(request(seed=31))
    batcher.run_until_idle()
    later = batcher.submit(request(seed=32))
    batcher.run_until_idle()
    for future in (first, later):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            future.result(timeout=0)
    assert [report.error is dead for report in reports] == [True, True]
    assert batcher.idle()


def test_cancelled_requests_leave_the_batch(engine):
    batcher = ContinuousBatcher(engine)
    running = batcher.submit(request(seed=31, num_inference_steps=4))
    batcher.step()
    waiting = batcher.submit(request(seed=32, num_inference_steps=4))
    assert waiting.cancel()
    kept = batcher.submit(request(seed=33, num_inference_steps=2))
    report = batcher.step()
    assert [params.seed for params, _ in report.admitted] == [33]
    assert running.cancel()
    reports = batcher.run_until_idle()
    assert [report.requests for report in reports] == [1]
    assert len(kept.result(timeout=0).images) == 1
    assert batcher.idle() and batcher.waiting() == 0 and batcher.running() == 0


def test_configuration_is_checked(engine):
    with pytest.raises(ValueError, match="^max_running_images:"):
        ContinuousBatcher(engine, max_running_images=0)
    with pytest.raises(ValueError, match="^admission:"):
        ContinuousBatcher(engine, admission="random")


class QueuedDeviceTimer:
    """Stands in for CUDA events: a step's work 'completes' only when the test says so (or
    when the batcher waits for it), as when the loop issues steps ahead of the GPU."""

    def __init__(self):
        self.issued = 0
        self.completed = 0  # steps whose device work has finished
        self.waits = 0

    def start(self):
        self.issued += 1
        return self.issued

    def stop(self, started):
        return started

    def wait(self, step):
        if step > self.completed:  # the device runs its queue up to this step
            self.waits += 1
            self.completed = step

    def seconds(self, step):
        return 0.5 * step if step <= self.completed else None


def test_steps_are_reported_once_their_device_work_completed_and_before_futures(engine):
    """Metrics get each step's device time, in step order; a step whose work is still queued
    is reported later, and a finished request's future settles only after every step before
    it was reported."""
    timer = QueuedDeviceTimer()
    seen: list[tuple[int, float, bool]] = []
    batcher = ContinuousBatcher(
        engine, on_step=lambda r: seen.append((r.images, r.seconds, future.done())), timer=timer
    )
    future = batcher.submit(request(seed=41, num_inference_steps=3))
    batcher.step()
    batcher.step()
    assert seen == [] and timer.waits == 0  # issued, not yet run on the "device"
    timer.completed = 1
    other = batcher.submit(request(seed=42, num_inference_steps=3, width=128))  # another bucket
    batcher.step()  # oldest first: the first request's last step, which decodes
    assert future.done()
    # every step so far, in order, with its own time, all before the future settled
    assert seen == [(1, 0.5, False), (1, 1.0, False), (1, 1.5, False)]
    assert timer.waits == 1
    batcher.step()
    assert len(seen) == 3 and not other.done()  # the other bucket's first step: still queued
    batcher.run_until_idle()
    assert [entry[1] for entry in seen] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert other.result(timeout=0).images


def test_the_wall_clock_times_steps_on_the_cpu(engine):
    reports = []
    batcher = ContinuousBatcher(engine, on_step=reports.append)
    future = batcher.submit(request(seed=43, num_inference_steps=2))
    batcher.run_until_idle()
    assert len(reports) == 2 and all(report.seconds > 0 for report in reports)
    assert future.result(timeout=0).inference_seconds >= sum(r.seconds for r in reports) * 0.5


def test_the_step_timer_is_the_one_that_works_on_the_device(caplog):
    """CUDA events where they can be recorded; on a CPU-only torch (CI) the probe fails, says
    so, and the loop keeps a timer that works."""
    import torch

    from service.engine.continuous import CudaEventTimer, WallTimer, step_timer

    assert isinstance(step_timer(torch.device("cpu")), WallTimer)
    expected = CudaEventTimer if torch.cuda.is_available() else WallTimer
    assert type(step_timer(torch.device("cuda"))) is expected
    fell_back = "steps are timed by the wall clock" in caplog.text
    assert fell_back == (expected is WallTimer)


def test_the_loop_issues_at_most_two_steps_ahead_of_the_device(engine):
    """A request that arrives joins the forward after at most the two steps already queued,
    not after every step the loop could have issued meanwhile."""
    timer = QueuedDeviceTimer()  # nothing completes unless the batcher waits for it
    seen: list[int] = []
    batcher = ContinuousBatcher(engine, on_step=lambda r: seen.append(r.images), timer=timer)
    first = batcher.submit(request(seed=51, num_inference_steps=8))
    for issued in range(1, 6):
        batcher.step()
        assert timer.issued == issued
        assert timer.completed == max(0, issued - 2)  # waited for the step two before
        assert len(seen) == timer.completed  # each step reported once it is done
    late = batcher.submit(request(seed=52, num_inference_steps=2))
    report = batcher.step()  # the late request joins the next issued step
    assert [params.seed for params, _ in report.admitted] == [52]
    assert timer.completed == 4  # steps 5 and 6 ahead of the device when it joined
    batcher.run_until_idle()
    assert first.result(timeout=0).images and late.result(timeout=0).images
    with pytest.raises(ValueError, match="^steps_ahead:"):
        ContinuousBatcher(engine, steps_ahead=0)
