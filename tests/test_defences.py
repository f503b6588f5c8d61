"""Defences on the distillation targets (sublab/train/defences.py, `train.distill.defence`): each transform
on hand-made targets, the loss of dropped positions, the base's targets, the fingerprint and the config."""

from __future__ import annotations

import math

import pytest
import torch

from sublab import audit
from sublab.config import DefenceConfig, DistillConfig, TrainConfig, load_experiment
from sublab.errors import ConfigError
from sublab.stats import fieller, fraction_removed
from sublab.models import load_model
from sublab.train import defences, loop
from sublab.train.losses import completion_logits, distill_loss
from sublab.train.targets import StoredTargets
from tests.test_audit import examples, exported  # noqa: F401 (a fixture)
from tests.test_train import cfg, other_teacher_dir  # noqa: F401 (a fixture)

SIZES = (3, 4, 3)


def stored(t: torch.Tensor) -> StoredTargets:
    return StoredTargets(list(t.split(list(SIZES))), None, "k", "sha", "test")


def toy() -> tuple[StoredTargets, StoredTargets]:
    """Teacher and base targets over 5 columns at 10 positions: the base is uniform; the teacher equals
    it except at positions 1, 4 and 8, peaked on column 0 by a known, decreasing amount."""
    base = torch.full((10, 5), -math.log(5))
    teacher = base.clone()
    for pos, peak in ((4, 6.0), (8, 4.0), (1, 2.0)):
        teacher[pos] = torch.tensor([peak, 0, 0, 0, 0]).log_softmax(-1)
    return stored(teacher), stored(base)


def flat(t: StoredTargets) -> torch.Tensor:
    return torch.cat(t.values)


def run_defence(defence: DefenceConfig, seed: int = 0, written=None):
    teacher, base = toy()
    return defences.apply_defence(teacher, base, written, defence, seed)


# --- each transform on hand-made targets ----------------------------------------------------------

def test_divergence_mask_drops_the_top_kl_positions():
    out, cost = run_defence(DefenceConfig(mask="divergence", fraction=0.2))
    weights = torch.cat(out.weights)
    assert weights.tolist() == [0.0 if p in (4, 8) else 1.0 for p in range(10)]  # the two largest KLs
    assert torch.equal(flat(out), flat(toy()[0]))  # drop leaves the targets, removes them from the loss
    assert cost["positions_dropped"] == pytest.approx(0.2) and cost["positions_replaced"] == 0


def test_divergence_mask_with_base_substitutes_the_base():
    out, cost = run_defence(DefenceConfig(mask="divergence", fraction=0.3, action="base"))
    teacher, base = (flat(t) for t in toy())
    for p in range(10):
        assert torch.equal(flat(out)[p], base[p] if p in (1, 4, 8) else teacher[p])
    assert out.weights is None and cost["positions_replaced"] == pytest.approx(0.3)
    assert cost["mean_kl_defended_teacher"] > 0


def test_log_ratio_mask_ranks_by_the_written_token():
    # column 0 written at 1 and 8 only (elsewhere column 3, or no format token at position 4): position 4's
    # large KL does not count, the written tokens' log-ratios do — 8 (peak 4) above 1 (peak 2)
    written = torch.full((10,), 3)
    written[[1, 8]], written[4] = 0, -1
    out, _ = run_defence(DefenceConfig(mask="log_ratio", fraction=0.1), written=list(written.split(list(SIZES))))
    assert torch.cat(out.weights).tolist() == [0.0 if p == 8 else 1.0 for p in range(10)]
    ratios = defences.log_ratio(flat(toy()[0]), flat(toy()[1]), written)
    assert ratios[4] == 0 == ratios[0] and ratios[8] > ratios[1] > 0


def test_random_mask_is_seeded_and_the_right_size():
    masks = [torch.cat(run_defence(DefenceConfig(mask="random", fraction=0.3), seed=s)[0].weights)
             for s in (0, 0, 1, 2)]
    assert all(int((m == 0).sum()) == 3 for m in masks)
    assert torch.equal(masks[0], masks[1])
    assert not (torch.equal(masks[0], masks[2]) and torch.equal(masks[0], masks[3]))


