// Fused one-token decoding steps for Mamba and Mamba-2 on the CPU (float32 activations; float32 or int8
// weights), and the matrix-vector kernel they are built on.
//
// Decoding one token reads every weight once and does two flops per weight, so its time is the time to
// stream the weights from memory. The kernel is written for that. Its weights are stored in panels
// (`pack_weight`): 16 output rows at a time, column by column, so panel p holds W[16p .. 16p + 16, k] for
// k = 0 .. K-1 as one contiguous run of K vectors of 16 (the last panel zero-padded). A task streams whole
// panels front to back: one sequential read per thread, which the hardware prefetchers follow at full speed,
// where 16 rows read side by side are 16 short streams (for int8 rows of 768 bytes, too short for the
// prefetchers: 2-3x slower, measured). Each weight vector is multiplied by a broadcast x[b, k] into one
// accumulator per batch row, so the 16 rows' sums need no horizontal reduction and a tile of 4 batch rows
// reuses each weight vector from a register (batch 16 runs near the machine's multiply-add rate, not its
// memory rate). Vectors are GCC/Clang vector extensions (AVX-512 or 2 x AVX2 with -march=native, NEON on arm64);
// int8 weights are converted to float in registers and the per-output-channel scale is applied once per sum.
//
// Nothing is allocated per token: every intermediate lives in buffers the caller passes in. The recurrent
// state is read from the "in" tensors and written to distinct "out" tensors, so a caller can keep the state
// it passed in (generation freezes finished rows from it). Equations: see ssmkit/ops/decode/reference.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define SSMKIT_X86 1
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Denormals flushed to zero on this thread while in scope: a decaying state passes through denormal
// magnitudes, which cost ~100x a normal operation on x86.
class FlushDenormalsGuard {
 public:
  FlushDenormalsGuard() {
#if defined(SSMKIT_X86)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr | (uint64_t(1) << 24)));  // FZ
#endif
  }
  ~FlushDenormalsGuard() {
#if defined(SSMKIT_X86)
    _mm_setcsr(static_cast<unsigned>(saved_));
#elif defined(__aarch64__)
    uint64_t fpcr = saved_;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }

 private:
  uint64_t saved_ = 0;
};

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v8f load8(const int8_t* p) {
#if defined(__AVX2__)
  // sign-extend 8 bytes to 8 int32 and convert: two instructions (GCC scalarises the generic conversion)
  __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8b b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
#endif
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// exp on 8 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, p the degree-6 polynomial of Cephes' expf
// (relative error ~2e-7). Inputs below -87 give 0 (as they would after the denormal flush).
inline v8f vexp(v8f x) {
  const v8f hi = splat(88.3762626647949f), lo = splat(-87.3f);
  x = x < hi ? x : hi;
  v8i under = x < lo;
  x = x > lo ? x : lo;
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  v8f n = (x * splat(1.44269504088896341f) + magic) - magic;
  v8f r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  v8f out = p * scale;
  v8i out_bits;
  std::memcpy(&out_bits, &out, sizeof(out));
  out_bits &= ~under;
  std::memcpy(&out, &out_bits, sizeof(out));
  return out;
}

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }
inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// log1p(t) on 8 lanes for t in [0, 1]: 1 + t = 2^e (1 + f) with f in [sqrt(1/2) - 1, sqrt(2) - 1] and
// log1p(f) = f - f^2/2 + f^3 P(f), P Cephes' logf polynomial (relative error ~1e-7). For t <= sqrt(2) - 1,
// f = t exactly, so small t keeps its relative precision (softplus of a very negative dt depends on it).
inline v8f vlog1p_unit(v8f t) {
  const v8i big = t > splat(0.41421356f);
  const v8f halved = (t + splat(1.f)) * splat(0.5f) - splat(1.f);  // e = 1: 1 + t = 2 (1 + f)
  const v8f f = big ? halved : t;
  const v8f z = f * f;
  v8f p = splat(7.0376836292e-2f);
  p = p * f + splat(-1.1514610310e-1f);
  p = p * f + splat(1.1676998740e-1f);
  p = p * f + splat(-1.2420140846e-1f);
  p = p * f + splat(1.4249322787e-1f);
  p = p * f + splat(-1.6668057665e-1f);
  p = p * f + splat(2.0000714765e-1f);
  p = p * f + splat(-2.4999993993e-1f);
  p = p * f + splat(3.3333331174e-1f);
  const v8f l = f + (p * f * z - splat(0.5f) * z);
  return big ? l + splat(0.69314718056f) : l;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), and x itself above 20 (torch's threshold), in place.
inline void softplus_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = load8(x + i);
    const v8f a = v < splat(0.f) ? -v : v;
    const v8f pos = v > splat(0.f) ? v : splat(0.f);
    const v8f sp = pos + vlog1p_unit(vexp(-a));
    store8(x + i, v > splat(20.f) ? v : sp);
  }
  for (; i < n; ++i) x[i] = softplus(x[i]);
}

