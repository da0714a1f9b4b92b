"""Healing by distillation: loss, training, LoRA merge, save/reload/export, resume, Ray Train workers, bad input."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hetero_tiny

from probprune.compaction import save_pruned
from probprune.config import load_config
from probprune.errors import ConfigError, UserError
from probprune.heal import (
    CHECKPOINT_NAME,
    BlockStream,
    apply_lora,
    check_memory,
    distill_loss,
    freeze_unused,
    heal,
    load_student,
    merge_lora,
)
from probprune.models import tiny_model
from probprune.models.loading import byte_tokenizer, load_pruned
from probprune.models.modeling_probprune import EmptyAttention, EmptyMLP

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: exact comparisons independent of threads

_WORDS = (
    "the of and to a in that is was he for it with as his on be at by this had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do first"
).split()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny 4-layer teacher and its pruned student with per-layer shapes (thinned, attention-free, MLP-free
    layers), both saved, and three small text files (two calibrate, one is held out)."""
    root = tmp_path_factory.mktemp("heal")
    model, pruned = hetero_tiny()
    model.save_pretrained(root / "teacher")
    byte_tokenizer().save_pretrained(root / "teacher")
    (root / "run").mkdir()
    save_pruned(pruned, root / "run" / "model", byte_tokenizer())
    rng = random.Random(0)
    for i in range(3):
        paras = [" ".join(rng.choice(_WORDS) for _ in range(50)) for _ in range(12)]
        (root / f"doc{i}.txt").write_text("\n\n".join(paras))
    return root


def _cfg(root, *extra):
    return load_config(
        None,
        [
            "data.source=files",
            f"data.paths=[{root}/doc0.txt,{root}/doc1.txt]",
            f"data.test_paths=[{root}/doc2.txt]",
            "eval.seq_lens=[32]",
            "eval.max_tokens=1024",
            "heal.tokens=1536",
            "heal.block_len=32",
            "heal.batch_size=4",
            "heal.lr=3e-3",
            "heal.warmup=0.1",
            *extra,
        ],
    )


def _kl_on_held_out(student, teacher, tokens: torch.Tensor) -> float:
    blocks = tokens[: (tokens.numel() // 32) * 32].view(-1, 32)[:16]  # [16, 32]
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=blocks).logits.float(), -1)
        return distill_loss(student(input_ids=blocks).logits, t_logp, blocks)[1]["kl"]


def test_a_student_equal_to_the_teacher_has_zero_loss_and_zero_gradient(folders):
    student = load_student(folders / "run" / "model").train()
    teacher = copy.deepcopy(student).eval()
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
    loss, parts = distill_loss(student(input_ids=x).logits, t_logp, x)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and parts["kl"] < 1e-6
    grads = {n: p.grad.abs().max() for n, p in student.named_parameters() if p.grad is not None}
    # autograd reaches every parameter of the pruned classes except the norms in front of emptied sublayers
    assert set(dict(student.named_parameters())) - set(grads) == {
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
    }
    assert float(torch.stack(list(grads.values())).max()) < 1e-6
    assert freeze_unused(student) == [
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
    ]
    # the cross-entropy mix is the plain next-token loss at ce_weight=1
    loss_ce, _ = distill_loss(student(input_ids=x).logits, t_logp, x, ce_weight=1.0)
    want = torch.nn.functional.cross_entropy(student(input_ids=x).logits[:, :-1].reshape(-1, 260), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss_ce, want, rtol=1e-6, atol=1e-6)


