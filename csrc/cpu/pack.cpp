// CPU kernels of vitq::pack_int4 / vitq::unpack_int4 (reference.pack_int4 / unpack_int4).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/common.h"

namespace vitq::cpu {
namespace {

constexpr int64_t kGrainBytes = 1 << 15;

at::Tensor pack_int4_cpu(const at::Tensor& codes) {
  check_dtype(codes, at::kChar, "pack_int4", "codes");
  check_cpu_contiguous(codes, "pack_int4", "codes");
  TORCH_CHECK_VALUE(codes.dim() >= 1, "pack_int4: codes must have at least one dimension");
  const int64_t K = codes.size(-1);
  TORCH_CHECK_VALUE(K % 2 == 0, "pack_int4 needs an even last dimension, got ", K);

  std::vector<int64_t> shape(codes.sizes().begin(), codes.sizes().end());
  shape.back() = K / 2;
  at::Tensor packed = at::empty(shape, codes.options().dtype(at::kByte));
  const int64_t n_bytes = packed.numel();
  if (n_bytes == 0) return packed;

  const int8_t* src = codes.data_ptr<int8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  // out-of-range codes would lose their high bits silently, so they are an error;
  // each chunk records its own verdict and the error is raised outside the parallel region
  std::vector<uint8_t> bad(static_cast<size_t>(at::divup(n_bytes, kGrainBytes)), 0);
  at::parallel_for(0, at::divup(n_bytes, kGrainBytes), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b1 = std::min(n_bytes, (c + 1) * kGrainBytes);
      bool out_of_range = false;
      for (int64_t b = c * kGrainBytes; b < b1; ++b) {
        const int8_t lo = src[2 * b], hi = src[2 * b + 1];
        out_of_range |= (lo < -8) | (lo > 7) | (hi < -8) | (hi > 7);
        dst[b] = pack_nibbles(lo, hi);
      }
      bad[c] = out_of_range;
    }
  });
  for (uint8_t b : bad)
    TORCH_CHECK_VALUE(!b, "pack_int4: codes outside the signed 4-bit range [-8, 7] (min ", codes.min().item<int>(),
                      ", max ", codes.max().item<int>(), ")");
  return packed;
}

at::Tensor unpack_int4_cpu(const at::Tensor& packed) {
  check_dtype(packed, at::kByte, "unpack_int4", "packed");
  check_cpu_contiguous(packed, "unpack_int4", "packed");
  TORCH_CHECK_VALUE(packed.dim() >= 1, "unpack_int4: packed must have at least one dimension");

  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
  shape.back() *= 2;
  at::Tensor codes = at::empty(shape, packed.options().dtype(at::kChar));
  const int64_t n_bytes = packed.numel();
  if (n_bytes == 0) return codes;

  const uint8_t* src = packed.data_ptr<uint8_t>();
  int8_t* dst = codes.data_ptr<int8_t>();
  at::parallel_for(0, n_bytes, kGrainBytes,
                   [&](int64_t b0, int64_t b1) { unpack_row(src + b0, b1 - b0, dst + 2 * b0); });
  return codes;
}

}  // namespace
}  // namespace vitq::cpu

TORCH_LIBRARY_IMPL(vitq, CPU, m) {
  m.impl("pack_int4", &vitq::cpu::pack_int4_cpu);
  m.impl("unpack_int4", &vitq::cpu::unpack_int4_cpu);
}
