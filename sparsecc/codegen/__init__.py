"""Kernel generators. `sparsecc.codegen.triton` writes the GPU kernels of every sparsecc:: op and of the fused
optimizer updates as specialised Triton source; importing it needs the `triton` package."""
