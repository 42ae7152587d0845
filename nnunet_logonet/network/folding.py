"""Conv -> BatchNorm -> activation units, with the BatchNorm folded into the convolution in eval mode.

Lever ``batchnorm_folding`` (docs/speed.md): in eval mode a BatchNorm after a convolution is an
affine map, moved into the convolution's weight and bias (one pass over the activation less); the
activation then runs as the convolution's post-op (``conv.Activation``). The folded weights are
cached for inference (``derived_tensors``) and rebuilt whenever a source tensor changes, so
nnUNetPredictor loading fold after fold into one network is safe.

Lever ``lka_folding``: in eval mode an LKA block's two BatchNorms sit *before* 1x1x1 convolutions
(``proj_1``, ``fc1``), and its layer scales after others (``proj_2``, ``fc2``); all four are folded
into those convolutions, and the attention branch's inner shortcut into one multiply-add
(``fold_lka_block``, ``lka_block_folded``): per block seven elementwise passes (two BatchNorms, two
scalings, three additions) become two, and on CUDA as many fewer kernel launches.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules import module as _module_globals

from .conv import Activation, Conv3d, conv3d, conv3d_add, conv3d_concat
from .derived import derived_tensors, version_key
from .levers import lever_enabled
from .training_buffers import pooled_conv_norm_act, pooled_unit_pays

__all__ = ["hooked", "conv_norm", "conv_norm_act", "conv_act", "fold_batchnorm", "foldable_batchnorm", "derived_tensors",
           "version_key", "fold_uncached", "batchnorm_affine", "LKAFold", "foldable_lka_block", "lka_fold_sources", "fold_lka_block",
           "fold_lka_block_uncached", "lka_block_folded"]

def _eval_batchnorm(module: nn.Module, norm: nn.Module) -> bool:
    """``module`` and ``norm`` in eval mode, ``norm`` a BatchNorm that normalises with its running statistics there."""
    return (
        not module.training
        and not norm.training
        and isinstance(norm, _BatchNorm)  # SyncBatchNorm (nnU-Net's -num_gpus) too: in eval it is a BatchNorm
        and norm.track_running_stats
        and norm.running_mean is not None
    )


def foldable_batchnorm(module: nn.Module, norm: nn.Module) -> bool:
    """True in eval mode for a BatchNorm with running statistics and the "batchnorm_folding" lever on."""
    return _eval_batchnorm(module, norm) and lever_enabled("batchnorm_folding")


def conv_norm(module: nn.Module, conv: nn.Conv3d, norm: nn.Module,
              x: torch.Tensor | Sequence[torch.Tensor], activation: Activation | None = None) -> torch.Tensor:
    """``activation(norm(conv(x)))``; one convolution with the BatchNorm folded in (and the activation
    fused, without autograd) when ``module`` is in eval mode.

    ``x`` may be a sequence of tensors: the parts of a channel concatenation, convolved without
    building it (:func:`conv3d_concat`).
    """
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    watched = hooked(conv, norm)  # a hook must see its module run (and may change its weight: pruning)
    if foldable_batchnorm(module, norm) and not watched:
        weight, bias = fold_batchnorm(conv, norm)
        return conv3d_concat(parts, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation)
    if len(parts) == 1 or not lever_enabled("concat_sum") or isinstance(conv.padding, str) or watched:
        y = norm(conv(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)))
    else:
        y = norm(conv3d_concat(parts, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    return y if activation is None else activation(y)


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of ``modules`` (then they are called as modules: e.g. the
    SSL feature tap on ``head.act``)."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _hooked_tree(module: nn.Module) -> bool:
    """``hooked`` for ``module`` and everything inside it (a walk over ``_modules``: a third of the
    host time of ``module.modules()``, which an inference forward on a launch-bound GPU would pay per block)."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    stack = [module]
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack.extend(m._modules.values())
    return False


