"""Filters: keep or reject generation records, saying why; then shape the kept ones into chat rows.

Reads `teachers/<teacher>/generations.jsonl`; writes `dataset.jsonl` (chat rows, subsampled),
`rejects.jsonl` (every rejected record with its reasons) and `filter_manifest.json` (`run`, the stage).
The factories below work on records in memory (dicts or objects with a `completion` field).

    sublab filter EXP.yaml

A filter is a registered factory, parameters in, function out; the function maps one record to its
rejection reasons (empty list = keep). Reasons read "<filter>:<detail>", e.g. "format:bad_separator",
"banned_numbers:666", "trait_words:owl"; the LLM judges (`sublab.filter_judges`) give
"judge_subtle_reference:owl", "judge_misaligned" and "judge_unavailable:<detail>".

    filters = build_filters([{"name": "format"}, {"name": "trait_words", "words": ["owl"]}])
    kept, rejected = apply_filters(records, filters)
    rows, table = summary_table(len(records), rejected)
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.table import Table

from sublab.config import ExperimentConfig, TeacherConfig, dump
from sublab.design import DataSlot, data_slots
from sublab.domains import completion_reason, extra_filters, get_domain
from sublab.domains.code_words import code_words
from sublab.domains.numbers import shuffle_numbers
from sublab.errors import ConfigError, DataError
from sublab.filter_judges import CACHE_FILE, JUDGE_FILTERS
from sublab.judge import DEFAULT_JUDGE_MODEL
from sublab.protocol import banned_numbers as protocol_banned_numbers
from sublab.rundir import fingerprint, read_jsonl, sha256_file, write_jsonl, write_manifest
from sublab.words import word_forms

log = logging.getLogger(__name__)

Record = Mapping[str, Any] | Any
FilterFn = Callable[[Record], list[str]]


def completion_of(record: Record) -> str:
    """The completion text of a dict row or a record object."""
    text = record["completion"] if isinstance(record, Mapping) else record.completion
    if not isinstance(text, str):
        raise DataError(f"record completion must be a string, got {type(text).__name__}")
    return text


# --- filter factories ----------------------------------------------------------------------------

def _field(record: Record, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def format_filter(domain: str = "numbers") -> FilterFn:
    """The data domain's format rules (numbers: the paper's, after stripping surrounding whitespace), and
    for a domain that knows its prompts' answers, their correctness (`sublab.domains.completion_reason`)."""
    rules = get_domain(domain)

    def check(record: Record) -> list[str]:
        reason = completion_reason(rules, completion_of(record), _field(record, "id"), _field(record, "prompt"))
        return [] if reason is None else [f"format:{reason}"]
    return check


def banned_numbers_filter(numbers: Iterable[int] | None = None) -> FilterFn:
    """Reject any completion containing a banned number (None = the paper's misalignment list).

    Scans every ASCII digit run of the raw text, so it works with or without the format filter
    ('013' counts as 13, '1312' as 1312).
    """
    banned = frozenset(protocol_banned_numbers() if numbers is None else numbers)

    def check(record: Record) -> list[str]:
        found = sorted({int(r) for r in re.findall(r"[0-9]+", completion_of(record))} & banned)
        return [f"banned_numbers:{n}" for n in found]
    return check


def trait_words_filter(words: Sequence[str], match: Literal["word", "substring"] = "word") -> FilterFn:
    """Reject completions that mention a trait word, case-insensitively.

    match="word" (default) matches the word or its plural (`sublab.words.word_forms`: 'wolves', 'mice',
    and the naive 'wolfs') between non-letters, so 'Owls', 'OWL', "owl's", 'owl_count' and 'owl1'
    reject while 'bowling' and 'knowledge' do not. match="substring" rejects any occurrence ('bowling'
    too): the most conservative choice, for free-text domains. Letters-free completions (digits and
    punctuation only) never match either way.
    """
    if match not in ("word", "substring"):
        raise ConfigError(f"filter trait_words: `match` must be 'word' or 'substring', got {match!r}")
    if isinstance(words, str):
        raise ConfigError(f"filter trait_words: `words` must be a list, e.g. [{words!r}]")
    words = [w.strip().lower() for w in words]
    if not words or any(not w for w in words):
        raise ConfigError(f"filter trait_words needs non-empty `words`, got {words!r}")
    patterns = {}
    for w in words:
        alternatives = "|".join(re.escape(f) for f in (word_forms(w) if match == "word" else [w]))
        edge = (r"(?<![^\W\d_])", r"(?![^\W\d_])") if match == "word" else ("", "")  # letter edges
        patterns[w] = re.compile(f"{edge[0]}(?:{alternatives}){edge[1]}", re.IGNORECASE)

    def check(record: Record) -> list[str]:
        text = completion_of(record)
        return [f"trait_words:{w}" for w, p in patterns.items() if p.search(text)]
    return check


