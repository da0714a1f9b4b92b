"""Before a run: does it fit, and how long will it take? Memory and time of a search from the model's config alone.

The model is built on the ``meta`` device (shapes, no weights), so planning a 70B search costs what planning a 135M
one does. Per actor (one replica of the model):

- **weights**: every parameter once (tied embeddings once), in ``model.dtype``;
- **activations** of one scoring forward (no gradients, one layer alive at a time): the residual stream and the
  attention and MLP intermediates of the rows scored together — B rows on the gathered path (one mask per forward,
  plus the gathered copy of at most one layer's weights), K·B rows on the batched path (``engine.scoring``) — and,
  with eager attention only, the attention scores ``rows × heads × T²`` (fused kernels keep just the causal mask);
- **KV**: one layer's keys and values for those rows (scoring runs without a cache, so this is all there is);
- **teacher**: the ``kl`` objective keeps the dense model's ``[B·(T−1), V]`` float32 log-probabilities of the step's
  batch;
- **logits**: the float32 logits of a bounded number of positions (:data:`probprune.losses.LOGIT_ELEMENTS`) and the
  softmax temporaries;
- **evaluation**: held-out perplexity at the longest ``eval.seq_lens`` window, whose logits ``[batch, T, V]`` exist
  in full, while the compacted model exists next to the dense one (on a CPU, plus the heap fragmentation its
  layers of different widths leave: :func:`memory_terms`);
- **runtime**: what the process holds besides the model (libraries, CUDA context, the run's tokens): on CPU the
  resident size of this process when the plan is made, after loading the run's data and one tiny forward (which
  loads the kernel libraries); on a GPU a fixed :data:`CUDA_CONTEXT_BYTES`.

- **reconstruction** (with ``reconstruct.enabled``): one sublayer's least-squares products on the device (``ZᵀZ`` and
  ``ZᵀY`` in float32 for the widest output projection, ``down_proj`` with every channel kept: a 13B layer's
  13,824² + 13,824 × 5,120 floats, 1.05 GB) and one batch's inputs and targets; on a CPU also their float64 sums
  (twice that) and the calibration blocks' residual stream (``reconstruct.blocks`` × T × H, twice with the ``dense``
  target) that the process running the solve holds.

The peak is the largest of the phases: search, evaluation of the pruned model, reconstruction, and loading (the weights
plus the checkpoint files being read, or plus the process's peak while the data loads, measured on CPU). Time per mask-forward
follows the fitted cost model ``t = c0 + P · tokens / R`` (P: matmul parameters a token passes through under the
mask, lm_head included), with ``c0 = L · a`` (a: per-layer launch/dispatch overhead) and ``R`` measured on the device
by :func:`calibrate` (short forwards of a random stack of the model's own layer shape), plus the loss over
``tokens × V`` float32 logits at the measured loss rate. The gathered path is calibrated as it runs: its fixed cost
per mask and per layer (index building, weight gathers) and its rate on pruned widths, measured on the same stack
(for layers too large to build, the dense constants plus the copy of the kept weights at the measured gather
bandwidth). Without calibration the CPU fit of ``benchmarks/scaling.py`` is used (:data:`CPU_FIT`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .losses import LOGIT_ELEMENTS

GIB = 2**30
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + allocator slack outside torch's allocated bytes
CPU_FIT = {"c0_s": 0.147, "rate_param_tokens_per_s": 76.1e9, "layers": 30, "source": "benchmarks/scaling.py fit"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# calibrate on the model's own layer shape up to this size per layer (5 such layers exist while calibrating):
# on a CPU up to a 7B layer (a few seconds), on a GPU up to a 70B one
CALIBRATION_LAYER_BYTES = {"cpu": 512 * 2**20, "cuda": 2 * 2**30}
CPU_FRAGMENTATION_HIDDENS = 2  # hidden-state tensors per layer left in the CPU heap by a pruned model's evaluation


@dataclass(frozen=True)
class Shape:
    """What the plan needs from a decoder-only model's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int | None
    params: int  # all parameters, tied ones once
    matmul: int  # parameters a token passes through in matmuls: decoder layers + lm_head
    prunable: int  # matmul parameters of the decoder layers (what masks can remove)
    eager_attention: bool = False  # attention scores materialised (eager), else fused kernels (sdpa, flash)

    @property
    def layer_params(self) -> int:
        return self.prunable // max(1, self.layers)


