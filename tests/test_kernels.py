"""The fast TopK encoder/decoder paths against the plain dense formula and hand-written loops, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae import kernels
from mlsae.errors import MlsaeError
from mlsae.kernels import resolve_impl, sparse_decode, topk_encode

# (N, d, n_latents, k); the first has a single row, the last has many rows sharing latents.
SHAPES = [(1, 4, 6, 2), (17, 8, 32, 4), (64, 24, 300, 16), (200, 33, 1000, 32), (300, 16, 40, 8)]
F32 = dict(rtol=1e-4, atol=1e-4)


def make_sae(N, d, n, k, seed, dtype=torch.float32, shift=1.0):
    """Random SAE whose pre-activations are ~N(-shift, 1.4): many rows have some negative top values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    W_enc = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    b_enc = torch.randn(n, generator=g, dtype=dtype) - shift
    W_dec = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    b_pre = torch.randn(d, generator=g, dtype=dtype) * 0.1
    return dict(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_pre=b_pre)


def leaves(p):
    return {name: t.clone().requires_grad_() for name, t in p.items()}


def canon(acts, idx):
    """Sort each row by latent index: TopK's order within a row is unspecified."""
    idx_sorted, order = idx.sort(dim=1)
    return acts.gather(1, order), idx_sorted


