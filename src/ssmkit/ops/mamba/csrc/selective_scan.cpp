// Core recurrence of Mamba's selective scan (Gu & Dao 2023, Eq. (2), Algorithm 2) on the CPU.
//
//   h_t[n] = exp(dt_t A[n]) h_{t-1}[n] + dt_t u_t B_t[n]        y_t = sum_n C_t[n] h_t[n]
//
// for every (batch b, channel d), with dt_t = softplus(delta_t + delta_bias) (softplus optional) and the output
// (y_t + D u_t) * silu(z_t) (each term optional); channel d reads B and C of group d / (dim / groups).
// Everything elementwise is fused into the per-channel passes, so the only tensors the kernels write are the
// outputs and gradients themselves.
//
// Layouts:  u, delta, z, y: (batch, dim, L), any strides (see RowStrides)   A: (dim, N)   D, delta_bias: (dim,)
//           B, C: (batch, groups, L, N), contiguous (N last: each step reads its N values contiguously)
//                        h0, last state: (batch, dim, N)   checkpoints: (batch, dim, ceil(L/K), N)
//
// Parallelism: one task per (b, d), spread by at::parallel_for (honours torch.set_num_threads). Within a task
// the N states are processed as SIMD vectors (GCC/Clang vector extensions), exp included (vexp below).
// Backward: the state is stored every K steps in forward; the backward replays each chunk of K steps from
// its checkpoint into a small per-task buffer and runs the adjoint recurrence backwards through it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <xmmintrin.h>
#define SSMKIT_X86 1
#endif

namespace {

// Flush denormals to zero on this thread while in scope, restoring the previous mode after. A decaying state
// passes through denormal magnitudes, which cost the CPU ~100x a normal operation (measured: 6x on a scan).
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
    _mm_setcsr(static_cast<unsigned int>(saved_));
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormalsGuard(const FlushDenormalsGuard&) = delete;
  FlushDenormalsGuard& operator=(const FlushDenormalsGuard&) = delete;

 private:
  uint64_t saved_ = 0;
};

// ---- SIMD vectors -----------------------------------------------------------------------------------------
// GCC/Clang vector extensions: 32-byte vectors that the compiler lowers to AVX, 2 x SSE or 2 x NEON
// registers. Written out explicitly because auto-vectorisation of the state loop proved fragile (the
// compiler turned the exp's range clamps into branches and gave up). The state size N is padded to a
// multiple of the lane count with zeros (A = 0, B = C = 0 keeps padded states at exactly 0).
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  static constexpr int kLanes = 8;
  typedef float Vec __attribute__((vector_size(32)));
  typedef int32_t IntVec __attribute__((vector_size(32)));
};

template <>
struct Simd<double> {
  static constexpr int kLanes = 4;
  typedef double Vec __attribute__((vector_size(32)));
  typedef int64_t IntVec __attribute__((vector_size(32)));
};

template <typename T>
using VecOf = typename Simd<T>::Vec;

template <typename T>
inline VecOf<T> splat(T value) {
  return VecOf<T>{} + value;
}

