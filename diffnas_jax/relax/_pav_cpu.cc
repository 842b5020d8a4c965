// Sequential stack pool-adjacent-violators (PAV) as XLA FFI handlers for the CPU
// (Blondel, Teboul, Berthet & Djolonga, "Fast Differentiable Sorting and Ranking", ICML 2020).
//
// Each handler solves every row of a (rows, n) problem with the textbook push-then-pool stack and
// returns per element its block's first index in the row, the block's size and its statistics:
// exactly what the pure-XLA stack solvers of sorting.py return before their ``finish``, so the
// outputs and custom VJPs stay shared.  The rules below are transcriptions of the XLA rules
// (_l2_stack_step, _kl_sorted_rule, _kl_stack_step), operation for operation and in the same
// order, so that the same differences give the same decisions: sorting.py's docstrings explain
// the formulas.  XLA:CPU compiles for the host and contracts a multiply-add into a fused one
// where the CPU has FMA (measured: the l2 block sums differed by an ulp until the kernel did
// too), so the pooled statistics use MulAdd, fused in the FMA build of the loop (picked at run
// time: the wheel is built for baseline x86-64) and plain elsewhere; everything else is compiled
// with -ffp-contract=off.  Same statistics bit for bit means later near-tie decisions agree too.
//
// Why a kernel: XLA:CPU runs the sequential while loop at ~25-60 ns a step; a compiled C++
// loop does the same step in a few ns (BUILD_NOTES section 3, issue 19).

#include "_native/ffi_module.h"  // first: it includes Python.h

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// sorting._diff: (p1 - p0) / eps - (q1 - q0), NaN -> 0, clipped to +-finfo.max / (64 n).
template <typename T>
inline T Diff(T p1, T p0, T q1, T q0, T eps, T big) {
  T d = (p1 - p0) / eps - (q1 - q0);
  if (std::isnan(d)) d = T(0);
  if (d < -big) d = -big;
  if (d > big) d = big;
  return d;
}

template <bool kFma, typename T>
inline __attribute__((always_inline)) T MulAdd(T a, T b, T c) {
  if constexpr (kFma) {
    if constexpr (sizeof(T) == 4) {
      return __builtin_fmaf(a, b, c);
    } else {
      return __builtin_fma(a, b, c);
    }
  } else {
    return a * b + c;
  }
}

using diffnas::FlushDenormals;

// exp, with an argument whose result is below the smallest normal number giving 0 at once, as
// the flush gives it anyway (glibc's underflow path is slow).
template <typename T>
inline T Exp(T x) {
  constexpr T kUnderflow = sizeof(T) == 4 ? T(-88) : T(-709);  // < log(smallest normal)
  return x < kUnderflow ? T(0) : std::exp(x);
}

// jnp.maximum / jnp.minimum of finite scalars (the statistics and differences are finite).
template <typename T>
inline T Max(T a, T b) { return a >= b ? a : b; }
template <typename T>
inline T Min(T a, T b) { return a <= b ? a : b; }

// sorting._l2_stack_step: one statistic, the block's sum of y - y_first.
template <typename T, bool kFma>
struct L2Rule {
  static constexpr int kStats = 1;
  static constexpr T kInit[1] = {T(0)};
  const T* p;
  const T* q;
  T eps, big;
  // below = block starting at bf, top = block [tf, end); returns whether they violate the
  // order and, if they do, writes the pooled statistics to out.
  inline __attribute__((always_inline)) bool operator()(int64_t end, const T* below, int64_t bf,
                                                        const T* top, int64_t tf, T* out) const {
    T offset = Diff(p[tf], p[bf], q[tf], q[bf], eps, big);
    T bb = static_cast<T>(static_cast<int32_t>(tf - bf));
    T tb = static_cast<T>(static_cast<int32_t>(end - tf));
    T ba = below[0], ta = top[0];
    const bool violates = ba / bb <= offset + ta / tb;
    if (violates) out[0] = MulAdd<kFma>(tb, offset, ba + ta);
    return violates;
  }
};

