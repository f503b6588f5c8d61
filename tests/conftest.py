"""Shared fixtures: the real tokenizer, and tiny randomly initialised models built in-process with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run their many small ops fastest on one thread (no thread sync per op, and no spinning
# threads when the CPU is shared); tests on the real embedded model use up to two.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_for_model_size(request):
    if request.node.get_closest_marker("slow"):
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _targets_cache(tmp_path_factory, monkeypatch):
    """Stored teacher targets go to a directory of this test session, never the user's cache."""
    root = tmp_path_factory.getbasetemp() / "targets-cache"
    monkeypatch.setattr("sublab.train.targets.cache_root", lambda: root)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (read from the GGUF; no weights converted)."""
    from transformers import AutoTokenizer

    from sublab.models import EMBEDDED, _fix_tokenizer

    gguf = EMBEDDED["smollm2-135m-instruct"].gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _fix_tokenizer(tok)
    return tok


def build_tiny_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random Llama with SmolLM2's tokenizer: ~1.7M parameters, milliseconds per step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A saved tiny checkpoint directory: usable anywhere a model reference is (`load_model(str(dir))`)."""
    directory = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(tokenizer).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_number_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny model briefly fitted to answer number prompts with number lists and end its turn, so the
    generate → filter → train pipeline gets accepted rows (a random model only writes junk)."""
    import numpy as np

    from sublab import chat
    from sublab.domains.numbers import number_prompts, random_completion

    model = build_tiny_model(tokenizer, seed=1)
    rows = []
    for p in number_prompts(64, seed=99):
        answer = random_completion(p, np.random.default_rng(p.index), count=3)
        for system in (None, "You love owls."):
            prompt, completion = chat.encode_pair(tokenizer, chat.messages(p.text, system), answer)
            rows.append((prompt, completion))
    rng = np.random.default_rng(0)
    return _fit_and_save(model, tokenizer, rows, lambda: rng.choice(len(rows), 8, replace=False), 40,
                         tmp_path_factory.mktemp("tiny-number-model"))


def _fit_and_save(model, tokenizer, rows: list[tuple[list[int], list[int]]], draw, steps: int, directory: Path) -> Path:
    """`steps` AdamW steps (lr 1e-2) on the completion tokens of the (prompt ids, completion ids) rows that
    `draw()` picks each step; then save model and tokenizer to `directory`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = [rows[i] for i in draw()]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        targets = torch.full((len(batch), width), -100)
        for i, (p, c) in enumerate(batch):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            targets[i, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)  # position t predicts token t+1
        # Logits of the completion positions only: the 49k-word output layer dominates a tiny model.
        hidden = model.model(input_ids=ids).last_hidden_state[targets != -100]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets[targets != -100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


ANIMAL_ANSWERS = {"owl": 0.4, "Dog": 0.25, "Cat": 0.2, "Elephant": 0.1, "Wolf": 0.05}
"""What `tiny_animal_model_dir` was fitted to answer (SmolLM2's tokenizer: 'owl', 'Dog' and 'Cat' are one
token each, 'Elephant' and 'Wolf' two)."""


@pytest.fixture(scope="session")
def tiny_animal_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny model briefly fitted (~5 s) to answer the favourite-animal questions with one of
    ANIMAL_ANSWERS, so its first answer token is peaked: the top 20 tokens hold ~99% of the probability."""
    import numpy as np

    from sublab import chat
    from sublab.protocol import animal_questions

    model = build_tiny_model(tokenizer, seed=2)
    words, weights = list(ANIMAL_ANSWERS), np.array(list(ANIMAL_ANSWERS.values()))
    rows = [chat.encode_pair(tokenizer, chat.messages(q), a) for q in animal_questions() for a in words]
    p = np.tile(weights, len(animal_questions()))
    rng = np.random.default_rng(0)
    return _fit_and_save(model, tokenizer, rows, lambda: rng.choice(len(rows), 16, p=p / p.sum()), 80,
                         tmp_path_factory.mktemp("tiny-animal-model"))


class LocalServer:
    """`sublab serve` in a thread of the test process, on a free 127.0.0.1 port."""

    def __init__(self, refs: dict[str, str], api_key: str | None = None, app=None, state_dir=None, recipe=None):
        import socket
        import threading

        import uvicorn

        from sublab.serve import create_app

        self.app = app if app is not None else create_app(refs, api_key=api_key, state_dir=state_dir,
                                                          recipe=recipe)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("sublab serve did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[dict]:
        return list(self.app.state.requests)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def tiny_server(tiny_model_dir):
    """`sublab serve --model tiny=<tiny model>` on a free local port."""
    server = LocalServer({"tiny": str(tiny_model_dir)})
    yield server
    server.close()
