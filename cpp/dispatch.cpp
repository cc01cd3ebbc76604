// Run-time choice of the instruction set (see dispatch.h). Compiled without any
// ISA flags: it only asks the CPU what it supports and hands out a table.
#include "dispatch.h"

#include <atomic>
#include <stdexcept>

namespace lstmfast {
namespace {

// The builds in this binary, worst first. CMake defines LSTMFAST_HAVE_<ISA> for
// the ones it compiled.
std::vector<const KernelTable*> compiled() {
  std::vector<const KernelTable*> tables{&generic::kernel_table};
#ifdef LSTMFAST_HAVE_AVX2
  tables.push_back(&avx2::kernel_table);
#endif
#ifdef LSTMFAST_HAVE_AVX512
  tables.push_back(&avx512::kernel_table);
#endif
  return tables;
}

bool cpu_supports(const std::string& name) {
  if (name == "generic") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

std::vector<const KernelTable*> supported() {
  std::vector<const KernelTable*> tables;
  for (const KernelTable* t : compiled())
    if (cpu_supports(t->name)) tables.push_back(t);
  return tables;
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = supported().back();
    const KernelTable* expected = nullptr;
    if (!g_table.compare_exchange_strong(expected, t, std::memory_order_acq_rel)) t = expected;
  }
  return *t;
}

const char* simd_target() { return kernels().name; }

std::vector<std::string> simd_targets() {
  std::vector<std::string> names;
  for (const KernelTable* t : supported()) names.emplace_back(t->name);
  return names;
}

void set_simd_target(const std::string& name) {
  for (const KernelTable* t : supported()) {
    if (name == t->name) {
      g_table.store(t, std::memory_order_release);
      return;
    }
  }
  std::string known;
  for (const std::string& n : simd_targets()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown or unsupported SIMD target '" + name +
                              "'; this build on this CPU supports: " + known);
}

}  // namespace lstmfast
