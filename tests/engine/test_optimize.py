"""The optimized engine path on the tiny model, on CPU: same images as stock, bounded compiles.

fp32 on CPU, so "same" means within 1/255 per pixel, as for the stock parity tests. CUDA graphs
and the GPU timings are exercised by benchmarks/sd2_bench.py on a GPU (benchmarks/GPU.md).
"""

# ruff: noqa: E402
import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from service.config import Settings
from service.engine.fp8 import (
    FP8_ATTRIBUTE,
    fp8_runs_on,
    quantize_rows,
    restore_linears,
    to_float8,
)
from service.engine.kernels import triton_runs_on
from service.engine.optimize import (
    GroupNormSiLU,
    OptimizationConfig,
    PipelineRunner,
    _pad_rows,
    runner_for,
    sdpa_backends,
    set_attention,
)
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.tiny_model import build_tiny_lora
from service.serving.generator import resolve_dtype

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

MODEL = "stable-diffu"


def request(**overrides) -> GenerationParams:
    defaults = {
        "prompt": "a red fox in the snow",
        "seed": 1234,
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "scheduler": "DDIMScheduler",
    }
    return GenerationParams(**{**defaults, **overrides})


def cpu_config(**overrides) -> OptimizationConfig:
    """Everything that runs on CPU; compile through dynamo only (no C++ build, seconds)."""
    options = {
        "enabled": True,
        "compile": False,
        "compile_backend": "eager",
        "triton_kernels": False,
        **overrides,
    }
    return OptimizationConfig(**options)


def max_diff(outputs, references) -> int:
    return max(
        int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        for output, reference in zip(outputs, references, strict=True)
        for a, b in zip(output.images, reference.images, strict=True)
    )


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    return Engine({MODEL: tiny_model_dir})


# --- configuration -----------------------------------------------------------------------------


def test_defaults_are_on_for_cuda_and_off_for_cpu():
    cuda = OptimizationConfig.for_device("cuda")
    assert cuda.enabled and cuda.compile and cuda.cuda_graphs and cuda.triton_kernels
    assert cuda.fuse_qkv and cuda.channels_last and cuda.attention == "sdpa"
    cpu = OptimizationConfig.for_device("cpu")
    assert not (cpu.enabled or cpu.compile or cpu.cuda_graphs or cpu.triton_kernels)
    assert OptimizationConfig().enabled is False
    # Asked for on a CPU: no CUDA graphs there.
    assert not OptimizationConfig.for_device("cpu", enabled=True).cuda_graphs
    # Inductor's own graphs replace ours.
    assert not OptimizationConfig.for_device("cuda", compile_mode="reduce-overhead").cuda_graphs


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match="^attention:"):
        OptimizationConfig(attention="xformers")
    with pytest.raises(ValueError, match="^compile_mode:"):
        OptimizationConfig(compile_mode="fast")
    with pytest.raises(ValueError, match="^batch_buckets:"):
        OptimizationConfig(batch_buckets=(1, 2))
    assert OptimizationConfig(batch_buckets=(8, 2, 4, 4)).batch_buckets == (2, 4, 8)


def test_latents_stay_fp32_on_the_optimized_path():
    assert cpu_config().latent_dtype(torch.bfloat16) == torch.float32
    assert OptimizationConfig().latent_dtype(torch.float16) == torch.float16
    assert cpu_config(fp32_latents=False).latent_dtype(torch.bfloat16) == torch.bfloat16


