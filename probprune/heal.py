"""Healing a pruned model by distillation from the dense model (this step uses gradients; the search does not).

The student (the pruned model, trained in float32 master weights whatever the dtype of its folder) is pulled toward
the teacher's next-token distribution: loss = (1 − w)·KL(p_teacher ‖ p_student) + w·CE(student, next token), mean
over the tokens of a batch, with ``w = heal.ce_weight`` (0: pure distillation). The teacher's log-probabilities are
computed on the fly for each micro-batch. Training data are the calibration split of the config (never the held-out
split), cut into blocks of ``heal.block_len`` tokens and streamed in a seeded order that depends only on the step,
so a resumed run sees the same batches.

Training: ``torch.optim.AdamW``, linear warm-up + cosine decay (``transformers.get_cosine_schedule_with_warmup``),
gradient accumulation, gradient-norm clipping, bf16 autocast on CUDA, and either every parameter (``full``) or LoRA
adapters (``peft``, merged back at the end so the saved model keeps its per-layer shapes). Checkpoints hold the
trainable parameters, optimizer, scheduler, RNG states and the data position, written atomically; ``resume``
continues bit-for-bit. Several workers (``heal.workers``) train data-parallel with Ray Train
(:mod:`probprune.engine.ray.train`); this module is the loop each worker runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError
from .files import write_atomic, write_text_atomic
from .run_folder import CONFIG, METRICS, SUMMARY, RunFolder
from .runlock import holds_output_lock

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "heal_checkpoint.pt"
_CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------------------------------------------ loss
def distill_loss(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, input_ids: torch.Tensor, ce_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 − ce_weight)·KL(teacher ‖ student) + ce_weight·CE, each a mean over tokens.

    Args:
        student_logits: ``[B, T, V]`` (any float dtype; computed in float32).
        teacher_logprobs: ``[B, T, V]`` float32 log-probabilities of the teacher (no gradient).
        input_ids: ``[B, T]`` the tokens (the CE term predicts ``input_ids[:, 1:]``).
        ce_weight: weight of the cross-entropy term in [0, 1].

    Returns:
        ``(loss, {"kl": …, "ce": …})``: the scalar to back-propagate and the two terms as floats (``ce`` is only
        computed when its weight is above 0, else NaN).
    """
    V = student_logits.shape[-1]
    logp = F.log_softmax(student_logits.float(), dim=-1)  # [B, T, V]
    kl = F.kl_div(logp, teacher_logprobs, reduction="none", log_target=True).sum(-1).mean()  # KL per position
    loss = (1.0 - ce_weight) * kl
    ce_value = float("nan")
    if ce_weight > 0:
        ce = F.nll_loss(logp[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1))
        loss = loss + ce_weight * ce
        ce_value = float(ce.detach())
    return loss, {"kl": float(kl.detach()), "ce": ce_value}


