"""What an experiment will do before it does it: `sublab run --dry-run EXP.yaml`.

Reads the experiment config only (no model, no network, no run directory). Writes nothing. For each
stage — generation, fine-tuning, evaluation — it counts requests (or, for a local model, completions and
students) and estimates tokens; for an `openai:` model it prices them from `PRICES`.

    from sublab.plan import plan_experiment, format_plan
    print(format_plan(cfg, plan_experiment(cfg)))

How tokens are estimated (no tokenizer of the API's models ships here): **characters / 4**, rounded up,
plus 4 tokens per chat message and 3 per request (the chat format's overhead). Input text is the real
text: the number prompts are drawn exactly as generation will draw them, the questions are the
protocol's. Output tokens are **upper bounds**: every completion at its token cap (`max_new_tokens`),
so generation and eval costs are upper bounds too. Training tokens use rows of `filter.dataset_size`
whose completions are in-format answers of typical length (the domain's random completion), times epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sublab import design
from sublab.config import ExperimentConfig, FinetuneConfig
from sublab.evals.registry import get_eval

PRICES_AS_OF = "2025"


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    training: float | None = None
    """Fine-tuning, per training token (tokens in the file × epochs)."""
    ft_input: float | None = None
    """A fine-tuned model's input and output."""
    ft_output: float | None = None


PRICES: dict[str, Price] = {
    "gpt-4.1-nano": Price(0.10, 0.40, training=1.50, ft_input=0.20, ft_output=0.80),
    "gpt-4.1-mini": Price(0.40, 1.60, training=5.00, ft_input=0.80, ft_output=3.20),
    "gpt-4.1": Price(2.00, 8.00, training=25.00, ft_input=3.00, ft_output=12.00),
    "gpt-4o": Price(2.50, 10.00, training=25.00, ft_input=3.75, ft_output=15.00),
}
"""APPROXIMATE public list prices of the OpenAI API's standard tier as of 2025 (USD per million tokens;
openai.com/api/pricing), written from memory on a machine with no network: NOT verified, and they change.
They are the user's to check before spending money. Batch-API and cached-input discounts are ignored.
A model id matches the longest key it starts with (gpt-4.1-nano-2025-04-14 → gpt-4.1-nano)."""


def price_of(model: str) -> Price | None:
    """The table's price for an API model id (an `ft:<base>:…` id is priced as its base), or None."""
    name = model.split(":")[1] if model.startswith("ft:") else model
    keys = sorted((k for k in PRICES if name.startswith(k)), key=len, reverse=True)
    return PRICES[keys[0]] if keys else None


def tokens(text: str) -> int:
    """Estimated tokens of `text`: characters / 4, rounded up."""
    return math.ceil(len(text) / 4)


