"""Tasks (loss + evaluation of a workload), registered in `kfac_train.registry.TASKS`.

The interface (`Task`, `Evaluator`, `LossOutput`) is in `tasks/base.py`.
"""