def test_settings_drive_the_config_and_the_dtype():
    settings = Settings(optimize="auto", compile=False, batch_buckets=[2, 8], attention="flash")
    cuda = OptimizationConfig.for_device("cuda", **settings.engine_optimizations())
    assert cuda.enabled and not cuda.compile and cuda.batch_buckets == (2, 8)
    assert cuda.attention == "flash"
    tuned = Settings(
        channels_last=False,
        compile_vae=True,
        inductor_tuning=True,
        cudnn_benchmark=True,
        triton_unet=False,
    )
    config = OptimizationConfig.for_device("cuda", **tuned.engine_optimizations())
    assert not config.channels_last and config.compile_vae and config.inductor_tuning
    assert config.cudnn_benchmark and not config.triton_unet
    forced_cpu = OptimizationConfig.for_device("cpu", enabled=True, cudnn_benchmark=True)
    assert not forced_cpu.cudnn_benchmark  # no cuDNN there
    assert not OptimizationConfig.for_device("cpu", **settings.engine_optimizations()).enabled
    forced = Settings(optimize="on").engine_optimizations()
    assert OptimizationConfig.for_device("cpu", **forced).enabled
    assert not OptimizationConfig.for_device(
        "cuda", **Settings(optimize="off").engine_optimizations()
    ).enabled
    assert resolve_dtype("auto", "cuda", optimized=True) == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cpu", optimized=True) == torch.float32


def test_pad_rows_repeats_the_last_row():
    x = torch.arange(6.0).reshape(3, 2)
    padded = _pad_rows(x, 5)
    assert padded.shape == (5, 2)
    assert torch.equal(padded[3], x[2]) and torch.equal(padded[4], x[2])
    assert _pad_rows(x, 3) is x


# --- the engine ----------------------------------------------------------------------------------


def test_disabled_path_is_the_stock_one(tiny_model_dir, stock):
    engine = Engine({MODEL: tiny_model_dir}, optimizations=OptimizationConfig())
    batch = [request(samples=2), request(seed=7, guidance_scale=1.0)]
    assert max_diff(engine.generate(batch), stock.generate(batch)) == 0
    runner = runner_for(engine.load(MODEL))
    assert runner.stats.eager_calls == 2 and runner.stats.compiled_calls == 0
    assert engine.latent_dtype == torch.float32


def test_optimized_modules_match_stock(tiny_model_dir, stock):
    engine = Engine({MODEL: tiny_model_dir}, optimizations=cpu_config())
    pipe = engine.load(MODEL)
    processors = {type(p) for p in pipe.unet.attn_processors.values()}
    assert processors == {FusedAttnProcessor2_0}
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    batch = [
        request(samples=2, negative_prompt="blurry"),
        request(prompt="a lighthouse", seed=3, guidance_scale=1.0),
        request(prompt="cubist portrait", seed=4, guidance_scale=12.0, clip_skip=2),
    ]
    assert max_diff(engine.generate(batch), stock.generate(batch)) <= 1


