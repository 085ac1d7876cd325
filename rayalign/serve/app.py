"""The Ray Serve application: an OpenAI-compatible ingress in front of model replicas that merge
per preference vector.

    rayalign serve --config serve.yaml                 # or: serve run clusters/serve/serve-config.yaml

Ingress (FastAPI): authentication, request checks (4xx in OpenAI's error shape), the chat
template, the map from (model, preference | soup) to a quantised merge key, streaming. It calls
the ModelServer deployment with that key as its multiplexed model id, so Serve routes a key to
a replica that already holds its merged weights. ModelServer wraps `PersonalizedServer`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayalign.config.schema import ServeConfig
from rayalign.data.tokenize import encode_prompt
from rayalign.models.checkpoint import load_tokenizer
from rayalign.serve import openai_api as oa
from rayalign.serve.families import Family, PreferenceError

api = FastAPI(title="rayalign", description="personalised merged models, OpenAI-compatible")


@api.exception_handler(oa.APIError)
async def _api_error(_: Request, exc: oa.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = oa.APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


@serve.deployment
class ModelServer:
    """A replica: one engine, merged weights cached by key (see PersonalizedServer)."""

    def __init__(self, config: dict[str, Any]):
        from rayalign.serve.server import PersonalizedServer

        self.server = PersonalizedServer(ServeConfig.model_validate(config))
        self._merge_s: dict[str, float] = {}

    @serve.multiplexed(max_num_models_per_replica=1024)
    async def get_model(self, key: str) -> str:
        _, hit, merge_s = await asyncio.to_thread(self.server.merged, key)  # byte-bounded LRU inside
        if not hit:
            self._merge_s[key] = merge_s  # reported with the request that caused the merge
        return key

    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any]) -> dict[str, Any]:
        from rayalign.rollout.engine import SamplingConfig

        key = serve.get_multiplexed_model_id()
        await self.get_model(key)
        rollouts, info = await asyncio.to_thread(self.server.generate, key, [prompt_ids], SamplingConfig(**sampling))
        if key in self._merge_s:
            info.update(cache_hit=False, merge_s=self._merge_s.pop(key))
        return {"responses": [r.response_ids for r in rollouts], "finished": [r.finished for r in rollouts],
                "info": info, "cache": self.server.cache.stats()}

    async def ready(self) -> bool:
        return True


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict[str, Any], model: DeploymentHandle):
        self.cfg = ServeConfig.model_validate(config)
        self.families = {f.name: Family(f, self.cfg.model_store, self.cfg.preference_grid) for f in self.cfg.families}
        self.tok = load_tokenizer(next(iter(self.families.values())).paths[0])
        self.model = model
        self.keys = set(self.cfg.api_keys) | ({os.environ["RAYALIGN_API_KEY"]} if os.environ.get("RAYALIGN_API_KEY") else set())

    # ---- checks -------------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.keys:
            raise oa.APIError(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key",
                              kind="authentication_error")

    def _route(self, req: Any) -> tuple[str, str]:
        family_name, soup = oa.split_model(req.model)
        fam = self.families.get(family_name)
        if fam is None:
            raise oa.APIError(404, f"model {req.model!r} does not exist; see GET /v1/models", param="model",
                              code="model_not_found")
        if soup is not None and req.preference is not None:
            raise oa.APIError(400, f"model {req.model!r} names a soup; do not also send a preference vector",
                              param="preference")
        try:
            if soup is not None:
                key, _ = fam.resolve(soup=soup)
            else:
                key, _ = fam.resolve(preference=req.preference if req.preference is not None else [1.0] * fam.n)
        except PreferenceError as exc:
            raise oa.APIError(404 if soup is not None else 400, str(exc),
                              param="model" if soup is not None else "preference") from None
        return key, req.model

    def _sampling(self, req: Any) -> dict[str, Any]:
        max_tokens = req.max_completion_tokens or req.max_tokens or min(64, self.cfg.max_tokens_limit)
        if max_tokens > self.cfg.max_tokens_limit:
            raise oa.APIError(400, f"max_tokens {max_tokens} is above this server's limit {self.cfg.max_tokens_limit}",
                              param="max_tokens")
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        return {"temperature": req.temperature, "top_p": req.top_p, "max_new_tokens": max_tokens, "n": req.n,
                "seed": seed}

    def _prompt(self, ids: list[int]) -> list[int]:
        if len(ids) > self.cfg.max_prompt_tokens:
            raise oa.APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit "
                              f"{self.cfg.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        return ids

    async def _run(self, request: Request, kind: type, chat: bool) -> Any:
        self._auth(request)
        raw = await request.body()
        if len(raw) > 64 * self.cfg.max_prompt_tokens + 65536:
            raise oa.APIError(413, f"request body of {len(raw)} bytes is too large", code="request_too_large")
        req = oa.parse(kind, raw)
        key, name = self._route(req)
        sampling = self._sampling(req)
        if chat:
            ids = encode_prompt(self.tok, [m.model_dump() for m in req.messages])
        else:
            ids = self.tok(req.prompt, add_special_tokens=False)["input_ids"]
        ids = self._prompt(ids)
        out = await self.model.options(multiplexed_model_id=key).generate.remote(ids, sampling)
        eos = self.tok.eos_token_id
        finish = ["stop" if f else "length" for f in out["finished"]]
        extra = {"merge_key": key, **out["info"]}
        completion_tokens = sum(len(r) for r in out["responses"])
        if req.stream:
            pieces = [self._pieces([t for t in r if t != eos]) for r in out["responses"]]
            chunks = (oa.chat_chunks if chat else oa.completion_chunks)(name, pieces, finish)
            return StreamingResponse(iter(chunks), media_type="text/event-stream")
        texts = [(self.tok.decode(r, skip_special_tokens=True).strip(), f) for r, f in zip(out["responses"], finish)]
        build = oa.chat_response if chat else oa.completion_response
        return build(name, texts, len(ids), completion_tokens, extra)

    def _pieces(self, ids: list[int]) -> list[str]:
        """Token-by-token text deltas whose concatenation is the decoded response."""
        out, prev = [], ""
        for i in range(1, len(ids) + 1):
            text = self.tok.decode(ids[:i], skip_special_tokens=True)
            out.append(text[len(prev):])
            prev = text
        return out

    # ---- routes ---------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> dict[str, str]:
        await self.model.ready.remote()
        return {"status": "ready"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        data = []
        for name, fam in self.families.items():
            data.append({"id": name, "object": "model", "owned_by": "rayalign",
                         "rayalign": {"kind": fam.cfg.kind, "objectives": fam.cfg.objectives}})
            data += [{"id": f"{name}/{soup}", "object": "model", "owned_by": "rayalign",
                      "rayalign": {"preference": mu}} for soup, mu in fam.cfg.soups.items()]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._run(request, oa.ChatRequest, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._run(request, oa.CompletionRequest, chat=False)


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application of a config: Ingress -> ModelServer (replicas, autoscaling, resources)."""
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus}}
    if cfg.max_replicas is not None and cfg.max_replicas > cfg.replicas:
        opts["autoscaling_config"] = {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": 4}
    else:
        opts["num_replicas"] = cfg.replicas
    model = ModelServer.options(**opts).bind(cfg.model_dump())
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(cfg.model_dump(), model)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run` / `serve deploy`: `args: {config: PATH}` plus dotted `overrides`."""
    from rayalign.config.core import load_config

    if "config" not in args:
        raise ValueError("the rayalign Serve application needs args.config (a serve YAML)")
    return build_app(load_config(ServeConfig, args["config"], list(args.get("overrides", []))))