def run_sae(p, k, impl, w_act):
    """Forward the SAE, backward a loss that reaches top_acts both through the decoder and directly."""
    q = leaves(p)
    acts, idx, pre = topk_encode(q["x"] - q["b_pre"], q["W_enc"], q["b_enc"], k, impl=impl)
    x_hat = sparse_decode(acts, idx, q["W_dec"], impl=impl) + q["b_pre"]
    loss = (x_hat - p["x"]).pow(2).sum() + (acts * w_act.gather(1, idx)).sum()
    loss.backward()
    return acts, idx, pre, x_hat, {name: t.grad for name, t in q.items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_matches_dense(shape, seed):
    N, d, n, k = shape
    p = make_sae(N, d, n, k, seed)
    w_act = torch.randn(N, n, generator=torch.Generator().manual_seed(seed + 100))
    a_s, i_s, pre_s, xh_s, g_s = run_sae(p, k, "sparse", w_act)
    a_d, i_d, pre_d, xh_d, g_d = run_sae(p, k, "dense", w_act)
    assert i_s.dtype == torch.int64 and a_s.shape == (N, k) and pre_s.shape == (N, n)
    assert not pre_s.requires_grad and not pre_d.requires_grad
    a_s, i_s = canon(a_s, i_s)
    a_d, i_d = canon(a_d, i_d)
    torch.testing.assert_close(i_s, i_d, rtol=0, atol=0)
    torch.testing.assert_close(a_s, a_d, rtol=0, atol=0)
    torch.testing.assert_close(pre_s, pre_d)
    torch.testing.assert_close(xh_s, xh_d, **F32)
    for name in ("x", "W_enc", "b_enc", "W_dec", "b_pre"):
        assert g_s[name] is not None, name
        torch.testing.assert_close(g_s[name], g_d[name], **F32, msg=lambda m, name=name: f"grad {name}: {m}")


def hand_sae(p, k, w_out, w_act):
    """The SAE and the gradients of L = sum(w_out * x_hat) + sum(w_act * h), with explicit loops in numpy."""
    x, W_enc, b_enc, W_dec = (p[name].numpy() for name in ("x", "W_enc", "b_enc", "W_dec"))
    N, d = x.shape
    n = W_enc.shape[0]
    pre = np.zeros((N, n))
    for r in range(N):
        for i in range(n):
            pre[r, i] = sum(x[r, c] * W_enc[i, c] for c in range(d)) + b_enc[i]
    idx = np.sort(np.argsort(-pre, axis=1, kind="stable")[:, :k], axis=1)
    acts = np.maximum(np.take_along_axis(pre, idx, axis=1), 0.0)
    x_hat = np.zeros((N, d))
    gx, gWe, gbe, gWd, gacts = np.zeros_like(x), np.zeros_like(W_enc), np.zeros_like(b_enc), np.zeros_like(W_dec), np.zeros((N, k))
    for r in range(N):
        for j in range(k):
            i = idx[r, j]
            x_hat[r] += acts[r, j] * W_dec[i]
            gWd[i] += acts[r, j] * w_out[r]
            gacts[r, j] = w_act[r, j] + sum(w_out[r, c] * W_dec[i, c] for c in range(d))
            g = gacts[r, j] if pre[r, i] > 0 else 0.0  # ReLU after TopK
            gx[r] += g * W_enc[i]
            gWe[i] += g * x[r]
            gbe[i] += g
    return dict(pre=pre, idx=idx, acts=acts, x_hat=x_hat, x=gx, W_enc=gWe, b_enc=gbe, W_dec=gWd)


@pytest.mark.parametrize("impl", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_hand_loops(impl, dtype):
    N, d, n, k = 6, 5, 9, 4
    p = make_sae(N, d, n, k, seed=7, dtype=dtype)
    w_out = np.random.default_rng(0).standard_normal((N, d))
    w_act = np.random.default_rng(1).standard_normal((N, k))
    ref = hand_sae(p, k, w_out, w_act)
    assert (ref["acts"] == 0).any() and (ref["acts"] > 0).any(), "the case must exercise the ReLU"
    q = leaves({name: p[name] for name in ("x", "W_enc", "b_enc", "W_dec")})
    acts, idx, pre = topk_encode(q["x"], q["W_enc"], q["b_enc"], k, impl=impl)
    acts, idx = canon(acts, idx)
    x_hat = sparse_decode(acts, idx, q["W_dec"], impl=impl)
    (x_hat * torch.tensor(w_out, dtype=dtype)).sum().add((acts * torch.tensor(w_act, dtype=dtype)).sum()).backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, torch.from_numpy(ref["idx"]))
    for name, got in [("pre", pre), ("acts", acts), ("x_hat", x_hat)] + [(m, q[m].grad) for m in ("x", "W_enc", "b_enc", "W_dec")]:
        torch.testing.assert_close(got, torch.tensor(ref[name], dtype=dtype), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_clipped_latents_pass_no_gradient(impl):
    """Upstream gradient only on top entries that ReLU zeroed: nothing may reach x, W_enc or b_enc."""
    p = make_sae(40, 8, 30, 6, seed=3, shift=2.0)
    q = leaves({name: p[name] for name in ("x", "W_enc", "b_enc")})
    acts, idx, _ = topk_encode(q["x"], q["W_enc"], q["b_enc"], 6, impl=impl)
    clipped = acts == 0
    assert clipped.any() and not clipped.all()
    (acts * clipped * 3.0).sum().backward()
    for name, t in q.items():
        assert torch.count_nonzero(t.grad) == 0, name
    # And the complementary loss does reach every input.
    q2 = leaves({name: p[name] for name in ("x", "W_enc", "b_enc")})
    acts, idx, _ = topk_encode(q2["x"], q2["W_enc"], q2["b_enc"], 6, impl=impl)
    (acts * ~clipped).sum().backward()
    for name, t in q2.items():
        assert torch.count_nonzero(t.grad) > 0, name


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_matches_dense_with_repeated_indices(seed):
    """Arbitrary indices: many rows share latents and a row may name one latent twice (both impls sum them)."""
    g = torch.Generator().manual_seed(seed)
    N, d, n, k = 50, 12, 10, 7
    idx = torch.randint(0, n, (N, k), generator=g)
    idx[:, 1] = idx[:, 0]  # a repeat inside every row
    idx[:, 2] = 3  # one latent used by every row
    acts = torch.rand(N, k, generator=g)
    W_dec = torch.randn(n, d, generator=g)
    up = torch.randn(N, d, generator=g)
    out, grads = {}, {}
    for impl in ("sparse", "dense"):
        a, W = acts.clone().requires_grad_(), W_dec.clone().requires_grad_()
        out[impl] = sparse_decode(a, idx, W, impl=impl)
        (out[impl] * up).sum().backward()
        grads[impl] = (a.grad, W.grad)
    direct = sum(acts[:, j, None] * W_dec[idx[:, j]] for j in range(k))
    torch.testing.assert_close(out["sparse"], direct, **F32)
    torch.testing.assert_close(out["dense"], direct, **F32)
    torch.testing.assert_close(grads["sparse"][0], grads["dense"][0], **F32)
    torch.testing.assert_close(grads["sparse"][1], grads["dense"][1], **F32)
    torch.testing.assert_close(grads["sparse"][0], (up[:, None, :] * W_dec[idx]).sum(-1), **F32)


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_k_equals_n_latents(impl):
    N, d, n = 25, 6, 11
    p = make_sae(N, d, n, n, seed=5)
    up = torch.randn(N, n, generator=torch.Generator().manual_seed(9))
    q = leaves({name: p[name] for name in ("x", "W_enc", "b_enc")})
    acts, idx, pre = topk_encode(q["x"], q["W_enc"], q["b_enc"], n, impl=impl)
    acts, idx = canon(acts, idx)
    assert torch.equal(idx, torch.arange(n).expand(N, n))
    torch.testing.assert_close(acts, pre.clamp(min=0), rtol=0, atol=0)
    (acts * up).sum().backward()
    g = up * (pre > 0)
    torch.testing.assert_close(q["b_enc"].grad, g.sum(0), **F32)
    torch.testing.assert_close(q["W_enc"].grad, g.T @ p["x"], **F32)
    torch.testing.assert_close(q["x"].grad, g @ p["W_enc"], **F32)


def test_gradcheck_float64():
    """Finite differences, independent of any formula of ours."""
    p = make_sae(7, 5, 12, 4, seed=11, dtype=torch.float64, shift=0.5)
    q = leaves({name: p[name] for name in ("x", "W_enc", "b_enc", "W_dec")})
    assert torch.autograd.gradcheck(lambda x, W, b: topk_encode(x, W, b, 4)[0], (q["x"], q["W_enc"], q["b_enc"]))
    acts, idx, _ = topk_encode(p["x"], p["W_enc"], p["b_enc"], 4)
    a = acts.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, W: sparse_decode(a, idx, W), (a, q["W_dec"]))


def test_only_weights_require_grad_and_no_grad_mode():
    """The trainer may feed data that does not require grad, or run the encoder under no_grad."""
    p = make_sae(30, 8, 50, 5, seed=4)
    res = {}
    for impl in ("sparse", "dense"):
        W, b = p["W_enc"].clone().requires_grad_(), p["b_enc"].clone().requires_grad_()
        acts, idx, _ = topk_encode(p["x"], W, b, 5, impl=impl)
        acts.pow(2).sum().backward()
        res[impl] = (W.grad, b.grad)
        with torch.no_grad():
            a2, i2, _ = topk_encode(p["x"], W, b, 5, impl=impl)
        assert not a2.requires_grad and torch.equal(a2, acts.detach()) and torch.equal(i2, idx)
    torch.testing.assert_close(res["sparse"][0], res["dense"][0], **F32)
    torch.testing.assert_close(res["sparse"][1], res["dense"][1], **F32)


def _largest_allocation(impl, N=256, d=16, n=4096, k=8):
    p = make_sae(N, d, n, k, seed=0)
    q = leaves({name: p[name] for name in ("x", "W_enc", "b_enc", "W_dec")})
    acts, idx, pre = topk_encode(q["x"], q["W_enc"], q["b_enc"], k, impl=impl)
    loss = sparse_decode(acts, idx, q["W_dec"], impl=impl).pow(2).sum()
    acts_ = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[acts_], profile_memory=True) as prof:
        loss.backward()
    return max(e.cpu_memory_usage for e in prof.events()), N * n * 4