def test_a_pinned_attention_kernel_runs_and_cudnn_falls_back_in_order(tiny_model_dir, stock):
    from torch.nn.attention import SDPBackend

    assert sdpa_backends("sdpa") is None
    assert sdpa_backends("flash") == [SDPBackend.FLASH_ATTENTION]
    assert sdpa_backends("cudnn")[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    engine = Engine({MODEL: tiny_model_dir}, optimizations=cpu_config(attention="math"))
    batch = [request(seed=7)]
    assert max_diff(engine.generate(batch), stock.generate(batch)) <= 1


def test_compiled_unet_matches_stock_with_bounded_compiles(tiny_model_dir, stock):
    """Batches of any size reuse the compiled UNet (padded to buckets); a latent size past
    `max_compiled_sizes` runs eager instead of compiling again."""
    config = cpu_config(compile=True, max_compiled_sizes=1, batch_buckets=(2, 4, 8))
    engine = Engine({MODEL: tiny_model_dir}, optimizations=config)
    runner = runner_for(engine.load(MODEL))
    compiled_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in (
        [request()],
        [request(seed=s) for s in range(3)],  # 6 rows: padded to 8
        [request(seed=9, guidance_scale=1.0)],  # 1 row: padded to 2
        [request(seed=s, samples=2) for s in range(3)],  # 12 rows: chunks of 8 and 4
    ):
        assert max_diff(engine.generate(batch), stock.generate(batch)) <= 1
    new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_frames
    assert runner.stats.compile_error is None
    assert runner.stats.compiled_calls == 10 and runner.stats.eager_calls == 0
    assert new_graphs <= len(config.batch_buckets)  # one per bucket at worst; 1 when dynamic
    assert runner.stats.compiled_sizes == [(8, 8)]

    other_size = [request(width=128, height=64)]
    assert max_diff(engine.generate(other_size), stock.generate(other_size)) <= 1
    assert runner.stats.eager_calls == 2
    assert runner.stats.compiled_sizes == [(8, 8)]


def test_inductor_tuning_applies_while_the_unet_compiles_only(tiny_model_dir):
    import torch._inductor.config as inductor

    seen = []

    def recording_backend(graph, example_inputs):
        seen.append((inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning))
        return graph.forward

    before = (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning)
    config = cpu_config(compile=True, compile_backend=recording_backend, inductor_tuning=True)
    engine = Engine({MODEL: tiny_model_dir}, optimizations=config)
    engine.generate([request(num_inference_steps=1)])
    assert seen and all(flags == (True, True) for flags in seen)
    assert (inductor.conv_1x1_as_mm, inductor.coordinate_descent_tuning) == before


@pytest.mark.skipif(not triton_runs_on("cpu"), reason="needs TRITON_INTERPRET=1 (tests/conftest)")
def test_triton_kernels_in_the_engine_match_stock(tiny_model_dir, stock):
    engine = Engine({MODEL: tiny_model_dir}, optimizations=cpu_config(triton_kernels=True))
    pipe = engine.load(MODEL)
    assert isinstance(pipe.unet.down_blocks[0].resnets[0].norm1, GroupNormSiLU)
    assert isinstance(pipe.vae.decoder.conv_norm_out, GroupNormSiLU)
    batch = [request(num_inference_steps=1)]
    assert max_diff(engine.generate(batch), stock.generate(batch)) <= 1
    # The UNet's norms left to Inductor; the VAE decoder keeps the op.
    config = cpu_config(triton_kernels=True, triton_unet=False)
    pipe = Engine({MODEL: tiny_model_dir}, optimizations=config).load(MODEL)
    assert isinstance(pipe.unet.down_blocks[0].resnets[0].norm1, torch.nn.GroupNorm)
    assert not any(isinstance(m, GroupNormSiLU) for m in pipe.unet.modules())
    assert isinstance(pipe.vae.decoder.conv_norm_out, GroupNormSiLU)


def test_loaded_adapters_switch_to_the_eager_unfused_unet(tiny_model_dir, stock):
    """A captured graph or a fused QKV weight would ignore a LoRA: the runner steps aside."""
    engine = Engine({MODEL: tiny_model_dir}, optimizations=cpu_config(compile=True))
    pipe = engine.load(MODEL)
    engine.generate([request()])
    runner = runner_for(pipe)
    assert runner.stats.compiled_calls == 2
    pipe.unet._hf_peft_config_loaded = True  # what diffusers sets once a LoRA is loaded
    try:
        batch = [request(seed=5)]
        assert max_diff(engine.generate(batch), stock.generate(batch)) <= 1
        assert runner.stats.eager_calls == 2 and runner.stats.compiled_calls == 2
        processors = {type(p) for p in pipe.unet.attn_processors.values()}
        assert processors == {AttnProcessor2_0}
    finally:
        pipe.unet._hf_peft_config_loaded = False


# --- FP8 linears ------------------------------------------------------------------------------


def test_fp8_linear_scales_per_row_and_restores_exactly():
    torch.manual_seed(0)
    linear = torch.nn.Linear(320, 640)
    x = torch.randn(3, 50, 320)
    x[0, 7] *= 1000  # one token with huge values: per-token scales keep the others precise
    with torch.no_grad():
        reference = linear(x)
        to_float8(linear)
        assert getattr(linear, FP8_ATTRIBUTE)[0].dtype == torch.float8_e4m3fn
        output = linear(x)
        assert output.shape == reference.shape and output.dtype == x.dtype
        # e4m3 keeps 3 mantissa bits: ~2 % rounding per operand, averaged over 320 products.
        errors = (output - reference).norm(dim=-1) / reference.norm(dim=-1)
        assert 1e-3 < float(errors.max()) < 0.06
        restore_linears(linear)
        assert torch.equal(linear(x), reference)
    q, scale = quantize_rows(torch.zeros(2, 16))  # an all-zero row: no division by zero
    assert torch.isfinite(scale).all() and not q.float().any()


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, supported in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d, c=capability: c)
        assert fp8_runs_on("cuda") is supported
        config = OptimizationConfig.for_device("cuda", fp8_linears=True)
        assert config.fp8_linears is supported
    assert not OptimizationConfig.for_device("cuda").fp8_linears  # opt-in
    settings = Settings(fp8_linears=True)
    assert OptimizationConfig.for_device("cuda", **settings.engine_optimizations()).fp8_linears


