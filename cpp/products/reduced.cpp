// Packing of reduced-precision weights (lstmfast.h: ReducedMatrix), once per
// quantized layer. Plain loops: it runs once, not per call.
#include <stdexcept>
#include <string>

#include "lstmfast.h"

namespace lstmfast {
namespace {

// Room for `count` values of T at byte `offset` of r.storage, 64-byte steps apart.
template <typename T>
int64_t reserve(int64_t& offset, int64_t count) {
  const int64_t at = offset;
  offset += (count * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
  return at;
}

template <typename T>
T* at_byte(ReducedMatrix& r, int64_t offset) {
  return reinterpret_cast<T*>(reinterpret_cast<char*>(r.storage.data()) + offset);
}

void check(int64_t M, int64_t K, const char* what) {
  if (M < 1 || K < 1)
    throw std::invalid_argument(std::string(what) + ": expected a non-empty matrix, got " +
                                std::to_string(M) + " x " + std::to_string(K));
}

// An empty matrix of M x K in `precision`, K padded to a multiple of `k_group`.
ReducedMatrix shaped(Precision precision, int64_t M, int64_t K, int64_t k_group) {
  ReducedMatrix r;
  r.precision = precision;
  r.M = M;
  r.K = K;
  r.K_padded = (K + k_group - 1) / k_group * k_group;
  r.panels = (M + kReducedPanel - 1) / kReducedPanel;
  return r;
}

}  // namespace

ReducedMatrix pack_int8(const int8_t* q, const float* scale, int64_t M, int64_t K) {
  check(M, K, "pack_int8");
  // The products are summed in int32: K terms of at most 127 x 128 each.
  if (K > kMaxInt8Inputs)
    throw std::invalid_argument("pack_int8: " + std::to_string(K) +
                                " inputs per row would overflow the int32 sums (at most " +
                                std::to_string(kMaxInt8Inputs) + ")");
  ReducedMatrix r = shaped(Precision::Int8, M, K, 4);
  const int64_t rows = r.panels * kReducedPanel, groups = r.K_padded / 4;
  int64_t bytes = 0;
  const int64_t q_at = reserve<int8_t>(bytes, rows * r.K_padded);
  const int64_t scale_at = reserve<float>(bytes, rows);
  const int64_t sum_at = reserve<int32_t>(bytes, rows);
  r.storage.assign(static_cast<size_t>(bytes / 8), 0);  // zero: the padding
  int8_t* panels = at_byte<int8_t>(r, q_at);
  float* scales = at_byte<float>(r, scale_at);
  int32_t* sums = at_byte<int32_t>(r, sum_at);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t panel = m / kReducedPanel, lane = m % kReducedPanel;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      panels[((panel * groups + k / 4) * kReducedPanel + lane) * 4 + k % 4] = q[m * K + k];
      sum += q[m * K + k];
    }
    scales[m] = scale[m];
    sums[m] = sum;
  }
  r.q = panels;
  r.scale = scales;
  r.row_sum = sums;
  return r;
}

ReducedMatrix pack_bf16(const uint16_t* bits, int64_t M, int64_t K) {
  check(M, K, "pack_bf16");
  ReducedMatrix r = shaped(Precision::BFloat16, M, K, 2);
  const int64_t rows = r.panels * kReducedPanel, pairs = r.K_padded / 2;
  int64_t bytes = 0;
  const int64_t at = reserve<uint16_t>(bytes, rows * r.K_padded);
  r.storage.assign(static_cast<size_t>(bytes / 8), 0);
  uint16_t* panels = at_byte<uint16_t>(r, at);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t panel = m / kReducedPanel, lane = m % kReducedPanel;
    for (int64_t k = 0; k < K; ++k)
      panels[((panel * pairs + k / 2) * kReducedPanel + lane) * 2 + k % 2] = bits[m * K + k];
  }
  r.bf16 = panels;
  return r;
}

}  // namespace lstmfast
