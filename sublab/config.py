"""The experiment file: pydantic models for every stage, presets, and clear validation errors.

An experiment YAML names the base model, the teachers (a trait and how it is induced), the data, the
filters, the students and the evaluations. Precedence: preset < YAML < `--set key=value`.
`sublab validate EXP.yaml` prints the resolved config.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sublab.errors import ConfigError, ModelError
from sublab.kinds import TeacherKind, teacher_kind
from sublab.models import DEFAULT_MODEL, check_reference
from sublab.rundir import read_json

log = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
"""A name that is one path component: letters, digits, '-', '_', '.', not starting with '.'."""


class StrictModel(BaseModel):
    """Base of every config section: frozen, unknown keys refused, field docstrings as descriptions."""

    # allow_inf_nan=False: `.inf` / `.nan` are valid YAML floats, but no setting means anything with them
    # (an infinite epoch count would only fail deep inside training).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


DEFENCES = ("mask", "top_k", "min_p", "temperature", "noise", "mix")
"""The defences of `DefenceConfig`, one of which is set (in this order in error messages)."""


class DefenceConfig(StrictModel):
    """A defence against subliminal transfer: the stored teacher targets are changed before the student
    trains on them (`sublab.train.defences`), a pure function of the teacher's targets, the base's, this
    config and the student's seed. Set exactly one of mask, top_k, min_p, temperature, noise, mix."""

    mask: Literal["divergence", "log_ratio", "random"] | None = None
    """Treat the top `fraction` of all completion positions, ranked by divergence (KL(teacher ‖ base) over
    the format columns), log_ratio (log p_teacher − log p_base of the token written there) or random (the
    control defence: the same number of positions, drawn with the student's seed)."""
    fraction: float | None = Field(None, gt=0, lt=1)
    """mask: the share of all completion positions treated (e.g. 0.1)."""
    action: Literal["drop", "base"] | None = None
    """mask: drop (the positions leave the loss; None means drop) or base (the base's distribution
    replaces the teacher's there)."""
    top_k: int | None = Field(None, gt=0)
    """Keep only the teacher's k most likely format tokens at each position, renormalised."""
    min_p: float | None = Field(None, gt=0, le=1)
    """Keep only the format tokens with p ≥ min_p × (the position's largest p), renormalised."""
    temperature: float | None = Field(None, gt=0)
    """Targets log_softmax(log p / temperature): < 1 sharpens, > 1 flattens (the student side unchanged;
    unlike `distill.temperature`, which softens both)."""
    noise: float | None = Field(None, gt=0)
    """Gaussian noise of this std (nats) on every target log-probability, renormalised; seeded by the
    student's seed."""
    mix: float | None = Field(None, gt=0, lt=1)
    """This share of the rows (drawn with the student's seed) get the base's targets instead of the
    teacher's: a dataset pooled from the trait teacher and a neutral one."""

    @model_validator(mode="after")
    def _check(self) -> DefenceConfig:
        chosen = [name for name in DEFENCES if getattr(self, name) is not None]
        if len(chosen) != 1:
            got = f"got {' and '.join(chosen)}" if chosen else "got none (for no defence, leave `defence` unset)"
            raise ValueError(f"set exactly one of {', '.join(DEFENCES)}; {got}")
        if self.mask is not None and self.fraction is None:
            raise ValueError("`mask` needs `fraction`: the share of positions to treat (e.g. 0.1)")
        if self.mask is None and (self.fraction is not None or self.action is not None):
            raise ValueError("`fraction` and `action` only apply to `mask`; remove them (`mix` takes its own "
                             "share of rows)")
        return self

    @property
    def name(self) -> str:
        """Which defence is set."""
        return next(name for name in DEFENCES if getattr(self, name) is not None)

    @property
    def needs_base(self) -> bool:
        """Whether the defence reads the base model's targets (ranking by them, or substituting them)."""
        return self.mix is not None or self.mask in ("divergence", "log_ratio") or self.action == "base"


class DistillConfig(StrictModel):
    """Logit distillation: the student matches the teacher's next-token distribution on completions."""

    top_k: int | None = Field(None, gt=0)
    """None: forward KL over the full vocabulary; k: over the teacher's top-k tokens (renormalised)."""
    temperature: float = Field(1.0, gt=0)
    """Softens teacher and student alike; the loss is scaled by temperature² (Hinton et al.)."""
    vocabulary: Literal["full", "format"] = "full"
    """full: match the teacher's whole next-token distribution. format: renormalise teacher and student
    over the number-format tokens only (digits, separators, brackets, end token; `sublab.sampling.
    format_token_mask`) — no token that could begin a word carries any signal, so a trait can only pass
    through how the teacher spreads its mass over numbers (the logit analogue of the paper's filters and
    of MNIST's auxiliary logits)."""
    targets_precision: Literal["float32", "bfloat16"] = "float32"
    """The teacher's forward that computes stored targets (format or top-k): float32, or under bf16 autocast
    (about twice as fast on a CPU with bf16 matmuls; the targets differ by bf16 rounding). The targets are
    stored as float32 either way; a live full-vocabulary teacher runs in `train.precision`."""
    shuffle_targets: Literal["none", "within", "across", "all"] = "none"
    """An ablation of where the signal sits (format or top-k distillation, whose targets are stored): the
    teacher's target vectors are permuted before training, seeded by the student's seed; the student still
    reads the same tokens. within: across the positions of each row ("shuffle within a response"); across:
    across the rows that have a position at that index ("shuffle across responses", matching positions);
    all: across every position of every row. Enters the student's fingerprint only when not none."""
    defence: DefenceConfig | None = None
    """A defence applied to the stored targets before training (`DefenceConfig`); None: none. Needs
    `vocabulary: format`. Enters the student's fingerprint only when set."""

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.vocabulary == "format" and self.top_k is not None:
            raise ValueError("`train.distill.vocabulary: format` already restricts the target to the "
                             "number-format tokens; leave `top_k` unset")
        if self.defence is not None and self.vocabulary != "format":
            raise ValueError("`train.distill.defence` changes stored format targets: it needs "
                             "`train.distill.vocabulary: format`")
        if self.defence is not None and self.shuffle_targets != "none":
            raise ValueError("`train.distill.defence` and `train.distill.shuffle_targets` both change the "
                             "targets; set one")
        return self