# ------------------------------------------------------------------------------------------------------------ data
def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"probprune-heal|{int(seed)}|{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BlockStream:
    """The calibration token stream as non-overlapping blocks, visited in a seeded random order, epoch after epoch.

    Block ``i`` of the sequence is a function of ``(seed, i)`` only (epoch ``i // n`` is a fresh permutation of the
    ``n`` blocks), so a run that resumes at step ``k`` reads exactly the batches an uninterrupted run would.
    """

    def __init__(self, tokens: torch.Tensor, block_len: int, seed: int, bos_id: int | None = None):
        from .data import cut_windows

        self.blocks = cut_windows(tokens, int(block_len), None, bos_id)  # [n, T]; with bos_id the BOS first
        if self.blocks.shape[0] < 1:
            raise UserError(
                f"heal.block_len={block_len}: the calibration split has only {tokens.numel()} tokens, "
                "less than one block"
            )
        self.seed = int(seed)
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self), generator=gen))
        return self._perm[1]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The ``batch_size`` blocks of optimizer step ``step``: ``[batch_size, T]`` int64."""
        n = len(self)
        rows = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            rows.append(self.blocks[self._order(i // n)[i % n]])
        return torch.stack(rows)  # [B, T]


# ---------------------------------------------------------------------------------------------------------- models
def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_student(path: str | Path, device: str = "cpu") -> nn.Module:
    """The model to heal, in float32 master weights (whatever the dtype it was saved in), in train mode."""
    from .models.loading import load_model

    model, _ = load_model(str(path), "float32", device)
    return model


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model folder (or of a ``tiny:`` / ``embedded:`` model), without loading weights."""
    from .models.loading import byte_tokenizer, resolve_model_path

    if name_or_path.startswith("tiny:"):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Replace ``path`` by the given records, one JSON line each, atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft``); only the adapters train.

    ``targets`` empty: every ``nn.Linear`` except the output head (``lm_head``). Zero-width sublayers of pruned
    models hold no linear layer and get no adapter.

    Raises:
        UserError: ``peft`` is not installed, or a target name matches no linear layer of the model.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("heal.method=lora needs the `peft` package: pip install 'probprune[heal]'") from None
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear.discard("lm_head")
    wanted = list(targets) if targets else sorted(linear)
    missing = [t for t in wanted if t not in linear]
    if missing:
        raise UserError(
            f"heal.lora_targets={list(targets or [])!r}: {missing} name no linear layer of the model "
            f"(its linear layers: {sorted(linear)})"
        )
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, target_modules=wanted, bias="none")
    return get_peft_model(model, cfg)


def freeze_unused(model: nn.Module) -> list[str]:
    """Stop training parameters that no output depends on and return their names.

    In a pruned model the norm in front of an emptied sublayer (an attention-free or MLP-free layer) feeds nothing;
    it would get no gradient, and data-parallel training (DDP) requires every trained parameter to get one. Found with
    one backward pass over a 4-token input.
    """
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=False).logits.float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the weights and return the plain model (same class, same shapes); a no-op otherwise."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# ---------------------------------------------------------------------------------------------------------- memory
def memory_estimate(student: nn.Module, teacher: nn.Module, hc: Any, lora: bool) -> dict[str, int]:
    """Bytes one worker needs: weights, gradients and AdamW state of the student, the teacher's weights, logits.

    Student: float32 weights (4 B/param) + for ``full`` gradients and two AdamW moments (12 B/param); for LoRA only
    the adapters train (their share is small, counted as 1 % of the weights). Teacher: its weights in its dtype.
    Activations: the ``[b, T, V]`` float32 logits (≈ 5 copies: student, log-softmax, its gradient, teacher, KL
    terms) plus the decoder's saved activations (≈ 16 hidden-size tensors per layer), for a micro-batch of ``b``.
    """
    n_student = sum(p.numel() for p in student.parameters())
    student_b = n_student * 4 + (int(n_student * 0.01) * 12 if lora else n_student * 12)
    teacher_b = sum(p.numel() * p.element_size() for p in teacher.parameters())
    cfg = student.config
    b = hc.batch_size // (hc.grad_accum * hc.workers)
    tokens = b * hc.block_len
    act = tokens * cfg.vocab_size * 4 * 5 + tokens * cfg.hidden_size * 4 * 16 * cfg.num_hidden_layers
    return {"student": student_b, "teacher": teacher_b, "activations": act, "total": student_b + teacher_b + act}


