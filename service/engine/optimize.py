"""The optimized SD2 path: what is changed on a loaded pipeline, and how the engine calls it.

`apply_optimizations(pipe, config, device)` changes a loaded `StableDiffusionPipeline` in place
(attention processors, fused QKV, channels_last, fused GroupNorm+SiLU Triton kernels, FP8
transformer linears when asked for) and
attaches a `PipelineRunner`, through which `Engine.denoise_step` calls the UNet and
`Engine.decode` the VAE. The runner adds what needs state across calls: torch.compile and CUDA
graphs. With `OptimizationConfig(enabled=False)` (the default, and on CPU) the runner is a plain
call: the stock components, in the engine's dtype.

Shape policy (bounded recompiles and graph captures):
- The UNet is compiled once per latent size with its batch dimension marked dynamic, so any
  batch size reuses the same compiled code. Only the first `max_compiled_sizes` latent sizes
  seen are compiled (warm-up compiles the model's default size first); others run eager.
- CUDA graphs need fixed shapes: UNet rows (2 per image with guidance) are padded up to the next
  of `batch_buckets` and one graph is captured per (bucket, latent size), all buckets of a size
  at its first use, largest first into one shared memory pool. Rows beyond the largest bucket
  run in chunks of that bucket.
- Loaded LoRA adapters (peft) switch the runner to the eager UNet with unfused projections and
  bf16 linears: a captured graph, a fused QKV weight or an FP8 copy of a weight would silently
  ignore an adapter change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from service.engine.fp8 import convert_linears, fp8_runs_on, restore_linears
from service.engine.kernels import group_norm_silu, group_norm_silu_triton, triton_runs_on

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "flash", "efficient", "cudnn", "math", "classic")
"""`sdpa`: torch picks the SDPA kernel; `flash`/`efficient`/`math` pin one; `cudnn`: cuDNN's
kernel first, flash then memory-efficient for a shape it does not take; `classic`: diffusers'
explicit softmax(QKᵀ)V (a baseline, upcast to fp32 in fp16)."""

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
# Inductor settings the diffusers/PyTorch write-ups on fast SD inference compile with: 1x1
# convolutions as matmuls, and coordinate-descent tuning of the generated kernels' block sizes
# (a longer compile); plus freezing, which folds the (inference-only) weights into the graph as
# constants so their layouts are converted once. Applied only while the UNet compiles, never
# process-wide.
INDUCTOR_TUNING = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
    "freezing": True,
}
RUNNER_ATTRIBUTE = "_sdserve_runner"


@dataclass(frozen=True)
class OptimizationConfig:
    """Switches of the optimized path; each one's gain is measured by benchmarks/sd2_bench.py.

    `enabled=False` ignores every other field. `for_device` gives the defaults that help on a
    device (all on for CUDA, all off for CPU); `resolved` drops what cannot run there.
    """

    enabled: bool = False
    attention: str = "sdpa"
    fuse_qkv: bool = True  # one QKV (self-attn) / KV (cross-attn) GEMM instead of three / two
    channels_last: bool = True  # NHWC convolutions: cuDNN's fast layout on tensor cores
    cudnn_benchmark: bool = False  # cuDNN times its algorithms per conv shape (process-wide)
    triton_kernels: bool = True  # GroupNorm+SiLU (+ time-embedding add) as one Triton op
    triton_unet: bool = True  # the op in the UNet too; off: Inductor fuses the UNet's norms
    fp8_linears: bool = False  # transformer linears in e4m3 (fp8.py); Ada/Hopper, unmeasured
    compile: bool = True  # torch.compile (Inductor) the UNet
    compile_mode: str = "default"
    inductor_tuning: bool = False  # INDUCTOR_TUNING while the UNet compiles
    compile_backend: str = "inductor"  # tests use "eager" (dynamo only, no codegen)
    compile_vae: bool = False  # the VAE decoder too (per decode shape; ~2.6 % of the FLOPs)
    compile_cache_dir: str | None = None  # persistent Inductor + Triton cache: fast warm starts
    max_compiled_sizes: int = 2
    cuda_graphs: bool = True
    batch_buckets: tuple[int, ...] = (2, 4, 8, 16, 32)  # UNet rows: 2 per guided image
    fp32_latents: bool = True  # noise, scheduler and guidance in fp32; only the nets in bf16
    linear_steps: bool = True  # scheduler steps on a CPU twin, no host waits (linear_steps.py)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention: unknown choice {self.attention!r}; allowed: "
                f"{', '.join(ATTENTION_CHOICES)}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode: unknown mode {self.compile_mode!r}; allowed: "
                f"{', '.join(COMPILE_MODES)}"
            )
        buckets = tuple(sorted(set(self.batch_buckets)))
        if not buckets or buckets[0] < 2:
            raise ValueError(
                "batch_buckets: at least one bucket, each of at least 2 rows (a batch "
                "dimension of 1 would be specialised by torch.compile)"
            )
        object.__setattr__(self, "batch_buckets", buckets)
        if self.max_compiled_sizes < 0:
            raise ValueError(f"max_compiled_sizes: must be >= 0, got {self.max_compiled_sizes}")

    @classmethod
    def for_device(cls, device: str | torch.device, **overrides: Any) -> OptimizationConfig:
        """The defaults that help on `device`: the whole optimized path on CUDA, none on CPU.

        On CPU bf16 matmuls and compile time cost more than they save for the small models run
        there, and CUDA graphs and the Triton kernels do not exist.
        """
        enabled = torch.device(device).type == "cuda"
        return cls(**{"enabled": enabled, **overrides}).resolved(device)

    def resolved(self, device: str | torch.device) -> OptimizationConfig:
        """This config with what cannot run on `device` switched off."""
        device = torch.device(device)
        if not self.enabled:
            return replace(self, cuda_graphs=False, compile=False, triton_kernels=False)
        changes: dict[str, Any] = {}
        if device.type != "cuda":
            changes["cuda_graphs"] = False
            changes["cudnn_benchmark"] = False
        if self.triton_kernels and not triton_runs_on(device):
            changes["triton_kernels"] = False
        if self.fp8_linears and not fp8_runs_on(device):
            changes["fp8_linears"] = False
        if self.compile and self.compile_mode in ("max-autotune", "reduce-overhead"):
            changes["cuda_graphs"] = False  # these modes capture Inductor's own CUDA graphs
        return replace(self, **changes) if changes else self

    def latent_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of latents, noise and scheduler arithmetic for a model in `model_dtype`."""
        return torch.float32 if self.enabled and self.fp32_latents else model_dtype

    def summary(self) -> dict[str, Any]:
        """Plain-data view, for logs and benchmark results."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class RunnerStats:
    """What the runner did: which path each UNet call took, and what it cost to prepare."""

    eager_calls: int = 0
    compiled_calls: int = 0
    graph_replays: int = 0
    graph_captures: int = 0
    compiled_sizes: list[tuple[int, int]] = field(default_factory=list)  # compiled/graphed
    capture_seconds: float = 0.0
    compile_error: str | None = None
    graph_error: str | None = None


def apply_optimizations(
    pipe: Any, config: OptimizationConfig, device: str | torch.device
) -> PipelineRunner:
    """Change a loaded pipeline in place for `config` and attach the runner that calls it.

    Safe on any pipeline: with `config.enabled` False nothing is changed but the (plain) runner.
    """
    config = config.resolved(device)
    if config.enabled:
        if config.compile_cache_dir:
            use_compile_cache(config.compile_cache_dir)
        set_attention(pipe.unet, config.attention, pipe.unet.dtype)
        set_attention(pipe.vae, "classic" if config.attention == "classic" else "sdpa", None)
        if config.fuse_qkv and config.attention != "classic":
            pipe.unet.fuse_qkv_projections()
        if config.cudnn_benchmark:
            # Process-wide: the first call at each new conv shape is timed, later ones take
            # the fastest algorithm (graph capture's warm-up runs absorb it at fixed shapes).
            torch.backends.cudnn.benchmark = True
        if config.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if config.triton_kernels:
            if config.triton_unet:
                fuse_group_norm_silu(pipe.unet, group_norm_silu_triton)
            fuse_group_norm_silu(pipe.vae.decoder, group_norm_silu_triton)
        if config.fp8_linears:  # after fuse_qkv: the fused projections are the ones called
            convert_linears(pipe.unet)
        if config.compile and config.compile_vae:
            pipe.vae.decoder.compile(
                backend=config.compile_backend, mode=_inductor_mode(config.compile_mode)
            )
    runner = PipelineRunner(pipe, config, torch.device(device))
    setattr(pipe, RUNNER_ATTRIBUTE, runner)
    return runner


def _inductor_mode(mode: str) -> str | None:
    return None if mode == "default" else mode


def runner_for(pipe: Any) -> PipelineRunner:
    """The runner `apply_optimizations` attached to `pipe`, or a plain one (stock calls)."""
    runner = getattr(pipe, RUNNER_ATTRIBUTE, None)
    if runner is None:
        runner = PipelineRunner(pipe, OptimizationConfig(), pipe.unet.device)
        setattr(pipe, RUNNER_ATTRIBUTE, runner)
    return runner


def use_compile_cache(directory: str | os.PathLike) -> None:
    """Point Inductor's and Triton's on-disk caches at `directory` (kept across restarts)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    # Written, not read: Inductor and Triton read these at compile time.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")