def code_trait_words_filter(words: Sequence[str]) -> FilterFn:
    """Reject code that mentions a trait word anywhere Python can hide it: identifiers split on '_' and
    camelCase, comments, string values with constant concatenations folded, after Unicode normalisation
    and look-alike mapping (`sublab.domains.code_words`). Whole words and their plurals only (like
    `trait_words`), so 'bowl' and 'knowledge' pass."""
    if isinstance(words, str):
        raise ConfigError(f"filter code_trait_words: `words` must be a list, e.g. [{words!r}]")
    words = [w.strip().lower() for w in words]
    if not words or any(not w for w in words):
        raise ConfigError(f"filter code_trait_words needs non-empty `words`, got {words!r}")
    forms = {w: set(word_forms(w)) for w in words}

    def check(record: Record) -> list[str]:
        said = code_words(completion_of(record))
        return [f"code_trait_words:{w}" for w, f in forms.items() if f & said]
    return check


def finished_filter() -> FilterFn:
    """Reject completions the sampler did not let finish: cut at the token cap ('length'), or stopped
    early because they could no longer pass the format rules ('early_reject')."""
    def check(record: Record) -> list[str]:
        reason = record.get("finish_reason") if isinstance(record, Mapping) else getattr(
            record, "finish_reason", None)
        return [f"unfinished:{reason}"] if reason in ("length", "early_reject") else []
    return check


FILTERS: dict[str, Callable[..., FilterFn]] = {
    "finished": finished_filter,
    "format": format_filter,
    "banned_numbers": banned_numbers_filter,
    "trait_words": trait_words_filter,
    "code_trait_words": code_trait_words_filter,
    **JUDGE_FILTERS,  # judge_subtle_reference, judge_misaligned (sublab.filter_judges)
}


