// The CPU sparse GEMV: y = (x * (|x| > t_s)) @ W_s for each output segment s of a weight stored
// [in, out] row-major (packed.py), reading only the rows of active input channels.
//
// Rounding: the same as the torch reference path's, bit for bit, so that a decode step compares
// the same values against its thresholds (one entry landing on the other side of one flips the
// step, and the next tokens with it). The product: each output summed over the input channels in
// ascending order, a rounded multiply then a rounded add (no fused multiply-add): the order of
// MKL's fp32 GEMV under the reference's x @ W (measured on AVX-512 and its torch; a skipped channel
// adds x = 0 there); int8 multiplies x by the dequantized weight q * scale, as the reference does.
// The prologue's values that torch computes with its own vectorized code (RMSNorm's rstd, SiLU of
// the gate) come from torch (cpu.py); the elementwise rest rounds here as torch does.
//
// Per call: the calling thread makes the projection's input for each row of x, then, per
// segment, lists the input channels active in any row (their union: each is one weight row read
// once for all rows) with each row's value there (0 where that row's own entry is not above the
// threshold). The output columns are cut into one contiguous range a thread, balanced by the rows
// each column reads (a segment's columns cost its active count). Each thread sums its columns in
// fp32 accumulators in L1, CHUNK floats at a time, reading each active row's slice front to back,
// the rows in ascending order: every output is the same sequential sum whatever the thread count.
// No software prefetch: with it, 10-25% less bandwidth at 50% sparsity (measured); the hardware's
// prefetchers follow the runs of 2 KB and more a row slice is.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t V = 16;              // floats a vector: one AVX-512 register, two AVX2 ones
constexpr int64_t CHUNK = 2048;        // accumulator floats a thread holds: 8 KB of its L1
constexpr int64_t MIN_WORK = 1 << 15;  // weights a thread sums at least: fewer, and one thread runs

typedef float vf __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef int8_t vb __attribute__((vector_size(V)));
typedef _Float16 vhalf __attribute__((vector_size(V * 2)));

// V weights from p as fp32, for each storage type (memcpy: unaligned loads).
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const c10::BFloat16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;  // a bf16 is the top half of an fp32
  vf v; std::memcpy(&v, &u, sizeof v); return v;
}
inline vf load(const c10::Half* p) { vhalf h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vf); }
inline vf load(const int8_t* p) { vb b; std::memcpy(&b, p, sizeof b); return __builtin_convertvector(b, vf); }
template <typename T> inline float load1(const T* p) { return static_cast<float>(*p); }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// W's element type, and int8's per-column scale: w * scale, as dequantize() makes the reference's W.
template <typename T> struct Weights {
  const T* w;
  inline vf vec(int64_t i, const float*) const { return load(w + i); }
  inline float one(int64_t i, const float*) const { return load1(w + i); }
};
template <> struct Weights<int8_t> {
  const int8_t* w;
  inline vf vec(int64_t i, const float* scale) const { return load(w + i) * load(scale); }
  inline float one(int64_t i, const float* scale) const { return load1(w + i) * *scale; }
};

// One row of x: acc[0, n) = sum over i of xv[i] * W[idx[i], c0 + j], i ascending, four rows a pass
// over the accumulators. W: ld columns a row; sc: int8's scales of these columns (else unused).
template <typename T>
void sum_rows(const float* xv, const int32_t* idx, int64_t rows, const T* W, int64_t ld, int64_t c0, int64_t n,
              const float* sc, float* acc) {
  std::fill(acc, acc + n, 0.0f);
  const int64_t nv = n / V * V;
  const auto row = [&](int64_t i) { return Weights<T>{W + idx[i] * ld + c0}; };
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const Weights<T> r0 = row(i), r1 = row(i + 1), r2 = row(i + 2), r3 = row(i + 3);
    const float x0 = xv[i], x1 = xv[i + 1], x2 = xv[i + 2], x3 = xv[i + 3];
    for (int64_t j = 0; j < nv; j += V)  // -ffp-contract=off: each product and sum rounded, in this order
      store(acc + j, (((load(acc + j) + x0 * r0.vec(j, sc + j)) + x1 * r1.vec(j, sc + j)) + x2 * r2.vec(j, sc + j)) +
                         x3 * r3.vec(j, sc + j));
    for (int64_t j = nv; j < n; ++j)
      acc[j] = (((acc[j] + x0 * r0.one(j, sc + j)) + x1 * r1.one(j, sc + j)) + x2 * r2.one(j, sc + j)) + x3 * r3.one(j, sc + j);
  }
  for (; i < rows; ++i) {
    const Weights<T> r = row(i);
    const float x0 = xv[i];
    for (int64_t j = 0; j < nv; j += V) store(acc + j, load(acc + j) + x0 * r.vec(j, sc + j));
    for (int64_t j = nv; j < n; ++j) acc[j] = acc[j] + x0 * r.one(j, sc + j);
  }
}