def test_fp8_linears_in_the_engine(tiny_model_dir):
    """The linears the transformer blocks call go through FP8 (the fused projections, not the
    unused separate ones), except the sensitive ones (fp8.convert_linears); compiled or not,
    the latents stay finite and near fp32's."""
    reference = _latents(Engine({MODEL: tiny_model_dir}, optimizations=cpu_config()), request())
    for compile_ in (False, True):
        engine = Engine(
            {MODEL: tiny_model_dir}, optimizations=cpu_config(fp8_linears=True, compile=compile_)
        )
        unet = engine.load(MODEL).unet
        converted = [name for name, m in unet.named_modules() if hasattr(m, FP8_ATTRIBUTE)]
        for suffix in ("attn1.to_qkv", "attn1.to_out.0", "attn2.to_q", "ff.net.0.proj"):
            assert any(name.endswith(suffix) for name in converted), suffix
        unused = ("attn1.to_q", "attn1.to_k", "attn1.to_v")  # fused into to_qkv
        sensitive = ("proj_in", "proj_out", "attn2.to_kv", "attn2.to_out.0")  # kept bf16
        assert not any(name.endswith(unused + sensitive) for name in converted)
        assert not any("time_emb" in name for name in converted)
        latents = _latents(engine, request())
        assert torch.isfinite(latents).all()
        # The tiny random model is the worst case (the full-size one is measured on a GPU).
        error = float((latents - reference).norm() / reference.norm())
        assert 1e-3 < error < 0.3, error
    assert runner_for(engine.load(MODEL)).stats.compile_error is None


def test_a_real_lora_runs_on_the_original_linears_not_fp8(tiny_model_dir, tmp_path):
    """peft wraps the converted linears; the runner then restores their plain forward, so the
    LoRA image equals stock's with the same LoRA."""
    lora = build_tiny_lora(tiny_model_dir, tmp_path / "style.safetensors", seed=3)
    models, loras = {MODEL: tiny_model_dir}, {"style": lora}
    engine = Engine(models, loras=loras, optimizations=cpu_config(fp8_linears=True))
    stock_with_lora = Engine(models, loras=loras)
    pipe = engine.load(MODEL)
    assert any(hasattr(m, FP8_ATTRIBUTE) for m in pipe.unet.modules())
    batch = [request(seed=5, loras=(("style", 1.0),))]
    assert max_diff(engine.generate(batch), stock_with_lora.generate(batch)) <= 1
    assert not any(hasattr(m, FP8_ATTRIBUTE) for m in pipe.unet.modules())


# --- SD2's fp16 attention overflow ----------------------------------------------------------------


def _latents(engine: Engine, params: GenerationParams) -> torch.Tensor:
    pipe = engine.load(MODEL)
    with torch.inference_mode():
        states = engine.start_requests(pipe, [params])
        while not all(state.done for state in states):
            engine.denoise_step(pipe, [state for state in states if not state.done])
    return states[0].latents


def _inflate_attention_logits(engine: Engine, factor: float = 1000.0) -> None:
    """Scale Q and K so attention logits pass fp16's 65504, as SD2's do at 768 in places."""
    with torch.no_grad():
        for module in engine.load(MODEL).unet.modules():
            if isinstance(module, Attention):
                module.to_q.weight.mul_(factor)
                module.to_k.weight.mul_(factor)


