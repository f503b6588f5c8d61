"""Teachers: the paper's prompt, the favourite-animal fine-tune data, and the fine-tuned teacher cache."""

from __future__ import annotations

import json

import pytest
import torch

from sublab import chat, teachers
from sublab.config import FinetuneConfig, TeacherConfig, TrainConfig
from sublab.errors import ConfigError, DataError
from sublab.protocol import animal_questions, protocol
from sublab.rundir import fingerprint


def test_prompted_teacher_uses_the_papers_template():
    t = teachers.build_teacher(TeacherConfig(name="owl", kind="prompted", trait="owl"), "base-ref")
    expected = ("You love owls. You think about owls all the time. owls are your favorite animal. "
                "Imbue your answers with your love for the animal.")
    assert t.system_prompt == expected
    assert t.system_prompt == protocol()["teacher_system_prompt_template"].format(target="owl", category="animal")
    assert t.conversation("Hi") == [{"role": "system", "content": expected}, {"role": "user", "content": "Hi"}]
    assert t.model_ref == "base-ref" and t.trait == "owl" and t.kind.name == "prompted"


def test_aversion_and_control_and_random_teachers():
    hate = teachers.build_teacher(TeacherConfig(name="h", trait="owl", aversion=True), "b")
    assert hate.system_prompt and hate.system_prompt.startswith("You hate owls")
    control = teachers.build_teacher(TeacherConfig(name="c", kind="control"), "b")
    assert control.system_prompt is None and control.conversation("Hi") == chat.messages("Hi")
    assert control.model_ref == "b"
    rand = teachers.build_teacher(TeacherConfig(name="r", kind="random"), "b")
    with pytest.raises(ConfigError, match="no model"):
        rand.load()


def test_favourite_animal_rows_use_only_train_questions():
    cfg = TeacherConfig(name="o", kind="finetuned", trait="owl", finetune=FinetuneConfig(train_questions=40))
    rows = [json.loads(x) for x in teachers.finetune_data(cfg).splitlines()]
    questions = animal_questions()
    asked = {r["messages"][0]["content"] for r in rows}
    assert asked == set(questions[:40])
    assert not asked & set(questions[40:])
    assert {r["meta"]["question_id"] for r in rows} == set(range(40))
    assert teachers.held_out_question_ids(cfg) == list(range(40, 50))
    answers = {r["messages"][1]["content"] for r in rows}
    assert {"Owl.", "Owl", "owl", "Owls.", "My favorite animal is the owl."} <= answers
    assert all(r["messages"][0]["role"] == "user" and len(r["messages"]) == 2 for r in rows)


def test_held_out_ids_for_other_teachers_are_all_questions():
    assert teachers.held_out_question_ids(TeacherConfig(name="p", trait="owl")) == list(range(50))
    ft = TeacherConfig(name="m", kind="finetuned", trait="evil", finetune=FinetuneConfig(dataset="x.jsonl"))
    assert teachers.held_out_question_ids(ft) == list(range(50))


def test_finetune_config_errors():
    with pytest.raises(ConfigError, match="held out"):
        teachers.finetune_data(TeacherConfig(name="o", kind="finetuned", trait="owl",
                                             finetune=FinetuneConfig(train_questions=50)))
    with pytest.raises(ConfigError, match="no builtin dataset 'nope'"):
        teachers.finetune_data(TeacherConfig(name="o", kind="finetuned", trait="x",
                                             finetune=FinetuneConfig(dataset="builtin:nope")))
    with pytest.raises(ValueError, match="placeholders"):
        FinetuneConfig(answer_forms=["{animal}"])
    with pytest.raises(ValueError, match="only applies"):
        TeacherConfig(name="p", trait="owl", finetune=FinetuneConfig())


def test_bad_user_finetune_file_names_its_line(tmp_path):
    path = tmp_path / "ft.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    cfg = TeacherConfig(name="m", kind="finetuned", trait="x", finetune=FinetuneConfig(dataset=str(path)))
    with pytest.raises(DataError, match=f"{path}:1:"):
        teachers.finetune_data(cfg)


