"""Checkpoints from other codebases: key filters, architecture recovery and ``landscape import``.

A foreign file goes through four steps, one module each (:mod:`.read`, :mod:`.filters`, :mod:`.recover`,
:mod:`.convert`):

1. **read** (:func:`read_foreign_checkpoint`): only safetensors or ``torch.load(weights_only=True)``, through
   :func:`landscape.checkpoints.load_foreign_state`. The one class allowed beyond tensors and plain containers
   is ``argparse.Namespace``, which timm's ``train.py`` stores as ``args``: unpickling it only sets attributes.
   Training checkpoints are unpacked into raw and EMA weights (timm: ``state_dict`` / ``state_dict_ema``;
   DeiT and torchvision references: ``model`` / ``model_ema``).
2. **filter** (one function per source format, as timm's ``checkpoint_filter_fn``): the prefixes
   ``module.`` (DataParallel/DDP), ``_orig_mod.`` (``torch.compile``) and ``model.`` are stripped, then the keys
   are renamed to timm ``VisionTransformer`` names: :func:`filter_timm`, :func:`filter_deit`,
   :func:`filter_hf_vit`, :func:`filter_torchvision_vit`. A shared MLP that a deduplicating writer stored under
   one block of its group only is given back to every block (:func:`restore_shared_mlps`).
3. **recover the architecture** (:func:`recover_architecture`) from the tensor shapes:

   - ``embed_dim``, ``in_chans``, ``patch_size`` from ``patch_embed.proj.weight`` ``(D, C, p, p)``;
   - ``depth`` from the block indices, the MLP hidden width ``H`` from ``blocks.i.mlp.fc1.weight`` ``(H, D)``;
   - ``num_classes`` from ``head.weight`` (0 without a head);
   - the image size from ``pos_embed`` ``(1, L, D)``: ``L = T + (h/p)^2`` with ``T`` prefix tokens (class and
     register tokens) or ``L = (h/p)^2`` when the prefix tokens carry no position embedding;
   - ``num_heads`` cannot be read from the weights (the ``qkv`` projection is ``3D x D`` for any head count):
     the source's own config when it has one (Hugging Face ``config.json``, the timm architecture named in a
     ``train.py`` checkpoint), else the convention of the registered models for their widths (64: 2, 96: 3,
     128: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16), else a head dimension of 64, else 32, else one head.
     ``--model-arg num_heads=N`` overrides it;
   - GroupedMLP: adjacent blocks whose MLP tensors are equal (``torch.equal``) form a group, and equal-sized
     groups give ``group_size``; a narrowed MLP has ``H < 4 D``;
   - the LayerNorm epsilon (Hugging Face's ``layer_norm_eps``, 1e-12 by default; timm uses 1e-6) is passed
     as ``norm_eps`` when it differs, or dropped with a note when the model cannot take it: the normalised
     features then change by a relative :math:`\\approx (\\epsilon_1 - \\epsilon_2) / 2\\sigma^2` for a token
     of feature variance :math:`\\sigma^2`.

4. **build and save** (:func:`import_checkpoint`): the model is built by its registered name and keyword
   arguments, the weights are loaded strictly (a mismatch is one readable block listing missing, unexpected
   and mis-shaped keys) and a run directory with one checkpoint is written in a temporary sibling directory
   that is renamed into place at the end, so a failure leaves nothing behind.
"""

from landscape.importers.convert import IMPORT_STAGES, ImportResult, import_checkpoint, verify_logits
from landscape.importers.filters import (
    FILTERS,
    FORMATS,
    detect_format,
    filter_deit,
    filter_hf_vit,
    filter_timm,
    filter_torchvision_vit,
    restore_shared_mlps,
)
from landscape.importers.read import ForeignCheckpoint, read_foreign_checkpoint, read_logits_pair
from landscape.importers.recover import Architecture, ModelSpec, model_spec, recover_architecture, resolve_model

__all__ = [
    "import_checkpoint",
    "IMPORT_STAGES",
    "ImportResult",
    "read_foreign_checkpoint",
    "ForeignCheckpoint",
    "read_logits_pair",
    "detect_format",
    "FILTERS",
    "FORMATS",
    "filter_timm",
    "filter_deit",
    "filter_hf_vit",
    "filter_torchvision_vit",
    "restore_shared_mlps",
    "recover_architecture",
    "Architecture",
    "model_spec",
    "ModelSpec",
    "resolve_model",
    "verify_logits",
]
