// Host-side helpers of an optimizer step, exported as functions of the Python module
// lowrank_kernels._C (no dispatcher op: they only read tensor metadata, or the values of CPU
// tensors, on the host). Each computes exactly what a Python version computes, without a
// Python call per tensor: a step validates and probes lists of dozens of tensors, and on small
// weights reading shape, strides, dtype, device and data pointer of each through Python
// attribute calls, or running four ATen ops to probe finiteness, cost more than the step's
// own C++ kernel. The Python versions run without the extension:
//   tensor_signature, any_overlap   lowrank_kernels/ops/_checks.py (the ops' validation cache)
//   all_plain                       lowrank_kernels/ops/_registry.py (eager_caller)
//   nonfinite_flags                 lowrank_kernels/optim/base.py (_finite_flags, CPU gradients)
//   add_one_                        lowrank_kernels/optim/base.py (_increment_steps: step counts + 1)
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace lowrank_kernels {
namespace {

namespace py = pybind11;

inline void put(std::string& out, int64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof(v)); }

// The signature of tensor lists as one bytes object (None when some entry is not a plain
// strided Tensor / Parameter, or has no readable metadata): per list a marker and its length,
// per tensor [data pointer], dim, sizes, strides, dtype, device type and index. The encoding
// is prefix-free (lengths first), so equal bytes <=> equal Python signature tuples.
py::object signature(const py::tuple& lists, bool with_ptr) {
  std::string out;
  out.reserve(256);
  for (const py::handle& lst : lists) {
    PyObject* seq = PySequence_Fast(lst.ptr(), "tensor_signature: expected lists of tensors");
    if (seq == nullptr) throw py::error_already_set();
    const py::object keep = py::reinterpret_steal<py::object>(seq);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    put(out, -1);
    put(out, static_cast<int64_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = items[i];
      if (!THPVariable_CheckExact(o)) return py::none();
      const at::Tensor& t = THPVariable_Unpack(o);
      try {
        if (!t.defined() || t.layout() != at::kStrided) return py::none();
        if (with_ptr) put(out, reinterpret_cast<int64_t>(t.data_ptr()));
        const auto sizes = t.sizes();
        const auto strides = t.strides();
        put(out, static_cast<int64_t>(sizes.size()));
        for (int64_t s : sizes) put(out, s);
        for (int64_t s : strides) put(out, s);
        put(out, static_cast<int64_t>(t.scalar_type()));
        put(out, static_cast<int64_t>(t.device().type()));
        put(out, static_cast<int64_t>(t.device().index()));
      } catch (const c10::Error&) {  // no storage / symbolic metadata: not cached
        return py::none();
      }
    }
  }
  return py::bytes(out);
}

// Whether any tensor of `tensors` has a memory span meeting one of the merged, sorted spans
// [los[i], his[i]) of one device (`device`). Returns 1 / 0, or -1 when it cannot answer
// (an entry that is not a plain tensor, or a tensor on another device): the caller then
// asks the Python SpanIndex. Spans as _checks._span: (first byte, one past the last byte),
// none for empty and meta tensors and null pointers.
int any_overlap(const py::sequence& tensors, const py::buffer& los_buf, const py::buffer& his_buf,
                const std::string& device) {
  const c10::Device dev(device);
  const py::buffer_info lo_info = los_buf.request(), hi_info = his_buf.request();
  TORCH_CHECK(lo_info.itemsize == 8 && hi_info.itemsize == 8 && lo_info.size == hi_info.size,
              "any_overlap: los / his must be int64 buffers of one length");
  const int64_t* los = static_cast<const int64_t*>(lo_info.ptr);
  const int64_t* his = static_cast<const int64_t*>(hi_info.ptr);
  const int64_t count = lo_info.size;
  for (const py::handle& h : tensors) {
    PyObject* o = h.ptr();
    if (o == Py_None) continue;
    if (!THPVariable_CheckExact(o)) return -1;
    const at::Tensor& t = THPVariable_Unpack(o);
    int64_t lo = 0, hi = 0;
    try {
      if (!t.defined() || t.layout() != at::kStrided) return -1;
      const int64_t n = t.numel();
      if (n == 0 || t.is_meta()) continue;
      if (t.device() != dev) return -1;
      lo = reinterpret_cast<int64_t>(t.data_ptr());
      if (lo == 0) continue;
      int64_t extent = n;
      if (!t.is_contiguous()) {
        extent = 1;
        const auto sizes = t.sizes();
        const auto strides = t.strides();
        for (size_t d = 0; d < sizes.size(); ++d) extent += (sizes[d] - 1) * strides[d];
      }
      hi = lo + extent * static_cast<int64_t>(t.element_size());
    } catch (const c10::Error&) {
      return -1;
    }
    // the last span starting at or before lo, and the one after it (as SpanIndex.overlaps)
    const int64_t i = static_cast<int64_t>(std::upper_bound(los, los + count, lo) - los) - 1;
    if (i >= 0 && his[i] > lo) return 1;
    if (i + 1 < count && los[i + 1] < hi) return 1;
  }
  return 0;
}

// Whether every tensor among `args` (and inside list / tuple arguments) is a plain Tensor or
// Parameter (no subclass), as _registry._plain_args.
bool all_plain(const py::tuple& args) {
  PyObject* tensor_type = THPVariableClass;
  for (const py::handle& a : args) {
    PyObject* o = a.ptr();
    if (PyList_Check(o) || PyTuple_Check(o)) {
      PyObject* seq = o;
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
      PyObject** items = PySequence_Fast_ITEMS(seq);
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (!THPVariable_CheckExact(items[i]) && THPVariable_Check(items[i])) return false;
      }
    } else if (!THPVariable_CheckExact(o) && tensor_type != nullptr && THPVariable_Check(o)) {
      return false;
    }
  }
  return true;
}