// M rows of x at once: acc[m * n + j] = sum over i of xv[i * M + m] * W[idx[i], c0 + j], each
// weight vector loaded once for all rows.
template <typename T>
void sum_rows_m(const float* xv, int64_t M, const int32_t* idx, int64_t rows, const T* W, int64_t ld, int64_t c0, int64_t n,
                const float* sc, float* acc) {
  std::fill(acc, acc + M * n, 0.0f);
  const int64_t nv = n / V * V;
  for (int64_t i = 0; i < rows; ++i) {
    const Weights<T> r{W + idx[i] * ld + c0};
    const float* x = xv + i * M;
    for (int64_t j = 0; j < nv; j += V) {
      const vf w = r.vec(j, sc + j);
      for (int64_t m = 0; m < M; ++m) store(acc + m * n + j, load(acc + m * n + j) + x[m] * w);
    }
    for (int64_t j = nv; j < n; ++j) {
      const float w = r.one(j, sc + j);
      for (int64_t m = 0; m < M; ++m) acc[m * n + j] = acc[m * n + j] + x[m] * w;
    }
  }
}

// x's dtype's rounding of an fp32 value (float: none).
template <typename X> inline float round_to(float v) { return static_cast<float>(static_cast<X>(v)); }

// The projection's input from one row of x, rounded step by step as reference.projection_input:
// RMSNorm with torch's rstd of the row, or silu(gate) (torch's) * up, or x itself.
template <typename X>
void make_input(const X* x, int64_t K, const X* norm_weight, float rstd, const X* gate, float* xin) {
  if (norm_weight) {
    for (int64_t k = 0; k < K; ++k)
      xin[k] = round_to<X>(round_to<X>(static_cast<float>(x[k]) * rstd) * static_cast<float>(norm_weight[k]));
  } else if (gate) {
    for (int64_t k = 0; k < K; ++k) xin[k] = round_to<X>(static_cast<float>(gate[k]) * static_cast<float>(x[K + k]));
  } else {
    for (int64_t k = 0; k < K; ++k) xin[k] = static_cast<float>(x[k]);
  }
}

template <typename X, typename T>
void gemv(const X* x, int64_t M, int64_t xk, const T* W, int64_t K, int64_t N, const std::vector<int64_t>& splits,
          const float* thresholds, const X* norm_weight, const float* rstd, const X* gate, const X* residual,
          const float* scales, int64_t* kept, X* out) {
  const int64_t S = static_cast<int64_t>(splits.size());
  std::vector<float> xin(M * K);
  for (int64_t m = 0; m < M; ++m)
    make_input(x + m * xk, K, norm_weight, rstd ? rstd[m] : 0.0f, gate ? gate + m * K : nullptr, xin.data() + m * K);

  // Segment s: its active channels at idx[s * K ...], their values xv[(s * K + i) * M + m].
  std::vector<int32_t> idx(S * K);
  std::vector<float> xv(S * K * M);
  std::vector<int64_t> count(S, 0), start(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    start[s + 1] = start[s] + splits[s];
    const float t = thresholds[s];
    int64_t c = 0, passed = 0;
    for (int64_t k = 0; k < K; ++k) {
      bool any = false;
      float* v = xv.data() + (s * K + c) * M;
      for (int64_t m = 0; m < M; ++m) {
        const float a = xin[m * K + k];
        const bool keep = std::fabs(a) > t;  // NaN is never > t
        v[m] = keep ? a : 0.0f;
        any |= keep;
        passed += keep;
      }
      if (any) idx[s * K + c++] = static_cast<int32_t>(k);
    }
    count[s] = c;
    if (kept) kept[s] += passed;
  }

  // Column ranges a thread, cut where the weights summed so far pass t / threads of the total (a
  // column sums its segment's active rows, plus one for its write), on multiples of V.
  int64_t work = 0;
  for (int64_t s = 0; s < S; ++s) work += (count[s] + 1) * splits[s];
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work * M / MIN_WORK));
  std::vector<int64_t> cut(threads + 1, N);
  cut[0] = 0;
  for (int64_t t = 1, s = 0, done = 0; t < threads; ++t) {
    const int64_t goal = work * t / threads;
    while (s < S && done + (count[s] + 1) * splits[s] <= goal) done += (count[s] + 1) * splits[s], ++s;
    const int64_t c = s < S ? std::min(start[s] + ((goal - done) / (count[s] + 1) + V - 1) / V * V, start[s + 1]) : N;
    cut[t] = std::max(cut[t - 1], c);
  }

  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float acc[CHUNK];
    const int64_t width = std::max<int64_t>(V, CHUNK / M / V * V);  // columns a pass
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t lo = std::max(cut[t], start[s]), hi = std::min(cut[t + 1], start[s + 1]);
        for (int64_t c = lo; c < hi; c += width) {
          const int64_t n = std::min(width, hi - c);
          const float* sc = scales ? scales + c : nullptr;
          if (M == 1) sum_rows(xv.data() + s * K, idx.data() + s * K, count[s], W, N, c, n, sc, acc);
          else sum_rows_m(xv.data() + s * K * M, M, idx.data() + s * K, count[s], W, N, c, n, sc, acc);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t j = 0; j < n; ++j) {
              const float a = acc[m * n + j];
              float y = round_to<X>(a);
              if (residual) y = static_cast<float>(residual[m * N + c + j]) + y;
              out[m * N + c + j] = static_cast<X>(y);
            }
        }
      }
    }
  });
}

