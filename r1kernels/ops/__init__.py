"""One module per op: Triton kernels -> launchers -> autograd -> public function."""