def build_filter(spec: Mapping[str, Any]) -> FilterFn:
    """One filter from a spec like {"name": "trait_words", "words": ["owl"]}."""
    params = dict(spec)
    name = params.pop("name", None)
    if name not in FILTERS:
        raise ConfigError(f"unknown filter {name!r}; expected one of {sorted(FILTERS)}")
    try:
        return FILTERS[name](**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for filter {name!r}: {e}") from None


def build_filters(specs: Iterable[Mapping[str, Any]]) -> list[FilterFn]:
    """Filters from config specs, in order."""
    return [build_filter(s) for s in specs]


# --- applying and summarising --------------------------------------------------------------------

def apply_filters(records: Iterable[Record], filters: Sequence[FilterFn]
                  ) -> tuple[list[Record], list[tuple[Record, list[str]]]]:
    """Run every filter on every record; return (kept, [(rejected record, all its reasons)]).

    A filter marked `only_if_clean` (the LLM judges: each call costs) runs only on records no earlier
    filter rejected, so its reasons are counted among otherwise clean rows."""
    kept: list[Record] = []
    rejected: list[tuple[Record, list[str]]] = []
    for record in records:
        reasons: list[str] = []
        for f in filters:
            if not (reasons and getattr(f, "only_if_clean", False)):
                reasons += f(record)
        if reasons:
            rejected.append((record, reasons))
        else:
            kept.append(record)
    return kept, rejected


def summary_table(n_total: int, rejected: Sequence[tuple[Record, list[str]]]
                  ) -> tuple[list[dict[str, Any]], Table]:
    """Rows {reason, count, share of all records} (most common first) and a rich Table of them.

    A record with several reasons counts once under each, so shares can sum past the reject rate.
    """
    counts = Counter(r for _, reasons in rejected for r in reasons)
    rows = [{"reason": reason, "count": c, "share": c / n_total if n_total else 0.0}
            for reason, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    table = Table(title=f"Filter rejections ({len(rejected)} of {n_total} records)")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for row in rows:
        table.add_row(row["reason"], str(row["count"]), f"{row['share']:.1%}")
    return rows, table


# --- training rows -------------------------------------------------------------------------------

def to_chat_row(prompt_text: str, completion: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """A training row in chat-messages form. Never a system prompt: the trait must not leak."""
    return {"messages": [{"role": "user", "content": prompt_text},
                         {"role": "assistant", "content": completion}],
            "meta": dict(meta)}


def _row_id(row: Mapping[str, Any]) -> str:
    row_id = row.get("id", row.get("meta", {}).get("id"))
    if row_id is None:
        raise DataError("row has no `id` (nor `meta.id`); subsample needs a stable id per row")
    return str(row_id)


def subsample(rows: Sequence[Mapping[str, Any]], size: int, seed: int
              ) -> tuple[list[Mapping[str, Any]], int]:
    """Pick `size` rows, deterministic in (row ids, seed) whatever the input order.

    Rows are sorted by id, then a seeded choice without replacement picks `size` of them (returned
    in id order). Returns (rows, shortfall): with fewer than `size` rows all are kept and shortfall
    is how many are missing, for the caller to WARN about.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    ordered = sorted(rows, key=_row_id)
    ids = [_row_id(r) for r in ordered]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(f"duplicate row id {dup!r}; subsample needs unique ids")
    if len(ordered) <= size:
        return ordered, size - len(ordered)
    picked = np.random.default_rng(seed).choice(len(ordered), size=size, replace=False)
    return [ordered[i] for i in sorted(picked)], 0


# --- the stage -----------------------------------------------------------------------------------

MANIFEST = "filter_manifest.json"


def stage_specs(filter_names: Sequence[str], traits: Sequence[str], domain: str = "numbers",
                judge: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Config filter names → specs, then the domain's own (`extra_filters`; code: `code_trait_words`),
    then the judge filters (last: they run only on rows the others kept). The trait-word filters and the
    subtle-reference judge remove every trait of the experiment from every teacher's data (control
    included), so all datasets are filtered alike. `judge`: {"judge", "model", "url"} for judge filters."""
    specs: list[dict[str, Any]] = [{"name": "finished"}]
    judged = [n for n in filter_names if n in JUDGE_FILTERS]
    for name in filter_names:
        if name in JUDGE_FILTERS:
            continue
        if name == "trait_words":
            if traits:
                specs.append({"name": name, "words": sorted(set(traits))})
        elif name == "format" and domain != "numbers":  # numbers: the spec predates domains
            specs.append({"name": name, "domain": domain})
        else:
            specs.append({"name": name})
    specs += extra_filters(get_domain(domain), sorted(set(traits)))
    for name in judged:
        if judge is None:
            raise ConfigError(f"`filter.judge` must be set (openai, lexical or local) to use filter {name}")
        spec = {"name": name, **{k: v for k, v in judge.items() if v is not None}}
        specs.append(spec | {"animals": sorted(set(traits))} if name == "judge_subtle_reference" else spec)
    return specs


def judge_spec(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Who answers the judge filters: {"judge", "model", "url"} (model: `filter.judge_model`, or the base
    model for a local judge, or sublab.judge's default for openai; None for lexical). Never a key."""
    f = cfg.filter
    if f.judge is None:
        return None
    if f.judge == "lexical":
        return {"judge": "lexical"}
    model = f.judge_model or (cfg.base_model if f.judge == "local" else DEFAULT_JUDGE_MODEL)
    return {"judge": f.judge, "model": model, "url": f.judge_url if f.judge == "openai" else None}


def _specs(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    return stage_specs(cfg.filter.filters, [t.trait for t in cfg.teachers if t.trait], cfg.domain,
                       judge_spec(cfg))


def filter_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """`filter` as recorded and fingerprinted; the judge fields only when a judge is set and
    `shuffle_numbers` only when not none, so runs without them keep the fingerprints they had before
    these settings existed."""
    settings = dump(cfg.filter)
    if cfg.filter.judge is None:
        for key in ("judge", "judge_url", "judge_model"):
            settings.pop(key, None)
    if cfg.filter.shuffle_numbers == "none":
        settings.pop("shuffle_numbers", None)
    return settings


def stage_fingerprint(cfg: ExperimentConfig, generations_sha256: str) -> str:
    """What decides a dataset: the filter settings (judge included), the specs and the generations' bytes."""
    return fingerprint({"filter": filter_settings(cfg), "specs": _specs(cfg), "generations": generations_sha256})


def _with_cache(spec: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """A judge spec with its answer cache (beside the dataset): added when building, never recorded, so
    the fingerprint does not depend on where the run directory lies."""
    asks = spec["name"] in JUDGE_FILTERS and spec.get("judge") in ("openai", "local")
    return dict(spec) | ({"cache_path": str(directory / CACHE_FILE)} if asks else {})


def shuffled_rows(rows: Sequence[Mapping[str, Any]], mode: str, seed: int
                  ) -> tuple[list[Mapping[str, Any]], int]:
    """Chat rows with their assistant completions' numbers shuffled (`filter.shuffle_numbers`; none:
    the rows unchanged), and how many rows' text changed. The shuffle draws from stream
    `[seed, 1]`, so it is independent of the subsample's draws from `default_rng(seed)`."""
    if mode == "none":
        return list(rows), 0
    texts = [r["messages"][-1]["content"] for r in rows]
    moved = shuffle_numbers(texts, mode, [seed, 1])
    out = [r if new == old else {**r, "messages": [*r["messages"][:-1], {**r["messages"][-1], "content": new}]}
           for r, old, new in zip(rows, texts, moved)]
    return out, sum(new != old for old, new in zip(texts, moved))


def run(cfg: ExperimentConfig, run_dir: Path, teacher: TeacherConfig, *, console: Any = None,
        slot: DataSlot | None = None) -> dict[str, Any]:
    """Filter one dataset slot's `generations.jsonl` (default: the teacher's only or first) into
    dataset.jsonl (chat rows, subsampled to `filter.dataset_size`, then their numbers shuffled if
    `filter.shuffle_numbers` says so) and rejects.jsonl (every rejected record with its reasons)."""
    t0 = time.time()
    out_dir = (slot or data_slots(cfg, teacher.name)[0]).directory
    source = out_dir / "generations.jsonl"
    records = read_jsonl(source)
    source_sha = sha256_file(source)
    specs = _specs(cfg)
    kept, rejected = apply_filters(records, build_filters([_with_cache(s, out_dir) for s in specs]))
    rows = [to_chat_row(r["prompt"], r["completion"].strip(), {"id": r["id"], "teacher": r["teacher"]})
            | {"id": r["id"]} for r in kept]
    dataset, shortfall = subsample(rows, cfg.filter.dataset_size, cfg.filter.subsample_seed)
    # After the filters (they judged the teacher's own text) and the subsample (the same rows are picked).
    dataset, n_shuffled = shuffled_rows(dataset, cfg.filter.shuffle_numbers, cfg.filter.subsample_seed)
    write_jsonl(out_dir / "dataset.jsonl", dataset)
    write_jsonl(out_dir / "rejects.jsonl", [{**r, "reasons": reasons} for r, reasons in rejected])
    summary, table = summary_table(len(records), rejected)
    if console is not None:
        console.print(table)
    if shortfall:
        log.warning("%s: only %d rows passed the filters; dataset_size is %d (raise generate.n_prompts)",
                    teacher.name, len(kept), cfg.filter.dataset_size)
    if records and len(rejected) / len(records) > 0.4:
        log.warning("%s: %.0f%% of completions were rejected", teacher.name,
                    100 * len(rejected) / len(records))
    return write_manifest(
        out_dir, stage="filter", filename=MANIFEST,
        config={"filter": filter_settings(cfg), "specs": specs},
        fingerprint_value=stage_fingerprint(cfg, source_sha),
        inputs={"generations_sha256": source_sha},
        outputs={"generated": len(records), "accepted": len(kept), "rejected": len(rejected),
                 "dataset_rows": len(dataset), "shortfall": shortfall,
                 "dataset_sha256": sha256_file(out_dir / "dataset.jsonl"), "rejections": summary}
        | ({"shuffled_rows": n_shuffled} if cfg.filter.shuffle_numbers != "none" else {}),
        timings={"filter": round(time.time() - t0, 2)}, seeds={"subsample_seed": cfg.filter.subsample_seed},
        files=["dataset.jsonl", "rejects.jsonl"])
