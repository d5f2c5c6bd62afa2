#pragma once
// Run-time choice of the AVX2+FMA builds of the CPU kernels. Each kernel file includes its
// loop bodies twice, in namespaces `generic` and `avx2` (the latter under
// `#pragma GCC target("avx2,fma")`, only where NL_HAVE_AVX2_TARGET is defined), and calls
// the avx2 one when cpu_has_avx2_fma(). NESTED_LEARNING_CPU_ISA=generic makes every call take
// the generic build (what CPUs without AVX2, and other architectures, run), so that it can be
// tested on any machine.
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define NL_HAVE_AVX2_TARGET 1
#endif

namespace nested_learning {
inline bool cpu_has_avx2_fma() {
#ifdef NL_HAVE_AVX2_TARGET
  static const bool ok = [] {
    const char* isa = std::getenv("NESTED_LEARNING_CPU_ISA");
    if (isa && std::strcmp(isa, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}
}  // namespace nested_learning