template <typename T>
inline VecOf<T> load(const T* ptr) {
  VecOf<T> v;
  std::memcpy(&v, ptr, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* ptr, VecOf<T> v) {
  std::memcpy(ptr, &v, sizeof(v));
}

template <typename T>
inline T horizontal_sum(VecOf<T> v) {
  constexpr int W = Simd<T>::kLanes;
  T lanes[W];
  std::memcpy(lanes, &v, sizeof(v));
  for (int width = W / 2; width >= 1; width /= 2) {  // a tree: log2(W) dependent adds instead of W
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// ---- exp on vectors ---------------------------------------------------------------------------------------
// libm's exp is a scalar call, which would serialise the state loop; this one is branch-free arithmetic:
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in a high part with
// trailing zero bits and a low part, so that n * ln2_hi is exact). exp(r) is a polynomial: for float a
// degree-6 near-minimax fit (relative truncation error 2e-9, our own fit), for double the degree-13 Taylor
// polynomial (truncation < 5e-18). 2^n is written straight into the exponent bits. Rounding to an integer
// adds and subtracts 1.5 * 2^(mantissa bits).
// Measured against libm over the float range: at most 1.4 ulp (float), 1.2 ulp (double). Range: x is clamped
// to [-127 ln2, 128 ln2] (float; [-1023 ln2, 1024 ln2] for double), where n = -127 gives exponent bits 0,
// i.e. exactly 0, and n = 128 gives inf. So results below the smallest normal number come out as 0 (as
// they would after the denormal flush anyway), and results within a factor sqrt(2) of the largest finite
// number overflow to inf a little early. NaN stays NaN (the clamps are comparisons, false for NaN).
template <typename T>
struct ExpTraits;

template <>
struct ExpTraits<float> {
  static constexpr float kLow = -88.0296919311f;  // -127 ln 2
  static constexpr float kHigh = 88.7228391117f;  // 128 ln 2
  static constexpr float kMagic = 12582912.0f;    // 1.5 * 2^23
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
  template <typename V>
  static inline V poly(V r) {
    V q = splat<float>(1.3843653493307894e-03f);
    q = q * r + 8.3741553174909479e-03f;
    q = q * r + 4.1668002036351660e-02f;
    q = q * r + 1.6666431262525208e-01f;
    q = q * r + 4.9999994209041376e-01f;
    q = q * r + 1.0000000321650828f;
    return q * r + 1.0f;
  }
};

template <>
struct ExpTraits<double> {
  static constexpr double kLow = -709.08956571282405;  // -1023 ln 2
  static constexpr double kHigh = 709.78271289338400;  // 1024 ln 2
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  template <typename V>
  static inline V poly(V r) {
    // coefficients 1/k!, k = 13 .. 0
    V p = splat<double>(1.6059043836821614599e-10);
    p = p * r + 2.0876756987868098979e-09;
    p = p * r + 2.5052108385441718775e-08;
    p = p * r + 2.7557319223985890653e-07;
    p = p * r + 2.7557319223985890653e-06;
    p = p * r + 2.4801587301587301587e-05;
    p = p * r + 1.9841269841269841270e-04;
    p = p * r + 1.3888888888888888889e-03;
    p = p * r + 8.3333333333333333333e-03;
    p = p * r + 4.1666666666666666667e-02;
    p = p * r + 1.6666666666666666667e-01;
    p = p * r + 0.5;
    p = p * r + 1.0;
    return p * r + 1.0;
  }
};

template <typename T>
inline VecOf<T> vexp(VecOf<T> x) {
  using Tr = ExpTraits<T>;
  using V = VecOf<T>;
  using IntVec = typename Simd<T>::IntVec;
  const V low = splat<T>(Tr::kLow), high = splat<T>(Tr::kHigh);
  x = x < low ? low : x;  // NaN compares false and passes through
  x = x > high ? high : x;
  const V magic = splat<T>(Tr::kMagic);
  const V shifted = x * Tr::kLog2e + magic;  // round(x / ln 2) sits in the low mantissa bits
  const V n = shifted - magic;
  V r = x - n * Tr::kLn2Hi;
  r = r - n * Tr::kLn2Lo;
  IntVec bits;
  if constexpr (std::is_same<T, float>::value) {
    // (n + 127) * 2^23, exact in float, converted to an integer is the bit pattern of 2^n
    bits = __builtin_convertvector(n * 8388608.0f + 127.0f * 8388608.0f, IntVec);
  } else {
    // no double -> int64 vector conversion before AVX-512, so take n from the mantissa bits instead
    bits = ((IntVec)shifted - (IntVec)magic + 1023) << 52;
  }
  return Tr::poly(r) * (V)bits;
}

// ---- other elementwise functions on vectors --------------------------------------------------------------
template <typename T>
inline VecOf<T> vsigmoid(VecOf<T> x) {
  return T(1) / (T(1) + vexp<T>(-x));  // exp overflow to inf gives exactly 0
}

// log(1 + y) for y in [0, 1], accurate for tiny y: with s = y / (2 + y) in [0, 1/3],
// log(1 + y) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), truncated where the next term is below the
// precision (s^17/17 for float, s^35/35 for double: relative < 5e-10 and < 2e-18).
template <typename T>
inline VecOf<T> vlog1p_unit(VecOf<T> y) {
  using V = VecOf<T>;
  const V s = y / (T(2) + y);
  const V s2 = s * s;
  constexpr int kTerms = std::is_same<T, float>::value ? 8 : 17;
  V series = splat<T>(T(1) / T(2 * kTerms - 1));
  for (int k = kTerms - 2; k >= 0; --k) series = series * s2 + T(1) / T(2 * k + 1);
  return T(2) * s * series;
}

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|); x itself above 20, as torch and mamba_ssm do.
template <typename T>
inline VecOf<T> vsoftplus(VecOf<T> x) {
  using V = VecOf<T>;
  const V zero{};
  const V magnitude = x < zero ? -x : x;
  const V positive = x > zero ? x : zero;
  const V value = positive + vlog1p_unit<T>(vexp<T>(-magnitude));
  return x > T(20) ? x : value;
}

// d softplus / dx, consistent with vsoftplus (exactly 1 above the threshold)
template <typename T>
inline VecOf<T> vsoftplus_grad(VecOf<T> x) {
  return x > T(20) ? splat<T>(T(1)) : vsigmoid<T>(x);
}

// Loads and stores of `count` <= kLanes values (the tail of a row), padding with zeros.
template <typename T>
inline VecOf<T> load_partial(const T* ptr, int64_t count) {
  VecOf<T> v{};
  std::memcpy(&v, ptr, sizeof(T) * count);
  return v;
}

template <typename T>
inline void store_partial(T* ptr, VecOf<T> v, int64_t count) {
  std::memcpy(ptr, &v, sizeof(T) * count);
}

// Calls f(t, count) for the vectors of a length-L row: count == kLanes except for the tail.
template <typename T, typename F>
inline void for_each_vector(int64_t L, F&& f) {
  constexpr int W = Simd<T>::kLanes;
  int64_t t = 0;
  for (; t + W <= L; t += W) f(t, int64_t(W));
  if (t < L) f(t, L - t);
}

template <typename T>
inline VecOf<T> load_n(const T* ptr, int64_t count) {
  return count == Simd<T>::kLanes ? load(ptr) : load_partial(ptr, count);
}

template <typename T>
inline void store_n(T* ptr, VecOf<T> v, int64_t count) {
  if (count == Simd<T>::kLanes) store(ptr, v); else store_partial(ptr, v, count);
}

// ---- kernels ----------------------------------------------------------------------------------------------
// Tensors reaching the kernels have N padded to `vecs` vectors of Simd<T>::kLanes lanes. kVecs > 0 fixes
// the count at compile time, so the state lives in registers; kVecs == 0 reads it at run time.
// Optional inputs (D, z, delta_bias, h0, grad_out, grad_last) are null pointers when absent.

struct Sizes {
  int64_t batch, dim, length, padded_state, groups_b, groups_c, interval, chunks;
  bool softplus;
};

// Element strides of a (batch, dim, L) tensor. The per-channel rows need not be contiguous: Mamba on the CPU
// keeps its activations channel-last, (batch, L, dim) in memory, so that its projections need no transposing
// copies, and u and z are then column slices of one (batch, L, 2 dim) projection output. A task copies a
// strided row into a per-thread buffer (and its output rows back) instead: the rows of neighbouring channels
// share cache lines, and consecutive tasks of a thread are neighbouring channels, so these copies hit the cache.
struct RowStrides {
  int64_t batch, dim, time;
  int64_t offset(int64_t b, int64_t d) const { return b * batch + d * dim; }
};

struct ForwardArgs {
  const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *h0;
  void *out, *last, *checkpoints;  // checkpoints: null unless kept for the backward
  RowStrides u_strides, delta_strides, z_strides, out_strides;
};

struct BackwardArgs {
  const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *checkpoints, *grad_out, *grad_last;
  void *grad_u, *grad_delta, *grad_A, *grad_B, *grad_C, *grad_D, *grad_z, *grad_bias, *grad_h0;
  RowStrides u_strides, delta_strides, z_strides, grad_out_strides, grad_u_strides, grad_delta_strides,
      grad_z_strides;
};

// A length-L row whose values lie `stride` apart, as a contiguous pointer: the row itself when the stride is
// 1, else a copy in `buffer`.
template <typename T>
inline const T* gather_row(const T* row, int64_t stride, int64_t L, T* buffer) {
  if (stride == 1) return row;
  for (int64_t t = 0; t < L; ++t) buffer[t] = row[t * stride];
  return buffer;
}

// Where to write a length-L output row: in place when its stride is 1, else `buffer`, copied out by scatter_row.
template <typename T>
inline T* output_row(T* row, int64_t stride, T* buffer) {
  return stride == 1 ? row : buffer;
}

template <typename T>
inline void scatter_row(const T* buffer, T* row, int64_t stride, int64_t L) {
  if (stride == 1) return;  // written in place
  for (int64_t t = 0; t < L; ++t) row[t * stride] = buffer[t];
}

// Delta for one (b, d) row: delta + delta_bias, then softplus if asked; written to `dt` (length L).
template <typename T>
inline void delta_row(const Sizes& s, const T* delta, T bias, T* dt) {
  for_each_vector<T>(s.length, [&](int64_t t, int64_t count) {
    VecOf<T> x = load_n(delta + t, count) + bias;
    if (s.softplus) x = vsoftplus<T>(x);
    store_n(dt + t, x, count);
  });
}

template <typename T, int kVecs>
void forward_kernel(const Sizes& s, const ForwardArgs& args) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::kLanes;
  const int64_t L = s.length, N = s.padded_state;
  const int64_t vecs = kVecs > 0 ? kVecs : N / W;
  const T* u = static_cast<const T*>(args.u);
  const T* delta = static_cast<const T*>(args.delta);
  const T* A = static_cast<const T*>(args.A);
  const T* B = static_cast<const T*>(args.B);
  const T* C = static_cast<const T*>(args.C);
  const T* D = static_cast<const T*>(args.D);
  const T* z = static_cast<const T*>(args.z);
  const T* delta_bias = static_cast<const T*>(args.delta_bias);
  const T* h0 = static_cast<const T*>(args.h0);
  T* out = static_cast<T*>(args.out);
  T* last = static_cast<T*>(args.last);
  T* checkpoints = static_cast<T*>(args.checkpoints);
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush;
    std::vector<T> dt(L);
    std::vector<T> u_buffer(args.u_strides.time == 1 ? 0 : L), z_buffer(z && args.z_strides.time != 1 ? L : 0);
    std::vector<T> y_buffer(args.out_strides.time == 1 ? 0 : L);
    std::vector<V> h_storage(kVecs > 0 ? 0 : 2 * vecs);
    V h_fixed[kVecs > 0 ? 2 * kVecs : 1];
    V* h = kVecs > 0 ? h_fixed : h_storage.data();
    V* A_vec = h + vecs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.dim, d = task % s.dim;
      const T* u_row = gather_row(u + args.u_strides.offset(b, d), args.u_strides.time, L, u_buffer.data());
      const T* z_row = z ? gather_row(z + args.z_strides.offset(b, d), args.z_strides.time, L, z_buffer.data())
                         : nullptr;
      const T* B_rows = B + (b * s.groups_b + d / (s.dim / s.groups_b)) * L * N;
      const T* C_rows = C + (b * s.groups_c + d / (s.dim / s.groups_c)) * L * N;
      T* y_out = out + args.out_strides.offset(b, d);
      T* y_row = output_row(y_out, args.out_strides.time, y_buffer.data());
      // the raw delta row goes through dt, where delta_row turns it into Delta in place
      const T* delta_in = gather_row(delta + args.delta_strides.offset(b, d), args.delta_strides.time, L, dt.data());
      delta_row<T>(s, delta_in, delta_bias ? delta_bias[d] : T(0), dt.data());
      for (int64_t k = 0; k < vecs; ++k) {
        A_vec[k] = load(A + d * N + k * W);
        h[k] = h0 ? load(h0 + task * N + k * W) : V{};
      }
      for (int64_t t = 0; t < L; ++t) {
        if (checkpoints && t % s.interval == 0) {
          for (int64_t k = 0; k < vecs; ++k) store(checkpoints + (task * s.chunks + t / s.interval) * N + k * W, h[k]);
        }
        const V delta_t = splat(dt[t]);
        const V delta_u = splat(dt[t] * u_row[t]);
        const T* B_t = B_rows + t * N;
        const T* C_t = C_rows + t * N;
        V acc{};
        for (int64_t k = 0; k < vecs; ++k) {
          h[k] = vexp<T>(delta_t * A_vec[k]) * h[k] + delta_u * load(B_t + k * W);
          acc += load(C_t + k * W) * h[k];
        }
        y_row[t] = horizontal_sum<T>(acc);
      }
      for (int64_t k = 0; k < vecs; ++k) store(last + task * N + k * W, h[k]);
      if (D || z) {  // y = (y + D u) * silu(z)
        const T D_d = D ? D[d] : T(0);
        for_each_vector<T>(L, [&](int64_t t, int64_t count) {
          V y = load_n(y_row + t, count) + D_d * load_n(u_row + t, count);
          if (z) {
            const V z_t = load_n(z_row + t, count);
            y = y * z_t * vsigmoid<T>(z_t);
          }
          store_n(y_row + t, y, count);
        });
      }
      scatter_row(y_row, y_out, args.out_strides.time, L);
    }
  });
}

