// The Python module object of denseclip_fast._C. Importing it loads this shared library, whose static
// initialisers register the operators (csrc/registration.cpp); the module itself holds one function, crc32 (zlib's
// CRC-32, 3-5x zlib 1.2's speed: benchmarks/results/crc_cpu_2threads.md; for the checkpoints' checksums,
// denseclip_fast/checkpoints/crc.py), and CRC32_CLMUL, whether it uses carry-less multiplication on this processor.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cpu/crc32.h"

namespace {

constexpr Py_ssize_t kReleaseGilFrom = 5 * 1024;  // bytes; zlib.crc32 keeps the GIL below this as well

// crc32(data, value=0, /) -> int: zlib.crc32's signature and result, for any contiguous buffer
PyObject* dcf_crc32(PyObject* /*module*/, PyObject* args) {
  Py_buffer view;
  unsigned int value = 0;
  if (!PyArg_ParseTuple(args, "y*|I:crc32", &view, &value)) return nullptr;
  const auto* data = static_cast<const unsigned char*>(view.buf);
  const auto size = static_cast<size_t>(view.len);
  uint32_t result;
  if (view.len >= kReleaseGilFrom) {
    Py_BEGIN_ALLOW_THREADS result = denseclip_fast::crc32(value, data, size);
    Py_END_ALLOW_THREADS
  } else {
    result = denseclip_fast::crc32(value, data, size);
  }
  PyBuffer_Release(&view);
  return PyLong_FromUnsignedLong(result);
}

PyMethodDef dcf_methods[] = {
    {"crc32", dcf_crc32, METH_VARARGS,
     "crc32(data, value=0, /)\n--\n\nzlib.crc32 of a bytes-like object (the GIL released from 5 KiB on)."},
    {nullptr, nullptr, 0, nullptr},
};

struct PyModuleDef dcf_module = {
    PyModuleDef_HEAD_INIT, "_C", "denseclip_fast operators, registered with torch.library on import.", -1,
    dcf_methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dcf_module);
  if (module != nullptr &&
      PyModule_AddIntConstant(module, "CRC32_CLMUL", denseclip_fast::crc32_uses_clmul() ? 1 : 0) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
