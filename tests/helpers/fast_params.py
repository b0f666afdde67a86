"""Params sections that make a stage run in seconds, for tests that run the pipeline for its
plumbing (dvc repro in a checkout, Prefect runs, MLflow pages), not for what it learns."""

# the base stage: a few steps of each part at 16 px (its model does not draw; the default
# profile's base is tested by the `default_run` fixture's tests)
FAST_BASE = {"resolution": 16, "batch_size": 4, "autoencoder": {"steps": 2}, "image_encoder": {"steps": 2},
             "prior": {"steps": 2, "warmup_steps": 1}, "check": {"images_per_subject": 1, "steps": 2}}

# the controlnet stage: two steps, a two-step check
FAST_CONTROLNET = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "check": {"steps": 2}}

# ingest: 3 synthetic subjects of 3 views at 48 px, one held out each (stage tests on a small root)
SMALL_INGEST = {"test_views_per_subject": 1, "synthetic": {"num_subjects": 3, "min_views": 3, "max_views": 3,
                                                          "image_size": 48}}