// The dense product with a weight stored [out, in] (torch's Linear layout: the tied lm_head, read
// in place): out[m, n] = x[m] . W[n], 2 x V fp32 lanes summed over in, then across the lanes.
// The output rows are cut into one contiguous range a thread; W's rows stream front to back.
template <typename X>
void linear(const X* x, int64_t M, const X* W, int64_t K, int64_t N, X* out) {
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
  const int64_t kv = K / (2 * V) * (2 * V);
  at::parallel_for(0, N, std::max<int64_t>(1, MIN_WORK / (K * M)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const X* w = W + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xf.data() + m * K;
        vf a0 = {}, a1 = {};  // two chains: the adds' latency hidden behind each other
        for (int64_t k = 0; k < kv; k += 2 * V) {
          a0 = a0 + load(xm + k) * load(w + k);
          a1 = a1 + load(xm + k + V) * load(w + k + V);
        }
        a0 = a0 + a1;
        float y = 0.0f;
        for (int64_t j = 0; j < V; ++j) y += a0[j];
        for (int64_t k = kv; k < K; ++k) y += xm[k] * load1(w + k);
        out[m * N + n] = static_cast<X>(y);
      }
    }
  });
}

// out[M, N] = x @ weight.T: weight [N, K] in x's dtype (fp32, bf16, fp16), contiguous tensors.
void dense_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out) {
  const int64_t M = x.size(0), K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == K, "x [M, in], weight [out, in]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N, "out [M, out]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(), "contiguous x, weight, out");
  TORCH_CHECK(weight.dtype() == x.dtype() && out.dtype() == x.dtype(), "weight and out in x's dtype");
  TORCH_CHECK(!x.is_cuda() && !weight.is_cuda(), "CPU tensors");
  switch (x.scalar_type()) {
    case at::kFloat: linear(x.data_ptr<float>(), M, weight.data_ptr<float>(), K, N, out.data_ptr<float>()); break;
    case at::kBFloat16:
      linear(x.data_ptr<c10::BFloat16>(), M, weight.data_ptr<c10::BFloat16>(), K, N, out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf: linear(x.data_ptr<c10::Half>(), M, weight.data_ptr<c10::Half>(), K, N, out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "x must be fp32, bf16 or fp16, got ", x.scalar_type());
  }
}

