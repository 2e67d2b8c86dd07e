"""A fused CPU decode kernel: the selected SwiGLU experts of a few tokens — and a shared expert with its
sigmoid gate — read where they lie, in one call.

At decode the torch path copies the selected experts into one block (or calls a matmul pair per expert):
the copy doubles the bytes moved and each of its ~10 ops costs microseconds, which on a small model is as
much as the bytes the sparsity saves. This kernel works on rows: each selected expert's gate, up and down
rows (and the shared expert's) are read in place, four rows at a time, in one pass — gate and up dot
products, SiLU, the weighted down rows added into a partial sum — by fixed blocks of rows (parallel over
blocks), whose partials are then added in block order. The blocks depend on the row count alone, so each
output element's summation order is fixed whatever the thread count.

It is C++ compiled on first use with torch's extension builder (a C++ compiler and ninja needed; about
25 s once per machine, cached in torch's extension folder). Where that cannot be done, `kernel()` is
None and the torch path runs. `MOEFY_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>

// out[t] = sum_j weights[t, j] * W2[e_j] (silu(G[e_j] x_t) * (U[e_j] x_t))          e_j = chosen[j]
//        + s_t * S2 (silu(SG x_t) * (SU x_t)),  s_t = sigmoid(s_gate . x_t), or 1 without s_gate
// w13 [E, 2W, H] ([gate; up] rows), w2 [E, H, W] stored as [E, W, H] (each expert's down weights as rows); the
// shared expert sg, su [Ws, H], s2 [H, Ws] stored as [Ws, H] (empty: none), s_gate [1, H] (empty: ungated); all
// fp32. Layouts are the caller's to check (`applies`, `shared_applies`): here they are taken as given.
// Rows, not experts, are what the threads share: a 384-wide shared expert beside 24-wide routed ones.
torch::Tensor swiglu_experts(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor chosen,
                             torch::Tensor weights, torch::Tensor sg, torch::Tensor su, torch::Tensor s2,
                             torch::Tensor s_gate) {
  x = x.contiguous();
  chosen = chosen.to(torch::kLong).contiguous();
  weights = weights.contiguous();
  const int64_t T = x.size(0), H = x.size(1), U = chosen.size(0), W = w2.size(2);
  const int64_t Ws = s2.numel() ? s2.size(1) : 0, routed = U * W, R = routed + Ws;
  auto out = torch::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w13p = w13.data_ptr<float>();
  const float* w2p = w2.data_ptr<float>();  // [E, W, H] in memory
  const float* sgp = Ws ? sg.data_ptr<float>() : nullptr;
  const float* sup = Ws ? su.data_ptr<float>() : nullptr;
  const float* s2p = Ws ? s2.data_ptr<float>() : nullptr;  // [Ws, H] in memory
  const int64_t* cp = chosen.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<float> scale(T, 1.f);
  if (Ws && s_gate.numel()) {
    const float* gp = s_gate.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      float d = 0.f;
      for (int64_t c = 0; c < H; ++c) d += gp[c] * xp[t * H + c];
      scale[t] = 1.f / (1.f + std::exp(-d));
    }
  }
  // every row's gate, up and down pointers and weight, once: both passes then index plain tables
  std::vector<const float*> gate_rows(R), up_rows(R), down_rows(R);
  std::vector<float> row_weight(T * R);
  for (int64_t r = 0; r < R; ++r) {
    if (r < routed) {
      const int64_t j = r / W, i = r % W;
      gate_rows[r] = w13p + (cp[j] * 2 * W + i) * H;
      up_rows[r] = w13p + (cp[j] * 2 * W + W + i) * H;
      down_rows[r] = w2p + (cp[j] * W + i) * H;
      for (int64_t t = 0; t < T; ++t) row_weight[t * R + r] = wp[t * U + j];
    } else {
      gate_rows[r] = sgp + (r - routed) * H;
      up_rows[r] = sup + (r - routed) * H;
      down_rows[r] = s2p + (r - routed) * H;
      for (int64_t t = 0; t < T; ++t) row_weight[t * R + r] = scale[t];
    }
  }
  // One pass: each block of rows computes its rows' activations and adds their down rows into the block's own
  // partial sum (three whole rows streamed per row: gate, up, down); the partials are then added in block
  // order. The blocks are fixed by R alone, so the sums do not depend on the thread count.
  const int64_t blocks = std::min<int64_t>(16, (R + 3) / 4);
  std::vector<float> partial(blocks * T * H, 0.f);
  #pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = R * b / blocks, end = R * (b + 1) / blocks;
    float* acc = partial.data() + b * T * H;
    for (int64_t r0 = begin; r0 < end; r0 += 4) {  // four rows at a time: four streams share each load of x
      const int64_t n = std::min<int64_t>(4, end - r0);
      const float *g[4], *u[4], *d[4];
      for (int64_t k = 0; k < 4; ++k) {  // a short quad repeats its last row, weighted 0
        const int64_t r = r0 + std::min(k, n - 1);
        g[k] = gate_rows[r];
        u[k] = up_rows[r];
        d[k] = down_rows[r];
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = xp + t * H;
        float g0 = 0.f, g1 = 0.f, g2 = 0.f, g3 = 0.f, u0 = 0.f, u1 = 0.f, u2 = 0.f, u3 = 0.f;
        #pragma omp simd reduction(+ : g0, g1, g2, g3, u0, u1, u2, u3)
        for (int64_t c = 0; c < H; ++c) {
          const float v = xt[c];
          g0 += g[0][c] * v; g1 += g[1][c] * v; g2 += g[2][c] * v; g3 += g[3][c] * v;
          u0 += u[0][c] * v; u1 += u[1][c] * v; u2 += u[2][c] * v; u3 += u[3][c] * v;
        }
        const float gs[4] = {g0, g1, g2, g3}, us[4] = {u0, u1, u2, u3};
        float a[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t k = 0; k < n; ++k)
          a[k] = gs[k] / (1.f + std::exp(-gs[k])) * us[k] * row_weight[t * R + r0 + k];
        float* at = acc + t * H;
        #pragma omp simd
        for (int64_t c = 0; c < H; ++c) at[c] += a[0] * d[0][c] + a[1] * d[1][c] + a[2] * d[2][c] + a[3] * d[3][c];
      }
    }
  }
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < T * H; ++i) {
    float sum = 0.f;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[b * T * H + i];
    op[i] = sum;
  }
  return out;
}
"""


