"""Fair sharing between callers (#15): the scheduling rules alone, then against the real server.

Every assertion is about order, step counts and finish reasons, never wall-clock times: the step gate decides
when the engine decodes, and the gate counts the decode steps.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import pytest

from service.engine.api import CallerQuotaError, EngineConfig, QueueFullError
from service.engine.delivery import StreamHandle
from service.engine.fairness import CallerAdmission, FairQueue, displacement_victims, holders, preemption_victim
from service.engine.sequence import SequenceState
from service.engine.tokenizer import Tokenizer
from service.engine.types import GenerationRequest
from tests.support.callers import TOKENS, Reader, as_caller
from tests.support.hooks import StepGate
from tests.support.rpc import error_details, ids_of
from tests.support.servers import base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

# -- the rules, on plain sequences ----------------------------------------------------------------------------



def seq(tok: Tokenizer, caller: str, generated: int = 0, prompt: str = "hi") -> SequenceState:
    s = SequenceState(GenerationRequest(tok.encode(prompt), 50, caller=caller), tok, (), 512, 0,
                 StreamHandle(lambda _: None, None))
    s.generated = list(range(1, generated + 1))
    return s


def test_one_caller_alone_uses_every_slot(tok: Tokenizer) -> None:
    running = [seq(tok, "a", 3) for _ in range(4)]
    queue = FairQueue()
    for _ in range(10):
        queue.push(seq(tok, "a"))
    assert preemption_victim(running, queue, max_slots=4) is None  # nobody else waits: no preemption
    assert displacement_victims(queue, holders(running), max_queue=16, max_slots=4) == []


def test_callers_take_turns_instead_of_first_come_first_served(tok: Tokenizer) -> None:
    queue = FairQueue()
    for caller in "aaaabbc":
        queue.push(seq(tok, caller))
    held: Counter[str] = Counter()
    order = []
    while len(queue):
        nxt = queue.pop_next(held)
        assert nxt is not None
        order.append(nxt.req.caller)
        held[nxt.req.caller] += 1
    assert order == ["a", "b", "c", "a", "b", "a", "a"]


def test_preemption_frees_a_slot_of_the_heaviest_caller_and_does_not_flap(tok: Tokenizer) -> None:
    running = [seq(tok, "a", 5, prompt="a much longer prompt here"), seq(tok, "a", 2), seq(tok, "a", 9),
               seq(tok, "a", 4)]
    queue = FairQueue()
    queue.push(seq(tok, "b"))
    victim = preemption_victim(running, queue, max_slots=4)
    assert victim is running[1]  # the cheapest to recompute: the shortest context
    # Two callers at two slots each: even, whoever waits.
    even = [seq(tok, "a", 3), seq(tok, "a", 3), seq(tok, "b", 3), seq(tok, "b", 3)]
    queue = FairQueue()
    queue.push(seq(tok, "a"))
    assert preemption_victim(even, queue, max_slots=4) is None
    # 8 slots, 3 callers (share 2.67): 3/3/2 is as fair as integers allow; moving one would only swap who is short.
    mixed = [seq(tok, c, 2) for c in "aaabbbcc"]
    queue = FairQueue()
    queue.push(seq(tok, "c"))
    assert preemption_victim(mixed, queue, max_slots=8) is None


def test_an_overflowing_queue_displaces_the_newest_request_of_the_caller_over_its_share(tok: Tokenizer) -> None:
    running = [seq(tok, "a", 1) for _ in range(4)]
    queue = FairQueue()
    flood = [seq(tok, "a") for _ in range(8)]
    for s in flood:
        queue.push(s)
    newcomer = seq(tok, "b")
    queue.push(newcomer)
    assert displacement_victims(queue, holders(running), max_queue=8, max_slots=4) == [flood[-1]]
    assert len(queue) == 8 and queue.count("b") == 1


def test_admission_refuses_over_a_callers_caps_and_over_its_share_of_a_full_queue(tok: Tokenizer) -> None:
    capped = CallerAdmission(EngineConfig(max_slots=2, max_queue=2, caller_max_streams=2))
    capped.admit("a", [])
    capped.admit("a", [])
    with pytest.raises(CallerQuotaError):
        capped.admit("a", [])
    capped.retire([seq(tok, "a")])  # one of a's streams ends: a may submit again
    capped.admit("a", [])
    full = CallerAdmission(EngineConfig(max_slots=2, max_queue=2))
    for _ in range(4):
        full.admit("a", [])
    with pytest.raises(QueueFullError):  # slots and queue all taken, and a holds more than its share
        full.admit("a", [])
    full.admit("b", [])  # b holds nothing: it still gets in (the engine then displaces one of a's)


def test_the_first_token_estimate_follows_the_callers_own_place(tok: Tokenizer) -> None:
    """Both slots held by a's long streams, two of a's queued: a waits for a slot to free; b, below its share,
    starts within a step (by preemption), so its estimate is its prefill and one step."""
    admission = CallerAdmission(EngineConfig(max_slots=2, max_queue=4))
    for _ in range(4):
        admission.admit("a", [])
    active = [seq(tok, "a", 10), seq(tok, "a", 20)]  # 40 and 30 tokens to go at 0.1 s a step
    assert admission.first_token_s("b", 10, active, None, 2, 0.1, 0.01) == pytest.approx(0.1 + 0.1)
    assert admission.first_token_s("a", 10, active, None, 2, 0.1, 0.01) == pytest.approx(4.0 + 0.1 + 0.1)


# -- the real server ------------------------------------------------------------------------------------------


def request(prompt: str, n: int, **response: bool | int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n),
                              response=pb.ResponseOptions(**response))  # type: ignore[arg-type]


# Sampled among the top 8: the draw decides, not float rounding. (On this random-weight model the full vocabulary is
# nearly flat: 150k boundaries of the CDF lie within rounding of one another, so any change of summation order, a
# different batch as much as recomputed K/V, can move a full-vocabulary draw to a neighbouring token.)
SEEDED = pb.SamplingParams(temperature=0.8, top_k=8, seed=20240607)


@pytest.mark.parametrize("sampling", [None, SEEDED], ids=["greedy", "seeded"])
def test_a_second_caller_starts_ahead_of_the_queue_by_preemption_and_the_preempted_stream_is_unchanged(
    model_dir: Path, sampling: pb.SamplingParams | None,
) -> None:
    """The preempted stream equals its solo run, ids and text: what it had sent is kept, its generator goes on
    where it was, and the recomputed K/V give the same logits within rounding (test_tenants_lifecycle.py),
    which decides no token of these prompts."""
    gate = StepGate()
    srv = started(base_config(model_dir, max_slots=4, max_queue=8, auth_tokens=TOKENS), hooks=gate)
    prompts = [f"caller a, request {i}{' padding' * i}" for i in range(8)]

    def req(prompt: str) -> pb.GenerateRequest:
        r = request(prompt, 12)
        if sampling is not None:
            r.sampling.CopyFrom(sampling)
        return r

    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            solo = {p: list(stub.Generate(req(p), metadata=as_caller("a"), timeout=60))
                    for p in [*prompts, "caller b"]}
            gate.close()  # from now on the engine decodes only when the test says so
            a = [Reader(stub.Generate(req(p), metadata=as_caller("a"), timeout=120)) for p in prompts]
            assert srv.engine.wait_until(lambda s: s.active == 4 and s.waiting == 4, 60)
            steps = srv.engine.stats().steps
            b = Reader(stub.Generate(req("caller b"), metadata=as_caller("b"), timeout=120))
            # B holds a slot, A still has all its queued requests waiting plus one preempted: B went first, and
            # without a single decode step.
            assert srv.engine.wait_until(lambda s: s.preemptions == 1 and s.active == 4 and s.waiting == 5, 60)
            assert srv.engine.stats().steps == steps
            gate.open()
            for r in [*a, b]:
                r.join()
    finally:
        srv.close()
    assert b.msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS and ids_of(b.msgs) == ids_of(solo["caller b"])
    for prompt, r in zip(prompts, a, strict=True):
        assert r.msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        # The preempted one too: it resumed where it was, with the same tokens, text and seed.
        assert ids_of(r.msgs) == ids_of(solo[prompt]), prompt
        assert "".join(m.text for m in r.msgs) == "".join(m.text for m in solo[prompt]), prompt
        assert r.msgs[-1].seed == solo[prompt][-1].seed


def test_a_preempted_stream_that_sent_tokens_is_never_displaced(model_dir: Path) -> None:
    """The issue's case: max_slots=4, max_queue=2; A opens 6 streams, B opens 3. A's streams that sent tokens
    (3 each) are preempted, not displaced: each ends with MAX_TOKENS and the ids of its solo run; the requests the
    engine displaced had sent nothing, and are refused before any message with RESOURCE_EXHAUSTED and RetryInfo."""
    gate = StepGate()
    srv = started(base_config(model_dir, max_slots=4, max_queue=2, auth_tokens=TOKENS), hooks=gate)
    prompts = [f"caller a, stream {i}" for i in range(6)]
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            solo = {p: ids_of(list(stub.Generate(request(p, 8), metadata=as_caller("a"), timeout=60)))
                    for p in prompts}
            gate.close()
            a = [Reader(stub.Generate(request(p, 8), metadata=[*as_caller("a"), ("x-request-id", f"a-{i}")],
                                      timeout=120)) for i, p in enumerate(prompts)]
            assert srv.engine.wait_until(lambda s: s.active == 4 and s.waiting == 2, 60)
            gate.permit(2)  # A's four running streams have sent 3 tokens each
            assert srv.engine.wait_until(lambda s: s.steps >= 2, 60)
            sent = {f"a-{i}" for i in range(6)} & set(gate.first_token_step)  # the streams that sent tokens
            b = []
            for i in range(3):
                b.append(Reader(stub.Generate(request(f"caller b, stream {i}", 8), metadata=as_caller("b"),
                                              timeout=120)))
                # Each arrival has been taken in: it is running, waiting, or was displaced.
                assert srv.engine.wait_until(lambda s, n=i + 1: s.active + s.prefilling + s.waiting + s.displaced
                                             == 6 + n, 60)
            stats = srv.engine.stats()
            gate.open()
            for r in [*a, *b]:
                r.join()
    finally:
        srv.close()
    assert len(sent) == 4 and stats.preemptions >= 1 and stats.displaced >= 1
    refused = {f"a-{i}" for i, r in enumerate(a) if r.code != grpc.StatusCode.OK}
    assert len(refused) == stats.displaced and not refused & sent  # only requests that had sent nothing
    for i, (prompt, r) in enumerate(zip(prompts, a, strict=True)):
        if f"a-{i}" in refused:  # refused before any message, with when to retry
            assert (r.code, r.msgs) == (grpc.StatusCode.RESOURCE_EXHAUSTED, []), prompt
            assert r.error is not None and error_details(r.error).kinds == ["RetryInfo"], prompt
        else:
            assert r.msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS, (prompt, r.msgs[-1].error_message)
            assert ids_of(r.msgs) == solo[prompt], prompt
    assert [r.msgs[-1].finish_reason for r in b] == [pb.FINISH_REASON_MAX_TOKENS] * 3


def test_an_unread_flood_cannot_lock_out_another_caller(model_dir: Path) -> None:
    """Caller A opens many streams with large messages and never reads them; caller B still starts within two
    decode steps, at the start of the flood and later in it, and A's streams end as slow readers."""
    gate = StepGate()
    config = base_config(model_dir, max_slots=8, max_queue=16, max_context=2048, max_new_tokens_limit=2000,
                         slow_reader_s=0.5, auth_tokens=TOKENS)
    srv = started(config, hooks=gate)
    # A's window stays small: no BDP probing, a small initial window, so unread messages block the server soon.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
    try:
        with grpc.insecure_channel(srv.target, options=options) as flood_ch, srv.channel() as ch:
            flood = pb_grpc.GenerationServiceStub(flood_ch)
            calls = [flood.Generate(request(f"flood {i}", 1500, logprobs=True, top_n=10), metadata=as_caller("a"),
                                    timeout=300) for i in range(40)]
            assert srv.engine.wait_until(lambda s: s.active == 8, 60)
            stub = pb_grpc.GenerationServiceStub(ch)
            for label, wait_for in (("b-early", 0), ("b-late", 8)):
                assert srv.engine.wait_until(lambda s, n=wait_for: s.slow_readers >= n, 300)
                before = gate.decode_steps
                msgs = list(stub.Generate(request("caller b", 6), metadata=[*as_caller("b"), ("x-request-id", label)],
                                          timeout=120))
                assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
                assert gate.first_token_step[label] - before <= 2, label
            assert srv.engine.wait_until(lambda s: s.active == 0 and s.waiting == 0, 300)
            ended: Counter[str] = Counter()
            for call in calls:
                try:
                    final = list(call)[-1]
                    ended["slow reader" if "stopped reading" in final.error_message else
                          pb.FinishReason.Name(final.finish_reason)] += 1
                except grpc.RpcError as err:
                    ended[err.code().name] += 1
    finally:
        srv.close()
    # Each of A's streams either was refused at once (A already held its share of slots and queue) or ran until
    # it had stopped reading, and was then ended with the slow-reader error.
    assert set(ended) <= {"slow reader", "RESOURCE_EXHAUSTED"}, ended
    assert ended["slow reader"] >= 8 and sum(ended.values()) == 40, ended