def test_sparse_backward_never_allocates_n_by_latents():
    biggest, dense_bytes = _largest_allocation("sparse")
    assert biggest < dense_bytes // 4, f"sparse backward allocated {biggest} bytes (an [N, n_latents] grad is {dense_bytes})"
    biggest, dense_bytes = _largest_allocation("dense")
    assert biggest >= dense_bytes  # the probe does see a dense gradient when there is one


def test_resolve_impl(record_property, capsys):
    # which path "auto" picks depends on the platform: reported, not asserted
    with capsys.disabled():
        print(f"\n[kernel path chosen at import on this platform: {kernels.FAST_IMPL}]")
    record_property("fast_impl", kernels.FAST_IMPL)
    assert resolve_impl("auto") == kernels.FAST_IMPL and kernels.FAST_IMPL in kernels.IMPLS
    assert resolve_impl("sparse") == "sparse" and resolve_impl("dense") == "dense"
    with pytest.raises(MlsaeError) as err:
        resolve_impl("triton-ish")
    msg = str(err.value)
    assert "'triton-ish'" in msg and all(name in msg for name in ("auto", "sparse", "dense")) and "\n" not in msg
    p = make_sae(3, 4, 6, 2, seed=0)
    with pytest.raises(MlsaeError, match="bogus"):
        topk_encode(p["x"], p["W_enc"], p["b_enc"], 2, impl="bogus")
    with pytest.raises(MlsaeError, match="bogus"):
        sparse_decode(torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64), p["W_dec"], impl="bogus")
    with pytest.raises(MlsaeError, match="k=7"):
        topk_encode(p["x"], p["W_enc"], p["b_enc"], 7)
    with pytest.raises(MlsaeError, match=r"\[N, 4\]"):
        topk_encode(p["x"][:, :3], p["W_enc"], p["b_enc"], 2)


