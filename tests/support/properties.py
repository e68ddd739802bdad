"""The stream contract's properties, shared by every model's property tests (tests/test_contract.py, test_gguf.py).

Strategies for prompts and stop lists, plain-Python oracles for what the README promises (stop matching, text
release), and one check per property. Each check records the hard cases it met (hypothesis `event`, and a `Reach`
tally that the `reach` fixture in tests/conftest.py asserts on), so a run that never met them fails.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import event, target
from hypothesis import strategies as st

from tests.support.hooks import StepGate
from tests.support.rpc import ids_of
from tests.support.servers import ServerThread
from tokenstream.v1 import generation_pb2 as pb

CHINESE = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处理府研质"
)
EMOJI = "😀🐍🦀🎉🚀👍🏽🇨🇳❤️‍🔥"
ENGLISH = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "def", "return", "class", "import", "\n"]
# Hard cases a property run must meet at least once (the `reach` fixture fails the test otherwise).
UTF8_SPLIT = "a UTF-8 character split across tokens"
STOP_ACROSS_TOKENS = "a stop sequence matched across a token boundary"
STOPS_COMPETE = "several stop sequences in the text when one matched"
NEAR_MISS_ONLY = "only near-miss stop sequences: none matched"
MAX_STOPS = 8  # the server's limit on stop_sequences
NEVER = "\x00never"  # a stop no output holds: its first character is held back only if the output has a NUL


class Reach:
    """Counts of the hard cases a property test met, over all its examples."""

    def __init__(self, required: Sequence[str]) -> None:
        self.required = tuple(required)
        self.seen: Counter[str] = Counter()

    def saw(self, case: str, times: int = 1) -> None:
        if times > 0:
            event(case)
            self.seen[case] += times

    def missing(self) -> list[str]:
        return [case for case in self.required if self.seen[case] == 0]


@st.composite
def prompts(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.one_of(
        st.text(alphabet=CHINESE, min_size=1, max_size=6),
        st.sampled_from(ENGLISH),
        st.text(alphabet=EMOJI, min_size=1, max_size=3),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=4),
    ), min_size=1, max_size=6))
    text = " ".join(pieces).strip()
    return text or "hello"


def sampled(prompt: str, seed: int, n: int = 24, temperature: float = 1.5, **stopping: object) -> pb.GenerateRequest:
    # A hot temperature on random weights picks byte-piece tokens often: split characters every few tokens.
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(temperature=temperature, seed=seed),
                              stopping=pb.StoppingCriteria(max_new_tokens=n, **stopping))  # type: ignore[arg-type]


# -- oracles: what the README says, written plainly ---------------------------------------------------------------


def split_characters(tok: Any, ids: Sequence[int]) -> int:
    """Token boundaries that fall inside a well-formed multi-byte UTF-8 character of the output's bytes."""
    data, cuts = b"", set()
    for token in ids:
        piece = tok.token_bytes(token)
        data += piece if piece is not None else tok.decode([token]).encode()
        cuts.add(len(data))
    splits, at = 0, 0
    while at < len(data):
        width = _utf8_width(data[at])
        if width > 1 and _decodes(data[at : at + width]):
            splits += sum(at < cut < at + width for cut in cuts)
            at += width
        else:
            at += 1
    return splits


def _utf8_width(lead: int) -> int:
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 1


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class StopOutcome:
    text: str  # everything the stream sends
    stop: str  # the stop sequence that matched, "" when none did
    delta: int  # index of the delta that completed it (the last delta when none did)
    at: int  # where the stop starts in the text (-1 when none did)
    found: int  # how many of the stops the text held when one matched


def first_stop(deltas: Sequence[str], stops: Sequence[str], include: bool) -> StopOutcome:
    """Text arrives delta by delta. The first delta after which the text holds a stop sequence ends the stream;
    of the stops it then holds, the one that starts first wins (the longer one where two start together), and the
    text ends before it (after it, with include_stop_sequence)."""
    text = ""
    for k, delta in enumerate(deltas):
        text += delta
        hits = sorted((text.find(s), -len(s), s) for s in set(stops) if s in text)
        if hits:
            at, _, stop = hits[0]
            return StopOutcome(text[:at] + (stop if include else ""), stop, k, at, len(hits))
    return StopOutcome(text, "", len(deltas) - 1, -1, 0)


def released_before_a_match(text: str, stops: Sequence[str]) -> str:
    """What has been sent once `text` arrived without a match: all but its longest suffix that may begin a stop."""
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]


def crosses(deltas: Sequence[str], start: int, length: int) -> bool:
    """Whether text[start : start + length] spans a boundary between two deltas (so between two tokens)."""
    return any(start < cut < start + length for cut in itertools.accumulate(len(d) for d in deltas))


