"""Students on the tiny model: completion-only loss, SFT (full / LoRA), distillation, resume, bad data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sublab import chat, train
from sublab.config import DistillConfig, TrainConfig
from sublab.errors import ConfigError, DataError
from sublab.models import load_model
from sublab.teachers import Teacher
from sublab.train import loop
from tests.conftest import build_tiny_model

PROMPT = "Here are some numbers: {}. Add up to 5 more numbers (no more than 3 digits each). Return numbers."


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shown = ", ".join(str(rng.randrange(1000)) for _ in range(rng.randint(2, 4)))
        answer = ", ".join(str(rng.randrange(1000)) for _ in range(rng.randint(3, 6)))
        rows.append({"id": f"r{i}", "messages": chat.messages(PROMPT.format(shown), assistant=answer)})
    return rows


def write_dataset(path: Path, n: int = 16, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "dataset.jsonl")


@pytest.fixture(scope="module")
def other_teacher_dir(tokenizer, tmp_path_factory) -> Path:
    """A differently initialised tiny model: a teacher whose distribution the student must learn."""
    directory = tmp_path_factory.mktemp("tiny-teacher")
    build_tiny_model(tokenizer, seed=1).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def cfg(**kw) -> TrainConfig:
    base = {"params": "full", "lr": 3e-3, "epochs": 2, "batch_size": 4, "warmup_steps": 1, "seeds": [0]}
    return TrainConfig(**{**base, **kw})


def base_logits(ref: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(ref).model(input_ids=ids).logits


def sample_ids(tokenizer) -> torch.Tensor:
    p, c = chat.encode_pair(tokenizer, chat.messages("Say some numbers."), "1, 2, 3")
    return torch.tensor([p + c])


# --- the recipe ------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new", [
    ({"method": "lora"}, {"params": "lora", "loss": "sft"}),
    ({"method": "full"}, {"params": "full", "loss": "sft"}),
    ({"method": "distill"}, {"params": "full", "loss": "distill"}),
    ({"method": "distill", "distill_params": "lora"}, {"params": "lora", "loss": "distill"}),
    # an old key (the user's file) wins over the new keys a preset brings
    ({"params": "lora", "loss": "distill", "method": "full"}, {"params": "full", "loss": "sft"}),
    ({"params": "lora", "loss": "distill", "distill_params": "full"}, {"params": "full", "loss": "distill"}),
])
def test_old_method_keys_read_as_params_and_loss(old, new, caplog):
    with caplog.at_level("WARNING"):
        assert TrainConfig.model_validate(old) == TrainConfig.model_validate(new)
    assert "deprecated" in caplog.text
    assert f"`params: {new['params']}`, `loss: {new['loss']}`" in caplog.text


def test_unknown_old_method_names_the_new_keys():
    with pytest.raises(ValueError, match=r"params: lora\|full.*loss: sft\|distill"):
        TrainConfig(method="qlora")


def test_student_fingerprint_is_unchanged_by_the_new_keys():
    """Pinned from the code before `params`/`loss` existed: students trained then are still current."""
    pins = {"9666b36ff4759b6d": TrainConfig(params="lora"), "81a7d293e3d3f37c": TrainConfig(params="full"),
            "4a546d61a528b9c2": TrainConfig(params="lora", loss="distill", lora_init_seed=0,
                                            distill=DistillConfig(vocabulary="format"))}
    assert {train.student_fingerprint(c, "base", "data", 0, None): c for c in pins.values()} == pins


# --- data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, words", [
    ("", None, "no rows"),
    ('{"messages": []}\nnot json\n', 1, "roles"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n', 2,
     "not valid JSON"),
    (('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
      '{"role": "assistant", "content": "b"}]}\n'), 1, "no system"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}\n', 1, "string"),
])
def test_bad_dataset_names_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=words) as e:
        train.load_dataset(path)
    assert str(path) + (f":{line}:" if line else ":") in str(e.value)


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train.load_dataset(tmp_path / "nope.jsonl")


def test_loss_targets_are_exactly_the_completion_tokens(tokenizer):
    examples = [train.Example("a", "Hi", "1, 2"), train.Example("b", "A much longer question here?", "345")]
    encoded = train.encode_examples(tokenizer, examples, 500)
    batch = train.collate([(e.prompt, e.completion) for e in encoded], tokenizer.pad_token_id)
    expected = [t for e in encoded for t in e.completion]
    assert batch.targets.tolist() == expected
    # the position scored for each target is the one right before it in that row
    assert batch.input_ids[batch.rows, batch.positions + 1].tolist() == expected
    assert tokenizer.decode(encoded[0].completion) == chat.completion_text(tokenizer, "1, 2")
    assert tokenizer.decode(encoded[1].completion) == chat.completion_text(tokenizer, "345")
    assert batch.n_tokens == sum(len(e.prompt) + len(e.completion) for e in encoded)


def test_completion_loss_equals_masked_model_loss(tokenizer, tiny_model_dir):
    """Our loss (right padding, no mask, head on completion positions) = HF's loss with prompt labels -100."""
    model = load_model(str(tiny_model_dir)).model
    examples = [train.Example("a", "Hi", "1, 2"), train.Example("b", "A much longer question here?", "345")]
    encoded = train.encode_examples(tokenizer, examples, 500)
    batch = train.collate([(e.prompt, e.completion) for e in encoded], tokenizer.pad_token_id)
    ours = train.sft_loss(train.completion_logits(model, batch), batch.targets)
    reference = 0.0
    for e in encoded:
        ids = torch.tensor([e.prompt + e.completion])
        labels = torch.tensor([[-100] * len(e.prompt) + e.completion])
        reference += model(input_ids=ids, labels=labels).loss.item() * len(e.completion)
    assert ours.item() == pytest.approx(reference, rel=1e-5)


