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
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayalign.config.schema import ServeConfig
from rayalign.data.tokenize import encode_untrusted_prompt
from rayalign.models.checkpoint import load_tokenizer
from rayalign.models.lora import adapter_base, is_adapter_dir
from rayalign.serve import openai_api as oa
from rayalign.serve.engine import EngineDead
from rayalign.serve.families import Family, PreferenceError
from rayalign.serve.text import ChoiceStream, render_choice

RETRY_AFTER_S = 5  # what a 503 tells the client to wait: about one replica restart

api = FastAPI(title="rayalign", description="personalised merged models, OpenAI-compatible")


@api.exception_handler(oa.APIError)
async def _api_error(_: Request, exc: oa.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = oa.APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """Whatever else goes wrong is still answered in OpenAI's shape, never as a plain-text 500."""
    err = oa.APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error", kind="server_error")
    return JSONResponse(err.body(), status_code=500)


def continuous(cfg: ServeConfig) -> bool:
    """Whether replicas batch continuously (vLLM's asynchronous engine) or serve one request at a time."""
    if cfg.batching != "auto":
        return cfg.batching == "continuous"
    from rayalign.rollout.engine import vllm_available

    return cfg.engine == "vllm" or (cfg.engine == "auto" and vllm_available())


@serve.deployment
class ModelServer:
    """A replica: one engine; combined adapters and merged weights cached by key. With vLLM it
    batches every request in flight (rayalign.serve.batching), else one at a time (rayalign.serve.server)."""

    def __init__(self, config: dict[str, Any]):
        cfg = ServeConfig.model_validate(config)
        if continuous(cfg):
            from rayalign.serve.batching import BatchingServer

            self.server: Any = BatchingServer(cfg)
        else:
            from rayalign.serve.server import PersonalizedServer

            self.server = PersonalizedServer(cfg)
        self.interval_s = cfg.stream_interval_s
        self._fresh: dict[str, float] = {}  # keys built for a request not yet answered: their build time

    @serve.multiplexed(max_num_models_per_replica=1024)
    async def get_model(self, key: str) -> str:
        """Serve routes a key to replicas that hold it; its adapter or merged weights are built here."""
        build_s, hit = await self.server.warm(key)  # byte-bounded LRU inside
        if not hit:
            self._fresh[key] = build_s  # reported with the request that caused the build
        return key

    async def _deltas(self, prompt_ids: list[int], sampling: dict[str, Any],
                      info: dict[str, Any]) -> AsyncIterator[list[Any]]:
        from rayalign.rollout.engine import SamplingConfig

        key = serve.get_multiplexed_model_id()
        await self.get_model(key)
        async for deltas in self.server.stream(key, prompt_ids, SamplingConfig(**sampling), info):
            if key in self._fresh:
                info.update(cache_hit=False, merge_s=self._fresh.pop(key))
            yield deltas

    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any]) -> dict[str, Any]:
        """The whole answer: token ids, finish reason and log-probs per choice."""
        from rayalign.serve.engine import Delta, merge_deltas

        info: dict[str, Any] = {}
        whole = {d.index: d for d in merge_deltas([steps async for steps in self._deltas(prompt_ids, sampling, info)])}
        choices = [whole.get(i, Delta(i, [], [], None)) for i in range(sampling.get("n", 1))]
        lps = [c.logprobs or [] for c in choices] if sampling.get("logprobs") is not None else None
        return {"responses": [c.token_ids for c in choices], "finish": [c.finish for c in choices], "logprobs": lps,
                "info": info, "cache": self.server.cache.stats()}

    async def stream(self, prompt_ids: list[int], sampling: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """The choices' new tokens as they are generated; cancelling the call aborts the generation."""
        from rayalign.serve.engine import coalesce

        steps = coalesce(self._deltas(prompt_ids, sampling, {}), self.interval_s)
        try:
            async for deltas in steps:
                yield [d.__dict__ for d in deltas]
        finally:
            await steps.aclose()

    async def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def ready(self) -> bool:
        self.server.check_health()
        return True

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy and Serve
        replaces it: a dead engine, or one that has made no progress for generation_timeout_s."""
        self.server.check_health()


# a replica that died, is restarting, is full, or whose engine died (Serve's health check replaces it)
UNAVAILABLE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError, BackPressureError, EngineDead)


def unavailable(exc: BaseException) -> oa.APIError | None:
    """The 503 (with Retry-After) for a replica that died, is restarting or cannot take the request."""
    if not isinstance(exc, UNAVAILABLE):
        return None
    return oa.APIError(503, f"the model replica is unavailable ({type(exc).__name__}); retry shortly",
                       code="replica_unavailable", kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict[str, Any], model: DeploymentHandle):
        self.cfg = ServeConfig.model_validate(config)
        self.families = {f.name: Family(f, self.cfg.model_store, self.cfg.preference_grid) for f in self.cfg.families}
        first = next(iter(self.families.values())).paths[0]
        self.tok = load_tokenizer(first)
        config_dir = Path(adapter_base(first)) if is_adapter_dir(first) else Path(first)  # an adapter: its base's
        self.context = json.loads((config_dir / "config.json").read_text()).get("max_position_embeddings")
        self.max_body = 64 * self.cfg.max_prompt_tokens + 65536
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

    def _sampling(self, req: Any, prompt_len: int) -> dict[str, Any]:
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > self.cfg.max_tokens_limit:
            raise oa.APIError(400, f"max_tokens {asked} is above this server's limit {self.cfg.max_tokens_limit}",
                              param="max_tokens")
        room = self.context - prompt_len if self.context else None
        if room is not None and (room < 1 or (asked is not None and asked > room)):
            raise oa.APIError(400, f"this model's context is {self.context} tokens; the prompt has {prompt_len} and "
                              f"{asked or 1} more were asked for", param="messages", code="context_length_exceeded")
        max_tokens = asked or min(64, self.cfg.max_tokens_limit, room or 64)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        return {"temperature": req.temperature, "top_p": req.top_p, "max_new_tokens": max_tokens, "n": req.n,
                "seed": seed, "stop": req.stops(), "logprobs": req.logprob_count()}

    def _prompt(self, req: Any, chat: bool) -> list[int]:
        if chat:
            try:
                ids = encode_untrusted_prompt(self.tok, [{"role": m.role, "content": m.text()} for m in req.messages])
            except ValueError as exc:
                raise oa.APIError(400, str(exc), param="messages") from None
        else:
            ids = self.tok(req.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise oa.APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise oa.APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit "
                              f"{self.cfg.max_prompt_tokens}", param="messages", code="context_length_exceeded")
        return ids

    async def _body(self, request: Request) -> bytes:
        """The body, refused from Content-Length before reading when too large, read with a deadline
        (408) and a running size check (413, chunked bodies included)."""
        too_large = oa.APIError(413, f"request body is larger than this server's limit of {self.max_body} bytes",
                                code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise oa.APIError(400, f"bad Content-Length header {length!r}")
            if int(length) > self.max_body:
                raise too_large

        async def read() -> bytes:
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > self.max_body:
                    raise too_large
            return bytes(buf)

        try:
            return await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except TimeoutError:
            raise oa.APIError(408, f"the request body did not arrive within {self.cfg.body_timeout_s:g} s",
                              code="request_timeout") from None

    async def _generate(self, key: str, ids: list[int], sampling: dict[str, Any]) -> dict[str, Any]:
        """The model replica's whole answer; a replica that died or is restarting is a 503."""
        try:
            return await self.model.options(multiplexed_model_id=key).generate.remote(ids, sampling)
        except Exception as exc:
            err = unavailable(exc)
            if err is None:
                raise
            raise err from None

    async def _open_stream(self, key: str, ids: list[int], sampling: dict[str, Any]) -> tuple[Any, list[dict]]:
        """A streaming call to the replica and its first step, awaited before answering, so that a
        replica that is down is still a 503 rather than a broken stream."""
        gen = self.model.options(multiplexed_model_id=key, stream=True).stream.remote(ids, sampling)
        try:
            return gen, await gen.__anext__()
        except StopAsyncIteration:
            return gen, []
        except Exception as exc:
            gen.cancel()
            err = unavailable(exc)
            if err is None:
                raise
            raise err from None

    async def _events(self, gen: Any, first: list[dict], name: str, req: Any, chat: bool, prompt_len: int,
                      top: int | None) -> AsyncIterator[str]:
        """Server-sent events as the replica's steps arrive. A client that goes away cancels the
        replica's generation (and with it vLLM's request); a replica that dies mid-stream ends the
        stream with an OpenAI-shaped error event."""
        writer = oa.ChunkWriter(name, chat)
        streams = [ChoiceStream(self.tok, req.stops(), top) for _ in range(req.n)]
        tokens = 0
        try:
            if chat:
                yield "".join(e for i in range(req.n) for e in writer.start(i))
            steps = first
            while True:
                events = []  # one message per replica step
                for d in steps:
                    i, stream = d["index"], streams[d["index"]]
                    tokens += len(d["token_ids"])
                    events += [writer.piece(i, p, top is not None) for p in stream.feed(d["token_ids"], d["logprobs"])]
                    if d["finish"] is not None:
                        tail, choice = stream.finish(d["finish"] == "stop")
                        events += [writer.piece(i, p, top is not None) for p in tail]
                        events.append(writer.finish(i, choice.finish))
                if events:
                    yield "".join(events)
                try:
                    steps = await gen.__anext__()
                except StopAsyncIteration:
                    break
            end = [writer.usage(oa.usage(prompt_len, tokens))] if (
                req.stream_options is not None and req.stream_options.include_usage) else []
            yield "".join([*end, writer.done()])
        except (asyncio.CancelledError, GeneratorExit):
            gen.cancel()
            raise
        except Exception as exc:
            gen.cancel()
            err = unavailable(exc) or oa.APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                  code="internal_error", kind="server_error")
            yield oa.sse(err.body())

    async def _run(self, request: Request, kind: type, chat: bool) -> Any:
        self._auth(request)
        req = oa.parse(kind, await self._body(request))
        key, name = self._route(req)
        ids = self._prompt(req, chat)
        sampling = self._sampling(req, len(ids))
        top = sampling["logprobs"]
        if req.stream:
            gen, first = await self._open_stream(key, ids, sampling)
            return StreamingResponse(self._events(gen, first, name, req, chat, len(ids), top),
                                     media_type="text/event-stream")
        out = await self._generate(key, ids, sampling)
        lps = out.get("logprobs") or [None] * len(out["responses"])
        choices = [render_choice(self.tok, r, f == "stop", req.stops(), lp, top or 0)
                   for r, f, lp in zip(out["responses"], out["finish"], lps)]
        completion_tokens = sum(len(r) for r in out["responses"])
        build = oa.chat_response if chat else oa.completion_response
        return build(name, choices, len(ids), completion_tokens, {"merge_key": key, **out["info"]})

    # ---- routes ---------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> dict[str, str]:
        await self.model.ready.remote()
        return {"status": "ready"}

    def _model_list(self) -> list[dict[str, Any]]:
        data = []
        for name, fam in self.families.items():
            data.append({"id": name, "object": "model", "owned_by": "rayalign",
                         "rayalign": {"kind": fam.cfg.kind, "objectives": fam.cfg.objectives}})
            data += [{"id": f"{name}/{soup}", "object": "model", "owned_by": "rayalign",
                      "rayalign": {"preference": mu}} for soup, mu in fam.cfg.soups.items()]
        return data

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": self._model_list()}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        for m in self._model_list():
            if m["id"] == model_id:
                return m
        raise oa.APIError(404, f"model {model_id!r} does not exist; see GET /v1/models", param="model",
                          code="model_not_found")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._run(request, oa.ChatRequest, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._run(request, oa.CompletionRequest, chat=False)


def check_config(cfg: ServeConfig) -> None:
    """What a replica would find wrong at start-up, found before deploying (where it would surface only
    after Serve's retries, in the controller's log): every family's paths inside the model store,
    present, and mergeable into one engine. Raises ValueError naming the family and path."""
    from rayalign.merge.engine import validate_paths

    paths = []
    for f in cfg.families:
        try:
            fam = Family(f, cfg.model_store, cfg.preference_grid)
        except PreferenceError as exc:
            raise ValueError(f"family {f.name}: {exc}") from None
        missing = [str(p) for p in fam.sources() if not p.is_dir()]
        if missing:
            raise ValueError(f"family {f.name}: model directories not found: {missing}")
        paths += fam.sources()
    validate_paths(sorted(set(paths)))
    if continuous(cfg):  # how each family is served (adapter or full) and the engine's base
        from rayalign.serve.batching import plan

        plan(cfg, {f.name: Family(f, cfg.model_store, cfg.preference_grid) for f in cfg.families})


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application of a config: Ingress -> ModelServer (replicas, autoscaling, resources).
    The config is checked first (check_config)."""
    check_config(cfg)
    batching = continuous(cfg)
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
                            "health_check_period_s": cfg.health_check_period_s,
                            "health_check_timeout_s": cfg.health_check_timeout_s}
    if batching:  # a batching replica takes every request it can batch; Serve's default is 5
        opts["max_ongoing_requests"] = cfg.max_num_batched_requests
    if cfg.max_replicas is not None and cfg.max_replicas > cfg.replicas:
        opts["autoscaling_config"] = {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": max(4, cfg.max_num_batched_requests // 4)
                                      if batching else 4}
    else:
        opts["num_replicas"] = cfg.replicas
    model = ModelServer.options(**opts).bind(cfg.model_dump())
    return Ingress.options(ray_actor_options={"num_cpus": 0.1},
                           max_ongoing_requests=cfg.ingress_max_ongoing_requests).bind(cfg.model_dump(), model)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run` / `serve deploy`: `args: {config: PATH}` plus dotted `overrides`."""
    from rayalign.config.core import load_config

    if "config" not in args:
        raise ValueError("the rayalign Serve application needs args.config (a serve YAML)")
    return build_app(load_config(ServeConfig, args["config"], list(args.get("overrides", []))))