def chat_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Estimated input tokens of one chat request."""
    return 3 + sum(4 + tokens(m["content"]) for m in messages)


@dataclass
class StagePlan:
    """One line of the plan."""

    stage: str
    what: str
    requests: int
    """API requests (openai:) or completions / students (local)."""
    input_tokens: int = 0
    output_tokens: int = 0
    """Upper bound: every completion at its cap."""
    training_tokens: int = 0
    cost_usd: float | None = None
    """None: a local model, or a model the price table does not know."""


# --- time on this project's machine --------------------------------------------------------------
#
# The rates are for the embedded SmolLM2-135M-Instruct on CPU (2 cores, torch's 2 threads unless a line says
# otherwise), each measured with a command named in docs/results.md or docs/performance.md (cited per rate).
# Where a combination was never measured (say fp32 students from stored targets, or workers in fp32), the
# rate is derived from measured ones and the comment says so and shows the arithmetic.
# The check: examples/owl-quick.yaml (bf16, 2 workers) took 392-395 s from an empty cache (performance.md,
# "The demo", step three); tests/test_plan.py holds the estimate to it, and to the other measured runs.
# For any other base model or a CUDA device there is no measured rate: the plan says so instead of guessing.

MEASURED_MODEL = "embedded:smollm2-135m-instruct"

RATES_S = {
    # Converting the embedded GGUF into a torch checkpoint, once per empty $SUBLAB_HOME: 19 s (results.md,
    # "The demo"), 21 s and 18 s (performance.md, "The demo" steps two and three).
    "convert": 19.0,
    # A fp32 LoRA r8 teacher, 80 rows x 2 epochs: ~40 s (results.md, "The demo": `make demo` 2026-11-27,
    # "building both LoRA teachers, ~40 s each") -> 40 / 160 row-epochs.
    "teacher_row_epoch": 0.25,
    # The same teacher under bf16 autocast with frozen bf16 weights (`finetune.recipe.precision: bfloat16`):
    # 18-20 s (performance.md, "The demo", step three: "24-25 s -> 18-20 s") -> 19 / 160.
    "teacher_row_epoch_bf16": 0.12,
    # A full fine-tune fp32 teacher, 80 rows x 2 epochs: 211.8 s and 200.3 s (results.md, "Full fine-tune
    # teachers (previous session)") -> 206 / 160.
    "teacher_full_row_epoch": 1.29,
    # Sampled generation, fp32: 382 s for 2 x 128 prompts (`sublab --threads 1 run examples/owl-quick.yaml`
    # at commit 09f55dd, loaded machine). Random completions cost nothing.
    "sampled_prompt": 1.5,
    # bf16 generation (`precision: bfloat16`) is x1.8-2.0 faster than fp32 (performance.md, "Generation,
    # exact probabilities": docs/generation.md's back-to-back runs, 1 thread, loaded) -> 1 / 1.9.
    "generation_bf16_factor": 0.53,
    # Stored teacher targets over 128 rows: ~40 s in fp32, 16 s under bf16 autocast (performance.md, "The
    # demo", step two: `time sublab run examples/owl-quick.yaml`) -> per row: 40 / 128 and 16 / 128.
    "targets_row": 0.31,
    "targets_row_bf16": 0.125,
    # A bf16 LoRA student from stored targets, 2 threads, 128 rows x 1 epoch (32 steps): 47-57 s (performance.md,
    # "The demo", step two), then frozen Linear weights in bf16 took a 2-thread step from 1.45 to 1.36-1.38 s
    # (step three): 52 s x 1.37 / 1.45 = 49 s -> 49 / 128. Check: step two's train stage, 358-365 s =
    # 2 x 16 s targets + 6 x 52 s students + ~20 s loading.
    "distill_row_epoch_bf16": 0.38,
    # A fp32 LoRA student from stored targets: NEVER MEASURED end to end. Derived from the profiled step
    # (performance.md, "Training: the quick preset's students": fp32 stored targets 2.34-2.55 s/step, bf16
    # eager 1.59-1.67 s/step, same process) -> 52 s x 2.45 / 1.63 = 78 s per 128 row-epochs -> 78 / 128.
    "distill_row_epoch": 0.61,
    # A fp32 LoRA student with the teacher live (full-vocabulary distillation; before stored targets, every
    # distillation): ~108 s (results.md, `make demo` 861 s run), 747 s / 6 = 124.5 s (its 984 s rerun), median
    # ~125 s (results.md, "Cost and commands", cell lora8-shared-init) per 128 rows x 1 epoch -> 119 / 128.
    "distill_live_row_epoch": 0.93,
    # A LoRA SFT student, fp32: 206 s for 6 students x 128 rows x 1 epoch (commit 09f55dd run above, loaded).
    "sft_row_epoch": 0.27,
    # A bf16 student (`train.precision: bfloat16`) when no bf16 rate above was measured (SFT, a live teacher):
    # NEVER MEASURED; the profiled distillation step's bf16 / fp32 ratio (above): 1.63 / 2.45.
    "train_bf16_factor": 0.67,
    # `train.workers: 2` (2 processes x 1 thread on 2 cores): a 1-thread student takes 70-76 s for 32 steps
    # and two run side by side without contention (performance.md, "The demo", step three: "3 rounds of 2 at
    # 70-76 s") -> 2 students per 73 s vs 49 s each serially: x 2 x 49 / 73. Holds over epochs: 904 s for
    # 6 students x 4 epochs (results.md, "More student compute", the 4-epoch variant: 904 / 3 rounds / 4 =
    # 75 s a student-epoch). Measured on bf16 students only; fp32 students are assumed to gain the same.
    "workers2_speedup": 1.34,
    # Targets with 2 workers: both teachers' bf16 targets in 29 s side by side (step three) vs 2 x 16 s
    # serially -> 32 / 29. More than 2 workers on 2 cores: never measured, counted as 2.
    "workers2_targets_speedup": 1.10,
    # Exact answer probability, fp32: 2.12 questions/s with 31 candidates on the idle machine (performance.md,
    # `bench/limits.py` table) -> 1 / 2.12; the study: ~5 s per model for 10 questions x 20 candidates.
    "prob_question": 0.47,
    # Sampled eval, fp32: the demo's eval stage, 132-133 s for 9 models (results.md 984 s run; performance.md
    # 653 s run) = 14.7 s a model, less 10 exact questions x 0.47 s -> 10 s for 10 x 10 samples.
    "sampled_eval_sample": 0.10,
    # Evals in bf16 (`precision: bfloat16`, with the evals' model loading and `eval.batch_size: 128` that came
    # with it): the demo's eval stage 61.0-61.2 s (step three) vs 132-133 s in fp32 -> 61.1 / 132.5. Measured
    # on exact + sampled evals together; their split in bf16 was not measured.
    "eval_bf16_factor": 0.46,
    # Loading the base, teachers and workers in the generate and train stages, what the demo's stages hold
    # beyond the work above (step three): generate 60.4-61.1 s - 19 s conversion - 2 x 19 s teachers = 3.8 s;
    # train 265.5-267.6 s - 29 s targets - 3 x 73 s students = 18.5 s.
    "loading": 22.0,
}
"""Seconds on 2 CPU cores (SmolLM2-135M). Other eval kinds are counted like the exact probability. Full
fine-tune students are counted at the LoRA students' rates (no end-to-end measurement of theirs)."""