def check_memory(need: dict[str, int], device: torch.device) -> int:
    """Raise a :class:`UserError` before training when ``need['total']`` exceeds the free memory of ``device``.

    CUDA: ``torch.cuda.mem_get_info`` (free bytes now); CPU: available system memory (``psutil``), a rough check.
    Returns the free bytes found.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"{device} (free GPU memory)"
    else:
        import psutil

        free, where = psutil.virtual_memory().available, "this machine (available memory)"
    if need["total"] > free:
        gib = lambda x: f"{x / 2**30:.2f} GiB"
        raise UserError(
            f"heal: one worker needs about {gib(need['total'])} (student {gib(need['student'])} with gradients and "
            f"optimizer state, teacher {gib(need['teacher'])}, activations {gib(need['activations'])}) but "
            f"{where} has {gib(free)}; lower heal.batch_size or raise heal.grad_accum, use heal.method=lora, a "
            "bfloat16 heal.teacher_dtype, or a larger device"
        )
    return int(free)


# ------------------------------------------------------------------------------------------------------------- job
@dataclass
class HealJob:
    """Everything a worker needs (picklable: it travels to Ray Train workers)."""

    student: str  # model folder of the model to heal
    teacher: str  # teacher name or path
    teacher_dtype: str
    heal: dict[str, Any]  # HealConfig as a dict
    seed: int
    device: str
    calib_tokens: torch.Tensor  # [n] calibration token stream
    test_tokens: torch.Tensor  # [m] held-out token stream
    seq_lens: list[int]
    eval_max_tokens: int | None
    eval_batch_size: int
    output: str
    resume: bool
    fingerprint: str
    progress: bool = True
    teacher_ppl: dict[str, float] | None = None  # the teacher's held-out perplexity if known (else measured)
    extra_eval: dict[str, torch.Tensor] = field(default_factory=dict)  # more held-out streams, by name
    bos_id: int | None = None  # every training block and evaluation window starts with it (data.bos)

    @property
    def steps(self) -> int:
        h = self.heal
        return max(1, math.ceil(int(h["tokens"]) / (int(h["batch_size"]) * int(h["block_len"]))))


class _H:
    """Attribute view of the heal settings dict."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: the checkpoint holds tensors, numbers and strings only (weights_only loading)
    numpy_state = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt,
    sched,
    step: int,
    tokens_seen: int,
    history: list,
    fingerprint: str,
    before: dict | None,
) -> None:
    """Write the training state atomically (:func:`probprune.files.write_atomic`)."""
    state = {
        "version": _CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "step": step,
        "tokens_seen": tokens_seen,
        "model": {n: p.detach().clone() for n, p in _trainable(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "before": before,
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in a heal checkpoint (None if unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("fingerprint")
    except Exception:
        return None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _evaluate(model: nn.Module, job: HealJob, label: str) -> dict[str, dict[str, float]]:
    from .perplexity import evaluate_ppl

    out = {}
    for name, tokens in {"test": job.test_tokens, **job.extra_eval}.items():
        res = evaluate_ppl(
            model,
            tokens,
            job.seq_lens,
            max_tokens=job.eval_max_tokens,
            batch_size=job.eval_batch_size,
            progress=job.progress,
            bos_id=job.bos_id,
        )
        out[name] = {str(k): float(v) for k, v in res.items()}
    log.info("%s perplexity: %s", label, out)
    return out


class _Dist:
    """The data-parallel world a worker lives in: rank, size, and a mean over workers (identity for one)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    def mean(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return (t / self.size).tolist()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def train_worker(
    job: HealJob,
    rank: int = 0,
    world_size: int = 1,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    report: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict | None:
    """The training loop of one worker; rank 0 evaluates, writes checkpoints, metrics and the healed model.

    Args:
        job: the healing job.
        rank, world_size: this worker's place in the data-parallel group (1 worker: 0, 1).
        prepare: wraps the student for data-parallel training (Ray Train's ``prepare_model``: DDP).
        report: called with every step's metrics (Ray Train's ``ray.train.report``).
        stop_after: stop after this many steps in total (tests), leaving the checkpoint of the last one.
        on_step: called by rank 0 after each step with ``(step, record)`` (tests use it to interrupt a run).

    Returns:
        On rank 0 the result record (before/after perplexities, history, tokens, wall time); None elsewhere.
    """
    h = _H(job.heal)
    dist = _Dist(rank, world_size)
    out = Path(job.output)
    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    random.seed(job.seed)
    np.random.seed(job.seed % 2**32)
    from transformers import get_cosine_schedule_with_warmup

    from .models.loading import load_model

    student = load_student(job.student, job.device)
    teacher, _ = load_model(job.teacher, job.teacher_dtype, job.device)
    teacher.requires_grad_(False)
    lora = h.method == "lora"
    if lora:
        student = apply_lora(student, h.lora_rank, h.lora_alpha, h.lora_targets)
    else:
        frozen = freeze_unused(student)
        if frozen and rank == 0:
            log.info("not trained (no output depends on them): %s", ", ".join(frozen))
    need = memory_estimate(student, teacher, h, lora)
    free = check_memory(need, device)
    if rank == 0:
        log.info(
            "memory per worker: student %.2f GiB, teacher %.2f GiB, activations %.2f GiB (free %.1f GiB)",
            need["student"] / 2**30,
            need["teacher"] / 2**30,
            need["activations"] / 2**30,
            free / 2**30,
        )
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
    steps = job.steps
    sched = get_cosine_schedule_with_warmup(opt, round(h.warmup * steps), steps)
    stream = BlockStream(job.calib_tokens, h.block_len, job.seed, job.bos_id)
    start, tokens_seen, history, before = 0, 0, [], None
    ckpt = out / CHECKPOINT_NAME
    if job.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)  # a checkpoint cannot run code
        with torch.no_grad():
            for n, p in _trainable(student).items():
                p.copy_(state["model"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, tokens_seen, history, before = state["step"], state["tokens_seen"], state["history"], state["before"]
        if rank == 0:
            log.info("resuming healing at step %d of %d (%d tokens seen)", start, steps, tokens_seen)
    model = prepare(student) if prepare is not None else student
    if before is None and rank == 0:
        before = _evaluate(_unwrap(model), job, "before healing")
        before["teacher"] = (
            {"test": job.teacher_ppl} if job.teacher_ppl is not None else _evaluate(teacher, job, "teacher")
        )
    use_autocast = h.autocast == "bf16" or (h.autocast == "auto" and device.type == "cuda")
    micro = h.batch_size // (world_size * h.grad_accum)
    t0, t_train = time.perf_counter(), 0.0
    evals = [r for r in history if "eval" in r]
    metrics_path = out / METRICS
    bar = tqdm(total=steps, initial=start, desc="healing", unit="step", disable=not (job.progress and rank == 0))
    model.train()
    teacher.eval()
    in_update, saved_step = False, start
    if rank == 0:  # a new heal starts an empty file; a resumed one writes the steps after its checkpoint again
        write_jsonl_atomic(metrics_path, history)
    try:
        for step in range(start, steps):
            if stop_after is not None and step >= stop_after:
                break
            ts = time.perf_counter()
            batch = stream.batch(step, h.batch_size)  # [B, T] global batch
            rows = batch.view(world_size, -1, h.block_len)[rank]  # [B / world, T] this worker's share
            kl_sum = ce_sum = loss_sum = 0.0
            for mb in rows.view(h.grad_accum, micro, h.block_len).to(device):  # [b, T] micro-batches
                with torch.no_grad():
                    t_logp = F.log_softmax(teacher(input_ids=mb, use_cache=False).logits.float(), dim=-1)  # [b,T,V]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    s_logits = model(input_ids=mb, use_cache=False).logits  # [b, T, V]
                loss, parts = distill_loss(s_logits, t_logp, mb, h.ce_weight)
                (loss / h.grad_accum).backward()
                loss_sum += float(loss.detach()) / h.grad_accum
                kl_sum += parts["kl"] / h.grad_accum
                ce_sum += parts["ce"] / h.grad_accum
                del t_logp, s_logits, loss
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, h.max_grad_norm or float("inf")))
            in_update = True  # from here until the step is recorded, the state is between two steps
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_g, kl_g, ce_g = dist.mean([loss_sum, kl_sum, ce_sum])
            tokens_seen += h.batch_size * h.block_len
            dt = time.perf_counter() - ts
            t_train += dt
            rec = {
                "step": step + 1,
                "loss": loss_g,
                "kl": kl_g,
                "ce": None if math.isnan(ce_g) else ce_g,
                "lr": sched.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_s": h.batch_size * h.block_len / dt,
                "seconds": t_train,
            }
            history.append(rec)
            in_update = False
            if h.eval_every and (step + 1) % h.eval_every == 0 and step + 1 < steps and rank == 0:
                rec["eval"] = _evaluate(_unwrap(model), job, f"step {step + 1}")
                evals.append(rec)
                model.train()
            if rank == 0:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{loss_g:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if report is not None:
                report({k: v for k, v in rec.items() if k != "eval"})
            if (step + 1) % h.checkpoint_every == 0 or step + 1 == steps or (stop_after and step + 1 == stop_after):
                if rank == 0:
                    save_checkpoint(
                        ckpt, _unwrap(model), opt, sched, step + 1, tokens_seen, history, job.fingerprint, before
                    )
                saved_step = step + 1
                dist.barrier()
            if on_step is not None and rank == 0:
                on_step(step + 1, rec)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the CLI turns it into one): keep the last whole step
        if rank == 0 and not in_update and len(history) > saved_step:
            save_checkpoint(
                ckpt, _unwrap(model), opt, sched, len(history), tokens_seen, history, job.fingerprint, before
            )
            log.warning("healing interrupted after step %d; checkpoint written, continue with --resume", len(history))
        raise
    finally:
        bar.close()
    if stop_after is not None and len(history) < steps:
        return {"interrupted_at_step": len(history)} if rank == 0 else None
    if rank != 0:
        return None
    healed = merge_lora(_unwrap(model)).eval()
    after = _evaluate(healed, job, "after healing")
    from .compaction import save_pruned

    tok = load_tokenizer(job.student)
    healed = healed.to(_dtype(h.save_dtype))
    save_pruned(healed, out / "model", tok)
    first = history[: max(1, min(10, len(history) // 10))]
    last = history[-max(1, min(10, len(history) // 10)) :]
    teacher_ppl = before.pop("teacher")
    return {
        "teacher_ppl": teacher_ppl,
        "before_ppl": before,
        "after_ppl": after,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "train_seconds": round(t_train, 2),
        "wall_seconds_this_process": round(time.perf_counter() - t0, 2),
        "tokens_per_s": round(tokens_seen / t_train, 2) if t_train else None,
        "first_kl": float(np.mean([r["kl"] for r in first])),
        "last_kl": float(np.mean([r["kl"] for r in last])),
        "evals": [{"step": r["step"], "tokens": r["tokens"], "seconds": r["seconds"], "ppl": r["eval"]} for r in evals],
        "memory_per_worker_bytes": need,
        "workers": world_size,
        "method": h.method,
    }


# ---------------------------------------------------------------------------------------------------------- driver
def run_folder_teacher(model_path: str | Path) -> str | None:
    """The dense model a run pruned: ``model.name_or_path`` of ``config.yaml`` next to the run's ``model`` folder."""
    cfg_path = Path(model_path).parent / CONFIG
    if not cfg_path.is_file():
        return None
    import yaml

    data = yaml.safe_load(cfg_path.read_text()) or {}
    return (data.get("model") or {}).get("name_or_path")


def _check_model_folder(path: str, field: str) -> None:
    if path.startswith(("tiny:", "embedded:")):
        return
    p = Path(path).expanduser()
    if not p.exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        return  # a hub id ("org/name"): fetched (or refused) when loaded
    if not p.is_dir():
        raise UserError(f"{field} {path}: no such folder")
    if not (p / "config.json").is_file():
        raise UserError(f"{field} {path}: not a model folder (no config.json)")


def _vocab_size(name_or_path: str) -> tuple[int, int | None]:
    from .models.loading import load_skeleton

    model, _ = load_skeleton(name_or_path)
    return int(model.config.vocab_size), getattr(model.config, "max_position_embeddings", None)


def _wants_bos(name_or_path: str) -> bool:
    """Whether the model's family prescribes a BOS token first in every sequence (from its shapes only)."""
    from .models.loading import load_skeleton
    from .models.registry import get_adapter

    model, _ = load_skeleton(name_or_path)
    return get_adapter(model).wants_bos


def heal_fingerprint(cfg: Any, student: str, teacher: str) -> str:
    """Hash of everything that decides the training trajectory (not the evaluation settings)."""
    d = {
        "student": str(student),
        "teacher": teacher,
        "heal": asdict(cfg.heal),
        "data": asdict(cfg.data),
        "seed": cfg.seed,
        "device": cfg.model.device,
    }
    d["heal"].pop("eval_every"), d["heal"].pop("checkpoint_every")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@holds_output_lock("output")
def heal(
    cfg: Any,
    model: str | Path,
    output: str | Path,
    teacher: str | None = None,
    resume: bool = False,
    progress: bool = True,
    teacher_ppl: dict[str, float] | None = None,
    extra_eval: dict[str, torch.Tensor] | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Heal the model in folder ``model`` toward ``teacher``; write ``output/model``, ``summary.json``,
    ``metrics.jsonl``, ``config.yaml`` and the checkpoint ``heal_checkpoint.pt``.

    Args:
        cfg: the run :class:`~probprune.config.Config` (``heal``, ``data``, ``eval``, ``seed``, ``model.device``).
        model: folder of the model to heal (``RUN/model``), or a ``tiny:`` model.
        output: folder to write; must be new or empty (or hold a heal checkpoint with ``resume``).
        teacher: the dense model; default ``heal.teacher``, then ``model.name_or_path`` of ``RUN/config.yaml``,
            then ``cfg.model.name_or_path``.
        resume: continue the checkpoint in ``output``.
        progress: progress bars.
        teacher_ppl: the teacher's held-out perplexity if already known (skips measuring it).
        extra_eval: more held-out token streams to report perplexity on, by name (e.g. another genre).
        stop_after: stop after this many steps (tests).
        on_step: called after every step (tests).

    Returns:
        The summary (also written to ``output/summary.json``, last).

    Raises:
        UserError: ``heal.tokens`` = 0, a missing model folder, a teacher with another vocabulary, a bad output
            folder, not enough memory; all before anything is written.
    """
    from .config import save_config
    from .data import cached_token_stream, load_corpus, resolve_bos, test_stream
    from .perplexity import protocol

    t_start = time.perf_counter()
    hc, output, model = cfg.heal, Path(output), str(model)
    if hc.tokens < 1:
        raise UserError(f"heal.tokens={hc.tokens}: healing needs at least one token (e.g. heal.tokens=65536)")
    _check_model_folder(model, "--model")
    teacher = teacher or hc.teacher or run_folder_teacher(model) or cfg.model.name_or_path
    _check_model_folder(teacher, "--teacher")
    resuming = RunFolder(output, resume, checkpoint=CHECKPOINT_NAME, job="heal", cfg=cfg).resuming
    v_student, context = _vocab_size(model)
    v_teacher, _ = _vocab_size(teacher)
    if v_student != v_teacher:
        raise UserError(
            f"--teacher {teacher}: its vocabulary has {v_teacher} tokens but the model to heal ({model}) "
            f"has {v_student}; distillation needs the same tokenizer"
        )
    if context is not None and hc.block_len > context:
        raise UserError(
            f"heal.block_len={hc.block_len} exceeds the model's context (max_position_embeddings={context})"
        )
    tok = load_tokenizer(model)
    bos_id = resolve_bos(cfg.data.bos, tok, _wants_bos(model))
    corpus = load_corpus(cfg.data, seed=cfg.data.split_seed)
    calib = cached_token_stream(tok, corpus.calib_docs, f"{corpus.name}:calib")
    BlockStream(calib, hc.block_len, cfg.seed, bos_id)  # a corpus too short for one block fails here, before any write
    fp = heal_fingerprint(cfg, model, teacher)
    if resuming and checkpoint_fingerprint(output / CHECKPOINT_NAME) != fp:
        raise UserError(
            f"--resume: the heal checkpoint in {output} belongs to other settings (model, teacher, data "
            "or heal.* differ); run it with the settings in its config.yaml, or choose another --output"
        )
    teacher_dtype = cfg.model.dtype if hc.teacher_dtype == "auto" else hc.teacher_dtype
    device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    job = HealJob(
        student=model,
        teacher=teacher,
        teacher_dtype=teacher_dtype,
        heal=asdict(hc),
        seed=cfg.seed,
        device=device,
        calib_tokens=calib,
        test_tokens=test_stream(tok, corpus),
        seq_lens=list(cfg.eval.seq_lens),
        eval_max_tokens=cfg.eval.max_tokens,
        eval_batch_size=cfg.eval.batch_size,
        output=str(output),
        resume=resuming,
        fingerprint=fp,
        progress=progress,
        teacher_ppl=teacher_ppl,
        extra_eval=dict(extra_eval or {}),
        bos_id=bos_id,
    )
    from .files import dir_mode

    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    try:
        save_config(cfg, output / CONFIG)
        if hc.workers > 1:
            from .engine.ray.train import data_parallel

            result = data_parallel(train_worker, job, cfg, stop_after=stop_after)
        else:
            result = train_worker(job, stop_after=stop_after, on_step=on_step)
    except UserError:  # refused before training (e.g. memory): leave nothing behind
        if not resuming and not (output / CHECKPOINT_NAME).exists():
            if created:
                shutil.rmtree(output, ignore_errors=True)
            else:  # an empty folder the user gave: empty again
                for p in output.iterdir():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        raise
    if "interrupted_at_step" in result:
        return result
    summary = {
        "model": model,
        "teacher": teacher,
        "teacher_dtype": teacher_dtype,
        "data": corpus.name,
        "seed": cfg.seed,
        "heal": asdict(hc),
        **result,
        "ratio_to_teacher": {
            name: {k: round(v / result["teacher_ppl"][name][k], 4) for k, v in ppl.items()}
            for name, ppl in result["after_ppl"].items()
            if name in result["teacher_ppl"]
        },
        "calibration_tokens_available": int(calib.numel()),
        "eval": {
            "seq_lens": list(cfg.eval.seq_lens),
            "max_tokens": cfg.eval.max_tokens,
            "held_out_tokens": int(job.test_tokens.numel()),
            "protocol": protocol(bos_id),
        },
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    write_text_atomic(output / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def format_heal_summary(summary: dict[str, Any]) -> str:
    """The table ``probprune heal`` prints: teacher, before and after, per held-out set and window length."""
    lens = list(summary["teacher_ppl"]["test"])
    rows = ["| model | held-out | " + " | ".join(f"PPL@{n}" for n in lens) + " |", "|" + "---|" * (2 + len(lens))]
    for label, key in (
        ("teacher (dense)", "teacher_ppl"),
        ("before healing", "before_ppl"),
        ("after healing", "after_ppl"),
    ):
        for name, ppl in summary[key].items():
            rows.append(f"| {label} | {name} | " + " | ".join(f"{ppl.get(n, float('nan')):.2f}" for n in lens) + " |")
    foot = (
        f"healed {summary['tokens_seen']:,} tokens in {summary['steps']} steps ({summary['method']}, "
        f"{summary['workers']} worker(s)), {summary['tokens_per_s']} tokens/s, KL {summary['first_kl']:.3f} -> "
        f"{summary['last_kl']:.3f} nats/token; wall time {summary['wall_seconds']:.0f} s"
    )
    return "\n".join(rows) + "\n\n" + foot


def heal_run(
    cfg: Any, run: str | Path, dense_ppl: dict[str, float] | None = None, progress: bool = True
) -> dict[str, Any]:
    """The last step of ``probprune prune … heal.tokens=N``: heal ``run/model`` toward ``model.name_or_path`` (or
    ``heal.teacher``) into ``run/heal`` and return the record for the run's ``summary.json``.

    ``dense_ppl`` (the run's dense perplexity, measured in the teacher's dtype) is reused instead of re-measured.
    """
    run = Path(run)
    teacher_ppl = dense_ppl if cfg.heal.teacher_dtype in ("auto", cfg.model.dtype) else None
    s = heal(
        cfg,
        run / "model",
        run / "heal",
        teacher=cfg.heal.teacher or cfg.model.name_or_path,
        teacher_ppl=teacher_ppl,
        progress=progress,
    )
    keys = (
        "teacher_ppl",
        "before_ppl",
        "after_ppl",
        "ratio_to_teacher",
        "steps",
        "tokens_seen",
        "tokens_per_s",
        "train_seconds",
        "wall_seconds",
        "method",
        "first_kl",
        "last_kl",
    )
    return {"model": "heal/model", **{k: s[k] for k in keys}}
