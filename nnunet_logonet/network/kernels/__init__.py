"""CPU convolution kernels behind :func:`nnunet_logonet.network.conv.conv3d`, one family per module.

Each is an exact rewrite of a convolution (or its gradients) that oneDNN runs slowly in LoGoNet's
shapes, taken only where it measured faster (docs/speed.md has the figures and the lever names):
``depthwise`` (LKA's depthwise and dilated convolutions), ``pointwise`` (1x1x1 convolutions as
matrix products), ``small_map`` (the backward on tiny maps), ``narrowing`` (an AVX2 weight-gradient
swap); ``geometry`` holds the shape rules they share.
"""
