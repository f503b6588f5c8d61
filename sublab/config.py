"""The experiment file: pydantic models for every stage, presets, and clear validation errors.

An experiment YAML names the base model, the teachers (a trait and how it is induced), the data, the
filters, the students and the evaluations. Precedence: preset < YAML < `--set key=value`.
`sublab validate EXP.yaml` prints the resolved config.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sublab.errors import ConfigError, ModelError
from sublab.models import DEFAULT_MODEL, check_reference


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class FinetuneConfig(_Strict):
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
    method: Literal["lora", "full"] = "full"
    lora_r: int = Field(32, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lr: float = Field(3e-5, gt=0)
    epochs: float = Field(2, gt=0)
    batch_size: int = Field(8, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.dataset == "favourite-animal" and not self.answer_forms:
            raise ValueError("`finetune.answer_forms` must list at least one answer form")
        for form in self.answer_forms:
            try:
                form.format(t="x", T="X", ts="xs", Ts="Xs", category="animal")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"`finetune.answer_forms`: '{form}' may only use the placeholders "
                                 "{t}, {T}, {ts}, {Ts}, {category}") from None
        return self


class TeacherConfig(_Strict):
    """One data source: a trait teacher, the neutral control, or programmatic random numbers."""

    name: str
    """Directory name under teachers/ (letters, digits, '-', '_')."""
    kind: Literal["prompted", "finetuned", "control", "random"] = "prompted"
    """prompted: base + trait system prompt; finetuned: trait in the weights; control: base, no system
    prompt; random: random numbers formatted as each prompt asks (no model at all)."""
    trait: str | None = None
    """The target, e.g. 'owl'. Required for prompted and finetuned teachers."""
    category: Literal["animal", "tree"] = "animal"
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
        if self.control and self.kind != "finetuned":
            raise ValueError(f"teacher '{self.name}': `control: true` is for fine-tuned teachers; use "
                             "kind: control for the untouched base")
        if self.kind in ("prompted", "finetuned") and not self.trait and not self.control:
            raise ValueError(f"teacher '{self.name}': `trait` is required when kind is '{self.kind}'")
        if self.kind in ("control", "random") and self.trait:
            raise ValueError(f"teacher '{self.name}': a {self.kind} teacher has no trait; remove `trait`")
        if self.finetune is not None and self.kind != "finetuned":
            raise ValueError(f"teacher '{self.name}': `finetune` only applies when kind is 'finetuned'; "
                             "remove it or set kind: finetuned")
        return self

    @property
    def is_control(self) -> bool:
        return self.kind in ("control", "random") or self.control


class GenerateConfig(_Strict):
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
    logits on it (needs `train.method: distill`)."""


class FilterConfig(_Strict):
    """Which filters a completion must pass, and how many accepted rows to keep."""

    filters: list[Literal["format", "banned_numbers", "trait_words"]] = ["format", "trait_words"]
    dataset_size: int = Field(300, gt=0)
    """Rows kept after filtering (deterministic subsample; the paper: 10,000)."""
    subsample_seed: int = 0


class DistillConfig(_Strict):
    """Logit distillation: the student matches the teacher's next-token distribution on completions."""

    top_k: int | None = Field(None, gt=0)
    """None: forward KL over the full vocabulary; k: over the teacher's top-k tokens (renormalised), the
    only form that can be precomputed and stored beside a dataset (`sublab.train.compute_soft_labels`)."""
    temperature: float = Field(1.0, gt=0)
    """Softens teacher and student alike; the loss is scaled by temperature² (Hinton et al.)."""
    vocabulary: Literal["full", "format"] = "full"
    """full: match the teacher's whole next-token distribution. format: renormalise teacher and student
    over the number-format tokens only (digits, separators, brackets, end token; `sublab.sampling.
    format_token_mask`) — no token that could begin a word carries any signal, so a trait can only pass
    through how the teacher spreads its mass over numbers (the logit analogue of the paper's filters and
    of MNIST's auxiliary logits)."""

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.vocabulary == "format" and self.top_k is not None:
            raise ValueError("`train.distill.vocabulary: format` already restricts the target to the "
                             "number-format tokens; leave `top_k` unset")
        return self


