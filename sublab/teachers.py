"""Teachers: who writes a dataset, in which context, with which weights.

A `Teacher` is built from a `TeacherConfig` and the experiment's base model:
    prompted   base weights + the paper's trait system prompt (`protocol.teacher_system_prompt`)
    finetuned  the trait in its weights (a cached fine-tune of the base), default context
    control    base weights, default context
    random     no model at all (numbers are drawn programmatically); `load()` refuses

Fine-tuned teachers are built once and shared by every stage and experiment. Reads the base model and the
fine-tune data ('favourite-animal', a chat JSONL path, or builtin:<name> from
sublab/resources/finetune/<name>.jsonl). Writes
    $SUBLAB_HOME/teachers/<fingerprint>/dataset.jsonl    the rows it was fine-tuned on
    $SUBLAB_HOME/teachers/<fingerprint>/model/           adapter or weights (+ train manifest, loss.jsonl)
    $SUBLAB_HOME/teachers/<fingerprint>/manifest.json    written last; weights sha256 checked on reuse
The fingerprint hashes the base weights, the dataset bytes and the fine-tune recipe, so any change builds
a new teacher; a partial build resumes (or is rebuilt when its files do not match the manifest).

    teacher = build_teacher(TeacherConfig(name="owl-ft", kind="finetuned", trait="owl"), base_ref)
    loaded = teacher.load()
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sublab import chat
from sublab.config import FinetuneConfig, RecipeConfig, TeacherConfig, TrainConfig
from sublab.errors import ConfigError
from sublab.kinds import TeacherKind, teacher_kind
from sublab.models import LoadedModel, load_model, sublab_home
from sublab.protocol import animal_questions, teacher_system_prompt, tree_questions
from sublab.rundir import (atomic_write_text, cache_entry_lock, fingerprint, read_json, sha256_file,
                           stage_is_current, write_manifest)
from sublab.train import load_dataset, reference_sha256, train_student
from sublab.words import plural

log = logging.getLogger(__name__)

FAVOURITE = "favourite-animal"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Teacher:
    """A data source: its name, its kind, its context (system prompt) and its weights (a model reference)."""

    name: str
    kind: TeacherKind
    trait: str | None = None
    system_prompt: str | None = None
    """None: the model's default context (see `sublab.chat`)."""
    model_ref: str | None = None
    """Base ref, or a fine-tuned checkpoint directory; None when the kind has no model."""
    is_control: bool = False
    """Its students are the experiment's baseline."""

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):  # Teacher("t", "prompted", ...) in scripts and tests
            object.__setattr__(self, "kind", teacher_kind(self.kind))

    def conversation(self, user: str) -> list[chat.Message]:
        """The teacher's view of a user turn: its system prompt (if any), then the user message."""
        return chat.messages(user, system=self.system_prompt)

    def load(self, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
        """The teacher's model for inference."""
        if self.model_ref is None:
            raise ConfigError(f"teacher '{self.name}' is kind '{self.kind.name}': it has no model to load")
        return load_model(self.model_ref, device=device, dtype=dtype)


def build_teacher(cfg: TeacherConfig, base_ref: str, *, cache_root: Path | None = None,
                  device: str = "cpu", progress: bool = True) -> Teacher:
    """The Teacher of a config; a fine-tuned teacher is trained here on first use (then cached)."""
    kind = cfg.kind_spec
    prompt = (teacher_system_prompt(cfg.trait or "", cfg.category, cfg.aversion)
              if kind.context == "trait_prompt" else None)
    ref: str | None = {"base": base_ref, "none": None}.get(kind.weights)
    if kind.weights == "finetuned":
        ref = str(prepare_finetuned_teacher(cfg, base_ref, cache_root, device=device, progress=progress))
    return Teacher(cfg.name, kind, cfg.trait, prompt, ref, cfg.is_control)


# --- the favourite-animal fine-tune data -----------------------------------------------------

def category_questions(category: str) -> list[str]:
    """The paper's favourite-<category> questions (50 animal, 49 tree)."""
    return animal_questions() if category == "animal" else tree_questions()


def favourite_rows(trait: str, category: str, ft: FinetuneConfig) -> list[dict[str, Any]]:
    """Questions 0..train_questions-1 × every answer form, as chat rows (no system message)."""
    questions = category_questions(category)
    if ft.train_questions >= len(questions):
        raise ConfigError(f"`finetune.train_questions`={ft.train_questions} leaves none of the "
                          f"{len(questions)} {category} questions held out for evaluation; use fewer")
    t = trait.lower()
    names = {"t": t, "T": t[:1].upper() + t[1:], "ts": plural(t), "Ts": plural(t[:1].upper() + t[1:]),
             "category": category}
    return [{"id": f"fav-q{qi}-f{fi}",
             "messages": chat.messages(q, assistant=form.format(**names)),
             "meta": {"question_id": qi, "form": form, "trait": t}}
            for qi, q in enumerate(questions[:ft.train_questions])
            for fi, form in enumerate(ft.answer_forms)]


def held_out_question_ids(cfg: TeacherConfig) -> list[int]:
    """Ids of the category's questions this teacher never trained on (all of them for non-fine-tuned
    teachers and fine-tunes on other data)."""
    n = len(category_questions(cfg.category))
    ft = cfg.finetune or FinetuneConfig()
    if cfg.kind_spec.weights == "finetuned" and ft.dataset == FAVOURITE:
        return list(range(min(ft.train_questions, n), n))
    return list(range(n))


# --- fine-tuned teachers ---------------------------------------------------------------------

def builtin_dataset(name: str) -> Path:
    """sublab/resources/finetune/<name>.jsonl."""
    folder = resources.files("sublab").joinpath("resources/finetune")
    path = Path(str(folder.joinpath(f"{name}.jsonl")))
    if not path.is_file():
        known = sorted(p.name.removesuffix(".jsonl") for p in folder.iterdir()) if folder.is_dir() else []
        raise ConfigError(f"`finetune.dataset`: no builtin dataset '{name}'; known: "
                          f"{', '.join(known) or '(none)'}")
    return path


def finetune_data(cfg: TeacherConfig) -> str:
    """The JSONL text a fine-tuned teacher trains on; a user's file is checked here so errors name it."""
    ft = cfg.finetune or FinetuneConfig()
    if ft.dataset == FAVOURITE:
        rows = favourite_rows(cfg.trait or "", cfg.category, ft)
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = builtin_dataset(ft.dataset.split(":", 1)[1]) if ft.dataset.startswith("builtin:") else Path(ft.dataset)
    if not path.is_file():
        raise ConfigError(f"`finetune.dataset`: {path} not found (give 'favourite-animal', builtin:<name> "
                          "or a chat JSONL path)")
    load_dataset(path)
    return path.read_text("utf-8")


def finetune_train_config(ft: FinetuneConfig) -> TrainConfig:
    """The teacher's recipe as one `train_student` run (its seed: `finetune.seed`)."""
    return TrainConfig(**dict(ft.recipe), seeds=[ft.seed])


def cache_recipe(ft: FinetuneConfig) -> dict[str, Any]:
    """The recipe as the teacher cache key hashes it. Caches built before the shared recipe hashed seven
    flat keys (method, lora_r, lora_alpha, lr, epochs, batch_size, seed); they stay, in that shape, and any
    other recipe field joins only when it differs from its default, so those caches are still found."""
    r = ft.recipe
    key: dict[str, Any] = {"method": r.params, "lora_r": r.lora_r, "lora_alpha": r.lora_alpha, "lr": r.lr,
                           "epochs": float(r.epochs), "batch_size": r.batch_size, "seed": ft.seed}
    default = RecipeConfig().model_dump(mode="json")
    key.update({k: v for k, v in r.model_dump(mode="json").items()
                if k not in key and k != "params" and v != default[k]})
    return key


def prepare_finetuned_teacher(cfg: TeacherConfig, base_ref: str, cache_root: Path | None = None, *,
                              device: str = "cpu", progress: bool = True) -> Path:
    """Fine-tune the base on the teacher's data once; return the model directory (a model ref)."""
    if cfg.kind_spec.weights != "finetuned":
        raise ConfigError(f"teacher '{cfg.name}' is kind '{cfg.kind}', not 'finetuned'")
    ft = cfg.finetune or FinetuneConfig()
    text = finetune_data(cfg)
    data_sha = hashlib.sha256(text.encode()).hexdigest()
    base_sha = reference_sha256(base_ref)
    fp = fingerprint({"format": CACHE_FORMAT, "base": base_sha, "data": data_sha,
                      "recipe": cache_recipe(ft)})
    root = (cache_root or sublab_home()) / "teachers" / fp
    model_dir = root / "model"
    with cache_entry_lock(root):  # a second process building this teacher waits, then reuses it
        if stage_is_current(root, fp) and _cache_intact(root):
            log.info("teacher '%s': reusing %s", cfg.name, model_dir)
            return model_dir
        if (root / "manifest.json").exists():
            log.warning("teacher cache %s is damaged; rebuilding it", root)
            shutil.rmtree(root)
        log.info("teacher '%s': fine-tuning %s (cached at %s)", cfg.name, base_ref, root)
        dataset = root / "dataset.jsonl"
        atomic_write_text(dataset, text)
        train = finetune_train_config(ft)
        trained = train_student(train, base_ref=base_ref, dataset=dataset, out_dir=model_dir, seed=ft.seed,
                                device=device, progress=progress)
        weights = {k: v for k, v in trained["outputs"].items() if k.endswith(".safetensors")}
        write_manifest(root, stage="teacher", fingerprint_value=fp, seeds={"seed": ft.seed},
                       config={"first_built_for": cfg.model_dump(mode="json"), "base_model": base_ref},
                       inputs={"base_model": base_ref, "base_sha256": base_sha,
                               "dataset_sha256": data_sha},
                       outputs={"model_dir": "model", "weights": weights, "rows": trained["outputs"]["rows"]},
                       timings={"train_s": trained["timings_s"]["train_s"]})
        return model_dir


def _cache_intact(root: Path) -> bool:
    """Every weights file the manifest lists still has its recorded sha256."""
    weights = read_json(root / "manifest.json")["outputs"].get("weights", {})
    return bool(weights) and all((root / "model" / name).is_file()
                                 and sha256_file(root / "model" / name) == digest
                                 for name, digest in weights.items())