# -- stop-list strategies over a known output ----------------------------------------------------------------------


def _window(draw: st.DrawFn, text: str, min_len: int = 1) -> tuple[int, int]:
    start = draw(st.integers(0, len(text) - min_len))
    return start, draw(st.integers(start + min_len, min(len(text), start + min_len + 5)))


@st.composite
def across_a_boundary(draw: st.DrawFn, deltas: Sequence[str]) -> list[str]:
    """A piece of the output that spans a token boundary (there is none in a one-delta output)."""
    text, cuts = "".join(deltas), list(itertools.accumulate(len(d) for d in deltas))[:-1]
    inner = [c for c in cuts if 0 < c < len(text)]
    if not inner:
        return []
    cut = draw(st.sampled_from(inner))
    return [text[cut - draw(st.integers(1, min(3, cut))) : cut + draw(st.integers(1, min(3, len(text) - cut)))]]


def _one_delta(draw: st.DrawFn, deltas: Sequence[str], min_len: int) -> str:
    """One delta at least min_len long, drawn (all the text where none is): stops inside it complete together."""
    long_enough = [d for d in deltas if len(d) >= min_len]
    return draw(st.sampled_from(long_enough)) if long_enough else "".join(deltas)


@st.composite
def overlapping(draw: st.DrawFn, deltas: Sequence[str]) -> list[str]:
    """Two pieces of one delta that overlap, text[a:b] and text[c:d] with a < c < b < d: the earlier one must win."""
    text = _one_delta(draw, deltas, 3)
    if len(text) < 3:
        return []
    a = draw(st.integers(0, len(text) - 3))
    c = draw(st.integers(a + 1, len(text) - 2))
    b = draw(st.integers(c + 1, len(text) - 1))
    d = draw(st.integers(b + 1, len(text)))
    return draw(st.permutations([text[a:b], text[c:d]]))


@st.composite
def prefixes(draw: st.DrawFn, deltas: Sequence[str]) -> list[str]:
    """A piece of one delta and a shorter prefix of it, in either order: the longer must win."""
    text = _one_delta(draw, deltas, 2)
    if len(text) < 2:
        return []
    start, end = _window(draw, text, min_len=2)
    whole = text[start:end]
    return draw(st.permutations([whole, whole[: draw(st.integers(1, len(whole) - 1))]]))


@st.composite
def near_misses(draw: st.DrawFn, text: str) -> list[str]:
    """A piece of the output with one character changed, so that the output does not hold it."""
    if not text:
        return []
    start, end = _window(draw, text)
    piece = text[start:end]
    i = draw(st.integers(0, len(piece) - 1))
    for ch in (draw(st.sampled_from("xq#Z~é界")), "\x07", "\ue000"):
        miss = piece[:i] + ch + piece[i + 1 :]
        if ch != piece[i] and miss not in text:
            return [miss]
    return []


def _usable(stops: list[str]) -> list[str]:
    """Distinct, within the server's limits, and without U+FFFD (which only stands for bytes still held)."""
    out = list(dict.fromkeys(s for s in stops if s and "\ufffd" not in s and len(s) <= 256 and s != NEVER))
    return [*out[: MAX_STOPS - 1], NEVER]


@st.composite
def stop_lists(draw: st.DrawFn, deltas: Sequence[str]) -> dict[str, list[str]]:
    """Two stop lists for an output that arrived as `deltas`, each closed by NEVER. "near-miss": pieces of the output
    with one character changed, none of which may match. "mix": a stop across a token boundary, two overlapping
    stops and two that prefix each other, and maybe near-misses, in any order: whichever completes first must win."""
    text = "".join(deltas)
    misses = [s for _ in range(draw(st.integers(1, 3))) for s in draw(near_misses(text))]
    matching = [*draw(across_a_boundary(deltas)), *draw(overlapping(deltas)), *draw(prefixes(deltas))]
    return {"near-miss": draw(st.permutations(_usable(misses))),
            "mix": draw(st.permutations(_usable(matching + misses if draw(st.booleans()) else matching)))}


# -- the properties ------------------------------------------------------------------------------------------------


