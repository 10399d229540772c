// pybind11 bindings of llmtrain._C. Every entry point takes DLPack-capable objects (or DLPack
// capsules), validates all of them, and dispatches on the device: kDLCPU to the CPU kernels,
// kDLCUDA to the CUDA kernels on the caller's stream (passed as an integer handle). Outputs and
// workspaces are allocated by the caller. The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "ops.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace llmtrain;

namespace {

// Owns the DLPack capsules consumed during one call and releases them at the end.
class Borrowed {
 public:
  ~Borrowed() {
    for (auto* mt : managed_)
      if (mt && mt->deleter) mt->deleter(mt);
  }

  TensorArg arg(const char* name, py::handle obj, bool optional = false) {
    TensorArg a;
    if (obj.is_none()) {
      if (!optional) fail(std::string(name) + ": a tensor is required, got None");
      a.init(name, nullptr);
      return a;
    }
    py::object cap;
    if (PyCapsule_CheckExact(obj.ptr())) {
      cap = py::reinterpret_borrow<py::object>(obj);
    } else if (py::hasattr(obj, "__dlpack__")) {
      try {
        cap = obj.attr("__dlpack__")();
      } catch (py::error_already_set& e) {
        fail(std::string(name) + ": could not export through DLPack: " + e.what());
      }
    } else {
      fail(std::string(name) + ": expected a tensor supporting DLPack (torch, numpy, MLX, CuPy), got " +
           std::string(py::str(py::type::handle_of(obj))));
    }
    if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
      fail(std::string(name) + ": DLPack capsule was already consumed or is not a legacy 'dltensor'");
    auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    PyCapsule_SetName(cap.ptr(), "used_dltensor");  // we now own it and call its deleter
    managed_.push_back(mt);
    a.init(name, &mt->dl_tensor);
    return a;
  }

