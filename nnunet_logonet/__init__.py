"""nnunet-logonet: Masked LoGoNet (Karimi Monsefi et al., KDD 2024) as an nnU-Net v2 plugin.

The network lives in :mod:`nnunet_logonet.network`, nnU-Net planners in
:mod:`nnunet_logonet.planning`, trainers in :mod:`nnunet_logonet.training`, the
self-supervised pieces in :mod:`nnunet_logonet.ssl`. The folders ``trainers/`` and
``planners/`` of the source tree are installed as ``nnunet_logonet.trainers`` and
``nnunet_logonet.planners``; ``nnUNet_extTrainer`` points at the former.
"""

__version__ = "0.1.0"
