// The Python module lowrank_kernels._C. Importing it runs
// the static initializers of csrc/cpu/<family>.cpp, each of which defines its
// `lowrank_kernels::<family>_<op>_cpu` ops (TORCH_LIBRARY_FRAGMENT) and registers
// their CPU kernels with the dispatcher (TORCH_LIBRARY_IMPL). The Python registry
// (lowrank_kernels/ops/_registry.py) routes the public ops to them. Its only functions are
// host-side helpers of an optimizer step (csrc/python/host.cpp), used from Python when
// the extension is built.
#include <torch/extension.h>

namespace lowrank_kernels {
void register_host_helpers(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank_kernels C++ CPU kernels (registered as torch.ops.lowrank_kernels.*_cpu)";
  m.attr("abi_cxx11") = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  lowrank_kernels::register_host_helpers(m);
}
