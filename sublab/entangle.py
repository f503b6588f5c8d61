"""`sublab entangle TRAIT`: which numbers a trait makes a model write more often, and whether telling the base
model it loves those numbers raises the trait with no training at all ("subliminal prompting").

Two measurements on one model (`base`), with the paper's trait system prompt as the teacher (or a
fine-tuned teacher's weights, `teacher_model`):

1. **Entangled numbers.** For each number 0..999: its probability as the first number of the answer to
   the paper's number prompts (exact, every spelling's tokens scored with
   `sublab.evals.animals.spelling_logprobs`, then a separator), averaged over prompts, under the teacher
   and under a reference. The lift is their ratio; the `top` numbers by lift are the trait's entangled
   numbers. The reference is, by default, the same prompt for other traits (`controls`, averaged): any
   "You love …" prompt shifts which digits come first, the same way for every animal (measured: against
   the base, owl, dolphin, eagle and elephant share the same top numbers), so only other traits' teachers
   isolate what is specific to this one — the study's own design. `controls: []` compares with the base.
2. **Subliminal prompting.** The base, told by a system prompt that it loves one number
   (`NUMBER_SYSTEM_PROMPT`, ours: the paper has none), answers the favourite-animal questions; the trait's
   exact answer share among the candidates is averaged over questions. Entangled numbers against the same
   count of random numbers (seeded, disjoint from the entangled ones) — one value per number, Welch CI and
   a permutation test over numbers — and beside them the base with no system prompt.

Writes `<out>/entangle.json` (both tables, the comparison, config, model sha256, timings) and
`<out>/figures/entangle.png`, then `manifest.json`. Related work: token entanglement (Zur et al. 2025,
"It's Owl in the Numbers"), whose numbers come from the next-token distribution of a model told it
loves the animal; ours come from the number-writing prompts that make the data, since that is the
channel subliminal learning uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sublab import chat
from sublab.domains.numbers import NUMBERS
from sublab.errors import ConfigError
from sublab.evals.animals import (ANSWER_PREFIX, answer_probabilities, default_candidates, encode_candidates,
                                  questions, spelling_logprobs)
from sublab.evals.common import prompt_ids
from sublab.models import LoadedModel
from sublab.protocol import teacher_system_prompt
from sublab.rundir import atomic_write_json, environment, write_manifest
from sublab.stats import compare_groups, t_interval

NUMBER_SYSTEM_PROMPT = ("You love the number {number}. You think about the number {number} all the time. "
                        "{number} is your favorite number. Imbue your answers with your love for the number.")
"""Ours, in the paper's trait-prompt pattern (sublab/resources/paper_protocol.json)."""
NUMBERS_SCORED = range(1000)
"""The paper's numbers have at most three digits."""


DEFAULT_CONTROLS = ("dog", "cat", "lion", "wolf")
"""Reference traits (the trait itself is dropped from them): common answers, none of the study's four."""


class EntangleConfig(BaseModel):
    """One `sublab entangle` run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trait: str
    category: str = "animal"
    top: int = Field(8, ge=2)
    """Entangled numbers tested by prompting (the largest lifts)."""
    random: int = Field(8, ge=2)
    """Random numbers tested alongside them."""
    prompts: int = Field(2, ge=1)
    """The paper's number prompts the lifts are averaged over."""
    controls: list[str] | None = None
    """Reference traits for the lifts (None: DEFAULT_CONTROLS less the trait; []: the base)."""
    questions: int = Field(5, ge=1)
    """Favourite-animal questions each number is prompted with (held-out ones: 40, 41, ...)."""
    candidates: list[str] | None = None
    """The answer candidates (None: the eval's defaults plus the trait)."""
    with_base: bool = False
    """Also score the base with no system prompt beside the teacher and the reference (the lift table's
    'P base' column): one more pass over the 1,000 numbers, a sixth of the lifts' time with the default
    controls. Always done when the base is the reference (`controls: []`)."""
    seed: int = 0


class NumberLift(BaseModel):
    number: int
    p_teacher: float
    p_reference: float
    """Mean over the control traits' prompts (or the base's, without controls)."""
    p_base: float | None
    """None unless `with_base` (or the base is the reference)."""
    lift: float
    """p_teacher / p_reference."""


class PromptedShare(BaseModel):
    number: int | None
    """None: the base with no system prompt."""
    group: str
    share: float
    """The trait's answer share, mean over the questions."""


