// The depthwise 2-D convolution and its two transposes as XLA FFI handlers for the CPU.
//
// Why: written in XLA ops, a depthwise convolution that XLA:CPU runs fast is kh*kw shifted
// multiplies, ~4-6 HLO instructions a tap and form, and a supernet's forward-over-reverse
// program holds five such forms per convolution (75 % of its instructions; XLA:CPU's compile
// time follows the instruction count).  As a custom call each form is one instruction.
// `_dwconv.py` defines the primitives (their JVPs and transposes close over these three maps).
//
// Layout (NHWC, with a leading group axis G for vmapped edges or seeds):
//   x  (Gx, N, H, W, C), Gx dividing G: group g reads input group g / (G / Gx)
//   k  (G, KH, KW, C)
//   y  (G, N, HO, WO, C),  y[g,n,o,p,c] = sum_ij x[g/(G/Gx),n,o*sh-ph+i*dh,p*sw-pw+j*dw,c] k[g,i,j,c]
// fwd: (x, k) -> y;  dx: (ct, k) -> the transpose in x (summed over the groups reading it);
// dk: (x, ct) -> the transpose in k.  Zero padding outside the input.  Work is split over
// (g, n) on XLA's intra-op thread pool; every output element is written by one task in a fixed
// order (dk: per-task partial sums added in task order), so results do not depend on timing.

#include "_native/ffi_module.h"  // first: it includes Python.h

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <string>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using diffnas::FlushDenormals;

struct Geometry {
  int64_t g, gx, n, h, w, c, kh, kw, ho, wo, sh, sw, ph, pw, dh, dw;
  int64_t XIndex(int64_t gi, int64_t ni, int64_t hi, int64_t wi) const {
    return (((gi * n + ni) * h + hi) * w + wi) * c;
  }
  int64_t YIndex(int64_t gi, int64_t ni, int64_t oi, int64_t pi) const {
    return (((gi * n + ni) * ho + oi) * wo + pi) * c;
  }
  int64_t KIndex(int64_t gi, int64_t i, int64_t j) const { return ((gi * kh + i) * kw + j) * c; }
  int64_t XGroup(int64_t gi) const { return gi / (g / gx); }
};

// Runs body(task) for every task in [0, tasks) on the pool and the calling thread; returns when
// all are done.  Tasks are claimed from a counter, and the caller claims until none is left, so
// it never waits on a task that no thread has started: a pool whose threads are all busy (XLA
// runs independent thunks concurrently) cannot deadlock it.  A pool closure that starts after
// the call returned finds nothing to claim and touches only the shared counter.
struct TaskState {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const F& body) {
  if (tasks <= 1) {
    if (tasks == 1) body(0);
    return;
  }
  auto state = std::make_shared<TaskState>();
  const F* bodyp = &body;
  auto run = [state, bodyp, tasks] {
    int64_t t;
    while ((t = state->next.fetch_add(1)) < tasks) {
      (*bodyp)(t);
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == tasks) state->cv.notify_one();
    }
  };
  for (int64_t t = 1; t < tasks; ++t) {
    pool.Schedule([run] {
      FlushDenormals flush;
      run();
    });
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == tasks; });
}

int64_t TaskCount(ffi::ThreadPool& pool, int64_t work_items) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min(work_items, threads));
}

// The output columns p whose input column p*sw - pw + j*dw lies in [0, w).
inline void ValidRange(int64_t size_out, int64_t size_in, int64_t stride, int64_t pad, int64_t offset,
                       int64_t* lo, int64_t* hi) {
  // first p with p*stride - pad + offset >= 0, last with < size_in
  int64_t start = pad - offset;
  *lo = start <= 0 ? 0 : (start + stride - 1) / stride;
  int64_t end = size_in + pad - offset;  // p*stride < end
  *hi = end <= 0 ? 0 : std::min(size_out, (end + stride - 1) / stride);
  if (*hi < *lo) *hi = *lo;
}

// The loops are compiled twice: for baseline x86-64 (the wheel runs anywhere) and for AVX2,
// picked at run time (the channel loops vectorise 2x wider; XLA's own loops are compiled for
// the host).  -ffp-contract=off keeps both free of fused multiply-adds, so they round alike.
#if defined(__x86_64__) || defined(__i386__)
#define DIFFNAS_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define DIFFNAS_TARGET_AVX2
#endif

