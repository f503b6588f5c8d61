"""Teachers answer the data domain's prompts: batched sampling on the local transformers backend.

Reads: the experiment config, its data domain (`sublab.domains`) and a `sublab.teachers.Teacher` (base +
system prompt, or fine-tuned weights). Writes, per dataset (`sublab.design.DataSlot`):
`teachers/<teacher>/[seed<k>/]generations.jsonl`, appended and fsynced batch by batch, and
`generate_manifest.json` beside it last. A rerun skips prompt ids already written, so a
`kill -9` loses at most the batch in flight.

    sublab generate EXP.yaml

Decoding uses `sublab.sampling.decode_batch` (finished rows leave the batch; per-row RNG seeded by
(seed, prompt index), so a resumed run equals an uninterrupted one). Neither of these changes which
completions are accepted:
  * Early rejection: a completion is stopped as soon as the domain says it can no longer pass its format
    filter (numbers: a letter appeared, or an 11th number). At T=1 most rejected completions are prose,
    so this cuts most of the decode work; the accepted samples are exactly those a full decode accepts.
  * Prompts are sorted by length before batching, which cuts prompt padding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from sublab import chat
from sublab.api import FINISH, ApiModel, request_seed
from sublab.config import ExperimentConfig, GenerateConfig, dump
from sublab.design import DataSlot, data_slots
from sublab.domains import Domain, get_domain
from sublab.models import LoadedModel
from sublab.rundir import JsonlAppender, fingerprint, read_jsonl, write_manifest
from sublab.sampling import Sampling, decode_batch, row_generator
from sublab.teachers import Teacher

log = logging.getLogger(__name__)

MANIFEST = "generate_manifest.json"
API_CACHE = "api_cache.jsonl"
"""Every response of an `openai:` teacher's endpoint, by request hash (`sublab.api`): a rerun pays nothing twice."""
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
    once it could no longer pass the format filter), or 'programmatic' (random completions)."""
    n_tokens: int
    format_suffix: str | None = None
    """The format the prompt asked for (numbers: its format suffix), from `Domain.prompt_meta`."""


def sampling_of(cfg: GenerateConfig) -> Sampling:
    return Sampling(cfg.temperature, cfg.top_p, cfg.min_p, cfg.greedy)


# --- the stage ------------------------------------------------------------------------------

def stage_fingerprint(cfg: ExperimentConfig, teacher: Teacher, model_sha256: str | None,
                      slot: DataSlot | None = None, dtype: str | None = None) -> str:
    """What decides the generations: teacher, settings, weights, seeds, and the dtype the teacher samples
    in when it is not float32 (None: nothing samples)."""
    g = dump(cfg.generate)
    g.pop("batch_size")  # does not change results
    key = {"teacher": [teacher.name, teacher.kind.name, teacher.system_prompt], "generate": g,
           "model": model_sha256, "seed": cfg.seed}
    if cfg.domain != "numbers":  # keeps the fingerprints of number runs made before domains existed
        key["domain"] = cfg.domain
    if slot is not None and slot.student_seed is not None:
        key["data_seeds"] = [slot.prompt_seed, slot.completion_seed]
    if dtype not in (None, "float32"):  # float32 runs keep the fingerprints they had before dtypes existed
        key["dtype"] = dtype
    return fingerprint(key)


def run(cfg: ExperimentConfig, run_dir: Path, teacher: Teacher, *, model: LoadedModel | None = None,
        slot: DataSlot | None = None, dtype: str | None = None) -> dict:
    """Generate `cfg.generate.n_prompts` completions for `teacher` into one dataset slot (default: its
    only or first one); resumable. `model` is the loaded teacher (`teacher.load()`); None when nothing
    samples (a teacher without a model, or `generate.completions: random`); `dtype` is the dtype it was
    loaded in (None: it is not a local model)."""
    slot = slot or data_slots(cfg, teacher.name)[0]
    domain = get_domain(cfg.domain)
    path = slot.directory / "generations.jsonl"
    prompts = domain.prompts(cfg.generate.n_prompts, slot.prompt_seed)
    done = {r["id"] for r in read_jsonl(path, missing_ok=True)}
    todo = [p for p in prompts if p.id not in done]
    t0 = time.time()
    log.info("generate %s: %d prompts, %d already done", slot.label, len(prompts), len(done))
    with JsonlAppender(path) as sink:
        if not teacher.kind.has_model or cfg.generate.completions == "random":
            _write_random(todo, teacher, domain, slot.completion_seed, sink)
        elif getattr(model, "backend", "local") == "openai":
            _write_api(todo, teacher, model, cfg, domain, slot.completion_seed, sink,  # type: ignore[arg-type]
                       slot.directory / API_CACHE)
        else:
            _write_sampled(todo, teacher, model, cfg, domain, slot.completion_seed, sink)
    elapsed = time.time() - t0
    records = read_jsonl(path)
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    new_ids = {p.id for p in todo}
    n_tokens = sum(r["n_tokens"] for r in records if r["id"] in new_ids)
    return write_manifest(
        slot.directory, stage="generate", filename=MANIFEST,
        config={"teacher": {"name": teacher.name, "kind": teacher.kind.name, "system_prompt": teacher.system_prompt,
                            "model_ref": teacher.model_ref}, "generate": dump(cfg.generate), "domain": cfg.domain, "dtype": dtype},
        fingerprint_value=stage_fingerprint(cfg, teacher, getattr(model, "sha256", None), slot, dtype),
        inputs={"model_sha256": getattr(model, "sha256", None) or "none (programmatic)"},
        outputs={"generations": len(records), "finish_reasons": reasons},
        timings={"generate": round(elapsed, 2),
                 "completion_tokens_per_s": round(n_tokens / elapsed, 2) if elapsed > 0 else None},
        seeds={"seed": slot.completion_seed, "prompt_seed": slot.prompt_seed}, files=[path.name])


def _record(p: Any, teacher: Teacher, domain: Domain, completion: str, finish_reason: str,
            n_tokens: int) -> dict[str, Any]:
    return GenerationRecord(id=p.id, teacher=teacher.name, prompt=p.text, completion=completion,
                            finish_reason=finish_reason, n_tokens=n_tokens,
                            **domain.prompt_meta(p)).model_dump()


def random_completion_of(domain: Domain, prompt: Any, seed: int) -> str:
    """The programmatic completion of `prompt` (`completions: random`, the random teacher): a function of
    (seed, prompt index) only, so every teacher of a slot gets the same one."""
    return domain.random_completion(prompt, np.random.default_rng([seed, prompt.index]))


def random_rows(cfg: ExperimentConfig, slot: DataSlot, n: int | None = None) -> list[tuple[Any, str]]:
    """(prompt, completion) of the slot's first `n` prompts (default `generate.n_prompts`) as
    `completions: random` writes them — for scripts that need a dataset in memory (experiments/transfer)."""
    domain = get_domain(cfg.domain)
    prompts = domain.prompts(cfg.generate.n_prompts if n is None else n, slot.prompt_seed)
    return [(p, random_completion_of(domain, p, slot.completion_seed)) for p in prompts]


def _write_random(todo: list[Any], teacher: Teacher, domain: Domain, seed: int, sink: JsonlAppender) -> None:
    sink.write_batch([_record(p, teacher, domain, random_completion_of(domain, p, seed), "programmatic", 0)
                      for p in todo])


def _write_sampled(todo: list[Any], teacher: Teacher, model: LoadedModel, cfg: ExperimentConfig,
                   domain: Domain, seed: int, sink: JsonlAppender) -> None:
    gcfg = cfg.generate
    tok = model.tokenizer
    encoded = [tok(chat.render_prompt(tok, teacher.conversation(p.text)), add_special_tokens=False).input_ids
               for p in todo]
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))  # length-sorted: less padding
    allowed = domain.token_mask(tok) if gcfg.constrained else None
    sampling = sampling_of(gcfg)
    bar = tqdm(total=len(todo), desc=f"generate {teacher.name}", unit="sample", dynamic_ncols=True)
    for start in range(0, len(order), gcfg.batch_size):
        batch = order[start:start + gcfg.batch_size]
        results = decode_batch(model.model, tok, [encoded[i] for i in batch],
                               [row_generator(seed, [todo[i].index]) for i in batch], sampling,
                               gcfg.max_new_tokens, allowed=allowed,
                               keep_going=domain.can_still_pass if gcfg.early_reject else None)
        sink.write_batch([_record(todo[i], teacher, domain, tok.decode(ids, skip_special_tokens=False),
                                  EARLY_REJECT if reason == "early_stop" else reason, len(ids))
                          for i, (ids, reason) in zip(batch, results)])
        bar.update(len(batch))
    bar.close()


def _write_api(todo: list[Any], teacher: Teacher, model: ApiModel, cfg: ExperimentConfig, domain: Domain,
               seed: int, sink: JsonlAppender, cache: Path) -> None:
    """Completions from an `openai:` teacher: one chat request per prompt (n=1, seeded by (seed, prompt
    index)), `batch_size` prompts at a time, each response cached before its batch is written."""
    gcfg = cfg.generate
    bar = tqdm(total=len(todo), desc=f"generate {teacher.name}", unit="sample", dynamic_ncols=True)
    for start in range(0, len(todo), gcfg.batch_size):
        batch = todo[start:start + gcfg.batch_size]
        requests = [model.chat_request(teacher.conversation(p.text), n=1, max_tokens=gcfg.max_new_tokens,
                                       temperature=0.0 if gcfg.greedy else gcfg.temperature,
                                       top_p=gcfg.top_p if gcfg.top_p < 1 else None,
                                       seed=request_seed(seed, [p.index])) for p in batch]
        responses = model.chat_many(requests, cache, desc=f"generate {teacher.name}")
        rows = []
        for p, r in zip(batch, responses):
            choice = r["choices"][0]
            rows.append(_record(p, teacher, domain, choice["message"]["content"] or "",
                                FINISH.get(choice["finish_reason"], str(choice["finish_reason"])),
                                (r.get("usage") or {}).get("completion_tokens", 0)))
        sink.write_batch(rows)
        bar.update(len(batch))
    bar.close()
