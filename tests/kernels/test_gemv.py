"""Triton skinny GEMM vs `reference.skinny_gemm_reference`; the Linear layer's GEMV dispatch.

CPU: interpreter, fp32, small awkward shapes (one fixed config, no autotuning). GPU
(`@pytest.mark.gpu`): bf16 / fp16, the autotuned path, every config, real decode shapes,
CUDA-graph capture and the worker's `calibrate_gemv`. The dispatch choice lives on each
Linear module (`gemv_rows`, `kernel_options`), so no test can leak it into another.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels import gemv, reference
from nanovllm.kernels.gemv import GEMV_MAX_M, skinny_gemm
from nanovllm.layers.kernel_options import KernelOptions, configure_kernels
from nanovllm.layers.linear import GateUpLinear, Linear, LMHead, QKVLinear, gemv_rows, set_gemv_rows
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.norm_linear import RMSNormLinear, SiluMulLinear
from nanovllm.worker import gemv_calibration

from kernel_params import DEVICE, GPU, HAS_CUDA, PRECISIONS

SHAPES = [(96, 64), (130, 200), (64, 1000)]  # (N, K): N not a multiple of BLOCK_N, K with a tail chunk


def gpu_only(fn):
    for mark in reversed(GPU):
        fn = mark(fn)
    return fn


def rand(*shape, dtype, seed, scale=1.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def operands(m, n, k, dtype, bias, seed=0, device=DEVICE):
    x = rand(m, k, dtype=dtype, seed=seed, device=device)
    w = rand(n, k, dtype=dtype, seed=seed + 1, scale=k**-0.5, device=device)  # outputs O(1)
    b = rand(n, dtype=dtype, seed=seed + 2, device=device) if bias else None
    return x, w, b


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:  # fp32 sums in another order, then one rounding to 16 bits: at most ~1 ulp apart
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)


CPU_HOOK = KernelOptions(gemv_on_cpu=not HAS_CUDA)  # without a GPU the kernel serves CPU tensors (interpreter)


def enable(module, rows, options=CPU_HOOK):
    """The GEMV choice the worker would make: `rows` {(N, K, dtype): row limit} on `module`'s
    Linears (an iterable of shapes: GEMV_MAX_M rows each), `options` on all of its layers."""
    if not isinstance(rows, dict):
        rows = {shape: GEMV_MAX_M for shape in rows}
    configure_kernels(module, options)
    set_gemv_rows(module, rows)


@pytest.fixture
def spy(monkeypatch):
    """Count calls of gemv.skinny_gemm (which the Linear dispatch looks up on the module)."""
    calls = []
    original = gemv.skinny_gemm

    def wrapped(x, weight, bias=None, **kw):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return original(x, weight, bias, **kw)

    monkeypatch.setattr(gemv, "skinny_gemm", wrapped)
    return calls


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_skinny_gemm_matches_reference(m, n, k, bias, dtype):
    x, w, b = operands(m, n, k, dtype, bias, seed=m + n)
    check(skinny_gemm(x, w, b), reference.skinny_gemm_reference(x, w, b))


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("config", gemv.CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("m", [1, 5])
def test_every_autotune_config_matches_reference(m, config, dtype):
    x, w, b = operands(m, 130, 1000, dtype, bias=True, seed=7)
    check(skinny_gemm(x, w, b, config=config), reference.skinny_gemm_reference(x, w, b))


def test_strided_rows_out_buffer_and_edge_cases():
    n, k = 40, 72
    buf = rand(3, 2 * k, dtype=torch.float32, seed=1)
    x = buf[:, 10 : 10 + k]  # row stride 2k: used in place
    w = rand(n, k, dtype=torch.float32, seed=2)
    out = torch.full((3, n), float("nan"), device=DEVICE)
    assert skinny_gemm(x, w, out=out) is out
    check(out, reference.skinny_gemm_reference(x, w, None))
    xt = rand(k, 2, dtype=torch.float32, seed=3).t()  # [2, k] with column stride 2: copied
    check(skinny_gemm(xt, w), reference.skinny_gemm_reference(xt, w, None))
    assert skinny_gemm(x[:0], w).shape == (0, n)
    with pytest.raises(ValueError, match="at most"):
        skinny_gemm(rand(GEMV_MAX_M + 1, k, dtype=torch.float32, seed=4), w)
    with pytest.raises(ValueError):
        skinny_gemm(x, w[:, :-1])  # K mismatch
    with pytest.raises(ValueError, match="unit stride"):
        skinny_gemm(x, rand(k, n, dtype=torch.float32, seed=5).t())  # transposed weight: no silent copy
    with pytest.raises(ValueError):
        skinny_gemm(x, w, rand(n + 1, dtype=torch.float32, seed=6))


# ----------------------------------------------------------------------------- prologues


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_rms_norm_prologue_matches_reference(m, n, k, with_residual, dtype):
    x, w, b = operands(m, n, k, dtype, bias=m == 3, seed=m + k)
    residual = rand(m, k, dtype=dtype, seed=11) if with_residual else None
    norm_w = rand(k, dtype=dtype, seed=12, scale=0.2) + 1
    got, new_res = gemv.rms_norm_skinny_gemm(x, residual, norm_w, 1e-6, w, b)
    ref, ref_res = reference.rms_norm_skinny_gemm_reference(x, residual, norm_w, 1e-6, w, b)
    check(got, ref)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)  # the same rounding of x + residual
    if residual is None:
        assert new_res is x
    # and it is the unfused norm + GEMM up to the rounding of the normalised x
    h, _ = reference.fused_add_rms_norm(x, residual, norm_w, 1e-6) if with_residual else \
        (reference.rms_norm(x, norm_w, 1e-6), None)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), reference.skinny_gemm_reference(h, w, b).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 5])
def test_silu_mul_prologue_matches_reference(m, n, k, dtype):
    x = rand(m, 2 * k, dtype=dtype, seed=k, scale=2.0)  # [gate | up]
    _, w, b = operands(m, n, k, dtype, bias=m == 5, seed=n)
    check(gemv.silu_mul_skinny_gemm(x, w, b), reference.silu_mul_skinny_gemm_reference(x, w, b))


def test_prologue_argument_errors():
    x, w, _ = operands(2, 40, 72, torch.float32, bias=False)
    norm_w = torch.ones(72, device=DEVICE)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv.rms_norm_skinny_gemm(x, None, norm_w[:-1], 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        gemv.rms_norm_skinny_gemm(x, x[:1], norm_w, 1e-6, w)
    with pytest.raises(ValueError, match="odd"):
        gemv.silu_mul_skinny_gemm(x[:, :71], w)
    with pytest.raises(ValueError, match="weight"):
        gemv.silu_mul_skinny_gemm(x, w)  # x is [M, 2K] for K = 36, the weight has K = 72


# ----------------------------------------------------------------------------- Linear dispatch


def _linear(n, k, dtype=torch.float32, bias=True, device=DEVICE):
    layer = Linear(k, n, bias=bias).to(device, dtype)
    with torch.no_grad():
        layer.weight.copy_(rand(n, k, dtype=dtype, seed=n, scale=k**-0.5, device=device))
        if bias:
            layer.bias.copy_(rand(n, dtype=dtype, seed=k, device=device))
    return layer


@torch.inference_mode()
def test_linear_uses_gemv_only_for_enabled_shapes(spy):
    layer, other = _linear(130, 200), _linear(96, 64, bias=False)
    model = torch.nn.ModuleList([layer, other])
    assert gemv_rows(model) == {}  # default: cuBLAS everywhere
    x = rand(2, 3, 200, dtype=torch.float32, seed=1)  # 6 rows after flattening
    expected = F.linear(x, layer.weight, layer.bias)
    check(layer(x), expected)
    assert spy == []

    enable(model, {(130, 200, torch.float32)})
    got = layer(x)
    assert spy == [((6, 200), (130, 200))]
    assert got.shape == (2, 3, 130)
    check(got, expected)
    check(layer(x[0, 0]), expected[0, 0])  # a 1-D input: one row
    assert len(spy) == 2

    other(rand(1, 64, dtype=torch.float32, seed=2))  # shape not enabled
    layer(rand(GEMV_MAX_M + 1, 200, dtype=torch.float32, seed=3))  # too many rows
    assert len(spy) == 2

    enable(model, {(130, 200, torch.float32): 4})
    layer(rand(5, 200, dtype=torch.float32, seed=4))  # above this shape's row limit
    assert len(spy) == 2
    layer(rand(4, 200, dtype=torch.float32, seed=5))
    assert len(spy) == 3

    # a row limit per shape (calibration found the kernel faster only up to 2 rows)
    enable(model, {(130, 200, torch.float32): 2})
    assert gemv_rows(model) == {(130, 200, torch.float32): 2}
    layer(rand(3, 200, dtype=torch.float32, seed=4))
    assert len(spy) == 3
    check(layer(x[0, :2]), expected[0, :2])
    assert len(spy) == 4

    enable(model, {(130, 200, torch.bfloat16)})  # other dtype
    layer(rand(1, 200, dtype=torch.float32, seed=6))
    enable(model, {})
    layer(rand(1, 200, dtype=torch.float32, seed=6))
    assert len(spy) == 4
    enable(model, {(130, 200, torch.float32): 100})  # capped at what the kernel handles
    assert gemv_rows(model) == {(130, 200, torch.float32): GEMV_MAX_M}


@torch.inference_mode()
def test_packed_and_lm_head_layers_dispatch(spy):
    qkv = QKVLinear(hidden=64, head_dim=16, num_heads=4, num_kv_heads=2, bias=True).to(DEVICE)  # [128, 64]
    gate_up = GateUpLinear(64, 48).to(DEVICE)  # [96, 64]
    head = LMHead(64, 130).to(DEVICE)
    for layer in (qkv, gate_up, head):
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(rand(*p.shape, dtype=torch.float32, seed=p.numel(), scale=0.125))
    x = rand(7, 64, dtype=torch.float32, seed=9)
    idx = torch.tensor([1, 4, 6], device=DEVICE)
    expected = [qkv(x), gate_up(x), head(x, idx)]
    enable(torch.nn.ModuleList([qkv, gate_up, head]),
           {(128, 64, torch.float32), (96, 64, torch.float32), (130, 64, torch.float32)})
    for got, want in zip([qkv(x), gate_up(x), head(x, idx)], expected):
        check(got, want)
    assert spy == [((7, 64), (128, 64)), ((7, 64), (96, 64)), ((3, 64), (130, 64))]


def test_no_dispatch_for_cpu_tensors_without_the_hook_or_with_autograd(spy):
    layer = _linear(96, 64, device="cpu")
    x = rand(1, 64, dtype=torch.float32, seed=1, device="cpu")
    enable(layer, {(96, 64, torch.float32)}, KernelOptions())  # no CPU hook: CUDA only
    with torch.inference_mode():
        layer(x)
    assert spy == []
    enable(layer, {(96, 64, torch.float32)}, KernelOptions(gemv_on_cpu=True))
    y = layer(x)  # grad mode, weight requires grad: the kernel has no backward
    assert spy == [] and y.requires_grad
    with torch.no_grad():
        layer(x)
    assert len(spy) == 1


@torch.inference_mode()
def test_two_models_keep_their_own_dispatch(spy):
    """The choice is per module: enabling the kernel on one model leaves another (same shapes) on cuBLAS."""
    a, b = _linear(96, 64), _linear(96, 64)
    enable(a, {(96, 64, torch.float32)})
    x = rand(1, 64, dtype=torch.float32, seed=3)
    b(x)
    assert spy == [] and gemv_rows(b) == {} and b.kernel_options == KernelOptions()
    a(x)
    assert len(spy) == 1


def test_row_limit_stops_at_the_first_loss_and_triton_must_win_clearly():
    row_limit = gemv_calibration.row_limit
    ms = [1, 2, 4, 8]
    # Qwen3-8B on an H200: gate_up (norm included) a near tie -> cuBLAS; qkv a clear win at M=1
    assert row_limit(ms, [53.7, 54.1, 54.7, 59.0], [53.5, 64.0, 94.8, 194.2]) == 0
    assert row_limit(ms, [18.0, 18.2, 18.4, 18.4], [16.0, 18.7, 26.2, 51.7]) == 1
    assert row_limit(ms, [10.0] * 4, [9.0, 9.5, 11.0, 5.0]) == 2  # a later win past a loss does not count
    assert row_limit(ms, [10.0] * 4, [10.0, 9.0, 9.0, 9.0]) == 0  # a tie is not a win
    assert row_limit(ms, [10.0] * 4, [10.0] * 4, margin=0.0) == 8  # margin 0: ties go to Triton
    assert row_limit(ms, [10.0] * 4, [10.4] * 4, margin=0.05) == 8
    assert row_limit(ms, [10.0] * 4, [12.0] * 4) == 0


def test_calibrate_is_a_no_op_off_cuda():
    model = torch.nn.Sequential(_linear(96, 64, device="cpu"))
    assert gemv_calibration.calibrate_gemv(model, "cpu") == {}
    assert gemv_calibration.calibrate_gemv(model, "cpu", mode="force") == {}
    assert gemv_rows(model) == {}


def test_prune_keeps_register_budget_and_never_empties():
    import triton

    configs = [triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, num_warps=c.num_warps)
               for c in gemv.CONFIGS]
    assert gemv._prune_configs(configs, {"K": 4096}, BLOCK_M=1, VEC=8) == configs
    kept = gemv._prune_configs(configs, {"K": 4096}, BLOCK_M=8, VEC=8)
    assert kept and all(8 * c.kwargs["BLOCK_N"] * max(1, c.kwargs["BLOCK_K"] // (256 * c.num_warps)) <= 32
                        for c in kept)
    assert all(c.kwargs["BLOCK_K"] <= 1024 for c in gemv._prune_configs(configs, {"K": 1024}, BLOCK_M=1, VEC=8))
    assert len(gemv._prune_configs(configs, {"K": 8}, BLOCK_M=8, VEC=4)) == 1  # nothing fits: the smallest


def test_rotation_copies_cover_l2():
    l2 = 50 * 2**20
    assert gemv.rotation_copies(4 * 2**20, l2) == 25  # 4 MB weight: 100 MB rotation
    assert gemv.rotation_copies(300 * 2**20, l2) == 1  # bigger than L2: one copy
    assert gemv.rotation_copies(1024, l2) == gemv.MAX_ROTATE_COPIES


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (6144, 1024), (1000, 2056)])
@pytest.mark.parametrize("m", [1, 3, 8])
@gpu_only
def test_autotuned_decode_shapes_on_gpu(m, n, k, dtype):
    x, w, b = operands(m, n, k, dtype, bias=n == 1000, seed=m)
    check(skinny_gemm(x, w, b), reference.skinny_gemm_reference(x, w, b))
    assert gemv.best_config(m, n, k) is not None


@gpu_only
@torch.inference_mode()
def test_cuda_graph_capture_and_untuned_fallback(spy):
    layer = _linear(136, 72, dtype=torch.bfloat16, bias=False)
    x = rand(2, 72, dtype=torch.bfloat16, seed=1)
    expected = F.linear(x, layer.weight)
    enable(layer, {(136, 72, torch.bfloat16)}, KernelOptions())
    # Never run at M=2 for this shape: inside the capture it falls back to cuBLAS (no tuning).
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    check(y, expected)
    gemv.warm_up(layer.weight, None)  # tunes every row bucket
    spy.clear()  # drop warm_up's own calls
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(rand(2, 72, dtype=torch.bfloat16, seed=2))
    graph.replay()
    torch.cuda.synchronize()
    check(y, F.linear(x, layer.weight))
    assert len(spy) == 1  # the second capture launched the kernel


class _TinyModel(torch.nn.Module):
    """The projections of a decoder layer and an LM head; qkv and gate_up behind an RMSNorm."""

    def __init__(self):
        super().__init__()
        self.projections = torch.nn.ModuleDict(dict(
            qkv=QKVLinear(hidden=256, head_dim=64, num_heads=4, num_kv_heads=2, bias=True),  # [512, 256]
            o=Linear(256, 256), gate_up=GateUpLinear(256, 384), down=Linear(384, 256), head=LMHead(256, 1000),
        ))
        self.norms = torch.nn.ModuleList([RMSNorm(256), RMSNorm(256)])
        self.qkv_in = RMSNormLinear(self.norms[0], self.projections["qkv"])
        self.gate_up_in = RMSNormLinear(self.norms[1], self.projections["gate_up"])


def _tiny_model():
    torch.manual_seed(0)
    model = _TinyModel().to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in model.projections.parameters():
            p.normal_(0, 0.05)
    return model


def _outputs(model, xs):
    return [{name: layer(x) for name, layer in model.projections.items() if layer.in_features == x.shape[-1]}
            for x in xs]


@gpu_only
@torch.inference_mode()
def test_calibrate_gemv_on_a_tiny_model(spy):
    model = _tiny_model()
    xs = [rand(m, k, dtype=torch.bfloat16, seed=m + k) for m in (1, 4, 8) for k in (256, 384)]
    before = _outputs(model, xs)
    shapes = {(512, 256), (256, 256), (768, 256), (256, 384), (1000, 256)}
    # qkv and gate_up run after the decoder's RMSNorm: calibrated with the norm on both paths
    weights = gemv_calibration.linear_weights(model)
    assert {(n, k) for (n, k, _), (_, _, after_norm) in weights.items() if after_norm} == {(512, 256), (768, 256)}

    assert gemv_calibration.calibrate_gemv(model, "cuda", mode="off") == {}
    assert gemv_rows(model) == {}

    result = gemv_calibration.calibrate_gemv(model, "cuda")
    assert {(n, k) for n, k, _ in result} == shapes and all(d == torch.bfloat16 for *_, d in result)
    for cublas_us, triton_us, row_limit in result.values():
        assert 0 < cublas_us < 1e4 and 0 < triton_us < 1e4 and row_limit in (0, 1, 2, 4, 8)
    set_gemv_rows(model, gemv_calibration.row_limits(result))
    assert gemv_rows(model) == {key: v[2] for key, v in result.items() if v[2]}
    for got, want in zip(_outputs(model, xs), before):
        for name in want:
            check(got[name], want[name])

    result = gemv_calibration.calibrate_gemv(model, "cuda", max_m=4, mode="force")
    spy.clear()  # drop calibrate's own (warm-up) calls
    assert all(v[2] == 4 and math.isnan(v[0]) for v in result.values()) and len(result) == len(shapes)
    set_gemv_rows(model, gemv_calibration.row_limits(result))
    assert set(gemv_rows(model)) == set(result) and set(gemv_rows(model).values()) == {4}
    for got, want in zip(_outputs(model, xs), before):
        for name in want:
            check(got[name], want[name])
    assert len(spy) == 2 * 5  # the M=1 and M=4 inputs of each of the five layers; M=8 stayed on cuBLAS


@gpu_only
def test_engine_tokens_unchanged_with_gemv_forced(tiny_model_factory):
    """fp32 tiny model: greedy tokens with the Triton GEMV (eager and inside CUDA graphs) equal cuBLAS's."""
    from nanovllm import LLM, SamplingParams

    path = tiny_model_factory("qwen3")
    kw = dict(skip_tokenizer_init=True, device="cuda", dtype="float32", max_model_len=256, num_kv_blocks=256,
              max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, 1000, (n,), generator=gen).tolist()} for n in (1, 5, 9)]

    def greedy(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    eager = LLM(path, enforce_eager=True, gemv="off", **kw)  # the worker calibrates at start-up: cuBLAS only
    model = eager.engine.executor.worker.model
    assert gemv_rows(model) == {}
    baseline = greedy(eager)
    result = gemv_calibration.calibrate_gemv(model, "cuda", mode="force")
    assert result
    set_gemv_rows(model, gemv_calibration.row_limits(result))
    assert greedy(eager) == baseline
    graphs = LLM(path, enforce_eager=False, gemv="force", **kw)  # captured with the kernel enabled
    assert gemv_rows(graphs.engine.executor.worker.model)
    assert greedy(graphs) == baseline



@torch.inference_mode()
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_norm_and_activation_run_inside_the_gemv(monkeypatch, fuse):
    """RMSNormLinear / SiluMulLinear: one fused kernel when the skinny GEMM serves the call
    (unless `fuse_gemv_prologues` is off), the separate ops otherwise; same results."""
    k, n, inter = 64, 96, 48
    qkv = _linear(n, k, bias=False)
    down = SiluMulLinear(inter, k, bias=False).to(DEVICE)
    with torch.no_grad():
        down.weight.copy_(rand(k, inter, dtype=torch.float32, seed=k, scale=inter**-0.5))
    norm = RMSNorm(k).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(rand(k, dtype=torch.float32, seed=3, scale=0.2) + 1)
    norm_qkv = RMSNormLinear(norm, qkv)
    model = torch.nn.ModuleList([norm, qkv, down, norm_qkv])
    x, residual = rand(2, k, dtype=torch.float32, seed=4), rand(2, k, dtype=torch.float32, seed=5)
    gate_up = rand(2, 2 * inter, dtype=torch.float32, seed=6)

    expected_h, expected_res = reference.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    expected = F.linear(expected_h, qkv.weight)
    expected_first = F.linear(reference.rms_norm(x, norm.weight, norm.eps), qkv.weight)
    expected_down = F.linear(reference.silu_and_mul(gate_up), down.weight)

    calls = []
    for name in ("skinny_gemm", "rms_norm_skinny_gemm", "silu_mul_skinny_gemm"):
        def wrapped(*a, _f=getattr(gemv, name), _n=name, **kw):
            calls.append(_n)
            return _f(*a, **kw)
        monkeypatch.setattr(gemv, name, wrapped)

    enable(model, {(n, k, torch.float32), (k, inter, torch.float32)},
           KernelOptions(gemv_on_cpu=not HAS_CUDA, fuse_gemv_prologues=fuse))
    out, new_res = norm_qkv(x, residual)
    check(out, expected)
    check(new_res, expected_res)
    out, new_res = norm_qkv(x, None)  # first layer: no residual yet
    check(out, expected_first)
    assert new_res is x
    check(down(gate_up), expected_down)
    if fuse:
        assert calls == ["rms_norm_skinny_gemm", "rms_norm_skinny_gemm", "silu_mul_skinny_gemm"]
    else:
        assert calls == ["skinny_gemm"] * 3

    calls.clear()
    enable(model, {})  # cuBLAS: the separate ops, same results
    check(norm_qkv(x, residual)[0], expected)
    check(down(gate_up), expected_down)
    assert calls == []