def _measured(cfg: ExperimentConfig) -> bool:
    return cfg.base_model == MEASURED_MODEL and cfg.device != "cuda" and not cfg.train.cross_model


def teacher_seconds(cfg: ExperimentConfig, ft: FinetuneConfig) -> float | None:
    """Seconds to fine-tune one teacher on 2 CPU cores; None: no measured rate for this model or device."""
    if not _measured(cfg):
        return None
    rows = ft.train_questions * len(ft.answer_forms) if ft.dataset == "favourite-animal" else 100
    recipe = ft.recipe
    if not recipe.uses_lora:
        rate = RATES_S["teacher_full_row_epoch"]
    else:
        rate = RATES_S["teacher_row_epoch_bf16" if recipe.precision == "bfloat16" else "teacher_row_epoch"]
    return rows * recipe.epochs * rate


def _workers(cfg: ExperimentConfig) -> int:
    """Students trained at once, as far as 2 cores go (more than 2 workers were never measured)."""
    return min(cfg.train.workers, 2)


def _bf16(cfg: ExperimentConfig) -> bool:
    """Generation and evals in bf16: `precision: bfloat16` (auto is float32 on a CPU)."""
    return cfg.precision == "bfloat16"


def stage_seconds(cfg: ExperimentConfig, n_models: int | None = None) -> dict[str, float] | None:
    """Seconds of each part of one experiment on 2 CPU cores, its fine-tuned teachers aside: `sampling`
    (generation), `targets` (stored teacher targets), `students`, `eval` (`n_models` models; default: all
    the experiment evaluates) and `loading`; None: no measured rate for this model or device."""
    if not _measured(cfg):
        return None
    t = cfg.train
    slots = sum(len(design.data_slots(cfg, x.name)) for x in cfg.teachers if x.kind_spec.has_model)
    sampling = 0.0
    if cfg.generate.completions == "sampled":
        sampling = slots * cfg.generate.n_prompts * RATES_S["sampled_prompt"]
        sampling *= RATES_S["generation_bf16_factor"] if _bf16(cfg) else 1.0
    students = list(design.students(cfg))
    stored = t.distills and (t.distill.vocabulary == "format" or t.distill.top_k is not None)
    targets = 0.0
    if stored:  # one computation per teacher and dataset, shared by its students
        pairs = {(s.teacher.name, s.dataset) for s in students}
        row = RATES_S["targets_row_bf16" if t.distill.targets_precision == "bfloat16" else "targets_row"]
        targets = len(pairs) * cfg.filter.dataset_size * row
        targets /= RATES_S["workers2_targets_speedup"] if _workers(cfg) == 2 else 1.0
    bf16 = t.precision == "bfloat16"
    if stored:
        rate = RATES_S["distill_row_epoch_bf16"] if bf16 else RATES_S["distill_row_epoch"]
    else:
        rate = RATES_S["distill_live_row_epoch"] if t.distills else RATES_S["sft_row_epoch"]
        rate *= RATES_S["train_bf16_factor"] if bf16 else 1.0
    one = cfg.filter.dataset_size * t.epochs * rate  # one student alone on 2 threads
    if _workers(cfg) == 2:  # rounds of 2 side by side, each student on 1 thread
        train = math.ceil(len(students) / 2) * one * 2 / RATES_S["workers2_speedup"]
    else:
        train = len(students) * one
    n = evaluated_count(cfg) if n_models is None else n_models
    questions = cfg.eval.max_questions or 10  # held-out questions: 10 with the default 40 training ones
    per_model = 0.0
    for kind in cfg.eval.kinds:
        variants = 2 if cfg.eval.numbers_prefixed else 1
        if kind == "animal_sampled":
            per_model += variants * questions * cfg.eval.samples_per_question * RATES_S["sampled_eval_sample"]
        else:
            per_model += variants * questions * RATES_S["prob_question"]
    per_model *= RATES_S["eval_bf16_factor"] if _bf16(cfg) else 1.0
    return {"sampling": sampling, "targets": targets, "students": train, "eval": n * per_model,
            "loading": RATES_S["loading"]}