@pytest.mark.parametrize("keep_pre", [True, False])
def test_the_encoder_in_row_blocks_equals_one_pass(monkeypatch, keep_pre):
    """Above ROW_BLOCK rows the sparse encoder codes block by block: the same codes, values and gradients."""
    import mlsae.kernels as kernels

    p = make_sae(50, 8, 40, 5, seed=12)
    outs = {}
    for block in (1024, 16):  # one pass; blocks of 16 rows, the last one shorter
        monkeypatch.setattr(kernels, "ROW_BLOCK", block)
        q = leaves({name: p[name] for name in ("x", "W_enc", "b_enc", "W_dec")})
        acts, idx, pre = topk_encode(q["x"], q["W_enc"], q["b_enc"], 5, impl="sparse", keep_pre=keep_pre)
        sparse_decode(acts, idx, q["W_dec"]).pow(2).sum().backward()
        outs[block] = (acts, idx, pre, q["x"].grad, q["W_enc"].grad, q["b_enc"].grad, q["W_dec"].grad)
    (a_acts, a_idx, a_pre, *a_grads), (b_acts, b_idx, b_pre, *b_grads) = outs[1024], outs[16]
    assert torch.equal(a_idx, b_idx) and a_acts.abs().sum() > 0
    assert (a_pre is None and b_pre is None) if not keep_pre else torch.allclose(a_pre, b_pre, rtol=1e-6, atol=1e-6)
    for a, b in zip([a_acts, *a_grads], [b_acts, *b_grads]):  # a matmul of fewer rows may round differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_sparse_path_matches_the_fp32_formula_to_bf16_precision():
    """The encoder's matmul runs in bf16 (the codes come out bf16), the decode and every gradient
    stay fp32, and the result is the fp32 formula's at the same latents to bf16's precision."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    W = (torch.randn(96, 32) / 32**0.5).requires_grad_()
    b = torch.zeros(96, requires_grad=True)
    D = torch.randn(96, 32, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        acts, idx, _ = topk_encode(x, W, b, 8, "sparse", keep_pre=False)
        x_hat = sparse_decode(acts, idx, D, "sparse")
    assert acts.dtype == torch.bfloat16 and x_hat.dtype == torch.float32
    x_hat.pow(2).sum().backward()
    grads = [t.grad.clone() for t in (W, D)]
    assert all(g.dtype == torch.float32 for g in grads)
    for t in (W, b, D):
        t.grad = None
    pre = x @ W.T + b
    assert (idx.sort(1).values == pre.topk(8, dim=1).indices.sort(1).values).float().mean() > 0.9  # bf16 may swap near-ties
    vals = pre.gather(1, idx).relu()  # the fp32 formula at the latents bf16 chose
    ref = (vals[:, :, None] * D[idx]).sum(1)
    ref.pow(2).sum().backward()
    assert torch.allclose(acts.float(), vals, rtol=2e-2, atol=2e-2)
    assert (x_hat - ref).norm() / ref.norm() < 1e-2
    assert not torch.equal(x_hat, ref)  # the matmul really ran in bf16
    for got, want in zip(grads, (W.grad, D.grad)):
        assert (got - want).norm() / want.norm() < 2e-2


TRITON_CHECK = """
import torch
from mlsae.kernels import sparse_decode, topk_encode
dev = {device!r}
torch.manual_seed(0)
x = torch.randn(50, 40, device=dev)
W = (torch.randn(70, 40, device=dev) / 40**0.5)
D = torch.randn(70, 40, device=dev)
b = torch.randn(70, device=dev) * 0.1
out = {{}}
for impl in ("triton", "dense"):
    ts = [t.clone().requires_grad_() for t in (x, W, b, D)]
    acts, idx, _ = topk_encode(ts[0], ts[1], ts[2], 6, impl, keep_pre=False)
    x_hat = sparse_decode(acts, idx, ts[3], impl)
    (x_hat.pow(2).sum() + acts.pow(3).sum()).backward()
    order = idx.argsort(1)
    out[impl] = [idx.gather(1, order), acts.gather(1, order), x_hat] + [t.grad for t in ts]
