// The Python module `ipcv_kernels._C`: empty by itself. Importing it loads this shared library,
// whose static initialisers (register.cpp) register the `torch.ops.ipcv.*` ops. No pybind11: the
// ops are reached through the torch dispatcher only, which keeps the build small and fast.
#include <Python.h>

static PyModuleDef ipcv_module = {PyModuleDef_HEAD_INIT, "_C", "IPCV compiled ops (see torch.ops.ipcv)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ipcv_module); }