// grad_B, grad_C: (threads, batch, groups, L, N) accumulators, one slice per thread, because channels of a
// group (handled by different tasks) all add into the same B/C gradient. grad_D, grad_bias: per (b, d),
// summed over the batch by the caller.
template <typename T, int kVecs>
void backward_kernel(const Sizes& s, const BackwardArgs& args) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::kLanes;
  const int64_t L = s.length, N = s.padded_state, K = s.interval;
  const int64_t vecs = kVecs > 0 ? kVecs : N / W;
  const int64_t per_thread_b = s.batch * s.groups_b * L * N;
  const int64_t per_thread_c = s.batch * s.groups_c * L * N;
  const T* u = static_cast<const T*>(args.u);
  const T* delta = static_cast<const T*>(args.delta);
  const T* A = static_cast<const T*>(args.A);
  const T* B = static_cast<const T*>(args.B);
  const T* C = static_cast<const T*>(args.C);
  const T* D = static_cast<const T*>(args.D);
  const T* z = static_cast<const T*>(args.z);
  const T* delta_bias = static_cast<const T*>(args.delta_bias);
  const T* checkpoints = static_cast<const T*>(args.checkpoints);
  const T* grad_out = static_cast<const T*>(args.grad_out);
  const T* grad_last = static_cast<const T*>(args.grad_last);
  T* grad_u = static_cast<T*>(args.grad_u);
  T* grad_delta = static_cast<T*>(args.grad_delta);
  T* grad_A = static_cast<T*>(args.grad_A);
  T* grad_D = static_cast<T*>(args.grad_D);
  T* grad_z = static_cast<T*>(args.grad_z);
  T* grad_bias = static_cast<T*>(args.grad_bias);
  T* grad_h0 = static_cast<T*>(args.grad_h0);
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
    FlushDenormalsGuard flush;
    const int64_t thread = at::get_thread_num();
    T* grad_B_thread = static_cast<T*>(args.grad_B) + thread * per_thread_b;
    T* grad_C_thread = static_cast<T*>(args.grad_C) + thread * per_thread_c;
    std::vector<T> dt(L), grad_y(L);
    // copies of strided rows (empty when the rows are contiguous)
    auto buffer_for = [L](const RowStrides& st, bool present) { return std::vector<T>(present && st.time != 1 ? L : 0); };
    std::vector<T> u_buffer = buffer_for(args.u_strides, true), delta_buffer = buffer_for(args.delta_strides, true);
    std::vector<T> z_buffer = buffer_for(args.z_strides, z != nullptr);
    std::vector<T> grad_out_buffer = buffer_for(args.grad_out_strides, grad_out != nullptr);
    std::vector<T> gu_buffer = buffer_for(args.grad_u_strides, true), gdt_buffer = buffer_for(args.grad_delta_strides, true);
    std::vector<T> gz_buffer = buffer_for(args.grad_z_strides, grad_z != nullptr);
    // states[j] = h before step j of the chunk (states[0] = the checkpoint); decay[j] = exp(dt A) of step j
    std::vector<V> states((K + 1) * vecs), decay(K * vecs), registers(3 * vecs);
    V* lambda = registers.data();  // d loss / d h, carried backwards in time
    V* grad_A_acc = lambda + vecs;
    V* A_vec = grad_A_acc + vecs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.dim, d = task % s.dim;
      const T* u_row = gather_row(u + args.u_strides.offset(b, d), args.u_strides.time, L, u_buffer.data());
      const T* delta_in =
          gather_row(delta + args.delta_strides.offset(b, d), args.delta_strides.time, L, delta_buffer.data());
      const T* z_row = z ? gather_row(z + args.z_strides.offset(b, d), args.z_strides.time, L, z_buffer.data())
                         : nullptr;
      const T* grad_out_row = grad_out ? gather_row(grad_out + args.grad_out_strides.offset(b, d),
                                                    args.grad_out_strides.time, L, grad_out_buffer.data())
                                       : nullptr;
      const T bias_d = delta_bias ? delta_bias[d] : T(0);
      const T D_d = D ? D[d] : T(0);
      delta_row<T>(s, delta_in, bias_d, dt.data());
      // d loss / d y before the gate; d loss / d D. The gate's gradient needs y before the gate, which the
      // replay below recomputes (cheaper than storing it): here grad_z gets the factor d out / d z / y_pre.
      V grad_D_acc{};
      T* gz_out = grad_z ? grad_z + args.grad_z_strides.offset(b, d) : nullptr;
      T* gz_row = grad_z ? output_row(gz_out, args.grad_z_strides.time, gz_buffer.data()) : nullptr;
      for_each_vector<T>(L, [&](int64_t t, int64_t count) {
        V g = grad_out_row ? load_n(grad_out_row + t, count) : V{};
        if (z) {
          const V z_t = load_n(z_row + t, count);
          const V sig = vsigmoid<T>(z_t);
          // silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z)
          if (gz_row) store_n(gz_row + t, g * sig * (T(1) + z_t * (T(1) - sig)), count);
          g = g * z_t * sig;
        }
        grad_D_acc += g * load_n(u_row + t, count);  // tail lanes hold zeros
        store_n(grad_y.data() + t, g, count);
      });
      const int64_t offset_b = (b * s.groups_b + d / (s.dim / s.groups_b)) * L * N;
      const int64_t offset_c = (b * s.groups_c + d / (s.dim / s.groups_c)) * L * N;
      const T* B_rows = B + offset_b;
      const T* C_rows = C + offset_c;
      T* gB_rows = grad_B_thread + offset_b;
      T* gC_rows = grad_C_thread + offset_c;
      T* gu_out = grad_u + args.grad_u_strides.offset(b, d);
      T* gdt_out = grad_delta + args.grad_delta_strides.offset(b, d);
      T* gu_row = output_row(gu_out, args.grad_u_strides.time, gu_buffer.data());
      T* gdt_row = output_row(gdt_out, args.grad_delta_strides.time, gdt_buffer.data());  // d loss / d Delta first; turned into d loss / d delta below
      for (int64_t k = 0; k < vecs; ++k) {
        lambda[k] = grad_last ? load(grad_last + task * N + k * W) : V{};  // d loss / d h_L
        grad_A_acc[k] = V{};
        A_vec[k] = load(A + d * N + k * W);
      }
      for (int64_t chunk = s.chunks - 1; chunk >= 0; --chunk) {
        const int64_t t0 = chunk * K, steps = std::min(K, L - t0);
        V* h = states.data();
        for (int64_t k = 0; k < vecs; ++k) h[k] = load(checkpoints + (task * s.chunks + chunk) * N + k * W);
        for (int64_t j = 0; j < steps; ++j) {  // replay the chunk's forward
          const int64_t t = t0 + j;
          const V delta_t = splat(dt[t]);
          const V delta_u = splat(dt[t] * u_row[t]);
          const T* B_t = B_rows + t * N;
          V* a = decay.data() + j * vecs;
          for (int64_t k = 0; k < vecs; ++k) {
            a[k] = vexp<T>(delta_t * A_vec[k]);
            h[(j + 1) * vecs + k] = a[k] * h[j * vecs + k] + delta_u * load(B_t + k * W);
          }
        }
        for (int64_t j = steps - 1; j >= 0; --j) {  // adjoint recurrence, backwards in time
          const int64_t t = t0 + j;
          const T delta_s = dt[t], u_s = u_row[t];
          const V delta_t = splat(delta_s);
          const V delta_u = splat(delta_s * u_s);
          const V gy = splat(grad_y[t]);
          const T* B_t = B_rows + t * N;
          const T* C_t = C_rows + t * N;
          T* gB_t = gB_rows + t * N;
          T* gC_t = gC_rows + t * N;
          const V* h_prev = h + j * vecs;
          const V* h_t = h + (j + 1) * vecs;
          const V* a = decay.data() + j * vecs;
          V grad_exponent_A{};  // sum over states of d loss / d(Delta A[n]) * A[n]
          V lambda_B{};         // sum over states of lambda[n] B_t[n]
          V readout{};          // <C_t, h_t>, only for the gate's gradient
          for (int64_t k = 0; k < vecs; ++k) {
            const V C_k = load(C_t + k * W);
            const V lam = lambda[k] + gy * C_k;  // d loss / d h_t
            if (gz_row) readout += C_k * h_t[k];
            store(gC_t + k * W, load(gC_t + k * W) + gy * h_t[k]);
            const V g_exponent = lam * h_prev[k] * a[k];  // d loss / d(Delta_t A[n])
            grad_exponent_A += g_exponent * A_vec[k];
            grad_A_acc[k] += g_exponent * delta_t;
            lambda_B += lam * load(B_t + k * W);
            store(gB_t + k * W, load(gB_t + k * W) + lam * delta_u);
            lambda[k] = lam * a[k];  // d loss / d h_{t-1}, through h_t
          }
          const T lambda_dot_B = horizontal_sum<T>(lambda_B);
          gu_row[t] = delta_s * lambda_dot_B;
          gdt_row[t] = horizontal_sum<T>(grad_exponent_A) + u_s * lambda_dot_B;
          if (gz_row) gz_row[t] *= horizontal_sum<T>(readout) + D_d * u_s;  // times y before the gate
        }
      }
      for (int64_t k = 0; k < vecs; ++k) {
        store(grad_h0 + task * N + k * W, lambda[k]);
        store(grad_A + task * N + k * W, grad_A_acc[k]);
      }
      // through the skip term D u and through Delta = softplus(delta + delta_bias)
      V grad_bias_acc{};
      for_each_vector<T>(L, [&](int64_t t, int64_t count) {
        if (D) store_n(gu_row + t, load_n(gu_row + t, count) + D_d * load_n(grad_y.data() + t, count), count);
        V g = load_n(gdt_row + t, count);
        if (s.softplus) g = g * vsoftplus_grad<T>(load_n(delta_in + t, count) + bias_d);
        store_n(gdt_row + t, g, count);
        grad_bias_acc += g;  // a tail's padding lanes are 0: they were loaded as 0 and only multiplied
      });
      scatter_row(gu_row, gu_out, args.grad_u_strides.time, L);
      scatter_row(gdt_row, gdt_out, args.grad_delta_strides.time, L);
      if (gz_row) scatter_row(gz_row, gz_out, args.grad_z_strides.time, L);
      grad_D[task] = horizontal_sum<T>(grad_D_acc);
      grad_bias[task] = horizontal_sum<T>(grad_bias_acc);
    }
  });
}

