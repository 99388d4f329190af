// Torch binding of the CUDA group_advantages kernel (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string_view>

#include "group_advantages/group_advantages.h"
#include "common/check_msg.h"

namespace r1k {

AdvScale parse_adv_scale(std::string_view scale);  // group_advantages_cpu.cpp
cudaError_t group_advantages_cuda_launch(const float* rewards, float* out, int64_t P, int64_t G,
                                         int mode, float eps, cudaStream_t stream);

namespace {

at::Tensor group_advantages_cuda(const at::Tensor& rewards, int64_t group_size,
                                 std::string_view scale, double eps) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "group_advantages: rewards must be 1-D [P * G], got ",
                    r1k::msg(rewards.dim()), "-D");
  TORCH_CHECK_VALUE(rewards.scalar_type() == at::kFloat,
                    "group_advantages: rewards must be float32, got ", r1k::msg(rewards.scalar_type()));
  TORCH_CHECK_VALUE(group_size >= 1, "group_advantages: group_size must be >= 1, got ", r1k::msg(group_size));
  TORCH_CHECK_VALUE(rewards.numel() % group_size == 0, "group_advantages: rewards.numel() (",
                    r1k::msg(rewards.numel()), ") is not a multiple of group_size (", r1k::msg(group_size), ")");
  const AdvScale mode = parse_adv_scale(scale);
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor r = rewards.contiguous();
  at::Tensor out = at::empty_like(r);
  const cudaError_t err = group_advantages_cuda_launch(
      r.data_ptr<float>(), out.data_ptr<float>(), r.numel() / group_size, group_size,
      static_cast<int>(mode), static_cast<float>(eps), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "group_advantages: CUDA launch failed: ", r1k::msg(cudaGetErrorString(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }

}  // namespace r1k