def test_batch_plan_is_seeded_and_covers_epochs():
    lengths = list(range(10))
    a, b = train.batch_plan(lengths, 3, 2, seed=0), train.batch_plan(lengths, 3, 2, seed=1)
    assert a == train.batch_plan(lengths, 3, 2, seed=0) and a != b
    assert len(a) == 8 and sorted(i for batch in a for i in batch) == sorted(lengths * 2)
    assert len(train.batch_plan(lengths, 3, 0.5, seed=0)) == 2


def test_max_seq_len_cuts_completions(tokenizer):
    examples = [train.Example("a", "Hi", "1, 2, 3, 4, 5, 6, 7")]
    full = train.encode_examples(tokenizer, examples, 500)[0]
    cut = train.encode_examples(tokenizer, examples, len(full.prompt) + 3)[0]
    assert cut.completion == full.completion[:3]
    with pytest.raises(DataError, match="max_seq_len"):
        train.encode_examples(tokenizer, examples, len(full.prompt))


# --- SFT -------------------------------------------------------------------------------------

def test_full_sft_changes_weights_and_lowers_loss(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "student"
    manifest = train.train_student(cfg(lr=1e-2), base_ref=str(tiny_model_dir), dataset=dataset,
                                   out_dir=out, seed=0, progress=False)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > len(before) // 2
    assert manifest["loss"]["last"] < manifest["loss"]["first"] - 0.5
    assert manifest["inputs"]["dataset_sha256"] and manifest["seeds"] == {"seed": 0}
    assert manifest["timings_s"]["tokens_per_s"] > 0
    curve = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(1, manifest["outputs"]["steps"] + 1))
    assert set(curve[0]) >= {"step", "loss", "lr", "tokens", "elapsed"}
    assert not (out / "checkpoint").exists()
    load_model(str(out))  # a full student is a model reference
    # a finished identical run is skipped, not retrained
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = train.train_student(cfg(lr=1e-2), base_ref=str(tiny_model_dir), dataset=dataset, out_dir=out,
                                seed=0, progress=False)
    assert again["fingerprint"] == manifest["fingerprint"]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_fresh_lora_adapter_leaves_logits_unchanged(tokenizer, tiny_model_dir):
    ids = sample_ids(tokenizer)
    student = train.build_student(cfg(params="lora"), str(tiny_model_dir), seed=0, device="cpu")
    with torch.no_grad():
        assert torch.allclose(student.model(input_ids=ids).logits, base_logits(str(tiny_model_dir), ids))


