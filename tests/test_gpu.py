"""CUDA paths (batched refresh, fused low-rank update, multi-tensor step) agree with the reference paths.

Skipped without a GPU; on a GPU machine without pytest run it as ``PYTHONPATH=src python tests/test_gpu.py``.
"""

import pytest
import torch

import galore_mini as gm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(device, cls, proj_dtype, steps=6, **kwargs):
    gen = torch.Generator().manual_seed(0)
    shapes = [(96, 64), (96, 64), (64, 160)]
    weights = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    # one projector window: cuSOLVER and LAPACK may return singular vectors of opposite sign, which
    # cancels inside a window (P and M flip together) but not across refreshes with moment_policy="keep"
    opt = cls([{"params": weights, "rank": 8, "update_proj_gap": 100, "proj_method": "svd",
                "proj_dtype": proj_dtype, **({"block": "rows"} if cls is gm.GaLoreMini else {})}],
              lr=1e-2, weight_decay=0.1, **kwargs)
    for step_grads in grads:
        for w, g in zip(weights, step_grads):
            w.grad = g.to(device)
        opt.step()
    return [w.detach().cpu() for w in weights]


@pytest.mark.parametrize("cls", [gm.GaLoreMini, gm.GaLoreAdamW])
@pytest.mark.parametrize("proj_dtype", ["float32", "bf16"])
def test_cuda_matches_cpu(cls, proj_dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = _run("cpu", cls, proj_dtype), _run("cuda", cls, proj_dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if proj_dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("proj_dtype", ["float32", "bf16"])
def test_cuda_multi_tensor_matches_single_tensor(proj_dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    fast = _run("cuda", gm.GaLoreMini, proj_dtype, foreach=True)
    reference = _run("cuda", gm.GaLoreMini, proj_dtype, foreach=False)
    for a, b in zip(reference, fast):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_cuda_layerwise_buckets_match_ordinary_step():
    from conftest import batches, tiny_llama

    torch.backends.cuda.matmul.allow_tf32 = False
    data = batches(vocab=128, n=3, batch=2, seq=12)
    models = [tiny_llama().cuda() for _ in range(2)]
    opts = [gm.create_optimizer(m, "galore_mini", lr=1e-2, rank=4, update_proj_gap=2) for m in models]
    handle = gm.layerwise(models[1], opts[1], bucket_bytes=4096)
    for ids in data:
        ids = ids.cuda()
        models[0](input_ids=ids, labels=ids).loss.backward()
        opts[0].step()
        opts[0].zero_grad(set_to_none=True)
        models[1](input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    try:
        test_cuda_layerwise_buckets_match_ordinary_step()
        print("ok layer-wise buckets")
    except AssertionError as exc:
        print("FAIL layer-wise buckets", str(exc).splitlines()[:4])
    for proj_dtype in ("float32", "bf16"):
        try:
            test_cuda_multi_tensor_matches_single_tensor(proj_dtype)
            print("ok multi-tensor", proj_dtype)
        except AssertionError as exc:
            print("FAIL multi-tensor", proj_dtype, str(exc).splitlines()[:4])
    for cls in (gm.GaLoreMini, gm.GaLoreAdamW):
        for proj_dtype in ("float32", "bf16"):
            try:
                test_cuda_matches_cpu(cls, proj_dtype)
                print("ok", cls.__name__, proj_dtype)
            except AssertionError as exc:
                print("FAIL", cls.__name__, proj_dtype, str(exc).splitlines()[:4])
    from galore_mini.optim import primitives as core

    print("fused bf16 addmm available:", core._CUDA_OUT_DTYPE_ADDMM[0])
