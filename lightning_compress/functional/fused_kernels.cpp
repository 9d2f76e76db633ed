// Fused fake-quantization kernels for quantization-aware training on CPU (lightning_compress.functional.fused), and
// the per-token quantize / rescale around oneDNN's int8 matmul (lightning_compress.export.onednn).
//
// Each is the eager composition in lightning_compress.functional.quant, op for op in float32 (IEEE division,
// std::nearbyint: round half to even, clamp as min(max(v, lo), hi)), so results are bit-identical; built with
// -ffp-contract=off so that no multiply-add is fused behind our back.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

constexpr float kMinScale = 1e-12f;  // functional.quant.MIN_SCALE
constexpr int64_t kGrain = 32768;     // elements per thread task

inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// qparams_from_range, asymmetric: widen to contain 0, S = (max - min) / (qmax - qmin), Z = round(qmin - min / S).
inline void asymmetric_qparams(float rmin, float rmax, float qmin, float qmax, float& scale, float& zero) {
  rmin = std::min(rmin, 0.0f);
  rmax = std::max(rmax, 0.0f);
  scale = std::max((rmax - rmin) / (qmax - qmin), kMinScale);
  zero = clampf(std::nearbyint(qmin - rmin / scale), qmin, qmax);
}

// qparams_from_range, symmetric: S = max(-min, max) / qmax.
inline float symmetric_scale(float rmin, float rmax, float qmax) {
  return std::max(std::max(-rmin, rmax) / qmax, kMinScale);
}

// fake_quantize_and_mask on n values sharing (scale, zero): y = S (clamp(round(x / S + Z)) - Z), inside = no clip.
template <typename scalar_t>
inline void fake_quantize_run(const scalar_t* x, scalar_t* y, bool* inside, int64_t n, float scale, float zero,
                              bool asymmetric, float qmin, float qmax) {
  // Adding and subtracting a zero-point of 0 changes no value (at most the sign of a zero), so the symmetric case
  // shares the loop.
  if (!asymmetric) zero = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(static_cast<float>(x[i]) / scale + zero);
    const float c = clampf(v, qmin, qmax);
    inside[i] = v == c;
    y[i] = static_cast<scalar_t>((c - zero) * scale);
  }
}

}  // namespace

// Activations: update the running range [min_val, max_val] from x (EMA with constant c, or min / max when c < 0),
// count the batch, then fake-quantize x asymmetric per tensor with the updated range. Returns (y, inside).
std::tuple<torch::Tensor, torch::Tensor> observe_fake_quantize(torch::Tensor x, torch::Tensor min_val,
                                                               torch::Tensor max_val, torch::Tensor num_batches,
                                                               int64_t bits, double averaging_constant) {
  TORCH_CHECK(x.device().is_cpu() && min_val.scalar_type() == torch::kFloat, "CPU input and float32 range expected");
  x = x.contiguous();
  auto range = at::aminmax(x);
  float lo = std::get<0>(range).item<float>(), hi = std::get<1>(range).item<float>();
  float* mn = min_val.data_ptr<float>();
  float* mx = max_val.data_ptr<float>();
  int64_t* count = num_batches.data_ptr<int64_t>();
  if (averaging_constant < 0) {  // MinMaxObserver: torch.minimum / torch.maximum
    *mn = std::min(*mn, lo);
    *mx = std::max(*mx, hi);
  } else if (*count == 0) {  // MovingAverageMinMaxObserver: the first batch initialises
    *mn = lo;
    *mx = hi;
  } else {  // v <- v + (v_batch - v) * c, with c as float32 (how torch multiplies by a Python float)
    const float c = static_cast<float>(averaging_constant);
    *mn = *mn + (lo - *mn) * c;
    *mx = *mx + (hi - *mx) * c;
  }
  *count += 1;
  const float qmin = -static_cast<float>(int64_t{1} << (bits - 1)), qmax = -qmin - 1;
  float scale, zero;
  asymmetric_qparams(*mn, *mx, qmin, qmax, scale, zero);
  auto y = torch::empty_like(x);
  auto inside = torch::empty(x.sizes(), x.options().dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "observe_fake_quantize", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    bool* ip = inside.data_ptr<bool>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      fake_quantize_run(xp + begin, yp + begin, ip + begin, end - begin, scale, zero, true, qmin, qmax);
    });
  });
  return {y, inside};
}