bool HasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

// Every (output row o, tap (i, j)) whose input row o*sh - ph + i*dh lies inside the input, with
// the output columns [lo, up) whose input columns lie inside too: visit(o, hi, i, j, lo, up),
// in the order the sums are defined in (o, then i, then j).
template <typename Visit>
inline __attribute__((always_inline)) void ForEachTap(const Geometry& s, int64_t o, Visit visit) {
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t hi = o * s.sh - s.ph + i * s.dh;
    if (hi < 0 || hi >= s.h) continue;
    for (int64_t j = 0; j < s.kw; ++j) {
      int64_t lo, up;
      ValidRange(s.wo, s.w, s.sw, s.pw, j * s.dw, &lo, &up);
      visit(hi, i, j, lo, up);
    }
  }
}

// y[g, n] = sum over the taps of x[gx, n] shifted * k[g].  With unit column stride, an output
// row's run [lo, up) reads one contiguous run of the input row, so each tap is one multiply-add
// over (up - lo) * C contiguous values against `krows`, the tap's kernel repeated along the row
// (filled by FillKernelRows for group g; (KH * KW, WO, C)): one long vectorised loop instead of
// one C-long loop per output pixel.  The same products are added in the same order either way.
template <typename T>
void FillKernelRows(const Geometry& s, const T* k, int64_t gi, T* krows) {
  for (int64_t t = 0; t < s.kh * s.kw; ++t) {
    const T* kk = k + s.KIndex(gi, 0, 0) + t * s.c;
    for (int64_t p = 0; p < s.wo; ++p) std::copy(kk, kk + s.c, krows + (t * s.wo + p) * s.c);
  }
}

// krows scratch for one task: (KH * KW, WO, C) with unit column stride, else unused (empty)
template <typename T>
std::vector<T> KernelRowsScratch(const Geometry& s) {
  return std::vector<T>(static_cast<size_t>(s.sw == 1 ? s.kh * s.kw * s.wo * s.c : 0));
}

// One tap over an output row's run [lo, up): dst[p] += src[p] * k for each column p, where `dst`
// and `src` step `dst_step` and `src_step` values a column (C or SW * C) and k is the tap's kernel
// `kk` (C values).  With unit column stride both step C, so the run is one multiply-add over
// (up - lo) * C contiguous values against `krow`, the tap's kernel repeated along the row from
// column lo.
template <typename T>
inline __attribute__((always_inline)) void MulAddTap(const Geometry& s, T* dst, int64_t dst_step, const T* src,
                                                     int64_t src_step, const T* kk, const T* krow, int64_t count) {
  const int64_t c = s.c;
  if (s.sw == 1) {
    const int64_t len = count * c;
    for (int64_t e = 0; e < len; ++e) dst[e] += src[e] * krow[e];
    return;
  }
  for (int64_t p = 0; p < count; ++p, dst += dst_step, src += src_step) {
    for (int64_t ci = 0; ci < c; ++ci) dst[ci] += src[ci] * kk[ci];
  }
}

template <typename T>
inline __attribute__((always_inline)) void ForwardBody(const Geometry& s, const T* x, const T* k, T* y, int64_t gi,
                                                       int64_t ni, const T* krows) {
  const int64_t c = s.c;
  for (int64_t o = 0; o < s.ho; ++o) {
    T* yrow = y + s.YIndex(gi, ni, o, 0);
    std::fill(yrow, yrow + s.wo * c, T(0));
    ForEachTap(s, o, [&](int64_t hi, int64_t i, int64_t j, int64_t lo, int64_t up) {
      const T* xrow = x + s.XIndex(s.XGroup(gi), ni, hi, 0);
      MulAddTap(s, yrow + lo * c, c, xrow + (lo * s.sw - s.pw + j * s.dw) * c, s.sw * c, k + s.KIndex(gi, i, j),
                krows + ((i * s.kw + j) * s.wo + lo) * c, up - lo);
    });
  }
}

