"""Weights without the classifiers: a clear error where PyTorch would list every missing key.

A pre-training checkpoint (``LoGoNetSSLTrainer``) holds no ``.seg_layers.`` classifiers, which
nnU-Net's ``-pretrained_weights`` never transfers anyway. Loaded for prediction
(``nnUNetv2_predict`` with the pre-training's results folder: nnU-Net builds the network and calls
``load_state_dict`` on it), it would end in PyTorch's "Missing key(s) in state_dict" with the
classifiers' names, which does not say that the model learned no segmentation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["CLASSIFIER_KEY", "ClassifierlessWeightsError", "ExplainsMissingClassifiers"]

#: part of every classifier's state-dict key (``head.seg_layers.0.weight``, ``decoder.seg_layers.1.bias``)
CLASSIFIER_KEY = ".seg_layers."


class ClassifierlessWeightsError(RuntimeError):
    """Weights that fit the network except for its classifiers, which they lack: a pre-training checkpoint."""


class ExplainsMissingClassifiers(torch.nn.Module):
    """Base of a whole network: a strict ``load_state_dict`` of weights that lack exactly the classifiers (and
    hold nothing the network lacks) raises :class:`ClassifierlessWeightsError` saying what they are and what
    to do; any other mismatch is left to PyTorch's message."""

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        if strict:
            own = set(self.state_dict(keep_vars=True))
            missing = sorted(own.difference(state_dict))
            if missing and own.issuperset(state_dict) and all(CLASSIFIER_KEY in f".{key}" for key in missing):
                raise ClassifierlessWeightsError(
                    f"The weights given to {type(self).__name__} have no classifiers ({len(missing)} "
                    f"'{CLASSIFIER_KEY}' keys missing, e.g. {missing[0]}) and fit it otherwise: they come from a "
                    f"self-supervised pre-training (LoGoNetSSLTrainer), which learned no segmentation and cannot "
                    f"predict. Fine-tune them first: nnUNetv2_train DATASET CONFIGURATION FOLD -tr LoGoNetTrainer "
                    f"-p PLANS -pretrained_weights <the pre-training's checkpoint_final.pth>, then predict with "
                    f"that trainer (docs/ssl.md).")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