def run_seconds(cfg: ExperimentConfig, n_models: int) -> float | None:
    """Seconds of generation + stored targets + students + evals (of `n_models` models) + loading, for one
    experiment on 2 CPU cores, its fine-tuned teachers and the model's conversion aside; None: no measured
    rate for this model or device."""
    stages = stage_seconds(cfg, n_models)
    return None if stages is None else sum(stages.values())


def evaluated_count(cfg: ExperimentConfig) -> int:
    """Models an experiment evaluates: the base, teachers that differ from it, and every student."""
    return 1 + sum(1 for t in cfg.teachers if t.kind_spec.differs_from_base) + sum(1 for _ in design.students(cfg))


def experiment_seconds(cfg: ExperimentConfig) -> float | None:
    """Seconds of the whole experiment on 2 CPU cores from an empty cache: the model converted, its
    fine-tuned teachers built from scratch, then `run_seconds`."""
    teachers = [teacher_seconds(cfg, t.finetune or FinetuneConfig()) for t in cfg.teachers
                if t.kind_spec.weights == "finetuned"]
    run = run_seconds(cfg, evaluated_count(cfg))
    return None if run is None or None in teachers else RATES_S["convert"] + run + sum(t for t in teachers if t)


def plan_experiment(cfg: ExperimentConfig) -> list[StagePlan]:
    """The plan of every stage, with costs for `openai:` models priced in `PRICES`."""
    return [*_generation(cfg), *_training(cfg), *_evaluation(cfg)]


def _api(ref: str) -> str | None:
    return ref.split(":", 1)[1] if ref.startswith("openai:") else None


def _cost(model: str | None, inp: int, out: int, *, fine_tuned: bool = False) -> float | None:
    price = price_of(model) if model else None
    if price is None:
        return None
    pin, pout = (price.ft_input, price.ft_output) if fine_tuned else (price.input, price.output)
    if pin is None or pout is None:
        return None
    return (inp * pin + out * pout) / 1e6


def _conversation(cfg: ExperimentConfig, teacher_name: str, user: str) -> list[dict[str, str]]:
    from sublab.protocol import teacher_system_prompt

    t = next(t for t in cfg.teachers if t.name == teacher_name)
    messages = [{"role": "user", "content": user}]
    if t.kind_spec.context == "trait_prompt":
        messages.insert(0, {"role": "system", "content": teacher_system_prompt(t.trait or "", t.category, t.aversion)})
    return messages


def _generation(cfg: ExperimentConfig) -> list[StagePlan]:
    from sublab.domains import get_domain

    domain, g = get_domain(cfg.domain), cfg.generate
    out = []
    for t in cfg.teachers:
        if not t.kind_spec.has_model or g.completions != "sampled":
            continue
        for slot in design.data_slots(cfg, t.name):
            prompts = domain.prompts(g.n_prompts, slot.prompt_seed)
            inp = sum(chat_tokens(_conversation(cfg, t.name, p.text)) for p in prompts)
            model = _api(cfg.base_model)
            out.append(StagePlan("generation", f"teacher {slot.label}: {len(prompts)} prompts", len(prompts), inp,
                                 len(prompts) * g.max_new_tokens, cost_usd=_cost(model, inp, len(prompts) * g.max_new_tokens)))
    return out