// sorting._kl_sorted_rule: block sums of exp(y - y_first) and exp(w - w_first) in the linear
// domain (rows sorted); with kLinearW, q holds exp(w) (soft_rank's rho).
template <typename T, bool kFma, bool kLinearW>
struct KlSortedRule {
  static constexpr int kStats = 2;
  static constexpr T kInit[2] = {T(1), T(1)};
  const T* p;
  const T* q;
  T eps, big;
  inline __attribute__((always_inline)) bool operator()(int64_t, const T* below, int64_t bf,
                                                        const T* top, int64_t tf, T* out) const {
    const T sy0 = below[0], sw0 = below[1], sy1 = top[0], sw1 = top[1];
    T dy = Diff(p[tf], p[bf], T(0), T(0), eps, big);
    if (kLinearW) {
      T ry = Exp(dy), rw = q[tf] / q[bf];
      const bool violates = (sy0 * sw1) * rw <= ry * (sy1 * sw0);
      if (violates) {
        out[0] = MulAdd<kFma>(ry, sy1, sy0);
        out[1] = MulAdd<kFma>(rw, sw1, sw0);
      }
      return violates;
    }
    T dw = Diff(q[tf], q[bf], T(0), T(0), T(1), big);
    bool y_larger = dy >= dw;
    T rest = Exp(-std::fabs(dy - dw));
    T ry = y_larger ? T(1) : rest, rw = y_larger ? rest : T(1);
    const bool violates = (sy0 * sw1) * rw <= ry * (sy1 * sw0);
    if (violates) {  // the pooled sums only when they are used (one exp less per push)
      T top_scale = Exp(Max(dy, dw));
      out[0] = MulAdd<kFma>(ry * top_scale, sy1, sy0);
      out[1] = MulAdd<kFma>(rw * top_scale, sw1, sw0);
    }
    return violates;
  }
};

// sorting._logaddexp_finite
template <typename T>
inline T LogAddExpFinite(T a, T b) {
  T m = Max(a, b);
  return m + std::log1p(Exp(Min(a, b) - m));
}

// sorting._kl_stack_step (any rows): block logsumexps of y - y_first and w - w_first.
template <typename T, bool kFma>
struct KlRule {
  static constexpr int kStats = 2;
  static constexpr T kInit[2] = {T(0), T(0)};
  const T* p;
  const T* q;
  T eps, big;
  inline __attribute__((always_inline)) bool operator()(int64_t, const T* below, int64_t bf,
                                                        const T* top, int64_t tf, T* out) const {
    const T ya0 = below[0], wa0 = below[1], ya1 = top[0], wa1 = top[1];
    T dy = Diff(p[tf], p[bf], T(0), T(0), eps, big) + ya1;
    T dw = Diff(q[tf], q[bf], T(0), T(0), T(1), big) + wa1;
    const bool violates = dy - ya0 >= dw - wa0;
    if (violates) {
      out[0] = LogAddExpFinite(ya0, dy);
      out[1] = LogAddExpFinite(wa0, dw);
    }
    return violates;
  }
};

// One row.  The stack lives in the row's own output arrays (slot k <= the element index, so a
// slot is never needed after the element of the same index is written), then each block is
// expanded in place from the last one backwards (block j starts at or after position j).
template <typename T, typename Rule>
inline __attribute__((always_inline)) void SolveRow(const Rule& rule, int64_t n, int32_t* first,
                                                    T* size, T* const* stats) {
  constexpr int K = Rule::kStats;
  int64_t top = -1;
  T pooled[K];
  T cur[K];   // the top block's statistics (kept out of the arrays between steps)
  T prev[K];
  for (int64_t i = 0; i < n; ++i) {
    // push element i as a singleton block, then pool while the top two violate the order
    if (top >= 0) {
      for (int s = 0; s < K; ++s) stats[s][top] = cur[s];
    }
    ++top;
    first[top] = static_cast<int32_t>(i);
    for (int s = 0; s < K; ++s) cur[s] = Rule::kInit[s];
    while (top >= 1) {
      for (int s = 0; s < K; ++s) prev[s] = stats[s][top - 1];
      if (!rule(i + 1, prev, first[top - 1], cur, first[top], pooled)) break;
      --top;
      for (int s = 0; s < K; ++s) cur[s] = pooled[s];
    }
  }
  for (int s = 0; s < K; ++s) stats[s][top] = cur[s];
  int64_t end = n;
  for (int64_t j = top; j >= 0; --j) {
    const int32_t f = first[j];
    T v[K];
    for (int s = 0; s < K; ++s) v[s] = stats[s][j];
    const T sz = static_cast<T>(static_cast<int32_t>(end - f));
    for (int64_t e = f; e < end; ++e) {
      first[e] = f;
      size[e] = sz;
      for (int s = 0; s < K; ++s) stats[s][e] = v[s];
    }
    end = f;
  }
}