def set_attention(model: nn.Module, attention: str, dtype: torch.dtype | None) -> None:
    """Give every attention layer of `model` the SDPA processor, or diffusers' classic one.

    With `classic` in fp16, scores and softmax are upcast to fp32: SD2's attention logits at
    768 overflow fp16 (black or NaN images). SDPA's fused kernels accumulate in fp32 anyway.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor() if attention == "classic" else AttnProcessor2_0()
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
            if attention == "classic" and dtype == torch.float16:
                module.upcast_attention = True
                module.upcast_softmax = True


def sdpa_backends(attention: str) -> list | None:
    """The SDPA kernels an `attention` choice allows, in priority order; None to let torch
    choose."""
    from torch.nn.attention import SDPBackend

    allowed = {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        # cuDNN's kernel where it takes the shape (its limits vary with the cuDNN version)
        "cudnn": [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
        ],
        "math": [SDPBackend.MATH],
    }
    return allowed.get(attention)


class GroupNormSiLU(nn.Module):
    """A GroupNorm whose output goes straight into SiLU, as one op (the module's own weights)."""

    def __init__(self, norm: nn.GroupNorm, kernel: Callable) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.kernel = kernel

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias, self.num_groups, self.eps, add)


def fuse_group_norm_silu(model: nn.Module, kernel: Callable = group_norm_silu) -> int:
    """Route GroupNorm→SiLU pairs of `model` through `kernel`; returns how many were fused.

    ResNet blocks get a forward that calls the fused op for both norms (the second with the
    time embedding added inside it); the final `conv_norm_out` + `conv_act` pair becomes one
    module. Blocks of any other shape (scale-shift norms, up/down-sampling resnets) are left.
    """
    from diffusers.models.resnet import ResnetBlock2D

    fused = 0
    for module in model.modules():
        if isinstance(module, ResnetBlock2D) and _fusable_resnet(module):
            module.norm1 = GroupNormSiLU(module.norm1, kernel)
            module.norm2 = GroupNormSiLU(module.norm2, kernel)
            module.forward = types.MethodType(_fused_resnet_forward, module)
            fused += 2
    norm, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU):
        model.conv_norm_out = GroupNormSiLU(norm, kernel)
        model.conv_act = nn.Identity()
        fused += 1
    return fused


