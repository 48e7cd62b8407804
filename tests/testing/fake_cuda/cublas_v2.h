// A host-only stand-in for the two cuBLAS calls the LoRA example's CUDA model makes (cublasGemmEx and
// cublasGemmStridedBatchedEx with bf16 or fp32 operands, fp32 or bf16 results and fp32 accumulation), written from
// cuBLAS's documented column-major contract and independently of model_cuda.cu's row-major translation, so that a
// wrong transpose flag, leading dimension, stride or operand order there is caught on a machine without a GPU.
// See cuda_runtime.h beside it for what the stand-ins check and do not.
//
// The contract implemented (cuBLAS documentation, "cublasGemmEx"): column-major
//   C[i + j*ldc] = alpha * sum_l op(A)[i, l] * op(B)[l, j] + beta * C[i + j*ldc],  i < m, j < n, l < k
// with op(X)[r, c] = X[r + c*ldx] for CUBLAS_OP_N and X[c + r*ldx] for CUBLAS_OP_T; A is m x k after op, B is
// k x n after op; lda >= max(1, rows of A as stored), likewise ldb, ldc >= max(1, m); when beta is 0, C is not
// read (it may hold NaN). The strided-batched form repeats this `batch` times, operand i at X + i * strideX.
// Sums run in l order in fp32; cuBLAS's own order differs, which the tests' bf16 tolerances cover.
// Refused with CUBLAS_STATUS_INVALID_VALUE (and a line on stderr), where a GPU would silently compute garbage: an
// operand outside device memory; a handle used while a device other than the one current at its cublasCreate is
// current, or with a stream or an operand of another device; C overlapping A or B, or one batch's C another's.
#pragma once

#include <cstdint>

#include "cuda_runtime.h"  // cudaDataType, cudaStream_t

struct FakeCublasContext;
using cublasHandle_t = FakeCublasContext*;

enum FakeCublasStatus : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
using cublasStatus_t = FakeCublasStatus;

enum FakeCublasOperation : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
using cublasOperation_t = FakeCublasOperation;

enum FakeCublasComputeType : int { CUBLAS_COMPUTE_32F = 68 };
using cublasComputeType_t = FakeCublasComputeType;

enum FakeCublasGemmAlgo : int { CUBLAS_GEMM_DEFAULT = -1 };
using cublasGemmAlgo_t = FakeCublasGemmAlgo;

cublasStatus_t cublasCreate(cublasHandle_t* handle);
cublasStatus_t cublasDestroy(cublasHandle_t handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long int strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t algo);
