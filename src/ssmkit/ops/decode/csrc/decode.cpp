// Fused one-token decoding steps for Mamba and Mamba-2 on the CPU (float32 activations; float32 or int8
// weights), and the matrix-vector kernel they are built on.
//
// Decoding one token reads every weight once and does two flops per weight, so its time is the time to
// stream the weights from memory. The kernel below is written for that: each task owns a block of 4 output
// rows and streams them once, with 8-wide vectors (GCC/Clang vector extensions: AVX2/AVX-512 with
// -march=native, NEON on arm64) and one accumulator per (row, batch row) pair, so a batch of up to 4 rows
// reuses each weight vector from a register (a larger batch reuses it from L1). int8 weights are converted to
// float in registers and the per-output-channel scale is applied once per dot product.
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

// The matrix-vector kernel's vector: 16 floats where AVX-512 exists (half the instructions per weight, which
// matters for int8, whose conversion to float costs more than the multiply-add), else 8.
#if defined(__AVX512F__)
typedef float vw __attribute__((vector_size(64)));
constexpr int kWidth = 16;
inline vw loadw(const float* p) {
  vw v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vw loadw(const int8_t* p) {
  __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  vw v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
}
inline float hsumw(vw v) {
  v8f lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return hsum(lo + hi);
}
#else
typedef v8f vw;
constexpr int kWidth = 8;
inline vw loadw(const float* p) { return load8(p); }
inline vw loadw(const int8_t* p) { return load8(p); }
inline float hsumw(vw v) { return hsum(v); }
#endif

// ---------------------------------------------------------------------------------------------------------
// y[b, m] = scale[m] * sum_k W[m, k] x[b, k] + bias[m]   for m in [m0, m0 + 4), b in [b0, b0 + BT)
// ---------------------------------------------------------------------------------------------------------
template <int BT, typename WT>
inline void rows4(const WT* W, int64_t K, int64_t M, int64_t m0, const float* x, int64_t ldx, int64_t b0,
                  const float* scale, const float* bias, float* y, int64_t ldy) {
  const WT* w[4];
  for (int r = 0; r < 4; ++r) w[r] = W + std::min(m0 + r, M - 1) * K;  // past the end: recompute the last row
  const float* xb[BT];
  for (int b = 0; b < BT; ++b) xb[b] = x + (b0 + b) * ldx;
  vw acc[BT][4];
  for (int b = 0; b < BT; ++b)
    for (int r = 0; r < 4; ++r) acc[b][r] = vw{} ;
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    vw wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = loadw(w[r] + k);
    for (int b = 0; b < BT; ++b) {
      vw xv = loadw(xb[b] + k);
      for (int r = 0; r < 4; ++r) acc[b][r] += wv[r] * xv;
    }
  }
  for (int b = 0; b < BT; ++b) {
    for (int r = 0; r < 4 && m0 + r < M; ++r) {
      float s = hsumw(acc[b][r]);
      for (int64_t kk = k; kk < K; ++kk) s += float(w[r][kk]) * xb[b][kk];
      const int64_t m = m0 + r;
      if (scale) s *= scale[m];
      if (bias) s += bias[m];
      y[(b0 + b) * ldy + m] = s;
    }
  }
}

template <typename WT>
void rows4_all_batches(const WT* W, int64_t K, int64_t M, int64_t m0, const float* x, int64_t ldx, int64_t batch,
                       const float* scale, const float* bias, float* y, int64_t ldy) {
  int64_t b0 = 0;
  for (; b0 + 4 <= batch; b0 += 4) rows4<4>(W, K, M, m0, x, ldx, b0, scale, bias, y, ldy);
  switch (batch - b0) {
    case 3: rows4<3>(W, K, M, m0, x, ldx, b0, scale, bias, y, ldy); break;
    case 2: rows4<2>(W, K, M, m0, x, ldx, b0, scale, bias, y, ldy); break;
    case 1: rows4<1>(W, K, M, m0, x, ldx, b0, scale, bias, y, ldy); break;
    default: break;
  }
}

