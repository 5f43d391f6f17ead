"""The OpenAI API over Ray deployments (disaggregated: a prefill and a decode worker; colocated:
one decode worker that prefills every prompt itself; the shipped default model): every response
field identical to the in-process engine's (greedy and seeded, n = 3 with a seed), usage's
`cached_tokens` counting prefix reuse only, and the app mounted behind a Ray Serve ingress.

Guards against: the disaggregated path answering differently from the colocated one (first
token, logprobs, stop handling, n samples); n samples prefilled once each instead of once in
all; a cold prompt reported as cached because its K/V was transferred;
`raypd.openai_app(deployment)` working only in the process that owns it.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

import models
import raypd
from raypd.api import LocalBackend
from raypd.engine.runner import EngineConfig
from raypd.runtime.deployment import Resources
from raypd.server.http_server import HttpServer
from scheduler import PolicyConfig

ROOT = Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(page_size=16, num_pages=64, max_slots=4, max_seq_len=256, prefill_buckets=(32, 64))
NAME = models.DEFAULT_MODEL
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
PROMPT = "def main(argv):\n"


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "template.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="raypd-tests",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def deployment(ray_session):
    small = Resources(num_cpus=0.25)
    # local_prefill_max_len=0: every prompt is prefilled on the prefill worker and its K/V transferred
    d = raypd.serve(NAME, name="openai", engine_config=ENGINE, calibrate=False, prefill_resources=small,
                    decode_resources=small, policy=PolicyConfig(local_prefill_max_len=0))
    yield d
    d.shutdown()


@pytest.fixture(scope="module")
def colocated(ray_session):
    """One decode worker, no prefill worker: every prompt prefilled where it decodes."""
    d = raypd.serve(NAME, name="openai-colocated", engine_config=ENGINE, calibrate=False, num_prefill=0,
                    decode_resources=Resources(num_cpus=0.25), policy=PolicyConfig(local_prefill_max_len=10**6))
    yield d
    d.shutdown()


@pytest.fixture(scope="module")
def servers(deployment, colocated, template_file):
    """In-process, disaggregated, colocated."""
    servers = [HttpServer(raypd.openai_app(LocalBackend(models.load(NAME), ENGINE), chat_template=template_file)),
               HttpServer(raypd.openai_app(deployment, model_name=NAME, chat_template=template_file)),
               HttpServer(raypd.openai_app(colocated, model_name=NAME, chat_template=template_file))]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def clients(servers):
    return [openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120) for s in servers]


def fields(response) -> dict:
    """Every field but the ones that name one response (id, created)."""
    d = response.model_dump()
    d.pop("id"), d.pop("created")
    return d


def used_pages(deployment) -> int:
    """Pages held on the deployment's workers once its cached prefixes are dropped."""
    deployment.clear_cache()
    s = deployment.status()
    return sum(sum(w["used_pages"]) for w in s["prefill"] + s["decode"])


def test_every_field_is_identical_in_process_colocated_and_disaggregated(clients, deployment, colocated):
    local, ray_, coloc = clients
    requests = [
        ("completions", dict(prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0)),
        ("completions", dict(prompt=[PROMPT, "import sys\n"], max_tokens=8, temperature=0, echo=True, stop=["("])),
        ("completions", dict(prompt="class A:\n", max_tokens=8, temperature=0.9, seed=3, n=3)),
        # one prompt per request where logprobs are compared: packing prompts into one prefill chunk or
        # not (timing) moves the first token's logprob in its last digits
        ("completions", dict(prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=0)),
        ("completions", dict(prompt="x = [", max_tokens=5, temperature=0.8, seed=9, n=2, echo=True)),
        ("chat", dict(messages=[{"role": "user", "content": "import re"}], max_tokens=8, temperature=0, logprobs=True)),
        ("chat", dict(messages=[{"role": "user", "content": "for i in"}], max_tokens=6, temperature=1.0, seed=11, n=3,
                      logprobs=True, top_logprobs=2)),
    ]
    for kind, kw in requests:
        create = (lambda c: c.completions.create) if kind == "completions" else (lambda c: c.chat.completions.create)
        deployment.clear_cache()  # cold prompts on both deployments
        colocated.clear_cache()
        a, b, c = (fields(create(c)(model=NAME, **kw)) for c in (local, ray_, coloc))
        for other in (b, c):
            for ca, cb in zip(a["choices"], other["choices"]):  # the first difference, named
                for key in ca:
                    assert ca[key] == cb[key], (kw, ca["index"], key, ca[key], cb[key])
            assert a == other, kw
        assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # cold prompts, K/V transferred
        if kw.get("n", 1) > 1 and kw.get("seed") is not None:  # each sample its own seed stream
            texts = [ch["text"] if kind == "completions" else ch["message"]["content"] for ch in a["choices"]]
            assert len(set(texts)) > 1, texts
    streams = [list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x = 1"}],
                                              max_tokens=6, temperature=0, stream=True,
                                              stream_options={"include_usage": True})) for c in (local, ray_, coloc)]
    # how tokens group into chunks depends on timing; what the chunks carry must not
    for chunks in streams:
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    carried = [("".join(c.choices[0].delta.content or "" for c in chunks[1:-1]),
                chunks[-2].choices[0].finish_reason, chunks[-1].usage.model_dump()) for chunks in streams]
    assert carried[0] == carried[1] == carried[2]
    # n = 3 seeded, streamed: each choice's chunks carry the same text on every backend
    per_index = []
    for c in (local, ray_, coloc):
        texts, usage = ["", "", ""], None
        for chunk in c.completions.create(model=NAME, prompt="for x in", max_tokens=6, temperature=1.0, seed=2,
                                          n=3, stream=True, stream_options={"include_usage": True}):
            for ch in chunk.choices:
                texts[ch.index] += ch.text
            usage = chunk.usage or usage
        per_index.append((texts, usage.model_dump()))
    assert per_index[0] == per_index[1] == per_index[2] and len(set(per_index[0][0])) > 1


