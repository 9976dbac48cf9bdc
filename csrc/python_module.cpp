// The Python module object of denseclip_fast._C. Importing it loads this shared library, whose static
// initialisers register the operators (csrc/registration.cpp); the module itself exposes nothing.
#include <Python.h>

static struct PyModuleDef dcf_module = {
    PyModuleDef_HEAD_INIT, "_C", "denseclip_fast operators, registered with torch.library on import.", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dcf_module); }