template <typename T, typename Rule>
inline __attribute__((always_inline)) void RowsLoop(const T* pd, const T* qd, const T* ed, int64_t rows,
                                                    int64_t n, T big, int32_t* fd, T* sd, T* const* stats) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * n;
    Rule rule{pd + o, qd + o, ed[r], big};
    T* row_stats[Rule::kStats];
    for (int s = 0; s < Rule::kStats; ++s) row_stats[s] = stats[s] + o;
    SolveRow<T, Rule>(rule, n, fd + o, sd + o, row_stats);
  }
}

template <typename T, typename Rule>
void Rows(const T* pd, const T* qd, const T* ed, int64_t rows, int64_t n, T big, int32_t* fd, T* sd,
          T* const* stats) {
  RowsLoop<T, Rule>(pd, qd, ed, rows, n, big, fd, sd, stats);
}

// The same loop compiled for FMA hardware, where MulAdd is one fused instruction (x86-64: a
// clone for CPUs with FMA, picked at run time; AArch64 always has it).
#if defined(__x86_64__) || defined(__i386__)
#define DIFFNAS_TARGET_FMA __attribute__((target("fma")))
#else
#define DIFFNAS_TARGET_FMA
#endif

template <typename T, typename Rule>
DIFFNAS_TARGET_FMA void RowsFma(const T* pd, const T* qd, const T* ed, int64_t rows, int64_t n,
                                            T big, int32_t* fd, T* sd, T* const* stats) {
  RowsLoop<T, Rule>(pd, qd, ed, rows, n, big, fd, sd, stats);
}

bool HasFma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("fma");
  return has;
#elif defined(__aarch64__)
  return true;
#else
  return false;
#endif
}

template <typename T, template <typename, bool> class RuleOf>
ffi::Error Solve(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                 ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                 T* const* stats) {
  const auto dims = p.dimensions();
  const int64_t n = dims.size() == 0 ? 1 : dims[dims.size() - 1];
  const int64_t total = static_cast<int64_t>(p.element_count());
  if (n == 0 || total == 0) return ffi::Error::Success();
  const int64_t rows = total / n;
  if (static_cast<int64_t>(q.element_count()) != total) {
    return ffi::Error::InvalidArgument("pav: q must have the shape of p");
  }
  if (static_cast<int64_t>(eps.element_count()) != rows) {
    return ffi::Error::InvalidArgument("pav: eps must hold one value per row");
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("pav: rows longer than 2^31 - 1");
  }
  const T* pd = p.typed_data<T>();
  const T* qd = q.typed_data<T>();
  const T* ed = eps.typed_data<T>();
  int32_t* fd = first->typed_data<int32_t>();
  T* sd = size->typed_data<T>();
  // numpy: finfo(dtype).max / (64 * n) in the dtype
  const T big = std::numeric_limits<T>::max() / static_cast<T>(64 * n);
  FlushDenormals flush;
  if (HasFma()) {
    RowsFma<T, RuleOf<T, true>>(pd, qd, ed, rows, n, big, fd, sd, stats);
  } else {
    Rows<T, RuleOf<T, false>>(pd, qd, ed, rows, n, big, fd, sd, stats);
  }
  return ffi::Error::Success();
}

template <typename T, bool kFma>
using KlSortedW = KlSortedRule<T, kFma, false>;
template <typename T, bool kFma>
using KlRankW = KlSortedRule<T, kFma, true>;

