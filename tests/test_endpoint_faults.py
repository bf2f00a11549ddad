"""Issue 10, "runs that survive a bad endpoint": `gsp generate` on 12 signs against the loopback
server with a seeded fault mix (429 with Retry-After, 500, dropped connections, truncated bodies,
slow answers), the retry budget in time and attempts, the manifest's count of every attempt and
its cause, and the throttle hook a cross-process limiter plugs into."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Fault, FaultMix
from typer.testing import CliRunner

from cli.main import app
from gsp.generate import describe_planned, prepare_run
from gsp.llm.client import Endpoint, LLMCallError, LLMClient, estimate_tokens
from gsp.llm.structured import inline_schema
from gsp.prompts import DescriptionOut
from gsp.schema import KINDS, read_kind, read_manifest, resolve_run_dir
from gsp.settings import LLMSettings, Settings, get_settings

GLOSSES = ("sister", "hurry", "hungry", "house", "water", "friend", "school", "mother", "father", "book",
           "tree", "car")
#: The issue's mix: 10% 429 (Retry-After), 10% 500, 5% dropped, 5% truncated, 3% slow.
MIX = {"429": 0.10, "500": 0.10, "drop": 0.05, "truncated": 0.05, "slow": 0.03}
#: What the client calls each fault the server sends (a slow answer within the timeout is an answer).
CAUSE_OF_FAULT = {"429": "HTTP 429", "500": "HTTP 500", "drop": "connection", "truncated": "truncated body"}
#: Seeds whose mix failed a row before the fix (7 failed attempts in a row: 429s, drops, truncations),
#: among the 5 of 500 seeds that did with the prompts of the time; the rest are plain seeds.
SEEDS = (1008, 1028, 1131, 1149, 1155, *range(25))

runner = CliRunner()


@pytest.fixture
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab12.csv"
    path.write_text("ClassId,TR,EN\n" + "".join(f"{i},w{i},{g}\n" for i, g in enumerate(GLOSSES)), encoding="utf-8")
    return path


def fast_env(monkeypatch, srv: FakeOpenAI, **extra: str) -> None:
    """Small waits everywhere, so that many runs fit in a test; the policy is the default one."""
    env = {"GSP_LLM_BASE_URL": srv.base_url, "GSP_LLM_MODEL": "fake", "GSP_LLM_STRUCTURED_OUTPUT": "json_schema",
           "GSP_LLM_RETRY_INITIAL_S": "0.01", "GSP_LLM_RETRY_MAX_S": "0.05", "GSP_LLM_TIMEOUT_S": "5", **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def generate(vocab: Path, out: Path, cache: Path, monkeypatch):
    monkeypatch.setenv("GSP_CACHE_DIR", str(cache))  # a cache of its own: every request goes out
    get_settings.cache_clear()
    return runner.invoke(app, ["generate", "--vocab", str(vocab), "--no-index", "--no-prefect", "--out", str(out)])


def server_failures(srv: FakeOpenAI) -> Counter[str]:
    return Counter(CAUSE_OF_FAULT[r.fault] for r in srv.records if r.fault in CAUSE_OF_FAULT)


def test_a_fault_mix_never_fails_a_row_and_every_attempt_is_counted(tmp_path, vocab, monkeypatch):
    seen: Counter[str] = Counter()
    with FakeOpenAI() as srv:
        fast_env(monkeypatch, srv)
        for seed in SEEDS:
            srv.reset()
            srv.fault_mix = FaultMix(MIX, seed=seed, retry_after=0.02, delay_s=0.1)
            out = tmp_path / f"runs{seed}"
            result = generate(vocab, out, tmp_path / f"cache{seed}", monkeypatch)
            assert result.exit_code == 0, (seed, result.output[-2000:])
            run_dir = resolve_run_dir(out)
            manifest = read_manifest(run_dir)
            assert manifest["status"] == "complete" and manifest["failures"] == [], seed
            for kind in KINDS:
                assert (read_kind(run_dir, kind)["status"] == "ok").all(), (seed, kind)
            # the manifest's count of attempts is the server's
            attempts = manifest["attempts"]
            assert attempts["requests"] == srv.request_count == manifest["requests"], seed
            assert attempts["failed"] == dict(server_failures(srv)), seed
            assert attempts["ok"] == srv.request_count - sum(server_failures(srv).values())
            assert attempts["ok"] == len(srv.completed()) + sum(r.fault == "slow" for r in srv.records)
            assert attempts["retries"] == srv.request_count - 12 * 4  # 48 requests, each answered once
            per_stage = Counter()
            for usage in manifest["usage"].values():
                per_stage.update(usage["failures"])
            assert per_stage == server_failures(srv)
            seen.update(r.fault for r in srv.records if r.fault)
    assert set(seen) == set(MIX)  # every kind of fault was met, and survived


def test_a_mixed_bad_streak_of_eight_attempts_is_survived(tmp_path, vocab, monkeypatch):
    """Before: seven attempts per request, whatever the cause, so eight failures in a row failed the
    row (and the run exited 1). 429s now count only against the time budget."""
    with FakeOpenAI() as srv:
        fast_env(monkeypatch, srv)
        # per request of 'hurry': attempts 1-4 get 429, 5-6 a dropped connection, 7 a 500, 8 a truncated
        # body. (Not four connection failures each: with only 'hurry' left at the end of the run, 16
        # of the breaker's last 20 attempts would be 'connection error' and it would rightly open.)
        srv.faults = [Fault("429", times=4, only_if="Sign: hurry", retry_after=0.02),
                      Fault("drop", times=6, only_if="Sign: hurry"),
                      Fault("500", times=7, only_if="Sign: hurry"),
                      Fault("truncated", times=8, only_if="Sign: hurry")]
        result = generate(vocab, tmp_path / "runs", tmp_path / "cache", monkeypatch)
        assert result.exit_code == 0, result.output[-2000:]
        manifest = read_manifest(resolve_run_dir(tmp_path / "runs"))
        assert manifest["failures"] == []
        hurry = Counter(r.body_hash for r in srv.records if "Sign: hurry" in json.dumps(srv.bodies[r.body_hash]))
        assert sorted(hurry.values()) == [9, 9, 9, 9]  # P1-P4, each answered at the ninth attempt
        assert manifest["attempts"]["failed"] == {"HTTP 429": 16, "HTTP 500": 4, "connection": 8,
                                                  "truncated body": 4}


def test_a_bad_streak_longer_than_the_time_budget_fails_its_row_naming_cause_and_budget(tmp_path, vocab,
                                                                                         monkeypatch):
    with FakeOpenAI() as srv:
        # 0 windows: the breaker (tested elsewhere) would stop the streak before the budget does
        fast_env(monkeypatch, srv, GSP_LLM_RETRY_BUDGET_S="1.5", GSP_LLM_RETRY_INITIAL_S="0.1",
                 GSP_LLM_RETRY_MAX_S="0.2", GSP_LLM_MAX_RETRIES="100", GSP_LLM_BREAKER_WINDOW="0")
        srv.faults = [Fault("500", times=None, only_if="Sign: hurry")]
        result = generate(vocab, tmp_path / "runs", tmp_path / "cache", monkeypatch)
        assert result.exit_code == 1, result.output[-2000:]  # a failed row; the run itself is complete
        run_dir = resolve_run_dir(tmp_path / "runs")
        manifest = read_manifest(run_dir)
        assert manifest["status"] == "complete"
        tb = read_kind(run_dir, "Tb").set_index("label")
        assert (tb.drop(index=1)["status"] == "ok").all() and len(tb) == 12  # the other signs went on
        error = tb.loc[1, "error"]
        assert error.startswith("HTTP 500") and "retry budget GSP_LLM_RETRY_BUDGET_S=1.5 s spent" in error
        # P1 and then P2 ('hurry' without a primary text) each met the streak; P3 and P4 were never asked
        hurry = [r for r in srv.records if "Sign: hurry" in json.dumps(srv.bodies[r.body_hash])]
        per_request = Counter(r.body_hash for r in hurry)
        assert len(per_request) == 2 and all(r.status == 500 for r in hurry)
        attempts = int(re.search(r"after (\d+) attempt\(s\)", error).group(1))
        assert attempts in per_request.values() and f"HTTP 500 ×{attempts}" in error
        for digest, n in per_request.items():
            assert 5 <= n < 101  # the time budget ended it, not max_retries
            times = [r.t for r in hurry if r.body_hash == digest]
            assert times[-1] - times[0] <= 1.5 + 0.5  # no retry started past the budget
        assert {f["key"][7:9] for f in manifest["failures"]} == {"Tb", "Ts", "Tg", "Tp"}
        assert manifest["failure_causes"][0]["cause"] == "HTTP 500: Error code: 500 - internal error"
        assert manifest["attempts"]["failed"] == {"HTTP 500": sum(r.status == 500 for r in srv.records)}
        assert "Tb: 11 ok, 1 failed" in result.output and "row(s) failed" in result.output


def _client(srv: FakeOpenAI, tmp_path: Path, throttle=None, **llm) -> LLMClient:
    settings = LLMSettings(base_url=srv.base_url, model="fake", structured_output="json_schema",
                           retry_initial_s=0.01, retry_max_s=0.05, **llm)
    return LLMClient(Endpoint(srv.base_url, "fake", None, "json_schema"), settings, throttle=throttle)


def _ask(client: LLMClient, text: str = "Sign: hello"):
    async def go():
        try:
            return await client.structured([{"role": "user", "content": text}], DescriptionOut,
                                           inline_schema(DescriptionOut), name="t", stage="Tb")
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_429s_count_against_the_time_budget_other_failures_also_against_max_retries(tmp_path):
    with FakeOpenAI() as srv:
        srv.faults = [Fault("429", times=None, retry_after=0.05)]
        with pytest.raises(LLMCallError, match=r"HTTP 429.*retry budget GSP_LLM_RETRY_BUDGET_S=0.5 s spent") as info:
            _ask(_client(srv, tmp_path, max_retries=2, retry_budget_s=0.5))
        assert srv.request_count > 3 and f"after {srv.request_count} attempt(s)" in str(info.value)

        srv.reset()
        srv.faults = [Fault("500", times=None)]
        with pytest.raises(LLMCallError, match=r"HTTP 500.*after 3 attempt\(s\).*GSP_LLM_MAX_RETRIES=2 retries spent"):
            _ask(_client(srv, tmp_path, max_retries=2, retry_budget_s=60))
        assert srv.request_count == 3


def test_the_retry_budget_is_a_validated_setting(tmp_path, vocab, monkeypatch):
    monkeypatch.setenv("GSP_LLM_RETRY_BUDGET_S", "0")
    get_settings.cache_clear()
    result = runner.invoke(app, ["generate", "--vocab", str(vocab), "--no-index", "--no-prefect"])
    assert result.exit_code == 2
    assert "GSP_LLM_RETRY_BUDGET_S='0'" in result.output and "greater than 0" in result.output
    assert "Traceback" not in result.output
    assert LLMSettings.model_fields["retry_budget_s"].description


def test_a_throttle_is_awaited_once_per_attempt_with_the_token_estimate(tmp_path):
    calls: list[int] = []

    async def throttle(tokens: int) -> None:
        calls.append(tokens)

    with FakeOpenAI() as srv:
        srv.faults = [Fault("500", times=2)]
        assert _ask(_client(srv, tmp_path, throttle=throttle)).ok
        body = next(iter(srv.bodies.values()))
        assert srv.request_count == 3 and len(calls) == 3
        assert calls[0] > body["max_tokens"] and set(calls) == {estimate_tokens(body)}

        # the same hook through describe_planned's own session (a batch on another worker)
        srv.reset()
        calls.clear()
        settings = Settings(paths={"artifacts_dir": tmp_path / "artifacts"},
                            llm={"base_url": srv.base_url, "model": "fake", "structured_output": "json_schema",
                                 "retry_initial_s": 0.01, "retry_max_s": 0.05})
        vocab = tmp_path / "v.csv"
        vocab.write_text("ClassId,TR,EN\n0,abla,sister\n1,acele,hurry\n", encoding="utf-8")
        plan = prepare_run(vocab, settings=settings, use_index=False).to_dict()
        srv.faults = [Fault("drop", times=1, only_if="Sign: hurry")]
        result = asyncio.run(describe_planned(plan, plan["labels"], "gen-elsewhere", throttle=throttle))
        assert all(r["status"] == "ok" for rows in result["rows"].values() for r in rows)
        assert len(calls) == srv.request_count == 2 * 4 + 4 and min(calls) > 0
