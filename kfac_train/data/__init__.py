"""Datasets and input pipelines, registered in `kfac_train.registry.DATA`.

The contract (`DataBundle`, `EpochLoader`) and the loader helpers are in `data/base.py`.
"""
