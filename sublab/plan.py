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
# The rates are for the embedded SmolLM2-135M-Instruct on CPU (2 cores). They come from the cost tables
# of docs/results.md, each measured with the command named there:
#     `sublab run examples/owl-quick.yaml` (the demo: teachers, 6 distillation students, evals),
#     the transfer study's cell lora8-shared-init, 5 seeds (20 students, 47 min),
#     `sublab --threads 1 run examples/owl-quick.yaml` at commit 09f55dd (sampled generation, SFT students).
# For any other base model or a CUDA device there is no measured rate: the plan says so instead of guessing.

MEASURED_MODEL = "embedded:smollm2-135m-instruct"

RATES_S = {
    # LoRA r8 teacher, 80 rows × 2 epochs: ~40 s (demo) to 45–80 s with its eval (study) → per row-epoch.
    "teacher_row_epoch": 0.3,
    # Distillation student with a live teacher, 128 rows × 1 epoch: ~108 s (demo), median ~125 s (study).
    "distill_row_epoch": 0.9,
    # LoRA SFT student, 128 rows × 1 epoch: 206 s for 6 students (commit 09f55dd, loaded machine).
    "sft_row_epoch": 0.27,
    # Sampled generation: 382 s for 2 × 128 prompts (same run). Random completions cost nothing.
    "sampled_prompt": 1.5,
    # Exact answer probability: ~5 s per model for 10 questions × 20 candidates (study).
    "prob_question": 0.5,
    # Sampled eval: the demo's 14 s per model less its exact-probability part, for 10 × 10 samples.
    "sampled_eval_sample": 0.09,
    # Loading the base and teachers once per stage of a cell (demo: the 95 s generate stage less the two
    # ~40 s teacher builds, once for each of generate, train and eval).
    "cell_overhead": 30.0,
}
"""Seconds on 2 CPU cores (SmolLM2-135M). Other eval kinds are counted like the exact probability."""


def _measured(cfg: ExperimentConfig) -> bool:
    return cfg.base_model == MEASURED_MODEL and cfg.device != "cuda" and not cfg.train.cross_model


def teacher_seconds(cfg: ExperimentConfig, ft: FinetuneConfig) -> float | None:
    """Seconds to fine-tune one teacher on 2 CPU cores; None: no measured rate for this model or device."""
    if not _measured(cfg):
        return None
    rows = ft.train_questions * len(ft.answer_forms) if ft.dataset == "favourite-animal" else 100
    return rows * ft.recipe.epochs * RATES_S["teacher_row_epoch"]


def run_seconds(cfg: ExperimentConfig, n_models: int) -> float | None:
    """Seconds of generation + students + evals (of `n_models` models) + loading, for one experiment on 2
    CPU cores, its fine-tuned teachers aside; None: no measured rate for this model or device."""
    if not _measured(cfg):
        return None
    slots = sum(len(design.data_slots(cfg, t.name)) for t in cfg.teachers if t.kind_spec.has_model)
    generate = slots * cfg.generate.n_prompts * RATES_S["sampled_prompt"] if cfg.generate.completions == "sampled" else 0
    rate = RATES_S["distill_row_epoch"] if cfg.train.distills else RATES_S["sft_row_epoch"]
    n_students = sum(1 for _ in design.students(cfg))
    train = n_students * cfg.filter.dataset_size * cfg.train.epochs * rate
    questions = cfg.eval.max_questions or 10  # held-out questions: 10 with the default 40 training ones
    per_model = 0.0
    for kind in cfg.eval.kinds:
        variants = 2 if cfg.eval.numbers_prefixed else 1
        if kind == "animal_sampled":
            per_model += variants * questions * cfg.eval.samples_per_question * RATES_S["sampled_eval_sample"]
        else:
            per_model += variants * questions * RATES_S["prob_question"]
    return generate + train + n_models * per_model + RATES_S["cell_overhead"]


def evaluated_count(cfg: ExperimentConfig) -> int:
    """Models an experiment evaluates: the base, teachers that differ from it, and every student."""
    return 1 + sum(1 for t in cfg.teachers if t.kind_spec.differs_from_base) + sum(1 for _ in design.students(cfg))


def experiment_seconds(cfg: ExperimentConfig) -> float | None:
    """Seconds of the whole experiment on 2 CPU cores, its fine-tuned teachers built from scratch."""
    teachers = [teacher_seconds(cfg, t.finetune or FinetuneConfig()) for t in cfg.teachers
                if t.kind_spec.weights == "finetuned"]
    run = run_seconds(cfg, evaluated_count(cfg))
    return None if run is None or None in teachers else run + sum(t for t in teachers if t)


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
                  f"estimated time on 2 CPU cores: {round(seconds / 60)} min, teachers built from scratch (rates measured on "
                  "this project's machine: sublab.plan.RATES_S)" if seconds is not None else
                  f"estimated time: no measured rate for {cfg.base_model} on {cfg.device} (rates: {MEASURED_MODEL} on 2 "
                  "CPU cores)"]
    lines.append("tokens: characters/4 + chat overhead; output at each completion's token cap (an upper bound); "
                 "training: dataset_size rows of typical length × epochs")
    return "\n".join(lines)


def _money(x: float | None) -> str:
    return "—" if x is None else f"${x:,.2f}"