def test_top_k_and_min_p_keep_the_right_columns_and_sum_to_one():
    t = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]).log()
    top2 = defences.keep_top_k(t, 2)
    assert top2.exp().tolist()[0] == pytest.approx([0.625, 0.375, 0, 0, 0])
    assert defences.keep_top_k(t, 5).exp().sum() == pytest.approx(1.0)
    # p ≥ 0.2 × 0.5 = 0.1: columns 0, 1, 2
    kept = defences.keep_min_p(t, 0.2).exp()[0]
    assert kept.tolist() == pytest.approx([0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0])
    out, cost = run_defence(DefenceConfig(top_k=1))
    assert torch.allclose(flat(out).exp().sum(-1), torch.ones(10))
    assert cost["mean_kl_teacher_defended"] is None  # the teacher's removed mass: infinite KL
    assert 0 < cost["mean_kl_defended_teacher"] < math.inf


def test_target_temperature_sharpens_or_flattens():
    t = torch.tensor([[0.5, 0.3, 0.2]]).log()
    sharp, flat_ = defences.with_temperature(t, 0.5), defences.with_temperature(t, 2.0)
    assert sharp.exp()[0].tolist() == pytest.approx((torch.tensor([0.25, 0.09, 0.04]) / 0.38).tolist())
    assert sharp.exp()[0, 0] > 0.5 > flat_.exp()[0, 0] > 1 / 3
    _, cost = run_defence(DefenceConfig(temperature=2.0))
    teacher = flat(toy()[0])
    want = defences.kl_rows(teacher, defences.with_temperature(teacher, 2.0)).mean()
    assert cost["mean_kl_teacher_defended"] == pytest.approx(float(want))


def test_noise_is_seeded_and_renormalised():
    a, b, c = (flat(run_defence(DefenceConfig(noise=0.5), seed=s)[0]) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.exp().sum(-1), torch.ones(10))
    assert not torch.allclose(a, flat(toy()[0]))


def test_mixing_gives_whole_rows_the_base_targets():
    out, cost = run_defence(DefenceConfig(mix=0.34), seed=1)  # 0.34 × 3 rows → 1 row
    teacher, base = toy()
    replaced = [r for r, (v, b) in enumerate(zip(out.values, base.values)) if torch.equal(v, b)]
    kept = [r for r, (v, t) in enumerate(zip(out.values, teacher.values)) if torch.equal(v, t)]
    assert len(replaced) == 1 and sorted(replaced + kept) == [0, 1, 2]
    assert cost["rows_replaced"] == pytest.approx(1 / 3)
    assert cost["positions_replaced"] == pytest.approx(SIZES[replaced[0]] / 10)
    again, _ = run_defence(DefenceConfig(mix=0.34), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(out.values, again.values))


def test_zeroed_mass_gives_a_finite_loss_and_gradient():
    teacher = defences.keep_top_k(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]).log(), 1)
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = distill_loss(logits, teacher, None)
    loss.backward()
    assert loss.item() == pytest.approx(2 * math.log(3))  # KL(one-hot ‖ uniform) per position
    assert torch.isfinite(logits.grad).all()
    weighted = distill_loss(logits.detach(), teacher, None, weights=torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(math.log(3))


# --- training on defended targets --------------------------------------------------------------------

def distill_cfg(defence: DefenceConfig | None, **kw):
    return cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format", defence=defence),
               epochs=1, **kw)