// silu(x) = x / (1 + exp(-x)), in place.
inline void silu_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = load8(x + i);
    store8(x + i, v / (splat(1.f) + vexp(-v)));
  }
  for (; i < n; ++i) x[i] = silu(x[i]);
}

// ---------------------------------------------------------------------------------------------------------
// The matrix-vector kernel on panels of 16 rows
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kPanel = 16;
typedef float v16f __attribute__((vector_size(64)));
typedef int8_t v16b __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v16f load16(const int8_t* p) {
#if defined(__AVX512F__)
  // sign-extend 16 bytes to 16 int32 and convert: two instructions (the generic conversion is scalarised)
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  v16f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8f lo = load8(p), hi = load8(p + 8);
  v16f v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#endif
}

// y[b, 16p + r] = scale[.] * sum_k P[k, r] x[b, k] + bias[.] for the panel P (K, 16), batch rows b < NB.
// S independent accumulators per batch row over interleaved k (the sum of one row of a small batch would
// otherwise wait on the multiply-add latency at every k), added in a fixed order at the end.
template <int NB, int S, typename WT>
inline void panel_tile(const WT* P, int64_t K, const float* x, int64_t ldx, float acc_out[NB][kPanel]) {
  v16f acc[S][NB];
  for (int s = 0; s < S; ++s)
    for (int b = 0; b < NB; ++b) acc[s][b] = v16f{};
  int64_t k = 0;
  for (; k + S <= K; k += S)
    for (int s = 0; s < S; ++s) {
      const v16f w = load16(P + (k + s) * kPanel);
      for (int b = 0; b < NB; ++b) acc[s][b] += w * x[b * ldx + k + s];
    }
  for (; k < K; ++k) {
    const v16f w = load16(P + k * kPanel);
    for (int b = 0; b < NB; ++b) acc[0][b] += w * x[b * ldx + k];
  }
  for (int b = 0; b < NB; ++b) {
    v16f sum = acc[0][b];
    for (int s = 1; s < S; ++s) sum += acc[s][b];
    std::memcpy(acc_out[b], &sum, sizeof(sum));
  }
}

// A linear map as the kernels see it: panels (ceil(M / 16), K, 16) float32 or int8 (then scale (M,)),
// optional bias (M,).
struct Linear {
  const void* panels = nullptr;
  bool int8 = false;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t M = 0, K = 0;
};

template <int NB, int S, typename WT>
inline void panel_rows(const Linear& L, const WT* P, int64_t p, const float* x, int64_t ldx, float* y,
                       int64_t ldy) {
  float acc[NB][kPanel];
  panel_tile<NB, S>(P, L.K, x, ldx, acc);
  const int64_t m0 = p * kPanel, rows = std::min(kPanel, L.M - m0);
  for (int b = 0; b < NB; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      float v = acc[b][r];
      if (L.scale) v *= L.scale[m0 + r];
      if (L.bias) v += L.bias[m0 + r];
      y[b * ldy + m0 + r] = v;
    }
}

