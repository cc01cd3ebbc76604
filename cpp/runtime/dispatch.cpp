// Run-time choice of the instruction set (see dispatch.h). Compiled without any
// ISA flags: it only asks the CPU what it supports and hands out a target.
#include "runtime/dispatch.h"

#include <atomic>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lstmfast {
namespace {

// The targets in this binary, worst first. CMake defines LSTMFAST_HAVE_<ISA> for
// the builds it compiled.
const std::vector<SimdTarget>& compiled() {
  static const std::vector<SimdTarget> targets = [] {
    std::vector<SimdTarget> t{{"generic", &generic::kernel_table, &generic::reduced_products}};
#ifdef LSTMFAST_HAVE_AVX2
    t.push_back({"avx2", &avx2::kernel_table, &avx2::reduced_products});
#endif
#ifdef LSTMFAST_HAVE_AVX2_VNNI
    t.push_back({"avx2_vnni", &avx2::kernel_table, &avx2_vnni::reduced_products});
#endif
#ifdef LSTMFAST_HAVE_AVX512
    t.push_back({"avx512", &avx512::kernel_table, &avx512::reduced_products});
#endif
#ifdef LSTMFAST_HAVE_AVX512_VNNI
    t.push_back({"avx512_vnni", &avx512::kernel_table, &avx512_vnni::reduced_products});
#endif
#ifdef LSTMFAST_HAVE_AVX512_BF16
    t.push_back({"avx512_bf16", &avx512::kernel_table, &avx512_bf16::reduced_products});
#endif
#ifdef LSTMFAST_HAVE_AVX512_AMX
    t.push_back({"avx512_amx", &avx512::kernel_table, &avx512_amx::reduced_products});
#endif
    return t;
  }();
  return targets;
}

#if defined(__x86_64__) || defined(__i386__)
// The CPU has AMX-TILE, AMX-INT8 and AMX-BF16 (CPUID leaf 7, EDX bits 24, 25, 22),
// and the operating system lets this process use the tile registers: Linux wants
// each process to ask (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once; it then
// holds for all its threads), and says no where the kernel or the hypervisor does
// not save the tiles. Asked once; elsewhere than Linux, no.
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned amx = (1u << 22) | (1u << 24) | (1u << 25);
    if ((edx & amx) != amx) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}
#endif

bool cpu_supports(const std::string& name) {
  if (name == "generic") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq");
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  if (name == "avx2") return avx2;
  // AVX-VNNI without AVX-512 (Alder Lake, Sierra Forest); where both are, avx512's
  // targets come after it and the best of them is chosen.
  if (name == "avx2_vnni") return avx2 && __builtin_cpu_supports("avxvnni");
  if (name == "avx512") return avx512;
  if (name == "avx512_vnni") return vnni;
  // Every CPU with AVX512_BF16 so far has VNNI too (Cooper Lake, Sapphire Rapids, Zen 4).
  const bool bf16 = vnni && __builtin_cpu_supports("avx512bf16");
  if (name == "avx512_bf16") return bf16;
  if (name == "avx512_amx") return bf16 && amx_usable();
#endif
  return false;
}

std::vector<const SimdTarget*> supported() {
  std::vector<const SimdTarget*> targets;
  for (const SimdTarget& t : compiled())
    if (cpu_supports(t.name)) targets.push_back(&t);
  return targets;
}

std::atomic<const SimdTarget*> g_target{nullptr};

}  // namespace

const SimdTarget& simd_target_in_use() {
  const SimdTarget* t = g_target.load(std::memory_order_acquire);
  if (!t) {
    t = supported().back();
    const SimdTarget* expected = nullptr;
    if (!g_target.compare_exchange_strong(expected, t, std::memory_order_acq_rel)) t = expected;
  }
  return *t;
}

const char* simd_target() { return simd_target_in_use().name; }

std::vector<std::string> simd_targets() {
  std::vector<std::string> names;
  for (const SimdTarget* t : supported()) names.emplace_back(t->name);
  return names;
}

std::vector<std::pair<std::string, bool>> cpu_features() {
  std::vector<std::pair<std::string, bool>> found;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  found = {{"avx2", __builtin_cpu_supports("avx2")},
           {"fma", __builtin_cpu_supports("fma")},
           {"avx512f", __builtin_cpu_supports("avx512f")},
           {"avx512_vnni", __builtin_cpu_supports("avx512vnni")},
           {"avx512_bf16", __builtin_cpu_supports("avx512bf16")},
           {"avx_vnni", __builtin_cpu_supports("avxvnni")},
           {"amx", amx_usable()}};
#endif
  return found;
}

std::vector<std::string> compiled_simd_targets() {
  std::vector<std::string> names;
  for (const SimdTarget& t : compiled()) names.emplace_back(t.name);
  return names;
}

const SimdTarget& find_compiled_simd_target(const std::string& name) {
  for (const SimdTarget& t : compiled())
    if (name == t.name) return t;
  std::string known;
  for (const std::string& n : compiled_simd_targets()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown SIMD target '" + name + "'; this build has: " + known);
}

const SimdTarget& find_simd_target(const std::string& name) {
  for (const SimdTarget* t : supported())
    if (name == t->name) return *t;
  std::string known;
  for (const std::string& n : simd_targets()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown or unsupported SIMD target '" + name +
                              "'; this build on this CPU supports: " + known);
}

void set_simd_target(const std::string& name) {
  g_target.store(&find_simd_target(name), std::memory_order_release);
}

}  // namespace lstmfast