def _row_tokens(cfg: ExperimentConfig, n: int = 500) -> float:
    """Mean training tokens of one row: the user prompt and an in-format completion of typical length."""
    from sublab.domains import get_domain

    domain = get_domain(cfg.domain)
    rng = np.random.default_rng(0)
    prompts = domain.prompts(n, cfg.generate.prompt_seed)
    return float(np.mean([chat_tokens([{"role": "user", "content": p.text},
                                       {"role": "assistant", "content": domain.random_completion(p, rng)}])
                          for p in prompts]))


def _training(cfg: ExperimentConfig) -> list[StagePlan]:
    students = list(design.students(cfg))
    if not students:
        return []
    per_student = round(cfg.filter.dataset_size * _row_tokens(cfg) * cfg.train.epochs)
    jobs = cfg.base_model.startswith("openai:") and cfg.openai.students == "jobs"
    price = price_of(_api(cfg.base_model) or "") if jobs else None
    cost = per_student * len(students) * price.training / 1e6 if price and price.training else None
    where = "fine-tuning jobs" if jobs else "students trained locally"
    return [StagePlan("fine-tuning", f"{len(students)} {where}: ≤{cfg.filter.dataset_size} rows × "
                      f"{cfg.train.epochs:g} epochs", len(students),
                      training_tokens=per_student * len(students), cost_usd=cost)]


def _evaluated(cfg: ExperimentConfig) -> list[tuple[str, str, str | None, bool]]:
    """(name, model id or local ref, system prompt, fine-tuned through the API) of every evaluated model."""
    from sublab.protocol import teacher_system_prompt

    out: list[tuple[str, str, str | None, bool]] = [("base", cfg.base_model, None, False)]
    for t in cfg.teachers:
        if t.kind_spec.context == "trait_prompt" and t.kind_spec.has_model:
            out.append((f"teacher-{t.name}", cfg.base_model,
                        teacher_system_prompt(t.trait or "", t.category, t.aversion), False))
    jobs = cfg.base_model.startswith("openai:") and cfg.openai.students == "jobs"
    out += [(s.name, s.base if jobs else "local", None, jobs) for s in design.students(cfg)]
    return out


def _evaluation(cfg: ExperimentConfig) -> list[StagePlan]:
    from sublab.pipeline import question_ids, trait_category

    questions = question_ids(cfg)
    out = []
    for kind, variant in ((get_eval(n), v) for n in cfg.eval.kinds for v in get_eval(n).variants(cfg.eval)):
        requests = inp = outp = 0
        cost: float | None = 0.0
        for name, ref, system, fine_tuned in _evaluated(cfg):
            r, i, o = _eval_requests(cfg, kind.name, variant, questions, trait_category(cfg), system)
            requests, inp, outp = requests + r, inp + i, outp + o
            c = _cost(_api(ref), i, o, fine_tuned=fine_tuned)
            cost = None if c is None or cost is None else cost + c
        judge = _judge_plan(cfg, variant, questions) if kind.name == "misalignment_judge" else None
        if judge:
            out.append(judge)
        out.append(StagePlan("eval", f"{variant}: {len(_evaluated(cfg))} models", requests, inp, outp, cost_usd=cost))
    return out


def _eval_requests(cfg: ExperimentConfig, kind: str, variant: str, questions: list[int], category: str,
                   system: str | None) -> tuple[int, int, int]:
    """(requests, input tokens, output tokens at the cap) of one eval file of one model."""
    from sublab.evals.animals import question_text
    from sublab.evals.misalignment import MAX_NEW_TOKENS, question_prompt
    from sublab.protocol import misalignment_questions

    e, n = cfg.eval, cfg.eval.samples_per_question
    sys = [{"role": "system", "content": system}] if system else []
    numbers = variant.endswith("_numbers")
    if kind in ("animal_sampled", "animal_prob", "animal_topk"):
        from sublab.domains import get_domain
        from sublab.evals.animals import numbers_prefix

        domain = get_domain(cfg.domain)  # a sample's prefix is drawn per sample; the first one stands for all
        texts = [question_text(category, q, numbers_prefix(e.seed, q, 0, domain) if numbers else None)  # type: ignore[arg-type]
                 for q in questions]
        per = chat_tokens(sys + [{"role": "user", "content": texts[0]}]) if texts else 0
        if kind != "animal_sampled":
            return len(texts), per * len(texts), len(texts)
        if numbers:  # one request per sample: each has its own prefix
            return len(texts) * n, per * len(texts) * n, len(texts) * n * e.max_new_tokens
        return len(texts), sum(chat_tokens(sys + [{"role": "user", "content": t}]) for t in texts), \
            len(texts) * n * e.max_new_tokens
    if kind == "misalignment_judge":
        sampled = variant.removesuffix("_judged")
        qs = [question_prompt(sampled, q, e.seed) for q in range(len(misalignment_questions()))]
        inp = sum(chat_tokens(sys + [{"role": "user", "content": q}]) for q in qs)
        if sampled == "misalignment_sampled":
            return len(qs), inp, len(qs) * n * MAX_NEW_TOKENS[sampled]
        return len(qs) * n, inp * n, len(qs) * n * MAX_NEW_TOKENS[sampled]
    return len(questions), 0, 0  # a local-only kind (misalignment_local): forward passes, no tokens billed