template <typename T>
int64_t padded_size(int64_t n) {
  constexpr int W = Simd<T>::kLanes;
  return (n + W - 1) / W * W;
}

// Zero-pad the last dimension to `padded` and make contiguous.
at::Tensor pad_last(const at::Tensor& x, int64_t padded) {
  const int64_t extra = padded - x.size(-1);
  if (extra == 0) return x.contiguous();
  return at::constant_pad_nd(x, {0, extra}, 0).contiguous();
}

const void* data_or_null(const at::Tensor& x) { return x.numel() > 0 ? x.data_ptr() : nullptr; }

RowStrides strides_of(const at::Tensor& x) {
  if (x.numel() == 0) return RowStrides{0, 0, 1};  // absent optional tensor
  return RowStrides{x.stride(0), x.stride(1), x.stride(2)};
}

// A new (batch, dim, L) tensor laid out as `x` is: channel-last ((batch, L, dim) in memory) when x's channels
// are closer together than its time steps, else contiguous. Outputs and gradients so keep their inputs'
// layout, and the caller's next matrix product reads them without a transposing copy.
at::Tensor empty_like_layout(const at::Tensor& x) {
  if (x.size(1) > 1 && x.size(2) > 1 && x.stride(1) < x.stride(2)) {
    return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
  }
  return at::empty(x.sizes(), x.options());
}

