// What the optional C++ kernels (relax/_pav_cpu.cc, spaces/_dwconv_cpu.cc) share: the
// floating-point mode XLA:CPU runs its kernels in, and the minimal CPython module through which
// diffnas_jax/_ffi_targets.py registers their XLA FFI handlers (no pybind11 / nanobind at run
// time).
#ifndef DIFFNAS_JAX_NATIVE_FFI_MODULE_H_
#define DIFFNAS_JAX_NATIVE_FFI_MODULE_H_

#include <Python.h>

#include <cstddef>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace diffnas {

// XLA:CPU runs its kernels with denormals flushed (FTZ and DAZ; checked: jitted 1e-30f * 1e-10f
// is 0); a kernel does the same, for the same values and because a denormal operand or result
// costs ~100 cycles.  Restores the caller's mode on exit.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

struct FfiTarget {
  const char* name;
  void* handler;
};

// {target name: PyCapsule of the handler}, the return value of a module's targets().
template <std::size_t N>
PyObject* TargetsDict(const FfiTarget (&targets)[N]) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const FfiTarget& t : targets) {
    PyObject* capsule = PyCapsule_New(t.handler, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(dict, t.name, capsule) != 0) {
      Py_XDECREF(capsule);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return dict;
}

}  // namespace diffnas

#endif  // DIFFNAS_JAX_NATIVE_FFI_MODULE_H_
