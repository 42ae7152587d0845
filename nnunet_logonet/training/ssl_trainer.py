"""``LoGoNetSSLTrainer``: Masked LoGoNet self-supervised pre-training in nnU-Net (paper Sec. 3.3).

``nnUNetv2_train ID 3d_fullres all -tr LoGoNetSSLTrainer -p LoGoNetPlans`` trains LoGoNet to predict
k-means pseudo-labels of masked slice sequences, on the dataset's preprocessed images with
nnU-Net's own data loading and augmentation. Labels (``batch['target']``) are never read.

One step: the unmasked augmented patch is labelled by a bank of N clusterers (fitted once, at the
start, and cached in the output folder as ``clusterers.npz``); the masked patch goes through the
network; a forward hook takes the pre-classifier features (``head.act``), a
:class:`~nnunet_logonet.ssl.head.SlicePseudoLabelHead` turns them into per-slice logits and the
tempered NLL over masked slices is minimised. The head is optimised with the network.

Checkpoints are nnU-Net's, except that ``network_weights`` leaves out the (never trained)
``.seg_layers.`` classifiers and the head and bank reference ride along under ``ssl_head_weights``
and ``ssl``. ``nnUNetv2_train ... -tr LoGoNetTrainer -pretrained_weights .../checkpoint_final.pth``
then loads it with nnU-Net's own loader. docs/ssl.md has the choices and measurements.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from time import perf_counter, time

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnunet_logonet.figures import save_figure
from nnunet_logonet.network.arguments import positive_int, real_number
from nnunet_logonet.ssl.clusterers import ClusterCacheError, SliceClusterBank, StaleClusterCacheError
from nnunet_logonet.ssl.features import PreClassifierFeatures, unwrap_network
from nnunet_logonet.ssl.head import SlicePseudoLabelHead
from nnunet_logonet.ssl.loss import multi_cluster_nll, pseudo_label_accuracy
from nnunet_logonet.ssl.masking import DEFAULT_PATCH_SIZES, SliceSequenceMasker
from nnunet_logonet.ssl.transfer import SKIPPED
from nnunet_logonet.training.recipes import WarmupCosineLRScheduler, optimizer_implementation
from nnunet_logonet.training.trainer import DEMO_BUDGET, DEMO_QUICK_BUDGET, LoGoNetTrainer, with_budget
from nnunet_logonet.workfolders import write_whole

__all__ = [
    "CACHE_NAME", "LoGoNetSSLTrainer", "LoGoNetSSLTrainerCPU", "LoGoNetSSLTrainer_10epochs",
    "LoGoNetSSLTrainer_100epochs", "LoGoNetSSLTrainer_demo", "LoGoNetSSLTrainer_demoQuick", "bank_digest",
    "sync_head_from_rank0",
]

CACHE_NAME = "clusterers.npz"
#: extra per-epoch series kept in nnU-Net's logger (and so in every checkpoint)
SSL_LOG_KEYS = ("ssl_train_accuracy", "ssl_label_seconds")
PAPER_BANK = {"num_clusterers": 80, "k_range": (80, 500), "pool": 1}
#: patches drawn at most, per planned one, to replace padding slices in the fitting set
PADDING_DRAW_FACTOR = 4
#: the clusterers' and the masking's parameters -> the trainer attributes that set them (for their messages)
SETTING_OF = {"num_clusterers": "cluster_num", "k_range": "cluster_k_range",
              "sample_fraction": "cluster_sample_fraction", "seed": "cluster_seed", "backend": "cluster_backend",
              "max_iter": "cluster_max_iter", "pool": "cluster_pool", "slice_axis": "ssl_slice_axis", "phi1": "mask_phi1", "chain_length": "mask_chain_length",
              "patch_sizes": "mask_patch_sizes", "phi2": "mask_phi2"}


def _epoch_figure(value: float, part: str) -> str:
    """An epoch's loss or accuracy for the log: NaN only when no batch of the epoch's ``part`` had a masked
    slice (nothing to predict; ~8 % of 2 x 12-slice batches each), which the log says in words."""
    if np.isfinite(value):
        return f"{value:.4f}"
    return f"n/a (no masked slice in this epoch's {part} batches)"


def bank_digest(bank: SliceClusterBank) -> str:
    """sha256 of a fitted bank's ks and centroids: which pseudo-labels a checkpoint was trained on."""
    digest = hashlib.sha256(np.asarray(bank.ks, dtype="<i8").tobytes())
    digest.update(bank.centroids.numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def sync_head_from_rank0(head: nn.Module, optimizer: torch.optim.Optimizer, reset_on_rank0: bool) -> None:
    """Give every DDP rank rank 0's head weights, and drop the head's optimiser state where rank 0 reset
    the head: otherwise the other ranks would keep the checkpoint's head (and its Adam moments) while
    rank 0 trains a fresh one, and the replicas would never meet again."""
    flag = torch.tensor([int(bool(reset_on_rank0))], device=next(head.parameters()).device)
    dist.broadcast(flag, 0)
    if flag.item():
        for parameter in head.parameters():
            optimizer.state.pop(parameter, None)
    with torch.no_grad():
        for tensor in head.state_dict().values():
            dist.broadcast(tensor, 0)


class LoGoNetSSLTrainer(LoGoNetTrainer):
    """Masked multi-cluster pre-training of LoGoNet (no labels used).

    The pretext's settings are the paper's (below; ``test_ssl_trainer`` pins them); the budget is
    nnU-Net's 1000 epochs (``LoGoNetSSLTrainer_100epochs`` is the paper's) and the clustering runs on
    the torch backend (docs/ssl.md, "Clustering backend: measured").
    """

    # --- pseudo-labels (paper: N = 80, k in 80..500, ~10% of the slices, 350 iterations) -------------
    cluster_num: int = 80
    cluster_k_range: tuple[int, int] = (80, 500)
    cluster_sample_fraction: float = 0.1
    cluster_pool: int = 1
    cluster_backend: str = "torch"
    cluster_max_iter: int = 350
    cluster_seed: int = 0
    #: patches cropped for fitting; None: enough that each clusterer's subset (sample_fraction of
    #: them) holds ``cluster_samples_per_cluster`` slices per cluster at the largest k
    cluster_fit_patches: int | None = None
    cluster_samples_per_cluster: int = 8
    # --- masking (paper: phi1 = 0.1, M = 5, P in {1..32, full}, phi2 = 0.7) -------------------------
    mask_phi1: float = 0.1
    mask_chain_length: int = 5
    mask_patch_sizes: tuple = DEFAULT_PATCH_SIZES
    mask_phi2: float = 0.7
    #: dim of the (B, C, D, H, W) batch that slices are taken along (2: nnU-Net's first spatial axis)
    ssl_slice_axis: int = 2
    # --- head, loss, optimiser (paper: AdamW lr 1e-4, weight decay 1e-5, tau 0.1) -----------------
    head_grid: int = 4
    head_hidden: int = 256
    ssl_tau: float = 0.1
    ssl_initial_lr: float = 1e-4
    ssl_weight_decay: float = 1e-5
    ssl_warmup_fraction: float = 0.05
    learns_from_labels = False  # image-only datasets are what it is for

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self._check_pretext_settings()  # before nnU-Net writes its output folder and log
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.ssl_initial_lr
        self.weight_decay = self.ssl_weight_decay
        self.enable_deep_supervision = False  # one full-resolution feature map feeds the head
        self.masker = self._new_masker()
        self.bank: SliceClusterBank | None = None
        self.ssl_head: SlicePseudoLabelHead | None = None
        self._head_call: nn.Module | None = None
        self._tap: PreClassifierFeatures | None = None
        self._resume_digest: str | None = None  # set by load_checkpoint (--c)
        self._head_reset = False  # set when a resume's refitted bank differs from the checkpoint's
        self._timing = {"fit_seconds": 0.0, "label_seconds": 0.0, "pretrain_seconds": 0.0}
        self._epoch_label_seconds = 0.0
        self._run_start: float | None = None
        self._ensure_log_keys()

    # ------------------------------------------------------------------------------- set-up
    def _check_pretext_settings(self) -> None:
        """Every pretext setting, checked when the trainer is made: the clusterers' and the masking's (their
        classes' messages, the parameter renamed to this trainer's attribute), the head's, the loss's and the
        optimiser's (read first after the clusterers had been fitted, minutes at the paper's 80, or clamped
        without a word)."""
        name = type(self).__name__
        try:
            self._new_bank()
            self._new_masker()
        except ValueError as error:
            text = str(error)
            parameter = next((p for p in SETTING_OF if text.startswith(p + " ")), None)
            if parameter is None:
                raise ValueError(f"{name}: {text}") from None
            raise ValueError(f"{name}.{SETTING_OF[parameter]}{text[len(parameter):]}") from None
        if self.cluster_fit_patches is not None:
            positive_int(self.cluster_fit_patches, f"{name}.cluster_fit_patches (or None)")
        positive_int(self.cluster_samples_per_cluster, f"{name}.cluster_samples_per_cluster")
        positive_int(self.head_grid, f"{name}.head_grid")
        positive_int(self.head_hidden, f"{name}.head_hidden")
        real_number(self.ssl_tau, f"{name}.ssl_tau", minimum=0.0, exclusive_minimum=True)
        real_number(self.ssl_initial_lr, f"{name}.ssl_initial_lr", minimum=0.0, exclusive_minimum=True)
        real_number(self.ssl_weight_decay, f"{name}.ssl_weight_decay", minimum=0.0)
        real_number(self.ssl_warmup_fraction, f"{name}.ssl_warmup_fraction", minimum=0.0, maximum=1.0)

    def _bank_config(self) -> dict:
        return {"num_clusterers": self.cluster_num, "k_range": tuple(self.cluster_k_range),
                "sample_fraction": self.cluster_sample_fraction, "seed": self.cluster_seed,
                "backend": self.cluster_backend, "max_iter": self.cluster_max_iter,
                "slice_axis": self.ssl_slice_axis, "pool": self.cluster_pool}

    def _new_bank(self) -> SliceClusterBank:
        return SliceClusterBank(**self._bank_config())

    def _new_masker(self) -> SliceSequenceMasker:
        return SliceSequenceMasker(phi1=self.mask_phi1, chain_length=self.mask_chain_length,
                                   patch_sizes=self.mask_patch_sizes, phi2=self.mask_phi2,
                                   slice_axis=self.ssl_slice_axis)

    def _ensure_log_keys(self) -> None:
        for key in SSL_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    @property
    def fit_patch_count(self) -> int:
        """Patches cropped from the training cases to fit the clusterers on."""
        if self.cluster_fit_patches is not None:
            return self.cluster_fit_patches
        wanted_slices = self.cluster_samples_per_cluster * self.cluster_k_range[1] / self.cluster_sample_fraction
        return max(1, math.ceil(wanted_slices / self._slices_per_patch()))

    def _slices_per_patch(self) -> int:
        return int(self.configuration_manager.patch_size[self.ssl_slice_axis - 2])

    def _feature_dim(self) -> int:
        in_plane = [s for i, s in enumerate(self.configuration_manager.patch_size) if i != self.ssl_slice_axis - 2]
        return self.num_input_channels * math.prod(-(-int(s) // self.cluster_pool) for s in in_plane)

    def _expected_ks(self) -> tuple[int, ...]:
        """The bank's k after fitting: drawn k, reduced to the number of fitting slices if larger."""
        n_slices = self.fit_patch_count * self._slices_per_patch()
        return tuple(min(k, n_slices) for k in self._new_bank().ks)

    def _build_ssl_head(self) -> None:
        self._tap = PreClassifierFeatures(self.network)
        self.ssl_head = SlicePseudoLabelHead(self._tap.channels, self._expected_ks(), slice_axis=self.ssl_slice_axis,
                                             grid=self.head_grid, hidden=self.head_hidden).to(self.device)
        self._head_call = self.ssl_head

    def configure_optimizers(self):
        """AdamW over the network *and* the pretext head (built here, as the optimiser needs its
        parameters); linear warm-up then cosine decay, stepped per epoch like nnU-Net's poly."""
        self._build_ssl_head()
        optimizer = torch.optim.AdamW(self._ssl_parameters(), lr=self.initial_lr, betas=(0.9, 0.999),
                                      weight_decay=self.weight_decay, **optimizer_implementation(self.device))
        warmup = max(1, round(self.ssl_warmup_fraction * self.num_epochs)) if self.num_epochs > 1 else 0
        return optimizer, WarmupCosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)

    def _ssl_parameters(self) -> list[nn.Parameter]:
        return [*self.network.parameters(), *self.ssl_head.parameters()]

    def initialize(self):
        super().initialize()
        if self.is_ddp:
            # the classifiers never reach the pretext loss: DDP must not wait for their gradients
            self.network = DDP(self.network.module, device_ids=[self.local_rank], find_unused_parameters=True)
            self._head_call = DDP(self.ssl_head, device_ids=[self.local_rank])
        ks = self.ssl_head.ks
        self.print_to_log_file(
            f"SSL pre-training: {len(ks)} clusterers, k {min(ks)}..{max(ks)} (sum {sum(ks)}, chance accuracy "
            f"{np.mean([1 / k for k in ks]):.4f}), slices pooled x{self.cluster_pool}, fitted on the slices of "
            f"{self.fit_patch_count} patches of {self._slices_per_patch()} (or read from the cache a resume "
            f"reuses); {self.masker}; head "
            f"{sum(p.numel() for p in self.ssl_head.parameters()) / 1e6:.2f} M params on {self._tap.channels} "
            f"feature channels; AdamW lr {self.initial_lr} wd {self.weight_decay}, tau {self.ssl_tau}. "
            f"Labels of the dataset are not used.")
        paper = PAPER_BANK
        if (self.cluster_num, tuple(self.cluster_k_range), self.cluster_pool) != \
                (paper["num_clusterers"], paper["k_range"], paper["pool"]):
            self.print_to_log_file(
                f"INFO: reduced pseudo-label bank for this budget: {self.cluster_num} clusterers, k drawn from "
                f"{self.cluster_k_range[0]}..{self.cluster_k_range[1]}, pool {self.cluster_pool} (paper: "
                f"{paper['num_clusterers']}, {paper['k_range'][0]}..{paper['k_range'][1]}, raw slices).")

    # ---------------------------------------------------------------------------- clusterers
    @property
    def cluster_cache(self) -> Path:
        return Path(self.output_folder) / CACHE_NAME

    def on_train_start(self):
        self._run_start = perf_counter()
        super().on_train_start()
        start = perf_counter()
        if self.is_ddp:  # rank 0 fits and writes the cache, the others read it
            if self.local_rank == 0:
                bank = self._load_or_fit_bank()
                dist.barrier()
            else:
                dist.barrier()
                bank = SliceClusterBank.load(self.cluster_cache, expected_config=self._new_bank().config,
                                             expected_feature_dim=self._feature_dim())
            # only rank 0 decides whether a resumed head restarts; DDP syncs gradients, not weights
            sync_head_from_rank0(self.ssl_head, self.optimizer, self._head_reset)
        else:
            bank = self._load_or_fit_bank()
        self.bank = bank
        self._timing["fit_seconds"] += perf_counter() - start

    def _load_or_fit_bank(self) -> SliceClusterBank:
        cache = self.cluster_cache
        if self._resume_digest is not None:  # --c: reuse the bank the checkpoint was trained with
            try:
                start = perf_counter()
                bank = SliceClusterBank.load(cache, expected_config=self._new_bank().config,
                                             expected_feature_dim=self._feature_dim())
                if bank.ks != self.ssl_head.ks:
                    raise StaleClusterCacheError(f"its ks differ from the head's ({len(bank.ks)} clusterers)")
                if bank_digest(bank) != self._resume_digest:
                    raise StaleClusterCacheError(f"Cluster cache {cache} is not the bank the checkpoint was "
                                                 f"trained with (digest differs).")
                self.print_to_log_file(f"Reusing the cluster cache {cache} (not refitted; read in "
                                       f"{perf_counter() - start:.2f} s).")
                return bank
            except FileNotFoundError:
                self.print_to_log_file(f"WARNING: no cluster cache at {cache}; refitting the clusterers.")
            except ClusterCacheError as error:
                self.print_to_log_file(f"WARNING: {error} Refitting the clusterers and rewriting the cache.")
        elif cache.is_file():
            self.print_to_log_file(f"A new pre-training refits the clusterers; replacing {cache}.")
        bank = self._fit_bank()
        bank.save(cache)
        if self._resume_digest is not None:
            if bank_digest(bank) == self._resume_digest:
                self.print_to_log_file("The refitted clusterers equal the checkpoint's (seeded fit): the head "
                                       "weights stay valid.")
            else:
                self._reset_head("the refitted clusterers differ from the ones the checkpoint was trained with")
        return bank

    def _fit_bank(self) -> SliceClusterBank:
        """Fit on unmasked, unaugmented patches cropped from the training cases by nnU-Net's loader
        (same patch size and foreground oversampling as training), seeded: the same data and seed
        give the same slices and so the same bank."""
        start = perf_counter()
        # minutes at the paper's bank before epoch 0 (docs/ssl.md): say so, and show progress on rank 0
        self.print_to_log_file(f"Fitting {self.cluster_num} clusterers (k drawn from {self.cluster_k_range[0]}.."
                               f"{self.cluster_k_range[1]}) on the slices of {self.fit_patch_count} patches; "
                               f"epoch {self.current_epoch} starts after it.")
        slices = self._collect_fit_slices()
        collected = perf_counter() - start
        bank = self._new_bank()
        data = slices.to(self.device) if self.cluster_backend == "torch" else slices
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bank.fit(data, progress=self.local_rank == 0)
        for warning in caught:
            self.print_to_log_file(f"WARNING: {warning.message}")
        if bank.ks != self.ssl_head.ks:  # cannot happen unless the bank's reduction rule changes
            raise RuntimeError(f"fitted ks {bank.ks[:5]}... differ from the head's {self.ssl_head.ks[:5]}...")
        self.print_to_log_file(
            f"Fitted {bank.num_clusterers} clusterers ({self.cluster_backend}, k {min(bank.ks)}..{max(bank.ks)}) on "
            f"{slices.shape[0]} slices x {slices.shape[1]} features: cropping {collected:.1f} s, k-means "
            f"{perf_counter() - start - collected:.1f} s.")
        return bank

    def _collect_fit_slices(self) -> torch.Tensor:
        tr_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, tr_keys,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        patch = self.configuration_manager.patch_size
        loader = nnUNetDataLoader(dataset, 1, patch, patch, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  probabilistic_oversampling=True, transforms=None)
        wanted = self.fit_patch_count * self._slices_per_patch()
        state = np.random.get_state()  # nnU-Net's loader draws from numpy's global generator
        np.random.seed(self.cluster_seed)
        kept, padding, drawn = [], [], 0
        bar = tqdm(total=wanted, desc="cropping slices for the clusterers", unit="slice",
                   disable=self.local_rank != 0, file=sys.stderr)
        try:
            bank = self._new_bank()
            # slices wholly outside the case (patch larger than the image) are padding: all zeros, one
            # cluster's worth of identical rows. They are replaced by slices of further patches, so the
            # number of fitting slices (and with it the head's ks) stays as planned.
            while sum(len(rows) for rows in kept) < wanted and drawn < PADDING_DRAW_FACTOR * self.fit_patch_count:
                batch = next(loader)
                drawn += 1
                features = bank.slice_features(batch["data"])[0]
                outside = torch.movedim(batch["target"][0, 0], self.ssl_slice_axis - 2, 0).flatten(1).eq(-1).all(1)
                kept.append(features[~outside])
                padding.append(features[outside])
                bar.update(min(len(kept[-1]), wanted - bar.n))
        finally:
            bar.close()
            np.random.set_state(state)
        rows = torch.cat(kept)
        if len(rows) < wanted:
            self.print_to_log_file(
                f"WARNING: {drawn} patches gave only {len(rows)} slices inside the cases, {wanted} wanted: the "
                f"patch is much larger than the images along the slice axis; padding slices fill the rest.")
            rows = torch.cat([rows, *padding])
        if sum(len(p) for p in padding):
            self.print_to_log_file(f"Clusterer fitting: {sum(len(p) for p in padding)} padding slices (outside "
                                   f"the cases) left out, {drawn - self.fit_patch_count} more patches drawn instead.")
        return rows[:wanted].float()

    def _reset_head(self, reason: str) -> None:
        self._head_reset = True
        self.print_to_log_file(f"WARNING: {reason}; the pre-training head restarts from random weights.")
        self.ssl_head.apply(self.ssl_head._init_weights)
        for parameter in self.ssl_head.parameters():
            self.optimizer.state.pop(parameter, None)

    # ------------------------------------------------------------------------------ training
    def _labels(self, data: torch.Tensor) -> torch.Tensor:
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = perf_counter()
        labels = self.bank.label_patches(data)
        if sync:
            torch.cuda.synchronize(self.device)
        self._epoch_label_seconds += perf_counter() - start
        return labels

    def pretext_loss(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label the unmasked patch, mask it, run the network, head and loss: (loss, accuracy)."""
        labels = self._labels(data)
        masked, mask = self.masker(data)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            self.network(masked)
            logits = self._head_call(self._tap.pop())
            loss = multi_cluster_nll(logits, labels, self.ssl_head.ks, mask.slices, tau=self.ssl_tau)
        accuracy = pseudo_label_accuracy(logits.detach(), labels, self.ssl_head.ks, mask.slices)
        return loss, accuracy

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.ssl_head.train()
        self._epoch_label_seconds = 0.0

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)  # batch['target'] is never read
        self.optimizer.zero_grad(set_to_none=True)
        loss, accuracy = self.pretext_loss(data)
        parameters = self._ssl_parameters()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.optimizer.step()
        return self._step_output(loss, accuracy)

    @staticmethod
    def _step_output(loss: torch.Tensor, accuracy: torch.Tensor) -> dict:
        """A batch without masked slices (accuracy NaN) has loss 0 and no information: logged as NaN,
        so it does not pull the epoch mean down (~8% of batches for 2 x 12-slice patches)."""
        accuracy = accuracy.cpu().numpy()
        return {"loss": loss.detach().cpu().numpy() if np.isfinite(accuracy) else np.float32("nan"),
                "accuracy": accuracy}

    def _gathered_mean(self, values, nan: bool = False) -> float:
        values = np.asarray(values, dtype=np.float64).ravel()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        if nan:
            return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return float(np.mean(values))

    def on_train_epoch_end(self, train_outputs: list[dict]):
        outputs = collate_outputs(train_outputs)
        self.logger.log("train_losses", self._gathered_mean(outputs["loss"], nan=True), self.current_epoch)
        self.logger.log("ssl_train_accuracy", self._gathered_mean(outputs["accuracy"], nan=True), self.current_epoch)

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.ssl_head.eval()

    def validation_step(self, batch: dict) -> dict:
        loss, accuracy = self.pretext_loss(batch["data"].to(self.device, non_blocking=True))
        return self._step_output(loss, accuracy)

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        """Pseudo-label accuracy fills nnU-Net's Dice slots, so its EMA picks checkpoint_best."""
        outputs = collate_outputs(val_outputs)
        accuracy = self._gathered_mean(outputs["accuracy"], nan=True)
        if not np.isfinite(accuracy):  # no masked slice in the whole epoch: a NaN would poison the EMA
            accuracy = 0.0
        self.logger.log("mean_fg_dice", accuracy, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [accuracy], self.current_epoch)
        self.logger.log("val_losses", self._gathered_mean(outputs["loss"], nan=True), self.current_epoch)

    def on_epoch_end(self):
        log, epoch = self.logger, self.current_epoch
        log.log("epoch_end_timestamps", time(), epoch)
        log.log("ssl_label_seconds", self._epoch_label_seconds, epoch)
        self._timing["label_seconds"] += self._epoch_label_seconds
        epoch_seconds = log.get_value("epoch_end_timestamps", step=-1) - log.get_value("epoch_start_timestamps", step=-1)
        train_loss, val_loss = log.get_value("train_losses", step=-1), log.get_value("val_losses", step=-1)
        self.print_to_log_file("train_loss", _epoch_figure(train_loss, "training"))
        self.print_to_log_file("val_loss", _epoch_figure(val_loss, "validation"))
        val_accuracy = log.get_value("mean_fg_dice", step=-1)  # 0.0 for the EMA when no slice was masked
        self.print_to_log_file(
            f"pseudo-label accuracy: train {_epoch_figure(log.get_value('ssl_train_accuracy', step=-1), 'training')}, "
            f"val {_epoch_figure(val_accuracy if np.isfinite(val_loss) else float('nan'), 'validation')} "
            f"(chance {np.mean([1 / k for k in self.ssl_head.ks]):.4f})")
        self.print_to_log_file(f"Epoch time: {epoch_seconds:.2f} s (pseudo-labelling {self._epoch_label_seconds:.2f} s)")

        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        ema = log.get_value("ema_fg_dice", step=-1)
        if self._best_ema is None or ema > self._best_ema:
            self._best_ema = ema
            self.print_to_log_file(f"New best EMA pseudo-label accuracy: {ema:.4f}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.plot_progress()
        self.current_epoch += 1

    def plot_progress(self) -> None:
        """``progress.png``: SSL loss, pseudo-label accuracy (with chance level), epoch and labelling time."""
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        values = self.logger.local_logger.my_fantastic_logging
        n = min(len(values[k]) for k in ("train_losses", "val_losses", "mean_fg_dice", "ssl_train_accuracy",
                                           "epoch_end_timestamps", "ssl_label_seconds"))
        epochs = list(range(n))
        fig, (ax_loss, ax_acc, ax_time) = plt.subplots(3, 1, figsize=(10, 12))
        ax_loss.plot(epochs, values["train_losses"][:n], "b-", label="train")
        ax_loss.plot(epochs, values["val_losses"][:n], "r-", label="val")
        ax_loss.set(xlabel="epoch", ylabel="pseudo-label NLL (tau %.2g)" % self.ssl_tau, title="SSL loss")
        ax_acc.plot(epochs, values["ssl_train_accuracy"][:n], "b-", label="train")
        ax_acc.plot(epochs, values["mean_fg_dice"][:n], "r-", label="val")
        ax_acc.plot(epochs, values["ema_fg_dice"][:n], "r--", label="val (EMA, picks checkpoint_best)")
        ax_acc.axhline(float(np.mean([1 / k for k in self.ssl_head.ks])), color="gray", ls=":", label="chance")
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="pseudo-label accuracy on masked slices")
        durations = [e - s for e, s in zip(values["epoch_end_timestamps"][:n], values["epoch_start_timestamps"][:n])]
        ax_time.plot(epochs, durations, "b-", label="epoch")
        ax_time.plot(epochs, values["ssl_label_seconds"][:n], "g-", label="pseudo-labelling")
        ax_time.set(xlabel="epoch", ylabel="seconds", title="time")
        for ax in (ax_loss, ax_acc, ax_time):
            ax.legend(loc="best")
        fig.tight_layout()
        save_figure(fig, os.path.join(self.output_folder, "progress.png"))

    def on_train_end(self):
        if self._run_start is not None:
            self._timing["pretrain_seconds"] += perf_counter() - self._run_start
            self._run_start = None
        t = self._timing
        share = (t["fit_seconds"] + t["label_seconds"]) / t["pretrain_seconds"] if t["pretrain_seconds"] > 0 else 0.0
        self.print_to_log_file(
            f"Pseudo-label cost: fitting/loading {t['fit_seconds']:.2f} s + labelling {t['label_seconds']:.2f} s = "
            f"{100 * share:.1f}% of {t['pretrain_seconds']:.2f} s pre-training wall time.")
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pre-training has no segmentation validation (no labels are used); fine-tune with "
                               "-tr LoGoNetTrainer -pretrained_weights <this fold>/checkpoint_final.pth.")

    # ---------------------------------------------------------------------------- checkpoints
    def _ssl_state(self) -> dict:
        return {
            "bank_path": str(self.cluster_cache),
            "bank_config": self.bank.config if self.bank is not None else self._new_bank().config,
            "bank_digest": bank_digest(self.bank) if self.bank is not None else self._resume_digest,
            "ks": list(self.ssl_head.ks),
            "head": {"in_channels": self._tap.channels, "grid": self.head_grid, "hidden": self.head_hidden,
                     "slice_axis": self.ssl_slice_axis},
            "masking": {"phi1": self.mask_phi1, "chain_length": self.mask_chain_length,
                        "patch_sizes": list(self.mask_patch_sizes), "phi2": self.mask_phi2},
            "tau": self.ssl_tau,
            "timing": dict(self._timing),
        }

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint minus the ``.seg_layers.`` classifiers, plus the head and bank
        reference; written to a temporary name and renamed."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        weights = unwrap_network(self.network).state_dict()
        checkpoint = {
            "network_weights": {k: v for k, v in weights.items() if not any(s in k for s in SKIPPED)},
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "ssl_head_weights": self.ssl_head.state_dict(),
            "ssl": self._ssl_state(),
        }
        write_whole(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Resume (``--c``): network without classifiers, head, optimiser, logs; the bank is read
        from the cache in on_train_start and checked against the checkpoint's digest."""
        if not self.was_initialized:
            self.initialize()
        name = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "<checkpoint dict>"
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if "ssl_head_weights" not in checkpoint or "ssl" not in checkpoint:
            raise RuntimeError(f"{name} was not written by LoGoNetSSLTrainer (no 'ssl_head_weights'), so --c cannot "
                               f"resume pre-training from it. Start without --c, or load it as -pretrained_weights.")
        module = unwrap_network(self.network)
        own = module.state_dict()
        weights = {k[len("module."):] if k not in own and k.startswith("module.") else k: v
                   for k, v in checkpoint["network_weights"].items()}
        result = module.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not any(s in k for s in SKIPPED)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{name} does not fit this network: missing {missing[:5]}, unexpected "
                               f"{result.unexpected_keys[:5]}; was it made with other plans?")
        saved = checkpoint["ssl"].get("bank_config")
        if saved is not None:  # any bank setting, not only ks: pool or sample size change the pseudo-labels too
            own = json.loads(json.dumps(self._new_bank().config))
            saved = json.loads(json.dumps(saved))
            changed = [f"{key} {saved.get(key)!r} -> {own.get(key)!r}" for key in sorted(set(own) | set(saved))
                       if own.get(key) != saved.get(key)]
            if changed:
                raise RuntimeError(
                    f"{name} was pre-trained with other pseudo-label bank settings than this trainer's "
                    f"({'; '.join(changed)}; checkpoint -> {self.__class__.__name__}): resuming would refit the "
                    f"clusterers and restart the head. Resume with the trainer that wrote it "
                    f"({checkpoint.get('trainer_name')}), or start a new pre-training without --c.")
        ks = tuple(checkpoint["ssl"]["ks"])  # settings the same (or not recorded): the drawn k must be too
        if ks != self.ssl_head.ks:
            raise RuntimeError(
                f"{name} was pre-trained with {len(ks)} clusterers (k {min(ks)}..{max(ks)}), this trainer builds "
                f"{len(self.ssl_head.ks)} (k {min(self.ssl_head.ks)}..{max(self.ssl_head.ks)}): resume with the "
                f"trainer that wrote it ({checkpoint.get('trainer_name')}).")
        self.ssl_head.load_state_dict(checkpoint["ssl_head_weights"])
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._ensure_log_keys()
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self._resume_digest = checkpoint["ssl"]["bank_digest"]
        self._timing.update(checkpoint["ssl"].get("timing", {}))


class LoGoNetSSLTrainerCPU(LoGoNetSSLTrainer):
    """CPU-sized pre-training for short runs: 12 clusterers, k in 16..64, slices pooled 2x2 (paper:
    80, 80..500, raw), lr 1e-3 (paper: 1e-4 over 100 long epochs). Fitting 80 clusterers with k up
    to 500 on a handful of phantom cases would take longer than the whole CPU demo, and at 1e-4 a
    few dozen iterations barely move the loss (docs/ssl.md)."""

    cluster_num = 12
    cluster_k_range = (16, 64)
    cluster_pool = 2
    ssl_initial_lr = 1e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # nnU-Net's 50: a CPU epoch takes minutes, and --c resumes from the last checkpoint


LoGoNetSSLTrainer_10epochs = with_budget(LoGoNetSSLTrainer, "LoGoNetSSLTrainer_10epochs", 10, module=__name__)
LoGoNetSSLTrainer_100epochs = with_budget(LoGoNetSSLTrainer, "LoGoNetSSLTrainer_100epochs", 100, module=__name__)
LoGoNetSSLTrainer_demo = with_budget(LoGoNetSSLTrainerCPU, "LoGoNetSSLTrainer_demo", DEMO_BUDGET["epochs"],
                                     DEMO_BUDGET["iterations"], DEMO_BUDGET["val_iterations"], __name__,
                                     save_every=1)
LoGoNetSSLTrainer_demoQuick = with_budget(LoGoNetSSLTrainerCPU, "LoGoNetSSLTrainer_demoQuick",
                                          DEMO_QUICK_BUDGET["epochs"], DEMO_QUICK_BUDGET["iterations"],
                                          DEMO_QUICK_BUDGET["val_iterations"], __name__, save_every=1)