@dataclass(frozen=True)
class Rate:
    """A device's speed for the cost model: per-layer overhead ``a`` (s), matmul rate ``R`` (parameter-tokens/s),
    copy bandwidth (bytes/s), loss rate (float32 logits per second through the log-softmax and the loss)."""

    layer_overhead_s: float
    rate_param_tokens_per_s: float
    copy_bytes_per_s: float
    device: str
    source: str
    loss_logits_per_s: float = math.inf  # float32 logits turned into next-token losses per second
    # the gathered path measured on the model's layer shape (None: the dense constants plus the weight copies)
    gathered_layer_overhead_s: float | None = None
    gathered_mask_overhead_s: float | None = None
    gathered_rate_param_tokens_per_s: float | None = None
    # lm_head + loss per next-token position at the model's vocabulary (None: lm_head at R plus the loss rate)
    head_ce_s_per_token: float | None = None
    head_kl_s_per_token: float | None = None
    teacher_head_s_per_token: float | None = None  # lm_head + log-softmax of the dense teacher


@dataclass
class Plan:
    """Memory (bytes, per actor) and time of one configuration; see the module docstring for each term."""

    model: str
    dtype: str
    device: str
    scoring: str
    objective: str
    replicas: int
    actors_per_device: int
    batch_size: int
    seq_len: int
    num_samples: int
    steps: int
    sparsity: float
    memory: dict[str, int]
    peak_bytes: int
    peak_phase: str
    capacity_bytes: int | None
    capacity_source: str
    fits: bool | None
    max_batch_size: int | None
    seconds_per_mask: float
    seconds_per_step: float
    total_seconds: float
    rate: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # bytes per actor in each phase; the peak is the largest

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_shape(model: torch.nn.Module) -> Shape:
    """The shape of a (meta-device) causal LM: layer count and widths from its config, parameter counts from it."""
    cfg = getattr(model.config, "text_config", model.config)
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    layers, inter, vocab = cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    prunable = layers * (attn + 3 * hidden * inter)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    return Shape(
        layers,
        hidden,
        inter,
        heads,
        kv,
        head_dim,
        vocab,
        getattr(cfg, "max_position_embeddings", None),
        params,
        prunable + vocab * hidden,
        prunable,
        eager,
    )


# ------------------------------------------------------------------------------------------------------- memory
def forward_bytes(shape: Shape, rows: int, seq_len: int, nbytes: int) -> dict[str, int]:
    """Activation and KV bytes of one no-grad forward of ``rows x seq_len`` tokens (one layer alive at a time)."""
    n = rows * seq_len
    q = shape.heads * shape.head_dim
    kv = 2 * n * shape.kv_heads * shape.head_dim * nbytes
    # residual + normed input + attention output + o_proj output, q; gate, up and their product
    acts = n * nbytes * (4 * shape.hidden + q + 3 * shape.intermediate)
    if shape.eager_attention:  # scores and their softmax, [rows, heads, T, T] each
        acts += 2 * rows * shape.heads * seq_len**2 * nbytes
    else:  # fused attention: only the boolean causal mask [rows, 1, T, T]
        acts += rows * seq_len**2
    return {"activations": int(acts), "kv": int(kv)}


