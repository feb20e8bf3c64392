"""Worker for tests/test_memory.py: per-rank bytes of a real FSDP2 (gloo) step, next to the estimate's.

One spawn of 3 processes measures world size 3 on all of them and world size 2 on ranks 0 and 1 (a
sub-mesh), each rank writing what it holds after one optimizer step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import galore_mini as gm

# rows that divide by neither 2 nor 3 (hidden 35, MLP 77, vocab 101, GQA key rows 10 at 3 ranks: 4/4/2),
# and 10-row heads that straddle shard boundaries (q_proj's 50 rows at 3 ranks: 17/17/16)
CONFIG = dict(vocab_size=101, hidden_size=35, intermediate_size=77, num_hidden_layers=2, num_attention_heads=5,
              num_key_value_heads=1, head_dim=10, max_position_embeddings=32, tie_word_embeddings=False)
RANK = 4
CASES = {
    "galore_mini": dict(method="galore_mini"),
    "galore": dict(method="galore"),
    "galore_full": dict(method="galore", proj_type="full"),
    "adam_mini": dict(method="adam_mini"),
    "full": dict(method="full"),
    # every moment 8-bit (the tiny model's are below the default 4096 entries): row-form codes and absmax
    "galore_8bit": dict(method="galore_8bit", min_8bit_size=1),
    "galore_mini_8bit": dict(method="galore_mini_8bit", min_8bit_size=1),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def optimizer_options(case: str) -> dict:
    options = dict(CASES[case])
    method = options.pop("method")
    if gm.methods.get(method).projected:
        options["rank"] = RANK
    return {"method": method, **options}


def held(case: str, mesh) -> dict:
    """This rank's bytes after one step of `case` on a model sharded over `mesh`."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    options = optimizer_options(case)
    opt = gm.create_optimizer(model, options.pop("method"), lr=1e-3, **options)
    x = torch.randint(0, CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(mesh.get_local_rank()))
    model(input_ids=x, labels=x).loss.backward()
    params = list(model.parameters())
    grads = sum(p.grad.to_local().numel() * p.grad.element_size() for p in params)
    # the reduce-scatter outputs the gradients are views of (one buffer per fully_shard unit)
    buffers = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
               for g in (p.grad.to_local() for p in params)}
    opt.step()
    state = sum(v.to_local().numel() * v.element_size() if hasattr(v, "to_local") else v.numel() * v.element_size()
                for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"optimizer_bytes": state,
            "local_weights_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
            # FSDP2 keeps each rank's shard in a buffer padded to rank 0's ⌈m/N⌉ rows
            "weights_bytes": sum(p.to_local().untyped_storage().nbytes() for p in params),
            "local_gradient_bytes": grads, "gradient_bytes": sum(buffers.values())}


def run(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    from fsdp_worker import joined_group

    with joined_group(rank, world, init_file):
        report = {}
        whole = DeviceMesh.from_group(dist.group.WORLD, "cpu")
        report[str(world)] = {case: held(case, whole) for case in CASES}
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        if rank < 2:
            report["2"] = {case: held(case, DeviceMesh.from_group(pair, "cpu")) for case in CASES}
        Path(out, f"held-{rank}.json").write_text(json.dumps(report))


def spawn(out: Path, world: int = 3) -> list[dict]:
    import torch.multiprocessing as mp

    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in env_keys if k in os.environ}
    try:
        mp.spawn(run, args=(world, str(out / "pg"), str(out)), nprocs=world)
    finally:
        os.environ.update(saved)
    return [json.loads((out / f"held-{r}.json").read_text()) for r in range(world)]