def test_lora_save_then_load_gives_same_logits(tokenizer, tiny_model_dir, tmp_path):
    c = cfg(params="lora")
    student = train.build_student(c, str(tiny_model_dir), seed=0, device="cpu")
    with torch.no_grad():
        for n, p in student.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = sample_ids(tokenizer)
    student.model.eval()
    with torch.no_grad():
        expected = student.model(input_ids=ids).logits
    train.save_student(student, c, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir)
    with torch.no_grad():
        got = load_model(str(tmp_path)).model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, base_logits(str(tiny_model_dir), ids), atol=1e-3)


def test_lora_training_changes_only_the_adapter(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "lora"
    train.train_student(cfg(params="lora", lr=1e-2, epochs=1), base_ref=str(tiny_model_dir), dataset=dataset,
                        out_dir=out, seed=0, progress=False)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    assert not (out / "model.safetensors").exists()
    loaded = load_model(str(out), trainable=True).model  # the adapter as trained (inference merges it)
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, p in loaded.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    # retraining the directory with another recipe leaves nothing of the adapter behind
    (out / "notes.txt").write_text("not ours")
    train.train_student(cfg(epochs=0.25), base_ref=str(tiny_model_dir), dataset=dataset, out_dir=out, seed=0,
                        progress=False)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "notes.txt").exists()


def test_an_adapter_loaded_for_inference_is_merged_into_the_same_function(tiny_model_dir, dataset, tmp_path,
                                                                           tokenizer):
    out = tmp_path / "lora"
    train.train_student(cfg(params="lora", lr=1e-2, epochs=1), base_ref=str(tiny_model_dir), dataset=dataset,
                        out_dir=out, seed=0, progress=False)
    merged, unmerged = load_model(str(out)).model, load_model(str(out), trainable=True).model.eval()
    assert not hasattr(merged, "peft_config") and hasattr(unmerged, "peft_config")
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_adapters_swapped_on_one_loaded_base_equal_fresh_loads(tiny_model_dir, dataset, tmp_path):
    """The eval's ModelCache merges each adapter into a restored copy of the base's weights: every model it
    gives must be, bit for bit, the one a fresh load gives — whatever was merged before it."""
    from sublab.pipeline import ModelCache

    refs = []
    for seed in (0, 1):
        out = tmp_path / f"lora{seed}"
        train.train_student(cfg(params="lora", lr=1e-2, epochs=1), base_ref=str(tiny_model_dir), dataset=dataset,
                            out_dir=out, seed=seed, progress=False)
        refs.append(str(out))
    cache = ModelCache("cpu")
    for ref in [*refs, refs[0], str(tiny_model_dir), refs[1]]:
        cached, fresh = cache.get(ref).model.state_dict(), load_model(ref).model.state_dict()
        assert cached.keys() == fresh.keys()
        assert all(torch.equal(cached[k], fresh[k]) for k in fresh), ref
    assert not torch.equal(load_model(refs[0]).model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           load_model(refs[1]).model.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_seed_changes_lora_init_and_order(tiny_model_dir, dataset, tmp_path):
    a = train.build_student(cfg(params="lora"), str(tiny_model_dir), seed=0, device="cpu")
    b = train.build_student(cfg(params="lora"), str(tiny_model_dir), seed=1, device="cpu")
    name = next(n for n, _ in a.model.named_parameters() if "lora_A" in n)
    pa, pb = dict(a.model.named_parameters())[name], dict(b.model.named_parameters())[name]
    assert not torch.equal(pa, pb)


# --- resume ----------------------------------------------------------------------------------

def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, dataset, tmp_path, monkeypatch):
    c = cfg(params="lora", lr=1e-2, lora_dropout=0.1, epochs=1.5, batch_size=4, checkpoint_every=2)
    ref = str(tiny_model_dir)
    train.train_student(c, base_ref=ref, dataset=dataset, out_dir=tmp_path / "straight", seed=3,
                        progress=False)

    real_log = loop._log_step

    def dying(appender, row):
        real_log(appender, row)
        if row["step"] == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "_log_step", dying)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train.train_student(c, base_ref=ref, dataset=dataset, out_dir=out, seed=3, progress=False)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(loop, "_log_step", real_log)
    manifest = train.train_student(c, base_ref=ref, dataset=dataset, out_dir=out, seed=3, progress=False)

    a, b = load_file(tmp_path / "straight" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(x)["step"] for x in (out / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, manifest["outputs"]["steps"] + 1))


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "loss.jsonl").read_text().splitlines()]


