// Tensors cross the Python/native boundary through DLPack (the ABI below is DLPack's
// legacy DLManagedTensor, v0.8, which torch, numpy, MLX and CuPy all export).
// A TensorArg borrows the producer's memory for the duration of one call and validates
// shape, dtype, device and contiguity with messages that name the argument.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmtrain {

// ---- DLPack ABI (fields and values fixed by the DLPack specification) ----
enum DLDeviceType : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLMetal = 8, kDLCUDAManaged = 13 };
struct DLDevice { int32_t device_type; int32_t device_id; };
enum DLDataTypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

enum class DType { F32, F64, BF16, F16, OTHER };

inline DType dtype_of(const DLDataType& t) {
  if (t.lanes != 1) return DType::OTHER;
  if (t.code == kDLFloat && t.bits == 32) return DType::F32;
  if (t.code == kDLFloat && t.bits == 64) return DType::F64;
  if (t.code == kDLFloat && t.bits == 16) return DType::F16;
  if (t.code == kDLBfloat && t.bits == 16) return DType::BF16;
  return DType::OTHER;
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return "an unsupported dtype";
  }
}

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// A borrowed, validated view of one DLPack tensor argument.
struct TensorArg {
  std::string name;
  DLTensor* t = nullptr;        // null when the optional argument was None
  std::vector<int64_t> shape;
  DType dtype = DType::OTHER;

  bool present() const { return t != nullptr; }
  int64_t size(int i) const { return shape.at(i); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  int device_type() const { return t->device.device_type; }
  int device_id() const { return t->device.device_id; }
  template <typename T> T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(t->data) + t->byte_offset);
  }
  void* raw() const { return static_cast<char*>(t->data) + t->byte_offset; }

  void init(std::string n, DLTensor* tensor) {
    name = std::move(n);
    t = tensor;
    if (!t) return;
    if (t->ndim < 0 || t->ndim > 8) fail(name + ": unsupported number of dimensions");
    shape.assign(t->shape, t->shape + t->ndim);
    for (auto s : shape)
      if (s < 0) fail(name + ": negative dimension in shape " + shape_str(shape));
    dtype = dtype_of(t->dtype);
    // Row-major contiguity; dimensions of size 1 (and empty tensors) may carry any stride.
    if (t->strides && numel() > 0) {
      int64_t expect = 1;
      for (int i = t->ndim - 1; i >= 0; --i) {
        if (shape[i] != 1 && t->strides[i] != expect)
          fail(name + ": must be contiguous (row-major); call .contiguous() first");
        expect *= shape[i];
      }
    }
    if (numel() > 0 && t->data == nullptr) fail(name + ": null data pointer");
  }

  void expect_ndim(int n) const {
    if ((int)shape.size() != n)
      fail(name + ": expected " + std::to_string(n) + " dimensions, got shape " + shape_str(shape));
  }
  void expect_shape(const std::vector<int64_t>& s) const {
    if (shape != s) fail(name + ": expected shape " + shape_str(s) + ", got " + shape_str(shape));
  }
  void expect_dtype(DType d) const {
    if (dtype != d)
      fail(name + ": expected dtype " + std::string(dtype_name(d)) + ", got " + dtype_name(dtype));
  }
  void expect_same_device(const TensorArg& o) const {
    if (!o.present()) return;
    if (device_type() != o.device_type() || device_id() != o.device_id())
      fail(name + " and " + o.name + " are on different devices");
  }
};

}  // namespace llmtrain
