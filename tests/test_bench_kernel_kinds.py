"""The training benchmark's kernel classification (bench/train_throughput.py): Inductor's fused elementwise kernels
are not counted as the optimizer's (a profile of the compiled step put 7 ms of them there)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("_train_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name, kind", [
    ("triton_poi_fused__to_copy_add_mul_silu_0", "elementwise_compiled"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", "elementwise_compiled"),
    ("triton_per_fused_add_mul_sum_2", "elementwise_compiled"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("_chain_linear_fwd_kernel", "chain_linear_triton"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm_cublas"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
])
def test_kernel_kinds(name, kind):
    assert _bench().kernel_kind(name) == kind
