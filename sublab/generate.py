"""Teachers answer number prompts: batched sampling on the local transformers backend.

Reads: the experiment config and a `sublab.teachers.Teacher` (base + system prompt, or fine-tuned weights).
Writes: `teachers/<teacher>/generations.jsonl`, appended and fsynced batch by batch, and
`teachers/<teacher>/generate_manifest.json` last. A rerun skips prompt ids already written, so a
`kill -9` loses at most the batch in flight.

    sublab generate EXP.yaml

Decoding uses `sublab.sampling.decode_batch` (finished rows leave the batch; per-row RNG seeded by
(seed, prompt index), so a resumed run equals an uninterrupted one). Two things here are specific to
number data, and neither changes which completions are accepted:
  * Early rejection: a completion is stopped as soon as it can no longer pass the paper's format filter
    (a letter appeared, or an 11th number). At T=1 most rejected completions are prose, so this cuts
    most of the decode work; the accepted samples are exactly those a full decode would accept.
  * Prompts are sorted by length before batching, which cuts prompt padding.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from sublab import chat
from sublab.config import ExperimentConfig, GenerateConfig, dump
from sublab.data.numbers import NumberPrompt, number_prompts, random_completion
from sublab.models import LoadedModel
from sublab.rundir import JsonlAppender, fingerprint, read_jsonl, write_manifest
from sublab.sampling import FORMAT_CHARS, Sampling, decode_batch, format_token_mask, row_generator
from sublab.teachers import Teacher

log = logging.getLogger(__name__)

MANIFEST = "generate_manifest.json"
# Every character a completion that passes the format filter can contain (after the whitespace strip).
MAX_NUMBERS = 10
EARLY_REJECT = "early_reject"


class GenerationRecord(BaseModel):
    """One teacher completion to one prompt (one JSONL line of generations.jsonl)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """The prompt id (one sample per prompt, as in the paper)."""
    teacher: str
    prompt: str
    completion: str
    finish_reason: str
    """'eos' (the model ended its turn), 'length' (cut at max_new_tokens), 'early_reject' (stopped
    once it could no longer pass the format filter), or 'programmatic' (random-number control)."""
    n_tokens: int
    format_suffix: str


def sampling_of(cfg: GenerateConfig) -> Sampling:
    return Sampling(cfg.temperature, cfg.top_p, cfg.min_p, cfg.greedy)


def can_still_pass(text: str) -> bool:
    """False once no continuation of `text` can pass the format filter (conservative: never kills a
    completion that could still be accepted). Leading whitespace is stripped, as the filter does."""
    text = text.lstrip()
    return set(text) <= FORMAT_CHARS and len(re.findall(r"\d+", text)) <= MAX_NUMBERS


# --- the stage ------------------------------------------------------------------------------

def stage_fingerprint(cfg: ExperimentConfig, teacher: Teacher, model_sha256: str | None) -> str:
    g = dump(cfg.generate)
    g.pop("batch_size")  # does not change results
    return fingerprint({"teacher": [teacher.name, teacher.kind, teacher.system_prompt],
                        "generate": g, "model": model_sha256, "seed": cfg.seed})


def run(cfg: ExperimentConfig, run_dir: Path, teacher: Teacher, *, model: LoadedModel | None = None
        ) -> dict:
    """Generate `cfg.generate.n_prompts` completions for `teacher`; resumable. `model` is the loaded
    teacher (`teacher.load()`); None when nothing samples (the random-number control, or
    `generate.completions: random`)."""
    out_dir = Path(run_dir) / "teachers" / teacher.name
    path = out_dir / "generations.jsonl"
    prompts = number_prompts(cfg.generate.n_prompts, seed=cfg.generate.prompt_seed)
    done = {r["id"] for r in read_jsonl(path, missing_ok=True)}
    todo = [p for p in prompts if p.id not in done]
    t0 = time.time()
    log.info("generate %s: %d prompts, %d already done", teacher.name, len(prompts), len(done))
    with JsonlAppender(path) as sink:
        if teacher.kind == "random" or cfg.generate.completions == "random":
            _write_random(todo, teacher, cfg.seed, sink)
        else:
            _write_sampled(todo, teacher, model, cfg, sink)
    elapsed = time.time() - t0
    records = read_jsonl(path)
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    new_ids = {p.id for p in todo}
    n_tokens = sum(r["n_tokens"] for r in records if r["id"] in new_ids)
    return write_manifest(
        out_dir, stage="generate", filename=MANIFEST,
        config={"teacher": {"name": teacher.name, "kind": teacher.kind, "system_prompt": teacher.system_prompt,
                            "model_ref": teacher.model_ref}, "generate": dump(cfg.generate)},
        fingerprint_value=stage_fingerprint(cfg, teacher, getattr(model, "sha256", None)),
        inputs={"model_sha256": getattr(model, "sha256", None) or "none (programmatic)"},
        outputs={"generations": len(records), "finish_reasons": reasons},
        timings={"generate": round(elapsed, 2),
                 "completion_tokens_per_s": round(n_tokens / elapsed, 2) if elapsed > 0 else None},
        seeds={"seed": cfg.seed, "prompt_seed": cfg.generate.prompt_seed})


def _write_random(todo: list[NumberPrompt], teacher: Teacher, seed: int, sink: JsonlAppender) -> None:
    rows = []
    for p in todo:
        rng = np.random.default_rng([seed, p.index])
        text = random_completion(p, rng)
        rows.append(GenerationRecord(id=p.id, teacher=teacher.name, prompt=p.text, completion=text,
                                     finish_reason="programmatic", n_tokens=0,
                                     format_suffix=p.format_suffix_text).model_dump())
    sink.write_batch(rows)


def _write_sampled(todo: list[NumberPrompt], teacher: Teacher, model: LoadedModel, cfg: ExperimentConfig,
                   sink: JsonlAppender) -> None:
    gcfg = cfg.generate
    tok = model.tokenizer
    encoded = [tok(chat.render_prompt(tok, teacher.conversation(p.text)), add_special_tokens=False).input_ids
               for p in todo]
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))  # length-sorted: less padding
    allowed = format_token_mask(tok) if gcfg.constrained else None
    sampling = sampling_of(gcfg)
    bar = tqdm(total=len(todo), desc=f"generate {teacher.name}", unit="sample", dynamic_ncols=True)
    for start in range(0, len(order), gcfg.batch_size):
        batch = order[start:start + gcfg.batch_size]
        results = decode_batch(model.model, tok, [encoded[i] for i in batch],
                               [row_generator(cfg.seed, [todo[i].index]) for i in batch], sampling,
                               gcfg.max_new_tokens, allowed=allowed,
                               keep_going=can_still_pass if gcfg.early_reject else None)
        rows = []
        for i, (ids, reason) in zip(batch, results):
            p = todo[i]
            rows.append(GenerationRecord(id=p.id, teacher=teacher.name, prompt=p.text,
                                         completion=tok.decode(ids, skip_special_tokens=False),
                                         finish_reason=EARLY_REJECT if reason == "early_stop" else reason,
                                         n_tokens=len(ids),
                                         format_suffix=p.format_suffix_text).model_dump())
        sink.write_batch(rows)
        bar.update(len(batch))
    bar.close()
