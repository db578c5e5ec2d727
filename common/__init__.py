"""Pure logic shared by the producer and the worker pools: config, db, storage, images, augment, model."""
