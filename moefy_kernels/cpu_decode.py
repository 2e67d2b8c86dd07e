"""A fused CPU decode kernel: the selected SwiGLU experts of a few tokens read where they lie, in one call.

At decode the torch path copies the selected experts into one block (or calls a matmul pair per expert):
the copy doubles the bytes moved and each of its ~10 ops costs microseconds, which on a small model is as
much as the bytes the sparsity saves. This kernel reads each selected expert's [gate; up] rows and down
rows in place: one pass of dot products per expert (parallel over experts), then the weighted down rows
accumulated into the output (parallel over the hidden dimension, so no two threads write one element).
Per output element the summation order is fixed (expert, then row), whatever the thread count.

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

// out[t] = sum_j weights[t, j] * W2[e_j] (silu(G[e_j] x_t) * (U[e_j] x_t)), e_j = chosen[j]
// w13 [E, 2W, H] ([gate; up] rows), w2_rows [E, W, H] (each expert's down weights as rows), all fp32 contiguous.
torch::Tensor swiglu_experts(torch::Tensor x, torch::Tensor w13, torch::Tensor w2_rows, torch::Tensor chosen,
                             torch::Tensor weights) {
  const int64_t T = x.size(0), H = x.size(1), U = chosen.size(0), W = w2_rows.size(1);
  auto out = torch::zeros({T, H}, x.options());
  auto h = torch::empty({T, U, W}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w13p = w13.data_ptr<float>();
  const float* w2p = w2_rows.data_ptr<float>();
  const int64_t* cp = chosen.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < U; ++j) {
    const float* expert = w13p + cp[j] * 2 * W * H;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = xp + t * H;
      for (int64_t i = 0; i < W; ++i) {
        const float* gate = expert + i * H;
        const float* up = expert + (W + i) * H;
        float g = 0.f, u = 0.f;
        #pragma omp simd reduction(+ : g, u)
        for (int64_t c = 0; c < H; ++c) {
          g += gate[c] * xt[c];
          u += up[c] * xt[c];
        }
        hp[(t * U + j) * W + i] = g / (1.f + std::exp(-g)) * u * wp[t * U + j];
      }
    }
  }
  const int64_t threads = omp_get_max_threads();
  const int64_t chunk = ((H + threads - 1) / threads + 15) / 16 * 16;
  #pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < H; c0 += chunk) {
    const int64_t c1 = std::min(H, c0 + chunk);
    for (int64_t j = 0; j < U; ++j) {
      const float* expert = w2p + cp[j] * W * H;
      for (int64_t i = 0; i < W; ++i) {
        const float* row = expert + i * H;
        for (int64_t t = 0; t < T; ++t) {
          const float a = hp[(t * U + j) * W + i];
          float* ot = op + t * H;
          #pragma omp simd
          for (int64_t c = c0; c < c1; ++c) ot[c] += a * row[c];
        }
      }
    }
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


def applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool, b13) -> bool:
    """Whether `swiglu_experts` computes this call: fp32 on CPU, SwiGLU without input biases, w13
    contiguous and w2 in the decode layout ([E, I, H] in memory), outside autograd."""
    return (gated and activation == "silu" and b13 is None and x.device.type == "cpu"
            and x.dtype == w13.dtype == w2.dtype == torch.float32 and w13.is_contiguous()
            and w2.transpose(1, 2).is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad or w2.requires_grad))
            and kernel() is not None)


def swiglu_experts(x, weights, chosen, w13, w2) -> torch.Tensor:
    """Σ_j weights[:, j] · expert chosen[j](x) for x [T, H]; weights [T, U] fp32, chosen [U] int64."""
    return kernel().swiglu_experts(x.contiguous(), w13, w2.transpose(1, 2), chosen.long().contiguous(),
                                   weights.contiguous())
