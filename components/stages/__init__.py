"""The DVC stages, one module each (`components.stages.<name>`), run by `runner.py`.

The names live here, free of imports, so that `blipdiff` builds its parser without loading
any stage (tests/test_architecture.py holds them equal to dvc.yaml's stages)."""

STAGES = ("ingest", "context", "base", "controlnet", "pretrain_qformer", "train_subject", "evaluate", "export")  # in pipeline order
RESUMABLE = ("pretrain_qformer", "train_subject")  # take --resume