def test_healing_lowers_the_kl_to_the_teacher_and_writes_a_complete_run(folders, tmp_path):
    cfg = _cfg(folders, "heal.eval_every=6")
    out = tmp_path / "healed"
    summary = heal(cfg, folders / "run" / "model", out, teacher=str(folders / "teacher"), progress=False)
    from probprune.data import load_corpus, test_stream

    tokens = test_stream(byte_tokenizer(), load_corpus(cfg.data, seed=0))
    teacher = load_student(folders / "teacher").eval()
    before = _kl_on_held_out(load_student(folders / "run" / "model"), teacher, tokens)
    after = _kl_on_held_out(load_pruned(out / "model"), teacher, tokens)
    assert after < 0.6 * before, (before, after)
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 32
    assert summary["after_ppl"]["test"]["32"] < summary["before_ppl"]["test"]["32"]
    assert summary["last_kl"] < summary["first_kl"]
    assert [e["step"] for e in summary["evals"]] == [6] and summary["evals"][0]["tokens"] == 6 * 4 * 32
    assert summary["after_ppl"]["test"]["32"] < summary["evals"][0]["ppl"]["test"]["32"]
    assert json.loads((out / "summary.json").read_text())["tokens_seen"] == 1536
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12
    assert {"teacher_ppl", "before_ppl", "after_ppl", "train_seconds", "memory_per_worker_bytes"} <= set(summary)


def test_lora_targets_are_found_in_pruned_layers_and_the_merge_keeps_logits_and_shapes(folders):
    student = load_student(folders / "run" / "model")
    shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    linear = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    peft_model = apply_lora(student, rank=4, alpha=8.0)
    lora_a = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == len(linear) == 4 * 7 - 4 - 3  # layer 1 has no attention (4), layer 2 no MLP (3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unmerged = peft_model(input_ids=x).logits
        merged_model = merge_lora(peft_model)
        merged = merged_model(input_ids=x).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert type(merged_model).__name__ == "ProbPrunedLlamaForCausalLM"
    assert {n: tuple(p.shape) for n, p in merged_model.named_parameters()} == shapes
    assert isinstance(merged_model.model.layers[1].self_attn, EmptyAttention)
    assert isinstance(merged_model.model.layers[2].mlp, EmptyMLP)
    with pytest.raises(UserError, match=r"heal.lora_targets=\['qkv_proj'\]"):
        apply_lora(load_student(folders / "run" / "model"), 4, 8.0, ["qkv_proj"])


def test_a_lora_healed_model_saves_reloads_and_exports_with_identical_logits(folders, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from probprune.export import export_gguf

    out = tmp_path / "lora"
    heal(
        _cfg(folders, "heal.method=lora", "heal.lora_rank=4", "heal.tokens=512", "heal.lr=1e-2"),
        folders / "run" / "model",
        out,
        teacher=str(folders / "teacher"),
        progress=False,
    )
    # the model as trained: the student with the checkpoint's adapters, merged in memory
    state = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    in_memory = apply_lora(load_student(folders / "run" / "model"), 4, 32.0)
    with torch.no_grad():
        for n, p in in_memory.named_parameters():
            if p.requires_grad:
                p.copy_(state["model"][n])
    in_memory = merge_lora(in_memory).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = in_memory(input_ids=x).logits
        reloaded = load_pruned(out / "model")
        torch.testing.assert_close(reloaded(input_ids=x).logits, want, rtol=0, atol=0)
        stock = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
        torch.testing.assert_close(stock(input_ids=x).logits, want, rtol=0, atol=0)
    base = load_student(folders / "run" / "model")
    assert not torch.equal(base.model.layers[0].mlp.down_proj.weight, reloaded.model.layers[0].mlp.down_proj.weight)
    res = export_gguf(out / "model", tmp_path / "m.gguf", outtype="f32")
    before = export_gguf(folders / "run" / "model", tmp_path / "before.gguf", outtype="f32")
    assert res["arch"] == before["arch"] == "deci" and res["shapes"] == before["shapes"]  # exported as before
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    np.testing.assert_array_equal(
        tensors["blk.0.ffn_down.weight"].reshape(64, -1), reloaded.model.layers[0].mlp.down_proj.weight.detach().numpy()
    )


def test_resume_after_a_kill_gives_the_weights_of_an_uninterrupted_run(folders, tmp_path):
    cfg = _cfg(folders, "heal.checkpoint_every=5", "heal.grad_accum=2")
    model, teacher = folders / "run" / "model", str(folders / "teacher")
    heal(cfg, model, tmp_path / "a", teacher=teacher, progress=False)

    def kill(step, rec):
        if step == 8:  # between checkpoints (5 and 10): steps 6-8 are lost and recomputed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(cfg, model, tmp_path / "b", teacher=teacher, progress=False, on_step=kill)
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)["step"] == 8  # saved at the interrupt

    def hard_kill(step, rec):
        if step == 7:  # not an interrupt the loop sees (as SIGKILL): nothing is saved
            raise SystemExit(137)

    with pytest.raises(SystemExit):
        heal(cfg, model, tmp_path / "c", teacher=teacher, progress=False, on_step=hard_kill)
    assert torch.load(tmp_path / "c" / CHECKPOINT_NAME, weights_only=False)["step"] == 5

    def early_kill(step, rec):
        if step == 3:  # before the first checkpoint: the folder holds config.yaml and three metrics lines only
            raise SystemExit(137)

    with pytest.raises(SystemExit):
        heal(cfg, model, tmp_path / "e", teacher=teacher, progress=False, on_step=early_kill)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.yaml", "metrics.jsonl"]
    for name in ("b", "c", "e"):
        with pytest.raises(UserError, match="is not empty"):
            heal(cfg, model, tmp_path / name, teacher=teacher, progress=False)
        heal(cfg, model, tmp_path / name, teacher=teacher, progress=False, resume=True)
        a, b = load_pruned(tmp_path / "a" / "model"), load_pruned(tmp_path / name / "model")
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        want = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 13))
        assert [r["loss"] for r in rows] == [r["loss"] for r in want]
    with pytest.raises(UserError, match="other settings"):
        (tmp_path / "d").mkdir()
        torch.save({"fingerprint": "x"}, tmp_path / "d" / CHECKPOINT_NAME)
        heal(cfg, model, tmp_path / "d", teacher=teacher, progress=False, resume=True)


