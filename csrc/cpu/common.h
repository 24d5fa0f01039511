// Shared helpers of the C++ CPU kernels: argument checks and int4 nibble codecs.
// Errors follow reference.py: a wrong dtype is a TypeError, anything else a ValueError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

// Hot loops are compiled twice (AVX2 and baseline x86-64) and picked at load time:
// the extension is built without -march flags so that one wheel runs everywhere.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VITQ_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VITQ_CPU_CLONES
#endif

namespace vitq::cpu {

// torch's Python spelling of a dtype (ScalarType prints as "Char", "Byte", ...)
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name,
                    " must be contiguous (call .contiguous() first); got strides ", t.strides());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want), ", got ",
                   dtype_name(t.scalar_type()));
}

// dtype, device, contiguity and an exact shape.
inline void check_tensor(const at::Tensor& t, at::ScalarType want, at::IntArrayRef shape, const char* op,
                         const char* name) {
  check_dtype(t, want, op, name);
  check_cpu_contiguous(t, op, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Uniform code widths (reference.ACT_BITS / WEIGHT_BITS): 3-bit codes live in the int4
// container, so every kernel branches on packed (3, 4) vs int8 (8), never on 3 itself.
inline void check_bits(int64_t bits, const char* op, const char* name) {
  TORCH_CHECK_VALUE(bits == 3 || bits == 4 || bits == 8, op, ": ", name, " must be one of (3, 4, 8), got ", bits);
}
inline bool is_packed(int64_t bits) { return bits == 3 || bits == 4; }

// Two's-complement nibbles: element 2j in the low nibble, 2j+1 in the high nibble.
inline int8_t low_nibble(uint8_t byte) { return static_cast<int8_t>(static_cast<uint8_t>(byte << 4)) >> 4; }
inline int8_t high_nibble(uint8_t byte) { return static_cast<int8_t>(byte) >> 4; }
inline uint8_t pack_nibbles(int8_t lo, int8_t hi) {
  return static_cast<uint8_t>((static_cast<uint8_t>(lo) & 0xF) | ((static_cast<uint8_t>(hi) & 0xF) << 4));
}

// Unpacks n bytes into 2n int8 codes.
inline void unpack_row(const uint8_t* src, int64_t n, int8_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    dst[2 * j] = low_nibble(src[j]);
    dst[2 * j + 1] = high_nibble(src[j]);
  }
}

}  // namespace vitq::cpu
