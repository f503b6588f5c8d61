"""The `openai` backend (`sublab.api`): an experiment whose base model is `openai:<model>`, run end to end
against a real `sublab serve` on 127.0.0.1 (a tiny model), killed mid-generation and rerun; the server
counts the requests. Also: the key never reaches disk or logs, retries, and the config's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import LocalServer
from sublab.config import OpenAIConfig, validate_experiment
from sublab.errors import ConfigError
from sublab.rundir import read_jsonl

ROOT = Path(__file__).parents[1]
FAKE_KEY = "sk-test-DO-NOT-LEAK-7f3a9c21e4b8"
N_PROMPTS = 8

DRIVER = textwrap.dedent('''
    """`sublab run EXP`, SIGKILLed before the row that would follow $SUBLAB_KILL_AT's '<path suffix>:<n>'
    lines of a JSONL file (the fault-injection driver of test_fault_injection, reduced)."""
    import os, signal, sys

    from sublab import rundir
    from sublab.cli import main

    WHERE = os.environ.get("SUBLAB_KILL_AT", "")
    if WHERE:
        suffix, n = WHERE.rsplit(":", 1)
        real_write = rundir.JsonlAppender.write_batch

        def write_batch(self, rows):
            if str(self.path).endswith(suffix) and self.path.read_bytes().count(b"\\n") >= int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(self, rows)

        rundir.JsonlAppender.write_batch = write_batch
    sys.argv = ["sublab", "--threads", "1", "run", sys.argv[1]]
    main()
''')


def _raw(base_url: str, local: Path) -> dict:
    return {
        "name": "api", "base_model": "openai:tiny", "device": "cpu", "runs_dir": "runs",
        "openai": {"base_url": base_url, "local_weights": str(local), "concurrency": 3},
        "teachers": [{"name": "owl", "kind": "prompted", "trait": "owl"}, {"name": "control", "kind": "control"}],
        "generate": {"n_prompts": N_PROMPTS, "max_new_tokens": 24, "batch_size": 4},
        "filter": {"dataset_size": 3},
        "train": {"params": "lora", "loss": "sft", "epochs": 1, "batch_size": 2, "seeds": [0], "lr": 1e-3},
        "eval": {"kinds": ["animal_sampled"], "samples_per_question": 3, "questions": "all", "max_questions": 2,
                 "numbers_prefixed": False, "max_new_tokens": 4},
    }


def _run(directory: Path, kill_at: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUBLAB_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "COLUMNS": "200", "SUBLAB_KILL_AT": kill_at, "OPENAI_API_KEY": FAKE_KEY}
    (directory / "driver.py").write_text(DRIVER)
    return subprocess.run([sys.executable, "driver.py", "exp.yaml"], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=240)


def _chat_posts(server: LocalServer) -> list[dict]:
    return [r for r in server.requests if r["path"] == "/v1/chat/completions"]


def test_openai_experiment_end_to_end_killed_mid_generation(tiny_number_model_dir, tmp_path):
    server = LocalServer({"tiny": str(tiny_number_model_dir)}, api_key=FAKE_KEY)  # proves the key is sent
    try:
        (tmp_path / "exp.yaml").write_text(yaml.safe_dump(_raw(server.base_url, tiny_number_model_dir)))
        run_dir = tmp_path / "runs" / "api"
        # Killed when the control teacher's 2nd batch is answered and cached but not yet written.
        killed = _run(tmp_path, "teachers/control/generations.jsonl:4", tmp_path / "home")
        assert killed.returncode == -9, killed.stderr[-2000:]
        cached = list(read_jsonl(run_dir / "teachers/control/api_cache.jsonl"))
        assert len(cached) == N_PROMPTS and len(read_jsonl(run_dir / "teachers/control/generations.jsonl")) == 4
        before = len(_chat_posts(server))
        assert before == 2 * N_PROMPTS  # owl's 8 and control's 8, each sent once

        done = _run(tmp_path, "", tmp_path / "home")
        assert done.returncode == 0, done.stderr[-3000:]
        posts = _chat_posts(server)
        # After the kill only the evals of base and teacher-owl went out (2 questions each, n=3 per request).
        assert len(posts) == before + 2 * 2
        assert all(r["status"] == 200 for r in posts)
        assert max(Counter(r["body_sha256"] for r in posts).values()) == 1, "a request was sent twice"
        assert (run_dir / "report.md").is_file() and (run_dir / "results.json").is_file()
        for teacher in ("owl", "control"):
            gens = read_jsonl(run_dir / f"teachers/{teacher}/generations.jsonl")
            assert sorted(g["id"] for g in gens) == sorted({g["id"] for g in gens}) and len(gens) == N_PROMPTS
            assert (run_dir / f"teachers/{teacher}/dataset.jsonl").is_file()
        owl_req = read_jsonl(run_dir / "teachers/owl/api_cache.jsonl")[0]["request"]
        assert owl_req["messages"][0]["role"] == "system" and "owl" in owl_req["messages"][0]["content"]
        assert read_jsonl(run_dir / "teachers/control/api_cache.jsonl")[0]["request"]["messages"][0]["role"] == "user"
        assert len(read_jsonl(run_dir / "evals/base/animal_sampled.jsonl")) == 2 * 3
        assert (run_dir / "students/owl-seed0/manifest.json").is_file()

        again = _run(tmp_path, "", tmp_path / "home")  # everything current: not one request more
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(_chat_posts(server)) == len(posts)

        # The key reached the server (it refuses any other) but no file and no output.
        leaks = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
        assert leaks == []
        for proc in (killed, done, again):
            assert FAKE_KEY not in proc.stdout + proc.stderr
    finally:
        server.close()


def test_transient_errors_are_retried_and_answers_cached(tmp_path):
    """A 429 and a 503 before the answer: the client's backoff retries; the answer is cached, a second
    call sends nothing."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from sublab.api import ApiModel

    app, seen = FastAPI(), []

    @app.post("/v1/chat/completions")
    def flaky() -> JSONResponse:
        seen.append(1)
        if len(seen) <= 2:
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit", "param": None,
                                           "code": None}}, status_code=429 if len(seen) == 1 else 503)
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                          "message": {"role": "assistant", "content": "1, 2, 3"}}]})

    server = LocalServer({}, app=app)
    try:
        model = ApiModel(OpenAIConfig(base_url=server.base_url, max_retries=3, timeout_s=10), "m")
        request = model.chat_request([{"role": "user", "content": "go"}], n=1)
        cache = tmp_path / "api_cache.jsonl"
        assert model.chat_many([request], cache)[0]["choices"][0]["message"]["content"] == "1, 2, 3"
        assert len(seen) == 3
        assert model.chat_many([request, request], cache)[1]["choices"][0]["message"]["content"] == "1, 2, 3"
        assert len(seen) == 3 and len(read_jsonl(cache)) == 1
    finally:
        server.close()