// One panel for every batch row, in tiles of 4 rows (4 x 4 accumulators in registers; each weight vector
// loaded once per tile, from L1/L2 after the first tile). Every tile uses the same 4 accumulator splits, so
// a row's result does not depend on the batch it is computed in. Measured at 2 threads on the 130M shape:
// batch 1 streams ~30 GB/s float32 and ~40 GB/s int8; batch 16 runs at ~130-190 GFLOP/s (tiles of 8 or 16
// rows with fewer splits were no faster at batch 16 and slower at batch 1).
template <typename WT>
void panel_all_batches(const Linear& L, int64_t p, const float* x, int64_t ldx, int64_t batch, float* y,
                       int64_t ldy) {
  constexpr int S = 4;
  const WT* P = static_cast<const WT*>(L.panels) + p * L.K * kPanel;
  int64_t b = 0;
  for (; b + 4 <= batch; b += 4) panel_rows<4, S>(L, P, p, x + b * ldx, ldx, y + b * ldy, ldy);
  const float* xb = x + b * ldx;
  float* yb = y + b * ldy;
  switch (batch - b) {
    case 1: panel_rows<1, S>(L, P, p, xb, ldx, yb, ldy); break;
    case 2: panel_rows<2, S>(L, P, p, xb, ldx, yb, ldy); break;
    case 3: panel_rows<3, S>(L, P, p, xb, ldx, yb, ldy); break;
    default: break;
  }
}

const float* optional_data(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// weight (M, K) float32 or int8 -> panels (ceil(M / 16), K, 16) of the same dtype, zero-padded rows.
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_weight: weight must be an (M, K) matrix, got ", weight.dim(), " dims");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kChar,
              "pack_weight: weight must be float32 or int8, got ", weight.scalar_type());
  const int64_t M = weight.size(0), K = weight.size(1), panels = (M + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, K}, weight.options());
  padded.narrow(0, 0, M).copy_(weight);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

// panels as made by pack_weight for a map with M outputs; scale (M,) float32 for int8 panels, else empty.
Linear make_linear(const torch::Tensor& panels, const torch::Tensor& scale, const torch::Tensor& bias, int64_t M,
                   const char* name) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.is_contiguous() &&
                  panels.size(0) == (M + kPanel - 1) / kPanel,
              name, ": weight must be the contiguous panels of pack_weight, (", (M + kPanel - 1) / kPanel,
              ", K, 16) for ", M, " outputs; got ", panels.sizes());
  Linear L;
  L.M = M;
  L.K = panels.size(1);
  if (panels.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.numel() == M && scale.scalar_type() == at::kFloat && scale.is_contiguous(), name,
                ": int8 weights need a float32 scale of shape (", M, ",)");
    L.int8 = true;
    L.panels = panels.data_ptr<int8_t>();
    L.scale = scale.data_ptr<float>();
  } else {
    TORCH_CHECK(panels.scalar_type() == at::kFloat, name, ": weight must be float32 or int8");
    TORCH_CHECK(scale.numel() == 0, name, ": a float32 weight takes no scale");
    L.panels = panels.data_ptr<float>();
  }
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == M && bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              name, ": bias must be empty or float32 (", M, ",)");
  L.bias = optional_data(bias);
  return L;
}

Linear make_linear(const std::vector<torch::Tensor>& args, int64_t M, const char* name) {
  TORCH_CHECK(args.size() == 3, name, ": expected [panels, scale, bias]");
  return make_linear(args[0], args[1], args[2], M, name);
}

// y (batch, ldy) <- x (batch, ldx) @ W^T: panels spread over threads, at least 4 per task (64 rows), so that
// small maps such as x_proj stay on one thread where a thread switch would cost more than the work.
void apply_linear(const Linear& L, const float* x, int64_t ldx, int64_t batch, float* y, int64_t ldy) {
  const int64_t panels = (L.M + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush;
    for (int64_t p = begin; p < end; ++p) {
      if (L.int8)
        panel_all_batches<int8_t>(L, p, x, ldx, batch, y, ldy);
      else
        panel_all_batches<float>(L, p, x, ldx, batch, y, ldy);
    }
  });
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be a contiguous float32 tensor");
}

