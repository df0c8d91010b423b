// The Python module lowrank_kernels._C and the registration of every C++ CPU kernel.
//
// Each kernel `<family>_<op>_cpu` (csrc/cpu/kernels.h) is registered with the dispatcher
// as the CPU kernel of the private op `_lowrank_kernels::<family>_<op>_cpu`, whose schema
// the op layer defines from Python (lowrank_kernels/ops/_registry.py, define_op: the
// public op's schema, so it is written once). Users see only the public ops
// `torch.ops.lowrank_kernels.*`, whose routers call these under backend "cpp"; going
// through the dispatcher keeps the C++ ops visible to opcheck and torch.compile.
//
// The module's Python functions are host-side helpers of an optimizer step
// (csrc/python/host.cpp) and private testing hooks (projection_fast_path, fira_small_path, direct_blas_addmm).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/direct.h"
#include "cpu/kernels.h"

namespace lowrank_kernels {
void register_host_helpers(pybind11::module_& m);
}

TORCH_LIBRARY_IMPL(_lowrank_kernels, CPU, m) {
  using namespace lowrank_kernels;
  // projection (csrc/cpu/projection/ops.cpp)
  m.impl("projection_project_cpu", &projection_project_cpu);
  m.impl("projection_project_adam_cpu", &projection_project_adam_cpu);
  m.impl("projection_backproject_apply_cpu", &projection_backproject_apply_cpu);
  m.impl("projection_project_update_backproject_cpu", &projection_project_update_backproject_cpu);
  m.impl("projection_foreach_project_update_backproject_cpu", &projection_foreach_project_update_backproject_cpu);
  // adam (csrc/cpu/adam.cpp)
  m.impl("adam_update_cpu", &adam_update_cpu);
  m.impl("adam_foreach_update_cpu", &adam_foreach_update_cpu);
  // apollo (csrc/cpu/apollo.cpp)
  m.impl("apollo_foreach_update_cpu", &apollo_foreach_update_cpu);
  // fira (csrc/cpu/fira.cpp)
  m.impl("fira_foreach_update_cpu", &fira_foreach_update_cpu);
  // frugal (csrc/cpu/frugal.cpp)
  m.impl("frugal_foreach_update_cpu", &frugal_foreach_update_cpu);
  // adafactor (csrc/cpu/adafactor.cpp)
  m.impl("adafactor_foreach_update_cpu", &adafactor_foreach_update_cpu);
  // gradnormlorp (csrc/cpu/gradnormlorp.cpp)
  m.impl("gradnormlorp_foreach_update_cpu", &gradnormlorp_foreach_update_cpu);
  // dct (csrc/cpu/dct.cpp)
  m.impl("dct_scores_cpu", &dct_scores_cpu);
  m.impl("dct_score_topk_cpu", &dct_score_topk_cpu);
  m.impl("dct_foreach_score_topk_cpu", &dct_foreach_score_topk_cpu);
  // quant (csrc/cpu/quant.cpp)
  m.impl("quant_int4_pack_cpu", &quant_int4_pack_cpu);
  m.impl("quant_int4_unpack_cpu", &quant_int4_unpack_cpu);
  m.impl("quant_int8_quantize_cpu", &quant_int8_quantize_cpu);
  m.impl("quant_int8_dequantize_cpu", &quant_int8_dequantize_cpu);
  m.impl("quant_int8_update_sr_cpu", &quant_int8_update_sr_cpu);
  // residual (csrc/cpu/residual.cpp)
  m.impl("residual_sumsq_cpu", &residual_sumsq_cpu);
  m.impl("residual_apply_cpu", &residual_apply_cpu);
  // orth (csrc/cpu/orth.cpp)
  m.impl("orth_newton_schulz_cpu", &orth_newton_schulz_cpu);
  m.impl("orth_foreach_newton_schulz_cpu", &orth_foreach_newton_schulz_cpu);
  // trion (csrc/cpu/trion.cpp)
  m.impl("trion_foreach_update_cpu", &trion_foreach_update_cpu);
  m.impl("trion_foreach_orth_cpu", &trion_foreach_orth_cpu);
  m.impl("trion_foreach_apply_cpu", &trion_foreach_apply_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank_kernels C++ CPU kernels (registered as torch.ops._lowrank_kernels.*_cpu) and host helpers";
  m.attr("abi_cxx11") = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  lowrank_kernels::register_host_helpers(m);
  m.def("projection_fast_path", &lowrank_kernels::projection_fast_path, pybind11::arg("mode") = -1,
        "Testing and measurement only: the C++ fused step's float32 fast path. mode -1 queries, 0 turns it off "
        "(the general engine for every case), 1 on (AVX2 kernels where the CPU has them), 2 on with the portable "
        "kernels. Returns the mode in effect before the call.");
  m.def("direct_blas_addmm", &lowrank_kernels::direct::blas_addmm, pybind11::arg("c"), pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("beta"), pybind11::arg("alpha"),
        "Testing only: c = beta c + alpha a b in place by the BLAS call torch's addmm_ makes for these strides "
        "(cpu/direct.h, blas_addmm). Returns False, leaving c as it was, where it does not serve the call.");
  m.def("fira_small_path", &lowrank_kernels::fira_small_path, pybind11::arg("mode") = -1,
        "Testing and measurement only: the fira step's raw-pointer path for small weights. mode -1 queries, 0 "
        "turns it off (the general path for every weight), 1 on (AVX2 kernels where the CPU has them), 2 on with "
        "the portable kernels. Returns the mode in effect before the call.");
}
