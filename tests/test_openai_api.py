"""The OpenAI-compatible HTTP API with the official `openai` client against a live server
(uvicorn on 127.0.0.1, a free port) over the in-process engine and the shipped default model.

Guards against: answers that differ from the Python client on the same engine; streams whose
text, finish_reason or usage differ from the non-streamed answer; chat without the role chunk;
n samples that share one seed; fields that are silently ignored; an error without OpenAI's
body or with the wrong status; a client that goes away mid-stream and leaves its request
holding pages.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.runner import EngineConfig
from raypd.server.backends import LocalEngineBackend
from raypd.server.http_server import HttpServer
from raypd.server.openai_app import OpenAIServer, build_app
from raypd.server.openai_chat import ChatTemplate

ROOT = Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=4, max_seq_len=256, prefill_buckets=(32, 64))
NAME = models.DEFAULT_MODEL
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "def main(argv):\n"


@pytest.fixture(scope="module")
def model():
    return models.load(NAME)


@pytest.fixture(scope="module")
def backend(model):
    b = LocalEngineBackend(LocalBackend(model, ENGINE), NAME, max_queued=8)
    b.start(warmup=False)
    yield b
    b.stop()


def serve(backend, **kw) -> HttpServer:
    template = kw.pop("chat_template", ChatTemplate(TEMPLATE, "", ""))
    server = OpenAIServer(backend, chat_template=template, **kw)
    return HttpServer(build_app(server)).start()


@pytest.fixture(scope="module")
def http(backend):
    h = serve(backend)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=120)


def pages_used(backend) -> int:
    return backend.local.engine.runner.allocator.num_used


def wait_idle(backend, within_s: float = 30.0) -> None:  # long enough for a decode shape to compile
    end = time.monotonic() + within_s
    while (pages_used(backend) or backend.loop.num_active) and time.monotonic() < end:
        time.sleep(0.01)
    assert pages_used(backend) == 0 and backend.loop.num_active == 0, "a request still holds pages"


def post(url: str, body, headers=None, raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def get(url: str, headers=None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def assert_error(status: int, body: dict, expected_status: int, param=None, says: str = ""):
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert says in err["message"], err


# ---------------------------------------------------------------- completions


def test_completion_matches_the_python_client(client, model, backend):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    (ref,) = raypd.generate([PROMPT], model=LocalBackend(model, ENGINE), max_tokens=12, logprobs=True)
    (choice,) = r.choices
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason and choice.index == 0
    assert choice.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert "".join(choice.logprobs.tokens) == ref.text
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    n_prompt = len(model.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(ref.token_ids))
    assert r.usage.total_tokens == n_prompt + len(ref.token_ids)
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the colocated engine has no prefix reuse
    wait_idle(backend)


def test_prompt_forms_and_token_ids(client, model):
    ids = model.tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model=NAME, prompt=[PROMPT, "import os\n"], max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == by_text.choices[0].text
    lists = client.completions.create(model=NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in lists.choices] == [by_text.choices[0].text] * 2
    assert lists.usage.prompt_tokens == 2 * len(ids)


def test_stream_equals_the_whole_answer_and_reports_usage(client, backend):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    content, last = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert all(c.usage is None for c in content)
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    plain = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in plain) and plain[-1].choices[0].finish_reason == "length"
    wait_idle(backend)


def test_echo_stop_and_seeds(client):
    greedy = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    echoed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + greedy
    stop = greedy[3:6]
    stopped = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[: greedy.index(stop)] and stopped.choices[0].finish_reason == "stop"
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=12, temperature=1.0)
    a = client.completions.create(seed=7, n=3, **kw)
    b = client.completions.create(seed=7, n=3, **kw)
    c = client.completions.create(seed=8, n=3, **kw)
    texts = lambda r: [ch.text for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2] and texts(a) == texts(b)
    assert len(set(texts(a))) == 3, "the n samples must each have their own seed stream"
    assert texts(a) != texts(c)
    assert a.usage.prompt_tokens == len(models.load(NAME).tokenizer.encode(PROMPT))  # the prompt counts once
    only_top = client.completions.create(seed=7, extra_body={"min_p": 1.0}, **kw)  # nothing but the top token
    assert only_top.choices[0].text == greedy


def test_n_samples_share_one_prefill_and_equal_independent_requests(client, backend, model):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, logprobs=0)
    prefill = backend.local.engine.prefill_engine
    before = prefill.num_computed_tokens
    together = client.completions.create(seed=11, n=3, **kw)
    assert prefill.num_computed_tokens - before == len(model.tokenizer.encode(PROMPT))  # one prefill
    alone = [client.completions.create(seed=11 + i, **kw).choices[0] for i in range(3)]  # sample i: seed + i
    for c, ref in zip(together.choices, alone):
        assert (c.text, c.finish_reason) == (ref.text, ref.finish_reason)
        assert c.logprobs.token_logprobs == pytest.approx(ref.logprobs.token_logprobs, abs=1e-4)
    assert together.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in alone)
    wait_idle(backend)


def test_echo_with_logprobs_returns_the_prompts_from_the_prefill(client, model, backend):
    ids = model.tokenizer.encode(PROMPT)
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    n = len(ids)
    assert lp.tokens[:n] == [model.tokenizer.decode([t]) for t in ids] and len(lp.tokens) == n + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first prompt token: null
    logits = model.logits(ids)  # teacher-forced: log p(ids[i] | ids[:i])
    expected = [float(logits[i - 1][ids[i]] - np.logaddexp.reduce(logits[i - 1])) for i in range(1, n)]
    assert lp.token_logprobs[1:n] == pytest.approx(expected, abs=1e-3)
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    assert lp.token_logprobs[n:] == plain.choices[0].logprobs.token_logprobs
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                            logprobs=0, stream=True))
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].logprobs.tokens == lp.tokens[:n]
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]
    streamed = [t for c in chunks for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs and "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    wait_idle(backend)


# ---------------------------------------------------------------- chat


def test_chat_streamed_and_not(client, backend):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True)
    (choice,) = whole.choices
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert [t.token for t in choice.logprobs.content] and all(t.top_logprobs == [] for t in choice.logprobs.content)
    prompt = ChatTemplate(TEMPLATE).render(messages)
    ref = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert choice.message.content == ref.choices[0].text and whole.usage.prompt_tokens == ref.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:-1]) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    wait_idle(backend)


def test_frequency_penalty_and_top_logprobs(client, model):
    """A repeated-token prompt is repeated less with frequency_penalty; top logprobs come in
    OpenAI's shapes, sorted, with the sampled token's logprob among them (greedy: first)."""
    prompt = "import os\n" * 6
    kw = dict(model=NAME, prompt=prompt, max_tokens=32, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penal = client.completions.create(**kw, frequency_penalty=2.0).choices[0].text
    assert plain.count("import os") > penal.count("import os")
    ref = raypd.generate([prompt], model=model, max_tokens=32, frequency_penalty=2.0, backend="local")[0]
    assert penal == ref.text
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and top[token] == token_lp == max(top.values())
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "import os"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    for t in chat.choices[0].logprobs.content:
        alts = [a.logprob for a in t.top_logprobs]
        assert len(alts) == 5 and alts == sorted(alts, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "import os"}],
                                                 max_tokens=6, temperature=0, logprobs=True, top_logprobs=5,
                                                 stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in chat.choices[0].logprobs.content]


def test_chat_template_from_the_checkpoint_and_without_one(tmp_path, backend, model):
    d = tmp_path / "chatty"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (d / f).symlink_to(models.DATA_DIR / NAME / f)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": {"content": "#"}}))
    assert ChatTemplate.find(d).render([{"role": "user", "content": "x"}]) == "#<user>x\n<assistant>"
    none = serve(backend, chat_template=None)
    try:
        status, body, _ = post(f"{none.url}/v1/chat/completions",
                               {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert_error(status, body, 400, "messages", "--chat-template FILE")
    finally:
        none.stop()


# ---------------------------------------------------------------- other routes


def test_models_health_metrics_tokenize(http, client, model):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert get(f"{http.url}/health")[0] == 200
    assert get(f"{http.url}/health/ready") == (200, b'{"status":"ready"}')
    status, body, _ = post(f"{http.url}/tokenize", {"prompt": PROMPT})
    assert status == 200 and body["tokens"] == model.tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    status, back, _ = post(f"{http.url}/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back == {"prompt": PROMPT}
    status, chat, _ = post(f"{http.url}/tokenize", {"messages": [{"role": "user", "content": "x"}]})
    assert chat["tokens"] == model.tokenizer.encode("<user>x\n<assistant>")
    status, text = get(f"{http.url}/metrics")
    assert status == 200 and b'raypd_requests_total{code="ok"}' in text and b"raypd_kv_pages_total" in text


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("body, param, says", [
    ({"prompt": "x", "tools": []}, "tools", "unsupported field tools"),
    ({"prompt": "x", "response_format": {}, "suffix": "y"}, "response_format", "response_format, suffix"),
    ({"prompt": "x", "temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({"prompt": "x", "top_p": 0}, "top_p", "(0.0, 1.0]"),
    ({"prompt": "x", "n": 0}, "n", "[1, 16]"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "x", "max_tokens": 10_000}, "prompt", "context length 256"),
    ({"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "seed": -1}, "seed", "[0, 4294967295]"),
    ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty", "[-2.0, 2.0]"),
    ({"prompt": "x", "presence_penalty": -3}, "presence_penalty", "[-2.0, 2.0]"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "(0.0, 2.0]"),
    ({"prompt": "x", "min_tokens": 20, "max_tokens": 4}, "min_tokens", "[0, max_tokens=4]"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias[5]", "[-100, 100]"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "outside the vocabulary"),
    ({"prompt": "x", "logit_bias": [5]}, "logit_bias", "map of token ids"),
    ({"prompt": "x", "min_p": 1.5}, "min_p", "[0.0, 1.0]"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "[0, 20]"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"prompt": "x", "kv_compression": "fp4"}, "kv_compression", "['int8', 'none']"),
    ({"max_tokens": 3}, "prompt", "required"),
])
def test_bad_completion_fields_are_400s_naming_the_field(http, body, param, says):
    status, reply, _ = post(f"{http.url}/v1/completions", {"model": NAME, **body})
    assert_error(status, reply, 400, param, says)


def test_bad_chat_fields(http):
    url = f"{http.url}/v1/chat/completions"
    user = [{"role": "user", "content": "x"}]
    assert_error(*post(url, {"messages": user, "top_logprobs": 21, "logprobs": True})[:2], 400, "top_logprobs",
                 "[0, 20]")
    assert_error(*post(url, {"messages": user, "top_logprobs": 3})[:2], 400, "top_logprobs", "logprobs: true")
    assert_error(*post(url, {"messages": [{"role": "robot", "content": "x"}]})[:2], 400, "messages[0].role", "robot")
    assert_error(*post(url, {"messages": user, "tool_choice": "auto"})[:2], 400, "tool_choice", "tool_choice")
    assert_error(*post(url, {"messages": []})[:2], 400, "messages", "non-empty")


def test_status_codes_with_openai_bodies(http, backend):
    status, body, _ = post(f"{http.url}/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert_error(status, body, 404, "model", "'gpt-4' does not exist")
    status, raw = get(f"{http.url}/v1/nothing")
    assert_error(status, json.loads(raw), 404, None, "no route GET /v1/nothing")
    status, body, _ = post(f"{http.url}/v1/completions", None, raw=b"{not json")
    assert_error(status, body, 400, None, "not valid JSON")
    small = serve(backend, max_body_bytes=1000)
    try:
        status, body, _ = post(f"{small.url}/v1/completions", None, raw=b'{"prompt": "' + b"x" * 2000 + b'"}')
        assert_error(status, body, 413, None, "exceeds 1000 bytes")
    finally:
        small.stop()


def test_api_key(backend):
    h = serve(backend, api_key="s3cret")
    try:
        url = f"{h.url}/v1/completions"
        assert_error(*post(url, {"prompt": "x"})[:2], 401, None, "API key")
        assert_error(*post(url, {"prompt": "x"}, {"Authorization": "Bearer wrong"})[:2], 401, None, "API key")
        status, body, _ = post(url, {"prompt": "x", "max_tokens": 1}, {"Authorization": "Bearer s3cret"})
        assert status == 200 and body["usage"]["completion_tokens"] == 1
        assert get(f"{h.url}/health")[0] == 200 and get(f"{h.url}/health/ready")[0] == 200  # exempt
        assert get(f"{h.url}/metrics")[0] == 401
        good = openai.OpenAI(base_url=f"{h.url}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == NAME
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{h.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        h.stop()


def test_rejection_is_429_with_retry_after(model):
    b = LocalEngineBackend(LocalBackend(model, ENGINE), NAME, max_queued=1)
    b.start(warmup=False)
    h = serve(b)
    try:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", h.port), timeout=60) as s:  # holds the only place
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            got = b""
            while b"data: " not in got:
                got += s.recv(4096)
            status, reply, headers = post(f"{h.url}/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert_error(status, reply, 429, None, "at capacity")
            assert reply["error"]["code"] == "capacity" and headers["retry-after"] == "1"
        wait_idle(b)
    finally:
        h.stop()
        b.stop()
    h = serve(b, ready_timeout_s=0.5)  # the engine loop is stopped: nothing can generate
    try:
        status, raw = get(f"{h.url}/health/ready")
        assert_error(status, json.loads(raw), 503, None, "not ready")
        assert get(f"{h.url}/health")[0] == 200
    finally:
        h.stop()


def test_deadline_is_504_or_an_error_event(backend):
    h = serve(backend, request_timeout_s=0.001)  # passes before any token can arrive
    try:
        status, body, _ = post(f"{h.url}/v1/completions", {"prompt": PROMPT, "max_tokens": 50})
        assert_error(status, body, 504, None, "deadline")
        req = urllib.request.Request(f"{h.url}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": PROMPT, "max_tokens": 50, "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:  # the status line went out before the deadline
            events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2][6:])["error"]["code"] == "deadline_exceeded" and events[-1] == "data: [DONE]"
        wait_idle(backend)
    finally:
        h.stop()


def test_client_going_away_mid_stream_frees_the_pages(http, backend):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", http.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
        assert pages_used(backend) > 0
    wait_idle(backend)


def test_non_streamed_request_aborted_when_its_client_goes_away(http, backend):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", http.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        end = time.monotonic() + 30
        while pages_used(backend) == 0 and time.monotonic() < end:
            time.sleep(0.005)
        assert pages_used(backend) > 0
    wait_idle(backend)
    end = time.monotonic() + 5  # and the handler ended (it counts the request as cancelled)
    while b'raypd_requests_total{code="cancelled"}' not in get(f"{http.url}/metrics")[1] and time.monotonic() < end:
        time.sleep(0.05)
    assert b'raypd_requests_total{code="cancelled"}' in get(f"{http.url}/metrics")[1]


# ---------------------------------------------------------------- raypd serve --http-port


def test_raypd_serve_http_port(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    proc = subprocess.Popen([sys.executable, "-m", "raypd.cli", "serve", "--backend", "local", "--grpc-port", "0",
                             "--http-port", "0", "--no-warmup", "--chat-template", str(template), "--api-key", "k"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        info = json.loads(proc.stdout.readline())
        c = openai.OpenAI(base_url=f"{info['http']}/v1", api_key="k", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "import os"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1 and info["serving"] == NAME
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


# ---------------------------------------------------------------- raypd bench --target openai


def test_bench_openai_target_through_the_cli(http, tmp_path, capsys):
    from raypd import cli

    out = tmp_path / "run"
    assert cli.main(["bench", "--target", "openai", "--url", f"{http.url}/v1", "--num-requests", "6", "--rate",
                     "inf", "--concurrency", "3", "--input-len", "4:20", "--output-len", "2:6", "--out", str(out),
                     "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())["points"][0]["records"]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    assert all(sum(r["chunk_tokens"]) == r["max_tokens"] for r in records)  # ignore_eos: exact lengths
    with pytest.raises(SystemExit, match="--url"):
        cli.main(["bench", "--target", "openai", "--num-requests", "1"])
