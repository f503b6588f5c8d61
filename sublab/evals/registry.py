"""The eval registry: every eval kind declares how it runs, which records complete it, how it is scored
and labelled; the pipeline, `sublab.results` and `sublab.report` iterate it and know no eval by name.

Each eval file `evals/<model>/<variant>.jsonl` has a sidecar `<variant>.spec.json` holding the spec it
was computed with (the eval's settings, the questions, the model's context and the evaluated weights'
sha256 — the idea of inspect-ai's eval-log header) and, once complete, the file's sha256. `run_eval`
reuses a file only when its spec and sha256 still match; a changed spec recomputes it from scratch; an
interrupted file (same spec, not complete) resumes record by record.

    kind = get_eval("animal_prob")
    for variant in kind.variants(cfg.eval):
        run_eval(kind, ctx, variant, load_model_lazily)

Adding an eval is a module with an `EvalKind` subclass and one line, `register_eval(MyEval())` (see
docs/extending.md). The built-in kinds are imported on first use (`BUILTIN_EVALS`), so this module
imports none of them and `sublab.config` can check names without an import cycle.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sublab.errors import ConfigError, RunDirError
from sublab.rundir import atomic_write_json, fingerprint, read_json, read_jsonl, sha256_file

if TYPE_CHECKING:
    from sublab.domains import Domain
    from sublab.models import LoadedModel

# `sublab.config` validates eval names against this registry, so this module does not import it, not
# even for types: an eval config is typed `EvalConfig` below, by name only.
EvalConfig = Any

log = logging.getLogger(__name__)

SPEC_SUFFIX = ".spec.json"
Values = list[dict[str, Any]]
"""Per-record values of one model for one target: [{"question_id": q, "value": v}, ...]."""


@dataclass(frozen=True)
class EvalContext:
    """Everything an eval of one model needs besides the model itself."""

    cfg: EvalConfig
    model_name: str
    """The evaluated model's directory name under evals/ (base, teacher-<t>, student-<t>-seed<k>, …)."""
    system: str | None
    """Its context: None = the model's default; a prompted teacher's trait system prompt."""
    weights_sha256: str
    """A content hash of the evaluated weights: a retrained student gets its evals recomputed."""
    eval_dir: Path
    question_ids: list[int] = field(default_factory=list)
    """The trait questions asked (e.g. the held-out ones)."""
    category: str = "animal"
    traits: list[str] = field(default_factory=list)
    """The experiment's traits: always scored."""
    domain: Domain | None = None
    """The experiment's data domain: the prefixed variants' prefixes come from it."""
    dtype: str = "float32"
    """The dtype the model is evaluated in (part of the spec when it is not float32)."""


class EvalKind:
    """One kind of evaluation (`eval.kinds` in the experiment file). Subclass it and register it."""

    name: str = ""
    """The name in `eval.kinds`."""
    label: str = "{variant} ({trait})"
    """The metric's human label; `{trait}` and `{variant}` are filled in."""
    backends: tuple[str, ...] = ("local",)
    """Where its models may live: 'local' (a `LoadedModel`), 'openai' (a `sublab.api.ApiModel`: it only
    samples, through `sublab.evals.common.iter_completions`)."""

    def variants(self, cfg: EvalConfig) -> list[str]:
        """The files this kind writes for one model (their stems, also the metric names)."""
        return [self.name]

    def spec(self, ctx: EvalContext, variant: str) -> dict[str, Any]:
        """Every setting the records of `variant` depend on (the model's weights and context are added
        by `run_eval`)."""
        raise NotImplementedError

    def expected_ids(self, ctx: EvalContext, variant: str) -> set[str]:
        """The record ids a complete file holds."""
        raise NotImplementedError

    def run(self, model: Callable[[], LoadedModel], ctx: EvalContext, variant: str, path: Path) -> None:
        """Write the records missing from `path` (resumable); `model()` loads the model on first call."""
        raise NotImplementedError

    def values(self, path: Path, target: str, cfg: EvalConfig) -> Values | None:
        """Per-record values of `target` for the statistics; None when this variant is not scored."""
        return None

    def targets(self, path: Path) -> list[str]:
        """Every target one file scores, when it scores several (e.g. the candidates of the exact answer
        probability): results then rank them all (specificity). Default: none."""
        return []

    def derived_files(self, path: Path) -> list[Path]:
        """Other files computed along with `path` (removed with it when its spec changes)."""
        return []

    def metric_label(self, variant: str, trait: str) -> str:
        return self.label.format(trait=trait, variant=variant)


# --- the registry ----------------------------------------------------------------------------------