Sizes make_sizes(const at::Tensor& u, int64_t padded_state, const at::Tensor& B, const at::Tensor& C,
                 int64_t interval, bool softplus) {
  Sizes s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.length = u.size(2);
  s.padded_state = padded_state;
  s.groups_b = B.size(1);
  s.groups_c = C.size(1);
  s.interval = interval;
  s.chunks = (s.length + interval - 1) / interval;
  s.softplus = softplus;
  return s;
}

// The Python wrapper validates arguments for users; these checks guard the memory accesses.
void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& delta_bias,
                  int64_t interval) {
  TORCH_CHECK(interval >= 1, "checkpoint interval must be >= 1, got ", interval);
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective scan C++ kernel: float32 or float64 only");
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C, &D, &z, &delta_bias}) {
    TORCH_CHECK(t->device().is_cpu(), "selective scan C++ kernel: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "selective scan C++ kernel: dtypes differ");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A must be (dim, N)");
  for (const at::Tensor* t : {&B, &C}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == u.size(0) && t->size(2) == u.size(2) && t->size(3) == A.size(1),
                "B and C must be (batch, groups, L, N)");
    TORCH_CHECK(t->size(1) >= 1 && u.size(1) % t->size(1) == 0, "groups must divide dim");
  }
  TORCH_CHECK(D.numel() == 0 || (D.dim() == 1 && D.size(0) == u.size(1)), "D must be (dim,)");
  TORCH_CHECK(delta_bias.numel() == 0 || (delta_bias.dim() == 1 && delta_bias.size(0) == u.size(1)),
              "delta_bias must be (dim,)");
  TORCH_CHECK(z.numel() == 0 || z.sizes() == u.sizes(), "z must be (batch, dim, L)");
}