def _fusable_resnet(block: nn.Module) -> bool:
    return (
        isinstance(block.norm1, nn.GroupNorm)
        and isinstance(block.norm2, nn.GroupNorm)
        and isinstance(block.nonlinearity, nn.SiLU)
        # "default", or no time embedding at all (the VAE's "group" blocks behave the same)
        and (block.time_embedding_norm == "default" or block.time_emb_proj is None)
        and block.time_embedding_norm != "scale_shift"
        and block.upsample is None
        and block.downsample is None
    )


def _fused_resnet_forward(
    self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs
) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward (default time-embedding norm, no resampling), with
    norm→SiLU fused and the time embedding added inside the second norm."""
    hidden_states = self.norm1(input_tensor)
    hidden_states = self.conv1(hidden_states)
    add = None
    if self.time_emb_proj is not None and temb is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        add = self.time_emb_proj(temb)
    hidden_states = self.norm2(hidden_states, add)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def unfuse_group_norm_silu(model: nn.Module) -> None:
    """Undo `fuse_group_norm_silu` (used to compare against the stock modules)."""
    from diffusers.models.resnet import ResnetBlock2D

    for module in model.modules():
        if isinstance(module, ResnetBlock2D) and isinstance(module.norm1, GroupNormSiLU):
            module.norm1 = _plain_norm(module.norm1)
            module.norm2 = _plain_norm(module.norm2)
            del module.forward
    if isinstance(getattr(model, "conv_norm_out", None), GroupNormSiLU):
        model.conv_norm_out = _plain_norm(model.conv_norm_out)
        model.conv_act = nn.SiLU()


def _plain_norm(fused: GroupNormSiLU) -> nn.GroupNorm:
    norm = nn.GroupNorm(fused.num_groups, fused.weight.shape[0], fused.eps)
    norm.weight, norm.bias = fused.weight, fused.bias
    return norm


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class _CapturedUNet:
    """One CUDA graph of a UNet forward at a fixed (rows, latent size), with static buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output

    def __call__(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        rows = sample.shape[0]
        values = (sample, timestep, encoder_hidden_states)
        for static, value in zip(self.inputs, values, strict=True):
            static[:rows].copy_(value)
        self.graph.replay()
        return self.output[:rows].clone()


class PipelineRunner:
    """Calls one pipeline's UNet and VAE decoder, the optimized way when its config says so."""

    def __init__(self, pipe: Any, config: OptimizationConfig, device: torch.device) -> None:
        self.pipe = pipe
        self.config = config
        self.device = device
        self.stats = RunnerStats()
        self._compiled: Callable | None = None
        self._graphs: dict[tuple, _CapturedUNet] = {}
        self._graph_pool = None
        self._unfused_for_adapters = False

    # --- the two calls the engine makes -------------------------------------------------------

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        hooks: Sequence[contextlib.AbstractContextManager] = (),
    ) -> torch.Tensor:
        """Noise prediction for `sample` (rows, 4, h, w), returned in `sample`'s dtype. With
        `hooks` (context managers that add module hooks: token merging, SAG's attention
        capture) the eager UNet runs inside them: compiled or graphed calls skip Python hooks."""
        unet = self.pipe.unet
        out_dtype = sample.dtype
        sample = sample.to(unet.dtype)
        timestep = timestep.to(self.device)
        encoder_hidden_states = encoder_hidden_states.to(unet.dtype)
        if hooks:
            self.stats.eager_calls += 1
            with contextlib.ExitStack() as stack:
                for hook in hooks:
                    stack.enter_context(hook)
                return self._eager(sample, timestep, encoder_hidden_states).to(out_dtype)
        if not self.config.enabled or self._adapters_loaded():
            self.stats.eager_calls += 1
            return self._eager(sample, timestep, encoder_hidden_states).to(out_dtype)
        largest = self.config.batch_buckets[-1]
        if sample.shape[0] > largest:
            chunks = [
                self._optimized(*parts)
                for parts in zip(
                    sample.split(largest),
                    timestep.split(largest),
                    encoder_hidden_states.split(largest),
                    strict=True,
                )
            ]
            return torch.cat(chunks).to(out_dtype)
        return self._optimized(sample, timestep, encoder_hidden_states).to(out_dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of `latents` (not yet divided by the scaling factor) to [-1, 1] pixels."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        if self.config.enabled and self.config.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        return vae.decode(latents, return_dict=False)[0]

    # --- paths --------------------------------------------------------------------------------

    def _eager(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        with self._attention_context():
            return self.pipe.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
            )[0]

    def _optimized(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        """Rows padded up to a bucket (repeating the last row), then a graph replay or a call of
        the compiled UNet. A latent size past the first `max_compiled_sizes` runs eager,
        unpadded: neither compiled nor captured, so sizes cannot grow memory or compile time."""
        inputs = (sample, timestep, encoder_hidden_states)
        if not self._admit(tuple(sample.shape[-2:])):
            self.stats.eager_calls += 1
            return self._eager(*inputs)
        rows = sample.shape[0]
        bucket = next(b for b in self.config.batch_buckets if b >= rows)
        if self.config.cuda_graphs and self.stats.graph_error is None:
            graph = self._graph_for(bucket, inputs, self._forward())
            if graph is not None:
                self.stats.graph_replays += 1
                return graph(*inputs)
        forward = self._forward()
        if forward == self._eager:
            self.stats.eager_calls += 1
            return forward(*inputs)
        self.stats.compiled_calls += 1
        return forward(*(_pad_rows(t, bucket) for t in inputs))[:rows]

    def _admit(self, size: tuple[int, int]) -> bool:
        """Whether this latent size is (or may now become) one of the optimized sizes."""
        if size in self.stats.compiled_sizes:
            return True
        if len(self.stats.compiled_sizes) >= self.config.max_compiled_sizes:
            return False
        self.stats.compiled_sizes.append(size)
        return True

    def _forward(self) -> Callable:
        """The compiled UNet, or the eager one when compile is off or has failed."""
        if not self.config.compile or self.stats.compile_error is not None:
            return self._eager
        if self._compiled is None:
            # Enough cache entries for one compile per (bucket, size), should the batch
            # dimension not stay dynamic; the padding keeps it at that bound. The entries live
            # on the shared code of `_eager_for_compile`, so every runner (another model, a
            # reloaded one) adds its own share rather than hitting the limit and silently
            # running eager.
            config = torch._dynamo.config
            needed = len(self.config.batch_buckets) * self.config.max_compiled_sizes + 2
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, getattr(config, name) + needed)
            self._compiled = torch.compile(
                self._eager_for_compile,
                backend=self.config.compile_backend,
                mode=_inductor_mode(self.config.compile_mode),
                dynamic=False,
            )
        return self._compiled_call

    def _eager_for_compile(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        return self.pipe.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]

    def _compiled_call(self, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        for tensor in (sample, timestep, encoder_hidden_states):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            with self._attention_context(), self._inductor_settings():
                return self._compiled(sample, timestep, encoder_hidden_states)
        except Exception as exc:  # a compiler failure must not take the replica down
            log.exception("torch.compile of the UNet failed; running it eager from now on")
            self.stats.compile_error = f"{type(exc).__name__}: {exc}"[:500]
            return self._eager(sample, timestep, encoder_hidden_states)

    def _graph_for(self, bucket: int, inputs: tuple, forward: Callable) -> _CapturedUNet | None:
        sample, _, encoder_hidden_states = inputs
        size_key = (*sample.shape[1:], *encoder_hidden_states.shape[1:], sample.dtype)
        if (bucket, *size_key) not in self._graphs:
            # First use of this latent size: capture every bucket, largest first, so the shared
            # pool is sized once by the largest graph.
            for b in reversed(self.config.batch_buckets):
                if (b, *size_key) in self._graphs:
                    continue
                try:
                    self._graphs[(b, *size_key)] = self._capture(b, *inputs, forward)
                except Exception as exc:
                    log.exception("CUDA graph capture failed; running without graphs from now on")
                    self.stats.graph_error = f"{type(exc).__name__}: {exc}"[:500]
                    self._graphs.clear()
                    return None
        return self._graphs[(bucket, *size_key)]

    def _capture(self, rows, sample, timestep, encoder_hidden_states, forward) -> _CapturedUNet:
        started = time.perf_counter()
        inputs = tuple(
            torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
            for t in (sample, timestep, encoder_hidden_states)
        )
        inputs[1].fill_(float(timestep.reshape(-1)[0]))  # a real timestep for the warm-up runs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile / autotune / cuDNN plan selection outside the capture
                forward(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        if self.stats.compile_error is not None:
            forward = self._eager  # the compiler failed during the warm-up runs
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # A size first seen in serving is captured on the step thread while another thread may
        # load a model (cudaMalloc, copies on its own stream): "global" mode would fail this
        # capture for that, and a failed capture turns graphs off for the model for good.
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            output = forward(*inputs)
        torch.cuda.synchronize()
        self.stats.graph_captures += 1
        self.stats.capture_seconds += time.perf_counter() - started
        return _CapturedUNet(graph, inputs, output)

    # --- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _attention_context(self) -> Iterator[None]:
        backends = sdpa_backends(self.config.attention) if self.config.enabled else None
        if backends is None:
            yield
            return
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backends, set_priority=True):
            yield

    def _inductor_settings(self) -> contextlib.AbstractContextManager:
        if not self.config.inductor_tuning:
            return contextlib.nullcontext()
        import torch._inductor.config

        return torch._inductor.config.patch(INDUCTOR_TUNING)

    def _adapters_loaded(self) -> bool:
        """peft adapters on the UNet: graphs, fused projections and FP8 weights would ignore
        them."""
        if not getattr(self.pipe.unet, "_hf_peft_config_loaded", False):
            return False
        if not self._unfused_for_adapters:
            if getattr(self.pipe.unet, "original_attn_processors", None) is not None:
                self.pipe.unet.unfuse_qkv_projections()
            restore_linears(self.pipe.unet)
            self._graphs.clear()
            self._unfused_for_adapters = True
        return True

    def reset(self) -> None:
        """Drop captured graphs (e.g. after weights were changed in place)."""
        self._graphs.clear()
        self._graph_pool = None