names = ["idx", "acts", "x_hat", "grad x", "grad W_enc", "grad b_enc", "grad W_dec"]
for name, a, b_ in zip(names, out["triton"], out["dense"]):
    assert a.shape == b_.shape and torch.allclose(a.float(), b_.float(), rtol=1e-4, atol=1e-4), (name, (a.float() - b_.float()).abs().max())
print("triton == dense:", ", ".join(names))
"""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_triton_kernels_equal_the_dense_formula_values_and_gradients(device):
    """On a GPU the kernels themselves; on the CPU the same kernels through Triton's interpreter
    (TRITON_INTERPRET=1), in a fresh process since the interpreter is chosen at import."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="the triton package is not installed (scripts/setup.sh installs it for this test)")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the kernels are checked on the CPU through Triton's interpreter instead")
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK.format(device=device)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton == dense" in done.stdout


def test_auto_picks_the_gather_path_on_cpu_and_the_environment_overrides_it(monkeypatch):
    assert kernels.impl_for("auto", torch.device("cpu")) == kernels.FAST_IMPL
    monkeypatch.setenv("MLSAE_KERNELS", "dense")
    assert kernels.impl_for("auto", torch.device("cpu")) == "dense"
    monkeypatch.setenv("MLSAE_KERNELS", "fast-please")
    with pytest.raises(MlsaeError, match="kernel impl 'fast-please' is not one of"):
        kernels.impl_for("auto", torch.device("cpu"))
    monkeypatch.delenv("MLSAE_KERNELS")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if kernels._triton is not None:
        with pytest.raises(MlsaeError, match="runs on a GPU"):
            kernels.impl_for("triton", torch.device("cpu"))