def test_n_samples_are_prefilled_and_transferred_once(clients, deployment):
    """n = 3 on the disaggregated deployment: one prefill of the prompt on the prefill worker, one
    K/V transfer; every page back once the samples finish."""
    _, ray_, _ = clients
    baseline = used_pages(deployment)
    computed = lambda: deployment.status()["prefill"][0]["num_computed_tokens"]  # noqa: E731
    transfers = lambda: sum(t["count"] for t in deployment.status()["transfer"])  # noqa: E731
    before, sent = computed(), transfers()
    r = ray_.completions.create(model=NAME, prompt="while True:\n    x =", max_tokens=6, temperature=0.8,
                                seed=5, n=3)
    assert len(r.choices) == 3 and r.usage.completion_tokens == 18
    assert computed() - before == r.usage.prompt_tokens  # once, not three times
    assert transfers() - sent == 1
    assert used_pages(deployment) == baseline


def test_cached_tokens_count_the_shared_prefix_only(clients):
    local, ray_, _ = clients
    prefix = "import os\nimport sys\nimport json\nimport time\n" * 3  # more than two 16-token pages
    ids = models.load(NAME).tokenizer.encode(prefix)
    assert len(ids) > 2 * ENGINE.page_size
    cold = ray_.completions.create(model=NAME, prompt=prefix, max_tokens=2, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = ray_.completions.create(model=NAME, prompt=prefix + "def f():\n", max_tokens=2, temperature=0)
    shared = (len(ids) // ENGINE.page_size) * ENGINE.page_size  # whole pages of the prefix
    assert warm.usage.prompt_tokens_details.cached_tokens == shared
    same = local.completions.create(model=NAME, prompt=prefix + "def f():\n", max_tokens=2, temperature=0)
    assert same.choices[0].text == warm.choices[0].text and same.usage.prompt_tokens == warm.usage.prompt_tokens


@pytest.mark.parametrize("n", [1, 3])
def test_client_going_away_mid_stream_ends_the_request_on_its_worker(servers, deployment, n):
    baseline = used_pages(deployment)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True, "n": n}).encode()
    with socket.create_connection(("127.0.0.1", servers[1].port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: ") < 3 * n:
            got += s.recv(4096)
        assert deployment.status()["num_tracked"] == n
    deadline = time.monotonic() + 60  # the decode worker ends it between steps: after a compile, on a loaded machine
    while time.monotonic() < deadline:
        status = deployment.status()
        if status["num_tracked"] == 0 and all(w["num_running"] == 0 for w in status["decode"]):
            break
        time.sleep(0.05)
    assert status["num_tracked"] == 0 and all(w["num_running"] == 0 for w in status["decode"]), status
    assert used_pages(deployment) == baseline  # every sample's pages, the shared prompt pages too


def test_behind_a_ray_serve_ingress(deployment, template_file):
    from ray import serve

    def build():
        import raypd as r

        return r.openai_app(r.connect("openai"), model_name=NAME, chat_template=str(template_file))

    ingress = serve.deployment(serve.ingress(build)(), ray_actor_options={"num_cpus": 0})
    with socket.socket() as s:  # a free port for Serve's proxy
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(ingress.bind(), name="openai", route_prefix="/oai")
        url = f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=f"{url}/oai/v1", api_key="x", max_retries=0, timeout=120)
        r = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.model == NAME
        with urllib.request.urlopen(f"{url}/oai/health/ready", timeout=60) as ready:
            assert json.loads(ready.read()) == {"status": "ready"}
    finally:
        serve.shutdown()



def test_scheduler_rejection_is_a_429_with_its_reason(clients, deployment):
    """The scheduler's RequestRejected (here: n samples that no decode pool could ever hold) is a
    429 with OpenAI's error body naming the reason; nothing is left held."""
    baseline = used_pages(deployment)
    _, ray_, _ = clients
    with pytest.raises(openai.RateLimitError) as e:
        ray_.completions.create(model=NAME, prompt="x", max_tokens=200, n=8)
    err = e.value.body
    assert err["code"] == "no_capacity" and err["param"] is None and "request rejected (no_capacity)" in err["message"]
    assert deployment.status()["num_tracked"] == 0 and used_pages(deployment) == baseline


def test_a_deployment_that_is_gone_answers_503(servers, colocated):
    """Last in this module: it shuts the colocated deployment down under its server."""
    colocated.shutdown()
    url = f"{servers[2].url}/v1/completions"
    req = urllib.request.Request(url, data=json.dumps({"prompt": "x", "max_tokens": 2}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 503
    err = json.loads(e.value.read())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "not_running", err
    with pytest.raises(urllib.error.HTTPError) as ready:
        urllib.request.urlopen(f"{servers[2].url}/health/ready", timeout=60)
    assert ready.value.code == 503