// ---------------------------------------------------------------------------------------------------------
// Python entry points
// ---------------------------------------------------------------------------------------------------------
void linear_out(const torch::Tensor& x, const torch::Tensor& panels, const torch::Tensor& scale,
                const torch::Tensor& bias, torch::Tensor& out) {
  check_f32(x, "x");
  check_f32(out, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0), "out must be (batch, M) for x of shape ", x.sizes());
  Linear L = make_linear(panels, scale, bias, out.size(1), "linear");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.K, "x must be (batch, ", L.K, "), got ", x.sizes());
  apply_linear(L, x.data_ptr<float>(), L.K, x.size(0), out.data_ptr<float>(), L.M);
}

// Pre-norm of the residual block: normed[b] = h[b] / sqrt(mean(h[b]^2) + eps) * weight (ssmkit's RMSNorm).
void rmsnorm_rows(const float* h, const float* weight, float eps, int64_t batch, int64_t D, float* normed) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* hb = h + b * D;
    float sq = 0.f;
    for (int64_t c = 0; c < D; ++c) sq += hb[c] * hb[c];
    const float inv = 1.f / std::sqrt(sq / float(D) + eps);
    for (int64_t c = 0; c < D; ++c) normed[b * D + c] = hb[c] * inv * weight[c];
  }
}

void add_into(float* h, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += y[i];
}

// Depthwise causal conv of one step + silu: window = [state (width-1 columns, oldest first), x].
inline void conv_step(const float* x, const float* state_in, float* state_out, const float* w, const float* bias,
                      int64_t channels, int64_t width, float* u) {
  const int64_t keep = width - 1;
  for (int64_t c = 0; c < channels; ++c) {
    const float* s = state_in + c * keep;
    const float* wc = w + c * width;
    float acc = 0.f;
    for (int64_t j = 0; j < keep; ++j) acc += wc[j] * s[j];
    acc += wc[keep] * x[c];
    if (bias) acc += bias[c];
    u[c] = acc;
    float* so = state_out + c * keep;
    for (int64_t j = 0; j + 1 < keep; ++j) so[j] = s[j + 1];
    if (keep > 0) so[keep - 1] = x[c];
  }
  silu_inplace(u, channels);
}

// Row-wise work of a batch on the intra-op threads, a row per task (a single row stays on this thread).
template <typename F>
void for_each_row(int64_t batch, const F& f) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush;
    for (int64_t b = begin; b < end; ++b) f(b);
  });
}