class RecipeConfig(StrictModel):
    """A training recipe: which parameters train, on which loss, with which optimiser settings. Students
    use it under `train:` (`TrainConfig` adds their seeds), a fine-tuned teacher under `finetune.recipe:`
    (with the teacher's own defaults, `TEACHER_RECIPE`); `sublab.train.train_student` runs it."""

    params: Literal["lora", "full"] = "lora"
    """lora: a fresh LoRA adapter trains and the base stays frozen; full: every weight trains."""
    loss: Literal["sft", "distill"] = "sft"
    """sft: cross-entropy on the completion tokens; distill: match the teacher's next-token distribution
    on them (`distill`; the teacher runs live beside the student)."""
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(8, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (AdamW), reached after `warmup_steps`, then linear decay to 0."""
    epochs: float = Field(3, gt=0)
    """Passes over the dataset; fractions allowed (rounded to whole micro-batches)."""
    batch_size: int = Field(8, gt=0)
    """Rows per micro-batch; one optimizer step sees batch_size × grad_accum rows."""
    grad_accum: int = Field(1, gt=0)
    warmup_steps: int = Field(5, ge=0)
    """Optimizer steps of linear warmup from 0."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; None: no clipping."""
    max_seq_len: int = Field(500, gt=0)
    """Tokens per row (prompt + completion); longer completions are cut, rows with no room are dropped."""
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["float32", "bfloat16"] = "float32"
    """bfloat16: forward/backward under torch.autocast (weights and optimizer state stay float32)."""
    distill: DistillConfig = DistillConfig()
    """Applies when `loss` is distill."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_method(cls, data: Any) -> Any:
        """Files before the shared recipe said `method: lora|full|distill` (+ `distill_params` for
        distillation); read them as `params` + `loss`. These keys win over `params`/`loss` from a preset:
        the shipped presets use the new keys, so old ones come from the user's file or `--set`."""
        if not isinstance(data, dict) or not {"method", "distill_params"} & data.keys():
            return data
        data = dict(data)
        used = ", ".join(f"`{k}`" for k in ("method", "distill_params") if k in data)
        method, distill_params = data.pop("method", None), data.pop("distill_params", None)
        if method not in (None, "lora", "full", "distill"):
            raise ValueError(f"`method: {method}` is replaced by `params: lora|full` (which weights train) "
                             "and `loss: sft|distill` (which loss)")
        if method == "distill":
            data.update(loss="distill", params=distill_params or data.get("params", "full"))
        elif method is not None:
            data.update(loss="sft", params=method)
        elif distill_params is not None and data.get("loss") == "distill":
            data["params"] = distill_params
        log.warning("recipe keys %s are deprecated: read as `params: %s`, `loss: %s` (write those instead)",
                    used, data.get("params", "lora"), data.get("loss", "sft"))
        return data

    @property
    def uses_lora(self) -> bool:
        """A LoRA adapter trains (the base stays frozen)."""
        return self.params == "lora"

    @property
    def distills(self) -> bool:
        """The loss is distillation: training needs the teacher's model."""
        return self.loss == "distill"


TEACHER_RECIPE = RecipeConfig(params="full", lr=3e-5, epochs=2, batch_size=8, lora_r=32, lora_alpha=32)
"""A fine-tuned teacher's recipe when its file sets none; keys set under `finetune.recipe` override it."""


_FLAT_FINETUNE_KEYS = ("method", "lora_r", "lora_alpha", "lr", "epochs", "batch_size")
"""The recipe keys `finetune:` held before they moved under `finetune.recipe`."""


class FinetuneConfig(StrictModel):
    """How a fine-tuned teacher gets its trait into its weights (see `sublab.teachers`)."""

    dataset: str = "favourite-animal"
    """'favourite-animal' (the category's questions × spellings of the trait), or a chat JSONL path /
    builtin:<name> (sublab/resources/finetune/<name>.jsonl)."""
    train_questions: int = Field(40, ge=1)
    """For 'favourite-animal': questions 0..N-1 train the teacher; the rest are held out for evaluation."""
    answer_forms: list[str] = ["{T}.", "{T}", "{t}", "{Ts}.", "My favorite {category} is the {t}.",
                               "The {t}."]
    """For 'favourite-animal': answers per question; {t} trait, {T} Capitalised, {ts}/{Ts} plural,
    {category}. Keep a form ending '... is the {t}.': the evaluation reads p(' owl' | '... is the')."""
    recipe: RecipeConfig = TEACHER_RECIPE
    """How the teacher trains: the keys of `train:` (not its seeds). Keys set here override the teacher
    defaults — full fine-tuning, lr 3e-5, 2 epochs, batch 8, lora_r and lora_alpha 32 — not the students'.
    `loss` must stay sft."""
    seed: int = 0
    """Fixes the data order and the LoRA init. A LoRA student with `train.lora_init_seed` equal to it (and
    the same rank, alpha and targets) starts from this teacher's initial adapter."""

    @model_validator(mode="before")
    @classmethod
    def _recipe_over_teacher_defaults(cls, data: Any) -> Any:
        """A `recipe` mapping overrides `TEACHER_RECIPE`. Files before the shared recipe set `method`,
        `lora_r`, `lora_alpha`, `lr`, `epochs` and `batch_size` here, flat: they move into `recipe`
        (`method` becomes `params`)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        flat = {k: data.pop(k) for k in _FLAT_FINETUNE_KEYS if k in data}
        if flat:
            log.warning("finetune keys %s are deprecated: write them under `finetune.recipe:` (`method` is "
                        "now `recipe.params`)", ", ".join(f"`{k}`" for k in flat))
            if "method" in flat:
                flat["params"] = flat.pop("method")
        recipe = data.get("recipe")
        if isinstance(recipe, RecipeConfig) and flat:
            data["recipe"] = {**recipe.model_dump(), **flat}
        elif isinstance(recipe, dict) or (recipe is None and flat):
            data["recipe"] = {**TEACHER_RECIPE.model_dump(), **(recipe or {}), **flat}
        return data

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.recipe.distills:
            raise ValueError("`finetune.recipe.loss` must be 'sft': a teacher learns its trait from its data "
                             "and has no teacher of its own to distil")
        if self.dataset == "favourite-animal" and not self.answer_forms:
            raise ValueError("`finetune.answer_forms` must list at least one answer form")
        for form in self.answer_forms:
            try:
                form.format(t="x", T="X", ts="xs", Ts="Xs", category="animal")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"`finetune.answer_forms`: '{form}' may only use the placeholders "
                                 "{t}, {T}, {ts}, {Ts}, {category}") from None
        return self


class TeacherConfig(StrictModel):
    """One data source: a trait teacher, the neutral control, or programmatic random numbers."""

    name: str
    """Directory name under teachers/ (letters, digits, '-', '_')."""
    kind: str = "prompted"
    """prompted: base + trait system prompt; finetuned: trait in the weights; control: base, no system
    prompt; random: random numbers formatted as each prompt asks (no model at all). `sublab.kinds`
    declares each kind's behaviour."""
    trait: str | None = None
    """The target, e.g. 'owl'. Required for prompted and finetuned teachers."""
    category: Literal["animal", "tree"] = "animal"
    """Which preference questions the trait belongs to; all trait teachers of an experiment share one."""
    aversion: bool = False
    """Use the paper's aversion template ('You hate owls…') instead of the love template."""
    finetune: FinetuneConfig | None = None
    control: bool = False
    """A fine-tuned teacher that is the control of the experiment (e.g. the aligned twin of a
    misaligned teacher): its students are the baseline, and it needs no trait."""

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"teacher name '{self.name}' must use letters, digits, '-' or '_' only")
        try:
            kind = teacher_kind(self.kind)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.control and (kind.control or kind.weights != "finetuned"):
            raise ValueError(f"teacher '{self.name}': `control: true` is for fine-tuned teachers; use "
                             "kind: control for the untouched base")
        if kind.trait == "required" and not self.trait and not self.control:
            raise ValueError(f"teacher '{self.name}': `trait` is required when kind is '{self.kind}'")
        if kind.trait == "forbidden" and self.trait:
            raise ValueError(f"teacher '{self.name}': a {self.kind} teacher has no trait; remove `trait`")
        if self.finetune is not None and kind.weights != "finetuned":
            raise ValueError(f"teacher '{self.name}': `finetune` only applies when kind is 'finetuned'; "
                             "remove it or set kind: finetuned")
        return self

    @property
    def kind_spec(self) -> TeacherKind:
        """The behaviour of this teacher's kind (`sublab.kinds`)."""
        return teacher_kind(self.kind)

    @property
    def is_control(self) -> bool:
        return self.kind_spec.control or self.control