@functools.cache
def kernel():
    """The compiled module, or None where it cannot be built (no compiler / ninja, or turned off)."""
    if os.environ.get("MOEFY_CPU_KERNEL", "1") == "0" or not (shutil.which("ninja") and shutil.which("c++")):
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline("moefy_cpu_decode", cpp_sources=SOURCE, functions=["swiglu_experts"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - any build failure leaves the torch path, which is exact too
        warnings.warn(f"moefy: the CPU decode kernel could not be built ({exc}); decoding on the torch path",
                      stacklevel=2)
        return None


def holds(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether experts are laid out for the kernel (and it is built): fp32 on CPU, w13 contiguous and w2 in the
    decode layout ([E, I, H] in memory)."""
    return (w13.device.type == "cpu" and w13.dtype == w2.dtype == torch.float32 and w13.is_contiguous()
            and w2.transpose(1, 2).is_contiguous() and kernel() is not None)


def applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool, b13) -> bool:
    """Whether `swiglu_experts` computes this call: SwiGLU without input biases on fp32 CPU inputs, experts
    the kernel `holds`, outside autograd."""
    return (gated and activation == "silu" and b13 is None and x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad or w2.requires_grad))
            and holds(w13, w2))


def shared_applies(sg: torch.Tensor, su: torch.Tensor, s2: torch.Tensor, gate: torch.Tensor | None) -> bool:
    """Whether a shared expert (gate and up rows sg, su [Is, H], s2 [H, Is], its gate [1, H] or None) is laid
    out for the kernel: fp32, sg and su contiguous, s2 stored as rows ([Is, H] in memory, `rows_layout`)."""
    return (sg.dtype == su.dtype == s2.dtype == torch.float32 and sg.is_contiguous() and su.is_contiguous()
            and s2.t().is_contiguous() and (gate is None or (gate.dtype == torch.float32 and gate.is_contiguous())))


def split_shared(s13: torch.Tensor, s2: torch.Tensor, gate: torch.Tensor | None = None) -> tuple:
    """A shared expert stored as one MLP (s13 [2Is, H] = [gate; up] rows, s2 [H, Is]) as `swiglu_experts` takes
    it: (gate rows, up rows, s2, gate)."""
    width = s2.shape[1]
    return s13[:width], s13[width:], s2, gate


def rows_layout(w: torch.Tensor) -> torch.Tensor:
    """w [H, I] with the same values and shape, stored as [I, H] in memory: the rows the kernel reads."""
    return w.t().contiguous().t()


NONE = torch.empty(0)


def swiglu_experts(x, weights, chosen, w13, w2, shared=None) -> torch.Tensor:
    """Σ_j weights[:, j] · expert chosen[j](x) for x [T, H]; weights [T, U] fp32, chosen [U] int64.
    `shared` = (sg, su [Is, H] its gate and up rows, s2 [H, Is] stored as rows ([Is, H] in memory), gate [1, H]
    or None) adds an always-on expert, scaled by sigmoid(gate · x) where it has a gate, in the same call."""
    sg, su, s2, gate = (NONE, NONE, NONE, None) if shared is None else shared
    return kernel().swiglu_experts(x, w13, w2, chosen, weights, sg, su, s2, NONE if gate is None else gate)


def shared_expert(x, shared) -> torch.Tensor:
    """`shared` (as in `swiglu_experts`) alone on x [T, H]: a dense SwiGLU MLP read as rows, no routed experts."""
    none = torch.empty(0, 0, 0)
    return swiglu_experts(x, torch.empty(x.shape[0], 0), torch.empty(0, dtype=torch.long), none, none, shared)
