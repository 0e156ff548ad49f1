"""Triton kernels behind the triton_ops signatures, each wrapped as `<op>_triton` (autograd included).

Import these modules only through the ops' dispatch (triton_ops.backend decides): under TRITON_INTERPRET=1 they
run on CPU tensors in Triton's interpreter, which reads that variable when triton is first imported.
"""