template <typename T, int kVecs>
struct Forward {
  static void run(const Sizes& s, const ForwardArgs& a) { forward_kernel<T, kVecs>(s, a); }
};

template <typename T, int kVecs>
struct Backward {
  static void run(const Sizes& s, const BackwardArgs& a) { backward_kernel<T, kVecs>(s, a); }
};

// Compile-time vector counts keep the state in registers for the common sizes (N <= 8, 16, 32 in float).
template <typename T, template <typename, int> class Kernel, typename ArgsT>
void dispatch_vecs(const Sizes& s, const ArgsT& args) {
  switch (s.padded_state / Simd<T>::kLanes) {
    case 1: Kernel<T, 1>::run(s, args); break;
    case 2: Kernel<T, 2>::run(s, args); break;
    case 4: Kernel<T, 4>::run(s, args); break;
    default: Kernel<T, 0>::run(s, args); break;
  }
}

// u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, groups, L, N); D, delta_bias: (dim,); h0:
// (batch, dim, N); absent optional tensors are passed empty. Returns y (batch, dim, L), the last state
// (batch, dim, N), and for the backward (empty unless `keep`) the checkpoints (batch, dim, chunks, N_padded).
std::vector<at::Tensor> scan_forward(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                                     const at::Tensor& B_in, const at::Tensor& C_in, const at::Tensor& D_in,
                                     const at::Tensor& z_in, const at::Tensor& bias_in, const at::Tensor& h0_in,
                                     bool softplus, int64_t interval, bool keep) {
  check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, interval);
  const int64_t N = A_in.size(1);
  const bool has_h0 = h0_in.numel() > 0, has_z = z_in.numel() > 0;
  if (has_h0) {
    TORCH_CHECK(h0_in.scalar_type() == u_in.scalar_type() && h0_in.dim() == 3 && h0_in.size(0) == u_in.size(0) &&
                    h0_in.size(1) == u_in.size(1) && h0_in.size(2) == N,
                "initial state must be a (batch, dim, N) tensor of u's dtype");
  }
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(u_in.scalar_type(), "selective_scan_forward", [&] {
    const int64_t Np = padded_size<scalar_t>(N);
    const at::Tensor &u = u_in, &delta = delta_in, &z = z_in;  // strided rows are read as they are
    at::Tensor D = D_in.contiguous(), bias = bias_in.contiguous();
    at::Tensor A = pad_last(A_in, Np), B = pad_last(B_in, Np), C = pad_last(C_in, Np);
    at::Tensor h0 = has_h0 ? pad_last(h0_in, Np) : h0_in;
    const Sizes s = make_sizes(u, Np, B, C, interval, softplus);
    at::Tensor out = empty_like_layout(u);
    at::Tensor last = at::empty({s.batch, s.dim, Np}, u.options());
    at::Tensor checkpoints =
        keep ? at::empty({s.batch, s.dim, s.chunks, Np}, u.options()) : at::empty({0}, u.options());
    ForwardArgs args{u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), data_or_null(D),
                     data_or_null(z), data_or_null(bias), has_h0 ? h0.data_ptr() : nullptr, out.data_ptr(),
                     last.data_ptr(), keep ? checkpoints.data_ptr() : nullptr,
                     strides_of(u), strides_of(delta), strides_of(z), strides_of(out)};
    dispatch_vecs<scalar_t, Forward>(s, args);
    result = {out, Np == N ? last : last.narrow(2, 0, N).contiguous(), checkpoints};
  });
  return result;
}