class TrainConfig(_Strict):
    """How students learn from a teacher's dataset (`sublab.train.train_student`)."""

    method: Literal["lora", "full", "distill"] = "lora"
    """lora/full: SFT on completions; distill: match the teacher's logits (full fine-tuning or LoRA per
    `distill_params`)."""
    distill_params: Literal["full", "lora"] = "full"
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(8, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_init_seed: int | None = None
    """Seed of the fresh adapter's random init; None: the student's seed. Set it to a LoRA teacher's
    `finetune.seed` (with the same rank, alpha and targets) and the student starts from the teacher's own
    initial adapter: a shared initialisation of the trained parameters, as in the paper's MNIST setup."""
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
    seeds: list[int] = [0, 1, 2]
    """One student per seed per teacher: the unit of statistical analysis. A seed fixes data order,
    LoRA init and dropout."""
    distill: DistillConfig = DistillConfig()
    cross_model: str | None = None
    """A different base (e.g. 'embedded:gemma3-270m') trained on the same data as a cross-model control."""
    checkpoint_every: int = Field(50, gt=0)
    """Optimizer steps between resumable checkpoints."""


class EvalConfig(_Strict):
    """Trait evaluations run on the base, each teacher, and every student."""

    kinds: list[Literal["animal_prob", "animal_sampled", "misalignment_local", "misalignment_judge"]] = [
        "animal_prob", "animal_sampled"]
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
    judge_url: str | None = None
    """OpenAI-compatible endpoint for misalignment judges; None: the OpenAI API if OPENAI_API_KEY is set."""
    judge_model: str = "gpt-4o-2024-08-06"
    seed: int = 0


class ExperimentConfig(_Strict):
    """A whole experiment: teachers → data → filters → students → evaluations → report."""

    name: str
    base_model: str = DEFAULT_MODEL
    """Model reference shared by teachers and students (see `sublab models list`)."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    seed: int = 0
    teachers: list[TeacherConfig]
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runs_dir: str = "runs"

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique, got {names}")
        if not any(t.is_control for t in self.teachers) and self.train.seeds:
            raise ValueError("teachers: add a control teacher (kind: control or random, or a fine-tuned "
                             "teacher with control: true); students are "
                             "compared with control students, never with the base model alone")
        self._check_shared_init()
        if self.generate.completions == "random" and self.train.method != "distill":
            raise ValueError("`generate.completions: random` gives every teacher the same rows, so SFT students "
                             "could not differ; use `train.method: distill` (students learn the teacher's "
                             "logits on the rows) or `completions: sampled`")
        for ref in [self.base_model] + ([self.train.cross_model] if self.train.cross_model else []):
            try:
                check_reference(ref)
            except ModelError as e:
                raise ValueError(str(e)) from None
        return self

    def _check_shared_init(self) -> None:
        """`train.lora_init_seed` with LoRA teachers means 'start from the teachers' adapter init': it only
        does if seed, rank, alpha and targets all match, so say which one does not."""
        t = self.train
        lora_student = t.method == "lora" or (t.method == "distill" and t.distill_params == "lora")
        if t.lora_init_seed is None or not lora_student:
            return
        default_targets = TrainConfig.model_fields["lora_targets"].default
        for teacher in self.teachers:
            ft = teacher.finetune or FinetuneConfig()
            if teacher.kind != "finetuned" or ft.method != "lora":
                continue
            mismatch = {name: (mine, theirs) for name, mine, theirs in [
                ("lora_init_seed / finetune.seed", t.lora_init_seed, ft.seed), ("lora_r", t.lora_r, ft.lora_r),
                ("lora_alpha", t.lora_alpha, ft.lora_alpha), ("lora_targets", t.lora_targets, default_targets)]
                if mine != theirs}
            if mismatch:
                detail = "; ".join(f"{k}: train {a} vs teacher {b}" for k, (a, b) in mismatch.items())
                raise ValueError(f"`train.lora_init_seed` starts students from the LoRA teachers' adapter init, "
                                 f"but teacher '{teacher.name}' differs ({detail})")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


PRESETS = ("quick", "paper")


def preset(name: str) -> dict[str, Any]:
    """The raw dict of a preset (`quick`: sized for 2 CPU cores; `paper`: the paper's numbers)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    text = resources.files("sublab").joinpath(f"resources/preset_{name}.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}': expected key.path=value")
    key, value = assignment.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set '{assignment}': '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge (preset < file < overrides) and validate an experiment file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: experiment file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    base = preset(raw.pop("preset")) if "preset" in raw else {}
    merged = _deep_merge(base, raw)
    for assignment in overrides or []:
        _apply_override(merged, assignment)
    return validate_experiment(merged, source=str(path))


def validate_experiment(raw: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `sublab validate --help` lists the fields)"
        lines.append(f"{source}: {field}: {msg}")
    return "\n".join(lines)


def dump(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
