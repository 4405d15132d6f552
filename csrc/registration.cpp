// SPDX-License-Identifier: Apache-2.0
// Schemas of every dflash op (torch.ops.dflash.*). Each .cu file registers its own CUDA kernel with
// TORCH_LIBRARY_IMPL; the fake (meta) kernels live in Python, dflash_sglang/ops/__init__.py.
#include <Python.h>
#include <torch/library.h>

// `import dflash_sglang._C` (the setup.py build) needs a module init function; the module is empty, since
// importing the shared library is what registers the ops. The JIT build (is_python_module=False) loads
// the library with torch.ops.load_library and never calls it. No pybind11: this keeps the door open to a
// py_limited_api wheel.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      "dflash CUDA ops; importing this module registers torch.ops.dflash.*",  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dflash, m) {
  // The Python fake kernels are registered from this module (torch requires naming it for C++ ops).
  m.set_python_module("dflash_sglang.ops");

  // kv [N, L, 2, H, D] bf16/fp16/fp32; positions, slots [N] int64 (slot < 0 = padding); k_norm_weight
  // [L, D]; cos_sin_cache [max_position, D] fp32; k_cache, v_cache [L, num_slots, H, D] written in place.
  m.def(
      "inject_kv(Tensor kv, Tensor positions, Tensor slots, Tensor k_norm_weight, Tensor cos_sin_cache,"
      " Tensor(a!) k_cache, Tensor(b!) v_cache, float eps) -> ()");

  // block_tokens [bs, B] int64; target_ids [bs, B] int64 (greedy) or empty; target_probs [bs, B, V] fp32,
  // draft_probs [bs, B-1, V] fp32, uniforms [bs, B] fp32 (sampling) or empty; block_slots [bs, B] int64;
  // prefix_lens [bs] int64; stop_ids [bs, S] int64 (-1 padded); budgets [bs] int64.
  // Returns (num_accepted [bs] int32, num_emitted [bs] int32, emitted [bs, B] int64,
  //          keep_slots [bs, B] int64, free_slots [bs, B] int64, new_prefix_lens [bs] int64,
  //          finished [bs] bool), as ops/reference.py::verify_block_ref.
  m.def(
      "verify_block(Tensor block_tokens, Tensor target_ids, Tensor target_probs, Tensor draft_probs,"
      " Tensor uniforms, Tensor block_slots, Tensor prefix_lens, Tensor stop_ids, Tensor budgets)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
