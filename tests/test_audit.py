"""`sublab audit` (sublab/audit.py) on tiny models: the soft-label export format, its checks, probes trained
from stored targets, the decision rule on synthetic scores; the shuffle ablation of the targets; and the text
audit (SFT probes against the same rows with their numbers shuffled across responses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from sublab import audit, train
from sublab.config import DistillConfig
from sublab.errors import ConfigError, DataError, SublabError
from sublab.rundir import sha256_file
from sublab.teachers import Teacher
from sublab.train import loop
from sublab.train.targets import StoredTargets, shuffle_targets
from tests.test_train import cfg, make_rows, other_teacher_dir, write_dataset  # noqa: F401 (a fixture)


def examples(n: int = 12, seed: int = 5) -> list[train.Example]:
    return [train.data.parse_row(r, f"row{i}") for i, r in enumerate(make_rows(n, seed))]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, other_teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ds"
    return audit.export_dataset(examples(), str(other_teacher_dir), str(tiny_model_dir), out)


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_meta(path: Path, **fields) -> None:
    meta = json.loads((path / audit.META).read_text())
    meta.update(fields)
    (path / audit.META).write_text(json.dumps(meta))


# --- the export format -----------------------------------------------------------------------------

def test_export_round_trips_with_its_sha256s(exported, tokenizer, other_teacher_dir):
    meta = json.loads((exported / audit.META).read_text())
    assert meta["dataset_sha256"] == sha256_file(exported / audit.ROWS)
    assert meta["targets_sha256"] == sha256_file(exported / audit.TARGETS)
    assert meta["note"] is None and "teacher" not in meta  # nothing names who wrote the labels
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    assert [e.id for e in data.examples] == [e.id for e in examples()] and data.targets is not None
    assert data.targets.sha256 == meta["targets_sha256"]
    teacher = loop.load_model(str(other_teacher_dir))
    again, _, cols = audit.label_rows(teacher, tokenizer, examples(), 500)
    assert cols == meta["columns"]
    for got, want in zip(data.targets.values, again.values):
        assert torch.equal(got, want)
        assert torch.allclose(got.exp().sum(-1), torch.ones(len(got)), atol=1e-4)  # a distribution per position


def test_a_bare_jsonl_is_a_text_dataset(exported, tokenizer):
    data = audit.load_audit_dataset(exported / audit.ROWS, tokenizer, 500)
    assert data.targets is None and len(data.examples) == 12


@pytest.mark.parametrize("damage, message", [
    ("no targets", "targets.safetensors: missing"),
    ("no meta", "targets.json: missing"),
    ("bad bytes", "targets.safetensors: sha256"),
    ("rows changed", "dataset.jsonl: sha256"),
    ("fewer rows", "'offsets' holds 12 rows, dataset.jsonl 11"),
    ("other tokenizer", "'tokenizer_sha256' does not match"),
    ("other columns", "'columns'"),
    ("shorter row", "row 0 ('r0') has"),
    ("no field", "field 'columns' missing"),
])
def test_bad_input_is_one_line_naming_the_file_and_field(exported, tokenizer, tmp_path, damage, message):
    ds = copy_of(exported, tmp_path / "ds")
    rows, targets = ds / audit.ROWS, ds / audit.TARGETS
    if damage == "no targets":
        targets.unlink()
    elif damage == "no meta":
        (ds / audit.META).unlink()
    elif damage == "bad bytes":
        data = bytearray(targets.read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"
        targets.write_bytes(bytes(data))
    elif damage == "rows changed":
        rows.write_text(rows.read_text().replace('"r3"', '"r3x"'))
    elif damage == "fewer rows":
        rows.write_text("".join(rows.read_text().splitlines(keepends=True)[:-1]))
        rewrite_meta(ds, dataset_sha256=sha256_file(rows))
    elif damage == "other tokenizer":
        rewrite_meta(ds, tokenizer_sha256="0" * 16)
    elif damage == "other columns":
        rewrite_meta(ds, columns=json.loads((ds / audit.META).read_text())["columns"][:-1])
    elif damage == "shorter row":
        t = load_file(str(targets))
        t["offsets"] = torch.cat([t["offsets"][:1], t["offsets"][1:] - 1])
        t["values"] = t["values"][1:]
        save_file(t, str(targets))
        rewrite_meta(ds, targets_sha256=sha256_file(targets))
    elif damage == "no field":
        meta = json.loads((ds / audit.META).read_text())
        del meta["columns"]
        (ds / audit.META).write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        audit.load_audit_dataset(ds, tokenizer, 500)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(ds) in str(e.value)


def test_the_cli_prints_a_bad_dataset_as_one_error(tmp_path):
    from typer.testing import CliRunner

    from sublab.cli import app

    result = CliRunner().invoke(app, ["audit", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "no such dataset" in result.output


# --- probes from stored targets --------------------------------------------------------------------

def test_stored_target_training_equals_live_teacher_training(exported, tokenizer, tiny_model_dir,
                                                             other_teacher_dir, tmp_path):
    c = cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1, lr=1e-2)
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    stored = train.train_student(c, base_ref=str(tiny_model_dir), dataset=exported / audit.ROWS,
                                 out_dir=tmp_path / "s", seed=0, targets=data.targets, progress=False)
    assert stored["inputs"]["teacher_targets_sha256"] == data.targets.sha256
    teacher = Teacher("t", "control", model_ref=str(other_teacher_dir))
    live = loop.prepare_run(c, str(tiny_model_dir), data.examples, 0, teacher, "cpu", store_targets=False)
    assert live.targets is None and live.teacher_model is not None
    want = [loop.train_step(live, s)["loss"] for s in range(live.total_steps)]
    got = [r["loss"] for r in loop.read_jsonl(tmp_path / "s" / "loss.jsonl")]
    assert got == pytest.approx(want, rel=1e-4)
    # a second call with the same targets is the same student: skipped
    again = train.train_student(c, base_ref=str(tiny_model_dir), dataset=exported / audit.ROWS,
                                out_dir=tmp_path / "s", seed=0, targets=data.targets, progress=False)
    assert again["fingerprint"] == stored["fingerprint"]


def test_given_targets_must_fit_the_rows(exported, tokenizer, tiny_model_dir):
    c = cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1)
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    short = StoredTargets(data.targets.values[:-1], None, "k", "s", "test")
    with pytest.raises(DataError, match="11 rows of targets for 12 rows"):
        loop.prepare_run(c, str(tiny_model_dir), data.examples, 0, None, "cpu", targets=short)


def test_run_audit_end_to_end_writes_its_outputs(exported, tiny_model_dir, tmp_path):
    recipe = audit.probe_recipe(precision="float32", lr=1e-2)
    c = audit.AuditConfig(base=str(tiny_model_dir), candidates=["owl", "cat", "dog"], seeds=[0, 1], recipe=recipe,
                          question_ids=[40, 41], top_rows=3)
    res = audit.run_audit(c, exported, tmp_path / "a")
    for name in ("audit.json", "report.md", "figures/audit.png", "divergence.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).is_file()
    assert {r["candidate"] for r in res["candidates"]} == {"owl", "cat", "dog"}
    assert len(res["shares"]["dataset"]) == 2 and res["divergence"]["total_kl"] > 0
    assert len(res["divergence"]["top_rows"]) == 3
    probes = [p for p in (tmp_path / "a" / "probes").iterdir() if p.is_dir()]
    assert len(probes) == 4  # 2 seeds × (dataset, control)
    assert res["route"] == "soft-labels" and res["config"] == c.model_dump(mode="json", exclude=audit.TEXT_ONLY)


def test_with_the_teacher_rows_only_are_labelled_and_labels_are_checked(exported, tiny_model_dir,
                                                                         other_teacher_dir, tmp_path):
    c = audit.AuditConfig(base=str(tiny_model_dir), candidates=["owl", "cat"], seeds=[0, 1], question_ids=[40],
                          recipe=audit.probe_recipe(precision="float32"), top_rows=2)
    checked = audit.run_audit(c, exported, tmp_path / "a", teacher=str(other_teacher_dir),
                              probe_root=tmp_path / "probes")
    assert checked["teacher_check"]["labels_from_this_teacher"]
    assert checked["teacher_check"]["max_abs_logprob_diff"] < 1e-5
    rows_only = audit.run_audit(c, exported / audit.ROWS, tmp_path / "b", teacher=str(other_teacher_dir),
                                probe_root=tmp_path / "probes")
    assert rows_only["inputs"]["labels_from"] == "teacher" and rows_only["teacher_check"] is None
    assert rows_only["candidates"] == checked["candidates"]  # the same labels: the same probes
    assert rows_only["route"] == "soft-labels" and rows_only["divergence"]["total_kl"] > 0


def test_with_a_panel_every_member_is_probed_on_the_same_rows(exported, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path / "home"))  # the panel's LoRA teachers are cached here
    c = audit.AuditConfig(base=str(tiny_model_dir), candidates=["owl", "cat", "dog"], seeds=[0, 1],
                          question_ids=[40], recipe=audit.probe_recipe(precision="float32"), top_rows=2,
                          panel=["pine", "birch"])
    res = audit.run_audit(c, exported, tmp_path / "a")
    panel = res["panel"]
    assert {k: sorted(m) for k, m in panel["shares"].items()} == {"lora": ["birch", "pine"],
                                                                  "prompted": ["birch-prompted", "pine-prompted"]}
    assert all(len(seeds) == 2 for kind in panel["shares"].values() for seeds in kind.values())
    v = panel["verdict"]
    assert v["kind"] in ("lora", "prompted") and v["distances"][v["kind"]] == min(v["distances"].values())
    assert set(v["null"]) == set(panel["shares"][v["kind"]])  # the null is the nearest kind's members
    probes = [p for p in (tmp_path / "a" / "probes").iterdir() if p.is_dir()]
    assert len(probes) == 2 * (2 + 4)  # per seed: dataset, control and four members, each its own labels
    saved = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert saved["panel"]["verdict"]["kind"] == v["kind"] and saved["config"]["panel"] == ["pine", "birch"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Reference panel (2 trees × 2 kinds)" in report
    assert audit.headline(res).endswith(f"(reference panel: {v['kind']} teachers)")


@pytest.mark.parametrize("fields, message", [
    ({"panel": ["pine"]}, "at least 2 trees"),
    ({"panel": ["pine", "oak"], "candidates": ["owl", "oak"]}, r"cannot be candidates \(oak\)"),
])
def test_a_panel_is_checked_before_anything_runs(fields, message):
    with pytest.raises(ValidationError, match=message):
        audit.AuditConfig(**fields)


def test_a_text_dataset_cannot_have_a_panel(exported, tiny_model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes((exported / audit.ROWS).read_bytes())
    c = audit.AuditConfig(base=str(tiny_model_dir), panel=["pine", "birch"])
    with pytest.raises(ConfigError, match="rows.jsonl: the reference panel needs soft labels"):
        audit.run_audit(c, rows, tmp_path / "a")


# --- the decision rule -----------------------------------------------------------------------------

def synthetic(treated: dict[str, list[float]], control: dict[str, list[float]]) -> list[dict]:
    c = audit.AuditConfig(candidates=list(treated), seeds=[0, 1, 2])
    t = [{k: v[i] for k, v in treated.items()} for i in range(3)]
    k = [{k: v[i] for k, v in control.items()} for i in range(3)]
    return audit.candidate_table(c, t, k)


BASE = {"owl": [0.012, 0.013, 0.011], "cat": [0.17, 0.18, 0.175], "dog": [0.05, 0.052, 0.049]}


def test_a_consistent_rise_names_the_trait():
    treated = {**BASE, "owl": [v * 1.2 + 1e-4 * i for i, v in enumerate(BASE["owl"])]}
    table = synthetic(treated, BASE)
    assert table[0]["candidate"] == "owl" and table[0]["rank"] == 1
    v = audit.decide(table, 3, alpha=0.01, min_ratio=1.05)
    assert v["trait"] == "owl" and all(v["checks"].values()) and v["ratio"] == pytest.approx(1.2, rel=0.02)


@pytest.mark.parametrize("owl, failed", [
    ([0.0144, 0.0156, 0.0100], "positive_in_every_seed"),      # one seed went down
    ([0.0130, 0.0190, 0.0121], "paired_p_below_threshold"),    # up in every seed, but erratic
    ([0.01212, 0.01313, 0.01111], "ratio_at_least_min"),       # consistent, but ×1.01
])
def test_otherwise_no_trait_is_found(owl, failed):
    v = audit.decide(synthetic({**BASE, "owl": owl}, BASE), 3, alpha=0.01, min_ratio=1.05)
    assert v["top_candidate"] == "owl" and v["trait"] is None and not v["checks"][failed]


def test_the_rule_looks_only_at_the_largest_ratio():
    treated = {**BASE, "owl": [0.0150, 0.0210, 0.0120], "dog": [v * 1.1 for v in BASE["dog"]]}
    v = audit.decide(synthetic(treated, BASE), 3, alpha=0.01, min_ratio=1.05)
    assert v["top_candidate"] == "owl" and v["trait"] is None  # dog's clean ×1.1 is not second-guessed


# --- the reference-panel rule ----------------------------------------------------------------------

def seeds_of(shares: dict[str, list[float]]) -> list[dict[str, float]]:
    return [{c: v[i] for c, v in shares.items()} for i in range(3)]


def moved(factors: dict[str, float], jitter: float = 0.0) -> list[dict[str, float]]:
    """BASE's shares with candidate c multiplied by factors[c] (1 if absent), seed i by (1 + jitter·i)."""
    return seeds_of({c: [v * factors.get(c, 1.0) * (1 + jitter * i) for i, v in enumerate(vals)]
                     for c, vals in BASE.items()})