// One residual block around a Mamba mixer: h <- h + mixer(rmsnorm(h)); x receives rmsnorm(h).
// Mamba (Gu & Dao 2023): in_proj -> conv + silu -> x_proj -> dt_proj -> selective state update -> gate ->
// out_proj. Buffers: xz (B, 2 d_inner), u (B, d_inner), x_dbl (B, R + 2N), delta (B, d_inner), y (B, d_inner).
void mamba_step(torch::Tensor& h, const torch::Tensor& block_norm, double block_eps, torch::Tensor& x,
                const std::vector<torch::Tensor>& in_proj,
                const torch::Tensor& conv_weight, const torch::Tensor& conv_bias,
                const std::vector<torch::Tensor>& x_proj, const std::vector<torch::Tensor>& dt_proj,
                const torch::Tensor& A, const torch::Tensor& D, const std::vector<torch::Tensor>& out_proj,
                const torch::Tensor& conv_in, const torch::Tensor& ssm_in, torch::Tensor& conv_out,
                torch::Tensor& ssm_out, torch::Tensor& xz, torch::Tensor& u, torch::Tensor& x_dbl,
                torch::Tensor& delta, torch::Tensor& y, torch::Tensor& out) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{
           &x, &conv_weight, &A, &D, &conv_in, &ssm_in, &conv_out, &ssm_out, &xz, &u, &x_dbl, &delta, &y, &out})
    check_f32(*t, "mamba_step tensors");
  TORCH_CHECK(h.dim() == 2, "mamba_step: h must be (batch, d_model)");
  TORCH_CHECK(dt_proj.size() == 3 && dt_proj[0].dim() == 3, "dt_proj: expected [panels, scale, bias]");
  const int64_t batch = x.size(0), d_model = h.size(1), d_inner = A.size(0), N = A.size(1);
  const int64_t width = conv_weight.size(1), R = dt_proj[0].size(1);
  const Linear Lin = make_linear(in_proj, 2 * d_inner, "in_proj");
  const Linear Lx = make_linear(x_proj, R + 2 * N, "x_proj");
  const Linear Ldt = make_linear(dt_proj, d_inner, "dt_proj");
  const Linear Lout = make_linear(out_proj, d_model, "out_proj");
  TORCH_CHECK(Lin.K == d_model && Lx.K == d_inner && Lout.K == d_inner, "mamba_step: inconsistent shapes");
  FlushDenormalsGuard flush;
  check_f32(h, "h");
  rmsnorm_rows(h.data_ptr<float>(), block_norm.data_ptr<float>(), float(block_eps), batch, Lin.K, x.data_ptr<float>());
  apply_linear(Lin, x.data_ptr<float>(), Lin.K, batch, xz.data_ptr<float>(), 2 * d_inner);
  const float* cb = optional_data(conv_bias);
  for_each_row(batch, [&](int64_t b) {
    conv_step(xz.data_ptr<float>() + b * 2 * d_inner, conv_in.data_ptr<float>() + b * d_inner * (width - 1),
              conv_out.data_ptr<float>() + b * d_inner * (width - 1), conv_weight.data_ptr<float>(), cb, d_inner,
              width, u.data_ptr<float>() + b * d_inner);
  });
  apply_linear(Lx, u.data_ptr<float>(), d_inner, batch, x_dbl.data_ptr<float>(), R + 2 * N);
  apply_linear(Ldt, x_dbl.data_ptr<float>(), R + 2 * N, batch, delta.data_ptr<float>(), d_inner);  // bias inside
  // delta <- dt = softplus(delta) and z <- silu(z), in place in the scratch buffers, before the state update
  for_each_row(batch, [&](int64_t b) {
    softplus_inplace(delta.data_ptr<float>() + b * d_inner, d_inner);
    silu_inplace(xz.data_ptr<float>() + b * 2 * d_inner + d_inner, d_inner);
  });
  const float* Ap = A.data_ptr<float>();
  const float* Dp = D.numel() ? D.data_ptr<float>() : nullptr;
  const float* hin = ssm_in.data_ptr<float>();
  float* hout = ssm_out.data_ptr<float>();
  const float* xzp = xz.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* xd = x_dbl.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, batch * d_inner, 256, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush_inner;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / d_inner, c = i % d_inner;
      const float dt = dp[i];  // softplus applied above
      const float uc = up[i];
      const float* Bv = xd + b * (R + 2 * N) + R;
      const float* Cv = Bv + N;
      const float* h0 = hin + i * N;
      float* h1 = hout + i * N;
      const float* Ac = Ap + c * N;
      float acc = 0.f;
      int64_t n = 0;
      v8f accv = splat(0.f);
      for (; n + 8 <= N; n += 8) {
        v8f h = vexp(splat(dt) * load8(Ac + n)) * load8(h0 + n) + splat(dt * uc) * load8(Bv + n);
        store8(h1 + n, h);
        accv += h * load8(Cv + n);
      }
      acc = hsum(accv);
      for (; n < N; ++n) {
        float h = std::exp(dt * Ac[n]) * h0[n] + dt * uc * Bv[n];
        h1[n] = h;
        acc += h * Cv[n];
      }
      if (Dp) acc += Dp[c] * uc;
      yp[i] = acc * xzp[b * 2 * d_inner + d_inner + c];  // silu(z) applied above
    }
  });
  apply_linear(Lout, yp, d_inner, batch, out.data_ptr<float>(), Lout.M);
  add_into(h.data_ptr<float>(), out.data_ptr<float>(), batch * Lout.M);
}

