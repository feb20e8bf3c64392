"""Does a fast refresh cost quality? GaLore-mini trained with each projector method, same seed, same data.

A small LLaMA learns a synthetic language (tokens drawn from a fixed sparse random trigram model, so
there is real structure to learn and a known entropy floor) for a fixed number of steps with the
GaLore paper's optimiser settings scaled down (lr 1e-2, scale 0.25, cosine to 10% with warmup), a
short refresh gap so that several refreshes happen, and the validation loss is compared with the
exact-SVD fp32 path. Goal (issue #5): within 1% of it (in perplexity).

    .venv/bin/python bench/quality.py            # ~3 minutes on 2 cores
    .venv/bin/python bench/quality.py --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import galore_mini as gm  # noqa: E402

VARIANTS = [
    ("galore_mini svd fp32 (reference)", "galore_mini", dict(proj_method="svd")),
    ("galore_mini power fp32", "galore_mini", dict(proj_method="power")),
    ("galore_mini randomized fp32", "galore_mini", dict(proj_method="randomized")),
    ("galore_mini power bf16", "galore_mini", dict(proj_method="power", proj_dtype="bf16")),
    ("galore_mini randomized bf16", "galore_mini", dict(proj_method="randomized", proj_dtype="bf16")),
    ("galore (AdamW) svd fp32", "galore", dict(proj_method="svd")),
    ("full AdamW", "full", dict()),
]


class TrigramLanguage:
    """Token t depends on (t-2, t-1) through a fixed random table with `fanout` likely successors."""

    def __init__(self, vocab: int, fanout: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(0, vocab, (vocab, vocab, fanout), generator=gen)
        weights = torch.rand(vocab, vocab, fanout, generator=gen).pow(3) + 0.05
        self.probs = weights / weights.sum(-1, keepdim=True)
        # nats per predicted token (the first two of a sequence are uniform): a lower bound on the loss
        self.entropy = float(-(self.probs * self.probs.log()).sum(-1).mean())

    def sample(self, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
        out = torch.empty(batch, seq, dtype=torch.long)
        out[:, :2] = torch.randint(0, self.vocab, (batch, 2), generator=gen)
        for t in range(2, seq):
            a, b = out[:, t - 2], out[:, t - 1]
            choice = torch.multinomial(self.probs[a, b], 1, generator=gen).squeeze(1)
            out[:, t] = self.successors[a, b, choice]
        return out


def train(method: str, options: dict, args, language: TrigramLanguage, train_data, val_data) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=language.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                         max_position_embeddings=args.seq, tie_word_embeddings=False))
    lr = args.lr if method != "full" else args.lr_full
    opt = gm.create_optimizer(model, method, lr=lr, rank=args.rank, update_proj_gap=args.gap, scale=0.25,
                              weight_decay=0.0, **options)
    warmup = max(1, args.steps // 10)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step in range(args.steps):
        ids = train_data[step]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        val = sum(float(model(input_ids=ids, labels=ids).loss) for ids in val_data) / len(val_data)
    return dict(val_loss=val, val_ppl=math.exp(val), train_loss=float(loss.detach()))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    language = TrigramLanguage(args.vocab)
    gen = torch.Generator().manual_seed(1)
    train_data = [language.sample(args.batch, args.seq, gen) for _ in range(args.steps)]
    val_data = [language.sample(args.batch, args.seq, gen) for _ in range(args.val_batches)]
    rows = []
    for label, method, options in VARIANTS:
        result = train(method, options, args, language, train_data, val_data)
        rows.append(dict(label=label, method=method, **options, **result))
        print(f"  {label}: val loss {result['val_loss']:.4f}", file=sys.stderr, flush=True)
    ref = rows[0]["val_ppl"]
    for row in rows:
        row["ppl_vs_svd_pct"] = (row["val_ppl"] / ref - 1) * 100
    return dict(kind="quality", machine=C.machine(), versions=C.versions(),
                config=dict(vocab=args.vocab, dim=args.dim, ffn=args.ffn, layers=args.layers, heads=args.heads,
                            seq=args.seq, batch=args.batch, steps=args.steps, rank=args.rank, gap=args.gap,
                            lr=args.lr, lr_full=args.lr_full, entropy_floor=language.entropy, smoke=args.smoke),
                results=rows)


def render(report: dict) -> str:
    cfg = report["config"]
    header = ["optimizer", "val loss", "val perplexity", "perplexity vs exact-SVD fp32"]
    rows = [[r["label"], f"{r['val_loss']:.4f}", f"{r['val_ppl']:.3f}", f"{r['ppl_vs_svd_pct']:+.2f}%"]
            for r in report["results"]]
    return (f"LLaMA D={cfg['dim']} F={cfg['ffn']} L={cfg['layers']} on a synthetic trigram language "
            f"(vocab {cfg['vocab']}, entropy floor {cfg['entropy_floor']:.3f} nats), {cfg['steps']} steps of "
            f"{cfg['batch']}×{cfg['seq']} tokens, rank {cfg['rank']}, gap {cfg['gap']} "
            f"({cfg['steps'] // cfg['gap']} refreshes), lr {cfg['lr']} (AdamW {cfg['lr_full']}), clip 1.0\n\n"
            f"{C.markdown_table(header, rows)}\n")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=352)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lr-full", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab, args.dim, args.ffn, args.layers, args.seq, args.batch = 64, 32, 64, 1, 16, 2
        args.steps, args.val_batches, args.rank, args.gap = 2, 1, 4, 1
    return args


def main(argv=None) -> dict:
    return C.run_and_report(parse(argv), run, render)


if __name__ == "__main__":
    main()