def conv_norm_act(module: nn.Module, conv: nn.Conv3d, norm: nn.Module, act: nn.Module,
                  x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``act(norm(conv(x)))``: in eval mode one oneDNN convolution with the BatchNorm folded in and
    the activation (GELU or LeakyReLU) as its post-op; in CPU training at full resolution one
    autograd Function whose large tensors live in kept memory (``training_buffers``); otherwise the
    modules as they are."""
    activation = Activation.of(act) if foldable_batchnorm(module, norm) and not hooked(act) else None
    if activation is None:
        if module.training and not hooked(conv, norm, act):
            parts = [x] if isinstance(x, torch.Tensor) else list(x)
            pool = pooled_unit_pays(conv, norm, act, parts)
            if pool is not None:  # CPU training at full resolution: no fresh memory (training_buffers.py)
                return pooled_conv_norm_act(pool, conv, norm, act, parts)
        return act(conv_norm(module, conv, norm, x))
    return conv_norm(module, conv, norm, x, activation)


def conv_act(conv: nn.Conv3d, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))``, with the activation fused into the convolution where nothing needs gradients
    (LKA's ``proj_1`` -> GELU and the MLP's depthwise conv -> GELU)."""
    activation = Activation.of(act)
    if (activation is None or not lever_enabled("post_ops") or not isinstance(conv, Conv3d)
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or hooked(conv, act)):
        return act(conv(x))
    return conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation)