def deltas_concatenate(stub: Any, tok: Any, prompt: str, seed: int, reach: Reach | None = None) -> None:
    """The deltas are the decode, byte for byte; each is sent as soon as it ends on a whole character."""
    msgs = list(stub.Generate(sampled(prompt, seed, min_new_tokens=24), timeout=60))  # no early EOS
    ids = ids_of(msgs)
    full = tok.decode(ids)
    assert "".join(m.text for m in msgs).encode() == full.encode()
    # No delta ends inside a character: what has been sent after each message is the decode of its tokens so far.
    sent, upto = "", 0
    for m in msgs[:-1]:
        sent, upto = sent + m.text, upto + len(m.tokens)
        assert sent == tok.decode(ids[:upto])
    assert [m for m in msgs[:-1] if m.text == "" or len(m.tokens) == 0] == [], "only the final message may be empty"
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert final.usage.completion_tokens == len(ids) == 24
    assert final.usage.prompt_tokens == len(tok.encode(prompt))
    assert final.seed == seed
    assert final.timings.time_to_first_token_ms > 0
    assert final.timings.total_ms >= final.timings.decode_ms
    splits = split_characters(tok, ids)
    target(float(splits), label="UTF-8 characters split across tokens")
    if reach is not None:
        reach.saw(UTF8_SPLIT, splits)


def stops_match_as_the_oracle_says(stub: Any, prompt: str, seed: int, include: bool, data: Any,
                                   reach: Reach | None = None) -> None:
    """Against a reference run of the same seed, for a list of near-misses and for a mix: which stop matches, the
    text sent, the tokens counted, and the text released after each message (all but what may still begin a stop)
    are what first_stop says."""
    reference = list(stub.Generate(sampled(prompt, seed, n=48, temperature=0.8), timeout=60))
    deltas = [m.text for m in reference]  # with no stop sequences, each message's text is one released delta
    for kind, stops in data.draw(stop_lists(deltas), label="stops").items():
        want = first_stop(deltas, stops, include)
        msgs = list(stub.Generate(sampled(prompt, seed, n=48, temperature=0.8, stop_sequences=stops,
                                          include_stop_sequence=include), timeout=60))
        _agrees_with_the_oracle(reference, deltas, stops, want, msgs)
        if reach is not None and kind == "near-miss":
            reach.saw(NEAR_MISS_ONLY, int(len(stops) > 1 and not want.stop))
        elif reach is not None:
            reach.saw(STOP_ACROSS_TOKENS, int(bool(want.stop) and crosses(deltas, want.at, len(want.stop))))
            reach.saw(STOPS_COMPETE, int(want.found > 1))


def _agrees_with_the_oracle(reference: list[pb.GenerateResponse], deltas: list[str], stops: list[str],
                            want: StopOutcome, msgs: list[pb.GenerateResponse]) -> None:
    final = msgs[-1]
    counted = sum(len(m.tokens) for m in reference[: want.delta + 1])
    finish = pb.FINISH_REASON_STOP_SEQUENCE if want.stop else reference[-1].finish_reason
    assert (final.finish_reason, final.stop_sequence) == (finish, want.stop)
    assert "".join(m.text for m in msgs) == want.text
    assert final.usage.completion_tokens == counted
    assert ids_of(msgs) == ids_of(reference)[:counted]
    # Released as soon as known: after each message, all that arrived but a suffix that may begin a stop.
    ends = list(itertools.accumulate(len(m.tokens) for m in reference))
    sent, upto = "", 0
    for m in msgs[:-1]:
        sent, upto = sent + m.text, upto + len(m.tokens)
        assert upto in ends, "text is released only where a delta arrives"
        assert sent == released_before_a_match("".join(deltas[: ends.index(upto) + 1]), stops)


def seeds_reproduce_in_a_shared_step(server: ServerThread, gate: StepGate, stub: Any, seed: int, prompt: str,
                                     others: int) -> None:
    """A seeded stream gives the same tokens alone and decoded in one batch with `others` noise streams: the gate
    holds the engine until all are admitted, so each of its decode steps has every noise stream beside it."""
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(temperature=0.9, top_k=40, top_p=0.95,
                                                                       seed=seed),
                             stopping=pb.StoppingCriteria(max_new_tokens=16))
    engine = server.engine
    gate.open()
    alone = ids_of(list(stub.Generate(req, timeout=60)))
    gate.close()
    # Noise outlasts the stream (EOS banned for 30 tokens), so none leaves the batch before it does.
    noise = [stub.Generate(sampled(f"noise {i} 噪声", seed + i + 1, n=30, min_new_tokens=30), timeout=120)
             for i in range(others)]
    call = stub.Generate(req, timeout=120)
    assert engine.wait_until(lambda s: s.active == others + 1 and s.prefilling + s.waiting == 0, 60)
    before = engine.stats().batch_sizes[others + 1]
    gate.open()
    batched = ids_of(list(call))
    assert [len(ids_of(list(c))) for c in noise] == [30] * others
    shared = engine.stats().batch_sizes[others + 1] - before
    assert batched == alone
    assert shared == len(batched) - 1, "every decode step of the stream (all but its first token) had all rows"
    event(f"{others + 1} rows in each step")