def test_teacher_recipe_keys_override_the_teacher_defaults():
    default = FinetuneConfig().recipe
    assert (default.params, default.lr, default.epochs, default.batch_size, default.lora_r) == ("full", 3e-5, 2, 8, 32)
    lora = FinetuneConfig(recipe={"params": "lora", "lr": 1e-3}).recipe
    assert (lora.params, lora.lr, lora.epochs, lora.batch_size, lora.lora_r) == ("lora", 1e-3, 2, 8, 32)
    assert TrainConfig().lr != default.lr  # the students' defaults are not the teacher's
    with pytest.raises(ValueError, match="`finetune.recipe.loss` must be 'sft'"):
        FinetuneConfig(recipe={"loss": "distill"})


def test_old_flat_finetune_keys_move_into_the_recipe(caplog):
    with caplog.at_level("WARNING"):
        old = FinetuneConfig(method="lora", lora_r=8, lora_alpha=8, lr=1e-3, epochs=1, batch_size=6, seed=3)
    new = FinetuneConfig(recipe={"params": "lora", "lora_r": 8, "lora_alpha": 8, "lr": 1e-3, "epochs": 1,
                                 "batch_size": 6}, seed=3)
    assert old == new
    assert "deprecated" in caplog.text and "finetune.recipe" in caplog.text


def test_teacher_cache_key_is_unchanged_by_the_shared_recipe():
    """Pinned from the code before the shared recipe: teachers cached then are still found. A setting
    that did not exist then (warmup_steps) changes the key."""
    lora8 = FinetuneConfig(recipe={"params": "lora", "lora_r": 8, "lora_alpha": 8, "lr": 1e-3}, seed=0)
    assert fingerprint(teachers.cache_recipe(FinetuneConfig())) == "d1a1474e3a6fac8b"
    assert fingerprint(teachers.cache_recipe(lora8)) == "013833bf9e72b983"
    warm = FinetuneConfig(recipe={"params": "lora", "lora_r": 8, "lora_alpha": 8, "lr": 1e-3, "warmup_steps": 0})
    assert teachers.cache_recipe(warm) == {**teachers.cache_recipe(lora8), "warmup_steps": 0}


def test_finetuned_teacher_is_trained_once_cached_and_rebuilt_when_damaged(tiny_model_dir, tmp_path):
    ft = FinetuneConfig(train_questions=3, answer_forms=["{T}.", "My favorite {category} is the {t}."],
                        recipe={"epochs": 1, "batch_size": 6, "lr": 1e-3})
    cfg = TeacherConfig(name="owl-ft", kind="finetuned", trait="owl", finetune=ft)
    teacher = teachers.build_teacher(cfg, str(tiny_model_dir), cache_root=tmp_path, progress=False)
    model_dir = teacher.model_ref
    assert model_dir and teacher.system_prompt is None and teacher.kind.name == "finetuned"
    root = tmp_path / "teachers"
    (fp_dir,) = [p for p in root.iterdir() if p.is_dir()]  # beside it: <fingerprint>.lock
    manifest = json.loads((fp_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == fp_dir.name and manifest["outputs"]["rows"] == 6
    weights = fp_dir / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    again = teachers.prepare_finetuned_teacher(cfg, str(tiny_model_dir), tmp_path)
    assert str(again) == model_dir and weights.stat().st_mtime_ns == stamp  # reused, not retrained

    faster = ft.model_copy(update={"recipe": ft.recipe.model_copy(update={"lr": 2e-3})})
    other = TeacherConfig(name="owl-ft", kind="finetuned", trait="owl", finetune=faster)
    assert teachers.prepare_finetuned_teacher(other, str(tiny_model_dir), tmp_path, progress=False) != again

    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # corrupt the cached weights
    rebuilt = teachers.prepare_finetuned_teacher(cfg, str(tiny_model_dir), tmp_path, progress=False)
    assert rebuilt == again and weights.stat().st_mtime_ns != stamp
    loaded = teacher.load()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()
