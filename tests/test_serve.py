"""`sublab serve`: a real uvicorn server on 127.0.0.1 over a tiny model, spoken to with the official
`openai` client (and raw HTTP for what a client cannot send, such as broken JSON)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from conftest import LocalServer
from sublab import chat
from sublab.errors import ConfigError
from sublab.models import load_model
from sublab.sampling import Sampling, decode_batch, row_generator
from sublab.serve import parse_model_specs


def client(server: LocalServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30)


def test_served_samples_are_the_pipelines_samples(tiny_server, tiny_model_dir):
    c = client(tiny_server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "Continue: 3, 1, 4"}]
    out = c.chat.completions.create(model="tiny", messages=messages, n=3, temperature=1.0, max_tokens=6, seed=5)
    again = c.chat.completions.create(model="tiny", messages=messages, n=3, temperature=1.0, max_tokens=6, seed=5)
    assert [ch.message.content for ch in out.choices] == [ch.message.content for ch in again.choices]

    lm = load_model(str(tiny_model_dir))  # the same draws through sublab's own decode loop
    prompt = lm.tokenizer(chat.render_prompt(lm.tokenizer, chat.messages(messages[0]["content"])),
                          add_special_tokens=False).input_ids
    rows = decode_batch(lm.model, lm.tokenizer, [prompt], [row_generator(5, [j]) for j in range(3)],
                        Sampling(1.0), 6, rows=[0, 0, 0])
    assert [ch.message.content for ch in out.choices] == [lm.tokenizer.decode(ids, skip_special_tokens=True)
                                                          for ids, _ in rows]
    assert len({ch.message.content for ch in out.choices}) > 1  # three draws, not one repeated
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == sum(len(ids) for ids, _ in rows)
    assert [ch.finish_reason for ch in out.choices] == ["stop" if r == "eos" else "length" for _, r in rows]


def test_logprobs_and_top_logprobs(tiny_server):
    c = client(tiny_server)
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=1,
                                    temperature=0, max_tokens=4, seed=0, logprobs=True, top_logprobs=3)
    tokens = out.choices[0].logprobs.content
    assert len(tokens) == out.usage.completion_tokens == 4
    for t in tokens:
        alts = [a.logprob for a in t.top_logprobs]
        assert len(alts) == 3 and alts == sorted(alts, reverse=True) and alts[0] <= 0
        # temperature 0 is greedy: each sampled token is the most likely one
        assert t.token == t.top_logprobs[0].token and math.isclose(t.logprob, alts[0], rel_tol=1e-5)
    assert "".join(t.token for t in tokens) == out.choices[0].message.content


def test_bad_requests_get_openai_shaped_errors(tiny_server):
    c = client(tiny_server)
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=msgs)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, n=0)
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, n=129)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, stream=True)
    assert e.value.body["param"] == "stream"

    raw = httpx.post(f"{tiny_server.base_url}/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert "JSON" in raw.json()["error"]["message"]
    missing = httpx.post(f"{tiny_server.base_url}/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    unknown_path = httpx.get(f"{tiny_server.base_url}/nothing-here")
    assert unknown_path.status_code == 404 and unknown_path.json()["error"]["type"] == "invalid_request_error"

    log = tiny_server.requests  # every request counted, refused ones included
    assert [r["status"] for r in log] == [404, 400, 400, 400, 400, 400, 400, 404]
    assert all(r["path"].startswith("/v1/") for r in log)


def test_api_key_is_required_when_configured(tiny_model_dir):
    server = LocalServer({"tiny": str(tiny_model_dir)}, api_key="sk-serve-secret")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, "sk-wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        assert [m.id for m in client(server, "sk-serve-secret").models.list().data] == ["tiny"]
    finally:
        server.close()


def test_model_specs(tiny_model_dir):
    assert parse_model_specs([]) == {"embedded:smollm2-135m-instruct": "embedded:smollm2-135m-instruct"}
    assert parse_model_specs([f"owl={tiny_model_dir}", str(tiny_model_dir)]) == {
        "owl": str(tiny_model_dir), str(tiny_model_dir): str(tiny_model_dir)}
    with pytest.raises(ConfigError, match="given twice"):
        parse_model_specs([f"a={tiny_model_dir}", f"a={tiny_model_dir}"])


def test_the_serve_command_binds_localhost_and_answers(tiny_model_dir, tmp_path):
    """`python -m sublab.cli serve` as a user starts it: a subprocess, stopped with SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "SUBLAB_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "sublab.cli", "serve", "--model", f"tiny={tiny_model_dir}",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, models = time.time() + 60, None
        while models is None and time.time() < deadline and proc.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert models is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 60 s"
        assert [m["id"] for m in models["data"]] == ["tiny"]
        out = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                         json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