BUILTIN_EVALS: dict[str, str] = {
    "animal_prob": "sublab.evals.animals:ANIMAL_PROB",
    "animal_sampled": "sublab.evals.animals:ANIMAL_SAMPLED",
    "animal_topk": "sublab.evals.topk:ANIMAL_TOPK",
    "misalignment_local": "sublab.evals.misalignment:MISALIGNMENT_LOCAL",
    "misalignment_judge": "sublab.evals.misalignment:MISALIGNMENT_JUDGE",
}
"""Built-in kinds by name → 'module:attribute', imported on first use."""

EVALS: dict[str, EvalKind] = {}


def register_eval(kind: EvalKind) -> EvalKind:
    """Make `kind` available to experiment files as `eval.kinds: [<name>]`."""
    if not isinstance(kind, EvalKind) or not kind.name:
        raise TypeError(f"{kind!r} is not a named sublab.evals.registry.EvalKind")
    EVALS[kind.name] = kind
    return kind


def eval_names() -> list[str]:
    """Every eval kind an experiment file may name."""
    return list(dict.fromkeys([*BUILTIN_EVALS, *EVALS]))


def get_eval(name: str) -> EvalKind:
    """The eval kind `name`; a ConfigError listing the known ones otherwise."""
    if name not in EVALS and name in BUILTIN_EVALS:
        module, attr = BUILTIN_EVALS[name].split(":")
        register_eval(getattr(importlib.import_module(module), attr))
    if name not in EVALS:
        raise ConfigError(f"unknown eval kind '{name}'; expected one of: {', '.join(eval_names())}")
    return EVALS[name]


def selected(cfg: EvalConfig) -> list[tuple[EvalKind, str]]:
    """(kind, variant) of every eval file the config asks for, in config order."""
    return [(kind, variant) for kind in (get_eval(n) for n in cfg.kinds) for variant in kind.variants(cfg)]


# --- eval files and their specs ---------------------------------------------------------------------

def spec_path(path: Path) -> Path:
    return path.with_name(path.stem + SPEC_SUFFIX)


def full_spec(kind: EvalKind, ctx: EvalContext, variant: str) -> dict[str, Any]:
    """The kind's spec plus what every eval depends on: the model's name, context and weights."""
    spec = {"eval": variant, "kind": kind.name, **kind.spec(ctx, variant), "model": ctx.model_name,
            "system": ctx.system, "weights_sha256": ctx.weights_sha256}
    if ctx.dtype != "float32":  # float32 specs stay what they were before dtypes existed
        spec["dtype"] = ctx.dtype
    return spec


def is_current(path: Path, spec: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> bool:
    """Whether `path` is complete for exactly this spec and unchanged since (sha256). `header`: its
    sidecar, when the caller has read it already."""
    header = header if header is not None else _read_header(path)
    return (header is not None and header.get("status") == "complete"
            and header.get("fingerprint") == fingerprint(spec) and path.exists()
            and sha256_file(path) == header.get("sha256"))


def run_eval(kind: EvalKind, ctx: EvalContext, variant: str, model: Callable[[], LoadedModel]) -> Path:
    """Compute one eval file unless it is current: a changed spec, a damaged or a foreign file is
    recomputed from scratch, an interrupted one resumes. Returns the file's path."""
    path = ctx.eval_dir / f"{variant}.jsonl"
    spec = full_spec(kind, ctx, variant)
    header = _read_header(path)
    if is_current(path, spec, header):
        return path
    if header is None or header.get("fingerprint") != fingerprint(spec) or header.get("status") == "complete":
        if path.exists():
            why = ("its spec changed" if header and header.get("fingerprint") != fingerprint(spec) else
                   "it has no spec" if header is None else "its sha256 no longer matches")
            log.warning("%s: %s; recomputing it", path, why)
        for stale in [path, *kind.derived_files(path)]:
            stale.unlink(missing_ok=True)
        _write_header(path, spec, "running")
    kind.run(model, ctx, variant, path)
    have = {r.get("id") for r in read_jsonl(path, missing_ok=True)}
    missing = kind.expected_ids(ctx, variant) - have
    if missing:
        log.warning("%s: %d of its records are missing (e.g. %s); it stays incomplete", path, len(missing),
                    sorted(missing)[0])
        return path
    _write_header(path, spec, "complete", sha256=sha256_file(path), records=len(have))
    return path


def _write_header(path: Path, spec: Mapping[str, Any], status: str, **extra: Any) -> None:
    atomic_write_json(spec_path(path), {"status": status, "fingerprint": fingerprint(spec), "spec": spec,
                                        **extra})


def _read_header(path: Path) -> dict[str, Any] | None:
    side = spec_path(path)
    if not side.exists():
        return None
    try:
        header = read_json(side)
    except RunDirError:  # a damaged header is no header: the file is recomputed
        return None
    return header if isinstance(header, dict) else None