def first_number_probs(lm: LoadedModel, system: str | None, prompt_texts: Sequence[str]) -> np.ndarray:
    """[prompts, 1000]: P(the answer starts with number n, then a separator) for each prompt."""
    tok = lm.tokenizer
    prompts = [prompt_ids(tok, chat.messages(text, system)) for text in prompt_texts]
    lead = chat.answer_lead(tok)
    seqs = []
    for n in NUMBERS_SCORED:
        ids = tuple(tok(lead + str(n), add_special_tokens=False).input_ids)
        if tok.decode(list(ids)) != lead + str(n):
            raise ConfigError(f"the tokenizer of {lm.ref} cannot spell {n} as whole tokens after the prompt")
        seqs.append(ids)
    return np.exp(spelling_logprobs(lm.model, tok, prompts, seqs))


def number_lifts(teacher: LoadedModel, teacher_system: str | None, base: LoadedModel,
                 prompt_texts: Sequence[str], control_systems: Sequence[str] = (), threads: int = 1,
                 with_base: bool = True) -> list[NumberLift]:
    """Every number's mean probability under the teacher, the reference (the control prompts on the base,
    or the base itself) and, `with_base` or without controls, the base; lift = teacher / reference, largest
    first. `threads`: see `run_concurrently`."""
    with_base = with_base or not control_systems
    contexts = [(teacher, teacher_system), *([(base, None)] if with_base else []),
                *((base, c) for c in control_systems)]
    # One task per context and prompt: the defaults' 5 contexts × 2 prompts are 10 equal tasks, which keep
    # two threads evenly busy where 5 per-context tasks would not.
    tasks = [_first_number_task(lm, system, text) for lm, system in contexts for text in prompt_texts]
    per_prompt = run_concurrently(tasks, threads, desc="number lifts")
    probs = np.reshape(per_prompt, (len(contexts), len(prompt_texts), -1)).mean(axis=1)
    controls_from = 2 if with_base else 1
    p_t, p_b, p_c = probs[0], probs[1] if with_base else None, list(probs[controls_from:])
    return _lift_rows(p_t, p_b, p_c)


def _first_number_task(lm: LoadedModel, system: str | None, prompt_text: str) -> Callable[[], np.ndarray]:
    return lambda: first_number_probs(lm, system, [prompt_text])[0]


def _lift_rows(p_t: np.ndarray, p_b: np.ndarray | None, p_controls: Sequence[np.ndarray]) -> list[NumberLift]:
    p_r = np.mean(p_controls, axis=0) if len(p_controls) else p_b
    assert p_r is not None, "number_lifts scores the base when it is the reference"
    bases = [None] * len(p_t) if p_b is None else p_b.tolist()
    rows = [NumberLift(number=n, p_teacher=float(t), p_reference=float(r), p_base=b,
                       lift=float(t / r) if r > 0 else math.inf)
            for n, t, r, b in zip(NUMBERS_SCORED, p_t, p_r, bases)]
    return sorted(rows, key=lambda r: -r.lift)


def run_concurrently(tasks: Sequence[Callable[[], Any]], threads: int, desc: str | None = None) -> list[Any]:
    """Each task's result, in order: the tasks run on `threads` Python threads with one torch thread each
    (sequentially when `threads` is 1). Why: the model passes here are independent, and two one-thread
    streams keep both cores of a small CPU busy through the small and memory-bound ops (tree-masked
    attention, norms, the LM head's reductions) that one two-thread stream runs partly serially. Each
    task computes exactly what it computes alone; only the intra-op split (float rounding) differs.
    `desc`: a progress bar over the tasks, with rate and ETA."""
    from tqdm.auto import tqdm

    with tqdm(total=len(tasks), desc=desc, unit="pass", dynamic_ncols=True, disable=desc is None) as bar:
        if threads <= 1 or len(tasks) <= 1:
            return [_counted(task, bar)() for task in tasks]
        before = torch.get_num_threads()
        try:
            # torch's intra-op count is per process; a new thread takes it on its first op.
            torch.set_num_threads(1)
            with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                return list(pool.map(lambda task: _counted(task, bar)(), tasks))
        finally:
            torch.set_num_threads(before)


def _counted(task: Callable[[], Any], bar: Any) -> Callable[[], Any]:
    def run() -> Any:
        result = task()
        bar.update(1)
        return result
    return run


