"""Prompt privacy between tenants: the prefix cache reveals nothing of another tenant's prompt.

The attack of issue 19: a victim's prompt holds a secret; another client guesses it digit by
digit and reads, from `cached_prompt_tokens` (and the time to first token), how much of its
guess the cache already held. Run in process through the Engine, over one slot and over the
batched graph's two, as the fronts submit requests.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm.cli import main as cli
from edgellm.engine import Engine, Job, Outcome
from edgellm.errors import GenerationError
from edgellm.runtime.caches import Scope, SharedPrefixes, Snapshot, visible
from edgellm.recipes.anomaly import shared_prompt
from edgellm.recipes.config import AnomalyConfig
from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from edgellm.cli.commands import _share_prompts
from mqtt_helpers import connection, running_service

SYSTEM = [{"role": "system", "content": "You are the assistant of the plant's front desk. Answer briefly."}]
GUESSES = ["4821", "4822", "5555", "0000"]
DOCS = Path(__file__).parent.parent / "docs" / "mqtt.md"
BENCH = Path(__file__).parent.parent / "benchmarks" / "privacy.py"


def asking(code: str) -> list[dict[str, str]]:
    """The service's system prompt, then a turn that holds a door code."""
    return [*SYSTEM, {"role": "user", "content": f"The door code is {code}. Repeat the door code."}]


def fresh(bundle, shared: bool = False) -> edgellm.Model:
    """A model with an empty cache; `shared`: the service's system prompt declared shared."""
    model = edgellm.load(bundle, verify=False)
    if shared:
        model.share_prefix(SYSTEM)
    return model


def ask(engine: Engine, prompt, tenant: str, **params):
    """Submit one job as a front does; its Result (usage, token ids)."""
    chunks, done, end = [], threading.Event(), []

    def on_end(outcome: Outcome) -> None:
        end.append(outcome)
        done.set()

    job = Job(prompt, engine.params({"max_new_tokens": 6, **params}), client=tenant, on_chunk=chunks.append, on_end=on_end,
              tenant=tenant)
    assert engine.submit(job) is None
    assert done.wait(60), "the job never ended"
    assert end[0].error is None, end[0].error
    return end[0].last.result


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("declared", [False, True], ids=["nothing-shared", "system-shared"])
def test_another_tenant_learns_nothing_of_a_cached_prompt(tiny_bundle, slots, declared):
    model = fresh(tiny_bundle, declared)
    shared = len(model.shared.longest(model.request(asking("4821"))[0]).ids) if declared else 0
    engine = Engine(model, slots=slots).start()
    try:
        seen = {}
        for i, guess in enumerate(GUESSES):
            ask(engine, asking("4821"), "victim")  # the secret is what the cache holds now
            seen[guess] = ask(engine, asking(guess), f"attacker-{i}").usage.cached_prompt_tokens
        ask(engine, asking("4821"), "victim")
        again = ask(engine, asking("4821"), "victim").usage.cached_prompt_tokens
    finally:
        engine.close()
    # Every guess finds the same, at most the declared part: the right one is not told apart.
    assert set(seen.values()) == {shared}, seen
    assert again > shared  # the victim itself still reuses its own prompt


@pytest.mark.parametrize("slots", [1, 2])
def test_the_same_tenant_reuses_and_a_cache_salt_isolates_within_it(tiny_bundle, slots):
    model = fresh(tiny_bundle)
    engine = Engine(model, slots=slots).start()
    try:
        first = ask(engine, asking("4821"), "desk")
        same = ask(engine, asking("4821"), "desk").usage.cached_prompt_tokens
        salted = ask(engine, asking("4821"), "desk", cache_salt="alice").usage.cached_prompt_tokens
        salted_again = ask(engine, asking("4821"), "desk", cache_salt="alice").usage.cached_prompt_tokens
        other_salt = ask(engine, asking("4821"), "desk", cache_salt="bob").usage.cached_prompt_tokens
    finally:
        engine.close()
    n = first.usage.prompt_tokens
    assert same == n - 2  # all but the two ids a prompt always feeds (kvcache.reusable_prefix)
    assert (salted, salted_again, other_salt) == (0, n - 2, 0)


def test_a_declared_system_prompt_is_reused_across_tenants_with_the_same_answer(tiny_bundle):
    cold = fresh(tiny_bundle)
    expected = cold.generate(asking("1234"), max_new_tokens=12)
    model = fresh(tiny_bundle, shared=True)
    engine = Engine(model).start()
    try:
        ask(engine, "Something else entirely, so the cache holds another prompt.", "other")
        got = ask(engine, asking("1234"), "desk", max_new_tokens=12)
        again = ask(engine, asking("1234"), "desk", max_new_tokens=12)
    finally:
        engine.close()
    shared = len(model.shared.longest(model.request(asking("1234"))[0]).ids)
    # The system turn and the user turn's header: the part that stays the same whatever follows.
    system_turn = len(model.request(SYSTEM, add_generation_prompt=False)[0])
    assert shared > system_turn
    assert got.usage.cached_prompt_tokens == shared
    assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens - 2
    # Greedy tokens are those of a cold cache, restored, reused or not.
    assert got.token_ids == again.token_ids == expected.token_ids


