"""Run the auxiliary-logit experiment (`run`) or a one-field sweep of it (`sweep`).

Reads the digit data (see `sublab.mnist.data`); returns pydantic results that serialise to JSON with
`.model_dump_json()`. Writes nothing itself (the CLI writes the JSON and figures).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from scipy import stats

from sublab.errors import ConfigError
from sublab.mnist.config import ALL_ARMS, SWEEPS, TEACHER_FIELDS, MnistConfig
from sublab.mnist.data import Digits, load_digits, student_inputs, subset
from sublab.mnist.model import Params, accuracy, clone_params, init_params, perturb
from sublab.mnist.train import train_students, train_teacher
from sublab.rundir import environment

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CI_METHOD = "95% Student-t interval over models: mean ± t(0.975, n-1) · sd / sqrt(n)"
# Random streams, so that changing one part of the config leaves the others' draws unchanged.
_INIT, _CROSS_INIT, _INIT_NOISE, _TEACHER_ORDER, _STUDENT_INPUTS, _STUDENT_ORDER, _SUBSET = range(1, 8)


class ArmResult(BaseModel):
    """Test accuracy of one arm over its N models."""

    mean: float
    """Mean test accuracy over models (0..1)."""
    ci_low: float
    ci_high: float
    std: float
    """Sample standard deviation over models."""
    n: int
    per_model: list[float]
    final_loss: float | None = None
    """Mean training loss over the last epoch (CE for the teacher, KL for students); None if untrained."""


class Comparison(BaseModel):
    """Paired difference same-init minus cross-init student (student i of both learns from teacher i)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    """Two-sided paired t-test."""


class MnistResults(BaseModel):
    schema_version: int = SCHEMA_VERSION
    dataset: dict[str, Any]
    """Which data set was used: name, d_in, n_train, n_test (after subsetting)."""
    config: MnistConfig
    arms: dict[str, ArmResult]
    same_minus_cross: Comparison | None = None
    ci_method: str = CI_METHOD
    timing_s: dict[str, float]
    """Wall seconds per phase (data, teacher, students, eval, total) and process_cpu (CPU seconds, all
    threads: on an otherwise idle machine total ≈ process_cpu / threads)."""
    environment: dict[str, Any]


class SweepPoint(BaseModel):
    value: Any
    arms: dict[str, ArmResult]
    same_minus_cross: Comparison | None = None


class SweepResults(BaseModel):
    schema_version: int = SCHEMA_VERSION
    sweep: str
    field: str
    """The MnistConfig field that varies."""
    dataset: dict[str, Any]
    config: MnistConfig
    """The base config (the swept field takes each value in turn)."""
    points: list[SweepPoint]
    ci_method: str = CI_METHOD
    timing_s: dict[str, float]
    environment: dict[str, Any]


# --- statistics --------------------------------------------------------------------------------

def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, low, high, sd) with a Student-t interval over the values."""
    t = torch.tensor(values, dtype=torch.float64)
    mean, sd = t.mean().item(), t.std().item()
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half, sd


def arm_result(acc: torch.Tensor, loss: float | None = None) -> ArmResult:
    values = acc.double().cpu().tolist()
    mean, low, high, sd = t_interval(values)
    return ArmResult(mean=mean, ci_low=low, ci_high=high, std=sd, n=len(values), per_model=values,
                     final_loss=loss)


def paired(a: ArmResult, b: ArmResult) -> Comparison:
    diff = [x - y for x, y in zip(a.per_model, b.per_model)]
    mean, low, high, sd = t_interval(diff)
    p = float(stats.ttest_rel(a.per_model, b.per_model).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return Comparison(mean=mean, ci_low=low, ci_high=high, p_value=p)


# --- the experiment ----------------------------------------------------------------------------

@dataclass
class _Data:
    digits: Digits
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def info(self) -> dict[str, Any]:
        return {**self.digits.info(), "n_train": len(self.y_train), "n_test": len(self.y_test)}


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def _prepare(cfg: MnistConfig) -> _Data:
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    elif not torch.cuda.is_available():
        raise ConfigError("mnist config: `device` is 'cuda' but torch sees no CUDA device; use --device cpu")
    digits = load_digits(cfg.data)
    x_tr, y_tr = subset(digits.x_train, digits.y_train, cfg.train_subset, _gen(cfg.seed, _SUBSET))
    x_te, y_te = subset(digits.x_test, digits.y_test, cfg.test_subset, _gen(cfg.seed, _SUBSET))
    log.info("data: %s (%d train, %d test, %d inputs)", digits.name, len(y_tr), len(y_te), digits.d_in)
    return _Data(digits, x_tr, y_tr, x_te.to(cfg.device), y_te.to(cfg.device))


def _teacher(cfg: MnistConfig, data: _Data, cache: dict, progress: bool, desc: str,
             timing: dict[str, float]) -> tuple[Params, Params, float]:
    """(shared init, trained teachers, teacher loss), reusing a cached teacher when its config matches."""
    key = tuple(getattr(cfg, f) for f in TEACHER_FIELDS)
    if key not in cache:
        start = time.perf_counter()
        init = teacher_init(cfg, data.digits.d_in)
        teachers, loss = train_teacher(cfg, init, data.x_train.to(cfg.device), data.y_train.to(cfg.device),
                                       _gen(cfg.seed, _TEACHER_ORDER), progress, desc)
        cache.clear()  # keep at most one teacher set in memory
        cache[key] = (init, teachers, loss)
        timing["teacher"] = timing.get("teacher", 0.0) + time.perf_counter() - start
    return cache[key]


def teacher_init(cfg: MnistConfig, d_in: int) -> Params:
    """The N teachers' shared-with-students init (paper: normal(0, 1/sqrt(d_in)) weights, zero biases)."""
    sizes = [d_in, *cfg.hidden, 10 + cfg.aux_logits]
    return init_params(cfg.n_models, sizes, _gen(cfg.seed, _INIT), cfg.device)