// A linear map as the kernels see it: weight (M, K) float32 or int8 (then scale (M,)), optional bias (M,).
struct Linear {
  const void* weight = nullptr;
  bool int8 = false;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t M = 0, K = 0;
};

const float* optional_data(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

Linear make_linear(const torch::Tensor& weight, const torch::Tensor& scale, const torch::Tensor& bias,
                   const char* name) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), name, ": weight must be a contiguous (M, K) matrix");
  Linear L;
  L.M = weight.size(0);
  L.K = weight.size(1);
  if (weight.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.numel() == L.M && scale.scalar_type() == at::kFloat, name,
                ": int8 weights need a float32 scale of shape (M,)");
    L.int8 = true;
    L.weight = weight.data_ptr<int8_t>();
    L.scale = scale.data_ptr<float>();
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kFloat, name, ": weight must be float32 or int8");
    TORCH_CHECK(scale.numel() == 0, name, ": a float32 weight takes no scale");
    L.weight = weight.data_ptr<float>();
  }
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == L.M && bias.scalar_type() == at::kFloat), name,
              ": bias must be empty or float32 (M,)");
  L.bias = optional_data(bias);
  return L;
}

// y (batch, ldy) <- x (batch, ldx) @ W^T: rows spread over threads in blocks of 4 (16 blocks per task at
// least, so that small maps such as x_proj stay on one thread where a thread switch would cost more).
void apply_linear(const Linear& L, const float* x, int64_t ldx, int64_t batch, float* y, int64_t ldy) {
  const int64_t blocks = (L.M + 3) / 4;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush;
    for (int64_t blk = begin; blk < end; ++blk) {
      if (L.int8)
        rows4_all_batches(static_cast<const int8_t*>(L.weight), L.K, L.M, blk * 4, x, ldx, batch, L.scale, L.bias,
                          y, ldy);
      else
        rows4_all_batches(static_cast<const float*>(L.weight), L.K, L.M, blk * 4, x, ldx, batch, L.scale, L.bias,
                          y, ldy);
    }
  });
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be a contiguous float32 tensor");
}