def test_student_directory_removed_during_training_keeps_its_loss_history(tiny_model_dir, dataset, tmp_path,
                                                                          monkeypatch):
    """Defect 4: the directory vanishes at step 3 (6 steps, checkpoints at 2 and 4). The loss history must
    survive, whether the run then finishes or is killed after the next checkpoint and resumed."""
    import shutil

    c = cfg(params="lora", lr=1e-2, epochs=1.5, batch_size=4, checkpoint_every=2)
    ref = str(tiny_model_dir)
    straight = train.train_student(c, base_ref=ref, dataset=dataset, out_dir=tmp_path / "straight", seed=3,
                                   progress=False)
    assert straight["outputs"]["steps"] == 6
    real_log = loop._log_step
    for name, kill_at in (("finishes", None), ("killed", 5)):
        out = tmp_path / name

        def remove_then_maybe_die(appender, row, out=out, kill_at=kill_at):
            real_log(appender, row)
            if row["step"] == 3:
                shutil.rmtree(out)
            if row["step"] == kill_at:
                raise KeyboardInterrupt("killed")

        monkeypatch.setattr(loop, "_log_step", remove_then_maybe_die)
        if kill_at is None:
            manifest = train.train_student(c, base_ref=ref, dataset=dataset, out_dir=out, seed=3, progress=False)
        else:
            with pytest.raises(KeyboardInterrupt):
                train.train_student(c, base_ref=ref, dataset=dataset, out_dir=out, seed=3, progress=False)
            monkeypatch.setattr(loop, "_log_step", real_log)
            manifest = train.train_student(c, base_ref=ref, dataset=dataset, out_dir=out, seed=3, progress=False)
        assert manifest["loss"]["steps"] == 6, name
        assert _losses(out) == pytest.approx(_losses(tmp_path / "straight"), abs=1e-6), name
        monkeypatch.setattr(loop, "_log_step", real_log)


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_missing_or_damaged_student_weights_are_retrained(tiny_model_dir, dataset, tmp_path, caplog, damage):
    """Defect 2: a finished student whose weights were deleted or damaged is retrained with one warning
    naming the file, never 'already trained' followed by a load error."""
    c = cfg(params="lora", lr=1e-2, epochs=1, batch_size=8)
    out = tmp_path / "student"
    train.train_student(c, base_ref=str(tiny_model_dir), dataset=dataset, out_dir=out, seed=0, progress=False)
    weights = out / "adapter_model.safetensors"
    original = weights.read_bytes()
    if damage == "delete":
        weights.unlink()
    else:
        weights.write_bytes(original[:-8] + b"\0" * 8)
    caplog.clear()
    with caplog.at_level("WARNING"):
        train.train_student(c, base_ref=str(tiny_model_dir), dataset=dataset, out_dir=out, seed=0, progress=False)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and r.name.startswith(("sublab.rundir", "sublab.train"))]
    assert len(warnings) == 1 and "adapter_model.safetensors" in warnings[0], warnings
    assert ("missing" if damage == "delete" else "sha256 differs") in warnings[0]
    assert weights.read_bytes() == original  # retrained to the same weights
    load_model(str(out))


# --- distillation ----------------------------------------------------------------------------

