"""The model kit shared by the model stages (layer 1): model cards and safe loading, the model
cached per worker and batched inference, CLIP model directories, preprocessing and augmentation
on the device, training sets streamed from a split, targets and per-rank scores.

Nothing is imported here, so ``pzscale.ml.labels`` stays usable without torch.
"""