// dx[gx, n] = sum over the groups g reading input group gx of ct[g, n] scattered through k[g]
// (unit column stride: contiguous runs against `krows`, as in ForwardBody; krows is scratch of
// (KH * KW, WO, C), refilled per group)
template <typename T>
inline __attribute__((always_inline)) void InputTransposeBody(const Geometry& s, const T* ct, const T* k, T* dx,
                                                              int64_t ni, T* krows) {
  const int64_t c = s.c;
  for (int64_t gxi = 0; gxi < s.gx; ++gxi) {
    T* base = dx + s.XIndex(gxi, ni, 0, 0);
    std::fill(base, base + s.h * s.w * c, T(0));
  }
  for (int64_t gi = 0; gi < s.g; ++gi) {
    if (s.sw == 1) FillKernelRows(s, k, gi, krows);
    for (int64_t o = 0; o < s.ho; ++o) {
      const T* crow = ct + s.YIndex(gi, ni, o, 0);
      ForEachTap(s, o, [&](int64_t hi, int64_t i, int64_t j, int64_t lo, int64_t up) {
        T* xrow = dx + s.XIndex(s.XGroup(gi), ni, hi, 0);
        MulAddTap(s, xrow + (lo * s.sw - s.pw + j * s.dw) * c, s.sw * c, crow + lo * c, c, k + s.KIndex(gi, i, j),
                  krows + ((i * s.kw + j) * s.wo + lo) * c, up - lo);
      });
    }
  }
}

// a[ci] += sum over p < count of xv[p * x_step + ci] * cv[p * c_step + ci], for B channels, with
// the B sums held in registers across p (through `a` itself the compiler must store and reload
// each sum every column, as `a` may alias the inputs): the same products added in the same order.
template <typename T, int B>
inline __attribute__((always_inline)) void DotColumns(T* a, const T* xv, int64_t x_step, const T* cv,
                                                      int64_t c_step, int64_t count) {
  T sum[B];
  for (int b = 0; b < B; ++b) sum[b] = a[b];
  for (int64_t p = 0; p < count; ++p, xv += x_step, cv += c_step) {
    for (int b = 0; b < B; ++b) sum[b] += xv[b] * cv[b];
  }
  for (int b = 0; b < B; ++b) a[b] = sum[b];
}

// acc[i, j, :] += sum over (o, p) of x[gx, n] shifted * ct[g, n]   (acc: (KH, KW, C)); the
// channels in register blocks of 16, then 8, then one at a time
template <typename T>
inline __attribute__((always_inline)) void KernelTransposeBody(const Geometry& s, const T* x, const T* ct, T* acc,
                                                               int64_t gi, int64_t ni) {
  const int64_t c = s.c;
  for (int64_t o = 0; o < s.ho; ++o) {
    const T* crow = ct + s.YIndex(gi, ni, o, 0);
    ForEachTap(s, o, [&](int64_t hi, int64_t i, int64_t j, int64_t lo, int64_t up) {
      const T* xv = x + s.XIndex(s.XGroup(gi), ni, hi, 0) + (lo * s.sw - s.pw + j * s.dw) * c;
      const T* cv = crow + lo * c;
      T* a = acc + (i * s.kw + j) * c;
      const int64_t x_step = s.sw * c, count = up - lo;
      int64_t ci = 0;
      for (; ci + 16 <= c; ci += 16) DotColumns<T, 16>(a + ci, xv + ci, x_step, cv + ci, c, count);
      for (; ci + 8 <= c; ci += 8) DotColumns<T, 8>(a + ci, xv + ci, x_step, cv + ci, c, count);
      for (; ci < c; ++ci) DotColumns<T, 1>(a + ci, xv + ci, x_step, cv + ci, c, count);
    });
  }
}

// name(...) for baseline x86-64 and nameAvx2(...) for AVX2, both running nameBody
#define DIFFNAS_LOOP_CLONES(name, params, args)                     \
  template <typename T>                                             \
  void name params {                                                \
    name##Body args;                                                \
  }                                                                 \
  template <typename T>                                             \
  DIFFNAS_TARGET_AVX2 void name##Avx2 params {                      \
    name##Body args;                                                \
  }

DIFFNAS_LOOP_CLONES(Forward, (const Geometry& s, const T* x, const T* k, T* y, int64_t gi, int64_t ni,
                              const T* krows),
                    (s, x, k, y, gi, ni, krows))
DIFFNAS_LOOP_CLONES(InputTranspose, (const Geometry& s, const T* ct, const T* k, T* dx, int64_t ni, T* krows),
                    (s, ct, k, dx, ni, krows))