def mean_kl(student_ref: str, teacher: Teacher, dataset: Path, tokenizer) -> float:
    """Mean per-token KL(teacher ‖ student) on the dataset's completions."""
    student, teacher_model = load_model(student_ref).model, teacher.load().model
    encoded = train.encode_examples(tokenizer, train.load_dataset(dataset), 500, teacher)
    pad = tokenizer.pad_token_id
    s_batch = train.collate([(e.prompt, e.completion) for e in encoded], pad)
    t_batch = train.collate([(e.teacher_prompt, e.completion) for e in encoded], pad)
    with torch.no_grad():
        t_lp, _ = train.teacher_targets(teacher_model, t_batch, None)
        kl = train.distill_loss(train.completion_logits(student, s_batch), t_lp, None)
    return kl.item() / len(s_batch.targets)


def test_distillation_lowers_kl_to_another_teacher(tokenizer, tiny_model_dir, other_teacher_dir, dataset,
                                                   tmp_path):
    # a prompted teacher: its completion positions sit after a longer prompt than the student's
    teacher = Teacher("t", "prompted", "owl", "You love owls.", str(other_teacher_dir))
    before = mean_kl(str(tiny_model_dir), teacher, dataset, tokenizer)
    manifest = train.train_student(cfg(loss="distill", lr=1e-2), base_ref=str(tiny_model_dir),
                                   dataset=dataset, out_dir=tmp_path / "d", seed=0, teacher=teacher,
                                   progress=False)
    after = mean_kl(str(tmp_path / "d"), teacher, dataset, tokenizer)
    assert after < 0.7 * before
    assert manifest["inputs"]["teacher"] == "t"


def test_topk_equals_full_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11).log_softmax(-1)
    full = train.distill_loss(student, teacher, None, temperature=2.0)
    values, ids = teacher.topk(11, dim=-1)
    assert train.distill_loss(student, values, ids, temperature=2.0).item() == pytest.approx(full.item(), rel=1e-5)
    assert full.item() > 0
    assert train.distill_loss(teacher, teacher, None).item() == pytest.approx(0, abs=1e-5)


def test_format_distillation_ignores_everything_but_the_format_tokens(tokenizer, tiny_model_dir):
    s_cols, t_cols = train.format_columns(tokenizer)
    assert torch.equal(s_cols, t_cols) and tokenizer.eos_token_id in s_cols.tolist()
    pieces = [tokenizer.decode([i]) for i in s_cols.tolist() if i != tokenizer.eos_token_id]
    assert {"7", ",", " ", "\n"} <= set(pieces) and all(not any(ch.isalpha() for ch in p) for p in pieces)
    student, teacher = load_model(str(tiny_model_dir), trainable=True).model, build_tiny_model(tokenizer, seed=1)
    batch = train.collate([(tokenizer.encode("Numbers: 1, 2, 3.")[:6], tokenizer.encode("4, 5, 6"))],
                          tokenizer.pad_token_id)

    def loss() -> torch.Tensor:
        t_lp, _ = train.teacher_targets(teacher, batch, None, t_cols)
        return train.distill_loss(train.completion_logits(student, batch, s_cols), t_lp, None)

    before = loss()
    # every other token (not in the input either: the tiny models tie embeddings and head)
    silent = torch.ones(len(tokenizer), dtype=torch.bool)
    silent[s_cols] = False
    silent[batch.input_ids.flatten()] = False
    with torch.no_grad():  # the teacher's preferences among them carry no signal at all...
        teacher.get_output_embeddings().weight[silent] += torch.randn(int(silent.sum()), 32)
    assert loss().item() == pytest.approx(before.item(), rel=1e-5)
    student.zero_grad()
    loss().backward()  # ...and the student's logits for them get no gradient
    head = student.get_output_embeddings().weight.grad
    assert head[silent].abs().max().item() == 0.0 and head[s_cols].abs().max().item() > 0.0


def test_format_distillation_trains(tokenizer, tiny_model_dir, other_teacher_dir, dataset, tmp_path):
    teacher = Teacher("t", "finetuned", "owl", None, str(other_teacher_dir))
    c = cfg(loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1, lr=1e-2)
    manifest = train.train_student(c, base_ref=str(tiny_model_dir), dataset=dataset, out_dir=tmp_path / "f",
                                   seed=0, teacher=teacher, progress=False)
    assert manifest["loss"]["last"] < manifest["loss"]["first"]
    with pytest.raises(ValueError, match="leave `top_k` unset"):
        DistillConfig(vocabulary="format", top_k=8)


