"""Rewards as code: Python callables (by module:callable or file path) and a reward service over
HTTP on loopback, alone and stacked with the gold objectives; every error names the callable or
the URL and the status."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rayalign.config.core import ConfigError, load_config
from rayalign.config.schema import RLConfig
from rayalign.reward.scorer import RewardScorer
from rayalign.reward.sources import FunctionSource, HttpSource, RewardError
from rayalign.world.gold import gold_vector

PROMPTS = ["what colour is the apple ?", "where does the fox live ?"]
RESPONSES = ["the apple is red .", "hello ! the fox lives in the forest ."]


class RewardService:
    """A reward service on 127.0.0.1 that scores by length, after `fail_first` answers of
    `fail_status`; `delay_s` makes it slow."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, delay_s: float = 0.0, body: bytes | None = None):
        service = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                service.calls += 1
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if delay_s:
                    threading.Event().wait(delay_s)
                if service.calls <= fail_first:
                    status, out = fail_status, b"overloaded"
                else:
                    status = 200
                    out = body if body is not None else json.dumps(
                        {"scores": [[len(r) / 10, float(len(p) > 20)] for p, r in zip(data["prompts"],
                                                                                     data["responses"])]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_function_by_module_and_by_file(tmp_path):
    f = FunctionSource("tests.reward_fns:brevity")
    assert f.objectives == ["brevity"]
    np.testing.assert_array_equal(f(PROMPTS, RESPONSES), [[-5.0], [-9.0]])
    vec = FunctionSource("tests.reward_fns:two_scores")
    assert vec.objectives == ["chars", "bangs"]
    np.testing.assert_array_equal(vec(PROMPTS, RESPONSES), [[18, 0], [37, 1]])
    path = tmp_path / "my_reward.py"
    path.write_text("def reward(prompts, responses):\n    return [float('red' in r) for r in responses]\n")
    by_file = FunctionSource(str(path))
    assert by_file.objectives == ["my_reward"]
    np.testing.assert_array_equal(by_file(PROMPTS, RESPONSES), [[1.0], [0.0]])
    np.testing.assert_array_equal(FunctionSource(f"{path}:reward")(PROMPTS, RESPONSES), [[1.0], [0.0]])


def test_function_errors_name_the_callable(tmp_path):
    with pytest.raises(RewardError, match="'no_such_module:f': cannot import no_such_module: ModuleNotFoundError"):
        FunctionSource("no_such_module:f")
    with pytest.raises(RewardError, match="'tests.reward_fns:missing': tests.reward_fns has no attribute 'missing'"):
        FunctionSource("tests.reward_fns:missing")
    with pytest.raises(RewardError, match="'tests.reward_fns:np': np is a module, not a callable"):
        FunctionSource("tests.reward_fns:np")
    with pytest.raises(RewardError, match="cannot import .*nowhere.py: FileNotFoundError"):
        FunctionSource(str(tmp_path / "nowhere.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("def reward(:\n")
    with pytest.raises(RewardError, match="broken.py'.*SyntaxError"):
        FunctionSource(str(broken))
    with pytest.raises(RewardError, match="'tests.reward_fns:wrong_count' returned scores of shape \\(1,\\) for 2"):
        FunctionSource("tests.reward_fns:wrong_count")(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="'tests.reward_fns:not_numbers' returned list, not numbers"):
        FunctionSource("tests.reward_fns:not_numbers")(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="'tests.reward_fns:raises' raised KeyError: 'no such user'"):
        FunctionSource("tests.reward_fns:raises")(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="'tests.reward_fns:two_unnamed' returned 2 scores per item, its objectives "
                                          "are 1; name them in the callable's `objectives` attribute"):
        FunctionSource("tests.reward_fns:two_unnamed")(PROMPTS, RESPONSES)


def test_http_service_scores_retries_and_names_url_and_status():
    with RewardService(fail_first=2, fail_status=503) as svc:
        src = HttpSource(svc.url, ["length", "long_prompt"], timeout_s=5, retries=3, backoff_s=0.01)
        np.testing.assert_allclose(src(PROMPTS, RESPONSES), [[1.8, 1.0], [3.7, 1.0]])
        assert svc.calls == 3  # two 503s retried, then the answer
    with RewardService(fail_first=10, fail_status=503) as svc:
        with pytest.raises(RewardError, match=f"reward service {svc.url} failed 3 times; last: status 503"):
            HttpSource(svc.url, ["a", "b"], retries=2, backoff_s=0.01)(PROMPTS, RESPONSES)
    with RewardService(fail_first=1, fail_status=400) as svc:
        with pytest.raises(RewardError, match=f"reward service {svc.url} answered status 400: overloaded"):
            HttpSource(svc.url, ["a", "b"], retries=3, backoff_s=0.01)(PROMPTS, RESPONSES)
        assert svc.calls == 1  # a client error is not retried
    with RewardService(delay_s=1.0) as svc:
        with pytest.raises(RewardError, match=f"{svc.url} failed 2 times; last: no answer within 0.2s"):
            HttpSource(svc.url, ["a", "b"], timeout_s=0.2, retries=1, backoff_s=0.01)(PROMPTS, RESPONSES)
    with RewardService(body=b"<html>") as svc:
        with pytest.raises(RewardError, match="status 200 without a JSON object holding 'scores'"):
            HttpSource(svc.url, ["a", "b"])(PROMPTS, RESPONSES)
    with RewardService() as svc:
        with pytest.raises(RewardError, match="returned 2 scores per item, its objectives are 1"):
            HttpSource(svc.url)(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="'ftp://x' is not an http"):
        HttpSource("ftp://x")


def test_sources_stack_with_gold_by_weights():
    with RewardService() as svc:
        scorer = RewardScorer(["gold", "function", "http"], function="tests.reward_fns:brevity", http=svc.url,
                              http_objectives=["length", "long_prompt"], weights=[0.6, 0.2, 0.2, 0.1, -0.5, 0.3])
        assert scorer.objectives == ["informative", "concise", "friendly", "brevity", "length", "long_prompt"]
        out = scorer.score(PROMPTS, RESPONSES)
    gold = np.stack([gold_vector(p, r) for p, r in zip(PROMPTS, RESPONSES)])
    expected = np.concatenate([gold, [[-5.0], [-9.0]], [[1.8, 1.0], [3.7, 1.0]]], axis=1)
    np.testing.assert_allclose(out["vector"], expected)
    np.testing.assert_allclose(out["combined"], expected @ [0.6, 0.2, 0.2, 0.1, -0.5, 0.3])


def test_reward_config_names_what_a_kind_needs():
    base = ["policy=p", "output=o"]
    cfg = load_config(RLConfig, None, [*base, "reward.kind=[gold,function]", "reward.function=tests.reward_fns:brevity",
                                       "reward.weights=[0.5,0.2,0.2,0.1]"])
    assert cfg.reward.kinds == ["gold", "function"] and cfg.reward.scorer_args()["function"] == "tests.reward_fns:brevity"
    with pytest.raises(ConfigError, match="reward.function is required when reward.kind includes 'function'"):
        load_config(RLConfig, None, [*base, "reward.kind=function"])
    with pytest.raises(ConfigError, match="reward.http is required when reward.kind includes 'http'"):
        load_config(RLConfig, None, [*base, "reward.kind=[gold,http]"])
    with pytest.raises(ConfigError, match="reward.model is required when reward.kind includes 'model'"):
        load_config(RLConfig, None, [*base, "reward.kind=model"])
    with pytest.raises(ConfigError, match="'localhost:9' is not an http"):
        load_config(RLConfig, None, [*base, "reward.kind=http", "reward.http=localhost:9"])
    with pytest.raises(ConfigError, match="name each kind at most once"):
        load_config(RLConfig, None, [*base, "reward.kind=[gold,gold]"])