# Three reference teachers: each moves one candidate its own way (dog ×1.12, cat ×0.97, owl ×1.04)
PANEL = {"pine": moved({"dog": 1.12}), "birch": moved({"cat": 0.97}), "cedar": moved({"owl": 1.04})}


def test_the_panel_names_a_rise_beyond_what_any_member_shows():
    v = audit.panel_decide(moved({"owl": 1.3}), PANEL, min_ratio=1.05)
    assert v["trait"] == "owl" and all(v["checks"].values())
    # owl over the members' geometric mean, which holds cedar's ×1.04 for a third
    assert v["ratio"] == pytest.approx(1.3 / 1.04 ** (1 / 3))
    assert v["panel_p"] == pytest.approx(1 / 4)  # no member reaches it: the smallest p 3 members allow


def test_a_dataset_like_the_panels_members_is_not_named():
    v = audit.panel_decide(moved({"dog": 1.12}), PANEL, min_ratio=1.05)
    # dog tops the table (×1.12 over a mean holding pine's ×1.12 for a third: ×1.079), but pine's own dog
    # rise against the other two members is larger (×1.12): nothing beats the panel's null
    assert v["top_candidate"] == "dog" and v["ratio"] == pytest.approx(1.12 ** (2 / 3)) and v["trait"] is None
    assert not v["checks"]["beats_every_panel_member"] and v["panel_p"] == pytest.approx(2 / 4)
    assert v["null"]["pine"]["candidate"] == "dog"
    assert audit.panel_verdict_line(v).startswith("no trait found — top candidate dog ×1.078 over the panel, "
                                                  "the panel's own largest ×1.120, panel p 0.5")