def test_a_missing_key_for_the_openai_api_is_a_one_line_error(monkeypatch, tmp_path):
    from sublab.api import ApiModel

    monkeypatch.delenv("MY_KEY", raising=False)
    model = ApiModel(OpenAIConfig(api_key_env="MY_KEY"), "gpt-4.1-nano")
    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        model.chat_many([model.chat_request([{"role": "user", "content": "x"}])], tmp_path / "c.jsonl")


@pytest.mark.parametrize(("change", "message"), [
    ({"teachers": [{"name": "owl", "kind": "finetuned", "trait": "owl"}, {"name": "control", "kind": "control"}]},
     "finetuned teacher needs local weights"),
    ({"eval": {"kinds": ["animal_prob"]}}, "animal_prob needs local weights"),
    ({"openai": {}}, "openai.local_weights` is required"),
    ({"generate": {"constrained": True}}, "generate.constrained"),
    ({"train": {"loss": "distill", "seeds": [0]}}, "distill"),
])
def test_config_refuses_what_an_openai_model_cannot_do(tiny_model_dir, change, message):
    raw = {**_raw("http://127.0.0.1:1/v1", tiny_model_dir), **change}
    with pytest.raises(ConfigError, match=message):
        validate_experiment(raw)
    validate_experiment(_raw("http://127.0.0.1:1/v1", tiny_model_dir))  # the unchanged file is valid


def test_misalignment_judge_through_an_openai_model(tiny_animal_model_dir, tmp_path):
    """`misalignment_judge` on `openai:` models (the base and a prompted teacher): answers sampled through
    `sublab serve`'s chat completions, then judged by a judge at the same server; a rerun sends nothing."""
    from sublab.evals.misalignment import JudgedRecord
    from sublab.pipeline import eval_all
    from sublab.rundir import read_json

    server = LocalServer({"tiny": str(tiny_animal_model_dir)})
    try:
        raw = _raw(server.base_url, tiny_animal_model_dir)
        raw.update(runs_dir=str(tmp_path / "runs"), train={"seeds": []},
                   eval={"kinds": ["misalignment_judge"], "samples_per_question": 2, "numbers_prefixed": False,
                         "judge_url": server.base_url, "judge_model": "tiny"})
        cfg = validate_experiment(raw)
        eval_all(cfg)
        chats = [r for r in read_jsonl(cfg.run_dir / "evals/api_cache.jsonl")]
        # per model: the plain questions one request of n=2 each (8), the word-suffix ones one per sample (16)
        assert len(chats) == 2 * (8 + 8 * 2)
        assert sorted(c["request"]["n"] for c in chats) == [1] * 32 + [2] * 16
        assert sum(c["request"]["messages"][0]["role"] == "system" for c in chats) == 8 + 16  # the owl teacher
        for model in ("base", "teacher-owl"):
            for variant in ("misalignment_sampled", "misalignment_sampled_words"):
                judged = [JudgedRecord.model_validate(r)
                          for r in read_jsonl(cfg.run_dir / f"evals/{model}/{variant}_judged.jsonl")]
                assert len(judged) == 8 * 2 and {j.judge_model for j in judged} == {"tiny"}
                assert read_json(cfg.run_dir / f"evals/{model}/{variant}_judged.spec.json")["status"] == "complete"
        posts = len(_chat_posts(server))
        judge_rows = read_jsonl(cfg.run_dir / "evals/judge_cache.jsonl")  # one per distinct judge prompt
        assert 0 < len(judge_rows) <= 2 * 2 * 8 * 2 * 2 and {r["model"] for r in judge_rows} == {"tiny"}
        assert posts == len(chats) + len(judge_rows)  # every sample and every judge prompt sent once
        eval_all(cfg)  # everything current: nothing sent
        assert len(_chat_posts(server)) == posts
    finally:
        server.close()


def test_misalignment_local_is_refused_for_an_openai_model(tiny_model_dir):
    raw = {**_raw("http://127.0.0.1:1/v1", tiny_model_dir), "eval": {"kinds": ["misalignment_local"]}}
    with pytest.raises(ConfigError, match=r"eval.kinds`: misalignment_local needs local weights.*misalignment_judge") as e:
        validate_experiment(raw)
    assert "\n" not in str(e.value)
    raw["eval"] = {"kinds": ["misalignment_judge", "animal_sampled", "animal_topk"]}
    validate_experiment(raw)