 private:
  std::vector<DLManagedTensor*> managed_;
};

DType acc_dtype(DType d) { return d == DType::F64 ? DType::F64 : DType::F32; }

bool is_cuda(const TensorArg& a) { return a.device_type() == kDLCUDA || a.device_type() == kDLCUDAManaged; }

void check_device(const TensorArg& ref, std::initializer_list<const TensorArg*> others) {
  const int dt = ref.device_type();
  if (dt != kDLCPU && !is_cuda(ref))
    fail(ref.name + ": unsupported device (only CPU and CUDA tensors are accepted)");
  for (auto* o : others) ref.expect_same_device(*o);
#ifndef LLMTRAIN_WITH_CUDA
  if (is_cuda(ref))
    fail("llmtrain._C was built without CUDA kernels (no nvcc at build time); reinstall with nvcc on PATH");
#endif
}

void check_float_dtype(const TensorArg& a, bool cuda) {
  const DType d = a.dtype;
  const bool ok = cuda ? (d == DType::F32 || d == DType::BF16 || d == DType::F16)
                       : (d == DType::F32 || d == DType::F64 || d == DType::BF16 || d == DType::F16);
  if (!ok)
    fail(a.name + ": unsupported dtype " + dtype_name(d) +
         (cuda ? " (CUDA takes float32, bfloat16, float16)" : " (CPU takes float32, float64, bfloat16, float16)"));
}

void check_scalar(double scale, int deg, int64_t chunk) {
  if (deg != 2) fail("deg: only deg=2 is implemented, got " + std::to_string(deg));
  if (!std::isfinite(scale) || scale == 0.0) fail("scale: must be finite and non-zero");
  if (chunk < 1) fail("chunk_size: must be >= 1, got " + std::to_string(chunk));
}

// Validates q, k, v, log_g, s0, z0 and fills dims.
RetentionDims retention_dims(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& log_g,
                             const TensorArg& s0, const TensorArg& z0, int deg, double scale, int64_t chunk) {
  check_scalar(scale, deg, chunk);
  q.expect_ndim(4);
  k.expect_ndim(4);
  v.expect_ndim(4);
  check_device(q, {&k, &v, &log_g, &s0, &z0});
  const bool cuda = is_cuda(q);
  check_float_dtype(q, cuda);
  k.expect_dtype(q.dtype);
  v.expect_dtype(q.dtype);
  RetentionDims m{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0, deg, scale, chunk, q.dtype};
  if (m.d < 1 || m.d > 256) fail("q: head dim must be in [1, 256], got " + std::to_string(m.d));
  if (cuda && m.d != 32 && m.d != 64 && m.d != 128)
    fail("q: the CUDA kernels take head dim 32, 64 or 128, got " + std::to_string(m.d));
  if (m.hk < 1) fail("k: needs at least one head");
  k.expect_shape({m.b, m.t, m.hk, m.d});
  v.expect_shape({m.b, m.t, m.hk, m.d});
  if (m.hq % m.hk != 0)
    fail("mismatched heads: q has " + std::to_string(m.hq) + " heads, not a multiple of k/v's " +
         std::to_string(m.hk));
  m.D = sym_power_dim(m.d, deg);
  const DType acc = acc_dtype(q.dtype);
  if (log_g.present()) {
    log_g.expect_shape({m.b, m.t, m.hk});
    log_g.expect_dtype(acc);
  }
  if (s0.present() != z0.present()) fail("initial state: give both state and sum_of_keys, or neither");
  if (s0.present()) {
    s0.expect_shape({m.b, m.hk, m.D, m.d});
    z0.expect_shape({m.b, m.hk, m.D});
    s0.expect_dtype(acc);
    z0.expect_dtype(acc);
  }
  return m;
}

void expect_output(const TensorArg& out, const TensorArg& ref, const std::vector<int64_t>& shape, DType dtype) {
  out.expect_shape(shape);
  out.expect_dtype(dtype);
  ref.expect_same_device(out);
}

void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

// Optional caller-allocated scratch for the CUDA kernels (a byte tensor on the inputs' device).
template <typename Args> void attach_workspace(Args& a, const TensorArg& ws, const TensorArg& ref) {
  if (!ws.present()) return;
  ref.expect_same_device(ws);
  a.workspace = ws.raw();
  a.workspace_bytes = ws.numel() * (ws.t->dtype.bits / 8);
}

int64_t retention_fwd(py::handle q_, py::handle k_, py::handle v_, py::handle log_g_, py::handle s0_,
                      py::handle z0_, py::handle y_, py::handle s_out_, py::handle z_out_, int deg, double scale,
                      int64_t chunk, uintptr_t stream, py::handle ws_) {
  Borrowed own;
  auto q = own.arg("q", q_), k = own.arg("k", k_), v = own.arg("v", v_);
  auto log_g = own.arg("log_g", log_g_, true), s0 = own.arg("initial_state", s0_, true),
       z0 = own.arg("initial_sum_of_keys", z0_, true);
  auto ws = own.arg("workspace", ws_, true);
  auto y = own.arg("y", y_), s_out = own.arg("state_out", s_out_, true),
       z_out = own.arg("sum_of_keys_out", z_out_, true);
  RetentionDims m = retention_dims(q, k, v, log_g, s0, z0, deg, scale, chunk);
  const DType acc = acc_dtype(m.dtype);
  expect_output(y, q, {m.b, m.t, m.hq, m.d}, m.dtype);
  if (s_out.present() != z_out.present()) fail("state_out: give both state outputs, or neither");
  if (s_out.present()) {
    expect_output(s_out, q, {m.b, m.hk, m.D, m.d}, acc);
    expect_output(z_out, q, {m.b, m.hk, m.D}, acc);
  }
  RetentionFwdArgs a{m, q.raw(), k.raw(), v.raw(), log_g.present() ? log_g.raw() : nullptr,
                     s0.present() ? s0.raw() : nullptr, z0.present() ? z0.raw() : nullptr,
                     y.raw(), s_out.present() ? s_out.raw() : nullptr, z_out.present() ? z_out.raw() : nullptr,
                     stream_ptr(stream)};
  attach_workspace(a, ws, q);
  const bool cuda = is_cuda(q);
  py::gil_scoped_release release;
#ifdef LLMTRAIN_WITH_CUDA
  if (cuda) return power_retention_fwd_cuda(a);
#endif
  (void)cuda;
  return power_retention_fwd_cpu(a);
}

void retention_bwd(py::handle q_, py::handle k_, py::handle v_, py::handle log_g_, py::handle s0_, py::handle z0_,
                   py::handle dy_, py::handle ds_out_, py::handle dz_out_, py::handle dq_, py::handle dk_,
                   py::handle dv_, py::handle dlog_g_, py::handle ds0_, py::handle dz0_, int deg, double scale,
                   int64_t chunk, uintptr_t stream, py::handle ws_, py::handle saved_) {
  Borrowed own;
  auto q = own.arg("q", q_), k = own.arg("k", k_), v = own.arg("v", v_);
  auto log_g = own.arg("log_g", log_g_, true), s0 = own.arg("initial_state", s0_, true),
       z0 = own.arg("initial_sum_of_keys", z0_, true);
  auto saved = own.arg("saved_states", saved_, true);
  auto dy = own.arg("grad_y", dy_), ds_out = own.arg("grad_state", ds_out_, true),
       dz_out = own.arg("grad_sum_of_keys", dz_out_, true);
  auto dq = own.arg("grad_q", dq_), dk = own.arg("grad_k", dk_), dv = own.arg("grad_v", dv_);
  auto dlog_g = own.arg("grad_log_g", dlog_g_, true), ds0 = own.arg("grad_initial_state", ds0_, true),
       dz0 = own.arg("grad_initial_sum_of_keys", dz0_, true);
  auto ws = own.arg("workspace", ws_, true);
  RetentionDims m = retention_dims(q, k, v, log_g, s0, z0, deg, scale, chunk);
  const DType acc = acc_dtype(m.dtype);
  expect_output(dy, q, {m.b, m.t, m.hq, m.d}, m.dtype);
  if (ds_out.present()) expect_output(ds_out, q, {m.b, m.hk, m.D, m.d}, acc);
  if (dz_out.present()) expect_output(dz_out, q, {m.b, m.hk, m.D}, acc);
  expect_output(dq, q, {m.b, m.t, m.hq, m.d}, m.dtype);
  expect_output(dk, q, {m.b, m.t, m.hk, m.d}, m.dtype);
  expect_output(dv, q, {m.b, m.t, m.hk, m.d}, m.dtype);
  if (log_g.present() != dlog_g.present()) fail("grad_log_g: must be given exactly when log_g is");
  if (dlog_g.present()) expect_output(dlog_g, q, {m.b, m.t, m.hk}, acc);
  if (ds0.present() || dz0.present()) {
    if (!s0.present()) fail("grad_initial_state: given without an initial state");
    if (!(ds0.present() && dz0.present())) fail("grad_initial_state: give both gradients or neither");
    expect_output(ds0, q, {m.b, m.hk, m.D, m.d}, acc);
    expect_output(dz0, q, {m.b, m.hk, m.D}, acc);
  }
  RetentionBwdArgs a{m, q.raw(), k.raw(), v.raw(), log_g.present() ? log_g.raw() : nullptr,
                     s0.present() ? s0.raw() : nullptr, z0.present() ? z0.raw() : nullptr, dy.raw(),
                     ds_out.present() ? ds_out.raw() : nullptr, dz_out.present() ? dz_out.raw() : nullptr,
                     dq.raw(), dk.raw(), dv.raw(), dlog_g.present() ? dlog_g.raw() : nullptr,
                     ds0.present() ? ds0.raw() : nullptr, dz0.present() ? dz0.raw() : nullptr, stream_ptr(stream)};
  attach_workspace(a, ws, q);
  if (saved.present()) {
    q.expect_same_device(saved);
    a.saved = saved.raw();
    a.saved_bytes = saved.numel() * (saved.t->dtype.bits / 8);
  }
  const bool cuda = is_cuda(q);
  py::gil_scoped_release release;
#ifdef LLMTRAIN_WITH_CUDA
  if (cuda) return power_retention_bwd_cuda(a);
#endif
  (void)cuda;
  power_retention_bwd_cpu(a);
}

int64_t retention_step(py::handle q_, py::handle k_, py::handle v_, py::handle log_g_, py::handle s_, py::handle z_,
                       py::handle y_, int deg, double scale, uintptr_t stream, py::handle ws_) {
  Borrowed own;
  auto q = own.arg("q", q_), k = own.arg("k", k_), v = own.arg("v", v_);
  auto log_g = own.arg("log_g", log_g_, true), s = own.arg("state", s_), z = own.arg("sum_of_keys", z_);
  auto y = own.arg("y", y_);
  auto ws = own.arg("workspace", ws_, true);
  RetentionDims m = retention_dims(q, k, v, log_g, s, z, deg, scale, 1);
  expect_output(y, q, {m.b, m.t, m.hq, m.d}, m.dtype);
  RetentionStepArgs a{m, q.raw(), k.raw(), v.raw(), log_g.present() ? log_g.raw() : nullptr, s.raw(), z.raw(),
                      y.raw(), stream_ptr(stream)};
  attach_workspace(a, ws, q);
  const bool cuda = is_cuda(q);
  py::gil_scoped_release release;
#ifdef LLMTRAIN_WITH_CUDA
  if (cuda) return power_retention_step_cuda(a);
#endif
  (void)cuda;
  return power_retention_step_cpu(a);
}

// Bytes of CUDA workspace the power retention kernels need (0 without CUDA kernels).
// which: 0 forward, 1 backward, 2 step, 3 backward given the forward's saved states, 4 forward of a
// single chunk with no initial or final state, 5 forward whose workspace the backward reads (v11: chunk
// states, then the fp32 y and 1 / den).
int64_t retention_workspace_size(int64_t b, int64_t t, int64_t hq, int64_t hk, int64_t d, int64_t chunk, int which) {
#ifdef LLMTRAIN_WITH_CUDA
  if (b < 0 || t < 0 || hq < 1 || hk < 1 || d < 1 || chunk < 1 || which < 0 || which > 5)
    fail("power_retention_workspace_size: invalid sizes");
  RetentionDims m{b, t, hq, hk, d, sym_power_dim(d, 2), 2, 1.0, chunk, DType::BF16};
  return power_retention_workspace_bytes_cuda(m, which);
#else
  (void)b; (void)t; (void)hq; (void)hk; (void)d; (void)chunk; (void)which;
  return 0;
#endif
}

RmsLinDims rmslin_dims(const TensorArg& x, const TensorArg& g, const TensorArg& w, const TensorArg& bias, double eps) {
  if (!std::isfinite(eps) || eps < 0) fail("eps: must be finite and >= 0");
  x.expect_ndim(2);
  w.expect_ndim(2);
  check_device(x, {&g, &w, &bias});
  check_float_dtype(x, is_cuda(x));
  RmsLinDims m{x.size(0), x.size(1), w.size(0), eps, x.dtype};
  if (m.k < 1) fail("x: hidden size must be >= 1");
  g.expect_shape({m.k});
  g.expect_dtype(m.dtype);
  if (w.size(1) != m.k)
    fail("weight: expected shape [out_features, " + std::to_string(m.k) + "], got " + shape_str(w.shape));
  w.expect_dtype(m.dtype);
  if (bias.present()) {
    bias.expect_shape({m.m});
    bias.expect_dtype(m.dtype);
  }
  return m;
}

void rmslin_fwd(py::handle x_, py::handle g_, py::handle w_, py::handle b_, py::handle y_, py::handle rstd_,
                double eps, uintptr_t stream) {
  Borrowed own;
  auto x = own.arg("x", x_), g = own.arg("norm_weight", g_), w = own.arg("weight", w_),
       bias = own.arg("bias", b_, true);
  auto y = own.arg("y", y_), rstd = own.arg("rstd", rstd_);
  RmsLinDims m = rmslin_dims(x, g, w, bias, eps);
  expect_output(y, x, {m.n, m.m}, m.dtype);
  expect_output(rstd, x, {m.n}, acc_dtype(m.dtype));
  RmsLinFwdArgs a{m, x.raw(), g.raw(), w.raw(), bias.present() ? bias.raw() : nullptr, y.raw(), rstd.raw(),
                  stream_ptr(stream)};
  const bool cuda = is_cuda(x);
  py::gil_scoped_release release;
#ifdef LLMTRAIN_WITH_CUDA
  if (cuda) return rmsnorm_linear_fwd_cuda(a);
#endif
  (void)cuda;
  rmsnorm_linear_fwd_cpu(a);
}

void rmslin_bwd(py::handle x_, py::handle g_, py::handle w_, py::handle rstd_, py::handle dy_, py::handle dx_,
                py::handle dg_, py::handle dw_, py::handle db_, double eps, uintptr_t stream, bool dxn_given) {
  Borrowed own;
  auto x = own.arg("x", x_), g = own.arg("norm_weight", g_), w = own.arg("weight", w_),
       rstd = own.arg("rstd", rstd_), dy = own.arg("grad_y", dy_);
  auto dx = own.arg("grad_x", dx_), dg = own.arg("grad_norm_weight", dg_), dw = own.arg("grad_weight", dw_),
       db = own.arg("grad_bias", db_, true);
  TensorArg no_bias;
  no_bias.init("bias", nullptr);
  RmsLinDims m = rmslin_dims(x, g, w, no_bias, eps);
  expect_output(rstd, x, {m.n}, acc_dtype(m.dtype));
  expect_output(dy, x, {m.n, m.m}, m.dtype);
  expect_output(dx, x, {m.n, m.k}, m.dtype);
  expect_output(dg, x, {m.k}, m.dtype);
  expect_output(dw, x, {m.m, m.k}, m.dtype);
  if (db.present()) expect_output(db, x, {m.m}, m.dtype);
  RmsLinBwdArgs a{m, x.raw(), g.raw(), w.raw(), rstd.raw(), dy.raw(), dx.raw(), dg.raw(), dw.raw(),
                  db.present() ? db.raw() : nullptr, stream_ptr(stream), dxn_given};
  const bool cuda = is_cuda(x);
  if (dxn_given && !cuda) throw py::value_error("rmsnorm_linear_bwd: dxn_given is only supported for CUDA tensors");
  py::gil_scoped_release release;
#ifdef LLMTRAIN_WITH_CUDA
  if (cuda) return rmsnorm_linear_bwd_cuda(a);
#endif
  (void)cuda;
  rmsnorm_linear_bwd_cpu(a);
}

py::dict build_info() {
  py::dict d;
#ifdef LLMTRAIN_VERSION
  d["version"] = LLMTRAIN_VERSION;
#endif
  py::list backends;
  backends.append("cpu");
#ifdef LLMTRAIN_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#ifdef LLMTRAIN_WITH_CUDA
  backends.append("cuda");
  py::list devices;
  const int n = cuda_device_count();
  for (int i = 0; i < n; ++i) devices.append(cuda_device_name(i));
  d["cuda_devices"] = devices;
#ifdef LLMTRAIN_CUDA_ARCHS
  d["cuda_archs"] = LLMTRAIN_CUDA_ARCHS;
#endif
#ifdef LLMTRAIN_WITH_CUTE
  d["cutlass"] = true;  // tensor-core RMSNorm+Linear GEMMs; false: SIMT fallback only
#else
  d["cutlass"] = false;
#endif
#else
  d["cuda_devices"] = py::list();
#endif
  d["backends"] = backends;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmtrain native kernels (CPU always; CUDA when built with nvcc). Tensors cross as DLPack.";
  m.def("build_info", &build_info, "Compiled backends, OpenMP, CUDA devices visible to the runtime.");
  m.def("power_retention_fwd", &retention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("log_g"),
        py::arg("initial_state"), py::arg("initial_sum_of_keys"), py::arg("y"), py::arg("state_out"),
        py::arg("sum_of_keys_out"), py::arg("deg"), py::arg("scale"), py::arg("chunk_size"),
        py::arg("stream") = 0, py::arg("workspace") = py::none(),
        "Chunked power retention forward. Writes y, and the final state when state_out/sum_of_keys_out are "
        "given; returns the number of non-finite outputs (-1 when the device kernel does not count them).");
  m.def("power_retention_bwd", &retention_bwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("log_g"),
        py::arg("initial_state"), py::arg("initial_sum_of_keys"), py::arg("grad_y"), py::arg("grad_state"),
        py::arg("grad_sum_of_keys"), py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"),
        py::arg("grad_log_g"), py::arg("grad_initial_state"), py::arg("grad_initial_sum_of_keys"),
        py::arg("deg"), py::arg("scale"), py::arg("chunk_size"), py::arg("stream") = 0,
        py::arg("workspace") = py::none(), py::arg("saved_states") = py::none(),
        "Chunked power retention backward. Recomputes the forward's chunk states unless saved_states (the "
        "forward's CUDA workspace, kept by the caller; size the workspace with which=3 then) is given.");
  m.def("power_retention_step", &retention_step, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("log_g"),
        py::arg("state"), py::arg("sum_of_keys"), py::arg("y"), py::arg("deg"), py::arg("scale"),
        py::arg("stream") = 0, py::arg("workspace") = py::none(),
        "Recurrent decoding: advances (state, sum_of_keys) in place over t tokens and writes y.");
  m.def("power_retention_workspace_size", &retention_workspace_size, py::arg("b"), py::arg("t"), py::arg("hq"),
        py::arg("hk"), py::arg("d"), py::arg("chunk_size"), py::arg("which"),
        "Bytes of device workspace the CUDA power retention kernels need (which: 0 forward, 1 backward, "
        "2 step, 3 backward with saved_states, 4 forward of one chunk without initial or final state); "
        "pass a uint8 tensor of that size as `workspace`.");
  m.def("rmsnorm_linear_fwd", &rmslin_fwd, py::arg("x"), py::arg("norm_weight"), py::arg("weight"),
        py::arg("bias"), py::arg("y"), py::arg("rstd"), py::arg("eps"), py::arg("stream") = 0);
  m.def("rmsnorm_linear_bwd", &rmslin_bwd, py::arg("x"), py::arg("norm_weight"), py::arg("weight"),
        py::arg("rstd"), py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_norm_weight"),
        py::arg("grad_weight"), py::arg("grad_bias"), py::arg("eps"), py::arg("stream") = 0,
        py::arg("dxn_given") = false,
        "RMSNorm+Linear backward. dxn_given (CUDA only): grad_x already holds grad_y . weight (e.g. from "
        "cuBLAS) and the kernel's own data GEMM is skipped.");
}