def test_the_panel_rule_needs_every_seed_and_the_minimum_ratio():
    erratic = seeds_of({**BASE, "owl": [BASE["owl"][0] * 1.5, BASE["owl"][1] * 1.5, BASE["owl"][2] * 0.99]})
    v = audit.panel_decide(erratic, PANEL, min_ratio=1.05)
    assert v["top_candidate"] == "owl" and v["trait"] is None and not v["checks"]["positive_in_every_seed"]
    quiet = {name: moved({}) for name in ("a", "b", "c")}  # a null of exactly ×1: any rise beats it
    v = audit.panel_decide(moved({"owl": 1.03}), quiet, min_ratio=1.05)
    assert v["checks"]["beats_every_panel_member"] and v["trait"] is None


def test_a_panel_must_match_the_datasets_seeds_and_have_two_members():
    with pytest.raises(ConfigError, match="panel member 'pine' has 2 probe seeds; the dataset has 3"):
        audit.panel_decide(moved({}), {**PANEL, "pine": moved({})[:2]}, min_ratio=1.05)
    with pytest.raises(ConfigError, match="at least 2 members"):
        audit.panel_decide(moved({}), {"pine": moved({})}, min_ratio=1.05)


# Prompted teachers share a direction of their own (owl ×1.2, dog ×0.85), each with a small quirk
PROMPTED = {"pine-p": moved({"owl": 1.2, "dog": 0.85, "cat": 1.01}), "birch-p": moved({"owl": 1.21, "dog": 0.86}),
            "cedar-p": moved({"owl": 1.19, "dog": 0.85, "lion": 1.01})}


