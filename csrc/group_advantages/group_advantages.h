// Group-normalized advantages: shared definitions for the CPU and CUDA kernels.
//
//   A[i] = (r[i] - mean_g(r)) / (std + eps)      std: unbiased std of the group ("group"),
//                                                 of the whole batch ("batch"), or 1 - eps ("none")
// NaN rewards are left out of mean and std and get A = 0. A group whose valid rewards are all
// equal (including groups with 0 or 1 valid rewards) gets A = 0 exactly.
#pragma once
#include <cstdint>

namespace r1k {

enum class AdvScale : int { kGroup = 0, kBatch = 1, kNone = 2 };

}  // namespace r1k