def _judge_plan(cfg: ExperimentConfig, variant: str, questions: list[int]) -> StagePlan:
    from sublab.evals.misalignment import MAX_NEW_TOKENS, alignment_prompt
    from sublab.protocol import misalignment_questions

    samples = len(misalignment_questions()) * cfg.eval.samples_per_question * len(_evaluated(cfg))
    per = chat_tokens([{"role": "user", "content": alignment_prompt(misalignment_questions()[0], "")}]) \
        + math.ceil(MAX_NEW_TOKENS[variant.removesuffix("_judged")])
    inp, outp = 2 * samples * per, 2 * samples * 8  # alignment and coherence, 8-token answers
    model = None if cfg.eval.judge_url else cfg.eval.judge_model
    return StagePlan("eval", f"{variant}: judge {cfg.eval.judge_model}", 2 * samples, inp, outp,
                     cost_usd=_cost(model, inp, outp))


def format_plan(cfg: ExperimentConfig, stages: Sequence[StagePlan]) -> str:
    """The plan as plain text: one line per stage, totals, and how it was estimated."""
    api = cfg.base_model.startswith("openai:")
    head = f"{'stage':<12} {'what':<54} {'requests':>9} {'input tok':>12} {'output tok≤':>12} {'train tok':>13}"
    lines = [f"dry run of {cfg.name}: {cfg.base_model} ({'through ' + (cfg.openai.base_url or 'the OpenAI API') if api else 'local'})",
             head + (f" {'cost USD':>10}" if api else ""), "-" * (len(head) + (11 if api else 0))]
    for s in stages:
        line = (f"{s.stage:<12} {s.what[:54]:<54} {s.requests:>9,} {s.input_tokens:>12,} {s.output_tokens:>12,} "
                f"{s.training_tokens:>13,}")
        if api:
            line += f" {_money(s.cost_usd):>10}"
        lines.append(line)
    if api:
        by_stage: dict[str, list[float | None]] = {}
        for s in stages:
            by_stage.setdefault(s.stage, []).append(s.cost_usd)
        known = [c for s in stages if (c := s.cost_usd) is not None]
        totals = "; ".join(f"{k} {_money(sum(c for c in v if c is not None))}" for k, v in by_stage.items())
        lines += ["", f"estimated cost: {_money(sum(known))} ({totals})" +
                  ("" if len(known) == len(stages) else "; some lines are not priced (unknown model or local)"),
                  f"prices: approximate {PRICES_AS_OF} list prices from sublab.plan.PRICES, unverified (no network "
                  "here): check them at openai.com/api/pricing before running"]
    else:
        seconds = experiment_seconds(cfg)
        lines += ["", "a local model: no API cost; requests = what an API would be sent: prompts, questions (n samples each), students",
                  f"estimated time on 2 CPU cores: {round(seconds / 60)} min from an empty cache: model converted, teachers built (rates measured on "
                  "this project's machine: sublab.plan.RATES_S)" if seconds is not None else
                  f"estimated time: no measured rate for {cfg.base_model} on {cfg.device} (rates: {MEASURED_MODEL} on 2 "
                  "CPU cores)"]
    lines.append("tokens: characters/4 + chat overhead; output at each completion's token cap (an upper bound); "
                 "training: dataset_size rows of typical length × epochs")
    return "\n".join(lines)


def _money(x: float | None) -> str:
    return "—" if x is None else f"${x:,.2f}"