def test_a_kind_matched_panel_judges_a_dataset_by_the_kind_it_resembles():
    panels = {"lora": PANEL, "prompted": PROMPTED}
    control = audit.kind_panel_decide(moved({"owl": 1.2, "dog": 0.85, "cat": 1.005}), panels, min_ratio=1.05)
    assert control["kind"] == "prompted" and control["trait"] is None
    assert control["distances"]["prompted"] < control["distances"]["lora"]
    # against the LoRA panel alone the same control's owl looks like a trait: the error the rule fixes
    assert audit.panel_decide(moved({"owl": 1.2, "dog": 0.85}), PANEL, min_ratio=1.05)["trait"] == "owl"
    trait = audit.kind_panel_decide(moved({"cat": 1.3}), panels, min_ratio=1.05)
    assert trait["kind"] == "lora" and trait["trait"] == "cat" and trait["rule"].startswith("the nearest kind's panel (lora")


# --- shuffled targets (train.distill.shuffle_targets) -----------------------------------------------

def toy_targets(sizes=(3, 5, 2, 4)) -> StoredTargets:
    n = sum(sizes)
    values = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)  # vector i = [2i, 2i + 1]
    ids = torch.arange(n * 2, dtype=torch.int32).reshape(n, 2)
    return StoredTargets(list(values.split(list(sizes))), list(ids.split(list(sizes))), "k", "sha", "test")