def test_a_deadline_counts_the_callers_own_place_not_the_whole_queue(model_dir: Path) -> None:
    """Admission estimates a request's wait from its caller's share: caller A's next request, behind A's own queue,
    cannot meet a 20 s deadline and is refused at once; caller B, below its share, is admitted with the same
    deadline (it starts by preemption) although first-come-first-served it would wait out a whole stream of A's."""
    gate = StepGate(step_delay_s=0.05)  # the engine measures >= 50 ms a step: A's 1500-token streams take > 70 s
    config = base_config(model_dir, max_slots=2, max_queue=4, max_context=2048, max_new_tokens_limit=2000,
                         auth_tokens=TOKENS)
    srv = started(config, hooks=gate)
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            a = [stub.Generate(request(f"a {i}", 1500), metadata=as_caller("a"), timeout=300) for i in range(4)]
            assert srv.engine.wait_until(lambda s: s.active == 2 and s.waiting == 2 and s.steps >= 5, 60)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request("a, in a hurry", 6), metadata=as_caller("a"), timeout=20))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "estimated time to the first token" in (err.value.details() or "")
            msgs = list(stub.Generate(request("caller b", 6), metadata=as_caller("b"), timeout=20))
            assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
            assert srv.engine.stats().preemptions >= 1
            for call in a:
                call.cancel()
            assert srv.engine.wait_until(lambda s: s.active + s.waiting == 0, 60)
    finally:
        srv.close()


