"""The per-output-position GEMM form of a conv on tiny output maps computes exactly what ``F.conv2d`` computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfsup.nn.small_map_conv import SmallMapConv2d, small_map_conv

# (input size, kernel, stride, padding): 3×3 same-padded on 1×1…2×2, 3×3 stride 2 from 4×4 and 3×3,
# 1×1 stride-2 shortcuts, a 5×5 kernel, an unpadded conv
CASES = [((1, 1), 3, 1, 1), ((1, 2), 3, 1, 1), ((2, 2), 3, 1, 1), ((4, 4), 3, 2, 1), ((3, 3), 3, 2, 1),
         ((4, 4), 1, 2, 0), ((3, 4), 1, 2, 0), ((3, 3), 5, 1, 2), ((4, 4), 3, 1, 0)]


@pytest.mark.parametrize("size, k, stride, padding", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_conv2d_values_and_gradients(size, k, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    w = torch.randn(7, 5, k, k, dtype=torch.float64)
    if channels_last:  # as a model converted with .to(memory_format=channels_last) holds both
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    b = torch.randn(7, dtype=torch.float64) if bias else None
    ref_in = [t.clone().requires_grad_() for t in (x, w)] + ([b.clone().requires_grad_()] if bias else [None])
    new_in = [t.clone().requires_grad_() for t in (x, w)] + ([b.clone().requires_grad_()] if bias else [None])
    ref = F.conv2d(*ref_in, stride=stride, padding=padding)
    new = small_map_conv(*new_in, stride=stride, padding=padding)
    torch.testing.assert_close(new, ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    new.backward(grad)
    for r, n in zip(ref_in, new_in):
        if r is not None:
            torch.testing.assert_close(n.grad, r.grad)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: small_map_conv(x, w, stride=2, padding=1), (x, w))
    x2 = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)  # the dense single-GEMM path
    assert torch.autograd.gradcheck(lambda x, w: small_map_conv(x, w, stride=1, padding=1), (x2, w))


@pytest.mark.parametrize("size, stride", [((2, 2), 1), ((4, 4), 2), ((3, 3), 2), ((1, 1), 1)])
def test_module_takes_the_gemm_path_on_small_outputs(size, stride):
    conv = SmallMapConv2d(4, 6, 3, stride, 1, bias=False)
    x = torch.randn(2, 4, *size)
    assert conv._small_map_applies(x)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, stride=stride, padding=1))


@pytest.mark.parametrize("size, stride", [((3, 3), 1), ((4, 4), 1), ((7, 7), 2)])
def test_larger_outputs_fall_through_to_conv2d(size, stride):
    conv = SmallMapConv2d(4, 6, 3, stride, 1, bias=False)
    x = torch.randn(2, 4, *size)
    assert not conv._small_map_applies(x)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, stride=stride, padding=1))


def test_dilated_grouped_or_reflect_padded_convs_fall_through():
    x = torch.randn(2, 4, 2, 2)
    for conv in (SmallMapConv2d(4, 4, 3, 1, 1, groups=2), SmallMapConv2d(4, 4, 3, 1, 2, dilation=2),
                 SmallMapConv2d(4, 4, 3, 1, 1, padding_mode="reflect")):
        assert not conv._small_map_applies(x)


def test_bf16_autocast_agrees_with_conv2d_and_keeps_the_state_dict():
    torch.manual_seed(0)
    conv = SmallMapConv2d(64, 32, 3, 1, 1, bias=False)
    assert set(conv.state_dict()) == set(torch.nn.Conv2d(64, 32, 3, 1, 1, bias=False).state_dict())
    x = torch.randn(8, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new, ref = conv(x), F.conv2d(x, conv.weight, padding=1)
    assert new.dtype == ref.dtype == torch.bfloat16
    assert new.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(new.float(), ref.float(), atol=0.05, rtol=0.02)


def test_training_after_an_inference_mode_pass_on_a_new_shape():
    """The index plan is cached: one first built under inference mode must still work with autograd."""
    conv = SmallMapConv2d(3, 4, 3, 1, 1, bias=False)
    x = torch.randn(2, 3, 1, 2)
    with torch.inference_mode():
        conv(x)
    conv(x).sum().backward()
    assert conv.weight.grad is not None


# (input size, kernel, stride, padding) of the strided convs whose bf16 weight gradient is a GEMM on CPU
WGRAD_CASES = [((14, 14), 3, 2, 1), ((7, 7), 3, 2, 1), ((7, 7), 1, 2, 0), ((8, 8), 1, 2, 0), ((9, 6), 3, 2, 1),
               ((5, 5), 3, 1, 1), ((6, 6), 5, 3, 2)]


@pytest.mark.parametrize("size, k, stride, padding", WGRAD_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_weight_gradient_matches_conv2d(size, k, stride, padding, channels_last):
    from selfsup.nn.small_map_conv import gemm_wgrad_conv

    torch.manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(7, 5, k, k, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (x, w, b)]
    new_in = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.conv2d(*ref_in, stride=stride, padding=padding)
    new = gemm_wgrad_conv(*new_in, stride=stride, padding=padding)
    torch.testing.assert_close(new, ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    new.backward(grad)
    for r, n in zip(ref_in, new_in):
        torch.testing.assert_close(n.grad, r.grad)


def test_gemm_weight_gradient_gradcheck():
    from selfsup.nn.small_map_conv import gemm_wgrad_conv

    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: gemm_wgrad_conv(x, w, stride=2, padding=1), (x, w))


def test_strided_bf16_training_conv_takes_the_gemm_weight_gradient():
    """Under bf16 autocast on CPU a strided conv's weight gradient is the GEMM's, close to oneDNN's; in fp32, at
    stride 1, without grad, or with a 1-channel input it is nn.Conv2d's own path."""
    torch.manual_seed(0)
    conv = SmallMapConv2d(16, 32, 3, 2, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv._gemm_wgrad_applies(x)
        new = conv(x)
        with torch.no_grad():
            assert not conv._gemm_wgrad_applies(x)
    assert not conv._gemm_wgrad_applies(x)  # fp32
    assert not SmallMapConv2d(16, 32, 3, 1, 1)._gemm_wgrad_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not SmallMapConv2d(1, 32, 3, 2, 1)._gemm_wgrad_applies(torch.randn(2, 1, 8, 8))
        ref = F.conv2d(x, conv.weight, stride=2, padding=1)
    assert new.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(new.float(), ref.float(), atol=0.05, rtol=0.02)
    grad = torch.randn_like(new)
    (new_grad,) = torch.autograd.grad(new, conv.weight, grad)
    (ref_grad,) = torch.autograd.grad(ref, conv.weight, grad)
    assert new_grad.dtype == torch.float32
    torch.testing.assert_close(new_grad, ref_grad, atol=0.1, rtol=0.02)