@pytest.mark.filterwarnings("ignore")
def test_attention_overflow_gives_no_nan_on_the_optimized_path(tiny_model_dir):
    params = request(num_inference_steps=2)
    # The failure the optimized path must avoid: fp16 explicit softmax(QKᵀ) without upcast.
    naive = Engine({MODEL: tiny_model_dir}, dtype=torch.float16)
    set_attention(naive.load(MODEL).unet, "classic", None)
    assert {type(p) for p in naive.load(MODEL).unet.attn_processors.values()} == {AttnProcessor}
    _inflate_attention_logits(naive)
    assert not torch.isfinite(_latents(naive, params)).all()

    for dtype, attention in (
        (torch.bfloat16, "sdpa"),  # the optimized default: bf16 has fp32's range
        (torch.float16, "sdpa"),  # fused SDPA kernels accumulate in fp32
        (torch.float16, "classic"),  # explicit attention, upcast to fp32 in fp16
    ):
        engine = Engine(
            {MODEL: tiny_model_dir}, dtype=dtype, optimizations=cpu_config(attention=attention)
        )
        _inflate_attention_logits(engine)
        latents = _latents(engine, params)
        assert latents.dtype == torch.float32
        assert torch.isfinite(latents).all(), (dtype, attention)
        image = engine.generate([params])[0].images[0]
        assert image.std() > 1  # not a flat (black) image


# --- CUDA graph capture, with torch.cuda's calls stood in for (this machine has no GPU) --------


class _CaptureRecorder:
    """Stands in for the torch.cuda calls a capture makes, and records the capture's mode."""

    def __init__(self, fail: bool = False) -> None:
        self.modes: list[str] = []
        self.fail = fail

    def install(self, monkeypatch) -> None:
        class Stream:
            def wait_stream(self, other) -> None:
                pass

        recorder = self

        class Graph:
            def replay(self) -> None:
                pass

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            recorder.modes.append(capture_error_mode)
            if recorder.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            yield

        for name, value in {
            "Stream": Stream,
            "current_stream": Stream,
            "stream": lambda s: contextlib.nullcontext(),
            "graph_pool_handle": object,
            "CUDAGraph": Graph,
            "graph": graph,
            "synchronize": lambda: None,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)


def graph_runner() -> PipelineRunner:
    config = OptimizationConfig(enabled=True, compile=False, cuda_graphs=True, batch_buckets=(2, 4))
    return PipelineRunner(pipe=None, config=config, device=torch.device("cpu"))


def unet_inputs(rows: int = 1) -> tuple:
    return torch.randn(rows, 4, 8, 8), torch.tensor([500.0] * rows), torch.randn(rows, 77, 32)


def test_a_lazy_capture_ignores_other_threads_cuda_work(monkeypatch):
    """A size first seen while serving is captured on the step thread while another thread may
    be loading a model: only the capturing thread's own unsafe calls may fail the capture."""
    recorder = _CaptureRecorder()
    recorder.install(monkeypatch)
    runner = graph_runner()
    calls = []

    def forward(sample, timestep, encoder_hidden_states):
        calls.append(sample.shape[0])
        return sample * 2

    graphed = runner._graph_for(2, unet_inputs(2), forward)
    assert graphed is not None and runner.stats.graph_error is None
    assert recorder.modes == ["thread_local", "thread_local"]  # both buckets, largest first
    assert calls == [4, 4, 4, 2, 2, 2]  # two warm-up runs outside each capture, one inside
    # the captured call reads the graph's own static inputs, which a replay refills
    assert torch.equal(graphed.output, graphed.inputs[0] * 2)
    assert graphed.inputs[0].shape == (2, 4, 8, 8)


def test_a_failed_capture_turns_graphs_off_and_runs_eager(monkeypatch):
    _CaptureRecorder(fail=True).install(monkeypatch)
    runner = graph_runner()
    assert runner._graph_for(2, unet_inputs(2), lambda s, t, e: s) is None
    assert "not permitted when stream is capturing" in runner.stats.graph_error
    assert runner._graphs == {}
