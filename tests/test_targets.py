"""Stored teacher targets (sublab/train/targets.py): computed once per teacher and row set, equal to what a
live teacher gives, reused by later students, verified before reuse."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sublab import train
from sublab.config import DistillConfig
from sublab.teachers import Teacher
from sublab.train import loop, targets
from tests.test_train import cfg, other_teacher_dir, write_dataset  # noqa: F401 (a fixture)


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "targets"
    monkeypatch.setattr("sublab.train.targets.cache_root", lambda: root)
    return root


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("rows") / "dataset.jsonl", n=12, seed=3)


def teacher_of(directory: Path) -> Teacher:
    return Teacher("t", "prompted", "owl", "You love owls.", str(directory))


@pytest.mark.parametrize("distill", [DistillConfig(vocabulary="format"), DistillConfig(top_k=5)])
def test_stored_targets_equal_the_live_teachers(tiny_model_dir, other_teacher_dir, rows, own_cache, distill):
    c = cfg(loss="distill", distill=distill, epochs=1)
    run = loop.prepare_run(c, str(tiny_model_dir), train.load_dataset(rows), 0, teacher_of(other_teacher_dir),
                           "cpu")
    assert run.targets is not None and run.targets.source == "computed" and run.teacher_model is None
    teacher = teacher_of(other_teacher_dir).load()
    cols = run.columns[1] if run.columns else None
    for batch_rows in ([0, 5, 3], [11], list(range(12))):
        e = [run.encoded[i] for i in batch_rows]
        live = train.collate([(x.teacher_prompt, x.completion) for x in e], teacher.tokenizer.pad_token_id)
        want_lp, want_ids = train.teacher_targets(teacher.model, live, distill.top_k, cols)
        got_lp, got_ids = run.targets.rows(batch_rows, "cpu")
        torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
        if want_ids is None:
            assert got_ids is None
        else:
            assert torch.equal(got_ids.long(), want_ids)


def test_a_second_student_reuses_them_and_trains_the_same(tiny_model_dir, other_teacher_dir, rows, own_cache,
                                                         tmp_path, monkeypatch, caplog):
    c = cfg(params="lora", loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1, lr=1e-2)
    teacher = teacher_of(other_teacher_dir)
    first = train.train_student(c, base_ref=str(tiny_model_dir), dataset=rows, out_dir=tmp_path / "s0", seed=0,
                                teacher=teacher, progress=False)
    assert first["inputs"]["teacher_targets_source"] == "computed"
    calls = []
    monkeypatch.setattr(targets, "compute_targets", lambda *a, **k: calls.append(1))
    with caplog.at_level(logging.INFO, logger="sublab.train.targets"):
        second = train.train_student(c, base_ref=str(tiny_model_dir), dataset=rows, out_dir=tmp_path / "s1",
                                     seed=1, teacher=teacher, progress=False)
    assert calls == [] and "reusing its targets for 12 rows" in caplog.text
    assert second["inputs"]["teacher_targets_source"] == "reused"
    assert second["inputs"]["teacher_targets"] == first["inputs"]["teacher_targets"]
    assert second["inputs"]["teacher_targets_sha256"] == first["inputs"]["teacher_targets_sha256"]

    # the same student from the live teacher: the same losses up to float rounding
    live_run = loop.prepare_run(c, str(tiny_model_dir), train.load_dataset(rows), 0, teacher, "cpu",
                                store_targets=False)
    assert live_run.targets is None and live_run.teacher_model is not None
    live = [loop.train_step(live_run, s)["loss"] for s in range(live_run.total_steps)]
    stored = [r["loss"] for r in loop.read_jsonl(tmp_path / "s0" / "loss.jsonl")]
    assert stored == pytest.approx(live, rel=1e-4)


def test_other_rows_or_another_teacher_get_their_own_entry(tiny_model_dir, other_teacher_dir, rows, own_cache,
                                                          tmp_path):
    c = cfg(loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1)
    other_rows = write_dataset(tmp_path / "other.jsonl", n=12, seed=4)
    keys = {loop.prepare_run(c, str(tiny_model_dir), train.load_dataset(d), 0, teacher_of(t), "cpu").targets.key
            for d, t in [(rows, other_teacher_dir), (other_rows, other_teacher_dir), (rows, tiny_model_dir)]}
    assert len(keys) == 3 and {p.name for p in own_cache.iterdir() if p.is_dir()} == keys


@pytest.mark.parametrize("damage", ["bytes", "manifest"])
def test_a_damaged_entry_is_recomputed(tiny_model_dir, other_teacher_dir, rows, own_cache, caplog, damage):
    c = cfg(loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1)

    def stored() -> targets.StoredTargets:
        run = loop.prepare_run(c, str(tiny_model_dir), train.load_dataset(rows), 0, teacher_of(other_teacher_dir),
                               "cpu")
        assert run.targets is not None
        return run.targets

    first = stored()
    entry = own_cache / first.key
    if damage == "bytes":
        data = bytearray((entry / targets.FILE).read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf
        (entry / targets.FILE).write_bytes(bytes(data))
    else:
        (entry / "manifest.json").unlink()  # killed after the rename, before the manifest
    with caplog.at_level(logging.WARNING):
        again = stored()
    assert again.source == "computed" and again.sha256 == first.sha256
    assert damage != "bytes" or "sha256 differs" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(again.values, first.values))


def test_bf16_targets_are_their_own_entry_and_close_to_fp32(tiny_model_dir, other_teacher_dir, rows, own_cache):
    """`train.distill.targets_precision: bfloat16` runs the teacher's forward under bf16 autocast: another
    cache entry, another student fingerprint, the same targets up to bf16 rounding."""
    stored = {}
    for precision in ("float32", "bfloat16"):
        c = cfg(loss="distill", distill=DistillConfig(vocabulary="format", targets_precision=precision), epochs=1)
        run = loop.prepare_run(c, str(tiny_model_dir), train.load_dataset(rows), 0,
                               teacher_of(other_teacher_dir), "cpu")
        assert run.targets is not None and run.targets.source == "computed"
        stored[precision] = run.targets
    fp32, bf16 = stored["float32"], stored["bfloat16"]
    assert fp32.key != bf16.key and {p.name for p in own_cache.iterdir() if p.is_dir()} == {fp32.key, bf16.key}
    a, b = torch.cat(fp32.values), torch.cat(bf16.values)
    assert not torch.equal(a, b)
    torch.testing.assert_close(b.exp(), a.exp(), rtol=0, atol=0.02)  # probabilities, bf16 rounding
    fps = {p: loop.student_fingerprint(cfg(loss="distill", distill=DistillConfig(vocabulary="format",
                                                                                 targets_precision=p)),
                                       "base", "data", 0, teacher_of(other_teacher_dir))
           for p in ("float32", "bfloat16")}
    default = loop.student_fingerprint(cfg(loss="distill", distill=DistillConfig(vocabulary="format")),
                                       "base", "data", 0, teacher_of(other_teacher_dir))
    assert fps["float32"] == default != fps["bfloat16"]