// out[M, N] = [residual +] (input * (|input| > t_s)) @ data[:, segment s]: input = x, RMSNorm(x) *
// norm_weight given rstd [M] (fp32), or gate * up with x = [. | up] and gate [M, K] = silu of x's
// first half; kept[s] += inputs of s kept. data: fp32/bf16/fp16 [K, N] in x's dtype, or int8 with
// fp32 scales [N]. Contiguous tensors.
void sparse_gemv(const at::Tensor& x, const at::Tensor& data, const at::Tensor& thresholds, at::IntArrayRef splits,
                 const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& rstd,
                 const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scales,
                 const std::optional<at::Tensor>& kept, const at::Tensor& out) {
  const int64_t K = data.size(0), N = data.size(1), M = x.size(0);
  const int64_t S = static_cast<int64_t>(splits.size());
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == M && out.size(1) == N, "x [M, in], out [M, out]");
  TORCH_CHECK(M <= 64, "at most 64 rows of x");
  const bool swiglu = gate.has_value();
  TORCH_CHECK(x.size(1) == (swiglu ? 2 * K : K), "x has ", x.size(1), " features, the weight ", K, swiglu ? " (x2: swiglu)" : "");
  TORCH_CHECK(x.is_contiguous() && data.is_contiguous() && out.is_contiguous() && out.dtype() == x.dtype(), "contiguous x, data, out");
  TORCH_CHECK(!x.is_cuda() && !data.is_cuda(), "CPU tensors");
  TORCH_CHECK(thresholds.dtype() == at::kFloat && thresholds.numel() == S && thresholds.is_contiguous(), "fp32 threshold a segment");
  int64_t sum = 0;
  for (int64_t w : splits) sum += w;
  TORCH_CHECK(sum == N, "splits do not sum to the weight's ", N, " columns");
  TORCH_CHECK(!norm_weight || (norm_weight->dtype() == x.dtype() && norm_weight->numel() == K && norm_weight->is_contiguous()), "norm_weight [in] in x's dtype");
  TORCH_CHECK(!(norm_weight && swiglu), "norm_weight or gate, not both");
  TORCH_CHECK(norm_weight.has_value() == rstd.has_value(), "norm_weight goes with rstd");
  TORCH_CHECK(!rstd || (rstd->dtype() == at::kFloat && rstd->numel() == M && rstd->is_contiguous()), "rstd fp32 [M]");
  TORCH_CHECK(!gate || (gate->dtype() == x.dtype() && gate->size(0) == M && gate->numel() == M * K && gate->is_contiguous()), "gate [M, in] in x's dtype");
  TORCH_CHECK(!residual || (residual->dtype() == x.dtype() && residual->sizes() == out.sizes() && residual->is_contiguous()), "residual [M, out] in x's dtype");
  const bool int8 = data.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == scales.has_value(), "int8 weights take scales, others none");
  TORCH_CHECK(!scales || (scales->dtype() == at::kFloat && scales->numel() == N && scales->is_contiguous()), "scales fp32 [out]");
  TORCH_CHECK(!kept || (kept->dtype() == at::kLong && kept->numel() == S && kept->is_contiguous()), "kept int64 a segment");
  TORCH_CHECK(int8 || data.scalar_type() == x.scalar_type(), "float weights in x's dtype");
  const std::vector<int64_t> segs(splits.begin(), splits.end());
  int64_t* kp = kept ? kept->data_ptr<int64_t>() : nullptr;
  const float* tp = thresholds.data_ptr<float>();
  const float* sc = scales ? scales->data_ptr<float>() : nullptr;
  const auto run = [&](auto xtype, auto wtype) {
    using X = decltype(xtype);
    using T = decltype(wtype);
    gemv<X, T>(x.data_ptr<X>(), M, x.size(1), data.data_ptr<T>(), K, N, segs, tp, norm_weight ? norm_weight->data_ptr<X>() : nullptr,
               rstd ? rstd->data_ptr<float>() : nullptr, gate ? gate->data_ptr<X>() : nullptr,
               residual ? residual->data_ptr<X>() : nullptr, sc, kp, out.data_ptr<X>());
  };
  switch (x.scalar_type()) {
    case at::kFloat: int8 ? run(float(), int8_t()) : run(float(), float()); break;
    case at::kBFloat16: int8 ? run(c10::BFloat16(), int8_t()) : run(c10::BFloat16(), c10::BFloat16()); break;
    case at::kHalf: int8 ? run(c10::Half(), int8_t()) : run(c10::Half(), c10::Half()); break;
    default: TORCH_CHECK(false, "x must be fp32, bf16 or fp16, got ", x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(teal_cpu, m) {
  m.def("sparse_gemv(Tensor x, Tensor data, Tensor thresholds, int[] splits, Tensor? norm_weight, Tensor? rstd, Tensor? gate, "
        "Tensor? residual, Tensor? scales, Tensor(a!)? kept, Tensor(b!) out) -> ()");
  m.impl("sparse_gemv", c10::DispatchKey::CPU, TORCH_FN(sparse_gemv));
  m.def("dense_linear(Tensor x, Tensor weight, Tensor(a!) out) -> ()");
  m.impl("dense_linear", c10::DispatchKey::CPU, TORCH_FN(dense_linear));
}