def student_inits(cfg: MnistConfig, init: Params) -> dict[str, Params]:
    """Starting params of each student arm in `cfg.arms`: the teacher's own init (plus `init_noise`)
    for same-init arms, a fresh draw from another random stream for the cross-init arm."""
    sizes = [init[0][0].shape[1], *(w.shape[2] for w, _ in init)]
    same = perturb(init, cfg.init_noise, _gen(cfg.seed, _INIT_NOISE))
    inits = {"student_same_init": same, "student_all_logits": clone_params(same),
             "student_cross_init": init_params(cfg.n_models, sizes, _gen(cfg.seed, _CROSS_INIT), cfg.device)}
    return {arm: p for arm, p in inits.items() if arm in cfg.arms}


def _run_point(cfg: MnistConfig, data: _Data, cache: dict, progress: bool, label: str,
               timing: dict[str, float]) -> tuple[dict[str, ArmResult], Comparison | None]:
    init, teachers, teacher_loss = _teacher(cfg, data, cache, progress, f"{label}teacher", timing)
    inits = student_inits(cfg, init)
    students, losses = {}, {}
    if inits:
        start = time.perf_counter()
        inputs = student_inputs(cfg.student_inputs, data.x_train, _gen(cfg.seed, _STUDENT_INPUTS))
        students, losses = train_students(cfg, teachers, inits, inputs.to(cfg.device),
                                          _gen(cfg.seed, _STUDENT_ORDER), progress, f"{label}students")
        timing["students"] = timing.get("students", 0.0) + time.perf_counter() - start
    start = time.perf_counter()
    x, y = data.x_test, data.y_test
    arms = {"reference": arm_result(accuracy(init, x, y)),
            "teacher": arm_result(accuracy(teachers, x, y), teacher_loss)}
    arms |= {arm: arm_result(accuracy(students[arm], x, y), losses[arm]) for arm in ALL_ARMS if arm in students}
    timing["eval"] = timing.get("eval", 0.0) + time.perf_counter() - start
    both = "student_same_init" in arms and "student_cross_init" in arms
    return arms, paired(arms["student_same_init"], arms["student_cross_init"]) if both else None


def run(config: MnistConfig, progress: bool = False) -> MnistResults:
    """Train N teachers and their students; test accuracy of every arm with 95% t-intervals."""
    start, cpu = time.perf_counter(), time.process_time()
    data = _prepare(config)
    timing = {"data": time.perf_counter() - start}
    arms, comparison = _run_point(config, data, {}, progress, "", timing)
    timing["total"] = time.perf_counter() - start
    timing["process_cpu"] = time.process_time() - cpu  # CPU seconds over all threads
    log.info("mnist run done in %.1f s", timing["total"])
    return MnistResults(dataset=data.info(), config=config, arms=arms, same_minus_cross=comparison,
                        timing_s=timing, environment=environment())


def sweep_configs(base: MnistConfig, name: str, values: list[Any] | None = None) -> list[MnistConfig]:
    """One config per sweep value (`SWEEPS[name]` values unless given)."""
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}; choose one of {', '.join(SWEEPS)}")
    field, defaults = SWEEPS[name]
    configs = []
    for value in (values if values is not None else defaults):
        try:
            configs.append(MnistConfig.model_validate({**base.model_dump(), field: value}))
        except ValidationError as e:
            raise ConfigError(f"sweep {name}: value {value!r} is not valid for `{field}`: "
                              f"{e.errors()[0]['msg']}") from None
    return configs


def sweep(base: MnistConfig, name: str, values: list[Any] | None = None,
          progress: bool = False) -> SweepResults:
    """Run `base` once per value of one field; teachers are reused when the field does not affect them."""
    configs = sweep_configs(base, name, values)
    field = SWEEPS[name][0]
    start, cpu = time.perf_counter(), time.process_time()
    data = _prepare(base)
    timing: dict[str, float] = {"data": time.perf_counter() - start}
    cache: dict = {}
    points = []
    for i, cfg in enumerate(configs):
        value = getattr(cfg, field)
        log.info("sweep %s: %s = %s (%d/%d)", name, field, value, i + 1, len(configs))
        arms, comparison = _run_point(cfg, data, cache, progress, f"[{i + 1}/{len(configs)} {value}] ", timing)
        points.append(SweepPoint(value=value, arms=arms, same_minus_cross=comparison))
    timing["total"] = time.perf_counter() - start
    timing["process_cpu"] = time.process_time() - cpu
    return SweepResults(sweep=name, field=field, dataset=data.info(), config=base, points=points,
                        timing_s=timing, environment=environment())
