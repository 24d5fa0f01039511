// Makes the extension importable as vitq_kernels._C; importing it runs the
// TORCH_LIBRARY registrations of the other translation units.  No Python bindings:
// everything is reached through torch.ops.vitq.
#include <Python.h>

static struct PyModuleDef vitq_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vitq_module); }