def fold_batchnorm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` followed by ``norm`` (eval statistics) as one convolution.

    Cached for inference (see :func:`derived_tensors`).
    """
    sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    return derived_tensors(conv, "_folded_batchnorm", sources, lambda: fold_uncached(conv, norm))


def batchnorm_affine(norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with ``norm(x) = a x + b`` per channel, from its running statistics (eval mode)."""
    a = norm.running_var.add(norm.eps).rsqrt()
    if norm.weight is not None:
        a = a * norm.weight
    b = -norm.running_mean * a
    if norm.bias is not None:
        b = b + norm.bias
    return a, b


def fold_uncached(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """``fold_batchnorm`` computed afresh (the grouped local paths cache their concatenation instead)."""
    scale, shift = batchnorm_affine(norm)
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    if conv.weight.is_contiguous(memory_format=torch.channels_last_3d):
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    return weight, shift


# ----------------------------------------------------------------------------- LKA blocks
class LKAFold(NamedTuple):
    """An eval-mode LKA block as 1x1x1 convolutions with its BatchNorms and layer scales folded in.

    With ``norm1(x) = a1 x + b1``, ``norm2(x) = a2 x + b2`` (running statistics) and layer scales
    ``g1``, ``g2``, the block ``x + g1 (norm1(x) + proj_2(t)); x' + g2 fc2(m)`` becomes
    ``proj_2'(t) + shortcut_scale * x`` then ``x' + fc2'(m)``, where ``proj_1' = proj_1 o norm1``,
    ``fc1' = fc1 o norm2``, ``proj_2' = g1 (proj_2 + b1)``, ``fc2' = g2 fc2`` and
    ``shortcut_scale = 1 + g1 a1``. Every field is per output channel first, so the folds of
    several blocks concatenate along dim 0 into the grouped local paths' weights.
    """

    proj_1_weight: torch.Tensor
    proj_1_bias: torch.Tensor
    proj_2_weight: torch.Tensor
    proj_2_bias: torch.Tensor
    shortcut_scale: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


def foldable_lka_block(block: nn.Module) -> bool:
    """An ``lka.LKABlock`` in eval mode whose norms are BatchNorms with running statistics, nothing
    hooked inside it (a hook must see its module run), and the "lka_folding" lever on."""
    return (
        _eval_batchnorm(block, block.norm1)
        and _eval_batchnorm(block, block.norm2)
        and lever_enabled("lka_folding")
        and not _hooked_tree(block)
    )


def lka_fold_sources(block: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of the modules ``fold_lka_block`` reads (the key of its cache).

    Read from the modules' own dictionaries: ``nn.Module.__getattr__`` made this list 8x slower, host
    time that a launch-bound inference forward pays for every block. A parametrized weight
    (``weight_norm``) lives in the module's ``parametrizations``: their tensors are sources too."""
    m = block._modules
    attn, mlp = m["attn"]._modules, m["mlp"]._modules
    sources = [m["norm1"], m["norm2"], m["ls1"], m["ls2"], attn["proj_1"], attn["proj_2"], mlp["fc1"], mlp["fc2"]]
    sources += [p for module in sources if "parametrizations" in module._modules
                for p in module._modules["parametrizations"].modules()]
    return [t for module in sources for tensors in (module._parameters, module._buffers)
            for t in tensors.values() if t is not None]


def fold_lka_block(block: nn.Module) -> LKAFold:
    """``fold_lka_block_uncached``, cached for inference like ``fold_batchnorm``."""
    return derived_tensors(block, "_lka_fold", lka_fold_sources(block), lambda: fold_lka_block_uncached(block))


def _bias(conv: nn.Conv3d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)


def _after_affine(conv: nn.Conv3d, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the 1x1x1 ``conv`` applied to ``a x + b``."""
    weight = conv.weight * a.view(1, -1, 1, 1, 1)
    return weight, _bias(conv) + conv.weight.flatten(1) @ b


def fold_lka_block_uncached(block: nn.Module) -> LKAFold:
    """The block's ``LKAFold`` computed afresh (the grouped local paths cache their concatenation)."""
    attn, mlp = block.attn, block.mlp
    a1, b1 = batchnorm_affine(block.norm1)
    a2, b2 = batchnorm_affine(block.norm2)
    g1, g2 = block.ls1.gamma, block.ls2.gamma
    proj_1_weight, proj_1_bias = _after_affine(attn.proj_1, a1, b1)
    fc1_weight, fc1_bias = _after_affine(mlp.fc1, a2, b2)
    return LKAFold(
        proj_1_weight, proj_1_bias,
        attn.proj_2.weight * g1.view(-1, 1, 1, 1, 1), g1 * (_bias(attn.proj_2) + b1),
        g1 * a1 + 1,
        fc1_weight, fc1_bias,
        mlp.fc2.weight * g2.view(-1, 1, 1, 1, 1), g2 * _bias(mlp.fc2),
    )


def lka_block_folded(x: torch.Tensor, fold: LKAFold, gated: Callable[[torch.Tensor], torch.Tensor],
                     depthwise_gelu: Callable[[torch.Tensor], torch.Tensor], groups: int = 1) -> torch.Tensor:
    """An eval-mode LKA block (or ``groups`` of them side by side, the grouped local paths) from its fold.

    ``gated(u)`` is LKA's ``u * conv1(conv_spatial(conv0(u)))`` and ``depthwise_gelu`` the MLP's
    depthwise convolution and GELU: those stay the modules' own. Without autograd the two residual
    sums are written into the block's own new tensors (the second by oneDNN's sum post-op).
    """
    u = conv3d(x, fold.proj_1_weight, fold.proj_1_bias, groups=groups, activation=Activation("gelu"))
    branch = conv3d(gated(u), fold.proj_2_weight, fold.proj_2_bias, groups=groups)
    scale = fold.shortcut_scale.view(1, -1, 1, 1, 1).to(x.dtype)
    if torch.is_grad_enabled() or branch.dtype != x.dtype:
        x = torch.addcmul(branch, x, scale)
    else:  # ``branch`` is this block's own fresh tensor
        x = branch.addcmul_(x, scale)
    hidden = depthwise_gelu(conv3d(x, fold.fc1_weight, fold.fc1_bias, groups=groups))
    return conv3d_add(x, hidden, fold.fc2_weight, fold.fc2_bias, groups=groups)
