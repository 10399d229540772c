// Prelude for syntax-checking MLX-generated MSL with clang's C++ for OpenCL mode
// (clang -x cl -cl-std=clc++2021 -fsyntax-only -include opencl_prelude.h): Metal's address spaces
// map onto OpenCL's (device -> __global, constant -> __constant, threadgroup -> __local,
// thread -> __private), so address-space mistakes (a threadgroup pointer passed where a device
// one is expected, threadgroup memory declared outside kernel scope, writes through constant) are
// errors here as they are in the Metal compiler. The checker replaces `[[kernel]]` with `__kernel`.
// Metal library functions are declared, not defined.
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private

// Self-contained: the checker passes -cl-no-stdinc (the libclang wheel ships no opencl-c-base.h).
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef uint uint3 __attribute__((ext_vector_type(3)));
typedef uint uint2 __attribute__((ext_vector_type(2)));
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float4 __attribute__((ext_vector_type(4)));
typedef int int32_t;
typedef uint uint32_t;
typedef long int64_t;
typedef ulong uint64_t;
typedef short int16_t;
typedef ushort uint16_t;
typedef half float16_t;

struct bfloat16_t {
  ushort bits;
  bfloat16_t() = default;
  bfloat16_t(float f);
  operator float() const;
};
typedef bfloat16_t bfloat;

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags a, mem_flags b);
void threadgroup_barrier(mem_flags f);
void simdgroup_barrier(mem_flags f);
template <class T> T min(T a, T b);
template <class T> T max(T a, T b);
float exp(float x);
float exp2(float x);
float log(float x);
float sqrt(float x);
float rsqrt(float x);
float abs(float x);
float fabs(float x);
float fma(float a, float b, float c);
bool isfinite(float x);
template <class T> T simd_sum(T v);
template <class T> T simd_max(T v);
template <class T> T simd_min(T v);
template <class T> T simd_prefix_exclusive_sum(T v);
template <class T> T simd_shuffle(T v, ushort lane);
template <class T> T simd_broadcast(T v, ushort lane);
template <class T> T simd_shuffle_xor(T v, ushort mask);
template <class T> T simd_shuffle_down(T v, ushort delta);
template <class T> T simd_shuffle_up(T v, ushort delta);
}  // namespace metal
using namespace metal;
