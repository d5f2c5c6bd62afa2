// Plain C interface to the CUDA runtime, compiled by nvcc without torch headers.
#pragma once
#ifdef __cplusplus
extern "C" {
#endif
int nl_cuda_runtime_version(void);  // e.g. 13000 for CUDA 13.0; -1 on error
int nl_cuda_device_count(void);     // visible devices; -1 on error
#ifdef __cplusplus
}
#endif