template <template <typename, bool> class RuleOf>
ffi::Error Dispatch1(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                     ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                     ffi::Result<ffi::AnyBuffer> a) {
  switch (p.element_type()) {
    case ffi::DataType::F32: {
      float* stats[1] = {a->typed_data<float>()};
      return Solve<float, RuleOf>(p, q, eps, first, size, stats);
    }
    case ffi::DataType::F64: {
      double* stats[1] = {a->typed_data<double>()};
      return Solve<double, RuleOf>(p, q, eps, first, size, stats);
    }
    default:
      return ffi::Error::InvalidArgument("pav: float32 or float64 only");
  }
}

template <template <typename, bool> class RuleOf>
ffi::Error Dispatch2(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                     ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                     ffi::Result<ffi::AnyBuffer> a, ffi::Result<ffi::AnyBuffer> b) {
  switch (p.element_type()) {
    case ffi::DataType::F32: {
      float* stats[2] = {a->typed_data<float>(), b->typed_data<float>()};
      return Solve<float, RuleOf>(p, q, eps, first, size, stats);
    }
    case ffi::DataType::F64: {
      double* stats[2] = {a->typed_data<double>(), b->typed_data<double>()};
      return Solve<double, RuleOf>(p, q, eps, first, size, stats);
    }
    default:
      return ffi::Error::InvalidArgument("pav: float32 or float64 only");
  }
}

ffi::Error PavL2Impl(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                     ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                     ffi::Result<ffi::AnyBuffer> a) {
  return Dispatch1<L2Rule>(p, q, eps, first, size, a);
}

ffi::Error PavKlSortedImpl(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                           ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                           ffi::Result<ffi::AnyBuffer> a, ffi::Result<ffi::AnyBuffer> b) {
  return Dispatch2<KlSortedW>(p, q, eps, first, size, a, b);
}

ffi::Error PavKlRankImpl(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                         ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                         ffi::Result<ffi::AnyBuffer> a, ffi::Result<ffi::AnyBuffer> b) {
  return Dispatch2<KlRankW>(p, q, eps, first, size, a, b);
}

ffi::Error PavKlImpl(ffi::AnyBuffer p, ffi::AnyBuffer q, ffi::AnyBuffer eps,
                     ffi::Result<ffi::AnyBuffer> first, ffi::Result<ffi::AnyBuffer> size,
                     ffi::Result<ffi::AnyBuffer> a, ffi::Result<ffi::AnyBuffer> b) {
  return Dispatch2<KlRule>(p, q, eps, first, size, a, b);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffnasPavL2, PavL2Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

#define DIFFNAS_PAV_TWO_STATS(name, impl)           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,         \
                                ffi::Ffi::Bind()    \
                                    .Arg<ffi::AnyBuffer>() \
                                    .Arg<ffi::AnyBuffer>() \
                                    .Arg<ffi::AnyBuffer>() \
                                    .Ret<ffi::AnyBuffer>() \
                                    .Ret<ffi::AnyBuffer>() \
                                    .Ret<ffi::AnyBuffer>() \
                                    .Ret<ffi::AnyBuffer>());

DIFFNAS_PAV_TWO_STATS(DiffnasPavKlSorted, PavKlSortedImpl)
DIFFNAS_PAV_TWO_STATS(DiffnasPavKlRank, PavKlRankImpl)
DIFFNAS_PAV_TWO_STATS(DiffnasPavKl, PavKlImpl)

// The module: targets() -> {name: PyCapsule of the handler} (_native/ffi_module.h).
static PyObject* Targets(PyObject*, PyObject*) {
  static const diffnas::FfiTarget kTargets[] = {
      {"diffnas_pav_l2", reinterpret_cast<void*>(DiffnasPavL2)},
      {"diffnas_pav_kl_sorted", reinterpret_cast<void*>(DiffnasPavKlSorted)},
      {"diffnas_pav_kl_rank", reinterpret_cast<void*>(DiffnasPavKlRank)},
      {"diffnas_pav_kl", reinterpret_cast<void*>(DiffnasPavKl)},
  };
  return diffnas::TargetsDict(kTargets);
}

static PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "The XLA FFI handlers as {target name: PyCapsule}."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_pav_cpu",
    "Sequential stack PAV as XLA FFI handlers for the CPU (see sorting.py).", -1, kMethods,
};

PyMODINIT_FUNC PyInit__pav_cpu(void) { return PyModule_Create(&kModule); }
