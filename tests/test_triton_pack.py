"""Triton int4 pack/unpack against reference.pack_int4 / unpack_int4 (bit-exact).

Without a GPU the kernels run under TRITON_INTERPRET on CPU tensors (conftest sets it);
with one, the same tests run natively on CUDA, plus the `requires_gpu` group below.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import requires_gpu
from vitq_kernels import reference as ref
from vitq_kernels.triton_kernels import pack_int4, unpack_int4

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _codes(shape, gen):
    return torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)


@given(lead=st.lists(st.integers(0, 5), max_size=2), half_k=st.integers(1, 700), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_match_reference(lead, half_k, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = _codes((*lead, 2 * half_k), gen)
    packed = pack_int4(codes.to(DEV))
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, half_k)
    assert torch.equal(packed.cpu(), ref.pack_int4(codes))
    assert torch.equal(unpack_int4(packed).cpu(), codes)


def test_unpack_every_byte_value():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    got = unpack_int4(every.to(DEV)).cpu()
    assert torch.equal(got, ref.unpack_int4(every))
    assert torch.equal(pack_int4(got.to(DEV)).cpu(), every)


def test_non_contiguous_inputs_are_copied():
    gen = torch.Generator().manual_seed(1)
    codes = _codes((40, 30), gen).t()                       # [30, 40], strides (1, 30)
    assert not codes.is_contiguous()
    assert torch.equal(pack_int4(codes.to(DEV)).cpu(), ref.pack_int4(codes.contiguous()))
    packed = ref.pack_int4(_codes((20, 64), gen))[:, ::2]   # every other byte
    assert torch.equal(unpack_int4(packed.to(DEV)).cpu(), ref.unpack_int4(packed.contiguous()))


def test_empty_tensors():
    assert pack_int4(torch.empty(0, 8, dtype=torch.int8, device=DEV)).shape == (0, 4)
    assert pack_int4(torch.empty(3, 0, dtype=torch.int8, device=DEV)).shape == (3, 0)
    assert unpack_int4(torch.empty(0, 4, dtype=torch.uint8, device=DEV)).shape == (0, 8)


def test_bad_inputs():
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.ones(2, 5, dtype=torch.int8, device=DEV))
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_int4(torch.tensor(1, dtype=torch.int8, device=DEV))
    with pytest.raises(TypeError, match="uint8"):
        unpack_int4(torch.ones(2, 4, dtype=torch.int8, device=DEV))
    gen = torch.Generator().manual_seed(2)
    for bad in (8, -9, 127, -128):
        codes = _codes((3, 2048 + 6), gen)
        codes[2, 2049] = bad                                 # not in the first program's block
        with pytest.raises(ValueError, match=r"1 codes outside the signed 4-bit range \[-8, 7\]"):
            pack_int4(codes.to(DEV))


# ---------------------------------------------------------------------------
# native CUDA: registered op (dispatch to Triton), opcheck
# ---------------------------------------------------------------------------
@requires_gpu
def test_cuda_ops_dispatch_to_triton_and_pass_opcheck():
    gen = torch.Generator().manual_seed(3)
    codes = _codes((3, 5, 66), gen)
    packed = torch.ops.vitq.pack_int4(codes.cuda())
    assert packed.is_cuda and torch.equal(packed.cpu(), ref.pack_int4(codes))
    assert torch.equal(torch.ops.vitq.unpack_int4(packed).cpu(), codes)
    torch.library.opcheck(torch.ops.vitq.pack_int4.default, (codes.cuda(),))
    torch.library.opcheck(torch.ops.vitq.unpack_int4.default, (packed,))


@requires_gpu
def test_cuda_large_weight_roundtrip():
    gen = torch.Generator().manual_seed(4)
    codes = _codes((3072, 768), gen)
    packed = pack_int4(codes.cuda())
    assert torch.equal(packed.cpu(), ref.pack_int4(codes))
    assert torch.equal(unpack_int4(packed).cpu(), codes)
