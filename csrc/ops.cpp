// The tt operator schemas, defined once. Kernels register per dispatch key in cpu/ and cuda/;
// fake (meta) kernels and autograd live in tt_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing tt_kernels._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tt, m) {
  m.def(
      "match(Tensor? metric, Tensor? score=None, Tensor? size=None, int r=0, "
      "str method=\"spread\", int k=1, float tau=0.1, float alpha=0.0, str targets=\"all\", "
      "int prefix=1, str cost=\"cosine\") -> (Tensor dst, Tensor weight)");
  m.def(
      "apply(Tensor x, Tensor size, Tensor dst, Tensor weight, int n_out, str mode=\"mean\") "
      "-> (Tensor x_out, Tensor size_out)");
  m.def("untransform(Tensor y, Tensor dst, Tensor weight) -> Tensor");
  m.def(
      "transform(Tensor x, Tensor size, Tensor? metric, Tensor? score=None, int r=0, "
      "str method=\"spread\", int k=1, float tau=0.1, float alpha=0.0, str targets=\"all\", "
      "int prefix=1, str mode=\"mean\", str cost=\"cosine\") "
      "-> (Tensor x_out, Tensor size_out, Tensor dst, Tensor weight)");
  m.def("cls_attention(Tensor q, Tensor k, Tensor? size=None, float? scale=None) -> Tensor");
}

// The argument checks of each op, as ops of their own, so that backends written in Python (the
// reference and Triton) validate exactly as the C++ kernels do.
TORCH_LIBRARY_FRAGMENT(tt, m) {
  m.def(
      "check_match(Tensor? metric, Tensor? score=None, Tensor? size=None, int r=0, "
      "str method=\"spread\", int k=1, float tau=0.1, float alpha=0.0, str targets=\"all\", "
      "int prefix=1, str cost=\"cosine\") -> ()");
  m.def("check_apply(Tensor x, Tensor size, Tensor dst, Tensor weight, int n_out, str mode) -> ()");
  m.def("check_untransform(Tensor y, Tensor dst, Tensor weight) -> ()");
  m.def(
      "check_transform(Tensor x, Tensor size, Tensor? metric, Tensor? score=None, int r=0, "
      "str method=\"spread\", int k=1, float tau=0.1, float alpha=0.0, str targets=\"all\", "
      "int prefix=1, str mode=\"mean\", str cost=\"cosine\") -> ()");
  m.def("check_cls_attention(Tensor q, Tensor k, Tensor? size=None, float? scale=None) -> ()");
}