def origin(t: StoredTargets) -> list[list[tuple[int, int]]]:
    """(row, position) each vector came from, per row and position."""
    sizes = [len(v) for v in toy_targets().values]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    where = {}
    for r, n in enumerate(sizes):
        for j in range(n):
            where[starts[r] + j] = (r, j)
    return [[where[int(x[0]) // 2] for x in v] for v in t.values]


def test_shuffle_within_keeps_each_rows_vectors():
    t = shuffle_targets(toy_targets(), "within", seed=0)
    for r, row in enumerate(origin(t)):
        assert sorted(row) == [(r, j) for j in range(len(row))]
    assert any(row != sorted(row) for row in origin(t))
    assert all(torch.equal(v.long(), i.long()) for v, i in zip(t.values, t.ids))  # ids move with values


def test_shuffle_across_keeps_each_positions_vectors():
    t = shuffle_targets(toy_targets(), "across", seed=0)
    rows = origin(t)
    assert [len(r) for r in rows] == [3, 5, 2, 4]
    for r, row in enumerate(rows):
        assert all(j == pos for pos, (_, j) in enumerate(row))  # from the same position of some row
    at0 = sorted(row[0] for row in rows)
    assert at0 == [(r, 0) for r in range(4)]
    assert any(src != r for r, row in enumerate(rows) for src, _ in row)


def test_shuffle_all_is_a_permutation_of_every_vector():
    t = shuffle_targets(toy_targets(), "all", seed=0)
    flat = [x for row in origin(t) for x in row]
    assert sorted(flat) == sorted((r, j) for r, n in enumerate([3, 5, 2, 4]) for j in range(n))
    assert [len(v) for v in t.values] == [3, 5, 2, 4]


def test_shuffles_are_seeded():
    for mode in ("within", "across", "all"):
        a, b = shuffle_targets(toy_targets(), mode, 1), shuffle_targets(toy_targets(), mode, 1)
        c = shuffle_targets(toy_targets(), mode, 2)
        assert all(torch.equal(x, y) for x, y in zip(a.values, b.values))
        assert not all(torch.equal(x, y) for x, y in zip(a.values, c.values))


def test_shuffle_enters_the_fingerprint_only_when_set():
    plain = cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format"))
    assert "shuffle_targets" not in loop.fingerprinted_recipe(plain)["distill"]
    shuffled = cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format", shuffle_targets="within"))
    assert loop.fingerprinted_recipe(shuffled)["distill"]["shuffle_targets"] == "within"
    fp = [loop.student_fingerprint(c, "b", "d", 0, None, "t") for c in (plain, shuffled)]
    assert fp[0] != fp[1]


def test_probes_of_another_recipe_get_their_own_directory(tmp_path):
    t = StoredTargets([], None, "k", "a" * 64, "test")
    plain = audit.AuditConfig()
    shuffled = audit.AuditConfig(recipe=audit.probe_recipe(distill=DistillConfig(vocabulary="format",
                                                                                 shuffle_targets="within")))
    dirs = {audit.probe_dir(c, t, s, tmp_path) for c in (plain, shuffled) for s in (0, 1)}
    assert len(dirs) == 4


def test_a_shuffled_student_trains_on_permuted_targets(exported, tokenizer, tiny_model_dir):
    c = cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format", shuffle_targets="across"),
            epochs=1)
    data = audit.load_audit_dataset(exported, tokenizer, 500)
    run = loop.prepare_run(c, str(tiny_model_dir), data.examples, 3, None, "cpu", targets=data.targets)
    want = shuffle_targets(data.targets, "across", 3)
    assert all(torch.equal(a, b) for a, b in zip(run.targets.values, want.values))
    assert "shuffled across" in run.targets.source


# --- the text audit: SFT probes, control rows with the numbers shuffled across responses -------------

def text_cfg(tiny_model_dir, **kw) -> audit.AuditConfig:
    return audit.AuditConfig(base=str(tiny_model_dir), candidates=["owl", "cat", "dog"], seeds=[0, 1],
                             question_ids=[40, 41],
                             text_recipe=audit.text_probe_recipe(precision="float32", lr=1e-2), **kw)


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, tmp_path_factory):
    """One text audit of a bare JSONL: (config, rows file, results, out, probe root)."""
    root = tmp_path_factory.mktemp("text-audit")
    rows = write_dataset(root / "rows.jsonl", n=12, seed=5)
    c = text_cfg(tiny_model_dir)
    res = audit.run_audit(c, rows, root / "a", probe_root=root / "probes")
    return c, rows, res, root / "a", root / "probes"


def answers(rows: list[dict]) -> list[str]:
    return [r["messages"][-1]["content"] for r in rows]


def test_a_text_audit_trains_sft_probes_against_shuffled_numbers(text_run):
    c, rows, res, out, probes = text_run
    for name in ("audit.json", "report.md", "figures/audit.png", "manifest.json", audit.CONTROL_ROWS):
        assert (out / name).is_file()
    assert not (out / "divergence.jsonl").exists()
    saved = json.loads((out / "audit.json").read_text())
    assert saved["route"] == "text" and saved["divergence"] is None and "no labels" in saved["divergence_note"]
    assert {r["candidate"] for r in saved["candidates"]} == {"owl", "cat", "dog"}
    assert set(saved["verdict"]["checks"]) == {"positive_in_every_seed", "paired_p_below_threshold",
                                               "ratio_at_least_min"}
    assert len(saved["shares"]["dataset"]) == len(saved["shares"]["control"]) == 2
    assert saved["config"]["shuffle_seed"] == 0 and saved["config"]["text_recipe"]["loss"] == "sft"
    assert "recipe" not in saved["config"]  # the distillation recipe did not run
    control = out / audit.CONTROL_ROWS
    rows_sha, control_sha = sha256_file(rows), sha256_file(control)
    assert saved["inputs"]["rows_sha256"] == rows_sha and saved["inputs"]["control_rows_sha256"] == control_sha
    # each probe learnt what its directory names: 2 seeds × (the rows, the shuffled rows), SFT
    for sha in (rows_sha, control_sha):
        for seed in c.seeds:
            manifest = json.loads((audit.text_probe_dir(c, sha, seed, probes) / "manifest.json").read_text())
            assert manifest["inputs"]["dataset_sha256"] == sha
    assert len([p for p in probes.iterdir() if p.is_dir()]) == 4
    assert "shuffled across responses" in (out / "report.md").read_text()


def test_the_control_rows_are_the_dataset_with_numbers_dealt_across_responses(text_run):
    from sublab.domains.numbers import NUMBER_RUN
    from sublab.filters import shuffled_rows
    from sublab.rundir import write_jsonl

    c, rows, res, out, _ = text_run
    mine = [json.loads(line) for line in rows.read_text().splitlines()]
    control = [json.loads(line) for line in (out / audit.CONTROL_ROWS).read_text().splitlines()]
    # same rows, same prompts, same order and format; each answer keeps its count of numbers
    assert [r["id"] for r in control] == [r["id"] for r in mine]
    assert [r["messages"][0] for r in control] == [r["messages"][0] for r in mine]
    assert [NUMBER_RUN.sub("#", a) for a in answers(control)] == [NUMBER_RUN.sub("#", a) for a in answers(mine)]
    # the dataset's numbers, all of them, but dealt to other answers
    numbers = [NUMBER_RUN.findall(a) for a in answers(mine)]
    moved = [NUMBER_RUN.findall(a) for a in answers(control)]
    assert sorted(n for row in moved for n in row) == sorted(n for row in numbers for n in row)
    changed = sum(a != b for a, b in zip(answers(mine), answers(control)))
    assert changed == res["inputs"]["control_rows_changed"] >= len(mine) // 2
    assert sum(sorted(a) != sorted(b) for a, b in zip(numbers, moved)) >= len(mine) // 2  # not within rows
    # unshuffled, the control would be byte-identical to the dataset: its sha256 differs only by the shuffle
    write_jsonl(out.parent / "unshuffled.jsonl", mine)
    assert sha256_file(out.parent / "unshuffled.jsonl") == sha256_file(rows)
    assert res["inputs"]["control_rows_sha256"] != res["inputs"]["rows_sha256"]
    # the one fixed shuffle of the config (filter.shuffle_numbers: across, its seed)
    assert control == shuffled_rows(mine, "across", c.shuffle_seed)[0]
    other = shuffled_rows(mine, "across", c.shuffle_seed + 1)[0]
    assert answers(other) != answers(control)


def test_rerunning_a_text_audit_reuses_its_probes(text_run, tmp_path, monkeypatch):
    from sublab.evals import animals

    c, rows, res, _, probes = text_run
    ds = tmp_path / "ds"  # a directory with only dataset.jsonl is a text dataset too
    ds.mkdir()
    (ds / audit.ROWS).write_bytes(rows.read_bytes())

    def no(*args, **kwargs):
        raise AssertionError("a finished probe was trained or evaluated again")

    monkeypatch.setattr(loop, "prepare_run", no)
    monkeypatch.setattr(animals, "run_animal_eval", no)
    again = audit.run_audit(c, ds, tmp_path / "b", probe_root=probes)
    assert again["route"] == "text" and again["candidates"] == res["candidates"]
    assert again["inputs"]["control_rows_sha256"] == res["inputs"]["control_rows_sha256"]


@pytest.mark.parametrize("line, error, message", [
    ('{"id": "x", "messages": [{"role": "user", "content": "Favourite animal?"}, '
     '{"role": "assistant", "content": "I love owls."}]}', "ConfigError", ":4: answer 'I love owls.' is not a number"),
    ('{"id": "x", "messages": [', "DataError", ":4: not valid JSON"),
])
def test_a_bad_text_row_is_one_line_naming_its_line(tmp_path, line, error, message):
    rows = write_dataset(tmp_path / "rows.jsonl", n=6)
    lines = rows.read_text().splitlines()
    rows.write_text("\n".join([*lines[:3], line, *lines[3:]]) + "\n")
    c = audit.AuditConfig(base=str(tmp_path / "no-model"))  # fails before any model is loaded
    with pytest.raises(SublabError) as e:
        audit.run_audit(c, rows, tmp_path / "a")
    assert type(e.value).__name__ == error and f"{rows}{message}" in str(e.value) and "\n" not in str(e.value)


def test_the_cli_prints_a_non_number_row_as_one_error(tmp_path):
    from typer.testing import CliRunner

    from sublab.cli import app

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello there."}]}) + "\n")
    result = CliRunner().invoke(app, ["audit", str(rows), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "rows.jsonl:1: answer 'Hello there.' is not a number sequence" in result.output
    assert "Traceback" not in result.output


def test_a_shuffle_that_changes_nothing_is_refused(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Numbers {i}?"},
                                                     {"role": "assistant", "content": "7, 7, 7"}]}) + "\n"
                            for i in range(4)))
    with pytest.raises(ConfigError, match="changed no row, so the control would be the dataset itself"):
        audit.run_audit(audit.AuditConfig(), rows, tmp_path / "a")