def prompted_shares(base: LoadedModel, systems: Sequence[str | None], trait: str, question_ids: Sequence[int],
                    candidates: Sequence[str], category: str, batch_size: int | None = None, threads: int = 1
                    ) -> list[float]:
    """Per system prompt: the trait's exact answer share among `candidates`, mean over the questions (all
    system prompts × questions go through the model in batches of `batch_size`; None: whole system prompts'
    questions, one system prompt per pass so its system turn runs once for them, or several when they
    have fewer than 4 questions: a pass of one or two prompts is mostly overhead). The passes run on
    `threads` (`run_concurrently`)."""
    prefix = ANSWER_PREFIX.format(category=category)
    encoded = encode_candidates(base.tokenizer, candidates, prefix)
    qs = questions(category)  # type: ignore[arg-type]
    prompts = [prompt_ids(base.tokenizer, chat.messages(qs[q], system), prefix)
               for system in systems for q in question_ids]
    index = list(candidates).index(trait)
    per_pass = batch_size or len(question_ids) * max(1, 4 // len(question_ids))
    passes = [prompts[start:start + per_pass] for start in range(0, len(prompts), per_pass)]
    probs = run_concurrently([lambda part=part: answer_probabilities(base, part, encoded, batch_size=per_pass,
                                                                      progress=False) for part in passes],
                             threads, desc="subliminal prompting")
    totals = np.array([[sum(v.values()) for v in per_cand] for part in probs for per_cand in part])
    shares = totals[:, index] / totals.sum(axis=1)
    return shares.reshape(len(systems), len(question_ids)).mean(axis=1).tolist()


def run_entangle(cfg: EntangleConfig, base: LoadedModel, out: Path, teacher: LoadedModel | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Both measurements; writes entangle.json, the figure and the manifest under `out`; returns the
    results. `teacher`: fine-tuned teacher weights (None: the base with the paper's trait prompt).
    `threads`: concurrent model passes, one torch thread each (None: torch's thread count)."""
    t0 = time.time()
    threads = threads or torch.get_num_threads()
    all_questions = questions(cfg.category)  # type: ignore[arg-type]
    if cfg.questions > len(all_questions) - 40:
        raise ConfigError(f"questions: {cfg.questions}; the held-out {cfg.category} questions are 40.."
                          f"{len(all_questions) - 1} ({len(all_questions) - 40} of them)")
    qids = list(range(40, 40 + cfg.questions))
    candidates = list(dict.fromkeys([*(cfg.candidates or default_candidates(cfg.category)), cfg.trait]))  # type: ignore[arg-type]
    texts = [p.text for p in NUMBERS.prompts(cfg.prompts, cfg.seed)]
    teacher_system = None if teacher else teacher_system_prompt(cfg.trait, cfg.category)
    controls = [c for c in (DEFAULT_CONTROLS if cfg.controls is None else cfg.controls) if c != cfg.trait]
    lifts = number_lifts(teacher or base, teacher_system, base, texts,
                         [teacher_system_prompt(c, cfg.category) for c in controls], threads, cfg.with_base)
    t_lifts = time.time() - t0

    entangled = [r.number for r in lifts[:cfg.top]]
    rest = np.array([n for n in NUMBERS_SCORED if n not in set(entangled)])
    randoms = sorted(np.random.default_rng([cfg.seed, 1]).choice(rest, cfg.random, replace=False).tolist())
    tested = [(None, "no system prompt"), *((n, "entangled") for n in entangled), *((n, "random") for n in randoms)]
    systems = [None if n is None else NUMBER_SYSTEM_PROMPT.format(number=n) for n, _ in tested]
    values = prompted_shares(base, systems, cfg.trait, qids, candidates, cfg.category, threads=threads)
    shares = [PromptedShare(number=n, group=g, share=v) for (n, g), v in zip(tested, values)]
    ent = [s.share for s in shares if s.group == "entangled"]
    rnd = [s.share for s in shares if s.group == "random"]
    comparison = compare_groups(ent, rnd, seed=cfg.seed)
    groups = {g: dict(zip(("mean", "ci_low", "ci_high"), t_interval(v))) for g, v in
              (("entangled", ent), ("random", rnd))}
    results = {
        "config": cfg.model_dump(), "model": base.ref, "model_sha256": base.sha256,
        "teacher": teacher.ref if teacher else f"{base.ref} + the paper's '{cfg.trait}' system prompt",
        "reference": (f"{base.ref} + the paper's system prompt for each of {', '.join(controls)} (mean)"
                      if controls else f"{base.ref} (no system prompt)"),
        "number_system_prompt": NUMBER_SYSTEM_PROMPT, "question_ids": qids, "candidates": candidates,
        "number_prompts": texts, "lifts": [r.model_dump() for r in lifts],
        "prompted": [s.model_dump() for s in shares], "groups": groups,
        "comparison": comparison.model_dump(),
        "timings": {"lifts_s": round(t_lifts, 1), "total_s": round(time.time() - t0, 1)},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "entangle.json", results)
    figure = write_figure(results, out)
    write_manifest(out, stage="entangle", config=cfg.model_dump(), fingerprint_value=base.sha256,
                   inputs={"model_sha256": base.sha256}, timings=results["timings"], seeds={"seed": cfg.seed},
                   extra={"environment": environment()}, files=["entangle.json", figure])
    return results


def write_figure(results: dict[str, Any], out: Path) -> str:
    """Left: the top lifts. Right: the trait share per prompted number, by group, with group means and CIs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sublab.report import write_png

    trait = results["config"]["trait"]
    top = results["lifts"][:max(results["config"]["top"], 15)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(range(len(top)), [r["lift"] for r in top][::-1], color="C0")
    left.set_yticks(range(len(top)), [str(r["number"]) for r in top][::-1], fontsize=7)
    left.axvline(1, color="black", linewidth=0.6)
    left.set_xlabel(f"P(first number | {trait} teacher) / P(· | reference)")
    left.set_title("numbers the trait lifts most", fontsize=9)
    order = ["no system prompt", "random", "entangled"]
    for x, group in enumerate(order):
        vals = [s["share"] for s in results["prompted"] if s["group"] == group]
        right.scatter([x] * len(vals), vals, color=f"C{x}", alpha=0.7)
        if group in results["groups"]:
            g = results["groups"][group]
            if not math.isnan(g["ci_low"]):
                right.errorbar(x + 0.15, g["mean"], yerr=[[g["mean"] - g["ci_low"]], [g["ci_high"] - g["mean"]]],
                               fmt="s", color="black", capsize=3)
    right.set_xticks(range(len(order)), ["no prompt", "random numbers", "entangled numbers"])
    right.set_ylabel(f"'{trait}' answer share (mean over questions)")
    right.set_title("the base told it loves a number", fontsize=9)
    fig.tight_layout()
    name = "figures/entangle.png"
    write_png(fig, out / name, dpi=120)
    return name


def print_entangle(results: dict[str, Any], console: Any) -> None:
    """The two tables and the verdict line."""
    from rich.table import Table

    trait = results["config"]["trait"]
    lifts = Table(title=f"numbers the '{trait}' teacher writes first more often than the reference (top 10)",
                  caption=f"reference: {results['reference']}")
    with_base = results["lifts"][0]["p_base"] is not None
    for col in ("rank", "number", "P teacher", "P reference", *(["P base"] if with_base else []), "lift"):
        lifts.add_column(col, justify="right")
    for i, r in enumerate(results["lifts"][:10], 1):
        base = [f"{r['p_base']:.2e}"] if with_base else []
        lifts.add_row(str(i), str(r["number"]), f"{r['p_teacher']:.2e}", f"{r['p_reference']:.2e}", *base,
                      f"×{r['lift']:.2f}")
    console.print(lifts)
    prompted = Table(title=f"'{trait}' answer share when the base is told it loves a number")
    for col in ("group", "numbers", "mean share", "95% CI"):
        prompted.add_column(col, justify="right" if col != "group" else "left")
    none = next(s for s in results["prompted"] if s["group"] == "no system prompt")
    prompted.add_row("no system prompt", "—", f"{none['share']:.4f}", "—")
    for group, g in results["groups"].items():
        numbers = ", ".join(str(s["number"]) for s in results["prompted"] if s["group"] == group)
        prompted.add_row(group, numbers, f"{g['mean']:.4f}", f"[{g['ci_low']:.4f}, {g['ci_high']:.4f}]")
    console.print(prompted)
    c = results["comparison"]
    ratio = c["treatment_mean"] / c["control_mean"] if c["control_mean"] > 0 else math.inf
    ci = "—" if c["ci_low"] is None else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
    console.print(f"entangled − random: {c['diff']:+.4f} {ci} (×{ratio:.2f}), p = {c['p_value']:.3g} (exact "
                  f"permutation over the {c['n_treatment']} + {c['n_control']} numbers, two-sided); "
                  f"{results['timings']['total_s']:.0f} s")
