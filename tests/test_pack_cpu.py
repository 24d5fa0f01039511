"""C++ CPU kernels of vitq::pack_int4 / vitq::unpack_int4 against reference.py (bit-exact)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitq_kernels  # noqa: F401  (registers torch.ops.vitq)
from vitq_kernels import reference as R

pack = torch.ops.vitq.pack_int4
unpack = torch.ops.vitq.unpack_int4

# leading dims (possibly none, possibly empty) and an even last dim (possibly 0)
shapes = st.tuples(st.lists(st.integers(0, 5), max_size=2), st.integers(0, 40)).map(
    lambda t: (*t[0], 2 * t[1]))


def random_codes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, shape, dtype=torch.int8, generator=g)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_matches_reference_and_round_trips(shape, seed):
    codes = random_codes(shape, seed)
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(packed, R.pack_int4(codes))
    assert torch.equal(unpack(packed), codes)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_unpack_matches_reference_on_every_byte(shape, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (*shape[:-1], shape[-1] // 2), dtype=torch.uint8, generator=g)
    codes = unpack(packed)
    assert torch.equal(codes, R.unpack_int4(packed))
    assert torch.equal(pack(codes), packed)


def test_all_256_bytes():
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = unpack(packed)
    lo, hi = codes[0::2].int(), codes[1::2].int()
    # two's-complement nibbles, low nibble first
    assert torch.equal(((hi << 4) | (lo & 0xF)) & 0xFF, torch.arange(256, dtype=torch.int32))
    assert int(codes.min()) == -8 and int(codes.max()) == 7


def test_large_tensor_uses_several_chunks():
    codes = torch.randint(-8, 8, (3, 70000), dtype=torch.int8)  # > one 32 KiB parallel chunk
    assert torch.equal(pack(codes), R.pack_int4(codes))
    assert torch.equal(unpack(pack(codes)), codes)


@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 8), (0, 4), (4, 0)])
def test_opcheck(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    torch.library.opcheck(pack, (codes,))
    torch.library.opcheck(unpack, (R.pack_int4(codes),))


def test_pack_errors():
    with pytest.raises(TypeError, match="codes must be int8, got int16"):
        pack(torch.zeros(4, 8, dtype=torch.int16))
    with pytest.raises(ValueError, match="even last dimension, got 7"):
        pack(torch.randint(-8, 8, (4, 7), dtype=torch.int8))
    with pytest.raises(ValueError, match=r"outside the signed 4-bit range \[-8, 7\]"):
        pack(torch.tensor([[3, 8]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"outside the signed 4-bit range \[-8, 7\]"):
        pack(torch.tensor([[-9, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="must be contiguous"):
        pack(torch.randint(-8, 8, (8, 6), dtype=torch.int8).t())
    with pytest.raises(ValueError, match="at least one dimension"):
        pack(torch.tensor(3, dtype=torch.int8))


def test_unpack_errors():
    with pytest.raises(TypeError, match="packed must be uint8, got int8"):
        unpack(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be contiguous"):
        unpack(torch.randint(0, 256, (8, 6), dtype=torch.uint8).t())
    with pytest.raises(ValueError, match="at least one dimension"):
        unpack(torch.tensor(3, dtype=torch.uint8))


def test_device_is_checked():
    # reach the CPU kernel directly with a meta tensor (a CUDA one would dispatch elsewhere)
    codes = torch.empty(4, 8, dtype=torch.int8, device="meta")
    with pytest.raises(ValueError, match="codes must be a CPU tensor, got device meta"):
        torch.ops.vitq.pack_int4.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), codes)