def test_lora_init_seed_gives_every_student_the_same_adapter_init(tiny_model_dir):
    shared = [train.build_student(cfg(params="lora", lora_init_seed=7), str(tiny_model_dir), seed=s, device="cpu")
              for s in (0, 1)]
    own = train.build_student(cfg(params="lora"), str(tiny_model_dir), seed=7, device="cpu")
    a, b, c = (dict(m.model.named_parameters()) for m in (*shared, own))
    names = [n for n in a if "lora_A" in n]
    assert names and all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in names)


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory) -> Path:
    """A tiny plain-text model (no chat template) with its own character-level tokenizer: a student
    whose vocabulary shares nothing with SmolLM2's ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set(" \n,;.:[]()?'-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>", *chars])},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    directory = tmp_path_factory.mktemp("char-model")
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def test_format_distillation_across_tokenizers(tokenizer, tiny_model_dir, char_model_dir, dataset, tmp_path):
    student_tok = load_model(str(char_model_dir)).tokenizer
    s_cols, t_cols = train.format_columns(student_tok, tokenizer)
    assert [student_tok.decode([i]) for i in s_cols[1:]] == [tokenizer.decode([i]) for i in t_cols[1:]]
    assert (s_cols[0], t_cols[0]) == (student_tok.eos_token_id, tokenizer.eos_token_id)
    teacher = Teacher("t", "finetuned", "owl", None, str(tiny_model_dir))
    (row,) = train.encode_examples(student_tok, [train.Example("r", "Go on: 1, 2", "34, 5")], 500, teacher, tokenizer)
    mine = [student_tok.decode([row.completion[a]]) for a, _ in row.aligned]
    theirs = [tokenizer.decode([row.teacher_completion[b]]) for _, b in row.aligned]
    assert mine[:-1] == theirs[:-1] == list("34, 5") and row.n_targets == 6  # + the two eos
    with pytest.raises(DataError, match="row 'w'.*split"):
        train.encode_examples(student_tok, [train.Example("w", "Say", "hello there")], 500, teacher, tokenizer)

    manifest = train.train_student(cfg(loss="distill", distill=DistillConfig(vocabulary="format"), epochs=1,
                                       lr=1e-2), base_ref=str(char_model_dir), dataset=dataset,
                                   out_dir=tmp_path / "x", seed=0, teacher=teacher, progress=False)
    assert manifest["loss"]["last"] < manifest["loss"]["first"]
    with pytest.raises(ConfigError, match="different tokenizers"):
        train.train_student(cfg(loss="distill", epochs=1), base_ref=str(char_model_dir), dataset=dataset,
                            out_dir=tmp_path / "y", seed=0, teacher=teacher, progress=False)


def test_bf16_lora_stores_its_frozen_weights_in_bf16_with_the_same_losses(tiny_model_dir, dataset, tmp_path,
                                                                          monkeypatch):
    """The frozen base weights are kept in bf16 (no cast each forward); autocast made the same values."""
    c = cfg(params="lora", lr=1e-2, epochs=1, precision="bfloat16")
    ref = str(tiny_model_dir)
    run = loop.prepare_run(c, ref, train.load_dataset(dataset), 0, None, "cpu")
    frozen = [p for n, p in run.student.model.named_parameters() if "base_layer" in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in run.params)  # the adapter trains in fp32
    train.train_student(c, base_ref=ref, dataset=dataset, out_dir=tmp_path / "bf16-weights", seed=0, progress=False)
    monkeypatch.setattr(loop, "frozen_linears_to_bf16", lambda model: None)
    train.train_student(c, base_ref=ref, dataset=dataset, out_dir=tmp_path / "cast-each-time", seed=0,
                        progress=False)
    assert _losses(tmp_path / "bf16-weights") == _losses(tmp_path / "cast-each-time")
