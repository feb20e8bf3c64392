"""Operations and bytes of one full training step (forward, backward, optimizer), AdamW against GaLore-mini.

Where does a training step spend beyond the optimizer's own arithmetic? This counts, on the CPU, every
aten operation a steady training step dispatches (a ``TorchDispatchMode`` below autograd, so backward's
operations are seen too), by phase, with the bytes each reads and writes (inputs' and outputs' storage
sizes), the dtype conversions among them and the bytes of fresh outputs (allocations). On a GPU the
operations are kernel launches and the bytes are memory traffic, so the table says what a GPU step must
pay, without a GPU. The model has LLaMA-1B's topology (24 blocks, 218 tensors) at reduced widths; bf16
weights as in the GPU training-step benchmark.

    PYTHONPATH=src .venv/bin/python bench/train_step_ops.py            # ~1 minute
    PYTHONPATH=src .venv/bin/python bench/train_step_ops.py --smoke    # 2 blocks
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FINDINGS = """
What the counts say (CPU, 2026-11-29; the GPU training-step targets are unmeasured here, no GPU was available):

* **Forward and backward are the same** for both optimizers, operation for operation and byte for byte (987 and
  1,775 operations). Nothing the optimizer does reaches them, so the ~150 ms of the H100 training step (344 ms
  against AdamW's 137 ms) that the optimizer-step table does not explain must come from the optimizer phase
  of that step or from how it was timed, not from the model. (That table's step had fp32 weights; the
  training step's were bf16, whose update then cost more: see "No fp32 copy".)
* **The optimizer phase moves fewer bytes than AdamW's** (372.6 MiB against 559.2 MiB) but issues 1,287
  operations against foreach AdamW's 11 (each of which loops over the tensors; fused AdamW is one kernel per
  chunk of them). On a GPU that is host-bound, which the sync-free step (`capturable=True`) under
  `torch.compile` or a CUDA graph is for; its eager form issues 8,287 and is not meant to run uncompiled.
* **The optimizer allocates 1,678 fresh tensors against AdamW's 219.** The H100 training-step time was one
  step timed once, right after `torch.cuda.empty_cache()` (`bench/gpu.py`), so its allocations went to the
  driver until the allocator's cache refilled: a cost a steady step does not pay, and larger for the step
  with more temporaries (how much of the ~150 ms, only a GPU can say). `bench/gpu.py` now times the median
  of the steps after that one.
* **No fp32 copy** of a bf16/fp16 weight updated outside the low-rank GEMM (embedding, output layer, norms: at
  LLaMA-1B 131M of its 1.34B parameters): one fp32 temporary is read from the weight and rounded once into it.
  Taking an fp32 copy of the weight and of the scaled direction instead (the code up to commit 97380e5, which the
  H100 training step ran) costs 1,389 operations, 404.1 MiB, 462 conversions (81.6 MiB) and 1,729 fresh tensors
  (67.2 MiB) against 1,287, 372.6 MiB, 411 (69.8 MiB) and 1,678 (59.4 MiB) (from commit 6e14f1a; same command).
* What remains is small per tensor: the low-rank gradient made fp32 and the moment factor made bf16 for the
  bf16 GEMM, three small conversions per projected weight.
"""

# operations that make views or read metadata: no kernel, no traffic
VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "select", "slice", "as_strided", "expand", "unsqueeze",
         "squeeze", "detach", "alias", "permute", "unbind", "split", "chunk", "narrow", "lift_fresh", "empty",
         "empty_like", "empty_strided", "_local_scalar_dense", "is_nonzero", "split_with_sizes", "_reshape_alias",
         "new_empty", "new_empty_strided", "lift_fresh_copy", "sym_size", "sym_stride", "sym_numel", "dim",
         "is_same_size", "_has_compatible_shallow_copy_type", "set_"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Counter(TorchDispatchMode):
    """Per phase: device ops, bytes read/written, conversions (count, bytes written), fresh outputs' bytes."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.stats = collections.defaultdict(lambda: collections.Counter())
        self.by_op = collections.defaultdict(lambda: collections.Counter())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name in VIEWS or name.startswith("sym_"):
            return out
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        in_ids = {id(x) for x in inputs}
        read = sum(_nbytes(x) for x in inputs if x.dim() > 0)
        written = sum(_nbytes(x) for x in outputs)
        fresh = sum(_nbytes(x) for x in outputs if id(x) not in in_ids)
        s = self.stats[self.phase]
        s["ops"] += 1
        s["read"] += read
        s["written"] += written
        s["fresh"] += fresh
        s["allocations"] += sum(1 for x in outputs if id(x) not in in_ids)
        if name in ("_to_copy", "to") or (name == "copy_" and inputs[0].dtype != inputs[1].dtype):
            s["conversions"] += 1
            s["conversion_bytes"] += read + written
        b = self.by_op[self.phase]
        b[name] += read + written
        return out


def _optimizers(model, rank: int):
    import galore_mini as gm

    yield "torch AdamW (foreach)", lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    yield "GaLoreMini (power, bf16 proj)", lambda: gm.create_optimizer(
        model, "galore_mini", lr=1e-2, rank=rank, proj_dtype="bf16")
    yield "GaLoreMini (power, bf16 proj), capturable", lambda: gm.create_optimizer(
        model, "galore_mini", lr=1e-2, rank=rank, proj_dtype="bf16", capturable=True)


def run(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    results = []
    for index, (label, _) in enumerate(_optimizers(None, args.rank)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        build = list(_optimizers(model, args.rank))[index][1]
        opt = build()
        for _ in range(2):  # past the first refresh: measure a steady step
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        counter = Counter()
        with counter:
            loss = model(input_ids=ids, labels=ids).loss
            counter.phase = "backward"
            loss.backward()
            counter.phase = "optimizer"
            opt.step()
            counter.phase = "zero_grad"
            opt.zero_grad(set_to_none=True)
        phases = {phase: dict(stats) for phase, stats in counter.stats.items()}
        top = {phase: counter.by_op[phase].most_common(6) for phase in counter.by_op}
        results.append(dict(label=label, phases=phases, top=top))
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return dict(kind="train_step_ops", machine=C.machine(), versions=C.versions(),
                config=dict(layers=args.layers, dim=args.dim, ffn=args.ffn, heads=args.heads, vocab=args.vocab,
                            batch=args.batch, seq=args.seq, rank=args.rank, params=n_params), results=results)


def render(report: dict) -> str:
    cfg = report["config"]
    mib = 2 ** 20
    header = ["optimizer", "phase", "device ops", "bytes read + written", "dtype conversions (bytes)",
              "fresh outputs (bytes)"]
    rows = []
    for r in report["results"]:
        for phase in ("forward", "backward", "optimizer"):
            s = r["phases"].get(phase, {})
            rows.append([r["label"], phase, str(s.get("ops", 0)),
                         f"{(s.get('read', 0) + s.get('written', 0)) / mib:.1f} MiB",
                         f"{s.get('conversions', 0)} ({s.get('conversion_bytes', 0) / mib:.1f} MiB)",
                         f"{s.get('allocations', 0)} ({s.get('fresh', 0) / mib:.1f} MiB)"])
    title = (f"One steady training step, bf16 weights, LLaMA topology: {cfg['layers']} blocks, D={cfg['dim']}, "
             f"F={cfg['ffn']}, vocab {cfg['vocab']} ({cfg['params'] / 1e6:.1f}M params), micro-batch "
             f"{cfg['batch']}×{cfg['seq']}, rank {cfg['rank']}")
    lines = [title, "", C.markdown_table(header, rows), ""]
    for r in report["results"]:
        top = ", ".join(f"{name} {b / mib:.1f} MiB" for name, b in r["top"].get("optimizer", []))
        lines.append(f"* {r['label']}, optimizer's largest movers: {top}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 blocks: checks that it runs")
    C.add_shape_arguments(parser, layers=24, dim=256, ffn=683, heads=4, rank=64, threads=2)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers = 2
    return C.run_and_report(args, run, render)


if __name__ == "__main__":
    main()