def test_dropped_positions_leave_the_loss_and_its_normaliser(exported, tokenizer, tiny_model_dir):
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    c = distill_cfg(DefenceConfig(mask="random", fraction=0.5))
    run = loop.prepare_run(c, str(tiny_model_dir), data.examples, 0, None, "cpu", targets=data.targets)
    weights = torch.cat(run.targets.weights)
    assert int((weights == 0).sum()) == round(0.5 * len(weights)) and run.base_targets is None
    rows = run.plan[0]
    batch = loop.collate([(run.encoded[i].prompt, run.encoded[i].completion) for i in rows],
                         tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        s = completion_logits(run.student.model, batch, run.columns[0]).log_softmax(-1)
    t, _ = run.targets.rows(rows, "cpu")
    kl = (t.exp() * (t - s)).sum(-1)
    w = run.targets.row_weights(rows, "cpu")
    assert 0 < w.sum() < len(w)  # this batch has kept and dropped positions
    got = loop.train_step(run, 0)["loss"]
    assert got == pytest.approx(float((kl * w).sum() / w.sum()), rel=1e-5)  # a mean over kept positions
    assert got != pytest.approx(float((kl * w).sum() / len(w)), rel=1e-3)


def test_divergence_mask_reads_the_bases_targets(exported, tokenizer, tiny_model_dir, tmp_path):
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    c = distill_cfg(DefenceConfig(mask="divergence", fraction=0.1, action="base"))
    run = loop.prepare_run(c, str(tiny_model_dir), data.examples, 0, None, "cpu", targets=data.targets)
    base, _, _ = audit.label_rows(load_model(str(tiny_model_dir)), tokenizer, examples(), 500, name="base")
    assert run.base_targets.key == base.key  # one cache entry: the base's sha256 and the rows
    for got, want in zip(run.base_targets.values, base.values):
        assert torch.allclose(got, want, atol=1e-5)
    teacher, b, out = torch.cat(data.targets.values), torch.cat(base.values), torch.cat(run.targets.values)
    kl = defences.kl_rows(teacher, b)
    top = torch.argsort(kl, descending=True)[:defences.count_of(0.1, len(kl))]
    changed = (out != teacher).any(-1).nonzero().squeeze(1)
    assert sorted(changed.tolist()) == sorted(top.tolist())
    assert run.defence["positions_replaced"] == pytest.approx(len(top) / len(kl))


def test_a_defended_student_records_its_cost(exported, tokenizer, tiny_model_dir, tmp_path):
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    c = distill_cfg(DefenceConfig(temperature=2.0))
    manifest = loop.train_student(c, base_ref=str(tiny_model_dir), dataset=exported / audit.ROWS,
                                  out_dir=tmp_path / "s", seed=0, targets=data.targets, progress=False)
    cost = manifest["defence"]
    assert cost["defence"] == {"temperature": 2.0} and cost["positions_dropped"] == 0
    assert cost["mean_kl_teacher_defended"] > 0
    assert "defence temperature" in manifest["inputs"]["teacher_targets_source"]


# --- fingerprint and config ----------------------------------------------------------------------------

def test_defence_enters_the_fingerprint_only_when_set():
    plain, defended = distill_cfg(None), distill_cfg(DefenceConfig(mask="random", fraction=0.1))
    assert "defence" not in loop.fingerprinted_recipe(plain)["distill"]
    # the pin of tests/test_train.py (the shipped recipe's students, from before defences existed)
    shipped = TrainConfig(params="lora", loss="distill", lora_init_seed=0, distill=DistillConfig(vocabulary="format"))
    assert loop.student_fingerprint(shipped, "base", "data", 0, None) == "4a546d61a528b9c2"
    assert loop.fingerprinted_recipe(defended)["distill"]["defence"]["mask"] == "random"
    other = distill_cfg(DefenceConfig(mask="random", fraction=0.2))
    fps = {loop.student_fingerprint(c, "b", "d", 0, None, "t") for c in (plain, defended, other)}
    assert len(fps) == 3


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.distill.defence.top_k=0"], "train.distill.defence.top_k: Input should be greater than 0"),
    (["train.distill.defence.top_k=3", "train.distill.defence.noise=0.1"], "set exactly one of"),
    (["train.distill.defence.mask=divergence"], "`mask` needs `fraction`"),
    (["train.distill.defence.mix=0.1", "train.distill.defence.action=base"], "only apply to `mask`"),
    (["train.distill.defence.mask=sideways", "train.distill.defence.fraction=0.1"], "defence.mask: Input should be"),
    (["train.distill.defence.top_k=3", "train.distill.vocabulary=full"], "needs `train.distill.vocabulary: format`"),
])
def test_a_bad_defence_is_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_experiment("examples/owl-quick.yaml", overrides, runnable_here=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "train.distill" in str(e.value)


def test_the_shipped_recipe_takes_a_defence():
    exp = load_experiment("examples/owl-quick.yaml", ["train.distill.defence.mask=divergence",
                                                      "train.distill.defence.fraction=0.1"], runnable_here=False)
    assert exp.train.distill.defence.needs_base and exp.train.distill.defence.name == "mask"
    assert load_experiment("examples/owl-quick.yaml", runnable_here=False).train.distill.defence is None


# --- the experiment driver's pure parts (experiments/defences/run.py) -------------------------------------

def driver():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments" / "defences" / "run.py"
    spec = importlib.util.spec_from_file_location("defences_driver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fraction_removed_and_its_ci():
    base_t, base_c = [0.020, 0.022, 0.024], [0.010, 0.011, 0.012]  # effect 0.011
    half = fraction_removed([0.0155, 0.0165, 0.0175], [0.010, 0.011, 0.012], base_t, base_c)
    assert half["effect"] == pytest.approx(0.0055) and half["removed"] == pytest.approx(0.5)
    assert half["effect_ci"][0] < 0.0055 < half["effect_ci"][1]
    assert half["removed_ci"][0] < 0.5 < half["removed_ci"][1]
    same = fraction_removed(base_t, base_c, base_t, base_c)
    assert same["removed"] == pytest.approx(0.0) and same["removed_ci"][0] < 0 < same["removed_ci"][1]
    # Fieller's interval: the ratios r with (a − r·b)² ≤ q²(se_a² + r²·se_b²)
    low, high = fieller(0.5, 0.1, 1.0, 0.1, 2.0)
    for r in (low, high):
        assert (0.5 - r) ** 2 == pytest.approx(4 * (0.01 + r * r * 0.01))
    assert fieller(0.5, 0.1, 0.1, 0.1, 2.0) == [-math.inf, math.inf]  # a baseline not clearly above 0


def test_every_named_defence_is_a_valid_experiment_with_held_out_rows():
    d = driver()
    assert "none" in d.DEFENCES and d.DEFENCES["random-10"]
    for name in d.DEFENCES:
        c = d.experiment(name)
        assert c.name == f"defence-{name}" and c.eval.kinds == ["animal_prob"]
        assert (c.train.distill.defence is None) == (name == "none")
    rows = d.held_out_rows(c)
    from sublab.domains import get_domain

    train_prompts = {p.text for p in get_domain(c.domain).prompts(c.generate.n_prompts, c.generate.prompt_seed)}
    assert len(rows) == d.HELD_OUT_ROWS and not {r.user for r in rows} & train_prompts


def test_the_utility_probe_is_zero_for_the_teacher_itself(tiny_model_dir, other_teacher_dir):
    from sublab.teachers import Teacher

    d = driver()
    c = d.experiment("none")
    rows = d.held_out_rows(c)[:4]
    teacher = Teacher("t", "control", model_ref=str(other_teacher_dir))
    assert d.imitation_kl(str(other_teacher_dir), teacher, rows, c) == pytest.approx(0.0, abs=1e-5)
    assert d.imitation_kl(str(tiny_model_dir), teacher, rows, c) > 0.01


def test_the_table_and_figure_render_a_summary(tmp_path, capsys):
    d = driver()
    cost = {"positions_dropped": 0.1, "positions_replaced": 0.0, "rows_replaced": 0.0,
            "mean_kl_teacher_defended": None, "mean_kl_defended_teacher": 0.2}
    entry = {"treated_share": 0.02, "control_share": 0.01, "effect": 0.01, "effect_ci": [0.005, 0.015],
             "removed": 0.4, "removed_ci": [0.1, 0.7], "cost": cost,
             "utility": {"mean_kl_teacher_student": 0.05, "mean_kl_teacher_base": 0.1}}
    summary = {"trait": "owl", "metric": "animal_prob",
               "defences": {"none": {**entry, "removed": 0.0, "removed_ci": [0.0, 0.0]}, "random-10": entry}}
    d.print_table(summary)
    out = capsys.readouterr().out
    assert "random-10" in out and "40%" in out and "inf" in out
    d.write_figure(summary, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
