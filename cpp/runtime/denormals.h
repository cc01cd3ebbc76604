// Denormal (subnormal) numbers cost tens to hundreds of cycles per operation on
// x86: a recurrence whose state decays towards zero can slow down 10x or more.
// Kernels flush them to zero for their own duration only and give the caller's
// floating-point state back afterwards.
#pragma once

#if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define LSTMFAST_HAVE_MXCSR 1
#endif

namespace lstmfast {

// Sets FTZ (flush results to zero) and DAZ (treat denormal inputs as zero) in the
// calling thread's MXCSR; restores the previous value on destruction. Each worker
// thread that runs kernel code needs its own instance.
class ScopedFlushDenormals {
 public:
#ifdef LSTMFAST_HAVE_MXCSR
  ScopedFlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~ScopedFlushDenormals() { _mm_setcsr(saved_); }
#else
  ScopedFlushDenormals() = default;
#endif
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;

 private:
#ifdef LSTMFAST_HAVE_MXCSR
  static constexpr unsigned kFlushToZero = 0x8000;
  static constexpr unsigned kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
};

}  // namespace lstmfast