def test_the_python_api_has_one_user_who_reuses_everything(tiny_bundle):
    model = fresh(tiny_bundle)
    first = model.generate(asking("4821"), max_new_tokens=4)
    follow = model.generate(asking("4821"), max_new_tokens=4)
    assert follow.usage.cached_prompt_tokens == first.usage.prompt_tokens - 2
    assert model.generate(asking("4821"), max_new_tokens=4, tenant="x").usage.cached_prompt_tokens == 0


def test_the_rule_is_one_function_and_shared_prefixes_need_room_to_feed():
    mine, theirs = Scope("a"), Scope("b")
    assert list(visible([1, 2, 3], mine, mine)) == [1, 2, 3]
    assert list(visible([1, 2, 3], mine, theirs)) == [] and list(visible([1], mine, Scope("a", "salt"))) == []
    rows = Snapshot(2, (np.zeros((1, 1, 2, 1)),), (np.zeros((1, 1, 2, 1)),))
    shared = SharedPrefixes()
    shared.add([7, 8], rows)
    assert shared.longest([7, 8, 9, 10]).ids == (7, 8)
    assert shared.longest([7, 8, 9]) is None  # two ids are always fed: the prompt's last logits
    assert shared.longest([7, 9, 9, 9]) is None
    with pytest.raises(GenerationError, match="needs as many rows"):
        shared.add([1, 2, 3], rows)


def test_a_prompt_with_nothing_stable_cannot_be_shared(tiny_bundle):
    model = fresh(tiny_bundle)
    assert model.share_prefix([5, 6, 7]) == 3  # token ids are shared as they are
    with pytest.raises(GenerationError, match="no prefix to share"):
        model.share_prefix("")


def test_serve_declares_its_system_prompt_and_the_recipes(tiny_bundle):
    line = re.search(r"```bash\n(edgellm serve .*--shared-system .*)\n```", DOCS.read_text()).group(1)
    args = cli.build_parser().parse_args(shlex.split(line)[1:])
    model = fresh(tiny_bundle)
    recipe = AnomalyConfig()
    _share_prompts(model, args.shared_system, recipe)
    assert len(model.shared) == 2
    device = [{"role": "system", "content": args.shared_system}, {"role": "user", "content": "Lights?"}]
    explain = [*shared_prompt(recipe), {"role": "user", "content": "Sensor t1 read 93 C."}]
    assert all(model.shared.longest(model.request(m)[0]) is not None for m in (device, explain))
    again = fresh(tiny_bundle)
    _share_prompts(again, recipe.system, recipe)  # the same prompt twice is one copy
    assert len(again.shared) == 1


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(60)
def test_over_mqtt_each_reply_topic_is_a_tenant(broker, probe, tiny_bundle):
    model = fresh(tiny_bundle)
    topics = proto.Topics("edgellm", "dev1")

    def cached(rid: str, code: str, reply_topic: str) -> int:
        probe.publish(topics.request, {"id": rid, "messages": asking(code), "max_tokens": 4, "stream": False},
                      response_topic=reply_topic)
        return probe.replies(rid)[-1]["usage"]["cached_prompt_tokens"]

    with running_service(model, connection(broker.url)) as service:
        tenants, submit = [], service.engine.submit
        service.engine.submit = lambda job: tenants.append(job.tenant) or submit(job)
        cached("v1", "4821", "plant/desk/answers")
        right = cached("a1", "4821", "plant/visitor/answers")
        cached("v2", "4821", "plant/desk/answers")
        wrong = cached("a2", "5555", "plant/visitor/answers")
        cached("v3", "4821", "plant/desk/answers")
        own = cached("v4", "4821", "plant/desk/answers")
    assert right == wrong == 0 and own > 0
    # Named apart from HTTP's tenants ("key:...", "addr:..."): a reply topic cannot pose as one.
    assert set(tenants) == {"mqtt:plant/desk/answers", "mqtt:plant/visitor/answers"}


@pytest.mark.timeout(300)
def test_the_privacy_benchmark_measures_the_cases_it_names(tiny_bundle, tmp_path):
    out = tmp_path / "privacy.json"
    cmd = [sys.executable, str(BENCH), "--bundle", str(tiny_bundle), "--runs", "1", "--system-tokens", "40",
           "--decode-tokens", "4", "--slots", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    cases, shared = results["ttft"]["cases"], results["ttft"]["shared_tokens"]
    assert cases["other tenant, declared"]["cached_prompt_tokens"] == [shared] and shared >= 40
    assert cases["other tenant, undeclared"]["cached_prompt_tokens"] == [0]
    assert cases["same tenant"]["cached_prompt_tokens"][0] >= shared
    assert all(len(case["ttft_ms"]) == 1 for case in cases.values())
    assert results["decode"]["tokens"] == 4 and results["decode"]["median_tokens_per_s"] > 0
    assert "other tenant, declared" in done.stdout