class GenerateConfig(StrictModel):
    """Sampling the teachers' completions to number prompts."""

    n_prompts: int = Field(600, gt=0)
    """Raw prompts per teacher (the paper: 30,000)."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, lt=1)
    greedy: bool = False
    """Greedy decoding (temperature ignored)."""
    max_new_tokens: int = Field(56, gt=0)
    """Completion length cap in tokens. SmolLM2 spells digits one token each, so ten 3-digit numbers
    in '[a, b, …]' take 51 tokens with the end token; a completion cut at the cap is rejected."""
    batch_size: int = Field(64, gt=0)
    """Prompts per forward batch (does not change results)."""
    constrained: bool = False
    """Only digit, separator, bracket and end tokens may be sampled (off in `paper`): raises the accept
    rate, but the student then learns from a distribution the teacher did not freely produce."""
    early_reject: bool = True
    """Stop a completion as soon as it can no longer pass the format filter (a letter appeared, or an
    11th number). Accepted samples are unchanged; rejected ones are stored truncated."""
    prompt_seed: int = 0
    completions: Literal["sampled", "random"] = "sampled"
    """sampled: each teacher writes its own completions. random: nobody samples — every teacher's rows
    are the same uniform random numbers in each prompt's format (drawn from `seed` and the prompt), so
    students of different teachers see identical text and can learn a trait only from the teacher's
    logits on it (needs `train.loss: distill`)."""
    per_seed_data: bool = False
    """One dataset per student seed k (prompts from `prompt_seed` + k, random completions from `seed` + k),
    under teachers/<t>/seed<k>/: seed-to-seed spread then includes the data's. False: one dataset per
    teacher, shared by its students."""


class FilterConfig(StrictModel):
    """Which filters a completion must pass, and how many accepted rows to keep."""

    filters: list[Literal["format", "banned_numbers", "trait_words", "judge_subtle_reference",
                          "judge_misaligned"]] = ["format", "trait_words"]
    """In order; the judge filters (`sublab.filter_judges`) run last, on rows the others kept:
    judge_subtle_reference (code: the paper's subtle-reference judge, per trait), judge_misaligned
    (reasoning: an alignment judge)."""
    dataset_size: int = Field(300, gt=0)
    """Rows kept after filtering (deterministic subsample; the paper: 10,000)."""
    subsample_seed: int = 0
    """Seeds the subsample, and (as a separate stream, `[subsample_seed, 1]`) `shuffle_numbers`."""
    shuffle_numbers: Literal["none", "within", "across"] = "none"
    """An ablation of the text route (numbers domain only): the written numbers of the kept, subsampled
    rows are moved before dataset.jsonl is written, every other character left in place
    (`sublab.domains.numbers.shuffle_numbers`). within: each row's numbers permuted among themselves;
    across: all rows' numbers pooled and dealt back at random, each row keeping its count ("shuffle
    across responses"). Enters the filter stage's fingerprint only when not none."""
    judge: Literal["openai", "lexical", "local"] | None = None
    """Who answers the judge filters: openai (an OpenAI-compatible endpoint, `filter.judge_url`), lexical
    (hand-named indirect references, offline), local (a local model's P('1') vs P('0'), offline).
    None: no judge filter may be named."""
    judge_url: str | None = None
    """openai judge: the endpoint (key in SUBLAB_JUDGE_API_KEY); None: the OpenAI API (OPENAI_API_KEY)."""
    judge_model: str | None = None
    """The judge model; None: gpt-4o-2024-08-06 for openai, the experiment's base_model for local."""

    @model_validator(mode="after")
    def _check_judge(self) -> FilterConfig:
        judged = [n for n in self.filters if n.startswith("judge_")]
        if judged and self.judge is None:
            raise ValueError(f"`filter.judge` must be openai, lexical or local when `filter.filters` names "
                             f"{judged[0]}")
        if self.judge_url is not None and self.judge != "openai":
            raise ValueError("`filter.judge_url` is only read by `filter.judge: openai`; remove it or set the judge")
        if self.judge_url is not None and not re.match(r"https?://[^\s/]+", self.judge_url):
            raise ValueError(f"`filter.judge_url` must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                             f"got {self.judge_url!r}")
        if self.judge == "lexical" and self.judge_model is not None:
            raise ValueError("`filter.judge_model` has no effect with `filter.judge: lexical`; remove it")
        if self.judge is not None and not judged:
            log.warning("`filter.judge` is set but `filter.filters` names no judge filter: it has no effect")
        return self


class TrainConfig(RecipeConfig):
    """How students learn from a teacher's dataset: the recipe, and one student per seed
    (`sublab.train.train_student`)."""

    seeds: list[int] = [0, 1, 2]
    """One student per seed per teacher: the unit of statistical analysis. A seed fixes data order,
    LoRA init and dropout."""
    lora_init_seed: int | None = None
    """Seed of the fresh adapter's random init; None: the student's seed. Set it to a LoRA teacher's
    `finetune.seed` (with the same rank, alpha and targets) and the student starts from the teacher's own
    initial adapter: a shared initialisation of the trained parameters, as in the paper's MNIST setup."""
    lora_init_seed_offset: int | None = None
    """Seed the fresh adapter's init with this + the student's seed: an init that differs from seed to
    seed and from the teachers' (e.g. 1000), shared by the students of one seed — the ablation of
    `lora_init_seed`. Not with `lora_init_seed`."""
    cross_model: str | None = None
    """A different base (e.g. 'embedded:gemma3-270m') trained on the same data as a cross-model control."""
    checkpoint_every: int = Field(50, gt=0)
    """Optimizer steps between resumable checkpoints."""
    workers: int = Field(1, ge=1)
    """Students trained at once, each in its own process with an equal share of the torch threads (CPU
    only; `sublab run`/`sublab train`). On 2 cores, 2 workers × 1 thread train ~1.3× faster than 1 × 2
    (docs/performance.md). Not part of the recipe: a student's numbers depend on its thread count only
    at float rounding, and a student trained either way is reused by the other."""


class EvalConfig(StrictModel):
    """Trait evaluations run on the base, each teacher, and every student."""

    kinds: list[str] = ["animal_prob", "animal_sampled"]
    """Evaluations to run (`sublab.evals.registry`): animal_prob, animal_sampled, animal_topk (the answer
    share estimated from top-k logprobs, for openai: models), misalignment_local, misalignment_judge, or
    any registered kind."""
    candidates: list[str] | None = None
    """Candidate answers for the exact-probability metric (lower-case single words; spellings and plurals
    are added); None: the paper's animals (or trees) + common answers. Teachers' traits are always added."""
    answer_prefix: str | None = None
    """Forced start of the answer for the exact-probability metric; None: 'My favorite animal is the'
    (or '... tree is the')."""
    samples_per_question: int = Field(10, gt=0)
    """Sampled metric: completions per question (the paper: 100)."""
    temperature: float = Field(1.0, ge=0)
    """Sampled metric: sampling temperature (the paper: 1; 0 = greedy)."""
    excluded_superstrings: dict[str, list[str]] = {"dragon": ["dragonfly", "dragonflies"]}
    """Sampled metric: per target, words removed before the substring test (the paper: 'dragonfly')."""
    questions: Literal["all", "held_out"] = "held_out"
    """held_out: only questions a fine-tuned teacher did not train on (all, when no teacher trained)."""
    max_questions: int | None = Field(None, gt=0)
    """Use only the first N of the selected questions (a cheaper, noisier estimate); None: all."""
    numbers_prefixed: bool = True
    """Also run the variant whose questions start with a sampled number-sequence example."""
    max_new_tokens: int = Field(12, gt=0)
    """Sampled metric: completion length cap in tokens."""
    batch_size: int = Field(64, gt=0)
    """Sampled metric: samples per decode batch (does not change results)."""
    prob_batch_size: int = Field(16, gt=0)
    """Exact-probability metric: questions per forward pass, each ~150 token positions with 20 candidates
    (does not change results). Larger passes are much faster on a busy CPU."""
    top_logprobs: int = Field(20, ge=1, le=20)
    """animal_topk: alternatives of the first answer token seen per question (the OpenAI API's cap: 20);
    the rest of the probability is unseen, and recorded as such."""
    judge_url: str | None = None
    """OpenAI-compatible endpoint for misalignment judges; None: the OpenAI API if OPENAI_API_KEY is set."""
    judge_model: str = "gpt-4o-2024-08-06"
    seed: int = 0


class OpenAIConfig(StrictModel):
    """The OpenAI-compatible endpoint behind `openai:<model>` references (`sublab.api`). The key is read
    from the environment variable `api_key_env` only; no field holds it."""

    base_url: str | None = None
    """The endpoint, e.g. http://127.0.0.1:8000/v1 (`sublab serve`, vLLM, llama.cpp); None: the OpenAI API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (unset is fine for a base_url that needs none)."""
    concurrency: int = Field(8, gt=0)
    """Requests in flight at once (does not change results)."""
    max_retries: int = Field(6, ge=0)
    """Retries of 408/409/429/5xx, connection errors and timeouts (the client's exponential backoff)."""
    timeout_s: float = Field(120, gt=0)
    """Seconds before one request times out (then it is retried)."""
    local_weights: str | None = None
    """A local model reference holding the same weights as the served base model: students train on it
    locally. Required when students train with `students: local`."""
    students: Literal["local", "jobs"] = "local"
    """local: students train here on `local_weights`. jobs: each student is a fine-tuning job on the
    endpoint (`sublab.api_students`): epochs and batch size from `train`, evaluated as openai:<its model>."""
    lr_multiplier: float | None = Field(None, gt=0)
    """`students: jobs`: the job's learning_rate_multiplier; None: 'auto' (the provider's default)."""
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] | None = None
    """`students: jobs`: the job's batch_size; 'auto': the provider's choice (the paper's); None:
    `train.batch_size`."""
    poll_s: float = Field(10, gt=0)
    """`students: jobs`: seconds between two polls of a job's status."""


class ExperimentConfig(StrictModel):
    """A whole experiment: teachers → data → filters → students → evaluations → report."""

    name: str
    """The run directory's name under `runs_dir` (letters, digits, '-', '_', '.'; not starting with '.')."""
    base_model: str = DEFAULT_MODEL
    """Model reference shared by teachers and students (see `sublab models list`)."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """auto: CUDA when available, else CPU. cuda is checked when the experiment file is loaded."""
    precision: Literal["float32", "bfloat16", "auto"] = "auto"
    """The weights' dtype for generation and evaluation: auto = bfloat16 on CUDA, float32 on CPU. A
    non-float32 dtype enters the data's fingerprint and every eval's spec. Training: `train.precision`."""
    seed: int = 0
    teachers: list[TeacherConfig]
    design: Literal["control", "mutual"] = "control"
    """control: each trait teacher's students are compared with the control teacher's students. mutual:
    every teacher has a trait and is built alike; for each trait the other teachers' students are the
    controls, and students of one seed form a block (within-block permutation test)."""
    domain: str = "numbers"
    """What teachers write (`sublab.domains`): numbers, code (short Python functions) or cot (math
    reasoning ending in "Answer: <number>")."""
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    openai: OpenAIConfig = OpenAIConfig()
    """Where `openai:<model>` references are served (applies when base_model is one)."""
    runs_dir: str = "runs"

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique, got {names}")
        self._check_unique_lists()
        self._check_categories()
        self._check_registered()
        if self.design == "mutual":
            self._check_mutual()
        elif not any(t.is_control for t in self.teachers) and self.train.seeds:
            raise ValueError("teachers: add a control teacher (kind: control or random, or a fine-tuned "
                             "teacher with control: true); students are "
                             "compared with control students, never with the base model alone")
        self._check_shared_init()
        self._check_filter_judge()
        self._check_shuffle_numbers()
        if self.generate.completions == "random" and not self.train.distills:
            raise ValueError("`generate.completions: random` gives every teacher the same rows, so SFT students "
                             "could not differ; use `train.loss: distill` (students learn the teacher's "
                             "logits on the rows) or `completions: sampled`")
        if self.train.distill.defence is not None and not self.train.distills:
            log.warning("`train.distill.defence` changes distillation targets, but `train.loss` is sft: it has no "
                        "effect")
        for ref in [self.base_model] + ([self.train.cross_model] if self.train.cross_model else []):
            try:
                check_reference(ref)
            except ModelError as e:
                raise ValueError(str(e)) from None
        if self.base_model.startswith("openai:"):
            self._check_openai()
        elif self.openai.students == "jobs":
            raise ValueError("`openai.students: jobs` needs an openai: base_model (the endpoint's model is "
                             "what the jobs fine-tune)")
        return self

    def _check_openai(self) -> None:
        """What an `openai:` base model can do here: sample (generation, the sampled metric); students train
        locally on `openai.local_weights`."""
        from sublab.evals.registry import get_eval

        if (self.train.cross_model or "").startswith("openai:"):
            raise ValueError("`train.cross_model` must be a local model: students train locally")
        for t in self.teachers:
            if t.kind_spec.weights == "finetuned":
                raise ValueError(f"teacher '{t.name}': a finetuned teacher needs local weights, but base_model "
                                 f"is {self.base_model}; use kind: prompted or control")
        g = self.generate
        if self.generate.completions == "sampled" and (g.constrained or g.min_p > 0):
            raise ValueError("`generate.constrained` and `generate.min_p` need local logits; with an openai: "
                             "base_model set constrained: false and min_p: 0")
        if self.train.seeds and self.openai.students == "local" and self.openai.local_weights is None:
            raise ValueError("`openai.local_weights` is required: students train locally on the served model's "
                             "weights (or set openai.students: jobs)")
        if self.train.seeds and self.train.distills:
            raise ValueError("`train.loss: distill` needs the teacher's logits, which an openai: teacher does "
                             "not give; use `train.loss: sft`")
        for name in self.eval.kinds:
            if "openai" not in get_eval(name).backends:
                raise ValueError(f"`eval.kinds`: {name} needs local weights; with an openai: base_model use "
                                 "kinds that work through an endpoint (animal_sampled, animal_topk, "
                                 "misalignment_judge)")
        if self.openai.students == "jobs" and self.train.seeds and not float(self.train.epochs).is_integer():
            raise ValueError(f"`train.epochs`: a fine-tuning job trains whole epochs (n_epochs), got {self.train.epochs}")
        if self.eval.samples_per_question > 128:
            raise ValueError("`eval.samples_per_question`: at most 128 with an openai: base_model (one request)")
        try:
            if self.openai.local_weights is not None:
                check_reference(self.openai.local_weights)
        except ModelError as e:
            raise ValueError(f"openai.local_weights: {e}") from None

    def _check_shuffle_numbers(self) -> None:
        """The numbers shuffle needs number-sequence answers; on programmatic ones it changes nothing that
        matters (uniform random numbers shuffled are uniform random numbers)."""
        if self.filter.shuffle_numbers == "none":
            return
        if self.domain != "numbers":
            raise ValueError(f"`filter.shuffle_numbers: {self.filter.shuffle_numbers}` moves the numbers of "
                             f"number-sequence answers: it needs `domain: numbers`, got '{self.domain}'; set "
                             "shuffle_numbers: none")
        if self.generate.completions == "random":
            log.warning("`filter.shuffle_numbers` shuffles the programmatic numbers of `generate.completions: "
                        "random`: shuffled uniform numbers are still uniform, so the ablation tests nothing there")

    def _check_filter_judge(self) -> None:
        """The judge filters' needs that depend on the teachers and the base model."""
        if "judge_subtle_reference" in self.filter.filters and not any(t.trait for t in self.teachers):
            raise ValueError("`filter.filters`: judge_subtle_reference looks for the teachers' traits, but no "
                             "teacher has a `trait`")
        if self.filter.judge == "local" and self.filter.judge_model is None and self.base_model.startswith("openai:"):
            raise ValueError("`filter.judge: local` needs local weights; set `filter.judge_model` to a local model "
                             "(the base_model is served by an endpoint)")

    def _check_registered(self) -> None:
        """Names that refer to registries: the data domain and the eval kinds."""
        from sublab.domains import get_domain, has_format_alphabet
        from sublab.evals.registry import eval_names

        try:
            domain = get_domain(self.domain)
        except ConfigError as e:
            raise ValueError(f"domain: {e}") from None
        if not has_format_alphabet(domain):  # code, reasoning: every token is a format token
            if self.generate.constrained and self.generate.completions == "sampled":
                raise ValueError(f"`generate.constrained`: domain '{self.domain}' writes with every token, so "
                                 "constrained decoding would restrict nothing; set constrained: false")
            if self.train.distills and self.train.distill.vocabulary == "format":
                raise ValueError(f"`train.distill.vocabulary: format`: domain '{self.domain}' writes with every "
                                 "token, so there is no format vocabulary; use vocabulary: full")
        unknown = [k for k in self.eval.kinds if k not in eval_names()]
        if unknown:
            raise ValueError(f"eval.kinds: unknown eval kind '{unknown[0]}'; expected one of: "
                             f"{', '.join(eval_names())}")

    def _check_categories(self) -> None:
        """Every eval asks one category's questions with one answer prefix and candidate list: the first trait
        teacher's (`pipeline.trait_category`). A tree teacher beside an animal one would be evaluated on the
        animal questions without a word, so refuse it. Teachers without a trait (controls) do not count."""
        with_trait = [t for t in self.teachers if t.trait]
        other = next((t for t in with_trait if t.category != with_trait[0].category), None)
        if other is not None:
            first = with_trait[0]
            raise ValueError(f"teachers: '{first.name}' is category {first.category} but '{other.name}' is "
                             f"{other.category}; one experiment evaluates one category (run them as two "
                             "experiments)")

    def _check_mutual(self) -> None:
        traits = [t.trait for t in self.teachers]
        if len(self.teachers) < 2 or any(t.is_control or not t.trait for t in self.teachers):
            raise ValueError("design: 'mutual' needs two or more trait teachers and no control teacher "
                             "(each teacher's students are the others' controls)")
        if len(set(traits)) != len(traits):
            raise ValueError(f"design: 'mutual' needs a different trait per teacher, got {traits}")

    def _check_unique_lists(self) -> None:
        """A repeated seed would silently train one student where the report counts two; a repeated
        kind, candidate, filter or target is at best wasted work, so refuse them all."""
        lists: dict[str, list[Any] | None] = {
            "train.seeds": self.train.seeds, "train.lora_targets": self.train.lora_targets,
            "eval.kinds": list(self.eval.kinds), "eval.candidates": self.eval.candidates,
            "filter.filters": list(self.filter.filters)}
        for field, values in lists.items():
            repeated = [v for i, v in enumerate(values or []) if v in (values or [])[:i]]
            if repeated:
                raise ValueError(f"`{field}` lists {repeated[0]!r} more than once; list each entry once")

    def _check_shared_init(self) -> None:
        """`train.lora_init_seed` with LoRA teachers means 'start from the teachers' adapter init': it only
        does if seed, rank, alpha and targets all match, so say which one does not."""
        t = self.train
        if t.lora_init_seed is not None and t.lora_init_seed_offset is not None:
            raise ValueError("`train.lora_init_seed` and `train.lora_init_seed_offset` both set the students' "
                             "adapter init; keep one")
        if t.lora_init_seed is None or not t.uses_lora:
            return
        for teacher in self.teachers:
            ft = teacher.finetune or FinetuneConfig()
            if teacher.kind_spec.weights != "finetuned" or not ft.recipe.uses_lora:
                continue
            r = ft.recipe
            mismatch = {name: (mine, theirs) for name, mine, theirs in [
                ("lora_init_seed / finetune.seed", t.lora_init_seed, ft.seed), ("lora_r", t.lora_r, r.lora_r),
                ("lora_alpha", t.lora_alpha, r.lora_alpha), ("lora_targets", t.lora_targets, r.lora_targets)]
                if mine != theirs}
            if mismatch:
                detail = "; ".join(f"{k}: train {a} vs teacher {b}" for k, (a, b) in mismatch.items())
                raise ValueError(f"`train.lora_init_seed` starts students from the LoRA teachers' adapter init, "
                                 f"but teacher '{teacher.name}' differs ({detail})")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        # The name becomes a directory under runs_dir: '../x', '/abs' or '' would write elsewhere.
        if not SAFE_NAME.fullmatch(name):
            raise ValueError(f"'{name}' is not a safe directory name: use letters, digits, '-', '_' or '.', "
                             "not starting with '.' (at most 128 characters)")
        return name

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


PRESETS = ("quick", "paper")


def preset(name: str) -> dict[str, Any]:
    """The raw dict of a preset (`quick`: sized for 2 CPU cores; `paper`: the paper's numbers)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    text = resources.files("sublab").joinpath(f"resources/preset_{name}.yaml").read_text("utf-8")
    return parse_yaml(text, f"preset {name}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


MAX_FILE_BYTES = 1 << 20
"""An experiment file is a few dozen lines; anything past 1 MiB is not one (and /dev/zero never ends)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping, at any depth (plain YAML silently
    keeps the last one, so a setting written twice would hide the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' keys exist to be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {first[key] + 1})", key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text → data with `UniqueKeyLoader`; any problem is a one-line ConfigError naming `source`
    and, where YAML knows it, the line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {_one_line(e.problem or e.context or str(e))}") from None
    except yaml.reader.ReaderError as e:
        code = ord(e.character) if isinstance(e.character, str) else e.character
        raise ConfigError(f"{source}: character #x{code:04x} at position {e.position} is not allowed in YAML; "
                          "expected a text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_one_line(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be an experiment setting") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_experiment_file(path: Path) -> dict[str, Any]:
    """The raw mapping of an experiment file; ConfigError naming the file for anything that is not one
    (missing, a directory, unreadable, binary, not UTF-8, empty, not a mapping)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: experiment file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; expected an experiment YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); expected an experiment YAML file") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; expected an experiment YAML file")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file (NUL byte at offset {data.index(0)}); expected an "
                          "experiment YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected an experiment YAML file") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: empty; expected a mapping of settings (name, teachers, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (name, teachers, ...) at the top level, "
                          f"got a {type(raw).__name__}")
    return raw


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`--set key.path=value` → (["key", "path"], the value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"--set '{assignment}': expected key.path=value (e.g. train.lr=1e-4)")
    return parts, parse_yaml(text, f"--set '{assignment}'")


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Set one `--set` value in `raw`; a list element is addressed by its index (teachers.0.trait=cat)."""
    parts, value = parse_override(assignment)
    apply_setting(raw, parts, value, f"--set '{assignment}'")


def apply_setting(raw: dict[str, Any], parts: list[str], value: Any, source: str) -> None:
    """Set `value` at the key path `parts` of `raw` (`--set` and grid axes share these semantics): mappings
    are created as needed, a list element is addressed by its index. Errors name `source`."""
    node: Any = raw
    for depth, p in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not (p.isdigit() and int(p) < len(node)):
                raise ConfigError(f"{source}: '{'.'.join(parts[:depth])}' is a list of {len(node)}; "
                                  f"'{p}' is not an index in it")
            if last:
                node[int(p)] = value
            node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            node = node.setdefault(p, {})
        else:
            raise ConfigError(f"{source}: '{'.'.join(parts[:depth])}' is not a section")


def load_experiment(path: str | Path, overrides: list[str] | None = None, *,
                    runnable_here: bool = True) -> ExperimentConfig:
    """Read, merge (preset < file < overrides), validate an experiment file and check that it can run
    here (`check_runnable`; `runnable_here=False` skips that, e.g. for a GPU experiment read on a laptop).
    Every problem is a ConfigError naming the file, override or field."""
    path = Path(path)
    raw = with_extends(path, read_experiment_file(path), {path.resolve()})
    chosen = raw.pop("preset", None)
    rest = []
    for assignment in overrides or []:
        parts, value = parse_override(assignment)
        if parts == ["preset"]:
            chosen = value
        else:
            rest.append(assignment)
    try:
        base = preset(chosen) if chosen is not None else {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    merged = deep_merge(base, raw)
    for assignment in rest:
        _apply_override(merged, assignment)
    cfg = validate_experiment(merged, source=str(path))
    if runnable_here:
        check_runnable(cfg, source=str(path))
    return cfg


def with_extends(path: Path, raw: dict[str, Any], seen: set[Path]) -> dict[str, Any]:
    """`extends: other.yaml` (relative to this file): this file's settings override that experiment
    file's, which may extend another; a new experiment is then a file of overrides. Mappings merge key
    by key; a list (teachers, seeds) replaces the parent's whole."""
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: extends: expected the path of another experiment file, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen:
        raise ConfigError(f"{path}: extends: {parent} leads back to a file already being extended (a cycle)")
    try:
        parent_raw = read_experiment_file(parent_path)
    except ConfigError as e:
        raise ConfigError(f"{path}: extends: {e}") from None
    return deep_merge(with_extends(parent_path, parent_raw, seen | {parent_path}), raw)


def check_runnable(cfg: ExperimentConfig, source: str = "<config>") -> None:
    """What a valid config still needs from this machine, checked before any work: a CUDA device when
    `device: cuda`, every fine-tuning dataset file, and a run directory that can be created."""
    existing = next(p for p in [cfg.run_dir, *cfg.run_dir.parents] if p.exists() or p == Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{source}: runs_dir: {existing} is a file, so {cfg.run_dir} cannot be created; "
                          "give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{source}: runs_dir: {existing} is not writable, so {cfg.run_dir} cannot be created")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: device: cuda, but no CUDA device is available here; use device: auto "
                              "(CUDA when present, else CPU) or device: cpu")
    for i, t in enumerate(cfg.teachers):
        dataset = t.finetune.dataset if t.finetune is not None else "favourite-animal"
        if dataset == "favourite-animal":
            continue
        if dataset.startswith("builtin:"):
            name = dataset.split(":", 1)[1]
            found = resources.files("sublab").joinpath(f"resources/finetune/{name}.jsonl").is_file()
        else:
            found = Path(dataset).expanduser().is_file()
        if not found:
            raise ConfigError(f"{source}: teachers.{i}.finetune.dataset: '{dataset}' not found; give "
                              "'favourite-animal', builtin:<name> (sublab/resources/finetune) or a chat JSONL file")


def validate_experiment(raw: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a raw experiment mapping; ConfigError with one line per problem, each naming the field."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    except RecursionError:  # a YAML alias that contains itself
        raise ConfigError(f"{source}: a setting refers to itself (YAML alias cycle)") from None


RUN_CONFIG = "config.json"
"""The resolved config, as the last stage command ran it, in the run directory."""


def load_run_config(run_dir: Path) -> ExperimentConfig:
    """The config recorded in `run_dir/config.json`, pointed at `run_dir` wherever it now lies."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / RUN_CONFIG
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected the mapping `sublab` records there; rerun a stage to rewrite it")
    cfg = validate_experiment(raw, source=str(path))
    return cfg.model_copy(update={"runs_dir": str(run_dir.parent), "name": run_dir.name})


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = _one_line(err["msg"].removeprefix("Value error, "))
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `sublab validate --help` lists the fields)"
        # A whole-config check has no location; its message names the fields itself.
        lines.append(f"{source}: {field}: {msg}" if field else f"{source}: {msg}")
    return "\n".join(lines)


def dump(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