@pytest.mark.ray
def test_two_ray_train_workers_follow_the_loss_curve_of_one_worker(folders, tmp_path, ray_cluster):
    """Same global batch (4 blocks): 1 worker in this process vs 2 Ray Train workers on gloo, 2 blocks each.
    Tolerance: the gradients differ only in float summation order (DDP's all-reduce), 1e-4 relative on the loss."""
    model, teacher = folders / "run" / "model", str(folders / "teacher")
    one = heal(_cfg(folders, "heal.tokens=768"), model, tmp_path / "one", teacher=teacher, progress=False)
    two = heal(
        _cfg(folders, "heal.tokens=768", "heal.workers=2", "engine.cpus_per_actor=0.5"),
        model,
        tmp_path / "two",
        teacher=teacher,
        progress=False,
    )
    curve = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    c1, c2 = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(c1) == len(c2) == 6 and c1[-1] < c1[0]
    np.testing.assert_allclose(c2, c1, rtol=1e-4)
    assert two["workers"] == 2 and two["tokens_seen"] == one["tokens_seen"] == 768
    a, b = load_pruned(tmp_path / "one" / "model"), load_pruned(tmp_path / "two" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


def test_block_stream_is_a_function_of_the_step_only():
    tokens = torch.arange(10 * 8)
    s1, s2 = BlockStream(tokens, 8, seed=3), BlockStream(tokens, 8, seed=3)
    seq = [s1.batch(k, 4) for k in range(6)]  # 24 blocks: more than two epochs of 10
    assert torch.equal(s2.batch(5, 4), seq[5]) and torch.equal(s2.batch(0, 4), seq[0])
    first_epoch = torch.cat(seq)[:10, 0] // 8
    assert sorted(first_epoch.tolist()) == list(range(10))  # every block once per epoch
    assert not torch.equal(BlockStream(tokens, 8, seed=4).batch(0, 4), seq[0])


def test_bad_input_is_refused_with_the_field_named_and_nothing_written(folders, tmp_path, capsys):
    from probprune.cli import main

    base = [
        "heal",
        "--model",
        str(folders / "run" / "model"),
        "--teacher",
        str(folders / "teacher"),
        "data.source=files",
        f"data.paths=[{folders}/doc0.txt]",
        f"data.test_paths=[{folders}/doc2.txt]",
        "heal.block_len=32",
    ]
    other = tiny_model("llama", vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    byte_tokenizer().save_pretrained(tmp_path / "other")
    cases = [
        (["heal.tokens=0"], "heal.tokens=0"),
        (["heal.tokens=64", "--model", str(tmp_path / "missing")], f"--model {tmp_path / 'missing'}: no such folder"),
        (["heal.tokens=64", "--teacher", str(tmp_path / "other")], "its vocabulary has 300 tokens .* has 260"),
        (["heal.tokens=64", "heal.batch_size=3", "heal.grad_accum=2"], r"heal.batch_size \(3\) must be a multiple"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*base, "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert len([x for x in err.splitlines() if x.startswith("probprune: error")]) == 1
        import re

        assert re.search(message, err), err
        assert not out.exists()
    with pytest.raises(UserError, match=r"student .* teacher .* but this machine \(available memory\) has"):
        check_memory({"total": 2**60, "student": 2**59, "teacher": 2**59, "activations": 0}, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"heal.ce_weight must be >= 0, <= 1, got 1.5"):
        load_config(None, ["heal.ce_weight=1.5"])


def test_prune_with_heal_tokens_heals_at_the_end_of_the_run(tmp_path):
    from probprune.pipeline import prune

    cfg = load_config(
        ROOT / "configs" / "tiny" / "smoke.yaml",
        ["heal.tokens=512", "heal.block_len=32", "heal.lr=3e-3", "eval.seq_lens=[32]"],
    )
    summary = prune(cfg, tmp_path / "run", progress=False)
    h = summary["heal"]
    assert h["model"] == "heal/model" and h["tokens_seen"] == 512 and h["steps"] == 4
    assert h["teacher_ppl"] == {"test": summary["dense_ppl"]}  # reused, not re-measured
    assert h["after_ppl"]["test"]["32"] < h["before_ppl"]["test"]["32"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["heal"] == h
    healed = load_pruned(tmp_path / "run" / "heal" / "model")
    assert [p.shape for p in healed.parameters()] == [
        p.shape for p in load_pruned(tmp_path / "run" / "model").parameters()
    ]


def test_the_student_trains_in_float32_even_from_a_bfloat16_folder(tmp_path):
    _, pruned = hetero_tiny()
    save_pruned(pruned.to(torch.bfloat16), tmp_path / "bf16", byte_tokenizer())
    student = load_student(tmp_path / "bf16")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    torch.testing.assert_close(
        student.model.layers[0].mlp.down_proj.weight,
        pruned.model.layers[0].mlp.down_proj.weight.float(),
        rtol=0,
        atol=0,
    )


def test_sigterm_saves_the_last_step_and_the_cli_resumes_to_the_same_weights(folders, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [
        sys.executable,
        "-m",
        "probprune.cli",
        "heal",
        "--quiet",
        "--model",
        str(folders / "run" / "model"),
        "--teacher",
        str(folders / "teacher"),
        "data.source=files",
        f"data.paths=[{folders}/doc0.txt,{folders}/doc1.txt]",
        f"data.test_paths=[{folders}/doc2.txt]",
        "eval.seq_lens=[32]",
        "eval.max_tokens=256",
        "heal.tokens=12800",
        "heal.block_len=32",
        "heal.lr=3e-3",
        "heal.checkpoint_every=1000",
    ]
    subprocess.run([*args, "--output", str(tmp_path / "a")], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*args, "--output", str(tmp_path / "b")], env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 600  # a loaded machine starts the process slowly: wait for steps, not for a time
    while (
        time.time() < deadline
        and proc.poll() is None
        and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5)
    ):
        time.sleep(0.05)
    assert proc.poll() is None and len(metrics.read_text().splitlines()) >= 5, "the heal never reached step 5"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    step = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)["step"]
    assert 5 <= step < 100  # the last whole step, not the (never reached) periodic checkpoint
    subprocess.run([*args, "--output", str(tmp_path / "b"), "--resume"], env=env, check=True, capture_output=True)
    a, b = load_pruned(tmp_path / "a" / "model"), load_pruned(tmp_path / "b" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
