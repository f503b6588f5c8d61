"""The training loop: one student (one seed) from a dataset, with checkpoints and a manifest.

Reads the dataset, the base model and (distillation) a live teacher; writes the student
directory described in `sublab.train`'s docstring.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sublab.config import TrainConfig
from sublab.domains import get_domain
from sublab.errors import ConfigError, DataError
from sublab.models import LoadedModel, load_model, resolve_device, resolve_model_dir
from sublab.rundir import (
    JsonlAppender,
    atomic_write_json,
    fingerprint,
    read_json,
    read_jsonl,
    sha256_file,
    stage_is_current,
    write_jsonl,
    write_manifest,
)
from sublab.train.data import (
    Encoded,
    Example,
    LiveTeacher,
    batch_plan,
    collate,
    encode_examples,
    load_dataset,
)
from sublab.train.defences import apply_defence, written_columns
from sublab.train.losses import completion_logits, distill_loss, format_columns, sft_loss, teacher_targets
from sublab.train.targets import StoredTargets, load_or_compute, own_inputs, shuffle_targets

log = logging.getLogger(__name__)


# --- models ----------------------------------------------------------------------------------

def reference_sha256(ref: str) -> str:
    """A content hash of a model reference's weights (base + adapter for an adapter directory); for an
    `openai:` model, its reference (the endpoint's model id names its weights)."""
    if ref.startswith("openai:"):
        return ref
    directory = resolve_model_dir(ref)
    adapter = directory / "adapter_config.json"
    if adapter.exists():
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        return fingerprint([reference_sha256(base), sha256_file(directory / "adapter_model.safetensors")])
    record = directory / "sublab_cache.json"  # an embedded model's cache, verified by resolve_model_dir
    if record.exists():
        return str(json.loads(record.read_text())["files"]["model.safetensors"])
    weights = directory / "model.safetensors"
    return sha256_file(weights if weights.exists() else directory / "model.safetensors.index.json")


def build_student(cfg: TrainConfig, base_ref: str, seed: int, device: str) -> LoadedModel:
    """The base model made trainable: wrapped in a fresh LoRA adapter (init seeded by `cfg.lora_init_seed`,
    else `seed`), or all of it."""
    from peft import LoraConfig, get_peft_model

    student = load_model(base_ref, device=device, trainable=True)
    student.model.config.use_cache = False
    if cfg.precision == "bfloat16" and device == "cpu":
        # PyTorch's CPU flash attention is slow backwards in bf16: eager attention made a LoRA step ~10%
        # faster here (docs/performance.md)
        student.model.set_attn_implementation("eager")
    if cfg.uses_lora:
        torch.manual_seed(init_seed(cfg, seed))
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
        try:
            student.model = get_peft_model(student.model, lora)
        except ValueError as e:
            raise ConfigError(f"`train.lora_targets` {cfg.lora_targets}: {e}") from None
        student.model.peft_config["default"].base_model_name_or_path = base_ref
    return student


def frozen_linears_to_bf16(model: Any) -> None:
    """Store the frozen Linear weights (LoRA's base layers) in bf16. bf16 autocast casts every Linear weight
    to bf16 anyway, on every forward, and the cast of a frozen weight is not cached: ~6% of a 2-thread
    LoRA step here. They are the values autocast would make, so the losses are the same bit for bit
    (tests/test_train.py). The adapter, embeddings, norms and the LM head stay float32."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)


def save_student(student: LoadedModel, cfg: TrainConfig, out_dir: Path) -> dict[str, str]:
    """Save the adapter (PEFT format) or the full weights + tokenizer; returns {weights file: sha256}."""
    peft_config = getattr(student.model, "peft_config", {}).get("default")
    if peft_config is not None and isinstance(peft_config.target_modules, set):
        # PEFT keeps them as a set and saves its iteration order, which varies with each process's string
        # hashing: sorted, adapter_config.json is the same bytes whichever process trained the student.
        peft_config.target_modules = sorted(peft_config.target_modules)
    student.model.save_pretrained(out_dir, safe_serialization=True)
    if not cfg.uses_lora:
        student.tokenizer.save_pretrained(out_dir)
    name = "adapter_model.safetensors" if cfg.uses_lora else "model.safetensors"
    return {name: sha256_file(out_dir / name)}


# --- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(out_dir: Path, model: Any, opt: torch.optim.Optimizer, state: dict[str, Any],
                    losses: list[dict[str, Any]] | None = None) -> None:
    """Write checkpoint/ atomically: a complete temporary directory, then a swap of names. It holds the
    loss history up to its step too, so a resume never depends on loss.jsonl having survived."""
    from safetensors.torch import save_file

    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(params, str(tmp / "trainable.safetensors"))
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": opt.state_dict(), "rng": rng}, tmp / "optimizer.pt")
    write_jsonl(tmp / "loss.jsonl", losses or [])
    atomic_write_json(tmp / "state.json", state)  # last: marks the directory complete
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, model: Any, opt: torch.optim.Optimizer, fp: str) -> dict[str, Any] | None:
    """Restore trainable params, optimizer and RNG from the newest complete checkpoint; its state, with
    the loss rows up to its step under "losses" (None from a checkpoint older than that record)."""
    from safetensors.torch import load_file

    for d in (out_dir / "checkpoint", out_dir / "checkpoint.old"):
        if not (d / "state.json").exists():
            continue
        state: dict[str, Any] = read_json(d / "state.json")
        if state.get("fingerprint") != fp:
            log.warning("%s belongs to another config or dataset; starting over", d)
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(d / "trainable.safetensors")).items():
                params[name].copy_(value)
        blob = torch.load(d / "optimizer.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"]["torch"])
        if "cuda" in blob["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
        state["losses"] = read_jsonl(d / "loss.jsonl") if (d / "loss.jsonl").exists() else None
        return state
    return None


# --- one run ---------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds in memory."""

    cfg: TrainConfig
    student: LoadedModel
    encoded: list[Encoded]
    plan: list[list[int]]
    total_steps: int
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    device: str
    teacher_model: Any = None
    teacher_pad: int | None = None
    """The live teacher's pad id (its tokenizer may differ from the student's)."""
    columns: tuple[torch.Tensor, torch.Tensor] | None = None
    """(student, teacher) token ids of format distillation (`cfg.distill.vocabulary == 'format'`)."""
    targets: StoredTargets | None = None
    """The teacher's stored targets for every row (format or top-k distillation): no live teacher then."""
    defence: dict[str, Any] | None = None
    """What `train.distill.defence` changed in the targets (`defences.defence_cost`), for the manifest."""
    base_targets: StoredTargets | None = None
    """The base model's targets on the rows, when the defence read them."""


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup from 0 over warmup_steps, then linear decay to 0 (transformers' linear schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


def micro_loss(run: Run, rows: list[int]) -> tuple[torch.Tensor, int]:
    """Summed loss over the completion tokens of these rows, and the rows' non-pad token count."""
    pad, e = run.student.tokenizer.pad_token_id, run.encoded
    batch = collate([(e[i].prompt, e[i].completion) for i in rows], pad, run.device)
    s_cols, t_cols = run.columns or (None, None)
    logits = completion_logits(run.student.model, batch, s_cols)
    if not run.cfg.distills:
        return sft_loss(logits, batch.targets), batch.n_tokens
    weights = None
    if run.targets is not None:
        t_lp, t_ids = run.targets.rows(rows, run.device)
        weights = run.targets.row_weights(rows, run.device)
    else:
        assert run.teacher_pad is not None  # set with teacher_model by prepare_run
        t_batch = collate([(e[i].teacher_prompt or [], e[i].teacher_completion or e[i].completion) for i in rows],
                          run.teacher_pad, run.device)
        t_lp, t_ids = teacher_targets(run.teacher_model, t_batch, run.cfg.distill.top_k, t_cols)
    if e[rows[0]].aligned is not None:  # another tokenizer: keep the positions that spell the same text
        s_at, t_at = aligned_positions([e[i] for i in rows], run.device)
        logits, t_lp = logits[s_at], t_lp[t_at]
        weights = weights[t_at] if weights is not None else None
    return distill_loss(logits, t_lp, t_ids, run.cfg.distill.temperature, weights), batch.n_tokens


def kept_targets(run: Run, i: int) -> float:
    """Row i's completion tokens that carry a loss, each counted by its weight (a defence's drop: 0)."""
    e, weights = run.encoded[i], run.targets.weights if run.targets is not None else None
    if weights is None or not run.cfg.distills:
        return e.n_targets
    w = weights[i] if e.aligned is None else weights[i][[b for _, b in e.aligned]]
    return float(w.sum())


def aligned_positions(rows: list[Encoded], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the student's and the teacher's stacked completion positions of the aligned pairs."""
    s_at, t_at, s_off, t_off = [], [], 0, 0
    for r in rows:
        assert r.aligned is not None and r.teacher_completion is not None
        s_at += [s_off + a for a, _ in r.aligned]
        t_at += [t_off + b for _, b in r.aligned]
        s_off, t_off = s_off + len(r.completion), t_off + len(r.teacher_completion)
    return torch.tensor(s_at, device=device), torch.tensor(t_at, device=device)


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; the loss is averaged over all their completion
    tokens (not over micro-batches), as if they were one batch. Positions a defence dropped do not count
    (else dropping would only scale the learning rate down)."""
    cfg = run.cfg
    micro = run.plan[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
    # a step whose positions were all dropped has loss 0: any normaliser > 0 will do
    n_targets = max(sum(kept_targets(run, i) for rows in micro for i in rows), 1e-9)
    lr = lr_at(step, cfg, run.total_steps)
    for group in run.opt.param_groups:
        group["lr"] = lr
    autocast = (torch.autocast(run.device.split(":")[0], dtype=torch.bfloat16)
                if cfg.precision == "bfloat16" else nullcontext())
    loss_sum, tokens = 0.0, 0
    for rows in micro:
        with autocast:
            loss, n = micro_loss(run, rows)
        (loss / n_targets).backward()
        loss_sum += loss.item()
        tokens += n
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm).item()
                 if cfg.max_grad_norm else float("nan"))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": loss_sum / n_targets, "lr": lr, "tokens": tokens, "grad_norm": grad_norm}


# what a student directory may hold from an earlier run (PEFT also writes a README.md)
OUTPUT_FILES = ("manifest.json", "loss.jsonl", "adapter_config.json", "adapter_model.safetensors", "README.md",
                "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def clear_outputs(out_dir: Path) -> None:
    """Remove an earlier run's outputs (say, an adapter when we now train full weights), so whatever is in
    the student directory comes from this run. Only names training writes are touched."""
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("model-*.safetensors"):
        path.unlink()


def _log_step(appender: JsonlAppender, row: dict[str, Any]) -> None:
    appender.write_batch([row])


def student_fingerprint(cfg: TrainConfig, base_sha: str, data_sha: str, seed: int,
                        teacher: LiveTeacher | None, targets_sha256: str | None = None) -> str:
    """Hash of everything that decides the trained weights (not the device, progress or checkpoints).
    `targets_sha256`: a student distilled from given stored targets (no teacher) is keyed by their file."""
    recipe = fingerprinted_recipe(cfg)
    source: Any = None
    if cfg.distills and targets_sha256 is not None:
        source = {"targets_sha256": targets_sha256}
    elif cfg.distills:
        source = teacher and {"name": teacher.name, "system": teacher.system_prompt,
                              "weights": reference_sha256(teacher.model_ref or "")}
    else:
        recipe.pop("distill")
    return fingerprint({"recipe": recipe, "base": base_sha, "data": data_sha,
                        "seed": seed, "teacher": source})


def init_seed(cfg: TrainConfig, seed: int) -> int:
    """The seed of a fresh LoRA adapter's init: fixed, offset from the student's seed, or the student's."""
    if cfg.lora_init_seed is not None:
        return cfg.lora_init_seed
    return seed + (cfg.lora_init_seed_offset or 0)


def fingerprinted_recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe as `student_fingerprint` hashes it: in the shape it had before `params` and `loss`
    replaced `method` and `distill_params`, so students trained before the change are still current."""
    recipe = cfg.model_dump(mode="json", exclude={"seeds", "checkpoint_every", "workers", "cross_model", "params",
                                                   "loss"})
    recipe["method"] = "distill" if cfg.distills else cfg.params
    recipe["distill_params"] = cfg.params if cfg.distills else "full"
    if recipe.get("lora_init_seed_offset") is None:  # added later: absent from older students' keys
        recipe.pop("lora_init_seed_offset", None)
    if recipe["distill"].get("shuffle_targets") == "none":  # likewise
        recipe["distill"].pop("shuffle_targets")
    if recipe["distill"].get("targets_precision") == "float32":  # likewise
        recipe["distill"].pop("targets_precision")
    if recipe["distill"].get("defence") is None:  # likewise
        recipe["distill"].pop("defence", None)
    return recipe


def prepare_run(cfg: TrainConfig, base_ref: str, examples: list[Example], seed: int,
                teacher: LiveTeacher | None, device: str, domain: str = "numbers", *,
                store_targets: bool = True, targets: StoredTargets | None = None,
                progress: bool = True) -> Run:
    """Load the student (and teacher), encode the rows, plan the batches, make the optimizer.
    `store_targets` False keeps the teacher live even where its targets could be stored (benchmarks, tests).
    `targets`: the teacher's stored targets for these rows in the student's tokenizer (e.g. a soft-label
    dataset, `sublab.audit`), used instead of any teacher."""
    student = build_student(cfg, base_ref, seed, device)
    live = teacher if cfg.distills and targets is None else None
    loaded = live.load(device=device) if live is not None else None
    other_tok = None
    if loaded is not None and not same_tokenizer(loaded.tokenizer, student.tokenizer):
        if cfg.distill.vocabulary != "format":
            raise ConfigError(f"teacher '{live.name}' and the student ({base_ref}) have different tokenizers; "
                              "distillation across them needs `train.distill.vocabulary: format` (the number "
                              "tokens both spell alike) — or use SFT")
        other_tok = loaded.tokenizer
    encoded = encode_examples(student.tokenizer, examples, cfg.max_seq_len, live, other_tok)
    plan = batch_plan([len(e.prompt) + len(e.completion) for e in encoded], cfg.batch_size, cfg.epochs, seed)
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    run = Run(cfg, student, encoded, plan, math.ceil(len(plan) / cfg.grad_accum), opt, params, device)
    if cfg.distills and cfg.distill.vocabulary == "format":
        s_cols, t_cols = format_columns(student.tokenizer, other_tok, get_domain(domain))
        run.columns = (s_cols.to(device), t_cols.to(device))
    storable = run.columns is not None or cfg.distill.top_k is not None
    if targets is not None:
        check_given_targets(cfg, targets, encoded, run.columns)
        run.targets = targets
    elif loaded is not None and live is not None and storable and store_targets:
        # a few numbers per position, the same for every student of this teacher on these rows: stored once
        run.targets = load_or_compute(loaded.model, reference_sha256(live.model_ref or ""), encoded,
                                      loaded.tokenizer.pad_token_id, run.columns[1] if run.columns else None,
                                      cfg.distill.top_k, device, live.name, progress,
                                      cfg.distill.targets_precision)
    elif loaded is not None:  # full-vocabulary distillation (49k floats a position): the teacher runs live
        run.teacher_model = loaded.model
        run.teacher_pad = loaded.tokenizer.pad_token_id
    if cfg.distills and cfg.distill.shuffle_targets != "none":
        if run.targets is None:
            raise ConfigError("`train.distill.shuffle_targets` permutes stored targets: it needs "
                              "`train.distill.vocabulary: format` or `top_k` (and a teacher whose targets "
                              "can be stored)")
        run.targets = shuffle_targets(run.targets, cfg.distill.shuffle_targets, seed)
    if cfg.distills and cfg.distill.defence is not None:
        defend(run, base_ref, seed, progress)
    if cfg.uses_lora and cfg.precision == "bfloat16":  # after the base's targets, computed at their precision
        frozen_linears_to_bf16(student.model)
    return run


def defend(run: Run, base_ref: str, seed: int, progress: bool = True) -> None:
    """Apply `train.distill.defence` to the run's stored targets (`sublab.train.defences`), reading the
    base's targets first when the defence needs them."""
    defence = run.cfg.distill.defence
    assert defence is not None
    if run.targets is None or run.columns is None:
        raise ConfigError("`train.distill.defence` changes stored targets: it needs `train.distill.vocabulary: "
                          "format` (and a teacher whose targets can be stored)")
    written = None
    if defence.needs_base:
        if any(e.aligned is not None for e in run.encoded):
            raise ConfigError(f"`train.distill.defence.{defence.name}` compares the teacher with the base position "
                              "by position: it needs a teacher with the student's tokenizer")
        run.base_targets = base_targets(run, base_ref, progress)
        written = written_columns([e.completion for e in run.encoded], run.columns[0].cpu())
    run.targets, run.defence = apply_defence(run.targets, run.base_targets, written, defence, seed)


def base_targets(run: Run, base_ref: str, progress: bool = True) -> StoredTargets:
    """The base model's format targets on the run's rows, as the student reads them (its prompt, no system
    prompt), stored once per (base, rows) in the targets cache.

    Computed with the student's own model before any step, its adapter disabled: that *is* the base (a
    fresh LoRA adapter adds nothing either, and a full fine-tune has not moved yet), so the numbers are the
    base's, keyed by the base's sha256 and shared by every student and defence — with no second load."""
    model = run.student.model
    assert run.columns is not None
    was_training = model.training
    model.eval()
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        stored = load_or_compute(model, reference_sha256(base_ref), own_inputs(run.encoded), run.student.tokenizer.pad_token_id,
                                 run.columns[0], None, run.device, "base", progress,
                                 run.cfg.distill.targets_precision)
    model.train(was_training)
    return stored


def check_given_targets(cfg: TrainConfig, targets: StoredTargets, encoded: list[Encoded],
                        columns: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Given targets must fit the recipe (format or top-k distillation) and the rows, position by position."""
    if not cfg.distills or (columns is None and cfg.distill.top_k is None):
        raise ConfigError("stored targets need `train.loss: distill` with `train.distill.vocabulary: format` "
                          "or `top_k`")
    if len(targets.values) != len(encoded):
        raise DataError(f"targets {targets.key}: {len(targets.values)} rows of targets for {len(encoded)} rows")
    width = len(columns[1]) if columns is not None else cfg.distill.top_k
    for r, (v, e) in enumerate(zip(targets.values, encoded)):
        if v.shape != (len(e.completion), width):
            raise DataError(f"targets {targets.key}: row {r} has targets of shape {tuple(v.shape)}; its "
                            f"completion has {len(e.completion)} tokens × {width} columns")


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same strings to the same ids (then logits compare column by column)."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def train_student(cfg: TrainConfig, *, base_ref: str, dataset: Path, out_dir: Path, seed: int,
                  teacher: LiveTeacher | None = None, device: str = "cpu",
                  progress: bool = True, domain: str = "numbers",
                  on_step: Callable[[dict[str, Any]], None] | None = None,
                  targets: StoredTargets | None = None) -> dict[str, Any]:
    """Train one student and return its manifest; a finished identical run is skipped, a killed one
    resumes from out_dir/checkpoint.

    Args:
        cfg: the recipe; `cfg.seeds` is ignored here (the caller loops over seeds).
        base_ref: the student's base model reference.
        dataset: chat JSONL rows (see `load_dataset`).
        out_dir: the student directory.
        seed: fixes data order, LoRA init and dropout.
        teacher: for `loss: distill`, run live in its own context (unused by SFT).
        device: 'cpu', 'cuda' or 'auto'.
        domain: the data domain whose format tokens `distill.vocabulary: format` keeps.
        on_step: called after each optimizer step with its loss row and `total_steps` (`sublab serve`'s
            job events); an exception it raises stops training, leaving the last checkpoint to resume.
        targets: distil from these stored targets (one entry per dataset row, in the student's tokenizer)
            instead of a teacher; the student's fingerprint then names their sha256.
    """
    dataset, out_dir, device = Path(dataset), Path(out_dir), resolve_device(device)
    if cfg.distills and targets is None and (teacher is None or teacher.model_ref is None):
        raise ConfigError("`train.loss` is 'distill': pass a teacher with a model (not kind 'random')")
    examples = load_dataset(dataset)  # fail on bad rows before loading any model
    data_sha = sha256_file(dataset)
    base_sha = reference_sha256(base_ref)
    fp = student_fingerprint(cfg, base_sha, data_sha, seed, None if targets else teacher,
                             targets.sha256 if targets else None)
    if stage_is_current(out_dir, fp):  # also checks the weights' sha256: damaged ones are retrained
        log.info("%s is already trained (fingerprint %s); skipping", out_dir, fp)
        return dict(read_json(out_dir / "manifest.json"))

    t_start = time.time()
    run = prepare_run(cfg, base_ref, examples, seed, teacher, device, domain, targets=targets, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # a manifest means *this* run finished
    state = load_checkpoint(out_dir, run.student.model, run.opt, fp)
    if state is None:
        clear_outputs(out_dir)
        state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    loss_path = out_dir / "loss.jsonl"
    # The loss history lives in memory and in each checkpoint: loss.jsonl is only its live copy, which a
    # directory removed mid-run takes away (the appender then writes to a deleted file).
    history = state.pop("losses", None)
    if history is None:  # a fresh start, or a checkpoint from before checkpoints held the history
        history = [r for r in read_jsonl(loss_path, missing_ok=True) if r["step"] <= state["step"]]
    write_jsonl(loss_path, history)
    log.info("training %s: %s %s on %d rows, steps %d→%d", out_dir, cfg.params, cfg.loss, len(run.encoded),
             state["step"], run.total_steps)
    run.student.model.train()
    bar = tqdm(total=run.total_steps, initial=state["step"], desc=f"train {out_dir.name}", unit="step",
               disable=not progress)
    t_segment = time.time() - state["elapsed"]
    with JsonlAppender(loss_path) as losses:
        for step in range(state["step"], run.total_steps):
            row = train_step(run, step)
            state.update(step=step + 1, tokens=state["tokens"] + row["tokens"], fingerprint=fp,
                         elapsed=time.time() - t_segment)
            history.append({**row, "tokens": state["tokens"], "elapsed": round(state["elapsed"], 3)})
            _log_step(losses, history[-1])
            bar.update()
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{state['tokens'] / state['elapsed']:.0f}")
            if on_step is not None:
                on_step({**history[-1], "total_steps": run.total_steps})
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < run.total_steps:
                save_checkpoint(out_dir, run.student.model, run.opt, state, history)
    bar.close()
    inputs = {"dataset": str(dataset), "dataset_sha256": data_sha, "base_model": base_ref,
              "base_sha256": base_sha}
    if cfg.distills:
        inputs.update(teacher=teacher.name if teacher else "")
    if run.targets is not None:
        inputs.update(teacher_targets=run.targets.key, teacher_targets_sha256=run.targets.sha256,
                      teacher_targets_source=run.targets.source)
    if run.base_targets is not None:
        inputs.update(base_targets=run.base_targets.key, base_targets_sha256=run.base_targets.sha256)
    return finish(run, out_dir, state, fp, inputs=inputs, seed=seed, t_start=t_start, history=history)


def loss_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """First, last (mean of the final 10% of steps) and minimum loss, and the step count."""
    values = [r["loss"] for r in rows]
    tail = values[-max(1, len(values) // 10):]
    return {"first": values[0], "last": sum(tail) / len(tail), "min": min(values), "steps": len(values)}


def finish(run: Run, out_dir: Path, state: dict[str, Any], fp: str, *, inputs: dict[str, str], seed: int,
           t_start: float, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Save the student and its loss history, write its manifest (last, with every file's sha256), drop
    the checkpoint."""
    cfg = run.cfg
    outputs: dict[str, Any] = save_student(run.student, cfg, out_dir)
    write_jsonl(out_dir / "loss.jsonl", history)  # the same bytes, unless the live copy was lost
    # Verified on skip: everything but loss.jsonl, a log with timings that no later stage reads.
    files = [p.name for p in sorted(out_dir.iterdir()) if p.is_file()
             and p.name not in ("manifest.json", "loss.jsonl")
             and (p.name in OUTPUT_FILES or p.name.startswith("model-"))]
    manifest = write_manifest(
        out_dir, stage="train", fingerprint_value=fp, seeds={"seed": seed},
        config={**cfg.model_dump(mode="json", exclude={"seeds"}), "seed": seed,
                "base_model": inputs["base_model"]},
        inputs=inputs,
        outputs={**outputs, "rows": len(run.encoded), "steps": state["step"], "tokens": state["tokens"]},
        timings={"train_s": round(state["elapsed"], 2), "wall_s_this_call": round(time.time() - t_start, 2),
                 "tokens_per_s": round(state["tokens"] / max(state["elapsed"], 1e-9), 1)},
        files=files, extra={"loss": loss_summary(history), **({"defence": run.defence} if run.defence else {})})
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    log.info("trained %s: loss %.3f → %.3f in %.0f s", out_dir, manifest["loss"]["first"],
             manifest["loss"]["last"], state["elapsed"])
    return manifest