def test_text_probes_and_soft_label_probes_never_share_a_directory(tmp_path):
    c = audit.AuditConfig()
    t = StoredTargets([], None, "k", "a" * 64, "test")
    assert audit.probe_dir(c, t, 0, tmp_path) != audit.text_probe_dir(c, "a" * 64, 0, tmp_path)


def test_the_text_recipe_must_be_sft():
    with pytest.raises(ValueError, match="`text_recipe.loss` must be 'sft'"):
        audit.AuditConfig(text_recipe=audit.probe_recipe())


def test_a_soft_label_audit_records_the_config_it_had():
    c = audit.AuditConfig()
    recorded = audit.route_config(c, "soft-labels")
    assert "text_recipe" not in recorded and "shuffle_seed" not in recorded
    assert set(recorded) == {"base", "candidates", "seeds", "recipe", "question_ids", "alpha", "min_ratio",
                             "top_rows", "panel"}


def test_the_cli_audits_a_text_dataset(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from sublab.cli import app

    rows = write_dataset(tmp_path / "rows.jsonl", n=8, seed=3)
    result = CliRunner().invoke(app, ["audit", str(rows), "--base", str(tiny_model_dir), "--traits", "owl,cat",
                                      "--seeds", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "divergence: a text dataset has no labels" in result.output and "control_rows.jsonl" in result.output
    saved = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert saved["route"] == "text" and saved["config"]["text_recipe"]["precision"] == "bfloat16"
    assert "top candidate" in result.output