// Returns grad_u, grad_delta (batch, dim, L); grad_A (batch, dim, N), grad_D, grad_delta_bias (batch, dim),
// all three to be summed over the batch; grad_B, grad_C (batch, groups, L, N); grad_z (batch, dim, L) or
// empty; grad_h0 (batch, dim, N). grad_out and grad_last may be empty (no gradient arrived).
std::vector<at::Tensor> scan_backward(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                                      const at::Tensor& B_in, const at::Tensor& C_in, const at::Tensor& D_in,
                                      const at::Tensor& z_in, const at::Tensor& bias_in, bool softplus,
                                      const at::Tensor& checkpoints,
                                      const at::Tensor& grad_out_in, const at::Tensor& grad_last_in,
                                      int64_t interval) {
  check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, interval);
  const int64_t N = A_in.size(1);
  const bool has_z = z_in.numel() > 0, has_grad_out = grad_out_in.numel() > 0, has_grad_last = grad_last_in.numel() > 0;
  TORCH_CHECK(!has_grad_out || (grad_out_in.sizes() == u_in.sizes() && grad_out_in.scalar_type() == u_in.scalar_type()),
              "grad_out must be a (batch, dim, L) tensor of u's dtype");
  if (has_grad_last) {
    TORCH_CHECK(grad_last_in.scalar_type() == u_in.scalar_type() && grad_last_in.dim() == 3 &&
                    grad_last_in.size(2) == N && grad_last_in.numel() == u_in.size(0) * u_in.size(1) * N,
                "grad_last must be a (batch, dim, N) tensor of u's dtype");
  }
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(u_in.scalar_type(), "selective_scan_backward", [&] {
    const int64_t Np = padded_size<scalar_t>(N);
    const at::Tensor &u = u_in, &delta = delta_in, &z = z_in, &grad_out = grad_out_in;  // read as they are
    at::Tensor D = D_in.contiguous(), bias = bias_in.contiguous();
    at::Tensor A = pad_last(A_in, Np), B = pad_last(B_in, Np), C = pad_last(C_in, Np);
    at::Tensor grad_last = has_grad_last ? pad_last(grad_last_in, Np) : grad_last_in;
    const Sizes s = make_sizes(u, Np, B, C, interval, softplus);
    TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.dim() == 4 && checkpoints.size(0) == s.batch &&
                    checkpoints.size(1) == s.dim && checkpoints.size(2) == s.chunks && checkpoints.size(3) == Np,
                "checkpoints must be the (batch, dim, chunks, N_padded) tensor returned by forward");
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.batch * s.dim));
    at::Tensor grad_u = empty_like_layout(u);
    at::Tensor grad_delta = empty_like_layout(delta);
    at::Tensor grad_z = has_z ? empty_like_layout(z) : at::empty({0}, u.options());
    at::Tensor grad_A = at::empty({s.batch, s.dim, Np}, u.options());
    at::Tensor grad_D = at::empty({s.batch, s.dim}, u.options());
    at::Tensor grad_bias = at::empty({s.batch, s.dim}, u.options());
    at::Tensor grad_h0 = at::empty({s.batch, s.dim, Np}, u.options());
    at::Tensor grad_B = at::zeros({threads, s.batch, s.groups_b, s.length, Np}, u.options());
    at::Tensor grad_C = at::zeros({threads, s.batch, s.groups_c, s.length, Np}, u.options());
    BackwardArgs args{u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), data_or_null(D),
                      data_or_null(z), data_or_null(bias), checkpoints.data_ptr(),
                      has_grad_out ? grad_out.data_ptr() : nullptr, has_grad_last ? grad_last.data_ptr() : nullptr,
                      grad_u.data_ptr(), grad_delta.data_ptr(), grad_A.data_ptr(), grad_B.data_ptr(),
                      grad_C.data_ptr(), grad_D.data_ptr(), has_z ? grad_z.data_ptr() : nullptr,
                      grad_bias.data_ptr(), grad_h0.data_ptr(),
                      strides_of(u), strides_of(delta), strides_of(z), strides_of(grad_out), strides_of(grad_u),
                      strides_of(grad_delta), strides_of(grad_z)};
    dispatch_vecs<scalar_t, Backward>(s, args);
    // at::parallel_for may have used fewer threads than `threads`; their slices stay zero
    at::Tensor grad_B_total = threads == 1 ? grad_B.squeeze(0) : grad_B.sum(0);
    at::Tensor grad_C_total = threads == 1 ? grad_C.squeeze(0) : grad_C.sum(0);
    auto unpad = [&](const at::Tensor& x) { return Np == N ? x : x.narrow(-1, 0, N).contiguous(); };
    result = {grad_u, grad_delta, unpad(grad_A), unpad(grad_B_total), unpad(grad_C_total), grad_D, grad_z,
              grad_bias, unpad(grad_h0)};
  });
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssmkit: selective scan (Mamba S6) on the CPU, forward and checkpointed backward";
  m.def("forward", &scan_forward,
        "y, last_state, checkpoints = forward(u, delta, A, B, C, D, z, delta_bias, h0, softplus, interval, "
        "keep)");
  m.def("backward", &scan_backward,
        "grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias, grad_h0 = backward(u, delta, "
        "A, B, C, D, z, delta_bias, softplus, checkpoints, grad_out, grad_last, interval)");
}