// Weights (out, ...) viewed as rows of `group` values: min-max scales per row (group = row length: per channel) or
// per group of inputs, symmetric or asymmetric, and fake-quantize. Returns (y, inside).
std::tuple<torch::Tensor, torch::Tensor> minmax_fake_quantize(torch::Tensor w, int64_t bits, bool symmetric,
                                                              int64_t group) {
  TORCH_CHECK(w.device().is_cpu() && w.numel() % group == 0, "CPU weight whose size divides by the group expected");
  w = w.contiguous();
  const float qmin = -static_cast<float>(int64_t{1} << (bits - 1)), qmax = -qmin - 1;
  auto y = torch::empty_like(w);
  auto inside = torch::empty(w.sizes(), w.options().dtype(torch::kBool));
  const int64_t groups = w.numel() / group;
  auto rows = w.view({groups, group});
  auto mins = rows.amin(1).to(torch::kFloat).contiguous(), maxs = rows.amax(1).to(torch::kFloat).contiguous();
  const float* lo = mins.data_ptr<float>();
  const float* hi = maxs.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "minmax_fake_quantize", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    bool* ip = inside.data_ptr<bool>();
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / group), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        float scale, zero = 0.0f;
        if (symmetric) {
          scale = symmetric_scale(lo[g], hi[g], qmax);
        } else {
          asymmetric_qparams(lo[g], hi[g], qmin, qmax, scale, zero);
        }
        const int64_t at = g * group;
        fake_quantize_run(wp + at, yp + at, ip + at, group, scale, zero, !symmetric, qmin, qmax);
      }
    });
  });
  return {y, inside};
}

// The clipped straight-through backward: grad where the value was inside the range, 0 where it was clipped.
torch::Tensor straight_through_backward(torch::Tensor grad, torch::Tensor inside) {
  TORCH_CHECK(grad.device().is_cpu() && inside.scalar_type() == torch::kBool && grad.sizes() == inside.sizes(),
              "CPU gradient and a bool mask of its shape expected");
  grad = grad.contiguous();
  inside = inside.contiguous();
  auto out = torch::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "straight_through_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const bool* ip = inside.data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op[i] = ip[i] ? gp[i] : scalar_t(0);
    });
  });
  return out;
}

// Dynamic symmetric per-row quantization as oneDNN's uint8 input (lightning_compress.export.onednn): per row of
// x (M, K), after SmoothQuant's division x / smooth (in x's dtype, as torch divides), S = max(max|x|, 1e-8) / qmax
// (functional.quant.token_scale), u = clamp(round(x / S), qmin, qmax) + 128.
std::tuple<torch::Tensor, torch::Tensor> quantize_rows_u8(torch::Tensor x, int64_t bits,
                                                          c10::optional<torch::Tensor> smooth) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "a 2-D CPU tensor expected");
  x = x.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1), qmin = -qmax - 1.0f;
  auto u = torch::empty({rows, cols}, x.options().dtype(torch::kUInt8));
  auto scale = torch::empty({rows, 1}, x.options().dtype(torch::kFloat));
  const bool smoothed = smooth.has_value() && smooth->defined();
  // the divisor rounded to x's dtype first (smooth.to(x.dtype)), then held as float32
  torch::Tensor div = smoothed ? smooth->to(x.scalar_type()).to(torch::kFloat).contiguous() : torch::Tensor();
  TORCH_CHECK(!smoothed || div.numel() == cols, "smooth must have one divisor per column");
  const float* dp = smoothed ? div.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rows_u8", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* up = u.data_ptr<uint8_t>();
    float* sp = scale.data_ptr<float>();
    auto value = [&](const scalar_t* row, int64_t j) -> float {
      return dp ? static_cast<float>(static_cast<scalar_t>(static_cast<float>(row[j]) / dp[j]))
                : static_cast<float>(row[j]);
    };
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * cols;
        float top = 0.0f;
        for (int64_t j = 0; j < cols; ++j) top = std::max(top, std::abs(value(row, j)));
        const float s = std::max(top, 1e-8f) / qmax;
        sp[r] = s;
        uint8_t* out = up + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          out[j] = static_cast<uint8_t>(clampf(std::nearbyint(value(row, j) / s), qmin, qmax) + 128.0f);
        }
      }
    });
  });
  return {u, scale};
}

// y (M, N) float32 times each row's scale (M, 1), plus bias (N,) if defined, written in dtype: the per-token rescale.
torch::Tensor scale_rows(torch::Tensor y, torch::Tensor scale, c10::optional<torch::Tensor> bias, at::ScalarType dtype) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && y.scalar_type() == torch::kFloat, "2-D float32 CPU tensor expected");
  y = y.contiguous();
  scale = scale.to(torch::kFloat).contiguous();
  const int64_t rows = y.size(0), cols = y.size(1);
  torch::Tensor b = bias.has_value() && bias->defined() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
  auto out = torch::empty({rows, cols}, y.options().dtype(dtype));
  const float* yp = y.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_rows", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float s = sp[r];
        for (int64_t j = 0; j < cols; ++j) {
          const float v = yp[r * cols + j] * s;
          op[r * cols + j] = static_cast<scalar_t>(bp ? v + bp[j] : v);
        }
      }
    });
  });
  return out;
}