// Whether the n values at p (the bits of an IEEE float: U = uint16/32/64) are all finite: a
// value is inf or NaN exactly when its bits without the sign reach those of +inf (`inf`). Bit
// tests in independent lanes vectorize (compare, or); an early exit per chunk.
template <typename U>
bool finite_bits(const U* p, int64_t n, U inf) {
  constexpr U kAbs = static_cast<U>(~(U(1) << (sizeof(U) * 8 - 1)));
  constexpr int64_t kLanes = 32, kChunk = 8192;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    U lanes[kLanes] = {};
    int64_t i = i0;
    for (; i + kLanes <= i1; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) lanes[j] |= static_cast<U>((p[i + j] & kAbs) >= inf);
    }
    U bad = 0;
    for (; i < i1; ++i) bad |= static_cast<U>((p[i] & kAbs) >= inf);
    for (int64_t j = 0; j < kLanes; ++j) bad |= lanes[j];
    if (bad) return false;
  }
  return true;
}

bool finite_tensor(const at::Tensor& t) {
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat:
      return finite_bits(static_cast<const uint32_t*>(p), t.numel(), uint32_t(0x7f800000u));
    case at::kDouble:
      return finite_bits(static_cast<const uint64_t*>(p), t.numel(), uint64_t(0x7ff0000000000000ull));
    case at::kBFloat16:
      return finite_bits(static_cast<const uint16_t*>(p), t.numel(), uint16_t(0x7f80u));
    default:  // kHalf
      return finite_bits(static_cast<const uint16_t*>(p), t.numel(), uint16_t(0x7c00u));
  }
}

// Per tensor of `tensors` (plain, contiguous CPU tensors of a floating dtype): whether all its
// values are finite; None when every tensor is (the common case: one bool to read). Raises
// ValueError for another tensor (the caller then probes with ATen ops).
py::object nonfinite_flags(const py::sequence& tensors) {
  std::vector<const at::Tensor*> ts;
  ts.reserve(py::len(tensors));
  for (const py::handle& h : tensors) {
    PyObject* o = h.ptr();
    if (!THPVariable_CheckExact(o)) throw py::value_error("nonfinite_flags: plain tensors only");
    const at::Tensor& t = THPVariable_Unpack(o);
    const auto st = t.scalar_type();
    if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || !t.is_contiguous() ||
        !(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf)) {
      throw py::value_error("nonfinite_flags: contiguous floating CPU tensors only");
    }
    ts.push_back(&t);
  }
  std::vector<char> ok(ts.size(), 1);
  bool all = true;
  {
    py::gil_scoped_release nogil;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = *ts[i];
      ok[i] = finite_tensor(t);
      all = all && ok[i];
    }
  }
  if (all) return py::none();
  py::list out;
  for (char c : ok) out.append(py::bool_(c != 0));
  return out;
}

// The optimizers' step counts + 1, in place, as torch._foreach_add_(steps, 1.0) does on
// plain CPU float32 scalars (the state layout of torch.optim.AdamW): each value + 1.0f and
// its version counter bumped (as an in-place op does), all or nothing. Returns False without
// writing anything when some entry is not a plain, defined, one-element float32 CPU tensor
// with a version counter that does not require grad (the caller then runs the ATen op).
bool add_one_(const py::sequence& tensors) {
  std::vector<at::Tensor> ts;
  ts.reserve(py::len(tensors));
  for (const py::handle& h : tensors) {
    PyObject* o = h.ptr();
    if (!THPVariable_CheckExact(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.scalar_type() != at::kFloat ||
        t.numel() != 1 || t.requires_grad() || t.is_inference() || t.is_neg() || t.is_conj()) {
      return false;
    }
    ts.push_back(t);
  }
  for (at::Tensor& t : ts) {
    float* p = t.data_ptr<float>();
    *p = *p + 1.0f;
    t.unsafeGetTensorImpl()->bump_version();
  }
  return true;
}

}  // namespace

void register_host_helpers(pybind11::module_& m) {
  m.def("tensor_signature", &signature, pybind11::arg("lists"), pybind11::arg("with_ptr"),
        "Signature bytes of tensor lists for the ops' validation cache (see lowrank_kernels/ops/_checks.py).");
  m.def("any_overlap", &any_overlap, pybind11::arg("tensors"), pybind11::arg("los"), pybind11::arg("his"),
        pybind11::arg("device"),
        "1 if a tensor's memory meets one of the sorted spans of one device, 0 if none, -1 undecided.");
  m.def("all_plain", &all_plain, pybind11::arg("args"),
        "Whether every tensor among args (and in list / tuple arguments) is a plain Tensor or Parameter.");
  m.def("nonfinite_flags", &nonfinite_flags, pybind11::arg("tensors"),
        "None when every value of the contiguous floating CPU tensors is finite, else one bool per tensor.");
  m.def("add_one_", &add_one_, pybind11::arg("tensors"),
        "Step counts + 1 in place (plain one-element float32 CPU tensors, versions bumped); False: nothing done.");
}

}  // namespace lowrank_kernels
