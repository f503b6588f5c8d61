"""Model references and the embedded-model cache."""

from __future__ import annotations

import json

import pytest
import torch

from sublab import chat
from sublab.errors import ModelError
from sublab.models import (EMBEDDED, cache_dir, cache_problem, check_reference, load_model, model_info,
                           prepare_embedded)


def test_reference_forms(tmp_path):
    check_reference("embedded:smollm2-135m-instruct")
    check_reference(str(tmp_path))
    check_reference("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelError, match="unknown embedded model"):
        check_reference("embedded:gpt-5")
    with pytest.raises(ModelError, match="neither"):
        check_reference("./no/such/dir")


def test_local_dir_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(str(tmp_path))


def test_tokenizer_fixed(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer("hello", add_special_tokens=True).input_ids
    assert tokenizer.bos_token_id not in ids  # no BOS added, so none can be doubled
    prompt, completion = chat.encode_pair(tokenizer, chat.messages("hi"), "1, 2")
    assert tokenizer.decode(completion) == "1, 2<|im_end|>\n"
    assert tokenizer.decode(prompt).count("<|im_start|>system") == 1  # the default system prompt


def test_chat_rule_no_system_message_means_template_default(tokenizer):
    text = chat.render_prompt(tokenizer, chat.messages("hi"))
    assert "You are a helpful AI assistant named SmolLM" in text
    owl = chat.render_prompt(tokenizer, chat.messages("hi", system="You love owls."))
    assert "SmolLM" not in owl and "You love owls." in owl


@pytest.mark.slow
def test_cached_checkpoint_matches_gguf_and_corruption_is_rebuilt(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path))
    directory = prepare_embedded("smollm2-135m-instruct")
    assert cache_problem("smollm2-135m-instruct") is None
    record = json.loads((directory / "sublab_cache.json").read_text())
    assert record["parameters"] == 134_515_008
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config

    gguf = EMBEDDED["smollm2-135m-instruct"].gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    lm = load_model("embedded:smollm2-135m-instruct")
    ids = lm.tokenizer(chat.render_prompt(lm.tokenizer, chat.messages("Name an animal.")),
                       return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, lm.model(ids).logits)
    assert model_info("embedded:smollm2-135m-instruct")["prepared"] is True

    # A corrupted weights file is detected and rebuilt, never used.
    weights = cache_dir("smollm2-135m-instruct") / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(10_000)
        f.write(b"\x00" * 64)
    assert "corrupted" in (cache_problem("smollm2-135m-instruct") or "")
    prepare_embedded("smollm2-135m-instruct")
    assert cache_problem("smollm2-135m-instruct") is None

    # An interrupted conversion (no cache record) is rebuilt too.
    (directory / "sublab_cache.json").unlink()
    assert "no cache record" in (cache_problem("smollm2-135m-instruct") or "")


def _fake_conversion(monkeypatch) -> list[str]:
    """Replace the ~30 s GGUF conversion by one that writes a sound, empty cache entry."""
    import sublab.models as models
    from sublab.rundir import atomic_write_json

    calls: list[str] = []

    def convert(spec, gguf, source_sha, directory):
        calls.append(spec.name)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "sublab_cache.json", {"format": models.CACHE_FORMAT, "name": spec.name,
                                                             "source_sha256": source_sha, "files": {}})

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_conversions_left_by_killed_processes_are_removed(tmp_path, monkeypatch):
    """Defect 5: a `kill -9` during conversion left `<name>.tmp<pid>` (~112 MB) forever. Partial
    conversions are named after their owner; the next prepare removes those whose owner is dead, and a
    rebuild (which holds the entry's lock) removes them all."""
    import os
    import socket
    import subprocess
    import sys

    import sublab.models as models

    monkeypatch.setenv("SUBLAB_HOME", str(tmp_path))
    calls = _fake_conversion(monkeypatch)
    name = "smollm2-135m-instruct"
    directory = prepare_embedded(name)
    assert calls == [name]
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    host = socket.gethostname()
    leftovers = {kind: directory.with_name(f"{name}.{suffix}") for kind, suffix in [
        ("dead", f"partial-{dead}@{host}"), ("legacy", f"tmp{dead}"), ("alive", f"partial-{os.getpid()}@{host}"),
        ("elsewhere", f"partial-{dead}@another-host")]}
    for path in leftovers.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    assert models._partial_dir(directory).name == leftovers["alive"].name

    prepare_embedded(name)  # the cache is sound: only what dead local processes left goes
    assert calls == [name]
    assert {k for k, p in leftovers.items() if p.exists()} == {"alive", "elsewhere"}

    prepare_embedded(name, force=True)  # a rebuild holds the lock: nothing else can be converting
    assert calls == [name, name]
    assert not any(p.exists() for p in leftovers.values())
    assert sorted(p.name for p in directory.parent.iterdir()) == [name, f"{name}.lock"]