// LSQ (functional.quant.lsq_fake_quantize) on a weight viewed as rows of `group` values, one learned scale (and a
// fixed zero-point, or none: Z = 0 changes no value) per row: u = x / S + Z, c = clamp(round(u)), y = (c - Z) * S.
// Nothing is saved: the backward recomputes u from the weight. The loops are branch-free so that they vectorize.
template <typename scalar_t>
inline void lsq_forward_run(const scalar_t* x, scalar_t* y, int64_t n, float scale, float zero, float qmin,
                            float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float c = clampf(std::rint(static_cast<float>(x[i]) / scale + zero), qmin, qmax);
    y[i] = static_cast<scalar_t>((c - zero) * scale);
  }
}

torch::Tensor lsq_forward(torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> zero, int64_t bits,
                          int64_t group) {
  TORCH_CHECK(w.device().is_cpu() && w.numel() == scale.numel() * group, "CPU weight of scale.numel() * group values");
  w = w.contiguous();
  auto s = scale.to(torch::kFloat).contiguous();
  torch::Tensor z = zero.has_value() && zero->defined() ? zero->to(torch::kFloat).contiguous() : torch::Tensor();
  const float qmin = -static_cast<float>(int64_t{1} << (bits - 1)), qmax = -qmin - 1;
  auto y = torch::empty_like(w);
  const float* sp = s.data_ptr<float>();
  const float* zp = z.defined() ? z.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lsq_forward", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, s.numel(), std::max<int64_t>(1, kGrain / group), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        lsq_forward_run(wp + g * group, yp + g * group, group, sp[g], zp ? zp[g] : 0.0f, qmin, qmax);
      }
    });
  });
  return y;
}

// Its backward on one row: dL/dx = grad where qmin <= u <= qmax (0 where clipped); returns
// sum(grad * (round(u) - u)) inside, (c - Z) where clipped, in 16 float partial sums added in double.
template <typename scalar_t>
inline double lsq_backward_run(const scalar_t* x, const scalar_t* g, scalar_t* dx, int64_t n, float scale, float zero,
                               float qmin, float qmax) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float u = static_cast<float>(x[i + j]) / scale + zero;
      const float c = clampf(std::rint(u), qmin, qmax);
      const bool inside = u >= qmin && u <= qmax;
      const float gi = static_cast<float>(g[i + j]);
      acc[j] += gi * (inside ? c - u : c - zero);
      dx[i + j] = inside ? g[i + j] : scalar_t(0);
    }
  }
  double total = 0.0;
  for (; i < n; ++i) {
    const float u = static_cast<float>(x[i]) / scale + zero;
    const float c = clampf(std::rint(u), qmin, qmax);
    const bool inside = u >= qmin && u <= qmax;
    total += static_cast<double>(g[i]) * static_cast<double>(inside ? c - u : c - zero);
    dx[i] = inside ? g[i] : scalar_t(0);
  }
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

std::tuple<torch::Tensor, torch::Tensor> lsq_backward(torch::Tensor grad, torch::Tensor w, torch::Tensor scale,
                                                      c10::optional<torch::Tensor> zero, int64_t bits, int64_t group,
                                                      double grad_scale) {
  TORCH_CHECK(grad.sizes() == w.sizes() && w.numel() == scale.numel() * group, "gradient of the weight's shape");
  w = w.contiguous();
  grad = grad.to(w.scalar_type()).contiguous();
  auto s = scale.to(torch::kFloat).contiguous();
  torch::Tensor z = zero.has_value() && zero->defined() ? zero->to(torch::kFloat).contiguous() : torch::Tensor();
  const float qmin = -static_cast<float>(int64_t{1} << (bits - 1)), qmax = -qmin - 1;
  auto dx = torch::empty_like(w);
  auto ds = torch::empty({s.numel()}, s.options().dtype(torch::kDouble));
  const float* sp = s.data_ptr<float>();
  const float* zp = z.defined() ? z.data_ptr<float>() : nullptr;
  double* dsp = ds.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lsq_backward", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, s.numel(), std::max<int64_t>(1, kGrain / group), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t at = g * group;
        dsp[g] = grad_scale * lsq_backward_run(wp + at, gp + at, dxp + at, group, sp[g], zp ? zp[g] : 0.0f, qmin, qmax);
      }
    });
  });
  return {dx, ds.to(torch::kFloat).view(scale.sizes())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_forward", &lsq_forward, "LSQ fake-quantize per row / group, learned scale, fixed zero-point");
  m.def("lsq_backward", &lsq_backward, "LSQ's straight-through weight gradient and per-row scale gradient");
  m.def("straight_through_backward", &straight_through_backward, "grad masked by the values not clipped");
  m.def("observe_fake_quantize", &observe_fake_quantize, "observer update + asymmetric per-tensor fake-quantize");
  m.def("minmax_fake_quantize", &minmax_fake_quantize, "min-max per-row / per-group fake-quantize");
  m.def("quantize_rows_u8", &quantize_rows_u8, "dynamic symmetric per-row quantization to uint8 (q + 128)",
        py::arg("x"), py::arg("bits"), py::arg("smooth") = py::none());
  m.def("scale_rows", &scale_rows, "per-row rescale plus bias, cast to dtype");
}