// One residual block around a Mamba-2 mixer: h <- h + mixer(rmsnorm(h)); x receives rmsnorm(h).
// Mamba-2 (Dao & Gu 2024): in_proj -> conv + silu over [x, B, C] -> per-head state update -> (gated RMSNorm
// | y * silu(z)) -> out_proj. Buffers: zxbcdt (B, 2 d_inner + 2 G N + H), xbc (B, conv_dim), y (B, d_inner).
// norm_mode: 0 no norm (y * silu(z)), 1 rmsnorm(y * silu(z)) * w, 2 rmsnorm(y) * w * silu(z).
void mamba2_step(torch::Tensor& h, const torch::Tensor& block_norm, double block_eps, torch::Tensor& x,
                 const std::vector<torch::Tensor>& in_proj,
                 const torch::Tensor& conv_weight, const torch::Tensor& conv_bias, const torch::Tensor& dt_bias,
                 const torch::Tensor& A, const torch::Tensor& D, const torch::Tensor& norm_weight, int64_t norm_mode,
                 double norm_eps, int64_t ngroups_norm, double dt_min, double dt_max, bool clamp_dt,
                 const std::vector<torch::Tensor>& out_proj, int64_t headdim, int64_t ngroups,
                 const torch::Tensor& conv_in, const torch::Tensor& ssm_in, torch::Tensor& conv_out,
                 torch::Tensor& ssm_out, torch::Tensor& zxbcdt, torch::Tensor& xbc, torch::Tensor& y,
                 torch::Tensor& out) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{
           &x, &conv_weight, &dt_bias, &A, &D, &conv_in, &ssm_in, &conv_out, &ssm_out, &zxbcdt, &xbc, &y, &out})
    check_f32(*t, "mamba2_step tensors");
  TORCH_CHECK(h.dim() == 2 && ssm_in.dim() == 4, "mamba2_step: h must be (batch, d_model), ssm_in (B, H, P, N)");
  const int64_t batch = x.size(0), d_model = h.size(1), H = A.size(0), P = headdim, G = ngroups, N = ssm_in.size(3);
  const int64_t d_inner = H * P, conv_dim = d_inner + 2 * G * N, width = conv_weight.size(1);
  const int64_t d_in_proj = 2 * d_inner + 2 * G * N + H;
  const Linear Lin = make_linear(in_proj, d_in_proj, "in_proj");
  const Linear Lout = make_linear(out_proj, d_model, "out_proj");
  TORCH_CHECK(Lin.K == d_model && Lout.K == d_inner && conv_weight.size(0) == conv_dim,
              "mamba2_step: inconsistent shapes");
  FlushDenormalsGuard flush;
  check_f32(h, "h");
  rmsnorm_rows(h.data_ptr<float>(), block_norm.data_ptr<float>(), float(block_eps), batch, Lin.K, x.data_ptr<float>());
  apply_linear(Lin, x.data_ptr<float>(), Lin.K, batch, zxbcdt.data_ptr<float>(), d_in_proj);
  const float* cb = optional_data(conv_bias);
  for_each_row(batch, [&](int64_t b) {
    conv_step(zxbcdt.data_ptr<float>() + b * d_in_proj + d_inner,
              conv_in.data_ptr<float>() + b * conv_dim * (width - 1),
              conv_out.data_ptr<float>() + b * conv_dim * (width - 1), conv_weight.data_ptr<float>(), cb, conv_dim,
              width, xbc.data_ptr<float>() + b * conv_dim);
    silu_inplace(zxbcdt.data_ptr<float>() + b * d_in_proj, d_inner);  // z <- silu(z) in the scratch buffer
  });
  const float* Ap = A.data_ptr<float>();
  const float* dtb = dt_bias.data_ptr<float>();
  const float* Dp = D.numel() ? D.data_ptr<float>() : nullptr;
  const bool D_per_channel = D.numel() == d_inner;
  const float* zp = zxbcdt.data_ptr<float>();
  const float* xp = xbc.data_ptr<float>();
  const float* hin = ssm_in.data_ptr<float>();
  float* hout = ssm_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t heads_per_group = H / G;
  at::parallel_for(0, batch * H, 4, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush_inner;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / heads_per_group;
      float dt = softplus(zp[b * d_in_proj + 2 * d_inner + 2 * G * N + h] + dtb[h]);
      if (clamp_dt) dt = std::min(std::max(dt, float(dt_min)), float(dt_max));
      const float dA = std::exp(dt * Ap[h]);
      const float* xv = xp + b * conv_dim + h * P;
      const float* Bv = xp + b * conv_dim + d_inner + g * N;
      const float* Cv = Bv + G * N;
      for (int64_t p = 0; p < P; ++p) {
        const float* s0 = hin + (i * P + p) * N;
        float* s1 = hout + (i * P + p) * N;
        const float dtx = dt * xv[p];
        v8f accv = splat(0.f);
        int64_t n = 0;
        for (; n + 8 <= N; n += 8) {
          v8f s = splat(dA) * load8(s0 + n) + splat(dtx) * load8(Bv + n);
          store8(s1 + n, s);
          accv += s * load8(Cv + n);
        }
        float acc = hsum(accv);
        for (; n < N; ++n) {
          float s = dA * s0[n] + dtx * Bv[n];
          s1[n] = s;
          acc += s * Cv[n];
        }
        if (Dp) acc += (D_per_channel ? Dp[h * P + p] : Dp[h]) * xv[p];
        if (norm_mode == 0) acc *= zp[b * d_in_proj + h * P + p];  // silu(z), applied above
        yp[b * d_inner + h * P + p] = acc;
      }
    }
  });
  if (norm_mode != 0) {
    const float* w = norm_weight.data_ptr<float>();
    const int64_t group = d_inner / ngroups_norm;
    for (int64_t b = 0; b < batch; ++b) {
      float* yb = yp + b * d_inner;
      const float* zb = zp + b * d_in_proj;
      if (norm_mode == 1)
        for (int64_t c = 0; c < d_inner; ++c) yb[c] *= zb[c];
      for (int64_t g0 = 0; g0 < d_inner; g0 += group) {
        double sq = 0.0;
        for (int64_t c = g0; c < g0 + group; ++c) sq += double(yb[c]) * yb[c];
        const float rms = 1.f / std::sqrt(float(sq / group) + float(norm_eps));
        for (int64_t c = g0; c < g0 + group; ++c) {
          float v = yb[c] * rms * w[c];
          if (norm_mode == 2) v *= zb[c];
          yb[c] = v;
        }
      }
    }
  }
  apply_linear(Lout, yp, d_inner, batch, out.data_ptr<float>(), Lout.M);
  add_into(h.data_ptr<float>(), out.data_ptr<float>(), batch * Lout.M);
}

// The kernels' vectorised softplus and silu on a tensor (a copy), for tests of their accuracy.
torch::Tensor activation(const std::string& name, const torch::Tensor& x) {
  check_f32(x, "x");
  torch::Tensor y = x.clone();
  FlushDenormalsGuard flush;
  if (name == "softplus")
    softplus_inplace(y.data_ptr<float>(), y.numel());
  else if (name == "silu")
    silu_inplace(y.data_ptr<float>(), y.numel());
  else
    TORCH_CHECK(false, "activation: name must be 'softplus' or 'silu', got '", name, "'");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("activation", &activation, "the kernels' vectorised softplus or silu of x (a copy), for tests");
  m.def("pack_weight", &pack_weight, "weight (M, K) float32 or int8 -> panels (ceil(M/16), K, 16), the kernels' layout");
  m.def("linear_out", &linear_out,
        "out (B, M) <- x @ W^T (* scale) (+ bias); W as pack_weight's panels, float32 or int8 (per-row scale)");
  m.def("mamba_step", &mamba_step, "one fused Mamba decoding step (state read from *_in, written to *_out)");
  m.def("mamba2_step", &mamba2_step, "one fused Mamba-2 decoding step (state read from *_in, written to *_out)");
}