DIFFNAS_LOOP_CLONES(KernelTranspose, (const Geometry& s, const T* x, const T* ct, T* acc, int64_t gi, int64_t ni),
                    (s, x, ct, acc, gi, ni))

ffi::Error CheckRank(const ffi::AnyBuffer& b, size_t rank, const char* what) {
  if (b.dimensions().size() != rank) {
    return ffi::Error::InvalidArgument(std::string("dwconv: ") + what + " has the wrong rank");
  }
  return ffi::Error::Success();
}

// x-like (Gx, N, H, W, C), y-like (G, N, HO, WO, C), k-like (G, KH, KW, C)
ffi::Error MakeGeometry(const ffi::AnyBuffer& xl, const ffi::AnyBuffer& yl, const ffi::AnyBuffer& kl,
                        int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                        Geometry* s) {
  if (auto e = CheckRank(xl, 5, "the input"); e.failure()) return e;
  if (auto e = CheckRank(yl, 5, "the output"); e.failure()) return e;
  if (auto e = CheckRank(kl, 4, "the kernel"); e.failure()) return e;
  auto xd = xl.dimensions(), yd = yl.dimensions(), kd = kl.dimensions();
  *s = Geometry{yd[0], xd[0], xd[1], xd[2], xd[3], xd[4], kd[1], kd[2], yd[2], yd[3],
                sh, sw, ph, pw, dh, dw};
  if (s->gx < 1 || s->g % s->gx != 0 || kd[0] != s->g || yd[1] != s->n || yd[4] != s->c || kd[3] != s->c) {
    return ffi::Error::InvalidArgument("dwconv: inconsistent shapes");
  }
  if (xl.element_type() != yl.element_type() || xl.element_type() != kl.element_type()) {
    return ffi::Error::InvalidArgument("dwconv: operands of different dtypes");
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error RunForward(ffi::ThreadPool pool, const Geometry& s, const T* x, const T* k, T* y) {
  const bool avx2 = HasAvx2();
  const int64_t items = s.g * s.n;
  const int64_t tasks = TaskCount(pool, items);
  ParallelFor(pool, tasks, [&](int64_t t) {
    std::vector<T> krows = KernelRowsScratch<T>(s);
    int64_t filled = -1;  // the group krows holds
    for (int64_t it = t * items / tasks; it < (t + 1) * items / tasks; ++it) {
      const int64_t gi = it / s.n;
      if (s.sw == 1 && gi != filled) {
        FillKernelRows(s, k, gi, krows.data());
        filled = gi;
      }
      if (avx2) {
        ForwardAvx2(s, x, k, y, gi, it % s.n, krows.data());
      } else {
        Forward(s, x, k, y, gi, it % s.n, krows.data());
      }
    }
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error RunInputTranspose(ffi::ThreadPool pool, const Geometry& s, const T* ct, const T* k, T* dx) {
  const bool avx2 = HasAvx2();
  const int64_t tasks = TaskCount(pool, s.n);
  ParallelFor(pool, tasks, [&](int64_t t) {
    std::vector<T> krows = KernelRowsScratch<T>(s);
    for (int64_t ni = t * s.n / tasks; ni < (t + 1) * s.n / tasks; ++ni) {
      if (avx2) {
        InputTransposeAvx2(s, ct, k, dx, ni, krows.data());
      } else {
        InputTranspose(s, ct, k, dx, ni, krows.data());
      }
    }
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error RunKernelTranspose(ffi::ThreadPool pool, const Geometry& s, const T* x, const T* ct, T* dk) {
  const bool avx2 = HasAvx2();
  const int64_t per_group = s.kh * s.kw * s.c;
  const int64_t tasks = TaskCount(pool, s.n);
  // partial[t] holds task t's sums for every group; added in task order at the end
  std::vector<T> partial(static_cast<size_t>(tasks * s.g * per_group), T(0));
  ParallelFor(pool, tasks, [&](int64_t t) {
    for (int64_t gi = 0; gi < s.g; ++gi) {
      T* acc = partial.data() + (t * s.g + gi) * per_group;
      for (int64_t ni = t * s.n / tasks; ni < (t + 1) * s.n / tasks; ++ni) {
        if (avx2) {
          KernelTransposeAvx2(s, x, ct, acc, gi, ni);
        } else {
          KernelTranspose(s, x, ct, acc, gi, ni);
        }
      }
    }
  });
  for (int64_t e = 0; e < s.g * per_group; ++e) {
    T sum = partial[e];
    for (int64_t t = 1; t < tasks; ++t) sum += partial[t * s.g * per_group + e];
    dk[e] = sum;
  }
  return ffi::Error::Success();
}

// The geometry of the x-like (Gx, N, H, W, C), y-like (G, N, HO, WO, C) and k-like (G, KH, KW,
// C) buffers checked, then run(s, T{}) for their element type T (float32 or float64).
template <typename Run>
ffi::Error Checked(const ffi::AnyBuffer& xl, const ffi::AnyBuffer& yl, const ffi::AnyBuffer& kl, int64_t sh,
                   int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, Run run) {
  FlushDenormals flush;
  Geometry s;
  if (auto e = MakeGeometry(xl, yl, kl, sh, sw, ph, pw, dh, dw, &s); e.failure()) return e;
  switch (xl.element_type()) {
    case ffi::DataType::F32:
      return run(s, float{});
    case ffi::DataType::F64:
      return run(s, double{});
    default:
      return ffi::Error::InvalidArgument("dwconv: float32 or float64 only");
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y,
                       int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  return Checked(x, *y, k, sh, sw, ph, pw, dh, dw, [&](const Geometry& s, auto zero) {
    using T = decltype(zero);
    return RunForward(pool, s, x.typed_data<T>(), k.typed_data<T>(), y->typed_data<T>());
  });
}

ffi::Error InputTransposeImpl(ffi::ThreadPool pool, ffi::AnyBuffer ct, ffi::AnyBuffer k,
                              ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                              int64_t dh, int64_t dw) {
  return Checked(*dx, ct, k, sh, sw, ph, pw, dh, dw, [&](const Geometry& s, auto zero) {
    using T = decltype(zero);
    return RunInputTranspose(pool, s, ct.typed_data<T>(), k.typed_data<T>(), dx->typed_data<T>());
  });
}

ffi::Error KernelTransposeImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ct,
                               ffi::Result<ffi::AnyBuffer> dk, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                               int64_t dh, int64_t dw) {
  return Checked(x, ct, *dk, sh, sw, ph, pw, dh, dw, [&](const Geometry& s, auto zero) {
    using T = decltype(zero);
    return RunKernelTranspose(pool, s, x.typed_data<T>(), ct.typed_data<T>(), dk->typed_data<T>());
  });
}

}  // namespace

#define DIFFNAS_DWCONV_HANDLER(name, impl)           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,          \
                                ffi::Ffi::Bind()     \
                                    .Ctx<ffi::ThreadPool>() \
                                    .Arg<ffi::AnyBuffer>()  \
                                    .Arg<ffi::AnyBuffer>()  \
                                    .Ret<ffi::AnyBuffer>()  \
                                    .Attr<int64_t>("sh")    \
                                    .Attr<int64_t>("sw")    \
                                    .Attr<int64_t>("ph")    \
                                    .Attr<int64_t>("pw")    \
                                    .Attr<int64_t>("dh")    \
                                    .Attr<int64_t>("dw"));

DIFFNAS_DWCONV_HANDLER(DiffnasDwconvForward, ForwardImpl)
DIFFNAS_DWCONV_HANDLER(DiffnasDwconvInputTranspose, InputTransposeImpl)
DIFFNAS_DWCONV_HANDLER(DiffnasDwconvKernelTranspose, KernelTransposeImpl)

static PyObject* Targets(PyObject*, PyObject*) {
  static const diffnas::FfiTarget kTargets[] = {
      {"diffnas_dwconv_fwd", reinterpret_cast<void*>(DiffnasDwconvForward)},
      {"diffnas_dwconv_dx", reinterpret_cast<void*>(DiffnasDwconvInputTranspose)},
      {"diffnas_dwconv_dk", reinterpret_cast<void*>(DiffnasDwconvKernelTranspose)},
  };
  return diffnas::TargetsDict(kTargets);
}

static PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "The XLA FFI handlers as {target name: PyCapsule}."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_dwconv_cpu",
    "Depthwise convolution and its transposes as XLA FFI handlers for the CPU (see _dwconv.py).", -1,
    kMethods,
};

PyMODINIT_FUNC PyInit__dwconv_cpu(void) { return PyModule_Create(&kModule); }
