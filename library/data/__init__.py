"""Training data: dataset config → images and captions → buckets → per-epoch batch order.

Modules: ``captions`` (pure caption functions), ``buckets`` (aspect-ratio buckets),
``images`` (``ImageCaptionDataset``, ``collate_fn``), ``sampler`` (``epoch_batches``,
``EpochBatchSampler``, ``derive_seed``). Nothing is imported here, so that
``library.dataset_config`` can import ``library.data.captions`` without a cycle.
"""
