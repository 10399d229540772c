// Shared by the sm_90a forward GEMMs that compute rstd inside the kernel (rmsnorm_linear_sm90_fused.cu;
// the producer-sum variant on branch exp-rmslin-ps): the per-tile rstd array in shared memory and the epilogue leaf that
// writes it to global memory. Only included when the build has the CuTe/CUTLASS headers.
#pragma once

#include "rmsnorm_linear_sm90_gemm.cuh"

namespace llmtrain {
namespace rmslin {
namespace sm90 {

// Adds the squares of the bf16 pair xv to ss (the row sums of the fused forwards).
CUTLASS_DEVICE void add_squares(uint32_t xv, float& ss) {
  const float lo = __uint_as_float(xv << 16);  // bf16 -> fp32 is exact: the high half of the word
  const float hi = __uint_as_float(xv & 0xffff0000u);
  ss = fmaf(lo, lo, ss);
  ss = fmaf(hi, hi, ss);
}

// Per-CTA rstd of the current 128-row tile, shared by the mainloop (writer) and the epilogue node.
CUTLASS_DEVICE float* tile_rstd_smem() {
  __shared__ float s[128];
  return s;
}

// Epilogue leaf: passes the (already row-scaled) accumulator through and, for the first N tile of
// each row block, writes that block's rstd (from shared memory) to global memory.
struct RstdStoreAcc {
  struct SharedStorage {};
  struct Arguments {
    float* rstd = nullptr;
  };
  using Params = Arguments;
  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& a, void*) {
    return a;
  }
  template <class ProblemShape> static bool can_implement(ProblemShape const&, Arguments const&) { return true; }
  template <class ProblemShape> static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE RstdStoreAcc() {}
  CUTLASS_HOST_DEVICE RstdStoreAcc(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementAccumulator, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const& frg_acc, int, int, int) {
      return frg_acc;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    const int t = args.thread_idx;
    if (params.rstd && int(n) == 0 && t < 128) {
      const int r = int(m) * 128 + t;
      if (r < int(M)) params.rstd[r] = tile_rstd_smem()[t];
    }
    return ConsumerStoreCallbacks{};
  }
};

// A builder mainloop with the norm's arguments added (g, k, eps): the base of the forward mainloops
// that compute rstd themselves (rmsnorm_linear_sm90_fused.cu, rmsnorm_linear_sm90_fwd_rs.cu).
template <class Base> struct NormArgsMainloop : Base {
  struct Arguments : Base::Arguments {
    const cutlass::bfloat16_t* g = nullptr;  // norm weight [K] (null: W is already W diag(g))
    int k = 0;
    float eps = 0.f;
  };
  struct Params : Base::Params {
    const cutlass::bfloat16_t* g;
    int k;
    float eps;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& ps, Arguments const& args, void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(ps, args, workspace);
    p.g = args.g;
    p.k = args.k;
    p.eps = args.eps;
    return p;
  }
};

// Types of a forward GEMM whose mainloop leaves the accumulators rstd-scaled and tile_rstd_smem()
// filled: D = acc + bias[col], and the epilogue stores rstd. ExtraSmem: bytes of static shared
// memory the mainloop adds (carved out of the stage count). At namespace scope: the host compiler
// mis-parses the builders inside a function template.
template <class Element_, int ExtraSmem> struct RstdFwdTypes {
  using Element = Element_;
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Element, float, Round>, RstdStoreAcc,
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float, Stride<_0, _1, int64_t>,
                                                  16 / sizeof(Element)>>;
  static constexpr int Align = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, Align, Element,
      cutlass::layout::RowMajor, Align, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, Align, Element,
      cutlass::layout::ColumnMajor, Align, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage)) +
                                                        ExtraSmem>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
};

// Launches the forward GEMM of Types with Mainloop, a subclass of Types::BaseMainloop whose Arguments
// add the norm weight g, k and eps (rmsnorm_linear_sm90_fused.cu, rmsnorm_linear_sm90_fwd_rs.cu): the
// mainloop leaves the accumulators rstd-scaled, the epilogue adds the bias and stores rstd.
template <class Types, class Mainloop>
void run_rstd_fwd(const void* x, const void* g, const void* w, float* rstd, const void* bias, void* y, int64_t n,
                  int64_t k, int64_t m, float eps, cudaStream_t s, const char* what) {
  using Element = typename Types::Element;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, typename Types::Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  typename Mainloop::Arguments ml;
  ml.ptr_A = static_cast<const Element*>(x);
  ml.dA = ld_stride<typename Kernel::StrideA>(k);
  ml.ptr_B = static_cast<const Element*>(w);
  ml.dB = ld_stride<typename Kernel::StrideB>(k);
  ml.g = static_cast<const Element*>(g);
  ml.k = (int)k;
  ml.eps = eps;
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {(int)n, (int)m, (int)k, 1},
                                ml,
                                {{}, nullptr, ld_stride<typename Kernel::StrideC>(m), static_cast<Element*>(y),
                                 ld_stride<typename Kernel::StrideD>(m)},
                                hw_info()};
  args.epilogue.thread = {
      {rstd},                                               // rstd store (acc pass-through)
      {static_cast<const Element*>(bias), Element(0), {}},  // bias per column (row broadcast), null -> 0
      {}};
  run_gemm<Gemm>(args, s, what);
}

}  // namespace sm90
}  // namespace rmslin
}  // namespace llmtrain