def logits_bytes(shape: Shape, positions: int) -> int:
    """Float32 logits of a bounded chunk of positions and the softmax temporaries (three such tensors)."""
    chunk = min(positions, max(1, LOGIT_ELEMENTS // shape.vocab)) * shape.vocab
    return 3 * 4 * chunk


def memory_terms(
    shape: Shape,
    *,
    nbytes: int,
    batch: int,
    seq_len: int,
    num_samples: int,
    scoring: str,
    objective: str,
    sparsity: float,
    eval_len: int,
    eval_batch: int,
    runtime: int,
    checkpoint_bytes: int | None = None,
    max_rows: int | None = None,
    data_peak: int = 0,
    cpu: bool = False,
    reconstruct: tuple[str, int, int] | None = None,
) -> tuple[dict[str, int], dict]:
    """Each memory term of one actor (bytes) and the phase totals ``{"search", "evaluation", "loading"}`` (and
    ``"reconstruction"``).

    ``cpu`` adds the heap fragmentation of evaluating a pruned model on a CPU: its layers have different widths, so
    glibc's heap cannot reuse one layer's freed activations for the next layer's and the process grows by about
    :data:`CPU_FRAGMENTATION_HIDDENS` hidden-state tensors per layer over the forward (measured on SmolLM2-135M at
    4 x 2048 tokens: +550 MiB over the dense model's evaluation; a dense model's equal layers reuse one set).

    ``reconstruct``: ``(target, blocks, blocks per forward)`` when reconstruction is enabled, adding its phase
    (module docstring); None: no reconstruction."""
    weights = shape.params * nbytes
    rows = batch if scoring == "gathered" else max(batch, min(num_samples * batch, max_rows or num_samples * batch))
    fwd = forward_bytes(shape, rows, seq_len, nbytes)
    gathered = shape.layer_params * nbytes if scoring == "gathered" else 0
    teacher = batch * (seq_len - 1) * shape.vocab * 4 if objective == "kl" else 0
    logits = logits_bytes(shape, batch * (seq_len - 1))
    ev = forward_bytes(shape, eval_batch, eval_len, nbytes)
    # the logits [batch, T, V] in the model dtype, then one row in float32 and its log-softmax
    eval_logits = eval_batch * eval_len * shape.vocab * nbytes + 2 * 4 * eval_len * shape.vocab
    pruned = int(weights - sparsity * shape.prunable * nbytes)
    fragmentation = CPU_FRAGMENTATION_HIDDENS * shape.layers * eval_batch * eval_len * shape.hidden * nbytes
    fragmentation = int(fragmentation) if cpu and sparsity > 0 else 0
    terms = {
        "runtime": runtime,
        "weights": weights,
        "activations": fwd["activations"],
        "kv": fwd["kv"],
        "gathered_layer": gathered,
        "teacher": teacher,
        "logits": logits,
        "eval_activations": ev["activations"] + ev["kv"] + eval_logits,
        "eval_pruned_weights": pruned,
        "eval_heap_fragmentation": fragmentation,
        "data_loading_peak": data_peak,
    }
    phases = {
        "search": runtime + weights + fwd["activations"] + fwd["kv"] + gathered + teacher + logits,
        "evaluation": runtime + weights + pruned + terms["eval_activations"] + fragmentation,
        "loading": max(runtime + (checkpoint_bytes or 0), data_peak) + weights,
    }
    if reconstruct is not None:
        target, blocks, per_forward = reconstruct
        k, h, tokens = shape.intermediate, shape.hidden, per_forward * seq_len
        # ZᵀZ, ZᵀY in float32; one batch's projection input (model dtype, then the kept columns in float32) and target
        terms["reconstruct_products"] = (k * k + k * h) * 4 + tokens * (k * (nbytes + 4) + h * 4 * 2)
        terms["reconstruct_host"] = 0
        if cpu:  # float64 sums and the blocks' residual stream(s) live in the process's memory
            streams = 2 if target == "dense" else 1
            terms["reconstruct_host"] = (k * k + k * h) * 8 + streams * blocks * seq_len * h * nbytes
        phases["reconstruction"] = runtime + weights + terms["reconstruct_products"] + terms["reconstruct_host"]
    return terms, phases


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident size (``VmHWM``) to its current size; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _process_peak() -> int:
    return (_status_kib("VmHWM") or 0) * 1024


def runtime_bytes(device: str) -> int:
    """What the process holds before the model: this process's resident size on CPU, a CUDA context on a GPU."""
    if device.startswith("cuda"):
        return CUDA_CONTEXT_BYTES
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def device_capacity(device: str, gpu_memory_gib: float | None = None) -> tuple[int | None, str]:
    """Bytes one device offers and where that number comes from: ``gpu_memory_gib`` when given, else the free
    memory of the CUDA device (``torch.cuda.mem_get_info``, plus what this process reserved), else the CPU's
    available RAM (``MemAvailable``, plus this process's resident memory)."""
    if gpu_memory_gib is not None:
        return int(gpu_memory_gib * GIB), f"given: {gpu_memory_gib:g} GiB"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None, "no CUDA device here"
        dev = torch.device(device if ":" in device else "cuda:0")
        free, total = torch.cuda.mem_get_info(dev)
        mine = torch.cuda.memory_reserved(dev)  # what this process holds already counts as available to it
        return int(free + mine), f"torch.cuda.mem_get_info: {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ":" in ln}
        # the running process's own resident memory is already outside MemAvailable: add it back
        avail = info["MemAvailable"] + runtime_bytes("cpu")
        return avail, f"/proc/meminfo MemAvailable {info['MemAvailable'] / GIB:.1f} GiB + this process"
    except (OSError, KeyError):
        try:
            import psutil

            return int(psutil.virtual_memory().available), "psutil available RAM"
        except ImportError:
            return None, "unknown (no /proc/meminfo, no psutil)"


# --------------------------------------------------------------------------------------------------------- time
@torch.no_grad()
def calibrate(
    device: str = "cpu",
    dtype: str = "float32",
    tokens: int = 1024,
    hidden: int | None = None,
    layers: int = 4,
    repeats: int = 3,
    shape: Shape | None = None,
    channel_block: int = 1,
) -> Rate:
    """Measure the cost model's constants on ``device``, each path the way it runs.

    A random Llama stack — the layer shape of ``shape`` (the model being planned) when one layer of it is at most
    :data:`CALIBRATION_LAYER_BYTES` for the device, else ``hidden`` wide (512 on CPU, 2048 on a GPU) with an MLP of
    3·hidden — is timed:

    - the dense forward (the batched path and the teacher) at one token (per-layer overhead ``a``) and at ``tokens``
      (the matmul rate ``R`` from the time above the overhead);
    - with the model's layer shape, the gathered path itself (``fastpath.gathered_losses``, an exact-50 % mask over
      head groups and ``channel_block`` channel units) on stacks of 1 and ``layers`` layers at two tokens (its fixed
      cost per mask and per layer, the weight gathers included) and at ``tokens`` (its rate on pruned widths, which
      on a CPU is ~25 % below the dense rate);
    - otherwise the gathered path's weight copies (:func:`gather_bandwidth`), added to the dense constants.

    Best of ``repeats`` after a warm-up; a few seconds on a CPU for a 135M-class layer.
    """
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    dev = torch.device(device)
    nbytes = torch.finfo(dt).bits // 8
    cap = CALIBRATION_LAYER_BYTES.get(dev.type, CALIBRATION_LAYER_BYTES["cpu"])
    own = shape is not None and shape.layer_params * nbytes <= cap
    if own:
        dims = dict(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            head_dim=shape.head_dim,
        )
    else:
        h = hidden or (512 if dev.type == "cpu" else 2048)
        dims = dict(hidden_size=h, intermediate_size=3 * h, num_attention_heads=h // 64, num_key_value_heads=h // 64)
    stack = _random_stack(dims, layers, dt, dev)
    per_layer = model_shape(stack).layer_params  # matmul parameters of one layer

    def timed(fn) -> float:
        fn()
        best = math.inf
        for _ in range(repeats):
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            best = min(best, time.perf_counter() - t)
        return best

    seq = min(128, tokens)
    rows = max(1, tokens // seq)
    ids = torch.zeros(rows, seq, dtype=torch.long, device=dev)  # [rows, T]
    t_one = timed(lambda: stack.model(input_ids=ids[:1, :1], use_cache=False))
    t_all = timed(lambda: stack.model(input_ids=ids, use_cache=False))
    overhead = t_one / layers
    rate = layers * per_layer * rows * seq / max(t_all - t_one, 1e-9)
    from .losses import token_losses

    logits = torch.randn(256, 8192, device=dev)  # [n, V] float32
    targets = torch.zeros(256, dtype=torch.long, device=dev)
    t_loss = timed(lambda: token_losses(logits, targets))
    source = f"calibrated: {layers} random Llama layers x {dims['hidden_size']}, {dtype}, 1 and {rows * seq} tokens"
    gathered: dict[str, float] = {}
    if shape is not None and shape.vocab * shape.hidden * nbytes <= 4 * cap:
        gathered.update(_head_seconds(shape, dt, dev, rows, seq, timed))
        source += f"; lm_head + loss at vocabulary {shape.vocab}"
    if own:
        one = _random_stack(dims, 1, dt, dev)
        t_g1 = timed(_gathered_call(one, channel_block, ids[:1, :2]))
        t_gl = timed(_gathered_call(stack, channel_block, ids[:1, :2]))
        t_gn = timed(_gathered_call(stack, channel_block, ids))
        per_layer_g = max(t_gl - t_g1, 0.0) / (layers - 1)
        gathered |= {
            "gathered_layer_overhead_s": per_layer_g,
            "gathered_mask_overhead_s": max(t_g1 - per_layer_g, 0.0),
            "gathered_rate_param_tokens_per_s": layers * per_layer * 0.5 * rows * seq / max(t_gn - t_gl, 1e-9),
        }
        source += f"; gathered path on the model's layer shape, channel_block {channel_block}"
        copy_bw = math.inf  # the gathers are inside the gathered path's own timings
    else:
        copy_bw = gather_bandwidth(stack.model.layers[0].mlp, timed)
    return Rate(overhead, rate, copy_bw, str(dev), source, logits.numel() / max(t_loss, 1e-9), **gathered)


def _head_seconds(shape: Shape, dt: torch.dtype, dev: torch.device, rows: int, seq: int, timed) -> dict[str, float]:
    """Seconds per next-token position of the lm_head and the loss as the search computes them
    (``losses.sequence_losses``, cross-entropy and KL; ``losses.teacher_logprobs``), at the model's vocabulary."""
    from types import SimpleNamespace

    from .losses import sequence_losses, teacher_logprobs

    lm_head = torch.nn.Linear(shape.hidden, shape.vocab, bias=False, device=dev, dtype=dt)
    head = SimpleNamespace(lm_head=lm_head, logits=lm_head)  # what the loss functions use of an adapter
    hidden = torch.randn(rows, seq, shape.hidden, device=dev, dtype=dt)  # [B, T, H]
    ids = torch.randint(0, shape.vocab, (rows, seq), device=dev)
    teacher = teacher_logprobs(head, hidden)  # [B·(T−1), V]
    positions = rows * (seq - 1)
    return {
        "head_ce_s_per_token": timed(lambda: sequence_losses(head, hidden, ids)) / positions,
        "head_kl_s_per_token": timed(lambda: sequence_losses(head, hidden, ids, teacher)) / positions,
        "teacher_head_s_per_token": timed(lambda: teacher_logprobs(head, hidden)) / positions,
    }


def _random_stack(dims: dict, layers: int, dt: torch.dtype, dev: torch.device) -> torch.nn.Module:
    """A random ``layers``-layer Llama causal LM with the layer ``dims``, vocabulary 256 (no lm_head cost)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=256, max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    with dev:
        return LlamaForCausalLM(cfg).to(dt).eval()


def _gathered_call(model: torch.nn.Module, channel_block: int, ids: torch.Tensor):
    """A no-argument call scoring one exact-50 % mask (half the KV groups, half the channel units of every layer)
    of ``model`` on ``ids`` by the gathered path."""
    import numpy as np

    from .fastpath import gathered_losses
    from .mask_space import CHANNEL, HEAD
    from .models import get_adapter

    adapter = get_adapter(model)
    space = adapter.mask_space(channel_block=channel_block)
    mask = np.zeros(space.num_units, dtype=np.float32)
    for t in (HEAD, CHANNEL):
        for layer in np.unique(space.unit_layer):
            idx = np.flatnonzero((space.unit_type == t) & (space.unit_layer == layer))
            mask[idx[: max(1, idx.size // 2)]] = 1
    return lambda: gathered_losses(adapter, space, mask[None], ids)


def gather_bandwidth(mlp: torch.nn.Module, timed) -> float:
    """Bytes/s of the gathered path's weight copies, measured as it makes them (``models.functional``): half the
    rows of ``up_proj`` by ``index_select`` and half the columns of ``down_proj`` by ``_gather_cols``, weighted as in
    a Llama layer (o_proj and down_proj, 4/13 of its weights, are gathered by column; on CPU a column gather is an
    order of magnitude slower than a row gather, so timing one of them alone misses the rate by 10x)."""
    from .models.functional import _gather_cols

    up, down = mlp.up_proj.weight, mlp.down_proj.weight  # [3H, H], [H, 3H]
    idx = torch.randperm(up.shape[0], device=up.device)[: up.shape[0] // 2]
    rows = torch.empty(idx.numel(), up.shape[1], dtype=up.dtype, device=up.device)
    cols = torch.empty(down.shape[0], idx.numel(), dtype=down.dtype, device=down.device)
    nbytes = rows.numel() * rows.element_size()
    t_rows = timed(lambda: torch.index_select(up, 0, idx, out=rows))
    t_cols = timed(lambda: _gather_cols(down, idx, cols))
    col_share = 4 / 13
    return 1.0 / ((1 - col_share) * t_rows / nbytes + col_share * t_cols / nbytes)


def fitted_cpu_rate() -> Rate:
    """The CPU fit of ``benchmarks/scaling.py`` (c0 over its 30-layer model, gathers folded into R)."""
    return Rate(
        CPU_FIT["c0_s"] / CPU_FIT["layers"], CPU_FIT["rate_param_tokens_per_s"], math.inf, "cpu", CPU_FIT["source"]
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_seconds(
    shape: Shape,
    rate: Rate,
    *,
    batch: int,
    seq_len: int,
    num_samples: int,
    sparsity: float,
    scoring: str,
    objective: str,
    replicas: int,
    nbytes: int,
) -> tuple[float, float]:
    """``(seconds per mask-forward, seconds per search step)`` by the cost model (see the module docstring)."""
    tokens = batch * seq_len
    R = rate.rate_param_tokens_per_s
    c0 = shape.layers * rate.layer_overhead_s
    body = shape.prunable * tokens / R  # the dense decoder layers
    kl = objective == "kl"
    if rate.head_ce_s_per_token is not None:  # lm_head + loss measured at the model's vocabulary
        positions = batch * (seq_len - 1)
        head = positions * (rate.head_kl_s_per_token if kl else rate.head_ce_s_per_token)
        teacher_head = positions * rate.teacher_head_s_per_token
    else:
        lm_head = (shape.matmul - shape.prunable) * tokens / R
        head = lm_head + tokens * shape.vocab / rate.loss_logits_per_s * (2 if kl else 1)  # KL: p·(log p − log q)
        teacher_head = lm_head + tokens * shape.vocab / rate.loss_logits_per_s
    teacher = c0 + body + teacher_head if kl else 0.0  # the dense forward and its log-softmax, once per step
    busy = max(1, min(replicas, num_samples))  # whole masks go to replicas
    if scoring == "gathered" and rate.gathered_rate_param_tokens_per_s:  # the path measured as it runs
        per_mask = (
            rate.gathered_mask_overhead_s
            + shape.layers * rate.gathered_layer_overhead_s
            + (1 - sparsity) * shape.prunable * tokens / rate.gathered_rate_param_tokens_per_s
            + head
        )
        step = math.ceil(num_samples / busy) * per_mask + teacher
    elif scoring == "gathered":
        copy = (1 - sparsity) * shape.prunable * nbytes * 2 / rate.copy_bytes_per_s
        per_mask = c0 + (1 - sparsity) * body + copy + head
        step = math.ceil(num_samples / busy) * per_mask + teacher
    else:
        dense = body + head
        per_mask = c0 / num_samples + dense
        step = c0 + math.ceil(num_samples / busy) * dense + teacher
    return per_mask, step


# --------------------------------------------------------------------------------------------------------- plan
def make_plan(
    cfg: Any,
    model: torch.nn.Module | None = None,
    *,
    gpu_memory_gib: float | None = None,
    rate: Rate | None = None,
    calibrate_rate: bool = True,
    load_data: bool = True,
) -> Plan:
    """The plan of ``cfg`` (a :class:`probprune.config.Config`): memory per actor, whether it fits, replicas, time.

    Args:
        cfg: the run's config.
        model: the model on the ``meta`` device (default: built from ``cfg.model`` by ``load_skeleton``).
        gpu_memory_gib: memory of one GPU (overrides detection; also applies to ``model.device=cpu`` as the memory
            the run may use).
        rate: the device's cost-model constants (default: :func:`calibrate` on the run's device when
            ``calibrate_rate`` and the device is here, else :func:`fitted_cpu_rate`).
        load_data: load the run's calibration and held-out tokens (from the token cache) before measuring the
            runtime, so it includes them as the run's process will (only when ``model`` is not given).
    """
    from .models.loading import load_skeleton

    held: tuple = ()
    data_peak = 0  # the process's peak while the data loads (CPU), with the weights it comes on top of them
    if model is None:
        model, tok = load_skeleton(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
        if load_data:
            reset = _reset_peak()
            held = _load_data(cfg, tok, shape_context(model))  # held while the runtime is measured, as in a run
            data_peak = _process_peak() if reset else 0
    shape = model_shape(model)
    sc, e = cfg.search, cfg.engine
    nbytes = DTYPE_BYTES[cfg.model.dtype]
    device = "cuda" if (e.kind == "ray" and e.gpus_per_actor > 0) else cfg.model.device
    device = "cuda" if device == "auto" else device
    scoring = e.scoring or ("gathered" if e.fast_path else "batched")
    replicas = e.num_actors if e.kind == "ray" else 1
    per_device = 1  # CPU actors: each must fit a node (how many share one is Ray's placement, unknown here)
    if e.kind == "ray" and e.gpus_per_actor > 0:
        per_device = min(max(1, int(1 / e.gpus_per_actor)), e.num_actors)  # actors sharing one GPU
    eval_len = max(min(n, shape.max_context or n) for n in cfg.eval.seq_lens)
    eval_batch = max(1, min(cfg.eval.batch_size, cfg.eval.max_tokens // eval_len))
    if device == "cpu":
        _warm_up_kernels()
    runtime = runtime_bytes(device)
    del held

    def phases_for(batch: int, scoring_path: str) -> tuple[dict[str, int], dict[str, int]]:
        return memory_terms(
            shape,
            nbytes=nbytes,
            batch=batch,
            seq_len=cfg.data.block_len,
            num_samples=sc.masks_per_step,
            scoring=scoring_path,
            objective=sc.objective,
            sparsity=sc.sparsity,
            eval_len=eval_len,
            eval_batch=eval_batch,
            runtime=runtime,
            checkpoint_bytes=_checkpoint_bytes(cfg.model.name_or_path) if device == "cpu" else 0,
            data_peak=data_peak if device == "cpu" else 0,
            cpu=device == "cpu",
            reconstruct=(
                (cfg.reconstruct.target, cfg.reconstruct.blocks, cfg.eval.batch_size)
                if cfg.reconstruct.enabled
                else None
            ),
        )

    # "auto" is decided by measurement at run time: plan for the larger of the two paths
    paths = ("gathered", "batched") if scoring == "auto" else (scoring,)
    terms, phases = max((phases_for(sc.batch_size, p) for p in paths), key=lambda tp: max(tp[1].values()))
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    capacity, source = device_capacity(device, gpu_memory_gib if gpu_memory_gib is not None else e.memory_gib)
    fits = None if capacity is None else peak * per_device <= capacity
    max_batch = None
    if capacity is not None:

        def ok(b: int) -> bool:
            return all(max(phases_for(b, p)[1].values()) * per_device <= capacity for p in paths)

        lo, hi = 0, 1
        while hi <= 1 << 20 and ok(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        max_batch = lo
    if rate is None:
        here = device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())
        if calibrate_rate and here:
            threads = torch.get_num_threads()
            torch.set_num_threads(e.threads or threads)  # the run's threads
            try:
                rate = calibrate(
                    device,
                    cfg.model.dtype,
                    tokens=sc.batch_size * cfg.data.block_len,
                    shape=shape,
                    channel_block=cfg.mask.channel_block,
                )
            finally:
                torch.set_num_threads(threads)
        else:
            rate = fitted_cpu_rate()
    timing_path = "gathered" if scoring == "auto" else scoring
    per_mask, step = step_seconds(
        shape,
        rate,
        batch=sc.batch_size,
        seq_len=cfg.data.block_len,
        num_samples=sc.masks_per_step,
        sparsity=sc.sparsity,
        scoring=timing_path,
        objective=sc.objective,
        replicas=replicas,
        nbytes=nbytes,
    )
    return Plan(
        cfg.model.name_or_path,
        cfg.model.dtype,
        device,
        scoring,
        sc.objective,
        replicas,
        per_device,
        sc.batch_size,
        cfg.data.block_len,
        sc.masks_per_step,
        sc.steps,
        sc.sparsity,
        terms,
        peak,
        peak_phase,
        capacity,
        source,
        fits,
        max_batch,
        per_mask,
        step,
        step * sc.steps,
        {k: v for k, v in asdict(rate).items()},
        phases,
    )


def shape_context(model: torch.nn.Module) -> int | None:
    from .perplexity import max_context

    return max_context(model)


def _load_data(cfg: Any, tok: Any, context: int | None) -> tuple:
    """The run's calibration blocks and held-out tokens (the run holds them during the whole search)."""
    from .data import CalibrationData, load_corpus, test_stream

    corpus = load_corpus(cfg.data, seed=cfg.data.split_seed)
    calib = CalibrationData.from_corpus(
        tok, corpus, cfg.data.block_len, cfg.data.calib_blocks, seed=cfg.seed, max_context=context
    )
    return corpus, calib, test_stream(tok, corpus)


@torch.no_grad()
def _warm_up_kernels() -> None:
    """One forward of a 2-layer, 64-wide random Llama: loads the CPU kernel libraries a run's first forward loads."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
    )
    LlamaModel(cfg).eval()(input_ids=torch.zeros(2, 16, dtype=torch.long), use_cache=False)


def _checkpoint_bytes(name_or_path: str) -> int:
    """Bytes of a local model folder's weight files (resident while they are read), 0 when not local."""
    from pathlib import Path

    from .errors import UserError
    from .models.loading import resolve_model_path

    if name_or_path.startswith("tiny:"):
        return 0
    try:
        folder = Path(resolve_model_path(name_or_path))
    except UserError:  # a missing path: load_skeleton has said so already
        return 0
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(
        p.stat().st_size for p in folder.glob("*.bin")
    )


def check_fits(plan: Plan) -> None:
    """Raise :class:`~probprune.errors.UserError` with the numbers when ``plan`` does not fit its device."""
    from .errors import UserError

    if plan.fits is False:
        need = plan.peak_bytes * plan.actors_per_device
        raise UserError(
            f"this configuration does not fit: {_gib(need)} needed per device ({plan.actors_per_device} actor(s) x "
            f"{_gib(plan.peak_bytes)} at the {plan.peak_phase} peak: "
            + ", ".join(f"{k} {_gib(v)}" for k, v in plan.memory.items() if v)
            + f") > {_gib(plan.capacity_bytes or 0)} ({plan.capacity_source}); largest search.batch_size that fits: "
            f"{plan.max_batch_size}. See probprune plan --config ... for the breakdown"
        )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A human-readable table of ``plan``."""
    lines = [
        f"plan for {plan.model} ({plan.dtype}, {plan.device}), scoring={plan.scoring}, "
        f"objective={plan.objective}, K={plan.num_samples} masks x {plan.batch_size} x {plan.seq_len} tokens, "
        f"sparsity {plan.sparsity:g}",
        "",
        "| memory per actor | GiB |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v / GIB:.3f} |" for k, v in plan.memory.items()]
    lines += [f"| **peak ({plan.peak_phase})** | **{plan.peak_bytes / GIB:.3f}** |", ""]
    fit = {True: "fits", False: "DOES NOT FIT", None: "unknown"}[plan.fits]
    cap = "?" if plan.capacity_bytes is None else f"{plan.capacity_bytes / GIB:.1f} GiB"
    lines += [
        f"device: {cap} ({plan.capacity_source}); {plan.actors_per_device} actor(s) per device: {fit}; "
        f"largest search.batch_size that fits: {plan.max_batch_size}",
        f"replicas: {plan.replicas}",
        f"time: {plan.seconds_per_mask:.4g} s per mask-forward, {plan.seconds_per_step:.4g} s per step, "
        f"{plan.total_seconds / 60:.1f} min for {plan.steps} steps (search only; rate: {plan.rate['source']}, "
        f"R = {plan.rate['rate_param_tokens_per_s'] / 1e9:.1f}e9 parameter-tokens/s, "
        f"{plan.rate['layer_overhead_s'] * 1e3:.2f} ms per layer)",
    ]
    return "\n".join(lines)