def quota_failure(err: grpc.RpcError) -> tuple[float, list[str]]:
    details = error_details(err)
    assert details.has_status
    return details.retry_s or 0.0, details.quota_subjects


@pytest.mark.parametrize(("caps", "running"), [({"caller_max_streams": 2}, 2),
                                               ({"caller_max_queued": 1, "max_slots": 1}, 2)],
                         ids=["streams", "queued"])
def test_per_caller_caps_answer_resource_exhausted_with_retry_info_and_quota_failure(
    model_dir: Path, caps: dict, running: int,
) -> None:
    srv = started(base_config(model_dir, auth_tokens=TOKENS, **caps), hooks=StepGate(gated=True))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            held = [stub.Generate(request(f"held {i}", 50), metadata=as_caller("a"), timeout=60)
                    for i in range(running)]
            assert srv.engine.wait_until(lambda s: s.active + s.prefilling + s.waiting == running, 30)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request("one too many", 5), metadata=as_caller("a"), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry, subjects = quota_failure(err.value)
            assert retry == 1.0 and len(subjects) == 1 and subjects[0].startswith("caller:token:")
            other = stub.Generate(request("caller b is not capped by a", 2), metadata=as_caller("b"), timeout=60)
            srv.hooks.open()  # type: ignore[union-attr]
            assert list(other)[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
            for call in held:
                call.cancel()
    finally:
        srv.close()


def test_a_per_caller_token_rate(model_dir: Path) -> None:
    srv = started(base_config(model_dir, auth_tokens=TOKENS, caller_tokens_per_s=1.0, caller_token_burst=5))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            spent = list(stub.Generate(request("spend", 10), metadata=as_caller("a"), timeout=60))
            assert spent[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
            with pytest.raises(grpc.RpcError) as err:  # 5 - 10 tokens: the bucket is 5 below empty
                list(stub.Generate(request("again", 2), metadata=as_caller("a"), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry, subjects = quota_failure(err.value)
            assert 4 < retry <= 6 and subjects[0].startswith("caller:token:")
            other = list(stub.Generate(request("b has its own", 2), metadata=as_caller("b"), timeout=60))
            assert other[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    finally:
        srv.close()


def test_metrics_carry_the_callers_class_from_a_bounded_set(model_dir: Path) -> None:
    import urllib.request

    srv = started(base_config(model_dir, metrics_port=-1, caller_classes="gold,batch"))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            for cls in ("gold", "batch", "made-up", ""):
                list(stub.Generate(request("class", 2), metadata=[("x-caller-class", cls)], timeout=30))
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=5).read()
    finally:
        srv.close()
    classes = Counter(line.split('caller_class="')[1].split('"')[0] for line in body.decode().splitlines()
                      if line.startswith("tokenstream_requests_total{"))
    assert classes == {"gold": 1, "batch": 1, "default": 1}  # one series each; unknown classes fold into default


def test_who_the_caller_is() -> None:
    from service.callers import identify, peer_ip

    cfg = base_config("x", caller_key="x-tenant", caller_classes="gold")
    assert peer_ip("ipv4:127.0.0.1:5000") == "127.0.0.1" and peer_ip("ipv6:[::1]:5000") == "::1"
    by_token = identify(cfg, {"x-tenant": "t1", "x-caller-class": "gold"}, "127.0.0.1", "secret")
    assert by_token.id.startswith("token:") and "secret" not in by_token.id and by_token.cls == "gold"
    assert identify(cfg, {"x-tenant": "t1"}, "127.0.0.1", None).id == "key:t1"  # a trusted gateway names it
    plain = identify(base_config("x"), {"x-tenant": "t1", "x-caller-class": "platinum"}, "10.0.0.7", None)
    assert (plain.id, plain.cls) == ("ip:10.0.0.7", "default")  # no key configured; unknown class


def test_sub_callers_of_one_token_take_turns_but_share_its_caps(tok: Tokenizer) -> None:
    """Behind a trusted gateway, the fairness id splits a token's traffic: each sub-caller gets its own turn in the
    fair queue (sub-caller b's one request starts before a's second), while the token's caps count them together."""
    def sub(name: str) -> SequenceState:
        return SequenceState(GenerationRequest(tok.encode("hi"), 50, caller="token:t", sub_caller=name), tok, (),
                             512, 0, StreamHandle(lambda _: None, None))

    queue = FairQueue()
    a1, a2, b1 = sub("key:a"), sub("key:a"), sub("key:b")
    for s in (a1, a2, b1):
        queue.push(s)
    held = holders([])
    first = queue.pop_next(held)
    assert first is a1
    held[first.req.fair_caller] += 1
    assert queue.pop_next(held) is b1  # b's turn before a's second request, though both are the same token
    admission = CallerAdmission(EngineConfig(max_slots=4, max_queue=4, caller_max_streams=2))
    admission.admit("token:t", [])
    admission.admit("token:t", [])
    with pytest.raises(CallerQuotaError):  # a third stream of the token, whichever sub-caller asks
        admission.admit("token:t", [])