// ---------------------------------------------------------------------------------------------------------
// Python entry points
// ---------------------------------------------------------------------------------------------------------
void linear_out(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                const torch::Tensor& bias, torch::Tensor& out) {
  check_f32(x, "x");
  check_f32(out, "out");
  Linear L = make_linear(weight, scale, bias, "linear");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.K, "x must be (batch, K)");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == L.M, "out must be (batch, M)");
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
    u[c] = silu(acc);
    float* so = state_out + c * keep;
    for (int64_t j = 0; j + 1 < keep; ++j) so[j] = s[j + 1];
    if (keep > 0) so[keep - 1] = x[c];
  }
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
  const Linear Lin = make_linear(in_proj[0], in_proj[1], in_proj[2], "in_proj");
  const Linear Lx = make_linear(x_proj[0], x_proj[1], x_proj[2], "x_proj");
  const Linear Ldt = make_linear(dt_proj[0], dt_proj[1], dt_proj[2], "dt_proj");
  const Linear Lout = make_linear(out_proj[0], out_proj[1], out_proj[2], "out_proj");
  const int64_t batch = x.size(0), d_inner = A.size(0), N = A.size(1), width = conv_weight.size(1);
  const int64_t R = Ldt.K;
  TORCH_CHECK(Lin.M == 2 * d_inner && Lx.M == R + 2 * N && Ldt.M == d_inner && Lout.K == d_inner,
              "mamba_step: inconsistent shapes");
  FlushDenormalsGuard flush;
  check_f32(h, "h");
  rmsnorm_rows(h.data_ptr<float>(), block_norm.data_ptr<float>(), float(block_eps), batch, Lin.K, x.data_ptr<float>());
  apply_linear(Lin, x.data_ptr<float>(), Lin.K, batch, xz.data_ptr<float>(), 2 * d_inner);
  const float* cb = optional_data(conv_bias);
  for (int64_t b = 0; b < batch; ++b)
    conv_step(xz.data_ptr<float>() + b * 2 * d_inner, conv_in.data_ptr<float>() + b * d_inner * (width - 1),
              conv_out.data_ptr<float>() + b * d_inner * (width - 1), conv_weight.data_ptr<float>(), cb, d_inner,
              width, u.data_ptr<float>() + b * d_inner);
  apply_linear(Lx, u.data_ptr<float>(), d_inner, batch, x_dbl.data_ptr<float>(), R + 2 * N);
  apply_linear(Ldt, x_dbl.data_ptr<float>(), R + 2 * N, batch, delta.data_ptr<float>(), d_inner);  // bias inside
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
      const float dt = softplus(dp[i]);
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
      yp[i] = acc * silu(xzp[b * 2 * d_inner + d_inner + c]);
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
  const Linear Lin = make_linear(in_proj[0], in_proj[1], in_proj[2], "in_proj");
  const Linear Lout = make_linear(out_proj[0], out_proj[1], out_proj[2], "out_proj");
  const int64_t batch = x.size(0), H = A.size(0), P = headdim, G = ngroups, N = ssm_in.size(3);
  const int64_t d_inner = H * P, conv_dim = d_inner + 2 * G * N, width = conv_weight.size(1);
  const int64_t d_in_proj = 2 * d_inner + 2 * G * N + H;
  TORCH_CHECK(Lin.M == d_in_proj && Lout.K == d_inner && conv_weight.size(0) == conv_dim,
              "mamba2_step: inconsistent shapes");
  FlushDenormalsGuard flush;
  check_f32(h, "h");
  rmsnorm_rows(h.data_ptr<float>(), block_norm.data_ptr<float>(), float(block_eps), batch, Lin.K, x.data_ptr<float>());
  apply_linear(Lin, x.data_ptr<float>(), Lin.K, batch, zxbcdt.data_ptr<float>(), d_in_proj);
  const float* cb = optional_data(conv_bias);
  for (int64_t b = 0; b < batch; ++b)
    conv_step(zxbcdt.data_ptr<float>() + b * d_in_proj + d_inner,
              conv_in.data_ptr<float>() + b * conv_dim * (width - 1),
              conv_out.data_ptr<float>() + b * conv_dim * (width - 1), conv_weight.data_ptr<float>(), cb, conv_dim,
              width, xbc.data_ptr<float>() + b * conv_dim);
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
        if (norm_mode == 0) acc *= silu(zp[b * d_in_proj + h * P + p]);
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
        for (int64_t c = 0; c < d_inner; ++c) yb[c] *= silu(zb[c]);
      for (int64_t g0 = 0; g0 < d_inner; g0 += group) {
        double sq = 0.0;
        for (int64_t c = g0; c < g0 + group; ++c) sq += double(yb[c]) * yb[c];
        const float rms = 1.f / std::sqrt(float(sq / group) + float(norm_eps));
        for (int64_t c = g0; c < g0 + group; ++c) {
          float v = yb[c] * rms * w[c];
          if (norm_mode == 2) v *= silu(zb[c]);
          yb[c] = v;
        }
      }
    }
  }
  apply_linear(Lout, yp, d_inner, batch, out.data_ptr<float>(), Lout.M);
  add_into(h.data_ptr<float>(), out.data_ptr<float>(), batch * Lout.M);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_out", &linear_out, "out <- x @ W^T (* scale) (+ bias); W float32 or int8 (per-row scale)");
  m.def("mamba_step", &mamba_step, "one fused Mamba decoding step (state read from *_in, written to *_out)");
  m.def("mamba2_step", &mamba2_step, "one fused Mamba-2 decoding step (state read from *_in, written to *_out)");
}
